//! An upper on a small tmpfs that fills up during copy-up and writes: ENOSPC, the lower file
//! intact and visible, nothing half-copied, and everything works once space is freed.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::process::Command;

use crate::require_fuse;
use crate::support::*;

struct Tmpfs(std::path::PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = layerfs::sys::umount(&self.0, true);
    }
}

#[test]
fn enospc_during_copy_up_leaves_nothing_half_done() {
    require_fuse!();
    let s = Scratch::new();
    let low = s.mkdir("low");
    let big: Vec<u8> = (0..12 << 20).map(|i| (i % 253) as u8).collect();
    write(low.join("big"), &big);
    write(low.join("small"), b"small");
    let small_fs = s.mkdir("fs");
    let (ok, _, err) = run_timeout(
        Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=8m", "tmpfs"])
            .arg(&small_fs),
        10,
    );
    assert!(ok, "{err}");
    let _t = Tmpfs(small_fs.clone());
    let (up, work) = (small_fs.join("up"), small_fs.join("work"));
    fs::create_dir(&up).unwrap();
    fs::create_dir(&work).unwrap();
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
