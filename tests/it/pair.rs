//! Kernel overlayfs and layerfs over the same lower layers, each with its own upper/work: run the
//! same operations on both, compare results, errnos and whole trees, then check persistence
//! and on-disk interop both ways.

#![allow(dead_code)]

use std::fmt::Debug;
use std::path::{Path, PathBuf};

use crate::support::*;

pub struct Pair {
    pub lowers: Vec<PathBuf>,
    /// Data-only layers, below the lowers (`::` in lowerdir).
    pub data: Vec<PathBuf>,
    pub k: Option<Kernel>,
    pub l: Option<Layerfs>,
    /// Mount options given to both (e.g. `metacopy=on`).
    pub extra: String,
    /// Mount options given to layerfs only (e.g. `passthrough=upper`).
    pub ours: String,
    /// Each mount runs over the other's upper and workdir (`remount_both` with `swap`).
    pub swapped: bool,
    /// Has been swapped at some point: the uppers mix what both wrote.
    pub crossed: bool,
    /// Tmpfs mounts holding the uppers and workdirs, and the bottom lower layer
    /// (`build_on`): the layers on several filesystems. Dropped after the mounts, before
    /// the scratch directory.
    upper_fs: Option<TmpfsMount>,
    lower_fs: Option<TmpfsMount>,
    /// Fields drop in order, so the mounts above are gone before their directories.
    pub s: Scratch,
    /// The filesystem `s` is on (`Placement::fs`), and the scratch area holding its image:
    /// unmounted once `s` is emptied, then removed.
    disk: Option<Disk>,
    disk_image: Option<Scratch>,
}

/// Where a pair's layers go: by default all in a scratch directory under /tmp.
#[derive(Clone, Copy, Default)]
pub struct Placement {
    /// Both sides' uppers and workdirs on a tmpfs of their own.
    pub upper: bool,
    /// The bottom lower layer on a tmpfs of its own (copied there whole, `cp -a`).
    pub bottom_lower: bool,
    /// The scratch directory (the layers, and the uppers unless `upper`) on a fresh
    /// filesystem of this type (ext4, xfs, btrfs) on a loop device.
    pub fs: Option<&'static str>,
}

/// An operation's outcome, comparable across the two mounts: a value or an errno.
pub type Outcome<T> = Result<T, i32>;

pub fn outcome<T>(r: std::io::Result<T>) -> Outcome<T> {
    r.map_err(|e| e.raw_os_error().unwrap_or(-1))
}

impl Pair {
    pub fn new(build: impl FnOnce(&Scratch) -> Vec<PathBuf>) -> Pair {
        Pair::with_options(build, "")
    }

    /// A pair whose two mounts both also get `extra` options.
    pub fn with_options(build: impl FnOnce(&Scratch) -> Vec<PathBuf>, extra: &str) -> Pair {
        Pair::with_ours(build, extra, "")
    }

    /// A pair whose mounts both get `extra` options, and layerfs also `ours`.
    pub fn with_ours(
        build: impl FnOnce(&Scratch) -> Vec<PathBuf>,
        extra: &str,
        ours: &str,
    ) -> Pair {
        Pair::build(|s| (build(s), Vec::new()), extra, ours)
    }

    /// A pair over lower layers and data-only layers (`build` returns both), with `extra`.
    pub fn with_data(
        build: impl FnOnce(&Scratch) -> (Vec<PathBuf>, Vec<PathBuf>),
        extra: &str,
    ) -> Pair {
        Pair::build(build, extra, "")
    }

    /// A pair over lower and data-only layers (`build` returns both), with `extra` options
    /// for both mounts and `ours` for layerfs alone.
    pub fn build(
        build: impl FnOnce(&Scratch) -> (Vec<PathBuf>, Vec<PathBuf>),
        extra: &str,
        ours: &str,
    ) -> Pair {
        Pair::build_on(build, extra, ours, Placement::default())
    }

    /// As `build`, with the layers where `on` says.
    pub fn build_on(
        build: impl FnOnce(&Scratch) -> (Vec<PathBuf>, Vec<PathBuf>),
        extra: &str,
        ours: &str,
        on: Placement,
    ) -> Pair {
        let (s, disk, disk_image) = match on.fs {
            Some(fstype) => {
                let image = Scratch::new();
                let disk = Disk::made_with(&image, "disk", fstype, &[])
                    .unwrap_or_else(|| panic!("no {fstype} disk for the pair"));
                (Scratch::new_in(&disk.mnt), Some(disk), Some(image))
            }
            None => (Scratch::new(), None, None),
        };
        let (mut lowers, data) = build(&s);
        let upper_fs = on
            .upper
            .then(|| TmpfsMount::mount(s.mkdir("ufs"), "size=512m"));
        let lower_fs = on.bottom_lower.then(|| {
            let fs = TmpfsMount::mount(s.mkdir("lfs"), "size=512m");
            let bottom = lowers.last_mut().expect("a lower layer");
            let moved = fs.0.join("bottom");
            // -a keeps hard links, xattrs (the markers) and whiteout devices.
            let (ok, _o, err) = run_timeout(
                std::process::Command::new("cp")
                    .arg("-a")
                    .arg(&*bottom)
                    .arg(&moved),
                60,
            );
            assert!(ok, "copying the bottom lower layer to a tmpfs: {err}");
            *bottom = moved;
            fs
        });
        let mut p = Pair {
            s,
            lowers,
            data,
            k: None,
            l: None,
            extra: extra.to_string(),
            ours: ours.to_string(),
            swapped: false,
            crossed: false,
            upper_fs,
            lower_fs,
            disk,
            disk_image,
        };
        for d in ["ku", "kw", "lu", "lw"] {
            std::fs::create_dir(p.upper_dir(d)).unwrap();
        }
        p.mount_kernel();
        p.remount_layerfs();
        p
    }

    /// The daemons' log (RUST_BACKTRACE=1): a panic anywhere shows up here.
    /// The daemons' log: in the scratch directory, or where `LAYERFS_TEST_LOG` says (kept
    /// after the test, for a replay with `RUST_LOG=debug`).
    pub fn log(&self) -> PathBuf {
        std::env::var_os("LAYERFS_TEST_LOG")
            .map_or_else(|| self.s.path("layerfs.log"), PathBuf::from)
    }

    fn mount_layerfs(&self, upper: &Path, work: &Path, mnt: &Path) -> Layerfs {
        Layerfs::try_mount_logged(&self.layerfs_opts(upper, work), mnt, Some(&self.log()))
            .unwrap_or_else(|e| panic!("layerfs mount failed: {e}"))
    }

    /// Fail if any daemon of this pair panicked.
    pub fn assert_no_panic(&self) {
        let log = std::fs::read_to_string(self.log()).unwrap_or_default();
        assert!(!log.contains("panicked"), "daemon panicked:\n{log}");
    }

    pub fn kernel_opts(&self, upper: &Path, work: &Path) -> String {
        // The userxattr format has no redirects (the kernel refuses redirect_dir=on with it).
        let userxattr = self.extra.split(',').any(|o| o == "userxattr");
        format!(
            "lowerdir={},upperdir={},workdir={},{}index=on{}",
            self.lowerdir(),
            upper.display(),
            work.display(),
            if userxattr { "" } else { "redirect_dir=on," },
            self.extra_opts()
        )
    }

    pub fn layerfs_opts(&self, upper: &Path, work: &Path) -> String {
        format!(
            "lowerdir={},upperdir={},workdir={}{}{}",
            self.lowerdir(),
            upper.display(),
            work.display(),
            self.extra_opts(),
            if self.ours.is_empty() {
                String::new()
            } else {
                format!(",{}", self.ours)
            }
        )
    }

    /// The lowerdir value: the lowers, then `::` and each data-only layer.
    fn lowerdir(&self) -> String {
        let mut v = lowerdir(&self.lowers);
        for d in &self.data {
            v.push_str("::");
            v.push_str(&lowerdir(std::slice::from_ref(d)));
        }
        v
    }

    fn extra_opts(&self) -> String {
        if self.extra.is_empty() {
            String::new()
        } else {
            format!(",{}", self.extra)
        }
    }

    pub fn kmnt(&self) -> &Path {
        &self.k.as_ref().expect("kernel mounted").mnt
    }

    pub fn lmnt(&self) -> &Path {
        &self.l.as_ref().expect("layerfs mounted").mnt
    }

    /// Run `f` on both mounts (kernel first); the outcomes must be equal.
    pub fn both<T: PartialEq + Debug>(&self, what: &str, f: impl Fn(&Path) -> T) -> T {
        let k = f(self.kmnt());
        let l = f(self.lmnt());
        assert_eq!(k, l, "{what}: kernel (left) and layerfs (right) disagree");
        l
    }

    /// `both`, for steps whose outcome is only compared.
    pub fn same<T: PartialEq + Debug>(&self, what: &str, f: impl Fn(&Path) -> T) {
        self.both(what, f);
    }

    /// The two visible trees must be identical.
    pub fn check(&self, what: &str) {
        assert_same_tree_linked(
            what,
            &snapshot(self.kmnt()),
            &snapshot(self.lmnt()),
            &self.linked(),
            self.crossed,
        );
    }

    /// The directories a lookup copied up to link a name up (see `linked_up_dirs`): in
    /// layerfs's upper, and once crossed in the kernel's too.
    fn linked(&self) -> std::collections::BTreeSet<Vec<u8>> {
        let mut l = linked_up_dirs(&self.upper());
        if self.crossed {
            l.extend(linked_up_dirs(&self.kernel_dirs().0));
        }
        l
    }

    /// The upper and workdir the kernel mounts.
    pub fn kernel_dirs(&self) -> (PathBuf, PathBuf) {
        self.dirs(!self.swapped)
    }

    /// The upper and workdir layerfs mounts.
    pub fn layerfs_dirs(&self) -> (PathBuf, PathBuf) {
        self.dirs(self.swapped)
    }

    /// The kernel's first upper and workdir (`ku`, `kw`), or layerfs's (`lu`, `lw`).
    fn dirs(&self, kernels: bool) -> (PathBuf, PathBuf) {
        let (u, w) = if kernels { ("ku", "kw") } else { ("lu", "lw") };
        (self.upper_dir(u), self.upper_dir(w))
    }

    /// Where an upper or workdir called `name` goes: beside the lowers, or on the uppers'
    /// own filesystem.
    fn upper_dir(&self, name: &str) -> PathBuf {
        match &self.upper_fs {
            Some(fs) => fs.0.join(name),
            None => self.s.path(name),
        }
    }

    fn mount_kernel(&mut self) {
        let (u, w) = self.kernel_dirs();
        self.k = Some(Kernel::mount(
            &self.kernel_opts(&u, &w),
            &self.s.path("kmnt"),
        ));
    }

    pub fn remount_layerfs(&mut self) {
        self.l = None;
        let (u, w) = self.layerfs_dirs();
        self.l = Some(self.mount_layerfs(&u, &w, &self.s.path("lmnt")));
    }

    /// Both mounts down and up again; with `kill`, layerfs's daemon is killed (-9) instead
    /// of unmounted (nothing may live only in its memory); with `swap`, each comes up over
    /// the other's upper and workdir (each must carry on from what the other wrote).
    pub fn remount_both(&mut self, kill: bool, swap: bool) {
        if kill {
            kill_daemon(self.lmnt());
        }
        self.k = None;
        self.l = None;
        if swap {
            self.swapped = !self.swapped;
            self.crossed = true;
        }
        self.mount_kernel();
        self.remount_layerfs();
    }

    /// Persistence and on-disk compatibility: layerfs remounted and the kernel on layerfs's
    /// upper show the kernel's live tree; layerfs on the kernel's upper shows what the kernel
    /// itself shows on that upper with a fresh workdir (with index=on, copy-ups of lower hard
    /// links may live only in the kernel's old workdir/index, so that is the fair oracle).
    pub fn check_interop(&mut self) {
        let expected = snapshot(self.kmnt());
        let inos = inode_map(self.lmnt());
        self.remount_layerfs();
        let linked = self.linked();
        assert_same_tree_linked(
            "layerfs after remount",
            &expected,
            &snapshot(self.lmnt()),
            &linked,
            self.crossed,
        );
        // Every st_ino stays what it was, copies included (their origin's); except, in the
        // userxattr format, copies of what can't carry a user.* xattr (symlinks, devices,
        // FIFOs: no origin), which show the upper number after a remount, as the kernel's do.
        let userxattr = self.extra.split(',').any(|o| o == "userxattr");
        let upper = self.upper();
        let no_origin = |k: &[u8]| {
            userxattr
                && upper
                    .join(os(k))
                    .symlink_metadata()
                    .is_ok_and(|m| !m.is_file() && !m.is_dir())
        };
        assert_same_inos(
            "layerfs after remount",
            &inos,
            &inode_map(self.lmnt()),
            |k, _| !no_origin(k),
        );
        self.l = None;
        self.k = None;
        let (kw3, lw2) = (self.upper_dir("kw3"), self.upper_dir("lw2"));
        std::fs::create_dir_all(&kw3).unwrap();
        std::fs::create_dir_all(&lw2).unwrap();
        let ((ku, kw), (lu, lw)) = (self.kernel_dirs(), self.layerfs_dirs());
        {
            // With layerfs's workdir: the kernel (index=on) reads layerfs's index too, so
            // names of a lower hard link never linked up share the copy there as well.
            let k_on_ours = Kernel::mount(&self.kernel_opts(&lu, &lw), &self.s.path("x1"));
            assert_same_tree_linked(
                "kernel on layerfs's upper",
                &expected,
                &snapshot(&k_on_ours.mnt),
                &linked,
                self.crossed,
            );
            // The kernel reads the origins layerfs wrote, and its index. (With the layers on
            // two filesystems the numbers differ by design: layerfs puts a filesystem's index
            // in the top bits, the kernel its xino scheme; SEMANTICS.)
            if self.upper_fs.is_none() && self.lower_fs.is_none() {
                assert_same_inos(
                    "kernel on layerfs's upper",
                    &inos,
                    &inode_map(&k_on_ours.mnt),
                    |k, dir| dir || !no_origin(k),
                );
            }
        }
        {
            // And layerfs reads the kernel's.
            let ours_on_k = self.mount_layerfs(&ku, &kw, &self.s.path("x2"));
            let seen = snapshot(&ours_on_k.mnt);
            // (The walk linked names up, in the kernel's upper now.)
            assert_same_tree_linked(
                "layerfs on the kernel's upper and workdir",
                &expected,
                &seen,
                &linked_up_dirs(&ku),
                self.crossed,
            );
        }
        // Without the workdir (lost, or not carried along): layerfs shows what the kernel
        // itself shows then.
        let kernel_view = {
            let k_again = Kernel::mount(&self.kernel_opts(&ku, &kw3), &self.s.path("x3"));
            snapshot(&k_again.mnt)
        };
        {
            let ours_on_k = self.mount_layerfs(&ku, &lw2, &self.s.path("x2"));
            assert_same_tree(
                "layerfs on the kernel's upper",
                &kernel_view,
                &snapshot(&ours_on_k.mnt),
            );
        }
    }

    /// The directory every layer and mount of this pair lives in.
    pub fn scratch_root(&self) -> PathBuf {
        self.s.path("")
    }

    /// layerfs's upper.
    pub fn upper(&self) -> PathBuf {
        self.layerfs_dirs().0
    }
}
