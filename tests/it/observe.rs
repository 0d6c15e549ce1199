//! Seeing copy-on-write: `events`, `stats`, `which`, `layers` and the SVG, through real mounts.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::Duration;

use serde_json::Value;

use crate::require_fuse;
use crate::support::*;

/// `layerfs events --format json` in the background; killed on drop.
struct Watcher {
    _child: Reaped,
    lines: Receiver<Value>,
}

impl Watcher {
    fn start(mnt: &Path) -> Watcher {
        let before = stats(mnt)["event_listeners"].as_u64().unwrap();
        let mut child = Command::new(BIN)
            .args(["events", "--format", "json"])
            .arg(mnt)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(serde_json::from_str(&l).unwrap()).is_err() {
                    break;
                }
            }
        });
        // Subscribed once the daemon counts one more listener.
        assert!(
            wait_until(10, || stats(mnt)["event_listeners"].as_u64()
                == Some(before + 1)),
            "events never subscribed"
        );
        Watcher {
            _child: Reaped(child),
            lines,
        }
    }

    /// Every event that arrives within `quiet` of the previous one (bounded at 10 s).
    fn drain(&self, quiet: Duration) -> Vec<Value> {
        let mut v = Vec::new();
        let start = std::time::Instant::now();
        while let Ok(e) = self.lines.recv_timeout(quiet) {
            v.push(e);
            if start.elapsed() > Duration::from_secs(10) {
                break;
            }
        }
        v
    }
}

fn three_layers(s: &Scratch) -> (Layerfs, [std::path::PathBuf; 3]) {
    let (l0, l1, l2) = (s.mkdir("l0"), s.mkdir("l1"), s.mkdir("l2"));
    write(l0.join("top"), b"0");
    write(l1.join("mid"), b"1");
    write(l2.join("bot"), b"bottom bytes");
    write(l2.join("top"), b"shadowed");
    let (up, work) = (s.mkdir("up"), s.mkdir("work"));
    let opts = format!(
        "lowerdir={}:{}:{},upperdir={},workdir={}",
        l0.display(),
        l1.display(),
        l2.display(),
        up.display(),
        work.display()
    );
    (Layerfs::mount(&opts, &s.path("mnt")), [l0, l1, l2])
}

#[test]
fn an_append_to_a_lower_file_is_one_copy_up_event_with_the_writer_and_one_count() {
    require_fuse!();
    let s = Scratch::new();
    let (m, _) = three_layers(&s);
    let before = stats(&m.mnt);
    let w = Watcher::start(&m.mnt);
    let w2 = Watcher::start(&m.mnt); // several readers at once
    let mut sh = Command::new("sh")
        .arg("-c")
        .arg(format!("echo more >> '{}'", m.mnt.join("bot").display()))
        .spawn()
        .unwrap();
    let pid = sh.id();
    assert!(wait_until(10, || sh.try_wait().unwrap().is_some()));
    for watcher in [&w, &w2] {
        let events = watcher.drain(Duration::from_millis(700));
        let copy_ups: Vec<&Value> = events.iter().filter(|e| e["event"] == "copy-up").collect();
        assert_eq!(copy_ups.len(), 1, "exactly one copy-up: {events:?}");
        let e = copy_ups[0];
        assert_eq!(e["path"], "/bot");
        assert_eq!(e["from"], "lower 2", "source layer");
        assert_eq!(e["bytes"], 12);
        assert_eq!(e["data"], true);
        assert_eq!(e["op"], "open", "an O_APPEND open copies up");
        assert_eq!(e["pid"].as_u64(), Some(u64::from(pid)), "{e}");
        assert_eq!(e["comm"], "sh");
    }
    let after = stats(&m.mnt);
    let count = |v: &Value, k: &str| v["copy_ups"][k].as_u64().unwrap();
    assert_eq!(count(&after, "count"), count(&before, "count") + 1);
    assert_eq!(count(&after, "with_data"), count(&before, "with_data") + 1);
    assert_eq!(count(&after, "bytes"), count(&before, "bytes") + 12);
    assert!(after["ops"]["open"]["count"].as_u64().unwrap() >= 1);
    assert!(after["ops"]["lookup"]["p99_us"].as_f64().unwrap() > 0.0);
    assert!(after["inodes"].as_u64().unwrap() >= 2);
    assert!(after["rss_bytes"].as_u64().unwrap() > 1 << 20);

    // Deletes, renames and their markers are events too.
    std::fs::remove_file(m.mnt.join("mid")).unwrap();
    std::fs::create_dir(m.mnt.join("newdir")).unwrap();
    std::fs::rename(m.mnt.join("newdir"), m.mnt.join("top2")).unwrap();
    let kinds: Vec<String> = w
        .drain(Duration::from_millis(700))
        .iter()
        .map(|e| e["event"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(kinds, ["whiteout", "unlink", "rename"], "{kinds:?}");
    let st = stats(&m.mnt);
    assert_eq!(st["whiteouts"].as_u64(), Some(1));
    assert_eq!(st["unlinks"].as_u64(), Some(1));
    assert_eq!(st["renames"].as_u64(), Some(1));

    // Readers that leave are forgotten: nobody listening again.
    drop(w);
    drop(w2);
    assert!(wait_until(10, || stats(&m.mnt)["event_listeners"] == 0));
}

#[test]
fn which_tells_the_layer_the_copy_up_source_and_what_hides_a_name() {
    require_fuse!();
    let s = Scratch::new();
    let (m, [_, l1, l2]) = three_layers(&s);
    write(l2.join("gone"), b"g");
    whiteout(l1.join("gone"));
    let mnt = m.mnt.clone();
    let which = |name: &str| json_of(&["which", "--format", "json"], &mnt.join(name))[0].clone();
    for (name, layer) in [("top", "lower 0"), ("mid", "lower 1"), ("bot", "lower 2")] {
        assert_eq!(which(name)["served_by"]["layer"], layer, "{name}");
        assert_eq!(which(name)["copied_up"], false, "{name}");
    }
    assert_eq!(which("top")["also_in"][0], "lower 2");
    // A deleted name: not visible, and which whiteout hides which copy.
    let g = which("gone");
    assert_eq!(g["visible"], false);
    assert_eq!(g["hidden"][0]["layer"], "lower 2");
    assert_eq!(g["hidden"][0]["by"], "whiteout");
    assert_eq!(g["hidden"][0]["in"], "lower 1");
    // After copy-up of each: the upper serves it, copied up from its own layer.
    for (name, from) in [("top", "lower 0"), ("mid", "lower 1"), ("bot", "lower 2")] {
        std::fs::OpenOptions::new()
            .append(true)
            .open(m.mnt.join(name))
            .unwrap();
        let w = which(name);
        assert_eq!(w["served_by"]["layer"], "upper", "{name}");
        assert_eq!(w["copied_up"], true, "{name}");
        assert_eq!(w["copied_up_from"]["layer"], from, "{name}");
    }
    // A renamed file: the upper serves the new name, the old one is whited out.
    std::fs::rename(mnt.join("mid"), mnt.join("mid-renamed")).unwrap();
    assert_eq!(which("mid-renamed")["served_by"]["layer"], "upper");
    assert_eq!(which("mid")["hidden"][0]["by"], "whiteout");
    // A deleted lower file: hidden by the upper's whiteout.
    std::fs::remove_file(m.mnt.join("bot")).unwrap();
    let b = which("bot");
    assert_eq!(
        (b["visible"].clone(), b["hidden"][0]["in"].clone()),
        (false.into(), "upper".into())
    );
    // A renamed lower directory: served by the upper, merged from its old name.
    std::fs::create_dir(l1.join("dir")).unwrap();
    write(l1.join("dir/f"), b"f");
    let m2 = {
        drop(m);
        let opts = format!(
            "lowerdir={}:{}:{},upperdir={},workdir={}",
            s.path("l0").display(),
            l1.display(),
            l2.display(),
            s.path("up").display(),
            s.path("work").display()
        );
        Layerfs::mount(&opts, &s.path("mnt"))
    };
    std::fs::rename(m2.mnt.join("dir"), m2.mnt.join("moved")).unwrap();
    let mv = which("moved");
    assert_eq!(mv["served_by"]["layer"], "upper");
    assert_eq!(mv["redirected_from"], "/dir");
    assert_eq!(which("moved/f")["served_by"]["layer"], "lower 1");
}

/// A stack with known effects: bottom adds 6 names, middle changes one, deletes one (char
/// whiteout) and one (OCI .wh.), adds one; top makes a directory opaque (hiding 2) with one
/// new entry.
fn known_stack(s: &Scratch) -> [std::path::PathBuf; 3] {
    let (l0, l1, l2) = (s.mkdir("k0"), s.mkdir("k1"), s.mkdir("k2"));
    write(l2.join("a"), &[1; 100]);
    write(l2.join("b"), &[2; 200]);
    write(l2.join("c"), &[3; 300]);
    std::fs::create_dir(l2.join("d")).unwrap();
    write(l2.join("d/e"), &[4; 400]);
    write(l2.join("d/f"), &[5; 500]);
    write(l1.join("a"), &[6; 10]);
    whiteout(l1.join("b"));
    write(l1.join(".wh.c"), b"");
    write(l1.join("n"), &[7; 70]);
    std::fs::create_dir(l0.join("d")).unwrap();
    set_xattr(l0.join("d"), "trusted.overlay.opaque", b"y");
    write(l0.join("d/g"), &[8; 8]);
    [l0, l1, l2]
}

#[test]
fn layers_counts_match_a_known_stack_and_the_svg_is_well_formed() {
    require_fuse!();
    let s = Scratch::new();
    let [l0, l1, l2] = known_stack(&s);
    let m = Layerfs::mount(
        &format!("lowerdir={}", lowerdir(&[l0, l1, l2])),
        &s.path("mnt"),
    );
    let svg = s.path("stack.svg");
    let (ok, out, err) = run_timeout(
        Command::new(BIN)
            .args(["layers", "--format", "json", "--svg"])
            .arg(&svg)
            .arg(&m.mnt),
        30,
    );
    assert!(ok, "{err}");
    let maps: Value = serde_json::from_str(&out).unwrap();
    let row = |i: usize| {
        let r = &maps[i];
        [
            "adds",
            "changes",
            "deletes",
            "opaque_dirs",
            "size_bytes",
            "hides_bytes",
        ]
        .map(|k| r[k].as_u64().unwrap())
    };
    // adds, changes, deletes, opaque, size, hides
    assert_eq!(maps[0]["label"], "lower 0");
    assert_eq!(row(0), [1, 1, 2, 1, 8, 900], "top: opaque d hides e and f");
    assert_eq!(
        row(1),
        [1, 1, 2, 0, 80, 600],
        "middle: a changed, b and c deleted"
    );
    assert_eq!(row(2), [6, 0, 0, 0, 1500, 0], "bottom: everything added");

    // The picture: well-formed XML, one group per layer carrying the same counts, top first.
    let text = std::fs::read_to_string(&svg).unwrap();
    let doc = roxmltree::Document::parse(&text).expect("well-formed SVG");
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    let groups: Vec<_> = doc
        .descendants()
        .filter(|n| n.attribute("class") == Some("layer"))
        .collect();
    assert_eq!(groups.len(), 3);
    for (i, g) in groups.iter().enumerate() {
        assert_eq!(g.attribute("data-label"), maps[i]["label"].as_str());
        let r = row(i);
        assert_eq!(g.attribute("data-adds"), Some(r[0].to_string().as_str()));
        assert_eq!(g.attribute("data-deletes"), Some(r[2].to_string().as_str()));
        let rects = g.children().filter(|c| c.has_tag_name("rect")).count();
        assert!(rects >= 1, "a bar per layer");
    }
}

#[test]
fn watching_a_path_that_cannot_be_watched_is_a_one_line_error() {
    require_fuse!();
    assert_one_line_error(&["stats", "/etc"], "is not on a layerfs mount");
    assert_one_line_error(&["events", "/etc"], "is not on a layerfs mount");
    assert_one_line_error(&["layers", "/etc"], "is not on a layerfs mount");
    assert_one_line_error(&["which", "/etc/hostname"], "is not on a layerfs mount");
    let s = Scratch::new();
    let low = s.mkdir("low");
    write(low.join("f"), b"x");
    let m = Layerfs::mount(&format!("lowerdir={}", low.display()), &s.path("mnt"));
    let mnt = m.mnt.to_str().unwrap().to_string();
    // A reader that goes away (`| head -1`) ends the command quietly and leaves the daemon be.
    let (ok, out, err) = run_timeout(
        Command::new("sh").arg("-c").arg(format!(
            "'{BIN}' stats --watch --format json --interval 0.1 '{mnt}' | head -1"
        )),
        30,
    );
    assert!(
        ok && out.lines().count() == 1 && err.is_empty(),
        "{out} {err}"
    );
    assert!(stats(&m.mnt)["uptime_s"].as_f64().is_some(), "daemon alive");
    // Another user may not ask root's daemon.
    let (ok, _, err) = run_timeout(
        Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                BIN,
                "stats",
            ])
            .arg(&mnt),
        30,
    );
    assert!(!ok);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("belongs to uid 0"), "{err}");
    // A dead daemon: one line that says so and how to clear the mount.
    let pid = daemon_pid(&m.mnt).expect("daemon pid");
    // SAFETY-free: the kill(1) command.
    Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(wait_until(10, || daemon_pid(&m.mnt).is_none()));
    assert_one_line_error(&["stats", &mnt], "no layerfs daemon answers");
    assert_one_line_error(&["which", &format!("{mnt}/f")], "no layerfs daemon answers");
}

/// The daemon holds a node per inode the kernel keeps. When the kernel forgets them (memory
/// pressure, here `drop_caches`), their memory goes back to the system: the node maps give
/// back their room and the heap is trimmed. Before, a daemon kept a walk's worth of memory
/// for good (a 300k-file walk: 94 MiB, still held with one inode left; now 10 MiB).
#[test]
fn memory_of_inodes_the_kernel_forgot_goes_back_to_the_system() {
    require_fuse!();
    let s = Scratch::new();
    let low = s.mkdir("low");
    for d in 0..50 {
        let dir = low.join(format!("dir{d:03}"));
        std::fs::create_dir(&dir).unwrap();
        for f in 0..400 {
            std::fs::File::create(dir.join(format!("a-file-of-the-walk-{f:03}"))).unwrap();
        }
    }
    let (up, work) = (s.mkdir("up"), s.mkdir("work"));
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        low.display(),
        up.display(),
        work.display()
    );
    let m = Layerfs::mount(&opts, &s.path("mnt"));
    let mut seen = 0;
    for d in std::fs::read_dir(&m.mnt).unwrap() {
        for f in std::fs::read_dir(d.unwrap().path()).unwrap() {
            f.unwrap().metadata().unwrap();
            seen += 1;
        }
    }
    assert_eq!(seen, 20_000);
    let held = stats(&m.mnt);
    assert!(held["inodes"].as_u64().unwrap() > 20_000, "{held}");
    std::fs::write("/proc/sys/vm/drop_caches", "2").unwrap();
    assert!(
        wait_until(10, || stats(&m.mnt)["inodes"].as_u64().unwrap() < 1_000),
        "the kernel forgot the walk's inodes: {}",
        stats(&m.mnt)
    );
    let rss = |v: &Value| v["rss_bytes"].as_u64().unwrap();
    // 20k nodes with their names and map slots take ~6 MiB; most of it must come back, once
    // the burst of forgets is over.
    let gave_back = wait_until(10, || rss(&stats(&m.mnt)) + (3 << 20) < rss(&held));
    assert!(
        gave_back,
        "RSS {} MiB with 20k inodes held, {} MiB after the kernel forgot them",
        rss(&held) >> 20,
        rss(&stats(&m.mnt)) >> 20
    );
}
