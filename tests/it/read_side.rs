//! The read side through real mounts, with kernel overlayfs as the oracle.

use std::ffi::OsStr;
use std::os::fd::AsFd;
use std::os::unix::fs::{DirEntryExt, MetadataExt, symlink};
use std::path::PathBuf;

use layerfs::sys;

use crate::pair::{Pair, outcome};
use crate::require_fuse;
use crate::support::*;

/// Three lower layers exercising every kernel-readable feature of the read side.
fn build_stack(s: &Scratch) -> Vec<PathBuf> {
    let l1 = s.mkdir("l1"); // top
    let l2 = s.mkdir("l2");
    let l3 = s.mkdir("l3"); // bottom
    // Shadowing: the top copy wins.
    write(l3.join("shadow"), b"bottom");
    write(l2.join("shadow"), b"middle");
    write(l1.join("shadow"), b"top");
    // A directory merged across three layers.
    write(l3.join("m/from3"), b"3");
    write(l2.join("m/from2"), b"2");
    write(l1.join("m/from1"), b"1");
    write(l3.join("m/deep/x"), b"deep");
    chmod(l1.join("m"), 0o750);
    // Whiteout (kernel format) hides a lower file and a lower dir.
    write(l3.join("gone"), b"hidden");
    whiteout(l2.join("gone"));
    write(l3.join("gonedir/f"), b"hidden");
    whiteout(l1.join("gonedir"));
    // Opaque dir (trusted xattr) stops the merge.
    write(l3.join("opq/old"), b"old");
    write(l2.join("opq/new"), b"new");
    set_xattr(l2.join("opq"), "trusted.overlay.opaque", b"y");
    // A file replaces a lower dir; a dir replaces a lower file.
    write(l3.join("was_dir/f"), b"x");
    write(l2.join("was_dir"), b"now a file");
    write(l3.join("was_file"), b"file");
    write(l2.join("was_file/inner"), b"now a dir");
    // Symlinks: relative, absolute, dangling, pointing out of the layer, a loop.
    symlink("shadow", l1.join("rel")).unwrap();
    symlink("/etc/hostname", l1.join("abs")).unwrap();
    symlink("nowhere/at/all", l2.join("dangling")).unwrap();
    symlink("../../../../../../etc", l2.join("escape")).unwrap();
    symlink("loop2", l3.join("loop1")).unwrap();
    symlink("loop1", l3.join("loop2")).unwrap();
    // Hard links inside one layer.
    write(l3.join("h/one"), b"linked");
    std::fs::hard_link(l3.join("h/one"), l3.join("h/two")).unwrap();
    // FIFO and odd names.
    mkfifo(l2.join("fifo"));
    write(l3.join(os(&[b'n'; 255])), b"long name");
    write(l3.join("with space"), b"s");
    write(l3.join("new\nline"), b"nl");
    write(l3.join(os(b"bad\xffutf8")), b"raw");
    // user xattrs are visible; overlay's own are not.
    write(l2.join("xa"), b"x");
    set_xattr(l2.join("xa"), "user.color", b"blue");
    vec![l1, l2, l3]
}

#[test]
fn read_side_matches_kernel_overlayfs() {
    require_fuse!();
    let s = Scratch::new();
    let lowers = build_stack(&s);
    let k = Kernel::mount(&format!("lowerdir={}", lowerdir(&lowers)), &s.path("kmnt"));
    let l = Layerfs::mount(&format!("lowerdir={}", lowerdir(&lowers)), &s.path("lmnt"));
    let kt = snapshot(&k.mnt);
    let lt = snapshot(&l.mnt);
    assert!(
        kt.contains_key(b"m/deep/x".as_slice()),
        "fixture sanity: {:?}",
        names(&kt)
    );
    assert_same_tree("layerfs vs kernel", &kt, &lt);
    // Spot checks of what the comparison covers.
    assert_eq!(std::fs::read(l.mnt.join("shadow")).unwrap(), b"top");
    assert!(!l.mnt.join("gone").exists());
    assert!(!lt.contains_key(b"opq/old".as_slice()));
    assert_eq!(lt[b"h/one".as_slice()].nlink, 2);
}

#[test]
fn stat_of_directories_matches_kernel() {
    require_fuse!();
    let s = Scratch::new();
    let lowers = build_stack(&s);
    let k = Kernel::mount(&format!("lowerdir={}", lowerdir(&lowers)), &s.path("kmnt"));
    let l = Layerfs::mount(&format!("lowerdir={}", lowerdir(&lowers)), &s.path("lmnt"));
    for d in ["", "m", "m/deep", "opq", "h", "was_file"] {
        let km = std::fs::metadata(k.mnt.join(d)).unwrap();
        let lm = std::fs::metadata(l.mnt.join(d)).unwrap();
        assert_eq!(
            (
                km.mode(),
                km.uid(),
                km.gid(),
                km.nlink(),
                km.mtime(),
                km.mtime_nsec()
            ),
            (
                lm.mode(),
                lm.uid(),
                lm.gid(),
                lm.nlink(),
                lm.mtime(),
                lm.mtime_nsec()
            ),
            "stat of dir {d:?}"
        );
    }
}

#[test]
fn oci_whiteouts_and_every_opaque_format_are_read() {
    require_fuse!();
    let s = Scratch::new();
    let top = s.mkdir("top");
    let bot = s.mkdir("bot");
    for d in ["oci", "tr", "us", "fo"] {
        write(bot.join(d).join("old"), b"old");
        write(top.join(d).join("new"), b"new");
    }
    write(top.join("oci/.wh..wh..opq"), b"");
    set_xattr(top.join("tr"), "trusted.overlay.opaque", b"y");
    set_xattr(top.join("us"), "user.overlay.opaque", b"y");
    set_xattr(top.join("fo"), "user.fuseoverlayfs.opaque", b"y");
    write(bot.join("deleted"), b"x");
    write(top.join(".wh.deleted"), b"");
    write(bot.join("kept"), b"k");
    // A whiteout in a layer hides only the layers below it.
    write(top.join("same"), b"same layer");
    write(top.join(".wh.same"), b"");
    let l = Layerfs::mount(
        &format!("lowerdir={}", lowerdir(&[top, bot])),
        &s.path("mnt"),
    );
    let got = names(&snapshot(&l.mnt));
    let want = [
        "fo", "fo/new", "kept", "oci", "oci/new", "same", "tr", "tr/new", "us", "us/new",
    ];
    assert_eq!(got, want);
    // Looked up by name, not only left out of listings.
    assert!(std::fs::symlink_metadata(l.mnt.join("deleted")).is_err());
    assert_eq!(std::fs::read(l.mnt.join("same")).unwrap(), b"same layer");
    // Markers never show, not even by name.
    assert!(std::fs::symlink_metadata(l.mnt.join(".wh.deleted")).is_err());
    assert!(std::fs::symlink_metadata(l.mnt.join("oci/.wh..wh..opq")).is_err());
    let xs = xattr_names(&l.mnt.join("us"));
    assert!(!xs.iter().any(|x| x.starts_with("user.overlay")), "{xs:?}");
}

fn xattr_names(p: &std::path::Path) -> Vec<String> {
    let dir = sys::open_dir_path(p.parent().unwrap()).unwrap();
    sys::listxattr(sys::XTarget::At(dir.as_fd(), p.file_name().unwrap()))
        .unwrap()
        .into_iter()
        .map(|n| String::from_utf8_lossy(&n).into_owned())
        .collect()
}

#[test]
fn symlinks_never_lead_the_daemon_out_of_its_layers() {
    require_fuse!();
    let s = Scratch::new();
    let outside = s.mkdir("outside");
    write(outside.join("secret"), b"secret");
    let top = s.mkdir("top");
    let bot = s.mkdir("bot");
    // In the bottom layer "d" is a symlink to a directory outside every layer; the top layer has
    // a real directory "d". The merge must stop at the symlink, never list "secret".
    symlink(&outside, bot.join("d")).unwrap();
    write(top.join("d/mine"), b"m");
    // Relative escape: a symlink named like a directory a lower layer merges through.
    symlink("../../outside", bot.join("rel")).unwrap();
    std::fs::create_dir(top.join("rel")).unwrap();
    let l = Layerfs::mount(
        &format!("lowerdir={}", lowerdir(&[top, bot])),
        &s.path("mnt"),
    );
    let t = names(&snapshot(&l.mnt));
    assert_eq!(t, ["d", "d/mine", "rel"]);
    assert!(!l.mnt.join("d/secret").exists());
}

#[test]
fn inode_numbers_are_stable_unique_and_match_readdir() {
    require_fuse!();
    let s = Scratch::new();
    let lowers = build_stack(&s);
    let opts = format!("lowerdir={}", lowerdir(&lowers));
    let inos = |root: &std::path::Path| {
        let mut v = Vec::new();
        for e in std::fs::read_dir(root.join("h"))
            .unwrap()
            .chain(std::fs::read_dir(root.join("m")).unwrap())
        {
            let e = e.unwrap();
            let st = std::fs::symlink_metadata(e.path()).unwrap();
            assert_eq!(e.ino(), st.ino(), "d_ino vs st_ino of {:?}", e.path());
            v.push((e.file_name(), st.ino()));
        }
        v.sort();
        v
    };
    let first = {
        let l = Layerfs::mount(&opts, &s.path("mnt"));
        inos(&l.mnt)
    };
    let l = Layerfs::mount(&opts, &s.path("mnt"));
    assert_eq!(first, inos(&l.mnt), "st_ino changed across remount");
    let one = std::fs::metadata(l.mnt.join("h/one")).unwrap();
    let two = std::fs::metadata(l.mnt.join("h/two")).unwrap();
    assert_eq!(one.ino(), two.ino(), "hard links share st_ino");
    assert_eq!(one.nlink(), 2);
    let mut all: Vec<u64> = first.iter().map(|x| x.1).collect();
    all.sort();
    all.dedup();
    assert_eq!(
        all.len(),
        first.len() - 1,
        "only the hard link pair shares a number"
    );
}

#[test]
fn big_directory_split_over_two_layers() {
    require_fuse!();
    let s = Scratch::new();
    let top = s.mkdir("top/big");
    let bot = s.mkdir("bot/big");
    for i in 0..10_000 {
        let d = if i % 2 == 0 { &top } else { &bot };
        std::fs::File::create(d.join(format!("f{i:05}"))).unwrap();
    }
    // A few names in both layers, listed once.
    for i in 0..100 {
        std::fs::File::create(bot.join(format!("f{:05}", i * 2))).unwrap();
    }
    let lowers = vec![s.path("top"), s.path("bot")];
    let k = Kernel::mount(&format!("lowerdir={}", lowerdir(&lowers)), &s.path("kmnt"));
    let l = Layerfs::mount(&format!("lowerdir={}", lowerdir(&lowers)), &s.path("lmnt"));
    let list = |p: &std::path::Path| {
        let mut v: Vec<_> = std::fs::read_dir(p.join("big"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        v.sort();
        v
    };
    let lv = list(&l.mnt);
    assert_eq!(lv.len(), 10_000);
    assert_eq!(lv, list(&k.mnt));
    // Stable across repeated reads.
    assert_eq!(lv, list(&l.mnt));
}

/// Make `depth` nested dirs named `name` under `root` by fd, returning the deepest dir's fd.
fn make_deep(root: &std::path::Path, name: &str, depth: usize) -> std::os::fd::OwnedFd {
    let mut fd = sys::open_dir_path(root).unwrap();
    for _ in 0..depth {
        let _ = sys::mkdirat(fd.as_fd(), OsStr::new(name), 0o755);
        fd = sys::openat(
            fd.as_fd(),
            OsStr::new(name),
            libc::O_PATH | libc::O_DIRECTORY,
            0,
        )
        .unwrap();
    }
    fd
}

#[test]
fn paths_longer_than_path_max_work() {
    require_fuse!();
    let s = Scratch::new();
    let top = s.mkdir("top");
    let bot = s.mkdir("bot");
    let name = "d".repeat(100);
    // 60 levels of 101 bytes: a 6 KiB path, merged across both layers at the bottom.
    let deep_top = make_deep(&top, &name, 60);
    let deep_bot = make_deep(&bot, &name, 60);
    make_file_at(&deep_top, "from_top");
    make_file_at(&deep_bot, "from_bot");
    let l = Layerfs::mount(
        &format!("lowerdir={}", lowerdir(&[top.clone(), bot.clone()])),
        &s.path("lmnt"),
    );
    let k = Kernel::mount(
        &format!("lowerdir={}", lowerdir(&[top, bot])),
        &s.path("kmnt"),
    );
    let lt = snapshot(&l.mnt);
    let kt = snapshot(&k.mnt);
    let longest = lt.keys().map(|k| k.len()).max().unwrap();
    assert!(longest > 6000, "path length {longest}");
    assert_same_tree("deep tree", &kt, &lt);
}

fn make_file_at(dir: &std::os::fd::OwnedFd, name: &str) {
    sys::openat(
        dir.as_fd(),
        OsStr::new(name),
        libc::O_CREAT | libc::O_WRONLY,
        0o644,
    )
    .unwrap();
}

#[test]
fn name_length_limits_match_the_kernel() {
    require_fuse!();
    let s = Scratch::new();
    let top = s.mkdir("top");
    write(top.join("f"), b"");
    let l = Layerfs::mount(&format!("lowerdir={}", lowerdir(&[top])), &s.path("mnt"));
    let long = "x".repeat(256);
    let e = std::fs::symlink_metadata(l.mnt.join(&long)).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENAMETOOLONG));
    let ok = "y".repeat(255);
    let e = std::fs::symlink_metadata(l.mnt.join(&ok)).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
}

#[test]
fn read_only_mount_refuses_writes_with_erofs() {
    require_fuse!();
    let s = Scratch::new();
    let top = s.mkdir("top");
    write(top.join("f"), b"data");
    let l = Layerfs::mount(
        &format!("lowerdir={}", lowerdir(std::slice::from_ref(&top))),
        &s.path("mnt"),
    );
    let e = std::fs::OpenOptions::new()
        .append(true)
        .open(l.mnt.join("f"))
        .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS));
    let e = std::fs::create_dir(l.mnt.join("new")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS));
    assert_eq!(std::fs::read(top.join("f")).unwrap(), b"data");
}

#[test]
fn readdir_of_a_dir_with_fifos_never_blocks() {
    require_fuse!();
    let s = Scratch::new();
    let top = s.mkdir("top");
    for i in 0..20 {
        mkfifo(top.join(format!("fifo{i}")));
    }
    let l = Layerfs::mount(&format!("lowerdir={}", lowerdir(&[top])), &s.path("mnt"));
    // ls -l stats every FIFO; a daemon that opened them would hang here (the timeout fails it).
    let (ok, out, err) = run_timeout(std::process::Command::new("ls").arg("-l").arg(&l.mnt), 20);
    assert!(ok, "{err}");
    assert_eq!(out.lines().filter(|l| l.starts_with('p')).count(), 20);
    let st = std::fs::symlink_metadata(l.mnt.join("fifo3")).unwrap();
    assert!(std::os::unix::fs::FileTypeExt::is_fifo(&st.file_type()));
}

/// `build_stack` with four filler layers after each of its layers (holding some of the same
/// directories, and files of their own): 15 lower layers.
pub(crate) fn build_deep_stack(s: &Scratch) -> Vec<PathBuf> {
    let mut lowers = Vec::new();
    for (i, l) in build_stack(s).into_iter().enumerate() {
        lowers.push(l);
        for j in 0..4 {
            let f = s.mkdir(&format!("fill{i}{j}"));
            for d in ["m/deep", "opq", "gonedir", "h", "fresh"] {
                std::fs::create_dir_all(f.join(d)).unwrap();
            }
            write(f.join(format!("fresh/f{i}{j}")), b"filler");
            lowers.push(f);
        }
    }
    assert!(lowers.len() > 8);
    lowers
}

#[test]
fn deep_stacks_resolve_as_shallow_ones() {
    // Past 8 lower layers a directory's lookups go through a merged name index: the same
    // stack with empty filler layers (holding some of the same directories) between its layers
    // must still match the kernel, and OCI whiteouts must still hide what is below them.
    require_fuse!();
    let s = Scratch::new();
    let lowers = build_deep_stack(&s);
    let k = Kernel::mount(&format!("lowerdir={}", lowerdir(&lowers)), &s.path("kmnt"));
    let l = Layerfs::mount(&format!("lowerdir={}", lowerdir(&lowers)), &s.path("lmnt"));
    let kt = snapshot(&k.mnt);
    assert!(kt.contains_key(b"fresh/f23".as_slice()) && kt.contains_key(b"m/deep/x".as_slice()));
    assert_same_tree("deep stack: layerfs vs kernel", &kt, &snapshot(&l.mnt));
    // The same with every deep merge read side by side, as on a cold cache (fanout.rs).
    let l = Layerfs::mount_env(
        &format!("lowerdir={}", lowerdir(&lowers)),
        &s.path("lmnt-fanout"),
        &[("LAYERFS_COLD_US", "0")],
    );
    assert_same_tree("deep stack read side by side", &kt, &snapshot(&l.mnt));

    // OCI whiteouts through the merged index (the kernel does not read them).
    // `d` is in every layer, so it is merged over all 12 (the merged index is used there).
    let oci: Vec<PathBuf> = (0..12).map(|i| s.mkdir(&format!("oci{i:02}/d"))).collect();
    let oci: Vec<PathBuf> = oci
        .iter()
        .map(|d| d.parent().unwrap().to_path_buf())
        .collect();
    write(oci[11].join("d/deleted"), b"x");
    write(oci[11].join("d/kept"), b"k");
    write(oci[3].join("d/.wh.deleted"), b"");
    write(oci[1].join("d/same"), b"same layer");
    write(oci[1].join("d/.wh.same"), b"");
    write(oci[9].join("d/same"), b"below its whiteout");
    let l = Layerfs::mount(&format!("lowerdir={}", lowerdir(&oci)), &s.path("ocimnt"));
    assert_eq!(names(&snapshot(&l.mnt)), ["d", "d/kept", "d/same"]);
    assert_eq!(std::fs::read(l.mnt.join("d/same")).unwrap(), b"same layer");
    // Looked up by name (not only left out of listings), the deleted name is gone.
    let gone = std::fs::symlink_metadata(l.mnt.join("d/deleted")).map_err(|e| e.raw_os_error());
    assert_eq!(gone.map(|_| ()), Err(Some(libc::ENOENT)));
}

#[test]
fn a_layer_root_is_never_opaque_as_in_the_kernel() {
    // The kernel merges every layer's root whatever markers it carries (it never looks a
    // root up); layerfs stopped the merge at an opaque root and hid the layers below.
    require_fuse!();
    let s = Scratch::new();
    let (a, b, c) = (s.mkdir("a"), s.mkdir("b"), s.mkdir("c"));
    write(a.join("fa"), b"a");
    write(b.join("fb"), b"b");
    write(c.join("fc"), b"c");
    set_xattr(&b, "trusted.overlay.opaque", b"y");
    let (up, wk) = (s.mkdir("up"), s.mkdir("wk"));
    write(up.join("fu"), b"u");
    set_xattr(&up, "trusted.overlay.opaque", b"y");
    let opts = format!(
        "lowerdir={}:{}:{},upperdir={},workdir={}",
        a.display(),
        b.display(),
        c.display(),
        up.display(),
        wk.display()
    );
    let kernel = listing(&Kernel::mount(&opts, &s.path("k")).mnt);
    assert_eq!(kernel, ["fa", "fb", "fc", "fu"], "the kernel");
    let ours = listing(&Layerfs::mount(&opts, &s.path("l")).mnt);
    assert_eq!(ours, kernel, "layerfs vs kernel");
    // The OCI file marker at a root (not a kernel format): hidden, and hiding nothing.
    write(a.join(".wh..wh..opq"), b"");
    let ro = format!("lowerdir={}:{}", a.display(), c.display());
    assert_eq!(
        listing(&Layerfs::mount(&ro, &s.path("l2")).mnt),
        ["fa", "fc"]
    );
}

#[test]
fn an_oci_whiteout_in_the_upper_layer_hides_the_lower_name_it_misses() {
    // fuse-overlayfs without CAP_MKNOD writes `.wh.NAME` files into the upper layer. A lookup
    // asks for that file only once a layer below holds the name (a name found nowhere costs
    // one fstatat); the answer must not change.
    require_fuse!();
    let s = Scratch::new();
    let low = s.mkdir("low");
    write(low.join("gone"), b"lower");
    write(low.join("kept"), b"lower");
    write(low.join("d/gone"), b"lower");
    let (up, wk) = (s.mkdir("up"), s.mkdir("wk"));
    write(up.join(".wh.gone"), b"");
    write(up.join("d/.wh.gone"), b"");
    write(up.join(".wh.nowhere"), b"");
    let l = Layerfs::mount(&rw_opts(&low, &up, &wk), &s.path("l"));
    for gone in ["gone", "d/gone", "nowhere", "never"] {
        let e = std::fs::symlink_metadata(l.mnt.join(gone)).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{gone}");
    }
    assert_eq!(std::fs::read(l.mnt.join("kept")).unwrap(), b"lower");
    assert_eq!(listing(&l.mnt), ["d", "kept"]);
    // Created over the OCI whiteout: the new file, not the deleted lower one.
    write(l.mnt.join("gone"), b"new");
    assert_eq!(std::fs::read(l.mnt.join("gone")).unwrap(), b"new");
}

/// Kernel 6.7+ "xwhiteouts": an empty regular file carrying `overlay.whiteout` is a whiteout
/// to a lookup in any layer, and a listing of a lower directory marked `overlay.opaque=x`
/// hides it (that mark makes no directory opaque). composefs writes them where it cannot
/// make devices. layerfs showed them as empty files and the lower names they delete.
#[test]
fn xattr_whiteouts_delete_as_in_the_kernel() {
    require_fuse!();
    let xwhiteout = |p: &std::path::Path| {
        write(p, b"");
        set_xattr(p, "trusted.overlay.whiteout", b"");
    };
    let mut p = Pair::new(|s| {
        let (l0, l1) = (s.mkdir("l0"), s.mkdir("l1"));
        for d in ["d", "e"] {
            write(l1.join(d).join("a"), b"deleted above");
            write(l1.join(d).join("b"), b"kept");
        }
        write(l1.join("top"), b"deleted above");
        write(l1.join("data"), b"kept");
        // In a directory marked opaque=x: hidden from its listing too.
        xwhiteout(&l0.join("d/a"));
        xwhiteout(&l0.join("d/c")); // deletes nothing below
        set_xattr(l0.join("d"), "trusted.overlay.opaque", b"x");
        // Unmarked directories: still whiteouts to a lookup.
        xwhiteout(&l0.join("e/a"));
        xwhiteout(&l0.join("top"));
        // An empty file with another xattr, and a non-empty one with the marker: files.
        write(l0.join("empty"), b"");
        set_xattr(l0.join("empty"), "user.x", b"1");
        write(l0.join("d/full"), b"not empty");
        set_xattr(l0.join("d/full"), "trusted.overlay.whiteout", b"");
        // A file of that directory whose lookup fails (a metadata-only copy, not followed
        // without metacopy=on: EPERM) is left out of its listing too: the kernel looks each
        // file of an opaque=x listing up.
        write(l0.join("d/m"), b"m");
        set_xattr(l0.join("d/m"), "trusted.overlay.metacopy", b"");
        // A merged directory holding only an xwhiteout: listed empty, yet not empty to rmdir
        // (the kernel's ovl_check_empty_dir counts it).
        s.mkdir("l1/x");
        xwhiteout(&l0.join("x/z"));
        set_xattr(l0.join("x"), "trusted.overlay.opaque", b"x");
        vec![l0, l1]
    });
    p.same("listing of x", |m| listing(&m.join("x")));
    p.same("rmdir x", |m| outcome(std::fs::remove_dir(m.join("x"))));
    for f in [
        "d/a", "d/b", "d/c", "d/full", "d/m", "e/a", "e/b", "top", "data", "empty",
    ] {
        p.same(&format!("stat {f}"), |m| {
            outcome(std::fs::metadata(m.join(f)).map(|md| md.len()))
        });
    }
    p.same("listing of the opaque=x dir", |m| listing(&m.join("d")));
    assert_eq!(listing(&p.lmnt().join("d")), ["b", "full"]);
    p.check("xwhiteouts");
    // Writes over deleted names: create, mkdir, rename onto them, as over a whiteout.
    p.same("create over d/a", |m| {
        outcome(std::fs::write(m.join("d/a"), b"new"))
    });
    p.same("mkdir over top", |m| {
        outcome(std::fs::create_dir(m.join("top")))
    });
    p.same("rename onto e/a", |m| {
        outcome(std::fs::rename(m.join("e/b"), m.join("e/a")))
    });
    p.same("read d/a", |m| outcome(std::fs::read(m.join("d/a"))));
    p.same("listing of top", |m| listing(&m.join("top")));
    p.check("writes over xwhiteouts");
    p.assert_no_panic();
    p.check_interop();
}

/// The kernel keeps a symlink's target (FUSE_CACHE_SYMLINKS): a path through a symlink costs
/// no READLINK once the target is known, and a symlink replaced under the same name (a new
/// node) shows its own target, before and after a remount.
#[test]
fn symlink_targets_are_read_once_and_replacements_show() {
    require_fuse!();
    let s = Scratch::new();
    let low = s.mkdir("low");
    write(low.join("usr/bin/tool"), b"tool");
    write(low.join("usr/sbin/tool"), b"stool");
    symlink("usr/bin", low.join("bin")).unwrap();
    symlink("t1", low.join("l")).unwrap();
    let opts = rw_opts(&low, &s.mkdir("up"), &s.mkdir("work"));
    let l = Layerfs::mount(&opts, &s.path("mnt"));
    let target = |name: &str| std::fs::read_link(l.mnt.join(name)).unwrap();
    for _ in 0..50 {
        assert_eq!(std::fs::read(l.mnt.join("bin/tool")).unwrap(), b"tool");
        assert_eq!(target("l"), PathBuf::from("t1"));
    }
    let readlinks = stats(&l.mnt)["ops"]["readlink"]["count"].as_u64();
    // Once per symlink; a little more if another test's cache drop evicted a target.
    assert!(
        readlinks.is_some_and(|n| (2..=6).contains(&n)),
        "READLINKs for 2 symlinks followed 50 times each: {readlinks:?}"
    );
    // New symlinks under the old names: by unlink + symlink, by rename over, and over a
    // lower one in a path (after a copy-up of it).
    std::fs::remove_file(l.mnt.join("l")).unwrap();
    symlink("t2", l.mnt.join("l")).unwrap();
    assert_eq!(target("l"), PathBuf::from("t2"));
    symlink("t3", l.mnt.join("m")).unwrap();
    std::fs::rename(l.mnt.join("m"), l.mnt.join("l")).unwrap();
    assert_eq!(target("l"), PathBuf::from("t3"));
    std::os::unix::fs::lchown(l.mnt.join("bin"), Some(1), Some(1)).unwrap();
    assert_eq!(std::fs::read(l.mnt.join("bin/tool")).unwrap(), b"tool");
    // The upper reuses a freed inode number at once; each new symlink is still a new node.
    for i in 0..50 {
        let t = PathBuf::from(format!("t{i}"));
        symlink(&t, l.mnt.join("s")).unwrap();
        assert_eq!(target("s"), t);
        std::fs::remove_file(l.mnt.join("s")).unwrap();
    }
    symlink("usr/sbin", l.mnt.join("bin2")).unwrap();
    std::fs::rename(l.mnt.join("bin2"), l.mnt.join("bin")).unwrap();
    assert_eq!(std::fs::read(l.mnt.join("bin/tool")).unwrap(), b"stool");
    drop(l);
    let l = Layerfs::mount(&opts, &s.path("mnt"));
    assert_eq!(
        std::fs::read_link(l.mnt.join("l")).unwrap(),
        PathBuf::from("t3")
    );
    assert_eq!(std::fs::read(l.mnt.join("bin/tool")).unwrap(), b"stool");
}
