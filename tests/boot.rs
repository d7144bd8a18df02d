//! Starting volumes the way a machine does at boot: an /etc/fstab line (a temporary fstab
//! given to `mount -T`) mounted and unmounted by mount(8) and umount(8), snapfs called as
//! mount.fuse.snapfs / umount.fuse.snapfs, and systemd's readiness protocol.

mod common;

use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// mount.fuse3 runs `snapfs` from PATH: the directory of the snapfs under test first.
fn path_with_snapfs() -> String {
    let bin = Path::new(env!("CARGO_BIN_EXE_snapfs"))
        .parent()
        .expect("binary dir")
        .to_owned();
    format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

/// The helpers linked in /sbin (where mount(8) looks, with a PATH of its own) to the
/// snapfs under test, by `snapfs install-mount-helper`; what was there comes back on drop.
struct SystemHelpers {
    previous: Vec<(PathBuf, Option<PathBuf>)>,
}

impl SystemHelpers {
    fn install(data: &Path) -> SystemHelpers {
        let previous = ["mount.fuse.snapfs", "umount.fuse.snapfs"]
            .iter()
            .map(|name| {
                let link = Path::new("/sbin").join(name);
                let target = fs::read_link(&link).ok();
                (link, target)
            })
            .collect();
        run_ok(snapfs().arg("install-mount-helper"), data);
        SystemHelpers { previous }
    }
}

impl Drop for SystemHelpers {
    fn drop(&mut self) {
        for (link, target) in &self.previous {
            let _ = fs::remove_file(link);
            if let Some(target) = target {
                let _ = std::os::unix::fs::symlink(target, link);
            }
        }
    }
}

fn run_ok(cmd: &mut Command, data: &Path) {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}\ndaemon log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        fs::read_to_string(data.join("snapfs.log")).unwrap_or_default()
    );
}

/// Waits until no daemon holds the data dir: it has flushed and exited.
fn wait_daemon_gone(data: &Path) {
    let lock = fs::File::open(data.join("lock")).expect("open the data dir's lock");
    let deadline = Instant::now() + Duration::from_secs(30);
    // SAFETY: flock only reads the descriptor, which `lock` keeps open.
    while unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) } != 0 {
        assert!(Instant::now() < deadline, "the daemon did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn fstab_line_mounts_and_umount_unmounts_through_mount8() {
    let mount = Mount::unmounted();
    let (mnt, data) = (mount.path().to_owned(), mount.data_dir().to_owned());
    let store = mount.scratch("store");
    let fstab = mount.scratch("etc").join("fstab");
    fs::write(
        &fstab,
        format!(
            "# a volume mounted at boot\n{} {} fuse.snapfs \
             store=file://{},cache_size=64M,upload_limit=100M,_netdev,nofail,noauto,\
             x-systemd.requires=network-online.target,x-systemd.mount-timeout=30 0 0\n",
            data.display(),
            mnt.display(),
            store.display()
        ),
    )
    .expect("write fstab");
    let _helpers = SystemHelpers::install(&data);
    let mount_cmd = || {
        let mut cmd = Command::new("mount");
        cmd.arg("-T").arg(&fstab).arg(&mnt);
        cmd
    };
    run_ok(&mut mount_cmd(), &data);
    assert_eq!(
        mount_source(&mnt).as_deref(),
        Some(format!("snapfs:{}", data.display()).as_str())
    );
    // The same line mounted again (`mount -a` after an edit of fstab) has nothing to do:
    // mount(8) cannot see that it is mounted, but the helper can. Another volume there is
    // still refused.
    let daemon_log = || fs::read_to_string(data.join("snapfs.log")).expect("daemon log");
    let started = daemon_log().matches(": mounted mountpoint=").count();
    run_ok(&mut mount_cmd(), &data);
    assert_mounted_once(&mnt);
    assert_eq!(
        daemon_log().matches(": mounted mountpoint=").count(),
        started,
        "a second daemon"
    );
    let other = mount.scratch("other-data");
    let out = run(Command::new("/sbin/mount.fuse.snapfs")
        .arg(&other)
        .arg(&mnt));
    assert!(!out.status.success(), "another volume over the mount");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already a snapfs mount"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_mounted_once(&mnt);
    let payload = pattern(3 * BLOCK + 5, 7);
    fs::write(mnt.join("file"), &payload).expect("write through the fstab mount");
    take_snapshot(&mount, "boot");
    wait_completed(&mount, "boot");

    run_ok(Command::new("umount").arg(&mnt), &data);
    assert!(mount_source(&mnt).is_none(), "still mounted after umount");
    wait_daemon_gone(&data);

    run_ok(&mut mount_cmd(), &data);
    assert_bytes_eq(&fs::read(mnt.join("file")).expect("read"), &payload, "file");
    assert_bytes_eq(
        &fs::read(snapshot_dir(&mount, "boot").join("file")).expect("read snapshot"),
        &payload,
        "snapshot",
    );
    run_ok(Command::new("umount").arg(&mnt), &data);
    wait_daemon_gone(&data);
    let log = fs::read_to_string(data.join("snapfs.log")).expect("daemon log");
    assert_eq!(log.matches("unmounted cleanly").count(), 2, "{log}");
}

#[test]
fn helper_conventions_mount_and_unmount_with_a_flush() {
    let mount = Mount::unmounted();
    let (mnt, data) = (mount.path().to_owned(), mount.data_dir().to_owned());
    let sbin = mount.scratch("sbin");
    run_ok(
        snapfs().arg("install-mount-helper").arg("--dir").arg(&sbin),
        &data,
    );
    let helper = |name: &str| -> PathBuf {
        let link = sbin.join(name);
        assert_eq!(
            fs::read_link(&link).expect("a link"),
            Path::new(env!("CARGO_BIN_EXE_snapfs"))
        );
        link
    };
    // mount.fuse3, which mount(8) runs without a mount.fuse.snapfs, runs
    // `snapfs SOURCE MOUNTPOINT -o OPTIONS` from PATH.
    run_ok(
        Command::new("mount.fuse3")
            .arg(&data)
            .arg(&mnt)
            .args([
                "-o",
                "rw,nosuid,nodev,_netdev,snapdir=visible",
                "-t",
                "fuse.snapfs",
            ])
            .env("PATH", path_with_snapfs()),
        &data,
    );
    let payload = pattern(BLOCK + 99, 3);
    fs::write(mnt.join("file"), &payload).expect("write");
    let listed: Vec<_> = fs::read_dir(&mnt)
        .expect("list")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert!(listed.iter().any(|n| n == ".snapshots"), "snapdir=visible");
    // umount(8)'s helper waits for the daemon's flush and exit.
    run_ok(
        Command::new(helper("umount.fuse.snapfs"))
            .arg(&mnt)
            .args(["-t", "fuse.snapfs"]),
        &data,
    );
    assert!(mount_source(&mnt).is_none());
    let lock = fs::File::open(data.join("lock")).expect("lock");
    // SAFETY: flock only reads the descriptor, which `lock` keeps open.
    let free = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) };
    assert_eq!(free, 0, "the daemon exited before umount returned");
    drop(lock);

    // As mount(8) calls its helper: SOURCE MOUNTPOINT, its flags, the fstab options.
    // Unknown options are refused before anything is mounted; -s (sloppy) ignores them.
    let out = run(Command::new(helper("mount.fuse.snapfs"))
        .arg(&data)
        .arg(&mnt)
        .args(["-o", "colour=blue"]));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown mount option 'colour=blue'"));
    assert!(mount_source(&mnt).is_none());
    run_ok(
        Command::new(helper("mount.fuse.snapfs"))
            .arg(&data)
            .arg(&mnt)
            .args(["-s", "-o", "colour=blue"]),
        &data,
    );
    assert_bytes_eq(&fs::read(mnt.join("file")).expect("read"), &payload, "file");
    run_ok(snapfs().arg("umount").arg(&mnt), &data);
}

#[test]
fn systemd_hears_ready_only_once_the_mount_serves_and_stopping_on_sigterm() {
    let mount = Mount::unmounted();
    let (mnt, data) = (mount.path().to_owned(), mount.data_dir().to_owned());
    let socket_path = mount.scratch("run").join("notify");
    let socket = UnixDatagram::bind(&socket_path).expect("bind the notify socket");
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let log = fs::File::create(mount.scratch("log").join("daemon")).expect("log");
    let mut daemon = mount_cmd(&mnt, &data)
        .arg("--foreground")
        .env("NOTIFY_SOCKET", &socket_path)
        .stderr(log)
        .spawn()
        .expect("spawn snapfs mount -f");
    let mut buf = [0u8; 256];
    let n = socket.recv(&mut buf).expect("a notification");
    let message = String::from_utf8_lossy(&buf[..n]).into_owned();
    // At the moment READY=1 arrives, the mount answers.
    assert_eq!(
        mount_source(&mnt).as_deref(),
        Some(format!("snapfs:{}", data.display()).as_str()),
        "mounted when READY=1 came"
    );
    fs::write(mnt.join("file"), b"served").expect("write right after READY=1");
    assert!(message.lines().any(|l| l == "READY=1"), "{message}");

    // SAFETY: kill with the pid of our own child.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    let n = socket.recv(&mut buf).expect("a notification");
    let message = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(message.lines().any(|l| l == "STOPPING=1"), "{message}");
    let status = wait_timeout(&mut daemon, Duration::from_secs(30)).expect("daemon exits");
    assert!(status.success(), "{status}");
    assert!(mount_source(&mnt).is_none());

    // Flushed before it exited: the write is there at the next mount.
    let mut mount = mount;
    mount.remount();
    assert_eq!(fs::read(mnt.join("file")).expect("read"), b"served");
}
