//! The daemon process: fork, detaching, signals, children, exit.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use super::check;

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
    // Room for the whole file up front: read_to_string would start at 32 bytes and double,
    // one read(2) per step (9 of them here), on the mount command's path.
    let mut status = String::with_capacity(4096);
    std::io::Read::read_to_string(&mut std::fs::File::open("/proc/self/status")?, &mut status)?;
    let threads = status
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

/// SIGPIPE ignored: a daemon writing to a client that went away gets EPIPE, never dies.
pub fn sigpipe_ignore() {
    // SAFETY: as above.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
}
