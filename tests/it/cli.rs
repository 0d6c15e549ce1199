//! The command line as users and container tools call it: errors are one clear line, the
//! mount-program form works, and every way of unmounting ends the daemon.

use std::path::Path;
use std::process::Command;

use crate::require_fuse;
use crate::support::*;

#[test]
fn bad_input_gets_a_one_line_error() {
    require_fuse!();
    let s = Scratch::new();
    let low = s.mkdir("low");
    let mnt = s.mkdir("mnt");
    write(s.path("file"), b"x");
    let up = s.mkdir("up");
    let work = s.mkdir("work");
    let m = mnt.to_str().unwrap();
    let l = low.to_str().unwrap();
    assert_one_line_error(
        &["mount", "-o", "lowerdir=/nonexistent/x", m],
        "/nonexistent/x",
    );
    assert_one_line_error(
        &[
            "mount",
            "-o",
            &format!("lowerdir={}", s.path("file").display()),
            m,
        ],
        "not a directory",
    );
    assert_one_line_error(&["mount", "-o", "lowerdir=", m], "needs a value");
    assert_one_line_error(&["mount", "-o", "lowerdir=:", m], "lowerdir is empty");
    assert_one_line_error(
        &["mount", "-o", &format!("lowerdir={l}"), "/nonexistent/mnt"],
        "mountpoint /nonexistent/mnt",
    );
    assert_one_line_error(
        &["mount", "-o", &format!("lowerdir={l},bogus=1"), m],
        "unknown mount option 'bogus=1'",
    );
    assert_one_line_error(
        &[
            "mount",
            "-o",
            &format!("lowerdir={l},upperdir={}", up.display()),
            m,
        ],
        "needs a workdir",
    );
    let inside = s.mkdir("mnt/up");
    assert_one_line_error(
        &[
            "mount",
            "-o",
            &format!(
                "lowerdir={l},upperdir={},workdir={}",
                inside.display(),
                work.display()
            ),
            m,
        ],
        "inside the mountpoint",
    );
    let in_lower = s.mkdir("low/up");
    assert_one_line_error(
        &[
            "mount",
            "-o",
            &format!(
                "lowerdir={l},upperdir={},workdir={}",
                in_lower.display(),
                work.display()
            ),
            m,
        ],
        "overlaps lowerdir",
    );
    if std::path::Path::new("/dev/shm").is_dir() {
        let shm = tempfile::tempdir_in("/dev/shm").unwrap();
        let same_fs = std::fs::metadata("/dev/shm").map(|a| {
            use std::os::unix::fs::MetadataExt;
            a.dev() == std::fs::metadata(&work).unwrap().dev()
        });
        if same_fs.ok() == Some(false) {
            assert_one_line_error(
                &[
                    "mount",
                    "-o",
                    &format!(
                        "lowerdir={l},upperdir={},workdir={}",
                        shm.path().display(),
                        work.display()
                    ),
                    m,
                ],
                "different filesystems",
            );
        }
    }
    assert!(!sys_is_mounted(&mnt), "nothing left mounted");
}

fn sys_is_mounted(p: &std::path::Path) -> bool {
    layerfs::sys::is_mountpoint(p)
}

#[test]
fn mount_program_form_and_every_way_to_unmount() {
    require_fuse!();
    let s = Scratch::new();
    let low = s.mkdir("low");
    write(low.join("f"), b"hello");
    let mnt = s.mkdir("mnt");
    let opts = format!("lowerdir={},noatime,rw", low.display());
    // `layerfs -o ... MOUNTPOINT`: how containers-storage calls a mount program.
    let (ok, err) = layerfs(&["-o", &opts, mnt.to_str().unwrap()]);
    assert!(ok, "{err}");
    // Unmounted on drop if an assertion below fails before the test's own umount.
    let _first = Layerfs { mnt: mnt.clone() };
    assert_eq!(std::fs::read(mnt.join("f")).unwrap(), b"hello");
    let pid = daemon_pid(&mnt).expect("daemon running");
    // As root the daemon's code is locked in memory: a cache drop or memory pressure must not
    // make the first lookups afterwards read the daemon itself from disk.
    // (It happens just after the mount is live, off its critical path.)
    let locked_kib = || -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("VmLck:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .expect("VmLck in /proc/PID/status")
    };
    assert!(
        wait_until(10, || locked_kib() > 1024),
        "daemon code locked: VmLck {} kB",
        locked_kib()
    );
    // And loaded, not only marked: every page of the executable's code mapping is resident
    // in the daemon (it locks on fault, then reads the code a page at a time).
    let code_size_rss = || -> Option<(u64, u64)> {
        let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
        let mut lines = smaps.lines();
        while let Some(l) = lines.next() {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() >= 6 && f[1].contains('x') && Path::new(f[5]) == exe {
                let field = |name: &str, lines: &[&str]| -> Option<u64> {
                    lines
                        .iter()
                        .find_map(|l| l.strip_prefix(name))?
                        .split_whitespace()
                        .next()?
                        .parse()
                        .ok()
                };
                let block: Vec<&str> = lines.clone().take_while(|l| !l.contains('-')).collect();
                return Some((field("Size:", &block)?, field("Rss:", &block)?));
            }
        }
        None
    };
    assert!(
        wait_until(10, || code_size_rss()
            .is_some_and(|(size, rss)| rss == size)),
        "daemon code resident (Size, Rss in kB): {:?}",
        code_size_rss()
    );
    let (ok, err) = layerfs(&["umount", mnt.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(wait_until(10, || exited(pid)), "daemon exits after umount");

    // fusermount3 -u
    let _m = Layerfs::mount(&opts, &mnt);
    let pid = daemon_pid(&mnt).expect("daemon running");
    let (ok, _o, err) = run_timeout(Command::new("fusermount3").arg("-u").arg(&mnt), 20);
    assert!(ok, "{err}");
    assert!(!sys_is_mounted(&mnt));
    // Gone before the next mount on the same path, which `daemon_pid` must not mistake for it.
    assert!(
        wait_until(10, || exited(pid)),
        "daemon exits after fusermount3 -u"
    );

    // SIGTERM to the daemon unmounts.
    let _m = Layerfs::mount(&opts, &mnt);
    let pid = daemon_pid(&mnt).expect("daemon running");
    // SAFETY-free: kill(1) the process.
    run_timeout(Command::new("kill").args(["-TERM", &pid.to_string()]), 10);
    assert!(wait_until(10, || !sys_is_mounted(&mnt)), "SIGTERM unmounts");
}

#[test]
fn the_daemon_sizes_its_fd_table_before_serving() {
    require_fuse!();
    let s = Scratch::new();
    let low = s.mkdir("low");
    write(low.join("f"), b"hello");
    let mnt = s.mkdir("mnt");
    let _m = Layerfs::mount(&format!("lowerdir={}", low.display()), &mnt);
    let pid = daemon_pid(&mnt).expect("daemon running");
    // The kernel grows a process's fd table by doubling, and in a multi-threaded process every
    // growth waits out an RCU grace period: a lookup that opened the 128th, 256th, ... fd
    // stalled for milliseconds (the 12th directory of the deep-stack bench, 6-11 ms). The
    // daemon grows it once, before its threads exist; a fresh process's table holds 64.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let fd_size: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("FDSize:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("FDSize in /proc/PID/status");
    assert!(
        fd_size >= 1024,
        "fd table of a fresh daemon holds {fd_size} fds"
    );
}

#[test]
fn help_teaches_the_options() {
    let (ok, out, _) = run_timeout(Command::new(BIN).args(["mount", "--help"]), 10);
    assert!(ok);
    for w in [
        "lowerdir=",
        "upperdir=",
        "workdir=",
        "volatile",
        "context=",
        "Examples",
    ] {
        assert!(out.contains(w), "mount --help mentions {w}");
    }
}

#[test]
fn lowerdir_plus_and_option_values_are_taken_as_the_kernel_takes_them() {
    require_fuse!();
    let s = Scratch::new();
    let top = s.mkdir("top");
    let mid = s.mkdir("mid:colon");
    let bottom = s.mkdir("bottom");
    write(top.join("f"), b"top");
    write(mid.join("f"), b"mid");
    write(mid.join("m"), b"mid m");
    write(bottom.join("m"), b"bottom m");
    write(bottom.join("b"), b"b");
    let plus = [&top, &mid, &bottom]
        .iter()
        .map(|l| format!("lowerdir+={}", l.display()))
        .collect::<Vec<_>>()
        .join(",");
    // The same stack through the kernel's one-layer-per-option form: top first, a colon
    // in a layer's name taken literally.
    let (km, lm) = (s.mkdir("kmnt"), s.mkdir("lmnt"));
    let k = Kernel::mount(&plus, &km);
    let l = Layerfs::mount(&plus, &lm);
    assert_eq!(std::fs::read(lm.join("f")).unwrap(), b"top");
    assert_eq!(std::fs::read(lm.join("m")).unwrap(), b"mid m");
    assert_same_tree("lowerdir+", &snapshot(&km), &snapshot(&lm));
    drop((k, l));
    // What the kernel refuses, layerfs refuses, with a one-line reason.
    let base = format!("lowerdir={}:{}", top.display(), bottom.display());
    for (extra, needle) in [
        (
            "redirect_dir=x",
            "expected redirect_dir=on|off|follow|nofollow",
        ),
        ("index", "expected index=on|off"),
        ("xino=1", "expected xino=on|off|auto"),
        (
            &format!("lowerdir+={}", mid.display()) as &str,
            "lowerdir+ cannot follow lowerdir",
        ),
    ] {
        let opts = format!("{base},{extra}");
        assert!(
            Kernel::try_mount(&opts, &km).is_err(),
            "the kernel refuses {extra}"
        );
        assert_one_line_error(&["mount", "-o", &opts, lm.to_str().unwrap()], needle);
        assert!(listing(&lm).is_empty(), "{extra}: nothing mounted");
    }
    // Data-only layers ('::', datadir+): hidden from the tree, by the kernel and by layerfs;
    // their malformed forms refused by both.
    let data_only = format!("lowerdir={}::{}", top.display(), bottom.display());
    let plus_data = format!("lowerdir+={},datadir+={}", top.display(), bottom.display());
    for opts in [&data_only, &plus_data] {
        let k = Kernel::mount(opts, &km);
        let l = Layerfs::mount(opts, &lm);
        assert!(!km.join("b").exists(), "the kernel hides a data-only layer");
        assert_same_tree(opts, &snapshot(&km), &snapshot(&lm));
        drop((k, l));
    }
    let extra = s.mkdir("extra");
    let (t, x, b) = (top.display(), extra.display(), bottom.display());
    for (opts, needle) in [
        (format!("lowerdir={t}:::{b}"), "separate layers with ':'"),
        (format!("lowerdir={t}::"), "'::' must be followed"),
        (format!("lowerdir=::{b}"), "'::' needs a lower layer"),
        (
            format!("lowerdir={t}::{b}:{x}"),
            "cannot follow data-only layers",
        ),
        (
            format!("lowerdir={t},datadir+={b}"),
            "datadir+ cannot follow lowerdir",
        ),
        (
            format!("datadir+={b},lowerdir+={t}"),
            "lowerdir+ cannot follow datadir+",
        ),
    ] {
        assert!(
            Kernel::try_mount(&opts, &km).is_err(),
            "the kernel refuses {opts}"
        );
        assert_one_line_error(&["mount", "-o", &opts, lm.to_str().unwrap()], needle);
        assert!(listing(&lm).is_empty(), "{opts}: nothing mounted");
    }
}

/// Two mounts of one upper or work dir would corrupt each other (each empties `work/` and the
/// index's orphans at mount, under the other's copy-ups): the kernel refuses the second mount
/// (index=on, which layerfs's format always is), and so does layerfs, whatever role the second
/// mount gives the dir. The first mount is unharmed, and a remount right after an unmount
/// (its daemon perhaps still exiting) goes through.
#[test]
fn an_upper_or_workdir_in_use_by_another_mount_is_refused_as_the_kernel_does() {
    require_fuse!();
    let s = Scratch::new();
    let low = s.mkdir("low");
    write(low.join("f"), b"lower");
    let d = |n: &str| s.mkdir(n);
    // The oracle: the kernel refuses the same upper under a second mount.
    let (ku, kw, kw2) = (d("ku"), d("kw"), d("kw2"));
    let opts = |u: &Path, w: &Path| {
        format!(
            "lowerdir={},upperdir={},workdir={}",
            low.display(),
            u.display(),
            w.display()
        )
    };
    let _k = Kernel::mount(&format!("{},index=on", opts(&ku, &kw)), &s.path("k1"));
    let second = Kernel::try_mount(&format!("{},index=on", opts(&ku, &kw2)), &s.path("k2"));
    assert!(
        second.is_err(),
        "the kernel refuses a second mount of an upper"
    );

    let (u, w, u2, w2) = (d("u"), d("w"), d("u2"), d("w2"));
    let a = Layerfs::mount(&opts(&u, &w), &s.path("a"));
    for (upper, work, role, dir) in [
        (&u, &w2, "upperdir", &u),
        (&u2, &w, "workdir", &w),
        (&w, &w2, "upperdir", &w),
        (&u2, &u, "workdir", &u),
    ] {
        let e = Layerfs::try_mount(&opts(upper, work), &s.path("b"))
            .err()
            .unwrap_or_else(|| panic!("a second mount over {} must be refused", dir.display()));
        assert_eq!(
            e,
            format!(
                "layerfs: {role} {} is in use by another mount (as upperdir or workdir); two \
                 mounts of one would corrupt each other",
                dir.display()
            )
        );
        assert!(!layerfs::sys::is_mountpoint(&s.path("b")));
    }
    write(a.mnt.join("f"), b"written through the first mount");
    assert_eq!(
        std::fs::read(u.join("f")).unwrap(),
        b"written through the first mount"
    );
    drop(a);
    let again = Layerfs::mount(&opts(&u, &w), &s.path("a"));
    assert_eq!(
        std::fs::read(again.mnt.join("f")).unwrap(),
        b"written through the first mount"
    );
}
