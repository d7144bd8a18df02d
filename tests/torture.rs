//! Torture tests through the kernel (issue 6): long seeded random I/O checked byte for byte
//! against reference files on native disk, heavy concurrency checked against a model, and a
//! full data dir.
//!
//! `SNAPFS_TORTURE_SECONDS` sets each test's duration (default: the short CI profile);
//! `SNAPFS_TORTURE_SEED` replays a run (the seed is printed at the start and on failure).

mod common;

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// A tiny seeded PRNG (splitmix64): no dependency, and a seed replays a run exactly.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [lo, hi); lo when the range is empty.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            lo
        } else {
            lo + self.next() % (hi - lo)
        }
    }

    fn below(&mut self, n: usize) -> usize {
        self.range(0, n as u64) as usize
    }

    fn chance(&mut self, one_in: u64) -> bool {
        self.next() % one_in == 0
    }

    /// An index into `weights`, chosen in proportion to them.
    fn weighted(&mut self, weights: &[u64]) -> usize {
        let mut pick = self.range(0, weights.iter().sum());
        for (i, &w) in weights.iter().enumerate() {
            if pick < w {
                return i;
            }
            pick -= w;
        }
        weights.len() - 1
    }
}

/// This test's duration: `SNAPFS_TORTURE_SECONDS`, or `short` (the CI profile).
fn budget(short: u64) -> Duration {
    let secs = std::env::var("SNAPFS_TORTURE_SECONDS")
        .ok()
        .map(|s| {
            s.parse()
                .expect("SNAPFS_TORTURE_SECONDS: a number of seconds")
        })
        .unwrap_or(short);
    Duration::from_secs(secs)
}

/// `SNAPFS_TORTURE_SEED`, or a fresh one; printed either way so a failure can be replayed.
fn seed(test: &str) -> u64 {
    let seed = match std::env::var("SNAPFS_TORTURE_SEED") {
        Ok(s) => s.parse().expect("SNAPFS_TORTURE_SEED: a u64"),
        Err(_) => {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock after 1970")
                .as_nanos() as u64;
            Rng(nanos ^ u64::from(std::process::id())).next()
        }
    };
    eprintln!("torture {test}: SNAPFS_TORTURE_SEED={seed}");
    seed
}

/// Prints how to replay a failure: the seed and the op that was running when it panicked.
struct Replay {
    test: String,
    seed: u64,
    op: Cell<u64>,
    what: RefCell<String>,
}

impl Replay {
    fn new(test: &str, seed: u64) -> Replay {
        Replay {
            test: test.to_string(),
            seed,
            op: Cell::new(0),
            what: RefCell::new(String::new()),
        }
    }

    fn start(&self, op: u64, what: String) {
        self.op.set(op);
        *self.what.borrow_mut() = what;
    }
}

impl Drop for Replay {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "torture {} FAILED at op {} ({}); replay with SNAPFS_TORTURE_SEED={} and \
                 SNAPFS_TORTURE_SECONDS long enough to reach that op",
                self.test,
                self.op.get(),
                self.what.borrow(),
                self.seed
            );
        }
    }
}

/// Operation counts by kind, printed at the end of a test.
#[derive(Default)]
struct Counts(Mutex<BTreeMap<&'static str, u64>>);

impl Counts {
    fn add(&self, kind: &'static str, n: u64) {
        *self.0.lock().expect("counts lock").entry(kind).or_default() += n;
    }

    fn report(&self, test: &str, elapsed: Duration) {
        let counts = self.0.lock().expect("counts lock");
        let list: Vec<String> = counts.iter().map(|(k, v)| format!("{k}={v}")).collect();
        eprintln!(
            "torture {test}: {:.0?}: {}",
            elapsed,
            if list.is_empty() {
                "nothing".to_string()
            } else {
                list.join(" ")
            }
        );
    }
}

/// Reads a whole file, with the path in the panic message.
fn read_file(path: &Path) -> Vec<u8> {
    fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

// ---------------------------------------------------------------------------------------
// 1. Random I/O checked byte for byte

const IO_FILES: usize = 4;
/// The block size of the random I/O volume: small, so ops cross many block boundaries.
const IO_BLOCK: u64 = 64 * 1024;
const IO_MAX_SIZE: u64 = 3 << 20;
/// Snapshots kept at once; older ones are checked and deleted, so long runs stay bounded.
const IO_SNAPSHOTS: usize = 5;
const PAGE: u64 = 4096;

/// One file on the mount and its reference on native disk.
struct IoFile {
    name: String,
    live: Option<File>,
    reference: File,
    size: u64,
}

impl IoFile {
    fn live(&self) -> &File {
        self.live.as_ref().expect("live file open")
    }
}

/// A MAP_SHARED mapping of `len` bytes of `file` from `offset` (page-aligned).
struct Mapping {
    ptr: *mut libc::c_void,
    len: usize,
}

impl Mapping {
    fn new(file: &File, offset: u64, len: usize, writable: bool) -> Mapping {
        let prot = libc::PROT_READ | if writable { libc::PROT_WRITE } else { 0 };
        // SAFETY: a fresh mapping of an open descriptor; the kernel picks the address.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        assert_ne!(
            ptr,
            libc::MAP_FAILED,
            "mmap: {}",
            io::Error::last_os_error()
        );
        Mapping { ptr, len }
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: the mapping is `len` readable bytes while self lives.
        unsafe { std::slice::from_raw_parts(self.ptr.cast(), self.len) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, mapped writable by the caller that writes.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.cast(), self.len) }
    }

    fn msync(&self) -> io::Result<()> {
        // SAFETY: msync of our own mapping.
        check(unsafe { libc::msync(self.ptr, self.len, libc::MS_SYNC) }).map(drop)
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping once.
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

struct RandomIo<'a> {
    mount: Mount,
    reference_dir: PathBuf,
    saved_dir: PathBuf,
    files: Vec<IoFile>,
    /// Snapshots taken and not yet deleted: name and the saved copy of the reference.
    snapshots: Vec<(String, PathBuf)>,
    next_snapshot: u64,
    rng: Rng,
    counts: &'a Counts,
}

impl RandomIo<'_> {
    fn open_live(&self, name: &str) -> File {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(self.mount.path().join(name))
            .expect("open live file")
    }

    fn reopen(&mut self, i: usize) {
        self.files[i].live = None;
        let live = self.open_live(&self.files[i].name);
        let reference = rw(&self.reference_dir.join(&self.files[i].name));
        let file = &mut self.files[i];
        file.live = Some(live);
        file.reference = reference;
        let size = file.live().metadata().expect("fstat").len();
        assert_eq!(size, file.size, "{}: size after reopen", file.name);
    }

    /// An offset and length for a write: mostly near the data, often straddling a block
    /// boundary, sometimes anywhere.
    fn write_span(&mut self, size: u64) -> (u64, usize) {
        let len = match self.rng.weighted(&[5, 3, 2]) {
            0 => self.rng.range(1, 4096),
            1 => self.rng.range(4096, 70_000),
            _ => self.rng.range(IO_BLOCK, 300_000),
        };
        let offset = match self.rng.weighted(&[6, 2, 2]) {
            0 => self.rng.range(0, size + 1),
            1 => {
                let boundary = self.rng.range(1, IO_MAX_SIZE / IO_BLOCK) * IO_BLOCK;
                boundary.saturating_sub(self.rng.range(0, len.min(IO_BLOCK)))
            }
            _ => self.rng.range(0, IO_MAX_SIZE),
        };
        let offset = offset.min(IO_MAX_SIZE - 1);
        (offset, len.min(IO_MAX_SIZE - offset) as usize)
    }

    fn pwrite(&mut self, i: usize, offset: u64, len: usize) {
        let data = pattern(len, self.rng.next());
        let file = &mut self.files[i];
        file.live()
            .write_all_at(&data, offset)
            .expect("pwrite live");
        file.reference
            .write_all_at(&data, offset)
            .expect("pwrite reference");
        file.size = file.size.max(offset + len as u64);
    }

    fn pread(&mut self, i: usize, offset: u64, len: usize) {
        let file = &self.files[i];
        let live = read_at(file.live(), offset, len);
        let expected = read_at(&file.reference, offset, len);
        assert_bytes_eq(
            &live,
            &expected,
            &format!("{} pread({offset}, {len})", file.name),
        );
    }

    /// A page-aligned mapping covering [offset, offset + len) of file i.
    fn map(&self, i: usize, offset: u64, len: usize, writable: bool) -> (Mapping, usize) {
        let start = offset / PAGE * PAGE;
        let skip = (offset - start) as usize;
        (
            Mapping::new(self.files[i].live(), start, skip + len, writable),
            skip,
        )
    }

    fn mmap_write(&mut self, i: usize) -> bool {
        let size = self.files[i].size;
        if size == 0 {
            return false;
        }
        let offset = self.rng.range(0, size);
        let len = self.rng.range(1, (size - offset).min(200_000) + 1) as usize;
        let data = pattern(len, self.rng.next());
        let (mut map, skip) = self.map(i, offset, len, true);
        map.bytes_mut()[skip..skip + len].copy_from_slice(&data);
        map.msync().expect("msync of a shared mapping");
        drop(map);
        self.files[i]
            .reference
            .write_all_at(&data, offset)
            .expect("pwrite reference");
        true
    }

    fn mmap_read(&mut self, i: usize) -> bool {
        let size = self.files[i].size;
        if size == 0 {
            return false;
        }
        let offset = self.rng.range(0, size);
        let len = self.rng.range(1, (size - offset).min(300_000) + 1) as usize;
        let (map, skip) = self.map(i, offset, len, false);
        let expected = read_at(&self.files[i].reference, offset, len);
        assert_bytes_eq(
            &map.bytes()[skip..skip + len],
            &expected,
            &format!("{} mmap read({offset}, {len})", self.files[i].name),
        );
        true
    }

    fn truncate(&mut self, i: usize) {
        let old = self.files[i].size;
        let size = if self.rng.chance(2) {
            self.rng.range(0, old + 1)
        } else {
            self.rng.range(old, IO_MAX_SIZE + 1)
        };
        let file = &mut self.files[i];
        file.live().set_len(size).expect("ftruncate live");
        file.reference.set_len(size).expect("ftruncate reference");
        file.size = size;
    }

    /// Every file on the mount, read whole through a fresh descriptor, equals its
    /// reference.
    fn compare_all(&self, when: &str) {
        for file in &self.files {
            let live = read_file(&self.mount.path().join(&file.name));
            let expected = read_file(&self.reference_dir.join(&file.name));
            assert_bytes_eq(&live, &expected, &format!("{} {when}", file.name));
        }
        self.counts.add("files compared", self.files.len() as u64);
    }

    fn take_snapshot(&mut self) {
        let name = format!("s{}", self.next_snapshot);
        self.next_snapshot += 1;
        take_snapshot(&self.mount, &name);
        let saved = self.saved_dir.join(&name);
        fs::create_dir(&saved).expect("create saved dir");
        for file in &self.files {
            fs::copy(self.reference_dir.join(&file.name), saved.join(&file.name))
                .expect("save the reference");
        }
        self.snapshots.push((name, saved));
        self.counts.add("snapshots taken", 1);
        if self.snapshots.len() > IO_SNAPSHOTS {
            let (name, saved) = self.snapshots.remove(self.rng.below(IO_SNAPSHOTS));
            self.check_snapshot(&name, &saved);
            fs::remove_dir(snapshot_dir(&self.mount, &name)).expect("rmdir snapshot");
            fs::remove_dir_all(&saved).expect("remove saved copy");
            self.counts.add("snapshots deleted", 1);
        }
    }

    fn check_snapshot(&self, name: &str, saved: &Path) {
        let dir = snapshot_dir(&self.mount, name);
        let mut names: Vec<String> = fs::read_dir(&dir)
            .expect("list snapshot")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        let mut expected: Vec<String> = self.files.iter().map(|f| f.name.clone()).collect();
        expected.sort();
        assert_eq!(names, expected, "files of snapshot {name}");
        for file in &self.files {
            let got = read_file(&dir.join(&file.name));
            let want = read_file(&saved.join(&file.name));
            assert_bytes_eq(&got, &want, &format!("snapshot {name}: {}", file.name));
        }
        self.counts.add("snapshots checked", 1);
        self.counts.add("files compared", self.files.len() as u64);
    }

    fn check_snapshots(&self) {
        for (name, saved) in &self.snapshots {
            self.check_snapshot(name, saved);
        }
    }

    fn remount(&mut self) {
        for file in &mut self.files {
            file.live = None;
        }
        self.mount.remount();
        for i in 0..self.files.len() {
            self.reopen(i);
        }
        self.counts.add("remounts", 1);
    }
}

#[test]
fn random_io_matches_reference_files() {
    let seed = seed("random_io");
    let replay = Replay::new("random_io", seed);
    let deadline = budget(35);
    let counts = Counts::default();
    let started = Instant::now();
    let mount = Mount::with_args(&["--block-size", "64K"]);
    let reference_dir = mount.scratch("reference");
    let saved_dir = mount.scratch("saved");
    let mut io = RandomIo {
        files: Vec::new(),
        reference_dir,
        saved_dir,
        snapshots: Vec::new(),
        next_snapshot: 0,
        rng: Rng(seed),
        counts: &counts,
        mount,
    };
    for i in 0..IO_FILES {
        let name = format!("file{i}");
        let live = io.open_live(&name);
        let reference = create(&io.reference_dir.join(&name));
        io.files.push(IoFile {
            name,
            live: Some(live),
            reference,
            size: 0,
        });
    }
    const KINDS: [(&str, u64); 11] = [
        ("pwrite", 30),
        ("write past EOF", 6),
        ("ftruncate", 8),
        ("pread", 25),
        ("fsync", 4),
        ("reopen", 4),
        ("mmap write", 8),
        ("mmap read", 8),
        ("snapshot", 1),
        ("compare", 1),
        ("remount", 0),
    ];
    let weights: Vec<u64> = KINDS.iter().map(|k| k.1).collect();
    let mut op = 0u64;
    while started.elapsed() < deadline {
        op += 1;
        let i = io.rng.below(IO_FILES);
        // Remounts are rare: each one costs a second or two.
        let kind = if io.rng.chance(800) {
            KINDS.len() - 1
        } else {
            io.rng.weighted(&weights)
        };
        let name = KINDS[kind].0;
        replay.start(op, format!("{name} on {}", io.files[i].name));
        match name {
            "pwrite" => {
                let (offset, len) = io.write_span(io.files[i].size);
                replay.start(op, format!("pwrite {} @{offset} +{len}", io.files[i].name));
                io.pwrite(i, offset, len);
            }
            "write past EOF" => {
                let size = io.files[i].size;
                if size + IO_BLOCK >= IO_MAX_SIZE {
                    io.truncate(i);
                    continue;
                }
                let offset = io.rng.range(size + 1, (size + (1 << 20)).min(IO_MAX_SIZE));
                let len = io.rng.range(1, 100_000).min(IO_MAX_SIZE - offset) as usize;
                io.pwrite(i, offset, len);
            }
            "ftruncate" => io.truncate(i),
            "pread" => {
                let size = io.files[i].size;
                let offset = io.rng.range(0, size + IO_BLOCK);
                let len = io.rng.range(1, 400_000) as usize;
                io.pread(i, offset, len);
            }
            "fsync" => io.files[i].live().sync_all().expect("fsync"),
            "reopen" => io.reopen(i),
            "mmap write" => {
                if !io.mmap_write(i) {
                    continue;
                }
            }
            "mmap read" => {
                if !io.mmap_read(i) {
                    continue;
                }
            }
            "snapshot" => io.take_snapshot(),
            "compare" => io.compare_all("periodic comparison"),
            "remount" => {
                io.remount();
                io.compare_all("after a remount");
            }
            _ => unreachable!("op kind {name}"),
        }
        counts.add(name, 1);
    }
    replay.start(op, "final comparison".into());
    io.compare_all("at the end");
    io.check_snapshots();
    replay.start(op, "final remount".into());
    io.remount();
    io.compare_all("after the final remount");
    io.check_snapshots();
    counts.add("ops", op);
    counts.report("random_io", started.elapsed());
}

// ---------------------------------------------------------------------------------------
// 2. Heavy concurrency against a model

const WRITERS: usize = 4;
const READERS: usize = 2;
const SHARED_DIRS: usize = 4;
/// Files a writer owns at most, and their largest size: bounds the tree and each check.
const FILES_PER_WRITER: usize = 14;
const MAX_LEN: u64 = 700 * 1024;
/// Largest single append.
const MAX_CHUNK: u64 = 120 * 1024;
/// Snapshots kept at once; the oldest are checked and deleted.
const KEPT_SNAPSHOTS: usize = 5;

/// One version of a file: the content is `header(owner, id, stream)` followed by
/// `pattern(_, stream)`, cut at `len` (0, or at least the header), so any prefix a writer
/// leaves is checkable exactly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Version {
    owner: usize,
    id: u64,
    stream: u64,
    len: u64,
}

fn header(owner: usize, id: u64, stream: u64) -> String {
    format!("SNAPFS-TORTURE t={owner:02} id={id:08} s={stream:016x}\n")
}

fn header_len() -> u64 {
    header(0, 0, 0).len() as u64
}

impl Version {
    fn content(&self) -> Vec<u8> {
        if self.len == 0 {
            return Vec::new();
        }
        let mut out = header(self.owner, self.id, self.stream).into_bytes();
        let body = self.len.saturating_sub(header_len());
        out.extend_from_slice(&pattern(body as usize, self.stream));
        out.truncate(self.len as usize);
        out
    }

    /// The version `bytes` are, if they are exactly one (an empty file is owner-less).
    fn parse(bytes: &[u8]) -> Option<Version> {
        let h = header_len() as usize;
        let text = std::str::from_utf8(bytes.get(..h)?).ok()?;
        let owner = text.get(17..19)?.parse().ok()?;
        let id = text.get(23..31)?.parse().ok()?;
        let stream = u64::from_str_radix(text.get(34..50)?, 16).ok()?;
        let version = Version {
            owner,
            id,
            stream,
            len: bytes.len() as u64,
        };
        (header(owner, id, stream) == text && version.content() == bytes).then_some(version)
    }
}

/// A writer's files by path relative to the mount.
type Tree = BTreeMap<PathBuf, Version>;
/// What one syscall does to its writer's tree: each path gets a version or goes.
#[derive(Clone)]
struct Delta {
    changes: Vec<(PathBuf, Option<Version>)>,
    /// An append: the length it grows the (only) changed file from.
    grows_from: Option<u64>,
}

impl Delta {
    fn new(changes: Vec<(PathBuf, Option<Version>)>) -> Delta {
        Delta {
            changes,
            grows_from: None,
        }
    }
}

fn apply(tree: &mut Tree, delta: &Delta) {
    for (path, version) in &delta.changes {
        match version {
            Some(v) => tree.insert(path.clone(), *v),
            None => tree.remove(path),
        };
    }
}

/// A state a writer's files may be found in. The kernel splits one write(2) into several
/// requests and a snapshot may fall between them, so the file an append was under way on
/// may hold any prefix between its old and new length: appends only add bytes of the
/// same stream, so even then it is exactly one version.
#[derive(Clone)]
struct State {
    tree: Tree,
    growing: Option<(PathBuf, u64)>,
}

impl State {
    fn exact(tree: Tree) -> State {
        State {
            tree,
            growing: None,
        }
    }

    fn fits(&self, path: &Path, bytes: &[u8]) -> bool {
        let Some(version) = self.tree.get(path) else {
            return false;
        };
        let len = bytes.len() as u64;
        match &self.growing {
            Some((growing, from)) if growing == path => {
                (*from..=version.len).contains(&len)
                    && Version { len, ..*version }.content() == bytes
            }
            _ => version.content() == bytes,
        }
    }
}

/// A writer's model, shared with the snapshot thread.
#[derive(Default)]
struct Journal {
    /// The tree after every syscall that returned.
    done: Tree,
    /// The syscall under way, if any.
    running: Option<Delta>,
    /// While a snapshot is being taken: every delta started since it began.
    recording: Option<Vec<Delta>>,
}

/// The states a writer's files may have in a snapshot: `base` then each delta in turn.
#[derive(Clone)]
struct Window {
    base: Tree,
    deltas: Vec<Delta>,
}

impl Window {
    fn states(&self) -> Vec<State> {
        let mut tree = self.base.clone();
        let mut out = vec![State::exact(tree.clone())];
        for delta in &self.deltas {
            apply(&mut tree, delta);
            if let (Some(from), [(path, _)]) = (delta.grows_from, &delta.changes[..]) {
                out.push(State {
                    tree: tree.clone(),
                    growing: Some((path.clone(), from)),
                });
            }
            out.push(State::exact(tree.clone()));
        }
        out
    }
}

struct Snap {
    name: String,
    windows: Vec<Window>,
}

struct Shared {
    mount: Mount,
    journals: Vec<Mutex<Journal>>,
    snapshots: Mutex<Vec<Arc<Snap>>>,
    stop: AtomicBool,
    counts: Counts,
}

/// Sets `stop` if its thread panics, so the others end instead of running out the clock.
struct StopOnPanic<'a>(&'a AtomicBool);

impl Drop for StopOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(true, Ordering::SeqCst);
        }
    }
}

/// The owner a file name declares (`tNN-...`).
fn owner_of(path: &Path) -> Option<usize> {
    let name = path.file_name()?.to_str()?;
    name.strip_prefix('t')?.get(..2)?.parse().ok()
}

/// Every file under the shared dirs of `root`, by relative path.
fn read_tree(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut dirs: Vec<String> = fs::read_dir(root)
        .unwrap_or_else(|e| panic!("list {}: {e}", root.display()))
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    dirs.sort();
    let expected: Vec<String> = (0..SHARED_DIRS).map(|d| format!("d{d}")).collect();
    assert_eq!(dirs, expected, "top-level entries of {}", root.display());
    for dir in &dirs {
        for entry in fs::read_dir(root.join(dir)).expect("list shared dir") {
            let rel = Path::new(dir).join(entry.expect("entry").file_name());
            out.insert(rel.clone(), read_file(&root.join(&rel)));
        }
    }
    out
}

/// Checks `files` (one writer's files as found in a snapshot or the live tree) against the
/// states the writer may have had; returns a description of the mismatch if none fits.
fn match_state(files: &BTreeMap<PathBuf, Vec<u8>>, states: &[State]) -> Result<(), String> {
    let mut closest = String::new();
    for state in states {
        let paths: BTreeSet<&PathBuf> = files.keys().collect();
        let expected: BTreeSet<&PathBuf> = state.tree.keys().collect();
        if paths != expected {
            closest += &format!(
                "\n  paths differ: only found {:?}, only expected {:?}",
                paths.difference(&expected).collect::<Vec<_>>(),
                expected.difference(&paths).collect::<Vec<_>>()
            );
            continue;
        }
        let wrong = state
            .tree
            .iter()
            .find(|(path, _)| !state.fits(path, &files[*path]));
        match wrong {
            None => return Ok(()),
            Some((path, version)) => {
                let bytes = &files[path];
                closest += &format!(
                    "\n  {} is {:?} ({} bytes, starting {:?}), expected {version:?}",
                    path.display(),
                    Version::parse(bytes),
                    bytes.len(),
                    String::from_utf8_lossy(&bytes[..bytes.len().min(64)])
                )
            }
        }
    }
    Err(format!("none of {} states fits:{closest}", states.len()))
}

/// Checks a whole tree (a snapshot's or the live one) against each writer's possible
/// states; returns the number of files compared.
fn check_tree(root: &Path, states: &[Vec<State>], what: &str) -> u64 {
    let files = read_tree(root);
    let mut by_owner = vec![BTreeMap::new(); WRITERS];
    for (path, bytes) in &files {
        let owner = owner_of(path)
            .filter(|&o| o < WRITERS)
            .unwrap_or_else(|| panic!("{what}: stray file {}", path.display()));
        by_owner[owner].insert(path.clone(), bytes.clone());
    }
    for (owner, owned) in by_owner.iter().enumerate() {
        if let Err(e) = match_state(owned, &states[owner]) {
            panic!("{what}: writer {owner}'s files: {e}");
        }
    }
    files.len() as u64
}

struct Writer<'a> {
    me: usize,
    shared: &'a Shared,
    rng: Rng,
    /// The writer's own view of its files (equal to its journal's `done` between ops).
    tree: Tree,
    next_name: u64,
    next_id: u64,
}

impl Writer<'_> {
    fn path(&self, rel: &Path) -> PathBuf {
        self.shared.mount.path().join(rel)
    }

    fn new_name(&mut self) -> PathBuf {
        self.next_name += 1;
        let dir = self.rng.below(SHARED_DIRS);
        PathBuf::from(format!("d{dir}/t{:02}-n{}", self.me, self.next_name))
    }

    /// Runs one state-changing syscall, journaled so a snapshot taken meanwhile knows the
    /// states before and after it.
    fn step<T>(&mut self, kind: &'static str, delta: Delta, call: impl FnOnce() -> T) -> T {
        {
            let mut journal = self.shared.journals[self.me].lock().expect("journal");
            if let Some(recording) = &mut journal.recording {
                recording.push(delta.clone());
            }
            journal.running = Some(delta.clone());
        }
        let result = call();
        apply(&mut self.tree, &delta);
        let mut journal = self.shared.journals[self.me].lock().expect("journal");
        apply(&mut journal.done, &delta);
        journal.running = None;
        drop(journal);
        self.shared.counts.add(kind, 1);
        result
    }

    fn random_file(&mut self) -> Option<(PathBuf, Version)> {
        if self.tree.is_empty() {
            return None;
        }
        let (path, version) = self.tree.iter().nth(self.rng.below(self.tree.len()))?;
        Some((path.clone(), *version))
    }

    /// Appends a few chunks of `version`'s stream, each one write (the first at least a
    /// header long, so no state has a partial header).
    fn append(&mut self, file: &File, rel: &Path, mut version: Version) -> Version {
        for _ in 0..self.rng.range(1, 4) {
            if version.len >= MAX_LEN {
                break;
            }
            let len = self.rng.range(header_len(), MAX_CHUNK + 1);
            let grown = Version {
                len: (version.len + len).min(MAX_LEN),
                ..version
            };
            let bytes = grown.content();
            let chunk = &bytes[version.len as usize..];
            let delta = Delta {
                changes: vec![(rel.to_owned(), Some(grown))],
                grows_from: Some(version.len),
            };
            self.step("append", delta, || {
                file.write_all_at(chunk, version.len).expect("append")
            });
            version = grown;
        }
        if self.rng.chance(4) {
            file.sync_all().expect("fsync");
            self.shared.counts.add("fsync", 1);
        }
        version
    }

    /// Creates a file with some content at a new name; returns its name and version.
    fn create(&mut self) -> (PathBuf, Version) {
        let rel = self.new_name();
        self.next_id += 1;
        let empty = Version {
            owner: self.me,
            id: self.next_id,
            stream: self.rng.next(),
            len: 0,
        };
        let path = self.path(&rel);
        let file = self.step(
            "create",
            Delta::new(vec![(rel.clone(), Some(empty))]),
            || {
                OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&path)
                    .expect("create")
            },
        );
        let version = self.append(&file, &rel, empty);
        drop(file);
        (rel, version)
    }

    fn one_op(&mut self) {
        let full = self.tree.len() >= FILES_PER_WRITER;
        let Some((rel, version)) = self.random_file().filter(|_| !self.rng.chance(8) || full)
        else {
            self.create();
            return;
        };
        let path = self.path(&rel);
        match self.rng.weighted(&[4, 2, 2, 2, 2, 2]) {
            0 => {
                let file = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .expect("open for append");
                self.append(&file, &rel, version);
            }
            1 => {
                // Only ever shrinks: growing would add zeros, which no version holds.
                let len = if self.rng.chance(4) || version.len == 0 {
                    0
                } else {
                    self.rng.range(header_len(), version.len + 1)
                };
                let cut = Version { len, ..version };
                self.step("truncate", Delta::new(vec![(rel, Some(cut))]), || {
                    truncate(&path, len as i64)
                });
            }
            2 if version.len >= header_len() && version.len <= PAGE => {
                // A new version of the same length in one write over the old one: within
                // one page, so one request, which a snapshot sees whole or not at all.
                let new = Version {
                    stream: self.rng.next(),
                    ..version
                };
                let file = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .expect("open for overwrite");
                let bytes = new.content();
                self.step("overwrite", Delta::new(vec![(rel, Some(new))]), || {
                    file.write_all_at(&bytes, 0).expect("overwrite")
                });
            }
            2 | 3 => {
                // Replace: write a new file elsewhere, then rename it over this one.
                let (tmp, new) = self.create();
                let tmp_path = self.path(&tmp);
                let delta = Delta::new(vec![(tmp, None), (rel, Some(new))]);
                self.step("replace", delta, || {
                    fs::rename(&tmp_path, &path).expect("rename over")
                });
            }
            4 => {
                let target = match self.random_file().filter(|(t, _)| *t != rel) {
                    Some((other, _)) if self.rng.chance(3) => other,
                    _ => self.new_name(),
                };
                let target_path = self.path(&target);
                let delta = Delta::new(vec![(rel, None), (target, Some(version))]);
                self.step("rename", delta, || {
                    fs::rename(&path, &target_path).expect("rename")
                });
            }
            _ => {
                self.step("unlink", Delta::new(vec![(rel, None)]), || {
                    fs::remove_file(&path).expect("unlink")
                });
            }
        }
    }
}

fn writer(shared: &Shared, me: usize, seed: u64) {
    let _stop = StopOnPanic(&shared.stop);
    let replay = Replay::new(&format!("concurrency writer {me}"), seed);
    let mut w = Writer {
        me,
        shared,
        rng: Rng(seed),
        tree: Tree::new(),
        next_name: 0,
        next_id: 0,
    };
    let mut op = 0;
    while !shared.stop.load(Ordering::SeqCst) {
        op += 1;
        replay.start(op, "writer op".into());
        w.one_op();
    }
}

/// Reads random files of random snapshots while everything else runs: each must be
/// exactly one version its owner wrote at that path around the snapshot.
fn reader(shared: &Shared, seed: u64) {
    let _stop = StopOnPanic(&shared.stop);
    let mut rng = Rng(seed);
    while !shared.stop.load(Ordering::SeqCst) {
        let snap = {
            let snaps = shared.snapshots.lock().expect("snapshots");
            if snaps.is_empty() {
                drop(snaps);
                std::thread::yield_now();
                continue;
            }
            snaps[rng.below(snaps.len())].clone()
        };
        let root = snapshot_dir(&shared.mount, &snap.name);
        let dir = format!("d{}", rng.below(SHARED_DIRS));
        let names: Vec<_> = match fs::read_dir(root.join(&dir)) {
            Ok(entries) => entries.map(|e| e.expect("entry").file_name()).collect(),
            Err(e) => panic!(
                "list {dir} in snapshot {}: {e}; the snapshot: {:?}; {dir} again: {:?}",
                snap.name,
                fs::read_dir(&root).map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>()),
                fs::metadata(root.join(&dir)).map(|m| m.len()),
            ),
        };
        if names.is_empty() {
            continue;
        }
        let rel = Path::new(&dir).join(&names[rng.below(names.len())]);
        let bytes = read_file(&root.join(&rel));
        let owner = owner_of(&rel)
            .filter(|&o| o < WRITERS)
            .unwrap_or_else(|| panic!("stray file {} in {}", rel.display(), snap.name));
        if !bytes.is_empty() {
            let version = Version::parse(&bytes).unwrap_or_else(|| {
                panic!(
                    "snapshot {}: {} is torn or garbage",
                    snap.name,
                    rel.display()
                )
            });
            assert_eq!(version.owner, owner, "owner of {}", rel.display());
        }
        let states = snap.windows[owner].states();
        if !states.iter().any(|state| state.fits(&rel, &bytes)) {
            let again = read_file(&root.join(&rel));
            let candidates: Vec<_> = states.iter().map(|s| s.tree.get(&rel)).collect();
            panic!(
                "snapshot {}: {} is {:?}, no version its owner had there: {candidates:?}; \
                 read again: {:?}",
                snap.name,
                rel.display(),
                Version::parse(&bytes),
                Version::parse(&again)
            );
        }
        shared.counts.add("snapshot reads", 1);
    }
}

fn check_snapshot(shared: &Shared, snap: &Snap) {
    let states: Vec<Vec<State>> = snap.windows.iter().map(Window::states).collect();
    let root = snapshot_dir(&shared.mount, &snap.name);
    let files = check_tree(&root, &states, &format!("snapshot {}", snap.name));
    shared.counts.add("snapshots checked", 1);
    shared.counts.add("files compared", files);
}

/// Takes snapshots while the writers run, recording each writer's possible states around
/// each mkdir; keeps a few, checking each one fully before deleting it.
fn snapshotter(shared: &Shared, seed: u64) {
    let _stop = StopOnPanic(&shared.stop);
    let mut rng = Rng(seed);
    let mut n = 0;
    while !shared.stop.load(Ordering::SeqCst) {
        n += 1;
        let name = format!("c{n}");
        let mut bases = Vec::new();
        for journal in &shared.journals {
            let mut journal = journal.lock().expect("journal");
            bases.push(journal.done.clone());
            journal.recording = Some(journal.running.iter().cloned().collect());
        }
        fs::create_dir(snapshot_dir(&shared.mount, &name)).expect("mkdir snapshot");
        let windows = shared
            .journals
            .iter()
            .zip(bases)
            .map(|(journal, base)| {
                let deltas = journal
                    .lock()
                    .expect("journal")
                    .recording
                    .take()
                    .expect("recording");
                Window { base, deltas }
            })
            .collect();
        shared.counts.add("snapshots taken", 1);
        let mut snaps = shared.snapshots.lock().expect("snapshots");
        snaps.push(Arc::new(Snap { name, windows }));
        if snaps.len() <= KEPT_SNAPSHOTS {
            continue;
        }
        let mut old = snaps.remove(rng.below(KEPT_SNAPSHOTS));
        drop(snaps);
        // Readers still holding it finish first: a snapshot deleted under a reader is
        // not what this test checks.
        let old = loop {
            match Arc::try_unwrap(old) {
                Ok(snap) => break snap,
                Err(shared_snap) => {
                    old = shared_snap;
                    std::thread::yield_now();
                }
            }
        };
        check_snapshot(shared, &old);
        fs::remove_dir(snapshot_dir(&shared.mount, &old.name)).expect("rmdir snapshot");
        shared.counts.add("snapshots deleted", 1);
    }
}

#[test]
fn concurrent_writers_snapshots_and_readers_match_the_model() {
    let seed = seed("concurrency");
    let deadline = budget(40);
    let started = Instant::now();
    let mount = Mount::new();
    for d in 0..SHARED_DIRS {
        fs::create_dir(mount.path().join(format!("d{d}"))).expect("mkdir shared dir");
    }
    let mut shared = Shared {
        mount,
        journals: (0..WRITERS).map(|_| Mutex::default()).collect(),
        snapshots: Mutex::default(),
        stop: AtomicBool::new(false),
        counts: Counts::default(),
    };
    let mut rng = Rng(seed);
    std::thread::scope(|scope| {
        let shared = &shared;
        for me in 0..WRITERS {
            let seed = rng.next();
            scope.spawn(move || writer(shared, me, seed));
        }
        for _ in 0..READERS {
            let seed = rng.next();
            scope.spawn(move || reader(shared, seed));
        }
        let seed = rng.next();
        scope.spawn(move || snapshotter(shared, seed));
        let _stop = StopOnPanic(&shared.stop);
        while !shared.stop.load(Ordering::SeqCst) && started.elapsed() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        shared.stop.store(true, Ordering::SeqCst);
    });
    let live: Vec<Vec<State>> = shared
        .journals
        .iter()
        .map(|j| {
            let journal = j.lock().expect("journal");
            assert!(journal.running.is_none(), "a writer stopped mid-syscall");
            vec![State::exact(journal.done.clone())]
        })
        .collect();
    let snaps: Vec<Arc<Snap>> = shared.snapshots.lock().expect("snapshots").clone();
    let check_all = |shared: &Shared, when: &str| {
        let files = check_tree(shared.mount.path(), &live, &format!("live tree {when}"));
        shared.counts.add("files compared", files);
        for snap in &snaps {
            check_snapshot(shared, snap);
        }
    };
    check_all(&shared, "at the end");
    shared.mount.remount();
    check_all(&shared, "after a remount");
    shared.counts.report("concurrency", started.elapsed());
}

// ---------------------------------------------------------------------------------------
// 3. A full data dir

/// The disk is filled with files written in chunks of this size, FILL_FILE long, fsynced;
/// or now and then with one BIG_FILE, more than the daemon buffers, so a write fails.
const FILL_CHUNK: usize = 256 * 1024;
const FILL_FILE: usize = 8 << 20;
const BIG_FILE: usize = 96 << 20;

/// A file the test knows the exact content of: its length and pattern seed.
#[derive(Clone, Copy, Debug)]
struct Known {
    len: usize,
    seed: u64,
}

impl Known {
    fn bytes(&self) -> Vec<u8> {
        pattern(self.len, self.seed)
    }
}

/// Ok, or ENOSPC: anything else (EIO above all) fails the test.
#[track_caller]
fn ok_or_enospc<T: std::fmt::Debug>(result: io::Result<T>, what: &str) -> Option<T> {
    match result {
        Ok(value) => Some(value),
        Err(e) => {
            assert_eq!(
                e.raw_os_error(),
                Some(libc::ENOSPC),
                "{what} on a full disk: {e}, expected ENOSPC"
            );
            None
        }
    }
}

/// close(2), with its result (dropping a File ignores it).
fn close(file: File) -> io::Result<()> {
    use std::os::fd::IntoRawFd;
    // SAFETY: closes the descriptor the File owned, once.
    check(unsafe { libc::close(file.into_raw_fd()) }).map(drop)
}

/// Writes a whole file, fsyncs and closes it, reporting the first call that failed.
fn write_synced(path: &Path, known: Known) -> io::Result<()> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    file.write_all_at(&known.bytes(), 0)?;
    file.sync_all()?;
    close(file)
}

struct FullDisk<'a> {
    mount: Mount,
    rng: Rng,
    /// Files whose fsync and close returned: they must survive anything.
    synced: BTreeMap<String, Known>,
    /// Files a call failed on: their content is unknown, but they must stay readable.
    junk: BTreeSet<String>,
    /// Snapshots and what they hold (None: a junk file).
    snapshots: BTreeMap<String, BTreeMap<String, Option<Known>>>,
    counts: &'a Counts,
    next: u64,
}

/// On failure: the end of the daemon's log, and where the disk's space went.
impl Drop for FullDisk<'_> {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let log = self.mount.daemon_log();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(40)..].join("\n");
        eprintln!("daemon log (end):\n{tail}");
        let data = self.mount.data_dir();
        let store = fs::read_dir(data.join("store"))
            .into_iter()
            .flatten()
            .flatten();
        for entry in fs::read_dir(data)
            .into_iter()
            .flatten()
            .flatten()
            .chain(store)
        {
            let path = entry.path();
            let bytes = if path.is_dir() {
                disk_usage(&path)
            } else {
                fs::metadata(&path).map_or(0, |m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
            };
            eprintln!("data dir: {} holds {bytes} bytes", path.display());
        }
    }
}

impl FullDisk<'_> {
    fn check_synced(&self, when: &str) {
        for (name, known) in &self.synced {
            let got = read_file(&self.mount.path().join(name));
            assert_bytes_eq(&got, &known.bytes(), &format!("{name} {when}"));
        }
        self.counts.add("files compared", self.synced.len() as u64);
    }

    fn check_snapshots(&self, when: &str) {
        for (snap, files) in &self.snapshots {
            let dir = snapshot_dir(&self.mount, snap);
            let mut names: Vec<String> = fs::read_dir(&dir)
                .expect("list snapshot")
                .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            assert_eq!(
                names,
                files.keys().cloned().collect::<Vec<_>>(),
                "snapshot {snap} {when}"
            );
            for (name, known) in files {
                let got = read_file(&dir.join(name));
                if let Some(known) = known {
                    assert_bytes_eq(&got, &known.bytes(), &format!("{snap}/{name} {when}"));
                }
            }
            self.counts.add("snapshots checked", 1);
            self.counts.add("files compared", files.len() as u64);
        }
    }

    fn known(&mut self, len: usize) -> Known {
        Known {
            len,
            seed: self.rng.next(),
        }
    }

    /// Writes and fsyncs a few files while there is room.
    fn write_base_files(&mut self, count: usize) {
        for _ in 0..count {
            self.next += 1;
            let name = format!("kept{}", self.next);
            let len = self.rng.range(1, 1 << 20) as usize;
            let known = self.known(len);
            write_synced(&self.mount.path().join(&name), known).expect("write a kept file");
            self.synced.insert(name, known);
            self.counts.add("files synced", 1);
        }
    }

    fn snapshot(&mut self) -> io::Result<()> {
        self.next += 1;
        let name = format!("snap{}", self.next);
        fs::create_dir(snapshot_dir(&self.mount, &name))?;
        let synced = self.synced.iter().map(|(n, k)| (n.clone(), Some(*k)));
        let junk = self.junk.iter().map(|n| (n.clone(), None));
        self.snapshots.insert(name, synced.chain(junk).collect());
        self.counts.add("snapshots taken", 1);
        Ok(())
    }

    /// Writes files until a call fails, which must be with ENOSPC; returns the names
    /// of those that fit.
    fn fill(&mut self) -> Vec<String> {
        let mut names = Vec::new();
        loop {
            self.next += 1;
            let name = format!("fill{}", self.next);
            let len = if self.rng.chance(3) {
                BIG_FILE
            } else {
                FILL_FILE
            };
            let known = self.known(len);
            let bytes = known.bytes();
            let file = File::create(self.mount.path().join(&name));
            let Some(file) = ok_or_enospc(file, "create") else {
                self.counts.add("ENOSPC from create", 1);
                return names;
            };
            let mut full = false;
            for chunk in (0..len).step_by(FILL_CHUNK) {
                let written = file.write_all_at(&bytes[chunk..chunk + FILL_CHUNK], chunk as u64);
                if ok_or_enospc(written, "write").is_none() {
                    self.counts.add("ENOSPC from write", 1);
                    full = true;
                    break;
                }
            }
            // Once full, fsync and close may still fail or succeed (a write that failed
            // left nothing buffered), but only with ENOSPC.
            if ok_or_enospc(file.sync_all(), "fsync").is_none() {
                self.counts.add("ENOSPC from fsync", 1);
                full = true;
            }
            if ok_or_enospc(close(file), "close").is_none() {
                self.counts.add("ENOSPC from close", 1);
                full = true;
            }
            if full {
                self.junk.insert(name);
                return names;
            }
            names.push(name.clone());
            self.synced.insert(name, known);
            self.counts.add("files synced", 1);
        }
    }

    /// On the full disk: a snapshot, a file, a directory, a small write each either work
    /// or fail with ENOSPC, and damage nothing.
    fn poke_while_full(&mut self) {
        match ok_or_enospc(self.snapshot(), "mkdir .snapshots/NAME") {
            Some(()) => self.counts.add("snapshots taken while full", 1),
            None => self.counts.add("ENOSPC from snapshot", 1),
        }
        self.next += 1;
        let dir = self.mount.path().join(format!("dir{}", self.next));
        match ok_or_enospc(fs::create_dir(&dir), "mkdir") {
            Some(()) => fs::remove_dir(&dir).expect("rmdir the new dir"),
            None => self.counts.add("ENOSPC from mkdir", 1),
        }
        self.next += 1;
        let name = format!("small{}", self.next);
        let known = self.known(100);
        match ok_or_enospc(
            write_synced(&self.mount.path().join(&name), known),
            "a small write",
        ) {
            Some(()) => {
                self.synced.insert(name, known);
            }
            None => {
                // It may have been created before a later call failed.
                if self.mount.path().join(&name).exists() {
                    self.junk.insert(name);
                }
                self.counts.add("ENOSPC from a small file", 1);
            }
        }
    }
}

#[test]
fn full_data_dir_gives_enospc_and_loses_nothing() {
    let seed = seed("full_disk");
    let replay = Replay::new("full_disk", seed);
    let deadline = budget(20);
    let counts = Counts::default();
    let started = Instant::now();
    // Slow uploads keep each round's snapshot pending while the disk fills: its upload to
    // the default store (on the same tmpfs) must wait for room and lose nothing.
    let mut disk = FullDisk {
        mount: Mount::with_tmpfs_data("64m", &["--upload-limit", "4M"]),
        rng: Rng(seed),
        synced: BTreeMap::new(),
        junk: BTreeSet::new(),
        snapshots: BTreeMap::new(),
        counts: &counts,
        next: 0,
    };
    let mut round = 0;
    while round == 0 || started.elapsed() < deadline {
        round += 1;
        replay.start(round, "write kept files and a snapshot".into());
        disk.write_base_files(3);
        disk.snapshot().expect("snapshot with room to spare");
        // Rewrite some so the snapshot pins blocks the live tree no longer uses.
        let names: Vec<String> = disk.synced.keys().cloned().collect();
        for name in &names {
            if disk.rng.chance(2) {
                continue;
            }
            let known = disk.known(disk.synced[name].len);
            write_synced(&disk.mount.path().join(name), known).expect("rewrite a kept file");
            disk.synced.insert(name.clone(), known);
        }
        replay.start(round, "fill the disk".into());
        let filled = disk.fill();
        let pending = disk
            .snapshots
            .keys()
            .filter(|snap| snapshot_attr(&disk.mount, snap, "user.snapfs.state") == "pending")
            .count();
        counts.add("snapshots pending on the full disk", pending as u64);
        disk.check_synced("on the full disk");
        disk.check_snapshots("on the full disk");
        replay.start(round, "use the full disk".into());
        disk.poke_while_full();
        disk.check_synced("after using the full disk");
        disk.check_snapshots("after using the full disk");
        replay.start(round, "free space".into());
        for name in filled.iter().chain(&std::mem::take(&mut disk.junk)) {
            fs::remove_file(disk.mount.path().join(name)).expect("unlink on a full disk");
            disk.synced.remove(name);
        }
        // Keep a few kept files and the newest snapshot, so rounds do not pile up: live
        // files, the blocks snapshots pin and their copies in the store must fit in 64m.
        while disk.synced.len() > 3 {
            let name = disk
                .synced
                .keys()
                .nth(disk.rng.below(disk.synced.len()))
                .cloned();
            let name = name.expect("a kept file");
            fs::remove_file(disk.mount.path().join(&name)).expect("unlink a kept file");
            disk.synced.remove(&name);
        }
        // Keep the newest snapshot; the others go.
        let newest = disk.snapshots.keys().last().cloned();
        let old: Vec<String> = disk
            .snapshots
            .keys()
            .filter(|&s| Some(s) != newest.as_ref())
            .cloned()
            .collect();
        for snap in old {
            fs::remove_dir(snapshot_dir(&disk.mount, &snap)).expect("rmdir a snapshot");
            disk.snapshots.remove(&snap);
            counts.add("snapshots deleted", 1);
        }
        replay.start(round, "write after freeing space".into());
        disk.write_base_files(2);
        for snap in disk.snapshots.keys() {
            wait_completed(&disk.mount, snap);
        }
        disk.check_synced("after freeing space");
        disk.check_snapshots("after freeing space");
        replay.start(round, "remount".into());
        disk.mount.remount();
        counts.add("remounts", 1);
        disk.check_synced("after a remount");
        disk.check_snapshots("after a remount");
        counts.add("rounds", 1);
    }
    counts.report("full_disk", started.elapsed());
}

// ---------------------------------------------------------------------------------------
// Focused regressions of what the full-disk torture found

/// Free bytes of the filesystem holding `path`.
fn free_bytes(path: &Path) -> u64 {
    let stat = statvfs(path).expect("statvfs");
    stat.f_bavail * stat.f_frsize
}

/// Writes fsynced 1 MiB files into `dir` until one fails (with ENOSPC); returns those that
/// fit. The one that failed is removed.
fn fill_with_synced_files(dir: &Path) -> Vec<PathBuf> {
    let mut fitted = Vec::new();
    for i in 0.. {
        let path = dir.join(format!("filler{i}"));
        let known = Known {
            len: 1 << 20,
            seed: i,
        };
        match write_synced(&path, known) {
            Ok(()) => fitted.push(path),
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "filling: {e}");
                fs::remove_file(&path).expect("unlink on a full disk");
                return fitted;
            }
        }
    }
    unreachable!("a tmpfs is finite")
}

/// Fills what is left of the disk holding `dir` to the last byte, as another program (or
/// an upload to a store on the same disk) would. Returns the bytes it took.
fn top_off(dir: &Path) -> u64 {
    let mut ballast = File::create(dir.join("ballast")).expect("create ballast");
    let page = [0u8; 4096];
    let mut taken = 0;
    loop {
        match ballast.write(&page) {
            Ok(n) => taken += n as u64,
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => return taken,
            Err(e) => panic!("writing ballast: {e}"),
        }
    }
}

#[test]
fn deleting_works_on_a_full_data_dir() {
    let m = Mount::with_tmpfs_data("24m", &[]);
    fs::write(m.path().join("before"), b"pinned by a snapshot").expect("write");
    take_snapshot(&m, "s");
    let fitted = fill_with_synced_files(m.path());
    assert!(fitted.len() > 4, "only {} MiB fitted", fitted.len());
    top_off(m.data_dir());
    // SQLite appends a deletion to its WAL before anything is freed: it must still work.
    for path in &fitted[..2] {
        fs::remove_file(path).expect("unlink on a full disk");
    }
    fs::remove_dir(snapshot_dir(&m, "s")).expect("rmdir a snapshot on a full disk");
    write_synced(
        &m.path().join("after"),
        Known {
            len: 1 << 20,
            seed: 99,
        },
    )
    .expect("write once space is freed");
}

/// A mount on a 24 MiB data dir, its free bytes before, and its file `big` with more
/// written than the disk holds (less than the daemon buffers): fsync failed with ENOSPC.
fn overfilled_file() -> (Mount, u64, PathBuf, File) {
    let m = Mount::with_tmpfs_data("24m", &[]);
    let free = free_bytes(m.data_dir());
    let big = m.path().join("big");
    let file = File::create(&big).expect("create");
    // 12 MiB synced and 14 MiB more: past the disk's room, under the dirty limit (16 MiB).
    let data = pattern(26 << 20, 1);
    // A part synced first, so the file surely holds room whatever the background flusher
    // managed to store of the rest.
    let (synced, buffered) = data.split_at(12 << 20);
    file.write_all_at(synced, 0).expect("write");
    file.sync_data().expect("fsync of what fits");
    file.write_all_at(buffered, synced.len() as u64)
        .expect("buffered write");
    assert_eq!(errno(file.sync_all()), libc::ENOSPC, "fsync");
    (m, free, big, file)
}

#[test]
fn space_a_failed_flush_used_comes_back() {
    let (m, free, big, file) = overfilled_file();
    let data = m.data_dir();
    // The blocks the failed flushes stored must go (now, and at close), and the buffers
    // and the blocks the background flusher stored at the last close of the unlinked
    // file: nothing may keep the space. That last close is FUSE's RELEASE, which the
    // kernel sends after close(2) returned, so the space comes back a moment later.
    fs::remove_file(&big).expect("unlink");
    assert_eq!(errno(close(file)), libc::ENOSPC, "close");
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut now = free_bytes(data);
    while now + (1 << 20) < free && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
        now = free_bytes(data);
    }
    assert!(
        now + (1 << 20) >= free,
        "{now} bytes free 5 s after the last close of the unlinked file, {free} before"
    );
    let fitted = fill_with_synced_files(m.path());
    assert!(fitted.len() >= 16, "only {} MiB fitted after", fitted.len());
}

/// A file closed with changes its flush could not store (a full disk), then unlinked:
/// no one can open it again, so its blocks go with the unlink, not at the flusher's next
/// pass: a writer that freed room by deleting it must find the room there at once.
#[test]
fn space_of_a_closed_file_whose_flush_failed_comes_back_at_unlink() {
    let (m, free, big, file) = overfilled_file();
    let data = m.data_dir();
    assert_eq!(errno(close(file)), libc::ENOSPC, "close");
    // close(2) returns before the kernel sends RELEASE; once that is served the file is
    // closed in the daemon too, its unstored changes still buffered.
    std::thread::sleep(Duration::from_millis(500));
    // Each flush stores all its blocks or none, so the last one that failed may have left
    // up to its own size free: another program takes that.
    let ballast = top_off(data);
    assert!(
        ballast + (12 << 20) <= free,
        "{ballast} bytes were free with the file's 12 synced MiB stored, {free} before"
    );
    fs::remove_file(&big).expect("unlink");
    let now = free_bytes(data);
    assert!(
        now + ballast + (1 << 20) >= free,
        "{now} bytes free right after the unlink, {ballast} taken by another program, \
         {free} before the file"
    );
    write_synced(
        &m.path().join("after"),
        Known {
            len: 8 << 20,
            seed: 7,
        },
    )
    .expect("a write into the room the unlink gave back");
}

#[test]
fn a_write_that_fails_with_enospc_changes_nothing() {
    let m = Mount::with_tmpfs_data("24m", &[]);
    let file = create(&m.path().join("f"));
    let mut expected = pattern(1 << 20, 1);
    file.write_all_at(&expected, 0).expect("write");
    file.sync_all().expect("fsync");
    // Created first: on a full disk creating a file may rightly fail with ENOSPC.
    let other = create(&m.path().join("other"));
    // A full disk, so no flush can succeed (the timer's neither)...
    fill_with_synced_files(m.path());
    // ...and exactly the daemon's dirty limit (16 MiB) buffered in another file...
    for chunk in 0..16u64 {
        other
            .write_all_at(&pattern(1 << 20, 100 + chunk), chunk << 20)
            .expect("a buffered write");
    }
    // ...so rewriting f soon needs a flush, which fails: the write that reports ENOSPC
    // must not have taken effect.
    let failed = (0..3).find(|&i| {
        let data = pattern(1 << 20, 200 + i);
        match file.write_all_at(&data, 0) {
            Ok(()) => {
                expected = data;
                false
            }
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "write: {e}");
                true
            }
        }
    });
    assert!(failed.is_some(), "no write failed with 17 MiB buffered");
    assert_bytes_eq(
        &read_at(&file, 0, 1 << 20),
        &expected,
        "f after a failed write",
    );
}
