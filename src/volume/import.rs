//! A new volume from another volume's snapshot (`snapfs mount --from URL@SNAPSHOT`), as an
//! EBS volume is made from a snapshot: the metadata is imported from the manifest at once,
//! the blocks stay in the origin's store until first read (or `snapfs hydrate`).

use std::collections::HashSet;

use super::{Error, Result, Volume};
use crate::catalog::{InodeRow, Kind, ROOT_INO, Tx};
use crate::manifest::{Content, Entry};
use crate::restore::Source;
use crate::sync::lock;

fn inode_row(entry: &Entry, parent: u64, block_size: u64) -> InodeRow {
    InodeRow {
        ino: entry.ino,
        kind: entry.kind,
        perm: entry.perm,
        uid: entry.uid,
        gid: entry.gid,
        nlink: entry.nlink,
        size: entry.size,
        rdev: entry.rdev,
        parent: if entry.kind == Kind::Dir { parent } else { 0 },
        atime: entry.atime,
        mtime: entry.mtime,
        ctime: entry.ctime,
        crtime: entry.crtime,
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
        let len = entry.size.saturating_sub(idx * block_size).min(block_size);
        (*idx, hash, len as u32)
    })
}

impl Volume {
    /// Whether the volume is as `Volume::open` creates it: nothing in it, no snapshot.
    pub fn is_new(&self) -> Result<bool> {
        let empty =
            lock(&self.catalog).read(|tx| tx.dir_is_empty(crate::catalog::LIVE, ROOT_INO))?;
        Ok(empty && self.list_snapshots().is_empty())
    }

    /// Imports the tree of `source` (a snapshot in another volume's store) as this new
    /// volume's live tree, in one transaction. Returns the number of entries.
    pub fn import(&self, source: &dyn Source) -> Result<u64> {
        let import_err = |e: crate::restore::RestoreError| Error::Import(e.to_string());
        let root = source.root().map_err(import_err)?;
        let block_size = self.block_size;
        let mut entries = 0u64;
        lock(&self.catalog).write(|tx| {
            let mut row = inode_row(&root, ROOT_INO, block_size);
            row.ino = ROOT_INO;
            tx.update_inode(&row)?;
            import_xattrs(tx, ROOT_INO, &root)?;
            let mut seen = HashSet::new();
            let mut max_ino = ROOT_INO;
            let mut pending = vec![(ROOT_INO, root)];
            while let Some((dir_ino, dir)) = pending.pop() {
                for entry in source.children(&dir).map_err(import_err)? {
                    if entry.ino == ROOT_INO || entry.ino < 16 && entry.kind == Kind::Dir {
                        return Err(Error::Import(format!(
                            "the manifest gives {:?} the reserved inode number {}",
                            String::from_utf8_lossy(&entry.name),
                            entry.ino
                        )));
                    }
                    entries += 1;
                    max_ino = max_ino.max(entry.ino);
                    tx.insert_dentry(dir_ino, &entry.name, entry.ino, entry.kind)?;
                    if !seen.insert(entry.ino) {
                        continue; // another name of a hard-linked file
                    }
                    tx.insert_inode(&inode_row(&entry, dir_ino, block_size))?;
                    import_xattrs(tx, entry.ino, &entry)?;
                    for (idx, hash, len) in block_lens(&entry, block_size) {
                        tx.import_block(entry.ino, idx, hash, len)?;
                    }
                    if entry.kind == Kind::Dir {
                        pending.push((entry.ino, entry));
                    }
                }
            }
            tx.reserve_inos_through(max_ino)?;
            Ok::<_, Error>(())
        })?;
        Ok(entries)
    }
}

fn import_xattrs(tx: &Tx<'_>, ino: u64, entry: &Entry) -> Result<()> {
    for (name, value) in &entry.xattrs {
        tx.xattr_set(ino, name, value)?;
    }
    Ok(())
}
