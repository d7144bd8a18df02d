//! Time as the core sees it: the `Clock` it reads (the system's in a mount, one a test sets
//! and advances), UTC calendar fields (for names and retention's calendar buckets), and
//! durations as users write them (`90s`, `30m`, `1h`, `2d`, `1w`, `1y`).

use std::sync::atomic::{AtomicI64, Ordering};

/// Nanoseconds in a second.
pub const NANOS: i64 = 1_000_000_000;

/// Where the core reads the time of snapshots and schedules from.
pub trait Clock: Send + Sync {
    /// Nanoseconds since the epoch.
    fn now(&self) -> i64;
}

/// Lets `volume::Options` (which holds one) stay `Debug`.
impl std::fmt::Debug for dyn Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Clock({})", self.now())
    }
}

/// The machine's clock.
#[derive(Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> i64 {
        crate::volume::now()
    }
}

/// A clock that moves only when told: tests simulate months in milliseconds.
#[derive(Debug, Default)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    pub fn new(nanos: i64) -> ManualClock {
        ManualClock(AtomicI64::new(nanos))
    }

    pub fn set(&self, nanos: i64) {
        self.0.store(nanos, Ordering::SeqCst);
    }

    pub fn advance(&self, nanos: i64) {
        self.0.fetch_add(nanos, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// A UTC date and time of day, to the second.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Utc {
    pub year: i64,
    pub month: i64,
    pub day: i64,
    pub hour: i64,
    pub minute: i64,
    pub second: i64,
    /// Days since 1970-01-01.
    pub days: i64,
}

/// The UTC calendar fields of `nanos` since the epoch.
pub fn utc(nanos: i64) -> Utc {
    let secs = nanos.div_euclid(NANOS);
    let (days, day_secs) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    Utc {
        year: yoe + era * 400 + i64::from(month <= 2),
        month,
        day,
        hour: day_secs / 3600,
        minute: day_secs % 3600 / 60,
        second: day_secs % 60,
        days,
    }
}

/// Nanoseconds since the epoch of a UTC date and time (the inverse of `utc`, from checked
/// fields); `None` past what an i64 holds.
pub fn nanos_of_utc(
    year: i64,
    month: i64,
    day: i64,
    hour: i64,
    minute: i64,
    second: i64,
) -> Option<i64> {
    // Days since 1970-01-01 of a civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let seconds = days * 86_400 + hour * 3600 + minute * 60 + second;
    seconds.checked_mul(NANOS)
}

/// `nanos` as a compact, sortable UTC stamp: `20261201T050000Z`.
pub fn compact_stamp(nanos: i64) -> String {
    let t = utc(nanos);
    format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
        t.year, t.month, t.day, t.hour, t.minute, t.second
    )
}

/// Seconds per duration unit; a year is 365 days.
const UNITS: [(&str, u64); 6] = [
    ("y", 365 * 86_400),
    ("w", 7 * 86_400),
    ("d", 86_400),
    ("h", 3600),
    ("m", 60),
    ("s", 1),
];

/// Parses a duration in seconds: `90`, `90s`, `30m`, `2h`, `1d`, `1w`, `1y` (365 days).
pub fn parse_duration(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let number: u64 = digits
        .parse()
        .map_err(|_| format!("'{text}' is not a duration (try 90s, 30m, 2h, 1d, 1w or 1y)"))?;
    let seconds = match unit.trim() {
        "" => 1,
        unit => UNITS
            .iter()
            .find(|(name, _)| *name == unit)
            .map(|(_, seconds)| *seconds)
            .ok_or_else(|| format!("unknown unit in '{text}' (use s, m, h, d, w or y)"))?,
    };
    number
        .checked_mul(seconds)
        .filter(|s| *s <= i64::MAX as u64 / NANOS as u64)
        .ok_or_else(|| format!("duration '{text}' is too long"))
}

/// `seconds` in the largest unit that divides it: `7200` is `2h`, `90` is `90s`.
pub fn format_duration(seconds: u64) -> String {
    UNITS
        .iter()
        .find(|(_, unit)| seconds > 0 && seconds % unit == 0)
        .map_or_else(
            || format!("{seconds}s"),
            |(name, unit)| format!("{}{name}", seconds / unit),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_and_print_in_their_largest_unit() {
        for (text, seconds, shown) in [
            ("90", 90, "90s"),
            ("90s", 90, "90s"),
            ("30m", 1800, "30m"),
            ("2h", 7200, "2h"),
            ("1d", 86_400, "1d"),
            ("2w", 14 * 86_400, "2w"),
            ("1y", 365 * 86_400, "1y"),
            ("120m", 7200, "2h"),
        ] {
            assert_eq!(parse_duration(text), Ok(seconds), "{text}");
            assert_eq!(format_duration(seconds), shown, "{text}");
        }
        for bad in ["", "h", "1x", "-1h", "1.5h", "99999999999999y"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn utc_fields_and_stamps() {
        let t = utc(951_782_400 * NANOS + 3_723 * NANOS);
        assert_eq!((t.year, t.month, t.day), (2000, 2, 29));
        assert_eq!((t.hour, t.minute, t.second), (1, 2, 3));
        assert_eq!(compact_stamp(1_795_000_000 * NANOS), "20261118T110640Z");
    }

    #[test]
    fn manual_clock_moves_only_when_told() {
        let clock = ManualClock::new(5);
        assert_eq!(clock.now(), 5);
        clock.advance(10);
        assert_eq!(clock.now(), 15);
        clock.set(1);
        assert_eq!(clock.now(), 1);
    }
}
