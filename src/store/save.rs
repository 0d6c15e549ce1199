//! `image save`: an OCI image layout (directory or oci-archive tar) or a docker-archive tar,
//! from the blobs the store kept, so layer digests and diff_ids are those that were loaded.

use std::fs;
use std::io::Write;
use std::path::Path;

use serde_json::{Value, json};

use super::digest::Digest;
use super::{Image, Store};
use crate::error::{Context, Error, Result};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";

fn oci_layer_type(mt: &str, head: [u8; 4]) -> &'static str {
    if mt.contains("zstd") || head == [0x28, 0xb5, 0x2f, 0xfd] {
        "application/vnd.oci.image.layer.v1.tar+zstd"
    } else if mt.contains("gzip") || head[..2] == [0x1f, 0x8b] {
        "application/vnd.oci.image.layer.v1.tar+gzip"
    } else {
        "application/vnd.oci.image.layer.v1.tar"
    }
}

fn put(dir: &Path, data: &[u8]) -> Result<(Digest, u64)> {
    let d = Digest::of(data);
    fs::write(dir.join("blobs/sha256").join(d.hex()), data)?;
    Ok((d, data.len() as u64))
}

/// Write an OCI image layout into the empty (or new) directory `out`.
pub fn save_oci_dir(store: &Store, images: &[(Image, Vec<String>)], out: &Path) -> Result<()> {
    fs::create_dir_all(out.join("blobs/sha256")).ctx(format!("output {}", out.display()))?;
    fs::write(out.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    let mut manifests = Vec::new();
    for (img, tags) in images {
        let config = store.read_blob(&img.id)?;
        let (cd, cs) = put(out, &config)?;
        let mut layers = Vec::new();
        for l in &img.layers {
            // Copied as a file: a layer blob may be larger than memory.
            let d = &l.blob;
            let s = fs::copy(store.blob_path(d), out.join("blobs/sha256").join(d.hex()))
                .ctx(format!("blob {d}"))?;
            let mt = oci_layer_type(&l.media_type, super::blob::magic(&store.blob_path(d))?);
            layers.push(json!({"mediaType": mt, "digest": d.as_str(), "size": s}));
        }
        let manifest = json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": cd.as_str(), "size": cs}, "layers": layers});
        let mbytes = serde_json::to_vec(&manifest).map_err(|e| Error::msg(e.to_string()))?;
        let (md, ms) = put(out, &mbytes)?;
        let names: Vec<Option<&String>> = if tags.is_empty() {
            vec![None]
        } else {
            tags.iter().map(Some).collect()
        };
        for t in names {
            let mut m = json!({"mediaType": OCI_MANIFEST, "digest": md.as_str(), "size": ms});
            if let Some(t) = t {
                m["annotations"] = json!({"org.opencontainers.image.ref.name": t});
            }
            manifests.push(m);
        }
    }
    let index = json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": manifests});
    fs::write(
        out.join("index.json"),
        serde_json::to_vec_pretty(&index).unwrap_or_default(),
    )?;
    Ok(())
}

/// Write what `fill` writes to `out`: standard output for `-`, else a file that appears
/// whole or not at all (a temporary name beside it, fsynced, then renamed).
pub fn write_out(out: &Path, fill: impl FnOnce(&mut dyn Write) -> Result<()>) -> Result<()> {
    if out == Path::new("-") {
        let mut w = std::io::BufWriter::new(std::io::stdout().lock());
        fill(&mut w)?;
        return Ok(w.flush()?);
    }
    let name = out.file_name().unwrap_or_default().to_string_lossy();
    let tmp = out.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let written = fs::File::create(&tmp)
        .ctx(format!("output {}", out.display()))
        .and_then(|f| {
            let mut w = std::io::BufWriter::new(f);
            fill(&mut w)?;
            let f = w.into_inner().map_err(|e| Error::from(e.into_error()))?;
            f.sync_all()?;
            fs::rename(&tmp, out).ctx(format!("output {}", out.display()))
        });
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}

/// Tar up a directory's contents (sorted, for stable output) into `out` (see `write_out`).
fn tar_dir(dir: &Path, out: &Path) -> Result<()> {
    write_out(out, |w| {
        let mut b = tar::Builder::new(w);
        b.mode(tar::HeaderMode::Deterministic);
        b.append_dir_all(".", dir)?;
        b.into_inner()?;
        Ok(())
    })
}

pub fn save(
    store: &Store,
    images: &[(Image, Vec<String>)],
    out: &Path,
    format: &str,
) -> Result<()> {
    match format {
        "oci-dir" => {
            save_oci_dir(store, images, out)?;
            // Durable when the command returns, as the tar formats' fsync makes them.
            let dir = fs::File::open(out)?;
            Ok(crate::sys::syncfs(std::os::fd::AsFd::as_fd(&dir))?)
        }
        "oci-archive" => {
            let stage = super::load::tempdir_in(&store.tmp())?;
            save_oci_dir(store, images, stage.path())?;
            tar_dir(stage.path(), out)
        }
        "docker-archive" => {
            let stage = super::load::tempdir_in(&store.tmp())?;
            let mut manifest = Vec::new();
            for (img, tags) in images {
                let config = format!("{}.json", img.id.hex());
                fs::write(stage.path().join(&config), store.read_blob(&img.id)?)?;
                let mut layers = Vec::new();
                for l in &img.layers {
                    // docker-archive layers are the uncompressed tars (their sha256 is the diff_id).
                    let name = format!("{}.tar", l.diff_id.hex());
                    let mut tar =
                        super::load::open_stream(&store.blob_path(&l.blob), &l.media_type)
                            .map_err(|e| e.context(format!("layer {}", l.diff_id)))?;
                    let mut f = fs::File::create(stage.path().join(&name))?;
                    std::io::copy(&mut tar, &mut f).ctx(format!("layer {}", l.diff_id))?;
                    layers.push(Value::from(name));
                }
                manifest.push(json!({"Config": config, "RepoTags": tags, "Layers": layers}));
            }
            fs::write(
                stage.path().join("manifest.json"),
                serde_json::to_vec(&manifest).unwrap_or_default(),
            )?;
            tar_dir(stage.path(), out)
        }
        f => Err(Error::msg(format!(
            "unknown format {f} (oci-dir, oci-archive, docker-archive)"
        ))),
    }
}
