//! File attributes (lsattr/chattr: `FS_IOC_GETFLAGS`/`SETFLAGS` and the `FSGETXATTR` pair), as
//! kernel overlayfs serves them (ovl_fileattr_get/set): read from the real object, set on its
//! upper copy (copied up first, metadata only where the mount allows). The kernel keeps an
//! upper object's immutable and append-only attributes in `overlay.protattr` and enforces them
//! in the VFS; a FUSE daemon cannot make the VFS enforce them, so layerfs shows them (from a
//! kernel-written upper too) but refuses to change them (EPERM) rather than set attributes it
//! would not honour.

use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd};

use super::Union;
use super::copyup::Data;
use super::node::Node;
use super::real::Real;
use crate::error::{Result, err};
use crate::sys::{self, XTarget};

const FS_SYNC_FL: u32 = 0x8;
const FS_IMMUTABLE_FL: u32 = 0x10;
const FS_APPEND_FL: u32 = 0x20;
const FS_NOATIME_FL: u32 = 0x80;
/// The flags a copy-up carries onto the copy (the kernel's OVL_COPY_FS_FLAGS_MASK); the
/// copy's others are what its filesystem gives a new object.
const COPIED_FLAGS: u32 = FS_SYNC_FL | FS_NOATIME_FL;
const FS_XFLAG_IMMUTABLE: u32 = 0x8;
const FS_XFLAG_APPEND: u32 = 0x10;

/// Which pair of ioctls: the flags word, or `struct fsxattr` (whose first word is xflags).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttrKind {
    Flags,
    FsXattr,
}

impl AttrKind {
    /// The kind of a file-attribute ioctl and whether it reads (FUSE_IOCTL's `cmd`); None
    /// for any other command.
    pub fn of(cmd: u32) -> Option<(AttrKind, bool)> {
        [AttrKind::Flags, AttrKind::FsXattr]
            .into_iter()
            .find_map(|k| match k.cmds() {
                (get, _) if get == cmd => Some((k, true)),
                (_, set) if set == cmd => Some((k, false)),
                _ => None,
            })
    }

    /// (get, set) commands.
    fn cmds(self) -> (u32, u32) {
        match self {
            AttrKind::Flags => (libc::FS_IOC_GETFLAGS as u32, libc::FS_IOC_SETFLAGS as u32),
            AttrKind::FsXattr => (sys::FS_IOC_FSGETXATTR, sys::FS_IOC_FSSETXATTR),
        }
    }

    /// The size of the commands' argument.
    fn size(self) -> usize {
        sys::fileattr_arg_size(self.cmds().0).expect("a file-attribute command")
    }

    /// The immutable and append-only bits in this kind's first word.
    fn protection(self, immutable: bool, append: bool) -> u32 {
        let (i, a) = match self {
            AttrKind::Flags => (FS_IMMUTABLE_FL, FS_APPEND_FL),
            AttrKind::FsXattr => (FS_XFLAG_IMMUTABLE, FS_XFLAG_APPEND),
        };
        (if immutable { i } else { 0 }) | (if append { a } else { 0 })
    }

    fn mask(self) -> u32 {
        self.protection(true, true)
    }
}

/// Errors that mean "this filesystem keeps no such attributes".
fn unsupported(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOTTY | libc::EINVAL | libc::EOPNOTSUPP)
    )
}

fn word(b: &[u8]) -> u32 {
    u32::from_ne_bytes([b[0], b[1], b[2], b[3]])
}

fn set_word(b: &mut [u8], v: u32) {
    b[..4].copy_from_slice(&v.to_ne_bytes());
}

impl Union {
    /// The attributes of node `id` as its real object has them, with the protection the
    /// kernel recorded in `overlay.protattr`.
    pub fn fileattr_get(&self, id: u64, kind: AttrKind) -> Result<Vec<u8>> {
        self.fileattr_of(&*self.node(id)?, kind)
    }

    fn fileattr_of(&self, node: &Node, kind: AttrKind) -> Result<Vec<u8>> {
        self.with_real(node, |real| self.fileattr_at(node, real, kind))
    }

    fn fileattr_at(&self, node: &Node, real: &Real, kind: AttrKind) -> Result<Vec<u8>> {
        let fd = real.open(libc::O_RDONLY | libc::O_NONBLOCK, node.is_dir())?;
        let mut buf = vec![0u8; kind.size()];
        sys::fileattr_ioctl(fd.as_fd(), kind.cmds().0, &mut buf)?;
        if self.layers.is_upper(node.top_layer())
            && let Ok(Some(v)) = sys::getxattr(real.xtarget(), self.cfg.marker_ns.protattr())
        {
            let p = kind.protection(v.contains(&b'i'), v.contains(&b'a'));
            let w = word(&buf) | p;
            set_word(&mut buf, w);
        }
        Ok(buf)
    }

    /// Set node `id`'s attributes on its upper copy. Immutable and append-only cannot change
    /// (see the module comment).
    pub fn fileattr_set(&self, id: u64, kind: AttrKind, data: &[u8]) -> Result<()> {
        if !self.writable() {
            return Err(err(libc::EROFS));
        }
        let Some(data) = data.get(..kind.size()) else {
            return Err(err(libc::EINVAL));
        };
        let node = self.node(id)?;
        let now = self.fileattr_of(&node, kind)?;
        if (word(&now) ^ word(data)) & kind.mask() != 0 {
            return Err(err(libc::EPERM));
        }
        self.copy_up(&node, if node.is_dir() { Data::All } else { Data::Meta })?;
        // What stays protected lives in protattr, not on the upper object (as the kernel).
        let mut want = data.to_vec();
        set_word(&mut want, word(data) & !kind.mask());
        let fd = self.with_real(&node, |r| {
            r.open(libc::O_RDONLY | libc::O_NONBLOCK, node.is_dir())
        })?;
        sys::fileattr_ioctl(fd.as_fd(), kind.cmds().1, &mut want)?;
        self.attrs_changed(id);
        Ok(())
    }

    /// ovl_copy_fileattr, for the copy `tmp` (in the work directory `wfd`; `file`, an fd on
    /// it if open) of regular file or directory `src`: the source's sync and noatime flags go
    /// onto the copy, its append-only and immutable ones into `overlay.protattr` (on the copy
    /// itself they would stop the copy-up's own later steps). Before session 37 a copy lost
    /// them all. A source that cannot be opened or keeps no attributes has none to copy.
    pub(crate) fn copy_fileattr(
        &self,
        src: &Real,
        is_dir: bool,
        wfd: BorrowedFd<'_>,
        tmp: &OsStr,
        file: Option<BorrowedFd<'_>>,
    ) -> Result<()> {
        let (get, set) = AttrKind::Flags.cmds();
        let Some(flags) = src
            .open(libc::O_RDONLY | libc::O_NONBLOCK, is_dir)
            .ok()
            .and_then(|fd| {
                let mut b = [0u8; 4];
                sys::fileattr_ioctl(fd.as_fd(), get, &mut b).ok()?;
                Some(word(&b))
            })
        else {
            return Ok(());
        };
        // The kernel's order: 'a', then 'i'.
        let prot: Vec<u8> = [(FS_APPEND_FL, b'a'), (FS_IMMUTABLE_FL, b'i')]
            .iter()
            .filter(|(f, _)| flags & f != 0)
            .map(|(_, c)| *c)
            .collect();
        if !prot.is_empty() {
            let x = self.cfg.marker_ns.protattr();
            match sys::setxattr(XTarget::At(wfd, tmp), x, &prot, 0) {
                // As the kernel: an upper that takes no such xattr keeps no protection.
                Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                    log::warn!("copy-up: no {x:?} on the upper, the copy is unprotected");
                }
                r => r?,
            }
        }
        if flags & COPIED_FLAGS == 0 {
            return Ok(());
        }
        let opened;
        let fd = match file {
            Some(f) => f,
            None => {
                opened = sys::openat(wfd, tmp, libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
                opened.as_fd()
            }
        };
        let mut b = [0u8; 4];
        match sys::fileattr_ioctl(fd, get, &mut b) {
            Err(e) if unsupported(&e) => return Ok(()),
            r => r?,
        }
        let want = (word(&b) & !COPIED_FLAGS) | (flags & COPIED_FLAGS);
        set_word(&mut b, want);
        match sys::fileattr_ioctl(fd, set, &mut b) {
            Err(e) if unsupported(&e) => Ok(()),
            r => Ok(r?),
        }
    }
}
