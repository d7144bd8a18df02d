//! The catalog schema and its migrations, keyed by SQLite's `user_version`.
//!
//! Every namespace row carries a generation interval `[birth, death)`: the live volume is
//! generation G (`death IS NULL`), snapshot g sees `birth <= g AND (death IS NULL OR death > g)`.

/// Migrations in order; `MIGRATIONS[i]` takes the schema from version i to i + 1.
pub const MIGRATIONS: &[&str] = &[V1];

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
