//! The core's error type: one variant per distinct outcome a caller (the FUSE layer, the
//! CLI) must tell apart. The FUSE layer maps each to an errno in one exhaustive match.

use std::io;
use std::path::PathBuf;

use crate::blocks::BlockError;
use crate::catalog;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no such file or directory")]
    NotFound,
    #[error("file exists")]
    Exists,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("directory not empty")]
    NotEmpty,
    #[error("name longer than 255 bytes")]
    NameTooLong,
    #[error("invalid argument: {0}")]
    Invalid(&'static str),
    #[error("cannot move between the live volume and a snapshot")]
    CrossDevice,
    #[error("snapshots are read-only")]
    ReadOnly,
    #[error("operation not permitted: {0}")]
    NotPermitted(&'static str),
    #[error("permission denied")]
    AccessDenied,
    #[error("no such extended attribute")]
    NoXattr,
    #[error("extended attribute value larger than 64 KiB")]
    XattrTooBig,
    #[error("extended attribute namespace not supported")]
    XattrUnsupported,
    #[error("file too large")]
    FileTooBig,
    #[error("operation not supported: {0}")]
    NotSupported(&'static str),
    /// SEEK_DATA or SEEK_HOLE from the end of the file on, or SEEK_DATA with no data after.
    #[error("no data or hole at or after this offset")]
    NoData,
    #[error("not enough free space in the data dir")]
    NoSpace,
    #[error("data dir {dir} is in use by another snapfs (pid {pid}); unmount it first")]
    Locked { dir: PathBuf, pid: String },
    #[error("data dir {path}: {source}")]
    DataDir { path: PathBuf, source: io::Error },
    #[error(
        "this volume uploads to {remembered}, not {requested}: a volume keeps the store it was \
         first mounted with"
    )]
    StoreMismatch {
        remembered: String,
        requested: String,
    },
    #[error("cannot import the origin snapshot: {0}")]
    Import(String),
    /// A pre-snapshot hook failed (or timed out), so the snapshot was not taken.
    #[error("pre-snapshot hook: {0}")]
    Hook(String),
    #[error(transparent)]
    Catalog(#[from] catalog::Error),
    #[error(transparent)]
    Block(#[from] BlockError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The errno a system call should fail with; the one place that decides it.
    pub fn errno(&self) -> i32 {
        match self {
            Error::NotFound => libc::ENOENT,
            Error::Exists => libc::EEXIST,
            Error::NotDir => libc::ENOTDIR,
            Error::IsDir => libc::EISDIR,
            Error::NotEmpty => libc::ENOTEMPTY,
            Error::NameTooLong => libc::ENAMETOOLONG,
            Error::Invalid(_) => libc::EINVAL,
            Error::CrossDevice => libc::EXDEV,
            Error::ReadOnly => libc::EROFS,
            Error::NotPermitted(_) => libc::EPERM,
            Error::AccessDenied => libc::EACCES,
            Error::NoXattr => libc::ENODATA,
            Error::XattrTooBig => libc::E2BIG,
            Error::XattrUnsupported => libc::EOPNOTSUPP,
            Error::FileTooBig => libc::EFBIG,
            Error::NotSupported(_) => libc::EOPNOTSUPP,
            Error::NoData => libc::ENXIO,
            Error::NoSpace => libc::ENOSPC,
            Error::Locked { .. } => libc::EBUSY,
            Error::StoreMismatch { .. } => libc::EINVAL,
            Error::Import(_) | Error::Hook(_) => libc::EIO,
            Error::DataDir { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            Error::Catalog(e) if e.is_disk_full() => libc::ENOSPC,
            Error::Catalog(_) => libc::EIO,
            Error::Block(BlockError::Io { source, .. }) => match source.raw_os_error() {
                Some(code @ (libc::ENOSPC | libc::EDQUOT)) => code,
                _ => libc::EIO,
            },
            Error::Block(
                BlockError::Missing { .. }
                | BlockError::Corrupt { .. }
                | BlockError::CorruptPiece { .. }
                | BlockError::Fetch { .. },
            ) => libc::EIO,
        }
    }
}
