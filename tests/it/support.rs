//! Test support: skip reasons, real mounts that always unmount on drop, layer builders, and
//! an fd-based snapshot of a mounted tree (works for paths far beyond PATH_MAX).

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{CString, OsStr, OsString};
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use layerfs::sys;
use sha2::{Digest, Sha256};

pub const BIN: &str = env!("CARGO_BIN_EXE_layerfs");

/// Why mount tests can't run here, if they can't.
pub fn skip_reason() -> Option<String> {
    static R: OnceLock<Option<String>> = OnceLock::new();
    R.get_or_init(|| {
        if sys::geteuid() != 0 {
            return Some("needs root (mounts FUSE and kernel overlayfs)".into());
        }
        if std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/fuse")
            .is_err()
        {
            return Some("/dev/fuse is missing or unusable".into());
        }
        None
    })
    .clone()
}

/// Skip (with a printed reason) where FUSE/root is missing.
#[macro_export]
macro_rules! require_fuse {
    () => {
        if let Some(r) = $crate::support::skip_reason() {
            eprintln!("SKIPPED {}: {}", module_path!(), r);
            return;
        }
    };
}

/// Is program `prog` on the PATH?
pub fn have(prog: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {prog}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Run a command with a deadline; returns (status ok, stdout, stderr).
pub fn run_timeout(cmd: &mut Command, secs: u64) -> (bool, String, String) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().expect("wait") {
            let mut out = String::new();
            let mut err = String::new();
            child.stdout.take().unwrap().read_to_string(&mut out).ok();
            child.stderr.take().unwrap().read_to_string(&mut err).ok();
            return (st.success(), out, err);
        }
        if start.elapsed() > Duration::from_secs(secs) {
            let _ = child.kill();
            let _ = child.wait();
            return (false, String::new(), format!("timed out after {secs}s"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn unmount(p: &Path) {
    // A lazily detached overlay keeps its upper in use until its last user goes, and the
    // kernel then refuses another mount of that upper (index=on): wait a while first.
    for _ in 0..250 {
        if !sys::is_mountpoint(p) {
            return;
        }
        if sys::umount(p, false).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!(
        "unmount: {} still busy after 5 s, detaching it lazily",
        p.display()
    );
    let _ = sys::umount(p, true);
}

/// A layerfs mount, unmounted on drop.
pub struct Layerfs {
    pub mnt: PathBuf,
}

impl Layerfs {
    pub fn mount(opts: &str, mnt: &Path) -> Layerfs {
        Self::try_mount(opts, mnt).unwrap_or_else(|e| panic!("layerfs mount failed: {e}"))
    }

    pub fn try_mount(opts: &str, mnt: &Path) -> Result<Layerfs, String> {
        Self::try_mount_logged(
            opts,
            mnt,
            std::env::var_os("LAYERFS_TEST_LOG")
                .map(PathBuf::from)
                .as_deref(),
        )
    }

    /// Mount with the daemon's log (with backtraces on) going to `log`.
    pub fn try_mount_logged(opts: &str, mnt: &Path, log: Option<&Path>) -> Result<Layerfs, String> {
        Self::try_mount_env(opts, mnt, log, &[])
    }

    /// Mount with `env` added to the daemon's environment.
    pub fn mount_env(opts: &str, mnt: &Path, env: &[(&str, &str)]) -> Layerfs {
        let log = std::env::var_os("LAYERFS_TEST_LOG").map(PathBuf::from);
        Self::try_mount_env(opts, mnt, log.as_deref(), env)
            .unwrap_or_else(|e| panic!("layerfs mount failed: {e}"))
    }

    fn try_mount_env(
        opts: &str,
        mnt: &Path,
        log: Option<&Path>,
        env: &[(&str, &str)],
    ) -> Result<Layerfs, String> {
        std::fs::create_dir_all(mnt).unwrap();
        let mut c = Command::new(BIN);
        c.arg("mount")
            .arg("-o")
            .arg(opts)
            .arg(mnt)
            .env("RUST_BACKTRACE", "1")
            .envs(env.iter().copied());
        if let Some(l) = log {
            c.arg("--log-file").arg(l);
        }
        let (ok, _out, err) = run_timeout(&mut c, 30);
        if ok {
            Ok(Layerfs {
                mnt: mnt.to_path_buf(),
            })
        } else {
            Err(err.trim().to_string())
        }
    }

    pub fn unmount(self) {}
}

impl Drop for Layerfs {
    fn drop(&mut self) {
        let daemon = daemon_pid(&self.mnt);
        unmount(&self.mnt);
        // Gone before anything mounts on this path again, which `daemon_pid` must not
        // mistake for the exiting one (its kill would miss the new daemon).
        if let Some(pid) = daemon {
            wait_until(10, || exited(pid));
        }
    }
}

/// A child process killed and reaped on drop, whatever happens to the test.
pub struct Reaped(pub std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// kill -9 the daemon serving `mnt`, then detach its dead mount.
pub fn kill_daemon(mnt: &Path) {
    let pid = daemon_pid(mnt).expect("daemon running");
    run_timeout(Command::new("kill").args(["-KILL", &pid.to_string()]), 10);
    assert!(wait_until(10, || daemon_pid(mnt).is_none()), "daemon died");
    let _ = sys::umount(mnt, true);
}

/// Process `pid` is gone, or a zombie with no thread left. A leader that exits before its
/// other threads already reads as a zombie while they finish (one in a slow syscall, or at
/// SCHED_IDLE on a busy machine), and the process holds its fds, and so its flock on the
/// upper and work dirs, until the last one has gone.
pub fn exited(pid: i32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
        || (std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z "))
            && std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |d| d.count()) <= 1)
}

/// A kernel overlayfs mount (the oracle), unmounted on drop.
pub struct Kernel {
    pub mnt: PathBuf,
}

impl Kernel {
    pub fn mount(opts: &str, mnt: &Path) -> Kernel {
        Self::try_mount(opts, mnt)
            .unwrap_or_else(|e| panic!("kernel overlay mount failed ({opts}): {e}"))
    }

    /// The mount, or mount(8)'s complaint (for what the kernel refuses).
    pub fn try_mount(opts: &str, mnt: &Path) -> Result<Kernel, String> {
        std::fs::create_dir_all(mnt).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let (ok, _o, err) = run_timeout(
                Command::new("mount")
                    .args(["-t", "overlay", "overlay", "-o", opts])
                    .arg(mnt),
                30,
            );
            if ok {
                return Ok(Kernel {
                    mnt: mnt.to_path_buf(),
                });
            }
            // An upper still held by a mount of it that is going away (its last file being
            // closed) is "busy" for a moment (EBUSY, which mount(8) words "already mounted on"
            // when some other overlay is mounted, as under a parallel test run); anything else
            // is the kernel's answer.
            let busy = err.contains("busy") || err.contains("already mounted");
            if !busy || std::time::Instant::now() > deadline {
                return Err(err.trim().to_string());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Kernel {
    fn drop(&mut self) {
        unmount(&self.mnt);
    }
}

/// One mount of the same options on the kernel (with `redirect_dir=on`, the reference) or
/// on layerfs, for tests that run one sequence on both; unmounted on drop.
pub enum Either {
    Kernel(Kernel),
    Layerfs(Layerfs),
}

impl Either {
    pub fn mount(kernel: bool, opts: &str, mnt: &Path) -> Either {
        if kernel {
            Either::Kernel(Kernel::mount(&format!("{opts},redirect_dir=on"), mnt))
        } else {
            Either::Layerfs(Layerfs::mount(opts, mnt))
        }
    }
}

/// A tmpfs mounted for a test's layers, unmounted (lazily) on drop.
pub struct TmpfsMount(pub PathBuf);

impl TmpfsMount {
    /// Mount a tmpfs with `opts` (`size=8m`, ...) at the directory `at`.
    pub fn mount(at: PathBuf, opts: &str) -> TmpfsMount {
        let (ok, _o, err) = run_timeout(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o", opts, "tmpfs"])
                .arg(&at),
            10,
        );
        assert!(ok, "tmpfs at {}: {err}", at.display());
        TmpfsMount(at)
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let _ = layerfs::sys::umount(&self.0, true);
    }
}

/// A small filesystem of its own on a loop device (a journaled ext4 unless said otherwise),
/// unmounted (its loop device freed) on drop. The root filesystem here has no journal, and
/// an ext4 without one hands out no inode number freed in the last minute or more; with a
/// journal a freed number is reused at once.
pub struct Disk {
    pub mnt: PathBuf,
    img: PathBuf,
    fstype: String,
}

impl Disk {
    /// A journaled ext4; None, with the reason printed, where it cannot be made.
    pub fn new(s: &Scratch, name: &str) -> Option<Disk> {
        Self::made_with(s, name, "ext4", &[])
    }

    /// A `fstype` filesystem (ext4, xfs, btrfs) made with further mkfs arguments `mkfs`;
    /// None, with the reason printed, where it cannot be made.
    pub fn made_with(s: &Scratch, name: &str, fstype: &str, mkfs: &[&str]) -> Option<Disk> {
        if !have(&format!("mkfs.{fstype}")) {
            eprintln!("skipped: no mkfs.{fstype} here");
            return None;
        }
        let img = s.path(&format!("{name}.img"));
        let mnt = s.mkdir(name);
        // The image is sparse: only what is written takes room. xfs wants 300 MiB at least.
        let size: u64 = if fstype == "ext4" {
            64 << 20
        } else {
            512 << 20
        };
        let made = std::fs::File::create(&img).and_then(|f| f.set_len(size));
        if let Err(e) = made {
            eprintln!("skipped: no image file for an {fstype} disk: {e}");
            return None;
        }
        let force = if fstype == "ext4" { "-F" } else { "-f" };
        let (ok, _o, err) = run_timeout(
            Command::new(format!("mkfs.{fstype}"))
                .args(["-q", force])
                .args(mkfs)
                .arg(&img),
            30,
        );
        if !ok {
            eprintln!("skipped: mkfs.{fstype} failed: {}", err.trim());
            return None;
        }
        let (ok, _o, err) = run_timeout(
            Command::new("mount")
                .args(["-o", "loop"])
                .arg(&img)
                .arg(&mnt),
            30,
        );
        if !ok {
            eprintln!(
                "skipped: no loop mount of an {fstype} image: {}",
                err.trim()
            );
            return None;
        }
        Some(Disk {
            mnt,
            img,
            fstype: fstype.to_string(),
        })
    }

    /// Make everything written so far survive a power cut, as any fsync does: it commits
    /// the journal (a file's own data only if it is that file's fsync).
    pub fn commit_journal(&self) {
        let f = std::fs::File::create(self.mnt.join(".commit-point")).unwrap();
        f.sync_all().unwrap();
    }

    /// Cut the power: from here on nothing reaches the disk, not even journal transactions
    /// committed in memory. Whatever holds files on it must be gone before `power_on`.
    pub fn cut_power(&self) {
        let d = std::fs::File::open(&self.mnt).unwrap();
        sys::shutdown_fs(d.as_fd()).expect("EXT4_IOC_SHUTDOWN");
    }

    /// Mount the disk again: the journal is replayed and what was on the disk at the cut
    /// is what there is. It is mounted from a copy of the image: a mount namespace made
    /// while the disk was mounted (runc, podman and unshare in tests run alongside) keeps
    /// the shut-down filesystem and its loop device alive, and mount(8) would reuse that
    /// device and so get the dead filesystem back.
    pub fn power_on(&mut self) {
        unmount(&self.mnt);
        let img = self.img.with_extension("on.img");
        let (ok, _o, err) = run_timeout(
            Command::new("cp")
                .arg("--sparse=always")
                .arg(&self.img)
                .arg(&img),
            30,
        );
        assert!(ok, "copying the disk image: {}", err.trim());
        // xfs refuses a second mount of one UUID while the dead one lives on elsewhere.
        let opts = if self.fstype == "xfs" {
            "loop,nouuid"
        } else {
            "loop"
        };
        let (ok, _o, err) = run_timeout(
            Command::new("mount")
                .args(["-o", opts])
                .arg(&img)
                .arg(&self.mnt),
            30,
        );
        assert!(ok, "mounting the disk again: {}", err.trim());
        self.img = img;
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        unmount(&self.mnt);
    }
}

/// A scratch area with a layers/ dir and helpers to fill layers.
pub struct Scratch {
    pub dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new() -> Scratch {
        Scratch::new_in(Path::new("/tmp"))
    }

    /// A scratch area in directory `parent` (say, a `Disk` of another filesystem type).
    pub fn new_in(parent: &Path) -> Scratch {
        let mut dir = tempfile::Builder::new()
            .prefix("layerfs-it")
            .tempdir_in(parent)
            .unwrap();
        // For debugging a failure: keep the layers (the path is printed).
        if std::env::var_os("LAYERFS_KEEP_SCRATCH").is_some() {
            dir.disable_cleanup(true);
            eprintln!("scratch kept: {}", dir.path().display());
        }
        Scratch { dir }
    }
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
    /// Make dirs and return the path.
    pub fn mkdir(&self, rel: &str) -> PathBuf {
        let p = self.path(rel);
        std::fs::create_dir_all(&p).unwrap();
        p
    }
}

pub fn write(p: impl AsRef<Path>, content: &[u8]) {
    let p = p.as_ref();
    if let Some(d) = p.parent() {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(p, content).unwrap();
}

pub fn chmod(p: impl AsRef<Path>, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A kernel-format whiteout (char device 0/0).
pub fn whiteout(p: impl AsRef<Path>) {
    let p = p.as_ref();
    let dir = sys::open_dir_path(p.parent().unwrap()).unwrap();
    sys::mknodat(dir.as_fd(), p.file_name().unwrap(), libc::S_IFCHR, 0).unwrap();
}

pub fn mkfifo(p: impl AsRef<Path>) {
    let p = p.as_ref();
    let dir = sys::open_dir_path(p.parent().unwrap()).unwrap();
    sys::mknodat(
        dir.as_fd(),
        p.file_name().unwrap(),
        libc::S_IFIFO | 0o644,
        0,
    )
    .unwrap();
}

pub fn set_xattr(p: impl AsRef<Path>, name: &str, value: &[u8]) {
    let c = CString::new(p.as_ref().as_os_str().as_bytes()).unwrap();
    let n = CString::new(name).unwrap();
    // Test helper over a plain path: lsetxattr through the sys wrapper's /proc path is not
    // needed here, the path is short.
    let dir = sys::open_dir_path(p.as_ref().parent().unwrap()).unwrap();
    sys::setxattr(
        sys::XTarget::At(dir.as_fd(), p.as_ref().file_name().unwrap()),
        &n,
        value,
        0,
    )
    .unwrap_or_else(|e| panic!("setxattr {name} on {c:?}: {e}"));
}

pub fn get_xattr(p: impl AsRef<Path>, name: &str) -> Option<Vec<u8>> {
    let dir = sys::open_dir_path(p.as_ref().parent().unwrap()).unwrap();
    let n = CString::new(name).unwrap();
    sys::getxattr(
        sys::XTarget::At(dir.as_fd(), p.as_ref().file_name().unwrap()),
        &n,
    )
    .unwrap()
}

/// What a tree comparison looks at for one entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    pub kind: char,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: Option<i64>,
    pub nlink: u64,
    pub target: Option<OsString>,
    pub hash: Option<String>,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl Info {
    /// An entry whose stat fails with `errno` (kind 'E', the errno as its mode).
    fn failed(errno: i32) -> Info {
        Info {
            kind: 'E',
            mode: errno as u32,
            ..Info::ghost()
        }
    }

    fn ghost() -> Info {
        Info {
            kind: 'W',
            mode: 0,
            uid: 0,
            gid: 0,
            size: None,
            nlink: 0,
            target: None,
            hash: None,
            xattrs: BTreeMap::new(),
        }
    }
}

pub type Tree = BTreeMap<Vec<u8>, Info>;

fn kind_char(mode: u32) -> char {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => 'd',
        libc::S_IFREG => 'f',
        libc::S_IFLNK => 'l',
        libc::S_IFIFO => 'p',
        libc::S_IFSOCK => 's',
        libc::S_IFCHR => 'c',
        libc::S_IFBLK => 'b',
        _ => '?',
    }
}

/// Walk a mounted tree by fds (no PATH_MAX limit) and record every entry.
pub fn snapshot(root: &Path) -> Tree {
    let mut out = Tree::new();
    let rootfd = sys::open_dir_path(root).unwrap();
    let mut stack: Vec<(std::sync::Arc<OwnedFd>, Vec<u8>)> =
        vec![(std::sync::Arc::new(rootfd), Vec::new())];
    while let Some((dfd, prefix)) = stack.pop() {
        let rfd = sys::openat(
            dfd.as_fd(),
            OsStr::new("."),
            libc::O_RDONLY | libc::O_DIRECTORY,
            0,
        )
        .unwrap_or_else(|e| panic!("open dir {:?}: {e}", String::from_utf8_lossy(&prefix)));
        for e in sys::read_dir_fd(rfd.as_fd()).unwrap_or_else(|e| {
            panic!(
                "list dir {:?} of {}: {e}",
                String::from_utf8_lossy(&prefix),
                root.display()
            )
        }) {
            let mut path = prefix.clone();
            if !path.is_empty() {
                path.push(b'/');
            }
            path.extend_from_slice(e.name.as_bytes());
            let st = match sys::statat(dfd.as_fd(), &e.name) {
                Ok(st) => st,
                // Listed but not there: kernel overlayfs lists whiteouts of a directory that
                // merges with nothing below. Recorded as a ghost ('W'), an expected difference.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                    out.insert(path, Info::ghost());
                    continue;
                }
                // Listed but unreadable as the kernel makes it: a metadata-only copy whose
                // data is missing (EIO), not followed (EPERM), or whose redirect's `..` a
                // walk refuses (EACCES). Both mounts must agree.
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EIO | libc::EPERM | libc::EACCES)
                    ) =>
                {
                    out.insert(path, Info::failed(e.raw_os_error().unwrap_or(0)));
                    continue;
                }
                Err(e) => panic!("stat {:?}: {e}", String::from_utf8_lossy(&path)),
            };
            let kind = kind_char(st.st_mode);
            let mut info = Info {
                kind,
                mode: st.st_mode & 0o7777,
                uid: st.st_uid,
                gid: st.st_gid,
                size: None,
                nlink: st.st_nlink as u64,
                target: None,
                hash: None,
                xattrs: BTreeMap::new(),
            };
            match kind {
                'f' => {
                    info.size = Some(st.st_size);
                    let fd = match open_again_on_eagain(dfd.as_fd(), &e.name, &path, root) {
                        Ok(fd) => fd,
                        // A metadata-only copy whose data a data-only layer was to hold: the
                        // open looks it up, and fails as the lookup did; or whose data fails
                        // its fs-verity check (EIO). Both mounts must agree.
                        Err(err)
                            if matches!(
                                err.raw_os_error(),
                                Some(
                                    libc::ENOENT
                                        | libc::ENOTDIR
                                        | libc::ELOOP
                                        | libc::EXDEV
                                        | libc::EIO
                                )
                            ) =>
                        {
                            out.insert(path, Info::failed(err.raw_os_error().unwrap_or(0)));
                            continue;
                        }
                        Err(err) => {
                            let now = sys::statat(dfd.as_fd(), &e.name).map(|s| s.st_mode);
                            panic!(
                                "open {:?} under {}: {err} (stat said mode {:o}, now {now:?})",
                                String::from_utf8_lossy(&path),
                                root.display(),
                                st.st_mode
                            )
                        }
                    };
                    let mut f = std::fs::File::from(fd);
                    let mut h = Sha256::new();
                    let mut buf = vec![0u8; 1 << 16];
                    loop {
                        let n = f.read(&mut buf).unwrap();
                        if n == 0 {
                            break;
                        }
                        h.update(&buf[..n]);
                    }
                    info.hash = Some(h.finalize().iter().map(|b| format!("{b:02x}")).collect());
                }
                'l' => {
                    info.target = Some(sys::readlinkat(dfd.as_fd(), &e.name).unwrap());
                    info.size = Some(st.st_size);
                }
                _ => {}
            }
            if kind != 'l' {
                let t = sys::XTarget::At(dfd.as_fd(), &e.name);
                for n in sys::listxattr(t).unwrap_or_default() {
                    if n.starts_with(b"user.") {
                        let c = CString::new(n.clone()).unwrap();
                        if let Ok(Some(v)) = sys::getxattr(t, &c) {
                            info.xattrs.insert(n, v);
                        }
                    }
                }
            }
            if kind == 'd' {
                let sub =
                    sys::openat(dfd.as_fd(), &e.name, libc::O_PATH | libc::O_DIRECTORY, 0).unwrap();
                stack.push((std::sync::Arc::new(sub), path.clone()));
            }
            out.insert(path, info);
        }
    }
    out
}

/// A difference docs/SEMANTICS.md lists as deliberate, about lower hard links (kernel
/// overlayfs with index=on, the oracle, accounts them through its index; layerfs links the
/// names it has seen up beside the copy): the nlink of a directory that directly holds a hard
/// link, as linking a name up copies its directory up, which makes it a merged directory
/// (nlink 1) before the kernel's would be. (Until session 20 a file's count could be higher
/// too: a name unlinked before any was written stayed counted. Like the kernel, layerfs now
/// copies such a file up into the index before the name goes.)
///
/// Everything else about the entry (type, content, mode, owner...) must still match.
/// `linked` names directories of our upper layer that hold a linked-up hard link (its
/// `overlay.nlink` xattr says so), or an ancestor of one: they are merged where the kernel's
/// are not (the kernel copies up only the name written).
fn expected_difference(
    path: &[u8],
    kernel: &Info,
    ours: &Info,
    kernel_tree: &Tree,
    linked: &BTreeSet<Vec<u8>>,
) -> bool {
    let only_nlink = {
        let mut k = kernel.clone();
        k.nlink = ours.nlink;
        &k == ours
    };
    if !only_nlink {
        return false;
    }
    match kernel.kind {
        'd' if ours.nlink == 1 && linked.contains(path) => true,
        'd' if ours.nlink == 1 => {
            let mut prefix = path.to_vec();
            prefix.push(b'/');
            kernel_tree
                .range(prefix.clone()..)
                .take_while(|(k, _)| k.starts_with(&prefix))
                .any(|(k, v)| !k[prefix.len()..].contains(&b'/') && v.kind == 'f' && v.nlink > 1)
        }
        _ => false,
    }
}

/// Directories (relative paths) of upper layer `upper` that hold, directly or further down,
/// a file carrying an `overlay.nlink` xattr: a lower hard link that layerfs linked up beside
/// its copy (which copies up its directory and the directory's ancestors).
pub fn linked_up_dirs(upper: &Path) -> BTreeSet<Vec<u8>> {
    let mut out = BTreeSet::new();
    let mut todo = vec![upper.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            match e.file_type() {
                Ok(t) if t.is_dir() => todo.push(p),
                Ok(t) if t.is_file() => {
                    let linked = ["trusted.overlay.nlink", "user.overlay.nlink"]
                        .iter()
                        .any(|x| get_xattr(&p, x).is_some());
                    // Its directory and every ancestor were copied up to hold it.
                    if linked && let Ok(rel) = d.strip_prefix(upper) {
                        for a in rel.ancestors() {
                            out.insert(a.as_os_str().as_bytes().to_vec());
                        }
                    }
                }
                _ => {}
            }
        }
    }
    out
}

/// Assert two trees are equal, listing the differences readably.
pub fn assert_same_tree(what: &str, expected: &Tree, actual: &Tree) {
    assert_same_tree_linked(what, expected, actual, &BTreeSet::new(), false);
}

/// `assert_same_tree`, also accepting the nlink of directories in `linked` (see
/// `linked_up_dirs`).
///
/// With `crossed` (each mount has run over the other's upper), the link-count differences
/// are accepted either way round: the kernel then reads counts layerfs wrote, and the reverse.
pub fn assert_same_tree_linked(
    what: &str,
    expected: &Tree,
    actual: &Tree,
    linked: &BTreeSet<Vec<u8>>,
    crossed: bool,
) {
    let mut diffs = Vec::new();
    for (k, v) in expected {
        match actual.get(k) {
            // Expected difference (docs/SEMANTICS.md): layerfs never lists a whiteout.
            None if v.kind == 'W' => {}
            None => diffs.push(format!("missing: {}", String::from_utf8_lossy(k))),
            Some(a)
                if a != v
                    && !expected_difference(k, v, a, expected, linked)
                    && !(crossed && expected_difference(k, a, v, actual, linked)) =>
            {
                diffs.push(format!(
                    "differs: {}\n   expected {v:?}\n   actual   {a:?}",
                    String::from_utf8_lossy(k)
                ))
            }
            _ => {}
        }
    }
    for (k, a) in actual {
        // A ghost in a kernel's listing that the expected tree lacks: whether the kernel
        // lists an xattr whiteout depends on which opaque=x directories of that layer it has
        // looked up before (ovl_layer_set_xwhiteouts), so a fresh mount may list one where
        // the tree it is compared with, from a mount with more history, does not. Likewise
        // a file whose lookup fails ('E'), in a directory marked opaque=x by another layer:
        // the kernel hides it once any opaque=x directory of the file's own layer has been
        // looked up; layerfs checks only the files of the layer so marked (data-only soak,
        // seed 1120733).
        if !expected.contains_key(k) && a.kind != 'W' && a.kind != 'E' {
            diffs.push(format!("extra: {}", String::from_utf8_lossy(k)));
        }
    }
    if !diffs.is_empty() {
        diffs.truncate(40);
        panic!("{what}: trees differ:\n{}", diffs.join("\n"));
    }
}

/// Every path under `root` (symlinks not followed) with its st_ino, and whether it is a
/// directory.
pub fn inode_map(root: &Path) -> BTreeMap<Vec<u8>, (u64, bool)> {
    use std::os::unix::fs::MetadataExt;
    let mut out = BTreeMap::new();
    let mut todo = vec![PathBuf::new()];
    while let Some(rel) = todo.pop() {
        for e in std::fs::read_dir(root.join(&rel)).unwrap() {
            let e = e.unwrap();
            let p = rel.join(e.file_name());
            // The kernel lists a whiteout that merges with nothing below (a "ghost").
            let Ok(st) = std::fs::symlink_metadata(root.join(&p)) else {
                continue;
            };
            if st.is_dir() {
                todo.push(p.clone());
            }
            out.insert(p.as_os_str().as_bytes().to_vec(), (st.ino(), st.is_dir()));
        }
    }
    out
}

/// The st_ino of each path in `expected` that `keep` selects is the same in `actual`.
pub fn assert_same_inos(
    what: &str,
    expected: &BTreeMap<Vec<u8>, (u64, bool)>,
    actual: &BTreeMap<Vec<u8>, (u64, bool)>,
    keep: impl Fn(&[u8], bool) -> bool,
) {
    let diffs: Vec<String> = expected
        .iter()
        .filter(|(k, (_, dir))| keep(k, *dir))
        .filter(|(k, v)| actual.get(*k).is_some_and(|a| a.0 != v.0))
        .map(|(k, v)| {
            format!(
                "{}: st_ino {} -> {}",
                String::from_utf8_lossy(k),
                v.0,
                actual[k].0
            )
        })
        .take(20)
        .collect();
    assert!(
        diffs.is_empty(),
        "{what}: inode numbers differ:\n{}",
        diffs.join("\n")
    );
}

pub fn names(tree: &Tree) -> Vec<String> {
    tree.keys()
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .collect()
}

pub fn os(s: &[u8]) -> OsString {
    OsString::from_vec(s.to_vec())
}

/// lowerdir= value for a list of paths, colons escaped.
pub fn lowerdir(ls: &[PathBuf]) -> String {
    ls.iter()
        .map(|p| p.to_string_lossy().replace(':', "\\:"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The pid of the layerfs daemon serving `mnt` (found through /proc).
pub fn daemon_pid(mnt: &Path) -> Option<i32> {
    let want = mnt.as_os_str().as_bytes();
    for e in std::fs::read_dir("/proc").ok()? {
        let e = e.ok()?;
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmd.split(|&b| b == 0).collect();
        // The daemon is the forked `layerfs-daemon` (or, re-executed, `layerfs ... -f`).
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        let daemon = comm.trim() == "layerfs-daemon" || args.iter().any(|a| *a == b"-f");
        if args.first().is_some_and(|a| a.ends_with(b"layerfs")) && daemon && args.contains(&want) {
            return Some(pid);
        }
    }
    None
}

/// Wait (bounded) until `cond` holds.
pub fn wait_until(secs: u64, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(secs) {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// A directory's names, sorted.
pub fn listing(dir: &Path) -> Vec<std::ffi::OsString> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    v.sort();
    v
}

/// Mount options for one lower layer with an upper and a workdir.
pub fn rw_opts(lower: &Path, upper: &Path, work: &Path) -> String {
    format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        work.display()
    )
}

/// Run layerfs with args; returns (success, stderr).
pub fn layerfs(args: &[&str]) -> (bool, String) {
    let (ok, _out, err) = run_timeout(Command::new(BIN).args(args), 30);
    (ok, err)
}

/// `layerfs args...` fails with one line naming `needle` (no panic, no backtrace).
pub fn assert_one_line_error(args: &[&str], needle: &str) {
    let (ok, err) = layerfs(args);
    assert!(!ok, "{args:?} should fail");
    let err = err.trim();
    assert_eq!(err.lines().count(), 1, "one line, got: {err}");
    assert!(err.starts_with("layerfs: "), "{err}");
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
    assert!(err.contains(needle), "expected {needle:?} in: {err}");
}

/// A file or dir in tests/fixtures.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// Run `layerfs --root ROOT args...`: (ok, stdout, stderr).
pub fn lfs(root: &Path, args: &[&str]) -> (bool, String, String) {
    run_timeout(Command::new(BIN).arg("--root").arg(root).args(args), 120)
}

/// `layerfs ARGS PATH` printing JSON, parsed.
pub fn json_of(args: &[&str], p: &Path) -> serde_json::Value {
    let (ok, out, err) = run_timeout(Command::new(BIN).args(args).arg(p), 30);
    assert!(ok, "layerfs {args:?} {}: {err}", p.display());
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// The counters of the mount at `mnt` (`layerfs stats --format json`).
pub fn stats(mnt: &Path) -> serde_json::Value {
    json_of(&["stats", "--format", "json"], mnt)
}

/// The engine alone over lower layer `low`, with an upper and a workdir (so an index), for
/// orders of requests a mount cannot force; and its upper dir.
/// Requests to the engine made as root, with no umask.
pub fn root_caller() -> layerfs::union::write::Caller {
    layerfs::union::write::Caller {
        uid: 0,
        gid: 0,
        umask: 0,
    }
}

pub fn engine(s: &Scratch, low: PathBuf) -> (layerfs::union::Union, PathBuf) {
    let (up, work) = (s.mkdir("up"), s.mkdir("work"));
    (engine_over(low, up.clone(), work), up)
}

/// The engine over existing layers (no fsync: volatile).
pub fn engine_over(low: PathBuf, up: PathBuf, work: PathBuf) -> layerfs::union::Union {
    layerfs::union::Union::new(layerfs::union::Config {
        upper: Some(up),
        work: Some(work),
        lowers: vec![low],
        data_lowers: Vec::new(),
        fsync: false,
        metacopy: false,
        marker_ns: layerfs::union::format::MarkerNs::Trusted,
        ids: Default::default(),
        catalog: None,
        verity: Default::default(),
    })
    .unwrap()
}

/// Open a file for a snapshot. The kernel's overlayfs answers EAGAIN, now and then, to an
/// open of a metadata-only file whose data-only redirect holds a ".." (its scoped lookup
/// gives up when a rename or mount anywhere came in between: see `ops::apply_kernel`;
/// session 32's metacopy soaks, session 33's CI, seed 100002); no open of layerfs's has.
/// Such an open is tried again, a few times, and said.
fn open_again_on_eagain(
    dir: std::os::fd::BorrowedFd<'_>,
    name: &std::ffi::OsStr,
    path: &[u8],
    root: &Path,
) -> std::io::Result<std::os::fd::OwnedFd> {
    let mut tries = 0;
    loop {
        match sys::openat(dir, name, libc::O_RDONLY, 0) {
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && tries < 5 => {
                tries += 1;
                eprintln!(
                    "open {:?} under {}: EAGAIN, again ({tries})",
                    String::from_utf8_lossy(path),
                    root.display()
                );
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            r => return r,
        }
    }
}
