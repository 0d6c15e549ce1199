//! File contents and durability: sizes, reads and writes, copies (reflink, copy_file_range),
//! fsync, writeback, syncfs, and the file-attribute ioctls (chattr/lsattr).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use super::{check, check_ssize};

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
