//! The work directory (`workdir/work`, as the kernel names it): where copy-ups and replacements
//! are built before an atomic rename makes them visible. Emptied at every mount, so leftovers of
//! a crash can never leak into, or block, a later copy-up.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::format::MarkerNs;
use super::index::Index;
use super::layer::LayerStack;
use crate::error::{Context, Error, Result, err};
use crate::sys;

pub struct WorkDir {
    pub fd: Arc<OwnedFd>,
    /// Copied-up lower hard links, by origin (`workdir/index`, the kernel's).
    pub index: Index,
    counter: AtomicU64,
    /// The daemon's pid, read at the first temp name (after any fork into the background).
    pid: std::sync::OnceLock<u32>,
    /// Name (in the work dir) of the shared whiteout inode new whiteouts are linked to.
    shared_whiteout: Mutex<Option<OsString>>,
    /// The upper filesystem's errno for a directory renamed over a non-empty one.
    over_full_dir: std::sync::OnceLock<i32>,
    /// The upper and work dirs, locked for as long as this mount lives (see `claim`).
    _in_use: [std::fs::File; 2],
}

/// How long a mount waits for another mount of the same upper or work dir to let go: a
/// daemon whose mount was just unmounted exits within milliseconds.
const IN_USE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Lock `path` (flock, exclusive) for one mount. Two mounts of one upper or work dir would
/// corrupt each other: each empties `work/` and the index's orphans at mount, under the other's
/// copy-ups. The kernel refuses such a second mount (EBUSY, with index=on, which layerfs's
/// format always is), and so does layerfs, whichever of the two roles each mount gives it.
fn claim(role: &str, path: &Path) -> Result<std::fs::File> {
    let f = std::fs::File::open(path).ctx(format!("{role} {}", path.display()))?;
    let start = std::time::Instant::now();
    loop {
        match f.try_lock() {
            Ok(()) => return Ok(f),
            Err(std::fs::TryLockError::WouldBlock) if start.elapsed() < IN_USE_WAIT => {
                std::thread::sleep(std::time::Duration::from_millis(10))
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(Error::msg(format!(
                    "{role} {} is in use by another mount (as upperdir or workdir); two \
                     mounts of one would corrupt each other",
                    path.display()
                )));
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(Error::from(e).context(format!("locking {role} {}", path.display())));
            }
        }
    }
}

impl WorkDir {
    /// Open (creating `work` if need be) and empty the work directory. A `volatile` mount
    /// (copy-ups not fsynced) leaves the kernel's marker behind, and any mount refuses a
    /// workdir that holds one, as the kernel does.
    pub fn open(path: &Path, layers: &LayerStack, ns: MarkerNs, volatile: bool) -> Result<WorkDir> {
        let upper = &layers.layers[0];
        let base = sys::open_dir_path(path).ctx(format!("workdir {}", path.display()))?;
        let st = sys::fstat(base.as_fd())?;
        if st.st_dev != upper.dev {
            return Err(Error::msg(format!(
                "workdir {} and upperdir {} are on different filesystems (they must share one)",
                path.display(),
                upper.path.display()
            )));
        }
        let in_use = [claim("upperdir", &upper.path)?, claim("workdir", path)?];
        sys::mkdirat_if_missing(base.as_fd(), OsStr::new("work"), 0)
            .map_err(|e| Error::from(e).context(format!("workdir {}", path.display())))?;
        // Mode 0 keeps others out, as the kernel does; an unprivileged daemon (no
        // CAP_DAC_OVERRIDE) needs to enter it itself.
        if sys::geteuid() != 0 {
            sys::chmodat(base.as_fd(), OsStr::new("work"), 0o700)
                .ctx(format!("{}/work", path.display()))?;
        }
        let fd = sys::openat(
            base.as_fd(),
            OsStr::new("work"),
            libc::O_PATH | libc::O_DIRECTORY,
            0,
        )
        .ctx(format!("{}/work", path.display()))?;
        let index = Index::open(base.as_fd(), layers, ns).ctx(format!("{}", path.display()))?;
        let w = WorkDir {
            fd: Arc::new(fd),
            index,
            counter: AtomicU64::new(0),
            pid: std::sync::OnceLock::new(),
            shared_whiteout: Mutex::new(None),
            over_full_dir: std::sync::OnceLock::new(),
            _in_use: in_use,
        };
        check_incompat(w.fd.as_fd(), path)?;
        w.clean().ctx(format!("cleaning {}/work", path.display()))?;
        if volatile {
            w.mark_volatile()
                .ctx(format!("{}/work/{INCOMPAT}/{VOLATILE}", path.display()))?;
        }
        Ok(w)
    }

    /// `work/incompat/volatile/dirty`, as the kernel makes it at a `volatile` mount. Never
    /// removed by a mount (nor by the kernel): whoever knows the upper layer reached the disk
    /// removes it, so a crash can't leave a half-written upper layer that mounts silently.
    fn mark_volatile(&self) -> Result<()> {
        let mut dir = self.fd.clone();
        for name in [INCOMPAT, VOLATILE] {
            sys::mkdirat_if_missing(dir.as_fd(), OsStr::new(name), 0o700)?;
            dir = Arc::new(sys::openat(
                dir.as_fd(),
                OsStr::new(name),
                libc::O_PATH | libc::O_DIRECTORY,
                0,
            )?);
        }
        let dirty = sys::openat(
            dir.as_fd(),
            OsStr::new("dirty"),
            libc::O_WRONLY | libc::O_CREAT,
            0o644,
        )?;
        drop(dirty);
        Ok(())
    }

    /// Remove everything a previous run left in the work directory.
    pub fn clean(&self) -> Result<()> {
        let rfd = sys::openat(
            self.fd.as_fd(),
            OsStr::new("."),
            libc::O_RDONLY | libc::O_DIRECTORY,
            0,
        )?;
        for e in sys::read_dir_fd(rfd.as_fd())? {
            remove_tree(self.fd.as_fd(), &e.name, 0)?;
        }
        Ok(())
    }

    /// Make `name` in `dir` a whiteout. Like the kernel, whiteouts are hard links to one shared
    /// whiteout inode in the work dir: a link is far cheaper than allocating an inode each time.
    /// Falls back to a fresh char device where links can't be made (EMLINK, EXDEV, EPERM).
    pub fn link_whiteout(&self, dir: BorrowedFd<'_>, name: &OsStr) -> Result<()> {
        let mut shared = self.shared_whiteout.lock().expect("whiteout lock");
        for _ in 0..2 {
            let wh = match shared.as_ref() {
                Some(w) => w.clone(),
                None => {
                    let w = self.temp_name();
                    sys::mknodat(self.fd.as_fd(), &w, libc::S_IFCHR, 0)?;
                    *shared = Some(w.clone());
                    w
                }
            };
            match sys::linkat(self.fd.as_fd(), &wh, dir, name) {
                Ok(()) => return Ok(()),
                // Too many links on this one: start another.
                Err(e) if e.raw_os_error() == Some(libc::EMLINK) => *shared = None,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EXDEV | libc::EPERM)) => break,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(sys::mknodat(dir, name, libc::S_IFCHR, 0)?)
    }

    /// What the upper filesystem answers a directory renamed over a non-empty one: POSIX
    /// allows EEXIST or ENOTEMPTY (xfs says the first; ext4, btrfs and tmpfs the second), and
    /// the kernel's overlayfs passes on its upper's answer where the target is upper only.
    /// Learnt once, by trying it in the work directory.
    pub fn dir_over_full_dir_errno(&self) -> i32 {
        *self.over_full_dir.get_or_init(|| {
            let probed = self.probe_dir_over_full_dir();
            log::debug!("rename of a directory over a non-empty one, on the upper: {probed:?}");
            probed.unwrap_or(libc::ENOTEMPTY)
        })
    }

    fn probe_dir_over_full_dir(&self) -> Result<i32> {
        let work = self.fd.as_fd();
        let (dir, full, inner) = (self.temp_name(), self.temp_name(), OsStr::new("x"));
        sys::mkdirat(work, &dir, 0o700)?;
        let r = sys::mkdirat(work, &full, 0o700)
            .and_then(|()| {
                let f = sys::openat(work, &full, libc::O_PATH | libc::O_DIRECTORY, 0)?;
                sys::mkdirat(f.as_fd(), inner, 0o700)?;
                let r = sys::renameat2(work, &dir, work, &full, 0);
                sys::unlinkat(f.as_fd(), inner, true)?;
                Ok(r)
            })
            .map_err(Error::from);
        // Whatever is left, the next mount's cleaning of work/ takes.
        let _ = sys::unlinkat(work, &full, true);
        let _ = sys::unlinkat(work, &dir, true);
        match r? {
            Err(e) => Ok(e.raw_os_error().unwrap_or(libc::ENOTEMPTY)),
            Ok(()) => Err(Error::msg(
                "the upper filesystem renamed a directory over a full one",
            )),
        }
    }

    /// A fresh name for a temporary object; callers create it exclusively.
    pub fn temp_name(&self) -> OsString {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let pid = *self.pid.get_or_init(std::process::id);
        OsString::from(format!("#{pid:x}-{n:x}"))
    }
}

/// `work/incompat/<feature>`: the kernel refuses to mount a workdir holding any such entry.
const INCOMPAT: &str = "incompat";
const VOLATILE: &str = "volatile";

/// Refuse a work directory whose `incompat` directory holds a feature (the kernel's
/// ovl_workdir_cleanup answers EINVAL): after a `volatile` mount, writes may not have reached
/// the disk, and emptying the work directory would hide that from the next mount.
fn check_incompat(work: BorrowedFd<'_>, path: &Path) -> Result<()> {
    let dir = match sys::openat(
        work,
        OsStr::new(INCOMPAT),
        libc::O_RDONLY | libc::O_DIRECTORY,
        0,
    ) {
        Ok(d) => d,
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR)) => return Ok(()),
        Err(e) => return Err(Error::from(e).context(format!("{}/work/{INCOMPAT}", path.display()))),
    };
    let names = sys::read_dir_fd(dir.as_fd())?;
    let Some(feature) = names.first() else {
        return Ok(());
    };
    Err(Error::msg(format!(
        "workdir {}: an upper layer with incompat feature '{}' cannot be mounted (a volatile \
         mount left {}/work/{INCOMPAT}, and a crash since may have lost its writes); remove \
         that directory if the upper layer is intact, else start from an empty upperdir and \
         workdir",
        path.display(),
        feature.name.to_string_lossy(),
        path.display()
    )))
}

/// Remove `name` in `dir` and everything below it, by fd (no path length limit).
pub fn remove_tree(dir: BorrowedFd<'_>, name: &OsStr, depth: usize) -> Result<()> {
    let st = match sys::statat(dir, name) {
        Ok(st) => st,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
        return Ok(sys::unlinkat(dir, name, false)?);
    }
    if depth > 100_000 {
        return Err(err(libc::ELOOP));
    }
    // A directory of mode 0 (as the kernel leaves them) opens for root, but not for a daemon
    // without CAP_DAC_OVERRIDE. Only then: a removed directory a process still holds keeps
    // its mode (its attributes are still asked for).
    if st.st_mode & 0o700 != 0o700 {
        let _ = sys::chmodat(dir, name, 0o700);
    }
    let sub = sys::openat(dir, name, libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
    for e in sys::read_dir_fd(sub.as_fd())? {
        remove_tree(sub.as_fd(), &e.name, depth + 1)?;
    }
    Ok(sys::unlinkat(dir, name, true)?)
}
