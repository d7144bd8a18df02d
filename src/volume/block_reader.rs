//! `BlockReader`: where a block's bytes come from. The local block store (memory cache,
//! then `blocks/`, then the catalog for small blocks), else the volume's object store or
//! its origin's (`--from`), fetched, verified and kept again. It owns the local disk as a
//! cache of the store: blocks that are safe in a store may be evicted (least recently used
//! first) to keep them under `--cache-size`; blocks the store lacks (not yet uploaded) are
//! never evicted.
//!
//! Locks: `evictable` is a leaf; the catalog is taken with nothing of this held.

use std::sync::{Arc, OnceLock};

use lru::LruCache;

use super::{Error, Result};
use crate::blocks::{self, BlockError, BlockHash, BlockStore, copy_from, is_inline};
use crate::catalog::Catalog;
use crate::manifest::{PackId, PackedBlock};
use crate::metrics;
use crate::store::{self, BlockPlace, IndexedStore, ObjectKey, ObjectStore};
use crate::sync::{Claims, Mutex, lock};

/// How far past a missed block its pack is read for small evicted blocks that follow it,
/// and what counts as small (a frame of a small file, or of a file's tail).
const READ_AROUND: u64 = 1 << 20;
const SMALL_FRAME: u32 = 64 << 10;
/// How far past a missed block of the origin its pack is read for the origin's blocks
/// that follow it (any size: a volume loading lazily is read file by file, and a pack
/// holds files in order).
const ORIGIN_READ_AROUND: u64 = 4 << 20;

/// An object store, reachable from the read path.
struct Remote {
    store: Arc<IndexedStore>,
    runtime: tokio::runtime::Handle,
}

/// Stored blocks on the local disk, least recently used first, and their bytes: kept
/// only under `--cache-size`.
struct Evictable {
    limit: u64,
    blocks: LruCache<BlockHash, u32>,
    bytes: u64,
}

impl Evictable {
    fn admit(&mut self, hash: BlockHash, len: u32) {
        if self.blocks.put(hash, len).is_none() {
            self.bytes += u64::from(len);
        }
    }

    /// The next block to evict while over the limit.
    fn over_limit(&mut self) -> Option<BlockHash> {
        if self.bytes <= self.limit {
            return None;
        }
        let (hash, len) = self.blocks.pop_lru()?;
        self.bytes -= u64::from(len);
        Some(hash)
    }
}

pub(super) struct BlockReader {
    local: BlockStore,
    block_size: u64,
    catalog: Arc<Mutex<Catalog>>,
    /// The volume's object store, once attached.
    remote: OnceLock<Remote>,
    /// The store of the volume this one was made from (`--from`), for the blocks they share.
    origin: OnceLock<Remote>,
    /// Stored blocks on the local disk, for eviction under `--cache-size` (set only then).
    evictable: OnceLock<Mutex<Evictable>>,
    /// Blocks being fetched from a store (alone, or in the span of a neighbour's fetch):
    /// a read that needs one waits for that fetch, read-ahead skips it.
    fetching: Claims<BlockHash>,
}

impl BlockReader {
    pub fn new(local: BlockStore, block_size: u64, catalog: Arc<Mutex<Catalog>>) -> BlockReader {
        BlockReader {
            local,
            block_size,
            catalog,
            remote: OnceLock::new(),
            origin: OnceLock::new(),
            evictable: OnceLock::new(),
            fetching: Claims::default(),
        }
    }

    /// The local block store, where flushes write new blocks.
    pub fn local(&self) -> &BlockStore {
        &self.local
    }

    /// Whether a store may hold blocks the local disk lacks.
    pub fn has_remote(&self) -> bool {
        self.remote.get().is_some() || self.origin.get().is_some()
    }

    /// Connects the read path to the volume's object store, bounding the local disk used
    /// by stored blocks to `cache_size` bytes (`None`: keep everything).
    pub fn attach_store(
        &self,
        store: Arc<dyn ObjectStore>,
        runtime: tokio::runtime::Handle,
        cache_size: Option<u64>,
    ) -> Result<()> {
        // Without a limit nothing is evicted: no need to know what could be, at mount or
        // on each read.
        if let Some(limit) = cache_size {
            let mut cache = Evictable {
                limit,
                blocks: LruCache::unbounded(),
                bytes: 0,
            };
            for (hash, len) in lock(&self.catalog).read(|tx| tx.evictable_blocks())? {
                cache.admit(hash, len);
            }
            let _ = self.evictable.set(Mutex::new(cache));
        }
        // A second attach (a test reattaching) keeps the first store.
        let store = Arc::new(IndexedStore::new(store));
        let _ = self.remote.set(Remote { store, runtime });
        self.evict()
    }

    /// Connects the read path to the origin volume's store (`--from`).
    pub fn attach_origin(&self, store: Arc<dyn ObjectStore>, runtime: tokio::runtime::Handle) {
        let store = Arc::new(IndexedStore::new(store));
        let _ = self.origin.set(Remote { store, runtime });
    }

    /// The origin's store has new packs (see `IndexedStore::store_changed`).
    pub fn origin_changed(&self) {
        if let Some(origin) = self.origin.get() {
            origin.store.store_changed();
        }
    }

    /// Block `hash`, from memory, the local disk, or the store.
    pub fn block(&self, hash: &BlockHash) -> Result<Arc<Vec<u8>>> {
        match self.local_block(hash)? {
            Some(data) => Ok(data),
            None => {
                metrics::cache_miss();
                self.fetch(hash)
            }
        }
    }

    /// Fetches block `hash` from a store ahead of a read, unless the catalog no longer
    /// knows it: a writer replaced and freed it since it was queued, and a copy fetched now
    /// would stay on the disk for no one.
    pub fn fetch_ahead(&self, hash: &BlockHash) -> Result<()> {
        let Some(_fetching) = self.fetching.try_claim(*hash) else {
            return Ok(());
        };
        if lock(&self.catalog).read(|tx| tx.has_block(hash))?
            && self.kept_meanwhile(hash)?.is_none()
        {
            self.fetch_claimed(hash)?;
        }
        Ok(())
    }

    /// Block `hash` from memory, the local disk or the catalog; `None` if only a store
    /// has it.
    pub fn local_block(&self, hash: &BlockHash) -> Result<Option<Arc<Vec<u8>>>> {
        self.local_or_none(hash, self.local.get(hash), |data| data)
    }

    /// Copies block `hash` (of `block_len` bytes, as far as the reader knows) from `offset`
    /// into `out` from memory or the local disk (see `BlockStore::read_into`): how many
    /// bytes it had there, `None` if only a store has it.
    pub fn read_local(
        &self,
        hash: &BlockHash,
        block_len: usize,
        offset: usize,
        out: &mut [u8],
    ) -> Result<Option<usize>> {
        if blocks::reads_part(offset, out.len(), block_len) && !self.local.knows_pieces(hash) {
            self.adopt_pieces(hash)?;
        }
        let read = self.local.read_into(hash, offset, out);
        self.local_or_none(hash, read, |data| copy_from(&data, offset, out))
    }

    /// Copies block `hash` (of `block_len` bytes) from `offset` into `out`, from wherever
    /// it is: how many bytes it had there.
    pub fn read(
        &self,
        hash: &BlockHash,
        block_len: usize,
        offset: usize,
        out: &mut [u8],
    ) -> Result<usize> {
        match self.read_local(hash, block_len, offset, out)? {
            Some(len) => Ok(len),
            None => {
                metrics::cache_miss();
                Ok(copy_from(&self.fetch(hash)?, offset, out))
            }
        }
    }

    /// A local read's result: a hit (counted, and promoted for eviction), or `None` for a
    /// block missing or damaged here that a store may have. A block without a file may
    /// be a small one the catalog holds: `from_inline` reads it from there.
    fn local_or_none<T>(
        &self,
        hash: &BlockHash,
        read: std::result::Result<T, BlockError>,
        from_inline: impl FnOnce(Arc<Vec<u8>>) -> T,
    ) -> Result<Option<T>> {
        let read = match read {
            Err(BlockError::Missing { .. }) => match self.inline_block(hash) {
                Ok(Some(data)) => Ok(from_inline(data)),
                Ok(None) => read,
                Err(Error::Block(damaged)) => Err(damaged),
                Err(e) => return Err(e),
            },
            read => read,
        };
        match read {
            Ok(data) => {
                metrics::cache_hit();
                if let Some(cache) = self.evictable.get() {
                    lock(cache).blocks.promote(hash);
                }
                Ok(Some(data))
            }
            Err(BlockError::Missing { .. }) if self.has_remote() => Ok(None),
            // A damaged file heals from the store, if it holds the block: the fetch keeps
            // the good copy in its place (`BlockStore::put`).
            Err(BlockError::Corrupt { .. } | BlockError::CorruptPiece { .. })
                if self.has_remote() =>
            {
                tracing::warn!(%hash, "fetching a damaged block from the store");
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Lets the block store read block `hash` by pieces, from the values its flush kept.
    /// Values that do not make the hash (a damaged catalog) are not adopted: the block is
    /// then read and verified whole.
    fn adopt_pieces(&self, hash: &BlockHash) -> Result<()> {
        if let Some((len, encoded)) = lock(&self.catalog).read(|tx| tx.block_pieces(hash))?
            && !self.local.adopt_pieces(hash, len as usize, &encoded)
        {
            tracing::warn!(block = %hash, "stored piece values do not match the block: reading it whole");
        }
        Ok(())
    }

    /// Block `hash` from the catalog, verified and kept in memory, if it is a small block
    /// kept there (`blocks::INLINE_MAX`).
    fn inline_block(&self, hash: &BlockHash) -> Result<Option<Arc<Vec<u8>>>> {
        let Some(data) = lock(&self.catalog).read(|tx| tx.inline_block(hash))? else {
            return Ok(None);
        };
        let data = Arc::new(self.local.read_uncached(hash, Some(data))?);
        self.local.cache_verified(hash, data.clone());
        Ok(Some(data))
    }

    fn fetch(&self, hash: &BlockHash) -> Result<Arc<Vec<u8>>> {
        let _fetching = loop {
            if let Some(claim) = self.fetching.try_claim(*hash) {
                break claim;
            }
            self.fetching.wait_for(hash);
        };
        // Kept by the fetch this one waited for, or by one that ended between the caller's
        // miss and the claim (unless it failed: then this one fetches for itself). A look
        // on the disk costs far less than a second request to the store, which the
        // readers of a cold file's neighbours made under load.
        if let Some(data) = self.kept_meanwhile(hash)? {
            return Ok(data);
        }
        self.fetch_claimed(hash)
    }

    /// Block `hash` if another fetch kept it since the caller missed it, looked for once
    /// the caller holds its claim. A block a read found damaged is not read and hashed
    /// again (nor reported again): it stays damaged until a fetch's put replaces it.
    fn kept_meanwhile(&self, hash: &BlockHash) -> Result<Option<Arc<Vec<u8>>>> {
        if self.local.is_damaged(hash) {
            return Ok(None);
        }
        self.local_block(hash)
    }

    /// Fetches block `hash`, claimed in `fetching` by the caller, and keeps it.
    fn fetch_claimed(&self, hash: &BlockHash) -> Result<Arc<Vec<u8>>> {
        // The volume's own blocks are where the catalog recorded them; the origin's are
        // found through its store's index.
        let (in_origin, place) = lock(&self.catalog).read(|tx| {
            Ok::<_, crate::catalog::Error>((tx.block_in_origin(hash)?, tx.block_place(hash)?))
        })?;
        let remote = if in_origin {
            self.origin.get()
        } else {
            self.remote.get()
        };
        let Some(remote) = remote else {
            return Err(BlockError::Missing { hash: *hash }.into());
        };
        let max = self.block_size as usize;
        let store = &remote.store;
        let fetched = match place {
            Some(place) if !in_origin => match self.fetch_own(remote, hash, place, max)? {
                // Garbage collection moved the block to a new pack and pointed the catalog
                // at it, then deleted the old pack, between the read of its place and the
                // fetch: fetch it where the catalog says now.
                // (The catalog is read in a statement of its own: a guard made in a match's
                // scrutinee lives through its arms, and `fetch_own` locks the catalog.)
                Ok(None) => {
                    let now = lock(&self.catalog).read(|tx| tx.block_place(hash))?;
                    match now {
                        Some(moved) if moved != place => {
                            self.fetch_own(remote, hash, moved, max)?
                        }
                        _ => Ok(None),
                    }
                }
                fetched => fetched,
            },
            _ if in_origin => self.fetch_origin(remote, hash, max)?,
            _ => remote.runtime.block_on(store.block(hash, max)),
        };
        let data = fetched
            .and_then(|data| data.ok_or_else(|| store::missing_block(&*store.store, hash)))
            .map_err(|e| {
                tracing::error!(%hash, error = %e, "cannot fetch a block from the store");
                Error::Block(BlockError::Fetch {
                    hash: *hash,
                    message: e.message,
                })
            })?;
        self.keep(hash, &data);
        self.evict()?;
        // Verified by `fetch_block`: reads of its other parts need not go to the disk.
        let data = Arc::new(data);
        self.local.cache_verified(hash, data.clone());
        Ok(data)
    }

    /// Keeps a block fetched from a store (verified) on the local disk again. One that
    /// cannot be kept (a full disk) is still served: the read needs its bytes, not a copy
    /// on the disk; once it leaves the memory cache, a read fetches it again.
    fn keep(&self, hash: &BlockHash, data: &[u8]) {
        let kept = self
            .local
            .put(hash, data)
            .map_err(Error::from)
            .and_then(|()| Ok(lock(&self.catalog).write(|tx| tx.set_block_local(hash, true))?));
        match kept {
            Ok(true) => {
                if let Some(cache) = self.evictable.get() {
                    lock(cache).admit(*hash, data.len() as u32);
                }
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(%hash, error = %e, "cannot keep a fetched block on the local disk")
            }
        }
    }

    /// Block `hash` from `place` in the volume's own store. From a pack, the small
    /// evicted blocks that follow it come with it in the same range request and are kept
    /// too: a directory of small files read cold costs one request per run of them, not
    /// one per file. Large blocks are left out, so a random read of a large file reads
    /// no more than its block.
    fn fetch_own(
        &self,
        remote: &Remote,
        hash: &BlockHash,
        place: BlockPlace,
        max: usize,
    ) -> Result<store::StoreResult<Option<Vec<u8>>>> {
        let store = &*remote.store.store;
        let single = || {
            remote
                .runtime
                .block_on(store::fetch_block(store, hash, place, max))
        };
        let BlockPlace::Packed {
            pack,
            offset,
            length,
        } = place
        else {
            return Ok(single());
        };
        let neighbours = lock(&self.catalog)
            .read(|tx| tx.pack_neighbours(&pack, offset, READ_AROUND, SMALL_FRAME))?;
        Ok(self
            .read_span(remote, &pack, (hash, offset, length), &neighbours, max)?
            .unwrap_or_else(single))
    }

    /// Block `hash` of the origin, verified, with the origin's blocks that follow it in
    /// its pack (within `ORIGIN_READ_AROUND`) and that the volume still lacks, in the
    /// same range request, kept too: a file read front to back costs a request per 4
    /// MiB, not per block.
    fn fetch_origin(
        &self,
        remote: &Remote,
        hash: &BlockHash,
        max: usize,
    ) -> Result<store::StoreResult<Option<Vec<u8>>>> {
        let store = &remote.store;
        let single = || remote.runtime.block_on(store.block(hash, max));
        let index = match remote.runtime.block_on(store.index()) {
            Ok(index) => index,
            Err(e) => return Ok(Err(e)),
        };
        let Some(&BlockPlace::Packed {
            pack,
            offset,
            length,
        }) = index.places(hash).first()
        else {
            return Ok(single());
        };
        let following = index.following(&pack, offset, ORIGIN_READ_AROUND);
        let hashes: Vec<BlockHash> = following.iter().map(|block| block.hash).collect();
        let wanted = lock(&self.catalog).read(|tx| tx.origin_blocks_to_fetch(&hashes))?;
        // Up to the last one wanted: the span read stops there.
        let neighbours: Vec<_> = following
            .iter()
            .zip(wanted)
            .filter(|(_, wanted)| *wanted)
            .map(|(block, _)| *block)
            .collect();
        Ok(self
            .read_span(remote, &pack, (hash, offset, length), &neighbours, max)?
            .unwrap_or_else(single))
    }

    /// Reads block `hash` at (`offset`, `length`) of `pack` and the `neighbours` after it
    /// in one range request, keeping the neighbours (each verified; one that fails is
    /// fetched alone when it is read). The span stops before the first neighbour another
    /// fetch is bringing. `None` if there are no neighbours left or the request or the
    /// block itself fails (but for a store that stays unreachable): the caller fetches
    /// the block alone.
    fn read_span(
        &self,
        remote: &Remote,
        pack: &PackId,
        (hash, offset, length): (&BlockHash, u64, u32),
        neighbours: &[PackedBlock],
        max: usize,
    ) -> Result<Option<store::StoreResult<Option<Vec<u8>>>>> {
        let claim = self
            .fetching
            .claim_until_taken(neighbours.iter().map(|block| block.hash));
        let neighbours = &neighbours[..claim.keys().len()];
        let Some(last) = neighbours.last() else {
            return Ok(None);
        };
        let store = &*remote.store.store;
        let key = ObjectKey::pack(pack);
        let end = last.offset + u64::from(last.length);
        let span = remote.runtime.block_on(store::get_span(
            store,
            &key,
            offset,
            end - offset,
            Vec::new(),
        ));
        let span = match span {
            Ok(Some(span)) => span,
            Ok(None) => return Ok(None),
            Err(e) => return Ok(Some(Err(e))),
        };
        let frame = |at: u64, length: u32| {
            let at = usize::try_from(at - offset).ok()?;
            span.get(at..at.checked_add(length as usize)?)
        };
        for block in neighbours {
            let part = frame(block.offset, block.length);
            if let Some(Ok(data)) =
                part.map(|part| store::open_frame(store, &key, &block.hash, part, max))
            {
                self.keep(&block.hash, &data);
                // Verified: the read that comes for it (a reader's next, or read-ahead's)
                // copies it from memory.
                self.local.cache_verified(&block.hash, Arc::new(data));
            }
        }
        match frame(offset, length).map(|part| store::open_frame(store, &key, hash, part, max)) {
            Some(Ok(data)) => Ok(Some(Ok(Some(data)))),
            _ => Ok(None),
        }
    }

    /// Blocks that just reached the store: they may now be evicted.
    pub fn stored(&self, blocks: &[(BlockHash, u32)]) -> Result<()> {
        let Some(cache) = self.evictable.get() else {
            return Ok(());
        };
        {
            let mut cache = lock(cache);
            // Small blocks live in the catalog: evicting them would free no file.
            for &(hash, len) in blocks.iter().filter(|(_, len)| !is_inline(*len as usize)) {
                cache.admit(hash, len);
            }
        }
        self.evict()
    }

    /// Evicts least recently used stored blocks until the cache is within its limit.
    fn evict(&self) -> Result<()> {
        let Some(cache) = self.evictable.get() else {
            return Ok(());
        };
        loop {
            let Some(hash) = lock(cache).over_limit() else {
                return Ok(());
            };
            // Marked first: a crash in between leaves a file the catalog calls evicted,
            // which is only disk space, never a block the catalog believes local.
            if lock(&self.catalog).write_now(|tx| tx.set_block_local(&hash, false))? {
                self.local.remove(&hash)?;
                metrics::cache_eviction();
            }
        }
    }
}
