//! A bounded cache of directory fds, keyed by (node id, layer).
//!
//! Nodes hold no fds (the open-file limit here is 20k; a rootfs walk touches 30k+ names), so a
//! directory's real fd in a layer is rebuilt on a miss from its parent's, and evicted by age when
//! a shard is full. Sharded so lookups in different directories don't contend.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

const SHARDS: usize = 16;

struct Entry {
    fd: Arc<OwnedFd>,
    used: u64,
}

pub struct FdCache {
    shards: Vec<Mutex<HashMap<(u64, usize), Entry>>>,
    per_shard: usize,
    clock: AtomicU64,
    /// Lookups answered from the cache, and not (for `layerfs stats`).
    pub hits: AtomicU64,
    pub misses: AtomicU64,
}

impl FdCache {
    pub fn new(capacity: usize) -> FdCache {
        FdCache {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            per_shard: (capacity / SHARDS).max(1),
            clock: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    fn shard(&self, node: u64) -> &Mutex<HashMap<(u64, usize), Entry>> {
        &self.shards[(node as usize) % SHARDS]
    }

    pub fn get(&self, node: u64, layer: usize) -> Option<Arc<OwnedFd>> {
        let mut s = self.shard(node).lock().expect("fd cache lock");
        let Some(e) = s.get_mut(&(node, layer)) else {
            self.misses.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        e.used = self.clock.fetch_add(1, Ordering::Relaxed);
        self.hits.fetch_add(1, Ordering::Relaxed);
        Some(e.fd.clone())
    }

    pub fn put(&self, node: u64, layer: usize, fd: Arc<OwnedFd>) {
        let used = self.clock.fetch_add(1, Ordering::Relaxed);
        let mut s = self.shard(node).lock().expect("fd cache lock");
        if s.len() >= self.per_shard {
            // Evict the older half in one pass so eviction cost is amortised.
            let mut ages: Vec<u64> = s.values().map(|e| e.used).collect();
            ages.sort_unstable();
            let cut = ages[ages.len() / 2];
            s.retain(|_, e| e.used > cut);
        }
        s.insert((node, layer), Entry { fd, used });
    }

    /// Close every cached fd (those in use stay open until their user is done): the
    /// process ran out of descriptors, and the cache must never be why a request fails.
    pub fn shed(&self) {
        for s in &self.shards {
            s.lock().expect("fd cache lock").clear();
        }
    }

    /// Forget every fd of a node (it left the table, or its layers changed).
    pub fn drop_node(&self, node: u64) {
        self.shard(node)
            .lock()
            .expect("fd cache lock")
            .retain(|k, _| k.0 != node);
    }

    pub fn drop_one(&self, node: u64, layer: usize) {
        self.shard(node)
            .lock()
            .expect("fd cache lock")
            .remove(&(node, layer));
    }
}
