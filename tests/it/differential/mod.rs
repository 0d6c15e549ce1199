//! The standing differential harness: from a seed, random lower layers and a random operation
//! sequence run in lockstep on kernel overlayfs (redirect_dir=on) and layerfs; every outcome and
//! errno is compared, the whole tree periodically, and at the end persistence and interop.
//! Now and then both mounts go down and come up again (`Op::Remount`; half the time the
//! layerfs daemon is killed with -9 instead of unmounted), and the run goes on over what each
//! read back from disk. Kept fds, read-only or read-write, outlive what happens to their
//! names: the run reads, writes, truncates, chmods, fallocates and copies through them.
//!
//! A mismatch prints the seed, the operation index and a shrunk reproduction; a stuck
//! operation ends the process the same way (see `watchdog`). Replay with
//! `LAYERFS_SEED=<seed> [LAYERFS_OPS=<n>] cargo test --test it differential::replay -- --ignored`
//! (`LAYERFS_KEEP=i,j,...` then runs only those operations, as a shrunk reproduction names them).
//! CI runs `LAYERFS_SEEDS` seeds (default 40) of `LAYERFS_OPS` operations (default 120);
//! `LAYERFS_DIFF_OPTIONS` adds mount options to both sides (e.g. `metacopy=on`; `userxattr`
//! soaks the rootless format: no redirects on the kernel's side, `user.overlay.*` markers in
//! the generated layers); odd seeds
//! run layerfs over /dev/fuse (`io_uring=0`), even ones over io_uring where the kernel offers it.
//! `LAYERFS_DIFF_FILLERS=N` puts N layers holding only the directories of each layer below
//! it, so directories merge over more than 8 layers (the merged name index; with
//! `LAYERFS_DIFF_OURS=catalog=FILE` the catalog too, across the remount at the end).
//! `LAYERFS_DIFF_DATA=N` adds N data-only layers (`::`) and metadata-only copies pointing
//! into them; CI runs a few seeds so. `LAYERFS_DIFF_UPPER_FS=tmpfs` puts the uppers and
//! workdirs on a tmpfs of their own, the lowers staying where they are: the layers on two
//! filesystems, where origins must name the lower one (the inode numbers of layerfs and
//! the kernel then differ by design and are not compared with each other, only across a
//! remount). `LAYERFS_DIFF_LOWER_FS=tmpfs` copies the bottom lower layer onto a tmpfs
//! (with the other, the layers span three filesystems). `LAYERFS_DIFF_FS=xfs` (or `btrfs`,
//! `ext4`) puts the whole run on a fresh filesystem of that type on a loop device: copy-up
//! clones data there (reflinks), and the filesystem's own file handles and UUID make the
//! origins.

pub(crate) mod generate;
mod ops;
mod watchdog;

use std::os::unix::fs::MetadataExt;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::pair::{Pair, Placement};
use crate::require_fuse;
use crate::support::get_xattr;
use generate::Rng;
use ops::{Op, Side};

/// Where kernel and layerfs first disagreed.
#[derive(Debug)]
struct Mismatch {
    index: usize,
    detail: String,
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Both mounts of a run; `LAYERFS_DIFF_OPTIONS` adds mount options to both (say
/// `metacopy=on`, to soak metadata-only copy-up against the kernel's). Odd seeds mount
/// layerfs with `io_uring=0`, so both transports are covered wherever the kernel offers
/// io_uring; `LAYERFS_DIFF_OURS` replaces that with options for layerfs alone.
fn pair_for(seed: u64, setup: Setup) -> Pair {
    let (extra, ours) = options_for(seed);
    let fillers = env_u64("LAYERFS_DIFF_FILLERS", 0) as usize;
    Pair::build_on(
        |s| {
            let lowers = generate::layers(&mut Rng::new(seed), s);
            let data = generate::data_layers(seed, s, &lowers, setup.data_layers);
            (generate::with_fillers(lowers, s, fillers), data)
        },
        &extra,
        &ours,
        setup.on,
    )
}

/// How the layers of a run are made, beyond what the seed decides.
#[derive(Clone, Copy)]
struct Setup {
    /// Data-only layers under the lower ones.
    data_layers: usize,
    /// Where the layers go (tmpfs mounts, another filesystem type).
    on: Placement,
}

impl Setup {
    fn from_env() -> Setup {
        Setup {
            data_layers: env_u64("LAYERFS_DIFF_DATA", 0) as usize,
            on: Placement {
                upper: tmpfs_wanted("LAYERFS_DIFF_UPPER_FS"),
                bottom_lower: tmpfs_wanted("LAYERFS_DIFF_LOWER_FS"),
                fs: fs_wanted(),
            },
        }
    }
}

/// Does environment variable `var` ask for a tmpfs (`tmpfs`; unset: no)?
fn tmpfs_wanted(var: &str) -> bool {
    match std::env::var(var).as_deref() {
        Ok("tmpfs") => true,
        Ok(other) => panic!("{var}={other}: only tmpfs is known"),
        Err(_) => false,
    }
}

/// The filesystem type `LAYERFS_DIFF_FS` asks the whole run to be on (unset: /tmp's).
fn fs_wanted() -> Option<&'static str> {
    match std::env::var("LAYERFS_DIFF_FS").as_deref() {
        Ok("ext4") => Some("ext4"),
        Ok("xfs") => Some("xfs"),
        Ok("btrfs") => Some("btrfs"),
        Ok(other) => panic!("LAYERFS_DIFF_FS={other}: ext4, xfs or btrfs"),
        Err(_) => None,
    }
}

/// (options for both mounts, options for layerfs alone) of a run from `seed`.
fn options_for(seed: u64) -> (String, String) {
    let extra = std::env::var("LAYERFS_DIFF_OPTIONS").unwrap_or_default();
    let ours = std::env::var("LAYERFS_DIFF_OURS")
        .unwrap_or_else(|_| if seed % 2 == 1 { "io_uring=0" } else { "" }.into());
    (extra, ours)
}

/// Expected difference (docs/SEMANTICS.md): with metacopy=on the kernel refuses a link
/// whose source path would make too long a redirect; FUSE's LINK carries no source name, so
/// layerfs measures the file's shortest known name and may make the link. The extra name is
/// removed again (found by the metacopy soak, seed 972115), so the trees stay comparable.
/// Returns the kernel's inode number of the file so linked.
fn linked_by_another_name(p: &Pair, op: &Op, ko: &str, lo: &str) -> Option<u64> {
    let Op::Link { from, to } = op else {
        return None;
    };
    if !refused_for_a_long_path(p, from, ko, lo) {
        return None;
    }
    let ino = std::fs::symlink_metadata(p.kmnt().join(from)).ok()?.ino();
    std::fs::remove_file(p.lmnt().join(to)).ok()?;
    Some(ino)
}

/// With metacopy=on the kernel answered EXDEV (where layerfs succeeded), for a source path
/// whose absolute redirect ("/" + the path) would be longer than 256 bytes.
fn refused_for_a_long_path(p: &Pair, from: &Path, ko: &str, lo: &str) -> bool {
    let metacopy = p.extra.split(',').any(|o| o == "metacopy=on");
    metacopy && ko == "err:18" && lo == "ok" && from.as_os_str().len() >= 256
}

/// Follows from the difference above: the file layerfs linked carries on as the kernel's
/// copy would after a link through its short name (its absolute redirect set, so it moves),
/// while the kernel, having refused, still refuses to move it by its long path (metacopy
/// soak, seed 1421007). Such a move the kernel refused is not run on layerfs.
fn move_refused_after_another_name_linked(p: &Pair, op: &Op, ko: &str, linked: &[u64]) -> bool {
    let Op::Rename { from, .. } = op else {
        return false;
    };
    refused_for_a_long_path(p, from, ko, "ok")
        && std::fs::symlink_metadata(p.kmnt().join(from)).is_ok_and(|m| linked.contains(&m.ino()))
}

/// With metacopy=on layerfs copies a lower hard link up whole where the kernel's copy is
/// metadata-only (SEMANTICS), and marks it so that it still refuses what the kernel would.
/// The kernel knows nothing of that mark. Once the mounts have swapped uppers, each writes
/// over the other's copies, and the two uppers can end up holding one file in forms that
/// read differently: the kernel sees a whole copy (and links or moves it by a path too
/// long for a redirect) where layerfs sees a metadata-only one (and refuses, EXDEV, as the
/// kernel does over its own such copy: metacopy soak with data-only layers, seed 1530524).
/// Neither side is the reference there: such an operation is run on neither.
fn copies_read_differently(p: &Pair, op: &Op) -> bool {
    let (Op::Link { from, .. } | Op::Rename { from, .. }) = op else {
        return false;
    };
    // Whether a copy in `upper` is metadata-only: to the kernel (its mark) or to layerfs
    // (that mark or layerfs's whole-copy mark).
    let meta = |upper: PathBuf, marks: &[&str]| {
        let copy = upper.join(from);
        std::fs::symlink_metadata(&copy).is_ok()
            && marks.iter().any(|m| get_xattr(&copy, m).is_some())
    };
    const META: &str = "trusted.overlay.metacopy";
    const WHOLE: &str = "trusted.overlay.layerfs.wholecopy";
    p.crossed
        && refused_for_a_long_path(p, from, "err:18", "ok")
        && meta(p.kernel_dirs().0, &[META]) != meta(p.layerfs_dirs().0, &[META, WHOLE])
}

/// `LAYERFS_DIFF_DROP_CACHES=1`: each `Check` first drops the kernel's cached dentries and
/// inodes, as memory pressure does.
fn drop_caches_at_checks() -> bool {
    env_u64("LAYERFS_DIFF_DROP_CACHES", 0) != 0
}

/// Run `ops` (or generate `n` of them when `ops` is None) on a fresh pair for `seed`.
/// Returns the operations run and the first mismatch, if any.
fn run(seed: u64, setup: Setup, ops: Option<&[Op]>, n: usize) -> (Vec<Op>, Option<Mismatch>) {
    let mut p = pair_for(seed, setup);
    let mut k = Side::new(p.kmnt());
    let mut l = Side::new(p.lmnt());
    let mut rng = Rng::new(seed.wrapping_mul(31).wrapping_add(7));
    let mut done = Vec::new();
    // Kernel inode numbers of files layerfs linked where the kernel refused.
    let mut linked = Vec::new();
    let total = ops.map_or(n, |o| o.len());
    for i in 0..total {
        let op = match ops {
            Some(o) => o[i].clone(),
            None => ops::random_op(&mut rng, &ops::listing(p.kmnt())),
        };
        done.push(op.clone());
        watchdog::beat(format!("seed {seed}, op {i}: {op:?}"), p.scratch_root());
        if let Op::Remount { kill, swap } = op {
            drop((k, l));
            p.remount_both(kill, swap);
            (k, l) = (Side::new(p.kmnt()), Side::new(p.lmnt()));
        }
        if matches!(op, Op::Check) && drop_caches_at_checks() {
            // Both kernels forget every unused dentry and inode: a directory of the mount
            // may go while a file in it stays open by another name (seed 1631371's kind).
            std::fs::write("/proc/sys/vm/drop_caches", "2").expect("drop_caches");
        }
        let skip = copies_read_differently(&p, &op);
        let ko = if skip {
            "not run".to_string()
        } else {
            ops::apply_kernel(&mut k, &op)
        };
        let lo = match skip || move_refused_after_another_name_linked(&p, &op, &ko, &linked) {
            true => ko.clone(),
            false => ops::apply(&mut l, &op),
        };
        let accepted = ko == lo
            || l.kept_as_opened(&op, &lo)
            || linked_by_another_name(&p, &op, &ko, &lo)
                .map(|ino| linked.push(ino))
                .is_some();
        if !accepted {
            return (
                done,
                Some(Mismatch {
                    index: i,
                    detail: format!("{op:?}\n  kernel:  {ko}\n  layerfs: {lo}"),
                }),
            );
        }
        if matches!(op, Op::Check | Op::Remount { .. }) || i % 10 == 9 || i + 1 == total {
            // A tree difference is a mismatch of this operation.
            let r =
                std::panic::catch_unwind(AssertUnwindSafe(|| p.check(&format!("after op {i}"))));
            if let Err(e) = r {
                return (
                    done,
                    Some(Mismatch {
                        index: i,
                        detail: panic_text(e),
                    }),
                );
            }
        }
    }
    drop((k, l));
    watchdog::beat(
        format!("seed {seed}, remount and interop"),
        p.scratch_root(),
    );
    let r = std::panic::catch_unwind(AssertUnwindSafe(|| {
        p.assert_no_panic();
        p.check_interop();
        p.assert_no_panic();
    }));
    let m = r.err().map(|e| Mismatch {
        index: total,
        detail: panic_text(e),
    });
    (done, m)
}

fn panic_text(e: Box<dyn std::any::Any + Send>) -> String {
    e.downcast_ref::<String>()
        .cloned()
        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic".into())
}

/// Drop chunks of the operation list while the run still mismatches (bounded tries).
/// Each operation keeps its index in the generated sequence (`LAYERFS_KEEP` replays a subset).
fn shrink(seed: u64, setup: Setup, mut ops: Vec<(usize, Op)>) -> Vec<(usize, Op)> {
    let deadline = Instant::now() + Duration::from_secs(env_u64("LAYERFS_SHRINK_SECS", 90));
    let mut chunk = ops.len() / 2;
    while chunk >= 1 && Instant::now() < deadline {
        let mut i = 0;
        let mut progressed = false;
        while i < ops.len() && Instant::now() < deadline {
            let mut candidate = ops.clone();
            candidate.drain(i..(i + chunk).min(ops.len()));
            let (_, m) = run(seed, setup, Some(&only_ops(&candidate)), 0);
            if m.is_some() {
                ops = candidate;
                progressed = true;
            } else {
                i += chunk;
            }
        }
        if !progressed {
            chunk /= 2;
        }
    }
    ops
}

fn only_ops(ops: &[(usize, Op)]) -> Vec<Op> {
    ops.iter().map(|(_, o)| o.clone()).collect()
}

/// Run one seed; on mismatch, shrink and fail with a reproduction.
fn check_seed(seed: u64, setup: Setup, n: usize) -> usize {
    let (ops, m) = run(seed, setup, None, n);
    let Some(m) = m else { return ops.len() };
    let upto = ops[..=m.index.min(ops.len() - 1)]
        .iter()
        .cloned()
        .enumerate()
        .collect();
    let small = shrink(seed, setup, upto);
    let repro: Vec<String> = small.iter().map(|(i, o)| format!("  {i}: {o:?}")).collect();
    let keep: Vec<String> = small.iter().map(|(i, _)| i.to_string()).collect();
    panic!(
        "differential mismatch: seed {seed}, operation {} of {}\n{}\n\nshrunk reproduction ({} ops; the layers come from the seed):\n{}\n\
         replay: LAYERFS_SEED={seed} LAYERFS_OPS={}{} cargo test --test it differential::replay -- --ignored --nocapture\n\
         (the shrunk one alone: add LAYERFS_KEEP={})",
        m.index,
        ops.len(),
        m.detail,
        small.len(),
        repro.join("\n"),
        m.index + 1,
        replay_env(),
        keep.join(",")
    );
}

/// The settings of this run a replay needs besides the seed (options, extra layers).
fn replay_env() -> String {
    [
        "LAYERFS_DIFF_DATA",
        "LAYERFS_DIFF_DROP_CACHES",
        "LAYERFS_DIFF_FILLERS",
        "LAYERFS_DIFF_FS",
        "LAYERFS_DIFF_OPTIONS",
        "LAYERFS_DIFF_OURS",
        "LAYERFS_DIFF_LOWER_FS",
        "LAYERFS_DIFF_UPPER_FS",
    ]
    .iter()
    .filter_map(|k| std::env::var(k).ok().map(|v| format!(" {k}={v}")))
    .collect()
}

#[test]
fn random_operations_match_kernel_overlayfs() {
    run_seeds("differential", 1, 0, |_| Setup::from_env());
}

/// The same over two data-only layers: metadata-only copies whose data the kernel looks up
/// there at the first open or copy-up.
#[test]
fn random_operations_over_data_only_layers_match_kernel_overlayfs() {
    let setup = Setup {
        data_layers: 2,
        on: Placement::default(),
    };
    run_seeds("differential over data-only layers", 4, 100_000, |_| setup);
}

/// The same with the uppers and workdirs on a tmpfs, the lowers where they are: the layers
/// on two filesystems (origins must name the lower one; session 36 found a null-UUID lower
/// misread there). Odd seeds copy the bottom lower layer onto a tmpfs of its own too.
#[test]
fn random_operations_with_the_upper_on_another_filesystem_match_kernel_overlayfs() {
    let setup = |seed: u64| Setup {
        data_layers: 0,
        on: Placement {
            upper: true,
            bottom_lower: seed % 2 == 1,
            fs: None,
        },
    };
    run_seeds("differential with the upper on a tmpfs", 8, 200_000, setup);
}

/// The same with the whole run on an xfs (even seeds) or a btrfs (odd ones) of its own:
/// copy-up clones the data there, and the origins carry those filesystems' own file
/// handles and UUIDs (btrfs answers no FS_IOC_GETFSUUID; layerfs made no origins there
/// before session 37).
#[test]
fn random_operations_on_xfs_and_btrfs_match_kernel_overlayfs() {
    // Each filesystem made and mounted once first: where that fails (no mkfs, no kernel
    // support), the test says so and skips.
    let probe = crate::support::Scratch::new();
    for fstype in ["xfs", "btrfs"] {
        if crate::support::Disk::made_with(&probe, fstype, fstype, &[]).is_none() {
            eprintln!("SKIPPED {}: no {fstype} disk here", module_path!());
            return;
        }
    }
    let setup = |seed: u64| Setup {
        data_layers: 0,
        on: Placement {
            fs: Some(if seed.is_multiple_of(2) {
                "xfs"
            } else {
                "btrfs"
            }),
            ..Placement::default()
        },
    };
    run_seeds("differential on xfs and btrfs", 8, 300_000, setup);
}

/// `LAYERFS_SEEDS` / `share` seeds of `LAYERFS_OPS` operations, from `LAYERFS_FIRST_SEED` +
/// `offset` (each test its own seeds), each with the setup `setup` gives it.
fn run_seeds(what: &str, share: u64, offset: u64, setup: impl Fn(u64) -> Setup) {
    require_fuse!();
    let seeds = env_u64("LAYERFS_SEEDS", 40) / share;
    let n = env_u64("LAYERFS_OPS", 120) as usize;
    let first = env_u64("LAYERFS_FIRST_SEED", 1) + offset;
    let start = Instant::now();
    let mut total = 0;
    for seed in first..first + seeds {
        total += check_seed(seed, setup(seed), n);
    }
    eprintln!(
        "{what}: {seeds} seeds, {total} operations, 0 mismatches, {:.1} s",
        start.elapsed().as_secs_f64()
    );
}

#[test]
#[ignore = "replays LAYERFS_SEED; run by hand"]
fn replay() {
    require_fuse!();
    let seed = env_u64("LAYERFS_SEED", 1);
    let n = env_u64("LAYERFS_OPS", 120) as usize;
    let (mut ops, mut m) = run(seed, Setup::from_env(), None, n);
    // `LAYERFS_KEEP=i,j,...`: then only those of the operations generated, on a fresh pair.
    if let Ok(keep) = std::env::var("LAYERFS_KEEP") {
        let keep: Vec<usize> = keep
            .split(',')
            .filter_map(|i| i.trim().parse().ok())
            .collect();
        ops = keep.iter().filter_map(|&i| ops.get(i).cloned()).collect();
        eprintln!("replaying operations {keep:?} of seed {seed} alone");
        m = run(seed, Setup::from_env(), Some(&ops), 0).1;
    }
    for (i, o) in ops.iter().enumerate() {
        eprintln!("{i}: {o:?}");
    }
    if let Some(m) = m {
        panic!("seed {seed}: mismatch at op {}: {}", m.index, m.detail);
    }
}

#[test]
#[ignore = "long-running; scripts/soak runs it"]
fn soak() {
    require_fuse!();
    let secs = env_u64("LAYERFS_SOAK_SECONDS", 60);
    let n = env_u64("LAYERFS_OPS", 200) as usize;
    let mut seed = env_u64("LAYERFS_FIRST_SEED", 1000);
    let start = Instant::now();
    let (mut seeds, mut total) = (0, 0);
    while start.elapsed() < Duration::from_secs(secs) {
        total += check_seed(seed, Setup::from_env(), n);
        seeds += 1;
        seed += 1;
    }
    let el = start.elapsed().as_secs_f64();
    eprintln!(
        "soak: {seeds} seeds, {total} ops in {el:.0} s ({:.0} ops/s incl. setup), 0 mismatches",
        total as f64 / el
    );
}

/// Several workers on one pair of mounts, each in lockstep inside its own subtree (which the
/// lower layers populate too), so one daemon serves concurrent requests from all of them.
#[test]
#[ignore = "long-running; scripts/soak runs it"]
fn soak_shared_mount() {
    require_fuse!();
    let secs = env_u64("LAYERFS_SOAK_SECONDS", 60);
    let workers = env_u64("LAYERFS_SOAK_WORKERS", 4);
    let seed = env_u64("LAYERFS_FIRST_SEED", 5000);
    let (extra, ours) = options_for(seed);
    let p = Pair::with_ours(
        |s| {
            let v = generate::layers(&mut Rng::new(seed), s);
            // Give every worker a subtree in each layer (moved from a fresh random tree).
            for (i, layer) in v.iter().enumerate() {
                for w in 0..workers {
                    let sub = crate::support::Scratch::new();
                    let t = generate::layers(&mut Rng::new(seed * 100 + w * 10 + i as u64), &sub);
                    let src = t.last().unwrap();
                    let dst = layer.join(format!("w{w}"));
                    let (ok, _o, e) = crate::support::run_timeout(
                        std::process::Command::new("cp")
                            .arg("-a")
                            .arg(src)
                            .arg(&dst),
                        60,
                    );
                    assert!(ok, "{e}");
                }
            }
            v
        },
        &extra,
        &ours,
    );
    let start = Instant::now();
    let total = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|sc| {
        for w in 0..workers {
            let (p, total) = (&p, &total);
            sc.spawn(move || {
                let prefix = std::path::PathBuf::from(format!("w{w}"));
                let mut k = Side::new(&p.kmnt().join(&prefix));
                let mut l = Side::new(&p.lmnt().join(&prefix));
                let mut rng = Rng::new(seed + w);
                let mut i = 0u64;
                let mut history: Vec<String> = Vec::new();
                while start.elapsed() < Duration::from_secs(secs) {
                    let op = ops::random_op(&mut rng, &ops::listing(&k.root));
                    // Workers share the mounts: none takes them down.
                    if matches!(op, Op::Remount { .. }) {
                        continue;
                    }
                    let (ko, lo) = (ops::apply_kernel(&mut k, &op), ops::apply(&mut l, &op));
                    history.push(format!("{i}: {op:?} -> {ko}"));
                    assert!(
                        ko == lo || l.kept_as_opened(&op, &lo),
                        "worker {w} op {i}: {op:?} (seed {seed}): kernel {ko}, layerfs {lo}\nthis worker's operations (in w{w}/):\n{}",
                        history.join("\n")
                    );
                    i += 1;
                    if i.is_multiple_of(50) {
                        assert_same_tree_of(&k.root, &l.root, w, i);
                    }
                }
                total.fetch_add(i, std::sync::atomic::Ordering::Relaxed);
            });
        }
    });
    p.check("end of shared soak");
    p.assert_no_panic();
    let n = total.into_inner();
    let el = start.elapsed().as_secs_f64();
    eprintln!(
        "shared-mount soak: {workers} workers, {n} ops in {el:.0} s ({:.0} ops/s), 0 mismatches",
        n as f64 / el
    );
}

fn assert_same_tree_of(k: &std::path::Path, l: &std::path::Path, w: u64, i: u64) {
    crate::support::assert_same_tree(
        &format!("worker {w} after op {i}"),
        &crate::support::snapshot(k),
        &crate::support::snapshot(l),
    );
}
