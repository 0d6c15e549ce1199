//! The only module with `unsafe`: thin, safe wrappers over the raw libc calls layerfs needs.
//!
//! Every call that takes a name resolves it relative to a directory fd and never follows a
//! symlink in the last component; names are single components (the callers check). Nothing here
//! builds an absolute path except `/proc/self/fd/N[/name]`, which names an object we already hold.

use std::ffi::{CStr, CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};

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

/// `struct fsxattr` (FS_IOC_FSGETXATTR / FS_IOC_FSSETXATTR), as bytes.
pub const FSXATTR_SIZE: usize = 28;
/// _IOR('X', 31, struct fsxattr) and _IOW('X', 32, struct fsxattr); libc lacks them.
pub const FS_IOC_FSGETXATTR: u32 = 0x801c_581f;
pub const FS_IOC_FSSETXATTR: u32 = 0x401c_5820;

/// The size of a file-attribute ioctl's argument; None for any other command.
pub fn fileattr_arg_size(cmd: u32) -> Option<usize> {
    match cmd {
        c if c == libc::FS_IOC_GETFLAGS as u32 || c == libc::FS_IOC_SETFLAGS as u32 => Some(4),
        FS_IOC_FSGETXATTR | FS_IOC_FSSETXATTR => Some(FSXATTR_SIZE),
        _ => None,
    }
}

/// One of the file-attribute ioctls (lsattr/chattr) on `fd`: `FS_IOC_GETFLAGS` and
/// `FS_IOC_SETFLAGS` move an int (4 bytes), the fsxattr pair a `struct fsxattr`. `buf` is
/// read or written by the kernel; other commands are refused.
pub fn fileattr_ioctl(fd: BorrowedFd<'_>, cmd: u32, buf: &mut [u8]) -> io::Result<()> {
    let need = fileattr_arg_size(cmd).ok_or_else(|| io::Error::from_raw_os_error(libc::ENOTTY))?;
    if buf.len() < need {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: for these commands the kernel reads or writes `need` bytes at the pointer,
    // and `buf` holds at least that many.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), cmd as libc::Ioctl, buf.as_mut_ptr()) }).map(drop)
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

/// The filesystem's persistent handle of `dir/name` (not following a symlink): its type and
/// bytes (for ext4: inode number and generation), stable across remounts and reboots.
pub fn file_handle_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<(i32, Vec<u8>)> {
    const MAX_HANDLE_SZ: usize = 128;
    let c = cstr(name)?;
    // Header (handle_bytes, handle_type) then the bytes; u32 storage keeps it aligned.
    let mut buf = [0u32; 2 + MAX_HANDLE_SZ / 4];
    buf[0] = MAX_HANDLE_SZ as u32;
    let mut mount_id: libc::c_int = 0;
    // SAFETY: buf is a file_handle header followed by MAX_HANDLE_SZ bytes, as handle_bytes
    // says; the kernel writes no more than that.
    check(unsafe {
        libc::name_to_handle_at(
            dir.as_raw_fd(),
            c.as_ptr(),
            buf.as_mut_ptr().cast::<libc::file_handle>(),
            &mut mount_id,
            0,
        )
    })?;
    let len = (buf[0] as usize).min(MAX_HANDLE_SZ);
    let bytes: Vec<u8> = buf[2..]
        .iter()
        .flat_map(|w| w.to_ne_bytes())
        .take(len)
        .collect();
    Ok((buf[1] as i32, bytes))
}

/// Open the object a file handle (from `file_handle_at`) names, on the filesystem of
/// `mount_fd`, as an O_PATH fd. Needs CAP_DAC_READ_SEARCH.
pub fn open_by_handle(mount_fd: BorrowedFd<'_>, kind: i32, bytes: &[u8]) -> io::Result<OwnedFd> {
    const MAX_HANDLE_SZ: usize = 128;
    if bytes.len() > MAX_HANDLE_SZ {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let mut buf = [0u32; 2 + MAX_HANDLE_SZ / 4];
    buf[0] = bytes.len() as u32;
    buf[1] = kind as u32;
    for (i, c) in bytes.chunks(4).enumerate() {
        let mut w = [0u8; 4];
        w[..c.len()].copy_from_slice(c);
        buf[2 + i] = u32::from_ne_bytes(w);
    }
    // SAFETY: buf is a file_handle header followed by handle_bytes bytes; fd owned on
    // success.
    let fd = unsafe {
        libc::open_by_handle_at(
            mount_fd.as_raw_fd(),
            buf.as_mut_ptr().cast::<libc::file_handle>(),
            libc::O_PATH | libc::O_CLOEXEC,
        )
    };
    check(fd)?;
    // SAFETY: fresh fd.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The UUID of the filesystem holding `fd` (FS_IOC_GETFSUUID, what the kernel's overlayfs
/// records as a copy-up origin's filesystem). `fd` must not be O_PATH.
pub fn fs_uuid(fd: BorrowedFd<'_>) -> io::Result<[u8; 16]> {
    #[repr(C)]
    struct FsUuid2 {
        len: u8,
        uuid: [u8; 16],
    }
    // _IOR(0x15, 0, struct fsuuid2)
    const FS_IOC_GETFSUUID: libc::c_ulong = (2 << 30) | (17 << 16) | (0x15 << 8);
    let mut u = FsUuid2 {
        len: 0,
        uuid: [0; 16],
    };
    // SAFETY: the kernel writes at most size_of::<FsUuid2>() bytes into u.
    check(unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            FS_IOC_GETFSUUID as _,
            &mut u as *mut FsUuid2,
        )
    })?;
    if u.len != 16 {
        return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
    }
    Ok(u.uuid)
}

/// The fs-verity digest of the file open at `fd` (FS_IOC_MEASURE_VERITY): its hash
/// algorithm (FS_VERITY_HASH_ALG_*) and the digest; None where the file has no fs-verity or
/// its filesystem (or kernel) has none.
pub fn measure_verity(fd: BorrowedFd<'_>) -> io::Result<Option<(u8, Vec<u8>)>> {
    const MAX_DIGEST: usize = 64;
    #[repr(C)]
    struct Digest {
        algorithm: u16,
        size: u16,
        digest: [u8; MAX_DIGEST],
    }
    // _IOWR('f', 134, struct fsverity_digest): the header's 4 bytes are the declared size.
    const FS_IOC_MEASURE_VERITY: libc::c_ulong = (3 << 30) | (4 << 16) | ((b'f' as u64) << 8) | 134;
    let mut d = Digest {
        algorithm: 0,
        size: MAX_DIGEST as u16,
        digest: [0; MAX_DIGEST],
    };
    // SAFETY: the kernel writes at most `size` digest bytes after the header, into `d`.
    let r = check(unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            FS_IOC_MEASURE_VERITY as _,
            &mut d as *mut Digest,
        )
    });
    match r {
        Ok(_) => {
            let n = usize::from(d.size).min(MAX_DIGEST);
            Ok(Some((d.algorithm as u8, d.digest[..n].to_vec())))
        }
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ENODATA | libc::ENOTTY | libc::EOPNOTSUPP)
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
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

pub fn ftruncate(fd: BorrowedFd<'_>, size: u64) -> io::Result<()> {
    // SAFETY: plain syscall on a valid fd.
    check(unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) }).map(drop)
}

pub fn fsync(fd: BorrowedFd<'_>, datasync: bool) -> io::Result<()> {
    // SAFETY: plain syscall on a valid fd.
    check(unsafe {
        if datasync {
            libc::fdatasync(fd.as_raw_fd())
        } else {
            libc::fsync(fd.as_raw_fd())
        }
    })
    .map(drop)
}

/// Start writeback of a byte range without waiting for it (sync_file_range WRITE).
pub fn start_writeback(fd: BorrowedFd<'_>, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: plain syscall on a valid fd.
    check(unsafe {
        libc::sync_file_range(
            fd.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        )
    })
    .map(drop)
}

pub fn fallocate(fd: BorrowedFd<'_>, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: plain syscall on a valid fd.
    check(unsafe {
        libc::fallocate(
            fd.as_raw_fd(),
            mode,
            offset as libc::off_t,
            len as libc::off_t,
        )
    })
    .map(drop)
}

pub fn lseek(fd: BorrowedFd<'_>, offset: i64, whence: i32) -> io::Result<i64> {
    // SAFETY: plain syscall on a valid fd.
    let r = unsafe { libc::lseek(fd.as_raw_fd(), offset, whence) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

pub fn pread(fd: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    // SAFETY: buf is valid for its length.
    check_ssize(unsafe {
        libc::pread(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            offset as libc::off_t,
        )
    })
}

pub fn pwrite(fd: BorrowedFd<'_>, buf: &[u8], offset: u64) -> io::Result<usize> {
    // SAFETY: buf is valid for its length.
    check_ssize(unsafe {
        libc::pwrite(
            fd.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            offset as libc::off_t,
        )
    })
}

/// FICLONE: share all extents of `src` with `dst` (reflink). Fails on filesystems without it.
pub fn ficlone(dst: BorrowedFd<'_>, src: BorrowedFd<'_>) -> io::Result<()> {
    const FICLONE: libc::c_ulong = 0x4004_9409;
    // SAFETY: FICLONE takes the source fd as its integer argument.
    check(unsafe { libc::ioctl(dst.as_raw_fd(), FICLONE, src.as_raw_fd()) }).map(drop)
}

pub fn copy_file_range(
    src: BorrowedFd<'_>,
    src_off: u64,
    dst: BorrowedFd<'_>,
    dst_off: u64,
    len: usize,
) -> io::Result<usize> {
    let mut so = src_off as libc::loff_t;
    let mut d_o = dst_off as libc::loff_t;
    // SAFETY: offsets are valid pointers for the duration of the call.
    check_ssize(unsafe {
        libc::copy_file_range(src.as_raw_fd(), &mut so, dst.as_raw_fd(), &mut d_o, len, 0)
    })
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

/// Write out every dirty page and inode of the filesystem holding `fd` and commit its
/// journal: one call makes a whole unpacked tree durable, where an fsync per file would
/// commit the journal once per file.
pub fn syncfs(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: plain syscall on a valid fd.
    check(unsafe { libc::syncfs(fd.as_raw_fd()) }).map(drop)
}

/// Stop the ext4 or XFS filesystem holding `fd` as a power cut would: nothing more reaches
/// its disk, not even the journal's committed-in-memory transactions
/// (EXT4_IOC_SHUTDOWN / XFS_IOC_GOINGDOWN with NOLOGFLUSH). The crash tests use it.
pub fn shutdown_fs(fd: BorrowedFd<'_>) -> io::Result<()> {
    const SHUTDOWN: libc::c_ulong = 0x8004_587d; // _IOR('X', 125, __u32)
    const NOLOGFLUSH: u32 = 2;
    let flags = NOLOGFLUSH;
    // SAFETY: the ioctl reads one u32 from a valid pointer.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), SHUTDOWN, &flags as *const u32) }).map(drop)
}

/// Lazily detach a mount (MNT_DETACH) or plainly unmount it.
pub fn umount(path: &std::path::Path, lazy: bool) -> io::Result<()> {
    let c = cstr(path.as_os_str())?;
    let flags = if lazy { libc::MNT_DETACH } else { 0 };
    // SAFETY: valid C string.
    check(unsafe { libc::umount2(c.as_ptr(), flags) }).map(drop)
}

/// Raise the soft open-file limit to the hard limit; returns the new soft limit.
pub fn raise_nofile_limit() -> u64 {
    // SAFETY: zeroed rlimit is valid; getrlimit/setrlimit take valid pointers.
    unsafe {
        let mut rl: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) != 0 {
            return 1024;
        }
        rl.rlim_cur = rl.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &rl);
        rl.rlim_cur
    }
}

/// Grow this process's fd table to hold `n` descriptors now. The kernel grows it on demand by
/// doubling, and in a multi-threaded process each growth waits out an RCU grace period
/// (`expand_fdtable` calls `synchronize_rcu`): milliseconds during which the request that
/// opened the descriptor stalls. Called before any thread exists, the growth costs nothing.
/// Best effort: Err only says the table kept its size.
pub fn reserve_fds(n: u32) -> io::Result<()> {
    if n == 0 {
        return Ok(());
    }
    let nul = std::fs::File::open("/dev/null")?;
    // SAFETY: F_DUPFD on a valid fd returns a new fd (>= n - 1) or -1; the new fd is owned
    // here and closed at once.
    let fd = check(unsafe { libc::fcntl(nul.as_raw_fd(), libc::F_DUPFD_CLOEXEC, (n - 1) as i32) })?;
    // SAFETY: fd was just returned by fcntl and is owned by nothing else.
    drop(unsafe { OwnedFd::from_raw_fd(fd) });
    Ok(())
}

pub fn geteuid() -> u32 {
    // SAFETY: always succeeds.
    unsafe { libc::geteuid() }
}

pub fn getegid() -> u32 {
    // SAFETY: always succeeds.
    unsafe { libc::getegid() }
}

/// This process's (euid, egid), read once: the daemon never changes its credentials.
pub fn own_ids() -> (u32, u32) {
    static IDS: std::sync::OnceLock<(u32, u32)> = std::sync::OnceLock::new();
    *IDS.get_or_init(|| (geteuid(), getegid()))
}

pub fn umask_current() -> u32 {
    // SAFETY: umask has no failure mode; set it back immediately.
    unsafe {
        let m = libc::umask(0o022);
        libc::umask(m);
        m
    }
}

/// Block SIGTERM/SIGINT/SIGHUP in this thread (and threads it spawns later), then wait for one
/// in a dedicated thread and run `f`. Lets the daemon unmount cleanly on a signal.
pub fn on_termination_signal(f: impl FnOnce(i32) + Send + 'static) -> io::Result<()> {
    // SAFETY: sigset manipulation on a local set; pthread_sigmask affects only this thread.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGHUP);
        let r = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if r != 0 {
            return Err(io::Error::from_raw_os_error(r));
        }
        set
    };
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut sig: libc::c_int = 0;
            // SAFETY: set is a valid, initialised signal set.
            let r = unsafe { libc::sigwait(&set, &mut sig) };
            if r == 0 {
                f(sig);
            }
        })?;
    Ok(())
}

/// Start a new session (detach from the controlling terminal); for the daemon child.
pub fn setsid() {
    // SAFETY: setsid has no memory-safety preconditions.
    unsafe {
        libc::setsid();
    }
}

/// The raw fd of something, for logging only.
pub fn raw(fd: &impl AsFd) -> RawFd {
    fd.as_fd().as_raw_fd()
}

pub fn errno_name(e: i32) -> String {
    io::Error::from_raw_os_error(e).to_string()
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

/// Set the process umask (the daemon uses 0: the kernel already applied the caller's).
pub fn set_umask(mask: u32) -> u32 {
    // SAFETY: umask cannot fail.
    unsafe { libc::umask(mask) }
}

thread_local! {
    static OWN_FS: std::cell::OnceCell<bool> = const { std::cell::OnceCell::new() };
}

/// The calling thread's umask set to `mask` until dropped (then 0 again), so the filesystem
/// applies it as for the caller: not where the parent directory has a default ACL. Each
/// thread first gets a umask of its own (unshare CLONE_FS); None where it cannot.
pub struct ThreadUmask(());

impl ThreadUmask {
    pub fn set(mask: u32) -> Option<ThreadUmask> {
        // SAFETY: unsharing CLONE_FS only detaches this thread's cwd/root/umask.
        let own = OWN_FS.with(|o| *o.get_or_init(|| unsafe { libc::unshare(libc::CLONE_FS) } == 0));
        if !own {
            return None;
        }
        set_umask(mask);
        Some(ThreadUmask(()))
    }
}

impl Drop for ThreadUmask {
    fn drop(&mut self) {
        set_umask(0);
    }
}

/// A pipe whose write end survives exec (for the daemon's readiness report) and whose read end
/// does not.
pub fn ready_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: fds has room for two descriptors.
    check(unsafe { libc::pipe2(fds.as_mut_ptr(), 0) })?;
    // SAFETY: both are fresh descriptors we own.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: plain fcntl on a valid fd.
    check(unsafe { libc::fcntl(r.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) })?;
    Ok((r, w))
}

/// One line of /proc/self/mountinfo.
#[derive(Clone, Debug)]
pub struct MountEntry {
    /// "major:minor" of the mounted filesystem (for FUSE, unique per connection).
    pub dev: String,
    pub mountpoint: std::path::PathBuf,
    /// "fuse", "fuse.layerfs", "overlay", ...
    pub fstype: String,
    /// The source ("layerfs" for ours: the FUSE fsname).
    pub source: String,
    /// The superblock options ("rw,user_id=0,group_id=0,...").
    pub super_opts: String,
}

/// The mounts of this mount namespace, in mount order (later entries are on top).
pub fn mounts() -> Vec<MountEntry> {
    let Ok(info) = std::fs::read("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for line in info.split(|&b| b == b'\n') {
        let f: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
        // Optional fields end at "-"; then fstype, source, super options.
        let Some(dash) = f.iter().position(|x| *x == b"-") else {
            continue;
        };
        if f.len() < 5 || f.len() < dash + 4 {
            continue;
        }
        // Field 5 is the mount point, with space, tab, newline and backslash octal-escaped.
        let mp = std::ffi::OsString::from_vec(unescape_mountinfo(f[4]));
        out.push(MountEntry {
            dev: String::from_utf8_lossy(f[2]).into_owned(),
            mountpoint: mp.into(),
            fstype: String::from_utf8_lossy(f[dash + 1]).into_owned(),
            source: String::from_utf8_lossy(&unescape_mountinfo(f[dash + 2])).into_owned(),
            super_opts: String::from_utf8_lossy(f[dash + 3]).into_owned(),
        });
    }
    out
}

/// Is `path` a mount point? Read from /proc/self/mountinfo, so a dead FUSE mount (whose stat
/// fails with ENOTCONN) still counts.
pub fn is_mountpoint(path: &std::path::Path) -> bool {
    let Ok(abs) = std::path::absolute(path) else {
        return false;
    };
    mounts().iter().any(|m| m.mountpoint == abs)
}

/// The uid of the process at the other end of a Unix socket.
pub fn peer_uid(fd: BorrowedFd<'_>) -> io::Result<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: cred and len describe a writable ucred of the size passed.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred.uid)
}

fn unescape_mountinfo(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'\\'
            && i + 3 < s.len()
            && s[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((s[i + 1] - b'0') * 64 + (s[i + 2] - b'0') * 8 + (s[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(s[i]);
            i += 1;
        }
    }
    out
}

/// Has the FUSE connection on this /dev/fuse fd ended (the kernel reports POLLERR)?
pub fn fuse_disconnected(fd: BorrowedFd<'_>) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: 0,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout.
    let r = unsafe { libc::poll(&mut p, 1, 0) };
    r == 1 && p.revents & libc::POLLERR != 0
}

/// Return once the FUSE connection on `fd` has ended (unmounted or aborted).
pub fn wait_fuse_disconnected(fd: BorrowedFd<'_>) {
    // Not a blocking poll: the device's wait queue wakes every poller on every request, which
    // cost a context switch per request (a fifth of the daemon's time in an unlink storm).
    // A check ten times a second costs nothing and still ends the daemon promptly.
    while !fuse_disconnected(fd) {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Leave now, without running destructors (see fuse::session::exit_after_unmount).
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit never returns and touches no Rust state.
    unsafe { libc::_exit(code) }
}

/// Is standard error a terminal (for in-place progress lines)?
pub fn stderr_is_tty() -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(2) == 1 }
}

/// Which side of a fork we are on.
pub enum Forked {
    Child,
    Parent(i32),
}

/// fork(2), refused unless this process has a single thread (the child of a multi-threaded
/// process may only call async-signal-safe functions; the daemon needs far more).
pub fn fork_single_threaded() -> io::Result<Forked> {
    let threads = std::fs::read_to_string("/proc/self/status")?
        .lines()
        .find_map(|l| l.strip_prefix("Threads:").map(|v| v.trim().to_string()));
    if threads.as_deref() != Some("1") {
        return Err(io::Error::other(
            "cannot fork the daemon from a multi-threaded process",
        ));
    }
    // SAFETY: the process is single-threaded, so the child is a complete copy of it.
    match unsafe { libc::fork() } {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(Forked::Child),
        pid => Ok(Forked::Parent(pid)),
    }
}

/// In a forked daemon: stdin and stdout to /dev/null, stderr to `log` (or /dev/null), and
/// every other inherited fd but `keep` closed (a caller's pipes or a store lock must not stay
/// open for the daemon's lifetime).
pub fn daemonize_fds(log: Option<&std::fs::File>, keep: RawFd) -> io::Result<()> {
    // A raw fd: it is closed with the other inherited ones below, so no Rust owner may close
    // it again.
    let null = std::os::fd::IntoRawFd::into_raw_fd(
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")?,
    );
    let err = log.map_or(null, |f| f.as_raw_fd());
    for (from, to) in [(null, 0), (null, 1), (err, 2)] {
        // SAFETY: dup2 onto the standard descriptors, which this process owns.
        check(unsafe { libc::dup2(from, to) })?;
    }
    let open: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    for fd in open.into_iter().filter(|&fd| fd > 2 && fd != keep) {
        // SAFETY: closing descriptors this process inherited and will never use again (no Rust
        // object of the daemon owns them; the caller's objects never run their destructors, as
        // the daemon leaves through exit_now).
        unsafe { libc::close(fd) };
    }
    Ok(())
}

/// Name this process (what `ps -o comm` and /proc/PID/comm show).
pub fn set_process_name(name: &CStr) {
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
    unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) };
}

/// Send `sig` to process `pid`.
pub fn kill(pid: i32, sig: i32) {
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(pid, sig) };
}

/// Wait for child `pid` to end; its exit status as text.
pub fn wait_child(pid: i32) -> String {
    let mut status = 0;
    // SAFETY: status is a valid out pointer.
    let r = unsafe { libc::waitpid(pid, &mut status, 0) };
    if r < 0 {
        return "unknown status".into();
    }
    if libc::WIFEXITED(status) {
        format!("exit status {}", libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        format!("killed by signal {}", libc::WTERMSIG(status))
    } else {
        "unknown status".into()
    }
}

/// SIGPIPE back to its default (die quietly), as command-line tools expect: `layerfs images |
/// head -1` must not panic on a closed stdout. Rust starts with SIGPIPE ignored.
pub fn sigpipe_default() {
    // SAFETY: installing the default disposition has no preconditions.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
}

/// CPUs this process may run on. (std's available_parallelism also reads the cgroup's CPU
/// quota from /sys: a third of a millisecond on every mount, for a thread count.)
pub fn cpus_allowed() -> usize {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; sched_getaffinity fills it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return 1;
        }
        libc::CPU_COUNT(&set) as usize
    }
}

/// Load and lock the executable's code in memory (best effort; needs CAP_IPC_LOCK or room
/// under RLIMIT_MEMLOCK). A page fault in the daemon stalls every process using the mount:
/// after a cache drop or under memory pressure, the first lookups would read the daemon's
/// own code from disk. Returns the bytes locked.
pub fn lock_own_code() -> io::Result<usize> {
    let exe = std::fs::read_link("/proc/self/exe")?;
    let maps = std::fs::read_to_string("/proc/self/maps")?;
    let mut locked = 0;
    for line in maps.lines() {
        // "start-end perms offset dev inode path"
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 6 || !f[1].contains('x') || std::path::Path::new(f[5]) != exe {
            continue;
        }
        let Some((a, b)) = f[0].split_once('-') else {
            continue;
        };
        let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)) else {
            continue;
        };
        // SAFETY: mlock only pins pages of a range mapped in this process; it reads no memory.
        check(unsafe { libc::mlock(a as *const libc::c_void, b - a) })?;
        locked += b - a;
    }
    Ok(locked)
}

/// SIGPIPE ignored: a daemon writing to a client that went away gets EPIPE, never dies.
pub fn sigpipe_ignore() {
    // SAFETY: as above.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
}

/// Let the calling thread run on every CPU the process's main thread may use (a thread
/// started by a CPU-pinned one inherits its pin).
pub fn unpin_thread() -> io::Result<()> {
    // SAFETY: both calls read or write only the cpu_set_t owned here, of the size passed.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        let size = std::mem::size_of::<libc::cpu_set_t>();
        check(libc::sched_getaffinity(libc::getpid(), size, &mut set))?;
        check(libc::sched_setaffinity(0, size, &set))?;
    }
    Ok(())
}
