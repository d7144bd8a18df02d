//! The local content-addressed block store (`DATA/blocks/`) and its in-memory read cache.
//!
//! A block is a file named by the BLAKE3 hash of its content, written to a temporary name
//! and renamed into place, so a crash leaves either no block or a whole one. Every read is
//! checked against the name: a mismatch is [`BlockError::Corrupt`], never wrong data.

use std::collections::HashSet;
use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::sync::{Mutex, MutexGuard, lock};

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

pub struct BlockStore {
    dir: PathBuf,
    cache: Mutex<LruCache<BlockHash, Arc<Vec<u8>>>>,
    /// Unique suffix for temporary files of concurrent writers.
    next_temp: AtomicU64,
    /// Blocks written since the last `sync`, which makes them durable.
    unsynced: Mutex<Vec<PathBuf>>,
}

/// Above this many unsynced blocks one syncfs beats a journal commit per file.
const SYNC_EACH_LIMIT: usize = 64;

impl BlockStore {
    /// Opens the store in `dir`, creating it if needed. `cache_blocks` bounds the read cache.
    pub fn open(dir: &Path, cache_blocks: usize) -> Result<BlockStore, BlockError> {
        let temp = dir.join("tmp");
        fs::create_dir_all(&temp).map_err(|e| BlockError::io(&temp, e))?;
        // Temporaries of a crashed run were never renamed into place: nothing refers to them.
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
            cache: Mutex::new(LruCache::new(
                std::num::NonZeroUsize::new(cache_blocks.max(1))
                    .unwrap_or(std::num::NonZeroUsize::MIN),
            )),
            next_temp: AtomicU64::new(0),
            unsynced: Mutex::new(Vec::new()),
        })
    }

    /// Opens the store of a volume that may be mounted by another process, for reading
    /// only: nothing on disk is created or cleaned up.
    pub fn open_read_only(dir: &Path) -> BlockStore {
        BlockStore {
            dir: dir.to_owned(),
            cache: Mutex::new(LruCache::new(std::num::NonZeroUsize::MIN)),
            next_temp: AtomicU64::new(0),
            unsynced: Mutex::new(Vec::new()),
        }
    }

    fn path_of(&self, hash: &BlockHash) -> PathBuf {
        let hex = hash.to_hex();
        self.dir.join(&hex[..2]).join(&hex)
    }

    /// Stores `data` under `hash` unless it is already there. The caller computed `hash`.
    pub fn put(&self, hash: &BlockHash, data: &[u8]) -> Result<(), BlockError> {
        let path = self.path_of(hash);
        if path.exists() {
            return Ok(());
        }
        let temp = self.dir.join("tmp").join(format!(
            "{}.{}",
            std::process::id(),
            self.next_temp.fetch_add(1, Ordering::Relaxed)
        ));
        let write = || -> io::Result<()> {
            let mut file = fs::File::create(&temp)?;
            file.write_all(data)?;
            drop(file);
            fs::rename(&temp, &path)
        };
        write().map_err(|e| {
            let _ = fs::remove_file(&temp);
            BlockError::io(&path, e)
        })?;
        crate::sync::lock(&self.unsynced).push(path);
        Ok(())
    }

    /// Reads and verifies a block.
    pub fn get(&self, hash: &BlockHash) -> Result<Arc<Vec<u8>>, BlockError> {
        if let Some(data) = self.lock_cache().get(hash) {
            return Ok(data.clone());
        }
        // Arc<Vec> keeps the buffer fs::read made: no second copy on the read path.
        let data = Arc::new(self.read_uncached(hash)?);
        self.lock_cache().put(*hash, data.clone());
        Ok(data)
    }

    /// Reads and verifies a block from disk, leaving the cache alone (for bulk readers
    /// such as the uploader, which would only evict what users read).
    pub fn read_uncached(&self, hash: &BlockHash) -> Result<Vec<u8>, BlockError> {
        let path = self.path_of(hash);
        let data = match fs::read(&path) {
            Ok(data) => data,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(BlockError::Missing { hash: *hash });
            }
            Err(e) => return Err(BlockError::io(&path, e)),
        };
        let actual = BlockHash::of(&data);
        if actual != *hash {
            tracing::error!(%hash, %actual, path = %path.display(), "corrupt block");
            return Err(BlockError::Corrupt {
                hash: *hash,
                actual,
            });
        }
        Ok(data)
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
        let path = self.path_of(hash);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(BlockError::io(&path, e)),
            _ => Ok(()),
        }
    }

    /// Makes every block written so far durable: each file and its directory entry, or,
    /// when many are pending, the data dir's whole filesystem at once.
    pub fn sync(&self) -> Result<(), BlockError> {
        let pending = std::mem::take(&mut *crate::sync::lock(&self.unsynced));
        let result = self.sync_paths(&pending);
        if result.is_err() {
            // Still not durable: the next sync must try them again.
            crate::sync::lock(&self.unsynced).extend(pending);
        }
        result
    }

    fn sync_paths(&self, paths: &[PathBuf]) -> Result<(), BlockError> {
        let sync_one = |path: &Path| match fs::File::open(path).and_then(|f| f.sync_all()) {
            // Freed since it was written: nothing left to make durable.
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            result => result.map_err(|e| BlockError::io(path, e)),
        };
        if paths.len() > SYNC_EACH_LIMIT {
            let dir = fs::File::open(&self.dir).map_err(|e| BlockError::io(&self.dir, e))?;
            // SAFETY: syncfs only reads the descriptor, which `dir` keeps open for the call.
            if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
                return Err(BlockError::io(&self.dir, io::Error::last_os_error()));
            }
            return Ok(());
        }
        let mut dirs = std::collections::BTreeSet::new();
        for path in paths {
            sync_one(path)?;
            dirs.extend(path.parent());
        }
        dirs.into_iter().try_for_each(sync_one)
    }

    fn lock_cache(&self) -> MutexGuard<'_, LruCache<BlockHash, Arc<Vec<u8>>>> {
        lock(&self.cache)
    }
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
}
