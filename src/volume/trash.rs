//! The recycle bin (EBS Recycle Bin) and snapshot locks, on the snapshot table.
//!
//! With a retention set (`--trash-days`), deleting a snapshot moves it to the bin: its
//! catalog row stays (its generation pinned, its rows, blocks and store objects kept), it
//! leaves `.snapshots` and its name is free again. It is browsable read-only under
//! `.snapshots/.trash/NAME` (not listed in `.snapshots`, so find, du and rsync do not walk
//! into it), restored by renaming it back into `.snapshots`, purged by rmdir there, at its
//! expiry (`purge_expired_trash`, on a timer) or, oldest first, when the data dir is full.
//!
//! A locked snapshot (see `locks`) can be neither deleted nor purged while its lock holds.

use std::sync::Arc;
use std::time::Duration;

use super::locks::{self, XATTR_LOCK};
use super::snapshots::{SNAPDIR_INO, check_new_snapshot_name, check_snapshot_name, rfc3339};
use super::{DirEntry, Error, NodeId, Result, SnapshotInfo, View, Volume};
use crate::catalog::{ROOT_INO, Setting, SnapshotLock, SnapshotRow, Trash};
use crate::sync::lock;

/// Name of the recycle bin in `.snapshots`.
pub const TRASHDIR_NAME: &[u8] = b".trash";
/// Inode number of the recycle bin in the live view (below the catalog's first).
pub const TRASHDIR_INO: u64 = 3;
pub const TRASHDIR: NodeId = NodeId {
    view: View::Live,
    ino: TRASHDIR_INO,
};

/// Xattrs of a snapshot in the bin: when it was deleted and when it is purged.
pub const XATTR_DELETED: &[u8] = b"user.snapfs.deleted";
pub const XATTR_EXPIRES: &[u8] = b"user.snapfs.expires";

/// The lock and bin xattrs of snapshot `row`.
pub(super) fn lifecycle_xattrs(row: &SnapshotRow) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut attrs = Vec::new();
    if let Some(lock) = &row.lock {
        attrs.push((XATTR_LOCK.to_vec(), locks::format(lock).into_bytes()));
    }
    if let Some(trash) = &row.trash {
        attrs.push((XATTR_DELETED.to_vec(), rfc3339(trash.deleted).into_bytes()));
        attrs.push((XATTR_EXPIRES.to_vec(), rfc3339(trash.expires).into_bytes()));
    }
    attrs
}

/// `NotFound` unless snapshot `current` is still the snapshot read as `seen`, under the
/// same name, in or out of the bin: not renamed, undeleted or deleted again since.
fn unchanged_since(seen: &SnapshotRow, current: &SnapshotRow) -> Result<()> {
    if current.name == seen.name && current.trash == seen.trash {
        Ok(())
    } else {
        Err(Error::NotFound)
    }
}

impl Volume {
    /// How long a deleted snapshot stays in the recycle bin; `None`: deleting is for good.
    pub fn trash_retention(&self) -> Result<Option<Duration>> {
        let Some(secs) = self.setting(Setting::TrashRetention)? else {
            return Ok(None);
        };
        let secs: u64 = secs.parse().map_err(|e| {
            Error::Catalog(crate::catalog::Error::Corrupt(format!(
                "remembered trash retention '{secs}': {e}"
            )))
        })?;
        Ok((secs > 0).then(|| Duration::from_secs(secs)))
    }

    /// Remembers the recycle bin's retention (`--trash-days`); zero turns the bin off for
    /// later deletions (what it holds stays until it expires).
    pub fn remember_trash_retention(&self, retention: Duration) -> Result<()> {
        self.set_setting(Setting::TrashRetention, &retention.as_secs().to_string())
    }

    /// Refuses to `what` (delete, purge) snapshot `row` while its lock holds, and logs it.
    pub(super) fn check_unlocked(&self, row: &SnapshotRow, what: &str) -> Result<()> {
        match &row.lock {
            Some(held) if locks::holds(held, self.clock.now()) => {
                tracing::warn!(name = %String::from_utf8_lossy(&row.name), mode = held.mode.as_str(),
                    until = %rfc3339(held.until), "refused to {what} a locked snapshot");
                Err(Error::NotPermitted("the snapshot is locked"))
            }
            _ => Ok(()),
        }
    }

    /// Refuses to `what` (delete, purge) snapshot `current`, asked of it as it was read
    /// (`seen`), if it changed since (`unchanged_since`) or while its lock holds. Checked
    /// under the snapshot table's lock, so a change made after the read is never
    /// overridden: an undeleted snapshot is not purged, a locked one not deleted.
    pub(super) fn check_still_removable(
        &self,
        seen: &SnapshotRow,
        current: &SnapshotRow,
        what: &str,
    ) -> Result<()> {
        unchanged_since(seen, current)?;
        self.check_unlocked(current, what)
    }

    /// Moves snapshot `row` into the recycle bin for `retention`.
    pub(super) fn move_to_trash(&self, row: &SnapshotRow, retention: Duration) -> Result<()> {
        let deleted = self.clock.now();
        let trash = Trash {
            deleted,
            expires: deleted.saturating_add(retention.as_nanos().min(i64::MAX as u128) as i64),
        };
        let moved = self.snapshots.update(row.id, |current, _| {
            self.check_still_removable(row, current, "delete")?;
            Ok(lock(&self.catalog).write_now(|tx| tx.trash_snapshot(row.id, trash))?)
        })?;
        self.upload_wake.notify_one();
        tracing::info!(name = %String::from_utf8_lossy(&row.name),
            bin_name = %String::from_utf8_lossy(&moved.name), expires = %rfc3339(trash.expires),
            "snapshot moved to the recycle bin");
        Ok(())
    }

    /// The snapshots in the recycle bin.
    pub fn trashed_snapshots(&self) -> Vec<SnapshotRow> {
        self.snapshots.trashed()
    }

    /// Takes snapshot `name` out of the recycle bin, as `new_name` or under its own name.
    /// A name in use is `Exists`.
    pub fn undelete_snapshot(&self, name: &[u8], new_name: Option<&[u8]>) -> Result<SnapshotInfo> {
        let row = self.snapshots.trashed_by_name(name)?;
        // Its own name stands as it was; a new one is checked as any name given now.
        match new_name {
            Some(new_name) => check_new_snapshot_name(new_name)?,
            None => check_snapshot_name(name)?,
        }
        let new_name = new_name.unwrap_or(name);
        self.snapshots.update(row.id, |current, taken| {
            unchanged_since(&row, current)?;
            if taken(new_name) {
                return Err(Error::Exists);
            }
            Ok(lock(&self.catalog).write_now(|tx| tx.undelete_snapshot(row.id, new_name))?)
        })?;
        self.upload_wake.notify_one();
        tracing::info!(name = %String::from_utf8_lossy(new_name), "snapshot restored from the recycle bin");
        self.snapshot_info(row.id)
    }

    /// Deletes snapshot `name` of the recycle bin for good.
    pub fn purge_snapshot(&self, name: &[u8]) -> Result<()> {
        let row = self.snapshots.trashed_by_name(name)?;
        self.remove_snapshot(&row, "purge")
    }

    /// Purges the snapshots of the bin that expired by `at`; returns how many.
    pub fn purge_expired_trash(&self, at: i64) -> Result<usize> {
        let mut purged = 0;
        for row in self.snapshots.trashed() {
            if row.trash.is_none_or(|trash| trash.expires > at) {
                continue;
            }
            // One locked, undeleted or purged since the bin was read stays; the rest of
            // the bin is still purged.
            if self.purge_as_read(&row)? {
                purged += 1;
            }
        }
        Ok(purged)
    }

    /// Purges snapshot `row` of the bin, as it was read; false if it was locked,
    /// undeleted or purged since (it stays as it is now).
    fn purge_as_read(&self, row: &SnapshotRow) -> Result<bool> {
        match self.remove_snapshot(row, "purge") {
            Ok(()) => {
                self.forget_name(TRASHDIR, &row.name);
                Ok(true)
            }
            Err(Error::NotPermitted(_) | Error::NotFound) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Purges the oldest deletion in the bin (that no lock holds), to make room on a full
    /// data dir. Whether there was one.
    pub(super) fn purge_oldest_trash(&self) -> Result<bool> {
        let at = self.clock.now();
        let oldest = self
            .snapshots
            .trashed()
            .into_iter()
            .filter(|row| !row.lock.as_ref().is_some_and(|l| locks::holds(l, at)))
            .min_by_key(|row| row.trash.map_or(i64::MAX, |trash| trash.deleted));
        let Some(row) = oldest else {
            return Ok(false);
        };
        tracing::warn!(name = %String::from_utf8_lossy(&row.name),
            "data dir full: purging the oldest snapshot of the recycle bin before failing a write");
        // Purged, or the bin changed since it was read (another writer purged it, or it
        // was undeleted or locked): either way the writer tries again.
        self.purge_as_read(&row)?;
        Ok(true)
    }

    /// Starts the thread that purges the bin's expired snapshots every `every`. It ends
    /// when the volume is dropped.
    pub fn spawn_trash_timer(self: &Arc<Self>, every: Duration) -> std::io::Result<()> {
        self.spawn_periodic("snapfs-trash", every, |volume| {
            if let Err(e) = volume.purge_expired_trash(volume.clock.now()) {
                tracing::warn!(error = %e, "purging expired snapshots from the recycle bin failed");
            }
        })
    }

    /// Locks (`Some`) or unlocks snapshot `name` by the rules of `locks::change`; a
    /// refusal is `NotPermitted` (EPERM), a lock already expired `Invalid` (EINVAL).
    pub fn lock_snapshot(&self, name: &[u8], wanted: Option<&SnapshotLock>) -> Result<()> {
        let row = self.snapshots.by_name(name)?;
        self.change_lock(row.id, wanted, true)
    }

    /// Records the lock a followed store shows for snapshot `name`: the store's volume
    /// enforced the rules already.
    pub fn mirror_snapshot_lock(&self, name: &[u8], held: Option<&SnapshotLock>) -> Result<()> {
        let row = self.snapshots.by_name(name)?;
        if row.lock.as_ref() == held {
            return Ok(());
        }
        self.change_lock(row.id, held, false)
    }

    fn change_lock(&self, id: u64, wanted: Option<&SnapshotLock>, checked: bool) -> Result<()> {
        if checked && wanted.is_some_and(|lock| !locks::holds(lock, self.clock.now())) {
            return Err(Error::Invalid(
                "a lock whose until has passed would not hold",
            ));
        }
        let row = self.snapshots.update(id, |current, _| {
            let new = if checked {
                locks::change(current.lock.as_ref(), wanted, self.clock.now()).map_err(|reason| {
                    tracing::warn!(name = %String::from_utf8_lossy(&current.name), reason, "lock change refused");
                    Error::NotPermitted(reason)
                })?
            } else {
                wanted.copied()
            };
            Ok(lock(&self.catalog).write_now(|tx| tx.set_snapshot_lock(id, new.as_ref()))?)
        })?;
        self.upload_wake.notify_one();
        tracing::info!(name = %String::from_utf8_lossy(&row.name),
            lock = %row.lock.as_ref().map_or_else(|| "none".to_owned(), locks::format), "snapshot lock set");
        Ok(())
    }

    /// Sets (`Some`, the xattr's text) or removes the lock of snapshot `id`.
    pub(super) fn set_lock_xattr(&self, id: u64, value: Option<&[u8]>) -> Result<()> {
        let current = self.snapshots.get(id)?;
        let wanted = match value {
            Some(value) => Some(
                locks::parse(&String::from_utf8_lossy(value), self.clock.now()).map_err(
                    |reason| {
                        tracing::warn!(reason, "bad lock");
                        Error::Invalid(
                            "a lock is mode=governance|compliance until=TIME [cool-off-until=TIME]",
                        )
                    },
                )?,
            ),
            None if current.lock.is_none() => return Err(Error::NoXattr),
            None => None,
        };
        self.change_lock(id, wanted.as_ref(), true)
    }

    /// Attributes of `.snapshots/.trash`.
    pub(super) fn trashdir_attr(&self) -> Result<super::Attr> {
        let root = self.row(NodeId::live(ROOT_INO))?;
        let (count, latest) = self.snapshots.count_and_latest(true);
        Ok(Self::control_dir_attr(
            &root,
            TRASHDIR_INO,
            SNAPDIR_INO,
            count,
            latest,
        ))
    }

    /// `.`, `..` and one directory per snapshot in the bin.
    pub(super) fn trashdir_entries(&self) -> Result<Vec<DirEntry>> {
        let mut entries = vec![
            DirEntry {
                name: b".".to_vec(),
                attr: self.trashdir_attr()?,
            },
            DirEntry {
                name: b"..".to_vec(),
                attr: self.getattr(NodeId::live(SNAPDIR_INO))?,
            },
        ];
        let trashed = self.snapshots.trashed().into_iter();
        self.push_snapshot_roots(&mut entries, trashed.map(|row| (row.id, row.name)))?;
        Ok(entries)
    }

    /// Looks `name` up in `.snapshots/.trash`.
    pub(super) fn trashdir_lookup(&self, name: &[u8]) -> Result<super::Attr> {
        match name {
            b"." => self.trashdir_attr(),
            b".." => self.getattr(NodeId::live(SNAPDIR_INO)),
            _ => self.getattr(NodeId::snapshot_root(
                self.snapshots.trashed_by_name(name)?.id,
            )),
        }
    }
}
