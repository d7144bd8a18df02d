//! Snapshots: the `.snapshots` control directory (ZFS's `.zfs/snapshot`), creating,
//! deleting, renaming and tagging snapshots, and what they report about themselves.
//!
//! A snapshot pins the live generation (see `catalog`): creation flushes the write buffers
//! (once before it holds writers at the gate, then what they wrote meanwhile), then
//! inserts one row. Nothing else is copied.
//!
//! Around that, the volume runs its `SnapshotHooks` with no lock held: a hook may write
//! to the volume through the mount, which comes back into this core.

use std::sync::Arc;
use std::time::Instant;

use super::locks::XATTR_LOCK;
use super::trash::lifecycle_xattrs;
use super::{Attr, Error, NodeId, Result, View, Volume};
use crate::catalog::{
    Attrs, InodeRow, Kind, ROOT_INO, ReadTx, SnapshotLock, SnapshotRow, SnapshotState, Trash,
    UploadProgress,
};
use crate::sync::{RwLockWriteGuard, lock, write};

/// Name of the control directory in the live root.
pub const SNAPDIR_NAME: &[u8] = b".snapshots";
/// Inode number of the control directory in the live view (below the catalog's first).
pub const SNAPDIR_INO: u64 = 2;
pub const SNAPDIR: NodeId = NodeId {
    view: View::Live,
    ino: SNAPDIR_INO,
};

/// The state of a snapshot, and its xattr names.
pub const XATTR_ID: &[u8] = b"user.snapfs.id";
pub const XATTR_STATE: &[u8] = b"user.snapfs.state";
pub const XATTR_CREATED: &[u8] = b"user.snapfs.created";
pub const XATTR_PROGRESS: &[u8] = b"user.snapfs.progress";
pub const XATTR_ERROR: &[u8] = b"user.snapfs.error";
pub const TAG_PREFIX: &[u8] = b"user.tag.";
/// Xattr of `.snapshots`: `NAME: REASON` of the last snapshot a pre-snapshot hook refused.
pub const XATTR_HOOK_ERROR: &[u8] = b"user.snapfs.hook_error";

/// Commands run around each snapshot the volume takes (mkdir in `.snapshots`, the CLI,
/// schedules), without any of the core's locks held.
pub trait SnapshotHooks: Send + Sync {
    /// Runs before writers are held; an error (the reason) means no snapshot is taken.
    fn before(&self, name: &[u8]) -> std::result::Result<(), String>;
    /// Runs once the snapshot is taken (`pending`); what it does cannot undo it.
    fn after(&self, snapshot: &SnapshotInfo);
}

/// A snapshot as users see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub id: u64,
    pub name: Vec<u8>,
    pub state: SnapshotState,
    /// Creation time, nanoseconds since the epoch.
    pub created: i64,
    pub logical_bytes: u64,
    /// Bytes only this snapshot holds: what deleting it would free.
    pub exclusive_bytes: u64,
    pub tags: Vec<(Vec<u8>, Vec<u8>)>,
    pub upload: UploadProgress,
    /// Why the upload failed, for a `failed` snapshot.
    pub error: Option<String>,
    /// In the recycle bin since, until.
    pub trash: Option<Trash>,
    pub lock: Option<SnapshotLock>,
}

/// What users see of snapshot `row`: its catalog row with its space and tags.
pub fn describe(tx: &ReadTx<'_>, row: SnapshotRow) -> Result<SnapshotInfo> {
    Ok(SnapshotInfo {
        exclusive_bytes: tx.exclusive_bytes(row.id)?,
        tags: tx.snapshot_tags(row.id)?,
        id: row.id,
        name: row.name,
        state: row.state,
        created: row.created,
        logical_bytes: row.logical_bytes,
        upload: row.upload,
        error: row.error,
        trash: row.trash,
        lock: row.lock,
    })
}

/// `user.snapfs.progress`: `SENT/TOTAL bytes SENT/TOTAL blocks` (`?` for a total not yet
/// known), the raw bytes of the blocks this snapshot sends.
pub fn progress_text(progress: &UploadProgress) -> String {
    let total = |n: Option<u64>| n.map_or_else(|| "?".to_owned(), |n| n.to_string());
    format!(
        "{}/{} bytes {}/{} blocks",
        progress.sent_bytes,
        total(progress.total_bytes),
        progress.sent_blocks,
        total(progress.total_blocks)
    )
}

pub(super) fn check_snapshot_name(name: &[u8]) -> Result<()> {
    super::check_name(name)?;
    if name.starts_with(b".") {
        return Err(Error::Invalid("snapshot names may not start with '.'"));
    }
    Ok(())
}

/// A name for a snapshot named now: also without control characters, which would break
/// every line of a listing (`snapshot list`, `ls`, a script's loop). Names a catalog or a
/// followed store already holds keep working.
pub(super) fn check_new_snapshot_name(name: &[u8]) -> Result<()> {
    check_snapshot_name(name)?;
    if name.iter().any(|&b| b < 0x20 || b == 0x7f) {
        return Err(Error::Invalid(
            "snapshot names may not hold control characters",
        ));
    }
    Ok(())
}

/// Formats nanoseconds since the epoch as RFC 3339 UTC, e.g. `2026-11-24T20:31:05.123Z`.
pub fn rfc3339(nanos: i64) -> String {
    let t = crate::clock::utc(nanos);
    let millis = nanos.rem_euclid(1_000_000_000) / 1_000_000;
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        t.year, t.month, t.day, t.hour, t.minute, t.second
    )
}

impl Volume {
    /// Loads the snapshot table from the catalog: views resolve their generation from it.
    pub(super) fn load_snapshots(&self) -> Result<()> {
        self.snapshots
            .reload(|| Ok(lock(&self.catalog).read(|tx| tx.snapshots())?))
    }

    /// Attributes of the control directory: owned like the root, one link per snapshot.
    pub(super) fn snapdir_attr(&self, root: &InodeRow) -> Attr {
        let (count, latest) = self.snapshots.count_and_latest(false);
        Self::control_dir_attr(root, SNAPDIR_INO, ROOT_INO, count, latest)
    }

    /// Attributes of a control directory `ino` in `parent` holding `count` pinned views,
    /// the latest taken at `latest`: owned like the root.
    pub(super) fn control_dir_attr(
        root: &InodeRow,
        ino: u64,
        parent: u64,
        count: usize,
        latest: Option<i64>,
    ) -> Attr {
        let time = latest.unwrap_or(root.attrs.crtime);
        let row = InodeRow {
            ino,
            attrs: Attrs {
                kind: Kind::Dir,
                perm: 0o755,
                nlink: 2 + count as u32,
                size: 0,
                atime: time,
                mtime: time,
                ctime: time,
                ..root.attrs.clone()
            },
            parent,
            alloc: 0,
            target: None,
        };
        Attr::from_row(View::Live, &row)
    }

    /// Attributes of a snapshot's root: the volume root as it was, with the snapshot's
    /// creation time as its mtime.
    pub(super) fn snapshot_root_attr(&self, id: u64, row: &InodeRow) -> Result<Attr> {
        let (_, created) = self.pinned(id)?;
        let mut attr = Attr::from_row(View::Snapshot(id), row);
        attr.attrs.mtime = created;
        attr.attrs.ctime = created;
        Ok(attr)
    }

    /// Sets the commands run around each snapshot; a volume has one set for its life.
    pub fn set_snapshot_hooks(&self, hooks: Arc<dyn SnapshotHooks>) -> Result<()> {
        match self.hooks.set(hooks) {
            Ok(()) => Ok(()),
            Err(_ours) => Err(Error::Invalid("snapshot hooks are already set")),
        }
    }

    /// `NAME: REASON` of the last snapshot a pre-snapshot hook refused.
    pub(super) fn hook_error(&self) -> Result<Vec<u8>> {
        let failure = lock(&self.hook_failure);
        let (name, reason) = failure.as_ref().ok_or(Error::NoXattr)?;
        Ok([name, b": ".as_slice(), reason.as_bytes()].concat())
    }

    /// Takes a snapshot of the live volume. Every write that returned before is in it,
    /// nothing after; it costs the same whatever the size of the volume. The pre-snapshot
    /// hook runs first and the post-snapshot hook after, both with no lock held.
    pub fn create_snapshot(&self, name: &[u8]) -> Result<SnapshotInfo> {
        self.create_tagged_snapshot(name, &[])
    }

    /// `create_snapshot` with `tags` (the schedule's), committed with the row.
    pub(super) fn create_tagged_snapshot(
        &self,
        name: &[u8],
        tags: &[(Vec<u8>, Vec<u8>)],
    ) -> Result<SnapshotInfo> {
        check_new_snapshot_name(name)?;
        let hooks = self.hooks.get();
        if let Some(hooks) = hooks {
            // Checked now too, so a name in use never runs the hook.
            if self.snapshots.by_name(name).is_ok() {
                return Err(Error::Exists);
            }
            if let Err(reason) = hooks.before(name) {
                *lock(&self.hook_failure) = Some((name.to_vec(), reason.clone()));
                return Err(Error::Hook(reason));
            }
            // A refusal of this name is over: a later EIO for it is something else.
            lock(&self.hook_failure).take_if(|(refused, _)| refused == name);
        }
        let info = self.take_snapshot(name, tags)?;
        if let Some(hooks) = hooks {
            hooks.after(&info);
        }
        Ok(info)
    }

    /// Holds writers at the gate with every buffer flushed: what is pinned now falls between
    /// two changes and holds every write that returned. The buffers are flushed once first
    /// with writers running (the background flusher keeps them small, see `OpenFiles`), so
    /// writers wait only for what they wrote meanwhile.
    pub(super) fn hold_writers_flushed(&self) -> Result<RwLockWriteGuard<'_, ()>> {
        let started = Instant::now();
        self.flush_all()?;
        let flushed = Instant::now();
        let held = write(&self.gate);
        let gated = Instant::now();
        self.flush_all()?;
        // What a snapshot under load costs, and where (SNAPFS_LOG=snapfs=debug).
        tracing::debug!(
            flush_ms = (flushed - started).as_secs_f64() * 1e3,
            gate_wait_ms = (gated - flushed).as_secs_f64() * 1e3,
            held_flush_ms = gated.elapsed().as_secs_f64() * 1e3,
            "writers held"
        );
        Ok(held)
    }

    fn take_snapshot(&self, name: &[u8], tags: &[(Vec<u8>, Vec<u8>)]) -> Result<SnapshotInfo> {
        let started = Instant::now();
        let writers_held = self.hold_writers_flushed()?;
        if self.snapshots.by_name(name).is_ok() {
            return Err(Error::Exists);
        }
        let pinning = Instant::now();
        let row = self.snapshots.insert(name, || {
            self.insert_snapshot(name, self.clock.now(), SnapshotState::Pending, tags, None)
        })?;
        // Pinned: what the snapshot reports (its space, a query) is no concern of writers.
        drop(writers_held);
        let pin_ms = pinning.elapsed().as_secs_f64() * 1e3;
        self.upload_wake.notify_one();
        let info = self.snapshot_info(row.id);
        tracing::info!(
            name = %String::from_utf8_lossy(name),
            id = row.id,
            ms = started.elapsed().as_secs_f64() * 1e3,
            pin_ms,
            "snapshot taken"
        );
        info
    }

    /// Pins the live tree as a snapshot that is already safe in a store: a read-only mount
    /// following the store of another machine's volume (see `follow`).
    pub fn pin_followed_snapshot(
        &self,
        name: &[u8],
        created: i64,
        tags: &[(Vec<u8>, Vec<u8>)],
        snapshot_lock: Option<&SnapshotLock>,
    ) -> Result<()> {
        check_snapshot_name(name)?;
        let _writers_held = write(&self.gate);
        self.snapshots.insert(name, || {
            self.insert_snapshot(name, created, SnapshotState::Completed, tags, snapshot_lock)
        })?;
        Ok(())
    }

    /// The catalog's new snapshot row, with its tags and lock, committed at once.
    fn insert_snapshot(
        &self,
        name: &[u8],
        created: i64,
        state: SnapshotState,
        tags: &[(Vec<u8>, Vec<u8>)],
        snapshot_lock: Option<&SnapshotLock>,
    ) -> Result<SnapshotRow> {
        Ok(lock(&self.catalog).create_snapshot(name, created, state, tags, snapshot_lock)?)
    }

    /// Deletes a snapshot (rmdir, the CLI, retention): into the recycle bin if the volume
    /// keeps one, else for good. A locked snapshot is refused (EPERM).
    pub fn delete_snapshot(&self, name: &[u8]) -> Result<()> {
        let row = self.snapshots.by_name(name)?;
        self.delete_snapshot_row(&row)
    }

    /// Deletes snapshot `row` as `delete_snapshot` does, if it did not change since it was
    /// read (`check_still_removable`).
    pub(super) fn delete_snapshot_row(&self, row: &SnapshotRow) -> Result<()> {
        match self.trash_retention()? {
            Some(retention) => self.move_to_trash(row, retention),
            None => self.remove_snapshot(row, "delete"),
        }
    }

    /// Deletes snapshot `row` for good, freeing the rows and blocks nothing else needs,
    /// unless it changed since it was read or is locked (`check_still_removable`).
    pub(super) fn remove_snapshot(&self, row: &SnapshotRow, what: &str) -> Result<()> {
        let name = &row.name;
        self.snapshots.remove(
            row.id,
            |current| self.check_still_removable(row, current, what),
            || self.freeing(|| Ok(lock(&self.catalog).delete_snapshot(row.id)?)),
        )?;
        self.freeing(|| self.collect_garbage())?;
        self.upload_wake.notify_one();
        tracing::info!(name = %String::from_utf8_lossy(name), "snapshot deleted");
        Ok(())
    }

    pub fn rename_snapshot(&self, name: &[u8], new_name: &[u8]) -> Result<()> {
        check_new_snapshot_name(new_name)?;
        self.snapshots.rename(name, new_name, |id| {
            Ok(lock(&self.catalog).write_now(|tx| tx.rename_snapshot(id, new_name))?)
        })?;
        self.upload_wake.notify_one();
        Ok(())
    }

    pub fn snapshot_info(&self, id: u64) -> Result<SnapshotInfo> {
        let row = self.snapshots.get(id)?;
        lock(&self.catalog).read(|tx| describe(tx, row))
    }

    pub fn list_snapshots(&self) -> Vec<SnapshotRow> {
        self.snapshots.list()
    }

    /// Snapshots by state, and the bytes pending ones still have to send (of the totals
    /// known so far), for a metrics scrape.
    pub fn metrics_gauges(&self) -> crate::metrics::VolumeGauges {
        let rows = self.snapshots.list();
        let snapshots = [
            SnapshotState::Pending,
            SnapshotState::Completed,
            SnapshotState::Failed,
        ]
        .map(|state| {
            let count = rows.iter().filter(|row| row.state == state).count();
            (state.as_str(), count as u64)
        });
        let pending_bytes = rows
            .iter()
            .filter(|row| row.state == SnapshotState::Pending)
            .map(|row| {
                let total = row.upload.total_bytes.unwrap_or(row.logical_bytes);
                total.saturating_sub(row.upload.sent_bytes)
            })
            .sum();
        crate::metrics::VolumeGauges {
            snapshots: snapshots.to_vec(),
            pending_bytes,
        }
    }

    /// Extended attributes of a snapshot's root: its metadata and tags.
    /// Reads only the row and the tags: no space accounting, which xattrs do not show.
    pub(super) fn snapshot_xattrs(&self, id: u64) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        if self.is_checkpoint(id) {
            return self.checkpoint_xattrs(id);
        }
        let row = self.snapshots.get(id)?;
        let tags = lock(&self.catalog).read(|tx| tx.snapshot_tags(id))?;
        let mut attrs = vec![
            (XATTR_ID.to_vec(), row.id.to_string().into_bytes()),
            (XATTR_STATE.to_vec(), row.state.as_str().as_bytes().to_vec()),
            (XATTR_CREATED.to_vec(), rfc3339(row.created).into_bytes()),
            (
                XATTR_PROGRESS.to_vec(),
                progress_text(&row.upload).into_bytes(),
            ),
        ];
        attrs.extend(lifecycle_xattrs(&row));
        if let Some(error) = row.error {
            attrs.push((XATTR_ERROR.to_vec(), error.into_bytes()));
        }
        for (key, value) in tags {
            attrs.push(([TAG_PREFIX, &key].concat(), value));
        }
        Ok(attrs)
    }

    /// Sets (`Some`) or removes (`None`) the tag behind xattr `name` of snapshot `id`.
    pub(super) fn set_snapshot_tag(
        &self,
        id: u64,
        name: &[u8],
        value: Option<&[u8]>,
    ) -> Result<()> {
        if self.is_checkpoint(id) || self.snapshots.get(id)?.trash.is_some() {
            return Err(Error::ReadOnly);
        }
        if name == XATTR_LOCK {
            return self.set_lock_xattr(id, value);
        }
        let key = name
            .strip_prefix(TAG_PREFIX)
            .filter(|key| !key.is_empty())
            .ok_or(Error::ReadOnly)?;
        lock(&self.catalog).write_now(|tx| match value {
            Some(value) => Ok(tx.set_snapshot_tag(id, key, value)?),
            None if tx.remove_snapshot_tag(id, key)? => Ok(()),
            None => Err(Error::NoXattr),
        })?;
        self.upload_wake.notify_one();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::rfc3339;

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339(1_795_000_000_123_000_000),
            "2026-11-18T11:06:40.123Z"
        );
        assert_eq!(rfc3339(951_782_400_000_000_000), "2000-02-29T00:00:00.000Z");
    }
}
