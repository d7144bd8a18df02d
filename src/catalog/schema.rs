//! The catalog schema and its migrations, keyed by SQLite's `user_version`.
//!
//! Every namespace row carries a generation interval `[birth, death)`: the live volume is
//! generation G (`death IS NULL`), snapshot g sees `birth <= g AND (death IS NULL OR death > g)`.

/// Migrations in order; `MIGRATIONS[i]` takes the schema from version i to i + 1.
pub const MIGRATIONS: &[&str] = &[
    V1,
    V2,
    V3,
    V4_POLICY,
    V5_LIFECYCLE,
    V6_CHECKPOINTS,
    V7_LIVE_INODES,
    V8_INLINE_BLOCKS,
    V9_PACKS,
    V10_PACKED_TREES,
    V11_BLOCK_PIECES,
    V12_PIECES_BY_ROWID,
    V13_TOTALS_BY_WRITES,
    V14_TREES_ONE_AT_A_TIME,
    V15_FOLLOWERS_KEEP_LIVE_TREES,
];

const V1: &str = r#"
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE inodes (
    ino    INTEGER NOT NULL,
    birth  INTEGER NOT NULL,
    death  INTEGER,
    kind   INTEGER NOT NULL,
    perm   INTEGER NOT NULL,
    uid    INTEGER NOT NULL,
    gid    INTEGER NOT NULL,
    nlink  INTEGER NOT NULL,
    size   INTEGER NOT NULL,
    rdev   INTEGER NOT NULL,
    parent INTEGER NOT NULL,      -- directories only: for '..'; 0 otherwise
    atime  INTEGER NOT NULL,      -- nanoseconds since the epoch
    mtime  INTEGER NOT NULL,
    ctime  INTEGER NOT NULL,
    crtime INTEGER NOT NULL,
    alloc  INTEGER NOT NULL,      -- bytes of mapped (non-hole) blocks, for st_blocks
    target BLOB,                  -- symlink target
    PRIMARY KEY (ino, birth)
) WITHOUT ROWID;
CREATE INDEX inodes_orphans ON inodes(ino) WHERE death IS NULL AND nlink = 0;

CREATE TABLE dentries (
    parent INTEGER NOT NULL,
    name   BLOB NOT NULL,
    birth  INTEGER NOT NULL,
    death  INTEGER,
    ino    INTEGER NOT NULL,
    kind   INTEGER NOT NULL,
    PRIMARY KEY (parent, name, birth)
) WITHOUT ROWID;

CREATE TABLE blockmap (
    ino   INTEGER NOT NULL,
    idx   INTEGER NOT NULL,
    birth INTEGER NOT NULL,
    death INTEGER,
    hash  BLOB NOT NULL,
    PRIMARY KEY (ino, idx, birth)
) WITHOUT ROWID;

CREATE TABLE xattrs (
    ino   INTEGER NOT NULL,
    name  BLOB NOT NULL,
    birth INTEGER NOT NULL,
    death INTEGER,
    value BLOB NOT NULL,
    PRIMARY KEY (ino, name, birth)
) WITHOUT ROWID;

-- One row per stored block; refs counts the blockmap rows (of any generation) naming it,
-- kept by the triggers below so no code path can forget to count.
CREATE TABLE blocks (
    hash BLOB PRIMARY KEY,
    len  INTEGER NOT NULL,
    refs INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE INDEX blocks_unreferenced ON blocks(hash) WHERE refs = 0;

CREATE TRIGGER blockmap_ref AFTER INSERT ON blockmap BEGIN
    UPDATE blocks SET refs = refs + 1 WHERE hash = NEW.hash;
END;
CREATE TRIGGER blockmap_unref AFTER DELETE ON blockmap BEGIN
    UPDATE blocks SET refs = refs - 1 WHERE hash = OLD.hash;
END;

CREATE TABLE snapshots (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    name       BLOB NOT NULL UNIQUE,
    generation INTEGER NOT NULL UNIQUE,
    created    INTEGER NOT NULL,
    state      TEXT NOT NULL
);

CREATE TABLE snapshot_tags (
    snapshot INTEGER NOT NULL REFERENCES snapshots(id) ON DELETE CASCADE,
    key      BLOB NOT NULL,
    value    BLOB NOT NULL,
    PRIMARY KEY (snapshot, key)
) WITHOUT ROWID;
"#;

/// Snapshot support: indexes on generations, so deleting a snapshot or sizing what only it
/// holds reads just the rows whose life touches it; a live byte count kept by triggers, so
/// a snapshot's logical size is recorded at creation without a scan.
const V2: &str = r#"
CREATE INDEX inodes_death ON inodes(death) WHERE death IS NOT NULL;
CREATE INDEX dentries_death ON dentries(death) WHERE death IS NOT NULL;
CREATE INDEX blockmap_death ON blockmap(death) WHERE death IS NOT NULL;
CREATE INDEX xattrs_death ON xattrs(death) WHERE death IS NOT NULL;
CREATE INDEX dentries_birth ON dentries(birth);
CREATE INDEX inodes_birth ON inodes(birth);
CREATE INDEX dentries_ino ON dentries(ino);

ALTER TABLE snapshots ADD COLUMN logical_bytes INTEGER NOT NULL DEFAULT 0;

INSERT INTO meta (key, value)
    SELECT 'live_bytes', coalesce(sum(size), 0) FROM inodes WHERE death IS NULL AND kind = 1;
CREATE TRIGGER inodes_bytes_insert AFTER INSERT ON inodes
WHEN NEW.death IS NULL AND NEW.kind = 1 BEGIN
    UPDATE meta SET value = value + NEW.size WHERE key = 'live_bytes';
END;
CREATE TRIGGER inodes_bytes_delete AFTER DELETE ON inodes
WHEN OLD.death IS NULL AND OLD.kind = 1 BEGIN
    UPDATE meta SET value = value - OLD.size WHERE key = 'live_bytes';
END;
CREATE TRIGGER inodes_bytes_update AFTER UPDATE ON inodes WHEN OLD.kind = 1 BEGIN
    UPDATE meta SET value = value
        - (CASE WHEN OLD.death IS NULL THEN OLD.size ELSE 0 END)
        + (CASE WHEN NEW.death IS NULL THEN NEW.size ELSE 0 END)
    WHERE key = 'live_bytes';
END;
"#;

/// Uploads to an object store. Snapshot generations double as manifest generations:
/// `dir_trees` versions each directory's tree object like the namespace rows, so a
/// manifest rewrites only the directories that changed since the last completed one.
/// Snapshots taken before this version have never been uploaded: they become pending.
const V3: &str = r#"
ALTER TABLE blocks ADD COLUMN stored INTEGER NOT NULL DEFAULT 0;
-- 0 once a stored block has been evicted from the local disk (--cache-size).
ALTER TABLE blocks ADD COLUMN local INTEGER NOT NULL DEFAULT 1;
CREATE INDEX blockmap_birth ON blockmap(birth);
CREATE INDEX xattrs_birth ON xattrs(birth);

ALTER TABLE snapshots ADD COLUMN upload_blocks INTEGER;  -- NULL until the uploader sized it
ALTER TABLE snapshots ADD COLUMN upload_bytes INTEGER;
ALTER TABLE snapshots ADD COLUMN sent_blocks INTEGER NOT NULL DEFAULT 0;
ALTER TABLE snapshots ADD COLUMN sent_bytes INTEGER NOT NULL DEFAULT 0;
ALTER TABLE snapshots ADD COLUMN stored_bytes INTEGER NOT NULL DEFAULT 0; -- compressed, sent
ALTER TABLE snapshots ADD COLUMN error TEXT;
UPDATE snapshots SET state = 'pending';

-- Renaming or retagging a snapshot bumps its version; the uploader rewrites a completed
-- snapshot's manifest object until the version it wrote is the current one.
ALTER TABLE snapshots ADD COLUMN manifest_version INTEGER NOT NULL DEFAULT 0;
ALTER TABLE snapshots ADD COLUMN manifest_written INTEGER NOT NULL DEFAULT -1;
CREATE TRIGGER snapshots_renamed AFTER UPDATE OF name ON snapshots BEGIN
    UPDATE snapshots SET manifest_version = manifest_version + 1 WHERE id = NEW.id;
END;
CREATE TRIGGER snapshot_tags_added AFTER INSERT ON snapshot_tags BEGIN
    UPDATE snapshots SET manifest_version = manifest_version + 1 WHERE id = NEW.snapshot;
END;
CREATE TRIGGER snapshot_tags_changed AFTER UPDATE ON snapshot_tags BEGIN
    UPDATE snapshots SET manifest_version = manifest_version + 1 WHERE id = NEW.snapshot;
END;
CREATE TRIGGER snapshot_tags_removed AFTER DELETE ON snapshot_tags BEGIN
    UPDATE snapshots SET manifest_version = manifest_version + 1 WHERE id = OLD.snapshot;
END;

CREATE TABLE dir_trees (
    ino   INTEGER NOT NULL,
    birth INTEGER NOT NULL,
    death INTEGER,
    hash  BLOB NOT NULL,
    PRIMARY KEY (ino, birth)
) WITHOUT ROWID;
CREATE INDEX dir_trees_death ON dir_trees(death) WHERE death IS NOT NULL;
CREATE INDEX dir_trees_hash ON dir_trees(hash);

-- Store objects that nothing needs any more, deleted by the uploader.
CREATE TABLE store_deletions (key TEXT PRIMARY KEY) WITHOUT ROWID;

CREATE TABLE settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
INSERT INTO settings (key, value) VALUES ('volume_id', lower(hex(randomblob(16))));
"#;

/// Snapshot policies (`snapfs policy`): one row per volume, its keep-by-tag rules apart.
/// Durations are in seconds; `last_slot` is the start of the last schedule slot taken
/// (`i64::MIN`: none yet).
const V4_POLICY: &str = r#"
CREATE TABLE policy (
    id           INTEGER PRIMARY KEY CHECK (id = 1),
    every        INTEGER NOT NULL,
    keep_last    INTEGER NOT NULL,
    keep_hourly  INTEGER NOT NULL,
    keep_daily   INTEGER NOT NULL,
    keep_weekly  INTEGER NOT NULL,
    keep_monthly INTEGER NOT NULL,
    keep_yearly  INTEGER NOT NULL,
    keep_within  INTEGER,
    prune_manual INTEGER NOT NULL,
    trash_days   INTEGER,
    last_slot    INTEGER NOT NULL,
    cron         TEXT                 -- instead of every (0): crontab times, UTC
);
CREATE TABLE policy_keep_tags (
    key   TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (key, value)
) WITHOUT ROWID;
"#;

/// Snapshot lifecycle: the recycle bin (a deleted snapshot keeps its row, renamed into the
/// bin's name space, until it expires) and locks. Changing either rewrites the snapshot's
/// store object, which carries both.
const V5_LIFECYCLE: &str = r#"
ALTER TABLE snapshots ADD COLUMN deleted INTEGER;       -- in the bin since; NULL: not in it
ALTER TABLE snapshots ADD COLUMN expires INTEGER;       -- purged from the bin at
ALTER TABLE snapshots ADD COLUMN lock_mode TEXT;        -- governance, compliance; NULL: none
ALTER TABLE snapshots ADD COLUMN lock_until INTEGER;
ALTER TABLE snapshots ADD COLUMN lock_cool_off INTEGER; -- compliance: like governance before
CREATE TRIGGER snapshots_lifecycle AFTER UPDATE OF deleted, lock_mode, lock_until, lock_cool_off
ON snapshots BEGIN
    UPDATE snapshots SET manifest_version = manifest_version + 1 WHERE id = NEW.id;
END;
"#;

/// Continuous checkpoints: local-only pins of a generation, rows of `snapshots` in state
/// `checkpoint` (never uploaded: every upload query selects `pending` or `completed`;
/// every query over pinned generations sees them). Their names start with '.', which
/// snapshot names cannot, so a checkpoint never takes a snapshot's name. The version bump
/// makes an older snapfs refuse this catalog instead of choking on the new state.
const V6_CHECKPOINTS: &str = r#"
CREATE INDEX snapshots_checkpoints ON snapshots(created) WHERE state = 'checkpoint';
"#;

/// The number of live inodes, kept by triggers like `live_bytes`: statfs reads it on
/// every call (dbench and file managers call it often), where a count(*) of the live rows
/// costs a scan of every inode version.
const V7_LIVE_INODES: &str = r#"
INSERT INTO meta (key, value)
    SELECT 'live_inodes', count(*) FROM inodes WHERE death IS NULL;
CREATE TRIGGER inodes_count_insert AFTER INSERT ON inodes WHEN NEW.death IS NULL BEGIN
    UPDATE meta SET value = value + 1 WHERE key = 'live_inodes';
END;
CREATE TRIGGER inodes_count_delete AFTER DELETE ON inodes WHEN OLD.death IS NULL BEGIN
    UPDATE meta SET value = value - 1 WHERE key = 'live_inodes';
END;
CREATE TRIGGER inodes_count_update AFTER UPDATE OF death ON inodes
WHEN (OLD.death IS NULL) != (NEW.death IS NULL) BEGIN
    UPDATE meta SET value = value + (CASE WHEN NEW.death IS NULL THEN 1 ELSE -1 END)
    WHERE key = 'live_inodes';
END;
"#;

/// Small blocks live in the catalog, not in a file each (`blocks::INLINE_MAX`): a small
/// file then costs no block file, no rename and no sync of its own, and lands in the same
/// transaction as the map row naming it. A rowid table keeps a blob of a few KiB in its
/// leaf page (in `blocks`, a WITHOUT ROWID table, it would spill to overflow pages). The
/// trigger frees the data with its block row, so no code path can forget to.
const V8_INLINE_BLOCKS: &str = r#"
CREATE TABLE inline_blocks (
    hash BLOB PRIMARY KEY,
    data BLOB NOT NULL
);
CREATE TRIGGER blocks_free_inline AFTER DELETE ON blocks BEGIN
    DELETE FROM inline_blocks WHERE hash = OLD.hash;
END;
"#;

/// Store format 2: blocks go to the store in packs (`store/pack.rs`). A stored block's
/// row says which pack holds it and where (`pack` NULL: a format-1 object of its own,
/// `blocks/<hash>`). A pack row counts the live blocks in it, kept by the trigger: a pack
/// whose count reaches 0 is deleted from the store (`take_unreferenced_blocks`); a block
/// moved out of a pack (`verify --repair`) leaves its count too. `sent`
/// is 0 while its PUT is under way, so a crash leaves a row that names the object to
/// clean up; `indexed` names the index object that lists it (NULL: none yet).
const V9_PACKS: &str = r#"
CREATE TABLE packs (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL,
    data_length INTEGER NOT NULL,
    blocks INTEGER NOT NULL DEFAULT 0,
    live_bytes INTEGER NOT NULL DEFAULT 0,
    sent INTEGER NOT NULL DEFAULT 0,
    indexed TEXT
);
CREATE INDEX packs_indexed ON packs(indexed);
-- Packs being sent, and packs left without a live block: found without a scan.
CREATE INDEX packs_empty ON packs(sent) WHERE blocks <= 0;
ALTER TABLE blocks ADD COLUMN pack INTEGER;
ALTER TABLE blocks ADD COLUMN pack_offset INTEGER;
ALTER TABLE blocks ADD COLUMN pack_length INTEGER;
CREATE INDEX blocks_pack ON blocks(pack) WHERE pack IS NOT NULL;
CREATE TRIGGER blocks_unpack AFTER DELETE ON blocks WHEN OLD.pack IS NOT NULL BEGIN
    UPDATE packs SET blocks = blocks - 1, live_bytes = live_bytes - OLD.pack_length
    WHERE id = OLD.pack;
END;
CREATE TRIGGER blocks_leave_pack AFTER UPDATE OF pack ON blocks
WHEN OLD.pack IS NOT NULL AND NEW.pack IS NOT OLD.pack BEGIN
    UPDATE packs SET blocks = blocks - 1, live_bytes = live_bytes - OLD.pack_length
    WHERE id = OLD.pack;
END;
"#;

/// Directory trees travel in packs too (their own packs, written with each manifest), so
/// a snapshot of many directories is a few objects, not one per directory. A row per tree
/// a pack holds, counted among the pack's live frames like a block (`packs.blocks` counts
/// both); it goes when no directory version names the tree any more.
const V10_PACKED_TREES: &str = r#"
CREATE TABLE packed_trees (
    hash        BLOB PRIMARY KEY,
    pack        INTEGER NOT NULL,
    pack_offset INTEGER NOT NULL,
    pack_length INTEGER NOT NULL,
    len         INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX packed_trees_pack ON packed_trees(pack);
CREATE TRIGGER packed_trees_unpack AFTER DELETE ON packed_trees BEGIN
    UPDATE packs SET blocks = blocks - 1, live_bytes = live_bytes - OLD.pack_length
    WHERE id = OLD.pack;
END;
CREATE TRIGGER packed_trees_leave_pack AFTER UPDATE OF pack ON packed_trees
WHEN NEW.pack IS NOT OLD.pack BEGIN
    UPDATE packs SET blocks = blocks - 1, live_bytes = live_bytes - OLD.pack_length
    WHERE id = OLD.pack;
END;
"#;

/// The chaining values of a block's 16 KiB pieces (`blocks::hash_and_pieces`, 32 bytes
/// each: 512 per 256 KiB block) and the length they were computed for, kept by the flush
/// that computed them while hashing. A small read of a block after a mount adopts them,
/// checked against the block's name, and reads 16 KiB, not the whole block. A table apart,
/// so scans of `blocks` stay as small as before; keyed by the hash alone (no rowid, and
/// its own length rather than a join to `blocks`), so a cold lookup is one leaf page
/// read; the trigger frees the values with their block. A block without a row (fetched
/// from a store, written before this version) is read whole once, as before.
const V11_BLOCK_PIECES: &str = r#"
CREATE TABLE block_pieces (
    hash         BLOB PRIMARY KEY,
    len          INTEGER NOT NULL,
    piece_values BLOB NOT NULL
) WITHOUT ROWID;
CREATE TRIGGER blocks_free_pieces AFTER DELETE ON blocks BEGIN
    DELETE FROM block_pieces WHERE hash = OLD.hash;
END;
"#;

/// `block_pieces` as a rowid table. The values of 4 KiB pieces take 2 KiB per 256 KiB
/// block: past the 1 KiB a row of a WITHOUT ROWID table keeps in its 4 KiB leaf page, so
/// every key comparison of a lookup read the rest from an overflow page (13 reads of the
/// catalog per lookup under `strace`). A rowid table keeps a row of up to 4 KiB in its
/// leaf; the primary key's index finds it. The trigger is made again around the rename.
const V12_PIECES_BY_ROWID: &str = r#"
DROP TRIGGER blocks_free_pieces;
ALTER TABLE block_pieces RENAME TO block_pieces_v11;
CREATE TABLE block_pieces (
    hash         BLOB PRIMARY KEY,
    len          INTEGER NOT NULL,
    piece_values BLOB NOT NULL
);
INSERT INTO block_pieces SELECT hash, len, piece_values FROM block_pieces_v11;
DROP TABLE block_pieces_v11;
CREATE TRIGGER blocks_free_pieces AFTER DELETE ON blocks BEGIN
    DELETE FROM block_pieces WHERE hash = OLD.hash;
END;
"#;

/// The live totals are kept by the writes themselves, a sum per transaction (see
/// `Totals` in the catalog), instead of by an UPDATE of `meta` per inode row written.
const V13_TOTALS_BY_WRITES: &str = r#"
DROP TRIGGER inodes_bytes_insert;
DROP TRIGGER inodes_bytes_delete;
DROP TRIGGER inodes_bytes_update;
DROP TRIGGER inodes_count_insert;
DROP TRIGGER inodes_count_delete;
DROP TRIGGER inodes_count_update;
"#;

/// Repairs the directory trees that deleting snapshots could leave overlapping before
/// this version: deleting the newest snapshots in turn left trees no completed snapshot
/// sees, which an older tree made current again then overlapped; a checkpoint promoted
/// after such a deletion recorded trees that outlived the next version. A tree no
/// completed snapshot sees goes (a follower records its live trees again at its next
/// sync); a version that outlives the next one ends where that one begins.
const V14_TREES_ONE_AT_A_TIME: &str = r#"
DELETE FROM dir_trees WHERE NOT EXISTS (
    SELECT 1 FROM snapshots s
    WHERE s.state = 'completed' AND s.generation >= dir_trees.birth
        AND (dir_trees.death IS NULL OR s.generation < dir_trees.death));
UPDATE dir_trees SET death = (
    SELECT min(n.birth) FROM dir_trees n WHERE n.ino = dir_trees.ino AND n.birth > dir_trees.birth)
WHERE EXISTS (
    SELECT 1 FROM dir_trees n
    WHERE n.ino = dir_trees.ino AND n.birth > dir_trees.birth
        AND (dir_trees.death IS NULL OR dir_trees.death > n.birth));
"#;

/// A follower's trees are those of its live tree, one per directory. Before this version
/// deleting its newest snapshot made an older snapshot's trees current again while the
/// live tree stayed as it was, so a later sync could skip a directory that differed.
/// They all go: its next sync walks the whole tree once and records them again. So do the
/// store deletions it queued: the store it follows is another volume's.
const V15_FOLLOWERS_KEEP_LIVE_TREES: &str = r#"
DELETE FROM dir_trees WHERE EXISTS (SELECT 1 FROM settings WHERE key = 'follows');
DELETE FROM store_deletions WHERE EXISTS (SELECT 1 FROM settings WHERE key = 'follows');
"#;

#[cfg(test)]
mod tests {
    use super::*;

    /// An empty catalog at the schema just before `migration`, which the caller applies.
    fn schema_before(migration: &str) -> rusqlite::Connection {
        let db = rusqlite::Connection::open_in_memory().expect("open");
        let at = MIGRATIONS
            .iter()
            .position(|sql| *sql == migration)
            .expect("a migration");
        for sql in &MIGRATIONS[..at] {
            db.execute_batch(sql).expect("earlier migration");
        }
        db
    }

    #[test]
    fn piece_values_survive_the_move_to_a_rowid_table_and_go_with_their_block() {
        let db = schema_before(V12_PIECES_BY_ROWID);
        db.execute_batch(
            "INSERT INTO blocks (hash, len) VALUES (x'01', 20000), (x'02', 30000);
             INSERT INTO block_pieces VALUES (x'01', 20000, x'aa'), (x'02', 30000, x'bb');",
        )
        .expect("a schema-11 catalog with values");
        db.execute_batch(V12_PIECES_BY_ROWID).expect("V12");
        let rows = |db: &rusqlite::Connection| -> Vec<(Vec<u8>, i64, Vec<u8>)> {
            let mut stmt = db
                .prepare("SELECT hash, len, piece_values FROM block_pieces ORDER BY hash")
                .expect("prepare");
            stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .expect("query")
                .collect::<rusqlite::Result<_>>()
                .expect("rows")
        };
        assert_eq!(
            rows(&db),
            vec![(vec![1], 20000, vec![0xaa]), (vec![2], 30000, vec![0xbb])]
        );
        db.execute_batch("DELETE FROM blocks WHERE hash = x'01'")
            .expect("free a block");
        assert_eq!(rows(&db), vec![(vec![2], 30000, vec![0xbb])]);
    }

    #[test]
    fn overlapping_directory_trees_are_repaired_to_one_version_at_a_time() {
        let db = schema_before(V14_TREES_ONE_AT_A_TIME);
        // Completed snapshots at 4 and 7 (the one at 9 was deleted), a promoted checkpoint
        // at 2. Directory 1: a tree only the deleted snapshot saw, overlapping the current
        // one made current again. Directory 16: the promoted checkpoint's tree outliving
        // the next version. Directory 17: versions that were right all along.
        db.execute_batch(
            "INSERT INTO snapshots (name, generation, created, state) VALUES
                 ('p', 2, 0, 'completed'), ('a', 4, 0, 'completed'), ('b', 7, 0, 'completed'),
                 ('pending', 10, 0, 'pending');
             INSERT INTO dir_trees (ino, birth, death, hash) VALUES
                 (1, 2, NULL, x'01'), (1, 9, NULL, x'02'),
                 (16, 2, 7, x'03'), (16, 4, NULL, x'04'),
                 (17, 2, 4, x'05'), (17, 4, 7, x'06'), (17, 7, NULL, x'07');",
        )
        .expect("a schema-13 catalog with overlapping trees");
        db.execute_batch(V14_TREES_ONE_AT_A_TIME).expect("V14");
        let mut stmt = db
            .prepare("SELECT ino, birth, death, hash FROM dir_trees ORDER BY ino, birth")
            .expect("prepare");
        let rows: Vec<(i64, i64, Option<i64>, Vec<u8>)> = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .expect("query")
            .collect::<rusqlite::Result<_>>()
            .expect("rows");
        assert_eq!(
            rows,
            vec![
                (1, 2, None, vec![1]),
                (16, 2, Some(4), vec![3]),
                (16, 4, None, vec![4]),
                (17, 2, Some(4), vec![5]),
                (17, 4, Some(7), vec![6]),
                (17, 7, None, vec![7]),
            ]
        );
    }

    #[test]
    fn a_follower_forgets_its_trees_and_store_deletions_and_a_writer_keeps_them() {
        let trees_and_deletions = |follower: bool| -> (i64, i64) {
            let db = schema_before(V15_FOLLOWERS_KEEP_LIVE_TREES);
            db.execute_batch(
                "INSERT INTO snapshots (name, generation, created, state) VALUES
                     ('a', 2, 0, 'completed');
                 INSERT INTO dir_trees (ino, birth, death, hash) VALUES
                     (1, 2, 4, x'01'), (1, 4, NULL, x'02'), (16, 2, NULL, x'03');
                 INSERT INTO store_deletions (key) VALUES ('snapshots/x');",
            )
            .expect("a schema-14 catalog");
            if follower {
                db.execute_batch(
                    "INSERT INTO settings (key, value) VALUES ('follows', 'file:///s')",
                )
                .expect("a follower");
            }
            db.execute_batch(V15_FOLLOWERS_KEEP_LIVE_TREES)
                .expect("V15");
            db.query_row(
                "SELECT (SELECT count(*) FROM dir_trees), (SELECT count(*) FROM store_deletions)",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .expect("count")
        };
        assert_eq!(trees_and_deletions(true), (0, 0));
        assert_eq!(trees_and_deletions(false), (3, 1));
    }
}
