//! The core of snapfs: the namespace operations of the live volume and its snapshots, the
//! write buffers and snapshot creation. No FUSE type appears here, so tests drive it
//! directly; `fuse.rs` only translates requests into these calls.

mod activity;
mod block_reader;
mod checkpoints;
mod data;
pub mod error;
mod import;
mod locks;
mod namespace;
mod node;
mod open_files;
mod policy;
mod ranges;
mod reads;
mod reserve;
pub mod retention;
mod snapshot_table;
mod snapshots;
mod trash;

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::blocks::{self, BlockHash, BlockStore};
use crate::catalog::{
    BlockLocation, BlockRecord, Catalog, InodeRow, Kind, LIVE, ROOT_INO, Setting,
};
use crate::clock::{Clock, SystemClock};
use crate::store::{ObjectStore, StoreUrl};
use crate::sync::{Mutex, RwLock, lock};
use crate::upload::{UploadEvent, UploadEvents};

pub use activity::{Activity, Mark};
use block_reader::BlockReader;
pub use checkpoints::{
    CHECKPOINT_DIR, CHECKPOINTS_NAME, CheckpointInfo, CheckpointPolicy, CheckpointSpace,
    describe_checkpoints, parse_utc, thin,
};
pub use data::AttrsChanged;
pub use error::{Error, Result};
pub use locks::{
    XATTR_LOCK, format as format_lock, holds as lock_holds, parse as parse_lock, parse_time,
};
pub use node::{
    Attr, Caller, DirEntry, FileHandle, FsStats, NodeId, R_OK, SetAttr, SetTime, View, W_OK, X_OK,
    permits,
};
use open_files::OpenFiles;
pub use policy::{PolicyRun, Pruned, Scheduler, XATTR_POLICY, XATTR_PRUNE, retention_plan};
pub use ranges::CopyRange;
use reads::{ReadAhead, SnapshotReads};
use snapshot_table::{PinTable, SnapshotTable};
pub use snapshots::{
    SNAPDIR, SNAPDIR_NAME, SnapshotHooks, SnapshotInfo, XATTR_HOOK_ERROR, describe, progress_text,
    rfc3339,
};
pub use trash::{TRASHDIR_NAME, XATTR_DELETED, XATTR_EXPIRES};

pub use crate::catalog::{NAME_MAX, XATTR_SIZE_MAX};

/// How a volume is opened.
#[derive(Clone, Debug)]
pub struct Options {
    /// Block size of a new volume; an existing one keeps its own.
    pub block_size: u32,
    /// Dirty bytes buffered in memory, over all files, before writers flush. 16 MiB by
    /// default: the flusher stores blocks with their file unlocked, so a fast writer runs
    /// ahead of it up to this limit, and a snapshot flushes what it finds (at 64 MiB,
    /// snapshot medians under a streaming writer were 2 to 3 times as long, with writes
    /// no faster; docs/benchmarks.md).
    pub dirty_limit: u64,
    /// Bytes of verified blocks kept in memory for reads.
    pub cache_bytes: u64,
    /// List `.snapshots` in the root directory (it is reachable by name either way).
    pub snapdir_visible: bool,
    /// Where snapshot times and the policy's schedule read the time (inode times read
    /// the system clock: `now()`).
    pub clock: Arc<dyn Clock>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            block_size: DEFAULT_BLOCK_SIZE,
            dirty_limit: 16 << 20,
            cache_bytes: 64 << 20,
            snapdir_visible: false,
            clock: Arc::new(SystemClock),
        }
    }
}

/// Default block size: see docs/benchmarks.md for the measurements behind it.
pub const DEFAULT_BLOCK_SIZE: u32 = 256 * 1024;

/// Set flags of setxattr(2).
pub const XATTR_CREATE: i32 = 1;
pub const XATTR_REPLACE: i32 = 2;

/// The core's face: the namespace operations (`namespace.rs`), file data (`data.rs`) and
/// snapshots (`snapshots.rs`) of one volume, over parts that each own one concern and
/// one lock. The order of the locks is in docs/architecture.md ("Locks"):
/// gate, file state, gc, snapshot table, catalog; the rest are leaves.
pub struct Volume {
    dir: PathBuf,
    /// Shared with `blocks`, which records where fetched and evicted blocks are.
    catalog: Arc<Mutex<Catalog>>,
    block_size: u64,
    /// Where block bytes come from: memory, the local disk, the stores.
    blocks: Arc<BlockReader>,
    /// Loads blocks ahead of sequential readers.
    read_ahead: ReadAhead,
    /// What reads of snapshot files remember.
    snapshot_reads: SnapshotReads,
    /// Live files open or holding unflushed writes, and their handles.
    files: OpenFiles,
    /// Snapshots by id, mirrored from the catalog.
    snapshots: SnapshotTable,
    /// Checkpoints by id, mirrored from the catalog (see `checkpoints`).
    checkpoints: PinTable<crate::catalog::CheckpointRow>,
    /// Open directories, each with its listing once readdir took it.
    dir_handles: Mutex<HashMap<u64, DirHandle>>,
    next_dir_handle: AtomicU64,
    /// Flushes hold it shared while their new blocks are not yet referenced; deleting
    /// unreferenced blocks holds it exclusively, so it never deletes one being adopted.
    gc: RwLock<()>,
    /// Every change to the live namespace or data holds it shared; taking a snapshot holds
    /// it exclusively, so a snapshot falls between two changes, never inside one.
    gate: RwLock<()>,
    snapdir_visible: bool,
    /// Wakes the uploader: a snapshot was taken, deleted or renamed.
    upload_wake: Arc<tokio::sync::Notify>,
    /// When the mount last served a request; the uploader yields while it is recent.
    activity: Arc<Activity>,
    /// Room set aside so that deleting works on a full disk.
    reserve: reserve::Reserve,
    /// Commands run around each snapshot taken (see `hooks`); set once by the mount.
    hooks: OnceLock<Arc<dyn SnapshotHooks>>,
    /// The last snapshot a pre-snapshot hook refused, and why: `XATTR_HOOK_ERROR` of
    /// `.snapshots`, so the CLI can say more than mkdir's EIO. A leaf lock.
    hook_failure: Mutex<Option<(Vec<u8>, String)>>,
    /// Snapshot times and the policy's schedule.
    clock: Arc<dyn Clock>,
    /// The policy's scheduler state (see `policy`).
    schedule: Arc<policy::Schedule>,
    /// Told of live files whose attributes a flush changed (see `data::AttrsChanged`);
    /// set once by the mount.
    attrs_changed: OnceLock<data::AttrsChanged>,
    /// The thread `spawn_committer` started, joined by `shutdown`.
    committer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Held for the volume's life: one process per data dir. The last field, so it is let
    /// go last: `snapfs umount` waits for it, and by then the catalog must be closed.
    _lock: fs::File,
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

/// An open directory: opened, then listed by its first readdir (`Volume::readdir`).
enum DirHandle {
    Opened(NodeId),
    Listed(Arc<Vec<DirEntry>>),
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

/// Blocks freed per hold of the exclusive GC lock. Flushes (so writers, and a snapshot
/// taken meanwhile) wait while a batch's files are moved out of the store: all 8,192 of a
/// deleted 2 GiB file at once, deleted under the lock, held them for 1.6 s on this disk.
const GC_BATCH: usize = 64;

/// Takes the data dir's lock if no mount holds it (`None` if one does), for tools that
/// must not run beside a mount or want none to start meanwhile.
pub fn try_lock_data_dir(dir: &Path) -> Result<Option<fs::File>> {
    match take_data_dir_lock(dir) {
        Err(Error::Locked { .. }) => Ok(None),
        result => result.map(Some),
    }
}

/// Who holds a data dir's lock (a mount, or a tool such as `snapfs upload`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockHolder {
    /// The pid the holder wrote into the lock file.
    pub pid: String,
    /// When it took the lock: the lock file is rewritten then.
    pub since: SystemTime,
}

/// The holder of `dir`'s lock, `None` if nobody holds it. Only probes (a shared lock,
/// let go at once): the lock file is not changed.
pub fn data_dir_holder(dir: &Path) -> Result<Option<LockHolder>> {
    let path = dir.join("lock");
    let err = |source| Error::DataDir {
        path: path.clone(),
        source,
    };
    let file = match fs::File::open(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        opened => opened.map_err(err)?,
    };
    // SAFETY: flock only reads the descriptor, which `file` keeps open.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) } == 0 {
        return Ok(None);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
        return Err(err(e));
    }
    let pid = fs::read_to_string(&path).map_err(err)?;
    let since = file.metadata().and_then(|m| m.modified()).map_err(err)?;
    Ok(Some(LockHolder {
        pid: pid.trim().to_owned(),
        since,
    }))
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
        let mut catalog = Catalog::open(&dir.join("catalog.db"), options.block_size, now(), owner)?;
        catalog.keep_live_inodes(LIVE_INODES_KEPT);
        let block_size = u64::from(catalog.block_size());
        let cache_blocks = (options.cache_bytes / block_size.max(1)) as usize;
        let local = BlockStore::open(&dir.join("blocks"), cache_blocks)?;
        let catalog = Arc::new(Mutex::new(catalog));
        let blocks = Arc::new(BlockReader::new(local, block_size, catalog.clone()));
        let volume = Volume {
            dir: dir.to_owned(),
            read_ahead: ReadAhead::start(blocks.clone(), block_size, cache_blocks),
            snapshot_reads: SnapshotReads::default(),
            blocks,
            catalog,
            block_size,
            files: OpenFiles::new(options.dirty_limit),
            snapshots: SnapshotTable::default(),
            checkpoints: PinTable::default(),
            dir_handles: Mutex::new(HashMap::new()),
            next_dir_handle: AtomicU64::new(1),
            gc: RwLock::new(()),
            gate: RwLock::new(()),
            snapdir_visible: options.snapdir_visible,
            upload_wake: Arc::new(tokio::sync::Notify::new()),
            activity: Arc::default(),
            reserve: reserve::Reserve::new(dir),
            hooks: OnceLock::new(),
            hook_failure: Mutex::new(None),
            clock: options.clock.clone(),
            schedule: Arc::default(),
            attrs_changed: OnceLock::new(),
            committer: Mutex::new(None),
            _lock: lock_file,
        };
        volume.load_snapshots()?;
        volume.load_checkpoints()?;
        volume.remove_orphans()?;
        let marker = dir.join(RUNNING_MARKER);
        let boot = boot_id();
        match fs::read(&marker) {
            Ok(last_boot) => {
                // The last process died. Its machine too if it ran in another boot; an empty
                // marker may be one whose bytes that crash lost (or an older snapfs's).
                let machine_crashed = boot
                    .as_deref()
                    .is_none_or(|boot| last_boot != boot.as_bytes());
                volume.recover_from_crash(machine_crashed)?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(Error::DataDir {
                    path: marker,
                    source,
                });
            }
        }
        write_synced(&marker, boot.as_deref().unwrap_or_default()).map_err(|source| {
            Error::DataDir {
                path: marker,
                source,
            }
        })?;
        Ok(volume)
    }

    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    pub fn data_dir(&self) -> &Path {
        &self.dir
    }

    /// The mount's catalog connection, for the uploader's writes (see `upload::Worker`).
    pub fn shared_catalog(&self) -> Arc<Mutex<Catalog>> {
        self.catalog.clone()
    }

    pub fn catalog_path(&self) -> PathBuf {
        self.dir.join("catalog.db")
    }

    /// Where the local block files are (the uploader reads them on its own).
    pub fn blocks_dir(&self) -> PathBuf {
        self.dir.join("blocks")
    }

    /// Connects the read path to the volume's store (see `BlockReader::attach_store`).
    pub fn attach_store(
        &self,
        store: Arc<dyn ObjectStore>,
        runtime: tokio::runtime::Handle,
        cache: Option<u64>,
    ) -> Result<()> {
        // Remembered for `snapfs status`, which reports the cache against its limit.
        lock(&self.catalog).write_now(|tx| match cache {
            Some(bytes) => tx.set_setting(Setting::CacheSize, &bytes.to_string()),
            None => tx.clear_setting(Setting::CacheSize),
        })?;
        self.blocks.attach_store(store, runtime, cache)
    }

    /// Connects the read path to the origin volume's store (`--from`).
    pub fn attach_origin(&self, store: Arc<dyn ObjectStore>, runtime: tokio::runtime::Handle) {
        self.blocks.attach_origin(store, runtime);
    }

    /// The origin's store has new packs: a follower imported snapshots that use them.
    pub fn origin_changed(&self) {
        self.blocks.origin_changed();
    }

    /// The store this volume uploads to: the one it was first mounted with, which
    /// `requested` (a `--store` URL) may only repeat. The default is a directory beside
    /// the volume. A new volume's choice is kept by `remember_store` once it works.
    pub fn store_url(&self, requested: Option<&StoreUrl>) -> Result<StoreUrl> {
        match (self.setting(Setting::Store)?, requested) {
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
    pub fn setting(&self, setting: Setting) -> Result<Option<String>> {
        Ok(lock(&self.catalog).read(|tx| tx.setting(setting))?)
    }

    pub fn set_setting(&self, setting: Setting, value: &str) -> Result<()> {
        Ok(lock(&self.catalog).write_now(|tx| tx.set_setting(setting, value))?)
    }

    /// The store of the volume this one was made from (`--from`), if any.
    pub fn origin(&self) -> Result<Option<StoreUrl>> {
        self.setting(Setting::Origin)?
            .map(|url| parse_remembered("origin", &url))
            .transpose()
    }

    /// Whether this volume was made from snapshot `snapshot` of the store at `url`
    /// (`--from URL@SNAPSHOT`).
    pub fn is_made_from(&self, url: &StoreUrl, snapshot: &[u8]) -> Result<bool> {
        let (Some(origin), Some(name)) = (
            self.setting(Setting::Origin)?,
            self.setting(Setting::OriginSnapshot)?,
        ) else {
            return Ok(false);
        };
        // The name is kept escaped; volumes made before that keep it as it was typed.
        let same_name = name == crate::display::escaped(snapshot) || name.as_bytes() == snapshot;
        Ok(origin == url.to_string() && same_name)
    }

    /// Remembers the origin of a volume made by `--from`; the snapshot's name, which may
    /// be any bytes, is kept as `display::escaped` shows it (settings are text).
    pub fn remember_origin(&self, url: &StoreUrl, snapshot: &[u8]) -> Result<()> {
        Ok(lock(&self.catalog).write_now(|tx| {
            tx.set_setting(Setting::Origin, &url.to_string())?;
            tx.set_setting(Setting::OriginSnapshot, &crate::display::escaped(snapshot))
        })?)
    }

    pub fn remember_store(&self, url: &StoreUrl) -> Result<()> {
        self.set_setting(Setting::Store, &url.to_string())
    }

    /// The volume's identity in the store (random, made with its catalog).
    pub fn volume_id(&self) -> Result<String> {
        self.setting(Setting::VolumeId)?
            .ok_or_else(|| Error::Catalog(crate::catalog::Error::Corrupt("no volume id".into())))
    }

    /// Notified when snapshots change, so the uploader looks for work.
    pub fn upload_wake(&self) -> Arc<tokio::sync::Notify> {
        self.upload_wake.clone()
    }

    /// When the mount last served a request (the FUSE layer notes each one).
    pub fn activity(&self) -> Arc<Activity> {
        self.activity.clone()
    }

    /// Reloads the snapshot table from the catalog (a follower's, or after the uploader).
    pub fn refresh_snapshots(&self) -> Result<()> {
        self.load_snapshots()
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

    /// Cleans up after a process that died with the volume open: block files it wrote but
    /// never recorded go. After a crash of the machine, block files the disk lost part of
    /// go too (ext4 leaves a file its delayed allocation never wrote empty): their bytes
    /// are gone either way, and a block file left in place would be taken for the block
    /// when a later write brings the same bytes (`BlockStore::put`).
    fn recover_from_crash(&self, machine_crashed: bool) -> Result<()> {
        let records = lock(&self.catalog).read(|tx| tx.block_records())?;
        if machine_crashed {
            self.remove_damaged_blocks(&records);
        }
        self.remove_stray_blocks(records)
    }

    /// Removes the block files whose length is not their block's, and says which blocks the
    /// disk lost: reads of them fail (EIO) unless the store holds them.
    fn remove_damaged_blocks(&self, records: &[BlockRecord]) {
        let local = self.blocks.local();
        let in_files: Vec<&BlockRecord> = records.iter().filter(|r| r.local && !r.inline).collect();
        // A stat each: seconds for a million on a cold disk, which the mount waits for.
        tracing::warn!(
            block_files = in_files.len(),
            "the machine crashed while this volume was open: checking its block files"
        );
        let mut lost = Vec::new();
        for record in in_files {
            match local.len_of(&record.hash) {
                Some(len) if len == u64::from(record.len) => continue,
                Some(_) => {
                    if let Err(e) = local.remove(&record.hash) {
                        tracing::warn!(hash = %record.hash, error = %e, "cannot remove a damaged block");
                    }
                }
                None => {}
            }
            lost.push(record);
        }
        if lost.is_empty() {
            return;
        }
        let stored = lost
            .iter()
            .filter(|r| r.stored != BlockLocation::LocalOnly)
            .count();
        let hashes: HashSet<BlockHash> = lost.iter().map(|r| r.hash).collect();
        let holding = match lock(&self.catalog).read(|tx| tx.live_paths_holding(&hashes, 5)) {
            Ok(paths) => paths
                .iter()
                .map(|path| String::from_utf8_lossy(path).into_owned())
                .collect::<Vec<_>>()
                .join(", "),
            Err(e) => format!("(cannot list them: {e})"),
        };
        tracing::error!(
            lost = lost.len(),
            in_the_store = stored,
            files = %holding,
            "the machine crashed while this volume was open, and its disk lost block files \
             written in its last seconds and never synced (files: the first live files \
             holding them); reads of the blocks the store holds fetch them again, reads of \
             the others fail with EIO; `snapfs verify` lists every lost block"
        );
    }

    /// Deletes block files that a process killed before it could record them left behind
    /// (nothing else writes blocks yet: the volume is not being served).
    fn remove_stray_blocks(&self, records: Vec<BlockRecord>) -> Result<()> {
        let known = records.into_iter().map(|record| record.hash).collect();
        let strays = self.blocks.local().strays(&known)?;
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

    /// Deletes the data of blocks nothing references any more, a batch at a time. While a
    /// catalog group is open this waits for the committer: a block file must not go before
    /// the catalog change that stopped naming it has committed.
    fn collect_garbage(&self) -> Result<()> {
        self.collect_garbage_batches(usize::MAX)
    }

    /// `collect_garbage`, `batches` batches at most: what a caller holding a file's lock
    /// does, so that the file's writers (and a snapshot) wait for one batch, not for all
    /// of a deleted file's blocks (1.5 to 2 s for 2 GiB here: each unlink of a block file
    /// waits for the disk's discard). The committer, after its next commit, or the next
    /// call frees the rest.
    fn collect_garbage_batches(&self, batches: usize) -> Result<()> {
        for _ in 0..batches {
            // Most changes free nothing: find that out without the exclusive lock.
            {
                let catalog = lock(&self.catalog);
                if catalog.group_open() || !catalog.read(|tx| tx.has_unreferenced_blocks())? {
                    return Ok(());
                }
            }
            // Exclusive from taking a batch to moving its files out of the store: no flush
            // is then between finding a block's file already there and adopting it. The
            // slow part, deleting the files, comes after, with flushes running.
            let (taken, detached) = {
                let _exclusive = crate::sync::write(&self.gc);
                let freed =
                    lock(&self.catalog).write_now(|tx| tx.take_unreferenced_blocks(GC_BATCH))?;
                let mut detached = Vec::with_capacity(freed.len());
                for hash in &freed {
                    detached.extend(self.blocks.local().detach(hash)?);
                }
                (freed.len(), detached)
            };
            blocks::delete_detached(&detached)?;
            if taken < GC_BATCH {
                break;
            }
        }
        Ok(())
    }

    /// The catalog generation a view reads.
    fn view_generation(&self, view: View) -> Result<u64> {
        match view {
            View::Live => Ok(LIVE),
            View::Snapshot(id) => Ok(self.pinned(id)?.0),
        }
    }

    /// Refuses changes inside snapshots and to the control directory's own contents.
    fn writable(node: NodeId) -> Result<()> {
        match node.view {
            View::Live if node == trash::TRASHDIR => Err(Error::ReadOnly),
            View::Live if node == SNAPDIR => Err(Error::NotPermitted(
                "only mkdir, rmdir and rename work in .snapshots",
            )),
            View::Live if node == CHECKPOINT_DIR => Err(Error::NotPermitted(
                "checkpoints are read-only: rename one into .snapshots to promote it",
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

    /// Attributes of a row, as an open file's unflushed changes make them.
    fn attr_of(&self, view: View, row: &InodeRow) -> Attr {
        let mut attr = Attr::from_row(view, row);
        if view == View::Live && row.attrs.kind == Kind::File {
            if let Some(state) = self.files.peek(row.ino) {
                lock(&state).overlay(&mut attr.attrs);
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

    pub fn statfs(&self) -> Result<FsStats> {
        let files = lock(&self.catalog).live_inodes()?;
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

    /// Flushes everything, makes it durable and stops the committer: the last call before
    /// unmount.
    pub fn shutdown(&self) -> Result<()> {
        self.flush_all()?;
        self.sync()?;
        self.stop_committer()?;
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

/// This boot of the machine: the `running` marker holds it, so an open after a crash can
/// tell a killed process (the page cache survived) from a crashed machine (it did not).
fn boot_id() -> Option<String> {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|id| id.trim().to_owned())
        .filter(|id| !id.is_empty())
}

/// Writes `path` and makes it durable, with its directory entry.
fn write_synced(path: &Path, contents: &str) -> std::io::Result<()> {
    fs::write(path, contents)?;
    fs::File::open(path)?.sync_all()?;
    match path.parent() {
        Some(dir) => fs::File::open(dir)?.sync_all(),
        None => Ok(()),
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

/// Live inode rows the catalog keeps in memory (`Catalog::keep_live_inodes`): about 3
/// MiB, the working set of a build or a `cp -r` many times over.
const LIVE_INODES_KEPT: std::num::NonZeroUsize = std::num::NonZeroUsize::new(16_384).unwrap();

/// How often the committer syncs the block files and then folds the catalog's WAL in
/// while groups commit (`catalog::Checkpointer`): about as often as SQLite did under a
/// streaming writer, and the most a power loss takes of what nothing synced.
const FOLD_INTERVAL: Duration = Duration::from_secs(1);

/// Group commit needs this much free disk in the data dir: one group's commit must never
/// fail for room (it would take operations that returned with it).
const GROUP_COMMIT_MIN_FREE: u64 = 256 << 20;

impl Volume {
    /// Turns on the catalog's group commit and starts the thread that commits each group
    /// once it is `window` old (see `catalog::GroupCommit`; at most this much of what
    /// nothing synced is lost to a kill -9), then collects the garbage the group freed.
    /// It ends at `shutdown`, or when the volume is dropped. A zero window leaves group
    /// commit off.
    pub fn spawn_committer(self: &Arc<Self>, window: Duration) -> std::io::Result<()> {
        if window.is_zero() {
            return Ok(());
        }
        let (opened, groups) = std::sync::mpsc::sync_channel(1);
        let dir = self.dir.clone();
        let has_room = move || {
            statvfs(&dir)
                .is_ok_and(|s| s.f_bavail.saturating_mul(s.f_frsize) >= GROUP_COMMIT_MIN_FREE)
        };
        let checkpointer = lock(&self.catalog)
            .checkpointer()
            .map_err(std::io::Error::other)?;
        lock(&self.catalog).enable_group_commit(opened, Box::new(has_room));
        let volume = Arc::downgrade(self);
        let committer = std::thread::Builder::new()
            .name("snapfs-committer".into())
            .spawn(move || {
                let mut folded = Instant::now();
                let mut unfolded = false;
                loop {
                    // A group committed since the last fold is folded in once the interval
                    // is over, even if no group follows: an idle volume's last second of
                    // work must not wait for the kernel's writeback, which may write the
                    // WAL before the blocks it names.
                    let opened = if unfolded {
                        match groups.recv_timeout(FOLD_INTERVAL.saturating_sub(folded.elapsed())) {
                            Ok(()) => true,
                            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => false,
                            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
                        }
                    } else {
                        match groups.recv() {
                            Ok(()) => true,
                            // Group commit is off (`stop_committer`), or the catalog
                            // (and its sender) was dropped with the volume.
                            Err(_) => return,
                        }
                    };
                    if opened {
                        std::thread::sleep(window);
                    }
                    let Some(volume) = volume.upgrade() else {
                        return;
                    };
                    if opened {
                        let committed = lock(&volume.catalog).commit();
                        if let Err(e) = committed
                            .map_err(Error::from)
                            .and_then(|()| volume.collect_garbage())
                        {
                            tracing::error!(error = %e, "background catalog commit failed");
                        }
                        unfolded = true;
                    }
                    if folded.elapsed() >= FOLD_INTERVAL {
                        // What stays out (committed during the sync, or kept by a reader)
                        // is folded in a second later, whether a group comes or not.
                        unfolded = !volume.sync_and_fold(&checkpointer);
                        folded = Instant::now();
                    }
                }
            })?;
        *lock(&self.committer) = Some(committer);
        Ok(())
    }

    /// Syncs the block files, then folds the WAL into the database file, which makes it
    /// durable: after a power loss the catalog must not name block files the disk never
    /// got. The fence comes first: what another thread commits during the sync may name
    /// blocks the sync missed, so it waits for the next fold. Whether the WAL is now
    /// folded in whole.
    fn sync_and_fold(&self, checkpointer: &crate::catalog::Checkpointer) -> bool {
        let fence = match checkpointer.fence() {
            Ok(fence) => fence,
            Err(e) => {
                tracing::warn!(error = %e, "cannot fence the WAL; it waits");
                return false;
            }
        };
        if let Err(e) = self.blocks.local().sync() {
            tracing::warn!(error = %e, "cannot sync block files; the WAL waits");
            return false;
        }
        let folded = checkpointer.fold();
        drop(fence);
        match folded {
            Ok((frames, folded)) => folded == frames,
            Err(e) => {
                tracing::warn!(error = %e, "cannot fold the catalog's WAL in");
                false
            }
        }
    }

    /// Commits the open group and ends the committer, once it has let go of the volume
    /// and closed its connection to the catalog: the process must not exit before, or
    /// the WAL is left behind (`snapfs umount` promises a closed catalog).
    fn stop_committer(&self) -> Result<()> {
        // Its sender gone, the committer's wait for the next group ends.
        lock(&self.catalog).disable_group_commit()?;
        let committer = lock(&self.committer).take();
        if let Some(committer) = committer
            && committer.join().is_err()
        {
            tracing::error!("the committer thread panicked");
        }
        Ok(())
    }
}

/// The uploader's events: the only way it reaches the core.
impl UploadEvents for Volume {
    fn upload_event(&self, event: UploadEvent<'_>) -> Result<()> {
        match event {
            UploadEvent::SnapshotsChanged => {
                self.load_snapshots()?;
                self.note_uploads();
                Ok(())
            }
            UploadEvent::BlocksStored(blocks) => self.blocks.stored(blocks),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
