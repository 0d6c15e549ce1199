//! An upper on a small tmpfs that fills up during copy-up and writes: ENOSPC, the lower file
//! intact and visible, nothing half-copied, and everything works once space is freed.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::require_fuse;
use crate::support::*;

/// A tmpfs mounted with `opts` at `fs` in `s`, holding `up` and `work` directories.
fn small_upper(s: &Scratch, opts: &str) -> (TmpfsMount, PathBuf, PathBuf) {
    let t = TmpfsMount::mount(s.mkdir("fs"), opts);
    let (up, work) = (t.0.join("up"), t.0.join("work"));
    fs::create_dir(&up).unwrap();
    fs::create_dir(&work).unwrap();
    (t, up, work)
}

#[test]
fn enospc_during_copy_up_leaves_nothing_half_done() {
    require_fuse!();
    let s = Scratch::new();
    let low = s.mkdir("low");
    let big: Vec<u8> = (0..12 << 20).map(|i| (i % 253) as u8).collect();
    write(low.join("big"), &big);
    write(low.join("small"), b"small");
    let (small, up, work) = small_upper(&s, "size=8m");
    let small_fs = small.0.clone();
    let l = Layerfs::mount(&rw_opts(&low, &up, &work), &s.path("mnt"));
    // Copy-up of a 12 MiB file into 8 MiB.
    let e = OpenOptions::new()
        .append(true)
        .open(l.mnt.join("big"))
        .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
    assert_eq!(
        fs::read(l.mnt.join("big")).unwrap(),
        big,
        "lower file intact and visible"
    );
    assert!(!up.join("big").exists(), "no partial copy in the upper");
    assert_eq!(
        fs::read_dir(work.join("work")).unwrap().count(),
        0,
        "nothing left in the workdir"
    );
    // Writes that fill the disk fail with ENOSPC too.
    let mut f = fs::File::create(l.mnt.join("filler")).unwrap();
    let chunk = vec![1u8; 1 << 20];
    let err = (0..20)
        .find_map(|_| f.write_all(&chunk).and_then(|_| f.sync_all()).err())
        .expect("disk fills");
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
    drop(f);
    // Free space: everything works.
    fs::remove_file(l.mnt.join("filler")).unwrap();
    let (ok, _, err) = run_timeout(
        Command::new("mount")
            .args(["-o", "remount,size=64m"])
            .arg(&small_fs),
        10,
    );
    assert!(ok, "{err}");
    OpenOptions::new()
        .append(true)
        .open(l.mnt.join("big"))
        .unwrap()
        .write_all(b"!")
        .unwrap();
    let got = fs::read(l.mnt.join("big")).unwrap();
    assert_eq!(got.len(), big.len() + 1);
    assert!(got.starts_with(&big));
}

/// A lookup of a copied-up hard link's further name links that name up from the copy's index
/// entry; when that fails (no inode left for its directory's copy), the lookup fails and
/// leaves nothing behind, and once there is room the next lookup links it up, so the two
/// names stay one file, after a remount too. The lower is on an ext4 with a null UUID (as a
/// fresh VM's root filesystem can be), the upper on another filesystem: before session 36 the
/// copy's origin was not recognised there, and the linked-up name showed the upper file's
/// inode number and link count.
#[test]
fn a_hard_links_name_that_could_not_be_linked_up_is_linked_up_later() {
    require_fuse!();
    let s = Scratch::new();
    let Some(disk) = Disk::made_with(&s, "lowerfs", "ext4", &["-U", "clear"]) else {
        return;
    };
    let low = disk.mnt.join("low");
    two_linked_names(&low);
    hard_link_name_linked_up_after_enospc(&s, &low, true);
}

/// Where copies record no origin (the lower is itself an overlay: no filesystem UUID), a
/// copied-up hard link's further name is linked up from the copy's other name when it is
/// looked up. When that fails for want of an inode, the name must not stay registered as
/// the copy's: before session 36 the next lookup found it so, and the name was never linked
/// up (after a remount it was the lower file again, its old data).
#[test]
fn a_hard_links_name_not_linked_up_for_want_of_an_inode_is_not_taken_as_linked() {
    require_fuse!();
    let s = Scratch::new();
    let base = s.mkdir("base");
    two_linked_names(&base);
    let empty = s.mkdir("empty");
    let low = s.path("low");
    let _lower = Kernel::mount(
        &format!("lowerdir={}:{}", base.display(), empty.display()),
        &low,
    );
    // (No origins: after a remount the copy shows its upper number.)
    hard_link_name_linked_up_after_enospc(&s, &low, false);
}

/// `a/x` and `b/y`, one file, in `low`.
fn two_linked_names(low: &Path) {
    fs::create_dir_all(low.join("a")).unwrap();
    fs::create_dir_all(low.join("b")).unwrap();
    write(low.join("a/x"), b"v1");
    fs::hard_link(low.join("a/x"), low.join("b/y")).unwrap();
}

/// Write a/x of `low` (see `two_linked_names`) with the upper's inodes then used up, look up
/// b/y (ENOSPC), free them, and check b/y is a/x's copy in the union, in the upper layer and
/// after a remount (its number too, if `origins`).
fn hard_link_name_linked_up_after_enospc(s: &Scratch, low: &Path, origins: bool) {
    use std::os::unix::fs::MetadataExt;
    let (_t, up, work) = small_upper(s, "size=8m,nr_inodes=64");
    let mnt = s.path("mnt");
    let ino = {
        let l = Layerfs::mount(&rw_opts(low, &up, &work), &mnt);
        // Copied up through a/x, and held open so its node stays known.
        let mut held = OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(l.mnt.join("a/x"))
            .unwrap();
        held.write_all(b"v2").unwrap();
        // Use up the upper's inodes.
        let mut fillers = Vec::new();
        for i in 0.. {
            let f = l.mnt.join(format!("filler{i}"));
            match fs::File::create(&f) {
                Ok(_) => fillers.push(f),
                Err(e) => {
                    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
                    break;
                }
            }
        }
        // b/y needs b copied up to be linked up: no inode for it.
        let e = fs::metadata(l.mnt.join("b/y")).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
        assert!(!up.join("b").exists(), "nothing half done");
        for f in &fillers {
            fs::remove_file(f).unwrap();
        }
        // Room again: b/y is the same file as a/x, in the union and in the upper layer.
        let (x, y) = (
            fs::metadata(l.mnt.join("a/x")).unwrap(),
            fs::metadata(l.mnt.join("b/y")).unwrap(),
        );
        assert_eq!((y.ino(), y.nlink()), (x.ino(), 2));
        assert_eq!(fs::read(l.mnt.join("b/y")).unwrap(), b"v2");
        drop(held);
        let (ux, uy) = (
            fs::metadata(up.join("a/x")).unwrap(),
            fs::metadata(up.join("b/y")).expect("b/y linked up in the upper layer"),
        );
        assert_eq!(ux.ino(), uy.ino());
        x.ino()
    };
    let l = Layerfs::mount(&rw_opts(low, &up, &work), &mnt);
    let (x, y) = (
        fs::metadata(l.mnt.join("a/x")).unwrap(),
        fs::metadata(l.mnt.join("b/y")).unwrap(),
    );
    assert_eq!((y.ino(), y.nlink()), (x.ino(), 2));
    if origins {
        assert_eq!(x.ino(), ino, "the lower file's number after a remount");
    }
    assert_eq!(fs::read(l.mnt.join("b/y")).unwrap(), b"v2");
}
