//! layerfs as podman's mount program (containers-storage runs it exactly as it runs
//! fuse-overlayfs): load, run, diff, commit, run the committed image.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::require_fuse;
use crate::support::*;

/// podman with all its state under `dir`, layerfs as the overlay driver's mount program.
struct Podman {
    dir: PathBuf,
    wrapper: PathBuf,
}

impl Podman {
    fn new(dir: &Path) -> Podman {
        // A wrapper that records each call, so the test knows layerfs did the mounting.
        let wrapper = dir.join("mount-program");
        fs::write(
            &wrapper,
            format!(
                "#!/bin/sh\necho \"$*\" >> '{}/calls'\nexec '{BIN}' \"$@\"\n",
                dir.display()
            ),
        )
        .unwrap();
        chmod(&wrapper, 0o755);
        Podman {
            dir: dir.to_path_buf(),
            wrapper,
        }
    }

    /// `podman ARGS` in a private mount namespace without the cgroup v2 hierarchy (crun
    /// refuses hybrid cgroups on this kind of machine): (ok, stdout, stderr).
    fn run(&self, args: &str) -> (bool, String, String) {
        let d = self.dir.display();
        let podman = format!(
            "podman --root {d}/root --runroot {d}/run --tmpdir {d}/tmp --storage-driver overlay \
             --storage-opt overlay.mount_program={} --cgroup-manager cgroupfs \
             --events-backend file {args}",
            self.wrapper.display()
        );
        run_timeout(
            Command::new("unshare").args([
                "-m",
                "sh",
                "-c",
                &format!("umount /sys/fs/cgroup/unified 2>/dev/null; {podman}"),
            ]),
            180,
        )
    }

    fn ok(&self, args: &str) -> String {
        let (ok, out, err) = self.run(args);
        assert!(ok, "podman {args}: {err}");
        out
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.run("rm -af");
        // Nothing mounted under the scratch dir may outlive the test.
        let mut mine: Vec<PathBuf> = layerfs::sys::mounts()
            .into_iter()
            .map(|m| m.mountpoint)
            .filter(|m| m.starts_with(&self.dir))
            .collect();
        mine.sort_by_key(|m| std::cmp::Reverse(m.as_os_str().len()));
        for m in mine {
            let _ = layerfs::sys::umount(&m, true);
        }
    }
}

const RUN: &str = "run --network none --cgroups=disabled --ulimit nofile=1024:1024 \
                   --ulimit nproc=4096:4096";

#[test]
fn podman_uses_layerfs_as_its_mount_program_for_run_diff_and_commit() {
    require_fuse!();
    if !Command::new("sh")
        .args(["-c", "command -v podman"])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        eprintln!("SKIPPED podman: podman is not installed (apt-get install podman)");
        return;
    }
    let s = Scratch::new();
    let p = Podman::new(&s.mkdir("podman"));
    let archive = fixture("podman-bb-multi.docker-archive.tar");
    let out = p.ok(&format!("load -i {}", archive.display()));
    assert!(out.contains("localhost/bb-multi:1"), "{out}");
    // Write, delete, and recreate a directory (an opaque dir in the upper).
    let out = p.ok(&format!(
        "{RUN} --name t1 localhost/bb-multi:1 sh -c \
         'echo hi > /newf && rm -rf /data && mkdir /data && echo x > /data/y && ls /data && cat /newf'"
    ));
    assert_eq!(out, "y\nhi\n");
    let calls = fs::read_to_string(p.dir.join("calls")).unwrap();
    assert!(
        calls.contains("lowerdir=") && calls.contains("upperdir=") && calls.contains("workdir="),
        "podman mounted through layerfs: {calls}"
    );
    let diff = p.ok("diff t1");
    for line in ["A /newf", "C /data", "A /data/y", "D /data/keep"] {
        assert!(
            diff.lines().any(|l| l == line),
            "{line} in podman diff: {diff}"
        );
    }
    p.ok("commit t1 localhost/bb-changed:1");
    let out = p.ok(&format!(
        "{RUN} --rm localhost/bb-changed:1 sh -c 'cat /newf; ls /data; test -e /data/keep || echo keep-gone'"
    ));
    assert_eq!(out, "hi\ny\nkeep-gone\n");
    // podman unmounted everything it mounted.
    let live = layerfs::sys::mounts()
        .into_iter()
        .filter(|m| m.mountpoint.starts_with(&p.dir) && m.source == "layerfs")
        .count();
    assert_eq!(live, 0, "no layerfs mount left by podman");
}
