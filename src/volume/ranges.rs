//! Operations on byte ranges of files: fallocate (allocate, punch a hole, zero a range),
//! SEEK_DATA/SEEK_HOLE, and copy_file_range, which shares whole blocks between files
//! instead of copying their bytes (a reflink: the destination's block map names the same
//! blocks; their reference counts, uploads and GC see one more reference).
//!
//! Holes cost nothing here: a block never written, punched or all zeros is unmapped. So
//! punching and zeroing unmap whole blocks (and zero the partial ones at the edges), data
//! is what is mapped or buffered, and allocating only sets the size after checking that
//! the data dir has room for the range.

use super::data::MAX_FILE_SIZE;
use super::open_files::{DirtyBlock, FileState};
use super::{Error, NodeId, Result, View, Volume, now};
use crate::catalog::{Kind, LIVE};
use crate::sync::lock;

/// Most bytes one copy_file_range moves (the kernel's reply counts in 32 bits): a multiple
/// of every block size, so that a long copy goes on block-aligned.
pub const MAX_COPY: u64 = 1 << 30;

/// Bytes read and written at a time by a copy that cannot share blocks.
const COPY_CHUNK: u64 = 1 << 20;

/// A copy_file_range(2) request: `len` bytes of `src` from `src_offset` to `dst` at
/// `dst_offset`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CopyRange {
    pub src: NodeId,
    pub src_offset: u64,
    pub dst: NodeId,
    pub dst_offset: u64,
    pub len: u64,
}

/// What a fallocate(2) mode asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fallocate {
    Allocate,
    PunchHole,
    ZeroRange,
}

impl Fallocate {
    /// The operation of `mode` and whether it keeps the size; the modes ext4 refuses
    /// without KEEP_SIZE too (as the VFS does), and those snapfs lacks, are EOPNOTSUPP.
    fn parse(mode: i32) -> Result<(Fallocate, bool)> {
        let keep_size = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let op = match mode & !libc::FALLOC_FL_KEEP_SIZE {
            0 => Fallocate::Allocate,
            libc::FALLOC_FL_PUNCH_HOLE if keep_size => Fallocate::PunchHole,
            libc::FALLOC_FL_PUNCH_HOLE => {
                return Err(Error::NotSupported(
                    "punching a hole needs FALLOC_FL_KEEP_SIZE",
                ));
            }
            libc::FALLOC_FL_ZERO_RANGE => Fallocate::ZeroRange,
            _ => {
                return Err(Error::NotSupported(
                    "fallocate mode (collapse, insert and unshare ranges are not supported)",
                ));
            }
        };
        Ok((op, keep_size))
    }
}

impl Volume {
    /// fallocate(2) of `len` bytes at `offset` with `mode` (Linux's FALLOC_FL_* bits).
    pub fn fallocate(&self, node: NodeId, offset: u64, len: u64, mode: i32) -> Result<()> {
        let (op, keep_size) = Fallocate::parse(mode)?;
        Self::writable(node)?;
        if len == 0 || offset > i64::MAX as u64 {
            return Err(Error::Invalid("fallocate of an empty or negative range"));
        }
        let end = offset
            .checked_add(len)
            .filter(|&end| end <= MAX_FILE_SIZE)
            .ok_or(Error::FileTooBig)?;
        if op != Fallocate::Allocate {
            self.fetch_partly_written(node.ino, offset, end)?;
        }
        let _change = self.enter_change();
        let pinned = self.pin_file(node.ino)?;
        let mut state = pinned.lock();
        let ino = node.ino;
        if op != Fallocate::PunchHole {
            self.check_room(ino, offset, end)?;
        }
        if op != Fallocate::Allocate {
            let zero_end = end.min(state.size);
            self.zero_locked(ino, &mut state, offset, zero_end)?;
        }
        if !keep_size && end > state.size {
            self.truncate_locked(ino, &mut state, end)?;
        }
        // At once, so st_blocks shows the space a punch gave back.
        self.flush_locked(ino, &mut state)
    }

    /// Refuses to allocate `offset..end` of `ino` when the data dir lacks room for the
    /// part of it that no block backs yet: later writes there would fail with ENOSPC,
    /// which is what fallocate promises they will not (as far as a store that shares
    /// blocks between files and snapshots can promise it).
    fn check_room(&self, ino: u64, offset: u64, end: u64) -> Result<()> {
        let bs = self.block_size;
        let mapped = lock(&self.catalog)
            .read(|tx| tx.count_mapped_blocks(LIVE, ino, offset / bs, (end - 1) / bs))?;
        let needed = (end - offset).saturating_sub(mapped * bs);
        let stat = super::statvfs(&self.dir).map_err(|source| Error::DataDir {
            path: self.dir.clone(),
            source,
        })?;
        if needed > stat.f_bavail.saturating_mul(stat.f_frsize) {
            return Err(Error::NoSpace);
        }
        Ok(())
    }

    /// Makes `start..end` (within the size) of an open file read as zeros: whole blocks
    /// are punched out (their buffers dropped, their catalog blocks unmapped at the next
    /// flush), the partial blocks at the edges are zeroed in buffers.
    fn zero_locked(&self, ino: u64, state: &mut FileState, start: u64, end: u64) -> Result<()> {
        if start >= end {
            return Ok(());
        }
        let bs = self.block_size;
        let first_whole = start.div_ceil(bs);
        // The last block of the file counts as whole when the range reaches the end.
        let end_whole = if end == state.size {
            end.div_ceil(bs)
        } else {
            end / bs
        };
        if first_whole < end_whole {
            let dropped: Vec<u64> = state
                .dirty
                .range(first_whole..end_whole)
                .map(|(&idx, _)| idx)
                .collect();
            let mut freed = 0;
            for idx in dropped {
                freed += state.dirty.remove(&idx).map_or(0, |b| b.len() as u64);
            }
            self.files.sub_dirty(state, freed);
            state.punch(first_whole, end_whole);
        }
        let mut edges = Vec::new();
        if start % bs != 0 {
            edges.push((start / bs, start, end.min((start / bs + 1) * bs)));
        }
        let tail = end / bs;
        // The tail block, unless it is whole or the head block (when the range starts in it).
        if end % bs != 0 && first_whole.max(end_whole) <= tail {
            edges.push((tail, start.max(tail * bs), end));
        }
        for (idx, from, to) in edges {
            if !state.dirty.contains_key(&idx) {
                let base = self.block_for_update(ino, idx, state)?;
                self.files.add_dirty(state, base.len() as u64);
                state.dirty.insert(idx, DirtyBlock::new(base));
            }
            let block = state
                .dirty
                .get_mut(&idx)
                .ok_or(Error::NotFound)?
                .bytes_mut();
            let from = ((from - idx * bs) as usize).min(block.len());
            let to = ((to - idx * bs) as usize).min(block.len());
            block[from..to].fill(0);
        }
        let time = now();
        state.mtime = time;
        state.ctime = time;
        state.mark_changed();
        Ok(())
    }

    /// lseek(2) with SEEK_DATA or SEEK_HOLE: data is a block that is mapped or buffered,
    /// a hole everything else, and the end of the file a hole.
    pub fn lseek(&self, node: NodeId, offset: i64, whence: i32) -> Result<i64> {
        let data = match whence {
            libc::SEEK_DATA => true,
            libc::SEEK_HOLE => false,
            _ => {
                return Err(Error::Invalid(
                    "lseek: only SEEK_DATA and SEEK_HOLE come here",
                ));
            }
        };
        let view = self.view_generation(node.view)?;
        let state = match node.view {
            View::Live => self.files.peek(node.ino),
            View::Snapshot(_) => None,
        };
        let state = state.as_ref().map(|s| lock(s));
        let state = state.as_deref();
        let size = match state {
            Some(state) => state.size,
            None => self.file_row_size(node)?,
        };
        let Ok(offset) = u64::try_from(offset) else {
            return Err(Error::NoData);
        };
        if offset >= size {
            return Err(Error::NoData);
        }
        let bs = self.block_size;
        let from = offset / bs;
        let found = if data {
            self.next_data_block(view, node.ino, state, from)?
                .map(|idx| idx * bs)
                .filter(|&at| at < size)
                .ok_or(Error::NoData)?
        } else {
            (self.next_hole_block(view, node.ino, state, from)? * bs).min(size)
        };
        Ok(found.max(offset) as i64)
    }

    /// The first block at or after `from` holding data: buffered, or mapped and not stale.
    fn next_data_block(
        &self,
        view: u64,
        ino: u64,
        state: Option<&FileState>,
        from: u64,
    ) -> Result<Option<u64>> {
        let bs = self.block_size;
        let buffered = state.and_then(|s| s.dirty.range(from..).next().map(|(&idx, _)| idx));
        let catalog = lock(&self.catalog);
        let mut at = from;
        let mapped = loop {
            let valid = match state {
                Some(state) => state.next_valid(at, bs),
                None => Some(at),
            };
            let Some(valid) = valid else { break None };
            match catalog.read(|tx| tx.next_mapped_block(view, ino, valid))? {
                Some(idx) if state.is_none_or(|s| s.catalog_block_valid(idx, bs)) => {
                    break Some(idx);
                }
                // Stale: look again past the stale run it starts.
                Some(idx) => at = idx,
                None => break None,
            }
        };
        Ok(buffered.into_iter().chain(mapped).min())
    }

    /// The first block at or after `from` holding no data (past the last one at the end).
    fn next_hole_block(
        &self,
        view: u64,
        ino: u64,
        state: Option<&FileState>,
        from: u64,
    ) -> Result<u64> {
        let bs = self.block_size;
        let catalog = lock(&self.catalog);
        let mut idx = from;
        loop {
            if state.is_some_and(|s| s.dirty.contains_key(&idx)) {
                idx += 1;
                continue;
            }
            if state.is_some_and(|s| !s.catalog_block_valid(idx, bs)) {
                return Ok(idx);
            }
            let gap = catalog.read(|tx| tx.next_unmapped_block(view, ino, idx))?;
            if gap == idx {
                return Ok(idx);
            }
            // Mapped up to `gap`, unless part of that run is stale.
            let stale = state.and_then(|s| s.next_stale(idx, bs));
            idx = stale.map_or(gap, |stale| stale.min(gap));
        }
    }

    /// The size the catalog records for regular file `node` (no state: not open, or in a
    /// snapshot).
    fn file_row_size(&self, node: NodeId) -> Result<u64> {
        let row = self.row(node)?;
        match row.attrs.kind {
            Kind::File => Ok(row.attrs.size),
            Kind::Dir => Err(Error::IsDir),
            _ => Err(Error::Invalid("not a regular file")),
        }
    }

    /// The size of regular file `node`, unflushed writes included.
    fn file_size(&self, node: NodeId) -> Result<u64> {
        if node.view == View::Live
            && let Some(state) = self.files.peek(node.ino)
        {
            return Ok(lock(&state).size);
        }
        self.file_row_size(node)
    }

    /// copy_file_range(2) from `src` (live or in a snapshot) to live file `dst`. Where the
    /// two offsets are equally aligned in their blocks, whole blocks are shared: the
    /// destination maps the source's blocks (holes stay holes) in one transaction, and
    /// only the partial blocks at the edges are copied. Otherwise the bytes go through
    /// the data path. Returns the bytes copied: fewer than `len` at the source's end, and
    /// at most `MAX_COPY`.
    pub fn copy_range(&self, copy: CopyRange) -> Result<u32> {
        let CopyRange {
            src,
            src_offset,
            dst,
            dst_offset,
            len,
        } = copy;
        Self::writable(dst)?;
        let src_size = self.file_size(src)?;
        self.file_size(dst)?;
        if src_offset >= src_size || len == 0 {
            return Ok(0);
        }
        let len = len.min(src_size - src_offset).min(MAX_COPY);
        let dst_end = dst_offset
            .checked_add(len)
            .filter(|&end| end <= MAX_FILE_SIZE)
            .ok_or(Error::FileTooBig)?;
        if src == dst && src_offset < dst_end && dst_offset < src_offset + len {
            return Err(Error::Invalid(
                "copy between overlapping ranges of one file",
            ));
        }
        let bs = self.block_size;
        let head = ((bs - src_offset % bs) % bs).min(len);
        let whole = (len - head) / bs;
        let tail_at = src_offset + head + whole * bs;
        let tail = src_offset + len - tail_at;
        // The source's last block, partial, can be shared as a whole too (see below).
        let last_block = tail > 0 && tail_at + tail == src_size;
        if src_offset % bs != dst_offset % bs || (whole == 0 && !last_block) {
            return self.copy_bytes(CopyRange { len, ..copy });
        }
        if src.view == View::Live {
            // Every write that returned before is in the catalog, where sharing reads.
            self.flush(src)?;
        }
        // Read before the destination's state is locked: it may be the source's.
        let head_bytes = self.read(src, src_offset, head as u32)?;
        let tail_bytes = self.read(src, tail_at, tail as u32)?;
        let dst_tail_at = dst_offset + head + whole * bs;
        self.fetch_partly_written(dst.ino, dst_offset, dst_offset + head)?;
        self.fetch_partly_written(dst.ino, dst_tail_at, dst_end)?;
        let view = self.view_generation(src.view)?;

        let _change = self.enter_change();
        let pinned = self.pin_file(dst.ino)?;
        let mut state = pinned.lock();
        // Sharing writes the catalog directly: nothing buffered may be applied over it.
        self.flush_locked(dst.ino, &mut state)?;
        // A partial last block is shared only where nothing of the destination follows it
        // (its bytes past the copy would be lost otherwise).
        let share_tail = last_block && state.size <= dst_end;
        let blocks = whole + u64::from(share_tail);
        if blocks > 0 {
            let first = (src_offset + head) / bs;
            let to = (dst_offset + head) / bs;
            let shared_end = if share_tail { dst_end } else { dst_tail_at };
            let time = now();
            let row = lock(&self.catalog).write(|tx| {
                let mut row = tx.inode(LIVE, dst.ino)?.ok_or(Error::NotFound)?;
                let alloc =
                    tx.share_blocks(view, src.ino, first, first + blocks - 1, dst.ino, to)?;
                row.alloc = (row.alloc as i64 + alloc).max(0) as u64;
                row.attrs.size = state.size.max(shared_end);
                row.attrs.mtime = time;
                row.attrs.ctime = time;
                tx.update_inode(&row)?;
                Ok::<_, Error>(row)
            })?;
            state.size = row.attrs.size;
            state.mtime = time;
            state.ctime = time;
            // The map changed outside a flush: reads must load it again.
            state.reads.forget_map();
            self.collect_garbage_batches(1)?;
        }
        if !head_bytes.is_empty() {
            self.buffer_write(dst.ino, &mut state, dst_offset, &head_bytes)?;
        }
        if !share_tail && !tail_bytes.is_empty() {
            self.buffer_write(dst.ino, &mut state, dst_tail_at, &tail_bytes)?;
        }
        Ok(len as u32)
    }

    /// A copy through the data path: read, then write, a chunk at a time.
    fn copy_bytes(&self, copy: CopyRange) -> Result<u32> {
        let mut done = 0;
        while done < copy.len {
            let chunk = (copy.len - done).min(COPY_CHUNK) as u32;
            let copied = self
                .read(copy.src, copy.src_offset + done, chunk)
                .and_then(|data| self.write(copy.dst, copy.dst_offset + done, &data));
            match copied {
                Ok(0) => break,
                Ok(n) => done += u64::from(n),
                // What was copied stays copied, as a short write(2) reports.
                Err(_) if done > 0 => break,
                Err(e) => return Err(e),
            }
        }
        Ok(done as u32)
    }
}
