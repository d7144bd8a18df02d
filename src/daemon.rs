//! Running a mount: daemonizing, mounting, waiting for an unmount or a signal, and the
//! final flush. `main.rs` parses the command line and calls [`mount`].

use std::ffi::CString;
use std::fs;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fuser::{Config, MountOption, SessionACL};

use crate::catalog::Setting;
use crate::follow;
use crate::fuse::SnapFs;
use crate::hooks::{self, HookOptions};
use crate::metrics;
use crate::store::{self, ReadError, StoreChain, StoreError, StoreSource, StoreUrl};
use crate::upload::{UploadError, UploadOptions, Uploader, Worker};
use crate::volume::{self, Volume};

/// Unflushed writes older than this are flushed by the timer.
const FLUSH_AGE: Duration = Duration::from_secs(3);
/// How often the recycle bin is checked for expired snapshots.
const TRASH_CHECK: Duration = Duration::from_secs(1);

#[derive(Clone, Debug)]
pub struct MountArgs {
    pub mountpoint: PathBuf,
    pub data_dir: PathBuf,
    pub foreground: bool,
    pub allow_other: bool,
    pub volume: volume::Options,
    /// `--store`: `None` keeps the volume's store (a directory in the data dir at first).
    pub store: Option<StoreUrl>,
    pub upload: UploadOptions,
    /// Most bytes of stored blocks kept on the local disk (`None`: all).
    pub cache_size: Option<u64>,
    /// `--from URL@SNAPSHOT`: make the new volume from another volume's snapshot.
    pub from: Option<(StoreUrl, Vec<u8>)>,
    /// `--read-only`: follow the store (another machine's volume) instead of writing.
    pub read_only: bool,
    /// How often a read-only mount looks for new snapshots in the store.
    pub follow_interval: Duration,
    /// `--metrics`: where to serve Prometheus metrics.
    pub metrics: Option<std::net::SocketAddr>,
    /// `--commit-interval`: how long catalog operations gather before they commit (zero:
    /// each commits on its own).
    pub commit_interval: Duration,
    /// `--pre-snapshot`, `--post-snapshot` and their settings.
    pub hooks: HookOptions,
    /// `--trash-days`: how long deleted snapshots stay in the recycle bin (remembered;
    /// zero turns the bin off).
    pub trash_retention: Option<Duration>,
    /// `--checkpoint-every` and `--checkpoint-window` (`None`: no checkpoints).
    pub checkpoints: Option<volume::CheckpointPolicy>,
}

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("mountpoint {0} does not exist")]
    NoMountpoint(PathBuf),
    #[error("mountpoint {0} is not a directory")]
    MountpointNotDir(PathBuf),
    #[error(
        "{} is already a snapfs mount (of data dir {data_dir}): unmount it first \
         (`snapfs umount {}`)", mountpoint.display(), mountpoint.display()
    )]
    AlreadyMounted {
        mountpoint: PathBuf,
        data_dir: String,
    },
    #[error("mountpoint {path}: {source}")]
    Mountpoint {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot use data dir {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Volume(#[from] volume::Error),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error(transparent)]
    Upload(#[from] UploadError),
    #[error("--from: {0}")]
    From(#[from] ReadError),
    #[error(
        "cannot mount on {path}: {source} (snapfs needs /dev/fuse and, when not root, fusermount3 from the fuse3 package)"
    )]
    Mount {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the daemon: {0}")]
    Daemon(std::io::Error),
    #[error("{0}")]
    Reported(String),
}

fn check_mountpoint(path: &Path) -> Result<PathBuf, MountError> {
    let mountpoint_error = |source| MountError::Mountpoint {
        path: path.to_owned(),
        source,
    };
    // A FUSE mount whose daemon is gone (killed, crashed) answers only ENOTCONN.
    let dead = match fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(MountError::NoMountpoint(path.to_owned()));
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => Some(e),
        Err(source) => return Err(mountpoint_error(source)),
        Ok(meta) if !meta.is_dir() => return Err(MountError::MountpointNotDir(path.to_owned())),
        Ok(_) => None,
    };
    let canonical = match (&dead, path.parent(), path.file_name()) {
        // Its path, which canonicalize cannot lstat: its parent's, and its name.
        (Some(_), Some(parent), Some(name)) => {
            let parent = if parent.as_os_str().is_empty() {
                Path::new(".")
            } else {
                parent
            };
            fs::canonicalize(parent).map(|parent| parent.join(name))
        }
        _ => fs::canonicalize(path),
    }
    .map_err(mountpoint_error)?;
    let Some(source) = mount_source(&canonical) else {
        return match dead {
            Some(e) => Err(mountpoint_error(e)),
            None => Ok(canonical),
        };
    };
    let data_dir = source.strip_prefix("snapfs:");
    // The mount that follows a dead one (a restart by systemd's Restart=on-failure, say)
    // replaces it.
    let daemon_gone =
        data_dir.is_some_and(|dir| matches!(volume::data_dir_holder(Path::new(dir)), Ok(None)));
    if daemon_gone {
        detach_mount(&canonical, libc::MNT_DETACH).map_err(mountpoint_error)?;
        eprintln!(
            "snapfs: detached the mount left at {} by a daemon that is gone",
            path.display()
        );
        return Ok(canonical);
    }
    // A second volume over the first would hide it while its daemon runs on: a mount run
    // twice (a login script) means the first is still wanted.
    Err(MountError::AlreadyMounted {
        mountpoint: path.to_owned(),
        data_dir: data_dir.unwrap_or(&source).to_owned(),
    })
}

fn prepare_data_dir(path: &Path) -> Result<PathBuf, MountError> {
    let err = |source| MountError::DataDir {
        path: path.to_owned(),
        source,
    };
    fs::create_dir_all(path).map_err(err)?;
    let canonical = fs::canonicalize(path).map_err(err)?;
    // Fail now, with the reason, rather than at the first write through the mount.
    let probe = canonical.join(".write-test");
    fs::write(&probe, b"").map_err(err)?;
    let _ = fs::remove_file(probe);
    Ok(canonical)
}

/// Mounts a volume and serves it until it is unmounted or the daemon gets SIGINT, SIGTERM
/// or SIGHUP; then flushes everything and returns. Without `foreground`, returns in the
/// calling process once the mount is up (or failed), leaving a daemon to serve it.
pub fn mount(mut args: MountArgs) -> Result<(), MountError> {
    args.mountpoint = check_mountpoint(&args.mountpoint)?;
    args.data_dir = prepare_data_dir(&args.data_dir)?;
    if args.foreground {
        init_logging(None);
        return serve(&args, &mut None);
    }
    let (read_end, write_end) = pipe().map_err(MountError::Daemon)?;
    // SAFETY: no thread has been started yet, so the child is a faithful copy.
    match unsafe { libc::fork() } {
        -1 => Err(MountError::Daemon(std::io::Error::last_os_error())),
        0 => {
            drop(read_end);
            detach();
            init_logging(Some(&args.data_dir.join("snapfs.log")));
            let mut ready = Some(fs::File::from(write_end));
            let result = serve(&args, &mut ready);
            if let (Err(e), Some(mut pipe)) = (&result, ready) {
                let _ = write!(pipe, "{e}");
            }
            std::process::exit(i32::from(result.is_err()));
        }
        _child => {
            drop(write_end);
            let mut report = String::new();
            fs::File::from(read_end)
                .read_to_string(&mut report)
                .map_err(MountError::Daemon)?;
            match report.as_str() {
                "ready" => Ok(()),
                "" => Err(MountError::Reported(format!(
                    "the daemon exited during start-up; see {}",
                    args.data_dir.join("snapfs.log").display()
                ))),
                message => Err(MountError::Reported(message.to_owned())),
            }
        }
    }
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the two-element array it is given.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Leaves the terminal and session of the caller.
fn detach() {
    // SAFETY: plain system calls on descriptors 0-2, which this process owns.
    unsafe {
        libc::setsid();
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null >= 0 {
            for fd in 0..3 {
                libc::dup2(null, fd);
            }
            if null > 2 {
                libc::close(null);
            }
        }
        libc::chdir(c"/".as_ptr());
    }
}

fn init_logging(file: Option<&Path>) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SNAPFS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("snapfs=info,fuser=error"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let log = file.and_then(|path| {
        fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .ok()
    });
    match log {
        Some(log) => builder
            .with_ansi(false)
            .with_writer(std::sync::Mutex::new(log))
            .init(),
        // Colours for a terminal only: not in journald or a file stderr was sent to.
        None => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_writer(std::io::stderr)
            .init(),
    }
}

/// Signals that end the daemon, plus the one the session thread sends when the kernel
/// unmounted the filesystem.
fn signal_set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill the set they are given.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGUSR1] {
            libc::sigaddset(&mut set, signal);
        }
        set
    }
}

fn serve(args: &MountArgs, ready: &mut Option<fs::File>) -> Result<(), MountError> {
    // Block the signals before any thread starts, so every thread inherits the mask and
    // only the sigwait below receives them.
    let signals = signal_set();
    // SAFETY: sets this thread's mask from a fully initialised set.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &signals, std::ptr::null_mut()) };

    // The daemon's one runtime: every store request (import, uploads, block fetches,
    // following) runs on it.
    let runtime = store::runtime().map_err(MountError::Daemon)?;
    let volume = Arc::new(open_from(args, runtime.handle())?);
    if let Some(addr) = args.metrics {
        serve_metrics(addr, &volume)?;
    }
    // The store is checked before mounting: a bad URL, credential or bucket is an error
    // now, not a snapshot that never completes.
    if args.read_only {
        return serve_follower(args, ready, volume, runtime, signals);
    }
    let url = volume.store_url(args.store.as_ref())?;
    let volume_id = volume.volume_id()?;
    let block_size = volume.block_size() as u32;
    let origin = volume.origin()?;
    let claimed_before = volume.setting(Setting::Store)?.is_some();
    let (object_store, origin_store) = runtime.block_on(async {
        let opened = store::open(&url).await?;
        claim_at_mount(
            &*opened,
            &volume_id,
            block_size,
            origin.as_ref(),
            claimed_before,
        )
        .await?;
        let origin_store = match &origin {
            Some(origin) => Some(store::open(origin).await?),
            None => None,
        };
        Ok::<_, StoreError>((opened, origin_store))
    })?;
    volume.remember_store(&url)?;
    if let Some(origin_store) = origin_store {
        volume.attach_origin(origin_store, runtime.handle().clone());
    }
    volume.attach_store(
        object_store.clone(),
        runtime.handle().clone(),
        args.cache_size,
    )?;
    let worker = Worker::new(volume.clone(), object_store, args.upload.clone())?;
    volume
        .spawn_flusher(FLUSH_AGE)
        .and_then(|()| volume.spawn_committer(args.commit_interval))
        .map_err(MountError::Daemon)?;
    if let Some(policy) = args.checkpoints {
        volume
            .spawn_checkpointer(policy)
            .map_err(MountError::Daemon)?;
    }
    hooks::install(&volume, &args.hooks, &args.mountpoint)?;
    if let Some(retention) = args.trash_retention {
        volume.remember_trash_retention(retention)?;
    }
    volume
        .spawn_trash_timer(TRASH_CHECK)
        .map_err(MountError::Daemon)?;
    let session = start_session(args, &volume, |notifier| {
        volume.on_attrs_changed(kernel_attr_dropper(notifier));
        volume.on_pruned(kernel_forgetter(notifier)?);
        Ok(())
    })?;
    let uploader = Uploader::start(runtime, worker).map_err(MountError::Daemon)?;
    // After the session: scheduled snapshots run the hooks, which may use the mount.
    let scheduler = volume.spawn_scheduler().map_err(MountError::Daemon)?;
    tracing::info!(mountpoint = %args.mountpoint.display(), data = %args.data_dir.display(), store = %url, "mounted");
    wait_for_unmount(session, ready, &signals);
    scheduler.stop();
    // Uploads left unfinished resume at the next mount.
    uploader.stop();
    close(volume)?;
    tracing::info!("unmounted cleanly");
    Ok(())
}

/// Serves `--metrics` at `addr`; a scrape reads the snapshot table for the gauges. Holds
/// the volume weakly: the metrics thread lives on until the process exits.
fn serve_metrics(addr: std::net::SocketAddr, volume: &Arc<Volume>) -> Result<(), MountError> {
    let volume = Arc::downgrade(volume);
    metrics::serve(addr, move || {
        volume
            .upgrade()
            .map(|volume| volume.metrics_gauges())
            .unwrap_or_default()
    })
    .map_err(|e| MountError::Reported(format!("--metrics {addr}: {e}")))?;
    Ok(())
}

/// Claims the store (`store::claim`); a store this volume claimed at an earlier mount
/// that cannot be reached now (a laptop offline) is no reason to refuse the mount: the
/// uploader waits for it, and `snapfs upload` can send the snapshots later.
async fn claim_at_mount(
    store: &dyn store::ObjectStore,
    volume_id: &str,
    block_size: u32,
    origin: Option<&StoreUrl>,
    claimed_before: bool,
) -> Result<(), StoreError> {
    match store::claim(store, volume_id, block_size, origin).await {
        Err(e) if claimed_before && e.is_transient() => {
            tracing::warn!(error = %e, "the store cannot be reached; mounting anyway, uploads wait for it");
            Ok(())
        }
        result => result,
    }
}

/// A read-only mount following the store another machine's volume uploads to: the
/// latest completed snapshot as the live tree, every one under `.snapshots`.
fn serve_follower(
    args: &MountArgs,
    ready: &mut Option<fs::File>,
    volume: Arc<Volume>,
    runtime: tokio::runtime::Runtime,
    signals: libc::sigset_t,
) -> Result<(), MountError> {
    let url = args.store.clone().ok_or_else(|| {
        MountError::Reported("--read-only needs --store URL: the store to follow".into())
    })?;
    follow::claim(&volume, &url).map_err(MountError::Reported)?;
    let followed = runtime.block_on(store::open(&url))?;
    let mut stores = StoreChain::new(runtime.handle(), followed.clone());
    follow::follow_once(&volume, &mut stores, &|_| {})
        .map_err(|e| MountError::Reported(format!("store: {e}")))?;
    volume.attach_origin(followed.clone(), runtime.handle().clone());
    volume.attach_store(followed, runtime.handle().clone(), args.cache_size)?;
    let session = start_session(args, &volume, |_| Ok(()))?;
    // Snapshots deleted in the store vanish here behind the kernel's back.
    let forget = kernel_forgetter(&session.notifier)?;
    let forget = Box::new(move |name: &[u8]| forget(volume::SNAPDIR, name));
    let follower = follow::Follower::start(volume.clone(), stores, args.follow_interval, forget)
        .map_err(MountError::Daemon)?;
    tracing::info!(mountpoint = %args.mountpoint.display(), store = %url, "mounted read-only, following");
    wait_for_unmount(session, ready, &signals);
    follower.stop();
    drop(runtime);
    close(volume)?;
    tracing::info!("unmounted cleanly");
    Ok(())
}

/// How long `close` waits for a background thread (a flush, a checkpoint, the trash
/// timer) to let go of the volume.
const CLOSE_WAIT: Duration = Duration::from_secs(30);

/// Shuts the volume down, then drops it on this thread once no other holds it: those
/// hold it only while they work, and the process must not exit while one of them is
/// still closing the catalog (the WAL would be left behind, and `snapfs umount`, which
/// waits for the data dir's lock, would return before the catalog is closed).
fn close(volume: Arc<Volume>) -> Result<(), MountError> {
    volume.shutdown()?;
    let deadline = Instant::now() + CLOSE_WAIT;
    let mut volume = volume;
    loop {
        match Arc::try_unwrap(volume) {
            Ok(volume) => {
                drop(volume);
                return Ok(());
            }
            Err(shared) if Instant::now() < deadline => {
                volume = shared;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(_) => {
                tracing::warn!("a background thread still holds the volume; exiting all the same");
                return Ok(());
            }
        }
    }
}

/// The FUSE session, running on its own thread, which signals the main thread when the
/// kernel ends it (an unmount).
struct Session {
    unmounter: fuser::SessionUnmounter,
    notifier: fuser::Notifier,
    thread: std::thread::JoinHandle<std::io::Result<()>>,
}

/// Mounts and serves the volume. `wire` gets the session's notifier before the first
/// request is served: a core callback registered later would miss the changes of the
/// first requests (a close whose flush never drops the kernel's cached `st_blocks`), as
/// the mount is visible, and used, from here.
fn start_session(
    args: &MountArgs,
    volume: &Arc<Volume>,
    wire: impl FnOnce(&fuser::Notifier) -> Result<(), MountError>,
) -> Result<Session, MountError> {
    let mut session = fuser::Session::new(
        SnapFs::new(volume.clone(), !args.read_only),
        &args.mountpoint,
        &mount_config(args),
    )
    .map_err(|source| MountError::Mount {
        path: args.mountpoint.clone(),
        source,
    })?;
    let unmounter = session.unmount_callable();
    let notifier = session.notifier();
    wire(&notifier)?;
    let thread = std::thread::Builder::new()
        .name("fuse-session".into())
        .spawn(move || {
            let result = session.run();
            // Wake the main thread: the kernel ended the session (an unmount).
            // SAFETY: kill with our own pid and a valid signal.
            unsafe { libc::kill(libc::getpid(), libc::SIGUSR1) };
            result
        })
        .map_err(MountError::Daemon)?;
    widen_read_ahead(&args.mountpoint);
    Ok(Session {
        unmounter,
        notifier,
        thread,
    })
}

/// Drops the kernel's cached name of each snapshot or checkpoint it is told of, removed
/// behind the kernel's back (looked up with a long TTL). On a thread of its own: a
/// deletion may come from a request on the directory itself (a prune of `.snapshots`),
/// during which the kernel holds the directory that the invalidation must lock.
fn kernel_forgetter(notifier: &fuser::Notifier) -> Result<volume::Pruned, MountError> {
    let notifier = notifier.clone();
    let (names, deleted) = std::sync::mpsc::channel::<(volume::NodeId, Vec<u8>)>();
    std::thread::Builder::new()
        .name("snapfs-forget".into())
        .spawn(move || {
            for (parent, name) in deleted {
                let parent = fuser::INodeNo(parent.raw());
                if let Err(e) = notifier.inval_entry(parent, std::ffi::OsStr::from_bytes(&name)) {
                    tracing::debug!(error = %e, "cannot invalidate a deleted snapshot's name");
                }
            }
        })
        .map_err(MountError::Daemon)?;
    Ok(Box::new(move |parent: volume::NodeId, name: &[u8]| {
        // Fails only once the thread is gone, at exit: nothing is cached then.
        let _ = names.send((parent, name.to_vec()));
    }))
}

/// Drops the kernel's cached attributes of each live node the core changed behind its
/// back (see `volume::AttrsChanged`), at once, on the thread that changed it: unlike a
/// name (`kernel_forgetter`), an inode's attributes are dropped without any lock the
/// kernel may hold while it waits for this daemon.
fn kernel_attr_dropper(notifier: &fuser::Notifier) -> volume::AttrsChanged {
    let notifier = notifier.clone();
    Box::new(move |node: volume::NodeId| {
        // A negative offset: the attributes only; the cached pages hold the same bytes.
        if let Err(e) = notifier.inval_inode(fuser::INodeNo(node.raw()), -1, 0) {
            tracing::debug!(error = %e, "cannot drop the kernel's cached attributes");
        }
    })
}

/// Kernel read-ahead of the mount, in KiB: the size of one FUSE request (`max_pages`).
const READ_AHEAD_KB: u32 = 1024;

/// Lets the kernel read ahead (and so send reads of) up to `READ_AHEAD_KB` at a time: it
/// offers a FUSE mount no more than its default of 128 KiB at init, so without this every
/// sequential read is cut into 128 KiB requests, 8 round trips per MiB. Raised through the
/// mount's backing device in sysfs (root only); a failure only costs speed.
fn widen_read_ahead(mountpoint: &Path) {
    use std::os::unix::fs::MetadataExt;
    // The session thread answers the stat (the kernel waits for init first).
    let result = fs::metadata(mountpoint).and_then(|meta| {
        let dev = meta.dev();
        let path = format!(
            "/sys/class/bdi/{}:{}/read_ahead_kb",
            libc::major(dev),
            libc::minor(dev)
        );
        fs::write(path, READ_AHEAD_KB.to_string())
    });
    if let Err(e) = result {
        tracing::info!(error = %e, "kernel read-ahead stays at its default");
    }
}

/// Reports ready, then waits for an unmount or a signal (which unmounts), and for the
/// session to end.
fn wait_for_unmount(session: Session, ready: &mut Option<fs::File>, signals: &libc::sigset_t) {
    let Session {
        mut unmounter,
        thread: session_thread,
        ..
    } = session;
    if let Some(mut pipe) = ready.take() {
        let _ = pipe.write_all(b"ready");
    }
    crate::sd_notify::ready();
    let mut signal = 0;
    // SAFETY: waits on the set initialised above; `signal` receives the number.
    unsafe { libc::sigwait(signals, &mut signal) };
    crate::sd_notify::stopping();
    if signal != libc::SIGUSR1 {
        tracing::info!(signal, "unmounting on signal");
        if let Err(e) = unmounter.unmount() {
            tracing::warn!(error = %e, "unmount failed");
        }
    }
    match session_thread.join() {
        Ok(Err(e)) => tracing::warn!(error = %e, "FUSE session ended with an error"),
        Err(_) => tracing::error!("FUSE session thread panicked"),
        Ok(Ok(())) => {}
    }
}

/// Opens the volume; a daemon of the same data dir that is still shutting down (after a
/// `umount`) gets a few seconds to let go of the lock.
/// Opens the volume; with `--from`, a new data dir first becomes a volume whose live tree
/// is that snapshot (metadata now, blocks on first read), with the snapshot's block size.
fn open_from(args: &MountArgs, runtime: &tokio::runtime::Handle) -> Result<Volume, MountError> {
    let is_new = !args.data_dir.join("catalog.db").exists();
    if let (true, true, Some(url)) = (args.read_only, is_new, &args.store) {
        // A new follower takes the block size of what it follows.
        let listing = StoreChain::open(runtime, url, None)?.list()?;
        let options = volume::Options {
            block_size: listing
                .snapshots
                .first()
                .map_or(args.volume.block_size, |m| m.block_size),
            ..args.volume.clone()
        };
        return open_volume(args, &options);
    }
    let Some((url, snapshot)) = &args.from else {
        return open_volume(args, &args.volume);
    };
    if !is_new {
        let volume = open_volume(args, &args.volume)?;
        return match volume.is_made_from(url, snapshot)? {
            true => Ok(volume),
            false => Err(MountError::Reported(format!(
                "{} already holds a volume: --from needs a new data dir (--data)",
                args.data_dir.display()
            ))),
        };
    }
    let source = StoreSource::open(runtime, url, snapshot)?;
    let options = volume::Options {
        block_size: source.block_size_of(),
        ..args.volume.clone()
    };
    let volume = open_volume(args, &options)?;
    let entries = volume.import(&source)?;
    volume.remember_origin(url, snapshot)?;
    let snapshot = crate::display::escaped(snapshot);
    tracing::info!(origin = %url, snapshot = %snapshot, entries, "volume made from a snapshot");
    Ok(volume)
}

fn open_volume(args: &MountArgs, options: &volume::Options) -> Result<Volume, MountError> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match Volume::open(&args.data_dir, options) {
            Err(volume::Error::Locked { .. }) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100));
            }
            result => return Ok(result?),
        }
    }
}

fn mount_config(args: &MountArgs) -> Config {
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(fs_name(&args.data_dir)),
        MountOption::Subtype("snapfs".into()),
        MountOption::DefaultPermissions,
        MountOption::NoAtime,
    ];
    if args.read_only {
        config.mount_options.push(MountOption::RO);
    }
    config.acl = if args.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    config.n_threads = Some(4);
    config.clone_fd = true;
    config
}

/// The mount's source as /proc/mounts shows it: `snapfs:DATA_DIR`, so `snapfs umount` can
/// find the daemon. Paths that mount options cannot carry fall back to plain `snapfs`.
fn fs_name(data_dir: &Path) -> String {
    let path = data_dir.to_string_lossy();
    if path.contains(|c: char| c == ',' || c.is_whitespace() || c == '\\') {
        "snapfs".into()
    } else {
        format!("snapfs:{path}")
    }
}

/// Unmounts `mountpoint` and waits for its daemon to finish flushing and exit.
pub fn unmount(mountpoint: &Path) -> Result<(), MountError> {
    let mountpoint = fs::canonicalize(mountpoint).map_err(|source| MountError::Mountpoint {
        path: mountpoint.to_owned(),
        source,
    })?;
    let source = mount_source(&mountpoint).ok_or_else(|| {
        MountError::Reported(format!("{} is not a snapfs mount", mountpoint.display()))
    })?;
    // The daemon holds this lock until it has flushed everything and exited.
    let daemon_lock = source
        .strip_prefix("snapfs:")
        .and_then(|dir| fs::File::open(Path::new(dir).join("lock")).ok());
    detach_mount(&mountpoint, 0).map_err(|source| match source.raw_os_error() {
        Some(libc::EBUSY) => MountError::Reported(format!(
            "{} is busy: a process has a file or its working directory there \
             (`fuser -vm {}` lists them); nothing was unmounted",
            mountpoint.display(),
            mountpoint.display()
        )),
        _ => MountError::Mountpoint {
            path: mountpoint.clone(),
            source,
        },
    })?;
    if let Some(lock) = daemon_lock {
        let deadline = Instant::now() + Duration::from_secs(120);
        // SAFETY: flock only reads the descriptor, which `lock` keeps open.
        while unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) } != 0 {
            if Instant::now() > deadline {
                return Err(MountError::Reported(format!(
                    "{} is unmounted but its daemon is still flushing after 2 minutes",
                    mountpoint.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    Ok(())
}

/// Unmounts `mountpoint` with umount2's `flags` (`MNT_DETACH`: at once, busy or dead), or
/// through fusermount3 for a user who may not call umount2.
fn detach_mount(mountpoint: &Path, flags: libc::c_int) -> std::io::Result<()> {
    let c_path = CString::new(mountpoint.as_os_str().as_bytes()).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the path contains a NUL byte",
        )
    })?;
    // SAFETY: umount2 reads the NUL-terminated path.
    if unsafe { libc::umount2(c_path.as_ptr(), flags) } == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    let lazy = if flags & libc::MNT_DETACH != 0 {
        "-uz"
    } else {
        "-u"
    };
    let fallback = std::process::Command::new("fusermount3")
        .arg(lazy)
        .arg(mountpoint)
        .stdin(std::process::Stdio::null())
        .output();
    match fallback {
        Ok(out) if out.status.success() => Ok(()),
        // A user who may not call umount2 learns the reason from fusermount3 alone.
        Ok(out) if err.raw_os_error() == Some(libc::EPERM) => {
            let reason = String::from_utf8_lossy(&out.stderr).trim().to_owned();
            Err(if reason.ends_with("Device or resource busy") {
                std::io::Error::from_raw_os_error(libc::EBUSY)
            } else {
                std::io::Error::other(reason)
            })
        }
        _ => Err(err),
    }
}

/// The data dir of the snapfs mount at `mountpoint`.
pub fn data_dir_of_mount(mountpoint: &Path) -> Result<PathBuf, MountError> {
    let canonical = fs::canonicalize(mountpoint).map_err(|source| MountError::Mountpoint {
        path: mountpoint.to_owned(),
        source,
    })?;
    mount_source(&canonical)
        .and_then(|source| source.strip_prefix("snapfs:").map(PathBuf::from))
        .ok_or_else(|| {
            MountError::Reported(format!(
                "{} is not a snapfs mount with a known data dir: pass --data DIR",
                mountpoint.display()
            ))
        })
}

/// The source of the FUSE mount at `mountpoint`, from /proc/self/mountinfo.
fn mount_source(mountpoint: &Path) -> Option<String> {
    let wanted = mountpoint.to_string_lossy();
    snapfs_mounts()
        .into_iter()
        .find_map(|(at, source)| (at == *wanted).then_some(source))
}

/// Where the volume of `data_dir` is mounted, if it is (and its path could be named in
/// the mount's source: see `fs_name`).
pub fn mountpoint_of(data_dir: &Path) -> Option<PathBuf> {
    let dir = fs::canonicalize(data_dir).ok()?;
    let wanted = fs_name(&dir);
    if !wanted.starts_with("snapfs:") {
        return None;
    }
    snapfs_mounts()
        .into_iter()
        .find_map(|(at, source)| (source == wanted).then(|| PathBuf::from(at)))
}

/// The snapfs FUSE mounts as (mountpoint, source), the latest first.
fn snapfs_mounts() -> Vec<(String, String)> {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    info.lines()
        .rev()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let separator = fields.iter().position(|f| *f == "-")?;
            let fs_type = fields.get(separator + 1)?;
            let source = fields.get(separator + 2)?;
            let mountpoint = fields.get(4)?;
            (fs_type.starts_with("fuse") && source.starts_with("snapfs"))
                .then(|| (unescape_mountinfo(mountpoint), source.to_string()))
        })
        .collect()
}

/// Decodes the octal escapes (`\040` for a space...) the kernel writes in mountinfo.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match (bytes[i], octal) {
            (b'\\', Some(digits)) => {
                out.push(
                    digits
                        .iter()
                        .fold(0u8, |n, d| n.wrapping_mul(8) + (d - b'0')),
                );
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::unescape_mountinfo;

    #[test]
    fn mountinfo_escapes_decode() {
        assert_eq!(
            unescape_mountinfo("/var/tmp/sp\\040ace/mp"),
            "/var/tmp/sp ace/mp"
        );
        assert_eq!(unescape_mountinfo("/a\\011b\\134c"), "/a\tb\\c");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
    }
}
