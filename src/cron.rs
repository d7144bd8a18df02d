//! Cron-like schedule times for snapshot policies (`snapfs policy set --cron`): the five
//! fields of crontab(5), `MINUTE HOUR DAY-OF-MONTH MONTH DAY-OF-WEEK`, in UTC. Each field
//! is `*`, a number, a range `a-b`, a step `*/n` or `a-b/n`, or a comma-separated list of
//! those. As in cron, when both day fields are restricted a day matching either one counts.
//!
//! A schedule answers two questions of the policy: the latest time at or before now (the
//! slot a snapshot is due for) and the next time after now (when the scheduler wakes).

use crate::clock::{NANOS, utc};

/// How far back or ahead a schedule looks for a matching minute: "29 February" happens
/// every four years, so five years find every schedule that can ever match.
const HORIZON_DAYS: i64 = 5 * 366;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cron {
    minutes: u64,
    hours: u64,
    days: u64,
    months: u64,
    /// Sunday is 0 (7 is taken as Sunday too).
    weekdays: u64,
    /// Whether each day field was `*`: with one of them `*`, only the other restricts.
    any_day: bool,
    any_weekday: bool,
}

impl Cron {
    /// Parses the five fields; the error names the field and what is wrong.
    pub fn parse(text: &str) -> Result<Cron, String> {
        let fields: Vec<&str> = text.split_whitespace().collect();
        let [minute, hour, day, month, weekday] = fields[..] else {
            return Err(format!(
                "'{text}' is not a cron schedule: give 5 fields, MINUTE HOUR DAY MONTH WEEKDAY \
                 (e.g. '0 2 * * *' for 02:00 UTC every day)"
            ));
        };
        let mut weekdays = field(weekday, "day of week", 0, 7)?;
        if weekdays & (1 << 7) != 0 {
            weekdays = (weekdays | 1) & !(1 << 7);
        }
        let cron = Cron {
            minutes: field(minute, "minute", 0, 59)?,
            hours: field(hour, "hour", 0, 23)?,
            days: field(day, "day of month", 1, 31)?,
            months: field(month, "month", 1, 12)?,
            weekdays,
            any_day: day == "*",
            any_weekday: weekday == "*",
        };
        // No field names a year, so what matches at all matches within the horizon.
        if cron.next_after(0).is_none() {
            return Err(format!("'{text}' never matches a date"));
        }
        Ok(cron)
    }

    /// The latest matching minute at or before `secs` (seconds since the epoch), if one
    /// is within the horizon.
    pub fn latest_at_or_before(&self, secs: i64) -> Option<i64> {
        let mut minute = secs.div_euclid(60) * 60;
        let stop = minute - HORIZON_DAYS * 86_400;
        while minute >= stop {
            if !self.day_matches(minute) {
                // Back to the last minute of the day before.
                minute = minute.div_euclid(86_400) * 86_400 - 60;
                continue;
            }
            if self.time_matches(minute) {
                return Some(minute);
            }
            minute -= 60;
        }
        None
    }

    /// The first matching minute after `secs`, if one is within the horizon.
    pub fn next_after(&self, secs: i64) -> Option<i64> {
        let mut minute = secs.div_euclid(60) * 60 + 60;
        let stop = minute + HORIZON_DAYS * 86_400;
        while minute <= stop {
            if !self.day_matches(minute) {
                minute = (minute.div_euclid(86_400) + 1) * 86_400;
                continue;
            }
            if self.time_matches(minute) {
                return Some(minute);
            }
            minute += 60;
        }
        None
    }

    fn day_matches(&self, secs: i64) -> bool {
        let t = utc(secs.saturating_mul(NANOS));
        // 1970-01-01 was a Thursday.
        let weekday = (t.days + 4).rem_euclid(7);
        let by_day = self.days & (1 << t.day) != 0;
        let by_weekday = self.weekdays & (1 << weekday) != 0;
        let day_ok = match (self.any_day, self.any_weekday) {
            (true, true) => true,
            (true, false) => by_weekday,
            (false, true) => by_day,
            (false, false) => by_day || by_weekday,
        };
        day_ok && self.months & (1 << t.month) != 0
    }

    fn time_matches(&self, secs: i64) -> bool {
        let day_secs = secs.rem_euclid(86_400);
        self.hours & (1 << (day_secs / 3600)) != 0
            && self.minutes & (1 << (day_secs % 3600 / 60)) != 0
    }
}

/// The bit set of the values one field allows, each within `min..=max`.
fn field(text: &str, name: &str, min: u32, max: u32) -> Result<u64, String> {
    let bad = |why: &str| format!("cron {name} '{text}': {why} (values {min}-{max})");
    let number = |part: &str| -> Result<u32, String> {
        let n: u32 = part
            .parse()
            .map_err(|_| bad(&format!("'{part}' is not a number")))?;
        if (min..=max).contains(&n) {
            Ok(n)
        } else {
            Err(bad(&format!("{n} is out of range")))
        }
    };
    let mut bits = 0u64;
    for item in text.split(',') {
        let (range, step) = match item.split_once('/') {
            Some((range, step)) => {
                let step: u32 = step
                    .parse()
                    .ok()
                    .filter(|s| *s > 0)
                    .ok_or_else(|| bad(&format!("'{step}' is not a step")))?;
                (range, step)
            }
            None => (item, 1),
        };
        let (first, last) = match range {
            "*" => (min, max),
            _ => match range.split_once('-') {
                Some((a, b)) => (number(a)?, number(b)?),
                None if step > 1 => (number(range)?, max),
                None => {
                    let n = number(range)?;
                    (n, n)
                }
            },
        };
        if first > last {
            return Err(bad(&format!("range {first}-{last} runs backwards")));
        }
        for n in (first..=last).step_by(step as usize) {
            bits |= 1 << n;
        }
    }
    Ok(bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-11-02T00:00:00Z, a Monday.
    const MONDAY: i64 = 1_793_577_600;

    /// The matching minutes in `from..to`, minute by minute, with the same day rules
    /// written out again.
    fn brute_force(cron: &Cron, from: i64, to: i64) -> Vec<i64> {
        (from / 60..to / 60)
            .map(|m| m * 60)
            .filter(|&s| cron.day_matches(s) && cron.time_matches(s))
            .collect()
    }

    #[test]
    fn fields_parse_as_crontab_reads_them() {
        let cron = Cron::parse("*/15 2,14 * * 1-5").expect("parse");
        assert_eq!(cron.minutes, (1 << 0) | (1 << 15) | (1 << 30) | (1 << 45));
        assert_eq!(cron.hours, (1 << 2) | (1 << 14));
        assert_eq!(cron.weekdays, 0b0111110);
        assert_eq!(Cron::parse("0 0 * * 7").expect("sunday").weekdays, 1);
        assert_eq!(
            Cron::parse("5/20 * * * *").expect("step").minutes,
            (1 << 5) | (1 << 25) | (1 << 45)
        );
        for bad in [
            "",
            "0 2 * *",
            "0 2 * * * *",
            "60 * * * *",
            "0 24 * * *",
            "0 0 0 * *",
            "0 0 * 13 *",
            "0 0 * * 8",
            "a * * * *",
            "*/0 * * * *",
            "5-1 * * * *",
            "0 0 31 2 *",
        ] {
            assert!(Cron::parse(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn next_and_latest_agree_with_a_minute_by_minute_walk() {
        let span = 15 * 86_400;
        for spec in [
            "30 2 * * 1-5",
            "0 */6 * * *",
            "0 0 1,15 * *",
            "0 12 13 * 5",
            "45 23 * * 0",
            "* * * * *",
        ] {
            let cron = Cron::parse(spec).expect(spec);
            let expected = brute_force(&cron, MONDAY, MONDAY + span);
            let mut walked = vec![];
            let mut at = MONDAY - 1;
            while let Some(next) = cron.next_after(at).filter(|&n| n < MONDAY + span) {
                walked.push(next);
                at = next;
            }
            assert_eq!(walked, expected, "{spec}");
            for (i, &t) in expected.iter().enumerate().skip(1) {
                assert_eq!(cron.latest_at_or_before(t + 59), Some(t), "{spec}");
                assert_eq!(
                    cron.latest_at_or_before(t - 1),
                    Some(expected[i - 1]),
                    "{spec}"
                );
            }
        }
    }

    #[test]
    fn weekday_and_month_day_match_either_when_both_are_set() {
        // The 13th, or any Friday: 2026-11-06 is a Friday, 2026-11-13 a Friday and the 13th.
        let cron = Cron::parse("0 12 13 * 5").expect("parse");
        let days: Vec<i64> = brute_force(&cron, MONDAY, MONDAY + 30 * 86_400)
            .iter()
            .map(|t| utc(t * NANOS).day)
            .collect();
        assert_eq!(days, [6, 13, 20, 27]);
        let cron = Cron::parse("0 12 14 * 5").expect("parse");
        let days: Vec<i64> = brute_force(&cron, MONDAY, MONDAY + 30 * 86_400)
            .iter()
            .map(|t| utc(t * NANOS).day)
            .collect();
        assert_eq!(days, [6, 13, 14, 20, 27]);
    }

    #[test]
    fn a_leap_day_schedule_is_found_years_away() {
        let cron = Cron::parse("0 0 29 2 *").expect("leap day");
        let next = cron.next_after(MONDAY).expect("2028-02-29");
        let t = utc(next * NANOS);
        assert_eq!((t.year, t.month, t.day, t.hour), (2028, 2, 29, 0));
        let before = cron.latest_at_or_before(MONDAY).expect("2024-02-29");
        assert_eq!(utc(before * NANOS).year, 2024);
    }
}
