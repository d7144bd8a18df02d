//! Snapshots through the kernel: the `.snapshots` control directory, read-only views,
//! point-in-time consistency under concurrent writers, space, and the CLI.

mod common;

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;

fn snapshot(mount: &Mount, name: &str) -> PathBuf {
    let path = mount.path().join(".snapshots").join(name);
    fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
    path
}

#[test]
fn snapshot_is_a_read_only_point_in_time_copy() {
    let mount = Mount::new();
    let root = mount.path();
    fs::create_dir(root.join("dir")).expect("mkdir");
    let data = pattern(3 * BLOCK + 17, 1);
    fs::write(root.join("dir/file"), &data).expect("write");
    fs::hard_link(root.join("dir/file"), root.join("link")).expect("link");
    std::os::unix::fs::symlink("dir/file", root.join("sym")).expect("symlink");
    setxattr(&root.join("dir/file"), "user.color", b"blue", 0).expect("xattr");
    fs::set_permissions(root.join("dir/file"), fs::Permissions::from_mode(0o640)).expect("chmod");
    // Compare below the root: a snapshot's root has the snapshot's own mtime and xattrs.
    let below_root = |dir: &Path| {
        let mut tree = tree_state(dir);
        tree.remove(Path::new(""));
        tree
    };
    let before = below_root(root);

    let snap = snapshot(&mount, "first");
    // The live volume moves on.
    fs::write(root.join("dir/file"), b"rewritten").expect("rewrite");
    fs::remove_file(root.join("link")).expect("unlink");
    fs::rename(root.join("sym"), root.join("dir/sym2")).expect("rename");
    fs::write(root.join("new"), b"new").expect("new file");

    assert!(
        below_root(&snap) == before,
        "the snapshot shows the volume as it was"
    );
    let live = fs::metadata(root.join("dir/file")).expect("live stat");
    let frozen = fs::metadata(snap.join("dir/file")).expect("snapshot stat");
    assert_ne!(live.ino(), frozen.ino(), "a file has one st_ino per view");
    assert_eq!(
        fs::metadata(snap.join("link")).expect("link").ino(),
        frozen.ino(),
        "hard links inside one snapshot share an inode"
    );
    assert_eq!(frozen.nlink(), 2);

    // Everything inside is read-only.
    let file = snap.join("dir/file");
    assert_eq!(errno(fs::write(&file, b"x")), libc::EROFS);
    assert_eq!(
        errno(OpenOptions::new().append(true).open(&file)),
        libc::EROFS
    );
    assert_eq!(errno(fs::remove_file(&file)), libc::EROFS);
    assert_eq!(errno(fs::create_dir(snap.join("d2"))), libc::EROFS);
    assert_eq!(errno(fs::write(snap.join("created"), b"x")), libc::EROFS);
    assert_eq!(errno(fs::rename(&file, snap.join("moved"))), libc::EROFS);
    assert_eq!(
        errno(fs::set_permissions(
            &file,
            fs::Permissions::from_mode(0o777)
        )),
        libc::EROFS
    );
    assert_eq!(errno(setxattr(&file, "user.color", b"red", 0)), libc::EROFS);
    assert_eq!(
        errno(fs::rename(root.join("new"), snap.join("new"))),
        libc::EXDEV
    );
}

#[test]
fn control_directory_behaves_like_zfs_snapshot_dir() {
    let mount = Mount::new();
    let root = mount.path();
    let snapdir = root.join(".snapshots");
    let names = dir_names;
    fs::write(root.join("f"), b"1").expect("write");
    assert_eq!(
        names(root),
        ["f"],
        ".snapshots is hidden from the root's listing"
    );
    assert!(snapdir.is_dir(), "but reachable by name");

    let before = SystemTime::now().duration_since(UNIX_EPOCH).expect("now");
    let snap = snapshot(&mount, "a");
    let mtime = fs::metadata(&snap).expect("stat").mtime();
    assert!(
        (mtime - before.as_secs() as i64).abs() <= 2,
        "mtime is creation time"
    );
    assert_eq!(errno(fs::create_dir(&snap)), libc::EEXIST);
    assert_eq!(errno(fs::create_dir(snapdir.join(".dot"))), libc::EINVAL);
    // A control character would break every line of a listing.
    assert_eq!(errno(fs::create_dir(snapdir.join("a\nb"))), libc::EINVAL);
    assert_eq!(
        errno(fs::rename(&snap, snapdir.join("tab\t"))),
        libc::EINVAL
    );
    assert_eq!(
        errno(fs::create_dir(snapdir.join("x".repeat(256)))),
        libc::ENAMETOOLONG
    );
    assert_eq!(errno(fs::write(snapdir.join("file"), b"x")), libc::EPERM);
    assert_eq!(errno(fs::remove_dir(&snapdir)), libc::EPERM);
    assert_eq!(
        errno(fs::rename(&snapdir, root.join("elsewhere"))),
        libc::EPERM
    );
    assert_eq!(errno(fs::create_dir(&snapdir)), libc::EEXIST);

    // Pending until the uploader has put it in the store (by default a directory in the
    // data dir), then completed.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let state = getxattr(&snap, "user.snapfs.state").expect("state");
        if state == b"completed" {
            break;
        }
        assert_eq!(state, b"pending");
        assert!(
            std::time::Instant::now() < deadline,
            "not completed in time"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(getxattr(&snap, "user.snapfs.id").expect("id"), b"1");
    let created = getxattr(&snap, "user.snapfs.created").expect("created");
    assert!(
        created.ends_with(b"Z") && created.len() == 24,
        "{created:?}"
    );
    setxattr(&snap, "user.tag.owner", b"ops", 0).expect("tag");
    assert_eq!(getxattr(&snap, "user.tag.owner").expect("tag"), b"ops");
    removexattr(&snap, "user.tag.owner").expect("untag");
    assert_eq!(errno(getxattr(&snap, "user.tag.owner")), libc::ENODATA);
    assert_eq!(
        errno(setxattr(&snap, "user.snapfs.state", b"x", 0)),
        libc::EROFS
    );

    fs::rename(&snap, snapdir.join("b")).expect("rename snapshot");
    assert_eq!(names(&snapdir), ["b"]);
    assert_eq!(fs::read(snapdir.join("b/f")).expect("read"), b"1");
    fs::remove_dir(snapdir.join("b")).expect("rmdir snapshot");
    assert!(names(&snapdir).is_empty());
    assert_eq!(errno(fs::remove_dir(snapdir.join("b"))), libc::ENOENT);

    let visible = Mount::with_args(&["--snapdir", "visible"]);
    assert_eq!(names(visible.path()), [".snapshots"]);
}

#[test]
fn snapshots_survive_remount_and_deletion_frees_their_blocks() {
    let mut mount = Mount::new();
    let root = mount.path().to_owned();
    let old = pattern(4 * BLOCK, 7);
    fs::write(root.join("f"), &old).expect("write");
    snapshot(&mount, "s");
    let new = pattern(4 * BLOCK, 8);
    fs::write(root.join("f"), &new).expect("rewrite");
    assert_eq!(block_files(mount.data_dir()).len(), 8);

    mount.remount();
    let snap = mount.path().join(".snapshots/s");
    assert_bytes_eq(
        &fs::read(snap.join("f")).expect("read"),
        &old,
        "snapshot after remount",
    );
    assert_bytes_eq(
        &fs::read(root.join("f")).expect("read"),
        &new,
        "live after remount",
    );
    fs::remove_dir(&snap).expect("delete");
    assert_eq!(
        block_files(mount.data_dir()).len(),
        4,
        "exactly the old blocks freed"
    );
    assert_bytes_eq(
        &fs::read(root.join("f")).expect("read"),
        &new,
        "live after delete",
    );
}

#[test]
fn unreadable_files_stay_unreadable_in_snapshots() {
    let mount = Mount::with_args(&["--allow-other"]);
    let secret = mount.path().join("secret");
    fs::write(&secret, b"s3cr3t").expect("write");
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).expect("chmod");
    let private = mount.path().join("private");
    fs::create_dir(&private).expect("mkdir");
    fs::write(private.join("inside"), b"x").expect("write");
    fs::set_permissions(&private, fs::Permissions::from_mode(0o700)).expect("chmod");
    let snap = snapshot(&mount, "s");
    // Opening the file, listing the directory and reaching through it: refused alike.
    let cases = [
        (secret.clone(), libc::O_RDONLY),
        (snap.join("secret"), libc::O_RDONLY),
        (private.clone(), libc::O_RDONLY | libc::O_DIRECTORY),
        (snap.join("private"), libc::O_RDONLY | libc::O_DIRECTORY),
        (private.join("inside"), libc::O_RDONLY),
        (snap.join("private/inside"), libc::O_RDONLY),
    ];
    for (path, flags) in cases {
        let c_path = cpath(&path);
        // SAFETY: a valid NUL-terminated path.
        let code = errno_as_user(65534, 65534, || unsafe {
            libc::open(c_path.as_ptr(), flags)
        });
        assert_eq!(code, libc::EACCES, "{}", path.display());
    }
    // A later chmod of the live file does not open up the snapshot's copy.
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o644)).expect("chmod");
    let c_path = cpath(&snap.join("secret"));
    // SAFETY: a valid NUL-terminated path.
    let code = errno_as_user(65534, 65534, || unsafe {
        libc::open(c_path.as_ptr(), libc::O_RDONLY)
    });
    assert_eq!(code, libc::EACCES, "the snapshot keeps the old mode");
}

/// Fixed-size records, so a torn write would be visible.
const RECORD: usize = 16;

fn record(writer: usize, n: u64) -> Vec<u8> {
    format!("w{writer}:{n:012}\n").into_bytes()
}

/// Checks that `content` is records 1..=n of `writer` with no gap or tear; returns n.
fn count_records(content: &[u8], writer: usize, what: &str) -> u64 {
    assert_eq!(content.len() % RECORD, 0, "{what}: torn record");
    for (i, chunk) in content.chunks(RECORD).enumerate() {
        assert_eq!(
            chunk,
            record(writer, i as u64 + 1),
            "{what}: record {}",
            i + 1
        );
    }
    (content.len() / RECORD) as u64
}

/// Appenders write numbered records and move their files between directories while
/// snapshots are taken in a loop. Each snapshot must hold, for every file, exactly one
/// name and a gap-free prefix of its records; and since each writer appends to its log
/// before its mirror, no snapshot may show the mirror ahead: a state that never existed.
#[test]
fn snapshots_are_consistent_points_in_time_under_concurrent_writers() {
    const WRITERS: usize = 3;
    let mount = Mount::new();
    let root = mount.path().to_owned();
    for dir in ["a", "b", "mirror"] {
        fs::create_dir(root.join(dir)).expect("mkdir");
    }
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (root, stop) = (root.clone(), stop.clone());
            std::thread::spawn(move || {
                let name = format!("w{w}.log");
                let mut dir = "a";
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    for path in [root.join(dir).join(&name), root.join("mirror").join(&name)] {
                        let mut file = OpenOptions::new()
                            .create(true)
                            .append(true)
                            .open(&path)
                            .expect("open for append");
                        file.write_all(&record(w, n)).expect("append");
                    }
                    if n % 7 == 0 {
                        let other = if dir == "a" { "b" } else { "a" };
                        fs::rename(root.join(dir).join(&name), root.join(other).join(&name))
                            .expect("move between dirs");
                        dir = other;
                    }
                }
                n
            })
        })
        .collect();
    let mut snapshots = Vec::new();
    for i in 0..25 {
        std::thread::sleep(Duration::from_millis(15));
        snapshots.push(snapshot(&mount, &format!("s{i:02}")));
    }
    stop.store(true, Ordering::Relaxed);
    let written: Vec<u64> = writers
        .into_iter()
        .map(|w| w.join().expect("writer"))
        .collect();

    let mut previous = vec![0u64; WRITERS];
    for snap in &snapshots {
        for (w, last) in previous.iter_mut().enumerate() {
            let name = format!("w{w}.log");
            let places: Vec<PathBuf> = ["a", "b"]
                .iter()
                .map(|d| snap.join(d).join(&name))
                .filter(|p| p.exists())
                .collect();
            let what = format!("{}/{name}", snap.display());
            if *last == 0 && places.is_empty() {
                continue; // not created yet when this snapshot was taken
            }
            assert_eq!(places.len(), 1, "{what}: a moved file has exactly one name");
            let log = count_records(&fs::read(&places[0]).expect("read log"), w, &what);
            let mirror_path = snap.join("mirror").join(&name);
            // Not created yet (the writer's first log record came first): no records.
            let mirror = match fs::read(&mirror_path) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
                read => read.expect("mirror"),
            };
            let mirror = count_records(&mirror, w, &what);
            assert!(
                mirror == log || mirror + 1 == log,
                "{what}: log has {log} records, mirror {mirror}: never true at one instant"
            );
            assert!(
                log >= *last,
                "{what}: later snapshots never go back in time"
            );
            assert!(log <= written[w]);
            *last = log;
        }
    }
    assert!(
        previous.iter().all(|&n| n > 0),
        "writers made progress: {previous:?}"
    );
}

#[test]
fn cli_creates_lists_tags_diffs_and_deletes() {
    let mount = Mount::new();
    let root = mount.path();
    let mp = root.to_str().expect("utf-8 path");
    fs::write(root.join("kept"), b"k").expect("write");
    fs::write(root.join("gone"), pattern(BLOCK, 3)).expect("write");
    let out = run(snapfs().args([
        "snapshot", "create", mp, "monday", "--tag", "env=prod", "--json",
    ]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json = String::from_utf8_lossy(&out.stdout);
    assert!(
        json.contains(r#""name":"monday""#) && json.contains(r#""env":"prod""#),
        "{json}"
    );
    assert!(
        json.contains(&format!(r#""logical_bytes":{}"#, BLOCK + 1)),
        "{json}"
    );

    fs::remove_file(root.join("gone")).expect("rm");
    fs::write(root.join("added"), b"a").expect("write");
    let out = run(snapfs().args(["snapshot", "create", mp, "tuesday"]));
    assert!(out.status.success());
    let out = run(snapfs().args(["snapshot", "create", mp, "monday"]));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));

    let out = run(snapfs().args(["diff", "monday", "tuesday", "--mount", mp]));
    let diff = String::from_utf8_lossy(&out.stdout);
    assert!(
        diff.contains("-\t/gone") && diff.contains("+\t/added"),
        "{diff}"
    );
    assert!(!diff.contains("kept"), "{diff}");
    // MOUNTPOINT FROM TO, as `snapshot create` takes the mountpoint, gives the same lines;
    // so does a mountpoint named without a `/`, from its parent directory.
    let out = run(snapfs().args(["diff", mp, "monday", "tuesday"]));
    assert_eq!(String::from_utf8_lossy(&out.stdout), diff);
    let (parent, name) = (
        mount.path().parent().expect("parent"),
        mount.path().file_name().expect("name"),
    );
    let mut relative = snapfs();
    relative.current_dir(parent).arg("diff").arg(name);
    let out = run(relative.args(["monday", "tuesday"]));
    assert_eq!(String::from_utf8_lossy(&out.stdout), diff, "{out:?}");

    let out = run(snapfs().args(["snapshot", "show", "monday", "--mount", mp, "--json"]));
    let json = String::from_utf8_lossy(&out.stdout);
    assert!(
        json.contains(&format!(r#""exclusive_bytes":{BLOCK}"#)),
        "{json}"
    );
    // MOUNTPOINT NAME, as `snapshot create` takes them, shows the same snapshot (its
    // upload state may have moved on meanwhile).
    let out = run(snapfs().args(["snapshot", "show", mp, "monday", "--json"]));
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let before: serde_json::Value = serde_json::from_str(&json).expect("JSON");
    for field in ["name", "id", "created", "exclusive_bytes"] {
        assert_eq!(shown[field], before[field], "{field}: {shown}");
    }
    let out = run(snapfs().args([
        "snapshot", "tag", mp, "monday", "keep=yes", "--remove", "env",
    ]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    run(snapfs().args(["snapshot", "delete", mp, "tuesday"]));
    let data = mount.data_dir().to_str().expect("utf-8");
    let out = run(snapfs().args(["snapshot", "list", "--data", data, "--json"]));
    let list = String::from_utf8_lossy(&out.stdout);
    assert!(
        list.contains(r#""keep":"yes""#) && !list.contains("env"),
        "{list}"
    );
    assert!(!list.contains("tuesday"), "{list}");
    // The mountpoint as an argument, as `snapshot create` takes it, lists the same
    // snapshots (their upload state may have moved on meanwhile).
    let names = |listing: &str| -> Vec<String> {
        let items: serde_json::Value = serde_json::from_str(listing).expect("JSON");
        items
            .as_array()
            .expect("an array")
            .iter()
            .map(|s| s["name"].as_str().expect("a name").to_owned())
            .collect()
    };
    let out = run(snapfs().args(["snapshot", "list", mp, "--json"]));
    assert_eq!(names(&String::from_utf8_lossy(&out.stdout)), ["monday"]);
    assert_eq!(names(&list), ["monday"]);
    let out = run(snapfs().args(["snapshot", "list", mp, "--data", data]));
    assert_eq!(
        out.status.code(),
        Some(2),
        "a mountpoint and --data conflict"
    );
    let out = run(snapfs().args(["snapshot", "show", "nope", "--data", data]));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no snapshot named nope"));
}

#[test]
fn a_listing_whose_reader_left_ends_quietly() {
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::os::unix::process::ExitStatusExt;
    let mount = Mount::new();
    snapshot(&mount, "monday");
    // `snapfs snapshot list MOUNT | head -0`: the pipe's reader is gone before the
    // listing is written.
    let mut fds = [0; 2];
    check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }).expect("pipe");
    // SAFETY: pipe2 just returned both descriptors, owned by nobody else.
    let (reader, writer) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(reader);
    let out = snapfs()
        .args(["snapshot", "list", mount.path().to_str().expect("utf-8")])
        .stdout(writer)
        .output()
        .expect("run snapfs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGPIPE),
        "killed by SIGPIPE, as `ls` is: {:?} {stderr}",
        out.status
    );
}

#[test]
fn a_diff_against_the_live_volume_sees_every_operation_that_returned() {
    let mount = Mount::new();
    snapshot(&mount, "before");
    let mp = mount.path().to_str().expect("utf-8 path");
    // The daemon commits its catalog in groups; a diff read from another process must
    // still see a create the moment it has returned.
    for i in 0..20 {
        let name = format!("file{i}");
        fs::write(mount.path().join(&name), b"x").expect("write");
        // Both ways of naming the mount: --mount, and MOUNTPOINT FROM.
        let args: &[&str] = if i % 2 == 0 {
            &["diff", "before", "--mount", mp]
        } else {
            &["diff", mp, "before"]
        };
        let out = run(snapfs().args(args));
        let diff = String::from_utf8_lossy(&out.stdout);
        assert!(
            diff.lines().any(|line| line == format!("+\t/{name}")),
            "{name} missing from the diff: {diff}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn a_diff_prints_every_path_on_one_line_whatever_its_bytes() {
    use std::os::unix::ffi::OsStrExt;
    let mount = Mount::new();
    let mp = mount.path().to_str().expect("utf-8 path");
    let name = |bytes: &[u8]| mount.path().join(std::ffi::OsStr::from_bytes(bytes));
    fs::write(name(b"old\\name"), b"r").expect("write");
    snapshot(&mount, "before");
    for bytes in [
        &b"new\nline"[..],
        b"tab\there",
        b"\xffbin",
        "\u{e9}t\u{e9}".as_bytes(),
    ] {
        fs::write(name(bytes), b"x").expect("write");
    }
    fs::rename(name(b"old\\name"), name(b"re\\named")).expect("rename");
    let out = run(snapfs().args(["diff", mp, "before"]));
    assert!(out.status.success(), "{out:?}");
    let mut lines: Vec<String> = String::from_utf8(out.stdout)
        .expect("UTF-8 output")
        .lines()
        .map(str::to_owned)
        .collect();
    lines.sort();
    assert_eq!(
        lines,
        [
            "+\t/\\377bin",
            "+\t/new\\012line",
            "+\t/tab\\011here",
            "+\t/\u{e9}t\u{e9}",
            "M\t/",
            "R\t/old\\134name -> /re\\134named",
        ]
    );
}

#[test]
fn the_listing_prints_each_snapshot_on_one_line_whatever_its_bytes() {
    use std::os::unix::ffi::OsStrExt;
    let mount = Mount::new();
    fs::create_dir(
        mount
            .path()
            .join(".snapshots")
            .join(std::ffi::OsStr::from_bytes(b"caf\xff")),
    )
    .expect("mkdir of a name that is not UTF-8");
    snapshot(&mount, "tagged");
    let mp = mount.path().to_str().expect("utf-8 path");
    let out = run(snapfs().args(["snapshot", "tag", mp, "tagged", "note=two\nlines"]));
    assert!(out.status.success(), "{out:?}");
    let out = run(snapfs().args(["snapshot", "list", mp]));
    assert!(out.status.success(), "{out:?}");
    let list = String::from_utf8(out.stdout).expect("UTF-8 output");
    // The rows end at the blank line before the store's usage.
    let mut rows: Vec<&str> = list
        .lines()
        .skip(1)
        .take_while(|line| !line.is_empty())
        .collect();
    rows.sort();
    assert_eq!(rows.len(), 2, "{list}");
    assert!(rows[0].starts_with("caf\\377 "), "{list}");
    assert!(rows[1].starts_with("tagged "), "{list}");
    assert!(rows[1].ends_with("note=two\\012lines"), "{list}");
}

#[test]
fn the_listing_aligns_its_columns_to_the_longest_name_and_lock() {
    let mount = Mount::new();
    let long = "a-snapshot-named-at-length-for-the-test";
    snapshot(&mount, "s");
    snapshot(&mount, long);
    let mp = mount.path().to_str().expect("utf-8 path");
    let out = run(snapfs().args(["snapshot", "tag", mp, "s", "k=v"]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(snapfs().args(["snapshot", "lock", mp, long, "--for", "1d"]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(snapfs().args(["snapshot", "list", mp]));
    let list = String::from_utf8_lossy(&out.stdout);
    let mut lines = list.lines();
    let header = lines.next().expect("a header");
    let column = |name: &str| {
        header
            .find(name)
            .unwrap_or_else(|| panic!("{name}: {list}"))
    };
    let rows: Vec<&str> = lines.take(2).collect();
    for row in &rows {
        let state = row[column("STATE")..].split(' ').next().expect("a state");
        assert!(["pending", "completed"].contains(&state), "{list}");
        assert!(row[column("LOCK")..].starts_with(['-', 'g']), "{list}");
    }
    let tagged = rows.iter().find(|r| r.starts_with("s ")).expect("s listed");
    assert_eq!(&tagged[column("TAGS")..], "k=v", "{list}");
}
