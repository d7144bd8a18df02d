//! Uploader tests on the core: a volume driven directly, a directory store, and a
//! fault-injecting wrapper around it. Tests through the kernel against real S3 servers
//! are in tests/upload.rs.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use super::*;
use crate::catalog::SnapshotState;
use crate::manifest::{PackedBlock, decode_snapshot, decode_tree, decompress};
use crate::store::{LocalStore, StoreFuture};
use crate::volume::tests::pattern;
use crate::volume::{Caller, NodeId, Options, View};

const ME: Caller = Caller { uid: 0, gid: 0 };
const ROOT: NodeId = NodeId {
    view: View::Live,
    ino: ROOT_INO,
};
const BLOCK: usize = 4096;
const PACK_SIZE: usize = 2 * BLOCK;

/// The options of this file's volumes: small blocks, so tests of a few blocks span many.
fn options() -> Options {
    Options {
        block_size: BLOCK as u32,
        ..Options::default()
    }
}

/// What `snapfs verify` finds wrong in `volume`'s catalog rows, read (as it reads them)
/// through a connection of its own.
fn invariant_findings(volume: &Volume) -> Vec<crate::catalog::Finding> {
    Catalog::open(&volume.catalog_path(), BLOCK as u32, 0, (0, 0))
        .expect("catalog")
        .read(|tx| tx.invariant_findings(BLOCK as u64))
        .expect("invariants")
}

/// A store that injects faults in front of a directory store and counts PUTs per key.
struct FaultyStore {
    inner: LocalStore,
    /// PUTs still to fail with a transient error.
    transient_failures: AtomicU32,
    /// Fail every PUT with this permanent error.
    permanent: std::sync::Mutex<Option<String>>,
    puts: std::sync::Mutex<HashMap<String, u32>>,
    /// Blocks in the packs PUT, counting each PUT.
    packed_blocks_put: AtomicU32,
    /// Reads of packs (whole or a range).
    pack_gets: AtomicU32,
    /// Bytes of packs read by range requests.
    pack_range_bytes: AtomicU64,
    put_delay: Duration,
    /// How long each range read waits before it reads.
    range_delay: Duration,
    /// Runs once, at the next range read of a pack, before the read: what another thread
    /// does between a reader's look at the catalog and its request.
    before_pack_read: std::sync::Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl FaultyStore {
    fn new(dir: &Path) -> FaultyStore {
        FaultyStore {
            inner: LocalStore::open(dir, format!("file://{}", dir.display())).expect("store"),
            transient_failures: AtomicU32::new(0),
            permanent: std::sync::Mutex::new(None),
            puts: std::sync::Mutex::new(HashMap::new()),
            packed_blocks_put: AtomicU32::new(0),
            pack_gets: AtomicU32::new(0),
            pack_range_bytes: AtomicU64::new(0),
            put_delay: Duration::ZERO,
            range_delay: Duration::ZERO,
            before_pack_read: std::sync::Mutex::new(None),
        }
    }

    fn put_count_total(&self) -> u32 {
        self.puts.lock().expect("lock").values().sum()
    }

    fn put_count(&self, key: &str) -> u32 {
        self.puts
            .lock()
            .expect("lock")
            .get(key)
            .copied()
            .unwrap_or(0)
    }
}

impl ObjectStore for FaultyStore {
    fn put<'a>(&'a self, key: &'a str, body: bytes::Bytes) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            tokio::time::sleep(self.put_delay).await;
            if let Some(message) = self.permanent.lock().expect("lock").clone() {
                return Err(StoreError::permanent(message));
            }
            let failing =
                self.transient_failures
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
            if failing.is_ok() {
                return Err(StoreError::transient("503 SlowDown (injected)"));
            }
            *self
                .puts
                .lock()
                .expect("lock")
                .entry(key.to_owned())
                .or_default() += 1;
            if key.starts_with(ObjectKey::PACKS) {
                let listing = store::read_listing(self, key, &body).expect("a pack");
                let blocks = listing
                    .blocks
                    .iter()
                    .filter(|block| !is_tree_frame(frame_of(&body, block)))
                    .count();
                self.packed_blocks_put
                    .fetch_add(blocks as u32, Ordering::SeqCst);
            }
            self.inner.put(key, body).await
        })
    }

    fn get<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Vec<u8>>> {
        if key.starts_with(ObjectKey::PACKS) {
            self.pack_gets.fetch_add(1, Ordering::SeqCst);
        }
        self.inner.get(key)
    }

    fn get_range_into<'a>(
        &'a self,
        key: &'a str,
        offset: u64,
        len: u64,
        buffer: Vec<u8>,
    ) -> StoreFuture<'a, Option<Vec<u8>>> {
        Box::pin(async move {
            tokio::time::sleep(self.range_delay).await;
            if key.starts_with(ObjectKey::PACKS) {
                let before = self.before_pack_read.lock().expect("lock").take();
                if let Some(before) = before {
                    before();
                }
            }
            let part = self.inner.get_range_into(key, offset, len, buffer).await?;
            if key.starts_with(ObjectKey::PACKS) {
                self.pack_gets.fetch_add(1, Ordering::SeqCst);
                let read = part.as_ref().map_or(0, Vec::len);
                self.pack_range_bytes
                    .fetch_add(read as u64, Ordering::SeqCst);
            }
            Ok(part)
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> StoreFuture<'a, ()> {
        self.inner.delete(key)
    }

    fn list<'a>(&'a self, prefix: &'a str) -> StoreFuture<'a, Vec<String>> {
        self.inner.list(prefix)
    }

    fn url(&self) -> &str {
        self.inner.url()
    }
}

/// The frame of `block` in `pack`.
fn frame_of<'a>(pack: &'a [u8], block: &PackedBlock) -> &'a [u8] {
    let at = block.offset as usize;
    &pack[at..at + block.length as usize]
}

/// Whether a pack's frame holds a directory tree rather than a block.
fn is_tree_frame(frame: &[u8]) -> bool {
    decompress(frame, 1 << 24).is_ok_and(|data| decode_tree(&data).is_ok())
}

struct Setup {
    _dir: tempfile::TempDir,
    store_dir: PathBuf,
    volume: Arc<Volume>,
    store: Arc<FaultyStore>,
    runtime: tokio::runtime::Runtime,
}

impl Setup {
    fn new() -> Setup {
        Setup::with_store(FaultyStore::new)
    }

    fn with_store(make: impl FnOnce(&Path) -> FaultyStore) -> Setup {
        let dir = tempfile::tempdir().expect("tempdir");
        let volume = Arc::new(Volume::open(&dir.path().join("data"), &options()).expect("open"));
        let store_dir = dir.path().join("store");
        let store = Arc::new(make(&store_dir));
        Setup {
            _dir: dir,
            store_dir,
            volume,
            store,
            runtime: tokio::runtime::Runtime::new().expect("runtime"),
        }
    }

    fn worker(&self) -> Worker {
        Worker::new(
            self.volume.clone(),
            self.store.clone(),
            UploadOptions {
                concurrency: 4,
                // Two of these incompressible test blocks per pack: uploads of a few
                // dozen blocks take many packs, as large ones do at the real size.
                pack_size: PACK_SIZE,
                ..UploadOptions::default()
            },
        )
        .expect("worker")
    }

    /// Starts an upload on the runtime, for a test to act while it runs.
    fn spawn_upload(&self) -> tokio::task::JoinHandle<Result<Vec<(u64, Outcome)>, UploadError>> {
        let worker = self.worker();
        self.runtime
            .spawn(async move { worker.upload_pending().await })
    }

    fn upload(&self) -> Vec<(u64, Outcome)> {
        self.runtime
            .block_on(self.worker().upload_pending())
            .expect("upload")
    }

    fn write(&self, parent: NodeId, name: &str, data: &[u8]) -> NodeId {
        let (node, handle) = match self.volume.lookup(parent, name.as_bytes()) {
            Ok(attr) => (
                attr.node,
                self.volume.open_file(attr.node, true).expect("open"),
            ),
            Err(_) => {
                let (attr, handle) = self
                    .volume
                    .create(parent, name.as_bytes(), 0o644, ME)
                    .expect("create");
                (attr.node, handle)
            }
        };
        self.volume.write(node, 0, data).expect("write");
        self.volume.release(handle).expect("release");
        node
    }

    fn mkdir(&self, name: &str) -> NodeId {
        self.volume
            .mkdir(ROOT, name.as_bytes(), 0o755, ME)
            .expect("mkdir")
            .node
    }

    fn snapshot(&self, name: &str) -> u64 {
        let info = self
            .volume
            .create_snapshot(name.as_bytes())
            .expect("snapshot");
        assert_eq!(info.state, "pending");
        info.id
    }

    /// Takes a checkpoint (the one of this test: a fixed time) and returns its name.
    fn checkpoint(&self) -> String {
        self.volume
            .take_checkpoint(1_000_000_000)
            .expect("checkpoint")
            .expect("taken")
            .name
    }

    fn state(&self, id: u64) -> SnapshotRow {
        self.volume
            .list_snapshots()
            .into_iter()
            .find(|s| s.id == id)
            .expect("snapshot exists")
    }

    fn keys(&self, prefix: &str) -> Vec<String> {
        let mut keys = self
            .runtime
            .block_on(self.store.list(prefix))
            .expect("list");
        keys.sort();
        keys
    }

    /// The blocks in the store's packs, each read back from its frame and checked
    /// against its hash, with the packs holding it.
    fn stored_blocks(&self) -> HashMap<BlockHash, Vec<String>> {
        self.stored_frames(false)
    }

    /// The directory trees in the store's packs, as `stored_blocks`.
    fn stored_trees(&self) -> HashMap<BlockHash, Vec<String>> {
        self.stored_frames(true)
    }

    fn stored_frames(&self, trees: bool) -> HashMap<BlockHash, Vec<String>> {
        let mut frames: HashMap<BlockHash, Vec<String>> = HashMap::new();
        for key in self.keys(ObjectKey::PACKS) {
            // Deleted since the listing (tests poll while the uploader collects): gone.
            let pack = match std::fs::read(self.store_dir.join(&key)) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                read => read.expect("pack"),
            };
            let listing = store::read_listing(&*self.store, &key, &pack).expect("listing");
            for block in listing.blocks {
                let frame = frame_of(&pack, &block);
                let data = decompress(frame, 1 << 24).expect("a zstd frame");
                assert_eq!(
                    BlockHash::of(&data),
                    block.hash,
                    "{key} at {}",
                    block.offset
                );
                assert_eq!(data.len(), block.raw_length as usize);
                if is_tree_frame(frame) == trees {
                    frames.entry(block.hash).or_default().push(key.clone());
                }
            }
        }
        frames
    }

    /// Every block in the store is in exactly one pack, and every pack was sent once.
    fn assert_each_block_sent_once(&self) {
        for (hash, packs) in self.stored_blocks() {
            assert_eq!(packs.len(), 1, "{hash} in {packs:?}");
            assert_eq!(self.store.put_count(&packs[0]), 1, "{} sent once", packs[0]);
        }
    }

    fn object(&self, key: &str) -> Vec<u8> {
        let data = std::fs::read(self.store_dir.join(key)).expect("object exists");
        decompress(&data, 1 << 24).expect("a zstd frame")
    }

    fn manifest(&self, id: u64) -> (SnapshotManifest, Vec<Entry>) {
        let snapshot = decode_snapshot(&self.object(&ObjectKey::snapshot(id))).expect("decode");
        let Content::Tree(root) = snapshot.root.content else {
            panic!("root without a tree")
        };
        let tree = self.tree(&root);
        (snapshot, tree)
    }

    /// Tree `hash`, as a reader with nothing but the store finds it (through the index).
    fn tree(&self, hash: &BlockHash) -> Vec<Entry> {
        let store = store::IndexedStore::new(self.store.clone());
        self.runtime
            .block_on(store::read_tree(&store, hash))
            .expect("the tree reads back")
    }
}

fn blocks_of(entry: &Entry) -> &[(u64, BlockHash)] {
    match &entry.content {
        Content::Blocks(blocks) => blocks,
        other => panic!("{:?} has {other:?}", entry.name),
    }
}

#[test]
fn first_snapshot_sends_every_block_once_and_a_manifest_of_everything() {
    let t = Setup::new();
    let a = pattern(3 * BLOCK, 1);
    t.write(ROOT, "a", &a);
    // b repeats a's first block: one object for both.
    t.write(ROOT, "b", &a[..BLOCK]);
    let dir = t.mkdir("dir");
    t.write(dir, "c", b"small file");
    t.volume
        .symlink(ROOT, b"link", b"dir/c", ME)
        .expect("symlink");
    let sparse = t.write(ROOT, "sparse", b"x");
    let handle = t.volume.open_file(sparse, true).expect("open");
    t.volume
        .write(sparse, 10 * BLOCK as u64, b"y")
        .expect("write after a hole");
    t.volume.release(handle).expect("release");

    let id = t.snapshot("first");
    assert_eq!(t.upload(), vec![(id, Outcome::Completed)]);
    let row = t.state(id);
    assert_eq!(row.state, "completed");
    // a: 3 blocks, b: shared, c: 1, sparse: 2 (the hole costs nothing).
    assert_eq!(row.upload.total_blocks, Some(6));
    assert_eq!(row.upload.sent_blocks, 6);
    assert!(row.upload.stored_bytes > 0);

    assert_eq!(t.stored_blocks().len(), 6);
    t.assert_each_block_sent_once();
    // Found through the index a reader with only the bucket reads.
    let index = t
        .runtime
        .block_on(store::PackIndex::load(&*t.store))
        .expect("index");
    assert_eq!(index.objects, 1);
    for hash in t.stored_blocks().keys() {
        assert!(index.contains(hash), "{hash} indexed");
    }

    let (snapshot, root) = t.manifest(id);
    assert_eq!(snapshot.name, b"first");
    assert_eq!(snapshot.block_size, BLOCK as u32);
    let names: Vec<&[u8]> = root.iter().map(|e| e.name.as_slice()).collect();
    assert_eq!(names, [&b"a"[..], b"b", b"dir", b"link", b"sparse"]);
    let a_blocks = blocks_of(&root[0]);
    let expected: Vec<(u64, BlockHash)> = a
        .chunks(BLOCK)
        .enumerate()
        .map(|(i, chunk)| (i as u64, BlockHash::of(chunk)))
        .collect();
    assert_eq!(a_blocks, expected.as_slice());
    assert_eq!(root[3].target.as_deref(), Some(&b"dir/c"[..]));
    assert_eq!(
        blocks_of(&root[4]).iter().map(|b| b.0).collect::<Vec<_>>(),
        [0, 10]
    );
    let Content::Tree(dir_tree) = &root[2].content else {
        panic!("dir without a tree")
    };
    let dir_entries = t.tree(dir_tree);
    assert_eq!(dir_entries.len(), 1);
    assert_eq!(dir_entries[0].attrs.size, 10);
}

#[test]
fn later_snapshots_send_only_changed_blocks_and_the_trees_on_the_path() {
    let t = Setup::new();
    let dir = t.mkdir("changes");
    let other = t.mkdir("untouched");
    let big = pattern(8 * BLOCK, 2);
    t.write(dir, "big", &big);
    t.write(other, "same", &pattern(BLOCK, 3));
    let first = t.snapshot("one");
    t.upload();
    let trees_before = t.stored_trees();
    let (_, root_before) = t.manifest(first);

    // Rewrite one block in place.
    let node = t.volume.lookup(dir, b"big").expect("lookup").node;
    let handle = t.volume.open_file(node, true).expect("open");
    t.volume
        .write(node, 3 * BLOCK as u64, &pattern(BLOCK, 9))
        .expect("write");
    t.volume.release(handle).expect("release");
    let second = t.snapshot("two");
    assert_eq!(t.upload(), vec![(second, Outcome::Completed)]);
    let row = t.state(second);
    assert_eq!(row.upload.total_blocks, Some(1));
    assert_eq!(row.upload.sent_bytes, BLOCK as u64);

    // New trees: the changed directory and the root, nothing else.
    let trees_after = t.stored_trees();
    assert_eq!(trees_after.len(), trees_before.len() + 2);
    let (_, root_after) = t.manifest(second);
    assert_eq!(
        root_before[1].content, root_after[1].content,
        "the untouched directory keeps its tree"
    );
    assert_ne!(root_before[0].content, root_after[0].content);
    // Every block was sent exactly once over both snapshots.
    t.assert_each_block_sent_once();
}

#[test]
fn the_trees_of_a_snapshot_travel_in_one_pack() {
    let t = Setup::new();
    for i in 0..20 {
        let dir = t.mkdir(&format!("d{i}"));
        t.write(dir, "f", format!("file {i}").as_bytes());
    }
    let id = t.snapshot("many");
    assert_eq!(t.upload(), vec![(id, Outcome::Completed)]);
    assert!(
        t.keys("trees/").is_empty(),
        "no tree is an object of its own"
    );
    let trees = t.stored_trees();
    assert_eq!(trees.len(), 21, "the root and 20 directories");
    let packs: HashSet<&String> = trees.values().flatten().collect();
    assert_eq!(packs.len(), 1, "one pack holds them all: {packs:?}");
    // Each reads back through the index alone, all of them with one read of the pack:
    // the first tree asked for brings the others.
    let (snapshot, _) = t.manifest(id);
    let Content::Tree(root) = snapshot.root.content else {
        panic!("the root is no directory")
    };
    let reader = store::IndexedStore::new(t.store.clone());
    let read = |hash: &BlockHash| {
        t.runtime
            .block_on(store::read_tree(&reader, hash))
            .expect("the tree reads back")
    };
    let gets = t.store.pack_gets.load(Ordering::SeqCst);
    let root = read(&root);
    assert_eq!(root.len(), 20);
    for entry in &root {
        let Content::Tree(hash) = &entry.content else {
            panic!("{:?} is no directory", entry.name)
        };
        assert_eq!(read(hash)[0].name, b"f");
    }
    assert_eq!(t.store.pack_gets.load(Ordering::SeqCst) - gets, 1);
}

#[test]
fn readers_of_evicted_neighbours_fetch_each_frame_once() {
    const BLOCKS: usize = 32;
    let t = Setup::with_store(|dir| FaultyStore {
        // Long enough for the readers' misses to meet while a span is on its way.
        range_delay: Duration::from_millis(30),
        ..FaultyStore::new(dir)
    });
    let worker = Worker::new(
        t.volume.clone(),
        t.store.clone(),
        UploadOptions {
            pack_size: 4 * BLOCKS * BLOCK,
            ..UploadOptions::default()
        },
    )
    .expect("worker");
    // The file, then as much again in another pack to fill the cache with.
    let data = pattern(BLOCKS * BLOCK, 6);
    let file = t.write(ROOT, "f", &data);
    for name in ["s", "pad"] {
        if name == "pad" {
            t.write(ROOT, "pad", &pattern(BLOCKS * BLOCK, 7));
        }
        let id = t.snapshot(name);
        let uploaded = t.runtime.block_on(worker.upload_pending()).expect("upload");
        assert_eq!(uploaded, vec![(id, Outcome::Completed)]);
    }
    let file_pack = t.stored_blocks()[&BlockHash::of(&data[..BLOCK])][0].clone();
    // A cache of one file's blocks: reading the padding last leaves only it local.
    t.volume
        .attach_store(
            t.store.clone(),
            t.runtime.handle().clone(),
            Some((BLOCKS * BLOCK) as u64),
        )
        .expect("attach");
    let pad = t.volume.lookup(ROOT, b"pad").expect("pad").node;
    for idx in 0..BLOCKS {
        t.volume
            .read(pad, (idx * BLOCK) as u64, BLOCK as u32)
            .expect("read the padding");
    }
    let read_before = t.store.pack_range_bytes.load(Ordering::SeqCst);
    let gets_before = t.store.pack_gets.load(Ordering::SeqCst);
    // Readers start at different blocks at once: a miss reads the evicted blocks after
    // it in the same request, and a reader that needs one of those waits for it.
    let start = std::sync::Barrier::new(4);
    std::thread::scope(|scope| {
        for reader in 0..4 {
            let (t, data, start) = (&t, &data, &start);
            scope.spawn(move || {
                start.wait();
                for i in 0..BLOCKS {
                    let idx = (reader * BLOCKS / 4 + i) % BLOCKS;
                    let at = idx * BLOCK;
                    let got = t.volume.read(file, at as u64, BLOCK as u32).expect("read");
                    assert!(got == data[at..at + BLOCK], "block {idx} reads back");
                }
            });
        }
    });
    let frames = std::fs::metadata(t.store_dir.join(&file_pack))
        .expect("pack")
        .len();
    let read = t.store.pack_range_bytes.load(Ordering::SeqCst) - read_before;
    assert!(read > 0, "the file's blocks were evicted");
    let gets = t.store.pack_gets.load(Ordering::SeqCst) - gets_before;
    assert!(
        gets <= 8,
        "{gets} requests for {BLOCKS} blocks: a miss brings the blocks after it"
    );
    assert!(
        read <= frames,
        "{read} bytes read from a pack of {frames}: some frames were fetched twice"
    );
}

/// A reader of an evicted block looks up its pack in the catalog, then reads it; garbage
/// collection may repack the block and delete that pack in between. The reader then
/// finds the block where the catalog says it is now, without waiting forever on the
/// catalog (841c7a4: the first version of this held the catalog's lock while it
/// fetched again, and every thread of the daemon hung behind it).
#[test]
fn a_block_repacked_while_a_reader_fetches_it_is_read_from_its_new_pack() {
    let t = Setup::new();
    // A file of two blocks, in one pack; its second block rewritten, so that once the
    // first snapshot is deleted the pack is half unused.
    let data = pattern(2 * BLOCK, 1);
    let file = t.write(ROOT, "f", &data);
    t.snapshot("one");
    t.upload();
    let kept = &data[..BLOCK];
    let kept_hash = BlockHash::of(kept);
    let old_pack = t.stored_blocks()[&kept_hash][0].clone();
    let gone_hash = BlockHash::of(&data[BLOCK..]);
    assert_eq!(t.stored_blocks()[&gone_hash], [old_pack.as_str()]);
    let handle = t.volume.open_file(file, true).expect("open");
    t.volume
        .write(file, BLOCK as u64, &pattern(BLOCK, 2))
        .expect("rewrite");
    t.volume.release(handle).expect("release");
    t.snapshot("two");
    t.volume.delete_snapshot(b"one").expect("delete");
    // An uploader whose idle collection leaves a half unused pack as it is.
    let patient = Worker::new(
        t.volume.clone(),
        t.store.clone(),
        UploadOptions {
            pack_size: PACK_SIZE,
            gc: GcPolicy {
                max_unused_percent: 200,
                max_copy_bytes: None,
            },
            ..UploadOptions::default()
        },
    )
    .expect("worker");
    t.runtime
        .block_on(patient.upload_pending())
        .expect("upload");
    assert_eq!(t.stored_blocks()[&kept_hash], [old_pack.as_str()]);
    // A cache of nothing: the kept block is read from the store.
    t.volume
        .attach_store(t.store.clone(), t.runtime.handle().clone(), Some(0))
        .expect("attach");

    let worker = t.worker();
    let repacked = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let collected = repacked.clone();
    *t.store.before_pack_read.lock().expect("lock") = Some(Box::new(move || {
        // On a runtime of its own: the reader's request waits on this one's.
        let policy = GcPolicy {
            max_unused_percent: 0,
            max_copy_bytes: None,
        };
        let report = std::thread::spawn(move || {
            let runtime = tokio::runtime::Runtime::new().expect("runtime");
            runtime.block_on(worker.collect_garbage(&policy))
        })
        .join()
        .expect("the collector ran")
        .expect("garbage collected");
        assert_eq!(report.repacked_packs, 1, "{report:?}");
        collected.store(true, Ordering::SeqCst);
    }));

    let (sender, read) = std::sync::mpsc::channel();
    let volume = t.volume.clone();
    std::thread::spawn(move || sender.send(volume.read(file, 0, BLOCK as u32)));
    let got = read
        .recv_timeout(Duration::from_secs(30))
        .expect("the read returns within 30 s")
        .expect("read");
    assert!(
        repacked.load(Ordering::SeqCst),
        "the pack was repacked during the read"
    );
    assert!(got == kept, "the kept block reads back");
    let new_pack = &t.stored_blocks()[&kept_hash];
    assert_ne!(*new_pack, [old_pack.as_str()], "the block moved");
    assert!(
        !t.keys("packs/").contains(&old_pack),
        "its old pack is deleted"
    );
}

#[test]
fn deleting_snapshots_deletes_the_objects_nothing_else_needs() {
    let t = Setup::new();
    let old = pattern(2 * BLOCK, 4);
    t.write(ROOT, "f", &old);
    let first = t.snapshot("one");
    t.upload();
    let new = pattern(2 * BLOCK, 5);
    t.write(ROOT, "f", &new);
    let second = t.snapshot("two");
    t.upload();
    assert_eq!(t.stored_blocks().len(), 4);
    assert_eq!(t.keys("snapshots/").len(), 2);
    assert_eq!(t.keys("index/").len(), 2);

    t.volume.delete_snapshot(b"one").expect("delete");
    t.upload();
    let old_blocks: Vec<BlockHash> = old.chunks(BLOCK).map(BlockHash::of).collect();
    let remaining = t.stored_blocks();
    assert_eq!(remaining.len(), 2);
    assert!(old_blocks.iter().all(|h| !remaining.contains_key(h)));
    // The first snapshot's packs (its blocks', its tree's) and its index object went
    // with them: left are the second's pack of blocks and pack of its one tree.
    assert_eq!(t.stored_trees().len(), 1);
    assert_eq!(t.keys("packs/").len(), 2);
    assert_eq!(t.keys("index/").len(), 1);
    assert_eq!(t.keys("snapshots/"), [ObjectKey::snapshot(second).as_str()]);
    assert!(
        !t.keys("snapshots/")
            .contains(&ObjectKey::snapshot(first).into())
    );
    // The remaining snapshot's trees are all still there.
    let (_, root) = t.manifest(second);
    assert_eq!(blocks_of(&root[0]).len(), 2);
}

#[test]
fn transient_store_errors_only_delay_completion() {
    let t = Setup::with_store(|dir| {
        let store = FaultyStore::new(dir);
        store.transient_failures.store(12, Ordering::SeqCst);
        store
    });
    t.write(ROOT, "f", &pattern(4 * BLOCK, 6));
    let id = t.snapshot("s");
    assert_eq!(t.upload(), vec![(id, Outcome::Completed)]);
    assert_eq!(t.store.transient_failures.load(Ordering::SeqCst), 0);
    assert_eq!(t.stored_blocks().len(), 4);
}

#[test]
fn permanent_errors_fail_the_snapshot_and_the_next_one_still_completes() {
    let t = Setup::new();
    t.write(ROOT, "f", &pattern(2 * BLOCK, 7));
    *t.store.permanent.lock().expect("lock") = Some("AccessDenied: no (injected)".into());
    let failed = t.snapshot("denied");
    assert_eq!(
        t.upload(),
        vec![(
            failed,
            Outcome::Failed("AccessDenied: no (injected)".into())
        )]
    );
    let row = t.state(failed);
    assert_eq!(row.state, "failed");
    assert_eq!(row.error.as_deref(), Some("AccessDenied: no (injected)"));

    // Access restored: the next snapshot sends what the failed one could not.
    *t.store.permanent.lock().expect("lock") = None;
    t.write(ROOT, "g", &pattern(BLOCK, 8));
    let next = t.snapshot("after");
    assert_eq!(t.upload(), vec![(next, Outcome::Completed)]);
    assert_eq!(t.state(next).upload.total_blocks, Some(3));
    let (_, root) = t.manifest(next);
    assert_eq!(root.len(), 2);
}

#[test]
fn a_block_lost_locally_fails_the_snapshot_with_its_name() {
    let t = Setup::new();
    let data = pattern(BLOCK, 10);
    t.write(ROOT, "f", &data);
    let hash = BlockHash::of(&data);
    let hex = hash.to_hex();
    let path = t
        .volume
        .data_dir()
        .join("blocks")
        .join(&hex[..2])
        .join(&hex);
    std::fs::remove_file(path).expect("lose the block");
    let id = t.snapshot("s");
    let outcomes = t.upload();
    let Outcome::Failed(reason) = &outcomes[0].1 else {
        panic!("expected a failure, got {outcomes:?}")
    };
    assert!(reason.contains(&hex), "{reason}");
    assert_eq!(t.state(id).state, "failed");
}

/// A block file damaged on the local disk (bit rot, a machine crash that left a file of
/// the right length) heals from the store at its next read, whole or in part: the read
/// gets the right bytes, and the file holds them again.
#[test]
fn a_damaged_block_file_is_read_from_the_store_and_replaced() {
    let t = Setup::new();
    let data = pattern(2 * BLOCK, 11);
    let file = t.write(ROOT, "f", &data);
    let small_data = pattern(1000, 12);
    let small = t.write(ROOT, "small", &small_data);
    let id = t.snapshot("s");
    t.upload();
    assert_eq!(t.state(id).state, "completed");
    t.volume
        .attach_store(t.store.clone(), t.runtime.handle().clone(), None)
        .expect("attach");
    let damage = |block: &[u8]| {
        let hex = BlockHash::of(block).to_hex();
        let path = t.volume.blocks_dir().join(&hex[..2]).join(&hex);
        let mut bytes = std::fs::read(&path).expect("read the block file");
        bytes[BLOCK / 2] ^= 0x20;
        std::fs::write(&path, &bytes).expect("damage the block file");
        path
    };
    let (first, second) = data.split_at(BLOCK);
    let whole = damage(first);
    let part = damage(second);

    let got = t
        .volume
        .read(file, 0, BLOCK as u32)
        .expect("read a whole block");
    assert!(got == first, "the whole block's bytes, from the store");
    let got = t
        .volume
        .read(file, (BLOCK + BLOCK / 2) as u64, 100)
        .expect("read part of a block");
    assert!(
        got == second[BLOCK / 2..BLOCK / 2 + 100],
        "the part's bytes, from the store"
    );
    assert!(
        std::fs::read(&whole).expect("read") == first,
        "the first file is good again"
    );
    assert!(
        std::fs::read(&part).expect("read") == second,
        "the second file is good again"
    );

    // A small block kept in the catalog (`blocks::INLINE_MAX`), damaged there.
    Catalog::open(&t.volume.catalog_path(), BLOCK as u32, 0, (0, 0))
        .expect("catalog")
        .write_now(|tx| tx.damage_inline_blocks())
        .expect("damage the small block");
    let got = t.volume.read(small, 0, 1000).expect("read the small file");
    assert!(got == small_data, "the small block's bytes, from the store");
}

/// A block fetched from the store that cannot be kept on the local disk (here its
/// temporary directory is gone; a full disk does the same) is still served.
#[test]
fn a_fetched_block_that_cannot_be_kept_is_still_served() {
    let t = Setup::new();
    let data = pattern(BLOCK, 13);
    let file = t.write(ROOT, "f", &data);
    t.snapshot("s");
    t.upload();
    t.volume
        .attach_store(t.store.clone(), t.runtime.handle().clone(), None)
        .expect("attach");
    let hex = BlockHash::of(&data).to_hex();
    let path = t.volume.blocks_dir().join(&hex[..2]).join(&hex);
    let damaged = vec![0x55; BLOCK];
    std::fs::write(&path, &damaged).expect("damage the block file");
    let temp = t.volume.blocks_dir().join("tmp");
    std::fs::remove_dir_all(&temp).expect("remove tmp");
    std::fs::write(&temp, b"not a directory").expect("a file in its place");

    let got = t.volume.read(file, 0, BLOCK as u32).expect("read");
    assert!(got == data, "the block's bytes, from the store");
    assert!(
        std::fs::read(&path).expect("read") == damaged,
        "the damaged file could not be replaced"
    );
}

#[test]
fn an_interrupted_upload_resumes_without_resending() {
    let t = Setup::with_store(|dir| FaultyStore {
        put_delay: Duration::from_millis(20),
        ..FaultyStore::new(dir)
    });
    t.write(ROOT, "f", &pattern(64 * BLOCK, 11));
    let id = t.snapshot("s");
    // Stop the uploader part-way, as a killed daemon would: once it has recorded some
    // progress (waiting a fixed time instead fails on a loaded machine).
    let worker = t.worker();
    let finished = t.runtime.block_on(async {
        let upload = worker.upload_pending();
        tokio::pin!(upload);
        loop {
            tokio::select! {
                outcomes = &mut upload => return Some(outcomes),
                () = tokio::time::sleep(Duration::from_millis(10)) => {
                    if t.state(id).upload.sent_blocks > 0 {
                        return None;
                    }
                }
            }
        }
    });
    assert!(finished.is_none(), "the upload should still be running");
    let partial = t.state(id);
    assert_eq!(partial.state, "pending");
    assert!(partial.upload.sent_blocks > 0 && partial.upload.sent_blocks < 64);

    assert_eq!(t.upload(), vec![(id, Outcome::Completed)]);
    let row = t.state(id);
    assert_eq!(row.upload.sent_blocks, 64);
    // Packs sent but not recorded before the interruption were deleted from the store.
    let stored = t.stored_blocks();
    assert_eq!(stored.len(), 64);
    assert!(stored.values().all(|packs| packs.len() == 1));
    // Only the packs in flight and the one being filled may go again.
    let per_pack = stored.values().fold(HashMap::new(), |mut counts, packs| {
        *counts.entry(&packs[0]).or_insert(0) += 1;
        counts
    });
    let most = per_pack.values().copied().max().unwrap_or(0);
    let resent = t.store.packed_blocks_put.load(Ordering::SeqCst) as usize - 64;
    assert!(
        resent <= most * (PACKS_IN_FLIGHT + 1),
        "{resent} blocks sent twice"
    );
}

#[test]
fn renaming_a_completed_snapshot_rewrites_its_manifest_object() {
    let t = Setup::new();
    t.write(ROOT, "f", b"data");
    let id = t.snapshot("before");
    t.upload();
    t.volume
        .rename_snapshot(b"before", b"after")
        .expect("rename");
    t.upload();
    let (snapshot, _) = t.manifest(id);
    assert_eq!(snapshot.name, b"after");
}

#[test]
fn a_snapshot_deleted_during_its_upload_leaves_nothing_in_the_store() {
    let t = Setup::with_store(|dir| FaultyStore {
        put_delay: Duration::from_millis(20),
        ..FaultyStore::new(dir)
    });
    t.write(ROOT, "f", &pattern(32 * BLOCK, 15));
    let id = t.snapshot("s");
    let task = t.spawn_upload();
    // Part-way through (32 blocks, 4 at a time, 20 ms each), the snapshot and the only
    // live file that uses its blocks go.
    std::thread::sleep(Duration::from_millis(120));
    t.volume
        .delete_snapshot(b"s")
        .expect("delete during upload");
    t.volume.unlink(ROOT, b"f").expect("unlink");
    let outcomes = t
        .runtime
        .block_on(task)
        .expect("upload task")
        .expect("upload");
    assert_eq!(outcomes, vec![(id, Outcome::Deleted)]);
    // What was sent before the deletion is deleted from the store.
    assert!(t.store.put_count_total() > 0, "some blocks were sent first");
    t.upload();
    assert_eq!(t.keys("packs/"), Vec::<String>::new());
    assert_eq!(t.keys("index/"), Vec::<String>::new());
    assert_eq!(t.keys("snapshots/"), Vec::<String>::new());
}

/// An unmount mid-upload lets the packs in flight land and records them: every block in
/// the store is one the catalog knows is there. One it did not know would stay in the
/// store for good.
#[test]
fn stopping_records_every_block_that_landed_and_sends_no_more() {
    let t = Setup::with_store(|dir| FaultyStore {
        put_delay: Duration::from_millis(20),
        ..FaultyStore::new(dir)
    });
    t.write(ROOT, "f", &pattern(64 * BLOCK, 12));
    let id = t.snapshot("s");
    let worker = t.worker();
    let outcomes = t.runtime.block_on(async {
        let upload = worker.upload_pending();
        tokio::pin!(upload);
        // Part-way (some packs recorded, most not sent yet), stop.
        while t.state(id).upload.sent_blocks == 0 {
            tokio::select! {
                outcomes = &mut upload => panic!("finished before the stop: {outcomes:?}"),
                () = tokio::time::sleep(Duration::from_millis(5)) => {}
            }
        }
        worker.stop_sending();
        upload.await.expect("the upload stops cleanly")
    });
    assert_eq!(outcomes, vec![]);
    let row = t.state(id);
    assert_eq!(row.state, "pending");
    let in_store = t.stored_blocks().len() as u64;
    assert!(in_store > 0 && in_store < 64, "{in_store} blocks sent");
    assert_eq!(
        row.upload.sent_blocks, in_store,
        "every block in the store is recorded as sent"
    );
}

/// The block hashes of file `name` in directory `dir` of snapshot `id`'s manifest.
fn file_blocks(t: &Setup, id: u64, dir: &str, name: &str) -> Vec<(u64, BlockHash)> {
    let (_, root) = t.manifest(id);
    let entry = root
        .iter()
        .find(|e| e.name == dir.as_bytes())
        .expect("directory in the manifest");
    let Content::Tree(tree) = &entry.content else {
        panic!("{dir} without a tree")
    };
    let entries = t.tree(tree);
    let file = entries
        .iter()
        .find(|e| e.name == name.as_bytes())
        .expect("file in the directory");
    blocks_of(file).to_vec()
}

fn hashes(data: &[u8]) -> Vec<(u64, BlockHash)> {
    data.chunks(BLOCK)
        .enumerate()
        .map(|(i, chunk)| (i as u64, BlockHash::of(chunk)))
        .collect()
}

/// A checkpoint is never uploaded; promoted after a newer snapshot completed, it gets a
/// manifest of its own point in time, and the manifests after it keep reusing the trees
/// of their own base, not the promoted one's.
#[test]
fn a_checkpoint_promoted_after_newer_snapshots_gets_a_correct_manifest() {
    let t = Setup::new();
    let (d1, d2) = (t.mkdir("d1"), t.mkdir("d2"));
    t.write(d1, "f", &pattern(2 * BLOCK, 1));
    t.write(d2, "g", &pattern(BLOCK, 2));
    t.snapshot("s1");
    t.upload();
    t.write(d1, "f", &pattern(2 * BLOCK, 3));
    let checkpoint = t.checkpoint();
    let keys_before = t.keys("");
    assert!(t.upload().is_empty(), "a checkpoint is not uploaded");
    assert_eq!(t.keys(""), keys_before, "nothing of it reaches the store");
    t.write(d1, "f", &pattern(2 * BLOCK, 4));
    t.write(d2, "g", &pattern(BLOCK, 5));
    let s2 = t.snapshot("s2");
    assert_eq!(t.upload(), vec![(s2, Outcome::Completed)]);

    let promoted = t
        .volume
        .promote_checkpoint(checkpoint.as_bytes(), b"p")
        .expect("promote");
    assert_eq!(promoted.state, "pending");
    assert_eq!(t.upload(), vec![(promoted.id, Outcome::Completed)]);
    assert_eq!(
        file_blocks(&t, promoted.id, "d1", "f"),
        hashes(&pattern(2 * BLOCK, 3))
    );
    assert_eq!(
        file_blocks(&t, promoted.id, "d2", "g"),
        hashes(&pattern(BLOCK, 2))
    );
    t.assert_each_block_sent_once();

    // s3 changes only d2: its d1 is s2's (the promoted one rewrote d1 after s2 did).
    t.write(d2, "h", b"new");
    let s3 = t.snapshot("s3");
    assert_eq!(t.upload(), vec![(s3, Outcome::Completed)]);
    assert_eq!(file_blocks(&t, s3, "d2", "g"), hashes(&pattern(BLOCK, 5)));
    assert_eq!(
        file_blocks(&t, s3, "d1", "f"),
        hashes(&pattern(2 * BLOCK, 4))
    );
    // Deleting the promoted snapshot leaves the others whole.
    t.volume.delete_snapshot(b"p").expect("delete");
    t.upload();
    assert_eq!(file_blocks(&t, s2, "d2", "g"), hashes(&pattern(BLOCK, 5)));
    let s4 = t.snapshot("s4");
    t.write(d2, "i", b"more");
    assert_eq!(t.upload(), vec![(s4, Outcome::Completed)]);
    assert_eq!(
        file_blocks(&t, s4, "d1", "f"),
        hashes(&pattern(2 * BLOCK, 4))
    );
}

#[test]
fn a_manifest_is_recorded_only_while_its_snapshot_and_its_base_are_there() {
    // What the uploader's last step sees when a deletion came while the manifest was
    // written: a second connection, as the uploader's own catalog reads are.
    let t = Setup::new();
    t.write(ROOT, "f", b"one");
    let a = t.snapshot("a");
    t.upload();
    t.write(ROOT, "f", b"two");
    let b = t.snapshot("b");
    let (ga, gb) = (t.state(a).generation, t.state(b).generation);
    let mut catalog =
        Catalog::open(&t.volume.catalog_path(), BLOCK as u32, 0, (0, 0)).expect("catalog");
    let root_tree = [(crate::catalog::ROOT_INO, BlockHash::of(b"a tree"))];
    let complete = |catalog: &mut Catalog, id, g, base| {
        catalog
            .write_now(|tx| tx.complete_snapshot(id, g, base, &root_tree, &[], &[]))
            .expect("complete")
    };
    // Written against a base that is gone (an older one, 0, is the base now).
    t.volume.delete_snapshot(b"a").expect("delete the base");
    let state = |catalog: &mut Catalog, id| {
        let row = catalog.read(|tx| tx.snapshot(id)).expect("read");
        row.map(|row| row.state)
    };
    assert_eq!(complete(&mut catalog, b, gb, ga), Completion::BaseChanged);
    assert_eq!(
        state(&mut catalog, b),
        Some(SnapshotState::Pending),
        "nothing recorded"
    );
    // The snapshot itself deleted.
    let c = t.snapshot("c");
    let gc = t.state(c).generation;
    t.volume.delete_snapshot(b"c").expect("delete");
    assert_eq!(complete(&mut catalog, c, gc, 0), Completion::Deleted);
    // Relying on a packed tree that was freed meanwhile (the last snapshot naming it
    // deleted): nothing recorded, the manifest is written again.
    let freed = [BlockHash::of(b"a freed tree")];
    let relying = catalog
        .write_now(|tx| tx.complete_snapshot(b, gb, 0, &root_tree, &[], &freed))
        .expect("complete");
    assert_eq!(relying, Completion::TreesFreed);
    assert_eq!(
        state(&mut catalog, b),
        Some(SnapshotState::Pending),
        "nothing recorded"
    );
    // Against the base there is: recorded.
    assert_eq!(complete(&mut catalog, b, gb, 0), Completion::Completed);
    assert_eq!(state(&mut catalog, b), Some(SnapshotState::Completed));
    // And the uploader itself completes a snapshot as before.
    let d = t.snapshot("d");
    assert_eq!(t.upload(), vec![(d, Outcome::Completed)]);
}

/// A slow batch (a busy mount, a full disk waiting for room) does not hold up deletions:
/// store objects freed while it is in flight go before it ends.
#[test]
fn objects_freed_during_a_slow_batch_are_deleted_before_it_ends() {
    let t = Setup::with_store(|dir| FaultyStore {
        put_delay: Duration::from_millis(40),
        ..FaultyStore::new(dir)
    });
    let old = pattern(2 * BLOCK, 21);
    t.write(ROOT, "old", &old);
    t.snapshot("one");
    t.upload();
    let old_blocks: Vec<BlockHash> = old.chunks(BLOCK).map(BlockHash::of).collect();
    let stored = |hash: &BlockHash| t.stored_blocks().contains_key(hash);
    assert!(old_blocks.iter().all(stored), "the first snapshot's blocks");
    t.volume.unlink(ROOT, b"old").expect("unlink");
    // 96 blocks, 48 packs, 3 at a time, 40 ms each: most of a second.
    t.write(ROOT, "big", &pattern(96 * BLOCK, 22));
    let two = t.snapshot("two");
    let task = t.spawn_upload();
    std::thread::sleep(Duration::from_millis(100));
    // Only snapshot one still needs the old blocks.
    t.volume.delete_snapshot(b"one").expect("delete");
    let block_puts = || t.store.packed_blocks_put.load(Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(5);
    while old_blocks.iter().any(stored) {
        assert!(Instant::now() < deadline, "never deleted");
        std::thread::sleep(Duration::from_millis(10));
    }
    let sent = block_puts();
    assert!(
        sent < 2 + 96 - 8,
        "deleted only once the batch was (nearly) done: {sent} block PUTs by then"
    );
    let outcomes = t
        .runtime
        .block_on(task)
        .expect("upload task")
        .expect("upload");
    assert_eq!(outcomes, vec![(two, Outcome::Completed)]);
}

/// One step of `random_snapshot_lifecycles_keep_every_manifest_whole`.
#[derive(Clone, Debug)]
enum LifecycleOp {
    /// Writes file `file` of directory `dir` (made as needed) with pattern `seed`.
    Write {
        dir: usize,
        file: usize,
        seed: u8,
    },
    /// Removes directory `dir` and everything under it.
    RemoveDir {
        dir: usize,
    },
    Snapshot,
    Checkpoint,
    /// Promotes the `n`th checkpoint (modulo their number) to a snapshot.
    Promote {
        n: usize,
    },
    Upload,
    /// Deletes the `n`th snapshot (modulo their number).
    Delete {
        n: usize,
    },
    /// Deletes the `n`th snapshot while an upload runs.
    DeleteDuringUpload {
        n: usize,
    },
    /// Renames the `n`th snapshot.
    Rename {
        n: usize,
    },
    /// Takes the `n`th snapshot of the recycle bin out again, under a new name.
    Undelete {
        n: usize,
    },
    /// Deletes the `n`th snapshot of the recycle bin for good.
    Purge {
        n: usize,
    },
}

/// The directories the lifecycle test writes in: the root and three below it.
const LIFECYCLE_DIRS: [&str; 4] = ["", "a", "a/b", "c"];

fn lifecycle_op() -> impl proptest::strategy::Strategy<Value = LifecycleOp> {
    use proptest::prelude::*;
    prop_oneof![
        4 => (0..LIFECYCLE_DIRS.len(), 0..2usize, any::<u8>())
            .prop_map(|(dir, file, seed)| LifecycleOp::Write { dir, file, seed }),
        1 => (1..LIFECYCLE_DIRS.len()).prop_map(|dir| LifecycleOp::RemoveDir { dir }),
        2 => Just(LifecycleOp::Snapshot),
        1 => Just(LifecycleOp::Checkpoint),
        1 => any::<usize>().prop_map(|n| LifecycleOp::Promote { n }),
        2 => Just(LifecycleOp::Upload),
        2 => any::<usize>().prop_map(|n| LifecycleOp::Delete { n }),
        1 => any::<usize>().prop_map(|n| LifecycleOp::DeleteDuringUpload { n }),
        1 => any::<usize>().prop_map(|n| LifecycleOp::Rename { n }),
        1 => any::<usize>().prop_map(|n| LifecycleOp::Undelete { n }),
        1 => any::<usize>().prop_map(|n| LifecycleOp::Purge { n }),
    ]
}

/// What a view holds: each file by path, with its content.
type Files = std::collections::BTreeMap<String, Vec<u8>>;

impl Setup {
    /// The directory at `path` (made, with its parents, if missing).
    fn dir_at(&self, path: &str) -> NodeId {
        let mut node = ROOT;
        for name in path.split('/').filter(|name| !name.is_empty()) {
            node = match self.volume.lookup(node, name.as_bytes()) {
                Ok(attr) => attr.node,
                Err(_) => {
                    self.volume
                        .mkdir(node, name.as_bytes(), 0o755, ME)
                        .expect("mkdir")
                        .node
                }
            };
        }
        node
    }

    /// Removes directory `name` of `parent`, if it is there, with the files and the
    /// subdirectory the lifecycle test makes in it.
    fn remove_tree(&self, parent: NodeId, name: &str) {
        let Ok(attr) = self.volume.lookup(parent, name.as_bytes()) else {
            return;
        };
        for file in ["f0", "f1"] {
            // Absent files are fine: only those written exist.
            let _ = self.volume.unlink(attr.node, file.as_bytes());
        }
        self.remove_tree(attr.node, "b");
        self.volume.rmdir(parent, name.as_bytes()).expect("rmdir");
    }

    fn invariant_findings(&self) -> Vec<crate::catalog::Finding> {
        invariant_findings(&self.volume)
    }

    /// Every file of snapshot `id`'s manifest in the store, by path, as its blocks.
    fn manifest_files(&self, id: u64) -> HashMap<String, Vec<(u64, BlockHash)>> {
        fn walk(
            t: &Setup,
            prefix: &str,
            entries: Vec<Entry>,
            files: &mut HashMap<String, Vec<(u64, BlockHash)>>,
        ) {
            for entry in entries {
                let path = format!("{prefix}{}", String::from_utf8_lossy(&entry.name));
                match &entry.content {
                    Content::Tree(tree) => walk(t, &format!("{path}/"), t.tree(tree), files),
                    Content::Blocks(blocks) => {
                        files.insert(path, blocks.clone());
                    }
                    Content::None => panic!("{path}: nothing of the kind was made"),
                }
            }
        }
        let (_, root) = self.manifest(id);
        let mut files = HashMap::new();
        walk(self, "", root, &mut files);
        files
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig {
        cases: 48,
        ..proptest::prelude::ProptestConfig::default()
    })]

    /// Snapshots taken, uploaded, promoted from checkpoints, renamed and deleted in any
    /// order (a deletion racing an upload included), with or without a recycle bin to
    /// delete into, undelete from and purge, leave the catalog's versioned rows, directory
    /// trees included, one version at a time, and every completed snapshot's manifest in
    /// the store (those in the bin included) naming exactly the files it had.
    #[test]
    fn random_snapshot_lifecycles_keep_every_manifest_whole(
        ops in proptest::collection::vec(lifecycle_op(), 1..40),
        bin in proptest::prelude::any::<bool>(),
    ) {
        let t = Setup::new();
        if bin {
            t.volume
                .remember_trash_retention(Duration::from_secs(86_400))
                .expect("a recycle bin");
        }
        let follower = Follower::of(&t);
        let mut live = Files::new();
        let mut snapshots: Vec<(u64, String, Files)> = Vec::new();
        let mut trashed: Vec<(u64, String, Files)> = Vec::new();
        let mut checkpoints: Vec<(String, Files)> = Vec::new();
        let mut checkpoints_taken = 0i64;
        let mut taken = 0;
        let mut new_name = || {
            taken += 1;
            format!("s{taken}")
        };
        // The name snapshot `id` has in the recycle bin.
        let bin_name = |id: u64| {
            t.volume
                .trashed_snapshots()
                .into_iter()
                .find(|row| row.id == id)
                .expect("in the bin")
                .name
        };
        for op in &ops {
            match *op {
                LifecycleOp::Write { dir, file, seed } => {
                    let path = LIFECYCLE_DIRS[dir];
                    let content = pattern(BLOCK + 100, seed);
                    t.write(t.dir_at(path), &format!("f{file}"), &content);
                    let key = format!("{path}{}f{file}", if path.is_empty() { "" } else { "/" });
                    live.insert(key, content);
                }
                LifecycleOp::RemoveDir { dir } => {
                    let path = LIFECYCLE_DIRS[dir];
                    let (parent, name) = path.rsplit_once('/').unwrap_or(("", path));
                    t.remove_tree(t.dir_at(parent), name);
                    live.retain(|file, _| !file.starts_with(&format!("{path}/")));
                }
                LifecycleOp::Snapshot => {
                    let name = new_name();
                    snapshots.push((t.snapshot(&name), name, live.clone()));
                }
                LifecycleOp::Checkpoint => {
                    // One per millisecond of the name: a distinct time for each, as a
                    // clock gives (a follower knows a snapshot by its creation time).
                    checkpoints_taken += 1;
                    let at = 1_000_000_000 + 1_000_000 * checkpoints_taken;
                    if let Some(row) = t.volume.take_checkpoint(at).expect("checkpoint") {
                        checkpoints.push((row.name, live.clone()));
                    }
                }
                LifecycleOp::Promote { n } if !checkpoints.is_empty() => {
                    let (checkpoint, files) = checkpoints.remove(n % checkpoints.len());
                    let name = new_name();
                    let info = t
                        .volume
                        .promote_checkpoint(checkpoint.as_bytes(), name.as_bytes())
                        .expect("promote");
                    snapshots.push((info.id, name, files));
                }
                LifecycleOp::Upload => {
                    t.upload();
                    follower.follow(&t);
                    // Every snapshot there, by name; the live tree the newest's (with
                    // none, empty).
                    let generation = |id: u64| t.state(id).generation;
                    let mut names: Vec<String> =
                        snapshots.iter().map(|(_, name, _)| name.clone()).collect();
                    names.sort();
                    proptest::prop_assert_eq!(follower.snapshot_names(), names);
                    let newest = snapshots.iter().max_by_key(|(id, ..)| generation(*id));
                    let nothing = Files::new();
                    let (name, files) =
                        newest.map_or(("none", &nothing), |(_, n, f)| (n.as_str(), f));
                    proptest::prop_assert_eq!(&follower.files(), files, "showing {}", name);
                    let findings = follower.invariant_findings();
                    proptest::prop_assert!(findings.is_empty(), "follower: {findings:?}");
                }
                LifecycleOp::Delete { n } if !snapshots.is_empty() => {
                    let deleted = snapshots.remove(n % snapshots.len());
                    t.volume.delete_snapshot(deleted.1.as_bytes()).expect("delete");
                    if bin {
                        trashed.push(deleted);
                    }
                }
                LifecycleOp::DeleteDuringUpload { n } if !snapshots.is_empty() => {
                    let upload = t.spawn_upload();
                    let deleted = snapshots.remove(n % snapshots.len());
                    t.volume.delete_snapshot(deleted.1.as_bytes()).expect("delete");
                    t.runtime.block_on(upload).expect("join").expect("upload");
                    if bin {
                        trashed.push(deleted);
                    }
                }
                LifecycleOp::Rename { n } if !snapshots.is_empty() => {
                    let i = n % snapshots.len();
                    let name = new_name();
                    t.volume
                        .rename_snapshot(snapshots[i].1.as_bytes(), name.as_bytes())
                        .expect("rename");
                    snapshots[i].1 = name;
                }
                LifecycleOp::Undelete { n } if !trashed.is_empty() => {
                    let (id, _, files) = trashed.remove(n % trashed.len());
                    let name = new_name();
                    t.volume
                        .undelete_snapshot(&bin_name(id), Some(name.as_bytes()))
                        .expect("undelete");
                    snapshots.push((id, name, files));
                }
                LifecycleOp::Purge { n } if !trashed.is_empty() => {
                    let (id, _, _) = trashed.remove(n % trashed.len());
                    t.volume.purge_snapshot(&bin_name(id)).expect("purge");
                }
                _ => {}
            }
            let findings = t.invariant_findings();
            proptest::prop_assert!(findings.is_empty(), "after {op:?}: {findings:?}");
        }
        t.upload();
        let rows: Vec<SnapshotRow> = t
            .volume
            .list_snapshots()
            .into_iter()
            .chain(t.volume.trashed_snapshots())
            .collect();
        for (id, name, files) in snapshots.iter().chain(&trashed) {
            let row = rows.iter().find(|row| row.id == *id).expect("snapshot kept");
            proptest::prop_assert_eq!(row.state, SnapshotState::Completed, "{}", name);
            let expected: HashMap<String, Vec<(u64, BlockHash)>> = files
                .iter()
                .map(|(path, content)| (path.clone(), hashes(content)))
                .collect();
            proptest::prop_assert_eq!(t.manifest_files(*id), expected, "{}", name);
        }
        for (id, name, _) in &snapshots {
            proptest::prop_assert_eq!(&t.manifest(*id).0.name, name.as_bytes());
        }
    }
}

/// Deleting the newest completed snapshots one after another: a tree an earlier deletion
/// kept (a later snapshot saw it) goes with that later snapshot, so the tree the
/// remaining newest one sees becomes current alone.
#[test]
fn deleting_the_newest_snapshots_in_turn_leaves_one_tree_per_directory() {
    let t = Setup::new();
    let d = t.mkdir("d");
    t.write(d, "f", &pattern(BLOCK, 1));
    t.snapshot("a");
    t.write(d, "f", &pattern(BLOCK, 2));
    t.snapshot("b");
    t.write(d, "f", &pattern(BLOCK, 3));
    t.snapshot("c");
    t.snapshot("d");
    t.upload();
    for name in ["c", "d", "b"] {
        t.volume.delete_snapshot(name.as_bytes()).expect("delete");
        assert_eq!(t.invariant_findings(), vec![], "after deleting {name}");
    }
    // The next manifest reuses the trees of "a" for what did not change since.
    t.write(ROOT, "g", &pattern(BLOCK, 4));
    let e = t.snapshot("e");
    t.upload();
    assert_eq!(file_blocks(&t, e, "d", "f"), hashes(&pattern(BLOCK, 3)));
}

/// A checkpoint promoted after the snapshot right after it was deleted: the tree it
/// records gives way to the one the deleted snapshot left to a later one.
#[test]
fn a_checkpoint_promoted_after_a_deletion_records_trees_that_do_not_overlap() {
    let t = Setup::new();
    let d = t.mkdir("d");
    t.snapshot("s1");
    t.write(d, "f", &pattern(BLOCK, 1));
    let checkpoint = t.checkpoint();
    t.write(d, "f", &pattern(BLOCK, 2));
    t.snapshot("s2");
    let s3 = t.snapshot("s3");
    t.upload();
    t.volume.delete_snapshot(b"s2").expect("delete");
    let promoted = t
        .volume
        .promote_checkpoint(checkpoint.as_bytes(), b"p")
        .expect("promote");
    assert_eq!(t.upload(), vec![(promoted.id, Outcome::Completed)]);
    assert_eq!(t.invariant_findings(), vec![]);
    assert_eq!(
        file_blocks(&t, promoted.id, "d", "f"),
        hashes(&pattern(BLOCK, 1))
    );
    assert_eq!(file_blocks(&t, s3, "d", "f"), hashes(&pattern(BLOCK, 2)));
}

/// A read-only volume following the store of a `Setup`'s volume, as `--read-only` does.
struct Follower {
    _dir: tempfile::TempDir,
    volume: Volume,
}

impl Follower {
    fn of(t: &Setup) -> Follower {
        let dir = tempfile::tempdir().expect("tempdir");
        let volume = Volume::open(dir.path(), &options()).expect("open follower");
        let volume_id = t.volume.volume_id().expect("volume id");
        t.runtime
            .block_on(store::claim(&*t.store, &volume_id, BLOCK as u32, None))
            .expect("claim the store");
        let url = crate::store::StoreUrl::parse(t.store.url()).expect("url");
        crate::follow::claim(&volume, &url).expect("follow");
        // Blocks are read from the store on first read, as the daemon attaches it.
        volume.attach_origin(t.store.clone(), t.runtime.handle().clone());
        Follower { _dir: dir, volume }
    }

    /// Every file of the live tree, by path, with its content.
    fn files(&self) -> Files {
        fn walk(volume: &Volume, dir: NodeId, prefix: &str, files: &mut Files) {
            let handle = volume.opendir(dir).expect("opendir");
            let entries = volume.readdir(handle).expect("readdir");
            volume.releasedir(handle);
            // `.`, `..` and the control directories: the test's names have no dot.
            for entry in entries.iter().filter(|e| !e.name.starts_with(b".")) {
                let path = format!("{prefix}{}", String::from_utf8_lossy(&entry.name));
                if entry.attr.attrs.kind == crate::catalog::Kind::Dir {
                    walk(volume, entry.attr.node, &format!("{path}/"), files);
                } else {
                    let data = volume
                        .read(entry.attr.node, 0, entry.attr.attrs.size as u32)
                        .expect("read");
                    files.insert(path, data);
                }
            }
        }
        let mut files = Files::new();
        walk(&self.volume, ROOT, "", &mut files);
        files
    }

    /// One round of following; how many snapshots it imported.
    fn follow(&self, t: &Setup) -> usize {
        // A new chain per round, as after a restart; the reftest in proptests.rs keeps
        // one, as the daemon does.
        let mut chain = crate::store::StoreChain::new(t.runtime.handle(), t.store.clone());
        crate::follow::follow_once(&self.volume, &mut chain, &|_| {}).expect("follow")
    }

    fn snapshot_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .volume
            .list_snapshots()
            .into_iter()
            .map(|s| String::from_utf8_lossy(&s.name).into_owned())
            .collect();
        names.sort();
        names
    }

    /// Whether the live tree has `name` in directory `dir` of the root.
    fn has(&self, dir: &str, name: &str) -> bool {
        let dir = self.volume.lookup(ROOT, dir.as_bytes()).expect("dir").node;
        match self.volume.lookup(dir, name.as_bytes()) {
            Ok(_) => true,
            Err(crate::volume::Error::NotFound) => false,
            Err(e) => panic!("lookup of {name}: {e}"),
        }
    }

    fn invariant_findings(&self) -> Vec<crate::catalog::Finding> {
        invariant_findings(&self.volume)
    }
}

/// A follower that loses its newest snapshot shows the newest one left, and knows what
/// it shows: deleting a snapshot does not swap the trees it recorded for its live tree
/// for an older snapshot's (which would make it skip `d` as unchanged when it went back
/// to "a", where `d` was empty).
#[test]
fn a_follower_that_loses_its_newest_snapshot_shows_the_newest_left() {
    let t = Setup::new();
    let follower = Follower::of(&t);
    let d = t.mkdir("d");
    t.snapshot("a");
    t.upload();
    assert_eq!(follower.follow(&t), 1);
    t.write(d, "f", &pattern(BLOCK, 1));
    t.snapshot("b");
    t.upload();
    assert_eq!(follower.follow(&t), 1);
    assert!(follower.has("d", "f"));

    t.volume.delete_snapshot(b"b").expect("delete");
    t.upload();
    assert_eq!(follower.follow(&t), 0);
    assert_eq!(follower.snapshot_names(), ["a"]);
    assert!(!follower.has("d", "f"), "the live tree shows a");

    t.volume.unlink(d, b"f").expect("unlink");
    t.write(d, "g", &pattern(BLOCK, 2));
    t.snapshot("c");
    t.upload();
    assert_eq!(follower.follow(&t), 1);
    assert!(follower.has("d", "g") && !follower.has("d", "f"));
    assert_eq!(follower.invariant_findings(), vec![]);
}

/// A follower whose store loses its last snapshot empties its live tree (the writer's GC
/// may delete the blocks it showed), and shows the next snapshot taken there.
#[test]
fn a_follower_whose_store_has_no_snapshot_left_shows_an_empty_tree() {
    let t = Setup::new();
    let follower = Follower::of(&t);
    let d = t.mkdir("d");
    t.write(d, "f", &pattern(BLOCK, 1));
    t.snapshot("a");
    t.upload();
    assert_eq!(follower.follow(&t), 1);
    assert!(follower.has("d", "f"));

    t.volume.delete_snapshot(b"a").expect("delete");
    t.upload();
    assert_eq!(follower.follow(&t), 0);
    assert_eq!(follower.snapshot_names(), Vec::<String>::new());
    assert_eq!(follower.files(), Files::new());
    assert!(follower.volume.live_tree_is_empty().expect("read"));
    let root = follower.volume.getattr(ROOT).expect("root");
    assert_eq!(root.attrs.nlink, 2, "no subdirectory left");
    assert_eq!(follower.follow(&t), 0, "nothing left to do");

    t.snapshot("b");
    t.upload();
    assert_eq!(follower.follow(&t), 1);
    assert!(follower.has("d", "f"), "the live tree shows b");
    assert_eq!(follower.invariant_findings(), vec![]);
}

/// Snapshots that complete in the store behind newer ones are followed too: a checkpoint
/// promoted there, a snapshot taken out of the recycle bin there. The live tree keeps
/// showing the newest.
#[test]
fn a_follower_imports_snapshots_that_complete_behind_newer_ones() {
    let t = Setup::new();
    t.volume
        .remember_trash_retention(Duration::from_secs(86_400))
        .expect("a recycle bin");
    let follower = Follower::of(&t);
    let d = t.mkdir("d");
    t.write(d, "x", &pattern(BLOCK, 1));
    let checkpoint = t.checkpoint();
    t.write(d, "y", &pattern(BLOCK, 2));
    t.snapshot("s1");
    t.upload();
    assert_eq!(follower.follow(&t), 1);

    t.volume
        .promote_checkpoint(checkpoint.as_bytes(), b"p")
        .expect("promote");
    t.upload();
    assert_eq!(follower.follow(&t), 1);
    assert_eq!(follower.snapshot_names(), ["p", "s1"]);
    assert!(follower.has("d", "y"), "the live tree shows s1, the newest");

    t.volume
        .delete_snapshot(b"s1")
        .expect("delete into the bin");
    t.upload();
    assert_eq!(follower.follow(&t), 0);
    assert_eq!(follower.snapshot_names(), ["p"]);
    assert!(!follower.has("d", "y"), "the live tree shows p");

    let binned = t.volume.trashed_snapshots()[0].name.clone();
    t.volume
        .undelete_snapshot(&binned, Some(b"s1"))
        .expect("undelete");
    t.upload();
    assert_eq!(follower.follow(&t), 1);
    assert_eq!(follower.snapshot_names(), ["p", "s1"]);
    assert!(follower.has("d", "y"), "the live tree shows s1 again");
    assert_eq!(follower.follow(&t), 0, "nothing left to import");
    assert_eq!(follower.invariant_findings(), vec![]);
}

/// A snapshot unlocked and deleted in the store between two rounds is deleted here too:
/// the lock here only mirrored the store's, and the store's deletion is what counts.
#[test]
fn a_follower_deletes_a_snapshot_its_lock_no_longer_keeps() {
    let t = Setup::new();
    let follower = Follower::of(&t);
    t.write(ROOT, "f", &pattern(BLOCK, 1));
    t.snapshot("a");
    t.snapshot("b");
    let held = crate::catalog::SnapshotLock {
        mode: crate::catalog::LockMode::Governance,
        until: i64::MAX,
        cool_off_until: 0,
    };
    t.volume.lock_snapshot(b"a", Some(&held)).expect("lock");
    t.upload();
    assert_eq!(follower.follow(&t), 2);

    t.volume.lock_snapshot(b"a", None).expect("unlock");
    t.volume.delete_snapshot(b"a").expect("delete");
    t.upload();
    assert_eq!(follower.follow(&t), 0);
    assert_eq!(follower.snapshot_names(), ["b"]);
}

/// A block in a pack newer than a reader's index is found by reading the index again,
/// also when the reader read it less than a second before (a follower reading a snapshot
/// just followed, a reader whose pack the writer repacked and deleted): the reader waits
/// for its turn to read the index again rather than failing.
#[test]
fn a_block_in_a_pack_newer_than_the_index_read_a_moment_ago_is_found() {
    let t = Setup::new();
    t.write(ROOT, "f", &pattern(BLOCK, 1));
    t.snapshot("s1");
    t.upload();
    let reader = crate::store::IndexedStore::new(t.store.clone());
    t.runtime.block_on(reader.index()).expect("index");
    let newer = pattern(BLOCK, 2);
    t.write(ROOT, "g", &newer);
    t.snapshot("s2");
    t.upload();
    let hash = BlockHash::of(&newer);
    let found = t
        .runtime
        .block_on(reader.block(&hash, BLOCK))
        .expect("read");
    assert_eq!(found.as_deref().map(BlockHash::of), Some(hash));
}

/// A reader that looks for many blocks which may all be gone (`verify --repair`) does not
/// wait for the index's turn on each miss: it misses at once, and after `store_changed`
/// finds a block in a pack newer than its index.
#[test]
fn a_reader_that_will_not_wait_misses_at_once_and_finds_after_store_changed() {
    let t = Setup::new();
    t.write(ROOT, "f", &pattern(BLOCK, 1));
    t.snapshot("s1");
    t.upload();
    let reader = crate::store::IndexedStore::new(t.store.clone());
    t.runtime.block_on(reader.index()).expect("index");
    let gone = BlockHash::of(&pattern(BLOCK, 3));
    let started = std::time::Instant::now();
    for _ in 0..3 {
        let found = t
            .runtime
            .block_on(reader.block_without_waiting(&gone, BLOCK));
        assert_eq!(found.expect("read"), None);
    }
    // `block` waits up to a second for the index's turn on each of these.
    let took = started.elapsed();
    assert!(took < std::time::Duration::from_millis(900), "{took:?}");

    let newer = pattern(BLOCK, 2);
    t.write(ROOT, "g", &newer);
    t.snapshot("s2");
    t.upload();
    reader.store_changed();
    let hash = BlockHash::of(&newer);
    let found = t
        .runtime
        .block_on(reader.block_without_waiting(&hash, BLOCK))
        .expect("read");
    assert_eq!(found.as_deref().map(BlockHash::of), Some(hash));
}
