//! What the read path remembers between reads: the parts of a file's block map it loaded
//! (`ReadState`, so a read does not query the catalog), whether the file is read
//! sequentially, and the read-ahead workers (`ReadAhead`) that load the next blocks,
//! verified, into the block store's memory cache before they are asked for.
//!
//! A live file's `ReadState` lives in its `FileState` (`open_files.rs`), so it is forgotten
//! under that lock whenever the catalog's map of the file changes (a flush, the retirement
//! of an unlinked file: `OpenFiles::discard_buffers`; a followed snapshot:
//! `Volume::sync_to`). A snapshot's files never change, so theirs (`SnapshotReads`) are
//! keyed by the snapshot's generation and never invalidated.
//!
//! Locks: a `ReadState` is taken with its file's state (lock 2 in the order); the
//! snapshot files' map is a leaf, and a snapshot file's own lock stands where a file state's
//! does. The read-ahead queue and the set of blocks loading are leaves; the workers hold
//! no lock while they load (the block reader's own, and the catalog for a fetch).

use std::num::NonZeroUsize;
use std::ops::RangeInclusive;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::thread::JoinHandle;

use lru::LruCache;

use super::Result;
use super::block_reader::BlockReader;
use crate::blocks::BlockHash;
use crate::sync::{Claims, Mutex, lock};

/// Block indexes per segment of a map loaded at once (64 MiB of file at 256 KiB blocks).
const SEGMENT: u64 = 256;

/// Segments kept per file: 1 GiB of file at 256 KiB blocks, in at most ~170 KiB.
const SEGMENTS_PER_FILE: usize = 16;

/// Snapshot files whose read state is kept.
const SNAPSHOT_FILES: usize = 64;

/// Bytes read ahead of a sequential reader: for a file that only a store has, room for
/// the workers to keep several of the block reader's 4 MiB requests in flight (one at a
/// time left a lazily loaded file read at a single request's speed).
const READ_AHEAD_BYTES: u64 = 16 << 20;

/// Read-ahead workers: blocks loaded (from the disk or a store) in parallel.
const READ_AHEAD_WORKERS: usize = 4;

/// The mapped blocks (index, hash) of one segment, by index; holes are absent.
type Segment = Arc<Vec<(u64, BlockHash)>>;

/// What reads of one file (in one view) remember.
pub(super) struct ReadState {
    /// Loaded segments of the catalog's block map, by segment number.
    segments: LruCache<u64, Segment>,
    /// Where the next read starts if the file is read sequentially (`None`: no read yet,
    /// so nothing to continue).
    next: Option<u64>,
    /// Blocks before this one have been read or read ahead.
    ahead: u64,
}

impl Default for ReadState {
    fn default() -> Self {
        ReadState {
            segments: LruCache::new(
                NonZeroUsize::new(SEGMENTS_PER_FILE).unwrap_or(NonZeroUsize::MIN),
            ),
            next: None,
            ahead: 0,
        }
    }
}

impl ReadState {
    /// The mapped blocks of `first..=last` (index, hash), in index order: from memory, or
    /// loaded by whole segments through `load(first, last)` (the catalog's map).
    pub fn blocks(
        &mut self,
        first: u64,
        last: u64,
        mut load: impl FnMut(u64, u64) -> Result<Vec<(u64, BlockHash)>>,
    ) -> Result<Vec<(u64, BlockHash)>> {
        let mut found = Vec::new();
        for segment in first / SEGMENT..=last / SEGMENT {
            let blocks = match self.segments.get(&segment) {
                Some(blocks) => blocks.clone(),
                None => {
                    let start = segment * SEGMENT;
                    let blocks = Arc::new(load(start, start + SEGMENT - 1)?);
                    self.segments.put(segment, blocks.clone());
                    blocks
                }
            };
            let from = blocks.partition_point(|&(idx, _)| idx < first);
            let to = blocks.partition_point(|&(idx, _)| idx <= last);
            found.extend_from_slice(&blocks[from..to]);
        }
        Ok(found)
    }

    /// The catalog's map of the file changed: what was loaded of it is stale.
    pub fn forget_map(&mut self) {
        self.segments.clear();
    }

    /// Records a read of `offset..end` (of a file of `size` bytes, in blocks of
    /// `block_size`) and, when it continues the previous one, returns the blocks to read
    /// ahead: up to `window` blocks past it, each block once.
    pub fn read_ahead(
        &mut self,
        offset: u64,
        end: u64,
        size: u64,
        block_size: u64,
        window: u64,
    ) -> Option<RangeInclusive<u64>> {
        // Requests of one sequential reader may arrive slightly out of order (the kernel
        // sends several at once), so "continues" allows a request or two of slack.
        let sequential = offset != 0
            && self
                .next
                .is_some_and(|next| offset.abs_diff(next) <= 2 * (end - offset));
        self.next = Some(end);
        let last_block = end.saturating_sub(1) / block_size;
        if !sequential || size == 0 {
            self.ahead = last_block + 1;
            return None;
        }
        let first = self.ahead.max(last_block + 1);
        let last = (last_block + window).min((size - 1) / block_size);
        self.ahead = self.ahead.max(last + 1);
        (first <= last).then_some(first..=last)
    }
}

/// A file of a snapshot, as its reads see it: its size and read state.
pub(super) struct SnapshotFile {
    pub size: u64,
    pub reads: ReadState,
}

/// A snapshot file's state, shared by its readers.
type SharedSnapshotFile = Arc<Mutex<SnapshotFile>>;

/// The read states of recently read snapshot files, by (generation, inode): what a
/// generation sees never changes.
pub(super) struct SnapshotReads {
    files: Mutex<LruCache<(u64, u64), SharedSnapshotFile>>,
}

impl Default for SnapshotReads {
    fn default() -> Self {
        SnapshotReads {
            files: Mutex::new(LruCache::new(
                NonZeroUsize::new(SNAPSHOT_FILES).unwrap_or(NonZeroUsize::MIN),
            )),
        }
    }
}

impl SnapshotReads {
    /// The state of file `ino` of the snapshot at `generation`, made with the size
    /// `size()` gives (it reads the catalog, so it runs without the map's lock).
    pub fn file(
        &self,
        generation: u64,
        ino: u64,
        size: impl FnOnce() -> Result<u64>,
    ) -> Result<SharedSnapshotFile> {
        let key = (generation, ino);
        if let Some(file) = lock(&self.files).get(&key) {
            return Ok(file.clone());
        }
        let fresh = Arc::new(Mutex::new(SnapshotFile {
            size: size()?,
            reads: ReadState::default(),
        }));
        Ok(lock(&self.files).get_or_insert(key, || fresh).clone())
    }
}

/// Workers that load blocks ahead of sequential readers into the block store's memory
/// cache, verified there, so the reads that follow copy them from memory.
pub(super) struct ReadAhead {
    queue: Option<SyncSender<BlockHash>>,
    workers: Vec<JoinHandle<()>>,
    /// Blocks read ahead of a reader.
    window: u64,
    /// The blocks workers are loading from the local disk now: a read that needs one
    /// waits for it rather than reading and hashing it a second time.
    loading: Arc<Claims<BlockHash>>,
}

impl ReadAhead {
    /// Starts the workers for a volume of `block_size` blocks whose memory cache holds
    /// `cache_blocks`: what is read ahead stays well within it, or blocks read ahead
    /// would evict each other before they are read.
    pub fn start(blocks: Arc<BlockReader>, block_size: u64, cache_blocks: usize) -> ReadAhead {
        let window = (READ_AHEAD_BYTES / block_size.max(1)).min(cache_blocks as u64 / 4);
        let (queue, jobs) = std::sync::mpsc::sync_channel(window.max(1) as usize);
        let jobs = Arc::new(Mutex::new(jobs));
        let loading = Arc::new(Claims::default());
        let workers = (0..READ_AHEAD_WORKERS)
            .filter_map(|i| {
                let (blocks, jobs, loading) = (blocks.clone(), jobs.clone(), loading.clone());
                std::thread::Builder::new()
                    .name(format!("snapfs-ahead-{i}"))
                    .spawn(move || work(&blocks, &jobs, &loading))
                    .map_err(|e| tracing::warn!(error = %e, "cannot start a read-ahead worker"))
                    .ok()
            })
            .collect();
        ReadAhead {
            queue: Some(queue),
            workers,
            window,
            loading,
        }
    }

    /// Waits while a worker loads block `hash` from the local disk (then in the memory
    /// cache, unless that failed or it was evicted already: the caller reads it as usual
    /// either way).
    pub fn wait_for(&self, hash: &BlockHash) {
        self.loading.wait_for(hash);
    }

    /// How many blocks to read ahead of a sequential reader.
    pub fn window(&self) -> u64 {
        self.window
    }

    /// Queues block `hash` to be loaded; dropped when the queue is full.
    pub fn load(&self, hash: BlockHash) {
        if let Some(queue) = &self.queue
            && let Err(TrySendError::Disconnected(_)) = queue.try_send(hash)
        {
            tracing::warn!("the read-ahead workers are gone");
        }
    }
}

fn work(blocks: &BlockReader, jobs: &Mutex<Receiver<BlockHash>>, loading: &Claims<BlockHash>) {
    loop {
        let job = lock(jobs).recv();
        let Ok(hash) = job else {
            return;
        };
        let Some(claim) = loading.try_claim(hash) else {
            continue;
        };
        let local = blocks.local_block(&hash);
        drop(claim);
        // A block only a store has is fetched with no reader waiting for it: readers wait
        // holding their file's state, and a store may take minutes to answer.
        let loaded = match local {
            Ok(None) => blocks.fetch_ahead(&hash),
            result => result.map(drop),
        };
        // Only a hint: the read that needs the block reports any error itself.
        if let Err(e) = loaded {
            tracing::debug!(%hash, error = %e, "read-ahead failed");
        }
    }
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        // Closing the queue ends the workers once their current block is loaded.
        self.queue = None;
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(idx: u64) -> BlockHash {
        BlockHash::of(&idx.to_le_bytes())
    }

    #[test]
    fn blocks_load_each_segment_once_until_forgotten() {
        let mut reads = ReadState::default();
        let loads = std::cell::RefCell::new(Vec::new());
        let load = |first: u64, last: u64| {
            loads.borrow_mut().push((first, last));
            Ok((first..=last).step_by(100).map(|i| (i, hash(i))).collect())
        };
        let got = reads.blocks(150, 300, load).expect("blocks");
        assert_eq!(got, vec![(200, hash(200)), (256, hash(256))]);
        let got = reads.blocks(0, 10, load).expect("blocks");
        assert_eq!(got, vec![(0, hash(0))]);
        assert_eq!(*loads.borrow(), vec![(0, 255), (256, 511)]);
        reads.forget_map();
        reads.blocks(0, 0, load).expect("blocks");
        assert_eq!(loads.borrow().len(), 3);
    }

    #[test]
    fn read_ahead_starts_on_the_second_sequential_read_and_reads_each_block_once() {
        let (bs, size) = (1 << 20, 100 << 20);
        let mut reads = ReadState::default();
        assert_eq!(reads.read_ahead(0, bs, size, bs, 4), None);
        assert_eq!(reads.read_ahead(bs, 2 * bs, size, bs, 4), Some(2..=5));
        assert_eq!(reads.read_ahead(2 * bs, 3 * bs, size, bs, 4), Some(6..=6));
        // A jump elsewhere is random access: nothing read ahead.
        assert_eq!(reads.read_ahead(50 * bs, 51 * bs, size, bs, 4), None);
        // The end of the file bounds it.
        assert_eq!(
            reads.read_ahead(51 * bs, 98 * bs, size, bs, 4),
            Some(98..=99)
        );
        // Reading it again from the start reads ahead again.
        assert_eq!(reads.read_ahead(0, bs, size, bs, 4), None);
        assert_eq!(reads.read_ahead(bs, 2 * bs, size, bs, 4), Some(2..=5));
        // Small reads near each other but not following each other are random access.
        assert_eq!(reads.read_ahead(10 * bs, 10 * bs + 4096, size, bs, 4), None);
        assert_eq!(
            reads.read_ahead(10 * bs + 65536, 10 * bs + 69632, size, bs, 4),
            None
        );
        // A first read continues nothing, wherever it starts (a copy reading the partial
        // block at its head must not read the file ahead).
        let mut first = ReadState::default();
        assert_eq!(first.read_ahead(777, bs, size, bs, 4), None);
    }
}
