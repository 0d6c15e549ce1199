//! Merged directory listings: every merged layer read once, top first; first occurrence of a
//! name wins; whiteouts (char 0/0, OCI `.wh.NAME`) hide names below; markers are never listed.

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::os::fd::AsFd;

use super::Union;
use super::format;
use super::node::{Kind, Node, NodeTable, ROOT_ID};
use crate::error::Result;
use crate::sys::{self, XTarget};

#[derive(Clone, Debug)]
pub struct DirEntry {
    pub name: OsString,
    pub ino: u64,
    pub kind: Kind,
}

fn kind_from_dtype(t: u8) -> Option<Kind> {
    Some(match t {
        libc::DT_DIR => Kind::Dir,
        libc::DT_REG => Kind::File,
        libc::DT_LNK => Kind::Symlink,
        libc::DT_FIFO => Kind::Fifo,
        libc::DT_SOCK => Kind::Socket,
        libc::DT_BLK => Kind::BlockDev,
        // DT_CHR may be a whiteout; DT_UNKNOWN needs a stat.
        _ => return None,
    })
}

/// What a directory is listed for.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Listing {
    /// A readdir: xattr whiteouts in a lower directory marked opaque=x are left out.
    Readdir,
    /// rmdir's (or a rename's) emptiness check: the kernel's ovl_check_empty_dir counts
    /// xattr whiteouts as entries (ENOTEMPTY), whatever their directory's mark.
    Emptiness,
}

impl Union {
    /// The merged listing of a directory, `.` and `..` first.
    pub fn list_dir(&self, id: u64) -> Result<Vec<DirEntry>> {
        let node = self.dir_node(id)?;
        let _g = node.dir_lock.read().expect("dir lock");
        Self::live_dir(&node)?;
        let st = node.state();
        let parent_ino = if id == ROOT_ID {
            node.st_ino()
        } else {
            self.nodes
                .get(st.parent)
                .map_or(node.st_ino(), |p| p.st_ino())
        };
        let mut out = vec![
            DirEntry {
                name: ".".into(),
                ino: node.st_ino(),
                kind: Kind::Dir,
            },
            DirEntry {
                name: "..".into(),
                ino: parent_ino,
                kind: Kind::Dir,
            },
        ];
        let mut seen: HashSet<OsString> = HashSet::new();
        for &l in &st.layers {
            self.list_layer_into(&node, l, &mut seen, &mut out, Listing::Readdir)?;
        }
        Ok(out)
    }

    pub(crate) fn list_layer_into(
        &self,
        node: &Node,
        l: usize,
        seen: &mut HashSet<OsString>,
        out: &mut Vec<DirEntry>,
        why: Listing,
    ) -> Result<()> {
        let dfd = self.dir_fd(node, l)?;
        let rfd = sys::openat(
            dfd.as_fd(),
            OsStr::new("."),
            libc::O_RDONLY | libc::O_DIRECTORY,
            0,
        )?;
        let raw = sys::read_dir_fd(rfd.as_fd())?;
        let (impure, merged) = {
            let st = node.state.read().expect("node state lock");
            (st.impure, st.layers.len() > 1)
        };
        // The lower copy of a merged directory marked opaque=x holds xwhiteouts: its files are
        // checked (the kernel lists any other directory as it is, ghosts included).
        let xwhiteouts = why == Listing::Readdir
            && merged
            && !self.layers.is_upper(l)
            && format::dir_has_xwhiteouts(rfd.as_fd());
        // OCI whiteouts hide names in the layers below this one only.
        let mut hide_below = Vec::new();
        for e in raw {
            if format::is_marker_name(&e.name) {
                if let Some(hidden) = format::oci_whited_out(&e.name) {
                    hide_below.push(hidden.to_os_string());
                }
                continue;
            }
            if seen.contains(&e.name) {
                continue;
            }
            let kind = match kind_from_dtype(e.d_type) {
                // The kernel looks each file of such a listing up through the union
                // (ovl_cache_update): an xwhiteout resolves to nothing, a metadata-only copy
                // without its data fails (EIO); both are left out.
                Some(Kind::File) if xwhiteouts => match self.resolve(node, &e.name) {
                    Ok(Some(_)) => Kind::File,
                    _ => {
                        seen.insert(e.name);
                        continue;
                    }
                },
                Some(k) => k,
                None => {
                    let st = match sys::statat(dfd.as_fd(), &e.name) {
                        Ok(st) => st,
                        Err(_) => continue, // raced away
                    };
                    if sys::is_whiteout_stat(&st) {
                        seen.insert(e.name);
                        continue;
                    }
                    Kind::from_mode(st.st_mode)
                }
            };
            let ino = match self.nodes.peek(node.id, &e.name) {
                Some(id) if !NodeTable::is_reissued(id) => id,
                Some(id) => self.nodes.get(id).map_or(id, |n| n.st_ino()),
                // An upper directory's st_ino is its lower copy's: resolve it as lookup would.
                None if kind == Kind::Dir && self.layers.is_upper(l) => {
                    match self.resolve(node, &e.name)? {
                        Some(f) => self.node_id(&f),
                        None => continue,
                    }
                }
                // An impure upper directory may hold copies that keep their origin's number.
                None if impure && self.layers.is_upper(l) => self
                    .origin_ino(XTarget::At(dfd.as_fd(), &e.name), e.ino)
                    .unwrap_or_else(|| self.layers.union_ino(l, e.ino)),
                None => self.layers.union_ino(l, e.ino),
            };
            seen.insert(e.name.clone());
            out.push(DirEntry {
                name: e.name,
                ino,
                kind,
            });
        }
        seen.extend(hide_below);
        Ok(())
    }
}
