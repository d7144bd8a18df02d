//! Snapshot policies through a real mount: scheduled snapshots every few seconds,
//! retention after each completes, `snapshot prune [--dry-run]`, the list's RETENTION
//! column, `policy show` without a mount, clear errors on bad input, and pruned
//! snapshots' objects leaving the bucket of Garage and s3s-fs.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::time::{Duration, Instant};

use common::s3::{S3Env, unique_prefix};
use common::*;

/// `snapfs ARGS`, which must fail with one line on stderr naming `expected`.
fn refused(args: &[&str], expected: &str) {
    let out = cli(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "snapfs {args:?} succeeded");
    assert!(stderr.contains(expected), "snapfs {args:?}: {stderr}");
}

/// The scheduled snapshots in `.snapshots`, oldest first (their names sort by time).
fn scheduled(mount: &Mount) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(mount.path().join(".snapshots"))
        .expect("list .snapshots")
        .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
        .filter(|name| name.starts_with("auto-"))
        .collect();
    names.sort();
    names
}

fn wait_for(what: &str, mount: &Mount, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(
            Instant::now() < deadline,
            "{what}: not in time; daemon log:\n{}",
            mount.daemon_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until `count` scheduled snapshots are left, all completed (retention runs just
/// after the last upload completes).
fn wait_settled(mount: &Mount, count: usize) {
    wait_for("uploads and retention settled", mount, || {
        let names = scheduled(mount);
        names.len() == count
            && names.iter().all(|name| {
                getxattr(&snapshot_dir(mount, name), "user.snapfs.state")
                    .is_ok_and(|state| state == b"completed")
            })
    });
}

/// Waits until at least `count` scheduled snapshots were seen and the first two of them
/// are gone: the schedule runs and retention prunes. Returns every name seen.
fn watch_schedule(mount: &Mount, count: usize) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    wait_for("scheduled snapshots taken and pruned", mount, || {
        let now = scheduled(mount);
        seen.extend(now.iter().cloned());
        let first: Vec<&String> = seen.iter().take(2).collect();
        seen.len() >= count && first.iter().all(|name| !now.contains(name))
    });
    seen
}

#[test]
fn a_policy_takes_snapshots_on_schedule_and_prunes_them_to_its_rules() {
    let mut mount = Mount::new();
    let mp = mount.path().to_str().expect("utf-8 path").to_owned();
    take_snapshot(&mount, "by-hand");
    let shown = ok(&["policy", "set", &mp, "--every", "2s", "--keep-last", "2"]);
    assert!(shown.contains("every:        2s"), "{shown}");
    assert!(shown.contains("keep-last:    2"), "{shown}");

    let seen = watch_schedule(&mount, 4);
    for name in &seen {
        // auto-YYYYMMDDTHHMMSSZ, tagged as the policy's.
        assert_eq!(name.len(), "auto-20261201T050000Z".len(), "{name}");
    }
    let newest = scheduled(&mount).pop().expect("a scheduled snapshot");
    assert_eq!(
        snapshot_attr(&mount, &newest, "user.tag.snapfs.policy"),
        "scheduled"
    );
    // At most the two kept and one just taken, still uploading.
    assert!(scheduled(&mount).len() <= 3, "{:?}", scheduled(&mount));
    assert!(snapshot_dir(&mount, "by-hand").is_dir(), "manual survives");

    // No slot due for years: the schedule stops, the last uploads finish and retention
    // runs after them; then keep one, which waits for a prune.
    ok(&["policy", "set", &mp, "--every", "10y", "--keep-last", "2"]);
    wait_settled(&mount, 2);
    let before = scheduled(&mount);
    ok(&["policy", "set", &mp, "--every", "10y", "--keep-last", "1"]);
    let dry = ok(&["snapshot", "prune", &mp, "--dry-run"]);
    let line = |name: &str| {
        dry.lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{name} not in:\n{dry}"))
            .to_owned()
    };
    let newest = before.last().expect("newest");
    assert!(
        line(newest).contains("keep     last, newest completed"),
        "{dry}"
    );
    for older in &before[..before.len() - 1] {
        assert!(line(older).contains("delete"), "{dry}");
    }
    assert!(line("by-hand").contains("keep     manual"), "{dry}");
    assert_eq!(scheduled(&mount), before, "a dry run deletes nothing");

    let json = ok(&["snapshot", "prune", &mp, "--dry-run", "--json"]);
    let plan: serde_json::Value = serde_json::from_str(&json).expect("json");
    let first = &plan[0];
    assert_eq!(first["name"], newest.as_str(), "{json}");
    assert_eq!(first["keep"], true);
    assert_eq!(first["reasons"][0], "last");

    let list = ok(&["snapshot", "list", "--mount", &mp]);
    assert!(list.lines().next().expect("header").contains("RETENTION"));
    let listed = |name: &str| {
        list.lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{name} not in:\n{list}"))
            .to_owned()
    };
    assert!(listed(&before[0]).contains(" prune "), "{list}");
    assert!(
        listed(newest).contains("keep (last, newest completed)"),
        "{list}"
    );

    let pruned = ok(&["snapshot", "prune", &mp]);
    assert!(line(&before[0]).contains("delete") && pruned.contains("deleted"));
    assert_eq!(scheduled(&mount), std::slice::from_ref(newest));
    assert!(snapshot_dir(&mount, "by-hand").is_dir());

    // Readable without the mount.
    let data = mount.data_dir().to_str().expect("utf-8").to_owned();
    mount.unmount();
    let shown = ok(&["policy", "show", "--data", &data, "--json"]);
    let policy: serde_json::Value = serde_json::from_str(&shown).expect("json");
    assert_eq!(policy["every_secs"], 10 * 365 * 86_400);
    assert_eq!(policy["keep"]["last"], 1);
    let shown = ok(&["policy", "show", "--data", &data]);
    assert!(shown.contains("every:        10y"), "{shown}");

    mount.remount();
    ok(&["policy", "clear", &mp]);
    refused(&["policy", "clear", &mp], "has no snapshot policy");
    refused(&["policy", "show", &mp], "has no snapshot policy");
    refused(
        &["snapshot", "prune", &mp, "--dry-run"],
        "has no snapshot policy",
    );
    let list = ok(&["snapshot", "list", "--mount", &mp]);
    assert!(!list.contains("RETENTION"), "{list}");
}

#[test]
fn bad_policies_are_refused_with_the_reason() {
    let mount = Mount::new();
    let mp = mount.path().to_str().expect("utf-8 path").to_owned();
    let set = |extra: &[&'static str]| {
        let mut args = vec!["policy", "set", mp.as_str()];
        args.extend_from_slice(extra);
        args
    };
    refused(&set(&["--every", "0s"]), "at least 1s");
    refused(&set(&["--every", "1x"]), "unknown unit in '1x'");
    refused(&set(&["--every", "soon"]), "not a duration");
    refused(&set(&["--keep-last", "2"]), "--every");
    refused(&set(&["--every", "1h", "--keep-last", "-1"]), "-1");
    refused(&set(&["--every", "1h", "--keep-daily", "many"]), "many");
    refused(
        &set(&["--every", "1h", "--keep-within", "2q"]),
        "unknown unit",
    );
    refused(
        &set(&["--every", "1h", "--keep-tag", "novalue"]),
        "KEY=VALUE",
    );
    refused(
        &set(&["--every", "1h", "--trash-days", "0"]),
        "--trash-days",
    );
    refused(&set(&["--every", "11y"]), "at most 10y");
    let elsewhere = mount.scratch("plain");
    refused(
        &[
            "policy",
            "set",
            elsewhere.to_str().expect("utf-8"),
            "--every",
            "1h",
        ],
        "not a snapfs mount",
    );
    refused(&["policy", "show", &mp], "has no snapshot policy");
    refused(&set(&["--cron", "0 25 * * *"]), "cron hour '25'");
    refused(&set(&["--cron", "0 2 * *"]), "5 fields");
    refused(&set(&["--cron", "0 0 30 2 *"]), "never matches");
    refused(
        &set(&["--every", "1h", "--cron", "0 2 * * *"]),
        "cannot be used with",
    );
    ok(&set(&["--cron", "30 2 * * 1-5", "--keep-daily", "7"]));
    let shown = ok(&["policy", "show", &mp]);
    assert!(shown.contains("30 2 * * 1-5 (UTC)"), "{shown}");
    for command in [
        &["policy", "set", "--help"][..],
        &["policy", "show", "--help"],
        &["policy", "clear", "--help"],
        &["snapshot", "prune", "--help"],
    ] {
        assert!(
            ok(command).contains("Example"),
            "{command:?} has an example"
        );
    }
}

/// Retention's deletions reach the store: a pruned snapshot's object and the blocks only
/// it held leave the bucket.
#[test]
fn pruned_snapshots_leave_the_bucket() {
    for (server, s3) in S3Env::all() {
        let prefix = unique_prefix(&format!("policy-{server}"));
        let mount = s3.mount_store(&prefix, &[]);
        let mp = mount.path().to_str().expect("utf-8 path").to_owned();
        let old = pattern(2 * BLOCK, 11);
        fs::write(mount.path().join("f"), &old).expect("write");
        ok(&["policy", "set", &mp, "--every", "1s", "--keep-last", "1"]);
        // A scheduled snapshot holds the old content; then the file changes.
        wait_for("a scheduled snapshot", &mount, || {
            !scheduled(&mount).is_empty()
        });
        let first = scheduled(&mount)[0].clone();
        let new = pattern(2 * BLOCK, 12);
        fs::write(mount.path().join("f"), &new).expect("overwrite");
        watch_schedule(&mount, 4);
        // Deleted behind the kernel's back: its cached name is dropped too.
        wait_for("the pruned name gone", &mount, || {
            !snapshot_dir(&mount, &first).exists()
        });
        ok(&["policy", "set", &mp, "--every", "10y", "--keep-last", "1"]);
        wait_settled(&mount, 1);
        let kept = scheduled(&mount);
        let id = snapshot_attr(&mount, &kept[0], "user.snapfs.id");
        let client = s3.client();
        let wanted_blocks: BTreeSet<String> = new
            .chunks(BLOCK)
            .map(|block| snapfs::blocks::BlockHash::of(block).to_hex())
            .collect();
        wait_for("the bucket holds only what is kept", &mount, || {
            let snapshots: Vec<String> = client
                .list(&format!("{prefix}snapshots/"))
                .into_iter()
                .map(|(key, _)| key)
                .collect();
            let blocks: BTreeSet<String> = packed_in_bucket(&client, &prefix).into_keys().collect();
            snapshots == [format!("{prefix}snapshots/{id:0>10}")] && blocks == wanted_blocks
        });
    }
}

/// CPU (user + system) the process `pid` has used, in clock ticks.
fn cpu_ticks(pid: i32) -> u64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/PID/stat");
    // Fields after the command name, which ends with the last ')': utime and stime are
    // the 14th and 15th fields of the line, the 12th and 13th after it.
    let rest = &stat[stat.rfind(')').expect("command name") + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
}

/// An idle mount without a policy sleeps: its scheduler once woke itself again at once,
/// for ever, and spun a core.
#[test]
fn an_idle_mount_without_a_policy_uses_no_cpu() {
    let mount = Mount::new();
    std::thread::sleep(Duration::from_millis(500));
    let before = cpu_ticks(mount.pid());
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_ticks(mount.pid()) - before;
    // 2 s is 200 ticks at the usual 100 Hz; a spinning thread takes most of them.
    assert!(used <= 20, "{used} ticks of CPU in 2 s idle");
}
