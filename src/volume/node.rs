//! How nodes are named across the mount, and the attributes the core reports for them.
//!
//! A mount shows the live volume and every snapshot at once, and a file seen in two views
//! must have two inode numbers. So a node id packs the view (0 = live, else a snapshot id)
//! above the catalog's inode number.

use crate::catalog::{Attrs, InodeRow, Kind, ROOT_INO};

const VIEW_SHIFT: u32 = 40;
const INO_MASK: u64 = (1 << VIEW_SHIFT) - 1;

/// The view a node belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum View {
    Live,
    Snapshot(u64),
}

/// An open file, as the kernel names it from open to release: each open gets its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FileHandle(pub u64);

/// A node of the mount: a catalog inode seen through one view.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NodeId {
    pub view: View,
    pub ino: u64,
}

impl NodeId {
    pub fn live(ino: u64) -> NodeId {
        NodeId {
            view: View::Live,
            ino,
        }
    }

    /// The root directory of snapshot `id`.
    pub fn snapshot_root(id: u64) -> NodeId {
        NodeId {
            view: View::Snapshot(id),
            ino: ROOT_INO,
        }
    }

    pub fn from_raw(raw: u64) -> NodeId {
        let ino = raw & INO_MASK;
        match raw >> VIEW_SHIFT {
            0 => NodeId::live(ino),
            id => NodeId {
                view: View::Snapshot(id),
                ino,
            },
        }
    }

    /// A live node the catalog holds, not one of the control directories (`.snapshots`
    /// and what is below it): only this mount's requests change it or the names in it.
    pub fn is_live_catalog_node(self) -> bool {
        self.view == View::Live
            && (self.ino == ROOT_INO || self.ino >= crate::catalog::FIRST_FREE_INO)
    }

    pub fn raw(self) -> u64 {
        let view = match self.view {
            View::Live => 0,
            View::Snapshot(id) => id,
        };
        (view << VIEW_SHIFT) | self.ino
    }
}

/// Attributes of a node, as stat(2) reports them. Times in nanoseconds since the epoch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attr {
    pub node: NodeId,
    pub attrs: Attrs,
    /// 512-byte units actually stored (holes cost nothing).
    pub blocks: u64,
}

impl Attr {
    pub fn from_row(view: View, row: &InodeRow) -> Attr {
        let mut attrs = row.attrs.clone();
        attrs.perm &= 0o7777;
        Attr {
            node: NodeId { view, ino: row.ino },
            attrs,
            blocks: row.alloc.div_ceil(512),
        }
    }
}

/// Who asks: the credentials of the calling process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
}

impl Caller {
    pub const ROOT: Caller = Caller { uid: 0, gid: 0 };
}

/// A time to set: a given instant or the moment of the call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetTime {
    At(i64),
    Now,
}

/// The attribute changes of one setattr call; `None` leaves a field alone.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<SetTime>,
    pub mtime: Option<SetTime>,
    pub ctime: Option<i64>,
    /// The caller lacks CAP_FSETID and the kernel asked to drop a file's set-user-id and
    /// set-group-id bits with this change (a truncate, or the empty setattr it sends before
    /// a write or fallocate): with FUSE_HANDLE_KILLPRIV_V2 that falls to the filesystem.
    pub drop_setid: bool,
}

/// One directory entry as readdir returns it.
#[derive(Clone, Debug)]
pub struct DirEntry {
    pub name: Vec<u8>,
    pub attr: Attr,
}

/// Filesystem usage for statfs.
#[derive(Clone, Copy, Debug)]
pub struct FsStats {
    pub block_size: u32,
    pub blocks: u64,
    pub blocks_free: u64,
    pub blocks_avail: u64,
    pub files: u64,
    pub files_free: u64,
}

/// Access bits of access(2).
pub const R_OK: u32 = 4;
pub const W_OK: u32 = 2;
pub const X_OK: u32 = 1;

/// POSIX permission check of `mask` (R_OK|W_OK|X_OK) on `attr` for `caller`.
pub fn permits(attr: &Attr, caller: Caller, mask: u32) -> bool {
    let perm = attr.attrs.perm;
    if caller.uid == 0 {
        // Root may do anything but execute a file no one may execute.
        return mask & X_OK == 0 || attr.attrs.kind == Kind::Dir || perm & 0o111 != 0;
    }
    let granted = if caller.uid == attr.attrs.uid {
        perm >> 6
    } else if caller.gid == attr.attrs.gid {
        perm >> 3
    } else {
        perm
    } & 0o7;
    granted & mask == mask
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_round_trip_and_differ_per_view() {
        let live = NodeId::live(42);
        let snap = NodeId {
            view: View::Snapshot(7),
            ino: 42,
        };
        assert_eq!(NodeId::from_raw(live.raw()), live);
        assert_eq!(NodeId::from_raw(snap.raw()), snap);
        assert_ne!(live.raw(), snap.raw());
        assert_eq!(NodeId::from_raw(1), NodeId::live(1));
    }
}
