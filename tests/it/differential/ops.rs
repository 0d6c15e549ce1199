//! Operations applied in lockstep to kernel overlayfs and layerfs, each reduced to a comparable
//! outcome string (the value, or the errno).

use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use layerfs::sys;
use sha2::{Digest, Sha256};

use super::generate::{self, Rng};

#[derive(Debug, Clone)]
pub enum Op {
    /// open with flags, then pwrite `len` bytes of `byte` at `off` (if writable).
    Write {
        path: PathBuf,
        flags: i32,
        off: u64,
        len: usize,
        byte: u8,
    },
    Truncate {
        path: PathBuf,
        size: u64,
    },
    Punch {
        path: PathBuf,
        off: u64,
        len: u64,
    },
    Unlink {
        path: PathBuf,
    },
    Rmdir {
        path: PathBuf,
    },
    Mkdir {
        path: PathBuf,
        mode: u32,
    },
    Rename {
        from: PathBuf,
        to: PathBuf,
        flags: u32,
    },
    Link {
        from: PathBuf,
        to: PathBuf,
    },
    Symlink {
        target: String,
        path: PathBuf,
    },
    Mkfifo {
        path: PathBuf,
    },
    Chmod {
        path: PathBuf,
        mode: u32,
    },
    Chown {
        path: PathBuf,
        uid: u32,
        gid: u32,
    },
    Utimes {
        path: PathBuf,
        secs: i64,
    },
    SetXattr {
        path: PathBuf,
        value: u8,
    },
    RemoveXattr {
        path: PathBuf,
    },
    /// Keep an fd open in `slot`: read-only (reads from it later see copy-ups), or
    /// read-write (the open copies the file up, on both sides).
    OpenKeep {
        slot: usize,
        path: PathBuf,
        write: bool,
    },
    ReadKept {
        slot: usize,
    },
    /// An operation through a kept fd, whatever became of its name since (renamed over,
    /// unlinked, linked, copied up through another name).
    OnKept {
        slot: usize,
        what: KeptOp,
    },
    ListDir {
        path: PathBuf,
    },
    /// open(dir, O_TMPFILE), write `len` bytes, then name it `link` (if any) through
    /// linkat of its /proc fd.
    Tmpfile {
        dir: PathBuf,
        len: usize,
        link: Option<PathBuf>,
    },
    Check,
    /// Unmount both (kept fds closed first) and mount them again; later operations run on
    /// what each read back from disk. With `kill`, the layerfs daemon is killed (-9) rather
    /// than unmounted; with `swap`, each comes up over the other's upper and workdir.
    Remount {
        kill: bool,
        swap: bool,
    },
}

/// What `Op::OnKept` does through its fd.
#[derive(Debug, Clone)]
pub enum KeptOp {
    Write {
        off: u64,
        len: usize,
        byte: u8,
    },
    Truncate {
        size: u64,
    },
    Chmod {
        mode: u32,
    },
    SetXattr {
        value: u8,
    },
    /// fstat: size, mode and owner (link counts have their documented differences).
    Stat,
    Fallocate {
        off: u64,
        len: u64,
        keep_size: bool,
    },
    /// copy_file_range from the fd kept in slot `src`, at the same offset (a read-write one:
    /// see `apply`).
    CopyFrom {
        src: usize,
        off: u64,
        len: usize,
    },
}

pub const SLOTS: usize = 4;

/// One side of the lockstep run: a mount root and the fds kept open on it.
pub struct Side {
    pub root: PathBuf,
    pub fds: Vec<Option<File>>,
    /// What each kept fd read when it was opened (a `ReadKept` result).
    pub at_open: Vec<Option<String>>,
    /// Whether each kept fd was opened for writing.
    pub writable: Vec<bool>,
    /// Whether each kept fd is a directory's: only fstat runs on it (a removed directory
    /// still held answers as itself; a change to a removed lower one is a documented
    /// difference, docs/SEMANTICS.md).
    pub dir: Vec<bool>,
}

impl Side {
    pub fn new(root: &Path) -> Side {
        Side {
            root: root.to_path_buf(),
            fds: (0..SLOTS).map(|_| None).collect(),
            at_open: (0..SLOTS).map(|_| None).collect(),
            writable: vec![false; SLOTS],
            dir: vec![false; SLOTS],
        }
    }

    /// Expected difference: a reader open on a lower file before a copy-up keeps reading
    /// the lower data under passthrough (the kernel switches it to the copy), so a kept fd
    /// may read what it read when opened, and its fstat may be stale (its kernel inode is no
    /// longer the file's: it shows the file as it was when that inode was last refreshed, at
    /// the copy-up or by a change made through it; seed 1390058). A writable fd is on the
    /// copy it made, on both.
    pub fn kept_as_opened(&self, op: &Op, out: &str) -> bool {
        match op {
            Op::ReadKept { slot } => {
                !self.writable[*slot] && self.at_open[*slot].as_deref() == Some(out)
            }
            Op::OnKept {
                slot,
                what: KeptOp::Stat,
            } => !self.writable[*slot] && !self.dir[*slot] && out.starts_with("ok:"),
            _ => false,
        }
    }
}

/// Open for writing without blocking: the path may be a FIFO by now (opening one for
/// writing would wait for a reader forever; this way both sides get ENXIO).
fn write_nonblocking(p: &std::path::Path) -> std::io::Result<File> {
    OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(p)
}

fn read_kept(f: &mut File) -> String {
    let mut buf = Vec::new();
    let r =
        std::io::Seek::seek(f, std::io::SeekFrom::Start(0)).and_then(|_| f.read_to_end(&mut buf));
    res(r, |n| format!("ok:{n}:{}", hash(&buf)))
}

fn on_kept(f: &File, what: &KeptOp) -> String {
    let ok = |_| "ok".to_string();
    match what {
        KeptOp::Write { off, len, byte } => {
            res(sys::pwrite(f.as_fd(), &vec![*byte; *len], *off), |n| {
                format!("ok:{n}")
            })
        }
        KeptOp::Truncate { size } => res(f.set_len(*size), ok),
        KeptOp::Chmod { mode } => res(f.set_permissions(PermissionsExt::from_mode(*mode)), ok),
        KeptOp::SetXattr { value } => res(
            sys::setxattr(sys::XTarget::Fd(f.as_fd()), c"user.fz", &[*value], 0),
            ok,
        ),
        KeptOp::Stat => res(f.metadata(), |m| {
            format!("ok:{}:{:o}:{}:{}", m.len(), m.mode(), m.uid(), m.gid())
        }),
        KeptOp::Fallocate {
            off,
            len,
            keep_size,
        } => {
            let mode = if *keep_size {
                libc::FALLOC_FL_KEEP_SIZE
            } else {
                0
            };
            res(sys::fallocate(f.as_fd(), mode, *off, *len), ok)
        }
        KeptOp::CopyFrom { .. } => unreachable!("applied with both fds at hand"),
    }
}

fn errno(e: std::io::Error) -> String {
    format!("err:{}", e.raw_os_error().unwrap_or(-1))
}

fn res<T>(r: std::io::Result<T>, ok: impl FnOnce(T) -> String) -> String {
    match r {
        Ok(v) => ok(v),
        Err(e) => errno(e),
    }
}

fn dir_and_name(
    root: &Path,
    p: &Path,
) -> std::io::Result<(std::os::fd::OwnedFd, std::ffi::OsString)> {
    let parent = p.parent().unwrap_or(Path::new(""));
    let d = sys::open_dir_path(&root.join(parent))?;
    Ok((d, p.file_name().unwrap_or(OsStr::new(".")).to_os_string()))
}

fn hash(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .take(6)
        .map(|x| format!("{x:02x}"))
        .collect()
}

/// `apply` on the kernel's side. Its overlayfs answers EAGAIN, now and then, to an open of
/// a metadata-only file whose data-only redirect holds a "..": the lookup is scoped to the
/// layer (LOOKUP_BENEATH), and a ".." step gives up when a rename or a mount anywhere in the
/// system came in between (about 1 open in 200 beside a loop of renames, by hand). A
/// setxattr of such a file (its copy-up looks the data up) answers EOPNOTSUPP then (6 of
/// 20,000 by hand; soak seeds 2090050, 2100810). Nothing was done: the op is run again, a
/// few times, and said when that changed its answer.
pub fn apply_kernel(side: &mut Side, op: &Op) -> String {
    let gave_up = |r: &str| {
        r == "err:11"
            || (r == "err:95" && matches!(op, Op::SetXattr { .. } | Op::RemoveXattr { .. }))
    };
    let mut r = apply(side, op);
    for tries in 1..=5 {
        if !gave_up(&r) {
            break;
        }
        let first = std::mem::take(&mut r);
        std::thread::sleep(std::time::Duration::from_millis(10));
        r = apply(side, op);
        if r != first {
            eprintln!("kernel: {first} to {op:?}, then {r} (try {tries})");
        }
    }
    r
}

/// Apply `op` to one side; the outcome is what must match between the two.
pub fn apply(side: &mut Side, op: &Op) -> String {
    let root = side.root.clone();
    let at = |p: &Path| root.join(p);
    match op {
        Op::Write {
            path,
            flags,
            off,
            len,
            byte,
        } => {
            let acc = flags & libc::O_ACCMODE;
            let r = OpenOptions::new()
                .read(acc != libc::O_WRONLY)
                .write(acc != libc::O_RDONLY)
                .custom_flags((flags & !libc::O_ACCMODE) | libc::O_NONBLOCK)
                .mode(0o644)
                .open(at(path));
            res(r, |f| {
                if acc == libc::O_RDONLY {
                    return "ok:ro".into();
                }
                let data = vec![*byte; *len];
                let w = sys::pwrite(f.as_fd(), &data, *off);
                res(w, |n| {
                    format!("ok:{n}:{}", f.metadata().map(|m| m.len()).unwrap_or(0))
                })
            })
        }
        Op::Truncate { path, size } => res(
            write_nonblocking(&at(path)).and_then(|f| f.set_len(*size)),
            |_| "ok".into(),
        ),
        Op::Punch { path, off, len } => res(
            write_nonblocking(&at(path)).and_then(|f| {
                sys::fallocate(
                    f.as_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    *off,
                    *len,
                )
            }),
            |_| "ok".into(),
        ),
        Op::Unlink { path } => res(std::fs::remove_file(at(path)), |_| "ok".into()),
        Op::Rmdir { path } => res(std::fs::remove_dir(at(path)), |_| "ok".into()),
        Op::Mkdir { path, mode } => res(
            std::fs::create_dir(at(path))
                .and_then(|_| std::fs::set_permissions(at(path), PermissionsExt::from_mode(*mode))),
            |_| "ok".into(),
        ),
        Op::Rename { from, to, flags } => {
            let r = dir_and_name(&root, from).and_then(|(fd, fname)| {
                let (td, tname) = dir_and_name(&root, to)?;
                sys::renameat2(fd.as_fd(), &fname, td.as_fd(), &tname, *flags)
            });
            res(r, |_| "ok".into())
        }
        // nlink of lower hard links is an expected difference (see support::expected_difference).
        Op::Link { from, to } => res(std::fs::hard_link(at(from), at(to)), |_| "ok".into()),
        Op::Symlink { target, path } => res(symlink(target, at(path)), |_| "ok".into()),
        Op::Mkfifo { path } => res(
            dir_and_name(&root, path)
                .and_then(|(d, n)| sys::mknodat(d.as_fd(), &n, libc::S_IFIFO | 0o640, 0)),
            |_| "ok".into(),
        ),
        Op::Chmod { path, mode } => {
            let r = std::fs::symlink_metadata(at(path)).and_then(|m| {
                if m.file_type().is_symlink() {
                    Ok(())
                } else {
                    std::fs::set_permissions(at(path), PermissionsExt::from_mode(*mode))
                }
            });
            res(r, |_| "ok".into())
        }
        Op::Chown { path, uid, gid } => res(
            std::os::unix::fs::lchown(at(path), Some(*uid), Some(*gid)),
            |_| "ok".into(),
        ),
        Op::Utimes { path, secs } => {
            let r = dir_and_name(&root, path).and_then(|(d, n)| {
                sys::utimensat(
                    d.as_fd(),
                    &n,
                    Some(Some((*secs, 0))),
                    Some(Some((*secs + 7, 500))),
                )
            });
            res(r, |_| {
                let m = std::fs::symlink_metadata(at(path)).unwrap();
                format!("ok:{}:{}", m.mtime(), m.mtime_nsec())
            })
        }
        Op::SetXattr { path, value } => {
            let r = dir_and_name(&root, path).and_then(|(d, n)| {
                sys::setxattr(sys::XTarget::At(d.as_fd(), &n), c"user.fz", &[*value], 0)
            });
            res(r, |_| "ok".into())
        }
        Op::RemoveXattr { path } => {
            let r = dir_and_name(&root, path)
                .and_then(|(d, n)| sys::removexattr(sys::XTarget::At(d.as_fd(), &n), c"user.fz"));
            res(r, |_| "ok".into())
        }
        Op::OpenKeep { slot, path, write } => {
            let r = dir_and_name(&root, path).and_then(|(d, n)| {
                let st = sys::statat(d.as_fd(), &n)?;
                let dir = st.st_mode & libc::S_IFMT == libc::S_IFDIR;
                if st.st_mode & libc::S_IFMT != libc::S_IFREG && !dir {
                    return Err(std::io::Error::from_raw_os_error(libc::EBADF));
                }
                let f = OpenOptions::new()
                    .read(true)
                    .write(*write && !dir)
                    .open(at(path))?;
                Ok((f, dir))
            });
            res(r, |(mut f, dir)| {
                side.at_open[*slot] = Some(if dir { "dir".into() } else { read_kept(&mut f) });
                side.fds[*slot] = Some(f);
                side.writable[*slot] = *write && !dir;
                side.dir[*slot] = dir;
                format!("ok{}", if dir { ":dir" } else { "" })
            })
        }
        Op::ReadKept { slot } => match &mut side.fds[*slot] {
            None => "none".into(),
            Some(_) if side.dir[*slot] => "dir".into(),
            Some(f) => read_kept(f),
        },
        Op::OnKept { slot, what } => match (&side.fds[*slot], what) {
            (None, _) => "none".into(),
            // A directory's fd: its attributes (its link count only as 0 or not: a directory
            // layerfs merged earlier than the kernel counts 1 where the kernel's counts its
            // lower links, docs/SEMANTICS.md).
            (Some(f), _) if side.dir[*slot] => res(f.metadata(), |m| {
                format!(
                    "ok:dir:{:o}:{}:{}:{}",
                    m.mode(),
                    m.uid(),
                    m.gid(),
                    if m.nlink() == 0 { "removed" } else { "linked" }
                )
            }),
            // A read-only source from before a copy-up may still read the lower data under
            // passthrough (see `kept_as_opened`); what it copied would then differ.
            (Some(_), KeptOp::CopyFrom { src, .. }) if !side.writable[*src] => "ro-src".into(),
            (Some(f), KeptOp::CopyFrom { src, off, len }) => match &side.fds[*src] {
                None => "none".into(),
                Some(s) => res(
                    sys::copy_file_range(s.as_fd(), *off, f.as_fd(), *off, *len),
                    |n| format!("ok:{n}"),
                ),
            },
            (Some(f), _) => on_kept(f, what),
        },
        Op::ListDir { path } => {
            let r = std::fs::read_dir(at(path)).and_then(|rd| {
                let mut v: Vec<Vec<u8>> = rd
                    .map(|e| e.map(|e| e.file_name().as_bytes().to_vec()))
                    .collect::<Result<_, _>>()?;
                // Expected difference: kernel overlayfs lists whiteouts of a directory that
                // merges with nothing below (stat: ENOENT); layerfs never does.
                v.retain(|n| {
                    std::fs::symlink_metadata(at(path).join(OsStr::from_bytes(n))).is_ok()
                });
                v.sort();
                Ok(v)
            });
            res(r, |v| format!("ok:{}", hash(&v.concat())))
        }
        Op::Tmpfile { dir, len, link } => {
            let r = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_TMPFILE)
                .mode(0o640)
                .open(at(dir));
            res(r, |f| {
                let w = sys::pwrite(f.as_fd(), &vec![0x5a; *len], 0);
                let st = f.metadata().map(|m| (m.nlink(), m.len(), m.mode()));
                let linked = match link {
                    None => "-".into(),
                    Some(to) => res(
                        dir_and_name(&root, to)
                            .and_then(|(d, n)| sys::link_fd(f.as_fd(), d.as_fd(), &n)),
                        |_| format!("ok:{:?}", f.metadata().map(|m| m.nlink()).ok()),
                    ),
                };
                format!("ok:{:?}:{:?}:{linked}", w.ok(), st.ok())
            })
        }
        Op::Check => "check".into(),
        // Done by the runner, which owns the mounts.
        Op::Remount { .. } => "remount".into(),
    }
}

/// The visible entries of a tree (path, kind), by fd walk.
pub fn listing(root: &Path) -> Vec<(PathBuf, char)> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(root.join(&d)) else {
            continue;
        };
        for e in rd.flatten() {
            let rel = d.join(e.file_name());
            let Ok(ft) = e.file_type() else { continue };
            let k = if ft.is_dir() {
                stack.push(rel.clone());
                'd'
            } else if ft.is_file() {
                'f'
            } else if ft.is_symlink() {
                'l'
            } else {
                'o'
            };
            out.push((rel, k));
        }
    }
    out.sort();
    out
}

/// A random operation against the current tree.
pub fn random_op(r: &mut Rng, tree: &[(PathBuf, char)]) -> Op {
    let any = |r: &mut Rng| {
        r.pick(tree)
            .map(|x| x.0.clone())
            .unwrap_or_else(|| PathBuf::from("a0"))
    };
    let of = |r: &mut Rng, k: char| {
        let v: Vec<&PathBuf> = tree.iter().filter(|x| x.1 == k).map(|x| &x.0).collect();
        r.pick(&v)
            .map(|p| (*p).clone())
            .unwrap_or_else(|| PathBuf::from("nope"))
    };
    let dir = |r: &mut Rng| {
        if r.chance(30) {
            PathBuf::new()
        } else {
            of(r, 'd')
        }
    };
    let fresh = |r: &mut Rng| {
        let d = if r.chance(30) {
            PathBuf::new()
        } else {
            of(r, 'd')
        };
        d.join(generate::name(r))
    };
    let target = |r: &mut Rng| if r.chance(50) { fresh(r) } else { any(r) };
    match r.below(22) {
        0..=3 => {
            let flags = [
                libc::O_WRONLY,
                libc::O_RDWR,
                libc::O_WRONLY | libc::O_APPEND,
                libc::O_WRONLY | libc::O_TRUNC,
                libc::O_RDWR | libc::O_CREAT,
                libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
                libc::O_RDONLY,
                libc::O_RDWR | libc::O_CREAT | libc::O_TRUNC,
            ][r.below(8) as usize];
            let path = if flags & libc::O_CREAT != 0 && r.chance(50) {
                fresh(r)
            } else {
                of(r, 'f')
            };
            Op::Write {
                path,
                flags,
                off: r.below(3 << 20),
                len: r.below(70_000) as usize,
                byte: r.below(256) as u8,
            }
        }
        4 => Op::Truncate {
            path: of(r, 'f'),
            size: r.below(2 << 20),
        },
        5 => Op::Punch {
            path: of(r, 'f'),
            off: r.below(1 << 20),
            len: 1 + r.below(1 << 20),
        },
        6 | 7 => Op::Unlink { path: any(r) },
        8 => Op::Rmdir { path: any(r) },
        9 => Op::Mkdir {
            path: target(r),
            mode: [0o755, 0o700, 0o2775][r.below(3) as usize],
        },
        10 | 11 => {
            let flags =
                [0, 0, 0, libc::RENAME_NOREPLACE, libc::RENAME_EXCHANGE][r.below(5) as usize];
            let from = any(r);
            let to = if r.chance(20) {
                dir(r).join(from.file_name().unwrap_or(OsStr::new("x")))
            } else {
                target(r)
            };
            Op::Rename { from, to, flags }
        }
        12 => Op::Link {
            from: of(r, 'f'),
            to: target(r),
        },
        13 => Op::Symlink {
            // Followed by writes, chmod, xattrs...: a target must not reach out of the mount
            // (at its root `..` is the scratch dir both mounts share; absolute ones the host,
            // whose /etc/hostname an earlier target here overwrote), so those two dangle.
            target: ["a0", "../a0/x", "/nonexistent-layerfs-soak/x", "loop"][r.below(4) as usize]
                .into(),
            path: target(r),
        },
        14 => Op::Mkfifo { path: target(r) },
        15 => Op::Chmod {
            path: any(r),
            mode: [0o600, 0o755, 0o4755, 0o1777, 0o640][r.below(5) as usize],
        },
        16 => Op::Chown {
            path: any(r),
            uid: r.below(3) as u32 * 1000,
            gid: r.below(3) as u32 * 100,
        },
        17 => Op::Utimes {
            path: any(r),
            secs: 100_000_000 + r.below(1_000_000) as i64,
        },
        18 => {
            if r.chance(60) {
                Op::SetXattr {
                    path: any(r),
                    value: r.below(9) as u8,
                }
            } else {
                Op::RemoveXattr { path: any(r) }
            }
        }
        19 => {
            let slot = r.below(SLOTS as u64) as usize;
            match r.below(10) {
                0..=3 => {
                    // (A directory held: a process's working directory.)
                    let kind = if r.chance(20) { 'd' } else { 'f' };
                    Op::OpenKeep {
                        slot,
                        path: of(r, kind),
                        write: r.chance(40),
                    }
                }
                4..=6 => Op::ReadKept { slot },
                _ => Op::OnKept {
                    slot,
                    what: match r.below(8) {
                        0 | 1 => KeptOp::Write {
                            off: r.below(3 << 20),
                            len: r.below(70_000) as usize,
                            byte: r.below(256) as u8,
                        },
                        2 => KeptOp::Truncate {
                            size: r.below(2 << 20),
                        },
                        3 => KeptOp::Chmod {
                            mode: [0o600, 0o755, 0o4755, 0o640][r.below(4) as usize],
                        },
                        4 => KeptOp::SetXattr {
                            value: r.below(9) as u8,
                        },
                        5 => KeptOp::Stat,
                        6 => KeptOp::Fallocate {
                            off: r.below(2 << 20),
                            len: 1 + r.below(1 << 20),
                            keep_size: r.chance(50),
                        },
                        _ => KeptOp::CopyFrom {
                            src: r.below(SLOTS as u64) as usize,
                            off: r.below(1 << 20),
                            len: r.below(200_000) as usize,
                        },
                    },
                },
            }
        }
        20 => Op::ListDir { path: dir(r) },
        _ if r.chance(40) => Op::Tmpfile {
            dir: dir(r),
            len: r.below(70_000) as usize,
            link: r.chance(80).then(|| target(r)),
        },
        _ if r.chance(25) => Op::Remount {
            kill: r.chance(50),
            swap: r.chance(40),
        },
        _ => Op::Check,
    }
}
