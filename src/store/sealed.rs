//! Client-side encryption: a store wrapper that seals every object with XChaCha20-Poly1305
//! before it leaves the machine, and renames block and tree objects by a keyed hash, so
//! the bucket's holder learns object sizes and counts but no content and no content hash
//! (which would tell whether the volume holds a file they know).
//!
//! The key is 32 random bytes, given as 64 hex digits in the file named by
//! `SNAPFS_KEY_FILE` or in `SNAPFS_KEY`. Two subkeys are derived from it with BLAKE3: one
//! encrypts, one names. Each object is `MAGIC | nonce (24) | ciphertext | tag (16)` with
//! its logical key as associated data, so an object moved to another key fails to open.
//! The volume header stays readable and carries a key check value (a keyed hash of a fixed
//! string), so a missing or wrong key is reported before anything is read or written.

use std::borrow::Cow;
use std::path::Path;
use std::sync::Arc;

use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

use super::{ObjectKey, ObjectStore, StoreError, StoreFuture, StoreResult};

const MAGIC: &[u8; 8] = b"snapfsE1";
const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;
/// Where the key comes from: a file holding it, or the variable itself.
pub const KEY_FILE_VAR: &str = "SNAPFS_KEY_FILE";
pub const KEY_VAR: &str = "SNAPFS_KEY";
const CIPHER: &str = "xchacha20poly1305";

/// A volume's encryption key (never printed: no Debug, no Display).
#[derive(Clone)]
pub struct Key([u8; 32]);

impl Key {
    /// A new random key.
    pub fn generate() -> Key {
        let mut bytes = [0u8; 32];
        chacha20poly1305::aead::rand_core::RngCore::fill_bytes(&mut OsRng, &mut bytes);
        Key(bytes)
    }

    /// The key as 64 hex digits, for a key file.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses 64 hex digits (surrounding whitespace allowed).
    pub fn parse(text: &str, origin: &str) -> StoreResult<Key> {
        let text = text.trim();
        let bad = || {
            StoreError::permanent(format!(
                "{origin} does not hold a snapfs key (64 hex digits, as `snapfs keygen` writes)"
            ))
        };
        if text.len() != 64 || !text.is_ascii() {
            return Err(bad());
        }
        let mut bytes = [0u8; 32];
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(Key(bytes))
    }

    /// The key from `SNAPFS_KEY_FILE` or `SNAPFS_KEY`, if either is set.
    pub fn from_env() -> StoreResult<Option<Key>> {
        if let Some(path) = std::env::var_os(KEY_FILE_VAR) {
            let path = Path::new(&path);
            let text = std::fs::read_to_string(path).map_err(|e| {
                StoreError::permanent(format!(
                    "cannot read the key file {} ({KEY_FILE_VAR}): {e}",
                    path.display()
                ))
            })?;
            return Key::parse(&text, &format!("{} ({KEY_FILE_VAR})", path.display())).map(Some);
        }
        match std::env::var(KEY_VAR) {
            Ok(text) => Key::parse(&text, KEY_VAR).map(Some),
            Err(std::env::VarError::NotPresent) => Ok(None),
            Err(std::env::VarError::NotUnicode(_)) => Err(StoreError::permanent(format!(
                "{KEY_VAR} does not hold a snapfs key"
            ))),
        }
    }

    fn derive(&self, purpose: &str) -> [u8; 32] {
        blake3::derive_key(purpose, &self.0)
    }
}

/// An object store whose objects are sealed with a key.
pub struct Sealed {
    inner: Arc<dyn ObjectStore>,
    cipher: XChaCha20Poly1305,
    names: [u8; 32],
    check: String,
}

impl Sealed {
    pub fn new(inner: Arc<dyn ObjectStore>, key: &Key) -> Sealed {
        let names = key.derive("snapfs 2026-11 object names");
        let check = blake3::keyed_hash(&names, b"snapfs key check").to_hex()[..32].to_owned();
        Sealed {
            inner,
            cipher: XChaCha20Poly1305::new(&key.derive("snapfs 2026-11 object encryption").into()),
            names,
            check,
        }
    }

    /// `key`'s object name in the bucket: block and tree names, being content hashes,
    /// are replaced by a keyed hash of themselves.
    fn name(&self, key: &str) -> String {
        match ObjectKey::split_content_named(key) {
            Some((prefix, hash)) => format!(
                "{prefix}{}",
                blake3::keyed_hash(&self.names, hash.as_bytes()).to_hex()
            ),
            None => key.to_owned(),
        }
    }

    fn seal(&self, key: &str, plain: &[u8]) -> StoreResult<Vec<u8>> {
        let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        let sealed = self
            .cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: plain,
                    aad: key.as_bytes(),
                },
            )
            .map_err(|_| StoreError::permanent(format!("cannot encrypt {key}")))?;
        let mut object = Vec::with_capacity(MAGIC.len() + NONCE_LEN + sealed.len());
        object.extend_from_slice(MAGIC);
        object.extend_from_slice(&nonce);
        object.extend_from_slice(&sealed);
        Ok(object)
    }

    fn open(&self, key: &str, object: &[u8]) -> StoreResult<Vec<u8>> {
        let failed = || {
            StoreError::damaged(format!(
                "{key} in {} fails authentication: damaged, or sealed with another key",
                self.inner.url()
            ))
        };
        let body = object.strip_prefix(MAGIC).ok_or_else(failed)?;
        if body.len() < NONCE_LEN + TAG_LEN {
            return Err(failed());
        }
        let (nonce, sealed) = body.split_at(NONCE_LEN);
        self.cipher
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: sealed,
                    aad: key.as_bytes(),
                },
            )
            .map_err(|_| failed())
    }
}

impl ObjectStore for Sealed {
    fn put<'a>(&'a self, key: &'a str, body: bytes::Bytes) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            // A pack's parts are sealed one by one already (`seal_part`).
            if key == ObjectKey::HEADER.as_str() || ObjectKey::is_sealed_in_parts(key) {
                return self.inner.put(key, body).await;
            }
            let object = self.seal(key, &body)?;
            self.inner.put(&self.name(key), object.into()).await
        })
    }

    fn get<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Vec<u8>>> {
        Box::pin(async move {
            if key == ObjectKey::HEADER.as_str() || ObjectKey::is_sealed_in_parts(key) {
                return self.inner.get(key).await;
            }
            match self.inner.get(&self.name(key)).await? {
                Some(object) => self.open(key, &object).map(Some),
                None => Ok(None),
            }
        })
    }

    /// Ranges are read only of objects sealed in parts, which are stored as they are.
    fn get_range_into<'a>(
        &'a self,
        key: &'a str,
        offset: u64,
        len: u64,
        buffer: Vec<u8>,
    ) -> StoreFuture<'a, Option<Vec<u8>>> {
        self.inner.get_range_into(key, offset, len, buffer)
    }

    fn delete<'a>(&'a self, key: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(async move { self.inner.delete(&self.name(key)).await })
    }

    fn seal_part(&self, key: &str, part: Vec<u8>) -> StoreResult<Vec<u8>> {
        self.seal(key, &part)
    }

    fn open_part<'p>(&self, key: &str, part: &'p [u8]) -> StoreResult<Cow<'p, [u8]>> {
        self.open(key, part).map(Cow::Owned)
    }

    fn list<'a>(&'a self, prefix: &'a str) -> StoreFuture<'a, Vec<String>> {
        self.inner.list(prefix)
    }

    fn url(&self) -> &str {
        self.inner.url()
    }

    fn object_name(&self, key: &str) -> String {
        self.name(key)
    }

    fn encryption(&self) -> Option<String> {
        Some(format!("{CIPHER} {}", self.check))
    }

    fn is_local(&self) -> bool {
        self.inner.is_local()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::LocalStore;

    fn sealed(dir: &Path, key: &Key) -> Sealed {
        let inner = LocalStore::open(dir, "file:///test".into()).expect("local store");
        Sealed::new(Arc::new(inner), key)
    }

    #[test]
    fn objects_round_trip_and_reveal_neither_content_nor_hash() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = Key::generate();
        let store = sealed(dir.path(), &key);
        let hash = blake3::hash(b"known content").to_hex().to_string();
        let block = format!("blocks/{hash}");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            store
                .put(&block, b"known content".to_vec().into())
                .await
                .expect("put");
            let back = store.get(&block).await.expect("get");
            assert_eq!(back.as_deref(), Some(&b"known content"[..]));
            let listed = store.list("blocks/").await.expect("list");
            assert_eq!(listed, vec![store.object_name(&block)]);
            assert!(
                !listed[0].contains(&hash),
                "the content hash is not the name"
            );
            let raw = store
                .inner
                .get(&listed[0])
                .await
                .expect("raw")
                .expect("object");
            assert!(!raw.windows(7).any(|w| w == b"content"), "no plaintext");

            // Moved to another key, or opened with another key: refused.
            let other = format!("blocks/{}", blake3::hash(b"other").to_hex());
            store
                .inner
                .put(&store.object_name(&other), raw.clone().into())
                .await
                .expect("plant");
            let moved = store.get(&other).await.expect_err("moved object");
            assert!(moved.message.contains("fails authentication"), "{moved}");
            let stranger = sealed(dir.path(), &Key::generate());
            assert_eq!(stranger.get(&block).await.expect("no such name"), None);
            stranger
                .inner
                .put(&stranger.object_name(&block), raw.into())
                .await
                .expect("plant");
            assert!(stranger.get(&block).await.is_err(), "wrong key");
        });
    }

    #[test]
    fn keys_parse_from_hex_only() {
        let key = Key::generate();
        let parsed = Key::parse(&format!(" {}\n", key.to_hex()), "test").expect("parse");
        assert_eq!(parsed.0, key.0);
        for bad in ["", "abc", &"g".repeat(64), &"a".repeat(63), &"é".repeat(32)] {
            let e = Key::parse(bad, "KEY").err().expect("refused");
            assert!(e.message.contains("does not hold a snapfs key"), "{e}");
        }
    }
}
