//! The catalog's side of `snapfs verify`: SQLite's own integrity check and the invariants
//! snapfs keeps (generations, references, counts), each reported as findings naming rows.

use std::collections::HashSet;

use rusqlite::types::Value;

use super::{BlockLocation, Error, LIVE, ReadTx, Result, WriteTx};
use crate::blocks::{self, BlockHash};
use crate::manifest::PackId;
use crate::store::BlockPlace;

/// Examples listed per kind of problem; the count covers them all.
const EXAMPLES: usize = 10;

/// One kind of problem found: how many rows have it and a few of them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub problem: String,
    pub count: u64,
    pub examples: Vec<String>,
}

/// A block as the catalog records it.
#[derive(Clone, Copy, Debug)]
pub struct BlockRecord {
    pub hash: BlockHash,
    pub len: u32,
    pub stored: BlockLocation,
    /// Where the volume's store holds it (`stored` is `Store`).
    pub place: Option<BlockPlace>,
    pub local: bool,
    /// Its bytes are in the catalog (a small block), not in a block file.
    pub inline: bool,
}

/// Versioned tables: their key, and how a row's key reads in a report.
const VERSIONED: [(&str, &str, &str); 5] = [
    ("inodes", "ino", "'ino', ino"),
    ("dentries", "parent, name", "'dir', parent, name"),
    ("blockmap", "ino, idx", "'ino', ino, 'block', idx"),
    ("xattrs", "ino, name", "'ino', ino, name"),
    ("dir_trees", "ino", "'dir', ino"),
];

impl ReadTx<'_> {
    /// SQLite's integrity check: page structure, indexes matching their tables.
    pub fn integrity_check(&self) -> Result<Vec<String>> {
        let mut stmt = self.conn.prepare("PRAGMA integrity_check")?;
        let lines = stmt.query_map([], |r| r.get::<_, String>(0))?;
        let mut problems = Vec::new();
        for line in lines {
            let line = line?;
            if line != "ok" {
                problems.push(line);
            }
        }
        Ok(problems)
    }

    /// Checks every invariant that holds whatever the volume went through: generations
    /// in order and never overlapping for one key, block reference counts, the byte
    /// count, and each view (the live volume and every snapshot) being a well-formed tree.
    pub fn invariant_findings(&self, block_size: u64) -> Result<Vec<Finding>> {
        let g = self.g;
        let mut findings = Vec::new();
        let mut check = |problem: String, sql: &str, params: &[Value]| -> Result<()> {
            if let Some(finding) = self.find(problem, sql, params)? {
                findings.push(finding);
            }
            Ok(())
        };
        for (table, key, label) in VERSIONED {
            check(
                format!("{table} rows whose life is empty or beyond the live generation {g}"),
                &format!(
                    "SELECT {label}, 'born', birth, 'died', death FROM {table}
                     WHERE birth > ?1 OR death <= birth OR death > ?1"
                ),
                &[Value::Integer(g as i64)],
            )?;
            check(
                format!("{table} rows overlapping another version of the same key"),
                &format!(
                    "SELECT {label}, 'born', birth, 'died', death FROM (
                         SELECT {key}, birth, death,
                                lead(birth) OVER (PARTITION BY {key} ORDER BY birth) AS next
                         FROM {table})
                     WHERE next IS NOT NULL AND (death IS NULL OR death > next)"
                ),
                &[],
            )?;
        }
        check(
            "blocks whose reference count is wrong".into(),
            "WITH used AS (SELECT hash, count(*) AS n FROM blockmap GROUP BY hash)
             SELECT lower(hex(b.hash)), 'counted', b.refs, 'mapped', coalesce(used.n, 0)
             FROM blocks b
             LEFT JOIN used ON used.hash = b.hash WHERE b.refs != coalesce(used.n, 0)",
            &[],
        )?;
        check(
            "block map entries naming a block the catalog does not have".into(),
            "SELECT 'ino', ino, 'block', idx, 'born', birth, lower(hex(hash)) FROM blockmap m
             WHERE NOT EXISTS (SELECT 1 FROM blocks b WHERE b.hash = m.hash)",
            &[],
        )?;
        check(
            "piece values that do not fit a block the catalog has (reads refuse them)".into(),
            "SELECT lower(hex(p.hash)), 'values of', length(p.piece_values), 'bytes for',
                    p.len, 'bytes; the block has', b.len
             FROM block_pieces p LEFT JOIN blocks b ON b.hash = p.hash
             WHERE b.len IS NOT p.len
                OR length(p.piece_values) NOT IN ((p.len + ?1 - 1) / ?1 * ?3,
                                                  (p.len + ?2 - 1) / ?2 * ?3)",
            &[
                Value::Integer(blocks::PIECE as i64),
                Value::Integer(blocks::WIDE_PIECE as i64),
                Value::Integer(blocks::PIECE_VALUE_LEN as i64),
            ],
        )?;
        check(
            "blocks evicted from the local disk but never stored".into(),
            "SELECT lower(hex(hash)) FROM blocks WHERE local = 0 AND stored = 0",
            &[],
        )?;
        check(
            "blocks a completed snapshot needs that were never stored".into(),
            "SELECT DISTINCT lower(hex(m.hash)), 'in snapshot', s.name FROM blockmap m
             JOIN blocks b ON b.hash = m.hash AND b.stored = 0
             JOIN snapshots s ON s.state = 'completed' AND m.birth <= s.generation
                 AND (m.death IS NULL OR m.death > s.generation)",
            &[],
        )?;
        check(
            "the live byte count differs from the live files' sizes".into(),
            "SELECT 'counted', (SELECT value FROM meta WHERE key = 'live_bytes'), 'actual',
                    coalesce(sum(size), 0)
             FROM inodes WHERE death IS NULL AND kind = 1
             HAVING coalesce(sum(size), 0) != (SELECT value FROM meta WHERE key = 'live_bytes')",
            &[],
        )?;
        check(
            "the live inode count differs from the live inodes".into(),
            "SELECT 'counted', (SELECT value FROM meta WHERE key = 'live_inodes'), 'actual',
                    count(*)
             FROM inodes WHERE death IS NULL
             HAVING count(*) != (SELECT value FROM meta WHERE key = 'live_inodes')",
            &[],
        )?;
        check(
            "inode numbers at or above the next one to be handed out".into(),
            "SELECT DISTINCT 'ino', ino FROM inodes
             WHERE ino >= (SELECT value FROM meta WHERE key = 'next_ino')",
            &[],
        )?;
        check(
            "snapshots in an unknown state or not older than the live generation".into(),
            "SELECT name, state, 'generation', generation FROM snapshots
             WHERE state NOT IN ('pending', 'completed', 'failed', 'checkpoint')
                OR generation >= ?1",
            &[Value::Integer(g as i64)],
        )?;
        let mut views = vec![("the live volume".to_owned(), super::LIVE)];
        for snapshot in self.snapshots()? {
            let name = String::from_utf8_lossy(&snapshot.name).into_owned();
            views.push((format!("snapshot {name}"), snapshot.generation));
        }
        for checkpoint in self.checkpoints()? {
            views.push((
                format!("checkpoint {}", checkpoint.name),
                checkpoint.generation,
            ));
        }
        for (view, at) in views {
            let at = [Value::Integer(at as i64), Value::Integer(block_size as i64)];
            for (problem, sql) in VIEW_CHECKS {
                check(format!("{view}: {problem}"), sql, &at)?;
            }
        }
        Ok(findings)
    }

    /// Runs `sql`, whose rows each describe one instance of `problem`.
    fn find(&self, problem: String, sql: &str, params: &[Value]) -> Result<Option<Finding>> {
        let mut stmt = self.conn.prepare(sql)?;
        let columns = stmt.column_count();
        let used = &params[..stmt.parameter_count().min(params.len())];
        let mut rows = stmt.query(rusqlite::params_from_iter(used))?;
        let mut finding = Finding {
            problem,
            count: 0,
            examples: Vec::new(),
        };
        while let Some(row) = rows.next()? {
            finding.count += 1;
            if finding.examples.len() < EXAMPLES {
                let fields = (0..columns)
                    .map(|i| row.get::<_, Value>(i).map(describe))
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                finding.examples.push(fields.join(" "));
            }
        }
        Ok((finding.count > 0).then_some(finding))
    }

    /// The paths of up to `limit` live files that map a block of `hashes`, from one scan
    /// of the live block map (no index by hash: this is for a report after a machine crash).
    pub fn live_paths_holding(
        &self,
        hashes: &HashSet<BlockHash>,
        limit: usize,
    ) -> Result<Vec<Vec<u8>>> {
        let mut stmt = self
            .conn
            .prepare("SELECT ino, hash FROM blockmap WHERE death IS NULL ORDER BY ino")?;
        let mut rows = stmt.query([])?;
        let mut inos: Vec<u64> = Vec::new();
        while let Some(row) = rows.next()? {
            if inos.len() == limit {
                break;
            }
            let ino: u64 = row.get(0)?;
            let hash: Vec<u8> = row.get(1)?;
            let held = BlockHash::try_from(hash.as_slice()).is_ok_and(|h| hashes.contains(&h));
            if held && inos.last() != Some(&ino) {
                inos.push(ino);
            }
        }
        let mut paths = Vec::new();
        for ino in inos {
            paths.extend(self.path_of(LIVE, ino)?);
        }
        Ok(paths)
    }

    /// Every block the catalog records.
    pub fn block_records(&self) -> Result<Vec<BlockRecord>> {
        let mut stmt = self.conn.prepare(
            "SELECT hash, len, stored, local,
                        EXISTS (SELECT 1 FROM inline_blocks i WHERE i.hash = b.hash),
                        p.name, b.pack_offset, b.pack_length
                 FROM blocks b LEFT JOIN packs p ON p.id = b.pack WHERE refs > 0",
        )?;
        let mut rows = stmt.query([])?;
        let mut records = Vec::new();
        while let Some(row) = rows.next()? {
            let hash: Vec<u8> = row.get(0)?;
            let stored: BlockLocation = row.get(2)?;
            let pack: Option<String> = row.get(5)?;
            let place = match (stored, pack, row.get(6)?, row.get(7)?) {
                (BlockLocation::Store, Some(name), Some(offset), Some(length)) => {
                    Some(BlockPlace::Packed {
                        pack: PackId::parse(&name)
                            .ok_or_else(|| Error::Corrupt(format!("bad pack name {name:?}")))?,
                        offset,
                        length,
                    })
                }
                (BlockLocation::Store, ..) => Some(BlockPlace::Object),
                _ => None,
            };
            records.push(BlockRecord {
                hash: BlockHash::try_from(hash.as_slice())
                    .map_err(|_| Error::Corrupt("a block hash is not 32 bytes".into()))?,
                len: row.get(1)?,
                stored,
                place,
                local: row.get(3)?,
                inline: row.get(4)?,
            });
        }
        Ok(records)
    }

    /// Whether block `hash` is still referenced (a mount may have freed it meanwhile).
    pub fn block_referenced(&self, hash: &BlockHash) -> Result<bool> {
        Ok(self.conn.query_row(
            "SELECT EXISTS (SELECT 1 FROM blocks WHERE hash = ?1 AND refs > 0)",
            [hash.as_bytes().as_slice()],
            |r| r.get(0),
        )?)
    }

    /// The trees the completed snapshots' manifests use, each with its place in a pack
    /// of the volume's store (`None`: an object of its own).
    pub fn completed_trees(&self) -> Result<Vec<(BlockHash, Option<BlockPlace>)>> {
        let mut stmt = self.conn.prepare(
            "SELECT t.hash, p.name, pt.pack_offset, pt.pack_length
             FROM (SELECT DISTINCT t.hash FROM dir_trees t JOIN snapshots s
                   ON s.state = 'completed' AND t.birth <= s.generation
                      AND (t.death IS NULL OR t.death > s.generation)) t
             LEFT JOIN packed_trees pt ON pt.hash = t.hash
             LEFT JOIN packs p ON p.id = pt.pack",
        )?;
        let mut rows = stmt.query([])?;
        let mut trees = Vec::new();
        while let Some(row) = rows.next()? {
            let hash: Vec<u8> = row.get(0)?;
            let hash = BlockHash::try_from(hash.as_slice())
                .map_err(|_| Error::Corrupt("a tree hash is not 32 bytes".into()))?;
            let place = match (row.get::<_, Option<String>>(1)?, row.get(2)?, row.get(3)?) {
                (Some(name), Some(offset), Some(length)) => Some(BlockPlace::Packed {
                    pack: PackId::parse(&name)
                        .ok_or_else(|| Error::Corrupt(format!("bad pack name {name:?}")))?,
                    offset,
                    length,
                }),
                _ => None,
            };
            trees.push((hash, place));
        }
        Ok(trees)
    }
}

impl WriteTx<'_> {
    /// Records that block `hash` is now in the volume's store (re-uploaded by a repair).
    pub fn set_block_stored(&self, hash: &BlockHash) -> Result<()> {
        self.conn.execute(
            "UPDATE blocks SET stored = 1 WHERE hash = ?1 AND stored = 0",
            [hash.as_bytes().as_slice()],
        )?;
        Ok(())
    }
}

/// Invariants of one view, with `?1` its generation and `?2` the block size.
const VIEW_CHECKS: [(&str, &str); 6] = [
    (
        "entries naming an inode this view does not have, or of another kind",
        "SELECT 'dir', d.parent, 'name', d.name, 'ino', d.ino FROM dentries d
         WHERE d.birth <= ?1 AND (d.death IS NULL OR d.death > ?1)
           AND NOT EXISTS (SELECT 1 FROM inodes i WHERE i.ino = d.ino AND i.kind = d.kind
                           AND i.birth <= ?1 AND (i.death IS NULL OR i.death > ?1))",
    ),
    (
        "entries in a directory this view does not have",
        "SELECT 'dir', d.parent, 'name', d.name FROM dentries d
         WHERE d.birth <= ?1 AND (d.death IS NULL OR d.death > ?1)
           AND NOT EXISTS (SELECT 1 FROM inodes i WHERE i.ino = d.parent AND i.kind = 2
                           AND i.birth <= ?1 AND (i.death IS NULL OR i.death > ?1))",
    ),
    (
        "non-directories whose link count differs from the entries naming them",
        "SELECT 'ino', i.ino, 'nlink', i.nlink, 'entries', count(d.ino) FROM inodes i
         LEFT JOIN dentries d ON d.ino = i.ino AND d.birth <= ?1
             AND (d.death IS NULL OR d.death > ?1)
         WHERE i.kind != 2 AND i.birth <= ?1 AND (i.death IS NULL OR i.death > ?1)
         GROUP BY i.ino HAVING i.nlink != count(d.ino)",
    ),
    (
        "directories not named by exactly one entry",
        "SELECT 'ino', i.ino, 'entries', count(d.ino) FROM inodes i
         LEFT JOIN dentries d ON d.ino = i.ino AND d.birth <= ?1
             AND (d.death IS NULL OR d.death > ?1)
         WHERE i.kind = 2 AND i.ino != 1 AND i.birth <= ?1
           AND (i.death IS NULL OR i.death > ?1)
         GROUP BY i.ino HAVING count(d.ino) != 1",
    ),
    (
        "blocks mapped beyond the end of their file, or in something not a file",
        "SELECT 'ino', m.ino, 'block', m.idx, 'size', i.size FROM blockmap m
         JOIN inodes i ON i.ino = m.ino
             AND i.birth <= ?1 AND (i.death IS NULL OR i.death > ?1)
         WHERE m.birth <= ?1 AND (m.death IS NULL OR m.death > ?1)
           AND (i.kind != 1 OR m.idx * ?2 >= i.size)",
    ),
    (
        "blocks mapped in a file this view does not have",
        "SELECT 'ino', m.ino, 'block', m.idx FROM blockmap m
         WHERE m.birth <= ?1 AND (m.death IS NULL OR m.death > ?1)
           AND NOT EXISTS (SELECT 1 FROM inodes i WHERE i.ino = m.ino
                           AND i.birth <= ?1 AND (i.death IS NULL OR i.death > ?1))",
    ),
];

fn describe(value: Value) -> String {
    match value {
        Value::Null => "-".into(),
        Value::Integer(n) => n.to_string(),
        Value::Real(x) => x.to_string(),
        Value::Text(text) => text,
        Value::Blob(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
    }
}

/// A pack that landed, as the catalog records it.
#[derive(Clone, Copy, Debug)]
pub struct PackRecord {
    /// Bytes of its frames: where its trailer starts.
    pub data_length: u64,
    /// The index object that lists it; `None` until the upload writes one.
    pub indexed: Option<PackId>,
}

impl ReadTx<'_> {
    /// Every pack that landed.
    pub fn pack_records(&self) -> Result<std::collections::HashMap<PackId, PackRecord>> {
        let mut stmt = self
            .conn
            .prepare("SELECT name, data_length, indexed FROM packs WHERE sent = 1")?;
        let mut rows = stmt.query([])?;
        let parse = |name: String| {
            PackId::parse(&name).ok_or_else(|| Error::Corrupt(format!("bad pack name {name:?}")))
        };
        let mut packs = std::collections::HashMap::new();
        while let Some(row) = rows.next()? {
            let indexed: Option<String> = row.get(2)?;
            let record = PackRecord {
                data_length: row.get(1)?,
                indexed: indexed.map(parse).transpose()?,
            };
            packs.insert(parse(row.get(0)?)?, record);
        }
        Ok(packs)
    }
}
