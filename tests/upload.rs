//! Uploads through real mounts to real S3-compatible servers (Garage and s3s-fs, started
//! by scripts/test), checked in the bucket: zstd frames that decode to the right blocks,
//! each block once, manifests that decode, objects deleted with their last snapshot.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::time::{Duration, Instant};

use common::s3::{Fault, FaultProxy, S3Client, S3Env, unique_prefix};
use common::*;
use snapfs::blocks::BlockHash;
use snapfs::manifest::{self, Content, Entry};

/// Sent bytes of a snapshot, from `user.snapfs.progress` ("SENT/TOTAL bytes ...").
fn sent_bytes(mount: &Mount, name: &str) -> u64 {
    let progress = snapshot_attr(mount, name, "user.snapfs.progress");
    progress
        .split('/')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected progress {progress:?}"))
}

/// Every block in the packs under `prefix`: decoded, checked against its hash, by hash.
/// Each block is in one pack only.
fn stored_blocks(client: &S3Client, prefix: &str) -> BTreeMap<String, Vec<u8>> {
    let copies = packed_in_bucket(client, prefix);
    copies
        .into_iter()
        .map(|(hash, mut copies)| {
            assert_eq!(copies.len(), 1, "{hash} is in one pack: {copies:?}");
            (hash, copies.remove(0).data)
        })
        .collect()
}

/// The hashes of the blocks in the packs under `prefix` (each checked, and in one pack).
fn stored_hashes(client: &S3Client, prefix: &str) -> BTreeSet<String> {
    stored_blocks(client, prefix).into_keys().collect()
}

/// The hashes of `data` cut into blocks, skipping all-zero blocks (holes).
fn block_hashes(data: &[u8]) -> BTreeSet<String> {
    data.chunks(BLOCK)
        .filter(|chunk| chunk.iter().any(|&b| b != 0))
        .map(|chunk| BlockHash::of(chunk).to_hex())
        .collect()
}

fn get_decoded(client: &S3Client, key: &str) -> Vec<u8> {
    let object = client
        .get(key)
        .unwrap_or_else(|| panic!("{key} is not in the bucket"));
    zstd::decode_all(object.as_slice()).unwrap_or_else(|e| panic!("{key}: {e}"))
}

/// The root entries of snapshot `id`'s manifest, read from the bucket alone.
fn manifest_root(
    client: &S3Client,
    prefix: &str,
    id: u64,
) -> (manifest::SnapshotManifest, Vec<Entry>) {
    let snapshot =
        manifest::decode_snapshot(&get_decoded(client, &format!("{prefix}snapshots/{id:010}")))
            .expect("snapshot object decodes");
    let Content::Tree(root) = &snapshot.root.content else {
        panic!("the root has no tree")
    };
    let trees = trees_in_bucket(client, prefix);
    let tree = &trees
        .get(&root.to_hex())
        .unwrap_or_else(|| panic!("tree {root} is in no pack"))[0]
        .data;
    let entries = manifest::decode_tree(tree).expect("tree decodes");
    (snapshot, entries)
}

fn file_blocks(entry: &Entry) -> Vec<String> {
    match &entry.content {
        Content::Blocks(blocks) => blocks.iter().map(|(_, h)| h.to_hex()).collect(),
        other => panic!("{:?}: {other:?}", String::from_utf8_lossy(&entry.name)),
    }
}

#[test]
fn snapshots_reach_both_servers_as_verified_zstd_blocks_and_manifests() {
    for (server, s3) in S3Env::all() {
        let prefix = unique_prefix(&format!("basic-{server}"));
        let mount = s3.mount_store(&prefix, &[]);
        let random = pattern(4 * BLOCK + 1000, 1);
        let words = text(3 * BLOCK);
        fs::write(mount.path().join("random"), &random).expect("write");
        fs::write(mount.path().join("copy"), &random).expect("write the duplicate");
        fs::create_dir(mount.path().join("dir")).expect("mkdir");
        fs::write(mount.path().join("dir/text"), &words).expect("write");
        take_snapshot(&mount, "first");
        wait_completed(&mount, "first");

        let client = s3.client();
        let blocks = stored_blocks(&client, &prefix);
        let expected: BTreeSet<String> = block_hashes(&random)
            .union(&block_hashes(&words))
            .cloned()
            .collect();
        assert_eq!(
            blocks.keys().cloned().collect::<BTreeSet<_>>(),
            expected,
            "{server}: each distinct block once, the duplicate file adds none"
        );
        let packs = client.list(&format!("{prefix}packs/"));
        assert_eq!(
            packs.len(),
            2,
            "{server}: one pack of blocks for a few MiB, one of the directories' trees"
        );
        assert!(
            client.list(&format!("{prefix}trees/")).is_empty(),
            "{server}: no object per directory"
        );
        assert_eq!(client.list(&format!("{prefix}index/")).len(), 1, "{server}");
        assert!(
            client.list(&format!("{prefix}blocks/")).is_empty(),
            "{server}: no object per block"
        );
        let text_objects: u64 = packed_in_bucket(&client, &prefix)
            .iter()
            .filter(|(hash, _)| block_hashes(&words).contains(*hash))
            .map(|(_, copies)| copies[0].length as u64)
            .sum();
        assert!(
            text_objects < words.len() as u64 / 4,
            "{server}: text compresses ({text_objects} bytes stored for {})",
            words.len()
        );

        let (snapshot, root) = manifest_root(&client, &prefix, 1);
        assert_eq!(snapshot.name, b"first");
        let names: Vec<&[u8]> = root.iter().map(|e| e.name.as_slice()).collect();
        assert_eq!(names, [&b"copy"[..], b"dir", b"random"], "{server}");
        assert_eq!(file_blocks(&root[0]), file_blocks(&root[2]));
        assert_eq!(root[2].attrs.size, random.len() as u64);
        let restored: Vec<u8> = file_blocks(&root[2])
            .iter()
            .flat_map(|h| blocks[h].clone())
            .collect();
        assert_bytes_eq(&restored, &random, "random file rebuilt from the bucket");
        assert!(client.get(&format!("{prefix}volume")).is_some());
    }
}

#[test]
fn a_later_snapshot_sends_only_the_changed_block() {
    let s3 = S3Env::garage();
    let prefix = unique_prefix("incremental");
    let mount = s3.mount_store(&prefix, &[]);
    let data = pattern(8 * BLOCK, 2);
    fs::write(mount.path().join("big"), &data).expect("write");
    fs::write(mount.path().join("other"), pattern(BLOCK, 3)).expect("write");
    take_snapshot(&mount, "one");
    wait_completed(&mount, "one");
    let client = s3.client();
    let before: BTreeMap<String, u64> = client
        .list(&format!("{prefix}packs/"))
        .into_iter()
        .collect();
    let blocks_before = stored_blocks(&client, &prefix);

    // Rewrite one block in place.
    let file = rw(&mount.path().join("big"));
    let new_block = pattern(BLOCK, 4);
    std::os::unix::fs::FileExt::write_all_at(&file, &new_block, 5 * BLOCK as u64)
        .expect("rewrite block 5");
    drop(file);
    take_snapshot(&mount, "two");
    wait_completed(&mount, "two");
    assert_eq!(sent_bytes(&mount, "two"), BLOCK as u64);

    let after: BTreeMap<String, u64> = client
        .list(&format!("{prefix}packs/"))
        .into_iter()
        .collect();
    let added: Vec<&String> = after.keys().filter(|k| !before.contains_key(*k)).collect();
    assert_eq!(
        added.len(),
        2,
        "exactly one new pack of blocks, one of trees: {added:?}"
    );
    let blocks_after = stored_blocks(&client, &prefix);
    let new_blocks: Vec<&String> = blocks_after
        .keys()
        .filter(|h| !blocks_before.contains_key(*h))
        .collect();
    assert_eq!(
        new_blocks,
        [&BlockHash::of(&new_block).to_hex()],
        "exactly one new block"
    );
    // Snapshot one's packs are all still there, unchanged.
    for (key, size) in &before {
        assert_eq!(after.get(key), Some(size), "{key} kept as it was");
    }
    let (_, root) = manifest_root(&client, &prefix, 2);
    let big = root
        .iter()
        .find(|e| e.name == b"big")
        .expect("big in snapshot two");
    assert_eq!(file_blocks(big)[5], BlockHash::of(&new_block).to_hex());
}

#[test]
fn deleting_snapshots_deletes_the_objects_only_they_needed() {
    let s3 = S3Env::s3s();
    let prefix = unique_prefix("delete");
    let mount = s3.mount_store(&prefix, &[]);
    let old = pattern(2 * BLOCK, 5);
    let new = pattern(2 * BLOCK, 6);
    fs::write(mount.path().join("f"), &old).expect("write");
    take_snapshot(&mount, "old");
    wait_completed(&mount, "old");
    fs::write(mount.path().join("f"), &new).expect("overwrite");
    take_snapshot(&mount, "new");
    wait_completed(&mount, "new");
    let client = s3.client();
    assert_eq!(stored_blocks(&client, &prefix).len(), 4);

    fs::remove_dir(snapshot_dir(&mount, "old")).expect("rmdir old");
    let wanted: BTreeSet<String> = block_hashes(&new);
    wait_for(|| {
        let keys: BTreeSet<String> = stored_blocks(&client, &prefix).into_keys().collect();
        keys == wanted
    });
    assert!(
        client
            .get(&format!("{prefix}snapshots/0000000001"))
            .is_none()
    );
    assert!(
        client
            .get(&format!("{prefix}snapshots/0000000002"))
            .is_some()
    );

    // The live file still uses the new blocks: they stay until it is gone too.
    fs::remove_file(mount.path().join("f")).expect("rm f");
    fs::remove_dir(snapshot_dir(&mount, "new")).expect("rmdir new");
    wait_for(|| stored_blocks(&client, &prefix).is_empty());
    assert!(client.list(&format!("{prefix}snapshots/")).is_empty());
    assert!(client.list(&format!("{prefix}trees/")).is_empty());
    wait_for(|| trees_in_bucket(&client, &prefix).is_empty());
    wait_for(|| client.list(&format!("{prefix}index/")).is_empty());
}

/// `snapfs mount` (daemonizing) with `s3`'s credentials: its output.
fn try_mount(mount: &Mount, s3: &S3Env, store: &str) -> std::process::Output {
    let mut cmd = mount_cmd(mount.path(), &mount.scratch("data"));
    s3.apply(&mut cmd);
    cmd.arg("--store").arg(store);
    run(&mut cmd)
}

fn assert_refused(output: &std::process::Output, expected: &[&str], secret: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "mount succeeded: {stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    for word in expected {
        assert!(stderr.contains(word), "{word:?} not in {stderr:?}");
    }
    assert!(!stderr.contains(secret), "the secret leaked: {stderr}");
}

#[test]
fn bad_stores_are_refused_before_mounting_with_one_line_errors() {
    let s3 = S3Env::garage();
    let mount = Mount::unmounted();
    let prefix = unique_prefix("refused");

    let wrong_key = S3Env {
        secret_key: "not-the-secret-key-at-all".into(),
        ..s3.clone()
    };
    let out = try_mount(&mount, &wrong_key, &s3.url(&prefix));
    assert_refused(&out, &["credentials"], &wrong_key.secret_key);

    let out = try_mount(
        &mount,
        &s3,
        &format!("s3://no-such-bucket-{}/x", std::process::id()),
    );
    assert_refused(&out, &["NoSuchBucket"], &s3.secret_key);

    // A port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = closed.local_addr().expect("addr").port();
    drop(closed);
    let unreachable = s3.with_endpoint(&format!("http://127.0.0.1:{port}"));
    let out = try_mount(&mount, &unreachable, &s3.url(&prefix));
    assert_refused(&out, &["cannot reach", "refused"], &s3.secret_key);

    let out = try_mount(&mount, &s3, "s3://Bad_Bucket/x");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid store URL"));

    // A prefix that holds another volume.
    let first = s3.mount_store(&prefix, &[]);
    drop(first);
    let out = try_mount(&mount, &s3, &s3.url(&prefix));
    assert_refused(&out, &["another snapfs volume"], &s3.secret_key);
    assert!(!mount.is_mounted());
}

#[test]
fn uploads_ride_out_throttling_errors_and_resets() {
    let s3 = S3Env::garage();
    let (proxy, through) = FaultProxy::for_env(&s3);
    let prefix = unique_prefix("faults");
    let mount = through.mount_store(&prefix, &["--upload-concurrency", "4"]);
    let data = pattern(12 * BLOCK, 7);
    fs::write(mount.path().join("f"), &data).expect("write");

    // The store throttles everything for a while: the snapshot stays pending.
    proxy.set_fault(Fault::SlowDown);
    take_snapshot(&mount, "s");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(snapshot_attr(&mount, "s", "user.snapfs.state"), "pending");
    // Then it half works: errors and dropped connections mixed with successes.
    proxy.fail_every(2, Fault::InternalError);
    std::thread::sleep(Duration::from_secs(1));
    proxy.fail_every(3, Fault::Reset);
    std::thread::sleep(Duration::from_secs(1));
    // Requests that hang, cut off when the next change of faults closes them.
    proxy.set_fault(Fault::Stall);
    std::thread::sleep(Duration::from_secs(1));
    proxy.set_fault(Fault::None);
    wait_completed(&mount, "s");
    let (forwarded, faulted) = proxy.counts();
    assert!(
        faulted >= 3,
        "faults injected: {faulted} (forwarded {forwarded})"
    );

    assert_eq!(stored_hashes(&s3.client(), &prefix), block_hashes(&data));
}

#[test]
fn an_unmount_during_an_outage_returns_at_once_and_the_upload_resumes_at_the_next_mount() {
    let s3 = S3Env::garage();
    let (proxy, through) = FaultProxy::for_env(&s3);
    let prefix = unique_prefix("outage");
    let mut mount = through.mount_store(&prefix, &[]);
    let data = pattern(12 * BLOCK, 13);
    fs::write(mount.path().join("f"), &data).expect("write");

    // The store goes down: the snapshot's pack is being retried when the unmount comes.
    proxy.set_fault(Fault::InternalError);
    take_snapshot(&mount, "s");
    wait_for(|| proxy.counts().1 >= 2);
    let start = Instant::now();
    mount.unmount();
    let took = start.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "the unmount waited {took:?} for a store that is down"
    );

    // Given up at the stop, not failed: the next mount sends it.
    proxy.set_fault(Fault::None);
    mount.remount();
    wait_completed(&mount, "s");
    assert_eq!(stored_hashes(&s3.client(), &prefix), block_hashes(&data));
}

#[test]
fn a_killed_daemon_resumes_its_upload_at_the_next_mount() {
    let s3 = S3Env::garage();
    let prefix = unique_prefix("resume");
    // Slow enough to be killed mid-way: 12 MiB at 1 MiB/s.
    let mut mount = s3.mount_store(&prefix, &["--upload-limit", "1M"]);
    let data = pattern(48 * BLOCK, 8);
    fs::write(mount.path().join("f"), &data).expect("write");
    let file = fs::File::open(mount.path().join("f")).expect("open");
    file.sync_all().expect("fsync");
    take_snapshot(&mount, "s");
    wait_for(|| sent_bytes(&mount, "s") > 0);
    mount.kill9();
    let partial = stored_blocks(&s3.client(), &prefix).len();
    assert!(
        partial < 48,
        "all {partial} blocks were sent before the kill"
    );

    mount.set_args(&["--store", &s3.url(&prefix)]);
    mount.remount();
    wait_completed(&mount, "s");
    assert_eq!(stored_hashes(&s3.client(), &prefix), block_hashes(&data));
    let progress = snapshot_attr(&mount, "s", "user.snapfs.progress");
    let total = (48 * BLOCK).to_string();
    assert_eq!(progress, format!("{total}/{total} bytes 48/48 blocks"));
}

#[test]
fn live_writes_during_an_upload_do_not_change_what_is_uploaded() {
    let s3 = S3Env::s3s();
    let prefix = unique_prefix("isolation");
    let mount = s3.mount_store(&prefix, &["--upload-limit", "4M"]);
    let original = pattern(16 * BLOCK, 9);
    fs::write(mount.path().join("f"), &original).expect("write");
    fs::write(mount.path().join("gone"), pattern(4 * BLOCK, 10)).expect("write");
    take_snapshot(&mount, "s");
    // While it uploads: overwrite, truncate and delete what it is sending.
    fs::write(mount.path().join("f"), pattern(16 * BLOCK, 11)).expect("overwrite");
    truncate(&mount.path().join("f"), BLOCK as i64);
    fs::remove_file(mount.path().join("gone")).expect("rm");
    wait_completed(&mount, "s");

    let client = s3.client();
    let blocks = stored_blocks(&client, &prefix);
    let (_, root) = manifest_root(&client, &prefix, 1);
    let f = root
        .iter()
        .find(|e| e.name == b"f")
        .expect("f in the manifest");
    let rebuilt: Vec<u8> = file_blocks(f)
        .iter()
        .flat_map(|h| blocks[h].clone())
        .collect();
    assert_bytes_eq(&rebuilt, &original, "the snapshot's f, from the bucket");
    assert!(root.iter().any(|e| e.name == b"gone"));
}

#[test]
fn the_upload_limit_bounds_the_rate() {
    let s3 = S3Env::s3s();
    let prefix = unique_prefix("limit");
    let mount = s3.mount_store(&prefix, &["--upload-limit", "1M"]);
    fs::write(mount.path().join("f"), pattern(12 * BLOCK, 12)).expect("write");
    let start = Instant::now();
    take_snapshot(&mount, "s");
    wait_completed(&mount, "s");
    // 3 MiB of incompressible blocks at 1 MiB/s: the first block goes at once.
    let elapsed = start.elapsed();
    assert!(
        elapsed >= Duration::from_millis(2500),
        "3 MiB sent in {elapsed:?} under a 1 MiB/s limit"
    );
}

#[test]
fn the_store_is_remembered_and_another_one_refused() {
    let s3 = S3Env::s3s();
    let prefix = unique_prefix("remember");
    let mut mount = s3.mount_store(&prefix, &[]);
    fs::write(mount.path().join("f"), b"remembered").expect("write");
    mount.unmount();
    // No --store: the volume keeps uploading where it did.
    mount.set_args(&[]);
    mount.remount();
    take_snapshot(&mount, "s");
    wait_completed(&mount, "s");
    assert!(
        s3.client()
            .get(&format!("{prefix}snapshots/0000000001"))
            .is_some()
    );
    mount.unmount();

    let mut cmd = mount_cmd(mount.path(), mount.data_dir());
    s3.apply(&mut cmd);
    cmd.arg("--store").arg(s3.url("elsewhere"));
    let out = run(&mut cmd);
    assert_refused(&out, &["keeps the store"], &s3.secret_key);
}

#[test]
fn a_bounded_cache_evicts_stored_blocks_and_reads_fetch_them_again() {
    let s3 = S3Env::garage();
    let prefix = unique_prefix("cache");
    // 1 MiB: four 256 KiB blocks of what the store holds may stay local.
    let mut mount = s3.mount_store(&prefix, &["--cache-size", "1M"]);
    let random = pattern(16 * BLOCK, 13);
    let words = text(8 * BLOCK);
    fs::write(mount.path().join("random"), &random).expect("write");
    fs::create_dir(mount.path().join("dir")).expect("mkdir");
    fs::write(mount.path().join("dir/text"), &words).expect("write");
    take_snapshot(&mount, "s");
    wait_completed(&mount, "s");
    wait_for(|| block_files(mount.data_dir()).len() <= 4);

    // New live data is not in the store yet: it is never evicted.
    let fresh = pattern(2 * BLOCK, 14);
    let file = rw(&mount.path().join("random"));
    std::os::unix::fs::FileExt::write_all_at(&file, &fresh, 0).expect("rewrite");
    file.sync_all().expect("fsync");
    drop(file);
    let mut expected_live = random.clone();
    expected_live[..fresh.len()].copy_from_slice(&fresh);
    let local = block_files(mount.data_dir()).len();
    assert!(local >= 2, "the unsent blocks stayed local ({local} files)");

    // A remount drops the kernel's page cache: every read below goes to the daemon.
    mount.remount();
    assert_bytes_eq(
        &fs::read(mount.path().join("random")).expect("read"),
        &expected_live,
        "live",
    );
    let snap = snapshot_dir(&mount, "s");
    assert_bytes_eq(
        &fs::read(snap.join("random")).expect("read"),
        &random,
        "snapshot",
    );
    assert_bytes_eq(
        &fs::read(snap.join("dir/text")).expect("read"),
        &words,
        "snapshot text",
    );
    assert!(
        block_files(mount.data_dir()).len() <= 4 + 2,
        "the cache stayed bounded: {} block files",
        block_files(mount.data_dir()).len()
    );

    // Restoring from the local volume fetches evicted blocks from the store too.
    let dest = mount.scratch("restored");
    let mut cmd = snapfs();
    s3.apply(&mut cmd);
    cmd.args(["restore", "s"])
        .arg(&dest)
        .arg("--data")
        .arg(mount.data_dir());
    let out = run(&mut cmd);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_bytes_eq(
        &fs::read(dest.join("random")).expect("read"),
        &random,
        "restored",
    );
    assert_bytes_eq(
        &fs::read(dest.join("dir/text")).expect("read"),
        &words,
        "restored text",
    );
}

/// A volume whose store was written in format 1 (each block an object of its own, no
/// packs) keeps working: its old blocks read back from their objects, its header says
/// format 2 from the next mount, its new snapshots write packs, and deleting the old
/// snapshot deletes the old objects.
#[test]
fn a_format_1_store_keeps_working_and_gains_packs() {
    let s3 = S3Env::garage();
    let prefix = unique_prefix("format-1");
    let mut mount = s3.mount_store(&prefix, &["--cache-size", "1M"]);
    let old = pattern(8 * BLOCK, 60);
    fs::write(mount.path().join("old"), &old).expect("write");
    take_snapshot(&mount, "one");
    wait_completed(&mount, "one");
    wait_for(|| block_files(mount.data_dir()).len() <= 4);
    mount.unmount();

    let client = s3.client();
    let (blocks, trees) = rewrite_as_format_1(&client, &prefix, mount.data_dir());
    assert_eq!(blocks, 8);
    assert_eq!(trees, 1, "the root's");

    mount.remount();
    let header = client.get(&format!("{prefix}volume")).expect("header");
    assert!(
        String::from_utf8_lossy(&header).contains("\nformat 2\n"),
        "the header says format 2 now"
    );
    assert!(
        block_files(mount.data_dir()).len() < 8,
        "some blocks are only in the store"
    );
    assert_bytes_eq(
        &fs::read(mount.path().join("old")).expect("read old"),
        &old,
        "old, read back from format-1 objects",
    );

    fs::remove_file(mount.path().join("old")).expect("rm old");
    let new = pattern(2 * BLOCK, 61);
    fs::write(mount.path().join("new"), &new).expect("write");
    take_snapshot(&mount, "two");
    wait_completed(&mount, "two");
    let packed = packed_in_bucket(&client, &prefix);
    assert_eq!(
        packed.keys().cloned().collect::<BTreeSet<_>>(),
        block_hashes(&new),
        "the new blocks travel in a pack"
    );

    // The old file's last snapshot goes: so do its objects.
    fs::remove_dir(snapshot_dir(&mount, "one")).expect("rmdir one");
    wait_for(|| client.list(&format!("{prefix}blocks/")).is_empty());
    wait_for(|| client.list(&format!("{prefix}trees/")).is_empty());
    let dest = mount.scratch("restored");
    let out = s3.restore(&s3.url(&prefix), "two", &dest, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_bytes_eq(
        &fs::read(dest.join("new")).expect("read"),
        &new,
        "restored new",
    );
    assert!(!dest.join("old").exists());
}
