//! POSIX file I/O through the kernel: data across blocks, truncation and holes, unlinked
//! open files, concurrency, coherence between descriptors, mmap and real programs. Every
//! test has its own mount.

mod common;

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{BLOCK, Mount, assert_bytes_eq, create, errno, pattern, read_at, run, rw, truncate};

// ---------------------------------------------------------------------------------------
// Data

#[test]
fn small_file_round_trip() {
    let m = Mount::new();
    let path = m.path().join("hello.txt");
    fs::write(&path, b"hello, snapfs\n").expect("write");
    assert_eq!(fs::read(&path).expect("read"), b"hello, snapfs\n");
    let meta = fs::metadata(&path).expect("stat");
    assert!(meta.is_file());
    assert_eq!(meta.len(), 14);
    let empty = m.path().join("empty");
    File::create(&empty).expect("create empty");
    assert_eq!(fs::read(&empty).expect("read empty"), b"");
    assert_eq!(fs::metadata(&empty).expect("stat empty").len(), 0);
}

#[test]
fn multi_block_file_written_in_unaligned_chunks() {
    let m = Mount::new();
    let path = m.path().join("big");
    let data = pattern(3 * BLOCK + 12_345, 1);
    let mut file = create(&path);
    for chunk in data.chunks(100_003) {
        file.write_all(chunk).expect("write chunk");
    }
    drop(file);
    assert_eq!(fs::metadata(&path).expect("stat").len(), data.len() as u64);
    assert_bytes_eq(&fs::read(&path).expect("read"), &data, "whole file");

    // Unaligned reads across block boundaries, with a fresh descriptor.
    let file = File::open(&path).expect("open");
    for (offset, len) in [
        (BLOCK - 1, 2),
        (BLOCK - 777, 2 * BLOCK + 1000),
        (3 * BLOCK - 5, 12_350),
        (17, 1),
        (data.len() - 3, 3),
    ] {
        let got = read_at(&file, offset as u64, len);
        assert_bytes_eq(&got, &data[offset..offset + len], "unaligned read");
    }
    // Reads past the end are short, then empty.
    assert_eq!(read_at(&file, data.len() as u64 - 10, 100).len(), 10);
    assert_eq!(read_at(&file, data.len() as u64 + 5, 100), b"");
}

#[test]
fn overwrite_in_the_middle_across_a_block_boundary() {
    let m = Mount::new();
    let path = m.path().join("f");
    let mut model = pattern(3 * BLOCK, 2);
    fs::write(&path, &model).expect("write");
    let patch = pattern(5000, 3);
    let at = BLOCK - 2500;
    rw(&path)
        .write_all_at(&patch, at as u64)
        .expect("overwrite");
    model[at..at + patch.len()].copy_from_slice(&patch);
    assert_eq!(fs::metadata(&path).expect("stat").len(), model.len() as u64);
    assert_bytes_eq(&fs::read(&path).expect("read"), &model, "after overwrite");

    // Through one descriptor: write, then read back before close.
    let file = rw(&path);
    let patch = b"XYZ";
    file.write_all_at(patch, 2 * BLOCK as u64 + 1)
        .expect("pwrite");
    model[2 * BLOCK + 1..2 * BLOCK + 4].copy_from_slice(patch);
    assert_bytes_eq(&read_at(&file, 0, model.len()), &model, "same descriptor");
}

#[test]
fn append_mode_writes_at_the_end() {
    let m = Mount::new();
    let path = m.path().join("log");
    let first = pattern(BLOCK - 10, 4);
    fs::write(&path, &first).expect("write");
    let mut file = OpenOptions::new()
        .append(true)
        .open(&path)
        .expect("open append");
    let second = pattern(100, 5);
    // Even after seeking to 0, O_APPEND writes go to the end.
    file.seek(SeekFrom::Start(0)).expect("seek");
    file.write_all(&second).expect("append 1");
    file.write_all(b"tail").expect("append 2");
    drop(file);
    let mut expected = first;
    expected.extend_from_slice(&second);
    expected.extend_from_slice(b"tail");
    assert_bytes_eq(&fs::read(&path).expect("read"), &expected, "appended file");
}

#[test]
fn pwrite_past_the_end_leaves_a_zero_gap() {
    let m = Mount::new();
    let path = m.path().join("f");
    let file = create(&path);
    file.write_all_at(b"start", 0).expect("pwrite 0");
    let far = 2 * BLOCK as u64 + 17;
    file.write_all_at(b"far", far).expect("pwrite far");
    file.write_all_at(b"mid", 100_000).expect("pwrite mid");
    drop(file);
    let data = fs::read(&path).expect("read");
    assert_eq!(data.len() as u64, far + 3);
    let mut expected = vec![0u8; data.len()];
    expected[..5].copy_from_slice(b"start");
    expected[100_000..100_003].copy_from_slice(b"mid");
    expected[far as usize..].copy_from_slice(b"far");
    assert_bytes_eq(&data, &expected, "file with gaps");
}

// ---------------------------------------------------------------------------------------
// Truncation and holes

#[test]
fn truncate_down_and_up_with_set_len_and_truncate() {
    let m = Mount::new();
    let path = m.path().join("f");
    let data = pattern(2 * BLOCK + 500, 6);
    fs::write(&path, &data).expect("write");

    let file = rw(&path);
    let cut = BLOCK + 1234;
    file.set_len(cut as u64).expect("ftruncate down");
    assert_eq!(file.metadata().expect("fstat").len(), cut as u64);
    assert_bytes_eq(&read_at(&file, 0, 3 * BLOCK), &data[..cut], "after cut");
    file.set_len(3 * BLOCK as u64).expect("ftruncate up");
    drop(file);

    let mut expected = data[..cut].to_vec();
    expected.resize(3 * BLOCK, 0);
    assert_bytes_eq(&fs::read(&path).expect("read"), &expected, "after extend");

    // truncate(2) by path.
    truncate(&path, 10);
    assert_eq!(fs::read(&path).expect("read"), &data[..10]);
    truncate(&path, 0);
    assert_eq!(fs::read(&path).expect("read"), b"");
}

/// The cut tail must read as zeros after an extension, whether the data was still in
/// the write buffer or already flushed to the store.
#[test]
fn truncate_down_then_extend_reads_zeros_not_old_data() {
    let m = Mount::new();
    for (name, sync) in [("buffered", false), ("flushed", true)] {
        let path = m.path().join(name);
        let file = create(&path);
        file.write_all_at(&vec![0xAA; 2 * BLOCK], 0).expect("write");
        if sync {
            file.sync_all().expect("fsync");
        }
        let cut = BLOCK / 2 + 3;
        file.set_len(cut as u64).expect("cut");
        file.set_len(2 * BLOCK as u64).expect("extend with set_len");
        // Extending by a write past the end must also leave zeros in between.
        file.write_all_at(b"end", 3 * BLOCK as u64)
            .expect("write past end");
        let mut expected = vec![0u8; 3 * BLOCK + 3];
        expected[..cut].fill(0xAA);
        expected[3 * BLOCK..].copy_from_slice(b"end");
        assert_bytes_eq(&read_at(&file, 0, 4 * BLOCK), &expected, name);
        drop(file);
        assert_bytes_eq(&fs::read(&path).expect("read"), &expected, name);
    }
}

#[test]
fn sparse_file_with_a_hole_in_the_middle() {
    let m = Mount::new();
    let path = m.path().join("sparse");
    let head = pattern(1000, 7);
    let tail = pattern(BLOCK, 8);
    let file = create(&path);
    file.write_all_at(&head, 0).expect("write head");
    file.write_all_at(&tail, 5 * BLOCK as u64)
        .expect("write tail");
    drop(file);
    let data = fs::read(&path).expect("read");
    assert_eq!(data.len(), 6 * BLOCK);
    assert_bytes_eq(&data[..1000], &head, "head");
    assert!(
        data[1000..5 * BLOCK].iter().all(|&b| b == 0),
        "hole not zero"
    );
    assert_bytes_eq(&data[5 * BLOCK..], &tail, "tail");
    // Only the two written blocks are stored: at most 2 blocks' worth of 512-byte units.
    let blocks = fs::metadata(&path).expect("stat").blocks();
    assert!(
        blocks > 0 && blocks <= 2 * BLOCK as u64 / 512,
        "st_blocks {blocks}"
    );
}

#[test]
fn terabyte_sparse_file_costs_almost_nothing() {
    let m = Mount::new();
    let path = m.path().join("huge");
    let before = common::disk_usage(m.data_dir());
    let tib = 1u64 << 40;
    let file = create(&path);
    file.set_len(tib).expect("set_len 1 TiB");
    let meta = file.metadata().expect("fstat");
    assert_eq!(meta.len(), tib);
    assert_eq!(meta.blocks(), 0, "an empty sparse file stores nothing");
    assert_eq!(read_at(&file, tib - 4096, 8192), vec![0u8; 4096]);
    assert_eq!(read_at(&file, tib / 2, 1000), vec![0u8; 1000]);
    assert_eq!(read_at(&file, tib, 10), b"");
    // One write near the end stores one block, not a terabyte.
    file.write_all_at(b"the end", tib - 7)
        .expect("write at the end");
    file.sync_all().expect("fsync");
    assert_eq!(read_at(&file, tib - 10, 100), b"\0\0\0the end");
    drop(file);
    let meta = fs::metadata(&path).expect("stat");
    assert_eq!(meta.len(), tib);
    assert!(
        meta.blocks() <= BLOCK as u64 / 512,
        "st_blocks {}",
        meta.blocks()
    );
    let grown = common::disk_usage(m.data_dir()).saturating_sub(before);
    assert!(grown < 16 << 20, "data dir grew by {grown} bytes");
}

// ---------------------------------------------------------------------------------------
// Unlinked open files

#[test]
fn an_unlinked_open_file_stays_usable_until_closed() {
    let m = Mount::new();
    let path = m.path().join("f");
    let data = pattern(BLOCK + 100, 12);
    let mut file = create(&path);
    file.write_all(&data).expect("write");
    file.sync_all().expect("fsync");
    fs::remove_file(&path).expect("unlink while open");
    assert_eq!(errno(fs::metadata(&path)), libc::ENOENT);
    assert_eq!(fs::read_dir(m.path()).expect("ls").count(), 0);
    assert_eq!(file.metadata().expect("fstat").nlink(), 0);
    assert_bytes_eq(&read_at(&file, 0, data.len()), &data, "read after unlink");
    file.write_all_at(b"more", data.len() as u64)
        .expect("write after unlink");
    file.sync_all().expect("fsync after unlink");
    let mut back = Vec::new();
    file.seek(SeekFrom::Start(0)).expect("seek");
    file.read_to_end(&mut back).expect("read back");
    assert_eq!(back.len(), data.len() + 4);
    assert_eq!(&back[data.len()..], b"more");
    // A new file may take the name meanwhile; it is a different, empty file.
    fs::write(&path, b"").expect("new file, same name");
    assert_eq!(fs::read(&path).expect("read new"), b"");
    fs::remove_file(&path).expect("unlink new");
    drop(file);
    assert_eq!(errno(fs::metadata(&path)), libc::ENOENT);
    // Its blocks are freed once the last descriptor is closed.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !common::block_files(m.data_dir()).is_empty() {
        assert!(
            Instant::now() < deadline,
            "blocks of the unlinked file not freed: {:?}",
            common::block_files(m.data_dir())
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------
// Concurrency

#[test]
fn threads_write_and_read_their_own_files() {
    let m = Mount::new();
    let root = Arc::new(m.path().to_owned());
    let workers: Vec<_> = (0..6u64)
        .map(|i| {
            let root = Arc::clone(&root);
            std::thread::spawn(move || {
                let path = root.join(format!("file-{i}"));
                let data = pattern(BLOCK * 2 + 1000 * i as usize, 100 + i);
                for round in 0..3 {
                    let mut file = File::create(&path).expect("create");
                    for chunk in data.chunks(65_536 + 7 * i as usize) {
                        file.write_all(chunk).expect("write");
                    }
                    drop(file);
                    let back = fs::read(&path).expect("read back");
                    assert_bytes_eq(&back, &data, &format!("thread {i} round {round}"));
                }
            })
        })
        .collect();
    for worker in workers {
        worker.join().expect("worker thread");
    }
}

#[test]
fn threads_write_disjoint_ranges_of_one_file() {
    let m = Mount::new();
    let path = Arc::new(m.path().join("shared"));
    // Ranges not aligned to blocks, so neighbours share blocks.
    let range = 300_001usize;
    let threads = 8u64;
    File::create(&*path).expect("create");
    let workers: Vec<_> = (0..threads)
        .map(|i| {
            let path = Arc::clone(&path);
            std::thread::spawn(move || {
                let file = rw(&path);
                let data = pattern(range, 200 + i);
                let base = i as usize * range;
                for (n, chunk) in data.chunks(10_000).enumerate() {
                    file.write_all_at(chunk, (base + n * 10_000) as u64)
                        .expect("write range");
                }
            })
        })
        .collect();
    for worker in workers {
        worker.join().expect("worker thread");
    }
    let expected: Vec<u8> = (0..threads).flat_map(|i| pattern(range, 200 + i)).collect();
    assert_bytes_eq(&fs::read(&*path).expect("read"), &expected, "shared file");
}

// ---------------------------------------------------------------------------------------
// Real tools

#[test]
fn cp_r_a_tree_in_and_out_then_diff() {
    let m = Mount::new();
    let src = m.scratch("src");
    fs::create_dir_all(src.join("a/b/c")).expect("mkdir -p");
    fs::create_dir(src.join("empty")).expect("mkdir empty");
    fs::write(src.join("top.txt"), b"top\n").expect("write");
    fs::write(src.join("a/zero"), b"").expect("write");
    fs::write(src.join("a/b/one-block"), pattern(BLOCK, 20)).expect("write");
    fs::write(src.join("a/b/c/big"), pattern(3 * BLOCK + 77, 21)).expect("write");
    fs::write(src.join(OsStr::from_bytes(b"a/caf\xe9")), b"latin").expect("write");
    std::os::unix::fs::symlink("../top.txt", src.join("a/link")).expect("symlink");

    let dst = m.path().join("copy");
    let out = run(Command::new("cp").arg("-r").arg(&src).arg(&dst));
    assert!(out.status.success(), "cp -r in: {out:?}");
    let diff = run(Command::new("diff").arg("-r").arg(&src).arg(&dst));
    assert!(diff.status.success(), "diff -r after copy in: {diff:?}");
    assert_eq!(diff.stdout, b"");
    assert_eq!(
        fs::read_link(dst.join("a/link")).expect("symlink copied"),
        Path::new("../top.txt")
    );

    let back = m.scratch("back").join("tree");
    let out = run(Command::new("cp").arg("-r").arg(&dst).arg(&back));
    assert!(out.status.success(), "cp -r out: {out:?}");
    let diff = run(Command::new("diff").arg("-r").arg(&src).arg(&back));
    assert!(diff.status.success(), "diff -r after copy out: {diff:?}");
}

// ---------------------------------------------------------------------------------------
// Coherence between descriptors, mmap, real programs

#[test]
fn writes_are_visible_through_other_descriptors_at_once() {
    let m = Mount::new();
    let path = m.path().join("f");
    let writer = create(&path);
    let reader = File::open(&path).expect("open reader");
    let data = pattern(2 * BLOCK + 99, 30);
    writer.write_all_at(&data, 0).expect("write");
    // Neither closed nor fsynced: another descriptor and stat(2) see it all.
    assert_eq!(fs::metadata(&path).expect("stat").len(), data.len() as u64);
    assert_bytes_eq(&read_at(&reader, 0, data.len()), &data, "other descriptor");
    assert_bytes_eq(&fs::read(&path).expect("fresh open"), &data, "fresh open");
    // truncate(2) by path cuts what the writer buffered.
    truncate(&path, 100);
    assert_eq!(read_at(&writer, 0, data.len()), &data[..100]);
    assert_eq!(writer.metadata().expect("fstat").len(), 100);
}

#[test]
fn open_with_o_trunc_empties_the_file() {
    let m = Mount::new();
    let path = m.path().join("f");
    fs::write(&path, pattern(2 * BLOCK, 31)).expect("write long");
    fs::write(&path, b"short").expect("rewrite with O_TRUNC");
    assert_eq!(fs::read(&path).expect("read"), b"short");
    assert!(fs::metadata(&path).expect("stat").blocks() <= 8);
}

#[test]
fn shared_mmap_writes_reach_the_file() {
    let m = Mount::new();
    let path = m.path().join("mapped");
    let len = BLOCK + 4096;
    let file = create(&path);
    file.set_len(len as u64).expect("size the file");
    // SAFETY: a fresh shared mapping of `len` bytes of a file we own, unmapped below.
    let map = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            std::os::fd::AsRawFd::as_raw_fd(&file),
            0,
        )
    };
    assert_ne!(
        map,
        libc::MAP_FAILED,
        "mmap: {}",
        std::io::Error::last_os_error()
    );
    let data = pattern(len, 32);
    // SAFETY: the mapping is `len` bytes long and writable.
    unsafe {
        std::ptr::copy_nonoverlapping(data.as_ptr(), map.cast::<u8>(), len);
        assert_eq!(libc::msync(map, len, libc::MS_SYNC), 0, "msync");
        assert_eq!(libc::munmap(map, len), 0, "munmap");
    }
    drop(file);
    assert_bytes_eq(&fs::read(&path).expect("read"), &data, "mapped writes");
}

#[test]
fn a_sqlite_database_works_inside_the_mount() {
    let m = Mount::new();
    let path = m.path().join("app.db");
    let db = rusqlite::Connection::open(&path).expect("open database");
    let mode: String = db
        .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
        .expect("WAL mode");
    assert_eq!(mode, "wal");
    db.execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, body BLOB NOT NULL)")
        .expect("create table");
    for round in 0..5u64 {
        let tx = db.unchecked_transaction().expect("begin");
        for i in 0..200u64 {
            tx.execute(
                "INSERT INTO t (body) VALUES (?1)",
                [pattern(500 + i as usize, round * 1000 + i)],
            )
            .expect("insert");
        }
        tx.commit().expect("commit");
    }
    db.execute("DELETE FROM t WHERE id % 3 = 0", [])
        .expect("delete");
    let check: String = db
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .expect("integrity_check");
    assert_eq!(check, "ok");
    drop(db);
    let db = rusqlite::Connection::open(&path).expect("reopen");
    let count: i64 = db
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .expect("count");
    assert_eq!(count, 1000 - 333);
    let body: Vec<u8> = db
        .query_row("SELECT body FROM t WHERE id = 1000", [], |r| r.get(0))
        .expect("last row");
    assert_eq!(body, pattern(699, 4199));
}
