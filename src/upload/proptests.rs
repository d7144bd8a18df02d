//! The snapshot path end to end without a mount, against a model: random tree operations
//! and snapshots on the core, uploaded by the uploader to a directory store, read back
//! through the store reader, and compared with an independent model of what each snapshot
//! must hold (names, kinds, bytes, modes, symlink targets, link counts, hard links,
//! xattrs). Built like mountpoint-s3's reftests: generators pick targets by index into
//! what the model holds, the model says what each operation must return, the harness runs
//! both and compares. Shrunk failures are the named regression tests at the end. A
//! follower (`--read-only`) follows the store beside it: after each upload its snapshots
//! and its live tree (the newest snapshot), read through the core's calls, must hold
//! what the model says too.

use std::collections::BTreeMap;
use std::sync::Arc;

use proptest::prelude::*;

use super::{Outcome, UploadOptions, Worker};
use crate::catalog::{Kind, ROOT_INO};
use crate::store::{self, StoreUrl};
use crate::volume::tests::pattern;
use crate::volume::{Caller, NodeId, Options, SetAttr, View, Volume};

const ME: Caller = Caller { uid: 0, gid: 0 };
const ROOT: NodeId = NodeId {
    view: View::Live,
    ino: ROOT_INO,
};
const BLOCK: usize = 4096;
/// Few names, so operations collide: replacing renames, EEXIST, links between names.
const NAMES: [&[u8]; 3] = [b"a", b"b", b"c"];
const MODES: [u32; 4] = [0o644, 0o600, 0o755, 0o511];
const XATTRS: [&[u8]; 2] = [b"user.x", b"user.y"];
const TARGETS: [&[u8]; 3] = [b"a", b"../b/c", b"/nowhere/at/all"];

#[derive(Clone, Debug)]
enum Op {
    /// `dir`, `node`: indexes into the model's directories, or its non-root entries
    /// (modulo their number); `name` into `NAMES`.
    Mkdir {
        dir: usize,
        name: usize,
        mode: usize,
    },
    /// Creates the file if missing (skipped if the name is not a file); `close: false`
    /// leaves it open, its last writes buffered.
    Write {
        dir: usize,
        name: usize,
        offset: u64,
        len: usize,
        seed: u8,
        close: bool,
    },
    Truncate {
        node: usize,
        size: u64,
    },
    Rename {
        node: usize,
        dir: usize,
        name: usize,
    },
    Unlink {
        node: usize,
    },
    /// `dir` indexes the directories other than the root.
    Rmdir {
        dir: usize,
    },
    Symlink {
        dir: usize,
        name: usize,
        target: usize,
    },
    Link {
        node: usize,
        dir: usize,
        name: usize,
    },
    /// `node` indexes every entry, the root first.
    SetXattr {
        node: usize,
        key: usize,
        len: usize,
        seed: u8,
    },
    /// Skipped on symlinks (chmod follows them).
    Chmod {
        node: usize,
        mode: usize,
    },
    Snapshot,
    DeleteSnapshot {
        pick: usize,
    },
    /// Shuts the volume down and opens it again, with a new uploader (a remount).
    Reopen,
    /// Runs the uploader until nothing is pending, then reads the store back.
    Upload,
}

fn op() -> impl Strategy<Value = Op> {
    let pick = || 0..8usize;
    let name = || 0..NAMES.len();
    let mode = || 0..MODES.len();
    prop_oneof![
        3 => (pick(), name(), mode()).prop_map(|(dir, name, mode)| Op::Mkdir { dir, name, mode }),
        // Offsets on 1 KiB steps and few seeds: blocks repeat, within and across files.
        5 => (pick(), name(), 0..12u64, 1..2 * BLOCK, 0..3u8, prop::bool::weighted(0.8))
            .prop_map(|(dir, name, k, len, seed, close)| Op::Write {
                dir, name, offset: k * 1024, len, seed, close,
            }),
        2 => (pick(), 0..4 * BLOCK as u64).prop_map(|(node, size)| Op::Truncate { node, size }),
        3 => (pick(), pick(), name()).prop_map(|(node, dir, name)| Op::Rename { node, dir, name }),
        2 => pick().prop_map(|node| Op::Unlink { node }),
        1 => pick().prop_map(|dir| Op::Rmdir { dir }),
        1 => (pick(), name(), 0..TARGETS.len())
            .prop_map(|(dir, name, target)| Op::Symlink { dir, name, target }),
        2 => (pick(), pick(), name()).prop_map(|(node, dir, name)| Op::Link { node, dir, name }),
        2 => (pick(), 0..XATTRS.len(), 0..40usize, any::<u8>())
            .prop_map(|(node, key, len, seed)| Op::SetXattr { node, key, len, seed }),
        1 => (pick(), mode()).prop_map(|(node, mode)| Op::Chmod { node, mode }),
        3 => Just(Op::Snapshot),
        2 => pick().prop_map(|pick| Op::DeleteSnapshot { pick }),
        1 => Just(Op::Reopen),
        2 => Just(Op::Upload),
    ]
}

// ---- The model ----

#[derive(Clone, Debug)]
enum Body {
    Dir(BTreeMap<Vec<u8>, usize>),
    File(Vec<u8>),
    Symlink(Vec<u8>),
}

#[derive(Clone, Debug)]
struct Inode {
    perm: u32,
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    body: Body,
}

/// Inodes by key (the root is 0); hard links are two entries with one key. A snapshot of
/// the model is a clone.
#[derive(Clone, Debug)]
struct Model {
    inodes: BTreeMap<usize, Inode>,
    next: usize,
}

/// Where an entry is: its path from the root, its parent and name (none for the root).
#[derive(Clone, Debug)]
struct Place {
    path: Vec<Vec<u8>>,
    parent: Option<(usize, Vec<u8>)>,
    key: usize,
}

type Errno = i32;

impl Model {
    fn new(root_perm: u32) -> Model {
        let root = Inode {
            perm: root_perm,
            xattrs: BTreeMap::new(),
            body: Body::Dir(BTreeMap::new()),
        };
        Model {
            inodes: BTreeMap::from([(0, root)]),
            next: 1,
        }
    }

    /// Every entry, depth first in name order, the root first.
    fn places(&self) -> Vec<Place> {
        let mut places = Vec::new();
        let mut stack = vec![Place {
            path: Vec::new(),
            parent: None,
            key: 0,
        }];
        while let Some(place) = stack.pop() {
            if let Body::Dir(entries) = &self.inodes[&place.key].body {
                for (name, &key) in entries.iter().rev() {
                    let mut path = place.path.clone();
                    path.push(name.clone());
                    stack.push(Place {
                        path,
                        parent: Some((place.key, name.clone())),
                        key,
                    });
                }
            }
            places.push(place);
        }
        places
    }

    fn dirs(&self) -> Vec<Place> {
        let places = self.places();
        places.into_iter().filter(|p| self.is_dir(p.key)).collect()
    }

    fn entries(&self, dir: usize) -> &BTreeMap<Vec<u8>, usize> {
        match &self.inodes[&dir].body {
            Body::Dir(entries) => entries,
            other => panic!("inode {dir} is not a directory: {other:?}"),
        }
    }

    fn entries_mut(&mut self, dir: usize) -> &mut BTreeMap<Vec<u8>, usize> {
        match self.inodes.get_mut(&dir).map(|i| &mut i.body) {
            Some(Body::Dir(entries)) => entries,
            other => panic!("inode {dir} is not a directory: {other:?}"),
        }
    }

    fn is_dir(&self, key: usize) -> bool {
        matches!(self.inodes[&key].body, Body::Dir(_))
    }

    fn child(&self, dir: usize, name: &[u8]) -> Option<usize> {
        self.entries(dir).get(name).copied()
    }

    fn add(&mut self, dir: usize, name: &[u8], perm: u32, body: Body) -> Result<usize, Errno> {
        if self.child(dir, name).is_some() {
            return Err(libc::EEXIST);
        }
        let key = self.next;
        self.next += 1;
        let xattrs = BTreeMap::new();
        self.inodes.insert(key, Inode { perm, xattrs, body });
        self.entries_mut(dir).insert(name.to_vec(), key);
        Ok(key)
    }

    fn file_mut(&mut self, key: usize) -> Option<&mut Vec<u8>> {
        match &mut self.inodes.get_mut(&key)?.body {
            Body::File(data) => Some(data),
            _ => None,
        }
    }

    fn truncate(&mut self, key: usize, size: u64) -> Result<(), Errno> {
        match &mut self.inodes.get_mut(&key).map(|i| &mut i.body) {
            Some(Body::File(data)) => {
                data.resize(size as usize, 0);
                Ok(())
            }
            Some(Body::Dir(_)) => Err(libc::EISDIR),
            _ => Err(libc::EINVAL),
        }
    }

    /// POSIX rename(2), in the order Linux checks.
    fn rename(&mut self, from: &Place, to: &Place, name: &[u8]) -> Result<(), Errno> {
        let Some((parent, old_name)) = &from.parent else {
            unreachable!("the root is never renamed")
        };
        if self.is_dir(from.key) && to.path.starts_with(&from.path) {
            return Err(libc::EINVAL);
        }
        if let Some(other) = self.child(to.key, name) {
            if other == from.key {
                return Ok(());
            }
            match (self.is_dir(from.key), self.is_dir(other)) {
                (true, false) => return Err(libc::ENOTDIR),
                (false, true) => return Err(libc::EISDIR),
                (true, true) if !self.entries(other).is_empty() => return Err(libc::ENOTEMPTY),
                _ => {}
            }
        }
        self.entries_mut(*parent).remove(old_name);
        self.entries_mut(to.key).insert(name.to_vec(), from.key);
        Ok(())
    }

    fn remove(&mut self, place: &Place, dir: bool) -> Result<(), Errno> {
        let Some((parent, name)) = &place.parent else {
            unreachable!("the root is never removed")
        };
        match (dir, self.is_dir(place.key)) {
            (false, true) => return Err(libc::EISDIR),
            (true, false) => return Err(libc::ENOTDIR),
            (true, true) if !self.entries(place.key).is_empty() => return Err(libc::ENOTEMPTY),
            _ => {}
        }
        self.entries_mut(*parent).remove(name);
        Ok(())
    }

    fn link(&mut self, from: &Place, dir: usize, name: &[u8]) -> Result<(), Errno> {
        if self.is_dir(from.key) {
            return Err(libc::EPERM);
        }
        if self.child(dir, name).is_some() {
            return Err(libc::EEXIST);
        }
        self.entries_mut(dir).insert(name.to_vec(), from.key);
        Ok(())
    }

    fn set_xattr(&mut self, key: usize, name: &[u8], value: &[u8]) -> Result<(), Errno> {
        let inode = self.inodes.get_mut(&key).expect("inode exists");
        if let Body::Symlink(_) = inode.body {
            // user.* attributes only on files and directories, as Linux has it.
            return Err(libc::EPERM);
        }
        inode.xattrs.insert(name.to_vec(), value.to_vec());
        Ok(())
    }

    /// What a snapshot of this model must read back as.
    fn tree(&self) -> Tree {
        let places = self.places();
        let mut links: BTreeMap<usize, u32> = BTreeMap::new();
        for place in &places {
            *links.entry(place.key).or_default() += 1;
        }
        let nodes = places.iter().map(|place| {
            let inode = &self.inodes[&place.key];
            let (kind, nlink, data) = match &inode.body {
                Body::Dir(entries) => {
                    let subdirs = entries.values().filter(|&&k| self.is_dir(k)).count();
                    (Kind::Dir, 2 + subdirs as u32, Vec::new())
                }
                Body::File(data) => (Kind::File, links[&place.key], data.clone()),
                Body::Symlink(target) => (Kind::Symlink, links[&place.key], target.clone()),
            };
            let node = Node {
                kind,
                perm: inode.perm,
                nlink,
                same_as: Vec::new(),
                data,
                xattrs: inode.xattrs.clone().into_iter().collect(),
            };
            (path_text(&place.path), place.key as u64, node)
        });
        tree(nodes)
    }
}

fn path_text(parts: &[Vec<u8>]) -> Vec<u8> {
    let mut path = Vec::new();
    for part in parts {
        path.push(b'/');
        path.extend_from_slice(part);
    }
    if path.is_empty() {
        path.push(b'/');
    }
    path
}

// ---- What a snapshot holds, as the model says and as the store reads back ----

/// One entry of a snapshot. `same_as` is the first path (in byte order) naming the same
/// inode: equal for hard links, the entry's own path otherwise.
#[derive(PartialEq, Eq)]
struct Node {
    kind: Kind,
    perm: u32,
    nlink: u32,
    same_as: Vec<u8>,
    /// A file's bytes, a symlink's target.
    data: Vec<u8>,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Node {
    /// The node of an entry with `attrs`, `same_as` left to `tree`.
    fn of(
        attrs: &crate::catalog::Attrs,
        data: Vec<u8>,
        mut xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    ) -> Node {
        xattrs.sort();
        Node {
            kind: attrs.kind,
            perm: attrs.perm,
            nlink: attrs.nlink,
            same_as: Vec::new(),
            data,
            xattrs,
        }
    }
}

/// Asserts that `found` (in `what`, read from `place`) is `model`'s tree, path by path.
fn assert_holds(found: &Tree, model: &Model, what: &str, place: &str) {
    let expected = model.tree();
    let paths: std::collections::BTreeSet<&Vec<u8>> = expected.keys().chain(found.keys()).collect();
    for path in paths {
        assert_eq!(
            found.get(path),
            expected.get(path),
            "{what}:{} {place} (left) against the model (right)",
            String::from_utf8_lossy(path)
        );
    }
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("kind", &self.kind)
            .field("perm", &format_args!("{:o}", self.perm))
            .field("nlink", &self.nlink)
            .field("same_as", &String::from_utf8_lossy(&self.same_as))
            .field("len", &self.data.len())
            .field("data", &blake3::hash(&self.data).to_hex()[..12].to_owned())
            .field("xattrs", &self.xattrs)
            .finish()
    }
}

/// Paths to nodes.
type Tree = BTreeMap<Vec<u8>, Node>;

/// The tree of `nodes` given as (path, inode identity, node), `same_as` filled in.
fn tree(nodes: impl Iterator<Item = (Vec<u8>, u64, Node)>) -> Tree {
    let nodes: Vec<_> = nodes.collect();
    let mut first: BTreeMap<u64, &[u8]> = BTreeMap::new();
    for (path, identity, _) in &nodes {
        first
            .entry(*identity)
            .and_modify(|p| *p = (*p).min(path.as_slice()))
            .or_insert(path);
    }
    let first: BTreeMap<u64, Vec<u8>> = first.into_iter().map(|(i, p)| (i, p.to_vec())).collect();
    nodes
        .into_iter()
        .map(|(path, identity, mut node)| {
            node.same_as = first[&identity].clone();
            (path, node)
        })
        .collect()
}

/// Every snapshot in the store at `url`, by name, read through the store reader. The one
/// function that knows where the reader lives.
fn read_store(url: &StoreUrl) -> BTreeMap<Vec<u8>, Tree> {
    use crate::manifest::Content;
    use crate::store::{Source, StoreChain, StoreSource};

    fn read(source: &dyn Source) -> Tree {
        let mut nodes = Vec::new();
        let mut stack = vec![(b"/".to_vec(), source.root().expect("root"))];
        while let Some((path, entry)) = stack.pop() {
            let data = match &entry.content {
                Content::Tree(_) => {
                    for child in source.children(&entry).expect("directory") {
                        let mut child_path = path.clone();
                        if child_path != b"/" {
                            child_path.push(b'/');
                        }
                        child_path.extend_from_slice(&child.name);
                        stack.push((child_path, child));
                    }
                    Vec::new()
                }
                Content::Blocks(blocks) => {
                    let mut data = vec![0; entry.attrs.size as usize];
                    for (index, hash) in blocks {
                        let block = source.block(hash).expect("block");
                        let start = *index as usize * source.block_size() as usize;
                        let end = start + block.len();
                        assert!(end <= data.len(), "block {index} of {path:?} past its size");
                        data[start..end].copy_from_slice(&block);
                    }
                    data
                }
                Content::None => entry.target.clone().unwrap_or_default(),
            };
            let node = Node::of(&entry.attrs, data, entry.xattrs.clone());
            nodes.push((path, entry.ino, node));
        }
        tree(nodes.into_iter())
    }

    let runtime = crate::store::runtime().expect("a runtime");
    let mut stores = StoreChain::open(runtime.handle(), url, None).expect("open the store");
    let listing = stores.list().expect("list the store");
    assert!(listing.damaged.is_empty(), "{:?}", listing.damaged);
    stores
        .set_origin(listing.origin.as_ref())
        .expect("open the origin");
    listing
        .snapshots
        .into_iter()
        .map(|manifest| {
            let name = manifest.name.clone();
            (name, read(&StoreSource::new(stores.clone(), manifest)))
        })
        .collect()
}

/// The tree of `root` in `volume` (the live tree or a snapshot's), read through the
/// core's calls as a mount's requests make them. Names with a dot (the control
/// directories) and snapfs's own xattrs are not the tree's.
fn read_view(volume: &Volume, root: NodeId) -> Tree {
    let own_xattr =
        |name: &[u8]| name.starts_with(b"user.snapfs.") || name.starts_with(b"user.tag.");
    let mut nodes = Vec::new();
    let mut stack = vec![(b"/".to_vec(), root)];
    while let Some((path, node)) = stack.pop() {
        let attr = volume.getattr(node).expect("getattr");
        let data = match attr.attrs.kind {
            Kind::Dir => {
                let handle = volume.opendir(node).expect("opendir");
                let entries = volume.readdir(handle).expect("readdir");
                volume.releasedir(handle);
                for entry in entries.iter().filter(|e| !e.name.starts_with(b".")) {
                    let mut child_path = path.clone();
                    if child_path != b"/" {
                        child_path.push(b'/');
                    }
                    child_path.extend_from_slice(&entry.name);
                    stack.push((child_path, entry.attr.node));
                }
                Vec::new()
            }
            Kind::Symlink => volume.readlink(node).expect("readlink"),
            _ => volume.read(node, 0, attr.attrs.size as u32).expect("read"),
        };
        let xattrs = volume
            .listxattr(node)
            .expect("listxattr")
            .into_iter()
            .filter(|name| !own_xattr(name))
            .map(|name| {
                let value = volume.getxattr(node, &name).expect("getxattr");
                (name, value)
            })
            .collect();
        nodes.push((path, node.ino, Node::of(&attr.attrs, data, xattrs)));
    }
    tree(nodes.into_iter())
}

// ---- The harness ----

/// The options of the writer's and the follower's volumes.
fn volume_options() -> Options {
    Options {
        block_size: BLOCK as u32,
        ..Options::default()
    }
}

/// A read-only volume following the store (`--read-only`), with the one store chain the
/// daemon keeps for it.
struct Follower {
    volume: Volume,
    stores: crate::store::StoreChain,
}

struct Harness {
    dir: tempfile::TempDir,
    /// The volume and its uploader, `None` only while reopening.
    mounted: Option<(Arc<Volume>, Worker)>,
    runtime: tokio::runtime::Runtime,
    url: StoreUrl,
    model: Model,
    follower: Follower,
    /// Snapshots taken and not deleted, with the model as it was.
    snapshots: Vec<(Vec<u8>, Model)>,
    taken: usize,
}

impl Harness {
    fn new() -> Harness {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = StoreUrl::parse(&format!("file://{}", dir.path().join("store").display()))
            .expect("store url");
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        let follower =
            Volume::open(&dir.path().join("follower"), &volume_options()).expect("follower");
        crate::follow::claim(&follower, &url).expect("follow the store");
        let store = runtime.block_on(store::open(&url)).expect("store");
        follower.attach_origin(store.clone(), runtime.handle().clone());
        let follower = Follower {
            volume: follower,
            stores: crate::store::StoreChain::new(runtime.handle(), store),
        };
        let mut harness = Harness {
            dir,
            mounted: None,
            runtime,
            url,
            model: Model::new(0),
            follower,
            snapshots: Vec::new(),
            taken: 0,
        };
        harness.mount();
        let root = harness.volume().getattr(ROOT).expect("root");
        harness.model = Model::new(root.attrs.perm);
        harness
    }

    /// Opens the volume and its uploader, as a mount does (the first claims the store).
    fn mount(&mut self) {
        let volume = Volume::open(&self.dir.path().join("data"), &volume_options()).expect("open");
        let volume = Arc::new(volume);
        let id = volume.volume_id().expect("volume id");
        let opened = self.runtime.block_on(async {
            let opened = store::open(&self.url).await?;
            store::claim(&*opened, &id, BLOCK as u32, None).await?;
            Ok::<_, store::StoreError>(opened)
        });
        let options = UploadOptions {
            concurrency: 4,
            ..UploadOptions::default()
        };
        let worker = Worker::new(volume.clone(), opened.expect("store"), options).expect("worker");
        self.mounted = Some((volume, worker));
    }

    fn reopen(&mut self) {
        let (volume, worker) = self.mounted.take().expect("mounted");
        drop(worker);
        volume.shutdown().expect("shutdown");
        drop(volume);
        self.mount();
    }

    fn volume(&self) -> Arc<Volume> {
        self.mounted.as_ref().expect("mounted").0.clone()
    }

    /// The live node at `path`, which the model says exists.
    fn node(&self, path: &[Vec<u8>]) -> NodeId {
        let mut node = ROOT;
        for name in path {
            let found = self.volume().lookup(node, name);
            node = found
                .unwrap_or_else(|e| {
                    panic!("lookup {}: {e}", String::from_utf8_lossy(&path_text(path)))
                })
                .node;
        }
        node
    }

    /// The live parent directory of a non-root `place`, and its name there.
    fn parent<'a>(&self, place: &'a Place) -> (NodeId, &'a [u8]) {
        let (_, name) = place.parent.as_ref().expect("not the root");
        (self.node(&place.path[..place.path.len() - 1]), name)
    }

    fn pick(places: Vec<Place>, index: usize) -> Option<Place> {
        let n = places.len();
        places.into_iter().nth(index.checked_rem(n)?)
    }

    fn dir(&self, index: usize) -> Place {
        Self::pick(self.model.dirs(), index).expect("the root is a directory")
    }

    /// A non-root entry, if there is one.
    fn entry(&self, index: usize) -> Option<Place> {
        Self::pick(self.model.places().split_off(1), index)
    }

    fn run(&mut self, ops: &[Op]) {
        for op in ops {
            match op {
                // Not in `apply`, which holds the volume.
                Op::Reopen => self.reopen(),
                Op::Upload => self.upload(),
                op => self.apply(op),
            }
        }
        self.upload();
    }

    fn apply(&mut self, op: &Op) {
        let volume = self.volume();
        let v = &*volume;
        let expected: Result<(), Errno>;
        let actual: crate::volume::Result<()>;
        match *op {
            Op::Mkdir { dir, name, mode } => {
                let dir = self.dir(dir);
                let (name, mode) = (NAMES[name], MODES[mode]);
                expected = self
                    .model
                    .add(dir.key, name, mode, Body::Dir(BTreeMap::new()))
                    .map(drop);
                actual = v.mkdir(self.node(&dir.path), name, mode, ME).map(drop);
            }
            Op::Write {
                dir,
                name,
                offset,
                len,
                seed,
                close,
            } => {
                let dir = self.dir(dir);
                let name = NAMES[name];
                let data = pattern(len, seed);
                let parent = self.node(&dir.path);
                let (key, node, handle) = match self.model.child(dir.key, name) {
                    Some(key) if !matches!(self.model.inodes[&key].body, Body::File(_)) => return,
                    Some(key) => {
                        let node = v.lookup(parent, name).expect("lookup").node;
                        (key, node, v.open_file(node, true).expect("open"))
                    }
                    None => {
                        let key = self.model.add(dir.key, name, 0o644, Body::File(Vec::new()));
                        let (attr, handle) = v.create(parent, name, 0o644, ME).expect("create");
                        (key.expect("a new name"), attr.node, handle)
                    }
                };
                let content = self.model.file_mut(key).expect("a file");
                let end = offset as usize + len;
                if content.len() < end {
                    content.resize(end, 0);
                }
                content[offset as usize..end].copy_from_slice(&data);
                expected = Ok(());
                actual = v.write(node, offset, &data).and_then(|written| {
                    assert_eq!(written as usize, len, "short write");
                    // A handle not released leaves the file open, across snapshots.
                    if close { v.release(handle) } else { Ok(()) }
                });
            }
            Op::Truncate { node, size } => {
                let Some(place) = self.entry(node) else {
                    return;
                };
                expected = self.model.truncate(place.key, size);
                let set = SetAttr {
                    size: Some(size),
                    ..SetAttr::default()
                };
                actual = v.setattr(self.node(&place.path), set).map(drop);
            }
            Op::Rename { node, dir, name } => {
                let (Some(from), to) = (self.entry(node), self.dir(dir)) else {
                    return;
                };
                let name = NAMES[name];
                let (parent, old_name) = self.parent(&from);
                actual = v.rename(parent, old_name, self.node(&to.path), name, 0);
                expected = self.model.rename(&from, &to, name);
            }
            Op::Unlink { node } => {
                let Some(place) = self.entry(node) else {
                    return;
                };
                let (parent, name) = self.parent(&place);
                actual = v.unlink(parent, name);
                expected = self.model.remove(&place, false);
            }
            Op::Rmdir { dir } => {
                let Some(place) = Self::pick(self.model.dirs().split_off(1), dir) else {
                    return;
                };
                let (parent, name) = self.parent(&place);
                actual = v.rmdir(parent, name);
                expected = self.model.remove(&place, true);
            }
            Op::Symlink { dir, name, target } => {
                let dir = self.dir(dir);
                let (name, target) = (NAMES[name], TARGETS[target]);
                let body = Body::Symlink(target.to_vec());
                expected = self.model.add(dir.key, name, 0o777, body).map(drop);
                actual = v.symlink(self.node(&dir.path), name, target, ME).map(drop);
            }
            Op::Link { node, dir, name } => {
                let (Some(from), to) = (self.entry(node), self.dir(dir)) else {
                    return;
                };
                let name = NAMES[name];
                expected = self.model.link(&from, to.key, name);
                actual = v
                    .link(self.node(&from.path), self.node(&to.path), name)
                    .map(drop);
            }
            Op::SetXattr {
                node,
                key,
                len,
                seed,
            } => {
                let Some(place) = Self::pick(self.model.places(), node) else {
                    return;
                };
                let value = pattern(len, seed);
                expected = self.model.set_xattr(place.key, XATTRS[key], &value);
                actual = v.setxattr(self.node(&place.path), XATTRS[key], &value, 0);
            }
            Op::Chmod { node, mode } => {
                let Some(place) = Self::pick(self.model.places(), node) else {
                    return;
                };
                let inode = self.model.inodes.get_mut(&place.key).expect("inode");
                if let Body::Symlink(_) = inode.body {
                    return;
                }
                inode.perm = MODES[mode];
                expected = Ok(());
                let set = SetAttr {
                    mode: Some(MODES[mode]),
                    ..SetAttr::default()
                };
                actual = v.setattr(self.node(&place.path), set).map(drop);
            }
            Op::Snapshot => {
                self.taken += 1;
                let name = format!("s{}", self.taken).into_bytes();
                v.create_snapshot(&name).expect("snapshot");
                self.snapshots.push((name, self.model.clone()));
                return;
            }
            Op::DeleteSnapshot { pick } => {
                if self.snapshots.is_empty() {
                    return;
                }
                let (name, _) = self.snapshots.remove(pick % self.snapshots.len());
                v.delete_snapshot(&name).expect("delete snapshot");
                return;
            }
            Op::Reopen | Op::Upload => unreachable!("`run` does these"),
        }
        match (&expected, &actual) {
            (Ok(()), Ok(())) => {}
            (Err(errno), Err(e)) if e.errno() == *errno => {}
            _ => panic!("{op:?}: the model says {expected:?}, the volume {actual:?}"),
        }
    }

    /// Uploads every pending snapshot, then checks that the store holds exactly the
    /// snapshots not deleted, each as the model was when it was taken.
    fn upload(&mut self) {
        let outcomes = self
            .runtime
            .block_on(self.mounted.as_ref().expect("mounted").1.upload_pending())
            .expect("upload");
        for (id, outcome) in outcomes {
            assert_eq!(outcome, Outcome::Completed, "snapshot {id}");
        }
        let stored = read_store(&self.url);
        let names = |names: Vec<&Vec<u8>>| -> Vec<String> {
            names
                .into_iter()
                .map(|n| String::from_utf8_lossy(n).into())
                .collect()
        };
        let mut expected_names: Vec<&Vec<u8>> = self.snapshots.iter().map(|(n, _)| n).collect();
        expected_names.sort();
        assert_eq!(
            names(stored.keys().collect()),
            names(expected_names),
            "the snapshots in the store"
        );
        for (name, model) in &self.snapshots {
            let name_text = String::from_utf8_lossy(name);
            assert_holds(&stored[name], model, &name_text, "read back from the store");
        }
        self.check_follower();
    }

    /// Follows the store once, then checks that the follower holds every snapshot in it,
    /// each as the model was, and that its live tree is the newest one's.
    fn check_follower(&mut self) {
        let follower = &mut self.follower;
        crate::follow::follow_once(&follower.volume, &mut follower.stores, &|_| {})
            .expect("follow");
        let mut names: Vec<Vec<u8>> = follower
            .volume
            .list_snapshots()
            .into_iter()
            .map(|row| row.name)
            .collect();
        names.sort();
        let mut expected: Vec<Vec<u8>> = self.snapshots.iter().map(|(n, _)| n.clone()).collect();
        expected.sort();
        assert_eq!(names, expected, "the follower's snapshots");
        let views = self.snapshots.iter().map(|(name, model)| {
            let root = follower
                .volume
                .lookup(crate::volume::SNAPDIR, name)
                .expect("a followed snapshot")
                .node;
            (String::from_utf8_lossy(name).into_owned(), root, model)
        });
        let live = self
            .snapshots
            .last()
            .map(|(_, newest)| ("the live tree".to_owned(), ROOT, newest));
        for (what, root, model) in views.chain(live) {
            let found = read_view(&follower.volume, root);
            assert_holds(&found, model, &what, "in the follower");
        }
    }
}

proptest! {
    // 64 cases keep `cargo test` short; PROPTEST_CASES=400 (say) hunts further.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(64),
        ..ProptestConfig::default()
    })]

    #[test]
    fn snapshots_read_back_from_the_store_match_the_model(
        ops in proptest::collection::vec(op(), 1..40)
    ) {
        Harness::new().run(&ops);
    }
}
