//! What tools expect of a filesystem, through the kernel: fallocate in every mode compared
//! byte for byte (and errno for errno) with the same calls on the native disk, SEEK_DATA and
//! SEEK_HOLE over sparse files, and copy_file_range sharing whole blocks (no new data in the
//! data dir), with snapshots, uploads and restores of the files it made. Every test has its
//! own mount.

mod common;

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::process::Command;

use common::{
    BLOCK, Mount, assert_bytes_eq, block_files, create, disk_usage, errno, pattern, run, rw,
    take_snapshot, wait_completed,
};

const B: i64 = BLOCK as i64;
const KEEP: i32 = libc::FALLOC_FL_KEEP_SIZE;
const PUNCH: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
const ZERO: i32 = libc::FALLOC_FL_ZERO_RANGE;

fn fallocate(file: &File, mode: i32, offset: i64, len: i64) -> io::Result<()> {
    // SAFETY: fallocate on a descriptor `file` keeps open.
    if unsafe { libc::fallocate(file.as_raw_fd(), mode, offset, len) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn seek(file: &File, offset: i64, whence: i32) -> io::Result<i64> {
    // SAFETY: lseek on a descriptor `file` keeps open.
    let at = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
    if at < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(at)
    }
}

/// One copy_file_range(2) call with explicit offsets.
fn copy_range(src: &File, src_at: i64, dst: &File, dst_at: i64, len: usize) -> io::Result<usize> {
    let (mut src_at, mut dst_at) = (src_at, dst_at);
    // SAFETY: both descriptors are kept open by their Files; the offsets are locals.
    let n = unsafe {
        libc::copy_file_range(
            src.as_raw_fd(),
            &mut src_at,
            dst.as_raw_fd(),
            &mut dst_at,
            len,
            0,
        )
    };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// Copies `len` bytes with copy_file_range calls until done or at the source's end.
fn copy_all(src: &File, src_at: i64, dst: &File, dst_at: i64, len: usize) -> usize {
    let mut done = 0;
    while done < len {
        let n = copy_range(
            src,
            src_at + done as i64,
            dst,
            dst_at + done as i64,
            len - done,
        )
        .expect("copy_file_range");
        if n == 0 {
            break;
        }
        done += n;
    }
    done
}

/// Bytes the daemon has moved through read and write calls (`/proc/PID/io`): a copy of
/// data through the daemon adds each byte twice (the kernel's write request, the read
/// reply), sharing blocks adds almost nothing.
fn daemon_io(m: &Mount) -> u64 {
    let io = fs::read_to_string(format!("/proc/{}/io", m.pid())).expect("read /proc/PID/io");
    io.lines()
        .filter_map(|line| line.split_once(": "))
        .filter(|(key, _)| matches!(*key, "rchar" | "wchar"))
        .map(|(_, value)| value.parse::<u64>().expect("a count"))
        .sum()
}

/// Each named file of `dir` holds the expected bytes.
fn assert_files(dir: &Path, files: &[(&str, &Vec<u8>)], what: &str) {
    for (name, expected) in files {
        let got = fs::read(dir.join(name)).expect("read");
        assert_bytes_eq(&got, expected, &format!("{what} {name}"));
    }
}

/// Bytes of block files in the data dir.
fn stored_bytes(data: &Path) -> u64 {
    block_files(data)
        .iter()
        .map(|f| fs::metadata(f).expect("stat block").len())
        .sum()
}

// ---------------------------------------------------------------------------------------
// fallocate

/// The same file on the mount and on the native disk (the test's temp dir), opened
/// read-write with the same starting content.
struct Pair {
    snapfs: File,
    native: File,
}

impl Pair {
    fn new(m: &Mount, name: &str, content: &[u8]) -> Pair {
        let open = |path: &Path| {
            fs::write(path, content).expect("write start content");
            rw(path)
        };
        Pair {
            snapfs: open(&m.path().join(name)),
            native: open(&m.scratch("native").join(name)),
        }
    }

    /// Runs `fallocate` on both; they must agree on the outcome, the size and the bytes.
    #[track_caller]
    fn fallocate(&self, mode: i32, offset: i64, len: i64) {
        let native = fallocate(&self.native, mode, offset, len).map_err(|e| e.raw_os_error());
        let ours = fallocate(&self.snapfs, mode, offset, len).map_err(|e| e.raw_os_error());
        assert_eq!(ours, native, "fallocate(mode {mode:#x}, {offset}, {len})");
        self.assert_same(&format!("after fallocate(mode {mode:#x}, {offset}, {len})"));
    }

    #[track_caller]
    fn assert_same(&self, what: &str) {
        let size = self.native.metadata().expect("stat native").len();
        assert_eq!(
            self.snapfs.metadata().expect("stat").len(),
            size,
            "size {what}"
        );
        let read = |f: &File| {
            let mut buf = vec![0; size as usize];
            f.read_exact_at(&mut buf, 0).expect("read");
            buf
        };
        assert_bytes_eq(&read(&self.snapfs), &read(&self.native), what);
    }
}

/// A fallocate call: mode, offset, length.
type Call = (i32, i64, i64);

#[test]
fn every_fallocate_mode_matches_the_native_disk() {
    let m = Mount::new();
    let start = pattern(3 * BLOCK + 12_345, 1);
    let cases: &[(&str, &[Call])] = &[
        (
            "allocate",
            &[(0, 100, 10), (0, 5 * B, B + 7), (0, 0, 9 * B)],
        ),
        ("keep size", &[(KEEP, 2 * B, 10 * B), (KEEP, 4 * B, 1)]),
        (
            "punch",
            &[
                (PUNCH, 1000, 2 * B),
                (PUNCH, B, B),
                (PUNCH, 3 * B, 10 * B),
                (PUNCH, 50 * B, B),
            ],
        ),
        ("punch all", &[(PUNCH, 0, 4 * B)]),
        (
            "zero",
            &[
                (ZERO, 500, 2 * B + 7),
                (ZERO, 3 * B, 4 * B),
                (ZERO, 9 * B, 1),
            ],
        ),
        (
            "zero keep size",
            &[(ZERO | KEEP, 3 * B, 4 * B), (ZERO | KEEP, 10, 20)],
        ),
        (
            "errors",
            &[
                (0, 0, 0),
                (0, -1, 10),
                (0, 10, -1),
                (libc::FALLOC_FL_PUNCH_HOLE, 0, B),
                (PUNCH | ZERO, 0, B),
                (0, i64::MAX - 10, 100),
                (0x100, 0, B),
            ],
        ),
    ];
    for (name, ops) in cases {
        let pair = Pair::new(&m, name, &start);
        for &(mode, offset, len) in *ops {
            pair.fallocate(mode, offset, len);
        }
        // Data written after the calls lands where it would on the native disk.
        for file in [&pair.snapfs, &pair.native] {
            file.write_all_at(b"after", 2 * BLOCK as u64 - 2)
                .expect("write after");
        }
        pair.assert_same(&format!("{name}, then a write"));
    }
}

#[test]
fn fallocate_errors_the_kernel_and_snapfs_give() {
    let m = Mount::new();
    let path = m.path().join("f");
    fs::write(&path, pattern(BLOCK, 2)).expect("write");
    // Not open for writing.
    let read_only = File::open(&path).expect("open read-only");
    assert_eq!(errno(fallocate(&read_only, 0, 0, 10)), libc::EBADF);
    let dir = File::open(m.path()).expect("open dir");
    assert_eq!(errno(fallocate(&dir, 0, 0, 10)), libc::EBADF);
    // Collapsing and inserting ranges are not supported (FUSE itself refuses them).
    let file = rw(&path);
    for mode in [libc::FALLOC_FL_COLLAPSE_RANGE, libc::FALLOC_FL_INSERT_RANGE] {
        assert_eq!(errno(fallocate(&file, mode, 0, B)), libc::EOPNOTSUPP);
    }
    // Snapshots are read-only: a file there cannot even be opened for writing.
    take_snapshot(&m, "s");
    let old = m.path().join(".snapshots/s/f");
    assert_eq!(
        errno(OpenOptions::new().write(true).open(&old)),
        libc::EROFS
    );
}

#[test]
fn fallocate_beyond_the_free_space_is_enospc() {
    let m = Mount::with_tmpfs_data("64M", &[]);
    let file = create(&m.path().join("f"));
    assert_eq!(errno(fallocate(&file, 0, 0, 1 << 30)), libc::ENOSPC);
    assert_eq!(
        errno(fallocate(&file, ZERO | KEEP, 0, 1 << 30)),
        libc::ENOSPC
    );
    assert_eq!(file.metadata().expect("stat").len(), 0);
    // What fits is allocated; punching needs no room.
    fallocate(&file, 0, 0, 16 << 20).expect("allocate 16 MiB");
    assert_eq!(file.metadata().expect("stat").len(), 16 << 20);
    fallocate(&file, PUNCH, 0, 1 << 40).expect("punch");
}

#[test]
fn punch_frees_blocks_and_snapshots_keep_their_bytes() {
    let mut m = Mount::new();
    let path = m.path().join("f");
    let data = pattern(6 * BLOCK + 100, 3);
    fs::write(&path, &data).expect("write");
    let before = take_snapshot(&m, "before");
    let file = rw(&path);
    let blocks = file.metadata().expect("stat").blocks();
    fallocate(&file, PUNCH, B / 2, 3 * B).expect("punch");
    // Blocks 1 and 2 are gone; 0 and 3 are zeroed in part.
    assert_eq!(
        file.metadata().expect("stat").blocks(),
        blocks - 2 * BLOCK as u64 / 512
    );
    fallocate(&file, ZERO, 5 * B, 2 * B).expect("zero range");
    drop(file);
    let mut expected = data.clone();
    expected[BLOCK / 2..BLOCK / 2 + 3 * BLOCK].fill(0);
    expected[5 * BLOCK..].fill(0);
    expected.resize(7 * BLOCK, 0);
    assert_bytes_eq(&fs::read(&path).expect("read"), &expected, "live file");
    assert_bytes_eq(
        &fs::read(before.join("f")).expect("read"),
        &data,
        "snapshot",
    );

    // Unflushed writes: a punch drops them, an allocation past the end keeps them.
    let file = rw(&path);
    file.write_all_at(&pattern(BLOCK, 4), 0).expect("write");
    file.write_all_at(b"kept", 7 * BLOCK as u64).expect("write");
    fallocate(&file, PUNCH, 0, B).expect("punch");
    fallocate(&file, 0, 8 * B, B).expect("allocate");
    expected[..BLOCK].fill(0);
    expected.extend_from_slice(b"kept");
    expected.resize(9 * BLOCK, 0);
    drop(file);
    assert_bytes_eq(
        &fs::read(&path).expect("read"),
        &expected,
        "after buffered writes",
    );
    m.remount();
    assert_bytes_eq(
        &fs::read(&path).expect("read"),
        &expected,
        "after a remount",
    );
}

// ---------------------------------------------------------------------------------------
// SEEK_DATA / SEEK_HOLE

#[test]
fn seek_data_and_hole_find_the_holes_as_on_the_native_disk() {
    let m = Mount::new();
    // Data in blocks 0, 3-4 and 8 (ending inside it); holes in 1-2 and 5-7.
    let layout = |file: &File| {
        file.write_all_at(&pattern(BLOCK, 5), 0).expect("write");
        file.write_all_at(&pattern(2 * BLOCK, 6), 3 * BLOCK as u64)
            .expect("write");
        file.write_all_at(&pattern(100, 7), 8 * BLOCK as u64)
            .expect("write");
    };
    let ours = create(&m.path().join("sparse"));
    let native = create(&m.scratch("native").join("sparse"));
    layout(&ours);
    layout(&native);
    let size = 8 * B + 100;
    let expect = |file: &File, when: &str| {
        for (whence, offset, at) in [
            (libc::SEEK_DATA, 0, 0),
            (libc::SEEK_HOLE, 0, B),
            (libc::SEEK_DATA, B, 3 * B),
            (libc::SEEK_DATA, 3 * B + 5, 3 * B + 5),
            (libc::SEEK_HOLE, 3 * B, 5 * B),
            (libc::SEEK_DATA, 5 * B, 8 * B),
            (libc::SEEK_HOLE, 8 * B, size),
        ] {
            assert_eq!(
                seek(file, offset, whence).expect("seek"),
                at,
                "{when}: lseek({offset}, {whence})"
            );
        }
        assert_eq!(
            errno(seek(file, size, libc::SEEK_DATA)),
            libc::ENXIO,
            "{when}"
        );
        assert_eq!(
            errno(seek(file, size + 1, libc::SEEK_HOLE)),
            libc::ENXIO,
            "{when}"
        );
    };
    expect(&native, "native");
    expect(&ours, "buffered");
    ours.sync_all().expect("fsync");
    expect(&ours, "flushed");
    drop(ours);
    let snap = take_snapshot(&m, "s");
    expect(&File::open(snap.join("sparse")).expect("open"), "snapshot");

    // Ending in a hole: no data past the last block.
    let file = rw(&m.path().join("sparse"));
    fallocate(&file, 0, 0, 20 * B).expect("grow");
    assert_eq!(errno(seek(&file, 9 * B, libc::SEEK_DATA)), libc::ENXIO);
    assert_eq!(seek(&file, 9 * B, libc::SEEK_HOLE).expect("hole"), 9 * B);
}

#[test]
fn cp_and_tar_keep_holes_sparse() {
    let m = Mount::new();
    let path = m.path().join("sparse");
    let file = create(&path);
    file.write_all_at(&pattern(BLOCK, 8), 0).expect("write");
    file.write_all_at(&pattern(BLOCK, 9), 40 * BLOCK as u64)
        .expect("write");
    drop(file);
    let out = m.scratch("out");
    let copy = out.join("copy");
    let io = daemon_io(&m);
    run(Command::new("cp")
        .arg("--sparse=always")
        .arg(&path)
        .arg(&copy));
    // cp read the two blocks of data, not the 39 of the hole (SEEK_HOLE skipped them).
    let moved = daemon_io(&m) - io;
    assert!(
        moved < 8 * BLOCK as u64,
        "the daemon moved {moved} bytes for cp"
    );
    let archive = out.join("a.tar");
    let io = daemon_io(&m);
    run(Command::new("tar")
        .arg("-S")
        .arg("-cf")
        .arg(&archive)
        .arg("-C")
        .arg(m.path())
        .arg("sparse"));
    let moved = daemon_io(&m) - io;
    assert!(
        moved < 8 * BLOCK as u64,
        "the daemon moved {moved} bytes for tar -S"
    );
    // A sparse archive holds the data and a map, not the 39 blocks of zeros.
    assert!(fs::metadata(&archive).expect("stat").len() < 3 * BLOCK as u64);
    // The copy: the same bytes, two blocks of data, not 41.
    assert_bytes_eq(
        &fs::read(&copy).expect("read copy"),
        &fs::read(&path).expect("read"),
        "cp --sparse=always",
    );
    assert!(fs::metadata(&copy).expect("stat").blocks() * 512 <= 3 * BLOCK as u64);
}

// ---------------------------------------------------------------------------------------
// copy_file_range

#[test]
fn copy_file_range_shares_blocks_and_copies_are_independent() {
    let m = Mount::new();
    let data = pattern(32 * BLOCK + 12_345, 10);
    let src_path = m.path().join("src");
    fs::write(&src_path, &data).expect("write");
    let src = rw(&src_path);
    src.sync_all().expect("fsync");
    let stored = stored_bytes(m.data_dir());
    let dst_path = m.path().join("dst");
    let dst = create(&dst_path);
    // Offsets 777 and BLOCK + 777: equally aligned, with partial blocks at both edges.
    let len = data.len() - 777;
    let io = daemon_io(&m);
    assert_eq!(copy_all(&src, 777, &dst, B + 777, len), len);
    let moved = daemon_io(&m) - io;
    assert!(
        moved < 2 * BLOCK as u64,
        "the daemon moved {moved} bytes for the copy"
    );
    let mut expected = vec![0; BLOCK + 777];
    expected.extend_from_slice(&data[777..]);
    assert_eq!(dst.metadata().expect("stat").len(), expected.len() as u64);
    assert_bytes_eq(&fs::read(&dst_path).expect("read"), &expected, "copy");
    dst.sync_all().expect("fsync");
    // Only the partial first block is new data.
    let grown = stored_bytes(m.data_dir()) - stored;
    assert!(grown <= BLOCK as u64, "the copy stored {grown} new bytes");

    let snap = take_snapshot(&m, "s");
    dst.write_all_at(b"changed", 10 * BLOCK as u64)
        .expect("write copy");
    src.write_all_at(b"source", 20 * BLOCK as u64)
        .expect("write source");
    drop((src, dst));
    let mut changed_src = data.clone();
    changed_src[20 * BLOCK..20 * BLOCK + 6].copy_from_slice(b"source");
    assert_bytes_eq(&fs::read(&src_path).expect("read"), &changed_src, "source");
    let mut changed_dst = expected.clone();
    changed_dst[10 * BLOCK..10 * BLOCK + 7].copy_from_slice(b"changed");
    assert_bytes_eq(&fs::read(&dst_path).expect("read"), &changed_dst, "copy");
    let both = [("src", &data), ("dst", &expected)];
    assert_files(&snap, &both, "snapshot");

    // Uploaded and restored byte for byte, from the store alone.
    wait_completed(&m, "s");
    let dest = m.scratch("restored");
    let store = format!("file://{}", m.data_dir().join("store").display());
    let out = run(common::snapfs()
        .args(["restore", "--store", &store, "s"])
        .arg(dest.join("s")));
    assert!(
        out.status.success(),
        "restore: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_files(&dest.join("s"), &both, "restored");
    // The catalog's invariants hold: reference counts, no block past a file's end.
    let out = run(common::snapfs().arg("verify").arg("--mount").arg(m.path()));
    assert!(
        out.status.success(),
        "verify: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn copy_file_range_sees_unflushed_writes_and_keeps_what_follows() {
    let m = Mount::new();
    let src = create(&m.path().join("src"));
    src.write_all_at(&pattern(4 * BLOCK + 10, 11), 0)
        .expect("write");
    let old = pattern(8 * BLOCK, 12);
    let dst_path = m.path().join("dst");
    fs::write(&dst_path, &old).expect("write");
    let dst = rw(&dst_path);
    // Not yet flushed: the copy must see it all the same.
    assert_eq!(copy_all(&src, 0, &dst, 0, 1 << 30), 4 * BLOCK + 10);
    let mut expected = pattern(4 * BLOCK + 10, 11);
    expected.extend_from_slice(&old[4 * BLOCK + 10..]);
    assert_bytes_eq(
        &fs::read(&dst_path).expect("read"),
        &expected,
        "copy over a file",
    );

    // Misaligned offsets copy bytes through the data path.
    let other = create(&m.path().join("other"));
    assert_eq!(copy_all(&src, 3, &other, 0, 2 * BLOCK), 2 * BLOCK);
    assert_bytes_eq(
        &fs::read(m.path().join("other")).expect("read"),
        &pattern(4 * BLOCK + 10, 11)[3..2 * BLOCK + 3],
        "misaligned copy",
    );
}

#[test]
fn copy_file_range_errors() {
    let m = Mount::new();
    let path = m.path().join("f");
    fs::write(&path, pattern(4 * BLOCK, 13)).expect("write");
    let file = rw(&path);
    // Overlapping ranges of one file.
    assert_eq!(
        errno(copy_range(&file, 0, &file, B, 2 * BLOCK)),
        libc::EINVAL
    );
    // Source not readable, destination not writable.
    let write_only = OpenOptions::new().write(true).open(&path).expect("open");
    let other = create(&m.path().join("other"));
    assert_eq!(
        errno(copy_range(&write_only, 0, &other, 0, 10)),
        libc::EBADF
    );
    let read_only = File::open(&path).expect("open");
    assert_eq!(errno(copy_range(&file, 0, &read_only, 0, 10)), libc::EBADF);
    let dir = File::open(m.path()).expect("open dir");
    assert_eq!(errno(copy_range(&dir, 0, &other, 0, 10)), libc::EISDIR);
    // At the largest offset.
    assert_eq!(
        errno(copy_range(&file, 0, &other, i64::MAX, 1)),
        libc::EFBIG
    );
    // At the source's end: nothing to copy.
    assert_eq!(copy_range(&file, 4 * B, &other, 0, 10).expect("copy"), 0);
}

#[test]
fn cp_inside_the_mount_shares_blocks() {
    let m = Mount::new();
    let data = pattern(16 * BLOCK + 999, 14);
    let src = m.path().join("src");
    fs::write(&src, &data).expect("write");
    rw(&src).sync_all().expect("fsync");
    let before = disk_usage(&m.data_dir().join("blocks"));
    let io = daemon_io(&m);
    run(Command::new("cp").arg(&src).arg(m.path().join("copy")));
    let moved = daemon_io(&m) - io;
    assert!(
        moved < 2 * BLOCK as u64,
        "the daemon moved {moved} bytes for cp"
    );
    assert_bytes_eq(&fs::read(m.path().join("copy")).expect("read"), &data, "cp");
    rw(&m.path().join("copy")).sync_all().expect("fsync");
    let grown = disk_usage(&m.data_dir().join("blocks")).saturating_sub(before);
    assert!(grown <= BLOCK as u64, "cp stored {grown} new bytes");
}

#[test]
fn shared_blocks_upload_once_and_outlive_their_source() {
    let s3 = common::s3::S3Env::s3s();
    let prefix = common::s3::unique_prefix("fileops");
    let m = s3.mount_store(&prefix, &[]);
    let data = pattern(8 * BLOCK + 4321, 15);
    let src = m.path().join("src");
    fs::write(&src, &data).expect("write");
    take_snapshot(&m, "a");
    wait_completed(&m, "a");
    let client = s3.client();
    let blocks = common::packed_in_bucket(&client, &prefix).len();
    assert_eq!(blocks, 9);
    let packs = client.list(&format!("{prefix}packs/"));

    run(Command::new("cp").arg(&src).arg(m.path().join("copy")));
    take_snapshot(&m, "b");
    wait_completed(&m, "b");
    // The copy's blocks are the source's: nothing new to upload but the new root's tree.
    assert_eq!(common::packed_in_bucket(&client, &prefix).len(), blocks);
    let tree_packs: Vec<String> = common::trees_in_bucket(&client, &prefix)
        .into_values()
        .flatten()
        .map(|tree| tree.pack)
        .collect();
    let after = client.list(&format!("{prefix}packs/"));
    let added: Vec<&(String, u64)> = after.iter().filter(|p| !packs.contains(p)).collect();
    assert_eq!(added.len(), 1, "one new pack: {added:?}");
    assert!(tree_packs.contains(&added[0].0), "it holds trees only");
    assert!(
        packs.iter().all(|p| after.contains(p)),
        "the old packs stay"
    );
    let dest = m.scratch("restored");
    let out = s3.restore(&s3.url(&prefix), "b", &dest.join("b"), &[]);
    assert!(
        out.status.success(),
        "restore: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_files(
        &dest.join("b"),
        &[("src", &data), ("copy", &data)],
        "restored",
    );

    // Without the source and the snapshot that held only it, the copy keeps the blocks.
    fs::remove_file(&src).expect("rm src");
    fs::remove_dir(m.path().join(".snapshots/a")).expect("rmdir a");
    fs::remove_dir(m.path().join(".snapshots/b")).expect("rmdir b");
    assert_files(m.path(), &[("copy", &data)], "live");
    assert_eq!(block_files(m.data_dir()).len(), 9);
}
