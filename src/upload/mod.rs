//! The uploader: a background thread owning a tokio runtime that sends each snapshot's new
//! blocks, zstd-compressed, then its manifest, to the object store, oldest snapshot first.
//!
//! Everything it knows is in the catalog (which blocks are stored, each snapshot's state
//! and progress), so a restart resumes where the last run stopped. Store errors that a
//! retry can fix are retried forever with backoff: an outage only delays completion. A
//! snapshot fails only for what retries cannot fix (a block lost locally, access denied).

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;

use crate::blocks::{self, BlockHash, BlockStore};
use crate::catalog::{self, Catalog, Completion, Kind, ObjectFate, PackRow, ROOT_INO, SnapshotRow};
use crate::manifest::{self, Content, Entry, PackId, PackListing, SnapshotManifest};
use crate::metrics;
use crate::store::{
    self, FinishedPack, ObjectKey, ObjectStore, PACKS_PER_INDEX, PackBuilder, Retries, StoreError,
};
use crate::sync::{Mutex, lock};
use crate::volume::{self, Volume};
use gc::GcPolicy;
use pace::Pacer;

#[derive(Clone, Debug)]
pub struct UploadOptions {
    /// Store requests in flight at once.
    pub concurrency: usize,
    /// zstd level of blocks and manifests.
    pub compression_level: i32,
    /// Most compressed bytes per second sent (`None`: no limit).
    pub limit: Option<u64>,
    /// Percent of the time the uploader may work while the mount is serving requests
    /// (100: it never yields); see `pace`.
    pub busy_share: u8,
    /// Bytes of blocks (compressed) per pack.
    pub pack_size: usize,
    /// How garbage collection runs while the uploader is idle.
    pub gc: GcPolicy,
}

impl Default for UploadOptions {
    fn default() -> Self {
        UploadOptions {
            concurrency: 16,
            compression_level: 3,
            limit: None,
            busy_share: DEFAULT_BUSY_SHARE,
            pack_size: DEFAULT_PACK_SIZE,
            gc: GcPolicy::default(),
        }
    }
}

/// The default target size of a pack: restic's default, within what kopia and
/// mountpoint-s3 use; docs/benchmarks.md has the measurements.
pub const DEFAULT_PACK_SIZE: usize = 16 << 20;

/// The uploader's default share of the time while the mount is busy: dbench beside an
/// 8 GiB upload to the default store (docs/benchmarks.md).
pub const DEFAULT_BUSY_SHARE: u8 = 20;

#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error(transparent)]
    Catalog(#[from] catalog::Error),
    #[error(transparent)]
    Volume(#[from] volume::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Blocks packed between looks at the deletion queue (and whether the snapshot is still
/// wanted); deletions found meanwhile wait at most this long.
const BATCH: usize = 256;

/// The largest frame written into a pack, with room for an encrypting store's nonce and
/// tag: a tree larger than this is an object of its own.
const MAX_FRAME: usize = manifest::MAX_PACKED_BLOCK as usize - 1024;
/// Blocks read and compressed at once.
const READ_AT_ONCE: usize = 16;
/// Packs sent at once: each is held in memory until it lands.
const PACKS_IN_FLIGHT: usize = 3;
/// How often the deletion queue is served while a pack is under way.
const DELETE_WHILE_WAITING: Duration = Duration::from_millis(100);

/// What happened to a snapshot the uploader worked on.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Completed,
    Failed(String),
    /// Deleted while it was being uploaded.
    Deleted,
    /// The uploader is stopping (unmount); the upload resumes at the next mount.
    Interrupted,
}

/// What the uploader tells the core: its one way in. Delivered before the uploader goes
/// on, so the core's view is current when `upload_pending` returns.
#[derive(Debug)]
pub enum UploadEvent<'a> {
    /// Snapshot states or upload progress changed in the catalog.
    SnapshotsChanged,
    /// These blocks (hash, length) reached the store: the local disk may now let them go.
    BlocksStored(&'a [(BlockHash, u32)]),
}

/// The core's side of the uploader's events (`Volume` in a mount).
pub trait UploadEvents: Send + Sync {
    fn upload_event(&self, event: UploadEvent<'_>) -> Result<(), volume::Error>;
}

/// The uploader's state; `run` drives it, tests may call `upload_pending` directly.
pub struct Worker {
    /// Where its events go; it calls nothing else of the core.
    core: Arc<dyn UploadEvents>,
    /// Its own connection, for reading: long manifest reads do not hold up the mount.
    catalog: Mutex<Catalog>,
    /// The mount's connection, for writing: its open group of operations holds the write
    /// lock, so a second writer would wait for it; a write here joins it and commits it.
    writer: Arc<Mutex<Catalog>>,
    /// The volume's block files, read (and verified) directly, leaving the mount's read
    /// cache alone.
    blocks: Arc<BlockStore>,
    volume_id: String,
    block_size: u32,
    /// Notified when snapshots change, so the uploader looks for work.
    wake: Arc<Notify>,
    store: Arc<dyn ObjectStore>,
    options: UploadOptions,
    limiter: Option<RateLimit>,
    /// Yields to the mount's requests.
    pacer: Arc<Pacer>,
    /// Set when the mount ends: no new request starts, those in flight land and are
    /// recorded.
    stopping: Arc<AtomicBool>,
}

impl Worker {
    /// A worker for `volume`, which hears from it only through `UploadEvents`.
    pub fn new(
        volume: Arc<Volume>,
        store: Arc<dyn ObjectStore>,
        options: UploadOptions,
    ) -> Result<Worker, UploadError> {
        let catalog = Catalog::open(&volume.catalog_path(), 0, 0, (0, 0))?;
        Ok(Worker {
            catalog: Mutex::new(catalog),
            writer: volume.shared_catalog(),
            blocks: Arc::new(BlockStore::open_read_only(&volume.blocks_dir())),
            volume_id: volume.volume_id()?,
            block_size: volume.block_size() as u32,
            wake: volume.upload_wake(),
            pacer: Arc::new(Pacer::new(
                volume.activity(),
                options.busy_share,
                store.is_local(),
            )),
            core: volume,
            store,
            limiter: options.limit.map(RateLimit::new),
            options: UploadOptions {
                // The limit is kept per object sent: smaller packs keep the rate over
                // short spans too (a quarter second's worth at most).
                pack_size: match options.limit {
                    Some(limit) => options.pack_size.min((limit / 4).max(64 << 10) as usize),
                    None => options.pack_size,
                },
                ..options
            },
            stopping: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Starts no new upload request from now on; `upload_pending` returns soon.
    pub fn stop_sending(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// What a request task needs to put an object, owned so that it outlives `self`.
    fn sender(&self) -> Sender {
        Sender {
            store: self.store.clone(),
            limiter: self.limiter.clone(),
            pacer: self.pacer.clone(),
            stopping: self.stopping.clone(),
        }
    }

    /// Uploads until no snapshot is pending and the deletion queue is empty (or, for the
    /// queue, until its next requests fail). Returns what happened to each snapshot.
    pub async fn upload_pending(&self) -> Result<Vec<(u64, Outcome)>, UploadError> {
        let mut outcomes = Vec::new();
        loop {
            if self.is_stopping() {
                return Ok(outcomes);
            }
            self.abandon_interrupted()?;
            self.retire_while_uploading().await?;
            self.delete_unneeded().await?;
            self.rewrite_stale_manifests().await?;
            let next = lock(&self.catalog).read(|tx| tx.next_pending_snapshot())?;
            let Some(snapshot) = next else {
                // Idle: the store's garbage is collected, a bounded pass at a time,
                // looking for a pending snapshot between passes.
                if self.collect_in_background().await? {
                    continue;
                }
                return Ok(outcomes);
            };
            let id = snapshot.id;
            let outcome = self.upload_snapshot(snapshot).await?;
            match &outcome {
                Outcome::Failed(reason) => {
                    tracing::error!(id, reason = %reason, "snapshot upload failed");
                    metrics::upload_error();
                    lock(&self.writer).write_now(|tx| tx.fail_snapshot(id, reason))?;
                }
                Outcome::Completed => tracing::info!(id, "snapshot completed"),
                Outcome::Deleted => tracing::info!(id, "snapshot deleted during its upload"),
                Outcome::Interrupted => return Ok(outcomes),
            }
            self.core.upload_event(UploadEvent::SnapshotsChanged)?;
            outcomes.push((id, outcome));
        }
    }

    /// Forgets what an upload or a repack cut short left (packs not sent, trees of
    /// manifests never completed). Called when none is under way.
    fn abandon_interrupted(&self) -> Result<(), UploadError> {
        Ok(lock(&self.writer).write_now(|tx| tx.abandon_unsent_packs())?)
    }

    /// One pass of garbage collection under the mount's policy; true if it freed
    /// anything (another pass may free more). A store failure only postpones it.
    async fn collect_in_background(&self) -> Result<bool, UploadError> {
        if self.is_stopping() {
            return Ok(false);
        }
        match self.collect_garbage(&self.options.gc).await {
            Ok(report) => Ok(report.deleted_packs + report.repacked_packs > 0),
            // A request given up at the stop: the next mount's pass goes on.
            Err(UploadError::Store(_)) if self.is_stopping() => Ok(false),
            Err(UploadError::Store(e)) => {
                tracing::warn!(error = %e, "garbage collection failed; will retry");
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    async fn upload_snapshot(&self, snapshot: SnapshotRow) -> Result<Outcome, UploadError> {
        self.pacer.begin_job();
        let (id, g) = (snapshot.id, snapshot.generation);
        let (mut base, set) = lock(&self.catalog).read(|tx| {
            let base = tx.upload_base(g)?;
            Ok::<_, catalog::Error>((base, tx.upload_set(base, g)?))
        })?;
        if snapshot.upload.total_blocks.is_none() {
            let bytes = set.iter().map(|(_, len)| u64::from(*len)).sum();
            lock(&self.writer).write_now(|tx| tx.set_upload_totals(id, set.len() as u64, bytes))?;
            self.core.upload_event(UploadEvent::SnapshotsChanged)?;
        }
        tracing::info!(id, base, blocks = set.len(), "uploading snapshot");
        let mut packer = Packer::new(self.options.pack_size, self.block_size);
        for batch in set.chunks(BATCH) {
            if lock(&self.catalog).read(|tx| tx.snapshot(id))?.is_none() {
                return Ok(Outcome::Deleted);
            }
            if let Err(reason) = self.pack_blocks(id, batch, &mut packer).await? {
                // What landed is recorded: a retry does not send it again.
                self.land_all(id, &mut packer).await?.ok();
                return self.failure(id, reason);
            }
            if self.is_stopping() {
                // Packs in flight land and are recorded; the one being filled is sent
                // again at the next mount.
                self.land_all(id, &mut packer).await?.ok();
                return Ok(Outcome::Interrupted);
            }
            self.retire_while_uploading().await?;
            self.delete_unneeded().await?;
        }
        let sent = match self.send_pack(id, &mut packer).await? {
            Ok(()) => self.land_all(id, &mut packer).await?,
            Err(reason) => Err(reason),
        };
        if let Err(reason) = sent {
            self.land_all(id, &mut packer).await?.ok();
            return self.failure(id, reason);
        }
        loop {
            let manifest = match self.write_manifest(&snapshot, base).await {
                Ok(manifest) => manifest,
                Err(UploadError::Store(e)) => return self.failure(id, e.message),
                Err(e) => return Err(e),
            };
            let Some(written) = manifest else {
                return Ok(Outcome::Deleted);
            };
            let completion = lock(&self.writer).write_now(|tx| {
                let completion = tx.complete_snapshot(
                    id,
                    g,
                    base,
                    &written.trees,
                    &written.removed,
                    &written.packed,
                )?;
                if completion == Completion::Completed {
                    tx.manifest_written(id, written.version)?;
                }
                Ok::<_, catalog::Error>(completion)
            })?;
            match completion {
                Completion::Completed => return Ok(Outcome::Completed),
                Completion::Deleted => return Ok(Outcome::Deleted),
                // Every block the new base sees is stored as well: only the trees change.
                Completion::BaseChanged => {
                    base = lock(&self.catalog).read(|tx| tx.upload_base(g))?;
                    tracing::info!(id, base, "the base was deleted meanwhile: manifest again");
                }
                Completion::TreesFreed => {
                    tracing::info!(id, "a tree was freed meanwhile: manifest again");
                }
            }
        }
    }

    /// A snapshot deleted meanwhile has lost its blocks: that is no failure.
    fn failure(&self, id: u64, reason: String) -> Result<Outcome, UploadError> {
        if lock(&self.catalog).read(|tx| tx.snapshot(id))?.is_none() {
            return Ok(Outcome::Deleted);
        }
        if self.is_stopping() {
            // A request given up on at the stop (an outage): not the snapshot's failure.
            tracing::info!(id, reason = %reason, "snapshot upload interrupted");
            return Ok(Outcome::Interrupted);
        }
        Ok(Outcome::Failed(reason))
    }

    /// Reads and compresses the blocks of `batch` (many at once) and adds them, in
    /// order, to the pack being filled, sending each pack that reaches the target size.
    /// The inner error says why a block cannot be sent.
    async fn pack_blocks(
        &self,
        id: u64,
        batch: &[(BlockHash, u32)],
        packer: &mut Packer,
    ) -> Result<Result<(), String>, UploadError> {
        for chunk in batch.chunks(READ_AT_ONCE) {
            if self.is_stopping() {
                return Ok(Ok(()));
            }
            let mut reads = Vec::with_capacity(chunk.len());
            for &(hash, len) in chunk {
                let inline = self.inline_bytes(&hash, len)?;
                let blocks = self.blocks.clone();
                let level = self.options.compression_level;
                let pacer = self.pacer.clone();
                reads.push(tokio::spawn(async move {
                    let read = move || {
                        let data = blocks
                            .read_uncached(&hash, inline)
                            .map_err(volume::Error::from)?;
                        manifest::compress(&data, level).map_err(|e| volume::Error::DataDir {
                            path: "zstd".into(),
                            source: e,
                        })
                    };
                    // Spawned when its turn comes, not before.
                    pacer
                        .local(async { tokio::task::spawn_blocking(read).await })
                        .await
                        .map_err(|e| format!("block {hash}: {e}"))?
                        .map_err(|e| format!("cannot read block {hash} for upload: {e}"))
                }));
            }
            for (read, &(hash, len)) in reads.into_iter().zip(chunk) {
                let frame = match read.await {
                    Ok(Ok(frame)) => frame,
                    Ok(Err(reason)) => return Ok(Err(reason)),
                    Err(e) => return Ok(Err(format!("block {hash}: {e}"))),
                };
                packer.builder.add(&*self.store, hash, len, frame)?;
                if packer.builder.len() >= self.options.pack_size
                    && let Err(reason) = self.send_pack(id, packer).await?
                {
                    return Ok(Err(reason));
                }
            }
        }
        Ok(Ok(()))
    }

    /// Sends the pack being filled (if it holds anything), waiting for earlier ones to
    /// land while `PACKS_IN_FLIGHT` are under way.
    async fn send_pack(
        &self,
        id: u64,
        packer: &mut Packer,
    ) -> Result<Result<(), String>, UploadError> {
        let Some((pack, row)) = self.seal_pack(&mut packer.builder, packer.capacity)? else {
            return Ok(Ok(()));
        };
        let size = pack.body.len() as u64;
        while packer.in_flight.len() >= PACKS_IN_FLIGHT {
            if let Err(reason) = self.land_one(id, packer).await? {
                return Ok(Err(reason));
            }
        }
        let sender = self.sender();
        let (key, body) = (pack.key, Bytes::from(pack.body));
        packer.in_flight.spawn(async move {
            sender.put(&key, body).await.map_err(|e| e.message)?;
            Ok::<_, String>(LandedPack {
                row,
                size,
                listing: pack.listing,
            })
        });
        Ok(Ok(()))
    }

    /// Finishes the pack `builder` is filling (if it holds anything), leaving it a new
    /// one of `capacity`, and records the pack in the catalog before its PUT: a crash
    /// during the PUT leaves a name to delete.
    fn seal_pack(
        &self,
        builder: &mut PackBuilder,
        capacity: usize,
    ) -> Result<Option<(FinishedPack, PackRow)>, UploadError> {
        if builder.is_empty() {
            return Ok(None);
        }
        let pack = std::mem::replace(builder, PackBuilder::with_capacity(capacity))
            .finish(&*self.store, self.options.compression_level)?;
        let size = pack.body.len() as u64;
        let row = lock(&self.writer)
            .write_now(|tx| tx.begin_pack(&pack.id, size, pack.listing.data_length))?;
        Ok(Some((pack, row)))
    }

    /// Waits for the next pack in flight to land and records it.
    async fn land_one(
        &self,
        id: u64,
        packer: &mut Packer,
    ) -> Result<Result<(), String>, UploadError> {
        // While a slow pack (a busy mount, a full disk) is under way, store objects freed
        // meanwhile are deleted all the same: on a full disk that is the room it waits for.
        let joined = loop {
            tokio::select! {
                joined = packer.in_flight.join_next() => break joined,
                _ = packer.deletions.tick() => {
                    self.retire_while_uploading().await?;
                    self.delete_unneeded().await?;
                }
            }
        };
        let landed = match joined {
            None => return Ok(Ok(())),
            Some(Ok(Ok(landed))) => landed,
            Some(Ok(Err(reason))) => return Ok(Err(reason)),
            Some(Err(e)) => return Ok(Err(format!("upload task failed: {e}"))),
        };
        lock(&self.writer)
            .write_now(|tx| tx.record_pack(id, landed.row, landed.size, &landed.listing))?;
        self.core.upload_event(UploadEvent::SnapshotsChanged)?;
        let stored: Vec<(BlockHash, u32)> = landed
            .listing
            .blocks
            .iter()
            .map(|block| (block.hash, block.raw_length))
            .collect();
        self.core.upload_event(UploadEvent::BlocksStored(&stored))?;
        Ok(Ok(()))
    }

    /// Waits for every pack in flight to land and records them.
    async fn land_all(
        &self,
        id: u64,
        packer: &mut Packer,
    ) -> Result<Result<(), String>, UploadError> {
        let mut failure = None;
        while !packer.in_flight.is_empty() {
            if let Err(reason) = self.land_one(id, packer).await? {
                failure.get_or_insert(reason);
            }
        }
        Ok(failure.map_or(Ok(()), Err))
    }

    /// Writes an index object listing the packs that landed and that none lists yet:
    /// before a snapshot object names blocks in them, so a reader with nothing but the
    /// bucket finds every block a completed snapshot needs.
    async fn write_index(&self) -> Result<(), UploadError> {
        let unindexed = lock(&self.catalog).read(|tx| tx.unindexed_packs())?;
        self.write_indexes(unindexed).await
    }

    /// Writes index objects listing `packs` and records that they do, in place of the index
    /// objects that listed them before (each queued for deletion once it lists no pack).
    async fn write_indexes(&self, packs: Vec<(PackRow, PackListing)>) -> Result<(), UploadError> {
        for packs in packs.chunks(PACKS_PER_INDEX) {
            let listings: Vec<(PackId, PackListing)> = packs
                .iter()
                .map(|(pack, listing)| (pack.id, listing.clone()))
                .collect();
            let (index, object) = store::index_object(&listings, self.options.compression_level)?;
            // Queued first: a crash before it is recorded leaves a name to delete.
            lock(&self.writer).write_now(|tx| tx.begin_index(&index))?;
            self.put_all(vec![(ObjectKey::index(&index).into(), object)])
                .await?;
            let rows: Vec<PackRow> = packs.iter().map(|(pack, _)| *pack).collect();
            lock(&self.writer).write_now(|tx| tx.reindex(&index, &rows))?;
        }
        Ok(())
    }

    /// Writes the manifest of `snapshot`: the trees of the directories changed since
    /// `base` (all of them for the first), in packs, then the index of every pack not
    /// listed yet, then the snapshot object. `None` if the snapshot was deleted meanwhile.
    async fn write_manifest(
        &self,
        snapshot: &SnapshotRow,
        base: u64,
    ) -> Result<Option<WrittenManifest>, UploadError> {
        let g = snapshot.generation;
        let (rewrite, removed) = lock(&self.catalog).read(|tx| {
            let dirs: HashSet<u64> = tx.dirs_to_rewrite(base, g)?.into_iter().collect();
            Ok::<_, catalog::Error>((dirs, tx.dirs_removed(base, g)?))
        })?;
        let mut trees = Vec::new();
        let mut packing = TreePacking::default();
        // Depth-first, children before parents: a parent's tree names its children's.
        let mut stack = vec![self.open_dir(ROOT_INO, g)?];
        let root_tree = loop {
            let Some(frame) = stack.last_mut() else {
                unreachable!("the root frame returns before the stack empties")
            };
            if let Some(child) = frame.pending.pop() {
                let row = &child.inode;
                let content = match row.attrs.kind {
                    Kind::Dir => {
                        let known = if rewrite.contains(&row.ino) || base == 0 {
                            None
                        } else {
                            lock(&self.catalog).read(|tx| tx.tree_at(base, row.ino))?
                        };
                        match known {
                            Some(hash) => Content::Tree(hash),
                            None => {
                                // Back on the parent's list until the child's tree is done.
                                let frame = self.open_dir(row.ino, g)?;
                                if let Some(parent) = stack.last_mut() {
                                    parent.pending.push(child);
                                }
                                stack.push(frame);
                                continue;
                            }
                        }
                    }
                    Kind::File => Content::Blocks(
                        lock(&self.catalog)
                            .read(|tx| tx.blocks_in_range(g, row.ino, 0, i64::MAX as u64))?,
                    ),
                    _ => Content::None,
                };
                let entry = self.entry(child, content, g)?;
                if let Some(frame) = stack.last_mut() {
                    frame.done.push(entry);
                }
                continue;
            }
            // Every entry of the directory on top is done: encode its tree.
            let Some(mut frame) = stack.pop() else {
                unreachable!()
            };
            frame.done.sort_by(|a, b| a.name.cmp(&b.name));
            let encoded = manifest::encode_tree(&frame.done);
            let hash = BlockHash::of(&encoded);
            trees.push((frame.ino, hash));
            self.pack_tree(hash, &encoded, &mut packing).await?;
            match stack.last_mut() {
                None => break hash,
                Some(parent) => {
                    // The entry that opened this frame waits on top of the parent's list.
                    if let Some(child) = parent.pending.pop() {
                        let entry = self.entry(child, Content::Tree(hash), g)?;
                        parent.done.push(entry);
                    }
                }
            }
        };
        self.send_tree_pack(&mut packing.builder).await?;
        // Before the snapshot object names them: a reader with nothing but the bucket
        // finds every block and tree of a completed snapshot through the index.
        self.write_index().await?;

        let Some(object) = self.snapshot_object(snapshot.id, g, root_tree)? else {
            return Ok(None);
        };
        self.put_all(vec![(ObjectKey::snapshot(snapshot.id).into(), object.1)])
            .await?;
        Ok(Some(WrittenManifest {
            trees,
            removed,
            packed: packing.packed,
            version: object.0,
        }))
    }

    /// Adds tree `hash` (`encoded`) to the manifest's tree pack unless a pack holds it
    /// already, and sends the pack once it reaches the target size. A tree too large for
    /// a pack's frame (a directory of a million entries) is an object of its own, as in
    /// format 1.
    async fn pack_tree(
        &self,
        hash: BlockHash,
        encoded: &[u8],
        packing: &mut TreePacking,
    ) -> Result<(), UploadError> {
        if !packing.seen.insert(hash) {
            return Ok(());
        }
        if lock(&self.catalog).read(|tx| tx.tree_packed(&hash))? {
            packing.packed.push(hash);
            return Ok(());
        }
        let frame = self.compress(encoded)?;
        if encoded.len() > MAX_FRAME || frame.len() > MAX_FRAME {
            return self
                .put_all(vec![(ObjectKey::tree(&hash).into(), frame)])
                .await;
        }
        packing
            .builder
            .add(&*self.store, hash, encoded.len() as u32, frame)?;
        packing.packed.push(hash);
        if packing.builder.len() >= self.options.pack_size {
            self.send_tree_pack(&mut packing.builder).await?;
        }
        Ok(())
    }

    /// Sends the tree pack `builder` is filling (if it holds anything) and records its
    /// trees.
    async fn send_tree_pack(&self, builder: &mut PackBuilder) -> Result<(), UploadError> {
        self.put_pack(builder, 0, |tx, row, listing| {
            tx.record_tree_pack(row, listing)
        })
        .await
    }

    /// Seals the pack `builder` is filling (if it holds anything; see `seal_pack`), sends
    /// it, and records it with `record` once it landed.
    async fn put_pack(
        &self,
        builder: &mut PackBuilder,
        capacity: usize,
        record: impl FnOnce(&catalog::WriteTx<'_>, PackRow, &PackListing) -> catalog::Result<()>,
    ) -> Result<(), UploadError> {
        let Some((pack, row)) = self.seal_pack(builder, capacity)? else {
            return Ok(());
        };
        self.put_all(vec![(pack.key.into(), pack.body)]).await?;
        lock(&self.writer).write_now(|tx| record(tx, row, &pack.listing))?;
        Ok(())
    }

    /// The snapshot object of snapshot `id`, with the version of the name and tags it
    /// holds; `None` if the snapshot is gone.
    fn snapshot_object(
        &self,
        id: u64,
        g: u64,
        root_tree: BlockHash,
    ) -> Result<Option<(i64, Vec<u8>)>, UploadError> {
        let found = lock(&self.catalog).read(|tx| {
            // The version first: a rename after it makes the object stale, never lost.
            let Some(row) = tx.snapshot(id)? else {
                return Ok::<_, catalog::Error>(None);
            };
            let version = tx.manifest_version(id)?;
            let root = tx
                .inode(g, ROOT_INO)?
                .ok_or_else(|| catalog::Error::Corrupt(format!("snapshot {id} has no root")))?;
            Ok(Some((version, row, tx.snapshot_tags(id)?, root)))
        })?;
        let Some((version, row, tags, root)) = found else {
            return Ok(None);
        };
        let root = self.entry(
            catalog::DirEntryRow {
                name: Vec::new(),
                inode: root,
            },
            Content::Tree(root_tree),
            g,
        )?;
        let encoded = manifest::encode_snapshot(&SnapshotManifest {
            volume_id: self.volume_id.clone(),
            id,
            name: row.name,
            generation: g,
            created: row.created,
            block_size: self.block_size,
            logical_bytes: row.logical_bytes,
            tags,
            root,
            lock: row.lock,
            trash: row.trash,
        });
        Ok(Some((version, self.compress(&encoded)?)))
    }

    /// Rewrites the manifest objects of completed snapshots renamed or retagged since.
    async fn rewrite_stale_manifests(&self) -> Result<(), UploadError> {
        let stale = lock(&self.catalog).read(|tx| tx.stale_manifests())?;
        for snapshot in stale {
            let root = lock(&self.catalog).read(|tx| tx.tree_at(snapshot.generation, ROOT_INO))?;
            let Some(root) = root else { continue };
            let Some((version, object)) =
                self.snapshot_object(snapshot.id, snapshot.generation, root)?
            else {
                continue;
            };
            self.put_all(vec![(ObjectKey::snapshot(snapshot.id).into(), object)])
                .await?;
            lock(&self.writer).write_now(|tx| tx.manifest_written(snapshot.id, version))?;
        }
        Ok(())
    }

    fn open_dir(&self, ino: u64, g: u64) -> Result<DirFrame, UploadError> {
        let mut pending = lock(&self.catalog).read(|tx| tx.list_dir(g, ino))?;
        pending.reverse();
        Ok(DirFrame {
            ino,
            pending,
            done: Vec::new(),
        })
    }

    fn entry(
        &self,
        child: catalog::DirEntryRow,
        content: Content,
        g: u64,
    ) -> Result<Entry, UploadError> {
        let xattrs = lock(&self.catalog).read(|tx| tx.xattrs_of(g, child.inode.ino))?;
        Ok(Entry::from_row(child, xattrs, content))
    }

    /// Block `hash` (`len` bytes) from the local disk, verified: from the catalog for a
    /// small block kept inline, else its file.
    fn read_local(&self, hash: &BlockHash, len: u32) -> Result<Vec<u8>, String> {
        let inline = self.inline_bytes(hash, len).map_err(|e| e.to_string())?;
        self.blocks
            .read_uncached(hash, inline)
            .map_err(|e| e.to_string())
    }

    /// The bytes the catalog keeps of block `hash` (`len` bytes) if it is small enough to
    /// be kept there rather than in a file.
    fn inline_bytes(&self, hash: &BlockHash, len: u32) -> catalog::Result<Option<Vec<u8>>> {
        if !blocks::is_inline(len as usize) {
            return Ok(None);
        }
        lock(&self.catalog).read(|tx| tx.inline_block(hash))
    }

    fn compress(&self, data: &[u8]) -> Result<Vec<u8>, UploadError> {
        manifest::compress(data, self.options.compression_level)
            .map_err(|e| StoreError::permanent(format!("zstd: {e}")).into())
    }

    /// Puts objects many at once, retrying transient errors for as long as it takes.
    async fn put_all(&self, objects: Vec<(String, Vec<u8>)>) -> Result<(), UploadError> {
        let permits = Arc::new(Semaphore::new(self.options.concurrency.max(1)));
        let mut tasks = JoinSet::new();
        for (key, body) in objects {
            let body = Bytes::from(body);
            let permits = permits.clone();
            let sender = self.sender();
            tasks.spawn(async move {
                let _permit = permits.acquire_owned().await;
                sender.put(&key, body).await
            });
        }
        while let Some(result) = tasks.join_next().await {
            result.map_err(|e| StoreError::transient(format!("upload task failed: {e}")))??;
        }
        Ok(())
    }

    /// Deletes the store objects nothing needs any more. Failures leave them queued:
    /// deleting is never worth holding up an upload. (Packs and index objects have names
    /// never used before, so no deletion races a PUT of the same key.)
    async fn delete_unneeded(&self) -> Result<(), UploadError> {
        loop {
            let keys = lock(&self.catalog).read(|tx| tx.store_deletions(BATCH as u32))?;
            if keys.is_empty() {
                return Ok(());
            }
            let mut doomed = Vec::new();
            let mut needed = 0;
            lock(&self.writer).write_now(|tx| {
                for key in keys {
                    match tx.object_fate(&key)? {
                        ObjectFate::Needed => {
                            tx.forget_deletion(&key)?;
                            needed += 1;
                        }
                        ObjectFate::Later => {}
                        ObjectFate::Unneeded => doomed.push(key),
                    }
                }
                Ok::<_, catalog::Error>(())
            })?;
            if doomed.is_empty() && needed == 0 {
                // Only objects that wait for an index: the pass that writes it goes on.
                return Ok(());
            }
            let mut tasks = JoinSet::new();
            for key in doomed {
                let store = self.store.clone();
                tasks.spawn(async move {
                    let result = store::retry(Retries::Attempts(3), || store.delete(&key)).await;
                    (key, result)
                });
            }
            let mut deleted = Vec::new();
            let mut failed = false;
            while let Some(joined) = tasks.join_next().await {
                match joined {
                    Ok((key, Ok(()))) => deleted.push(key),
                    Ok((key, Err(e))) => {
                        tracing::warn!(key = %key, error = %e, "store deletion failed; will retry");
                        failed = true;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "store deletion task failed");
                        failed = true;
                    }
                }
            }
            lock(&self.writer)
                .write_now(|tx| deleted.iter().try_for_each(|key| tx.forget_deletion(key)))?;
            if failed {
                return Ok(());
            }
        }
    }
}

/// The packs of one snapshot's upload: the one being filled, and those in flight.
struct Packer {
    builder: PackBuilder,
    in_flight: JoinSet<Result<LandedPack, String>>,
    /// When the deletion queue is next served while packs are under way.
    deletions: tokio::time::Interval,
    /// What a pack's buffer grows to: the target size, the frame that passes it, the
    /// listing.
    capacity: usize,
}

impl Packer {
    fn new(pack_size: usize, block_size: u32) -> Packer {
        let capacity = pack_size + 2 * block_size as usize;
        // Not at once: the caller has just gone through the queue.
        let start = tokio::time::Instant::now() + DELETE_WHILE_WAITING;
        let mut deletions = tokio::time::interval_at(start, DELETE_WHILE_WAITING);
        deletions.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Packer {
            builder: PackBuilder::with_capacity(capacity),
            in_flight: JoinSet::new(),
            deletions,
            capacity,
        }
    }
}

/// A pack in the store, to record.
struct LandedPack {
    row: PackRow,
    size: u64,
    listing: PackListing,
}

struct WrittenManifest {
    trees: Vec<(u64, BlockHash)>,
    removed: Vec<u64>,
    /// The trees it names that packs hold (new or found packed already).
    packed: Vec<BlockHash>,
    /// The version of the snapshot's name and tags in the snapshot object.
    version: i64,
}

/// The trees of a manifest being packed.
#[derive(Default)]
struct TreePacking {
    builder: PackBuilder,
    /// Trees the manifest finds in packs: new ones and those packed already.
    packed: Vec<BlockHash>,
    /// Trees looked at already (directories of the same content share one).
    seen: HashSet<BlockHash>,
}

/// A directory being encoded: entries still to visit (in reverse order, popped from the
/// end) and entries done.
struct DirFrame {
    ino: u64,
    pending: Vec<catalog::DirEntryRow>,
    done: Vec<Entry>,
}

/// Puts objects for the uploader (see `Worker::sender`).
struct Sender {
    store: Arc<dyn ObjectStore>,
    limiter: Option<RateLimit>,
    pacer: Arc<Pacer>,
    stopping: Arc<AtomicBool>,
}

impl Sender {
    /// Puts `body` at `key` within the rate limit, retrying transient errors until it
    /// lands or the uploader stops (`store::retry_unless_stopped`), and counts it sent.
    async fn put(&self, key: &str, body: Bytes) -> store::StoreResult<()> {
        let size = body.len() as u64;
        if let Some(limiter) = &self.limiter {
            limiter.acquire(size).await;
        }
        // Each attempt paced, not the backoffs between them.
        store::retry_unless_stopped(Retries::Unlimited, &self.stopping, || {
            self.pacer.store(self.store.put(key, body.clone()))
        })
        .await?;
        metrics::uploaded(size);
        Ok(())
    }
}

/// A token bucket over bytes sent, shared by all requests (like restic's --limit-upload).
#[derive(Clone)]
struct RateLimit {
    bytes_per_sec: u64,
    next_free: Arc<Mutex<Instant>>,
}

impl RateLimit {
    fn new(bytes_per_sec: u64) -> RateLimit {
        RateLimit {
            bytes_per_sec: bytes_per_sec.max(1),
            next_free: Arc::new(Mutex::new(Instant::now())),
        }
    }

    /// Waits until `bytes` more may be sent.
    async fn acquire(&self, bytes: u64) {
        let wait = {
            let mut next_free = lock(&self.next_free);
            let now = Instant::now();
            let start = (*next_free).max(now);
            *next_free = start + Duration::from_secs_f64(bytes as f64 / self.bytes_per_sec as f64);
            start - now
        };
        tokio::time::sleep(wait).await;
    }
}

/// The running uploader: a thread with its runtime. Dropping it without `stop` leaves the
/// thread to die with the process.
pub struct Uploader {
    stop: Arc<Notify>,
    thread: std::thread::JoinHandle<()>,
}

/// How often the uploader looks for work without being woken (a failed deletion, say).
const IDLE_POLL: Duration = Duration::from_secs(5);
/// How long an unmount waits for upload requests in flight to land (one waiting out an
/// outage gives up at once: `store::retry_unless_stopped`).
const STOP_GRACE: Duration = Duration::from_secs(10);

impl Uploader {
    /// Starts uploading on `runtime` (which the store was opened on).
    pub fn start(runtime: tokio::runtime::Runtime, worker: Worker) -> std::io::Result<Uploader> {
        let stop = Arc::new(Notify::new());
        let stopping = stop.clone();
        let wake = worker.wake.clone();
        let thread = std::thread::Builder::new()
            .name("uploader".into())
            .spawn(move || {
                runtime.block_on(async {
                    let running = run(&worker, &wake);
                    tokio::pin!(running);
                    tokio::select! {
                        _ = stopping.notified() => {}
                        _ = &mut running => return,
                    }
                    // Requests in flight land and are recorded: an object the catalog
                    // does not know would stay in the store for good if its block were
                    // freed before being sent again.
                    worker.stop_sending();
                    // An idle uploader waits for a wakeup: this one ends its wait now.
                    wake.notify_one();
                    let _ = tokio::time::timeout(STOP_GRACE, &mut running).await;
                });
                // What is still in flight is abandoned: the catalog says what is stored.
                runtime.shutdown_timeout(Duration::from_secs(1));
            })?;
        Ok(Uploader { stop, thread })
    }

    /// Stops the uploader: requests in flight get `STOP_GRACE` to land and be recorded;
    /// what does not is resent next time.
    pub fn stop(self) {
        self.stop.notify_one();
        if self.thread.join().is_err() {
            tracing::error!("the uploader thread panicked");
        }
    }
}

async fn run(worker: &Worker, wake: &Notify) {
    loop {
        let result = worker.upload_pending().await;
        if worker.is_stopping() {
            return;
        }
        let failed = result.is_err();
        if let Err(e) = result {
            tracing::error!(error = %e, "uploader error; retrying shortly");
            metrics::upload_error();
        }
        // A wakeup (a snapshot taken, or the stop) ends the wait early; after an error
        // only the stop does, so a failing store gets its pause.
        let wait = tokio::time::sleep(IDLE_POLL);
        tokio::pin!(wait);
        loop {
            tokio::select! {
                () = &mut wait => break,
                () = wake.notified() => if !failed || worker.is_stopping() { break },
            }
        }
    }
}

mod convert;
pub mod drain;
pub mod gc;
mod pace;
#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;
