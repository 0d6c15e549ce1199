//! One mount's life: build the union, mount it, tell the parent it is live, serve until
//! unmounted (by `umount`, `fusermount3 -u`, or SIGTERM/SIGINT/SIGHUP to the daemon).

use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::PathBuf;

use fuser::{MountOption, SessionACL};
use log::info;

use super::adapter::Adapter;
use crate::error::{Context, Result};
use crate::sys;
use crate::union::{Config, Union};

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
}

fn report(ready: &mut Option<OwnedFd>, msg: &str) {
    if let Some(fd) = ready.take() {
        let mut f = std::fs::File::from(fd);
        let _ = f.write_all(msg.as_bytes());
    }
}

/// Mount and serve; `ready` (the parent's pipe) gets "ok" once the mount is live, or the error.
pub fn serve(spec: MountSpec, mut ready: Option<OwnedFd>) -> Result<()> {
    let r = start(&spec);
    let mut session = match r {
        Ok(s) => s,
        Err(e) => {
            report(&mut ready, &format!("{e}\n"));
            return Err(e);
        }
    };
    let mut unmounter = session.unmount_callable();
    let mp = spec.mountpoint.clone();
    sys::on_termination_signal(move |sig| {
        info!("signal {sig}: unmounting {}", mp.display());
        if unmounter.unmount().is_err() {
            let _ = sys::umount(&mp, true);
        }
    })?;
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
    report(&mut ready, "ok\n");
    session.run().ctx("serving the mount")?;
    info!("unmounted {}; exiting", spec.mountpoint.display());
    Ok(())
}

fn start(spec: &MountSpec) -> Result<fuser::Session<Adapter>> {
    // The kernel already applied the caller's umask to modes it sends.
    sys::set_umask(0);
    let fs = Union::new(spec.union.clone())?;
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
    fuser::Session::new(Adapter { fs }, &spec.mountpoint, &config)
        .ctx(format!("mounting on {}", spec.mountpoint.display()))
}
