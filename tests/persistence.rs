//! What survives an unmount, a signal or a kill -9, and the mount lifecycle: the data dir
//! lock, fusermount3, and the daemonizing mode.

mod common;

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{
    BLOCK, Mount, assert_bytes_eq, block_files, local_blocks, mkfifo, mount_cmd, pattern, run,
    setxattr, snapfs, tree_state, user_xattrs, utimens,
};

/// Builds a tree with every kind of node and attribute snapfs stores.
fn populate(root: &Path) {
    fs::create_dir_all(root.join("dir/sub/deeper")).expect("mkdir -p");
    fs::write(root.join("dir/multi"), pattern(3 * BLOCK + 999, 1)).expect("write multi");
    fs::write(root.join("dir/sub/one"), pattern(BLOCK, 2)).expect("write one block");
    fs::write(root.join("small"), b"small file\n").expect("write small");
    File::create(root.join("empty")).expect("create empty");
    let sparse = File::create(root.join("sparse")).expect("create sparse");
    sparse
        .write_all_at(b"island", 4 * BLOCK as u64 + 3)
        .expect("write sparse");
    sparse.set_len(10 * BLOCK as u64).expect("extend sparse");
    drop(sparse);
    fs::write(root.join(OsStr::from_bytes(b"caf\xe9")), b"latin-1").expect("write non-UTF-8");

    fs::hard_link(root.join("small"), root.join("dir/hardlink")).expect("hard link");
    std::os::unix::fs::symlink("dir/multi", root.join("link")).expect("symlink");
    std::os::unix::fs::symlink(OsStr::from_bytes(b"/nowhere/\xff"), root.join("dangling"))
        .expect("dangling symlink");
    mkfifo(&root.join("fifo"), 0o620).expect("mkfifo");

    setxattr(&root.join("small"), "user.color", b"red", 0).expect("xattr");
    setxattr(&root.join("dir"), "user.bin", &[0, 1, 2, 255], 0).expect("xattr on dir");
    fs::set_permissions(root.join("dir/multi"), fs::Permissions::from_mode(0o4750)).expect("chmod");
    fs::set_permissions(root.join("dir/sub"), fs::Permissions::from_mode(0o700))
        .expect("chmod dir");
    std::os::unix::fs::chown(root.join("empty"), Some(1000), Some(2000)).expect("chown");
    utimens(
        &root.join("dir/sub/one"),
        (1_111_111_111, 111),
        (1_222_222_222, 222_222_222),
    )
    .expect("utimens");
    // Directory times change with every entry made in them: set them last.
    utimens(&root.join("dir/sub/deeper"), (5, 6), (7, 8)).expect("utimens dir");
}

/// Inode numbers by path: stable across remounts, unlike what `tree_state` compares.
fn inode_numbers(root: &Path) -> Vec<(PathBuf, u64)> {
    tree_state(root)
        .into_keys()
        .map(|rel| {
            let ino = fs::symlink_metadata(root.join(&rel)).expect("lstat").ino();
            (rel, ino)
        })
        .collect()
}

#[test]
fn everything_survives_a_remount() {
    let mut m = Mount::new();
    populate(m.path());
    let before = tree_state(m.path());
    let inodes = inode_numbers(m.path());
    assert_eq!(
        before.len(),
        14,
        "nodes in the populated tree: {:?}",
        before.keys()
    );
    m.remount();
    let after = tree_state(m.path());
    for (path, state) in &before {
        assert_eq!(
            after.get(path),
            Some(state),
            "{} after remount",
            path.display()
        );
    }
    assert_eq!(after.len(), before.len());
    assert_eq!(
        inode_numbers(m.path()),
        inodes,
        "inode numbers after remount"
    );

    // A few facts spelled out, so a harness bug cannot hide a loss.
    let root = m.path();
    assert_bytes_eq(
        &fs::read(root.join("dir/multi")).expect("read"),
        &pattern(3 * BLOCK + 999, 1),
        "multi-block file",
    );
    assert_eq!(fs::metadata(root.join("small")).expect("stat").nlink(), 2);
    assert_eq!(
        fs::read_link(root.join("link")).expect("readlink"),
        Path::new("dir/multi")
    );
    assert_eq!(
        user_xattrs(&root.join("small"))
            .get("user.color")
            .map(Vec::as_slice),
        Some(&b"red"[..])
    );
    let one = fs::metadata(root.join("dir/sub/one")).expect("stat");
    assert_eq!(
        (one.mtime(), one.mtime_nsec()),
        (1_222_222_222, 222_222_222)
    );
    assert_eq!(
        fs::metadata(root.join("dir/multi")).expect("stat").mode(),
        libc::S_IFREG | 0o4750
    );
    assert_eq!(fs::metadata(root.join("dir")).expect("stat").nlink(), 3);

    // And the volume keeps working after the remount.
    fs::write(root.join("dir/sub/one"), b"rewritten").expect("rewrite");
    m.remount();
    assert_eq!(
        fs::read(m.path().join("dir/sub/one")).expect("read"),
        b"rewritten"
    );
}

#[test]
fn fsynced_data_survives_kill_9() {
    let mut m = Mount::new();
    let path = m.path().join("durable");
    let mut expected = pattern(3 * BLOCK + 5, 3);
    let mut file = File::create(&path).expect("create");
    file.write_all(&expected).expect("write");
    file.sync_all().expect("fsync");
    // An overwrite of part of it, fsynced through a second descriptor.
    let patch = pattern(1000, 4);
    let other = OpenOptions::new().write(true).open(&path).expect("open");
    other
        .write_all_at(&patch, BLOCK as u64 - 500)
        .expect("overwrite");
    other.sync_data().expect("fdatasync");
    expected[BLOCK - 500..BLOCK + 500].copy_from_slice(&patch);
    fs::create_dir(m.path().join("dir")).expect("mkdir");
    let mut in_dir = File::create(m.path().join("dir/f")).expect("create in dir");
    in_dir.write_all(b"nested").expect("write");
    in_dir.sync_all().expect("fsync nested");

    // Descriptors still open: the daemon dies with dirty state around.
    m.kill9();
    drop((file, other, in_dir));
    m.remount();
    assert_bytes_eq(&fs::read(&path).expect("read"), &expected, "after kill -9");
    assert_eq!(
        fs::read(m.path().join("dir/f")).expect("read nested"),
        b"nested"
    );
}

#[test]
fn small_files_take_no_block_file_and_survive_kill_9() {
    let mut m = Mount::new();
    let files: Vec<(String, Vec<u8>)> = (0..20u8)
        .map(|i| {
            (
                format!("small{i}"),
                pattern(100 * usize::from(i) + 1, u64::from(i)),
            )
        })
        .collect();
    for (name, data) in &files {
        let mut file = File::create(m.path().join(name)).expect("create");
        file.write_all(data).expect("write");
        file.sync_all().expect("fsync");
    }
    assert_eq!(block_files(m.data_dir()), Vec::<std::path::PathBuf>::new());
    assert_eq!(local_blocks(m.data_dir()), files.len());
    m.kill9();
    m.remount();
    for (name, data) in &files {
        let read = fs::read(m.path().join(name)).expect("read");
        assert_bytes_eq(&read, data, name);
    }
}

/// Writes a 2-block file, keeps it open while `orphan` takes its name away, kills the
/// daemon at once, and checks that `names_left` (holding `new`) are all that is left and
/// the orphan's blocks were freed.
fn orphan_is_freed_after_kill_9(orphan: impl FnOnce(&Path), names_left: &[&str]) {
    let mut m = Mount::new();
    let path = m.path().join("orphan");
    let mut file = File::create(&path).expect("create");
    file.write_all(&pattern(2 * BLOCK, 5)).expect("write");
    file.sync_all().expect("fsync");
    assert_eq!(block_files(m.data_dir()).len(), 2);
    orphan(&path);
    m.kill9();
    drop(file);
    m.remount();
    let mut names: Vec<String> = fs::read_dir(m.path())
        .expect("ls")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, names_left);
    for name in names_left {
        assert_eq!(fs::read(m.path().join(name)).expect("read"), b"new");
    }
    // Each name left holds one small block; the orphan's two are gone.
    assert_eq!(
        local_blocks(m.data_dir()),
        names_left.len(),
        "blocks of the orphan survived the restart"
    );
}

#[test]
fn an_unlinked_open_file_is_freed_after_kill_9() {
    orphan_is_freed_after_kill_9(
        |path| fs::remove_file(path).expect("unlink while open"),
        &[],
    );
}

#[test]
fn an_open_file_renamed_over_is_freed_after_kill_9() {
    orphan_is_freed_after_kill_9(
        |path| {
            let new = path.with_file_name("new");
            fs::write(&new, b"new").expect("write the replacement");
            fs::rename(&new, path).expect("rename over the open file");
        },
        &["orphan"],
    );
}

#[test]
fn a_second_mount_of_the_same_data_dir_is_refused() {
    let m = Mount::new();
    fs::write(m.path().join("before"), b"1").expect("write");
    let other = Mount::unmounted();
    let out = run(&mut mount_cmd(other.path(), m.data_dir()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "second mount: {stderr}");
    assert!(stderr.contains("in use"), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "stderr: {stderr}");
    assert_eq!(
        common::mount_source(other.path()),
        None,
        "second mount attached"
    );
    // The first mount is unharmed.
    assert!(m.is_mounted());
    assert_eq!(fs::read(m.path().join("before")).expect("read"), b"1");
    fs::write(m.path().join("after"), b"2").expect("write after");
    assert_eq!(fs::read(m.path().join("after")).expect("read"), b"2");
}

fn stop_with_signal_keeps_data(signal: i32) {
    let mut m = Mount::new();
    let data = pattern(2 * BLOCK + 1, 6);
    fs::write(m.path().join("f"), &data).expect("write");
    fs::create_dir(m.path().join("d")).expect("mkdir");
    let status = m.signal(signal);
    assert_eq!(status.code(), Some(0), "exit status after signal {signal}");
    assert!(!m.is_mounted(), "still mounted after signal {signal}");
    m.remount();
    assert_bytes_eq(&fs::read(m.path().join("f")).expect("read"), &data, "data");
    assert!(fs::metadata(m.path().join("d")).expect("stat").is_dir());
}

#[test]
fn sigterm_flushes_unmounts_and_exits_zero() {
    stop_with_signal_keeps_data(libc::SIGTERM);
}

#[test]
fn sigint_flushes_unmounts_and_exits_zero() {
    stop_with_signal_keeps_data(libc::SIGINT);
}

#[test]
fn fusermount3_unmount_stops_the_daemon_cleanly() {
    if Command::new("fusermount3")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("fusermount3 is not installed: skipped");
        return;
    }
    let mut m = Mount::new();
    let data = pattern(BLOCK + 7, 7);
    fs::write(m.path().join("f"), &data).expect("write");
    let out = run(Command::new("fusermount3").arg("-u").arg(m.path()));
    assert!(out.status.success(), "fusermount3 -u: {out:?}");
    let status = m.wait_daemon();
    assert_eq!(status.code(), Some(0), "daemon after fusermount3 -u");
    m.remount();
    assert_bytes_eq(&fs::read(m.path().join("f")).expect("read"), &data, "data");
}

#[test]
fn an_unmount_returns_at_once_and_leaves_the_catalog_closed() {
    let mut m = Mount::new();
    fs::write(m.path().join("f"), b"bytes").expect("write");
    // Past the committer's fold interval, so it has folded (and may fold again) when the
    // unmount comes.
    std::thread::sleep(Duration::from_millis(1500));
    // The idle uploader looks for work every 5 s; the unmount does not wait for that.
    let started = Instant::now();
    m.unmount();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the unmount took {:?}",
        started.elapsed()
    );
    let wal = m.data_dir().join("catalog.db-wal");
    assert!(!wal.exists(), "{} is left behind", wal.display());
}

fn process_exists(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    unsafe { libc::kill(pid, 0) == 0 }
}

/// Whether `pid` has exited: gone, or a zombie its new parent (init) has not reaped yet.
fn process_exited(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
    }
}

/// Whether the data dir lock is free, as it is once no daemon serves the data dir.
fn data_dir_lock_is_free(data_dir: &Path) -> bool {
    let file = File::open(data_dir.join("lock")).expect("open lock file");
    // SAFETY: flock on a descriptor `file` keeps open; closing it releases the lock.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

#[test]
fn daemon_mode_mounts_serves_and_unmounts() {
    let m = Mount::unmounted();
    let out = run(&mut mount_cmd(m.path(), m.data_dir()));
    assert!(out.status.success(), "snapfs mount (daemon): {out:?}");
    assert!(m.is_mounted(), "mounted once snapfs mount returned");
    let pid: i32 = fs::read_to_string(m.data_dir().join("lock"))
        .expect("read lock file")
        .trim()
        .parse()
        .expect("pid in the lock file");
    assert!(process_exists(pid), "daemon {pid} running");

    let data = pattern(BLOCK + 11, 8);
    fs::write(m.path().join("f"), &data).expect("write");
    assert_bytes_eq(&fs::read(m.path().join("f")).expect("read"), &data, "data");

    let out = run(snapfs().arg("umount").arg(m.path()));
    assert!(out.status.success(), "snapfs umount: {out:?}");
    assert!(!m.is_mounted(), "still mounted after snapfs umount");
    assert!(
        data_dir_lock_is_free(m.data_dir()),
        "data dir still locked after umount"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !process_exited(pid) {
        assert!(
            Instant::now() < deadline,
            "daemon {pid} still running after umount"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let log = fs::read_to_string(m.data_dir().join("snapfs.log")).expect("daemon log");
    assert!(log.contains("unmounted cleanly"), "daemon log:\n{log}");

    // The data is in the data dir: a foreground mount of it sees the file.
    let out = run(&mut mount_cmd(m.path(), m.data_dir()));
    assert!(out.status.success(), "second daemon mount: {out:?}");
    assert_bytes_eq(&fs::read(m.path().join("f")).expect("read"), &data, "data");
    let out = run(snapfs().arg("umount").arg(m.path()));
    assert!(out.status.success(), "snapfs umount: {out:?}");
}

#[test]
fn closed_files_survive_unmount_while_a_flush_timer_is_pending() {
    // Writes younger than the flush timer must still be flushed by the unmount.
    let mut m = Mount::new();
    for i in 0..20u64 {
        let mut file = File::create(m.path().join(format!("f{i}"))).expect("create");
        file.write_all(&pattern(1000 + i as usize * 5000, 30 + i))
            .expect("write");
    }
    m.unmount();
    m.remount();
    for i in 0..20u64 {
        let got = fs::read(m.path().join(format!("f{i}"))).expect("read");
        assert_bytes_eq(&got, &pattern(1000 + i as usize * 5000, 30 + i), "file");
    }
}

#[test]
fn block_size_is_chosen_at_creation_and_kept() {
    let mut m = Mount::with_args(&["--block-size", "64K"]);
    let data = pattern(200_000, 9);
    fs::write(m.path().join("f"), &data).expect("write");
    assert_eq!(
        fs::metadata(m.path().join("f")).expect("stat").blksize(),
        65536
    );
    m.unmount();
    m.set_args(&["--block-size", "1M"]);
    m.remount();
    let meta = fs::metadata(m.path().join("f")).expect("stat");
    assert_eq!(
        meta.blksize(),
        65536,
        "an existing volume keeps its block size"
    );
    assert_bytes_eq(&fs::read(m.path().join("f")).expect("read"), &data, "data");
    assert_eq!(
        block_files(m.data_dir()).len(),
        4,
        "200,000 bytes in 64 KiB blocks"
    );
}

/// The kernel escapes spaces in /proc/self/mountinfo; umount must still find the mount.
#[test]
fn umount_handles_paths_with_spaces() {
    let m = Mount::unmounted();
    let mountpoint = m.scratch("mount point");
    let data = m.scratch("data dir");
    fs::create_dir_all(&mountpoint).expect("mkdir mountpoint");
    let mounted = run(snapfs()
        .arg("mount")
        .arg(&mountpoint)
        .arg("--data")
        .arg(&data));
    assert!(
        mounted.status.success(),
        "{}",
        String::from_utf8_lossy(&mounted.stderr)
    );
    fs::write(mountpoint.join("f"), b"kept").expect("write");
    let unmounted = run(snapfs().arg("umount").arg(&mountpoint));
    if !unmounted.status.success() {
        common::detach(&mountpoint);
    }
    assert!(
        unmounted.status.success(),
        "{}",
        String::from_utf8_lossy(&unmounted.stderr)
    );
    assert!(common::mount_source(&mountpoint).is_none(), "still mounted");
}
