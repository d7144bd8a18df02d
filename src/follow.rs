//! Read-only mounts that follow a store another machine's volume uploads to
//! (`snapfs mount --read-only --store URL`): each completed snapshot in the store becomes a
//! snapshot here, and the live tree shows the latest one. Blocks are fetched on first read.
//! The store is never written. The store is opened once, by the daemon, and read on the
//! daemon's runtime.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use crate::catalog::Setting;
use crate::manifest::SnapshotManifest;
use crate::store::{StoreChain, StoreSource, StoreUrl};
use crate::sync::{Condvar, Mutex};
use crate::volume::Volume;

/// Checks that `volume` may follow `url` (a new data dir, or one that already follows it).
pub fn claim(volume: &Volume, url: &StoreUrl) -> Result<(), String> {
    match volume
        .setting(Setting::Follows)
        .map_err(|e| e.to_string())?
    {
        Some(followed) if followed == url.to_string() => Ok(()),
        Some(followed) => Err(format!("this data dir follows {followed}, not {url}")),
        None if volume.is_new().map_err(|e| e.to_string())?
            && volume
                .setting(Setting::Store)
                .map_err(|e| e.to_string())?
                .is_none() =>
        {
            volume
                .set_setting(Setting::Follows, &url.to_string())
                .map_err(|e| e.to_string())
        }
        None => Err(
            "this data dir holds a volume of its own: --read-only needs a new data dir (--data)"
                .into(),
        ),
    }
}

/// Makes this volume's snapshots those completed in the store and its live tree the
/// newest of them. A snapshot here is the one in the store created at the same moment
/// (pinned with its creation time): one renamed there is renamed here, one deleted there
/// is deleted here (`forget` is told each name that went away: the kernel caches names),
/// its lock is the one there, and each one not here yet is imported, oldest first,
/// wherever it falls in the series: a checkpoint promoted there after newer snapshots, a
/// snapshot taken out of the recycle bin there, one whose name was taken here when it was
/// listed. `stores` is the followed store (its origin's is added the first time the
/// listing names one). Returns how many were imported.
pub fn follow_once(
    volume: &Volume,
    stores: &mut StoreChain,
    forget: &dyn Fn(&[u8]),
) -> Result<usize, String> {
    let mut listing = stores.list().map_err(|e| e.to_string())?;
    // A snapshot in the other volume's recycle bin is deleted as far as a follower goes.
    listing.snapshots.retain(|m| m.trash.is_none());
    listing.snapshots.sort_by_key(|m| m.generation);
    for damaged in &listing.damaged {
        tracing::warn!(url = %stores.url(), "{damaged}");
    }
    stores
        .set_origin(listing.origin.as_ref())
        .map_err(|e| e.to_string())?;
    mirror_renames_and_deletions(volume, &listing.snapshots, forget)?;

    let here: HashSet<i64> = volume.list_snapshots().iter().map(|s| s.created).collect();
    let mut shown = volume
        .setting(Setting::FollowedId)
        .map_err(|e| e.to_string())?
        .and_then(|id| id.parse::<u64>().ok());
    let new: Vec<&SnapshotManifest> = listing
        .snapshots
        .iter()
        .filter(|m| !here.contains(&m.created))
        .collect();
    let newest = listing.snapshots.last();
    let live_tree_stale = match newest {
        Some(newest) => shown != Some(newest.id),
        // With none left there, the live tree is empty (their blocks may be gone).
        None => shown.is_some() || !volume.live_tree_is_empty().map_err(|e| e.to_string())?,
    };
    if new.is_empty() && !live_tree_stale {
        return Ok(0);
    }
    // What is new there is in packs added since the indexes here were read.
    stores.store_changed();
    volume.origin_changed();
    let mut imported = 0;
    for manifest in new {
        // A snapshot is pinned from the live tree: it shows this one for the moment.
        show(volume, stores, manifest)?;
        shown = Some(manifest.id);
        let name = &manifest.name;
        let pinned = volume.pin_followed_snapshot(
            name,
            manifest.created,
            &manifest.tags,
            manifest.lock.as_ref(),
        );
        match pinned {
            Ok(()) => imported += 1,
            Err(e) => {
                tracing::warn!(name = %String::from_utf8_lossy(name), error = %e, "snapshot not followed")
            }
        }
    }
    // The live tree shows the newest snapshot, also when the one it showed was deleted
    // there (whose blocks that store may no longer hold).
    match newest {
        Some(newest) if shown != Some(newest.id) => show(volume, stores, newest)?,
        Some(_) => {}
        None => show_nothing(volume)?,
    }
    Ok(imported)
}

/// Empties the live tree: the store has no snapshot left to show.
fn show_nothing(volume: &Volume) -> Result<(), String> {
    let written = volume.sync_to_empty(true).map_err(|e| e.to_string())?;
    volume
        .set_setting(Setting::FollowedId, "")
        .map_err(|e| e.to_string())?;
    tracing::info!(
        entries_written = written,
        "live tree emptied: the store has no snapshot left"
    );
    Ok(())
}

/// Makes the live tree that of `manifest`, and records that it shows it.
fn show(volume: &Volume, stores: &StoreChain, manifest: &SnapshotManifest) -> Result<(), String> {
    let source = StoreSource::new(stores.clone(), manifest.clone());
    let written = volume.sync_to(&source, true).map_err(|e| e.to_string())?;
    volume
        .set_setting(Setting::FollowedId, &manifest.id.to_string())
        .map_err(|e| e.to_string())?;
    tracing::info!(snapshot = %String::from_utf8_lossy(&manifest.name), entries_written = written, "live tree synced to the snapshot");
    Ok(())
}

/// Renames and deletes this volume's snapshots as the store's `listed` ones were, and
/// mirrors their locks.
fn mirror_renames_and_deletions(
    volume: &Volume,
    listed: &[SnapshotManifest],
    forget: &dyn Fn(&[u8]),
) -> Result<(), String> {
    let by_created: HashMap<i64, &SnapshotManifest> =
        listed.iter().map(|m| (m.created, m)).collect();
    for local in volume.list_snapshots() {
        let found = by_created.get(&local.created);
        if let Some(m) = found
            && let Err(e) = volume.mirror_snapshot_lock(&local.name, m.lock.as_ref())
        {
            tracing::warn!(name = %String::from_utf8_lossy(&local.name), error = %e, "snapshot lock not followed");
        }
        match found.map(|m| m.name.as_slice()) {
            Some(name) if name == local.name.as_slice() => continue,
            Some(name) => {
                if let Err(e) = volume.rename_snapshot(&local.name, name) {
                    tracing::warn!(name = %String::from_utf8_lossy(name), error = %e, "snapshot rename not followed");
                    continue;
                }
            }
            None => {
                // Its lock here only mirrored the store's, which let it go.
                volume
                    .mirror_snapshot_lock(&local.name, None)
                    .and_then(|()| volume.delete_snapshot(&local.name))
                    .map_err(|e| e.to_string())?
            }
        }
        forget(&local.name);
    }
    Ok(())
}

/// Called with the name of each snapshot deleted in the store.
pub type Forget = Box<dyn Fn(&[u8]) + Send>;

/// A thread that calls `follow_once` every `interval` until stopped.
pub struct Follower {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: std::thread::JoinHandle<()>,
}

impl Follower {
    pub fn start(
        volume: Arc<Volume>,
        mut stores: StoreChain,
        interval: Duration,
        forget: Forget,
    ) -> std::io::Result<Follower> {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name("follower".into())
            .spawn(move || {
                let (flag, wake) = &*stopping;
                let mut stopped = crate::sync::lock(flag);
                while !*stopped {
                    stopped = crate::sync::wait_timeout(wake, stopped, interval);
                    if *stopped {
                        break;
                    }
                    drop(stopped);
                    match follow_once(&volume, &mut stores, &*forget) {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(imported = n, "followed new snapshots"),
                        Err(e) => {
                            tracing::warn!(error = %e, "following the store failed; retrying")
                        }
                    }
                    stopped = crate::sync::lock(flag);
                }
            })?;
        Ok(Follower { stop, thread })
    }

    pub fn stop(self) {
        let (flag, wake) = &*self.stop;
        *crate::sync::lock(flag) = true;
        wake.notify_all();
        if self.thread.join().is_err() {
            tracing::error!("the follower thread panicked");
        }
    }
}
