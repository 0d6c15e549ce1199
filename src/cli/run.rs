//! `layerfs container bundle NAME DIR` and `layerfs container run NAME [-- CMD...]`: an OCI
//! runtime bundle over the container's layerfs mount, and a run of it with runc or crun.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::image::{
    container_image_config, container_path, mount_container, mounted_at, umount_container,
};
use crate::error::{Context, Error, Result};
use crate::runtime::spec::{self, RunOptions};
use crate::runtime::users;
use crate::store::Store;

/// Is `prog` on PATH (or a path to an executable)?
fn find_program(prog: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let exec = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if prog.contains('/') {
        return exec(Path::new(prog)).then(|| PathBuf::from(prog));
    }
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(prog))
            .find(|p| exec(p))
    })
}

/// Write `dir/config.json` for container `name` with its rootfs at `rootfs`.
fn write_config(
    store: &Store,
    name: &str,
    dir: &Path,
    rootfs: &Path,
    args: &[String],
    tty: bool,
) -> Result<()> {
    let cfg = container_image_config(store, name)?;
    let user = cfg["config"]["User"].as_str().unwrap_or("");
    let ids = users::resolve(user, rootfs).map_err(|e| e.context(format!("container {name}")))?;
    let rootfs_s = rootfs.to_string_lossy();
    let spec = spec::build(
        &cfg,
        &ids,
        &RunOptions {
            hostname: name,
            rootfs: &rootfs_s,
            args,
            tty,
        },
    )?;
    let data = serde_json::to_vec_pretty(&spec).map_err(|e| Error::msg(e.to_string()))?;
    std::fs::write(dir.join("config.json"), data).ctx(format!("writing {}", dir.display()))
}

/// `container bundle NAME DIR`: DIR gets config.json, and the rootfs mounted at DIR/rootfs
/// (or, when the container is already mounted, config.json points at that mount).
pub fn bundle(store: &Store, name: &str, dir: &Path, args: &[String], tty: bool) -> Result<i32> {
    container_path(store, name)?;
    match std::fs::read_dir(dir) {
        Ok(mut d) => {
            if d.next().is_some() {
                return Err(Error::msg(format!(
                    "bundle dir {} exists and is not empty",
                    dir.display()
                )));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).ctx(format!("creating {}", dir.display()))?;
        }
        Err(e) => return Err(Error::from(e).context(dir.display())),
    }
    let dir = std::fs::canonicalize(dir)?;
    let (rootfs, mounted_here) = match mounted_at(store, name)? {
        Some(mp) => (mp, false),
        None => {
            let mp = dir.join("rootfs");
            std::fs::create_dir(&mp)?;
            (mount_container(store, name, &mp)?, true)
        }
    };
    if let Err(e) = write_config(store, name, &dir, &rootfs, args, tty) {
        // Nothing half-made left behind.
        if mounted_here {
            let _ = umount_container(store, name);
        }
        let _ = std::fs::remove_dir_all(&dir);
        return Err(e);
    }
    eprintln!(
        "bundle {} (rootfs {}); run it with: runc run --bundle {} ID",
        dir.display(),
        rootfs.display(),
        dir.display()
    );
    Ok(0)
}

/// Unmounts what `run` mounted, whatever way it ends (taking the store lock again).
struct Mounted<'a> {
    root: &'a Path,
    name: &'a str,
}

impl Drop for Mounted<'_> {
    fn drop(&mut self) {
        let r = Store::open(self.root, true).and_then(|s| umount_container(&s, self.name));
        if let Err(e) = r {
            eprintln!("layerfs: unmounting container {}: {e}", self.name);
        }
    }
}

/// `container run NAME [-- CMD...]`: the container's exit code.
pub fn run(root: &Path, name: &str, runtime: &str, args: &[String], tty: bool) -> Result<i32> {
    // The store's writer lock is held while mounting and writing the bundle, not while the
    // container runs (other containers may start meanwhile).
    let locked = Store::open(root, true)?;
    let store = &locked;
    let cdir = container_path(store, name)?;
    let rt = find_program(runtime).ok_or_else(|| {
        Error::msg(format!(
            "runtime {runtime} is not installed (apt-get install {runtime}, or --runtime PATH)"
        ))
    })?;
    let id = format!("layerfs-{name}");
    // A state left by an earlier run that was killed: a running one is refused.
    let state = Command::new(&rt).args(["state", &id]).output();
    if let Ok(o) = &state
        && o.status.success()
    {
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
        if v["status"] == "running" || v["status"] == "created" && v["pid"].as_u64() != Some(0) {
            return Err(Error::msg(format!(
                "container {name} is already running ({id})"
            )));
        }
        let _ = Command::new(&rt).args(["delete", "-f", &id]).output();
    }
    let (rootfs, _guard) = match mounted_at(store, name)? {
        Some(mp) => (mp, None),
        None => {
            let mp = cdir.join("rootfs");
            std::fs::create_dir_all(&mp)?;
            let mp = mount_container(store, name, &mp)?;
            (mp, Some(Mounted { root, name }))
        }
    };
    let bdir = cdir.join("bundle");
    let _ = std::fs::remove_dir_all(&bdir);
    std::fs::create_dir_all(&bdir)?;
    write_config(store, name, &bdir, &rootfs, args, tty)?;
    drop(locked);
    let mut cmd = Command::new(&rt);
    if runtime.ends_with("crun") {
        // crun would create a cgroup through systemd or cgroupfs; layerfs runs it without one.
        cmd.arg("--cgroup-manager=disabled");
    }
    cmd.args(["run", "--bundle"]).arg(&bdir).arg(&id);
    log::info!("running {cmd:?}");
    let status = cmd
        .status()
        .map_err(|e| Error::from(e).context(format!("starting {}", rt.display())))?;
    let _ = Command::new(&rt).args(["delete", "-f", &id]).output();
    Ok(
        match (
            status.code(),
            std::os::unix::process::ExitStatusExt::signal(&status),
        ) {
            (Some(c), _) => c,
            (None, Some(sig)) => 128 + sig,
            _ => 1,
        },
    )
}
