//! The mount table, unmounting, and the state of a FUSE connection.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStringExt;

use super::{check, cstr};

/// Lazily detach a mount (MNT_DETACH) or plainly unmount it.
pub fn umount(path: &std::path::Path, lazy: bool) -> io::Result<()> {
    let c = cstr(path.as_os_str())?;
    let flags = if lazy { libc::MNT_DETACH } else { 0 };
    // SAFETY: valid C string.
    check(unsafe { libc::umount2(c.as_ptr(), flags) }).map(drop)
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

/// The device ("major:minor", as mountinfo writes it) of the filesystem mounted on `path`,
/// from the attributes the kernel holds: a FUSE mount whose daemon does not serve yet answers
/// without a request (AT_STATX_DONT_SYNC), and no mount table is read.
pub fn mounted_dev(path: &std::path::Path) -> io::Result<String> {
    let c = cstr(path.as_os_str())?;
    // SAFETY: statx fills a zeroed plain struct.
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    let flags = libc::AT_STATX_DONT_SYNC | libc::AT_NO_AUTOMOUNT;
    // SAFETY: valid NUL-terminated path and out pointer.
    check(unsafe { libc::statx(libc::AT_FDCWD, c.as_ptr(), flags, 0, &mut st) })?;
    Ok(format!("{}:{}", st.stx_dev_major, st.stx_dev_minor))
}

/// Wait until `fd` can be read (data or end of file), at most `timeout`; false on timeout.
pub fn wait_readable(fd: BorrowedFd<'_>, timeout: std::time::Duration) -> io::Result<bool> {
    // Rounded up: a wait never ends a little before the deadline for the caller to spin on.
    let ms = libc::c_int::try_from(timeout.as_micros().div_ceil(1000)).unwrap_or(libc::c_int::MAX);
    poll_one(fd, libc::POLLIN, ms).map(|revents| revents != 0)
}

/// poll(2) on one fd: the events it reports (0 once `ms` have passed).
fn poll_one(
    fd: BorrowedFd<'_>,
    events: libc::c_short,
    ms: libc::c_int,
) -> io::Result<libc::c_short> {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    match unsafe { libc::poll(&mut p, 1, ms) } {
        -1 => Err(io::Error::last_os_error()),
        _ => Ok(p.revents),
    }
}

/// Has the FUSE connection on this /dev/fuse fd ended (the kernel reports POLLERR)?
pub fn fuse_disconnected(fd: BorrowedFd<'_>) -> bool {
    poll_one(fd, 0, 0).is_ok_and(|revents| revents & libc::POLLERR != 0)
}
