//! The local content-addressed block store (`DATA/blocks/`) and its in-memory read cache.
//!
//! A block is a file named by the BLAKE3 hash of its content, written to a temporary name
//! and renamed into place, so a crash leaves either no block or a whole one. Every read is
//! checked against the name: a mismatch is [`BlockError::Corrupt`], never wrong data, and
//! the next `put` of the block's bytes (a fetch from the store, the same data written
//! again) replaces the damaged file.
//!
//! Hashing once: verifying a block whole also yields the BLAKE3 chaining values of its
//! 16 KiB pieces (subtrees of its hash tree), kept in memory (`Pieces`). A later small read
//! of that block reads and hashes only the pieces it touches, checked against their
//! values: as safe as checking the whole block against its name, at a fraction of the
//! cost. The flush that writes a block computes the values of its 4 KiB pieces while it
//! hashes; the catalog keeps them (`hash_and_pieces`), so the first small read of a block
//! after a mount can adopt them (`adopt_pieces`, checked against the name first) and read
//! a page, not the whole block.

use std::collections::HashSet;
use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::sync::{Mutex, MutexGuard, lock};

use blake3::hazmat::{
    ChainingValue, HasherExt, Mode, left_subtree_len, merge_subtrees_non_root, merge_subtrees_root,
};
use lru::LruCache;

/// BLAKE3 hash of a block's content: its name everywhere.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockHash([u8; 32]);

impl BlockHash {
    pub fn of(data: &[u8]) -> BlockHash {
        BlockHash(*blake3::hash(data).as_bytes())
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn to_hex(self) -> String {
        blake3::Hash::from_bytes(self.0).to_hex().to_string()
    }

    /// Parses 64 hex digits; `None` for anything else.
    pub fn from_hex(hex: &str) -> Option<BlockHash> {
        blake3::Hash::from_hex(hex)
            .ok()
            .map(|h| BlockHash(*h.as_bytes()))
    }
}

impl TryFrom<&[u8]> for BlockHash {
    type Error = std::array::TryFromSliceError;
    fn try_from(bytes: &[u8]) -> Result<Self, Self::Error> {
        Ok(BlockHash(bytes.try_into()?))
    }
}

impl fmt::Debug for BlockHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", &self.to_hex()[..16])
    }
}

impl fmt::Display for BlockHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("block {hash} is missing from the local store")]
    Missing { hash: BlockHash },
    #[error("block {hash} is corrupt: its content hashes to {actual}")]
    Corrupt { hash: BlockHash, actual: BlockHash },
    #[error("block {hash} is corrupt: its bytes at offset {offset} differ from those verified")]
    CorruptPiece { hash: BlockHash, offset: usize },
    #[error("block {hash} is not local and the store failed: {message}")]
    Fetch { hash: BlockHash, message: String },
    #[error("block store I/O on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

impl BlockError {
    fn io(path: &Path, source: io::Error) -> BlockError {
        BlockError::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// Length of the pieces whose values the flush keeps: a page, so a 4 KiB read of a block
/// after a mount reads 4 KiB (a cold 16 KiB read took 65 us on this disk, 4 KiB 40 us).
/// Pieces are a power of two of BLAKE3 chunks, so each is a subtree of the block's hash
/// tree.
pub const PIECE: usize = 4 * 1024;

/// Length of the pieces of a block verified whole in memory: 16 chunks, which BLAKE3
/// hashes side by side (AVX-512), so their values cost little over the hash alone (57
/// against 51 us per 256 KiB block; 4 KiB pieces, hashed 4 chunks at a time, 90 us).
/// Catalogs of schema 11 kept values of pieces this long: they are still adopted.
pub const WIDE_PIECE: usize = 16 * 1024;

/// For each block kept whole in memory, the pieces of this many more are remembered: at 256
/// KiB blocks, 64 MiB of cache remembers 2 GiB of blocks in under 17 MiB.
const PIECES_PER_CACHED_BLOCK: usize = 32;

/// The chaining values of the pieces of a block (only blocks longer than one piece have
/// them: a shorter one is read whole anyway), each piece `size` bytes but the last.
struct Pieces {
    len: usize,
    size: usize,
    values: Box<[ChainingValue]>,
}

impl Pieces {
    /// The hash of `data` and, if it is longer than a piece of `size`, its pieces' chaining
    /// values. The hash is computed from those values: one pass over the bytes for both.
    fn of(data: &[u8], size: usize) -> (BlockHash, Option<Pieces>) {
        if data.len() <= size {
            return (BlockHash::of(data), None);
        }
        let values: Box<[ChainingValue]> = data
            .chunks(size)
            .enumerate()
            .map(|(i, piece)| subtree_value(i * size, piece))
            .collect();
        let pieces = Pieces {
            len: data.len(),
            size,
            values,
        };
        (pieces.root(), Some(pieces))
    }

    /// The root hash the pieces make: BLAKE3's left-balanced tree, whose subtrees at or
    /// below a piece's size are the pieces themselves.
    fn root(&self) -> BlockHash {
        let len = self.len as u64;
        let left = left_subtree_len(len);
        let hash = merge_subtrees_root(
            &self.subtree(0, left),
            &self.subtree(left, len - left),
            Mode::Hash,
        );
        BlockHash(*hash.as_bytes())
    }

    fn subtree(&self, offset: u64, len: u64) -> ChainingValue {
        if len <= self.size as u64 {
            return self.values[(offset / self.size as u64) as usize];
        }
        let left = left_subtree_len(len);
        merge_subtrees_non_root(
            &self.subtree(offset, left),
            &self.subtree(offset + left, len - left),
            Mode::Hash,
        )
    }
}

/// Bytes of one piece's chaining value in `Pieces::encode`.
pub const PIECE_VALUE_LEN: usize = 32;

impl Pieces {
    /// The values as the catalog keeps them: each piece's, in order.
    fn encode(&self) -> Vec<u8> {
        self.values.iter().flatten().copied().collect()
    }

    /// The pieces of a block of `len` bytes from `encoded` (of `PIECE`s, or of
    /// `WIDE_PIECE`s as schema 11 kept them: the count of values tells which), if they
    /// make `hash`: anything else (a damaged or hostile catalog) is refused, and the block
    /// is then read whole. A `len` wrong by less than its last piece makes the same tree;
    /// reading that piece then fails its own check (too few or too many bytes), so no read
    /// returns wrong bytes.
    fn decode(hash: &BlockHash, len: usize, encoded: &[u8]) -> Option<Pieces> {
        let size = [PIECE, WIDE_PIECE]
            .into_iter()
            .find(|&size| len > size && encoded.len() == len.div_ceil(size) * PIECE_VALUE_LEN)?;
        let values = encoded
            .chunks_exact(PIECE_VALUE_LEN)
            .map(|value| value.try_into().ok())
            .collect::<Option<Box<[ChainingValue]>>>()?;
        let pieces = Pieces { len, size, values };
        (pieces.root() == *hash).then_some(pieces)
    }

    /// Checks `bytes`, the block's bytes from `start` (where a piece starts) to where a
    /// piece ends, against the values. Each largest subtree of the hash tree that they
    /// cover is hashed in one pass, so a long read is hashed as fast as a whole block.
    /// The offset of the first piece that differs, if one does.
    fn check(&self, start: usize, bytes: &[u8]) -> Result<(), usize> {
        self.check_subtree(0, self.len, start, bytes)
    }

    fn check_subtree(
        &self,
        offset: usize,
        len: usize,
        start: usize,
        bytes: &[u8],
    ) -> Result<(), usize> {
        let end = start + bytes.len();
        if offset + len <= start || end <= offset {
            return Ok(());
        }
        let covered = start <= offset && offset + len <= end;
        if covered {
            let value = subtree_value(offset, &bytes[offset - start..offset + len - start]);
            if value == self.subtree(offset as u64, len as u64) {
                return Ok(());
            }
        }
        if len <= self.size {
            // A piece that differs, or that `bytes` cover only in part (cut short).
            return Err(offset);
        }
        let left = left_subtree_len(len as u64) as usize;
        self.check_subtree(offset, left, start, bytes)?;
        self.check_subtree(offset + left, len - left, start, bytes)?;
        // A subtree that differs has a piece that does; reached only if it did not.
        if covered { Err(offset) } else { Ok(()) }
    }
}

/// The hash of a block's `data` and, if it is longer than a piece, its pieces' chaining
/// values as the catalog keeps them: one pass over the bytes for both.
pub fn hash_and_pieces(data: &[u8]) -> (BlockHash, Option<Vec<u8>>) {
    let (hash, pieces) = Pieces::of(data, PIECE);
    (hash, pieces.map(|pieces| pieces.encode()))
}

/// Whether a read of `len` bytes from `offset` into a block of `block_len` bytes could be
/// served from fewer pieces than the whole block: worth adopting the catalog's values
/// first. (A block of one piece has none; a read of all of a block reads it whole.)
pub fn reads_part(offset: usize, len: usize, block_len: usize) -> bool {
    block_len > PIECE && (offset > 0 || len < block_len)
}

/// The chaining value of the subtree of a block's hash tree that starts at `offset` and
/// whose bytes are `bytes`.
fn subtree_value(offset: usize, bytes: &[u8]) -> ChainingValue {
    blake3::Hasher::new()
        .set_input_offset(offset as u64)
        .update(bytes)
        .finalize_non_root()
}

pub struct BlockStore {
    dir: PathBuf,
    cache: Mutex<LruCache<BlockHash, Arc<Vec<u8>>>>,
    /// Pieces of blocks verified whole, for reads of parts of them (a leaf lock).
    pieces: Mutex<LruCache<BlockHash, Arc<Pieces>>>,
    /// Unique suffix for temporary files of concurrent writers.
    next_temp: AtomicU64,
    /// Blocks written since the last `sync`, which makes them durable.
    unsynced: Mutex<Unsynced>,
    /// Held through a `sync`: a second caller waits for the first, whose set may hold its
    /// blocks, rather than find the set empty and return before they are durable.
    syncing: Mutex<()>,
    /// Blocks whose file a read found damaged (a leaf lock): the next `put` of their
    /// bytes replaces the file, where a file of the right length would otherwise stand.
    damaged: Mutex<HashSet<BlockHash>>,
}

/// Blocks written since the last sync: their paths, up to `SYNC_EACH_LIMIT`; past it only
/// that there were more (one syncfs covers them all), so a million small files written
/// without an fsync cost no memory here.
#[derive(Default)]
struct Unsynced {
    paths: Vec<PathBuf>,
    many: bool,
}

impl Unsynced {
    fn push(&mut self, path: PathBuf) {
        // Once is enough (a block stored ahead is found again by its flush's put).
        if self.many || self.paths.contains(&path) {
            return;
        }
        if self.paths.len() == SYNC_EACH_LIMIT {
            self.paths = Vec::new();
            self.many = true;
        } else {
            self.paths.push(path);
        }
    }

    /// Puts back what a failed sync took.
    fn restore(&mut self, failed: Unsynced) {
        if failed.many {
            *self = failed;
        } else {
            failed.paths.into_iter().for_each(|path| self.push(path));
        }
    }
}

/// Blocks of at most this many bytes (a small file, the tail of a larger one) live in the
/// catalog beside the map row naming them, not in a file of their own: a block file costs
/// a create, a write, a rename and later a sync, half of a small file's create. 3 KiB with
/// its hash still fits one leaf of the catalog's 4 KiB pages (btrfs inlines up to 2 KiB).
pub const INLINE_MAX: usize = 3 << 10;

/// Whether a block of `len` bytes lives in the catalog rather than a file (`INLINE_MAX`).
pub fn is_inline(len: usize) -> bool {
    len <= INLINE_MAX
}

/// Starts writing `len` bytes of `file` at `offset` to the disk, without waiting (0 means
/// to its end): the disk then works while the caller goes on, and the sync that makes the
/// data durable finds little left. A failure here only costs that overlap: the sync
/// writes these pages again and reports their errors.
pub fn start_write_back(file: &fs::File, offset: u64, len: u64) {
    // SAFETY: plain system call on an open descriptor.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        )
    };
}

/// Writes a new block file's bytes, starting their write-back if `write_back`.
fn write_block_file(file: &mut fs::File, data: &[u8], write_back: bool) -> io::Result<()> {
    file.write_all(data)?;
    if write_back {
        start_write_back(file, 0, 0);
    }
    Ok(())
}

/// Writes `data` to an unnamed file in `path`'s own shard (O_TMPFILE) and links it in
/// whole: a crash leaves no temporary name behind, and concurrent flushes do not queue
/// on one shared directory. (Through `tmp`, every block's create and rename took that
/// directory's lock, and its inodes all came from one place on the disk, where ext4
/// searched past every block file deleted in the last seconds: 45% of a streaming
/// writer's daemon CPU, docs/benchmarks.md.) EEXIST: another flush stored the same bytes.
fn put_unnamed(path: &Path, data: &[u8], write_back: bool) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let shard = path.parent().unwrap_or(path);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .mode(0o644)
        .custom_flags(libc::O_TMPFILE)
        .open(shard)?;
    write_block_file(&mut file, data, write_back)?;
    let unnamed = std::ffi::CString::new(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .map_err(io::Error::other)?;
    let named =
        std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    // SAFETY: both paths are NUL-terminated strings that live across the call.
    let linked = unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            unnamed.as_ptr(),
            libc::AT_FDCWD,
            named.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    };
    match linked {
        0 => Ok(()),
        _ => match io::Error::last_os_error() {
            e if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
            e => Err(e),
        },
    }
}

/// Whether `put_unnamed` failed for want of O_TMPFILE (the file system) or of /proc
/// (to link the file by), rather than for the write itself.
fn unnamed_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::EISDIR | libc::EINVAL | libc::ENOENT)
    )
}

/// Above this many unsynced blocks one syncfs beats a journal commit per file.
const SYNC_EACH_LIMIT: usize = 64;

/// Threads that sync block files and their directories together (`BlockStore::sync`).
const MAX_SYNC_THREADS: usize = 16;

impl BlockStore {
    /// Opens the store in `dir`, creating it if needed. `cache_blocks` bounds the read cache.
    pub fn open(dir: &Path, cache_blocks: usize) -> Result<BlockStore, BlockError> {
        let temp = dir.join("tmp");
        fs::create_dir_all(&temp).map_err(|e| BlockError::io(&temp, e))?;
        // Temporaries of a crashed run were never renamed into place, and files the GC moved
        // here (`detach`) were freed: nothing refers to them.
        for entry in fs::read_dir(&temp).map_err(|e| BlockError::io(&temp, e))? {
            let entry = entry.map_err(|e| BlockError::io(&temp, e))?;
            let _ = fs::remove_file(entry.path());
        }
        // All 256 shards up front, so a write never has to create one.
        for shard in 0..=255u8 {
            let shard = dir.join(format!("{shard:02x}"));
            fs::create_dir_all(&shard).map_err(|e| BlockError::io(&shard, e))?;
        }
        Ok(BlockStore {
            dir: dir.to_owned(),
            cache: Mutex::new(bounded(cache_blocks)),
            pieces: Mutex::new(bounded(
                cache_blocks.saturating_mul(PIECES_PER_CACHED_BLOCK),
            )),
            next_temp: AtomicU64::new(0),
            unsynced: Mutex::default(),
            syncing: Mutex::default(),
            damaged: Mutex::default(),
        })
    }

    /// Opens the store of a volume that may be mounted by another process, for reading
    /// only: nothing on disk is created or cleaned up.
    pub fn open_read_only(dir: &Path) -> BlockStore {
        BlockStore {
            dir: dir.to_owned(),
            cache: Mutex::new(bounded(1)),
            pieces: Mutex::new(bounded(1)),
            next_temp: AtomicU64::new(0),
            unsynced: Mutex::default(),
            syncing: Mutex::default(),
            damaged: Mutex::default(),
        }
    }

    fn path_of(&self, hash: &BlockHash) -> PathBuf {
        let hex = hash.to_hex();
        self.dir.join(&hex[..2]).join(&hex)
    }

    /// Stores `data` under `hash` unless it is already there. The caller computed `hash`.
    /// The bytes go to the disk when the kernel writes back or at the next sync.
    pub fn put(&self, hash: &BlockHash, data: &[u8]) -> Result<(), BlockError> {
        self.put_as(hash, data, false)
    }

    /// `put`, and a new file's write-back started at once (`start_write_back`): a
    /// streaming writer's blocks then reach the disk while it writes, where the kernel
    /// would hold them until its dirty thresholds or the fsync (a 1 GiB write + fsync spent
    /// 0.3 s in the fsync writing them all; docs/benchmarks.md, "Block files start their
    /// write-back at once"). Starting it may wait for the disk's write-back throttling
    /// (`wbt_wait`), so it is for callers that hold no lock: the background flusher
    /// storing whole blocks ahead of a flush. Flushes, which hold a file's lock and which
    /// snapshots wait for, use `put`.
    pub fn put_and_write_back(&self, hash: &BlockHash, data: &[u8]) -> Result<(), BlockError> {
        self.put_as(hash, data, true)
    }

    fn put_as(&self, hash: &BlockHash, data: &[u8], write_back: bool) -> Result<(), BlockError> {
        let path = self.path_of(hash);
        let damaged = self.is_damaged(hash);
        let stored = match fs::metadata(&path) {
            // Found, but perhaps just linked by another writer (the background flusher
            // storing ahead) that has not yet recorded it as unsynced: recorded here too,
            // so that a sync after this put makes durable the file this caller relies on.
            Ok(file) if file.len() == data.len() as u64 && !damaged => {
                crate::sync::lock(&self.unsynced).push(path);
                return Ok(());
            }
            // A copy cut short (by a power loss) or found damaged must not stand for these
            // bytes: replaced in one rename, so that a good copy another flush linked
            // meanwhile is never removed, only replaced by the same bytes.
            Ok(_) => self.put_renamed(&path, data, write_back),
            Err(_) => match put_unnamed(&path, data, write_back) {
                Err(e) if unnamed_unsupported(&e) => self.put_renamed(&path, data, write_back),
                stored => stored,
            },
        };
        stored.map_err(|e| BlockError::io(&path, e))?;
        if damaged {
            lock(&self.damaged).remove(hash);
            crate::metrics::block_healed();
            tracing::info!(%hash, "a damaged block file is replaced by a good copy");
        }
        crate::sync::lock(&self.unsynced).push(path);
        Ok(())
    }

    /// Writes `data` to a temporary file in `tmp` and renames it to `path`: for file
    /// systems without O_TMPFILE (see `put_unnamed`).
    fn put_renamed(&self, path: &Path, data: &[u8], write_back: bool) -> io::Result<()> {
        let temp = self.dir.join("tmp").join(format!(
            "{}.{}",
            std::process::id(),
            self.next_temp.fetch_add(1, Ordering::Relaxed)
        ));
        let write = || -> io::Result<()> {
            let mut file = fs::File::create(&temp)?;
            write_block_file(&mut file, data, write_back)?;
            drop(file);
            fs::rename(&temp, path)
        };
        write().inspect_err(|_| {
            let _ = fs::remove_file(&temp);
        })
    }

    /// Reads and verifies a block.
    pub fn get(&self, hash: &BlockHash) -> Result<Arc<Vec<u8>>, BlockError> {
        if let Some(data) = self.lock_cache().get(hash) {
            return Ok(data.clone());
        }
        // Arc<Vec> keeps the buffer fs::read made: no second copy on the read path.
        let data = self.read_file(hash)?;
        let (actual, pieces) = Pieces::of(&data, WIDE_PIECE);
        self.check(hash, actual)?;
        if let Some(pieces) = pieces {
            lock(&self.pieces).put(*hash, Arc::new(pieces));
        }
        let data = Arc::new(data);
        self.lock_cache().put(*hash, data.clone());
        Ok(data)
    }

    /// Whether a part of block `hash` can be read without reading all of it: the block is
    /// in memory, or its pieces are.
    pub fn knows_pieces(&self, hash: &BlockHash) -> bool {
        self.lock_cache().contains(hash) || lock(&self.pieces).contains(hash)
    }

    /// Remembers the pieces of block `hash` (`len` bytes) from `encoded`, as
    /// `hash_and_pieces` made them, if they make that hash. Whether they did.
    pub fn adopt_pieces(&self, hash: &BlockHash, len: usize, encoded: &[u8]) -> bool {
        let Some(pieces) = Pieces::decode(hash, len, encoded) else {
            return false;
        };
        lock(&self.pieces).put(*hash, Arc::new(pieces));
        true
    }

    /// Keeps `data`, verified by the caller as block `hash`, in the memory cache.
    pub fn cache_verified(&self, hash: &BlockHash, data: Arc<Vec<u8>>) {
        self.lock_cache().put(*hash, data);
    }

    /// Copies the bytes of block `hash` from `offset` into `out`, verified, and returns how
    /// many there were (a block may end before `out` does). A block verified whole before
    /// is read only in the pieces `out` covers; any other is read and verified whole.
    pub fn read_into(
        &self,
        hash: &BlockHash,
        offset: usize,
        out: &mut [u8],
    ) -> Result<usize, BlockError> {
        let cached = self.lock_cache().get(hash).cloned();
        let pieces = match cached {
            Some(data) => return Ok(copy_from(&data, offset, out)),
            None => lock(&self.pieces).get(hash).cloned(),
        };
        let Some(pieces) = pieces else {
            return Ok(copy_from(&self.get(hash)?, offset, out));
        };
        let end = pieces.len.min(offset + out.len());
        if offset >= end {
            return Ok(0);
        }
        let size = pieces.size;
        let (first, last) = (offset / size, (end - 1) / size);
        let start = first * size;
        let mut bytes = vec![0; pieces.len.min((last + 1) * size) - start];
        let path = self.path_of(hash);
        let read =
            fs::File::open(&path).and_then(|file| file.read_exact_at(&mut bytes, start as u64));
        match read {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(BlockError::Missing { hash: *hash });
            }
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(self.corrupt_piece(hash, &path, start));
            }
            Err(e) => return Err(BlockError::io(&path, e)),
        }
        if let Err(bad) = pieces.check(start, &bytes) {
            return Err(self.corrupt_piece(hash, &path, bad));
        }
        let len = end - offset;
        out[..len].copy_from_slice(&bytes[offset - start..end - start]);
        Ok(len)
    }

    fn corrupt_piece(&self, hash: &BlockHash, path: &Path, offset: usize) -> BlockError {
        tracing::error!(%hash, offset, path = %path.display(), "corrupt block");
        self.found_damaged(hash);
        BlockError::CorruptPiece {
            hash: *hash,
            offset,
        }
    }

    /// Reads and verifies block `hash`: `inline`, its bytes as the catalog keeps a small
    /// block (see [`INLINE_MAX`]), else its file. Leaves the cache alone (for bulk readers
    /// such as the uploader, which would only evict what users read).
    pub fn read_uncached(
        &self,
        hash: &BlockHash,
        inline: Option<Vec<u8>>,
    ) -> Result<Vec<u8>, BlockError> {
        if let Some(data) = inline {
            let damaged = match self.check(hash, BlockHash::of(&data)) {
                Ok(()) => return Ok(data),
                Err(damaged) => damaged,
            };
            // A file `verify --repair` wrote from the store stands in for a damaged copy
            // in the catalog, as it does on the read path.
            return self
                .read_file(hash)
                .ok()
                .filter(|data| BlockHash::of(data) == *hash)
                .ok_or(damaged);
        }
        let data = self.read_file(hash)?;
        self.check(hash, BlockHash::of(&data))?;
        Ok(data)
    }

    /// The bytes of block `hash`'s file, unverified.
    fn read_file(&self, hash: &BlockHash) -> Result<Vec<u8>, BlockError> {
        let path = self.path_of(hash);
        match fs::read(&path) {
            Ok(data) => Ok(data),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Err(BlockError::Missing { hash: *hash })
            }
            Err(e) => Err(BlockError::io(&path, e)),
        }
    }

    /// Fails unless the bytes read as block `hash` hash to it (`actual`).
    fn check(&self, hash: &BlockHash, actual: BlockHash) -> Result<(), BlockError> {
        if actual == *hash {
            return Ok(());
        }
        tracing::error!(%hash, %actual, path = %self.path_of(hash).display(), "corrupt block");
        self.found_damaged(hash);
        Err(BlockError::Corrupt {
            hash: *hash,
            actual,
        })
    }

    /// Whether a read found block `hash` damaged and no `put` has replaced it since.
    pub fn is_damaged(&self, hash: &BlockHash) -> bool {
        lock(&self.damaged).contains(hash)
    }

    /// Remembers that a read found block `hash` damaged, for the next `put` to replace.
    fn found_damaged(&self, hash: &BlockHash) {
        crate::metrics::block_damaged();
        lock(&self.damaged).insert(*hash);
    }

    /// The length of block `hash`'s file, `None` if there is none.
    pub fn len_of(&self, hash: &BlockHash) -> Option<u64> {
        fs::metadata(self.path_of(hash)).ok().map(|m| m.len())
    }

    /// Block files whose hash is not in `known`: written by a process that died before
    /// it could record them in the catalog. Only meaningful while nothing writes blocks.
    pub fn strays(&self, known: &HashSet<BlockHash>) -> Result<Vec<PathBuf>, BlockError> {
        let mut strays = Vec::new();
        for shard in 0..=255u8 {
            let shard = self.dir.join(format!("{shard:02x}"));
            let entries = match fs::read_dir(&shard) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                result => result.map_err(|e| BlockError::io(&shard, e))?,
            };
            for entry in entries {
                let path = entry.map_err(|e| BlockError::io(&shard, e))?.path();
                let hash = path
                    .file_name()
                    .and_then(|name| name.to_str())
                    .and_then(BlockHash::from_hex);
                if hash.is_none_or(|hash| !known.contains(&hash)) {
                    strays.push(path);
                }
            }
        }
        Ok(strays)
    }

    /// Deletes a block no one references any more.
    pub fn remove(&self, hash: &BlockHash) -> Result<(), BlockError> {
        self.lock_cache().pop(hash);
        delete_file(&self.path_of(hash))
    }

    /// Moves the file of a block no one references any more out of the store, into `tmp`
    /// (emptied at open), for `delete_detached` to delete. A rename is quick; an unlink
    /// waits for the disk to discard the file's extents (milliseconds each with `-o
    /// discard`). So the GC renames while it holds its exclusive lock, which flushes wait
    /// for, and unlinks after. `None`: nothing left to delete.
    pub fn detach(&self, hash: &BlockHash) -> Result<Option<PathBuf>, BlockError> {
        self.lock_cache().pop(hash);
        let path = self.path_of(hash);
        let detached = self
            .dir
            .join("tmp")
            .join(format!("freed-{}", hash.to_hex()));
        match fs::rename(&path, &detached) {
            Ok(()) => Ok(Some(detached)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            // No room for the new name (a full disk): delete it in place, the slow way.
            Err(_) => delete_file(&path).map(|()| None),
        }
    }

    /// Makes every block written so far durable: each file and its directory entry, or,
    /// when many are pending, the data dir's whole filesystem at once.
    pub fn sync(&self) -> Result<(), BlockError> {
        let _syncing = lock(&self.syncing);
        let pending = std::mem::take(&mut *crate::sync::lock(&self.unsynced));
        let result = self.sync_paths(&pending);
        if result.is_err() {
            // Still not durable: the next sync must try them again.
            crate::sync::lock(&self.unsynced).restore(pending);
        }
        result
    }

    /// Whether every block written so far is synced.
    #[cfg(test)]
    pub(crate) fn all_synced(&self) -> bool {
        let unsynced = lock(&self.unsynced);
        unsynced.paths.is_empty() && !unsynced.many
    }

    fn sync_paths(&self, pending: &Unsynced) -> Result<(), BlockError> {
        if pending.many {
            let dir = fs::File::open(&self.dir).map_err(|e| BlockError::io(&self.dir, e))?;
            // SAFETY: syncfs only reads the descriptor, which `dir` keeps open for the call.
            if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
                return Err(BlockError::io(&self.dir, io::Error::last_os_error()));
            }
            return Ok(());
        }
        // Files and directories are synced together, on up to 16 threads: the journal
        // commits once for syncs that wait together, and the disk's cache flushes merge.
        // One after the other, each paid a commit or a flush in series: 30 ms for the 8
        // blocks of a 2 MiB file and their directories, against 5 ms through bindfs.
        let mut targets: Vec<&Path> = pending.paths.iter().map(PathBuf::as_path).collect();
        let dirs: std::collections::BTreeSet<&Path> =
            targets.iter().filter_map(|path| path.parent()).collect();
        targets.extend(dirs);
        let sync_one = |path: &Path| match fs::File::open(path).and_then(|f| f.sync_all()) {
            // Freed since it was written: nothing left to make durable.
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            result => result.map_err(|e| BlockError::io(path, e)),
        };
        let sync_all = |chunk: &[&Path]| chunk.iter().try_for_each(|&path| sync_one(path));
        if targets.len() < 2 {
            return sync_all(&targets);
        }
        std::thread::scope(|scope| {
            let mut inline = Ok(());
            let mut syncs = Vec::new();
            for chunk in targets.chunks(targets.len().div_ceil(MAX_SYNC_THREADS)) {
                match std::thread::Builder::new().spawn_scoped(scope, move || sync_all(chunk)) {
                    Ok(sync) => syncs.push(sync),
                    // No thread to be had: this one syncs the chunk itself.
                    Err(_) => inline = inline.and_then(|()| sync_all(chunk)),
                }
            }
            let joined = syncs.into_iter().try_for_each(|sync| {
                sync.join().unwrap_or_else(|_| {
                    let panicked = io::Error::other("a sync thread panicked");
                    Err(BlockError::io(&self.dir, panicked))
                })
            });
            joined.and(inline)
        })
    }

    fn lock_cache(&self) -> MutexGuard<'_, LruCache<BlockHash, Arc<Vec<u8>>>> {
        lock(&self.cache)
    }
}

/// Deletes the files `BlockStore::detach` moved out of the store.
pub fn delete_detached(paths: &[PathBuf]) -> Result<(), BlockError> {
    paths.iter().try_for_each(|path| delete_file(path))
}

/// Deletes `path`; already gone is no error.
fn delete_file(path: &Path) -> Result<(), BlockError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(BlockError::io(path, e)),
        _ => Ok(()),
    }
}

/// An LRU cache of at most `entries` (at least one).
fn bounded<V>(entries: usize) -> LruCache<BlockHash, V> {
    LruCache::new(std::num::NonZeroUsize::new(entries).unwrap_or(std::num::NonZeroUsize::MIN))
}

/// Copies `block` from `offset` into `out`; how many bytes it had there.
pub fn copy_from(block: &[u8], offset: usize, out: &mut [u8]) -> usize {
    let part = block.get(offset..).unwrap_or_default();
    let len = part.len().min(out.len());
    out[..len].copy_from_slice(&part[..len]);
    len
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_get_verifies_and_detects_corruption() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = BlockStore::open(dir.path(), 4).expect("open");
        let data = b"hello block".to_vec();
        let hash = BlockHash::of(&data);
        store.put(&hash, &data).expect("put");
        assert_eq!(&*store.get(&hash).expect("get"), &data[..]);

        // Damage the file behind the cache's back: a fresh store must refuse it.
        fs::write(store.path_of(&hash), b"hellO block").expect("damage");
        let fresh = BlockStore::open(dir.path(), 4).expect("reopen");
        assert!(matches!(fresh.get(&hash), Err(BlockError::Corrupt { .. })));

        store.remove(&hash).expect("remove");
        assert!(matches!(fresh.get(&hash), Err(BlockError::Missing { .. })));
    }

    /// Pages of `path` the kernel holds dirty (not yet sent to the disk): cachestat(2),
    /// Linux 6.5, whose number is the same on every architecture.
    fn dirty_pages(path: &Path) -> u64 {
        #[repr(C)]
        struct Range {
            off: u64,
            len: u64,
        }
        #[repr(C)]
        #[derive(Default)]
        struct Stat {
            nr_cache: u64,
            nr_dirty: u64,
            nr_writeback: u64,
            nr_evicted: u64,
            nr_recently_evicted: u64,
        }
        const SYS_CACHESTAT: libc::c_long = 451;
        let file = fs::File::open(path).expect("open the block file");
        let whole = Range { off: 0, len: 0 };
        let mut stat = Stat::default();
        // SAFETY: both structs are laid out as the kernel's and live across the call.
        let done = unsafe { libc::syscall(SYS_CACHESTAT, file.as_raw_fd(), &whole, &mut stat, 0) };
        assert_eq!(done, 0, "cachestat: {}", io::Error::last_os_error());
        stat.nr_dirty
    }

    /// A block file stored by `put_and_write_back` is on its way to the disk when it
    /// returns, none of its pages left dirty, so an fsync after a streaming write finds
    /// little to write; one stored by `put` is left to the kernel's write-back.
    #[test]
    fn put_and_write_back_starts_the_write_back_put_leaves_it_to_the_kernel() {
        let dir = tempfile::tempdir().expect("tempdir");
        // SAFETY: statfs fills the zeroed struct; the path is NUL-terminated.
        let on_tmpfs = unsafe {
            let path = std::ffi::CString::new(dir.path().as_os_str().as_encoded_bytes())
                .expect("a path without NUL");
            let mut fs: libc::statfs = std::mem::zeroed();
            libc::statfs(path.as_ptr(), &mut fs) == 0 && fs.f_type == libc::TMPFS_MAGIC
        };
        if on_tmpfs {
            eprintln!("skipped: tmpfs has no disk to write back to (set TMPDIR to a disk)");
            return;
        }
        let store = BlockStore::open(dir.path(), 4).expect("open");
        let (ahead, flushed) = (bytes(256 << 10), bytes(128 << 10));
        store
            .put_and_write_back(&BlockHash::of(&ahead), &ahead)
            .expect("put and write back");
        store.put(&BlockHash::of(&flushed), &flushed).expect("put");
        assert_eq!(dirty_pages(&store.path_of(&BlockHash::of(&ahead))), 0);
        assert!(dirty_pages(&store.path_of(&BlockHash::of(&flushed))) > 0);
    }

    /// A put that finds its block's file in place (another writer linked it and may not
    /// have recorded it yet) still leaves that file to the next sync: its caller's fsync
    /// relies on it.
    #[test]
    fn a_put_that_finds_its_file_in_place_leaves_it_to_the_next_sync() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = BlockStore::open(dir.path(), 4).expect("open");
        let data = bytes(9000);
        let hash = BlockHash::of(&data);
        fs::write(store.path_of(&hash), &data).expect("another writer's file");
        store.put(&hash, &data).expect("put");
        assert!(!store.all_synced(), "the file found is not left to a sync");
        store.sync().expect("sync");
        assert!(store.all_synced());
    }

    /// A file of the right length whose bytes are wrong stands until a read finds it
    /// damaged; the next put of the block's bytes then replaces it.
    #[test]
    fn the_next_put_replaces_a_block_file_a_read_found_damaged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = BlockStore::open(dir.path(), 4).expect("open");
        let data = bytes(9000);
        let hash = BlockHash::of(&data);
        let mut damaged = data.clone();
        damaged[4500] ^= 0x01;
        fs::write(store.path_of(&hash), &damaged).expect("a damaged file");
        store.put(&hash, &data).expect("put");
        assert!(
            fs::read(store.path_of(&hash)).expect("read") == damaged,
            "no read found it damaged yet"
        );
        assert!(matches!(store.get(&hash), Err(BlockError::Corrupt { .. })));
        store.put(&hash, &data).expect("put again");
        assert!(fs::read(store.path_of(&hash)).expect("read") == data);
        assert_eq!(&*store.get(&hash).expect("get"), &data[..]);
    }

    /// Both ways of storing a block leave the same thing: one file under the hash with
    /// the bytes, nothing in `tmp`, and a second store of the same bytes (a race of two
    /// flushes, or a block stored before) changes nothing.
    #[test]
    fn a_block_is_stored_whole_under_its_name_and_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = BlockStore::open(dir.path(), 4).expect("open");
        let (unnamed, renamed) = (bytes(5000), bytes(7000));
        let (hash_unnamed, hash_renamed) = (BlockHash::of(&unnamed), BlockHash::of(&renamed));
        put_unnamed(&store.path_of(&hash_unnamed), &unnamed, false).expect("put unnamed");
        store
            .put_renamed(&store.path_of(&hash_renamed), &renamed, true)
            .expect("put renamed");
        for (hash, data) in [(hash_unnamed, &unnamed), (hash_renamed, &renamed)] {
            assert_eq!(fs::read(store.path_of(&hash)).expect("block file"), *data);
            // Again, as a second flush of the same bytes would: the file stays as it was.
            put_unnamed(&store.path_of(&hash), data, false).expect("put unnamed again");
            assert_eq!(fs::read(store.path_of(&hash)).expect("block file"), *data);
            store.put(&hash, data).expect("put again");
        }
        let shard = store.path_of(&hash_unnamed);
        let shard = shard.parent().expect("shard");
        assert_eq!(fs::read_dir(shard).expect("shard").count(), 1);
        assert_eq!(
            fs::read_dir(dir.path().join("tmp")).expect("tmp").count(),
            0
        );
    }

    /// The GC's two steps: a detached block is gone from the store at once (a flush that
    /// stores the same bytes again writes a new file), its file is deleted by
    /// `delete_detached`, or by the next open if the process died between the two.
    #[test]
    fn a_detached_block_leaves_the_store_at_once_and_its_file_after() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = BlockStore::open(dir.path(), 4).expect("open");
        let (first, second) = (bytes(5000), bytes(6000));
        let (hash_first, hash_second) = (BlockHash::of(&first), BlockHash::of(&second));
        store.put(&hash_first, &first).expect("put first");
        store.put(&hash_second, &second).expect("put second");
        assert_eq!(store.get(&hash_first).expect("cached").as_slice(), first);

        let detached = store.detach(&hash_first).expect("detach").expect("a file");
        assert!(matches!(
            store.get(&hash_first),
            Err(BlockError::Missing { .. })
        ));
        assert_eq!(fs::read(&detached).expect("detached file"), first);
        store.put(&hash_first, &first).expect("stored again");
        assert_eq!(
            fs::read(store.path_of(&hash_first)).expect("new file"),
            first
        );
        delete_detached(std::slice::from_ref(&detached)).expect("delete");
        assert!(!detached.exists());
        assert_eq!(store.get(&hash_first).expect("read").as_slice(), first);
        assert_eq!(
            store
                .detach(&BlockHash::of(b"never stored"))
                .expect("absent"),
            None
        );

        // Died between the two: the next open deletes what was detached.
        let left = store.detach(&hash_second).expect("detach").expect("a file");
        drop(store);
        let reopened = BlockStore::open(dir.path(), 4).expect("reopen");
        assert!(!left.exists());
        assert!(matches!(
            reopened.get(&hash_second),
            Err(BlockError::Missing { .. })
        ));
        assert_eq!(reopened.get(&hash_first).expect("kept").as_slice(), first);
    }

    fn bytes(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    #[test]
    fn pieces_make_the_blake3_hash_at_every_length() {
        let lens = [1, 1024, 1025, PIECE - 1, PIECE, PIECE + 1, 3 * PIECE + 17];
        let more = [5 * PIECE, 8 * PIECE, 8 * PIECE + 1, 256 * 1024, 1 << 20];
        for len in lens.into_iter().chain(more) {
            let data = bytes(len);
            for size in [PIECE, WIDE_PIECE] {
                let (hash, pieces) = Pieces::of(&data, size);
                assert_eq!(hash, BlockHash::of(&data), "length {len}, pieces of {size}");
                assert_eq!(
                    pieces.is_some(),
                    len > size,
                    "length {len}, pieces of {size}"
                );
            }
        }
    }

    #[test]
    fn parts_of_a_verified_block_are_read_and_checked_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        // No room in memory: parts are read from the disk, in the pieces a verification
        // of the whole block yields.
        let store = BlockStore::open(dir.path(), 0).expect("open");
        let data = bytes(5 * WIDE_PIECE + 100);
        let hash = BlockHash::of(&data);
        store.put(&hash, &data).expect("put");
        let other = bytes(10);
        store.put(&BlockHash::of(&other), &other).expect("put");
        store.get(&hash).expect("verified whole");
        store
            .get(&BlockHash::of(&other))
            .expect("takes the cache's place");
        let mut out = vec![0; 2 * WIDE_PIECE];
        let len = store
            .read_into(&hash, WIDE_PIECE - 10, &mut out)
            .expect("read");
        assert_eq!(len, 2 * WIDE_PIECE);
        assert_eq!(out, &data[WIDE_PIECE - 10..3 * WIDE_PIECE - 10]);
        // Past the end: only what the block has.
        let len = store
            .read_into(&hash, 5 * WIDE_PIECE, &mut out)
            .expect("read");
        assert_eq!(&out[..len], &data[5 * WIDE_PIECE..]);

        // A flipped bit in piece 3 fails reads of it, not of the others.
        let mut damaged = data.clone();
        damaged[3 * WIDE_PIECE + 5] ^= 1;
        fs::write(store.path_of(&hash), &damaged).expect("damage");
        let mut out = vec![0; 10];
        assert!(matches!(
            store.read_into(&hash, 3 * WIDE_PIECE + 1, &mut out),
            Err(BlockError::CorruptPiece { offset, .. }) if offset == 3 * WIDE_PIECE
        ));
        store
            .read_into(&hash, WIDE_PIECE, &mut out)
            .expect("intact piece");
        assert_eq!(out, &data[WIDE_PIECE..WIDE_PIECE + 10]);
        // Cut short: the piece it lost fails.
        fs::write(store.path_of(&hash), &data[..4 * WIDE_PIECE]).expect("truncate");
        assert!(matches!(
            store.read_into(&hash, 4 * WIDE_PIECE, &mut out),
            Err(BlockError::CorruptPiece { .. })
        ));
    }

    #[test]
    fn stored_piece_values_are_adopted_only_if_they_make_the_hash() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = bytes(5 * PIECE + 100);
        let (hash, encoded) = hash_and_pieces(&data);
        assert_eq!(hash, BlockHash::of(&data));
        let encoded = encoded.expect("a block of several pieces has values");
        assert_eq!(encoded.len(), 6 * PIECE_VALUE_LEN);
        assert_eq!(
            hash_and_pieces(&data[..PIECE]).1,
            None,
            "one piece: read whole"
        );
        BlockStore::open(dir.path(), 0)
            .expect("open")
            .put(&hash, &data)
            .expect("put");
        // Piece 3 damaged on the disk: a store that adopted the values reads the others
        // without reading it, so they succeed and it fails.
        let mut damaged = data.clone();
        damaged[3 * PIECE + 5] ^= 1;
        let store = BlockStore::open(dir.path(), 0).expect("reopen");
        fs::write(store.path_of(&hash), &damaged).expect("damage");

        let mut tampered = encoded.clone();
        tampered[PIECE_VALUE_LEN] ^= 1;
        let refused = [
            (data.len(), &tampered[..]),
            (data.len() - PIECE, &encoded[..]),
            (data.len() + PIECE, &encoded[..]),
            (data.len(), &encoded[..encoded.len() - 1]),
        ];
        for (len, values) in refused {
            assert!(!store.adopt_pieces(&hash, len, values), "len {len}");
            assert!(!store.knows_pieces(&hash));
        }
        let mut out = vec![0; 10];
        assert!(
            matches!(
                store.read_into(&hash, PIECE, &mut out),
                Err(BlockError::Corrupt { .. })
            ),
            "without values a part is checked with its whole block"
        );

        // A length wrong within the last piece makes the same tree: that piece's own
        // value then refuses it (an error, never bytes cut short).
        assert!(store.adopt_pieces(&hash, data.len() - 1, &encoded));
        assert!(matches!(
            store.read_into(&hash, 5 * PIECE, &mut out),
            Err(BlockError::CorruptPiece { offset, .. }) if offset == 5 * PIECE
        ));

        assert!(store.adopt_pieces(&hash, data.len(), &encoded));
        assert!(store.knows_pieces(&hash));
        let mut tail = vec![0; 200];
        let len = store.read_into(&hash, 5 * PIECE, &mut tail).expect("tail");
        assert_eq!(&tail[..len], &data[5 * PIECE..]);
        store
            .read_into(&hash, PIECE, &mut out)
            .expect("intact piece");
        assert_eq!(out, &data[PIECE..PIECE + 10]);
        assert!(matches!(
            store.read_into(&hash, 3 * PIECE, &mut out),
            Err(BlockError::CorruptPiece { offset, .. }) if offset == 3 * PIECE
        ));
    }

    #[test]
    fn a_long_read_is_checked_by_subtrees_and_a_bad_piece_found_exactly() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = bytes(64 * PIECE + 700);
        let (hash, encoded) = hash_and_pieces(&data);
        let store = BlockStore::open(dir.path(), 0).expect("open");
        store.put(&hash, &data).expect("put");
        assert!(store.adopt_pieces(&hash, data.len(), &encoded.expect("values")));
        let mut out = vec![0; 40 * PIECE];
        for offset in [0, 3 * PIECE + 1, 24 * PIECE + 700] {
            let len = store.read_into(&hash, offset, &mut out).expect("intact");
            assert_eq!(
                &out[..len],
                &data[offset..(offset + out.len()).min(data.len())]
            );
        }
        for bad in [0, 17 * PIECE + 9, 64 * PIECE + 699] {
            let mut damaged = data.clone();
            damaged[bad] ^= 1;
            fs::write(store.path_of(&hash), &damaged).expect("damage");
            for offset in [0, 3 * PIECE + 1, 24 * PIECE + 700] {
                let read = store.read_into(&hash, offset, &mut out);
                let covers = offset / PIECE * PIECE <= bad && bad < offset + out.len();
                match read {
                    Err(BlockError::CorruptPiece { offset: at, .. }) => {
                        assert!(covers, "damage at {bad}, read from {offset}");
                        assert_eq!(at, bad / PIECE * PIECE, "read from {offset}");
                    }
                    Ok(len) => {
                        assert!(!covers, "damage at {bad} missed, read from {offset}");
                        assert_eq!(&out[..len], &data[offset..offset + len]);
                    }
                    Err(e) => panic!("{e}"),
                }
            }
        }
    }

    #[test]
    fn values_of_wide_pieces_from_an_older_catalog_are_adopted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = bytes(5 * WIDE_PIECE + 100);
        let (hash, pieces) = Pieces::of(&data, WIDE_PIECE);
        let encoded = pieces.expect("values").encode();
        let store = BlockStore::open(dir.path(), 0).expect("open");
        store.put(&hash, &data).expect("put");
        assert!(store.adopt_pieces(&hash, data.len(), &encoded));
        let mut damaged = data.clone();
        damaged[3 * WIDE_PIECE + 5] ^= 1;
        fs::write(store.path_of(&hash), &damaged).expect("damage");
        let mut out = vec![0; 10];
        store
            .read_into(&hash, WIDE_PIECE + 3, &mut out)
            .expect("intact piece");
        assert_eq!(out, &data[WIDE_PIECE + 3..WIDE_PIECE + 13]);
        assert!(matches!(
            store.read_into(&hash, 3 * WIDE_PIECE + 1, &mut out),
            Err(BlockError::CorruptPiece { offset, .. }) if offset == 3 * WIDE_PIECE
        ));
    }

    #[test]
    fn only_reads_of_part_of_a_block_want_its_pieces() {
        let block = 256 * 1024;
        assert!(reads_part(4096, 4096, block), "a 4 KiB read inside a block");
        assert!(reads_part(0, 2 * PIECE, block), "the first pieces");
        assert!(reads_part(0, 4096, block), "the first page of a block");
        assert!(!reads_part(0, block, block), "the whole block");
        assert!(
            !reads_part(0, 1024, 1024),
            "a small file, read from its start"
        );
        assert!(
            !reads_part(0, 12288, 10000),
            "a file of a few pages, read whole"
        );
        assert!(!reads_part(1024, 1024, PIECE), "a block of one piece");
    }

    #[test]
    fn a_block_file_cut_short_is_written_again_by_the_next_put_of_its_bytes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = bytes(3 * PIECE);
        let hash = BlockHash::of(&data);
        BlockStore::open(dir.path(), 4)
            .expect("open")
            .put(&hash, &data)
            .expect("put");
        let path = BlockStore::open_read_only(dir.path()).path_of(&hash);
        fs::write(&path, &data[..PIECE]).expect("cut the block file short");
        let store = BlockStore::open(dir.path(), 4).expect("reopen");
        assert!(
            store.get(&hash).is_err(),
            "a block file cut short read back"
        );
        store.put(&hash, &data).expect("put again");
        assert_eq!(fs::read(&path).expect("block file"), data);
        assert_eq!(&*store.get(&hash).expect("get"), &data[..]);
    }

    #[test]
    fn a_sync_of_many_blocks_on_threads_reports_a_failure_and_keeps_them_unsynced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = BlockStore::open(dir.path(), 4).expect("open");
        let hashes: Vec<BlockHash> = (0..3 * MAX_SYNC_THREADS)
            .map(|i| {
                let data = bytes(i + 1);
                let hash = BlockHash::of(&data);
                store.put(&hash, &data).expect("put");
                hash
            })
            .collect();
        // A block freed before the sync has nothing left to make durable.
        store.remove(&hashes[0]).expect("remove");
        // A path that cannot be opened (its parent is a file): the sync must fail.
        let not_a_dir = dir.path().join("not-a-dir");
        fs::write(&not_a_dir, b"x").expect("write");
        lock(&store.unsynced).push(not_a_dir.join("block"));
        let pending = lock(&store.unsynced).paths.len();
        assert!(store.sync().is_err(), "an unopenable path synced");
        assert_eq!(
            lock(&store.unsynced).paths.len(),
            pending,
            "kept for the next sync"
        );
        fs::remove_file(&not_a_dir).expect("remove");
        store.sync().expect("sync once the path is gone");
        assert!(lock(&store.unsynced).paths.is_empty());
    }

    #[test]
    fn a_sync_begun_during_another_waits_for_it_and_shares_its_failure() {
        use std::os::unix::ffi::OsStrExt;
        use std::os::unix::fs::OpenOptionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let store = BlockStore::open(dir.path(), 4).expect("open");
        // A FIFO holds the first sync in its open until a writer comes, then fails it (a
        // pipe cannot be fsynced): a sync under way, whose set holds the second's block.
        let fifo = dir.path().join("fifo");
        let c_path = std::ffi::CString::new(fifo.as_os_str().as_bytes()).expect("path");
        // SAFETY: mkfifo reads the NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0, "mkfifo");
        lock(&store.unsynced).push(fifo.clone());
        let store = &store;
        std::thread::scope(|scope| {
            let first = scope.spawn(|| store.sync());
            while !lock(&store.unsynced).paths.is_empty() {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            let (done, finished) = std::sync::mpsc::channel();
            let second = scope.spawn(move || {
                let synced = store.sync();
                let _ = done.send(());
                synced
            });
            let returned_early = finished
                .recv_timeout(std::time::Duration::from_millis(300))
                .is_ok();
            // Let the first go before any assertion, or a failing test would hang on it.
            let writer = fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&fifo)
                .expect("the FIFO's writing end");
            assert!(
                !returned_early,
                "the second sync returned while the first still held its block"
            );
            assert!(first.join().expect("first sync").is_err(), "a FIFO synced");
            assert!(
                second.join().expect("second sync").is_err(),
                "the second sync succeeded though its block was never made durable"
            );
            drop(writer);
        });
    }

    #[test]
    fn unsynced_blocks_past_the_limit_are_remembered_as_many_not_one_by_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = BlockStore::open(dir.path(), 4).expect("open");
        let put = |i: usize| {
            let data = bytes(i + 1);
            store.put(&BlockHash::of(&data), &data).expect("put");
        };
        (0..SYNC_EACH_LIMIT).for_each(put);
        assert_eq!(lock(&store.unsynced).paths.len(), SYNC_EACH_LIMIT);
        (SYNC_EACH_LIMIT..SYNC_EACH_LIMIT + 10).for_each(put);
        {
            let unsynced = lock(&store.unsynced);
            assert!(unsynced.many && unsynced.paths.is_empty());
        }
        store.sync().expect("sync");
        let unsynced = lock(&store.unsynced);
        assert!(!unsynced.many && unsynced.paths.is_empty());
    }
}
