//! The hard-link index (`workdir/layerfs-index`): a copied-up lower hard link is also linked
//! here, named by its lower inode's file handle, so every other name of that inode reaches the
//! one copy when it is first looked up — after the copied name was unlinked, and after a
//! remount (what the kernel gives with `index=on`). Kept apart from the kernel's `index`
//! directory, whose entries the kernel verifies against origin xattrs layerfs doesn't write.
//!
//! The copy carries `overlay.nlink = "U-1"` (the kernel's own format), so its reported link
//! count leaves out the index's link.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::Union;
use super::copyup::{Data, restore_times};
use super::lookup::Found;
use super::node::{Kind, Node};
use super::real::Real;
use crate::error::{Context, Result};
use crate::sys::{self, Stat, XTarget};

const DIR: &str = "layerfs-index";

pub struct Index {
    fd: Arc<OwnedFd>,
    /// False while the index is empty: lookups of lower hard links then skip it.
    in_use: AtomicBool,
}

impl Index {
    /// Open (creating) the index beside the work directory in `base` (the workdir).
    pub fn open(base: BorrowedFd<'_>) -> Result<Index> {
        sys::mkdirat_if_missing(base, OsStr::new(DIR), 0o700).ctx(DIR)?;
        // Readable (to list it once here); the *at calls take it as their directory.
        let fd =
            sys::openat(base, OsStr::new(DIR), libc::O_RDONLY | libc::O_DIRECTORY, 0).ctx(DIR)?;
        let in_use = !sys::read_dir_fd(fd.as_fd()).ctx(DIR)?.is_empty();
        Ok(Index {
            fd: Arc::new(fd),
            in_use: AtomicBool::new(in_use),
        })
    }

    /// The index name of lower object `dir/name`: its device and file handle. None where the
    /// filesystem has no handles (that inode is then not indexed).
    fn key(dir: BorrowedFd<'_>, name: &OsStr, st: &Stat) -> Option<OsString> {
        let (kind, bytes) = sys::file_handle_at(dir, name).ok()?;
        Some(Self::key_of(st.st_dev, kind, &bytes))
    }

    fn key_of(dev: u64, kind: i32, handle: &[u8]) -> OsString {
        let hex: String = handle.iter().map(|b| format!("{b:02x}")).collect();
        format!("{dev:x}-{kind:x}-{hex}").into()
    }

    /// Is upper inode `upper_ino` the index's copy of lower object (`dev`, handle)?
    pub(crate) fn holds(&self, dev: u64, kind: i32, handle: &[u8], upper_ino: u64) -> bool {
        sys::statat(self.fd.as_fd(), &Self::key_of(dev, kind, handle))
            .is_ok_and(|st| st.st_ino == upper_ino)
    }

    /// Link `dir/name` (a finished copy) into the index as `key`, replacing a stale entry.
    fn add(&self, dir: BorrowedFd<'_>, name: &OsStr, key: &OsStr) -> Result<()> {
        match sys::linkat(dir, name, self.fd.as_fd(), key) {
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                sys::unlinkat(self.fd.as_fd(), key, false)?;
                sys::linkat(dir, name, self.fd.as_fd(), key)?;
            }
            r => r?,
        }
        self.in_use.store(true, Ordering::Relaxed);
        Ok(())
    }
}

impl Union {
    pub(crate) fn index(&self) -> Option<&Index> {
        self.work.as_ref().map(|w| &w.index)
    }

    /// During a copy-up of lower object `src` (built as `work/tmp`, not yet in place): if it
    /// is a hard-linked regular file, mark the copy so the index's link is not counted, and return its index
    /// name for `index_copy` once the copy is in place.
    pub(crate) fn index_key(
        &self,
        src: &Real,
        sst: &Stat,
        work: BorrowedFd<'_>,
        tmp: &OsStr,
    ) -> Option<OsString> {
        let (Some(_), Real::At(dir, name)) = (self.index(), src) else {
            return None;
        };
        if sst.st_nlink <= 1 || sst.st_mode & libc::S_IFMT != libc::S_IFREG {
            return None;
        }
        let key = Index::key(dir.as_fd(), name, sst)?;
        match sys::setxattr(
            XTarget::At(work, tmp),
            self.cfg.marker_ns.nlink(),
            b"U-1",
            0,
        ) {
            Ok(()) => Some(key),
            Err(e) => {
                log::warn!("copy-up of hard link {name:?}: not indexed: {e}");
                None
            }
        }
    }

    /// Link the copy, now in place as `dir/name`, into the index. After the copy is visible,
    /// so the index never holds what the upper doesn't show; best effort: without an entry,
    /// names not yet looked up keep showing the lower file.
    pub(crate) fn index_copy(&self, dir: BorrowedFd<'_>, name: &OsStr, key: &OsStr) {
        if let Some(ix) = self.index()
            && let Err(e) = ix.add(dir, name, key)
        {
            log::warn!("copy-up of hard link {name:?}: not indexed: {e}");
        }
    }

    /// For a name that resolved to a lower hard link: if another of its names was copied up
    /// (indexed), link this name up to that copy and return it instead.
    pub(crate) fn linked_from_index(
        &self,
        p: &Arc<Node>,
        name: &OsStr,
        f: &Found,
    ) -> Result<Option<Found>> {
        let Some(ix) = self.index() else {
            return Ok(None);
        };
        let l = f.layers[0];
        if f.kind != Kind::File
            || f.top.st_nlink <= 1
            || self.layers.is_upper(l)
            || !ix.in_use.load(Ordering::Relaxed)
        {
            return Ok(None);
        }
        // A live node of this inode answers for it: its copy-up links the new name up.
        if self.nodes.live(self.node_id(f)).is_some() {
            return Ok(None);
        }
        let lower = self.dir_fd(p, l)?;
        let Some(key) = Index::key(lower.as_fd(), name, &f.top) else {
            return Ok(None);
        };
        if sys::statat(ix.fd.as_fd(), &key).is_err() {
            return Ok(None);
        }
        self.copy_up(p, Data::All)?;
        self.mark_impure(p);
        let up = self.dir_fd(p, 0)?;
        let times = sys::fstat(up.as_fd())?;
        match sys::linkat(ix.fd.as_fd(), &key, up.as_fd(), name) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => return Err(e.into()),
        }
        restore_times(up.as_fd(), &times);
        log::debug!("linked {name:?} up from the hard-link index");
        let top = sys::statat(up.as_fd(), name)?;
        Ok(Some(Found {
            kind: Kind::File,
            layers: vec![0],
            top,
            lower_path: None,
            redirect_layer: 0,
            lower_ino: self.origin_ino(XTarget::At(up.as_fd(), name), top.st_ino),
            impure: false,
            fds: Vec::new(),
            data: None,
        }))
    }
}
