//! `SnapshotTable`: the volume's snapshots by id, mirrored from the catalog so that every
//! request into a snapshot resolves its generation without a query. The checkpoints have
//! a table of the same kind (`PinTable<CheckpointRow>`).
//!
//! Snapshots in the recycle bin are here too (requests into them resolve the same way),
//! in a name space of their own: lookups by name, listings and counts see one or the
//! other, never both.
//!
//! Changes go catalog first, with the table's lock held across both, so a reload racing a
//! change can never undo it. Locks: the table before the catalog, never the other way.

use std::collections::BTreeMap;

use super::{Error, Result};
use crate::catalog::{CheckpointRow, SnapshotRow};
use crate::sync::{RwLock, read, write};

/// A catalog row pinning a generation under a name: a snapshot or a checkpoint.
pub(super) trait Pin: Clone {
    fn id(&self) -> u64;
    fn name(&self) -> &[u8];
    /// In the recycle bin: its name is in the bin's name space.
    fn in_trash(&self) -> bool;
}

impl Pin for SnapshotRow {
    fn id(&self) -> u64 {
        self.id
    }
    fn name(&self) -> &[u8] {
        &self.name
    }
    fn in_trash(&self) -> bool {
        self.trash.is_some()
    }
}

impl Pin for CheckpointRow {
    fn id(&self) -> u64 {
        self.id
    }
    fn name(&self) -> &[u8] {
        self.name.as_bytes()
    }
    fn in_trash(&self) -> bool {
        false
    }
}

/// Pinned views by id, mirrored from the catalog.
pub(super) struct PinTable<R> {
    rows: RwLock<BTreeMap<u64, R>>,
}

impl<R> Default for PinTable<R> {
    fn default() -> Self {
        PinTable {
            rows: RwLock::new(BTreeMap::new()),
        }
    }
}

pub(super) type SnapshotTable = PinTable<SnapshotRow>;

impl<R: Pin> PinTable<R> {
    /// Replaces the table with what `load` reads from the catalog. The table stays locked
    /// meanwhile: a snapshot created or deleted concurrently updates it after this reload,
    /// instead of being undone by a read from before it.
    pub fn reload(&self, load: impl FnOnce() -> Result<Vec<R>>) -> Result<()> {
        let mut rows = write(&self.rows);
        *rows = load()?.into_iter().map(|row| (row.id(), row)).collect();
        Ok(())
    }

    pub fn get(&self, id: u64) -> Result<R> {
        read(&self.rows).get(&id).cloned().ok_or(Error::NotFound)
    }

    /// The row named `name`, outside the recycle bin.
    pub fn by_name(&self, name: &[u8]) -> Result<R> {
        self.find(false, name)
    }

    fn find(&self, trashed: bool, name: &[u8]) -> Result<R> {
        read(&self.rows)
            .values()
            .find(|row| row.in_trash() == trashed && row.name() == name)
            .cloned()
            .ok_or(Error::NotFound)
    }

    /// The rows outside the recycle bin, by id: oldest first.
    pub fn list(&self) -> Vec<R> {
        self.rows_where(false)
    }

    fn rows_where(&self, trashed: bool) -> Vec<R> {
        read(&self.rows)
            .values()
            .filter(|row| row.in_trash() == trashed)
            .cloned()
            .collect()
    }

    /// Adds the row `create` makes in the catalog, unless the name is taken.
    pub fn insert(&self, name: &[u8], create: impl FnOnce() -> Result<R>) -> Result<R> {
        let mut rows = write(&self.rows);
        if taken(&rows, name) {
            return Err(Error::Exists);
        }
        let row = create()?;
        rows.insert(row.id(), row.clone());
        Ok(row)
    }

    /// Removes row `id` once `delete` took it out of the catalog, if `still` accepts the
    /// row as it is now: a change read before (a rename, an undelete, a lock) is seen,
    /// never overridden. A row removed meanwhile is `NotFound`.
    pub fn remove<T>(
        &self,
        id: u64,
        still: impl FnOnce(&R) -> Result<()>,
        delete: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        let mut rows = write(&self.rows);
        still(rows.get(&id).ok_or(Error::NotFound)?)?;
        let done = delete()?;
        rows.remove(&id);
        Ok(done)
    }
}

impl SnapshotTable {
    /// The snapshot named `name` in the recycle bin.
    pub fn trashed_by_name(&self, name: &[u8]) -> Result<SnapshotRow> {
        self.find(true, name)
    }

    /// The snapshots in the recycle bin.
    pub fn trashed(&self) -> Vec<SnapshotRow> {
        self.rows_where(true)
    }

    /// How many snapshots (in the bin: `trashed`) there are, and when the newest was taken.
    pub fn count_and_latest(&self, trashed: bool) -> (usize, Option<i64>) {
        let rows = read(&self.rows);
        let rows = rows.values().filter(|row| row.trash.is_some() == trashed);
        rows.fold((0, None), |(n, latest), row| {
            (n + 1, latest.max(Some(row.created)))
        })
    }

    /// Renames snapshot `name` once `rename` renamed it in the catalog; a taken name is
    /// `Exists`.
    pub fn rename(
        &self,
        name: &[u8],
        new_name: &[u8],
        rename: impl FnOnce(u64) -> Result<()>,
    ) -> Result<()> {
        let mut rows = write(&self.rows);
        let id = rows
            .values()
            .find(|row| row.trash.is_none() && row.name == name)
            .map(|row| row.id)
            .ok_or(Error::NotFound)?;
        if name == new_name {
            return Ok(());
        }
        if taken(&rows, new_name) {
            return Err(Error::Exists);
        }
        rename(id)?;
        if let Some(row) = rows.get_mut(&id) {
            row.name = new_name.to_vec();
        }
        Ok(())
    }

    /// Replaces snapshot `id` with the row `change` makes of it in the catalog. `change`
    /// gets the row, and whether a name is taken outside the bin.
    pub fn update(
        &self,
        id: u64,
        change: impl FnOnce(&SnapshotRow, &dyn Fn(&[u8]) -> bool) -> Result<SnapshotRow>,
    ) -> Result<SnapshotRow> {
        let mut rows = write(&self.rows);
        let current = rows.get(&id).cloned().ok_or(Error::NotFound)?;
        let row = change(&current, &|name| taken(&rows, name))?;
        rows.insert(id, row.clone());
        Ok(row)
    }
}

/// Whether a row outside the recycle bin is named `name`.
fn taken<R: Pin>(rows: &BTreeMap<u64, R>, name: &[u8]) -> bool {
    rows.values()
        .any(|row| !row.in_trash() && row.name() == name)
}
