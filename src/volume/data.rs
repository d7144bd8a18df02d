//! File data: per-file buffers of dirty blocks, reads through them, and flushing them into
//! the block store and the catalog.
//!
//! Invariant: no block (stored or buffered) holds bytes at or past the file's size, so a
//! file that grows reads zeros there without anyone writing them.

use std::sync::Arc;
use std::time::Duration;

use super::namespace::apply_setattr;
use super::open_files::{
    DirtyBlock, FileState, HashSlot, Hashed, HashedBlock, PinnedFile, catalog_block_valid,
};
use super::reads::ReadState;
use super::{Attr, Error, FileHandle, NodeId, Result, SetAttr, View, Volume, now};
use crate::blocks::{self, BlockHash};
use crate::catalog::{Kind, LIVE, NewBlock};
use crate::sync::{Mutex, lock};

/// A dirty block hashed and, unless small, written to the block store: what the catalog
/// needs to map it at its index.
type StagedBlock<'a> = (u64, &'a [u8], Hashed);

/// Whole dirty blocks the background flusher hashes and stores ahead of a file's flush,
/// so that a writer faster than that cannot keep the flush waiting.
const MAX_STORED_AHEAD: usize = 256;

/// Rounds of fetching a read's missing blocks before it runs with them local.
const FETCH_ROUNDS: usize = 3;

/// How often the background flusher looks for buffers older than its age when nothing
/// wakes it.
const FLUSHER_TICK: Duration = Duration::from_millis(500);

/// Told of a live node whose attributes changed outside any kernel request on it: a flush
/// (at close, by the timer, before a snapshot...) that stores a file's buffered blocks
/// changes its st_blocks, which the kernel may hold from a stat made before. The mount
/// drops the kernel's copy, so it may cache attributes for long.
pub type AttrsChanged = Box<dyn Fn(NodeId) + Send + Sync>;

/// Largest file size: offsets must fit in an off_t.
pub(super) const MAX_FILE_SIZE: u64 = i64::MAX as u64;

/// The bytes a read returns: `len` from file offset `start`, in blocks `first..=last`.
struct Span {
    start: u64,
    len: usize,
    first: u64,
    last: u64,
    /// The file's size.
    size: u64,
}

impl Span {
    /// The part of `offset..offset + len` before `size`; `None` if it is empty.
    fn of(offset: u64, len: u32, size: u64, block_size: u64) -> Option<Span> {
        let end = size.min(offset.saturating_add(u64::from(len)));
        (offset < end).then(|| Span {
            start: offset,
            len: (end - offset) as usize,
            first: offset / block_size,
            last: (end - 1) / block_size,
            size,
        })
    }
}

/// Copies the part of `block` (the block starting at file offset `block_start`) that falls
/// in `out` (which starts at file offset `out_start`).
fn copy_overlap(out: &mut [u8], out_start: u64, block_start: u64, block: &[u8]) {
    let from = out_start.max(block_start);
    let to = (out_start + out.len() as u64).min(block_start + block.len() as u64);
    if from < to {
        let len = (to - from) as usize;
        let dst = (from - out_start) as usize;
        let src = (from - block_start) as usize;
        out[dst..dst + len].copy_from_slice(&block[src..src + len]);
    }
}

impl Volume {
    /// Pins the state of live regular file `ino`, loading it from the catalog if needed.
    pub(super) fn pin_file(&self, ino: u64) -> Result<PinnedFile<'_>> {
        self.files.pin(ino, || {
            let row = self.row(NodeId::live(ino))?;
            match row.attrs.kind {
                Kind::File => Ok(FileState::new(&row)),
                Kind::Dir => Err(Error::IsDir),
                _ => Err(Error::Invalid("not a regular file")),
            }
        })
    }

    /// Opens a file for I/O and returns its handle. Writing into a snapshot is refused.
    pub fn open_file(&self, node: NodeId, write: bool) -> Result<FileHandle> {
        if node.view != View::Live {
            return if write {
                Err(Error::ReadOnly)
            } else {
                Ok(FileHandle(self.files.add_handle(None)))
            };
        }
        let row = self.row(node)?;
        if row.attrs.kind != Kind::File {
            return if row.attrs.kind == Kind::Dir && write {
                Err(Error::IsDir)
            } else {
                Ok(FileHandle(self.files.add_handle(None)))
            };
        }
        let pinned = self.pin_file(node.ino)?;
        Ok(FileHandle(self.files.add_handle(Some(pinned))))
    }

    /// Creates and opens a regular file.
    pub fn create(
        &self,
        parent: NodeId,
        name: &[u8],
        mode: u32,
        caller: super::Caller,
    ) -> Result<(Attr, FileHandle)> {
        let attr = self.mknod(parent, name, (mode & 0o7777) | libc::S_IFREG, 0, caller)?;
        let handle = self.open_file(attr.node, true)?;
        Ok((attr, handle))
    }

    /// Last close of one handle: flush, and free the file if it was unlinked meanwhile.
    pub fn release(&self, handle: FileHandle) -> Result<()> {
        let pinned = self
            .files
            .take_handle(handle.0)
            .ok_or(Error::Invalid("unknown file handle"))?;
        let Some(pinned) = pinned else {
            return Ok(());
        };
        let ino = pinned.ino();
        let (flushed, last) = {
            let mut state = pinned.lock();
            // Counted out first: the last close of an unlinked file drops its buffers
            // rather than storing what no one can read (see `flush_locked`).
            state.opens = state.opens.saturating_sub(1);
            (self.flush_locked(ino, &mut state), state.opens == 0)
        };
        drop(pinned);
        flushed?;
        // Unlinked while open: now it goes. Checked with a read, the common case.
        if last && self.is_unlinked(ino) {
            self.free_orphan(ino)?;
        }
        Ok(())
    }

    /// Whether live file `ino` has lost its last name (an orphan, kept while open).
    fn is_unlinked(&self, ino: u64) -> bool {
        self.row(NodeId::live(ino))
            .is_ok_and(|row| row.attrs.nlink == 0)
    }

    /// Retires an unlinked file at its last close and frees its blocks now: committed at
    /// once (as its unlink was), or the space would come back only after the group's
    /// commit, though a full disk is when it is wanted (blocks the background flusher
    /// stored are the file's like any others).
    fn free_orphan(&self, ino: u64) -> Result<()> {
        self.freeing(|| Ok(lock(&self.catalog).write_now(|tx| tx.retire_inode(ino))?))?;
        self.freeing(|| self.collect_garbage())
    }

    /// An unlinked file that no one has open but whose changes were never stored (its
    /// flush failed, as on a full disk) goes now, as at a last close: the flusher would
    /// free it only at its next pass, and a full disk is waiting for its blocks.
    pub(super) fn free_unopened_orphan(&self, ino: u64) -> Result<()> {
        if !self.is_unlinked(ino) {
            return Ok(());
        }
        let Some(pinned) = self.files.pin_tracked(ino) else {
            return Ok(());
        };
        {
            let mut state = pinned.lock();
            if state.opens > 0 {
                return Ok(());
            }
            // No one can read these bytes any more (see `flush_once`).
            self.files.discard_buffers(&mut state);
            self.remove_stored_ahead(&mut state, &[]);
        }
        drop(pinned);
        self.free_orphan(ino)
    }

    pub fn read(&self, node: NodeId, offset: u64, len: u32) -> Result<Vec<u8>> {
        // Blocks only the store has are fetched with the file's state unlocked: a fetch may
        // wait minutes on a store that is down, and writers, fsync and snapshots of the
        // file wait for that lock. The read itself then runs locked on local blocks.
        let mut failed: Option<(BlockHash, Error)> = None;
        for _ in 0..FETCH_ROUNDS {
            let missing = match self.read_from(node, offset, len, false)? {
                Ok(data) => return Ok(data),
                Err(missing) => missing,
            };
            if let Some((hash, e)) = failed.take()
                && missing.contains(&hash)
            {
                return Err(e);
            }
            // A failure counts only if the read still needs the block (a writer may have
            // replaced and freed it meanwhile).
            for hash in missing {
                if let Err(e) = self.blocks.block(&hash) {
                    failed = Some((hash, e));
                    break;
                }
            }
        }
        // Evicted again as fast as fetched (a cache smaller than one read): fetch locked.
        match self.read_from(node, offset, len, true)? {
            Ok(data) => Ok(data),
            Err(_) => unreachable!("a read that fetches misses no block"),
        }
    }

    /// Reads with the file's state (or a snapshot file's read state) locked. Unless
    /// `fetch`, a block that is neither in memory nor on the local disk is not fetched: the
    /// blocks missing are returned.
    fn read_from(
        &self,
        node: NodeId,
        offset: u64,
        len: u32,
        fetch: bool,
    ) -> Result<std::result::Result<Vec<u8>, Vec<BlockHash>>> {
        let view = self.view_generation(node.view)?;
        let load = |first, last| {
            Ok(lock(&self.catalog).read(|tx| tx.blocks_in_range(view, node.ino, first, last))?)
        };
        let size_of = || {
            let row = self.row(node)?;
            match row.attrs.kind {
                Kind::Dir => Err(Error::IsDir),
                _ => Ok(row.attrs.size),
            }
        };
        let bs = self.block_size;
        if node.view != View::Live {
            let file = self.snapshot_reads.file(view, node.ino, size_of)?;
            let file = &mut *lock(&file);
            let Some(span) = Span::of(offset, len, file.size, bs) else {
                return Ok(Ok(Vec::new()));
            };
            let mapped = file.reads.blocks(span.first, span.last, load)?;
            let out = self.read_blocks(&span, mapped, fetch)?;
            if out.is_ok() {
                self.read_ahead(&mut file.reads, &span, file.size, load, |_| true)?;
            }
            return Ok(out);
        }
        let Some(state) = self.files.peek(node.ino) else {
            // Not open (only the core's own callers read so): nothing to remember.
            let Some(span) = Span::of(offset, len, size_of()?, bs) else {
                return Ok(Ok(Vec::new()));
            };
            let mapped = load(span.first, span.last)?;
            return self.read_blocks(&span, mapped, fetch);
        };
        let FileState {
            size,
            dirty,
            truncated_to,
            punched,
            reads,
            ..
        } = &mut *lock(&state);
        let Some(span) = Span::of(offset, len, *size, bs) else {
            return Ok(Ok(Vec::new()));
        };
        // Buffered blocks, and catalog blocks a pending truncate cut off or a hole punched,
        // are not the catalog's to give.
        let from_catalog = |idx: u64| {
            !dirty.contains_key(&idx) && catalog_block_valid(*truncated_to, punched, idx, bs)
        };
        let mut mapped = reads.blocks(span.first, span.last, load)?;
        mapped.retain(|&(idx, _)| from_catalog(idx));
        let mut out = match self.read_blocks(&span, mapped, fetch)? {
            Ok(out) => out,
            missing => return Ok(missing),
        };
        for (&idx, block) in dirty.range(span.first..=span.last) {
            copy_overlap(&mut out, span.start, idx * bs, block.bytes());
        }
        self.read_ahead(reads, &span, *size, load, from_catalog)?;
        Ok(Ok(out))
    }

    /// Queues the blocks to read ahead of a read that succeeded (so counted once however
    /// many rounds it took), if it continues a sequential one.
    fn read_ahead(
        &self,
        reads: &mut ReadState,
        span: &Span,
        size: u64,
        load: impl FnMut(u64, u64) -> Result<Vec<(u64, BlockHash)>>,
        from_catalog: impl Fn(u64) -> bool,
    ) -> Result<()> {
        let end = span.start + span.len as u64;
        let window = self.read_ahead.window();
        if let Some(ahead) = reads.read_ahead(span.start, end, size, self.block_size, window) {
            for (idx, hash) in reads.blocks(*ahead.start(), *ahead.end(), load)? {
                if from_catalog(idx) {
                    self.read_ahead.load(hash);
                }
            }
        }
        Ok(())
    }

    /// Reads the parts of the `mapped` catalog blocks in `span` (the rest reads as zeros).
    /// Unless `fetch`, the blocks only a store has are returned instead.
    fn read_blocks(
        &self,
        span: &Span,
        mapped: Vec<(u64, BlockHash)>,
        fetch: bool,
    ) -> Result<std::result::Result<Vec<u8>, Vec<BlockHash>>> {
        let bs = self.block_size;
        let mut out = vec![0; span.len];
        let mut missing = Vec::new();
        for (idx, hash) in mapped {
            let from = span.start.max(idx * bs);
            let to = (span.start + span.len as u64).min((idx + 1) * bs);
            if from >= to {
                continue;
            }
            let part = &mut out[(from - span.start) as usize..(to - span.start) as usize];
            let in_block = (from - idx * bs) as usize;
            let block_len = (span.size - idx * bs).min(bs) as usize;
            self.read_ahead.wait_for(&hash);
            if fetch {
                self.blocks.read(&hash, block_len, in_block, part)?;
            } else if self
                .blocks
                .read_local(&hash, block_len, in_block, part)?
                .is_none()
            {
                missing.push(hash);
            }
        }
        Ok(if missing.is_empty() {
            Ok(out)
        } else {
            Err(missing)
        })
    }

    /// The current content of block `idx` as a starting point for a partial write.
    pub(super) fn block_for_update(
        &self,
        ino: u64,
        idx: u64,
        state: &FileState,
    ) -> Result<Vec<u8>> {
        let bs = self.block_size;
        if idx * bs >= state.size || !state.catalog_block_valid(idx, bs) {
            return Ok(Vec::new());
        }
        let mapped = lock(&self.catalog).read(|tx| tx.blocks_in_range(LIVE, ino, idx, idx))?;
        let Some((_, hash)) = mapped.first() else {
            return Ok(Vec::new());
        };
        let block = self.blocks.block(hash)?;
        let keep = ((state.size - idx * bs) as usize).min(block.len());
        Ok(block[..keep].to_vec())
    }

    pub fn write(&self, node: NodeId, offset: u64, data: &[u8]) -> Result<u32> {
        Self::writable(node)?;
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|&end| end <= MAX_FILE_SIZE)
            .ok_or(Error::FileTooBig)?;
        self.fetch_partly_written(node.ino, offset, end)?;
        let _change = self.enter_change();
        if self.files.over_dirty_limit() {
            // Buffers fill memory: bound it whatever the write pattern. Before buffering,
            // so that a write failing here (ENOSPC) has changed nothing.
            self.flush_all()?;
        }
        let pinned = self.pin_file(node.ino)?;
        let mut state = pinned.lock();
        self.buffer_write(node.ino, &mut state, offset, data)?;
        Ok(data.len() as u32)
    }

    /// Buffers `data` at `offset` in the state of live file `ino` (checked writable, the
    /// end within `MAX_FILE_SIZE`).
    pub(super) fn buffer_write(
        &self,
        ino: u64,
        state: &mut FileState,
        offset: u64,
        data: &[u8],
    ) -> Result<()> {
        let end = offset + data.len() as u64;
        let bs = self.block_size;
        let mut pos = offset;
        while pos < end {
            let idx = pos / bs;
            let in_block = (pos % bs) as usize;
            let n = ((bs - in_block as u64).min(end - pos)) as usize;
            if !state.dirty.contains_key(&idx) {
                let base = if in_block == 0 && n as u64 == bs {
                    Vec::with_capacity(n)
                } else {
                    self.block_for_update(ino, idx, state)?
                };
                self.files.add_dirty(state, base.len() as u64);
                state.dirty.insert(idx, DirtyBlock::new(base));
            }
            let block = state.dirty.get_mut(&idx).ok_or(Error::NotFound)?;
            let block = block.bytes_mut();
            let grown = (in_block + n).saturating_sub(block.len());
            let src = &data[(pos - offset) as usize..][..n];
            if in_block == block.len() {
                // Appending, the sequential case: one copy, no zero fill first.
                block.extend_from_slice(src);
            } else {
                if grown > 0 {
                    block.resize(in_block + n, 0);
                }
                block[in_block..in_block + n].copy_from_slice(src);
            }
            self.files.add_dirty(state, grown as u64);
            pos += n as u64;
        }
        state.size = state.size.max(end);
        let time = now();
        state.mtime = time;
        state.ctime = time;
        state.mark_changed();
        Ok(())
    }

    /// Makes local the blocks only a store has that a write of `[offset, end)` covers in
    /// part (it starts from their bytes), before the write takes the gate and the file's
    /// lock: a fetch may wait minutes on a store that is down, and snapshots and writers
    /// would wait with it. A failed fetch fails the write before it changes anything.
    pub(super) fn fetch_partly_written(&self, ino: u64, offset: u64, end: u64) -> Result<()> {
        if end == offset || !self.blocks.has_remote() {
            return Ok(());
        }
        let bs = self.block_size;
        let (first, last) = (offset / bs, (end - 1) / bs);
        let mut partial = Vec::new();
        if offset % bs != 0 || end < (first + 1) * bs {
            partial.push(first);
        }
        if last != first && end % bs != 0 {
            partial.push(last);
        }
        for idx in partial {
            if let Some(state) = self.files.peek(ino) {
                let state = lock(&state);
                if idx * bs >= state.size
                    || state.dirty.contains_key(&idx)
                    || !state.catalog_block_valid(idx, bs)
                {
                    continue;
                }
            }
            let mapped = lock(&self.catalog).read(|tx| tx.blocks_in_range(LIVE, ino, idx, idx))?;
            for (_, hash) in mapped {
                if self.blocks.local_block(&hash)?.is_none() {
                    self.blocks.block(&hash)?;
                }
            }
        }
        Ok(())
    }

    /// Sets the size of an open (or about to be flushed) file.
    pub(super) fn truncate_locked(&self, ino: u64, state: &mut FileState, size: u64) -> Result<()> {
        if size > MAX_FILE_SIZE {
            return Err(Error::FileTooBig);
        }
        let bs = self.block_size;
        if size < state.size {
            let tail = (size % bs) as usize;
            let tail_idx = size / bs;
            if tail != 0 && !state.dirty.contains_key(&tail_idx) {
                let base = self.block_for_update(ino, tail_idx, state)?;
                self.files.add_dirty(state, base.len() as u64);
                state.dirty.insert(tail_idx, DirtyBlock::new(base));
            }
            let beyond = state.dirty.split_off(&size.div_ceil(bs));
            let mut freed: u64 = beyond.values().map(|b| b.len() as u64).sum();
            if let Some(block) = state.dirty.get_mut(&tail_idx)
                && tail != 0
                && block.len() > tail
            {
                freed += (block.len() - tail) as u64;
                block.bytes_mut().truncate(tail);
            }
            self.files.sub_dirty(state, freed);
            state.truncated_to = Some(state.truncated_to.map_or(size, |t| t.min(size)));
        }
        if size != state.size {
            state.size = size;
            let time = now();
            state.mtime = time;
            state.ctime = time;
            state.mark_changed();
        }
        Ok(())
    }

    /// setattr of a regular file: size goes through its buffers; the rest waits in them
    /// while they hold writes, and goes to the catalog otherwise.
    pub(super) fn setattr_file(&self, ino: u64, set: SetAttr) -> Result<Attr> {
        let pinned = self.pin_file(ino)?;
        let mut state = pinned.lock();
        if set.size.is_none() && state.changed {
            // Mode, owner and times join the buffered writes they follow and are stored by
            // the same flush: tar's chown, chmod and utimens of each file it writes cost no
            // catalog write of their own. A crash loses them with those writes, never alone.
            let mut row = self.row(NodeId::live(ino))?;
            state.overlay(&mut row.attrs);
            apply_setattr(&mut row, &set, now());
            state.hold(&row.attrs);
            return Ok(Attr::from_row(View::Live, &row));
        }
        if let Some(size) = set.size {
            self.truncate_locked(ino, &mut state, size)?;
        }
        self.flush_locked(ino, &mut state)?;
        let row = lock(&self.catalog).write(|tx| {
            let mut row = tx.inode(LIVE, ino)?.ok_or(Error::NotFound)?;
            apply_setattr(&mut row, &set, now());
            tx.update_inode(&row)?;
            Ok::<_, Error>(row)
        })?;
        state.mtime = row.attrs.mtime;
        state.ctime = row.attrs.ctime;
        Ok(Attr::from_row(View::Live, &row))
    }

    /// Sets what hears of attributes changed behind the kernel's back (once: a mount).
    pub fn on_attrs_changed(&self, changed: AttrsChanged) {
        if self.attrs_changed.set(changed).is_err() {
            tracing::warn!("on_attrs_changed called twice: the first one stays");
        }
    }

    /// Writes a file's buffered changes to the block store and the catalog, in one
    /// transaction. On failure the buffers stay, so nothing is lost and a later flush
    /// retries. On a full data dir the oldest checkpoints go first, then the oldest
    /// snapshots of the recycle bin, one at a time, before the writer sees ENOSPC.
    pub(super) fn flush_locked(&self, ino: u64, state: &mut FileState) -> Result<()> {
        loop {
            match self.flush_once(ino, state) {
                Err(e)
                    if e.errno() == libc::ENOSPC
                        && (self.drop_oldest_checkpoint()? || self.purge_oldest_trash()?) => {}
                result => return result,
            }
        }
    }

    fn flush_once(&self, ino: u64, state: &mut FileState) -> Result<()> {
        if !state.changed {
            // Another flush may have come first: it adopted what was stored ahead, or not.
            self.remove_stored_ahead(state, &[]);
            return Ok(());
        }
        if state.opens == 0 && self.is_unlinked(ino) {
            // Unlinked and closed (at its last release, or later if a full disk made that
            // flush fail): no one can read these bytes any more, and storing them could
            // only fill the disk again.
            self.files.discard_buffers(state);
            self.remove_stored_ahead(state, &[]);
            return self.free_orphan(ino);
        }
        let adopting = crate::sync::read(&self.gc);
        // Only a flush after the flusher stored blocks ahead needs to know what it adopts.
        let stored_ahead = !state.stored_ahead.is_empty();
        let blocks: Vec<(u64, &[u8], Option<&HashSlot>)> = state
            .dirty
            .iter()
            .map(|(&idx, block)| (idx, block.bytes(), block.hash_slot().map(|slot| &**slot)))
            .collect();
        let bs = self.block_size;
        let flushed = self.store_blocks(blocks).and_then(|staged| {
            let adopted: Vec<BlockHash> = if stored_ahead {
                staged
                    .iter()
                    .filter_map(|(_, _, block)| block.as_ref().map(|block| block.hash))
                    .collect()
            } else {
                Vec::new()
            };
            let changed = lock(&self.catalog).write(|tx| {
                let mut row = tx.inode(LIVE, ino)?.ok_or(Error::NotFound)?;
                let before = row.alloc;
                let mut alloc = row.alloc as i64;
                if let Some(size) = state.truncated_to {
                    alloc += tx.unmap_blocks_from(ino, size.div_ceil(bs))?;
                }
                for (&first, &end) in &state.punched {
                    alloc += tx.unmap_block_range(ino, first, end - 1)?;
                }
                for (idx, data, block) in &staged {
                    let block = block.as_ref().map(|block| NewBlock {
                        hash: &block.hash,
                        len: data.len() as u32,
                        inline: block.inline.then_some(*data),
                        pieces: block.pieces.as_deref(),
                    });
                    alloc += tx.set_block(ino, *idx, block)?;
                }
                state.overlay(&mut row.attrs);
                row.alloc = alloc.max(0) as u64;
                tx.update_inode(&row)?;
                Ok::<_, Error>(row.alloc != before)
            })?;
            Ok((changed, adopted))
        });
        drop(adopting);
        let allocation_changed = match flushed {
            Ok((changed, adopted)) => {
                self.remove_stored_ahead(state, &adopted);
                changed
            }
            Err(e) => {
                // The blocks this flush stored but the catalog never adopted would hold their
                // space for good: on a full disk, all the space deleting files gives back.
                let hashes: Vec<BlockHash> = state
                    .dirty
                    .values()
                    .map(DirtyBlock::bytes)
                    .filter(|block| block.iter().any(|&b| b != 0))
                    .map(BlockHash::of)
                    .chain(std::mem::take(&mut state.stored_ahead))
                    .collect();
                self.remove_unadopted(&hashes)?;
                return Err(e);
            }
        };
        // Size and times were reported from the buffers already; st_blocks was not. Told
        // under the file's lock, before the request that flushed returns, so a stat after
        // close(2) sees the blocks: dropping cached attributes never waits for a request.
        if allocation_changed && let Some(changed) = self.attrs_changed.get() {
            changed(NodeId::live(ino));
        }
        self.files.discard_buffers(state);
        crate::metrics::flushed();
        // Under the file's lock: one batch (an overwrite frees about what it wrote).
        self.collect_garbage_batches(1)
    }

    /// Deletes the data of blocks a failed flush stored that the catalog does not know.
    /// With the exclusive GC lock no other flush is between storing a block and adopting
    /// it, so a block the catalog lacks is no one's.
    fn remove_unadopted(&self, hashes: &[BlockHash]) -> Result<()> {
        if hashes.is_empty() {
            return Ok(());
        }
        let _exclusive = crate::sync::write(&self.gc);
        for hash in hashes {
            if !lock(&self.catalog).read(|tx| tx.has_block(hash))? {
                self.blocks.local().remove(hash)?;
            }
        }
        Ok(())
    }

    /// Removes the block files stored ahead of this file's flushes (`store_unlocked`) that
    /// no flush adopted: `adopted` (the blocks of the flush that just ran) surely did;
    /// `remove_unadopted` asks the catalog of the others. A failure is only logged: the
    /// flush itself did its work, and `snapfs verify --repair` removes what is left.
    fn remove_stored_ahead(&self, state: &mut FileState, adopted: &[BlockHash]) {
        let mut ahead = std::mem::take(&mut state.stored_ahead);
        if ahead.is_empty() {
            return;
        }
        let adopted: std::collections::HashSet<&BlockHash> = adopted.iter().collect();
        ahead.retain(|hash| !adopted.contains(hash));
        if let Err(e) = self.remove_unadopted(&ahead) {
            tracing::warn!(error = %e, "cannot remove block files stored ahead of a flush");
        }
    }

    /// Hashes a dirty block for the store: `None` if it is all zeros (a hole); else its
    /// hash and piece values, and whether it is small enough for the catalog
    /// (`blocks::is_inline`).
    fn hash_block(data: &[u8]) -> Hashed {
        if data.iter().all(|&b| b == 0) {
            return None;
        }
        let (hash, pieces) = blocks::hash_and_pieces(data);
        let inline = blocks::is_inline(data.len());
        Some(HashedBlock {
            hash,
            pieces,
            inline,
        })
    }

    /// Stores dirty blocks (all-zero ones become holes, small ones go to the catalog),
    /// hashing those the background flusher did not hash ahead. A block it is hashing
    /// meanwhile (its slot still empty) is waited for, not hashed twice.
    fn store_blocks<'a>(
        &self,
        blocks: Vec<(u64, &'a [u8], Option<&HashSlot>)>,
    ) -> Result<Vec<StagedBlock<'a>>> {
        on_every_core(blocks, |(idx, data, slot)| {
            let hashed = match slot.and_then(HashSlot::wait) {
                Some(hashed) => hashed,
                None => Self::hash_block(data),
            };
            if let Some(block) = &hashed
                && !block.inline
            {
                self.blocks.local().put(&block.hash, data)?;
            }
            Ok((idx, data, hashed))
        })
    }

    /// The background flusher's work on a file before it flushes it: hashes its whole
    /// dirty blocks (`hash_block`) and writes their block files with the file unlocked, so
    /// that its writer goes on meanwhile and the flush under the lock finds that work done
    /// (its `put` finds each file in place); in rounds, while the writer adds whole
    /// blocks. A block still growing is left to the flush: the writer's next write to it
    /// would copy it. The files it wrote go into `FileState::stored_ahead`: a block the
    /// writer changes meanwhile is not adopted, and its file must not outlive the flush.
    fn store_unlocked(&self, pinned: &PinnedFile<'_>) {
        let bs = self.block_size as usize;
        let mut stored = 0;
        while stored < MAX_STORED_AHEAD {
            let todo: Vec<(Arc<Vec<u8>>, Arc<HashSlot>)> = pinned
                .lock()
                .dirty
                .values_mut()
                .filter(|block| block.len() == bs)
                .filter_map(DirtyBlock::hash_ahead)
                .take(MAX_STORED_AHEAD - stored)
                .collect();
            if todo.is_empty() {
                return;
            }
            stored += todo.len();
            let _filled = FillWhenDone(todo.iter().map(|(_, slot)| Arc::clone(slot)).collect());
            let done = on_every_core(todo, |(bytes, slot)| {
                let hashed = Self::hash_block(&bytes);
                let file = hashed
                    .as_ref()
                    .filter(|block| !block.inline)
                    .map(|b| b.hash);
                // Filled before the file is written: that write may wait for the disk's
                // write-back throttling, and a snapshot's flush waiting for this hash
                // must not (it writes the file itself if it comes first).
                slot.fill(Some(hashed));
                // A block whose file cannot be written (a full disk) is left to the flush,
                // which writes it again and reports the error.
                let written = file
                    .filter(|hash| self.blocks.local().put_and_write_back(hash, &bytes).is_ok());
                Ok(written)
            });
            let Ok(written) = done else {
                return;
            };
            pinned
                .lock()
                .stored_ahead
                .extend(written.into_iter().flatten());
        }
    }

    /// close(2) of one descriptor: what was written becomes visible to the catalog (and so
    /// to the next snapshot).
    pub fn flush(&self, node: NodeId) -> Result<()> {
        if node.view != View::Live {
            return Ok(());
        }
        let Some(state) = self.files.peek(node.ino) else {
            return Ok(());
        };
        self.flush_locked(node.ino, &mut lock(&state))
    }

    /// fsync(2): flush, then make it durable against a crash of the machine.
    pub fn fsync(&self, node: NodeId) -> Result<()> {
        self.flush(node)?;
        self.sync()
    }

    /// Makes everything flushed so far durable: blocks first, then the catalog naming them.
    pub(super) fn sync(&self) -> Result<()> {
        self.blocks.local().sync()?;
        let wal = lock(&self.catalog).commit_for_sync()?;
        wal.sync()?;
        Ok(())
    }

    pub fn flush_all(&self) -> Result<()> {
        self.flush_where(|_| true, false)
    }

    /// Flushes files whose oldest unflushed change is older than `age` (the timer's job).
    pub fn flush_older_than(&self, age: Duration) -> Result<()> {
        self.flush_where(
            |state| state.dirty_since.is_some_and(|t| t.elapsed() >= age),
            false,
        )
    }

    /// The background flusher's work ahead of one file's flush, alone: tests interleave it
    /// with the changes a writer makes before the flush.
    #[cfg(test)]
    pub(super) fn store_ahead_of_flush(&self, ino: u64) {
        if let Some(pinned) = self.files.pin_tracked(ino) {
            self.store_unlocked(&pinned);
        }
    }

    /// Flushes every file, each one's whole blocks hashed and stored first with it
    /// unlocked (`store_unlocked`): the background flusher's way, beside the writers.
    fn flush_behind(&self) -> Result<()> {
        self.flush_where(|_| true, true)
    }

    fn flush_where(&self, due: impl Fn(&FileState) -> bool, store_ahead: bool) -> Result<()> {
        let mut first_error = None;
        for pinned in self.files.pin_all() {
            if store_ahead {
                self.store_unlocked(&pinned);
            }
            let mut state = pinned.lock();
            if due(&state)
                && let Err(e) = self.flush_locked(pinned.ino(), &mut state)
            {
                tracing::warn!(ino = pinned.ino(), error = %e, "flush failed; the data stays buffered");
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Starts the background flusher: it flushes every file as soon as buffers pass
    /// `OpenFiles::flush_ahead` (so writers rarely reach the dirty limit, and a snapshot
    /// finds little left to flush while it holds them), and buffers a few seconds old, so
    /// a crash loses at most those seconds of unsynced writes. It ends when the volume is
    /// dropped.
    pub fn spawn_flusher(self: &Arc<Self>, age: Duration) -> std::io::Result<()> {
        let volume = Arc::downgrade(self);
        let signal = self.files.flush_signal();
        std::thread::Builder::new()
            .name("snapfs-flusher".into())
            .spawn(move || {
                loop {
                    signal.wait(FLUSHER_TICK);
                    let Some(volume) = volume.upgrade() else {
                        return;
                    };
                    // Until under the mark again, while rounds drain something: a failed
                    // flush (logged), or buffers no flush takes, wait for the next tick.
                    let mut left = volume.files.dirty_bytes();
                    while volume.files.over_flush_ahead() && volume.flush_behind().is_ok() {
                        let now = volume.files.dirty_bytes();
                        if now >= left {
                            break;
                        }
                        left = now;
                    }
                    let _ = volume.flush_older_than(age);
                }
            })?;
        Ok(())
    }

    /// Starts a thread that runs `job` every `every` until the volume is dropped.
    pub(super) fn spawn_periodic(
        self: &Arc<Self>,
        name: &str,
        every: Duration,
        job: impl Fn(&Volume) + Send + 'static,
    ) -> std::io::Result<()> {
        let volume = Arc::downgrade(self);
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                loop {
                    std::thread::sleep(every);
                    let Some(volume) = volume.upgrade() else {
                        return;
                    };
                    job(&volume);
                }
            })?;
        Ok(())
    }
}

/// Fills with `None` the slots a round of hashing ahead left empty, however it ended (a
/// hashing thread panicked): a flush waits on each slot, and on `None` hashes the block
/// itself.
struct FillWhenDone(Vec<Arc<HashSlot>>);

impl Drop for FillWhenDone {
    fn drop(&mut self) {
        for slot in &self.0 {
            slot.fill(None);
        }
    }
}

/// `work` on each of `items`, results in order, on every core when there are many: hashing
/// is the write path's main CPU cost.
fn on_every_core<T: Send, R: Send>(
    items: Vec<T>,
    work: impl Fn(T) -> Result<R> + Sync,
) -> Result<Vec<R>> {
    if items.len() < 8 {
        return items.into_iter().map(work).collect();
    }
    // Asked only here: it reads cgroup files, which cost more than a small flush.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    if threads < 2 {
        return items.into_iter().map(work).collect();
    }
    let queue = Mutex::new(items.into_iter().enumerate());
    let drain = || {
        let mut done = Vec::new();
        loop {
            let next = lock(&queue).next();
            let Some((at, item)) = next else {
                return done;
            };
            done.push((at, work(item)));
        }
    };
    let mut done = std::thread::scope(|scope| {
        // A thread that cannot be had leaves its share to the others.
        let helpers: Vec<_> = (1..threads)
            .filter_map(|_| std::thread::Builder::new().spawn_scoped(scope, drain).ok())
            .collect();
        let mut done = drain();
        for helper in helpers {
            let helped = helper
                .join()
                .map_err(|_| Error::Invalid("block hashing thread panicked"))?;
            done.extend(helped);
        }
        Ok::<_, Error>(done)
    })?;
    done.sort_unstable_by_key(|&(at, _)| at);
    done.into_iter().map(|(_, result)| result).collect()
}

#[cfg(test)]
mod tests {
    use super::{Arc, FillWhenDone, HashSlot, copy_overlap};

    /// A round of hashing ahead that panics leaves no slot empty: a flush waiting on one
    /// would wait forever. A slot already filled keeps its hash.
    #[test]
    fn a_round_that_panics_fills_its_empty_slots_with_none() {
        let (hashed, empty) = (Arc::new(HashSlot::default()), Arc::new(HashSlot::default()));
        hashed.fill(Some(None));
        let slots = vec![Arc::clone(&hashed), Arc::clone(&empty)];
        let round = std::panic::catch_unwind(move || {
            let _filled = FillWhenDone(slots);
            panic!("a hashing thread panicked");
        });
        assert!(round.is_err());
        assert!(matches!(hashed.wait(), Some(None)), "the hash made stays");
        let (sender, waited) = std::sync::mpsc::channel();
        std::thread::spawn(move || sender.send(empty.wait()));
        let waited = waited.recv_timeout(std::time::Duration::from_secs(10));
        assert!(
            matches!(waited, Ok(None)),
            "the empty slot says: hash it yourself"
        );
    }

    #[test]
    fn copy_overlap_clips_both_ends() {
        let mut out = [0u8; 4];
        copy_overlap(&mut out, 10, 8, b"abcdefgh");
        assert_eq!(&out, b"cdef");
        let mut out = [9u8; 4];
        copy_overlap(&mut out, 10, 12, b"xy");
        assert_eq!(&out, b"\x09\x09xy");
        let mut out = [0u8; 2];
        copy_overlap(&mut out, 0, 4, b"zz");
        assert_eq!(&out, b"\0\0");
    }
}
