//! st_blocks as the kernel shows it while a file's writes are buffered and after each
//! path that flushes them. Alone in its binary: any other test's fork or spawn copies this
//! test's open descriptors, and the child's close of them sends FLUSH, which stores the
//! buffered blocks this test must still see buffered (it failed so in a parallel run).

mod common;

use std::fs::{self, File};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use common::{Mount, pattern};

/// The kernel may keep a sole writer's attributes for an hour. A flush stores buffered
/// blocks behind it and changes st_blocks; the daemon drops the kernel's copy, so a stat
/// made before the flush is not what a stat after it sees, whichever path flushed.
#[test]
fn st_blocks_follows_every_flush_at_once() {
    let m = Mount::new();
    let len = 64 * 1024;
    let stored = (len / 512) as u64;
    let blocks = |path: &Path| fs::metadata(path).expect("stat").blocks();

    // close(2): the FLUSH request stores the blocks.
    let closed = m.path().join("closed");
    let file = File::create(&closed).expect("create");
    file.write_all_at(&pattern(len, 1), 0).expect("write");
    assert_eq!(file.metadata().expect("fstat").blocks(), 0, "buffered");
    assert_eq!(blocks(&closed), 0, "the kernel caches this");
    drop(file);
    assert!(
        blocks(&closed) >= stored,
        "after close: {}",
        blocks(&closed)
    );

    // A snapshot flushes every open file, during a request on another inode.
    let open = m.path().join("open");
    let file = File::create(&open).expect("create");
    file.write_all_at(&pattern(len, 2), 0).expect("write");
    assert_eq!(blocks(&open), 0, "buffered");
    common::take_snapshot(&m, "s");
    assert!(
        blocks(&open) >= stored,
        "after a snapshot: {}",
        blocks(&open)
    );

    // The timer's flusher thread stores buffers a few seconds old.
    file.write_all_at(&pattern(len, 3), len as u64)
        .expect("write more");
    assert_eq!(blocks(&open), stored, "the second half is buffered");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while blocks(&open) < 2 * stored {
        assert!(
            std::time::Instant::now() < deadline,
            "the flusher's blocks never showed: {}",
            blocks(&open)
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}
