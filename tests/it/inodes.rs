//! Inode numbers across copy-up: a copy keeps its lower object's st_ino (and d_ino), through
//! a remount, and in the kernel's overlayfs mounting the same upper; and the other way round.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirEntryExt, MetadataExt, PermissionsExt, symlink};
use std::path::Path;

use crate::require_fuse;
use crate::support::*;

/// Names (from the mount root) the test copies up, with the lower path each came from.
const COPIED: [(&str, &str); 6] = [
    ("d/f", "d/f"),     // appended
    ("d/g", "d/g"),     // chmod
    ("d/t", "d/t"),     // opened with O_TRUNC
    ("d/sym", "d/sym"), // lchown of a symlink
    ("e/k", "d/k"),     // renamed into another directory
    ("e/m", "d/m"),     // chmod, then renamed into another directory
];

fn lower_inos(low: &Path) -> BTreeMap<&'static str, u64> {
    COPIED
        .iter()
        .map(|(at, from)| (*at, fs::symlink_metadata(low.join(from)).unwrap().ino()))
        .collect()
}

/// Every copied name shows its lower inode number, and each listing's d_ino is its st_ino.
fn assert_inos(what: &str, mnt: &Path, want: &BTreeMap<&'static str, u64>) {
    for (at, ino) in want {
        let got = fs::symlink_metadata(mnt.join(at)).unwrap().ino();
        assert_eq!(got, *ino, "{what}: st_ino of {at}");
    }
    for dir in ["d", "e", "."] {
        for e in fs::read_dir(mnt.join(dir)).unwrap() {
            let e = e.unwrap();
            let st = fs::symlink_metadata(e.path()).unwrap();
            assert_eq!(
                e.ino(),
                st.ino(),
                "{what}: d_ino vs st_ino of {:?}",
                e.path()
            );
        }
    }
}

fn copy_up_all(mnt: &Path) {
    let mut f = OpenOptions::new()
        .append(true)
        .open(mnt.join("d/f"))
        .unwrap();
    f.write_all(b"more\n").unwrap();
    drop(f);
    fs::set_permissions(mnt.join("d/g"), fs::Permissions::from_mode(0o600)).unwrap();
    OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(mnt.join("d/t"))
        .unwrap();
    std::os::unix::fs::lchown(mnt.join("d/sym"), Some(12), Some(34)).unwrap();
    fs::rename(mnt.join("d/k"), mnt.join("e/k")).unwrap();
    fs::set_permissions(mnt.join("d/m"), fs::Permissions::from_mode(0o640)).unwrap();
    fs::rename(mnt.join("d/m"), mnt.join("e/m")).unwrap();
}

fn check_on(s: &Scratch, root: &Path) {
    let low = root.join("low");
    for n in ["f", "g", "t", "k", "m", "kf"] {
        write(low.join("d").join(n), format!("lower {n}\n").as_bytes());
    }
    symlink("f", low.join("d/sym")).unwrap();
    fs::create_dir_all(low.join("e")).unwrap();
    let (up, work) = (root.join("up"), root.join("work"));
    fs::create_dir_all(&up).unwrap();
    fs::create_dir_all(&work).unwrap();
    let want = lower_inos(&low);
    let opts = rw_opts(&low, &up, &work);
    let mnt = s.path(&format!(
        "mnt-{}",
        root.file_name().unwrap().to_string_lossy()
    ));
    {
        let l = Layerfs::mount(&opts, &mnt);
        let before: Vec<u64> = ["d/f", "d/g"]
            .iter()
            .map(|p| fs::metadata(l.mnt.join(p)).unwrap().ino())
            .collect();
        copy_up_all(&l.mnt);
        assert_inos("layerfs, after the copy-ups", &l.mnt, &want);
        assert_eq!(before, [want["d/f"], want["d/g"]]);
        // The copies are real upper files with inode numbers of their own.
        for (at, _) in COPIED {
            let real = fs::symlink_metadata(up.join(at)).unwrap().ino();
            assert_ne!(real, want[at], "{at} is a copy in the upper layer");
        }
    }
    {
        let l = Layerfs::mount(&opts, &mnt);
        assert_inos("layerfs, remounted", &l.mnt, &want);
    }
    // The kernel reads the origins layerfs wrote, and the impure marks for its listings.
    let kwork = root.join("kwork");
    fs::create_dir_all(&kwork).unwrap();
    let kopts = rw_opts(&low, &up, &kwork);
    let kf = fs::metadata(low.join("d/kf")).unwrap().ino();
    {
        let k = Kernel::mount(&kopts, &mnt);
        assert_inos("the kernel on layerfs's upper", &k.mnt, &want);
        // And the kernel copies one up itself.
        let mut f = OpenOptions::new()
            .append(true)
            .open(k.mnt.join("d/kf"))
            .unwrap();
        f.write_all(b"kernel\n").unwrap();
        assert_eq!(fs::metadata(k.mnt.join("d/kf")).unwrap().ino(), kf);
    }
    let l = Layerfs::mount(&opts, &mnt);
    assert_eq!(
        fs::metadata(l.mnt.join("d/kf")).unwrap().ino(),
        kf,
        "layerfs on the kernel's copy-up"
    );
    assert_inos("layerfs after the kernel", &l.mnt, &want);
}

#[test]
fn copies_keep_their_lower_inode_number_across_remount_and_the_kernel() {
    require_fuse!();
    let s = Scratch::new();
    // This machine's root filesystem has a null UUID (the kernel then records none);
    // a fresh ext4 has one.
    check_on(&s, &s.mkdir("plain"));
    match Disk::new(&s, "disk") {
        Some(d) => check_on(&s, &d.mnt),
        None => eprintln!("skipped the ext4 half: no loop-mounted ext4 here"),
    }
}

/// The same on xfs and on btrfs. btrfs does not answer FS_IOC_GETFSUUID: layerfs recorded
/// no origin there at all before session 37, so every copy got a new inode number.
#[test]
fn copies_keep_their_lower_inode_number_on_xfs_and_btrfs() {
    require_fuse!();
    let s = Scratch::new();
    for fstype in ["xfs", "btrfs"] {
        match Disk::made_with(&s, fstype, fstype, &[]) {
            Some(d) => {
                check_on(&s, &d.mnt);
                hard_links_on(&s, &d.mnt);
            }
            None => eprintln!("skipped the {fstype} half: no loop-mounted {fstype} here"),
        }
    }
}

#[test]
fn copies_of_hard_links_keep_the_lower_inode_number_for_every_name() {
    require_fuse!();
    let s = Scratch::new();
    hard_links_on(&s, &s.mkdir("plain"));
}

/// A lower file with two names, copied up through one: both show its lower inode number,
/// after a remount too, and the kernel on the same upper agrees.
fn hard_links_on(s: &Scratch, root: &Path) {
    let low = root.join("hlow");
    write(low.join("a/h1"), b"linked\n");
    fs::create_dir_all(low.join("b")).unwrap();
    fs::hard_link(low.join("a/h1"), low.join("b/h2")).unwrap();
    let ino = fs::metadata(low.join("a/h1")).unwrap().ino();
    let (up, work) = (root.join("hup"), root.join("hwork"));
    fs::create_dir_all(&up).unwrap();
    fs::create_dir_all(&work).unwrap();
    let opts = rw_opts(&low, &up, &work);
    let mnt = s.path(&format!(
        "hmnt-{}",
        root.file_name().unwrap().to_string_lossy()
    ));
    {
        let l = Layerfs::mount(&opts, &mnt);
        let mut f = OpenOptions::new()
            .append(true)
            .open(l.mnt.join("a/h1"))
            .unwrap();
        f.write_all(b"more\n").unwrap();
        drop(f);
        assert_eq!(fs::metadata(l.mnt.join("a/h1")).unwrap().ino(), ino);
        assert_eq!(fs::metadata(l.mnt.join("b/h2")).unwrap().ino(), ino);
    }
    // After a remount the other name, looked up first, is linked up to the same copy.
    {
        let l = Layerfs::mount(&opts, &mnt);
        let h2 = fs::metadata(l.mnt.join("b/h2")).unwrap();
        assert_eq!(h2.ino(), ino);
        assert_eq!(fs::read(l.mnt.join("b/h2")).unwrap(), b"linked\nmore\n");
        assert_eq!(fs::metadata(l.mnt.join("a/h1")).unwrap().ino(), ino);
        assert_eq!(h2.nlink(), 2);
    }
    // The kernel (index=on) finds the copy by the origin and the index layerfs wrote.
    let k = Kernel::mount(&format!("{opts},index=on"), &mnt);
    for name in ["a/h1", "b/h2"] {
        let st = fs::metadata(k.mnt.join(name)).unwrap();
        assert_eq!(st.ino(), ino, "the kernel: st_ino of {name}");
        assert_eq!(st.nlink(), 2, "the kernel: st_nlink of {name}");
        assert_eq!(fs::read(k.mnt.join(name)).unwrap(), b"linked\nmore\n");
    }
}
