//! The namespace operations of the live volume and its snapshots: lookups, creating,
//! linking, renaming and removing nodes, attributes, directory listings and extended
//! attributes. Each change to the live tree is one catalog write transaction under the
//! gate (see `Volume::enter_change`), so a snapshot falls between two of them.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::checkpoints::{CHECKPOINT_DIR, CHECKPOINTS_NAME};
use super::snapshots::SNAPDIR;
use super::trash::{TRASHDIR, TRASHDIR_NAME};
use super::{
    Attr, Caller, DirEntry, DirHandle, Error, NAME_MAX, NodeId, Result, SNAPDIR_NAME, SetAttr,
    SetTime, View, Volume, W_OK, XATTR_CREATE, XATTR_REPLACE, XATTR_SIZE_MAX, check_name, now,
    permits,
};
use crate::catalog::{Attrs, InodeRow, Kind, LIVE, ROOT_INO, ReadTx, WriteTx};
use crate::sync::lock;

impl Volume {
    pub fn getattr(&self, node: NodeId) -> Result<Attr> {
        if node == SNAPDIR {
            return Ok(self.snapdir_attr(&self.row(NodeId::live(ROOT_INO))?));
        }
        if node == TRASHDIR {
            return self.trashdir_attr();
        }
        if node == CHECKPOINT_DIR {
            return self.checkpoint_dir_attr();
        }
        self.node_attr(node.view, &self.row(node)?)
    }

    pub fn lookup(&self, parent: NodeId, name: &[u8]) -> Result<Attr> {
        if name.len() > NAME_MAX {
            return Err(Error::NameTooLong);
        }
        if parent == TRASHDIR {
            return self.trashdir_lookup(name);
        }
        if parent == SNAPDIR {
            return match name {
                b"." => self.getattr(SNAPDIR),
                b".." => self.getattr(NodeId::live(ROOT_INO)),
                TRASHDIR_NAME => self.trashdir_attr(),
                CHECKPOINTS_NAME => self.getattr(CHECKPOINT_DIR),
                _ => self.getattr(NodeId::snapshot_root(self.snapshots.by_name(name)?.id)),
            };
        }
        if parent == CHECKPOINT_DIR {
            return self.checkpoint_lookup(name);
        }
        let is_root = parent.ino == ROOT_INO;
        match (parent.view, name) {
            (View::Live, SNAPDIR_NAME) if is_root => return self.getattr(SNAPDIR),
            (View::Snapshot(id), b"..") if is_root => return self.getattr(self.pinned_parent(id)),
            _ => {}
        }
        let view = self.view_generation(parent.view)?;
        let row = lock(&self.catalog).read(|tx| {
            let dir = tx.inode(view, parent.ino)?.ok_or(Error::NotFound)?;
            if dir.attrs.kind != Kind::Dir {
                return Err(Error::NotDir);
            }
            let ino = match name {
                b"." => dir.ino,
                b".." => dir.parent,
                _ => tx.lookup(view, parent.ino, name)?.ok_or(Error::NotFound)?.0,
            };
            tx.inode(view, ino)?.ok_or_else(|| {
                Error::Catalog(crate::catalog::Error::Corrupt(format!(
                    "entry {:?} names missing inode {ino}",
                    String::from_utf8_lossy(name)
                )))
            })
        })?;
        self.node_attr(parent.view, &row)
    }

    /// Creates a node of `kind` named `name` in `parent`. Shared by create, mkdir, mknod
    /// and symlink.
    fn make_node(
        &self,
        parent: NodeId,
        name: &[u8],
        new: NewNode<'_>,
        caller: Caller,
    ) -> Result<Attr> {
        let NewNode {
            kind,
            mode,
            rdev,
            target,
        } = new;
        Self::writable(parent)?;
        check_name(name)?;
        if Self::names_snapdir(parent, name) {
            return Err(Error::Exists);
        }
        let _change = self.enter_change();
        let time = now();
        let row = lock(&self.catalog).write(|tx| {
            let dir = live_dir(tx, parent.ino)?;
            if tx.lookup(LIVE, parent.ino, name)?.is_some() {
                return Err(Error::Exists);
            }
            let mut perm = mode & 0o7777;
            // A set-group-id directory hands its group down, and its bit to subdirectories.
            let gid = if dir.attrs.perm & libc::S_ISGID != 0 {
                if kind == Kind::Dir {
                    perm |= libc::S_ISGID;
                }
                dir.attrs.gid
            } else {
                caller.gid
            };
            let row = InodeRow {
                ino: tx.alloc_ino()?,
                attrs: Attrs {
                    kind,
                    perm,
                    uid: caller.uid,
                    gid,
                    nlink: if kind == Kind::Dir { 2 } else { 1 },
                    size: target.map_or(0, |t| t.len() as u64),
                    rdev,
                    atime: time,
                    mtime: time,
                    ctime: time,
                    crtime: time,
                },
                parent: if kind == Kind::Dir { parent.ino } else { 0 },
                alloc: 0,
                target: target.map(<[u8]>::to_vec),
            };
            tx.insert_inode(&row)?;
            tx.insert_dentry(parent.ino, name, row.ino, kind)?;
            touch_dir(tx, parent.ino, i32::from(kind == Kind::Dir), time)?;
            Ok(row)
        })?;
        Ok(Attr::from_row(View::Live, &row))
    }

    pub fn mkdir(&self, parent: NodeId, name: &[u8], mode: u32, caller: Caller) -> Result<Attr> {
        if parent == SNAPDIR {
            let snapshot = self.create_snapshot(name)?;
            return self.getattr(NodeId::snapshot_root(snapshot.id));
        }
        self.make_node(
            parent,
            name,
            NewNode {
                kind: Kind::Dir,
                mode,
                rdev: 0,
                target: None,
            },
            caller,
        )
    }

    /// Creates a regular file, fifo, socket or device node (`mode` carries the type).
    pub fn mknod(
        &self,
        parent: NodeId,
        name: &[u8],
        mode: u32,
        rdev: u32,
        caller: Caller,
    ) -> Result<Attr> {
        let kind = match mode & libc::S_IFMT {
            libc::S_IFREG | 0 => Kind::File,
            libc::S_IFIFO => Kind::Fifo,
            libc::S_IFSOCK => Kind::Socket,
            libc::S_IFCHR => Kind::CharDevice,
            libc::S_IFBLK => Kind::BlockDevice,
            libc::S_IFDIR => return Err(Error::Invalid("mknod cannot make a directory")),
            _ => return Err(Error::Invalid("unknown file type")),
        };
        self.make_node(
            parent,
            name,
            NewNode {
                kind,
                mode,
                rdev,
                target: None,
            },
            caller,
        )
    }

    pub fn symlink(
        &self,
        parent: NodeId,
        name: &[u8],
        target: &[u8],
        caller: Caller,
    ) -> Result<Attr> {
        if target.is_empty() {
            return Err(Error::NotFound);
        }
        if target.len() > libc::PATH_MAX as usize {
            return Err(Error::NameTooLong);
        }
        self.make_node(
            parent,
            name,
            NewNode {
                kind: Kind::Symlink,
                mode: 0o777,
                rdev: 0,
                target: Some(target),
            },
            caller,
        )
    }

    pub fn readlink(&self, node: NodeId) -> Result<Vec<u8>> {
        let row = self.row(node)?;
        match (row.attrs.kind, row.target) {
            (Kind::Symlink, Some(target)) => Ok(target),
            _ => Err(Error::Invalid("not a symbolic link")),
        }
    }

    pub fn link(&self, node: NodeId, new_parent: NodeId, new_name: &[u8]) -> Result<Attr> {
        Self::writable(node)?;
        Self::writable(new_parent)?;
        check_name(new_name)?;
        Self::check_not_snapdir(new_parent, new_name)?;
        let _change = self.enter_change();
        let time = now();
        let row = lock(&self.catalog).write(|tx| {
            let mut row = tx.inode(LIVE, node.ino)?.ok_or(Error::NotFound)?;
            if row.attrs.kind == Kind::Dir {
                return Err(Error::NotPermitted("hard links to directories"));
            }
            live_dir(tx, new_parent.ino)?;
            if tx.lookup(LIVE, new_parent.ino, new_name)?.is_some() {
                return Err(Error::Exists);
            }
            tx.insert_dentry(new_parent.ino, new_name, row.ino, row.attrs.kind)?;
            row.attrs.nlink += 1;
            row.attrs.ctime = time;
            tx.update_inode(&row)?;
            touch_dir(tx, new_parent.ino, 0, time)?;
            Ok(row)
        })?;
        Ok(self.attr_of(View::Live, &row))
    }

    pub fn unlink(&self, parent: NodeId, name: &[u8]) -> Result<()> {
        self.remove_entry(parent, name, false)
    }

    pub fn rmdir(&self, parent: NodeId, name: &[u8]) -> Result<()> {
        self.remove_entry(parent, name, true)
    }

    fn remove_entry(&self, parent: NodeId, name: &[u8], is_rmdir: bool) -> Result<()> {
        if parent == SNAPDIR && is_rmdir {
            return self.delete_snapshot(name);
        }
        if parent == TRASHDIR && is_rmdir {
            return self.purge_snapshot(name);
        }
        Self::writable(parent)?;
        Self::check_not_snapdir(parent, name)?;
        if name.len() > NAME_MAX {
            return Err(Error::NameTooLong);
        }
        if is_rmdir && name == b"." {
            return Err(Error::Invalid("cannot remove '.'"));
        }
        if is_rmdir && name == b".." {
            return Err(Error::NotEmpty);
        }
        let _change = self.enter_change();
        let time = now();
        let ino = self.freeing(|| {
            lock(&self.catalog).write(|tx| {
                live_dir(tx, parent.ino)?;
                let (ino, kind) = tx.lookup(LIVE, parent.ino, name)?.ok_or(Error::NotFound)?;
                match (is_rmdir, kind == Kind::Dir) {
                    (true, false) => return Err(Error::NotDir),
                    (false, true) => return Err(Error::IsDir),
                    _ => {}
                }
                self.drop_entry(tx, parent.ino, name, ino, time)?;
                touch_dir(tx, parent.ino, 0, time)?;
                Ok(ino)
            })
        })?;
        self.settle_orphan(Some(ino))?;
        self.freeing(|| self.collect_garbage())
    }

    /// A file unlinked or renamed over while tracked (open, or holding unstored changes):
    /// the change commits at once, so a crash meanwhile never brings the name back to a
    /// program that counts on its temporary file being gone (the next mount frees the
    /// orphan). An open one lives on unnamed until its last release; one closed already
    /// goes now (`free_unopened_orphan`).
    fn settle_orphan(&self, ino: Option<u64>) -> Result<()> {
        let Some(ino) = ino.filter(|&ino| self.files.is_tracked(ino)) else {
            return Ok(());
        };
        lock(&self.catalog).commit()?;
        self.free_unopened_orphan(ino)
    }

    /// Removes entry `name` (naming `ino`) from `parent` and drops one link of `ino`:
    /// a directory (checked empty) goes at once, a file when its last link goes and it is
    /// not open.
    fn drop_entry(
        &self,
        tx: &WriteTx<'_>,
        parent: u64,
        name: &[u8],
        ino: u64,
        time: i64,
    ) -> Result<()> {
        let mut row = tx.inode(LIVE, ino)?.ok_or(Error::NotFound)?;
        if row.attrs.kind == Kind::Dir && !tx.dir_is_empty(LIVE, ino)? {
            return Err(Error::NotEmpty);
        }
        tx.retire_dentry(parent, name)?;
        if row.attrs.kind == Kind::Dir {
            tx.retire_inode(ino)?;
            return touch_dir(tx, parent, -1, time);
        }
        row.attrs.nlink = row.attrs.nlink.saturating_sub(1);
        row.attrs.ctime = time;
        // An open file lives on unnamed until its last release (see `release`).
        if row.attrs.nlink == 0 && !self.files.is_tracked(ino) {
            Ok(tx.retire_inode(ino)?)
        } else {
            Ok(tx.update_inode(&row)?)
        }
    }

    pub fn rename(
        &self,
        parent: NodeId,
        name: &[u8],
        new_parent: NodeId,
        new_name: &[u8],
        flags: u32,
    ) -> Result<()> {
        if parent == TRASHDIR || new_parent == TRASHDIR {
            // Out of the bin is undelete; nothing else moves in or out of it.
            return match (parent == TRASHDIR && new_parent == SNAPDIR, flags) {
                (true, 0) => self.undelete_snapshot(name, Some(new_name)).map(drop),
                _ => Err(Error::NotPermitted(
                    "snapshots leave the recycle bin by rename into .snapshots",
                )),
            };
        }
        if parent == CHECKPOINT_DIR || new_parent == CHECKPOINT_DIR {
            return match (parent == CHECKPOINT_DIR, new_parent == SNAPDIR, flags) {
                (true, true, 0) => self.promote_checkpoint(name, new_name).map(drop),
                _ => Err(Error::NotPermitted(
                    "a checkpoint only moves into .snapshots, as a snapshot",
                )),
            };
        }
        match (parent == SNAPDIR, new_parent == SNAPDIR) {
            (true, true) if flags == 0 => return self.rename_snapshot(name, new_name),
            (true, true) => return Err(Error::Invalid("snapshots take no rename flags")),
            (false, false) if parent.view == new_parent.view => {}
            _ => return Err(Error::CrossDevice),
        }
        Self::writable(parent)?;
        check_name(name)?;
        check_name(new_name)?;
        Self::check_not_snapdir(parent, name)?;
        Self::check_not_snapdir(new_parent, new_name)?;
        let exchange = flags & libc::RENAME_EXCHANGE != 0;
        let no_replace = flags & libc::RENAME_NOREPLACE != 0;
        if flags & !(libc::RENAME_EXCHANGE | libc::RENAME_NOREPLACE) != 0
            || (exchange && no_replace)
        {
            return Err(Error::Invalid("unsupported rename flags"));
        }
        let (from, to) = (parent.ino, new_parent.ino);
        let _change = self.enter_change();
        let time = now();
        let replaced = lock(&self.catalog).write(|tx| {
            live_dir(tx, from)?;
            live_dir(tx, to)?;
            let mut replaced = None;
            let (ino, kind) = tx.lookup(LIVE, from, name)?.ok_or(Error::NotFound)?;
            let target = tx.lookup(LIVE, to, new_name)?;
            if kind == Kind::Dir && from != to && is_ancestor(tx, ino, to)? {
                return Err(Error::Invalid("cannot move a directory into itself"));
            }
            if exchange {
                let (other, other_kind) = target.ok_or(Error::NotFound)?;
                if other_kind == Kind::Dir && from != to && is_ancestor(tx, other, from)? {
                    return Err(Error::Invalid("cannot move a directory into itself"));
                }
                tx.retire_dentry(from, name)?;
                tx.retire_dentry(to, new_name)?;
                tx.insert_dentry(to, new_name, ino, kind)?;
                tx.insert_dentry(from, name, other, other_kind)?;
                move_node(tx, ino, from, to, time)?;
                move_node(tx, other, to, from, time)?;
            } else {
                if let Some((other, other_kind)) = target {
                    if no_replace {
                        return Err(Error::Exists);
                    }
                    if other == ino {
                        // Two links to one file: POSIX says do nothing.
                        return Ok(None);
                    }
                    match (kind == Kind::Dir, other_kind == Kind::Dir) {
                        (true, false) => return Err(Error::NotDir),
                        (false, true) => return Err(Error::IsDir),
                        _ => {}
                    }
                    self.drop_entry(tx, to, new_name, other, time)?;
                    replaced = Some(other);
                }
                tx.retire_dentry(from, name)?;
                tx.insert_dentry(to, new_name, ino, kind)?;
                move_node(tx, ino, from, to, time)?;
            }
            touch_dir(tx, from, 0, time)?;
            if from != to {
                touch_dir(tx, to, 0, time)?;
            }
            Ok(replaced)
        })?;
        self.settle_orphan(replaced)?;
        self.collect_garbage()
    }

    pub fn setattr(&self, node: NodeId, set: SetAttr) -> Result<Attr> {
        Self::writable(node)?;
        let _change = self.enter_change();
        let row = self.row(node)?;
        if row.attrs.kind == Kind::File {
            return self.setattr_file(node.ino, set);
        }
        if set.size.is_some() {
            return Err(if row.attrs.kind == Kind::Dir {
                Error::IsDir
            } else {
                Error::Invalid("cannot truncate this kind of file")
            });
        }
        let row = lock(&self.catalog).write(|tx| {
            let mut row = tx.inode(LIVE, node.ino)?.ok_or(Error::NotFound)?;
            apply_setattr(&mut row, &set, now());
            tx.update_inode(&row)?;
            Ok::<_, Error>(row)
        })?;
        Ok(Attr::from_row(View::Live, &row))
    }

    pub fn access(&self, node: NodeId, mask: u32, caller: Caller) -> Result<()> {
        let attr = self.getattr(node)?;
        if mask & W_OK != 0 && node.view != View::Live {
            return Err(Error::ReadOnly);
        }
        if permits(&attr, caller, mask) {
            Ok(())
        } else {
            Err(Error::AccessDenied)
        }
    }

    /// Opens directory `node` for readdir; returns its handle. The listing is taken at the
    /// first readdir: the kernel sends none when it serves the listing from its cache
    /// (FOPEN_CACHE_DIR), and then listing the directory here would be wasted.
    pub fn opendir(&self, node: NodeId) -> Result<u64> {
        if self.getattr(node)?.attrs.kind != Kind::Dir {
            return Err(Error::NotDir);
        }
        let handle = self.next_dir_handle.fetch_add(1, Ordering::Relaxed);
        lock(&self.dir_handles).insert(handle, DirHandle::Opened(node));
        Ok(handle)
    }

    /// The entries of an open directory, listed at the first call and the same at every
    /// later one, so that offsets stay valid until releasedir. A directory removed since
    /// opendir lists nothing, as on Linux's own filesystems.
    pub fn readdir(&self, handle: u64) -> Result<Arc<Vec<DirEntry>>> {
        let node = match lock(&self.dir_handles).get(&handle) {
            Some(DirHandle::Listed(entries)) => return Ok(entries.clone()),
            Some(DirHandle::Opened(node)) => *node,
            None => return Err(Error::Invalid("unknown directory handle")),
        };
        let entries = match self.listing(node) {
            Err(Error::NotFound) => Vec::new(),
            listed => listed?,
        };
        let mut handles = lock(&self.dir_handles);
        let slot = handles
            .get_mut(&handle)
            .ok_or(Error::Invalid("unknown directory handle"))?;
        if let DirHandle::Listed(first) = slot {
            return Ok(first.clone());
        }
        let entries = Arc::new(entries);
        *slot = DirHandle::Listed(entries.clone());
        Ok(entries)
    }

    fn listing(&self, node: NodeId) -> Result<Vec<DirEntry>> {
        if node == SNAPDIR {
            self.snapdir_entries()
        } else if node == TRASHDIR {
            self.trashdir_entries()
        } else if node == CHECKPOINT_DIR {
            self.checkpoint_dir_entries()
        } else {
            self.dir_entries(node)
        }
    }

    /// `.`, `..` and one directory per snapshot.
    fn snapdir_entries(&self) -> Result<Vec<DirEntry>> {
        let mut entries = vec![
            DirEntry {
                name: b".".to_vec(),
                attr: self.getattr(SNAPDIR)?,
            },
            DirEntry {
                name: b"..".to_vec(),
                attr: self.getattr(NodeId::live(ROOT_INO))?,
            },
        ];
        let snapshots = self.list_snapshots().into_iter();
        self.push_snapshot_roots(&mut entries, snapshots.map(|row| (row.id, row.name)))?;
        Ok(entries)
    }

    /// Appends one directory entry per snapshot root in `roots` (id, name). A snapshot
    /// deleted since its row was read (retention, thinning, a follower's sync) is left
    /// out rather than failing the whole listing with ENOENT.
    pub(super) fn push_snapshot_roots(
        &self,
        entries: &mut Vec<DirEntry>,
        roots: impl Iterator<Item = (u64, Vec<u8>)>,
    ) -> Result<()> {
        for (id, name) in roots {
            match self.getattr(NodeId::snapshot_root(id)) {
                Ok(attr) => entries.push(DirEntry { name, attr }),
                Err(Error::NotFound) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn dir_entries(&self, node: NodeId) -> Result<Vec<DirEntry>> {
        let view = self.view_generation(node.view)?;
        let (dir, rows) = lock(&self.catalog).read(|tx| {
            let dir = tx.inode(view, node.ino)?.ok_or(Error::NotFound)?;
            if dir.attrs.kind != Kind::Dir {
                return Err(Error::NotDir);
            }
            let parent = tx.inode(view, dir.parent)?.unwrap_or_else(|| dir.clone());
            Ok((vec![dir, parent], tx.list_dir(view, node.ino)?))
        })?;
        let mut entries = Vec::with_capacity(rows.len() + 3);
        for (name, row) in [&b"."[..], b".."].into_iter().zip(&dir) {
            entries.push(DirEntry {
                name: name.to_vec(),
                attr: self.node_attr(node.view, row)?,
            });
        }
        if node.ino == ROOT_INO {
            match node.view {
                View::Live if self.snapdir_visible => entries.push(DirEntry {
                    name: SNAPDIR_NAME.to_vec(),
                    attr: self.snapdir_attr(&dir[0]),
                }),
                View::Snapshot(id) => entries[1].attr = self.getattr(self.pinned_parent(id))?,
                View::Live => {}
            }
        }
        for entry in rows {
            entries.push(DirEntry {
                attr: self.attr_of(node.view, &entry.inode),
                name: entry.name,
            });
        }
        Ok(entries)
    }

    pub fn releasedir(&self, handle: u64) {
        lock(&self.dir_handles).remove(&handle);
    }

    pub fn getxattr(&self, node: NodeId, name: &[u8]) -> Result<Vec<u8>> {
        if node == SNAPDIR {
            return self.snapdir_getxattr(name);
        }
        if let Some(id) = snapshot_root(node) {
            let found = self
                .snapshot_xattrs(id)?
                .into_iter()
                .find(|(n, _)| n == name);
            if let Some((_, value)) = found {
                return Ok(value);
            }
        }
        let view = self.view_generation(node.view)?;
        let catalog = lock(&self.catalog);
        if view == LIVE && catalog.live_inode_is_bare(node.ino) {
            return Err(Error::NoXattr);
        }
        catalog
            .read(|tx| tx.xattr_get(view, node.ino, name))?
            .ok_or(Error::NoXattr)
    }

    pub fn listxattr(&self, node: NodeId) -> Result<Vec<Vec<u8>>> {
        if node == SNAPDIR || node == TRASHDIR || node == CHECKPOINT_DIR {
            return Ok(Vec::new());
        }
        let view = self.view_generation(node.view)?;
        self.row(node)?;
        let mut names = lock(&self.catalog).read(|tx| tx.xattr_names(view, node.ino))?;
        if let Some(id) = snapshot_root(node) {
            names.extend(self.snapshot_xattrs(id)?.into_iter().map(|(name, _)| name));
        }
        Ok(names)
    }

    pub fn setxattr(&self, node: NodeId, name: &[u8], value: &[u8], flags: i32) -> Result<()> {
        if let Some(id) = snapshot_root(node) {
            return self.set_snapshot_tag(id, name, Some(value));
        }
        if node == SNAPDIR {
            return self.snapdir_setxattr(name, Some(value));
        }
        Self::writable(node)?;
        if name.is_empty() || name.len() > NAME_MAX {
            return Err(Error::Invalid("bad extended attribute name"));
        }
        if value.len() > XATTR_SIZE_MAX {
            return Err(Error::XattrTooBig);
        }
        let _change = self.enter_change();
        let time = now();
        lock(&self.catalog).write(|tx| {
            let mut row = tx.inode(LIVE, node.ino)?.ok_or(Error::NotFound)?;
            check_xattr_namespace(&row, name)?;
            let exists = tx.xattr_get(LIVE, node.ino, name)?.is_some();
            if flags & XATTR_CREATE != 0 && exists {
                return Err(Error::Exists);
            }
            if flags & XATTR_REPLACE != 0 && !exists {
                return Err(Error::NoXattr);
            }
            tx.xattr_set(node.ino, name, value)?;
            row.attrs.ctime = time;
            tx.update_inode(&row).map_err(Error::from)
        })
    }

    pub fn removexattr(&self, node: NodeId, name: &[u8]) -> Result<()> {
        if let Some(id) = snapshot_root(node) {
            return self.set_snapshot_tag(id, name, None);
        }
        if node == SNAPDIR {
            return self.snapdir_setxattr(name, None);
        }
        Self::writable(node)?;
        let _change = self.enter_change();
        let time = now();
        lock(&self.catalog).write(|tx| {
            let mut row = tx.inode(LIVE, node.ino)?.ok_or(Error::NotFound)?;
            check_xattr_namespace(&row, name)?;
            if tx.xattr_get(LIVE, node.ino, name)?.is_none() {
                return Err(Error::NoXattr);
            }
            tx.xattr_remove(node.ino, name)?;
            row.attrs.ctime = time;
            tx.update_inode(&row).map_err(Error::from)
        })
    }
}

/// What a new node is, for `make_node`.
struct NewNode<'a> {
    kind: Kind,
    mode: u32,
    rdev: u32,
    target: Option<&'a [u8]>,
}

/// The snapshot whose root `node` is, if it is one.
fn snapshot_root(node: NodeId) -> Option<u64> {
    match node.view {
        View::Snapshot(id) if node.ino == ROOT_INO => Some(id),
        _ => None,
    }
}

/// Linux allows user.* attributes only on regular files and directories; system.* (ACLs)
/// is not supported.
fn check_xattr_namespace(row: &InodeRow, name: &[u8]) -> Result<()> {
    if name.starts_with(b"user.") {
        if !matches!(row.attrs.kind, Kind::File | Kind::Dir) {
            return Err(Error::NotPermitted("user.* attributes on special files"));
        }
        return Ok(());
    }
    if name.starts_with(b"trusted.") || name.starts_with(b"security.") {
        return Ok(());
    }
    Err(Error::XattrUnsupported)
}

/// The live directory `ino`, or the error an operation inside a non-directory gets.
fn live_dir(tx: &ReadTx<'_>, ino: u64) -> Result<InodeRow> {
    let dir = tx.inode(LIVE, ino)?.ok_or(Error::NotFound)?;
    if dir.attrs.kind != Kind::Dir {
        return Err(Error::NotDir);
    }
    Ok(dir)
}

/// A directory's entries changed: update its times, and its link count by `nlink_delta`
/// subdirectories.
fn touch_dir(tx: &WriteTx<'_>, ino: u64, nlink_delta: i32, time: i64) -> Result<()> {
    let mut dir = live_dir(tx, ino)?;
    dir.attrs.nlink = dir.attrs.nlink.saturating_add_signed(nlink_delta);
    dir.attrs.mtime = time;
    dir.attrs.ctime = time;
    tx.update_inode(&dir)?;
    Ok(())
}

/// After `ino` moved from directory `from` to `to`: its ctime, and for a directory its
/// '..' and both parents' link counts.
fn move_node(tx: &WriteTx<'_>, ino: u64, from: u64, to: u64, time: i64) -> Result<()> {
    let mut row = tx.inode(LIVE, ino)?.ok_or(Error::NotFound)?;
    row.attrs.ctime = time;
    let is_dir_move = row.attrs.kind == Kind::Dir && from != to;
    if is_dir_move {
        row.parent = to;
    }
    tx.update_inode(&row)?;
    if is_dir_move {
        touch_dir(tx, from, -1, time)?;
        touch_dir(tx, to, 1, time)?;
    }
    Ok(())
}

/// Whether directory `ancestor` is `dir` or one of its ancestors in the live tree.
fn is_ancestor(tx: &ReadTx<'_>, ancestor: u64, mut dir: u64) -> Result<bool> {
    loop {
        if dir == ancestor {
            return Ok(true);
        }
        if dir == ROOT_INO {
            return Ok(false);
        }
        dir = tx.inode(LIVE, dir)?.ok_or(Error::NotFound)?.parent;
    }
}

/// Applies the non-size changes of a setattr to `row`, with POSIX's side effects.
pub(super) fn apply_setattr(row: &mut InodeRow, set: &SetAttr, time: i64) {
    let resolve = |t: SetTime| match t {
        SetTime::At(t) => t,
        SetTime::Now => time,
    };
    if let Some(mode) = set.mode {
        row.attrs.perm = mode & 0o7777;
    }
    let chown = set.uid.is_some() || set.gid.is_some();
    if let Some(uid) = set.uid {
        row.attrs.uid = uid;
    }
    if let Some(gid) = set.gid {
        row.attrs.gid = gid;
    }
    // chown, by anyone, and a truncate or write by a caller without CAP_FSETID clear
    // set-user-id, and set-group-id where it means "group executes", on files (unless the
    // same call sets the mode), as Linux does on its own filesystems.
    if (chown || set.drop_setid) && row.attrs.kind == Kind::File && set.mode.is_none() {
        row.attrs.perm &= !libc::S_ISUID;
        if row.attrs.perm & 0o010 != 0 {
            row.attrs.perm &= !libc::S_ISGID;
        }
    }
    if let Some(atime) = set.atime {
        row.attrs.atime = resolve(atime);
    }
    if let Some(mtime) = set.mtime {
        row.attrs.mtime = resolve(mtime);
    }
    row.attrs.ctime = set.ctime.unwrap_or(time);
}
