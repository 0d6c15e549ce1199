//! Name sets of lower-layer directories, so a lookup learns "not in this layer" without a
//! syscall. Lower layers never change, so a directory is read once; this keeps lookup cost flat
//! in the number of layers (a name present in one layer of 100 costs one fstatat, not 200).

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::format;
use crate::error::Result;
use crate::sys;

const SHARDS: usize = 16;

/// The names of one lower directory in one layer (markers included).
pub struct LayerNames {
    names: HashSet<OsString>,
}

impl LayerNames {
    fn read(dir: BorrowedFd<'_>) -> Result<LayerNames> {
        let rfd = sys::openat(dir, OsStr::new("."), libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
        let names = sys::read_dir_fd(rfd.as_fd())?
            .into_iter()
            .map(|e| e.name)
            .collect();
        Ok(LayerNames { names })
    }

    pub fn contains(&self, name: &OsStr) -> bool {
        self.names.contains(name)
    }

    /// Is `name` deleted by an OCI `.wh.NAME` file in this directory?
    pub fn whited_out(&self, name: &OsStr) -> bool {
        self.names.contains(&format::oci_whiteout_name(name))
    }
}

struct Entry {
    names: Arc<LayerNames>,
    used: u64,
}

pub struct NameIndex {
    shards: Vec<Mutex<HashMap<(u64, usize), Entry>>>,
    per_shard: usize,
    clock: AtomicU64,
    /// Lookups answered from the cache, and not (for `layerfs stats`).
    pub hits: AtomicU64,
    pub misses: AtomicU64,
}

impl NameIndex {
    pub fn new(capacity: usize) -> NameIndex {
        NameIndex {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            per_shard: (capacity / SHARDS).max(16),
            clock: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// The names of directory `node` in lower layer `layer` (whose fd is `dir`), read once.
    pub fn get(&self, node: u64, layer: usize, dir: BorrowedFd<'_>) -> Result<Arc<LayerNames>> {
        let shard = &self.shards[(node as usize) % SHARDS];
        let now = self.clock.fetch_add(1, Ordering::Relaxed);
        if let Some(e) = shard.lock().expect("names lock").get_mut(&(node, layer)) {
            e.used = now;
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(e.names.clone());
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        let names = Arc::new(LayerNames::read(dir)?);
        let mut s = shard.lock().expect("names lock");
        if s.len() >= self.per_shard {
            let mut ages: Vec<u64> = s.values().map(|e| e.used).collect();
            ages.sort_unstable();
            let cut = ages[ages.len() / 2];
            s.retain(|_, e| e.used > cut);
        }
        s.insert(
            (node, layer),
            Entry {
                names: names.clone(),
                used: now,
            },
        );
        Ok(names)
    }

    pub fn drop_node(&self, node: u64) {
        self.shards[(node as usize) % SHARDS]
            .lock()
            .expect("names lock")
            .retain(|k, _| k.0 != node);
    }
}
