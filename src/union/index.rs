//! The inode index (`workdir/index`, the kernel's `index=on` format): a copied-up lower hard
//! link is also linked there, named by the hex of its origin (`overlay.origin`, a `struct
//! ovl_fb`), so every other name of that inode reaches the one copy when it is first looked
//! up — after the copied name was unlinked, after a remount, and in the kernel mounting the
//! same upper with `index=on` (and we read the kernel's entries alike).
//!
//! The copy's `overlay.nlink` holds the union's link count relative to the upper file's, as
//! the kernel keeps it (`U+N`: the upper count includes the index's link, the union's counts
//! lower names not yet linked up). Linking a name up lowers N; a link or unlink changes both
//! counts alike. When the union count reaches zero the entry is removed (an orphan), at once
//! or at the next mount (as the kernel's ovl_indexdir_cleanup).

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::Union;
use super::copyup::LinkSrc;
use super::format::{self, MarkerNs, Origin};
use super::layer::LayerStack;
use super::lookup::Found;
use super::node::{Kind, Node};
use super::real::Real;
use crate::error::{Context, Result};
use crate::sys::{self, Stat, XTarget};

const DIR: &str = "index";
/// Where layerfs before the kernel's format kept its entries (named device-type-handle).
const LEGACY_DIR: &str = "layerfs-index";

pub struct Index {
    fd: Arc<OwnedFd>,
    /// False while the index is empty: lookups of lower hard links then skip it.
    in_use: AtomicBool,
    /// Held while an indexed copy's links change with its union count (a name linked up
    /// and the count's read-modify-write, or a name's removal judged): two lookups linking
    /// names up at once would else lose one's update.
    links: Mutex<()>,
}

/// The index name of an origin: its bytes in lowercase hex (the kernel's bin2hex).
fn name_of(origin: &[u8]) -> OsString {
    let hex: String = origin.iter().map(|b| format!("{b:02x}")).collect();
    hex.into()
}

/// With only the index's own link left (union count `1 + diff`), is no name left?
fn last_link_gone(diff: i64) -> bool {
    diff < 0
}

impl Index {
    /// Open (creating) the index in workdir `base`, bring over a legacy index, and remove
    /// orphans: entries no name of the union reaches any more.
    pub fn open(base: BorrowedFd<'_>, layers: &LayerStack, ns: MarkerNs) -> Result<Index> {
        sys::mkdirat_if_missing(base, OsStr::new(DIR), 0o700).ctx(DIR)?;
        // Readable (to list it here); the *at calls take it as their directory.
        let fd =
            sys::openat(base, OsStr::new(DIR), libc::O_RDONLY | libc::O_DIRECTORY, 0).ctx(DIR)?;
        migrate_legacy(base, fd.as_fd(), layers, ns);
        let mut in_use = false;
        for e in sys::read_dir_fd(fd.as_fd()).ctx(DIR)? {
            let t = XTarget::At(fd.as_fd(), &e.name);
            let orphan = sys::statat(fd.as_fd(), &e.name).is_ok_and(|st| {
                st.st_mode & libc::S_IFMT == libc::S_IFREG
                    && st.st_nlink == 1
                    && matches!(format::nlink_diff(t), Some((b'U', d)) if last_link_gone(d))
            });
            if orphan {
                log::debug!("index: removing orphan {:?}", e.name);
                if let Err(err) = sys::unlinkat(fd.as_fd(), &e.name, false) {
                    log::warn!("index: orphan {:?} not removed: {err}", e.name);
                }
            } else {
                in_use = true;
            }
        }
        Ok(Index {
            fd: Arc::new(fd),
            in_use: AtomicBool::new(in_use),
            links: Mutex::new(()),
        })
    }

    /// The entry of `origin`, if it is a regular file (the kernel may also keep whiteouts
    /// and directories here with nfs_export).
    fn entry(&self, origin: &[u8]) -> Option<Stat> {
        sys::statat(self.fd.as_fd(), &name_of(origin))
            .ok()
            .filter(|st| st.st_mode & libc::S_IFMT == libc::S_IFREG)
    }

    /// The index directory (entries are linked from it by name).
    pub(crate) fn dir(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// See `Index::links`.
    pub(crate) fn links_lock(&self) -> MutexGuard<'_, ()> {
        self.links.lock().expect("index links lock")
    }

    /// Is upper inode `upper_ino` the index's copy of `origin`?
    pub(crate) fn holds(&self, origin: &[u8], upper_ino: u64) -> bool {
        self.entry(origin).is_some_and(|st| st.st_ino == upper_ino)
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

/// Move the entries of a legacy `layerfs-index` (named `dev-type-handle`, the copy counting
/// only its upper names) into the kernel's format. Their union count is unknown: it is set
/// as if no other lower name had been linked up or removed, which may count too many links
/// (the entry then stays, as before) but never too few. Best effort: an entry that can't
/// move stays behind.
fn migrate_legacy(base: BorrowedFd<'_>, index: BorrowedFd<'_>, layers: &LayerStack, ns: MarkerNs) {
    let Ok(old) = sys::openat(
        base,
        OsStr::new(LEGACY_DIR),
        libc::O_RDONLY | libc::O_DIRECTORY,
        0,
    ) else {
        return;
    };
    let Ok(entries) = sys::read_dir_fd(old.as_fd()) else {
        return;
    };
    for e in entries {
        let moved = legacy_origin(&e.name, layers).and_then(|(origin, lower_nlink)| {
            let t = XTarget::At(old.as_fd(), &e.name);
            sys::setxattr(t, ns.origin(), &origin, 0).ok()?;
            // Upper names plus all lower names but the copied one, at most.
            let diff = lower_nlink as i64 - 2;
            sys::setxattr(t, ns.nlink(), &format::nlink_value(diff), 0).ok()?;
            match sys::linkat(old.as_fd(), &e.name, index, &name_of(&origin)) {
                Ok(()) => Some(()),
                // The kernel indexed it meanwhile: its entry wins.
                Err(err) if err.raw_os_error() == Some(libc::EEXIST) => Some(()),
                Err(_) => None,
            }
        });
        match moved {
            Some(()) => {
                let _ = sys::unlinkat(old.as_fd(), &e.name, false);
            }
            None => log::warn!("index: legacy entry {:?} not moved", e.name),
        }
    }
    let _ = sys::unlinkat(base, OsStr::new(LEGACY_DIR), true);
}

/// A legacy entry's origin, and its lower inode's link count (2 where it can't be read).
fn legacy_origin(name: &OsStr, layers: &LayerStack) -> Option<(Vec<u8>, u64)> {
    let s = std::str::from_utf8(name.as_bytes()).ok()?;
    let mut parts = s.splitn(3, '-');
    let dev = u64::from_str_radix(parts.next()?, 16).ok()?;
    let kind = u8::from_str_radix(parts.next()?, 16).ok()?;
    let hex = parts.next()?;
    let handle = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    let layer = &layers.layers[layers.lower_on(dev)?];
    let nlink = layer
        .handles
        .as_ref()
        .and_then(|root| sys::open_by_handle(root.as_fd(), kind.into(), &handle).ok())
        .and_then(|fd| sys::fstat(fd.as_fd()).ok())
        .map_or(2, |st| st.st_nlink.max(2));
    let origin = Origin {
        kind,
        uuid: layer.uuid?,
        handle,
    };
    Some((origin.encode(), nlink))
}

/// What the index says of a name that resolved to a lower object.
pub(crate) enum FromIndex {
    /// Not a hard link the index has a copy of (as far as the index knows).
    Not,
    /// Another name's live node answers for the file (not copied up yet, or with no index
    /// entry): the name must join that node (its copy-up links the name up), or, if the
    /// node goes first, be looked up again.
    Live,
    /// Linked up from the index: the name as found in the upper layer now.
    Linked(Box<Found>),
}

impl Union {
    pub(crate) fn index(&self) -> Option<&Index> {
        self.work.as_ref().map(|w| &w.index)
    }

    /// During a copy-up of lower object `sst` (built as `work/tmp`, its origin recorded):
    /// if it is a hard-linked regular file, link the copy into the index before it goes in
    /// place (as the kernel: a crash between the two leaves an entry the other names reach),
    /// with the union count of all its lower names. Returns the entry's name, None if not
    /// indexed.
    pub(crate) fn index_copy(
        &self,
        origin: Option<&[u8]>,
        sst: &Stat,
        work: BorrowedFd<'_>,
        tmp: &OsStr,
    ) -> Option<OsString> {
        let (Some(ix), Some(origin)) = (self.index(), origin) else {
            return None;
        };
        if sst.st_nlink <= 1 || sst.st_mode & libc::S_IFMT != libc::S_IFREG {
            return None;
        }
        let key = name_of(origin);
        // In place the copy has two links: the index's and its name.
        let diff = sst.st_nlink as i64 - 2;
        let t = XTarget::At(work, tmp);
        let r = sys::setxattr(t, self.cfg.marker_ns.nlink(), &format::nlink_value(diff), 0)
            .map_err(Into::into)
            .and_then(|()| ix.add(work, tmp, &key));
        match r {
            Ok(()) => Some(key),
            Err(e) => {
                log::warn!("copy-up of hard link {tmp:?}: not indexed: {e}");
                let _ = sys::removexattr(t, self.cfg.marker_ns.nlink());
                None
            }
        }
    }

    /// An index entry for a copy-up that then failed: take it out again.
    pub(crate) fn unindex(&self, key: &OsStr) {
        if let Some(ix) = self.index() {
            let _ = sys::unlinkat(ix.fd.as_fd(), key, false);
        }
    }

    /// A lower name of indexed copy `x` was linked up to it: the union count stays, the
    /// upper one grew.
    pub(crate) fn linked_up(&self, x: XTarget<'_>) {
        if let Some((b'U', diff)) = format::nlink_diff(x)
            && let Err(e) = sys::setxattr(
                x,
                self.cfg.marker_ns.nlink(),
                &format::nlink_value(diff - 1),
                0,
            )
        {
            log::warn!("index: link count not updated: {e}");
        }
    }

    /// A name of upper file `kept` (an fd on it, taken before) left the union: if that was
    /// the last name of an indexed copy, remove its index entry (as the kernel's
    /// ovl_cleanup_index). An fd that stays open keeps the file itself alive. Returns
    /// whether the file still has names in the union: other names of the lower hard link,
    /// perhaps not looked up yet, which reach the copy through the index.
    pub(crate) fn name_dropped(&self, kept: &OwnedFd) -> bool {
        let Some(ix) = self.index() else {
            return false;
        };
        let _links = ix.links_lock();
        let x = XTarget::Fd(kept.as_fd());
        let Ok(st) = sys::fstat(kept.as_fd()) else {
            return false;
        };
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return false;
        }
        let Some((b'U', diff)) = format::nlink_diff(x) else {
            return false;
        };
        if st.st_nlink != 1 || !last_link_gone(diff) {
            return true;
        }
        let Ok(Some(origin)) = sys::getxattr(x, self.cfg.marker_ns.origin()) else {
            return false;
        };
        if ix.holds(&origin, st.st_ino) {
            match sys::unlinkat(ix.fd.as_fd(), &name_of(&origin), false) {
                Ok(()) => log::debug!("index: removed {:?}, its last name gone", name_of(&origin)),
                Err(e) => log::warn!("index: entry of an unlinked file not removed: {e}"),
            }
        }
        false
    }

    /// For a name that resolved to a lower hard link: if another of its names was copied up
    /// (indexed), link this name up to that copy and return it instead.
    pub(crate) fn linked_from_index(
        &self,
        p: &Arc<Node>,
        name: &OsStr,
        f: &Found,
    ) -> Result<FromIndex> {
        let Some(ix) = self.index() else {
            return Ok(FromIndex::Not);
        };
        let l = f.layers[0];
        if f.kind != Kind::File
            || f.top.st_nlink <= 1
            || self.layers.is_upper(l)
            || !ix.in_use.load(Ordering::Relaxed)
        {
            return Ok(FromIndex::Not);
        }
        // A live node of this inode not copied up yet answers for it: its copy-up links the
        // new name up. A copied-up one is joined by the name once it is in the upper layer
        // (else, between the two, the name could be the node's first, not there yet).
        let live = self.nodes.live(self.node_id(f));
        if live.as_ref().is_some_and(|n| n.top_layer() != 0) {
            return Ok(FromIndex::Live);
        }
        if !self.link_up_from_index(p, name, l)? {
            return Ok(match live {
                Some(_) => FromIndex::Live,
                None => FromIndex::Not,
            });
        }
        // As found in the upper now: its origin's number, and (the kernel's index entries
        // may be metadata-only copies) where its data is.
        let up = self.dir_fd(p, 0)?;
        let top = sys::statat(up.as_fd(), name)?;
        match self.found_upper(p, &up, name, top)? {
            Some(copy) => Ok(FromIndex::Linked(Box::new(copy))),
            None => Ok(FromIndex::Not),
        }
    }

    /// Link `p/name`, a lower hard link of layer `l`, up from the index entry of its origin
    /// (the copy of the file all its names share). False if there is no such entry.
    pub(crate) fn link_up_from_index(&self, p: &Arc<Node>, name: &OsStr, l: usize) -> Result<bool> {
        let Some(ix) = self.index() else {
            return Ok(false);
        };
        let lower = self.dir_fd(p, l)?;
        let Some(origin) = self.origin_of(&Real::At(lower, Arc::from(name)), l) else {
            return Ok(false);
        };
        let origin = origin.encode();
        if ix.entry(&origin).is_none() {
            return Ok(false);
        }
        let key = name_of(&origin);
        self.link_up_at(LinkSrc::Index(&key), p.id, name)?;
        log::debug!("linked {name:?} up from the index");
        Ok(true)
    }
}
