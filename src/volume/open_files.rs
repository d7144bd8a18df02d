//! `OpenFiles`: the in-memory state of live files that are open, being changed, or holding
//! unflushed writes (their dirty blocks, authoritative size and times), the file handles
//! the kernel holds on them, and the dirty-byte budget over all files.
//!
//! A file's state is pinned while anyone works on it (an open handle, a write, a truncate,
//! a flush of all files): a pinned state is never forgotten, so a caller that looked it up
//! works on the one every other caller sees. An unpinned state goes once it is clean.
//!
//! Past `flush_ahead` buffered bytes (a sixteenth of the dirty limit) the background
//! flusher is woken: buffers drain long before writers hit the limit, so neither a writer
//! nor a snapshot (which flushes with writers held) finds much to flush.
//!
//! The flusher hashes a file's whole dirty blocks and writes their block files before it
//! flushes them, with the file unlocked, so that its writer goes on meanwhile: a
//! `DirtyBlock` shares its bytes with that work, and a write to a block being hashed
//! copies it first. A flush that meets a block
//! being hashed waits for its hash rather than making it again.
//!
//! Locks: the map (`files`) is a leaf, taken alone or under a file state's lock, never the
//! other way round; so is the flusher's signal.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::Result;
use super::reads::ReadState;
use crate::blocks::BlockHash;
use crate::catalog::{Attrs, InodeRow};
use crate::sync::{Condvar, Mutex, MutexGuard, Slot, lock, wait_timeout};

/// The background flusher starts at this fraction of the dirty limit (1 MiB of 16 MiB):
/// what a snapshot flushes then takes a few milliseconds. (With the 64 MiB limit of
/// before, a sixteenth, 4 MiB, measured twice as slow snapshots under a streaming writer
/// and no faster writes: docs/benchmarks.md.)
const FLUSH_AHEAD_FRACTION: u64 = 16;

/// The state of a live file while it is open or has unflushed changes: the authority for
/// its size and times until flushed, and for its mode, owner and atime while `held`.
pub(super) struct FileState {
    pub size: u64,
    pub mtime: i64,
    pub ctime: i64,
    /// What a setattr changed while writes were buffered, stored with them by the next
    /// flush (`Volume::setattr_file`). Only ever set while `changed`.
    pub held: Option<HeldAttrs>,
    /// Changed blocks by index, each at most a block long and never past `size`.
    pub dirty: BTreeMap<u64, DirtyBlock>,
    /// Bytes held in `dirty`, as counted in `OpenFiles::dirty_bytes`.
    pub buffered: u64,
    /// Size, times, `held` attributes or blocks differ from the catalog.
    pub changed: bool,
    /// Smallest size truncated to since the last flush: catalog blocks past it are stale.
    pub truncated_to: Option<u64>,
    /// Block indices punched out since the last flush (first -> end, exclusive; disjoint,
    /// not adjacent): catalog blocks there are stale, and the flush unmaps them.
    pub punched: BTreeMap<u64, u64>,
    /// Open handles: the last close of an unlinked file drops its buffers.
    pub opens: u32,
    pub dirty_since: Option<Instant>,
    /// What reads loaded of the catalog's block map and how they go: forgotten whenever
    /// that map changes (anything changing a live file's map outside a flush must call
    /// `ReadState::forget_map` under this state's lock, after its change committed).
    pub reads: ReadState,
    /// Block files the background flusher wrote with the file unlocked
    /// (`Volume::store_unlocked`), for the next flush to adopt: it removes those it did
    /// not (their block changed meanwhile), so they hold no disk space past it.
    pub stored_ahead: Vec<BlockHash>,
}

/// A changed block's bytes, and their hash made (or being made) ahead of their flush while
/// they stay as they are.
pub(super) struct DirtyBlock {
    bytes: Arc<Vec<u8>>,
    hash: Option<Arc<HashSlot>>,
}

/// A dirty block hashed for the store: `None` for all zeros (a hole), else its hash, its
/// piece values and whether its bytes go to the catalog rather than a block file.
pub(super) type Hashed = Option<HashedBlock>;

/// Where the background flusher puts the hash it makes of a block with the file unlocked:
/// `None` if it could not make it (the flush then does).
pub(super) type HashSlot = Slot<Option<Hashed>>;

#[derive(Clone)]
pub(super) struct HashedBlock {
    pub hash: BlockHash,
    pub pieces: Option<Vec<u8>>,
    pub inline: bool,
}

impl DirtyBlock {
    pub fn new(bytes: Vec<u8>) -> DirtyBlock {
        DirtyBlock {
            bytes: Arc::new(bytes),
            hash: None,
        }
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// The bytes to change: their hash goes, and if the flusher is hashing them
    /// meanwhile, they are copied first.
    pub fn bytes_mut(&mut self) -> &mut Vec<u8> {
        self.hash = None;
        Arc::make_mut(&mut self.bytes)
    }

    /// Hands the bytes to the flusher to hash with the file unlocked, with the slot their
    /// hash goes to; `None` if they are hashed or being hashed already.
    pub fn hash_ahead(&mut self) -> Option<(Arc<Vec<u8>>, Arc<HashSlot>)> {
        if self.hash.is_some() {
            return None;
        }
        let slot = Arc::new(HashSlot::default());
        self.hash = Some(Arc::clone(&slot));
        Some((Arc::clone(&self.bytes), slot))
    }

    /// The slot of the hash made or being made of these bytes, if any.
    pub fn hash_slot(&self) -> Option<&Arc<HashSlot>> {
        self.hash.as_ref()
    }
}

impl FileState {
    pub fn new(row: &InodeRow) -> FileState {
        FileState {
            size: row.attrs.size,
            mtime: row.attrs.mtime,
            ctime: row.attrs.ctime,
            held: None,
            dirty: BTreeMap::new(),
            buffered: 0,
            changed: false,
            truncated_to: None,
            punched: BTreeMap::new(),
            opens: 0,
            dirty_since: None,
            reads: ReadState::default(),
            stored_ahead: Vec::new(),
        }
    }

    /// Whether the catalog block `idx` may be used: not cut off by a pending truncate or
    /// punched out.
    pub fn catalog_block_valid(&self, idx: u64, block_size: u64) -> bool {
        catalog_block_valid(self.truncated_to, &self.punched, idx, block_size)
    }

    /// The first catalog block at or after `idx` that is stale (see `catalog_block_valid`).
    pub fn next_stale(&self, idx: u64, block_size: u64) -> Option<u64> {
        let punched = match punched_at(&self.punched, idx) {
            Some(_) => Some(idx),
            None => self.punched.range(idx..).next().map(|(&first, _)| first),
        };
        let cut = self.truncated_to.map(|t| t.div_ceil(block_size).max(idx));
        punched.into_iter().chain(cut).min()
    }

    /// The first catalog block at or after `idx` that is not stale (`None`: none is).
    pub fn next_valid(&self, idx: u64, block_size: u64) -> Option<u64> {
        let idx = punched_at(&self.punched, idx).map_or(idx, |(_, end)| end);
        let cut = self.truncated_to.map(|t| t.div_ceil(block_size));
        cut.is_none_or(|cut| idx < cut).then_some(idx)
    }

    /// Marks the catalog blocks `first..end` stale, merged with the ranges it touches.
    pub fn punch(&mut self, mut first: u64, mut end: u64) {
        let touching: Vec<(u64, u64)> = self
            .punched
            .range(..=end)
            .filter(|&(_, &e)| e >= first)
            .map(|(&f, &e)| (f, e))
            .collect();
        for (f, e) in touching {
            self.punched.remove(&f);
            first = first.min(f);
            end = end.max(e);
        }
        self.punched.insert(first, end);
    }

    pub fn mark_changed(&mut self) {
        self.changed = true;
        self.dirty_since.get_or_insert_with(Instant::now);
    }

    /// `attrs` (the catalog's) as this file has them now: the size and times of buffered
    /// writes and the attributes a setattr left here.
    pub fn overlay(&self, attrs: &mut Attrs) {
        attrs.size = self.size;
        attrs.mtime = self.mtime;
        attrs.ctime = self.ctime;
        if let Some(held) = self.held {
            attrs.perm = held.perm;
            attrs.uid = held.uid;
            attrs.gid = held.gid;
            attrs.atime = held.atime;
        }
    }

    /// Keeps a setattr's outcome `attrs` until the next flush stores it.
    pub fn hold(&mut self, attrs: &Attrs) {
        self.mtime = attrs.mtime;
        self.ctime = attrs.ctime;
        self.held = Some(HeldAttrs {
            perm: attrs.perm,
            uid: attrs.uid,
            gid: attrs.gid,
            atime: attrs.atime,
        });
        self.mark_changed();
    }
}

/// The attributes besides size and times that a file's state holds for the catalog.
#[derive(Clone, Copy, Debug)]
pub(super) struct HeldAttrs {
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub atime: i64,
}

/// Whether catalog block `idx` may be used: not cut off by a pending truncate to
/// `truncated_to`, not in a `punched` range (see `FileState`).
pub(super) fn catalog_block_valid(
    truncated_to: Option<u64>,
    punched: &BTreeMap<u64, u64>,
    idx: u64,
    block_size: u64,
) -> bool {
    punched_at(punched, idx).is_none() && truncated_to.is_none_or(|t| idx < t.div_ceil(block_size))
}

/// The range of `punched` holding `idx`, if any.
fn punched_at(punched: &BTreeMap<u64, u64>, idx: u64) -> Option<(u64, u64)> {
    let (&first, &end) = punched.range(..=idx).next_back()?;
    (idx < end).then_some((first, end))
}

pub(super) type SharedState = Arc<Mutex<FileState>>;

/// A file's state and how many are working on it.
struct Tracked {
    state: SharedState,
    pins: usize,
}

/// What a file handle refers to: a live regular file's state, or nothing to track (a
/// file in a snapshot, a directory opened for reading...).
struct Handle {
    file: Option<(u64, SharedState)>,
}

pub(super) struct OpenFiles {
    files: Mutex<HashMap<u64, Tracked>>,
    handles: Mutex<HashMap<u64, Handle>>,
    next_handle: AtomicU64,
    /// Bytes buffered over all files.
    dirty_bytes: AtomicU64,
    /// Past it, writers flush before they buffer more.
    dirty_limit: u64,
    /// Past it, the background flusher is woken.
    flush_ahead: u64,
    flush_signal: Arc<FlushSignal>,
}

/// Wakes the background flusher when buffers pass `OpenFiles::flush_ahead`.
#[derive(Default)]
pub struct FlushSignal {
    raised: Mutex<bool>,
    condvar: Condvar,
}

impl FlushSignal {
    fn raise(&self) {
        *lock(&self.raised) = true;
        self.condvar.notify_one();
    }

    /// Waits until raised (then lowers it again) or for `timeout`.
    pub fn wait(&self, timeout: Duration) {
        let mut raised = lock(&self.raised);
        if !*raised {
            raised = wait_timeout(&self.condvar, raised, timeout);
        }
        *raised = false;
    }
}

/// A file state pinned for as long as this lives: lock it through `lock`, and let the
/// state's guard go before this does (unpinning locks the state).
pub(super) struct PinnedFile<'a> {
    files: &'a OpenFiles,
    ino: u64,
    state: SharedState,
    /// False once the pin moved into a file handle.
    armed: bool,
}

impl PinnedFile<'_> {
    pub fn lock(&self) -> MutexGuard<'_, FileState> {
        lock(&self.state)
    }

    pub fn ino(&self) -> u64 {
        self.ino
    }
}

impl Drop for PinnedFile<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.files.unpin(self.ino, &self.state);
        }
    }
}

impl OpenFiles {
    pub fn new(dirty_limit: u64) -> OpenFiles {
        OpenFiles {
            files: Mutex::new(HashMap::new()),
            handles: Mutex::new(HashMap::new()),
            next_handle: AtomicU64::new(1),
            dirty_bytes: AtomicU64::new(0),
            dirty_limit,
            flush_ahead: dirty_limit / FLUSH_AHEAD_FRACTION,
            flush_signal: Arc::default(),
        }
    }

    /// What the background flusher waits on (shared: it waits without holding the volume).
    pub fn flush_signal(&self) -> Arc<FlushSignal> {
        self.flush_signal.clone()
    }

    /// A pin on `state` (of `ino`), counted already in its `Tracked::pins`.
    fn pinned(&self, ino: u64, state: SharedState) -> PinnedFile<'_> {
        PinnedFile {
            files: self,
            ino,
            state,
            armed: true,
        }
    }

    /// Pins the state of live file `ino`, made by `load` if it has none.
    pub fn pin(
        &self,
        ino: u64,
        load: impl FnOnce() -> Result<FileState>,
    ) -> Result<PinnedFile<'_>> {
        if let Some(pinned) = self.pin_tracked(ino) {
            return Ok(pinned);
        }
        // Loaded without the map's lock (it reads the catalog); if another caller got there
        // first, its state is the one.
        let fresh = Arc::new(Mutex::new(load()?));
        let mut files = lock(&self.files);
        let tracked = files.entry(ino).or_insert(Tracked {
            state: fresh,
            pins: 0,
        });
        tracked.pins += 1;
        Ok(self.pinned(ino, tracked.state.clone()))
    }

    /// Pins the state of `ino` if it has one.
    pub fn pin_tracked(&self, ino: u64) -> Option<PinnedFile<'_>> {
        let mut files = lock(&self.files);
        let tracked = files.get_mut(&ino)?;
        tracked.pins += 1;
        Some(self.pinned(ino, tracked.state.clone()))
    }

    /// Pins every tracked state (a flush of all files).
    pub fn pin_all(&self) -> Vec<PinnedFile<'_>> {
        let mut files = lock(&self.files);
        files
            .iter_mut()
            .map(|(&ino, tracked)| {
                tracked.pins += 1;
                self.pinned(ino, tracked.state.clone())
            })
            .collect()
    }

    /// Forgets the state once no one works on it and it is clean.
    fn unpin(&self, ino: u64, state: &SharedState) {
        let state_guard = lock(state);
        let mut files = lock(&self.files);
        let Some(tracked) = files.get_mut(&ino) else {
            return;
        };
        tracked.pins = tracked.pins.saturating_sub(1);
        if tracked.pins == 0 && !state_guard.changed && Arc::ptr_eq(&tracked.state, state) {
            files.remove(&ino);
        }
    }

    /// The state of `ino` if it has one, not pinned: for readers, which tolerate it being
    /// forgotten meanwhile (it is then clean: the catalog says the same).
    pub fn peek(&self, ino: u64) -> Option<SharedState> {
        lock(&self.files).get(&ino).map(|t| t.state.clone())
    }

    /// Every tracked state, unpinned (see `peek`).
    pub fn peek_all(&self) -> Vec<SharedState> {
        lock(&self.files)
            .values()
            .map(|t| t.state.clone())
            .collect()
    }

    /// Whether live file `ino` is open or has unflushed changes: an unlinked file then
    /// lives on, unnamed, until its last release.
    pub fn is_tracked(&self, ino: u64) -> bool {
        lock(&self.files).contains_key(&ino)
    }

    /// A new handle on `file` (a pinned live file, counted open), or on nothing to track.
    pub fn add_handle(&self, file: Option<PinnedFile<'_>>) -> u64 {
        let file = file.map(|mut pinned| {
            pinned.lock().opens += 1;
            // The pin moves into the handle: `take_handle` gives it back.
            pinned.armed = false;
            (pinned.ino, pinned.state.clone())
        });
        let handle = self.next_handle.fetch_add(1, Ordering::Relaxed);
        lock(&self.handles).insert(handle, Handle { file });
        handle
    }

    /// Ends handle `handle`: its file, still pinned (until the result is dropped), or
    /// `None` for a handle on nothing. An unknown handle is an error.
    pub fn take_handle(&self, handle: u64) -> Option<Option<PinnedFile<'_>>> {
        let taken = lock(&self.handles).remove(&handle)?;
        Some(taken.file.map(|(ino, state)| self.pinned(ino, state)))
    }

    pub fn over_dirty_limit(&self) -> bool {
        self.dirty_bytes.load(Ordering::Relaxed) > self.dirty_limit
    }

    /// Whether the background flusher has work beyond the timer's.
    pub fn over_flush_ahead(&self) -> bool {
        self.dirty_bytes() > self.flush_ahead
    }

    /// Bytes buffered over all files.
    pub fn dirty_bytes(&self) -> u64 {
        self.dirty_bytes.load(Ordering::Relaxed)
    }

    /// `bytes` more are buffered in `state`; crossing `flush_ahead` wakes the flusher.
    pub fn add_dirty(&self, state: &mut FileState, bytes: u64) {
        state.buffered += bytes;
        let before = self.dirty_bytes.fetch_add(bytes, Ordering::Relaxed);
        if before <= self.flush_ahead && before + bytes > self.flush_ahead {
            self.flush_signal.raise();
        }
    }

    /// `bytes` fewer are buffered in `state`.
    pub fn sub_dirty(&self, state: &mut FileState, bytes: u64) {
        state.buffered -= bytes;
        self.dirty_bytes.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// Empties a file's buffers once flushed (or when no one can read them any more): the
    /// catalog's map of the file changed, so what reads loaded of it goes too.
    pub fn discard_buffers(&self, state: &mut FileState) {
        let buffered = state.buffered;
        self.sub_dirty(state, buffered);
        state.reads.forget_map();
        state.dirty.clear();
        state.held = None;
        state.truncated_to = None;
        state.punched.clear();
        state.changed = false;
        state.dirty_since = None;
    }
}
