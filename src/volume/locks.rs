//! Snapshot locks (EBS snapshot lock): the rules for setting, changing and removing one,
//! and their text form in the `user.snapfs.lock` xattr of a snapshot's directory.
//!
//! A lock holds until its `until`; an expired one no longer holds and may be changed or
//! removed freely. Governance: whoever may delete snapshots may shorten or remove it.
//! Compliance: like governance during its cool-off, after that only extended.

use crate::catalog::{LockMode, SnapshotLock};

use super::rfc3339;

/// The xattr of a snapshot's directory holding its lock: read, set to lock, remove to
/// unlock.
pub const XATTR_LOCK: &[u8] = b"user.snapfs.lock";

/// Whether `lock` still forbids deleting its snapshot at `now`.
pub fn holds(lock: &SnapshotLock, now: i64) -> bool {
    lock.until > now
}

/// The lock a snapshot gets when `current` is asked to become `wanted` at `now`, or why
/// it may not. Past a compliance lock's cool-off the cool-off is not restarted.
pub fn change(
    current: Option<&SnapshotLock>,
    wanted: Option<&SnapshotLock>,
    now: i64,
) -> Result<Option<SnapshotLock>, &'static str> {
    let Some(current) = current.filter(|lock| holds(lock, now)) else {
        return Ok(wanted.copied());
    };
    if current.mode == LockMode::Governance || now < current.cool_off_until {
        return Ok(wanted.copied());
    }
    match wanted {
        None => Err("a compliance lock cannot be removed before it expires"),
        Some(wanted) if wanted.mode != LockMode::Compliance => {
            Err("a compliance lock cannot become a governance lock")
        }
        Some(wanted) if wanted.until < current.until => {
            Err("a compliance lock can only be extended, not shortened")
        }
        Some(wanted) => Ok(Some(SnapshotLock {
            cool_off_until: current.cool_off_until,
            ..*wanted
        })),
    }
}

/// `mode=MODE until=TIME [cool-off-until=TIME]`, times in RFC 3339 UTC.
pub fn format(lock: &SnapshotLock) -> String {
    let mut text = format!("mode={} until={}", lock.mode.as_str(), rfc3339(lock.until));
    if lock.mode == LockMode::Compliance {
        text.push_str(&format!(" cool-off-until={}", rfc3339(lock.cool_off_until)));
    }
    text
}

/// Reads what `format` writes: `until` is required, `mode` defaults to governance and
/// `cool-off-until` to `now` (no cool-off).
pub fn parse(text: &str, now: i64) -> Result<SnapshotLock, String> {
    let mut lock = SnapshotLock {
        mode: LockMode::Governance,
        until: i64::MIN,
        cool_off_until: now,
    };
    for field in text.split_whitespace() {
        let (key, value) = field
            .split_once('=')
            .ok_or_else(|| format!("'{field}' is not KEY=VALUE"))?;
        match key {
            "mode" => lock.mode = value.parse()?,
            "until" => lock.until = parse_time(value)?,
            "cool-off-until" => lock.cool_off_until = parse_time(value)?,
            other => return Err(format!("unknown lock field '{other}'")),
        }
    }
    if lock.until == i64::MIN {
        return Err("a lock needs until=TIME".into());
    }
    Ok(lock)
}

/// Parses an RFC 3339 UTC time (`2026-12-31T23:59:59Z`, with optional fraction, or a
/// date alone) into nanoseconds since the epoch.
pub fn parse_time(text: &str) -> Result<i64, String> {
    let bad = || format!("'{text}' is not a UTC time like 2026-12-31T23:59:59Z");
    let (date, time) = match text.split_once(['T', 't', ' ']) {
        Some((date, time)) => (date, time),
        None => (text, "00:00:00Z"),
    };
    let time = time
        .strip_suffix(['Z', 'z'])
        .or_else(|| time.strip_suffix("+00:00"))
        .ok_or_else(bad)?;
    let numbers = |part: &str, sep: char| -> Option<Vec<i64>> {
        part.split(sep).map(|n| n.parse().ok()).collect()
    };
    let [year, month, day] = numbers(date, '-')
        .and_then(|v| <[i64; 3]>::try_from(v).ok())
        .ok_or_else(bad)?;
    let (clock, fraction) = time.split_once('.').unwrap_or((time, ""));
    let [hour, minute, second] = numbers(clock, ':')
        .and_then(|v| <[i64; 3]>::try_from(v).ok())
        .ok_or_else(bad)?;
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
        || fraction.len() > 9
        || !fraction.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(bad());
    }
    let nanos: i64 = format!("{fraction:0<9}").parse().map_err(|_| bad())?;
    crate::clock::nanos_of_utc(year, month, day, hour, minute, second)
        .and_then(|n| n.checked_add(nanos))
        .ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1_000_000_000;

    fn lock(mode: LockMode, until: i64, cool_off_until: i64) -> SnapshotLock {
        SnapshotLock {
            mode,
            until,
            cool_off_until,
        }
    }

    #[test]
    fn governance_locks_change_freely() {
        let current = lock(LockMode::Governance, 100 * S, 0);
        let shorter = lock(LockMode::Governance, 50 * S, 0);
        assert_eq!(change(Some(&current), None, 10 * S), Ok(None));
        assert_eq!(
            change(Some(&current), Some(&shorter), 10 * S),
            Ok(Some(shorter))
        );
    }

    #[test]
    fn compliance_locks_only_grow_after_their_cool_off() {
        let current = lock(LockMode::Compliance, 100 * S, 20 * S);
        let shorter = lock(LockMode::Compliance, 50 * S, 0);
        let longer = lock(LockMode::Compliance, 200 * S, 300 * S);
        let governance = lock(LockMode::Governance, 200 * S, 0);
        // In the cool-off: like governance.
        assert_eq!(change(Some(&current), None, 10 * S), Ok(None));
        assert_eq!(
            change(Some(&current), Some(&shorter), 10 * S),
            Ok(Some(shorter))
        );
        // After it: extended only, and the cool-off is not restarted.
        assert!(change(Some(&current), None, 30 * S).is_err());
        assert!(change(Some(&current), Some(&shorter), 30 * S).is_err());
        assert!(change(Some(&current), Some(&governance), 30 * S).is_err());
        assert_eq!(
            change(Some(&current), Some(&longer), 30 * S),
            Ok(Some(lock(LockMode::Compliance, 200 * S, 20 * S)))
        );
        // Expired: it no longer holds.
        assert_eq!(change(Some(&current), None, 100 * S), Ok(None));
        assert!(holds(&current, 99 * S) && !holds(&current, 100 * S));
    }

    #[test]
    fn the_text_form_round_trips() {
        let compliance = lock(LockMode::Compliance, 1_795_000_000_123_000_000, 5 * S);
        assert_eq!(parse(&format(&compliance), 0), Ok(compliance));
        let governance = lock(LockMode::Governance, 1_795_000_000_000_000_000, 7);
        assert_eq!(parse(&format(&governance), 7), Ok(governance));
        assert!(parse("mode=governance", 0).is_err());
        assert!(parse("mode=strict until=2026-01-01T00:00:00Z", 0).is_err());
    }

    #[test]
    fn times_parse_as_rfc3339_formats_them() {
        for nanos in [0, 951_782_400_000_000_000, 1_795_000_000_123_000_000] {
            assert_eq!(parse_time(&rfc3339(nanos)), Ok(nanos));
        }
        assert_eq!(parse_time("1970-01-02"), Ok(86_400 * S));
        assert!(parse_time("2026-13-01T00:00:00Z").is_err());
        assert!(parse_time("2026-01-01T00:00:00").is_err());
    }
}
