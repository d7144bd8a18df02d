//! The recycle bin and lock commands: `snapshot list --trash`, `undelete`, `purge`,
//! `lock`, `unlock`, and `mount --trash-days`'s parser. They act through the mount's
//! control directory (see `snapfs::control`).

use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use snapfs::catalog::LockMode;
use snapfs::control;
use snapfs::inspect::Inspector;
use snapfs::volume;

use super::{human_bytes, json, parse_duration};
use snapfs::display::{counted, escaped};

/// `--trash-days`: a number of days, or a duration with a unit (90s, 30m, 12h, 3d, 2w).
pub fn parse_trash_days(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return parse_duration(&format!("{text}d"));
    }
    match text.strip_suffix('w') {
        Some(weeks) => parse_duration(&format!("{weeks}d")).and_then(|days| {
            days.checked_mul(7)
                .ok_or_else(|| format!("duration '{text}' is too long"))
        }),
        None => parse_duration(text),
    }
}

#[derive(Args)]
pub struct UndeleteArgs {
    mountpoint: PathBuf,
    /// The snapshot's name in the recycle bin (`snapshot list --trash`).
    name: OsString,
    /// Restore it under this name (needed when a snapshot of its name exists).
    #[arg(long = "as", value_name = "NEW")]
    new_name: Option<OsString>,
    /// Print the restored snapshot as JSON.
    #[arg(long)]
    json: bool,
}

pub fn undelete(args: UndeleteArgs) -> Result<(), Box<dyn std::error::Error>> {
    control::undelete_snapshot(&args.mountpoint, &args.name, args.new_name.as_deref())?;
    let name = args.new_name.unwrap_or(args.name);
    let info = Inspector::open(&snapfs::daemon::data_dir_of_mount(&args.mountpoint)?)?
        .snapshot(name.as_bytes())?;
    if args.json {
        json::print(&json::Snapshot::of(&info))?;
    } else {
        println!(
            "snapshot '{}' restored from the recycle bin",
            escaped(&info.name)
        );
    }
    Ok(())
}

#[derive(Args)]
pub struct LockArgs {
    mountpoint: PathBuf,
    name: OsString,
    /// Lock for this long from now, e.g. 30d, 12h, 2w.
    #[arg(long = "for", value_name = "DURATION", value_parser = parse_trash_days,
          required_unless_present = "until", conflicts_with = "until")]
    duration: Option<Duration>,
    /// Lock until this UTC time, e.g. 2027-01-31T00:00:00Z.
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    until: Option<i64>,
    /// governance: whoever may delete snapshots may shorten or remove the lock.
    /// compliance: after the cool-off, only extended, never shortened or removed.
    #[arg(long, value_name = "MODE", default_value = "governance",
          value_parser = str::parse::<LockMode>)]
    mode: LockMode,
    /// How long a compliance lock may still be changed or removed, e.g. 1h.
    #[arg(long, value_name = "DURATION", value_parser = parse_trash_days)]
    cool_off: Option<Duration>,
    /// Print the snapshot's lock as JSON.
    #[arg(long)]
    json: bool,
}

fn parse_time(text: &str) -> Result<i64, String> {
    volume::parse_time(text)
}

fn nanos(duration: Duration) -> i64 {
    i64::try_from(duration.as_nanos()).unwrap_or(i64::MAX)
}

pub fn lock(args: LockArgs) -> Result<(), Box<dyn std::error::Error>> {
    let now = volume::now();
    let until = match (args.until, args.duration) {
        (Some(until), _) => until,
        (None, Some(duration)) => now.saturating_add(nanos(duration)),
        (None, None) => return Err("give --for DURATION or --until TIME".into()),
    };
    let lock = snapfs::catalog::SnapshotLock {
        mode: args.mode,
        until,
        cool_off_until: now.saturating_add(args.cool_off.map_or(0, nanos)),
    };
    let text = volume::format_lock(&lock);
    control::lock_snapshot(&args.mountpoint, &args.name, Some(&text))?;
    let path = args.mountpoint.join(".snapshots").join(&args.name);
    let shown = control::snapshot_lock(&path).unwrap_or(text);
    if args.json {
        let lock = volume::parse_lock(&shown, now)?;
        json::print(&json::Lock::of(&lock))?;
    } else {
        println!(
            "snapshot '{}' locked: {shown}",
            escaped(args.name.as_bytes())
        );
    }
    Ok(())
}

#[derive(Args)]
pub struct UnlockArgs {
    mountpoint: PathBuf,
    name: OsString,
    /// Print the unlocked snapshot as JSON.
    #[arg(long)]
    json: bool,
}

pub fn unlock(args: UnlockArgs) -> Result<(), Box<dyn std::error::Error>> {
    control::lock_snapshot(&args.mountpoint, &args.name, None)?;
    if args.json {
        let info = Inspector::open(&snapfs::daemon::data_dir_of_mount(&args.mountpoint)?)?
            .snapshot(args.name.as_bytes())?;
        json::print(&json::Snapshot::of(&info))?;
    } else {
        println!("snapshot '{}' unlocked", escaped(args.name.as_bytes()));
    }
    Ok(())
}

#[derive(Args)]
pub struct PurgeArgs {
    mountpoint: PathBuf,
    /// The snapshot's name in the recycle bin (`snapshot list --trash`).
    name: OsString,
    /// Print what was purged as JSON.
    #[arg(long)]
    json: bool,
}

pub fn purge(args: PurgeArgs) -> Result<(), Box<dyn std::error::Error>> {
    control::purge_snapshot(&args.mountpoint, &args.name)?;
    if args.json {
        json::print(&serde_json::json!({ "purged": json::text(args.name.as_bytes()) }))?;
    } else {
        println!(
            "snapshot '{}' purged from the recycle bin",
            escaped(args.name.as_bytes())
        );
    }
    Ok(())
}

/// `snapshot list --trash`: each snapshot in the bin with what purging it would free, and
/// what purging all of them would.
pub fn list_trash(inspector: &Inspector, as_json: bool) -> Result<(), Box<dyn std::error::Error>> {
    let (trashed, total) = inspector.trash()?;
    if as_json {
        return Ok(json::print(&json::Trash::of(&trashed, total))?);
    }
    println!(
        "{:<24} {:<24} {:<24} {:>10} {:>10}",
        "NAME", "DELETED", "EXPIRES", "LOGICAL", "FREES"
    );
    for s in &trashed {
        let (deleted, expires) = s
            .trash
            .map_or((0, 0), |trash| (trash.deleted, trash.expires));
        println!(
            "{:<24} {:<24} {:<24} {:>10} {:>10}",
            escaped(&s.name),
            volume::rfc3339(deleted),
            volume::rfc3339(expires),
            human_bytes(s.logical_bytes),
            human_bytes(s.exclusive_bytes),
        );
    }
    println!(
        "{} in the recycle bin; purging them all frees {}",
        counted(trashed.len(), "snapshot", "snapshots"),
        human_bytes(total)
    );
    Ok(())
}

/// The lock column of `snapshot list` and line of `snapshot show`.
pub fn lock_text(lock: Option<&snapfs::catalog::SnapshotLock>) -> String {
    lock.map_or_else(
        || "-".to_owned(),
        |lock| {
            format!(
                "{} until {}",
                lock.mode.as_str(),
                volume::rfc3339(lock.until)
            )
        },
    )
}
