//! The `--json` views. Scripts and tests read them, so their keys, key order and value
//! types are a contract: change them only on purpose. Byte strings (names, tags) are
//! decoded lossily (the text output escapes them instead: `display::escaped`).

use std::borrow::Cow;

use serde::{Serialize, Serializer};
use snapfs::catalog::SnapshotLock;
use snapfs::manifest::SnapshotManifest;
use snapfs::volume::retention::{Reason, Verdict};
use snapfs::volume::{self, SnapshotInfo};

/// Prints `value` as one line of JSON.
pub fn print(value: &impl Serialize) -> serde_json::Result<()> {
    println!("{}", serde_json::to_string(value)?);
    Ok(())
}

/// A byte string (a name, a path) in JSON: lossy, as every `--json` view documents.
pub fn text(bytes: &[u8]) -> Cow<'_, str> {
    String::from_utf8_lossy(bytes)
}

/// Tags as one object, in their order.
struct Tags<'a>(&'a [(Vec<u8>, Vec<u8>)]);

impl Serialize for Tags<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.0.iter().map(|(k, v)| (text(k), text(v))))
    }
}

/// A snapshot of a volume (`snapshot create`, `show`, `list`).
#[derive(Serialize)]
pub struct Snapshot<'a> {
    id: u64,
    name: Cow<'a, str>,
    state: String,
    error: Option<&'a str>,
    created: String,
    logical_bytes: u64,
    exclusive_bytes: u64,
    upload: Upload,
    tags: Tags<'a>,
    lock: Option<Lock>,
    /// What the policy's retention does with it (`list`, with a policy).
    #[serde(skip_serializing_if = "Option::is_none")]
    retention: Option<Retention<'a>>,
}

/// A snapshot's lock (`snapshot lock --json`, and in every snapshot).
#[derive(Serialize)]
pub struct Lock {
    mode: &'static str,
    until: String,
    cool_off_until: String,
}

impl Lock {
    pub fn of(lock: &SnapshotLock) -> Lock {
        Lock {
            mode: lock.mode.as_str(),
            until: volume::rfc3339(lock.until),
            cool_off_until: volume::rfc3339(lock.cool_off_until),
        }
    }
}

/// `snapshot list --trash`: the recycle bin.
#[derive(Serialize)]
pub struct Trash<'a> {
    snapshots: Vec<Trashed<'a>>,
    /// What purging every snapshot in the bin frees.
    total_bytes: u64,
}

#[derive(Serialize)]
struct Trashed<'a> {
    id: u64,
    name: Cow<'a, str>,
    deleted: String,
    expires: String,
    created: String,
    logical_bytes: u64,
    /// What purging this one frees.
    exclusive_bytes: u64,
    tags: Tags<'a>,
}

impl<'a> Trash<'a> {
    pub fn of(trashed: &'a [SnapshotInfo], total_bytes: u64) -> Trash<'a> {
        let snapshots = trashed
            .iter()
            .map(|info| {
                let (deleted, expires) = info.trash.map_or((0, 0), |t| (t.deleted, t.expires));
                Trashed {
                    id: info.id,
                    name: text(&info.name),
                    deleted: volume::rfc3339(deleted),
                    expires: volume::rfc3339(expires),
                    created: volume::rfc3339(info.created),
                    logical_bytes: info.logical_bytes,
                    exclusive_bytes: info.exclusive_bytes,
                    tags: Tags(&info.tags),
                }
            })
            .collect();
        Trash {
            snapshots,
            total_bytes,
        }
    }
}

#[derive(Serialize)]
struct Retention<'a> {
    keep: bool,
    reasons: &'a [Reason],
}

#[derive(Serialize)]
struct Upload {
    total_blocks: Option<u64>,
    total_bytes: Option<u64>,
    sent_blocks: u64,
    sent_bytes: u64,
    stored_bytes: u64,
}

impl<'a> Snapshot<'a> {
    pub fn of(info: &'a SnapshotInfo) -> Snapshot<'a> {
        let p = &info.upload;
        Snapshot {
            id: info.id,
            name: text(&info.name),
            state: info.state.to_string(),
            error: info.error.as_deref(),
            created: volume::rfc3339(info.created),
            logical_bytes: info.logical_bytes,
            exclusive_bytes: info.exclusive_bytes,
            upload: Upload {
                total_blocks: p.total_blocks,
                total_bytes: p.total_bytes,
                sent_blocks: p.sent_blocks,
                sent_bytes: p.sent_bytes,
                stored_bytes: p.stored_bytes,
            },
            tags: Tags(&info.tags),
            lock: info.lock.as_ref().map(Lock::of),
            retention: None,
        }
    }

    /// With what retention does with it.
    pub fn with_retention(mut self, verdict: Option<&'a Verdict>) -> Snapshot<'a> {
        self.retention = verdict.map(|v| Retention {
            keep: v.keep(),
            reasons: &v.reasons,
        });
        self
    }
}

/// A snapshot read from a store (`snapshot list --store`): only completed ones are there.
#[derive(Serialize)]
pub struct StoredSnapshot<'a> {
    id: u64,
    name: Cow<'a, str>,
    state: &'static str,
    created: String,
    logical_bytes: u64,
    tags: Tags<'a>,
    lock: Option<Lock>,
}

impl<'a> StoredSnapshot<'a> {
    pub fn of(manifest: &'a SnapshotManifest) -> StoredSnapshot<'a> {
        StoredSnapshot {
            id: manifest.id,
            name: text(&manifest.name),
            state: "completed",
            created: volume::rfc3339(manifest.created),
            logical_bytes: manifest.logical_bytes,
            tags: Tags(&manifest.tags),
            lock: manifest.lock.as_ref().map(Lock::of),
        }
    }
}

/// What `restore --json` did.
#[derive(Serialize)]
pub struct RestoreSummary<'a> {
    files: u64,
    dirs: u64,
    symlinks: u64,
    hard_links: u64,
    specials: u64,
    bytes: u64,
    /// Wall time, to the millisecond.
    seconds: f64,
    errors: &'a [String],
}

impl<'a> RestoreSummary<'a> {
    pub fn of(report: &'a snapfs::restore::Report, seconds: f64) -> RestoreSummary<'a> {
        RestoreSummary {
            files: report.files,
            dirs: report.dirs,
            symlinks: report.symlinks,
            hard_links: report.hard_links,
            specials: report.specials,
            bytes: report.bytes,
            seconds: (seconds * 1000.0).round() / 1000.0,
            errors: &report.errors,
        }
    }
}

/// What `verify --json` found.
#[derive(Serialize)]
pub struct VerifyReport<'a> {
    clean: bool,
    snapshots: u64,
    local_blocks: u64,
    stored_blocks: u64,
    trees: u64,
    hashed_blocks: u64,
    findings: Vec<Finding<'a>>,
    notes: &'a [String],
    repaired: &'a [String],
}

#[derive(Serialize)]
struct Finding<'a> {
    problem: &'a str,
    count: u64,
    examples: &'a [String],
}

impl<'a> VerifyReport<'a> {
    pub fn of(report: &'a snapfs::verify::Report) -> VerifyReport<'a> {
        let c = &report.counts;
        VerifyReport {
            clean: report.is_clean(),
            snapshots: c.snapshots,
            local_blocks: c.local_blocks,
            stored_blocks: c.stored_blocks,
            trees: c.trees,
            hashed_blocks: c.hashed_blocks,
            findings: report
                .findings
                .iter()
                .map(|f| Finding {
                    problem: &f.problem,
                    count: f.count,
                    examples: &f.examples,
                })
                .collect(),
            notes: &report.notes,
            repaired: &report.repaired,
        }
    }
}
