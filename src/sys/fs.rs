//! Names in a layer directory: open, stat, create, link, rename, unlink, mode, owner and
//! times, directory listings. Every name is resolved relative to a directory fd, never
//! following a symlink in its last component.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;

use super::{Stat, check, check_ssize, cstr, proc_path};

/// openat(dir, name, flags | O_NOFOLLOW | O_CLOEXEC, mode).
pub fn openat(dir: BorrowedFd<'_>, name: &OsStr, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    let c = cstr(name)?;
    // SAFETY: c is a valid NUL-terminated string; the returned fd is owned by us.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            c.as_ptr(),
            flags | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            mode as libc::c_uint,
        )
    };
    check(fd)?;
    // SAFETY: fd is a fresh, valid descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Open a directory by absolute path (used once per layer at mount time).
pub fn open_dir_path(path: &std::path::Path) -> io::Result<OwnedFd> {
    let c = cstr(path.as_os_str())?;
    // SAFETY: valid C string; fd owned on success.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    check(fd)?;
    // SAFETY: fresh fd.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Reopen an fd we hold (typically O_PATH) with new flags, through /proc.
pub fn reopen(fd: BorrowedFd<'_>, flags: i32) -> io::Result<OwnedFd> {
    let p = proc_path(fd, None)?;
    // SAFETY: valid C string; fd owned on success.
    let nfd = unsafe { libc::open(p.as_ptr(), flags | libc::O_CLOEXEC) };
    check(nfd)?;
    // SAFETY: fresh fd.
    Ok(unsafe { OwnedFd::from_raw_fd(nfd) })
}

/// fstatat(dir, name, AT_SYMLINK_NOFOLLOW).
pub fn statat(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<Stat> {
    let c = cstr(name)?;
    // SAFETY: zeroed stat is a valid value to be overwritten.
    let mut st: Stat = unsafe { std::mem::zeroed() };
    // SAFETY: pointers valid for the call.
    check(unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            c.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    Ok(st)
}

/// fstat of the object an fd (possibly O_PATH) refers to.
pub fn fstat(fd: BorrowedFd<'_>) -> io::Result<Stat> {
    // SAFETY: zeroed stat is valid.
    let mut st: Stat = unsafe { std::mem::zeroed() };
    // SAFETY: empty path with AT_EMPTY_PATH addresses the fd itself.
    check(unsafe {
        libc::fstatat(
            fd.as_raw_fd(),
            c"".as_ptr(),
            &mut st,
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    Ok(st)
}

pub fn fstatfs(fd: BorrowedFd<'_>) -> io::Result<libc::statfs> {
    // SAFETY: zeroed statfs is valid.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer.
    check(unsafe { libc::fstatfs(fd.as_raw_fd(), &mut st) })?;
    Ok(st)
}

pub fn readlinkat(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<OsString> {
    let c = cstr(name)?;
    let mut buf = vec![0u8; 4096];
    loop {
        // SAFETY: buf is valid for buf.len() bytes.
        let n = check_ssize(unsafe {
            libc::readlinkat(
                dir.as_raw_fd(),
                c.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        })?;
        if n < buf.len() {
            buf.truncate(n);
            return Ok(OsString::from_vec(buf));
        }
        let l = buf.len() * 2;
        buf.resize(l, 0);
    }
}

pub fn mkdirat(dir: BorrowedFd<'_>, name: &OsStr, mode: u32) -> io::Result<()> {
    let c = cstr(name)?;
    // SAFETY: valid C string.
    check(unsafe { libc::mkdirat(dir.as_raw_fd(), c.as_ptr(), mode) }).map(drop)
}

/// mkdirat that counts an existing entry as done (the open that follows finds out whether it
/// is a directory).
pub fn mkdirat_if_missing(dir: BorrowedFd<'_>, name: &OsStr, mode: u32) -> io::Result<()> {
    match mkdirat(dir, name, mode) {
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        r => r,
    }
}

pub fn mknodat(dir: BorrowedFd<'_>, name: &OsStr, mode: u32, rdev: u64) -> io::Result<()> {
    let c = cstr(name)?;
    // SAFETY: valid C string.
    check(unsafe { libc::mknodat(dir.as_raw_fd(), c.as_ptr(), mode, rdev) }).map(drop)
}

pub fn symlinkat(target: &OsStr, dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    let t = cstr(target)?;
    let c = cstr(name)?;
    // SAFETY: valid C strings.
    check(unsafe { libc::symlinkat(t.as_ptr(), dir.as_raw_fd(), c.as_ptr()) }).map(drop)
}

pub fn linkat(
    olddir: BorrowedFd<'_>,
    oldname: &OsStr,
    newdir: BorrowedFd<'_>,
    newname: &OsStr,
) -> io::Result<()> {
    let o = cstr(oldname)?;
    let n = cstr(newname)?;
    // SAFETY: valid C strings; flags 0 never follows symlinks.
    check(unsafe {
        libc::linkat(
            olddir.as_raw_fd(),
            o.as_ptr(),
            newdir.as_raw_fd(),
            n.as_ptr(),
            0,
        )
    })
    .map(drop)
}

/// Give the object `fd` refers to (an `O_TMPFILE` file) the name `newdir/newname`. Through
/// /proc: `AT_EMPTY_PATH` would need CAP_DAC_READ_SEARCH, which a rootless daemon lacks.
pub fn link_fd(fd: BorrowedFd<'_>, newdir: BorrowedFd<'_>, newname: &OsStr) -> io::Result<()> {
    let p = proc_path(fd, None)?;
    let n = cstr(newname)?;
    // SAFETY: valid C strings; following the magic link lands on the object itself.
    check(unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            p.as_ptr(),
            newdir.as_raw_fd(),
            n.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    })
    .map(drop)
}

pub fn unlinkat(dir: BorrowedFd<'_>, name: &OsStr, is_dir: bool) -> io::Result<()> {
    let c = cstr(name)?;
    let flags = if is_dir { libc::AT_REMOVEDIR } else { 0 };
    // SAFETY: valid C string.
    check(unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), flags) }).map(drop)
}

pub const RENAME_NOREPLACE: u32 = libc::RENAME_NOREPLACE;
pub const RENAME_EXCHANGE: u32 = libc::RENAME_EXCHANGE;
pub const RENAME_WHITEOUT: u32 = libc::RENAME_WHITEOUT;

pub fn renameat2(
    olddir: BorrowedFd<'_>,
    oldname: &OsStr,
    newdir: BorrowedFd<'_>,
    newname: &OsStr,
    flags: u32,
) -> io::Result<()> {
    let o = cstr(oldname)?;
    let n = cstr(newname)?;
    // SAFETY: valid C strings.
    check(unsafe {
        libc::renameat2(
            olddir.as_raw_fd(),
            o.as_ptr(),
            newdir.as_raw_fd(),
            n.as_ptr(),
            flags,
        )
    })
    .map(drop)
}

/// chmod of `name` in `dir` (never a symlink: callers only chmod non-symlinks).
pub fn chmodat(dir: BorrowedFd<'_>, name: &OsStr, mode: u32) -> io::Result<()> {
    let c = cstr(name)?;
    // SAFETY: valid C string.
    check(unsafe { libc::fchmodat(dir.as_raw_fd(), c.as_ptr(), mode, 0) }).map(drop)
}

/// lchown of `name` in `dir`; `u32::MAX` leaves an id unchanged.
pub fn chownat(dir: BorrowedFd<'_>, name: &OsStr, uid: u32, gid: u32) -> io::Result<()> {
    let c = cstr(name)?;
    // SAFETY: valid C string.
    check(unsafe {
        libc::fchownat(
            dir.as_raw_fd(),
            c.as_ptr(),
            uid,
            gid,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

/// A timestamp to set: `None` leaves it (UTIME_OMIT), `Some(None)` is now, else the value.
pub type TimeSpec = Option<Option<(i64, i64)>>;

fn to_timespec(t: TimeSpec) -> libc::timespec {
    match t {
        None => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        Some(None) => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
        Some(Some((s, ns))) => libc::timespec {
            tv_sec: s,
            tv_nsec: ns,
        },
    }
}

pub fn utimensat(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    atime: TimeSpec,
    mtime: TimeSpec,
) -> io::Result<()> {
    let c = cstr(name)?;
    let ts = [to_timespec(atime), to_timespec(mtime)];
    // SAFETY: valid C string and a two-element timespec array.
    check(unsafe {
        libc::utimensat(
            dir.as_raw_fd(),
            c.as_ptr(),
            ts.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

/// utimensat on an fd itself (any kind of fd, including O_PATH).
pub fn futimens(fd: BorrowedFd<'_>, atime: TimeSpec, mtime: TimeSpec) -> io::Result<()> {
    let ts = [to_timespec(atime), to_timespec(mtime)];
    // SAFETY: empty path with AT_EMPTY_PATH addresses the fd itself.
    check(unsafe {
        libc::utimensat(
            fd.as_raw_fd(),
            c"".as_ptr(),
            ts.as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

/// One raw directory entry.
pub struct RawDirent {
    pub ino: u64,
    pub d_type: u8,
    pub name: OsString,
}

/// Read all entries of a directory (given a fd opened for reading), skipping `.` and `..`.
pub fn read_dir_fd(fd: BorrowedFd<'_>) -> io::Result<Vec<RawDirent>> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: buf is valid for its length; getdents64 writes at most that many bytes.
        let n = unsafe {
            libc::syscall(
                libc::SYS_getdents64,
                fd.as_raw_fd(),
                buf.as_mut_ptr(),
                buf.len(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n == 0 {
            return Ok(out);
        }
        let mut off = 0usize;
        while off < n as usize {
            // linux_dirent64: u64 ino, i64 off, u16 reclen, u8 type, name...
            let ino = u64::from_ne_bytes(buf[off..off + 8].try_into().expect("8 bytes"));
            let reclen = u16::from_ne_bytes(buf[off + 16..off + 18].try_into().expect("2 bytes"));
            let d_type = buf[off + 18];
            let name_start = off + 19;
            let name_end = off + reclen as usize;
            let raw = &buf[name_start..name_end];
            let len = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
            let name = &raw[..len];
            if name != b"." && name != b".." {
                out.push(RawDirent {
                    ino,
                    d_type,
                    name: OsString::from_vec(name.to_vec()),
                });
            }
            off += reclen as usize;
        }
    }
}

/// Mode bits of a whiteout: a character device with device number 0/0.
pub fn is_whiteout_stat(st: &Stat) -> bool {
    (st.st_mode & libc::S_IFMT) == libc::S_IFCHR && st.st_rdev == 0
}

/// chmod of the object an fd refers to (O_PATH allowed; never a symlink).
pub fn chmod_fd(fd: BorrowedFd<'_>, mode: u32) -> io::Result<()> {
    let p = proc_path(fd, None)?;
    // SAFETY: valid C string; following the magic link lands on the object itself.
    check(unsafe { libc::chmod(p.as_ptr(), mode) }).map(drop)
}

/// chown of the object an fd refers to, never following a symlink.
pub fn chown_fd(fd: BorrowedFd<'_>, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: empty path with AT_EMPTY_PATH addresses the fd itself.
    check(unsafe {
        libc::fchownat(
            fd.as_raw_fd(),
            c"".as_ptr(),
            uid,
            gid,
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}
