//! `snapfs checkpoint`: the local checkpoints a mount takes while its volume changes
//! (`list`, from the catalog, with or without a mount) and turning one into a snapshot
//! (`promote`, through the mount's control directory).

use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use clap::Subcommand;
use serde::Serialize;
use snapfs::control;
use snapfs::daemon;
use snapfs::display::escaped;
use snapfs::inspect::Inspector;
use snapfs::volume::{self, CheckpointSpace};

use crate::{MountOrData, human_bytes, json, parse_duration};

#[derive(Subcommand)]
pub enum CheckpointCommand {
    /// List the checkpoints, oldest first, with what each costs: the bytes only it holds
    /// (what dropping it alone frees) and, in total, the bytes only checkpoints hold.
    /// Works with or without a running mount.
    #[command(after_help = "Examples:\n  snapfs checkpoint list ~/work\n  \
        snapfs checkpoint list --data /srv/vol1 --json\n\n\
        Checkpoints are browsable read-only in MOUNTPOINT/.snapshots/.checkpoints/NAME \
        (not listed in .snapshots, so find, du and rsync do not walk them):\n  \
        cp -a ~/work/.snapshots/.checkpoints/2026-12-01T05:44:29.123Z/src ~/work/src")]
    List {
        #[command(flatten)]
        volume: MountOrData,
        #[arg(long)]
        json: bool,
    },
    /// Turn a checkpoint into a normal snapshot, which is then uploaded (pending, then
    /// completed) and kept until deleted. Same as renaming
    /// MOUNTPOINT/.snapshots/.checkpoints/NAME to MOUNTPOINT/.snapshots/SNAPSHOT_NAME.
    #[command(after_help = "Examples:\n  \
        snapfs checkpoint promote ~/work 2026-12-01T05:44:29.123Z --as before-rm\n  \
        snapfs checkpoint promote ~/work --at 2026-12-01T05:45:00Z --as before-rm\n  \
        snapfs checkpoint promote ~/work --at -10m --as ten-minutes-ago")]
    Promote {
        /// The mountpoint of the volume.
        mountpoint: PathBuf,
        /// The checkpoint, by name (see `snapfs checkpoint list`).
        #[arg(required_unless_present = "at", conflicts_with = "at")]
        name: Option<String>,
        /// The checkpoint taken at TIME or just before: a UTC time as the names are
        /// written (2026-12-01T05:45:00Z, milliseconds optional), or -DURATION for that
        /// long ago (-90s, -10m).
        #[arg(long, value_name = "TIME", allow_hyphen_values = true)]
        at: Option<String>,
        /// The name of the new snapshot.
        #[arg(long = "as", value_name = "SNAPSHOT_NAME")]
        as_name: std::ffi::OsString,
        /// Print the new snapshot as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `checkpoint list --json`: the checkpoints and their total.
#[derive(Serialize)]
struct Listing<'a> {
    checkpoints: Vec<Checkpoint<'a>>,
    /// Bytes only checkpoints hold.
    total_bytes: u64,
}

#[derive(Serialize)]
struct Checkpoint<'a> {
    id: u64,
    name: &'a str,
    created: String,
    logical_bytes: u64,
    exclusive_bytes: u64,
}

impl CheckpointCommand {
    pub fn run(self) -> Result<(), Box<dyn std::error::Error>> {
        match self {
            CheckpointCommand::List { volume, json } => {
                let dir = volume.source().data_dir()?;
                let space = Inspector::open(&dir)?.checkpoints()?;
                if json {
                    json::print(&listing(&space))?;
                } else {
                    print_table(&space);
                }
            }
            CheckpointCommand::Promote {
                mountpoint,
                name,
                at,
                as_name,
                json,
            } => {
                let checkpoint = match (name, at) {
                    (Some(name), _) => name,
                    (None, Some(at)) => {
                        let at = volume::rfc3339(parse_time(&at)?);
                        control::checkpoint_at(&control::checkpoint_names(&mountpoint)?, &at)?
                    }
                    (None, None) => return Err("name a checkpoint or give --at TIME".into()),
                };
                control::promote_checkpoint(&mountpoint, &checkpoint, &as_name)?;
                let info = Inspector::open(&daemon::data_dir_of_mount(&mountpoint)?)?
                    .snapshot(as_name.as_bytes())?;
                if json {
                    json::print(&json::Snapshot::of(&info))?;
                } else {
                    println!(
                        "checkpoint {checkpoint} promoted to snapshot '{}' (id {}, {})",
                        escaped(&info.name),
                        info.id,
                        info.state
                    );
                }
            }
        }
        Ok(())
    }
}

/// `--at`: a UTC time, or `-DURATION` ago.
fn parse_time(text: &str) -> Result<i64, String> {
    if let Some(ago) = text.strip_prefix('-') {
        let ago = i64::try_from(parse_duration(ago)?.as_nanos())
            .map_err(|_| format!("'{text}' is too long ago"))?;
        return Ok(volume::now().saturating_sub(ago));
    }
    volume::parse_utc(text).ok_or_else(|| {
        format!("'{text}' is not a UTC time like 2026-12-01T05:45:00Z, nor -DURATION like -10m")
    })
}

fn listing(space: &CheckpointSpace) -> Listing<'_> {
    Listing {
        checkpoints: space
            .checkpoints
            .iter()
            .map(|c| Checkpoint {
                id: c.row.id,
                name: &c.row.name,
                created: volume::rfc3339(c.row.created),
                logical_bytes: c.row.logical_bytes,
                exclusive_bytes: c.exclusive_bytes,
            })
            .collect(),
        total_bytes: space.total_bytes,
    }
}

fn print_table(space: &CheckpointSpace) {
    println!("{:<26} {:>10} {:>10}", "NAME", "LOGICAL", "EXCLUSIVE");
    for c in &space.checkpoints {
        println!(
            "{:<26} {:>10} {:>10}",
            c.row.name,
            human_bytes(c.row.logical_bytes),
            human_bytes(c.exclusive_bytes)
        );
    }
    println!(
        "{} checkpoints; only checkpoints hold {}",
        space.checkpoints.len(),
        human_bytes(space.total_bytes)
    );
}
