//! Pre- and post-snapshot hooks through real mounts: a pre hook that writes into the
//! volume (its write is in the snapshot), one that fails (EIO, the CLI names the reason,
//! no snapshot), one that times out (killed with what it started), a post hook that sees
//! the snapshot's name and state, and hooks remembered across a remount.

mod common;

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn shell_quote(path: &Path) -> String {
    format!("'{}'", path.display())
}

/// A mount whose arguments name its own paths (its mountpoint, scratch dirs).
fn mount_with(args: impl FnOnce(&Mount) -> Vec<String>) -> Mount {
    let mut mount = Mount::unmounted();
    let args = args(&mount);
    mount.set_args(&args.iter().map(String::as_str).collect::<Vec<_>>());
    mount.remount();
    mount
}

#[test]
fn pre_hook_writes_into_the_volume_before_the_snapshot() {
    let mount = Mount::with_args(&[
        "--pre-snapshot",
        r#"echo "checkpoint for $SNAPFS_SNAPSHOT" > "$SNAPFS_MOUNTPOINT/checkpoint""#,
    ]);
    fs::write(mount.path().join("data"), b"rows").expect("write");
    let snap = take_snapshot(&mount, "first");
    assert_eq!(
        fs::read(snap.join("checkpoint")).expect("the hook's write is in the snapshot"),
        b"checkpoint for first\n"
    );
    assert_eq!(fs::read(snap.join("data")).expect("read"), b"rows");
    // The CLI takes snapshots the same way.
    let out = run(snapfs()
        .args(["snapshot", "create"])
        .arg(mount.path())
        .arg("second"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        fs::read(snapshot_dir(&mount, "second").join("checkpoint")).expect("read"),
        b"checkpoint for second\n"
    );
}

#[test]
fn failing_pre_hook_fails_the_snapshot_with_its_reason() {
    let mut mount = Mount::with_args(&["--pre-snapshot", "echo database is busy >&2; exit 3"]);
    let dir = snapshot_dir(&mount, "refused");
    assert_eq!(errno(fs::create_dir(&dir)), libc::EIO);
    assert_eq!(
        errno(fs::metadata(&dir)),
        libc::ENOENT,
        "no snapshot exists"
    );
    let out = run(snapfs()
        .args(["snapshot", "create"])
        .arg(mount.path())
        .arg("by-cli"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("pre-snapshot hook failed") && stderr.contains("database is busy"),
        "the CLI names the reason: {stderr}"
    );
    assert_eq!(
        errno(fs::metadata(snapshot_dir(&mount, "by-cli"))),
        libc::ENOENT
    );
    let log = mount.daemon_log();
    assert!(
        log.contains("database is busy"),
        "reason in the log:\n{log}"
    );

    // The hook is remembered; told to proceed, the snapshot is taken despite it.
    mount.set_args(&["--pre-snapshot-failure", "proceed"]);
    mount.remount();
    take_snapshot(&mount, "anyway");
    assert!(mount.daemon_log().contains("taking the snapshot anyway"));

    // An empty command removes it: nothing fails any more, whatever the policy.
    mount.set_args(&["--pre-snapshot", "", "--pre-snapshot-failure", "abort"]);
    mount.remount();
    take_snapshot(&mount, "no-hook");
}

#[test]
fn pre_hook_that_times_out_is_killed_with_its_children() {
    let mut pid_file = PathBuf::new();
    let mount = mount_with(|mount| {
        pid_file = mount.scratch("hook").join("pid");
        let hook = format!("sleep 300 & echo $! > {}; wait", shell_quote(&pid_file));
        vec![
            "--pre-snapshot".into(),
            hook,
            "--hook-timeout".into(),
            "1".into(),
        ]
    });
    let started = Instant::now();
    assert_eq!(
        errno(fs::create_dir(snapshot_dir(&mount, "slow"))),
        libc::EIO
    );
    let took = started.elapsed();
    assert!(
        (Duration::from_secs(1)..Duration::from_secs(10)).contains(&took),
        "mkdir failed after {took:?}"
    );
    let pid = fs::read_to_string(&pid_file).expect("the hook ran");
    // Killed, and reaped by init or already gone: no longer a running sleep.
    let deadline = Instant::now() + Duration::from_secs(10);
    while fs::read_to_string(format!("/proc/{}/stat", pid.trim()))
        .is_ok_and(|stat| !stat.contains(") Z "))
    {
        assert!(
            Instant::now() < deadline,
            "the hook's child {pid} still runs"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        errno(fs::metadata(snapshot_dir(&mount, "slow"))),
        libc::ENOENT
    );
    let out = run(snapfs()
        .args(["snapshot", "create"])
        .arg(mount.path())
        .arg("slow"));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("timed out after 1 s"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn post_hook_sees_the_snapshot_name_and_state() {
    let mut out_dir = PathBuf::new();
    let mut mount = mount_with(|mount| {
        out_dir = mount.scratch("post");
        let hook = format!(
            "env | grep ^SNAPFS_ | sort > {}/\"$SNAPFS_SNAPSHOT\"",
            shell_quote(&out_dir)
        );
        vec!["--post-snapshot".into(), hook]
    });
    take_snapshot(&mount, "nightly");
    // The post hook has run when mkdir returns.
    let env = fs::read_to_string(out_dir.join("nightly")).expect("the post hook ran");
    let id = snapshot_attr(&mount, "nightly", "user.snapfs.id");
    for line in [
        "SNAPFS_HOOK=post".to_owned(),
        "SNAPFS_SNAPSHOT=nightly".to_owned(),
        "SNAPFS_STATE=pending".to_owned(),
        format!("SNAPFS_SNAPSHOT_ID={id}"),
        format!("SNAPFS_MOUNTPOINT={}", mount.path().display()),
        format!("SNAPFS_DATA={}", mount.data_dir().display()),
    ] {
        assert!(env.lines().any(|l| l == line), "{line} not in:\n{env}");
    }
    // Remembered: a plain remount still runs it.
    mount.set_args(&[]);
    mount.remount();
    take_snapshot(&mount, "after-remount");
    assert!(out_dir.join("after-remount").exists());
}

/// README's example: a SQLite database on the volume, written by a process that keeps it
/// open in WAL mode, checkpointed by the pre hook: the snapshot's copy holds every row
/// with an empty WAL. Needs the sqlite3 shell (scripts/setup installs it).
#[test]
fn sqlite_checkpointed_by_the_pre_hook_is_whole_in_the_snapshot() {
    let mount = mount_with(|mount| {
        let db = shell_quote(&mount.path().join("app.db"));
        vec![
            "--pre-snapshot".into(),
            format!("sqlite3 {db} 'PRAGMA wal_checkpoint(TRUNCATE)'"),
        ]
    });
    let db = mount.path().join("app.db");
    let mut app = Command::new("sqlite3")
        .arg(&db)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run sqlite3 (scripts/setup installs it)");
    let mut input = app.stdin.take().expect("stdin");
    let mut output = BufReader::new(app.stdout.take().expect("stdout"));
    writeln!(
        input,
        "PRAGMA journal_mode=WAL; CREATE TABLE t(x); \
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 500) \
         INSERT INTO t SELECT i FROM n; SELECT 'written';"
    )
    .expect("send SQL");
    let mut line = String::new();
    while line.trim() != "written" {
        line.clear();
        assert_ne!(output.read_line(&mut line).expect("read sqlite3"), 0);
    }
    let wal = mount.path().join("app.db-wal");
    assert!(
        fs::metadata(&wal).expect("the WAL").len() > 0,
        "rows wait in the WAL"
    );
    let snap = take_snapshot(&mount, "consistent");
    assert_eq!(
        fs::metadata(snap.join("app.db-wal")).map_or(0, |m| m.len()),
        0
    );
    let uri = format!("file:{}?immutable=1", snap.join("app.db").display());
    let count = run(Command::new("sqlite3")
        .arg(uri)
        .arg("SELECT count(*) FROM t"));
    assert_eq!(String::from_utf8_lossy(&count.stdout).trim(), "500");
    drop(input);
    assert!(app.wait().expect("sqlite3 exits").success());
}
