//! `snapfs upload`: the uploader run once without a mount, until no snapshot is pending
//! (a laptop that took snapshots offline sends them later, from cron); `snapfs store prune`:
//! its garbage collection run once, to the end.
//!
//! The volume is opened as a mount opens it (the data dir lock, the same clean-up of what
//! a crash left), its store checked and claimed as a mount does, and `Worker::upload_pending`
//! does the work: no snapshot is taken and nothing is deleted that a mount would keep.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::convert::ConvertReport;
use super::gc::{self, GcPolicy, GcReport};
use super::{STOP_GRACE, UploadError, UploadOptions, Worker};
use crate::catalog::{self, Catalog, Outstanding, Setting, SnapshotState};
use crate::store::{self, StoreError, StoreUrl};
use crate::volume::{self, Volume};

/// How often the progress callback hears how far the upload is.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

#[derive(Clone, Debug, Default)]
pub struct DrainOptions {
    /// `--store`: may only repeat the store the volume remembers (as for a mount).
    pub store: Option<StoreUrl>,
    pub upload: UploadOptions,
    /// Stop sending after this long (requests in flight still land).
    pub timeout: Option<Duration>,
}

/// What one run sent, and what is left.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct DrainReport {
    pub store: String,
    /// Names of the snapshots this run completed.
    pub completed: Vec<String>,
    /// Snapshots whose upload failed in this run, with the reason.
    pub failed: Vec<FailedSnapshot>,
    /// Names of the snapshots still pending (the run timed out).
    pub pending: Vec<String>,
    /// Block bytes this run sent (before compression).
    pub sent_bytes: u64,
    pub timed_out: bool,
    pub seconds: f64,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct FailedSnapshot {
    pub name: String,
    pub error: String,
}

#[derive(Debug, thiserror::Error)]
pub enum DrainError {
    #[error(
        "{} is mounted or in use (pid {pid}): a mount {does} by itself; unmount it to {command}",
        dir.display()
    )]
    InUse {
        dir: PathBuf,
        pid: String,
        does: &'static str,
        command: &'static str,
    },
    #[error(transparent)]
    Volume(#[from] volume::Error),
    #[error(transparent)]
    Catalog(#[from] catalog::Error),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error(transparent)]
    Upload(#[from] UploadError),
    #[error("cannot start the upload runtime: {0}")]
    Runtime(std::io::Error),
    #[error("this volume follows {0} read-only: it uploads nothing")]
    Follower(String),
    #[error("timed out before the store answered")]
    StoreTimeout,
}

/// Uploads what the pending snapshots of the volume in `dir` still need, until none is
/// pending or `options.timeout` passes. `progress(sent, total)` hears the block bytes sent
/// so far of the `total` this run started with, every quarter second.
pub fn drain(
    dir: &Path,
    options: DrainOptions,
    progress: &dyn Fn(u64, u64),
) -> Result<DrainReport, DrainError> {
    let started = Instant::now();
    let deadline = options.timeout.map(|t| started + t);
    // A dir without a volume is refused, never turned into a new one.
    let watch = Catalog::open_data_dir_read_only(dir)?;
    let runtime = store::runtime().map_err(DrainError::Runtime)?;
    let volume = open_unmounted(dir, "uploads", "upload with `snapfs upload`")?;
    let sent = send_watched(&volume, &watch, &runtime, options, deadline, progress);
    // Also after a failure: unfinished uploads resume at the next mount or run, as after
    // an unmount.
    volume.shutdown()?;
    let Sent {
        url,
        timed_out,
        was_pending,
        sent_before,
    } = sent?;
    let mut report = DrainReport {
        store: url.to_string(),
        sent_bytes: watch
            .read(|tx| tx.sent_bytes_total())?
            .saturating_sub(sent_before),
        timed_out,
        ..DrainReport::default()
    };
    for snapshot in watch.read(|tx| tx.snapshots())? {
        let name = String::from_utf8_lossy(&snapshot.name).into_owned();
        match snapshot.state {
            SnapshotState::Pending => report.pending.push(name),
            _ if !was_pending.contains(&snapshot.id) => {}
            SnapshotState::Completed => report.completed.push(name),
            SnapshotState::Failed => report.failed.push(FailedSnapshot {
                name,
                error: snapshot.error.unwrap_or_default(),
            }),
        }
    }
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// What `send_watched` did.
struct Sent {
    url: StoreUrl,
    timed_out: bool,
    /// The snapshots pending before.
    was_pending: Vec<u64>,
    /// `sent_bytes_total` before.
    sent_before: u64,
}

/// Runs `send` on `runtime` while telling `progress` what the catalog records.
fn send_watched(
    volume: &Arc<Volume>,
    watch: &Catalog,
    runtime: &tokio::runtime::Runtime,
    options: DrainOptions,
    deadline: Option<Instant>,
    progress: &dyn Fn(u64, u64),
) -> Result<Sent, DrainError> {
    let sent_before = watch.read(|tx| tx.sent_bytes_total())?;
    let was_pending = watch
        .read(|tx| tx.snapshots())?
        .into_iter()
        .filter(|s| s.state == SnapshotState::Pending)
        .map(|s| s.id)
        .collect();
    let Outstanding { bytes: total, .. } = watch.read(|tx| tx.outstanding())?;
    let (url, timed_out) = std::thread::scope(|scope| {
        let sending = scope.spawn(|| runtime.block_on(send(volume, options, deadline)));
        // The catalog connection stays on this thread (it is not Sync).
        while !sending.is_finished() {
            if let Ok(sent) = watch.read(|tx| tx.sent_bytes_total()) {
                progress(sent.saturating_sub(sent_before), total);
            }
            std::thread::sleep(PROGRESS_EVERY);
        }
        sending
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })?;
    Ok(Sent {
        url,
        timed_out,
        was_pending,
        sent_before,
    })
}

/// Opens the volume in `dir` as a mount does (the data dir lock, the same clean-up of what
/// a crash left); refused while it is mounted, whose mount `does` the work by itself.
fn open_unmounted(
    dir: &Path,
    does: &'static str,
    command: &'static str,
) -> Result<Arc<Volume>, DrainError> {
    match Volume::open(dir, &volume::Options::default()) {
        Err(volume::Error::Locked { dir, pid }) => Err(DrainError::InUse {
            dir,
            pid,
            does,
            command,
        }),
        opened => Ok(Arc::new(opened?)),
    }
}

/// Checks and claims the store as a mount does (`store` may only repeat the one the
/// volume remembers), and starts a worker on it.
async fn open_worker(
    volume: &Arc<Volume>,
    store: Option<&StoreUrl>,
    upload: UploadOptions,
    deadline: Option<Instant>,
) -> Result<(StoreUrl, Worker), DrainError> {
    if let Some(followed) = volume.setting(Setting::Follows)? {
        return Err(DrainError::Follower(followed));
    }
    let url = volume.store_url(store)?;
    let (volume_id, block_size, origin) = (
        volume.volume_id()?,
        volume.block_size() as u32,
        volume.origin()?,
    );
    let claimed = async {
        let opened = store::open(&url).await?;
        store::claim(&*opened, &volume_id, block_size, origin.as_ref()).await?;
        Ok::<_, StoreError>(opened)
    };
    let opened = until(deadline, claimed)
        .await
        .ok_or(DrainError::StoreTimeout)??;
    volume.remember_store(&url)?;
    Ok((url, Worker::new(volume.clone(), opened, upload)?))
}

/// Uploads until nothing is pending or `deadline`; true if the deadline came first.
async fn send(
    volume: &Arc<Volume>,
    options: DrainOptions,
    deadline: Option<Instant>,
) -> Result<(StoreUrl, bool), DrainError> {
    let (url, worker) =
        open_worker(volume, options.store.as_ref(), options.upload, deadline).await?;
    let running = worker.upload_pending();
    tokio::pin!(running);
    if let Some(outcomes) = until(deadline, &mut running).await {
        outcomes?;
        return Ok((url, false));
    }
    // Requests in flight land and are recorded (see `Uploader::start`).
    worker.stop_sending();
    let _ = tokio::time::timeout(STOP_GRACE, &mut running).await;
    Ok((url, true))
}

/// `work`'s result, or `None` if `deadline` comes first.
async fn until<T>(deadline: Option<Instant>, work: impl Future<Output = T>) -> Option<T> {
    match deadline {
        Some(deadline) => tokio::time::timeout_at(deadline.into(), work).await.ok(),
        None => Some(work.await),
    }
}

/// What `snapfs store prune` does: garbage collection to the end, with `convert` the
/// conversion of format-1 objects into packs first, or (`dry_run`) what it would do, read
/// from the catalog alone.
#[derive(Clone, Debug, Default)]
pub struct PruneOptions {
    pub store: Option<StoreUrl>,
    pub max_unused_percent: u8,
    pub convert: bool,
    pub dry_run: bool,
}

#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct PruneReport {
    pub dry_run: bool,
    #[serde(flatten)]
    pub gc: GcReport,
    #[serde(flatten)]
    pub convert: ConvertReport,
    pub seconds: f64,
}

/// Collects the garbage of the store of the volume in `dir` (not mounted) under
/// `options`; with `dry_run`, only says what that would do (mounted or not).
pub fn prune(dir: &Path, options: PruneOptions) -> Result<PruneReport, DrainError> {
    let started = Instant::now();
    let policy = GcPolicy {
        max_unused_percent: options.max_unused_percent,
        max_copy_bytes: None,
    };
    let watch = Catalog::open_data_dir_read_only(dir)?;
    let format_1_objects = watch.read(|tx| tx.format_1_objects())?;
    let found = ConvertReport {
        format_1_objects,
        ..ConvertReport::default()
    };
    // The worker a prune runs, and whose pack size a dry run's plan fills.
    let upload = UploadOptions::default();
    let (gc, convert) = if options.dry_run {
        let packs = watch.read(|tx| tx.indexed_packs())?;
        let plan = gc::plan(&packs, &policy, upload.pack_size as u64);
        (plan.report(&packs), found)
    } else {
        drop(watch);
        let runtime = store::runtime().map_err(DrainError::Runtime)?;
        let volume = open_unmounted(dir, "collects garbage", "prune with `snapfs store prune`")?;
        let pruned = runtime.block_on(async {
            let (_, worker) = open_worker(&volume, options.store.as_ref(), upload, None).await?;
            worker.abandon_interrupted()?;
            let convert = match options.convert {
                true => worker.convert_format_1().await?,
                false => found,
            };
            Ok::<_, DrainError>((worker.collect_garbage(&policy).await?, convert))
        });
        volume.shutdown()?;
        pruned?
    };
    Ok(PruneReport {
        dry_run: options.dry_run,
        gc,
        convert,
        seconds: started.elapsed().as_secs_f64(),
    })
}
