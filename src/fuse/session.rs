//! One mount's life: build the union, mount it, tell the parent it is live, serve until
//! unmounted (by `umount`, `fusermount3 -u`, or SIGTERM/SIGINT/SIGHUP to the daemon).

use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use fuser::{MountOption, SessionACL};
use log::info;

use super::adapter::Adapter;
use crate::control::{self, server::Control};
use crate::error::{Context, Result};
use crate::sys;
use crate::union::{Config, Invalidate, Union};

/// Everything needed to mount.
#[derive(Clone, Debug)]
pub struct MountSpec {
    pub mountpoint: PathBuf,
    pub union: Config,
    pub allow_other: bool,
    pub default_permissions: bool,
    /// Extra kernel mount flags (nodev, nosuid, noexec, noatime...).
    pub kernel_opts: Vec<MountOption>,
    pub threads: usize,
    /// Which files' data goes through FUSE passthrough when the kernel allows it.
    pub passthrough: Passthrough,
    /// `io_uring=`: use FUSE over io_uring when the kernel offers it.
    pub io_uring: bool,
    /// `acl`/`noacl`: the kernel checks POSIX ACLs and caches them (FUSE_POSIX_ACL).
    pub posix_acl: bool,
}

/// `passthrough=`: which open files the kernel serves straight from the real file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Passthrough {
    /// Every read and write goes through the daemon (and the page cache).
    Off,
    /// Only upper-layer files; lower files are read through the daemon, so a reader open
    /// before a copy-up follows it (the kernel's behaviour since 4.19).
    Upper,
    /// Upper and lower files; a reader open on a lower file before it is copied up keeps
    /// reading the lower data.
    All,
}

/// This mount's FUSE fd and mountpoint, for the exit path.
static EXIT_GUARD: OnceLock<(OwnedFd, PathBuf)> = OnceLock::new();

/// This mount's control socket, removed on the way out.
static CONTROL: OnceLock<Control> = OnceLock::new();

/// The union, for what it keeps on the way out (its catalog).
static UNION: OnceLock<Arc<Union>> = OnceLock::new();

/// How long the serving threads get to return once the connection has ended (they take
/// about 15 ms) before the daemon exits without them.
const EXIT_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// The connection ended: every serving thread returns, and the last one out exits through
/// `destroy`. One stuck in a request (a layer on a hung filesystem) would keep the daemon,
/// and the lock on its upper and work dirs, until that request ends: after a grace period
/// the daemon exits anyway (a thread whose request another FUSE daemon has not read yet
/// dies with it; one already handed over is waited out by the kernel). No thread waits for
/// this while the mount lives, so an idle daemon never wakes.
pub fn exit_soon() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let spawned = std::thread::Builder::new()
            .name("exit-grace".into())
            .stack_size(64 << 10)
            .spawn(|| {
                std::thread::sleep(EXIT_GRACE);
                log::warn!(
                    "a request still running {EXIT_GRACE:?} after the connection ended: exiting"
                );
                exit_after_unmount();
            });
        if let Err(e) = spawned {
            log::warn!("no exit grace thread ({e}): a stuck request would keep the daemon");
        }
    });
}

/// Called when the session ends (from `destroy`). fuser 0.18's drop guard would unmount the
/// mountpoint *path* even after someone else unmounted us — taking down a new mount made there
/// meanwhile (its connection check reads POLLERR the wrong way round). So exit here, before that
/// guard runs, unmounting only if our own connection is still alive. Once only: a second
/// caller (`exit_soon`'s, racing `destroy`) waits here for the first to end the process.
pub fn exit_after_unmount() -> ! {
    static EXITING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    // Held until the process ends (a poisoned lock lets the next caller finish the job).
    let _exiting = EXITING.lock();
    if let Some(c) = CONTROL.get() {
        c.remove();
    }
    if let Some(u) = UNION.get() {
        u.save_catalog();
    }
    if let Some((fd, mp)) = EXIT_GUARD.get() {
        if !sys::fuse_disconnected(fd.as_fd()) {
            let _ = sys::umount(mp, true);
        }
        info!("unmounted {}; exiting", mp.display());
    }
    sys::exit_now(0)
}

fn report(ready: &mut Option<OwnedFd>, msg: &str) {
    if let Some(fd) = ready.take() {
        let mut f = std::fs::File::from(fd);
        let _ = f.write_all(msg.as_bytes());
    }
}

/// Mount and serve; `ready` (the parent's pipe) gets "ok" once the mount is live, or the error.
pub fn serve(spec: MountSpec, mut ready: Option<OwnedFd>) -> Result<()> {
    // A control client that goes away must cost an EPIPE, never the daemon.
    sys::sigpipe_ignore();
    sys::limit_malloc_arenas(1);
    let r = start(&spec);
    let (mut session, fs) = match r {
        Ok(started) => started,
        Err(e) => {
            report(&mut ready, &format!("{e}\n"));
            return Err(e);
        }
    };
    let devfd = session
        .as_fd()
        .try_clone_to_owned()
        .ctx("duplicating the FUSE fd")?;
    let _ = EXIT_GUARD.set((devfd, spec.mountpoint.clone()));
    let mut unmounter = session.unmount_callable();
    let mp = spec.mountpoint.clone();
    sys::on_termination_signal(move |sig| {
        info!("signal {sig}: unmounting {}", mp.display());
        if unmounter.unmount().is_err() {
            let _ = sys::umount(&mp, true);
        }
    })?;
    // Every later thread is spawned with the signals blocked: a SIGTERM must reach the signal
    // thread, never kill the process through another thread without unmounting.
    // No thread watches for the unmount: every serving thread blocks until a request comes or
    // the connection ends (read gives ENODEV, a ring's commands ENOTCONN), so the last one
    // out ends the session and `destroy` exits, ~15 ms after the umount (`exit_soon` covers
    // one that never returns). An idle daemon never wakes (a watcher polling ten times a
    // second woke every idle mount's daemon).
    let notifier = session.notifier();
    let (entries, rx) = std::sync::mpsc::channel::<(u64, std::ffi::OsString)>();
    let n = notifier.clone();
    // Entry invalidations go out from their own thread: the kernel takes the parent's lock
    // for one, and the request that caused it may hold that lock.
    std::thread::Builder::new()
        .name("invalidate".into())
        .spawn(move || {
            for (p, name) in rx {
                let _ = n.inval_entry(fuser::INodeNo(p), &name);
            }
        })?;
    fs.set_invalidator(Box::new(KernelCache { notifier, entries }));
    let u = fs.clone();
    std::thread::Builder::new()
        .name("reclaim".into())
        .stack_size(64 << 10)
        .spawn(move || u.reclaim.run())?;
    let _ = UNION.set(fs.clone());
    // Seeing copy-on-write is a convenience: a mount without its control socket still serves.
    match control::server::start(fs, spec.mountpoint.clone()) {
        Ok(c) => {
            let _ = CONTROL.set(c);
        }
        Err(e) => log::warn!("no control socket (stats, events, which unavailable): {e}"),
    }
    info!(
        "mounted {} ({} layers, {})",
        spec.mountpoint.display(),
        spec.union.lowers.len() + usize::from(spec.union.upper.is_some()),
        if spec.union.upper.is_some() {
            "writable"
        } else {
            "read-only"
        }
    );
    // "ok" once requests are served at once: every thread started and, over io_uring, every
    // queue registered. Reported earlier, the first request (a container's first exec right
    // after the mount) waited for them: about a millisecond here.
    let served = session.run_with(|| {
        report(&mut ready, "ok\n");
        // Off the mount's critical path, and at SCHED_IDLE so that faulting the code in
        // (about a millisecond) never takes a CPU from the first requests.
        let _ = std::thread::Builder::new()
            .name("lock-code".into())
            .spawn(|| {
                if let Err(e) = sys::idle_priority() {
                    log::debug!("code locked at normal priority: {e}");
                }
                match sys::lock_own_code() {
                    Ok(n) => log::debug!("locked {} KiB of code in memory", n >> 10),
                    Err(e) => log::debug!("code not locked in memory: {e}"),
                }
            });
    });
    if let Err(e) = served {
        // Not serving (a queue could not register, say): say why to the waiting `mount`
        // and take the mount away rather than leave one whose requests never end.
        let mut msg = format!("serving the mount: {e}");
        if msg.contains("io_uring") {
            msg.push_str(" (io_uring=0 serves over /dev/fuse)");
        }
        report(&mut ready, &format!("{msg}\n"));
        let _ = sys::umount(&spec.mountpoint, true);
        return Err(e).ctx("serving the mount");
    }
    if let Some(u) = UNION.get() {
        u.save_catalog();
    }
    info!("unmounted {}; exiting", spec.mountpoint.display());
    Ok(())
}

type Started = (fuser::Session<Adapter>, Arc<Union>);

/// The kernel's caches of this mount, told of changes the engine makes behind them.
struct KernelCache {
    notifier: fuser::Notifier,
    entries: std::sync::mpsc::Sender<(u64, std::ffi::OsString)>,
}

impl Invalidate for KernelCache {
    fn attrs(&self, id: u64) {
        // Attributes only (offset -1): the kernel drops them under a spinlock and touches no
        // page, so this is safe inside any request.
        let _ = self.notifier.inval_inode(fuser::INodeNo(id), -1, 0);
    }

    fn entry(&self, parent: u64, name: std::ffi::OsString) {
        let _ = self.entries.send((parent, name));
    }
}

fn start(spec: &MountSpec) -> Result<Started> {
    // The kernel already applied the caller's umask to modes it sends.
    sys::set_umask(0);
    let fs = Arc::new(Union::new(spec.union.clone())?);
    let mut opts = vec![
        MountOption::FSName("layerfs".into()),
        MountOption::Subtype("layerfs".into()),
    ];
    if spec.default_permissions {
        opts.push(MountOption::DefaultPermissions);
    }
    if !fs.writable() {
        opts.push(MountOption::RO);
    }
    opts.extend(spec.kernel_opts.iter().cloned());
    let mut config = fuser::Config::default();
    config.mount_options = opts;
    config.acl = if spec.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    config.n_threads = Some(spec.threads.max(1));
    config.clone_fd = true;
    // fuser asks the kernel for it at INIT and serves the queues (vendor/fuser/LAYERFS.md).
    // LAYERFS_IDLE_COMMIT=0 turns off the SCHED_IDLE reply commit, =always commits every
    // reply that way (A/B knobs for scripts/bench; docs/ARCHITECTURE.md, "Transport").
    let knob = std::env::var("LAYERFS_IDLE_COMMIT").unwrap_or_default();
    config.io_uring = spec.io_uring.then(|| fuser::UringConfig {
        idle_commit: knob != "0",
        adaptive_commit: knob != "always",
        ..Default::default()
    });
    let session = fuser::Session::new(
        Adapter::new(fs.clone(), spec.passthrough, spec.posix_acl),
        &spec.mountpoint,
        &config,
    )
    .ctx(format!("mounting on {}", spec.mountpoint.display()))?;
    Ok((session, fs))
}
