//! Whose the daemon's requests are: its ids, umask (process-wide and per thread), and the
//! uid of a control socket's peer.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

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
