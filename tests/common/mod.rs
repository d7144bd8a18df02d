//! The shared harness of the integration tests: one real snapfs mount per test (so tests
//! run in parallel), and thin wrappers of the system calls std does not offer, returning
//! `io::Result` so tests can assert exact errno values.

// Every test crate compiles this module and uses its own subset of it.
#![allow(dead_code)]
pub mod s3;

use std::collections::BTreeMap;
use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// How long a mount may take to appear in /proc/self/mountinfo.
const MOUNT_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a daemon may take to exit after an unmount or a signal.
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a one-shot command (`snapfs umount`, `cp`...) may run.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(90);

/// The default block size of a new volume (256 KiB).
pub const BLOCK: usize = 256 * 1024;

/// A Command for the snapfs binary under test.
pub fn snapfs() -> Command {
    Command::new(env!("CARGO_BIN_EXE_snapfs"))
}

/// `snapfs mount MOUNTPOINT --data DATA` (daemonizing unless `--foreground` is added).
pub fn mount_cmd(mountpoint: &Path, data: &Path) -> Command {
    let mut cmd = snapfs();
    cmd.arg("mount").arg(mountpoint).arg("--data").arg(data);
    cmd
}

/// A snapfs volume mounted in the foreground by a child process, in its own temp dir:
/// `ROOT/mnt` is the mountpoint, `ROOT/data` the data dir, `ROOT/daemon.log` collects the
/// daemon's output.
pub struct Mount {
    root: tempfile::TempDir,
    mountpoint: PathBuf,
    data: PathBuf,
    args: Vec<OsString>,
    /// Extra environment of the daemon (store credentials and endpoint).
    env: Vec<(String, String)>,
    child: Option<Child>,
    /// The data dir is a tmpfs this harness mounted (unmounted on drop).
    tmpfs_data: bool,
}

impl Mount {
    pub fn new() -> Mount {
        Mount::with_args(&[])
    }

    /// Mounts with extra `snapfs mount` arguments (kept for every remount).
    pub fn with_args(extra: &[&str]) -> Mount {
        let mut mount = Mount::unmounted();
        mount.set_args(extra);
        mount.spawn();
        mount
    }

    /// The directories of a mount, but nothing mounted: for tests that run `snapfs mount`
    /// themselves. Dropping it still detaches anything left mounted on `path()`.
    pub fn unmounted() -> Mount {
        let root = tempfile::Builder::new()
            .prefix("snapfs-test.")
            .tempdir()
            .expect("create temp dir");
        // Other uids (permission tests) must be able to reach the mountpoint.
        fs::set_permissions(root.path(), fs::Permissions::from_mode(0o755))
            .expect("chmod temp dir");
        let base = fs::canonicalize(root.path()).expect("canonicalize temp dir");
        let mountpoint = base.join("mnt");
        let data = base.join("data");
        fs::create_dir(&mountpoint).expect("create mountpoint");
        fs::create_dir(&data).expect("create data dir");
        Mount {
            root,
            mountpoint,
            data,
            args: Vec::new(),
            env: Vec::new(),
            child: None,
            tmpfs_data: false,
        }
    }

    /// Mounts with the data dir on a fresh tmpfs of `size` (as `mount -o size=`): a small
    /// disk that fills up. The tmpfs goes when the Mount is dropped.
    pub fn with_tmpfs_data(size: &str, extra: &[&str]) -> Mount {
        let mut mount = Mount::unmounted();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&mount.data)
            .status()
            .expect("run mount -t tmpfs");
        assert!(status.success(), "mount -t tmpfs on the data dir: {status}");
        mount.tmpfs_data = true;
        mount.set_args(extra);
        mount.spawn();
        mount
    }

    /// Replaces the daemon's extra environment for the next (re)mount.
    pub fn set_env(&mut self, vars: Vec<(String, String)>) {
        self.env = vars;
    }

    /// Replaces the extra `snapfs mount` arguments used by the next (re)mount.
    pub fn set_args(&mut self, extra: &[&str]) {
        self.set_os_args(extra);
    }

    /// [`set_args`](Self::set_args) with arguments of any bytes (snapshot names need not
    /// be UTF-8).
    pub fn set_os_args(&mut self, extra: &[impl AsRef<OsStr>]) {
        self.args = extra.iter().map(|s| s.as_ref().to_owned()).collect();
    }

    /// The mountpoint.
    pub fn path(&self) -> &Path {
        &self.mountpoint
    }

    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// A directory of this test outside the mount (created on demand), for scratch files.
    pub fn scratch(&self, name: &str) -> PathBuf {
        let dir = self.root.path().join(name);
        fs::create_dir_all(&dir).expect("create scratch dir");
        dir
    }

    /// Everything the foreground daemons of this mount printed so far.
    pub fn daemon_log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn log_path(&self) -> PathBuf {
        self.root.path().join("daemon.log")
    }

    /// The pid of the foreground daemon.
    pub fn pid(&self) -> i32 {
        let child = self
            .child
            .as_ref()
            .expect("pid: not mounted by this harness");
        i32::try_from(child.id()).expect("pid fits i32")
    }

    pub fn is_mounted(&self) -> bool {
        mount_source(&self.mountpoint).as_deref() == Some(&self.source())
    }

    /// The mount source snapfs declares: `snapfs:DATA_DIR`.
    pub fn source(&self) -> String {
        format!("snapfs:{}", self.data.display())
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "spawn: already mounted");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open daemon log");
        let child = mount_cmd(&self.mountpoint, &self.data)
            .arg("--foreground")
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log)
            .spawn()
            .expect("spawn snapfs mount");
        self.child = Some(child);
        let deadline = Instant::now() + MOUNT_TIMEOUT;
        while !self.is_mounted() {
            let child = self.child.as_mut().expect("child just spawned");
            let pid = child.id();
            if let Some(status) = child.try_wait().expect("try_wait on snapfs mount") {
                self.child = None;
                panic!(
                    "snapfs mount exited ({status}) before mounting; its output:\n{}",
                    self.daemon_log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} not mounted after {MOUNT_TIMEOUT:?}; daemon output:\n{}\ndaemon threads:\n{}",
                self.mountpoint.display(),
                self.daemon_log(),
                threads_of(pid)
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `snapfs umount`, then the daemon must exit with status 0.
    pub fn unmount(&mut self) {
        assert!(self.child.is_some(), "unmount: not mounted");
        // `snapfs umount` waits until the daemon's pid is gone, and the daemon is our
        // child: reap it meanwhile, or umount would wait for the zombie.
        let umount = Captured::spawn(snapfs().arg("umount").arg(&self.mountpoint));
        let status = self.wait_daemon();
        let out = umount.finish();
        assert!(
            out.status.success(),
            "snapfs umount failed ({}): {}\ndaemon output:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.daemon_log()
        );
        assert_eq!(
            status.code(),
            Some(0),
            "daemon exit status {status}; its output:\n{}",
            self.daemon_log()
        );
        assert!(!self.is_mounted(), "still mounted after snapfs umount");
    }

    /// Unmounts (if mounted), then mounts the same data dir again.
    pub fn remount(&mut self) {
        if self.child.is_some() {
            self.unmount();
        }
        self.spawn();
    }

    /// SIGKILLs the daemon, detaches its dead mount and reaps it.
    pub fn kill9(&mut self) {
        let child = self.child.as_mut().expect("kill9: not mounted");
        child.kill().expect("SIGKILL the daemon");
        child.wait().expect("reap the killed daemon");
        self.child = None;
        detach(&self.mountpoint);
        assert!(!self.is_mounted(), "dead mount still attached after detach");
    }

    /// Sends `signal` to the foreground daemon and returns its exit status.
    pub fn signal(&mut self, signal: i32) -> ExitStatus {
        // SAFETY: kill with the pid of our own child and a valid signal number.
        let rc = unsafe { libc::kill(self.pid(), signal) };
        assert_eq!(rc, 0, "kill({}, {signal})", self.pid());
        self.wait_daemon()
    }

    /// Waits (with a timeout) for the foreground daemon to exit on its own.
    pub fn wait_daemon(&mut self) -> ExitStatus {
        let child = self.child.as_mut().expect("wait_daemon: no daemon");
        let pid = child.id();
        let status = wait_timeout(child, EXIT_TIMEOUT).unwrap_or_else(|| {
            panic!(
                "daemon still running {EXIT_TIMEOUT:?} after being asked to stop; output:\n{}\n\
                 daemon threads:\n{}",
                self.daemon_log(),
                threads_of(pid)
            )
        });
        self.child = None;
        status
    }
}

/// What each thread of process `pid` is doing, as the kernel sees it (name, state, where
/// it waits, its kernel stack), and where in the program if gdb is installed: what the
/// report of a daemon that hangs needs.
fn threads_of(pid: u32) -> String {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return format!("(process {pid} is gone)");
    };
    let mut out = String::new();
    if let Ok(gdb) = Command::new("gdb")
        .args([
            "-p",
            &pid.to_string(),
            "-batch",
            "-ex",
            "thread apply all bt 30",
        ])
        .output()
    {
        out += &String::from_utf8_lossy(&gdb.stdout);
    }
    // SAFETY: sysconf only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    for task in tasks.flatten() {
        let dir = task.path();
        let read = |name: &str| fs::read_to_string(dir.join(name)).unwrap_or_default();
        // The fields follow the parenthesised name, which may itself hold spaces: state
        // first, then (11 and 12 on) the CPU time used in user and system mode, in ticks.
        // Much time used is a loop; little, a thread that waits or never got a CPU.
        let stat = read("stat");
        let fields: Vec<&str> = stat.rsplit(") ").next().unwrap_or("").split(' ').collect();
        let seconds = |i: usize| {
            fields
                .get(i)
                .and_then(|v| v.parse::<f64>().ok())
                .map_or("?".to_owned(), |t| format!("{:.2}", t / ticks))
        };
        out += &format!(
            "{} {}: state {}, waiting in {}, ran {} s in user mode and {} s in the kernel\n",
            task.file_name().to_string_lossy(),
            read("comm").trim(),
            fields.first().unwrap_or(&"?"),
            read("wchan"),
            seconds(11),
            seconds(12),
        );
        for frame in read("stack").lines().take(8) {
            out += &format!("    {frame}\n");
        }
    }
    out
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGTERM unmounts, flushes and exits; a daemon stuck on a busy mount is killed.
            if let Ok(pid) = i32::try_from(child.id()) {
                // SAFETY: kill with the pid of our own child.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
            if wait_timeout(&mut child, Duration::from_secs(15)).is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if mount_source(&self.mountpoint).is_some() {
            detach(&self.mountpoint);
        }
        if self.tmpfs_data {
            detach(&self.data);
        }
    }
}

/// The source of the FUSE mount on `mountpoint` per /proc/self/mountinfo, if any.
pub fn mount_source(mountpoint: &Path) -> Option<String> {
    let info = fs::read_to_string("/proc/self/mountinfo").expect("read mountinfo");
    let wanted = mountinfo_escape(mountpoint);
    info.lines().rev().find_map(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        let dash = fields.iter().position(|f| *f == "-")?;
        let (fs_type, source) = (fields.get(dash + 1)?, fields.get(dash + 2)?);
        (*fields.get(4)? == wanted && fs_type.starts_with("fuse")).then(|| source.to_string())
    })
}

/// Exactly one file system is mounted on `mountpoint`, per /proc/self/mountinfo.
#[track_caller]
pub fn assert_mounted_once(mountpoint: &Path) {
    let mountpoint = fs::canonicalize(mountpoint).expect("canonical mountpoint");
    let mounts = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let at = format!(" {} ", mountinfo_escape(&mountpoint));
    assert_eq!(
        mounts.lines().filter(|l| l.contains(&at)).count(),
        1,
        "{mounts}"
    );
}

/// A path as mountinfo spells it: space, tab, newline and backslash in octal escapes.
fn mountinfo_escape(path: &Path) -> String {
    let mut out = String::new();
    for &byte in path.as_os_str().as_bytes() {
        match byte {
            b' ' | b'\t' | b'\n' | b'\\' => out.push_str(&format!("\\{byte:03o}")),
            _ => out.push(char::from(byte)),
        }
    }
    out
}

/// Lazily detaches whatever is mounted on `mountpoint` (a dead FUSE mount included).
pub fn detach(mountpoint: &Path) {
    let path = cpath(mountpoint);
    // SAFETY: umount2 reads the NUL-terminated path.
    if unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) } != 0 {
        let _ = Command::new("fusermount3")
            .arg("-uz")
            .arg(mountpoint)
            .status();
    }
}

/// Waits for `child` up to `timeout`; None if it is still running.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A running command whose stdout and stderr are being collected.
pub struct Captured {
    child: Child,
    description: String,
    stdout: std::thread::JoinHandle<Vec<u8>>,
    stderr: std::thread::JoinHandle<Vec<u8>>,
}

impl Captured {
    pub fn spawn(cmd: &mut Command) -> Captured {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        fn drain(pipe: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<Vec<u8>> {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                if let Some(mut pipe) = pipe {
                    let _ = pipe.read_to_end(&mut buf);
                }
                buf
            })
        }
        Captured {
            stdout: drain(child.stdout.take()),
            stderr: drain(child.stderr.take()),
            child,
            description: format!("{cmd:?}"),
        }
    }

    /// Waits for the command (killed, failing the test, after a timeout) and its output.
    pub fn finish(mut self) -> Output {
        let Some(status) = wait_timeout(&mut self.child, COMMAND_TIMEOUT) else {
            let _ = self.child.kill();
            let _ = self.child.wait();
            panic!(
                "{} still running after {COMMAND_TIMEOUT:?}",
                self.description
            );
        };
        Output {
            status,
            stdout: self.stdout.join().expect("stdout reader"),
            stderr: self.stderr.join().expect("stderr reader"),
        }
    }
}

/// Runs a command to completion (killed, failing the test, after a timeout), capturing
/// its output.
pub fn run(cmd: &mut Command) -> Output {
    Captured::spawn(cmd).finish()
}

/// `snapfs verify --data DATA` (with `env`: a store's credentials) must find the volume
/// clean: exit 0 and a clean verdict.
#[track_caller]
pub fn assert_verify_clean(data: &Path, env: &[(String, String)]) {
    let out = run(snapfs()
        .arg("verify")
        .arg("--data")
        .arg(data)
        .envs(env.iter().map(|(k, v)| (k, v))));
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success() && stdout.contains(": clean"),
        "snapfs verify --data {} ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
        data.display(),
        out.status
    );
}

/// `snapfs ARGS`, its output.
pub fn cli(args: &[&str]) -> Output {
    run(snapfs().args(args))
}

/// `snapfs ARGS`, which must succeed: its stdout.
#[track_caller]
pub fn ok(args: &[&str]) -> String {
    let out = cli(args);
    assert!(
        out.status.success(),
        "snapfs {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The errno of a call that must fail.
#[track_caller]
pub fn errno<T: std::fmt::Debug>(result: io::Result<T>) -> i32 {
    match result {
        Ok(value) => panic!("expected an error, the call returned Ok({value:?})"),
        Err(e) => e
            .raw_os_error()
            .unwrap_or_else(|| panic!("expected an OS error, got {e}")),
    }
}

pub fn cpath(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).expect("path without NUL")
}

/// Turns a libc return value into an io::Result.
pub fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn check_size(ret: libc::ssize_t) -> io::Result<usize> {
    usize::try_from(ret).map_err(|_| io::Error::last_os_error())
}

/// How long a snapshot may take to reach `completed`: a few MiB through a fault-ridden
/// store on a loaded machine.
pub const COMPLETION_TIMEOUT: Duration = Duration::from_secs(120);

/// `MOUNTPOINT/.snapshots/NAME`
pub fn snapshot_dir(mount: &Mount, name: &str) -> PathBuf {
    mount.path().join(".snapshots").join(name)
}

/// Takes snapshot `name` by mkdir; returns its directory.
pub fn take_snapshot(mount: &Mount, name: &str) -> PathBuf {
    let dir = snapshot_dir(mount, name);
    fs::create_dir(&dir).expect("mkdir .snapshots/NAME");
    dir
}

/// A `user.snapfs.*` (or tag) xattr of snapshot `name`, as text.
pub fn snapshot_attr(mount: &Mount, name: &str, attr: &str) -> String {
    let value = getxattr(&snapshot_dir(mount, name), attr).expect("snapshot xattr");
    String::from_utf8(value).expect("utf-8 xattr")
}

/// Waits until snapshot `name` is `completed`; panics with its state, progress and the
/// daemon log if it is anything but `pending` meanwhile, or takes too long.
pub fn wait_completed(mount: &Mount, name: &str) {
    let deadline = Instant::now() + COMPLETION_TIMEOUT;
    loop {
        let state = snapshot_attr(mount, name, "user.snapfs.state");
        match state.as_str() {
            "completed" => return,
            "pending" if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            _ => panic!(
                "snapshot {name} is {state} ({}); daemon log:\n{}",
                snapshot_attr(mount, name, "user.snapfs.progress"),
                mount.daemon_log()
            ),
        }
    }
}

/// Compressible text whose blocks all differ.
pub fn text(len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 64);
    let mut line = 0u64;
    while out.len() < len {
        out.extend_from_slice(format!("log line {line}: all quiet on the volume\n").as_bytes());
        line += 1;
    }
    out.truncate(len);
    out
}

/// Deterministic pseudo-random bytes (xorshift64*): distinct seeds give distinct blocks,
/// so the content-addressed store cannot deduplicate them.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Asserts two byte strings are equal, reporting the first difference instead of dumping
/// megabytes.
#[track_caller]
pub fn assert_bytes_eq(actual: &[u8], expected: &[u8], what: &str) {
    if let Some(at) = actual.iter().zip(expected).position(|(a, e)| a != e) {
        panic!(
            "{what}: first difference at byte {at}: got {:#04x}, expected {:#04x}",
            actual[at], expected[at]
        );
    }
    assert_eq!(actual.len(), expected.len(), "{what}: length differs");
}

/// Opens an existing file for reading and writing.
pub fn rw(path: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open read-write")
}

/// Creates a new file (O_EXCL) for reading and writing.
pub fn create(path: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .expect("create file")
}

/// Reads up to `len` bytes at `offset` (fewer only at the end of the file).
pub fn read_at(file: &File, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    let mut done = 0;
    while done < len {
        let n = file
            .read_at(&mut buf[done..], offset + done as u64)
            .expect("read_at");
        if n == 0 {
            break;
        }
        done += n;
    }
    buf.truncate(done);
    buf
}

/// truncate(2): by path, not through a descriptor.
pub fn truncate(path: &Path, len: i64) {
    let c_path = cpath(path);
    // SAFETY: a valid NUL-terminated path.
    check(unsafe { libc::truncate(c_path.as_ptr(), len) }).expect("truncate(2)");
}

pub fn setxattr(path: &Path, name: &str, value: &[u8], flags: i32) -> io::Result<()> {
    let (path, name) = (cpath(path), CString::new(name).expect("xattr name"));
    // SAFETY: valid NUL-terminated strings and a buffer of the given length.
    check(unsafe {
        libc::setxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    })
    .map(drop)
}

pub fn getxattr(path: &Path, name: &str) -> io::Result<Vec<u8>> {
    let (path, name) = (cpath(path), CString::new(name).expect("xattr name"));
    // A value may grow between the size query and the read (a snapshot's upload
    // progress does): ERANGE means ask again, as getfattr does.
    loop {
        // SAFETY: a size query (null buffer, size 0), then a read into a buffer of that size.
        let size = check_size(unsafe {
            libc::getxattr(path.as_ptr(), name.as_ptr(), std::ptr::null_mut(), 0)
        })?;
        let mut buf = vec![0u8; size];
        match check_size(unsafe {
            libc::getxattr(path.as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), size)
        }) {
            Err(e) if e.raw_os_error() == Some(libc::ERANGE) => continue,
            result => {
                buf.truncate(result?);
                return Ok(buf);
            }
        }
    }
}

/// getxattr into a buffer of exactly `size` bytes.
pub fn getxattr_sized(path: &Path, name: &str, size: usize) -> io::Result<Vec<u8>> {
    let (path, name) = (cpath(path), CString::new(name).expect("xattr name"));
    let mut buf = vec![0u8; size];
    // SAFETY: the buffer holds `size` bytes.
    let len = check_size(unsafe {
        libc::getxattr(path.as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), size)
    })?;
    buf.truncate(len);
    Ok(buf)
}

/// The names of `path`'s extended attributes, sorted.
pub fn listxattr(path: &Path) -> io::Result<Vec<String>> {
    let path = cpath(path);
    // SAFETY: a size query, then a read into a buffer of that size.
    let size = check_size(unsafe { libc::listxattr(path.as_ptr(), std::ptr::null_mut(), 0) })?;
    let mut buf = vec![0u8; size];
    let len = check_size(unsafe { libc::listxattr(path.as_ptr(), buf.as_mut_ptr().cast(), size) })?;
    buf.truncate(len);
    let mut names: Vec<String> = buf
        .split(|&b| b == 0)
        .filter(|n| !n.is_empty())
        .map(|n| String::from_utf8_lossy(n).into_owned())
        .collect();
    names.sort();
    Ok(names)
}

pub fn removexattr(path: &Path, name: &str) -> io::Result<()> {
    let (path, name) = (cpath(path), CString::new(name).expect("xattr name"));
    // SAFETY: valid NUL-terminated strings.
    check(unsafe { libc::removexattr(path.as_ptr(), name.as_ptr()) }).map(drop)
}

/// The user.* extended attributes of `path` with their values.
pub fn user_xattrs(path: &Path) -> BTreeMap<String, Vec<u8>> {
    listxattr(path)
        .expect("listxattr")
        .into_iter()
        .filter(|n| n.starts_with("user."))
        .map(|n| {
            let value = getxattr(path, &n).expect("getxattr of a listed name");
            (n, value)
        })
        .collect()
}

pub fn renameat2(from: &Path, to: &Path, flags: libc::c_uint) -> io::Result<()> {
    let (from, to) = (cpath(from), cpath(to));
    // SAFETY: valid NUL-terminated paths relative to the working directory.
    check(unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            flags,
        )
    })
    .map(drop)
}

pub fn mkfifo(path: &Path, mode: libc::mode_t) -> io::Result<()> {
    let path = cpath(path);
    // SAFETY: a valid NUL-terminated path.
    check(unsafe { libc::mkfifo(path.as_ptr(), mode) }).map(drop)
}

/// utimensat with explicit (seconds, nanoseconds) for atime and mtime; a nanosecond value
/// of libc::UTIME_NOW or UTIME_OMIT works as in C. Does not follow a final symlink.
pub fn utimens(path: &Path, atime: (i64, i64), mtime: (i64, i64)) -> io::Result<()> {
    let path = cpath(path);
    let times = [
        libc::timespec {
            tv_sec: atime.0,
            tv_nsec: atime.1,
        },
        libc::timespec {
            tv_sec: mtime.0,
            tv_nsec: mtime.1,
        },
    ];
    // SAFETY: a valid path and an array of two timespecs.
    check(unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            path.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

pub fn statvfs(path: &Path) -> io::Result<libc::statvfs> {
    let path = cpath(path);
    // SAFETY: statvfs fills the zeroed struct it is given.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    check(unsafe { libc::statvfs(path.as_ptr(), &mut stat) })?;
    Ok(stat)
}

/// Runs `op` in a forked child with the given uid and gid (and no supplementary groups),
/// and returns the errno `op` failed with, or 0 if it succeeded. `op` runs after fork in
/// a multi-threaded process: it must only make system calls (prepare CStrings before).
pub fn errno_as_user(uid: u32, gid: u32, op: impl FnOnce() -> libc::c_int) -> i32 {
    // SAFETY: the child only makes system calls and leaves with _exit.
    unsafe {
        match libc::fork() {
            -1 => panic!("fork: {}", io::Error::last_os_error()),
            0 => {
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0
                {
                    libc::_exit(255);
                }
                let code = if op() < 0 {
                    *libc::__errno_location()
                } else {
                    0
                };
                libc::_exit(code);
            }
            pid => {
                let mut status = 0;
                assert_eq!(libc::waitpid(pid, &mut status, 0), pid, "waitpid");
                assert!(libc::WIFEXITED(status), "child died: status {status:#x}");
                let code = libc::WEXITSTATUS(status);
                assert_ne!(code, 255, "the child could not switch to {uid}:{gid}");
                code
            }
        }
    }
}

/// The names in directory `dir` (without `.` and `..`), sorted.
pub fn dir_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Bytes the files under `dir` occupy on disk (st_blocks), recursively.
pub fn disk_usage(dir: &Path) -> u64 {
    let mut total = 0;
    for entry in fs::read_dir(dir).expect("read_dir for disk usage") {
        let entry = entry.expect("dir entry");
        let meta = entry.metadata().expect("metadata for disk usage");
        total += meta.blocks() * 512;
        if meta.is_dir() {
            total += disk_usage(&entry.path());
        }
    }
    total
}

/// Waits up to `COMPLETION_TIMEOUT` for `done`.
pub fn wait_for(mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + COMPLETION_TIMEOUT;
    while !done() {
        assert!(Instant::now() < deadline, "condition not met in time");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The block files of a data dir's store: `DATA/blocks/xx/<hash>`, without temporaries.
pub fn block_files(data_dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let Ok(shards) = fs::read_dir(data_dir.join("blocks")) else {
        return files;
    };
    for shard in shards {
        let shard = shard.expect("blocks entry").path();
        if !shard.is_dir() || shard.file_name().is_some_and(|n| n == "tmp") {
            continue;
        }
        for block in fs::read_dir(&shard).expect("read block shard") {
            files.push(block.expect("block entry").path());
        }
    }
    files.sort();
    files
}

/// Blocks a data dir keeps: block files, and small blocks in the catalog (read beside a
/// running mount, as `snapfs verify` does).
pub fn local_blocks(data_dir: &Path) -> usize {
    let catalog =
        snapfs::catalog::Catalog::open_data_dir_read_only(data_dir).expect("open the catalog");
    let inline = catalog
        .read(|tx| tx.inline_block_count())
        .expect("count small blocks");
    block_files(data_dir).len() + inline as usize
}

/// What `lstat`, the content and the user.* xattrs say about one node, minus the fields
/// that legitimately differ between two copies of a tree (inode number, atime, ctime).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeState {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u64,
    pub size: u64,
    pub mtime: (i64, i64),
    /// File content, or a symlink's target; empty for other kinds.
    pub content: Vec<u8>,
    pub xattrs: BTreeMap<String, Vec<u8>>,
}

/// Every node under `root` (relative paths; the root itself is ""), read through the
/// filesystem.
pub fn tree_state(root: &Path) -> BTreeMap<PathBuf, NodeState> {
    let mut out = BTreeMap::new();
    collect_state(root, Path::new(""), &mut out);
    out
}

fn collect_state(root: &Path, rel: &Path, out: &mut BTreeMap<PathBuf, NodeState>) {
    let path = root.join(rel);
    let meta = fs::symlink_metadata(&path).expect("lstat in tree_state");
    let kind = meta.file_type();
    let content = if kind.is_file() {
        fs::read(&path).expect("read file in tree_state")
    } else if kind.is_symlink() {
        fs::read_link(&path)
            .expect("readlink in tree_state")
            .into_os_string()
            .into_encoded_bytes()
    } else {
        Vec::new()
    };
    let xattrs = if kind.is_file() || kind.is_dir() {
        user_xattrs(&path)
    } else {
        BTreeMap::new()
    };
    out.insert(
        rel.to_owned(),
        NodeState {
            mode: meta.mode(),
            uid: meta.uid(),
            gid: meta.gid(),
            nlink: meta.nlink(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            content,
            xattrs,
        },
    );
    if kind.is_dir() {
        for entry in fs::read_dir(&path).expect("read_dir in tree_state") {
            collect_state(root, &rel.join(entry.expect("entry").file_name()), out);
        }
    }
}

/// One copy of a block in a store's pack (format 2, docs/format.md), read back and
/// checked against its hash.
#[derive(Clone, Debug)]
pub struct Packed {
    /// The pack's key (relative to the store's prefix).
    pub pack: String,
    /// Where its frame is in the pack.
    pub offset: usize,
    pub length: usize,
    pub data: Vec<u8>,
}

/// The blocks of `pack`, an unsealed pack object stored as `key`, by hex hash: its footer
/// and listing decoded as docs/format.md says, each frame decompressed and checked.
pub fn unpack(key: &str, pack: &[u8]) -> Vec<(String, Packed)> {
    let footer = pack
        .len()
        .checked_sub(12)
        .unwrap_or_else(|| panic!("{key}: too short"));
    assert_eq!(&pack[footer + 4..], b"snapfsP1", "{key}: magic at its end");
    let length = u32::from_le_bytes(pack[footer..footer + 4].try_into().expect("4 bytes"));
    let listing_at = footer - length as usize;
    let listing = zstd::decode_all(&pack[listing_at..footer])
        .unwrap_or_else(|e| panic!("{key}: its listing is not a zstd frame: {e}"));
    let listing =
        snapfs::manifest::decode_pack_listing(&listing).unwrap_or_else(|e| panic!("{key}: {e}"));
    assert_eq!(listing.data_length, listing_at as u64, "{key}: data length");
    listing
        .blocks
        .iter()
        .map(|block| {
            let (offset, length) = (block.offset as usize, block.length as usize);
            let data = zstd::decode_all(&pack[offset..offset + length])
                .unwrap_or_else(|e| panic!("{key} at {offset}: not a zstd frame: {e}"));
            let hash = snapfs::blocks::BlockHash::of(&data).to_hex();
            assert_eq!(
                hash,
                block.hash.to_hex(),
                "{key} at {offset} decodes to its hash"
            );
            assert_eq!(data.len(), block.raw_length as usize, "{key} at {offset}");
            let packed = Packed {
                pack: key.to_owned(),
                offset,
                length,
                data,
            };
            (hash, packed)
        })
        .collect()
}

/// Every block in the packs of the store whose `packs/` keys are `keys` (relative keys,
/// `get` fetching one; a pack deleted since the listing is skipped): each copy, by hex
/// hash. Directory trees, which travel in packs too, are left out (`packed_trees`).
pub fn packed_blocks(
    keys: impl IntoIterator<Item = String>,
    get: impl Fn(&str) -> Option<Vec<u8>>,
) -> BTreeMap<String, Vec<Packed>> {
    packed_frames(keys, get, false)
}

/// The directory trees in the packs of a store, as `packed_blocks` finds blocks.
pub fn packed_trees(
    keys: impl IntoIterator<Item = String>,
    get: impl Fn(&str) -> Option<Vec<u8>>,
) -> BTreeMap<String, Vec<Packed>> {
    packed_frames(keys, get, true)
}

fn packed_frames(
    keys: impl IntoIterator<Item = String>,
    get: impl Fn(&str) -> Option<Vec<u8>>,
    trees: bool,
) -> BTreeMap<String, Vec<Packed>> {
    let mut frames: BTreeMap<String, Vec<Packed>> = BTreeMap::new();
    for key in keys {
        let Some(pack) = get(&key) else { continue };
        for (hash, packed) in unpack(&key, &pack) {
            if snapfs::manifest::decode_tree(&packed.data).is_ok() == trees {
                frames.entry(hash).or_default().push(packed);
            }
        }
    }
    frames
}

/// The blocks in the packs of a `file://` store in `dir`, by hex hash.
pub fn packed_blocks_in_dir(dir: &Path) -> BTreeMap<String, Vec<Packed>> {
    packed_blocks(dir_pack_keys(dir), |key| fs::read(dir.join(key)).ok())
}

/// The directory trees in the packs of a `file://` store in `dir`, by hex hash.
pub fn packed_trees_in_dir(dir: &Path) -> BTreeMap<String, Vec<Packed>> {
    packed_trees(dir_pack_keys(dir), |key| fs::read(dir.join(key)).ok())
}

fn dir_pack_keys(dir: &Path) -> Vec<String> {
    fs::read_dir(dir.join("packs"))
        .map(|entries| {
            entries
                .map(|e| {
                    format!(
                        "packs/{}",
                        e.expect("pack entry").file_name().to_string_lossy()
                    )
                })
                .collect::<Vec<_>>()
        })
        .unwrap_or_default()
}

/// The blocks in the packs under `prefix` of a bucket, by hex hash.
pub fn packed_in_bucket(client: &s3::S3Client, prefix: &str) -> BTreeMap<String, Vec<Packed>> {
    packed_blocks(pack_keys(client, prefix), |key| client.get(key))
}

/// The directory trees in the packs under `prefix` of a bucket, by hex hash.
pub fn trees_in_bucket(client: &s3::S3Client, prefix: &str) -> BTreeMap<String, Vec<Packed>> {
    packed_trees(pack_keys(client, prefix), |key| client.get(key))
}

/// Rewrites the store under `prefix` of the volume in `data_dir` (unmounted) as snapfs
/// wrote it before packs (format 1): each block and tree an object of its own, no packs,
/// no index, a format-1 header, a catalog that knows no pack. Returns how many block and
/// tree objects it wrote.
pub fn rewrite_as_format_1(client: &s3::S3Client, prefix: &str, data_dir: &Path) -> (usize, usize) {
    let packed = packed_in_bucket(client, prefix);
    for (hash, copies) in &packed {
        let object = zstd::encode_all(copies[0].data.as_slice(), 3).expect("zstd");
        client.put(&format!("{prefix}blocks/{hash}"), &object);
    }
    let trees = trees_in_bucket(client, prefix);
    for (hash, copies) in &trees {
        let object = zstd::encode_all(copies[0].data.as_slice(), 3).expect("zstd");
        client.put(&format!("{prefix}trees/{hash}"), &object);
    }
    assert!(client.delete_prefix(&format!("{prefix}packs/")) > 0);
    assert!(client.delete_prefix(&format!("{prefix}index/")) > 0);
    let header =
        String::from_utf8(client.get(&format!("{prefix}volume")).expect("header")).expect("text");
    client.put(
        &format!("{prefix}volume"),
        header.replace("format 2", "format 1").as_bytes(),
    );
    let db = rusqlite::Connection::open(data_dir.join("catalog.db")).expect("catalog");
    db.execute_batch(
        "UPDATE blocks SET pack = NULL, pack_offset = NULL, pack_length = NULL;
         DELETE FROM packed_trees;
         DELETE FROM packs;",
    )
    .expect("forget the packs");
    (packed.len(), trees.len())
}

fn pack_keys(client: &s3::S3Client, prefix: &str) -> Vec<String> {
    client
        .list(&format!("{prefix}packs/"))
        .into_iter()
        .map(|(key, _)| key)
        .collect()
}
