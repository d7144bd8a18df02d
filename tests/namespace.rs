//! The namespace through the kernel: directories, names, rename, links and special files,
//! with the exact errno of every refusal. Every test has its own mount.

mod common;

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use common::{BLOCK, Mount, assert_bytes_eq, dir_names, errno, mkfifo, pattern, renameat2};

// ---------------------------------------------------------------------------------------
// Directories and errors

#[test]
fn mkdir_and_rmdir() {
    let m = Mount::new();
    let dir = m.path().join("d");
    fs::create_dir(&dir).expect("mkdir");
    assert!(fs::metadata(&dir).expect("stat").is_dir());
    fs::create_dir(dir.join("sub")).expect("mkdir sub");
    assert_eq!(errno(fs::remove_dir(&dir)), libc::ENOTEMPTY);
    fs::remove_dir(dir.join("sub")).expect("rmdir sub");
    fs::remove_dir(&dir).expect("rmdir");
    assert_eq!(errno(fs::metadata(&dir)), libc::ENOENT);
    assert_eq!(fs::read_dir(m.path()).expect("list root").count(), 0);
}

#[test]
fn missing_names_are_enoent() {
    let m = Mount::new();
    let missing = m.path().join("missing");
    assert_eq!(errno(File::open(&missing)), libc::ENOENT);
    assert_eq!(errno(fs::metadata(&missing)), libc::ENOENT);
    assert_eq!(errno(fs::remove_file(&missing)), libc::ENOENT);
    assert_eq!(errno(fs::remove_dir(&missing)), libc::ENOENT);
    assert_eq!(errno(fs::create_dir(missing.join("x"))), libc::ENOENT);
    assert_eq!(
        errno(fs::rename(&missing, m.path().join("y"))),
        libc::ENOENT
    );
    assert_eq!(errno(fs::read_link(&missing)), libc::ENOENT);
}

#[test]
fn creating_an_existing_name_is_eexist() {
    let m = Mount::new();
    let (dir, file) = (m.path().join("d"), m.path().join("f"));
    fs::create_dir(&dir).expect("mkdir");
    fs::write(&file, b"x").expect("write");
    assert_eq!(errno(fs::create_dir(&dir)), libc::EEXIST);
    assert_eq!(errno(fs::create_dir(&file)), libc::EEXIST);
    let exclusive = || OpenOptions::new().write(true).create_new(true).open(&file);
    assert_eq!(errno(exclusive()), libc::EEXIST);
    assert_eq!(errno(mkfifo(&file, 0o644)), libc::EEXIST);
    assert_eq!(errno(std::os::unix::fs::symlink("t", &dir)), libc::EEXIST);
    assert_eq!(errno(fs::hard_link(&file, &dir)), libc::EEXIST);
    assert_eq!(fs::read(&file).expect("file untouched"), b"x");
}

#[test]
fn a_path_through_a_file_is_enotdir() {
    let m = Mount::new();
    let file = m.path().join("f");
    fs::write(&file, b"x").expect("write");
    let through = file.join("x");
    assert_eq!(errno(File::open(&through)), libc::ENOTDIR);
    assert_eq!(errno(fs::metadata(&through)), libc::ENOTDIR);
    assert_eq!(errno(fs::create_dir(&through)), libc::ENOTDIR);
    assert_eq!(errno(File::create(&through)), libc::ENOTDIR);
    assert_eq!(errno(fs::read_dir(&file)), libc::ENOTDIR);
    assert_eq!(errno(fs::remove_dir(&file)), libc::ENOTDIR);
}

#[test]
fn unlinking_or_writing_a_directory_is_eisdir() {
    let m = Mount::new();
    let dir = m.path().join("d");
    fs::create_dir(&dir).expect("mkdir");
    assert_eq!(errno(fs::remove_file(&dir)), libc::EISDIR);
    assert_eq!(
        errno(OpenOptions::new().write(true).open(&dir)),
        libc::EISDIR
    );
    assert_eq!(
        errno(OpenOptions::new().read(true).write(true).open(&dir)),
        libc::EISDIR
    );
    assert!(fs::metadata(&dir).expect("still there").is_dir());
    // Reading a directory as a file: open works, read(2) is EISDIR.
    let mut handle = File::open(&dir).expect("open dir read-only");
    let mut buf = [0u8; 16];
    assert_eq!(errno(handle.read(&mut buf)), libc::EISDIR);
}

#[test]
fn dot_and_dotdot() {
    let m = Mount::new();
    let dir = m.path().join("d");
    fs::create_dir_all(dir.join("sub")).expect("mkdir -p");
    assert_eq!(errno(fs::remove_dir(dir.join("."))), libc::EINVAL);
    assert_eq!(errno(fs::remove_dir(dir.join(".."))), libc::ENOTEMPTY);
    assert_eq!(errno(fs::create_dir(dir.join("."))), libc::EEXIST);
    assert_eq!(errno(fs::create_dir(dir.join(".."))), libc::EEXIST);
    assert_eq!(errno(fs::remove_file(dir.join("."))), libc::EISDIR);
    assert_eq!(errno(fs::remove_file(dir.join(".."))), libc::EISDIR);
    assert_eq!(
        errno(fs::rename(dir.join("."), m.path().join("x"))),
        libc::EBUSY
    );
    assert_eq!(
        errno(fs::rename(dir.join("sub"), dir.join(".."))),
        libc::EBUSY
    );
    let ino = |p: &Path| fs::metadata(p).expect("stat").ino();
    assert_eq!(ino(&dir.join(".")), ino(&dir));
    assert_eq!(ino(&dir.join("..")), ino(m.path()));
    assert_eq!(ino(&dir.join("sub/..")), ino(&dir));
    assert_eq!(
        ino(&m.path().join("..")),
        ino(m.path().parent().expect("parent"))
    );
    // A trailing slash names the directory itself.
    fs::remove_dir(dir.join("sub/")).expect("rmdir with trailing slash");
    assert_eq!(errno(fs::metadata(dir.join("sub"))), libc::ENOENT);
}

#[test]
fn listing_shows_every_entry_once() {
    let m = Mount::new();
    let mut expected: Vec<String> = (0..300).map(|i| format!("entry-{i:04}")).collect();
    for name in &expected {
        fs::write(m.path().join(name), name).expect("create");
    }
    let mut names: Vec<String> = fs::read_dir(m.path())
        .expect("read_dir")
        .map(|e| {
            e.expect("entry")
                .file_name()
                .into_string()
                .expect("UTF-8 name")
        })
        .collect();
    names.sort();
    expected.sort();
    assert_eq!(names, expected);
}

/// The kernel keeps a live directory's listing across opens (FOPEN_CACHE_DIR): every
/// change through the mount must still show in the next listing. Each step lists both
/// directories first, so the kernel holds their listings when the change comes.
#[test]
fn listings_follow_every_change_after_the_kernel_kept_them() {
    let m = Mount::new();
    let (a, b) = (m.path().join("a"), m.path().join("b"));
    fs::create_dir(&a).expect("mkdir a");
    fs::create_dir(&b).expect("mkdir b");
    let step = |name: &str, change: &dyn Fn(), in_a: &[&str], in_b: &[&str]| {
        dir_names(&a);
        dir_names(&b);
        change();
        assert_eq!(dir_names(&a), in_a, "a after {name}");
        assert_eq!(dir_names(&b), in_b, "b after {name}");
    };
    step(
        "create",
        &|| fs::write(a.join("f"), b"x").expect("create"),
        &["f"],
        &[],
    );
    step(
        "link",
        &|| fs::hard_link(a.join("f"), b.join("g")).expect("link"),
        &["f"],
        &["g"],
    );
    let across = || fs::rename(a.join("f"), b.join("h")).expect("rename");
    step("rename across", &across, &[], &["g", "h"]);
    let within = || fs::rename(b.join("h"), b.join("i")).expect("rename");
    step("rename within", &within, &[], &["g", "i"]);
    step(
        "mkdir",
        &|| fs::create_dir(a.join("sub")).expect("mkdir"),
        &["sub"],
        &["g", "i"],
    );
    let symlink = || std::os::unix::fs::symlink("i", b.join("s")).expect("symlink");
    step("symlink", &symlink, &["sub"], &["g", "i", "s"]);
    step(
        "unlink",
        &|| fs::remove_file(b.join("g")).expect("unlink"),
        &["sub"],
        &["i", "s"],
    );
    step(
        "rmdir",
        &|| fs::remove_dir(a.join("sub")).expect("rmdir"),
        &[],
        &["i", "s"],
    );
}

// ---------------------------------------------------------------------------------------
// Names

#[test]
fn names_up_to_255_bytes_work_and_256_is_enametoolong() {
    let m = Mount::new();
    let longest = "n".repeat(255);
    let path = m.path().join(&longest);
    fs::write(&path, b"long").expect("create 255-byte name");
    assert_eq!(fs::read(&path).expect("read"), b"long");
    let listed: Vec<_> = fs::read_dir(m.path())
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(listed, vec![OsStr::new(&longest).to_owned()]);
    fs::create_dir(m.path().join("d".repeat(255))).expect("mkdir 255-byte name");

    let too_long = m.path().join("x".repeat(256));
    assert_eq!(errno(File::create(&too_long)), libc::ENAMETOOLONG);
    assert_eq!(errno(fs::create_dir(&too_long)), libc::ENAMETOOLONG);
    assert_eq!(errno(fs::metadata(&too_long)), libc::ENAMETOOLONG);
    assert_eq!(errno(fs::rename(&path, &too_long)), libc::ENAMETOOLONG);
    assert_eq!(
        errno(std::os::unix::fs::symlink("t", &too_long)),
        libc::ENAMETOOLONG
    );
}

#[test]
fn non_utf8_names_round_trip() {
    let m = Mount::new();
    let name = OsStr::from_bytes(b"caf\xe9");
    let path = m.path().join(name);
    fs::write(&path, b"latin-1").expect("create non-UTF-8 name");
    let dir_name = OsStr::from_bytes(b"\xff\xfe dir");
    fs::create_dir(m.path().join(dir_name)).expect("mkdir non-UTF-8 name");
    let mut listed: Vec<Vec<u8>> = fs::read_dir(m.path())
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().as_bytes().to_vec())
        .collect();
    listed.sort();
    assert_eq!(listed, vec![b"caf\xe9".to_vec(), b"\xff\xfe dir".to_vec()]);
    assert_eq!(fs::read(&path).expect("open by that name"), b"latin-1");
    // The UTF-8 spelling of "café" is a different name.
    assert_eq!(errno(fs::metadata(m.path().join("café"))), libc::ENOENT);
}

// ---------------------------------------------------------------------------------------
// Rename

#[test]
fn rename_replaces_a_file() {
    let m = Mount::new();
    let (a, b) = (m.path().join("a"), m.path().join("b"));
    fs::write(&a, b"new").expect("write a");
    fs::write(&b, b"old").expect("write b");
    let ino = fs::metadata(&a).expect("stat a").ino();
    fs::rename(&a, &b).expect("rename");
    assert_eq!(errno(fs::metadata(&a)), libc::ENOENT);
    assert_eq!(fs::read(&b).expect("read b"), b"new");
    let meta = fs::metadata(&b).expect("stat b");
    assert_eq!(meta.ino(), ino);
    assert_eq!(meta.nlink(), 1);
    // Renaming onto itself (or another link of itself) changes nothing.
    fs::rename(&b, &b).expect("rename onto itself");
    fs::hard_link(&b, &a).expect("link");
    fs::rename(&a, &b).expect("rename onto own link");
    assert_eq!(fs::metadata(&a).expect("both names stay").nlink(), 2);
}

#[test]
fn rename_across_directories() {
    let m = Mount::new();
    fs::create_dir(m.path().join("x")).expect("mkdir x");
    fs::create_dir(m.path().join("y")).expect("mkdir y");
    let data = pattern(BLOCK + 10, 9);
    fs::write(m.path().join("x/f"), &data).expect("write");
    fs::rename(m.path().join("x/f"), m.path().join("y/g")).expect("rename");
    assert_eq!(errno(fs::metadata(m.path().join("x/f"))), libc::ENOENT);
    assert_bytes_eq(
        &fs::read(m.path().join("y/g")).expect("read"),
        &data,
        "moved file",
    );
    assert_eq!(fs::read_dir(m.path().join("x")).expect("ls x").count(), 0);
}

#[test]
fn rename_a_directory_with_its_contents() {
    let m = Mount::new();
    let root = m.path();
    fs::create_dir_all(root.join("a/d/inner")).expect("mkdir -p");
    fs::write(root.join("a/d/inner/f"), b"deep").expect("write");
    fs::create_dir(root.join("b")).expect("mkdir b");
    fs::rename(root.join("a/d"), root.join("b/e")).expect("rename dir");
    assert_eq!(
        fs::read(root.join("b/e/inner/f")).expect("read moved"),
        b"deep"
    );
    assert_eq!(errno(fs::metadata(root.join("a/d"))), libc::ENOENT);
    let stat = |p: &str| fs::metadata(root.join(p)).expect("stat");
    assert_eq!(
        stat("b/e/..").ino(),
        stat("b").ino(),
        "'..' follows the move"
    );
    assert_eq!(stat("a").nlink(), 2, "old parent lost a subdirectory");
    assert_eq!(stat("b").nlink(), 3, "new parent gained a subdirectory");
    // Over an empty directory: replaced.
    fs::create_dir(root.join("a/empty")).expect("mkdir empty");
    fs::rename(root.join("b/e"), root.join("a/empty")).expect("dir over empty dir");
    assert_eq!(
        fs::read(root.join("a/empty/inner/f")).expect("read"),
        b"deep"
    );
    assert_eq!(stat("a").nlink(), 3);
    assert_eq!(stat("b").nlink(), 2);
}

#[test]
fn rename_type_conflicts() {
    let m = Mount::new();
    let root = m.path();
    for dir in ["d", "full", "full/child"] {
        fs::create_dir(root.join(dir)).expect("mkdir");
    }
    fs::write(root.join("f"), b"file").expect("write");
    assert_eq!(
        errno(fs::rename(root.join("d"), root.join("full"))),
        libc::ENOTEMPTY
    );
    assert_eq!(
        errno(fs::rename(root.join("d"), root.join("f"))),
        libc::ENOTDIR
    );
    assert_eq!(
        errno(fs::rename(root.join("f"), root.join("d"))),
        libc::EISDIR
    );
    // Nothing moved.
    assert!(fs::metadata(root.join("d")).expect("d").is_dir());
    assert!(
        fs::metadata(root.join("full/child"))
            .expect("child")
            .is_dir()
    );
    assert_eq!(fs::read(root.join("f")).expect("f"), b"file");
}

#[test]
fn rename_noreplace() {
    let m = Mount::new();
    let (a, b, c) = (m.path().join("a"), m.path().join("b"), m.path().join("c"));
    fs::write(&a, b"A").expect("write a");
    fs::write(&b, b"B").expect("write b");
    assert_eq!(
        errno(renameat2(&a, &b, libc::RENAME_NOREPLACE)),
        libc::EEXIST
    );
    assert_eq!(fs::read(&a).expect("a"), b"A");
    assert_eq!(fs::read(&b).expect("b"), b"B");
    renameat2(&a, &c, libc::RENAME_NOREPLACE).expect("noreplace to a free name");
    assert_eq!(fs::read(&c).expect("c"), b"A");
    assert_eq!(errno(fs::metadata(&a)), libc::ENOENT);
}

#[test]
fn rename_exchange_swaps_two_entries() {
    let m = Mount::new();
    let root = m.path();
    fs::create_dir(root.join("dir")).expect("mkdir");
    fs::write(root.join("a"), b"A").expect("write a");
    fs::write(root.join("dir/b"), b"B").expect("write b");
    renameat2(&root.join("a"), &root.join("dir/b"), libc::RENAME_EXCHANGE).expect("exchange");
    assert_eq!(fs::read(root.join("a")).expect("a"), b"B");
    assert_eq!(fs::read(root.join("dir/b")).expect("b"), b"A");

    // A file and a directory in different parents: link counts follow the directory.
    fs::create_dir(root.join("sub")).expect("mkdir sub");
    fs::write(root.join("sub/marker"), b"m").expect("write marker");
    renameat2(
        &root.join("sub"),
        &root.join("dir/b"),
        libc::RENAME_EXCHANGE,
    )
    .expect("exchange file and dir");
    assert_eq!(fs::read(root.join("sub")).expect("file now at sub"), b"A");
    assert_eq!(
        fs::read(root.join("dir/b/marker")).expect("dir moved"),
        b"m"
    );
    let stat = |p: &str| fs::metadata(root.join(p)).expect("stat");
    assert_eq!(stat("dir").nlink(), 3);
    assert_eq!(stat("").nlink(), 3, "root: '.', its name, and dir/..");
    assert_eq!(stat("dir/b/..").ino(), stat("dir").ino());

    assert_eq!(
        errno(renameat2(
            &root.join("a"),
            &root.join("missing"),
            libc::RENAME_EXCHANGE
        )),
        libc::ENOENT
    );
}

#[test]
fn moving_a_directory_into_itself_is_einval() {
    let m = Mount::new();
    let root = m.path();
    fs::create_dir_all(root.join("d/sub/deeper")).expect("mkdir -p");
    assert_eq!(
        errno(fs::rename(root.join("d"), root.join("d/sub/deeper/x"))),
        libc::EINVAL
    );
    assert_eq!(
        errno(fs::rename(root.join("d"), root.join("d/x"))),
        libc::EINVAL
    );
    assert!(
        fs::metadata(root.join("d/sub/deeper"))
            .expect("intact")
            .is_dir()
    );
}

// ---------------------------------------------------------------------------------------
// Links and special files

#[test]
fn symlinks() {
    let m = Mount::new();
    let root = m.path();
    fs::write(root.join("target"), b"through the link").expect("write");
    let link = root.join("link");
    std::os::unix::fs::symlink("target", &link).expect("symlink");
    assert_eq!(fs::read_link(&link).expect("readlink"), Path::new("target"));
    let meta = fs::symlink_metadata(&link).expect("lstat");
    assert!(meta.file_type().is_symlink());
    assert_eq!(meta.len(), 6, "a symlink's size is its target's length");
    assert_eq!(fs::read(&link).expect("read through"), b"through the link");

    let dangling = root.join("dangling");
    let target = OsStr::from_bytes(b"no/such/\xe9/place");
    std::os::unix::fs::symlink(target, &dangling).expect("dangling symlink");
    assert_eq!(
        fs::read_link(&dangling).expect("readlink").as_os_str(),
        target
    );
    assert_eq!(errno(fs::metadata(&dangling)), libc::ENOENT);
    // readlink of a regular file is EINVAL.
    assert_eq!(errno(fs::read_link(root.join("target"))), libc::EINVAL);
}

#[test]
fn hard_links_share_data_and_count_links() {
    let m = Mount::new();
    let (a, b) = (m.path().join("a"), m.path().join("b"));
    fs::write(&a, b"first").expect("write");
    assert_eq!(fs::metadata(&a).expect("stat").nlink(), 1);
    fs::hard_link(&a, &b).expect("link");
    let (meta_a, meta_b) = (
        fs::metadata(&a).expect("stat a"),
        fs::metadata(&b).expect("stat b"),
    );
    assert_eq!(meta_a.nlink(), 2);
    assert_eq!(meta_b.nlink(), 2);
    assert_eq!(meta_a.ino(), meta_b.ino());
    let data = pattern(BLOCK + 3, 10);
    fs::write(&b, &data).expect("write through b");
    assert_bytes_eq(&fs::read(&a).expect("read a"), &data, "shared data");
    fs::remove_file(&a).expect("unlink a");
    assert_eq!(fs::metadata(&b).expect("stat b").nlink(), 1);
    assert_bytes_eq(&fs::read(&b).expect("read b"), &data, "data kept");
    assert_eq!(
        errno(fs::hard_link(m.path(), m.path().join("dirlink"))),
        libc::EPERM
    );
}

#[test]
fn directory_link_count_is_two_plus_subdirectories() {
    let m = Mount::new();
    let dir = m.path().join("d");
    let nlink = |p: &Path| fs::metadata(p).expect("stat").nlink();
    assert_eq!(nlink(m.path()), 2);
    fs::create_dir(&dir).expect("mkdir");
    assert_eq!(nlink(&dir), 2);
    assert_eq!(nlink(m.path()), 3);
    for sub in ["s1", "s2", "s3"] {
        fs::create_dir(dir.join(sub)).expect("mkdir sub");
    }
    fs::write(dir.join("file"), b"").expect("file");
    mkfifo(&dir.join("fifo"), 0o600).expect("fifo");
    assert_eq!(nlink(&dir), 5, "files do not count");
    fs::remove_dir(dir.join("s1")).expect("rmdir");
    assert_eq!(nlink(&dir), 4);
    fs::rename(dir.join("s2"), m.path().join("s2")).expect("move out");
    assert_eq!(nlink(&dir), 3);
    assert_eq!(nlink(m.path()), 4);
}

#[test]
fn mkfifo_makes_a_fifo() {
    let m = Mount::new();
    let path = m.path().join("pipe");
    mkfifo(&path, 0o640).expect("mkfifo");
    let meta = fs::symlink_metadata(&path).expect("lstat");
    assert!(meta.file_type().is_fifo());
    assert_eq!(meta.mode(), libc::S_IFIFO | 0o640);
    assert_eq!(meta.len(), 0);
    let listed = fs::read_dir(m.path())
        .expect("read_dir")
        .next()
        .expect("one entry")
        .expect("entry");
    assert!(listed.file_type().expect("d_type").is_fifo());
}
