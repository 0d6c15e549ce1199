//! The layer stack: one directory fd per layer, opened once at mount; index 0 is the upper
//! layer when there is one, then the lower layers top first (kernel overlayfs order), then
//! the data-only layers, which only hold data that metadata-only copies point at.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Context, Error, Result};
use crate::sys;

pub struct Layer {
    pub path: PathBuf,
    pub root: Arc<OwnedFd>,
    pub dev: u64,
    /// The root's inode number (with `dev`, what the lower catalog was built over).
    pub ino: u64,
    /// Small index of this layer's filesystem among the stack's distinct filesystems.
    pub fs_index: u64,
    /// Its filesystem's UUID, where it has one: what a copy-up origin records.
    pub uuid: Option<[u8; 16]>,
    /// A readable fd on its root: file handles are opened relative to it (an O_PATH fd
    /// won't do).
    pub handles: Option<Arc<OwnedFd>>,
}

pub struct LayerStack {
    /// The union's layers, then the data-only ones.
    pub layers: Vec<Layer>,
    /// How many of `layers` make the union (the rest are data-only).
    union: usize,
    pub has_upper: bool,
    /// More than one filesystem under the stack: st_ino gets the fs index in its high bits.
    pub multi_fs: bool,
}

impl LayerStack {
    /// Open `upper` (if any), the `lowers` (top first) and the data-only layers `data`. Each
    /// must be a directory.
    pub fn open(upper: Option<&Path>, lowers: &[PathBuf], data: &[PathBuf]) -> Result<LayerStack> {
        if lowers.is_empty() {
            return Err(Error::msg(
                "lowerdir is empty: give at least one lower layer",
            ));
        }
        let mut paths: Vec<&Path> = Vec::new();
        if let Some(u) = upper {
            paths.push(u);
        }
        paths.extend(lowers.iter().map(|p| p.as_path()));
        let union = paths.len();
        paths.extend(data.iter().map(|p| p.as_path()));
        let mut devs: HashMap<u64, u64> = HashMap::new();
        type FsIds = (Option<[u8; 16]>, Option<Arc<OwnedFd>>);
        let mut fs_ids: HashMap<u64, FsIds> = HashMap::new();
        let mut layers = Vec::with_capacity(paths.len());
        for p in paths {
            let root = sys::open_dir_path(p).ctx(format!("layer {}", p.display()))?;
            let st = sys::fstat(root.as_fd()).ctx(format!("layer {}", p.display()))?;
            let n = devs.len() as u64;
            let fs_index = *devs.entry(st.st_dev).or_insert(n);
            let (uuid, handles) = fs_ids
                .entry(st.st_dev)
                .or_insert_with(|| {
                    match sys::reopen(root.as_fd(), libc::O_RDONLY | libc::O_DIRECTORY) {
                        Ok(fd) => (sys::fs_uuid(fd.as_fd()).ok(), Some(Arc::new(fd))),
                        Err(_) => (None, None),
                    }
                })
                .clone();
            layers.push(Layer {
                path: p.to_path_buf(),
                root: Arc::new(root),
                dev: st.st_dev,
                ino: st.st_ino,
                fs_index,
                uuid,
                handles,
            });
        }
        Ok(LayerStack {
            multi_fs: devs.len() > 1,
            layers,
            union,
            has_upper: upper.is_some(),
        })
    }

    /// The number of layers the union is made of (the data-only ones not counted).
    pub fn len(&self) -> usize {
        self.union
    }

    pub fn is_empty(&self) -> bool {
        self.union == 0
    }

    /// The data-only layers' indices.
    pub fn data_only(&self) -> std::ops::Range<usize> {
        self.union..self.layers.len()
    }

    /// Index of the topmost lower layer.
    pub fn first_lower(&self) -> usize {
        usize::from(self.has_upper)
    }

    pub fn is_upper(&self, layer: usize) -> bool {
        self.has_upper && layer == 0
    }

    /// The st_ino layerfs reports for a real inode in `layer`: the real number when the whole
    /// stack is on one filesystem (as the kernel does), else made unique with the fs index.
    pub fn union_ino(&self, layer: usize, real_ino: u64) -> u64 {
        let ino = if self.multi_fs {
            (self.layers[layer].fs_index << 56) ^ real_ino
        } else {
            real_ino
        };
        // Node ids are these numbers, and FUSE reserves 1 for the root.
        if ino <= 1 { ino | 1 << 63 } else { ino }
    }

    /// The topmost lower layer on the filesystem `dev`.
    pub fn lower_on(&self, dev: u64) -> Option<usize> {
        (self.first_lower()..self.len()).find(|&l| self.layers[l].dev == dev)
    }

    /// The real inode number behind `union_ino(layer, real)`.
    pub fn real_ino(&self, layer: usize, union_ino: u64) -> u64 {
        let ino = if union_ino & !(1 << 63) <= 1 {
            union_ino & !(1 << 63)
        } else {
            union_ino
        };
        if self.multi_fs {
            (self.layers[layer].fs_index << 56) ^ ino
        } else {
            ino
        }
    }
}
