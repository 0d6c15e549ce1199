//! The two ways requests reach the daemon: FUSE over io_uring (per-CPU queues, when the
//! kernel offers it) and /dev/fuse. Both must give the same filesystem.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::require_fuse;
use crate::support::*;

const URING_PARAM: &str = "/sys/module/fuse/parameters/enable_uring";

/// Why this kernel will not offer FUSE over io_uring, if it won't.
fn uring_unavailable() -> Option<String> {
    match std::fs::read_to_string(URING_PARAM) {
        Err(_) => Some(format!(
            "{URING_PARAM} is missing (kernel without CONFIG_FUSE_IO_URING)"
        )),
        Ok(v) if v.trim() != "Y" => Some(format!(
            "fuse.enable_uring is off (echo Y > {URING_PARAM}; .ci/run does)"
        )),
        Ok(_) => None,
    }
}

/// A workload touching every kind of request that carries a payload: names (lookup,
/// create, mkdir, symlink, rename, unlink), data both ways through the daemon
/// (`passthrough=0`: 1 MiB writes and reads, the largest a ring entry carries),
/// directory listings of a few pages, xattrs, and copy-up of a lower file.
fn workload(m: &Path) {
    let big: Vec<u8> = (0..3 * 1024 * 1024 + 123)
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(m.join("big"), &big).unwrap();
    assert!(
        std::fs::read(m.join("big")).unwrap() == big,
        "big file read back"
    );
    std::fs::create_dir(m.join("many")).unwrap();
    for i in 0..600 {
        std::fs::write(
            m.join(format!("many/entry-with-a-longish-name-{i:04}")),
            b"x",
        )
        .unwrap();
    }
    let n = std::fs::read_dir(m.join("many")).unwrap().count();
    assert_eq!(n, 600, "listing of 600 entries");
    for i in 0..600 {
        if i % 3 == 0 {
            std::fs::remove_file(m.join(format!("many/entry-with-a-longish-name-{i:04}"))).unwrap();
        }
    }
    std::os::unix::fs::symlink("big", m.join("link")).unwrap();
    assert_eq!(
        std::fs::read_link(m.join("link")).unwrap(),
        Path::new("big")
    );
    std::fs::rename(m.join("big"), m.join("big2")).unwrap();
    set_xattr(m.join("big2"), "user.k", b"value");
    assert_eq!(
        get_xattr(m.join("big2"), "user.k").as_deref(),
        Some(&b"value"[..])
    );
    // Copy-up of a lower file by appending, and by chmod.
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(m.join("lower/a"))
        .unwrap();
    std::io::Write::write_all(&mut f, b" appended").unwrap();
    drop(f);
    chmod(m.join("lower/b"), 0o600);
    assert_eq!(
        std::fs::read(m.join("lower/a")).unwrap(),
        b"lower a appended"
    );
    assert_eq!(
        std::fs::metadata(m.join("lower/b"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    std::fs::remove_file(m.join("lower/c")).unwrap();
}

/// Replies over io_uring that woke a caller, idle or plain (`layerfs stats`).
fn commits(st: &serde_json::Value) -> u64 {
    let t = &st["transport"];
    t["idle_commits"].as_u64().unwrap() + t["plain_commits"].as_u64().unwrap()
}

fn layers(s: &Scratch) -> String {
    let l = s.mkdir("l");
    std::fs::create_dir(l.join("lower")).unwrap();
    write(l.join("lower/a"), b"lower a");
    write(l.join("lower/b"), b"lower b");
    write(l.join("lower/c"), b"lower c");
    rw_opts(&l, &s.mkdir("u"), &s.mkdir("w"))
}

#[test]
fn io_uring_and_dev_fuse_serve_the_same_filesystem() {
    require_fuse!();
    if let Some(r) = uring_unavailable() {
        eprintln!("SKIPPED {}: {r}", module_path!());
        return;
    }
    let mut trees = Vec::new();
    for uring in [true, false] {
        let s = Scratch::new();
        let opts = format!("{},passthrough=0,io_uring={}", layers(&s), u8::from(uring));
        let m = Layerfs::mount(&opts, &s.path("m"));
        workload(&m.mnt);
        let st = stats(&m.mnt);
        let (via_uring, via_dev) = (
            st["transport"]["io_uring"].as_u64().unwrap(),
            st["transport"]["dev_fuse"].as_u64().unwrap(),
        );
        if uring {
            // Replies are committed at SCHED_IDLE; a queue thread waiting for the next
            // request must be back at SCHED_OTHER (else it would serve it idle).
            let pid = daemon_pid(&m.mnt).expect("daemon pid");
            let policies = uring_thread_policies(pid);
            assert!(!policies.is_empty(), "no fuser-uring threads in {pid}");
            assert!(
                policies.iter().all(|(_, p)| *p == libc::SCHED_OTHER),
                "queue threads not at SCHED_OTHER while waiting: {policies:?}"
            );
            // FORGETs (and requests made before every queue registered) still use
            // /dev/fuse; everything else goes over the rings.
            assert!(
                via_uring > 9 * via_dev,
                "io_uring mount: {via_uring} requests over io_uring, {via_dev} over /dev/fuse"
            );
            // ... read by one thread per allowed CPU, at least 2, as without io_uring.
            assert_eq!(
                dev_fuse_threads(pid),
                cpus_allowed(pid).max(2),
                "/dev/fuse threads of an io_uring mount"
            );
            // Every reply that woke a caller was committed one way or the other.
            let commits = commits(&st);
            assert!(
                commits > via_uring / 2 && commits <= via_uring,
                "{commits} waking commits of {via_uring} requests over io_uring"
            );
        } else {
            assert_eq!(via_uring, 0, "io_uring=0 mount used io_uring");
            assert_eq!(commits(&st), 0, "io_uring=0 mount committed on a ring");
            assert!(via_dev > 1000, "{via_dev} requests over /dev/fuse");
            // One /dev/fuse thread per CPU the daemon may run on, at least 2.
            let pid = daemon_pid(&m.mnt).expect("daemon pid");
            assert_eq!(
                dev_fuse_threads(pid),
                cpus_allowed(pid).max(2),
                "/dev/fuse threads"
            );
        }
        trees.push((snapshot(&m.mnt), snapshot(&s.path("u"))));
        m.unmount();
    }
    assert_same_tree("union (io_uring vs /dev/fuse)", &trees[1].0, &trees[0].0);
    assert_same_tree(
        "upper layer (io_uring vs /dev/fuse)",
        &trees[1].1,
        &trees[0].1,
    );
}

/// (thread name, scheduling policy) of each thread of process `pid`.
fn thread_policies(pid: i32) -> Vec<(String, i32)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let stat = std::fs::read_to_string(t.unwrap().path().join("stat")).unwrap();
        let (head, rest) = stat.rsplit_once(") ").unwrap();
        let name = head.split_once(" (").unwrap().1.to_string();
        // Field 41 (policy); `rest` starts at field 3.
        let policy = rest.split(' ').nth(41 - 3).unwrap().parse().unwrap();
        out.push((name, policy));
    }
    out
}

/// (thread name, scheduling policy) of each io_uring queue thread of process `pid`.
fn uring_thread_policies(pid: i32) -> Vec<(String, i32)> {
    let mut out = thread_policies(pid);
    out.retain(|(name, _)| name.starts_with("fuser-uring"));
    out
}

/// How many CPUs process `pid` may run on (`Cpus_allowed_list: 0-1,4`).
fn cpus_allowed(pid: i32) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .expect("Cpus_allowed_list");
    list.trim()
        .split(',')
        .map(|r| match r.split_once('-') {
            Some((a, b)) => b.parse::<usize>().unwrap() - a.parse::<usize>().unwrap() + 1,
            None => 1,
        })
        .sum()
}

/// How many threads of process `pid` read /dev/fuse (fuser names them `fuser-N`).
fn dev_fuse_threads(pid: i32) -> usize {
    thread_policies(pid)
        .iter()
        .filter(|(name, _)| {
            name.strip_prefix("fuser-")
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        })
        .count()
}

#[test]
fn io_uring_option_is_checked() {
    assert_one_line_error(
        &["mount", "-o", "lowerdir=/tmp,io_uring=maybe", "/tmp"],
        "io_uring=maybe: expected io_uring=0 or io_uring=1",
    );
}

/// For a test of the fallback to /dev/fuse: a scratch dir, mount options over `layers`, the
/// mountpoint (made) and a path for the daemon's log. None, the skip printed, where FUSE or
/// FUSE over io_uring is missing (nothing would fall back).
fn fallback_case() -> Option<(Scratch, String, PathBuf, PathBuf)> {
    if let Some(r) = skip_reason().or_else(uring_unavailable) {
        eprintln!("SKIPPED {}: {r}", module_path!());
        return None;
    }
    let s = Scratch::new();
    let opts = layers(&s);
    let (mnt, log) = (s.path("m"), s.path("daemon.log"));
    std::fs::create_dir_all(&mnt).unwrap();
    Some((s, opts, mnt, log))
}

/// A daemon that may not lock memory (no CAP_IPC_LOCK, RLIMIT_MEMLOCK 0, as in a container)
/// cannot make its rings: io_uring counts them against the limit. Asked for io_uring at INIT,
/// the kernel would then hold every request for queues that never register: the mount hung.
/// The rings are made before INIT answers, so such a daemon serves over /dev/fuse.
#[test]
fn a_daemon_that_cannot_make_its_rings_serves_over_dev_fuse() {
    let Some((s, opts, mnt, log)) = fallback_case() else {
        return;
    };
    let (ok, _, err) = run_timeout(
        Command::new("prlimit")
            .args(["--memlock=0:0", "setpriv", "--bounding-set=-ipc_lock", BIN])
            .args(["mount", "-o", &opts])
            .arg(&mnt)
            .arg("--log-file")
            .arg(&log),
        30,
    );
    assert!(ok, "mount without CAP_IPC_LOCK: {err}");
    let m = Layerfs { mnt };
    // In a child with a deadline: on a hung mount the read would never return.
    let (ok, out, err) = run_timeout(Command::new("cat").arg(m.mnt.join("lower/a")), 10);
    assert!(
        ok && out == "lower a",
        "read through the mount: {ok} {out:?} {err}"
    );
    write(m.mnt.join("lower/b"), b"copied up");
    assert_eq!(std::fs::read(s.path("u/lower/b")).unwrap(), b"copied up");
    let st = stats(&m.mnt);
    assert_eq!(st["transport"]["io_uring"].as_u64(), Some(0), "{st}");
    assert!(st["transport"]["dev_fuse"].as_u64().unwrap() > 3, "{st}");
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(
        log.contains("transport: /dev/fuse (io_uring rings could not be made"),
        "daemon log: {log}"
    );
}

/// Where sysfs does not say how many CPUs the kernel makes queues for (a sandbox without
/// /sys), a guess of one queue left every request waiting for the others: the mount hung.
/// Now the daemon serves over /dev/fuse. Run in a private mount namespace with
/// /sys/devices/system/cpu hidden, which mounts, reads and unmounts there.
#[test]
fn a_daemon_that_cannot_count_the_kernels_queues_serves_over_dev_fuse() {
    let Some((_s, opts, mnt, log)) = fallback_case() else {
        return;
    };
    // In the namespace: hide the CPU list, mount, read with a deadline (on a hung mount the
    // read never returns), count the transports, unmount (a lazy unmount of a hung mount
    // with no user aborts its connection, so the daemon exits and the namespace goes).
    let script = r#"mount -t tmpfs none /sys/devices/system/cpu || exit 3
"$0" mount -o "$1" "$2" --log-file "$3" || exit 4
timeout 10 cat "$2/lower/a"; echo " rc=$?"
timeout 10 "$0" stats --format json "$2"
umount -l "$2""#;
    let (ok, out, err) = run_timeout(
        Command::new("unshare")
            .args([
                "-m",
                "--propagation",
                "private",
                "sh",
                "-c",
                script,
                BIN,
                &opts,
            ])
            .arg(&mnt)
            .arg(&log),
        40,
    );
    assert!(ok, "in a mount namespace: {out} {err}");
    assert!(
        out.starts_with("lower a rc=0\n"),
        "read through the mount: {out} {err}"
    );
    let st: serde_json::Value = serde_json::from_str(out.lines().nth(1).unwrap_or("")).unwrap();
    assert_eq!(st["transport"]["io_uring"].as_u64(), Some(0), "{st}");
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(
        log.contains("transport: /dev/fuse (no /sys/devices/system/cpu/possible"),
        "daemon log: {log}"
    );
}

/// The transports to test: /dev/fuse, and io_uring where the kernel offers it (else the
/// skip is printed).
fn transports() -> Vec<bool> {
    match uring_unavailable() {
        None => vec![false, true],
        Some(r) => {
            eprintln!("io_uring part skipped: {r}");
            vec![false]
        }
    }
}

/// Context switches so far of each thread of process `pid`: tid -> (name, count).
fn switches(pid: i32) -> std::collections::BTreeMap<String, (String, u64)> {
    let mut out = std::collections::BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        let Ok(status) = std::fs::read_to_string(t.path().join("status")) else {
            continue; // the thread ended meanwhile
        };
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        let n: u64 = ["voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:"]
            .iter()
            .map(|k| field(k).parse::<u64>().unwrap_or(0))
            .sum();
        out.insert(
            t.file_name().to_string_lossy().into_owned(),
            (field("Name:"), n),
        );
    }
    out
}

/// Requests the daemon has served (`layerfs stats`: every operation, FORGETs included).
fn requests(mnt: &Path) -> u64 {
    let st = stats(mnt);
    let t = &st["transport"];
    t["io_uring"].as_u64().unwrap() + t["dev_fuse"].as_u64().unwrap()
}

/// A mount nobody uses costs no CPU: no daemon thread wakes without a request (a host runs
/// one daemon per container; fuse-overlayfs sleeps likewise). And the daemon still leaves
/// as soon as it is unmounted, though no thread watches for that (its serving threads see
/// the connection end). Over io_uring and over /dev/fuse.
#[test]
fn an_idle_daemon_never_wakes_and_leaves_once_unmounted() {
    require_fuse!();
    for uring in transports() {
        let s = Scratch::new();
        let opts = format!("{},io_uring={}", layers(&s), u8::from(uring));
        let m = Layerfs::mount(&opts, &s.path("m"));
        workload(&m.mnt);
        let pid = daemon_pid(&m.mnt).expect("daemon pid");
        // The short-lived thread that locks the daemon's code in memory runs at SCHED_IDLE:
        // on a busy machine it may still be at it, and is no timer; it is left out.
        wait_until(10, || {
            !switches(pid).values().any(|(n, _)| n == "lock-code")
        });
        // Another test dropping the page cache makes the kernel send FORGETs to every
        // mount: a window in which requests came is measured again.
        let mut woke = None;
        for _ in 0..5 {
            let before = requests(&m.mnt);
            std::thread::sleep(std::time::Duration::from_millis(300));
            let a = switches(pid);
            std::thread::sleep(std::time::Duration::from_secs(2));
            let b = switches(pid);
            if requests(&m.mnt) != before {
                continue;
            }
            woke = Some(
                b.iter()
                    .filter(|(_, (name, _))| name != "lock-code")
                    .filter(|(tid, (_, n))| a.get(*tid).is_none_or(|(_, m)| m != n))
                    .map(|(tid, (name, n))| {
                        format!("{name} ({tid}): {} -> {n}", a.get(tid).map_or(0, |x| x.1))
                    })
                    .collect::<Vec<_>>(),
            );
            break;
        }
        let woke = woke.expect("requests kept coming to an idle mount for 5 windows of 2 s");
        assert!(
            woke.is_empty(),
            "io_uring={}: idle daemon threads woke within 2 s: {woke:?}",
            u8::from(uring)
        );
        let (ok, _o, err) = run_timeout(Command::new("umount").arg(&m.mnt), 10);
        assert!(ok, "umount: {err}");
        assert!(
            wait_until(3, || exited(pid)),
            "io_uring={}: daemon still running 3 s after umount",
            u8::from(uring)
        );
    }
}

/// SIGCONT for a process stopped by a test, whatever happens to the test.
struct Stopped(i32);

impl Drop for Stopped {
    fn drop(&mut self) {
        run_timeout(
            Command::new("kill").args(["-CONT", &self.0.to_string()]),
            10,
        );
    }
}

/// Is every thread of `pid` in the stopped state (`T` in its stat)?
fn all_threads_stopped(pid: i32) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/task")).is_ok_and(|tasks| {
        tasks.flatten().all(|t| {
            std::fs::read_to_string(t.path().join("stat")).is_ok_and(|s| {
                s.rsplit_once(") ")
                    .is_some_and(|(_, rest)| rest.starts_with('T'))
            })
        })
    })
}

/// Does a thread of `pid` wait for a FUSE reply (in a request to another FUSE mount)?
fn waits_on_fuse(pid: i32) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/task")).is_ok_and(|tasks| {
        tasks.flatten().any(|t| {
            std::fs::read_to_string(t.path().join("wchan"))
                .is_ok_and(|w| w.trim() == "request_wait_answer")
        })
    })
}

/// A request stuck for good (its lower layer is on a filesystem that stopped answering) must
/// not keep the daemon, and with it the lock on the upper and work dirs, once the connection
/// has ended: the daemon exits after a grace period, and the same upper mounts again. No
/// thread watches the connection while the mount lives (see the idle test above).
#[test]
fn a_stuck_request_does_not_keep_the_daemon_once_its_connection_ends() {
    require_fuse!();
    for uring in transports() {
        let s = Scratch::new();
        let low = s.mkdir("low");
        std::fs::create_dir(low.join("sub")).unwrap();
        for i in 0..50 {
            write(low.join(format!("sub/f{i}")), format!("{i}").as_bytes());
        }
        // The lower layer of the mount under test is itself a FUSE mount (read-only), over
        // /dev/fuse: a request it never read can be killed, where one already handed to a
        // daemon (over a ring, or read and then stopped) is waited out by the kernel, and
        // no process can leave while one of its threads waits so (nor could the watcher
        // thread's exit that this replaces).
        let inner = Layerfs::mount(
            &format!("lowerdir={},io_uring=0", low.display()),
            &s.path("inner"),
        );
        let opts = format!(
            "{},io_uring={}",
            rw_opts(&inner.mnt, &s.mkdir("u"), &s.mkdir("w")),
            u8::from(uring)
        );
        let outer = Layerfs::mount(&opts, &s.path("m"));
        let conn = {
            let dev = std::os::unix::fs::MetadataExt::dev(&std::fs::metadata(&outer.mnt).unwrap());
            (dev & 0xff) | ((dev >> 12) & 0xfff00)
        };
        let abort = PathBuf::from(format!("/sys/fs/fuse/connections/{conn}/abort"));
        if !abort.exists() {
            run_timeout(
                Command::new("mount").args(["-t", "fusectl", "none", "/sys/fs/fuse/connections"]),
                10,
            );
        }
        if !abort.exists() {
            eprintln!(
                "SKIPPED {}: no {} (fusectl)",
                module_path!(),
                abort.display()
            );
            return;
        }
        let (inner_pid, outer_pid) = (
            daemon_pid(&inner.mnt).expect("inner daemon"),
            daemon_pid(&outer.mnt).expect("outer daemon"),
        );
        let stopped = Stopped(inner_pid);
        run_timeout(
            Command::new("kill").args(["-STOP", &inner_pid.to_string()]),
            10,
        );
        // kill(1) returns once the signal is queued; the group stop reaches the other
        // threads only after the one picked for it runs, and until then they still serve
        // requests (CI's loaded machine saw the stat below answered).
        assert!(
            wait_until(10, || all_threads_stopped(inner_pid)),
            "inner daemon not stopped 10 s after SIGSTOP"
        );
        let stat = Reaped(
            Command::new("stat")
                .arg(outer.mnt.join("sub/f7"))
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        );
        assert!(
            wait_until(10, || waits_on_fuse(outer_pid)),
            "no daemon thread stuck on the stopped lower filesystem"
        );
        std::fs::write(&abort, "1").unwrap();
        assert!(
            wait_until(8, || exited(outer_pid)),
            "io_uring={}: daemon still running 8 s after its connection ended",
            u8::from(uring)
        );
        // The request is still stuck: the daemon left without it.
        assert!(waits_on_fuse(inner_pid) || !exited(inner_pid));
        drop(stopped);
        drop(stat);
        let mnt = outer.mnt.clone();
        drop(outer);
        let again = Layerfs::mount(&opts, &mnt);
        assert_eq!(std::fs::read(again.mnt.join("sub/f7")).unwrap(), b"7");
    }
}
