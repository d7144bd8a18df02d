//! The volume header: the object ([`ObjectKey::HEADER`](super::ObjectKey::HEADER)) that
//! marks a store prefix as one volume's. One text line per field (docs/format.md); written
//! by `store::claim`, checked by every reader before anything else is read.

use super::{KEY_FILE_VAR, KEY_VAR, ObjectStore, StoreError, StoreResult, StoreUrl};

const MAGIC: &str = "snapfs volume\n";
/// The line naming the cipher and the key check value.
const ENCRYPTION: &str = "encryption";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeHeader {
    /// The volume's id: its snapshot objects must name it.
    pub id: String,
    pub block_size: u32,
    /// The store of the volume this one was made from (`--from`), whose blocks it shares.
    pub origin: Option<StoreUrl>,
    /// The cipher and key check value (see `store/sealed.rs`), if objects are sealed.
    pub encryption: Option<String>,
}

impl VolumeHeader {
    /// The store format this snapfs writes: 2, blocks in packs (`pack.rs`).
    pub const FORMAT_VERSION: u32 = 2;
    /// The store formats it reads: format 1 is format 2 without packs, so a format-1
    /// store is read as it is and becomes format 2 when this snapfs first writes to it.
    pub const READS_FORMATS: [u32; 2] = [1, 2];

    /// The header object's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let VolumeHeader {
            id,
            block_size,
            origin,
            encryption,
        } = self;
        let mut text = format!(
            "{MAGIC}format {}\nid {id}\nblock_size {block_size}\n",
            Self::FORMAT_VERSION
        );
        if let Some(origin) = origin {
            text.push_str(&format!("origin {origin}\n"));
        }
        if let Some(encryption) = encryption {
            text.push_str(&format!("{ENCRYPTION} {encryption}\n"));
        }
        text.into_bytes()
    }

    /// Parses and checks a header object: snapfs's, of this format, whole. The error says
    /// what is wrong with it.
    pub fn parse(bytes: &[u8]) -> Result<VolumeHeader, String> {
        let text = String::from_utf8_lossy(bytes);
        if !text.starts_with(MAGIC) {
            return Err("the volume header is not snapfs's".into());
        }
        match field(&text, "format") {
            Some(format)
                if Self::READS_FORMATS
                    .iter()
                    .any(|known| format == known.to_string()) => {}
            Some(other) => {
                return Err(format!(
                    "the store has format {other}; this snapfs reads formats 1 and {}: \
                     upgrade snapfs",
                    Self::FORMAT_VERSION
                ));
            }
            None => return Err("the volume header has no format".into()),
        }
        let origin = field(&text, "origin")
            .map(StoreUrl::parse)
            .transpose()
            .map_err(|e| format!("the volume header's origin: {e}"))?;
        let id = field(&text, "id").ok_or("the volume header has no id")?;
        let block_size = field(&text, "block_size")
            .and_then(|size| size.parse().ok())
            .ok_or("the volume header has no block size")?;
        Ok(VolumeHeader {
            id: id.to_owned(),
            block_size,
            origin,
            encryption: field(&text, ENCRYPTION).map(str::to_owned),
        })
    }

    /// Checks that `store` reads this volume with the right key, or with none if the
    /// volume is not encrypted.
    pub fn check_key(&self, store: &dyn ObjectStore) -> StoreResult<()> {
        check_key(store, self.encryption.as_deref())
    }
}

/// The id in a header that is not this volume's (for a message; it may not be a valid
/// header at all), after checking the key against it: a wrong key is the likelier fault.
pub(super) fn foreign_id(store: &dyn ObjectStore, header: &[u8]) -> StoreResult<String> {
    let text = String::from_utf8_lossy(header);
    check_key(store, field(&text, ENCRYPTION))?;
    Ok(field(&text, "id").unwrap_or("unknown").to_owned())
}

/// The value of `name` in a header's text. Lines end at `\n` alone, as `encode` writes
/// them: `str::lines` would also drop a `\r` before one but not at the very end, so a
/// damaged header's value could change when written again.
fn field<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    text.split('\n')
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
}

/// Checks `store`'s key against a header's `encryption` value.
fn check_key(store: &dyn ObjectStore, theirs: Option<&str>) -> StoreResult<()> {
    let url = store.url();
    match (theirs, store.encryption()) {
        (None, None) => Ok(()),
        (Some(theirs), Some(ours)) if theirs == ours => Ok(()),
        (Some(_), None) => Err(StoreError::permanent(format!(
            "{url} is encrypted: set {KEY_FILE_VAR} to the file holding its key (or {KEY_VAR} \
             to the key)"
        ))),
        (Some(_), Some(_)) => Err(StoreError::permanent(format!(
            "the key in {KEY_FILE_VAR}/{KEY_VAR} is not {url}'s key"
        ))),
        (None, Some(_)) => Err(StoreError::permanent(format!(
            "{url} is not encrypted but a key is set ({KEY_FILE_VAR}/{KEY_VAR}): unset it to \
             use this store, or give an encrypted volume its own store"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_and_keep_their_format() {
        let header = VolumeHeader {
            id: "0123456789abcdef0123456789abcdef".into(),
            block_size: 262144,
            origin: Some(StoreUrl::parse("s3://bucket/a").expect("url")),
            encryption: Some("xchacha20poly1305 00ff".into()),
        };
        let bytes = header.encode();
        let format_1 = "snapfs volume\nformat 1\nid 0123456789abcdef0123456789abcdef\n\
                        block_size 262144\norigin s3://bucket/a\n\
                        encryption xchacha20poly1305 00ff\n";
        assert_eq!(
            String::from_utf8_lossy(&bytes),
            format_1.replace("format 1", "format 2")
        );
        assert_eq!(VolumeHeader::parse(&bytes), Ok(header.clone()));
        // A format-1 store is read as it is.
        assert_eq!(VolumeHeader::parse(format_1.as_bytes()), Ok(header));
        for (text, problem) in [
            ("volume\n", "not snapfs's"),
            ("snapfs volume\nformat 3\nid x\n", "format 3"),
            ("snapfs volume\nid x\n", "no format"),
            ("snapfs volume\nformat 1\nblock_size 4\n", "no id"),
            ("snapfs volume\nformat 1\nid x\norigin http://x\n", "origin"),
        ] {
            let error = VolumeHeader::parse(text.as_bytes()).expect_err(text);
            assert!(error.contains(problem), "{text:?}: {error}");
        }
    }

    #[test]
    fn a_value_ending_in_a_carriage_return_reads_the_same_when_written_again() {
        // A bit flip turned the header's last newline into a carriage return.
        let text = "snapfs volume\nformat 2\nid 0a\nblock_size 4096\nencryption x 00ff\r";
        let header = VolumeHeader::parse(text.as_bytes()).expect("parses");
        assert_eq!(header.encryption.as_deref(), Some("x 00ff\r"));
        assert_eq!(VolumeHeader::parse(&header.encode()), Ok(header));
    }
}
