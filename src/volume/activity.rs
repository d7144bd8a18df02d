//! When the live volume last served a request. Background work (the uploader) yields to
//! the foreground while it is busy, as ZFS's scrub yields to a pool that saw I/O within
//! `zfs_scan_idle`: on one disk, a large upload otherwise takes half of a file server's
//! throughput (docs/benchmarks.md, "Background work and the live volume").

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub struct Activity {
    origin: Instant,
    /// Milliseconds since `origin` of the last request, plus one; 0: none yet.
    last: AtomicU64,
}

/// A moment of an `Activity`'s clock (milliseconds since its origin, plus one).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Mark(u64);

impl Default for Activity {
    fn default() -> Self {
        Activity {
            origin: Instant::now(),
            last: AtomicU64::new(0),
        }
    }
}

impl Activity {
    /// A request is being served.
    pub fn touch(&self) {
        let now = self.now();
        // Requests come by the thousand per second: write the shared line once per tick.
        if self.last.load(Ordering::Relaxed) != now {
            self.last.store(now, Ordering::Relaxed);
        }
    }

    /// Whether any request was served within the last `window`: `busy_since` with no mark.
    #[cfg(test)]
    pub fn busy(&self, window: Duration) -> bool {
        self.busy_since(window, Mark(0))
    }

    /// This moment, for `busy_since`.
    pub fn mark(&self) -> Mark {
        Mark(self.now())
    }

    /// Whether a request was served within the last `window` and after `mark`: work that
    /// ended before a background job began does not compete with it.
    pub fn busy_since(&self, window: Duration, mark: Mark) -> bool {
        let last = self.last.load(Ordering::Relaxed);
        last > mark.0 && self.now().saturating_sub(last) <= window.as_millis() as u64
    }

    fn now(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64 + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_only_within_the_window_after_a_request() {
        let activity = Activity::default();
        assert!(!activity.busy(Duration::from_secs(3600)), "no request yet");
        // Windows wide enough that a test thread descheduled on a loaded machine still
        // checks within them; the quiet one is waited out.
        activity.touch();
        assert!(activity.busy(Duration::from_secs(5)));
        std::thread::sleep(Duration::from_millis(80));
        assert!(!activity.busy(Duration::from_millis(50)));
        assert!(activity.busy(Duration::from_secs(10)));
        activity.touch();
        assert!(activity.busy(Duration::from_secs(5)));
    }

    #[test]
    fn busy_since_a_mark_only_after_a_request_that_came_later() {
        let activity = Activity::default();
        activity.touch();
        // Past the clock's millisecond: a request in the mark's own tick counts as before.
        std::thread::sleep(Duration::from_millis(5));
        let mark = activity.mark();
        assert!(activity.busy(Duration::from_secs(5)));
        assert!(
            !activity.busy_since(Duration::from_secs(5), mark),
            "the request came before"
        );
        std::thread::sleep(Duration::from_millis(5));
        activity.touch();
        assert!(activity.busy_since(Duration::from_secs(5), mark));
    }
}
