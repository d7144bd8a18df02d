//! The catalog's side of snapshot policies: the volume's one policy row, its keep-by-tag
//! rules, and the schedule's state (the last slot a scheduled snapshot was taken for).

use rusqlite::{OptionalExtension, params};

use super::{ReadTx, Result, WriteTx};
use crate::policy::{KeepRules, Policy};

impl ReadTx<'_> {
    /// The volume's policy and the start (seconds since the epoch) of the last slot a
    /// scheduled snapshot was taken for; `None` without a policy.
    pub fn policy(&self) -> Result<Option<(Policy, i64)>> {
        let row = self
            .conn
            .query_row(
                "SELECT every, keep_last, keep_hourly, keep_daily, keep_weekly, keep_monthly,
                        keep_yearly, keep_within, prune_manual, trash_days, last_slot, cron
                 FROM policy WHERE id = 1",
                [],
                |r| {
                    Ok((
                        Policy {
                            every_secs: r.get(0)?,
                            keep: KeepRules {
                                last: r.get(1)?,
                                hourly: r.get(2)?,
                                daily: r.get(3)?,
                                weekly: r.get(4)?,
                                monthly: r.get(5)?,
                                yearly: r.get(6)?,
                                within_secs: r.get(7)?,
                                tags: Vec::new(),
                                manual: r.get(8)?,
                            },
                            trash_days: r.get(9)?,
                            cron: r.get(11)?,
                        },
                        r.get::<_, i64>(10)?,
                    ))
                },
            )
            .optional()?;
        let Some((mut policy, last_slot)) = row else {
            return Ok(None);
        };
        let mut stmt = self
            .conn
            .prepare_cached("SELECT key, value FROM policy_keep_tags ORDER BY key, value")?;
        let tags = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        policy.keep.tags = tags.collect::<rusqlite::Result<_>>()?;
        Ok(Some((policy, last_slot)))
    }
}

impl WriteTx<'_> {
    /// Replaces the volume's policy; the schedule counts from slot `last_slot`.
    pub fn set_policy(&self, policy: &Policy, last_slot: i64) -> Result<()> {
        let k = &policy.keep;
        self.conn.execute(
            "INSERT OR REPLACE INTO policy (id, every, keep_last, keep_hourly, keep_daily,
                 keep_weekly, keep_monthly, keep_yearly, keep_within, prune_manual, trash_days,
                 last_slot, cron)
             VALUES (1, ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            params![
                policy.every_secs,
                k.last,
                k.hourly,
                k.daily,
                k.weekly,
                k.monthly,
                k.yearly,
                k.within_secs,
                k.manual,
                policy.trash_days,
                last_slot,
                policy.cron
            ],
        )?;
        self.conn.execute("DELETE FROM policy_keep_tags", [])?;
        let mut insert = self.conn.prepare_cached(
            "INSERT OR IGNORE INTO policy_keep_tags (key, value) VALUES (?1, ?2)",
        )?;
        for (key, value) in &k.tags {
            insert.execute([key, value])?;
        }
        Ok(())
    }

    /// Records that the schedule took (or skipped) slot `slot`.
    pub fn set_policy_slot(&self, slot: i64) -> Result<()> {
        self.conn
            .execute("UPDATE policy SET last_slot = ?1 WHERE id = 1", [slot])?;
        Ok(())
    }

    /// Removes the policy; whether there was one.
    pub fn clear_policy(&self) -> Result<bool> {
        self.conn.execute("DELETE FROM policy_keep_tags", [])?;
        Ok(self.conn.execute("DELETE FROM policy", [])? > 0)
    }
}
