//! `snapfs verify`: checks that a volume is whole and that its store can restore every
//! completed snapshot, and repairs what a good copy elsewhere allows.
//!
//! A volume's check covers the catalog (SQLite's integrity check and snapfs's invariants),
//! the local block files, and the store: every object the catalog records as stored, and
//! every object the store's own manifests name. A store's check needs nothing but the
//! bucket. `deep` reads every block, local and stored, and hashes it.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::runtime::Runtime;
use tokio::task::JoinSet;

use crate::blocks::{BlockError, BlockHash, BlockStore};
use crate::catalog::{
    self, BlockLocation, BlockRecord, Catalog, Finding, PackRecord, PackRow, Setting, SnapshotState,
};
use crate::manifest::{self, Content, PackId, PackListing};
use crate::restore::Progress;
use crate::store::{
    self, BlockPlace, IndexedStore, Listing, ObjectKey, ObjectStore, PackIndex, ReadError, Retries,
    StoreError, StoreUrl,
};

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Catalog(#[from] catalog::Error),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error(transparent)]
    Volume(#[from] crate::volume::Error),
    #[error(transparent)]
    Block(#[from] BlockError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("data dir {0} is in use by a mount: unmount it before --repair")]
    InUse(PathBuf),
}

type Result<T, E = VerifyError> = std::result::Result<T, E>;

#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    /// Read and hash every block (downloading the store's).
    pub deep: bool,
    /// Upload blocks the store lacks or holds damaged from good local copies, fetch local
    /// blocks that are missing or damaged from the store, rebuild lost or damaged index
    /// objects from the packs, delete block files nothing references; then check again.
    pub repair: bool,
}

/// What a check found. `findings` are problems (the exit status is non-zero); `notes`
/// are harmless (left-overs that a mount or `--repair` cleans up).
#[derive(Debug, Default)]
pub struct Report {
    pub findings: Vec<Finding>,
    pub notes: Vec<String>,
    /// What `repair` did, before the second check whose findings these are.
    pub repaired: Vec<String>,
    pub counts: Counts,
    /// Blocks the volume's store lacks or holds damaged.
    store_gaps: HashSet<BlockHash>,
    /// Blocks whose local file is missing or damaged.
    local_gaps: HashSet<BlockHash>,
    /// Packs of the volume's store that no index object lists as the catalog does.
    reindex: HashSet<PackId>,
    /// Index objects of the volume's store that are damaged or list a pack wrongly:
    /// every pack they list gets a new index, and they go.
    bad_indexes: HashSet<String>,
    /// Block files no catalog row names (written before a crash could commit them).
    orphans: Vec<PathBuf>,
    /// Blocks downloaded and hashed already.
    downloaded: HashSet<BlockHash>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub snapshots: u64,
    /// Block files checked on the local disk.
    pub local_blocks: u64,
    /// Block objects checked in the stores.
    pub stored_blocks: u64,
    pub trees: u64,
    /// Blocks read and hashed (`deep`).
    pub hashed_blocks: u64,
}

/// Store requests in flight at once.
const CONCURRENCY: usize = 32;
/// Largest block accepted from a store whose block size is not known.
const MAX_BLOCK: usize = 1 << 20;

impl Report {
    pub fn is_clean(&self) -> bool {
        self.findings.is_empty()
    }

    fn problem(&mut self, problem: impl Into<String>, examples: Vec<String>) {
        if examples.is_empty() {
            return;
        }
        self.findings.push(Finding {
            problem: problem.into(),
            count: examples.len() as u64,
            examples: examples.into_iter().take(10).collect(),
        });
    }
}

/// Checks the volume in `data_dir` and its store; with `repair`, fixes what it can and
/// checks again. Progress counts blocks (`deep`).
pub fn verify_volume(data_dir: &Path, options: Options, progress: &dyn Progress) -> Result<Report> {
    // Holding the lock keeps a mount from starting meanwhile. Without it (a mount is
    // running) blocks are written and freed under us: absences are checked twice, and
    // block files are not called orphans.
    if !data_dir.join("catalog.db").exists() {
        return Err(catalog::Error::NoVolume(data_dir.to_owned()).into());
    }
    let lock = crate::volume::try_lock_data_dir(data_dir)?;
    if lock.is_none() && options.repair {
        return Err(VerifyError::InUse(data_dir.to_owned()));
    }
    let runtime = runtime()?;
    let first = check_volume(&runtime, data_dir, options, lock.is_some(), progress)?;
    if !options.repair || (first.is_clean() && first.orphans.is_empty()) {
        return Ok(first);
    }
    let repaired = repair(&runtime, data_dir, &first)?;
    let mut second = check_volume(&runtime, data_dir, options, true, progress)?;
    second.repaired = repaired;
    Ok(second)
}

/// Checks the store at `url` alone: every completed snapshot's manifest and trees read
/// back and every block they name is present (and, `deep`, intact).
pub fn verify_store(url: &StoreUrl, options: Options, progress: &dyn Progress) -> Result<Report> {
    let mut report = Report::default();
    runtime()?.block_on(async {
        let own = store::open(url).await?;
        let listing = store::list_manifests(&*own).await?;
        let stores = Stores::list(own, listing.origin.as_ref()).await?;
        stores
            .check_manifests(listing, options.deep, &mut report, progress)
            .await
    })?;
    Ok(report)
}

fn check_volume(
    runtime: &Runtime,
    data_dir: &Path,
    options: Options,
    locked: bool,
    progress: &dyn Progress,
) -> Result<Report> {
    let mut report = Report::default();
    let damaged = |report: &mut Report, e: &dyn std::fmt::Display| {
        report.problem("the catalog cannot be read whole", vec![e.to_string()]);
    };
    let catalog = match Catalog::open_data_dir_read_only(data_dir) {
        // A damaged database file: that is the finding, and nothing else can be checked.
        Err(
            e @ (catalog::Error::Sqlite(_)
            | catalog::Error::Corrupt(_)
            | catalog::Error::NotACatalog { .. }),
        ) => {
            damaged(&mut report, &e);
            return Ok(report);
        }
        opened => opened?,
    };
    let read = catalog.read(|tx| {
        let damage = tx.integrity_check()?;
        let packs = tx.pack_records()?;
        report.problem("the catalog fails SQLite's integrity check", damage);
        report
            .findings
            .extend(tx.invariant_findings(u64::from(catalog.block_size()))?);
        let urls = (tx.setting(Setting::Store)?, tx.setting(Setting::Origin)?);
        Ok::<_, VerifyError>((
            tx.block_records()?,
            packs,
            tx.completed_trees()?,
            tx.snapshots()?,
            urls,
        ))
    });
    let (records, packs, completed_trees, snapshots, urls) = match read {
        Ok(read) => read,
        Err(VerifyError::Catalog(e)) => {
            damaged(&mut report, &e);
            return Ok(report);
        }
        Err(e) => return Err(e),
    };
    report.counts.snapshots = snapshots.len() as u64;
    let still_referenced =
        |hash: &BlockHash| locked || catalog.read(|tx| tx.block_referenced(hash)).unwrap_or(true);
    let still_packed =
        |hash: &BlockHash| locked || catalog.read(|tx| tx.tree_packed(hash)).unwrap_or(true);

    let blocks_dir = data_dir.join("blocks");
    let blocks = BlockStore::open_read_only(&blocks_dir);
    let inline = |hash: &BlockHash| catalog.read(|tx| tx.inline_block(hash)).ok().flatten();
    check_local_blocks(
        &blocks,
        &inline,
        &records,
        options.deep,
        &mut report,
        progress,
    );
    report.local_gaps.retain(|hash| still_referenced(hash));
    let gaps: Vec<String> = report.local_gaps.iter().map(|h| h.to_hex()).collect();
    report.problem(
        format!("blocks missing or damaged in {}", blocks_dir.display()),
        gaps,
    );
    if locked {
        let known = records.iter().map(|r| r.hash).collect();
        report.orphans = blocks.strays(&known)?;
        if !report.orphans.is_empty() {
            report.notes.push(format!(
                "{} block files in {} belong to nothing (written before a crash could \
                 record them): --repair deletes them",
                report.orphans.len(),
                blocks_dir.display()
            ));
        }
    }

    let (url, origin) = store_urls(data_dir, urls)?;
    runtime.block_on(async {
        let stores = Stores::list(store::open(&url).await?, origin.as_ref()).await?;
        let missing_manifests = snapshots
            .iter()
            .filter(|s| s.state == SnapshotState::Completed)
            .filter(|s| !stores.has(&ObjectKey::snapshot(s.id)))
            .map(|s| String::from_utf8_lossy(&s.name).into_owned())
            .collect();
        report.problem(
            format!("completed snapshots whose manifest is missing from {url}"),
            missing_manifests,
        );
        report.counts.trees = completed_trees.len() as u64;
        let missing_trees = completed_trees
            .iter()
            .filter(|(hash, _)| !stores.own.has_tree(hash))
            .map(|(hash, _)| format!("tree {hash}"))
            .collect();
        report.problem(
            format!("trees of completed snapshots missing from {url}"),
            missing_trees,
        );
        let recorded: Vec<(BlockHash, bool, Option<BlockPlace>)> = records
            .iter()
            .filter(|r| r.stored.is_stored())
            .map(|r| (r.hash, r.stored == BlockLocation::Origin, r.place))
            .collect();
        stores
            .check_blocks(&recorded, options.deep, &mut report, progress)
            .await;
        let packed_blocks: Vec<(BlockHash, BlockPlace)> = records
            .iter()
            .filter(|r| r.stored == BlockLocation::Store)
            .filter_map(|r| Some((r.hash, r.place?)))
            .collect();
        stores.check_index_reach(
            "blocks",
            &packed_blocks,
            &packs,
            &still_referenced,
            &mut report,
        );
        let packed_trees: Vec<(BlockHash, BlockPlace)> = completed_trees
            .iter()
            .filter_map(|(hash, place)| Some((*hash, (*place)?)))
            .collect();
        stores.check_index_reach("trees", &packed_trees, &packs, &still_packed, &mut report);
        stores.check_index_lengths(&packs, &mut report);
        // The store's view of the snapshots the catalog has completed: deleted ones may
        // linger in the store, half deleted, until the next mount finishes the job.
        let completed: HashSet<u64> = snapshots
            .iter()
            .filter(|s| s.state == SnapshotState::Completed)
            .map(|s| s.id)
            .collect();
        if completed.is_empty() {
            return Ok(());
        }
        let mut listing = store::list_manifests(&*stores.own.store).await?;
        let stale = listing.snapshots.len();
        listing.snapshots.retain(|m| completed.contains(&m.id));
        let stale = stale - listing.snapshots.len();
        if stale > 0 {
            report.notes.push(format!(
                "{stale} deleted snapshots are still in {url}: the next mount deletes them"
            ));
        }
        stores
            .check_manifests(listing, options.deep, &mut report, progress)
            .await
    })?;
    Ok(report)
}

/// Checks every local block file: present with its length, and (`deep`) its hash.
/// `inline` reads a small block's bytes from the catalog.
fn check_local_blocks(
    blocks: &BlockStore,
    inline: &dyn Fn(&BlockHash) -> Option<Vec<u8>>,
    records: &[BlockRecord],
    deep: bool,
    report: &mut Report,
    progress: &dyn Progress,
) {
    let local: Vec<&BlockRecord> = records.iter().filter(|r| r.local).collect();
    if deep {
        progress.total(local.len() as u64);
    }
    for record in local {
        report.counts.local_blocks += 1;
        let intact = if deep {
            report.counts.hashed_blocks += 1;
            progress.advance(1);
            let inline = record.inline.then(|| inline(&record.hash)).flatten();
            blocks
                .read_uncached(&record.hash, inline)
                .is_ok_and(|data| data.len() == record.len as usize)
        } else if record.inline {
            // In the catalog, whose integrity is checked above; --deep hashes it.
            true
        } else {
            blocks.len_of(&record.hash) == Some(u64::from(record.len))
        };
        if !intact {
            report.local_gaps.insert(record.hash);
        }
    }
}

/// Fixes what `report` found that a good copy elsewhere allows; returns what it did.
fn repair(runtime: &Runtime, data_dir: &Path, report: &Report) -> Result<Vec<String>> {
    let mut done = Vec::new();
    for orphan in &report.orphans {
        fs::remove_file(orphan).map_err(|source| VerifyError::Io {
            path: orphan.clone(),
            source,
        })?;
    }
    if !report.orphans.is_empty() {
        done.push(format!(
            "deleted {} unreferenced block files",
            report.orphans.len()
        ));
    }
    if report.store_gaps.is_empty()
        && report.local_gaps.is_empty()
        && report.reindex.is_empty()
        && report.bad_indexes.is_empty()
    {
        return Ok(done);
    }
    let catalog = Catalog::open_data_dir_read_only(data_dir)?;
    let urls = catalog.read(|tx| {
        Ok::<_, catalog::Error>((tx.setting(Setting::Store)?, tx.setting(Setting::Origin)?))
    })?;
    let (url, origin) = store_urls(data_dir, urls)?;
    let block_size = catalog.block_size() as usize;
    let blocks = BlockStore::open(&data_dir.join("blocks"), 1)?;
    let mut writer = Catalog::open(&data_dir.join("catalog.db"), 0, 0, (0, 0))?;
    runtime.block_on(async {
        let own = store::open(&url).await?;
        let mut uploaded = 0;
        for hash in &report.store_gaps {
            if report.local_gaps.contains(hash) {
                continue;
            }
            let inline = catalog.read(|tx| tx.inline_block(hash))?;
            let Ok(data) = blocks.read_uncached(hash, inline) else {
                continue;
            };
            // An object of its own (which every reader looks for after the packs), in
            // place of the copy in a lost or damaged pack.
            let key = ObjectKey::block(hash);
            let object = manifest::compress(&data, 3).map_err(|source| VerifyError::Io {
                path: PathBuf::from(key.as_str()),
                source,
            })?;
            let object = bytes::Bytes::from(object);
            store::retry(Retries::Attempts(5), || own.put(&key, object.clone())).await?;
            writer.write_now(|tx| tx.set_block_unpacked(hash))?;
            uploaded += 1;
        }
        if uploaded > 0 {
            done.push(format!(
                "uploaded {uploaded} blocks to {url} from local copies"
            ));
        }
        rebuild_indexes(&*own, &mut writer, report, &mut done).await?;
        let mut sources = vec![IndexedStore::new(own)];
        if let Some(origin) = &origin {
            sources.push(IndexedStore::new(store::open(origin).await?));
        }
        let mut fetched = 0;
        let mut rewrite = |hash: &BlockHash, data: Vec<u8>| -> Result<()> {
            blocks.remove(hash)?;
            blocks.put(hash, &data)?;
            fetched += 1;
            Ok(())
        };
        let mut missed = Vec::new();
        for hash in &report.local_gaps {
            // Where the catalog recorded it first: a pack no index lists yet included.
            let recorded = match catalog.read(|tx| tx.block_place(hash))? {
                Some(place) => store::fetch_block(&*sources[0].store, hash, place, block_size)
                    .await
                    .ok()
                    .flatten(),
                None => None,
            };
            let found = match recorded {
                Some(data) => Some(data),
                None => found_in(&sources, hash, block_size).await,
            };
            match found {
                Some(data) => rewrite(hash, data)?,
                None => missed.push(hash),
            }
        }
        if !missed.is_empty() {
            // The misses may be in packs written since the indexes were read (the origin's
            // writer repacks): every index is read once more, for all of them together.
            sources.iter().for_each(IndexedStore::store_changed);
            for hash in missed {
                if let Some(data) = found_in(&sources, hash, block_size).await {
                    rewrite(hash, data)?;
                }
            }
        }
        if fetched > 0 {
            done.push(format!("rewrote {fetched} local blocks from the store"));
        }
        Ok::<_, VerifyError>(())
    })?;
    blocks.sync()?;
    Ok(done)
}

/// Block `hash` from the first of `sources` that holds it whole. A miss does not wait
/// for an index's turn (`IndexedStore::block_without_waiting`): `repair` looks again for
/// all its misses together.
async fn found_in(sources: &[IndexedStore], hash: &BlockHash, max: usize) -> Option<Vec<u8>> {
    for source in sources {
        if let Ok(Some(data)) = source.block_without_waiting(hash, max).await {
            return Some(data);
        }
    }
    None
}

/// Writes new index objects for the packs `report` found no index lists right and for
/// every pack a bad index object lists, from each pack's own listing (the catalog's if
/// that cannot be read), keeping the blocks the catalog records there; then deletes the
/// bad index objects nothing names any more. Adds what it did to `done`.
///
/// Each new name is queued for deletion before its PUT and recorded after it, so a crash
/// between the two leaves an object the next mount deletes.
async fn rebuild_indexes(
    own: &dyn ObjectStore,
    writer: &mut Catalog,
    report: &Report,
    done: &mut Vec<String>,
) -> Result<()> {
    if report.reindex.is_empty() && report.bad_indexes.is_empty() {
        return Ok(());
    }
    let bad: BTreeSet<PackId> = report
        .bad_indexes
        .iter()
        .filter_map(|key| PackId::parse(key.strip_prefix(ObjectKey::INDEX)?))
        .collect();
    let recorded = writer.read(|tx| tx.pack_records())?;
    let mut wanted: BTreeSet<PackId> = report.reindex.iter().copied().collect();
    wanted.extend(
        recorded
            .iter()
            .filter(|(_, record)| record.indexed.is_some_and(|index| bad.contains(&index)))
            .map(|(pack, _)| *pack),
    );
    let mut listings: Vec<(PackRow, PackListing)> = Vec::new();
    let mut from_catalog = 0;
    for pack in wanted {
        let Some((row, catalog_listing)) = writer.read(|tx| tx.landed_pack(&pack))? else {
            continue;
        };
        let key = ObjectKey::pack(&pack);
        let own_listing =
            store::fetch_verified(own, &key, |object| store::read_listing(own, &key, &object))
                .await?;
        let listing = match own_listing {
            // Lost with its blocks: those are reported (and uploaded again) as missing.
            None => continue,
            Some(Ok(listing)) => PackListing {
                blocks: listing
                    .blocks
                    .into_iter()
                    .filter(|block| catalog_listing.blocks.contains(block))
                    .collect(),
                ..listing
            },
            Some(Err(problem)) => {
                tracing::warn!("{key}: its own listing cannot be read ({problem})");
                from_catalog += 1;
                catalog_listing
            }
        };
        listings.push((row, listing));
    }
    let mut written = 0;
    for chunk in listings.chunks(store::PACKS_PER_INDEX) {
        let packs: Vec<(PackId, PackListing)> = chunk
            .iter()
            .map(|(row, listing)| (row.id, listing.clone()))
            .collect();
        let (index, object) = store::index_object(&packs, 3)?;
        // Queued first: a crash before `reindex` leaves a name to delete.
        writer.write_now(|tx| tx.begin_index(&index))?;
        let key = ObjectKey::index(&index);
        let object = bytes::Bytes::from(object);
        store::retry(Retries::Attempts(5), || own.put(&key, object.clone())).await?;
        let rows: Vec<PackRow> = chunk.iter().map(|(row, _)| *row).collect();
        writer.write_now(|tx| tx.reindex(&index, &rows))?;
        written += 1;
    }
    if written > 0 {
        let fallback = if from_catalog > 0 {
            format!(" ({from_catalog} from the catalog's record: their own listing is unreadable)")
        } else {
            String::new()
        };
        done.push(format!(
            "rebuilt {written} index objects listing {} packs{fallback}",
            listings.len()
        ));
    }
    // The bad ones the store holds; others `reindex` left unused are queued.
    let mut deleted = 0;
    for index in bad {
        let key = ObjectKey::index(&index);
        if writer.read(|tx| tx.object_needed(&key))? {
            continue;
        }
        store::retry(Retries::Attempts(5), || own.delete(&key)).await?;
        writer.write_now(|tx| tx.forget_deletion(&key))?;
        deleted += 1;
    }
    if deleted > 0 {
        done.push(format!("deleted {deleted} index objects nothing needs"));
    }
    Ok(())
}

/// A store, with the keys it holds and its index of packs.
struct ListedStore {
    store: Arc<dyn ObjectStore>,
    keys: HashSet<String>,
    index: Arc<PackIndex>,
}

impl ListedStore {
    /// Lists `store`'s keys under `prefixes` (and its packs) and reads its index.
    async fn list(store: Arc<dyn ObjectStore>, prefixes: &[&str]) -> Result<ListedStore> {
        let mut keys = HashSet::new();
        for prefix in prefixes.iter().chain(&[ObjectKey::PACKS]) {
            keys.extend(store::retry(Retries::Attempts(5), || store.list(prefix)).await?);
        }
        let index = Arc::new(PackIndex::load(&*store).await?);
        Ok(ListedStore { store, keys, index })
    }

    /// Whether the store holds `key`.
    fn has(&self, key: &str) -> bool {
        self.keys.contains(&self.store.object_name(key))
    }

    /// Whether the store holds block `hash` at `place`.
    fn has_at(&self, hash: &BlockHash, place: BlockPlace) -> bool {
        match place {
            BlockPlace::Object => self.has(&ObjectKey::block(hash)),
            BlockPlace::Packed { pack, .. } => self.has(&ObjectKey::pack(&pack)),
        }
    }

    /// Whether a reader with only this store finds tree `hash`: in a pack its index
    /// places it in, or as an object of its own.
    fn has_tree(&self, hash: &BlockHash) -> bool {
        self.index
            .places(hash)
            .iter()
            .any(|place| matches!(place, BlockPlace::Packed { .. }) && self.has_at(hash, *place))
            || self.has(&ObjectKey::tree(hash))
    }

    /// Where a reader with only this store finds block `hash`, in the order it looks:
    /// the packs its index places it in, then its own object; only places that exist.
    fn places_of(&self, hash: &BlockHash) -> Vec<BlockPlace> {
        self.index
            .places(hash)
            .iter()
            .copied()
            .chain([BlockPlace::Object])
            .filter(|place| self.has_at(hash, *place))
            .collect()
    }
}

/// A volume's store (and its origin's), with the keys each holds.
struct Stores {
    own: ListedStore,
    origin: Option<ListedStore>,
}

/// A block to download and hash: from which store, and the places in it to try (one
/// intact copy is enough: readers try them in this order).
type BlockSource = (BlockHash, Arc<dyn ObjectStore>, Vec<BlockPlace>);

impl Stores {
    /// Lists the volume's store `own`, and opens and lists its origin's if it has one.
    async fn list(own: Arc<dyn ObjectStore>, origin: Option<&StoreUrl>) -> Result<Stores> {
        let own = ListedStore::list(
            own,
            &[
                ObjectKey::BLOCKS,
                ObjectKey::TREES,
                ObjectKey::SNAPSHOTS,
                ObjectKey::INDEX,
            ],
        )
        .await?;
        let origin = match origin {
            Some(url) => {
                Some(ListedStore::list(store::open(url).await?, &[ObjectKey::BLOCKS]).await?)
            }
            None => None,
        };
        Ok(Stores { own, origin })
    }

    /// Whether the volume's store holds `key`.
    fn has(&self, key: &str) -> bool {
        self.own.has(key)
    }

    /// Where block `hash` is: the volume's own store, else its origin's.
    fn holder(&self, hash: &BlockHash) -> Option<BlockSource> {
        std::iter::once(&self.own)
            .chain(&self.origin)
            .find_map(|listed| {
                let places = listed.places_of(hash);
                (!places.is_empty()).then(|| (*hash, listed.store.clone(), places))
            })
    }

    /// Index objects that cannot be read.
    fn damaged_indexes(&self) -> Vec<String> {
        std::iter::once(&self.own)
            .chain(&self.origin)
            .flat_map(|listed| listed.index.damaged.iter())
            .map(|(key, problem)| format!("{key}: {problem}"))
            .collect()
    }

    /// Checks that a reader with nothing but the bucket finds every block or tree
    /// (`what`) the catalog places in a pack of the volume's store (`frames`, `packs`)
    /// where the catalog says: an index object lists it there. Packs no index lists yet
    /// (an upload under way) and packs missing from the store (reported with what they
    /// hold) are passed over, as are frames a running mount freed meanwhile (`live`).
    fn check_index_reach(
        &self,
        what: &str,
        frames: &[(BlockHash, BlockPlace)],
        packs: &HashMap<PackId, PackRecord>,
        live: &dyn Fn(&BlockHash) -> bool,
        report: &mut Report,
    ) {
        let own = &self.own;
        let mut unreachable = Vec::new();
        for &(hash, place) in frames {
            let BlockPlace::Packed { pack, .. } = place else {
                continue;
            };
            let Some(index) = self.indexed(packs, &pack) else {
                continue;
            };
            if !own.index.places(&hash).contains(&place) && live(&hash) {
                report.reindex.insert(pack);
                // One that is there lists the pack wrongly; a lost one needs no deletion.
                let key = ObjectKey::index(&index);
                if own.has(&key) {
                    report.bad_indexes.insert(key.into());
                }
                unreachable.push(format!(
                    "{} in {} (the catalog says {} lists it)",
                    hash.to_hex(),
                    ObjectKey::pack(&pack),
                    ObjectKey::index(&index)
                ));
            }
        }
        report.problem(
            format!("{what} no index object in {} leads to", own.store.url()),
            unreachable,
        );
    }

    /// The index object the catalog says lists `pack`, if the store has the pack.
    fn indexed(&self, packs: &HashMap<PackId, PackRecord>, pack: &PackId) -> Option<PackId> {
        packs
            .get(pack)
            .and_then(|record| record.indexed)
            .filter(|_| self.own.has(&ObjectKey::pack(pack)))
    }

    /// Checks that every index object gives each pack it lists the data length the
    /// catalog recorded, and marks unreadable index objects for rebuilding.
    fn check_index_lengths(&self, packs: &HashMap<PackId, PackRecord>, report: &mut Report) {
        let own = &self.own;
        let mut wrong = Vec::new();
        for (pack, record) in packs {
            if self.indexed(packs, pack).is_none() {
                continue;
            }
            for (key, data_length) in own.index.packs.get(pack).into_iter().flatten() {
                if *data_length != record.data_length {
                    report.reindex.insert(*pack);
                    report.bad_indexes.insert(key.clone());
                    wrong.push(format!(
                        "{} in {key}: its frames end at {data_length} there, at {} in the \
                         catalog",
                        ObjectKey::pack(pack),
                        record.data_length
                    ));
                }
            }
        }
        report.problem(
            "index objects that give a pack another length than the catalog",
            wrong,
        );
        report
            .bad_indexes
            .extend(own.index.damaged.iter().map(|(key, _)| key.clone()));
    }

    /// Reads the listing of every pack of the volume's store that its index objects
    /// list (one range request from where the index says its frames end) and checks each
    /// entry the index gives for the pack against it. Entries naming a pack the store no
    /// longer has are passed over: deletions leave them (an index object goes with its
    /// last pack) and a reader tries the next place a block has.
    async fn check_index_entries(&self, report: &mut Report) {
        let index = &self.own.index;
        let mut entries: HashMap<PackId, Vec<(BlockHash, u64, u32)>> = HashMap::new();
        for (hash, places) in index.blocks() {
            for place in places {
                if let BlockPlace::Packed {
                    pack,
                    offset,
                    length,
                } = *place
                {
                    entries
                        .entry(pack)
                        .or_default()
                        .push((*hash, offset, length));
                }
            }
        }
        // One read per pack and data length, whichever index objects give it.
        let mut reads: HashMap<(PackId, u64), Vec<String>> = HashMap::new();
        for (pack, listed) in &index.packs {
            if !self.own.has(&ObjectKey::pack(pack)) {
                continue;
            }
            for (key, data_length) in listed {
                reads
                    .entry((*pack, *data_length))
                    .or_default()
                    .push(key.clone());
            }
        }
        let mut wrong = Vec::new();
        let mut pending = JoinSet::new();
        let mut queue = reads.into_iter();
        loop {
            while pending.len() < CONCURRENCY {
                let Some(((pack, data_length), keys)) = queue.next() else {
                    break;
                };
                let store = self.own.store.clone();
                pending.spawn(async move {
                    let key = ObjectKey::pack(&pack);
                    let listing = store::fetch_listing_at(&*store, &key, data_length).await;
                    (pack, keys, listing)
                });
            }
            let Some(done) = pending.join_next().await else {
                break;
            };
            let Ok((pack, mut keys, listing)) = done else {
                continue;
            };
            keys.sort();
            let listed_by = keys.join(", ");
            let problem = match listing {
                Ok(None) => continue,
                Err(e) => {
                    wrong.push(format!("{} ({listed_by}): {e}", ObjectKey::pack(&pack)));
                    continue;
                }
                Ok(Some(Err(problem))) => problem,
                Ok(Some(Ok(listing))) => {
                    let frames: HashSet<(BlockHash, u64, u32)> = listing
                        .blocks
                        .iter()
                        .map(|b| (b.hash, b.offset, b.length))
                        .collect();
                    let strays: Vec<&(BlockHash, u64, u32)> = entries
                        .get(&pack)
                        .into_iter()
                        .flatten()
                        .filter(|entry| !frames.contains(entry))
                        .collect();
                    let Some((hash, offset, length)) = strays.first() else {
                        continue;
                    };
                    // The entries are merged: each index object listing the pack is
                    // suspect.
                    keys = index
                        .packs
                        .get(&pack)
                        .into_iter()
                        .flatten()
                        .map(|(key, _)| key.clone())
                        .collect();
                    format!(
                        "{} entries are not frames it lists, e.g. {} at {offset}, {length} bytes",
                        strays.len(),
                        hash.to_hex()
                    )
                }
            };
            report.reindex.insert(pack);
            report.bad_indexes.extend(keys);
            wrong.push(format!(
                "{} ({listed_by}): {problem}",
                ObjectKey::pack(&pack)
            ));
        }
        report.problem("index entries that do not match their pack", wrong);
    }

    /// Checks that every block in `blocks` (hash, whether it lives in the origin's store,
    /// where the catalog recorded it in the volume's) is where it should be, and (`deep`)
    /// intact.
    async fn check_blocks(
        &self,
        blocks: &[(BlockHash, bool, Option<BlockPlace>)],
        deep: bool,
        report: &mut Report,
        progress: &dyn Progress,
    ) {
        let mut missing = Vec::new();
        let mut missing_in_origin = Vec::new();
        let mut present = Vec::new();
        for &(hash, in_origin, place) in blocks {
            report.counts.stored_blocks += 1;
            let found = if in_origin {
                self.origin
                    .as_ref()
                    .map(|origin| (origin, origin.places_of(&hash)))
                    .filter(|(_, places)| !places.is_empty())
            } else {
                let place = place.unwrap_or(BlockPlace::Object);
                self.own
                    .has_at(&hash, place)
                    .then(|| (&self.own, vec![place]))
            };
            match found {
                Some((listed, places)) => present.push((hash, listed.store.clone(), places)),
                None if in_origin => missing_in_origin.push(ObjectKey::block(&hash).into()),
                None => {
                    report.store_gaps.insert(hash);
                    missing.push(match place {
                        Some(BlockPlace::Packed { pack, .. }) => {
                            format!("{} (in {})", hash.to_hex(), ObjectKey::pack(&pack))
                        }
                        _ => ObjectKey::block(&hash).into(),
                    });
                }
            }
        }
        report.problem(
            format!(
                "blocks recorded as stored that are missing from {}",
                self.own.store.url()
            ),
            missing,
        );
        let origin = self
            .origin
            .as_ref()
            .map_or("its origin's store (none is known)", |origin| {
                origin.store.url()
            });
        report.problem(
            format!("blocks shared with the volume's origin that are missing from {origin}"),
            missing_in_origin,
        );
        if deep {
            self.hash_blocks(present, report, progress).await;
        }
    }

    /// Downloads and hashes `blocks`, each from the store and place given.
    async fn hash_blocks(
        &self,
        blocks: Vec<BlockSource>,
        report: &mut Report,
        progress: &dyn Progress,
    ) {
        progress.total(blocks.len() as u64);
        let mut damaged = Vec::new();
        let mut pending = JoinSet::new();
        let mut queue = blocks.into_iter();
        loop {
            while pending.len() < CONCURRENCY {
                let Some((hash, store, places)) = queue.next() else {
                    break;
                };
                pending.spawn(async move {
                    let mut result = Ok(None);
                    for place in places {
                        result = store::fetch_block(&*store, &hash, place, MAX_BLOCK).await;
                        if matches!(result, Ok(Some(_))) {
                            break;
                        }
                    }
                    let own = store.url().to_owned();
                    (hash, own, result)
                });
            }
            let Some(done) = pending.join_next().await else {
                break;
            };
            progress.advance(1);
            report.counts.hashed_blocks += 1;
            let Ok((hash, url, result)) = done else {
                continue;
            };
            report.downloaded.insert(hash);
            match result {
                Ok(Some(_)) => {}
                Ok(None) => damaged.push(format!("{} vanished from {url}", hash.to_hex())),
                Err(e) => {
                    if url == self.own.store.url() {
                        report.store_gaps.insert(hash);
                    }
                    damaged.push(e.to_string());
                }
            }
        }
        report.problem("block objects that fail verification", damaged);
    }

    /// Reads every completed snapshot's manifest and trees from the store and checks
    /// that the blocks they name are present (and, `deep`, intact).
    async fn check_manifests(
        &self,
        listing: Listing,
        deep: bool,
        report: &mut Report,
        progress: &dyn Progress,
    ) -> Result<()> {
        report.problem("snapshot objects that cannot be read", listing.damaged);
        report.problem("index objects that cannot be read", self.damaged_indexes());
        if deep {
            self.check_index_entries(report).await;
        }
        report.counts.snapshots = report.counts.snapshots.max(listing.snapshots.len() as u64);
        let mut blocks: HashMap<BlockHash, String> = HashMap::new();
        let mut seen_trees = HashSet::new();
        let mut level: Vec<(BlockHash, String)> = Vec::new();
        let mut broken = Vec::new();
        let trees = Arc::new(IndexedStore::with_index(
            self.own.store.clone(),
            self.own.index.clone(),
        ));
        for snapshot in &listing.snapshots {
            let name = String::from_utf8_lossy(&snapshot.name).into_owned();
            match &snapshot.root.content {
                Content::Tree(hash) => level.push((*hash, name)),
                _ => broken.push(format!("snapshot {name}: its root is not a directory")),
            }
        }
        while !level.is_empty() {
            let mut fetches = JoinSet::new();
            let mut next = Vec::new();
            for (hash, snapshot) in level {
                if !seen_trees.insert(hash) {
                    continue;
                }
                let trees = trees.clone();
                fetches.spawn(async move {
                    let result = store::read_tree(&trees, &hash)
                        .await
                        .map_err(|e| e.to_string());
                    (snapshot, result)
                });
                while fetches.len() >= CONCURRENCY {
                    collect_tree(
                        fetches.join_next().await,
                        &mut next,
                        &mut blocks,
                        &mut broken,
                    );
                }
            }
            while let Some(done) = fetches.join_next().await {
                collect_tree(Some(done), &mut next, &mut blocks, &mut broken);
            }
            level = next;
        }
        report.counts.trees = report.counts.trees.max(seen_trees.len() as u64);
        report.problem("manifests that cannot be read back whole", broken);
        let missing = blocks
            .iter()
            .filter(|(hash, _)| self.holder(hash).is_none())
            .map(|(hash, snapshot)| format!("{} (snapshot {snapshot})", ObjectKey::block(hash)))
            .collect();
        report.problem(
            "blocks named by a snapshot's manifest that no store holds",
            missing,
        );
        if deep {
            // Blocks the catalog's check downloaded already are not fetched twice.
            let present = blocks
                .keys()
                .filter(|hash| !report.downloaded.contains(hash))
                .filter_map(|hash| self.holder(hash))
                .collect::<Vec<_>>();
            self.hash_blocks(present, report, progress).await;
        }
        Ok(())
    }
}

type TreeResult = (String, Result<Vec<manifest::Entry>, String>);

/// Adds a fetched tree's subdirectories to `next` and its blocks to `blocks`.
fn collect_tree(
    done: Option<Result<TreeResult, tokio::task::JoinError>>,
    next: &mut Vec<(BlockHash, String)>,
    blocks: &mut HashMap<BlockHash, String>,
    broken: &mut Vec<String>,
) {
    let Some(Ok((snapshot, result))) = done else {
        return;
    };
    match result {
        Err(e) => broken.push(format!("snapshot {snapshot}: {e}")),
        Ok(entries) => {
            for entry in entries {
                match entry.content {
                    Content::Tree(hash) => next.push((hash, snapshot.clone())),
                    Content::Blocks(list) => {
                        for (_, hash) in list {
                            blocks.entry(hash).or_insert_with(|| snapshot.clone());
                        }
                    }
                    Content::None => {}
                }
            }
        }
    }
}

/// The volume's store and its origin's, from the catalog's settings (`store`, `origin`).
fn store_urls(
    data_dir: &Path,
    (store, origin): (Option<String>, Option<String>),
) -> Result<(StoreUrl, Option<StoreUrl>)> {
    let url = match store {
        Some(url) => parse_remembered(&url)?,
        None => StoreUrl::default_for(data_dir),
    };
    Ok((url, origin.as_deref().map(parse_remembered).transpose()?))
}

fn parse_remembered(url: &str) -> Result<StoreUrl> {
    StoreUrl::parse(url).map_err(|e| {
        VerifyError::Catalog(catalog::Error::Corrupt(format!(
            "the remembered store URL: {e}"
        )))
    })
}

/// The runtime one check (and its repair) runs its store requests on.
fn runtime() -> Result<Runtime> {
    store::runtime().map_err(|source| VerifyError::Io {
        path: PathBuf::from("tokio runtime"),
        source,
    })
}
