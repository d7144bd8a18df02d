//! The snapfs command line: parse, call the library, print.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use snapfs::daemon::{self, MountArgs};
use snapfs::volume;

#[derive(Parser)]
#[command(
    name = "snapfs",
    version,
    about = "A FUSE filesystem with instant, incremental, EBS-style snapshots",
    long_about = "snapfs serves a read-write volume at a mountpoint. Its data lives in a data \
                  dir: a SQLite catalog and a content-addressed block store.\n\n\
                  Example:\n  mkdir -p ~/work && snapfs mount ~/work\n  \
                  echo hello > ~/work/note.txt\n  snapfs umount ~/work"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Mount a volume (created on first use) at MOUNTPOINT.
    #[command(after_help = "Examples:\n  \
        snapfs mount ~/work                      # default data dir, runs in the background\n  \
        snapfs mount ~/work --data /srv/vol1 -f  # chosen data dir, stays attached\n\n\
        Unmount with `snapfs umount MOUNTPOINT`, `fusermount3 -u MOUNTPOINT`, or SIGINT/SIGTERM \
        to a foreground mount: all three flush everything first.")]
    Mount {
        /// Directory to mount the volume on; it must exist.
        mountpoint: PathBuf,
        /// Data dir holding the catalog and blocks [default: $XDG_DATA_HOME/snapfs, or
        /// ~/.local/share/snapfs]. One mount at a time may use it.
        #[arg(long, value_name = "DIR")]
        data: Option<PathBuf>,
        /// Stay attached to the terminal and log to stderr instead of daemonizing.
        #[arg(short, long)]
        foreground: bool,
        /// Let other users reach the mount (mode bits are enforced for every uid). Non-root
        /// users need `user_allow_other` in /etc/fuse.conf.
        #[arg(long)]
        allow_other: bool,
        /// Block size of a NEW volume: 64K to 1M, a power of two. Existing volumes keep theirs.
        #[arg(long, value_name = "SIZE", value_parser = parse_block_size,
              default_value_t = volume::DEFAULT_BLOCK_SIZE)]
        block_size: u32,
        /// Whether the root's listing shows `.snapshots`. Hidden by default so find, du or
        /// rsync walking the volume do not walk every snapshot; it is reachable by name
        /// either way.
        #[arg(long, value_enum, default_value_t = SnapdirMode::Hidden)]
        snapdir: SnapdirMode,
    },
    /// Unmount a snapfs mount, waiting until its daemon has flushed everything and exited.
    #[command(after_help = "Example:\n  snapfs umount ~/work")]
    Umount {
        /// The mountpoint to unmount.
        mountpoint: PathBuf,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum SnapdirMode {
    Hidden,
    Visible,
}

/// Parses sizes such as 65536, 64K, 256KiB or 1M.
fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let number: u64 = digits
        .parse()
        .map_err(|_| format!("'{text}' is not a size (try 256K or 1M)"))?;
    let shift = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        _ => return Err(format!("unknown size unit in '{text}' (use K, M or G)")),
    };
    number
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("size '{text}' is too large"))
}

fn parse_block_size(text: &str) -> Result<u32, String> {
    let size = parse_size(text)?;
    if !(64 << 10..=1 << 20).contains(&size) || !size.is_power_of_two() {
        return Err(format!(
            "block size must be a power of two from 64K to 1M, not {text}"
        ));
    }
    Ok(size as u32)
}

fn default_data_dir() -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir).join("snapfs"));
    }
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|home| PathBuf::from(home).join(".local/share/snapfs"))
        .ok_or_else(|| "neither XDG_DATA_HOME nor HOME is set: pass --data DIR".to_owned())
}

fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    match cli.command {
        Command::Mount {
            mountpoint,
            data,
            foreground,
            allow_other,
            block_size,
            snapdir,
        } => {
            let data_dir = match data {
                Some(dir) => dir,
                None => default_data_dir()?,
            };
            daemon::mount(MountArgs {
                mountpoint,
                data_dir,
                foreground,
                allow_other,
                volume: volume::Options {
                    block_size,
                    snapdir_visible: snapdir == SnapdirMode::Visible,
                    ..volume::Options::default()
                },
            })?;
        }
        Command::Umount { mountpoint } => daemon::unmount(&mountpoint)?,
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("snapfs: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units_and_reject_nonsense() {
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("").is_err());
        assert_eq!(parse_block_size("128K"), Ok(128 << 10));
        assert!(parse_block_size("100K").is_err());
        assert!(parse_block_size("4M").is_err());
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
