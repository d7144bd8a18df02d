//! The uploader's share of the machine while the live volume is busy. On one disk, a large
//! upload to the default store (reads of block files, writes and fsyncs of store objects)
//! otherwise took more than half of a file server's throughput on the mount
//! (docs/benchmarks.md, "Background work and the live volume").

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::sync::{Mutex, lock};
use crate::volume::{Activity, Mark};

/// A request within this long makes the foreground busy (ZFS's `zfs_scan_idle` is 50
/// ticks, 0.5 s at 100 Hz: tighter here, as a file server pauses between operations).
const BUSY_WINDOW: Duration = Duration::from_millis(200);
/// Longest rest after one piece of work: a slow store request must not stall the upload.
const MAX_REST: Duration = Duration::from_secs(2);

pub struct Pacer {
    activity: Arc<Activity>,
    /// Fraction of the time the uploader may work while the foreground is busy.
    share: f64,
    /// Whether store writes go to the machine's own disks (see `ObjectStore::is_local`).
    local_store: bool,
    /// When the current job (a snapshot's upload) began: requests before it ended before
    /// its work started and compete with none of it.
    job_began: Mutex<Mark>,
    /// One piece of paced work at a time.
    turn: tokio::sync::Mutex<()>,
}

impl Pacer {
    /// A pacer that lets the uploader take `share_percent` of the time (100: never yields).
    pub fn new(activity: Arc<Activity>, share_percent: u8, local_store: bool) -> Pacer {
        Pacer {
            activity,
            share: f64::from(share_percent.clamp(1, 100)) / 100.0,
            local_store,
            job_began: Mutex::new(Mark::default()),
            turn: tokio::sync::Mutex::new(()),
        }
    }

    /// A job begins: from now on only requests that come after this moment make the
    /// foreground busy. The writes of a rewrite that a `sync` and a snapshot just ended are
    /// not held against that snapshot's upload; a load still running sends its next
    /// request within moments and is yielded to again.
    pub fn begin_job(&self) {
        *lock(&self.job_began) = self.activity.mark();
    }

    /// Runs `work` on local resources (reading block files, compressing), which must not
    /// start before it is polled (wrap a spawned task in `async {}`): at once while
    /// the foreground is idle; while it is busy, one piece at a time, each followed by a
    /// rest long enough that the uploader works at most `share` of the time.
    pub async fn local<T>(&self, work: impl Future<Output = T>) -> T {
        if self.share >= 1.0 || !self.busy() {
            return work.await;
        }
        let _turn = self.turn.lock().await;
        // The foreground may have gone quiet while this waited for its turn.
        if !self.busy() {
            return work.await;
        }
        let started = Instant::now();
        let result = work.await;
        let rest = started.elapsed().mul_f64(1.0 / self.share - 1.0);
        tokio::time::sleep(rest.min(MAX_REST)).await;
        result
    }

    /// Runs store request `work`: paced as local work when the store is on this machine's
    /// disks; a remote store's requests wait on the network and are not held back.
    pub async fn store<T>(&self, work: impl Future<Output = T>) -> T {
        if self.local_store {
            self.local(work).await
        } else {
            work.await
        }
    }

    fn busy(&self) -> bool {
        let since = *lock(&self.job_began);
        self.activity.busy_since(BUSY_WINDOW, since)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime")
    }

    /// Ten pieces of work of 20 ms each, two at a time; how long they all took.
    fn ten_pieces(pacer: &Pacer, remote_store: bool) -> Duration {
        runtime().block_on(async {
            let started = Instant::now();
            // The work starts when polled, as the uploader's does (a sleep made earlier
            // would count from then).
            let work = || async { tokio::time::sleep(Duration::from_millis(20)).await };
            let piece = || async {
                if remote_store {
                    pacer.store(work()).await
                } else {
                    pacer.local(work()).await
                }
            };
            for _ in 0..10 / 2 {
                tokio::join!(piece(), piece());
            }
            started.elapsed()
        })
    }

    #[test]
    fn yields_to_a_busy_foreground_and_runs_free_when_it_is_idle() {
        let activity = Arc::new(Activity::default());
        let pacer = Pacer::new(activity.clone(), 25, false);
        let idle = ten_pieces(&pacer, false);
        assert!(
            idle < Duration::from_millis(500),
            "idle: not held back, took {idle:?}"
        );

        // Keep the foreground busy throughout.
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let toucher = {
            let (activity, stop) = (activity.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    activity.touch();
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        };
        while !activity.busy(Duration::from_millis(10)) {
            std::thread::sleep(Duration::from_millis(1));
        }
        let busy = ten_pieces(&pacer, false);
        // One at a time, each 20 ms of work and 60 ms of rest: 25% of the time, 800 ms
        // (600: a loaded machine may starve the toucher now and then); unpaced, 100.
        assert!(
            busy >= Duration::from_millis(600),
            "busy: took only {busy:?}"
        );
        // A remote store's requests are not held back; local work still is.
        let remote = ten_pieces(&pacer, true);
        assert!(
            remote < Duration::from_millis(500),
            "remote: took {remote:?}"
        );
        let never_yields = Pacer::new(activity, 100, true);
        let free = ten_pieces(&never_yields, false);
        assert!(
            free < Duration::from_millis(500),
            "share 100: took {free:?}"
        );
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        toucher.join().expect("toucher");
    }

    #[test]
    fn a_job_does_not_yield_to_requests_that_ended_before_it_began() {
        let activity = Arc::new(Activity::default());
        let pacer = Pacer::new(activity.clone(), 25, false);
        activity.touch();
        assert!(pacer.busy(), "a request just now");
        // Past the activity clock's millisecond, so the mark falls after that request.
        std::thread::sleep(Duration::from_millis(5));
        pacer.begin_job();
        assert!(!pacer.busy(), "the request ended before the job began");
        std::thread::sleep(Duration::from_millis(5));
        activity.touch();
        assert!(pacer.busy(), "a request during the job");
    }
}
