//! systemd's readiness protocol (sd_notify(3)): one datagram such as `READY=1` to the Unix
//! socket named by `$NOTIFY_SOCKET`, which systemd sets for a `Type=notify` service.
//! Without the variable (not started by systemd) it does nothing.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// The variable systemd names its socket in.
pub const SOCKET_VAR: &str = "NOTIFY_SOCKET";

/// The mount is serving.
pub fn ready() {
    notify("READY=1\nSTATUS=serving");
}

/// The daemon is unmounting and flushing before it exits.
pub fn stopping() {
    notify("STOPPING=1\nSTATUS=flushing and exiting");
}

fn notify(state: &str) {
    let Some(path) = std::env::var_os(SOCKET_VAR) else {
        return;
    };
    if let Err(e) = send(path.as_encoded_bytes(), state) {
        tracing::warn!(socket = %path.to_string_lossy(), error = %e, "cannot notify systemd");
    }
}

fn send(path: &[u8], state: &str) -> std::io::Result<()> {
    // `@NAME` is a socket in the abstract namespace.
    let addr = match path.strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name)?,
        None => SocketAddr::from_pathname(std::ffi::OsStr::from_bytes(path))?,
    };
    UnixDatagram::unbound()?.send_to_addr(state.as_bytes(), &addr)?;
    Ok(())
}
