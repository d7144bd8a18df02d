//! The schedule and retention driven by a manual clock: a simulated month of hourly
//! snapshots, checked after every step against an implementation of restic's rules
//! written here from scratch (calendar buckets as date strings, by brute force).

use std::collections::BTreeSet;
use std::sync::Arc;

use super::*;
use crate::catalog::{LockMode, SnapshotLock};
use crate::clock::{ManualClock, NANOS};
use crate::policy::KeepRules;
use crate::upload::{UploadEvent, UploadEvents};
use crate::volume::retention::Reason;
use crate::volume::{Options, rfc3339};

const HOUR: i64 = 3600 * NANOS;
const DAY: i64 = 24 * HOUR;
/// 2026-11-01T00:00:00Z, a Sunday.
const START: i64 = 1_793_491_200 * NANOS;
/// 2026-11-02T00:00:00Z, a Monday: the model's anchor for weeks.
const MONDAY: i64 = START + DAY;

struct Clocked {
    _dir: tempfile::TempDir,
    clock: Arc<ManualClock>,
    volume: Volume,
}

fn open(dir: &std::path::Path, clock: &Arc<ManualClock>) -> Volume {
    let options = Options {
        block_size: 4096,
        clock: clock.clone(),
        ..Options::default()
    };
    Volume::open(dir, &options).expect("open volume")
}

impl Clocked {
    fn new(at: i64) -> Clocked {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = Arc::new(ManualClock::new(at));
        let volume = open(dir.path(), &clock);
        Clocked {
            _dir: dir,
            clock,
            volume,
        }
    }

    /// Marks snapshot `name` uploaded, as the uploader would, and tells the core.
    fn complete(&self, name: &[u8]) {
        let row = self
            .volume
            .snapshots
            .by_name(name)
            .expect("snapshot exists");
        lock(&self.volume.catalog)
            .write(|tx| {
                let base = tx.upload_base(row.generation)?;
                tx.complete_snapshot(row.id, row.generation, base, &[], &[], &[])
            })
            .expect("complete");
        self.volume
            .upload_event(UploadEvent::SnapshotsChanged)
            .expect("event");
    }

    fn names(&self) -> BTreeSet<String> {
        self.volume
            .list_snapshots()
            .iter()
            .map(|row| String::from_utf8_lossy(&row.name).into_owned())
            .collect()
    }
}

/// A snapshot as the model keeps it.
#[derive(Clone, Debug)]
struct Snap {
    name: String,
    created: i64,
    scheduled: bool,
    tagged: bool,
    pending: bool,
}

/// restic's rules, brute force: which of `snaps` survive. Periods are prefixes of the
/// RFC 3339 text; weeks are counted from a known Monday.
fn model(snaps: &[Snap], rules: &KeepRules) -> BTreeSet<String> {
    let mut keep = BTreeSet::new();
    let mut pool: Vec<&Snap> = Vec::new();
    for s in snaps {
        if s.pending || !s.scheduled {
            keep.insert(s.name.clone());
        } else {
            pool.push(s);
        }
    }
    if let Some(newest) = snaps
        .iter()
        .filter(|s| !s.pending)
        .max_by_key(|s| s.created)
    {
        keep.insert(newest.name.clone());
    }
    pool.sort_by_key(|s| std::cmp::Reverse(s.created));
    let Some(latest) = pool.first().map(|s| s.created) else {
        return keep;
    };
    for s in pool.iter().take(rules.last as usize) {
        keep.insert(s.name.clone());
    }
    for s in &pool {
        if rules
            .within_secs
            .is_some_and(|w| s.created > latest - w as i64 * NANOS)
            || (s.tagged && !rules.tags.is_empty())
        {
            keep.insert(s.name.clone());
        }
    }
    // The date of the Monday that starts the week.
    let week = |t: i64| rfc3339(t - (t - MONDAY).rem_euclid(7 * DAY))[..10].to_owned();
    type Key = Box<dyn Fn(i64) -> String>;
    let rules_by_key: [(u32, Key); 5] = [
        (rules.hourly, Box::new(|t| rfc3339(t)[..13].to_owned())),
        (rules.daily, Box::new(|t| rfc3339(t)[..10].to_owned())),
        (rules.weekly, Box::new(week)),
        (rules.monthly, Box::new(|t| rfc3339(t)[..7].to_owned())),
        (rules.yearly, Box::new(|t| rfc3339(t)[..4].to_owned())),
    ];
    for (count, key) in rules_by_key {
        if count == 0 {
            continue;
        }
        let mut periods: Vec<String> = Vec::new();
        for s in &pool {
            let k = key(s.created);
            if !periods.contains(&k) {
                periods.push(k);
            }
        }
        for period in periods.iter().take(count as usize) {
            let newest = pool.iter().find(|s| key(s.created) == *period);
            keep.extend(newest.map(|s| s.name.clone()));
        }
        if periods.len() < count as usize {
            keep.extend(pool.last().map(|s| s.name.clone()));
        }
    }
    keep
}

fn month_policy() -> Policy {
    Policy {
        every_secs: 3600,
        keep: KeepRules {
            last: 5,
            hourly: 24,
            daily: 7,
            weekly: 4,
            monthly: 2,
            within_secs: Some(6 * 3600),
            tags: vec![("keep".into(), "yes".into())],
            ..KeepRules::default()
        },
        trash_days: None,
        cron: None,
    }
}

#[test]
fn a_simulated_month_of_hourly_snapshots_leaves_what_the_rules_say() {
    // Half past midnight: the first slot is 01:00.
    let t = Clocked::new(START + HOUR / 2);
    let policy = month_policy();
    t.volume.set_policy(&policy).expect("set policy");
    t.volume
        .create_snapshot(b"by-hand")
        .expect("manual snapshot");
    t.complete(b"by-hand");
    let mut snaps = vec![Snap {
        name: "by-hand".into(),
        created: START + HOUR / 2,
        scheduled: false,
        tagged: false,
        pending: false,
    }];
    assert_eq!(t.volume.run_policy().expect("run").taken, None);

    // One snapshot stays pending for a day (its upload stalls), one is tagged to keep.
    let stalled_at = 100;
    let stalled = "auto-20261105T040000Z";
    let tagged_at = 50;
    let mut deleted_total = 0;
    for hour in 1..=30 * 24 {
        // A few seconds into the slot: the daemon wakes a little late.
        t.clock.set(START + hour * HOUR + 7 * NANOS);
        let run = t.volume.run_policy().expect("run policy");
        let name = run.taken.clone().expect("a snapshot every hour");
        let name = String::from_utf8(name).expect("utf-8 name");
        assert_eq!(name, format!("auto-{}", compact_stamp(START + hour * HOUR)));
        assert_eq!(run.next_due, Some(START + (hour + 1) * HOUR));
        assert!(
            run.deleted.is_empty(),
            "nothing completed since the last run"
        );
        if hour == tagged_at {
            let id = t.volume.snapshots.by_name(name.as_bytes()).expect("row").id;
            t.volume
                .set_snapshot_tag(id, b"user.tag.keep", Some(b"yes"))
                .expect("tag");
        }
        snaps.push(Snap {
            name: name.clone(),
            created: START + hour * HOUR + 7 * NANOS,
            scheduled: true,
            tagged: hour == tagged_at,
            pending: true,
        });
        let mut completed = vec![];
        if hour != stalled_at {
            completed.push(name.clone());
        }
        if hour == stalled_at + 24 {
            completed.push(stalled.to_owned());
        }
        for done in &completed {
            t.complete(done.as_bytes());
            snaps
                .iter_mut()
                .filter(|s| s.name == *done)
                .for_each(|s| s.pending = false);
        }
        let run = t.volume.run_policy().expect("retention");
        assert_eq!(run.taken, None, "one snapshot per slot");
        if hour == stalled_at {
            assert!(run.deleted.is_empty(), "nothing completed: no retention");
            continue;
        }
        let expected = model(&snaps, &policy.keep);
        snaps.retain(|s| expected.contains(&s.name));
        deleted_total += run.deleted.len();
        assert_eq!(t.names(), expected, "after hour {hour}");
        if (stalled_at..stalled_at + 24).contains(&hour) {
            assert!(expected.contains(stalled), "pending is never deleted");
        }
    }
    let left = t.names();
    assert!(
        left.contains("by-hand"),
        "manual snapshots are never deleted"
    );
    assert!(left.contains("auto-20261103T020000Z"), "tagged keep=yes");
    // 24 hourly + 6 more daily + weekly and monthly ones, not 720.
    assert!(
        (30..45).contains(&left.len()),
        "{} left: {left:?}",
        left.len()
    );
    assert_eq!(deleted_total + left.len(), 721);
    // The daily rule keeps the last snapshot of each recent day.
    assert!(left.contains("auto-20261128T230000Z"), "{left:?}");
    assert!(!left.contains("auto-20261128T220000Z"), "{left:?}");
}

#[test]
fn missed_slots_are_caught_up_once_at_the_next_mount() {
    let mut t = Clocked::new(START + HOUR / 2);
    t.volume.set_policy(&month_policy()).expect("set policy");
    t.clock.set(START + HOUR);
    assert!(t.volume.run_policy().expect("run").taken.is_some());
    // Unmounted for ten hours and a half.
    t.volume.shutdown().expect("shutdown");
    drop(t.volume);
    t.clock.set(START + 11 * HOUR + HOUR / 2);
    t.volume = open(t._dir.path(), &t.clock);
    let run = t.volume.run_policy().expect("catch up");
    assert_eq!(run.taken, Some(b"auto-20261101T110000Z".to_vec()));
    assert_eq!(run.next_due, Some(START + 12 * HOUR));
    assert_eq!(t.volume.run_policy().expect("again").taken, None);
    assert_eq!(t.names().len(), 2, "one for the missed slots, not ten");
    // The catch-up snapshot's time is the clock's, not the slot's.
    let row = t
        .volume
        .snapshots
        .by_name(b"auto-20261101T110000Z")
        .expect("row");
    assert_eq!(row.created, START + 11 * HOUR + HOUR / 2);
}

#[test]
fn a_due_retention_is_done_by_one_run_with_or_without_a_policy() {
    // The scheduler thread runs the policy again while retention is due: left due, it
    // would spin on a core (as it did on every mount without a policy).
    let c = Clocked::new(START);
    for policy in [None, Some(month_policy())] {
        if let Some(policy) = &policy {
            c.volume.set_policy(policy).expect("set policy");
        }
        c.volume.schedule.wake(|state| state.retention_due = true);
        c.volume.run_policy().expect("run");
        assert!(
            !lock(&c.volume.schedule.state).retention_due,
            "retention still due after a run with policy {policy:?}"
        );
    }
}

#[test]
fn policies_are_checked_stored_and_cleared() {
    let t = Clocked::new(START);
    assert_eq!(t.volume.policy().expect("read"), None);
    let bad = Policy {
        every_secs: 0,
        ..month_policy()
    };
    assert_eq!(
        t.volume
            .snapdir_setxattr(XATTR_POLICY, Some(&bad.to_json()))
            .map_err(|e| e.errno()),
        Err(libc::EINVAL)
    );
    t.volume
        .snapdir_setxattr(XATTR_POLICY, Some(&month_policy().to_json()))
        .expect("set through the xattr");
    assert_eq!(
        Policy::from_json(&t.volume.snapdir_getxattr(XATTR_POLICY).expect("get")),
        Ok(month_policy())
    );
    t.volume
        .snapdir_setxattr(XATTR_POLICY, None)
        .expect("clear");
    assert_eq!(
        t.volume
            .snapdir_setxattr(XATTR_POLICY, None)
            .map_err(|e| e.errno()),
        Err(libc::ENODATA)
    );
    assert_eq!(
        t.volume.run_policy().expect("no policy"),
        PolicyRun::default()
    );
    assert_eq!(t.volume.prune().map_err(|e| e.errno()), Err(libc::ENODATA));
}

/// A volume whose policy keeps the last snapshot (deletions into a bin kept
/// `trash_days`), after its schedule took three hourly snapshots (pending); their names.
fn three_hourly_keeping_the_last(trash_days: Option<u32>) -> (Clocked, Vec<Vec<u8>>) {
    let t = Clocked::new(START + HOUR / 2);
    let policy = Policy {
        every_secs: 3600,
        keep: KeepRules {
            last: 1,
            ..KeepRules::default()
        },
        trash_days,
        cron: None,
    };
    t.volume.set_policy(&policy).expect("set policy");
    let mut taken = vec![];
    for hour in 1..=3 {
        t.clock.set(START + hour * HOUR);
        taken.push(t.volume.run_policy().expect("run").taken.expect("taken"));
    }
    (t, taken)
}

#[test]
fn retention_keeps_locked_snapshots_and_its_deletions_go_to_the_recycle_bin() {
    let (t, taken) = three_hourly_keeping_the_last(Some(1));
    let held = SnapshotLock {
        mode: LockMode::Governance,
        until: START + 10 * DAY,
        cool_off_until: START,
    };
    t.volume
        .lock_snapshot(&taken[0], Some(&held))
        .expect("lock the oldest");
    taken.iter().for_each(|name| t.complete(name));

    let plan = t.volume.retention_plan().expect("plan").expect("a policy");
    let reasons = |name: &[u8]| {
        let verdict = plan.iter().find(|v| v.name == name).expect("in the plan");
        verdict.reasons.clone()
    };
    assert_eq!(reasons(&taken[0]), vec![Reason::Locked]);
    assert_eq!(reasons(&taken[1]), vec![]);

    let run = t.volume.run_policy().expect("retention");
    assert_eq!(run.deleted, vec![taken[1].clone()]);
    let binned: Vec<_> = t
        .volume
        .trashed_snapshots()
        .into_iter()
        .map(|row| row.trash.expect("in the bin").expires)
        .collect();
    assert_eq!(
        binned,
        vec![START + 3 * HOUR + DAY],
        "kept a day by the policy"
    );
    assert!(
        t.volume
            .retention_plan()
            .expect("plan")
            .expect("policy")
            .len()
            == 2,
        "what is in the bin is not retention's any more"
    );
    assert_eq!(
        t.volume
            .purge_expired_trash(START + 2 * DAY)
            .expect("purge"),
        1
    );
    assert!(t.volume.trashed_snapshots().is_empty());
}

#[test]
fn a_cron_schedule_takes_its_times_and_nothing_between() {
    let t = Clocked::new(START);
    let policy = Policy {
        every_secs: 0,
        cron: Some("30 2 * * 1-5".into()),
        ..month_policy()
    };
    t.volume.set_policy(&policy).expect("set policy");
    let first = MONDAY + 2 * HOUR + HOUR / 2;
    assert_eq!(t.volume.run_policy().expect("run").next_due, Some(first));
    let mut taken = vec![];
    // Two weeks in steps of ten minutes; an hour is skipped on Wednesday (down at 02:30).
    let wednesday_down = (MONDAY + 2 * DAY + 2 * HOUR)..(MONDAY + 2 * DAY + 3 * HOUR);
    for step in 0..14 * 24 * 6 {
        let at = START + step * 10 * 60 * NANOS;
        if wednesday_down.contains(&at) {
            continue;
        }
        t.clock.set(at);
        if let Some(name) = t.volume.run_policy().expect("run").taken {
            taken.push(String::from_utf8(name).expect("utf-8"));
        }
    }
    let weekdays = [0, 1, 2, 3, 4, 7, 8, 9, 10, 11];
    let expected: Vec<String> = weekdays
        .iter()
        .map(|day| format!("auto-{}", compact_stamp(first + day * DAY)))
        .collect();
    assert_eq!(
        taken, expected,
        "each weekday at 02:30, Wednesday's caught up once"
    );
    let wednesday = t
        .volume
        .snapshots
        .by_name(expected[2].as_bytes())
        .expect("wednesday");
    assert_eq!(
        wednesday.created,
        MONDAY + 2 * DAY + 3 * HOUR,
        "taken when back"
    );
}

/// Retention judges the rows it read, then deletes: a snapshot deleted and taken again
/// under its name in between, or locked in between, is not the one it judged.
#[test]
fn retention_deletes_only_the_snapshot_it_judged() {
    let (t, taken) = three_hourly_keeping_the_last(None);
    // Retention judges completed snapshots only.
    taken.iter().for_each(|name| t.complete(name));
    let plan = t.volume.retention_plan().expect("plan").expect("a policy");
    let judged = |name: &[u8]| {
        let verdict = plan.iter().find(|v| v.name == name).expect("in the plan");
        assert!(!verdict.keep(), "the plan deletes it");
        verdict
    };

    // Deleted by hand, then a snapshot of that name taken again.
    t.volume.delete_snapshot(&taken[0]).expect("rmdir");
    t.clock.set(START + 3 * HOUR + 60 * NANOS);
    t.volume.create_snapshot(&taken[0]).expect("the name again");
    assert!(t.volume.carry_out(judged(&taken[0])).expect("carry out"));
    t.volume
        .snapshots
        .by_name(&taken[0])
        .expect("the newer snapshot stays");

    // Locked after the plan was made.
    let held = SnapshotLock {
        mode: LockMode::Governance,
        until: START + 10 * DAY,
        cool_off_until: START,
    };
    t.volume
        .lock_snapshot(&taken[1], Some(&held))
        .expect("lock");
    assert!(!t.volume.carry_out(judged(&taken[1])).expect("carry out"));
    t.volume
        .snapshots
        .by_name(&taken[1])
        .expect("the locked snapshot stays");
}
