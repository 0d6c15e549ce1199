//! `layerfs mount` / `umount`: validate, start the daemon, wait until the mount is live.

use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use super::MountArgs;
use crate::error::{Context, Error, Result};
use crate::fuse::session;
use crate::sys;

const READY_TIMEOUT: Duration = Duration::from_secs(60);

pub fn mount(a: MountArgs) -> Result<i32> {
    let spec = super::options::mount_spec(&a.options, &a.mountpoint)?;
    if !Path::new("/dev/fuse").exists() {
        return Err(Error::msg(
            "/dev/fuse is missing: FUSE is not available here",
        ));
    }
    if a.foreground || a.debug {
        session::serve(spec, None)?;
        return Ok(0);
    }
    let log = match &a.log_file {
        Some(p) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .ctx(format!("log file {}", p.display()))?,
        ),
        None => None,
    };
    let (r, w): (OwnedFd, OwnedFd) = sys::ready_pipe().ctx("creating a pipe")?;
    // Fork rather than start a new process: the options are parsed and checked once, and
    // the mount is live a few milliseconds sooner. Every caller (mount, the mount-program
    // form, container mount/run/bundle) gets here before starting any thread.
    match sys::fork_single_threaded().ctx("starting the layerfs daemon")? {
        sys::Forked::Child => {
            drop(r);
            sys::setsid();
            sys::set_process_name(c"layerfs-daemon");
            let code = match sys::daemonize_fds(log.as_ref(), w.as_raw_fd()) {
                Ok(()) => match session::serve(spec, Some(w)) {
                    Ok(()) => 0,
                    Err(e) => {
                        log::error!("{e}");
                        1
                    }
                },
                Err(_) => 1,
            };
            // Never return into the caller's code (a `container run` continues there).
            sys::exit_now(code)
        }
        sys::Forked::Parent(pid) => {
            drop(w);
            wait_ready(r, pid).map(|()| 0)
        }
    }
}

/// Wait for daemon `pid`'s "ok" (or its error) on the readiness pipe. A daemon that hangs
/// past the timeout is killed; one that failed is reaped, so nothing is left behind.
fn wait_ready(r: OwnedFd, pid: i32) -> Result<()> {
    // The daemon's "ok", or its error and end of file. Polled here rather than read in a
    // thread: the answer is seen the moment it arrives and no thread has to start (which,
    // with the daemon's own threads starting on a small machine, cost the mount 0.1 ms).
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut f = std::fs::File::from(r);
    let mut msg = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ready = match sys::wait_readable(f.as_fd(), left) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            r => r.unwrap_or(false),
        };
        if !ready {
            sys::kill(pid, libc::SIGKILL);
            sys::wait_child(pid);
            return Err(Error::msg("the daemon did not finish mounting within 60 s"));
        }
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                msg.extend_from_slice(&buf[..n]);
                // An error is read to the end (the daemon exits after it).
                if msg == b"ok\n" {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    let msg = String::from_utf8_lossy(&msg);
    match msg.trim() {
        "ok" => Ok(()),
        "" => Err(Error::msg(format!(
            "the layerfs daemon exited before the mount was ready ({})",
            sys::wait_child(pid)
        ))),
        err => {
            sys::wait_child(pid);
            Err(Error::msg(err.to_string()))
        }
    }
}

pub fn umount(mp: &Path, lazy: bool) -> Result<()> {
    if !sys::is_mountpoint(mp) {
        return Err(Error::msg(format!("{} is not a mountpoint", mp.display())));
    }
    match sys::umount(mp, lazy) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            // Unprivileged: fusermount3 is the setuid helper for this.
            let st = Command::new("fusermount3")
                .arg("-u")
                .args(if lazy { vec!["-z"] } else { vec![] })
                .arg(mp)
                .status()
                .ctx("running fusermount3")?;
            if st.success() {
                Ok(())
            } else {
                Err(Error::msg(format!(
                    "fusermount3 -u {} failed",
                    mp.display()
                )))
            }
        }
        Err(e) => Err(Error::from(e).context(format!("unmounting {}", mp.display()))),
    }
}
