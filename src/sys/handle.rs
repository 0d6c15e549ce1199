//! What identifies an object across mounts: file handles (a copy-up's origin), the
//! filesystem's UUID, and fs-verity digests.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use super::{check, cstr};

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

/// The UUID of the filesystem holding `fd`, as the kernel's overlayfs records it in a copy-up's
/// origin (the superblock's `s_uuid`). `fd` must not be O_PATH. FS_IOC_GETFSUUID gives it
/// where the filesystem registered it (ext4, xfs, tmpfs...); btrfs fills `s_uuid` with its
/// fsid without registering it, so there it is BTRFS_IOC_FS_INFO's.
pub fn fs_uuid(fd: BorrowedFd<'_>) -> io::Result<[u8; 16]> {
    match generic_fs_uuid(fd) {
        Err(e) if is_btrfs(fd) => btrfs_fsid(fd).map_err(|_| e),
        r => r,
    }
}

fn generic_fs_uuid(fd: BorrowedFd<'_>) -> io::Result<[u8; 16]> {
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

fn is_btrfs(fd: BorrowedFd<'_>) -> bool {
    super::fstatfs(fd).is_ok_and(|s| s.f_type == libc::BTRFS_SUPER_MAGIC)
}

/// btrfs's fsid (the UUID `mkfs.btrfs` and `btrfs filesystem show` print), from
/// BTRFS_IOC_FS_INFO. `fd` must be on a btrfs.
fn btrfs_fsid(fd: BorrowedFd<'_>) -> io::Result<[u8; 16]> {
    /// struct btrfs_ioctl_fs_info_args: max_id, num_devices, then the fsid; 1 KiB in all.
    #[repr(C)]
    struct FsInfo {
        max_id: u64,
        num_devices: u64,
        fsid: [u8; 16],
        rest: [u8; 1024 - 32],
    }
    // _IOR(BTRFS_IOCTL_MAGIC 0x94, 31, struct btrfs_ioctl_fs_info_args)
    const BTRFS_IOC_FS_INFO: libc::c_ulong = (2 << 30) | (1024 << 16) | (0x94 << 8) | 31;
    let mut a = FsInfo {
        max_id: 0,
        num_devices: 0,
        fsid: [0; 16],
        rest: [0; 1024 - 32],
    };
    // SAFETY: the kernel writes at most size_of::<FsInfo>() (1 KiB) bytes into a, and reads
    // its flags field, zeroed (asking for nothing beyond the fsid).
    check(unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            BTRFS_IOC_FS_INFO as _,
            &mut a as *mut FsInfo,
        )
    })?;
    Ok(a.fsid)
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
