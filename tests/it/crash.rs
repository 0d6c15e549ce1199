//! kill -9 of the daemon in the middle of copy-ups and of a create/unlink storm: after a
//! remount nothing is partial, nothing deleted comes back, and the workdir blocks nothing.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::time::Duration;

use crate::require_fuse;
use crate::support::*;

const FILES: usize = 4;
const SIZE: usize = 8 << 20;

fn content(i: usize) -> Vec<u8> {
    (0..SIZE)
        .map(|j| ((i * 31 + j / 4096) % 251) as u8)
        .collect()
}

#[test]
fn kill_9_during_copy_ups_and_deletes_leaves_a_consistent_upper() {
    require_fuse!();
    let s = Scratch::new();
    let low = s.mkdir("low");
    for i in 0..FILES {
        write(low.join(format!("big{i}")), &content(i));
    }
    for i in 0..400 {
        write(low.join(format!("del/{i:03}")), b"lower");
    }
    let (up, work) = (s.mkdir("up"), s.mkdir("work"));
    let opts = rw_opts(&low, &up, &work);
    let mnt = s.path("mnt");
    // Dozens of cycles in CI; scripts/soak runs hundreds (LAYERFS_CRASH_ROUNDS).
    let rounds: u64 = std::env::var("LAYERFS_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(24);
    let mut rng = 0x5eed_u64;
    for round in 0..rounds {
        let m = Layerfs::mount(&opts, &mnt);
        // Writers: append to every big file (each append copies 24 MiB up first), delete lower
        // files one by one, recording each delete that returned success.
        let mp = m.mnt.clone();
        let log = s.path(&format!("deleted{round}"));
        let worker = std::thread::spawn(move || {
            let mut done = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
                .unwrap();
            for i in 0..FILES {
                let _ = OpenOptions::new()
                    .append(true)
                    .open(mp.join(format!("big{i}")))
                    .and_then(|mut f| f.write_all(b"tail"));
                for j in 0..60 {
                    let n = format!("{:03}", (round as usize * 97 + i * 60 + j) % 400);
                    if fs::remove_file(mp.join("del").join(&n)).is_ok() {
                        writeln!(done, "{n}").unwrap();
                    }
                    let _ = fs::write(mp.join(format!("new{round}-{j}")), b"n");
                }
            }
        });
        // Kill at a pseudo-random moment: mid copy-up, mid delete storm, or after the work.
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        std::thread::sleep(Duration::from_millis(5 + (rng >> 33) % 250));
        kill_daemon(&mnt);
        worker.join().unwrap();
        drop(m);

        let m = Layerfs::mount(&opts, &mnt);
        assert_eq!(
            fs::read_dir(work.join("work")).unwrap().count(),
            0,
            "workdir emptied at mount"
        );
        for i in 0..FILES {
            let got = fs::read(m.mnt.join(format!("big{i}"))).unwrap();
            let want = content(i);
            // The lower bytes, then one whole "tail" per round whose append completed.
            let tails = &got[want.len().min(got.len())..];
            assert!(
                got.starts_with(&want)
                    && tails.len() <= 4 * 2 * (round as usize + 1)
                    && tails.chunks(4).all(|c| c == b"tail"),
                "round {round}: big{i} is partial ({} bytes)",
                got.len()
            );
        }
        let deleted = fs::read_to_string(s.path(&format!("deleted{round}"))).unwrap_or_default();
        for n in deleted.lines() {
            assert!(
                !m.mnt.join("del").join(n).exists(),
                "round {round}: deleted {n} came back"
            );
        }
        // A later copy-up still works.
        OpenOptions::new()
            .append(true)
            .open(m.mnt.join("big0"))
            .unwrap()
            .write_all(b"")
            .unwrap();
        let before = snapshot(&m.mnt);
        drop(m);
        // The kernel can mount what the crash left, and sees the same tree.
        let kw = s.mkdir(&format!("kw{round}"));
        let k = Kernel::mount(&rw_opts(&low, &up, &kw), &s.path("kmnt"));
        assert_same_tree("kernel after crash", &before, &snapshot(&k.mnt));
    }
}

#[test]
fn a_volatile_upper_is_refused_until_its_marker_is_removed_as_by_the_kernel() {
    require_fuse!();
    let s = Scratch::new();
    let low = s.mkdir("low");
    write(low.join("f"), b"lower");
    // `volatile` skips the fsync of copy-ups: a crash can leave a copied-up file empty over
    // the lower data. The kernel marks such a workdir (work/incompat/volatile/dirty) and then
    // refuses it until someone who knows the upper reached the disk removes the marker.
    for (n, by_kernel) in [(0, true), (1, false)] {
        let (up, work) = (s.mkdir(&format!("up{n}")), s.mkdir(&format!("work{n}")));
        let opts = rw_opts(&low, &up, &work);
        let volatile = format!("{opts},volatile");
        let mnt = s.path(&format!("mnt{n}"));
        let who = if by_kernel { "the kernel" } else { "layerfs" };
        {
            let (_k, _l);
            let m = if by_kernel {
                _k = Kernel::mount(&volatile, &mnt);
                &_k.mnt
            } else {
                _l = Layerfs::mount(&volatile, &mnt);
                &_l.mnt
            };
            let mut f = OpenOptions::new().append(true).open(m.join("f")).unwrap();
            f.write_all(b"+up").unwrap();
        }
        assert!(
            work.join("work/incompat/volatile/dirty").is_file(),
            "a volatile mount by {who} leaves its marker"
        );
        let refused = Kernel::try_mount(&opts, &mnt);
        assert!(refused.is_err(), "the kernel refuses what {who} left");
        for o in [&opts, &volatile] {
            let e = Layerfs::try_mount(o, &mnt)
                .err()
                .unwrap_or_else(|| panic!("layerfs mounted what {who} left ({o})"));
            assert!(
                e.contains("incompat feature 'volatile'") && !e.contains('\n'),
                "one-line error: {e}"
            );
        }
        assert!(
            work.join("work/incompat/volatile/dirty").is_file(),
            "a refused mount keeps the marker"
        );
        // What a runtime does once it knows the upper reached the disk.
        fs::remove_dir_all(work.join("work/incompat")).unwrap();
        let m = Layerfs::mount(&opts, &mnt);
        assert_eq!(fs::read(m.mnt.join("f")).unwrap(), b"lower+up");
        drop(m);
        assert!(
            !work.join("work/incompat").exists(),
            "a mount without volatile leaves no marker"
        );
    }
}
