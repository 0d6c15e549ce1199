//! Open files: a handle holds the real fd and the layer it came from, so a reader of a lower
//! file can follow a later copy-up of the same node. (Directories have no handles: the kernel
//! is told there is no opendir, and listings live on the directory's node.)

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use super::node::Node;

pub struct Handle {
    pub node: Arc<Node>,
    /// (fd, layer it is open in)
    pub fd: RwLock<(Arc<OwnedFd>, usize)>,
    pub flags: i32,
}

pub enum Open {
    File(Arc<Handle>),
}

const SHARDS: usize = 16;

pub struct HandleTable {
    shards: Vec<RwLock<HashMap<u64, Open>>>,
    next: AtomicU64,
    /// Open files, for `layerfs stats`.
    pub open_files: AtomicU64,
}

impl Default for HandleTable {
    fn default() -> Self {
        Self::new()
    }
}

impl HandleTable {
    pub fn new() -> HandleTable {
        HandleTable {
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            next: AtomicU64::new(1),
            open_files: AtomicU64::new(0),
        }
    }

    fn shard(&self, fh: u64) -> &RwLock<HashMap<u64, Open>> {
        &self.shards[(fh as usize) % SHARDS]
    }

    pub fn insert(&self, o: Open) -> u64 {
        let fh = self.next.fetch_add(1, Ordering::Relaxed);
        self.gauge(&o).fetch_add(1, Ordering::Relaxed);
        self.shard(fh).write().expect("handle lock").insert(fh, o);
        fh
    }

    pub fn file(&self, fh: u64) -> Option<Arc<Handle>> {
        match self.shard(fh).read().expect("handle lock").get(&fh) {
            Some(Open::File(h)) => Some(h.clone()),
            _ => None,
        }
    }

    pub fn remove(&self, fh: u64) -> Option<Open> {
        let o = self.shard(fh).write().expect("handle lock").remove(&fh);
        if let Some(o) = &o {
            self.gauge(o).fetch_sub(1, Ordering::Relaxed);
        }
        o
    }

    fn gauge(&self, o: &Open) -> &AtomicU64 {
        match o {
            Open::File(_) => &self.open_files,
        }
    }
}

impl Handle {
    pub fn fd(&self) -> Arc<OwnedFd> {
        self.fd.read().expect("handle fd lock").0.clone()
    }

    pub fn layer(&self) -> usize {
        self.fd.read().expect("handle fd lock").1
    }

    pub fn raw(&self) -> i32 {
        crate::sys::raw(&self.fd().as_fd())
    }
}
