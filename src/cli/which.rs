//! `layerfs which PATH...`: which layer serves a path of a live layerfs mount, whether it was
//! copied up (or shadows lower copies), and for a directory what each layer contributes.
//!
//! It needs no help from the daemon: the mount's layers come from the daemon's command line,
//! and the engine opens them read-only (the upper as one more layer), never touching them.

use std::ffi::OsStr;
use std::path::{Component, Path, PathBuf};

use serde_json::json;

use super::options::split_escaped;
use crate::error::{Error, Result};
use crate::union::node::ROOT_ID;
use crate::union::{Config, Union};

/// The layerfs mount holding `abs`: (mountpoint, upper, lowers top first).
fn find_mount(abs: &Path) -> Result<(PathBuf, Option<PathBuf>, Vec<PathBuf>)> {
    let mut best: Option<(PathBuf, Vec<String>)> = None;
    for e in std::fs::read_dir("/proc").map_err(Error::from)?.flatten() {
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmd
            .split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if !args.first().is_some_and(|a| a.ends_with("layerfs")) || !args.iter().any(|a| a == "-f")
        {
            continue;
        }
        let Some(mp) = args.last().map(PathBuf::from) else {
            continue;
        };
        if abs.starts_with(&mp)
            && best
                .as_ref()
                .is_none_or(|(b, _)| mp.as_os_str().len() > b.as_os_str().len())
        {
            let opts: Vec<String> = args
                .windows(2)
                .filter(|w| w[0] == "-o")
                .map(|w| w[1].clone())
                .collect();
            best = Some((mp, opts));
        }
    }
    let (mp, opts) =
        best.ok_or_else(|| Error::msg(format!("{} is not on a layerfs mount", abs.display())))?;
    let (mut upper, mut lowers) = (None, Vec::new());
    for o in opts.iter().flat_map(|o| split_escaped(o, ',')) {
        if let Some(v) = o.strip_prefix("upperdir=") {
            upper = Some(PathBuf::from(v));
        } else if let Some(v) = o.strip_prefix("lowerdir=") {
            lowers = split_escaped(v, ':')
                .into_iter()
                .filter(|s| !s.is_empty())
                .map(PathBuf::from)
                .collect();
        }
    }
    Ok((mp, upper, lowers))
}

pub fn which(paths: &[PathBuf], format: &str) -> Result<i32> {
    let mut out = Vec::new();
    for p in paths {
        let abs = std::path::absolute(p).map_err(|e| Error::from(e).context(p.display()))?;
        let (mp, upper, lowers) = find_mount(&abs)?;
        let mut layer_dirs: Vec<(String, PathBuf)> = Vec::new();
        if let Some(u) = &upper {
            layer_dirs.push(("upper".into(), u.clone()));
        }
        for (i, l) in lowers.iter().enumerate() {
            layer_dirs.push((format!("lower {i}"), l.clone()));
        }
        // Read-only view of the same layers: the upper is just the top layer here.
        let u = Union::new(Config {
            upper: None,
            work: None,
            lowers: layer_dirs.iter().map(|l| l.1.clone()).collect(),
            fsync: false,
            marker_ns: crate::union::format::MarkerNs::Trusted,
        })?;
        let rel = abs.strip_prefix(&mp).unwrap_or(Path::new(""));
        let (mut parent, mut id, mut last) = (ROOT_ID, ROOT_ID, None::<&OsStr>);
        for c in rel.components() {
            if let Component::Normal(n) = c {
                parent = id;
                id = u
                    .lookup(id, n)
                    .map_err(|e| e.context(format!("{} (in the union)", abs.display())))?
                    .id;
                last = Some(n);
            }
        }
        let (layers, is_dir) = u.layers_of(id)?;
        let name_layers = match last {
            Some(n) => u.layers_with_name(parent, n)?,
            None => layers.clone(),
        };
        let top = layers[0];
        let copied_up = upper.is_some() && top == 0 && name_layers.iter().any(|&l| l > 0);
        let mut v = json!({
            "path": abs, "mount": mp,
            "served_by": {"layer": layer_dirs[top].0, "dir": layer_dirs[top].1},
            "copied_up": copied_up,
            "also_in": name_layers.iter().filter(|&&l| l != top).map(|&l| &layer_dirs[l].0).collect::<Vec<_>>(),
        });
        if is_dir {
            v["merged_from"] = json!(
                u.entries_per_layer(id)?
                    .iter()
                    .map(|(l, n)| json!({"layer": layer_dirs[*l].0, "entries": n}))
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
        println!(
            "  served by: {} ({})",
            v["served_by"]["layer"].as_str().unwrap_or(""),
            v["served_by"]["dir"].as_str().unwrap_or("")
        );
        if v["copied_up"].as_bool() == Some(true) {
            println!(
                "  copied up from: {}",
                v["also_in"][0].as_str().unwrap_or("?")
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
