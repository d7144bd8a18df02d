//! Commands against a running mount, sent through its `.snapshots` control directory
//! (mkdir, rmdir, xattrs), so the daemon that owns the volume does the work. The recycle
//! bin is `.snapshots/.trash` (rename out of it to undelete, rmdir in it to purge); a
//! snapshot's lock is its `user.snapfs.lock` xattr. Snapshot names are byte strings, as
//! file names are; errors show them as the listings do ([`escaped`]).

use std::ffi::{CString, OsStr};
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::catalog::NAME_MAX;
use crate::display::escaped;
use crate::policy::Policy;
use crate::volume::{XATTR_POLICY, XATTR_PRUNE};

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("{0} is not a snapfs mount (no .snapshots directory)")]
    NotMounted(PathBuf),
    #[error("snapshot '{0}' already exists")]
    Exists(String),
    #[error("no snapshot named '{0}'")]
    NoSuchSnapshot(String),
    #[error("no checkpoint named '{0}' (see `snapfs checkpoint list`)")]
    NoSuchCheckpoint(String),
    #[error("no checkpoint at or before {0}")]
    NoCheckpointBefore(String),
    #[error(
        "invalid snapshot name '{0}': names are 1 to 255 bytes, without '/' or control \
         characters, not starting with '.'"
    )]
    BadName(String),
    #[error("bad tag '{0}': write KEY=VALUE")]
    BadTag(String),
    #[error("no snapshot named '{0}' in the recycle bin")]
    NotInTrash(String),
    #[error("a snapshot named '{0}' exists: undelete it under another name with --as NEW")]
    NameTaken(String),
    #[error("snapshot '{name}' is locked ({lock})")]
    Locked { name: String, lock: String },
    #[error("snapshot '{name}': {lock} cannot be shortened or removed, only extended")]
    LockHeld { name: String, lock: String },
    #[error(
        "snapshot '{name}': a lock {lock} would not hold: that time has passed (give a later \
         --until, or --for of at least 1s)"
    )]
    LockExpired { name: String, lock: String },
    #[error("snapshot '{name}' not taken: the pre-snapshot hook failed: {reason}")]
    Hook { name: String, reason: String },
    #[error("{0} has no snapshot policy (set one with `snapfs policy set`)")]
    NoPolicy(PathBuf),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

fn snapdir(mountpoint: &Path) -> Result<PathBuf, ControlError> {
    let dir = mountpoint.join(".snapshots");
    if !dir.is_dir() {
        return Err(ControlError::NotMounted(mountpoint.to_owned()));
    }
    Ok(dir)
}

fn snapshot_path(mountpoint: &Path, name: &OsStr) -> Result<PathBuf, ControlError> {
    let bytes = name.as_bytes();
    if bytes.is_empty()
        || bytes.contains(&b'/')
        || bytes.starts_with(b".")
        || bytes.len() > NAME_MAX
    {
        return Err(ControlError::BadName(shown(name)));
    }
    Ok(snapdir(mountpoint)?.join(name))
}

/// `name` for a message.
fn shown(name: &OsStr) -> String {
    escaped(name.as_bytes())
}

/// Splits each `KEY=VALUE`.
pub fn parse_tags(tags: &[String]) -> Result<Vec<(String, String)>, ControlError> {
    tags.iter()
        .map(|tag| match tag.split_once('=') {
            Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
            _ => Err(ControlError::BadTag(tag.clone())),
        })
        .collect()
}

/// Takes snapshot `name` of the volume mounted at `mountpoint`, with `tags`.
pub fn create_snapshot(
    mountpoint: &Path,
    name: &OsStr,
    tags: &[(String, String)],
) -> Result<(), ControlError> {
    let path = snapshot_path(mountpoint, name)?;
    fs::create_dir(&path).map_err(|source| match source.raw_os_error() {
        Some(libc::EEXIST) => ControlError::Exists(shown(name)),
        Some(libc::EINVAL) => ControlError::BadName(shown(name)),
        // EIO may be a pre-snapshot hook's refusal: the daemon keeps its reason.
        code => match (code == Some(libc::EIO))
            .then(|| hook_error(mountpoint, name))
            .flatten()
        {
            Some(reason) => ControlError::Hook {
                name: shown(name),
                reason,
            },
            None => ControlError::Io {
                what: "cannot create snapshot",
                path: path.clone(),
                source,
            },
        },
    })?;
    tag_snapshot(mountpoint, name, tags, &[])
}

/// Why the pre-snapshot hook refused snapshot `name`, if it was the last it refused.
fn hook_error(mountpoint: &Path, name: &OsStr) -> Option<String> {
    let text = get_xattr(&snapdir(mountpoint).ok()?, crate::volume::XATTR_HOOK_ERROR)?;
    let reason = text.strip_prefix(name.as_bytes())?.strip_prefix(b": ")?;
    Some(String::from_utf8_lossy(reason).into_owned())
}

pub fn delete_snapshot(mountpoint: &Path, name: &OsStr) -> Result<(), ControlError> {
    let path = snapshot_path(mountpoint, name)?;
    remove_snapshot_dir(
        &path,
        name,
        "cannot delete snapshot",
        ControlError::NoSuchSnapshot,
    )
}

/// rmdir of a snapshot's directory (in `.snapshots` or its bin), with clear errors.
fn remove_snapshot_dir(
    path: &Path,
    name: &OsStr,
    what: &'static str,
    missing: fn(String) -> ControlError,
) -> Result<(), ControlError> {
    fs::remove_dir(path).map_err(|source| match source.raw_os_error() {
        Some(libc::ENOENT) => missing(shown(name)),
        Some(libc::EPERM) => ControlError::Locked {
            name: shown(name),
            lock: snapshot_lock(path).unwrap_or_else(|| "no lock shown".into()),
        },
        _ => ControlError::Io {
            what,
            path: path.to_owned(),
            source,
        },
    })
}

/// `.snapshots/.trash/NAME`: snapshot `name` in the recycle bin.
fn trashed_path(mountpoint: &Path, name: &OsStr) -> Result<PathBuf, ControlError> {
    let path = snapshot_path(mountpoint, name)?;
    Ok(path.with_file_name(".trash").join(name))
}

/// Takes snapshot `name` out of the recycle bin, as `new_name` or under its own name.
pub fn undelete_snapshot(
    mountpoint: &Path,
    name: &OsStr,
    new_name: Option<&OsStr>,
) -> Result<(), ControlError> {
    let from = trashed_path(mountpoint, name)?;
    let target = new_name.unwrap_or(name);
    let to = snapshot_path(mountpoint, target)?;
    fs::rename(&from, &to).map_err(|source| match source.raw_os_error() {
        Some(libc::ENOENT) => ControlError::NotInTrash(shown(name)),
        Some(libc::EEXIST | libc::ENOTEMPTY) => ControlError::NameTaken(shown(target)),
        _ => ControlError::Io {
            what: "cannot undelete snapshot",
            path: from.clone(),
            source,
        },
    })
}

/// The hidden directory of checkpoints, `.snapshots/.checkpoints`.
fn checkpoint_dir(mountpoint: &Path) -> Result<PathBuf, ControlError> {
    Ok(snapdir(mountpoint)?.join(".checkpoints"))
}

/// The names of the checkpoints of the volume mounted at `mountpoint`, oldest first
/// (their names are sortable UTC times).
pub fn checkpoint_names(mountpoint: &Path) -> Result<Vec<String>, ControlError> {
    let dir = checkpoint_dir(mountpoint)?;
    let io_err = |source| ControlError::Io {
        what: "cannot list checkpoints in",
        path: dir.clone(),
        source,
    };
    let mut names = Vec::new();
    for entry in fs::read_dir(&dir).map_err(io_err)? {
        names.push(
            entry
                .map_err(io_err)?
                .file_name()
                .to_string_lossy()
                .into_owned(),
        );
    }
    names.sort();
    Ok(names)
}

/// The newest checkpoint taken at or before `time` (a name: UTC, sortable), if any.
pub fn checkpoint_at(names: &[String], time: &str) -> Result<String, ControlError> {
    names
        .iter()
        .rfind(|name| name.as_str() <= time)
        .cloned()
        .ok_or_else(|| ControlError::NoCheckpointBefore(time.to_owned()))
}

/// Promotes checkpoint `checkpoint` of the volume mounted at `mountpoint` to snapshot
/// `name`: renamed from `.snapshots/.checkpoints` into `.snapshots`, it is uploaded.
pub fn promote_checkpoint(
    mountpoint: &Path,
    checkpoint: &str,
    name: &OsStr,
) -> Result<(), ControlError> {
    let to = snapshot_path(mountpoint, name)?;
    if checkpoint.is_empty() || checkpoint.contains('/') {
        return Err(ControlError::NoSuchCheckpoint(checkpoint.to_owned()));
    }
    let from = checkpoint_dir(mountpoint)?.join(checkpoint);
    fs::rename(&from, &to).map_err(|source| match source.raw_os_error() {
        Some(libc::ENOENT) => ControlError::NoSuchCheckpoint(checkpoint.to_owned()),
        Some(libc::EEXIST | libc::ENOTEMPTY) => ControlError::Exists(shown(name)),
        Some(libc::EINVAL) => ControlError::BadName(shown(name)),
        _ => ControlError::Io {
            what: "cannot promote checkpoint",
            path: from.clone(),
            source,
        },
    })
}

/// Deletes snapshot `name` of the recycle bin for good.
pub fn purge_snapshot(mountpoint: &Path, name: &OsStr) -> Result<(), ControlError> {
    let path = trashed_path(mountpoint, name)?;
    remove_snapshot_dir(
        &path,
        name,
        "cannot purge snapshot",
        ControlError::NotInTrash,
    )
}

/// Sets the lock of snapshot `name` (`lock` in the form of `user.snapfs.lock`), or removes
/// it (`None`).
pub fn lock_snapshot(
    mountpoint: &Path,
    name: &OsStr,
    lock: Option<&str>,
) -> Result<(), ControlError> {
    let path = snapshot_path(mountpoint, name)?;
    if !path.exists() {
        return Err(ControlError::NoSuchSnapshot(shown(name)));
    }
    let value = lock.map(str::as_bytes);
    change_xattr(&path, crate::volume::XATTR_LOCK, value).map_err(|source| {
        match source.raw_os_error() {
            Some(libc::EPERM) => ControlError::LockHeld {
                name: shown(name),
                lock: snapshot_lock(&path).unwrap_or_else(|| "its lock".into()),
            },
            // The text is well formed (format_lock): the volume found the lock expired.
            Some(libc::EINVAL) if let Some(lock) = lock => ControlError::LockExpired {
                name: shown(name),
                lock: lock.to_owned(),
            },
            Some(libc::ENODATA) => ControlError::Io {
                what: "not locked",
                path: path.clone(),
                source,
            },
            _ => ControlError::Io {
                what: "cannot change the lock of snapshot",
                path: path.clone(),
                source,
            },
        }
    })
}

/// The lock of the snapshot directory at `path`, as its xattr shows it.
pub fn snapshot_lock(path: &Path) -> Option<String> {
    get_xattr(path, crate::volume::XATTR_LOCK)
        .map(|lock| String::from_utf8_lossy(&lock).into_owned())
}

fn c_string(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn get_xattr(path: &Path, name: &[u8]) -> Option<Vec<u8>> {
    let (path, name) = (
        c_string(path.as_os_str().as_bytes()).ok()?,
        c_string(name).ok()?,
    );
    let mut value = vec![0u8; 64 << 10];
    // SAFETY: NUL-terminated path and name; the buffer pointer and length describe `value`.
    let len = unsafe {
        libc::getxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_mut_ptr().cast(),
            value.len(),
        )
    };
    value.truncate(usize::try_from(len).ok()?);
    Some(value)
}

/// Sets (`Some`) or removes (`None`) xattr `name` of `path`.
fn change_xattr(path: &Path, name: &[u8], value: Option<&[u8]>) -> io::Result<()> {
    match value {
        Some(value) => set_xattr(path, name, value),
        None => remove_xattr(path, name),
    }
}

fn set_xattr(path: &Path, name: &[u8], value: &[u8]) -> io::Result<()> {
    let (path, name) = (c_string(path.as_os_str().as_bytes())?, c_string(name)?);
    // SAFETY: NUL-terminated path and name; value pointer and length describe `value`.
    let rc = unsafe {
        libc::setxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn remove_xattr(path: &Path, name: &[u8]) -> io::Result<()> {
    let (path, name) = (c_string(path.as_os_str().as_bytes())?, c_string(name)?);
    // SAFETY: both arguments are NUL-terminated strings.
    if unsafe { libc::removexattr(path.as_ptr(), name.as_ptr()) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sets and removes tags (`user.tag.KEY` xattrs) of snapshot `name`.
pub fn tag_snapshot(
    mountpoint: &Path,
    name: &OsStr,
    set: &[(String, String)],
    remove: &[String],
) -> Result<(), ControlError> {
    let path = snapshot_path(mountpoint, name)?;
    if !path.exists() {
        return Err(ControlError::NoSuchSnapshot(shown(name)));
    }
    let xattr_error = |source| ControlError::Io {
        what: "cannot tag snapshot",
        path: path.clone(),
        source,
    };
    let changes = set
        .iter()
        .map(|(key, value)| (key, Some(value.as_bytes())))
        .chain(remove.iter().map(|key| (key, None)));
    for (key, value) in changes {
        let attr = format!("user.tag.{key}");
        change_xattr(&path, attr.as_bytes(), value).map_err(xattr_error)?;
    }
    Ok(())
}

/// Sets or removes a policy xattr of the `.snapshots` directory of `mountpoint`;
/// ENODATA (nothing to remove, no policy to prune by) is `NoPolicy`.
fn policy_xattr(
    mountpoint: &Path,
    name: &[u8],
    value: Option<&[u8]>,
    what: &'static str,
) -> Result<(), ControlError> {
    let dir = snapdir(mountpoint)?;
    let io_error = |source| ControlError::Io {
        what,
        path: dir.clone(),
        source,
    };
    change_xattr(&dir, name, value).map_err(|source| match source.raw_os_error() {
        Some(libc::ENODATA) => ControlError::NoPolicy(mountpoint.to_owned()),
        _ => io_error(source),
    })
}

/// Replaces the snapshot policy of the volume mounted at `mountpoint`.
pub fn set_policy(mountpoint: &Path, policy: &Policy) -> Result<(), ControlError> {
    policy_xattr(
        mountpoint,
        XATTR_POLICY,
        Some(&policy.to_json()),
        "cannot set the policy of",
    )
}

pub fn clear_policy(mountpoint: &Path) -> Result<(), ControlError> {
    policy_xattr(mountpoint, XATTR_POLICY, None, "cannot clear the policy of")
}

/// Has the daemon apply its policy's retention now.
pub fn prune(mountpoint: &Path) -> Result<(), ControlError> {
    policy_xattr(mountpoint, XATTR_PRUNE, Some(b"now"), "cannot prune")
}

/// Reads every regular file of the live volume at `mountpoint` once, through the mount,
/// so the daemon fetches each block not yet local (a volume made with `--from`, or
/// evicted by `--cache-size`): like initializing an EBS volume. `progress` gets the bytes
/// to read, then the bytes read as they go. Returns (files, bytes).
/// Makes what the mount at `mountpoint` has done visible to readers of its catalog (a
/// diff against the live volume): an fsync of its root, after which the daemon has
/// committed every operation that returned. Writes to files still open reach the
/// catalog at their close, or within 3 s.
pub fn settle(mountpoint: &Path) -> Result<(), ControlError> {
    snapdir(mountpoint)?;
    fs::File::open(mountpoint)
        .and_then(|root| root.sync_all())
        .map_err(|source| ControlError::Io {
            what: "cannot fsync",
            path: mountpoint.to_owned(),
            source,
        })
}

pub fn hydrate(
    mountpoint: &Path,
    total: impl Fn(u64),
    progress: impl Fn(u64) + Sync,
) -> Result<(u64, u64), ControlError> {
    snapdir(mountpoint)?;
    let io_err = |what, path: &Path| {
        let path = path.to_owned();
        move |source| ControlError::Io { what, path, source }
    };
    // The live tree only: `.snapshots` is not listed in the root, and snapshots share
    // their blocks with it or are fetched when read.
    let mut files = Vec::new();
    // A file of many names (hard links) is read once.
    let mut inodes = std::collections::HashSet::new();
    let mut pending = vec![mountpoint.to_owned()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir).map_err(io_err("cannot list", &dir))? {
            let entry = entry.map_err(io_err("cannot list", &dir))?;
            let kind = entry
                .file_type()
                .map_err(io_err("cannot stat", &entry.path()))?;
            if kind.is_dir() && entry.file_name() != ".snapshots" {
                pending.push(entry.path());
            } else if kind.is_file() {
                let meta = entry
                    .metadata()
                    .map_err(io_err("cannot stat", &entry.path()))?;
                if inodes.insert((meta.dev(), meta.ino())) {
                    files.push((entry.path(), meta.len()));
                }
            }
        }
    }
    total(files.iter().map(|(_, len)| len).sum());
    let next = std::sync::atomic::AtomicUsize::new(0);
    let read = |path: &Path| -> io::Result<u64> {
        let mut file = fs::File::open(path)?;
        let mut buf = vec![0u8; 1 << 20];
        let mut done = 0;
        loop {
            let n = io::Read::read(&mut file, &mut buf)?;
            if n == 0 {
                return Ok(done);
            }
            done += n as u64;
            progress(n as u64);
        }
    };
    // A few readers at once: each block fetch waits on the store.
    let results: Vec<Result<u64, ControlError>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..4)
            .map(|_| {
                scope.spawn(|| {
                    let mut bytes = 0;
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some((path, _)) = files.get(i) else {
                            return Ok(bytes);
                        };
                        bytes += read(path).map_err(io_err("cannot read", path))?;
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| {
                w.join().unwrap_or_else(|_| {
                    Err(ControlError::Io {
                        what: "cannot read",
                        path: mountpoint.to_owned(),
                        source: io::Error::other("a reader thread panicked"),
                    })
                })
            })
            .collect()
    });
    let mut bytes = 0;
    for result in results {
        bytes += result?;
    }
    Ok((files.len() as u64, bytes))
}
