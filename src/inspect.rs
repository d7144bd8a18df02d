//! Read-only views of a data dir that need no mount: snapshot listings and `diff`. They
//! open the catalog read-only, so they also work beside a running mount.

use std::collections::BTreeMap;
use std::path::Path;

use crate::catalog::{Catalog, EntryChange, LIVE, PackTotals, ReadTx};
use crate::policy::Policy;
use crate::volume::retention::Verdict;
use crate::volume::{CheckpointSpace, Error, Result, SnapshotInfo, describe, describe_checkpoints};

/// One difference between two points in time, as `zfs diff` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Added(Vec<u8>),
    Removed(Vec<u8>),
    Modified(Vec<u8>),
    Renamed { from: Vec<u8>, to: Vec<u8> },
}

impl Change {
    /// The one-letter code `zfs diff` uses.
    pub fn code(&self) -> char {
        match self {
            Change::Added(_) => '+',
            Change::Removed(_) => '-',
            Change::Modified(_) => 'M',
            Change::Renamed { .. } => 'R',
        }
    }
}

pub struct Inspector {
    catalog: Catalog,
}

impl Inspector {
    pub fn open(data_dir: &Path) -> Result<Inspector> {
        Ok(Inspector {
            catalog: Catalog::open_data_dir_read_only(data_dir)?,
        })
    }

    /// The snapshots, outside the recycle bin.
    pub fn snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        self.described(false)
    }

    /// The snapshots in the recycle bin, and the bytes purging all of them would free.
    pub fn trash(&self) -> Result<(Vec<SnapshotInfo>, u64)> {
        let total = self.catalog.read(|tx| tx.trash_bytes())?;
        Ok((self.described(true)?, total))
    }

    fn described(&self, trashed: bool) -> Result<Vec<SnapshotInfo>> {
        self.catalog.read(|tx| {
            tx.snapshots()?
                .into_iter()
                .filter(|row| row.trash.is_some() == trashed)
                .map(|row| describe(tx, row))
                .collect()
        })
    }

    pub fn snapshot(&self, name: &[u8]) -> Result<SnapshotInfo> {
        self.snapshots()?
            .into_iter()
            .find(|s| s.name == name)
            .ok_or(Error::NotFound)
    }

    /// The packs in the volume's store: their bytes and the bytes no snapshot needs.
    pub fn store_usage(&self) -> Result<PackTotals> {
        Ok(self.catalog.read(|tx| tx.pack_totals())?)
    }

    /// The volume's snapshot policy and the start of the last slot its schedule took.
    pub fn policy(&self) -> Result<Option<(Policy, i64)>> {
        Ok(self.catalog.read(|tx| tx.policy())?)
    }

    /// The policy and what its retention would do now; `None` without a policy.
    pub fn retention_plan(&self) -> Result<Option<(Policy, Vec<Verdict>)>> {
        self.catalog
            .read(|tx| crate::volume::retention_plan(tx, tx.snapshots()?, crate::volume::now()))
    }

    /// The checkpoints, oldest first, with what they cost.
    pub fn checkpoints(&self) -> Result<CheckpointSpace> {
        self.catalog.read(describe_checkpoints)
    }

    fn generation_of(&self, name: &[u8]) -> Result<u64> {
        self.catalog.read(|tx| {
            tx.snapshots()?
                .into_iter()
                .find(|s| s.trash.is_none() && s.name == name)
                .map(|s| s.generation)
                .ok_or(Error::NotFound)
        })
    }

    /// What changed from snapshot `from` to snapshot `to`, or to the live volume.
    pub fn diff(&self, from: &[u8], to: Option<&[u8]>) -> Result<Vec<Change>> {
        let from = self.generation_of(from)?;
        let to = match to {
            Some(name) => self.generation_of(name)?,
            None => LIVE,
        };
        if from > to {
            return Err(Error::Invalid("the first snapshot must be the older one"));
        }
        self.catalog.read(|tx| changes(tx, from, to))
    }
}

fn entry_path(tx: &ReadTx<'_>, view: u64, entry: &EntryChange) -> Result<Vec<u8>> {
    let mut path = tx
        .path_of(view, entry.parent)?
        .unwrap_or_else(|| b"/?".to_vec());
    if path != b"/" {
        path.push(b'/');
    }
    path.extend_from_slice(&entry.name);
    Ok(path)
}

fn changes(tx: &ReadTx<'_>, from: u64, to: u64) -> Result<Vec<Change>> {
    let (removed, added) = tx.changed_entries(from, to)?;
    // An inode that lost a name and gained one was renamed (pairing links in order).
    let mut gained: BTreeMap<u64, Vec<&EntryChange>> = BTreeMap::new();
    for entry in &added {
        gained.entry(entry.ino).or_default().push(entry);
    }
    let mut changes = Vec::new();
    let mut renamed = Vec::new();
    for entry in &removed {
        let old = entry_path(tx, from, entry)?;
        match gained.get_mut(&entry.ino).and_then(|names| names.pop()) {
            Some(new_entry) => {
                let new = entry_path(tx, to, new_entry)?;
                // Moved away and back again: not a rename (content changes show as M).
                if new != old {
                    renamed.push(entry.ino);
                    changes.push(Change::Renamed { from: old, to: new });
                }
            }
            None => changes.push(Change::Removed(old)),
        }
    }
    for entries in gained.values() {
        for entry in entries {
            changes.push(Change::Added(entry_path(tx, to, entry)?));
        }
    }
    for ino in tx.changed_inodes(from, to)? {
        if renamed.contains(&ino) {
            continue;
        }
        if let Some(path) = tx.path_of(to, ino)? {
            changes.push(Change::Modified(path));
        }
    }
    changes.sort_by(|a, b| path_key(a).cmp(path_key(b)));
    Ok(changes)
}

fn path_key(change: &Change) -> &[u8] {
    match change {
        Change::Added(p) | Change::Removed(p) | Change::Modified(p) => p,
        Change::Renamed { to, .. } => to,
    }
}
