//! Extended attributes of an object, by its own fd or by a name in a directory.

use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};

use super::fs::{chmod_fd, chmodat, chown_fd, chownat, fstat, statat};
use super::{Stat, check, cstr, proc_path};

/// Where an xattr call applies: an object's own fd (dirs, the layer roots), or a name in a dir.
#[derive(Clone, Copy)]
pub enum XTarget<'a> {
    Fd(BorrowedFd<'a>),
    At(BorrowedFd<'a>, &'a OsStr),
}

impl XTarget<'_> {
    /// stat of the object (never following a symlink at a name).
    pub fn stat(&self) -> io::Result<Stat> {
        match *self {
            XTarget::Fd(fd) => fstat(fd),
            XTarget::At(dir, name) => statat(dir, name),
        }
    }

    /// chown of the object (never following a symlink at a name).
    pub fn chown(&self, uid: u32, gid: u32) -> io::Result<()> {
        match *self {
            XTarget::Fd(fd) => chown_fd(fd, uid, gid),
            XTarget::At(dir, name) => chownat(dir, name, uid, gid),
        }
    }

    /// chmod of the object (not for symlinks).
    pub fn chmod(&self, mode: u32) -> io::Result<()> {
        match *self {
            XTarget::Fd(fd) => chmod_fd(fd, mode),
            XTarget::At(dir, name) => chmodat(dir, name, mode),
        }
    }

    /// The /proc path and whether the final component must not be followed.
    fn path(&self) -> io::Result<(CString, bool)> {
        match *self {
            // Following the magic link lands on the object itself, never beyond it.
            XTarget::Fd(fd) => Ok((proc_path(fd, None)?, false)),
            XTarget::At(dir, name) => Ok((proc_path(dir, Some(name))?, true)),
        }
    }
}

fn xattr_buf_call(mut f: impl FnMut(*mut u8, usize) -> libc::ssize_t) -> io::Result<Vec<u8>> {
    let mut cap = 256usize;
    loop {
        let mut buf = vec![0u8; cap];
        let r = f(buf.as_mut_ptr(), buf.len());
        if r >= 0 {
            buf.truncate(r as usize);
            return Ok(buf);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ERANGE) && cap < 1 << 20 {
            // Ask for the size, then retry with room to spare.
            let need = f(std::ptr::null_mut(), 0);
            cap = if need > 0 {
                need as usize + 64
            } else {
                cap * 4
            };
            continue;
        }
        return Err(e);
    }
}

// The *xattrat(2) calls (Linux 6.13+; the same numbers on every architecture) name the object
// by (dirfd, name), or by an O_PATH fd with AT_EMPTY_PATH: no /proc path to resolve on each
// call. Older kernels answer ENOSYS once; from then on the /proc paths are used.
const SYS_SETXATTRAT: libc::c_long = 463;
const SYS_GETXATTRAT: libc::c_long = 464;
const SYS_LISTXATTRAT: libc::c_long = 465;
const SYS_REMOVEXATTRAT: libc::c_long = 466;
static NO_XATTRAT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

#[repr(C)]
struct XattrArgs {
    value: u64,
    size: u32,
    flags: u32,
}

impl XTarget<'_> {
    /// (dirfd, name, at_flags) for the *xattrat calls. An object's own fd keeps the /proc
    /// path: the calls refuse O_PATH fds with AT_EMPTY_PATH (EBADF), and ours are O_PATH.
    fn at(&self) -> io::Result<(RawFd, CString, libc::c_int)> {
        Ok(match *self {
            XTarget::Fd(fd) => (fd.as_raw_fd(), CString::default(), -1),
            XTarget::At(dir, name) => (dir.as_raw_fd(), cstr(name)?, libc::AT_SYMLINK_NOFOLLOW),
        })
    }
}

/// Run an *xattrat call; None when the kernel lacks them or the target is an fd (the
/// caller falls back to /proc).
fn xattrat(
    at_flags: libc::c_int,
    call: impl FnOnce() -> libc::c_long,
) -> Option<io::Result<usize>> {
    if at_flags < 0 || NO_XATTRAT.load(std::sync::atomic::Ordering::Relaxed) {
        return None;
    }
    let r = call();
    if r >= 0 {
        return Some(Ok(r as usize));
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENOSYS) {
        NO_XATTRAT.store(true, std::sync::atomic::Ordering::Relaxed);
        return None;
    }
    Some(Err(e))
}

/// A buffer-filling *xattrat call as the ssize_t/errno shape xattr_buf_call expects; sets
/// `unsupported` when the kernel lacks the call.
fn as_ssize(r: Option<io::Result<usize>>, unsupported: &mut bool) -> libc::ssize_t {
    let e = match r {
        Some(Ok(n)) => return n as libc::ssize_t,
        Some(Err(e)) => e,
        None => {
            *unsupported = true;
            io::Error::from_raw_os_error(libc::ENOSYS)
        }
    };
    // SAFETY: __errno_location returns this thread's errno slot.
    unsafe { *libc::__errno_location() = e.raw_os_error().unwrap_or(libc::EIO) };
    -1
}

/// getxattrat(2) into `ptr`/`len` (null/0: the value's size only); None as for `xattrat`.
fn getxattrat(
    dfd: RawFd,
    path: &CStr,
    flags: libc::c_int,
    name: &CStr,
    ptr: *mut u8,
    len: usize,
) -> Option<io::Result<usize>> {
    let mut args = XattrArgs {
        value: ptr as u64,
        size: len as u32,
        flags: 0,
    };
    // SAFETY: valid C strings; args describes a valid buffer (or null/0 for a size query).
    xattrat(flags, || unsafe {
        libc::syscall(
            SYS_GETXATTRAT,
            dfd,
            path.as_ptr(),
            flags,
            name.as_ptr(),
            &mut args as *mut XattrArgs,
            std::mem::size_of::<XattrArgs>(),
        )
    })
}

/// The raw value of xattr `name` (ENODATA as an error).
fn getxattr_any(t: XTarget<'_>, name: &CStr) -> io::Result<Vec<u8>> {
    let (dfd, path, flags) = t.at()?;
    let mut unsupported = false;
    let r = xattr_buf_call(|ptr, len| {
        as_ssize(
            getxattrat(dfd, &path, flags, name, ptr, len),
            &mut unsupported,
        )
    });
    if !unsupported {
        return r;
    }
    let (p, nofollow) = t.path()?;
    xattr_buf_call(|ptr, len| {
        // SAFETY: ptr/len describe a valid buffer or are null/0 for a size query.
        unsafe {
            if nofollow {
                libc::lgetxattr(p.as_ptr(), name.as_ptr(), ptr.cast(), len)
            } else {
                libc::getxattr(p.as_ptr(), name.as_ptr(), ptr.cast(), len)
            }
        }
    })
}

/// getxattr; Ok(None) when the attribute does not exist (or xattrs are unsupported).
pub fn getxattr(t: XTarget<'_>, name: &CStr) -> io::Result<Option<Vec<u8>>> {
    match getxattr_any(t, name) {
        Ok(v) => Ok(Some(v)),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENODATA) | Some(libc::ENOTSUP)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// getxattr that reports ENODATA as an error (for passing through to callers).
pub fn getxattr_raw(t: XTarget<'_>, name: &CStr) -> io::Result<Vec<u8>> {
    getxattr_any(t, name)
}

/// Does `name` in `dir` (not followed if a symlink) carry xattr `x`?
pub fn has_xattr_at(dir: BorrowedFd<'_>, name: &OsStr, x: &CStr) -> io::Result<bool> {
    Ok(getxattr(XTarget::At(dir, name), x)?.is_some())
}

/// listxattr: the names, without their NUL terminators.
pub fn listxattr(t: XTarget<'_>) -> io::Result<Vec<Vec<u8>>> {
    let (dfd, path, flags) = t.at()?;
    let mut unsupported = false;
    let mut r = xattr_buf_call(|ptr, len| {
        // SAFETY: valid C string; ptr/len describe a valid buffer or null/0.
        let at = xattrat(flags, || unsafe {
            libc::syscall(SYS_LISTXATTRAT, dfd, path.as_ptr(), flags, ptr, len)
        });
        as_ssize(at, &mut unsupported)
    });
    if unsupported {
        let (p, nofollow) = t.path()?;
        r = xattr_buf_call(|ptr, len| {
            // SAFETY: ptr/len describe a valid buffer or null/0.
            unsafe {
                if nofollow {
                    libc::llistxattr(p.as_ptr(), ptr.cast(), len)
                } else {
                    libc::listxattr(p.as_ptr(), ptr.cast(), len)
                }
            }
        });
    }
    let buf = match r {
        Ok(b) => b,
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => Vec::new(),
        Err(e) => return Err(e),
    };
    Ok(buf
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| s.to_vec())
        .collect())
}

pub fn setxattr(t: XTarget<'_>, name: &CStr, value: &[u8], flags: i32) -> io::Result<()> {
    let (dfd, path, at_flags) = t.at()?;
    let mut args = XattrArgs {
        value: value.as_ptr() as u64,
        size: value.len() as u32,
        flags: flags as u32,
    };
    // SAFETY: valid C strings; args describes the value buffer.
    let at = xattrat(at_flags, || unsafe {
        libc::syscall(
            SYS_SETXATTRAT,
            dfd,
            path.as_ptr(),
            at_flags,
            name.as_ptr(),
            &mut args as *mut XattrArgs,
            std::mem::size_of::<XattrArgs>(),
        )
    });
    if let Some(r) = at {
        return r.map(drop);
    }
    let (p, nofollow) = t.path()?;
    // SAFETY: valid C strings and value buffer.
    check(unsafe {
        if nofollow {
            libc::lsetxattr(
                p.as_ptr(),
                name.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                flags,
            )
        } else {
            libc::setxattr(
                p.as_ptr(),
                name.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                flags,
            )
        }
    })
    .map(drop)
}

pub fn removexattr(t: XTarget<'_>, name: &CStr) -> io::Result<()> {
    let (dfd, path, flags) = t.at()?;
    // SAFETY: valid C strings.
    let at = xattrat(flags, || unsafe {
        libc::syscall(SYS_REMOVEXATTRAT, dfd, path.as_ptr(), flags, name.as_ptr())
    });
    if let Some(r) = at {
        return r.map(drop);
    }
    let (p, nofollow) = t.path()?;
    // SAFETY: valid C strings.
    check(unsafe {
        if nofollow {
            libc::lremovexattr(p.as_ptr(), name.as_ptr())
        } else {
            libc::removexattr(p.as_ptr(), name.as_ptr())
        }
    })
    .map(drop)
}

/// `removexattr` where an absent xattr is no error (taking a marker off that may not be on).
pub fn removexattr_if_present(t: XTarget<'_>, name: &CStr) -> io::Result<()> {
    match removexattr(t, name) {
        Err(e) if e.raw_os_error() == Some(libc::ENODATA) => Ok(()),
        r => r,
    }
}
