//! The per-mount control socket: how `stats`, `events`, `which` and `layers` reach a daemon.
//!
//! One Unix socket per mount, named by the mount's device number (`0_57.sock`, unique per
//! FUSE connection and shown in /proc/self/mountinfo), in a directory only the mounting user
//! can enter: `/run/layerfs` for root, else `$XDG_RUNTIME_DIR/layerfs` or `/tmp/layerfs-UID`.
//! A client finds it from any path: the layerfs mount holding the path gives the device number.
//! The protocol is one JSON request line, answered by JSON lines.

pub mod client;
pub mod server;

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::sys::{self, MountEntry};

/// Is this mountinfo entry a layerfs mount? (fstype "fuse" with source "layerfs" as fuser
/// mounts it, or "fuse.layerfs" where a helper sets the subtype.)
pub fn is_layerfs(m: &MountEntry) -> bool {
    m.fstype == "fuse.layerfs" || (m.fstype == "fuse" && m.source == "layerfs")
}

/// Directories a user's sockets may live in, the daemon's choice first.
pub fn socket_dirs(uid: u32) -> Vec<PathBuf> {
    let mut v = Vec::new();
    if uid == 0 {
        v.push(PathBuf::from("/run/layerfs"));
    }
    if let Some(x) = std::env::var_os("XDG_RUNTIME_DIR").filter(|x| !x.is_empty()) {
        v.push(PathBuf::from(x).join("layerfs"));
    }
    v.push(PathBuf::from(format!("/run/user/{uid}/layerfs")));
    v.push(PathBuf::from(format!("/tmp/layerfs-{uid}")));
    v.dedup();
    v
}

/// The socket file name for the mount with device `dev` ("major:minor").
pub fn socket_name(dev: &str) -> String {
    format!("{}.sock", dev.replace(':', "_"))
}

/// The layerfs mount holding `path` (the topmost one at the longest matching mount point).
pub fn mount_of(path: &Path) -> Result<MountEntry> {
    let abs = std::path::absolute(path).map_err(|e| Error::from(e).context(path.display()))?;
    // Resolve symlinks on the way when the path is reachable; a dead mount is not.
    let abs = std::fs::canonicalize(&abs).unwrap_or(abs);
    let mut best: Option<MountEntry> = None;
    for m in sys::mounts() {
        if is_layerfs(&m)
            && abs.starts_with(&m.mountpoint)
            && best
                .as_ref()
                .is_none_or(|b| m.mountpoint.as_os_str().len() >= b.mountpoint.as_os_str().len())
        {
            best = Some(m);
        }
    }
    best.ok_or_else(|| Error::msg(format!("{} is not on a layerfs mount", abs.display())))
}

/// The uid a FUSE mount belongs to (its `user_id=` option).
pub fn mount_owner(m: &MountEntry) -> Option<u32> {
    m.super_opts
        .split(',')
        .find_map(|o| o.strip_prefix("user_id="))
        .and_then(|v| v.parse().ok())
}
