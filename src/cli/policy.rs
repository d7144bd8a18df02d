//! `snapfs policy set|show|clear` and `snapfs snapshot prune`: the snapshot policy of a
//! volume. Changes go to the mount's daemon through `.snapshots` (see `control`); what
//! is shown is read from the catalog, so it works without a mount too.

use std::path::Path;

use clap::Args;
use serde::Serialize;
use snapfs::clock::parse_duration;
use snapfs::control;
use snapfs::policy::{KeepRules, Policy};
use snapfs::volume::retention::{Reason, Verdict};
use snapfs::volume::{self};

use crate::{VolumeSource, json};
use snapfs::display::escaped;

/// The options of `snapfs policy set`.
#[derive(Args)]
pub struct PolicyArgs {
    /// Take a snapshot every DURATION (s, m, h, d, w, y: 30s, 1h, 1d). Slots start at
    /// multiples of it since the epoch, in UTC: 1h on the hour, 1d at midnight.
    #[arg(long, value_name = "DURATION", value_parser = duration_secs,
          required_unless_present = "cron", conflicts_with = "cron")]
    every: Option<u64>,
    /// Instead of --every: take a snapshot at the times of a crontab schedule, in UTC:
    /// MINUTE HOUR DAY-OF-MONTH MONTH DAY-OF-WEEK, each *, N, A-B, */N or a list
    /// ('30 2 * * 1-5': 02:30 on weekdays; '0 */6 * * *': every six hours).
    #[arg(long, value_name = "SCHEDULE")]
    cron: Option<String>,
    /// Keep the N newest snapshots.
    #[arg(long, value_name = "N", default_value_t = 0)]
    keep_last: u32,
    /// Keep the newest snapshot of each of the N newest hours that have one.
    #[arg(long, value_name = "N", default_value_t = 0)]
    keep_hourly: u32,
    /// Keep the newest snapshot of each of the N newest days (UTC) that have one.
    #[arg(long, value_name = "N", default_value_t = 0)]
    keep_daily: u32,
    /// Keep the newest snapshot of each of the N newest weeks (from Monday) that have one.
    #[arg(long, value_name = "N", default_value_t = 0)]
    keep_weekly: u32,
    /// Keep the newest snapshot of each of the N newest months that have one.
    #[arg(long, value_name = "N", default_value_t = 0)]
    keep_monthly: u32,
    /// Keep the newest snapshot of each of the N newest years that have one.
    #[arg(long, value_name = "N", default_value_t = 0)]
    keep_yearly: u32,
    /// Keep every snapshot taken within DURATION of the newest one (e.g. 2d).
    #[arg(long, value_name = "DURATION", value_parser = duration_secs)]
    keep_within: Option<u64>,
    /// Keep every snapshot with this tag; repeat for more.
    #[arg(long = "keep-tag", value_name = "KEY=VALUE")]
    keep_tags: Vec<String>,
    /// Let retention delete snapshots taken by hand too (by default it only deletes the
    /// ones the schedule took).
    #[arg(long)]
    prune_manual: bool,
    /// Keep deleted snapshots (retention's too) in the recycle bin for N days: the same
    /// setting as mount --trash-days, whichever was set last holds.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    trash_days: Option<u32>,
    /// Print the policy set as JSON.
    #[arg(long)]
    json: bool,
}

impl PolicyArgs {
    fn policy(&self) -> Result<Policy, Box<dyn std::error::Error>> {
        let tags = control::parse_tags(&self.keep_tags)?;
        let policy = Policy {
            every_secs: self.every.unwrap_or(0),
            cron: self.cron.clone(),
            keep: KeepRules {
                last: self.keep_last,
                hourly: self.keep_hourly,
                daily: self.keep_daily,
                weekly: self.keep_weekly,
                monthly: self.keep_monthly,
                yearly: self.keep_yearly,
                within_secs: self.keep_within,
                tags,
                manual: self.prune_manual,
            },
            trash_days: self.trash_days,
        };
        policy.validate()?;
        Ok(policy)
    }
}

fn duration_secs(text: &str) -> Result<u64, String> {
    match parse_duration(text)? {
        0 => Err(format!("'{text}' is no time: give at least 1s")),
        secs => Ok(secs),
    }
}

pub fn set(mountpoint: &Path, args: &PolicyArgs) -> Result<(), Box<dyn std::error::Error>> {
    let policy = args.policy()?;
    control::set_policy(mountpoint, &policy)?;
    if !policy.keep.any() {
        eprintln!("snapfs: note: no --keep-* rule: retention deletes nothing");
    }
    if args.json {
        json::print(&policy)?;
    } else {
        print_policy(&policy);
    }
    Ok(())
}

pub fn clear(mountpoint: &Path, as_json: bool) -> Result<(), Box<dyn std::error::Error>> {
    control::clear_policy(mountpoint)?;
    if as_json {
        json::print(&serde_json::json!({ "cleared": true }))?;
    } else {
        println!("policy cleared: no more scheduled snapshots, no retention");
    }
    Ok(())
}

/// The volume `policy show` reads: the mount's, or a data dir.
pub fn show(source: VolumeSource, json: bool) -> Result<(), Box<dyn std::error::Error>> {
    let Some((policy, last_slot)) = source.open()?.policy()? else {
        return Err(format!(
            "{} has no snapshot policy (set one with `snapfs policy set`)",
            source.data_dir()?.display()
        )
        .into());
    };
    let last = (last_slot > 0).then(|| volume::rfc3339(last_slot * 1_000_000_000));
    if json {
        json::print(&ShownPolicy {
            policy: &policy,
            last_slot: last,
        })?;
    } else {
        print_policy(&policy);
        if let Some(last) = last {
            println!("{:<13} {last}", "last slot:");
        }
    }
    Ok(())
}

#[derive(Serialize)]
struct ShownPolicy<'a> {
    #[serde(flatten)]
    policy: &'a Policy,
    /// The start of the last slot the schedule took (UTC).
    last_slot: Option<String>,
}

fn print_policy(policy: &Policy) {
    for (name, value) in policy.describe() {
        println!("{:<13} {value}", format!("{name}:"));
    }
}

/// `snapshot prune`: what retention keeps and deletes, and with `dry_run` unset, has the
/// daemon apply it.
pub fn prune(
    mountpoint: &Path,
    dry_run: bool,
    json: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    let source = VolumeSource {
        data: None,
        mount: Some(mountpoint.to_owned()),
    };
    let (_, plan) = source
        .open()?
        .retention_plan()?
        .ok_or_else(|| control::ControlError::NoPolicy(mountpoint.to_owned()))?;
    if !dry_run {
        control::prune(mountpoint)?;
    }
    if json {
        let items: Vec<_> = plan.iter().map(PlannedSnapshot::of).collect();
        json::print(&items)?;
        return Ok(());
    }
    println!("{:<28} {:<24} {:<8} REASONS", "NAME", "CREATED", "ACTION");
    for verdict in &plan {
        println!(
            "{:<28} {:<24} {:<8} {}",
            escaped(&verdict.name),
            volume::rfc3339(verdict.created),
            action(verdict, dry_run),
            reasons(&verdict.reasons)
        );
    }
    let doomed = plan.iter().filter(|v| !v.keep()).count();
    match dry_run {
        true => eprintln!("{doomed} of {} snapshots would be deleted", plan.len()),
        false => eprintln!("{doomed} of {} snapshots deleted", plan.len()),
    }
    Ok(())
}

fn action(verdict: &Verdict, dry_run: bool) -> &'static str {
    match (verdict.keep(), dry_run) {
        (true, _) => "keep",
        (false, true) => "delete",
        (false, false) => "deleted",
    }
}

fn reasons(reasons: &[Reason]) -> String {
    let text: Vec<String> = reasons.iter().map(Reason::to_string).collect();
    text.join(", ")
}

/// A snapshot in `snapshot prune --json`.
#[derive(Serialize)]
struct PlannedSnapshot<'a> {
    name: std::borrow::Cow<'a, str>,
    created: String,
    keep: bool,
    reasons: &'a [Reason],
}

impl<'a> PlannedSnapshot<'a> {
    fn of(verdict: &'a Verdict) -> PlannedSnapshot<'a> {
        PlannedSnapshot {
            name: String::from_utf8_lossy(&verdict.name),
            created: volume::rfc3339(verdict.created),
            keep: verdict.keep(),
            reasons: &verdict.reasons,
        }
    }
}

/// The RETENTION column of `snapshot list`: `keep (daily, weekly)` or `prune`.
pub fn column(verdict: Option<&Verdict>) -> String {
    match verdict {
        None => String::new(),
        Some(v) if v.keep() => format!("keep ({})", reasons(&v.reasons)),
        Some(_) => "prune".into(),
    }
}
