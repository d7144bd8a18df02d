//! Pre- and post-snapshot hooks: the commands a volume runs around each snapshot it takes
//! (`--pre-snapshot`, `--post-snapshot`), the settings the volume remembers for them, and
//! running one under a timeout. The core calls them through `volume::SnapshotHooks`.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::catalog::Setting;
use crate::volume::{self, SnapshotHooks, SnapshotInfo, Volume};

/// How long a hook may run when no `--hook-timeout` was ever given.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// Most bytes of a hook's output kept for the log and the error.
const OUTPUT_MAX: usize = 4096;

/// What a failed (or timed-out) pre-snapshot hook does to the snapshot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PreFailure {
    /// No snapshot: mkdir fails with EIO and the CLI with the hook's reason.
    #[default]
    Abort,
    /// The snapshot is taken anyway; the failure is logged.
    Proceed,
}

impl PreFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            PreFailure::Abort => "abort",
            PreFailure::Proceed => "proceed",
        }
    }
}

impl FromStr for PreFailure {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "abort" => Ok(PreFailure::Abort),
            "proceed" => Ok(PreFailure::Proceed),
            _ => Err(format!("'{text}' is neither abort nor proceed")),
        }
    }
}

/// The hook options of one `snapfs mount`: each given one replaces what the volume
/// remembers, each `None` keeps it. An empty command removes that hook.
#[derive(Clone, Debug, Default)]
pub struct HookOptions {
    pub pre: Option<String>,
    pub post: Option<String>,
    pub timeout: Option<Duration>,
    pub on_pre_failure: Option<PreFailure>,
}

/// A volume's hooks, as remembered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HookConfig {
    pub pre: Option<String>,
    pub post: Option<String>,
    pub timeout: Duration,
    pub on_pre_failure: PreFailure,
}

impl HookOptions {
    /// Remembers the options given with the volume and returns its hooks.
    pub fn remember(&self, volume: &Volume) -> volume::Result<HookConfig> {
        let mut given = vec![];
        if let Some(pre) = &self.pre {
            given.push((Setting::PreSnapshot, pre.clone()));
        }
        if let Some(post) = &self.post {
            given.push((Setting::PostSnapshot, post.clone()));
        }
        if let Some(timeout) = self.timeout {
            given.push((Setting::HookTimeout, timeout.as_secs().to_string()));
        }
        if let Some(policy) = self.on_pre_failure {
            given.push((Setting::PreSnapshotFailure, policy.as_str().to_owned()));
        }
        for (setting, value) in &given {
            volume.set_setting(*setting, value)?;
        }
        let command = |setting| -> volume::Result<Option<String>> {
            Ok(volume.setting(setting)?.filter(|c| !c.trim().is_empty()))
        };
        let corrupt = |what: String| {
            volume::Error::Catalog(crate::catalog::Error::Corrupt(format!("remembered {what}")))
        };
        let timeout = match volume.setting(Setting::HookTimeout)? {
            Some(secs) => Duration::from_secs(
                secs.parse()
                    .map_err(|e| corrupt(format!("hook timeout '{secs}': {e}")))?,
            ),
            None => DEFAULT_TIMEOUT,
        };
        let on_pre_failure = match volume.setting(Setting::PreSnapshotFailure)? {
            Some(policy) => policy
                .parse()
                .map_err(|e| corrupt(format!("pre-snapshot failure policy: {e}")))?,
            None => PreFailure::default(),
        };
        Ok(HookConfig {
            pre: command(Setting::PreSnapshot)?,
            post: command(Setting::PostSnapshot)?,
            timeout,
            on_pre_failure,
        })
    }
}

/// Remembers `options` with the volume mounted at `mountpoint` and gives it its hooks.
pub fn install(volume: &Volume, options: &HookOptions, mountpoint: &Path) -> volume::Result<()> {
    let config = options.remember(volume)?;
    if config.pre.is_none() && config.post.is_none() {
        return Ok(());
    }
    tracing::info!(pre = ?config.pre, post = ?config.post, timeout = ?config.timeout,
        on_pre_failure = config.on_pre_failure.as_str(), "snapshot hooks");
    volume.set_snapshot_hooks(Arc::new(Hooks {
        config,
        mountpoint: mountpoint.to_owned(),
        data_dir: volume.data_dir().to_owned(),
    }))
}

/// Runs a volume's hooks as `/bin/sh -c COMMAND`, each in its own process group.
pub struct Hooks {
    config: HookConfig,
    mountpoint: PathBuf,
    data_dir: PathBuf,
}

impl Hooks {
    fn env(&self, hook: &'static str, name: &[u8]) -> Vec<(&'static str, String)> {
        vec![
            ("SNAPFS_HOOK", hook.to_owned()),
            (
                "SNAPFS_SNAPSHOT",
                String::from_utf8_lossy(name).into_owned(),
            ),
            ("SNAPFS_MOUNTPOINT", self.mountpoint.display().to_string()),
            ("SNAPFS_DATA", self.data_dir.display().to_string()),
        ]
    }
}

impl SnapshotHooks for Hooks {
    fn before(&self, name: &[u8]) -> Result<(), String> {
        let Some(command) = &self.config.pre else {
            return Ok(());
        };
        let snapshot = String::from_utf8_lossy(name);
        match run(command, &self.env("pre", name), self.config.timeout) {
            Ok(()) => Ok(()),
            Err(reason) if self.config.on_pre_failure == PreFailure::Proceed => {
                tracing::warn!(%snapshot, %reason, "pre-snapshot hook failed; taking the snapshot anyway");
                Ok(())
            }
            Err(reason) => {
                tracing::error!(%snapshot, %reason, "pre-snapshot hook failed; no snapshot taken");
                Err(reason)
            }
        }
    }

    fn after(&self, snapshot: &SnapshotInfo) {
        let Some(command) = &self.config.post else {
            return;
        };
        let mut env = self.env("post", &snapshot.name);
        env.extend([
            ("SNAPFS_SNAPSHOT_ID", snapshot.id.to_string()),
            ("SNAPFS_STATE", snapshot.state.as_str().to_owned()),
            ("SNAPFS_CREATED", volume::rfc3339(snapshot.created)),
        ]);
        if let Err(reason) = run(command, &env, self.config.timeout) {
            let name = String::from_utf8_lossy(&snapshot.name);
            tracing::warn!(snapshot = %name, %reason, "post-snapshot hook failed");
        }
    }
}

/// Runs `command` with `env` and no stdin; its output goes to the log. Past `timeout` its
/// whole process group is killed. The error is the reason, with the end of the output.
pub fn run(command: &str, env: &[(&str, String)], timeout: Duration) -> Result<(), String> {
    let output = output_file().map_err(|e| format!("cannot run `{command}`: {e}"))?;
    let stdio = || {
        output
            .try_clone()
            .map(Stdio::from)
            .map_err(|e| format!("cannot run `{command}`: {e}"))
    };
    let started = Instant::now();
    let mut child = Command::new("/bin/sh")
        .arg("-c")
        .arg(command)
        .envs(env.iter().map(|(k, v)| (k, v)))
        // Readiness is the daemon's to report, not a hook's.
        .env_remove(crate::sd_notify::SOCKET_VAR)
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(stdio()?)
        .stderr(stdio()?)
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot run `{command}`: {e}"))?;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Ok(status),
            Ok(None) if started.elapsed() >= timeout => break Err(()),
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(format!("cannot wait for `{command}`: {e}")),
        }
    };
    if status.is_err() {
        // The hook and everything it started: the group is the child's pid.
        let group = child.id() as libc::pid_t;
        // SAFETY: kill with a process group this function created.
        unsafe { libc::kill(-group, libc::SIGKILL) };
        let _ = child.wait();
    }
    let text = read_output(output);
    if !text.is_empty() {
        tracing::info!(command, output = %text, "hook output");
    }
    let tail = |text: &str| match text.lines().rev().find(|l| !l.trim().is_empty()) {
        Some(line) => format!(": {}", line.trim()),
        None => String::new(),
    };
    match status {
        Ok(status) if status.success() => Ok(()),
        Ok(status) => Err(format!("`{command}` failed ({status}){}", tail(&text))),
        Err(()) => Err(format!(
            "`{command}` timed out after {} s and was killed{}",
            timeout.as_secs(),
            tail(&text)
        )),
    }
}

/// An anonymous file for a hook's output: unlike a pipe, it never blocks the hook, nor
/// this daemon when something the hook left running keeps it open.
fn output_file() -> std::io::Result<File> {
    // SAFETY: memfd_create reads the NUL-terminated name and returns a new descriptor.
    let fd = unsafe { libc::memfd_create(c"snapfs-hook".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the descriptor was just created and is owned by nobody else.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// The end of a hook's output (the reason of a failure is usually its last line).
fn read_output(mut file: File) -> String {
    let mut bytes = Vec::new();
    let read = file.metadata().and_then(|meta| {
        let start = meta.len().saturating_sub(OUTPUT_MAX as u64);
        file.seek(SeekFrom::Start(start))?;
        file.read_to_end(&mut bytes)
    });
    if let Err(e) = read {
        return format!("(cannot read the hook's output: {e})");
    }
    String::from_utf8_lossy(&bytes).trim_end().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hook_succeeds_fails_with_its_output_or_times_out() {
        let env = [("GREETING", "hi".to_owned())];
        assert_eq!(
            run("test \"$GREETING\" = hi", &env, DEFAULT_TIMEOUT),
            Ok(())
        );
        let failed = run("echo busy >&2; exit 3", &env, DEFAULT_TIMEOUT).unwrap_err();
        assert!(
            failed.contains("exit status: 3") && failed.ends_with(": busy"),
            "{failed}"
        );
        let started = Instant::now();
        let slow = run("sleep 30 & sleep 30", &env, Duration::from_millis(300)).unwrap_err();
        assert!(slow.contains("timed out"), "{slow}");
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!("proceed".parse(), Ok(PreFailure::Proceed));
        assert!("maybe".parse::<PreFailure>().is_err());
    }
}
