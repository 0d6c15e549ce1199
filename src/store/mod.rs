//! The image store: content-addressed layers (by diff_id) extracted once in the kernel
//! overlayfs format, images (config + ordered layers), and tags. Layout in docs/STORE.md.
//!
//! Every durable write is temp + fsync + rename; writers hold an flock on `ROOT/lock`.

pub mod blob;
pub mod changes;
pub mod digest;
pub mod load;
pub mod merged;
pub mod pack;
pub mod reference;
pub mod save;
pub mod unpack;

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Context, Error, Result};
use crate::union::format::MarkerNs;
use digest::Digest;
pub use reference::normalize_ref;

pub const FORMAT_VERSION: &str = "1";

pub struct Store {
    pub root: PathBuf,
    _lock: Option<File>,
}

/// One layer of an image, as recorded in the store.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct LayerRef {
    pub diff_id: Digest,
    /// The blob as distributed (compressed or not), kept for export.
    pub blob: Digest,
    pub media_type: String,
    pub size: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Image {
    /// sha256 of the config JSON, as Docker and OCI define image IDs.
    pub id: Digest,
    pub layers: Vec<LayerRef>,
    pub created: Option<String>,
}

/// Temp file in `dir_tmp`, fsync, rename to `dest`, fsync of its directory: after a crash
/// `dest` holds the old bytes or the new ones, never an empty file.
pub(crate) fn write_atomic(dir_tmp: &Path, dest: &Path, data: &[u8]) -> Result<()> {
    let tmp = dir_tmp.join(format!("w-{}-{}", std::process::id(), rand_suffix()));
    let mut f = File::create(&tmp).ctx(format!("writing {}", tmp.display()))?;
    f.write_all(data)?;
    f.sync_all()?;
    fs::rename(&tmp, dest).ctx(format!("writing {}", dest.display()))?;
    if let Some(p) = dest.parent() {
        File::open(p)?.sync_all()?;
    }
    Ok(())
}

fn rand_suffix() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

impl Store {
    /// The store root: --root, else LAYERFS_ROOT, else /var/lib/layerfs (root) or
    /// $XDG_DATA_HOME/layerfs.
    pub fn default_root() -> PathBuf {
        if let Some(r) = std::env::var_os("LAYERFS_ROOT") {
            return r.into();
        }
        if crate::sys::geteuid() == 0 {
            return "/var/lib/layerfs".into();
        }
        let base = std::env::var_os("XDG_DATA_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
            .unwrap_or_else(|| "/tmp".into());
        base.join("layerfs")
    }

    /// Open (creating) the store; `write` takes the writer lock.
    pub fn open(root: &Path, write: bool) -> Result<Store> {
        for d in [
            "blobs/sha256",
            "layers",
            "images",
            "containers",
            "catalogs",
            "tmp",
        ] {
            fs::create_dir_all(root.join(d)).ctx(format!("store {}", root.display()))?;
        }
        let v = root.join("VERSION");
        match fs::read_to_string(&v) {
            Ok(s) if s.trim() == FORMAT_VERSION => {}
            Ok(s) => {
                return Err(Error::msg(format!(
                    "store {} has format {}, this layerfs reads {FORMAT_VERSION}",
                    root.display(),
                    s.trim()
                )));
            }
            Err(_) => write_atomic(&root.join("tmp"), &v, FORMAT_VERSION.as_bytes())?,
        }
        let lock = if write {
            let f = File::create(root.join("lock"))?;
            // flock(LOCK_EX): one writer at a time; waits for a running load to finish.
            f.lock().ctx("locking the store")?;
            Some(f)
        } else {
            None
        };
        let s = Store {
            root: root.to_path_buf(),
            _lock: lock,
        };
        if write {
            // Staging left by an interrupted load is never referenced: drop it.
            for e in fs::read_dir(root.join("tmp"))?.flatten() {
                let _ = fs::remove_dir_all(e.path()).or_else(|_| fs::remove_file(e.path()));
            }
        }
        Ok(s)
    }

    pub fn tmp(&self) -> PathBuf {
        self.root.join("tmp")
    }

    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(d.hex())
    }

    pub fn layer_dir(&self, diff_id: &Digest) -> PathBuf {
        self.root.join("layers").join(diff_id.hex())
    }

    /// The image's layer dirs, top first (lowerdir order).
    pub fn lowers(&self, img: &Image) -> Vec<PathBuf> {
        img.layers
            .iter()
            .rev()
            .map(|l| self.layer_dir(&l.diff_id).join("diff"))
            .collect()
    }

    /// What a container of `img` has below its upper.
    pub fn below(&self, img: &Image) -> merged::Below {
        merged::Below {
            lowers: self.lowers(img),
            ns: self.marker_ns(),
        }
    }

    /// The lower catalog of `img`'s layer stack (`catalog=` of its containers' mounts).
    pub fn catalog_path(&self, img: &Image) -> PathBuf {
        self.root.join("catalogs").join(img.id.hex())
    }

    pub fn has_layer(&self, diff_id: &Digest) -> bool {
        self.layer_dir(diff_id).join("diff").is_dir()
    }

    pub fn marker_ns(&self) -> MarkerNs {
        if crate::sys::geteuid() == 0 {
            MarkerNs::Trusted
        } else {
            MarkerNs::User
        }
    }

    pub fn read_blob(&self, d: &Digest) -> Result<Vec<u8>> {
        fs::read(self.blob_path(d)).ctx(format!("blob {d}"))
    }

    pub fn put_image(&self, img: &Image) -> Result<()> {
        let data = serde_json::to_vec_pretty(img).map_err(|e| Error::msg(e.to_string()))?;
        write_atomic(
            &self.tmp(),
            &self
                .root
                .join("images")
                .join(format!("{}.json", img.id.hex())),
            &data,
        )
    }

    /// Delete image `img`, whose tags are already gone: its record, then (`prune`) whatever
    /// no image uses any more; returns the layers deleted. The record goes first, so a crash
    /// leaves unused layers behind (for the next prune), never an image missing a layer.
    pub fn remove_image(&self, img: &Image) -> Result<Vec<Digest>> {
        let record = self
            .root
            .join("images")
            .join(format!("{}.json", img.id.hex()));
        fs::remove_file(&record).ctx(format!("deleting {}", record.display()))?;
        self.prune()
    }

    /// Delete every layer, blob and catalog that no image uses: those of a removed image,
    /// and those a crash left (a load stopped between its layers and its image record).
    fn prune(&self) -> Result<Vec<Digest>> {
        let images = self.images()?;
        let ids: HashSet<&str> = images.iter().map(|i| i.id.hex()).collect();
        let layers: HashSet<&str> = images
            .iter()
            .flat_map(|i| i.layers.iter().map(|l| l.diff_id.hex()))
            .collect();
        let blobs: HashSet<&str> = images
            .iter()
            .flat_map(|i| i.layers.iter().map(|l| l.blob.hex()))
            .chain(ids.iter().copied())
            .collect();
        // Only names the store gives (64 hex digits): a daemon writes its catalog through a
        // temporary name beside it.
        let unused = |dir: &str, used: &HashSet<&str>| -> Result<Vec<PathBuf>> {
            let mut v = Vec::new();
            for e in fs::read_dir(self.root.join(dir))? {
                let e = e?;
                let ours = e.file_name().to_str().is_some_and(|n| {
                    n.len() == 64 && n.bytes().all(|b| b.is_ascii_hexdigit()) && !used.contains(n)
                });
                if ours {
                    v.push(e.path());
                }
            }
            Ok(v)
        };
        let mut deleted = Vec::new();
        for dir in unused("layers", &layers)? {
            self.discard(&dir)?;
            let name = dir.file_name().unwrap_or_default().to_string_lossy();
            deleted.extend(Digest::parse(&format!("sha256:{name}")));
        }
        for f in unused("blobs/sha256", &blobs)?
            .into_iter()
            .chain(unused("catalogs", &ids)?)
        {
            match fs::remove_file(&f) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(Error::from(e).context(format!("deleting {}", f.display())));
                }
                _ => {}
            }
        }
        Ok(deleted)
    }

    /// Take directory `dir` out of the store by one rename into tmp/, then delete it there.
    /// Deleting in place, a crash (or ^C) part way left a layer that still looked present,
    /// to be reused half-empty by the next load, or a container with part of its upper.
    /// What cannot be deleted now stays in tmp/, emptied at every writable open.
    pub fn discard(&self, dir: &Path) -> Result<()> {
        let gone = self
            .tmp()
            .join(format!("discard-{}-{}", std::process::id(), rand_suffix()));
        fs::rename(dir, &gone).ctx(format!("deleting {}", dir.display()))?;
        if let Err(e) = fs::remove_dir_all(&gone) {
            log::warn!(
                "{} stays in {} until the next store write: {e}",
                dir.display(),
                gone.display()
            );
        }
        Ok(())
    }

    pub fn images(&self) -> Result<Vec<Image>> {
        let mut v = Vec::new();
        for e in fs::read_dir(self.root.join("images"))?.flatten() {
            let data = fs::read(e.path())?;
            let img: Image = serde_json::from_slice(&data).map_err(|err| {
                Error::msg(format!(
                    "corrupt image record {}: {err}",
                    e.path().display()
                ))
            })?;
            v.push(img);
        }
        Ok(v)
    }

    pub fn tags(&self) -> Result<BTreeMap<String, Digest>> {
        match fs::read(self.root.join("tags.json")) {
            Ok(d) => serde_json::from_slice(&d)
                .map_err(|e| Error::msg(format!("corrupt tags.json: {e}"))),
            Err(_) => Ok(BTreeMap::new()),
        }
    }

    pub fn set_tags(&self, t: &BTreeMap<String, Digest>) -> Result<()> {
        let data = serde_json::to_vec_pretty(t).map_err(|e| Error::msg(e.to_string()))?;
        write_atomic(&self.tmp(), &self.root.join("tags.json"), &data)
    }

    /// Resolve `name[:tag]`, a full id (with or without `sha256:`) or a unique id prefix.
    pub fn resolve(&self, r: &str) -> Result<Image> {
        let images = self.images()?;
        if let Ok(n) = normalize_ref(r)
            && let Some(id) = self.tags()?.get(&n)
            && let Some(i) = images.iter().find(|i| &i.id == id)
        {
            return Ok(i.clone());
        }
        let hex = r.strip_prefix("sha256:").unwrap_or(r);
        if hex.len() >= 4 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            let m: Vec<&Image> = images
                .iter()
                .filter(|i| i.id.hex().starts_with(hex))
                .collect();
            match m.len() {
                1 => return Ok(m[0].clone()),
                n if n > 1 => {
                    return Err(Error::msg(format!(
                        "image id prefix {r} is ambiguous ({n} images)"
                    )));
                }
                _ => {}
            }
        }
        Err(Error::msg(format!("no such image: {r}")))
    }

    pub fn config(&self, img: &Image) -> Result<serde_json::Value> {
        serde_json::from_slice(&self.read_blob(&img.id)?)
            .map_err(|e| Error::msg(format!("config of {}: {e}", img.id)))
    }

    /// Bytes used by a layer's extracted tree.
    pub fn layer_size(&self, diff_id: &Digest) -> u64 {
        fs::read_to_string(self.layer_dir(diff_id).join("size"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }
}

/// Now as RFC 3339 UTC (what image configs carry), without a date crate.
/// What a directory is in a store, from its place in the store's layout: the layer
/// "sha256:HEX" (`layers/HEX/diff`) or "container NAME" (`containers/NAME/upper`).
pub fn describe_layer_dir(dir: &Path) -> Option<String> {
    let name = |p: Option<&Path>| p?.file_name()?.to_str().map(str::to_string);
    let parent = dir.parent();
    let kind = name(parent.and_then(Path::parent))?;
    let id = name(parent)?;
    match (kind.as_str(), dir.file_name()?.to_str()?) {
        ("layers", "diff") if id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Some(format!("sha256:{id}"))
        }
        ("containers", "upper") => Some(format!("container {id}")),
        _ => None,
    }
}

pub fn rfc3339_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

impl Store {
    /// A container's writable layer as a new layer on top of its image: a new image (config
    /// with the layer's diff_id and a history entry), tagged `tag` if given.
    pub fn commit(
        &self,
        base: &Image,
        upper: &Path,
        tag: Option<String>,
        message: Option<String>,
    ) -> Result<Image> {
        // A bad tag is refused before the layer is packed.
        let tag = tag.as_deref().map(normalize_ref).transpose()?;
        // The layer tar is the blob (uncompressed: its digest is the diff_id).
        let mut w = blob::BlobWriter::new(self)?;
        pack::pack_upper(upper, &self.below(base), &mut w)?;
        let diff_id = w.finish(self, None, None)?;
        if !self.has_layer(&diff_id) {
            let tar = File::open(self.blob_path(&diff_id))?;
            load::StagedLayer::unpack(self, std::io::BufReader::new(tar))?
                .install(self, &diff_id)?;
        }
        let mut config = self.config(base)?;
        let now = rfc3339_now();
        config["created"] = serde_json::json!(now);
        match config
            .pointer_mut("/rootfs/diff_ids")
            .and_then(serde_json::Value::as_array_mut)
        {
            Some(ids) => ids.push(serde_json::json!(diff_id.as_str())),
            None => return Err(Error::msg("base image config has no rootfs.diff_ids")),
        }
        let entry = serde_json::json!({"created": now, "created_by": "layerfs container commit",
            "comment": message.unwrap_or_default()});
        match config
            .get_mut("history")
            .and_then(serde_json::Value::as_array_mut)
        {
            Some(h) => h.push(entry),
            None => config["history"] = serde_json::json!([entry]),
        }
        let bytes = serde_json::to_vec(&config).map_err(|e| Error::msg(e.to_string()))?;
        let id = Digest::of(&bytes);
        self.put_blob(&id, &bytes)?;
        let mut layers = base.layers.clone();
        layers.push(LayerRef {
            size: self.layer_size(&diff_id),
            diff_id: diff_id.clone(),
            blob: diff_id,
            media_type: "application/vnd.oci.image.layer.v1.tar".into(),
        });
        let img = Image {
            id,
            layers,
            created: Some(now),
        };
        self.put_image(&img)?;
        if let Some(t) = tag {
            let mut tags = self.tags()?;
            tags.insert(t, img.id.clone());
            self.set_tags(&tags)?;
        }
        Ok(img)
    }
}
