//! The catalog's group commit (operations commit together, a few milliseconds after they
//! return): a kill -9 during a burst of namespace operations leaves a state that existed,
//! fsync of a directory covers what came before it, and a snapshot taken during a burst
//! holds exactly the operations that returned before it.

mod common;

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::{Mount, take_snapshot};

/// One namespace operation of the burst, in the order they returned.
#[derive(Clone, Debug)]
enum Op {
    Create(String),
    Rename(String, String),
    Unlink(String),
}

/// The names in the directory after the first `n` operations.
fn names_after(journal: &[Op], n: usize) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for op in &journal[..n] {
        match op {
            Op::Create(name) => {
                names.insert(name.clone());
            }
            Op::Rename(from, to) => {
                names.remove(from);
                names.insert(to.clone());
            }
            Op::Unlink(name) => {
                names.remove(name);
            }
        }
    }
    names
}

fn names_in(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect()
}

/// Runs creates, renames and unlinks in `dir` until `stop`; returns the journal. Every
/// `sync_every` operations it fsyncs the directory and records in `synced` how many
/// operations that covered.
fn burst(dir: &Path, stop: &AtomicBool, synced: &AtomicUsize, sync_every: usize) -> Vec<Op> {
    let mut journal = Vec::new();
    let mut live: Vec<String> = Vec::new();
    let mut i = 0usize;
    while !stop.load(Ordering::SeqCst) {
        i += 1;
        let op = match i % 5 {
            0 if !live.is_empty() => {
                let name = live.swap_remove(i % live.len());
                Op::Unlink(name)
            }
            2 | 4 if !live.is_empty() => {
                let k = i % live.len();
                let to = format!("r{i}");
                let from = std::mem::replace(&mut live[k], to.clone());
                Op::Rename(from, to)
            }
            _ => {
                let name = format!("c{i}");
                live.push(name.clone());
                Op::Create(name)
            }
        };
        let done = match &op {
            Op::Create(name) => File::create(dir.join(name)).map(drop),
            Op::Rename(from, to) => fs::rename(dir.join(from), dir.join(to)),
            Op::Unlink(name) => fs::remove_file(dir.join(name)),
        };
        if done.is_err() {
            // The daemon was killed under this operation: it may or may not have landed.
            journal.push(op);
            return journal;
        }
        journal.push(op);
        if journal.len() % sync_every == 0 {
            let fsynced = File::open(dir).and_then(|d| d.sync_all());
            if fsynced.is_err() {
                return journal;
            }
            synced.store(journal.len(), Ordering::SeqCst);
        }
    }
    journal
}

#[test]
fn kill9_during_a_burst_of_creates_and_renames_leaves_a_state_that_existed() {
    let mut mount = Mount::new();
    for (round, delay_ms) in [(0, 150u64), (1, 400), (2, 900)] {
        let dir = mount.path().join(format!("burst{round}"));
        fs::create_dir(&dir).expect("mkdir");
        File::open(mount.path())
            .and_then(|d| d.sync_all())
            .expect("fsync root");
        let stop = Arc::new(AtomicBool::new(false));
        let synced = Arc::new(AtomicUsize::new(0));
        let worker = {
            let (dir, stop, synced) = (dir.clone(), stop.clone(), synced.clone());
            std::thread::spawn(move || burst(&dir, &stop, &synced, 97))
        };
        std::thread::sleep(Duration::from_millis(delay_ms));
        mount.kill9();
        stop.store(true, Ordering::SeqCst);
        let journal = worker.join().expect("burst thread");
        let durable = synced.load(Ordering::SeqCst);
        mount.remount();
        let found = names_in(&dir);
        // Some prefix of the journal, no shorter than what the last fsync covered.
        let prefix = (durable..=journal.len())
            .rev()
            .find(|&n| names_after(&journal, n) == found);
        assert!(
            prefix.is_some(),
            "round {round}: after kill -9 the directory holds {} names, matching no prefix of \
             the {} operations (fsync covered {durable})",
            found.len(),
            journal.len()
        );
        assert!(
            journal.len() > durable,
            "round {round}: the burst did not run"
        );
    }
}

#[test]
fn kill9_right_after_fsync_of_a_directory_keeps_everything_before_it() {
    let mut mount = Mount::new();
    let dir = mount.path().join("d");
    fs::create_dir(&dir).expect("mkdir");
    let mut expected = BTreeSet::new();
    for i in 0..300 {
        File::create(dir.join(format!("f{i}"))).expect("create");
        expected.insert(format!("f{i}"));
    }
    for i in (0..300).step_by(3) {
        fs::rename(dir.join(format!("f{i}")), dir.join(format!("moved{i}"))).expect("rename");
        expected.remove(&format!("f{i}"));
        expected.insert(format!("moved{i}"));
    }
    for i in (1..300).step_by(7).filter(|i| i % 3 != 0) {
        fs::remove_file(dir.join(format!("f{i}"))).expect("unlink");
        expected.remove(&format!("f{i}"));
    }
    File::open(&dir)
        .and_then(|d| d.sync_all())
        .expect("fsync dir");
    mount.kill9();
    mount.remount();
    assert_eq!(
        names_in(&dir),
        expected,
        "what fsync of the directory covered"
    );
}

#[test]
fn a_snapshot_taken_during_a_burst_of_creates_holds_exactly_those_created_before_it() {
    let mount = Mount::new();
    let dir = mount.path().join("burst");
    fs::create_dir(&dir).expect("mkdir");
    let created = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let worker = {
        let (dir, created, stop) = (dir.clone(), created.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                File::create(dir.join(format!("f{i:06}"))).expect("create");
                i += 1;
                created.store(i, Ordering::SeqCst);
            }
        })
    };
    let mut checked = 0;
    for round in 0..5 {
        std::thread::sleep(Duration::from_millis(60));
        let before = created.load(Ordering::SeqCst);
        let snapshot = take_snapshot(&mount, &format!("s{round}"));
        let after = created.load(Ordering::SeqCst);
        let names = names_in(&snapshot.join("burst"));
        // Creates run one after another: the snapshot holds f0..fk for one k, with every
        // create that returned before mkdir began, none that began after it returned.
        let k = names.len();
        let prefix: BTreeSet<String> = (0..k).map(|i| format!("f{i:06}")).collect();
        assert_eq!(names, prefix, "round {round}: a gap in the snapshot");
        assert!(
            before <= k && k <= after + 1,
            "round {round}: snapshot holds {k} files; {before} creates had returned before \
             mkdir, {after} when it returned"
        );
        checked += usize::from(after > before || k > 0);
    }
    stop.store(true, Ordering::SeqCst);
    worker.join().expect("create thread");
    assert!(checked > 0, "the creates never overlapped a snapshot");
}
