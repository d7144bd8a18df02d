//! The snapfs command line: parse, call the library, print.

use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::builder::{OsStringValueParser, TypedValueParser};
use clap::{Args, Parser, Subcommand};

use snapfs::catalog::UploadProgress;
use snapfs::control;
use snapfs::daemon::{self, MountArgs};
use snapfs::display::{counted, escaped};
use snapfs::hooks::{HookOptions, PreFailure};
use snapfs::inspect::{Change, Inspector};
use snapfs::metrics;
use snapfs::mount_helper::{self, Call};
use snapfs::status::{self, StatusOptions};
use snapfs::store;
use snapfs::upload::UploadOptions;
use snapfs::upload::drain::{self, DrainOptions, PruneOptions};
use snapfs::upload::gc;
use snapfs::verify::{self, Options};
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
    Mount(Box<MountCommand>),
    /// Link mount(8)'s and umount(8)'s helpers (mount.fuse.snapfs, umount.fuse.snapfs) to
    /// this program, so /etc/fstab lines of type fuse.snapfs mount volumes.
    #[command(after_help = "Example:\n  \
        sudo snapfs install-mount-helper\n  \
        # /etc/fstab:\n  \
        /srv/vol1  /srv/work  fuse.snapfs  store=s3://my-bucket/work,_netdev,nofail  0 0\n\n\
        Mounting a line again (`mount -a`) leaves its running volume alone.")]
    InstallMountHelper {
        /// Where mount(8) looks for helpers.
        #[arg(long, value_name = "DIR", default_value = "/sbin")]
        dir: PathBuf,
    },
    /// Unmount a snapfs mount, waiting until its daemon has flushed everything and exited.
    #[command(after_help = "Example:\n  snapfs umount ~/work")]
    Umount {
        /// The mountpoint to unmount.
        mountpoint: PathBuf,
    },
    /// Take, list, inspect, tag and delete snapshots.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Take snapshots on a schedule and delete old ones by rules (restic's forget --keep-*).
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// List the local checkpoints a mount takes while the volume changes, and promote one
    /// to a snapshot.
    #[command(subcommand)]
    Checkpoint(checkpoint::CheckpointCommand),
    /// Restore a snapshot, or a file or directory in one: contents, modes, owners (as
    /// root), times, xattrs, hard links, symlinks and holes. Every block is verified.
    #[command(
        override_usage = "snapfs restore [OPTIONS] [MOUNTPOINT] <WHAT> <DEST>",
        after_help = "Examples:\n  \
        snapfs restore ~/work monday ~/monday           # a whole snapshot\n  \
        snapfs restore ~/work monday:src/main.rs /tmp   # one file into /tmp\n  \
        snapfs restore monday ~/monday --data /srv/vol1   # mounted or not\n  \
        snapfs restore --store s3://my-bucket/laptop monday ~/back   # from the bucket alone\n  \
        snapfs restore --store s3://my-bucket/laptop --trash monday ~/back  # from its recycle bin\n\n\
        A progress bar shows on a terminal. A block that fails verification names its file, \
        which is not restored; the rest goes on and the exit status is 1."
    )]
    Restore {
        /// A running snapfs mount, as `snapshot create` takes it (the same as --mount). Of
        /// two arguments, the first is WHAT and the second DEST, of the volume that --data,
        /// --mount or --store names [default: as for `snapfs mount`].
        #[arg(value_name = "MOUNTPOINT")]
        first: OsString,
        /// SNAPSHOT, or SNAPSHOT:PATH for a file or directory inside it.
        #[arg(value_name = "WHAT")]
        second: OsString,
        /// Destination. A directory is restored as DEST (created if missing; it must be
        /// empty unless --overwrite); a file as DEST, or DEST/NAME if DEST is a directory.
        #[arg(value_name = "DEST", conflicts_with_all = ["data", "mount", "store"])]
        third: Option<PathBuf>,
        #[command(flatten)]
        volume: VolumeSource,
        /// Restore from an object store alone, with no data dir (a new machine):
        /// s3://BUCKET[/PREFIX] or file:///DIR. Only completed snapshots are there.
        #[arg(long, value_name = "URL", value_parser = parse_store_url,
              conflicts_with_all = ["data", "mount"])]
        store: Option<store::StoreUrl>,
        /// Restore over existing files in DEST, replacing them.
        #[arg(long)]
        overwrite: bool,
        /// With --store: SNAPSHOT is one in the volume's recycle bin (its name there, as
        /// `snapshot list --trash` shows it), not purged yet.
        #[arg(long, requires = "store")]
        trash: bool,
        /// Print a JSON summary at the end (no progress bar).
        #[arg(long)]
        json: bool,
    },
    /// Check that a volume is whole: its catalog (SQLite's integrity check and snapfs's
    /// invariants), its local blocks, and its store (every block, tree and manifest the
    /// completed snapshots need). With --store, check a store alone.
    #[command(after_help = "Examples:\n  \
        snapfs verify ~/work                          # beside a running mount\n  \
        snapfs verify --data /srv/vol1 --deep         # download and hash every block\n  \
        snapfs verify --data /srv/vol1 --repair       # unmounted: fix what can be fixed\n  \
        snapfs verify --store s3://my-bucket/laptop   # the bucket alone\n\n\
        Exit status: 0 when everything is whole, 1 when problems were found (listed on \
        stdout), 2 when the check could not run.")]
    Verify {
        /// A running snapfs mount; its data dir is read (the same as --mount).
        #[arg(value_name = "MOUNTPOINT", conflicts_with_all = ["data", "mount", "store"])]
        mountpoint: Option<PathBuf>,
        #[command(flatten)]
        volume: VolumeSource,
        /// Check an object store alone, with no data dir: s3://BUCKET[/PREFIX] or file:///DIR.
        #[arg(long, value_name = "URL", value_parser = parse_store_url,
              conflicts_with_all = ["data", "mount"])]
        store: Option<store::StoreUrl>,
        /// Read and hash every block, local and stored (downloads the whole store).
        #[arg(long)]
        deep: bool,
        /// On an unmounted volume: upload blocks the store lacks or holds damaged from good
        /// local copies, fetch damaged or missing local blocks from the store, rebuild lost
        /// or damaged index objects from the packs, delete block files nothing references;
        /// then check again.
        #[arg(long, conflicts_with = "store")]
        repair: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write a new random encryption key to FILE (mode 0600). With SNAPFS_KEY_FILE=FILE
    /// set, snapfs seals every object it stores (blocks and manifests, XChaCha20-Poly1305;
    /// block and tree names hidden too): the bucket's holder learns only sizes. Keep a copy
    /// of the key elsewhere: without it nothing in the store can be restored.
    #[command(after_help = "Example:\n  \
        snapfs keygen ~/.config/snapfs/key\n  \
        export SNAPFS_KEY_FILE=~/.config/snapfs/key\n  \
        snapfs mount ~/work --store s3://my-bucket/laptop\n\n\
        The key must be set at the first mount (or upload) of a volume and whenever its store \
        is read: mount, restore, snapshot list --store, verify. SNAPFS_KEY=HEX works too.")]
    Keygen {
        /// Where to write the key; must not exist.
        file: PathBuf,
    },
    /// Fetch every block of a volume's live files into the local disk now, so later reads
    /// are local (like initializing an EBS volume made from a snapshot).
    #[command(after_help = "Example:\n  \
        snapfs mount ~/copy --data ~/.local/share/copy --from s3://my-bucket/laptop@friday\n  \
        snapfs hydrate ~/copy")]
    Hydrate { mountpoint: PathBuf },
    /// Show what changed between two snapshots, or since a snapshot (like `zfs diff`).
    #[command(
        override_usage = "snapfs diff [OPTIONS] [MOUNTPOINT] <FROM> [TO]",
        after_help = "Output: one line per path, `+` added, `-` removed, `M` modified, \
        `R` renamed (old -> new). In a path, a backslash, a control character and a byte \
        that is not UTF-8 read as `\\` and three octal digits (a newline is \\012).\n\n\
        Examples:\n  \
        snapfs diff ~/work monday tuesday\n  \
        snapfs diff ~/work monday                  # monday against the live volume\n  \
        snapfs diff monday tuesday --data /srv/vol1\n\n\
        Of two arguments, the first is MOUNTPOINT if it has a `/` (a snapshot's name never \
        has one) or a snapfs volume is mounted there; otherwise they are FROM and TO."
    )]
    Diff {
        /// A running snapfs mount, as `snapshot create` takes it (the same as --mount).
        /// Given alone, or first of two that do not name a mount, it is FROM.
        #[arg(value_name = "MOUNTPOINT")]
        first: OsString,
        /// The older snapshot, after MOUNTPOINT.
        #[arg(value_name = "FROM")]
        second: Option<OsString>,
        /// The newer snapshot [default: the live volume, with every operation that has
        /// returned; a file still open shows its writes once closed, or within 3 s].
        #[arg(value_name = "TO", conflicts_with_all = ["data", "mount"])]
        third: Option<OsString>,
        #[command(flatten)]
        volume: VolumeSource,
    },
    /// Send what pending snapshots still need to the volume's store, without a mount, and
    /// exit when none is pending (or after --timeout). For a volume that took snapshots
    /// offline (a laptop): run it from cron once the network is back.
    #[command(after_help = "Examples:\n  \
        snapfs upload --data ~/.local/share/snapfs --timeout 30m\n  \
        snapfs upload --data /srv/vol1 --json         # a summary for scripts\n\n\
        The volume must not be mounted (a mount uploads by itself). A progress bar shows on \
        a terminal.\n\n\
        Exit status: 0 every pending snapshot completed, 1 an upload failed (the snapshot is \
        `failed`, its reason printed), 2 the upload could not run (mounted, no volume, store unreachable or \
        refused), 3 --timeout came first (what was sent is kept; the next run or mount goes on).")]
    Upload {
        /// The volume's data dir [default: as for `snapfs mount`].
        #[arg(long, value_name = "DIR")]
        data: Option<PathBuf>,
        /// The volume's store, as at mount: only needed if it was never mounted with one.
        #[arg(long, value_name = "URL", value_parser = parse_store_url)]
        store: Option<store::StoreUrl>,
        /// Stop after this long, e.g. 90s, 30m, 2h [default: until done].
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        timeout: Option<std::time::Duration>,
        /// Most bytes per second to send, e.g. 1M [default: no limit].
        #[arg(long, value_name = "BYTES_PER_SEC", value_parser = parse_size)]
        upload_limit: Option<u64>,
        /// Print a JSON summary at the end (no progress bar).
        #[arg(long)]
        json: bool,
    },
    /// Look after a volume's store: free the bytes no snapshot needs.
    #[command(subcommand)]
    Store(StoreCommand),
    /// Show whether a volume's backups are current: mounted or not, its store and whether it
    /// answers, pending snapshots with what is left, the upload rate and ETA, the last
    /// completed snapshot and its age, the last error, local disk used.
    #[command(after_help = "Examples:\n  \
        snapfs status ~/work\n  \
        snapfs status --data /srv/vol1 --json\n  \
        snapfs status --data /srv/vol1 --max-age 26h || mail -s 'backups behind' root < /dev/null\n\n\
        Exit status: 0 backups are current (a snapshot has completed, none is pending, the \
        newest finished upload completed, the store answers, and with --max-age the last \
        completed snapshot is recent enough), 1 they are not (the reasons are printed), 2 \
        the status could not be read. The store gets 5 s to answer a listing; while \
        snapshots upload, the rate is measured over --sample.")]
    Status {
        /// A running snapfs mount; its data dir is read.
        #[arg(value_name = "MOUNTPOINT", conflicts_with = "data")]
        mountpoint: Option<PathBuf>,
        /// The volume's data dir [default: as for `snapfs mount`].
        #[arg(long, value_name = "DIR")]
        data: Option<PathBuf>,
        /// Not current if the last completed snapshot is older than this, e.g. 26h.
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        max_age: Option<std::time::Duration>,
        /// How long to watch uploads for their rate, e.g. 2s; 0 skips it.
        #[arg(long, value_name = "DURATION", value_parser = parse_duration,
              default_value = "2s")]
        sample: std::time::Duration,
        /// Print the status as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum SnapshotCommand {
    /// Take a snapshot of a mounted volume, at once (same as mkdir MOUNTPOINT/.snapshots/NAME).
    #[command(
        after_help = "Example:\n  snapfs snapshot create ~/work before-upgrade --tag reason=upgrade"
    )]
    Create {
        mountpoint: PathBuf,
        name: OsString,
        /// A tag to attach, KEY=VALUE; repeat for more.
        #[arg(long = "tag", value_name = "KEY=VALUE")]
        tags: Vec<String>,
        /// Print the new snapshot as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete a snapshot of a mounted volume, freeing what only it holds (same as rmdir).
    #[command(after_help = "Example:\n  snapfs snapshot delete ~/work before-upgrade")]
    Delete { mountpoint: PathBuf, name: OsString },
    /// Set or remove tags of a snapshot of a mounted volume.
    #[command(after_help = "Example:\n  snapfs snapshot tag ~/work nightly keep=yes --remove tmp")]
    Tag {
        mountpoint: PathBuf,
        name: OsString,
        /// Tags to set, KEY=VALUE.
        #[arg(value_name = "KEY=VALUE")]
        tags: Vec<String>,
        /// A tag key to remove; repeat for more.
        #[arg(long = "remove", value_name = "KEY")]
        remove: Vec<String>,
    },
    /// List snapshots with their state, size, lock and the space only each holds. Works
    /// with or without a running mount.
    #[command(after_help = "Examples:\n  snapfs snapshot list ~/work\n  \
        snapfs snapshot list --data /srv/vol1 --json\n  \
        snapfs snapshot list --trash ~/work   # the recycle bin\n  \
        snapfs snapshot list --store s3://my-bucket/laptop   # from the bucket alone\n\n\
        Names are shown on one line each: a backslash, a control character and each byte \
        that is not UTF-8 read as `\\` and three octal digits. Give such a name to the \
        other commands as its bytes: one listed as v\\351 is $'v\\351' in bash.")]
    List {
        /// A running snapfs mount; its data dir is read (the same as --mount).
        #[arg(value_name = "MOUNTPOINT", conflicts_with_all = ["data", "mount", "store"])]
        mountpoint: Option<PathBuf>,
        #[command(flatten)]
        volume: VolumeSource,
        /// List the recycle bin instead: deleted snapshots with their deletion time, expiry
        /// and what purging each would free, and what the bin holds in all.
        #[arg(long, conflicts_with = "store")]
        trash: bool,
        /// List the completed snapshots in an object store instead, from the bucket alone
        /// (e.g. on a new machine): s3://BUCKET[/PREFIX] or file:///DIR.
        #[arg(long, value_name = "URL", value_parser = parse_store_url,
              conflicts_with_all = ["data", "mount"])]
        store: Option<store::StoreUrl>,
        #[arg(long)]
        json: bool,
    },
    /// Apply the policy's retention now: delete the snapshots no --keep-* rule keeps.
    /// Prints every snapshot, kept (and by which rules) or deleted.
    #[command(after_help = "Examples:\n  snapfs snapshot prune ~/work --dry-run\n  \
        snapfs snapshot prune ~/work --json")]
    Prune {
        mountpoint: PathBuf,
        /// Only show what would be deleted.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
    /// Restore a snapshot from the recycle bin of a mounted volume, under its name or a new
    /// one (same as mv MOUNTPOINT/.snapshots/.trash/NAME MOUNTPOINT/.snapshots/NEW).
    #[command(
        after_help = "Examples:\n  snapfs snapshot undelete ~/work nightly\n  \
        snapfs snapshot undelete ~/work nightly --as nightly-old   # 'nightly' exists again"
    )]
    Undelete(lifecycle::UndeleteArgs),
    /// Delete a snapshot of the recycle bin for good, freeing what only it holds (same as
    /// rmdir MOUNTPOINT/.snapshots/.trash/NAME).
    #[command(after_help = "Example:\n  snapfs snapshot purge ~/work nightly")]
    Purge(lifecycle::PurgeArgs),
    /// Lock a snapshot so that nothing deletes it (rmdir, retention, the recycle bin) before
    /// a time. Sets the user.snapfs.lock xattr of MOUNTPOINT/.snapshots/NAME.
    #[command(
        after_help = "Examples:\n  snapfs snapshot lock ~/work monthly --for 30d\n  \
        snapfs snapshot lock ~/work audit --until 2027-06-30T00:00:00Z --mode compliance --cool-off 1h\n\n\
        A compliance lock, after its cool-off, can only be extended (lock again with a later \
        time): not shortened or removed, by anyone. An expired lock no longer holds."
    )]
    Lock(lifecycle::LockArgs),
    /// Remove a snapshot's lock (a governance lock, or a compliance lock in its cool-off).
    #[command(after_help = "Example:\n  snapfs snapshot unlock ~/work monthly")]
    Unlock(lifecycle::UnlockArgs),
    /// Show one snapshot in detail. Works with or without a running mount.
    #[command(
        override_usage = "snapfs snapshot show [OPTIONS] [MOUNTPOINT] <NAME>",
        after_help = "Examples:\n  snapfs snapshot show ~/work nightly\n  \
        snapfs snapshot show nightly --data /srv/vol1 --json"
    )]
    Show {
        /// A running snapfs mount, as `snapshot create` takes it (the same as --mount).
        /// Given alone, it is NAME, a snapshot of the volume that --mount or --data names
        /// [default: as for `snapfs mount`].
        #[arg(value_name = "MOUNTPOINT")]
        mountpoint: PathBuf,
        /// The snapshot to show, after MOUNTPOINT.
        #[arg(value_name = "NAME", conflicts_with_all = ["data", "mount"])]
        name: Option<OsString>,
        #[command(flatten)]
        volume: VolumeSource,
        /// Print the snapshot as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Set (replace) the snapshot policy of a mounted volume: a snapshot every DURATION
    /// (or at the times of a --cron schedule), named auto-YYYYMMDDTHHMMSSZ and tagged snapfs.policy=scheduled; after each one
    /// completes its upload, retention deletes the scheduled snapshots no --keep-* rule
    /// keeps (never a pending one, the newest completed one, or one taken by hand unless
    /// --prune-manual). A slot missed while unmounted is taken once at the next mount.
    #[command(after_help = "Examples:\n  \
        snapfs policy set ~/work --every 1h --keep-hourly 24 --keep-daily 30\n  \
        snapfs policy set ~/work --every 15m --keep-last 4 --keep-within 2d --keep-tag keep=yes\n  \
        snapfs policy set ~/work --cron '30 2 * * 1-5' --keep-daily 10   # 02:30 UTC on weekdays")]
    Set {
        mountpoint: PathBuf,
        #[command(flatten)]
        rules: policy_cli::PolicyArgs,
    },
    /// Show the snapshot policy of a volume, mounted or not.
    #[command(after_help = "Examples:\n  snapfs policy show ~/work\n  \
        snapfs policy show --data /srv/vol1 --json")]
    Show {
        #[command(flatten)]
        volume: MountOrData,
        #[arg(long)]
        json: bool,
    },
    /// Remove the snapshot policy of a mounted volume: no more scheduled snapshots and no
    /// retention; the snapshots taken stay.
    #[command(after_help = "Example:\n  snapfs policy clear ~/work")]
    Clear {
        mountpoint: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum StoreCommand {
    /// Free the store's unused bytes now, without a mount.
    ///
    /// Deletes the packs no snapshot needs a block of, and copies the live blocks of
    /// mostly unused packs into new packs, until the unused bytes are within --max-unused
    /// of the live ones. Once more than 16 packs are small (each upload ends with one), it
    /// merges them into full ones, and small index objects too. A mount does the same by
    /// itself while its uploader is idle; deleting snapshots is what makes packs unused.
    #[command(after_help = "Examples:\n  \
        snapfs store prune ~/work --dry-run                # what it would free (mounted)\n  \
        snapfs store prune --data /srv/vol1 --max-unused 0   # leave nothing unused\n  \
        snapfs store prune --data /srv/vol1 --convert        # pack a format-1 store\n\n\
        Every step keeps each needed block reachable from the bucket alone: new packs and \
        index objects are written before old ones are deleted, so an interrupted prune \
        loses nothing and the next prune or mount goes on. --dry-run reads only the \
        catalog and works on a mounted volume.\n\n\
        Exit status: 0 done, 2 it could not run (mounted, no volume, store unreachable or \
        refused).")]
    Prune {
        #[command(flatten)]
        volume: MountOrData,
        /// The volume's store, as at mount: only needed if it was never mounted with one.
        #[arg(long, value_name = "URL", value_parser = parse_store_url)]
        store: Option<store::StoreUrl>,
        /// Repack until the bytes no snapshot needs are at most this percentage of the
        /// bytes they do need.
        #[arg(long, value_name = "PERCENT", default_value_t = gc::DEFAULT_MAX_UNUSED_PERCENT,
              value_parser = clap::value_parser!(u8).range(0..=100))]
        max_unused: u8,
        /// First copy the blocks and directory trees the store holds as objects of their
        /// own (format 1: written by snapfs before packs, or by `verify --repair`) into
        /// packs, then delete those objects. Reads the local copies where the disk has
        /// them, else one GET per object.
        #[arg(long)]
        convert: bool,
        /// Only report what would be deleted, copied and freed.
        #[arg(long)]
        dry_run: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Commands run around each snapshot; the volume remembers them like its store.
#[derive(Args)]
#[group(conflicts_with = "read_only")]
struct HookArgs {
    /// Run CMD (with /bin/sh) before each snapshot, before writers are held: it may write
    /// to the volume, e.g. checkpoint a database on it. If it fails or times out, no
    /// snapshot is taken (mkdir fails with EIO) unless --pre-snapshot-failure proceed.
    /// Environment: SNAPFS_SNAPSHOT, SNAPFS_MOUNTPOINT, SNAPFS_DATA. The volume remembers
    /// its hooks and their settings, like its store; '' removes it.
    #[arg(long, value_name = "CMD")]
    pre_snapshot: Option<String>,
    /// Run CMD once each snapshot is taken (state pending: its upload goes on after).
    /// Environment: SNAPFS_SNAPSHOT, SNAPFS_SNAPSHOT_ID, SNAPFS_STATE, SNAPFS_CREATED,
    /// SNAPFS_MOUNTPOINT, SNAPFS_DATA. '' removes it.
    #[arg(long, value_name = "CMD")]
    post_snapshot: Option<String>,
    /// Seconds a hook may run before its process group is killed [default: 60, or as
    /// remembered].
    #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..))]
    hook_timeout: Option<u64>,
    /// Whether a snapshot is taken when the pre-snapshot hook fails [default: abort, or as
    /// remembered].
    #[arg(long, value_name = "abort|proceed", value_parser = str::parse::<PreFailure>)]
    pre_snapshot_failure: Option<PreFailure>,
}

impl HookArgs {
    fn options(self) -> HookOptions {
        HookOptions {
            pre: self.pre_snapshot,
            post: self.post_snapshot,
            timeout: self.hook_timeout.map(std::time::Duration::from_secs),
            on_pre_failure: self.pre_snapshot_failure,
        }
    }
}

/// Which volume to read: a data dir, or the one behind a running mount.
#[derive(Args)]
struct VolumeSource {
    /// The volume's data dir [default: as for `snapfs mount`].
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// A running snapfs mount; its data dir is read.
    #[arg(long, value_name = "MOUNTPOINT", conflicts_with = "data")]
    mount: Option<PathBuf>,
}

/// A volume named by its running mount (MOUNTPOINT) or its data dir (--data).
#[derive(Args)]
struct MountOrData {
    /// A running snapfs mount, whose data dir is read.
    #[arg(conflicts_with = "data")]
    mountpoint: Option<PathBuf>,
    /// The volume's data dir, mounted or not [default: as for `snapfs mount`].
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
}

impl MountOrData {
    fn source(self) -> VolumeSource {
        VolumeSource {
            data: self.data,
            mount: self.mountpoint,
        }
    }
}

impl VolumeSource {
    /// This source, or the running mount at `mountpoint` if the command was given one as
    /// an argument (it conflicts with --data and --mount).
    fn or_mountpoint(self, mountpoint: Option<PathBuf>) -> VolumeSource {
        VolumeSource {
            mount: mountpoint.or(self.mount),
            ..self
        }
    }

    fn data_dir(&self) -> Result<PathBuf, Box<dyn std::error::Error>> {
        Ok(match (&self.data, &self.mount) {
            (Some(dir), _) => dir.clone(),
            (None, Some(mountpoint)) => daemon::data_dir_of_mount(mountpoint)?,
            (None, None) => default_data_dir()?,
        })
    }

    fn open(&self) -> Result<Inspector, Box<dyn std::error::Error>> {
        let dir = self.data_dir()?;
        Ok(Inspector::open(&dir)?)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum SnapdirMode {
    Hidden,
    Visible,
}

/// Parses sizes such as 65536, 64K, 256KiB or 1M.
fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (number, unit) = number_and_unit(text, "a size (try 256K or 1M)")?;
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

fn parse_store_url(text: &str) -> Result<store::StoreUrl, String> {
    store::StoreUrl::parse(text).map_err(|e| e.to_string())
}

/// `--from URL@SNAPSHOT`: the name after the last `@` is bytes, as snapshot names are.
fn parse_from(text: OsString) -> Result<(store::StoreUrl, Vec<u8>), String> {
    let bytes = text.as_bytes();
    let not_from = || {
        format!(
            "'{}' is not URL@SNAPSHOT (e.g. s3://bucket/laptop@monday)",
            escaped(bytes)
        )
    };
    let at = bytes
        .iter()
        .rposition(|&b| b == b'@')
        .ok_or_else(not_from)?;
    let (url, snapshot) = (&bytes[..at], &bytes[at + 1..]);
    if snapshot.is_empty() {
        return Err(not_from());
    }
    let url = std::str::from_utf8(url).map_err(|_| not_from())?;
    Ok((parse_store_url(url)?, snapshot.to_vec()))
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

fn parse_pack_size(text: &str) -> Result<usize, String> {
    let size = parse_size(text)?;
    if !(1 << 20..=256 << 20).contains(&size) {
        return Err(format!("pack size must be from 1M to 256M, not {text}"));
    }
    Ok(size as usize)
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

/// `snapfs mount`'s arguments.
#[derive(Args)]
struct MountCommand {
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
    /// Where snapshots are uploaded: s3://BUCKET[/PREFIX] (AWS credentials, region and
    /// AWS_ENDPOINT_URL from the usual environment and profiles) or file:///DIR. Only
    /// needed at the first mount: the volume remembers it [default: DATA/store].
    #[arg(long, value_name = "URL", value_parser = parse_store_url)]
    store: Option<store::StoreUrl>,
    /// Store requests in flight at once.
    #[arg(long, value_name = "N", default_value_t = 16,
          value_parser = clap::value_parser!(u16).range(1..=256))]
    upload_concurrency: u16,
    /// zstd level for uploaded blocks and manifests (1 fastest .. 19 smallest).
    #[arg(long, value_name = "LEVEL", default_value_t = 3,
          value_parser = clap::value_parser!(i32).range(1..=19))]
    compression_level: i32,
    /// Most bytes per second to send to the store, e.g. 10M (like restic's
    /// --limit-upload) [default: no limit].
    #[arg(long, value_name = "BYTES_PER_SEC", value_parser = parse_size)]
    upload_limit: Option<u64>,
    /// Percent of the time the uploader works while the mount is serving requests (it
    /// reads blocks, compresses them and, for a file:// store, writes to the same disks):
    /// the rest is left to the files you work on. 100 never yields; an idle mount always
    /// uploads at full speed.
    #[arg(long, value_name = "PERCENT", default_value_t = snapfs::upload::DEFAULT_BUSY_SHARE,
          value_parser = clap::value_parser!(u8).range(1..=100))]
    upload_share: u8,
    /// Size of the pack objects blocks travel to the store in, e.g. 32M: larger packs
    /// mean fewer requests (each costs money on S3), smaller ones less read back on a
    /// cache miss [default: 16M].
    #[arg(long, value_name = "SIZE", value_parser = parse_pack_size)]
    pack_size: Option<usize>,
    /// While the uploader is idle, repack the store's packs (most unused first) until the
    /// bytes no snapshot needs are at most this percentage of those they need; packs no
    /// snapshot needs are deleted whatever it is. 100 leaves repacking to `snapfs store
    /// prune`.
    #[arg(long, value_name = "PERCENT", default_value_t = gc::DEFAULT_MAX_UNUSED_PERCENT,
          value_parser = clap::value_parser!(u8).range(0..=100))]
    max_unused: u8,
    /// Most local disk for blocks already safe in the store, e.g. 10G: the least
    /// recently used are evicted and fetched again when read. Blocks not yet uploaded
    /// always stay [default: keep everything].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    cache_size: Option<u64>,
    /// Make a NEW volume (an empty --data dir) from another volume's completed snapshot,
    /// like an EBS volume from a snapshot: usable at once, each block fetched from that
    /// store on first read (`snapfs hydrate` fetches them all). The source is never
    /// changed; blocks the two share are not uploaded again.
    #[arg(long, value_name = "URL@SNAPSHOT",
          value_parser = OsStringValueParser::new().try_map(parse_from))]
    from: Option<(store::StoreUrl, Vec<u8>)>,
    /// Follow the --store of a volume another machine writes, read-only: its completed
    /// snapshots appear in .snapshots (new ones as they complete) and the live tree is
    /// the latest. Needs its own --data dir; nothing is ever written to the store.
    #[arg(long, requires = "store", conflicts_with = "from")]
    read_only: bool,
    /// How often a --read-only mount looks for new snapshots, in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..))]
    follow_interval: u64,
    /// Serve Prometheus metrics at http://ADDR/metrics: PORT (on 127.0.0.1, e.g. 9477)
    /// or HOST:PORT. Requests by operation with latencies, bytes read and written,
    /// snapshots by state, pending bytes, uploads, store requests, the block cache.
    #[arg(long, value_name = "ADDR", value_parser = metrics::parse_address)]
    metrics: Option<std::net::SocketAddr>,
    /// Milliseconds the catalog gathers operations before it commits them together (like
    /// ext4's commit=). fsync, fsyncdir, snapshots and unmount commit at once, so this only
    /// bounds what a kill -9 of the daemon can take of what nothing synced. 0 commits
    /// every operation on its own: each one that returned survives a kill -9, at several
    /// times the cost of a create, rename or unlink.
    #[arg(long, value_name = "MS", default_value_t = 25,
          value_parser = clap::value_parser!(u64).range(0..=10_000))]
    commit_interval: u64,
    #[command(flatten)]
    hooks: HookArgs,
    /// Keep deleted snapshots (rmdir, `snapshot delete`, retention) in a recycle bin for
    /// this long before they are purged: a number of days, or 90s, 12h, 2w. Browse them
    /// in MOUNTPOINT/.snapshots/.trash; see `snapshot list --trash`, `undelete`, `purge`.
    /// The volume remembers it; 0 turns the bin off.
    #[arg(long, value_name = "DURATION", value_parser = lifecycle::parse_trash_days)]
    trash_days: Option<std::time::Duration>,
    /// Take a local checkpoint this often while the volume changes (an idle volume takes
    /// none), e.g. 5s or 1m; `off` for none. Checkpoints are never uploaded: browse them
    /// in MOUNTPOINT/.snapshots/.checkpoints, promote one with `snapfs checkpoint promote`.
    #[arg(long, value_name = "DURATION|off", default_value = "10s",
          value_parser = parse_checkpoint_every)]
    checkpoint_every: CheckpointEvery,
    /// How long checkpoints are kept: all of them for its newest sixth, then one per
    /// sixtieth of it (with 1h: all for 10 min, then one a minute), none beyond it.
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = parse_duration)]
    checkpoint_window: std::time::Duration,
}

/// `--checkpoint-every`: `None` for no checkpoints.
#[derive(Clone, Copy)]
struct CheckpointEvery(Option<std::time::Duration>);

/// A duration, or `off` (or 0) for no checkpoints.
fn parse_checkpoint_every(text: &str) -> Result<CheckpointEvery, String> {
    if text.trim() == "off" {
        return Ok(CheckpointEvery(None));
    }
    Ok(CheckpointEvery(
        Some(parse_duration(text)?).filter(|every| !every.is_zero()),
    ))
}

impl MountCommand {
    fn run(self) -> Result<(), Box<dyn std::error::Error>> {
        let data_dir = match self.data {
            Some(dir) => dir,
            None => default_data_dir()?,
        };
        daemon::mount(MountArgs {
            mountpoint: self.mountpoint,
            data_dir,
            foreground: self.foreground,
            allow_other: self.allow_other,
            volume: volume::Options {
                block_size: self.block_size,
                snapdir_visible: self.snapdir == SnapdirMode::Visible,
                ..volume::Options::default()
            },
            store: self.store,
            upload: UploadOptions {
                concurrency: usize::from(self.upload_concurrency),
                compression_level: self.compression_level,
                limit: self.upload_limit,
                busy_share: self.upload_share,
                pack_size: self.pack_size.unwrap_or(snapfs::upload::DEFAULT_PACK_SIZE),
                gc: gc::GcPolicy {
                    max_unused_percent: self.max_unused,
                    ..gc::GcPolicy::default()
                },
            },
            cache_size: self.cache_size,
            from: self.from,
            read_only: self.read_only,
            follow_interval: std::time::Duration::from_secs(self.follow_interval),
            metrics: self.metrics,
            commit_interval: std::time::Duration::from_millis(self.commit_interval),
            hooks: self.hooks.options(),
            trash_retention: self.trash_days,
            checkpoints: self
                .checkpoint_every
                .0
                .filter(|_| !self.checkpoint_window.is_zero())
                .map(|every| volume::CheckpointPolicy {
                    every,
                    window: self.checkpoint_window,
                }),
        })?;
        Ok(())
    }
}

fn run(cli: Cli) -> Result<ExitCode, Box<dyn std::error::Error>> {
    match cli.command {
        Command::Mount(command) => command.run()?,
        Command::InstallMountHelper { dir } => {
            let program = std::env::current_exe()?;
            for link in mount_helper::install(&dir, &program)
                .map_err(|e| format!("cannot link the helpers in {}: {e}", dir.display()))?
            {
                println!("{} -> {}", link.display(), program.display());
            }
        }
        Command::Umount { mountpoint } => daemon::unmount(&mountpoint)?,
        Command::Hydrate { mountpoint } => {
            let bar = progress_bar(false);
            let (files, bytes) = control::hydrate(
                &mountpoint,
                |total| bar.as_ref().map_or((), |b| b.set_length(total)),
                |n| bar.as_ref().map_or((), |b| b.inc(n)),
            )?;
            if let Some(bar) = &bar {
                bar.finish_and_clear();
            }
            let files = counted(files, "file", "files");
            eprintln!("hydrated {files} ({})", human_bytes(bytes));
        }
        Command::Snapshot(command) => snapshot(command)?,
        Command::Policy(PolicyCommand::Set { mountpoint, rules }) => {
            policy_cli::set(&mountpoint, &rules)?
        }
        Command::Policy(PolicyCommand::Show { volume, json }) => {
            policy_cli::show(volume.source(), json)?
        }
        Command::Policy(PolicyCommand::Clear { mountpoint, json }) => {
            policy_cli::clear(&mountpoint, json)?
        }
        Command::Checkpoint(command) => command.run()?,
        Command::Restore {
            first,
            second,
            third,
            volume,
            store,
            overwrite,
            trash,
            json,
        } => {
            // Three arguments are a mountpoint, WHAT and DEST; two are WHAT and DEST.
            let (volume, what, dest) = match third {
                Some(dest) => (volume.or_mountpoint(Some(first.into())), second, dest),
                None => (volume, first, second.into()),
            };
            let store = store.as_ref().map(|url| (url, trash));
            restore(what.as_bytes(), &dest, &volume, store, overwrite, json)?
        }
        Command::Keygen { file } => {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut out = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&file)
                .map_err(|e| format!("{}: {e}", file.display()))?;
            writeln!(out, "{}", store::Key::generate().to_hex())
                .and_then(|()| out.sync_all())
                .map_err(|e| format!("{}: {e}", file.display()))?;
            eprintln!(
                "wrote a new key to {}: set SNAPFS_KEY_FILE to it, and keep a copy somewhere safe",
                file.display()
            );
        }
        Command::Verify {
            mountpoint,
            volume,
            store,
            deep,
            repair,
            json,
        } => {
            let volume = volume.or_mountpoint(mountpoint);
            return verify(&volume, store.as_ref(), Options { deep, repair }, json);
        }
        Command::Upload {
            data,
            store,
            timeout,
            upload_limit,
            json,
        } => {
            let dir = match data {
                Some(dir) => dir,
                None => default_data_dir()?,
            };
            let options = DrainOptions {
                store,
                upload: UploadOptions {
                    limit: upload_limit,
                    ..UploadOptions::default()
                },
                timeout,
            };
            return upload(&dir, options, json);
        }
        Command::Store(StoreCommand::Prune {
            volume,
            store,
            max_unused,
            convert,
            dry_run,
            json,
        }) => {
            let dir = volume.source().data_dir()?;
            let options = PruneOptions {
                store,
                max_unused_percent: max_unused,
                convert,
                dry_run,
            };
            return prune(&dir, options, json);
        }
        Command::Status {
            mountpoint,
            data,
            max_age,
            sample,
            json,
        } => {
            let source = VolumeSource {
                data,
                mount: mountpoint,
            };
            let options = StatusOptions {
                sample,
                store_timeout: std::time::Duration::from_secs(5),
                max_age,
            };
            return status(&source.data_dir()?, &options, json);
        }
        Command::Diff {
            first,
            second,
            third,
            volume,
        } => {
            let (volume, from, to) = diff_arguments(first, second, third, volume)?;
            if to.is_none()
                && let Some(mountpoint) = volume
                    .mount
                    .clone()
                    .or_else(|| daemon::mountpoint_of(&volume.data_dir().ok()?))
            {
                control::settle(&mountpoint)?;
            }
            let inspector = volume.open()?;
            let changes = inspector
                .diff(from.as_bytes(), to.as_ref().map(|t| t.as_bytes()))
                .map_err(|e| missing_snapshot(e, &[Some(&from), to.as_ref()]))?;
            for change in changes {
                match &change {
                    Change::Renamed { from, to } => {
                        println!("R\t{} -> {}", escaped(from), escaped(to))
                    }
                    Change::Added(p) | Change::Removed(p) | Change::Modified(p) => {
                        println!("{}\t{}", change.code(), escaped(p))
                    }
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn snapshot(command: SnapshotCommand) -> Result<(), Box<dyn std::error::Error>> {
    match command {
        SnapshotCommand::Create {
            mountpoint,
            name,
            tags,
            json,
        } => {
            let tags = control::parse_tags(&tags)?;
            control::create_snapshot(&mountpoint, &name, &tags)?;
            let source = VolumeSource {
                data: None,
                mount: Some(mountpoint),
            };
            let info = source.open()?.snapshot(name.as_bytes())?;
            if json {
                json::print(&json::Snapshot::of(&info))?;
            } else {
                println!(
                    "snapshot '{}' taken (id {}, {})",
                    escaped(&info.name),
                    info.id,
                    info.state
                );
            }
        }
        SnapshotCommand::Delete { mountpoint, name } => {
            control::delete_snapshot(&mountpoint, &name)?;
            println!("snapshot '{}' deleted", escaped(name.as_bytes()));
        }
        SnapshotCommand::Tag {
            mountpoint,
            name,
            tags,
            remove,
        } => {
            let tags = control::parse_tags(&tags)?;
            control::tag_snapshot(&mountpoint, &name, &tags, &remove)?;
        }
        SnapshotCommand::List {
            store: Some(url),
            json,
            ..
        } => {
            let runtime = store_runtime()?;
            let listing = store::StoreChain::open(runtime.handle(), &url, None)?.list()?;
            for damaged in &listing.damaged {
                eprintln!("snapfs: warning: {damaged}");
            }
            // Snapshots in the volume's recycle bin are deleted as far as the store goes.
            let manifests: Vec<_> = listing
                .snapshots
                .into_iter()
                .filter(|m| m.trash.is_none())
                .collect();
            let damaged = listing.damaged.len();
            if json {
                let items: Vec<_> = manifests.iter().map(json::StoredSnapshot::of).collect();
                json::print(&items)?;
            } else {
                println!(
                    "{:<24} {:>6} {:<24} {:>10}  TAGS",
                    "NAME", "ID", "CREATED", "LOGICAL"
                );
                for m in &manifests {
                    println!(
                        "{:<24} {:>6} {:<24} {:>10}  {}",
                        escaped(&m.name),
                        m.id,
                        volume::rfc3339(m.created),
                        human_bytes(m.logical_bytes),
                        tags_text(&m.tags)
                    );
                }
            }
            if damaged > 0 {
                return Err(format!("{damaged} snapshot objects in {url} are damaged").into());
            }
        }
        SnapshotCommand::List {
            mountpoint,
            volume,
            json,
            trash: true,
            ..
        } => lifecycle::list_trash(&volume.or_mountpoint(mountpoint).open()?, json)?,
        SnapshotCommand::Undelete(args) => lifecycle::undelete(args)?,
        SnapshotCommand::Purge(args) => lifecycle::purge(args)?,
        SnapshotCommand::Lock(args) => lifecycle::lock(args)?,
        SnapshotCommand::Unlock(args) => lifecycle::unlock(args)?,
        SnapshotCommand::List {
            mountpoint,
            volume,
            json,
            ..
        } => {
            let inspector = volume.or_mountpoint(mountpoint).open()?;
            let snapshots = inspector.snapshots()?;
            let plan = inspector.retention_plan()?.map(|(_, plan)| plan);
            let verdict = |name: &[u8]| plan.as_ref()?.iter().find(|v| v.name == name);
            if json {
                let items: Vec<_> = snapshots
                    .iter()
                    .map(|s| json::Snapshot::of(s).with_retention(verdict(&s.name)))
                    .collect();
                json::print(&items)?;
            } else {
                // The columns of free text are as wide as their longest entry.
                let names: Vec<String> = snapshots.iter().map(|s| escaped(&s.name)).collect();
                let locks: Vec<String> = snapshots
                    .iter()
                    .map(|s| lifecycle::lock_text(s.lock.as_ref()))
                    .collect();
                let verdicts: Vec<String> = snapshots
                    .iter()
                    .map(|s| policy_cli::column(verdict(&s.name)))
                    .collect();
                let width = |header: &str, texts: &[String]| {
                    texts
                        .iter()
                        .map(|t| t.chars().count())
                        .chain([header.len()])
                        .max()
                        .unwrap_or_default()
                };
                let (name_width, lock_width) = (width("NAME", &names), width("LOCK", &locks));
                let retention_width = width("RETENTION", &verdicts);
                // With a policy, a RETENTION column before the tags.
                let retention = |text: &str| match plan {
                    Some(_) => format!("{text:<retention_width$}  "),
                    None => String::new(),
                };
                println!(
                    "{:<name_width$} {:<10} {:>8} {:<24} {:>10} {:>10}  {:<lock_width$}  {}TAGS",
                    "NAME",
                    "STATE",
                    "SENT",
                    "CREATED",
                    "LOGICAL",
                    "EXCLUSIVE",
                    "LOCK",
                    retention("RETENTION")
                );
                for (i, s) in snapshots.iter().enumerate() {
                    println!(
                        "{:<name_width$} {:<10} {:>8} {:<24} {:>10} {:>10}  {:<lock_width$}  {}{}",
                        names[i],
                        s.state,
                        sent_percent(&s.upload),
                        volume::rfc3339(s.created),
                        human_bytes(s.logical_bytes),
                        human_bytes(s.exclusive_bytes),
                        locks[i],
                        retention(&verdicts[i]),
                        tags_text(&s.tags)
                    );
                }
                let usage = inspector.store_usage()?;
                if usage.packs > 0 {
                    println!("\n{}", store_usage_text(&usage));
                }
            }
        }
        SnapshotCommand::Prune {
            mountpoint,
            dry_run,
            json,
        } => policy_cli::prune(&mountpoint, dry_run, json)?,
        SnapshotCommand::Show {
            mountpoint,
            name,
            volume,
            json,
        } => {
            // One argument is the snapshot's name; two are a mountpoint and a name.
            let (volume, name) = match name {
                Some(name) => (volume.or_mountpoint(Some(mountpoint)), name),
                None => (volume, mountpoint.into_os_string()),
            };
            let inspector = volume.open()?;
            let info = inspector
                .snapshot(name.as_bytes())
                .map_err(|e| missing_snapshot(e, &[Some(&name)]))?;
            if json {
                json::print(&json::Snapshot::of(&info))?;
            } else {
                println!("name:      {}", escaped(&info.name));
                println!("id:        {}", info.id);
                println!("state:     {}", info.state);
                if let Some(error) = &info.error {
                    println!("error:     {error}");
                }
                let p = &info.upload;
                println!(
                    "upload:    {} of {} in {} of {} blocks sent ({} after compression)",
                    human_bytes(p.sent_bytes),
                    p.total_bytes.map_or_else(|| "?".to_owned(), human_bytes),
                    p.sent_blocks,
                    p.total_blocks
                        .map_or_else(|| "?".to_owned(), |n| n.to_string()),
                    human_bytes(p.stored_bytes)
                );
                println!("created:   {}", volume::rfc3339(info.created));
                println!(
                    "logical:   {} ({} bytes)",
                    human_bytes(info.logical_bytes),
                    info.logical_bytes
                );
                println!(
                    "exclusive: {} ({} bytes; freed by deleting it)",
                    human_bytes(info.exclusive_bytes),
                    info.exclusive_bytes
                );
                println!("lock:      {}", lifecycle::lock_text(info.lock.as_ref()));
                println!("tags:      {}", tags_text(&info.tags));
                let usage = inspector.store_usage()?;
                if usage.packs > 0 {
                    println!("{}", store_usage_text(&usage));
                }
            }
        }
    }
    Ok(())
}

/// Sorts `snapfs diff`'s one to three arguments into the volume, FROM and TO (see its
/// --help for the rule).
fn diff_arguments(
    first: OsString,
    second: Option<OsString>,
    third: Option<OsString>,
    volume: VolumeSource,
) -> Result<(VolumeSource, OsString, Option<OsString>), Box<dyn std::error::Error>> {
    let first_is_mountpoint = |first: &OsString| {
        first.as_bytes().contains(&b'/') || daemon::data_dir_of_mount(Path::new(first)).is_ok()
    };
    Ok(match (second, third) {
        (None, _) => (volume, first, None),
        (Some(from), Some(to)) => (volume.or_mountpoint(Some(first.into())), from, Some(to)),
        (Some(second), None) if first_is_mountpoint(&first) => {
            if volume.data.is_some() || volume.mount.is_some() {
                return Err(format!(
                    "{} names a mount and so do --data or --mount: give the volume once",
                    escaped(first.as_bytes())
                )
                .into());
            }
            (volume.or_mountpoint(Some(first.into())), second, None)
        }
        (Some(to), None) => (volume, first, Some(to)),
    })
}

/// Names the snapshot a NotFound was about.
fn missing_snapshot(err: volume::Error, names: &[Option<&OsString>]) -> Box<dyn std::error::Error> {
    match err {
        volume::Error::NotFound => {
            let names: Vec<String> = names
                .iter()
                .flatten()
                .map(|name| escaped(name.as_bytes()))
                .collect();
            format!("no snapshot named {}", names.join(" or ")).into()
        }
        other => other.into(),
    }
}

fn tags_text(tags: &[(Vec<u8>, Vec<u8>)]) -> String {
    let tags: Vec<String> = tags
        .iter()
        .map(|(k, v)| format!("{}={}", escaped(k), escaped(v)))
        .collect();
    tags.join(",")
}

/// A byte progress bar (rate, ETA) on stderr, when it is a terminal and not `--json`.
fn progress_bar(json: bool) -> Option<indicatif::ProgressBar> {
    counting_bar(
        json,
        "{bar:30} {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta} {msg}",
    )
}

fn counting_bar(json: bool, template: &str) -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal;
    if json || !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(template)
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    Some(bar)
}

/// A progress bar for restores and checks, on a terminal only.
struct Bar(indicatif::ProgressBar);

impl snapfs::restore::Progress for Bar {
    fn total(&self, bytes: u64) {
        self.0.inc_length(bytes);
    }
    fn advance(&self, bytes: u64) {
        self.0.inc(bytes);
    }
}

fn restore(
    what: &[u8],
    dest: &Path,
    volume: &VolumeSource,
    store: Option<(&store::StoreUrl, bool)>,
    overwrite: bool,
    json: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    use snapfs::restore::{self, LocalSource, Options};
    use snapfs::store::{ReadError, Source, StoreSource};
    // Snapshot names may hold ':': the whole of WHAT is tried as a name first, then
    // each split at a ':' from the left, until a snapshot by that name exists.
    let splits = std::iter::once((what, &what[what.len()..])).chain(
        (0..what.len())
            .filter(|&i| what[i] == b':')
            .map(|i| (&what[..i], &what[i + 1..])),
    );
    enum From<'a> {
        /// The store, and whether the snapshot is in the recycle bin.
        Store(&'a store::StoreUrl, bool),
        Volume(PathBuf),
    }
    let from = match store {
        Some((url, trashed)) => From::Store(url, trashed),
        None => From::Volume(volume.data_dir()?),
    };
    let runtime = store_runtime()?;
    let mut missing = Vec::new();
    let mut found = None;
    for (snapshot, path) in splits {
        let opened: Result<Box<dyn Source>, _> = match &from {
            From::Store(url, false) => {
                StoreSource::open(runtime.handle(), url, snapshot).map(|s| Box::new(s) as _)
            }
            From::Store(url, true) => {
                StoreSource::open_trashed(runtime.handle(), url, snapshot).map(|s| Box::new(s) as _)
            }
            From::Volume(dir) => {
                LocalSource::open(runtime.handle(), dir, snapshot).map(|s| Box::new(s) as _)
            }
        };
        match opened {
            Err(e @ ReadError::NoSnapshot(_)) => missing.push(e),
            result => {
                found = Some((result?, path));
                break;
            }
        }
    }
    let Some((source, path)) = found else {
        // Say what the usual reading (SNAPSHOT:PATH at the first ':') did not find.
        let usual = missing.len().min(2).saturating_sub(1);
        return Err(missing.swap_remove(usual).into());
    };
    let bar = progress_bar(json).map(Bar);
    let options = Options {
        overwrite,
        // SAFETY: geteuid cannot fail.
        owners: unsafe { libc::geteuid() } == 0,
    };
    let started = std::time::Instant::now();
    let progress: &dyn restore::Progress = match &bar {
        Some(bar) => bar,
        None => &(),
    };
    let report = restore::restore(&*source, path, dest, &options, progress)?;
    if let Some(bar) = &bar {
        bar.0.finish_and_clear();
    }
    let seconds = started.elapsed().as_secs_f64();
    if json {
        json::print(&json::RestoreSummary::of(&report, seconds))?;
    } else {
        for error in &report.errors {
            eprintln!("snapfs: {error}");
        }
        eprintln!(
            "restored {}, {}, {}, {} ({}) in {seconds:.1} s",
            counted(report.files, "file", "files"),
            counted(report.dirs, "directory", "directories"),
            counted(report.symlinks, "symlink", "symlinks"),
            counted(report.hard_links, "hard link", "hard links"),
            human_bytes(report.bytes)
        );
    }
    if report.errors.is_empty() {
        Ok(())
    } else {
        let failed = counted(report.errors.len(), "file", "files");
        Err(format!("{failed} could not be restored").into())
    }
}

/// The runtime a command's store requests run on.
fn store_runtime() -> Result<tokio::runtime::Runtime, String> {
    store::runtime().map_err(|e| format!("tokio runtime: {e}"))
}

fn verify(
    volume: &VolumeSource,
    store: Option<&store::StoreUrl>,
    options: Options,
    json: bool,
) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let bar = counting_bar(json, "{bar:30} {pos}/{len} blocks hashed, ETA {eta}").map(Bar);
    let progress: &dyn snapfs::restore::Progress = match &bar {
        Some(bar) => bar,
        None => &(),
    };
    let (what, report) = match store {
        Some(url) => (
            url.to_string(),
            verify::verify_store(url, options, progress)?,
        ),
        None => {
            let dir = volume.data_dir()?;
            let report = verify::verify_volume(&dir, options, progress)?;
            (dir.display().to_string(), report)
        }
    };
    if let Some(bar) = &bar {
        bar.0.finish_and_clear();
    }
    let c = &report.counts;
    if json {
        json::print(&json::VerifyReport::of(&report))?;
    } else {
        for done in &report.repaired {
            println!("repaired: {done}");
        }
        for finding in &report.findings {
            println!("PROBLEM: {} ({})", finding.problem, finding.count);
            for example in &finding.examples {
                println!("    {example}");
            }
            if finding.count > finding.examples.len() as u64 {
                println!("    ...");
            }
        }
        for note in &report.notes {
            println!("note: {note}");
        }
        println!(
            "{what}: {}, {}, {}, {} checked{}: {}",
            counted(c.snapshots, "snapshot", "snapshots"),
            counted(c.local_blocks, "local block", "local blocks"),
            counted(c.stored_blocks, "stored block", "stored blocks"),
            counted(c.trees, "tree", "trees"),
            if c.hashed_blocks > 0 {
                format!(", {} hashed", counted(c.hashed_blocks, "block", "blocks"))
            } else {
                String::new()
            },
            if report.is_clean() {
                "clean".to_owned()
            } else {
                counted(report.findings.len(), "problem", "problems")
            }
        );
    }
    Ok(if report.is_clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn upload(
    dir: &Path,
    options: DrainOptions,
    json: bool,
) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let bar = progress_bar(json);
    let report = drain::drain(dir, options, &|sent, total| {
        if let Some(bar) = &bar {
            bar.set_length(total);
            bar.set_position(sent);
        }
    })?;
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    if json {
        json::print(&report)?;
    } else {
        for failed in &report.failed {
            eprintln!(
                "snapfs: the upload of snapshot {} failed: {}",
                failed.name, failed.error
            );
        }
        eprintln!(
            "{}: {} completed, {} failed, {} still pending; {} sent in {:.1} s{}",
            report.store,
            counted(report.completed.len(), "snapshot", "snapshots"),
            report.failed.len(),
            report.pending.len(),
            human_bytes(report.sent_bytes),
            report.seconds,
            if report.timed_out { " (timed out)" } else { "" }
        );
    }
    Ok(if !report.failed.is_empty() {
        ExitCode::FAILURE
    } else if report.timed_out {
        ExitCode::from(3)
    } else {
        ExitCode::SUCCESS
    })
}

/// The volume's store in one line, with the bytes no snapshot needs.
fn store_usage_text(usage: &snapfs::catalog::PackTotals) -> String {
    format!(
        "store:     {} in {}, {} of it unused ({:.1}%; freed while the mount is \
         idle, or by `snapfs store prune`)",
        human_bytes(usage.bytes),
        counted(usage.packs, "pack", "packs"),
        human_bytes(usage.unused_bytes),
        100.0 * usage.unused_bytes as f64 / usage.bytes.max(1) as f64
    )
}

fn prune(
    dir: &Path,
    options: PruneOptions,
    json: bool,
) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let report = drain::prune(dir, options)?;
    if json {
        json::print(&report)?;
        return Ok(ExitCode::SUCCESS);
    }
    let gc = &report.gc;
    let (delete, repack) = if report.dry_run {
        ("would delete", "repack")
    } else {
        ("deleted", "repacked")
    };
    println!(
        "store: {} in packs, {} of it unused ({:.1}%)",
        human_bytes(gc.store_bytes),
        human_bytes(gc.unused_bytes),
        100.0 * gc.unused_bytes as f64 / gc.store_bytes.max(1) as f64
    );
    println!(
        "{delete} {} and {repack} {} ({} of live blocks copied into new packs): \
         {} of packs deleted, in {:.1} s",
        counted(gc.deleted_packs, "unused pack", "unused packs"),
        gc.repacked_packs,
        human_bytes(gc.copied_bytes),
        human_bytes(gc.deleted_bytes),
        report.seconds
    );
    let merge = if report.dry_run {
        "would merge"
    } else {
        "merged"
    };
    if gc.merged_small_packs > 0 {
        println!(
            "{merge} {} into full ones (of the packs {repack})",
            counted(gc.merged_small_packs, "small pack", "small packs")
        );
    }
    if gc.merged_indexes > 0 {
        println!(
            "{merge} {} into full ones",
            counted(
                gc.merged_indexes,
                "small index object",
                "small index objects"
            )
        );
    }
    let convert = &report.convert;
    if convert.converted_objects > 0 {
        println!(
            "converted {} into packs ({} of frames)",
            counted(
                convert.converted_objects,
                "format-1 object",
                "format-1 objects"
            ),
            human_bytes(convert.converted_bytes)
        );
    }
    if convert.left_objects > 0 {
        println!(
            "{} could not be converted and stay as they are (the log says why)",
            counted(convert.left_objects, "format-1 object", "format-1 objects")
        );
    } else if convert.converted_objects == 0 && convert.format_1_objects > 0 {
        println!(
            "the store holds {} of their own (format 1); --convert packs them",
            counted(convert.format_1_objects, "object", "objects")
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn status(
    dir: &Path,
    options: &StatusOptions,
    json: bool,
) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let s = status::status(dir, options)?;
    if json {
        json::print(&s)?;
    } else {
        println!("volume:     {}", s.data_dir.display());
        let holder = format!(
            "pid {}, since {}",
            s.pid.as_deref().unwrap_or("?"),
            s.since.as_deref().unwrap_or("?")
        );
        match (&s.mountpoint, s.state) {
            (Some(at), _) => println!("mounted:    on {} ({holder})", at.display()),
            (None, "busy") => println!("mounted:    no; in use by another snapfs ({holder})"),
            _ => println!("mounted:    no"),
        }
        match &s.store {
            None => println!("store:      none yet (set at the first mount)"),
            Some(store) => match &store.error {
                None => println!("store:      {} (reachable)", store.url),
                Some(error) => println!("store:      {} (UNREACHABLE: {error})", store.url),
            },
        }
        println!(
            "pending:    {}, {} in {} left",
            counted(s.pending.len(), "snapshot", "snapshots"),
            human_bytes(s.left_bytes),
            counted(s.left_blocks, "block", "blocks")
        );
        for p in &s.pending {
            let sized = p.total_bytes.map_or_else(
                || "not started".to_owned(),
                |total| {
                    format!(
                        "{} of {} sent",
                        human_bytes(p.sent_bytes),
                        human_bytes(total)
                    )
                },
            );
            println!(
                "            {} (taken {}): {sized}",
                escaped(&p.name),
                p.created
            );
        }
        match (s.rate_bytes_per_sec, s.eta_seconds) {
            (Some(rate), Some(eta)) => {
                println!("upload:     {}/s, ETA {eta} s", human_bytes(rate as u64))
            }
            (Some(_), None) if s.left_bytes == 0 => {
                println!("upload:     finishing (every block sent)")
            }
            (Some(_), None) => println!("upload:     stalled (nothing landed while watching)"),
            (None, _) if !s.pending.is_empty() => println!("upload:     not running"),
            (None, _) => println!("upload:     idle"),
        }
        match &s.last_completed {
            Some(last) => println!(
                "last:       {} (taken {}, {} s ago)",
                escaped(&last.name),
                last.created,
                last.age_seconds
            ),
            None => println!("last:       no snapshot has completed"),
        }
        if let Some(failed) = &s.last_error {
            println!(
                "last error: {}: {}",
                escaped(&failed.name),
                failed.error.as_deref().unwrap_or("?")
            );
        }
        println!(
            "disk:       {} in {}; cache {} of {}",
            human_bytes(s.disk.bytes),
            counted(s.disk.blocks, "block", "blocks"),
            human_bytes(s.disk.cache_bytes),
            s.disk
                .cache_limit
                .map_or_else(|| "no limit".to_owned(), human_bytes)
        );
        if s.current {
            println!("backups:    current");
        }
        for problem in &s.problems {
            println!("backups:    NOT CURRENT: {problem}");
        }
    }
    Ok(if s.current {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Parses durations such as 90, 90s, 30m, 2h or 1d.
fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let text = text.trim();
    let (number, unit) = number_and_unit(text, "a duration (try 90s, 30m or 2h)")?;
    let seconds = match unit.trim() {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("unknown unit in '{text}' (use s, m, h or d)")),
    };
    number
        .checked_mul(seconds)
        .map(std::time::Duration::from_secs)
        .ok_or_else(|| format!("duration '{text}' is too long"))
}

/// The leading digits of `text` as a number, and the unit after them; `what` names what
/// `text` should have been.
fn number_and_unit<'a>(text: &'a str, what: &str) -> Result<(u64, &'a str), String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let number = digits
        .parse()
        .map_err(|e| format!("'{text}' is not {what}: {e}"))?;
    Ok((number, unit))
}

/// Makes a relative SNAPFS_KEY_FILE absolute: a mount reads it after the daemon has left
/// the directory it was started in.
fn absolute_key_file() {
    let Some(path) = std::env::var_os(store::KEY_FILE_VAR) else {
        return;
    };
    if let Ok(absolute) = std::path::absolute(&path) {
        // SAFETY: called first thing in main, before any other thread exists.
        unsafe { std::env::set_var(store::KEY_FILE_VAR, absolute) };
    }
}

fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// How much of a snapshot's upload is done, for tables: `100%`, `37%`, `-` if not sized.
fn sent_percent(progress: &UploadProgress) -> String {
    match progress.total_bytes {
        None => "-".into(),
        Some(0) => "100%".into(),
        Some(total) => format!("{}%", progress.sent_bytes * 100 / total),
    }
}

#[path = "cli/json.rs"]
mod json;
#[path = "cli/lifecycle.rs"]
mod lifecycle;
#[path = "cli/policy.rs"]
mod policy_cli;

#[path = "cli/checkpoint.rs"]
mod checkpoint;

/// The command line, or what mount(8)'s helper conventions stand for (see `mount_helper`),
/// and whether it was such a helper call.
fn parse_command_line() -> Result<Option<(Cli, bool)>, String> {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let mut command = <Cli as clap::CommandFactory>::command();
    command.build();
    let is_subcommand = |arg: &std::ffi::OsStr| {
        arg.to_str()
            .is_some_and(|name| command.find_subcommand(name).is_some())
    };
    Ok(match mount_helper::command_line(&argv, is_subcommand) {
        None => Some((Cli::parse(), false)),
        Some(call) => match call? {
            Call::Run(line) => Some((Cli::parse_from(line), true)),
            Call::Nothing => None,
        },
    })
}

/// Whether `err` says that the mountpoint already holds the volume of `data`. mount(8)'s
/// helper then has nothing to do: `mount -a` skips what is mounted, but it cannot see that
/// a snapfs line is, since /proc/mounts shows the source as `snapfs:DATA_DIR`.
fn mounted_there_already(err: &(dyn std::error::Error + 'static), data: &Path) -> bool {
    matches!(
        err.downcast_ref::<daemon::MountError>(),
        Some(daemon::MountError::AlreadyMounted { data_dir, .. })
            if std::fs::canonicalize(data).is_ok_and(|dir| dir == Path::new(data_dir))
    )
}

fn main() -> ExitCode {
    absolute_key_file();
    let (cli, helper_call) = match parse_command_line() {
        Ok(Some(parsed)) => parsed,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("snapfs: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Rust ignores SIGPIPE, so a print to a pipe whose reader left (`snapfs snapshot list
    // | head -1`) panics. A command dies of it quietly, as `ls` does; the daemon keeps
    // ignoring it, since a client hanging up must not kill the volume.
    if !matches!(cli.command, Command::Mount(_)) {
        // SAFETY: single-threaded here, and SIG_DFL is a valid disposition.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    // verify's 1 means "problems found": its own failures to run are 2.
    let failure = match cli.command {
        Command::Verify { .. }
        | Command::Upload { .. }
        | Command::Store(_)
        | Command::Status { .. } => ExitCode::from(2),
        _ => ExitCode::FAILURE,
    };
    let helper_mount_data = match &cli.command {
        Command::Mount(mount) if helper_call => mount.data.clone(),
        _ => None,
    };
    match run(cli) {
        Ok(code) => code,
        Err(e)
            if helper_mount_data
                .as_deref()
                .is_some_and(|data| mounted_there_already(&*e, data)) =>
        {
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("snapfs: {e}");
            failure
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
        assert_eq!(parse_duration("90"), Ok(std::time::Duration::from_secs(90)));
        assert_eq!(
            parse_duration("30m"),
            Ok(std::time::Duration::from_secs(1800))
        );
        assert_eq!(
            parse_duration("2h"),
            Ok(std::time::Duration::from_secs(7200))
        );
        assert!(parse_duration("5y").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn json_strings_escape_quotes_backslashes_and_controls() {
        let info = volume::SnapshotInfo {
            id: 7,
            name: b"a\"b\\c\n".to_vec(),
            state: snapfs::catalog::SnapshotState::Pending,
            created: 0,
            logical_bytes: 5,
            exclusive_bytes: 3,
            tags: vec![
                (b"env".to_vec(), b"prod".to_vec()),
                (b"k".to_vec(), b"\x01\xff".to_vec()),
            ],
            upload: UploadProgress {
                total_blocks: None,
                total_bytes: Some(9),
                sent_blocks: 1,
                sent_bytes: 2,
                stored_bytes: 1,
            },
            error: None,
            trash: None,
            lock: None,
        };
        let text = serde_json::to_string(&json::Snapshot::of(&info)).expect("serializes");
        assert_eq!(
            text,
            r#"{"id":7,"name":"a\"b\\c\n","state":"pending","error":null,"#.to_owned()
                + r#""created":"1970-01-01T00:00:00.000Z","logical_bytes":5,"exclusive_bytes":3,"#
                + r#""upload":{"total_blocks":null,"total_bytes":9,"sent_blocks":1,"#
                + r#""sent_bytes":2,"stored_bytes":1},"tags":{"env":"prod","k":"\u0001"#
                // Invalid UTF-8 reads as U+FFFD (the text output escapes it).
                + "\u{FFFD}\"},\"lock\":null}"
        );
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(12), "12 B");
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
