//! The core of snapfs: the namespace operations of the live volume and its snapshots, the
//! write buffers and snapshot creation. No FUSE type appears here, so tests drive it
//! directly; `fuse.rs` only translates requests into these calls.

mod cache;
mod data;
pub mod error;
mod import;
mod node;
mod reserve;
mod snapshots;

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::blocks::{BlockHash, BlockStore};
use crate::catalog::{Catalog, InodeRow, Kind, LIVE, ROOT_INO, SnapshotRow, Tx};
use crate::store::StoreUrl;
use crate::sync::{Mutex, RwLock, lock};

use data::FileState;
pub use error::{Error, Result};
pub use node::{
    Attr, Caller, DirEntry, FsStats, NodeId, R_OK, SetAttr, SetTime, View, W_OK, X_OK, permits,
};
pub use snapshots::{SNAPDIR, SNAPDIR_NAME, SnapshotInfo, describe, progress_text, rfc3339};

/// Longest name of one directory entry, as on ext4.
pub const NAME_MAX: usize = 255;
/// Largest value of one extended attribute (Linux's XATTR_SIZE_MAX).
pub const XATTR_SIZE_MAX: usize = 64 * 1024;

/// How a volume is opened.
#[derive(Clone, Debug)]
pub struct Options {
    /// Block size of a new volume; an existing one keeps its own.
    pub block_size: u32,
    /// Dirty bytes buffered in memory, over all files, before writers flush.
    pub dirty_limit: u64,
    /// Bytes of verified blocks kept in memory for reads.
    pub cache_bytes: u64,
    /// List `.snapshots` in the root directory (it is reachable by name either way).
    pub snapdir_visible: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            block_size: DEFAULT_BLOCK_SIZE,
            dirty_limit: 64 << 20,
            cache_bytes: 64 << 20,
            snapdir_visible: false,
        }
    }
}

/// Default block size: see docs/benchmarks.md for the measurements behind it.
pub const DEFAULT_BLOCK_SIZE: u32 = 256 * 1024;

/// Set flags of setxattr(2).
pub const XATTR_CREATE: i32 = 1;
pub const XATTR_REPLACE: i32 = 2;

pub struct Volume {
    dir: PathBuf,
    /// Held for the volume's life: one process per data dir.
    _lock: fs::File,
    catalog: Mutex<Catalog>,
    blocks: BlockStore,
    block_size: u64,
    /// Write buffers and sizes of live files that are open (or being truncated).
    files: Mutex<HashMap<u64, Arc<Mutex<FileState>>>>,
    /// Listings taken at opendir, served by readdir until releasedir.
    dir_handles: Mutex<HashMap<u64, Arc<Vec<DirEntry>>>>,
    next_handle: AtomicU64,
    dirty_bytes: AtomicU64,
    dirty_limit: u64,
    /// Flushes hold it shared while their new blocks are not yet referenced; deleting
    /// unreferenced blocks holds it exclusively, so it never deletes one being adopted.
    gc: RwLock<()>,
    /// Every change to the live namespace or data holds it shared; taking a snapshot holds
    /// it exclusively, so a snapshot falls between two changes, never inside one.
    gate: RwLock<()>,
    /// Snapshots by id, mirrored from the catalog.
    snapshots: RwLock<BTreeMap<u64, SnapshotRow>>,
    snapdir_visible: bool,
    /// Wakes the uploader: a snapshot was taken, deleted or renamed.
    upload_wake: Arc<tokio::sync::Notify>,
    /// The object store, once attached: blocks not on the local disk come from there.
    remote: std::sync::OnceLock<cache::Remote>,
    /// The store of the volume this one was made from (`--from`), for the blocks they share.
    origin: std::sync::OnceLock<cache::Remote>,
    /// Stored blocks on the local disk, for eviction under `--cache-size` (set only then).
    evictable: std::sync::OnceLock<Mutex<cache::Evictable>>,
    /// Room set aside so that deleting works on a full disk.
    reserve: reserve::Reserve,
}

pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

fn check_name(name: &[u8]) -> Result<()> {
    if name.len() > NAME_MAX {
        return Err(Error::NameTooLong);
    }
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0)
    {
        return Err(Error::Invalid("not a valid file name"));
    }
    Ok(())
}

/// A store URL the catalog remembers; one that no longer parses is a damaged catalog.
fn parse_remembered(what: &str, url: &str) -> Result<StoreUrl> {
    StoreUrl::parse(url).map_err(|e| {
        Error::Catalog(crate::catalog::Error::Corrupt(format!(
            "remembered {what}: {e}"
        )))
    })
}

/// Present in the data dir while a volume is open: found at open, the last process to
/// open it died without shutting down.
const RUNNING_MARKER: &str = "running";

/// Takes the data dir's lock if no mount holds it (`None` if one does), for tools that
/// must not run beside a mount or want none to start meanwhile.
pub fn try_lock_data_dir(dir: &Path) -> Result<Option<fs::File>> {
    match take_data_dir_lock(dir) {
        Err(Error::Locked { .. }) => Ok(None),
        result => result.map(Some),
    }
}

fn take_data_dir_lock(dir: &Path) -> Result<fs::File> {
    let data_dir_err = |source| Error::DataDir {
        path: dir.to_owned(),
        source,
    };
    fs::create_dir_all(dir).map_err(data_dir_err)?;
    let path = dir.join("lock");
    let mut file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(data_dir_err)?;
    // SAFETY: flock only reads the descriptor, which `file` keeps open.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            let pid = fs::read_to_string(&path).unwrap_or_default();
            return Err(Error::Locked {
                dir: dir.to_owned(),
                pid: pid.trim().to_owned(),
            });
        }
        return Err(data_dir_err(err));
    }
    file.set_len(0).map_err(data_dir_err)?;
    write!(file, "{}", std::process::id()).map_err(data_dir_err)?;
    Ok(file)
}

impl Volume {
    /// Opens the volume in data dir `dir`, creating it on first use.
    pub fn open(dir: &Path, options: &Options) -> Result<Volume> {
        let lock_file = take_data_dir_lock(dir)?;
        // SAFETY: getuid/getgid cannot fail.
        let owner = unsafe { (libc::getuid(), libc::getgid()) };
        let catalog = Catalog::open(&dir.join("catalog.db"), options.block_size, now(), owner)?;
        let block_size = u64::from(catalog.block_size());
        let cache_blocks = (options.cache_bytes / block_size.max(1)) as usize;
        let blocks = BlockStore::open(&dir.join("blocks"), cache_blocks)?;
        let volume = Volume {
            dir: dir.to_owned(),
            _lock: lock_file,
            catalog: Mutex::new(catalog),
            blocks,
            block_size,
            files: Mutex::new(HashMap::new()),
            dir_handles: Mutex::new(HashMap::new()),
            next_handle: AtomicU64::new(1),
            dirty_bytes: AtomicU64::new(0),
            dirty_limit: options.dirty_limit,
            gc: RwLock::new(()),
            gate: RwLock::new(()),
            snapshots: RwLock::new(BTreeMap::new()),
            snapdir_visible: options.snapdir_visible,
            upload_wake: Arc::new(tokio::sync::Notify::new()),
            remote: std::sync::OnceLock::new(),
            origin: std::sync::OnceLock::new(),
            evictable: std::sync::OnceLock::new(),
            reserve: reserve::Reserve::new(dir),
        };
        volume.load_snapshots()?;
        volume.remove_orphans()?;
        let marker = dir.join(RUNNING_MARKER);
        if marker.exists() {
            volume.remove_stray_blocks()?;
        }
        fs::write(&marker, b"").map_err(|source| Error::DataDir {
            path: marker,
            source,
        })?;
        Ok(volume)
    }

    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    pub fn data_dir(&self) -> &Path {
        &self.dir
    }

    pub fn catalog_path(&self) -> PathBuf {
        self.dir.join("catalog.db")
    }

    /// The store this volume uploads to: the one it was first mounted with, which
    /// `requested` (a `--store` URL) may only repeat. The default is a directory beside
    /// the volume. A new volume's choice is kept by `remember_store` once it works.
    pub fn store_url(&self, requested: Option<&StoreUrl>) -> Result<StoreUrl> {
        match (self.setting("store")?, requested) {
            (Some(remembered), Some(requested)) if remembered != requested.to_string() => {
                Err(Error::StoreMismatch {
                    remembered,
                    requested: requested.to_string(),
                })
            }
            (Some(remembered), _) => parse_remembered("store", &remembered),
            (None, requested) => Ok(requested
                .cloned()
                .unwrap_or_else(|| StoreUrl::default_for(&self.dir))),
        }
    }

    /// A setting kept with the volume (store URLs, what a follower has imported).
    pub fn setting(&self, key: &str) -> Result<Option<String>> {
        Ok(lock(&self.catalog).read(|tx| tx.setting(key))?)
    }

    pub fn set_setting(&self, key: &str, value: &str) -> Result<()> {
        Ok(lock(&self.catalog).write(|tx| tx.set_setting(key, value))?)
    }

    /// The store of the volume this one was made from (`--from`), if any.
    pub fn origin(&self) -> Result<Option<StoreUrl>> {
        self.origin_snapshot()?
            .map(|(url, _)| parse_remembered("origin", &url))
            .transpose()
    }

    /// The origin's store URL and snapshot name (`--from URL@SNAPSHOT`), if any.
    pub fn origin_snapshot(&self) -> Result<Option<(String, String)>> {
        Ok(self
            .setting("origin")?
            .zip(self.setting("origin_snapshot")?))
    }

    pub fn remember_origin(&self, url: &StoreUrl, snapshot: &str) -> Result<()> {
        Ok(lock(&self.catalog).write(|tx| {
            tx.set_setting("origin", &url.to_string())?;
            tx.set_setting("origin_snapshot", snapshot)
        })?)
    }

    pub fn remember_store(&self, url: &StoreUrl) -> Result<()> {
        self.set_setting("store", &url.to_string())
    }

    /// The volume's identity in the store (random, made with its catalog).
    pub fn volume_id(&self) -> Result<String> {
        self.setting("volume_id")?
            .ok_or_else(|| Error::Catalog(crate::catalog::Error::Corrupt("no volume id".into())))
    }

    /// Notified when snapshots change, so the uploader looks for work.
    pub fn upload_wake(&self) -> Arc<tokio::sync::Notify> {
        self.upload_wake.clone()
    }

    /// Reads a block for the uploader, verified, without displacing the read cache.
    pub fn read_block_uncached(&self, hash: &BlockHash) -> Result<Vec<u8>> {
        Ok(self.blocks.read_uncached(hash)?)
    }

    /// Inodes unlinked while open when the daemon died: nothing names them, free them.
    fn remove_orphans(&self) -> Result<()> {
        lock(&self.catalog).write(|tx| {
            for ino in tx.orphan_inodes()? {
                tx.retire_inode(ino)?;
            }
            Ok::<_, Error>(())
        })?;
        self.collect_garbage()
    }

    /// Deletes block files that a process killed before it could record them left behind
    /// (nothing else writes blocks yet: the volume is not being served).
    fn remove_stray_blocks(&self) -> Result<()> {
        let known = lock(&self.catalog).read(|tx| tx.block_records())?;
        let known = known.into_iter().map(|record| record.hash).collect();
        let strays = self.blocks.strays(&known)?;
        for path in &strays {
            if let Err(e) = fs::remove_file(path) {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove a stray block");
            }
        }
        if !strays.is_empty() {
            tracing::info!(
                count = strays.len(),
                "removed block files a crash left behind"
            );
        }
        Ok(())
    }

    /// Deletes the data of blocks nothing references any more.
    fn collect_garbage(&self) -> Result<()> {
        // Most changes free nothing: find that out without the exclusive lock.
        if !lock(&self.catalog).read(|tx| tx.has_unreferenced_blocks())? {
            return Ok(());
        }
        let _exclusive = crate::sync::write(&self.gc);
        let freed = lock(&self.catalog).write(|tx| tx.take_unreferenced_blocks())?;
        for hash in freed {
            self.blocks.remove(&hash)?;
        }
        Ok(())
    }

    /// The catalog generation a view reads.
    fn view_generation(&self, view: View) -> Result<u64> {
        match view {
            View::Live => Ok(LIVE),
            View::Snapshot(id) => Ok(self.snapshot_row(id)?.generation),
        }
    }

    /// Refuses changes inside snapshots and to the control directory's own contents.
    fn writable(node: NodeId) -> Result<()> {
        match node.view {
            View::Live if node == SNAPDIR => Err(Error::NotPermitted(
                "only mkdir, rmdir and rename work in .snapshots",
            )),
            View::Live => Ok(()),
            View::Snapshot(_) => Err(Error::ReadOnly),
        }
    }

    /// Holds writers out of a snapshot being taken (see `gate`).
    fn enter_change(&self) -> crate::sync::RwLockReadGuard<'_, ()> {
        crate::sync::read(&self.gate)
    }

    /// Whether `name` in `parent` is the `.snapshots` entry of the live root.
    fn names_snapdir(parent: NodeId, name: &[u8]) -> bool {
        parent == NodeId::live(ROOT_INO) && name == SNAPDIR_NAME
    }

    /// `.snapshots` in the live root is not an ordinary entry: nothing may replace it.
    fn check_not_snapdir(parent: NodeId, name: &[u8]) -> Result<()> {
        if Self::names_snapdir(parent, name) {
            return Err(Error::NotPermitted(".snapshots cannot be changed"));
        }
        Ok(())
    }

    fn row(&self, node: NodeId) -> Result<InodeRow> {
        let view = self.view_generation(node.view)?;
        lock(&self.catalog)
            .read(|tx| tx.inode(view, node.ino))?
            .ok_or(Error::NotFound)
    }

    /// Attributes of a row, with the size and times of an open file's unflushed writes.
    fn attr_of(&self, view: View, row: &InodeRow) -> Attr {
        let mut attr = Attr::from_row(view, row);
        if view == View::Live && row.kind == Kind::File {
            let state = lock(&self.files).get(&row.ino).cloned();
            if let Some(state) = state {
                let state = lock(&state);
                attr.size = state.size;
                attr.mtime = state.mtime;
                attr.ctime = state.ctime;
            }
        }
        attr
    }

    /// Attributes of `row` seen through `view`: a snapshot's root shows the snapshot's
    /// creation time, a live file its unflushed size and times.
    fn node_attr(&self, view: View, row: &InodeRow) -> Result<Attr> {
        match view {
            View::Snapshot(id) if row.ino == ROOT_INO => self.snapshot_root_attr(id, row),
            _ => Ok(self.attr_of(view, row)),
        }
    }

    pub fn getattr(&self, node: NodeId) -> Result<Attr> {
        if node == SNAPDIR {
            return Ok(self.snapdir_attr(&self.row(NodeId::live(ROOT_INO))?));
        }
        self.node_attr(node.view, &self.row(node)?)
    }

    pub fn lookup(&self, parent: NodeId, name: &[u8]) -> Result<Attr> {
        if name.len() > NAME_MAX {
            return Err(Error::NameTooLong);
        }
        if parent == SNAPDIR {
            return match name {
                b"." => self.getattr(SNAPDIR),
                b".." => self.getattr(NodeId::live(ROOT_INO)),
                _ => self.getattr(NodeId {
                    view: View::Snapshot(self.snapshot_by_name(name)?.id),
                    ino: ROOT_INO,
                }),
            };
        }
        let is_root = parent.ino == ROOT_INO;
        match (parent.view, name) {
            (View::Live, SNAPDIR_NAME) if is_root => return self.getattr(SNAPDIR),
            (View::Snapshot(_), b"..") if is_root => return self.getattr(SNAPDIR),
            _ => {}
        }
        let view = self.view_generation(parent.view)?;
        let row = lock(&self.catalog).read(|tx| {
            let dir = tx.inode(view, parent.ino)?.ok_or(Error::NotFound)?;
            if dir.kind != Kind::Dir {
                return Err(Error::NotDir);
            }
            let ino = match name {
                b"." => dir.ino,
                b".." => dir.parent,
                _ => tx.lookup(view, parent.ino, name)?.ok_or(Error::NotFound)?.0,
            };
            tx.inode(view, ino)?.ok_or_else(|| {
                Error::Catalog(crate::catalog::Error::Corrupt(format!(
                    "entry {:?} names missing inode {ino}",
                    String::from_utf8_lossy(name)
                )))
            })
        })?;
        self.node_attr(parent.view, &row)
    }

    /// Creates a node of `kind` named `name` in `parent`. Shared by create, mkdir, mknod
    /// and symlink.
    fn make_node(
        &self,
        parent: NodeId,
        name: &[u8],
        new: NewNode<'_>,
        caller: Caller,
    ) -> Result<Attr> {
        let NewNode {
            kind,
            mode,
            rdev,
            target,
        } = new;
        Self::writable(parent)?;
        check_name(name)?;
        if Self::names_snapdir(parent, name) {
            return Err(Error::Exists);
        }
        let _change = self.enter_change();
        let time = now();
        let row = lock(&self.catalog).write(|tx| {
            let dir = live_dir(tx, parent.ino)?;
            if tx.lookup(LIVE, parent.ino, name)?.is_some() {
                return Err(Error::Exists);
            }
            let mut perm = mode & 0o7777;
            // A set-group-id directory hands its group down, and its bit to subdirectories.
            let gid = if dir.perm & libc::S_ISGID != 0 {
                if kind == Kind::Dir {
                    perm |= libc::S_ISGID;
                }
                dir.gid
            } else {
                caller.gid
            };
            let row = InodeRow {
                ino: tx.alloc_ino()?,
                kind,
                perm,
                uid: caller.uid,
                gid,
                nlink: if kind == Kind::Dir { 2 } else { 1 },
                size: target.map_or(0, |t| t.len() as u64),
                rdev,
                parent: if kind == Kind::Dir { parent.ino } else { 0 },
                atime: time,
                mtime: time,
                ctime: time,
                crtime: time,
                alloc: 0,
                target: target.map(<[u8]>::to_vec),
            };
            tx.insert_inode(&row)?;
            tx.insert_dentry(parent.ino, name, row.ino, kind)?;
            touch_dir(tx, parent.ino, i32::from(kind == Kind::Dir), time)?;
            Ok(row)
        })?;
        Ok(Attr::from_row(View::Live, &row))
    }

    pub fn mkdir(&self, parent: NodeId, name: &[u8], mode: u32, caller: Caller) -> Result<Attr> {
        if parent == SNAPDIR {
            let snapshot = self.create_snapshot(name)?;
            return self.getattr(NodeId {
                view: View::Snapshot(snapshot.id),
                ino: ROOT_INO,
            });
        }
        self.make_node(
            parent,
            name,
            NewNode {
                kind: Kind::Dir,
                mode,
                rdev: 0,
                target: None,
            },
            caller,
        )
    }

    /// Creates a regular file, fifo, socket or device node (`mode` carries the type).
    pub fn mknod(
        &self,
        parent: NodeId,
        name: &[u8],
        mode: u32,
        rdev: u32,
        caller: Caller,
    ) -> Result<Attr> {
        let kind = match mode & libc::S_IFMT {
            libc::S_IFREG | 0 => Kind::File,
            libc::S_IFIFO => Kind::Fifo,
            libc::S_IFSOCK => Kind::Socket,
            libc::S_IFCHR => Kind::CharDevice,
            libc::S_IFBLK => Kind::BlockDevice,
            libc::S_IFDIR => return Err(Error::Invalid("mknod cannot make a directory")),
            _ => return Err(Error::Invalid("unknown file type")),
        };
        self.make_node(
            parent,
            name,
            NewNode {
                kind,
                mode,
                rdev,
                target: None,
            },
            caller,
        )
    }

    pub fn symlink(
        &self,
        parent: NodeId,
        name: &[u8],
        target: &[u8],
        caller: Caller,
    ) -> Result<Attr> {
        if target.is_empty() {
            return Err(Error::NotFound);
        }
        if target.len() > libc::PATH_MAX as usize {
            return Err(Error::NameTooLong);
        }
        self.make_node(
            parent,
            name,
            NewNode {
                kind: Kind::Symlink,
                mode: 0o777,
                rdev: 0,
                target: Some(target),
            },
            caller,
        )
    }

    pub fn readlink(&self, node: NodeId) -> Result<Vec<u8>> {
        let row = self.row(node)?;
        match (row.kind, row.target) {
            (Kind::Symlink, Some(target)) => Ok(target),
            _ => Err(Error::Invalid("not a symbolic link")),
        }
    }

    pub fn link(&self, node: NodeId, new_parent: NodeId, new_name: &[u8]) -> Result<Attr> {
        Self::writable(node)?;
        Self::writable(new_parent)?;
        check_name(new_name)?;
        Self::check_not_snapdir(new_parent, new_name)?;
        let _change = self.enter_change();
        let time = now();
        let row = lock(&self.catalog).write(|tx| {
            let mut row = tx.inode(LIVE, node.ino)?.ok_or(Error::NotFound)?;
            if row.kind == Kind::Dir {
                return Err(Error::NotPermitted("hard links to directories"));
            }
            live_dir(tx, new_parent.ino)?;
            if tx.lookup(LIVE, new_parent.ino, new_name)?.is_some() {
                return Err(Error::Exists);
            }
            tx.insert_dentry(new_parent.ino, new_name, row.ino, row.kind)?;
            row.nlink += 1;
            row.ctime = time;
            tx.update_inode(&row)?;
            touch_dir(tx, new_parent.ino, 0, time)?;
            Ok(row)
        })?;
        Ok(self.attr_of(View::Live, &row))
    }

    pub fn unlink(&self, parent: NodeId, name: &[u8]) -> Result<()> {
        self.remove_entry(parent, name, false)
    }

    pub fn rmdir(&self, parent: NodeId, name: &[u8]) -> Result<()> {
        self.remove_entry(parent, name, true)
    }

    fn remove_entry(&self, parent: NodeId, name: &[u8], is_rmdir: bool) -> Result<()> {
        if parent == SNAPDIR && is_rmdir {
            return self.delete_snapshot(name);
        }
        Self::writable(parent)?;
        Self::check_not_snapdir(parent, name)?;
        if name.len() > NAME_MAX {
            return Err(Error::NameTooLong);
        }
        if is_rmdir && name == b"." {
            return Err(Error::Invalid("cannot remove '.'"));
        }
        if is_rmdir && name == b".." {
            return Err(Error::NotEmpty);
        }
        let _change = self.enter_change();
        let time = now();
        self.freeing(|| {
            lock(&self.catalog).write(|tx| {
                live_dir(tx, parent.ino)?;
                let (ino, kind) = tx.lookup(LIVE, parent.ino, name)?.ok_or(Error::NotFound)?;
                match (is_rmdir, kind == Kind::Dir) {
                    (true, false) => return Err(Error::NotDir),
                    (false, true) => return Err(Error::IsDir),
                    _ => {}
                }
                self.drop_entry(tx, parent.ino, name, ino, time)?;
                touch_dir(tx, parent.ino, 0, time)
            })
        })?;
        self.freeing(|| self.collect_garbage())
    }

    /// Removes entry `name` (naming `ino`) from `parent` and drops one link of `ino`:
    /// a directory (checked empty) goes at once, a file when its last link goes and it is
    /// not open.
    fn drop_entry(&self, tx: &Tx<'_>, parent: u64, name: &[u8], ino: u64, time: i64) -> Result<()> {
        let mut row = tx.inode(LIVE, ino)?.ok_or(Error::NotFound)?;
        if row.kind == Kind::Dir && !tx.dir_is_empty(LIVE, ino)? {
            return Err(Error::NotEmpty);
        }
        tx.retire_dentry(parent, name)?;
        if row.kind == Kind::Dir {
            tx.retire_inode(ino)?;
            return touch_dir(tx, parent, -1, time);
        }
        row.nlink = row.nlink.saturating_sub(1);
        row.ctime = time;
        // An open file lives on unnamed until its last release (see `release`).
        if row.nlink == 0 && !lock(&self.files).contains_key(&ino) {
            Ok(tx.retire_inode(ino)?)
        } else {
            Ok(tx.update_inode(&row)?)
        }
    }

    pub fn rename(
        &self,
        parent: NodeId,
        name: &[u8],
        new_parent: NodeId,
        new_name: &[u8],
        flags: u32,
    ) -> Result<()> {
        match (parent == SNAPDIR, new_parent == SNAPDIR) {
            (true, true) if flags == 0 => return self.rename_snapshot(name, new_name),
            (true, true) => return Err(Error::Invalid("snapshots take no rename flags")),
            (false, false) if parent.view == new_parent.view => {}
            _ => return Err(Error::CrossDevice),
        }
        Self::writable(parent)?;
        check_name(name)?;
        check_name(new_name)?;
        Self::check_not_snapdir(parent, name)?;
        Self::check_not_snapdir(new_parent, new_name)?;
        let exchange = flags & libc::RENAME_EXCHANGE != 0;
        let no_replace = flags & libc::RENAME_NOREPLACE != 0;
        if flags & !(libc::RENAME_EXCHANGE | libc::RENAME_NOREPLACE) != 0
            || (exchange && no_replace)
        {
            return Err(Error::Invalid("unsupported rename flags"));
        }
        let (from, to) = (parent.ino, new_parent.ino);
        let _change = self.enter_change();
        let time = now();
        lock(&self.catalog).write(|tx| {
            live_dir(tx, from)?;
            live_dir(tx, to)?;
            let (ino, kind) = tx.lookup(LIVE, from, name)?.ok_or(Error::NotFound)?;
            let target = tx.lookup(LIVE, to, new_name)?;
            if kind == Kind::Dir && from != to && is_ancestor(tx, ino, to)? {
                return Err(Error::Invalid("cannot move a directory into itself"));
            }
            if exchange {
                let (other, other_kind) = target.ok_or(Error::NotFound)?;
                if other_kind == Kind::Dir && from != to && is_ancestor(tx, other, from)? {
                    return Err(Error::Invalid("cannot move a directory into itself"));
                }
                tx.retire_dentry(from, name)?;
                tx.retire_dentry(to, new_name)?;
                tx.insert_dentry(to, new_name, ino, kind)?;
                tx.insert_dentry(from, name, other, other_kind)?;
                move_node(tx, ino, from, to, time)?;
                move_node(tx, other, to, from, time)?;
            } else {
                if let Some((other, other_kind)) = target {
                    if no_replace {
                        return Err(Error::Exists);
                    }
                    if other == ino {
                        // Two links to one file: POSIX says do nothing.
                        return Ok(());
                    }
                    match (kind == Kind::Dir, other_kind == Kind::Dir) {
                        (true, false) => return Err(Error::NotDir),
                        (false, true) => return Err(Error::IsDir),
                        _ => {}
                    }
                    self.drop_entry(tx, to, new_name, other, time)?;
                }
                tx.retire_dentry(from, name)?;
                tx.insert_dentry(to, new_name, ino, kind)?;
                move_node(tx, ino, from, to, time)?;
            }
            touch_dir(tx, from, 0, time)?;
            if from != to {
                touch_dir(tx, to, 0, time)?;
            }
            Ok(())
        })?;
        self.collect_garbage()
    }

    pub fn setattr(&self, node: NodeId, set: SetAttr) -> Result<Attr> {
        Self::writable(node)?;
        let _change = self.enter_change();
        let row = self.row(node)?;
        if row.kind == Kind::File {
            return self.setattr_file(node.ino, set);
        }
        if set.size.is_some() {
            return Err(if row.kind == Kind::Dir {
                Error::IsDir
            } else {
                Error::Invalid("cannot truncate this kind of file")
            });
        }
        let row = lock(&self.catalog).write(|tx| {
            let mut row = tx.inode(LIVE, node.ino)?.ok_or(Error::NotFound)?;
            apply_setattr(&mut row, &set, now());
            tx.update_inode(&row)?;
            Ok::<_, Error>(row)
        })?;
        Ok(Attr::from_row(View::Live, &row))
    }

    pub fn access(&self, node: NodeId, mask: u32, caller: Caller) -> Result<()> {
        let attr = self.getattr(node)?;
        if mask & W_OK != 0 && node.view != View::Live {
            return Err(Error::ReadOnly);
        }
        if permits(&attr, caller, mask) {
            Ok(())
        } else {
            Err(Error::AccessDenied)
        }
    }

    /// Takes a listing of directory `node` for readdir; returns its handle.
    pub fn opendir(&self, node: NodeId) -> Result<u64> {
        let entries = if node == SNAPDIR {
            self.snapdir_entries()?
        } else {
            self.dir_entries(node)?
        };
        let handle = self.next_handle.fetch_add(1, Ordering::Relaxed);
        lock(&self.dir_handles).insert(handle, Arc::new(entries));
        Ok(handle)
    }

    /// `.`, `..` and one directory per snapshot.
    fn snapdir_entries(&self) -> Result<Vec<DirEntry>> {
        let mut entries = vec![
            DirEntry {
                name: b".".to_vec(),
                attr: self.getattr(SNAPDIR)?,
            },
            DirEntry {
                name: b"..".to_vec(),
                attr: self.getattr(NodeId::live(ROOT_INO))?,
            },
        ];
        for snapshot in self.list_snapshots() {
            let root = NodeId {
                view: View::Snapshot(snapshot.id),
                ino: ROOT_INO,
            };
            entries.push(DirEntry {
                name: snapshot.name,
                attr: self.getattr(root)?,
            });
        }
        Ok(entries)
    }

    fn dir_entries(&self, node: NodeId) -> Result<Vec<DirEntry>> {
        let view = self.view_generation(node.view)?;
        let (dir, rows) = lock(&self.catalog).read(|tx| {
            let dir = tx.inode(view, node.ino)?.ok_or(Error::NotFound)?;
            if dir.kind != Kind::Dir {
                return Err(Error::NotDir);
            }
            let parent = tx.inode(view, dir.parent)?.unwrap_or_else(|| dir.clone());
            Ok((vec![dir, parent], tx.list_dir(view, node.ino)?))
        })?;
        let mut entries = Vec::with_capacity(rows.len() + 3);
        for (name, row) in [&b"."[..], b".."].into_iter().zip(&dir) {
            entries.push(DirEntry {
                name: name.to_vec(),
                attr: self.node_attr(node.view, row)?,
            });
        }
        if node.ino == ROOT_INO {
            match node.view {
                View::Live if self.snapdir_visible => entries.push(DirEntry {
                    name: SNAPDIR_NAME.to_vec(),
                    attr: self.snapdir_attr(&dir[0]),
                }),
                View::Snapshot(_) => entries[1].attr = self.getattr(SNAPDIR)?,
                View::Live => {}
            }
        }
        for entry in rows {
            entries.push(DirEntry {
                attr: self.attr_of(node.view, &entry.inode),
                name: entry.name,
            });
        }
        Ok(entries)
    }

    /// The entries of an open directory listing from position `offset` on.
    pub fn readdir(&self, handle: u64) -> Result<Arc<Vec<DirEntry>>> {
        lock(&self.dir_handles)
            .get(&handle)
            .cloned()
            .ok_or(Error::Invalid("unknown directory handle"))
    }

    pub fn releasedir(&self, handle: u64) {
        lock(&self.dir_handles).remove(&handle);
    }

    pub fn getxattr(&self, node: NodeId, name: &[u8]) -> Result<Vec<u8>> {
        if let Some(id) = snapshot_root(node) {
            let found = self
                .snapshot_xattrs(id)?
                .into_iter()
                .find(|(n, _)| n == name);
            if let Some((_, value)) = found {
                return Ok(value);
            }
        }
        let view = self.view_generation(node.view)?;
        lock(&self.catalog)
            .read(|tx| tx.xattr_get(view, node.ino, name))?
            .ok_or(Error::NoXattr)
    }

    pub fn listxattr(&self, node: NodeId) -> Result<Vec<Vec<u8>>> {
        if node == SNAPDIR {
            return Ok(Vec::new());
        }
        let view = self.view_generation(node.view)?;
        self.row(node)?;
        let mut names = lock(&self.catalog).read(|tx| tx.xattr_names(view, node.ino))?;
        if let Some(id) = snapshot_root(node) {
            names.extend(self.snapshot_xattrs(id)?.into_iter().map(|(name, _)| name));
        }
        Ok(names)
    }

    pub fn setxattr(&self, node: NodeId, name: &[u8], value: &[u8], flags: i32) -> Result<()> {
        if let Some(id) = snapshot_root(node) {
            return self.set_snapshot_tag(id, name, Some(value));
        }
        Self::writable(node)?;
        if name.is_empty() || name.len() > NAME_MAX {
            return Err(Error::Invalid("bad extended attribute name"));
        }
        if value.len() > XATTR_SIZE_MAX {
            return Err(Error::XattrTooBig);
        }
        let _change = self.enter_change();
        let time = now();
        lock(&self.catalog).write(|tx| {
            let mut row = tx.inode(LIVE, node.ino)?.ok_or(Error::NotFound)?;
            check_xattr_namespace(&row, name)?;
            let exists = tx.xattr_get(LIVE, node.ino, name)?.is_some();
            if flags & XATTR_CREATE != 0 && exists {
                return Err(Error::Exists);
            }
            if flags & XATTR_REPLACE != 0 && !exists {
                return Err(Error::NoXattr);
            }
            tx.xattr_set(node.ino, name, value)?;
            row.ctime = time;
            tx.update_inode(&row).map_err(Error::from)
        })
    }

    pub fn removexattr(&self, node: NodeId, name: &[u8]) -> Result<()> {
        if let Some(id) = snapshot_root(node) {
            return self.set_snapshot_tag(id, name, None);
        }
        Self::writable(node)?;
        let _change = self.enter_change();
        let time = now();
        lock(&self.catalog).write(|tx| {
            let mut row = tx.inode(LIVE, node.ino)?.ok_or(Error::NotFound)?;
            check_xattr_namespace(&row, name)?;
            if tx.xattr_get(LIVE, node.ino, name)?.is_none() {
                return Err(Error::NoXattr);
            }
            tx.xattr_remove(node.ino, name)?;
            row.ctime = time;
            tx.update_inode(&row).map_err(Error::from)
        })
    }

    pub fn statfs(&self) -> Result<FsStats> {
        let (files, _) = lock(&self.catalog).read(|tx| tx.usage())?;
        let stat = statvfs(&self.dir).map_err(|source| Error::DataDir {
            path: self.dir.clone(),
            source,
        })?;
        let scale = |n: u64| n * stat.f_frsize / 4096;
        Ok(FsStats {
            block_size: 4096,
            blocks: scale(stat.f_blocks),
            blocks_free: scale(stat.f_bfree),
            blocks_avail: scale(stat.f_bavail),
            files: files + stat.f_ffree,
            files_free: stat.f_ffree,
        })
    }

    /// Flushes everything and makes it durable: the last call before unmount.
    pub fn shutdown(&self) -> Result<()> {
        self.flush_all()?;
        self.sync()?;
        lock(&self.catalog).checkpoint()?;
        match fs::remove_file(self.dir.join(RUNNING_MARKER)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::DataDir {
                path: self.dir.join(RUNNING_MARKER),
                source: e,
            }),
            _ => Ok(()),
        }
    }
}

/// What a new node is, for `make_node`.
struct NewNode<'a> {
    kind: Kind,
    mode: u32,
    rdev: u32,
    target: Option<&'a [u8]>,
}

/// The snapshot whose root `node` is, if it is one.
fn snapshot_root(node: NodeId) -> Option<u64> {
    match node.view {
        View::Snapshot(id) if node.ino == ROOT_INO => Some(id),
        _ => None,
    }
}

fn statvfs(path: &Path) -> std::io::Result<libc::statvfs> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: statvfs writes into `stat`, a properly sized, owned struct.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(stat)
}

/// Linux allows user.* attributes only on regular files and directories; system.* (ACLs)
/// is not supported.
fn check_xattr_namespace(row: &InodeRow, name: &[u8]) -> Result<()> {
    if name.starts_with(b"user.") {
        if !matches!(row.kind, Kind::File | Kind::Dir) {
            return Err(Error::NotPermitted("user.* attributes on special files"));
        }
        return Ok(());
    }
    if name.starts_with(b"trusted.") || name.starts_with(b"security.") {
        return Ok(());
    }
    Err(Error::XattrUnsupported)
}

/// The live directory `ino`, or the error an operation inside a non-directory gets.
fn live_dir(tx: &Tx<'_>, ino: u64) -> Result<InodeRow> {
    let dir = tx.inode(LIVE, ino)?.ok_or(Error::NotFound)?;
    if dir.kind != Kind::Dir {
        return Err(Error::NotDir);
    }
    Ok(dir)
}

/// A directory's entries changed: update its times, and its link count by `nlink_delta`
/// subdirectories.
fn touch_dir(tx: &Tx<'_>, ino: u64, nlink_delta: i32, time: i64) -> Result<()> {
    let mut dir = live_dir(tx, ino)?;
    dir.nlink = dir.nlink.saturating_add_signed(nlink_delta);
    dir.mtime = time;
    dir.ctime = time;
    tx.update_inode(&dir)?;
    Ok(())
}

/// After `ino` moved from directory `from` to `to`: its ctime, and for a directory its
/// '..' and both parents' link counts.
fn move_node(tx: &Tx<'_>, ino: u64, from: u64, to: u64, time: i64) -> Result<()> {
    let mut row = tx.inode(LIVE, ino)?.ok_or(Error::NotFound)?;
    row.ctime = time;
    let is_dir_move = row.kind == Kind::Dir && from != to;
    if is_dir_move {
        row.parent = to;
    }
    tx.update_inode(&row)?;
    if is_dir_move {
        touch_dir(tx, from, -1, time)?;
        touch_dir(tx, to, 1, time)?;
    }
    Ok(())
}

/// Whether directory `ancestor` is `dir` or one of its ancestors in the live tree.
fn is_ancestor(tx: &Tx<'_>, ancestor: u64, mut dir: u64) -> Result<bool> {
    loop {
        if dir == ancestor {
            return Ok(true);
        }
        if dir == ROOT_INO {
            return Ok(false);
        }
        dir = tx.inode(LIVE, dir)?.ok_or(Error::NotFound)?.parent;
    }
}

/// Applies the non-size changes of a setattr to `row`, with POSIX's side effects.
fn apply_setattr(row: &mut InodeRow, set: &SetAttr, time: i64) {
    let resolve = |t: SetTime| match t {
        SetTime::At(t) => t,
        SetTime::Now => time,
    };
    if let Some(mode) = set.mode {
        row.perm = mode & 0o7777;
    }
    let owner_changes =
        set.uid.is_some_and(|u| u != row.uid) || set.gid.is_some_and(|g| g != row.gid);
    if let Some(uid) = set.uid {
        row.uid = uid;
    }
    if let Some(gid) = set.gid {
        row.gid = gid;
    }
    // chown clears set-user-id, and set-group-id where it means "group executes", on files
    // (unless root asks for the bits with the same call).
    if owner_changes && row.kind == Kind::File && set.mode.is_none() {
        row.perm &= !libc::S_ISUID;
        if row.perm & 0o010 != 0 {
            row.perm &= !libc::S_ISGID;
        }
    }
    if let Some(atime) = set.atime {
        row.atime = resolve(atime);
    }
    if let Some(mtime) = set.mtime {
        row.mtime = resolve(mtime);
    }
    row.ctime = set.ctime.unwrap_or(time);
}

#[cfg(test)]
pub(crate) mod tests;
