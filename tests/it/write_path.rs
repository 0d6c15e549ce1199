//! The write path through real mounts, step by step against kernel overlayfs, then persistence
//! and on-disk interop both ways.

use std::fs::{self, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use layerfs::sys;

use crate::pair::{Pair, outcome};
use crate::require_fuse;
use crate::support::*;

fn stack(s: &Scratch) -> Vec<PathBuf> {
    let l1 = s.mkdir("l1");
    let l2 = s.mkdir("l2");
    write(l2.join("a"), b"lower a\n");
    write(l2.join("big"), &vec![7u8; 3 << 20]);
    write(l2.join("meta"), b"meta");
    chmod(l2.join("meta"), 0o640);
    std::os::unix::fs::lchown(l2.join("meta"), Some(1234), Some(5678)).unwrap();
    set_xattr(l2.join("meta"), "user.tag", b"v1");
    write(l2.join("d/sub/deep/f"), b"deep");
    write(l1.join("d/top"), b"top");
    write(l2.join("d/bottom"), b"bottom");
    write(l2.join("rmme/x/y"), b"y");
    write(l2.join("rmme/z"), b"z");
    write(l1.join("rmme/w"), b"w");
    symlink("a", l2.join("link")).unwrap();
    mkfifo(l2.join("fifo"));
    write(l2.join("h1"), b"hard");
    fs::hard_link(l2.join("h1"), l2.join("h2")).unwrap();
    write(l2.join("mv/src/inner"), b"inner");
    write(l1.join("mv/src/inner2"), b"inner2");
    write(l2.join("mv/target"), b"target");
    vec![l1, l2]
}

fn tree_of(p: &Path) -> Tree {
    snapshot(p)
}

fn append(p: &Path, data: &[u8]) -> std::io::Result<()> {
    OpenOptions::new().append(true).open(p)?.write_all(data)
}

#[test]
fn copy_up_on_every_kind_of_change_matches_kernel() {
    require_fuse!();
    let p = Pair::new(stack);
    let lowers_before: Vec<Tree> = p.lowers.iter().map(|l| tree_of(l)).collect();

    p.same("append", |m| outcome(append(&m.join("a"), b"more\n")));
    p.check("after append");
    p.same("chmod", |m| {
        outcome(fs::set_permissions(
            m.join("meta"),
            fs::Permissions::from_mode(0o600),
        ))
    });
    p.same("chown", |m| {
        outcome(std::os::unix::fs::chown(
            m.join("d/bottom"),
            Some(42),
            Some(43),
        ))
    });
    p.same("setxattr", |m| {
        set_xattr(m.join("d/top"), "user.new", b"x");
        0
    });
    p.same("truncate down", |m| {
        outcome(
            OpenOptions::new()
                .write(true)
                .open(m.join("big"))
                .and_then(|f| f.set_len(1000)),
        )
    });
    p.same("O_TRUNC", |m| {
        outcome(
            OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(m.join("d/sub/deep/f"))
                .map(|_| ()),
        )
    });
    p.same("symlink chown", |m| {
        outcome(std::os::unix::fs::lchown(m.join("link"), Some(7), Some(7)))
    });
    p.same("chmod fifo", |m| {
        outcome(fs::set_permissions(
            m.join("fifo"),
            fs::Permissions::from_mode(0o600),
        ))
    });
    p.check("after metadata changes");
    // The copies keep what the kernel keeps: owner, mode, xattrs, times of untouched files.
    let m = fs::symlink_metadata(p.upper().join("meta")).unwrap();
    assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (1234, 5678, 0o600));
    assert_eq!(
        get_xattr(p.upper().join("meta"), "user.tag").as_deref(),
        Some(&b"v1"[..])
    );
    let fifo = fs::symlink_metadata(p.upper().join("fifo")).unwrap();
    assert!(
        std::os::unix::fs::FileTypeExt::is_fifo(&fifo.file_type()),
        "chmod of a FIFO copies up a FIFO"
    );
    // The lower layers were never touched.
    for (l, before) in p.lowers.iter().zip(&lowers_before) {
        assert_same_tree("lower layer", before, &tree_of(l));
    }
    let mut p = p;
    p.check_interop();
}

#[test]
fn copy_up_keeps_parent_times_and_metadata() {
    require_fuse!();
    let p = Pair::new(stack);
    let lower_deep = p.lowers[1].join("d/sub/deep");
    let before: Vec<i64> = ["d", "d/sub", "d/sub/deep"]
        .iter()
        .map(|d| fs::metadata(p.lowers[1].join(d)).unwrap().mtime())
        .collect();
    p.same("append deep", |m| {
        outcome(append(&m.join("d/sub/deep/f"), b"!"))
    });
    for (i, d) in ["d/sub", "d/sub/deep"].iter().enumerate() {
        let upper = fs::metadata(p.upper().join(d)).unwrap();
        assert_eq!(
            upper.mtime(),
            before[i + 1],
            "copied-up parent {d} keeps its mtime"
        );
        let k = fs::metadata(p.kmnt().join(d)).unwrap();
        let l = fs::metadata(p.lmnt().join(d)).unwrap();
        assert_eq!(
            (k.mtime(), k.mode()),
            (l.mtime(), l.mode()),
            "{d} through both mounts"
        );
    }
    assert!(lower_deep.exists());
    p.check("after deep copy-up");
}

#[test]
fn deletions_write_whiteouts_and_recreated_dirs_are_opaque() {
    require_fuse!();
    let mut p = Pair::new(stack);
    p.same("unlink lower", |m| outcome(fs::remove_file(m.join("a"))));
    p.same("rmdir non-empty", |m| {
        outcome(fs::remove_dir(m.join("rmme")))
    });
    p.same("rm -rf lower dir", |m| {
        outcome(fs::remove_dir_all(m.join("rmme")))
    });
    p.same("unlink gone", |m| outcome(fs::remove_file(m.join("a"))));
    p.same("rmdir file", |m| outcome(fs::remove_dir(m.join("big"))));
    p.same("unlink dir", |m| outcome(fs::remove_file(m.join("d"))));
    p.check("after deletes");
    let wh = fs::symlink_metadata(p.upper().join("a")).unwrap();
    assert!(std::os::unix::fs::FileTypeExt::is_char_device(&wh.file_type()) && wh.rdev() == 0);
    // Known fuse-overlayfs bug: rm -rf of a lower dir at the root, mkdir again, remount.
    p.same("mkdir over whiteout", |m| {
        outcome(fs::create_dir(m.join("rmme")))
    });
    p.same("file in it", |m| {
        outcome(fs::write(m.join("rmme/fresh"), b"f"))
    });
    p.same("rm -rf deep", |m| {
        outcome(fs::remove_dir_all(m.join("d/sub")))
    });
    p.same("mkdir deep", |m| outcome(fs::create_dir(m.join("d/sub"))));
    p.check("after recreate");
    assert_eq!(
        get_xattr(p.upper().join("rmme"), "trusted.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
    assert_eq!(
        get_xattr(p.upper().join("d/sub"), "trusted.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
    p.check_interop();
}

#[test]
fn whiteout_names_cannot_be_created() {
    require_fuse!();
    let mut p = Pair::new(stack);
    // The kernel allows such a name; layerfs refuses it so a user file can never delete a lower
    // file after remount (a deliberate difference, docs/SEMANTICS.md).
    let e = fs::write(p.lmnt().join(".wh.a"), b"x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
    let e = fs::create_dir(p.lmnt().join(".wh..wh..opq")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
    p.remount_layerfs();
    assert_eq!(fs::read(p.lmnt().join("a")).unwrap(), b"lower a\n");
}

fn rename2(m: &Path, from: &str, to: &str, flags: u32) -> Result<(), i32> {
    let d = sys::open_dir_path(m).unwrap();
    let (fp, fname) = split(from);
    let (tp, tname) = split(to);
    let fd = sys::openat(
        d.as_fd(),
        std::ffi::OsStr::new(fp),
        libc::O_PATH | libc::O_DIRECTORY,
        0,
    );
    let fd = if fp == "." {
        sys::open_dir_path(m).unwrap()
    } else {
        fd.unwrap()
    };
    let td = if tp == "." {
        sys::open_dir_path(m).unwrap()
    } else {
        sys::open_dir_path(&m.join(tp)).unwrap()
    };
    sys::renameat2(
        fd.as_fd(),
        fname.as_ref(),
        td.as_fd(),
        tname.as_ref(),
        flags,
    )
    .map_err(|e| e.raw_os_error().unwrap())
}

fn split(p: &str) -> (&str, &str) {
    match p.rsplit_once('/') {
        Some((d, n)) => (d, n),
        None => (".", p),
    }
}

#[test]
fn renames_of_files_and_directories_match_kernel() {
    require_fuse!();
    let mut p = Pair::new(stack);
    p.same("file to new name", |m| {
        outcome(fs::rename(m.join("a"), m.join("a2")))
    });
    p.same("file over existing", |m| {
        outcome(fs::rename(m.join("meta"), m.join("a2")))
    });
    p.same("file into subdir", |m| {
        outcome(fs::rename(m.join("a2"), m.join("d/sub/a3")))
    });
    p.check("after file renames");
    p.same("lower dir rename (redirect)", |m| {
        outcome(fs::rename(m.join("mv/src"), m.join("mv/moved")))
    });
    p.same("list moved", |m| listing(&m.join("mv/moved")));
    p.same("dir across dirs", |m| {
        outcome(fs::rename(m.join("mv/moved"), m.join("d/sub/deep/m2")))
    });
    p.same("dir over non-empty", |m| {
        outcome(fs::rename(m.join("d"), m.join("rmme")))
    });
    p.same("dir over file", |m| {
        outcome(fs::rename(m.join("rmme"), m.join("big")))
    });
    p.same("file over dir", |m| {
        outcome(fs::rename(m.join("big"), m.join("rmme")))
    });
    p.same("noreplace", |m| {
        rename2(m, "big", "link", libc::RENAME_NOREPLACE)
    });
    p.same("exchange", |m| {
        rename2(m, "big", "link", libc::RENAME_EXCHANGE)
    });
    p.same("exchange missing", |m| {
        rename2(m, "big", "nope", libc::RENAME_EXCHANGE)
    });
    // Found by the shared-mount soak (seed 7): NOREPLACE onto a deleted lower name must replace
    // the whiteout the upper holds there, not fail with EEXIST.
    p.same("noreplace over a whited-out name", |m| {
        fs::remove_file(m.join("meta")).ok();
        fs::write(m.join("fresh-file"), b"f").unwrap();
        rename2(m, "fresh-file", "meta", libc::RENAME_NOREPLACE)
    });
    p.same("mkdir then rename over emptied lower dir", |m| {
        fs::remove_dir_all(m.join("rmme")).unwrap();
        fs::create_dir(m.join("rmme")).unwrap();
        fs::create_dir(m.join("fresh")).unwrap();
        fs::write(m.join("fresh/x"), b"x").unwrap();
        outcome(fs::rename(m.join("fresh"), m.join("rmme")))
    });
    p.same("rename a merged dir over a whiteout", |m| {
        fs::remove_file(m.join("a")).ok();
        fs::remove_dir_all(m.join("mv")).unwrap();
        outcome(fs::rename(m.join("d"), m.join("mv")))
    });
    p.check("after dir renames");
    p.check_interop();
}

/// Found by the soak (seed 2004): a redirect is followed layer by layer along its path, and
/// an opaque directory on that path lets its own layer in but hides every layer below, as in
/// the kernel; after a remount the renamed directory must not show what the opaque one hid.
#[test]
fn a_redirect_through_an_opaque_lower_dir_stops_below_it() {
    require_fuse!();
    let mut p = Pair::new(|s: &Scratch| {
        let (l0, l1) = (s.mkdir("l0"), s.mkdir("l1"));
        write(l0.join("b0/b5/dir1/x"), b"x");
        set_xattr(l0.join("b0"), "trusted.overlay.opaque", b"y");
        s.mkdir("l0/a3");
        write(l1.join("b0/b5/b2"), b"hidden by the opaque b0");
        write(l1.join("b0/b5/f5"), b"hidden too");
        vec![l0, l1]
    });
    p.same("list before", |m| listing(&m.join("b0/b5")));
    p.same("move it", |m| {
        outcome(fs::rename(m.join("b0/b5"), m.join("a3/b5")))
    });
    p.check("after the move");
    p.check_interop();
}

/// Found by the soak (seed 986222): an opaque directory on a redirect's path hides the layers
/// below even where its own layer lacks the rest of the path (the kernel stops at the opaque
/// component; layerfs looked on in the next layer after the next component was missing).
#[test]
fn a_redirect_through_an_opaque_dir_stops_even_where_the_path_ends_in_its_layer() {
    require_fuse!();
    let mut p = Pair::new(|s: &Scratch| {
        let (l0, l1, l2) = (s.mkdir("l0"), s.mkdir("l1"), s.mkdir("l2"));
        write(l0.join("b4/c3/dir4/dir3/a1"), b"a1");
        s.mkdir("l1/b4/c3");
        set_xattr(l1.join("b4/c3"), "trusted.overlay.opaque", b"y");
        write(
            l2.join("b4/c3/dir4/dir3/hidden"),
            b"hidden by the opaque c3",
        );
        vec![l0, l1, l2]
    });
    p.same("list before", |m| listing(&m.join("b4/c3/dir4/dir3")));
    p.same("move it", |m| {
        outcome(fs::rename(m.join("b4/c3/dir4/dir3"), m.join("dir3")))
    });
    p.check("after the move");
    p.check_interop();
}

/// Found by the soak (seed 1330): a directory renamed inside a renamed lower directory must be
/// redirected to where it lives in the lower layers (under the outer rename's target), not to
/// its union path, or it stops merging with its lower copy after a remount.
#[test]
fn a_dir_renamed_inside_a_renamed_lower_dir_keeps_merging_after_remount() {
    require_fuse!();
    let mut p = Pair::new(|s: &Scratch| {
        let l1 = s.mkdir("l1");
        write(l1.join("f3/a0/dir2/dir5/x"), b"x");
        write(l1.join("f3/a0/keep"), b"k");
        s.mkdir("l1/f0/f1/a3");
        vec![l1]
    });
    p.same("rename the outer dir", |m| {
        outcome(fs::rename(m.join("f3"), m.join("f0/f1/a3/c4")))
    });
    p.same("rename a dir inside it to another parent", |m| {
        outcome(fs::rename(
            m.join("f0/f1/a3/c4/a0/dir2/dir5"),
            m.join("f0/f1/a3/c4/a0/dir5"),
        ))
    });
    p.same("rename one inside its own parent", |m| {
        outcome(fs::rename(
            m.join("f0/f1/a3/c4/a0/dir5"),
            m.join("f0/f1/a3/c4/a0/dir6"),
        ))
    });
    p.check("after the renames");
    p.check_interop();
    let redirect = get_xattr(
        p.upper().join("f0/f1/a3/c4/a0/dir6"),
        "trusted.overlay.redirect",
    );
    assert_eq!(redirect.as_deref(), Some(&b"/f3/a0/dir2/dir5"[..]));
}

#[test]
fn links_symlinks_and_special_files() {
    require_fuse!();
    let mut p = Pair::new(stack);
    p.same("hard link to lower", |m| {
        outcome(fs::hard_link(m.join("a"), m.join("a.link")))
    });
    p.same("append through link", |m| {
        outcome(append(&m.join("a.link"), b"via link\n"))
    });
    p.same("read other name", |m| fs::read(m.join("a")).unwrap());
    p.same("nlink", |m| fs::metadata(m.join("a")).unwrap().nlink());
    p.same("symlink", |m| {
        outcome(symlink("../somewhere", m.join("d/newlink")))
    });
    p.same("fifo", |m| {
        let d = sys::open_dir_path(m).unwrap();
        outcome(sys::mknodat(
            d.as_fd(),
            "newfifo".as_ref(),
            libc::S_IFIFO | 0o600,
            0,
        ))
    });
    p.same("create exclusive existing", |m| {
        outcome(
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(m.join("a"))
                .map(|_| ()),
        )
    });
    p.same("mkdir existing", |m| outcome(fs::create_dir(m.join("d"))));
    p.check("after links");
    p.check_interop();
}

#[test]
fn readers_see_a_later_copy_up_and_unlinked_files_stay_usable() {
    require_fuse!();
    // Lower files read through the daemon: an early reader follows, as in the kernel.
    let p = Pair::with_ours(stack, "", "passthrough=upper");
    p.same("reader follows copy-up", |m| {
        let mut r = fs::File::open(m.join("a")).unwrap();
        append(&m.join("a"), b"appended\n").unwrap();
        let mut s = String::new();
        r.read_to_string(&mut s).unwrap();
        s
    });
    p.same("unlinked open file", |m| {
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(m.join("meta"))
            .unwrap();
        fs::remove_file(m.join("meta")).unwrap();
        f.write_all(b"still here").unwrap();
        f.seek(SeekFrom::Start(0)).unwrap();
        let mut s = String::new();
        f.read_to_string(&mut s).unwrap();
        (s, f.metadata().unwrap().nlink(), m.join("meta").exists())
    });
    p.check("after");
}

#[test]
fn changes_through_an_fd_whose_lower_file_lost_its_name_fail_as_in_the_kernel() {
    require_fuse!();
    // The kernel copies such a file up to the name it had: a whiteout or another entry is
    // there now (EEXIST), or its directory is gone (ENOENT). A hard link's copy goes to the
    // file's other name. fstat keeps working.
    let mut p = Pair::new(stack);
    let through_fd = |m: &Path, path: &str, lose: &dyn Fn(&Path)| {
        let f = fs::File::open(m.join(path)).unwrap();
        lose(m);
        let chmod = outcome(f.set_permissions(PermissionsExt::from_mode(0o700)));
        let xattr = outcome(sys::setxattr(
            sys::XTarget::Fd(f.as_fd()),
            c"user.k",
            b"v",
            0,
        ));
        let mode = f.metadata().unwrap().mode();
        (chmod, xattr, mode)
    };
    p.same("unlinked", |m| {
        through_fd(m, "a", &|m| fs::remove_file(m.join("a")).unwrap())
    });
    p.same("renamed over", |m| {
        through_fd(m, "d/bottom", &|m| {
            fs::rename(m.join("d/top"), m.join("d/bottom")).unwrap()
        })
    });
    p.same("its directory moved", |m| {
        through_fd(m, "d/sub/deep/f", &|m| {
            fs::remove_file(m.join("d/sub/deep/f")).unwrap();
            fs::rename(m.join("d/sub/deep"), m.join("d/deep2")).unwrap();
        })
    });
    p.same("its directory removed", |m| {
        through_fd(m, "mv/src/inner", &|m| {
            fs::remove_file(m.join("mv/src/inner")).unwrap();
            fs::remove_file(m.join("mv/src/inner2")).unwrap();
            fs::remove_dir(m.join("mv/src")).unwrap();
        })
    });
    p.same("a hard link's other name", |m| {
        let r = through_fd(m, "h1", &|m| fs::remove_file(m.join("h1")).unwrap());
        let h2 = fs::metadata(m.join("h2")).unwrap();
        (r, h2.mode(), h2.nlink())
    });
    p.check("after");
    p.remount_both(true, false);
    p.same("the hard link's count after a remount", |m| {
        fs::metadata(m.join("h2")).unwrap().nlink()
    });
}

#[test]
fn an_fd_on_a_removed_name_of_a_lower_hard_link_sees_changes_made_through_the_others() {
    require_fuse!();
    let p = Pair::new(|s| {
        let l = s.mkdir("l");
        write(l.join("x1"), b"one file");
        fs::hard_link(l.join("x1"), l.join("x2")).unwrap();
        fs::hard_link(l.join("x1"), l.join("x3")).unwrap();
        write(l.join("y"), b"y");
        vec![l]
    });
    p.same("writable fd, name unlinked", |m| {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(m.join("x1"))
            .unwrap();
        fs::remove_file(m.join("x1")).unwrap();
        let after_unlink = f.metadata().unwrap().nlink();
        OpenOptions::new()
            .write(true)
            .open(m.join("x2"))
            .unwrap()
            .set_len(100_000)
            .unwrap();
        fs::rename(m.join("y"), m.join("x3")).unwrap();
        let st = f.metadata().unwrap();
        (
            after_unlink,
            st.len(),
            st.nlink(),
            fs::metadata(m.join("x2")).unwrap().nlink(),
        )
    });
    p.check("after");
}

#[test]
fn a_change_through_an_fd_from_before_a_copy_up_shows_under_the_files_name() {
    require_fuse!();
    // The reader's fd keeps the kernel inode bound to the lower file (passthrough); the name
    // leads to another one after the copy-up. Both transports: /dev/fuse answered the
    // retried lookup with yet another node (data-only soak with metacopy=on, seed 1290051).
    for ours in ["", "io_uring=0"] {
        let p = Pair::with_ours(stack, "", ours);
        p.same(&format!("chmod through the old fd ({ours})"), |m| {
            let f = fs::File::open(m.join("a")).unwrap();
            let w = OpenOptions::new().write(true).open(m.join("a")).unwrap();
            w.set_len(3).unwrap();
            drop(w);
            fs::metadata(m.join("a")).unwrap();
            f.set_permissions(PermissionsExt::from_mode(0o600)).unwrap();
            sys::setxattr(sys::XTarget::Fd(f.as_fd()), c"user.k", b"v", 0).unwrap();
            let st = fs::metadata(m.join("a")).unwrap();
            (st.mode(), st.len(), get_xattr(m.join("a"), "user.k"))
        });
        p.check("after");
    }
}

#[test]
fn sparse_files_stay_sparse_and_o_trunc_copies_nothing() {
    require_fuse!();
    let s = Scratch::new();
    let low = s.mkdir("low");
    let f = fs::File::create(low.join("sparse")).unwrap();
    f.set_len(1 << 30).unwrap();
    drop(f);
    let mut f = OpenOptions::new()
        .write(true)
        .open(low.join("sparse"))
        .unwrap();
    f.seek(SeekFrom::Start(512 << 20)).unwrap();
    f.write_all(b"middle").unwrap();
    drop(f);
    fs::write(low.join("t"), vec![1u8; 1 << 20]).unwrap();
    let (up, work) = (s.mkdir("up"), s.mkdir("work"));
    let l = Layerfs::mount(&rw_opts(&low, &up, &work), &s.path("mnt"));
    append(&l.mnt.join("sparse"), b"end").unwrap();
    let m = fs::metadata(up.join("sparse")).unwrap();
    assert_eq!(m.len(), (1 << 30) + 3);
    assert!(
        m.blocks() * 512 < 16 << 20,
        "upper copy is sparse ({} blocks)",
        m.blocks()
    );
    let mut r = fs::File::open(l.mnt.join("sparse")).unwrap();
    r.seek(SeekFrom::Start(512 << 20)).unwrap();
    let mut buf = [0u8; 6];
    r.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"middle");
    drop(r);
    let f = OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(l.mnt.join("t"))
        .unwrap();
    assert_eq!(f.metadata().unwrap().len(), 0);
    assert_eq!(
        fs::metadata(up.join("t")).unwrap().blocks(),
        0,
        "O_TRUNC copy-up wrote no data"
    );
}

#[test]
fn concurrent_first_writes_copy_up_once() {
    require_fuse!();
    let p = Pair::new(stack);
    let m = p.lmnt().to_path_buf();
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let m = m.clone();
            std::thread::spawn(move || append(&m.join("a"), format!("t{i}\n").as_bytes()).unwrap())
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let s = fs::read_to_string(m.join("a")).unwrap();
    assert!(s.starts_with("lower a\n"), "{s}");
    assert_eq!(s.lines().count(), 9, "{s}");
    let leftovers: Vec<_> = fs::read_dir(p.s.path("lw/work")).unwrap().collect();
    assert!(leftovers.is_empty(), "work dir left {leftovers:?}");
}

#[test]
fn workdir_leftovers_never_break_copy_up() {
    require_fuse!();
    let s = Scratch::new();
    let low = s.mkdir("low");
    write(low.join("f"), b"lower");
    let (up, work) = (s.mkdir("up"), s.mkdir("work"));
    // What a crash (ours or another tool's) can leave: files, dirs, dirs of mode 0.
    write(work.join("work/#1-0"), b"stale bytes");
    write(work.join("work/#1-1/x/y"), b"stale");
    write(work.join("work/#0-0"), b"");
    chmod(work.join("work/#1-1"), 0);
    let l = Layerfs::mount(&rw_opts(&low, &up, &work), &s.path("mnt"));
    assert_eq!(
        fs::read_dir(work.join("work")).unwrap().count(),
        0,
        "leftovers removed at mount"
    );
    append(&l.mnt.join("f"), b"+").unwrap();
    assert_eq!(fs::read(l.mnt.join("f")).unwrap(), b"lower+");
}

#[test]
fn lower_hard_link_append_survives_remount() {
    require_fuse!();
    let mut p = Pair::new(stack);
    append(&p.lmnt().join("h1"), b" more").unwrap();
    let seen_h2 = fs::read(p.lmnt().join("h2")).unwrap();
    p.remount_layerfs();
    assert_eq!(fs::read(p.lmnt().join("h1")).unwrap(), b"hard more");
    // Within a mount both names are one file (as the kernel with index=on).
    assert_eq!(seen_h2, b"hard more");
}

/// Data written through one name of a lower hard link reaches names first looked up after
/// that name was unlinked, and after a remount (soak seed 5000: they showed the old lower
/// file; the kernel with index=on keeps them one file through its index, and so do we).
#[test]
fn lower_hard_link_names_seen_only_later_share_the_copy() {
    require_fuse!();
    let mut p = Pair::new(|s| {
        let l1 = s.mkdir("l1");
        let l2 = s.mkdir("l2");
        write(l1.join("other"), b"x");
        write(l2.join("h1"), b"hard");
        fs::hard_link(l2.join("h1"), l2.join("h2")).unwrap();
        fs::hard_link(l2.join("h1"), l2.join("h3")).unwrap();
        vec![l1, l2]
    });
    p.same("append through h1, then unlink it", |m| {
        append(&m.join("h1"), b" more").unwrap();
        fs::remove_file(m.join("h1")).unwrap();
    });
    p.same("h2, first looked up now", |m| {
        let md = fs::metadata(m.join("h2")).unwrap();
        (fs::read(m.join("h2")).unwrap(), md.len())
    });
    p.check("after the unlink");
    p.remount_layerfs();
    p.same("h3, first looked up after a remount", |m| {
        let md = fs::metadata(m.join("h3")).unwrap();
        (fs::read(m.join("h3")).unwrap(), md.nlink())
    });
    assert_eq!(fs::read(p.lmnt().join("h3")).unwrap(), b"hard more");
    p.check("after the remount");
    p.check_interop();
}

/// A v2 file capability granting cap_net_raw (bit 13), effective.
const CAP_NET_RAW: [u8; 20] = [
    1, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
];

#[test]
fn capabilities_acl_xattrs_fallocate_and_seek_data() {
    require_fuse!();
    let p = Pair::new(|s| {
        let v = stack(s);
        set_xattr(v[1].join("a"), "security.capability", &CAP_NET_RAW);
        set_xattr(v[1].join("a"), "trusted.mine", b"t");
        v
    });
    p.same("chmod copies the capability up", |m| {
        fs::set_permissions(m.join("a"), fs::Permissions::from_mode(0o755)).unwrap();
        (
            get_xattr(m.join("a"), "security.capability"),
            get_xattr(m.join("a"), "trusted.mine"),
        )
    });
    assert_eq!(
        get_xattr(p.upper().join("a"), "security.capability").as_deref(),
        Some(&CAP_NET_RAW[..])
    );
    p.same("set trusted xattr", |m| {
        set_xattr(m.join("meta"), "trusted.x", b"1");
        get_xattr(m.join("meta"), "trusted.x")
    });
    p.same("removexattr missing", |m| {
        let d = sys::open_dir_path(m).unwrap();
        outcome(sys::removexattr(
            sys::XTarget::At(d.as_fd(), "d".as_ref()),
            c"user.none",
        ))
    });
    p.same(
        "overlay's own xattr names are stored escaped (nesting)",
        |m| {
            let d = sys::open_dir_path(m).unwrap();
            let set = outcome(sys::setxattr(
                sys::XTarget::At(d.as_fd(), "d".as_ref()),
                c"trusted.overlay.opaque",
                b"y",
                0,
            ));
            (set, get_xattr(m.join("d"), "trusted.overlay.opaque"))
        },
    );
    assert_eq!(
        get_xattr(p.upper().join("d"), "trusted.overlay.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
    assert_eq!(
        get_xattr(p.upper().join("d"), "trusted.overlay.opaque"),
        None,
        "not a real marker"
    );
    p.same("fallocate and SEEK_DATA/SEEK_HOLE", |m| {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(m.join("big"))
            .unwrap();
        let keep = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        sys::fallocate(f.as_fd(), keep, 1 << 20, 1 << 20).unwrap();
        sys::fallocate(f.as_fd(), 0, 4 << 20, 1 << 20).unwrap();
        let data = sys::lseek(f.as_fd(), 1 << 20, libc::SEEK_DATA).unwrap();
        let hole = sys::lseek(f.as_fd(), 0, libc::SEEK_HOLE).unwrap();
        (data, hole, f.metadata().unwrap().len())
    });
    p.same("fsync and fdatasync", |m| {
        let f = OpenOptions::new()
            .write(true)
            .open(m.join("d/top"))
            .unwrap();
        (outcome(f.sync_all()), outcome(f.sync_data()))
    });
    p.check("after");
}

#[test]
fn passthrough_mode_serves_reads_writes_and_shared_opens() {
    require_fuse!();
    let s = Scratch::new();
    let low = s.mkdir("low");
    write(low.join("f"), &vec![3u8; 1 << 20]);
    let (up, work) = (s.mkdir("up"), s.mkdir("work"));
    let log = s.path("log");
    let l = Layerfs::try_mount_logged(
        &format!(
            "lowerdir={},upperdir={},workdir={},passthrough=1",
            low.display(),
            up.display(),
            work.display()
        ),
        &s.path("mnt"),
        Some(&log),
    )
    .unwrap();
    let m = l.mnt.clone();
    // A lower file read through passthrough, then written by several openers at once.
    assert_eq!(fs::read(m.join("f")).unwrap().len(), 1 << 20);
    let threads: Vec<_> = (0..6)
        .map(|i| {
            let m = m.clone();
            std::thread::spawn(move || append(&m.join("f"), format!("{i}").as_bytes()).unwrap())
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(fs::read(m.join("f")).unwrap().len(), (1 << 20) + 6);
    assert_eq!(fs::metadata(up.join("f")).unwrap().len(), (1 << 20) + 6);
    // New files: create, write, mmap-free read back, while another fd is open.
    let mut w = fs::File::create(m.join("new")).unwrap();
    w.write_all(b"hello").unwrap();
    let r = fs::read(m.join("new")).unwrap();
    assert_eq!(r, b"hello");
    drop(w);
    let text = fs::read_to_string(&log).unwrap();
    assert!(text.contains("data path: FUSE passthrough"), "{text}");
}

/// Lower files are read through passthrough too. The kernel binds an inode to one backing
/// file, so a reader open on the lower file before a copy-up keeps reading it, and the node
/// is reissued: every later open reaches the copied-up file (see docs/SEMANTICS.md).
#[test]
fn a_reader_open_before_a_copy_up_keeps_the_lower_data_under_passthrough() {
    require_fuse!();
    let s = Scratch::new();
    let low = s.mkdir("low");
    write(low.join("f"), b"lower data\n");
    write(low.join("g"), &vec![5u8; 1 << 20]);
    let (up, work) = (s.mkdir("up"), s.mkdir("work"));
    let l = Layerfs::mount(
        &format!(
            "lowerdir={},upperdir={},workdir={}",
            low.display(),
            up.display(),
            work.display()
        ),
        &s.path("mnt"),
    );
    let m = l.mnt.clone();
    let mut r = fs::File::open(m.join("f")).unwrap();
    let mut head = [0u8; 6];
    r.read_exact(&mut head).unwrap();
    let ino_before = fs::metadata(m.join("f")).unwrap().ino();
    // The write opens succeed (the first after the kernel retries its path walk).
    append(&m.join("f"), b"appended\n").unwrap();
    append(&m.join("f"), b"again\n").unwrap();
    let mut rest = String::new();
    r.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "data\n", "the early reader keeps the lower data");
    assert_eq!(
        fs::read_to_string(m.join("f")).unwrap(),
        "lower data\nappended\nagain\n"
    );
    // A new kernel inode, but the same st_ino: the copy's origin's, as the kernel's.
    let ino_after = fs::metadata(m.join("f")).unwrap().ino();
    assert_eq!(ino_after, ino_before);
    assert_eq!(ino_after, fs::metadata(low.join("f")).unwrap().ino());
    assert_ne!(ino_after, fs::metadata(up.join("f")).unwrap().ino());
    let st = stats(&m);
    assert_eq!(st["reissued"], 1, "{st}");
    assert_eq!(st["cached_opens"], 0, "{st}");
    drop(r);
    // Once copied up, readers and writers share the upper file: a reader sees writes at once.
    let mut w = OpenOptions::new().write(true).open(m.join("g")).unwrap();
    let mut r = fs::File::open(m.join("g")).unwrap();
    w.write_all(b"xyz").unwrap();
    let mut b = [0u8; 4];
    r.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"xyz\x05");
    let st = stats(&m);
    assert_eq!(
        st["reissued"], 1,
        "no reissue without an early lower reader: {st}"
    );
    assert_eq!(st["cached_opens"], 0, "{st}");
    assert!(st["passthrough_opens"].as_u64().unwrap() >= 6, "{st}");
}

/// Found by the differential harness (seed 21): a redirect longer than the kernel's 256 bytes.
#[test]
fn renaming_a_lower_dir_whose_redirect_would_be_too_long_gives_exdev() {
    require_fuse!();
    let long = "L".repeat(255);
    let mut p = Pair::new(|s| {
        let l = s.mkdir("l1");
        write(l.join("d").join(&long).join("f"), b"x");
        fs::create_dir(l.join("other")).unwrap();
        vec![l, s.mkdir("l2")]
    });
    // Across directories the redirect is absolute: "/d/" + 255 bytes > 256.
    p.same("too-long absolute redirect", |m| {
        outcome(fs::rename(m.join("d").join(&long), m.join("other/x")))
    });
    // Within its directory it is relative (the name alone): allowed.
    p.same("relative redirect", |m| {
        outcome(fs::rename(m.join("d").join(&long), m.join("d/short")))
    });
    // Moved again within its directory it keeps that redirect, as the kernel does (an
    // absolute one would be too long; shared-mount soak, seed 940000).
    p.same("moved again in its directory", |m| {
        outcome(fs::rename(m.join("d/short"), m.join("d/again")))
    });
    p.check("after");
    p.check_interop();
}

/// A rename over a merged directory emptied by deletions first turns the target into an
/// opaque upper-only directory (ovl_clear_empty), before the source's redirect is written:
/// where that redirect is too long (EXDEV), the target stays opaque, a plain directory with
/// nlink 2 (soak seed 900048: layerfs left it merged, nlink 1). And where the rename goes
/// through, the moved directory replaces it as before.
#[test]
fn a_refused_rename_over_an_emptied_merged_dir_leaves_it_opaque_as_the_kernel_does() {
    require_fuse!();
    let long = "L".repeat(250);
    let mut p = Pair::new(|s| {
        let l = s.mkdir("l1");
        fs::create_dir_all(l.join("d").join(&long).join("sub")).unwrap();
        write(l.join("t/g"), b"x");
        write(l.join("u/g"), b"y");
        vec![l, s.mkdir("l2")]
    });
    p.same("empty t and u", |m| {
        (
            outcome(fs::remove_file(m.join("t/g"))),
            outcome(fs::remove_file(m.join("u/g"))),
        )
    });
    // "/d/" + 250 bytes + "/sub" > 256: refused after the target was cleared.
    p.same("too-long redirect over t", |m| {
        outcome(fs::rename(m.join("d").join(&long).join("sub"), m.join("t")))
    });
    // The target is not the node the rename replies for: its new attributes reach the
    // kernel's cache by a notification a moment later (docs/SEMANTICS.md).
    wait_until(2, || {
        fs::symlink_metadata(p.lmnt().join("t")).is_ok_and(|md| md.nlink() == 2)
    });
    p.same("t after", |m| {
        let md = fs::symlink_metadata(m.join("t")).unwrap();
        format!(
            "nlink {} entries {}",
            md.nlink(),
            fs::read_dir(m.join("t")).unwrap().count()
        )
    });
    p.check("after the refused rename");
    // A short redirect goes through, replacing the emptied u.
    p.same("rename d over u", |m| {
        outcome(fs::rename(m.join("d"), m.join("u")))
    });
    p.check("after the rename");
    p.remount_layerfs();
    p.check("after remount");
    p.check_interop();
}

/// `sh -c cmd` as user and group 65534 (nobody).
fn as_nobody(cmd: &str) -> (bool, String, String) {
    run_timeout(
        std::process::Command::new("setpriv").args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "sh",
            "-c",
            cmd,
        ]),
        10,
    )
}

/// Writes, truncates and O_TRUNC opens by an unprivileged process drop set-id bits (set-group-ID
/// also without group execute when the writer is not of the group), as on the
/// kernel (layerfs takes FUSE_HANDLE_KILLPRIV_V2 so writes need no getxattr round trip, and
/// must then drop them itself); root keeps them.
#[test]
fn unprivileged_writes_drop_set_id_bits_as_the_kernel_does() {
    require_fuse!();
    let s = Scratch::new();
    fs::set_permissions(s.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let low = s.mkdir("low");
    let steps: [(&str, u32, &str); 5] = [
        ("w-suid", 0o4777, "echo x >> F"),
        ("t-sgid", 0o2777, "truncate -s 3 F"),
        ("o-suid", 0o4777, ": > F"),
        ("g-noexec", 0o2766, "echo x >> F"),
        ("root-keeps", 0o4777, "ROOT"),
    ];
    for (name, _, _) in steps {
        write(low.join(name), b"data\n");
    }
    let run = |mnt: &Path| -> Vec<u32> {
        steps
            .iter()
            .map(|(name, mode, cmd)| {
                let f = mnt.join(name);
                fs::set_permissions(&f, fs::Permissions::from_mode(*mode)).unwrap();
                let (ok, _, err) = if *cmd == "ROOT" {
                    run_timeout(
                        std::process::Command::new("sh")
                            .args(["-c", &format!("echo x >> '{}'", f.display())]),
                        10,
                    )
                } else {
                    as_nobody(&cmd.replace('F', &format!("'{}'", f.display())))
                };
                assert!(ok, "{name}: {err}");
                fs::metadata(&f).unwrap().mode() & 0o7777
            })
            .collect()
    };
    let kernel = {
        let (u, w) = (s.mkdir("ku"), s.mkdir("kw"));
        let k = Kernel::mount(&rw_opts(&low, &u, &w), &s.path("k"));
        run(&k.mnt)
    };
    let ours = {
        let (u, w) = (s.mkdir("lu"), s.mkdir("lw"));
        let m = Layerfs::mount(&rw_opts(&low, &u, &w), &s.path("m"));
        run(&m.mnt)
    };
    assert_eq!(ours, kernel, "modes after each step (layerfs vs kernel)");
    assert_eq!(
        kernel,
        [0o777, 0o777, 0o777, 0o766, 0o4777],
        "the kernel's answer"
    );
}

#[test]
fn a_failing_rmdir_copies_nothing_up() {
    // As the kernel: rmdir of a non-empty directory inside a lower directory gives ENOTEMPTY
    // and leaves the upper layer untouched (the parent stays unmerged: its nlink is the
    // lower one). Found by the differential soak, seed 10487.
    require_fuse!();
    let s = Scratch::new();
    let lower = s.mkdir("lower");
    write(lower.join("d/sub/f"), b"x");
    let mut seen = Vec::new();
    for (who, up, wk) in [("kernel", "ku", "kw"), ("layerfs", "lu", "lw")] {
        let (up, wk) = (s.mkdir(up), s.mkdir(wk));
        let opts = rw_opts(&lower, &up, &wk);
        let mnt = s.path(&format!("{who}-mnt"));
        let (r, nlink) = {
            let _m = Either::mount(who == "kernel", &opts, &mnt);
            let r = std::fs::remove_dir(mnt.join("d/sub")).map_err(|e| e.raw_os_error());
            (r, std::fs::metadata(mnt.join("d")).unwrap().nlink())
        };
        assert!(
            listing(&up).is_empty(),
            "{who}: upper after a failed rmdir: {:?}",
            listing(&up)
        );
        seen.push((r, nlink));
    }
    assert_eq!(seen[0], (Err(Some(libc::ENOTEMPTY)), 3), "kernel");
    assert_eq!(seen[1], seen[0], "layerfs vs kernel");
}

#[test]
fn markers_on_the_bottom_layer_point_nowhere_as_in_the_kernel() {
    // A redirect (or opaque) marker on a directory of the bottom layer has nothing below it
    // to point at, and the kernel doesn't read it (ovl_lookup_single stops at the last
    // layer). Once we followed it: renaming such a directory wrote the marker's target as the
    // new redirect, and after a remount the directory showed nothing of its lower contents.
    require_fuse!();
    let s = Scratch::new();
    let lower = s.mkdir("lower");
    write(lower.join("d/f"), b"lower f");
    set_xattr(lower.join("d"), "trusted.overlay.redirect", b"/nowhere");
    write(lower.join("o/g"), b"lower g");
    set_xattr(lower.join("o"), "trusted.overlay.opaque", b"y");
    let mut seen = Vec::new();
    for who in ["kernel", "layerfs"] {
        let (up, wk) = (s.mkdir(&format!("{who}-up")), s.mkdir(&format!("{who}-wk")));
        let opts = rw_opts(&lower, &up, &wk);
        let mnt = s.path(&format!("{who}-mnt"));
        let look = |mnt: &Path| {
            (
                fs::read(mnt.join("e/f")).map_err(|e| e.raw_os_error()),
                fs::read(mnt.join("o/g")).map_err(|e| e.raw_os_error()),
                listing(&mnt.join("e")),
            )
        };
        let mut got = Vec::new();
        for round in 0..2 {
            let _m = Either::mount(who == "kernel", &opts, &mnt);
            if round == 0 {
                fs::rename(mnt.join("d"), mnt.join("e")).unwrap();
            }
            got.push(look(&mnt));
        }
        seen.push(got);
    }
    let kernel = &seen[0];
    assert_eq!(kernel[1].0, Ok(b"lower f".to_vec()), "kernel after remount");
    assert_eq!(kernel[1].1, Ok(b"lower g".to_vec()), "kernel");
    assert_eq!(
        seen[1], seen[0],
        "layerfs vs kernel (before and after a remount)"
    );
}

#[test]
fn a_rename_over_a_non_empty_directory_copies_up_what_the_kernel_does() {
    // ovl_rename refuses a merged or lower directory target that is not empty before it
    // copies anything up; over a pure-upper target it copies the source up first and the
    // upper filesystem then refuses. Found by the soak (seed 11041): we checked every target
    // first, so the source stayed unmerged where the kernel's was copied up. Between the two
    // the kernel sets the source's redirect, and refuses with EXDEV where it is too long
    // (seed 70177: we answered ENOTEMPTY). The upper filesystem's refusal is its own errno:
    // EEXIST on xfs (soak seed 2250011: we answered ENOTEMPTY there).
    require_fuse!();
    rename_over_non_empty_directories(&Scratch::new(), libc::ENOTEMPTY);
    let s = Scratch::new();
    match Disk::made_with(&s, "xfs", "xfs", &[]) {
        Some(d) => rename_over_non_empty_directories(&Scratch::new_in(&d.mnt), libc::EEXIST),
        None => eprintln!("skipped the xfs half: no loop-mounted xfs here"),
    }
}

/// The renames of `a_rename_over_a_non_empty_directory_copies_up_what_the_kernel_does` in
/// `s`, whose filesystem refuses a directory renamed over a full one with `upper_errno`.
fn rename_over_non_empty_directories(s: &Scratch, upper_errno: i32) {
    let lower = s.mkdir("lower");
    let long = format!("{}/{}", "L".repeat(200), "M".repeat(100));
    fs::create_dir_all(lower.join(&long).join("d")).unwrap();
    fs::create_dir_all(lower.join("b5/a2")).unwrap();
    fs::create_dir_all(lower.join("c/src")).unwrap();
    write(lower.join("f4/keep"), b"x");
    write(lower.join("full/f"), b"x");
    let mut seen = Vec::new();
    for who in ["kernel", "layerfs"] {
        let (up, wk) = (s.mkdir(&format!("{who}-up")), s.mkdir(&format!("{who}-wk")));
        let mnt = s.path(&format!("{who}-mnt"));
        let m = Either::mount(who == "kernel", &rw_opts(&lower, &up, &wk), &mnt);
        // A lower, non-empty target: refused with nothing copied up.
        let lower_target =
            fs::rename(mnt.join("c/src"), mnt.join("full")).map_err(|e| e.raw_os_error());
        let untouched = listing(&up);
        // A pure-upper, non-empty target.
        fs::create_dir_all(mnt.join("f4/a4/b0")).unwrap();
        let upper_target =
            fs::rename(mnt.join("b5/a2"), mnt.join("f4/a4")).map_err(|e| e.raw_os_error());
        let too_long = fs::rename(mnt.join(&long), mnt.join("f4/a4")).map_err(|e| e.raw_os_error());
        let nlink = |p: &str| fs::metadata(mnt.join(p)).unwrap().nlink();
        // The copy-up merged b5/a2 and b5 (nlink 1) without a reply that carries their
        // attributes: layerfs tells the kernel from its invalidation thread, a moment later.
        wait_until(5, || nlink("b5/a2") == 1 && nlink("b5") == 1);
        seen.push((
            lower_target,
            untouched,
            upper_target,
            nlink("b5/a2"),
            nlink("b5"),
            up.join("b5/a2").is_dir(),
            too_long,
        ));
        drop(m);
    }
    let kernel = &seen[0];
    assert_eq!(kernel.0, Err(Some(libc::ENOTEMPTY)), "kernel");
    assert!(
        kernel.1.is_empty(),
        "kernel copies nothing up: {:?}",
        kernel.1
    );
    assert_eq!(kernel.2, Err(Some(upper_errno)), "kernel");
    assert!(kernel.5, "the kernel copied the source up");
    assert_eq!(kernel.6, Err(Some(libc::EXDEV)), "kernel");
    assert_eq!(seen[1], seen[0], "layerfs vs kernel");
}

#[test]
fn a_new_directory_after_a_removed_one_still_held_works() {
    // A removed directory the kernel still holds (a file open through a name inside pins it).
    // Before session 34 layerfs gave up its upper inode, and the upper filesystem handed that
    // number to the next directory. Node ids were inode numbers: the new directory got the
    // old id, the kernel took the reply for its dead inode, and listing the new one failed
    // ENOENT (soak seed 23029). Now layerfs keeps the removed directory's inode while the
    // kernel holds it, as the kernel's overlayfs keeps its upper dentry: the number is not
    // reused, on either. The file is a hard link whose other name is outside, so nothing
    // else pins the removed directory; on a journaled ext4, which reuses a freed number at
    // once (this machine's root ext4 has no journal).
    require_fuse!();
    let s = Scratch::new();
    let lower = s.mkdir("lower");
    write(lower.join("keep"), b"x");
    let Some(disk) = Disk::new(&s, "disk") else {
        return;
    };
    for who in ["kernel", "layerfs"] {
        let (up, wk) = (
            disk.mnt.join(format!("{who}-up")),
            disk.mnt.join(format!("{who}-wk")),
        );
        fs::create_dir_all(&up).unwrap();
        fs::create_dir_all(&wk).unwrap();
        let mnt = s.path(&format!("{who}-mnt"));
        let _m = Either::mount(who == "kernel", &rw_opts(&lower, &up, &wk), &mnt);
        fs::create_dir(mnt.join("p")).unwrap();
        let mut reused = false;
        let mut held_all = Vec::new();
        for round in 0..8 {
            let g = mnt.join(format!("p/g{round}"));
            write(&g, b"");
            let d = mnt.join(format!("p/d{round}"));
            fs::create_dir(&d).unwrap();
            let old = fs::metadata(up.join(format!("p/d{round}"))).unwrap().ino();
            fs::hard_link(&g, d.join("f")).unwrap();
            let held = OpenOptions::new().write(true).open(d.join("f")).unwrap();
            fs::remove_file(d.join("f")).unwrap();
            fs::remove_dir(&d).unwrap();
            let n = mnt.join(format!("p/n{round}"));
            fs::create_dir(&n).unwrap();
            reused |= fs::metadata(up.join(format!("p/n{round}"))).unwrap().ino() == old;
            write(n.join("h"), b"h");
            assert_eq!(listing(&n), vec![os(b"h")], "{who}: round {round}");
            // The held file still works, through its other name too.
            (&held).write_all(b"still").unwrap();
            assert_eq!(fs::read(&g).unwrap(), b"still", "{who}: round {round}");
            held_all.push(held);
        }
        assert!(
            !reused,
            "{who}: a removed directory still held gave up its inode"
        );
    }
}

/// A POSIX ACL xattr value: owner, named user `uid`, group, mask (= the user's), other.
fn acl_value(owner: u16, uid: u32, perm: u16, group: u16, other: u16) -> Vec<u8> {
    let mut v = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in [
        (0x01u16, owner, u32::MAX),
        (0x02, perm, uid),
        (0x04, group, u32::MAX),
        (0x10, perm, u32::MAX),
        (0x20, other, u32::MAX),
    ] {
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&perm.to_le_bytes());
        v.extend_from_slice(&id.to_le_bytes());
    }
    v
}

/// Owner `owner`, user `uid` gets `perm`, group and other nothing.
fn acl_granting(owner: u16, uid: u32, perm: u16) -> Vec<u8> {
    acl_value(owner, uid, perm, 0, 0)
}

#[test]
fn posix_acls_grant_and_revoke_access_as_in_the_kernel() {
    // The kernel checks permissions against POSIX ACLs on overlayfs. With mode bits alone
    // (default_permissions without FUSE_POSIX_ACL) layerfs refused what an ACL grants; now
    // the kernel checks ACLs and caches them, and a new ACL set through the mount applies
    // at once.
    require_fuse!();
    let s = Scratch::new();
    fs::set_permissions(s.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let lower = s.mkdir("lower");
    write(lower.join("secret"), b"for 65534\n");
    chmod(lower.join("secret"), 0o600);
    set_xattr(
        lower.join("secret"),
        "system.posix_acl_access",
        &acl_granting(6, 65534, 4),
    );
    fs::create_dir(lower.join("drop")).unwrap();
    chmod(lower.join("drop"), 0o700);
    set_xattr(
        lower.join("drop"),
        "system.posix_acl_access",
        &acl_granting(7, 65534, 7),
    );
    // New objects under a default ACL take it instead of the umask, made in place or over a
    // whiteout (built in the work dir).
    write(lower.join("dd/w"), b"w");
    fs::create_dir(lower.join("dd/wd")).unwrap();
    set_xattr(
        lower.join("dd"),
        "system.posix_acl_default",
        &acl_value(7, 65534, 7, 5, 5),
    );
    let made = [
        "f", "d", "dd/f", "dd/d", "dd/w", "dd/wd", "dd/d/f", "setid", "dd/setid",
    ];
    let mut seen = Vec::new();
    for who in ["kernel", "layerfs", "noacl"] {
        let (up, wk) = (s.mkdir(&format!("{who}-up")), s.mkdir(&format!("{who}-wk")));
        let mnt = s.path(&format!("{who}-mnt"));
        let o = rw_opts(&lower, &up, &wk) + if who == "noacl" { ",noacl" } else { "" };
        let _m = Either::mount(who == "kernel", &o, &mnt);
        chmod(&mnt, 0o755);
        let secret = mnt.join("secret");
        let read = || as_nobody(&format!("cat '{}' >/dev/null", secret.display())).0;
        let mut got = vec![read()];
        got.push(as_nobody(&format!("echo x > '{}/drop/new'", mnt.display())).0);
        // Revoke through the mount: the cached ACL must not keep granting.
        set_xattr(
            &secret,
            "system.posix_acl_access",
            &acl_granting(6, 65534, 0),
        );
        got.push(read());
        set_xattr(
            &secret,
            "system.posix_acl_access",
            &acl_granting(6, 65534, 4),
        );
        got.push(read());
        // chmod rewrites the ACL's mask: group (the mask) to nothing revokes the grant.
        chmod(&secret, 0o600);
        got.push(read());
        let (ok, _, err) = run_timeout(
            std::process::Command::new("sh").current_dir(&mnt).args([
                "-c",
                "umask 027 && touch f dd/f && mkdir d dd/d && touch dd/d/f && rm dd/w && \
                 touch dd/w && rmdir dd/wd && mkdir dd/wd && \
                 install -m 6777 /dev/null setid && install -m 6777 /dev/null dd/setid",
            ]),
            10,
        );
        assert!(ok, "{who}: {err}");
        let made: Vec<_> = made
            .iter()
            .map(|p| {
                let q = mnt.join(p);
                (
                    fs::symlink_metadata(&q).unwrap().mode(),
                    get_xattr(&q, "system.posix_acl_access"),
                    get_xattr(&q, "system.posix_acl_default"),
                )
            })
            .collect();
        seen.push((
            got,
            get_xattr(&secret, "system.posix_acl_access"),
            fs::metadata(&secret).unwrap().mode(),
            made,
        ));
    }
    assert_eq!(seen[0].0, vec![true, true, false, true, false], "kernel");
    assert_eq!(seen[1], seen[0], "layerfs vs kernel");
    // `noacl`: mode bits only (the ACL is still stored and shown).
    assert_eq!(seen[2].0, vec![false; 5], "noacl");
    assert_eq!(seen[2].1, seen[0].1, "noacl");
}

#[test]
fn a_lower_directory_cannot_move_in_the_userxattr_format_and_nothing_is_copied_up() {
    // Without redirects (userxattr, as rootless) a directory with lower layers cannot move:
    // the kernel refuses with EXDEV (`mv` then copies) before it copies anything up, after
    // the VFS's own checks. We copied the source and its parents up first.
    require_fuse!();
    let s = Scratch::new();
    let lower = s.mkdir("lower");
    write(lower.join("a/b/dir/f"), b"x");
    fs::create_dir_all(lower.join("a/c")).unwrap();
    write(lower.join("a/file"), b"y");
    let mut seen = Vec::new();
    for who in ["kernel", "layerfs"] {
        let (up, wk) = (s.mkdir(&format!("{who}-up")), s.mkdir(&format!("{who}-wk")));
        let mnt = s.path(&format!("{who}-mnt"));
        let opts = format!("{},userxattr", rw_opts(&lower, &up, &wk));
        let _m: Box<dyn std::any::Any> = if who == "kernel" {
            Box::new(Kernel::mount(&opts, &mnt))
        } else {
            Box::new(Layerfs::mount(&opts, &mnt))
        };
        let mv =
            |a: &str, b: &str| fs::rename(mnt.join(a), mnt.join(b)).map_err(|e| e.raw_os_error());
        let got = (
            mv("a/b/dir", "a/x"),
            mv("a/b/dir", "a/file"),
            mv("a/b/dir", "a/c"),
            tree_of(&up),
            fs::metadata(mnt.join("a/b")).unwrap().nlink(),
            mv("a/file", "a/b/f2"),
        );
        seen.push(got);
    }
    assert_eq!(seen[0].0, Err(Some(libc::EXDEV)), "kernel");
    assert!(seen[0].3.is_empty(), "the kernel copies nothing up");
    assert_eq!(seen[1], seen[0], "layerfs vs kernel");
}

#[test]
fn creating_over_a_whiteout_no_lower_layer_needs_matches_kernel() {
    // A whiteout left in the upper for a name no lower layer holds (its lower layer was
    // dropped from the stack, or the kernel wrote it): a create there goes straight to
    // O_EXCL, which finds the marker taken, and must then replace it as any whiteout; a real
    // upper object stays EEXIST.
    require_fuse!();
    let s = Scratch::new();
    let lower = s.mkdir("lower");
    write(lower.join("keep"), b"x");
    let mut seen = Vec::new();
    for who in ["kernel", "layerfs"] {
        let (up, wk) = (s.mkdir(&format!("{who}-up")), s.mkdir(&format!("{who}-wk")));
        for n in ["wf", "wd", "wl"] {
            whiteout(up.join(n));
        }
        write(up.join("there"), b"upper");
        let mnt = s.path(&format!("{who}-mnt"));
        let m = Either::mount(who == "kernel", &rw_opts(&lower, &up, &wk), &mnt);
        let before = listing(&mnt);
        let excl = |p: &str| {
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(mnt.join(p))
                .map(drop)
                .map_err(|e| e.raw_os_error())
        };
        let file = excl("wf");
        fs::write(mnt.join("wf"), b"new").unwrap();
        let dir = fs::create_dir(mnt.join("wd")).map_err(|e| e.raw_os_error());
        let link = symlink("keep", mnt.join("wl")).map_err(|e| e.raw_os_error());
        let taken = excl("there");
        let taken_dir = fs::create_dir(mnt.join("there")).map_err(|e| e.raw_os_error());
        seen.push((
            before,
            file,
            dir,
            link,
            taken,
            taken_dir,
            listing(&mnt),
            fs::read(mnt.join("wf")).unwrap(),
            listing(&mnt.join("wd")),
            fs::read_link(mnt.join("wl")).unwrap(),
            fs::read(mnt.join("there")).unwrap(),
        ));
        drop(m);
        // On disk: the markers are gone, replaced by the new objects.
        assert!(up.join("wf").is_file(), "{who}");
        assert!(up.join("wd").is_dir(), "{who}");
        assert!(up.join("wl").is_symlink(), "{who}");
    }
    let kernel = &seen[0];
    assert_eq!(kernel.1, Ok(()), "kernel");
    assert_eq!(kernel.4, Err(Some(libc::EEXIST)), "kernel");
    assert_eq!(seen[1], seen[0], "layerfs vs kernel");
}

/// Inode flags (FS_*_FL) the file-attribute tests set and read.
const SYNC: u32 = 0x8;
const IMMUTABLE: u32 = 0x10;
const APPEND: u32 = 0x20;
const NODUMP: u32 = 0x40;
const NOATIME: u32 = 0x80;

/// FS_IOC_GETFLAGS / FS_IOC_SETFLAGS (lsattr, chattr) of `p`.
fn get_flags(p: &Path) -> Result<u32, i32> {
    let f = fs::File::open(p).map_err(|e| e.raw_os_error().unwrap_or(-1))?;
    let mut b = [0u8; 4];
    sys::fileattr_ioctl(f.as_fd(), libc::FS_IOC_GETFLAGS as u32, &mut b)
        .map_err(|e| e.raw_os_error().unwrap_or(-1))?;
    Ok(u32::from_ne_bytes(b))
}

fn set_flags(p: &Path, flags: u32) -> Result<(), i32> {
    let f = fs::File::open(p).map_err(|e| e.raw_os_error().unwrap_or(-1))?;
    let mut b = flags.to_ne_bytes();
    sys::fileattr_ioctl(f.as_fd(), libc::FS_IOC_SETFLAGS as u32, &mut b)
        .map_err(|e| e.raw_os_error().unwrap_or(-1))
}

/// lsattr/chattr as the kernel's overlayfs serves them: read from the real object, set on a
/// copy-up (a lower file's or directory's). Immutable and append-only show (from the
/// kernel's `overlay.protattr` too) but cannot be set: FUSE cannot make the VFS enforce them.
#[test]
fn file_attributes_are_read_and_set_as_in_the_kernel() {
    require_fuse!();
    let mut p = Pair::new(|s| {
        let v = stack(s);
        // Where the scratch filesystem has no attributes, both mounts say so alike.
        let _ = set_flags(
            &v[1].join("a"),
            get_flags(&v[1].join("a")).unwrap_or(0) | NODUMP,
        );
        v
    });
    p.same("lower file and directory", |m| {
        (get_flags(&m.join("a")), get_flags(&m.join("d")))
    });
    p.same("set on a lower file: copied up", |m| {
        let r = get_flags(&m.join("a")).and_then(|f| set_flags(&m.join("a"), f | NOATIME));
        (r, get_flags(&m.join("a")))
    });
    p.same("set on a lower directory", |m| {
        let r = get_flags(&m.join("d")).and_then(|f| set_flags(&m.join("d"), f | SYNC));
        (r, get_flags(&m.join("d")))
    });
    if get_flags(&p.upper().join("a")).is_ok_and(|f| f & NOATIME != 0) {
        // The flag is on the upper copy itself, as in the kernel's upper.
        let k = get_flags(&p.scratch_root().join("ku/a")).unwrap();
        assert_eq!(get_flags(&p.upper().join("a")), Ok(k));
        let f = get_flags(&p.lmnt().join("meta")).unwrap();
        assert_eq!(
            set_flags(&p.lmnt().join("meta"), f | IMMUTABLE),
            Err(libc::EPERM)
        );
        assert_eq!(get_flags(&p.lmnt().join("meta")), Ok(f), "nothing changed");
        // The kernel's record of an immutable upper file shows.
        set_xattr(p.upper().join("a"), "trusted.overlay.protattr", b"i");
        let shown = get_flags(&p.lmnt().join("a")).unwrap();
        assert_eq!(shown & IMMUTABLE, IMMUTABLE, "{shown:#x}");
        let r = sys::removexattr(
            sys::XTarget::At(
                sys::open_dir_path(&p.upper()).unwrap().as_fd(),
                "a".as_ref(),
            ),
            c"trusted.overlay.protattr",
        );
        r.unwrap();
    } else {
        eprintln!("file attributes: the scratch filesystem keeps none; compared errors only");
    }
    p.check("after chattr");
    p.check_interop();
}

/// A copy-up carries the source's sync and noatime flags onto the copy, and its append-only
/// and immutable ones into `overlay.protattr` (ovl_copy_fileattr), for files and
/// directories: lsattr shows the same on both mounts, after a remount too, and both uppers
/// hold the same. Before session 37 layerfs's copies lost them all.
#[test]
fn copy_up_carries_file_attributes_as_the_kernel_does() {
    require_fuse!();
    /// Clears the lower directory's append-only flag at the end, or it could not be removed.
    struct Unprotect(std::path::PathBuf);
    impl Drop for Unprotect {
        fn drop(&mut self) {
            let _ = get_flags(&self.0).and_then(|f| set_flags(&self.0, f & !APPEND));
        }
    }
    let mut guard = None;
    let mut p = Pair::new(|s| {
        let low = s.mkdir("low");
        write(low.join("f"), b"f");
        write(low.join("d/g"), b"g");
        write(low.join("ad/h"), b"h");
        let flag = |p: &Path, f: u32| get_flags(p).and_then(|old| set_flags(p, old | f));
        let set = [
            flag(&low.join("f"), NOATIME),
            flag(&low.join("d"), SYNC),
            flag(&low.join("d/g"), NOATIME | SYNC),
            flag(&low.join("ad"), APPEND),
        ];
        guard = Some(Unprotect(low.join("ad")));
        assert_eq!(set, [Ok(()); 4], "chattr on the scratch filesystem");
        vec![low]
    });
    let _guard = guard;
    let flags = |m: &Path| {
        ["f", "d", "d/g", "ad", "ad/new"].map(|n| {
            (
                n,
                get_flags(&m.join(n)).map(|f| f & (SYNC | APPEND | NOATIME)),
            )
        })
    };
    p.same("copy-ups of flagged files and directories", |m| {
        chmod(m.join("f"), 0o600);
        chmod(m.join("d/g"), 0o600);
        // Creating in an append-only directory is allowed: it copies the directory up.
        write(m.join("ad/new"), b"new");
        flags(m)
    });
    let on_disk = |up: &Path| {
        let prot = get_xattr(up.join("ad"), "trusted.overlay.protattr");
        (flags(up), prot)
    };
    let kernel = on_disk(&p.scratch_root().join("ku"));
    assert_eq!(
        kernel.1.as_deref(),
        Some(&b"a"[..]),
        "the kernel's protattr"
    );
    assert_eq!(
        on_disk(&p.upper()),
        kernel,
        "layerfs's upper against the kernel's"
    );
    p.check("after the copy-ups");
    p.remount_both(false, false);
    p.same("after a remount", flags);
    p.check_interop();
}

/// A file moved back and forth answers every request on it as itself throughout: never as
/// the whiteout its old name is for a moment, nor as missing. The engine, driven from two
/// threads (getattr and open race each rename).
#[test]
fn a_file_being_renamed_answers_as_itself() {
    use std::ffi::OsStr;
    use std::sync::atomic::{AtomicBool, Ordering};
    let s = Scratch::new();
    let low = s.mkdir("low");
    write(low.join("f"), b"lower data");
    let (u, _up) = engine(&s, low);
    let f = u.lookup(1, OsStr::new("f")).unwrap();
    let done = AtomicBool::new(false);
    let mut wrong = Vec::new();
    std::thread::scope(|t| {
        t.spawn(|| {
            for _ in 0..2000 {
                u.rename(1, OsStr::new("f"), 1, OsStr::new("g"), 0).unwrap();
                u.rename(1, OsStr::new("g"), 1, OsStr::new("f"), 0).unwrap();
            }
            done.store(true, Ordering::Relaxed);
        });
        while !done.load(Ordering::Relaxed) {
            match u.getattr(f.id) {
                Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFREG && st.st_size == 10 => {}
                Ok(st) => wrong.push(format!("mode {:o} size {}", st.st_mode, st.st_size)),
                Err(e) => wrong.push(format!("getattr: {e:?}")),
            }
            match u.open(f.id, libc::O_RDONLY) {
                Ok(fh) => u.release(fh),
                Err(e) => wrong.push(format!("open: {e:?}")),
            }
        }
    });
    wrong.dedup();
    assert_eq!(wrong, Vec::<String>::new(), "requests while the file moved");
}

/// A directory being renamed answers as itself, and so do the directories in it, when their
/// fds are opened by name meanwhile (the fd cache shed, as when the daemon runs out of
/// descriptors, or a FORGET of a node served as a lookup of its directory made a new one).
/// Before, a getattr read the old name, the rename moved it, and the open of that name
/// answered ENOENT (engine fuzz `races`, seed 250010) or reached the directory renamed
/// into its place.
#[test]
fn a_directory_being_renamed_answers_as_itself() {
    use layerfs::union::write::NewObj;
    use std::ffi::OsStr;
    use std::sync::atomic::{AtomicBool, Ordering};
    let s = Scratch::new();
    let low = s.mkdir("low");
    fs::create_dir_all(low.join("d/sub")).unwrap();
    write(low.join("d/sub/f"), b"in sub");
    let (u, _up) = engine(&s, low);
    let (d, e, o) = (OsStr::new("d"), OsStr::new("e"), OsStr::new("o"));
    let dn = u.lookup(1, d).unwrap();
    let sub = u.lookup(dn.id, OsStr::new("sub")).unwrap();
    // Another directory takes the name in turn: a getattr by a stale name would reach it.
    let (on, _) = u
        .create_obj(1, o, NewObj::Dir { mode: 0o700 }, root_caller())
        .unwrap();
    let done = AtomicBool::new(false);
    let mut wrong = Vec::new();
    std::thread::scope(|t| {
        t.spawn(|| {
            for _ in 0..1500 {
                u.rename(1, d, 1, e, 0).unwrap();
                u.rename(1, o, 1, d, 0).unwrap();
                u.rename(1, d, 1, o, 0).unwrap();
                u.rename(1, e, 1, d, 0).unwrap();
            }
            done.store(true, Ordering::Relaxed);
        });
        while !done.load(Ordering::Relaxed) {
            for (what, id, want) in [("d", dn.id, dn.attr), ("d/sub", sub.id, sub.attr)] {
                u.shed_fd_cache();
                match u.getattr(id) {
                    Ok(st) if (st.st_ino, st.st_mode) == (want.st_ino, want.st_mode) => {}
                    Ok(st) => {
                        wrong.push(format!("{what}: ino {} mode {:o}", st.st_ino, st.st_mode))
                    }
                    Err(e) => wrong.push(format!("{what}: getattr: {e:?}")),
                }
            }
            u.shed_fd_cache();
            if let Err(e) = u.lookup(sub.id, OsStr::new("f")).map(|f| u.forget(f.id, 1)) {
                wrong.push(format!("d/sub/f: lookup: {e:?}"));
            }
        }
    });
    let _ = on;
    wrong.sort();
    wrong.dedup();
    assert_eq!(
        wrong,
        Vec::<String>::new(),
        "requests while the directory moved"
    );
}

/// A lookup whose resolve ran before a copy-up of the same file landed, by a node the
/// kernel forgot before the lookup registered its own, takes the copy, not the lower file:
/// an unlink of the name must whiteout the copy (before, its whiteout met the copy: EEXIST;
/// engine fuzz `races`, seeds 158494, 211237, 240111, 280851), and a read must see what the
/// change made. Three threads race per file: one copies it up (chmod), two look it up and
/// unlink it.
#[test]
fn a_lookup_racing_a_copy_up_by_a_forgotten_node_sees_the_copy() {
    use layerfs::union::write::SetAttr;
    use std::ffi::OsString;
    const FILES: usize = 3000;
    let s = Scratch::new();
    let low = s.mkdir("low");
    for i in 0..FILES {
        write(low.join(format!("f{i}")), b"lower");
    }
    let (u, _up) = engine(&s, low);
    let name = |i: usize| OsString::from(format!("f{i}"));
    let wrong = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|t| {
        t.spawn(|| {
            for i in 0..FILES {
                if let Ok(e) = u.lookup(1, &name(i)) {
                    let mode = Some(0o600);
                    let _ = u.setattr(
                        e.id,
                        SetAttr {
                            mode,
                            ..Default::default()
                        },
                    );
                    u.forget(e.id, 1);
                }
            }
        });
        for _ in 0..2 {
            t.spawn(|| {
                for i in 0..FILES {
                    let Ok(e) = u.lookup(1, &name(i)) else {
                        continue;
                    };
                    match u.unlink(1, &name(i)) {
                        Ok(()) => {}
                        Err(x) if x.errno() == libc::ENOENT => {}
                        Err(x) => wrong.lock().unwrap().push(format!("f{i}: unlink: {x:?}")),
                    }
                    u.forget(e.id, 1);
                }
            });
        }
    });
    let wrong = wrong.into_inner().unwrap();
    assert_eq!(wrong, Vec::<String>::new(), "unlinks racing copy-ups");
    // Every file is gone from the union.
    let left: Vec<_> = (0..FILES)
        .filter(|&i| u.lookup(1, &name(i)).is_ok())
        .collect();
    assert_eq!(left, Vec::<usize>::new(), "files the unlinks left");
}

/// A file replaced by a rename answers every request on it as itself until it goes: never
/// with what took its name. The engine, driven from two threads: one puts a symlink, then a
/// file, over a name; the other looks the name up and asks what it found.
#[test]
fn a_file_being_replaced_answers_as_itself() {
    use layerfs::union::write::{NewObj, SetAttr};
    use std::ffi::OsStr;
    use std::sync::atomic::{AtomicBool, Ordering};
    let s = Scratch::new();
    let low = s.mkdir("low");
    write(low.join("f"), b"lower data");
    let (u, _up) = engine(&s, low);
    let c = root_caller();
    let (f, t) = (OsStr::new("f"), OsStr::new("t"));
    // The lower file, once replaced, cannot be copied up to its name (EEXIST, as the kernel).
    let lower = u.lookup(1, f).unwrap();
    let done = AtomicBool::new(false);
    let mut wrong = Vec::new();
    std::thread::scope(|th| {
        th.spawn(|| {
            for i in 0..3000 {
                let obj = match i % 2 {
                    0 => NewObj::Symlink {
                        target: OsStr::new("x"),
                    },
                    _ => NewObj::File {
                        mode: 0o644,
                        flags: libc::O_WRONLY,
                    },
                };
                let (e, _fd) = u.create_obj(1, t, obj, c).unwrap();
                u.forget(e.id, 1);
                u.rename(1, t, 1, f, 0).unwrap();
            }
            done.store(true, Ordering::Relaxed);
        });
        while !done.load(Ordering::Relaxed) {
            let e = u.lookup(1, f).unwrap();
            let kind = e.attr.st_mode & libc::S_IFMT;
            for _ in 0..3 {
                match u.getattr(e.id) {
                    Ok(st) if st.st_mode & libc::S_IFMT == kind => {}
                    Ok(st) => wrong.push(format!("getattr: mode {:o} for {kind:o}", st.st_mode)),
                    Err(e) => wrong.push(format!("getattr: {e:?}")),
                }
                let link = u.readlink(e.id);
                match (kind, link) {
                    (libc::S_IFLNK, Ok(l)) if l == "x" => {}
                    (libc::S_IFREG, Err(e)) if e.errno() == libc::EINVAL => {}
                    (_, l) => wrong.push(format!("readlink of {kind:o}: {l:?}")),
                }
                if kind == libc::S_IFREG {
                    let a = SetAttr {
                        mode: Some(0o600),
                        ..Default::default()
                    };
                    match u.setattr(e.id, a) {
                        Ok(st) if st.st_mode & libc::S_IFMT == kind => {}
                        Err(x) if x.errno() == libc::EEXIST && lower.id == e.id => {}
                        r => wrong.push(format!("setattr: {r:?}")),
                    }
                }
            }
            u.forget(e.id, 1);
        }
    });
    wrong.sort();
    wrong.dedup();
    assert_eq!(
        wrong,
        Vec::<String>::new(),
        "requests while the file was replaced"
    );
}

/// A directory removed while a process still holds it (its working directory) takes no new
/// names and lists none (ENOENT, as the kernel's IS_DEADDIR), even once a new directory has
/// its name: a create in it went by the old name into the new directory.
#[test]
fn a_removed_directory_still_held_takes_no_names_not_even_its_successors() {
    use layerfs::union::write::NewObj;
    use std::ffi::OsStr;
    let s = Scratch::new();
    let low = s.mkdir("low");
    write(low.join("keep"), b"x");
    let (u, up) = engine(&s, low);
    let c = root_caller();
    let d = OsStr::new("d");
    let dir = || NewObj::Dir { mode: 0o755 };
    let (old, _) = u.create_obj(1, d, dir(), c).unwrap();
    u.rmdir(1, d).unwrap();
    let (new, _) = u.create_obj(1, d, dir(), c).unwrap();
    let errno = |r: layerfs::error::Result<()>| r.err().map(|e| e.errno());
    let x = OsStr::new("x");
    let made = u
        .create(old.id, x, 0o644, libc::O_WRONLY, c)
        .map(|(e, fh)| {
            u.release(fh);
            u.forget(e.id, 1);
        });
    assert_eq!(errno(made), Some(libc::ENOENT), "create in the removed dir");
    let mkdir = u.create_obj(old.id, x, dir(), c).map(|_| ());
    assert_eq!(errno(mkdir), Some(libc::ENOENT), "mkdir in the removed dir");
    assert_eq!(errno(u.lookup(old.id, d).map(|_| ())), Some(libc::ENOENT));
    assert_eq!(errno(u.readdir(old.id, 0).map(|_| ())), Some(libc::ENOENT));
    assert_eq!(errno(u.unlink(old.id, x)), Some(libc::ENOENT));
    assert!(
        fs::read_dir(up.join("d")).unwrap().next().is_none(),
        "the new directory stays empty"
    );
    let listed = u.readdir(new.id, 0).unwrap();
    assert_eq!(listed.len(), 2, "the new directory lists . and .. only");
}

/// An unlink of a lower file that is being copied up meanwhile (a chmod through another
/// request) removes it: it never meets the copy landing under the whiteout it makes
/// (EEXIST). The engine, driven from two threads over 2,000 lower files.
#[test]
fn an_unlink_racing_the_copy_up_of_its_file_removes_it() {
    use layerfs::union::write::SetAttr;
    use std::ffi::OsString;
    let s = Scratch::new();
    let low = s.mkdir("low");
    let names: Vec<OsString> = (0..2000).map(|i| OsString::from(format!("f{i}"))).collect();
    for n in &names {
        write(low.join(n), b"lower");
    }
    let (u, up) = engine(&s, low);
    let ids: Vec<u64> = names.iter().map(|n| u.lookup(1, n).unwrap().id).collect();
    let mut wrong = Vec::new();
    // Both threads start on each file together.
    let both = std::sync::Barrier::new(2);
    std::thread::scope(|t| {
        t.spawn(|| {
            for id in &ids {
                both.wait();
                let a = SetAttr {
                    mode: Some(0o600),
                    ..Default::default()
                };
                // (A lower file whose name went first: the kernel's EEXIST.)
                if let Err(e) = u.setattr(*id, a)
                    && e.errno() != libc::EEXIST
                {
                    panic!("chmod: {e:?}");
                }
            }
        });
        for n in &names {
            both.wait();
            if let Err(e) = u.unlink(1, n) {
                wrong.push(format!("unlink {n:?}: {e:?}"));
            }
        }
    });
    assert_eq!(wrong, Vec::<String>::new(), "unlinks racing copy-ups");
    let left: Vec<_> = names.iter().filter(|n| u.lookup(1, n).is_ok()).collect();
    assert!(left.is_empty(), "names left after their unlink: {left:?}");
    assert!(
        up.join("f0").symlink_metadata().is_ok(),
        "whiteouts in the upper"
    );
}

/// A directory removed while a process holds it answers as itself, as the kernel's overlayfs
/// answers through the real directory its inode keeps: an upper one with link count 0 (a
/// merged one with 1), a lower one with its lower attributes; changes land on an upper or
/// merged one. Before session 34 layerfs answered ENOENT to all of it. One difference: a
/// change to a removed lower directory answers ENOENT. The kernel copies it up to its old
/// name: over the whiteout an rmdir left there (ENOTDIR), or over the empty directory a
/// rename put there, which it replaces on disk (the new directory is lost: a kernel bug).
#[test]
fn a_removed_directory_still_held_answers_as_itself_as_in_the_kernel() {
    require_fuse!();
    use std::ffi::CString;
    let s = Scratch::new();
    let lower = s.mkdir("lower");
    s.mkdir("lower/lo");
    s.mkdir("lower/lr");
    write(lower.join("me/f"), b"x");
    let mut seen = Vec::new();
    for who in ["kernel", "layerfs"] {
        let (up, wk) = (s.mkdir(&format!("{who}-up")), s.mkdir(&format!("{who}-wk")));
        s.mkdir(&format!("{who}-up/up"));
        s.mkdir(&format!("{who}-up/rn"));
        let opts = rw_opts(&lower, &up, &wk);
        let mnt = s.path(&format!("{who}-mnt"));
        let _m = Either::mount(who == "kernel", &opts, &mnt);
        write(mnt.join("me/g"), b"y");
        let mut got = Vec::new();
        // Removed by rmdir, or (`rn`, `lr`) replaced by a rename of another directory.
        for d in ["up", "lo", "me", "rn", "lr"] {
            let dir = fs::File::open(mnt.join(d)).unwrap();
            let before = dir.metadata().unwrap().ino();
            for e in fs::read_dir(mnt.join(d)).unwrap() {
                fs::remove_file(e.unwrap().path()).unwrap();
            }
            if d == "rn" || d == "lr" {
                fs::create_dir(mnt.join("new")).unwrap();
                fs::rename(mnt.join("new"), mnt.join(d)).unwrap();
            } else {
                fs::remove_dir(mnt.join(d)).unwrap();
            }
            let st = |f: &fs::File| {
                f.metadata()
                    .map(|m| (m.ino() == before, m.nlink(), m.mode(), m.is_dir()))
                    .map_err(|e| e.raw_os_error())
            };
            let x = sys::XTarget::Fd(dir.as_fd());
            let name = CString::new("user.a").unwrap();
            got.push((
                d,
                st(&dir),
                dir.set_permissions(fs::Permissions::from_mode(0o700))
                    .map_err(|e| e.raw_os_error()),
                st(&dir),
                sys::setxattr(x, &name, b"1", 0).map_err(|e| e.raw_os_error()),
                sys::getxattr(x, &name).map_err(|e| e.raw_os_error()),
            ));
        }
        seen.push(got);
    }
    let kernel = &seen[0];
    let ours = &seen[1];
    for (k, o) in kernel.iter().zip(ours) {
        let (d, ..) = k;
        if *d == "lr" {
            // The kernel replaces the directory the rename put there (a kernel bug).
            assert_eq!(
                k.1, o.1,
                "attributes of removed lower dir {d} (kernel vs layerfs)"
            );
            assert_eq!(
                o.2,
                Err(Some(libc::ENOENT)),
                "layerfs: chmod of removed lower dir"
            );
            assert_eq!(o.3, o.1, "layerfs: removed lower dir {d} unchanged");
        } else {
            assert_eq!(k, o, "removed dir {d} (kernel vs layerfs)");
        }
    }
    // What the kernel answers, so the comparison means something.
    assert_eq!(
        kernel[0].1,
        Ok((true, 0, 0o40755, true)),
        "kernel: removed upper dir"
    );
    assert_eq!(
        kernel[1].1,
        Ok((true, 2, 0o40755, true)),
        "kernel: removed lower dir"
    );
    assert_eq!(
        kernel[2].1,
        Ok((true, 1, 0o40755, true)),
        "kernel: removed merged dir"
    );
    assert_eq!(
        kernel[2].3,
        Ok((true, 1, 0o40700, true)),
        "kernel: chmod of it"
    );
    assert_eq!(
        kernel[1].2,
        Err(Some(libc::ENOTDIR)),
        "kernel: chmod of removed lower dir"
    );
    assert_eq!(
        kernel[1].4,
        Err(Some(libc::ENOTDIR)),
        "kernel: setxattr of removed lower dir"
    );
    assert_eq!(
        kernel[3].1,
        Ok((true, 0, 0o40755, true)),
        "kernel: replaced upper dir"
    );
}
