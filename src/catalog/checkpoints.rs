//! The catalog's side of continuous checkpoints: local-only pins of a generation, kept as
//! `snapshots` rows in state `checkpoint`.
//!
//! Every query over pinned generations (what `retire` keeps, a snapshot's bounds, what a
//! deletion frees) sees them, so a checkpoint keeps what it saw exactly as a snapshot
//! does. Every upload query selects `pending` or `completed` rows, so none ever reaches
//! the store, and none is a base of a manifest. Promoting one makes it `pending`.

use rusqlite::{OptionalExtension, Row, params};

use super::{Catalog, ReadTx, Result, SNAPSHOT_COLUMNS, SnapshotRow, WriteTx};

/// `snapshots.state` of a checkpoint.
pub(super) const CHECKPOINT: &str = "checkpoint";

/// Stored names start with it: snapshot names cannot, so the two never collide.
const NAME_PREFIX: &str = ".";

/// A checkpoint as the catalog records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointRow {
    pub id: u64,
    /// The name users see (the stored one without its prefix).
    pub name: String,
    pub generation: u64,
    /// Nanoseconds since the epoch.
    pub created: i64,
    /// Bytes of all regular files when it was taken.
    pub logical_bytes: u64,
}

const CHECKPOINT_COLUMNS: &str = "id, name, generation, created, logical_bytes";

impl TryFrom<&Row<'_>> for CheckpointRow {
    type Error = super::Error;
    fn try_from(row: &Row<'_>) -> Result<Self> {
        let stored: Vec<u8> = row.get(1)?;
        let name = String::from_utf8_lossy(&stored);
        Ok(CheckpointRow {
            id: row.get(0)?,
            name: name.strip_prefix(NAME_PREFIX).unwrap_or(&name).to_owned(),
            generation: row.get(2)?,
            created: row.get(3)?,
            logical_bytes: row.get(4)?,
        })
    }
}

impl Catalog {
    /// Pins the live generation as checkpoint `name` and starts the next one: one row, as
    /// for a snapshot.
    pub fn create_checkpoint(&mut self, name: &str, created: i64) -> Result<CheckpointRow> {
        let stored = format!("{NAME_PREFIX}{name}");
        self.pin_generation(
            stored.as_bytes(),
            created,
            &CHECKPOINT,
            CHECKPOINT_COLUMNS,
            |r| CheckpointRow::try_from(r),
            |_, _| Ok(()),
        )
    }
}

impl ReadTx<'_> {
    /// The checkpoints, oldest first.
    pub fn checkpoints(&self) -> Result<Vec<CheckpointRow>> {
        let sql = format!(
            "SELECT {CHECKPOINT_COLUMNS} FROM snapshots WHERE state = ?1 ORDER BY generation"
        );
        let mut stmt = self.conn.prepare_cached(&sql)?;
        let rows = stmt.query_map([CHECKPOINT], |r| Ok(CheckpointRow::try_from(r)))?;
        rows.map(|row| row?).collect()
    }

    /// Whether the live generation has changed anything since the last pin (snapshot or
    /// checkpoint): a row born or retired in it. Read through the generation indexes.
    /// A new volume's root, born with it in generation 1, is no change.
    pub fn changed_since_pin(&self) -> Result<bool> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM inodes WHERE birth = ?1 AND NOT (ino = ?2 AND ?1 = 1))
                 OR EXISTS (SELECT 1 FROM inodes WHERE death = ?1)
                 OR EXISTS (SELECT 1 FROM dentries WHERE birth = ?1)
                 OR EXISTS (SELECT 1 FROM dentries WHERE death = ?1)
                 OR EXISTS (SELECT 1 FROM blockmap WHERE birth = ?1)
                 OR EXISTS (SELECT 1 FROM blockmap WHERE death = ?1)
                 OR EXISTS (SELECT 1 FROM xattrs WHERE birth = ?1)
                 OR EXISTS (SELECT 1 FROM xattrs WHERE death = ?1)",
        )?;
        Ok(stmt.query_row([self.g, super::ROOT_INO], |r| r.get(0))?)
    }

    /// Bytes of the blocks only checkpoints see (no snapshot, not the live volume): what
    /// dropping every checkpoint would free. Reads only the retired block-map rows.
    pub fn checkpoint_only_bytes(&self) -> Result<u64> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT coalesce(sum(b.len), 0) FROM (
                 SELECT m.hash, count(*) AS n FROM blockmap m
                 WHERE m.death IS NOT NULL AND NOT EXISTS (
                     SELECT 1 FROM snapshots s WHERE s.state != ?1
                         AND s.generation >= m.birth AND s.generation < m.death)
                 GROUP BY m.hash) c
             JOIN blocks b ON b.hash = c.hash AND b.refs = c.n",
        )?;
        Ok(stmt.query_row([CHECKPOINT], |r| r.get(0))?)
    }
}

impl WriteTx<'_> {
    /// Turns checkpoint `id` into snapshot `name`, `pending` upload; `None` if there is
    /// no such checkpoint. Its generation is kept: the uploader sends it like any other.
    pub fn promote_checkpoint(&self, id: u64, name: &[u8]) -> Result<Option<SnapshotRow>> {
        let sql = format!(
            "UPDATE snapshots SET state = 'pending', name = ?2 WHERE id = ?1 AND state = ?3
             RETURNING {SNAPSHOT_COLUMNS}"
        );
        self.conn
            .query_row(&sql, params![id, name, CHECKPOINT], |r| {
                Ok(SnapshotRow::try_from(r))
            })
            .optional()?
            .transpose()
    }
}
