//! Power cuts, where kill -9 (crash.rs) is not enough: the journaled ext4 (or xfs) holding the
//! upper or the store is shut down as a power loss would stop it (EXT4_IOC_SHUTDOWN, the same
//! ioctl as XFS_IOC_GOINGDOWN, NOLOGFLUSH),
//! right after an fsync of some other file has committed the journal. Renames made before
//! that fsync survive; file data that nobody synced does not. Whatever the daemon or the
//! store made visible by a rename must have had its data on disk first.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::Path;

use crate::require_fuse;
use crate::support::*;

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 12) as u8)
        .collect()
}

/// Copy-ups, as the kernel makes them: the chmod's copy of an 8 MiB lower file and the copy
/// under an append are whole after the cut (fuse-overlayfs 1.10, which never fsyncs a
/// copy-up, leaves the chmod's copy empty over the lower file here). With `metacopy=on` a
/// chmod copies no data and a later append brings the data up in place: the metacopy marker
/// goes only after the data is on disk.
#[test]
fn a_power_cut_after_copy_ups_leaves_each_copy_whole_as_the_kernel_does() {
    require_fuse!();
    let (big, log) = (pattern(8 << 20, 1), pattern(1 << 20, 2));
    for (kernel, extra) in [
        (true, ""),
        (false, ""),
        (true, ",metacopy=on"),
        (false, ",metacopy=on"),
    ] {
        let who = format!("{}{extra}", if kernel { "kernel" } else { "layerfs" });
        let s = Scratch::new();
        let Some(mut disk) = Disk::new(&s, "disk") else {
            return;
        };
        let low = s.mkdir("low");
        write(low.join("big"), &big);
        write(low.join("log"), &log);
        let (up, work) = (disk.mnt.join("up"), disk.mnt.join("work"));
        fs::create_dir_all(&up).unwrap();
        fs::create_dir_all(&work).unwrap();
        let opts = rw_opts(&low, &up, &work) + extra;
        let mnt = s.path("mnt");
        let m = Either::mount(kernel, &opts, &mnt);
        chmod(mnt.join("big"), 0o600);
        // (With metacopy=on a metadata-only copy, whose data the append then brings up.)
        chmod(mnt.join("log"), 0o640);
        let mut f = OpenOptions::new()
            .append(true)
            .open(mnt.join("log"))
            .unwrap();
        f.write_all(b"appended").unwrap();
        drop(f);
        // A new file the user synced, as editors and databases do.
        let mut f = fs::File::create(mnt.join("saved")).unwrap();
        f.write_all(&log[..4096]).unwrap();
        f.sync_all().unwrap();
        drop(f);
        disk.commit_journal();
        power_cut_under(&mut disk, m, &mnt);

        // The renames were committed with the journal, so the copies are there.
        assert_eq!(mode_of(&up.join("big")), 0o600, "{who}");
        if extra.is_empty() {
            let got = fs::read(up.join("big")).unwrap();
            assert!(
                got == big,
                "{who}: the chmod's copy has {} bytes, not the lower file's",
                got.len()
            );
        }
        let got = fs::read(up.join("log")).unwrap_or_else(|e| panic!("{who}: upper log: {e}"));
        // The append was never synced: it may be lost, the lower bytes may not.
        assert!(
            got.len() >= log.len() && got[..log.len()] == log[..],
            "{who}: the appended-to copy lost lower bytes ({} bytes)",
            got.len()
        );
        assert!(
            got[log.len()..] == b"appended"[..] || got.len() == log.len(),
            "{who}"
        );
        let got = fs::read(up.join("saved")).unwrap_or_else(|e| panic!("{who}: saved: {e}"));
        assert!(
            got == log[..4096],
            "{who}: a synced file has {} bytes",
            got.len()
        );
        // And the union mounts again over it, reading the copies.
        let _m = Either::mount(kernel, &opts, &mnt);
        assert!(
            fs::read(mnt.join("big")).unwrap() == big,
            "{who}: big through the mount"
        );
        let got = fs::read(mnt.join("log")).unwrap();
        assert!(got[..log.len()] == log[..], "{who}: log through the mount");
    }
}

/// On an xfs holding lower and upper, a copy-up clones the lower file (a reflink) and, as
/// the kernel's, skips the fsync: the clone is metadata, logged in order before the rename.
/// After a cut with the log committed every copy is whole; after a cut without, each name
/// shows the whole copy or the lower file, never an empty or partial copy; and a writer's
/// fsync makes its file's copy-up durable with its data. Checked for the kernel and layerfs
/// alike.
#[test]
fn a_power_cut_after_reflinked_copy_ups_leaves_each_copy_whole_or_absent() {
    require_fuse!();
    let big = pattern(8 << 20, 4);
    for (kernel, committed) in [(true, true), (false, true), (true, false), (false, false)] {
        let who = format!(
            "{}, log {}committed",
            if kernel { "kernel" } else { "layerfs" },
            if committed { "" } else { "not " }
        );
        let s = Scratch::new();
        let Some(mut disk) = Disk::made_with(&s, "disk", "xfs", &[]) else {
            return;
        };
        let low = disk.mnt.join("low");
        for n in ["a", "b", "c"] {
            write(low.join(n), &big);
        }
        let (up, work) = (disk.mnt.join("up"), disk.mnt.join("work"));
        fs::create_dir_all(&up).unwrap();
        fs::create_dir_all(&work).unwrap();
        // The lower files are on disk before the copy-ups (xfs writes no data with its log).
        for n in ["a", "b", "c"] {
            fs::File::open(low.join(n)).unwrap().sync_all().unwrap();
        }
        let opts = rw_opts(&low, &up, &work);
        let mnt = s.path("mnt");
        let m = Either::mount(kernel, &opts, &mnt);
        chmod(mnt.join("a"), 0o600);
        // b's writer syncs: its copy-up, never fsynced itself, must then be on disk too.
        let mut f = OpenOptions::new().append(true).open(mnt.join("b")).unwrap();
        f.write_all(b"appended").unwrap();
        f.sync_all().unwrap();
        drop(f);
        OpenOptions::new().write(true).open(mnt.join("c")).unwrap();
        if committed {
            disk.commit_journal();
        }
        power_cut_under(&mut disk, m, &mnt);

        for n in ["a", "b", "c"] {
            match fs::read(up.join(n)) {
                Ok(got) => assert!(
                    got.len() >= big.len() && got[..big.len()] == big[..],
                    "{who}: the copy of {n} has {} bytes, not the lower file's",
                    got.len()
                ),
                Err(e) => {
                    assert!(!committed, "{who}: no copy of {n}: {e}");
                    eprintln!("{who}: the copy of {n} is gone with the cut");
                }
            }
        }
        if committed {
            assert_eq!(mode_of(&up.join("a")), 0o600, "{who}");
        }
        let b = fs::read(up.join("b")).unwrap_or_default();
        assert!(
            b.get(big.len()..) == Some(&b"appended"[..]),
            "{who}: the synced append is lost ({} bytes in b's copy)",
            b.len()
        );
        // The union mounts again and reads every file whole.
        let _m = Either::mount(kernel, &opts, &mnt);
        for n in ["a", "b", "c"] {
            let got = fs::read(mnt.join(n)).unwrap();
            assert!(got[..big.len()] == big[..], "{who}: {n} through the mount");
        }
    }
}

/// Cut the power of `disk` under mount `m` at `mnt`, take the mount down (a layerfs daemon
/// by kill -9: it cannot unmount a dead disk cleanly), and power on again.
fn power_cut_under(disk: &mut Disk, m: Either, mnt: &Path) {
    disk.cut_power();
    if let Either::Layerfs(_) = &m {
        kill_daemon(mnt);
    }
    drop(m);
    disk.power_on();
}

fn mode_of(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

/// `image load` and `container commit` make a layer visible by a rename; after the cut
/// every file of every stored layer holds its bytes, as in a store loaded on a disk that
/// never lost power (before, the busybox binary and the layers' `size` files were empty).
#[test]
fn a_power_cut_after_image_load_and_commit_leaves_every_layer_whole() {
    require_fuse!();
    let s = Scratch::new();
    let Some(mut disk) = Disk::new(&s, "disk") else {
        return;
    };
    let archive = fixture("docker-save-multi.tar");
    let archive = archive.to_str().unwrap();
    let (reference, root) = (s.path("reference"), disk.mnt.join("store"));
    for r in [&reference, &root] {
        let (ok, _o, err) = lfs(r, &["image", "load", archive]);
        assert!(ok, "image load: {err}");
    }
    // A committed layer too: one new file in a container of the top image.
    let mnt = s.mkdir("mnt");
    let ok = |args: &[&str]| {
        let (ok, out, err) = lfs(&root, args);
        assert!(ok, "layerfs {args:?}: {err}");
        out
    };
    ok(&["container", "create", "bb-multi-docker:1", "--name", "c"]);
    ok(&["container", "mount", "c", mnt.to_str().unwrap()]);
    let data = pattern(3 << 20, 3);
    let written = fs::write(mnt.join("new-file"), &data);
    ok(&["container", "umount", "c"]);
    written.unwrap();
    ok(&["container", "commit", "c", "committed:1"]);
    disk.commit_journal();
    disk.cut_power();
    disk.power_on();

    let stored = snapshot(&root.join("layers"));
    let expected = snapshot(&reference.join("layers"));
    for (path, info) in &expected {
        assert_eq!(
            stored.get(path),
            Some(info),
            "{} after the power cut",
            String::from_utf8_lossy(path)
        );
    }
    let committed = ok(&["image", "inspect", "committed:1"]);
    let v: serde_json::Value = serde_json::from_str(&committed).unwrap();
    let top = v[0]["RootFS"]["Layers"].as_array().unwrap().last().unwrap();
    let hex = top.as_str().unwrap().trim_start_matches("sha256:");
    let got = fs::read(root.join("layers").join(hex).join("diff/new-file")).unwrap();
    assert!(
        got == data,
        "the committed layer's file has {} bytes",
        got.len()
    );
    // The container's record is whole too.
    assert!(
        ok(&["container", "ls"]).contains("\nc "),
        "container c listed"
    );
}
