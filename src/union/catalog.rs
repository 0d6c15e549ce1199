//! The lower catalog (`catalog=FILE`): what lookups learned about directories merged over many
//! lower layers, kept across mounts. Lower layers never change, so which layers list each name
//! of such a directory, and in which layers a subdirectory's lower copies are, is the same at
//! every mount of the same stack. With the catalog, a lookup in a directory merged over 100
//! layers reads the one layer that has the name instead of 100 directories from a cold disk.
//!
//! Only directories with more than `MERGE_MIN_LAYERS` lower layers are kept (shallower ones
//! cost little to read). The file names the lower layers it was built over (each root's device
//! and inode); at a mount over other layers it is ignored and rebuilt. It is written when the
//! daemon exits (temp file + fsync + rename) and ends in a SHA-256 of its contents, so a torn
//! or damaged file is ignored, never trusted. It trusts the lower layers not to change while
//! it exists, as image-store layers never do (`catalog=` is for immutable layers).

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::io::Write;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Once, RwLock};

use sha2::{Digest, Sha256};

use super::layer::LayerStack;
use super::names::Merged;
use crate::error::{Context, Error, Result};

const MAGIC: &[u8; 16] = b"LAYERFS-CATALOG1";

/// A directory, as stable across mounts: its topmost lower copy's layer (counted from the top
/// lower layer) and that copy's inode number. The root is `ROOT_KEY`.
pub type DirKey = (u32, u64);
pub const ROOT_KEY: DirKey = (u32::MAX, 0);

/// A subdirectory's lower copies, with the parent's lower layers they were resolved under.
struct Child {
    parent_lowers: Vec<usize>,
    lowers: Vec<usize>,
}

pub struct Catalog {
    path: PathBuf,
    /// Each lower layer root's (st_dev, st_ino): what the catalog was built over.
    stamp: Vec<(u64, u64)>,
    /// Layer index of the top lower layer in this mount (1 with an upper layer, else 0).
    base: usize,
    dirs: RwLock<HashMap<DirKey, Arc<Merged>>>,
    /// By parent directory, then name (looked up without building a key).
    children: RwLock<HashMap<DirKey, HashMap<OsString, Child>>>,
    dirty: AtomicBool,
    /// Lookups answered from the catalog (for `layerfs stats`).
    pub answers: AtomicU64,
}

/// A catalog read when first needed: reading it (its checksum, then a map entry per name)
/// took 0.35 ms of the mount command's time, and nothing needs it before the first lookup
/// in a deep directory. Read by a thread of its own while the mount was set up, it made the
/// mount slower still: both CPUs are busy then.
pub struct Lazy {
    catalog: Catalog,
    read: Once,
}

impl Lazy {
    pub fn new(path: &Path, layers: &LayerStack) -> Lazy {
        let base = layers.first_lower();
        let stamp = layers.layers[base..]
            .iter()
            .map(|l| (l.dev, l.ino))
            .collect();
        Lazy {
            catalog: Catalog::empty(path.to_path_buf(), stamp, base),
            read: Once::new(),
        }
    }

    /// The catalog, read on the first call.
    pub fn get(&self) -> &Catalog {
        self.read.call_once(|| self.catalog.read_file());
        &self.catalog
    }

    /// The catalog if something needed it (a mount that never read it has nothing to save).
    pub fn if_read(&self) -> Option<&Catalog> {
        self.read.is_completed().then_some(&self.catalog)
    }
}

impl Catalog {
    /// Take in what the file holds if it was built over these lower layers; else stay empty
    /// (a missing, stale or damaged file is not an error).
    fn read_file(&self) {
        let path = self.path.as_path();
        let started = std::time::Instant::now();
        match std::fs::read(path) {
            Ok(data) => match self.decode(&data) {
                Ok(()) => {
                    let (dirs, subdirs) = self.size();
                    log::info!(
                        "catalog {}: {dirs} directories, {subdirs} subdirectories, \
                         {} bytes read in {:?}",
                        path.display(),
                        data.len(),
                        started.elapsed()
                    )
                }
                Err(e) => {
                    log::info!("catalog {} not used ({e}); rebuilding it", path.display());
                    self.dirs.write().expect("catalog lock").clear();
                    self.children.write().expect("catalog lock").clear();
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                log::info!("catalog {}: new", path.display())
            }
            Err(e) => log::warn!("catalog {} not read: {e}", path.display()),
        }
    }

    fn empty(path: PathBuf, stamp: Vec<(u64, u64)>, base: usize) -> Catalog {
        Catalog {
            path,
            stamp,
            base,
            dirs: RwLock::new(HashMap::new()),
            children: RwLock::new(HashMap::new()),
            dirty: AtomicBool::new(false),
            answers: AtomicU64::new(0),
        }
    }

    /// The merged index of directory `key` over `lowers`, if known.
    pub fn merged(&self, key: DirKey, lowers: &[usize]) -> Option<Arc<Merged>> {
        let d = self.dirs.read().expect("catalog lock");
        let m = d.get(&key).filter(|m| m.lowers() == lowers).cloned();
        self.answered(m.is_some());
        m
    }

    fn answered(&self, yes: bool) {
        if yes {
            self.answers.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// How many directories and subdirectories it knows.
    pub fn size(&self) -> (usize, usize) {
        (
            self.dirs.read().expect("catalog lock").len(),
            self.children
                .read()
                .expect("catalog lock")
                .values()
                .map(HashMap::len)
                .sum(),
        )
    }

    pub fn record_merged(&self, key: DirKey, m: &Arc<Merged>) {
        let mut d = self.dirs.write().expect("catalog lock");
        if d.get(&key).is_none_or(|old| old.lowers() != m.lowers()) {
            d.insert(key, m.clone());
            self.dirty.store(true, Ordering::Relaxed);
        }
    }

    /// The lower layers of subdirectory `name` of directory `key` (whose lower layers are
    /// `parent_lowers`), if known.
    pub fn child(&self, key: DirKey, parent_lowers: &[usize], name: &OsStr) -> Option<Vec<usize>> {
        let c = self.children.read().expect("catalog lock");
        let l = c
            .get(&key)
            .and_then(|m| m.get(name))
            .filter(|c| c.parent_lowers == parent_lowers)
            .map(|c| c.lowers.clone());
        self.answered(l.is_some());
        l
    }

    pub fn record_child(
        &self,
        key: DirKey,
        parent_lowers: &[usize],
        name: &OsStr,
        lowers: &[usize],
    ) {
        let same = |c: &HashMap<DirKey, HashMap<OsString, Child>>| {
            c.get(&key)
                .and_then(|m| m.get(name))
                .is_some_and(|o| o.parent_lowers == parent_lowers && o.lowers == lowers)
        };
        if same(&self.children.read().expect("catalog lock")) {
            return;
        }
        let mut c = self.children.write().expect("catalog lock");
        c.entry(key).or_default().insert(
            name.to_os_string(),
            Child {
                parent_lowers: parent_lowers.to_vec(),
                lowers: lowers.to_vec(),
            },
        );
        self.dirty.store(true, Ordering::Relaxed);
    }

    /// Write the catalog if this mount learned something new. Called once, at exit.
    pub fn save(&self) -> Result<()> {
        if !self.dirty.swap(false, Ordering::Relaxed) {
            return Ok(());
        }
        self.merge_from_disk();
        let data = self.encode();
        let name = self
            .path
            .file_name()
            .ok_or_else(|| Error::msg("catalog path has no file name"))?;
        let mut tmp_name = OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".{}.tmp", std::process::id()));
        let tmp = self.path.with_file_name(tmp_name);
        let write = || -> std::io::Result<()> {
            // The daemon runs with umask 0: say the mode.
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o644)
                .open(&tmp)?;
            f.write_all(&data)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.path)
        };
        let r = write().ctx(format!("writing catalog {}", self.path.display()));
        if r.is_err() {
            let _ = std::fs::remove_file(&tmp);
        } else {
            log::info!(
                "catalog {} written ({} bytes)",
                self.path.display(),
                data.len()
            );
        }
        r
    }

    /// Keep what another mount of the same layers wrote meanwhile (containers of one image
    /// run side by side): entries this mount does not have are taken from the file.
    fn merge_from_disk(&self) {
        let Ok(data) = std::fs::read(&self.path) else {
            return;
        };
        let other = Catalog::empty(self.path.clone(), self.stamp.clone(), self.base);
        if other.decode(&data).is_err() {
            return;
        }
        let mut dirs = self.dirs.write().expect("catalog lock");
        for (k, m) in other.dirs.into_inner().expect("catalog lock") {
            dirs.entry(k).or_insert(m);
        }
        drop(dirs);
        let mut children = self.children.write().expect("catalog lock");
        for (k, names) in other.children.into_inner().expect("catalog lock") {
            let mine = children.entry(k).or_default();
            for (n, c) in names {
                mine.entry(n).or_insert(c);
            }
        }
    }

    fn rel(&self, l: usize) -> u32 {
        (l - self.base) as u32
    }

    fn encode(&self) -> Vec<u8> {
        let mut w = Vec::new();
        w.extend_from_slice(MAGIC);
        put_u32(&mut w, self.stamp.len() as u32);
        for &(dev, ino) in &self.stamp {
            put_u64(&mut w, dev);
            put_u64(&mut w, ino);
        }
        let dirs = self.dirs.read().expect("catalog lock");
        put_u32(&mut w, dirs.len() as u32);
        for (key, m) in dirs.iter() {
            put_key(&mut w, *key);
            self.put_layers(&mut w, m.lowers());
            put_u32(&mut w, m.names().len() as u32);
            for (name, at) in m.names() {
                put_bytes(&mut w, name.as_bytes());
                put_u32(&mut w, at.len() as u32);
                for &(l, listed) in at {
                    put_u32(&mut w, self.rel(l));
                    w.push(u8::from(listed));
                }
            }
        }
        let children = self.children.read().expect("catalog lock");
        put_u32(
            &mut w,
            children.values().map(HashMap::len).sum::<usize>() as u32,
        );
        for (key, names) in children.iter() {
            for (name, c) in names {
                put_key(&mut w, *key);
                put_bytes(&mut w, name.as_bytes());
                self.put_layers(&mut w, &c.parent_lowers);
                self.put_layers(&mut w, &c.lowers);
            }
        }
        let sum = Sha256::digest(&w);
        w.extend_from_slice(&sum);
        w
    }

    fn put_layers(&self, w: &mut Vec<u8>, ls: &[usize]) {
        put_u32(w, ls.len() as u32);
        for &l in ls {
            put_u32(w, self.rel(l));
        }
    }

    fn decode(&self, data: &[u8]) -> std::result::Result<(), &'static str> {
        if data.len() < MAGIC.len() + 32 || &data[..MAGIC.len()] != MAGIC {
            return Err("not a layerfs catalog");
        }
        let (body, sum) = data.split_at(data.len() - 32);
        if Sha256::digest(body).as_slice() != sum {
            return Err("checksum mismatch");
        }
        let mut r = Reader {
            b: &body[MAGIC.len()..],
        };
        let n = r.u32()? as usize;
        let mut stamp = Vec::new();
        for _ in 0..n {
            stamp.push((r.u64()?, r.u64()?));
        }
        if stamp != self.stamp {
            return Err("built over other lower layers");
        }
        let layers = self.stamp.len();
        let base = self.base;
        let layer = |rel: u32| -> std::result::Result<usize, &'static str> {
            if (rel as usize) < layers {
                Ok(rel as usize + base)
            } else {
                Err("layer out of range")
            }
        };
        let layer_list = |r: &mut Reader| -> std::result::Result<Vec<usize>, &'static str> {
            let n = r.u32()? as usize;
            (0..n).map(|_| layer(r.u32()?)).collect()
        };
        // Sized from the counts (a map grown entry by entry rehashed its way up), capped
        // so that a damaged count cannot ask for much.
        let room = |n: u32| (n as usize).min(1 << 16);
        let n = r.u32()?;
        let mut dirs = HashMap::with_capacity(room(n));
        for _ in 0..n {
            let key = r.key()?;
            let lowers = layer_list(&mut r)?;
            let n = r.u32()?;
            let mut at = HashMap::with_capacity(room(n));
            for _ in 0..n {
                let name = OsString::from_vec(r.bytes()?.to_vec());
                let n = r.u32()?;
                let mut v = Vec::with_capacity(room(n).min(layers));
                for _ in 0..n {
                    let l = layer(r.u32()?)?;
                    v.push((l, r.u8()? != 0));
                }
                at.insert(name, v);
            }
            dirs.insert(key, Arc::new(Merged::from_parts(lowers, at)));
        }
        let mut children: HashMap<DirKey, HashMap<OsString, Child>> = HashMap::new();
        for _ in 0..r.u32()? {
            let key = r.key()?;
            let name = OsString::from_vec(r.bytes()?.to_vec());
            let parent_lowers = layer_list(&mut r)?;
            let lowers = layer_list(&mut r)?;
            children.entry(key).or_default().insert(
                name,
                Child {
                    parent_lowers,
                    lowers,
                },
            );
        }
        if !r.b.is_empty() {
            return Err("trailing bytes");
        }
        *self.dirs.write().expect("catalog lock") = dirs;
        *self.children.write().expect("catalog lock") = children;
        Ok(())
    }
}

fn put_u32(w: &mut Vec<u8>, v: u32) {
    w.extend_from_slice(&v.to_le_bytes());
}

fn put_u64(w: &mut Vec<u8>, v: u64) {
    w.extend_from_slice(&v.to_le_bytes());
}

fn put_key(w: &mut Vec<u8>, (l, ino): DirKey) {
    put_u32(w, l);
    put_u64(w, ino);
}

fn put_bytes(w: &mut Vec<u8>, b: &[u8]) {
    put_u32(w, b.len() as u32);
    w.extend_from_slice(b);
}

struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], &'static str> {
        if self.b.len() < n {
            return Err("truncated");
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }

    fn u8(&mut self) -> std::result::Result<u8, &'static str> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> std::result::Result<u32, &'static str> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    fn u64(&mut self) -> std::result::Result<u64, &'static str> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    fn key(&mut self) -> std::result::Result<DirKey, &'static str> {
        Ok((self.u32()?, self.u64()?))
    }

    fn bytes(&mut self) -> std::result::Result<&'a [u8], &'static str> {
        let n = self.u32()? as usize;
        self.take(n)
    }
}
