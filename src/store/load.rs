//! `image load`: OCI image layouts (directory or oci-archive tar) and docker-archive tars
//! (`docker save`, podman/containers-image). Every blob is verified against its digest and every
//! layer against its diff_id before anything becomes visible in the store.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read};
use std::os::fd::AsFd;
use std::path::{Component, Path, PathBuf};

use serde_json::Value;

use super::digest::{Digest, HashingReader};
use super::unpack;
use super::{Image, LayerRef, Store, normalize_ref};
use crate::error::{Context, Error, Result};
use crate::sys;

/// What a load did, for the caller's summary.
pub struct Loaded {
    pub id: Digest,
    pub tags: Vec<String>,
    pub new_layers: usize,
    pub reused_layers: usize,
}

fn json(data: &[u8], what: &str) -> Result<Value> {
    serde_json::from_slice(data).map_err(|e| Error::msg(format!("{what} is not valid JSON: {e}")))
}

fn str_field<'a>(v: &'a Value, k: &str, what: &str) -> Result<&'a str> {
    v.get(k)
        .and_then(Value::as_str)
        .ok_or_else(|| Error::msg(format!("{what}: missing \"{k}\"")))
}

/// Where a blob of an OCI layout is, if it is there.
fn oci_blob_path(dir: &Path, d: &Digest) -> Result<PathBuf> {
    let p = dir.join("blobs/sha256").join(d.hex());
    if !p.is_file() {
        return Err(Error::msg(format!(
            "blob {d} is missing from {}",
            dir.display()
        )));
    }
    Ok(p)
}

/// Read a blob of an OCI layout, checking its digest and (if given) size.
fn oci_blob(dir: &Path, d: &Digest, size: Option<u64>) -> Result<Vec<u8>> {
    let data = fs::read(oci_blob_path(dir, d)?)?;
    if let Some(s) = size
        && data.len() as u64 != s
    {
        return Err(Error::msg(format!(
            "blob {d} is {} bytes, the manifest says {s} (truncated?)",
            data.len()
        )));
    }
    if &Digest::of(&data) != d {
        return Err(Error::msg(format!(
            "blob {d} does not match its digest (corrupt)"
        )));
    }
    Ok(data)
}

pub fn load(store: &Store, path: &Path, say: &mut dyn FnMut(String)) -> Result<Vec<Loaded>> {
    let meta = fs::metadata(path).ctx(format!("image {}", path.display()))?;
    if meta.is_dir() {
        if !path.join("oci-layout").exists() {
            return Err(Error::msg(format!(
                "{} is not an OCI image layout (no oci-layout file)",
                path.display()
            )));
        }
        return load_oci(store, path, say);
    }
    // A tar, plain or compressed as docker load takes it: stage it (safely) and see what it
    // holds.
    let f = File::open(path).ctx(format!("image {}", path.display()))?;
    let tar = archive_stream(BufReader::new(f))
        .map(|s| shown(s, format!("reading {}", path.display())))
        .and_then(|s| {
            unpack::tar_start(
                s,
                "not an image archive (a tar, plain or gzip-, zstd-, xz- or bzip2-compressed, \
                 or an OCI layout directory)",
            )
        })
        .map_err(|e| e.context(path.display().to_string()))?;
    let stage = tempdir_in(&store.tmp())?;
    let root = sys::open_dir_path(stage.path())?;
    unpack::unpack(tar, root.as_fd(), store.marker_ns())
        .map_err(|e| e.context(format!("reading archive {}", path.display())))?;
    if stage.path().join("oci-layout").exists() {
        load_oci(store, stage.path(), say)
    } else if stage.path().join("manifest.json").exists() {
        load_docker(store, stage.path(), say)
    } else {
        Err(Error::msg(format!(
            "{}: neither an OCI archive nor a docker archive",
            path.display()
        )))
    }
}

fn load_oci(store: &Store, dir: &Path, say: &mut dyn FnMut(String)) -> Result<Vec<Loaded>> {
    let index = json(
        &fs::read(dir.join("index.json")).ctx("index.json")?,
        "index.json",
    )?;
    let mut out = Vec::new();
    let mut manifests: Vec<(Value, Option<String>)> = Vec::new();
    for m in index
        .get("manifests")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let name = m
            .pointer("/annotations/org.opencontainers.image.ref.name")
            .and_then(Value::as_str)
            .map(String::from);
        let mt = m.get("mediaType").and_then(Value::as_str).unwrap_or("");
        let d = Digest::parse(str_field(m, "digest", "index.json manifest")?)?;
        let data = oci_blob(dir, &d, m.get("size").and_then(Value::as_u64))?;
        let v = json(&data, &format!("manifest {d}"))?;
        if mt.contains("index") || mt.contains("manifest.list") {
            // A nested index: take its manifests (the first platform is what we run).
            for sub in v
                .get("manifests")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .take(1)
            {
                let sd = Digest::parse(str_field(sub, "digest", "nested index")?)?;
                let sdata = oci_blob(dir, &sd, sub.get("size").and_then(Value::as_u64))?;
                manifests.push((json(&sdata, &format!("manifest {sd}"))?, name.clone()));
            }
        } else {
            manifests.push((v, name));
        }
    }
    if manifests.is_empty() {
        return Err(Error::msg("index.json lists no manifests"));
    }
    for (m, name) in manifests {
        let cfg = m
            .get("config")
            .ok_or_else(|| Error::msg("manifest has no config"))?;
        let cd = Digest::parse(str_field(cfg, "digest", "manifest config")?)?;
        let cdata = oci_blob(dir, &cd, cfg.get("size").and_then(Value::as_u64))?;
        let config = json(&cdata, "image config")?;
        let layers: Vec<(Digest, String, u64)> = m
            .get("layers")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .map(|l| {
                Ok((
                    Digest::parse(str_field(l, "digest", "manifest layer")?)?,
                    l.get("mediaType")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string(),
                    l.get("size").and_then(Value::as_u64).unwrap_or(0),
                ))
            })
            .collect::<Result<_>>()?;
        // The OCI spec allows names Docker does not (uppercase, '+'): such an image is
        // loaded untagged, with a word on how to name it, rather than refused.
        let tags = match name.map(|n| normalize_ref(&n)) {
            Some(Ok(t)) => vec![t],
            Some(Err(e)) => {
                say(format!(
                    "warning: {e}; the image is loaded without a tag (name it with `layerfs image tag ID NAME`)"
                ));
                Vec::new()
            }
            None => Vec::new(),
        };
        let sources = layers
            .into_iter()
            .map(|(d, mt, size)| {
                let path = oci_blob_path(dir, &d)?;
                Ok(Source {
                    blob: Some(d),
                    size: Some(size),
                    media_type: mt,
                    path,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        out.push(commit_image(store, &cdata, &config, sources, tags, say)?);
    }
    Ok(out)
}

/// Resolve `rel` inside the staged archive, following symlinks only within it.
fn inside(root: &Path, rel: &str) -> Result<PathBuf> {
    let mut cur = PathBuf::new();
    let mut todo: Vec<String> = rel.split('/').rev().map(String::from).collect();
    let mut hops = 0;
    while let Some(c) = todo.pop() {
        match c.as_str() {
            "" | "." => continue,
            ".." => {
                if !cur.pop() {
                    return Err(Error::msg(format!(
                        "archive path {rel} escapes the archive"
                    )));
                }
                continue;
            }
            _ => cur.push(&c),
        }
        if let Ok(t) = fs::read_link(root.join(&cur)) {
            hops += 1;
            if hops > 40 || t.is_absolute() {
                return Err(Error::msg(format!("archive path {rel}: bad symlink")));
            }
            cur.pop();
            for tc in t.components().rev() {
                match tc {
                    Component::Normal(n) => todo.push(n.to_string_lossy().into_owned()),
                    Component::ParentDir => todo.push("..".into()),
                    _ => {}
                }
            }
        }
    }
    Ok(root.join(cur))
}

fn load_docker(store: &Store, dir: &Path, say: &mut dyn FnMut(String)) -> Result<Vec<Loaded>> {
    let manifest = json(&fs::read(dir.join("manifest.json"))?, "manifest.json")?;
    let mut out = Vec::new();
    for m in manifest
        .as_array()
        .ok_or_else(|| Error::msg("manifest.json is not a list"))?
    {
        let cpath = inside(dir, str_field(m, "Config", "manifest.json")?)?;
        let cdata = fs::read(&cpath)
            .map_err(|_| Error::msg(format!("config {} is missing", cpath.display())))?;
        let config = json(&cdata, "image config")?;
        let tags = m
            .get("RepoTags")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(normalize_ref)
            .collect::<Result<Vec<_>>>()?;
        let mut sources = Vec::new();
        for l in m
            .get("Layers")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let p = inside(
                dir,
                l.as_str()
                    .ok_or_else(|| Error::msg("manifest.json: bad layer entry"))?,
            )?;
            if !p.is_file() {
                return Err(Error::msg(format!(
                    "layer {} is missing from the archive",
                    p.display()
                )));
            }
            sources.push(Source {
                blob: None,
                size: None,
                media_type: String::new(),
                path: p,
            });
        }
        out.push(commit_image(store, &cdata, &config, sources, tags, say)?);
    }
    Ok(out)
}

/// An in-place "layer i/n: N MB" line on a terminal while a layer streams in.
struct Progress {
    inner: Box<dyn Read>,
    done: u64,
    next: u64,
    label: String,
}

/// `stream`, its progress shown in place under `label` when standard error is a terminal.
fn shown(stream: Box<dyn Read>, label: String) -> Box<dyn Read> {
    if !sys::stderr_is_tty() {
        return stream;
    }
    Box::new(Progress {
        inner: stream,
        done: 0,
        next: 0,
        label,
    })
}

impl Read for Progress {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.done += n as u64;
        if self.done >= self.next || n == 0 {
            eprint!("\r{}: {:.1} MB ", self.label, self.done as f64 / 1e6);
            self.next = self.done + (4 << 20);
            if n == 0 {
                eprintln!();
            }
        }
        Ok(n)
    }
}

/// A layer as the input holds it: a file, read as a stream (never whole in memory).
struct Source {
    /// The blob's digest where the manifest names it (OCI), checked as it is stored;
    /// docker archives name layers by path.
    blob: Option<Digest>,
    /// Its size where the manifest gives it.
    size: Option<u64>,
    /// As the manifest says; found from the bytes when empty.
    media_type: String,
    path: PathBuf,
}

/// The layer's media type: the manifest's, else what its first bytes say.
fn layer_media_type(given: &str, blob: &Path) -> Result<String> {
    if !given.is_empty() {
        return Ok(given.to_string());
    }
    Ok(match super::blob::magic(blob)? {
        [0x28, 0xb5, 0x2f, 0xfd] => "application/vnd.oci.image.layer.v1.tar+zstd",
        [0x1f, 0x8b, ..] => "application/vnd.oci.image.layer.v1.tar+gzip",
        _ => "application/vnd.oci.image.layer.v1.tar",
    }
    .to_string())
}

/// The layer tar in `path`, decompressed as its media type (or its first bytes) says.
pub(super) fn open_stream(path: &Path, media_type: &str) -> Result<Box<dyn Read>> {
    let raw = File::open(path).ctx(format!("reading {}", path.display()))?;
    decompressed(BufReader::with_capacity(1 << 20, raw), media_type)
}

const XZ: [u8; 6] = [0xfd, b'7', b'z', b'X', b'Z', 0];
const BZIP2: &[u8] = b"BZh";

/// `raw` decompressed as `media_type` or its first bytes say (gzip, zstd), else as it is. Reads
/// nothing it does not hand on, so `raw` may be a pipe.
fn decompressed(mut raw: BufReader<File>, media_type: &str) -> Result<Box<dyn Read>> {
    const ZSTD: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
    let head = raw.fill_buf()?;
    if media_type.contains("zstd") || head.starts_with(&ZSTD) {
        let d = ruzstd::decoding::StreamingDecoder::new(raw)
            .map_err(|e| Error::msg(format!("not a valid zstd stream: {e}")))?;
        return Ok(Box::new(d));
    }
    if media_type.contains("gzip") || head.starts_with(&[0x1f, 0x8b]) {
        return Ok(Box::new(flate2::read::GzDecoder::new(raw)));
    }
    // A layer: the image spec allows no other compression (an archive's goes through
    // `archive_stream`).
    for (magic, kind) in [(BZIP2, "bzip2"), (&XZ[..], "xz")] {
        if head.starts_with(magic) {
            return Err(Error::msg(format!(
                "{kind}-compressed, which the OCI image spec does not allow for a layer (a tar, \
                 plain or gzip- or zstd-compressed)"
            )));
        }
    }
    Ok(Box::new(raw))
}

/// Whether the first bytes are xz's or bzip2's magic.
fn xz_or_bzip2(head: &[u8]) -> bool {
    head.starts_with(&XZ) || head.starts_with(BZIP2)
}

/// A whole archive or rootfs tarball (`image load`, `image import`), decompressed as its first
/// bytes say. Beside gzip and zstd this reads what `docker load` and `docker import` also
/// take, xz and bzip2 (distributions ship rootfs tarballs as `.tar.xz`), though no layer
/// inside may use them.
fn archive_stream(mut raw: BufReader<File>) -> Result<Box<dyn Read>> {
    let head = raw.fill_buf()?;
    if head.starts_with(&XZ) {
        // Several concatenated streams decode as one, as `xz -d` does.
        let inner = Box::new(lzma_rust2::XzReader::new(raw, true));
        return Ok(Box::new(Decoding { kind: "xz", inner }));
    }
    if head.starts_with(BZIP2) {
        let inner = Box::new(bzip2::read::MultiBzDecoder::new(raw));
        return Ok(Box::new(Decoding {
            kind: "bzip2",
            inner,
        }));
    }
    decompressed(raw, "")
}

/// A decoder whose own errors ("dist overflow") say what they are about.
struct Decoding {
    kind: &'static str,
    inner: Box<dyn Read>,
}

impl Read for Decoding {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.inner.read(buf).map_err(|e| match e.raw_os_error() {
            Some(_) => e,
            None => std::io::Error::other(format!("truncated or corrupt {} data ({e})", self.kind)),
        })
    }
}

/// Extract and verify every layer not yet stored, then record the image and its tags.
fn commit_image(
    store: &Store,
    config_bytes: &[u8],
    config: &Value,
    sources: Vec<Source>,
    tags: Vec<String>,
    say: &mut dyn FnMut(String),
) -> Result<Loaded> {
    let id = Digest::of(config_bytes);
    let diff_ids: Vec<Digest> = config
        .pointer("/rootfs/diff_ids")
        .and_then(Value::as_array)
        .ok_or_else(|| Error::msg("image config has no rootfs.diff_ids"))?
        .iter()
        .map(|v| Digest::parse(v.as_str().unwrap_or("")))
        .collect::<Result<_>>()?;
    if diff_ids.len() != sources.len() {
        return Err(Error::msg(format!(
            "image config lists {} layers, the manifest {}",
            diff_ids.len(),
            sources.len()
        )));
    }
    let (mut new_layers, mut reused) = (0, 0);
    let mut refs = Vec::new();
    let n = sources.len();
    for (i, (src, diff_id)) in sources.into_iter().zip(&diff_ids).enumerate() {
        // The blob as distributed goes in first, checked against the manifest: export
        // reproduces its digest, and the layer is read from the stored copy.
        let blob = store.put_blob_file(&src.path, src.blob.as_ref(), src.size)?;
        let media_type = layer_media_type(&src.media_type, &store.blob_path(&blob))?;
        if store.has_layer(diff_id) {
            say(format!(
                "layer {}/{n} {} already present",
                i + 1,
                diff_id.short()
            ));
            reused += 1;
            refs.push(LayerRef {
                diff_id: diff_id.clone(),
                blob,
                media_type,
                size: store.layer_size(diff_id),
            });
            continue;
        }
        say(format!(
            "layer {}/{n} {} extracting",
            i + 1,
            diff_id.short()
        ));
        let stream = shown(
            open_stream(&store.blob_path(&blob), &media_type)?,
            format!("layer {}/{n}", i + 1),
        );
        let mut hr = HashingReader::new(stream);
        let staged = StagedLayer::unpack(store, &mut hr)
            .map_err(|e| e.context(format!("layer {}", diff_id.short())))?;
        let (got, _) = hr.finish().map_err(|e| {
            Error::msg(format!(
                "layer {}: truncated or corrupt stream: {e}",
                diff_id.short()
            ))
        })?;
        if &got != diff_id {
            return Err(Error::msg(format!(
                "layer {} does not match its diff_id (content is {})",
                diff_id.short(),
                got.short()
            )));
        }
        let size = staged.install(store, diff_id)?;
        new_layers += 1;
        refs.push(LayerRef {
            diff_id: diff_id.clone(),
            blob,
            media_type,
            size,
        });
    }
    store.put_blob(&id, config_bytes)?;
    let created = config
        .get("created")
        .and_then(Value::as_str)
        .map(String::from);
    store.put_image(&Image {
        id: id.clone(),
        layers: refs,
        created,
    })?;
    let mut all: BTreeMap<String, Digest> = store.tags()?;
    for t in &tags {
        all.insert(t.clone(), id.clone());
    }
    store.set_tags(&all)?;
    Ok(Loaded {
        id,
        tags,
        new_layers,
        reused_layers: reused,
    })
}

/// A layer unpacked into a staging directory of the store's tmp/, not yet in layers/.
pub(super) struct StagedLayer {
    stage: TempDir,
    bytes: u64,
}

impl StagedLayer {
    /// Unpack the layer tar `input` into a new staging directory.
    pub(super) fn unpack(store: &Store, input: impl Read) -> Result<StagedLayer> {
        let stage = tempdir_in(&store.tmp())?;
        fs::create_dir(stage.path().join("diff"))?;
        let root = sys::open_dir_path(&stage.path().join("diff"))?;
        let done = unpack::unpack(input, root.as_fd(), store.marker_ns())?;
        Ok(StagedLayer {
            stage,
            bytes: done.bytes,
        })
    }

    /// Move the layer to `layers/<diff_id>` once every byte of it is on disk, and return its
    /// size. A layer is trusted from the moment it is there (later loads reuse it unread), so
    /// its files' data must not be left to writeback: after a power cut the rename could
    /// survive while the data did not, leaving empty files in the image for good (the
    /// failure behind containerd's `sync_fs` and containers/storage's `sync` options). One
    /// syncfs writes out the whole tree and commits the journal.
    pub(super) fn install(self, store: &Store, diff_id: &Digest) -> Result<u64> {
        let ctx = || format!("storing layer {}", diff_id.short());
        fs::write(self.stage.path().join("size"), self.bytes.to_string()).ctx(ctx())?;
        let dir = File::open(self.stage.path()).ctx(ctx())?;
        sys::syncfs(dir.as_fd()).ctx(ctx())?;
        let dest = store.layer_dir(diff_id);
        match fs::rename(self.stage.path(), &dest) {
            Ok(()) => self.stage.keep(),
            Err(e) if dest.join("diff").is_dir() => drop(e), // another name for the same layer
            Err(e) => return Err(Error::from(e).context(ctx())),
        }
        if let Some(layers) = dest.parent() {
            File::open(layers)?.sync_all().ctx(ctx())?;
        }
        Ok(self.bytes)
    }
}

/// A staging directory removed on drop unless kept.
pub struct TempDir(PathBuf, bool);

impl TempDir {
    pub fn path(&self) -> &Path {
        &self.0
    }
    fn keep(mut self) {
        self.1 = true;
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.1 {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

pub fn tempdir_in(base: &Path) -> Result<TempDir> {
    for i in 0..1000u32 {
        let p = base.join(format!(
            "stage-{}-{}-{i}",
            std::process::id(),
            super::rand_suffix() % 1_000_000
        ));
        if fs::create_dir(&p).is_ok() {
            return Ok(TempDir(p, false));
        }
    }
    Err(Error::msg(format!(
        "cannot create a staging dir in {}",
        base.display()
    )))
}

/// `image import`: a flat rootfs tarball (plain or compressed) as a one-layer image, like
/// `docker import`: a generated config whose only diff_id is the tarball's.
pub fn import(
    store: &Store,
    path: &Path,
    tag: &str,
    say: &mut dyn FnMut(String),
) -> Result<Loaded> {
    // A bad tag is refused before the tarball is read.
    let tag = normalize_ref(tag)?;
    if path.is_dir() {
        return Err(Error::msg(format!("{} is not a file", path.display())));
    }
    // Stored first: the input is read once (it may be a pipe), and the diff_id (for the
    // config) and the layer both come from the stored copy. That copy is the input as
    // given, unless xz or bzip2 compress it: then it is the tar, as no layer blob may be
    // either.
    let reading = || format!("reading {}", path.display());
    let mut raw = BufReader::with_capacity(1 << 20, File::open(path).ctx(reading())?);
    let input = if xz_or_bzip2(raw.fill_buf().ctx(reading())?) {
        archive_stream(raw)?
    } else {
        Box::new(raw)
    };
    let blob = store.put_blob_reader(&mut shown(input, reading()), path, None, None)?;
    let imported = import_blob(store, &blob, path, tag, say);
    let used = |i: &Image| i.layers.iter().any(|l| l.blob == blob);
    if imported.is_err() && store.images().is_ok_and(|v| !v.iter().any(used)) {
        // What is not a layer leaves nothing behind.
        let _ = fs::remove_file(store.blob_path(&blob));
    }
    imported
}

/// `import` of the stored blob `blob` (the tarball as given).
fn import_blob(
    store: &Store,
    blob: &Digest,
    path: &Path,
    tag: String,
    say: &mut dyn FnMut(String),
) -> Result<Loaded> {
    let stored = store.blob_path(blob);
    let stream = open_stream(&stored, "")
        .and_then(|s| {
            unpack::tar_start(
                s,
                "not a tar archive (plain or gzip-, zstd-, xz- or bzip2-compressed)",
            )
        })
        .map_err(|e| e.context(path.display().to_string()))?;
    let (diff_id, _) = HashingReader::new(stream)
        .finish()
        .map_err(|e| Error::msg(format!("{}: truncated or corrupt: {e}", path.display())))?;
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        a => a,
    };
    let now = super::rfc3339_now();
    let config = serde_json::json!({
        "architecture": arch, "os": "linux", "created": now, "config": {},
        "rootfs": {"type": "layers", "diff_ids": [diff_id.as_str()]},
        "history": [{"created": now, "created_by": format!("layerfs image import {}", path.display())}],
    });
    let bytes = serde_json::to_vec(&config).map_err(|e| Error::msg(e.to_string()))?;
    let source = Source {
        blob: Some(blob.clone()),
        size: None,
        media_type: String::new(),
        path: stored,
    };
    commit_image(store, &bytes, &config, vec![source], vec![tag], say)
}
