//! Retention: which snapshots a policy's keep rules keep, and why. A pure function of the
//! snapshots and the rules, so `snapshot prune --dry-run`, `snapshot list` and the daemon
//! agree, and tests check it against an implementation of their own.
//!
//! The rules are restic's `forget` (internal/data/snapshot_policy.go): snapshots newest
//! first; `last N` keeps the N newest; `hourly N` (daily, weekly, monthly, yearly alike)
//! keeps the newest snapshot of each of the N newest UTC hours that have one, and, if
//! fewer than N such hours exist, the oldest snapshot too ("oldest hourly"), so the
//! history kept is as long as the counts allow; `within D` keeps every snapshot taken
//! less than D before the newest one; a tag keeps every snapshot that has it. On top,
//! whatever the rules say, a pending snapshot, the newest completed one and a locked one
//! are kept, and hand-taken snapshots are left alone unless the rules include them.

use serde::Serialize;

use crate::catalog::SnapshotState;
use crate::clock::{NANOS, format_duration, utc};
use crate::policy::{KeepRules, SCHEDULED_TAG};

/// A snapshot as retention sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub name: Vec<u8>,
    /// Nanoseconds since the epoch.
    pub created: i64,
    pub tags: Vec<(Vec<u8>, Vec<u8>)>,
    pub state: SnapshotState,
    pub locked: bool,
}

impl Candidate {
    /// Whether the policy's schedule took it (it carries `SCHEDULED_TAG`).
    pub fn scheduled(&self) -> bool {
        self.has_tag(SCHEDULED_TAG.0, SCHEDULED_TAG.1)
    }

    fn has_tag(&self, key: &str, value: &str) -> bool {
        self.tags
            .iter()
            .any(|(k, v)| k == key.as_bytes() && v == value.as_bytes())
    }
}

/// Why a snapshot is kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reason {
    Last,
    /// A calendar rule; `oldest` when it kept the oldest snapshot with counts to spare.
    Bucket {
        rule: Bucket,
        oldest: bool,
    },
    Within(u64),
    Tag(String, String),
    Pending,
    NewestCompleted,
    Locked,
    /// Taken by hand, and the rules do not include those.
    Manual,
    /// The policy has no keep rule: retention deletes nothing.
    NoRules,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bucket {
    Hourly,
    Daily,
    Weekly,
    Monthly,
    Yearly,
}

impl Bucket {
    fn name(self) -> &'static str {
        match self {
            Bucket::Hourly => "hourly",
            Bucket::Daily => "daily",
            Bucket::Weekly => "weekly",
            Bucket::Monthly => "monthly",
            Bucket::Yearly => "yearly",
        }
    }

    /// A number naming the UTC period of `created`: equal for two times in one period.
    fn of(self, created: i64) -> i64 {
        let t = utc(created);
        match self {
            Bucket::Hourly => created.div_euclid(3600 * NANOS),
            Bucket::Daily => t.days,
            // 1970-01-01 was a Thursday: +3 makes weeks start on Monday.
            Bucket::Weekly => (t.days + 3).div_euclid(7),
            Bucket::Monthly => t.year * 12 + t.month,
            Bucket::Yearly => t.year,
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reason::Last => f.write_str("last"),
            Reason::Bucket {
                rule,
                oldest: false,
            } => f.write_str(rule.name()),
            Reason::Bucket { rule, oldest: true } => write!(f, "oldest {}", rule.name()),
            Reason::Within(secs) => write!(f, "within {}", format_duration(*secs)),
            Reason::Tag(key, value) => write!(f, "tag {key}={value}"),
            Reason::Pending => f.write_str("pending"),
            Reason::NewestCompleted => f.write_str("newest completed"),
            Reason::Locked => f.write_str("locked"),
            Reason::Manual => f.write_str("manual"),
            Reason::NoRules => f.write_str("no keep rule"),
        }
    }
}

impl Serialize for Reason {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// What retention does with one snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub name: Vec<u8>,
    pub created: i64,
    /// Empty: deleted.
    pub reasons: Vec<Reason>,
}

impl Verdict {
    pub fn keep(&self) -> bool {
        !self.reasons.is_empty()
    }
}

/// Applies `rules` to `snapshots`: one verdict each, newest first.
pub fn plan(snapshots: &[Candidate], rules: &KeepRules) -> Vec<Verdict> {
    let mut order: Vec<&Candidate> = snapshots.iter().collect();
    order.sort_by_key(|s| std::cmp::Reverse(s.created));
    let newest_completed = order
        .iter()
        .find(|s| s.state == SnapshotState::Completed)
        .map(|s| s.name.clone());
    let mut verdicts: Vec<Verdict> = order
        .iter()
        .map(|s| Verdict {
            name: s.name.clone(),
            created: s.created,
            reasons: Vec::new(),
        })
        .collect();
    // The snapshots the rules weigh, newest first, by index into `verdicts`.
    let pool: Vec<usize> = (0..order.len())
        .filter(|&i| order[i].state != SnapshotState::Pending)
        .filter(|&i| rules.manual || order[i].scheduled())
        .collect();
    if rules.any() {
        apply_rules(&order, &pool, rules, &mut verdicts);
    } else {
        for &i in &pool {
            verdicts[i].reasons.push(Reason::NoRules);
        }
    }
    for (snapshot, verdict) in order.iter().zip(&mut verdicts) {
        if snapshot.state == SnapshotState::Pending {
            verdict.reasons.push(Reason::Pending);
        } else if !rules.manual && !snapshot.scheduled() {
            verdict.reasons.push(Reason::Manual);
        }
        if newest_completed.as_ref() == Some(&snapshot.name) {
            verdict.reasons.push(Reason::NewestCompleted);
        }
        if snapshot.locked {
            verdict.reasons.push(Reason::Locked);
        }
    }
    verdicts
}

/// restic's `ApplyPolicy` over `pool` (indexes into `order`, newest first).
fn apply_rules(order: &[&Candidate], pool: &[usize], rules: &KeepRules, verdicts: &mut [Verdict]) {
    let Some(&newest) = pool.first() else {
        return;
    };
    let latest = order[newest].created;
    // (rule, count left, the period of the last snapshot it kept)
    let mut buckets: Vec<(Bucket, u32, Option<i64>)> = [
        (Bucket::Hourly, rules.hourly),
        (Bucket::Daily, rules.daily),
        (Bucket::Weekly, rules.weekly),
        (Bucket::Monthly, rules.monthly),
        (Bucket::Yearly, rules.yearly),
    ]
    .into_iter()
    .filter(|(_, count)| *count > 0)
    .map(|(rule, count)| (rule, count, None))
    .collect();
    for (nr, &i) in pool.iter().enumerate() {
        let snapshot = order[i];
        let reasons = &mut verdicts[i].reasons;
        for (key, value) in &rules.tags {
            if snapshot.has_tag(key, value) {
                reasons.push(Reason::Tag(key.clone(), value.clone()));
            }
        }
        if let Some(within) = rules.within_secs {
            let within_nanos = i64::try_from(within)
                .unwrap_or(i64::MAX)
                .saturating_mul(NANOS);
            if snapshot.created > latest.saturating_sub(within_nanos) {
                reasons.push(Reason::Within(within));
            }
        }
        if nr < rules.last as usize {
            reasons.push(Reason::Last);
        }
        let is_oldest = nr + 1 == pool.len();
        for (rule, left, last) in &mut buckets {
            if *left == 0 {
                continue;
            }
            let period = rule.of(snapshot.created);
            let new_period = *last != Some(period);
            if new_period || is_oldest {
                reasons.push(Reason::Bucket {
                    rule: *rule,
                    oldest: !new_period,
                });
                *last = Some(period);
                *left -= 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: i64 = 3600 * NANOS;

    fn scheduled(name: &str, created: i64) -> Candidate {
        Candidate {
            name: name.as_bytes().to_vec(),
            created,
            tags: vec![(
                SCHEDULED_TAG.0.as_bytes().to_vec(),
                SCHEDULED_TAG.1.as_bytes().to_vec(),
            )],
            state: SnapshotState::Completed,
            locked: false,
        }
    }

    fn shown(verdicts: &[Verdict]) -> Vec<String> {
        verdicts
            .iter()
            .map(|v| {
                let reasons: Vec<String> = v.reasons.iter().map(|r| r.to_string()).collect();
                format!("{} {}", String::from_utf8_lossy(&v.name), reasons.join(","))
            })
            .collect()
    }

    #[test]
    fn buckets_keep_the_newest_of_each_period_and_the_oldest_with_counts_left() {
        // Three snapshots an hour apart on one day (2026-12-01 00:00, 01:00, 02:00 UTC).
        let day = 1_795_996_800 * NANOS - 1_795_996_800 * NANOS % (86_400 * NANOS);
        let snapshots: Vec<_> = (0..3)
            .map(|h| scheduled(&format!("s{h}"), day + h * HOUR))
            .collect();
        let rules = KeepRules {
            last: 1,
            daily: 2,
            ..KeepRules::default()
        };
        assert_eq!(
            shown(&plan(&snapshots, &rules)),
            ["s2 last,daily,newest completed", "s1 ", "s0 oldest daily"]
        );
    }

    #[test]
    fn pending_manual_and_locked_are_kept_whatever_the_rules() {
        let mut snapshots = vec![
            scheduled("old", 0),
            scheduled("locked", HOUR),
            scheduled("done", 2 * HOUR),
            scheduled("pending", 3 * HOUR),
        ];
        snapshots[1].locked = true;
        snapshots[3].state = SnapshotState::Pending;
        let mut manual = scheduled("by-hand", 4 * HOUR);
        manual.tags.clear();
        snapshots.push(manual);
        let rules = KeepRules {
            within_secs: Some(60),
            ..KeepRules::default()
        };
        assert_eq!(
            shown(&plan(&snapshots, &rules)),
            [
                "by-hand manual,newest completed",
                "pending pending",
                "done within 1m",
                "locked locked",
                "old ",
            ]
        );
        // With manual snapshots included, the hand-taken one is weighed like the others.
        let rules = KeepRules {
            manual: true,
            ..rules
        };
        assert_eq!(
            shown(&plan(&snapshots, &rules))[..3],
            [
                "by-hand within 1m,newest completed",
                "pending pending",
                "done "
            ]
        );
    }
}
