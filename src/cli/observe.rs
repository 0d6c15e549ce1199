//! `layerfs stats`, `layerfs events`, `layerfs layers` / `image layers`: watching
//! copy-on-write happen, from the daemon's control socket and from the layers themselves.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::control::client::Client;
use crate::error::{Context, Error, Result};
use crate::inspect::layers::{self, LayerMap, LayerSpec};
use crate::inspect::svg::{self, human};

/// The layers of the mount holding `path`, top first, as its daemon reports them.
pub fn mount_layers(path: &Path) -> Result<(PathBuf, Vec<LayerSpec>)> {
    Ok(layers_in(&mount_info(path)?))
}

/// What the daemon serving `path` says of its mount (`info`).
pub fn mount_info(path: &Path) -> Result<Value> {
    Client::connect(path)?.ask("info")
}

/// The mountpoint and layers (top first) an `info` answer lists.
pub fn layers_in(info: &Value) -> (PathBuf, Vec<LayerSpec>) {
    let mp = PathBuf::from(info["mountpoint"].as_str().unwrap_or_default());
    let specs = info["layers"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|l| LayerSpec {
                    label: l["label"].as_str().unwrap_or("?").to_string(),
                    dir: PathBuf::from(l["dir"].as_str().unwrap_or_default()),
                    store: l["store"].as_str().map(str::to_string),
                })
                .collect()
        })
        .unwrap_or_default();
    (mp, specs)
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(0.0)
}

fn n(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

fn pct(v: &Value) -> String {
    v.as_f64()
        .map_or("-".into(), |r| format!("{:.1}%", r * 100.0))
}

/// The stats as a screenful of text; `prev` (with its time) gives per-second rates.
fn stats_text(mp: &Path, v: &Value, prev: Option<(&Value, Duration)>) -> String {
    let mut s = String::new();
    let c = &v["copy_ups"];
    let line = |s: &mut String, l: String| {
        s.push_str(&l);
        s.push('\n');
    };
    line(
        &mut s,
        format!(
            "layerfs {} — up {:.0}s, {} inodes held, {} open files, RSS {} (peak {})",
            mp.display(),
            f(&v["uptime_s"]),
            n(&v["inodes"]),
            n(&v["open_files"]),
            human(n(&v["rss_bytes"])),
            human(n(&v["peak_rss_bytes"]))
        ),
    );
    line(
        &mut s,
        format!(
            "copy-ups   {} ({} with data, {} metadata only), {} copied in {:.1} ms",
            n(&c["count"]),
            n(&c["with_data"]),
            n(&c["metadata_only"]),
            human(n(&c["bytes"])),
            f(&c["total_ms"])
        ),
    );
    line(
        &mut s,
        format!(
            "markers    {} whiteouts, {} opaque dirs, {} redirects; {} renames, {} unlinks",
            n(&v["whiteouts"]),
            n(&v["opaque_dirs"]),
            n(&v["redirects"]),
            n(&v["renames"]),
            n(&v["unlinks"])
        ),
    );
    line(
        &mut s,
        format!(
            "opens      {} passthrough, {} cached, {} reissued; caches: dir fds {} hits, dir names {} hits",
            n(&v["passthrough_opens"]),
            n(&v["cached_opens"]),
            n(&v["reissued"]),
            pct(&v["cache"]["dir_fd_hit_rate"]),
            pct(&v["cache"]["dir_names_hit_rate"])
        ),
    );
    if v["catalog"].is_object() {
        let c = &v["catalog"];
        line(
            &mut s,
            format!(
                "catalog    {} deep directories, {} subdirectories known; {} lookups answered",
                n(&c["directories"]),
                n(&c["subdirectories"]),
                n(&c["answers"])
            ),
        );
    }
    let t = &v["transport"];
    line(
        &mut s,
        format!(
            "transport  {} requests over io_uring, {} over /dev/fuse",
            n(&t["io_uring"]),
            n(&t["dev_fuse"])
        ),
    );
    let (idle, plain) = (n(&t["idle_commits"]), n(&t["plain_commits"]));
    if idle + plain > 0 {
        line(
            &mut s,
            format!(
                "           replies waking a caller: {idle} committed at SCHED_IDLE (it stays on \
                 its CPU), {plain} plainly; {} callers ran on another CPU next",
                n(&t["caller_moves"])
            ),
        );
    }
    line(
        &mut s,
        format!(
            "\n{:<12} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "operation", "count", "per s", "mean µs", "p50 µs", "p90 µs", "p99 µs"
        ),
    );
    let mut ops: Vec<(&String, &Value)> = v["ops"]
        .as_object()
        .map(|o| o.iter().collect())
        .unwrap_or_default();
    ops.sort_by_key(|(_, o)| std::cmp::Reverse(n(&o["count"])));
    for (name, o) in ops {
        let rate = match prev {
            Some((p, dt)) if dt.as_secs_f64() > 0.0 => format!(
                "{:.0}",
                n(&o["count"]).saturating_sub(n(&p["ops"][name]["count"])) as f64
                    / dt.as_secs_f64()
            ),
            _ => "-".into(),
        };
        line(
            &mut s,
            format!(
                "{:<12} {:>10} {:>9} {:>9.1} {:>9.1} {:>9.1} {:>9.1}",
                name,
                n(&o["count"]),
                rate,
                f(&o["mean_us"]),
                f(&o["p50_us"]),
                f(&o["p90_us"]),
                f(&o["p99_us"])
            ),
        );
    }
    s
}

pub fn stats(mountpoint: &Path, watch: bool, interval: f64, format: &str) -> Result<i32> {
    let ask = || -> Result<(PathBuf, Value)> {
        let c = Client::connect(mountpoint)?;
        let mp = c.mount.mountpoint.clone();
        Ok((mp, c.ask("stats")?))
    };
    if !watch {
        let (mp, v) = ask()?;
        if format == "json" {
            println!("{v}");
        } else {
            print!("{}", stats_text(&mp, &v, None));
        }
        return Ok(0);
    }
    let every = Duration::from_secs_f64(interval.clamp(0.1, 3600.0));
    let mut prev: Option<(Value, Instant)> = None;
    let mut out = std::io::stdout();
    loop {
        let (mp, v) = ask()?;
        let now = Instant::now();
        if format == "json" {
            writeln!(out, "{v}")?;
        } else {
            let p = prev.as_ref().map(|(pv, t)| (pv, now - *t));
            // Home and clear, like top: the table redraws in place.
            write!(out, "\x1b[H\x1b[2J{}", stats_text(&mp, &v, p))?;
            writeln!(out, "\n(every {:.1}s; Ctrl-C ends)", every.as_secs_f64())?;
        }
        out.flush()?;
        prev = Some((v, now));
        std::thread::sleep(every);
    }
}

/// One event as a line of text.
fn event_text(e: &Value) -> String {
    let t = f(&e["time"]);
    let secs = t as i64;
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    let ms = ((t - secs as f64) * 1000.0) as u32;
    let who = match (e["comm"].as_str(), e["pid"].as_u64()) {
        (Some(c), Some(p)) => format!(" by {c}[{p}]"),
        (None, Some(p)) => format!(" by pid {p}"),
        _ => String::new(),
    };
    let op = e["op"]
        .as_str()
        .map_or(String::new(), |o| format!(" ({o})"));
    let path = e["path"].as_str().unwrap_or("");
    let what = match e["event"].as_str().unwrap_or("?") {
        "copy-up" if e["data"].as_bool() == Some(true) => format!(
            "copy-up  {path} from {}, {} in {:.2} ms",
            e["from"].as_str().unwrap_or("?"),
            human(n(&e["bytes"])),
            f(&e["ms"])
        ),
        "copy-up" => format!(
            "copy-up  {path} from {} (metadata only) in {:.2} ms",
            e["from"].as_str().unwrap_or("?"),
            f(&e["ms"])
        ),
        "rename" => format!(
            "rename   {} -> {}",
            e["from"].as_str().unwrap_or(""),
            e["to"].as_str().unwrap_or("")
        ),
        "redirect" => format!(
            "redirect {path} -> lower {}",
            e["lower_path"].as_str().unwrap_or("")
        ),
        "whiteout" => format!("whiteout {path}"),
        "opaque" => format!("opaque   {path}"),
        other => format!("{other:<8} {path}"),
    };
    format!("{h:02}:{m:02}:{s:02}.{ms:03} UTC  {what}{op}{who}")
}

pub fn events(mountpoint: &Path, format: &str) -> Result<i32> {
    let c = Client::connect(mountpoint)?;
    let mp = c.mount.mountpoint.clone();
    let mut out = std::io::stdout();
    let json = format == "json";
    let mut ok = true;
    c.follow(|e| {
        if e["event"] == "subscribed" {
            if !json {
                eprintln!("watching {} (Ctrl-C ends)", mp.display());
            }
            return true;
        }
        let line = if json { e.to_string() } else { event_text(&e) };
        // A closed stdout (`| head`) ends the stream quietly.
        ok = writeln!(out, "{line}").and_then(|()| out.flush()).is_ok();
        ok
    })?;
    Ok(0)
}

fn print_maps(title: &str, maps: &[LayerMap], format: &str, svg_out: Option<&Path>) -> Result<()> {
    if let Some(p) = svg_out {
        std::fs::write(p, svg::render(title, maps)).ctx(format!("writing {}", p.display()))?;
    }
    if format == "json" {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!(maps)).unwrap_or_default()
        );
        return Ok(());
    }
    println!(
        "{:<10} {:<20} {:>8} {:>8} {:>8} {:>10} {:>10}",
        "LAYER", "ID", "ADDS", "CHANGES", "DELETES", "SIZE", "HIDES"
    );
    for m in maps {
        let id = m.store.as_deref().map_or("-".to_string(), |s| {
            s.strip_prefix("sha256:")
                .map_or(s.to_string(), |h| h[..h.len().min(12)].to_string())
        });
        println!(
            "{:<10} {:<20} {:>8} {:>8} {:>8} {:>10} {:>10}",
            m.label,
            id,
            m.adds,
            m.changes,
            m.deletes,
            human(m.size_bytes),
            human(m.hides_bytes)
        );
    }
    if let Some(p) = svg_out {
        println!("picture: {}", p.display());
    }
    Ok(())
}

fn progress(label: &str) {
    if crate::sys::stderr_is_tty() {
        eprint!("\rmapping {label}...   ");
    }
}

fn progress_done() {
    if crate::sys::stderr_is_tty() {
        eprint!("\r{:30}\r", "");
    }
}

/// `layerfs layers MOUNTPOINT`.
pub fn mount_layer_maps(mountpoint: &Path, format: &str, svg_out: Option<&Path>) -> Result<i32> {
    let (mp, specs) = mount_layers(mountpoint)?;
    let maps = layers::map_layers(&specs, progress)?;
    progress_done();
    print_maps(&format!("layerfs {}", mp.display()), &maps, format, svg_out)?;
    Ok(0)
}

/// `layerfs image layers IMAGE`.
pub fn image_layer_maps(
    store: &crate::store::Store,
    image: &str,
    format: &str,
    svg_out: Option<&Path>,
) -> Result<i32> {
    let img = store.resolve(image)?;
    let n = img.layers.len();
    let specs: Vec<LayerSpec> = img
        .layers
        .iter()
        .enumerate()
        .rev()
        .map(|(i, l)| LayerSpec {
            label: format!("layer {i}"),
            dir: store.layer_dir(&l.diff_id).join("diff"),
            store: Some(l.diff_id.to_string()),
        })
        .collect();
    if specs.is_empty() {
        return Err(Error::msg(format!("image {image} has no layers")));
    }
    let maps = layers::map_layers(&specs, progress)?;
    progress_done();
    let title = format!("{image} ({n} layers)");
    print_maps(&title, &maps, format, svg_out)?;
    Ok(0)
}
