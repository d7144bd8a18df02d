//! Garbage collection of the store's packs (issue 15): deleting snapshots leaves packs
//! partly or wholly unused; an idle mount, or `snapfs store prune`, deletes and repacks
//! them, and a SIGKILL at any step of a repack leaves every snapshot restorable from the
//! bucket alone, byte for byte.

mod common;

use std::fs;
use std::path::Path;
use std::process::{Child, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::s3::{Fault, FaultProxy, S3Env, unique_prefix};
use common::*;

/// Files in the volume, each two blocks.
const FILES: usize = 8;
const FILE_LEN: usize = 2 * BLOCK;

fn file_name(n: usize) -> String {
    format!("f{n}")
}

/// Writes every file with content `version`, or those `n` for which `which(n)`.
fn write_files(root: &Path, version: u64, which: impl Fn(usize) -> bool) {
    for n in (0..FILES).filter(|n| which(*n)) {
        fs::write(root.join(file_name(n)), file_content(n, version)).expect("write a file");
    }
}

fn file_content(n: usize, version: u64) -> Vec<u8> {
    pattern(FILE_LEN, version * 1000 + n as u64)
}

/// The versions of the files in a snapshot, as written.
type Versions = Vec<u64>;

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn assert_ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: {:?}\nstdout: {}\nstderr: {}",
        out.status,
        stdout(out),
        stderr(out)
    );
}

/// The number after `"key":` in a JSON object printed by snapfs.
fn json_number(json: &str, key: &str) -> u64 {
    let needle = format!("\"{key}\":");
    let at = json
        .find(&needle)
        .unwrap_or_else(|| panic!("{key} in {json}"))
        + needle.len();
    json[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .unwrap_or_else(|e| panic!("{key} in {json}: {e}"))
}

/// `snapfs store prune --data DATA ARGS --json`, with `env`'s variables.
fn prune_cmd(data: &Path, env: Option<&S3Env>, args: &[&str]) -> std::process::Command {
    let mut cmd = snapfs();
    if let Some(env) = env {
        env.apply(&mut cmd);
    }
    cmd.args(["store", "prune", "--json", "--data"])
        .arg(data)
        .args(args);
    cmd
}

/// Runs `store prune --max-unused 0` (`what` names it in failures), then a dry run that
/// must find no unused byte left. Returns both JSON reports.
fn prune_all_unused(data: &Path, s3: &S3Env, what: &str) -> (String, String) {
    let out = run(&mut prune_cmd(data, Some(s3), &["--max-unused", "0"]));
    assert_ok(&out, what);
    let after = run(&mut prune_cmd(
        data,
        Some(s3),
        &["--dry-run", "--max-unused", "0"],
    ));
    assert_ok(&after, &format!("prune --dry-run after {what}"));
    let after = stdout(&after);
    assert_eq!(json_number(&after, "unused_bytes"), 0, "{after}");
    (stdout(&out), after)
}

static RESTORES: AtomicUsize = AtomicUsize::new(0);

/// Restores every snapshot of `expected` from `url` alone and compares each file.
fn assert_restorable(s3: &S3Env, url: &str, expected: &[(&str, Versions)], scratch: &Path) {
    for (name, versions) in expected {
        let dest = scratch.join(format!(
            "restore-{name}-{}",
            RESTORES.fetch_add(1, Ordering::SeqCst)
        ));
        let out = s3.restore(url, name, &dest, &[]);
        assert_ok(&out, &format!("restore {name} from the bucket"));
        for (n, version) in versions.iter().enumerate() {
            let data = fs::read(dest.join(file_name(n))).expect("read a restored file");
            assert_bytes_eq(
                &data,
                &file_content(n, *version),
                &format!("{name}: file {n}"),
            );
        }
        fs::remove_dir_all(&dest).expect("remove the restore");
    }
}

/// A volume on `s3` under `prefix` (mounted with background repacking off, packs of 1
/// MiB, two files each, a local cache of `cache_size`): snapshot `old` of version 1,
/// `mid` with six files rewritten (version 2), `new` with file 0 rewritten again; then
/// `mid` deleted, which leaves the pack of its files 0 and 1 half unused. Returns the
/// mount (unmounted) and the snapshots left with their file versions.
fn volume_with_garbage(
    s3: &S3Env,
    prefix: &str,
    cache_size: &str,
) -> (Mount, Vec<(&'static str, Versions)>) {
    let args = [
        "--pack-size",
        "1M",
        "--max-unused",
        "100",
        "--cache-size",
        cache_size,
    ];
    let mut mount = s3.mount_store(prefix, &args);
    write_files(mount.path(), 1, |_| true);
    take_snapshot(&mount, "old");
    write_files(mount.path(), 2, |n| n < 6);
    take_snapshot(&mount, "mid");
    write_files(mount.path(), 3, |n| n == 0);
    take_snapshot(&mount, "new");
    for name in ["old", "mid", "new"] {
        wait_completed(&mount, name);
    }
    fs::remove_dir(snapshot_dir(&mount, "mid")).expect("rmdir mid");
    mount.unmount();
    let old = vec![1; FILES];
    let new = vec![3, 2, 2, 2, 2, 2, 1, 1];
    (mount, vec![("old", old), ("new", new)])
}

/// The pack and index keys under `prefix` of the bucket.
fn store_keys(s3: &S3Env, prefix: &str, kind: &str) -> Vec<String> {
    let mut keys: Vec<String> = s3
        .client()
        .list(&format!("{prefix}{kind}/"))
        .into_iter()
        .map(|(key, _)| key)
        .collect();
    keys.sort();
    keys
}

/// Runs `prune` until the proxy has stalled a request (the step under test is under
/// way), then kills it with SIGKILL.
fn kill_during(mut prune: std::process::Command, proxy: &FaultProxy, step: &str) {
    let before = proxy.counts().1;
    let mut child: Child = prune
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start snapfs store prune");
    let deadline = Instant::now() + Duration::from_secs(60);
    while proxy.counts().1 == before {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{step}: prune ended ({status}) before the step was reached");
        }
        assert!(Instant::now() < deadline, "{step}: never reached");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().expect("SIGKILL the prune");
    child.wait().expect("reap the prune");
}

#[test]
fn a_prune_killed_at_every_step_loses_nothing_and_the_next_one_finishes() {
    let s3 = S3Env::garage();
    let prefix = unique_prefix("prune-kill");
    let url = s3.url(&prefix);
    // No cache: every block is evicted once stored, so a repack reads them from the
    // packs. (With 1M, the four blocks stored last stayed; packs land three at a time in
    // any order, and when the half-unused pack landed last its live blocks were still
    // local, the repack read no pack, and the kill test found no step to kill.)
    let (mount, expected) = volume_with_garbage(&s3, &prefix, "0");
    let scratch = mount.scratch("restores");
    fs::create_dir_all(&scratch).expect("scratch dir");
    let data = mount.data_dir();

    let dry = run(&mut prune_cmd(
        data,
        Some(&s3),
        &["--dry-run", "--max-unused", "0"],
    ));
    assert_ok(&dry, "prune --dry-run");
    let dry = stdout(&dry);
    assert!(json_number(&dry, "repacked_packs") > 0, "{dry}");
    assert!(
        json_number(&dry, "unused_bytes") >= FILE_LEN as u64,
        "{dry}"
    );
    let packs_before = store_keys(&s3, &prefix, "packs");

    let (proxy, through) = FaultProxy::for_env(&s3);
    // Each step in turn: the range read of an old pack (before any new pack), the PUT of
    // the new pack, the PUT of the new index (the new pack landed), the DELETE of the
    // old index (the new index landed), the DELETEs of the old packs.
    for (method, part, step) in [
        ("GET", "/packs/", "reading an old pack"),
        ("PUT", "/packs/", "sending the new pack"),
        ("PUT", "/index/", "sending the new index"),
        ("DELETE", "/index/", "deleting the old index"),
        ("DELETE", "/packs/", "deleting the old packs"),
    ] {
        proxy.fault_matching(method, part, Fault::Stall);
        kill_during(
            prune_cmd(data, Some(&through), &["--max-unused", "0"]),
            &proxy,
            step,
        );
        proxy.set_fault(Fault::None);
        assert_restorable(&s3, &url, &expected, &scratch);
        for index in store_keys(&s3, &prefix, "index") {
            let body = s3.client().get(&index).expect("an index object listed");
            assert!(!body.is_empty(), "{step}: {index} is empty");
        }
    }

    let (_, after) = prune_all_unused(data, &s3, "prune after the kills");
    assert_eq!(json_number(&after, "repacked_packs"), 0, "{after}");
    assert_restorable(&s3, &url, &expected, &scratch);

    // Nothing is left over: every pack in the bucket is one the catalog counts, every
    // old pack that held garbage is gone, and every block in a pack is intact.
    let packs_after = store_keys(&s3, &prefix, "packs");
    assert_eq!(
        packs_after.len() as u64,
        json_number(&after, "store_packs"),
        "packs in the bucket: {packs_after:?}\n{after}"
    );
    assert!(
        packs_before.iter().any(|p| !packs_after.contains(p)),
        "old packs deleted: {packs_before:?} -> {packs_after:?}"
    );
    packed_in_bucket(&s3.client(), &prefix);
    assert_verify_clean(data, &s3.vars());
}

/// The catalog's word that the local disk holds a block can be stale: evicted since a
/// repack read it, or lost. The repack then copies the block from its pack; it once left
/// the pack as it was ("cannot repack"), for as long as the word stayed wrong.
#[test]
fn a_repack_copies_blocks_the_disk_lost_from_their_pack() {
    let s3 = S3Env::garage();
    let prefix = unique_prefix("prune-lost");
    let url = s3.url(&prefix);
    // A cache that keeps every block: the catalog says they are all on the disk.
    let (mount, expected) = volume_with_garbage(&s3, &prefix, "1G");
    let data = mount.data_dir();
    let lost = block_files(data);
    assert!(
        lost.len() >= 2 * FILES,
        "the blocks stayed on the disk: {lost:?}"
    );
    for file in &lost {
        fs::remove_file(file).expect("lose a block file");
    }

    let (report, _) = prune_all_unused(data, &s3, "prune");
    assert!(json_number(&report, "repacked_packs") > 0, "{report}");
    assert_restorable(&s3, &url, &expected, &mount.scratch("restores"));
}

#[test]
fn an_idle_mount_collects_what_deleted_snapshots_left() {
    let mut mount = Mount::with_args(&["--pack-size", "1M"]);
    let store = mount.data_dir().join("store");
    write_files(mount.path(), 1, |_| true);
    take_snapshot(&mount, "a");
    write_files(mount.path(), 2, |n| n % 2 == 0);
    take_snapshot(&mount, "b");
    write_files(mount.path(), 3, |n| n % 2 == 1);
    take_snapshot(&mount, "c");
    for name in ["a", "b", "c"] {
        wait_completed(&mount, name);
    }
    let pack_bytes = || -> u64 {
        fs::read_dir(store.join("packs"))
            .expect("packs dir")
            .map(|e| e.expect("entry").metadata().expect("stat").len())
            .sum()
    };
    // Deleting `a` leaves each pack of version 1 (two files) half unused: repacked. Then
    // deleting `b` leaves packs without a live block: deleted. Each time the packs shrink
    // to within 1.25x of the files the snapshots left need (pattern data does not
    // compress).
    for (name, files_needed) in [("a", 12), ("b", 8)] {
        fs::remove_dir(snapshot_dir(&mount, name)).expect("rmdir");
        let needed = (files_needed * FILE_LEN) as u64;
        let deadline = Instant::now() + COMPLETION_TIMEOUT;
        while pack_bytes() > needed * 5 / 4 {
            assert!(
                Instant::now() < deadline,
                "after deleting {name}: packs hold {} bytes for {needed} needed; log:\n{}",
                pack_bytes(),
                mount.daemon_log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let data_dir = mount.data_dir().display().to_string();
    let listing = ok(&["snapshot", "list", "--data", &data_dir]);
    let usage = listing
        .lines()
        .find(|line| line.starts_with("store:"))
        .unwrap_or_else(|| panic!("a store line in {listing}"));
    assert!(usage.contains("packs,"), "{usage}");
    let data = fs::read(snapshot_dir(&mount, "c").join(file_name(0))).expect("read c");
    assert_bytes_eq(&data, &file_content(0, 2), "c: file 0");
    mount.unmount();

    let dest = mount.scratch("restore");
    let out = run(snapfs()
        .args(["restore", "--store"])
        .arg(format!("file://{}", store.display()))
        .arg("c")
        .arg(&dest));
    assert_ok(&out, "restore c from the store");
    for n in 0..FILES {
        let version = if n % 2 == 0 { 2 } else { 3 };
        let data = fs::read(dest.join(file_name(n))).expect("read a restored file");
        assert_bytes_eq(&data, &file_content(n, version), &format!("c: file {n}"));
    }
}

#[test]
fn prune_refuses_a_mounted_volume_and_dry_run_reads_it() {
    let mount = Mount::new();
    fs::write(mount.path().join("f"), b"x").expect("write");
    take_snapshot(&mount, "s");
    wait_completed(&mount, "s");
    let out = run(&mut prune_cmd(mount.data_dir(), None, &[]));
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("is mounted or in use")
            && stderr(&out).contains("snapfs store prune"),
        "{}",
        stderr(&out)
    );
    let out = run(&mut prune_cmd(mount.data_dir(), None, &["--dry-run"]));
    assert_ok(&out, "prune --dry-run beside a mount");
    let json = stdout(&out);
    assert_eq!(json_number(&json, "deleted_packs"), 0, "{json}");
    // Its pack of blocks and its pack of trees.
    assert_eq!(json_number(&json, "store_packs"), 2, "{json}");
    assert!(json.contains("\"dry_run\":true"), "{json}");
    // The mount names the volume as well as its data dir does.
    let out = run(snapfs()
        .args(["store", "prune", "--dry-run", "--json"])
        .arg(mount.path()));
    assert_ok(&out, "prune MOUNTPOINT --dry-run");
    assert_eq!(
        json_number(&stdout(&out), "store_packs"),
        2,
        "{}",
        stdout(&out)
    );
    let out = run(snapfs().args(["store", "prune"]).arg(mount.path()));
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("is mounted or in use"),
        "{}",
        stderr(&out)
    );
    let out = run(snapfs().args(["store", "prune", "--max-unused", "101"]));
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}

/// A store written in format 1 (each block and tree an object of its own) is packed by
/// `store prune --convert`: a SIGKILL at each step (reading the old objects, sending a
/// pack, sending the index, deleting the old objects) leaves every snapshot restorable
/// from the bucket alone, and the next prune finishes: no object of its own is left, the
/// packs hold every block, and the volume reads its evicted blocks from them.
#[test]
fn prune_convert_packs_a_format_1_store_and_a_kill_at_every_step_loses_nothing() {
    let s3 = S3Env::garage();
    let prefix = unique_prefix("convert");
    let url = s3.url(&prefix);
    // A small cache evicts the blocks once stored: the conversion reads them from the
    // store. Packs of 1 MiB: it writes several.
    let mut mount = s3.mount_store(&prefix, &["--cache-size", "1M", "--pack-size", "1M"]);
    write_files(mount.path(), 1, |_| true);
    take_snapshot(&mount, "old");
    write_files(mount.path(), 2, |n| n < 4);
    take_snapshot(&mount, "new");
    for name in ["old", "new"] {
        wait_completed(&mount, name);
    }
    wait_for(|| block_files(mount.data_dir()).len() <= 4);
    mount.unmount();
    let expected = [
        ("old", vec![1; FILES]),
        ("new", vec![2, 2, 2, 2, 1, 1, 1, 1]),
    ];
    let client = s3.client();
    let (blocks, trees) = rewrite_as_format_1(&client, &prefix, mount.data_dir());
    assert_eq!(blocks, 12 * FILE_LEN / BLOCK, "each file version's blocks");
    assert_eq!(trees, 2, "each snapshot's root");
    let scratch = mount.scratch("restores");
    fs::create_dir_all(&scratch).expect("scratch dir");
    assert_restorable(&s3, &url, &expected, &scratch);
    let data = mount.data_dir();

    let dry = run(&mut prune_cmd(data, Some(&s3), &["--dry-run"]));
    assert_ok(&dry, "prune --dry-run");
    let dry = stdout(&dry);
    assert_eq!(
        json_number(&dry, "format_1_objects"),
        (blocks + trees) as u64,
        "{dry}"
    );
    let plain = run(&mut prune_cmd(data, Some(&s3), &[]));
    assert_ok(&plain, "prune without --convert");
    assert_eq!(json_number(&stdout(&plain), "converted_objects"), 0);
    assert_eq!(store_keys(&s3, &prefix, "blocks").len(), blocks);

    let (proxy, through) = FaultProxy::for_env(&s3);
    for (method, part, step) in [
        ("GET", "/blocks/", "reading the old objects"),
        ("PUT", "/packs/", "sending a pack"),
        ("PUT", "/index/", "sending the index"),
        ("DELETE", "/blocks/", "deleting the old objects"),
    ] {
        proxy.fault_matching(method, part, Fault::Stall);
        kill_during(
            prune_cmd(data, Some(&through), &["--convert"]),
            &proxy,
            step,
        );
        proxy.set_fault(Fault::None);
        assert_restorable(&s3, &url, &expected, &scratch);
        // A prune (or a mount) that only deletes what is queued keeps each old object
        // until an index lists its copy.
        let plain = run(&mut prune_cmd(data, Some(&s3), &[]));
        assert_ok(&plain, &format!("prune after {step}"));
        assert_restorable(&s3, &url, &expected, &scratch);
    }

    let out = run(&mut prune_cmd(data, Some(&s3), &["--convert"]));
    assert_ok(&out, "prune --convert after the kills");
    assert_eq!(json_number(&stdout(&out), "left_objects"), 0);
    assert_eq!(store_keys(&s3, &prefix, "blocks"), Vec::<String>::new());
    assert_eq!(store_keys(&s3, &prefix, "trees"), Vec::<String>::new());
    let after = run(&mut prune_cmd(data, Some(&s3), &["--dry-run"]));
    assert_ok(&after, "prune --dry-run after");
    assert_eq!(json_number(&stdout(&after), "format_1_objects"), 0);
    let packed = packed_in_bucket(&client, &prefix);
    assert_eq!(packed.len(), blocks);
    assert!(
        packed.values().all(|copies| copies.len() == 1),
        "each block packed once"
    );
    assert_eq!(trees_in_bucket(&client, &prefix).len(), trees);
    assert_restorable(&s3, &url, &expected, &scratch);
    assert_verify_clean(data, &s3.vars());

    mount.remount();
    for n in 0..FILES {
        let version = if n < 4 { 2 } else { 1 };
        let read = fs::read(mount.path().join(file_name(n))).expect("read an evicted file");
        assert_bytes_eq(&read, &file_content(n, version), &format!("file {n}"));
    }
}

/// Each upload writes an index object, and a reader of the bucket GETs every one: an
/// idle mount merges the small ones once there are more than 16, and every snapshot
/// still restores from the store alone.
#[test]
fn an_idle_mount_merges_small_index_objects() {
    merged_after_small_uploads("index", 4);
}

/// Each upload sends a small pack of blocks and one of trees (40 here without merging):
/// an idle mount keeps 16 small packs (`gc::SMALL_PACKS_KEPT`), plus the one a merge may
/// leave, and every snapshot still restores from the store alone.
#[test]
fn an_idle_mount_merges_small_packs() {
    merged_after_small_uploads("packs", 16 + 1);
}

/// Takes 20 snapshots of one new small file each, each uploaded before the next, waits
/// until the store's `kind` directory holds at most `at_most` objects, then restores
/// the first, a middle and the last snapshot from the store alone, byte for byte.
fn merged_after_small_uploads(kind: &str, at_most: usize) {
    const SNAPSHOTS: usize = 20;
    let mount = Mount::new();
    let store = mount.data_dir().join("store");
    let objects = || {
        fs::read_dir(store.join(kind))
            .map(|entries| entries.count())
            .unwrap_or(0)
    };
    for n in 0..SNAPSHOTS {
        fs::write(mount.path().join(file_name(n)), file_content(n, 1)).expect("write");
        take_snapshot(&mount, &format!("s{n}"));
        wait_completed(&mount, &format!("s{n}"));
    }
    wait_for(|| objects() <= at_most);
    let url = format!("file://{}", store.display());
    for last in [0, SNAPSHOTS / 2, SNAPSHOTS - 1] {
        let dest = mount.scratch(&format!("restore-{last}"));
        let out = run(snapfs()
            .args(["restore", "--store", &url])
            .arg(format!("s{last}"))
            .arg(&dest));
        assert_ok(&out, &format!("restore s{last} from the store"));
        for n in 0..=last {
            let data = fs::read(dest.join(file_name(n))).expect("read a restored file");
            assert_bytes_eq(&data, &file_content(n, 1), &format!("s{last}: file {n}"));
        }
        assert!(!dest.join(file_name(last + 1)).exists());
    }
}
