//! `catalog=FILE`: what lookups learned about directories merged over many lower layers, kept
//! across mounts. A mount that uses it must see exactly what a mount without it sees (and what
//! the kernel sees); a catalog of other layers, or a damaged one, must never be trusted.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::read_side::build_deep_stack;
use crate::require_fuse;
use crate::support::*;

/// What a stat by name (no listing first: every component is a LOOKUP) shows.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    mode: u32,
    uid: u32,
    gid: u32,
    nlink: u64,
    size: Option<u64>,
    data: Option<Vec<u8>>,
    target: Option<PathBuf>,
    ino: u64,
}

/// Each path and what a stat by name showed (or its errno).
type Views = Vec<(String, Result<Seen, i32>)>;

/// Names the deep stack hides (whiteouts, opaque directories, replaced directories).
const ABSENT: [&str; 6] = [
    "gone",
    "gonedir",
    "gonedir/f",
    "opq/old",
    "was_dir/f",
    "nowhere",
];

/// Every path, deepest first, stat'ed by name under `root`; errno where it fails.
fn by_name(root: &Path, paths: &[Vec<u8>]) -> Views {
    paths
        .iter()
        .rev()
        .map(|p| {
            let full = root.join(OsStr::from_bytes(p));
            let seen = std::fs::symlink_metadata(&full)
                .map(|m| Seen {
                    mode: m.mode(),
                    uid: m.uid(),
                    gid: m.gid(),
                    nlink: m.nlink(),
                    size: (!m.is_dir()).then_some(m.size()),
                    data: m.is_file().then(|| std::fs::read(&full).unwrap()),
                    target: m
                        .file_type()
                        .is_symlink()
                        .then(|| std::fs::read_link(&full).unwrap()),
                    ino: m.ino(),
                })
                .map_err(|e| e.raw_os_error().unwrap_or(0));
            (String::from_utf8_lossy(p).into_owned(), seen)
        })
        .collect()
}

/// The same, without inode numbers (the kernel numbers merged directories its own way).
fn without_ino(v: &Views) -> Views {
    v.iter()
        .map(|(p, s)| {
            let s = match s {
                Ok(s) => Ok(Seen {
                    ino: 0,
                    data: s.data.clone(),
                    target: s.target.clone(),
                    ..*s
                }),
                Err(e) => Err(*e),
            };
            (p.clone(), s)
        })
        .collect()
}

/// Every path of the kernel's view of `lowers`, plus names it hides.
fn all_paths(s: &Scratch, lowers: &[PathBuf]) -> (Vec<Vec<u8>>, Views) {
    let k = Kernel::mount(&format!("lowerdir={}", lowerdir(lowers)), &s.path("kmnt"));
    let mut paths: Vec<Vec<u8>> = snapshot(&k.mnt).keys().cloned().collect();
    paths.extend(ABSENT.iter().map(|a| a.as_bytes().to_vec()));
    let seen = by_name(&k.mnt, &paths);
    (paths, seen)
}

/// Unmount and wait for the daemon to be gone (it writes the catalog on its way out).
fn unmount_and_wait(m: Layerfs) {
    let pid = daemon_pid(&m.mnt).expect("daemon pid");
    m.unmount();
    let gone = || {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .map(|s| {
                s.lines()
                    .any(|l| l.starts_with("State:") && l.contains('Z'))
            })
            .unwrap_or(true)
    };
    assert!(wait_until(20, gone), "daemon {pid} still running");
}

fn catalog_stats(mnt: &Path) -> (u64, u64) {
    let v = stats(mnt);
    let c = &v["catalog"];
    assert!(c.is_object(), "stats without a catalog: {v}");
    (
        c["directories"].as_u64().unwrap(),
        c["answers"].as_u64().unwrap(),
    )
}

#[test]
fn lookups_through_a_catalog_match_the_kernel_across_mounts() {
    require_fuse!();
    let s = Scratch::new();
    let lowers = build_deep_stack(&s);
    let (paths, kernel) = all_paths(&s, &lowers);
    assert!(
        kernel.iter().any(|(p, r)| p == "fresh/f23" && r.is_ok())
            && kernel.iter().any(|(p, r)| p == "gone" && r.is_err()),
        "fixture sanity"
    );
    let cat = s.path("stack.catalog");
    let ro = format!("lowerdir={},catalog={}", lowerdir(&lowers), cat.display());

    // First mount: nothing known yet; the catalog is written when it goes.
    let m = Layerfs::mount(&ro, &s.path("m1"));
    let first = by_name(&m.mnt, &paths);
    assert_eq!(catalog_stats(&m.mnt).1, 0, "a new catalog answered");
    assert_eq!(
        without_ino(&first),
        without_ino(&kernel),
        "first mount vs kernel"
    );
    unmount_and_wait(m);
    assert!(cat.exists(), "catalog not written at unmount");

    // Second mount: answers come from the catalog, and nothing changes (inode numbers
    // included).
    let m = Layerfs::mount(&ro, &s.path("m2"));
    let (dirs, _) = catalog_stats(&m.mnt);
    assert!(dirs >= 3, "root, m, m/deep, opq... are deep: {dirs}");
    let second = by_name(&m.mnt, &paths);
    let (_, answers) = catalog_stats(&m.mnt);
    assert!(answers > 0, "the catalog answered nothing");
    assert_eq!(second, first, "catalog mount vs first mount");
    unmount_and_wait(m);

    // A writable mount numbers its layers from 1 (the upper is 0): same answers, and writes
    // over catalog-known directories behave.
    let up = s.mkdir("upper");
    let wk = s.mkdir("work");
    let rw = format!(
        "lowerdir={},upperdir={},workdir={},catalog={}",
        lowerdir(&lowers),
        up.display(),
        wk.display(),
        cat.display()
    );
    let m = Layerfs::mount(&rw, &s.path("m3"));
    let third = by_name(&m.mnt, &paths);
    assert!(
        catalog_stats(&m.mnt).1 > 0,
        "writable mount: catalog unused"
    );
    assert_eq!(third, first, "writable catalog mount vs first mount");
    std::fs::remove_file(m.mnt.join("fresh/f23")).unwrap();
    write(m.mnt.join("m/deep/new"), b"new");
    std::fs::create_dir(m.mnt.join("gonedir")).unwrap();
    unmount_and_wait(m);
    let m = Layerfs::mount(&rw, &s.path("m4"));
    assert!(std::fs::symlink_metadata(m.mnt.join("fresh/f23")).is_err());
    assert_eq!(std::fs::read(m.mnt.join("m/deep/new")).unwrap(), b"new");
    assert_eq!(std::fs::read(m.mnt.join("m/deep/x")).unwrap(), b"deep");
    assert!(std::fs::symlink_metadata(m.mnt.join("gonedir/f")).is_err());
    assert_eq!(
        std::fs::read(m.mnt.join("fresh/f22")).unwrap(),
        b"filler",
        "neighbours of a deleted lower file"
    );
}

#[test]
fn a_catalog_of_other_layers_or_a_damaged_one_is_not_trusted() {
    require_fuse!();
    let s = Scratch::new();
    let lowers = build_deep_stack(&s);
    let cat = s.path("stack.catalog");
    let opts = |ls: &[PathBuf]| format!("lowerdir={},catalog={}", lowerdir(ls), cat.display());
    let (paths, _) = all_paths(&s, &lowers);
    let m = Layerfs::mount(&opts(&lowers), &s.path("m1"));
    by_name(&m.mnt, &paths);
    unmount_and_wait(m);
    assert!(cat.exists(), "catalog not written");

    // The same layers in another order: every answer the catalog holds would be wrong.
    let mut other = lowers.clone();
    other.swap(0, 5);
    other.swap(1, 10);
    let (paths2, kernel2) = all_paths(&s, &other);
    let m = Layerfs::mount(&opts(&other), &s.path("m2"));
    assert_eq!(
        catalog_stats(&m.mnt),
        (0, 0),
        "other layers: catalog loaded"
    );
    assert_eq!(
        without_ino(&by_name(&m.mnt, &paths2)),
        without_ino(&kernel2),
        "reordered layers vs kernel"
    );
    assert_eq!(catalog_stats(&m.mnt).1, 0, "other layers: catalog answered");
    unmount_and_wait(m);

    // The unmount above rewrote it for the reordered stack; rebuild it for the first, then
    // damage one byte in the middle.
    std::fs::remove_file(&cat).unwrap();
    let m = Layerfs::mount(&opts(&lowers), &s.path("m3"));
    let good = by_name(&m.mnt, &paths);
    unmount_and_wait(m);
    assert!(cat.exists(), "catalog not rewritten");
    let mut bytes = std::fs::read(&cat).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x5a;
    std::fs::write(&cat, &bytes).unwrap();
    let m = Layerfs::mount(&opts(&lowers), &s.path("m4"));
    assert_eq!(catalog_stats(&m.mnt), (0, 0), "damaged catalog loaded");
    assert_eq!(by_name(&m.mnt, &paths), good, "after a damaged catalog");
    assert_eq!(catalog_stats(&m.mnt).1, 0, "damaged catalog answered");
}

#[test]
fn catalog_option_is_checked() {
    let s = Scratch::new();
    let l = s.mkdir("lower");
    let mnt = s.mkdir("mnt");
    let m = mnt.to_str().unwrap();
    let inside = format!("lowerdir={},catalog={}/c", l.display(), l.display());
    assert_one_line_error(&["mount", "-o", &inside, m], "inside layer directory");
    let dir = format!("lowerdir={},catalog={}", l.display(), s.path("").display());
    assert_one_line_error(&["mount", "-o", &dir, m], "catalog=");
    let missing = format!("lowerdir={},catalog=/nonexistent/dir/c", l.display());
    assert_one_line_error(&["mount", "-o", &missing, m], "catalog directory");
    let empty = format!("lowerdir={},catalog=", l.display());
    assert_one_line_error(&["mount", "-o", &empty, m], "needs a value");
}

#[test]
fn mounts_of_one_stack_side_by_side_keep_what_each_learned() {
    // Containers of one image share its catalog: the second to exit keeps the first's entries.
    require_fuse!();
    let s = Scratch::new();
    let lowers = build_deep_stack(&s);
    let cat = s.path("stack.catalog");
    let ro = format!("lowerdir={},catalog={}", lowerdir(&lowers), cat.display());
    let a = Layerfs::mount(&ro, &s.path("a"));
    let b = Layerfs::mount(&ro, &s.path("b"));
    assert_eq!(std::fs::read(a.mnt.join("m/deep/x")).unwrap(), b"deep");
    assert_eq!(std::fs::read(b.mnt.join("fresh/f23")).unwrap(), b"filler");
    let (in_a, _) = catalog_stats(&a.mnt);
    let (in_b, _) = catalog_stats(&b.mnt);
    assert!(in_a >= 3 && in_b >= 2, "a knows {in_a}, b knows {in_b}");
    unmount_and_wait(a);
    unmount_and_wait(b);
    let c = Layerfs::mount(&ro, &s.path("c"));
    // The root is the one directory both learned.
    assert_eq!(catalog_stats(&c.mnt), (in_a + in_b - 1, 0));
    assert_eq!(std::fs::read(c.mnt.join("m/deep/x")).unwrap(), b"deep");
    assert_eq!(std::fs::read(c.mnt.join("fresh/f23")).unwrap(), b"filler");
    assert!(catalog_stats(&c.mnt).1 > 0, "catalog unused");
}
