//! Continuous checkpoints through the kernel: taken every `--checkpoint-every` while the
//! volume changes, browsable in `.snapshots/.checkpoints`, thinned, dropped before a
//! writer gets ENOSPC, never in `.snapshots`, `snapshot list` or the store, and promoted
//! to snapshots that upload and restore from the store alone.

mod common;

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use common::s3::{S3Env, unique_prefix};
use common::*;

/// `MOUNTPOINT/.snapshots/.checkpoints`
fn checkpoint_dir(mount: &Mount) -> PathBuf {
    mount.path().join(".snapshots/.checkpoints")
}

/// The checkpoints listed in the hidden directory, oldest first.
fn checkpoints(mount: &Mount) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(checkpoint_dir(mount))
        .expect("list .snapshots/.checkpoints")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Waits until `found` holds for some checkpoint (newest first); returns its name.
fn wait_checkpoint(mount: &Mount, found: impl Fn(&Path) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let names = checkpoints(mount);
        if let Some(name) = names
            .iter()
            .rev()
            .find(|name| found(&checkpoint_dir(mount).join(name)))
        {
            return name.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no checkpoint as expected among {names:?}; daemon log:\n{}",
            mount.daemon_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether `path` holds exactly `data`.
fn holds(path: &Path, data: &[u8]) -> bool {
    fs::read(path).is_ok_and(|found| found == data)
}

fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// `snapfs checkpoint list --data DATA --json`
fn listed(mount: &Mount) -> serde_json::Value {
    let out = run(snapfs()
        .args(["checkpoint", "list", "--json", "--data"])
        .arg(mount.data_dir()));
    serde_json::from_str(&ok(out, "checkpoint list")).expect("JSON")
}

/// The files of a small tree: name and contents.
fn tree() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("project/big.bin", pattern(3 * BLOCK + 1234, 1)),
        ("project/notes.txt", text(5000)),
        ("project/src/main.rs", b"fn main() {}\n".to_vec()),
    ]
}

fn write_tree(root: &Path, files: &[(&str, Vec<u8>)]) {
    for (name, data) in files {
        let path = root.join(name);
        fs::create_dir_all(path.parent().expect("parent")).expect("mkdir -p");
        fs::write(&path, data).expect("write");
    }
}

#[test]
fn an_rm_rf_is_undone_from_the_newest_checkpoint_that_has_the_files() {
    let mount = Mount::with_args(&["--checkpoint-every", "1s"]);
    let files = tree();
    write_tree(mount.path(), &files);
    let (last, data) = &files[0];
    wait_checkpoint(&mount, |cp| holds(&cp.join(last), data));
    let out = run(std::process::Command::new("rm")
        .arg("-rf")
        .arg(mount.path().join("project")));
    ok(out, "rm -rf");
    assert!(!mount.path().join("project").exists());

    let name = wait_checkpoint(&mount, |cp| cp.join("project").exists());
    let saved = checkpoint_dir(&mount).join(&name);
    let out = run(std::process::Command::new("cp")
        .arg("-a")
        .arg(saved.join("project"))
        .arg(mount.path()));
    ok(out, "cp -a from the checkpoint");
    for (name, data) in &files {
        assert_bytes_eq(
            &fs::read(mount.path().join(name)).expect("copied back"),
            data,
            name,
        );
    }
    // The checkpoint is read-only.
    assert_eq!(
        errno(fs::write(saved.join("project/new"), b"x")),
        libc::EROFS
    );
}

#[test]
fn an_idle_volume_takes_no_checkpoints() {
    let mount = Mount::with_args(&["--checkpoint-every", "1s"]);
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(
        checkpoints(&mount),
        Vec::<String>::new(),
        "a new, idle volume"
    );
    fs::write(mount.path().join("f"), b"one change").expect("write");
    wait_checkpoint(&mount, |cp| cp.join("f").exists());
    let taken = checkpoints(&mount);
    // Reading changes nothing.
    for _ in 0..25 {
        assert_eq!(
            fs::read(mount.path().join("f")).expect("read"),
            b"one change"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(checkpoints(&mount), taken, "idle: no new checkpoint");
}

#[test]
fn checkpoints_stay_out_of_snapshots_and_the_store() {
    let mount = Mount::with_args(&["--checkpoint-every", "1s"]);
    fs::write(mount.path().join("a"), pattern(2 * BLOCK, 2)).expect("write");
    wait_checkpoint(&mount, |cp| cp.join("a").exists());
    take_snapshot(&mount, "s1");
    wait_completed(&mount, "s1");
    fs::write(mount.path().join("b"), pattern(BLOCK, 3)).expect("write");
    wait_checkpoint(&mount, |cp| cp.join("b").exists());

    let snapdir: Vec<String> = fs::read_dir(mount.path().join(".snapshots"))
        .expect("readdir .snapshots")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(snapdir, ["s1"], ".snapshots lists no checkpoint directory");
    let out = run(snapfs()
        .args(["snapshot", "list", "--json", "--data"])
        .arg(mount.data_dir()));
    let list: serde_json::Value = serde_json::from_str(&ok(out, "snapshot list")).expect("JSON");
    let names: Vec<&str> = list
        .as_array()
        .expect("array")
        .iter()
        .map(|s| s["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["s1"]);
    let stored: Vec<_> = fs::read_dir(mount.data_dir().join("store/snapshots"))
        .expect("store snapshots")
        .collect();
    assert_eq!(stored.len(), 1, "one snapshot object: s1's");
    // b was written after s1 and is only in checkpoints: not one of its blocks is stored.
    let b = BlockHashes::of(&pattern(BLOCK, 3));
    let in_store = packed_blocks_in_dir(&mount.data_dir().join("store"));
    for hash in b.0 {
        assert!(
            !in_store.contains_key(&hash),
            "block {hash} of a checkpoint was uploaded"
        );
    }
    let json = listed(&mount);
    let count = json["checkpoints"].as_array().expect("array").len();
    assert!(count >= 2, "{json}");
    assert_eq!(
        count,
        checkpoints(&mount).len(),
        "the CLI lists what the directory does"
    );
    // What they cost: b's block is held by the live volume too, so nothing only by them.
    fs::remove_file(mount.path().join("b")).expect("rm b");
    let deadline = Instant::now() + Duration::from_secs(10);
    while listed(&mount)["total_bytes"].as_u64() != Some(BLOCK as u64) {
        assert!(Instant::now() < deadline, "{}", listed(&mount));
        std::thread::sleep(Duration::from_millis(200));
    }
    let text = ok(
        run(snapfs().args(["checkpoint", "list"]).arg(mount.path())),
        "checkpoint list",
    );
    assert!(text.contains("only checkpoints hold 256.0 KiB"), "{text}");
    // The volume's invariants hold in every checkpoint's view too.
    ok(
        run(snapfs().args(["verify", "--mount"]).arg(mount.path())),
        "verify beside the mount",
    );
}

/// Hex block hashes of data cut into blocks.
struct BlockHashes(Vec<String>);

impl BlockHashes {
    fn of(data: &[u8]) -> BlockHashes {
        BlockHashes(
            data.chunks(BLOCK)
                .map(|c| snapfs::blocks::BlockHash::of(c).to_hex())
                .collect(),
        )
    }
}

/// Writes v1, waits for a checkpoint of it, moves on to v2 and uploads a snapshot of that,
/// then promotes the older checkpoint (by `--at` its time, or by name): it completes and
/// restores from the store alone, byte for byte, and so does the newer snapshot.
fn promote_after_a_newer_snapshot(mount: &Mount, url: &str, restore: impl Fn(&str, &Path)) {
    let v1 = tree();
    write_tree(mount.path(), &v1);
    let name = wait_checkpoint(mount, |cp| holds(&cp.join(v1[0].0), &v1[0].1));
    let v2: Vec<(&str, Vec<u8>)> = vec![
        ("project/big.bin", pattern(2 * BLOCK, 7)),
        ("project/notes.txt", v1[1].1.clone()),
        ("project/src/main.rs", b"fn main() { v2() }\n".to_vec()),
    ];
    write_tree(mount.path(), &v2);
    take_snapshot(mount, "later");
    wait_completed(mount, "later");

    let at = name.clone();
    let out = run(snapfs()
        .args(["checkpoint", "promote"])
        .arg(mount.path())
        .args(["--at", &at, "--as", "promoted", "--json"]));
    let json: serde_json::Value = serde_json::from_str(&ok(out, "promote")).expect("JSON");
    assert_eq!(json["name"], "promoted");
    assert_eq!(json["state"], "pending");
    assert!(
        !checkpoint_dir(mount).join(&name).exists(),
        "no longer a checkpoint"
    );
    wait_completed(mount, "promoted");
    assert_eq!(
        snapshot_attr(mount, "promoted", "user.snapfs.created"),
        name,
        "the checkpoint's time"
    );

    for (snapshot, files) in [("promoted", &v1), ("later", &v2)] {
        let dest = mount.scratch(&format!("restored-{snapshot}"));
        restore(snapshot, &dest);
        for (file, data) in files.iter() {
            assert_bytes_eq(
                &fs::read(dest.join(file)).expect("restored file"),
                data,
                &format!("{snapshot}: {file} from {url}"),
            );
        }
    }
}

#[test]
fn a_promoted_checkpoint_uploads_and_restores_from_the_default_store() {
    let mount = Mount::with_args(&["--checkpoint-every", "1s"]);
    let url = format!("file://{}", mount.data_dir().join("store").display());
    promote_after_a_newer_snapshot(&mount, &url, |snapshot, dest| {
        ok(
            run(snapfs()
                .args(["restore", "--store", &url, snapshot])
                .arg(dest)),
            "restore",
        );
    });
    let stored = fs::read_dir(mount.data_dir().join("store/snapshots"))
        .expect("store")
        .count();
    assert_eq!(stored, 2, "later and promoted, no checkpoint");
    // Promoting by name, and the errors users get.
    fs::write(mount.path().join("after"), b"a change").expect("write");
    let name = wait_checkpoint(&mount, |cp| cp.join("after").exists());
    let promote = |args: &[&str]| {
        run(snapfs()
            .args(["checkpoint", "promote"])
            .arg(mount.path())
            .args(args))
    };
    let out = promote(&[&name, "--as", "later"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
    let out = promote(&["1999-01-01T00:00:00Z-nope", "--as", "x"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no checkpoint named"));
    let out = promote(&["--at", "2000-01-01T00:00:00Z", "--as", "x"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no checkpoint at or before"));
    ok(promote(&[&name, "--as", "by-name"]), "promote by name");
    wait_completed(&mount, "by-name");
}

#[test]
fn a_promoted_checkpoint_uploads_and_restores_from_s3() {
    for (server, env) in S3Env::all() {
        let prefix = unique_prefix(&format!("checkpoints-{server}"));
        let mount = env.mount_store(&prefix, &["--checkpoint-every", "1s"]);
        let url = env.url(&prefix);
        promote_after_a_newer_snapshot(&mount, &url, |snapshot, dest| {
            ok(env.restore(&url, snapshot, dest, &[]), "restore from S3");
        });
        let objects = env.client().list(&format!("{prefix}snapshots/"));
        assert_eq!(
            objects.len(),
            2,
            "{server}: later and promoted only: {objects:?}"
        );
    }
}

#[test]
fn checkpoints_survive_a_remount() {
    let mut mount = Mount::with_args(&["--checkpoint-every", "1s"]);
    fs::write(mount.path().join("f"), b"kept across mounts").expect("write");
    let name = wait_checkpoint(&mount, |cp| cp.join("f").exists());
    mount.unmount();
    mount.set_args(&["--checkpoint-every", "off"]);
    mount.remount();
    assert!(checkpoints(&mount).contains(&name));
    assert_eq!(
        fs::read(checkpoint_dir(&mount).join(&name).join("f")).expect("read"),
        b"kept across mounts"
    );
}

#[test]
fn checkpoints_age_out_of_a_short_window() {
    let mount = Mount::with_args(&["--checkpoint-every", "1s", "--checkpoint-window", "4s"]);
    let started = Instant::now();
    let mut file = File::create(mount.path().join("log")).expect("create");
    let mut most = 0;
    while started.elapsed() < Duration::from_secs(7) {
        writeln!(file, "line at {:?}", started.elapsed()).expect("append");
        file.sync_all().expect("fsync");
        most = most.max(checkpoints(&mount).len());
        std::thread::sleep(Duration::from_millis(200));
    }
    // One a second for the last 4 s at most (thinned at each tick, so one more may wait).
    assert!((2..=6).contains(&most), "{most} checkpoints at once");
    let json = listed(&mount);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    for checkpoint in json["checkpoints"].as_array().expect("array") {
        let name = checkpoint["name"].as_str().expect("name");
        let created = snapfs::volume::parse_utc(name).expect("a UTC name") as f64 / 1e9;
        assert!(
            now - created < 6.0,
            "{name} is older than the window: {json}"
        );
    }
    drop(file);
    // Looked up: the kernel caches these names (an hour) until the daemon drops them.
    // (One thinned between the listing and its lookup is simply not cached.)
    let seen = checkpoints(&mount);
    for name in &seen {
        let _ = fs::metadata(checkpoint_dir(&mount).join(name));
    }
    // Idle past the window: every one ages out.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !checkpoints(&mount).is_empty() {
        assert!(Instant::now() < deadline, "{:?}", checkpoints(&mount));
        std::thread::sleep(Duration::from_millis(200));
    }
    for name in seen {
        assert!(
            !checkpoint_dir(&mount).join(&name).exists(),
            "thinned checkpoint {name} still resolves"
        );
    }
}

#[test]
fn a_full_data_dir_drops_the_oldest_checkpoints_before_a_writer_gets_enospc() {
    let mount = Mount::with_tmpfs_data("24m", &["--checkpoint-every", "1s"]);
    let first = pattern(12 << 20, 4);
    fs::write(mount.path().join("first"), &first).expect("write first");
    wait_checkpoint(&mount, |cp| holds(&cp.join("first"), &first));
    fs::remove_file(mount.path().join("first")).expect("rm");
    // Only the checkpoints hold the first file now: there is no room for a second one
    // unless they go.
    let mut second = File::create(mount.path().join("second")).expect("create");
    second
        .write_all(&pattern(12 << 20, 5))
        .expect("buffered write");
    second
        .sync_all()
        .expect("fsync: room made by dropping checkpoints");
    drop(second);
    assert_bytes_eq(
        &fs::read(mount.path().join("second")).expect("read"),
        &pattern(12 << 20, 5),
        "second",
    );
    let log = mount.daemon_log();
    assert!(
        log.contains("data dir full: dropped the oldest checkpoint"),
        "daemon log:\n{log}"
    );
}
