//! The catalog's side of packs (store format 2, `store/pack.rs`): which pack holds each
//! stored block and directory tree and where, how many live frames each pack still
//! holds, and which index object lists it. A pack is one row of `packs`; its blocks
//! (`blocks`) and trees (`packed_trees`) point at it.
//!
//! A pack's life: a row with `sent = 0` before its PUT (a crash then leaves a name to
//! delete, never an object nothing knows); `record_pack` (`record_tree_pack`) once it
//! landed, pointing its blocks (trees) at it; `record_index` once an index object lists
//! it; queued for deletion from the store when its last live frame is freed, and its index
//! object with its last pack.

use std::collections::{HashMap, HashSet};

use rusqlite::{OptionalExtension, params};

use super::upload::hash_of;
use super::{Error, ReadTx, Result, WriteTx};
use crate::blocks::BlockHash;
use crate::manifest::{PackId, PackListing, PackedBlock};
use crate::store::{BlockPlace, ObjectKey};

/// A pack the catalog knows, by its row id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackRow {
    pub row: i64,
    pub id: PackId,
}

/// A pack's use of the store (`indexed_packs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackUsage {
    pub pack: PackRow,
    /// Bytes of the pack object, and of the frames in it (the rest is its listing).
    pub size: u64,
    pub data_length: u64,
    pub live_blocks: u64,
    /// Bytes of its live blocks' frames.
    pub live_bytes: u64,
    /// The index object that lists it.
    pub index: PackId,
}

impl PackUsage {
    /// Bytes of the pack's frames no live block uses.
    pub fn unused(&self) -> u64 {
        self.data_length.saturating_sub(self.live_bytes)
    }
}

/// The store's packs in all (`pack_totals`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PackTotals {
    pub packs: u64,
    pub bytes: u64,
    /// Bytes of frames no live block uses: what garbage collection can free.
    pub unused_bytes: u64,
}

fn pack_id(name: String) -> Result<PackId> {
    PackId::parse(&name).ok_or_else(|| Error::Corrupt(format!("bad pack name {name:?}")))
}

/// A place in file order: (inode, block index, birth) of a `blockmap` row, or (inode, 0,
/// birth) of a `dir_trees` row.
pub type FileOrder = (u64, u64, i64);

fn packed_block(hash: &[u8], offset: u64, length: u32, raw_length: u32) -> Result<PackedBlock> {
    Ok(PackedBlock {
        hash: BlockHash::try_from(hash)
            .map_err(|_| Error::Corrupt("bad hash in the block table".into()))?,
        offset,
        length,
        raw_length,
    })
}

impl ReadTx<'_> {
    /// Whether a pack of the volume's store holds tree `hash`.
    pub fn tree_packed(&self, hash: &BlockHash) -> Result<bool> {
        Ok(self
            .conn
            .prepare_cached("SELECT 1 FROM packed_trees WHERE hash = ?1")?
            .exists([hash.as_bytes()])?)
    }

    /// Where this volume's store holds block `hash`; `None` if it does not (not sent, or
    /// the origin's).
    pub fn block_place(&self, hash: &BlockHash) -> Result<Option<BlockPlace>> {
        let row = self
            .conn
            .prepare_cached(
                "SELECT p.name, b.pack_offset, b.pack_length
                 FROM blocks b LEFT JOIN packs p ON p.id = b.pack
                 WHERE b.hash = ?1 AND b.stored = 1",
            )?
            .query_row([hash.as_bytes()], |r| {
                Ok((
                    r.get::<_, Option<String>>(0)?,
                    r.get::<_, Option<u64>>(1)?,
                    r.get::<_, Option<u32>>(2)?,
                ))
            })
            .optional()?;
        Ok(match row {
            None => None,
            Some((Some(name), Some(offset), Some(length))) => Some(BlockPlace::Packed {
                pack: pack_id(name)?,
                offset,
                length,
            }),
            Some(_) => Some(BlockPlace::Object),
        })
    }

    /// Up to `limit` places of blocks this volume's store holds as objects of their own
    /// (format 1), in file order (`blockmap`'s key) after `after` (from the first with
    /// `None`): each with the place, the block's length and whether the local disk holds
    /// it. A block shared by several places comes at each until it is packed.
    pub fn format_1_blocks(
        &self,
        after: Option<FileOrder>,
        limit: u32,
    ) -> Result<Vec<(FileOrder, BlockHash, u32, bool)>> {
        let (ino, idx, birth) = after.unwrap_or((0, 0, -1));
        let mut stmt = self.conn.prepare_cached(
            "SELECT m.ino, m.idx, m.birth, b.hash, b.len, b.local
             FROM blockmap m JOIN blocks b ON b.hash = m.hash
             WHERE (m.ino, m.idx, m.birth) > (?1, ?2, ?3) AND b.stored = 1 AND b.pack IS NULL
             ORDER BY m.ino, m.idx, m.birth LIMIT ?4",
        )?;
        let rows = stmt.query_map(params![ino, idx, birth, limit], |r| {
            Ok((
                (r.get(0)?, r.get(1)?, r.get(2)?),
                r.get::<_, Vec<u8>>(3)?,
                r.get(4)?,
                r.get(5)?,
            ))
        })?;
        let mut found = Vec::new();
        for row in rows {
            let (at, hash, len, local) = row?;
            found.push((at, hash_of(hash)?, len, local));
        }
        Ok(found)
    }

    /// Up to `limit` versions of directories whose tree this volume's store holds as an
    /// object of its own (format 1, or too large for a pack), in directory order
    /// (`dir_trees`' key) after `after`: each with its place and the tree's hash.
    pub fn format_1_trees(
        &self,
        after: Option<FileOrder>,
        limit: u32,
    ) -> Result<Vec<(FileOrder, BlockHash)>> {
        let (ino, _, birth) = after.unwrap_or((0, 0, -1));
        let mut stmt = self.conn.prepare_cached(
            "SELECT d.ino, d.birth, d.hash FROM dir_trees d
             WHERE (d.ino, d.birth) > (?1, ?2)
               AND NOT EXISTS (SELECT 1 FROM packed_trees p WHERE p.hash = d.hash)
             ORDER BY d.ino, d.birth LIMIT ?3",
        )?;
        let rows = stmt.query_map(params![ino, birth, limit], |r| {
            Ok((
                r.get::<_, u64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, Vec<u8>>(2)?,
            ))
        })?;
        let mut found = Vec::new();
        for row in rows {
            let (ino, birth, hash) = row?;
            found.push(((ino, 0, birth), hash_of(hash)?));
        }
        Ok(found)
    }

    /// How many objects of their own (format 1) the volume's store holds for its blocks
    /// and trees.
    pub fn format_1_objects(&self) -> Result<u64> {
        Ok(self.conn.query_row(
            "SELECT (SELECT count(*) FROM blocks WHERE stored = 1 AND pack IS NULL)
                  + (SELECT count(DISTINCT hash) FROM dir_trees d
                     WHERE NOT EXISTS (SELECT 1 FROM packed_trees p WHERE p.hash = d.hash))",
            [],
            |r| r.get(0),
        )?)
    }

    /// The packs that landed and that no index object lists yet, with the listing of
    /// their live blocks.
    pub fn unindexed_packs(&self) -> Result<Vec<(PackRow, PackListing)>> {
        self.listed_packs("sent = 1 AND indexed IS NULL", [])
    }

    /// The packs with a live block that index objects `indexes` list, except `except`
    /// (rows), with the listing of their live blocks: what an index replacing those
    /// objects must list.
    pub fn packs_listed_by(
        &self,
        indexes: &[PackId],
        except: &HashSet<i64>,
    ) -> Result<Vec<(PackRow, PackListing)>> {
        let mut found = Vec::new();
        for index in indexes {
            let listed = self.listed_packs("blocks > 0 AND indexed = ?1", [index.to_string()])?;
            found.extend(
                listed
                    .into_iter()
                    .filter(|(pack, _)| !except.contains(&pack.row)),
            );
        }
        Ok(found)
    }

    fn listed_packs(
        &self,
        condition: &str,
        args: impl rusqlite::Params,
    ) -> Result<Vec<(PackRow, PackListing)>> {
        let packs = self
            .conn
            .prepare_cached(&format!(
                "SELECT id, name, data_length FROM packs WHERE {condition} ORDER BY id"
            ))?
            .query_map(args, |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<rusqlite::Result<Vec<(i64, String, u64)>>>()?;
        let mut found = Vec::with_capacity(packs.len());
        for (row, name, data_length) in packs {
            found.push((
                PackRow {
                    row,
                    id: pack_id(name)?,
                },
                PackListing {
                    data_length,
                    blocks: self.blocks_in_pack(row)?,
                },
            ));
        }
        Ok(found)
    }

    /// The blocks the catalog points at pack `row`, in offset order.
    fn blocks_in_pack(&self, row: i64) -> Result<Vec<PackedBlock>> {
        Ok(self
            .live_in_pack(row)?
            .into_iter()
            .map(|(block, _)| block)
            .collect())
    }

    /// The live blocks and trees of pack `row` in their order in it, each with whether
    /// the local disk holds it too (a tree never: only the store has it).
    pub fn live_in_pack(&self, row: i64) -> Result<Vec<(PackedBlock, bool)>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT hash, pack_offset, pack_length, len, local FROM blocks WHERE pack = ?1
             UNION ALL
             SELECT hash, pack_offset, pack_length, len, 0 FROM packed_trees WHERE pack = ?1
             ORDER BY pack_offset",
        )?;
        stmt.query_map([row], |r| {
            Ok((
                r.get::<_, Vec<u8>>(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
            ))
        })?
        .map(|row| {
            let (hash, offset, length, raw_length, local) = row?;
            Ok((packed_block(&hash, offset, length, raw_length)?, local))
        })
        .collect()
    }

    /// The packs of the store that index objects list, with their size and live bytes:
    /// what garbage collection chooses from.
    pub fn indexed_packs(&self) -> Result<Vec<PackUsage>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, name, size, data_length, blocks, live_bytes, indexed FROM packs
             WHERE sent = 1 AND indexed IS NOT NULL ORDER BY id",
        )?;
        stmt.query_map([], |r| {
            Ok((
                (r.get(0)?, r.get::<_, String>(1)?),
                (r.get(2)?, r.get(3)?),
                (r.get::<_, i64>(4)?, r.get::<_, i64>(5)?),
                r.get::<_, String>(6)?,
            ))
        })?
        .map(|row| {
            let ((row, name), (size, data_length), (blocks, live_bytes), indexed) = row?;
            Ok(PackUsage {
                pack: PackRow {
                    row,
                    id: pack_id(name)?,
                },
                size,
                data_length,
                live_blocks: blocks.max(0) as u64,
                live_bytes: live_bytes.max(0) as u64,
                index: pack_id(indexed)?,
            })
        })
        .collect()
    }

    /// The packs an index object lists that hold no live block (found through the
    /// `packs_empty` index, without a scan), with that index object.
    pub fn dead_indexed_packs(&self) -> Result<Vec<(i64, PackId)>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, indexed FROM packs
             WHERE sent = 1 AND blocks <= 0 AND indexed IS NOT NULL",
        )?;
        stmt.query_map([], |r| Ok((r.get(0)?, r.get::<_, String>(1)?)))?
            .map(|row| {
                let (row, index) = row?;
                Ok((row, pack_id(index)?))
            })
            .collect()
    }

    /// The store's packs in all: how many, their bytes, and the bytes of their live
    /// blocks (the rest is what garbage collection can free).
    pub fn pack_totals(&self) -> Result<PackTotals> {
        Ok(self.conn.query_row(
            "SELECT count(*), coalesce(sum(size), 0),
                 coalesce(sum(max(data_length - max(live_bytes, 0), 0)), 0)
             FROM packs WHERE sent = 1",
            [],
            |r| {
                Ok(PackTotals {
                    packs: r.get(0)?,
                    bytes: r.get(1)?,
                    unused_bytes: r.get(2)?,
                })
            },
        )?)
    }

    /// The small blocks (frames under `small` bytes) of pack `pack` that start after
    /// `offset` and within `span` bytes of it and are not on the local disk: what one
    /// range read of the pack from a block at `offset` brings back with it.
    pub fn pack_neighbours(
        &self,
        pack: &PackId,
        offset: u64,
        span: u64,
        small: u32,
    ) -> Result<Vec<PackedBlock>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT b.hash, b.pack_offset, b.pack_length, b.len
             FROM packs p JOIN blocks b ON b.pack = p.id
             WHERE p.name = ?1 AND b.pack_offset > ?2 AND b.pack_offset < ?3
               AND b.pack_length < ?4 AND b.local = 0 AND b.stored = 1
             ORDER BY b.pack_offset",
        )?;
        stmt.query_map(
            params![pack.to_string(), offset, offset + span, small],
            |r| Ok((r.get::<_, Vec<u8>>(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )?
        .map(|row| {
            let (hash, offset, length, raw_length) = row?;
            packed_block(&hash, offset, length, raw_length)
        })
        .collect()
    }
}

impl WriteTx<'_> {
    /// Records that pack `id` (`size` bytes, its frames `data_length` of them) is about
    /// to be sent.
    pub fn begin_pack(&self, id: &PackId, size: u64, data_length: u64) -> Result<PackRow> {
        self.conn
            .prepare_cached("INSERT INTO packs (name, size, data_length) VALUES (?1, ?2, ?3)")?
            .execute(params![id.to_string(), size, data_length])?;
        Ok(PackRow {
            row: self.conn.last_insert_rowid(),
            id: *id,
        })
    }

    /// Records that `pack` landed holding `listing`, and the progress of snapshot
    /// `snapshot`. Blocks freed while it was sent do not count as its live blocks (a pack
    /// left with none is queued for deletion at once), nor do blocks another pack has.
    pub fn record_pack(
        &self,
        snapshot: u64,
        pack: PackRow,
        size: u64,
        listing: &PackListing,
    ) -> Result<()> {
        let mut point = self.conn.prepare_cached(
            "UPDATE blocks SET stored = 1, pack = ?2, pack_offset = ?3, pack_length = ?4
             WHERE hash = ?1 AND stored = 0",
        )?;
        self.fill_pack(pack, &listing.blocks, |block| {
            point.execute(params![
                block.hash.as_bytes(),
                pack.row,
                block.offset,
                block.length
            ])
        })?;
        let raw: u64 = listing
            .blocks
            .iter()
            .map(|block| u64::from(block.raw_length))
            .sum();
        self.conn
            .prepare_cached(
                "UPDATE snapshots SET sent_blocks = sent_blocks + ?2,
                     sent_bytes = sent_bytes + ?3, stored_bytes = stored_bytes + ?4
                 WHERE id = ?1",
            )?
            .execute(params![snapshot, listing.blocks.len() as u64, raw, size])?;
        self.queue_dead_packs()
    }

    /// Records that pack `pack` landed holding the trees of `listing`, written with a
    /// manifest. A tree another pack holds already is not counted as this one's (a pack
    /// left with none is queued for deletion at once).
    pub fn record_tree_pack(&self, pack: PackRow, listing: &PackListing) -> Result<()> {
        let mut insert = self.conn.prepare_cached(
            "INSERT OR IGNORE INTO packed_trees (hash, pack, pack_offset, pack_length, len)
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        self.fill_pack(pack, &listing.blocks, |tree| {
            insert.execute(params![
                tree.hash.as_bytes(),
                pack.row,
                tree.offset,
                tree.length,
                tree.raw_length
            ])
        })?;
        self.queue_dead_packs()
    }

    /// Records that pack `pack` landed holding `blocks`, copies of live blocks and trees
    /// of other packs (`from`: the row of the pack each comes from): garbage collection
    /// moving them out of packs mostly unused. One freed meanwhile, or no longer in the
    /// pack it was copied from, stays where it is.
    pub fn record_repacked(
        &self,
        pack: PackRow,
        blocks: &[PackedBlock],
        from: &HashMap<BlockHash, i64>,
    ) -> Result<()> {
        let mut moved_block = self.conn.prepare_cached(
            "UPDATE blocks SET pack = ?2, pack_offset = ?3, pack_length = ?4
             WHERE hash = ?1 AND pack = ?5 AND stored = 1",
        )?;
        let mut moved_tree = self.conn.prepare_cached(
            "UPDATE packed_trees SET pack = ?2, pack_offset = ?3, pack_length = ?4
             WHERE hash = ?1 AND pack = ?5",
        )?;
        self.fill_pack(pack, blocks, |block| {
            let Some(from) = from.get(&block.hash) else {
                return Ok(0);
            };
            let moved = params![
                block.hash.as_bytes(),
                pack.row,
                block.offset,
                block.length,
                from
            ];
            Ok(moved_block.execute(moved)? + moved_tree.execute(moved)?)
        })?;
        // Left with no block, it goes at once: no index lists it yet.
        self.queue_dead_packs()
    }

    /// Records that pack `pack` landed holding `blocks`, copies of blocks and trees the
    /// store held as objects of their own (format 1): they are pointed at the pack, and
    /// their old objects queued for deletion, which waits until an index object lists the
    /// pack (`object_fate`). One freed meanwhile, or packed meanwhile, stays as it is.
    pub fn record_converted(&self, pack: PackRow, blocks: &[PackedBlock]) -> Result<()> {
        let mut moved_block = self.conn.prepare_cached(
            "UPDATE blocks SET pack = ?2, pack_offset = ?3, pack_length = ?4
             WHERE hash = ?1 AND pack IS NULL AND stored = 1",
        )?;
        // A frame of the same bytes serves a block and a tree of the same hash alike.
        let mut moved_tree = self.conn.prepare_cached(
            "INSERT OR IGNORE INTO packed_trees (hash, pack, pack_offset, pack_length, len)
             SELECT ?1, ?2, ?3, ?4, ?5 WHERE EXISTS (SELECT 1 FROM dir_trees WHERE hash = ?1)",
        )?;
        let mut queue = self
            .conn
            .prepare_cached("INSERT OR IGNORE INTO store_deletions (key) VALUES (?1)")?;
        self.fill_pack(pack, blocks, |frame| {
            let at = params![frame.hash.as_bytes(), pack.row, frame.offset, frame.length];
            let mut moved = 0;
            if moved_block.execute(at)? > 0 {
                queue.execute([ObjectKey::block(&frame.hash).as_str()])?;
                moved += 1;
            }
            let tree = params![
                frame.hash.as_bytes(),
                pack.row,
                frame.offset,
                frame.length,
                frame.raw_length
            ];
            if moved_tree.execute(tree)? > 0 {
                queue.execute([ObjectKey::tree(&frame.hash).as_str()])?;
                moved += 1;
            }
            Ok(moved)
        })?;
        self.queue_dead_packs()
    }

    /// Marks `pack` sent, counting as its live blocks those of `blocks` that `point`
    /// (which points one at the pack; how many rows it changed) pointed at it.
    fn fill_pack(
        &self,
        pack: PackRow,
        blocks: &[PackedBlock],
        mut point: impl FnMut(&PackedBlock) -> rusqlite::Result<usize>,
    ) -> Result<()> {
        let (mut live, mut live_bytes) = (0u64, 0u64);
        for block in blocks {
            if point(block)? > 0 {
                live += 1;
                live_bytes += u64::from(block.length);
            }
        }
        self.conn
            .prepare_cached(
                "UPDATE packs SET sent = 1, blocks = blocks + ?2, live_bytes = live_bytes + ?3
                 WHERE id = ?1",
            )?
            .execute(params![pack.row, live, live_bytes])?;
        Ok(())
    }

    /// Records that index object `index` is about to be written: queued for deletion until
    /// `record_index` makes packs point at it, so a crash during its PUT leaves a name to
    /// delete rather than an object nothing knows.
    pub fn begin_index(&self, index: &PackId) -> Result<()> {
        self.conn
            .prepare_cached("INSERT OR IGNORE INTO store_deletions (key) VALUES (?1)")?
            .execute([ObjectKey::index(index).as_str()])?;
        Ok(())
    }

    /// Deletes the packs of `rows` that hold no live block, queueing their objects for
    /// deletion from the store, and the index objects that no longer list a pack. Called
    /// once an index object lists every live pack that the packs' index objects list:
    /// deletions run index objects first, so no index ever names a deleted pack. Returns
    /// the packs deleted and their bytes.
    pub fn retire_packs(&self, rows: &[i64]) -> Result<(u64, u64)> {
        let mut doomed = Vec::new();
        let mut delete = self.conn.prepare_cached(
            "DELETE FROM packs WHERE id = ?1 AND blocks <= 0 RETURNING name, indexed, size",
        )?;
        for row in rows {
            if let Some(found) = delete
                .query_row([row], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .optional()?
            {
                doomed.push(found);
            }
        }
        drop(delete);
        let retired = (
            doomed.len() as u64,
            doomed.iter().map(|(_, _, size)| size).sum(),
        );
        self.queue_retired(doomed.into_iter().map(|(name, indexed, _)| (name, indexed)))?;
        Ok(retired)
    }

    /// Records that index object `index` lists `packs`.
    pub fn record_index(&self, index: &PackId, packs: &[PackRow]) -> Result<()> {
        let mut stmt = self
            .conn
            .prepare_cached("UPDATE packs SET indexed = ?2 WHERE id = ?1")?;
        let mut listed = 0;
        for pack in packs {
            listed += stmt.execute(params![pack.row, index.to_string()])?;
        }
        // Every pack it lists died while it was written: nothing keeps it.
        if listed == 0 {
            self.conn
                .prepare_cached("INSERT OR IGNORE INTO store_deletions (key) VALUES (?1)")?
                .execute([ObjectKey::index(index).as_str()])?;
        }
        Ok(())
    }

    /// Records that the volume's store holds block `hash` as an object of its own
    /// (`verify --repair` wrote it there in place of a lost or damaged copy in a pack).
    pub fn set_block_unpacked(&self, hash: &BlockHash) -> Result<()> {
        self.conn
            .prepare_cached(
                "UPDATE blocks SET pack = NULL, pack_offset = NULL, pack_length = NULL
                 WHERE hash = ?1 AND stored = 1",
            )?
            .execute([hash.as_bytes()])?;
        self.queue_dead_packs()
    }

    /// Queues for deletion the packs whose PUT a crash or an unmount cut short, and
    /// forgets the packed trees of manifests never completed (a crash, a snapshot deleted
    /// meanwhile, a manifest written again): called when no upload is under way.
    pub fn abandon_unsent_packs(&self) -> Result<()> {
        self.conn
            .prepare_cached(
                "DELETE FROM packed_trees
                 WHERE NOT EXISTS (SELECT 1 FROM dir_trees d WHERE d.hash = packed_trees.hash)",
            )?
            .execute([])?;
        // Such a pack counts no block yet: the condition lets the partial index serve.
        self.queue_packs("sent = 0 AND blocks <= 0")?;
        self.queue_dead_packs()
    }

    /// Queues for deletion from the store the packs no live block is in and that no
    /// index object lists (freed before their index was written). Those an index lists
    /// wait for garbage collection (`retire_packs`), which first writes an index without
    /// them.
    pub(super) fn queue_dead_packs(&self) -> Result<()> {
        self.queue_packs("sent = 1 AND blocks <= 0 AND indexed IS NULL")
    }

    fn queue_packs(&self, condition: &str) -> Result<()> {
        let doomed: Vec<(String, Option<String>)> = self
            .conn
            .prepare_cached(&format!(
                "DELETE FROM packs WHERE {condition} RETURNING name, indexed"
            ))?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        self.queue_retired(doomed.into_iter())
    }

    /// Queues deleted packs (name, index object listing them) for deletion from the
    /// store, and each index object no pack row names any more.
    fn queue_retired(&self, packs: impl Iterator<Item = (String, Option<String>)>) -> Result<()> {
        let mut queue = self
            .conn
            .prepare_cached("INSERT OR IGNORE INTO store_deletions (key) VALUES (?1)")?;
        let mut still_listing = self
            .conn
            .prepare_cached("SELECT 1 FROM packs WHERE indexed = ?1")?;
        for (name, indexed) in packs {
            queue.execute([ObjectKey::pack(&pack_id(name)?).as_str()])?;
            if let Some(index) = indexed
                && !still_listing.exists([&index])?
            {
                queue.execute([ObjectKey::index(&pack_id(index)?).as_str()])?;
            }
        }
        Ok(())
    }
}

impl ReadTx<'_> {
    /// Pack `id` if it landed, with the listing of the blocks the catalog points at it
    /// (`verify --repair` checks a pack's own listing against it).
    pub fn landed_pack(&self, id: &PackId) -> Result<Option<(PackRow, PackListing)>> {
        let found = self
            .conn
            .prepare_cached("SELECT id, data_length FROM packs WHERE name = ?1 AND sent = 1")?
            .query_row([id.to_string()], |r| Ok((r.get::<_, i64>(0)?, r.get(1)?)))
            .optional()?;
        let Some((row, data_length)) = found else {
            return Ok(None);
        };
        let listing = PackListing {
            data_length,
            blocks: self.blocks_in_pack(row)?,
        };
        Ok(Some((PackRow { row, id: *id }, listing)))
    }
}

impl WriteTx<'_> {
    /// Records that new index object `index` lists `packs` in place of the index objects
    /// that listed them, and queues for deletion those that now list no pack.
    pub fn reindex(&self, index: &PackId, packs: &[PackRow]) -> Result<()> {
        let mut was = self
            .conn
            .prepare_cached("SELECT indexed FROM packs WHERE id = ?1 AND indexed IS NOT NULL")?;
        let mut previous = Vec::new();
        for pack in packs {
            if let Some(name) = was
                .query_row([pack.row], |r| r.get::<_, String>(0))
                .optional()?
            {
                previous.push(pack_id(name)?);
            }
        }
        self.record_index(index, packs)?;
        let mut queue = self
            .conn
            .prepare_cached("INSERT OR IGNORE INTO store_deletions (key) VALUES (?1)")?;
        for old in previous {
            let key = ObjectKey::index(&old);
            if !self.object_needed(key.as_str())? {
                queue.execute([key.as_str()])?;
            }
        }
        Ok(())
    }
}
