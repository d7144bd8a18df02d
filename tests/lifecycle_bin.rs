//! The recycle bin (`--trash-days`, `.snapshots/.trash`, `snapshot list --trash`,
//! `undelete`, `purge`) and snapshot locks (`snapshot lock`/`unlock`, `user.snapfs.lock`)
//! through real mounts, the CLI, and a real S3 server.

mod common;

use std::fs;
use std::io::Write;
use std::process::Output;
use std::time::{Duration, Instant};

use common::s3::{S3Client, S3Env, unique_prefix};
use common::*;
use serde_json::Value;

/// Runs `snapfs ARGS`, which must fail; its stderr.
#[track_caller]
fn fails(args: &[&str]) -> String {
    let out = cli(args);
    assert!(!out.status.success(), "snapfs {args:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

fn mnt(mount: &Mount) -> &str {
    mount.path().to_str().expect("utf-8 mountpoint")
}

/// `snapshot list --trash --json` of the mounted volume.
fn trash(mount: &Mount) -> Value {
    json(&ok(&[
        "snapshot",
        "list",
        "--trash",
        "--json",
        "--mount",
        mnt(mount),
    ]))
}

fn trash_names(mount: &Mount) -> Vec<String> {
    let listing = trash(mount);
    let entries = listing["snapshots"].as_array().expect("snapshots array");
    entries
        .iter()
        .map(|s| s["name"].as_str().expect("name").to_owned())
        .collect()
}

/// Names `snapshot list --json` shows (the bin's are not among them).
fn snapshot_names(mount: &Mount) -> Vec<String> {
    let list = json(&ok(&["snapshot", "list", "--json", "--mount", mnt(mount)]));
    list.as_array()
        .expect("array")
        .iter()
        .map(|s| s["name"].as_str().expect("name").to_owned())
        .collect()
}

/// `snapfs snapshot lock MOUNTPOINT NAME ARGS`.
fn lock(mountpoint: &str, name: &str, args: &[&str]) -> Output {
    cli(&[&["snapshot", "lock", mountpoint, name], args].concat())
}

#[track_caller]
fn locked(mountpoint: &str, name: &str, args: &[&str]) {
    let out = lock(mountpoint, name, args);
    assert!(
        out.status.success(),
        "lock {name} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[track_caller]
fn refused(mountpoint: &str, name: &str, args: &[&str]) {
    let out = lock(mountpoint, name, args);
    assert!(
        !out.status.success(),
        "lock {name} {args:?} was not refused"
    );
}

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not in time");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_deleted_snapshot_waits_in_the_bin_read_only_and_comes_back() {
    let mut mount = Mount::with_args(&["--trash-days", "1"]);
    let old = pattern(3 * BLOCK, 1);
    fs::write(mount.path().join("f"), &old).expect("write");
    take_snapshot(&mount, "s");
    fs::write(mount.path().join("f"), pattern(BLOCK, 2)).expect("overwrite");
    let blocks_before = block_files(mount.data_dir()).len();

    fs::remove_dir(snapshot_dir(&mount, "s")).expect("rmdir into the bin");
    assert!(!snapshot_dir(&mount, "s").exists());
    assert_eq!(
        dir_names(&mount.path().join(".snapshots")),
        Vec::<String>::new(),
        "neither the snapshot nor the bin is listed"
    );
    assert!(snapshot_names(&mount).is_empty());
    let bin = mount.path().join(".snapshots/.trash");
    assert_eq!(dir_names(&bin), ["s"]);
    assert_bytes_eq(
        &fs::read(bin.join("s/f")).expect("read"),
        &old,
        "in the bin",
    );
    assert_eq!(errno(fs::write(bin.join("s/f"), b"x")), libc::EROFS);
    assert_eq!(errno(fs::create_dir(bin.join("new"))), libc::EROFS);
    assert_eq!(
        block_files(mount.data_dir()).len(),
        blocks_before,
        "blocks kept"
    );

    // Listed with its times and what purging it frees (its 3 old blocks).
    let listed = trash(&mount);
    let entry = &listed["snapshots"][0];
    assert_eq!(entry["name"], "s");
    let (deleted, expires) = (
        entry["deleted"].as_str().expect("deleted"),
        entry["expires"].as_str().expect("expires"),
    );
    let day = snapfs::volume::parse_time(expires).expect("expiry")
        - snapfs::volume::parse_time(deleted).expect("deletion");
    assert_eq!(day, 86_400 * 1_000_000_000);
    assert_eq!(entry["exclusive_bytes"], 3 * BLOCK as u64);
    assert_eq!(listed["total_bytes"], 3 * BLOCK as u64);

    // The name is free; undelete needs --as while it is taken.
    take_snapshot(&mount, "s");
    let err = fails(&["snapshot", "undelete", mnt(&mount), "s"]);
    assert!(err.contains("--as"), "{err}");
    ok(&["snapshot", "undelete", mnt(&mount), "s", "--as", "s-old"]);
    assert_bytes_eq(
        &fs::read(snapshot_dir(&mount, "s-old").join("f")).expect("read"),
        &old,
        "undeleted",
    );
    assert!(trash_names(&mount).is_empty());

    // Undelete under its own name, by rename, once the name is free.
    fs::remove_dir(snapshot_dir(&mount, "s")).expect("rmdir s");
    fs::remove_dir(snapshot_dir(&mount, "s-old")).expect("rmdir s-old");
    let mut in_bin = trash_names(&mount);
    in_bin.sort();
    assert_eq!(in_bin, ["s", "s-old"]);
    ok(&["snapshot", "undelete", mnt(&mount), "s-old"]);
    assert!(snapshot_dir(&mount, "s-old").exists());
    fs::remove_dir(snapshot_dir(&mount, "s-old")).expect("rmdir s-old again");

    // The bin survives a remount.
    mount.remount();
    let mut in_bin = trash_names(&mount);
    in_bin.sort();
    assert_eq!(in_bin, ["s", "s-old"]);
    assert_bytes_eq(
        &fs::read(bin.join("s-old/f")).expect("read after remount"),
        &old,
        "in the bin after a remount",
    );

    // Purging frees the blocks only it held.
    ok(&["snapshot", "purge", mnt(&mount), "s-old"]);
    let err = fails(&["snapshot", "purge", mnt(&mount), "s-old"]);
    assert!(err.contains("recycle bin"), "{err}");
    assert_eq!(trash_names(&mount), ["s"]);
    assert_eq!(block_files(mount.data_dir()).len(), blocks_before - 3);
    assert_eq!(trash(&mount)["total_bytes"], 0);
}

#[test]
fn the_bin_purges_at_expiry() {
    let mount = Mount::with_args(&["--trash-days", "3s"]);
    fs::write(mount.path().join("f"), pattern(BLOCK, 3)).expect("write");
    take_snapshot(&mount, "short");
    fs::remove_file(mount.path().join("f")).expect("rm");
    let blocks = block_files(mount.data_dir()).len();
    let deleted = Instant::now();
    fs::remove_dir(snapshot_dir(&mount, "short")).expect("rmdir");
    assert_eq!(trash_names(&mount), ["short"]);
    // Looked up: the kernel caches the name (an hour) until the daemon drops it.
    assert!(mount.path().join(".snapshots/.trash/short").exists());
    assert_eq!(block_files(mount.data_dir()).len(), blocks);
    wait_until("expiry", Duration::from_secs(10), || {
        trash_names(&mount).is_empty()
    });
    assert!(deleted.elapsed() >= Duration::from_secs(3), "purged early");
    assert!(block_files(mount.data_dir()).is_empty());
    assert!(!mount.path().join(".snapshots/.trash/short").exists());
}

#[test]
fn a_full_data_dir_purges_the_oldest_trash_before_enospc() {
    let mount = Mount::with_tmpfs_data("64m", &["--trash-days", "1"]);
    let first = pattern(20 << 20, 4);
    fs::write(mount.path().join("a"), &first).expect("write a");
    take_snapshot(&mount, "old");
    wait_completed(&mount, "old");
    fs::remove_file(mount.path().join("a")).expect("rm a");
    fs::remove_dir(snapshot_dir(&mount, "old")).expect("rmdir into the bin");
    assert_eq!(trash_names(&mount), ["old"]);

    // 20 MiB blocks + 20 MiB in the store (the default, in the data dir) + the reserve:
    // 28 MiB more fit only once the bin gives its blocks back.
    let second = pattern(28 << 20, 5);
    let mut file = create(&mount.path().join("b"));
    file.write_all(&second).expect("write b");
    file.sync_all().expect("fsync b: the bin made room");
    drop(file);
    assert_bytes_eq(
        &fs::read(mount.path().join("b")).expect("read b"),
        &second,
        "written on the full disk",
    );
    assert!(trash_names(&mount).is_empty());
    let log = mount.daemon_log();
    assert!(
        log.contains("data dir full: purging the oldest snapshot of the recycle bin"),
        "{log}"
    );
}

#[test]
fn locked_snapshots_refuse_deletion_by_their_mode() {
    let mut mount = Mount::with_args(&["--trash-days", "1"]);
    fs::write(mount.path().join("f"), b"data").expect("write");
    for name in ["g", "c", "k", "e"] {
        take_snapshot(&mount, name);
    }
    let m = mnt(&mount).to_owned();
    let lock_of = |name: &str| snapshot_attr(&mount, name, "user.snapfs.lock");

    // Governance: rmdir is EPERM (logged with the lock), shortening and unlocking work.
    locked(&m, "g", &["--for", "1h"]);
    assert!(lock_of("g").starts_with("mode=governance until="));
    assert_eq!(
        errno(fs::remove_dir(snapshot_dir(&mount, "g"))),
        libc::EPERM
    );
    let err = fails(&["snapshot", "delete", &m, "g"]);
    assert!(err.contains("locked (mode=governance until="), "{err}");
    let log = mount.daemon_log();
    assert!(log.contains("refused to delete a locked snapshot"), "{log}");
    locked(&m, "g", &["--for", "30m"]);
    ok(&["snapshot", "unlock", &m, "g"]);
    assert_eq!(
        errno(getxattr(&snapshot_dir(&mount, "g"), "user.snapfs.lock")),
        libc::ENODATA
    );
    fs::remove_dir(snapshot_dir(&mount, "g")).expect("unlocked: deleted");

    // Compliance: after its (empty) cool-off, only extended.
    locked(&m, "c", &["--for", "1h", "--mode", "compliance"]);
    let err = fails(&["snapshot", "unlock", &m, "c"]);
    assert!(err.contains("only extended"), "{err}");
    assert_eq!(
        errno(removexattr(&snapshot_dir(&mount, "c"), "user.snapfs.lock")),
        libc::EPERM
    );
    refused(&m, "c", &["--for", "30m", "--mode", "compliance"]);
    refused(&m, "c", &["--for", "2h"]);
    let before = lock_of("c");
    locked(&m, "c", &["--for", "2h", "--mode", "compliance"]);
    assert!(lock_of("c") > before, "{} then {before}", lock_of("c"));
    assert_eq!(
        errno(fs::remove_dir(snapshot_dir(&mount, "c"))),
        libc::EPERM
    );

    // In its cool-off a compliance lock is like governance.
    locked(
        &m,
        "k",
        &["--for", "1h", "--mode", "compliance", "--cool-off", "1h"],
    );
    ok(&["snapshot", "unlock", &m, "k"]);
    fs::remove_dir(snapshot_dir(&mount, "k")).expect("unlocked in the cool-off");

    // An expired lock no longer holds.
    let until = snapfs::volume::rfc3339(snapfs::volume::now() + 2_000_000_000);
    locked(&m, "e", &["--until", &until, "--mode", "compliance"]);
    assert_eq!(
        errno(fs::remove_dir(snapshot_dir(&mount, "e"))),
        libc::EPERM
    );
    std::thread::sleep(Duration::from_millis(2100));
    fs::remove_dir(snapshot_dir(&mount, "e")).expect("expired lock");

    // Shown by list and show; kept across a remount.
    mount.remount();
    let list = json(&ok(&["snapshot", "list", "--json", "--mount", &m]));
    let c = list
        .as_array()
        .expect("array")
        .iter()
        .find(|s| s["name"] == "c")
        .expect("c listed")
        .clone();
    assert_eq!(c["lock"]["mode"], "compliance");
    let show = ok(&["snapshot", "show", "c", "--mount", &m]);
    assert!(show.contains("lock:      compliance until"), "{show}");
    assert_eq!(
        errno(fs::remove_dir(snapshot_dir(&mount, "c"))),
        libc::EPERM
    );
    assert!(trash_names(&mount).contains(&"g".to_owned()));
}

#[test]
fn a_lock_that_would_not_hold_is_refused_and_changes_nothing() {
    let mount = Mount::new();
    fs::write(mount.path().join("f"), b"data").expect("write");
    take_snapshot(&mount, "s");
    let m = mnt(&mount).to_owned();
    for args in [
        &["--for", "0s"][..],
        &["--until", "2020-01-01T00:00:00Z"],
        &["--until", "2020-01-01T00:00:00Z", "--mode", "compliance"],
    ] {
        let out = lock(&m, "s", args);
        assert_eq!(out.status.code(), Some(1), "lock {args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("would not hold: that time has passed"),
            "{err}"
        );
    }
    // Through the xattr as well: EINVAL, and still no lock.
    let dir = snapshot_dir(&mount, "s");
    assert_eq!(
        errno(setxattr(
            &dir,
            "user.snapfs.lock",
            b"mode=compliance until=2020-01-01T00:00:00Z",
            0
        )),
        libc::EINVAL
    );
    assert_eq!(errno(getxattr(&dir, "user.snapfs.lock")), libc::ENODATA);
    fs::remove_dir(&dir).expect("not locked: deleted");
}

#[test]
fn every_command_takes_a_snapshot_name_that_is_not_utf8() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let mount = Mount::with_args(&["--trash-days", "1"]);
    fs::write(mount.path().join("f"), b"data").expect("write");
    let (name, other) = (OsStr::from_bytes(b"v\xe9"), OsStr::from_bytes(b"w\xe9"));
    // `snapfs snapshot VERB MOUNTPOINT SNAPSHOT ARGS...`
    let snapshot = |verb: &str, snapshot: &OsStr, args: &[&OsStr]| {
        run(snapfs()
            .args(["snapshot", verb])
            .arg(mount.path())
            .arg(snapshot)
            .args(args))
    };
    let dir = mount.path().join(".snapshots").join(name);
    let stdout_of = |out: &Output, what: &str| {
        assert!(
            out.status.success(),
            "{what}: exit {}, stderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let stderr_of = |out: &Output, what: &str| {
        assert_eq!(out.status.code(), Some(1), "{what}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let flags = |flags: &[&'static str]| -> Vec<&'static OsStr> {
        flags.iter().map(|flag| OsStr::new(*flag)).collect()
    };

    let out = snapshot("create", name, &flags(&["--tag", "k=v"]));
    assert!(stdout_of(&out, "create").contains("snapshot 'v\\351' taken"));
    assert!(dir.is_dir());
    assert_eq!(getxattr(&dir, "user.tag.k").expect("tag"), b"v");
    let out = snapshot("create", name, &[]);
    assert!(stderr_of(&out, "create twice").contains("snapshot 'v\\351' already exists"));
    let out = snapshot("tag", name, &flags(&["k=w"]));
    stdout_of(&out, "tag");
    assert_eq!(getxattr(&dir, "user.tag.k").expect("tag"), b"w");

    let out = snapshot("lock", name, &flags(&["--for", "1h"]));
    assert!(stdout_of(&out, "lock").contains("snapshot 'v\\351' locked"));
    let out = snapshot("delete", name, &[]);
    assert!(stderr_of(&out, "delete locked").contains("snapshot 'v\\351' is locked"));
    assert!(dir.is_dir());
    let out = snapshot("unlock", name, &[]);
    assert!(stdout_of(&out, "unlock").contains("snapshot 'v\\351' unlocked"));
    let out = snapshot("delete", name, &[]);
    assert!(stdout_of(&out, "delete").contains("snapshot 'v\\351' deleted"));
    assert!(!dir.exists());

    let out = snapshot("undelete", name, &[OsStr::new("--as"), other]);
    assert!(stdout_of(&out, "undelete").contains("snapshot 'w\\351' restored"));
    let moved = mount.path().join(".snapshots").join(other);
    assert_eq!(fs::read(moved.join("f")).expect("read"), b"data");
    fs::remove_dir(&moved).expect("rmdir");
    let out = snapshot("purge", other, &[]);
    assert!(stdout_of(&out, "purge").contains("snapshot 'w\\351' purged"));
    let out = snapshot("purge", other, &[]);
    assert!(
        stderr_of(&out, "purge twice").contains("no snapshot named 'w\\351' in the recycle bin")
    );
    let out = snapshot("delete", name, &[]);
    assert!(stderr_of(&out, "delete twice").contains("no snapshot named 'v\\351'"));
}

/// The snapshot object `snapshots/<id>` of `prefix`, decoded.
fn stored_snapshot(
    client: &S3Client,
    prefix: &str,
    id: u64,
) -> Option<snapfs::manifest::SnapshotManifest> {
    let object = client.get(&format!("{prefix}snapshots/{id:010}"))?;
    let data = snapfs::manifest::decompress(&object, 1 << 20).expect("zstd");
    Some(snapfs::manifest::decode_snapshot(&data).expect("decodes"))
}

fn stored_block_hashes(client: &S3Client, prefix: &str) -> Vec<String> {
    packed_in_bucket(client, prefix).into_keys().collect()
}

#[test]
fn the_store_keeps_trash_until_purged_and_carries_locks_to_followers() {
    let s3 = S3Env::garage();
    let prefix = unique_prefix("bin");
    let url = s3.url(&prefix);
    let mount = s3.mount_store(&prefix, &["--trash-days", "1"]);
    let m = mnt(&mount).to_owned();
    fs::write(mount.path().join("f"), pattern(2 * BLOCK, 6)).expect("write");
    take_snapshot(&mount, "old");
    wait_completed(&mount, "old");
    fs::write(mount.path().join("f"), pattern(2 * BLOCK, 7)).expect("overwrite");
    take_snapshot(&mount, "keep");
    wait_completed(&mount, "keep");
    let client = s3.client();
    assert_eq!(stored_block_hashes(&client, &prefix).len(), 4);

    // In the bin: its objects stay, its snapshot object says so, listings skip it.
    fs::remove_dir(snapshot_dir(&mount, "old")).expect("rmdir into the bin");
    locked(&m, "keep", &["--for", "1h"]);
    wait_until(
        "the objects show the bin and the lock",
        COMPLETION_TIMEOUT,
        || {
            let old = stored_snapshot(&client, &prefix, 1).expect("old's object stays");
            let keep = stored_snapshot(&client, &prefix, 2).expect("keep's object");
            old.trash.is_some() && keep.lock.is_some()
        },
    );
    assert_eq!(
        stored_block_hashes(&client, &prefix).len(),
        4,
        "the bin's blocks stay"
    );
    let mut cmd = snapfs();
    s3.apply(&mut cmd);
    let out = run(cmd.args(["snapshot", "list", "--json", "--store", &url]));
    let stored = json(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(stored.as_array().expect("array").len(), 1, "{stored}");
    assert_eq!(stored[0]["name"], "keep");
    assert_eq!(stored[0]["lock"]["mode"], "governance");
    let out = s3.restore(&url, "old", &mount.scratch("r"), &[]);
    assert!(
        !out.status.success(),
        "a trashed snapshot is not restored by name"
    );
    let dest = mount.scratch("from-the-bin");
    let out = s3.restore(&url, "old", &dest, &["--trash"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_bytes_eq(
        &fs::read(dest.join("f")).expect("restored from the bin"),
        &pattern(2 * BLOCK, 6),
        "restored with --trash from the store alone",
    );

    // A follower shows keep with its lock, not the trashed one, and refuses to delete.
    let follower = s3.mount(&["--store", &url, "--read-only", "--follow-interval", "1"]);
    assert_eq!(dir_names(&follower.path().join(".snapshots")), ["keep"]);
    assert!(snapshot_attr(&follower, "keep", "user.snapfs.lock").starts_with("mode=governance"));
    let followed = json(&ok(&[
        "snapshot",
        "list",
        "--json",
        "--mount",
        mnt(&follower),
    ]));
    assert_eq!(followed[0]["lock"]["mode"], "governance");
    // A follower is mounted read-only: the kernel refuses before the lock is asked.
    assert_eq!(
        errno(fs::remove_dir(snapshot_dir(&follower, "keep"))),
        libc::EROFS
    );
    assert!(snapshot_dir(&follower, "keep").exists());

    // Unlocked at the source, unlocked in the follower.
    ok(&["snapshot", "unlock", &m, "keep"]);
    wait_until(
        "the follower follows the unlock",
        COMPLETION_TIMEOUT,
        || {
            getxattr(&snapshot_dir(&follower, "keep"), "user.snapfs.lock")
                .is_err_and(|e| e.raw_os_error() == Some(libc::ENODATA))
        },
    );

    // Undeleted at the source, it is followed again, older than what the follower shows;
    // the live tree stays the newest snapshot's. Deleted again, it goes again.
    ok(&["snapshot", "undelete", &m, "old"]);
    wait_until(
        "the follower follows the undelete",
        COMPLETION_TIMEOUT,
        || snapshot_dir(&follower, "old").exists(),
    );
    assert_bytes_eq(
        &fs::read(snapshot_dir(&follower, "old").join("f")).expect("read the undeleted"),
        &pattern(2 * BLOCK, 6),
        "the undeleted snapshot in the follower",
    );
    assert_bytes_eq(
        &fs::read(follower.path().join("f")).expect("read the live tree"),
        &pattern(2 * BLOCK, 7),
        "the follower's live tree",
    );
    fs::remove_dir(snapshot_dir(&mount, "old")).expect("rmdir into the bin again");
    wait_until("the follower drops it again", COMPLETION_TIMEOUT, || {
        !snapshot_dir(&follower, "old").exists()
    });

    // Purged: its snapshot object and the blocks only it needed go.
    ok(&["snapshot", "purge", &m, "old"]);
    wait_until(
        "the purged snapshot's objects go",
        COMPLETION_TIMEOUT,
        || {
            stored_snapshot(&client, &prefix, 1).is_none()
                && stored_block_hashes(&client, &prefix).len() == 2
        },
    );
}
