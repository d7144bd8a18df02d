//! `snapfs status`: one look at a volume, mounted or not, for people and for monitoring.
//!
//! Read-only: the catalog is opened read-only and the data dir lock only probed. The
//! upload rate is the growth of the progress the uploader records in the catalog (every
//! 16 blocks or half a second), sampled over a short interval: nothing new is recorded,
//! the uploader stays as it is, and the rate is what has safely landed.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use crate::catalog::{self, Catalog, LocalUsage, Outstanding, Setting, SnapshotRow, SnapshotState};
use crate::daemon;
use crate::display::{counted, escaped};
use crate::store::{self, ObjectKey, StoreUrl};
use crate::volume::{self, rfc3339};

#[derive(Clone, Debug)]
pub struct StatusOptions {
    /// How long to watch the upload progress for a rate (zero: no rate).
    pub sample: Duration,
    /// How long the store may take to answer a listing.
    pub store_timeout: Duration,
    /// Backups are behind when the last completed snapshot is older than this.
    pub max_age: Option<Duration>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Status {
    pub data_dir: PathBuf,
    /// `mounted`, `unmounted`, or `busy` (the lock is held, but not by a mount: `snapfs
    /// upload`, `snapfs verify --repair`).
    pub state: &'static str,
    /// The lock holder's pid, and since when it holds it.
    pub pid: Option<String>,
    pub since: Option<String>,
    pub mountpoint: Option<PathBuf>,
    pub store: Option<StoreStatus>,
    pub pending: Vec<Snapshot>,
    /// What the pending snapshots still need sent (each block counted once).
    pub left_blocks: u64,
    pub left_bytes: u64,
    /// Block bytes per second recorded sent over the sample; `None` when nothing uploads.
    pub rate_bytes_per_sec: Option<f64>,
    pub eta_seconds: Option<u64>,
    pub last_completed: Option<Snapshot>,
    /// The latest failed snapshot.
    pub last_error: Option<Snapshot>,
    pub disk: Disk,
    /// Whether backups are current; if not, `problems` says why.
    pub current: bool,
    pub problems: Vec<String>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct StoreStatus {
    pub url: String,
    pub reachable: bool,
    /// Why it is not reachable.
    pub error: Option<String>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Snapshot {
    pub id: u64,
    /// In JSON decoded lossily, as every `--json` view does (`display::escaped` for text).
    #[serde(serialize_with = "lossy")]
    pub name: Vec<u8>,
    pub created: String,
    pub age_seconds: u64,
    /// Sent so far of what its upload must send (`None`: not sized yet).
    pub sent_bytes: u64,
    pub total_bytes: Option<u64>,
    pub error: Option<String>,
}

fn lossy<S: serde::Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&String::from_utf8_lossy(bytes))
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Disk {
    /// Block files on the local disk.
    pub blocks: u64,
    pub bytes: u64,
    /// Of those, the ones the store also holds: the cache.
    pub cache_bytes: u64,
    /// The mount's `--cache-size` (`None`: keep everything).
    pub cache_limit: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(transparent)]
    Volume(#[from] volume::Error),
    #[error(transparent)]
    Catalog(#[from] catalog::Error),
}

/// What `status` reads of the catalog, before and after it watches the upload.
struct Seen {
    snapshots: Vec<SnapshotRow>,
    outstanding: Outstanding,
    usage: LocalUsage,
    store_url: Option<String>,
    cache_limit: Option<String>,
}

/// The status of the volume in data dir `dir`.
pub fn status(dir: &Path, options: &StatusOptions) -> Result<Status, StatusError> {
    let catalog = Catalog::open_data_dir_read_only(dir)?;
    let holder = volume::data_dir_holder(dir)?;
    let mountpoint = holder.as_ref().and_then(|_| daemon::mountpoint_of(dir));
    let state = match (&holder, &mountpoint) {
        (None, _) => "unmounted",
        (Some(_), Some(_)) => "mounted",
        (Some(_), None) => "busy",
    };
    let read = || {
        catalog.read(|tx| {
            Ok::<_, catalog::Error>(Seen {
                snapshots: tx.snapshots()?,
                outstanding: tx.outstanding()?,
                usage: tx.local_usage()?,
                // A read-only volume's store is the one it follows.
                store_url: tx
                    .setting(Setting::Store)?
                    .or(tx.setting(Setting::Follows)?),
                cache_limit: tx.setting(Setting::CacheSize)?,
            })
        })
    };
    let mut seen = read()?;
    // Watching the rate and asking the store both take a moment: at the same time.
    let sample = seen
        .snapshots
        .iter()
        .any(|s| s.state == SnapshotState::Pending)
        && holder.is_some()
        && !options.sample.is_zero();
    let store_url = seen.store_url.clone();
    let (rate, store) = std::thread::scope(|scope| {
        let store = scope.spawn(|| {
            store_url
                .as_deref()
                .map(|url| check_store(url, options.store_timeout))
        });
        let rate = if sample {
            upload_rate(&catalog, options.sample)?
        } else {
            None
        };
        let store = store
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        Ok::<_, StatusError>((rate, store))
    })?;
    if sample {
        // The state after the watch, not before it: an upload that finished meanwhile
        // is done, not stalled.
        seen = read()?;
    }
    let Seen {
        snapshots,
        outstanding,
        usage,
        cache_limit,
        ..
    } = seen;
    let Outstanding {
        blocks: left_blocks,
        bytes: left_bytes,
    } = outstanding;
    let LocalUsage {
        blocks,
        bytes,
        cached_bytes,
        ..
    } = usage;
    let now = volume::now();
    let brief = |row: &SnapshotRow| Snapshot {
        id: row.id,
        name: row.name.clone(),
        created: rfc3339(row.created),
        age_seconds: (now.saturating_sub(row.created) / 1_000_000_000).max(0) as u64,
        sent_bytes: row.upload.sent_bytes,
        total_bytes: row.upload.total_bytes,
        error: row.error.clone(),
    };
    let latest = |state: SnapshotState| {
        snapshots
            .iter()
            // One in the recycle bin is deleted as far as backups go.
            .filter(|s| s.state == state && s.trash.is_none())
            .max_by_key(|s| s.generation)
    };
    let pending: Vec<Snapshot> = snapshots
        .iter()
        .filter(|s| s.state == SnapshotState::Pending)
        .map(brief)
        .collect();
    // Nothing uploads once nothing is pending.
    let rate = rate.filter(|_| !pending.is_empty());
    let mut status = Status {
        data_dir: dir.to_owned(),
        state,
        pid: holder.as_ref().map(|h| h.pid.clone()),
        since: holder.as_ref().map(|h| rfc3339(nanos_of(h.since))),
        mountpoint,
        store,
        pending,
        left_blocks,
        left_bytes,
        rate_bytes_per_sec: rate,
        eta_seconds: rate
            .filter(|r| *r > 0.0)
            .map(|r| (left_bytes as f64 / r).ceil() as u64),
        last_completed: latest(SnapshotState::Completed).map(brief),
        last_error: latest(SnapshotState::Failed).map(brief),
        disk: Disk {
            blocks,
            bytes,
            cache_bytes: cached_bytes,
            cache_limit: cache_limit.and_then(|limit| limit.parse().ok()),
        },
        current: true,
        problems: Vec::new(),
    };
    status.problems = problems(&status, &snapshots, options.max_age);
    status.current = status.problems.is_empty();
    Ok(status)
}

/// Why backups are not current: snapshots pending, the newest finished one failed, the
/// store unreachable, none completed, the last completed one too old.
fn problems(status: &Status, snapshots: &[SnapshotRow], max_age: Option<Duration>) -> Vec<String> {
    let mut problems = Vec::new();
    if !status.pending.is_empty() {
        let n = status.pending.len();
        problems.push(format!(
            "{} pending ({} bytes left)",
            counted(n, "snapshot", "snapshots"),
            status.left_bytes
        ));
    }
    let newest_finished = snapshots
        .iter()
        .filter(|s| s.state != SnapshotState::Pending)
        .max_by_key(|s| s.generation);
    if let Some(failed) = newest_finished.filter(|s| s.state == SnapshotState::Failed) {
        problems.push(format!(
            "the upload of snapshot {} failed: {}",
            escaped(&failed.name),
            failed.error.as_deref().unwrap_or("no reason recorded")
        ));
    }
    if let Some(StoreStatus {
        url,
        error: Some(error),
        ..
    }) = &status.store
    {
        problems.push(format!("store {url} is unreachable: {error}"));
    }
    match (&status.last_completed, max_age) {
        // Nothing is backed up: never current, --max-age or not (a first snapshot still
        // uploading is the pending problem above).
        (None, _) if status.pending.is_empty() || max_age.is_some() => problems.push(
            "no snapshot has completed: nothing is backed up yet (take one with mkdir \
             MOUNTPOINT/.snapshots/NAME, or set a policy)"
                .into(),
        ),
        (Some(last), Some(max_age)) if last.age_seconds > max_age.as_secs() => {
            problems.push(format!(
                "the last completed snapshot, {}, is {} s old (more than {} s)",
                escaped(&last.name),
                last.age_seconds,
                max_age.as_secs()
            ))
        }
        _ => {}
    }
    problems
}

/// Block bytes per second recorded sent while watching for `interval`.
fn upload_rate(catalog: &Catalog, interval: Duration) -> Result<Option<f64>, StatusError> {
    let started = Instant::now();
    let before = catalog.read(|tx| tx.sent_bytes_total())?;
    std::thread::sleep(interval);
    let after = catalog.read(|tx| tx.sent_bytes_total())?;
    // A snapshot deleted meanwhile takes its progress with it.
    let sent = after.saturating_sub(before);
    Ok(Some(sent as f64 / started.elapsed().as_secs_f64()))
}

/// Lists the store's volume header, within `timeout`.
fn check_store(url: &str, timeout: Duration) -> StoreStatus {
    let reached = || -> Result<(), String> {
        let url = StoreUrl::parse(url).map_err(|e| e.to_string())?;
        let runtime = store::runtime().map_err(|e| format!("cannot start a runtime: {e}"))?;
        runtime.block_on(async {
            let listed = async {
                let opened = store::open(&url).await?;
                opened.list(&ObjectKey::HEADER).await
            };
            match tokio::time::timeout(timeout, listed).await {
                Ok(result) => result.map(drop).map_err(|e| e.to_string()),
                Err(_) => Err(format!("no answer within {} s", timeout.as_secs_f64())),
            }
        })
    };
    let result = reached();
    StoreStatus {
        url: url.to_owned(),
        reachable: result.is_ok(),
        error: result.err(),
    }
}

fn nanos_of(time: SystemTime) -> i64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}
