//! A volume's snapshot policy: how often the daemon takes a snapshot and which ones
//! retention keeps (restic's `forget` rules), plus the recycle bin's retention period.
//! The catalog stores it (`catalog/policy.rs`), the core runs it (`volume/policy.rs`),
//! and it travels between the CLI and a mount as JSON (the `user.snapfs.policy` xattr).

use serde::{Deserialize, Serialize};

use crate::clock::format_duration;
use crate::cron::Cron;

/// The tag every scheduled snapshot carries, so retention tells them from hand-taken ones.
pub const SCHEDULED_TAG: (&str, &str) = ("snapfs.policy", "scheduled");
/// Prefix of scheduled snapshots' names, before their UTC slot time.
pub const SCHEDULED_PREFIX: &str = "auto-";

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// Seconds between scheduled snapshots; slots start at multiples of it since the epoch
    /// (UTC), so `1h` takes one on the hour and `1d` at midnight. 0 with `cron`.
    pub every_secs: u64,
    /// Instead of `every_secs`: the times of a five-field crontab schedule, in UTC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cron: Option<String>,
    pub keep: KeepRules,
    /// Days a deleted snapshot stays in the recycle bin (`None`: deleted at once).
    pub trash_days: Option<u32>,
}

/// Which snapshots retention keeps; a snapshot any rule keeps is kept. With no rule set,
/// retention deletes nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeepRules {
    /// The newest N.
    pub last: u32,
    /// The newest snapshot of each of the newest N hours (UTC) that have one.
    pub hourly: u32,
    pub daily: u32,
    /// Weeks start on Monday.
    pub weekly: u32,
    pub monthly: u32,
    pub yearly: u32,
    /// Every snapshot taken within this many seconds of the newest one.
    pub within_secs: Option<u64>,
    /// Every snapshot with one of these tags (KEY, VALUE).
    pub tags: Vec<(String, String)>,
    /// Let retention delete snapshots taken by hand too (by default it never does).
    pub manual: bool,
}

impl KeepRules {
    /// Whether any rule is set: with none, retention keeps everything.
    pub fn any(&self) -> bool {
        [
            self.last,
            self.hourly,
            self.daily,
            self.weekly,
            self.monthly,
            self.yearly,
        ]
        .iter()
        .any(|n| *n > 0)
            || self.within_secs.is_some()
            || !self.tags.is_empty()
    }
}

/// When scheduled snapshots are due: slots of a fixed length, or cron times.
#[derive(Clone, Debug)]
pub enum Timetable {
    Every(u64),
    Cron(Cron),
}

impl Timetable {
    /// The start (seconds since the epoch) of the latest slot at or before `secs`;
    /// `i64::MIN` if the schedule has had none.
    pub fn latest_slot(&self, secs: i64) -> i64 {
        match self {
            Timetable::Every(every) => {
                let every = i64::try_from(*every).unwrap_or(i64::MAX);
                secs.div_euclid(every) * every
            }
            Timetable::Cron(cron) => cron.latest_at_or_before(secs).unwrap_or(i64::MIN),
        }
    }

    /// The start of the first slot after `secs`, if the schedule has one.
    pub fn next_slot(&self, secs: i64) -> Option<i64> {
        match self {
            Timetable::Every(every) => {
                let every = i64::try_from(*every).unwrap_or(i64::MAX);
                self.latest_slot(secs).checked_add(every)
            }
            Timetable::Cron(cron) => cron.next_after(secs),
        }
    }
}

impl Policy {
    /// The schedule, checked.
    pub fn timetable(&self) -> Result<Timetable, String> {
        match &self.cron {
            Some(_) if self.every_secs != 0 => Err("give --every or --cron, not both".into()),
            Some(spec) => Ok(Timetable::Cron(Cron::parse(spec)?)),
            None => Ok(Timetable::Every(self.every_secs)),
        }
    }

    /// Refuses what cannot be run (the reason names the option); else the schedule.
    pub fn validate(&self) -> Result<Timetable, String> {
        let timetable = self.timetable()?;
        if matches!(timetable, Timetable::Every(0)) {
            return Err("--every must be at least 1s".into());
        }
        if self.every_secs > 10 * 365 * 86_400 {
            return Err("--every must be at most 10y".into());
        }
        if self.keep.within_secs == Some(0) {
            return Err("--keep-within must be at least 1s".into());
        }
        if let Some((key, _)) = self.keep.tags.iter().find(|(key, _)| key.is_empty()) {
            return Err(format!("--keep-tag needs KEY=VALUE, got '={key}'"));
        }
        if self.trash_days == Some(0) {
            return Err("--trash-days must be at least 1 (leave it out for no recycle bin)".into());
        }
        Ok(timetable)
    }

    /// Reads the JSON form (the xattr a mount is sent), checked.
    pub fn from_json(bytes: &[u8]) -> Result<Policy, String> {
        let policy: Policy =
            serde_json::from_slice(bytes).map_err(|e| format!("not a policy: {e}"))?;
        policy.validate()?;
        Ok(policy)
    }

    pub fn to_json(&self) -> Vec<u8> {
        // A struct of numbers and strings always serializes.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// One line per setting, as `snapfs policy show` prints it.
    pub fn describe(&self) -> Vec<(&'static str, String)> {
        let k = &self.keep;
        let mut lines = vec![match &self.cron {
            Some(spec) => ("cron", format!("{spec} (UTC)")),
            None => ("every", format_duration(self.every_secs)),
        }];
        for (name, n) in [
            ("keep-last", k.last),
            ("keep-hourly", k.hourly),
            ("keep-daily", k.daily),
            ("keep-weekly", k.weekly),
            ("keep-monthly", k.monthly),
            ("keep-yearly", k.yearly),
        ] {
            if n > 0 {
                lines.push((name, n.to_string()));
            }
        }
        if let Some(within) = k.within_secs {
            lines.push(("keep-within", format_duration(within)));
        }
        for (key, value) in &k.tags {
            lines.push(("keep-tag", format!("{key}={value}")));
        }
        lines.push((
            "manual",
            if k.manual {
                "retention may delete them (--prune-manual)"
            } else {
                "never deleted by retention"
            }
            .into(),
        ));
        if !k.any() {
            lines.push(("retention", "off: no keep rule, nothing is deleted".into()));
        }
        lines.push((
            "trash-days",
            self.trash_days
                .map_or_else(|| "none".into(), |d| d.to_string()),
        ));
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trips_and_bad_policies_are_refused() {
        let policy = Policy {
            every_secs: 3600,
            keep: KeepRules {
                last: 3,
                daily: 7,
                within_secs: Some(86_400),
                tags: vec![("keep".into(), "yes".into())],
                ..KeepRules::default()
            },
            trash_days: Some(7),
            cron: None,
        };
        assert_eq!(Policy::from_json(&policy.to_json()), Ok(policy.clone()));
        for bad in [
            Policy {
                every_secs: 0,
                ..policy.clone()
            },
            Policy {
                trash_days: Some(0),
                ..policy.clone()
            },
            Policy {
                cron: Some("0 2 * * *".into()),
                ..policy.clone()
            },
            Policy {
                every_secs: 0,
                cron: Some("0 25 * * *".into()),
                ..policy.clone()
            },
        ] {
            assert!(Policy::from_json(&bad.to_json()).is_err(), "{bad:?}");
        }
        assert!(Policy::from_json(b"{").is_err());
        let nightly = Policy {
            every_secs: 0,
            cron: Some("30 2 * * 1-5".into()),
            ..policy.clone()
        };
        assert_eq!(Policy::from_json(&nightly.to_json()), Ok(nightly));
    }
}
