//! Garbage collection of packs: deleting snapshots frees blocks, which leaves packs
//! partly or wholly unused. Packs no live block is in are deleted; packs mostly unused
//! are repacked (their live blocks copied into new packs) until the store's unused bytes
//! are within `GcPolicy::max_unused_percent` of its live bytes.
//!
//! The order keeps every needed block reachable from the bucket alone at every step, so a
//! crash anywhere loses nothing: new packs are sent (known to the catalog before their
//! PUT), the blocks are pointed at them, an index object listing them and every live pack
//! the old packs' index objects listed is written (queued for deletion until it is
//! recorded), and only then are the old packs and index objects queued for deletion,
//! index objects first (`store_deletions`), so no index ever names a deleted pack.

use std::collections::{HashMap, HashSet};

use super::{UploadError, Worker};
use crate::blocks::BlockHash;
use crate::catalog::PackUsage;
use crate::manifest::{PackId, PackedBlock};
use crate::store::{self, ObjectKey, PackBuilder, Retries};
use crate::sync::lock;

/// When and how much garbage collection repacks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GcPolicy {
    /// Packs are repacked (most unused first) until the bytes no live block uses are at
    /// most this percentage of the live bytes.
    pub max_unused_percent: u8,
    /// Live bytes copied at most in one pass (`None`: no bound); a background pass stops
    /// there and lets pending uploads go first.
    pub max_copy_bytes: Option<u64>,
}

/// The default share of unused bytes the store keeps: restic's `prune --max-unused` is 5%
/// of the whole; 10% keeps repacking rare while bounding the waste to 1.1x.
pub const DEFAULT_MAX_UNUSED_PERCENT: u8 = 10;

/// What a background pass copies at most before pending uploads go on.
pub const BACKGROUND_COPY_BYTES: u64 = 256 << 20;

/// An index object listing fewer live packs than this is small...
const SMALL_INDEX_PACKS: usize = store::PACKS_PER_INDEX / 4;
/// ...and small ones are merged into full ones once there are more than this many: a
/// reader of the bucket GETs every index object before its first block, and each upload
/// writes one.
const SMALL_INDEXES_KEPT: usize = 16;

/// A pack under this fraction of the pack size the repack fills is small...
const SMALL_PACK_FRACTION: u64 = 4;
/// ...and small packs are kept as they are up to this many: each snapshot's upload and
/// each repack ends with one, and every object costs a request to write, list, restore and
/// move between storage classes (hourly snapshots of a quiet volume would leave thousands).
const SMALL_PACKS_KEPT: usize = 16;

impl Default for GcPolicy {
    fn default() -> Self {
        GcPolicy {
            max_unused_percent: DEFAULT_MAX_UNUSED_PERCENT,
            max_copy_bytes: Some(BACKGROUND_COPY_BYTES),
        }
    }
}

/// What a pass would do or did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct GcReport {
    /// Packs without a live block, deleted.
    pub deleted_packs: u64,
    /// Packs whose live blocks were copied into new packs, then deleted (small ones
    /// merged included).
    pub repacked_packs: u64,
    /// Of those, small packs merged into full ones.
    pub merged_small_packs: u64,
    /// Bytes of the live blocks copied.
    pub copied_bytes: u64,
    /// Bytes of the packs deleted (the new packs take `copied_bytes` back).
    pub deleted_bytes: u64,
    /// Small index objects merged into full ones (their packs listed again, then they are
    /// deleted).
    pub merged_indexes: u64,
    /// The store's packs before: how many, their bytes, and the bytes no live block uses.
    pub store_packs: u64,
    pub store_bytes: u64,
    pub unused_bytes: u64,
}

/// The packs to delete and to repack, chosen from the indexed packs `packs`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct GcPlan {
    pub dead: Vec<PackUsage>,
    /// Packs to repack: the most unused first, then small ones to merge.
    pub repack: Vec<PackUsage>,
    /// How many of `repack` are there for being small (`merge_small_packs`).
    pub small: usize,
    /// Small index objects to merge (`small_indexes`).
    pub merge: Vec<PackId>,
}

impl GcPlan {
    pub fn is_empty(&self) -> bool {
        self.dead.is_empty() && self.repack.is_empty() && self.merge.is_empty()
    }

    /// What carrying the plan out does, on a store whose packs are `packs`.
    pub fn report(&self, packs: &[PackUsage]) -> GcReport {
        GcReport {
            deleted_packs: self.dead.len() as u64,
            repacked_packs: self.repack.len() as u64,
            merged_small_packs: self.small as u64,
            copied_bytes: self.repack.iter().map(|p| p.live_bytes).sum(),
            deleted_bytes: self.dead.iter().chain(&self.repack).map(|p| p.size).sum(),
            merged_indexes: self.merge.len() as u64,
            store_packs: packs.len() as u64,
            store_bytes: packs.iter().map(|p| p.size).sum(),
            unused_bytes: packs.iter().map(PackUsage::unused).sum(),
        }
    }
}

/// Every pack without a live block, and the packs with the largest unused share until
/// the unused bytes left are within the policy (or the copy bound is reached: at least one
/// pack is always taken, however large, so progress is made); then small packs to merge
/// into packs of `pack_size` (the size the repack fills).
pub fn plan(packs: &[PackUsage], policy: &GcPolicy, pack_size: u64) -> GcPlan {
    let live: u64 = packs.iter().map(|p| p.live_bytes).sum();
    let allowed = live / 100 * u64::from(policy.max_unused_percent)
        + live % 100 * u64::from(policy.max_unused_percent) / 100;
    let (dead, mut partial): (Vec<PackUsage>, Vec<PackUsage>) =
        packs.iter().partition(|p| p.live_blocks == 0);
    let mut unused: u64 = partial.iter().map(PackUsage::unused).sum();
    // Most unused share first: the least copying for the bytes freed.
    partial.sort_by(|a, b| {
        let share = |p: &PackUsage, of: &PackUsage| p.unused() as u128 * u128::from(of.size);
        share(b, a).cmp(&share(a, b))
    });
    let mut repack = Vec::new();
    let mut copied = 0u64;
    // 100%: repacking is left to `snapfs store prune`.
    let partial = if policy.max_unused_percent >= 100 {
        Vec::new()
    } else {
        partial
    };
    for pack in partial {
        if unused <= allowed || pack.unused() == 0 {
            break;
        }
        if let Some(bound) = policy.max_copy_bytes
            && copied + pack.live_bytes > bound
            && !repack.is_empty()
        {
            break;
        }
        unused -= pack.unused();
        copied += pack.live_bytes;
        repack.push(pack);
    }
    let small = merge_small_packs(packs, policy, pack_size, &mut repack, copied);
    GcPlan {
        dead,
        repack,
        small,
        merge: small_indexes(packs),
    }
}

/// Adds the small live packs (under `pack_size / SMALL_PACK_FRACTION`) not already in
/// `repack` to it, smallest first and within the copy bound (`copied` so far), if there
/// are more than `SMALL_PACKS_KEPT` of them and those that fit make fewer packs of
/// `pack_size` than they are (else a background pass would merge them for ever). Returns
/// how many it added. Left to `snapfs store prune` like any repack when the policy allows
/// 100% unused.
fn merge_small_packs(
    packs: &[PackUsage],
    policy: &GcPolicy,
    pack_size: u64,
    repack: &mut Vec<PackUsage>,
    mut copied: u64,
) -> usize {
    if policy.max_unused_percent >= 100 {
        return 0;
    }
    let mut small: Vec<PackUsage> = packs
        .iter()
        .filter(|p| p.live_blocks > 0 && p.size < pack_size / SMALL_PACK_FRACTION)
        .filter(|p| !repack.iter().any(|r| r.pack.row == p.pack.row))
        .copied()
        .collect();
    if small.len() <= SMALL_PACKS_KEPT {
        return 0;
    }
    small.sort_by_key(|p| (p.live_bytes, p.pack.row));
    let mut taken = Vec::new();
    for pack in small {
        if let Some(bound) = policy.max_copy_bytes
            && copied + pack.live_bytes > bound
        {
            break;
        }
        copied += pack.live_bytes;
        taken.push(pack);
    }
    let live: u64 = taken.iter().map(|p| p.live_bytes).sum();
    if live.div_ceil(pack_size.max(1)) >= taken.len() as u64 {
        return 0;
    }
    let added = taken.len();
    repack.extend(taken);
    added
}

/// The index objects listing fewer than `SMALL_INDEX_PACKS` live packs of `packs`, if
/// there are more than `SMALL_INDEXES_KEPT` of them (else none), in name order.
pub fn small_indexes(packs: &[PackUsage]) -> Vec<PackId> {
    let mut listed: HashMap<PackId, usize> = HashMap::new();
    for pack in packs.iter().filter(|p| p.live_blocks > 0) {
        *listed.entry(pack.index).or_default() += 1;
    }
    let mut small: Vec<PackId> = listed
        .into_iter()
        .filter(|&(_, packs)| packs < SMALL_INDEX_PACKS)
        .map(|(index, _)| index)
        .collect();
    if small.len() <= SMALL_INDEXES_KEPT {
        return Vec::new();
    }
    small.sort_unstable();
    small
}

impl Worker {
    /// What a pass under `policy` would do now, without doing it.
    pub fn gc_plan(&self, policy: &GcPolicy) -> Result<(GcPlan, GcReport), UploadError> {
        let packs = lock(&self.catalog).read(|tx| tx.indexed_packs())?;
        let plan = plan(&packs, policy, self.options.pack_size as u64);
        let report = plan.report(&packs);
        Ok((plan, report))
    }

    /// One pass of garbage collection under `policy`: repacks what the plan says, then
    /// deletes the packs left without a live block. Returns what it did. Called when no
    /// upload is under way, after `abandon_interrupted` (a crash mid-repack leaves a pack
    /// not sent).
    pub async fn collect_garbage(&self, policy: &GcPolicy) -> Result<GcReport, UploadError> {
        let (plan, mut report) = self.gc_plan(policy)?;
        if plan.dead.is_empty() && plan.repack.is_empty() {
            report.merged_indexes = self.merge_small_indexes().await?;
            // What an interrupted pass queued is deleted all the same.
            self.delete_unneeded().await?;
            return Ok(report);
        }
        tracing::info!(
            dead = plan.dead.len(),
            repack = plan.repack.len(),
            small = plan.small,
            "collecting the store's garbage"
        );
        let mut repacked = 0;
        let mut merged_small = 0;
        let mut copied = 0;
        let mut packer = Repacker::new(self.options.pack_size, self.block_size);
        let first_small = plan.repack.len() - plan.small;
        for (n, pack) in plan.repack.iter().enumerate() {
            if self.is_stopping() {
                break;
            }
            match self.copy_live_blocks(pack, &mut packer).await? {
                Some(bytes) => {
                    repacked += 1;
                    merged_small += u64::from(n >= first_small);
                    copied += bytes;
                }
                None => continue,
            }
            if packer.builder.len() >= self.options.pack_size {
                self.send_repacked(&mut packer).await?;
            }
        }
        self.send_repacked(&mut packer).await?;
        let (deleted, deleted_bytes) = self.retire_dead_packs().await?;
        report.repacked_packs = repacked;
        report.merged_small_packs = merged_small;
        report.copied_bytes = copied;
        report.deleted_packs = deleted.saturating_sub(repacked);
        report.deleted_bytes = deleted_bytes;
        report.merged_indexes = self.merge_small_indexes().await?;
        self.delete_unneeded().await?;
        Ok(report)
    }

    /// Lists the live packs of the small index objects again in full ones (`reindex`
    /// queues the old objects once no pack points at them), if there are too many small
    /// ones (`small_indexes`). Returns how many it merged.
    async fn merge_small_indexes(&self) -> Result<u64, UploadError> {
        let packs = lock(&self.catalog).read(|tx| tx.indexed_packs())?;
        let small = small_indexes(&packs);
        if small.is_empty() {
            return Ok(0);
        }
        tracing::info!(indexes = small.len(), "merging small index objects");
        let listed = lock(&self.catalog).read(|tx| tx.packs_listed_by(&small, &HashSet::new()))?;
        self.write_indexes(listed).await?;
        Ok(small.len() as u64)
    }

    /// Adds the live blocks of `pack` to the pack being filled: from the local disk where
    /// it holds them, else from the pack in one range read (a block gone from the disk
    /// after all, in a range read of its own). Returns their bytes, or `None` (the pack
    /// stays as it is) if a block cannot be had whole.
    async fn copy_live_blocks(
        &self,
        pack: &PackUsage,
        packer: &mut Repacker,
    ) -> Result<Option<u64>, UploadError> {
        let live = lock(&self.catalog).read(|tx| tx.live_in_pack(pack.pack.row))?;
        let remote: Vec<&PackedBlock> = live
            .iter()
            .filter(|(_, local)| !local)
            .map(|(block, _)| block)
            .collect();
        let key = ObjectKey::pack(&pack.pack.id);
        let span = match (remote.first(), remote.last()) {
            (Some(first), Some(last)) => {
                let end = last.offset + u64::from(last.length);
                let read = store::retry(Retries::Attempts(5), || {
                    self.pacer
                        .store(self.store.get_range(&key, first.offset, end - first.offset))
                })
                .await;
                match read {
                    Ok(Some(span)) => Some((first.offset, span)),
                    Ok(None) => return Ok(self.cannot_repack(pack, "the pack is missing")),
                    Err(e) => return Ok(self.cannot_repack(pack, &e.message)),
                }
            }
            _ => None,
        };
        let mut frames = Vec::with_capacity(live.len());
        for (block, local) in &live {
            // The catalog's word that the disk holds a block may be stale (evicted since
            // it was read, or lost): the pack has it too.
            let data = match local.then(|| self.read_local(&block.hash, block.raw_length)) {
                Some(Ok(data)) => Ok(data),
                _ => self.frame_from_pack(&key, block, span.as_ref()).await,
            };
            let data = match data {
                Ok(data) => data,
                Err(e) => {
                    let reason = format!("block {}: {e}", block.hash);
                    return Ok(self.cannot_repack(pack, &reason));
                }
            };
            frames.push((block.hash, block.raw_length, self.compress(&data)?));
        }
        let mut bytes = 0;
        for (hash, raw_length, frame) in frames {
            bytes += frame.len() as u64;
            packer.builder.add(&*self.store, hash, raw_length, frame)?;
            packer.from.insert(hash, pack.pack.row);
        }
        Ok(Some(bytes))
    }

    /// The bytes of `block` in the pack under `key`: from `span` (where it starts, its
    /// bytes) if it holds the frame, else with a range read of its own.
    async fn frame_from_pack(
        &self,
        key: &ObjectKey,
        block: &PackedBlock,
        span: Option<&(u64, Vec<u8>)>,
    ) -> Result<Vec<u8>, String> {
        let in_span = span.and_then(|(start, span)| {
            let at = usize::try_from(block.offset.checked_sub(*start)?).ok()?;
            span.get(at..at.checked_add(block.length as usize)?)
        });
        let read;
        let part = match in_span {
            Some(part) => part,
            None => {
                read = store::retry(Retries::Attempts(5), || {
                    self.pacer.store(self.store.get_range(
                        key,
                        block.offset,
                        u64::from(block.length),
                    ))
                })
                .await
                .map_err(|e| e.message)?
                .ok_or("the pack is missing")?;
                read.as_slice()
            }
        };
        // Its exact length: a tree may be larger than a block.
        let max = block.raw_length as usize;
        store::open_frame(&*self.store, key, &block.hash, part, max)
    }

    fn cannot_repack(&self, pack: &PackUsage, reason: &str) -> Option<u64> {
        tracing::warn!(pack = %pack.pack.id, reason, "cannot repack; the pack stays");
        None
    }

    /// Sends the pack being filled with copied blocks and points them at it.
    async fn send_repacked(&self, packer: &mut Repacker) -> Result<(), UploadError> {
        let from = &packer.from;
        self.put_pack(&mut packer.builder, packer.capacity, |tx, row, listing| {
            tx.record_repacked(row, &listing.blocks, from)
        })
        .await?;
        packer.from.clear();
        Ok(())
    }

    /// Deletes the indexed packs no live block is in: first an index object is written
    /// that lists every live pack their index objects list (and the packs no index lists
    /// yet), then the packs and those index objects are queued for deletion. Returns the
    /// packs deleted and their bytes.
    pub(super) async fn retire_dead_packs(&self) -> Result<(u64, u64), UploadError> {
        let dead = lock(&self.catalog).read(|tx| tx.dead_indexed_packs())?;
        if dead.is_empty() {
            return Ok((0, 0));
        }
        let rows: HashSet<i64> = dead.iter().map(|(row, _)| *row).collect();
        let mut indexes: Vec<PackId> = dead.iter().map(|(_, index)| *index).collect();
        indexes.sort_unstable();
        indexes.dedup();
        let listed = lock(&self.catalog).read(|tx| {
            let mut listed = tx.unindexed_packs()?;
            listed.extend(tx.packs_listed_by(&indexes, &rows)?);
            Ok::<_, crate::catalog::Error>(listed)
        })?;
        self.write_indexes(listed).await?;
        let rows: Vec<i64> = rows.into_iter().collect();
        Ok(lock(&self.writer).write_now(|tx| tx.retire_packs(&rows))?)
    }

    /// Deletes the packs left without a live block while an upload is under way (a full
    /// disk waits for that room); a store failure only postpones it.
    pub(super) async fn retire_while_uploading(&self) -> Result<(), UploadError> {
        match self.retire_dead_packs().await {
            Ok(_) => Ok(()),
            Err(UploadError::Store(e)) => {
                tracing::warn!(error = %e, "cannot delete unused packs yet; will retry");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

/// The pack being filled with copied blocks, and the pack each came from.
struct Repacker {
    builder: PackBuilder,
    from: HashMap<BlockHash, i64>,
    capacity: usize,
}

impl Repacker {
    fn new(pack_size: usize, block_size: u32) -> Repacker {
        let capacity = pack_size + 2 * block_size as usize;
        Repacker {
            builder: PackBuilder::with_capacity(capacity),
            from: HashMap::new(),
            capacity,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::PackRow;

    /// The pack size of the tests' plans: packs under 100 bytes are small.
    const PACK: u64 = 400;

    fn usage(row: i64, size: u64, live_blocks: u64, live_bytes: u64) -> PackUsage {
        let id = PackId::parse(&format!("{row:032x}")).expect("a pack name");
        PackUsage {
            pack: PackRow { row, id },
            size,
            data_length: size,
            live_blocks,
            live_bytes,
            index: id,
        }
    }

    fn unbounded(max_unused_percent: u8) -> GcPolicy {
        GcPolicy {
            max_unused_percent,
            max_copy_bytes: None,
        }
    }

    #[test]
    fn dead_packs_always_go_and_the_most_unused_are_repacked_first() {
        let packs = [
            usage(1, 100, 9, 90),
            usage(2, 100, 0, 0),
            usage(3, 100, 3, 30),
            usage(4, 100, 5, 50),
            usage(5, 100, 10, 100),
        ];
        // Live 270, unused before 70 + 50 + 10 = 130 among the live packs.
        let plan = plan(&packs, &unbounded(10), PACK);
        assert_eq!(plan.dead, vec![packs[1]]);
        // Pack 3 (70% unused) then pack 4 (50%): 10 left, within 27.
        assert_eq!(plan.repack, vec![packs[2], packs[3]]);
        let report = plan.report(&packs);
        assert_eq!(report.copied_bytes, 80);
        assert_eq!(report.deleted_bytes, 300);
        assert_eq!(report.store_bytes, 500);
        assert_eq!(report.unused_bytes, 230);
    }

    #[test]
    fn a_store_within_the_policy_is_left_alone() {
        let packs = [usage(1, 100, 9, 95), usage(2, 100, 10, 92)];
        assert!(plan(&packs, &unbounded(10), PACK).is_empty());
        // At 0%: every pack with an unused byte is repacked.
        assert_eq!(
            plan(&packs, &unbounded(0), PACK).repack,
            vec![packs[1], packs[0]]
        );
    }

    #[test]
    fn the_copy_bound_stops_a_pass_after_at_least_one_pack() {
        let packs = [usage(1, 100, 4, 40), usage(2, 100, 5, 50)];
        let bounded = GcPolicy {
            max_unused_percent: 0,
            max_copy_bytes: Some(10),
        };
        assert_eq!(plan(&packs, &bounded, PACK).repack, vec![packs[0]]);
    }

    #[test]
    fn small_packs_are_merged_once_there_are_too_many() {
        // Small: under a quarter of the pack size (400 here); none has an unused byte.
        let mut packs: Vec<PackUsage> = (0..SMALL_PACKS_KEPT as i64)
            .map(|n| usage(n, 50 - n as u64, 1, 50 - n as u64))
            .collect();
        packs.push(usage(100, 100, 9, 100)); // full: never merged
        packs.push(usage(101, 60, 0, 0)); // dead: deleted, not merged
        let before = plan(&packs, &unbounded(10), PACK);
        assert!(before.repack.is_empty());
        assert_eq!(before.dead, vec![packs[SMALL_PACKS_KEPT + 1]]);
        // One more small pack merges every small one, smallest (live bytes) first.
        packs.push(usage(200, 2, 1, 2));
        let plan_now = plan(&packs, &unbounded(10), PACK);
        let mut expected: Vec<PackUsage> = packs[..SMALL_PACKS_KEPT].to_vec();
        expected.push(packs[SMALL_PACKS_KEPT + 2]);
        expected.sort_by_key(|p| p.live_bytes);
        assert_eq!(plan_now.repack, expected);
        assert_eq!(plan_now.small, SMALL_PACKS_KEPT + 1);
        let report = plan_now.report(&packs);
        assert_eq!(report.merged_small_packs, SMALL_PACKS_KEPT as u64 + 1);
        // A pack repacked for its unused bytes counts once: the small ones left are then
        // no more than are kept.
        packs[0].live_bytes = 5;
        let plan_now = plan(&packs, &unbounded(0), PACK);
        assert_eq!(plan_now.repack, vec![packs[0]]);
        assert_eq!(plan_now.small, 0);
        // 100% leaves all repacking to `snapfs store prune`.
        assert!(plan(&packs, &unbounded(100), PACK).repack.is_empty());
        // Within the copy bound only; a merge of one pack would change nothing.
        let packs: Vec<PackUsage> = (1..=SMALL_PACKS_KEPT as i64 + 1)
            .map(|n| usage(n, n as u64, 1, n as u64))
            .collect();
        let bounded = |bytes| GcPolicy {
            max_copy_bytes: Some(bytes),
            ..unbounded(10)
        };
        assert_eq!(
            plan(&packs, &bounded(1 + 2 + 3), PACK).repack,
            packs[..3].to_vec()
        );
        assert_eq!(plan(&packs, &bounded(2), PACK).small, 0);
    }

    #[test]
    fn small_index_objects_are_merged_once_there_are_too_many() {
        let id = |n: u64| PackId::parse(&format!("{n:032x}")).expect("an index name");
        let listed_by = |index: u64, row: i64, live_blocks: u64| PackUsage {
            index: id(index),
            ..usage(row, 100, live_blocks, live_blocks * 10)
        };
        // One small index per upload: as many as are kept stay as they are.
        let mut packs: Vec<PackUsage> = (0..SMALL_INDEXES_KEPT as u64)
            .map(|n| listed_by(n, n as i64, 1))
            .collect();
        // An index whose packs all died is left to the dead packs' retirement.
        packs.push(listed_by(100, 100, 0));
        assert!(plan(&packs, &unbounded(100), PACK).merge.is_empty());
        // A full index is never merged; one more small one merges every small one.
        packs.extend((0..SMALL_INDEX_PACKS as i64).map(|n| listed_by(200, 1000 + n, 1)));
        assert!(small_indexes(&packs).is_empty());
        packs.push(listed_by(300, 300, 2));
        let plan = plan(&packs, &unbounded(100), PACK);
        let mut expected: Vec<PackId> = (0..SMALL_INDEXES_KEPT as u64).map(id).collect();
        expected.push(id(300));
        assert_eq!(plan.merge, expected);
        assert_eq!(plan.report(&packs).merged_indexes, expected.len() as u64);
        assert_eq!((plan.dead.len(), plan.repack.len()), (1, 0));
    }
}
