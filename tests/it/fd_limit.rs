//! A daemon with few file descriptors: its cache of directory fds gives way to the files
//! callers open, so only the limit itself (one fd per open file) bounds them.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::process::Command;

use crate::require_fuse;
use crate::support::*;

/// RLIMIT_NOFILE (soft and hard) of the daemon under test.
const LIMIT: usize = 64;

#[test]
fn open_files_take_the_fds_the_directory_cache_held() {
    require_fuse!();
    let s = Scratch::new();
    let low = s.mkdir("low");
    let mut files = Vec::new();
    for d in 0..30 {
        for f in 0..10 {
            let p = format!("d{d}/f{f}");
            write(low.join(&p), p.as_bytes());
            files.push(p);
        }
    }
    let mnt = s.path("m");
    fs::create_dir_all(&mnt).unwrap();
    let (ok, _, err) = run_timeout(
        Command::new("prlimit")
            .arg(format!("--nofile={LIMIT}:{LIMIT}"))
            .args([BIN, "mount", "-o"])
            .arg(rw_opts(&low, &s.mkdir("u"), &s.mkdir("w")))
            .arg(&mnt),
        30,
    );
    assert!(ok, "mount at nofile={LIMIT}: {err}");
    let m = Layerfs { mnt };
    // What the daemon holds before any request (layer roots, /dev/fuse, rings: more CPUs,
    // more fds) leaves the rest of the limit to open files and the directory cache.
    let pid = daemon_pid(&m.mnt).expect("daemon pid");
    let base = fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count();
    let room = LIMIT.saturating_sub(base + 8);
    if room < 8 {
        eprintln!(
            "SKIPPED {}: the daemon holds {base} fds at start",
            module_path!()
        );
        return;
    }
    // Every directory looked up and listed: the cache holds an fd for each.
    for p in &files {
        fs::metadata(m.mnt.join(p)).unwrap();
    }
    // Held open at once: all but 8 of the fds the daemon has left (the cache held 30 of
    // them, and kept them, before).
    let held: Vec<(String, File)> = files
        .iter()
        .step_by(7)
        .take(room)
        .map(|p| {
            let f = File::open(m.mnt.join(p)).unwrap_or_else(|e| panic!("open {p}: {e}"));
            (p.clone(), f)
        })
        .collect();
    for (p, mut f) in held {
        let mut got = String::new();
        f.read_to_string(&mut got).unwrap();
        assert_eq!(got, p);
    }
    // Copy-ups (each needs fds of its own) while 20 files stay open.
    let held: Vec<File> = files[..20]
        .iter()
        .map(|p| File::open(m.mnt.join(p)).unwrap())
        .collect();
    for p in &files[100..120] {
        let mut f = OpenOptions::new()
            .append(true)
            .open(m.mnt.join(p))
            .unwrap_or_else(|e| panic!("open {p} for append: {e}"));
        f.write_all(b"+").unwrap();
    }
    drop(held);
    for p in &files[100..120] {
        assert_eq!(
            fs::read(s.path("u").join(p)).unwrap(),
            format!("{p}+").as_bytes()
        );
    }
}
