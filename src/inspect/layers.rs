//! Per-layer maps: walk each layer (kernel overlayfs format, or OCI `.wh.` names) from the
//! bottom up over the merged view of the layers below it, and count what it adds, changes and
//! deletes, its own size, and the bytes of lower files it hides (data that still takes disk
//! space but can no longer be seen).
//!
//! Layers are opened openat-style with O_NOFOLLOW and only read; nothing is followed.

use std::collections::{BTreeMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use serde::Serialize;

use crate::error::{Context, Result};
use crate::sys;
use crate::union::format::{self, WH_OPAQUE, WH_PREFIX};

/// One layer to map: a name for people and its directory.
#[derive(Clone, Debug)]
pub struct LayerSpec {
    pub label: String,
    pub dir: PathBuf,
    /// The store's name for it ("sha256:...", "container NAME"), if it came from the store.
    pub store: Option<String>,
}

/// What one layer does to the view below it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LayerMap {
    pub label: String,
    pub dir: PathBuf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
    /// Names new in the union.
    pub adds: u64,
    /// Names that replace a lower object (a file rewritten, a directory made opaque, a type
    /// change); directories merely passed through are not counted.
    pub changes: u64,
    /// Names removed from the union (whiteouts, and names an opaque directory hides).
    pub deletes: u64,
    pub opaque_dirs: u64,
    pub redirects: u64,
    /// Entries in the layer (whiteouts and markers excluded).
    pub entries: u64,
    /// Bytes of regular files in the layer (each hard-linked inode once).
    pub size_bytes: u64,
    /// Bytes of lower files this layer replaces or deletes.
    pub hides_bytes: u64,
}

#[derive(Clone, Copy)]
struct Seen {
    bytes: u64,
    dir: bool,
}

/// What the walk finds in one layer, in walk order (parents before children).
enum Item {
    Whiteout,
    Dir {
        opaque: bool,
        redirect: Option<Vec<u8>>,
    },
    Other {
        bytes: u64,
    },
}

fn join(prefix: &[u8], name: &OsStr) -> Vec<u8> {
    let mut p = prefix.to_vec();
    p.push(b'/');
    p.extend_from_slice(name.as_bytes());
    p
}

/// Keys of `view` strictly under `p` ("p/..."): "p/" <= k < "p0" ('0' follows '/').
fn under(p: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let mut lo = p.to_vec();
    lo.push(b'/');
    let mut hi = p.to_vec();
    hi.push(b'0');
    (lo, hi)
}

/// Remove `p` and everything under it; the bytes removed and whether `p` existed.
fn remove_tree(view: &mut BTreeMap<Vec<u8>, Seen>, p: &[u8]) -> (u64, bool) {
    let (lo, hi) = under(p);
    let keys: Vec<Vec<u8>> = view.range(lo..hi).map(|(k, _)| k.clone()).collect();
    let mut bytes = 0;
    for k in keys {
        bytes += view.remove(&k).map_or(0, |s| s.bytes);
    }
    match view.remove(p) {
        Some(s) => (bytes + s.bytes, true),
        None => (bytes, false),
    }
}

struct Walk {
    items: Vec<(Vec<u8>, Item)>,
    inodes: HashSet<u64>,
    size: u64,
}

impl Walk {
    fn dir(&mut self, fd: BorrowedFd<'_>, prefix: &[u8], depth: usize) -> Result<()> {
        if depth > 4096 {
            return Ok(());
        }
        let reader = sys::reopen(fd, libc::O_RDONLY | libc::O_DIRECTORY)?;
        let mut names: Vec<OsString> = sys::read_dir_fd(reader.as_fd())?
            .into_iter()
            .map(|e| e.name)
            .collect();
        names.sort();
        for name in names {
            let b = name.as_bytes();
            if b == WH_OPAQUE || b == WH_PREFIX {
                continue;
            }
            if let Some(hidden) = format::oci_whited_out(&name) {
                self.items.push((join(prefix, hidden), Item::Whiteout));
                continue;
            }
            let st = match sys::statat(fd, &name) {
                Ok(st) => st,
                Err(_) => continue, // gone meanwhile
            };
            let p = join(prefix, &name);
            if format::is_whiteout_at(fd, &name, &st) {
                self.items.push((p, Item::Whiteout));
            } else if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
                let child: OwnedFd = sys::openat(fd, &name, libc::O_PATH | libc::O_DIRECTORY, 0)?;
                let m = format::dir_markers(child.as_fd());
                self.items.push((
                    p.clone(),
                    Item::Dir {
                        opaque: m.opaque,
                        redirect: m.redirect,
                    },
                ));
                self.dir(child.as_fd(), &p, depth + 1)?;
            } else {
                let regular = st.st_mode & libc::S_IFMT == libc::S_IFREG;
                let bytes = if regular { st.st_size as u64 } else { 0 };
                if regular && (st.st_nlink <= 1 || self.inodes.insert(st.st_ino)) {
                    self.size += bytes;
                }
                self.items.push((p, Item::Other { bytes }));
            }
        }
        Ok(())
    }
}

/// Map `layers` (top first, as mounts list them). Results are top first too.
pub fn map_layers(layers: &[LayerSpec], mut progress: impl FnMut(&str)) -> Result<Vec<LayerMap>> {
    let mut view: BTreeMap<Vec<u8>, Seen> = BTreeMap::new();
    let mut out = Vec::new();
    for spec in layers.iter().rev() {
        progress(&spec.label);
        let root = sys::open_dir_path(&spec.dir).ctx(format!("layer {}", spec.dir.display()))?;
        let mut w = Walk {
            items: Vec::new(),
            inodes: HashSet::new(),
            size: 0,
        };
        w.dir(root.as_fd(), b"", 0)
            .map_err(|e| e.context(format!("layer {}", spec.dir.display())))?;
        let mut m = LayerMap {
            label: spec.label.clone(),
            dir: spec.dir.clone(),
            store: spec.store.clone(),
            size_bytes: w.size,
            ..LayerMap::default()
        };
        // A data-only layer adds no names to the tree: only its size and entries count.
        if spec.label.starts_with("data") {
            m.entries = w.items.len() as u64;
            out.push(m);
            continue;
        }
        // A redirected (renamed) directory brings its lower contents along: move them first,
        // before the whiteout at the old name removes them.
        let mut moved_from: HashSet<Vec<u8>> = HashSet::new();
        for (p, it) in &w.items {
            if let Item::Dir {
                redirect: Some(r), ..
            } = it
            {
                m.redirects += 1;
                let from: Vec<u8> = if r.starts_with(b"/") {
                    r.clone()
                } else {
                    let parent = &p[..p.iter().rposition(|&b| b == b'/').unwrap_or(0)];
                    join(parent, OsStr::from_bytes(r))
                };
                let (lo, hi) = under(&from);
                let moved: Vec<(Vec<u8>, Seen)> = view
                    .range(lo..hi)
                    .map(|(k, s)| ([p.as_slice(), &k[from.len()..]].concat(), *s))
                    .collect();
                view.extend(moved);
                moved_from.insert(from);
            }
        }
        for (p, it) in w.items {
            match it {
                Item::Whiteout => {
                    let (bytes, existed) = remove_tree(&mut view, &p);
                    // The old name of a renamed directory: moved, not deleted.
                    if existed && !moved_from.contains(&p) {
                        m.deletes += 1;
                        m.hides_bytes += bytes;
                    }
                }
                Item::Dir { opaque, redirect } => {
                    m.entries += 1;
                    match view.get(&p).copied() {
                        Some(s) if s.dir => {
                            if opaque {
                                m.opaque_dirs += 1;
                                m.changes += 1;
                                let (lo, hi) = under(&p);
                                let hidden: Vec<Vec<u8>> =
                                    view.range(lo..hi).map(|(k, _)| k.clone()).collect();
                                for k in hidden {
                                    // Direct children count as deletes; their subtrees go too.
                                    if !k[p.len() + 1..].contains(&b'/') {
                                        m.deletes += 1;
                                    }
                                    m.hides_bytes += view.remove(&k).map_or(0, |s| s.bytes);
                                }
                            }
                        }
                        Some(_) => {
                            m.changes += 1;
                            m.hides_bytes += remove_tree(&mut view, &p).0;
                        }
                        None if redirect.is_some() => m.changes += 1,
                        None => m.adds += 1,
                    }
                    view.insert(
                        p,
                        Seen {
                            bytes: 0,
                            dir: true,
                        },
                    );
                }
                Item::Other { bytes } => {
                    m.entries += 1;
                    let (old, existed) = remove_tree(&mut view, &p);
                    if existed {
                        m.changes += 1;
                        m.hides_bytes += old;
                    } else {
                        m.adds += 1;
                    }
                    view.insert(p, Seen { bytes, dir: false });
                }
            }
        }
        out.push(m);
    }
    out.reverse();
    Ok(out)
}
