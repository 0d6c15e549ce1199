//! Name sets of lower-layer directories, so a lookup learns "not in this layer" without a
//! syscall. Lower layers never change, so a directory is read once. A directory merged over
//! many layers gets one index of which layers hold each name, so a lookup there costs one hash
//! probe and one fstatat however deep the stack (a name in one layer of 100: not 100 probes).

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::hash::BuildHasher;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::fanout;
use super::format;
use crate::error::Result;
use crate::sys;

const SHARDS: usize = 16;

/// The names of one lower directory in one layer (markers included), as 32-bit hashes: a
/// rootfs walk keeps one set per directory, so a name costs ~6 bytes, not a string. A hash
/// that is not there means the name is not either. One that is may, rarely, be another
/// name's: "present" is then answered by the fstatat that follows anyway, and "whited out"
/// is confirmed on disk before it hides anything (`Union::probe_lower`).
pub struct LayerNames {
    hashes: hashbrown::HashTable<u32>,
}

/// A name's hash (keys random per process: names come from images).
fn hash(b: &[u8]) -> u32 {
    static STATE: std::sync::OnceLock<std::hash::RandomState> = std::sync::OnceLock::new();
    STATE.get_or_init(Default::default).hash_one(b) as u32
}

/// Where a 32-bit hash sits in the table (which wants 64 bits, its top ones the most).
fn spread(h: &u32) -> u64 {
    (*h as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// The names of a directory (by an fd of it, as a layer's directory fds are O_PATH).
fn read_names(dir: BorrowedFd<'_>) -> Result<Vec<OsString>> {
    let rfd = sys::openat(dir, OsStr::new("."), libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
    Ok(sys::read_dir_fd(rfd.as_fd())?
        .into_iter()
        .map(|e| e.name)
        .collect())
}

impl LayerNames {
    fn read(dir: BorrowedFd<'_>) -> Result<LayerNames> {
        Ok(LayerNames::of(read_names(dir)?.iter().map(|n| &**n)))
    }

    fn of<'a>(names: impl ExactSizeIterator<Item = &'a OsStr>) -> LayerNames {
        let mut hashes = hashbrown::HashTable::with_capacity(names.len());
        for n in names {
            let h = hash(n.as_bytes());
            if hashes.find(spread(&h), |&x| x == h).is_none() {
                hashes.insert_unique(spread(&h), h, spread);
            }
        }
        LayerNames { hashes }
    }

    fn contains(&self, name: &[u8]) -> bool {
        let h = hash(name);
        self.hashes.find(spread(&h), |&x| x == h).is_some()
    }

    /// What this layer's directory says about `name`: `WhitedOut` only as a hash match,
    /// which the caller confirms.
    pub fn probe(&self, name: &OsStr) -> Probe {
        if self.contains(name.as_bytes()) {
            return Probe::Present;
        }
        // `.wh.NAME`, built on the stack: this runs for every name absent from a layer.
        let mut wh = [0u8; format::WH_PREFIX.len() + 255];
        let len = format::WH_PREFIX.len() + name.len();
        match wh.get_mut(..len) {
            Some(key) => {
                key[..format::WH_PREFIX.len()].copy_from_slice(format::WH_PREFIX);
                key[format::WH_PREFIX.len()..].copy_from_slice(name.as_bytes());
                if self.contains(key) {
                    Probe::WhitedOut
                } else {
                    Probe::Absent
                }
            }
            None => Probe::Absent,
        }
    }
}

/// What a lower layer's directory listing says about a name, without a syscall.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Probe {
    Absent,
    /// Listed (it may still be a whiteout device or a directory: fstatat tells).
    Present,
    /// Not listed, but deleted here by an OCI `.wh.NAME` file.
    WhitedOut,
}

struct Entry {
    names: Arc<LayerNames>,
    used: u64,
}

/// For a directory with many lower layers: which of them hold each name (or an OCI whiteout
/// of it), so a lookup asks one map instead of every layer's set in turn. It replaces the
/// per-layer sets for that directory (they are never loaded for it).
pub struct Merged {
    lowers: Vec<usize>,
    /// name -> (layer, listed itself: else only its `.wh.` whiteout), top first.
    at: HashMap<OsString, Vec<(usize, bool)>>,
}

impl Merged {
    fn build(lowers: &[usize], sets: Vec<Vec<OsString>>) -> Merged {
        let mut at: HashMap<OsString, Vec<(usize, bool)>> = HashMap::new();
        for (&l, set) in lowers.iter().zip(sets) {
            for n in set {
                let (key, listed) = match format::oci_whited_out(&n) {
                    Some(hidden) => (hidden.to_os_string(), false),
                    None => (n, true),
                };
                let v = at.entry(key).or_default();
                match v.last_mut() {
                    Some(last) if last.0 == l => last.1 |= listed,
                    _ => v.push((l, listed)),
                }
            }
        }
        Merged {
            lowers: lowers.to_vec(),
            at,
        }
    }

    /// Read each lower layer's listing of a directory (`dir` gives a layer's fd) and merge.
    pub fn read(
        lowers: &[usize],
        dir: impl Fn(usize) -> Result<Arc<std::os::fd::OwnedFd>>,
    ) -> Result<Merged> {
        let fds = lowers.iter().map(|&l| dir(l)).collect::<Result<Vec<_>>>()?;
        let Some((top, rest)) = fds.split_first() else {
            return Ok(Merged::build(lowers, Vec::new()));
        };
        // Many listings, each a disk read on a cold cache: if the first was, the rest are
        // read side by side.
        let started = Instant::now();
        let mut sets = vec![read_names(top.as_fd())?];
        let read = |fd: &Arc<std::os::fd::OwnedFd>| read_names(fd.as_fd());
        let rest = if started.elapsed() > fanout::cold() {
            log::debug!("cold: reading {} listings side by side", rest.len());
            fanout::map(rest, read)
        } else {
            rest.iter().map(read).collect()
        };
        for set in rest {
            sets.push(set?);
        }
        Ok(Merged::build(lowers, sets))
    }

    pub fn from_parts(lowers: Vec<usize>, at: HashMap<OsString, Vec<(usize, bool)>>) -> Merged {
        Merged { lowers, at }
    }

    pub fn lowers(&self) -> &[usize] {
        &self.lowers
    }

    pub fn names(&self) -> &HashMap<OsString, Vec<(usize, bool)>> {
        &self.at
    }

    /// The layers whose listings hold `name` or its `.wh.` whiteout, top first (`true`: the
    /// name itself).
    pub fn hits(&self, name: &OsStr) -> &[(usize, bool)] {
        self.at.get(name).map_or(&[], |v| v.as_slice())
    }

    /// What layer `l`'s listing says about `name` (as `LayerNames::probe` would).
    pub fn probe(&self, name: &OsStr, l: usize) -> Probe {
        match self.at.get(name).and_then(|v| v.iter().find(|e| e.0 == l)) {
            None => Probe::Absent,
            Some((_, true)) => Probe::Present,
            Some((_, false)) => Probe::WhitedOut,
        }
    }
}

/// Merged indexes by directory node, with their last use.
type MergedShard = Mutex<HashMap<u64, (Arc<Merged>, u64)>>;

/// Directories with more lower layers than this get a `Merged` index.
pub const MERGE_MIN_LAYERS: usize = 8;

pub struct NameIndex {
    shards: Vec<Mutex<HashMap<(u64, usize), Entry>>>,
    merged: Vec<MergedShard>,
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
            merged: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
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

    /// The merged index of directory `node` over lower layers `lowers` (top first), built
    /// once by `build` (from each layer's listing, or from the catalog).
    pub fn merged(
        &self,
        node: u64,
        lowers: &[usize],
        build: impl FnOnce() -> Result<Arc<Merged>>,
    ) -> Result<Arc<Merged>> {
        let shard = &self.merged[(node as usize) % SHARDS];
        let now = self.clock.fetch_add(1, Ordering::Relaxed);
        if let Some((m, used)) = shard.lock().expect("names lock").get_mut(&node)
            && m.lowers == lowers
        {
            *used = now;
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(m.clone());
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        let m = build()?;
        let mut s = shard.lock().expect("names lock");
        // Few directories have many layers; a small bound keeps memory flat.
        if s.len() >= (self.per_shard / 8).max(8) {
            let mut ages: Vec<u64> = s.values().map(|e| e.1).collect();
            ages.sort_unstable();
            let cut = ages[ages.len() / 2];
            s.retain(|_, e| e.1 > cut);
        }
        s.insert(node, (m.clone(), now));
        Ok(m)
    }

    pub fn drop_node(&self, node: u64) {
        self.shards[(node as usize) % SHARDS]
            .lock()
            .expect("names lock")
            .retain(|k, _| k.0 != node);
        self.merged[(node as usize) % SHARDS]
            .lock()
            .expect("names lock")
            .remove(&node);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_set_answers_present_whited_out_and_absent() {
        let names = [".wh.gone", "here", ".wh..wh..opq", "also-here"].map(OsStr::new);
        let set = LayerNames::of(names.into_iter());
        assert_eq!(set.probe(OsStr::new("here")), Probe::Present);
        assert_eq!(set.probe(OsStr::new("also-here")), Probe::Present);
        assert_eq!(set.probe(OsStr::new("gone")), Probe::WhitedOut);
        assert_eq!(set.probe(OsStr::new("elsewhere")), Probe::Absent);
        // The longest name a layer can hold still has its `.wh.` form asked for.
        let long = OsString::from("n".repeat(255));
        assert_eq!(set.probe(&long), Probe::Absent);
    }
}
