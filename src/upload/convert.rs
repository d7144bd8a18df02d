//! Converting a format-1 store into packs (`snapfs store prune --convert`): the blocks
//! and directory trees that snapfs before format 2 (and `verify --repair`) stored as
//! objects of their own are copied into packs, so a restore, a scrub or a lifecycle
//! transition pays per pack rather than per block.
//!
//! The order is garbage collection's: a new pack is sent (known to the catalog before its
//! PUT); its blocks and trees are pointed at it and their old objects queued for deletion
//! in one transaction; an index object listing the new packs is written; only then are
//! the old objects deleted (`ObjectFate::Later` holds them until an index lists their
//! pack). A reader with nothing but the bucket finds every block at every step: the old
//! object until an index lists the pack, the pack after. A conversion cut short is
//! finished by the next: it indexes what the last one packed before going on.

use std::collections::HashSet;

use futures_util::StreamExt;

use super::{MAX_FRAME, UploadError, Worker};
use crate::blocks::BlockHash;
use crate::catalog::{FileOrder, ReadTx};
use crate::store::{self, BlockPlace, PackBuilder};
use crate::sync::lock;

/// Catalog rows read at a time.
const CHUNK: u32 = 1024;
/// Old objects fetched at once: each is one small GET.
const FETCHES: usize = 16;

/// What a conversion found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ConvertReport {
    /// Objects of their own (format 1) the store held for blocks and trees.
    pub format_1_objects: u64,
    /// Those copied into packs (their objects deleted), and the bytes of their frames.
    pub converted_objects: u64,
    pub converted_bytes: u64,
    /// Those left as they are: missing or damaged in the store with no local copy, or a
    /// tree too large for a pack (the log names each).
    pub left_objects: u64,
}

/// Where one old object's bytes come from.
enum Source {
    /// The local disk holds the block (`len` bytes).
    Local(u32),
    /// `blocks/<hash>` in the store, at most this many bytes.
    Block(usize),
    /// `trees/<hash>` in the store.
    Tree,
}

impl Worker {
    /// Copies every block and tree the store holds as an object of its own into packs,
    /// then deletes the old objects. Runs unmounted (`store prune --convert`).
    pub async fn convert_format_1(&self) -> Result<ConvertReport, UploadError> {
        self.write_index().await?;
        let objects = lock(&self.catalog).read(|tx| tx.format_1_objects())?;
        let mut report = ConvertReport {
            format_1_objects: objects,
            ..ConvertReport::default()
        };
        if objects > 0 {
            tracing::info!(
                objects,
                "converting the store's format-1 objects into packs"
            );
        }
        let capacity = self.options.pack_size + 2 * self.block_size as usize;
        let mut builder = PackBuilder::with_capacity(capacity);
        // What the pack being filled holds (the catalog learns it when the pack is sent),
        // and what cannot be converted: each once, however many places share it.
        let mut in_builder: HashSet<BlockHash> = HashSet::new();
        let mut left: HashSet<BlockHash> = HashSet::new();
        for trees in [false, true] {
            let mut after = None;
            loop {
                let chunk: Vec<(FileOrder, BlockHash, Source)> =
                    lock(&self.catalog).read(|tx| self.format_1_chunk(tx, trees, after))?;
                let Some((last, ..)) = chunk.last() else {
                    break;
                };
                after = Some(*last);
                if self.is_stopping() {
                    break;
                }
                let mut seen = HashSet::new();
                let wanted: Vec<(BlockHash, Source)> = chunk
                    .into_iter()
                    .filter(|(_, hash, _)| {
                        !left.contains(hash) && !in_builder.contains(hash) && seen.insert(*hash)
                    })
                    .map(|(_, hash, source)| (hash, source))
                    .collect();
                let mut fetched = futures_util::stream::iter(wanted.into_iter().map(
                    |(hash, source)| async move { (hash, self.old_object(&hash, source).await) },
                ))
                .buffered(FETCHES);
                while let Some((hash, data)) = fetched.next().await {
                    let data = match data? {
                        Ok(data) => data,
                        Err(reason) => {
                            tracing::warn!(%hash, reason, "cannot convert; the object stays");
                            left.insert(hash);
                            continue;
                        }
                    };
                    let frame = self.compress(&data)?;
                    report.converted_objects += 1;
                    report.converted_bytes += frame.len() as u64;
                    builder.add(&*self.store, hash, data.len() as u32, frame)?;
                    in_builder.insert(hash);
                    if builder.len() >= self.options.pack_size {
                        self.send_converted(&mut builder, capacity).await?;
                        in_builder.clear();
                    }
                }
            }
        }
        self.send_converted(&mut builder, capacity).await?;
        self.write_index().await?;
        self.delete_unneeded().await?;
        report.left_objects = left.len() as u64;
        Ok(report)
    }

    /// The next chunk of old objects after `after`, in file order: blocks, or trees.
    fn format_1_chunk(
        &self,
        tx: &ReadTx<'_>,
        trees: bool,
        after: Option<FileOrder>,
    ) -> Result<Vec<(FileOrder, BlockHash, Source)>, crate::catalog::Error> {
        if trees {
            let found = tx.format_1_trees(after, CHUNK)?;
            return Ok(found
                .into_iter()
                .map(|(at, hash)| (at, hash, Source::Tree))
                .collect());
        }
        let max = self.block_size as usize;
        let found = tx.format_1_blocks(after, CHUNK)?;
        Ok(found
            .into_iter()
            .map(|(at, hash, len, local)| {
                let source = if local {
                    Source::Local(len)
                } else {
                    Source::Block(max)
                };
                (at, hash, source)
            })
            .collect())
    }

    /// The bytes of the old object of block or tree `hash`, verified; `Err(reason)` if
    /// it cannot be had whole or is too large for a pack (it then stays as it is).
    async fn old_object(
        &self,
        hash: &BlockHash,
        source: Source,
    ) -> Result<Result<Vec<u8>, String>, UploadError> {
        let fetched = match source {
            Source::Local(len) => match self.read_local(hash, len) {
                Ok(data) => return Ok(Ok(data)),
                Err(e) => {
                    tracing::warn!(%hash, error = %e, "local copy unreadable; fetching it");
                    let max = self.block_size as usize;
                    let place = BlockPlace::Object;
                    self.pacer
                        .store(store::fetch_block(&*self.store, hash, place, max))
                        .await
                }
            },
            Source::Block(max) => {
                let place = BlockPlace::Object;
                self.pacer
                    .store(store::fetch_block(&*self.store, hash, place, max))
                    .await
            }
            Source::Tree => {
                let max = store::MAX_TREE as usize;
                self.pacer
                    .store(store::fetch_tree_object(&*self.store, hash, max))
                    .await
            }
        };
        match fetched {
            Ok(Some(data)) if data.len() > MAX_FRAME => Ok(Err(format!(
                "{} bytes, too large for a pack's frame",
                data.len()
            ))),
            Ok(Some(data)) => Ok(Ok(data)),
            Ok(None) => Ok(Err("missing from the store".into())),
            Err(e) if e.is_transient() => Err(e.into()),
            Err(e) => Ok(Err(e.message)),
        }
    }

    /// Sends the pack being filled with converted objects and points them at it.
    async fn send_converted(
        &self,
        builder: &mut PackBuilder,
        capacity: usize,
    ) -> Result<(), UploadError> {
        self.put_pack(builder, capacity, |tx, row, listing| {
            tx.record_converted(row, &listing.blocks)
        })
        .await
    }
}
