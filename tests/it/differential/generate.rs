//! Random lower layers and random operations, all from one seed.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use crate::support::*;

/// SplitMix64: small, fast, and the same sequence for the same seed everywhere.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    pub fn pick<'a, T>(&mut self, v: &'a [T]) -> Option<&'a T> {
        if v.is_empty() {
            None
        } else {
            Some(&v[self.below(v.len() as u64) as usize])
        }
    }
}

/// A name for a new entry: mostly short, sometimes odd (never a `.wh.` marker name: creating
/// those is a deliberate difference, tested on its own).
pub fn name(r: &mut Rng) -> OsString {
    match r.below(20) {
        0 => OsString::from_vec(vec![b'L'; 200 + r.below(56) as usize]),
        1 => OsString::from(format!("sp ace{}", r.below(4))),
        2 => OsString::from(format!("new\nline{}", r.below(3))),
        3 => OsString::from_vec(vec![b'b', 0xff, b'0' + r.below(4) as u8]),
        _ => OsString::from(format!(
            "{}{}",
            ["a", "b", "c", "dir", "f"][r.below(5) as usize],
            r.below(6)
        )),
    }
}

fn content(r: &mut Rng) -> Vec<u8> {
    let len = match r.below(10) {
        0 => 0,
        1 => (1 << 20) + r.below(300_000) as usize,
        2..=4 => r.below(20_000) as usize,
        _ => r.below(200) as usize,
    };
    let b = r.below(256) as u8;
    (0..len).map(|i| b.wrapping_add((i / 97) as u8)).collect()
}

/// The opaque marker of the format under test: with `userxattr` in LAYERFS_DIFF_OPTIONS the
/// kernel reads only `user.overlay.*` markers.
fn opaque_xattr() -> &'static str {
    let opts = std::env::var("LAYERFS_DIFF_OPTIONS").unwrap_or_default();
    if opts.split(',').any(|o| o == "userxattr") {
        "user.overlay.opaque"
    } else {
        "trusted.overlay.opaque"
    }
}

/// A kernel xattr whiteout at `rel` (an empty file carrying `overlay.whiteout`), its
/// directory sometimes marked `opaque=x` (the listing then hides it) unless already opaque.
fn xwhiteout(r: &mut Rng, root: &Path, rel: &Path) {
    let ns = opaque_xattr().trim_end_matches("opaque");
    let full = root.join(rel);
    write(&full, b"");
    set_xattr(&full, &format!("{ns}whiteout"), b"");
    let dir = full.parent().unwrap();
    if r.chance(60) && get_xattr(dir, opaque_xattr()).is_none() {
        set_xattr(dir, opaque_xattr(), b"x");
    }
}

/// Lower metadata-only copies are followed only with metacopy=on (else both answer EPERM,
/// which `metacopy::a_metacopy_upper_is_refused_without_metacopy_on_as_the_kernel_does` covers).
fn metacopy_on() -> bool {
    let opts = std::env::var("LAYERFS_DIFF_OPTIONS").unwrap_or_default();
    opts.split(',').any(|o| o == "metacopy=on")
}

/// A metadata-only copy at `rel` (as layers the kernel wrote with metacopy=on hold) whose
/// data is a non-empty file of the layer just below, `below`: reached by the same path, a
/// relative redirect (a sibling) or an absolute one; that file may be such a copy itself,
/// which makes a chain. A plain file when the layer below has none.
fn metacopy(r: &mut Rng, below: &Path, root: &Path, rel: &Path) {
    let full = root.join(rel);
    let files: Vec<PathBuf> = walk_files(below)
        .into_iter()
        .filter(|f| std::fs::metadata(below.join(f)).is_ok_and(|m| m.len() > 0))
        .collect();
    let Some(target) = r.pick(&files).cloned() else {
        write(&full, b"m");
        return;
    };
    let size = std::fs::metadata(below.join(&target)).unwrap().len();
    std::fs::File::create(&full).unwrap().set_len(size).unwrap();
    let ns = opaque_xattr().trim_end_matches("opaque");
    set_xattr(&full, &format!("{ns}metacopy"), b"");
    let redirect = if target == rel {
        None
    } else if target.parent() == rel.parent() && r.chance(50) {
        target.file_name().map(|n| n.as_encoded_bytes().to_vec())
    } else {
        // Raw bytes: a name that is not UTF-8 must stay the same name.
        Some([b"/", target.as_os_str().as_encoded_bytes()].concat())
    };
    if let Some(v) = redirect {
        set_xattr(&full, &format!("{ns}redirect"), &v);
    }
}

/// Fill `n` (1-6) lower layers with random trees. Returns them, top first.
pub fn layers(r: &mut Rng, s: &Scratch) -> Vec<PathBuf> {
    let n = 1 + r.below(6) as usize;
    let mut out = Vec::new();
    // Paths used so far, so upper layers shadow, merge with and delete lower ones.
    let mut known: Vec<(PathBuf, bool)> = Vec::new();
    for i in (0..n).rev() {
        let root = s.mkdir(&format!("lower{i}"));
        let mut dirs: Vec<PathBuf> = vec![PathBuf::new()];
        // Reuse some directory names from lower layers so they merge.
        for (p, is_dir) in known.iter() {
            if *is_dir && r.chance(60) {
                std::fs::create_dir_all(root.join(p)).unwrap();
                dirs.push(p.clone());
                if r.chance(10) {
                    set_xattr(root.join(p), opaque_xattr(), b"y");
                }
            }
        }
        let entries = 4 + r.below(14);
        for _ in 0..entries {
            let parent = r.pick(&dirs).unwrap().clone();
            let rel = if r.chance(30) {
                // Shadow or delete something from below.
                match r.pick(&known) {
                    Some((p, _))
                        if p.parent()
                            .is_some_and(|pp| dirs.contains(&pp.to_path_buf())) =>
                    {
                        p.clone()
                    }
                    _ => parent.join(name(r)),
                }
            } else {
                parent.join(name(r))
            };
            let full = root.join(&rel);
            if std::fs::symlink_metadata(&full).is_ok() {
                continue;
            }
            std::fs::create_dir_all(full.parent().unwrap()).unwrap();
            match r.below(16) {
                0..=4 => write(&full, &content(r)),
                5 => {
                    let f = std::fs::File::create(&full).unwrap();
                    f.set_len(r.below(4 << 20)).unwrap();
                }
                6..=8 => {
                    std::fs::create_dir(&full).unwrap();
                    dirs.push(rel.clone());
                }
                9 => symlink(
                    // (Followed by the ops: never out of the mount; see ops.rs.)
                    [
                        "a0",
                        "../b1/x",
                        "/nonexistent-layerfs-soak/x",
                        "dangling/x",
                        rel.file_name().unwrap().to_str().unwrap_or("x"),
                    ][r.below(5) as usize],
                    &full,
                )
                .unwrap(),
                10 => {
                    // A hard link to a file of this layer. Not to a metadata-only copy that
                    // finds its data by its own name or a relative redirect: the new name
                    // would look for other data, which no kernel writes, and the kernel,
                    // keeping one inode for both names, then reads whichever data it met
                    // first (metacopy soak with fillers, seed 1510351: its result changed
                    // from run to run).
                    let ns = opaque_xattr().trim_end_matches("opaque");
                    let linkable = |f: &PathBuf| {
                        get_xattr(root.join(f), &format!("{ns}metacopy")).is_none()
                            || get_xattr(root.join(f), &format!("{ns}redirect"))
                                .is_some_and(|v| v.first() == Some(&b'/'))
                    };
                    let files: Vec<PathBuf> =
                        walk_files(&root).into_iter().filter(linkable).collect();
                    match r.pick(&files) {
                        Some(f) => std::fs::hard_link(root.join(f), &full).unwrap(),
                        None => write(&full, b"h"),
                    }
                }
                11 => mkfifo(&full),
                12 if i + 1 < n && r.chance(30) => xwhiteout(r, root.as_path(), &rel),
                14 if i + 1 < n && metacopy_on() && r.chance(50) => {
                    metacopy(r, &s.path(&format!("lower{}", i + 1)), root.as_path(), &rel)
                }
                12 if i + 1 < n => whiteout(&full),
                13 => {
                    write(&full, b"x");
                    set_xattr(&full, "user.k", format!("v{}", r.below(9)).as_bytes());
                }
                _ => write(&full, &content(r)),
            }
            known.push((
                rel,
                std::fs::symlink_metadata(&full)
                    .map(|m| m.is_dir())
                    .unwrap_or(false),
            ));
        }
        out.push(root);
    }
    out.reverse();
    out
}

fn walk_files(root: &Path) -> Vec<PathBuf> {
    super::ops::listing(root)
        .into_iter()
        .filter(|(_, k)| *k == 'f')
        .map(|(p, _)| p)
        .collect()
}

/// `layers` (top first) with `n` filler layers below each: the same directories, nothing else,
/// so directories merge over many layers.
pub fn with_fillers(layers: Vec<PathBuf>, s: &Scratch, n: usize) -> Vec<PathBuf> {
    if n == 0 {
        return layers;
    }
    let mut out = Vec::new();
    for (i, l) in layers.into_iter().enumerate() {
        let dirs = walk_dirs(&l);
        out.push(l);
        for j in 0..n {
            let f = s.mkdir(&format!("filler{i}-{j}"));
            for d in &dirs {
                std::fs::create_dir_all(f.join(d)).unwrap();
            }
            out.push(f);
        }
    }
    out
}

/// Every directory under `root` (relative), parents first.
fn walk_dirs(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![PathBuf::new()];
    while let Some(rel) = todo.pop() {
        for e in std::fs::read_dir(root.join(&rel)).unwrap().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                let r = rel.join(e.file_name());
                out.push(r.clone());
                todo.push(r);
            }
        }
    }
    out
}

/// `n` data-only layers for the lower layers `lowers` (top first), and metadata-only copies
/// in those layers whose absolute redirects lead into them, as composefs lays an image out:
/// objects present in one data layer or several (the top one wins), missing, or not regular
/// files; a few copies with a relative redirect or none (refused without metacopy=on) and a
/// few in upper lower layers (refused without metacopy=on: the kernel has a layer left to
/// follow them into). From their own stream of `seed`, so the lower layers stay the seed's.
pub fn data_layers(seed: u64, s: &Scratch, lowers: &[PathBuf], n: usize) -> Vec<PathBuf> {
    if n == 0 {
        return Vec::new();
    }
    let r = &mut Rng::new(seed ^ 0xDA7A_0000_0000_0000);
    let ns = opaque_xattr().trim_end_matches("opaque");
    let data: Vec<PathBuf> = (0..n).map(|i| s.mkdir(&format!("data{i}"))).collect();
    // The objects: each in some of the data layers, with its own content in each.
    let mut objects: Vec<(PathBuf, u64)> = Vec::new();
    for k in 0..4 + r.below(10) {
        let rel = PathBuf::from(format!("objects/{}/o{k}", ["a", "b"][r.below(2) as usize]));
        let mut size = None;
        for d in &data {
            if r.chance(60) || (size.is_none() && d == data.last().unwrap()) {
                let c = Some(content(r))
                    .filter(|c| !c.is_empty())
                    .unwrap_or(b"e".to_vec());
                // One size per object, as composefs writes them.
                let c = match size {
                    Some(n) => c.into_iter().cycle().take(n as usize).collect(),
                    None => c,
                };
                write(d.join(&rel), &c);
                size.get_or_insert(c.len() as u64);
            }
        }
        objects.push((rel, size.unwrap_or(0)));
    }
    // The object a ".." redirect names is in the last data layer only. The kernel's lookup
    // of such a redirect gives up (EAGAIN) when a rename or a mount anywhere came in between
    // (`ops::apply_kernel`), and then tries the next data layer: with the object in two, it
    // read the other one's data, where layerfs read the first's (soak seed 2080829, beside
    // other tests mounting and renaming). With it in the last only, that gives EAGAIN, which
    // the harness asks again.
    let dotdot = Path::new("objects/a/o0");
    if let Some(first) = data.iter().find(|d| d.join(dotdot).exists()) {
        let last = data.last().unwrap();
        if first != last {
            std::fs::create_dir_all(last.join("objects/a")).unwrap();
            std::fs::rename(first.join(dotdot), last.join(dotdot)).unwrap();
        }
        for d in &data[..data.len() - 1] {
            let _ = std::fs::remove_file(d.join(dotdot));
        }
    }
    std::fs::create_dir_all(data[0].join("objects/adir")).unwrap();
    symlink("a", data[0].join("objects/alink")).unwrap();
    write(data[0].join("top-of-data"), b"never a name of the tree");
    let bottom = lowers.len() - 1;
    // Copies above the bottom that find their data by a name in the layers below.
    let mut by_name: Vec<(usize, PathBuf, PathBuf)> = Vec::new();
    for (i, layer) in lowers.iter().enumerate() {
        let dirs = walk_dirs(layer);
        let copies = if i == bottom {
            3 + r.below(6)
        } else {
            r.below(2)
        };
        for k in 0..copies {
            let dir = match r.pick(&dirs) {
                Some(d) if r.chance(60) => d.clone(),
                _ => PathBuf::new(),
            };
            let full = layer.join(&dir).join(format!("m{k}"));
            if std::fs::symlink_metadata(&full).is_ok() {
                continue;
            }
            let (redirect, size): (Option<Vec<u8>>, u64) = match r.below(20) {
                0 => (Some(b"/objects/missing".to_vec()), 5),
                1 => (Some(b"/objects/adir".to_vec()), 5),
                2 => (Some(b"/objects/alink/o1".to_vec()), 5),
                3 => (Some(b"o1".to_vec()), 5),
                4 => (None, 5),
                // (Its size is the object's, as for any copy: a copy-up copies the copy's size,
                // a read reads the data file's; seed 1130279 had them differ.)
                5 => {
                    let o0 = objects.iter().find(|o| o.0 == Path::new("objects/a/o0"));
                    (
                        Some(b"/objects/../objects/a/o0".to_vec()),
                        o0.map_or(5, |o| o.1),
                    )
                }
                _ => {
                    let (o, size) = r.pick(&objects).unwrap().clone();
                    let path = [b"/", o.as_os_str().as_encoded_bytes()].concat();
                    (Some(path), size)
                }
            };
            // A metadata-only copy of an empty file is never checked (nothing to follow).
            std::fs::File::create(&full)
                .unwrap()
                .set_len(size.max(1))
                .unwrap();
            set_xattr(&full, &format!("{ns}metacopy"), b"");
            // (A relative redirect names a sibling; none, the copy's own name.)
            if i < bottom && !redirect.as_ref().is_some_and(|v| v.starts_with(b"/")) {
                let name = redirect
                    .clone()
                    .map_or(format!("m{k}").into(), OsString::from_vec);
                by_name.push((i, full.clone(), dir.join(name)));
            }
            if let Some(v) = redirect {
                set_xattr(&full, &format!("{ns}redirect"), &v);
            }
        }
    }
    // Such a copy has the size of the file it finds below, as any copy the kernel makes (it
    // reads the data file's bytes, a copy-up copies the copy's size: seed 1530458, a 5-byte
    // copy over a 1026-byte object). Lowest first, so a chain takes the size of its end.
    for (i, full, target) in by_name.into_iter().rev() {
        let found = lowers[i + 1..]
            .iter()
            .find_map(|l| std::fs::symlink_metadata(l.join(&target)).ok());
        if let Some(m) = found.filter(|m| m.is_file()) {
            std::fs::File::options()
                .write(true)
                .open(&full)
                .unwrap()
                .set_len(m.len())
                .unwrap();
        }
    }
    data
}
