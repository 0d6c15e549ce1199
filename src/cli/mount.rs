//! `layerfs mount` / `umount`: validate, start the daemon, wait until the mount is live.

use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use super::MountArgs;
use crate::error::{Context, Error, Result};
use crate::fuse::session;
use crate::sys;

/// Set in the daemon child: the fd of the pipe to report readiness on.
const READY_FD_ENV: &str = "LAYERFS_READY_FD";
const READY_TIMEOUT: Duration = Duration::from_secs(60);

pub fn mount(a: MountArgs) -> Result<i32> {
    let spec = super::options::mount_spec(&a.options, &a.mountpoint)?;
    if !Path::new("/dev/fuse").exists() {
        return Err(Error::msg(
            "/dev/fuse is missing: FUSE is not available here",
        ));
    }
    if a.foreground || a.debug {
        let ready = std::env::var(READY_FD_ENV)
            .ok()
            .and_then(|v| v.parse().ok())
            .and_then(sys::adopt_fd);
        session::serve(spec, ready)?;
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
    // the mount is live a few milliseconds sooner. (Re-executing is the fallback.)
    match sys::fork_single_threaded().ctx("starting the layerfs daemon")? {
        Some(sys::Forked::Child) => {
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
        Some(sys::Forked::Parent(pid)) => {
            drop(w);
            let r = wait_ready(r, || sys::kill(pid, libc::SIGKILL));
            if r.is_err() {
                // Reap it, so nothing is left behind (a failed daemon has exited already).
                let _ = sys::wait_child(pid);
            }
            r.map(|()| 0)
        }
        None => spawn_daemon(&a, r, w),
    }
}

/// Wait for the daemon's "ok" (or its error) on the readiness pipe; `kill` ends a daemon that
/// hangs past the timeout.
fn wait_ready(r: OwnedFd, kill: impl FnOnce()) -> Result<()> {
    let mut f = std::fs::File::from(r);
    // The pipe closes when the daemon reports or dies; a hung mount is bounded by the timeout.
    // (A channel, not polling: the answer is seen the moment it arrives.)
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = f.read_to_string(&mut s);
        let _ = tx.send(s);
    });
    let Ok(msg) = rx.recv_timeout(READY_TIMEOUT) else {
        kill();
        return Err(Error::msg("the daemon did not finish mounting within 60 s"));
    };
    match msg.trim() {
        "ok" => Ok(()),
        "" => Err(Error::msg(
            "the layerfs daemon exited before the mount was ready",
        )),
        err => Err(Error::msg(err.to_string())),
    }
}

/// Re-run ourselves in the foreground, detached, and wait for its "ok" (or its error).
fn spawn_daemon(a: &MountArgs, r: OwnedFd, w: OwnedFd) -> Result<i32> {
    let exe = std::env::current_exe().ctx("finding the layerfs binary")?;
    let mut cmd = Command::new(exe);
    cmd.arg("mount").arg("-f");
    if let Some(p) = &a.log_file {
        cmd.arg("--log-file").arg(p);
    }
    for o in &a.options {
        cmd.arg("-o").arg(o);
    }
    cmd.arg(&a.mountpoint)
        .env(READY_FD_ENV, w.as_raw_fd().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    match &a.log_file {
        Some(p) => {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .ctx(format!("log file {}", p.display()))?;
            cmd.stderr(f);
        }
        None => {
            cmd.stderr(Stdio::null());
        }
    }
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd.spawn().ctx("starting the layerfs daemon")?;
    drop(w);
    let pid = child.id() as i32;
    let r = wait_ready(r, || sys::kill(pid, libc::SIGKILL));
    if r.is_err() {
        let _ = child.wait();
    }
    r.map(|()| 0)
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
