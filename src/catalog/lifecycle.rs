//! The catalog's side of a snapshot's lifecycle: the recycle bin (a deleted snapshot kept
//! until it expires) and locks (a snapshot no one may delete until a time).
//!
//! A snapshot in the bin keeps its row, so its generation stays pinned and its rows and
//! blocks stay referenced; only its name moves to a name space of its own
//! (`TRASH_PREFIX` + name, which no live name can start with: live names never start with
//! '.'), so the bin never blocks taking a new snapshot of the same name.

use rusqlite::{OptionalExtension, params};

use super::{Error, NAME_MAX, ReadTx, Result, SNAPSHOT_COLUMNS, SnapshotRow, WriteTx};

/// How a snapshot in the bin is named in `snapshots.name`.
pub(super) const TRASH_PREFIX: &[u8] = b".trash/";

/// When a snapshot went to the recycle bin, and when it is purged from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Trash {
    /// Nanoseconds since the epoch, as all times here.
    pub deleted: i64,
    pub expires: i64,
}

/// Who may undo a lock (EBS snapshot lock's modes, S3 Object Lock's retention modes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockMode {
    /// Whoever may delete snapshots may shorten or remove it.
    Governance,
    /// After its cool-off, only extended: never shortened or removed, by anyone.
    Compliance,
}

impl LockMode {
    pub fn as_str(self) -> &'static str {
        match self {
            LockMode::Governance => "governance",
            LockMode::Compliance => "compliance",
        }
    }
}

impl std::str::FromStr for LockMode {
    type Err = String;
    fn from_str(text: &str) -> std::result::Result<Self, String> {
        match text {
            "governance" => Ok(LockMode::Governance),
            "compliance" => Ok(LockMode::Compliance),
            other => Err(format!(
                "unknown lock mode '{other}' (governance or compliance)"
            )),
        }
    }
}

/// A snapshot's lock: it cannot be deleted before `until`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotLock {
    pub mode: LockMode,
    pub until: i64,
    /// A compliance lock is like a governance one before this time (equal to the time it
    /// was set when there is no cool-off).
    pub cool_off_until: i64,
}

/// The lifecycle columns of a snapshot row (`SNAPSHOT_COLUMNS` 12 to 16).
pub(super) fn lifecycle_of(
    row: &rusqlite::Row<'_>,
) -> Result<(Option<Trash>, Option<SnapshotLock>)> {
    let trash = match (row.get(12)?, row.get(13)?) {
        (Some(deleted), Some(expires)) => Some(Trash { deleted, expires }),
        _ => None,
    };
    let mode: Option<String> = row.get(14)?;
    let lock = match (mode, row.get(15)?, row.get(16)?) {
        (Some(mode), Some(until), Some(cool_off_until)) => Some(SnapshotLock {
            mode: mode.parse().map_err(Error::Corrupt)?,
            until,
            cool_off_until,
        }),
        _ => None,
    };
    Ok((trash, lock))
}

impl ReadTx<'_> {
    /// Bytes of blocks that only snapshots in the bin reference: what purging the whole
    /// bin frees. Reads the retired block-map rows (through their death index).
    pub fn trash_bytes(&self) -> Result<u64> {
        Ok(self.conn.query_row(
            "SELECT coalesce(sum(b.len), 0) FROM (
                 SELECT m.hash, count(*) AS n FROM blockmap m
                 WHERE m.death IS NOT NULL AND NOT EXISTS (
                     SELECT 1 FROM snapshots s WHERE s.deleted IS NULL
                         AND s.generation >= m.birth AND s.generation < m.death)
                 GROUP BY m.hash) d
             JOIN blocks b ON b.hash = d.hash WHERE b.refs = d.n",
            [],
            |r| r.get(0),
        )?)
    }
}

impl WriteTx<'_> {
    /// Moves snapshot `id` into the recycle bin. Its name there is its name, or
    /// `NAME~ID` (NAME cut to fit 255 bytes) if the bin already holds one of that name.
    pub fn trash_snapshot(&self, id: u64, trash: Trash) -> Result<SnapshotRow> {
        let name: Vec<u8> = self
            .conn
            .query_row("SELECT name FROM snapshots WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .optional()?
            .ok_or_else(|| Error::Corrupt(format!("no snapshot {id}")))?;
        let mut bin_name = [TRASH_PREFIX, &name].concat();
        let taken = self
            .conn
            .prepare_cached("SELECT 1 FROM snapshots WHERE name = ?1")?
            .exists([&bin_name])?;
        if taken {
            let suffix = format!("~{id}");
            bin_name.truncate(TRASH_PREFIX.len() + name.len().min(NAME_MAX - suffix.len()));
            bin_name.extend_from_slice(suffix.as_bytes());
        }
        self.update_snapshot(
            "name = ?2, deleted = ?3, expires = ?4",
            params![id, bin_name, trash.deleted, trash.expires],
        )
    }

    /// Takes snapshot `id` out of the bin under `name` (which the caller checked is free).
    pub fn undelete_snapshot(&self, id: u64, name: &[u8]) -> Result<SnapshotRow> {
        self.update_snapshot(
            "name = ?2, deleted = NULL, expires = NULL",
            params![id, name],
        )
    }

    /// Sets (`Some`) or removes the lock of snapshot `id`.
    pub fn set_snapshot_lock(&self, id: u64, lock: Option<&SnapshotLock>) -> Result<SnapshotRow> {
        self.update_snapshot(
            "lock_mode = ?2, lock_until = ?3, lock_cool_off = ?4",
            params![
                id,
                lock.map(|l| l.mode.as_str()),
                lock.map(|l| l.until),
                lock.map(|l| l.cool_off_until)
            ],
        )
    }

    /// Applies `set` (which uses ?2..) to snapshot ?1 and returns the row as it now is.
    fn update_snapshot(&self, set: &str, params: &[&dyn rusqlite::ToSql]) -> Result<SnapshotRow> {
        let sql = format!("UPDATE snapshots SET {set} WHERE id = ?1 RETURNING {SNAPSHOT_COLUMNS}");
        self.conn
            .query_row(&sql, params, |r| Ok(SnapshotRow::try_from(r)))
            .optional()?
            .ok_or_else(|| Error::Corrupt("no such snapshot".into()))?
    }
}
