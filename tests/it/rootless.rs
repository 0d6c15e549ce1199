//! Owners and rootless mounts: uidmapping/gidmapping, squash_to_*, xattr_permissions, and
//! layerfs run by an unprivileged user, whose upper the kernel mounts with `userxattr`.

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use crate::require_fuse;
use crate::support::*;

fn owner(p: &Path) -> (u32, u32) {
    let m = fs::symlink_metadata(p).unwrap();
    (m.uid(), m.gid())
}

fn chown(p: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    std::os::unix::fs::lchown(p, Some(uid), Some(gid))
}

#[test]
fn id_mappings_squash_and_xattr_permissions_translate_owners_both_ways() {
    require_fuse!();
    let s = Scratch::new();
    let l = s.mkdir("l");
    for (name, id) in [("a", 1000), ("b", 1001), ("c", 0)] {
        write(l.join(name), name.as_bytes());
        chown(&l.join(name), id, id).unwrap();
    }
    let (u, w) = (s.mkdir("u"), s.mkdir("w"));
    let base = rw_opts(&l, &u, &w);
    {
        let m = Layerfs::mount(
            &format!("{base},uidmapping=0:1000:2,gidmapping=0:1000:2"),
            &s.path("m"),
        );
        assert_eq!(owner(&m.mnt.join("a")), (0, 0));
        assert_eq!(owner(&m.mnt.join("b")), (1, 1));
        assert_eq!(
            owner(&m.mnt.join("c")),
            (65534, 65534),
            "unmapped: overflow id"
        );
        // chown through the mount maps back to host ids; an unmapped id is EINVAL.
        chown(&m.mnt.join("c"), 1, 0).unwrap();
        assert_eq!(owner(&m.mnt.join("c")), (1, 0));
        assert_eq!(owner(&u.join("c")), (1001, 1000));
        let e = chown(&m.mnt.join("a"), 7, 7).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
        // A new file of the (container) root is the host's mapped root on disk.
        write(m.mnt.join("new"), b"n");
        assert_eq!(owner(&m.mnt.join("new")), (0, 0));
        assert_eq!(owner(&u.join("new")), (1000, 1000));
    }
    {
        let m = Layerfs::mount(
            &format!("lowerdir={},squash_to_root", l.display()),
            &s.path("m"),
        );
        for n in ["a", "b", "c"] {
            assert_eq!(owner(&m.mnt.join(n)), (0, 0), "{n}");
        }
    }
    {
        let m = Layerfs::mount(
            &format!("lowerdir={},squash_to_uid=5,squash_to_gid=6", l.display()),
            &s.path("m"),
        );
        assert_eq!(owner(&m.mnt.join("a")), (5, 6));
    }
    {
        // Owner and mode kept in user.containers.override_stat; the real file is untouched.
        let m = Layerfs::mount(&format!("{base},xattr_permissions=2"), &s.path("m"));
        chown(&m.mnt.join("b"), 77, 88).unwrap();
        fs::set_permissions(m.mnt.join("b"), fs::Permissions::from_mode(0o600)).unwrap();
        let md = fs::metadata(m.mnt.join("b")).unwrap();
        assert_eq!((md.uid(), md.gid(), md.mode() & 0o7777), (77, 88, 0o600));
        let real = fs::metadata(u.join("b")).unwrap();
        assert_eq!((real.uid(), real.mode() & 0o7777), (1001, 0o644));
        assert_eq!(
            get_xattr(u.join("b"), "user.containers.override_stat").as_deref(),
            Some(&b"77:88:0600:file"[..])
        );
        // The override is the mount's own business: not shown, not settable through it.
        assert_eq!(
            get_xattr(m.mnt.join("b"), "user.containers.override_stat"),
            None
        );
    }
    // Bad values: one line each, nothing mounted.
    for (opt, needle) in [
        ("uidmapping=0:1000", "triples"),
        ("uidmapping=0:1000:5:3:2000:1", "overlap"),
        ("gidmapping=0:4294967295:2", "overflows"),
        ("squash_to_uid=x", "expected a number"),
        ("xattr_permissions=3", "expected 0, 1"),
    ] {
        let mnt = s.mkdir("bad");
        assert_one_line_error(
            &[
                "mount",
                "-o",
                &format!("lowerdir={},{opt}", l.display()),
                mnt.to_str().unwrap(),
            ],
            needle,
        );
        assert!(!layerfs::sys::is_mountpoint(&mnt));
    }
}

#[test]
fn an_unprivileged_user_mounts_copies_up_and_deletes_in_the_kernels_userxattr_format() {
    require_fuse!();
    const NOBODY: u32 = 65534;
    let s = Scratch::new();
    fs::set_permissions(s.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let l = s.mkdir("l");
    for d in ["dir", "gone", "ren"] {
        fs::create_dir(l.join(d)).unwrap();
    }
    write(l.join("a"), b"a\n");
    write(l.join("dir/f"), b"f");
    write(l.join("gone/x"), b"x");
    write(l.join("ren/r"), b"r");
    // A root-owned file anyone may write: its copy-up cannot chown, so with
    // xattr_permissions=2 the owner is kept in user.containers.override_stat.
    fs::create_dir(l.join("shared")).unwrap();
    write(l.join("shared/rootfile"), b"root\n");
    let (u, w, m) = (s.mkdir("u"), s.mkdir("w"), s.mkdir("m"));
    for p in [&l, &u, &w, &m, &s.mkdir("out")] {
        Command::new("chown")
            .args(["-R", "65534:65534"])
            .arg(p)
            .status()
            .unwrap();
    }
    chown(&l.join("shared"), 0, 0).unwrap();
    fs::set_permissions(l.join("shared"), fs::Permissions::from_mode(0o777)).unwrap();
    chown(&l.join("shared/rootfile"), 0, 0).unwrap();
    fs::set_permissions(l.join("shared/rootfile"), fs::Permissions::from_mode(0o666)).unwrap();
    // /dev/fuse is 0600 here: a private mount namespace gets a 0666 node over it.
    let node = s.path("fuse");
    let (ok, _, err) = run_timeout(
        Command::new("mknod").arg(&node).args(["c", "10", "229"]),
        10,
    );
    assert!(ok, "{err}");
    fs::set_permissions(&node, fs::Permissions::from_mode(0o666)).unwrap();
    let script = format!(
        r#"set -e
L='{BIN}'; cd '{dir}'
$L mount -o lowerdir=l,upperdir=u,workdir=w,xattr_permissions=2 m
echo more >> m/a
rm m/dir/f
rm -rf m/gone; mkdir m/gone; echo new > m/gone/n
mv m/ren m/ren2
echo changed >> m/shared/rootfile
stat -c '%u:%g' m/shared/rootfile > out/rootfile
cat m/a > out/a
stat -c %i m/a > out/ino
$L umount m
$L mount -o lowerdir=l,upperdir=u,workdir=w,xattr_permissions=2 m
stat -c %i m/a >> out/ino
$L umount m
$L mount -o lowerdir=l,uidmapping=0:65534:1,gidmapping=0:65534:1 m
stat -c '%n %u:%g' m/a m/shared > out/mapped
$L umount m
echo done > out/done
"#,
        dir = s.dir.path().display()
    );
    let (ok, out, err) = run_timeout(
        Command::new("unshare").args([
            "-m",
            "sh",
            "-c",
            &format!(
                "mount --bind '{}' /dev/fuse && exec setpriv --reuid={NOBODY} --regid={NOBODY} --clear-groups sh -c \"$0\"",
                node.display()
            ),
            &script,
        ]),
        120,
    );
    // Never leave a mount behind, even when the script failed half-way.
    let _ = layerfs::sys::umount(&m, true);
    assert!(
        ok && s.path("out/done").exists(),
        "rootless script: {out}\n{err}"
    );
    let read = |n: &str| fs::read_to_string(s.path(n)).unwrap();
    assert_eq!(read("out/a"), "a\nmore\n");
    assert_eq!(
        read("out/rootfile"),
        "0:0\n",
        "owner kept through the override xattr"
    );
    assert_eq!(read("out/mapped"), "m/a 0:0\nm/shared 65534:65534\n");
    // The copy keeps the lower inode number, across a remount too: unprivileged, the origin
    // is read from ext4's file handle itself (open_by_handle_at needs CAP_DAC_READ_SEARCH).
    let lower_ino = fs::metadata(l.join("a")).unwrap().ino();
    assert_eq!(read("out/ino"), format!("{lower_ino}\n{lower_ino}\n"));
    assert_ne!(fs::metadata(u.join("a")).unwrap().ino(), lower_ino);
    // The upper: char 0/0 whiteouts, user.overlay.* markers, nothing trusted.*.
    let wh = fs::symlink_metadata(u.join("dir/f")).unwrap();
    assert!(wh.file_type().is_char_device() && wh.rdev() == 0);
    assert_eq!(owner(&u.join("dir/f")), (NOBODY, NOBODY));
    assert_eq!(
        get_xattr(u.join("gone"), "user.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
    assert_eq!(
        get_xattr(u.join("shared/rootfile"), "user.containers.override_stat").as_deref(),
        Some(&b"0:0:0666:file"[..])
    );
    assert_eq!(owner(&u.join("shared/rootfile")), (NOBODY, NOBODY));
    let (ok, xattrs, _) = run_timeout(
        Command::new("getfattr")
            .args(["-R", "-d", "-m", "-"])
            .arg(&u),
        30,
    );
    assert!(ok);
    assert!(!xattrs.contains("trusted."), "no trusted.* xattr: {xattrs}");
    assert!(
        !xattrs.contains("redirect"),
        "renames copy (EXDEV) in this format: {xattrs}"
    );
    // The kernel reads that upper with userxattr and sees what layerfs sees.
    let k = Kernel::mount(
        &format!("userxattr,lowerdir={}:{}", u.display(), l.display()),
        &s.path("k"),
    );
    let ours = Layerfs::mount(
        &format!("lowerdir={}:{},userxattr", u.display(), l.display()),
        &s.path("ours"),
    );
    assert_same_tree("rootless upper", &snapshot(&k.mnt), &snapshot(&ours.mnt));
    assert!(!k.mnt.join("ren").exists() && k.mnt.join("ren2/r").exists());
    assert!(!k.mnt.join("gone/x").exists() && k.mnt.join("gone/n").exists());
}
