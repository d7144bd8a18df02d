//! `snapfs verify`: a whole volume checks clean (locally, in Garage, from the bucket alone,
//! beside a running mount); each kind of damage - to the store, the local blocks, the
//! catalog, the index objects - is found and named; `--repair` fixes what good copies
//! allow, and rebuilds lost or damaged index objects from the packs themselves.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;

use common::s3::{S3Env, unique_prefix};
use common::*;
use snapfs::manifest::{self, PackId, PackListing};

/// `snapfs verify ARGS`: its output and exit code.
fn verify(args: &[&str], env: &[(String, String)]) -> (i32, String) {
    let mut cmd = snapfs();
    cmd.arg("verify").args(args);
    for (key, value) in env {
        cmd.env(key, value);
    }
    let Output {
        status,
        stdout,
        stderr,
    } = run(&mut cmd);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&stdout),
        String::from_utf8_lossy(&stderr)
    );
    (status.code().expect("verify exits"), text)
}

fn verify_data(data: &Path, extra: &[&str]) -> (i32, String) {
    let mut args = vec!["--data", data.to_str().expect("utf-8 path")];
    args.extend_from_slice(extra);
    verify(&args, &[])
}

fn assert_clean((code, text): (i32, String)) {
    assert_eq!(code, 0, "verify should be clean:\n{text}");
    assert!(text.contains(": clean"), "{text}");
}

fn assert_problem((code, text): &(i32, String), problem: &str) {
    assert_eq!(*code, 1, "verify should find problems:\n{text}");
    assert!(
        text.contains(&format!("PROBLEM: {problem}")),
        "expected PROBLEM: {problem}, got:\n{text}"
    );
}

/// A volume with two completed snapshots: files of several blocks, a hard link, a
/// directory tree, a file changed between them. Unmounted when returned.
fn volume_with_snapshots(mount: &mut Mount) {
    let root = mount.path().to_owned();
    fs::create_dir_all(root.join("src/deep/er")).expect("mkdir");
    fs::write(root.join("big"), pattern(3 * BLOCK + 100, 1)).expect("write big");
    fs::write(root.join("src/deep/er/small"), b"small file").expect("write small");
    fs::hard_link(root.join("big"), root.join("src/link")).expect("link");
    take_snapshot(mount, "one");
    fs::write(root.join("src/deep/changed"), pattern(BLOCK + 7, 2)).expect("write changed");
    take_snapshot(mount, "two");
    wait_completed(mount, "one");
    wait_completed(mount, "two");
    mount.unmount();
}

/// After a repair, the volume of `volume_with_snapshots` mounts and its big file reads
/// back byte for byte.
fn big_reads_back_after_repair(mount: &mut Mount) {
    mount.remount();
    assert_bytes_eq(
        &fs::read(mount.path().join("big")).expect("read big"),
        &pattern(3 * BLOCK + 100, 1),
        "big after repair",
    );
}

/// Paths of the local block files.
fn first_block_file(data: &Path) -> std::path::PathBuf {
    block_files(data)
        .into_iter()
        .next()
        .expect("the volume has block files")
}

#[test]
fn a_whole_volume_is_clean_shallow_deep_and_from_the_store_alone() {
    let mut mount = Mount::new();
    volume_with_snapshots(&mut mount);
    let data = mount.data_dir();
    assert_clean(verify_data(data, &[]));
    let (code, text) = verify_data(data, &["--deep"]);
    assert_clean((code, text.clone()));
    assert!(text.contains("blocks hashed"), "{text}");
    let store = format!("file://{}", data.join("store").display());
    assert_clean(verify(&["--store", &store, "--deep"], &[]));

    let (code, json) = verify_data(data, &["--json"]);
    assert_eq!(code, 0, "{json}");
    assert!(
        json.starts_with("{\"clean\":true,\"snapshots\":2,"),
        "{json}"
    );
    assert!(json.contains("\"findings\":[]"), "{json}");
}

#[test]
fn a_volume_in_garage_is_clean_and_a_lost_object_is_found_and_repaired() {
    let env = S3Env::garage();
    let prefix = unique_prefix("verify");
    let mut mount = env.mount_store(&prefix, &[]);
    volume_with_snapshots(&mut mount);
    let vars = env.vars();
    let data = mount.data_dir().to_str().expect("utf-8").to_owned();
    assert_clean(verify(&["--data", &data, "--deep"], &vars));
    assert_clean(verify(&["--store", &env.url(&prefix), "--deep"], &vars));

    // One pack lost (its blocks with it), one block in another damaged in place.
    let client = env.client();
    let stored = packed_in_bucket(&client, &prefix);
    let packs: BTreeSet<&String> = stored.values().map(|copies| &copies[0].pack).collect();
    assert!(
        packs.len() >= 2,
        "snapshots in packs of their own: {packs:?}"
    );
    let lost_pack = packs.first().expect("a pack").to_string();
    let lost = stored
        .iter()
        .find(|(_, copies)| copies[0].pack == lost_pack)
        .map(|(hash, _)| hash.clone())
        .expect("a block of the lost pack");
    client.delete(&lost_pack);
    let (damaged, copy) = stored
        .iter()
        .find(|(_, copies)| copies[0].pack != lost_pack)
        .map(|(hash, copies)| (hash.clone(), copies[0].clone()))
        .expect("a block elsewhere");
    let mut pack = client.get(&copy.pack).expect("its pack");
    pack[copy.offset..copy.offset + copy.length].fill(b'x');
    client.put(&copy.pack, &pack);

    let shallow = verify(&["--data", &data], &vars);
    assert_problem(
        &shallow,
        "blocks recorded as stored that are missing from s3://",
    );
    assert!(shallow.1.contains(&lost), "{}", shallow.1);
    assert!(
        !shallow.1.contains(&damaged),
        "a shallow check does not download: {}",
        shallow.1
    );
    let deep = verify(&["--data", &data, "--deep"], &vars);
    assert_problem(&deep, "block objects that fail verification");
    let from_bucket = verify(&["--store", &env.url(&prefix), "--deep"], &vars);
    assert_problem(
        &from_bucket,
        "blocks named by a snapshot's manifest that no store holds",
    );
    assert_problem(&from_bucket, "block objects that fail verification");

    let (code, text) = verify(&["--data", &data, "--deep", "--repair"], &vars);
    assert_eq!(code, 0, "repair should leave the volume whole:\n{text}");
    // Every block of the lost pack, and the damaged one.
    let lost_blocks = stored
        .values()
        .filter(|copies| copies[0].pack == lost_pack)
        .count();
    let uploaded = format!("repaired: uploaded {} blocks", lost_blocks + 1);
    assert!(text.contains(&uploaded), "{text}");
    assert_clean(verify(&["--store", &env.url(&prefix), "--deep"], &vars));

    // The repaired bucket restores the snapshot byte for byte on its own.
    let dest = mount.scratch("restored");
    let output = env.restore(&env.url(&prefix), "two", &dest, &[]);
    assert!(output.status.success(), "{output:?}");
    assert_bytes_eq(
        &fs::read(dest.join("big")).expect("read big"),
        &pattern(3 * BLOCK + 100, 1),
        "restored big",
    );
    assert_bytes_eq(
        &fs::read(dest.join("src/deep/changed")).expect("read changed"),
        &pattern(BLOCK + 7, 2),
        "restored changed",
    );
}

#[test]
fn damaged_local_blocks_and_orphans_are_found_and_repaired_from_the_store() {
    let mut mount = Mount::new();
    volume_with_snapshots(&mut mount);
    let data = mount.data_dir().to_owned();
    let victim = first_block_file(&data);
    let good = fs::read(&victim).expect("read block");
    let mut bad = good.clone();
    bad[0] ^= 0xff;
    fs::write(&victim, &bad).expect("corrupt block");
    let orphan = data.join("blocks/00/00orphan");
    fs::write(&orphan, b"left by a crash").expect("write orphan");

    // Same length: only a deep check sees it. The orphan is a note, not a problem.
    let (code, text) = verify_data(&data, &[]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("1 block files"), "{text}");
    let deep = verify_data(&data, &["--deep"]);
    assert_problem(&deep, "blocks missing or damaged in");
    let name = victim.file_name().expect("name").to_string_lossy();
    assert!(deep.1.contains(name.as_ref()), "{}", deep.1);

    fs::remove_file(&victim).expect("remove block");
    assert_problem(&verify_data(&data, &[]), "blocks missing or damaged in");

    let (code, text) = verify_data(&data, &["--repair"]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("repaired: rewrote 1 local blocks"), "{text}");
    assert!(text.contains("repaired: deleted 1 unreferenced"), "{text}");
    assert_eq!(fs::read(&victim).expect("repaired block"), good);
    assert!(!orphan.exists(), "the orphan is deleted");
    assert_clean(verify_data(&data, &["--deep"]));
    big_reads_back_after_repair(&mut mount);
}

#[test]
fn a_damaged_small_block_in_the_catalog_is_found_and_repaired_from_the_store() {
    let mut mount = Mount::new();
    volume_with_snapshots(&mut mount);
    let data = mount.data_dir().to_owned();
    let db = rusqlite::Connection::open(data.join("catalog.db")).expect("open catalog");
    let damaged = db
        .execute("UPDATE inline_blocks SET data = zeroblob(length(data))", [])
        .expect("damage the small blocks");
    assert!(damaged > 0, "the volume has small blocks");
    drop(db);

    // The catalog says they are there: only a deep check hashes them.
    assert_clean(verify_data(&data, &[]));
    assert_problem(
        &verify_data(&data, &["--deep"]),
        "blocks missing or damaged in",
    );
    let (code, text) = verify_data(&data, &["--deep", "--repair"]);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains(&format!("repaired: rewrote {damaged} local blocks")),
        "{text}"
    );
    assert_clean(verify_data(&data, &["--deep"]));
    big_reads_back_after_repair(&mut mount);
}

#[test]
fn catalog_damage_is_named_precisely() {
    let mut mount = Mount::new();
    volume_with_snapshots(&mut mount);
    let data = mount.data_dir().to_owned();
    let db = rusqlite::Connection::open(data.join("catalog.db")).expect("open catalog");
    db.execute_batch(
        "UPDATE blocks SET refs = refs + 1 WHERE hash = (SELECT min(hash) FROM blocks);
         UPDATE inodes SET nlink = 7 WHERE ino = (SELECT max(ino) FROM inodes WHERE kind = 1)
             AND death IS NULL;
         INSERT INTO dentries VALUES (1, CAST('ghost' AS BLOB), 1, NULL, 9999, 1);
         UPDATE meta SET value = value + 1 WHERE key = 'live_bytes';
         UPDATE block_pieces SET len = len - 1 WHERE hash = (SELECT min(hash) FROM block_pieces);",
    )
    .expect("tamper");
    drop(db);
    let found = verify_data(&data, &[]);
    assert_problem(
        &found,
        "piece values that do not fit a block the catalog has",
    );
    assert_problem(&found, "blocks whose reference count is wrong");
    assert_problem(
        &found,
        "the live volume: non-directories whose link count differs from the entries naming them",
    );
    assert_problem(
        &found,
        "the live volume: entries naming an inode this view does not have",
    );
    assert!(found.1.contains("name ghost ino 9999"), "{}", found.1);
    assert_problem(&found, "the live byte count differs");
    // Not repairable from copies: still reported after --repair.
    assert_problem(
        &verify_data(&data, &["--repair"]),
        "blocks whose reference count is wrong",
    );
}

#[test]
fn a_lost_pack_of_trees_breaks_the_manifest_of_every_snapshot_using_it() {
    let mut mount = Mount::new();
    volume_with_snapshots(&mut mount);
    let data = mount.data_dir().to_owned();
    assert!(
        !data.join("store/trees").exists(),
        "trees travel in packs, not as objects of their own"
    );
    let trees = packed_trees_in_dir(&data.join("store"));
    // The first snapshot's: each has a pack of its trees.
    let pack = trees
        .values()
        .flatten()
        .next()
        .expect("a packed tree")
        .pack
        .clone();
    fs::remove_file(data.join("store").join(&pack)).expect("remove the pack");
    let found = verify_data(&data, &[]);
    assert_problem(&found, "trees of completed snapshots missing from file://");
    let store = format!("file://{}", data.join("store").display());
    assert_problem(
        &verify(&["--store", &store], &[]),
        "manifests that cannot be read back whole",
    );
}

#[test]
fn beside_a_running_mount_checks_but_refuses_to_repair() {
    let mut mount = Mount::new();
    fs::write(mount.path().join("f"), pattern(2 * BLOCK, 3)).expect("write");
    take_snapshot(&mount, "s");
    wait_completed(&mount, "s");
    let mp = mount.path().to_str().expect("utf-8").to_owned();
    assert_clean(verify(&["--mount", &mp, "--deep"], &[]));
    // The mountpoint as an argument, as `snapfs status` takes it.
    assert_clean(verify(&[&mp], &[]));
    let (code, text) = verify(&["--mount", &mp, "--repair"], &[]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("unmount it before --repair"), "{text}");
    mount.unmount();
}

#[test]
fn no_volume_is_an_error_not_a_verdict() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (code, text) = verify_data(dir.path(), &[]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("no snapfs volume here"), "{text}");
    assert!(
        fs::read_dir(dir.path()).expect("list").next().is_none(),
        "verify created nothing"
    );
    let (code, text) = verify(&["--store", "file:///nonexistent/snapfs-store"], &[]);
    assert_eq!(code, 2, "{text}");
}

#[test]
fn a_volume_made_from_a_snapshot_checks_the_blocks_it_shares_in_the_origin_store() {
    let mut origin = Mount::new();
    fs::write(origin.path().join("shared"), pattern(2 * BLOCK, 8)).expect("write");
    take_snapshot(&origin, "base");
    wait_completed(&origin, "base");
    origin.unmount();
    let origin_store = origin.data_dir().join("store");

    let from = format!("file://{}@base", origin_store.display());
    let mut copy = Mount::with_args(&["--from", &from]);
    fs::write(copy.path().join("own"), pattern(BLOCK, 9)).expect("write");
    take_snapshot(&copy, "next");
    wait_completed(&copy, "next");
    copy.unmount();
    let (code, text) = verify_data(copy.data_dir(), &["--deep"]);
    assert_clean((code, text.clone()));
    assert!(
        text.contains("3 stored blocks"),
        "two shared, one own: {text}"
    );

    for pack in fs::read_dir(origin_store.join("packs")).expect("origin packs") {
        fs::remove_file(pack.expect("entry").path()).expect("remove");
    }
    let found = verify_data(copy.data_dir(), &[]);
    assert_problem(
        &found,
        "blocks shared with the volume's origin that are missing from file://",
    );
    assert!(
        !found.1.contains("recorded as stored that are missing"),
        "the copy's own store is whole: {}",
        found.1
    );
}

#[test]
fn a_damaged_catalog_file_is_a_finding_not_a_crash() {
    let mut mount = Mount::new();
    volume_with_snapshots(&mut mount);
    let db = mount.data_dir().join("catalog.db");
    let mut bytes = fs::read(&db).expect("read catalog");
    assert!(bytes.len() >= 4 * 4096, "catalog of {} bytes", bytes.len());
    // Pages 2 and 3 (tables and indexes) become noise; the header stays readable.
    for (i, byte) in bytes[4096..3 * 4096].iter_mut().enumerate() {
        *byte = (i * 7 + 13) as u8;
    }
    fs::write(&db, &bytes).expect("damage catalog");
    let (code, text) = verify_data(mount.data_dir(), &[]);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("PROBLEM: the catalog fails SQLite's integrity check")
            || text.contains("PROBLEM: the catalog cannot be read whole"),
        "{text}"
    );
}

/// Restores snapshot "two" of `volume_with_snapshots` from the store at `url` alone
/// (`vars` its server's variables) into `dest`, and checks every file byte for byte.
fn restores_exactly(url: &str, vars: &[(String, String)], dest: &Path) {
    let mut cmd = snapfs();
    cmd.args(["restore", "--store", url, "two"]).arg(dest);
    for (key, value) in vars {
        cmd.env(key, value);
    }
    let output = run(&mut cmd);
    assert!(output.status.success(), "{output:?}");
    let big = pattern(3 * BLOCK + 100, 1);
    let read = |path: &str| fs::read(dest.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
    assert_bytes_eq(&read("big"), &big, "restored big");
    assert_bytes_eq(&read("src/link"), &big, "restored link");
    assert_bytes_eq(
        &read("src/deep/changed"),
        &pattern(BLOCK + 7, 2),
        "restored changed",
    );
    assert_eq!(read("src/deep/er/small"), b"small file");
}

/// The packs an index object lists, from its stored bytes (unsealed).
fn decode_index(object: &[u8]) -> Vec<(PackId, PackListing)> {
    let encoded = zstd::decode_all(object).expect("an index object is a zstd frame");
    manifest::decode_index(&encoded).expect("an index object decodes")
}

/// A volume with snapshots (`volume_with_snapshots`) in `mount`: its data dir, its
/// `file://` store's dir and URL.
fn local_store_volume(mount: &mut Mount) -> (PathBuf, PathBuf, String) {
    volume_with_snapshots(mount);
    let data = mount.data_dir().to_owned();
    let store = data.join("store");
    let url = format!("file://{}", store.display());
    (data, store, url)
}

#[test]
fn a_lost_index_is_found_and_rebuilt_from_the_packs() {
    let mut mount = Mount::new();
    let (data, store, url) = local_store_volume(&mut mount);
    let index_dir = store.join("index");
    let lost = dir_names(&index_dir);
    assert!(!lost.is_empty(), "the uploads wrote index objects");
    for name in &lost {
        fs::remove_file(index_dir.join(name)).expect("remove index");
    }
    let packs = dir_names(&store.join("packs")).len();

    // The packs are all there: only a reader of the bucket cannot find their blocks.
    let found = verify_data(&data, &[]);
    assert_problem(&found, "blocks no index object in file://");
    assert!(
        lost.iter().any(|name| found
            .1
            .contains(&format!("the catalog says index/{name} lists it"))),
        "{}",
        found.1
    );
    assert!(
        !found.1.contains("recorded as stored that are missing"),
        "{}",
        found.1
    );
    assert_problem(&found, "trees no index object in file://");
    // With no index, a reader of the bucket finds neither the blocks nor the trees (they
    // travel in packs too): the manifests no longer read back whole.
    assert_problem(
        &verify(&["--store", &url], &[]),
        "manifests that cannot be read back whole",
    );

    let (code, text) = verify_data(&data, &["--repair"]);
    assert_eq!(code, 0, "repair should leave the volume whole:\n{text}");
    assert!(
        text.contains(&format!(
            "repaired: rebuilt 1 index objects listing {packs} packs\n"
        )),
        "{text}"
    );
    assert!(!text.contains("uploaded"), "no block was lost: {text}");
    assert!(!text.contains("deleted"), "nothing to delete: {text}");
    let rebuilt = dir_names(&index_dir);
    assert_eq!(rebuilt.len(), 1, "{rebuilt:?}");
    assert!(!lost.contains(&rebuilt[0]), "a new name: {rebuilt:?}");
    let listed = decode_index(&fs::read(index_dir.join(&rebuilt[0])).expect("read index"));
    assert_eq!(listed.len(), packs);
    assert_clean(verify_data(&data, &["--deep"]));
    assert_clean(verify(&["--store", &url, "--deep"], &[]));
    restores_exactly(&url, &[], &mount.scratch("restored"));

    // A mount serves the deletion queue (the lost names, and the new one queued before
    // its PUT) before it uploads a snapshot: the new index is needed and stays.
    big_reads_back_after_repair(&mut mount);
    fs::write(mount.path().join("later"), pattern(BLOCK, 4)).expect("write later");
    take_snapshot(&mount, "three");
    wait_completed(&mount, "three");
    mount.unmount();
    let after = dir_names(&index_dir);
    assert_eq!(after.len(), 2, "{after:?}");
    assert!(after.contains(&rebuilt[0]), "{after:?}");
    assert_clean(verify_data(&data, &["--deep"]));
}

#[test]
fn a_damaged_index_in_garage_is_found_and_rebuilt() {
    let env = S3Env::garage();
    let prefix = unique_prefix("verify-index");
    let mut mount = env.mount_store(&prefix, &[]);
    volume_with_snapshots(&mut mount);
    let vars = env.vars();
    let data = mount.data_dir().to_str().expect("utf-8").to_owned();
    let client = env.client();
    let index_prefix = format!("{prefix}index/");
    let before: BTreeSet<String> = client
        .list(&index_prefix)
        .into_iter()
        .map(|(key, _)| key)
        .collect();
    let victim = before.first().expect("an index object").clone();
    let mut object = client.get(&victim).expect("the index object");
    let listed = decode_index(&object).len();
    let middle = object.len() / 2;
    for byte in &mut object[middle..middle + 4] {
        *byte ^= 0x5a;
    }
    client.put(&victim, &object);
    let name = victim.strip_prefix(&prefix).expect("under the prefix");

    let found = verify(&["--data", &data], &vars);
    assert_problem(&found, "index objects that cannot be read");
    assert!(found.1.contains(&format!("{name}: corrupt")), "{}", found.1);
    assert_problem(&found, "blocks no index object in s3://");

    let (code, text) = verify(&["--data", &data, "--repair"], &vars);
    assert_eq!(code, 0, "repair should leave the volume whole:\n{text}");
    assert!(
        text.contains(&format!(
            "repaired: rebuilt 1 index objects listing {listed} packs\n"
        )),
        "{text}"
    );
    assert!(
        text.contains("repaired: deleted 1 index objects nothing needs"),
        "{text}"
    );
    let after: BTreeSet<String> = client
        .list(&index_prefix)
        .into_iter()
        .map(|(key, _)| key)
        .collect();
    assert!(!after.contains(&victim), "{after:?}");
    assert_eq!(after.len(), before.len(), "one for one: {after:?}");
    assert_clean(verify(&["--data", &data, "--deep"], &vars));
    assert_clean(verify(&["--store", &env.url(&prefix), "--deep"], &vars));
    restores_exactly(&env.url(&prefix), &vars, &mount.scratch("restored"));
}

#[test]
fn an_index_entry_beyond_its_pack_is_found_and_rebuilt() {
    let mut mount = Mount::new();
    let (data, store, url) = local_store_volume(&mut mount);
    let index_dir = store.join("index");
    let name = dir_names(&index_dir).into_iter().next().expect("an index");
    let path = index_dir.join(&name);
    // Forged: the pack's frames said to run on past its trailer, and its last block
    // placed out there, where the pack has no frame.
    let mut packs = decode_index(&fs::read(&path).expect("read index"));
    let (pack, listing) = packs.first_mut().expect("a pack listed");
    let pack = pack.to_string();
    listing.data_length += 1 << 16;
    let last = listing.blocks.last_mut().expect("a block listed");
    last.offset = listing.data_length - u64::from(last.length);
    let moved = last.hash.to_hex();
    let forged = manifest::compress(&manifest::encode_index(&packs), 3).expect("zstd");
    fs::write(&path, forged).expect("write forged index");

    let found = verify_data(&data, &[]);
    assert_problem(&found, "blocks no index object in file://");
    assert!(
        found.1.contains(&format!("{moved} in packs/{pack}")),
        "{}",
        found.1
    );
    assert_problem(
        &found,
        "index objects that give a pack another length than the catalog",
    );
    let from_bucket = verify(&["--store", &url, "--deep"], &[]);
    assert_problem(&from_bucket, "index entries that do not match their pack");
    assert!(
        from_bucket
            .1
            .contains(&format!("packs/{pack} (index/{name}): ")),
        "{}",
        from_bucket.1
    );

    let (code, text) = verify_data(&data, &["--repair"]);
    assert_eq!(code, 0, "repair should leave the volume whole:\n{text}");
    assert!(
        text.contains(&format!(
            "repaired: rebuilt 1 index objects listing {} packs\n",
            packs.len()
        )),
        "{text}"
    );
    assert!(
        text.contains("repaired: deleted 1 index objects nothing needs"),
        "{text}"
    );
    assert!(!dir_names(&index_dir).contains(&name));
    assert_clean(verify_data(&data, &["--deep"]));
    assert_clean(verify(&["--store", &url, "--deep"], &[]));
    restores_exactly(&url, &[], &mount.scratch("restored"));
}
