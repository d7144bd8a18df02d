//! Manifests: what a snapshot looks like in the object store, enough to list and restore
//! it with nothing but the bucket. docs/format.md describes the encoding.
//!
//! A snapshot object names the root directory's tree; a tree object lists one directory's
//! entries (attributes, xattrs, block lists, subdirectory trees). Trees are named by the
//! hash of their encoding, so an unchanged directory is the same object in every snapshot
//! and a one-file change rewrites only the trees on its path.
//!
//! Decoding treats the input as hostile: every length is bounded before it is used.

use crate::blocks::BlockHash;
use crate::catalog::{Attrs, Kind, LockMode, NAME_MAX, SnapshotLock, Trash, XATTR_SIZE_MAX};

const TREE_MAGIC: &[u8; 8] = b"snapfsT1";
const SNAPSHOT_MAGIC: &[u8; 8] = b"snapfsS1";
/// A snapshot object with extensions after the root (see `Extension`): written only when
/// one is present, so every other object stays readable by versions that know S1 only,
/// and those refuse an S2 object ("upgrade snapfs") instead of ignoring a lock.
const SNAPSHOT_MAGIC_V2: &[u8; 8] = b"snapfsS2";
/// Most extensions one snapshot object may have.
const MAX_EXTENSIONS: u64 = 64;

/// Keys of the extensions of a snapshot object. An odd key is critical: a reader that
/// does not know it refuses the object; an even one it may skip.
#[derive(Clone, Copy)]
enum Extension {
    /// `uint mode` (1 governance, 2 compliance), `int until`, `int cool_off_until`.
    Lock = 1,
    /// In the recycle bin: `int deleted`, `int expires`.
    Trash = 3,
}
/// Bounds on decoded values: far above anything valid, far below what would exhaust memory.
const MAX_ENTRIES: u64 = 10_000_000;
const MAX_XATTRS: u64 = 10_000;
const MAX_TARGET: usize = 4096;
/// Most bytes a decompressed manifest object may have.
pub const MAX_OBJECT: usize = 1 << 30;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Content {
    /// Fifos, sockets, devices, symlinks (their target is in `Entry::target`).
    None,
    /// A regular file's mapped blocks as (index, hash); unlisted indexes are holes.
    Blocks(Vec<(u64, BlockHash)>),
    /// A directory's tree object.
    Tree(BlockHash),
}

/// One directory entry with everything needed to recreate the node it names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub name: Vec<u8>,
    /// The volume's inode number: entries with the same one are hard links.
    pub ino: u64,
    pub attrs: Attrs,
    pub target: Option<Vec<u8>>,
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    pub content: Content,
}

impl Entry {
    /// The entry for a catalog directory entry, with its xattrs and content.
    pub fn from_row(
        row: crate::catalog::DirEntryRow,
        xattrs: Vec<(Vec<u8>, Vec<u8>)>,
        content: Content,
    ) -> Entry {
        let inode = row.inode;
        Entry {
            name: row.name,
            ino: inode.ino,
            attrs: inode.attrs,
            target: inode.target,
            xattrs,
            content,
        }
    }
}

/// The object a snapshot is listed and restored from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotManifest {
    pub volume_id: String,
    pub id: u64,
    pub name: Vec<u8>,
    pub generation: u64,
    /// Nanoseconds since the epoch.
    pub created: i64,
    pub block_size: u32,
    pub logical_bytes: u64,
    pub tags: Vec<(Vec<u8>, Vec<u8>)>,
    /// The root directory: its attributes, and its tree as content.
    pub root: Entry,
    /// Its lock: the volume refuses to delete it before then (see docs/locks.md).
    pub lock: Option<SnapshotLock>,
    /// Set while it is in the volume's recycle bin: not a snapshot to list or restore.
    pub trash: Option<Trash>,
}

#[derive(Debug, thiserror::Error)]
#[error("bad manifest object: {0}")]
pub struct FormatError(pub String);

type Result<T> = std::result::Result<T, FormatError>;

fn bad<T>(what: impl Into<String>) -> Result<T> {
    Err(FormatError(what.into()))
}

#[derive(Default)]
struct Writer(Vec<u8>);

impl Writer {
    fn uint(&mut self, mut value: u64) {
        while value >= 0x80 {
            self.0.push((value as u8) | 0x80);
            value >>= 7;
        }
        self.0.push(value as u8);
    }

    fn int(&mut self, value: i64) {
        self.uint(((value << 1) ^ (value >> 63)) as u64);
    }

    fn bytes(&mut self, value: &[u8]) {
        self.uint(value.len() as u64);
        self.0.extend_from_slice(value);
    }

    fn hash(&mut self, hash: &BlockHash) {
        self.0.extend_from_slice(hash.as_bytes());
    }

    fn pairs(&mut self, pairs: &[(Vec<u8>, Vec<u8>)]) {
        self.uint(pairs.len() as u64);
        for (key, value) in pairs {
            self.bytes(key);
            self.bytes(value);
        }
    }

    fn entry(&mut self, entry: &Entry) {
        self.bytes(&entry.name);
        self.uint(entry.attrs.kind as u64);
        self.uint(entry.ino);
        for value in [
            entry.attrs.perm,
            entry.attrs.uid,
            entry.attrs.gid,
            entry.attrs.nlink,
            entry.attrs.rdev,
        ] {
            self.uint(u64::from(value));
        }
        self.uint(entry.attrs.size);
        for time in [
            entry.attrs.atime,
            entry.attrs.mtime,
            entry.attrs.ctime,
            entry.attrs.crtime,
        ] {
            self.int(time);
        }
        self.bytes(entry.target.as_deref().unwrap_or_default());
        self.pairs(&entry.xattrs);
        match &entry.content {
            Content::None => self.uint(0),
            Content::Blocks(blocks) => {
                self.uint(1);
                self.uint(blocks.len() as u64);
                let mut previous = 0;
                for (index, hash) in blocks {
                    // Delta-coded: sorted indexes cost a byte each.
                    self.uint(index - previous);
                    previous = *index;
                    self.hash(hash);
                }
            }
            Content::Tree(hash) => {
                self.uint(2);
                self.hash(hash);
            }
        }
    }
}

struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.data.len() {
            return bad("truncated");
        }
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        Ok(head)
    }

    fn uint(&mut self) -> Result<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.take(1)?[0];
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        bad("integer too long")
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        u32::try_from(self.uint()?).or_else(|_| bad(format!("{what} out of range")))
    }

    fn int(&mut self) -> Result<i64> {
        let raw = self.uint()?;
        Ok((raw >> 1) as i64 ^ -((raw & 1) as i64))
    }

    fn bytes(&mut self, max: usize, what: &str) -> Result<Vec<u8>> {
        let len = self.uint()?;
        if len > max as u64 {
            return bad(format!("{what} of {len} bytes"));
        }
        Ok(self.take(len as usize)?.to_vec())
    }

    fn hash(&mut self) -> Result<BlockHash> {
        BlockHash::try_from(self.take(32)?).or_else(|_| bad("short hash"))
    }

    fn count(&mut self, max: u64, what: &str) -> Result<usize> {
        let n = self.uint()?;
        // Each item takes at least one byte: a count beyond the input is a lie.
        if n > max || n > self.data.len() as u64 {
            return bad(format!("{n} {what}"));
        }
        Ok(n as usize)
    }

    fn pairs(
        &mut self,
        key_max: usize,
        value_max: usize,
        what: &str,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let n = self.count(MAX_XATTRS, what)?;
        (0..n)
            .map(|_| Ok((self.bytes(key_max, what)?, self.bytes(value_max, what)?)))
            .collect()
    }

    fn entry(&mut self) -> Result<Entry> {
        let name = self.bytes(NAME_MAX, "name")?;
        let kind = i64::try_from(self.uint()?)
            .ok()
            .and_then(|k| Kind::try_from(k).ok())
            .map_or_else(|| bad("unknown node kind"), Ok)?;
        let ino = self.uint()?;
        let perm = self.u32("mode")?;
        let uid = self.u32("uid")?;
        let gid = self.u32("gid")?;
        let nlink = self.u32("link count")?;
        let rdev = self.u32("device")?;
        let size = self.uint()?;
        if size > i64::MAX as u64 {
            return bad(format!("file size {size}"));
        }
        let (atime, mtime, ctime, crtime) = (self.int()?, self.int()?, self.int()?, self.int()?);
        let target = self.bytes(MAX_TARGET, "symlink target")?;
        let xattrs = self.pairs(NAME_MAX, XATTR_SIZE_MAX, "xattrs")?;
        let content = match self.uint()? {
            0 => Content::None,
            1 => {
                let n = self.count(MAX_ENTRIES * 16, "blocks")?;
                let mut blocks = Vec::with_capacity(n);
                let mut index = 0u64;
                for i in 0..n {
                    let delta = self.uint()?;
                    if i > 0 && delta == 0 {
                        return bad("block indexes not increasing");
                    }
                    index = index
                        .checked_add(delta)
                        .map_or_else(|| bad("block index overflows"), Ok)?;
                    blocks.push((index, self.hash()?));
                }
                Content::Blocks(blocks)
            }
            2 => Content::Tree(self.hash()?),
            other => return bad(format!("unknown content type {other}")),
        };
        let consistent = match (&content, kind) {
            (Content::Tree(_), Kind::Dir) | (Content::Blocks(_), Kind::File) => true,
            (Content::None, kind) => kind != Kind::Dir && kind != Kind::File,
            _ => false,
        };
        if !consistent {
            return bad(format!("{kind:?} entry with the wrong content"));
        }
        if name.contains(&b'/') || name.contains(&0) || name == b"." || name == b".." {
            return bad(format!("unsafe name {:?}", String::from_utf8_lossy(&name)));
        }
        Ok(Entry {
            name,
            ino,
            attrs: Attrs {
                kind,
                perm,
                uid,
                gid,
                nlink,
                size,
                rdev,
                atime,
                mtime,
                ctime,
                crtime,
            },
            target: (kind == Kind::Symlink).then_some(target),
            xattrs,
            content,
        })
    }

    fn magic(&mut self, magic: &[u8; 8], what: &str) -> Result<()> {
        match self.take(8) {
            Ok(found) if found == magic => Ok(()),
            Ok(found) if found.starts_with(b"snapfs") => bad(format!(
                "{what} in an unknown format version ({}); upgrade snapfs",
                String::from_utf8_lossy(found)
            )),
            _ => bad(format!("not a snapfs {what}")),
        }
    }

    fn finish(&self) -> Result<()> {
        if self.data.is_empty() {
            Ok(())
        } else {
            bad("trailing bytes")
        }
    }
}

/// Encodes one directory's entries, which must be sorted by name.
pub fn encode_tree(entries: &[Entry]) -> Vec<u8> {
    let mut w = Writer::default();
    w.0.extend_from_slice(TREE_MAGIC);
    w.uint(entries.len() as u64);
    for entry in entries {
        w.entry(entry);
    }
    w.0
}

/// Whether `data` starts as an encoded tree does (a cheap look, not a decode).
pub fn looks_like_tree(data: &[u8]) -> bool {
    data.starts_with(TREE_MAGIC)
}

pub fn decode_tree(data: &[u8]) -> Result<Vec<Entry>> {
    let mut r = Reader { data };
    r.magic(TREE_MAGIC, "tree")?;
    let n = r.count(MAX_ENTRIES, "entries")?;
    let mut entries: Vec<Entry> = Vec::with_capacity(n.min(4096));
    for _ in 0..n {
        let entry = r.entry()?;
        if entry.name.is_empty() {
            return bad("an entry without a name");
        }
        if entries.last().is_some_and(|last| last.name >= entry.name) {
            return bad("entries not sorted or duplicated");
        }
        entries.push(entry);
    }
    r.finish()?;
    Ok(entries)
}

pub fn encode_snapshot(snapshot: &SnapshotManifest) -> Vec<u8> {
    let mut extensions = Vec::new();
    if let Some(lock) = &snapshot.lock {
        let mut value = Writer::default();
        value.uint(match lock.mode {
            LockMode::Governance => 1,
            LockMode::Compliance => 2,
        });
        value.int(lock.until);
        value.int(lock.cool_off_until);
        extensions.push((Extension::Lock, value.0));
    }
    if let Some(trash) = &snapshot.trash {
        let mut value = Writer::default();
        value.int(trash.deleted);
        value.int(trash.expires);
        extensions.push((Extension::Trash, value.0));
    }
    let mut w = Writer::default();
    w.0.extend_from_slice(if extensions.is_empty() {
        SNAPSHOT_MAGIC
    } else {
        SNAPSHOT_MAGIC_V2
    });
    w.bytes(snapshot.volume_id.as_bytes());
    w.uint(snapshot.id);
    w.bytes(&snapshot.name);
    w.uint(snapshot.generation);
    w.int(snapshot.created);
    w.uint(u64::from(snapshot.block_size));
    w.uint(snapshot.logical_bytes);
    w.pairs(&snapshot.tags);
    w.entry(&snapshot.root);
    if !extensions.is_empty() {
        w.uint(extensions.len() as u64);
        for (key, value) in extensions {
            w.uint(key as u64);
            w.bytes(&value);
        }
    }
    w.0
}

pub fn decode_snapshot(data: &[u8]) -> Result<SnapshotManifest> {
    let mut r = Reader { data };
    let extended = data.starts_with(SNAPSHOT_MAGIC_V2);
    r.magic(
        if extended {
            SNAPSHOT_MAGIC_V2
        } else {
            SNAPSHOT_MAGIC
        },
        "snapshot",
    )?;
    let volume_id =
        String::from_utf8(r.bytes(64, "volume id")?).or_else(|_| bad("volume id is not text"))?;
    let id = r.uint()?;
    let name = r.bytes(NAME_MAX, "snapshot name")?;
    let generation = r.uint()?;
    let created = r.int()?;
    let block_size = r.u32("block size")?;
    if !(4096..=16 << 20).contains(&block_size) || !block_size.is_power_of_two() {
        return bad(format!("block size {block_size}"));
    }
    let logical_bytes = r.uint()?;
    let tags = r.pairs(NAME_MAX, XATTR_SIZE_MAX, "tags")?;
    let root = r.entry()?;
    if root.attrs.kind != Kind::Dir {
        return bad("the root is not a directory");
    }
    let (mut lock, mut trash) = (None, None);
    if extended {
        let n = r.count(MAX_EXTENSIONS, "extensions")?;
        let mut previous = 0;
        for _ in 0..n {
            let key = r.uint()?;
            if key <= previous {
                return bad("extensions not sorted or duplicated");
            }
            previous = key;
            let value = r.bytes(1 << 16, "extension")?;
            let mut v = Reader { data: &value };
            match key {
                k if k == Extension::Lock as u64 => {
                    let mode = match v.uint()? {
                        1 => LockMode::Governance,
                        2 => LockMode::Compliance,
                        other => return bad(format!("unknown lock mode {other}")),
                    };
                    lock = Some(SnapshotLock {
                        mode,
                        until: v.int()?,
                        cool_off_until: v.int()?,
                    });
                }
                k if k == Extension::Trash as u64 => {
                    trash = Some(Trash {
                        deleted: v.int()?,
                        expires: v.int()?,
                    });
                }
                k if k % 2 == 1 => {
                    return bad(format!("unknown critical extension {k}; upgrade snapfs"));
                }
                _ => continue,
            }
            v.finish()?;
        }
    }
    r.finish()?;
    Ok(SnapshotManifest {
        volume_id,
        id,
        name,
        generation,
        created,
        block_size,
        logical_bytes,
        tags,
        root,
        lock,
        trash,
    })
}

/// Where one block sits in a pack: its frame is the pack's bytes `[offset, offset +
/// length)`, and decompresses to `raw_length` bytes hashing to `hash`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackedBlock {
    pub hash: BlockHash,
    pub offset: u64,
    pub length: u32,
    pub raw_length: u32,
}

/// A pack's name: 16 random bytes, written as 32 hex digits in its key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PackId(pub [u8; 16]);

impl PackId {
    pub fn parse(hex: &str) -> Option<PackId> {
        if hex.len() != 32 || !hex.is_ascii() {
            return None;
        }
        let mut id = [0u8; 16];
        for (i, byte) in id.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(PackId(id))
    }
}

impl std::fmt::Display for PackId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// What a pack holds: the length of its frames (the trailer follows them) and where each
/// block is, in the order they were written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackListing {
    pub data_length: u64,
    pub blocks: Vec<PackedBlock>,
}

const PACK_LISTING_MAGIC: &[u8; 8] = b"snapfsL1";
const INDEX_MAGIC: &[u8; 8] = b"snapfsX1";
/// Largest block a pack may hold, compressed or not: far above any block size.
pub const MAX_PACKED_BLOCK: u32 = 64 << 20;
/// Most packs one index object may list.
const MAX_INDEXED_PACKS: u64 = 1_000_000;

impl Writer {
    fn listing(&mut self, listing: &PackListing) {
        self.uint(listing.data_length);
        self.uint(listing.blocks.len() as u64);
        for block in &listing.blocks {
            self.hash(&block.hash);
            self.uint(block.offset);
            self.uint(u64::from(block.length));
            self.uint(u64::from(block.raw_length));
        }
    }
}

impl Reader<'_> {
    /// A listing whose frames are in order, apart, non-empty and inside the data.
    fn listing(&mut self) -> Result<PackListing> {
        let data_length = self.uint()?;
        let n = self.count(MAX_ENTRIES, "packed blocks")?;
        let mut blocks = Vec::with_capacity(n.min(4096));
        let mut end = 0u64;
        for _ in 0..n {
            let hash = self.hash()?;
            let offset = self.uint()?;
            let length = self.u32("a frame length")?;
            let raw_length = self.u32("a block length")?;
            if length == 0 || length > MAX_PACKED_BLOCK || raw_length > MAX_PACKED_BLOCK {
                return bad(format!("a frame of {length} bytes for {raw_length}"));
            }
            if offset < end {
                return bad("frames out of order or overlapping");
            }
            end = offset + u64::from(length);
            if end > data_length {
                return bad("a frame beyond the pack's data");
            }
            blocks.push(PackedBlock {
                hash,
                offset,
                length,
                raw_length,
            });
        }
        Ok(PackListing {
            data_length,
            blocks,
        })
    }
}

/// The listing a pack carries in its trailer (docs/format.md).
pub fn encode_pack_listing(listing: &PackListing) -> Vec<u8> {
    let mut w = Writer::default();
    w.0.extend_from_slice(PACK_LISTING_MAGIC);
    w.listing(listing);
    w.0
}

pub fn decode_pack_listing(data: &[u8]) -> Result<PackListing> {
    let mut r = Reader { data };
    r.magic(PACK_LISTING_MAGIC, "pack listing")?;
    let listing = r.listing()?;
    r.finish()?;
    Ok(listing)
}

/// An index object: the listings of the packs it covers.
pub fn encode_index(packs: &[(PackId, PackListing)]) -> Vec<u8> {
    let mut w = Writer::default();
    w.0.extend_from_slice(INDEX_MAGIC);
    w.uint(packs.len() as u64);
    for (id, listing) in packs {
        w.0.extend_from_slice(&id.0);
        w.listing(listing);
    }
    w.0
}

pub fn decode_index(data: &[u8]) -> Result<Vec<(PackId, PackListing)>> {
    let mut r = Reader { data };
    r.magic(INDEX_MAGIC, "index")?;
    let n = r.count(MAX_INDEXED_PACKS, "packs")?;
    let mut packs: Vec<(PackId, PackListing)> = Vec::with_capacity(n.min(4096));
    let mut seen = std::collections::HashSet::new();
    for _ in 0..n {
        let mut id = [0u8; 16];
        id.copy_from_slice(r.take(16)?);
        let id = PackId(id);
        if !seen.insert(id) {
            return bad(format!("pack {id} listed twice"));
        }
        packs.push((id, r.listing()?));
    }
    r.finish()?;
    Ok(packs)
}

/// Compresses a manifest or block for the store.
pub fn compress(data: &[u8], level: i32) -> std::io::Result<Vec<u8>> {
    // With the frame's content checksum, decompression refuses a damaged object (snapshot
    // objects have no key hash to catch it; zstd would decode damaged literals silently).
    let mut compressor = zstd::bulk::Compressor::new(level)?;
    compressor.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(true))?;
    compressor.compress(data)
}

/// Decompresses an object from the store, refusing more than `max` bytes of output.
/// The output grows as it is decoded: a hostile frame (one declaring no size, or a false
/// one) never makes it allocate `max` up front.
pub fn decompress(data: &[u8], max: usize) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let declared = zstd::zstd_safe::get_frame_content_size(data)
        .ok()
        .flatten()
        .unwrap_or(0);
    let hint = declared.min(max as u64).min(1 << 20) as usize;
    let mut out = Vec::with_capacity(hint);
    zstd::stream::read::Decoder::with_buffer(data)?
        .take(max as u64 + 1)
        .read_to_end(&mut out)?;
    if out.len() > max {
        return Err(std::io::Error::other(format!(
            "decompresses to more than {max} bytes"
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str, blocks: Vec<(u64, BlockHash)>) -> Entry {
        Entry {
            name: name.as_bytes().to_vec(),
            ino: 20,
            attrs: Attrs {
                kind: Kind::File,
                perm: 0o644,
                uid: 1000,
                gid: 1000,
                nlink: 1,
                size: 1 << 20,
                rdev: 0,
                atime: -5,
                mtime: 1_700_000_000_000_000_000,
                ctime: 0,
                crtime: i64::MAX,
            },
            target: None,
            xattrs: vec![(b"user.a".to_vec(), vec![0, 1, 2])],
            content: Content::Blocks(blocks),
        }
    }

    /// Snapshot `daily` whose root names tree `root_tree`.
    fn daily(root_tree: BlockHash) -> SnapshotManifest {
        let mut root = file("", vec![]);
        root.attrs.kind = Kind::Dir;
        root.content = Content::Tree(root_tree);
        SnapshotManifest {
            volume_id: "00ff".into(),
            id: 3,
            name: b"daily".to_vec(),
            generation: 9,
            created: 1,
            block_size: 256 * 1024,
            logical_bytes: 1 << 40,
            tags: vec![(b"k".to_vec(), b"v".to_vec())],
            root,
            lock: None,
            trash: None,
        }
    }

    #[test]
    fn a_snapshot_object_with_a_flipped_byte_is_refused_not_misread() {
        // Snapshot objects have no hash to be checked against: the frame must catch damage.
        let mut root = file("", vec![]);
        root.attrs.kind = Kind::Dir;
        root.content = Content::Tree(BlockHash::of(b"tree"));
        let snapshot = SnapshotManifest {
            volume_id: "0123456789abcdef0123456789abcdef".into(),
            id: 12,
            name: b"nightly-2026-11-25".to_vec(),
            generation: 40,
            created: 1_700_000_000_000_000_000,
            block_size: 256 * 1024,
            logical_bytes: 123_456_789,
            tags: vec![(b"reason".to_vec(), b"upgrade".to_vec())],
            root,
            lock: None,
            trash: None,
        };
        let object = compress(&encode_snapshot(&snapshot), 3).expect("compress");
        for at in 0..object.len() {
            for bit in 0..8 {
                let mut damaged = object.clone();
                damaged[at] ^= 1 << bit;
                let read = decompress(&damaged, 1 << 20)
                    .ok()
                    .and_then(|data| decode_snapshot(&data).ok());
                assert!(
                    read.is_none() || read.as_ref() == Some(&snapshot),
                    "bit {bit} of byte {at} flipped: read as {read:?}"
                );
            }
        }
    }

    #[test]
    fn trees_and_snapshots_round_trip() {
        let h = |b: u8| BlockHash::of(&[b]);
        let mut link = file("link", vec![]);
        link.attrs.kind = Kind::Symlink;
        link.target = Some(b"../target".to_vec());
        link.content = Content::None;
        let tree = vec![file("a", vec![(0, h(1)), (7, h(2))]), link];
        let encoded = encode_tree(&tree);
        assert_eq!(decode_tree(&encoded).expect("decodes"), tree);

        let snapshot = daily(BlockHash::of(&encoded));
        let encoded = encode_snapshot(&snapshot);
        assert!(
            encoded.starts_with(SNAPSHOT_MAGIC),
            "no extension: still S1"
        );
        assert_eq!(decode_snapshot(&encoded).expect("decodes"), snapshot);

        let locked = SnapshotManifest {
            lock: Some(SnapshotLock {
                mode: LockMode::Compliance,
                until: 1_800_000_000_000_000_000,
                cool_off_until: -1,
            }),
            trash: Some(Trash {
                deleted: 5,
                expires: 6,
            }),
            ..snapshot
        };
        let encoded = encode_snapshot(&locked);
        assert!(encoded.starts_with(SNAPSHOT_MAGIC_V2));
        assert_eq!(decode_snapshot(&encoded).expect("decodes"), locked);
        for len in 0..encoded.len() {
            assert!(
                decode_snapshot(&encoded[..len]).is_err(),
                "truncated at {len}"
            );
        }
    }

    #[test]
    fn unknown_extensions_are_refused_only_when_critical() {
        let snapshot = daily(BlockHash::of(b"tree"));
        let with_extension = |key: u64| {
            let mut encoded = encode_snapshot(&snapshot);
            encoded[..8].copy_from_slice(SNAPSHOT_MAGIC_V2);
            encoded.extend_from_slice(&[1, key as u8, 2, 7, 7]);
            encoded
        };
        assert_eq!(
            decode_snapshot(&with_extension(8)).expect("an optional extension is skipped"),
            snapshot
        );
        let err = decode_snapshot(&with_extension(9)).expect_err("critical");
        assert!(err.to_string().contains("upgrade snapfs"), "{err}");
    }

    #[test]
    fn hostile_input_is_refused() {
        let tree = encode_tree(&[file("a", vec![(0, BlockHash::of(b"x"))])]);
        // Every truncation fails cleanly.
        for len in 0..tree.len() {
            assert!(decode_tree(&tree[..len]).is_err(), "truncated at {len}");
        }
        let mut trailing = tree.clone();
        trailing.push(0);
        assert!(decode_tree(&trailing).is_err());

        for name in ["..", ".", "a/b", "a\0b"] {
            let bad_tree = encode_tree(&[file(name, vec![])]);
            assert!(decode_tree(&bad_tree).is_err(), "name {name:?}");
        }
        let unsorted = encode_tree(&[file("b", vec![]), file("a", vec![])]);
        assert!(decode_tree(&unsorted).is_err());

        // A huge entry count with no data behind it is refused before allocating.
        let mut huge = TREE_MAGIC.to_vec();
        huge.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x0f]);
        assert!(decode_tree(&huge).is_err());

        let mut future = tree.clone();
        future[7] = b'9';
        let err = decode_tree(&future).expect_err("unknown version");
        assert!(err.to_string().contains("upgrade snapfs"), "{err}");
    }
}
