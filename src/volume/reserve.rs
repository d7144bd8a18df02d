//! Room set aside in the data dir so that deleting works on a full disk.
//!
//! SQLite must append a deletion to its WAL before the deletion frees anything, so on a
//! disk filled to the last byte (by writes, or by uploads to a store on the same disk)
//! even `rm` would fail with ENOSPC and the volume could never recover. The volume keeps
//! a small preallocated file; an operation that frees space and finds the disk full gives
//! it back and tries again, and the room is set aside again once there is some.

use std::fs::{self, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use super::{Result, Volume};

/// Enough for the catalog transactions of many deletions.
const RESERVE_BYTES: u64 = 4 << 20;
/// Less is not worth keeping: a few of the catalog's pages.
const MIN_RESERVE_BYTES: u64 = 64 << 10;

pub(super) struct Reserve {
    path: PathBuf,
    /// Set aside in full: nothing to refill. Known here, not asked of the disk at every
    /// unlink and rename (two `statx` calls of each).
    whole: AtomicBool,
}

impl Reserve {
    /// The reserve of data dir `dir`, set aside now if there is room.
    pub(super) fn new(dir: &Path) -> Reserve {
        let reserve = Reserve {
            path: dir.join("reserve"),
            whole: AtomicBool::new(false),
        };
        reserve.refill();
        reserve
    }

    /// Sets the room aside if it is not, or as much of it as the disk has: after the
    /// reserve was used, whatever the deletion freed goes back into it first.
    pub(super) fn refill(&self) {
        if self.whole.load(Ordering::Relaxed) {
            return;
        }
        if fs::metadata(&self.path).is_ok_and(|m| m.blocks() * 512 >= RESERVE_BYTES) {
            self.whole.store(true, Ordering::Relaxed);
            return;
        }
        let Ok(file) = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&self.path)
        else {
            return;
        };
        let mut len = RESERVE_BYTES;
        while len >= MIN_RESERVE_BYTES {
            // SAFETY: fallocate on an open descriptor; it allocates blocks for real
            // (unlike a sparse set_len) or fails cleanly with ENOSPC.
            if unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len as i64) } == 0 {
                self.whole.store(len == RESERVE_BYTES, Ordering::Relaxed);
                return;
            }
            // Without fallocate (some network filesystems) there is no reserve.
            if std::io::Error::last_os_error().raw_os_error() != Some(libc::ENOSPC) {
                return;
            }
            len /= 2;
        }
    }

    /// Gives the room back to the disk; false if none was set aside.
    fn release(&self) -> bool {
        self.whole.store(false, Ordering::Relaxed);
        let released = fs::remove_file(&self.path).is_ok();
        if released {
            tracing::warn!("data dir full: using its reserve to free space");
        }
        released
    }
}

impl Volume {
    /// Runs `op`, a step that frees space and may be retried, once more with the reserve
    /// given back if the disk is full; sets the reserve aside again after it.
    pub(super) fn freeing<T>(&self, mut op: impl FnMut() -> Result<T>) -> Result<T> {
        let result = match op() {
            Err(e) if e.errno() == libc::ENOSPC && self.reserve.release() => op(),
            result => result,
        };
        if result.is_ok() {
            self.reserve.refill();
        }
        result
    }
}
