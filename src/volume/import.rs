//! A new volume from another volume's snapshot (`snapfs mount --from URL@SNAPSHOT`), as an
//! EBS volume is made from a snapshot: the metadata is imported from the manifest at once,
//! the blocks stay in the origin's store until first read (or `snapfs hydrate`).

use std::collections::{HashMap, HashSet};

use super::{Error, Result, Volume};
use crate::blocks::BlockHash;
use crate::catalog::{InodeRow, Kind, LIVE, ROOT_INO, WriteTx};
use crate::manifest::{Content, Entry};
use crate::store::{ReadError, Source};
use crate::sync::lock;

fn inode_row(entry: &Entry, parent: u64, block_size: u64) -> InodeRow {
    InodeRow {
        ino: entry.ino,
        attrs: entry.attrs.clone(),
        parent: if entry.attrs.kind == Kind::Dir {
            parent
        } else {
            0
        },
        alloc: block_lens(entry, block_size)
            .map(|(_, _, len)| u64::from(len))
            .sum(),
        target: entry.target.clone(),
    }
}

/// A file's blocks with their lengths: full blocks, and the tail of the last one.
fn block_lens(
    entry: &Entry,
    block_size: u64,
) -> impl Iterator<Item = (u64, &crate::blocks::BlockHash, u32)> {
    let blocks = match &entry.content {
        Content::Blocks(blocks) => blocks.as_slice(),
        _ => &[],
    };
    blocks.iter().map(move |(idx, hash)| {
        let len = entry
            .attrs
            .size
            .saturating_sub(idx * block_size)
            .min(block_size);
        (*idx, hash, len as u32)
    })
}

impl Volume {
    /// Whether the volume is as `Volume::open` creates it: nothing in it, no snapshot (in
    /// the recycle bin either).
    pub fn is_new(&self) -> Result<bool> {
        Ok(self.live_tree_is_empty()?
            && self.list_snapshots().is_empty()
            && self.trashed_snapshots().is_empty())
    }

    /// Whether the live tree's root directory is empty.
    pub fn live_tree_is_empty(&self) -> Result<bool> {
        Ok(lock(&self.catalog).read(|tx| tx.dir_is_empty(LIVE, ROOT_INO))?)
    }

    /// Empties the live tree as `sync_to` an empty snapshot would (a follower whose store
    /// has no snapshot left), keeping the root's other attributes. Returns the number of
    /// entries written.
    pub fn sync_to_empty(&self, record_trees: bool) -> Result<u64> {
        let mut attrs = lock(&self.catalog)
            .read(|tx| tx.inode(LIVE, ROOT_INO))?
            .ok_or(Error::NotFound)?
            .attrs;
        // `.` and its name in the parent: no subdirectory links to it any more.
        attrs.nlink = 2;
        let root = Entry {
            name: Vec::new(),
            ino: ROOT_INO,
            attrs,
            target: None,
            xattrs: Vec::new(),
            content: Content::Tree(BlockHash::of(&crate::manifest::encode_tree(&[]))),
        };
        let block_size = self.block_size;
        self.sync_to(&EmptyTree { root, block_size }, record_trees)
    }

    /// Imports the tree of `source` (a snapshot in another volume's store) as this new
    /// volume's live tree, in one transaction. Returns the number of entries written.
    pub fn import(&self, source: &dyn Source) -> Result<u64> {
        // No tree is recorded: `dir_trees` holds this volume's own manifests' trees.
        self.sync_to(source, false)
    }

    /// Makes the live tree equal to `source`'s, in one transaction, changing only what
    /// differs: directories whose tree object is the one recorded are skipped whole, and
    /// entries are matched by name and inode number (stable across the snapshots of one
    /// volume). Used to import (`--from`) and to follow a store (`--read-only`, which
    /// records the trees it matched in `dir_trees`: `record_trees`). Returns the number of
    /// entries written.
    pub fn sync_to(&self, source: &dyn Source, record_trees: bool) -> Result<u64> {
        let import_err = |e: ReadError| Error::Import(e.to_string());
        let root = source.root().map_err(import_err)?;
        let block_size = self.block_size;
        let mut written = 0u64;
        lock(&self.catalog).write(|tx| {
            let mut root_row = inode_row(&root, ROOT_INO, block_size);
            root_row.ino = ROOT_INO;
            sync_inode(tx, &root, root_row, block_size)?;
            let mut seen = HashSet::new();
            let mut unlinked = Vec::new();
            let mut max_ino = ROOT_INO;
            let mut pending = vec![(ROOT_INO, root)];
            while let Some((dir_ino, dir)) = pending.pop() {
                let Content::Tree(tree) = dir.content else {
                    return Err(Error::Import("a directory without a tree".into()));
                };
                if record_trees && tx.tree_at(LIVE, dir_ino)? == Some(tree) {
                    continue;
                }
                let children = source.children(&dir).map_err(import_err)?;
                let current: HashMap<Vec<u8>, u64> = tx
                    .list_dir(LIVE, dir_ino)?
                    .into_iter()
                    .map(|row| (row.name, row.inode.ino))
                    .collect();
                let wanted: HashMap<&[u8], u64> = children
                    .iter()
                    .map(|e| (e.name.as_slice(), e.ino))
                    .collect();
                for (name, ino) in &current {
                    if wanted.get(name.as_slice()) != Some(ino) {
                        tx.retire_dentry(dir_ino, name)?;
                        unlinked.push(*ino);
                    }
                }
                for entry in children {
                    if entry.ino < FIRST_IMPORTED_INO {
                        return Err(Error::Import(format!(
                            "the manifest gives {:?} the reserved inode number {}",
                            String::from_utf8_lossy(&entry.name),
                            entry.ino
                        )));
                    }
                    max_ino = max_ino.max(entry.ino);
                    if current.get(&entry.name) != Some(&entry.ino) {
                        tx.insert_dentry(dir_ino, &entry.name, entry.ino, entry.attrs.kind)?;
                        written += 1;
                    }
                    // Hard links: the inode once, under its first name.
                    if seen.insert(entry.ino) {
                        let row = inode_row(&entry, dir_ino, block_size);
                        written += u64::from(sync_inode(tx, &entry, row, block_size)?);
                    }
                    if entry.attrs.kind == Kind::Dir {
                        pending.push((entry.ino, entry));
                    }
                }
                if record_trees {
                    tx.set_live_tree(dir_ino, &tree)?;
                }
            }
            // Inodes that lost their last name go, directories with everything below.
            while let Some(ino) = unlinked.pop() {
                if tx.is_linked(ino)? {
                    continue;
                }
                for child in tx.list_dir(LIVE, ino)? {
                    tx.retire_dentry(ino, &child.name)?;
                    unlinked.push(child.inode.ino);
                }
                tx.retire_inode(ino)?;
                if record_trees {
                    tx.forget_live_tree(ino)?;
                }
            }
            tx.reserve_inos_through(max_ino)?;
            Ok::<_, Error>(())
        })?;
        // The maps of open files may have changed under their read states.
        for state in self.files.peek_all() {
            lock(&state).reads.forget_map();
        }
        Ok(written)
    }
}

/// A tree with nothing in it but its root (`Volume::sync_to_empty`).
struct EmptyTree {
    root: Entry,
    block_size: u64,
}

impl Source for EmptyTree {
    fn root(&self) -> std::result::Result<Entry, ReadError> {
        Ok(self.root.clone())
    }

    fn children(&self, _: &Entry) -> std::result::Result<Vec<Entry>, ReadError> {
        Ok(Vec::new())
    }

    fn block(&self, hash: &BlockHash) -> std::result::Result<Vec<u8>, ReadError> {
        Err(ReadError::Corrupt(format!(
            "an empty tree has no block {}",
            hash.to_hex()
        )))
    }

    fn block_size(&self) -> u64 {
        self.block_size
    }

    fn parallelism(&self) -> usize {
        1
    }
}

/// Inode numbers below this are the mount's own (root, `.snapshots`).
const FIRST_IMPORTED_INO: u64 = 16;

/// Brings inode `row` (from `entry`) up to date in the live view: attributes, xattrs and
/// block map, each only where it differs. Whether anything changed.
fn sync_inode(tx: &WriteTx<'_>, entry: &Entry, row: InodeRow, block_size: u64) -> Result<bool> {
    let current = tx.inode(LIVE, row.ino)?;
    if current.as_ref() == Some(&row) {
        return Ok(false);
    }
    match current {
        Some(current) if current.attrs.kind == row.attrs.kind => tx.update_inode(&row)?,
        Some(_) => {
            tx.retire_inode(row.ino)?;
            tx.insert_inode(&row)?;
        }
        None => tx.insert_inode(&row)?,
    }
    let xattrs: HashMap<Vec<u8>, Vec<u8>> = tx.xattrs_of(LIVE, row.ino)?.into_iter().collect();
    for (name, value) in &entry.xattrs {
        if xattrs.get(name) != Some(value) {
            tx.xattr_set(row.ino, name, value)?;
        }
    }
    for name in xattrs.keys() {
        if !entry.xattrs.iter().any(|(n, _)| n == name) {
            tx.xattr_remove(row.ino, name)?;
        }
    }
    let mapped: HashMap<u64, BlockHash> = tx
        .blocks_in_range(LIVE, row.ino, 0, i64::MAX as u64)?
        .into_iter()
        .collect();
    let mut wanted = HashSet::new();
    for (idx, hash, len) in block_lens(entry, block_size) {
        wanted.insert(idx);
        if mapped.get(&idx) != Some(hash) {
            tx.import_block(row.ino, idx, hash, len)?;
        }
    }
    for idx in mapped.keys().filter(|idx| !wanted.contains(idx)) {
        tx.set_block(row.ino, *idx, None)?;
    }
    Ok(true)
}
