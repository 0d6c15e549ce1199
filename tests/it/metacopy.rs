//! `metacopy=on`: metadata-only copy-up, against kernel overlayfs mounted with the same option,
//! then the data copy-up at the first write, persistence and interop both ways.

use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use layerfs::sys;

use crate::pair::{Pair, outcome};
use crate::require_fuse;
use crate::support::*;

const BIG: usize = 3 << 20;

fn stack(s: &Scratch) -> Vec<PathBuf> {
    let l1 = s.mkdir("l1");
    let l2 = s.mkdir("l2");
    let big: Vec<u8> = (0..BIG).map(|i| (i * 7 % 251) as u8).collect();
    write(l2.join("big"), &big);
    write(l2.join("owned"), b"owned by someone");
    write(l2.join("times"), b"old times");
    write(l2.join("x"), b"extended");
    write(l2.join("d/moved"), b"moved across dirs");
    write(l2.join("d/trunc"), b"to be truncated");
    write(l2.join("d/otrunc"), b"opened with O_TRUNC");
    write(l2.join("empty"), b"");
    write(l1.join("d/top"), b"top");
    vec![l1, l2]
}

fn xattr_names(p: &Path) -> Vec<String> {
    let (ok, out, _) = run_timeout(
        std::process::Command::new("getfattr")
            .args(["-h", "-d", "-m", "-", "--absolute-names"])
            .arg(p),
        10,
    );
    assert!(ok, "getfattr {}", p.display());
    out.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split('=').next().unwrap_or("").to_string())
        .collect()
}

fn read_all(p: &Path) -> Vec<u8> {
    fs::read(p).unwrap()
}

#[test]
fn metadata_changes_copy_up_no_data_and_writes_bring_it_up_as_the_kernel_does() {
    require_fuse!();
    let mut p = Pair::with_options(stack, "metacopy=on");
    let lower_big = p.lowers[1].join("big");
    let lower_blocks = fs::metadata(&lower_big).unwrap().blocks();

    p.same("chmod", |m| {
        outcome(fs::set_permissions(
            m.join("big"),
            fs::Permissions::from_mode(0o600),
        ))
    });
    p.same("chown", |m| {
        outcome(std::os::unix::fs::chown(
            m.join("owned"),
            Some(42),
            Some(43),
        ))
    });
    p.same("utimes", |m| {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000_000);
        outcome(
            fs::File::open(m.join("times"))
                .and_then(|f| f.set_times(fs::FileTimes::new().set_modified(t).set_accessed(t))),
        )
    });
    p.same("setxattr", |m| {
        set_xattr(m.join("x"), "user.k", b"v");
        0
    });
    p.same("rename across dirs", |m| {
        outcome(fs::rename(m.join("d/moved"), m.join("moved")))
    });
    p.same("chmod empty", |m| {
        outcome(fs::set_permissions(
            m.join("empty"),
            fs::Permissions::from_mode(0o600),
        ))
    });
    p.check("after metadata-only copy-ups");

    // On disk: a hole of the right size with the marker; the renamed one points at its data.
    let up = p.upper();
    let ub = fs::metadata(up.join("big")).unwrap();
    assert_eq!(ub.len(), BIG as u64);
    assert!(ub.blocks() < 16, "no data copied: {} blocks", ub.blocks());
    assert_eq!(ub.mode() & 0o7777, 0o600);
    for f in ["big", "owned", "times", "x", "moved"] {
        assert!(
            xattr_names(&up.join(f)).contains(&"trusted.overlay.metacopy".to_string()),
            "{f} is a metacopy file"
        );
    }
    assert_eq!(
        get_xattr(up.join("moved"), "trusted.overlay.redirect").as_deref(),
        Some(&b"/d/moved"[..])
    );
    assert!(!xattr_names(&up.join("empty")).contains(&"trusted.overlay.metacopy".to_string()));
    // Through the mount: the data and blocks are the lower file's.
    let lb = fs::metadata(p.lmnt().join("big")).unwrap();
    assert_eq!(lb.blocks(), lower_blocks);
    assert_eq!(read_all(&p.lmnt().join("big")), read_all(&lower_big));

    // A reader open before the first write: the kernel switches it to the copied-up data;
    // through passthrough (the default as root) it keeps reading the lower data.
    let reader_then_append = |m: &Path| {
        let mut r = fs::File::open(m.join("big")).unwrap();
        let mut head = vec![0u8; 100];
        r.read_exact(&mut head).unwrap();
        OpenOptions::new()
            .append(true)
            .open(m.join("big"))
            .unwrap()
            .write_all(b"appended")
            .unwrap();
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).unwrap();
        (head, rest.len(), rest[rest.len() - 8..].to_vec())
    };
    let (k, l) = (reader_then_append(p.kmnt()), reader_then_append(p.lmnt()));
    assert_eq!(k.2, b"appended");
    assert_eq!(
        (k.0, k.1),
        (l.0, l.1 + 8),
        "layerfs' early reader reads the lower data"
    );
    assert_ne!(l.2, b"appended");
    p.same("a later reader sees the copied-up data", |m| {
        read_all(&m.join("big"))
    });
    p.same("truncate a metacopy file", |m| {
        outcome(
            OpenOptions::new()
                .write(true)
                .open(m.join("d/trunc"))
                .and_then(|f| f.set_len(5)),
        )
    });
    p.same("O_TRUNC a metacopy file", |m| {
        fs::set_permissions(m.join("d/otrunc"), fs::Permissions::from_mode(0o640)).unwrap();
        outcome(
            OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(m.join("d/otrunc"))
                .and_then(|mut f| f.write_all(b"new")),
        )
    });
    p.same("open for writing without writing", |m| {
        outcome(
            OpenOptions::new()
                .write(true)
                .open(m.join("times"))
                .map(drop),
        )
    });
    p.check("after data copy-ups");
    // The data is in the upper now, the marker gone; the times set before are kept.
    assert!(fs::metadata(up.join("big")).unwrap().blocks() >= lower_blocks);
    assert!(!xattr_names(&up.join("big")).contains(&"trusted.overlay.metacopy".to_string()));
    assert_eq!(
        fs::metadata(up.join("times")).unwrap().mtime(),
        1_000_000_000
    );
    p.assert_no_panic();
    p.check_interop();
}

#[test]
fn a_metacopy_upper_is_refused_without_metacopy_on_as_the_kernel_does() {
    require_fuse!();
    let s = Scratch::new();
    let lower = s.mkdir("l");
    write(lower.join("f"), b"data in the lower layer");
    let (up, work) = (s.mkdir("u"), s.mkdir("w"));
    {
        let m = Layerfs::mount(
            &format!("{},metacopy=on", rw_opts(&lower, &up, &work)),
            &s.path("m"),
        );
        fs::set_permissions(m.mnt.join("f"), fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_all(&m.mnt.join("f")), b"data in the lower layer");
    }
    let k = Kernel::mount(
        &format!("{},redirect_dir=on", rw_opts(&lower, &up, &s.mkdir("kw"))),
        &s.path("k"),
    );
    let kernel = fs::read(k.mnt.join("f")).map_err(|e| e.raw_os_error());
    drop(k);
    let m = Layerfs::mount(&rw_opts(&lower, &up, &work), &s.path("m"));
    let ours = fs::read(m.mnt.join("f")).map_err(|e| e.raw_os_error());
    assert_eq!(kernel, Err(Some(libc::EPERM)));
    assert_eq!(ours, kernel, "never the hole where the data should be");
}

/// The kernel copies an empty file up metadata-only too. layerfs read such a copy as a plain
/// empty file, so a write left the mark on it, and after a remount the written bytes were
/// read from the (empty) lower file: nothing (soak with swapped uppers, seed 1190039). The
/// write now brings the copy up as the kernel does: mark gone, data kept; and without
/// metacopy=on such a copy is refused as the kernel refuses it.
#[test]
fn an_empty_file_the_kernel_copied_up_metadata_only_is_written_as_in_the_kernel() {
    require_fuse!();
    let s = Scratch::new();
    let lower = s.mkdir("l");
    write(lower.join("empty"), b"");
    let up = s.mkdir("u");
    let kernel_rw = |work: &str, extra: &str| {
        Kernel::mount(
            &format!(
                "{},redirect_dir=on{extra}",
                rw_opts(&lower, &up, &s.mkdir(work))
            ),
            &s.path("k"),
        )
    };
    {
        let k = kernel_rw("kw", ",metacopy=on");
        fs::set_permissions(k.mnt.join("empty"), fs::Permissions::from_mode(0o755)).unwrap();
    }
    assert!(
        xattr_names(&up.join("empty")).contains(&"trusted.overlay.metacopy".to_string()),
        "the kernel's copy is metadata-only"
    );
    let kernel_refuses = {
        let k = kernel_rw("kw2", "");
        fs::read(k.mnt.join("empty")).map_err(|e| e.raw_os_error())
    };
    let ours_refuses = {
        let m = Layerfs::mount(&rw_opts(&lower, &up, &s.mkdir("w0")), &s.path("m"));
        fs::read(m.mnt.join("empty")).map_err(|e| e.raw_os_error())
    };
    assert_eq!(kernel_refuses, Err(Some(libc::EPERM)));
    assert_eq!(ours_refuses, kernel_refuses);
    let opts = format!("{},metacopy=on", rw_opts(&lower, &up, &s.mkdir("w")));
    {
        let m = Layerfs::mount(&opts, &s.path("m"));
        let mut f = OpenOptions::new()
            .append(true)
            .open(m.mnt.join("empty"))
            .unwrap();
        f.write_all(b"written through layerfs").unwrap();
        drop(f);
        assert_eq!(read_all(&m.mnt.join("empty")), b"written through layerfs");
    }
    assert!(
        !xattr_names(&up.join("empty")).contains(&"trusted.overlay.metacopy".to_string()),
        "the write took the mark off"
    );
    {
        let m = Layerfs::mount(&opts, &s.path("m"));
        assert_eq!(read_all(&m.mnt.join("empty")), b"written through layerfs");
    }
    let k = kernel_rw("kw3", ",metacopy=on");
    assert_eq!(read_all(&k.mnt.join("empty")), b"written through layerfs");
}

/// An empty lower file marked metadata-only is looked up as any other: its data found below
/// (by name or redirect) or EIO where it is missing, and EPERM without metacopy=on, as the
/// kernel's lookup checks the mark on every regular file. layerfs skipped the check for
/// empty lower files (to save a getxattr) and read them as empty whatever their mark said.
#[test]
fn an_empty_lower_metacopy_file_is_checked_as_the_kernel_checks_it() {
    require_fuse!();
    let s = Scratch::new();
    let (l1, l2) = (s.mkdir("l1"), s.mkdir("l2"));
    for n in ["present", "missing", "redirected", "plain"] {
        write(l1.join(n), b"");
    }
    write(l2.join("present"), b"");
    write(l2.join("elsewhere"), b"");
    let mark = |n: &str, x: &str, v: &[u8]| set_xattr(l1.join(n), x, v);
    for n in ["present", "missing", "redirected"] {
        mark(n, "trusted.overlay.metacopy", b"");
    }
    mark("redirected", "trusted.overlay.redirect", b"/elsewhere");
    let look = |m: &Path| {
        ["present", "missing", "redirected", "plain"].map(|n| {
            let st = fs::metadata(m.join(n)).map(|st| st.len());
            let data = fs::read(m.join(n));
            (
                n,
                st.map_err(|e| e.raw_os_error()),
                data.map_err(|e| e.raw_os_error()),
            )
        })
    };
    for extra in [",metacopy=on", ""] {
        let opts = format!("lowerdir={}:{}{extra}", l1.display(), l2.display());
        let kernel = look(&Kernel::mount(&opts, &s.path("k")).mnt);
        let ours = look(&Layerfs::mount(&opts, &s.path("m")).mnt);
        assert_eq!(ours, kernel, "options {opts:?}");
        let want = if extra.is_empty() {
            libc::EPERM
        } else {
            libc::EIO
        };
        assert_eq!(
            kernel[1].1,
            Err(Some(want)),
            "the kernel refuses the missing data"
        );
    }
}

/// The kernel's link of a metadata-only copy gives it an absolute redirect (its other name
/// may be in another directory; layerfs brings the data up instead), and a later move
/// within the directory keeps it, as ovl_set_redirect keeps a redirect that is absolute.
/// layerfs, moving such a copy on an upper the kernel wrote, replaced it with the relative
/// one a move in place would write, so the name in the other directory looked for the data
/// beside itself: EIO after a remount (data-only soak with swapped uppers, seed 1210479).
#[test]
fn a_linked_metacopy_keeps_its_absolute_redirect_when_moved_as_in_the_kernel() {
    require_fuse!();
    let layers = |s: &Scratch| {
        let l = s.mkdir("l");
        write(l.join("a"), b"linked data");
        write(l.join("e"), b"");
        s.mkdir("l/d");
        vec![l]
    };
    let mut p = Pair::with_options(layers, "metacopy=on");
    p.same("chmod, link, then move in place", |m| {
        fs::set_permissions(m.join("a"), fs::Permissions::from_mode(0o600)).unwrap();
        (
            outcome(fs::hard_link(m.join("a"), m.join("d/c"))),
            outcome(fs::rename(m.join("a"), m.join("mm"))),
            outcome(fs::read(m.join("d/c"))),
        )
    });
    p.remount_both(false, false);
    p.same("read both names after a remount, move again", |m| {
        (
            outcome(fs::read(m.join("d/c"))),
            outcome(fs::rename(m.join("mm"), m.join("nn"))),
            outcome(fs::read(m.join("nn"))),
        )
    });
    p.check("after the moves");
    // On an upper the kernel wrote: its link of the empty file (metadata-only, absolute
    // redirect), then layerfs moves it in place.
    p.remount_both(false, true);
    p.same("the kernel's linked copy, moved by the other", |m| {
        (
            outcome(fs::hard_link(m.join("e"), m.join("d/f"))),
            outcome(fs::rename(m.join("e"), m.join("ee"))),
        )
    });
    p.remount_both(false, true);
    p.same("read after the moves", |m| {
        (
            outcome(fs::rename(m.join("ee"), m.join("e2"))),
            outcome(fs::read(m.join("d/f"))),
        )
    });
    p.remount_both(false, false);
    p.same("read after a remount", |m| outcome(fs::read(m.join("d/f"))));
    p.check("after the swaps");
    p.check_interop();
}

/// The data of a metadata-only copy is looked up as a lookup walks: a whiteout hiding its
/// directory in a layer between the copy and the data ends the search (EIO, as the kernel),
/// never reaching a file further down that the union doesn't show.
#[test]
fn a_metacopy_whose_data_is_whited_out_on_the_way_fails_as_the_kernel_does() {
    require_fuse!();
    let s = Scratch::new();
    let bottom = s.mkdir("bottom");
    write(bottom.join("d/f"), b"data the union no longer shows");
    write(bottom.join("d/g"), b"g");
    let (up, work) = (s.mkdir("meta"), s.mkdir("w"));
    {
        let m = Layerfs::mount(
            &format!("{},metacopy=on", rw_opts(&bottom, &up, &work)),
            &s.path("m"),
        );
        fs::set_permissions(m.mnt.join("d/f"), fs::Permissions::from_mode(0o600)).unwrap();
    }
    assert!(xattr_names(&up.join("d/f")).contains(&"trusted.overlay.metacopy".to_string()));
    // A middle layer deletes d: the metadata copy above it has no data left to show.
    let middle = s.mkdir("middle");
    whiteout(middle.join("d"));
    let ro = format!(
        "lowerdir={}:{}:{},metacopy=on,redirect_dir=on",
        up.display(),
        middle.display(),
        bottom.display()
    );
    // The listing still names the file whose data is gone (the kernel's readdir does not
    // look entries up; layerfs lists it without attributes, so a stat gets the EIO).
    let read = |mnt: &Path| {
        (
            fs::read(mnt.join("d/f")).map_err(|e| e.raw_os_error()),
            fs::read(mnt.join("d/g")).map_err(|e| e.raw_os_error()),
            listing(&mnt.join("d")),
        )
    };
    let kernel = {
        let k = Kernel::mount(&ro, &s.path("k"));
        read(&k.mnt)
    };
    let ours = {
        let m = Layerfs::mount(&ro, &s.path("l"));
        read(&m.mnt)
    };
    assert_eq!(
        kernel,
        (
            Err(Some(libc::EIO)),
            Err(Some(libc::ENOENT)),
            vec!["f".into()]
        )
    );
    assert_eq!(ours, kernel);
}

/// Renaming a metadata-only copy whose data path is longer than the kernel's redirect_max
/// (256): within its directory the redirect is the data's name, so it moves; to another
/// directory it would need the whole path, so it fails with EXDEV and `mv` copies (soak seed
/// 8121 with metacopy=on: layerfs copied the data up and renamed instead). A hard link needs
/// the whole path too (seed 8123). The kernel copies an empty or hard-linked lower file up
/// metadata-only too, so the same holds where layerfs brings those up whole, before and after
/// that copy-up (seed 40012).
#[test]
fn renaming_a_metacopy_with_a_long_data_path_does_what_the_kernel_does() {
    require_fuse!();
    let deep = format!("a/{}/{}", "L".repeat(200), "M".repeat(200));
    let mut p = Pair::with_options(
        |s| {
            let v = stack(s);
            write(v[1].join(&deep).join("f"), b"deep data");
            write(v[1].join(&deep).join("empty"), b"");
            write(v[1].join(&deep).join("empty2"), b"");
            write(v[1].join(&deep).join("linked"), b"linked data");
            fs::hard_link(v[1].join(&deep).join("linked"), v[1].join("other")).unwrap();
            fs::create_dir_all(v[1].join("b")).unwrap();
            write(v[1].join("c").join("E".repeat(239)), b"");
            fs::create_dir_all(v[1].join("c").join("D".repeat(204)).join("sub")).unwrap();
            write(v[1].join(&deep).join("x"), b"exchanged");
            fs::create_dir_all(v[1].join("xd/sub")).unwrap();
            v
        },
        "metacopy=on",
    );
    p.same("rename within its directory", |m| {
        let d = m.join(&deep);
        let r = outcome(fs::rename(d.join("f"), d.join("g")));
        (r, fs::read(d.join("g")).ok())
    });
    p.same(
        "a hard link renamed within its directory: absolute redirect (seed 987334)",
        |m| {
            let d = m.join(&deep);
            let r = outcome(fs::rename(d.join("linked"), d.join("linked2")));
            (r, fs::read(d.join("linked")).ok())
        },
    );
    p.same("rename to another directory", |m| {
        let r = outcome(fs::rename(m.join(&deep).join("g"), m.join("b/g")));
        (r, fs::read(m.join(&deep).join("g")).ok())
    });
    p.same("hard link elsewhere (soak seed 8123)", |m| {
        outcome(fs::hard_link(m.join(&deep).join("g"), m.join("b/h")))
    });
    p.same(
        "empty and hard-linked files to another directory (seed 40012)",
        |m| {
            let d = m.join(&deep);
            (
                outcome(fs::rename(d.join("empty"), m.join("b/e"))),
                outcome(fs::rename(d.join("linked"), m.join("b/l"))),
                outcome(fs::hard_link(d.join("empty2"), m.join("b/e2"))),
                // Copied up by the failed rename: the kernel's copy is still metadata-only.
                outcome(fs::hard_link(d.join("empty"), m.join("b/e4"))),
                outcome(fs::rename(d.join("empty"), d.join("e3"))),
            )
        },
    );
    p.same(
        "an empty file moved twice: the redirect of the first move stays (seed 972050)",
        |m| {
            let (e, d) = ("E".repeat(239), "D".repeat(204));
            (
                // A directory moved (its redirect: /c/DDD...), then the file moved into it
                // (its redirect: /c/EEE..., 242 bytes), then out again: the kernel keeps the
                // file's absolute redirect; the path through the moved directory would be
                // 448 bytes.
                outcome(fs::rename(m.join("c").join(&d), m.join("b/moved"))),
                outcome(fs::rename(
                    m.join("c").join(&e),
                    m.join("b/moved/sub").join(&e),
                )),
                outcome(fs::rename(
                    m.join("b/moved/sub").join(&e),
                    m.join("b").join(&e),
                )),
            )
        },
    );
    p.same(
        "exchanged with a lower directory: EXDEV, both copied up first (seed 993540)",
        |m| {
            let d = sys::open_dir_path(&m.join(&deep)).unwrap();
            let xd = sys::open_dir_path(&m.join("xd")).unwrap();
            let r = sys::renameat2(
                d.as_fd(),
                "x".as_ref(),
                xd.as_fd(),
                "sub".as_ref(),
                libc::RENAME_EXCHANGE,
            );
            // A copied-up lower directory is merged: nlink 1.
            (outcome(r), fs::metadata(m.join("xd/sub")).unwrap().nlink())
        },
    );
    p.check("after the renames");
    p.check_interop();
}

/// A lower hard link is copied up whole where the kernel's copy is metadata-only, so a move
/// that would need a redirect longer than 256 bytes must still fail with EXDEV: through the
/// file's other names, reached later through the index, and after a remount. layerfs knew
/// that only for the node that made the copy: unlinking one name (which copies the file into
/// the index first) let a long-path name move where the kernel refused (metacopy soak, seed
/// 1400009). The copy now carries the knowledge (`overlay.layerfs.wholecopy`).
#[test]
fn a_whole_copy_of_a_hard_link_moves_as_the_kernels_metadata_only_copy_after_remount() {
    require_fuse!();
    let deep = format!("a/{}/{}", "L".repeat(200), "M".repeat(200));
    let mut p = Pair::with_options(
        |s| {
            let v = stack(s);
            fs::create_dir_all(v[1].join("b")).unwrap();
            for n in ["one", "two"] {
                write(v[1].join(&deep).join(n), b"linked data");
                fs::hard_link(v[1].join(&deep).join(n), v[1].join(format!("b/{n}"))).unwrap();
                fs::hard_link(v[1].join(&deep).join(n), v[1].join(format!("{n}2"))).unwrap();
            }
            v
        },
        "metacopy=on",
    );
    p.same("a short name removed: into the index first", |m| {
        (
            outcome(fs::remove_file(m.join("b/one"))),
            outcome(fs::rename(m.join("b/two"), m.join("b/two-moved"))),
        )
    });
    p.remount_layerfs();
    p.same(
        "the long names, reached through the index after a remount: EXDEV",
        |m| {
            let d = m.join(&deep);
            (
                outcome(fs::rename(d.join("one"), m.join("one-moved"))),
                outcome(fs::rename(d.join("two"), m.join("two-moved"))),
                // Short names move (an absolute redirect of a few bytes).
                outcome(fs::rename(m.join("one2"), m.join("b/one3"))),
                fs::metadata(d.join("one")).map(|m| m.nlink()).ok(),
            )
        },
    );
    p.same(
        "written: the kernel's copy has its data, so it moves",
        |m| {
            let d = m.join(&deep);
            let w = OpenOptions::new().append(true).open(d.join("one"));
            let w = w.and_then(|mut f| f.write_all(b"+"));
            (
                outcome(w),
                outcome(fs::rename(d.join("one"), m.join("one-moved"))),
            )
        },
    );
    p.remount_layerfs();
    p.same("after a second remount", |m| {
        (
            outcome(fs::rename(m.join("one-moved"), m.join(&deep).join("back"))),
            outcome(fs::rename(m.join(&deep).join("two"), m.join("two-moved"))),
            fs::read(m.join("b/one3")).ok(),
        )
    });
    p.check("after the moves");
    p.check_interop();
}

/// A metadata-only copy in a lower layer whose redirect leads to another metadata-only copy
/// (layers the kernel wrote with metacopy=on, renamed, then stacked as lowers): the data is
/// where the last redirect of the chain points, as the kernel's lookup follows each one
/// (ovl_check_redirect). layerfs used to look for the data at the first hop's path only, and
/// gave EIO.
#[test]
fn chains_of_lower_metacopy_redirects_are_followed_as_in_the_kernel() {
    require_fuse!();
    // A metadata-only copy of `size` bytes, with `redirect` unless it is empty.
    let meta = |p: &Path, size: u64, redirect: &[u8]| {
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::File::create(p).unwrap().set_len(size).unwrap();
        set_xattr(p, "trusted.overlay.metacopy", b"");
        if !redirect.is_empty() {
            set_xattr(p, "trusted.overlay.redirect", redirect);
        }
    };
    let data = b"the data at the end of the chain";
    let n = data.len() as u64;
    let mut p = Pair::with_options(
        |s| {
            let (l0, l1, l2) = (s.mkdir("l0"), s.mkdir("l1"), s.mkdir("l2"));
            write(l2.join("d/data"), data);
            // Absolute hops: x -> /mc -> /d/data.
            meta(&l1.join("mc"), n, b"/d/data");
            meta(&l0.join("x"), n, b"/mc");
            // A relative hop, then an absolute one: s/y -> s/y2 -> /d/data.
            meta(&l1.join("s/y2"), n, b"/d/data");
            meta(&l0.join("s/y"), n, b"y2");
            // A chain whose last hop is whited out on the way: no data (EIO).
            meta(&l1.join("gone"), n, b"/w/data");
            meta(&l0.join("g"), n, b"/gone");
            write(l2.join("w/data"), b"hidden by l1");
            s.mkdir("l1/w");
            whiteout(l1.join("w/data"));
            // In an opaque directory: by its name the data below is out of reach (EIO, as
            // the kernel: the parent merges nothing below); an absolute redirect reaches it.
            meta(&l1.join("o/abs"), n, b"/d/data");
            meta(&l1.join("o/m"), n, b"");
            set_xattr(l1.join("o"), "trusted.overlay.opaque", b"y");
            write(l2.join("o/m"), data);
            // Walked from the roots (after an absolute redirect), an opaque directory ends
            // the search only where the name is missing: a metadata-only copy there sends it
            // on below, by its relative redirect or its own path, as the kernel's lookup
            // clears d->stop at one (metacopy soak, seed 1190028: layerfs gave EIO).
            meta(&l0.join("r"), n, b"/q/hop");
            meta(&l1.join("q/hop"), n, b"data2");
            write(l2.join("q/data2"), data);
            meta(&l0.join("r2"), n, b"/q/same");
            meta(&l1.join("q/same"), n, b"");
            write(l2.join("q/same"), data);
            meta(&l0.join("r3"), n, b"/q/none");
            write(l2.join("q/none"), data);
            set_xattr(l1.join("q"), "trusted.overlay.opaque", b"y");
            vec![l0, l1, l2]
        },
        "metacopy=on",
    );
    for f in [
        "x", "mc", "s/y", "s/y2", "g", "d/data", "o/m", "o/abs", "r", "r2", "r3",
    ] {
        p.same(&format!("read {f}"), |m| outcome(fs::read(m.join(f))));
        p.same(&format!("blocks of {f}"), |m| {
            outcome(fs::metadata(m.join(f)).map(|md| (md.len(), md.blocks())))
        });
    }
    assert_eq!(fs::read(p.lmnt().join("x")).unwrap(), data);
    assert_eq!(fs::read(p.lmnt().join("r")).unwrap(), data);
    assert_eq!(fs::read(p.lmnt().join("r2")).unwrap(), data);
    p.same("chmod x (metadata-only copy-up)", |m| {
        outcome(fs::set_permissions(
            m.join("x"),
            fs::Permissions::from_mode(0o600),
        ))
    });
    p.same("read x after its copy-up", |m| {
        outcome(fs::read(m.join("x")))
    });
    p.same("rename s/y", |m| {
        outcome(fs::rename(m.join("s/y"), m.join("moved")))
    });
    p.same("read the moved file", |m| {
        outcome(fs::read(m.join("moved")))
    });
    p.same("append to x (data copy-up)", |m| {
        outcome(
            OpenOptions::new()
                .append(true)
                .open(m.join("x"))
                .and_then(|mut f| f.write_all(b"+")),
        )
    });
    p.same("read x after the data copy-up", |m| {
        outcome(fs::read(m.join("x")))
    });
    p.check("after copy-ups through chains");
    p.assert_no_panic();
    p.check_interop();
}
