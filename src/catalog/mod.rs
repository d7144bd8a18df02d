//! The catalog: the SQLite database that holds the namespace, block maps and snapshots.
//! This module owns every SQL statement in snapfs.
//!
//! Rows are versioned by generation (see `schema.rs`). Readers name the generation they
//! view: a snapshot's pinned generation, or [`LIVE`] for the live volume. Writers always
//! change the live generation: a row born in it is changed in place, an older one is
//! retired (`death = G`) and replaced, so every snapshot keeps seeing what it saw.

mod checkpoints;
mod lifecycle;
mod packs;
mod policy;
mod schema;
mod status;
mod upload;
mod verify;

pub use checkpoints::CheckpointRow;
pub use lifecycle::{LockMode, SnapshotLock, Trash};
pub use packs::{FileOrder, PackRow, PackTotals, PackUsage};
pub use status::{LocalUsage, Outstanding};
pub use upload::{Completion, ObjectFate};
pub use verify::{BlockRecord, Finding, PackRecord};

use std::cell::{Cell, RefCell};
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::mpsc::SyncSender;
use std::time::Instant;

use rusqlite::{Connection, OptionalExtension, Row, ToSql, TransactionBehavior, params};

use crate::blocks::BlockHash;

/// The view generation that sees exactly the live volume's rows.
pub const LIVE: u64 = i64::MAX as u64;

/// Longest name of one directory entry (and snapshot name, and xattr name), as on ext4.
pub const NAME_MAX: usize = 255;
/// Largest value of one extended attribute (Linux's XATTR_SIZE_MAX).
pub const XATTR_SIZE_MAX: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open catalog {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("{path} is not a snapfs catalog, or it is corrupt ({source})")]
    NotACatalog {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error(
        "catalog {path} has format version {found}; this snapfs reads up to {supported}: upgrade snapfs"
    )]
    TooNew {
        path: PathBuf,
        found: i64,
        supported: usize,
    },
    #[error(
        "{path} is an SQLite database of another program, not a snapfs catalog; left untouched"
    )]
    Foreign { path: PathBuf },
    #[error("data dir {0}: no snapfs volume here (no catalog.db)")]
    NoVolume(PathBuf),
    #[error("catalog query failed: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("catalog is inconsistent: {0}")]
    Corrupt(String),
    #[error("catalog file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl Error {
    /// The disk under the catalog is full: the caller should see ENOSPC, not EIO.
    pub fn is_disk_full(&self) -> bool {
        match self {
            Error::Sqlite(rusqlite::Error::SqliteFailure(e, _)) => {
                e.code == rusqlite::ErrorCode::DiskFull
            }
            Error::Io { source, .. } => source.raw_os_error() == Some(libc::ENOSPC),
            _ => false,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Folds the WAL into the database file on a connection of its own, with the mount's
/// connection free meanwhile. SQLite's own checkpoint runs inside the commit that passes
/// 1,000 pages, so under the catalog's lock, and its two syncs took up to 230 ms behind a
/// writer's writeback: every operation and snapshot waited for them.
pub struct Checkpointer {
    conn: Connection,
    /// Holds the read transaction of a `Fence`.
    fence: Connection,
}

/// While it lasts, no checkpoint folds in a frame committed after it was taken (see
/// `Checkpointer::fence`): SQLite folds no further than the snapshot of its oldest reader.
pub struct Fence<'c> {
    _read: EndRead<'c>,
}

/// Past this many pages of WAL the mount's connection checkpoints itself after all: the
/// bound on the WAL should its `Checkpointer` not run (SQLite's default is 1,000).
const SELF_CHECKPOINT_PAGES: u32 = 16_000;

impl Checkpointer {
    /// Fences the WAL at its end: whatever is committed from now on, by any connection,
    /// stays out of the database file until the fence is dropped. The committer fences,
    /// then syncs the block files, then folds, so a fold makes no catalog row durable
    /// whose block file the sync may have missed (one a group committed meanwhile names).
    pub fn fence(&self) -> Result<Fence<'_>> {
        run_statement(&self.fence, "BEGIN")?;
        let fence = Fence {
            _read: EndRead(&self.fence),
        };
        // BEGIN takes no snapshot: the first read does.
        self.fence
            .prepare_cached("SELECT 1 FROM sqlite_schema LIMIT 1")?
            .exists([])?;
        Ok(fence)
    }

    /// Folds every commit the WAL holds into the database file, unless a reader still
    /// needs it (a passive checkpoint: writers go on meanwhile). Returns the frames in the
    /// WAL and how many of them are folded in now.
    pub fn fold(&self) -> Result<(i64, i64)> {
        Ok(self
            .conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                Ok((r.get(1)?, r.get(2)?))
            })?)
    }
}

/// The catalog's WAL file, to sync once the catalog is released (`commit_for_sync`).
pub struct WalSync {
    file: Option<std::fs::File>,
    path: PathBuf,
}

impl WalSync {
    pub fn sync(self) -> Result<()> {
        let Some(file) = self.file else {
            return Ok(());
        };
        file.sync_data().map_err(|source| Error::Io {
            path: self.path,
            source,
        })
    }
}

/// The type of a namespace node, as stored in `inodes.kind`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    File = 1,
    Dir = 2,
    Symlink = 3,
    Fifo = 4,
    Socket = 5,
    CharDevice = 6,
    BlockDevice = 7,
}

impl TryFrom<i64> for Kind {
    type Error = Error;
    fn try_from(value: i64) -> Result<Self> {
        Ok(match value {
            1 => Kind::File,
            2 => Kind::Dir,
            3 => Kind::Symlink,
            4 => Kind::Fifo,
            5 => Kind::Socket,
            6 => Kind::CharDevice,
            7 => Kind::BlockDevice,
            other => return Err(Error::Corrupt(format!("unknown inode kind {other}"))),
        })
    }
}

impl ToSql for Kind {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        Ok((*self as i64).into())
    }
}

/// An inode's attributes: what stat(2) shows and a restore recreates. One type for the
/// catalog's rows (`InodeRow`), the store's entries (`manifest::Entry`) and the core's
/// answers (`volume::Attr`), so moving an inode between them copies one value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attrs {
    pub kind: Kind,
    /// Permission bits with set-user-id, set-group-id and sticky (no file type).
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub size: u64,
    pub rdev: u32,
    /// Nanoseconds since the Unix epoch.
    pub atime: i64,
    pub mtime: i64,
    pub ctime: i64,
    pub crtime: i64,
}

/// One inode as a generation sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InodeRow {
    pub ino: u64,
    pub attrs: Attrs,
    /// A directory's parent directory (0 for other kinds, which may have many).
    pub parent: u64,
    /// Bytes of blocks stored for it (holes cost nothing).
    pub alloc: u64,
    /// A symlink's target.
    pub target: Option<Vec<u8>>,
}

const INODE_COLUMNS: &str = "ino, kind, perm, uid, gid, nlink, size, rdev, parent, \
                             atime, mtime, ctime, crtime, alloc, target";

impl TryFrom<&Row<'_>> for InodeRow {
    type Error = Error;
    /// Decodes the `INODE_COLUMNS` starting at column 0.
    fn try_from(row: &Row<'_>) -> Result<Self> {
        Ok(InodeRow {
            ino: row.get(0)?,
            attrs: Attrs {
                kind: Kind::try_from(row.get::<_, i64>(1)?)?,
                perm: row.get(2)?,
                uid: row.get(3)?,
                gid: row.get(4)?,
                nlink: row.get(5)?,
                size: row.get(6)?,
                rdev: row.get(7)?,
                atime: row.get(9)?,
                mtime: row.get(10)?,
                ctime: row.get(11)?,
                crtime: row.get(12)?,
            },
            parent: row.get(8)?,
            alloc: row.get(13)?,
            target: row.get(14)?,
        })
    }
}

/// A directory entry joined with the inode it names, as a generation sees both.
#[derive(Clone, Debug)]
pub struct DirEntryRow {
    pub name: Vec<u8>,
    pub inode: InodeRow,
}

/// A block a flush maps into a file (`WriteTx::set_block`).
#[derive(Clone, Copy, Debug)]
pub struct NewBlock<'a> {
    pub hash: &'a BlockHash,
    pub len: u32,
    /// The bytes of a small block, which the catalog holds (`blocks::INLINE_MAX`).
    pub inline: Option<&'a [u8]>,
    /// Its pieces' chaining values (`blocks::hash_and_pieces`).
    pub pieces: Option<&'a [u8]>,
}

/// A directory entry that one of two generations sees and the other does not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntryChange {
    pub parent: u64,
    pub name: Vec<u8>,
    pub ino: u64,
    pub kind: Kind,
}

/// Where a snapshot's upload stands (`snapshots.state`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SnapshotState {
    /// Taken; its blocks and manifest are not all in the store yet.
    Pending,
    /// Everything it needs is in the store.
    Completed,
    /// The upload hit what retries cannot fix (`SnapshotRow::error` says what).
    Failed,
}

impl SnapshotState {
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotState::Pending => "pending",
            SnapshotState::Completed => "completed",
            SnapshotState::Failed => "failed",
        }
    }
}

impl std::fmt::Display for SnapshotState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// Lets tests and reports compare with the name users see.
impl PartialEq<&str> for SnapshotState {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl ToSql for SnapshotState {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        Ok(self.as_str().into())
    }
}

impl rusqlite::types::FromSql for SnapshotState {
    fn column_result(value: rusqlite::types::ValueRef<'_>) -> rusqlite::types::FromSqlResult<Self> {
        match value.as_str()? {
            "pending" => Ok(SnapshotState::Pending),
            "completed" => Ok(SnapshotState::Completed),
            "failed" => Ok(SnapshotState::Failed),
            other => Err(rusqlite::types::FromSqlError::Other(
                format!("unknown snapshot state {other:?}").into(),
            )),
        }
    }
}

/// Where the only copies outside the local disk of a block are (`blocks.stored`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BlockLocation {
    /// Not uploaded yet: the local disk holds the only copy.
    LocalOnly = 0,
    /// In this volume's store.
    Store = 1,
    /// In the store of the volume this one was made from (`--from`): never uploaded,
    /// never deleted by this volume.
    Origin = 2,
}

impl BlockLocation {
    /// Whether some store holds the block, so the local copy may be evicted.
    pub fn is_stored(self) -> bool {
        self != BlockLocation::LocalOnly
    }
}

impl rusqlite::types::FromSql for BlockLocation {
    fn column_result(value: rusqlite::types::ValueRef<'_>) -> rusqlite::types::FromSqlResult<Self> {
        match value.as_i64()? {
            0 => Ok(BlockLocation::LocalOnly),
            1 => Ok(BlockLocation::Store),
            2 => Ok(BlockLocation::Origin),
            other => Err(rusqlite::types::FromSqlError::OutOfRange(other)),
        }
    }
}

/// The values a volume keeps in `settings`, each under one key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Setting {
    /// The volume's identity in the store (random, made with its catalog).
    VolumeId,
    /// The store URL the volume uploads to, once its check passed.
    Store,
    /// The store URL of the volume this one was made from (`--from`).
    Origin,
    /// The name of the snapshot this volume was made from.
    OriginSnapshot,
    /// The store a read-only volume follows.
    Follows,
    /// The id (in the followed store) of the snapshot a follower's live tree shows.
    FollowedId,
    /// The mount's `--cache-size` in bytes (absent: no limit), for `snapfs status`.
    CacheSize,
    /// The command run before each snapshot (`--pre-snapshot`; empty: none).
    PreSnapshot,
    /// The command run after each snapshot (`--post-snapshot`; empty: none).
    PostSnapshot,
    /// Seconds a hook may run before it is killed (`--hook-timeout`).
    HookTimeout,
    /// What a failed pre-snapshot hook does to the snapshot (`--pre-snapshot-failure`).
    PreSnapshotFailure,
    /// Seconds a deleted snapshot stays in the recycle bin (`--trash-days`; absent or 0:
    /// no bin).
    TrashRetention,
}

impl Setting {
    fn key(self) -> &'static str {
        match self {
            Setting::VolumeId => "volume_id",
            Setting::Store => "store",
            Setting::Origin => "origin",
            Setting::OriginSnapshot => "origin_snapshot",
            Setting::Follows => "follows",
            Setting::FollowedId => "followed_id",
            Setting::CacheSize => "cache_size",
            Setting::PreSnapshot => "pre_snapshot",
            Setting::PostSnapshot => "post_snapshot",
            Setting::HookTimeout => "hook_timeout",
            Setting::PreSnapshotFailure => "pre_snapshot_failure",
            Setting::TrashRetention => "trash_retention",
        }
    }
}

/// A snapshot as the catalog records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotRow {
    pub id: u64,
    pub name: Vec<u8>,
    pub generation: u64,
    pub created: i64,
    pub state: SnapshotState,
    /// Bytes of all regular files when the snapshot was taken.
    pub logical_bytes: u64,
    pub upload: UploadProgress,
    /// Why the upload failed, for a `failed` snapshot.
    pub error: Option<String>,
    /// In the recycle bin since, until (`name` is then its name in the bin).
    pub trash: Option<Trash>,
    pub lock: Option<SnapshotLock>,
}

/// How far a snapshot's upload has come. The totals are unknown (`None`) until the
/// uploader reaches the snapshot and sizes what it must send.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UploadProgress {
    pub total_blocks: Option<u64>,
    pub total_bytes: Option<u64>,
    pub sent_blocks: u64,
    pub sent_bytes: u64,
    /// Compressed bytes actually sent.
    pub stored_bytes: u64,
}

impl TryFrom<&Row<'_>> for SnapshotRow {
    type Error = Error;
    fn try_from(row: &Row<'_>) -> Result<Self> {
        let (trash, lock) = lifecycle::lifecycle_of(row)?;
        let mut name: Vec<u8> = row.get(1)?;
        if trash.is_some() {
            name.drain(..lifecycle::TRASH_PREFIX.len().min(name.len()));
        }
        Ok(SnapshotRow {
            id: row.get(0)?,
            name,
            generation: row.get(2)?,
            created: row.get(3)?,
            state: row.get(4)?,
            logical_bytes: row.get(5)?,
            upload: UploadProgress {
                total_blocks: row.get(6)?,
                total_bytes: row.get(7)?,
                sent_blocks: row.get(8)?,
                sent_bytes: row.get(9)?,
                stored_bytes: row.get(10)?,
            },
            error: row.get(11)?,
            trash,
            lock,
        })
    }
}

const SNAPSHOT_COLUMNS: &str = "id, name, generation, created, state, logical_bytes, \
     upload_blocks, upload_bytes, sent_blocks, sent_bytes, stored_bytes, error, \
     deleted, expires, lock_mode, lock_until, lock_cool_off";

/// The inode number of the live root directory (FUSE's root id).
pub const ROOT_INO: u64 = 1;
/// First inode number handed to new files; those below are reserved for the mount.
pub const FIRST_FREE_INO: u64 = 16;

pub struct Catalog {
    conn: Connection,
    /// The live generation G, cached from `meta`.
    generation: u64,
    block_size: u32,
    /// Set on the mount's connection: writes join one open transaction (see `GroupCommit`).
    group: Option<GroupCommit>,
    /// Set on the mount's connection: its live inode rows, read without a query.
    live_inodes: Option<LiveInodes>,
    /// Set on the mount's connection: inode numbers it reserved and has not used yet.
    free_inos: Option<FreeInos>,
    /// What the open group changed in the live totals, written just before it commits.
    unsettled: Cell<Totals>,
}

/// Live inode rows kept in memory (`Catalog::keep_live_inodes`): a GETATTR, a parent's
/// update or a flush then reads no row (reading an inode row was 15% of the daemon's
/// time creating or deleting small files). Inode rows are written only by `insert_inode`,
/// `update_inode` and `retire_inode`, which keep the copies current; a write that fails
/// empties it, since SQLite rolls back what the copies already show. Only a connection
/// that makes every change to the catalog may keep one: another's would go unseen.
type LiveInodes = RefCell<KeptLive>;

struct KeptLive {
    rows: lru::LruCache<u64, InodeRow>,
    /// Live inodes known to have no xattr. The kernel asks for `security.capability`
    /// before every write to a file (FUSE clears `SB_NOSEC`, so no inode is ever marked
    /// as having none): a SQLite read per write, 9% of the daemon's time in a SQLite
    /// workload. An inode joins when it is created (`insert_inode`: its number is new, or
    /// `retire_inode` retired its xattrs with it) or when a read finds it has none; it
    /// leaves at `xattr_set` and `retire_inode`. Dropped on any failure, like the rows.
    bare: lru::LruCache<u64, ()>,
}

impl KeptLive {
    fn clear(&mut self) {
        self.rows.clear();
        self.bare.clear();
    }
}

/// Whether live inode `ino` is known to have no xattr (see `KeptLive::bare`).
fn known_bare(kept: Option<&LiveInodes>, ino: u64) -> bool {
    kept.is_some_and(|kept| kept.borrow().bare.contains(&ino))
}

/// Inode numbers reserved from `next_ino` a batch at a time (`Catalog::keep_live_inodes`):
/// one UPDATE of `meta` per create was 5% of the daemon's time creating small files. A
/// batch is reserved by the write that needs it, so whatever rolls that write back (a
/// failed operation, a failed commit, a crash) takes the reservation with it; the numbers
/// are dropped on any failure, like `LiveInodes`. Numbers reserved and never used are
/// skipped, never reused.
type FreeInos = Cell<std::ops::Range<u64>>;

/// How many inode numbers `FreeInos` reserves at once.
const INO_BATCH: u64 = 1024;

/// A change to the live totals in `meta` (`live_inodes`, `live_bytes`: statfs reads the
/// first, a snapshot records the second). Triggers kept them, at two or three UPDATEs of
/// `meta` per small file (8% of the daemon's time creating or deleting them); now
/// `insert_inode`, `update_inode` and `retire_inode` add up their changes and each write
/// applies the sum in its own transaction, a group once before it commits.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Totals {
    inodes: i64,
    bytes: i64,
}

impl Totals {
    /// What the live inode `row` adds to the totals.
    fn of(row: &InodeRow) -> Totals {
        let bytes = match row.attrs.kind {
            Kind::File => i64::try_from(row.attrs.size).unwrap_or(i64::MAX),
            _ => 0,
        };
        Totals { inodes: 1, bytes }
    }

    fn plus(self, other: Totals) -> Totals {
        Totals {
            inodes: self.inodes + other.inodes,
            bytes: self.bytes + other.bytes,
        }
    }

    fn minus(self, other: Totals) -> Totals {
        self.plus(Totals {
            inodes: -other.inodes,
            bytes: -other.bytes,
        })
    }

    /// Adds the change to `meta` through `conn`, inside the caller's transaction.
    fn apply(self, conn: &Connection) -> Result<()> {
        if self == Totals::default() {
            return Ok(());
        }
        conn.prepare_cached(
            "UPDATE meta SET value = value + CASE key WHEN 'live_inodes' THEN ?1 ELSE ?2 END
             WHERE key IN ('live_inodes', 'live_bytes')",
        )?
        .execute(params![self.inodes, self.bytes])?;
        Ok(())
    }
}

/// Group commit: instead of one SQLite commit per operation (a dozen WAL page writes and
/// as many lock calls each), operations join an open transaction, each inside its own
/// savepoint, and the whole group commits at once: when it is `window` old (the mount's
/// committer thread), at fsync, snapshot and unmount. Every operation still lands whole or
/// not at all, and a crash leaves the catalog as it was after some whole group: a state
/// that existed. What fsync covered is committed and synced before fsync returns.
struct GroupCommit {
    /// When the open group began, if one is open.
    open_since: Option<Instant>,
    /// Operations in the open group.
    ops: u32,
    /// Told (without blocking) when a group opens, so someone commits it in time.
    opened: SyncSender<()>,
    /// Whether the disk has room for a whole group's commit: near a full disk every
    /// operation commits alone, so each one that cannot land fails with ENOSPC itself.
    has_room: Box<dyn Fn() -> bool + Send>,
}

/// A group commits after this many operations even before its window ends, which bounds
/// the WAL one commit appends.
const GROUP_MAX_OPS: u32 = 4096;

/// A savepoint's journal (the pages an operation of a group first changed, to roll it
/// back alone) stays in memory up to this size. SQLite's default is 64 KiB, 16 pages: an
/// unlink changes more (its inode, dentry, block map and block rows and their indexes), so
/// from the first such operation on, every operation of the group wrote its pages to a
/// temporary file (`subjournalPage` under `pwrite`, 7% of the daemon's samples in a run
/// of unlinks). Larger statements still spill to a file past this. It must stay under 128
/// KiB: the journal is kept in chunks of this size and spills by writing each chunk at
/// once, and SQLite's unix VFS writes at most 128 KiB - 1 per call (`seekAndWriteFd`
/// masks the length), so a larger chunk spilled as a short write, `SQLITE_FULL`: ENOSPC
/// for the unlink of a 10 GiB file.
const SAVEPOINT_JOURNAL_IN_MEMORY: std::ffi::c_int = 120 << 10;

/// Process-wide SQLite settings, made once before the first connection opens.
fn configure_sqlite() {
    static CONFIGURED: std::sync::Once = std::sync::Once::new();
    CONFIGURED.call_once(|| {
        // SAFETY: this option takes one int. sqlite3_config must not run while another
        // thread uses SQLite: every connection is opened through this module, after this
        // call (a test's own connection opened meanwhile at worst leaves the default).
        let rc = unsafe {
            rusqlite::ffi::sqlite3_config(
                rusqlite::ffi::SQLITE_CONFIG_STMTJRNL_SPILL,
                SAVEPOINT_JOURNAL_IN_MEMORY,
            )
        };
        if rc != rusqlite::ffi::SQLITE_OK {
            // SQLite was initialized already: only a cost, savepoint journals spill sooner.
            tracing::debug!(rc, "cannot keep savepoint journals in memory");
        }
    });
}

/// Prepared statements a connection keeps. A small file's create, flush and unlink run
/// more than 16 distinct statements (savepoints, the inode, dentry and block map writes,
/// the retire pair of each table...), which rusqlite's default of 16 would evict in turn.
const STATEMENT_CACHE: usize = 256;

impl Catalog {
    /// Opens (creating if needed) the catalog at `path`. A new volume gets `block_size`;
    /// an existing one keeps the block size it was created with.
    pub fn open(path: &Path, block_size: u32, now: i64, owner: (u32, u32)) -> Result<Catalog> {
        let open_err = |source| Error::Open {
            path: path.to_owned(),
            source,
        };
        configure_sqlite();
        let conn = Connection::open(path).map_err(open_err)?;
        // Check what the file is before writing anything to it.
        refuse_foreign(&conn, path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        migrate(&conn)?;

        let mut catalog = Catalog {
            conn,
            generation: 0,
            block_size: 0,
            group: None,
            live_inodes: None,
            free_inos: None,
            unsettled: Cell::default(),
        };
        catalog.generation = match catalog.meta("generation")? {
            Some(g) => g,
            None => catalog.initialize(block_size, now, owner)?,
        };
        catalog.block_size = catalog
            .meta("block_size")?
            .ok_or_else(|| Error::Corrupt("no block size recorded".into()))?
            .try_into()
            .map_err(|_| Error::Corrupt("block size out of range".into()))?;
        Ok(catalog)
    }

    /// Opens the catalog of the volume in `data_dir` for reading only; a dir without one
    /// is `NoVolume` (nothing is created).
    pub fn open_data_dir_read_only(data_dir: &Path) -> Result<Catalog> {
        let path = data_dir.join("catalog.db");
        if !path.exists() {
            return Err(Error::NoVolume(data_dir.to_owned()));
        }
        Catalog::open_read_only(&path)
    }

    /// Opens an existing catalog for reading only (CLI commands beside a running mount).
    /// One an older snapfs wrote is read through a copy in memory, migrated: the file
    /// stays as it is until a mount upgrades it, and every query sees the current schema.
    pub fn open_read_only(path: &Path) -> Result<Catalog> {
        configure_sqlite();
        let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(|source| Error::Open {
                path: path.to_owned(),
                source,
            })?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        let version = refuse_foreign(&conn, path)?;
        let conn = if (version as usize) < schema::MIGRATIONS.len() {
            let mut copy = Connection::open_in_memory()?;
            rusqlite::backup::Backup::new(&conn, &mut copy)?.run_to_completion(
                1024,
                std::time::Duration::ZERO,
                None,
            )?;
            migrate(&copy)?;
            copy
        } else {
            conn
        };
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        let mut catalog = Catalog {
            conn,
            generation: 0,
            block_size: 0,
            group: None,
            live_inodes: None,
            free_inos: None,
            unsettled: Cell::default(),
        };
        catalog.generation = catalog
            .meta("generation")?
            .ok_or_else(|| Error::Corrupt("no generation recorded".into()))?;
        catalog.block_size = catalog.meta("block_size")?.unwrap_or(0) as u32;
        Ok(catalog)
    }

    fn initialize(&mut self, block_size: u32, now: i64, (uid, gid): (u32, u32)) -> Result<u64> {
        let root = InodeRow {
            ino: ROOT_INO,
            attrs: Attrs {
                kind: Kind::Dir,
                perm: 0o755,
                uid,
                gid,
                nlink: 2,
                size: 0,
                rdev: 0,
                atime: now,
                mtime: now,
                ctime: now,
                crtime: now,
            },
            parent: ROOT_INO,
            alloc: 0,
            target: None,
        };
        write_alone(&mut self.conn, 1, (None, None), |t| {
            for (key, value) in [
                ("generation", 1),
                ("next_ino", FIRST_FREE_INO),
                ("block_size", u64::from(block_size)),
            ] {
                t.conn.execute(
                    "INSERT INTO meta (key, value) VALUES (?1, ?2)",
                    params![key, value],
                )?;
            }
            t.insert_inode(&root)
        })?;
        Ok(1)
    }

    fn meta(&self, key: &str) -> Result<Option<u64>> {
        Ok(self
            .conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()?)
    }

    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// The live generation G.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Runs `f` as one write: all its changes land together or not at all.
    /// Alone, it takes the write lock at BEGIN (waiting for the other connection if it
    /// writes): a deferred one that read first could not upgrade after the other connection
    /// committed, and would fail with SQLITE_BUSY at once. With group commit on, it joins
    /// the open group inside a savepoint, rolled back alone if `f` fails.
    pub fn write<T, E: From<Error>>(
        &mut self,
        f: impl FnOnce(&WriteTx<'_>) -> Result<T, E>,
    ) -> Result<T, E> {
        if !self.join_group()? {
            let caches = (self.live_inodes.as_ref(), self.free_inos.as_ref());
            let alone = write_alone(&mut self.conn, self.generation, caches, f);
            return self.forget_live_inodes_if_failed(alone);
        }
        run_statement(&self.conn, "SAVEPOINT op")?;
        let t = WriteTx::new(
            &self.conn,
            self.generation,
            self.live_inodes.as_ref(),
            self.free_inos.as_ref(),
        );
        match f(&t) {
            Ok(value) => {
                let released = run_statement(&self.conn, "RELEASE op");
                self.forget_live_inodes_if_failed(released)?;
                self.unsettled
                    .set(self.unsettled.get().plus(t.totals.take()));
                if let Some(group) = &mut self.group {
                    group.ops += 1;
                    if group.ops >= GROUP_MAX_OPS {
                        self.commit()?;
                    }
                }
                Ok(value)
            }
            Err(e) => {
                self.undo_op();
                Err(e)
            }
        }
    }

    /// Like `write`, committed before it returns (with the open group, if any): for
    /// changes another connection must see at once, or that a file deletion relies on.
    pub fn write_now<T, E: From<Error>>(
        &mut self,
        f: impl FnOnce(&WriteTx<'_>) -> Result<T, E>,
    ) -> Result<T, E> {
        let value = self.write(f)?;
        self.commit()?;
        Ok(value)
    }

    /// Keeps up to `capacity` live inode rows in memory (the mount's connection, which
    /// makes every change to the catalog while it runs: see `LiveInodes`).
    /// It reserves inode numbers in batches too (see `FreeInos`).
    pub fn keep_live_inodes(&mut self, capacity: NonZeroUsize) {
        self.live_inodes = Some(RefCell::new(KeptLive {
            rows: lru::LruCache::new(capacity),
            bare: lru::LruCache::new(capacity),
        }));
        self.free_inos = Some(Cell::new(0..0));
    }

    /// Drops the kept inode rows and reserved numbers: a rollback may have undone what
    /// they show.
    fn forget_live_inodes(&self) {
        if let Some(kept) = &self.live_inodes {
            kept.borrow_mut().clear();
        }
        if let Some(free) = &self.free_inos {
            free.take();
        }
    }

    /// `result` of a write, with the kept inode rows dropped if it failed.
    fn forget_live_inodes_if_failed<T, E>(
        &self,
        result: std::result::Result<T, E>,
    ) -> std::result::Result<T, E> {
        if result.is_err() {
            self.forget_live_inodes();
        }
        result
    }

    /// Turns group commit on (the mount's connection): `opened` hears of each new group,
    /// and `has_room` says whether the disk can take a whole group's commit.
    pub fn enable_group_commit(
        &mut self,
        opened: SyncSender<()>,
        has_room: Box<dyn Fn() -> bool + Send>,
    ) {
        self.group = Some(GroupCommit {
            open_since: None,
            ops: 0,
            opened,
            has_room,
        });
    }

    /// Commits the open group and turns group commit off: from now on every write
    /// commits alone, and whoever waits on the `opened` receiver hears the sender go.
    pub fn disable_group_commit(&mut self) -> Result<()> {
        self.commit()?;
        self.group = None;
        Ok(())
    }

    /// A connection of its own that folds the WAL into the database file (see
    /// `Checkpointer`); from now on this connection leaves that to it, up to
    /// `SELF_CHECKPOINT_PAGES`.
    pub fn checkpointer(&self) -> Result<Checkpointer> {
        let path = self.file_path()?;
        let open_err = |source| Error::Open {
            path: path.into(),
            source,
        };
        let conn = Connection::open(path).map_err(open_err)?;
        let fence = Connection::open(path).map_err(open_err)?;
        self.conn
            .pragma_update(None, "wal_autocheckpoint", SELF_CHECKPOINT_PAGES)?;
        Ok(Checkpointer { conn, fence })
    }

    /// Number of live inodes, for statfs: the counter in `meta` and what the open group
    /// added to it (see `Totals`).
    pub fn live_inodes(&self) -> Result<u64> {
        let written: i64 = self
            .conn
            .prepare_cached("SELECT value FROM meta WHERE key = 'live_inodes'")?
            .query_row([], |r| r.get(0))?;
        Ok(u64::try_from(written + self.unsettled.get().inodes).unwrap_or(0))
    }

    /// Whether live inode `ino` is known to have no xattr: then a getxattr needs no read
    /// transaction, whose BEGIN and COMMIT cost more than the answer (see `KeptLive::bare`).
    pub fn live_inode_is_bare(&self, ino: u64) -> bool {
        known_bare(self.live_inodes.as_ref(), ino)
    }

    /// Whether a group is open: its changes are not committed yet.
    pub fn group_open(&self) -> bool {
        self.group.as_ref().is_some_and(|g| g.open_since.is_some())
    }

    /// Commits the open group, if any.
    pub fn commit(&mut self) -> Result<()> {
        let Some(group) = &mut self.group else {
            return Ok(());
        };
        if group.open_since.take().is_none() {
            return Ok(());
        }
        let ops = std::mem::take(&mut group.ops);
        let committed = self
            .unsettled
            .take()
            .apply(&self.conn)
            .and_then(|()| run_statement(&self.conn, "COMMIT"));
        if let Err(e) = committed {
            self.forget_live_inodes();
            // SQLite rolls a failed COMMIT back: operations that returned are lost.
            tracing::error!(error = %e, ops, "catalog group commit failed: its operations are lost");
            if !self.conn.is_autocommit() {
                let _ = self.conn.execute_batch("ROLLBACK");
            }
            return Err(e);
        }
        Ok(())
    }

    /// Opens a group if group commit is on and none is open; whether `write` joins one.
    fn join_group(&mut self) -> Result<bool> {
        let Some(group) = &mut self.group else {
            return Ok(false);
        };
        if group.open_since.is_some() {
            return Ok(true);
        }
        if !(group.has_room)() {
            return Ok(false);
        }
        run_statement(&self.conn, "BEGIN IMMEDIATE")?;
        group.open_since = Some(Instant::now());
        group.ops = 0;
        // Full means a wakeup is already on its way.
        let _ = group.opened.try_send(());
        Ok(true)
    }

    /// Undoes the failed operation of the open group. If SQLite rolled back the whole
    /// group itself (it may, on a full disk or an I/O error), the group is gone: logged.
    fn undo_op(&mut self) {
        self.forget_live_inodes();
        if self.conn.is_autocommit() {
            self.unsettled.take();
            if let Some(group) = &mut self.group {
                group.open_since = None;
                let ops = std::mem::take(&mut group.ops);
                tracing::error!(
                    ops,
                    "SQLite rolled back the open catalog group: its operations are lost"
                );
            }
            return;
        }
        if let Err(e) = run_statement(&self.conn, "ROLLBACK TO op")
            .and_then(|()| run_statement(&self.conn, "RELEASE op"))
        {
            tracing::error!(error = %e, "cannot roll back a failed catalog operation");
        }
    }

    /// Runs `f` inside one read transaction: every statement sees the same state even
    /// while another connection commits. `ReadTx` has no method that writes. Inside an
    /// open group it reads the group's state (this connection's own changes).
    pub fn read<T, E: From<Error>>(
        &self,
        f: impl FnOnce(&ReadTx<'_>) -> Result<T, E>,
    ) -> Result<T, E> {
        if self.group_open() {
            return f(&ReadTx {
                conn: &self.conn,
                g: self.generation,
                live_inodes: self.live_inodes.as_ref(),
            });
        }
        // Cached statements: rusqlite's transactions parse BEGIN and COMMIT at every
        // read, about 6% of the daemon's work for a getxattr.
        run_statement(&self.conn, "BEGIN")?;
        let _end = EndRead(&self.conn);
        f(&ReadTx {
            conn: &self.conn,
            g: self.generation,
            live_inodes: self.live_inodes.as_ref(),
        })
    }

    /// Pins the live generation as snapshot `name`, with `tags` and `lock`, and starts the
    /// next one. O(1): no row is copied. One transaction: a crash leaves either the whole
    /// snapshot or none of it.
    pub fn create_snapshot(
        &mut self,
        name: &[u8],
        created: i64,
        state: SnapshotState,
        tags: &[(Vec<u8>, Vec<u8>)],
        lock: Option<&SnapshotLock>,
    ) -> Result<SnapshotRow> {
        let mut row = self.pin_generation(
            name,
            created,
            &state,
            SNAPSHOT_COLUMNS,
            |r| SnapshotRow::try_from(r),
            |tx, row| {
                for (key, value) in tags {
                    tx.set_snapshot_tag(row.id, key, value)?;
                }
                match lock {
                    Some(_) => tx.set_snapshot_lock(row.id, lock).map(|_| ()),
                    None => Ok(()),
                }
            },
        )?;
        // The row was read back as inserted, before its lock was set.
        row.lock = lock.copied();
        Ok(row)
    }

    /// Inserts a `snapshots` row (in `state`) pinning the live generation, lets `fill`
    /// add what belongs to it in the same transaction, starts the next generation, and
    /// returns the row's `columns` decoded by `decode`.
    fn pin_generation<T>(
        &mut self,
        name: &[u8],
        created: i64,
        state: &dyn ToSql,
        columns: &str,
        decode: impl FnOnce(&Row<'_>) -> Result<T>,
        fill: impl FnOnce(&WriteTx<'_>, &T) -> Result<()>,
    ) -> Result<T> {
        self.commit()?;
        let g = self.generation;
        let caches = (self.live_inodes.as_ref(), self.free_inos.as_ref());
        let pinned = write_alone(&mut self.conn, g, caches, |t| -> Result<T> {
            let row = t.conn.query_row(
                &format!(
                    "INSERT INTO snapshots (name, generation, created, state, logical_bytes)
                 VALUES (?1, ?2, ?3, ?4, (SELECT value FROM meta WHERE key = 'live_bytes'))
                 RETURNING {columns}"
                ),
                params![name, g, created, state],
                |r| Ok(decode(r)),
            )??;
            fill(t, &row)?;
            t.conn.execute(
                "UPDATE meta SET value = ?1 WHERE key = 'generation'",
                [g + 1],
            )?;
            Ok(row)
        });
        let row = self.forget_live_inodes_if_failed(pinned)?;
        self.generation = g + 1;
        Ok(row)
    }

    /// Deletes snapshot (or checkpoint) `id` and every row only it could see (see
    /// `exclusive_rows`). The blocks it leaves unreferenced are the garbage collector's
    /// (`take_unreferenced_blocks`).
    pub fn delete_snapshot(&mut self, id: u64) -> Result<()> {
        self.commit()?;
        let live = self.generation;
        let caches = (self.live_inodes.as_ref(), self.free_inos.as_ref());
        let deleted = write_alone(&mut self.conn, live, caches, |t| -> Result<()> {
            let bounds = t.snapshot_bounds(id)?;
            let state: String = t.conn.query_row(
                "DELETE FROM snapshots WHERE id = ?1 RETURNING state",
                [id],
                |r| r.get(0),
            )?;
            for table in ["inodes", "dentries", "blockmap", "xattrs"] {
                let sql = format!("DELETE FROM {table} WHERE {}", exclusive_rows("", &bounds));
                t.conn.execute(&sql, [])?;
            }
            // A checkpoint was never uploaded: it has no store object to forget. A
            // follower's snapshots are another volume's objects, and its trees are those
            // of its live tree (`set_live_tree`), which a deletion leaves as it is.
            let follower = t.setting(Setting::Follows)?.is_some();
            if state != checkpoints::CHECKPOINT && !follower {
                t.forget_snapshot_objects(id, bounds.generation)?;
            }
            Ok(())
        });
        self.forget_live_inodes_if_failed(deleted)
    }

    /// Commits the open group and returns what makes every commit so far durable against
    /// power loss, to run once the catalog is released. Commits run with
    /// synchronous=NORMAL, so they sit in the WAL file unsynced: syncing that file covers
    /// them all. (Synced under the catalog, by a no-op commit with FULL, every operation
    /// and snapshot waited for the disk meanwhile: 166 ms behind a writer's writeback.)
    /// If SQLite restarts the WAL before the sync, it checkpointed those commits into the
    /// database file and synced it first, so they are durable either way.
    pub fn commit_for_sync(&mut self) -> Result<WalSync> {
        self.commit()?;
        let wal = PathBuf::from(format!("{}-wal", self.file_path()?));
        let file = match std::fs::File::open(&wal) {
            Ok(file) => Some(file),
            // No WAL: every commit is in the database file, synced when it was folded in.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(source) => return Err(Error::Io { path: wal, source }),
        };
        Ok(WalSync { file, path: wal })
    }

    /// The path of the catalog's database file (its WAL is beside it).
    fn file_path(&self) -> Result<&str> {
        self.conn
            .path()
            .filter(|path| !path.is_empty())
            .ok_or_else(|| Error::Corrupt("the catalog has no file".into()))
    }

    /// Folds the WAL into the database file (at unmount).
    pub fn checkpoint(&mut self) -> Result<()> {
        self.commit()?;
        self.conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))?;
        Ok(())
    }
}

/// Runs one statement without parameters, prepared once per connection (the group
/// commit's BEGIN, SAVEPOINT, RELEASE and COMMIT run for every operation).
fn run_statement(conn: &Connection, sql: &str) -> Result<()> {
    conn.prepare_cached(sql)?.execute([])?;
    Ok(())
}

/// Ends the read transaction `Catalog::read` began, however the read ends (an error or a
/// panic included). A read changed nothing, so COMMIT only lets its snapshot go; should
/// it fail, ROLLBACK does the same, so the next read does not find a transaction open.
struct EndRead<'c>(&'c Connection);

impl Drop for EndRead<'_> {
    fn drop(&mut self) {
        if run_statement(self.0, "COMMIT").is_err() && !self.0.is_autocommit() {
            let _ = run_statement(self.0, "ROLLBACK");
        }
    }
}

/// An open group is committed when the connection goes (closing it would roll it back).
impl Drop for Catalog {
    fn drop(&mut self) {
        let _ = self.commit();
    }
}

/// Refuses a damaged file, another program's database, and a newer snapfs's catalog.
/// Returns the catalog's schema version.
fn refuse_foreign(conn: &Connection, path: &Path) -> Result<i64> {
    let not_a_catalog = |source| Error::NotACatalog {
        path: path.to_owned(),
        source,
    };
    // The first statement reads the header: a damaged or non-SQLite file fails here.
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(not_a_catalog)?;
    let has_tables: bool = conn
        .query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table')",
            [],
            |r| r.get(0),
        )
        .map_err(not_a_catalog)?;
    if version == 0 && has_tables {
        return Err(Error::Foreign {
            path: path.to_owned(),
        });
    }
    if version < 0 || version as usize > schema::MIGRATIONS.len() {
        return Err(Error::TooNew {
            path: path.to_owned(),
            found: version,
            supported: schema::MIGRATIONS.len(),
        });
    }
    Ok(version)
}

fn migrate(conn: &Connection) -> Result<()> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    for (index, sql) in schema::MIGRATIONS.iter().enumerate().skip(version as usize) {
        conn.execute_batch(&format!(
            "BEGIN; {sql}; PRAGMA user_version = {}; COMMIT;",
            index + 1
        ))?;
    }
    Ok(())
}

/// The generations around snapshot g: the snapshot before it (0 if none) and the one after
/// it (the live generation if none).
#[derive(Clone, Copy, Debug)]
pub struct SnapshotBounds {
    pub previous: u64,
    pub generation: u64,
    pub next: u64,
}

/// The rows (of table alias `t`, or none with "") visible to snapshot `b.generation` and
/// to no other snapshot nor the live view: born after the previous snapshot, dead by the
/// next one. Deleting the snapshot deletes exactly these.
fn exclusive_rows(alias: &str, b: &SnapshotBounds) -> String {
    format!(
        "{alias}death IS NOT NULL AND {alias}death > {g} AND {alias}death <= {next} \
         AND {alias}birth > {prev}",
        g = b.generation,
        next = b.next,
        prev = b.previous
    )
}

/// Visibility of a versioned row to view generation `?g`: the live view (`LIVE`) sees
/// exactly the rows with no death.
const VISIBLE: &str = "birth <= :g AND (death IS NULL OR death > :g)";

/// Catalog reads inside one read transaction: every statement sees the same state, even
/// while another connection (the uploader, a running mount) commits.
pub struct ReadTx<'a> {
    conn: &'a Connection,
    /// The live generation: new rows are born in it.
    g: u64,
    live_inodes: Option<&'a LiveInodes>,
}

/// Catalog changes inside one write transaction: all land together or none does. It reads
/// too (through `ReadTx`), seeing its own changes.
pub struct WriteTx<'a> {
    read: ReadTx<'a>,
    free_inos: Option<&'a FreeInos>,
    /// What this write changed in the live totals, not yet applied.
    totals: Cell<Totals>,
}

/// Runs `f` as a transaction of its own on `conn`, which takes the write lock at BEGIN
/// (see `Catalog::write`), and applies what it changed in the live totals before its
/// COMMIT, so a counter never lands apart from its rows.
fn write_alone<T, E: From<Error>>(
    conn: &mut Connection,
    g: u64,
    (live_inodes, free_inos): (Option<&LiveInodes>, Option<&FreeInos>),
    f: impl FnOnce(&WriteTx<'_>) -> Result<T, E>,
) -> Result<T, E> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(Error::from)?;
    let t = WriteTx::new(&tx, g, live_inodes, free_inos);
    let value = f(&t)?;
    t.settle()?;
    tx.commit().map_err(Error::from)?;
    Ok(value)
}

impl<'a> std::ops::Deref for WriteTx<'a> {
    type Target = ReadTx<'a>;
    fn deref(&self) -> &ReadTx<'a> {
        &self.read
    }
}

impl<'a> WriteTx<'a> {
    fn new(
        conn: &'a Connection,
        g: u64,
        live_inodes: Option<&'a LiveInodes>,
        free_inos: Option<&'a FreeInos>,
    ) -> WriteTx<'a> {
        WriteTx {
            read: ReadTx {
                conn,
                g,
                live_inodes,
            },
            free_inos,
            totals: Cell::default(),
        }
    }

    /// Applies what this write changed in the live totals, inside its transaction.
    fn settle(&self) -> Result<()> {
        self.totals.take().apply(self.conn)
    }

    fn count(&self, change: Totals) {
        self.totals.set(self.totals.get().plus(change));
    }
}

impl ReadTx<'_> {
    pub fn inode(&self, view: u64, ino: u64) -> Result<Option<InodeRow>> {
        let kept = self.live_inodes.filter(|_| view == LIVE);
        if let Some(row) = kept.and_then(|kept| kept.borrow_mut().rows.get(&ino).cloned()) {
            return Ok(Some(row));
        }
        let sql = format!("SELECT {INODE_COLUMNS} FROM inodes WHERE ino = :ino AND {VISIBLE}");
        let mut stmt = self.conn.prepare_cached(&sql)?;
        let mut rows = stmt.query(rusqlite::named_params! {":ino": ino, ":g": view})?;
        let Some(row) = rows.next()? else {
            return Ok(None);
        };
        let row = InodeRow::try_from(row)?;
        if let Some(kept) = kept {
            kept.borrow_mut().rows.put(ino, row.clone());
        }
        Ok(Some(row))
    }

    pub fn lookup(&self, view: u64, parent: u64, name: &[u8]) -> Result<Option<(u64, Kind)>> {
        let sql = format!(
            "SELECT ino, kind FROM dentries WHERE parent = :parent AND name = :name AND {VISIBLE}"
        );
        let mut stmt = self.conn.prepare_cached(&sql)?;
        let found = stmt
            .query_row(
                rusqlite::named_params! {":parent": parent, ":name": name, ":g": view},
                |r| Ok((r.get::<_, u64>(0)?, r.get::<_, i64>(1)?)),
            )
            .optional()?;
        found
            .map(|(ino, kind)| Ok((ino, Kind::try_from(kind)?)))
            .transpose()
    }

    /// The entries of directory `parent` with their inodes, sorted by name.
    pub fn list_dir(&self, view: u64, parent: u64) -> Result<Vec<DirEntryRow>> {
        let sql = "SELECT i.ino, i.kind, i.perm, i.uid, i.gid, i.nlink, i.size, i.rdev, i.parent,
                    i.atime, i.mtime, i.ctime, i.crtime, i.alloc, i.target, d.name
             FROM dentries d JOIN inodes i
               ON i.ino = d.ino AND i.birth <= :g AND (i.death IS NULL OR i.death > :g)
             WHERE d.parent = :parent AND d.birth <= :g AND (d.death IS NULL OR d.death > :g)
             ORDER BY d.name";
        let mut stmt = self.conn.prepare_cached(sql)?;
        let mut rows = stmt.query(rusqlite::named_params! {":parent": parent, ":g": view})?;
        let mut entries = Vec::new();
        while let Some(row) = rows.next()? {
            entries.push(DirEntryRow {
                inode: InodeRow::try_from(row)?,
                name: row.get(15)?,
            });
        }
        Ok(entries)
    }

    pub fn dir_is_empty(&self, view: u64, dir: u64) -> Result<bool> {
        let sql = format!("SELECT 1 FROM dentries WHERE parent = :parent AND {VISIBLE} LIMIT 1");
        let mut stmt = self.conn.prepare_cached(&sql)?;
        Ok(!stmt.exists(rusqlite::named_params! {":parent": dir, ":g": view})?)
    }

    /// The mapped blocks of `ino` with index in `first..=last`, in index order.
    pub fn blocks_in_range(
        &self,
        view: u64,
        ino: u64,
        first: u64,
        last: u64,
    ) -> Result<Vec<(u64, BlockHash)>> {
        let sql = format!(
            "SELECT idx, hash FROM blockmap
             WHERE ino = :ino AND idx BETWEEN :first AND :last AND {VISIBLE} ORDER BY idx"
        );
        let mut stmt = self.conn.prepare_cached(&sql)?;
        let mut rows = stmt.query(
            rusqlite::named_params! {":ino": ino, ":first": first, ":last": last, ":g": view},
        )?;
        let mut found = Vec::new();
        while let Some(row) = rows.next()? {
            let hash: Vec<u8> = row.get(1)?;
            let hash = BlockHash::try_from(hash.as_slice())
                .map_err(|_| Error::Corrupt(format!("bad block hash in the map of inode {ino}")))?;
            found.push((row.get(0)?, hash));
        }
        Ok(found)
    }

    /// The first block of `ino` mapped at index `from` or after, as `view` sees it.
    pub fn next_mapped_block(&self, view: u64, ino: u64, from: u64) -> Result<Option<u64>> {
        let sql = format!(
            "SELECT idx FROM blockmap WHERE ino = :ino AND idx >= :from AND {VISIBLE}
             ORDER BY idx LIMIT 1"
        );
        Ok(self
            .conn
            .prepare_cached(&sql)?
            .query_row(
                rusqlite::named_params! {":ino": ino, ":from": from, ":g": view},
                |r| r.get(0),
            )
            .optional()?)
    }

    /// The first index at or after `from` where `ino` maps no block, as `view` sees it:
    /// the end of the run of mapped blocks starting at `from`.
    pub fn next_unmapped_block(&self, view: u64, ino: u64, from: u64) -> Result<u64> {
        let sql = format!(
            "SELECT idx FROM blockmap WHERE ino = :ino AND idx >= :from AND {VISIBLE}
             ORDER BY idx"
        );
        let mut stmt = self.conn.prepare_cached(&sql)?;
        let mut rows =
            stmt.query(rusqlite::named_params! {":ino": ino, ":from": from, ":g": view})?;
        let mut expected = from;
        // Rows are stepped on demand: this reads the run, not the rest of the file.
        while let Some(row) = rows.next()? {
            if row.get::<_, u64>(0)? != expected {
                break;
            }
            expected += 1;
        }
        Ok(expected)
    }

    /// How many blocks of `ino` with index in `first..=last` are mapped, as `view` sees it.
    pub fn count_mapped_blocks(&self, view: u64, ino: u64, first: u64, last: u64) -> Result<u64> {
        let sql = format!(
            "SELECT count(*) FROM blockmap
             WHERE ino = :ino AND idx BETWEEN :first AND :last AND {VISIBLE}"
        );
        Ok(self.conn.prepare_cached(&sql)?.query_row(
            rusqlite::named_params! {":ino": ino, ":first": first, ":last": last, ":g": view},
            |r| r.get(0),
        )?)
    }

    /// Whether the store already holds a block (some map row references it or did).
    pub fn has_block(&self, hash: &BlockHash) -> Result<bool> {
        Ok(self
            .conn
            .prepare_cached("SELECT 1 FROM blocks WHERE hash = ?1")?
            .exists([hash.as_bytes()])?)
    }

    /// The bytes of block `hash` if the catalog holds them (a small block), unverified.
    pub fn inline_block(&self, hash: &BlockHash) -> Result<Option<Vec<u8>>> {
        Ok(self
            .conn
            .prepare_cached("SELECT data FROM inline_blocks WHERE hash = ?1")?
            .query_row([hash.as_bytes()], |r| r.get(0))
            .optional()?)
    }

    /// The length of block `hash` and its pieces' values, if the flush that wrote it kept
    /// them (`blocks::hash_and_pieces`).
    pub fn block_pieces(&self, hash: &BlockHash) -> Result<Option<(u32, Vec<u8>)>> {
        Ok(self
            .conn
            .prepare_cached("SELECT len, piece_values FROM block_pieces WHERE hash = ?1")?
            .query_row([hash.as_bytes()], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?)
    }

    /// How many blocks' piece values the catalog keeps.
    #[cfg(test)]
    pub fn block_pieces_count(&self) -> Result<u64> {
        Ok(self
            .conn
            .query_row("SELECT count(*) FROM block_pieces", [], |r| r.get(0))?)
    }

    /// How many small blocks the catalog holds (`blocks::INLINE_MAX`).
    pub fn inline_block_count(&self) -> Result<u64> {
        Ok(self
            .conn
            .query_row("SELECT count(*) FROM inline_blocks", [], |r| r.get(0))?)
    }

    pub fn has_unreferenced_blocks(&self) -> Result<bool> {
        Ok(self
            .conn
            .prepare_cached("SELECT 1 FROM blocks WHERE refs = 0 LIMIT 1")?
            .exists([])?)
    }

    /// Live inodes that no directory names any more: left by a crash while they were open.
    pub fn orphan_inodes(&self) -> Result<Vec<u64>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT ino FROM inodes WHERE death IS NULL AND nlink = 0")?;
        let inos = stmt.query_map([], |r| r.get(0))?;
        Ok(inos.collect::<rusqlite::Result<_>>()?)
    }

    pub fn xattr_get(&self, view: u64, ino: u64, name: &[u8]) -> Result<Option<Vec<u8>>> {
        if view == LIVE && known_bare(self.live_inodes, ino) {
            return Ok(None);
        }
        let sql =
            format!("SELECT value FROM xattrs WHERE ino = :ino AND name = :name AND {VISIBLE}");
        let value = self
            .conn
            .prepare_cached(&sql)?
            .query_row(
                rusqlite::named_params! {":ino": ino, ":name": name, ":g": view},
                |r| r.get(0),
            )
            .optional()?;
        if value.is_none() && view == LIVE && self.live_inodes.is_some() {
            let sql =
                format!("SELECT EXISTS (SELECT 1 FROM xattrs WHERE ino = :ino AND {VISIBLE})");
            let any: bool = self
                .conn
                .prepare_cached(&sql)?
                .query_row(rusqlite::named_params! {":ino": ino, ":g": LIVE}, |r| {
                    r.get(0)
                })?;
            if !any {
                self.kept_bare(ino);
            }
        }
        Ok(value)
    }

    /// Notes that live inode `ino` has no xattr (see `KeptLive::bare`).
    fn kept_bare(&self, ino: u64) {
        if let Some(kept) = self.live_inodes {
            kept.borrow_mut().bare.put(ino, ());
        }
    }

    pub fn xattr_names(&self, view: u64, ino: u64) -> Result<Vec<Vec<u8>>> {
        let sql = format!("SELECT name FROM xattrs WHERE ino = :ino AND {VISIBLE} ORDER BY name");
        let mut stmt = self.conn.prepare_cached(&sql)?;
        let names = stmt.query_map(rusqlite::named_params! {":ino": ino, ":g": view}, |r| {
            r.get(0)
        })?;
        Ok(names.collect::<rusqlite::Result<_>>()?)
    }

    /// The generations before and after snapshot `id`.
    pub fn snapshot_bounds(&self, id: u64) -> Result<SnapshotBounds> {
        let generation: u64 = self
            .conn
            .query_row(
                "SELECT generation FROM snapshots WHERE id = ?1",
                [id],
                |r| r.get(0),
            )
            .optional()?
            .ok_or_else(|| Error::Corrupt(format!("no snapshot {id}")))?;
        let (previous, next): (Option<u64>, Option<u64>) = self.conn.query_row(
            "SELECT (SELECT max(generation) FROM snapshots WHERE generation < ?1),
                    (SELECT min(generation) FROM snapshots WHERE generation > ?1)",
            [generation],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        Ok(SnapshotBounds {
            previous: previous.unwrap_or(0),
            generation,
            next: next.unwrap_or(self.g),
        })
    }

    /// Bytes of stored blocks that only snapshot `id` references: what deleting it frees
    /// (like ZFS's `used`). Reads only the block-map rows that died after it.
    pub fn exclusive_bytes(&self, id: u64) -> Result<u64> {
        let bounds = self.snapshot_bounds(id)?;
        let sql = format!(
            "SELECT coalesce(sum(b.len), 0) FROM blockmap m JOIN blocks b ON b.hash = m.hash
             WHERE {} AND b.refs = 1",
            exclusive_rows("m.", &bounds)
        );
        Ok(self.conn.query_row(&sql, [], |r| r.get(0))?)
    }

    pub fn snapshot_tags(&self, id: u64) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT key, value FROM snapshot_tags WHERE snapshot = ?1 ORDER BY key",
        )?;
        let tags = stmt.query_map([id], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(tags.collect::<rusqlite::Result<_>>()?)
    }

    /// Entries visible at `from` but gone at `to`, and entries new at `to` (`from < to`;
    /// `to` may be `LIVE`). Read through the birth and death indexes, not by walking.
    pub fn changed_entries(
        &self,
        from: u64,
        to: u64,
    ) -> Result<(Vec<EntryChange>, Vec<EntryChange>)> {
        let removed = self.entry_changes(
            "SELECT parent, name, ino, kind FROM dentries
             WHERE death IS NOT NULL AND death > :from AND death <= :to AND birth <= :from",
            from,
            to,
        )?;
        let added = self.entry_changes(
            "SELECT parent, name, ino, kind FROM dentries
             WHERE birth > :from AND birth <= :to AND (death IS NULL OR death > :to)",
            from,
            to,
        )?;
        Ok((removed, added))
    }

    fn entry_changes(&self, sql: &str, from: u64, to: u64) -> Result<Vec<EntryChange>> {
        let mut stmt = self.conn.prepare_cached(sql)?;
        let mut rows = stmt.query(rusqlite::named_params! {":from": from, ":to": to})?;
        let mut changes = Vec::new();
        while let Some(row) = rows.next()? {
            changes.push(EntryChange {
                parent: row.get(0)?,
                name: row.get(1)?,
                ino: row.get(2)?,
                kind: Kind::try_from(row.get::<_, i64>(3)?)?,
            });
        }
        Ok(changes)
    }

    /// Inodes that existed at `from` and have a newer version visible at `to`.
    pub fn changed_inodes(&self, from: u64, to: u64) -> Result<Vec<u64>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT DISTINCT n.ino FROM inodes n
             WHERE n.birth > :from AND n.birth <= :to AND (n.death IS NULL OR n.death > :to)
               AND EXISTS (SELECT 1 FROM inodes o WHERE o.ino = n.ino AND o.birth <= :from
                           AND (o.death IS NULL OR o.death > :from))
             ORDER BY n.ino",
        )?;
        let inos = stmt.query_map(rusqlite::named_params! {":from": from, ":to": to}, |r| {
            r.get(0)
        })?;
        Ok(inos.collect::<rusqlite::Result<_>>()?)
    }

    /// The path of `ino` from the root as `view` sees it ("/" for the root), or `None` if
    /// no directory names it there.
    pub fn path_of(&self, view: u64, mut ino: u64) -> Result<Option<Vec<u8>>> {
        let sql =
            format!("SELECT parent, name FROM dentries WHERE ino = :ino AND {VISIBLE} LIMIT 1");
        let mut stmt = self.conn.prepare_cached(&sql)?;
        let mut parts: Vec<Vec<u8>> = Vec::new();
        while ino != ROOT_INO {
            // A directory tree deeper than this is a cycle: the catalog is damaged.
            if parts.len() > 4096 {
                return Err(Error::Corrupt(format!("directory cycle above inode {ino}")));
            }
            let found: Option<(u64, Vec<u8>)> = stmt
                .query_row(rusqlite::named_params! {":ino": ino, ":g": view}, |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })
                .optional()?;
            let Some((parent, name)) = found else {
                return Ok(None);
            };
            parts.push(name);
            ino = parent;
        }
        let mut path = Vec::new();
        for part in parts.iter().rev() {
            path.push(b'/');
            path.extend_from_slice(part);
        }
        if path.is_empty() {
            path.push(b'/');
        }
        Ok(Some(path))
    }

    /// The snapshots, without the checkpoints (see `checkpoints`).
    pub fn snapshots(&self) -> Result<Vec<SnapshotRow>> {
        self.snapshot_rows("WHERE state != 'checkpoint' ORDER BY id")
    }

    /// The snapshots a clause (`WHERE ... ORDER BY ...`) selects.
    fn snapshot_rows(&self, clause: &str) -> Result<Vec<SnapshotRow>> {
        let sql = format!("SELECT {SNAPSHOT_COLUMNS} FROM snapshots {clause}");
        let mut stmt = self.conn.prepare_cached(&sql)?;
        let mut rows = stmt.query([])?;
        let mut found = Vec::new();
        while let Some(row) = rows.next()? {
            found.push(SnapshotRow::try_from(row)?);
        }
        Ok(found)
    }
}

impl WriteTx<'_> {
    pub fn alloc_ino(&self) -> Result<u64> {
        let Some(free) = self.free_inos else {
            return self.reserve_inos(1);
        };
        let mut left = free.take();
        let ino = match left.next() {
            Some(ino) => ino,
            None => {
                let first = self.reserve_inos(INO_BATCH)?;
                left = first + 1..first + INO_BATCH;
                first
            }
        };
        free.set(left);
        Ok(ino)
    }

    /// Drops the reserved inode numbers: `next_ino` is about to move past them.
    fn forget_free_inos(&self) {
        if let Some(free) = self.free_inos {
            free.take();
        }
    }

    /// Takes `count` inode numbers from `next_ino`; returns the first.
    fn reserve_inos(&self, count: u64) -> Result<u64> {
        Ok(self
            .conn
            .prepare_cached(
                "UPDATE meta SET value = value + ?1 WHERE key = 'next_ino' RETURNING value - ?1",
            )?
            .query_row([count], |r| r.get(0))?)
    }

    pub fn insert_inode(&self, row: &InodeRow) -> Result<()> {
        self.write_inode_row(row)?;
        self.count(Totals::of(row));
        self.kept_bare(row.ino);
        Ok(())
    }

    /// Inserts `row` as a version born in this generation, leaving the totals to the caller.
    fn write_inode_row(&self, row: &InodeRow) -> Result<()> {
        let mut stmt = self.conn.prepare_cached(
            "INSERT INTO inodes (ino, birth, kind, perm, uid, gid, nlink, size, rdev, parent,
                                 atime, mtime, ctime, crtime, alloc, target)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)",
        )?;
        stmt.execute(self.inode_params(row))?;
        self.keep_live_inode(row);
        Ok(())
    }

    /// `row` as ?1..?16 of the insert and update statements, born in this generation.
    fn inode_params<'r>(&'r self, row: &'r InodeRow) -> [&'r dyn ToSql; 16] {
        [
            &row.ino,
            &self.g,
            &row.attrs.kind,
            &row.attrs.perm,
            &row.attrs.uid,
            &row.attrs.gid,
            &row.attrs.nlink,
            &row.attrs.size,
            &row.attrs.rdev,
            &row.parent,
            &row.attrs.atime,
            &row.attrs.mtime,
            &row.attrs.ctime,
            &row.attrs.crtime,
            &row.alloc,
            &row.target,
        ]
    }

    /// Replaces the live version of the inode `row.ino` with `row`.
    pub fn update_inode(&self, row: &InodeRow) -> Result<()> {
        let before = self.inode(LIVE, row.ino)?;
        let mut stmt = self.conn.prepare_cached(
            "UPDATE inodes SET kind = ?3, perm = ?4, uid = ?5, gid = ?6, nlink = ?7, size = ?8,
                    rdev = ?9, parent = ?10, atime = ?11, mtime = ?12, ctime = ?13,
                    crtime = ?14, alloc = ?15, target = ?16
             WHERE ino = ?1 AND birth = ?2 AND death IS NULL",
        )?;
        let changed = stmt.execute(self.inode_params(row))?;
        if changed == 0 {
            // Born before the last snapshot: keep that version for it, start a new one.
            self.retire_key("inodes", "ino = ?1", &[&row.ino])?;
            self.write_inode_row(row)?;
        }
        let before = before.as_ref().map_or(Totals::default(), Totals::of);
        self.count(Totals::of(row).minus(before));
        self.keep_live_inode(row);
        Ok(())
    }

    /// The live inode `row` as it is now written, for `ReadTx::inode` (see `LiveInodes`).
    fn keep_live_inode(&self, row: &InodeRow) {
        if let Some(kept) = self.live_inodes {
            kept.borrow_mut().rows.put(row.ino, row.clone());
        }
    }

    /// Removes the inode from the live view with its block map and xattrs.
    pub fn retire_inode(&self, ino: u64) -> Result<()> {
        if let Some(before) = self.inode(LIVE, ino)? {
            self.count(Totals::default().minus(Totals::of(&before)));
        }
        let mut bare = false;
        if let Some(kept) = self.live_inodes {
            let mut kept = kept.borrow_mut();
            kept.rows.pop(&ino);
            bare = kept.bare.pop(&ino).is_some();
        }
        self.retire_key("inodes", "ino = ?1", &[&ino])?;
        self.retire("blockmap", "ino = ?1", &[&ino])?;
        // Known to have no live xattr: none to retire, two statements fewer per unlink.
        if !bare {
            self.retire("xattrs", "ino = ?1", &[&ino])?;
        }
        Ok(())
    }

    pub fn insert_dentry(&self, parent: u64, name: &[u8], ino: u64, kind: Kind) -> Result<()> {
        let mut stmt = self.conn.prepare_cached(
            "INSERT INTO dentries (parent, name, birth, ino, kind) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        stmt.execute(params![parent, name, self.g, ino, kind])?;
        Ok(())
    }

    pub fn retire_dentry(&self, parent: u64, name: &[u8]) -> Result<()> {
        self.retire_key("dentries", "parent = ?1 AND name = ?2", &[&parent, &name])
    }

    /// Ends the live life of the rows matching `cond` (which uses ?1..?n). Rows born after
    /// the latest existing snapshot no snapshot can see, so they go (not only those born
    /// in G: once snapshots are deleted, older rows may be seen by none); the others get
    /// `death = G`.
    fn retire(&self, table: &str, cond: &str, args: &[&dyn ToSql]) -> Result<()> {
        self.drop_unseen(table, cond, args)?;
        self.end_live(table, cond, args)
    }

    /// `retire` for a `cond` that names one whole key of `table` (see
    /// `verify::VERSIONED`). A key's versions never overlap (`verify` checks it), so it
    /// has at most one live row: once that row is dropped, no other can need its death.
    /// Saves a statement on most unlinks and block writes, whose rows are younger than the
    /// last snapshot.
    fn retire_key(&self, table: &str, cond: &str, args: &[&dyn ToSql]) -> Result<()> {
        if self.drop_unseen(table, cond, args)? == 0 {
            self.end_live(table, cond, args)?;
        }
        Ok(())
    }

    /// Deletes the live rows matching `cond` that no snapshot sees; how many went.
    fn drop_unseen(&self, table: &str, cond: &str, args: &[&dyn ToSql]) -> Result<usize> {
        let drop_sql = format!(
            "DELETE FROM {table} WHERE {cond} AND death IS NULL
             AND birth > (SELECT coalesce(max(generation), 0) FROM snapshots)"
        );
        Ok(self.conn.prepare_cached(&drop_sql)?.execute(args)?)
    }

    /// Gives the live rows matching `cond` `death = G`.
    fn end_live(&self, table: &str, cond: &str, args: &[&dyn ToSql]) -> Result<()> {
        let g_param = args.len() + 1;
        let mut with_g: Vec<&dyn ToSql> = args.to_vec();
        with_g.push(&self.g);
        let retire_sql =
            format!("UPDATE {table} SET death = ?{g_param} WHERE {cond} AND death IS NULL");
        self.conn.prepare_cached(&retire_sql)?.execute(&*with_g)?;
        Ok(())
    }

    /// Zeroes every block's piece values, as a damaged disk might.
    #[cfg(test)]
    pub fn damage_block_pieces(&self) -> Result<()> {
        self.conn.execute(
            "UPDATE block_pieces SET piece_values = zeroblob(length(piece_values))",
            [],
        )?;
        Ok(())
    }

    /// Zeroes every small block's bytes, as a damaged disk might.
    #[cfg(test)]
    pub fn damage_inline_blocks(&self) -> Result<()> {
        self.conn
            .execute("UPDATE inline_blocks SET data = zeroblob(length(data))", [])?;
        Ok(())
    }

    /// Maps block `idx` of `ino` to `block` (hash, length, and its bytes if they live in
    /// the catalog rather than a block file: see `blocks::INLINE_MAX`), or to a hole.
    /// Returns the change in allocated bytes.
    pub fn set_block(&self, ino: u64, idx: u64, block: Option<NewBlock<'_>>) -> Result<i64> {
        let old_len: Option<i64> = self
            .conn
            .prepare_cached(
                "SELECT coalesce(b.len, 0) FROM blockmap m LEFT JOIN blocks b ON b.hash = m.hash
                 WHERE m.ino = ?1 AND m.idx = ?2 AND m.death IS NULL",
            )?
            .query_row(params![ino, idx], |r| r.get(0))
            .optional()?;
        // Most blocks a flush maps are new (a new file, an append): nothing to retire.
        if old_len.is_some() {
            self.retire_key("blockmap", "ino = ?1 AND idx = ?2", &[&ino, &idx])?;
        }
        let old_len = old_len.unwrap_or(0);
        let Some(NewBlock {
            hash,
            len,
            inline,
            pieces,
        }) = block
        else {
            return Ok(-old_len);
        };
        if let Some(data) = inline {
            self.conn
                .prepare_cached("INSERT OR IGNORE INTO inline_blocks (hash, data) VALUES (?1, ?2)")?
                .execute(params![hash.as_bytes(), data])?;
        }
        if let Some(values) = pieces {
            self.conn
                .prepare_cached(
                    "INSERT OR IGNORE INTO block_pieces (hash, len, piece_values)
                     VALUES (?1, ?2, ?3)",
                )?
                .execute(params![hash.as_bytes(), len, values])?;
        }
        // A block written again after it was evicted is local again.
        self.conn
            .prepare_cached(
                "INSERT INTO blocks (hash, len) VALUES (?1, ?2)
                 ON CONFLICT (hash) DO UPDATE SET local = 1",
            )?
            .execute(params![hash.as_bytes(), len])?;
        self.conn
            .prepare_cached("INSERT INTO blockmap (ino, idx, birth, hash) VALUES (?1, ?2, ?3, ?4)")?
            .execute(params![ino, idx, self.g, hash.as_bytes()])?;
        Ok(i64::from(len) - old_len)
    }

    /// Unmaps every block of `ino` from index `first` on. Returns the change in allocated bytes.
    pub fn unmap_blocks_from(&self, ino: u64, first: u64) -> Result<i64> {
        self.unmap_block_range(ino, first, i64::MAX as u64)
    }

    /// Unmaps the blocks of `ino` with index in `first..=last` (a punched hole). Returns
    /// the change in allocated bytes.
    pub fn unmap_block_range(&self, ino: u64, first: u64, last: u64) -> Result<i64> {
        let freed = self.mapped_bytes(ino, first, last)?;
        self.retire(
            "blockmap",
            "ino = ?1 AND idx BETWEEN ?2 AND ?3",
            &[&ino, &first, &last],
        )?;
        Ok(-freed)
    }

    /// Bytes of the live blocks of `ino` with index in `first..=last`.
    fn mapped_bytes(&self, ino: u64, first: u64, last: u64) -> Result<i64> {
        Ok(self
            .conn
            .prepare_cached(
                "SELECT coalesce(sum(b.len), 0) FROM blockmap m JOIN blocks b ON b.hash = m.hash
                 WHERE m.ino = ?1 AND m.idx BETWEEN ?2 AND ?3 AND m.death IS NULL",
            )?
            .query_row(params![ino, first, last], |r| r.get(0))?)
    }

    /// Maps to live file `dst`, from index `to` on, the blocks `first..=last` of `src` as
    /// view `view` sees them, replacing what `dst` mapped there (a hole in `src` leaves a
    /// hole). The blocks are shared, not copied: the triggers count the new references.
    /// Returns the change in `dst`'s allocated bytes.
    pub fn share_blocks(
        &self,
        view: u64,
        src: u64,
        first: u64,
        last: u64,
        dst: u64,
        to: u64,
    ) -> Result<i64> {
        let to_last = to + (last - first);
        let freed = self.unmap_block_range(dst, to, to_last)?;
        let sql = format!(
            "INSERT INTO blockmap (ino, idx, birth, hash)
             SELECT :dst, idx - :first + :to, :birth, hash FROM blockmap
             WHERE ino = :src AND idx BETWEEN :first AND :last AND {VISIBLE}"
        );
        self.conn
            .prepare_cached(&sql)?
            .execute(rusqlite::named_params! {
                ":dst": dst, ":first": first, ":to": to, ":birth": self.g, ":src": src,
                ":last": last, ":g": view,
            })?;
        Ok(freed + self.mapped_bytes(dst, to, to_last)?)
    }

    /// Forgets up to `limit` blocks no map row references any more and returns them, so
    /// the caller can delete their data. Those already in the object store are queued for
    /// deletion there.
    pub fn take_unreferenced_blocks(&self, limit: usize) -> Result<Vec<BlockHash>> {
        let hashes = self
            .conn
            .prepare_cached("SELECT hash FROM blocks WHERE refs = 0 LIMIT ?1")?
            .query_map([limit as i64], |r| r.get::<_, Vec<u8>>(0))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        let mut queue_deletion = self.conn.prepare_cached(
            "INSERT OR IGNORE INTO store_deletions (key)
             SELECT ?1 || lower(hex(hash)) FROM blocks
             WHERE hash = ?2 AND stored = 1 AND pack IS NULL",
        )?;
        let mut forget = self
            .conn
            .prepare_cached("DELETE FROM blocks WHERE hash = ?1")?;
        let mut freed = Vec::with_capacity(hashes.len());
        for hash in hashes {
            queue_deletion.execute(params![crate::store::ObjectKey::BLOCKS, hash])?;
            forget.execute([&hash])?;
            freed.push(
                BlockHash::try_from(hash.as_slice())
                    .map_err(|_| Error::Corrupt("bad hash in the block table".into()))?,
            );
        }
        drop((queue_deletion, forget));
        // Packed blocks leave their pack's count (a trigger): packs left empty go.
        self.queue_dead_packs()?;
        Ok(freed)
    }

    pub fn xattr_set(&self, ino: u64, name: &[u8], value: &[u8]) -> Result<()> {
        if let Some(kept) = self.live_inodes {
            kept.borrow_mut().bare.pop(&ino);
        }
        self.xattr_remove(ino, name)?;
        self.conn
            .prepare_cached("INSERT INTO xattrs (ino, name, birth, value) VALUES (?1, ?2, ?3, ?4)")?
            .execute(params![ino, name, self.g, value])?;
        Ok(())
    }

    pub fn xattr_remove(&self, ino: u64, name: &[u8]) -> Result<()> {
        self.retire_key("xattrs", "ino = ?1 AND name = ?2", &[&ino, &name])
    }

    pub fn rename_snapshot(&self, id: u64, name: &[u8]) -> Result<()> {
        self.conn.execute(
            "UPDATE snapshots SET name = ?2 WHERE id = ?1",
            params![id, name],
        )?;
        Ok(())
    }

    pub fn set_snapshot_tag(&self, id: u64, key: &[u8], value: &[u8]) -> Result<()> {
        self.conn.execute(
            "INSERT INTO snapshot_tags (snapshot, key, value) VALUES (?1, ?2, ?3)
             ON CONFLICT (snapshot, key) DO UPDATE SET value = excluded.value",
            params![id, key, value],
        )?;
        Ok(())
    }

    /// Removes a tag; whether it existed.
    pub fn remove_snapshot_tag(&self, id: u64, key: &[u8]) -> Result<bool> {
        Ok(self.conn.execute(
            "DELETE FROM snapshot_tags WHERE snapshot = ?1 AND key = ?2",
            params![id, key],
        )? > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A catalog in `dir` with a table of filler rows, whose inserts grow the WAL.
    fn catalog_with_filler(dir: &Path) -> Catalog {
        let catalog = Catalog::open(&dir.join("catalog.db"), 4096, 0, (0, 0)).expect("open");
        catalog
            .conn
            .execute_batch("CREATE TABLE filler (x BLOB)")
            .expect("table");
        catalog
    }

    /// One row of filler: about a page of WAL, committed at once.
    fn insert_filler(catalog: &Catalog) {
        catalog
            .conn
            .execute("INSERT INTO filler VALUES (zeroblob(3000))", [])
            .expect("insert");
    }

    /// The mount's connection no longer folds the WAL in at SQLite's 1,000 pages (its
    /// syncs held the catalog's lock); the checkpointer's own connection folds all of it,
    /// and the next commit starts the WAL over.
    #[test]
    fn the_checkpointer_folds_the_wal_the_mounts_connection_leaves() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut catalog = catalog_with_filler(dir.path());
        let checkpointer = catalog.checkpointer().expect("checkpointer");
        for _ in 0..1200 {
            insert_filler(&catalog);
        }
        let (frames, folded) = checkpointer.fold().expect("fold");
        assert!(frames > 1200, "the WAL was folded before: {frames} frames");
        assert_eq!(folded, frames);
        let limit: u32 = catalog
            .conn
            .query_row("PRAGMA wal_autocheckpoint", [], |r| r.get(0))
            .expect("pragma");
        assert_eq!(limit, SELF_CHECKPOINT_PAGES);

        insert_filler(&catalog);
        let (frames, folded) = checkpointer.fold().expect("fold again");
        assert!(frames < 10, "the WAL did not start over: {frames} frames");
        assert_eq!(folded, frames);
        catalog
            .commit_for_sync()
            .expect("commit")
            .sync()
            .expect("sync");
    }

    /// A fold leaves out what was committed after the fence, and folds it once the fence
    /// is gone.
    #[test]
    fn the_checkpointer_folds_nothing_committed_after_its_fence() {
        let dir = tempfile::tempdir().expect("tempdir");
        let catalog = catalog_with_filler(dir.path());
        let checkpointer = catalog.checkpointer().expect("checkpointer");
        insert_filler(&catalog);
        let fence = checkpointer.fence().expect("fence");
        for _ in 0..10 {
            insert_filler(&catalog);
        }
        let (frames, folded) = checkpointer.fold().expect("fold");
        assert!(
            folded > 0 && folded < frames,
            "{folded} of {frames} frames folded behind the fence"
        );
        drop(fence);
        let (frames, folded) = checkpointer.fold().expect("fold without the fence");
        assert_eq!(folded, frames);
    }

    /// A read ends its transaction however it ends: after one that failed or panicked,
    /// the next read begins its own, and a write from another connection goes through.
    #[test]
    fn a_read_that_fails_or_panics_leaves_no_transaction_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("catalog.db");
        let catalog = Catalog::open(&path, 4096, 0, (0, 0)).expect("open");
        let failed: Result<()> = catalog.read(|tx| {
            tx.inode(LIVE, ROOT_INO)?;
            Err(Error::Corrupt("a read that fails".into()))
        });
        assert!(matches!(failed, Err(Error::Corrupt(_))));
        assert!(catalog.conn.is_autocommit());
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            catalog.read(|tx| -> Result<()> {
                tx.inode(LIVE, ROOT_INO)?;
                panic!("a read that panics")
            })
        }));
        assert!(panicked.is_err());
        assert!(catalog.conn.is_autocommit());
        let root = catalog.read(|tx| tx.inode(LIVE, ROOT_INO)).expect("read");
        assert!(root.is_some());
        // No read snapshot is left holding the WAL: another connection writes and its
        // write is seen.
        let other = Connection::open(&path).expect("other connection");
        other
            .execute_batch("CREATE TABLE written_after (x)")
            .expect("write");
        let seen: i64 = catalog
            .read(|tx| {
                tx.conn
                    .query_row(
                        "SELECT count(*) FROM sqlite_master WHERE name = 'written_after'",
                        [],
                        |r| r.get(0),
                    )
                    .map_err(Error::from)
            })
            .expect("read");
        assert_eq!(seen, 1);
    }

    /// The catalog at `path` as the mount's connection keeps it: inode rows in memory and
    /// inode numbers reserved in batches.
    fn mount_catalog(path: &Path) -> Catalog {
        let mut catalog = Catalog::open(path, 4096, 0, (0, 0)).expect("open");
        catalog.keep_live_inodes(NonZeroUsize::new(8).expect("capacity"));
        catalog
    }

    /// A new file's inode row of `size` bytes (the root's owner and times), in no directory.
    fn insert_file(tx: &WriteTx<'_>, size: u64) -> Result<InodeRow> {
        let mut row = tx.inode(LIVE, ROOT_INO)?.expect("root");
        row.ino = tx.alloc_ino()?;
        row.attrs.kind = Kind::File;
        row.attrs.nlink = 1;
        row.attrs.size = size;
        row.parent = 0;
        tx.insert_inode(&row)?;
        Ok(row)
    }

    /// The kept inode rows follow every write, and a write that fails leaves none that it
    /// made: alone, or in a group (its savepoint rolled back).
    #[test]
    fn kept_inode_rows_never_show_a_write_that_was_rolled_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut catalog = mount_catalog(&dir.path().join("catalog.db"));
        let perm = |catalog: &Catalog| {
            catalog
                .read(|tx| tx.inode(LIVE, ROOT_INO))
                .expect("read")
                .expect("root")
                .attrs
                .perm
        };
        let set_perm_then_fail = |catalog: &mut Catalog, mode: u32| {
            let failed: Result<()> = catalog.write(|tx| {
                let mut root = tx.inode(LIVE, ROOT_INO)?.expect("root");
                root.attrs.perm = mode;
                tx.update_inode(&root)?;
                assert_eq!(tx.inode(LIVE, ROOT_INO)?.expect("root").attrs.perm, mode);
                Err(Error::Corrupt("the operation fails after its write".into()))
            });
            assert!(failed.is_err());
        };
        assert_eq!(perm(&catalog), 0o755);

        set_perm_then_fail(&mut catalog, 0o700);
        assert_eq!(perm(&catalog), 0o755, "a failed write alone");

        let (opened, _groups) = std::sync::mpsc::sync_channel(1);
        catalog.enable_group_commit(opened, Box::new(|| true));
        catalog
            .write(|tx| {
                let mut root = tx.inode(LIVE, ROOT_INO)?.expect("root");
                root.attrs.perm = 0o750;
                tx.update_inode(&root)
            })
            .expect("a write in a group");
        assert_eq!(perm(&catalog), 0o750, "a write in the open group");
        set_perm_then_fail(&mut catalog, 0o700);
        assert_eq!(perm(&catalog), 0o750, "a failed write in a group");
        catalog.commit().expect("commit");
        let stored: u32 = catalog
            .conn
            .query_row(
                "SELECT perm FROM inodes WHERE ino = ?1 AND death IS NULL",
                [ROOT_INO],
                |r| r.get(0),
            )
            .expect("the row");
        assert_eq!(stored, 0o750);
    }

    /// An operation of a group whose savepoint journal outgrows what stays in memory
    /// (`SAVEPOINT_JOURNAL_IN_MEMORY`) spills it to a file and succeeds: a spill larger
    /// than SQLite's unix VFS writes at once failed as SQLITE_FULL, and the unlink of a
    /// 10 GiB file with ENOSPC.
    #[test]
    fn an_operation_whose_savepoint_journal_spills_succeeds() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut catalog = mount_catalog(&dir.path().join("catalog.db"));
        let (opened, _groups) = std::sync::mpsc::sync_channel(1);
        catalog.enable_group_commit(opened, Box::new(|| true));
        const BLOCKS: u64 = 3000;
        // 2 KiB of piece values per block, as a 256 KiB block has: 6 MiB in all.
        let values = vec![7u8; 2048];
        let ino = catalog
            .write(|tx| {
                let row = insert_file(tx, BLOCKS * (256 << 10))?;
                for idx in 0..BLOCKS {
                    let hash = BlockHash::of(&idx.to_le_bytes());
                    let block = NewBlock {
                        hash: &hash,
                        len: 256 << 10,
                        inline: None,
                        pieces: Some(&values),
                    };
                    tx.set_block(row.ino, idx, Some(block))?;
                }
                Ok::<_, Error>(row.ino)
            })
            .expect("a file of many blocks");
        catalog.commit().expect("commit");
        let freed = catalog
            .write(|tx| {
                tx.retire_inode(ino)?;
                tx.take_unreferenced_blocks(BLOCKS as usize)
            })
            .expect("the file and its blocks go in one operation");
        assert_eq!(freed.len(), BLOCKS as usize);
        catalog.commit().expect("commit");
        let pieces_left = catalog.read(|tx| tx.block_pieces_count()).expect("count");
        assert_eq!(pieces_left, 0);
    }

    /// A live inode known to have no xattr answers getxattr without SQL: a new one, or
    /// one a read found bare. It stops being known as bare when an xattr is set, and a
    /// write that failed after setting one leaves it unknown, not bare.
    #[test]
    fn inodes_known_to_have_no_xattr_follow_every_write() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut catalog = mount_catalog(&dir.path().join("catalog.db"));
        let get = |catalog: &Catalog, ino: u64| {
            catalog
                .read(|tx| tx.xattr_get(LIVE, ino, b"user.a"))
                .expect("read")
        };
        assert!(
            !catalog.live_inode_is_bare(ROOT_INO),
            "not known before a read"
        );
        assert_eq!(get(&catalog, ROOT_INO), None);
        assert!(catalog.live_inode_is_bare(ROOT_INO), "a read found none");

        let ino = catalog
            .write(|tx| insert_file(tx, 0).map(|row| row.ino))
            .expect("create");
        assert!(catalog.live_inode_is_bare(ino), "a new inode");

        catalog
            .write(|tx| tx.xattr_set(ino, b"user.a", b"1"))
            .expect("set");
        assert!(!catalog.live_inode_is_bare(ino));
        assert_eq!(get(&catalog, ino), Some(b"1".to_vec()));
        assert!(!catalog.live_inode_is_bare(ino), "it has one");

        catalog
            .write(|tx| tx.xattr_remove(ino, b"user.a"))
            .expect("remove");
        assert_eq!(get(&catalog, ino), None);
        assert!(catalog.live_inode_is_bare(ino), "its last one removed");

        let failed: Result<()> = catalog.write(|tx| {
            tx.xattr_set(ino, b"user.a", b"2")?;
            Err(Error::Corrupt("the operation fails after its write".into()))
        });
        assert!(failed.is_err());
        assert!(
            !catalog.live_inode_is_bare(ino),
            "forgotten with the rollback"
        );
        assert_eq!(get(&catalog, ino), None, "the failed set was rolled back");

        let (opened, _groups) = std::sync::mpsc::sync_channel(1);
        catalog.enable_group_commit(opened, Box::new(|| true));
        catalog
            .write(|tx| tx.xattr_set(ino, b"user.a", b"3"))
            .expect("set in a group");
        assert!(!catalog.live_inode_is_bare(ino));
        assert_eq!(
            get(&catalog, ino),
            Some(b"3".to_vec()),
            "inside the open group"
        );

        // Retiring an inode skips the xattrs only of one known to have none.
        let names = |catalog: &Catalog, ino: u64| {
            catalog.read(|tx| tx.xattr_names(LIVE, ino)).expect("names")
        };
        catalog.write(|tx| tx.retire_inode(ino)).expect("retire");
        assert!(names(&catalog, ino).is_empty(), "its xattr went with it");
        assert!(!catalog.live_inode_is_bare(ino));
    }

    /// The live totals (`Totals`) follow every write: inside an open group (statfs), after
    /// it commits, written alone, across a new version of a row a snapshot keeps, and
    /// never with what a write that failed had added.
    #[test]
    fn live_totals_follow_every_write_and_none_that_was_rolled_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("catalog.db");
        let mut catalog = mount_catalog(&path);
        let (opened, _groups) = std::sync::mpsc::sync_channel(1);
        catalog.enable_group_commit(opened, Box::new(|| true));
        let file = |tx: &WriteTx<'_>, size: u64| -> Result<InodeRow> {
            let row = insert_file(tx, size)?;
            tx.insert_dentry(ROOT_INO, &row.ino.to_be_bytes(), row.ino, Kind::File)?;
            Ok(row)
        };
        let unlink = |tx: &WriteTx<'_>, ino: u64| -> Result<()> {
            tx.retire_dentry(ROOT_INO, &ino.to_be_bytes())?;
            tx.retire_inode(ino)
        };
        let resize = |catalog: &mut Catalog, row: &mut InodeRow, size: u64| {
            row.attrs.size = size;
            catalog.write(|tx| tx.update_inode(row)).expect("resize");
        };
        let written = |catalog: &Catalog| {
            let counter = |key| catalog.meta(key).expect("meta").expect(key);
            (counter("live_inodes"), counter("live_bytes"))
        };
        let consistent = |catalog: &Catalog| {
            let findings = catalog
                .read(|tx| tx.invariant_findings(4096))
                .expect("invariants");
            assert!(findings.is_empty(), "{findings:?}");
        };

        let mut files = Vec::new();
        for size in [10, 20, 30] {
            files.push(catalog.write(|tx| file(tx, size)).expect("create"));
        }
        resize(&mut catalog, &mut files[0], 100);
        let gone = files.remove(1);
        catalog.write(|tx| unlink(tx, gone.ino)).expect("unlink");
        let failed: Result<()> = catalog.write(|tx| {
            file(tx, 1000)?;
            unlink(tx, files[1].ino)?;
            Err(Error::Corrupt(
                "the operation fails after its writes".into(),
            ))
        });
        assert!(failed.is_err());
        assert_eq!(
            catalog.live_inodes().expect("statfs"),
            3,
            "in the open group"
        );
        assert_eq!(
            written(&catalog),
            (1, 0),
            "nothing written before the commit"
        );
        catalog.commit().expect("commit");
        assert_eq!(written(&catalog), (3, 130));
        consistent(&catalog);

        // A snapshot keeps the rows: a change now writes a new version of the row.
        catalog
            .create_snapshot(b"s", 0, SnapshotState::Pending, &[], None)
            .expect("snapshot");
        resize(&mut catalog, &mut files[0], 7);
        catalog
            .write(|tx| unlink(tx, files[1].ino))
            .expect("unlink");
        catalog.commit().expect("commit");
        assert_eq!(written(&catalog), (2, 7));
        consistent(&catalog);

        // Another connection writes alone, without a group or kept rows.
        drop(catalog);
        let mut alone = Catalog::open(&path, 4096, 0, (0, 0)).expect("reopen");
        let mut last = alone.write(|tx| file(tx, 5)).expect("create alone");
        resize(&mut alone, &mut last, 50);
        assert_eq!(written(&alone), (3, 57));
        assert_eq!(alone.live_inodes().expect("statfs"), 3);
        consistent(&alone);
    }

    /// Inode numbers come from a reserved batch, yet none is handed out twice: not after
    /// the write that reserved the batch was rolled back, not after an import moved
    /// `next_ino`, not by the next connection.
    #[test]
    fn reserved_inode_numbers_are_never_handed_out_twice() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("catalog.db");
        let mut catalog = mount_catalog(&path);
        let mut seen = std::collections::HashSet::new();
        let mut take = |catalog: &mut Catalog| {
            let ino = catalog.write(|tx| tx.alloc_ino()).expect("alloc");
            assert!(seen.insert(ino), "inode {ino} handed out twice");
            ino
        };
        let first = take(&mut catalog);
        let second = take(&mut catalog);
        assert_eq!(second, first + 1, "the second comes from the batch");

        // A write that reserves a batch and fails: the reservation goes with it.
        let used_up = INO_BATCH - 2;
        for _ in 0..used_up {
            take(&mut catalog);
        }
        let failed: Result<u64> = catalog.write(|tx| {
            tx.alloc_ino()?;
            Err(Error::Corrupt(
                "the operation fails after its reservation".into(),
            ))
        });
        assert!(failed.is_err());
        let after_rollback = take(&mut catalog);
        assert_eq!(
            after_rollback,
            first + INO_BATCH,
            "the rolled-back batch again"
        );

        // An import keeps the origin's numbers, inside the batch left: the batch goes.
        let reserved = catalog.meta("next_ino").expect("meta").expect("next_ino");
        catalog
            .write(|tx| tx.reserve_inos_through(after_rollback + 10))
            .expect("import");
        assert_eq!(take(&mut catalog), reserved);

        // Another connection takes numbers past every batch this one reserved.
        catalog.commit().expect("commit");
        let next_ino = catalog.meta("next_ino").expect("meta").expect("next_ino");
        drop(catalog);
        let mut reopened = Catalog::open(&path, 4096, 0, (0, 0)).expect("reopen");
        assert_eq!(take(&mut reopened), next_ino);
    }

    /// A snapshot created with a lock (a follower pins the store's) is handed back with
    /// it, as a later read gives it.
    #[test]
    fn a_snapshot_created_with_a_lock_comes_back_with_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut catalog =
            Catalog::open(&dir.path().join("catalog.db"), 4096, 0, (0, 0)).expect("open");
        let held = SnapshotLock {
            mode: LockMode::Governance,
            until: 2_000_000_000_000_000_000,
            cool_off_until: 1_000_000_000_000_000_000,
        };
        let row = catalog
            .create_snapshot(b"s", 1, SnapshotState::Completed, &[], Some(&held))
            .expect("snapshot");
        assert_eq!(row.lock, Some(held));
        assert_eq!(catalog.read(|tx| tx.snapshots()).expect("list"), vec![row]);
    }
}
