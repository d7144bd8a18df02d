//! Continuous checkpoints (NILFS2's idea, on the generation catalog): while the live
//! volume changes, the daemon pins its generation every few seconds as a checkpoint: one
//! catalog row, as a snapshot, but local only, never uploaded, and thinned as it ages.
//! They are browsable read-only under `.snapshots/.checkpoints/<UTC time>` (a hidden
//! directory: `.snapshots` does not list it) and one can be promoted to a snapshot.
//!
//! This module owns the checkpoint table (the checkpoints by id, mirrored from the
//! catalog like `SnapshotTable`), taking, thinning (a pure function of the time, `thin`),
//! dropping the oldest ones when the data dir is full, promotion, and the hidden
//! directory. Locks: the snapshot table before the checkpoint table, the checkpoint table
//! before the catalog.

use std::sync::Arc;
use std::time::Duration;

use super::snapshots::{SNAPDIR, SNAPDIR_INO, XATTR_CREATED, XATTR_ID, XATTR_STATE};
use super::{Attr, DirEntry, Error, NodeId, Result, SnapshotInfo, View, Volume, rfc3339};
use crate::catalog::{CheckpointRow, ROOT_INO, ReadTx};
use crate::sync::lock;

/// Name of the hidden checkpoint directory in `.snapshots`.
pub const CHECKPOINTS_NAME: &[u8] = b".checkpoints";
/// Its inode number in the live view (below the catalog's first, beside `.snapshots`).
pub const CHECKPOINT_DIR_INO: u64 = 4;
pub const CHECKPOINT_DIR: NodeId = NodeId {
    view: View::Live,
    ino: CHECKPOINT_DIR_INO,
};

/// `user.snapfs.state` of a checkpoint's root.
const STATE: &[u8] = b"checkpoint";

/// When checkpoints are taken and how long they are kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CheckpointPolicy {
    /// A checkpoint is taken this often while the live volume changes.
    pub every: Duration,
    /// None is kept longer than this.
    pub window: Duration,
}

impl Default for CheckpointPolicy {
    /// Every 10 s of change for the last hour: a checkpoint costs one flush and one
    /// catalog row (docs/benchmarks.md measures what it costs a writer).
    fn default() -> Self {
        CheckpointPolicy {
            every: Duration::from_secs(10),
            window: Duration::from_secs(3600),
        }
    }
}

impl CheckpointPolicy {
    /// Checkpoints younger than this, the newest sixth of the window (10 min of an hour),
    /// are all kept.
    fn dense(&self) -> i64 {
        nanos(self.window / 6)
    }

    /// Older ones keep the first of each step of this length: a sixtieth of the window
    /// (1 min of an hour), never less than the interval.
    fn step(&self) -> i64 {
        nanos(self.every.max(self.window / 60)).max(1)
    }
}

fn nanos(duration: Duration) -> i64 {
    i64::try_from(duration.as_nanos()).unwrap_or(i64::MAX)
}

/// The checkpoints to drop at time `now` (nanoseconds since the epoch), given those taken
/// as (id, creation time), oldest first: the ones older than the window, and in the older
/// part of it all but the first of each step. The steps are fixed in time, so thinning
/// again later keeps what it kept.
pub fn thin(taken: &[(u64, i64)], now: i64, policy: &CheckpointPolicy) -> Vec<u64> {
    let (window, dense, step) = (nanos(policy.window), policy.dense(), policy.step());
    let mut kept_step = None;
    let mut drop = Vec::new();
    for &(id, created) in taken {
        let age = now.saturating_sub(created);
        if age > window {
            drop.push(id);
        } else if age > dense {
            let this_step = created.div_euclid(step);
            if kept_step == Some(this_step) {
                drop.push(id);
            } else {
                kept_step = Some(this_step);
            }
        }
    }
    drop
}

/// Parses a UTC time as `rfc3339` writes it (`2026-12-01T05:44:29Z`, with or without
/// `.123` milliseconds) into nanoseconds since the epoch.
pub fn parse_utc(text: &str) -> Option<i64> {
    let b = text.strip_suffix('Z')?.as_bytes();
    let digits = |range: std::ops::Range<usize>| -> Option<i64> {
        let part = b.get(range)?;
        if !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(part).ok()?.parse().ok()
    };
    let separators = [(4, b'-'), (7, b'-'), (10, b'T'), (13, b':'), (16, b':')];
    if separators.iter().any(|&(at, c)| b.get(at) != Some(&c)) {
        return None;
    }
    let (year, month, day) = (digits(0..4)?, digits(5..7)?, digits(8..10)?);
    let (hour, minute, second) = (digits(11..13)?, digits(14..16)?, digits(17..19)?);
    let millis = match b.len() {
        19 => 0,
        23 if b[19] == b'.' => digits(20..23)?,
        _ => return None,
    };
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    crate::clock::nanos_of_utc(year, month, day, hour, minute, second)?
        .checked_add(millis * 1_000_000)
}

/// A checkpoint as users see it: its row and what it costs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointInfo {
    pub row: CheckpointRow,
    /// Bytes only this checkpoint holds: what dropping it alone would free.
    pub exclusive_bytes: u64,
}

/// The checkpoints and what they cost together.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckpointSpace {
    pub checkpoints: Vec<CheckpointInfo>,
    /// Bytes only checkpoints hold: what dropping them all would free.
    pub total_bytes: u64,
}

/// The checkpoints of the catalog `tx` reads, with their space.
pub fn describe_checkpoints(tx: &ReadTx<'_>) -> Result<CheckpointSpace> {
    let checkpoints = tx
        .checkpoints()?
        .into_iter()
        .map(|row| {
            Ok(CheckpointInfo {
                exclusive_bytes: tx.exclusive_bytes(row.id)?,
                row,
            })
        })
        .collect::<Result<_>>()?;
    Ok(CheckpointSpace {
        checkpoints,
        total_bytes: tx.checkpoint_only_bytes()?,
    })
}

impl Volume {
    pub(super) fn load_checkpoints(&self) -> Result<()> {
        self.checkpoints
            .reload(|| Ok(lock(&self.catalog).read(|tx| tx.checkpoints())?))
    }

    /// Takes a checkpoint at time `now` if the live volume changed since the last
    /// checkpoint or snapshot; `None` if it did not. Like a snapshot it falls between two
    /// changes: writers are held while the buffers are flushed and the generation pinned
    /// (`hold_writers_flushed`).
    pub fn take_checkpoint(&self, now: i64) -> Result<Option<CheckpointRow>> {
        let _writers_held = self.hold_writers_flushed()?;
        // Nothing changes meanwhile: writers are held.
        if !lock(&self.catalog).read(|tx| tx.changed_since_pin())? {
            return Ok(None);
        }
        let name = rfc3339(now);
        let taken = self.checkpoints.insert(name.as_bytes(), || {
            Ok(lock(&self.catalog).create_checkpoint(&name, now)?)
        });
        match taken {
            Ok(row) => Ok(Some(row)),
            // One per millisecond (the name's precision): a clock set back may repeat one.
            Err(Error::Exists) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Drops the checkpoints `policy` no longer keeps at time `now`; returns how many.
    pub fn thin_checkpoints(&self, now: i64, policy: &CheckpointPolicy) -> Result<usize> {
        let taken: Vec<(u64, i64)> = self
            .checkpoints
            .list()
            .iter()
            .map(|row| (row.id, row.created))
            .collect();
        let mut dropped = 0;
        for id in thin(&taken, now, policy) {
            match self.delete_checkpoint(id) {
                Ok(()) => dropped += 1,
                // Promoted, or dropped for room, since the list was read: the rest are
                // still thinned.
                Err(Error::NotFound) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(dropped)
    }

    /// The checkpoints, oldest first.
    pub fn list_checkpoints(&self) -> Vec<CheckpointRow> {
        self.checkpoints.list()
    }

    /// The checkpoints with what each costs, and their total.
    pub fn checkpoint_space(&self) -> Result<CheckpointSpace> {
        lock(&self.catalog).read(describe_checkpoints)
    }

    /// Deletes checkpoint `id`, freeing the rows and blocks nothing else needs (a block
    /// a snapshot needs has a reference from that snapshot's rows, so it stays).
    pub(super) fn delete_checkpoint(&self, id: u64) -> Result<()> {
        let name = self.checkpoints.get(id)?.name;
        self.checkpoints.remove(
            id,
            |_| Ok(()),
            || self.freeing(|| Ok(lock(&self.catalog).delete_snapshot(id)?)),
        )?;
        // Thinning and a full disk drop checkpoints with no request on their directory.
        self.forget_name(CHECKPOINT_DIR, name.as_bytes());
        self.freeing(|| self.collect_garbage())?;
        // Blocks stored for a snapshot deleted since may be freed only now, in the store too.
        self.upload_wake.notify_one();
        Ok(())
    }

    /// The data dir is full: drops the oldest checkpoint so that a writer gets room
    /// instead of ENOSPC. False when there is none left to drop.
    pub(super) fn drop_oldest_checkpoint(&self) -> Result<bool> {
        let Some(oldest) = self.checkpoints.list().into_iter().next() else {
            return Ok(false);
        };
        match self.delete_checkpoint(oldest.id) {
            // Another writer dropped it first: it made the room.
            Err(Error::NotFound) => return Ok(true),
            result => result?,
        }
        tracing::warn!(checkpoint = %oldest.name, "data dir full: dropped the oldest checkpoint to make room");
        Ok(true)
    }

    /// Turns checkpoint `name` into snapshot `new_name` (`pending`: the uploader sends
    /// it). Its point in time and creation time are the checkpoint's.
    pub fn promote_checkpoint(&self, name: &[u8], new_name: &[u8]) -> Result<SnapshotInfo> {
        super::snapshots::check_new_snapshot_name(new_name)?;
        let checkpoint = self.checkpoints.by_name(name)?;
        let row = self.snapshots.insert(new_name, || {
            self.checkpoints.remove(
                checkpoint.id,
                |_| Ok(()),
                || {
                    lock(&self.catalog)
                        .write_now(|tx| tx.promote_checkpoint(checkpoint.id, new_name))?
                        .ok_or(Error::NotFound)
                },
            )
        })?;
        self.upload_wake.notify_one();
        tracing::info!(checkpoint = %checkpoint.name, name = %String::from_utf8_lossy(new_name), id = row.id, "checkpoint promoted to a snapshot");
        self.snapshot_info(row.id)
    }

    /// The generation and creation time pinned by view `id`: a snapshot or a checkpoint.
    pub(super) fn pinned(&self, id: u64) -> Result<(u64, i64)> {
        match self.snapshots.get(id) {
            Ok(row) => Ok((row.generation, row.created)),
            Err(_) => self
                .checkpoints
                .get(id)
                .map(|row| (row.generation, row.created)),
        }
    }

    /// The directory holding the root of view `id`: `.snapshots`, its recycle bin for a
    /// deleted snapshot, or its checkpoint directory for a checkpoint.
    pub(super) fn pinned_parent(&self, id: u64) -> NodeId {
        if self.is_checkpoint(id) {
            CHECKPOINT_DIR
        } else if self.snapshots.get(id).is_ok_and(|row| row.trash.is_some()) {
            super::trash::TRASHDIR
        } else {
            SNAPDIR
        }
    }

    /// Whether view `id` is a checkpoint (read-only through and through: no tags).
    pub(super) fn is_checkpoint(&self, id: u64) -> bool {
        self.checkpoints.get(id).is_ok()
    }

    pub(super) fn checkpoint_dir_attr(&self) -> Result<Attr> {
        let root = self.row(NodeId::live(ROOT_INO))?;
        let rows = self.checkpoints.list();
        let latest = rows.iter().map(|row| row.created).max();
        Ok(Self::control_dir_attr(
            &root,
            CHECKPOINT_DIR_INO,
            SNAPDIR_INO,
            rows.len(),
            latest,
        ))
    }

    /// A name in the checkpoint directory.
    pub(super) fn checkpoint_lookup(&self, name: &[u8]) -> Result<Attr> {
        match name {
            b"." => self.getattr(CHECKPOINT_DIR),
            b".." => self.getattr(SNAPDIR),
            _ => self.getattr(NodeId::snapshot_root(self.checkpoints.by_name(name)?.id)),
        }
    }

    /// `.`, `..` and one directory per checkpoint, oldest first.
    pub(super) fn checkpoint_dir_entries(&self) -> Result<Vec<DirEntry>> {
        let mut entries = vec![
            DirEntry {
                name: b".".to_vec(),
                attr: self.getattr(CHECKPOINT_DIR)?,
            },
            DirEntry {
                name: b"..".to_vec(),
                attr: self.getattr(SNAPDIR)?,
            },
        ];
        let checkpoints = self.checkpoints.list().into_iter();
        self.push_snapshot_roots(
            &mut entries,
            checkpoints.map(|row| (row.id, row.name.into_bytes())),
        )?;
        Ok(entries)
    }

    /// Extended attributes of a checkpoint's root: its id, state and creation time.
    pub(super) fn checkpoint_xattrs(&self, id: u64) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let row = self.checkpoints.get(id)?;
        Ok(vec![
            (XATTR_ID.to_vec(), row.id.to_string().into_bytes()),
            (XATTR_STATE.to_vec(), STATE.to_vec()),
            (XATTR_CREATED.to_vec(), rfc3339(row.created).into_bytes()),
        ])
    }

    /// Starts the thread that takes a checkpoint every `policy.every` while the volume
    /// changes and thins them. It ends when the volume is dropped.
    pub fn spawn_checkpointer(self: &Arc<Self>, policy: CheckpointPolicy) -> std::io::Result<()> {
        let volume = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("snapfs-checkpoints".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(policy.every);
                    let Some(volume) = volume.upgrade() else {
                        return;
                    };
                    let now = super::now();
                    let started = std::time::Instant::now();
                    match volume.take_checkpoint(now) {
                        // With the time writers waited (the gate, then the flush).
                        Ok(Some(row)) => tracing::debug!(
                            name = %row.name,
                            ms = started.elapsed().as_millis() as u64,
                            "checkpoint taken"
                        ),
                        Ok(None) => {}
                        Err(e) => tracing::warn!(error = %e, "cannot take a checkpoint"),
                    }
                    if let Err(e) = volume.thin_checkpoints(now, &policy) {
                        tracing::warn!(error = %e, "cannot thin the checkpoints");
                    }
                }
            })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{CheckpointPolicy, parse_utc, thin};
    use crate::volume::rfc3339;
    use std::time::Duration;

    const S: i64 = 1_000_000_000;

    fn policy(every: u64, window: u64) -> CheckpointPolicy {
        CheckpointPolicy {
            every: Duration::from_secs(every),
            window: Duration::from_secs(window),
        }
    }

    /// An hour and a half of checkpoints every 10 s, thinned at every tick as the daemon
    /// does: the last 10 min all stay, one a minute for the rest of the hour, none older.
    #[test]
    fn thinning_keeps_all_recent_one_a_minute_then_none() {
        let policy = policy(10, 3600);
        let start = 1_800_000_000 * S - (1_800_000_000 * S) % (60 * S);
        let mut kept: Vec<(u64, i64)> = Vec::new();
        let mut now = start;
        for id in 1..=540u64 {
            now = start + id as i64 * 10 * S;
            kept.push((id, now));
            let dropped = thin(&kept, now, &policy);
            kept.retain(|(id, _)| !dropped.contains(id));
        }
        let ages: Vec<i64> = kept.iter().map(|&(_, t)| (now - t) / S).collect();
        assert!(
            ages.iter().all(|&age| age <= 3600),
            "none older than the window"
        );
        let recent = ages.iter().filter(|&&age| age <= 600).count();
        assert_eq!(
            recent, 61,
            "every checkpoint of the last 10 min (0..=600 s)"
        );
        let older: Vec<i64> = kept
            .iter()
            .filter(|&&(_, t)| now - t > 600 * S)
            .map(|&(_, t)| t.div_euclid(60 * S))
            .collect();
        let mut minutes = older.clone();
        minutes.dedup();
        assert_eq!(minutes, older, "one per minute in the older part");
        assert_eq!(older.len(), 50, "each minute from 10 to 60 min ago");
        // Thinning again at the same time drops nothing: what it keeps stays kept.
        assert!(thin(&kept, now, &policy).is_empty());
    }

    #[test]
    fn utc_times_parse_back_from_their_names() {
        for nanos in [0, 1_795_000_000_123_000_000, 951_782_400_000_000_000] {
            assert_eq!(parse_utc(&rfc3339(nanos)), Some(nanos));
        }
        assert_eq!(parse_utc("2026-11-18T11:06:40Z"), Some(1_795_000_000 * S));
        for bad in [
            "",
            "2026-11-18T11:06:40",
            "2026-13-18T11:06:40Z",
            "2026-11-18 11:06:40Z",
        ] {
            assert_eq!(parse_utc(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn thinning_with_a_short_window_drops_what_is_older() {
        let policy = policy(1, 6);
        let now = 100 * S;
        let taken: Vec<(u64, i64)> = (0..10).map(|i| (i, now - (9 - i as i64) * S)).collect();
        // Ages 9..0 s: 9, 8 and 7 s are past the 6 s window; 6 s down to 2 s lie in the
        // sparse part (1 s steps: all distinct, all kept); 1 and 0 s in the dense part.
        assert_eq!(thin(&taken, now, &policy), vec![0, 1, 2]);
        assert!(thin(&[], now, &policy).is_empty());
    }
}
