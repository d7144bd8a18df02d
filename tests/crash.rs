//! Torture tests of issue 6 through real mounts: the daemon killed with SIGKILL at random
//! and at chosen moments (big writes, right after fsync, snapshot creation and deletion,
//! uploads) and checked against a model after each remount; restore killed and rerun;
//! a machine crash (a foreign boot id in the running marker, a block file emptied);
//! a store that corrupts or truncates what it sends, or is unreachable for a while.
//!
//! `SNAPFS_TORTURE_SECONDS` sets the budget, about the wall time of the whole file with two
//! test threads (default: a short CI profile); the seed of each test is printed and
//! `SNAPFS_TORTURE_SEED` replays it.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::s3::{Fault, FaultProxy, S3Env, unique_prefix};
use common::*;
use snapfs::blocks::BlockHash;

// ---------------------------------------------------------------------------------------
// Budget, seed, randomness
// ---------------------------------------------------------------------------------------

/// The budget of the short (CI) profile, in seconds, when SNAPFS_TORTURE_SECONDS is unset.
const SHORT_PROFILE: u64 = 100;

fn torture_seconds() -> u64 {
    std::env::var("SNAPFS_TORTURE_SECONDS")
        .ok()
        .map(|s| {
            s.parse()
                .unwrap_or_else(|_| panic!("SNAPFS_TORTURE_SECONDS={s:?} is not a number"))
        })
        .unwrap_or(SHORT_PROFILE)
}

/// `fraction` of the budget.
fn budget(fraction: f64) -> Duration {
    Duration::from_secs_f64(torture_seconds() as f64 * fraction)
}

/// The seed of `test`: SNAPFS_TORTURE_SEED, or a fresh one; printed for a replay.
fn seed(test: &str) -> u64 {
    let seed = match std::env::var("SNAPFS_TORTURE_SEED") {
        Ok(s) => s
            .parse()
            .unwrap_or_else(|_| panic!("SNAPFS_TORTURE_SEED={s:?} is not a number")),
        Err(_) => {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock after 1970")
                .subsec_nanos();
            u64::from(nanos) ^ (u64::from(std::process::id()) << 32)
        }
    };
    eprintln!(
        "{test}: SNAPFS_TORTURE_SEED={seed} SNAPFS_TORTURE_SECONDS={}",
        torture_seconds()
    );
    seed
}

/// xorshift64*: reproducible from the printed seed.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n`.
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn range(&mut self, low: u64, high: u64) -> u64 {
        low + self.below(high - low)
    }

    fn percent(&mut self, p: u64) -> bool {
        self.below(100) < p
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

// ---------------------------------------------------------------------------------------
// Shared checks
// ---------------------------------------------------------------------------------------

/// The end of a daemon log, for failure messages.
fn log_tail(mount: &Mount) -> String {
    let log = mount.daemon_log();
    let start = log.len().saturating_sub(6000);
    let start = (start..log.len())
        .find(|&i| log.is_char_boundary(i))
        .unwrap_or(log.len());
    log[start..].to_owned()
}

/// Polls `done` until it holds; panics with `what` after `timeout`.
fn wait_until(what: &str, timeout: Duration, done: impl FnMut() -> bool) {
    assert!(poll_until(timeout, done), "{what}: not after {timeout:?}");
}

/// Polls `done` until it holds (true) or `timeout` passes (false).
fn poll_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while !done() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

/// Runs `op` on another thread; panics if it takes longer than `limit` (a hung mount).
fn within<T: Send + 'static>(
    what: &str,
    limit: Duration,
    op: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(op());
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("{what} did not return within {limit:?}"))
}

/// The hashes of the stored (non-hole) blocks of `data`.
fn block_hashes(data: &[u8]) -> impl Iterator<Item = String> + '_ {
    data.chunks(BLOCK)
        .filter(|chunk| chunk.iter().any(|&b| b != 0))
        .map(|chunk| BlockHash::of(chunk).to_hex())
}

/// The hashes a block of each BLOCK-sized chunk of `data` may have (holes skipped):
/// snapfs stores a block up to its last byte written, so a chunk that ends in zeros (a
/// file extended past a short block) may be stored without them.
fn block_hash_choices(data: &[u8]) -> Vec<BTreeSet<String>> {
    data.chunks(BLOCK)
        .filter_map(|chunk| {
            let end = chunk.iter().rposition(|&b| b != 0)? + 1;
            let hash = |bytes: &[u8]| BlockHash::of(bytes).to_hex();
            Some(BTreeSet::from([hash(chunk), hash(&chunk[..end])]))
        })
        .collect()
}

/// Files (relative paths, `d/NAME` for the subdirectory) and their bytes under `root`.
fn read_files(root: &Path) -> io::Result<BTreeMap<String, Vec<u8>>> {
    let mut out = BTreeMap::new();
    for (dir, prefix) in [(root.to_owned(), ""), (root.join("d"), "d/")] {
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if entry.file_type()?.is_dir() {
                continue;
            }
            out.insert(format!("{prefix}{name}"), fs::read(entry.path())?);
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// The model and the workload of the kill -9 loop
// ---------------------------------------------------------------------------------------

/// Names the workload uses: in the root and in `d/`, so renames cross directories.
const NAMES: [&str; 8] = ["a", "b", "c", "e", "d/a", "d/b", "d/f", "d/g"];

#[derive(Clone, Debug)]
struct FileModel {
    content: Vec<u8>,
    /// Durable: fsynced (or flushed by a snapshot) and not modified since.
    clean: bool,
}

#[derive(Clone, Debug, Default)]
struct Model {
    files: BTreeMap<String, FileModel>,
    /// Snapshots whose mkdir returned and whose rmdir did not: the files they must show.
    snapshots: BTreeMap<String, BTreeMap<String, Vec<u8>>>,
    next_snapshot: u64,
}

impl Model {
    fn live(&self) -> BTreeMap<String, Vec<u8>> {
        self.files
            .iter()
            .map(|(name, file)| (name.clone(), file.content.clone()))
            .collect()
    }

    fn new_snapshot_name(&mut self) -> String {
        self.next_snapshot += 1;
        format!("s{}", self.next_snapshot)
    }
}

#[derive(Clone, Debug)]
enum Op {
    Write {
        name: String,
        offset: u64,
        len: usize,
        seed: u64,
        fsync: bool,
    },
    Truncate {
        name: String,
        len: u64,
    },
    Rename {
        from: String,
        to: String,
    },
    Unlink {
        name: String,
    },
    Fsync {
        name: String,
    },
    Snapshot {
        name: String,
    },
    DeleteSnapshot {
        name: String,
    },
}

impl Op {
    fn kind(&self) -> &'static str {
        match self {
            Op::Write { fsync: true, .. } => "write+fsync",
            Op::Write { .. } => "write",
            Op::Truncate { .. } => "truncate",
            Op::Rename { .. } => "rename",
            Op::Unlink { .. } => "unlink",
            Op::Fsync { .. } => "fsync",
            Op::Snapshot { .. } => "mkdir snapshot",
            Op::DeleteSnapshot { .. } => "rmdir snapshot",
        }
    }

    /// Does it on the mount.
    fn perform(&self, mnt: &Path) -> io::Result<()> {
        let snapshots = mnt.join(".snapshots");
        match self {
            Op::Write {
                name,
                offset,
                len,
                seed,
                fsync,
            } => {
                let file = OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(mnt.join(name))?;
                file.write_all_at(&pattern(*len, *seed), *offset)?;
                if *fsync {
                    file.sync_all()?;
                }
                Ok(())
            }
            Op::Truncate { name, len } => OpenOptions::new()
                .write(true)
                .open(mnt.join(name))?
                .set_len(*len),
            Op::Rename { from, to } => fs::rename(mnt.join(from), mnt.join(to)),
            Op::Unlink { name } => fs::remove_file(mnt.join(name)),
            Op::Fsync { name } => fs::File::open(mnt.join(name))?.sync_all(),
            Op::Snapshot { name } => fs::create_dir(snapshots.join(name)),
            Op::DeleteSnapshot { name } => fs::remove_dir(snapshots.join(name)),
        }
    }

    /// What it did once it returned.
    fn apply(&self, model: &mut Model) {
        match self {
            Op::Write {
                name,
                offset,
                len,
                seed,
                fsync,
            } => {
                let file = model.files.entry(name.clone()).or_insert(FileModel {
                    content: Vec::new(),
                    clean: false,
                });
                let (start, end) = (*offset as usize, *offset as usize + len);
                if file.content.len() < end {
                    file.content.resize(end, 0);
                }
                file.content[start..end].copy_from_slice(&pattern(*len, *seed));
                file.clean = *fsync;
            }
            Op::Truncate { name, len } => {
                let file = model
                    .files
                    .get_mut(name)
                    .expect("truncate of a modelled file");
                file.content.resize(*len as usize, 0);
                file.clean = false;
            }
            Op::Rename { from, to } => {
                let file = model.files.remove(from).expect("rename of a modelled file");
                model.files.insert(to.clone(), file);
            }
            Op::Unlink { name } => {
                model.files.remove(name);
            }
            Op::Fsync { name } => {
                model
                    .files
                    .get_mut(name)
                    .expect("fsync of a modelled file")
                    .clean = true;
            }
            Op::Snapshot { name } => {
                // A snapshot flushes every dirty buffer to the catalog first.
                let live = model.live();
                model.snapshots.insert(name.clone(), live);
                for file in model.files.values_mut() {
                    file.clean = true;
                }
            }
            Op::DeleteSnapshot { name } => {
                model.snapshots.remove(name);
            }
        }
    }

    /// The states the volume may be in after a kill while this op was in flight: not done,
    /// or done; a file whose data it was changing is of unknown content either way.
    fn outcomes(&self, model: &Model) -> Vec<Model> {
        let mut before = model.clone();
        let mut after = model.clone();
        self.apply(&mut after);
        match self {
            Op::Write { name, .. } | Op::Truncate { name, .. } | Op::Fsync { name } => {
                for m in [&mut before, &mut after] {
                    if let Some(file) = m.files.get_mut(name) {
                        file.clean = false;
                    }
                }
            }
            Op::Snapshot { .. } => {
                // Not pinned: the flush may or may not have happened, which changes nothing
                // for files that were clean.
            }
            Op::Rename { .. } | Op::Unlink { .. } | Op::DeleteSnapshot { .. } => {}
        }
        vec![before, after]
    }
}

/// A random next operation on the model.
fn random_op(rng: &mut Rng, model: &mut Model) -> Op {
    let existing: Vec<String> = model.files.keys().cloned().collect();
    let roll = rng.below(100);
    if existing.is_empty() || roll < 35 {
        let name = rng.pick(&NAMES).to_string();
        let size = model.files.get(&name).map_or(0, |f| f.content.len() as u64);
        return Op::Write {
            offset: rng.below((size + 1).min(3 * BLOCK as u64 / 2)),
            len: rng.range(1, 3 * BLOCK as u64 / 2) as usize,
            seed: rng.next(),
            fsync: rng.percent(50),
            name,
        };
    }
    let name = rng.pick(&existing).clone();
    match roll {
        35..50 => Op::Truncate {
            len: rng.below(model.files[&name].content.len() as u64 + BLOCK as u64),
            name,
        },
        50..62 => Op::Rename {
            from: name,
            to: rng.pick(&NAMES).to_string(),
        },
        62..68 => Op::Unlink { name },
        68..80 => Op::Fsync { name },
        80..92 if model.snapshots.len() < 4 => Op::Snapshot {
            name: model.new_snapshot_name(),
        },
        _ => match model.snapshots.keys().next() {
            Some(first) if rng.percent(60) => Op::DeleteSnapshot {
                name: first.clone(),
            },
            _ => Op::Fsync { name },
        },
    }
}

/// Where a cycle's kill lands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum KillPoint {
    /// After a random delay, whatever the workload is doing.
    Random,
    /// A few milliseconds into a write of several MiB.
    BigWrite,
    /// Right after an fsync returned (by the workload itself).
    AfterFsync,
    /// During the mkdir of a snapshot that has dirty data to flush.
    Mkdir,
    /// During the rmdir of a snapshot.
    Rmdir,
    /// While a snapshot is uploading (pending, some bytes sent).
    Upload,
}

const TARGETED: [KillPoint; 5] = [
    KillPoint::BigWrite,
    KillPoint::AfterFsync,
    KillPoint::Mkdir,
    KillPoint::Rmdir,
    KillPoint::Upload,
];

/// What the workload of one cycle leaves: the op it was in when the kill came (if any),
/// an error that came before the kill (a bug), counts of ops by kind.
struct CycleEnd {
    inflight: Option<Op>,
    early_error: Option<(Op, io::Error)>,
    ops: BTreeMap<&'static str, u64>,
    /// For KillPoint::Upload: whether the snapshot was still pending at the kill.
    upload_pending: Option<bool>,
}

struct Killer {
    pid: i32,
    killed: AtomicBool,
}

impl Killer {
    fn kill(&self) {
        if !self.killed.swap(true, Ordering::SeqCst) {
            // SAFETY: SIGKILL to the daemon, our child (reaped later by Mount::kill9).
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
        }
    }

    fn killed(&self) -> bool {
        self.killed.load(Ordering::SeqCst)
    }
}

/// Runs ops on `mnt` until one fails. `arm` asks the main thread to kill after a delay;
/// targeted kill points are set up after a few random ops.
fn workload(
    mnt: &Path,
    rng: &mut Rng,
    model: &mut Model,
    point: KillPoint,
    killer: &Killer,
    arm: mpsc::Sender<Duration>,
) -> CycleEnd {
    let mut end = CycleEnd {
        inflight: None,
        early_error: None,
        ops: BTreeMap::new(),
        upload_pending: None,
    };
    let warmup = rng.below(12);
    let mut step = 0u64;
    loop {
        let targeted = point != KillPoint::Random && step == warmup;
        step += 1;
        let mut ops = Vec::new();
        let mut arm_delay = None;
        if targeted {
            match point {
                KillPoint::BigWrite => {
                    ops.push(Op::Write {
                        name: rng.pick(&NAMES).to_string(),
                        offset: 0,
                        len: 6 << 20,
                        seed: rng.next(),
                        fsync: rng.percent(30),
                    });
                    arm_delay = Some(Duration::from_millis(rng.range(1, 60)));
                }
                KillPoint::AfterFsync => ops.push(Op::Write {
                    name: rng.pick(&NAMES).to_string(),
                    offset: rng.below(BLOCK as u64),
                    len: rng.range(1, 2 * BLOCK as u64) as usize,
                    seed: rng.next(),
                    fsync: true,
                }),
                KillPoint::Mkdir => {
                    // Dirty data for the snapshot to flush, in two files.
                    for _ in 0..2 {
                        ops.push(Op::Write {
                            name: rng.pick(&NAMES).to_string(),
                            offset: 0,
                            len: 3 << 20,
                            seed: rng.next(),
                            fsync: false,
                        });
                    }
                    ops.push(Op::Snapshot {
                        name: model.new_snapshot_name(),
                    });
                    arm_delay = Some(Duration::from_micros(rng.below(3000)));
                }
                KillPoint::Rmdir => {
                    if model.snapshots.is_empty() {
                        ops.push(Op::Snapshot {
                            name: model.new_snapshot_name(),
                        });
                    }
                    ops.push(Op::DeleteSnapshot {
                        name: String::new(),
                    });
                    arm_delay = Some(Duration::from_micros(rng.below(2000)));
                }
                KillPoint::Upload => {
                    ops.push(Op::Write {
                        name: rng.pick(&NAMES).to_string(),
                        offset: 0,
                        len: 3 << 20,
                        seed: rng.next(),
                        fsync: false,
                    });
                    ops.push(Op::Snapshot {
                        name: model.new_snapshot_name(),
                    });
                }
                KillPoint::Random => unreachable!("not targeted"),
            }
        } else {
            ops.push(random_op(rng, model));
        }
        let last = ops.len() - 1;
        for (i, mut op) in ops.into_iter().enumerate() {
            if let Op::DeleteSnapshot { name } = &mut op
                && name.is_empty()
            {
                *name = rng
                    .pick(&model.snapshots.keys().cloned().collect::<Vec<_>>())
                    .clone();
            }
            if i == last
                && let Some(delay) = arm_delay
            {
                let _ = arm.send(delay);
            }
            end.inflight = Some(op.clone());
            if let Err(e) = op.perform(mnt) {
                if !killer.killed() {
                    end.early_error = Some((op, e));
                }
                return end;
            }
            end.inflight = None;
            op.apply(model);
            *end.ops.entry(op.kind()).or_default() += 1;
        }
        if targeted {
            match point {
                KillPoint::AfterFsync => killer.kill(),
                KillPoint::Upload => {
                    let snap = mnt
                        .join(".snapshots")
                        .join(format!("s{}", model.next_snapshot));
                    let deadline = Instant::now() + Duration::from_secs(20);
                    let pending = loop {
                        let state = getxattr(&snap, "user.snapfs.state").unwrap_or_default();
                        let progress = getxattr(&snap, "user.snapfs.progress").unwrap_or_default();
                        let sent = String::from_utf8_lossy(&progress)
                            .split('/')
                            .next()
                            .and_then(|n| n.parse::<u64>().ok())
                            .unwrap_or(0);
                        if state != b"pending" || sent > 0 || Instant::now() > deadline {
                            break state == b"pending";
                        }
                        std::thread::sleep(Duration::from_millis(2));
                    };
                    end.upload_pending = Some(pending);
                    killer.kill();
                }
                _ => {}
            }
        }
    }
}

/// After a remount: the volume must be in one of `candidates` (per its namespace), with
/// every clean file's bytes and every snapshot exactly as modelled, snapshots pending or
/// completed. Returns the model to go on with: dirty files take the bytes they have now.
fn check_recovered(
    mount: &Mount,
    candidates: Vec<Model>,
    stats: &mut Stats,
    context: &str,
) -> Model {
    let mnt = mount.path();
    let live = read_files(mnt).expect("read the live tree after a remount");
    let snapshots: BTreeSet<String> = fs::read_dir(mnt.join(".snapshots"))
        .expect("list .snapshots")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    let names: BTreeSet<&String> = live.keys().collect();
    let Some(mut model) = candidates.into_iter().find(|m| {
        m.files.keys().collect::<BTreeSet<_>>() == names
            && m.snapshots.keys().cloned().collect::<BTreeSet<_>>() == snapshots
    }) else {
        panic!(
            "{context}: after the remount, files {names:?} and snapshots {snapshots:?} match \
             no state the model allows; daemon log:\n{}",
            log_tail(mount)
        );
    };
    for (name, file) in &mut model.files {
        if file.clean {
            assert_bytes_eq(
                &live[name],
                &file.content,
                &format!("{context}: fsynced {name}"),
            );
            stats.files_checked += 1;
            stats.bytes_checked += file.content.len() as u64;
        } else {
            file.content = live[name].clone();
            file.clean = true;
        }
    }
    for (snap, files) in &model.snapshots {
        let dir = snapshot_dir(mount, snap);
        let state = snapshot_attr(mount, snap, "user.snapfs.state");
        assert!(
            state == "pending" || state == "completed",
            "{context}: snapshot {snap} is {state}; daemon log:\n{}",
            log_tail(mount)
        );
        let actual = read_files(&dir).expect("read a snapshot");
        assert_eq!(
            actual.keys().collect::<Vec<_>>(),
            files.keys().collect::<Vec<_>>(),
            "{context}: files of snapshot {snap}"
        );
        for (name, content) in files {
            assert_bytes_eq(&actual[name], content, &format!("{context}: {snap}/{name}"));
            stats.bytes_checked += content.len() as u64;
        }
        stats.snapshots_checked += 1;
    }
    model
}

#[derive(Default, Debug)]
struct Stats {
    cycles: u64,
    kills: BTreeMap<String, u64>,
    ops: BTreeMap<&'static str, u64>,
    files_checked: u64,
    bytes_checked: u64,
    snapshots_checked: u64,
    faults: BTreeMap<String, u64>,
}

/// How the daemon reaches its store in one cycle.
enum Route<'a> {
    /// The default file:// store: nothing to choose.
    Local,
    /// An S3 server, directly or through a proxy injecting a random fault now and then.
    S3 {
        s3: &'a S3Env,
        proxy: &'a FaultProxy,
        through: &'a S3Env,
    },
}

/// The kill -9 loop: cycles of workload and kill until `time` is spent (at least
/// `min_cycles`), each checked after a remount; then every snapshot must complete.
/// `model`: what the volume holds at the start (its root has the directory `d`).
fn crash_cycles(
    test: &str,
    mount: &mut Mount,
    mut model: Model,
    route: &Route,
    rng: &mut Rng,
    time: Duration,
    min_cycles: u64,
) -> (Model, Stats) {
    let mut stats = Stats::default();
    let started = Instant::now();
    while stats.cycles < min_cycles || started.elapsed() < time {
        let cycle = stats.cycles;
        let point = if cycle % 2 == 0 {
            KillPoint::Random
        } else {
            TARGETED[(cycle / 2) as usize % TARGETED.len()]
        };
        let killer = Killer {
            pid: mount.pid(),
            killed: AtomicBool::new(false),
        };
        let (arm_tx, arm_rx) = mpsc::channel();
        let random_delay = Duration::from_millis(match rng.below(3) {
            0 => rng.range(1, 50),
            1 => rng.range(50, 500),
            _ => rng.range(500, 2500),
        });
        let mnt = mount.path().to_owned();
        let seed = rng.next();
        let end = std::thread::scope(|scope| {
            let model = &mut model;
            let killer = &killer;
            let worker = scope
                .spawn(move || workload(&mnt, &mut Rng::new(seed), model, point, killer, arm_tx));
            match point {
                KillPoint::Random => {
                    std::thread::sleep(random_delay);
                    killer.kill();
                }
                KillPoint::AfterFsync | KillPoint::Upload => {}
                _ => {
                    // Armed by the workload just before the op; it also gives up the
                    // sender if it stops first.
                    if let Ok(delay) = arm_rx.recv() {
                        std::thread::sleep(delay);
                    }
                    killer.kill();
                }
            }
            worker.join().expect("workload thread")
        });
        mount.kill9();
        let context = format!(
            "{test} cycle {cycle} ({point:?}, in flight {:?})",
            end.inflight
        );
        if let Some((op, e)) = &end.early_error {
            panic!(
                "{context}: {op:?} failed before the kill: {e}; daemon log:\n{}",
                log_tail(mount)
            );
        }
        let kind = match (point, end.upload_pending) {
            (KillPoint::Upload, Some(false)) => "Upload (already completed)".to_owned(),
            (KillPoint::Random, _) => format!(
                "Random (in {})",
                end.inflight.as_ref().map_or("between ops", Op::kind)
            ),
            (KillPoint::BigWrite | KillPoint::Mkdir | KillPoint::Rmdir, _) => {
                let during = matches!(
                    (point, &end.inflight),
                    (KillPoint::BigWrite, Some(Op::Write { .. }))
                        | (KillPoint::Mkdir, Some(Op::Snapshot { .. }))
                        | (KillPoint::Rmdir, Some(Op::DeleteSnapshot { .. }))
                );
                let when = if during {
                    "during it"
                } else {
                    "after it returned"
                };
                format!("{point:?} ({when})")
            }
            _ => format!("{point:?}"),
        };
        *stats.kills.entry(kind).or_default() += 1;
        for (kind, n) in end.ops {
            *stats.ops.entry(kind).or_default() += n;
        }

        if let Route::S3 { s3, proxy, through } = route {
            // Direct, or through the proxy with a fault every few requests.
            if rng.percent(50) {
                mount.set_env(s3.vars());
            } else {
                let fault = *rng.pick(&[Fault::SlowDown, Fault::InternalError, Fault::Reset]);
                let n = rng.range(2, 6);
                proxy.fail_every(n, fault);
                *stats.faults.entry(format!("{fault:?} cycles")).or_default() += 1;
                mount.set_env(through.vars());
            }
        }
        mount.remount();
        let candidates = match &end.inflight {
            Some(op) => op.outcomes(&model),
            None => vec![model.clone()],
        };
        model = check_recovered(mount, candidates, &mut stats, &context);
        stats.cycles += 1;
    }
    if let Route::S3 { s3, proxy, .. } = route {
        stats
            .faults
            .insert("proxy faults injected".into(), proxy.counts().1);
        proxy.set_fault(Fault::None);
        mount.set_env(s3.vars());
        mount.remount();
    }
    for snap in model.snapshots.keys() {
        wait_completed(mount, snap);
    }
    let live = read_files(mount.path()).expect("read the live tree");
    assert_eq!(live, model.live(), "{test}: the live tree at the end");
    (model, stats)
}

/// Every modelled snapshot, restored from the store alone (`url`; `env`: credentials),
/// must hold exactly the files the model says.
fn restore_each_from_store(mount: &Mount, model: &Model, url: &str, env: &[(String, String)]) {
    for (name, files) in &model.snapshots {
        let dest = mount.scratch(&format!("restored-{name}"));
        let out = run(snapfs()
            .args(["restore", "--store", url, name])
            .arg(&dest)
            .envs(env.iter().map(|(k, v)| (k, v))));
        assert!(
            out.status.success(),
            "restore {name} from {url}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let restored = read_files(&dest).expect("read the restored tree");
        assert_eq!(
            restored.keys().collect::<Vec<_>>(),
            files.keys().collect::<Vec<_>>(),
            "files of {name} restored from {url}"
        );
        for (file, content) in files {
            assert_bytes_eq(
                &restored[file],
                content,
                &format!("{name}/{file} from {url}"),
            );
        }
    }
}

/// Every block of every modelled snapshot: the hashes it may have.
fn snapshot_block_hashes(model: &Model) -> BTreeSet<BTreeSet<String>> {
    model
        .snapshots
        .values()
        .flat_map(|files| files.values())
        .flat_map(|content| block_hash_choices(content))
        .collect()
}

// ---------------------------------------------------------------------------------------
// kill -9 of the daemon
// ---------------------------------------------------------------------------------------

#[test]
fn kill9_at_random_moments_with_an_s3_store_loses_nothing() {
    let mut rng = Rng::new(seed("kill9_s3"));
    let s3 = S3Env::garage();
    let (proxy, through) = FaultProxy::for_env(&s3);
    let prefix = unique_prefix("crash");
    let url = s3.url(&prefix);
    // A modest rate limit keeps uploads in progress long enough to be killed; a small cache
    // evicts stored blocks, so reads and partial writes fetch them back between kills.
    // Every operation commits on its own (`--commit-interval 0`): the model holds each
    // one that returned to survive, which only that mode promises without fsync.
    let mut mount = s3.mount_store(
        &prefix,
        &[
            "--upload-limit",
            "8M",
            "--cache-size",
            "2M",
            "--commit-interval",
            "0",
        ],
    );
    let route = Route::S3 {
        s3: &s3,
        proxy: &proxy,
        through: &through,
    };
    fs::create_dir(mount.path().join("d")).expect("mkdir d");
    let (model, stats) = crash_cycles(
        "kill9_s3",
        &mut mount,
        Model::default(),
        &route,
        &mut rng,
        budget(0.7),
        10,
    );

    // The snapshots deleted leave the store, the others stay.
    let client = s3.client();
    let mut held = Vec::new();
    let exact = poll_until(COMPLETION_TIMEOUT, || {
        held = client.list(&format!("{prefix}snapshots/"));
        held.len() == model.snapshots.len()
    });
    if !exact {
        let listed = run(snapfs()
            .args(["snapshot", "list", "--store", &url])
            .envs(s3.vars()));
        panic!(
            "the store holds {held:?}, not the {} remaining snapshots {:?}, after {:?}; \
             what it lists:\n{}{}\ndaemon log:\n{}",
            model.snapshots.len(),
            model.snapshots.keys().collect::<Vec<_>>(),
            COMPLETION_TIMEOUT,
            String::from_utf8_lossy(&listed.stdout),
            String::from_utf8_lossy(&listed.stderr),
            log_tail(&mount)
        );
    }
    // Every block of every snapshot is in the bucket. Looked at once the daemon is gone:
    // its garbage collection may move a block to a new pack between the listing of the
    // packs and the read of the old one, and the test would miss it in both.
    mount.unmount();
    let stored: BTreeSet<String> = packed_in_bucket(&client, &prefix).into_keys().collect();
    let needed = snapshot_block_hashes(&model);
    let missing: Vec<_> = needed
        .iter()
        .filter(|keys| keys.is_disjoint(&stored))
        .collect();
    assert!(missing.is_empty(), "blocks missing from {url}: {missing:?}");
    restore_each_from_store(&mount, &model, &url, &s3.vars());
    assert_verify_clean(mount.data_dir(), &s3.vars());
    eprintln!(
        "kill9_s3: {} cycles, kills {:?}, ops {:?}, faults {:?}; checked {} fsynced files, \
         {} snapshots, {} bytes; {} blocks in the store; {} snapshots restored from it",
        stats.cycles,
        stats.kills,
        stats.ops,
        stats.faults,
        stats.files_checked,
        stats.snapshots_checked,
        stats.bytes_checked,
        needed.len(),
        model.snapshots.len()
    );
}

#[test]
fn kill9_at_random_moments_with_the_default_store_loses_nothing() {
    let mut rng = Rng::new(seed("kill9_local"));
    // As above: the model needs every returned operation to survive.
    let mut mount = Mount::with_args(&["--commit-interval", "0"]);
    fs::create_dir(mount.path().join("d")).expect("mkdir d");
    let (model, stats) = crash_cycles(
        "kill9_local",
        &mut mount,
        Model::default(),
        &Route::Local,
        &mut rng,
        budget(0.4),
        6,
    );
    // Looked at once the daemon is gone, as above.
    mount.unmount();
    let store = mount.data_dir().join("store");
    let stored = packed_blocks_in_dir(&store);
    for hashes in snapshot_block_hashes(&model) {
        assert!(
            hashes.iter().any(|hash| stored.contains_key(hash)),
            "{hashes:?} missing from {}",
            store.display()
        );
    }
    let url = format!("file://{}", store.display());
    restore_each_from_store(&mount, &model, &url, &[]);
    assert_verify_clean(mount.data_dir(), &[]);
    eprintln!(
        "kill9_local: {} cycles, kills {:?}, ops {:?}; checked {} fsynced files, {} snapshots, \
         {} bytes; {} snapshots restored from the store",
        stats.cycles,
        stats.kills,
        stats.ops,
        stats.files_checked,
        stats.snapshots_checked,
        stats.bytes_checked,
        model.snapshots.len()
    );
}

#[test]
fn kill9_of_a_volume_made_from_a_snapshot_loses_nothing() {
    let mut rng = Rng::new(seed("kill9_lazy"));
    let s3 = S3Env::garage();
    let (proxy, through) = FaultProxy::for_env(&s3);
    let source_prefix = unique_prefix("crash-lazy-source");
    let copy_prefix = unique_prefix("crash-lazy-copy");
    // The source: files in a completed snapshot, which the copy loads lazily.
    let mut source = s3.mount_store(&source_prefix, &[]);
    fs::create_dir(source.path().join("d")).expect("mkdir d");
    let mut model = Model::default();
    for name in ["a", "c", "d/a", "d/g"] {
        let content = pattern(
            rng.range(BLOCK as u64, 5 * BLOCK as u64) as usize,
            rng.next(),
        );
        fs::write(source.path().join(name), &content).expect("write");
        model.files.insert(
            name.to_owned(),
            FileModel {
                content,
                clean: true,
            },
        );
    }
    take_snapshot(&source, "origin");
    wait_completed(&source, "origin");
    source.unmount();

    let from = format!("{}@origin", s3.url(&source_prefix));
    let copy_url = s3.url(&copy_prefix);
    // Every operation commits on its own, as the model needs (see above).
    let args = [
        "--store",
        &copy_url,
        "--cache-size",
        "1M",
        "--commit-interval",
        "0",
    ];
    let mut copy = s3.mount(&[&["--from", &from][..], &args].concat());
    // Later mounts keep the origin; --from is for a new data dir only.
    copy.set_args(&args);
    let route = Route::S3 {
        s3: &s3,
        proxy: &proxy,
        through: &through,
    };
    let (model, stats) = crash_cycles(
        "kill9_lazy",
        &mut copy,
        model,
        &route,
        &mut rng,
        budget(0.3),
        6,
    );
    copy.unmount();
    // The copy's snapshots restore from its store alone (shared blocks from the origin's).
    restore_each_from_store(&copy, &model, &copy_url, &s3.vars());
    assert_verify_clean(copy.data_dir(), &s3.vars());
    eprintln!(
        "kill9_lazy: {} cycles, kills {:?}, ops {:?}, faults {:?}; checked {} fsynced files, \
         {} snapshots, {} bytes; {} snapshots restored from the store",
        stats.cycles,
        stats.kills,
        stats.ops,
        stats.faults,
        stats.files_checked,
        stats.snapshots_checked,
        stats.bytes_checked,
        model.snapshots.len()
    );
}

// ---------------------------------------------------------------------------------------
// kill -9 of restore
// ---------------------------------------------------------------------------------------

/// The tree a restore must reproduce: paths, modes, file sizes and bytes (the root's own
/// metadata aside).
fn contents(root: &Path) -> Vec<(PathBuf, u32, u64, Vec<u8>)> {
    tree_state(root)
        .into_iter()
        .filter(|(path, _)| !path.as_os_str().is_empty())
        .map(|(path, node)| {
            let file = node.mode & libc::S_IFMT == libc::S_IFREG;
            (path, node.mode, node.size * u64::from(file), node.content)
        })
        .collect()
}

/// Writes a tree with big and small files, a sparse one, a hard link and a symlink.
fn populate(root: &Path, seed: u64) {
    fs::create_dir_all(root.join("dir/sub")).expect("mkdir");
    fs::write(root.join("big"), pattern(48 * BLOCK + 99, seed)).expect("write");
    fs::write(root.join("dir/text"), text(8 * BLOCK)).expect("write");
    fs::write(root.join("dir/sub/small"), b"small").expect("write");
    let sparse = create(&root.join("sparse"));
    sparse.set_len(4 << 20).expect("set_len");
    sparse
        .write_all_at(&pattern(BLOCK / 2, seed + 1), 3 << 20)
        .expect("write");
    fs::hard_link(root.join("big"), root.join("dir/big-link")).expect("link");
    std::os::unix::fs::symlink("dir/text", root.join("sym")).expect("symlink");
}

#[test]
fn a_restore_killed_at_random_moments_reruns_to_completion_with_overwrite() {
    let mut rng = Rng::new(seed("restore_kill"));
    let s3 = S3Env::garage();
    let prefix = unique_prefix("crash-restore");
    let mut mount = s3.mount_store(&prefix, &[]);
    populate(mount.path(), rng.next());
    take_snapshot(&mount, "s");
    wait_completed(&mount, "s");
    let expected = contents(&snapshot_dir(&mount, "s"));
    mount.unmount();

    // How long a whole restore takes here: the kills land within that.
    let timed = Instant::now();
    let out = s3.restore(&s3.url(&prefix), "s", &mount.scratch("timed"), &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let whole = timed.elapsed().as_millis() as u64;

    let rounds = if torture_seconds() > SHORT_PROFILE {
        16
    } else {
        6
    };
    let mut outcomes: BTreeMap<&str, u64> = BTreeMap::new();
    for round in 0..rounds {
        let from_store = round % 2 == 0;
        let dest = mount.scratch(&format!("restore-{round}"));
        let restore = |overwrite: bool| {
            let mut cmd = snapfs();
            s3.apply(&mut cmd);
            cmd.arg("restore");
            if from_store {
                cmd.arg("--store").arg(s3.url(&prefix));
            } else {
                cmd.arg("--data").arg(mount.data_dir());
            }
            cmd.arg("s").arg(&dest);
            if overwrite {
                cmd.arg("--overwrite");
            }
            cmd
        };
        let mut child = restore(false)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn snapfs restore");
        std::thread::sleep(Duration::from_millis(rng.below(whole * 2 / 3)));
        let finished = child.try_wait().expect("try_wait").is_some();
        child.kill().expect("SIGKILL restore");
        child.wait().expect("reap restore");
        *outcomes
            .entry(match (finished, from_store) {
                (true, _) => "finished before the kill",
                (false, true) => "killed (--store)",
                (false, false) => "killed (--data)",
            })
            .or_default() += 1;

        let out = run(&mut restore(true));
        assert!(
            out.status.success(),
            "round {round}: the rerun failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(contents(&dest), expected, "round {round}: restored tree");
    }
    assert_verify_clean(mount.data_dir(), &s3.vars());
    eprintln!("restore_kill: {rounds} rounds (a whole restore takes {whole} ms): {outcomes:?}");
}

// ---------------------------------------------------------------------------------------
// A store that mangles what it sends, or is unreachable for a while
// ---------------------------------------------------------------------------------------

/// Reads `path`: Ok(true) for exactly `expected`, Ok(false) for EIO; wrong bytes or any
/// other error fail the test.
#[track_caller]
fn read_exact_or_eio(path: &Path, expected: &[u8]) -> bool {
    match fs::read(path) {
        Ok(bytes) => {
            assert_bytes_eq(&bytes, expected, &path.display().to_string());
            true
        }
        Err(e) if e.raw_os_error() == Some(libc::EIO) => false,
        Err(e) => panic!("{}: {e}", path.display()),
    }
}

#[test]
fn corrupted_or_truncated_blocks_from_the_store_are_fetched_again_never_served() {
    let mut rng = Rng::new(seed("bad_gets"));
    let s3 = S3Env::garage();
    let (proxy, through) = FaultProxy::for_env(&s3);
    let prefix = unique_prefix("crash-bad-gets");
    // 1 MiB of cache: most blocks are evicted once in the store, and read back from it.
    let mut source = s3.mount_store(&prefix, &["--cache-size", "1M"]);
    let files = [
        ("random", pattern(12 * BLOCK + 77, rng.next())),
        ("dir/text", text(6 * BLOCK)),
        ("dir/more", pattern(5 * BLOCK, rng.next())),
    ];
    fs::create_dir(source.path().join("dir")).expect("mkdir");
    for (name, bytes) in &files {
        fs::write(source.path().join(name), bytes).expect("write");
    }
    take_snapshot(&source, "base");
    wait_completed(&source, "base");
    wait_until("eviction", COMPLETION_TIMEOUT, || {
        block_files(source.data_dir()).len() <= 4
    });
    source.unmount();
    source.set_env(through.vars());

    let faults = [
        Fault::Corrupt,
        Fault::Truncate {
            consistent_length: true,
        },
        Fault::Truncate {
            consistent_length: false,
        },
    ];
    let mut injected: BTreeMap<String, u64> = BTreeMap::new();
    let mut read_outcomes: BTreeMap<&str, u64> = BTreeMap::new();
    let mut restore_outcomes: BTreeMap<&str, u64> = BTreeMap::new();
    for fault in faults {
        let every = rng.range(2, 4);
        let before = proxy.counts().1;

        // Evicted blocks of the volume itself (a remount empties the page cache), live and
        // in the snapshot. Three bad copies in a row are needed for an EIO, which takes
        // concurrent fetches (kernel readahead) lining up with the faults: exact bytes or
        // EIO, and exact bytes once the path heals.
        source.remount();
        proxy.fail_every(every, fault);
        let roots = [source.path().to_owned(), snapshot_dir(&source, "base")];
        for (name, bytes) in &files {
            for root in &roots {
                let ok = read_exact_or_eio(&root.join(name), bytes);
                *read_outcomes
                    .entry(if ok { "exact" } else { "EIO" })
                    .or_default() += 1;
            }
        }
        proxy.set_fault(Fault::None);
        for (name, bytes) in &files {
            for root in &roots {
                assert!(
                    read_exact_or_eio(&root.join(name), bytes),
                    "{fault:?}: {name} after the faults stopped; log:\n{}",
                    log_tail(&source)
                );
            }
        }
        source.unmount();

        // A volume made from the snapshot, loading its blocks lazily through the proxy.
        let from = format!("{}@base", s3.url(&prefix));
        let copy_prefix = unique_prefix("crash-bad-gets-copy");
        let copy = through.mount(&["--from", &from, "--store", &s3.url(&copy_prefix)]);
        proxy.fail_every(every, fault);
        for (name, bytes) in &files {
            let ok = read_exact_or_eio(&copy.path().join(name), bytes);
            *read_outcomes
                .entry(if ok { "exact" } else { "EIO" })
                .or_default() += 1;
        }
        proxy.set_fault(Fault::None);
        for (name, bytes) in &files {
            assert!(
                read_exact_or_eio(&copy.path().join(name), bytes),
                "{fault:?}: lazy {name} after the faults stopped; log:\n{}",
                log_tail(&copy)
            );
        }
        drop(copy);

        // Restore from the bucket alone through the proxy. It fetches blocks in parallel, so
        // one may get a bad copy every time: such a file is left out and named (exit 1),
        // every file restored is exact, and a rerun once the path heals completes it.
        let dest = source.scratch(&format!("restored-{}", injected.len()));
        let restore = |overwrite: bool| {
            let extra: &[&str] = if overwrite { &["--overwrite"] } else { &[] };
            through.restore(&s3.url(&prefix), "base", &dest, extra)
        };
        proxy.fail_every(every, fault);
        let out = restore(false);
        proxy.set_fault(Fault::None);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let mut left_out = 0;
        for (name, bytes) in &files {
            let path = dest.join(name);
            match fs::read(&path) {
                Ok(restored) => {
                    assert_bytes_eq(&restored, bytes, &format!("{fault:?}: restored {name}"))
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    let named = format!("{}: ", path.display());
                    assert!(
                        stderr.contains(&named) && stderr.contains("not restored"),
                        "{fault:?}: {name} left out silently: {stderr}"
                    );
                    left_out += 1;
                }
                Err(e) => panic!("{}: {e}", path.display()),
            }
        }
        let expected_code = if left_out == 0 { 0 } else { 1 };
        assert_eq!(
            out.status.code(),
            Some(expected_code),
            "{fault:?}: {stderr}"
        );
        *restore_outcomes
            .entry(if left_out == 0 {
                "whole"
            } else {
                "files left out"
            })
            .or_default() += 1;
        if left_out > 0 {
            let out = restore(true);
            assert!(
                out.status.success(),
                "{fault:?}: the rerun failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            for (name, bytes) in &files {
                let restored = fs::read(dest.join(name)).expect("read restored");
                assert_bytes_eq(&restored, bytes, &format!("{fault:?}: rerun {name}"));
            }
        }
        let count = proxy.counts().1 - before;
        assert!(count > 0, "{fault:?}: no fault was injected");
        injected.insert(format!("{fault:?} every {every}"), count);
    }
    assert_verify_clean(source.data_dir(), &s3.vars());
    eprintln!(
        "bad_gets: faults injected {injected:?}; file reads through the faults \
         {read_outcomes:?}; restores {restore_outcomes:?}"
    );
}

#[test]
fn a_block_bad_in_the_store_is_eio_and_a_log_line_naming_it() {
    let s3 = S3Env::garage();
    let prefix = unique_prefix("crash-bad-object");
    let mut mount = s3.mount_store(&prefix, &["--cache-size", "1M"]);
    let bad = pattern(8 * BLOCK, 41);
    let good = pattern(8 * BLOCK, 42);
    fs::write(mount.path().join("bad"), &bad).expect("write");
    fs::write(mount.path().join("good"), &good).expect("write");
    take_snapshot(&mount, "s");
    wait_completed(&mount, "s");
    wait_until("eviction", COMPLETION_TIMEOUT, || {
        block_files(mount.data_dir()).len() <= 4
    });
    mount.unmount();

    // Damage two blocks of `bad` that were evicted, in their pack: one rewritten as a
    // valid frame of other bytes, one mangled (its second half zeroed).
    let local: BTreeSet<String> = block_files(mount.data_dir())
        .iter()
        .map(|p| p.file_name().expect("name").to_string_lossy().into_owned())
        .collect();
    let evicted: Vec<String> = block_hashes(&bad).filter(|h| !local.contains(h)).collect();
    assert!(evicted.len() >= 2, "evicted blocks of bad: {evicted:?}");
    let client = s3.client();
    let (first, second) = (&evicted[0], &evicted[1]);
    let stored = packed_in_bucket(&client, &prefix);
    let (first_copy, second_copy) = (&stored[first][0], &stored[second][0]);
    assert_eq!(
        first_copy.pack, second_copy.pack,
        "one pack holds both files"
    );
    let mut pack = client.get(&first_copy.pack).expect("the pack");
    let other = snapfs::manifest::compress(&pattern(BLOCK, 43), 3).expect("zstd");
    assert_eq!(
        other.len(),
        first_copy.length,
        "incompressible blocks, frames alike"
    );
    pack[first_copy.offset..first_copy.offset + first_copy.length].copy_from_slice(&other);
    let half = second_copy.offset + second_copy.length / 2;
    pack[half..second_copy.offset + second_copy.length].fill(0);
    client.put(&first_copy.pack, &pack);

    mount.remount();
    let err = fs::read(mount.path().join("bad")).expect_err("a damaged block");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert_bytes_eq(
        &fs::read(mount.path().join("good")).expect("read good"),
        &good,
        "good",
    );
    // A read of the file's intact blocks still works.
    let intact = bad
        .chunks(BLOCK)
        .position(|c| {
            let h = BlockHash::of(c).to_hex();
            h != *first && h != *second
        })
        .expect("an intact block");
    let file = fs::File::open(mount.path().join("bad")).expect("open");
    assert_bytes_eq(
        &read_at(&file, (intact * BLOCK) as u64, BLOCK),
        &bad[intact * BLOCK..(intact + 1) * BLOCK],
        "an intact block of bad",
    );
    drop(file);
    let log = mount.daemon_log();
    let named = log
        .lines()
        .find(|l| l.contains(first.as_str()) && l.contains("corrupt"));
    assert!(
        named.is_some(),
        "no log line names {first} as corrupt:\n{log}"
    );
    mount.unmount();

    // Restore leaves the file out, names it, restores the rest, exits 1.
    let dest = mount.scratch("restored");
    let out = s3.restore(&s3.url(&prefix), "s", &dest, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("bad"), "{stderr}");
    assert!(!dest.join("bad").exists(), "a damaged file is left out");
    assert_bytes_eq(
        &fs::read(dest.join("good")).expect("read"),
        &good,
        "restored good",
    );
}

#[test]
fn a_store_unreachable_for_a_while_delays_uploads_and_loses_nothing() {
    let mut rng = Rng::new(seed("outage"));
    let s3 = S3Env::garage();
    let (proxy, through) = FaultProxy::for_env(&s3);
    let prefix = unique_prefix("crash-outage");
    // 1 MiB of cache: `cold` is mostly in the store only when the outage starts.
    let mut mount = through.mount_store(&prefix, &["--cache-size", "1M"]);
    let cold = pattern(12 * BLOCK, rng.next());
    fs::write(mount.path().join("cold"), &cold).expect("write");
    let mut cold2 = pattern(12 * BLOCK, rng.next());
    fs::write(mount.path().join("cold2"), &cold2).expect("write");
    take_snapshot(&mount, "before");
    wait_completed(&mount, "before");
    wait_until("eviction", COMPLETION_TIMEOUT, || {
        block_files(mount.data_dir()).len() <= 4
    });
    // A remount empties the page cache: reads of `cold` need the store.
    mount.remount();

    // Hanging connections for the first half of the outage, refused ones for the second.
    let outage = if torture_seconds() > SHORT_PROFILE {
        budget(0.4)
    } else {
        Duration::from_secs(20)
    };
    proxy.set_fault(Fault::Stall);
    let started = Instant::now();
    let mut fault = Fault::Stall;

    // A reader of data only the store has, meanwhile: the right bytes or EIO, never wrong
    // ones, and it must not hold up the local work below.
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let cold_reader = {
        let (path, cold, stop) = (mount.path().join("cold"), cold.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut outcomes: BTreeMap<&str, u64> = BTreeMap::new();
            while !stop.load(Ordering::SeqCst) {
                let ok = read_exact_or_eio(&path, &cold);
                *outcomes
                    .entry(if ok { "exact" } else { "EIO" })
                    .or_default() += 1;
            }
            outcomes
        })
    };

    // And a writer of a few bytes into blocks only the store has (a write starts from
    // their bytes): it succeeds or fails with EIO, changing nothing then.
    let cold_writer = {
        let (path, stop) = (mount.path().join("cold2"), stop.clone());
        let mut cold2 = cold2.clone();
        let seed = rng.next();
        std::thread::spawn(move || {
            let mut outcomes: BTreeMap<&str, u64> = BTreeMap::new();
            let mut rng = Rng::new(seed);
            while !stop.load(Ordering::SeqCst) {
                let at = rng.below(cold2.len() as u64 - 8);
                let bytes = pattern(8, rng.next());
                let written = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .and_then(|f| f.write_all_at(&bytes, at));
                match written {
                    Ok(()) => {
                        cold2[at as usize..at as usize + 8].copy_from_slice(&bytes);
                        *outcomes.entry("written").or_default() += 1;
                    }
                    Err(e) if e.raw_os_error() == Some(libc::EIO) => {
                        *outcomes.entry("EIO").or_default() += 1;
                    }
                    Err(e) => panic!("write into cold2: {e}"),
                }
            }
            (outcomes, cold2)
        })
    };

    let mut expected: BTreeMap<String, BTreeMap<String, Vec<u8>>> = BTreeMap::new();
    let mut live: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    live.insert("cold".into(), cold.clone());
    let mut round = 0u64;
    let limit = Duration::from_secs(10);
    while started.elapsed() < outage {
        if fault == Fault::Stall && started.elapsed() > outage / 2 {
            fault = Fault::Reset;
            proxy.set_fault(fault);
        }
        // Local work goes on at local speed: writes, fsyncs, reads of what is not in the
        // store yet (never evicted), snapshots.
        let name = format!("f{}", round % 5);
        let bytes = pattern(rng.range(1, 3 * BLOCK as u64) as usize, rng.next());
        let path = mount.path().join(&name);
        let written = bytes.clone();
        let back = within(
            &format!("write, fsync and read {name} during the outage"),
            limit,
            move || {
                write_fsynced(&path, &written);
                fs::read(&path).expect("read back")
            },
        );
        assert_bytes_eq(&back, &bytes, &format!("{name}, during the outage"));
        live.insert(name, bytes);
        if round % 8 == 2 {
            let snap = format!("during{round:04}");
            let dir = snapshot_dir(&mount, &snap);
            within(
                &format!("mkdir {snap} during the outage"),
                limit,
                move || fs::create_dir(dir).expect("mkdir snapshot"),
            );
            assert_eq!(snapshot_attr(&mount, &snap, "user.snapfs.state"), "pending");
            expected.insert(snap, live.clone());
        }
        round += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(!expected.is_empty(), "no snapshot taken during the outage");
    for snap in expected.keys() {
        assert_eq!(
            snapshot_attr(&mount, snap, "user.snapfs.state"),
            "pending",
            "{snap} at the end of the outage"
        );
    }
    let (_, faulted) = proxy.counts();
    proxy.set_fault(Fault::None);
    let healed = Instant::now();
    stop.store(true, Ordering::SeqCst);
    let cold_reads = cold_reader.join().expect("cold reader");
    let cold_writes;
    (cold_writes, cold2) = cold_writer.join().expect("cold writer");
    assert_bytes_eq(
        &fs::read(mount.path().join("cold2")).expect("read cold2"),
        &cold2,
        "cold2: the writes that returned, and only them",
    );
    assert!(
        read_exact_or_eio(&mount.path().join("cold"), &cold),
        "cold is readable once the store is back"
    );
    for (snap, files) in &expected {
        wait_completed(&mount, snap);
        for (name, bytes) in files {
            assert_bytes_eq(
                &fs::read(snapshot_dir(&mount, snap).join(name)).expect("read"),
                bytes,
                &format!("{snap}/{name}"),
            );
        }
    }
    let catch_up = healed.elapsed();
    mount.set_env(s3.vars());
    mount.unmount();
    // Nothing lost: the last snapshot restores from the bucket alone.
    let (last, files) = expected.last_key_value().expect("a snapshot");
    let dest = mount.scratch("restored");
    let out = s3.restore(&s3.url(&prefix), last, &dest, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (name, bytes) in files {
        assert_bytes_eq(&fs::read(dest.join(name)).expect("read"), bytes, name);
    }
    assert_verify_clean(mount.data_dir(), &s3.vars());
    eprintln!(
        "outage: Stall then Reset for {outage:?}, {faulted} requests faulted, {round} rounds of local \
         work, {} snapshots taken meanwhile, all completed {catch_up:?} after the store healed; \
         reads of store-only data meanwhile: {cold_reads:?}, writes into it: {cold_writes:?}",
        expected.len()
    );
}

/// `data` written to `path` and fsynced: the blocks are on disk, named by the catalog.
fn write_fsynced(path: &Path, data: &[u8]) {
    let file = fs::File::create(path).expect("create");
    file.write_all_at(data, 0).expect("write");
    file.sync_all().expect("fsync");
}

#[test]
fn after_a_machine_crash_the_mount_names_files_that_lost_blocks_and_stores_them_anew() {
    let mut mount = Mount::new();
    let lost = pattern(3 * BLOCK, 51);
    let kept = pattern(2 * BLOCK, 52);
    write_fsynced(&mount.path().join("lost"), &lost);
    write_fsynced(&mount.path().join("kept"), &kept);
    mount.kill9();

    // What a power loss leaves: the marker of a boot that is over, and a block file whose
    // delayed allocation never ran, empty.
    let marker = mount.data_dir().join("running");
    assert!(marker.exists(), "a killed daemon leaves its running marker");
    fs::write(&marker, "a-boot-that-is-over").expect("marker");
    let first = block_hashes(&lost).next().expect("a block");
    let damaged = block_files(mount.data_dir())
        .into_iter()
        .find(|path| path.file_name().is_some_and(|n| n == first.as_str()))
        .expect("the first block's file");
    fs::write(&damaged, b"").expect("empty the block file");

    mount.remount();
    assert!(!damaged.exists(), "the damaged block file is removed");
    let err = fs::read(mount.path().join("lost")).expect_err("a lost block");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert_bytes_eq(
        &fs::read(mount.path().join("kept")).expect("read kept"),
        &kept,
        "kept",
    );
    let log = mount.daemon_log();
    assert!(
        log.lines()
            .any(|l| l.contains("machine crashed") && l.contains("files") && l.contains("/lost")),
        "no log line names /lost:\n{}",
        log_tail(&mount)
    );

    // The same bytes written again are stored again, not found in the damaged file.
    write_fsynced(&mount.path().join("again"), &lost);
    mount.remount();
    assert_bytes_eq(
        &fs::read(mount.path().join("again")).expect("read again"),
        &lost,
        "again",
    );
}
