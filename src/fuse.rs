//! The FUSE adapter: translates each kernel request into one call of the core
//! ([`Volume`]) and its result into a reply. No filesystem logic lives here, so the core is
//! tested without a kernel in the loop.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenAccMode, OpenFlags, RenameFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry,
    ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use crate::catalog::Kind;
use crate::metrics;
use crate::volume::{self, Activity, Attr, Caller, NodeId, SetAttr, SetTime, View, Volume};

/// How long the kernel may cache the attributes and names of the live tree when this mount
/// is its only writer: every change to a name or an inode comes as a request, whose reply
/// the kernel applies to its cache (or after which it drops what it held), and the one
/// change the core makes on its own, a flush changing st_blocks, drops the kernel's copy
/// (`Volume::on_attrs_changed`). A lookup or stat of a cached node then costs no request.
const SOLE_WRITER_TTL: Duration = Duration::from_secs(3600);
/// The live tree of a follower (which replaces it behind the kernel's back at every
/// snapshot it follows) and the control directories (snapshots taken, pruned and
/// checkpointed by background threads): a second.
const LIVE_TTL: Duration = Duration::from_secs(1);
/// Snapshots never change.
const SNAPSHOT_TTL: Duration = Duration::from_secs(3600);
/// How long the kernel may remember that a live name does not exist: only this mount
/// creates names there, and the kernel turns its own negative entry positive when it does.
const NEGATIVE_TTL: Duration = SOLE_WRITER_TTL;

pub struct SnapFs {
    volume: Arc<Volume>,
    /// This mount is the only writer of the live tree, so the kernel may keep what it
    /// cached across opens and remember missing names. Not so for a follower: each
    /// snapshot it follows replaces the live tree behind the kernel's back.
    sole_writer: bool,
    /// Noted at every request, so background work yields to the foreground.
    activity: Arc<Activity>,
}

impl SnapFs {
    pub fn new(volume: Arc<Volume>, sole_writer: bool) -> SnapFs {
        SnapFs {
            activity: volume.activity(),
            volume,
            sole_writer,
        }
    }

    /// Starts serving request `op`: timed for the metrics, and noted as foreground work
    /// if it moves data or changes the namespace. Looking does not count: `snapfs status`,
    /// scripts waiting for a snapshot and file managers poll attributes all day, and the
    /// uploader must not yield to them.
    fn operation(&self, op: &'static str) -> metrics::Operation {
        let looking = matches!(
            op,
            "access"
                | "getattr"
                | "getxattr"
                | "listxattr"
                | "lookup"
                | "open"
                | "opendir"
                | "readlink"
                | "releasedir"
                | "statfs"
        );
        if !looking {
            self.activity.touch();
        }
        metrics::operation(op)
    }

    /// `operation` in directory `parent`: in the control directories (taking or deleting
    /// a snapshot) it is no foreground work to yield to, but the uploader's next job.
    fn operation_in(&self, parent: NodeId, op: &'static str) -> metrics::Operation {
        if parent.is_live_catalog_node() {
            self.operation(op)
        } else {
            metrics::operation(op)
        }
    }

    /// Whether only the kernel's own requests change `node`: a snapshot's nodes, and the
    /// live tree of a mount that is its only writer. The control directories change
    /// behind the kernel's back, and a follower's live tree too.
    fn changes_only_through_kernel(&self, node: NodeId) -> bool {
        match node.view {
            View::Live => self.sole_writer && node.is_live_catalog_node(),
            View::Snapshot(_) => true,
        }
    }

    /// Directory open flags: the kernel may keep a listing across opens (FOPEN_CACHE_DIR
    /// and FOPEN_KEEP_CACHE) where only its own requests change it. It drops the listing
    /// itself when a create, unlink, rename or link changes the directory, or its mtime
    /// moves.
    fn dir_open_flags(&self, node: NodeId) -> FopenFlags {
        if self.changes_only_through_kernel(node) {
            FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE
        } else {
            FopenFlags::empty()
        }
    }

    /// Open flags: snapshot files never change, and live files change only through this
    /// mount (whose writes, truncates and hole punches go through the kernel's page cache
    /// too), so the kernel may keep their pages across opens. A descriptor opened only to
    /// read gets no FLUSH at close (FOPEN_NOFLUSH): FLUSH stores buffered writes, which
    /// only a writer's descriptor makes, and the kernel keeps POSIX locks itself. That is
    /// one of the three round trips of each file a `git status` or a compiler opens.
    fn open_flags(&self, node: NodeId, write: bool) -> FopenFlags {
        let cache = match node.view {
            View::Live if !self.sole_writer => FopenFlags::empty(),
            _ => FopenFlags::FOPEN_KEEP_CACHE,
        };
        if write {
            cache
        } else {
            cache | FopenFlags::FOPEN_NOFLUSH
        }
    }
}

fn errno(err: &volume::Error) -> Errno {
    let code = err.errno();
    metrics::operation_error(code);
    if code == libc::EIO {
        tracing::error!(error = %err, "I/O error");
    }
    Errno::from_i32(code)
}

fn file_type(kind: Kind) -> FileType {
    match kind {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        Kind::Fifo => FileType::NamedPipe,
        Kind::Socket => FileType::Socket,
        Kind::CharDevice => FileType::CharDevice,
        Kind::BlockDevice => FileType::BlockDevice,
    }
}

fn system_time(nanos: i64) -> SystemTime {
    let magnitude = Duration::from_nanos(nanos.unsigned_abs());
    if nanos >= 0 {
        UNIX_EPOCH + magnitude
    } else {
        UNIX_EPOCH - magnitude
    }
}

/// Nanoseconds of a time the kernel sent. fuser 0.18 builds pre-1970 times as
/// `EPOCH - (-secs, +nsec)`, subtracting the nanoseconds it should add (its `time.rs`
/// TODO); undo that here. Times it sends after 1970 are exact.
fn kernel_time_nanos(time: SystemTime) -> i64 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(after) => after.as_nanos() as i64,
        Err(before) => {
            let d = before.duration();
            -(d.as_secs() as i64) * 1_000_000_000 + i64::from(d.subsec_nanos())
        }
    }
}

fn set_time(time: TimeOrNow) -> SetTime {
    match time {
        TimeOrNow::SpecificTime(t) => SetTime::At(kernel_time_nanos(t)),
        TimeOrNow::Now => SetTime::Now,
    }
}

fn file_attr(attr: &Attr, block_size: u32) -> FileAttr {
    FileAttr {
        ino: INodeNo(attr.node.raw()),
        size: attr.attrs.size,
        blocks: attr.blocks,
        atime: system_time(attr.attrs.atime),
        mtime: system_time(attr.attrs.mtime),
        ctime: system_time(attr.attrs.ctime),
        crtime: system_time(attr.attrs.crtime),
        kind: file_type(attr.attrs.kind),
        // `Attr::from_row` keeps only the 12 permission bits.
        perm: attr.attrs.perm as u16,
        nlink: attr.attrs.nlink,
        uid: attr.attrs.uid,
        gid: attr.attrs.gid,
        rdev: attr.attrs.rdev,
        blksize: block_size,
        flags: 0,
    }
}

fn node(ino: INodeNo) -> NodeId {
    NodeId::from_raw(ino.0)
}

fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
    }
}

/// Replies to a getxattr/listxattr: the size when asked for it, else the data if it fits.
fn reply_xattr(reply: ReplyXattr, size: u32, data: &[u8]) {
    if size == 0 {
        reply.size(data.len() as u32);
    } else if data.len() > size as usize {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(data);
    }
}

impl SnapFs {
    /// Feeds the entries of an open listing from `offset` on to `add` (with the offset of
    /// the entry after it) until `add` says the reply buffer is full.
    fn each_entry(
        &self,
        fh: FileHandle,
        offset: u64,
        mut add: impl FnMut(u64, &volume::DirEntry) -> bool,
    ) -> volume::Result<()> {
        let entries = self.volume.readdir(fh.0)?;
        for (index, entry) in entries.iter().enumerate().skip(offset as usize) {
            if add(index as u64 + 1, entry) {
                break;
            }
        }
        Ok(())
    }

    fn block_size(&self) -> u32 {
        self.volume.block_size() as u32
    }

    /// How long the kernel may keep a node's attributes, and a name for it.
    fn ttl(&self, node: NodeId) -> Duration {
        match node.view {
            View::Snapshot(_) => SNAPSHOT_TTL,
            View::Live if self.changes_only_through_kernel(node) => SOLE_WRITER_TTL,
            View::Live => LIVE_TTL,
        }
    }

    fn reply_entry(&self, reply: ReplyEntry, result: volume::Result<Attr>) {
        match result {
            Ok(attr) => reply.entry(
                &self.ttl(attr.node),
                &file_attr(&attr, self.block_size()),
                Generation(0),
            ),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn reply_attr(&self, reply: ReplyAttr, result: volume::Result<Attr>) {
        match result {
            Ok(attr) => reply.attr(&self.ttl(attr.node), &file_attr(&attr, self.block_size())),
            Err(e) => reply.error(errno(&e)),
        }
    }
}

/// Inode 0 in a lookup reply: the name does not exist, and the kernel may remember that
/// for the entry timeout (an error reply is never cached).
fn no_such_entry() -> FileAttr {
    FileAttr {
        ino: INodeNo(0),
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: FileType::RegularFile,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 0,
        flags: 0,
    }
}

fn reply_data(reply: ReplyData, result: volume::Result<Vec<u8>>) {
    match result {
        Ok(data) => reply.data(&data),
        Err(e) => reply.error(errno(&e)),
    }
}

fn reply_empty(reply: ReplyEmpty, result: volume::Result<()>) {
    match result {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(&e)),
    }
}

impl Filesystem for SnapFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Larger requests mean fewer round trips; the kernel caps them at what it supports.
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_max_readahead(1 << 20);
        // HANDLE_KILLPRIV_V2: this daemon clears set-id bits (`SetAttr::drop_setid`), so the
        // kernel marks an inode found without privileges to drop and stops asking for its
        // `security.capability` before every write; it asks again after each refresh.
        let wanted = InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_READDIRPLUS_AUTO
            | InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_HANDLE_KILLPRIV_V2;
        let _ = config.add_capabilities(wanted & config.capabilities());
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let _op = self.operation("lookup");
        let parent = node(parent);
        match self.volume.lookup(parent, name.as_bytes()) {
            Err(volume::Error::NotFound) if self.sole_writer && parent.is_live_catalog_node() => {
                metrics::operation_error(libc::ENOENT);
                reply.entry(&NEGATIVE_TTL, &no_such_entry(), Generation(0));
            }
            result => self.reply_entry(reply, result),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let _op = self.operation("getattr");
        self.reply_attr(reply, self.volume.getattr(node(ino)));
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let _op = self.operation("setattr");
        let mut set = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: atime.map(set_time),
            mtime: mtime.map(set_time),
            ctime: ctime.map(kernel_time_nanos),
            drop_setid: false,
        };
        // With FUSE_HANDLE_KILLPRIV_V2 the kernel strips the mode it would have sent to drop
        // set-id bits: from a truncate (flagged FATTR_KILL_SUIDGID, which fuser does not
        // pass on) and from a write or fallocate (an empty setattr before it). It does so
        // only for a caller without CAP_FSETID, which root is taken to have.
        let nothing = set == SetAttr::default();
        set.drop_setid = req.uid() != 0 && (size.is_some() || nothing);
        self.reply_attr(reply, self.volume.setattr(node(ino), set));
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let _op = self.operation("readlink");
        reply_data(reply, self.volume.readlink(node(ino)));
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let _op = self.operation("mknod");
        let result = self.volume.mknod(
            node(parent),
            name.as_bytes(),
            mode & !umask,
            rdev,
            caller(req),
        );
        self.reply_entry(reply, result);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let parent = node(parent);
        let _op = self.operation_in(parent, "mkdir");
        let result = self
            .volume
            .mkdir(parent, name.as_bytes(), mode & !umask, caller(req));
        self.reply_entry(reply, result);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _op = self.operation("unlink");
        reply_empty(reply, self.volume.unlink(node(parent), name.as_bytes()));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let parent = node(parent);
        let _op = self.operation_in(parent, "rmdir");
        reply_empty(reply, self.volume.rmdir(parent, name.as_bytes()));
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let _op = self.operation("symlink");
        let result = self.volume.symlink(
            node(parent),
            link_name.as_bytes(),
            target.as_os_str().as_bytes(),
            caller(req),
        );
        self.reply_entry(reply, result);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let _op = self.operation("rename");
        let result = self.volume.rename(
            node(parent),
            name.as_bytes(),
            node(newparent),
            newname.as_bytes(),
            flags.bits(),
        );
        reply_empty(reply, result);
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let _op = self.operation("link");
        let result = self
            .volume
            .link(node(ino), node(newparent), newname.as_bytes());
        self.reply_entry(reply, result);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let _op = self.operation("open");
        let write = flags.acc_mode() != OpenAccMode::O_RDONLY;
        match self.volume.open_file(node(ino), write) {
            Ok(handle) => reply.opened(FileHandle(handle.0), self.open_flags(node(ino), write)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let _op = self.operation("read");
        let result = self.volume.read(node(ino), offset, size);
        if let Ok(data) = &result {
            metrics::read_bytes(data.len());
        }
        reply_data(reply, result);
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let _op = self.operation("write");
        match self.volume.write(node(ino), offset, data) {
            Ok(written) => {
                metrics::written_bytes(written as usize);
                reply.written(written)
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        let _op = self.operation("flush");
        reply_empty(reply, self.volume.flush(node(ino)));
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let _op = self.operation("release");
        reply_empty(reply, self.volume.release(volume::FileHandle(fh.0)));
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let _op = self.operation("fsync");
        reply_empty(reply, self.volume.fsync(node(ino)));
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let _op = self.operation("opendir");
        match self.volume.opendir(node(ino)) {
            Ok(handle) => reply.opened(FileHandle(handle), self.dir_open_flags(node(ino))),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let _op = self.operation("readdir");
        let result = self.each_entry(fh, offset, |next, entry| {
            let name = OsStr::from_bytes(&entry.name);
            let kind = file_type(entry.attr.attrs.kind);
            reply.add(INodeNo(entry.attr.node.raw()), next, kind, name)
        });
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let _op = self.operation("readdirplus");
        let result = self.each_entry(fh, offset, |next, entry| {
            let attr = &entry.attr;
            reply.add(
                INodeNo(attr.node.raw()),
                next,
                OsStr::from_bytes(&entry.name),
                &self.ttl(attr.node),
                &file_attr(attr, self.block_size()),
                Generation(0),
            )
        });
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        let _op = self.operation("releasedir");
        self.volume.releasedir(fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let _op = self.operation("fsyncdir");
        reply_empty(reply, self.volume.fsync(node(ino)));
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let _op = self.operation("statfs");
        match self.volume.statfs() {
            Ok(s) => reply.statfs(
                s.blocks,
                s.blocks_free,
                s.blocks_avail,
                s.files,
                s.files_free,
                s.block_size,
                volume::NAME_MAX as u32,
                s.block_size,
            ),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let _op = self.operation("setxattr");
        let result = self
            .volume
            .setxattr(node(ino), name.as_bytes(), value, flags);
        reply_empty(reply, result);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let _op = self.operation("getxattr");
        match self.volume.getxattr(node(ino), name.as_bytes()) {
            Ok(value) => reply_xattr(reply, size, &value),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let _op = self.operation("listxattr");
        match self.volume.listxattr(node(ino)) {
            Ok(names) => {
                let mut list = Vec::new();
                for name in names {
                    list.extend_from_slice(&name);
                    list.push(0);
                }
                reply_xattr(reply, size, &list);
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _op = self.operation("removexattr");
        reply_empty(reply, self.volume.removexattr(node(ino), name.as_bytes()));
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        let _op = self.operation("access");
        let mask = mask.bits() as u32;
        reply_empty(reply, self.volume.access(node(ino), mask, caller(req)));
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let _op = self.operation("create");
        match self
            .volume
            .create(node(parent), name.as_bytes(), mode & !umask, caller(req))
        {
            Ok((attr, handle)) => reply.created(
                &self.ttl(attr.node),
                &file_attr(&attr, self.block_size()),
                Generation(0),
                FileHandle(handle.0),
                self.open_flags(attr.node, true),
            ),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let _op = self.operation("fallocate");
        reply_empty(
            reply,
            self.volume.fallocate(node(ino), offset, length, mode),
        );
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let _op = self.operation("lseek");
        match self.volume.lseek(node(ino), offset, whence) {
            Ok(offset) => reply.offset(offset),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        ino_in: INodeNo,
        _fh_in: FileHandle,
        offset_in: u64,
        ino_out: INodeNo,
        _fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        let _op = self.operation("copy_file_range");
        let copy = volume::CopyRange {
            src: node(ino_in),
            src_offset: offset_in,
            dst: node(ino_out),
            dst_offset: offset_out,
            len,
        };
        match self.volume.copy_range(copy) {
            Ok(copied) => reply.written(copied),
            Err(e) => reply.error(errno(&e)),
        }
    }
}
