//! `layerfs which PATH...`: which layer serves a path of a live layerfs mount, whether it was
//! copied up (or shadows lower copies), and for a directory what each layer contributes.
//!
//! The daemon names the mount's layers (over its control socket); the engine then opens them
//! read-only here (the upper as one more layer), never changing them.

use std::ffi::OsStr;
use std::path::{Component, Path, PathBuf};

use serde_json::json;

use std::os::fd::AsFd;

use super::observe::{layers_in, mount_info};
use crate::error::{Error, Result};
use crate::inspect::layers::LayerSpec;
use crate::sys;
use crate::union::format;
use crate::union::node::ROOT_ID;
use crate::union::{Config, Union};

/// Why a layer's copy of a path is not part of the union view.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Block {
    Whiteout,
    Opaque,
    Redirect,
    /// A file (or other non-directory) where a lower layer has a directory.
    NotDir,
}

impl Block {
    fn name(self) -> &'static str {
        match self {
            Block::Whiteout => "whiteout",
            Block::Opaque => "opaque directory",
            Block::Redirect => "redirect (renamed directory)",
            Block::NotDir => "non-directory",
        }
    }
}

/// Look at `comps` in one layer's raw tree (openat-style, nothing followed): whether the
/// whole path exists there, and the first marker on the way that hides it in layers below
/// (component index, kind).
fn probe(root: &Path, comps: &[&OsStr]) -> (bool, Option<(usize, Block)>) {
    let Ok(mut dir) = sys::open_dir_path(root) else {
        return (false, None);
    };
    let mut block = None;
    for (i, c) in comps.iter().enumerate() {
        let Ok(st) = sys::statat(dir.as_fd(), c) else {
            return (false, block);
        };
        if format::is_whiteout_at(dir.as_fd(), c, &st) || format::has_oci_whiteout(dir.as_fd(), c) {
            return (false, block.or(Some((i, Block::Whiteout))));
        }
        if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
            // The path itself: copies below are shadowed (shown as such), not hidden. On the
            // way: a non-directory hides whatever lower layers have below this name.
            return if i + 1 == comps.len() {
                (true, block)
            } else {
                (false, block.or(Some((i, Block::NotDir))))
            };
        }
        let Ok(next) = sys::openat(dir.as_fd(), c, libc::O_PATH | libc::O_DIRECTORY, 0) else {
            return (false, block);
        };
        let m = format::dir_markers(next.as_fd());
        if block.is_none() {
            if m.redirect.is_some() {
                block = Some((i, Block::Redirect));
            } else if m.opaque {
                block = Some((i, Block::Opaque));
            }
        }
        dir = next;
    }
    (true, block)
}

/// The lower copies of `comps` that the union does not show, and what hides each.
fn hidden(layers: &[LayerSpec], comps: &[&OsStr], shown: &[usize]) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    let mut above: Option<(usize, usize, Block)> = None; // (layer, component, kind)
    for (l, spec) in layers.iter().enumerate() {
        let (exists, block) = probe(&spec.dir, comps);
        if exists
            && !shown.contains(&l)
            && let Some((bl, at, kind)) = above
        {
            let at_path: PathBuf = comps[..=at].iter().collect();
            out.push(json!({
                "layer": spec.label,
                "by": kind.name(),
                "at": Path::new("/").join(at_path),
                "in": layers[bl].label,
            }));
        }
        if above.is_none()
            && let Some((at, kind)) = block
        {
            above = Some((l, at, kind));
        }
    }
    out
}

pub fn which(paths: &[PathBuf], format: &str) -> Result<i32> {
    let mut out = Vec::new();
    for p in paths {
        let abs = std::path::absolute(p).map_err(|e| Error::from(e).context(p.display()))?;
        let info = mount_info(&abs)?;
        let (mp, layer_dirs) = layers_in(&info);
        let has_upper = layer_dirs.first().is_some_and(|l| l.label == "upper");
        // Read-only view of the same layers: the upper is just the top layer here.
        let u = Union::new(Config {
            upper: None,
            work: None,
            lowers: layer_dirs
                .iter()
                .filter(|l| !l.label.starts_with("data"))
                .map(|l| l.dir.clone())
                .collect(),
            data_lowers: layer_dirs
                .iter()
                .filter(|l| l.label.starts_with("data"))
                .map(|l| l.dir.clone())
                .collect(),
            fsync: false,
            // The mount's own reading of metadata-only copies and markers (an older daemon
            // that doesn't say: follow them, in the trusted format).
            metacopy: info["metacopy"].as_bool().unwrap_or(true),
            marker_ns: match info["markers"].as_str() {
                Some("user") => crate::union::format::MarkerNs::User,
                _ => crate::union::format::MarkerNs::Trusted,
            },
            ids: Default::default(),
            catalog: None,
            verity: Default::default(),
        })?;
        let rel = abs.strip_prefix(&mp).unwrap_or(Path::new(""));
        let comps: Vec<&OsStr> = rel
            .components()
            .filter_map(|c| match c {
                Component::Normal(n) => Some(n),
                _ => None,
            })
            .collect();
        // The data-only layers (last) hold no names of the tree.
        let tree = &layer_dirs[..layer_dirs.len() - u.cfg.data_lowers.len()];
        let label = |l: usize| layer_dirs[l].label.as_str();
        let store_id = |l: usize| layer_dirs[l].store.clone();
        let (mut parent, mut id) = (ROOT_ID, ROOT_ID);
        let mut missing = false;
        let mut failed = None;
        for (i, n) in comps.iter().enumerate() {
            match u.lookup(id, n) {
                Ok(e) => (parent, id) = (id, e.id),
                // The last name is not in the union: say what hides its lower copies.
                Err(e) if e.errno() == libc::ENOENT && i + 1 == comps.len() => missing = true,
                // Listed, but its lookup fails (a metadata-only copy not followed, or whose
                // data is missing): say where it is and why.
                Err(e) if i + 1 == comps.len() => failed = Some(e),
                Err(e) => return Err(e.context(format!("{} (in the union)", abs.display()))),
            }
        }
        if let (Some(e), Some(n)) = (failed, comps.last()) {
            let listed: Vec<&str> = u.layers_with_name(id, n)?.into_iter().map(label).collect();
            out.push(json!({
                "path": abs, "mount": mp, "visible": true,
                "error": e.to_string(), "listed_in": listed,
            }));
            continue;
        }
        if missing {
            let hid = hidden(tree, &comps, &[]);
            if hid.is_empty() {
                return Err(Error::msg(format!(
                    "{}: no such file in any layer",
                    abs.display()
                )));
            }
            out.push(json!({"path": abs, "mount": mp, "visible": false, "hidden": hid}));
            continue;
        }
        let (layers, is_dir) = u.layers_of(id)?;
        let name_layers = match comps.last() {
            Some(n) => u.layers_with_name(parent, n)?,
            None => layers.clone(),
        };
        let top = layers[0];
        let copied_up = has_upper && top == 0 && name_layers.iter().any(|&l| l > 0);
        let mut v = json!({
            "path": abs, "mount": mp, "visible": true,
            "served_by": {"layer": label(top), "dir": layer_dirs[top].dir, "store": store_id(top)},
            "copied_up": copied_up,
            "also_in": name_layers.iter().filter(|&&l| l != top).map(|&l| label(l)).collect::<Vec<_>>(),
            "hidden": hidden(tree, &comps, &[layers.clone(), name_layers.clone()].concat()),
            "redirected_from": u.redirected_from(id)?,
        });
        match u.data_of(id)? {
            Some(Ok((l, path))) => {
                v["data_from"] = json!({"layer": label(l), "path": path, "store": store_id(l)})
            }
            Some(Err(e)) => v["data_from"] = json!({"error": e.to_string()}),
            None => {}
        }
        if copied_up {
            v["copied_up_from"] =
                json!({"layer": label(name_layers[1]), "store": store_id(name_layers[1])});
        }
        if is_dir {
            v["merged_from"] = json!(
                u.entries_per_layer(id)?
                    .iter()
                    .map(|(l, n)| json!({"layer": label(*l), "entries": n}))
                    .collect::<Vec<_>>()
            );
        }
        out.push(v);
    }
    if format == "json" {
        println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
        return Ok(0);
    }
    for v in out {
        println!("{}", v["path"].as_str().unwrap_or(""));
        if let Some(e) = v["error"].as_str() {
            let listed: Vec<&str> = v["listed_in"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|l| l.as_str())
                .collect();
            println!(
                "  listed in {}, but cannot be looked up: {e}",
                listed.join(", ")
            );
            continue;
        }
        if v["visible"] == false {
            println!("  not in the union");
        } else {
            let store = v["served_by"]["store"]
                .as_str()
                .map_or(String::new(), |s| format!(", {s}"));
            println!(
                "  served by: {} ({}{store})",
                v["served_by"]["layer"].as_str().unwrap_or(""),
                v["served_by"]["dir"].as_str().unwrap_or("")
            );
        }
        for h in v["hidden"].as_array().into_iter().flatten() {
            println!(
                "  hidden: the copy in {} (by the {} at {} in {})",
                h["layer"].as_str().unwrap_or("?"),
                h["by"].as_str().unwrap_or("?"),
                h["at"].as_str().unwrap_or("?"),
                h["in"].as_str().unwrap_or("?")
            );
        }
        if let Some(d) = v["data_from"].as_object() {
            match d.get("error").and_then(|e| e.as_str()) {
                Some(e) => println!("  data: cannot be read ({e})"),
                None => println!(
                    "  data from: {} ({}; a metadata-only copy)",
                    d["layer"].as_str().unwrap_or("?"),
                    d["path"].as_str().unwrap_or("?")
                ),
            }
        }
        if let Some(r) = v["redirected_from"].as_str() {
            println!("  renamed: lower layers merged from {r} (redirect)");
        }
        if v["copied_up"].as_bool() == Some(true) {
            let store = v["copied_up_from"]["store"]
                .as_str()
                .map_or(String::new(), |s| format!(" ({s})"));
            println!(
                "  copied up from: {}{store}",
                v["copied_up_from"]["layer"].as_str().unwrap_or("?")
            );
        } else if let Some(a) = v["also_in"].as_array().filter(|a| !a.is_empty()) {
            println!(
                "  shadows: {}",
                a.iter()
                    .filter_map(|x| x.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        if let Some(m) = v["merged_from"].as_array() {
            for e in m {
                println!(
                    "  entries from {}: {}",
                    e["layer"].as_str().unwrap_or(""),
                    e["entries"]
                );
            }
        }
    }
    Ok(0)
}
