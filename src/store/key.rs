//! The one owner of the store's key layout (docs/format.md): every object key is built,
//! and every listed key taken apart, here. Keys are relative to the volume's prefix.

use std::borrow::Cow;

use crate::blocks::BlockHash;
use crate::manifest::PackId;

/// The key of an object in a volume's store.
///
/// The [`ObjectStore`](super::ObjectStore) methods take `&str` (an `ObjectKey` derefs to
/// one): listings hand back names that are not always logical keys (an encrypting store
/// lists keyed hashes), and the contract tests speak plain strings.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey(Cow<'static, str>);

impl ObjectKey {
    /// The volume header (see [`VolumeHeader`](super::VolumeHeader)).
    pub const HEADER: ObjectKey = ObjectKey(Cow::Borrowed("volume"));
    /// Where blocks, directory trees and snapshot objects live.
    pub const BLOCKS: &'static str = "blocks/";
    pub const TREES: &'static str = "trees/";
    pub const SNAPSHOTS: &'static str = "snapshots/";
    /// Store format 2: blocks travel in packs, found through index objects.
    pub const PACKS: &'static str = "packs/";
    pub const INDEX: &'static str = "index/";

    /// Block `hash`: a zstd frame of the block's bytes.
    pub fn block(hash: &BlockHash) -> ObjectKey {
        ObjectKey(format!("{}{hash}", Self::BLOCKS).into())
    }

    /// Directory tree `hash`: a zstd frame of the tree encoding.
    pub fn tree(hash: &BlockHash) -> ObjectKey {
        ObjectKey(format!("{}{hash}", Self::TREES).into())
    }

    /// Snapshot `id`'s manifest; ten digits, so keys sort in id order.
    pub fn snapshot(id: u64) -> ObjectKey {
        ObjectKey(format!("{}{id:010}", Self::SNAPSHOTS).into())
    }

    /// Pack `id`: frames of blocks, then its listing (see `pack.rs`).
    pub fn pack(id: &PackId) -> ObjectKey {
        ObjectKey(format!("{}{id}", Self::PACKS).into())
    }

    /// Index object `id`: the listings of some packs.
    pub fn index(id: &PackId) -> ObjectKey {
        ObjectKey(format!("{}{id}", Self::INDEX).into())
    }

    /// The pack a listed key names, if it names one.
    pub fn parse_pack(key: &str) -> Option<PackId> {
        PackId::parse(key.strip_prefix(Self::PACKS)?)
    }

    /// Whether the object under `key` is made of parts sealed one by one (a pack, whose
    /// frames are read by range), rather than sealed whole.
    pub fn is_sealed_in_parts(key: &str) -> bool {
        key.starts_with(Self::PACKS)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The prefix and the name of `key` if it names an object by its content hash (a
    /// block or a tree): what an encrypting store hides.
    pub fn split_content_named(key: &str) -> Option<(&'static str, &str)> {
        [Self::BLOCKS, Self::TREES]
            .into_iter()
            .find_map(|prefix| Some((prefix, key.strip_prefix(prefix)?)))
    }

    /// The least key above every key under `prefix` (which ends in `/`, the character
    /// before `0`): the end of a range scan over one prefix.
    pub fn prefix_end(prefix: &str) -> String {
        format!("{}0", prefix.strip_suffix('/').unwrap_or(prefix))
    }
}

impl std::ops::Deref for ObjectKey {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<ObjectKey> for String {
    fn from(key: ObjectKey) -> String {
        key.0.into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_documented_layout() {
        let hash = BlockHash::of(b"x");
        assert_eq!(ObjectKey::block(&hash).as_str(), format!("blocks/{hash}"));
        assert_eq!(ObjectKey::tree(&hash).as_str(), format!("trees/{hash}"));
        assert_eq!(ObjectKey::snapshot(12).as_str(), "snapshots/0000000012");
        assert_eq!(ObjectKey::HEADER.as_str(), "volume");
        assert_eq!(
            ObjectKey::split_content_named(&ObjectKey::block(&hash)),
            Some(("blocks/", hash.to_string().as_str()))
        );
        assert_eq!(ObjectKey::split_content_named("snapshots/0000000012"), None);
        let end = ObjectKey::prefix_end(ObjectKey::SNAPSHOTS);
        assert_eq!(end, "snapshots0");
        assert!(ObjectKey::snapshot(u64::MAX).as_str() < end.as_str());
    }
}
