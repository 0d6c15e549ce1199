//! The only module with `unsafe`: thin, safe wrappers over the raw libc calls layerfs needs.
//!
//! Every call that takes a name resolves it relative to a directory fd and never follows a
//! symlink in the last component; names are single components (the callers check). Nothing here
//! builds an absolute path except `/proc/self/fd/N[/name]`, which names an object we already hold.
//!
//! One submodule per kind of call; everything is re-exported here, so callers say `sys::x`.

mod creds;
mod data;
mod fs;
mod handle;
mod mounts;
mod process;
mod resources;
mod xattr;

pub use creds::*;
pub use data::*;
pub use fs::*;
pub use handle::*;
pub use mounts::*;
pub use process::*;
pub use resources::*;
pub use xattr::*;

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::ffi::OsStrExt;

pub type Stat = libc::stat;

fn cstr(name: &OsStr) -> io::Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn check_ssize(ret: libc::ssize_t) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

/// `/proc/self/fd/N` (or `/proc/self/fd/N/name`): a path to an object we already hold an fd for.
fn proc_path(fd: BorrowedFd<'_>, name: Option<&OsStr>) -> io::Result<CString> {
    let mut p = format!("/proc/self/fd/{}", fd.as_raw_fd()).into_bytes();
    if let Some(n) = name {
        p.push(b'/');
        p.extend_from_slice(n.as_bytes());
    }
    CString::new(p).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// The raw fd of something, for logging only.
pub fn raw(fd: &impl AsFd) -> RawFd {
    fd.as_fd().as_raw_fd()
}

pub fn errno_name(e: i32) -> String {
    io::Error::from_raw_os_error(e).to_string()
}
