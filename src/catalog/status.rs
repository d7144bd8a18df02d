//! The catalog's side of `snapfs status` and `snapfs upload`: what pending snapshots
//! still need sent, the upload progress recorded so far, and the local disk the blocks use.

use super::{ReadTx, Result, Setting, WriteTx};

/// What the pending snapshots still need sent: blocks the store lacks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Outstanding {
    pub blocks: u64,
    pub bytes: u64,
}

/// Block files on the local disk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LocalUsage {
    pub blocks: u64,
    pub bytes: u64,
    /// Of those, the ones a store also holds: the cache `--cache-size` bounds.
    pub cached_blocks: u64,
    pub cached_bytes: u64,
}

impl ReadTx<'_> {
    /// The blocks some pending snapshot sees that the store lacks, each counted once.
    /// Everything the latest completed snapshot before the oldest pending one sees is
    /// stored, so only blocks mapped after it are looked at (the `blockmap(birth)` index).
    pub fn outstanding(&self) -> Result<Outstanding> {
        let oldest: Option<u64> = self.conn.query_row(
            "SELECT min(generation) FROM snapshots WHERE state = 'pending'",
            [],
            |r| r.get(0),
        )?;
        let Some(oldest) = oldest else {
            return Ok(Outstanding::default());
        };
        let base = self.upload_base(oldest)?;
        let (blocks, bytes) = self.conn.query_row(
            "SELECT count(*), coalesce(sum(len), 0) FROM blocks WHERE stored = 0 AND hash IN (
                 SELECT m.hash FROM blockmap m JOIN snapshots s ON s.state = 'pending'
                 WHERE m.birth > ?1 AND m.birth <= s.generation
                   AND (m.death IS NULL OR m.death > s.generation))",
            [base],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        Ok(Outstanding { blocks, bytes })
    }

    /// Bytes recorded as sent over all snapshots: grows as uploads land, so two readings
    /// some time apart give the upload rate.
    pub fn sent_bytes_total(&self) -> Result<u64> {
        Ok(self.conn.query_row(
            "SELECT coalesce(sum(sent_bytes), 0) FROM snapshots",
            [],
            |r| r.get(0),
        )?)
    }

    pub fn local_usage(&self) -> Result<LocalUsage> {
        Ok(self.conn.query_row(
            "SELECT count(*), coalesce(sum(len), 0),
                    coalesce(sum(stored != 0), 0), coalesce(sum(CASE WHEN stored != 0 THEN len END), 0)
             FROM blocks WHERE local = 1",
            [],
            |r| {
                Ok(LocalUsage {
                    blocks: r.get(0)?,
                    bytes: r.get(1)?,
                    cached_blocks: r.get(2)?,
                    cached_bytes: r.get(3)?,
                })
            },
        )?)
    }
}

impl WriteTx<'_> {
    pub fn clear_setting(&self, setting: Setting) -> Result<()> {
        self.conn
            .execute("DELETE FROM settings WHERE key = ?1", [setting.key()])?;
        Ok(())
    }
}
