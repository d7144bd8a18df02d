//! Core tests of the recycle bin and snapshot locks.

use std::time::Duration;

use super::*;
use crate::catalog::{LockMode, SnapshotLock, SnapshotRow};
use crate::volume::locks;
use crate::volume::trash::{TRASHDIR, TRASHDIR_NAME};

const HOUR: i64 = 3600 * 1_000_000_000;

fn lock_for(mode: LockMode, from_now: i64) -> SnapshotLock {
    SnapshotLock {
        mode,
        until: now() + from_now,
        cool_off_until: now(),
    }
}

/// The bytes of file `name` in the snapshot of the bin named `bin_name`.
fn trashed_file(t: &TestVolume, bin_name: &[u8], name: &[u8]) -> Vec<u8> {
    let root = t.v().lookup(TRASHDIR, bin_name).expect("in the bin").node;
    let file = t
        .v()
        .lookup(root, name)
        .expect("file in the trashed snapshot");
    t.read_all(file.node)
}

#[test]
fn a_deleted_snapshot_waits_in_the_bin_with_its_data_and_name_free() {
    let mut t = TestVolume::new();
    let old = pattern(4096 * 3, 1);
    t.write_file("f", &old);
    t.v().create_snapshot(b"s").expect("snapshot");
    t.v().unlink(ROOT, b"f").expect("unlink");
    t.write_file("f", &pattern(4096, 2));
    let blocks_before = t.stored_blocks();
    t.v()
        .remember_trash_retention(Duration::from_secs(3600))
        .expect("retention");

    t.v().delete_snapshot(b"s").expect("delete into the bin");
    assert!(t.v().list_snapshots().is_empty());
    assert_eq!(
        t.v().lookup(SNAPDIR, b"s").map(drop).map_err(|e| e.errno()),
        Err(libc::ENOENT)
    );
    let listing = t.v().opendir(SNAPDIR).expect("opendir");
    let names: Vec<Vec<u8>> = t
        .v()
        .readdir(listing)
        .expect("readdir")
        .iter()
        .map(|e| e.name.clone())
        .collect();
    assert_eq!(
        names,
        [b".".to_vec(), b"..".to_vec()],
        "the bin is not listed"
    );
    t.v()
        .lookup(SNAPDIR, TRASHDIR_NAME)
        .expect("the bin is reachable by name");
    assert_eq!(trashed_file(&t, b"s", b"f"), old);
    assert_eq!(t.stored_blocks(), blocks_before, "its blocks stay");

    // Its name is free; a second deletion of that name gets NAME~ID in the bin.
    let second = t.v().create_snapshot(b"s").expect("same name again");
    t.v().delete_snapshot(b"s").expect("delete the second");
    let bin: Vec<Vec<u8>> = t
        .v()
        .trashed_snapshots()
        .into_iter()
        .map(|r| r.name)
        .collect();
    let suffixed = format!("s~{}", second.id).into_bytes();
    assert_eq!(bin, [b"s".to_vec(), suffixed.clone()]);
    t.v().create_snapshot(b"s").expect("a third");
    assert_eq!(
        t.v()
            .undelete_snapshot(b"s", None)
            .map(drop)
            .map_err(|e| e.errno()),
        Err(libc::EEXIST)
    );
    t.v()
        .undelete_snapshot(b"s", Some(b"s-old"))
        .expect("undelete as");

    // The bin survives a remount.
    t.reopen();
    assert_eq!(t.v().trashed_snapshots().len(), 1);
    let old_root = t.v().lookup(SNAPDIR, b"s-old").expect("undeleted").node;
    let f = t.v().lookup(old_root, b"f").expect("its file");
    assert_eq!(t.read_all(f.node), old);

    // Purging frees what only it held; expiry purges the rest.
    t.v().purge_snapshot(&suffixed).expect("purge");
    assert!(t.v().trashed_snapshots().is_empty());
    t.v().delete_snapshot(b"s-old").expect("delete again");
    assert_eq!(t.v().purge_expired_trash(now()).expect("not yet"), 0);
    assert_eq!(
        t.v()
            .purge_expired_trash(now() + 2 * HOUR)
            .expect("expired"),
        1
    );
    assert!(t.v().trashed_snapshots().is_empty());
    assert!(t.stored_blocks() < blocks_before, "the old blocks are gone");
}

#[test]
fn a_locked_snapshot_is_neither_deleted_nor_shortened_against_its_mode() {
    let t = TestVolume::new();
    t.write_file("f", b"x");
    t.v().create_snapshot(b"g").expect("snapshot");
    t.v().create_snapshot(b"c").expect("snapshot");
    let denied = |result: Result<()>| result.map_err(|e| e.errno());

    let governance = lock_for(LockMode::Governance, HOUR);
    t.v().lock_snapshot(b"g", Some(&governance)).expect("lock");
    assert_eq!(denied(t.v().delete_snapshot(b"g")), Err(libc::EPERM));
    let shorter = lock_for(LockMode::Governance, HOUR / 2);
    t.v()
        .lock_snapshot(b"g", Some(&shorter))
        .expect("governance shortens");
    t.v().lock_snapshot(b"g", None).expect("governance unlocks");
    t.v().delete_snapshot(b"g").expect("unlocked: deleted");

    let compliance = lock_for(LockMode::Compliance, HOUR);
    t.v().lock_snapshot(b"c", Some(&compliance)).expect("lock");
    assert_eq!(denied(t.v().lock_snapshot(b"c", None)), Err(libc::EPERM));
    let shorter = lock_for(LockMode::Compliance, HOUR / 2);
    assert_eq!(
        denied(t.v().lock_snapshot(b"c", Some(&shorter))),
        Err(libc::EPERM)
    );
    let longer = lock_for(LockMode::Compliance, 2 * HOUR);
    t.v().lock_snapshot(b"c", Some(&longer)).expect("extended");
    assert_eq!(denied(t.v().delete_snapshot(b"c")), Err(libc::EPERM));

    // Expired locks no longer hold.
    let expired = SnapshotLock {
        mode: LockMode::Compliance,
        until: now() - 1,
        cool_off_until: 0,
    };
    t.v()
        .mirror_snapshot_lock(b"c", Some(&expired))
        .expect("mirror");
    t.v().delete_snapshot(b"c").expect("expired lock: deleted");
}

/// Each deletion reads a snapshot's row, then removes it: the retention timer, rmdir, a
/// full disk's purge. A change made in between must win over the row read before it.
#[test]
fn a_removal_that_read_a_snapshot_before_it_changed_leaves_it_as_it_became() {
    let t = TestVolume::new();
    t.write_file("f", b"kept");
    let errno = |result: Result<()>| result.map_err(|e| e.errno());
    t.v()
        .remember_trash_retention(Duration::from_secs(3600))
        .expect("retention");

    // Undeleted after a purge read the bin: the restored snapshot stays.
    t.v().create_snapshot(b"u").expect("snapshot");
    t.v().delete_snapshot(b"u").expect("into the bin");
    let binned = t.v().trashed_snapshots().remove(0);
    t.v().undelete_snapshot(b"u", None).expect("undelete");
    assert_eq!(
        errno(t.v().remove_snapshot(&binned, "purge")),
        Err(libc::ENOENT)
    );
    let root = t.v().lookup(SNAPDIR, b"u").expect("restored").node;
    let file = t.v().lookup(root, b"f").expect("its file").node;
    assert_eq!(t.read_all(file), b"kept");

    // A deletion of the row as `read`, into the bin or for good, fails with `expected`.
    let refused = |read: &SnapshotRow, expected: i32| {
        assert_eq!(
            errno(t.v().move_to_trash(read, Duration::from_secs(3600))),
            Err(expected)
        );
        assert_eq!(errno(t.v().remove_snapshot(read, "delete")), Err(expected));
    };

    // Locked after a deletion read it: refused.
    let read = t.v().snapshots.by_name(b"u").expect("listed");
    let governance = lock_for(LockMode::Governance, HOUR);
    t.v().lock_snapshot(b"u", Some(&governance)).expect("lock");
    refused(&read, libc::EPERM);
    assert!(t.v().trashed_snapshots().is_empty());
    t.v().lock_snapshot(b"u", None).expect("unlock");

    // Renamed after a deletion read it: the name asked for is gone, the snapshot is not.
    let read = t.v().snapshots.by_name(b"u").expect("listed");
    t.v().rename_snapshot(b"u", b"v").expect("rename");
    refused(&read, libc::ENOENT);
    let names: Vec<Vec<u8>> = t.v().list_snapshots().into_iter().map(|r| r.name).collect();
    assert_eq!(names, [b"v".to_vec()]);
}

#[test]
fn an_expiry_purge_skips_a_locked_snapshot_and_purges_the_rest_of_the_bin() {
    let t = TestVolume::new();
    t.write_file("f", b"x");
    t.v()
        .remember_trash_retention(Duration::from_secs(3600))
        .expect("retention");
    for name in [b"a", b"b", b"c"] {
        t.v().create_snapshot(name).expect("snapshot");
    }
    for name in [b"a", b"b", b"c"] {
        t.v().delete_snapshot(name).expect("into the bin");
    }
    let bin_a = t.v().snapshots.trashed_by_name(b"a").expect("in the bin");
    let governance = locks::format(&lock_for(LockMode::Governance, 4 * HOUR));
    t.v()
        .set_lock_xattr(bin_a.id, Some(governance.as_bytes()))
        .expect("lock it in the bin");

    assert_eq!(
        t.v()
            .purge_expired_trash(now() + 2 * HOUR)
            .expect("expired"),
        2
    );
    let bin: Vec<Vec<u8>> = t
        .v()
        .trashed_snapshots()
        .into_iter()
        .map(|r| r.name)
        .collect();
    assert_eq!(bin, [b"a".to_vec()], "the locked one stays");
}
