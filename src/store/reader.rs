//! Reading a volume from its store alone: the header check, the list of completed
//! snapshots, directory trees, and a snapshot as a [`Source`] to restore or import.
//! Everything read is checked: the header's format and key, each object's hash, each
//! manifest's structure. Requests run on a runtime the caller owns (the daemon's, or one
//! from [`super::runtime`] for a command) and are awaited from plain threads.

use std::collections::HashMap;
use std::sync::Arc;

use futures_util::StreamExt;
use tokio::runtime::Handle;

use super::{BlockPlace, IndexedStore, ObjectKey, ObjectStore, StoreError, StoreUrl, VolumeHeader};
use crate::blocks::BlockHash;
use crate::catalog;
use crate::display::escaped;
use crate::manifest::{self, Content, Entry, PackId, SnapshotManifest};

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("no snapshot named {0}")]
    NoSnapshot(String),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// A local volume's catalog (`restore::LocalSource`).
    #[error(transparent)]
    Catalog(#[from] catalog::Error),
    #[error("{0}")]
    Corrupt(String),
}

type Result<T, E = ReadError> = std::result::Result<T, E>;

/// What receives each block of a group: its place in the group, and its verified bytes
/// (valid during the call) or why it could not be read.
pub type EachBlock<'a> = dyn FnMut(usize, Result<&[u8], &ReadError>) + 'a;

/// Where a snapshot's tree and blocks come from: the store ([`StoreSource`]) or a local
/// volume (`restore::LocalSource`, which falls back to a [`StoreChain`] for blocks not
/// on its disk). Restore writes one to a directory; `Volume::sync_to` imports one.
/// It lives with the reader because its one remote implementation, its chain of stores
/// and its error are the reader's.
pub trait Source: Sync {
    /// The snapshot's root directory.
    fn root(&self) -> Result<Entry>;
    /// The entries of directory `dir`, sorted by name.
    fn children(&self, dir: &Entry) -> Result<Vec<Entry>>;
    /// Block `hash`, verified against it.
    fn block(&self, hash: &BlockHash) -> Result<Vec<u8>>;
    /// `hashes` in groups worth fetching with one request each (neighbours in one pack),
    /// in the order to fetch them. By default, one block a group.
    fn plan(&self, hashes: Vec<BlockHash>) -> Vec<Vec<BlockHash>> {
        hashes.into_iter().map(|hash| vec![hash]).collect()
    }
    /// Hands each block of one group of [`plan`](Self::plan) to `each` with its place in
    /// the group, verified, in the group's order. A block's bytes live only during its
    /// call, so a group of many blocks never sits decompressed in memory at once.
    fn blocks(&self, group: &[BlockHash], each: &mut EachBlock) {
        for (at, hash) in group.iter().enumerate() {
            each(at, self.block(hash).as_deref());
        }
    }
    fn block_size(&self) -> u64;
    /// Block reads worth running at once.
    fn parallelism(&self) -> usize;
}

/// Frames of one pack at most this far apart are read with one range request (the bytes
/// between are read for nothing)...
const PLAN_GAP: u64 = 256 << 10;
/// ...and at most this many bytes a request, so that the requests in flight bound the
/// memory held: a whole pack of the default size (16 MiB) with the frame that took it
/// past its target (a block of up to 1 MiB, compressed or not, and its seal). Fewer,
/// larger requests cost the server less: each range read pays its own request and reads
/// whole chunks at its edges. At 16 MiB flat, almost every full pack took a second
/// request for its last frame.
const PLAN_SPAN: u64 = (16 << 20) + (2 << 20);

thread_local! {
    /// The buffer of this thread's last span, for its next (see
    /// `ObjectStore::get_range_into`): a restore's workers each read one span after another.
    static SPARE_SPAN: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Largest decompressed tree or snapshot object accepted.
const MAX_MANIFEST_OBJECT: usize = 256 << 20;

/// Stores to read a volume from: its own, then (for blocks) its origin's, the volume it
/// was made from. Cloning shares the open stores.
#[derive(Clone)]
pub struct StoreChain {
    runtime: Handle,
    own: Arc<IndexedStore>,
    origin: Option<Arc<IndexedStore>>,
}

impl StoreChain {
    /// A chain of the store `own`, opened already.
    pub fn new(runtime: &Handle, own: Arc<dyn ObjectStore>) -> StoreChain {
        StoreChain {
            runtime: runtime.clone(),
            own: Arc::new(IndexedStore::new(own)),
            origin: None,
        }
    }

    /// Opens the stores at `own` and `origin`.
    pub fn open(runtime: &Handle, own: &StoreUrl, origin: Option<&StoreUrl>) -> Result<StoreChain> {
        let mut chain = StoreChain::new(runtime, runtime.block_on(super::open(own))?);
        chain.set_origin(origin)?;
        Ok(chain)
    }

    /// Opens the origin's store at `url` (from the listing's header), unless the chain
    /// has one already: a volume's origin never changes.
    pub fn set_origin(&mut self, url: Option<&StoreUrl>) -> Result<()> {
        if let (None, Some(url)) = (&self.origin, url) {
            let origin = self.runtime.block_on(super::open(url))?;
            self.origin = Some(Arc::new(IndexedStore::new(origin)));
        }
        Ok(())
    }

    /// The volume's store has new packs (see `IndexedStore::store_changed`).
    pub fn store_changed(&self) {
        self.own.store_changed();
    }

    /// The volume's store, for messages.
    pub fn url(&self) -> &str {
        self.own.store.url()
    }

    /// The completed snapshots in the volume's store (see [`list_manifests`]).
    pub fn list(&self) -> Result<Listing> {
        self.runtime.block_on(list_manifests(&*self.own.store))
    }

    /// Tree `hash` from the volume's store.
    fn tree(&self, hash: &BlockHash) -> Result<Vec<Entry>> {
        self.runtime.block_on(read_tree(&self.own, hash))
    }

    /// Block `hash` (at most `max` bytes) from `place` in the volume's store, where its
    /// catalog recorded it (a pack no index lists yet included), else as [`block`](Self::block) finds it.
    pub fn block_at(&self, hash: &BlockHash, place: BlockPlace, max: usize) -> Result<Vec<u8>> {
        match self
            .runtime
            .block_on(super::fetch_block(&*self.own.store, hash, place, max))
        {
            Ok(Some(data)) => Ok(data),
            _ => self.block(hash, max),
        }
    }

    /// Groups `hashes` by pack in the volume's store, in pack order: runs of frames
    /// close enough to read with one range request (see `PLAN_GAP`, `PLAN_SPAN`). Blocks
    /// found in no pack of its index come alone.
    pub fn plan(&self, hashes: Vec<BlockHash>) -> Vec<Vec<BlockHash>> {
        let Ok(index) = self.runtime.block_on(self.own.index()) else {
            // Reported by the reads themselves.
            return hashes.into_iter().map(|hash| vec![hash]).collect();
        };
        let mut by_pack: HashMap<PackId, Vec<(u64, u64, BlockHash)>> = HashMap::new();
        let mut groups = Vec::new();
        for hash in hashes {
            match index.places(&hash).first() {
                Some(&BlockPlace::Packed {
                    pack,
                    offset,
                    length,
                }) => by_pack.entry(pack).or_default().push((
                    offset,
                    offset + u64::from(length),
                    hash,
                )),
                _ => groups.push(vec![hash]),
            }
        }
        let mut packs: Vec<_> = by_pack.into_iter().collect();
        packs.sort_by_key(|(pack, _)| *pack);
        for (_, frames) in packs {
            groups.extend(runs_of(frames));
        }
        groups
    }

    /// The blocks of one group of [`plan`](Self::plan) (at most `max` bytes each), to
    /// `each` as [`Source::blocks`] says: a run in one pack with one range request, each
    /// frame verified, all decoded into one buffer. A block that fails
    /// is fetched alone, so it gets the retries and the error it would have had; a store
    /// that stays unreachable fails them all.
    pub fn blocks(&self, group: &[BlockHash], max: usize, each: &mut EachBlock) {
        let alone = |hashes: &[BlockHash], each: &mut EachBlock| {
            for (at, hash) in hashes.iter().enumerate() {
                each(at, self.block(hash, max).as_deref());
            }
        };
        let Ok(index) = self.runtime.block_on(self.own.index()) else {
            return alone(group, each);
        };
        let places: Vec<(PackId, u64, u32)> = group
            .iter()
            .filter_map(|hash| match index.places(hash).first() {
                Some(&BlockPlace::Packed {
                    pack,
                    offset,
                    length,
                }) => Some((pack, offset, length)),
                _ => None,
            })
            .collect();
        let (Some(first), true) = (
            places.first(),
            group.len() > 1 && places.len() == group.len(),
        ) else {
            return alone(group, each);
        };
        let pack = first.0;
        let start = places.iter().map(|p| p.1).min().unwrap_or(0);
        let end = places
            .iter()
            .map(|p| p.1 + u64::from(p.2))
            .max()
            .unwrap_or(0);
        if places.iter().any(|p| p.0 != pack) {
            return alone(group, each);
        }
        let key = ObjectKey::pack(&pack);
        let store = &*self.own.store;
        let spare = SPARE_SPAN.take();
        let span = self
            .runtime
            .block_on(super::get_span(store, &key, start, end - start, spare));
        let span = match span {
            Ok(Some(span)) => span,
            Ok(None) => return alone(group, each),
            Err(e) => {
                let e = ReadError::from(e);
                return (0..group.len()).for_each(|at| each(at, Err(&e)));
            }
        };
        // One buffer for every frame of the span.
        let mut data = Vec::new();
        for (at, (hash, &(_, offset, length))) in group.iter().zip(&places).enumerate() {
            let from = (offset - start) as usize;
            let decoded = span
                .get(from..from + length as usize)
                .map(|part| super::pack::open_frame_into(store, &key, hash, part, max, &mut data));
            match decoded {
                Some(Ok(())) => each(at, Ok(&data)),
                _ => each(at, self.block(hash, max).as_deref()),
            }
        }
        SPARE_SPAN.set(span);
    }

    /// Whether the volume's store keeps its blocks in packs (format 2).
    pub fn has_packs(&self) -> bool {
        self.runtime
            .block_on(self.own.index())
            .is_ok_and(|index| index.objects > 0)
    }

    /// Block `hash` (at most `max` bytes) from the first store that has it, verified.
    pub fn block(&self, hash: &BlockHash, max: usize) -> Result<Vec<u8>> {
        for store in std::iter::once(&self.own).chain(&self.origin) {
            if let Some(data) = self.runtime.block_on(store.block(hash, max))? {
                return Ok(data);
            }
        }
        Err(super::missing_block(&*self.own.store, hash).into())
    }
}

/// A completed snapshot read from the object store alone.
pub struct StoreSource {
    /// The volume's store, then its origin's if it was made from another's snapshot.
    stores: StoreChain,
    manifest: SnapshotManifest,
}

impl StoreSource {
    /// Snapshot `snapshot` of the volume in the store at `url` (one in the volume's recycle
    /// bin is deleted as far as this goes).
    pub fn open(runtime: &Handle, url: &StoreUrl, snapshot: &[u8]) -> Result<StoreSource> {
        StoreSource::open_where(runtime, url, snapshot, false)
    }

    /// Snapshot `snapshot` of the volume's recycle bin, in the store at `url`.
    pub fn open_trashed(runtime: &Handle, url: &StoreUrl, snapshot: &[u8]) -> Result<StoreSource> {
        StoreSource::open_where(runtime, url, snapshot, true)
    }

    fn open_where(
        runtime: &Handle,
        url: &StoreUrl,
        snapshot: &[u8],
        trashed: bool,
    ) -> Result<StoreSource> {
        let mut stores = StoreChain::open(runtime, url, None)?;
        let listing = stores.list()?;
        let manifest = listing
            .snapshots
            .into_iter()
            .find(|m| m.trash.is_some() == trashed && m.name == snapshot)
            .ok_or_else(|| {
                let damaged = if listing.damaged.is_empty() {
                    String::new()
                } else {
                    format!(
                        " (unreadable snapshot objects: {})",
                        listing.damaged.join("; ")
                    )
                };
                ReadError::NoSnapshot(format!("{} in {url}{damaged}", escaped(snapshot)))
            })?;
        stores.set_origin(listing.origin.as_ref())?;
        Ok(StoreSource { stores, manifest })
    }

    /// The snapshot `manifest`, listed already from `stores` (whose origin is set).
    pub fn new(stores: StoreChain, manifest: SnapshotManifest) -> StoreSource {
        StoreSource { stores, manifest }
    }

    /// The snapshot's block size (a new volume made from it must use the same).
    pub fn block_size_of(&self) -> u32 {
        self.manifest.block_size
    }
}

impl Source for StoreSource {
    fn root(&self) -> Result<Entry> {
        Ok(self.manifest.root.clone())
    }

    fn children(&self, dir: &Entry) -> Result<Vec<Entry>> {
        let Content::Tree(hash) = &dir.content else {
            return Err(ReadError::Corrupt("a directory without a tree".into()));
        };
        self.stores.tree(hash)
    }

    fn block(&self, hash: &BlockHash) -> Result<Vec<u8>> {
        self.stores.block(hash, self.block_size() as usize)
    }

    fn plan(&self, hashes: Vec<BlockHash>) -> Vec<Vec<BlockHash>> {
        self.stores.plan(hashes)
    }

    fn blocks(&self, group: &[BlockHash], each: &mut EachBlock) {
        self.stores.blocks(group, self.block_size() as usize, each)
    }

    fn block_size(&self) -> u64 {
        u64::from(self.manifest.block_size)
    }

    fn parallelism(&self) -> usize {
        // Each request waits tens of milliseconds on a loopback server, far more on a
        // remote one: many in flight keep the link busy (the CPU is mostly idle). A
        // request for a run of a pack holds up to `PLAN_SPAN` bytes: fewer of those.
        if self.stores.has_packs() { 8 } else { 64 }
    }
}

/// The frames of one pack, `(offset, end, hash)`, in runs to read with one range request
/// each, in pack order (see `PLAN_GAP`, `PLAN_SPAN`).
fn runs_of(mut frames: Vec<(u64, u64, BlockHash)>) -> Vec<Vec<BlockHash>> {
    frames.sort_unstable_by_key(|&(offset, ..)| offset);
    let mut runs = Vec::new();
    let mut run: Vec<BlockHash> = Vec::new();
    let (mut start, mut end) = (0, 0);
    for (offset, frame_end, hash) in frames {
        let joins = !run.is_empty() && offset <= end + PLAN_GAP && frame_end - start <= PLAN_SPAN;
        if !joins {
            if !run.is_empty() {
                runs.push(std::mem::take(&mut run));
            }
            start = offset;
        }
        end = end.max(frame_end);
        run.push(hash);
    }
    if !run.is_empty() {
        runs.push(run);
    }
    runs
}

/// An object, decompressed (at most `max` bytes) and checked by `check` (hash, decode);
/// a copy that fails is fetched again (see `store::fetch_verified`). A missing object, or
/// one that fails every time, is an error.
async fn fetch<T>(
    store: &dyn ObjectStore,
    key: &str,
    max: usize,
    check: impl Fn(Vec<u8>) -> std::result::Result<T, String>,
) -> Result<T> {
    let checked = super::fetch_verified(store, key, |object| {
        let data =
            manifest::decompress(&object, max).map_err(|e| format!("corrupt or truncated: {e}"))?;
        check(data)
    })
    .await?;
    match checked {
        None => Err(ReadError::Corrupt(format!(
            "{key} is missing from the store"
        ))),
        Some(Ok(value)) => Ok(value),
        Some(Err(problem)) => Err(ReadError::Corrupt(format!("{key}: {problem}"))),
    }
}

/// Tree `hash` from `store` (a pack, or an object of its own): verified against its
/// hash and decoded.
pub async fn read_tree(store: &IndexedStore, hash: &BlockHash) -> Result<Vec<Entry>> {
    let encoded = store.tree(hash).await?.ok_or_else(|| {
        ReadError::Corrupt(format!(
            "tree {hash} is missing from {} (no pack, no {})",
            store.store.url(),
            ObjectKey::tree(hash)
        ))
    })?;
    manifest::decode_tree(&encoded)
        .map_err(|e| ReadError::Corrupt(format!("tree {hash} in {}: {e}", store.store.url())))
}

/// Snapshot objects a listing reads at once.
const MANIFEST_READS: usize = 16;

/// The snapshots found in a store: those that read back whole, and a message for each
/// object that did not (one damaged object must not hide the others).
pub struct Listing {
    pub snapshots: Vec<SnapshotManifest>,
    pub damaged: Vec<String>,
    /// The store of the volume this one was made from, whose blocks it shares.
    pub origin: Option<StoreUrl>,
}

/// Every completed snapshot in the store, oldest first, read from the bucket alone, after
/// the volume header is checked (format, key).
pub async fn list_manifests(store: &dyn ObjectStore) -> Result<Listing> {
    let key = ObjectKey::HEADER;
    let header = super::retry(super::Retries::Attempts(5), || store.get(&key))
        .await?
        .ok_or_else(|| ReadError::Corrupt(format!("{} holds no snapfs volume", store.url())))?;
    let header = VolumeHeader::parse(&header).map_err(ReadError::Corrupt)?;
    header.check_key(store)?;
    let mut keys = super::retry(super::Retries::Attempts(5), || {
        store.list(ObjectKey::SNAPSHOTS)
    })
    .await?;
    keys.sort();
    let mut listing = Listing {
        snapshots: Vec::new(),
        damaged: Vec::new(),
        origin: header.origin,
    };
    // Many at once, in key order: one request at a time, a bucket of a thousand snapshots
    // took a thousand round trips before a restore could start.
    let decode = |data: Vec<u8>| manifest::decode_snapshot(&data).map_err(|e| e.to_string());
    let mut read = futures_util::stream::iter(&keys)
        .map(|key| async move { (key, fetch(store, key, MAX_MANIFEST_OBJECT, decode).await) })
        .buffered(MANIFEST_READS);
    while let Some((key, manifest)) = read.next().await {
        match manifest {
            Err(ReadError::Corrupt(message)) => listing.damaged.push(message),
            Err(e) => return Err(e),
            Ok(manifest) if manifest.volume_id != header.id => listing.damaged.push(format!(
                "{key} belongs to volume {}, not {}",
                manifest.volume_id, header.id
            )),
            Ok(manifest) => listing.snapshots.push(manifest),
        }
    }
    Ok(listing)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `count` frames of `len` bytes from `offset`, `gap` bytes apart.
    fn frames(count: u64, offset: u64, len: u64, gap: u64) -> Vec<(u64, u64, BlockHash)> {
        (0..count)
            .map(|i| {
                let at = offset + i * (len + gap);
                (at, at + len, BlockHash::of(&at.to_le_bytes()))
            })
            .collect()
    }

    #[test]
    fn a_full_pack_of_the_default_size_is_one_request() {
        let target = crate::upload::DEFAULT_PACK_SIZE as u64;
        // Incompressible blocks of 256 KiB and of 1 MiB (the largest), each frame some
        // bytes over its block (zstd's headers, a seal): the pack is sent with the frame
        // that reaches the target, so it ends up to a frame past it.
        for block in [256 << 10, 1 << 20] {
            let frame = block + 64;
            let pack = frames(target.div_ceil(frame), 0, frame, 0);
            let runs = runs_of(pack.clone());
            assert_eq!(runs, [pack.iter().map(|f| f.2).collect::<Vec<_>>()]);
        }
    }

    #[test]
    fn runs_split_at_wide_gaps_and_at_the_span_bound_in_pack_order() {
        let mut pack = frames(3, 0, 1000, 10);
        pack.extend(frames(2, 10_000 + PLAN_GAP, 1000, 0));
        pack.reverse();
        let runs = runs_of(pack);
        assert_eq!(runs.iter().map(Vec::len).collect::<Vec<_>>(), [3, 2]);
        assert_eq!(runs[0][0], BlockHash::of(&0u64.to_le_bytes()));

        let huge = frames(40, 0, 1 << 20, 0);
        let runs = runs_of(huge);
        assert!(runs.len() > 1);
        assert!(runs.iter().all(|run| (run.len() as u64) << 20 <= PLAN_SPAN));
        assert_eq!(runs.iter().map(Vec::len).sum::<usize>(), 40);
    }
}
