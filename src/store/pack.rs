//! Packs and index objects (store format 2, docs/format.md): blocks travel to the store
//! many to an object, so a TiB is some tens of thousands of requests, not millions.
//!
//! A pack is its blocks' zstd frames, one after the other, each sealed on its own by an
//! encrypting store (`ObjectStore::seal_part`), so one block is read back with one range
//! request; then its listing (where each frame is), sealed too, its length (4 bytes,
//! little-endian) and [`PACK_MAGIC`]. Index objects carry the listings of many packs, so a
//! reader with nothing but the bucket finds any block after listing `index/` once; a lost
//! index is rebuilt from the packs' own listings.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lru::LruCache;

use super::{ObjectKey, ObjectStore, StoreError, StoreResult};
use crate::blocks::BlockHash;
use crate::manifest::{self, PackId, PackListing, PackedBlock};
use crate::sync::{Mutex, lock};

/// The last 8 bytes of every pack.
pub const PACK_MAGIC: &[u8; 8] = b"snapfsP1";
/// The footer: the listing's length, then the magic.
const FOOTER: usize = 4 + PACK_MAGIC.len();
/// Index objects read at once.
const INDEX_READS: usize = 16;
/// Largest decompressed listing or index object accepted.
const MAX_LISTING: usize = 256 << 20;
/// Largest decompressed tree accepted (a directory of some millions of entries).
pub const MAX_TREE: u64 = 256 << 20;
/// Packs one index object lists at most (some 45 bytes per block listed).
pub const PACKS_PER_INDEX: usize = 4096;

/// A new random name for a pack or an index object: names never repeat, so a PUT never
/// races a deletion of the same key.
pub fn random_id() -> PackId {
    let mut id = [0u8; 16];
    chacha20poly1305::aead::rand_core::RngCore::fill_bytes(
        &mut chacha20poly1305::aead::OsRng,
        &mut id,
    );
    PackId(id)
}

/// A pack being filled.
pub struct PackBuilder {
    id: PackId,
    key: ObjectKey,
    body: Vec<u8>,
    blocks: Vec<PackedBlock>,
}

/// A pack ready to be sent.
pub struct FinishedPack {
    pub id: PackId,
    pub key: ObjectKey,
    pub body: Vec<u8>,
    pub listing: PackListing,
}

impl Default for PackBuilder {
    fn default() -> Self {
        PackBuilder::new()
    }
}

impl PackBuilder {
    pub fn new() -> PackBuilder {
        PackBuilder::with_capacity(0)
    }

    /// A pack expected to grow to about `bytes`: its buffer is not copied as it fills.
    pub fn with_capacity(bytes: usize) -> PackBuilder {
        let id = random_id();
        PackBuilder {
            id,
            key: ObjectKey::pack(&id),
            body: Vec::with_capacity(bytes),
            blocks: Vec::new(),
        }
    }

    /// Adds block `hash` (`raw_length` bytes) as `frame`, its zstd frame, sealed by
    /// `store` as it requires.
    pub fn add(
        &mut self,
        store: &dyn ObjectStore,
        hash: BlockHash,
        raw_length: u32,
        frame: Vec<u8>,
    ) -> StoreResult<()> {
        let part = store.seal_part(&self.key, frame)?;
        let length = u32::try_from(part.len())
            .ok()
            .filter(|&length| length <= manifest::MAX_PACKED_BLOCK)
            .ok_or_else(|| StoreError::permanent(format!("block {hash} is too large")))?;
        self.blocks.push(PackedBlock {
            hash,
            offset: self.body.len() as u64,
            length,
            raw_length,
        });
        self.body.extend_from_slice(&part);
        Ok(())
    }

    /// Bytes of frames so far.
    pub fn len(&self) -> usize {
        self.body.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// The pack with its listing appended.
    pub fn finish(mut self, store: &dyn ObjectStore, level: i32) -> StoreResult<FinishedPack> {
        let listing = PackListing {
            data_length: self.body.len() as u64,
            blocks: self.blocks,
        };
        let encoded = manifest::compress(&manifest::encode_pack_listing(&listing), level)
            .map_err(|e| StoreError::permanent(format!("zstd: {e}")))?;
        let trailer = store.seal_part(&self.key, encoded)?;
        let trailer_length = u32::try_from(trailer.len())
            .map_err(|_| StoreError::permanent("a pack listing beyond 4 GiB"))?;
        self.body.extend_from_slice(&trailer);
        self.body.extend_from_slice(&trailer_length.to_le_bytes());
        self.body.extend_from_slice(PACK_MAGIC);
        Ok(FinishedPack {
            id: self.id,
            key: self.key,
            body: self.body,
            listing,
        })
    }
}

/// The listing in the trailer of `pack`, a whole pack object read from `store` under
/// `key`: authenticated, decoded, and every frame inside the pack's data. The error says
/// what is wrong.
pub fn read_listing(
    store: &dyn ObjectStore,
    key: &str,
    pack: &[u8],
) -> Result<PackListing, String> {
    let (data_length, trailer) = split_trailer(pack)?;
    decode_trailer(store, key, data_length as u64, trailer)
}

/// The listing of pack `key` read from its end alone (one range request from
/// `data_length`, where an index says its frames end), verified as [`read_listing`]
/// does: a wrong `data_length` finds no trailer there. `None` if the pack is not in
/// `store`; `Some(Err(problem))` if it is not as the index says.
pub async fn fetch_listing_at(
    store: &dyn ObjectStore,
    key: &str,
    data_length: u64,
) -> StoreResult<Option<Result<PackListing, String>>> {
    let most = (MAX_LISTING + FOOTER) as u64;
    let get = || store.get_range(key, data_length, most);
    super::fetch_checked(store, key, get, |tail| match split_trailer(&tail)? {
        (0, trailer) => decode_trailer(store, key, data_length, trailer),
        _ => Err(format!("its frames do not end at {data_length}")),
    })
    .await
}

/// Where the trailer of `bytes` (a pack, or its end) starts, and the trailer.
fn split_trailer(bytes: &[u8]) -> Result<(usize, &[u8]), String> {
    let Some(footer_at) = bytes.len().checked_sub(FOOTER) else {
        return Err("shorter than a pack's footer".into());
    };
    let (rest, footer) = bytes.split_at(footer_at);
    if &footer[4..] != PACK_MAGIC {
        return Err("not a snapfs pack (no magic at its end)".into());
    }
    let mut length = [0u8; 4];
    length.copy_from_slice(&footer[..4]);
    let length = u32::from_le_bytes(length) as usize;
    let Some(start) = rest.len().checked_sub(length) else {
        return Err("its listing is longer than the pack".into());
    };
    Ok((start, &rest[start..]))
}

/// The listing in `trailer`, the sealed listing part of pack `key`, whose frames take
/// `data_length` bytes.
fn decode_trailer(
    store: &dyn ObjectStore,
    key: &str,
    data_length: u64,
    trailer: &[u8],
) -> Result<PackListing, String> {
    let trailer = store.open_part(key, trailer).map_err(|e| e.message)?;
    // Each entry names a frame of at least a byte and encodes to at most 52 bytes.
    let frames = usize::try_from(data_length).unwrap_or(usize::MAX);
    let bound = 16usize
        .saturating_add(52usize.saturating_mul(frames.saturating_add(1)))
        .min(MAX_LISTING);
    let encoded = manifest::decompress(&trailer, bound)
        .map_err(|e| format!("its listing is not a zstd frame: {e}"))?;
    let listing = manifest::decode_pack_listing(&encoded).map_err(|e| e.to_string())?;
    if listing.data_length != data_length {
        return Err("its listing does not match its length".into());
    }
    Ok(listing)
}

/// A new index object listing `packs` (at most [`PACKS_PER_INDEX`]): its random name and
/// its body, compressed at `level` (the store seals it on `put` as it requires).
pub fn index_object(packs: &[(PackId, PackListing)], level: i32) -> StoreResult<(PackId, Vec<u8>)> {
    let body = manifest::compress(&manifest::encode_index(packs), level)
        .map_err(|e| StoreError::permanent(format!("zstd: {e}")))?;
    Ok((random_id(), body))
}

/// Decompresses `frame` into `out` (`size` bytes) with this thread's zstd context:
/// making a context costs as much as decompressing a small block, and a read path decodes
/// thousands of frames. The context skips the frame's XXH64 checksum: every caller checks
/// the bytes against the block's BLAKE3 hash, and the checksum cost a restore 4% of its
/// CPU.
fn decompress_block(frame: &[u8], size: usize, out: &mut Vec<u8>) -> std::io::Result<()> {
    thread_local! {
        static CONTEXT: RefCell<Option<zstd::bulk::Decompressor<'static>>> =
            const { RefCell::new(None) };
    }
    out.clear();
    out.reserve(size);
    CONTEXT.with_borrow_mut(|context| {
        let context = match context {
            Some(context) => context,
            None => {
                let mut fresh = zstd::bulk::Decompressor::new()?;
                fresh.set_parameter(zstd::zstd_safe::DParameter::ForceIgnoreChecksum(true))?;
                context.insert(fresh)
            }
        };
        context.decompress_to_buffer(frame, out).map(|_| ())
    })
}

/// Decodes block `hash` from `part`, its frame as read from pack `key`: opened,
/// decompressed (at most `max` bytes) and checked against the hash.
pub fn open_frame(
    store: &dyn ObjectStore,
    key: &str,
    hash: &BlockHash,
    part: &[u8],
    max: usize,
) -> Result<Vec<u8>, String> {
    let mut data = Vec::new();
    open_frame_into(store, key, hash, part, max, &mut data)?;
    Ok(data)
}

/// [`open_frame`] into `data`, whose allocation a caller decoding many frames reuses:
/// a fresh block-sized buffer per frame cost a restore a sixth of its CPU in page faults.
pub fn open_frame_into(
    store: &dyn ObjectStore,
    key: &str,
    hash: &BlockHash,
    part: &[u8],
    max: usize,
    data: &mut Vec<u8>,
) -> Result<(), String> {
    let frame = store.open_part(key, part).map_err(|e| e.message)?;
    // The size the frame declares, if within `max`: a buffer of `max` bytes for each
    // tree would be far too much (a frame that holds more than it declares fails).
    let declared = zstd::zstd_safe::get_frame_content_size(&frame)
        .ok()
        .flatten()
        .filter(|&size| size <= max as u64);
    match declared {
        Some(size) => decompress_block(&frame, size as usize, data),
        None => manifest::decompress(&frame, max).map(|decoded| *data = decoded),
    }
    .map_err(|e| format!("not a zstd frame of at most {max} bytes: {e}"))?;
    let actual = BlockHash::of(data);
    if actual == *hash {
        Ok(())
    } else {
        Err(format!("its content hashes to {actual}"))
    }
}

/// Where a block is in a store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockPlace {
    /// Format 1: an object of its own, `blocks/<hash>`.
    Object,
    /// Format 2: a frame in a pack.
    Packed {
        pack: PackId,
        offset: u64,
        length: u32,
    },
}

/// A store's index objects, merged: where each block is. A block listed in several packs
/// (sent again after an interruption) has each place, newest index last.
#[derive(Default)]
pub struct PackIndex {
    places: HashMap<BlockHash, Vec<BlockPlace>>,
    /// Each pack listed: the index objects listing it, each with the length it gives
    /// the pack's frames.
    pub packs: HashMap<PackId, Vec<(String, u64)>>,
    /// Each pack's frames in offset order: what follows a block in its pack.
    frames: HashMap<PackId, Vec<PackedBlock>>,
    /// Index objects that could not be read: key, and what is wrong.
    pub damaged: Vec<(String, String)>,
    /// Index objects read.
    pub objects: usize,
}

impl PackIndex {
    /// Reads every index object of `store`. One that cannot be read is named in
    /// `damaged`, not an error: the blocks it lists are then reported missing where they
    /// are needed (and `verify --repair` rebuilds it from the packs).
    pub async fn load(store: &dyn ObjectStore) -> StoreResult<PackIndex> {
        let mut index = PackIndex::default();
        let keys = super::retry(super::READ_PATIENCE, || store.list(ObjectKey::INDEX)).await?;
        // One index object per snapshot upload: many requests, read some at a time.
        let fetch = |key: String| async move {
            let checked = super::fetch_verified(store, &key, |object| {
                let data = manifest::decompress(&object, MAX_LISTING)
                    .map_err(|e| format!("corrupt or truncated: {e}"))?;
                manifest::decode_index(&data).map_err(|e| e.to_string())
            })
            .await;
            (key, checked)
        };
        let mut pending =
            futures_util::stream::iter(keys.into_iter().map(fetch)).buffer_unordered(INDEX_READS);
        while let Some((key, checked)) = pending.next().await {
            match checked? {
                // Deleted since it was listed: the packs it named went first, or an index
                // object written since lists them (a miss reads the index again).
                None => {}
                Some(Err(problem)) => index.damaged.push((key, problem)),
                Some(Ok(packs)) => {
                    index.objects += 1;
                    for (pack, listing) in packs {
                        index.add(&key, pack, &listing);
                    }
                }
            }
        }
        Ok(index)
    }

    /// Adds the blocks of `pack`, as index object `key` lists them.
    fn add(&mut self, key: &str, pack: PackId, listing: &PackListing) {
        self.packs
            .entry(pack)
            .or_default()
            .push((key.to_owned(), listing.data_length));
        let frames = self.frames.entry(pack).or_default();
        frames.extend_from_slice(&listing.blocks);
        frames.sort_unstable_by_key(|block| block.offset);
        frames.dedup_by_key(|block| block.offset);
        for block in &listing.blocks {
            self.places
                .entry(block.hash)
                .or_default()
                .push(BlockPlace::Packed {
                    pack,
                    offset: block.offset,
                    length: block.length,
                });
        }
    }

    /// The frames of `pack` that start after `offset` and end within `span` bytes of it.
    pub fn following(&self, pack: &PackId, offset: u64, span: u64) -> &[PackedBlock] {
        let Some(frames) = self.frames.get(pack) else {
            return &[];
        };
        let first = frames.partition_point(|block| block.offset <= offset);
        let end = offset.saturating_add(span);
        let last = frames
            .partition_point(|block| block.offset.saturating_add(u64::from(block.length)) <= end);
        frames.get(first..last.max(first)).unwrap_or(&[])
    }

    /// The frames of `pack` that lie within the `span` bytes centred on `offset` (from the
    /// pack's start, if `offset` is nearer to it than half the span).
    pub fn around(&self, pack: &PackId, offset: u64, span: u64) -> &[PackedBlock] {
        let Some(frames) = self.frames.get(pack) else {
            return &[];
        };
        let start = offset.saturating_sub(span / 2);
        let end = start.saturating_add(span);
        let first = frames.partition_point(|block| block.offset < start);
        let last = frames
            .partition_point(|block| block.offset.saturating_add(u64::from(block.length)) <= end);
        frames.get(first..last.max(first)).unwrap_or(&[])
    }

    /// The places of block `hash` in packs (none: look for a format-1 object).
    pub fn places(&self, hash: &BlockHash) -> &[BlockPlace] {
        self.places.get(hash).map_or(&[], Vec::as_slice)
    }

    pub fn contains(&self, hash: &BlockHash) -> bool {
        self.places.contains_key(hash)
    }

    /// Every block the index lists, with its places.
    pub fn blocks(&self) -> impl Iterator<Item = (&BlockHash, &[BlockPlace])> {
        self.places
            .iter()
            .map(|(hash, places)| (hash, places.as_slice()))
    }
}

/// A store and its index, read at the first block wanted from it, and again when a
/// block is found nowhere (the store's writer may have added packs since: a follower, an
/// origin still in use).
pub struct IndexedStore {
    pub store: Arc<dyn ObjectStore>,
    index: tokio::sync::Mutex<Option<(Arc<PackIndex>, Instant)>>,
    /// The store is known to have changed since the index was read (see `store_changed`).
    stale: AtomicBool,
    /// Trees read with a tree asked for (its neighbours in a pack), until asked for.
    trees: Mutex<TreeCache>,
}

/// Bytes of a pack read around a tree asked for: trees written together (one manifest,
/// children before parents) are asked for together by a restore, an import or a verify,
/// which would otherwise wait on one request per directory.
const TREE_READ_AROUND: u64 = 4 << 20;
/// Decoded bytes of trees kept waiting at most (the least recently read go first).
const TREE_CACHE_BYTES: usize = 64 << 20;

/// Trees read ahead, each handed out once.
struct TreeCache {
    trees: LruCache<BlockHash, Vec<u8>>,
    bytes: usize,
}

impl TreeCache {
    fn take(&mut self, hash: &BlockHash) -> Option<Vec<u8>> {
        let tree = self.trees.pop(hash)?;
        self.bytes -= tree.len();
        Some(tree)
    }

    fn put(&mut self, hash: BlockHash, tree: Vec<u8>) {
        self.bytes += tree.len();
        if let Some(old) = self.trees.put(hash, tree) {
            self.bytes -= old.len();
        }
        while self.bytes > TREE_CACHE_BYTES {
            let Some((_, old)) = self.trees.pop_lru() else {
                break;
            };
            self.bytes -= old.len();
        }
    }
}

/// An index is read again for a missing block at most this often.
const INDEX_REREAD: Duration = Duration::from_secs(1);

impl IndexedStore {
    pub fn new(store: Arc<dyn ObjectStore>) -> IndexedStore {
        IndexedStore::with_loaded(store, None)
    }

    /// `store`, whose index `index` was read already.
    pub fn with_index(store: Arc<dyn ObjectStore>, index: Arc<PackIndex>) -> IndexedStore {
        IndexedStore::with_loaded(store, Some((index, Instant::now())))
    }

    fn with_loaded(
        store: Arc<dyn ObjectStore>,
        index: Option<(Arc<PackIndex>, Instant)>,
    ) -> IndexedStore {
        IndexedStore {
            store,
            index: tokio::sync::Mutex::new(index),
            stale: AtomicBool::new(false),
            trees: Mutex::new(TreeCache {
                trees: LruCache::unbounded(),
                bytes: 0,
            }),
        }
    }

    /// Makes the next reader read the index again: the store has new packs (a follower
    /// saw new snapshots there). A block missing from the index would otherwise wait for
    /// the index's next turn (`reread`), up to `INDEX_REREAD`.
    pub fn store_changed(&self) {
        self.stale.store(true, Ordering::Release);
    }

    /// The store's index (listed and read once, and again after `store_changed`).
    pub async fn index(&self) -> StoreResult<Arc<PackIndex>> {
        let mut loaded = self.index.lock().await;
        if self.stale.swap(false, Ordering::AcqRel) {
            *loaded = None;
        }
        if let Some((index, _)) = &*loaded {
            return Ok(index.clone());
        }
        let index = Arc::new(PackIndex::load(&*self.store).await?);
        *loaded = Some((index.clone(), Instant::now()));
        Ok(index)
    }

    /// The store's index read again after `seen` missed a block, unless another reader
    /// has read it again since. An index is many objects, so it is read at most once per
    /// `INDEX_REREAD`. A reader that missed a block outright (`wait_turn`) waits for that
    /// turn rather than failing: the block may be in a pack `seen` does not list yet (its
    /// writer repacked it and deleted the pack `seen` places it in, or a follower reads a
    /// snapshot newer than `seen`), and the index written before that deletion lists it.
    /// A reader that found a damaged copy does not wait: its error is known.
    async fn reread(&self, seen: &Arc<PackIndex>, wait_turn: bool) -> StoreResult<Arc<PackIndex>> {
        if wait_turn {
            let turn_in = match &*self.index.lock().await {
                Some((index, at)) if Arc::ptr_eq(index, seen) => {
                    INDEX_REREAD.saturating_sub(at.elapsed())
                }
                _ => Duration::ZERO,
            };
            // A zero sleep would still wait for the timer's next tick.
            if !turn_in.is_zero() {
                tokio::time::sleep(turn_in).await;
            }
        }
        let mut loaded = self.index.lock().await;
        if !self.stale.swap(false, Ordering::AcqRel)
            && let Some((index, at)) = &*loaded
            && (!Arc::ptr_eq(index, seen) || at.elapsed() < INDEX_REREAD)
        {
            return Ok(index.clone());
        }
        let index = Arc::new(PackIndex::load(&*self.store).await?);
        *loaded = Some((index.clone(), Instant::now()));
        Ok(index)
    }

    /// Block `hash` (at most `max` bytes), verified: from a pack the index places it in,
    /// else from its own object (a format-1 store), else from a pack added since the
    /// index was read. `None` if the store has it nowhere.
    pub async fn block(&self, hash: &BlockHash, max: usize) -> StoreResult<Option<Vec<u8>>> {
        let object = super::fetch_block(&*self.store, hash, BlockPlace::Object, max);
        self.frame(hash, max, object, true).await
    }

    /// Block `hash` as `block` finds it, but a miss does not wait for the index's next
    /// turn: for a caller that looks for many blocks that may all be gone, and looks
    /// again for its misses together after `store_changed` (one wait, not one per miss).
    pub async fn block_without_waiting(
        &self,
        hash: &BlockHash,
        max: usize,
    ) -> StoreResult<Option<Vec<u8>>> {
        let object = super::fetch_block(&*self.store, hash, BlockPlace::Object, max);
        self.frame(hash, max, object, false).await
    }

    /// Tree `hash`, encoded and verified, found as blocks are (`block`); its own object
    /// is `trees/<hash>` (format 1, or a tree too large for a pack).
    pub async fn tree(&self, hash: &BlockHash) -> StoreResult<Option<Vec<u8>>> {
        if let Some(tree) = lock(&self.trees).take(hash) {
            return Ok(Some(tree));
        }
        if let Some(tree) = self.trees_around(hash).await? {
            return Ok(Some(tree));
        }
        let max = MAX_TREE as usize;
        let object = super::fetch_tree_object(&*self.store, hash, max);
        self.frame(hash, max, object, true).await
    }

    /// Tree `hash` read from its first pack with the trees around it, which wait in the
    /// cache; `None` if the index has no pack for it or the read fails (the caller then
    /// reads it alone, with retries and the other places it has), but for a store that
    /// stays unreachable.
    async fn trees_around(&self, hash: &BlockHash) -> StoreResult<Option<Vec<u8>>> {
        let index = self.index().await?;
        let Some(&BlockPlace::Packed { pack, offset, .. }) = index.places(hash).first() else {
            return Ok(None);
        };
        let frames = index.around(&pack, offset, TREE_READ_AROUND);
        let (Some(first), Some(last)) = (frames.first(), frames.last()) else {
            return Ok(None);
        };
        let (start, end) = (first.offset, last.offset + u64::from(last.length));
        let key = ObjectKey::pack(&pack);
        let Some(span) =
            super::get_span(&*self.store, &key, start, end - start, Vec::new()).await?
        else {
            return Ok(None);
        };
        let mut found = None;
        let mut cache = lock(&self.trees);
        for frame in frames {
            let at = (frame.offset - start) as usize;
            let Some(part) = span.get(at..at + frame.length as usize) else {
                continue;
            };
            let max = frame.raw_length as usize;
            // A frame that fails is left to the single read; blocks (a repacked pack mixes
            // them in) are not kept.
            match open_frame(&*self.store, &key, &frame.hash, part, max) {
                Ok(data) if frame.hash == *hash => found = Some(data),
                Ok(data) if manifest::looks_like_tree(&data) => cache.put(frame.hash, data),
                _ => {}
            }
        }
        Ok(found)
    }

    /// Frame `hash` (at most `max` bytes) from a pack the index places it in, else from
    /// `own_object`, else from a pack added since the index was read (waiting for the
    /// index's turn if `wait_turn`, see `reread`).
    async fn frame(
        &self,
        hash: &BlockHash,
        max: usize,
        own_object: impl Future<Output = StoreResult<Option<Vec<u8>>>>,
        wait_turn: bool,
    ) -> StoreResult<Option<Vec<u8>>> {
        let index = self.index().await?;
        let mut damaged = None;
        if let Some(data) = self.in_packs(&index, hash, max, &mut damaged).await? {
            return Ok(Some(data));
        }
        if let Some(data) = own_object.await? {
            return Ok(Some(data));
        }
        let again = self.reread(&index, wait_turn && damaged.is_none()).await?;
        if !Arc::ptr_eq(&again, &index)
            && let Some(data) = self.in_packs(&again, hash, max, &mut damaged).await?
        {
            return Ok(Some(data));
        }
        damaged.map_or(Ok(None), Err)
    }

    /// Block `hash` from the packs `index` places it in; a copy that fails verification
    /// is kept in `damaged` (another may be whole).
    async fn in_packs(
        &self,
        index: &PackIndex,
        hash: &BlockHash,
        max: usize,
        damaged: &mut Option<StoreError>,
    ) -> StoreResult<Option<Vec<u8>>> {
        for place in index.places(hash) {
            match super::fetch_block(&*self.store, hash, *place, max).await {
                Ok(Some(data)) => return Ok(Some(data)),
                Ok(None) => {}
                Err(e) if !e.is_transient() => *damaged = Some(e),
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An index of one pack whose frames are `lengths` long, one after the other.
    fn index_of(pack: PackId, lengths: &[u32]) -> PackIndex {
        let mut offset = 0;
        let blocks = lengths
            .iter()
            .enumerate()
            .map(|(i, &length)| {
                let block = PackedBlock {
                    hash: BlockHash::of(&i.to_le_bytes()),
                    offset,
                    length,
                    raw_length: length,
                };
                offset += u64::from(length);
                block
            })
            .collect();
        let mut index = PackIndex::default();
        let listing = PackListing {
            data_length: offset,
            blocks,
        };
        index.add("index/x", pack, &listing);
        index
    }

    fn offsets(frames: &[PackedBlock]) -> Vec<u64> {
        frames.iter().map(|frame| frame.offset).collect()
    }

    #[test]
    fn frames_around_and_after_an_offset_stay_within_the_span() {
        let pack = PackId([7; 16]);
        // Frames at 0, 100, 200, ... 900.
        let index = index_of(pack, &[100; 10]);
        // Centred on 500: from 300 to 700, whole frames only.
        assert_eq!(offsets(index.around(&pack, 500, 400)), [300, 400, 500, 600]);
        // At the start nothing lies before: the span reaches further after.
        assert_eq!(offsets(index.around(&pack, 0, 400)), [0, 100, 200, 300]);
        assert_eq!(offsets(index.around(&pack, 900, 10_000)).len(), 10);
        // After 500, within 300 bytes of it.
        assert_eq!(offsets(index.following(&pack, 500, 300)), [600, 700]);
        assert!(index.around(&PackId([8; 16]), 0, 400).is_empty());
    }

    #[test]
    fn the_tree_cache_hands_each_tree_out_once_within_its_bound() {
        let mut cache = TreeCache {
            trees: LruCache::unbounded(),
            bytes: 0,
        };
        let (a, b) = (BlockHash::of(b"a"), BlockHash::of(b"b"));
        cache.put(a, vec![1; 10]);
        assert_eq!(cache.take(&a), Some(vec![1; 10]));
        assert_eq!(cache.take(&a), None, "handed out once");
        assert_eq!(cache.bytes, 0);
        cache.put(a, vec![1; TREE_CACHE_BYTES / 2]);
        cache.put(b, vec![2; TREE_CACHE_BYTES / 2 + 1]);
        assert_eq!(cache.take(&a), None, "the least recent went first");
        assert_eq!(cache.bytes, TREE_CACHE_BYTES / 2 + 1);
    }
}
