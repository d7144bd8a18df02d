//! Attributes through the kernel: modes, owners, times, extended attributes, statfs and
//! the permission checks the kernel makes for other users. Every test has its own mount.

mod common;

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use common::{
    Mount, assert_bytes_eq, cpath, errno, errno_as_user, getxattr, getxattr_sized, listxattr,
    pattern, removexattr, rw, setxattr, statvfs, utimens,
};

fn mtime(meta: &fs::Metadata) -> (i64, i64) {
    (meta.mtime(), meta.mtime_nsec())
}

fn ctime(meta: &fs::Metadata) -> (i64, i64) {
    (meta.ctime(), meta.ctime_nsec())
}

fn now_ns() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos() as i128
}

fn as_ns((sec, nsec): (i64, i64)) -> i128 {
    i128::from(sec) * 1_000_000_000 + i128::from(nsec)
}

// ---------------------------------------------------------------------------------------
// Attributes

#[test]
fn create_modes_are_kept() {
    let m = Mount::new();
    let file = m.path().join("f");
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&file)
        .expect("create 0600");
    assert_eq!(
        fs::metadata(&file).expect("stat").mode(),
        libc::S_IFREG | 0o600
    );
    let dir = m.path().join("d");
    fs::DirBuilder::new()
        .mode(0o710)
        .create(&dir)
        .expect("mkdir 0710");
    assert_eq!(
        fs::metadata(&dir).expect("stat").mode(),
        libc::S_IFDIR | 0o710
    );
    // Without an explicit mode, the process umask applies (the kernel passes it along).
    let umask = fs::read_to_string("/proc/self/status")
        .expect("read status")
        .lines()
        .find_map(|l| l.strip_prefix("Umask:"))
        .map(|v| u32::from_str_radix(v.trim(), 8).expect("octal umask"))
        .expect("Umask line");
    File::create(m.path().join("plain")).expect("create 0666");
    let plain = fs::metadata(m.path().join("plain")).expect("stat");
    assert_eq!(plain.mode(), libc::S_IFREG | (0o666 & !umask));
    let meta = fs::metadata(m.path()).expect("stat root");
    assert_eq!(meta.mode(), libc::S_IFDIR | 0o755);
    assert_eq!(
        (meta.uid(), meta.gid()),
        (0, 0),
        "root of a volume made by root"
    );
}

#[test]
fn chmod_sets_mode_bits_and_ctime() {
    let m = Mount::new();
    let path = m.path().join("f");
    fs::write(&path, b"x").expect("write");
    let before = fs::metadata(&path).expect("stat");
    for mode in [0o640, 0o4755, 0o2711, 0o1777, 0o000] {
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).expect("chmod");
        assert_eq!(
            fs::metadata(&path).expect("stat").mode(),
            libc::S_IFREG | mode,
            "mode {mode:o}"
        );
    }
    let after = fs::metadata(&path).expect("stat");
    assert!(
        as_ns(ctime(&after)) > as_ns(ctime(&before)),
        "ctime {:?} -> {:?}",
        ctime(&before),
        ctime(&after)
    );
    assert_eq!(mtime(&after), mtime(&before), "chmod leaves mtime alone");
}

#[test]
fn chown_changes_owner_and_clears_setuid() {
    let m = Mount::new();
    let path = m.path().join("f");
    fs::write(&path, b"x").expect("write");
    fs::set_permissions(&path, fs::Permissions::from_mode(0o4755)).expect("chmod");
    std::os::unix::fs::chown(&path, Some(1234), Some(5678)).expect("chown");
    let meta = fs::metadata(&path).expect("stat");
    assert_eq!((meta.uid(), meta.gid()), (1234, 5678));
    assert_eq!(
        meta.mode(),
        libc::S_IFREG | 0o755,
        "chown clears set-user-id"
    );
    std::os::unix::fs::chown(&path, None, Some(42)).expect("chgrp");
    let meta = fs::metadata(&path).expect("stat");
    assert_eq!((meta.uid(), meta.gid()), (1234, 42));
    // A symlink itself (lchown).
    let link = m.path().join("l");
    std::os::unix::fs::symlink("f", &link).expect("symlink");
    std::os::unix::fs::lchown(&link, Some(7), Some(8)).expect("lchown");
    let meta = fs::symlink_metadata(&link).expect("lstat");
    assert_eq!((meta.uid(), meta.gid()), (7, 8));
    assert_eq!(fs::metadata(&path).expect("target").uid(), 1234);
}

#[test]
fn utimens_sets_exact_times() {
    let m = Mount::new();
    let path = m.path().join("f");
    fs::write(&path, b"x").expect("write");
    let cases = [
        ((1_000_000_000, 123_456_789), (1_500_000_000, 987_654_321)),
        ((0, 1), (2_000_000_000, 999_999_999)),
        ((-31_536_000, 500), (-1, 999_999_999)),
    ];
    for (atime, mtime_set) in cases {
        utimens(&path, atime, mtime_set).expect("utimensat");
        let meta = fs::metadata(&path).expect("stat");
        assert_eq!((meta.atime(), meta.atime_nsec()), atime, "atime");
        assert_eq!(mtime(&meta), mtime_set, "mtime");
    }
    // UTIME_OMIT keeps one, UTIME_NOW sets the other to the current time.
    let start = now_ns();
    utimens(&path, (0, libc::UTIME_OMIT), (0, libc::UTIME_NOW)).expect("utimensat now");
    let meta = fs::metadata(&path).expect("stat");
    assert_eq!((meta.atime(), meta.atime_nsec()), (-31_536_000, 500));
    let now = as_ns(mtime(&meta));
    assert!(
        now >= start - 1_000_000_000 && now <= now_ns(),
        "mtime {now}"
    );
    // On a directory and on a symlink (not followed).
    let link = m.path().join("l");
    std::os::unix::fs::symlink("f", &link).expect("symlink");
    utimens(&link, (5, 6), (7, 8)).expect("utimensat symlink");
    assert_eq!(mtime(&fs::symlink_metadata(&link).expect("lstat")), (7, 8));
    assert_eq!(as_ns(mtime(&fs::metadata(&path).expect("stat"))), now);
    utimens(m.path(), (9, 10), (11, 12)).expect("utimensat dir");
    assert_eq!(mtime(&fs::metadata(m.path()).expect("stat")), (11, 12));
}

#[test]
fn write_and_truncate_update_mtime_and_ctime() {
    let m = Mount::new();
    let path = m.path().join("f");
    fs::write(&path, b"x").expect("write");
    let old = (1_000_000_000, 0);
    utimens(&path, old, old).expect("set old times");
    let before_ctime = ctime(&fs::metadata(&path).expect("stat"));
    let start = now_ns();
    rw(&path).write_all_at(b"hello", 1).expect("write");
    let meta = fs::metadata(&path).expect("stat after write");
    assert!(
        as_ns(mtime(&meta)) >= start - 1_000_000_000,
        "mtime {:?}",
        mtime(&meta)
    );
    assert!(
        as_ns(ctime(&meta)) > as_ns(before_ctime),
        "ctime {:?}",
        ctime(&meta)
    );

    utimens(&path, old, old).expect("set old times again");
    rw(&path).set_len(2).expect("truncate");
    let meta = fs::metadata(&path).expect("stat after truncate");
    assert!(
        as_ns(mtime(&meta)) >= start - 1_000_000_000,
        "mtime {:?}",
        mtime(&meta)
    );

    // Creating an entry updates the directory's mtime.
    utimens(m.path(), old, old).expect("old dir times");
    fs::write(m.path().join("new"), b"").expect("create");
    let dir_mtime = as_ns(mtime(&fs::metadata(m.path()).expect("stat dir")));
    assert!(dir_mtime >= start - 1_000_000_000, "dir mtime {dir_mtime}");
}

// ---------------------------------------------------------------------------------------
// Extended attributes

#[test]
fn user_xattrs_set_get_list_remove() {
    let m = Mount::new();
    let path = m.path().join("f");
    fs::write(&path, b"x").expect("write");
    assert_eq!(listxattr(&path).expect("list empty"), Vec::<String>::new());
    setxattr(&path, "user.color", b"blue", 0).expect("set color");
    let binary = [0u8, 1, 2, 0, 255];
    setxattr(&path, "user.binary", &binary, 0).expect("set binary");
    setxattr(&path, "user.empty", b"", 0).expect("set empty");
    let big = pattern(65536, 11);
    setxattr(&path, "user.big", &big, 0).expect("set 64 KiB value");
    assert_eq!(
        listxattr(&path).expect("list"),
        ["user.big", "user.binary", "user.color", "user.empty"]
    );
    assert_eq!(getxattr(&path, "user.color").expect("get"), b"blue");
    assert_eq!(getxattr(&path, "user.binary").expect("get"), binary);
    assert_eq!(getxattr(&path, "user.empty").expect("get"), b"");
    assert_bytes_eq(
        &getxattr(&path, "user.big").expect("get"),
        &big,
        "big xattr",
    );
    assert_eq!(
        errno(getxattr_sized(&path, "user.color", 2)),
        libc::ERANGE,
        "buffer too small"
    );
    setxattr(&path, "user.color", b"green", 0).expect("overwrite");
    assert_eq!(getxattr(&path, "user.color").expect("get"), b"green");
    removexattr(&path, "user.color").expect("remove");
    assert_eq!(errno(getxattr(&path, "user.color")), libc::ENODATA);
    assert_eq!(
        listxattr(&path).expect("list"),
        ["user.big", "user.binary", "user.empty"]
    );
    // Directories carry them too.
    setxattr(m.path(), "user.tag", b"root", 0).expect("set on dir");
    assert_eq!(getxattr(m.path(), "user.tag").expect("get on dir"), b"root");
}

#[test]
fn xattr_flags_and_missing_names() {
    let m = Mount::new();
    let path = m.path().join("f");
    fs::write(&path, b"x").expect("write");
    setxattr(&path, "user.a", b"1", libc::XATTR_CREATE).expect("create new");
    assert_eq!(
        errno(setxattr(&path, "user.a", b"2", libc::XATTR_CREATE)),
        libc::EEXIST
    );
    assert_eq!(
        errno(setxattr(&path, "user.b", b"2", libc::XATTR_REPLACE)),
        libc::ENODATA
    );
    setxattr(&path, "user.a", b"3", libc::XATTR_REPLACE).expect("replace existing");
    assert_eq!(getxattr(&path, "user.a").expect("get"), b"3");
    assert_eq!(errno(getxattr(&path, "user.missing")), libc::ENODATA);
    assert_eq!(errno(removexattr(&path, "user.missing")), libc::ENODATA);
    assert_eq!(listxattr(&path).expect("list"), ["user.a"]);
}

// ---------------------------------------------------------------------------------------
// statfs

#[test]
fn statvfs_reports_sane_numbers() {
    let m = Mount::new();
    let stat = statvfs(m.path()).expect("statvfs");
    assert_eq!(stat.f_namemax, 255);
    assert!(stat.f_bsize > 0 && stat.f_frsize > 0);
    assert!(stat.f_blocks > 0);
    assert!(stat.f_bfree <= stat.f_blocks && stat.f_bavail <= stat.f_bfree);
    assert!(stat.f_files > 0 && stat.f_ffree <= stat.f_files);
}

// ---------------------------------------------------------------------------------------
// Permissions (the kernel enforces them: default_permissions)

const NOBODY: u32 = 65534;

fn open_errno_as_nobody(path: &Path, flags: libc::c_int) -> i32 {
    let c_path = cpath(path);
    errno_as_user(NOBODY, NOBODY, || {
        // SAFETY: open with a valid path; the descriptor dies with the child.
        unsafe { libc::open(c_path.as_ptr(), flags | libc::O_CLOEXEC, 0o644) }
    })
}

/// A write, truncate or fallocate by a user without CAP_FSETID drops set-user-id, and
/// set-group-id where it means "group executes"; root's keep them. The kernel leaves this
/// to snapfs (FUSE_HANDLE_KILLPRIV_V2), so the bits must go here, and the kernel's cached
/// mode must show it at once.
#[test]
fn changes_by_other_users_drop_set_id_bits_and_roots_keep_them() {
    let m = Mount::with_args(&["--allow-other"]);
    let mode_of = |path: &Path| fs::metadata(path).expect("stat").mode() & 0o7777;
    let as_nobody = |path: &Path, op: fn(libc::c_int) -> libc::c_int| {
        let c_path = cpath(path);
        errno_as_user(NOBODY, NOBODY, || {
            // SAFETY: open with a valid path; the descriptor dies with the child.
            let fd = unsafe { libc::open(c_path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
            if fd < 0 { fd } else { op(fd) }
        })
    };
    let write_one = |fd: libc::c_int| {
        // SAFETY: writes one byte from a static buffer to an open descriptor.
        unsafe { libc::pwrite(fd, b"y".as_ptr().cast(), 1, 1) as libc::c_int }
    };
    // SAFETY (both): system calls on an open descriptor, with no pointers.
    let truncate = |fd: libc::c_int| unsafe { libc::ftruncate(fd, 1) };
    let fallocate = |fd: libc::c_int| unsafe { libc::fallocate(fd, 0, 0, 8192) };
    for (name, op, mode, left) in [
        (
            "w-suid",
            write_one as fn(libc::c_int) -> libc::c_int,
            0o4777,
            0o777,
        ),
        ("w-sgid", write_one, 0o2777, 0o777),
        ("w-both", write_one, 0o6775 | 0o002, 0o777),
        ("t-suid", truncate, 0o4777, 0o777),
        ("f-suid", fallocate, 0o4777, 0o777),
        ("w-plain", write_one, 0o777, 0o777),
    ] {
        let path = m.path().join(name);
        fs::write(&path, b"xyz").expect("write");
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).expect("chmod");
        assert_eq!(mode_of(&path), mode, "{name}: before");
        assert_eq!(as_nobody(&path, op), 0, "{name}: the change as nobody");
        assert_eq!(mode_of(&path), left, "{name}: after a change by nobody");
    }
    assert_eq!(fs::read(m.path().join("w-suid")).expect("read"), b"xyz");
    assert_eq!(fs::read(m.path().join("t-suid")).expect("read"), b"x");

    let path = m.path().join("root");
    fs::write(&path, b"xyz").expect("write");
    fs::set_permissions(&path, fs::Permissions::from_mode(0o6777)).expect("chmod");
    let file = OpenOptions::new().write(true).open(&path).expect("open");
    file.write_all_at(b"y", 1).expect("root's write");
    file.set_len(2).expect("root's truncate");
    drop(file);
    assert_eq!(mode_of(&path), 0o6777, "root keeps set-id bits");
    assert_eq!(fs::read(&path).expect("read"), b"xy");
}

#[test]
fn permissions_are_enforced_for_other_users() {
    let m = Mount::with_args(&["--allow-other"]);
    let secret = m.path().join("secret");
    let public = m.path().join("public");
    for (path, mode) in [(&secret, 0o600), (&public, 0o644)] {
        fs::write(path, b"data").expect("write");
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
    }
    assert_eq!(open_errno_as_nobody(&public, libc::O_RDONLY), 0);
    assert_eq!(open_errno_as_nobody(&secret, libc::O_RDONLY), libc::EACCES);
    assert_eq!(open_errno_as_nobody(&public, libc::O_WRONLY), libc::EACCES);
    let new = m.path().join("new");
    assert_eq!(
        open_errno_as_nobody(&new, libc::O_WRONLY | libc::O_CREAT),
        libc::EACCES,
        "root's 0755 directory refuses nobody"
    );
    assert_eq!(errno(fs::metadata(&new)), libc::ENOENT);
    // A directory nobody owns lets nobody create files.
    let own = m.path().join("own");
    fs::create_dir(&own).expect("mkdir");
    std::os::unix::fs::chown(&own, Some(NOBODY), Some(NOBODY)).expect("chown");
    let in_own = own.join("mine");
    assert_eq!(
        open_errno_as_nobody(&in_own, libc::O_WRONLY | libc::O_CREAT),
        0
    );
    let meta = fs::metadata(&in_own).expect("created by nobody");
    assert_eq!((meta.uid(), meta.gid()), (NOBODY, NOBODY));
    // Root still reads the 0600 file.
    assert_eq!(fs::read(&secret).expect("root reads"), b"data");
}

#[test]
fn other_users_cannot_enter_without_allow_other() {
    let m = Mount::new();
    let public = m.path().join("public");
    fs::write(&public, b"data").expect("write");
    assert_eq!(open_errno_as_nobody(&public, libc::O_RDONLY), libc::EACCES);
}

// ---------------------------------------------------------------------------------------
// Inheritance and xattr namespaces

#[test]
fn a_setgid_directory_passes_its_group_down() {
    let m = Mount::new();
    let dir = m.path().join("shared");
    fs::create_dir(&dir).expect("mkdir");
    std::os::unix::fs::chown(&dir, None, Some(4321)).expect("chgrp");
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o2775)).expect("chmod g+s");
    fs::write(dir.join("f"), b"").expect("create");
    fs::DirBuilder::new()
        .mode(0o755)
        .create(dir.join("sub"))
        .expect("mkdir sub");
    let file = fs::metadata(dir.join("f")).expect("stat f");
    assert_eq!(file.gid(), 4321);
    assert_eq!(file.mode() & 0o2000, 0, "files do not get set-group-id");
    let sub = fs::metadata(dir.join("sub")).expect("stat sub");
    assert_eq!(sub.gid(), 4321);
    assert_eq!(sub.mode(), libc::S_IFDIR | 0o2755);
}

#[test]
fn xattr_namespaces() {
    let m = Mount::new();
    let path = m.path().join("f");
    fs::write(&path, b"x").expect("write");
    setxattr(&path, "trusted.t", b"root only", 0).expect("trusted.* as root");
    assert_eq!(getxattr(&path, "trusted.t").expect("get"), b"root only");
    setxattr(&path, "security.s", b"label", 0).expect("security.*");
    assert_eq!(getxattr(&path, "security.s").expect("get"), b"label");
    assert_eq!(errno(setxattr(&path, "foo.bar", b"v", 0)), libc::EOPNOTSUPP);
}

/// Link counts and ctimes of a file change when another of its names comes or goes: the
/// kernel updates the inode it caches from those requests itself, long TTL or not.
#[test]
fn link_counts_follow_other_names_at_once() {
    let m = Mount::new();
    let a = m.path().join("a");
    let b = m.path().join("b");
    let c = m.path().join("c");
    fs::write(&a, b"x").expect("write");
    fs::hard_link(&a, &b).expect("link");
    assert_eq!(fs::metadata(&a).expect("stat").nlink(), 2);
    let before = ctime(&fs::metadata(&a).expect("stat"));
    std::thread::sleep(std::time::Duration::from_millis(20));
    fs::remove_file(&b).expect("unlink b");
    let meta = fs::metadata(&a).expect("stat");
    assert_eq!(meta.nlink(), 1, "after unlinking the other name");
    assert!(
        as_ns(ctime(&meta)) > as_ns(before),
        "unlink changes the inode's ctime"
    );
    fs::hard_link(&a, &b).expect("link again");
    fs::write(&c, b"y").expect("write c");
    fs::rename(&c, &b).expect("rename over b");
    assert_eq!(
        fs::metadata(&a).expect("stat").nlink(),
        1,
        "after a rename over b"
    );
    let dir = m.path().join("d");
    fs::create_dir(&dir).expect("mkdir");
    assert_eq!(fs::metadata(&dir).expect("stat").nlink(), 2);
    fs::create_dir(dir.join("sub")).expect("mkdir sub");
    assert_eq!(
        fs::metadata(&dir).expect("stat").nlink(),
        3,
        "a subdirectory"
    );
    fs::remove_dir(dir.join("sub")).expect("rmdir sub");
    assert_eq!(fs::metadata(&dir).expect("stat").nlink(), 2, "its removal");
}
