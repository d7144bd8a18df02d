//! Commands against a running mount, sent through its `.snapshots` control directory
//! (mkdir, rmdir, xattrs), so the daemon that owns the volume does the work.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::catalog::NAME_MAX;

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
        "invalid snapshot name '{0}': names are 1 to 255 bytes, without '/', not starting with '.'"
    )]
    BadName(String),
    #[error("bad tag '{0}': write KEY=VALUE")]
    BadTag(String),
    #[error("snapshot '{name}' not taken: the pre-snapshot hook failed: {reason}")]
    Hook { name: String, reason: String },
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

fn snapshot_path(mountpoint: &Path, name: &str) -> Result<PathBuf, ControlError> {
    if name.is_empty() || name.contains('/') || name.starts_with('.') || name.len() > NAME_MAX {
        return Err(ControlError::BadName(name.to_owned()));
    }
    Ok(snapdir(mountpoint)?.join(name))
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
    name: &str,
    tags: &[(String, String)],
) -> Result<(), ControlError> {
    let path = snapshot_path(mountpoint, name)?;
    fs::create_dir(&path).map_err(|source| match source.raw_os_error() {
        Some(libc::EEXIST) => ControlError::Exists(name.to_owned()),
        Some(libc::EINVAL) => ControlError::BadName(name.to_owned()),
        // EIO may be a pre-snapshot hook's refusal: the daemon keeps its reason.
        code => match (code == Some(libc::EIO))
            .then(|| hook_error(mountpoint, name))
            .flatten()
        {
            Some(reason) => ControlError::Hook {
                name: name.to_owned(),
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
fn hook_error(mountpoint: &Path, name: &str) -> Option<String> {
    let dir = CString::new(snapdir(mountpoint).ok()?.as_os_str().as_bytes()).ok()?;
    let attr = CString::new(crate::volume::XATTR_HOOK_ERROR).ok()?;
    let mut value = vec![0u8; 64 << 10];
    // SAFETY: NUL-terminated path and name; the buffer pointer and length describe `value`.
    let len = unsafe {
        libc::getxattr(
            dir.as_ptr(),
            attr.as_ptr(),
            value.as_mut_ptr().cast(),
            value.len(),
        )
    };
    value.truncate(usize::try_from(len).ok()?);
    let text = String::from_utf8_lossy(&value);
    text.strip_prefix(name)?
        .strip_prefix(": ")
        .map(str::to_owned)
}

pub fn delete_snapshot(mountpoint: &Path, name: &str) -> Result<(), ControlError> {
    let path = snapshot_path(mountpoint, name)?;
    fs::remove_dir(&path).map_err(|source| match source.raw_os_error() {
        Some(libc::ENOENT) => ControlError::NoSuchSnapshot(name.to_owned()),
        _ => ControlError::Io {
            what: "cannot delete snapshot",
            path: path.clone(),
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
    name: &str,
) -> Result<(), ControlError> {
    let to = snapshot_path(mountpoint, name)?;
    if checkpoint.is_empty() || checkpoint.contains('/') {
        return Err(ControlError::NoSuchCheckpoint(checkpoint.to_owned()));
    }
    let from = checkpoint_dir(mountpoint)?.join(checkpoint);
    fs::rename(&from, &to).map_err(|source| match source.raw_os_error() {
        Some(libc::ENOENT) => ControlError::NoSuchCheckpoint(checkpoint.to_owned()),
        Some(libc::EEXIST | libc::ENOTEMPTY) => ControlError::Exists(name.to_owned()),
        Some(libc::EINVAL) => ControlError::BadName(name.to_owned()),
        _ => ControlError::Io {
            what: "cannot promote checkpoint",
            path: from.clone(),
            source,
        },
    })
}

/// Sets and removes tags (`user.tag.KEY` xattrs) of snapshot `name`.
pub fn tag_snapshot(
    mountpoint: &Path,
    name: &str,
    set: &[(String, String)],
    remove: &[String],
) -> Result<(), ControlError> {
    let path = snapshot_path(mountpoint, name)?;
    if !path.exists() {
        return Err(ControlError::NoSuchSnapshot(name.to_owned()));
    }
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| ControlError::BadName(name.to_owned()))?;
    let xattr_error = |source| ControlError::Io {
        what: "cannot tag snapshot",
        path: path.clone(),
        source,
    };
    for (key, value) in set {
        let attr = CString::new(format!("user.tag.{key}"))
            .map_err(|_| ControlError::BadTag(key.clone()))?;
        // SAFETY: NUL-terminated path and name; value pointer and length describe `value`.
        let rc = unsafe {
            libc::setxattr(
                c_path.as_ptr(),
                attr.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        };
        if rc != 0 {
            return Err(xattr_error(io::Error::last_os_error()));
        }
    }
    for key in remove {
        let attr = CString::new(format!("user.tag.{key}"))
            .map_err(|_| ControlError::BadTag(key.clone()))?;
        // SAFETY: both arguments are NUL-terminated strings.
        if unsafe { libc::removexattr(c_path.as_ptr(), attr.as_ptr()) } != 0 {
            return Err(xattr_error(io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// Reads every regular file of the live volume at `mountpoint` once, through the mount,
/// so the daemon fetches each block not yet local (a volume made with `--from`, or
/// evicted by `--cache-size`): like initializing an EBS volume. `progress` gets the bytes
/// to read, then the bytes read as they go. Returns (files, bytes).
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
                let len = entry
                    .metadata()
                    .map_err(io_err("cannot stat", &entry.path()))?
                    .len();
                files.push((entry.path(), len));
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
