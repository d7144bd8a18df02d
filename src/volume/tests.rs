//! Core tests: the volume driven directly, with no kernel in the loop.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use proptest::prelude::*;

use super::*;
use crate::blocks::INLINE_MAX;
use crate::catalog::Attrs;

mod ranges;

const ROOT: NodeId = NodeId {
    view: View::Live,
    ino: ROOT_INO,
};
const ME: Caller = Caller { uid: 0, gid: 0 };

struct TestVolume {
    dir: tempfile::TempDir,
    volume: Option<Volume>,
}

impl TestVolume {
    /// A fresh volume with small blocks so that short data spans several of them.
    fn new() -> TestVolume {
        let dir = tempfile::tempdir().expect("tempdir");
        let volume = Volume::open(dir.path(), &small_blocks()).expect("open volume");
        TestVolume {
            dir,
            volume: Some(volume),
        }
    }

    fn v(&self) -> &Volume {
        self.volume.as_ref().expect("volume is open")
    }

    /// Closes and reopens the volume as a new mount would.
    fn reopen(&mut self) {
        if let Some(volume) = self.volume.take() {
            volume.shutdown().expect("shutdown");
        }
        self.volume = Some(Volume::open(self.dir.path(), &small_blocks()).expect("reopen"));
    }

    /// Blocks kept locally: block files, and small blocks in the catalog.
    fn stored_blocks(&self) -> usize {
        self.block_files() + self.inline_blocks()
    }

    fn inline_blocks(&self) -> usize {
        lock(&self.v().catalog)
            .read(|tx| tx.inline_block_count())
            .expect("count inline blocks") as usize
    }

    fn block_files(&self) -> usize {
        self.block_file_paths().len()
    }

    /// The block files in the shards (not `tmp`), sorted.
    fn block_file_paths(&self) -> Vec<PathBuf> {
        let mut paths: Vec<PathBuf> = fs::read_dir(self.dir.path().join("blocks"))
            .expect("blocks dir")
            .map(|shard| shard.expect("entry").path())
            .filter(|shard| shard.file_name().is_some_and(|n| n != "tmp"))
            .flat_map(|shard| fs::read_dir(shard).expect("shard"))
            .map(|file| file.expect("block file").path())
            .collect();
        paths.sort();
        paths
    }

    /// Creates and opens file `name`.
    fn create(&self, name: &str) -> (NodeId, FileHandle) {
        let (attr, handle) = self
            .v()
            .create(ROOT, name.as_bytes(), 0o644, ME)
            .expect("create");
        (attr.node, handle)
    }

    fn write_file(&self, name: &str, data: &[u8]) -> NodeId {
        let (node, handle) = self.create(name);
        self.v().write(node, 0, data).expect("write");
        self.v().release(handle).expect("release");
        node
    }

    fn truncate(&self, node: NodeId, size: u64) {
        let set = SetAttr {
            size: Some(size),
            ..SetAttr::default()
        };
        self.v().setattr(node, set).expect("truncate");
    }

    /// Writes file "f" of `len` pattern bytes, opens it and reads it whole once, so its
    /// reads have loaded its block map.
    fn open_read(&self, len: usize, seed: u8) -> (NodeId, Vec<u8>, FileHandle) {
        let data = pattern(len, seed);
        let node = self.write_file("f", &data);
        let handle = self.v().open_file(node, true).expect("open");
        assert_eq!(self.v().read(node, 0, len as u32).expect("read"), data);
        (node, data, handle)
    }

    fn read_all(&self, node: NodeId) -> Vec<u8> {
        let size = self.v().getattr(node).expect("getattr").attrs.size;
        self.v().read(node, 0, size as u32).expect("read")
    }
}

fn small_blocks() -> Options {
    Options {
        block_size: 4096,
        dirty_limit: 64 * 1024,
        cache_bytes: 64 * 1024,
        ..Options::default()
    }
}

/// Non-repeating, non-zero bytes (so no two blocks dedupe and none reads as a hole).
pub(crate) fn pattern(len: usize, seed: u8) -> Vec<u8> {
    let mut state = u64::from(seed).wrapping_mul(0x9E37_79B9_7F4A_7C15) + 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state as u8) | 1
        })
        .collect()
}

#[test]
fn write_read_across_blocks_and_reopen() {
    let mut t = TestVolume::new();
    let data = pattern(4096 * 3 + 100, 7);
    let node = t.write_file("f", &data);
    assert_eq!(t.read_all(node), data);
    assert_eq!(
        t.v().read(node, 4000, 200).expect("read"),
        &data[4000..4200]
    );
    t.reopen();
    let attr = t.v().lookup(ROOT, b"f").expect("lookup");
    assert_eq!(attr.attrs.size, data.len() as u64);
    assert_eq!(t.read_all(attr.node), data);
}

#[test]
fn identical_blocks_are_stored_once() {
    let t = TestVolume::new();
    let block = pattern(4096, 3);
    let twice = [block.clone(), block.clone()].concat();
    t.write_file("a", &twice);
    t.write_file("b", &block);
    assert_eq!(t.stored_blocks(), 1);
}

#[test]
fn sparse_files_store_nothing_for_holes() {
    let t = TestVolume::new();
    let (node, handle) = t.create("sparse");
    let set = SetAttr {
        size: Some(1 << 40),
        ..SetAttr::default()
    };
    t.v().setattr(node, set).expect("truncate up");
    t.v()
        .write(node, 1 << 30, b"x")
        .expect("write in the middle");
    t.v().release(handle).expect("release");
    let attr = t.v().getattr(node).expect("getattr");
    assert_eq!(attr.attrs.size, 1 << 40);
    assert!(attr.blocks <= 8, "st_blocks {} for one byte", attr.blocks);
    assert_eq!(
        t.v().read(node, (1 << 30) - 2, 4).expect("read"),
        b"\0\0x\0"
    );
    assert_eq!(t.stored_blocks(), 1);
}

#[test]
fn truncate_down_then_up_reads_zeros_in_the_cut_part() {
    let t = TestVolume::new();
    let node = t.write_file("f", &pattern(10_000, 1));
    for size in [5000, 12_000] {
        let set = SetAttr {
            size: Some(size),
            ..SetAttr::default()
        };
        t.v().setattr(node, set).expect("truncate");
    }
    let content = t.read_all(node);
    assert_eq!(content.len(), 12_000);
    assert_eq!(&content[..5000], &pattern(10_000, 1)[..5000]);
    assert!(content[5000..].iter().all(|&b| b == 0));
}

#[test]
fn overwritten_blocks_are_freed() {
    let t = TestVolume::new();
    let node = t.write_file("f", &pattern(8192, 1));
    assert_eq!(t.stored_blocks(), 2);
    let handle = t.v().open_file(node, true).expect("open");
    t.v().write(node, 0, &pattern(8192, 2)).expect("overwrite");
    t.v().release(handle).expect("release");
    assert_eq!(t.stored_blocks(), 2);
    t.v().unlink(ROOT, b"f").expect("unlink");
    assert_eq!(t.stored_blocks(), 0);
}

#[test]
fn a_flush_frees_one_batch_under_the_files_lock_and_a_collection_the_rest() {
    let t = TestVolume::new();
    let blocks = 3 * GC_BATCH;
    let node = t.write_file("f", &pattern(blocks * 4096, 1));
    assert_eq!(t.block_files(), blocks);
    let handle = t.v().open_file(node, true).expect("open");
    t.truncate(node, 0);
    t.v().write(node, 0, &pattern(4096, 2)).expect("write");
    t.v().release(handle).expect("release");
    // Each flush round under the file's lock frees one batch of what it unmapped.
    let left = t.block_files();
    assert!(
        (2..=1 + blocks - GC_BATCH).contains(&left),
        "{left} block files after the flush: not one batch at a time"
    );
    t.v().collect_garbage().expect("collect");
    assert_eq!(t.block_files(), 1);
    assert_eq!(t.read_all(node), pattern(4096, 2));
}

#[test]
fn small_blocks_live_in_the_catalog_and_read_back_everywhere() {
    let mut t = TestVolume::new();
    // One full block (a file) and a tail of 100 bytes (in the catalog).
    let data = pattern(4096 + 100, 5);
    let node = t.write_file("f", &data);
    let small = t.write_file("small", &pattern(INLINE_MAX, 6));
    assert_eq!((t.block_files(), t.inline_blocks()), (1, 2));
    t.v().create_snapshot(b"s").expect("snapshot");
    t.reopen();
    assert_eq!(t.read_all(node), data);
    assert_eq!(t.v().read(node, 4090, 20).expect("read"), &data[4090..4110]);
    assert_eq!(t.read_all(small), pattern(INLINE_MAX, 6));
    let in_snapshot = t
        .v()
        .lookup(snapshot_root(&t, "s"), b"small")
        .expect("small in s");
    assert_eq!(t.read_all(in_snapshot.node), pattern(INLINE_MAX, 6));

    // The same bytes again share the block, and it goes when nothing holds it.
    t.write_file("copy", &pattern(INLINE_MAX, 6));
    assert_eq!(t.inline_blocks(), 2);
    t.v().delete_snapshot(b"s").expect("delete s");
    t.v().unlink(ROOT, b"small").expect("unlink small");
    assert_eq!(t.inline_blocks(), 2);
    t.v().unlink(ROOT, b"copy").expect("unlink copy");
    t.v().unlink(ROOT, b"f").expect("unlink f");
    assert_eq!((t.block_files(), t.inline_blocks()), (0, 0));
}

#[test]
fn a_damaged_small_block_reads_as_an_error_never_as_wrong_bytes() {
    let t = TestVolume::new();
    let node = t.write_file("f", &pattern(1000, 3));
    lock(&t.v().catalog)
        .write_now(|tx| tx.damage_inline_blocks())
        .expect("damage");
    // A fresh mount's memory cache does not have the good copy.
    let mut t = t;
    t.reopen();
    assert_eq!(
        t.v().read(node, 0, 1000).map_err(|e| e.errno()),
        Err(libc::EIO)
    );
}

#[test]
fn unlinked_open_file_lives_until_release() {
    let t = TestVolume::new();
    let node = t.write_file("f", b"still here");
    let handle = t.v().open_file(node, false).expect("open");
    t.v().unlink(ROOT, b"f").expect("unlink");
    assert!(matches!(t.v().lookup(ROOT, b"f"), Err(Error::NotFound)));
    assert_eq!(t.v().read(node, 0, 100).expect("read"), b"still here");
    t.v().release(handle).expect("release");
    assert!(matches!(t.v().getattr(node), Err(Error::NotFound)));
    assert_eq!(t.stored_blocks(), 0);
}

#[test]
fn namespace_errors() {
    let t = TestVolume::new();
    let dir = t.v().mkdir(ROOT, b"d", 0o755, ME).expect("mkdir").node;
    t.write_file("f", b"x");
    let errno = |r: Result<Attr>| r.map(|_| ()).map_err(|e| e.errno());
    assert_eq!(errno(t.v().mkdir(ROOT, b"d", 0o755, ME)), Err(libc::EEXIST));
    assert_eq!(
        errno(t.v().mkdir(ROOT, &[b'n'; 256], 0o755, ME)),
        Err(libc::ENAMETOOLONG)
    );
    assert!(t.v().mkdir(ROOT, &[b'n'; 255], 0o755, ME).is_ok());
    let f = t.v().lookup(ROOT, b"f").expect("f").node;
    assert_eq!(errno(t.v().mkdir(f, b"x", 0o755, ME)), Err(libc::ENOTDIR));
    t.v().mkdir(dir, b"sub", 0o755, ME).expect("sub");
    assert_eq!(
        t.v().rmdir(ROOT, b"d").map_err(|e| e.errno()),
        Err(libc::ENOTEMPTY)
    );
    assert_eq!(
        t.v().unlink(ROOT, b"d").map_err(|e| e.errno()),
        Err(libc::EISDIR)
    );
    assert_eq!(
        t.v().rmdir(ROOT, b"f").map_err(|e| e.errno()),
        Err(libc::ENOTDIR)
    );
    assert_eq!(
        t.v()
            .rename(ROOT, b"d", dir, b"inside", 0)
            .map_err(|e| e.errno()),
        Err(libc::EINVAL)
    );
    assert_eq!(t.v().getattr(dir).expect("d").attrs.nlink, 3);
}

#[test]
fn rename_exchange_and_noreplace() {
    let t = TestVolume::new();
    t.write_file("a", b"A");
    t.write_file("b", b"B");
    assert_eq!(
        t.v()
            .rename(ROOT, b"a", ROOT, b"b", libc::RENAME_NOREPLACE)
            .map_err(|e| e.errno()),
        Err(libc::EEXIST)
    );
    t.v()
        .rename(ROOT, b"a", ROOT, b"b", libc::RENAME_EXCHANGE)
        .expect("exchange");
    let read = |name: &[u8]| t.read_all(t.v().lookup(ROOT, name).expect("lookup").node);
    assert_eq!(read(b"a"), b"B");
    assert_eq!(read(b"b"), b"A");
    t.v().rename(ROOT, b"a", ROOT, b"b", 0).expect("replace");
    assert_eq!(read(b"b"), b"B");
    assert!(matches!(t.v().lookup(ROOT, b"a"), Err(Error::NotFound)));
    assert_eq!(t.stored_blocks(), 1);
}

#[test]
fn xattr_flags_and_errors() {
    let t = TestVolume::new();
    let node = t.write_file("f", b"x");
    let v = t.v();
    v.setxattr(node, b"user.k", b"v1", 0).expect("set");
    assert_eq!(
        v.setxattr(node, b"user.k", b"v2", XATTR_CREATE)
            .map_err(|e| e.errno()),
        Err(libc::EEXIST)
    );
    assert_eq!(
        v.setxattr(node, b"user.new", b"v", XATTR_REPLACE)
            .map_err(|e| e.errno()),
        Err(libc::ENODATA)
    );
    v.setxattr(node, b"user.k", b"v2", XATTR_REPLACE)
        .expect("replace");
    assert_eq!(v.getxattr(node, b"user.k").expect("get"), b"v2");
    assert_eq!(v.listxattr(node).expect("list"), vec![b"user.k".to_vec()]);
    v.removexattr(node, b"user.k").expect("remove");
    assert_eq!(
        v.getxattr(node, b"user.k").map_err(|e| e.errno()),
        Err(libc::ENODATA)
    );
    assert_eq!(
        v.setxattr(node, b"system.posix_acl_access", b"", 0)
            .map_err(|e| e.errno()),
        Err(libc::EOPNOTSUPP)
    );
}

/// A process killed between writing a block file and committing it leaves a file nothing
/// names: the next open after such a death removes it; the volume's own blocks stay.
#[test]
fn block_files_a_crash_left_are_removed_at_the_next_open() {
    let mut t = TestVolume::new();
    t.write_file("kept", &pattern(3 * 4096, 7));
    t.reopen();
    let before = t.stored_blocks();
    let stray = t.dir.path().join("blocks/ab").join("ab".repeat(32));
    fs::write(&stray, b"written, never recorded").expect("plant stray");

    // A clean open does not look for strays: only a death can leave them.
    t.reopen();
    assert!(stray.exists());

    // Dropped without shutdown, as a killed daemon would be.
    drop(t.volume.take());
    t.volume = Some(Volume::open(t.dir.path(), &small_blocks()).expect("reopen after crash"));
    assert!(!stray.exists(), "the stray is removed");
    assert_eq!(t.stored_blocks(), before, "the volume's blocks stay");
    assert_eq!(t.read_all(node_for(&t, "kept")), pattern(3 * 4096, 7));
}

#[test]
fn block_files_a_machine_crash_damaged_are_removed_and_the_blocks_stored_again() {
    let mut t = TestVolume::new();
    let data = pattern(3 * 4096, 8);
    t.write_file("lost", &data);
    t.reopen();
    let block_files = t.block_file_paths();
    assert_eq!(block_files.len(), 3);
    // What ext4 leaves of a block file whose delayed allocation a power loss cut short.
    fs::write(&block_files[0], b"").expect("empty a block file");

    // Dropped without shutdown, in an earlier boot of the machine.
    drop(t.volume.take());
    fs::write(t.dir.path().join(RUNNING_MARKER), "an-earlier-boot").expect("marker");
    t.volume = Some(Volume::open(t.dir.path(), &small_blocks()).expect("open after the crash"));
    assert!(
        !block_files[0].exists(),
        "the damaged block file is removed"
    );
    assert!(block_files[1..].iter().all(|path| path.exists()));
    let lost = node_for(&t, "lost");
    let error = t
        .v()
        .read(lost, 0, data.len() as u32)
        .expect_err("a read of a lost block");
    assert_eq!(error.errno(), libc::EIO, "{error}");
    let name = block_files[0].file_name().and_then(|n| n.to_str());
    let hash = name
        .and_then(BlockHash::from_hex)
        .expect("a block file's name");
    let holding = lock(&t.v().catalog)
        .read(|tx| tx.live_paths_holding(&HashSet::from([hash]), 5))
        .expect("files holding the lost block");
    assert_eq!(holding, vec![b"/lost".to_vec()], "named in the log");

    // The same bytes written again are stored again, not found in the damaged file.
    t.write_file("again", &data);
    t.reopen();
    assert_eq!(t.read_all(node_for(&t, "again")), data);
}

/// A volume in `dir` whose committer commits each group 10 ms after it opens.
fn volume_with_committer(dir: &Path) -> Arc<Volume> {
    let volume = Arc::new(Volume::open(dir, &small_blocks()).expect("open volume"));
    volume
        .spawn_committer(Duration::from_millis(10))
        .expect("committer");
    volume
}

#[test]
fn the_committer_syncs_the_block_files_before_it_folds_the_wal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let volume = volume_with_committer(dir.path());
    let write = |name: &str, seed: u8| {
        let (attr, handle) = volume
            .create(ROOT, name.as_bytes(), 0o644, ME)
            .expect("create");
        volume
            .write(attr.node, 0, &pattern(3 * 4096, seed))
            .expect("write");
        volume.release(handle).expect("release");
    };
    write("first", 1);
    // The next group after FOLD_INTERVAL is folded in, its blocks and all before synced.
    std::thread::sleep(FOLD_INTERVAL);
    write("second", 2);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !volume.blocks.local().all_synced() {
        assert!(
            Instant::now() < deadline,
            "the fold left block files unsynced"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn an_idle_volume_folds_its_last_group_in_without_waiting_for_another() {
    let dir = tempfile::tempdir().expect("tempdir");
    let volume = volume_with_committer(dir.path());
    let (attr, handle) = volume.create(ROOT, b"last", 0o644, ME).expect("create");
    volume
        .write(attr.node, 0, &pattern(3 * 4096, 1))
        .expect("write");
    volume.release(handle).expect("release");
    // Nothing follows: the fold (and the block sync before it) comes all the same.
    let deadline = Instant::now() + FOLD_INTERVAL * 10;
    while !volume.blocks.local().all_synced() {
        assert!(
            Instant::now() < deadline,
            "the last group's blocks are still unsynced after {:?}",
            FOLD_INTERVAL * 10
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_volume_shut_down_and_dropped_has_closed_its_catalog() {
    let dir = tempfile::tempdir().expect("tempdir");
    let volume = volume_with_committer(dir.path());
    let (attr, handle) = volume.create(ROOT, b"f", 0o644, ME).expect("create");
    volume.write(attr.node, 0, b"bytes").expect("write");
    volume.release(handle).expect("release");
    volume.shutdown().expect("shutdown");
    // The committer has ended: it holds the volume no more, not even weakly, nor its own
    // connection to the catalog.
    assert_eq!(Arc::weak_count(&volume), 0, "the committer still runs");
    drop(Arc::into_inner(volume).expect("the test holds the only reference"));
    // SQLite deletes the WAL when its last connection closes.
    let wal = dir.path().join("catalog.db-wal");
    assert!(!wal.exists(), "{} is left behind", wal.display());
}

#[test]
fn second_open_of_a_data_dir_is_refused() {
    let t = TestVolume::new();
    match Volume::open(t.dir.path(), &small_blocks()) {
        Err(Error::Locked { pid, .. }) => assert_eq!(pid, std::process::id().to_string()),
        other => panic!("expected Locked, got {:?}", other.map(|_| ())),
    }
}

/// One step of the random-operation property test.
#[derive(Clone, Debug)]
enum Op {
    Write {
        file: usize,
        offset: u64,
        len: usize,
        seed: u8,
    },
    Truncate {
        file: usize,
        size: u64,
    },
    Rename {
        from: usize,
        to: usize,
    },
    Link {
        from: usize,
        to: usize,
    },
    Unlink {
        file: usize,
    },
    Flush {
        file: usize,
    },
    /// The background flusher's work ahead of a flush (`Volume::store_unlocked`), which
    /// the changes after it must undo where they touch what it hashed and stored.
    StoreAhead {
        file: usize,
    },
    /// fallocate(2): allocate, keep size, punch, zero range (`ranges::fallocate_mode`).
    Fallocate {
        file: usize,
        offset: u64,
        len: u64,
        mode: i32,
    },
    /// copy_file_range(2), sharing blocks where the offsets are equally aligned.
    Copy {
        from: usize,
        from_offset: u64,
        to: usize,
        to_offset: u64,
        len: u64,
    },
    Reopen,
    Snapshot,
    DeleteSnapshot {
        pick: usize,
    },
}

const NAMES: [&str; 4] = ["a", "b", "c", "d"];

fn op() -> impl Strategy<Value = Op> {
    let file = 0..NAMES.len();
    prop_oneof![
        4 => (file.clone(), 0..20_000u64, 1..9000usize, any::<u8>())
            .prop_map(|(file, offset, len, seed)| Op::Write { file, offset, len, seed }),
        2 => (file.clone(), 0..24_000u64).prop_map(|(file, size)| Op::Truncate { file, size }),
        1 => (file.clone(), file.clone()).prop_map(|(from, to)| Op::Rename { from, to }),
        1 => (file.clone(), file.clone()).prop_map(|(from, to)| Op::Link { from, to }),
        1 => file.clone().prop_map(|file| Op::Unlink { file }),
        1 => file.clone().prop_map(|file| Op::Flush { file }),
        2 => file.clone().prop_map(|file| Op::StoreAhead { file }),
        2 => (file.clone(), ranges::range_offset(), 1..20_000u64, ranges::fallocate_mode())
            .prop_map(|(file, offset, len, mode)| Op::Fallocate { file, offset, len, mode }),
        2 => (file.clone(), ranges::range_offset(), file, ranges::range_offset(), 1..30_000u64)
            .prop_map(|(from, from_offset, to, to_offset, len)| {
                Op::Copy { from, from_offset, to, to_offset, len }
            }),
        1 => Just(Op::Reopen),
        2 => Just(Op::Snapshot),
        1 => (0..8usize).prop_map(|pick| Op::DeleteSnapshot { pick }),
    ]
}

/// The model: names to inode keys, inode keys to contents (hard links share a key).
#[derive(Default)]
struct Model {
    names: BTreeMap<&'static str, usize>,
    files: BTreeMap<usize, Vec<u8>>,
    next: usize,
    /// Each live snapshot's name and what every name held when it was taken.
    snapshots: Vec<(String, BTreeMap<&'static str, Vec<u8>>)>,
    taken: usize,
}

impl Model {
    fn file_mut(&mut self, name: &'static str) -> &mut Vec<u8> {
        let next = &mut self.next;
        let key = *self.names.entry(name).or_insert_with(|| {
            *next += 1;
            *next
        });
        self.files.entry(key).or_default()
    }
}

fn node_for(t: &TestVolume, name: &str) -> NodeId {
    match t.v().lookup(ROOT, name.as_bytes()) {
        Ok(attr) => attr.node,
        Err(Error::NotFound) => {
            let (node, handle) = t.create(name);
            t.v().release(handle).expect("release");
            node
        }
        Err(e) => panic!("lookup {name}: {e}"),
    }
}

fn apply(t: &mut TestVolume, model: &mut Model, op: &Op) {
    match *op {
        Op::Write {
            file,
            offset,
            len,
            seed,
        } => {
            let data = pattern(len, seed);
            let node = node_for(t, NAMES[file]);
            t.v().write(node, offset, &data).expect("write");
            let content = model.file_mut(NAMES[file]);
            let end = offset as usize + len;
            if content.len() < end {
                content.resize(end, 0);
            }
            content[offset as usize..end].copy_from_slice(&data);
        }
        Op::Truncate { file, size } => {
            let node = node_for(t, NAMES[file]);
            let set = SetAttr {
                size: Some(size),
                ..SetAttr::default()
            };
            t.v().setattr(node, set).expect("truncate");
            model.file_mut(NAMES[file]).resize(size as usize, 0);
        }
        Op::Rename { from, to } => {
            let result = t
                .v()
                .rename(ROOT, NAMES[from].as_bytes(), ROOT, NAMES[to].as_bytes(), 0);
            match model.names.get(NAMES[from]).copied() {
                None => assert!(matches!(result, Err(Error::NotFound))),
                Some(key) => {
                    result.expect("rename");
                    // Renaming between two links of one file does nothing (POSIX).
                    if model.names.get(NAMES[to]) != Some(&key) {
                        model.names.remove(NAMES[from]);
                        model.names.insert(NAMES[to], key);
                    }
                }
            }
        }
        Op::Link { from, to } => {
            let result = t
                .v()
                .lookup(ROOT, NAMES[from].as_bytes())
                .and_then(|attr| t.v().link(attr.node, ROOT, NAMES[to].as_bytes()));
            match (
                model.names.get(NAMES[from]).copied(),
                model.names.get(NAMES[to]),
            ) {
                (None, _) => assert!(matches!(result, Err(Error::NotFound))),
                (Some(_), Some(_)) => assert!(matches!(result, Err(Error::Exists))),
                (Some(key), None) => {
                    result.expect("link");
                    model.names.insert(NAMES[to], key);
                }
            }
        }
        Op::Unlink { file } => {
            let result = t.v().unlink(ROOT, NAMES[file].as_bytes());
            match model.names.remove(NAMES[file]) {
                None => assert!(matches!(result, Err(Error::NotFound))),
                Some(_) => result.expect("unlink"),
            }
        }
        Op::Flush { file } => {
            if let Ok(attr) = t.v().lookup(ROOT, NAMES[file].as_bytes()) {
                t.v().flush(attr.node).expect("flush");
            }
        }
        Op::StoreAhead { file } => {
            if let Ok(attr) = t.v().lookup(ROOT, NAMES[file].as_bytes()) {
                t.v().store_ahead_of_flush(attr.node.ino);
            }
        }
        Op::Fallocate {
            file,
            offset,
            len,
            mode,
        } => {
            let node = node_for(t, NAMES[file]);
            t.v().fallocate(node, offset, len, mode).expect("fallocate");
            ranges::fallocate_model(model.file_mut(NAMES[file]), offset, len, mode);
        }
        Op::Copy {
            from,
            from_offset,
            to,
            to_offset,
            len,
        } => {
            let (src, dst) = (node_for(t, NAMES[from]), node_for(t, NAMES[to]));
            let source = model.file_mut(NAMES[from]).clone();
            let copy = CopyRange {
                src,
                src_offset: from_offset,
                dst,
                dst_offset: to_offset,
                len,
            };
            let result = t.v().copy_range(copy);
            ranges::copy_model(result, copy, &source, src == dst, model.file_mut(NAMES[to]));
        }
        Op::Reopen => t.reopen(),
        Op::Snapshot => {
            model.taken += 1;
            let name = format!("s{}", model.taken);
            t.v().create_snapshot(name.as_bytes()).expect("snapshot");
            let contents = model
                .names
                .iter()
                .map(|(&n, key)| (n, model.files[key].clone()))
                .collect();
            model.snapshots.push((name, contents));
        }
        Op::DeleteSnapshot { pick } => {
            if !model.snapshots.is_empty() {
                let (name, _) = model.snapshots.remove(pick % model.snapshots.len());
                t.v()
                    .delete_snapshot(name.as_bytes())
                    .expect("delete snapshot");
            }
        }
    }
}

fn snapshot_root(t: &TestVolume, name: &str) -> NodeId {
    t.v()
        .lookup(SNAPDIR, name.as_bytes())
        .expect("snapshot")
        .node
}

fn check(t: &TestVolume, model: &Model) {
    for name in NAMES {
        match model.names.get(name) {
            None => assert!(matches!(
                t.v().lookup(ROOT, name.as_bytes()),
                Err(Error::NotFound)
            )),
            Some(key) => {
                let node = t.v().lookup(ROOT, name.as_bytes()).expect("lookup").node;
                let expected = &model.files[key];
                assert_eq!(t.read_all(node).len(), expected.len(), "size of {name}");
                assert!(t.read_all(node) == *expected, "content of {name}");
                ranges::check_holes(t, node, expected, name);
            }
        }
    }
    for (snapshot, contents) in &model.snapshots {
        let root = snapshot_root(t, snapshot);
        for name in NAMES {
            let found = t.v().lookup(root, name.as_bytes());
            match contents.get(name) {
                None => assert!(matches!(found, Err(Error::NotFound)), "{snapshot}/{name}"),
                Some(expected) => {
                    let node = found.expect("file in snapshot").node;
                    assert!(
                        t.read_all(node) == *expected,
                        "content of {snapshot}/{name}"
                    );
                    ranges::check_holes(t, node, expected, &format!("{snapshot}/{name}"));
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn random_operations_match_the_model(ops in proptest::collection::vec(op(), 1..40)) {
        let mut t = TestVolume::new();
        let mut model = Model::default();
        for op in &ops {
            apply(&mut t, &mut model, op);
            check(&t, &model);
        }
        // The counters (live inodes and bytes, block references) match
        // the rows after any sequence, and every view is a tree.
        let findings = lock(&t.v().catalog)
            .read(|tx| tx.invariant_findings(4096))
            .expect("invariants");
        prop_assert!(findings.is_empty(), "{findings:?}");
        t.v().flush_all().expect("flush");
        let strays = stray_block_files(t.v());
        prop_assert!(strays.is_empty(), "{strays:?}");
        t.reopen();
        check(&t, &model);
    }
}

#[test]
fn snapshot_is_isolated_from_later_changes() {
    let t = TestVolume::new();
    let data = pattern(10_000, 5);
    let node = t.write_file("f", &data);
    t.v().mkdir(ROOT, b"d", 0o755, ME).expect("mkdir");
    t.v().setxattr(node, b"user.k", b"old", 0).expect("xattr");
    let info = t.v().create_snapshot(b"s").expect("snapshot");
    assert_eq!(info.state, "pending");
    assert_eq!(info.logical_bytes, 10_000);

    let handle = t.v().open_file(node, true).expect("open");
    t.v().write(node, 100, b"changed").expect("write");
    t.v().release(handle).expect("release");
    let set = SetAttr {
        size: Some(50),
        mode: Some(0o600),
        ..SetAttr::default()
    };
    t.v().setattr(node, set).expect("truncate");
    t.v().setxattr(node, b"user.k", b"new", 0).expect("xattr");
    t.v().rename(ROOT, b"f", ROOT, b"g", 0).expect("rename");
    t.v().rmdir(ROOT, b"d").expect("rmdir");

    let root = snapshot_root(&t, "s");
    let old = t.v().lookup(root, b"f").expect("f in snapshot");
    assert_ne!(
        old.node.raw(),
        node.raw(),
        "a snapshot's file has its own st_ino"
    );
    assert_eq!(old.attrs.perm, 0o644);
    assert_eq!(t.read_all(old.node), data);
    assert_eq!(t.v().getxattr(old.node, b"user.k").expect("xattr"), b"old");
    assert!(t.v().lookup(root, b"d").is_ok());
    assert!(matches!(t.v().lookup(root, b"g"), Err(Error::NotFound)));
    let errno = |r: Result<()>| r.map_err(|e| e.errno());
    assert_eq!(
        errno(t.v().write(old.node, 0, b"x").map(|_| ())),
        Err(libc::EROFS)
    );
    assert_eq!(errno(t.v().unlink(root, b"f")), Err(libc::EROFS));
    assert_eq!(
        errno(t.v().setxattr(old.node, b"user.k", b"v", 0)),
        Err(libc::EROFS)
    );
    assert_eq!(
        errno(t.v().open_file(old.node, true).map(|_| ())),
        Err(libc::EROFS)
    );
}

/// chmod, chown and utimens of a file whose writes are buffered wait with them and are
/// stored by their flush, in one catalog write: every view sees them at once, and a
/// snapshot, the close and a reopen keep them.
#[test]
fn attributes_set_while_writes_are_buffered_are_stored_with_them() {
    let mut t = TestVolume::new();
    let (node, handle) = t.create("f");
    let data = pattern(5_000, 1);
    t.v().write(node, 0, &data).expect("write");
    let setattr = |set: SetAttr| t.v().setattr(node, set).expect("setattr").attrs;
    setattr(SetAttr {
        mode: Some(0o4755),
        ..SetAttr::default()
    });
    let chowned = setattr(SetAttr {
        uid: Some(1234),
        gid: Some(99),
        ..SetAttr::default()
    });
    assert_eq!(chowned.perm, 0o755, "chown clears set-user-id");
    let touched = setattr(SetAttr {
        atime: Some(SetTime::At(1_000)),
        mtime: Some(SetTime::At(2_000)),
        ..SetAttr::default()
    });
    let expect = |attrs: &Attrs, what: &str| {
        let seen = (
            attrs.perm,
            attrs.uid,
            attrs.gid,
            attrs.atime,
            attrs.mtime,
            attrs.size,
        );
        assert_eq!(seen, (0o755, 1234, 99, 1_000, 2_000, 5_000), "{what}");
    };
    expect(&touched, "setattr's reply");
    expect(&t.v().getattr(node).expect("getattr").attrs, "getattr");
    expect(&t.v().lookup(ROOT, b"f").expect("lookup").attrs, "lookup");
    let stored = lock(&t.v().catalog)
        .read(|tx| tx.inode(LIVE, node.ino))
        .expect("read the row")
        .expect("the row");
    assert_eq!(stored.attrs.perm, 0o644, "held until the flush");

    let in_snapshot = snapshot_of(&t, "s", b"f");
    expect(
        &t.v().getattr(in_snapshot).expect("getattr").attrs,
        "the snapshot",
    );
    assert_eq!(t.read_all(in_snapshot), data);

    t.v()
        .write(node, 5_000, b"tail")
        .expect("write after the snapshot");
    setattr(SetAttr {
        mode: Some(0o600),
        ..SetAttr::default()
    });
    t.v().release(handle).expect("release");
    t.reopen();
    let reopened = t.v().getattr(node).expect("getattr after reopen").attrs;
    assert_eq!(
        (reopened.perm, reopened.uid, reopened.gid, reopened.size),
        (0o600, 1234, 99, 5_004)
    );
    assert_ne!(reopened.mtime, 2_000, "the later write set mtime");
    let in_snapshot = t.v().getattr(snapshot_of(&t, "s2", b"f")).expect("getattr");
    assert_eq!(in_snapshot.attrs.perm, 0o600);
}

/// opendir checks the directory; readdir lists it at its first call and gives the same
/// listing at every later one until releasedir, so the kernel's offsets stay valid. A
/// directory removed in between lists nothing.
#[test]
fn a_listing_is_taken_at_the_first_readdir_and_kept() {
    let t = TestVolume::new();
    let dir = t.v().mkdir(ROOT, b"d", 0o755, ME).expect("mkdir").node;
    let file = t.write_file("f", b"x");
    let errno = |r: Result<u64>| r.map(drop).map_err(|e| e.errno());
    assert_eq!(errno(t.v().opendir(file)), Err(libc::ENOTDIR));
    let names = |handle: u64| -> Vec<Vec<u8>> {
        let entries = t.v().readdir(handle).expect("readdir");
        entries.iter().map(|e| e.name.clone()).collect()
    };
    let make = |name: &[u8]| {
        let (_, handle) = t.v().create(dir, name, 0o644, ME).expect("create");
        t.v().release(handle).expect("release");
    };
    let handle = t.v().opendir(dir).expect("opendir");
    make(b"early");
    assert_eq!(names(handle), [&b"."[..], b"..", b"early"]);
    make(b"late");
    assert_eq!(
        names(handle),
        [&b"."[..], b"..", b"early"],
        "kept until releasedir"
    );
    t.v().releasedir(handle);
    assert_eq!(errno(t.v().readdir(handle).map(|_| 0)), Err(libc::EINVAL));

    let gone = t.v().mkdir(ROOT, b"gone", 0o755, ME).expect("mkdir").node;
    let handle = t.v().opendir(gone).expect("opendir");
    t.v().rmdir(ROOT, b"gone").expect("rmdir");
    assert!(
        names(handle).is_empty(),
        "a removed directory lists nothing"
    );
    t.v().releasedir(handle);
    assert_eq!(
        errno(t.v().opendir(gone)),
        Err(libc::ENOENT),
        "opendir of a removed directory"
    );
}

#[test]
fn snapshot_names_are_checked() {
    let t = TestVolume::new();
    t.v().create_snapshot(b"a").expect("snapshot");
    let errno = |name: &[u8]| {
        t.v()
            .mkdir(SNAPDIR, name, 0o755, ME)
            .map(|_| ())
            .map_err(|e| e.errno())
    };
    assert_eq!(errno(b"a"), Err(libc::EEXIST));
    assert_eq!(errno(b".hidden"), Err(libc::EINVAL));
    assert_eq!(errno(&[b'x'; 256]), Err(libc::ENAMETOOLONG));
    assert_eq!(errno(b"caf\xe9"), Ok(()));
    assert_eq!(
        t.v().rmdir(ROOT, SNAPDIR_NAME).map_err(|e| e.errno()),
        Err(libc::EPERM)
    );
    assert_eq!(
        t.v()
            .mkdir(ROOT, SNAPDIR_NAME, 0o755, ME)
            .map(|_| ())
            .map_err(|e| e.errno()),
        Err(libc::EEXIST)
    );
}

#[test]
fn deleting_a_snapshot_frees_exactly_what_only_it_held() {
    let mut t = TestVolume::new();
    let node = t.write_file("f", &pattern(4096 * 4, 1));
    t.write_file("shared", &pattern(4096, 9));
    t.v().create_snapshot(b"s1").expect("s1");
    // Rewrite two of f's four blocks: the old two are held by s1 alone.
    let handle = t.v().open_file(node, true).expect("open");
    t.v().write(node, 0, &pattern(8192, 2)).expect("write");
    t.v().release(handle).expect("release");
    t.v().create_snapshot(b"s2").expect("s2");
    assert_eq!(t.stored_blocks(), 7);
    let s1 = t.v().list_snapshots()[0].id;
    assert_eq!(t.v().snapshot_info(s1).expect("info").exclusive_bytes, 8192);
    let s2 = t.v().list_snapshots()[1].id;
    assert_eq!(t.v().snapshot_info(s2).expect("info").exclusive_bytes, 0);

    t.v().delete_snapshot(b"s1").expect("delete s1");
    assert_eq!(t.stored_blocks(), 5);
    t.v().unlink(ROOT, b"f").expect("unlink");
    // s2 still holds f's blocks.
    assert_eq!(t.stored_blocks(), 5);
    t.reopen();
    let f = t
        .v()
        .lookup(snapshot_root(&t, "s2"), b"f")
        .expect("f in s2");
    assert_eq!(&t.read_all(f.node)[..8192], &pattern(8192, 2)[..]);
    t.v().delete_snapshot(b"s2").expect("delete s2");
    assert_eq!(t.stored_blocks(), 1);
}

/// Retention may delete a snapshot between the moment a listing of `.snapshots` reads the
/// rows and the moment it reads each root: the listing leaves it out instead of failing
/// (opendir once failed with ENOENT while a schedule pruned).
#[test]
fn a_listing_leaves_out_a_snapshot_deleted_while_it_was_taken() {
    let t = TestVolume::new();
    t.write_file("f", b"1");
    t.v().create_snapshot(b"kept").expect("kept");
    t.v().create_snapshot(b"pruned").expect("pruned");
    let rows = t.v().list_snapshots();
    t.v().delete_snapshot(b"pruned").expect("delete");

    let mut entries = Vec::new();
    t.v()
        .push_snapshot_roots(&mut entries, rows.into_iter().map(|r| (r.id, r.name)))
        .expect("a listing with a deleted row");
    let names: Vec<&[u8]> = entries.iter().map(|e| &e.name[..]).collect();
    assert_eq!(names, [&b"kept"[..]]);
    assert_eq!(entries[0].attr.node, snapshot_root(&t, "kept"));
}

#[test]
fn diff_reports_changes_between_snapshots() {
    use crate::inspect::{Change, Inspector};
    let t = TestVolume::new();
    let d = t.v().mkdir(ROOT, b"d", 0o755, ME).expect("mkdir").node;
    t.write_file("gone", b"1");
    t.write_file("moved", b"2");
    let edited = t.write_file("edited", b"3");
    t.v().create_snapshot(b"a").expect("a");
    t.v().unlink(ROOT, b"gone").expect("unlink");
    t.v().rename(ROOT, b"moved", d, b"here", 0).expect("rename");
    let handle = t.v().open_file(edited, true).expect("open");
    t.v().write(edited, 0, b"33").expect("write");
    t.v().release(handle).expect("release");
    t.write_file("new", b"4");
    t.v().create_snapshot(b"b").expect("b");
    t.write_file("later", b"5");

    let inspector = Inspector::open(t.dir.path()).expect("inspect");
    let changes = inspector.diff(b"a", Some(b"b")).expect("diff");
    let has = |c: Change| changes.contains(&c);
    assert!(has(Change::Removed(b"/gone".to_vec())), "{changes:?}");
    assert!(has(Change::Renamed {
        from: b"/moved".to_vec(),
        to: b"/d/here".to_vec()
    }));
    assert!(has(Change::Modified(b"/edited".to_vec())));
    assert!(has(Change::Added(b"/new".to_vec())));
    assert!(!has(Change::Added(b"/later".to_vec())));
    let since_b = inspector.diff(b"b", None).expect("diff to live");
    assert!(since_b.contains(&Change::Added(b"/later".to_vec())));
    assert!(matches!(
        inspector.diff(b"b", Some(b"a")),
        Err(Error::Invalid(_))
    ));
}

/// Shrunk from a proptest failure: rename between two links of one file leaves both.
#[test]
fn rename_between_links_of_one_file_does_nothing() {
    let t = TestVolume::new();
    let node = t.write_file("c", b"x");
    t.v().link(node, ROOT, b"b").expect("link");
    t.v().rename(ROOT, b"b", ROOT, b"c", 0).expect("rename");
    assert_eq!(t.v().lookup(ROOT, b"b").expect("b").node, node);
    assert_eq!(t.v().lookup(ROOT, b"c").expect("c").node, node);
    assert_eq!(t.v().getattr(node).expect("attr").attrs.nlink, 2);
}

/// Found by the concurrency torture test: the uploader reloads the snapshot table after
/// each completion; a reload that read the table just before a snapshot was taken put the
/// map back without it, and the new snapshot was ENOENT until the next reload (and one
/// just deleted could come back).
#[test]
fn snapshots_taken_during_reloads_of_the_table_stay_visible() {
    /// Stops the reloading thread however the test ends, so a failure cannot hang it.
    struct Stop<'a>(&'a std::sync::atomic::AtomicBool);
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    let t = TestVolume::new();
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                t.v()
                    .refresh_snapshots()
                    .expect("reload the snapshot table");
                // A pause between reloads: the lock is not fair, and a reloader that took
                // it again at once starved the snapshots for a minute on a busy host.
                std::thread::sleep(Duration::from_micros(50));
            }
        });
        let _stop = Stop(&stop);
        for i in 0..500 {
            let name = format!("s{i}");
            t.v().create_snapshot(name.as_bytes()).expect("snapshot");
            let found = t.v().lookup(SNAPDIR, name.as_bytes());
            assert!(found.is_ok(), "snapshot {name} just taken: {found:?}");
            if i % 2 == 1 {
                let older = format!("s{}", i - 1);
                t.v().delete_snapshot(older.as_bytes()).expect("delete");
                let gone = t.v().lookup(SNAPDIR, older.as_bytes());
                assert!(
                    gone.is_err(),
                    "snapshot {older} just deleted is still there"
                );
            }
        }
    });
}

/// Hooks that write into the volume from `before` (as a pre hook through the mount
/// would, with no lock held), refuse while a file `busy` exists, and record `after`.
struct RecordingHooks {
    volume: std::sync::Weak<Volume>,
    seen: Mutex<Vec<(Vec<u8>, String)>>,
}

impl SnapshotHooks for RecordingHooks {
    fn before(&self, name: &[u8]) -> std::result::Result<(), String> {
        let volume = self.volume.upgrade().ok_or("volume gone")?;
        if volume.lookup(ROOT, b"busy").is_ok() {
            return Err("database is busy".into());
        }
        let (attr, handle) = volume
            .create(ROOT, name, 0o644, ME)
            .map_err(|e| e.to_string())?;
        volume
            .write(attr.node, 0, b"checkpoint")
            .map_err(|e| e.to_string())?;
        volume.release(handle).map_err(|e| e.to_string())
    }

    fn after(&self, snapshot: &SnapshotInfo) {
        lock(&self.seen).push((snapshot.name.clone(), snapshot.state.as_str().to_owned()));
    }
}

#[test]
fn hooks_run_around_a_snapshot_and_a_refusal_takes_none() {
    let dir = tempfile::tempdir().expect("temp dir");
    let volume = Arc::new(Volume::open(dir.path(), &Options::default()).expect("open"));
    let hooks = Arc::new(RecordingHooks {
        volume: Arc::downgrade(&volume),
        seen: Mutex::new(Vec::new()),
    });
    volume.set_snapshot_hooks(hooks.clone()).expect("hooks");
    let info = volume.create_snapshot(b"s1").expect("snapshot");
    let in_snapshot = volume
        .lookup(
            NodeId {
                view: View::Snapshot(info.id),
                ino: ROOT_INO,
            },
            b"s1",
        )
        .expect("the hook's file is in the snapshot");
    assert_eq!(in_snapshot.attrs.size, 10);
    assert_eq!(*lock(&hooks.seen), [(b"s1".to_vec(), "pending".to_owned())]);

    volume
        .mknod(ROOT, b"busy", libc::S_IFREG | 0o644, 0, ME)
        .expect("busy");
    let refused = volume.create_snapshot(b"no-snapshot").unwrap_err();
    assert!(matches!(&refused, Error::Hook(reason) if reason == "database is busy"));
    assert_eq!(refused.errno(), libc::EIO);
    assert_eq!(volume.list_snapshots().len(), 1);
    assert_eq!(
        volume
            .getxattr(SNAPDIR, XATTR_HOOK_ERROR)
            .expect("the reason"),
        b"no-snapshot: database is busy"
    );
    assert_eq!(
        lock(&hooks.seen).len(),
        1,
        "no post hook without a snapshot"
    );
    // Once the name is taken after all, its old refusal is forgotten.
    volume.unlink(ROOT, b"busy").expect("unlink");
    volume.create_snapshot(b"no-snapshot").expect("taken now");
    assert!(matches!(
        volume.getxattr(SNAPDIR, XATTR_HOOK_ERROR),
        Err(Error::NoXattr)
    ));
}

mod lifecycle;

/// The names `opendir`/`readdir` list in directory `dir`.
fn listed(volume: &Volume, dir: NodeId) -> Vec<Vec<u8>> {
    let handle = volume.opendir(dir).expect("opendir");
    let names = volume
        .readdir(handle)
        .expect("readdir")
        .iter()
        .map(|entry| entry.name.clone())
        .collect();
    volume.releasedir(handle);
    names
}

const SEC: i64 = 1_000_000_000;

#[test]
fn a_checkpoint_is_taken_only_after_a_change() {
    let t = TestVolume::new();
    t.write_file("f", b"one");
    let first = t.v().take_checkpoint(SEC).expect("checkpoint");
    assert!(first.is_some(), "the volume changed");
    assert_eq!(
        t.v().take_checkpoint(2 * SEC).expect("idle"),
        None,
        "idle: none"
    );
    // Writes still in their buffers count: the checkpoint flushes them first.
    let (node, handle) = t.create("g");
    t.v().write(node, 0, b"buffered").expect("write");
    let second = t
        .v()
        .take_checkpoint(3 * SEC)
        .expect("checkpoint")
        .expect("changed");
    t.v().release(handle).expect("release");
    // A snapshot pins the change as well: nothing new for a checkpoint after it.
    t.write_file("h", b"three");
    t.v().create_snapshot(b"snap").expect("snapshot");
    assert_eq!(
        t.v().take_checkpoint(4 * SEC).expect("after a snapshot"),
        None
    );
    let names: Vec<String> = t
        .v()
        .list_checkpoints()
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert_eq!(names, [rfc3339(SEC), rfc3339(3 * SEC)]);
    let view = View::Snapshot(second.id);
    let g = t
        .v()
        .lookup(
            NodeId {
                view,
                ino: ROOT_INO,
            },
            b"g",
        )
        .expect("g in the checkpoint");
    assert_eq!(t.v().read(g.node, 0, 100).expect("read"), b"buffered");
}

#[test]
fn checkpoints_are_browsable_only_in_their_hidden_directory() {
    let t = TestVolume::new();
    let data = pattern(3 * 4096, 5);
    let dir = t.v().mkdir(ROOT, b"dir", 0o755, ME).expect("mkdir").node;
    let (file, handle) = t.v().create(dir, b"f", 0o644, ME).expect("create");
    t.v().write(file.node, 0, &data).expect("write");
    t.v().release(handle).expect("release");
    let checkpoint = t
        .v()
        .take_checkpoint(7)
        .expect("checkpoint")
        .expect("taken");
    t.v().unlink(dir, b"f").expect("unlink");
    t.v().rmdir(ROOT, b"dir").expect("rmdir");
    t.v().create_snapshot(b"after").expect("snapshot");

    assert_eq!(listed(t.v(), SNAPDIR), [&b"."[..], b"..", b"after"]);
    assert!(t.v().list_snapshots().iter().all(|s| s.name == b"after"));
    let cpdir = t
        .v()
        .lookup(SNAPDIR, CHECKPOINTS_NAME)
        .expect(".checkpoints");
    assert_eq!(cpdir.node, CHECKPOINT_DIR);
    let name = checkpoint.name.as_bytes();
    assert_eq!(listed(t.v(), CHECKPOINT_DIR), [&b"."[..], b"..", name]);
    let root = t.v().lookup(CHECKPOINT_DIR, name).expect("by name");
    let dir = t
        .v()
        .lookup(root.node, b"dir")
        .expect("dir in the checkpoint");
    let f = t.v().lookup(dir.node, b"f").expect("f in the checkpoint");
    assert_eq!(
        t.v().read(f.node, 0, data.len() as u32).expect("read"),
        data
    );
    let up = t.v().lookup(root.node, b"..").expect("..");
    assert_eq!(up.node, CHECKPOINT_DIR);
    // Read-only, and nothing but a promotion moves it.
    assert_eq!(
        t.v()
            .mkdir(root.node, b"x", 0o755, ME)
            .map(drop)
            .map_err(|e| e.errno()),
        Err(libc::EROFS)
    );
    assert_eq!(
        t.v()
            .mkdir(CHECKPOINT_DIR, b"x", 0o755, ME)
            .map(drop)
            .map_err(|e| e.errno()),
        Err(libc::EPERM)
    );
    assert_eq!(
        t.v()
            .setxattr(root.node, b"user.tag.k", b"v", 0)
            .map_err(|e| e.errno()),
        Err(libc::EROFS)
    );
    assert_eq!(
        t.v()
            .getxattr(root.node, b"user.snapfs.state")
            .expect("state"),
        b"checkpoint"
    );
    t.v()
        .rename(CHECKPOINT_DIR, name, SNAPDIR, b"before-rm", 0)
        .expect("promote by rename");
    assert!(
        listed(t.v(), CHECKPOINT_DIR).len() == 2,
        "no longer a checkpoint"
    );
    let promoted = t.v().lookup(SNAPDIR, b"before-rm").expect("a snapshot now");
    assert_eq!(promoted.node, root.node, "the same view, now a snapshot");
    let row = t
        .v()
        .list_snapshots()
        .into_iter()
        .find(|s| s.name == b"before-rm");
    assert_eq!(
        row.map(|s| (s.state, s.created)),
        Some((crate::catalog::SnapshotState::Pending, 7))
    );
}

#[test]
fn thinning_a_checkpoint_frees_only_what_nothing_else_holds() {
    let t = TestVolume::new();
    t.write_file("kept", &pattern(2 * 4096, 1));
    t.write_file("gone", &pattern(3 * 4096, 2));
    t.v()
        .take_checkpoint(0)
        .expect("checkpoint")
        .expect("taken");
    t.v().unlink(ROOT, b"gone").expect("unlink");
    assert_eq!(
        t.stored_blocks(),
        5,
        "the checkpoint holds the unlinked file"
    );
    let space = t.v().checkpoint_space().expect("space");
    assert_eq!(space.checkpoints[0].exclusive_bytes, 3 * 4096);
    assert_eq!(space.total_bytes, 3 * 4096);
    let policy = CheckpointPolicy {
        every: std::time::Duration::from_secs(1),
        window: std::time::Duration::from_secs(60),
    };
    assert_eq!(
        t.v()
            .thin_checkpoints(60_000_000_000, &policy)
            .expect("thin"),
        0
    );
    assert_eq!(
        t.v()
            .thin_checkpoints(61_000_000_000, &policy)
            .expect("thin"),
        1
    );
    assert_eq!(
        t.stored_blocks(),
        2,
        "what only the checkpoint held is freed"
    );
    assert!(t.v().list_checkpoints().is_empty());
    let kept = t.v().lookup(ROOT, b"kept").expect("live file");
    assert_eq!(t.read_all(kept.node), pattern(2 * 4096, 1));
}

/// Thinning reads the checkpoints, then drops them one by one: one promoted to a
/// snapshot in between keeps its catalog id, and must not be dropped as a checkpoint.
#[test]
fn a_checkpoint_promoted_after_thinning_listed_it_stays_a_snapshot() {
    let t = TestVolume::new();
    t.write_file("f", &pattern(4096, 3));
    let listed = t
        .v()
        .take_checkpoint(0)
        .expect("checkpoint")
        .expect("taken");
    t.v()
        .promote_checkpoint(listed.name.as_bytes(), b"p")
        .expect("promote");
    assert_eq!(
        t.v().delete_checkpoint(listed.id).map_err(|e| e.errno()),
        Err(libc::ENOENT)
    );
    let root = t.v().lookup(SNAPDIR, b"p").expect("the snapshot").node;
    let file = t.v().lookup(root, b"f").expect("its file").node;
    assert_eq!(t.read_all(file), pattern(4096, 3));
}

#[test]
fn checkpoints_survive_reopening() {
    let mut t = TestVolume::new();
    t.write_file("f", b"data");
    let taken = t
        .v()
        .take_checkpoint(5)
        .expect("checkpoint")
        .expect("taken");
    t.reopen();
    assert_eq!(t.v().list_checkpoints(), [taken]);
}

/// Block files the catalog does not know: a flush stored them and never adopted them.
fn stray_block_files(volume: &Volume) -> Vec<std::path::PathBuf> {
    let known = lock(&volume.catalog)
        .read(|tx| tx.block_records())
        .expect("block records")
        .into_iter()
        .map(|record| record.hash)
        .collect();
    volume.blocks.local().strays(&known).expect("strays")
}

/// The background flusher stores a whole block ahead of its flush
/// (`Volume::store_unlocked`); the writer then rewrites it, so the flush adopts other
/// bytes: the file stored ahead must go, or it would hold its space for good.
#[test]
fn a_block_stored_ahead_and_then_rewritten_leaves_no_file_behind() {
    let t = TestVolume::new();
    let (file, handle) = t.v().create(ROOT, b"f", 0o644, ME).expect("create");
    let bs = t.v().block_size as usize;
    t.v()
        .write(file.node, 0, &pattern(2 * bs, 1))
        .expect("write");
    t.v().store_ahead_of_flush(file.node.ino);
    assert_eq!(
        t.v()
            .blocks
            .local()
            .strays(&HashSet::new())
            .expect("files")
            .len(),
        2
    );
    t.v().write(file.node, 10, b"rewritten").expect("rewrite");
    t.v().flush(file.node).expect("flush");
    assert_eq!(stray_block_files(t.v()), Vec::<std::path::PathBuf>::new());
    let mut expected = pattern(2 * bs, 1);
    expected[10..19].copy_from_slice(b"rewritten");
    assert!(t.v().read(file.node, 0, 2 * bs as u32).expect("read") == expected);
    t.v().release(handle).expect("release");
}

/// A volume of small blocks with its background flusher running. Its age is an hour, so
/// within a test it flushes only what passes the flush-ahead mark.
fn volume_with_flusher(dir: &std::path::Path) -> Arc<Volume> {
    let volume = Arc::new(Volume::open(dir, &small_blocks()).expect("open"));
    volume
        .spawn_flusher(std::time::Duration::from_secs(3600))
        .expect("flusher");
    volume
}

/// Past a sixteenth of the dirty limit the background flusher drains every buffer, long
/// before their age and with no close, so a snapshot finds little to flush; under it,
/// buffers wait for their age.
#[test]
fn the_background_flusher_drains_buffers_ahead_of_the_dirty_limit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let volume = volume_with_flusher(dir.path());
    let mapped = |node: NodeId| {
        lock(&volume.catalog)
            .read(|tx| tx.blocks_in_range(LIVE, node.ino, 0, 1000))
            .expect("block map")
            .len()
    };
    // 512 bytes buffered: under the 4 KiB mark (64 KiB / 16), so nothing is flushed.
    let (small, small_handle) = volume.create(ROOT, b"small", 0o644, ME).expect("create");
    volume
        .write(small.node, 0, &pattern(512, 1))
        .expect("write");
    std::thread::sleep(std::time::Duration::from_millis(1200));
    assert_eq!(
        mapped(small.node),
        0,
        "under the mark, buffers wait for their age"
    );
    // 8 KiB more in another file: past the mark, far under the limit.
    let (big, big_handle) = volume.create(ROOT, b"big", 0o644, ME).expect("create");
    let data = pattern(8192, 2);
    volume.write(big.node, 0, &data).expect("write");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while (mapped(big.node), mapped(small.node)) != (2, 1) {
        assert!(
            std::time::Instant::now() < deadline,
            "the flusher did not drain the buffers"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(volume.read(big.node, 0, 8192).expect("read"), data);
    volume.release(small_handle).expect("release");
    volume.release(big_handle).expect("release");
}

/// The background flusher hashes and stores whole blocks with the file unlocked while its
/// writer goes on (`Volume::store_unlocked`): a writer appending and rewriting blocks as
/// they are stored, and the snapshots taken meanwhile, hold every byte it wrote, in place;
/// and no block file outlives the flushes unadopted.
#[test]
fn a_writer_racing_the_background_flusher_loses_no_byte() {
    let dir = tempfile::tempdir().expect("tempdir");
    let volume = volume_with_flusher(dir.path());
    let (file, handle) = volume.create(ROOT, b"f", 0o644, ME).expect("create");
    let (mut model, mut snapshots) = (Vec::new(), Vec::new());
    for round in 0..600usize {
        // A block and a half at a time: two appends, then a rewrite of a recent block.
        let data = pattern(6000, round as u8);
        let offset = match round % 3 {
            2 => model.len().saturating_sub(4096 * (1 + round % 4)),
            _ => model.len(),
        };
        volume
            .write(file.node, offset as u64, &data)
            .expect("write");
        model.resize(model.len().max(offset + data.len()), 0);
        model[offset..offset + data.len()].copy_from_slice(&data);
        if round % 100 == 99 {
            let name = format!("s{round}");
            volume.create_snapshot(name.as_bytes()).expect("snapshot");
            snapshots.push((name, model.clone()));
        }
    }
    volume.release(handle).expect("release");
    let read = |node: NodeId, len: usize| volume.read(node, 0, len as u32).expect("read");
    assert!(read(file.node, model.len()) == model, "the live file");
    for (name, expected) in snapshots {
        let root = volume.lookup(SNAPDIR, name.as_bytes()).expect("snapshot");
        let copy = volume.lookup(root.node, b"f").expect("f in the snapshot");
        assert_eq!(copy.attrs.size, expected.len() as u64, "size in {name}");
        assert!(
            read(copy.node, expected.len()) == expected,
            "content of {name}"
        );
    }
}

/// Reads of an open file remember its block map (`reads.rs`): every change to the file
/// must show in the reads that follow, through the same handle.
#[test]
fn reads_of_an_open_file_see_writes_flushes_and_truncates() {
    let t = TestVolume::new();
    let (node, old, reader) = t.open_read(4096 * 3, 1);

    // Buffered, then flushed: the flush changes the catalog's map.
    let writer = t.v().open_file(node, true).expect("open for writing");
    let new = pattern(4096, 2);
    t.v().write(node, 4096, &new).expect("write");
    assert_eq!(t.v().read(node, 4096, 4096).expect("read"), new);
    t.v().flush(node).expect("flush");
    assert_eq!(t.v().read(node, 4096, 4096).expect("read"), new);
    assert_eq!(t.v().read(node, 0, 4096).expect("read"), &old[..4096]);

    // Cut, flushed, then grown: the cut part reads as zeros, not as the old blocks.
    for size in [5000, 3 * 4096] {
        t.truncate(node, size);
    }
    let content = t.v().read(node, 0, 3 * 4096).expect("read");
    assert_eq!(&content[..4096], &old[..4096]);
    assert_eq!(&content[4096..5000], &new[..5000 - 4096]);
    assert!(content[5000..].iter().all(|&b| b == 0));

    // Unflushed truncate: catalog blocks past it must not show either.
    t.v()
        .write(node, 0, &pattern(3 * 4096, 3))
        .expect("rewrite");
    t.v().flush(node).expect("flush");
    t.truncate(node, 100);
    t.v().write(node, 8192, b"x").expect("write past the cut");
    let content = t.v().read(node, 0, 3 * 4096).expect("read");
    assert_eq!(content.len(), 8193);
    assert_eq!(&content[..100], &pattern(3 * 4096, 3)[..100]);
    assert!(content[100..8192].iter().all(|&b| b == 0));
    assert_eq!(content[8192], b'x');
    t.v().release(writer).expect("release");
    t.v().release(reader).expect("release");
    assert_eq!(t.read_all(node), content);
}

/// A snapshot's file keeps its point-in-time content whatever happens to the live file,
/// before or after either was read (and their maps remembered).
#[test]
fn snapshot_reads_keep_their_point_in_time_after_the_live_file_changes() {
    let t = TestVolume::new();
    let (node, old, handle) = t.open_read(4096 * 4, 4);
    let in_snapshot = snapshot_of(&t, "s", b"f");
    assert_eq!(
        t.v().read(in_snapshot, 0, old.len() as u32).expect("read"),
        old
    );

    let new = pattern(4096 * 2, 5);
    t.v().write(node, 4096, &new).expect("write");
    t.v().flush(node).expect("flush");
    t.truncate(node, 4096 * 3);
    t.v().release(handle).expect("release");

    let live = t.v().read(node, 0, old.len() as u32).expect("read live");
    assert_eq!(live, [&old[..4096], &new[..]].concat());
    let snap = t
        .v()
        .read(in_snapshot, 0, old.len() as u32)
        .expect("read snapshot");
    assert_eq!(snap, old);
    // A snapshot taken now sees the new content, through the same code.
    let in_s2 = snapshot_of(&t, "s2", b"f");
    assert_eq!(t.v().read(in_s2, 0, old.len() as u32).expect("read"), live);
}

/// Takes snapshot `name` and returns the node of `file` (in the root) in it.
fn snapshot_of(t: &TestVolume, name: &str, file: &[u8]) -> NodeId {
    t.v().create_snapshot(name.as_bytes()).expect("snapshot");
    t.v()
        .lookup(snapshot_root(t, name), file)
        .expect("lookup in the snapshot")
        .node
}

/// Blocks larger than a piece: once verified whole, their parts are read and checked
/// alone; damage in a part is found when that part is read, never served.
#[test]
fn parts_of_verified_blocks_are_checked_when_read_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let options = Options {
        block_size: 64 * 1024,
        // One block in memory: the others are read again from the disk.
        cache_bytes: 64 * 1024,
        ..Options::default()
    };
    let volume = Volume::open(dir.path(), &options).expect("open");
    let data = pattern(4 * 64 * 1024, 6);
    let (attr, handle) = volume.create(ROOT, b"f", 0o644, ME).expect("create");
    let node = attr.node;
    volume.write(node, 0, &data).expect("write");
    volume.flush(node).expect("flush");
    for round in 0..2 {
        for offset in [0usize, 70_000, 140_000, 200_000, 262_000] {
            let got = volume.read(node, offset as u64, 100).expect("read");
            assert_eq!(
                got,
                &data[offset..offset + 100],
                "round {round} at {offset}"
            );
        }
    }
    // Damage the second block's second piece behind the volume's back.
    let hash = crate::blocks::BlockHash::of(&data[65536..131072]);
    let hex = hash.to_hex();
    let path = dir.path().join("blocks").join(&hex[..2]).join(&hex);
    let mut bytes = fs::read(&path).expect("block file");
    bytes[20_000] ^= 1;
    fs::write(&path, &bytes).expect("damage");
    // Another block takes the memory cache's only place.
    volume.read(node, 0, 100).expect("read");
    let damaged = volume.read(node, 65536 + 19_990, 20);
    assert!(
        matches!(damaged, Err(ref e) if e.errno() == libc::EIO),
        "{damaged:?}"
    );
    assert_eq!(
        volume
            .read(node, 65536 + 40_000, 100)
            .expect("an intact piece"),
        &data[65536 + 40_000..65536 + 40_100]
    );
    volume.release(handle).expect("release");
}

/// The piece values a flush kept let a fresh mount read part of a block without reading
/// it whole (so damage elsewhere in the block does not fail the read); values the catalog
/// lost are never trusted, and go with their block.
#[test]
fn a_fresh_mount_reads_parts_of_blocks_by_the_pieces_their_flush_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let options = Options {
        block_size: 64 * 1024,
        ..Options::default()
    };
    let data = pattern(2 * 64 * 1024, 8);
    let volume = Volume::open(dir.path(), &options).expect("open");
    let (attr, handle) = volume.create(ROOT, b"f", 0o644, ME).expect("create");
    let node = attr.node;
    volume.write(node, 0, &data).expect("write");
    volume.release(handle).expect("release");
    let kept = |volume: &Volume| {
        lock(&volume.catalog)
            .read(|tx| tx.block_pieces_count())
            .expect("count")
    };
    assert_eq!(kept(&volume), 2);
    volume.shutdown().expect("shutdown");
    drop(volume);

    // Damage the first block's third 16 KiB piece behind the volume's back.
    let hex = crate::blocks::BlockHash::of(&data[..65536]).to_hex();
    let path = dir.path().join("blocks").join(&hex[..2]).join(&hex);
    let mut bytes = fs::read(&path).expect("block file");
    bytes[40_000] ^= 1;
    fs::write(&path, &bytes).expect("damage");

    let volume = Volume::open(dir.path(), &options).expect("reopen");
    assert_eq!(
        volume.read(node, 20_000, 100).expect("an intact piece"),
        &data[20_000..20_100]
    );
    let damaged = volume.read(node, 40_000, 100);
    assert!(
        matches!(damaged, Err(ref e) if e.errno() == libc::EIO),
        "{damaged:?}"
    );
    lock(&volume.catalog)
        .write_now(|tx| tx.damage_block_pieces())
        .expect("damage the values");
    volume.shutdown().expect("shutdown");
    drop(volume);

    // Values that do not make the block's hash are refused: the part is checked with the
    // whole block, whose damage fails the read.
    let volume = Volume::open(dir.path(), &options).expect("reopen");
    let whole = volume.read(node, 20_000, 100);
    assert!(
        matches!(whole, Err(ref e) if e.errno() == libc::EIO),
        "{whole:?}"
    );
    assert_eq!(
        volume
            .read(node, 65536 + 20_000, 100)
            .expect("the other block"),
        &data[65536 + 20_000..65536 + 20_100]
    );
    volume.unlink(ROOT, b"f").expect("unlink");
    assert_eq!(kept(&volume), 0, "the values go with their blocks");
}
