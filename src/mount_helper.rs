//! snapfs as mount(8)'s and umount(8)'s helper, so an /etc/fstab line of type
//! `fuse.snapfs` mounts a volume: the helper calling conventions turned into the
//! `snapfs mount` / `snapfs umount` command lines they stand for.
//!
//! mount(8) runs `/sbin/mount.fuse.snapfs SOURCE MOUNTPOINT [-sfnv] [-o OPTIONS]` (a link
//! to snapfs, see `install`); without that link, mount.fuse3 runs
//! `snapfs SOURCE MOUNTPOINT -o OPTIONS`. SOURCE is the data dir; OPTIONS are snapfs's
//! mount options as `key=value` (`store=s3://b/p,cache_size=10G,allow_other`), and the
//! generic ones mount(8), systemd and the kernel handle (`_netdev`, `nofail`, `x-*`...)
//! are ignored.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Names snapfs answers to as mount(8)'s helper for type `fuse.snapfs` (or `snapfs`).
pub const MOUNT_NAMES: [&str; 2] = ["mount.fuse.snapfs", "mount.snapfs"];
/// Names snapfs answers to as umount(8)'s helper: `umount` then waits for the flush.
pub const UMOUNT_NAMES: [&str; 2] = ["umount.fuse.snapfs", "umount.snapfs"];

/// snapfs mount options that take a value, and the `snapfs mount` flag each becomes.
const VALUE_OPTIONS: [(&str, &str); 18] = [
    ("store", "--store"),
    ("cache_size", "--cache-size"),
    ("upload_limit", "--upload-limit"),
    ("upload_share", "--upload-share"),
    ("upload_concurrency", "--upload-concurrency"),
    ("compression_level", "--compression-level"),
    ("block_size", "--block-size"),
    ("snapdir", "--snapdir"),
    ("from", "--from"),
    ("follow_interval", "--follow-interval"),
    ("commit_interval", "--commit-interval"),
    ("pre_snapshot", "--pre-snapshot"),
    ("post_snapshot", "--post-snapshot"),
    ("hook_timeout", "--hook-timeout"),
    ("pre_snapshot_failure", "--pre-snapshot-failure"),
    ("checkpoint_every", "--checkpoint-every"),
    ("checkpoint_window", "--checkpoint-window"),
    ("trash_days", "--trash-days"),
];
/// snapfs mount options without a value. `ro` is a read-only mount following the store.
const FLAG_OPTIONS: [(&str, &str); 2] = [("allow_other", "--allow-other"), ("ro", "--read-only")];
/// Options for mount(8), systemd or the kernel's generic mount flags, not for snapfs.
const IGNORED: [&str; 28] = [
    "rw",
    "defaults",
    "auto",
    "noauto",
    "user",
    "users",
    "nouser",
    "owner",
    "group",
    "_netdev",
    "nofail",
    "exec",
    "noexec",
    "suid",
    "nosuid",
    "dev",
    "nodev",
    "atime",
    "noatime",
    "relatime",
    "norelatime",
    "strictatime",
    "nodiratime",
    "diratime",
    "sync",
    "async",
    "lazytime",
    "nolazytime",
];
/// Prefixes of ignored options with a value (`x-systemd.requires=...`, `user=NAME`).
const IGNORED_PREFIXES: [&str; 5] = ["x-", "comment=", "helper=", "uhelper=", "user="];

/// What a helper call asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Call {
    /// Run snapfs with this command line (`snapfs mount ...` or `snapfs umount ...`).
    Run(Vec<OsString>),
    /// `mount -f`: everything but the mount, which for snapfs is nothing.
    Nothing,
}

/// The command line a helper call of snapfs stands for, or `None` if `argv` is an ordinary
/// snapfs command line. `is_subcommand` tells snapfs's own subcommands apart from a SOURCE.
pub fn command_line(
    argv: &[OsString],
    is_subcommand: impl Fn(&OsStr) -> bool,
) -> Option<Result<Call, String>> {
    let program = Path::new(argv.first()?).file_name()?.to_str()?;
    let args = &argv[1..];
    if MOUNT_NAMES.contains(&program) {
        return Some(mount_call(args));
    }
    if UMOUNT_NAMES.contains(&program) {
        return Some(umount_call(args));
    }
    let first = args.first()?;
    if args.len() >= 2 && !first.as_bytes().starts_with(b"-") && !is_subcommand(first) {
        return Some(mount_call(args));
    }
    None
}

/// `SOURCE MOUNTPOINT [-sfnv] [-N NS] [-o OPTIONS] [-t TYPE]` as `snapfs mount`.
fn mount_call(args: &[OsString]) -> Result<Call, String> {
    let mut paths = Vec::new();
    let mut options = Vec::new();
    let (mut sloppy, mut fake) = (false, false);
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let bytes = arg.as_bytes();
        match bytes {
            b"-o" => options.push(utf8(args.next().ok_or("-o needs options")?)?),
            b"-t" => {
                args.next();
            }
            b"-N" => return Err("mount namespaces (-N) are not supported".into()),
            _ if bytes.starts_with(b"-o") => options.push(utf8(OsStr::from_bytes(&bytes[2..]))?),
            _ if bytes.starts_with(b"-") && bytes.len() > 1 => {
                for flag in &bytes[1..] {
                    match flag {
                        b's' => sloppy = true,
                        b'f' => fake = true,
                        b'n' | b'v' => {}
                        _ => return Err(format!("unknown option -{}", *flag as char)),
                    }
                }
            }
            _ => paths.push(arg.clone()),
        }
    }
    let (source, mountpoint) = match paths.as_slice() {
        [source, mountpoint] => (source.clone(), mountpoint.clone()),
        _ => return Err("usage: mount.fuse.snapfs DATA_DIR MOUNTPOINT [-o OPTIONS]".into()),
    };
    // /proc/mounts shows the source as `snapfs:DATA_DIR`; accept that spelling too.
    let data = match source.as_bytes().strip_prefix(b"snapfs:") {
        Some(dir) => OsStr::from_bytes(dir).to_owned(),
        None => source,
    };
    let mut line: Vec<OsString> = vec![
        "snapfs".into(),
        "mount".into(),
        mountpoint,
        "--data".into(),
        data,
    ];
    for option in options.iter().flat_map(|o| split_options(o)) {
        line.extend(translate(&option, sloppy)?.into_iter().map(OsString::from));
    }
    Ok(if fake { Call::Nothing } else { Call::Run(line) })
}

/// `DIR [-flnrv] [-N NS] [-t TYPE]` as `snapfs umount DIR`.
fn umount_call(args: &[OsString]) -> Result<Call, String> {
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_bytes() {
            b"-t" | b"-N" => {
                args.next();
            }
            bytes if bytes.starts_with(b"-") => {}
            _ => {
                return Ok(Call::Run(vec![
                    "snapfs".into(),
                    "umount".into(),
                    arg.clone(),
                ]));
            }
        }
    }
    Err("usage: umount.fuse.snapfs MOUNTPOINT".into())
}

fn utf8(text: &OsStr) -> Result<&str, String> {
    text.to_str()
        .ok_or_else(|| format!("mount options are not UTF-8: {}", text.to_string_lossy()))
}

/// Splits `a=1,b="x,y",c` at the commas outside double quotes, dropping the quotes.
fn split_options(text: &str) -> Vec<String> {
    let mut options = vec![String::new()];
    let mut quoted = false;
    for c in text.chars() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => options.push(String::new()),
            c => options.last_mut().map_or((), |o| o.push(c)),
        }
    }
    options.retain(|o| !o.is_empty());
    options
}

/// The `snapfs mount` arguments of one mount option (none for one that is not snapfs's).
fn translate(option: &str, sloppy: bool) -> Result<Vec<String>, String> {
    let (key, value) = match option.split_once('=') {
        Some((key, value)) => (key, Some(value)),
        None => (option, None),
    };
    let known_value = VALUE_OPTIONS.iter().find(|(name, _)| *name == key);
    let known_flag = FLAG_OPTIONS.iter().find(|(name, _)| *name == key);
    match (known_value, known_flag, value) {
        (Some((_, flag)), _, Some(value)) => Ok(vec![flag.to_string(), value.to_owned()]),
        (Some(_), _, None) => Err(format!("mount option {key} needs a value: {key}=...")),
        (_, Some((_, flag)), None) => Ok(vec![flag.to_string()]),
        _ if IGNORED.contains(&option)
            || IGNORED_PREFIXES.iter().any(|p| option.starts_with(p)) =>
        {
            Ok(vec![])
        }
        _ if sloppy => Ok(vec![]),
        _ => Err(format!("unknown mount option '{option}'")),
    }
}

/// Links mount(8)'s and umount(8)'s helper names in `dir` (e.g. /sbin) to `program`.
/// Links already there are replaced; anything else there is an error.
pub fn install(dir: &Path, program: &Path) -> io::Result<Vec<PathBuf>> {
    let mut made = Vec::new();
    for name in [MOUNT_NAMES[0], UMOUNT_NAMES[0]] {
        let link = dir.join(name);
        match std::fs::symlink_metadata(&link) {
            Ok(meta) if meta.file_type().is_symlink() => std::fs::remove_file(&link)?,
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a link", link.display()),
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        std::os::unix::fs::symlink(program, &link)?;
        made.push(link);
    }
    Ok(made)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(argv: &[&str]) -> Option<Result<Call, String>> {
        let argv: Vec<OsString> = argv.iter().map(OsString::from).collect();
        command_line(&argv, |arg| arg == "mount" || arg == "help")
    }

    fn run(args: &[&str]) -> Option<Result<Call, String>> {
        Some(Ok(Call::Run(args.iter().map(OsString::from).collect())))
    }

    #[test]
    fn helper_calls_become_snapfs_command_lines() {
        let expected = run(&[
            "snapfs",
            "mount",
            "/mnt/w",
            "--data",
            "/srv/w",
            "--store",
            "s3://b/p,q",
            "--cache-size",
            "10G",
            "--allow-other",
            "--pre-snapshot",
            "/etc/pre hook",
        ]);
        let options = "rw,nosuid,_netdev,nofail,x-systemd.requires=network-online.target,\
                       store=\"s3://b/p,q\",cache_size=10G,allow_other,pre_snapshot=/etc/pre hook";
        assert_eq!(
            call(&[
                "/sbin/mount.fuse.snapfs",
                "/srv/w",
                "/mnt/w",
                "-n",
                "-o",
                options
            ]),
            expected
        );
        // mount.fuse3's convention, and the source as /proc/mounts shows it.
        assert_eq!(
            call(&[
                "snapfs",
                "snapfs:/srv/w",
                "/mnt/w",
                "-o",
                options,
                "-t",
                "fuse.snapfs"
            ]),
            expected
        );
        assert_eq!(
            call(&["mount.snapfs", "/srv/w", "/mnt/w", "-fv"]),
            Some(Ok(Call::Nothing))
        );
        assert_eq!(
            call(&[
                "/sbin/umount.fuse.snapfs",
                "/mnt/w",
                "-l",
                "-t",
                "fuse.snapfs"
            ]),
            run(&["snapfs", "umount", "/mnt/w"])
        );
    }

    #[test]
    fn ordinary_command_lines_and_bad_options() {
        assert_eq!(call(&["snapfs", "mount", "/mnt/w"]), None);
        assert_eq!(call(&["snapfs", "help", "mount"]), None);
        assert_eq!(call(&["snapfs", "--data", "x"]), None);
        assert_eq!(call(&["snapfs", "/srv/w"]), None);
        let bad = call(&["mount.snapfs", "/srv/w", "/mnt/w", "-o", "colour=blue"]);
        assert_eq!(bad, Some(Err("unknown mount option 'colour=blue'".into())));
        let sloppy = call(&[
            "mount.snapfs",
            "/srv/w",
            "/mnt/w",
            "-s",
            "-o",
            "colour=blue",
        ]);
        assert_eq!(
            sloppy,
            run(&["snapfs", "mount", "/mnt/w", "--data", "/srv/w"])
        );
        let bare = call(&["mount.snapfs", "/srv/w", "/mnt/w", "-o", "store"]);
        assert!(matches!(bare, Some(Err(e)) if e.contains("needs a value")));
    }
}
