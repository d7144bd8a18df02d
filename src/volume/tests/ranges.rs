//! Core tests of fallocate, SEEK_DATA/SEEK_HOLE and copy_file_range (`volume/ranges.rs`),
//! with 4 KiB blocks: exact bytes, sizes, errors, shared blocks, and snapshots unaffected;
//! then random sequences of them against a model.

use super::*;

const BS: u64 = 4096;
const PUNCH: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
const KEEP: i32 = libc::FALLOC_FL_KEEP_SIZE;
const ZERO: i32 = libc::FALLOC_FL_ZERO_RANGE;

fn errno<T: std::fmt::Debug>(result: Result<T>) -> i32 {
    result.expect_err("expected an error").errno()
}

fn copy(
    t: &TestVolume,
    src: NodeId,
    src_offset: u64,
    dst: NodeId,
    dst_offset: u64,
    len: u64,
) -> Result<u32> {
    t.v().copy_range(CopyRange {
        src,
        src_offset,
        dst,
        dst_offset,
        len,
    })
}

fn blocks_of(t: &TestVolume, node: NodeId) -> u64 {
    t.v().getattr(node).expect("getattr").blocks
}

#[test]
fn punch_hole_zeros_the_range_frees_whole_blocks_and_spares_snapshots() {
    let t = TestVolume::new();
    let data = pattern(5 * BS as usize + 100, 1);
    let node = t.write_file("f", &data);
    t.v().create_snapshot(b"before").expect("snapshot");
    let before = blocks_of(&t, node);
    t.v()
        .fallocate(node, 1000, 3 * BS + 100 - 1000, PUNCH)
        .expect("punch");
    let mut expected = data.clone();
    expected[1000..3 * BS as usize + 100].fill(0);
    assert_eq!(t.read_all(node), expected);
    // Blocks 1 and 2 went; 0 and 3 were zeroed in part and stay.
    assert_eq!(blocks_of(&t, node), before - 2 * BS / 512);
    let old = t
        .v()
        .lookup(snapshot_root(&t, "before"), b"f")
        .expect("lookup")
        .node;
    assert_eq!(t.read_all(old), data);

    // A punch reaching the end drops the last, partial block too; past the end, nothing.
    t.v()
        .fallocate(node, 5 * BS, 1 << 20, PUNCH)
        .expect("punch to the end");
    assert_eq!(
        t.v().getattr(node).expect("getattr").attrs.size,
        data.len() as u64
    );
    expected[5 * BS as usize..].fill(0);
    assert_eq!(t.read_all(node), expected);
    // Blocks 0, 3 and 4 are left.
    assert_eq!(blocks_of(&t, node), 3 * BS / 512);
}

#[test]
fn punch_drops_unflushed_writes_and_allocate_keeps_them() {
    let t = TestVolume::new();
    let (node, handle) = t.create("f");
    let data = pattern(3 * BS as usize, 2);
    t.v().write(node, 0, &data).expect("write");
    t.v().fallocate(node, BS / 2, BS, PUNCH).expect("punch");
    let mut expected = data.clone();
    expected[BS as usize / 2..BS as usize * 3 / 2].fill(0);
    assert_eq!(t.read_all(node), expected);

    t.v().write(node, 3 * BS, b"tail").expect("write tail");
    t.v().fallocate(node, 0, 6 * BS, 0).expect("allocate");
    expected.extend_from_slice(b"tail");
    expected.resize(6 * BS as usize, 0);
    assert_eq!(t.read_all(node), expected);
    // KEEP_SIZE allocates without growing.
    t.v().fallocate(node, 0, 9 * BS, KEEP).expect("keep size");
    assert_eq!(t.v().getattr(node).expect("getattr").attrs.size, 6 * BS);
    t.v().release(handle).expect("release");
    assert_eq!(t.read_all(node), expected);
}

#[test]
fn zero_range_with_and_without_keep_size() {
    let t = TestVolume::new();
    let data = pattern(2 * BS as usize + 10, 3);
    let node = t.write_file("f", &data);
    t.v()
        .fallocate(node, 10, 2 * BS + 100, ZERO | KEEP)
        .expect("zero, keep");
    let mut expected = data.clone();
    expected[10..].fill(0);
    assert_eq!(t.read_all(node), expected);
    t.v().fallocate(node, BS, 4 * BS, ZERO).expect("zero, grow");
    expected.resize(5 * BS as usize, 0);
    assert_eq!(t.read_all(node), expected);
}

#[test]
fn fallocate_errors() {
    let t = TestVolume::new();
    let node = t.write_file("f", b"x");
    assert_eq!(errno(t.v().fallocate(node, 0, 0, 0)), libc::EINVAL);
    assert_eq!(
        errno(t.v().fallocate(node, 0, 1, libc::FALLOC_FL_PUNCH_HOLE)),
        libc::EOPNOTSUPP
    );
    for mode in [libc::FALLOC_FL_COLLAPSE_RANGE, libc::FALLOC_FL_INSERT_RANGE] {
        assert_eq!(errno(t.v().fallocate(node, 0, BS, mode)), libc::EOPNOTSUPP);
    }
    assert_eq!(
        errno(t.v().fallocate(node, i64::MAX as u64 - 10, 100, 0)),
        libc::EFBIG
    );
    // More than the data dir's disk holds (files of 1 EiB are fine otherwise).
    assert_eq!(errno(t.v().fallocate(node, 0, 1 << 60, 0)), libc::ENOSPC);
    // Punching needs no room.
    t.v().fallocate(node, 0, 1 << 60, PUNCH).expect("punch");
    t.v().create_snapshot(b"s").expect("snapshot");
    let old = t
        .v()
        .lookup(snapshot_root(&t, "s"), b"f")
        .expect("lookup")
        .node;
    assert_eq!(errno(t.v().fallocate(old, 0, 1, PUNCH)), libc::EROFS);
}

#[test]
fn seek_data_and_hole_follow_the_block_map_and_the_buffers() {
    let t = TestVolume::new();
    let (node, handle) = t.create("f");
    // Data in blocks 0, 3 and 4 (partial); 1 and 2 are a hole.
    t.v()
        .write(node, 0, &pattern(BS as usize, 4))
        .expect("write 0");
    t.v()
        .write(node, 3 * BS, &pattern(BS as usize + 50, 5))
        .expect("write 3");
    let seek = |offset: i64, whence| t.v().lseek(node, offset, whence);
    let check = |when: &str| {
        assert_eq!(seek(0, libc::SEEK_DATA).expect("data"), 0, "{when}");
        assert_eq!(seek(0, libc::SEEK_HOLE).expect("hole"), BS as i64, "{when}");
        assert_eq!(
            seek(BS as i64 + 1, libc::SEEK_DATA).expect("data"),
            3 * BS as i64
        );
        assert_eq!(
            seek(3 * BS as i64, libc::SEEK_HOLE).expect("hole"),
            4 * BS as i64 + 50
        );
        assert_eq!(
            seek(4 * BS as i64 + 7, libc::SEEK_DATA).expect("data"),
            4 * BS as i64 + 7
        );
        assert_eq!(
            errno(seek(4 * BS as i64 + 50, libc::SEEK_DATA)),
            libc::ENXIO
        );
        assert_eq!(
            errno(seek(4 * BS as i64 + 50, libc::SEEK_HOLE)),
            libc::ENXIO
        );
        assert_eq!(errno(seek(-1, libc::SEEK_HOLE)), libc::ENXIO);
    };
    check("buffered");
    t.v().flush(node).expect("flush");
    check("flushed");
    t.v().create_snapshot(b"s").expect("snapshot");
    // A punch, unflushed: the punched blocks are a hole at once.
    let punched = t.v().fallocate(node, 3 * BS, BS, PUNCH);
    punched.expect("punch");
    assert_eq!(
        seek(BS as i64, libc::SEEK_DATA).expect("data"),
        4 * BS as i64
    );
    // A file ending in a hole: SEEK_DATA past the last data is ENXIO.
    t.v().fallocate(node, 0, 8 * BS, 0).expect("grow");
    assert_eq!(errno(seek(5 * BS as i64, libc::SEEK_DATA)), libc::ENXIO);
    assert_eq!(
        seek(5 * BS as i64, libc::SEEK_HOLE).expect("hole"),
        5 * BS as i64
    );
    t.v().release(handle).expect("release");

    // The snapshot still sees its own map.
    let old = t
        .v()
        .lookup(snapshot_root(&t, "s"), b"f")
        .expect("lookup")
        .node;
    assert_eq!(
        t.v().lseek(old, BS as i64, libc::SEEK_DATA).expect("data"),
        3 * BS as i64
    );
    assert_eq!(
        t.v().lseek(old, 0, libc::SEEK_HOLE).expect("hole"),
        BS as i64
    );
}

#[test]
fn aligned_copy_shares_blocks_and_copies_the_edges() {
    let t = TestVolume::new();
    let data = pattern(8 * BS as usize + 123, 6);
    let src = t.write_file("src", &data);
    let (dst, handle) = t.create("dst");
    let stored = t.stored_blocks();
    // From 100 to the end, to 100 + 2 blocks: same alignment.
    let copied = copy(&t, src, 100, dst, 100 + 2 * BS, data.len() as u64).expect("copy");
    assert_eq!(copied as usize, data.len() - 100);
    t.v().release(handle).expect("release");
    let mut expected = vec![0; 100 + 2 * BS as usize];
    expected.extend_from_slice(&data[100..]);
    assert_eq!(t.read_all(dst), expected);
    // Only the head block is new; the 7 whole blocks and the last one are shared.
    assert_eq!(t.stored_blocks(), stored + 1);
    assert_eq!(blocks_of(&t, dst), (BS * 8 + 123).div_ceil(512));

    // Writing either file leaves the other as it was; so does a snapshot's view.
    t.v().create_snapshot(b"s").expect("snapshot");
    t.v().write(dst, 5 * BS, b"changed").expect("write dst");
    t.v().flush(dst).expect("flush");
    assert_eq!(t.read_all(src), data);
    t.v().write(src, 4 * BS, b"also").expect("write src");
    t.v().flush(src).expect("flush");
    expected[5 * BS as usize..5 * BS as usize + 7].copy_from_slice(b"changed");
    assert_eq!(t.read_all(dst), expected);
    let old = t
        .v()
        .lookup(snapshot_root(&t, "s"), b"dst")
        .expect("lookup")
        .node;
    assert_eq!(
        &t.read_all(old)[..],
        &[vec![0; 100 + 2 * BS as usize], data[100..].to_vec()].concat()[..]
    );
}

#[test]
fn sharing_reads_no_block() {
    let mut t = TestVolume::new();
    let src = t.write_file("src", &pattern(4 * BS as usize, 14));
    t.reopen();
    // With the block files gone, only a copy that never reads them can succeed.
    for shard in fs::read_dir(t.dir.path().join("blocks")).expect("blocks dir") {
        let shard = shard.expect("entry").path();
        if shard.file_name().is_some_and(|n| n != "tmp") {
            fs::remove_dir_all(shard).expect("remove blocks");
        }
    }
    let dst = t.write_file("dst", b"");
    assert_eq!(
        copy(&t, src, 0, dst, 0, 4 * BS).expect("copy"),
        4 * BS as u32
    );
    assert_eq!(blocks_of(&t, dst), 4 * BS / 512);
    assert_eq!(errno(t.v().read(dst, 0, 1)), libc::EIO);
}

#[test]
fn copy_keeps_the_destination_past_a_partial_last_block() {
    let t = TestVolume::new();
    let src = t.write_file("src", &pattern(2 * BS as usize + 10, 7));
    let old = pattern(4 * BS as usize, 8);
    let dst = t.write_file("dst", &old);
    copy(&t, src, 0, dst, 0, 1 << 20).expect("copy");
    let mut expected = pattern(2 * BS as usize + 10, 7);
    expected.extend_from_slice(&old[2 * BS as usize + 10..]);
    assert_eq!(t.read_all(dst), expected);
}

#[test]
fn copy_sees_unflushed_writes_and_handles_holes_and_misalignment() {
    let t = TestVolume::new();
    let (src, handle) = t.create("src");
    t.v()
        .write(src, 0, &pattern(BS as usize, 9))
        .expect("write");
    t.v()
        .write(src, 3 * BS, &pattern(BS as usize, 10))
        .expect("write");
    let dst = t.write_file("dst", &pattern(5 * BS as usize, 11));
    copy(&t, src, 0, dst, 0, 4 * BS).expect("copy");
    let mut expected = pattern(BS as usize, 9);
    expected.resize(3 * BS as usize, 0);
    expected.extend_from_slice(&pattern(BS as usize, 10));
    expected.extend_from_slice(&pattern(5 * BS as usize, 11)[4 * BS as usize..]);
    assert_eq!(t.read_all(dst), expected);
    // The source's hole is a hole in the copy: one block less than before.
    assert_eq!(
        t.v().lseek(dst, BS as i64, libc::SEEK_DATA).expect("data"),
        3 * BS as i64
    );

    // Offsets aligned differently: bytes copied through the data path.
    let other = t.write_file("other", b"");
    let n = copy(&t, src, 1, other, 2, 4 * BS).expect("copy");
    assert_eq!(n as u64, 4 * BS - 1);
    let mut shifted = vec![0, 0];
    shifted.extend_from_slice(&expected[1..4 * BS as usize]);
    assert_eq!(t.read_all(other), shifted);
    t.v().release(handle).expect("release");

    assert_eq!(errno(copy(&t, src, 0, src, BS, 2 * BS)), libc::EINVAL);
    assert_eq!(copy(&t, src, 0, src, 4 * BS, BS).expect("copy"), BS as u32);
    assert_eq!(copy(&t, src, 9 * BS, dst, 0, BS).expect("past the end"), 0);
    let dir = t.v().mkdir(ROOT, b"d", 0o755, ME).expect("mkdir").node;
    assert_eq!(errno(copy(&t, dir, 0, dst, 0, 1)), libc::EISDIR);
    assert_eq!(errno(copy(&t, src, 0, dir, 0, 1)), libc::EISDIR);
    assert_eq!(
        errno(copy(&t, src, 0, dst, i64::MAX as u64, BS)),
        libc::EFBIG
    );
}

#[test]
fn copy_from_a_snapshot_restores_a_file_in_place() {
    let t = TestVolume::new();
    let data = pattern(3 * BS as usize, 12);
    let node = t.write_file("f", &data);
    t.v().create_snapshot(b"s").expect("snapshot");
    t.v()
        .write(node, 0, &pattern(3 * BS as usize, 13))
        .expect("overwrite");
    t.v().flush(node).expect("flush");
    let stored = t.stored_blocks();
    let old = t
        .v()
        .lookup(snapshot_root(&t, "s"), b"f")
        .expect("lookup")
        .node;
    copy(&t, old, 0, node, 0, 3 * BS).expect("copy");
    assert_eq!(t.read_all(node), data);
    // The overwriting blocks are freed, nothing new is stored.
    assert_eq!(t.stored_blocks(), stored - 3);
}

// ---------------------------------------------------------------------------------------
// The random operations of the model test in `tests.rs`

/// A fallocate mode the model test picks.
pub(super) fn fallocate_mode() -> impl Strategy<Value = i32> {
    prop_oneof![
        Just(0),
        Just(KEEP),
        Just(PUNCH),
        Just(ZERO),
        Just(ZERO | KEEP)
    ]
}

/// An offset, often block-aligned so that copies share blocks.
pub(super) fn range_offset() -> impl Strategy<Value = u64> {
    prop_oneof![0..20_000u64, (0..5u64).prop_map(|b| b * BS)]
}

/// What fallocate of `offset..offset + len` with `mode` does to `content`.
pub(super) fn fallocate_model(content: &mut Vec<u8>, offset: u64, len: u64, mode: i32) {
    let (offset, end) = (offset as usize, (offset + len) as usize);
    if mode & (libc::FALLOC_FL_PUNCH_HOLE | ZERO) != 0 && offset < content.len() {
        let to = end.min(content.len());
        content[offset..to].fill(0);
    }
    if mode & KEEP == 0 && content.len() < end {
        content.resize(end, 0);
    }
}

/// Checks the result of a copy against the model (`source` is the source's content
/// before it, `same` whether both are one file) and applies it to `dst`.
pub(super) fn copy_model(
    result: Result<u32>,
    copy: CopyRange,
    source: &[u8],
    same: bool,
    dst: &mut Vec<u8>,
) {
    let start = (copy.src_offset as usize).min(source.len());
    let n = (copy.len as usize).min(source.len() - start);
    let overlap = copy.src_offset < copy.dst_offset + n as u64
        && copy.dst_offset < copy.src_offset + n as u64;
    if same && n > 0 && overlap {
        assert_eq!(errno(result), libc::EINVAL, "{copy:?}");
        return;
    }
    assert_eq!(result.expect("copy") as usize, n, "{copy:?}");
    if n > 0 {
        let end = copy.dst_offset as usize + n;
        if dst.len() < end {
            dst.resize(end, 0);
        }
        dst[copy.dst_offset as usize..end].copy_from_slice(&source[start..start + n]);
    }
}

/// Every hole SEEK_HOLE and SEEK_DATA report in `node` reads as zeros in `expected`.
pub(super) fn check_holes(t: &TestVolume, node: NodeId, expected: &[u8], what: &str) {
    let mut at = 0;
    while (at as usize) < expected.len() {
        let hole = t.v().lseek(node, at, libc::SEEK_HOLE).expect("seek hole");
        assert!(
            hole >= at && hole as usize <= expected.len(),
            "{what}: hole {hole} from {at}"
        );
        let data = match t.v().lseek(node, hole, libc::SEEK_DATA) {
            Ok(data) => data,
            Err(Error::NoData) => expected.len() as i64,
            Err(e) => panic!("{what}: seek data from {hole}: {e}"),
        };
        assert!(data >= hole, "{what}: data {data} before hole {hole}");
        assert!(
            expected[hole as usize..data as usize]
                .iter()
                .all(|&b| b == 0),
            "{what}: hole {hole}..{data} holds data"
        );
        at = data.max(at + 1);
    }
}

/// Reads remember an open file's block map (`reads.rs`); sharing blocks into it and
/// punching holes change that map outside a write, and the next read must see it.
#[test]
fn reads_of_an_open_file_see_copies_into_it_and_punched_holes() {
    let t = TestVolume::new();
    let old = pattern(4 * BS as usize, 1);
    let new = pattern(4 * BS as usize, 2);
    let src = t.write_file("src", &new);
    let dst = t.write_file("dst", &old);
    let handle = t.v().open_file(dst, true).expect("open");
    assert_eq!(t.read_all(dst), old, "the map is loaded now");

    copy(&t, src, 0, dst, 0, 4 * BS).expect("copy");
    assert_eq!(t.read_all(dst), new, "the shared blocks, not the old ones");

    t.v().fallocate(dst, BS, 2 * BS, PUNCH).expect("punch");
    let mut expected = new.clone();
    expected[BS as usize..3 * BS as usize].fill(0);
    assert_eq!(t.read_all(dst), expected, "the hole reads as zeros");
    t.v().release(handle).expect("release");
}
