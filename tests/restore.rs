//! `snapfs restore` and `snapfs snapshot list --store`, end to end: trees built through real
//! mounts, restored beside the mount or from a real S3 bucket alone (Garage and s3s-fs), and
//! compared node by node; DEST rules; hostile buckets crafted object by object (nothing may
//! be written outside DEST, every bad object is a clear error); corrupt blocks (the file is
//! named, left out, and everything else restored).

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::s3::{Fault, FaultProxy, S3Client, S3Env, unique_prefix};
use common::*;
use snapfs::blocks::BlockHash;
use snapfs::catalog::{Attrs, Kind};
use snapfs::manifest::{self, Content, Entry, SnapshotManifest};

// ---------------------------------------------------------------------------------------
// Mounts, snapshots, commands
// ---------------------------------------------------------------------------------------

/// `snapfs restore WHAT DEST --data DATA`, the volume's data dir named directly.
fn restore_data(mount: &Mount, what: &str, dest: &Path) -> Output {
    run(snapfs()
        .arg("restore")
        .arg(what)
        .arg(dest)
        .arg("--data")
        .arg(mount.data_dir()))
}

/// `snapfs restore WHAT DEST --mount MP [extra]`
fn restore_local(mount: &Mount, what: &str, dest: &Path, extra: &[&str]) -> Output {
    run(snapfs()
        .arg("restore")
        .arg(what)
        .arg(dest)
        .arg("--mount")
        .arg(mount.path())
        .args(extra))
}

/// `snapfs restore MP WHAT DEST [extra]`, the mountpoint first.
fn restore_at(mount: &Mount, what: &str, dest: &Path, extra: &[&str]) -> Output {
    run(snapfs()
        .arg("restore")
        .arg(mount.path())
        .arg(what)
        .arg(dest)
        .args(extra))
}

/// `snapfs restore --store URL WHAT DEST [extra]` with only the AWS environment.
fn restore_store(s3: &S3Env, url: &str, what: &str, dest: &Path, extra: &[&str]) -> Output {
    s3.restore(url, what, dest, extra)
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[track_caller]
fn assert_ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: exit {}\nstdout: {}\nstderr: {}",
        out.status,
        stdout(out),
        stderr(out)
    );
}

/// Fails with a non-zero status and a message containing every one of `needles`.
#[track_caller]
fn assert_fails_with(out: &Output, needles: &[&str], what: &str) {
    let err = stderr(out);
    assert!(
        !out.status.success(),
        "{what}: expected a failure, got exit {}\nstdout: {}\nstderr: {err}",
        out.status,
        stdout(out)
    );
    for needle in needles {
        assert!(
            err.contains(needle),
            "{what}: stderr does not mention {needle:?}:\n{err}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Trees and their comparison
// ---------------------------------------------------------------------------------------

fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

/// A varied tree in `root`: nested dirs, random and text files (empty, one byte, one
/// block, multi-block), a sparse file with a six-block hole, a hard link across dirs,
/// relative, absolute and dangling symlinks, a fifo, xattrs on files and dirs, setuid,
/// sticky and private modes, foreign owners and explicit times.
fn build_tree(root: &Path) {
    let p = |rel: &str| root.join(rel);
    for dir in ["a", "a/b", "a/b/c", "empty", "sticky"] {
        fs::create_dir(p(dir)).expect("mkdir");
    }
    fs::write(p("a/random"), pattern(3 * BLOCK + 777, 11)).expect("write");
    fs::write(p("a/b/text.txt"), text(40_000)).expect("write");
    fs::write(p("a/b/c/deep"), b"x").expect("write");
    fs::write(p("empty-file"), b"").expect("write");
    fs::write(p("one-block"), pattern(BLOCK, 12)).expect("write");
    fs::write(p("sticky/note"), b"in a sticky dir\n").expect("write");
    let sparse = create(&p("sparse"));
    sparse
        .write_all_at(&pattern(BLOCK, 13), 0)
        .expect("sparse head");
    sparse
        .write_all_at(&pattern(1000, 14), 7 * BLOCK as u64)
        .expect("sparse tail");
    drop(sparse);
    fs::write(p("a/hard"), pattern(BLOCK + 5, 15)).expect("write");
    fs::hard_link(p("a/hard"), p("hard-too")).expect("link");
    symlink("a/b/text.txt", p("rel-link")).expect("symlink");
    symlink("/etc/hostname", p("a/abs-link")).expect("symlink");
    symlink("../nowhere/missing", p("a/b/dangling")).expect("symlink");
    mkfifo(&p("a/fifo"), 0o640).expect("mkfifo");
    setxattr(&p("a/random"), "user.color", b"blue", 0).expect("xattr");
    setxattr(&p("a/b"), "user.dir", &[0, 1, 2, 255], 0).expect("xattr");
    setxattr(&p("sparse"), "user.long", &pattern(3000, 16), 0).expect("xattr");

    fs::write(p("suid"), b"#!/bin/sh\necho hi\n").expect("write");
    std::os::unix::fs::chown(p("suid"), Some(1234), Some(5678)).expect("chown");
    chmod(&p("suid"), 0o4755);
    std::os::unix::fs::chown(p("a/b/text.txt"), Some(1234), Some(5678)).expect("chown");
    chmod(&p("a/b/text.txt"), 0o640);
    chmod(&p("a/random"), 0o755);
    std::os::unix::fs::chown(p("a/b"), Some(1234), Some(5678)).expect("chown");
    chmod(&p("a/b"), 0o750);
    chmod(&p("sticky"), 0o1777);
    chmod(&p("empty"), 0o700);
    std::os::unix::fs::lchown(p("rel-link"), Some(1234), Some(5678)).expect("lchown");

    let nodes = [
        "a/random",
        "a/b/text.txt",
        "a/b/c/deep",
        "empty-file",
        "one-block",
        "sticky/note",
        "sparse",
        "a/hard",
        "rel-link",
        "a/abs-link",
        "a/b/dangling",
        "a/fifo",
        "suid",
    ];
    for (i, node) in nodes.iter().enumerate() {
        let i = i as i64;
        utimens(
            &p(node),
            (1_600_000_000 + i, 5),
            (1_500_000_000 + i, 123_456_789),
        )
        .unwrap_or_else(|e| panic!("utimens {node}: {e}"));
    }
    // Directories last, deepest first: their contents change their mtime.
    for (i, dir) in ["a/b/c", "a/b", "a", "empty", "sticky"].iter().enumerate() {
        let i = i as i64;
        utimens(
            &p(dir),
            (1_600_000_100, 0),
            (1_400_000_000 + i, 987_654_321),
        )
        .unwrap_or_else(|e| panic!("utimens {dir}: {e}"));
    }
}

/// The snapshot really holds what build_tree made (so comparing against it means something).
#[track_caller]
fn assert_varied(tree: &Tree) {
    let node = |rel: &str| {
        tree.get(Path::new(rel))
            .unwrap_or_else(|| panic!("{rel} missing from the snapshot: {:?}", tree.keys()))
    };
    assert_eq!(tree.len(), 20, "{:?}", tree.keys());
    assert_eq!(node("suid").mode & 0o7777, 0o4755);
    assert_eq!((node("suid").uid, node("suid").gid), (1234, 5678));
    assert_eq!(node("sticky").mode & 0o7777, 0o1777);
    assert_eq!((node("a/b").uid, node("a/b").mode & 0o7777), (1234, 0o750));
    assert_eq!(node("a/b").xattrs.len(), 1);
    assert_eq!(node("a/b/c").mtime, (1_400_000_000, 987_654_321));
    assert_eq!(node("a/hard").nlink, 2);
    assert_eq!(node("a/b/dangling").content, b"../nowhere/missing");
    assert_eq!(node("a/fifo").mode & libc::S_IFMT, libc::S_IFIFO);
    assert_eq!(node("sparse").size, 7 * BLOCK as u64 + 1000);
    assert_eq!(node("a/random").content.len(), 3 * BLOCK + 777);
}

/// Changes the live tree after a snapshot, so a restore must not see the live volume.
fn modify_tree(root: &Path) {
    fs::write(root.join("a/random"), b"replaced").expect("rewrite");
    fs::remove_file(root.join("a/b/c/deep")).expect("rm");
    fs::remove_file(root.join("hard-too")).expect("rm link");
    fs::write(root.join("new-file"), b"after the snapshot").expect("write");
    chmod(&root.join("a/b/text.txt"), 0o600);
    fs::remove_dir(root.join("empty")).expect("rmdir");
}

type Tree = BTreeMap<PathBuf, NodeState>;

/// What a restore must reproduce: the root's mtime (a snapshot's root shows the
/// snapshot's creation time), its xattrs (a snapshot's root shows user.snapfs.*) and
/// directory sizes and link counts (they differ between snapfs and ext4) aside.
fn comparable(mut tree: Tree, whole_snapshot: bool) -> Tree {
    for (path, node) in tree.iter_mut() {
        if node.mode & libc::S_IFMT == libc::S_IFDIR {
            node.size = 0;
            node.nlink = 0;
        }
        if whole_snapshot && path.as_os_str().is_empty() {
            node.mtime = (0, 0);
            node.xattrs.clear();
        }
    }
    tree
}

/// Node by node; file contents by their first difference.
#[track_caller]
fn assert_trees_eq(actual: &Tree, expected: &Tree, what: &str) {
    let actual_paths: Vec<&PathBuf> = actual.keys().collect();
    let expected_paths: Vec<&PathBuf> = expected.keys().collect();
    assert_eq!(actual_paths, expected_paths, "{what}: the paths");
    for (path, want) in expected {
        let got = &actual[path];
        assert_bytes_eq(
            &got.content,
            &want.content,
            &format!("{what}: {}", path.display()),
        );
        let meta = |n: &NodeState| NodeState {
            content: Vec::new(),
            ..n.clone()
        };
        assert_eq!(meta(got), meta(want), "{what}: {}", path.display());
    }
}

/// tree_state of one file, as a one-entry tree keyed by its name.
fn file_state(path: &Path) -> Tree {
    let name = PathBuf::from(path.file_name().expect("a file name"));
    let mut parent = tree_state(path.parent().expect("a parent"));
    let node = parent.remove(&name).expect("the file is there");
    Tree::from([(name, node)])
}

/// The names in `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()))
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// `"key":N` occurs in `json`.
#[track_caller]
fn assert_json_count(json: &str, key: &str, n: u64) {
    let needle = format!("\"{key}\":{n}");
    assert!(
        json.contains(&needle),
        "expected {needle} in the JSON summary: {json}"
    );
}

// ---------------------------------------------------------------------------------------
// 1. Round trip beside a mount
// ---------------------------------------------------------------------------------------

#[test]
fn a_snapshot_restores_beside_its_mount_exactly() {
    let mount = Mount::new();
    build_tree(mount.path());
    let snap = take_snapshot(&mount, "snap");
    modify_tree(mount.path());
    let expected = comparable(tree_state(&snap), true);
    assert_varied(&expected);

    let dest = mount.scratch("out").join("dest");
    let out = restore_local(&mount, "snap", &dest, &[]);
    assert_ok(&out, "restore snap --mount");
    assert_trees_eq(
        &comparable(tree_state(&dest), true),
        &expected,
        "restored beside the mount",
    );

    // The root's own mode and owner, and the things tree_state cannot see.
    let root = fs::symlink_metadata(&dest).expect("stat dest");
    let snap_root = fs::symlink_metadata(&snap).expect("stat snapshot root");
    assert_eq!(root.mode(), snap_root.mode());
    let hard = fs::metadata(dest.join("a/hard")).expect("stat");
    let hard_too = fs::metadata(dest.join("hard-too")).expect("stat");
    assert_eq!(hard.ino(), hard_too.ino(), "hard links share an inode");
    assert_eq!(hard.nlink(), 2);
    let sparse = fs::metadata(dest.join("sparse")).expect("stat");
    assert_eq!(sparse.len(), 7 * BLOCK as u64 + 1000);
    assert!(
        sparse.blocks() * 512 < 2 * BLOCK as u64,
        "the hole stays a hole: {} bytes on disk",
        sparse.blocks() * 512
    );
    assert!(
        fs::symlink_metadata(dest.join("a/fifo"))
            .expect("stat")
            .file_type()
            .is_fifo()
    );
    assert_eq!(
        fs::read_link(dest.join("a/abs-link")).expect("readlink"),
        Path::new("/etc/hostname")
    );
    assert_eq!(
        fs::symlink_metadata(dest.join("suid"))
            .expect("stat")
            .mode()
            & 0o7777,
        0o4755,
        "setuid survives the chown"
    );
    // The live volume was not touched by the restore, and is not what was restored.
    assert_eq!(
        fs::read(mount.path().join("a/random")).expect("read"),
        b"replaced"
    );
    assert!(!dest.join("new-file").exists());
}

// ---------------------------------------------------------------------------------------
// 2. From the bucket alone
// ---------------------------------------------------------------------------------------

#[test]
fn a_snapshot_restores_from_the_bucket_alone_on_both_servers() {
    for (server, s3) in S3Env::all() {
        let prefix = unique_prefix(&format!("restore-{server}"));
        let url = s3.url(&prefix);
        let mut mount = s3.mount_store(&prefix, &[]);
        build_tree(mount.path());
        let snap = take_snapshot(&mount, "snap");
        modify_tree(mount.path());
        wait_completed(&mount, "snap");
        let expected = comparable(tree_state(&snap), true);
        assert_varied(&expected);
        mount.unmount();
        fs::remove_dir_all(mount.data_dir()).expect("delete the data dir");

        let dest = mount.scratch(&format!("out-{server}")).join("dest");
        let out = restore_store(&s3, &url, "snap", &dest, &[]);
        assert_ok(&out, &format!("{server}: restore --store"));
        assert_trees_eq(
            &comparable(tree_state(&dest), true),
            &expected,
            &format!("{server}: restored from the bucket"),
        );
        let hard = fs::metadata(dest.join("a/hard")).expect("stat");
        let hard_too = fs::metadata(dest.join("hard-too")).expect("stat");
        assert_eq!(hard.ino(), hard_too.ino(), "{server}: hard links");
        let sparse = fs::metadata(dest.join("sparse")).expect("stat");
        assert!(
            sparse.blocks() * 512 < 2 * BLOCK as u64,
            "{server}: sparse file takes {} bytes",
            sparse.blocks() * 512
        );
        assert!(!mount.data_dir().exists(), "restore made no data dir");

        let mut list = snapfs();
        list.args(["snapshot", "list", "--store", &url]);
        s3.apply(&mut list);
        let out = run(&mut list);
        assert_ok(&out, "snapshot list --store");
        let listing = stdout(&out);
        assert!(
            listing
                .lines()
                .any(|l| l.split_whitespace().next() == Some("snap")),
            "{server}: {listing}"
        );
        let mut list = snapfs();
        list.args(["snapshot", "list", "--store", &url, "--json"]);
        s3.apply(&mut list);
        let out = run(&mut list);
        assert_ok(&out, "snapshot list --store --json");
        let json = stdout(&out);
        for needle in ["\"name\":\"snap\"", "\"id\":1,", "\"state\":\"completed\""] {
            assert!(json.contains(needle), "{server}: {needle} in {json}");
        }
        assert_eq!(json.matches("\"name\":").count(), 1, "{server}: {json}");
    }
}

/// Snapshot objects are read many at once: a store's round trips, not their number, set
/// how long a listing (and so a restore from the bucket alone) takes to start.
#[test]
fn a_listing_from_the_bucket_asks_for_its_snapshot_objects_at_once() {
    let s3 = S3Env::garage();
    let prefix = unique_prefix("list-at-once");
    let url = s3.url(&prefix);
    let mount = s3.mount_store(&prefix, &[]);
    let names: Vec<String> = (0..6).map(|i| format!("s{i}")).collect();
    for (i, name) in names.iter().enumerate() {
        fs::write(mount.path().join("f"), format!("version {i}")).expect("write");
        take_snapshot(&mount, name);
    }
    wait_completed(&mount, "s5");
    let (proxy, through) = FaultProxy::for_env(&s3);
    // Every snapshot object's GET waits until the faults change.
    proxy.fault_matching("GET", "/snapshots/", Fault::Stall);
    let mut list = snapfs();
    through.apply(&mut list);
    let listing = Captured::spawn(list.args(["snapshot", "list", "--store", &url, "--json"]));
    let deadline = Instant::now() + Duration::from_secs(10);
    while proxy.counts().1 < names.len() as u64 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let waiting = proxy.counts().1;
    proxy.set_fault(Fault::None);
    let out = listing.finish();
    assert_ok(&out, "snapshot list --store");
    assert_eq!(
        waiting,
        names.len() as u64,
        "snapshot objects asked for before the first was answered"
    );
    let json = stdout(&out);
    let at: Vec<usize> = names
        .iter()
        .map(|name| {
            json.find(&format!("\"name\":\"{name}\""))
                .unwrap_or_else(|| panic!("{name} listed: {json}"))
        })
        .collect();
    assert!(at.windows(2).all(|w| w[0] < w[1]), "oldest first: {json}");
}

/// Range reads of packs through a proxy that mangles every other object GET (bytes
/// flipped, bodies cut short): each bad frame is fetched again, the restore is exact.
#[test]
fn a_restore_through_a_mangling_proxy_is_exact() {
    let s3 = S3Env::garage();
    let prefix = unique_prefix("restore-mangled");
    let mut mount = s3.mount_store(&prefix, &[]);
    build_tree(mount.path());
    let snap = take_snapshot(&mount, "snap");
    wait_completed(&mount, "snap");
    let expected = comparable(tree_state(&snap), true);
    mount.unmount();

    let (proxy, through) = FaultProxy::for_env(&s3);
    for (n, fault) in [
        Fault::Corrupt,
        Fault::Truncate {
            consistent_length: true,
        },
    ]
    .into_iter()
    .enumerate()
    {
        proxy.fail_every(2, fault);
        let dest = mount.scratch(&format!("out-{n}")).join("dest");
        let out = restore_store(&through, &through.url(&prefix), "snap", &dest, &[]);
        assert_ok(&out, &format!("restore through {fault:?}"));
        assert_trees_eq(
            &comparable(tree_state(&dest), true),
            &expected,
            &format!("restored through {fault:?}"),
        );
    }
    assert!(proxy.counts().1 > 0, "the proxy mangled responses");
}

/// `snapfs restore MOUNTPOINT WHAT DEST`: the mountpoint first, as `diff`, `verify` and
/// `snapshot create` take it.
#[test]
fn restore_takes_the_mountpoint_first_as_the_other_commands_do() {
    let mount = Mount::new();
    build_tree(mount.path());
    let snap = take_snapshot(&mount, "snap");
    modify_tree(mount.path());
    let out_dir = mount.scratch("out");

    let dest = out_dir.join("whole");
    let out = restore_at(&mount, "snap", &dest, &[]);
    assert_ok(&out, "restore MOUNTPOINT snap DEST");
    assert_trees_eq(
        &comparable(tree_state(&dest), true),
        &comparable(tree_state(&snap), true),
        "restore MOUNTPOINT snap DEST",
    );
    let one = out_dir.join("one.txt");
    let out = restore_at(&mount, "snap:a/b/text.txt", &one, &[]);
    assert_ok(&out, "restore MOUNTPOINT snap:PATH DEST");
    assert_eq!(
        fs::read(&one).expect("read"),
        fs::read(snap.join("a/b/text.txt")).expect("read")
    );

    // A mountpoint and --data name the volume twice: refused, nothing restored.
    let twice = out_dir.join("twice");
    let data_dir = mount.data_dir().to_str().expect("utf-8 data dir");
    let out = restore_at(&mount, "snap", &twice, &["--data", data_dir]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("cannot be used with"),
        "{}",
        stderr(&out)
    );
    assert!(!twice.exists());
}

// ---------------------------------------------------------------------------------------
// 3. Paths inside a snapshot
// ---------------------------------------------------------------------------------------

#[test]
fn a_directory_or_a_file_inside_a_snapshot_restores_alone() {
    let mount = Mount::new();
    build_tree(mount.path());
    let snap = take_snapshot(&mount, "snap");
    modify_tree(mount.path());
    let out_dir = mount.scratch("out");

    // A directory becomes DEST, with its own attributes.
    let dest = out_dir.join("sub");
    assert_ok(
        &restore_local(&mount, "snap:a/b", &dest, &[]),
        "restore snap:a/b",
    );
    assert_trees_eq(
        &comparable(tree_state(&dest), false),
        &comparable(tree_state(&snap.join("a/b")), false),
        "snap:a/b",
    );

    // A file into an existing directory: DEST/NAME.
    let into = out_dir.join("into");
    fs::create_dir(&into).expect("mkdir");
    fs::write(into.join("unrelated"), b"mine").expect("write");
    assert_ok(
        &restore_local(&mount, "snap:a/b/text.txt", &into, &[]),
        "restore a file into a dir",
    );
    assert_eq!(names(&into), ["text.txt", "unrelated"]);
    let want = file_state(&snap.join("a/b/text.txt"));
    assert_trees_eq(
        &file_state(&into.join("text.txt")),
        &want,
        "a file into a dir",
    );
    assert_eq!(fs::read(into.join("unrelated")).expect("read"), b"mine");

    // A file as a new name.
    let renamed = out_dir.join("renamed.txt");
    let out = restore_local(&mount, "snap:a/b/text.txt", &renamed, &[]);
    assert_ok(&out, "restore a file as DEST");
    // The summary counts in words that fit the number.
    assert!(
        stderr(&out).starts_with("restored 1 file, 0 directories, 0 symlinks, 0 hard links ("),
        "{}",
        stderr(&out)
    );
    let got = file_state(&renamed).into_values().collect::<Vec<_>>();
    let want = want.into_values().collect::<Vec<_>>();
    assert_eq!(got.len(), 1);
    assert_bytes_eq(&got[0].content, &want[0].content, "a file as DEST");
    assert_eq!(
        NodeState {
            content: Vec::new(),
            ..got[0].clone()
        },
        NodeState {
            content: Vec::new(),
            ..want[0].clone()
        },
        "a file as DEST"
    );

    // Paths that are not there.
    for path in ["a/nope", "a/random/inside", "nope/deeper"] {
        let dest = out_dir.join("missing");
        let out = restore_local(&mount, &format!("snap:{path}"), &dest, &[]);
        assert_fails_with(&out, &[path], &format!("snap:{path}"));
        assert!(!dest.exists(), "snap:{path} created DEST");
    }
    let out = restore_local(&mount, "nosuch", &out_dir.join("x"), &[]);
    assert_fails_with(&out, &["no snapshot named", "nosuch"], "unknown snapshot");
    assert!(!out_dir.join("x").exists());
}

/// Snapshot names may contain ':' (a time of day): the whole argument names a snapshot
/// if one has that name, else it splits at the first ':' that leaves an existing name.
#[test]
fn snapshot_names_with_colons_restore_whole_and_in_part() {
    let mount = Mount::new();
    fs::create_dir(mount.path().join("d")).expect("mkdir");
    fs::write(mount.path().join("d/f"), b"at ten").expect("write");
    take_snapshot(&mount, "10:00");
    let out = mount.scratch("out");
    assert_ok(
        &restore_local(&mount, "10:00", &out.join("whole"), &[]),
        "10:00",
    );
    assert_eq!(fs::read(out.join("whole/d/f")).expect("read"), b"at ten");
    assert_ok(
        &restore_local(&mount, "10:00:d/f", &out.join("one"), &[]),
        "10:00:d/f",
    );
    assert_eq!(fs::read(out.join("one")).expect("read"), b"at ten");
    assert_fails_with(
        &restore_local(&mount, "11:00:d/f", &out.join("none"), &[]),
        &["no snapshot named 11"],
        "missing snapshot",
    );
}

#[test]
fn paths_and_names_from_the_bucket_alone() {
    let s3 = S3Env::garage();
    let prefix = unique_prefix("restore-paths");
    let url = s3.url(&prefix);
    let mount = s3.mount_store(&prefix, &[]);
    fs::create_dir_all(mount.path().join("a/b")).expect("mkdir");
    fs::write(mount.path().join("a/b/f"), pattern(BLOCK + 3, 20)).expect("write");
    fs::write(mount.path().join("a/file"), b"file").expect("write");
    let snap = take_snapshot(&mount, "snap");
    wait_completed(&mount, "snap");
    let out_dir = mount.scratch("out");

    let dest = out_dir.join("sub");
    assert_ok(
        &restore_store(&s3, &url, "snap:a/b", &dest, &[]),
        "restore --store snap:a/b",
    );
    assert_trees_eq(
        &comparable(tree_state(&dest), false),
        &comparable(tree_state(&snap.join("a/b")), false),
        "snap:a/b from the store",
    );
    for path in ["a/nope", "a/file/inside"] {
        let dest = out_dir.join("missing");
        let out = restore_store(&s3, &url, &format!("snap:{path}"), &dest, &[]);
        assert_fails_with(&out, &[path], &format!("--store snap:{path}"));
        assert!(!dest.exists());
    }
    let out = restore_store(&s3, &url, "nosuch", &out_dir.join("x"), &[]);
    assert_fails_with(&out, &["no snapshot named", "nosuch"], "unknown snapshot");
}

#[test]
fn a_snapshot_named_with_bytes_that_are_not_utf8_restores_shows_and_diffs() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let s3 = S3Env::garage();
    let prefix = unique_prefix("restore-bytes");
    let url = s3.url(&prefix);
    let mount = s3.mount_store(&prefix, &[]);
    let latin1 = OsStr::from_bytes(b"caf\xe9");
    fs::create_dir(mount.path().join("d")).expect("mkdir");
    fs::write(mount.path().join("d").join(latin1), pattern(BLOCK + 5, 31)).expect("write");
    fs::write(mount.path().join("d/plain"), b"plain").expect("write");
    let name = OsStr::from_bytes(b"v\xe9");
    let snap = mount.path().join(".snapshots").join(name);
    fs::create_dir(&snap).expect("mkdir .snapshots/v\\351");
    fs::write(mount.path().join("d/plain"), b"changed").expect("write");
    take_snapshot(&mount, "after");
    wait_completed(&mount, "after");
    assert_eq!(
        getxattr(&snap, "user.snapfs.state").expect("state"),
        b"completed"
    );
    let out = mount.scratch("out");
    let snapfs_with = |args: &[&OsStr]| {
        let mut cmd = snapfs();
        s3.apply(&mut cmd);
        run(cmd.args(args))
    };

    // From the bucket alone: the whole snapshot, and the one file by its own bytes.
    let whole = out.join("whole");
    let restore = OsStr::new("restore");
    let store = [OsStr::new("--store"), OsStr::new(&url)];
    assert_ok(
        &snapfs_with(&[restore, store[0], store[1], name, whole.as_os_str()]),
        "restore --store v\\351",
    );
    assert_trees_eq(
        &comparable(tree_state(&whole), true),
        &comparable(tree_state(&snap), true),
        "v\\351 from the bucket",
    );
    let one = out.join("one");
    let what = OsStr::from_bytes(b"v\xe9:d/caf\xe9");
    assert_ok(
        &snapfs_with(&[restore, store[0], store[1], what, one.as_os_str()]),
        "restore --store v\\351:d/caf\\351",
    );
    assert_bytes_eq(
        &fs::read(&one).expect("read"),
        &pattern(BLOCK + 5, 31),
        "one file",
    );

    // Beside the mount, with the mountpoint first.
    let local = out.join("local");
    let mp = mount.path().as_os_str();
    assert_ok(
        &snapfs_with(&[restore, mp, name, local.as_os_str()]),
        "restore MP v\\351",
    );
    assert_eq!(fs::read(local.join("d/plain")).expect("read"), b"plain");

    let shown = snapfs_with(&[OsStr::new("snapshot"), OsStr::new("show"), mp, name]);
    assert_ok(&shown, "snapshot show");
    assert!(
        stdout(&shown).contains("name:      v\\351\n"),
        "{}",
        stdout(&shown)
    );
    let diff = snapfs_with(&[OsStr::new("diff"), mp, name, OsStr::new("after")]);
    assert_ok(&diff, "diff");
    assert_eq!(stdout(&diff), "M\t/d/plain\n");

    // A name that is not there is named as listings show it.
    let missing = snapfs_with(&[
        restore,
        store[0],
        store[1],
        OsStr::from_bytes(b"n\xff"),
        out.join("x").as_os_str(),
    ]);
    assert_fails_with(&missing, &["no snapshot named n\\377"], "unknown name");
    let missing = snapfs_with(&[
        OsStr::new("snapshot"),
        OsStr::new("show"),
        mp,
        OsStr::from_bytes(b"n\xff"),
    ]);
    assert_fails_with(
        &missing,
        &["no snapshot named n\\377"],
        "show of an unknown name",
    );
}

// ---------------------------------------------------------------------------------------
// 4. DEST rules
// ---------------------------------------------------------------------------------------

#[test]
fn a_non_empty_dest_is_refused_unless_overwrite_which_replaces_only_snapshot_paths() {
    let mount = Mount::new();
    fs::create_dir_all(mount.path().join("a")).expect("mkdir");
    let content = pattern(2 * BLOCK + 9, 30);
    fs::write(mount.path().join("a/file"), &content).expect("write");
    fs::write(mount.path().join("top"), b"top of the snapshot").expect("write");
    let snap = take_snapshot(&mount, "snap");

    let dest = mount.scratch("out").join("dest");
    fs::create_dir_all(dest.join("a")).expect("mkdir");
    fs::write(dest.join("a/file"), b"stale").expect("write");
    fs::write(dest.join("a/mine"), b"unrelated").expect("write");
    fs::write(dest.join("keep"), b"kept").expect("write");
    let before = tree_state(&dest);

    let out = restore_local(&mount, "snap", &dest, &[]);
    assert_fails_with(&out, &["--overwrite"], "non-empty DEST");
    assert_trees_eq(&tree_state(&dest), &before, "a refused restore");

    // A single file over an existing one: refused too.
    let out = restore_local(&mount, "snap:top", &dest.join("keep"), &[]);
    assert_fails_with(&out, &["--overwrite"], "a file over an existing file");
    assert_eq!(fs::read(dest.join("keep")).expect("read"), b"kept");

    let out = restore_local(&mount, "snap", &dest, &["--overwrite"]);
    assert_ok(&out, "restore --overwrite");
    assert_bytes_eq(
        &fs::read(dest.join("a/file")).expect("read"),
        &content,
        "a/file replaced",
    );
    assert_eq!(
        fs::read(dest.join("top")).expect("read"),
        b"top of the snapshot"
    );
    assert_eq!(fs::read(dest.join("a/mine")).expect("read"), b"unrelated");
    assert_eq!(fs::read(dest.join("keep")).expect("read"), b"kept");
    assert_eq!(names(&dest), ["a", "keep", "top"]);
    let want = file_state(&snap.join("a/file"));
    assert_trees_eq(&file_state(&dest.join("a/file")), &want, "a/file");

    let out = restore_local(&mount, "snap:top", &dest.join("keep"), &["--overwrite"]);
    assert_ok(&out, "a file over a file with --overwrite");
    assert_eq!(
        fs::read(dest.join("keep")).expect("read"),
        b"top of the snapshot"
    );
}

// ---------------------------------------------------------------------------------------
// 5. Hostile buckets
// ---------------------------------------------------------------------------------------

const VOLUME_ID: &str = "0123456789abcdef0123456789abcdef";
const TIME: i64 = 1_600_000_000_000_000_000;

static NEXT_INO: AtomicU64 = AtomicU64::new(100);

fn entry(name: &[u8], kind: Kind, content: Content) -> Entry {
    Entry {
        name: name.to_vec(),
        ino: NEXT_INO.fetch_add(1, Ordering::Relaxed),
        attrs: Attrs {
            kind,
            perm: if kind == Kind::Dir { 0o755 } else { 0o644 },
            uid: 0,
            gid: 0,
            nlink: 1,
            size: 0,
            rdev: 0,
            atime: TIME,
            mtime: TIME,
            ctime: TIME,
            crtime: TIME,
        },
        target: None,
        xattrs: Vec::new(),
        content,
    }
}

/// A volume crafted object by object in its own prefix of a bucket.
struct Crafted {
    s3: S3Env,
    client: S3Client,
    prefix: String,
    next_snapshot: u64,
}

impl Crafted {
    fn new(s3: &S3Env, name: &str) -> Crafted {
        let crafted = Crafted {
            s3: s3.clone(),
            client: s3.client(),
            prefix: unique_prefix(name),
            next_snapshot: 1,
        };
        crafted.volume(1);
        crafted
    }

    fn url(&self) -> String {
        self.s3.url(&self.prefix)
    }

    fn put(&self, key: &str, bytes: &[u8]) {
        self.client.put(&format!("{}{key}", self.prefix), bytes);
    }

    fn get(&self, key: &str) -> Vec<u8> {
        self.client
            .get(&format!("{}{key}", self.prefix))
            .unwrap_or_else(|| panic!("{key} missing"))
    }

    fn volume(&self, format: u32) {
        let header = format!("snapfs volume\nformat {format}\nid {VOLUME_ID}\nblock_size 262144\n");
        self.put("volume", header.as_bytes());
    }

    fn block(&self, data: &[u8]) -> BlockHash {
        let hash = BlockHash::of(data);
        self.put(
            &format!("blocks/{hash}"),
            &zstd::encode_all(data, 3).expect("zstd"),
        );
        hash
    }

    /// A file entry holding `data` in stored blocks.
    fn file(&self, name: &str, data: &[u8]) -> Entry {
        let blocks = data
            .chunks(BLOCK)
            .enumerate()
            .map(|(i, chunk)| (i as u64, self.block(chunk)))
            .collect();
        let mut file = entry(name.as_bytes(), Kind::File, Content::Blocks(blocks));
        file.attrs.size = data.len() as u64;
        file
    }

    /// Stores a tree of `entries`, sorted by name but otherwise as they are (the encoder
    /// does not validate them).
    fn tree(&self, entries: &[Entry]) -> BlockHash {
        let mut entries = entries.to_vec();
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        let encoded = manifest::encode_tree(&entries);
        let hash = BlockHash::of(&encoded);
        self.put(
            &format!("trees/{hash}"),
            &zstd::encode_all(encoded.as_slice(), 3).expect("zstd"),
        );
        hash
    }

    fn dir(&self, name: &str, entries: &[Entry]) -> Entry {
        entry(
            name.as_bytes(),
            Kind::Dir,
            Content::Tree(self.tree(entries)),
        )
    }

    fn snapshot_encoding(&self, name: &str, root_entries: &[Entry]) -> Vec<u8> {
        let root = entry(b"", Kind::Dir, Content::Tree(self.tree(root_entries)));
        manifest::encode_snapshot(&SnapshotManifest {
            volume_id: VOLUME_ID.into(),
            id: self.next_snapshot,
            name: name.as_bytes().to_vec(),
            generation: self.next_snapshot + 1,
            created: TIME,
            block_size: BLOCK as u32,
            logical_bytes: 0,
            tags: Vec::new(),
            root,
            lock: None,
            trash: None,
        })
    }

    /// Stores `bytes` (compressed) as the next snapshot object.
    fn snapshot_object(&mut self, bytes: &[u8]) {
        let key = format!("snapshots/{:010}", self.next_snapshot);
        self.put(&key, &zstd::encode_all(bytes, 3).expect("zstd"));
        self.next_snapshot += 1;
    }

    fn snapshot(&mut self, name: &str, root_entries: &[Entry]) {
        let encoded = self.snapshot_encoding(name, root_entries);
        self.snapshot_object(&encoded);
    }

    fn restore(&self, what: &str, dest: &Path, extra: &[&str]) -> Output {
        restore_store(&self.s3, &self.url(), what, dest, extra)
    }
}

/// A temp dir holding `victim/` (with `victim/secret`) beside where DEST goes: what a
/// hostile restore must never touch.
struct Arena {
    dir: tempfile::TempDir,
    before: Tree,
}

impl Arena {
    fn new() -> Arena {
        let dir = tempfile::Builder::new()
            .prefix("snapfs-restore-arena.")
            .tempdir()
            .expect("temp dir");
        fs::create_dir(dir.path().join("victim")).expect("mkdir victim");
        fs::write(dir.path().join("victim/secret"), b"secret").expect("write");
        let before = tree_state(dir.path());
        Arena { dir, before }
    }

    fn victim(&self) -> PathBuf {
        self.dir.path().join("victim")
    }

    fn dest(&self) -> PathBuf {
        self.dir.path().join("dest")
    }

    /// Nothing but DEST changed in the arena.
    #[track_caller]
    fn assert_untouched(&self, what: &str) {
        let mut now = tree_state(self.dir.path());
        now.retain(|path, _| !path.starts_with("dest"));
        let mut before = self.before.clone();
        before.retain(|path, _| !path.starts_with("dest"));
        // The arena's own mtime changes when DEST is created in it.
        now.remove(Path::new(""));
        before.remove(Path::new(""));
        assert_trees_eq(&now, &before, &format!("{what}: outside DEST"));
        let mut top = names(self.dir.path());
        top.retain(|n| n != "dest");
        assert_eq!(top, ["victim"], "{what}: nothing new beside DEST");
    }
}

#[test]
fn unsafe_names_in_a_tree_are_refused_and_nothing_lands_outside_dest() {
    let s3 = S3Env::garage();
    let mut crafted = Crafted::new(&s3, "hostile-names");
    let bad_names: [&[u8]; 5] = [b"..", b".", b"a/b", b"../victim/pwned", b"x\0y"];
    for (i, bad) in bad_names.iter().enumerate() {
        let mut evil = crafted.file("placeholder", b"pwned");
        evil.name = bad.to_vec();
        let ok = crafted.file("ok", b"fine");
        let sub = crafted.dir("sub", &[evil.clone()]);
        crafted.snapshot(&format!("deep{i}"), &[ok.clone(), sub]);
        crafted.snapshot(&format!("top{i}"), &[evil, ok]);
    }
    for (i, bad) in bad_names.iter().enumerate() {
        for name in [format!("deep{i}"), format!("top{i}")] {
            let arena = Arena::new();
            let out = crafted.restore(&name, &arena.dest(), &[]);
            let what = format!(
                "{name} with an entry named {:?}",
                String::from_utf8_lossy(bad)
            );
            assert_fails_with(&out, &["manifest", "unsafe name"], &what);
            arena.assert_untouched(&what);
            if arena.dest().exists() {
                let mut all = tree_state(&arena.dest());
                all.retain(|_, node| node.content == b"pwned");
                assert!(
                    all.is_empty(),
                    "{what}: the hostile file was written: {all:?}"
                );
            }
        }
    }
}

#[test]
fn symlinks_and_hard_links_already_in_dest_do_not_redirect_an_overwrite() {
    let s3 = S3Env::garage();
    let mut crafted = Crafted::new(&s3, "hostile-links");
    let inside = crafted.file("pwned", b"gotcha");
    let x = crafted.dir("x", &[inside]);
    let h = crafted.file("h", b"overwritten");
    let y = crafted.file("y", b"y-content");
    let mut z = crafted.file("z", b"z-content");
    z.attrs.perm = 0o600;
    crafted.snapshot("snap", &[h, x, y, z]);

    let arena = Arena::new();
    let dest = arena.dest();
    fs::create_dir(&dest).expect("mkdir dest");
    // x: a symlink to the victim dir, where the snapshot has a directory.
    symlink(arena.victim(), dest.join("x")).expect("symlink");
    // h: a hard link to the victim's file, where the snapshot has a file.
    fs::hard_link(arena.victim().join("secret"), dest.join("h")).expect("link");
    // y: a symlink to the victim's file; z: a dangling symlink into the victim dir.
    symlink(arena.victim().join("secret"), dest.join("y")).expect("symlink");
    symlink(arena.victim().join("new"), dest.join("z")).expect("symlink");
    let arena = Arena {
        before: {
            // The hard link raised the secret's link count: that is the baseline.
            tree_state(arena.dir.path())
        },
        ..arena
    };

    let out = crafted.restore("snap", &dest, &["--overwrite"]);
    assert_ok(&out, "restore --overwrite over planted links");
    let x_meta = fs::symlink_metadata(dest.join("x")).expect("lstat x");
    assert!(x_meta.is_dir(), "DEST/x is a real directory now");
    assert_eq!(fs::read(dest.join("x/pwned")).expect("read"), b"gotcha");
    assert_eq!(fs::read(dest.join("h")).expect("read"), b"overwritten");
    assert_eq!(fs::read(dest.join("y")).expect("read"), b"y-content");
    assert_eq!(fs::read(dest.join("z")).expect("read"), b"z-content");
    for name in ["h", "y", "z"] {
        assert!(
            fs::symlink_metadata(dest.join(name))
                .expect("lstat")
                .is_file()
        );
    }
    assert_eq!(
        fs::read(arena.victim().join("secret")).expect("read"),
        b"secret"
    );
    assert_eq!(names(&arena.victim()), ["secret"]);
    // The secret lost DEST/h as a second name; everything else outside DEST is as it was.
    assert_eq!(
        fs::metadata(arena.victim().join("secret"))
            .expect("stat")
            .nlink(),
        1
    );
    let mut now = tree_state(arena.dir.path());
    let mut before = arena.before.clone();
    for tree in [&mut now, &mut before] {
        tree.retain(|path, _| path.starts_with("victim") && path != Path::new("victim/secret"));
    }
    assert_trees_eq(&now, &before, "the victim dir");
}

#[test]
fn a_tree_that_does_not_match_its_key_is_refused_by_name() {
    let s3 = S3Env::garage();
    let mut crafted = Crafted::new(&s3, "hostile-tree-hash");
    let inner = [crafted.file("aaa", b"inner"), crafted.file("bbb", b"more")];
    let sub = crafted.dir("sub", &inner);
    let Content::Tree(hash) = sub.content else {
        unreachable!()
    };
    let ok = crafted.file("ok", b"fine");
    crafted.snapshot("snap", &[ok, sub]);
    // One byte changed (a name: the tree still decodes), the key kept.
    let mut encoded = zstd::decode_all(crafted.get(&format!("trees/{hash}")).as_slice())
        .expect("decode the tree");
    let at = encoded
        .windows(3)
        .position(|w| w == b"bbb")
        .expect("the name in the encoding");
    encoded[at + 2] = b'c';
    assert!(
        manifest::decode_tree(&encoded).is_ok(),
        "still a valid tree"
    );
    crafted.put(
        &format!("trees/{hash}"),
        &zstd::encode_all(encoded.as_slice(), 3).expect("zstd"),
    );

    let arena = Arena::new();
    let out = crafted.restore("snap", &arena.dest(), &[]);
    assert_fails_with(
        &out,
        &[&format!("trees/{hash}"), "does not match"],
        "a tampered tree",
    );
    assert_eq!(out.status.code(), Some(1));
    arena.assert_untouched("a tampered tree");
    assert_eq!(fs::read(arena.dest().join("ok")).expect("read"), b"fine");
    assert!(!arena.dest().join("sub/bbc").exists());
    assert!(!arena.dest().join("sub/aaa").exists());
}

#[test]
fn truncated_or_future_snapshot_objects_and_headers_are_clear_errors() {
    let s3 = S3Env::garage();
    let cases: [(&str, &[&str]); 4] = [
        ("truncated encoding", &["snapshots/0000000001", "truncated"]),
        ("truncated frame", &["snapshots/0000000001", "truncated"]),
        (
            "future snapshot",
            &["snapshots/0000000001", "upgrade snapfs"],
        ),
        ("future volume", &["format 3", "upgrade snapfs"]),
    ];
    for (case, needles) in cases {
        let mut crafted = Crafted::new(&s3, "hostile-snapshot");
        let ok = crafted.file("ok", b"fine");
        let encoded = crafted.snapshot_encoding("snap", &[ok]);
        match case {
            "truncated encoding" => crafted.snapshot_object(&encoded[..encoded.len() - 5]),
            "truncated frame" => {
                let frame = zstd::encode_all(encoded.as_slice(), 3).expect("zstd");
                crafted.put("snapshots/0000000001", &frame[..frame.len() / 2]);
            }
            "future snapshot" => {
                let mut future = encoded.clone();
                assert_eq!(&future[..8], b"snapfsS1");
                future[7] = b'9';
                crafted.snapshot_object(&future);
            }
            _ => {
                crafted.snapshot_object(&encoded);
                crafted.volume(3);
            }
        }
        let arena = Arena::new();
        let out = crafted.restore("snap", &arena.dest(), &[]);
        assert_fails_with(&out, needles, case);
        assert!(!arena.dest().exists(), "{case}: DEST created");
        arena.assert_untouched(case);

        let mut list = snapfs();
        list.args(["snapshot", "list", "--store", &crafted.url()]);
        s3.apply(&mut list);
        assert_fails_with(&run(&mut list), needles, &format!("{case}: snapshot list"));
    }
}

#[test]
fn absurd_sizes_and_block_indexes_fail_that_file_quickly() {
    let s3 = S3Env::garage();
    let mut crafted = Crafted::new(&s3, "hostile-sizes");
    let mut huge = crafted.file("huge", b"tiny");
    huge.attrs.size = 1 << 62;
    let mut far = crafted.file("far", b"tiny");
    let Content::Blocks(blocks) = &mut far.content else {
        unreachable!()
    };
    blocks[0].0 = 1 << 40;
    far.attrs.size = 100;
    let mut farthest = crafted.file("farthest", b"tiny");
    let Content::Blocks(blocks) = &mut farthest.content else {
        unreachable!()
    };
    blocks[0].0 = u64::MAX;
    farthest.attrs.size = i64::MAX as u64;
    let ok = crafted.file("ok", &pattern(BLOCK + 1, 40));
    crafted.snapshot("snap", &[far, farthest, huge, ok]);

    let arena = Arena::new();
    let started = Instant::now();
    let out = crafted.restore("snap", &arena.dest(), &[]);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?}",
        started.elapsed()
    );
    let dest = arena.dest();
    assert_fails_with(&out, &["far", "farthest", "huge"], "absurd sizes");
    assert_eq!(out.status.code(), Some(1));
    assert_bytes_eq(
        &fs::read(dest.join("ok")).expect("read"),
        &pattern(BLOCK + 1, 40),
        "ok",
    );
    assert_eq!(
        names(&dest),
        ["ok"],
        "files that failed are not left behind: {}",
        stderr(&out)
    );
    assert!(disk_usage(&dest) < 4 * BLOCK as u64);
    arena.assert_untouched("absurd sizes");
}

#[test]
fn one_damaged_snapshot_object_does_not_make_the_others_unrestorable() {
    let s3 = S3Env::garage();
    let mut crafted = Crafted::new(&s3, "hostile-one-bad-snapshot");
    let ok = crafted.file("ok", b"fine");
    crafted.snapshot("good", std::slice::from_ref(&ok));
    let encoded = crafted.snapshot_encoding("bad", &[ok]);
    crafted.snapshot_object(&encoded[..encoded.len() - 3]);

    let arena = Arena::new();
    let out = crafted.restore("good", &arena.dest(), &[]);
    assert_ok(&out, "restore the intact snapshot beside a damaged one");
    assert_eq!(fs::read(arena.dest().join("ok")).expect("read"), b"fine");
    let out = crafted.restore("bad", &arena.dir.path().join("bad"), &[]);
    assert_fails_with(&out, &["snapshots/0000000002"], "the damaged one");
}

/// Sets the open-file limit of a child to `limit` (soft and hard).
fn limit_open_files(cmd: &mut std::process::Command, limit: u64) {
    use std::os::unix::process::CommandExt;
    // SAFETY: setrlimit is async-signal-safe; the closure only calls it.
    unsafe {
        cmd.pre_exec(move || {
            let rlimit = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &rlimit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[test]
fn a_wide_directory_restores_under_the_usual_open_file_limit() {
    let s3 = S3Env::garage();
    let mut crafted = Crafted::new(&s3, "wide-dir");
    let block = crafted.block(b"x");
    let files: Vec<Entry> = (0..2000)
        .map(|i| {
            let mut file = entry(
                format!("f{i:05}").as_bytes(),
                Kind::File,
                Content::Blocks(vec![(0, block)]),
            );
            file.attrs.size = 1;
            file
        })
        .collect();
    let wide = crafted.dir("wide", &files);
    crafted.snapshot("snap", &[wide]);

    let arena = Arena::new();
    let mut cmd = snapfs();
    cmd.arg("restore")
        .arg("--store")
        .arg(crafted.url())
        .arg("snap")
        .arg(arena.dest())
        .arg("--json");
    s3.apply(&mut cmd);
    limit_open_files(&mut cmd, 1024);
    let out = run(&mut cmd);
    let json = stdout(&out);
    let errors = json.matches("Too many open files").count();
    let first = json
        .split("\"errors\":[")
        .nth(1)
        .unwrap_or("")
        .chars()
        .take(200);
    assert!(
        out.status.success() && errors == 0,
        "2000 files in one directory with 1024 descriptors: exit {}, {errors} files failed \
         with EMFILE, the first: {}",
        out.status,
        first.collect::<String>()
    );
    assert_json_count(&json, "files", 2000);
    assert_eq!(names(&arena.dest().join("wide")).len(), 2000);
}

// ---------------------------------------------------------------------------------------
// 6. Corrupt blocks
// ---------------------------------------------------------------------------------------

/// Files whose names say what happens to them; `damaged`'s block 1 is the one to corrupt.
fn corruptible_tree(root: &Path) -> BlockHash {
    fs::create_dir(root.join("dir")).expect("mkdir");
    fs::write(root.join("good"), pattern(2 * BLOCK + 1, 50)).expect("write");
    let damaged = pattern(3 * BLOCK, 51);
    fs::write(root.join("damaged"), &damaged).expect("write");
    fs::write(root.join("dir/good2"), text(10_000)).expect("write");
    fs::write(root.join("dir/small"), b"small").expect("write");
    BlockHash::of(&damaged[BLOCK..2 * BLOCK])
}

/// Everything restored but `damaged`, which is named in the errors; exit status 1.
#[track_caller]
fn assert_damaged_left_out(out: &Output, dest: &Path, expected: &Tree, what: &str) {
    assert_eq!(
        out.status.code(),
        Some(1),
        "{what}: exit status; stderr:\n{}",
        stderr(out)
    );
    let err = stderr(out);
    assert!(err.contains("damaged"), "{what}: the file is named: {err}");
    assert!(
        !dest.join("damaged").exists(),
        "{what}: a damaged file is not restored"
    );
    let mut expected = expected.clone();
    expected.remove(Path::new("damaged"));
    assert_trees_eq(
        &comparable(tree_state(dest), true),
        &expected,
        &format!("{what}: the rest"),
    );
}

#[test]
fn a_corrupt_block_in_the_bucket_leaves_out_its_file_only() {
    for (server, s3) in S3Env::all() {
        let prefix = unique_prefix(&format!("restore-corrupt-{server}"));
        let url = s3.url(&prefix);
        let mount = s3.mount_store(&prefix, &[]);
        let bad = corruptible_tree(mount.path());
        let snap = take_snapshot(&mount, "snap");
        wait_completed(&mount, "snap");
        let expected = comparable(tree_state(&snap), true);
        let client = s3.client();
        let stored = packed_in_bucket(&client, &prefix);
        let copy = &stored
            .get(&bad.to_hex())
            .unwrap_or_else(|| panic!("{server}: {bad} uploaded"))[0];
        let pack = client.get(&copy.pack).expect("the pack");
        let frame = copy.offset..copy.offset + copy.length;

        // In its pack: a valid zstd frame of other bytes, then bytes that are not zstd at all.
        let other = snapfs::manifest::compress(&pattern(BLOCK, 52), 3).expect("zstd");
        assert_eq!(
            other.len(),
            copy.length,
            "incompressible blocks, frames alike"
        );
        let garbage = b"garbage".repeat(copy.length / 7 + 1)[..copy.length].to_vec();
        for (case, replacement) in [("other bytes", other), ("not zstd", garbage)] {
            let mut object = pack.clone();
            object[frame.clone()].copy_from_slice(&replacement);
            client.put(&copy.pack, &object);
            let what = format!("{server}: {case}");
            let dest = mount.scratch(&format!("out-{case}")).join("dest");
            let out = restore_store(&s3, &url, "snap", &dest, &[]);
            assert_damaged_left_out(&out, &dest, &expected, &what);
            assert!(
                stderr(&out).contains(&bad.to_hex()),
                "{what}: the block is named"
            );

            let dest = mount.scratch(&format!("json-{case}")).join("dest");
            let out = restore_store(&s3, &url, "snap", &dest, &["--json"]);
            let json = stdout(&out);
            assert_json_count(&json, "files", 3);
            assert_json_count(&json, "dirs", 1);
            assert!(json.contains("\"errors\":[\""), "{what}: {json}");
            assert!(json.contains("damaged"), "{what}: {json}");
        }
    }
}

/// Mangles every copy of block `hash` in the packs of the volume's default store
/// (`file://DATA/store`), once its snapshot `name` is there.
fn damage_in_store(mount: &Mount, name: &str, hash: &BlockHash) {
    wait_completed(mount, name);
    let store = mount.data_dir().join("store");
    let copies = packed_blocks_in_dir(&store)
        .remove(&hash.to_hex())
        .expect("the store holds the block");
    for copy in copies {
        let path = store.join(&copy.pack);
        let mut pack = fs::read(&path).expect("read the pack");
        for byte in &mut pack[copy.offset..copy.offset + copy.length] {
            *byte ^= 0x5a;
        }
        fs::write(&path, pack).expect("damage the pack");
    }
}

#[test]
fn a_corrupt_local_block_leaves_out_its_file_only() {
    let mount = Mount::new();
    let bad = corruptible_tree(mount.path());
    let snap = take_snapshot(&mount, "snap");
    let expected = comparable(tree_state(&snap), true);
    // No good copy anywhere: a damaged local block is read from the store otherwise.
    damage_in_store(&mount, "snap", &bad);
    let hex = bad.to_hex();
    let block = mount.data_dir().join("blocks").join(&hex[..2]).join(&hex);
    assert!(block.exists(), "{} exists", block.display());
    fs::write(&block, pattern(BLOCK, 53)).expect("corrupt the block");

    let dest = mount.scratch("out").join("dest");
    let out = restore_local(&mount, "snap", &dest, &[]);
    assert_damaged_left_out(&out, &dest, &expected, "local, --mount");

    let dest = mount.scratch("out-data").join("dest");
    let out = restore_data(&mount, "snap", &dest);
    assert_damaged_left_out(&out, &dest, &expected, "local, --data");
}

#[test]
fn a_corrupt_local_block_the_store_holds_is_restored_from_it() {
    let mount = Mount::new();
    let bad = corruptible_tree(mount.path());
    let snap = take_snapshot(&mount, "snap");
    let expected = comparable(tree_state(&snap), true);
    wait_completed(&mount, "snap");
    let hex = bad.to_hex();
    let block = mount.data_dir().join("blocks").join(&hex[..2]).join(&hex);
    // Not read through the mount afterwards: the mount's read would heal the file.
    fs::write(&block, pattern(BLOCK, 53)).expect("corrupt the block");

    let dest = mount.scratch("out").join("dest");
    assert_ok(&restore_local(&mount, "snap", &dest, &[]), "local, --mount");
    assert_trees_eq(&comparable(tree_state(&dest), true), &expected, "--mount");

    let dest = mount.scratch("out-data").join("dest");
    let out = restore_data(&mount, "snap", &dest);
    assert_ok(&out, "local, --data");
    assert_trees_eq(&comparable(tree_state(&dest), true), &expected, "--data");
}

#[test]
fn a_hard_linked_file_with_a_corrupt_block_is_left_out_under_every_name() {
    let mount = Mount::new();
    fs::create_dir(mount.path().join("dir")).expect("mkdir");
    let data = pattern(2 * BLOCK, 60);
    fs::write(mount.path().join("damaged"), &data).expect("write");
    fs::hard_link(
        mount.path().join("damaged"),
        mount.path().join("dir/damaged-too"),
    )
    .expect("link");
    fs::write(mount.path().join("good"), b"good").expect("write");
    take_snapshot(&mount, "snap");
    damage_in_store(&mount, "snap", &BlockHash::of(&data[BLOCK..]));
    let hex = BlockHash::of(&data[BLOCK..]).to_hex();
    let block = mount.data_dir().join("blocks").join(&hex[..2]).join(&hex);
    fs::write(&block, pattern(BLOCK, 61)).expect("corrupt the block");

    let dest = mount.scratch("out").join("dest");
    let out = restore_local(&mount, "snap", &dest, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("damaged"), "{}", stderr(&out));
    assert_eq!(fs::read(dest.join("good")).expect("read"), b"good");
    assert!(!dest.join("damaged").exists(), "the first name is gone");
    assert!(
        !dest.join("dir/damaged-too").exists(),
        "the other name of a file that failed must not remain with zeros where the bad \
         block was: {:?}",
        fs::read(dest.join("dir/damaged-too")).map(|d| d.len())
    );
}

// ---------------------------------------------------------------------------------------
// 7. The JSON summary
// ---------------------------------------------------------------------------------------

#[test]
fn the_json_summary_counts_what_was_restored() {
    let mount = Mount::new();
    let root = mount.path();
    fs::create_dir_all(root.join("d/e")).expect("mkdir");
    fs::write(root.join("f1"), pattern(1000, 70)).expect("write");
    fs::write(root.join("d/f2"), pattern(BLOCK + 10, 71)).expect("write");
    fs::write(root.join("d/empty"), b"").expect("write");
    fs::hard_link(root.join("f1"), root.join("d/f1-link")).expect("link");
    symlink("f1", root.join("sym")).expect("symlink");
    mkfifo(&root.join("fifo"), 0o600).expect("mkfifo");
    take_snapshot(&mount, "snap");

    let dest = mount.scratch("out").join("dest");
    let out = restore_local(&mount, "snap", &dest, &["--json"]);
    assert_ok(&out, "restore --json");
    let json = stdout(&out);
    assert_eq!(json.trim().lines().count(), 1, "one line: {json}");
    assert!(json.trim().starts_with('{') && json.trim().ends_with('}'));
    assert_json_count(&json, "files", 3);
    assert_json_count(&json, "dirs", 2);
    assert_json_count(&json, "symlinks", 1);
    assert_json_count(&json, "hard_links", 1);
    assert_json_count(&json, "specials", 1);
    assert_json_count(&json, "bytes", 1000 + BLOCK as u64 + 10);
    assert!(json.contains("\"errors\":[]"), "{json}");
    assert_eq!(
        fs::read(dest.join("d/f1-link")).expect("read"),
        pattern(1000, 70)
    );
}
