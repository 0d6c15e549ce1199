//! A reference to one real object in one layer, and the fd-relative calls made on it.

use std::ffi::{CStr, OsStr, OsString};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use crate::error::Result;
use crate::sys::{self, Stat, XTarget};

/// A real object: a directory (or detached object) by its own fd, or a name in a directory.
#[derive(Clone)]
pub enum Real {
    Fd(Arc<OwnedFd>),
    /// The name is shared with the node it came from (no copy per request).
    At(Arc<OwnedFd>, Arc<OsStr>),
}

impl Real {
    pub fn stat(&self) -> Result<Stat> {
        Ok(match self {
            Real::Fd(fd) => sys::fstat(fd.as_fd())?,
            Real::At(dir, name) => sys::statat(dir.as_fd(), name)?,
        })
    }

    /// The same reference (the same fd, or the same name in the same directory fd).
    pub fn same(&self, other: &Real) -> bool {
        match (self, other) {
            (Real::Fd(a), Real::Fd(b)) => Arc::ptr_eq(a, b),
            (Real::At(a, n), Real::At(b, m)) => Arc::ptr_eq(a, b) && n == m,
            _ => false,
        }
    }

    pub fn xtarget(&self) -> XTarget<'_> {
        match self {
            Real::Fd(fd) => XTarget::Fd(fd.as_fd()),
            Real::At(dir, name) => XTarget::At(dir.as_fd(), name),
        }
    }

    /// Open the object for I/O (`O_NOFOLLOW` always; a symlink never gets opened through).
    pub fn open(&self, flags: i32, is_dir: bool) -> Result<OwnedFd> {
        Ok(match self {
            Real::Fd(fd) if is_dir => sys::openat(fd.as_fd(), OsStr::new("."), flags, 0)?,
            Real::Fd(fd) => sys::reopen(fd.as_fd(), flags)?,
            Real::At(dir, name) => sys::openat(dir.as_fd(), name, flags, 0)?,
        })
    }

    pub fn readlink(&self) -> Result<OsString> {
        Ok(match self {
            Real::Fd(fd) => sys::readlinkat(fd.as_fd(), OsStr::new(""))?,
            Real::At(dir, name) => sys::readlinkat(dir.as_fd(), name)?,
        })
    }

    pub fn getxattr(&self, name: &CStr) -> Result<Vec<u8>> {
        Ok(sys::getxattr_raw(self.xtarget(), name)?)
    }

    pub fn listxattr(&self) -> Result<Vec<Vec<u8>>> {
        Ok(sys::listxattr(self.xtarget())?)
    }
}
