//! Restoring a snapshot, or a path in one, into a directory: from any [`Source`], the
//! object store's ([`crate::store::StoreSource`]) or a local volume's ([`LocalSource`]).
//!
//! The walk creates every node with `*at` calls relative to directory descriptors and
//! `O_NOFOLLOW`, so nothing it writes can be redirected outside DEST by a symlink (one
//! in DEST beforehand, or one it restored). Block reads run on worker threads; a block
//! that fails verification removes its file and is reported, and the rest goes on.
//!
//! `LocalSource` lives here, not with the volume or the store reader: only a restore
//! reads a volume this way (its catalog read-only beside a running mount, block files
//! directly), and it needs nothing of `Volume`.

use std::collections::{HashMap, VecDeque};
use std::ffi::CString;
use std::fs;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, mpsc};

use tokio::runtime::Handle;

use crate::blocks::{BlockError, BlockHash, BlockStore, start_write_back};
use crate::catalog::{self, Catalog, Kind, ROOT_INO, Setting};
use crate::display::escaped;
use crate::manifest::{Content, Entry};
use crate::store::{ReadError, Source, StoreChain, StoreUrl};

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("{0} does not exist in the snapshot")]
    NoPath(String),
    #[error("{0} is not empty: restore into a new directory, or pass --overwrite")]
    DestNotEmpty(PathBuf),
    #[error("{0} exists: pass --overwrite to replace it")]
    DestExists(PathBuf),
    #[error("{} has no file name", .0.display())]
    DestNoName(PathBuf),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Read(#[from] ReadError),
}

type Result<T, E = RestoreError> = std::result::Result<T, E>;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> RestoreError + '_ {
    move |source| RestoreError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A snapshot of a local volume, read beside a running mount (catalog read-only, blocks
/// read directly).
pub struct LocalSource {
    catalog: Mutex<Catalog>,
    blocks: BlockStore,
    generation: u64,
    block_size: u64,
    runtime: Handle,
    /// The volume's store and its origin's (`--from`), for blocks not on the local disk
    /// (evicted, or never fetched); opened on first need.
    store_urls: Option<(StoreUrl, Option<StoreUrl>)>,
    stores: std::sync::OnceLock<Result<StoreChain, String>>,
}

impl LocalSource {
    /// Snapshot `snapshot` of the volume in `data_dir`; blocks missing there are read
    /// from its stores on `runtime`.
    pub fn open(
        runtime: &Handle,
        data_dir: &Path,
        snapshot: &[u8],
    ) -> Result<LocalSource, ReadError> {
        let catalog = Catalog::open_data_dir_read_only(data_dir)?;
        let row = catalog
            .read(|tx| tx.snapshots())?
            .into_iter()
            .find(|row| row.trash.is_none() && row.name == snapshot)
            .ok_or_else(|| ReadError::NoSnapshot(escaped(snapshot)))?;
        let block_size = u64::from(catalog.block_size());
        let mut store_urls = catalog.read(|tx| {
            Ok::<_, catalog::Error>(
                [tx.setting(Setting::Store)?, tx.setting(Setting::Origin)?]
                    .into_iter()
                    .flatten()
                    .filter_map(|url| StoreUrl::parse(&url).ok()),
            )
        })?;
        Ok(LocalSource {
            catalog: Mutex::new(catalog),
            blocks: BlockStore::open_read_only(&data_dir.join("blocks")),
            generation: row.generation,
            block_size,
            runtime: runtime.clone(),
            store_urls: store_urls.next().map(|own| (own, store_urls.next())),
            stores: std::sync::OnceLock::new(),
        })
    }

    /// Block `hash` from the volume's store, or its origin's.
    fn fetch(
        &self,
        hash: &BlockHash,
        own: &StoreUrl,
        origin: Option<&StoreUrl>,
    ) -> Result<Vec<u8>, ReadError> {
        let stores = self
            .stores
            .get_or_init(|| StoreChain::open(&self.runtime, own, origin).map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|e| ReadError::Corrupt(format!("block {hash} is not local: {e}")))?;
        // Where the catalog recorded it, if in the volume's own store.
        let place = crate::sync::lock(&self.catalog).read(|tx| tx.block_place(hash))?;
        match place {
            Some(place) => stores.block_at(hash, place, self.block_size as usize),
            None => stores.block(hash, self.block_size as usize),
        }
    }

    fn entry(&self, row: catalog::DirEntryRow) -> Result<Entry, ReadError> {
        let g = self.generation;
        let catalog = crate::sync::lock(&self.catalog);
        let xattrs = catalog.read(|tx| tx.xattrs_of(g, row.inode.ino))?;
        let content = match row.inode.attrs.kind {
            Kind::File => Content::Blocks(
                catalog.read(|tx| tx.blocks_in_range(g, row.inode.ino, 0, i64::MAX as u64))?,
            ),
            // Directories are listed by inode here; the hash is not needed.
            Kind::Dir => Content::Tree(BlockHash::of(&[])),
            _ => Content::None,
        };
        Ok(Entry::from_row(row, xattrs, content))
    }
}

impl Source for LocalSource {
    fn root(&self) -> Result<Entry, ReadError> {
        let g = self.generation;
        let inode = crate::sync::lock(&self.catalog)
            .read(|tx| tx.inode(g, ROOT_INO))?
            .ok_or_else(|| ReadError::Corrupt("the snapshot has no root".into()))?;
        self.entry(catalog::DirEntryRow {
            name: Vec::new(),
            inode,
        })
    }

    fn children(&self, dir: &Entry) -> Result<Vec<Entry>, ReadError> {
        let g = self.generation;
        let rows = crate::sync::lock(&self.catalog).read(|tx| tx.list_dir(g, dir.ino))?;
        rows.into_iter().map(|row| self.entry(row)).collect()
    }

    fn block(&self, hash: &BlockHash) -> Result<Vec<u8>, ReadError> {
        let inline = crate::sync::lock(&self.catalog).read(|tx| tx.inline_block(hash))?;
        let local = self.blocks.read_uncached(hash, inline);
        let Some((own, origin)) = &self.store_urls else {
            return local.map_err(|e| ReadError::Corrupt(e.to_string()));
        };
        match local {
            Err(BlockError::Missing { .. }) => self.fetch(hash, own, origin.as_ref()),
            // A local copy damaged by bit rot or a machine crash is read from the store,
            // as the mount's reads do: the restore loses nothing the store still holds.
            Err(damage @ (BlockError::Corrupt { .. } | BlockError::CorruptPiece { .. })) => self
                .fetch(hash, own, origin.as_ref())
                .map_err(|e| ReadError::Corrupt(format!("{damage}, and the store's copy: {e}"))),
            local => local.map_err(|e| ReadError::Corrupt(e.to_string())),
        }
    }

    fn block_size(&self) -> u64 {
        self.block_size
    }

    fn parallelism(&self) -> usize {
        4
    }
}

/// Files (each holding a descriptor) and blocks queued before the first hand-over to the
/// pool: small, so that the workers start at once...
const FIRST_QUEUE_FILES: usize = 256;
const FIRST_QUEUE_BLOCKS: usize = 4096;
/// ...and before each later one: as many files as a quarter of the descriptors the
/// process may hold (two queues are open at once: one being written, one filling), up to
/// this many. A queue's blocks are planned by pack, so a pack is fetched once per queue
/// that needs it: in queues of 256 files, a restore of 3,758 files made 263 requests of
/// 43 packs.
const MAX_QUEUE_FILES: usize = 8192;
const MAX_QUEUE_BLOCKS: usize = 65536;
/// The soft limit of descriptors is raised to the hard limit, as far as this.
const WANTED_DESCRIPTORS: u64 = 65536;

#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Replace existing files in DEST (otherwise a non-empty DEST is refused).
    pub overwrite: bool,
    /// Restore owners (needs root; otherwise files belong to the caller).
    pub owners: bool,
}

/// What a restore did. `errors` name each file that could not be restored.
#[derive(Debug, Default)]
pub struct Report {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub hard_links: u64,
    pub specials: u64,
    pub bytes: u64,
    pub errors: Vec<String>,
}

/// How many descriptors this process may hold, after raising its soft limit towards the
/// hard one (as Go's runtime does for restic): a distribution's soft limit of 1,024 would
/// keep the queues, and so the requests per pack, at their first size.
fn descriptor_limit() -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct it is given, and only that.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return 1024;
    }
    let wanted = limit.rlim_max.min(WANTED_DESCRIPTORS);
    if limit.rlim_cur < wanted {
        let raised = libc::rlimit {
            rlim_cur: wanted,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit reads the struct it is given, and only that.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        }
    }
    usize::try_from(limit.rlim_cur).unwrap_or(usize::MAX)
}

/// Progress callbacks (bytes written, files finished), for a progress bar.
pub trait Progress: Sync {
    fn total(&self, _bytes: u64) {}
    fn advance(&self, _bytes: u64) {}
}

impl Progress for () {}

/// Restores `path` (relative to the snapshot root, a byte string as names are; empty for
/// all of it) of `source` to `dest`. A directory becomes `dest` (which must be empty or
/// missing unless `overwrite`); a file becomes `dest`, or `dest/NAME` if `dest` is a
/// directory.
pub fn restore(
    source: &dyn Source,
    path: &[u8],
    dest: &Path,
    options: &Options,
    progress: &dyn Progress,
) -> Result<Report> {
    let mut entry = source.root()?;
    let no_path = || RestoreError::NoPath(escaped(path));
    for part in path
        .split(|&b| b == b'/')
        .filter(|p| !p.is_empty() && *p != b".")
    {
        if entry.attrs.kind != Kind::Dir {
            return Err(no_path());
        }
        entry = source
            .children(&entry)?
            .into_iter()
            .find(|child| child.name == part)
            .ok_or_else(no_path)?;
    }
    let writer = Writer {
        source,
        options,
        progress,
        report: Mutex::new(Report::default()),
        failed_inodes: Mutex::new(std::collections::HashSet::new()),
        block_size: source.block_size(),
    };
    // The directory restored into: the one flushed at the end.
    let restored_into = std::thread::scope(|scope| {
        let mut run = Run {
            writer: &writer,
            pool: Pool::start(scope, &writer),
            first_links: HashMap::new(),
            later_links: Vec::new(),
            finished_dirs: Vec::new(),
            open_files: 0,
            queue_bound: (FIRST_QUEUE_FILES, FIRST_QUEUE_BLOCKS),
            later_bound: (
                (descriptor_limit() / 4).clamp(FIRST_QUEUE_FILES, MAX_QUEUE_FILES),
                MAX_QUEUE_BLOCKS,
            ),
        };
        if entry.attrs.kind == Kind::Dir {
            prepare_dir(dest, options.overwrite)?;
            run.dirs(entry, dest)?;
            return Ok(dest.to_owned());
        }
        let (parent, name) = match fs::metadata(dest) {
            Ok(meta) if meta.is_dir() => (dest.to_owned(), entry.name.clone()),
            _ => {
                let name = dest
                    .file_name()
                    .ok_or_else(|| RestoreError::DestNoName(dest.to_owned()))?;
                let parent = dest.parent().filter(|p| !p.as_os_str().is_empty());
                (
                    parent.unwrap_or(Path::new(".")).to_owned(),
                    name.as_bytes().to_vec(),
                )
            }
        };
        let target = parent.join(std::ffi::OsStr::from_bytes(&name));
        if fs::symlink_metadata(&target).is_ok() && !options.overwrite {
            return Err(RestoreError::DestExists(target));
        }
        let dir = Arc::new(open_dir_path(&parent)?);
        entry.name = name;
        let mut jobs = Vec::new();
        run.nodes(vec![entry], &dir, &parent, &mut jobs)?;
        run.pool.submit(jobs);
        run.pool.finish();
        run.make_later_links();
        Ok(parent)
    })?;
    // On disk when it returns, at the cost of one flush of the file system rather than
    // one synchronous write-back per file.
    let synced = open_dir_path(&restored_into)
        .and_then(|fd| sync_file_system(&fd).map_err(io_err(&restored_into)));
    if let Err(e) = synced {
        writer.error(format!("the restored data may not be on disk: {e}"));
    }
    Ok(writer
        .report
        .into_inner()
        .unwrap_or_else(|p| p.into_inner()))
}

/// Writes back every dirty page of the file system holding `fd` (syncfs(2)), reporting
/// a write-back error (Linux 5.8 and later).
fn sync_file_system(fd: &OwnedFd) -> std::io::Result<()> {
    // SAFETY: plain system call on an open descriptor.
    check(unsafe { libc::syncfs(fd.as_raw_fd()) }).map(drop)
}

/// DEST must be missing (it is created) or an empty directory, unless `overwrite`.
fn prepare_dir(dest: &Path, overwrite: bool) -> Result<()> {
    match fs::read_dir(dest) {
        Ok(mut entries) => {
            if !overwrite && entries.next().is_some() {
                return Err(RestoreError::DestNotEmpty(dest.to_owned()));
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            fs::create_dir_all(dest).map_err(io_err(dest))
        }
        Err(e) => Err(io_err(dest)(e)),
    }
}

fn open_dir_path(path: &Path) -> Result<OwnedFd> {
    let file = fs::File::open(path).map_err(io_err(path))?;
    if !file.metadata().map_err(io_err(path))?.is_dir() {
        return Err(io_err(path)(std::io::Error::from_raw_os_error(
            libc::ENOTDIR,
        )));
    }
    Ok(OwnedFd::from(file))
}

/// Opens directory `name` in `parent` without following a symlink.
fn open_child_dir(parent: &OwnedFd, name: &[u8]) -> std::io::Result<OwnedFd> {
    let name = cname(name)?;
    // SAFETY: openat reads the NUL-terminated name; the parent fd is open.
    let fd = check(unsafe {
        libc::openat(
            parent.as_raw_fd(),
            name.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: the descriptor was just opened and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn cname(name: &[u8]) -> std::io::Result<CString> {
    if name.is_empty() || name.contains(&b'/') || name == b"." || name == b".." {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "unsafe name in the manifest",
        ));
    }
    CString::new(name).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))
}

fn check(ret: libc::c_int) -> std::io::Result<libc::c_int> {
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn timespec(nanos: i64) -> libc::timespec {
    libc::timespec {
        tv_sec: nanos.div_euclid(1_000_000_000),
        tv_nsec: nanos.rem_euclid(1_000_000_000),
    }
}

/// A file whose blocks are being written by the workers.
struct OpenFile {
    dir: Arc<OwnedFd>,
    name: CString,
    path: PathBuf,
    file: fs::File,
    entry: Entry,
    remaining: AtomicUsize,
    failed: AtomicBool,
}

struct BlockJob {
    file: Arc<OpenFile>,
    index: u64,
    hash: BlockHash,
}

/// The walk: it creates the nodes and queues the blocks of each file for the pool.
struct Run<'w, 'a> {
    writer: &'w Writer<'a>,
    pool: Pool<'a>,
    /// Hard links: the first restored path of each inode with nlink > 1.
    first_links: HashMap<u64, PathBuf>,
    /// Further names of those inodes, linked once all file data is written, so a file
    /// that fails is left out under every name.
    later_links: Vec<(u64, PathBuf)>,
    /// Directories whose contents are done, deepest last: metadata is applied in reverse,
    /// reopened by path (holding a descriptor each would run out of them).
    finished_dirs: Vec<(PathBuf, Entry)>,
    /// Files created since the block queue was last handed to the pool (each holds a
    /// descriptor).
    open_files: usize,
    /// The files and blocks the queue takes before it is handed over: the first queue's
    /// bound, then `later_bound`.
    queue_bound: (usize, usize),
    later_bound: (usize, usize),
}

/// What the walk and the pool's workers share: the source, the options, the report.
struct Writer<'a> {
    source: &'a dyn Source,
    options: &'a Options,
    progress: &'a dyn Progress,
    report: Mutex<Report>,
    /// Inodes whose data could not be restored.
    failed_inodes: Mutex<std::collections::HashSet<u64>>,
    block_size: u64,
}

impl Run<'_, '_> {
    /// Restores the contents of directory `root` into `dest`, then its metadata.
    fn dirs(&mut self, root: Entry, dest: &Path) -> Result<()> {
        let mut jobs = Vec::new();
        self.descend(
            root,
            Arc::new(open_dir_path(dest)?),
            dest.to_owned(),
            &mut jobs,
        )?;
        self.pool.submit(jobs);
        self.pool.finish();
        self.make_later_links();
        // Children first: setting a directory's times before its contents would undo them.
        for (path, entry) in std::mem::take(&mut self.finished_dirs).into_iter().rev() {
            let result = open_dir_path(&path).and_then(|fd| {
                self.writer
                    .apply_metadata(fd.as_raw_fd(), &entry)
                    .map_err(io_err(&path))
            });
            if let Err(e) = result {
                self.writer.error(e.to_string());
            }
        }
        Ok(())
    }

    /// Depth first from `root` (open as `fd`): subdirectories wait as (parent, name), so
    /// open descriptors grow with the depth, not the width, of the tree.
    fn descend(
        &mut self,
        root: Entry,
        fd: Arc<OwnedFd>,
        path: PathBuf,
        jobs: &mut Vec<BlockJob>,
    ) -> Result<()> {
        let mut pending: Vec<(Entry, Arc<OwnedFd>, PathBuf)> = Vec::new();
        let mut next = Some((root, fd, path));
        loop {
            let (dir, fd, path) = match next.take() {
                Some(first) => first,
                None => {
                    let Some((entry, parent, path)) = pending.pop() else {
                        break;
                    };
                    match open_child_dir(&parent, &entry.name) {
                        Ok(fd) => (entry, Arc::new(fd), path),
                        Err(e) => {
                            self.writer.error(format!("{}: {e}", path.display()));
                            continue;
                        }
                    }
                }
            };
            let children = match self.writer.source.children(&dir) {
                Ok(children) => children,
                Err(e) => {
                    self.writer.error(format!("{}: {e}", path.display()));
                    continue;
                }
            };
            let subdirs = self.nodes(children, &fd, &path, jobs)?;
            self.finished_dirs.push((path, dir));
            pending.extend(
                subdirs
                    .into_iter()
                    .map(|(entry, path)| (entry, fd.clone(), path)),
            );
        }
        Ok(())
    }

    /// Creates `entries` in `dir`; returns the subdirectories made, to descend into.
    /// File blocks are queued on `jobs`.
    fn nodes(
        &mut self,
        entries: Vec<Entry>,
        dir: &Arc<OwnedFd>,
        dir_path: &Path,
        jobs: &mut Vec<BlockJob>,
    ) -> Result<Vec<(Entry, PathBuf)>> {
        let mut subdirs = Vec::new();
        for entry in entries {
            let path = dir_path.join(std::ffi::OsStr::from_bytes(&entry.name));
            match self.node(entry, dir, &path, jobs) {
                Ok(Some(subdir)) => subdirs.push(subdir),
                Ok(None) => {}
                Err(e) => self.writer.error(format!("{}: {e}", path.display())),
            }
            // Each queued file holds a descriptor: hand them over before they run out.
            let (files, blocks) = self.queue_bound;
            if jobs.len() > blocks || self.open_files >= files {
                self.pool.submit(std::mem::take(jobs));
                self.open_files = 0;
                self.queue_bound = self.later_bound;
            }
        }
        Ok(subdirs)
    }

    fn node(
        &mut self,
        entry: Entry,
        dir: &Arc<OwnedFd>,
        path: &Path,
        jobs: &mut Vec<BlockJob>,
    ) -> std::io::Result<Option<(Entry, PathBuf)>> {
        let name = cname(&entry.name)?;
        let dirfd = dir.as_raw_fd();
        if self.writer.options.overwrite {
            self.writer.clear(dirfd, &name, entry.attrs.kind)?;
        }
        let report = |f: fn(&mut Report)| f(&mut crate::sync::lock(&self.writer.report));
        match entry.attrs.kind {
            Kind::Dir => {
                // SAFETY: mkdirat reads the NUL-terminated name; dirfd is open.
                let made = unsafe { libc::mkdirat(dirfd, name.as_ptr(), 0o700) };
                if made != 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST)
                {
                    return Err(std::io::Error::last_os_error());
                }
                report(|r| r.dirs += 1);
                Ok(Some((entry, path.to_owned())))
            }
            Kind::File => {
                if entry.attrs.nlink > 1 {
                    if self.first_links.contains_key(&entry.ino) {
                        self.later_links.push((entry.ino, path.to_owned()));
                        return Ok(None);
                    }
                    self.first_links.insert(entry.ino, path.to_owned());
                }
                // SAFETY: openat reads the NUL-terminated name; dirfd is open.
                let fd = check(unsafe {
                    libc::openat(
                        dirfd,
                        name.as_ptr(),
                        libc::O_WRONLY
                            | libc::O_CREAT
                            | libc::O_EXCL
                            | libc::O_NOFOLLOW
                            | libc::O_CLOEXEC,
                        0o600,
                    )
                })?;
                // SAFETY: fd was just opened and is owned by nobody else.
                let file = fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
                let prepared = (|| {
                    let Content::Blocks(blocks) = &entry.content else {
                        return Err(std::io::Error::other("a file without a block list"));
                    };
                    if let Some((index, _)) = blocks.last() {
                        if index.saturating_mul(self.writer.block_size) >= entry.attrs.size.max(1) {
                            return Err(std::io::Error::other(
                                "the manifest maps a block beyond the end of the file",
                            ));
                        }
                    }
                    file.set_len(entry.attrs.size)?;
                    Ok(blocks.clone())
                })();
                let blocks = match prepared {
                    Ok(blocks) => blocks,
                    Err(e) => {
                        drop(file);
                        // SAFETY: unlinkat reads the NUL-terminated name.
                        unsafe { libc::unlinkat(dirfd, name.as_ptr(), 0) };
                        self.first_links.remove(&entry.ino);
                        return Err(e);
                    }
                };
                let open = Arc::new(OpenFile {
                    dir: dir.clone(),
                    name,
                    path: path.to_owned(),
                    file,
                    entry,
                    remaining: AtomicUsize::new(blocks.len()),
                    failed: AtomicBool::new(false),
                });
                self.writer.progress.total(open.entry.attrs.size);
                self.open_files += 1;
                if blocks.is_empty() {
                    self.writer.finish_file(&open);
                }
                jobs.extend(blocks.into_iter().map(|(index, hash)| BlockJob {
                    file: open.clone(),
                    index,
                    hash,
                }));
                Ok(None)
            }
            Kind::Symlink => {
                let target = CString::new(entry.target.clone().unwrap_or_default())?;
                // SAFETY: symlinkat reads the two NUL-terminated strings.
                check(unsafe { libc::symlinkat(target.as_ptr(), dirfd, name.as_ptr()) })?;
                self.writer.apply_at(dirfd, &name, &entry)?;
                report(|r| r.symlinks += 1);
                Ok(None)
            }
            Kind::Fifo | Kind::Socket | Kind::CharDevice | Kind::BlockDevice => {
                let kind = match entry.attrs.kind {
                    Kind::Fifo => libc::S_IFIFO,
                    Kind::Socket => libc::S_IFSOCK,
                    Kind::CharDevice => libc::S_IFCHR,
                    _ => libc::S_IFBLK,
                };
                // SAFETY: mknodat reads the NUL-terminated name.
                check(unsafe {
                    libc::mknodat(
                        dirfd,
                        name.as_ptr(),
                        kind | 0o600,
                        libc::dev_t::from(entry.attrs.rdev),
                    )
                })?;
                self.writer.apply_at(dirfd, &name, &entry)?;
                report(|r| r.specials += 1);
                Ok(None)
            }
        }
    }

    /// Creates the further names of hard-linked files, now that their data is written.
    fn make_later_links(&mut self) {
        for (ino, path) in std::mem::take(&mut self.later_links) {
            let failed = crate::sync::lock(&self.writer.failed_inodes).contains(&ino);
            let Some(first) = self.first_links.get(&ino).filter(|_| !failed) else {
                self.writer.error(format!(
                    "{}: not restored (a hard link to a file that could not be)",
                    path.display()
                ));
                continue;
            };
            let link = || -> std::io::Result<()> {
                let first = CString::new(first.as_os_str().as_bytes())?;
                let new = CString::new(path.as_os_str().as_bytes())?;
                // SAFETY: both paths are NUL-terminated; flags 0 follows no symlink at the
                // source.
                check(unsafe {
                    libc::linkat(
                        libc::AT_FDCWD,
                        first.as_ptr(),
                        libc::AT_FDCWD,
                        new.as_ptr(),
                        0,
                    )
                })?;
                Ok(())
            };
            match link() {
                Ok(()) => crate::sync::lock(&self.writer.report).hard_links += 1,
                Err(e) => self.writer.error(format!("{}: {e}", path.display())),
            }
        }
    }
}

impl Writer<'_> {
    fn error(&self, message: String) {
        tracing::error!("{message}");
        crate::sync::lock(&self.report).errors.push(message);
    }

    /// Writes `block`, read for `job` (or the error reading it).
    fn write_block(&self, job: &BlockJob, block: Result<&[u8], &ReadError>) {
        let file = &job.file;
        if !file.failed.load(Ordering::SeqCst) {
            let offset = job.index * self.block_size;
            let result = match block {
                Err(e) => Err(e.to_string()),
                Ok(data) => {
                    let len = (file.entry.attrs.size.saturating_sub(offset)).min(data.len() as u64);
                    std::os::unix::fs::FileExt::write_all_at(
                        &file.file,
                        &data[..len as usize],
                        offset,
                    )
                    .map_err(|e| io_err(&file.path)(e).to_string())
                    .map(|()| {
                        start_write_back(&file.file, offset, len);
                        self.progress.advance(len);
                        crate::sync::lock(&self.report).bytes += len;
                    })
                }
            };
            if let Err(e) = result {
                if !file.failed.swap(true, Ordering::SeqCst) {
                    self.error(format!("{}: {e}; not restored", file.path.display()));
                }
            }
        }
        if file.remaining.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.finish_file(file);
        }
    }

    /// All blocks of a file are written (or one failed: then it is removed).
    fn finish_file(&self, file: &OpenFile) {
        if file.failed.load(Ordering::SeqCst) {
            // SAFETY: unlinkat reads the NUL-terminated name; the dir fd is open.
            unsafe { libc::unlinkat(file.dir.as_raw_fd(), file.name.as_ptr(), 0) };
            crate::sync::lock(&self.failed_inodes).insert(file.entry.ino);
            return;
        }
        match self.apply_metadata(file.file.as_raw_fd(), &file.entry) {
            Ok(()) => crate::sync::lock(&self.report).files += 1,
            Err(e) => self.error(format!("{}: {e}", file.path.display())),
        }
    }

    /// Owner, xattrs, mode and times of an open file or directory, in that order (chown
    /// clears set-id bits; times last, since the others change ctime only).
    fn apply_metadata(&self, fd: libc::c_int, entry: &Entry) -> std::io::Result<()> {
        if self.options.owners {
            // SAFETY: plain system call on an open descriptor.
            check(unsafe { libc::fchown(fd, entry.attrs.uid, entry.attrs.gid) })?;
        }
        for (name, value) in &entry.xattrs {
            let name = CString::new(name.clone())?;
            // SAFETY: fsetxattr reads `value.len()` bytes of value and the name.
            check(unsafe {
                libc::fsetxattr(fd, name.as_ptr(), value.as_ptr().cast(), value.len(), 0)
            })?;
        }
        // SAFETY: plain system call on an open descriptor.
        check(unsafe { libc::fchmod(fd, entry.attrs.perm & 0o7777) })?;
        let times = [timespec(entry.attrs.atime), timespec(entry.attrs.mtime)];
        // SAFETY: futimens reads the two timespecs.
        check(unsafe { libc::futimens(fd, times.as_ptr()) })?;
        Ok(())
    }

    /// Owner, mode and times of a node that cannot be opened (symlinks, fifos, devices).
    fn apply_at(&self, dirfd: libc::c_int, name: &CString, entry: &Entry) -> std::io::Result<()> {
        if self.options.owners {
            // SAFETY: fchownat reads the NUL-terminated name.
            check(unsafe {
                libc::fchownat(
                    dirfd,
                    name.as_ptr(),
                    entry.attrs.uid,
                    entry.attrs.gid,
                    libc::AT_SYMLINK_NOFOLLOW,
                )
            })?;
        }
        if entry.attrs.kind != Kind::Symlink {
            // SAFETY: fchmodat reads the NUL-terminated name.
            check(unsafe { libc::fchmodat(dirfd, name.as_ptr(), entry.attrs.perm & 0o7777, 0) })?;
        }
        let times = [timespec(entry.attrs.atime), timespec(entry.attrs.mtime)];
        // SAFETY: utimensat reads the name and the two timespecs.
        check(unsafe {
            libc::utimensat(
                dirfd,
                name.as_ptr(),
                times.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        })?;
        Ok(())
    }

    /// With --overwrite, makes room for `name`: an existing non-directory goes; an existing
    /// directory stays only for a directory (restored into).
    fn clear(&self, dirfd: libc::c_int, name: &CString, kind: Kind) -> std::io::Result<()> {
        let mut stat: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstatat fills `stat`; the name is NUL-terminated.
        let found =
            unsafe { libc::fstatat(dirfd, name.as_ptr(), &mut stat, libc::AT_SYMLINK_NOFOLLOW) };
        if found != 0 {
            return Ok(());
        }
        let is_dir = stat.st_mode & libc::S_IFMT == libc::S_IFDIR;
        match (is_dir, kind == Kind::Dir) {
            (true, true) => Ok(()),
            (true, false) => Err(std::io::Error::other(
                "a directory is in the way (remove it to restore this file)",
            )),
            // SAFETY: unlinkat reads the NUL-terminated name.
            _ => check(unsafe { libc::unlinkat(dirfd, name.as_ptr(), 0) }).map(drop),
        }
    }
}

/// One group of neighbouring blocks (see `Source::plan`), each with the places that need
/// it, and the batch it belongs to.
struct Group {
    blocks: Vec<(BlockHash, Vec<BlockJob>)>,
    batch: Arc<Batch>,
}

impl Drop for Group {
    /// Counts the group written, after its jobs (and with the last of a file's, its
    /// descriptor) are gone; also when a worker panics, so the walk never waits forever.
    fn drop(&mut self) {
        drop(std::mem::take(&mut self.blocks));
        self.batch.finish_group();
    }
}

/// The groups of one queue handed to the pool that are not written yet.
struct Batch {
    left: Mutex<usize>,
    done: Condvar,
}

impl Batch {
    fn wait(&self) {
        let mut left = crate::sync::lock(&self.left);
        while *left > 0 {
            left = crate::sync::wait(&self.done, left);
        }
    }

    fn finish_group(&self) {
        let mut left = crate::sync::lock(&self.left);
        *left = left.saturating_sub(1);
        if *left == 0 {
            self.done.notify_all();
        }
    }
}

/// Workers that fetch and write the queued blocks while the walk goes on creating the
/// next files: at most two queues are outstanding (the one written, the one after it),
/// so open descriptors stay bounded and the workers are never idle at a hand-over.
struct Pool<'a> {
    send: mpsc::Sender<Group>,
    outstanding: VecDeque<Arc<Batch>>,
    source: &'a dyn Source,
}

impl<'a> Pool<'a> {
    /// Starts `source.parallelism()` workers in `scope`, writing through `writer`.
    fn start<'scope>(
        scope: &'scope std::thread::Scope<'scope, '_>,
        writer: &'scope Writer<'a>,
    ) -> Pool<'a>
    where
        'a: 'scope,
    {
        let (send, receive) = mpsc::channel::<Group>();
        let receive = Arc::new(Mutex::new(receive));
        for _ in 0..writer.source.parallelism().max(1) {
            let receive = receive.clone();
            scope.spawn(move || {
                loop {
                    let group = crate::sync::lock(&receive).recv();
                    let Ok(group) = group else { return };
                    let hashes: Vec<BlockHash> =
                        group.blocks.iter().map(|(hash, _)| *hash).collect();
                    writer.source.blocks(&hashes, &mut |at, block| {
                        for job in &group.blocks[at].1 {
                            writer.write_block(job, block);
                        }
                    });
                }
            });
        }
        Pool {
            send,
            outstanding: VecDeque::new(),
            source: writer.source,
        }
    }

    /// Hands the queued blocks to the workers, in the groups the source plans (neighbours
    /// in one pack fetched together), each block to be written to every place that needs
    /// it; waits while the queue before the previous one is still being written.
    fn submit(&mut self, jobs: Vec<BlockJob>) {
        if jobs.is_empty() {
            return;
        }
        let mut wanted: HashMap<BlockHash, Vec<BlockJob>> = HashMap::new();
        let mut order = Vec::new();
        for job in jobs {
            let places = wanted.entry(job.hash).or_default();
            if places.is_empty() {
                order.push(job.hash);
            }
            places.push(job);
        }
        let groups = self.source.plan(order);
        let batch = Arc::new(Batch {
            left: Mutex::new(groups.len()),
            done: Condvar::new(),
        });
        for group in groups {
            let blocks = group
                .into_iter()
                .map(|hash| (hash, wanted.remove(&hash).unwrap_or_default()))
                .collect();
            let group = Group {
                blocks,
                batch: batch.clone(),
            };
            if self.send.send(group).is_err() {
                // No worker left (they only end with the pool): nothing more to wait for.
                return;
            }
        }
        self.outstanding.push_back(batch);
        while self.outstanding.len() > 1 {
            if let Some(oldest) = self.outstanding.pop_front() {
                oldest.wait();
            }
        }
    }

    /// Waits until every block handed over is written.
    fn finish(&mut self) {
        for batch in self.outstanding.drain(..) {
            batch.wait();
        }
    }
}
