//! Operating a volume: `snapfs status` against mounted and unmounted volumes and stores
//! that do not answer, and `snapfs upload` draining snapshots taken offline, without a
//! mount, into a real S3 server, restored from the store alone.

mod common;

use std::fs;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::s3::{Fault, FaultProxy, S3Env, unique_prefix};
use common::*;
use serde_json::Value;

/// Runs `cmd` and returns its exit code and its stdout as JSON.
fn json_of(cmd: &mut Command) -> (i32, Value, Output) {
    let out = run(cmd);
    let code = out.status.code().expect("exit code");
    let value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{cmd:?} (exit {code}) printed no JSON ({e}):\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (code, value, out)
}

/// `snapfs status --data DIR --json --sample 1s` with `env`'s store variables, if any.
fn status(data: &Path, env: Option<&S3Env>) -> (i32, Value) {
    status_sampled(data, env, "1s")
}

fn status_sampled(data: &Path, env: Option<&S3Env>, sample: &str) -> (i32, Value) {
    let mut cmd = snapfs();
    if let Some(env) = env {
        env.apply(&mut cmd);
    }
    cmd.args(["status", "--json", "--sample", sample, "--data"])
        .arg(data);
    let (code, value, _) = json_of(&mut cmd);
    (code, value)
}

/// `snapfs upload --data DIR --json [extra]` with `env`'s store variables.
fn upload(data: &Path, env: &S3Env, extra: &[&str]) -> (i32, Value) {
    let mut cmd = snapfs();
    env.apply(&mut cmd);
    cmd.args(["upload", "--json", "--data"])
        .arg(data)
        .args(extra);
    let (code, value, _) = json_of(&mut cmd);
    (code, value)
}

fn names(value: &Value) -> Vec<&str> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {value}"))
        .iter()
        .map(|v| v.as_str().or_else(|| v["name"].as_str()).expect("a name"))
        .collect()
}

#[test]
fn status_of_a_mounted_then_unmounted_volume() {
    let mut mount = Mount::new();
    let data = pattern(2 * BLOCK + 100, 7);
    fs::write(mount.path().join("file"), &data).expect("write");
    // Nothing is backed up before a first snapshot completes.
    let out = run(snapfs()
        .args(["status", "--sample", "0s"])
        .arg(mount.path()));
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("no snapshot has completed"),
        "{out:?}"
    );
    take_snapshot(&mount, "first");
    wait_completed(&mount, "first");

    let mut cmd = snapfs();
    cmd.args(["status", "--json"]).arg(mount.path());
    let (code, s, _) = json_of(&mut cmd);
    assert_eq!(
        code, 0,
        "a mounted volume with every snapshot completed: {s}"
    );
    assert_eq!(s["state"], "mounted");
    assert_eq!(s["pid"], mount.pid().to_string());
    assert_eq!(s["mountpoint"], mount.path().to_str().expect("utf-8 path"));
    assert!(s["since"].as_str().is_some_and(|t| t.ends_with('Z')), "{s}");
    assert_eq!(s["store"]["reachable"], true, "{s}");
    assert_eq!(s["current"], true);
    assert_eq!(s["pending"], Value::Array(vec![]));
    assert_eq!(s["left_bytes"], 0);
    assert_eq!(s["last_completed"]["name"], "first");
    assert_eq!(s["last_error"], Value::Null);
    // Three distinct blocks, all uploaded: all of them cache.
    assert_eq!(s["disk"]["blocks"], 3, "{s}");
    assert_eq!(s["disk"]["bytes"], data.len() as u64);
    assert_eq!(s["disk"]["cache_bytes"], data.len() as u64);
    assert_eq!(s["disk"]["cache_limit"], Value::Null);

    // `snapfs upload` leaves a mounted volume to its mount, in one clear line.
    let out = run(snapfs().args(["upload", "--data"]).arg(mount.data_dir()));
    assert_eq!(out.status.code(), Some(2), "upload beside a mount");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("is mounted") && err.contains(&mount.pid().to_string()),
        "{err}"
    );

    mount.set_args(&["--cache-size", "1M"]);
    mount.remount();
    let (code, s) = status(mount.data_dir(), None);
    assert_eq!((code, &s["state"]), (0, &Value::from("mounted")), "{s}");
    assert_eq!(
        s["disk"]["cache_limit"],
        1 << 20,
        "the mount's --cache-size: {s}"
    );

    mount.unmount();
    let (code, s) = status(mount.data_dir(), None);
    assert_eq!(code, 0, "{s}");
    assert_eq!(s["state"], "unmounted");
    assert_eq!(s["pid"], Value::Null);
    assert_eq!(s["mountpoint"], Value::Null);
    assert_eq!(s["last_completed"]["name"], "first");
    assert_eq!(s["disk"]["cache_limit"], 1 << 20);

    // Backups older than --max-age are behind.
    std::thread::sleep(Duration::from_millis(1100));
    let out = run(snapfs()
        .args(["status", "--max-age", "0s", "--data"])
        .arg(mount.data_dir()));
    assert_eq!(out.status.code(), Some(1), "older than --max-age");
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("NOT CURRENT: the last completed snapshot, first"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // A dir with no volume: status cannot run, and upload makes none.
    let empty = mount.scratch("empty");
    let out = run(snapfs().args(["status", "--data"]).arg(&empty));
    assert_eq!(out.status.code(), Some(2));
    let out = run(snapfs().args(["upload", "--data"]).arg(&empty));
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        fs::read_dir(&empty).expect("list").count(),
        0,
        "upload created nothing"
    );
}

#[test]
fn status_prints_a_snapshot_name_on_one_line_whatever_its_bytes() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let mount = Mount::new();
    fs::write(mount.path().join("file"), b"x").expect("write");
    let name = OsStr::from_bytes(b"a\\b\xff");
    fs::create_dir(mount.path().join(".snapshots").join(name)).expect("mkdir the snapshot");
    let report = |extra: &[&str]| {
        let out = run(snapfs()
            .args(["status", "--sample", "0s"])
            .args(extra)
            .arg(mount.path()));
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut code, mut text) = report(&[]);
    while code != Some(0) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        (code, text) = report(&[]);
    }
    assert_eq!(code, Some(0), "the snapshot never completed:\n{text}");
    assert!(text.contains("last:       a\\134b\\377 (taken "), "{text}");
    // The problem that names it, too.
    std::thread::sleep(Duration::from_millis(1100));
    let (code, text) = report(&["--max-age", "0s"]);
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("NOT CURRENT: the last completed snapshot, a\\134b\\377, is "),
        "{text}"
    );
}

#[test]
fn an_upload_timed_out_during_an_outage_returns_on_time_and_keeps_the_snapshot_pending() {
    let s3 = S3Env::garage();
    let (proxy, through) = FaultProxy::for_env(&s3);
    let prefix = unique_prefix("drain-outage");
    let mut mount = through.mount_store(&prefix, &[]);
    // The store stops taking packs before the snapshot: it stays pending.
    proxy.fault_matching("PUT", "/packs/", Fault::InternalError);
    fs::write(mount.path().join("f"), pattern(3 * BLOCK, 12)).expect("write");
    take_snapshot(&mount, "s");
    mount.unmount();

    // Its packs are refused for longer than --timeout: the request waiting out the outage
    // gives up at the timeout, and the snapshot is pending, not failed.
    let start = Instant::now();
    let (code, r) = upload(mount.data_dir(), &through, &["--timeout", "1s"]);
    let took = start.elapsed();
    assert_eq!(code, 3, "{r}");
    assert_eq!(names(&r["pending"]), ["s"]);
    assert_eq!(r["failed"], Value::Array(vec![]), "{r}");
    assert!(
        took < Duration::from_secs(4),
        "a 1 s --timeout returned after {took:?}"
    );

    proxy.set_fault(Fault::None);
    let (code, r) = upload(mount.data_dir(), &through, &[]);
    assert_eq!(code, 0, "{r}");
    assert_eq!(names(&r["completed"]), ["s"]);
}

#[test]
fn snapshots_taken_offline_drain_without_a_mount_and_restore_from_the_store() {
    let s3 = S3Env::garage();
    let prefix = unique_prefix("drain");
    let url = s3.url(&prefix);
    // As the volume remembers it.
    let remembered = url.trim_end_matches('/');
    let mut mount = s3.mount_store(&prefix, &[]);
    mount.unmount();
    // The laptop is offline: its store's endpoint is a closed port. It mounts all the
    // same (the store passed its check at the first mount) and takes snapshots.
    let offline = s3.with_endpoint("http://127.0.0.1:1");
    mount.set_env(offline.vars());
    mount.remount();
    let data = pattern(3 * BLOCK + 1000, 11);
    fs::create_dir(mount.path().join("dir")).expect("mkdir");
    fs::write(mount.path().join("dir/file"), &data).expect("write");
    take_snapshot(&mount, "offline");

    let (code, s) = status(mount.data_dir(), Some(&offline));
    assert_eq!(code, 1, "pending, store unreachable: {s}");
    assert_eq!(s["state"], "mounted");
    assert_eq!(s["store"]["url"], remembered);
    assert_eq!(s["store"]["reachable"], false, "{s}");
    assert_eq!(names(&s["pending"]), ["offline"]);
    assert_eq!(s["left_blocks"], 4, "{s}");
    assert_eq!(s["left_bytes"], data.len() as u64);
    assert_eq!(s["rate_bytes_per_sec"], 0.0, "nothing lands: {s}");
    assert_eq!(s["eta_seconds"], Value::Null);
    assert_eq!(s["current"], false);
    assert_eq!(s["last_completed"], Value::Null);

    mount.unmount();
    let (code, s) = status(mount.data_dir(), Some(&offline));
    assert_eq!(code, 1, "{s}");
    assert_eq!(s["state"], "unmounted");
    assert_eq!(s["store"]["reachable"], false);
    assert_eq!(names(&s["pending"]), ["offline"]);
    assert_eq!(
        s["left_bytes"],
        data.len() as u64,
        "an unmount sends nothing more"
    );

    // Still offline: the upload cannot start.
    let (code, report) = {
        let mut cmd = snapfs();
        offline.apply(&mut cmd);
        let out = run(cmd.args(["upload", "--data"]).arg(mount.data_dir()));
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    assert_eq!(code, Some(2), "{report}");
    assert!(report.starts_with("snapfs: store:"), "{report}");
    assert!(
        !mount.data_dir().join("running").exists(),
        "closed as an unmount closes it"
    );

    // Too slow for the time it is given: timed out, still pending.
    let (code, r) = upload(
        mount.data_dir(),
        &s3,
        &["--timeout", "1s", "--upload-limit", "1K"],
    );
    assert_eq!(code, 3, "{r}");
    assert_eq!(r["timed_out"], true);
    assert_eq!(names(&r["pending"]), ["offline"]);
    assert_eq!(names(&r["completed"]), Vec::<&str>::new());

    // Back online: everything goes, and the snapshot is completed.
    let (code, r) = upload(mount.data_dir(), &s3, &[]);
    assert_eq!(code, 0, "{r}");
    assert_eq!(r["store"], remembered);
    assert_eq!(names(&r["completed"]), ["offline"]);
    assert_eq!(names(&r["pending"]), Vec::<&str>::new());
    assert_eq!(r["timed_out"], false);
    assert!(r["sent_bytes"].as_u64().is_some_and(|n| n > 0), "{r}");

    let (code, s) = status(mount.data_dir(), Some(&s3));
    assert_eq!(code, 0, "current: {s}");
    assert_eq!(s["store"]["reachable"], true);
    assert_eq!(s["last_completed"]["name"], "offline");
    assert_eq!(s["left_bytes"], 0);

    // Nothing else changed: one snapshot, the one taken.
    let (_, list, _) = json_of(
        snapfs()
            .args(["snapshot", "list", "--json", "--data"])
            .arg(mount.data_dir()),
    );
    assert_eq!(names(&list), ["offline"]);
    assert_eq!(list[0]["state"], "completed");

    let dest = mount.scratch("restored");
    let out = s3.restore(&url, "offline", &dest, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_bytes_eq(
        &fs::read(dest.join("dir/file")).expect("read the restored file"),
        &data,
        "restored from the store alone",
    );

    // The next mount finds it completed and has nothing to send.
    mount.set_env(s3.vars());
    mount.remount();
    assert_eq!(
        snapshot_attr(&mount, "offline", "user.snapfs.state"),
        "completed"
    );
    assert_bytes_eq(
        &fs::read(mount.path().join("dir/file")).expect("read"),
        &data,
        "the live volume",
    );
}

#[test]
fn status_reports_the_state_after_it_watched_the_upload() {
    let mount = Mount::with_args(&["--upload-limit", "256K"]);
    fs::write(mount.path().join("big"), pattern(3 * BLOCK, 4)).expect("write");
    take_snapshot(&mount, "short");
    // About 3 s of upload at 256 KiB/s, watched for 8 s: it finishes while watched.
    assert_eq!(
        snapshot_attr(&mount, "short", "user.snapfs.state"),
        "pending"
    );
    let started = Instant::now();
    let (code, s) = status_sampled(mount.data_dir(), None, "8s");
    assert!(
        started.elapsed() >= Duration::from_secs(8),
        "status watched a pending upload: {s}"
    );
    assert_eq!(code, 0, "the upload finished while watched: {s}");
    assert_eq!(s["pending"], Value::Array(vec![]), "{s}");
    assert_eq!(s["last_completed"]["name"], "short", "{s}");
    assert_eq!(s["rate_bytes_per_sec"], Value::Null, "nothing uploads: {s}");
}

#[test]
fn status_measures_the_upload_rate_and_eta() {
    let mount = Mount::with_args(&["--upload-limit", "256K"]);
    let data = pattern(12 * BLOCK, 3);
    fs::write(mount.path().join("big"), &data).expect("write");
    take_snapshot(&mount, "slow");
    // The uploader records progress as blocks land, the first ones together: watch from
    // the first record on.
    let deadline = Instant::now() + Duration::from_secs(30);
    while snapshot_attr(&mount, "slow", "user.snapfs.progress").starts_with("0/") {
        assert!(Instant::now() < deadline, "no progress recorded");
        std::thread::sleep(Duration::from_millis(50));
    }

    let (code, s) = status_sampled(mount.data_dir(), None, "3s");
    assert_eq!(code, 1, "an upload under way is not current: {s}");
    assert_eq!(names(&s["pending"]), ["slow"]);
    let left = s["left_bytes"].as_u64().expect("left bytes");
    assert!(left > 0 && left <= data.len() as u64, "{s}");
    let rate = s["rate_bytes_per_sec"].as_f64().expect("a rate");
    // Incompressible blocks at 256 KiB/s, give or take a block of recording lag.
    assert!(rate > 16_000.0 && rate < 1_200_000.0, "rate {rate}: {s}");
    let eta = s["eta_seconds"].as_u64().expect("an ETA");
    assert_eq!(eta, (left as f64 / rate).ceil() as u64);

    wait_completed(&mount, "slow");
    let (code, s) = status(mount.data_dir(), None);
    assert_eq!(code, 0, "{s}");
    assert_eq!(s["rate_bytes_per_sec"], Value::Null, "nothing to upload");
    assert_eq!(s["last_completed"]["name"], "slow");
}
