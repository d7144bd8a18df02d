//! Volumes made from another volume's snapshot (`snapfs mount --from URL@SNAPSHOT`), like
//! EBS volumes from snapshots: usable at once, blocks fetched on first read, `hydrate`,
//! their own snapshots sharing the source's blocks, the source never changed.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::s3::{S3Env, unique_prefix};
use common::*;

fn keys(s3: &S3Env, prefix: &str) -> BTreeSet<String> {
    s3.client()
        .list(prefix)
        .into_iter()
        .map(|(key, _)| key)
        .collect()
}

/// The tree a restore or a new volume must reproduce (the root's own times and directory
/// sizes aside: they differ by design between a snapshot root, a live root and ext4).
fn contents(root: &Path) -> Vec<(std::path::PathBuf, u32, u64, Vec<u8>)> {
    tree_state(root)
        .into_iter()
        .filter(|(path, _)| !path.as_os_str().is_empty())
        .map(|(path, node)| {
            (
                path,
                node.mode,
                node.size * u64::from(node.mode & libc::S_IFMT == libc::S_IFREG),
                node.content,
            )
        })
        .collect()
}

#[test]
fn a_volume_from_a_snapshot_is_usable_at_once_and_shares_the_source_blocks() {
    let s3 = S3Env::garage();
    let source_prefix = unique_prefix("lazy-source");
    let copy_prefix = unique_prefix("lazy-copy");

    // The source volume: some files, a snapshot in the store.
    let mut source = s3.mount_store(&source_prefix, &[]);
    fs::create_dir_all(source.path().join("dir/sub")).expect("mkdir");
    fs::write(source.path().join("dir/big"), pattern(10 * BLOCK + 5, 1)).expect("write");
    fs::write(source.path().join("dir/sub/small"), b"small file").expect("write");
    fs::hard_link(
        source.path().join("dir/big"),
        source.path().join("big-link"),
    )
    .expect("link");
    std::os::unix::fs::symlink("dir/sub/small", source.path().join("sym")).expect("symlink");
    fs::create_dir(source.path().join(".snapshots/base")).expect("snapshot");
    wait_completed(&source, "base");
    let expected = contents(&source.path().join(".snapshots/base"));
    source.unmount();
    let source_keys = keys(&s3, &source_prefix);

    // The new volume: metadata at once, no block local until read.
    let from = format!("{}@base", s3.url(&source_prefix));
    let mut copy = s3.mount(&["--from", &from, "--store", &s3.url(&copy_prefix)]);
    assert!(
        block_files(copy.data_dir()).is_empty(),
        "no block fetched yet"
    );
    let meta = fs::metadata(copy.path().join("dir/big")).expect("stat");
    assert_eq!(meta.len(), 10 * BLOCK as u64 + 5);
    assert_eq!(
        fs::metadata(copy.path().join("big-link"))
            .expect("stat")
            .nlink(),
        2
    );
    assert_eq!(
        contents(copy.path()),
        expected,
        "the live tree is the snapshot"
    );
    assert!(
        !block_files(copy.data_dir()).is_empty(),
        "reads fetched blocks"
    );

    // It takes its own snapshots; only what it adds goes to its own prefix.
    let added = pattern(2 * BLOCK, 2);
    fs::write(copy.path().join("added"), &added).expect("write");
    fs::create_dir(copy.path().join(".snapshots/next")).expect("snapshot");
    wait_completed(&copy, "next");
    let copy_blocks: Vec<String> = packed_in_bucket(&s3.client(), &copy_prefix)
        .into_keys()
        .collect();
    let added_hashes: BTreeSet<String> = added
        .chunks(BLOCK)
        .map(|c| snapfs::blocks::BlockHash::of(c).to_hex())
        .collect();
    assert_eq!(
        copy_blocks.into_iter().collect::<BTreeSet<_>>(),
        added_hashes,
        "shared blocks are not sent again"
    );
    assert_eq!(
        keys(&s3, &source_prefix),
        source_keys,
        "the source is never changed"
    );

    // Restoring the new volume's snapshot from its store alone reads the shared blocks
    // from the origin.
    let dest = copy.scratch("restored");
    let out = s3.restore(&s3.url(&copy_prefix), "next", &dest, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_bytes_eq(
        &fs::read(dest.join("dir/big")).expect("read"),
        &pattern(10 * BLOCK + 5, 1),
        "a shared file restored from the new volume's store",
    );
    assert_bytes_eq(
        &fs::read(dest.join("added")).expect("read"),
        &added,
        "its own file",
    );

    // A remount keeps the origin; --from on a used data dir is refused.
    copy.set_args(&["--store", &s3.url(&copy_prefix)]);
    copy.remount();
    assert_eq!(
        fs::read(copy.path().join("dir/sub/small")).expect("read"),
        b"small file"
    );
    copy.unmount();
    let mut cmd = mount_cmd(copy.path(), copy.data_dir());
    s3.apply(&mut cmd);
    cmd.args(["--from", "s3://other-bucket/x@y"]);
    let out = run(&mut cmd);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs a new data dir"));
}

#[test]
fn hydrate_fetches_every_block_of_the_live_volume() {
    let s3 = S3Env::s3s();
    let source_prefix = unique_prefix("hydrate-source");
    let mut source = s3.mount_store(&source_prefix, &[]);
    let data = pattern(12 * BLOCK, 3);
    fs::write(source.path().join("f"), &data).expect("write");
    fs::write(source.path().join("g"), b"tail").expect("write");
    // A second name of f: the same file, read once.
    fs::hard_link(source.path().join("f"), source.path().join("h")).expect("link");
    fs::create_dir(source.path().join(".snapshots/s")).expect("snapshot");
    wait_completed(&source, "s");
    source.unmount();

    let from = format!("{}@s", s3.url(&source_prefix));
    let copy_prefix = unique_prefix("hydrate-copy");
    let copy = s3.mount(&["--from", &from, "--store", &s3.url(&copy_prefix)]);
    assert!(block_files(copy.data_dir()).is_empty());
    let out = run(snapfs().arg("hydrate").arg(copy.path()));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("hydrated 2 files"));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("hydrated 2 files (3.0 MiB)"),
        "f once, not once per name: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        block_files(copy.data_dir()).len(),
        13,
        "12 blocks of f, 1 of g"
    );
}

#[test]
fn a_missing_source_snapshot_is_a_clear_error() {
    let s3 = S3Env::s3s();
    let mount = Mount::unmounted();
    let mut cmd = mount_cmd(mount.path(), mount.data_dir());
    s3.apply(&mut cmd);
    cmd.args([
        "--from",
        &format!("{}@nope", s3.url(&unique_prefix("empty"))),
    ]);
    let out = run(&mut cmd);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--from"), "{stderr}");
    assert!(!mount.is_mounted());
}

#[test]
fn a_read_only_mount_follows_the_store_another_volume_writes() {
    let s3 = S3Env::garage();
    let prefix = unique_prefix("follow");
    let writer = s3.mount_store(&prefix, &[]);
    fs::create_dir(writer.path().join("d")).expect("mkdir");
    fs::write(writer.path().join("d/f"), pattern(3 * BLOCK, 4)).expect("write");
    fs::create_dir(writer.path().join(".snapshots/one")).expect("snapshot");
    wait_completed(&writer, "one");
    let before = keys(&s3, &prefix);

    let reader = s3.mount(&[
        "--store",
        &s3.url(&prefix),
        "--read-only",
        "--follow-interval",
        "1",
    ]);
    assert_eq!(
        contents(&reader.path().join(".snapshots/one")),
        contents(&writer.path().join(".snapshots/one"))
    );
    assert_eq!(
        contents(reader.path()),
        contents(&writer.path().join(".snapshots/one"))
    );
    assert_eq!(
        keys(&s3, &prefix),
        before,
        "the reader writes nothing to the store"
    );
    assert_eq!(
        errno(fs::write(reader.path().join("new"), b"x")),
        libc::EROFS
    );
    assert_eq!(
        errno(fs::create_dir(reader.path().join(".snapshots/mine"))),
        libc::EROFS
    );

    // The writer goes on: a change, a new snapshot, a deleted one.
    fs::write(writer.path().join("d/f"), b"changed").expect("write");
    fs::write(writer.path().join("g"), b"new file").expect("write");
    fs::create_dir(writer.path().join(".snapshots/two")).expect("snapshot");
    wait_completed(&writer, "two");
    fs::remove_dir(writer.path().join(".snapshots/one")).expect("rmdir");
    let deadline = Instant::now() + Duration::from_secs(30);
    while reader.path().join(".snapshots/one").exists()
        || !reader.path().join(".snapshots/two").exists()
    {
        assert!(Instant::now() < deadline, "the reader did not follow");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        fs::read(reader.path().join(".snapshots/two/d/f")).expect("read"),
        b"changed"
    );
    assert_eq!(
        fs::read(reader.path().join("g")).expect("read"),
        b"new file"
    );
    assert_eq!(
        fs::read(reader.path().join("d/f")).expect("read"),
        b"changed"
    );

    // A rename there is a rename here: same content, the old name gone.
    fs::rename(
        writer.path().join(".snapshots/two"),
        writer.path().join(".snapshots/second"),
    )
    .expect("rename snapshot");
    let deadline = Instant::now() + Duration::from_secs(60);
    while reader.path().join(".snapshots/two").exists()
        || !reader.path().join(".snapshots/second").exists()
    {
        assert!(
            Instant::now() < deadline,
            "the reader did not follow the rename"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        fs::read(reader.path().join(".snapshots/second/d/f")).expect("read"),
        b"changed"
    );

    // With no snapshot left there, the live tree is empty (the writer's GC may free the
    // blocks it showed).
    fs::remove_dir(writer.path().join(".snapshots/second")).expect("rmdir the last");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !dir_names(reader.path()).is_empty() || reader.path().join("g").exists() {
        assert!(
            Instant::now() < deadline,
            "the reader did not empty its live tree: {:?}",
            dir_names(reader.path())
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(dir_names(&reader.path().join(".snapshots")).is_empty());
}

#[test]
fn a_volume_is_made_from_a_snapshot_named_with_bytes_that_are_not_utf8() {
    use std::ffi::{OsStr, OsString};
    use std::os::unix::ffi::OsStrExt;
    let s3 = S3Env::s3s();
    let source_prefix = unique_prefix("from-bytes-source");
    let mut source = s3.mount_store(&source_prefix, &[]);
    fs::write(source.path().join("f"), pattern(BLOCK + 3, 41)).expect("write");
    let name = OsStr::from_bytes(b"v\xe9");
    fs::create_dir(source.path().join(".snapshots").join(name)).expect("mkdir .snapshots/v\\351");
    fs::write(source.path().join("f"), b"later").expect("write");
    // Uploads go oldest first: once this one completes, so has v\351.
    take_snapshot(&source, "after");
    wait_completed(&source, "after");
    source.unmount();

    let mut from = OsString::from(format!("{}@", s3.url(&source_prefix)));
    from.push(name);
    let copy_store = s3.url(&unique_prefix("from-bytes-copy"));
    let args = [
        OsStr::new("--from"),
        &from,
        OsStr::new("--store"),
        OsStr::new(&copy_store),
    ];
    let mut copy = s3.mount(&args);
    assert_bytes_eq(
        &fs::read(copy.path().join("f")).expect("read"),
        &pattern(BLOCK + 3, 41),
        "f as v\\351 holds it",
    );
    // A remount with the same --from is the same volume, not a new one refused.
    copy.remount();
    assert_bytes_eq(
        &fs::read(copy.path().join("f")).expect("read"),
        &pattern(BLOCK + 3, 41),
        "f after the remount",
    );
    copy.unmount();

    // A name that is not there is named as listings show it.
    let fresh = Mount::unmounted();
    let mut cmd = mount_cmd(fresh.path(), fresh.data_dir());
    s3.apply(&mut cmd);
    let mut missing = OsString::from(format!("{}@", s3.url(&source_prefix)));
    missing.push(OsStr::from_bytes(b"w\xe9"));
    let out = run(cmd.arg("--from").arg(&missing));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("w\\351"), "{stderr}");
    assert!(!fresh.is_mounted());
}
