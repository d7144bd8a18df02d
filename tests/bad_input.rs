//! Bad input gets a clear error, loses nothing and never panics: bad mountpoints and data
//! dirs, damaged catalogs and blocks, bad command lines.

mod common;

use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{
    BLOCK, Mount, assert_bytes_eq, assert_mounted_once, assert_verify_clean, block_files, errno,
    mount_cmd, pattern, run, snapfs,
};

/// Runs `snapfs mount MOUNTPOINT --data DATA` (daemonizing unless `foreground`), which
/// must fail with exit code 1 and leave nothing mounted; returns its stderr.
#[track_caller]
fn mount_fails(mountpoint: &Path, data: &Path, foreground: bool) -> String {
    let mut cmd = mount_cmd(mountpoint, data);
    if foreground {
        cmd.arg("--foreground");
    }
    let out = run(&mut cmd);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "exit code; stderr: {stderr}");
    assert!(stderr.starts_with("snapfs: "), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "stderr: {stderr}");
    assert_eq!(
        common::mount_source(mountpoint),
        None,
        "something got mounted"
    );
    stderr
}

#[test]
fn missing_mountpoint() {
    let m = Mount::unmounted();
    let missing = m.path().join("missing");
    let stderr = mount_fails(&missing, m.data_dir(), false);
    assert!(stderr.contains("does not exist"), "stderr: {stderr}");
    assert!(
        stderr.contains(&*missing.to_string_lossy()),
        "stderr: {stderr}"
    );
}

#[test]
fn a_mountpoint_already_mounted_is_refused() {
    let first = Mount::new();
    fs::write(first.path().join("kept"), b"first").expect("write");
    let other = Mount::unmounted();
    let out = run(&mut mount_cmd(first.path(), other.data_dir()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "exit code; stderr: {stderr}");
    let data = fs::canonicalize(first.data_dir()).expect("canonical data dir");
    assert!(
        stderr.contains("is already a snapfs mount") && stderr.contains(&*data.to_string_lossy()),
        "stderr: {stderr}"
    );
    // Still the first volume, mounted once.
    assert_eq!(fs::read(first.path().join("kept")).expect("read"), b"first");
    assert_mounted_once(first.path());
}

/// `snapfs mount` again where a killed daemon left its dead mount (ENOTCONN), as
/// systemd's Restart=on-failure does: the dead mount is replaced, not stacked upon.
#[test]
fn a_mount_left_by_a_killed_daemon_is_replaced() {
    let mut mount = Mount::new();
    let file = mount.path().join("kept");
    let mut f = File::create(&file).expect("create");
    std::io::Write::write_all(&mut f, b"survives").expect("write");
    f.sync_all().expect("fsync");
    drop(f);
    mount.signal(libc::SIGKILL);
    assert_eq!(errno(fs::read_dir(mount.path())), libc::ENOTCONN);

    let out = run(&mut mount_cmd(mount.path(), mount.data_dir()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stderr: {stderr}");
    assert!(
        stderr.contains("detached the mount left"),
        "stderr: {stderr}"
    );
    assert_eq!(fs::read(&file).expect("read"), b"survives");
    assert_mounted_once(mount.path());
    let out = run(snapfs().arg("umount").arg(mount.path()));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn mountpoint_is_a_file() {
    let m = Mount::unmounted();
    let file = m.scratch("s").join("file");
    fs::write(&file, b"x").expect("write");
    let stderr = mount_fails(&file, m.data_dir(), false);
    assert!(stderr.contains("not a directory"), "stderr: {stderr}");
    assert_eq!(fs::read(&file).expect("file untouched"), b"x");
}

#[test]
fn data_dir_below_a_file() {
    let m = Mount::unmounted();
    let file = m.scratch("s").join("afile");
    fs::write(&file, b"x").expect("write");
    let stderr = mount_fails(m.path(), &file.join("data"), false);
    assert!(stderr.contains("data dir"), "stderr: {stderr}");
    assert!(stderr.contains("afile/data"), "stderr: {stderr}");
    assert_eq!(fs::read(&file).expect("file untouched"), b"x");
}

#[test]
fn data_dir_is_a_file() {
    let m = Mount::unmounted();
    let file = m.scratch("s").join("afile");
    fs::write(&file, b"precious").expect("write");
    let stderr = mount_fails(m.path(), &file, false);
    assert!(stderr.contains("data dir"), "stderr: {stderr}");
    assert_eq!(fs::read(&file).expect("file untouched"), b"precious");
}

/// A tmpfs mounted by the test, detached when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: PathBuf) -> Tmpfs {
        let out = run(Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=16m", "snapfs-test-tmpfs"])
            .arg(&at));
        assert!(out.status.success(), "mount tmpfs: {out:?}");
        Tmpfs(at)
    }

    fn make_read_only(&self) {
        let out = run(Command::new("mount")
            .args(["-o", "remount,ro"])
            .arg(&self.0));
        assert!(out.status.success(), "remount tmpfs read-only: {out:?}");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        common::detach(&self.0);
    }
}

#[test]
fn data_dir_on_a_read_only_filesystem() {
    let m = Mount::unmounted();
    let tmpfs = Tmpfs::mount(m.scratch("ro"));
    let existing = tmpfs.0.join("existing");
    fs::create_dir(&existing).expect("mkdir on tmpfs");
    tmpfs.make_read_only();
    // Root ignores mode bits, not a read-only filesystem.
    for data in [existing.clone(), tmpfs.0.join("new")] {
        for foreground in [false, true] {
            let stderr = mount_fails(m.path(), &data, foreground);
            assert!(stderr.contains("data dir"), "stderr: {stderr}");
            assert!(stderr.contains("Read-only file system"), "stderr: {stderr}");
        }
    }
}

#[test]
fn corrupt_catalog_is_refused_and_left_alone() {
    let m = Mount::unmounted();
    let catalog = m.data_dir().join("catalog.db");
    let garbage = vec![0x42u8; 8192];
    fs::write(&catalog, &garbage).expect("write garbage");
    for foreground in [false, true] {
        let stderr = mount_fails(m.path(), m.data_dir(), foreground);
        assert!(stderr.contains("catalog"), "stderr: {stderr}");
        assert!(
            stderr.contains("corrupt") || stderr.contains("not a snapfs catalog"),
            "stderr: {stderr}"
        );
        assert_eq!(fs::read(&catalog).expect("read catalog"), garbage);
    }
}

/// A SQLite database of some other program is not a catalog to take over.
#[test]
fn foreign_sqlite_database_is_refused_and_left_alone() {
    let m = Mount::unmounted();
    let catalog = m.data_dir().join("catalog.db");
    {
        let db = rusqlite::Connection::open(&catalog).expect("create foreign db");
        db.execute_batch(
            "CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT);
             INSERT INTO notes (text) VALUES ('keep me');",
        )
        .expect("fill foreign db");
    }
    let before = fs::read(&catalog).expect("read db");
    let stderr = mount_fails(m.path(), m.data_dir(), false);
    assert!(stderr.contains("not a snapfs catalog"), "stderr: {stderr}");
    assert_bytes_eq(
        &fs::read(&catalog).expect("read db"),
        &before,
        "foreign database",
    );
}

#[test]
fn catalog_of_a_newer_snapfs_is_refused() {
    let mut m = Mount::new();
    fs::write(m.path().join("f"), b"keep").expect("write");
    m.unmount();
    let catalog = m.data_dir().join("catalog.db");
    let set_version = |v: i64| {
        let db = rusqlite::Connection::open(&catalog).expect("open catalog");
        db.pragma_update(None, "user_version", v)
            .expect("set user_version");
    };
    let version = || -> i64 {
        let db = rusqlite::Connection::open(&catalog).expect("open catalog");
        db.pragma_query_value(None, "user_version", |r| r.get(0))
            .expect("user_version")
    };
    let current = version();
    set_version(99);
    let stderr = mount_fails(m.path(), m.data_dir(), false);
    assert!(stderr.contains("format version 99"), "stderr: {stderr}");
    assert!(stderr.contains("upgrade snapfs"), "stderr: {stderr}");
    assert_eq!(version(), 99, "the catalog was changed");
    // Put back, it mounts with the data intact.
    set_version(current);
    m.remount();
    assert_eq!(fs::read(m.path().join("f")).expect("read"), b"keep");
}

#[test]
fn catalog_of_an_older_snapfs_is_read_as_it_is_and_upgraded_by_the_mount() {
    let mut m = Mount::new();
    fs::write(m.path().join("f"), pattern(BLOCK + 10, 3)).expect("write");
    m.unmount();
    let catalog = m.data_dir().join("catalog.db");
    let version = || -> i64 {
        let db = rusqlite::Connection::open(&catalog).expect("open catalog");
        db.pragma_query_value(None, "user_version", |r| r.get(0))
            .expect("user_version")
    };
    let current = version();
    assert_eq!(
        current, 15,
        "this test downgrades from version 15: update it"
    );
    // The catalog as the snapfs before packed trees (version 10), piece values (version
    // 11, moved to a rowid table by 12), live totals kept without triggers (version 13)
    // and directory trees repaired (versions 14 and 15, rows only) left it: the mount
    // upgrades it in six steps.
    {
        let db = rusqlite::Connection::open(&catalog).expect("open catalog");
        db.execute_batch(
            "DROP TRIGGER blocks_free_pieces; DROP TABLE block_pieces; \
             DROP TABLE packed_trees; PRAGMA user_version = 9;",
        )
        .expect("downgrade");
        for (name, event) in [
            ("inodes_bytes_insert", "INSERT"),
            ("inodes_bytes_delete", "DELETE"),
            ("inodes_bytes_update", "UPDATE"),
            ("inodes_count_insert", "INSERT"),
            ("inodes_count_delete", "DELETE"),
            ("inodes_count_update", "UPDATE OF death"),
        ] {
            // Only their names matter here: nothing writes before the upgrade drops them.
            db.execute_batch(&format!(
                "CREATE TRIGGER {name} AFTER {event} ON inodes BEGIN SELECT 1; END;"
            ))
            .expect("an older trigger");
        }
    }
    // verify reads every table, packed trees and piece values included.
    assert_verify_clean(m.data_dir(), &[]);
    assert_eq!(version(), 9, "a read-only command changed the catalog");
    m.remount();
    assert_eq!(version(), current, "the mount upgrades it");
    assert_eq!(
        fs::read(m.path().join("f")).expect("read"),
        pattern(BLOCK + 10, 3)
    );
    // The upgraded catalog keeps its counters as files come and go.
    fs::write(m.path().join("g"), pattern(100, 4)).expect("write after the upgrade");
    fs::remove_file(m.path().join("f")).expect("unlink after the upgrade");
    m.unmount();
    assert_verify_clean(m.data_dir(), &[]);
}

/// Writes a one-block victim file and a small bystander, unmounts, and returns the path
/// of the victim's block file.
fn victim_block(m: &mut Mount, victim: &[u8]) -> PathBuf {
    fs::write(m.path().join("victim"), victim).expect("write victim");
    fs::write(m.path().join("bystander"), b"unrelated").expect("write bystander");
    m.unmount();
    let hex = blake3::hash(victim).to_hex().to_string();
    let block = m.data_dir().join("blocks").join(&hex[..2]).join(&hex);
    assert!(
        block_files(m.data_dir()).contains(&block),
        "victim block {} not in the store: {:?}",
        block.display(),
        block_files(m.data_dir())
    );
    block
}

fn assert_victim_is_eio(m: &Mount) {
    let victim = m.path().join("victim");
    assert_eq!(errno(fs::read(&victim)), libc::EIO);
    let file = File::open(&victim).expect("open still works");
    let mut buf = [0u8; 100];
    assert_eq!(errno(file.read_at(&mut buf, 5000)), libc::EIO);
    assert_eq!(errno(file.read_at(&mut buf, 0)), libc::EIO, "second read");
    assert_eq!(
        fs::read(m.path().join("bystander")).expect("other files still read"),
        b"unrelated"
    );
}

#[test]
fn a_corrupt_block_reads_as_eio_not_wrong_data() {
    let mut m = Mount::new();
    let victim = pattern(BLOCK, 1);
    let block = victim_block(&mut m, &victim);
    let mut stored = fs::read(&block).expect("read block file");
    assert_bytes_eq(&stored, &victim, "block file holds the data");
    // One byte in each of the first two pages: the reads below at 0 and at 5000 each
    // touch a damaged one.
    stored[50] ^= 0x01;
    stored[5000] ^= 0x01;
    fs::write(&block, &stored).expect("flip a byte");
    m.remount();
    assert_victim_is_eio(&m);
    // Pages of the block away from the damage are checked alone, and read.
    let file = File::open(m.path().join("victim")).expect("open");
    let mut page = [0u8; 100];
    file.read_exact_at(&mut page, 3 * 4096 + 7)
        .expect("an intact page of a damaged block");
    assert_bytes_eq(&page, &victim[3 * 4096 + 7..3 * 4096 + 107], "intact page");
    assert!(
        m.daemon_log().contains("corrupt"),
        "no log line about the corrupt block:\n{}",
        m.daemon_log()
    );
    // The mount keeps working.
    fs::write(m.path().join("new"), b"fine").expect("write after EIO");
    assert_eq!(fs::read(m.path().join("new")).expect("read"), b"fine");
}

/// A damaged block file whose block the store holds (a completed snapshot sent it) heals:
/// reads, of part of the block or all of it, get its bytes from the store, and the file
/// holds them again.
#[test]
fn a_corrupt_block_the_store_holds_is_fetched_again_and_its_file_replaced() {
    let mut m = Mount::new();
    let victim = pattern(BLOCK, 3);
    fs::write(m.path().join("victim"), &victim).expect("write victim");
    common::take_snapshot(&m, "sent");
    common::wait_completed(&m, "sent");
    m.unmount();
    let hex = blake3::hash(&victim).to_hex().to_string();
    let block = m.data_dir().join("blocks").join(&hex[..2]).join(&hex);
    let mut stored = fs::read(&block).expect("read block file");
    stored[50] ^= 0x01;
    stored[5000] ^= 0x01;
    fs::write(&block, &stored).expect("flip bytes");
    m.remount();

    let file = File::open(m.path().join("victim")).expect("open");
    let mut part = [0u8; 100];
    file.read_exact_at(&mut part, 5000)
        .expect("a damaged page the store holds");
    assert_bytes_eq(&part, &victim[5000..5100], "damaged page");
    let whole = fs::read(m.path().join("victim")).expect("the whole damaged block");
    assert_bytes_eq(&whole, &victim, "damaged block");
    assert_bytes_eq(
        &fs::read(&block).expect("read block file"),
        &victim,
        "the file healed",
    );
    assert!(
        m.daemon_log()
            .contains("fetching a damaged block from the store"),
        "no log line about the heal:\n{}",
        m.daemon_log()
    );
}

#[test]
fn a_missing_block_reads_as_eio() {
    let mut m = Mount::new();
    let block = victim_block(&mut m, &pattern(BLOCK, 2));
    fs::remove_file(&block).expect("delete block file");
    m.remount();
    assert_victim_is_eio(&m);
}

#[test]
fn bad_block_size_is_a_usage_error() {
    let m = Mount::unmounted();
    for size in ["100K", "4M", "32K", "abc"] {
        let out = run(mount_cmd(m.path(), m.data_dir()).args(["--block-size", size]));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "--block-size {size}: {stderr}");
        assert!(stderr.contains("--block-size"), "stderr: {stderr}");
        assert!(!stderr.contains("panicked"), "stderr: {stderr}");
    }
    assert_eq!(common::mount_source(m.path()), None);
    assert_eq!(
        fs::read_dir(m.data_dir()).expect("ls data").count(),
        0,
        "a usage error touched the data dir"
    );
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        &["mount"][..],
        &["frobnicate"],
        &["mount", "/tmp", "--bogus"],
    ] {
        let out = run(snapfs().args(args));
        assert_eq!(out.status.code(), Some(2), "snapfs {args:?}: {out:?}");
    }
}

#[test]
fn umount_of_something_that_is_not_snapfs() {
    let m = Mount::unmounted();
    let out = run(snapfs().arg("umount").arg(m.path()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(stderr.contains("not a snapfs mount"), "stderr: {stderr}");
    let out = run(snapfs().arg("umount").arg(m.path().join("missing")));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "stderr: {stderr}");
}

#[test]
fn umount_of_a_busy_mount_says_why_and_leaves_it_mounted() {
    let mount = Mount::new();
    fs::write(mount.path().join("f"), b"open").expect("write");
    let open = File::open(mount.path().join("f")).expect("open");
    let out = run(snapfs().arg("umount").arg(mount.path()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(
        stderr.contains("is busy") && stderr.contains("fuser -vm"),
        "stderr: {stderr}"
    );
    let mut read = Vec::new();
    std::io::Read::read_to_end(&mut &open, &mut read).expect("still served");
    assert_eq!(read, b"open");
}
