//! Every decoder of what a store hands back (tree, snapshot, volume header, zstd frame,
//! sealed object, pack listing and trailer, index) meets hostile bytes: random, and valid objects mutated (bytes flipped,
//! cut, inserted, spliced). None may panic, none may allocate beyond its stated bounds,
//! and what one accepts must encode back to the same value. The bound is checked by this
//! binary's allocator, which records the largest single allocation of the thread that
//! armed it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;

use proptest::prelude::*;
use snapfs::blocks::BlockHash;
use snapfs::catalog::{Attrs, Kind, LockMode, SnapshotLock, Trash};
use snapfs::manifest::{self, Content, Entry, PackId, PackListing, PackedBlock, SnapshotManifest};
use snapfs::store::{
    Key, ObjectStore, PackBuilder, Sealed, StoreError, StoreFuture, VolumeHeader, read_listing,
};

struct Recording;

thread_local! {
    /// Armed: the largest single allocation seen; `None`: not recording.
    static LARGEST: Cell<Option<usize>> = const { Cell::new(None) };
}

fn note(size: usize) {
    // `try_with`: allocations during the thread's teardown find no slot.
    let _ = LARGEST.try_with(|largest| {
        if let Some(seen) = largest.get() {
            largest.set(Some(seen.max(size)));
        }
    });
}

unsafe impl GlobalAlloc for Recording {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Recording = Recording;

/// `decode`'s result and the largest single allocation it made.
fn recorded<T>(decode: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|largest| largest.set(Some(0)));
    let result = decode();
    let largest = LARGEST.with(|largest| largest.replace(None)).unwrap_or(0);
    (result, largest)
}

/// What a decoder of `input` may allocate at most in one piece: a bounded multiple of
/// what it was given (a count promising more than the bytes left is refused before it
/// allocates), and a fixed floor for the first buffers.
fn decode_bound(input: &[u8]) -> usize {
    (1 << 20) + 64 * input.len()
}

fn hash() -> impl Strategy<Value = BlockHash> {
    any::<[u8; 8]>().prop_map(|seed| BlockHash::of(&seed))
}

fn entry_name() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 1..12).prop_filter("a valid name", |name| {
        name != b"." && name != b".." && !name.contains(&b'/') && !name.contains(&0)
    })
}

fn attrs(kind: Kind) -> impl Strategy<Value = Attrs> {
    (
        0u32..0o7777,
        any::<u32>(),
        any::<u32>(),
        1u32..5,
        0u64..(1 << 40),
        any::<u32>(),
        any::<[i64; 4]>(),
    )
        .prop_map(move |(perm, uid, gid, nlink, size, rdev, times)| Attrs {
            kind,
            perm,
            uid,
            gid,
            nlink,
            size,
            rdev,
            atime: times[0],
            mtime: times[1],
            ctime: times[2],
            crtime: times[3],
        })
}

fn entry() -> impl Strategy<Value = Entry> {
    let kind = prop_oneof![
        Just(Kind::File),
        Just(Kind::Dir),
        Just(Kind::Symlink),
        Just(Kind::Fifo)
    ];
    (kind, entry_name(), 1u64..1000, any::<u64>()).prop_flat_map(|(kind, name, ino, seed)| {
        let content = match kind {
            Kind::File => proptest::collection::btree_map(0u64..64, hash(), 0..6)
                .prop_map(|blocks| Content::Blocks(blocks.into_iter().collect()))
                .boxed(),
            Kind::Dir => hash().prop_map(Content::Tree).boxed(),
            _ => Just(Content::None).boxed(),
        };
        let xattrs = proptest::collection::btree_map(
            entry_name().prop_map(|n| [b"user.".as_slice(), &n].concat()),
            proptest::collection::vec(any::<u8>(), 0..8),
            0..3,
        );
        (attrs(kind), content, xattrs).prop_map(move |(attrs, content, xattrs)| Entry {
            name: name.clone(),
            ino,
            attrs,
            target: (kind == Kind::Symlink).then(|| format!("t{seed}").into_bytes()),
            xattrs: xattrs.into_iter().collect(),
            content,
        })
    })
}

/// A valid tree: entries sorted by name, no duplicates.
fn tree() -> impl Strategy<Value = Vec<Entry>> {
    proptest::collection::vec(entry(), 0..8).prop_map(|entries| {
        let mut by_name = std::collections::BTreeMap::new();
        for entry in entries {
            by_name.insert(entry.name.clone(), entry);
        }
        by_name.into_values().collect()
    })
}

fn snapshot() -> impl Strategy<Value = SnapshotManifest> {
    let lock = proptest::option::of((any::<bool>(), any::<[i64; 2]>()).prop_map(
        |(compliance, times)| SnapshotLock {
            mode: if compliance {
                LockMode::Compliance
            } else {
                LockMode::Governance
            },
            until: times[0],
            cool_off_until: times[1],
        },
    ));
    let trash = proptest::option::of(any::<[i64; 2]>().prop_map(|times| Trash {
        deleted: times[0],
        expires: times[1],
    }));
    (
        attrs(Kind::Dir),
        hash(),
        entry_name(),
        any::<(u64, u64, i64, u64)>(),
        proptest::collection::vec((entry_name(), entry_name()), 0..3),
        lock,
        trash,
    )
        .prop_map(
            |(
                attrs,
                root_tree,
                name,
                (id, generation, created, logical_bytes),
                tags,
                lock,
                trash,
            )| {
                SnapshotManifest {
                    volume_id: "0123456789abcdef0123456789abcdef".into(),
                    id,
                    name,
                    generation,
                    created,
                    block_size: 256 << 10,
                    logical_bytes,
                    tags,
                    root: Entry {
                        name: Vec::new(),
                        ino: 1,
                        attrs,
                        target: None,
                        xattrs: Vec::new(),
                        content: Content::Tree(root_tree),
                    },
                    lock,
                    trash,
                }
            },
        )
}

/// One change to an object: what a damaged disk, a proxy or an attacker may do.
#[derive(Clone, Debug)]
enum Mutation {
    Flip {
        at: usize,
        bits: u8,
    },
    Cut {
        at: usize,
    },
    Insert {
        at: usize,
        bytes: Vec<u8>,
    },
    Delete {
        at: usize,
        len: usize,
    },
    /// A copy of one part written over another (a length or count moved elsewhere).
    Splice {
        from: usize,
        to: usize,
        len: usize,
    },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1u8..=255).prop_map(|(at, bits)| Mutation::Flip { at, bits }),
        any::<usize>().prop_map(|at| Mutation::Cut { at }),
        (
            any::<usize>(),
            proptest::collection::vec(any::<u8>(), 1..10)
        )
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        (any::<usize>(), 1usize..16).prop_map(|(at, len)| Mutation::Delete { at, len }),
        (any::<usize>(), any::<usize>(), 1usize..16).prop_map(|(from, to, len)| Mutation::Splice {
            from,
            to,
            len
        }),
    ]
}

fn mutate(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for mutation in mutations {
        let len = bytes.len().max(1);
        match mutation {
            Mutation::Flip { at, bits } => {
                if let Some(byte) = bytes.get_mut(at % len) {
                    *byte ^= bits;
                }
            }
            Mutation::Cut { at } => bytes.truncate(at % len),
            Mutation::Insert { at, bytes: new } => {
                let at = at % (bytes.len() + 1);
                bytes.splice(at..at, new.iter().copied());
            }
            Mutation::Delete { at, len: n } => {
                let at = at % len;
                let end = (at + n).min(bytes.len());
                if at < end {
                    bytes.drain(at..end);
                }
            }
            Mutation::Splice { from, to, len: n } => {
                let (from, to) = (from % len, to % len);
                let n = (*n).min(bytes.len().saturating_sub(from.max(to)));
                let part = bytes[from..from + n].to_vec();
                bytes[to..to + n].copy_from_slice(&part);
            }
        }
    }
    bytes
}

/// Random bytes, half of them behind `magic` so that they reach past the first check.
fn garbage(magic: &'static [u8]) -> impl Strategy<Value = Vec<u8>> {
    (
        any::<bool>(),
        proptest::collection::vec(any::<u8>(), 0..2048),
    )
        .prop_map(move |(behind_magic, bytes)| {
            if behind_magic {
                [magic, &bytes].concat()
            } else {
                bytes
            }
        })
}

/// Decodes `input` with `decode`: no panic, bounded allocation, and what it accepts
/// encodes (with `encode`) to an object that decodes to the same value again.
fn check<T: PartialEq + std::fmt::Debug, E>(
    input: &[u8],
    decode: impl Fn(&[u8]) -> Result<T, E>,
    encode: impl Fn(&T) -> Vec<u8>,
) -> Result<(), TestCaseError> {
    let (decoded, largest) = recorded(|| decode(input));
    prop_assert!(
        largest <= decode_bound(input),
        "{largest} bytes allocated at once for {} bytes",
        input.len()
    );
    if let Ok(value) = decoded {
        let again = decode(&encode(&value));
        prop_assert_eq!(again.ok(), Some(value));
    }
    Ok(())
}

fn check_tree(input: &[u8]) -> Result<(), TestCaseError> {
    check(input, manifest::decode_tree, |entries| {
        manifest::encode_tree(entries)
    })
}

fn check_snapshot(input: &[u8]) -> Result<(), TestCaseError> {
    check(input, manifest::decode_snapshot, manifest::encode_snapshot)
}

fn check_header(input: &[u8]) -> Result<(), TestCaseError> {
    check(input, VolumeHeader::parse, VolumeHeader::encode)
}

fn check_listing(input: &[u8]) -> Result<(), TestCaseError> {
    check(
        input,
        manifest::decode_pack_listing,
        manifest::encode_pack_listing,
    )
}

fn check_index(input: &[u8]) -> Result<(), TestCaseError> {
    check(input, manifest::decode_index, |packs| {
        manifest::encode_index(packs)
    })
}

/// A pack's listing: frames in order, with gaps, inside its data.
fn listing() -> impl Strategy<Value = PackListing> {
    proptest::collection::vec((hash(), 0u64..100, 1u32..5000, 0u32..300_000), 0..20).prop_map(
        |frames| {
            let mut end = 0;
            let blocks = frames
                .into_iter()
                .map(|(hash, gap, length, raw_length)| {
                    let offset = end + gap;
                    end = offset + u64::from(length);
                    PackedBlock {
                        hash,
                        offset,
                        length,
                        raw_length,
                    }
                })
                .collect();
            PackListing {
                data_length: end,
                blocks,
            }
        },
    )
}

fn index() -> impl Strategy<Value = Vec<(PackId, PackListing)>> {
    proptest::collection::btree_map(any::<[u8; 16]>(), listing(), 0..5)
        .prop_map(|packs| packs.into_iter().map(|(id, l)| (PackId(id), l)).collect())
}

const BLOCK: usize = 256 << 10;

/// The bound checks above can fail: the recorder sees one large allocation among small
/// ones, and only on the thread that armed it.
#[test]
fn the_recorder_sees_the_largest_allocation() {
    let (_, largest) = recorded(|| {
        let small: Vec<Vec<u8>> = (0..100).map(|n| vec![0u8; n]).collect();
        let large = vec![1u8; 10 << 20];
        (small.len(), large.len())
    });
    assert!(largest >= 10 << 20, "{largest}");
    let (_, elsewhere) = recorded(|| {
        std::thread::spawn(|| vec![1u8; 10 << 20].len())
            .join()
            .expect("thread")
    });
    assert!(
        elsewhere < 1 << 20,
        "another thread's allocation counted: {elsewhere}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn random_bytes_never_panic_a_decoder(
        tree_bytes in garbage(b"snapfsT1"),
        snapshot_bytes in garbage(b"snapfsS1"),
        extended_bytes in garbage(b"snapfsS2"),
        header_bytes in garbage(b"snapfs volume\nformat 1\n"),
        listing_bytes in garbage(b"snapfsL1"),
        index_bytes in garbage(b"snapfsX1"),
        pack_bytes in garbage(b"snapfsP1"),
    ) {
        check_listing(&listing_bytes)?;
        check_index(&index_bytes)?;
        check_pack(&pack_bytes, &pack_bytes)?;
        check_tree(&tree_bytes)?;
        check_snapshot(&snapshot_bytes)?;
        check_snapshot(&extended_bytes)?;
        check_header(&header_bytes)?;
    }

    #[test]
    fn mutated_trees_are_refused_or_read_consistently(
        entries in tree(),
        mutations in proptest::collection::vec(mutation(), 1..4),
    ) {
        let encoded = manifest::encode_tree(&entries);
        prop_assert_eq!(manifest::decode_tree(&encoded).ok(), Some(entries));
        check_tree(&mutate(encoded, &mutations))?;
    }

    #[test]
    fn mutated_snapshots_are_refused_or_read_consistently(
        snapshot in snapshot(),
        mutations in proptest::collection::vec(mutation(), 1..4),
    ) {
        let encoded = manifest::encode_snapshot(&snapshot);
        prop_assert_eq!(manifest::decode_snapshot(&encoded).ok(), Some(snapshot));
        check_snapshot(&mutate(encoded, &mutations))?;
    }

    #[test]
    fn mutated_listings_and_indexes_are_refused_or_read_consistently(
        listing in listing(),
        packs in index(),
        mutations in proptest::collection::vec(mutation(), 1..4),
    ) {
        let encoded = manifest::encode_pack_listing(&listing);
        prop_assert_eq!(manifest::decode_pack_listing(&encoded).ok(), Some(listing));
        check_listing(&mutate(encoded, &mutations))?;
        let encoded = manifest::encode_index(&packs);
        prop_assert_eq!(manifest::decode_index(&encoded).ok(), Some(packs));
        check_index(&mutate(encoded, &mutations))?;
    }

    /// A pack's trailer, mutated: refused, or a listing whose every frame is inside the
    /// pack's data; never a panic, never a read past its bound.
    #[test]
    fn mutated_packs_are_refused_or_listed_within_their_data(
        blocks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..600), 1..6),
        mutations in proptest::collection::vec(mutation(), 1..4),
    ) {
        let plain = Memory::default();
        let mut builder = PackBuilder::new();
        for block in &blocks {
            let frame = manifest::compress(block, 3).expect("compress");
            builder
                .add(&plain, BlockHash::of(block), block.len() as u32, frame)
                .expect("add");
        }
        let pack = builder.finish(&plain, 3).expect("finish");
        let listed = read_listing(&plain, &pack.key, &pack.body).expect("its own listing");
        prop_assert_eq!(&listed, &pack.listing);
        check_pack(&pack.body, &mutate(pack.body.clone(), &mutations))?;
    }

    #[test]
    fn mutated_headers_are_refused_or_read_consistently(
        id in "[0-9a-f]{32}",
        block_shift in 12u32..24,
        encrypted in any::<bool>(),
        mutations in proptest::collection::vec(mutation(), 1..4),
    ) {
        let header = VolumeHeader {
            id,
            block_size: 1 << block_shift,
            origin: None,
            encryption: encrypted.then(|| "xchacha20poly1305 00ff00ff00ff00ff".into()),
        };
        check_header(&mutate(header.encode(), &mutations))?;
    }

    /// A damaged frame is refused by its checksum or its bound; a hostile one declaring
    /// any size never makes the reader allocate past the bound it was given.
    #[test]
    fn zstd_frames_decompress_within_their_bound(
        data in proptest::collection::vec(0u8..4, 0..BLOCK),
        mutations in proptest::collection::vec(mutation(), 0..3),
        bound in 1usize..(2 * BLOCK),
    ) {
        let frame = manifest::compress(&data, 3).expect("compress");
        let damaged = !mutations.is_empty();
        let input = mutate(frame, &mutations);
        let (result, largest) = recorded(|| manifest::decompress(&input, bound));
        prop_assert!(largest <= bound + (1 << 20), "{largest} bytes at once, bound {bound}");
        match result {
            Ok(out) => {
                prop_assert!(out.len() <= bound);
                if !damaged {
                    prop_assert_eq!(out, data);
                }
            }
            Err(_) => prop_assert!(damaged || data.len() > bound),
        }
    }

    /// A sealed object that was changed in any way fails authentication: never other
    /// bytes, never a panic.
    #[test]
    fn mutated_sealed_objects_fail_authentication(
        body in proptest::collection::vec(any::<u8>(), 0..4096),
        mutations in proptest::collection::vec(mutation(), 1..4),
        random in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let memory = Arc::new(Memory::default());
        let sealed = Sealed::new(memory.clone(), &Key::generate());
        let key = format!("blocks/{}", BlockHash::of(&body));
        runtime.block_on(sealed.put(&key, body.clone().into())).expect("put");
        let stored = memory.only();
        for hostile in [mutate(stored.clone(), &mutations), random] {
            if hostile == stored {
                continue;
            }
            memory.replace(hostile);
            let got = runtime.block_on(sealed.get(&key));
            prop_assert!(got.is_err(), "a changed object was accepted: {:?}", got.map(|b| b.map(|b| b.len())));
        }
    }
}

/// Reads the listing of `input` (a pack, or what became of `original`): no panic, a
/// bounded allocation, and if accepted every frame inside the pack's data.
fn check_pack(original: &[u8], input: &[u8]) -> Result<(), TestCaseError> {
    let plain = Memory::default();
    let bound = decode_bound(input).max(decode_bound(original));
    let (result, largest) = recorded(|| read_listing(&plain, "packs/x", input));
    prop_assert!(
        largest <= bound,
        "{largest} bytes at once for {}",
        input.len()
    );
    if let Ok(listing) = result {
        prop_assert!(listing.data_length <= input.len() as u64);
        for block in &listing.blocks {
            prop_assert!(block.offset + u64::from(block.length) <= listing.data_length);
        }
    }
    Ok(())
}

/// One object in memory: what the sealed store wrote, or what a test put in its place.
#[derive(Default)]
struct Memory {
    object: std::sync::Mutex<Option<(String, Vec<u8>)>>,
}

impl Memory {
    fn only(&self) -> Vec<u8> {
        let object = self.object.lock().expect("lock");
        object
            .as_ref()
            .map(|(_, body)| body.clone())
            .expect("one object")
    }

    fn replace(&self, body: Vec<u8>) {
        if let Some((_, old)) = self.object.lock().expect("lock").as_mut() {
            *old = body;
        }
    }
}

impl ObjectStore for Memory {
    fn put<'a>(&'a self, key: &'a str, body: bytes::Bytes) -> StoreFuture<'a, ()> {
        *self.object.lock().expect("lock") = Some((key.to_owned(), body.to_vec()));
        Box::pin(async { Ok(()) })
    }

    fn get<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Vec<u8>>> {
        let object = self.object.lock().expect("lock").clone();
        Box::pin(
            async move { Ok(object.and_then(|(stored, body)| (stored == key).then_some(body))) },
        )
    }

    fn delete<'a>(&'a self, _: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(async { Err(StoreError::permanent("not here")) })
    }

    fn list<'a>(&'a self, _: &'a str) -> StoreFuture<'a, Vec<String>> {
        Box::pin(async { Ok(Vec::new()) })
    }

    fn url(&self) -> &str {
        "mem://decoders"
    }
}
