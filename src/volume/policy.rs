//! The volume's snapshot policy at work: the schedule (a snapshot at the start of every
//! slot of `every`, or at each time of its cron schedule, named by its UTC slot time and
//! tagged `SCHEDULED_TAG`), retention
//! after each scheduled snapshot completes, and the `.snapshots` xattrs the CLI drives
//! them through. Time comes from the volume's `Clock`: tests run a month in a loop.
//!
//! Only the latest slot is taken: a daemon that was down (or a volume unmounted) for ten
//! slots takes one snapshot when it comes back, not ten. Retention deletes through
//! `delete_snapshot_row`, like rmdir.

use std::collections::BTreeSet;
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use super::retention::{self, Candidate, Verdict};
use super::{Error, NodeId, Result, SNAPDIR, Volume};
use crate::catalog::{ReadTx, SnapshotRow, SnapshotState};
use crate::clock::{NANOS, compact_stamp};
use crate::policy::{Policy, SCHEDULED_PREFIX, SCHEDULED_TAG};
use crate::sync::{Condvar, Mutex, lock, wait_timeout};

/// Xattr of `.snapshots`: the policy as JSON; set replaces it, remove clears it.
pub const XATTR_POLICY: &[u8] = b"user.snapfs.policy";
/// Xattr of `.snapshots`: setting it (to anything) applies retention now.
pub const XATTR_PRUNE: &[u8] = b"user.snapfs.prune";

/// The longest the scheduler sleeps without looking at the clock (it may have jumped).
const MAX_SLEEP: Duration = Duration::from_secs(60);

/// Told of each name in a control directory (`.snapshots`, its `.checkpoints` and
/// `.trash`) that went without a request on that directory: a snapshot retention deleted,
/// a checkpoint thinned, a snapshot purged from the bin when it expired or to make room.
/// The kernel caches those names an hour (what they name never changes); the mount drops
/// them.
pub type Pruned = Box<dyn Fn(NodeId, &[u8]) + Send + Sync>;

/// What the schedule waits for, and how to wake it. A leaf lock.
#[derive(Default)]
pub(super) struct Schedule {
    state: Mutex<ScheduleState>,
    wake: Condvar,
    pruned: OnceLock<Pruned>,
}

#[derive(Default)]
struct ScheduleState {
    /// Snapshots whose upload retention waits for.
    awaiting: BTreeSet<u64>,
    /// An awaited upload finished: retention runs at the next `run_policy`.
    retention_due: bool,
    /// The policy changed: the scheduler recomputes its next slot.
    woken: bool,
    stopping: bool,
}

impl Schedule {
    fn wake(&self, change: impl FnOnce(&mut ScheduleState)) {
        change(&mut lock(&self.state));
        self.wake.notify_all();
    }
}

/// What one `run_policy` did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyRun {
    /// The scheduled snapshot taken, if a slot was due.
    pub taken: Option<Vec<u8>>,
    /// Snapshots retention deleted.
    pub deleted: Vec<Vec<u8>>,
    /// When the next slot starts (nanoseconds since the epoch); `None` without a policy.
    pub next_due: Option<i64>,
}

/// Retention's view of `rows` at `now`, with their tags; what is in the recycle bin was
/// deleted already.
fn candidates(tx: &ReadTx<'_>, rows: Vec<SnapshotRow>, now: i64) -> Result<Vec<Candidate>> {
    rows.into_iter()
        .filter(|row| row.trash.is_none())
        .map(|row| {
            Ok(Candidate {
                tags: tx.snapshot_tags(row.id)?,
                locked: row
                    .lock
                    .as_ref()
                    .is_some_and(|held| super::lock_holds(held, now)),
                name: row.name,
                created: row.created,
                state: row.state,
            })
        })
        .collect()
}

/// The volume's policy and what its retention would do to `rows` at `now` (newest
/// first); `None` without a policy. The mount and the read-only tools both ask this.
pub fn retention_plan(
    tx: &ReadTx<'_>,
    rows: Vec<SnapshotRow>,
    now: i64,
) -> Result<Option<(Policy, Vec<Verdict>)>> {
    let Some((policy, _)) = tx.policy()? else {
        return Ok(None);
    };
    let plan = retention::plan(&candidates(tx, rows, now)?, &policy.keep);
    Ok(Some((policy, plan)))
}

impl Volume {
    pub fn policy(&self) -> Result<Option<Policy>> {
        Ok(lock(&self.catalog)
            .read(|tx| tx.policy())?
            .map(|(policy, _)| policy))
    }

    /// Replaces the policy. The schedule starts with the next slot: setting `--every 1h`
    /// at 10:20 takes the first snapshot at 11:00.
    pub fn set_policy(&self, policy: &Policy) -> Result<()> {
        let timetable = policy
            .validate()
            .map_err(|_| Error::Invalid("not a valid policy"))?;
        let slot = timetable.latest_slot(self.clock.now().div_euclid(NANOS));
        lock(&self.catalog).write_now(|tx| tx.set_policy(policy, slot))?;
        // The policy's --trash-days is the volume's recycle bin, as mount --trash-days is:
        // whichever was set last holds.
        if let Some(days) = policy.trash_days {
            self.remember_trash_retention(Duration::from_secs(u64::from(days) * 86_400))?;
        }
        self.schedule.wake(|state| state.woken = true);
        tracing::info!(?policy, "snapshot policy set");
        Ok(())
    }

    /// Removes the policy: no more scheduled snapshots, no retention. `NoXattr` if none.
    pub fn clear_policy(&self) -> Result<()> {
        if !lock(&self.catalog).write_now(|tx| tx.clear_policy())? {
            return Err(Error::NoXattr);
        }
        self.schedule.wake(|state| state.woken = true);
        tracing::info!("snapshot policy cleared");
        Ok(())
    }

    /// Takes the scheduled snapshot of the current slot unless it was taken, and runs
    /// retention if a snapshot it waits for has finished uploading. The scheduler thread
    /// calls it; tests call it after moving the clock.
    pub fn run_policy(&self) -> Result<PolicyRun> {
        // Taken first, whatever follows: a retention left due would have the scheduler
        // thread run the policy again at once, for ever (with no policy, or on an error).
        let retention_due = std::mem::take(&mut lock(&self.schedule.state).retention_due);
        let Some((policy, last_slot)) = lock(&self.catalog).read(|tx| tx.policy())? else {
            return Ok(PolicyRun::default());
        };
        let timetable = policy.timetable().map_err(|reason| {
            Error::Catalog(crate::catalog::Error::Corrupt(format!(
                "the stored policy: {reason}"
            )))
        })?;
        let now = self.clock.now().div_euclid(NANOS);
        let slot = timetable.latest_slot(now);
        let mut run = PolicyRun {
            next_due: timetable.next_slot(now).map(|at| at.saturating_mul(NANOS)),
            ..PolicyRun::default()
        };
        if slot > last_slot {
            run.taken = self.take_scheduled(slot);
            // Taken, refused by a hook or failed: either way this slot is done.
            lock(&self.catalog).write_now(|tx| tx.set_policy_slot(slot))?;
        }
        if retention_due {
            run.deleted = self.apply_retention()?;
        }
        Ok(run)
    }

    /// Takes the snapshot of `slot`; its name, or `None` (logged) if it could not.
    fn take_scheduled(&self, slot: i64) -> Option<Vec<u8>> {
        let name = format!("{SCHEDULED_PREFIX}{}", compact_stamp(slot * NANOS)).into_bytes();
        let tag = [(
            SCHEDULED_TAG.0.as_bytes().to_vec(),
            SCHEDULED_TAG.1.as_bytes().to_vec(),
        )];
        match self.create_tagged_snapshot(&name, &tag) {
            Ok(info) => {
                lock(&self.schedule.state).awaiting.insert(info.id);
                Some(name)
            }
            Err(e) => {
                tracing::warn!(name = %String::from_utf8_lossy(&name), error = %e, "scheduled snapshot not taken");
                None
            }
        }
    }

    /// What retention would do now, newest first; `None` without a policy.
    pub fn retention_plan(&self) -> Result<Option<Vec<Verdict>>> {
        let (rows, now) = (self.snapshots.list(), self.clock.now());
        let plan = lock(&self.catalog).read(|tx| retention_plan(tx, rows, now))?;
        Ok(plan.map(|(_, verdicts)| verdicts))
    }

    /// Applies retention now (`snapshot prune`); the snapshots deleted. `NoXattr` without
    /// a policy.
    pub fn prune(&self) -> Result<Vec<Vec<u8>>> {
        self.policy()?.ok_or(Error::NoXattr)?;
        self.apply_retention()
    }

    fn apply_retention(&self) -> Result<Vec<Vec<u8>>> {
        let Some(plan) = self.retention_plan()? else {
            return Ok(Vec::new());
        };
        let mut deleted = Vec::new();
        for verdict in plan {
            if !verdict.keep() && self.carry_out(&verdict)? {
                tracing::info!(name = %String::from_utf8_lossy(&verdict.name), "retention deleted a snapshot");
                self.forget_name(SNAPDIR, &verdict.name);
                deleted.push(verdict.name);
            }
        }
        Ok(deleted)
    }

    /// Deletes the snapshot `verdict` judged, known by its name and creation time: the
    /// plan was made from rows read before. Whether it is gone: one deleted meanwhile
    /// (rmdir, another prune) is what retention wanted, and a newer snapshot that took its
    /// name is not the one judged; one locked meanwhile stays.
    pub(super) fn carry_out(&self, verdict: &Verdict) -> Result<bool> {
        let judged = self
            .snapshots
            .by_name(&verdict.name)
            .ok()
            .filter(|row| row.created == verdict.created);
        let Some(row) = judged else {
            return Ok(true);
        };
        match self.delete_snapshot_row(&row) {
            Ok(()) | Err(Error::NotFound) => Ok(true),
            Err(Error::NotPermitted(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Tells the mount that `name` left control directory `parent` (see `Pruned`).
    pub(super) fn forget_name(&self, parent: NodeId, name: &[u8]) {
        if let Some(pruned) = self.schedule.pruned.get() {
            pruned(parent, name);
        }
    }

    /// Sets what is told of names removed behind the kernel's back; once, by the mount.
    pub fn on_pruned(&self, pruned: Pruned) {
        if self.schedule.pruned.set(pruned).is_err() {
            tracing::warn!("on_pruned called twice: the first one stays");
        }
    }

    /// The uploader changed snapshot states: once an awaited upload has finished,
    /// retention is due.
    pub(super) fn note_uploads(&self) {
        // Most events are upload progress, with nothing awaited.
        if lock(&self.schedule.state).awaiting.is_empty() {
            return;
        }
        let rows = self.snapshots.list();
        let pending = |id: &u64| {
            rows.iter()
                .any(|row| row.id == *id && row.state == SnapshotState::Pending)
        };
        let mut state = lock(&self.schedule.state);
        let before = state.awaiting.len();
        state.awaiting.retain(pending);
        if state.awaiting.len() < before {
            state.retention_due = true;
            self.schedule.wake.notify_all();
        }
    }

    /// Starts the thread that runs the policy: it sleeps until the next slot, a policy
    /// change or a finished upload. Retention runs once at the start too (snapshots may
    /// have completed with the daemon down, by `snapfs upload`), and every snapshot
    /// pending now is awaited.
    pub fn spawn_scheduler(self: &Arc<Self>) -> std::io::Result<Scheduler> {
        let pending = self
            .snapshots
            .list()
            .into_iter()
            .filter(|row| row.state == SnapshotState::Pending)
            .map(|row| row.id);
        self.schedule.wake(|state| {
            state.awaiting.extend(pending);
            state.retention_due = true;
        });
        let volume = Arc::downgrade(self);
        let schedule = self.schedule.clone();
        let thread = std::thread::Builder::new()
            .name("snapfs-scheduler".into())
            .spawn(move || schedule_loop(&volume, &schedule))?;
        Ok(Scheduler {
            schedule: self.schedule.clone(),
            thread,
        })
    }

    /// `.snapshots` xattrs: the hook error, the policy.
    pub(super) fn snapdir_getxattr(&self, name: &[u8]) -> Result<Vec<u8>> {
        match name {
            super::XATTR_HOOK_ERROR => self.hook_error(),
            XATTR_POLICY => Ok(self.policy()?.ok_or(Error::NoXattr)?.to_json()),
            _ => Err(Error::NoXattr),
        }
    }

    /// Sets (`Some`) or removes (`None`) an xattr of `.snapshots`: the policy, or a prune.
    pub(super) fn snapdir_setxattr(&self, name: &[u8], value: Option<&[u8]>) -> Result<()> {
        match (name, value) {
            (XATTR_POLICY, Some(json)) => {
                let policy = Policy::from_json(json).map_err(|reason| {
                    tracing::warn!(reason = %reason, "refused a policy");
                    Error::Invalid("not a valid policy")
                })?;
                self.set_policy(&policy)
            }
            (XATTR_POLICY, None) => self.clear_policy(),
            (XATTR_PRUNE, Some(_)) => self.prune().map(drop),
            _ => Self::writable(super::SNAPDIR),
        }
    }
}

fn schedule_loop(volume: &Weak<Volume>, schedule: &Schedule) {
    loop {
        let Some(strong) = volume.upgrade() else {
            return;
        };
        let next_due = match strong.run_policy() {
            Ok(run) => run.next_due,
            Err(e) => {
                tracing::warn!(error = %e, "the snapshot policy could not run");
                None
            }
        };
        let clock = strong.clock.clone();
        drop(strong);
        let mut state = lock(&schedule.state);
        loop {
            if state.stopping {
                return;
            }
            if std::mem::take(&mut state.woken) || state.retention_due {
                break;
            }
            let wait = next_due.map_or(MAX_SLEEP, |due| {
                Duration::from_nanos(u64::try_from(due - clock.now()).unwrap_or(0))
            });
            if wait.is_zero() {
                break;
            }
            state = wait_timeout(&schedule.wake, state, wait.min(MAX_SLEEP));
        }
    }
}

/// The running scheduler thread; `stop` ends it (at unmount).
pub struct Scheduler {
    schedule: Arc<Schedule>,
    thread: std::thread::JoinHandle<()>,
}

impl Scheduler {
    pub fn stop(self) {
        self.schedule.wake(|state| state.stopping = true);
        if self.thread.join().is_err() {
            tracing::error!("the scheduler thread panicked");
        }
    }
}

#[cfg(test)]
mod tests;
