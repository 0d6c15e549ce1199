//! Constant inode numbers across copy-up, in the kernel's format: a copy records its lower
//! object as `overlay.origin` (file handle + filesystem UUID), and the union keeps showing
//! that object's inode number for it, after a remount too. Its upper directory is marked
//! `overlay.impure`, which tells a listing (ours and the kernel's) that some entry's inode
//! number is not the one the upper layer lists.

use std::os::fd::AsFd;

use super::Union;
use super::format::Origin;
use super::node::Node;
use super::real::Real;
use crate::sys::{self, Stat, XTarget};

/// ext4's superblock magic (statfs f_type).
const EXT4_MAGIC: i64 = 0xEF53;
/// Handle types whose first 32-bit word is the inode number (FILEID_INO32_GEN[_PARENT]).
const INO32_TYPES: [u8; 2] = [1, 2];

impl Union {
    /// The origin to record for a copy of lower object `src` in layer `l`; None where its
    /// filesystem has no file handles or no UUID (the copy's inode number then changes, as
    /// the kernel's does there).
    pub(crate) fn origin_of(&self, src: &Real, l: usize) -> Option<Origin> {
        let uuid = self.layers.layers[l].uuid?;
        let Real::At(dir, name) = src else {
            return None;
        };
        let (kind, handle) = sys::file_handle_at(dir.as_fd(), name).ok()?;
        Some(Origin {
            kind: u8::try_from(kind).ok()?,
            uuid,
            handle,
        })
    }

    /// The union inode number of the lower object upper non-directory `x` (real inode number
    /// `upper_ino`) was copied up from, if it records one in this stack. As the kernel: for a
    /// lower hard link only where all its names share this copy (it is the index's entry).
    pub(crate) fn origin_ino(&self, x: XTarget<'_>, upper_ino: u64) -> Option<u64> {
        self.copy_origin(x, upper_ino).map(|(ino, _)| ino)
    }

    /// As `origin_ino`, and whether the copy is the index's entry for its origin.
    pub(crate) fn copy_origin(&self, x: XTarget<'_>, upper_ino: u64) -> Option<(u64, bool)> {
        let v = sys::getxattr(x, self.cfg.marker_ns.origin()).ok()??;
        let o = Origin::decode(&v)?;
        let mut tried = Vec::new();
        for l in self.layers.first_lower()..self.layers.len() {
            let layer = &self.layers.layers[l];
            if tried.contains(&layer.dev) {
                continue;
            }
            // The layer's filesystem's UUID, which may be null itself (a fresh VM's root);
            // else a null UUID is the kernel's uuid=null, meaning the upper's own filesystem.
            let fits = layer.uuid == Some(o.uuid)
                || (o.uuid == [0; 16] && layer.dev == self.layers.layers[0].dev);
            if !fits {
                continue;
            }
            tried.push(layer.dev);
            if let Some(ino) = self.decode_ino(l, &o, &v, x, upper_ino) {
                return Some(ino);
            }
        }
        None
    }

    /// Union inode number of origin `o` (recorded as `raw`) on layer `l`'s filesystem, and
    /// whether the copy is the index's entry.
    fn decode_ino(
        &self,
        l: usize,
        o: &Origin,
        raw: &[u8],
        x: XTarget<'_>,
        upper_ino: u64,
    ) -> Option<(u64, bool)> {
        let root = self.layers.layers[l].handles.as_ref()?;
        // (layer, its real inode number, a lower hard link?)
        let (layer, ino, hard_link) =
            match sys::open_by_handle(root.as_fd(), o.kind.into(), &o.handle) {
                Ok(fd) => {
                    let st = sys::fstat(fd.as_fd()).ok()?;
                    (self.layers.lower_on(st.st_dev)?, st.st_ino, st.st_nlink > 1)
                }
                // Unprivileged (no CAP_DAC_READ_SEARCH): ext4's handles carry the number
                // itself, and an indexed copy of a hard link carries a union link count.
                Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                    let ext4 = sys::fstatfs(root.as_fd()).ok()?.f_type as i64 == EXT4_MAGIC;
                    if !ext4 || !INO32_TYPES.contains(&o.kind) || o.handle.len() < 4 {
                        return None;
                    }
                    let ino = u32::from_ne_bytes(o.handle[..4].try_into().ok()?);
                    let nlink = sys::getxattr(x, self.cfg.marker_ns.nlink());
                    (l, ino.into(), nlink.is_ok_and(|v| v.is_some()))
                }
                Err(e) => {
                    log::debug!("origin on layer {l} not decoded: {e}");
                    return None;
                }
            };
        // A lower hard link's copy shows its number only where all names share it: it is
        // the index's entry.
        if hard_link && !self.index().is_some_and(|ix| ix.holds(raw, upper_ino)) {
            return None;
        }
        Some((self.layers.union_ino(layer, ino), hard_link))
    }

    /// The union inode number of upper non-directory `x` (real stat `st`): its origin's,
    /// else its own.
    pub(crate) fn upper_ino(&self, x: XTarget<'_>, st: &Stat) -> u64 {
        self.origin_ino(x, st.st_ino)
            .unwrap_or_else(|| self.layers.union_ino(0, st.st_ino))
    }

    /// Mark directory `dir`'s upper copy impure (once): an entry with an origin is going in.
    /// Best effort, as the kernel's: without it only listings' inode numbers can be off.
    pub(crate) fn mark_impure(&self, dir: &Node) {
        if dir.state.read().expect("node state lock").impure {
            return;
        }
        let r = self
            .dir_fd(dir, 0)
            .map_err(|e| e.to_string())
            .and_then(|fd| {
                sys::setxattr(
                    XTarget::Fd(fd.as_fd()),
                    self.cfg.marker_ns.impure(),
                    b"y",
                    0,
                )
                .map_err(|e| e.to_string())
            });
        match r {
            Ok(()) => dir.state.write().expect("node state lock").impure = true,
            Err(e) => log::warn!("marking directory {} impure: {e}", dir.id),
        }
    }
}
