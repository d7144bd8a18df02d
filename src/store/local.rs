//! `file:///DIR`: an object store in a local directory. Objects are files at their key's
//! path, written to a temporary name, synced and renamed, so a crash leaves whole objects.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::{ObjectStore, StoreError, StoreFuture, StoreResult};

pub struct LocalStore {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    url: String,
    next_temp: AtomicU64,
}

const TEMP_DIR: &str = ".tmp";

fn io_error(what: &str, path: &Path, e: io::Error) -> StoreError {
    let message = format!("{what} {}: {e}", path.display());
    // A full or read-only disk can be fixed by the user; a retry later may succeed.
    match e.kind() {
        io::ErrorKind::PermissionDenied | io::ErrorKind::NotADirectory => {
            StoreError::permanent(message)
        }
        _ => StoreError::transient(message),
    }
}

impl LocalStore {
    pub fn open(dir: &Path, url: String) -> StoreResult<LocalStore> {
        let temp = dir.join(TEMP_DIR);
        fs::create_dir_all(&temp)
            .map_err(|e| StoreError::permanent(format!("cannot create store {url}: {e}")))?;
        Ok(LocalStore {
            inner: Arc::new(Inner {
                dir: dir.to_owned(),
                url,
                next_temp: AtomicU64::new(0),
            }),
        })
    }

    /// Runs blocking file I/O off the async workers.
    fn blocking<'a, T: Send + 'static>(
        &'a self,
        work: impl FnOnce(&Inner) -> StoreResult<T> + Send + 'static,
    ) -> StoreFuture<'a, T> {
        let inner = self.inner.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || work(&inner))
                .await
                .map_err(|e| StoreError::transient(format!("store I/O task failed: {e}")))?
        })
    }
}

impl Inner {
    fn path_of(&self, key: &str) -> StoreResult<PathBuf> {
        if key.is_empty()
            || key
                .split('/')
                .any(|p| p.is_empty() || p == "." || p == "..")
        {
            return Err(StoreError::permanent(format!("invalid object key {key:?}")));
        }
        Ok(self.dir.join(key))
    }

    fn put(&self, key: &str, body: &[u8]) -> StoreResult<()> {
        let path = self.path_of(key)?;
        let temp = self.dir.join(TEMP_DIR).join(format!(
            "{}.{}",
            std::process::id(),
            self.next_temp.fetch_add(1, Ordering::Relaxed)
        ));
        let write = || -> io::Result<()> {
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent)?;
            }
            let mut file = fs::File::create(&temp)?;
            file.write_all(body)?;
            file.sync_all()?;
            fs::rename(&temp, &path)?;
            // The rename is durable once the directory is.
            fs::File::open(path.parent().unwrap_or(&self.dir))?.sync_all()
        };
        write().map_err(|e| {
            let _ = fs::remove_file(&temp);
            io_error("cannot write", &path, e)
        })
    }

    fn get(&self, key: &str) -> StoreResult<Option<Vec<u8>>> {
        let path = self.path_of(key)?;
        match fs::read(&path) {
            Ok(data) => Ok(Some(data)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_error("cannot read", &path, e)),
        }
    }

    fn get_range(&self, key: &str, offset: u64, len: u64) -> StoreResult<Option<Vec<u8>>> {
        use std::os::unix::fs::FileExt;
        let path = self.path_of(key)?;
        let file = match fs::File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_error("cannot read", &path, e)),
        };
        let size = file
            .metadata()
            .map_err(|e| io_error("cannot read", &path, e))?
            .len();
        let len = len.min(size.saturating_sub(offset));
        let mut data = vec![0u8; usize::try_from(len).unwrap_or(0)];
        file.read_exact_at(&mut data, offset)
            .map_err(|e| io_error("cannot read", &path, e))?;
        Ok(Some(data))
    }

    fn delete(&self, key: &str) -> StoreResult<()> {
        let path = self.path_of(key)?;
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                Err(io_error("cannot delete", &path, e))
            }
            _ => Ok(()),
        }
    }

    fn list(&self, prefix: &str) -> StoreResult<Vec<String>> {
        // Walk only the directory the prefix names, then filter by the rest of it.
        let (dir_part, _) = prefix.rsplit_once('/').unwrap_or(("", prefix));
        let start = self.dir.join(dir_part);
        let mut keys = Vec::new();
        let mut pending = vec![start];
        while let Some(dir) = pending.pop() {
            let entries = match fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_error("cannot list", &dir, e)),
            };
            for entry in entries {
                let entry = entry.map_err(|e| io_error("cannot list", &dir, e))?;
                let path = entry.path();
                let Ok(relative) = path.strip_prefix(&self.dir) else {
                    continue;
                };
                let Some(key) = relative.to_str() else {
                    continue;
                };
                if key == TEMP_DIR {
                    continue;
                }
                let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
                if is_dir {
                    pending.push(path);
                } else if key.starts_with(prefix) {
                    keys.push(key.to_owned());
                }
            }
        }
        Ok(keys)
    }
}

impl ObjectStore for LocalStore {
    fn put<'a>(&'a self, key: &'a str, body: bytes::Bytes) -> StoreFuture<'a, ()> {
        let key = key.to_owned();
        self.blocking(move |inner| inner.put(&key, &body))
    }

    fn get<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Vec<u8>>> {
        let key = key.to_owned();
        self.blocking(move |inner| inner.get(&key))
    }

    /// Into a fresh buffer: the reuse has been measured only against S3 (a `file://`
    /// restore still pays its page faults).
    fn get_range_into<'a>(
        &'a self,
        key: &'a str,
        offset: u64,
        len: u64,
        _buffer: Vec<u8>,
    ) -> StoreFuture<'a, Option<Vec<u8>>> {
        let key = key.to_owned();
        self.blocking(move |inner| inner.get_range(&key, offset, len))
    }

    fn delete<'a>(&'a self, key: &'a str) -> StoreFuture<'a, ()> {
        let key = key.to_owned();
        self.blocking(move |inner| inner.delete(&key))
    }

    fn list<'a>(&'a self, prefix: &'a str) -> StoreFuture<'a, Vec<String>> {
        let prefix = prefix.to_owned();
        self.blocking(move |inner| inner.list(&prefix))
    }

    fn url(&self) -> &str {
        &self.inner.url
    }

    fn is_local(&self) -> bool {
        true
    }
}
