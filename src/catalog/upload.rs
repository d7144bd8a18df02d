//! The catalog's side of uploads: what each snapshot must send, what the store holds,
//! the directory trees of the manifests, and the store objects waiting to be deleted.
//!
//! The uploader handles snapshots one at a time in generation order. Its base is the
//! latest completed snapshot before the one at hand: every block that snapshot sees is
//! stored, so only blocks first mapped after it can be missing.

use rusqlite::{OptionalExtension, params};

use super::{Error, ReadTx, Result, SNAPSHOT_COLUMNS, Setting, SnapshotRow, VISIBLE, WriteTx};
use crate::blocks::BlockHash;
use crate::store::ObjectKey;

/// Rows of a versioned table whose life started or ended in `(:base, :g]`.
const CHANGED: &str = "((birth > :base AND birth <= :g) OR (death > :base AND death <= :g))";

pub(super) fn hash_of(bytes: Vec<u8>) -> Result<BlockHash> {
    BlockHash::try_from(bytes.as_slice())
        .map_err(|_| Error::Corrupt("a stored hash is not 32 bytes".into()))
}

/// What becomes of a store object queued for deletion (`object_fate`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ObjectFate {
    /// Its content came back since it was queued: it stays, and leaves the queue.
    Needed,
    /// A pack holds a copy that no index object lists yet: it goes once one does.
    Later,
    /// Nothing needs it.
    Unneeded,
}

/// What `complete_snapshot` found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Completion {
    Completed,
    /// Deleted while its manifest was written: nothing recorded.
    Deleted,
    /// Its base was deleted meanwhile: nothing recorded; write the manifest again.
    BaseChanged,
    /// A packed tree it names was freed meanwhile (the last snapshot naming it deleted):
    /// nothing recorded; write the manifest again, which packs the tree anew.
    TreesFreed,
}

impl ReadTx<'_> {
    pub fn setting(&self, setting: Setting) -> Result<Option<String>> {
        Ok(self
            .conn
            .query_row(
                "SELECT value FROM settings WHERE key = ?1",
                [setting.key()],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// The oldest snapshot still waiting for its upload.
    pub fn next_pending_snapshot(&self) -> Result<Option<SnapshotRow>> {
        let sql = format!(
            "SELECT {SNAPSHOT_COLUMNS} FROM snapshots WHERE state = 'pending'
             ORDER BY generation LIMIT 1"
        );
        self.conn
            .query_row(&sql, [], |r| Ok(SnapshotRow::try_from(r)))
            .optional()?
            .transpose()
    }

    pub fn snapshot(&self, id: u64) -> Result<Option<SnapshotRow>> {
        let sql = format!("SELECT {SNAPSHOT_COLUMNS} FROM snapshots WHERE id = ?1");
        self.conn
            .query_row(&sql, [id], |r| Ok(SnapshotRow::try_from(r)))
            .optional()?
            .transpose()
    }

    /// The generation of the latest completed snapshot before generation `g` (0: none).
    pub fn upload_base(&self, g: u64) -> Result<u64> {
        Ok(self.conn.query_row(
            "SELECT coalesce(max(generation), 0) FROM snapshots
             WHERE generation < ?1 AND state = 'completed'",
            [g],
            |r| r.get(0),
        )?)
    }

    /// The blocks snapshot `g` sees that the store lacks: those mapped after `base` (the
    /// block-map birth index reads only them) and not yet stored. In file order (inode,
    /// then block), so a file's blocks, and files made together, share packs.
    pub fn upload_set(&self, base: u64, g: u64) -> Result<Vec<(BlockHash, u32)>> {
        let mut blocks = self.blocks_with_len(
            "SELECT b.hash, b.len FROM blockmap m JOIN blocks b ON b.hash = m.hash
             WHERE m.birth > :base AND m.birth <= :g AND (m.death IS NULL OR m.death > :g)
               AND b.stored = 0
             ORDER BY m.ino, m.idx",
            rusqlite::named_params! {":base": base, ":g": g},
        )?;
        let mut seen = std::collections::HashSet::with_capacity(blocks.len());
        blocks.retain(|(hash, _)| seen.insert(*hash));
        Ok(blocks)
    }

    /// The (hash, length) rows of a query on `blocks`.
    fn blocks_with_len(
        &self,
        sql: &str,
        params: impl rusqlite::Params,
    ) -> Result<Vec<(BlockHash, u32)>> {
        let mut stmt = self.conn.prepare_cached(sql)?;
        let mut rows = stmt.query(params)?;
        let mut found = Vec::new();
        while let Some(row) = rows.next()? {
            found.push((hash_of(row.get(0)?)?, row.get(1)?));
        }
        Ok(found)
    }

    /// Blocks safe in the store that are also on the local disk: what a bounded cache may
    /// evict. Not those in the catalog itself: evicting them would free no block file.
    pub fn evictable_blocks(&self) -> Result<Vec<(BlockHash, u32)>> {
        self.blocks_with_len(
            "SELECT hash, len FROM blocks b WHERE stored != 0 AND local = 1
             AND NOT EXISTS (SELECT 1 FROM inline_blocks i WHERE i.hash = b.hash)",
            [],
        )
    }

    /// Whether block `hash` comes from the origin volume's store (`--from`) rather than
    /// this volume's.
    pub fn block_in_origin(&self, hash: &BlockHash) -> Result<bool> {
        Ok(self
            .conn
            .prepare_cached("SELECT 1 FROM blocks WHERE hash = ?1 AND stored = 2")?
            .exists([hash.as_bytes()])?)
    }

    /// Which of `hashes` are blocks of the volume's origin not on the local disk.
    pub fn origin_blocks_to_fetch(&self, hashes: &[BlockHash]) -> Result<Vec<bool>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT 1 FROM blocks WHERE hash = ?1 AND stored = 2 AND local = 0")?;
        hashes
            .iter()
            .map(|hash| Ok(stmt.exists([hash.as_bytes()])?))
            .collect()
    }

    /// Whether some live directory entry names `ino`.
    pub fn is_linked(&self, ino: u64) -> Result<bool> {
        Ok(self
            .conn
            .prepare_cached("SELECT 1 FROM dentries WHERE ino = ?1 AND death IS NULL")?
            .exists([ino])?)
    }

    /// Directories whose tree object differs between generations `base` and `g`: those
    /// with an entry added, removed or changed (attributes, data, xattrs), and their
    /// ancestors. Read from the generation indexes: unchanged parts are not visited.
    pub fn dirs_to_rewrite(&self, base: u64, g: u64) -> Result<Vec<u64>> {
        let sql = format!(
            "WITH RECURSIVE
             changed(ino) AS (
                 SELECT ino FROM inodes WHERE {CHANGED}
                 UNION SELECT ino FROM blockmap WHERE {CHANGED}
                 UNION SELECT ino FROM xattrs WHERE {CHANGED}),
             touched(dir) AS (
                 SELECT parent FROM dentries WHERE {CHANGED}
                 UNION SELECT d.parent FROM dentries d JOIN changed c ON d.ino = c.ino
                     WHERE d.birth <= :g AND (d.death IS NULL OR d.death > :g)
                 UNION SELECT {root}),
             upward(dir) AS (
                 SELECT dir FROM touched
                 UNION SELECT i.parent FROM upward u JOIN inodes i ON i.ino = u.dir
                     WHERE i.birth <= :g AND (i.death IS NULL OR i.death > :g)
                       AND i.ino != i.parent)
             SELECT u.dir FROM upward u JOIN inodes i ON i.ino = u.dir
             WHERE i.kind = 2 AND i.birth <= :g AND (i.death IS NULL OR i.death > :g)",
            root = super::ROOT_INO
        );
        let mut stmt = self.conn.prepare_cached(&sql)?;
        let dirs = stmt.query_map(rusqlite::named_params! {":base": base, ":g": g}, |r| {
            r.get(0)
        })?;
        Ok(dirs.collect::<rusqlite::Result<_>>()?)
    }

    /// Directories that existed at `base` and are gone at `g`: their trees are retired.
    pub fn dirs_removed(&self, base: u64, g: u64) -> Result<Vec<u64>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT DISTINCT ino FROM inodes o
             WHERE kind = 2 AND death > :base AND death <= :g AND NOT EXISTS (
                 SELECT 1 FROM inodes i WHERE i.ino = o.ino
                     AND i.birth <= :g AND (i.death IS NULL OR i.death > :g))",
        )?;
        let dirs = stmt.query_map(rusqlite::named_params! {":base": base, ":g": g}, |r| {
            r.get(0)
        })?;
        Ok(dirs.collect::<rusqlite::Result<_>>()?)
    }

    /// The tree object of directory `ino` in the manifest of generation `view`.
    pub fn tree_at(&self, view: u64, ino: u64) -> Result<Option<BlockHash>> {
        let sql = format!("SELECT hash FROM dir_trees WHERE ino = :ino AND {VISIBLE}");
        self.conn
            .prepare_cached(&sql)?
            .query_row(rusqlite::named_params! {":ino": ino, ":g": view}, |r| {
                r.get::<_, Vec<u8>>(0)
            })
            .optional()?
            .map(hash_of)
            .transpose()
    }

    /// Every extended attribute of `ino` as generation `view` sees them, by name.
    pub fn xattrs_of(&self, view: u64, ino: u64) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let sql =
            format!("SELECT name, value FROM xattrs WHERE ino = :ino AND {VISIBLE} ORDER BY name");
        let mut stmt = self.conn.prepare_cached(&sql)?;
        let rows = stmt.query_map(rusqlite::named_params! {":ino": ino, ":g": view}, |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Completed snapshots renamed or retagged since their manifest object was written.
    pub fn stale_manifests(&self) -> Result<Vec<SnapshotRow>> {
        self.snapshot_rows(
            "WHERE state = 'completed' AND manifest_written != manifest_version ORDER BY id",
        )
    }

    /// The version of snapshot `id`'s name and tags, to pass to `manifest_written` once a
    /// manifest object made from them is stored.
    pub fn manifest_version(&self, id: u64) -> Result<i64> {
        Ok(self.conn.query_row(
            "SELECT manifest_version FROM snapshots WHERE id = ?1",
            [id],
            |r| r.get(0),
        )?)
    }

    /// Up to `limit` store objects waiting to be deleted, snapshot objects before
    /// anything else, then index objects: the store must never hold a snapshot whose
    /// trees or blocks are gone, nor an index naming a deleted pack, even if the deletion
    /// is cut short.
    pub fn store_deletions(&self, limit: u32) -> Result<Vec<String>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT key FROM store_deletions WHERE key >= ?2 AND key < ?3 LIMIT ?1",
        )?;
        for prefix in [ObjectKey::SNAPSHOTS, ObjectKey::INDEX] {
            let keys = stmt
                .query_map(params![limit, prefix, ObjectKey::prefix_end(prefix)], |r| {
                    r.get(0)
                })?;
            let first: Vec<String> = keys.collect::<rusqlite::Result<_>>()?;
            if !first.is_empty() {
                return Ok(first);
            }
        }
        let mut stmt = self
            .conn
            .prepare_cached("SELECT key FROM store_deletions LIMIT ?1")?;
        let keys = stmt.query_map([limit], |r| r.get(0))?;
        Ok(keys.collect::<rusqlite::Result<_>>()?)
    }

    /// Whether the object under `key` is needed again (its content came back since it was
    /// queued, or waits for its index): then it must not be deleted.
    pub fn object_needed(&self, key: &str) -> Result<bool> {
        Ok(self.object_fate(key)? != ObjectFate::Unneeded)
    }

    /// What becomes of the object under `key`, queued for deletion.
    pub fn object_fate(&self, key: &str) -> Result<ObjectFate> {
        let (kind, name) = key.split_once('/').unwrap_or((key, ""));
        let exists = |sql: &str, value: &dyn rusqlite::ToSql| -> Result<ObjectFate> {
            Ok(match self.conn.prepare_cached(sql)?.exists([value])? {
                true => ObjectFate::Needed,
                false => ObjectFate::Unneeded,
            })
        };
        let hash = || {
            blake3::Hash::from_hex(name)
                .map(|h| h.as_bytes().to_vec())
                .map_err(|_| Error::Corrupt(format!("bad key {key} in the deletion queue")))
        };
        // A block or tree whose object of its own (format 1) has a copy in a pack: the
        // object goes once an index object lists that pack.
        let packed_copy = |sql: &str| -> Result<ObjectFate> {
            let row: Option<(bool, bool)> = self
                .conn
                .prepare_cached(sql)?
                .query_row([hash()?], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            Ok(match row {
                None => ObjectFate::Unneeded,
                Some((false, _)) => ObjectFate::Needed,
                Some((true, false)) => ObjectFate::Later,
                Some((true, true)) => ObjectFate::Unneeded,
            })
        };
        match kind {
            "blocks" => packed_copy(
                "SELECT b.pack IS NOT NULL, p.indexed IS NOT NULL
                 FROM blocks b LEFT JOIN packs p ON p.id = b.pack WHERE b.hash = ?1",
            ),
            "trees" => packed_copy(
                "SELECT t.hash IS NOT NULL, p.indexed IS NOT NULL
                 FROM (SELECT 1 FROM dir_trees WHERE hash = ?1 LIMIT 1)
                 LEFT JOIN packed_trees t ON t.hash = ?1 LEFT JOIN packs p ON p.id = t.pack",
            ),
            "packs" => exists("SELECT 1 FROM packs WHERE name = ?1", &name),
            "index" => exists("SELECT 1 FROM packs WHERE indexed = ?1", &name),
            "snapshots" => match name.parse::<u64>() {
                Ok(id) => exists("SELECT 1 FROM snapshots WHERE id = ?1", &id),
                Err(_) => Ok(ObjectFate::Unneeded),
            },
            _ => Ok(ObjectFate::Unneeded),
        }
    }
}

impl WriteTx<'_> {
    pub fn set_setting(&self, setting: Setting, value: &str) -> Result<()> {
        self.conn.execute(
            "INSERT INTO settings (key, value) VALUES (?1, ?2)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            [setting.key(), value],
        )?;
        Ok(())
    }

    pub fn set_upload_totals(&self, id: u64, blocks: u64, bytes: u64) -> Result<()> {
        self.conn.execute(
            "UPDATE snapshots SET upload_blocks = ?2, upload_bytes = ?3 WHERE id = ?1",
            params![id, blocks, bytes],
        )?;
        Ok(())
    }

    /// Records whether a stored block (in this volume's store or its origin's) is on the
    /// local disk. Only those may leave it: `false` on a block no store has changes
    /// nothing (and returns false).
    pub fn set_block_local(&self, hash: &BlockHash, local: bool) -> Result<bool> {
        Ok(self
            .conn
            .prepare_cached("UPDATE blocks SET local = ?2 WHERE hash = ?1 AND stored != 0")?
            .execute(params![hash.as_bytes(), local])?
            > 0)
    }

    /// Maps block `idx` of `ino` to a block of the origin volume, which is in the origin's
    /// store and not yet on the local disk (`stored = 2`: never sent, never deleted).
    pub fn import_block(&self, ino: u64, idx: u64, hash: &BlockHash, len: u32) -> Result<()> {
        self.retire_key("blockmap", "ino = ?1 AND idx = ?2", &[&ino, &idx])?;
        self.conn
            .prepare_cached(
                "INSERT OR IGNORE INTO blocks (hash, len, stored, local) VALUES (?1, ?2, 2, 0)",
            )?
            .execute(params![hash.as_bytes(), len])?;
        self.conn
            .prepare_cached("INSERT INTO blockmap (ino, idx, birth, hash) VALUES (?1, ?2, ?3, ?4)")?
            .execute(params![ino, idx, self.g, hash.as_bytes()])?;
        Ok(())
    }

    /// Records the tree object the live directory `ino` now matches (a followed store's).
    /// A follower writes no manifest, so it keeps no history: one row per directory, the
    /// tree its live directory holds, which only its next sync changes.
    pub fn set_live_tree(&self, ino: u64, hash: &BlockHash) -> Result<()> {
        self.forget_live_tree(ino)?;
        self.conn
            .prepare_cached("INSERT INTO dir_trees (ino, birth, hash) VALUES (?1, ?2, ?3)")?
            .execute(params![ino, self.g, hash.as_bytes()])?;
        Ok(())
    }

    /// Forgets the tree a follower recorded for directory `ino` (gone from its live tree).
    pub fn forget_live_tree(&self, ino: u64) -> Result<()> {
        self.conn
            .prepare_cached("DELETE FROM dir_trees WHERE ino = ?1")?
            .execute([ino])?;
        Ok(())
    }

    /// Makes new inode numbers start above `ino` (after an import kept the origin's).
    pub fn reserve_inos_through(&self, ino: u64) -> Result<()> {
        self.forget_free_inos();
        self.conn.execute(
            "UPDATE meta SET value = max(value, ?1 + 1) WHERE key = 'next_ino'",
            [ino],
        )?;
        Ok(())
    }

    /// Marks snapshot `id` (generation `g`) completed, recording the directory trees its
    /// manifest wrote (against `base`) and retiring those of directories it no longer has.
    ///
    /// Only if nothing changed under the manifest while it was written: the snapshot is
    /// still pending (not deleted), and `base` is still the completed snapshot it builds
    /// on. A manifest reuses its base's trees for the directories that did not change; a
    /// base deleted meanwhile queued those trees for deletion, so the manifest must be
    /// written again against the base there is now.
    ///
    /// A promoted checkpoint may complete after newer snapshots did: its trees then hold
    /// only up to the next completed snapshot (or the next version of the directory's
    /// tree, if a deleted snapshot's lives on), and a tree it replaces is restored from
    /// there on, so every completed snapshot keeps seeing the trees of its own manifest.
    pub fn complete_snapshot(
        &self,
        id: u64,
        g: u64,
        base: u64,
        trees: &[(u64, BlockHash)],
        removed: &[u64],
        packed: &[BlockHash],
    ) -> Result<Completion> {
        let pending = self
            .conn
            .prepare_cached("SELECT 1 FROM snapshots WHERE id = ?1 AND state = 'pending'")?
            .exists([id])?;
        if !pending {
            return Ok(Completion::Deleted);
        }
        if self.upload_base(g)? != base {
            return Ok(Completion::BaseChanged);
        }
        for hash in packed {
            if !self.tree_packed(hash)? {
                return Ok(Completion::TreesFreed);
            }
        }
        let next: Option<u64> = self.conn.query_row(
            "SELECT min(generation) FROM snapshots WHERE generation > ?1 AND state = 'completed'",
            [g],
            |r| r.get(0),
        )?;
        let mut current = self.conn.prepare_cached(
            "SELECT birth, death, hash FROM dir_trees
             WHERE ino = ?1 AND birth <= ?2 AND (death IS NULL OR death > ?2)",
        )?;
        let mut retire = self
            .conn
            .prepare_cached("UPDATE dir_trees SET death = ?3 WHERE ino = ?1 AND birth = ?2")?;
        let mut insert = self.conn.prepare_cached(
            "INSERT INTO dir_trees (ino, birth, death, hash) VALUES (?1, ?2, ?3, ?4)",
        )?;
        // A version born after `g` (before `next`: its snapshot was deleted, a later one
        // still sees it) bounds the one `g` records.
        let mut born_after = self
            .conn
            .prepare_cached("SELECT min(birth) FROM dir_trees WHERE ino = ?1 AND birth > ?2")?;
        let mut replace = |ino: u64, hash: Option<&BlockHash>| -> Result<()> {
            type Found = (u64, Option<u64>, Vec<u8>);
            let existing: Option<Found> = current
                .query_row(params![ino, g], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .optional()?;
            if let Some((birth, death, old)) = &existing {
                if hash.is_some_and(|h| h.as_bytes().as_slice() == old.as_slice()) {
                    return Ok(());
                }
                retire.execute(params![ino, birth, g])?;
                // Completed snapshots from `next` on saw the old tree: it holds for them.
                if let Some(next) = next
                    && death.is_none_or(|death| death > next)
                {
                    insert.execute(params![ino, next, death, old])?;
                }
            }
            if let Some(hash) = hash {
                let later: Option<u64> = born_after.query_row(params![ino, g], |r| r.get(0))?;
                let death = [later, next].into_iter().flatten().min();
                insert.execute(params![ino, g, death, hash.as_bytes()])?;
            }
            Ok(())
        };
        for (ino, hash) in trees {
            replace(*ino, Some(hash))?;
        }
        for ino in removed {
            replace(*ino, None)?;
        }
        self.conn.execute(
            "UPDATE snapshots SET state = 'completed', error = NULL WHERE id = ?1",
            [id],
        )?;
        Ok(Completion::Completed)
    }

    pub fn manifest_written(&self, id: u64, version: i64) -> Result<()> {
        self.conn.execute(
            "UPDATE snapshots SET manifest_written = ?2 WHERE id = ?1",
            params![id, version],
        )?;
        Ok(())
    }

    pub fn fail_snapshot(&self, id: u64, reason: &str) -> Result<()> {
        self.conn.execute(
            "UPDATE snapshots SET state = 'failed', error = ?2 WHERE id = ?1",
            params![id, reason],
        )?;
        Ok(())
    }

    /// Queues the store objects of snapshot `id` (generation `g`) that nothing else
    /// needs: its manifest object, and the directory trees only it used. Trees matter only
    /// to completed snapshots (the bases of later manifests), so the bounds here are the
    /// completed snapshots around it, `previous` and `next`: no completed snapshot sees a
    /// tree born after `previous` that dies by `next`. With none after it, every tree born
    /// after `previous` goes (those of snapshots deleted earlier included, which a later
    /// one kept alive), and the trees `previous` sees become current again.
    pub(super) fn forget_snapshot_objects(&self, id: u64, g: u64) -> Result<()> {
        let mut queue = self
            .conn
            .prepare_cached("INSERT OR IGNORE INTO store_deletions (key) VALUES (?1)")?;
        queue.execute([ObjectKey::snapshot(id).as_str()])?;
        let (previous, next): (u64, Option<u64>) = self.conn.query_row(
            "SELECT (SELECT coalesce(max(generation), 0) FROM snapshots
                     WHERE generation < ?1 AND state = 'completed'),
                    (SELECT min(generation) FROM snapshots
                     WHERE generation > ?1 AND state = 'completed')",
            [g],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let freed: Vec<Vec<u8>> = match next {
            Some(next) => self
                .conn
                .prepare_cached(
                    // `death > ?1` follows from `birth > ?1`: it lets the death index
                    // read only the deaths in between, not the whole history.
                    "DELETE FROM dir_trees WHERE birth > ?1 AND death > ?1 AND death <= ?2
                     RETURNING hash",
                )?
                .query_map(params![previous, next], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?,
            None => {
                let freed = self
                    .conn
                    .prepare_cached("DELETE FROM dir_trees WHERE birth > ?1 RETURNING hash")?
                    .query_map([previous], |r| r.get(0))?
                    .collect::<rusqlite::Result<_>>()?;
                self.conn
                    .prepare_cached("UPDATE dir_trees SET death = NULL WHERE death > ?1")?
                    .execute([previous])?;
                freed
            }
        };
        let mut still_used = self
            .conn
            .prepare_cached("SELECT 1 FROM dir_trees WHERE hash = ?1")?;
        // A packed tree leaves its pack (garbage collection frees it); an older one is
        // an object of its own.
        let mut unpack = self
            .conn
            .prepare_cached("DELETE FROM packed_trees WHERE hash = ?1")?;
        for hash in freed {
            if !still_used.exists([&hash])? && unpack.execute([&hash])? == 0 {
                queue.execute([ObjectKey::tree(&hash_of(hash)?).as_str()])?;
            }
        }
        Ok(())
    }

    pub fn forget_deletion(&self, key: &str) -> Result<()> {
        self.conn
            .prepare_cached("DELETE FROM store_deletions WHERE key = ?1")?
            .execute([key])?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Barrier};

    use super::super::{Catalog, LIVE, ROOT_INO, Setting};

    /// The mount and the uploader each have a connection. A write transaction that reads
    /// before it writes must not fail when the other connection commits in between (a
    /// deferred transaction could not upgrade: SQLITE_BUSY at once, EIO to the user).
    #[test]
    fn a_write_transaction_survives_a_commit_by_the_other_connection() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("catalog.db");
        let mut mount = Catalog::open(&path, 4096, 0, (0, 0)).expect("open");
        let mut uploader = Catalog::open(&path, 4096, 0, (0, 0)).expect("second connection");
        let read_done = Arc::new(Barrier::new(2));
        let other = read_done.clone();
        let committer = std::thread::spawn(move || {
            other.wait();
            uploader
                .write(|tx| tx.set_setting(Setting::FollowedId, "1"))
                .expect("the other connection commits");
        });
        mount
            .write(|tx| {
                tx.inode(LIVE, ROOT_INO)?;
                read_done.wait();
                // Give the other connection time to try (it waits for our lock).
                std::thread::sleep(std::time::Duration::from_millis(50));
                tx.set_setting(Setting::FollowedId, "2")
            })
            .expect("read-then-write transaction");
        committer.join().expect("committer");
    }

    /// A deletion cut short must not leave a snapshot object whose trees or blocks are
    /// gone: snapshot objects are handed out first, alone.
    #[test]
    fn snapshot_objects_are_deleted_before_what_they_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut catalog =
            Catalog::open(&dir.path().join("catalog.db"), 4096, 0, (0, 0)).expect("open");
        let queued = ["blocks/aa", "snapshots/0000000001", "trees/bb", "blocks/cc"];
        catalog
            .write(|tx| {
                queued.iter().try_for_each(|key| {
                    tx.conn
                        .execute("INSERT INTO store_deletions (key) VALUES (?1)", [key])?;
                    Ok::<_, super::Error>(())
                })
            })
            .expect("queue");
        let first = catalog
            .read(|tx| tx.store_deletions(10))
            .expect("first batch");
        assert_eq!(first, vec!["snapshots/0000000001".to_owned()]);
        catalog
            .write(|tx| tx.forget_deletion("snapshots/0000000001"))
            .expect("forget");
        let second = catalog
            .read(|tx| tx.store_deletions(10))
            .expect("second batch");
        assert_eq!(second, vec!["blocks/aa", "blocks/cc", "trees/bb"]);
    }

    /// A block and a tree converted from objects of their own (format 1) into a pack:
    /// their old objects are queued, but stay until an index object lists the pack, so a
    /// reader with nothing but the bucket finds them at every step.
    #[test]
    fn a_converted_object_goes_once_an_index_lists_its_pack() {
        use super::super::ObjectFate;
        use crate::blocks::BlockHash;
        use crate::manifest::PackedBlock;
        use crate::store::{ObjectKey, random_id};

        let dir = tempfile::tempdir().expect("tempdir");
        let mut catalog =
            Catalog::open(&dir.path().join("catalog.db"), 4096, 0, (0, 0)).expect("open");
        let (block, tree) = (BlockHash::of(b"block"), BlockHash::of(b"tree"));
        let (block_key, tree_key) = (ObjectKey::block(&block), ObjectKey::tree(&tree));
        let fates = |catalog: &mut Catalog| {
            catalog
                .read(|tx| {
                    Ok::<_, super::Error>((tx.object_fate(&block_key)?, tx.object_fate(&tree_key)?))
                })
                .expect("fates")
        };
        catalog
            .write(|tx| {
                tx.conn.execute(
                    "INSERT INTO blocks (hash, len, refs, stored, local) VALUES (?1, 5, 1, 1, 0)",
                    [block.as_bytes()],
                )?;
                tx.conn.execute(
                    "INSERT INTO dir_trees (ino, birth, hash) VALUES (1, 1, ?1)",
                    [tree.as_bytes()],
                )?;
                tx.conn.execute(
                    "INSERT INTO blockmap (ino, idx, birth, hash) VALUES (5, 3, 1, ?1)",
                    [block.as_bytes()],
                )?;
                Ok::<_, super::Error>(())
            })
            .expect("format-1 rows");
        assert_eq!(
            fates(&mut catalog),
            (ObjectFate::Needed, ObjectFate::Needed)
        );
        let found = catalog
            .read(|tx| {
                Ok::<_, super::Error>((tx.format_1_blocks(None, 10)?, tx.format_1_trees(None, 10)?))
            })
            .expect("format-1 objects");
        assert_eq!(
            found,
            (vec![((5, 3, 1), block, 5, false)], vec![((1, 0, 1), tree)])
        );

        let (pack, index) = (random_id(), random_id());
        let frames = [
            PackedBlock {
                hash: block,
                offset: 0,
                length: 9,
                raw_length: 5,
            },
            PackedBlock {
                hash: tree,
                offset: 9,
                length: 8,
                raw_length: 4,
            },
        ];
        let row = catalog
            .write(|tx| {
                let row = tx.begin_pack(&pack, 100, 17)?;
                tx.record_converted(row, &frames)?;
                Ok::<_, super::Error>(row)
            })
            .expect("record the pack");
        assert_eq!(fates(&mut catalog), (ObjectFate::Later, ObjectFate::Later));
        let mut queued = catalog.read(|tx| tx.store_deletions(10)).expect("queue");
        queued.sort();
        assert_eq!(queued, vec![block_key.to_string(), tree_key.to_string()]);
        let left = catalog
            .read(|tx| {
                Ok::<_, super::Error>((tx.format_1_blocks(None, 10)?, tx.format_1_trees(None, 10)?))
            })
            .expect("format-1 objects");
        assert_eq!(left, (vec![], vec![]));

        catalog
            .write(|tx| tx.record_index(&index, &[row]))
            .expect("index");
        assert_eq!(
            fates(&mut catalog),
            (ObjectFate::Unneeded, ObjectFate::Unneeded)
        );
        let packs = catalog.read(|tx| tx.indexed_packs()).expect("packs");
        assert_eq!((packs[0].live_blocks, packs[0].live_bytes), (2, 17));
    }
}
