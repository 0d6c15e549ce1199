//! Real container runtimes on layerfs: runc runs a busybox image from the fixtures over a
//! container's layerfs mount.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::require_fuse;
use crate::support::*;

/// The exit code of `layerfs --root ROOT args...`, with its stdout and stderr.
fn code(root: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new("timeout")
        .arg("120")
        .arg(BIN)
        .arg("--root")
        .arg(root)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `container run NAME -- sh -c SCRIPT`: exit code and stdout.
fn run_sh(root: &Path, name: &str, script: &str) -> (Option<i32>, String, String) {
    code(root, &["container", "run", name, "--", "sh", "-c", script])
}

fn store_with_busybox(s: &Scratch) -> PathBuf {
    let root = s.path("store");
    let (ok, _, err) = lfs(
        &root,
        &["image", "load", fixture("buildah-oci").to_str().unwrap()],
    );
    assert!(ok, "{err}");
    root
}

#[test]
fn runc_runs_a_busybox_container_whose_writes_land_in_its_layer() {
    require_fuse!();
    if !have("runc") {
        eprintln!("SKIPPED runtime: runc is not installed (apt-get install runc)");
        return;
    }
    let s = Scratch::new();
    let root = store_with_busybox(&s);
    let (ok, _, err) = lfs(&root, &["container", "create", "bb-multi", "--name", "r1"]);
    assert!(ok, "{err}");
    // The image's files, a write, a delete, a new dir; the container's exit code comes back.
    let (c, out, err) = run_sh(
        &root,
        "r1",
        "cat /data/keep && echo new > /newfile && rm /bin/ls && mkdir -p /srv/www && echo $HOSTNAME && exit 7",
    );
    assert_eq!(c, Some(7), "exit code of the container: {out} {err}");
    let keep = fs::read_to_string(
        fs::read_dir(root.join("layers"))
            .unwrap()
            .flatten()
            .map(|e| e.path().join("diff/data/keep"))
            .find(|p| p.exists())
            .expect("data/keep in a layer"),
    )
    .unwrap();
    assert!(
        out.starts_with(&keep),
        "image file seen: {out:?} vs {keep:?}"
    );
    assert!(out.contains("r1"), "hostname is the container name: {out}");
    assert!(
        !layerfs::sys::is_mountpoint(&root.join("containers/r1/rootfs")),
        "run unmounts what it mounted"
    );
    // Writes landed in the writable layer; the delete is a whiteout there.
    let upper = root.join("containers/r1/upper");
    assert_eq!(fs::read_to_string(upper.join("newfile")).unwrap(), "new\n");
    let wh = fs::symlink_metadata(upper.join("bin/ls")).unwrap();
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    assert!(
        wh.file_type().is_char_device() && wh.rdev() == 0,
        "whiteout"
    );
    let (ok, diff, err) = lfs(&root, &["container", "diff", "r1"]);
    assert!(ok, "{err}");
    for line in ["A /newfile", "D /bin/ls", "A /srv/www"] {
        assert!(diff.lines().any(|l| l == line), "{line} in {diff}");
    }
    // A second run sees the first one's changes.
    let (c, out, err) = run_sh(
        &root,
        "r1",
        "cat /newfile; test -e /bin/ls && echo ls-back; test -d /srv/www && echo dir-kept",
    );
    assert_eq!(c, Some(0), "{err}");
    assert_eq!(out, "new\ndir-kept\n");
    // The image's own Cmd (/bin/sh) with no stdin: exits 0 at once.
    let (c, _, err) = code(&root, &["container", "run", "r1"]);
    assert_eq!(c, Some(0), "{err}");
}

#[test]
fn container_bundle_writes_a_runnable_bundle_and_refuses_bad_input() {
    require_fuse!();
    let s = Scratch::new();
    let root = store_with_busybox(&s);
    let (ok, _, err) = lfs(&root, &["container", "create", "bb-multi", "--name", "b1"]);
    assert!(ok, "{err}");
    let dir = s.path("bundle");
    let (ok, _, err) = lfs(
        &root,
        &[
            "container",
            "bundle",
            "b1",
            dir.to_str().unwrap(),
            "--",
            "echo",
            "hi",
        ],
    );
    assert!(ok, "{err}");
    struct Umount(PathBuf);
    impl Drop for Umount {
        fn drop(&mut self) {
            let _ = layerfs::sys::umount(&self.0, true);
        }
    }
    let _g = Umount(dir.join("rootfs"));
    let cfg: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["process"]["args"], serde_json::json!(["echo", "hi"]));
    assert_eq!(cfg["process"]["terminal"], false);
    assert_eq!(
        cfg["process"]["env"][0],
        "PATH=/usr/sbin:/usr/bin:/sbin:/bin"
    );
    assert_eq!(cfg["annotations"]["io.buildah.version"], "1.28.2");
    let rootfs = PathBuf::from(cfg["root"]["path"].as_str().unwrap());
    assert!(
        rootfs.join("bin/busybox").exists(),
        "rootfs is the live mount"
    );
    if have("runc") {
        let out = Command::new("timeout")
            .args(["60", "runc", "run", "--bundle"])
            .arg(&dir)
            .arg("layerfs-test-b1")
            .output()
            .unwrap();
        let _ = Command::new("runc")
            .args(["delete", "-f", "layerfs-test-b1"])
            .output();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\n");
    }
    // Bad input: one line each, nothing half-made.
    let (ok, _, err) = lfs(&root, &["container", "bundle", "b1", dir.to_str().unwrap()]);
    assert!(!ok && err.contains("exists and is not empty"), "{err}");
    let (ok, _, err) = lfs(&root, &["container", "umount", "b1"]);
    assert!(ok, "{err}");
    let (ok, _, err) = lfs(
        &root,
        &["container", "run", "b1", "--runtime", "no-such-runtime"],
    );
    assert!(!ok && err.contains("is not installed"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let (ok, _, err) = lfs(&root, &["container", "run", "nope"]);
    assert!(!ok && err.contains("no such container"), "{err}");
    let m2 = s.mkdir("m2");
    let (ok, _, err) = lfs(&root, &["container", "mount", "b1", m2.to_str().unwrap()]);
    assert!(ok, "{err}");
    let _g2 = Umount(m2.clone());
    let m3 = s.mkdir("m3");
    let (ok, _, err) = lfs(&root, &["container", "mount", "b1", m3.to_str().unwrap()]);
    assert!(!ok && err.contains("already mounted"), "{err}");
}
