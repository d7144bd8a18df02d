//! snapfs: a FUSE filesystem with instant, incremental, EBS-style snapshots.
//!
//! Layers, from the kernel down: `fuse` translates requests; `volume` is the core (the
//! namespace, write buffers, snapshots); `catalog` holds every SQL statement; `blocks` is
//! the local content-addressed store. `daemon` runs a mount's lifecycle.

pub mod blocks;
pub mod catalog;
pub mod clock;
pub mod control;
pub mod cron;
pub mod daemon;
pub mod display;
pub mod follow;
pub mod fuse;
pub mod hooks;
pub mod inspect;
pub mod manifest;
pub mod metrics;
pub mod mount_helper;
pub mod policy;
pub mod restore;
pub mod sd_notify;
pub mod status;
pub mod store;
pub mod sync;
pub mod upload;
pub mod verify;
pub mod volume;
