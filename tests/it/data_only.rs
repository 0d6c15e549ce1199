//! Data-only lower layers (`lowerdir=L::D`, `datadir+=D`), against kernel overlayfs over the
//! same layers: their files are reachable only as the data of lower metadata-only copies with
//! absolute redirects (composefs's layout), never as names of the tree; the data is looked up
//! at the first open or copy-up, and a copy-up brings it along.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use crate::pair::{Pair, outcome};
use crate::require_fuse;
use crate::support::*;

/// A metadata-only copy of `size` bytes at `p`, its data where `redirect` says.
fn meta(p: &Path, size: u64, redirect: Option<&[u8]>) {
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::File::create(p).unwrap().set_len(size).unwrap();
    set_xattr(p, "trusted.overlay.metacopy", b"");
    if let Some(r) = redirect {
        set_xattr(p, "trusted.overlay.redirect", r);
    }
}

const CD: &[u8] = b"the object ab/cd";
/// A path longer than the kernel's redirect_max (256 bytes).
const LONG: &str = concat!(
    "a-directory-name-of-some-length-a-directory-name-of-some-length-a-directory-name-of-",
    "some-length-a-directory-name-of-some-length/a-directory-name-of-some-length-a-direct",
    "ory-name-of-some-length-a-directory-name-of-some-length-a-directory-name-of-some-len"
);
const SPARSE: u64 = (1 << 20) + 1;

/// Two data-only layers under one lower layer, as composefs mounts an image.
fn composefs_like(s: &Scratch) -> (Vec<std::path::PathBuf>, Vec<std::path::PathBuf>) {
    let (l0, d0, d1) = (s.mkdir("l0"), s.mkdir("d0"), s.mkdir("d1"));
    write(d0.join("objects/ab/cd"), CD);
    // Sparse: its st_blocks differ from what the size suggests.
    let f = fs::File::create(d0.join("objects/sparse")).unwrap();
    f.set_len(SPARSE).unwrap();
    write(d0.join("objects/both"), b"in the upper data layer");
    write(d1.join("objects/both"), b"in the lower data layer");
    write(d1.join("objects/zz"), b"only in the second data layer");
    s.mkdir("d0/dirobj");
    std::os::unix::fs::symlink("ab", d0.join("objects/link")).unwrap();
    write(d0.join("in-data-only"), b"never a name of the tree");
    let n = CD.len() as u64;
    meta(&l0.join("f"), n, Some(b"/objects/ab/cd"));
    meta(&l0.join("sub/inner"), n, Some(b"/objects/ab/cd"));
    meta(&l0.join("sp"), SPARSE, Some(b"/objects/sparse"));
    meta(&l0.join("both"), 23, Some(b"/objects/both"));
    meta(&l0.join("zz"), 29, Some(b"/objects/zz"));
    meta(&l0.join("missing"), 3, Some(b"/objects/none"));
    meta(&l0.join("gone"), 3, Some(b"/objects/none"));
    meta(&l0.join("dir"), 3, Some(b"/dirobj"));
    meta(&l0.join("vialink"), n, Some(b"/objects/link/cd"));
    meta(&l0.join("dotdot"), n, Some(b"/objects/../objects/ab/cd"));
    meta(&l0.join("escape"), n, Some(b"/../objects/ab/cd"));
    // Only an absolute redirect leads into a data-only layer; without metacopy=on a
    // relative one, or none, is refused (EPERM).
    meta(&l0.join("relative"), n, Some(b"cd"));
    meta(&l0.join("noredirect"), n, None);
    write(l0.join("plain"), b"an ordinary file");
    write(l0.join("lowdir/plain"), b"in a directory that stays lower");
    meta(&l0.join(LONG).join("deep"), n, Some(b"/objects/ab/cd"));
    (vec![l0], vec![d0, d1])
}

/// Append one byte to `p` (a write: the data comes up).
fn append(p: &Path) -> std::io::Result<()> {
    OpenOptions::new()
        .append(true)
        .open(p)
        .and_then(|mut f| f.write_all(b"+"))
}

fn size_and_blocks(m: &Path, f: &str) -> crate::pair::Outcome<(u64, u64)> {
    outcome(fs::metadata(m.join(f)).map(|md| (md.len(), md.blocks())))
}

#[test]
fn data_only_layers_serve_data_as_in_the_kernel() {
    require_fuse!();
    let mut p = Pair::with_data(composefs_like, "");
    p.same("listing", listing);
    assert!(
        !p.lmnt().join("in-data-only").exists(),
        "a data-only layer's names stay out of the tree"
    );
    let files = [
        "f",
        "sub/inner",
        "sp",
        "both",
        "zz",
        "missing",
        "dir",
        "vialink",
        "dotdot",
        "escape",
        "relative",
        "noredirect",
        "plain",
    ];
    // Before the first open the kernel guesses st_blocks from the size; after it, they are
    // the data's.
    for f in files {
        p.same(&format!("stat {f} before any open"), |m| {
            size_and_blocks(m, f)
        });
    }
    assert_eq!(
        size_and_blocks(p.lmnt(), "sp"),
        Ok((SPARSE, SPARSE.div_ceil(4096) * 8)),
        "estimated from the size"
    );
    for f in files {
        p.same(&format!("read {f}"), |m| outcome(fs::read(m.join(f))));
        p.same(&format!("stat {f} after the open"), |m| {
            size_and_blocks(m, f)
        });
    }
    assert_eq!(fs::read(p.lmnt().join("f")).unwrap(), CD);
    // `which` names where the data is read from, or why it cannot be.
    let which = |f: &str| json_of(&["which", "--format", "json"], &p.lmnt().join(f))[0].clone();
    let zz = which("zz");
    assert_eq!(zz["served_by"]["layer"], "lower 0", "{zz}");
    assert_eq!(zz["data_from"]["layer"], "data 1", "{zz}");
    assert_eq!(zz["data_from"]["path"], "/objects/zz", "{zz}");
    let missing = which("missing");
    assert!(
        missing["data_from"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("No such file")),
        "{missing}"
    );
    assert!(which("plain")["data_from"].is_null());
    // (As the mount reads it: without metacopy=on, not followed.)
    let relative = which("relative");
    assert!(
        relative["error"]
            .as_str()
            .is_some_and(|e| e.contains("not permitted")),
        "{relative}"
    );
    assert_eq!(
        relative["listed_in"],
        serde_json::json!(["lower 0"]),
        "{relative}"
    );
    // `layers`: the data-only layers add no names to the tree; their objects don't count
    // as names the lower layer changes.
    let maps = json_of(&["layers", "--format", "json"], p.lmnt());
    let by = |label: &str| {
        maps.as_array()
            .unwrap()
            .iter()
            .find(|m| m["label"] == label)
            .cloned()
            .unwrap_or_else(|| panic!("no {label} in {maps}"))
    };
    for d in ["data 0", "data 1"] {
        assert_eq!(by(d)["adds"], 0, "{d}: {maps}");
        assert!(by(d)["size_bytes"].as_u64().unwrap() > 0, "{d}: {maps}");
    }
    assert_eq!(by("lower 0")["changes"], 0, "{maps}");
    assert_eq!(
        fs::read(p.lmnt().join("both")).unwrap(),
        b"in the upper data layer"
    );
    assert_eq!(
        fs::read(p.lmnt().join("missing"))
            .unwrap_err()
            .raw_os_error(),
        Some(libc::ENOENT)
    );
    assert_eq!(
        fs::read(p.lmnt().join("escape"))
            .unwrap_err()
            .raw_os_error(),
        Some(libc::EXDEV)
    );
    assert_eq!(
        fs::read(p.lmnt().join("relative"))
            .unwrap_err()
            .raw_os_error(),
        Some(libc::EPERM)
    );
    // Copy-ups bring the data up (without metacopy=on, whole); one whose data is missing
    // fails as the data's lookup does, and an unlink needs no data.
    p.same("chmod f", |m| {
        outcome(fs::set_permissions(
            m.join("f"),
            fs::Permissions::from_mode(0o600),
        ))
    });
    p.same("chmod missing", |m| {
        outcome(fs::set_permissions(
            m.join("missing"),
            fs::Permissions::from_mode(0o600),
        ))
    });
    p.same("append to zz", |m| outcome(append(&m.join("zz"))));
    p.same("rename sub/inner", |m| {
        outcome(fs::rename(m.join("sub/inner"), m.join("moved")))
    });
    // A link or rename of a file whose data is missing fails before anything is copied up,
    // the target directory included (data-only soak, seed 1120072).
    p.same("link missing", |m| {
        outcome(fs::hard_link(m.join("missing"), m.join("lowdir/l")))
    });
    p.same("rename missing", |m| {
        outcome(fs::rename(m.join("missing"), m.join("lowdir/r")))
    });
    p.same("lowdir stays lower", |m| {
        fs::metadata(m.join("lowdir")).map(|md| md.nlink()).ok()
    });
    // Without metacopy=on a move copies the data whole: no redirect, so no path is too long
    // for one (data-only soak, seed 1120209: layerfs measured one and refused, EXDEV).
    p.same("move a deep file up", |m| {
        outcome(fs::rename(m.join(LONG).join("deep"), m.join("deep")))
    });
    p.same("unlink gone", |m| outcome(fs::remove_file(m.join("gone"))));
    p.same("read after the copy-ups", |m| {
        ["f", "zz", "moved"].map(|f| outcome(fs::read(m.join(f))))
    });
    let up = p.upper();
    assert_eq!(fs::read(up.join("f")).unwrap(), CD, "copied up whole");
    p.check("after copy-ups from data-only layers");
    p.assert_no_panic();
    p.check_interop();
}

/// With metacopy=on: the data-only layers end chains of lower metadata-only copies, from any
/// lower layer, and even past a whiteout in the tree's layers (the kernel looks the last
/// absolute redirect up in the data-only layers whatever stopped the walk); our own
/// metadata-only copies of such files point at the lower copy, and survive a remount.
#[test]
fn data_only_layers_end_metacopy_chains_as_in_the_kernel() {
    require_fuse!();
    let mut p = Pair::with_data(
        |s| {
            let (l0, l1, d0) = (s.mkdir("l0"), s.mkdir("l1"), s.mkdir("d0"));
            write(d0.join("objects/ab/cd"), CD);
            write(d0.join("wh"), b"behind a whiteout of the tree");
            let n = CD.len() as u64;
            meta(&l0.join("x"), n, Some(b"/mc"));
            meta(&l1.join("mc"), n, Some(b"/objects/ab/cd"));
            meta(&l0.join("y"), n, Some(b"/objects/ab/cd"));
            meta(&l0.join("w"), 29, Some(b"/wh"));
            whiteout(l1.join("wh"));
            meta(&l0.join("rel"), n, Some(b"mc2"));
            meta(&l0.join("mc2"), n, Some(b"/objects/ab/cd"));
            meta(&l1.join("n"), n, None);
            // A `..` no lower layer's walk takes, with no layer left to walk: the data-only
            // layers resolve it (metacopy soak over data-only layers, seed 1130003).
            meta(&l1.join("dotdot"), n, Some(b"/objects/../objects/ab/cd"));
            // With a layer left whose walk gets as far as the `..`: refused (EACCES).
            meta(&l0.join("dotdot2"), n, Some(b"/objects/../objects/ab/cd"));
            // And one whose walk does not: on to the data-only layers (seed 1130004).
            meta(&l0.join("dotdot3"), n, Some(b"/nowhere/../objects/ab/cd"));
            write(l1.join("objects/ab/cd"), b"a tree file, not the data");
            // A chain whose walk below its absolute redirect passed a directory is no
            // longer one the data-only layers end (the kernel's redirect check of that
            // directory forgot the absolute redirect): EIO, where the data-only layer has
            // the object (metacopy soak with data-only layers, seed 1530936).
            write(d0.join("objects/zz"), b"the object zz");
            write(d0.join("objects/ab/here"), b"the object ab/here");
            write(d0.join("other/zz"), b"the object other/zz");
            s.mkdir("l1/objects/ab/here");
            meta(&l0.join("past-a-dir"), 17, Some(b"/objects/ab/here"));
            meta(&l0.join("dir-but-no-file"), 13, Some(b"/objects/zz"));
            meta(&l0.join("no-dir"), 19, Some(b"/other/zz"));
            (vec![l0, l1], vec![d0])
        },
        "metacopy=on",
    );
    for f in [
        "x",
        "mc",
        "y",
        "w",
        "rel",
        "mc2",
        "n",
        "dotdot",
        "dotdot2",
        "dotdot3",
        "objects/ab/cd",
        "past-a-dir",
        "dir-but-no-file",
        "no-dir",
    ] {
        p.same(&format!("stat {f}"), |m| size_and_blocks(m, f));
        p.same(&format!("read {f}"), |m| outcome(fs::read(m.join(f))));
    }
    p.same("chmod x (metadata-only copy-up)", |m| {
        outcome(fs::set_permissions(
            m.join("x"),
            fs::Permissions::from_mode(0o600),
        ))
    });
    p.same("mkdir, rename y into it", |m| {
        outcome(fs::create_dir(m.join("dd")).and_then(|_| fs::rename(m.join("y"), m.join("dd/y2"))))
    });
    p.same("read after", |m| {
        ["x", "dd/y2"].map(|f| outcome(fs::read(m.join(f))))
    });
    p.check("after metadata-only copy-ups");
    // Remounted, our metadata-only copies find their data again through the lower copy.
    p.remount_layerfs();
    p.same("read after a remount", |m| {
        ["x", "dd/y2"].map(|f| outcome(fs::read(m.join(f))))
    });
    p.same("append to x after a remount", |m| {
        outcome(append(&m.join("x")))
    });
    p.check("after a data copy-up");
    p.assert_no_panic();
    p.check_interop();
}

/// `verity=on|require` (composefs mounts with require): a metadata-only copy's recorded
/// fs-verity digest is checked against its data's at the first open or copy-up. This
/// machine's kernel has no fs-verity, so every recorded digest fails (EIO), as in the kernel;
/// with `require` a copy recording none fails too, and with metacopy=on a copy-up of data
/// without a digest copies the data whole. A mark the kernel cannot parse fails as there.
#[test]
fn verity_modes_check_digests_as_in_the_kernel() {
    require_fuse!();
    let digest = |algo: u8| {
        let mut v = vec![0u8, 36, 0, algo];
        v.extend([7u8; 32]);
        v
    };
    for opts in [
        "verity=on",
        "verity=require",
        "verity=on,metacopy=on",
        "verity=require,metacopy=on",
    ] {
        let mut p = Pair::with_data(
            |s| {
                let (l0, l1, d0) = (s.mkdir("l0"), s.mkdir("l1"), s.mkdir("d0"));
                write(d0.join("objects/ab/cd"), CD);
                let n = CD.len() as u64;
                for f in ["dig", "dig2"] {
                    meta(&l1.join(f), n, Some(b"/objects/ab/cd"));
                    set_xattr(l1.join(f), "trusted.overlay.metacopy", &digest(1));
                }
                for f in ["nodig", "nodig2"] {
                    meta(&l1.join(f), n, Some(b"/objects/ab/cd"));
                }
                meta(&l1.join("short"), n, Some(b"/objects/ab/cd"));
                set_xattr(l1.join("short"), "trusted.overlay.metacopy", b"\0\x03");
                meta(&l1.join("version"), n, Some(b"/objects/ab/cd"));
                set_xattr(
                    l1.join("version"),
                    "trusted.overlay.metacopy",
                    &[1, 4, 0, 0],
                );
                write(l1.join("plain"), b"plain data");
                write(l0.join("p2"), b"more plain data");
                (vec![l0, l1], vec![d0])
            },
            opts,
        );
        let files = [
            "dig", "dig2", "nodig", "nodig2", "short", "version", "plain", "p2",
        ];
        for f in files {
            p.same(&format!("{opts}: stat {f}"), |m| {
                outcome(fs::metadata(m.join(f)).map(|md| md.len()))
            });
            p.same(&format!("{opts}: read {f}"), |m| {
                outcome(fs::read(m.join(f)))
            });
        }
        for f in ["dig2", "nodig2", "plain"] {
            p.same(&format!("{opts}: chmod {f}"), |m| {
                outcome(fs::set_permissions(
                    m.join(f),
                    fs::Permissions::from_mode(0o600),
                ))
            });
        }
        p.same(&format!("{opts}: append to p2"), |m| {
            outcome(append(&m.join("p2")))
        });
        // What each upper holds: a metadata-only copy's mark as the kernel writes it.
        let marks = |u: &Path| {
            ["nodig2", "plain", "p2"].map(|f| {
                let there = u.join(f).exists();
                (
                    f,
                    there.then(|| get_xattr(u.join(f), "trusted.overlay.metacopy")),
                    fs::metadata(u.join(f)).map(|m| m.blocks() > 0).ok(),
                )
            })
        };
        assert_eq!(
            marks(&p.s.path("ku")),
            marks(&p.upper()),
            "{opts}: the uppers' marks"
        );
        p.check(opts);
        p.assert_no_panic();
        p.check_interop();
    }
}
