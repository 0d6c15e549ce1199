//! The image store against images written by real tools (tests/fixtures, from buildah, podman
//! and a real dockerd), through real container mounts.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::require_fuse;
use crate::support::*;

fn ok(root: &Path, args: &[&str]) -> String {
    let (ok, out, err) = lfs(root, args);
    assert!(ok, "layerfs {args:?} failed: {err}");
    out
}

/// Run a shell pipeline (2 minutes at most); its standard output, once it succeeded.
fn shell(pipeline: &str) -> String {
    let (done, out, err) = run_timeout(Command::new("sh").arg("-c").arg(pipeline), 120);
    assert!(done, "{pipeline}: {out}{err}");
    out
}

/// What the file `rel` holds in the only layer of the store at `root`.
fn only_layer_file(root: &Path, rel: &str) -> Vec<u8> {
    let mut layers = fs::read_dir(root.join("layers")).unwrap();
    let layer = layers.next().unwrap().unwrap();
    assert!(layers.next().is_none(), "one layer in {}", root.display());
    fs::read(layer.path().join("diff").join(rel)).unwrap()
}

/// A store in `s` with the buildah fixture (bb-base, bb-multi) loaded.
fn buildah_store(s: &Scratch) -> PathBuf {
    let root = s.path("store");
    ok(
        &root,
        &["image", "load", fixture("buildah-oci").to_str().unwrap()],
    );
    root
}

fn layer_count(root: &Path) -> usize {
    fs::read_dir(root.join("layers")).unwrap().count()
}

/// Unmounts a container's mount on drop (tests never leave a mount behind).
struct Mounted(PathBuf);
impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = layerfs::sys::umount(&self.0, true);
    }
}

#[test]
fn oci_layout_from_buildah_loads_and_mounts_as_a_container() {
    require_fuse!();
    let s = Scratch::new();
    let root = s.path("store");
    let out = ok(
        &root,
        &["image", "load", fixture("buildah-oci").to_str().unwrap()],
    );
    assert!(
        out.contains("bb-multi:latest") && out.contains("bb-base:latest"),
        "{out}"
    );
    // bb-base's single layer is bb-multi's first: stored once.
    assert_eq!(layer_count(&root), 4);
    let ls = ok(&root, &["images"]);
    assert!(ls.contains("bb-multi") && ls.contains("bb-base"), "{ls}");
    let inspect: serde_json::Value =
        serde_json::from_str(&ok(&root, &["image", "inspect", "bb-multi"])).unwrap();
    assert_eq!(inspect[0]["RootFS"]["Layers"].as_array().unwrap().len(), 4);
    assert!(inspect[0]["Id"].as_str().unwrap().starts_with("sha256:"));
    let hist = ok(&root, &["image", "history", "bb-multi", "--format", "json"]);
    assert!(
        serde_json::from_str::<serde_json::Value>(&hist)
            .unwrap()
            .as_array()
            .unwrap()
            .len()
            >= 4
    );

    // A container: the image's tree with its whiteouts and opaque dir applied.
    ok(&root, &["container", "create", "bb-multi", "--name", "c1"]);
    let mnt = s.mkdir("rootfs");
    ok(&root, &["container", "mount", "c1", mnt.to_str().unwrap()]);
    let _m = Mounted(mnt.clone());
    assert!(mnt.join("bin/busybox").exists());
    // The whole tree is what the kernel shows for the same extracted layers (opaque dir and
    // all whiteouts applied), before any change.
    let lowers: Vec<PathBuf> = inspect[0]["LayerPaths"]
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .map(|p| PathBuf::from(p.as_str().unwrap()))
        .collect();
    {
        let k = Kernel::mount(&format!("lowerdir={}", lowerdir(&lowers)), &s.path("kmnt0"));
        assert_same_tree(
            "container vs kernel on the image layers",
            &snapshot(&k.mnt),
            &snapshot(&mnt),
        );
    }
    for gone in ["bin/vi", "data/other", "etc/motd"] {
        assert!(
            fs::symlink_metadata(mnt.join(gone)).is_err(),
            "{gone} is whited out in the image"
        );
    }
    // Changes land in the container's writable layer and show in `container diff`.
    fs::write(mnt.join("etc/added"), b"new").unwrap();
    fs::remove_file(mnt.join("bin/busybox")).unwrap();
    let diff = ok(&root, &["container", "diff", "c1"]);
    assert!(diff.contains("A /etc/added"), "{diff}");
    assert!(diff.contains("D /bin/busybox"), "{diff}");
    assert!(diff.contains("C /etc"), "{diff}");
    let (rm_ok, _, err) = lfs(&root, &["container", "rm", "c1"]);
    assert!(
        !rm_ok && err.contains("mounted"),
        "refuses to remove a mounted container: {err}"
    );
    // Several names, as `docker rm`: each is tried and printed when gone, each failure gets
    // its own line, and the exit code says one failed.
    ok(&root, &["container", "create", "bb-base", "--name", "c2"]);
    let (rm_ok, out, err) = lfs(&root, &["container", "rm", "c2", "c1", "nope"]);
    assert_eq!((rm_ok, out.trim()), (false, "c2"), "{err}");
    let errs: Vec<&str> = err.lines().collect();
    assert_eq!(errs.len(), 2, "{err}");
    assert!(
        errs[0].contains("container c1 is mounted on") && errs[0].ends_with("(or rm -f)"),
        "{err}"
    );
    assert_eq!(errs[1], "layerfs: no such container: nope");
    // -f unmounts a mounted container first.
    assert_eq!(ok(&root, &["container", "rm", "-f", "c1"]).trim(), "c1");
    assert!(!layerfs::sys::is_mountpoint(&mnt), "rm -f unmounted it");
    assert!(!ok(&root, &["container", "ls"]).contains("c1"));
    // So do the inspects: one JSON array of what was found, in the order asked, and one line
    // for each name that was not (exit 1), as docker's.
    let (both, out, err) = lfs(&root, &["image", "inspect", "bb-base", "nope", "bb-multi"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let tags: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["RepoTags"][0].as_str().unwrap())
        .collect();
    assert_eq!(
        (both, tags),
        (false, vec!["bb-base:latest", "bb-multi:latest"])
    );
    assert_eq!(err.trim(), "layerfs: no such image: nope");
    ok(&root, &["container", "create", "bb-multi", "--name", "c3"]);
    let (one, out, err) = lfs(&root, &["container", "inspect", "nope", "c3"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!((one, v.as_array().unwrap().len()), (false, 1), "{out}");
    assert_eq!(v[0]["Name"], "c3");
    ok(&root, &["container", "rm", "c3"]);
    assert_eq!(err.trim(), "layerfs: no such container: nope");
    // `image rm` takes several references alike.
    let (rm_ok, out, err) = lfs(&root, &["image", "rm", "nope", "bb-base"]);
    assert!(!rm_ok && out.contains("Untagged: bb-base:latest"), "{out}");
    assert_eq!(err.trim(), "layerfs: no such image: nope");
    assert!(!ok(&root, &["images"]).contains("bb-base"));
}

#[test]
fn docker_and_podman_archives_share_layers_and_stay_separate_per_container() {
    require_fuse!();
    let s = Scratch::new();
    let root = s.path("store");
    let out = ok(
        &root,
        &[
            "image",
            "load",
            fixture("docker-save-multi.tar").to_str().unwrap(),
        ],
    );
    for t in [
        "bb-base-docker:1",
        "bb-multi-docker:1",
        "bb-committed-docker:1",
    ] {
        assert!(out.contains(t), "{t} in {out}");
    }
    let after_docker = layer_count(&root);
    // docker's 3 images: 1 + 4 + 5 layers, sharing: far fewer than 10 stored.
    assert!(after_docker < 10, "{after_docker} layers stored");
    // podman's archive of the buildah image: loads, and a second load extracts nothing.
    ok(
        &root,
        &[
            "image",
            "load",
            fixture("podman-bb-multi.docker-archive.tar")
                .to_str()
                .unwrap(),
        ],
    );
    let n = layer_count(&root);
    let (_, again, err) = lfs(
        &root,
        &[
            "image",
            "load",
            fixture("podman-bb-multi.docker-archive.tar")
                .to_str()
                .unwrap(),
        ],
    );
    assert_eq!(layer_count(&root), n);
    assert!(
        err.contains("already present") && again.contains("0 new layer"),
        "{err}{again}"
    );
    // Two containers of one image: separate changes, shared layers.
    ok(
        &root,
        &["container", "create", "bb-multi-docker:1", "--name", "a"],
    );
    ok(
        &root,
        &["container", "create", "bb-multi-docker:1", "--name", "b"],
    );
    let (ma, mb) = (s.mkdir("a"), s.mkdir("b"));
    ok(&root, &["container", "mount", "a", ma.to_str().unwrap()]);
    let _ga = Mounted(ma.clone());
    ok(&root, &["container", "mount", "b", mb.to_str().unwrap()]);
    let _gb = Mounted(mb.clone());
    fs::write(ma.join("only-in-a"), b"a").unwrap();
    assert!(!mb.join("only-in-a").exists());
    ok(&root, &["container", "umount", "a"]);
    ok(&root, &["container", "rm", "a"]);
    assert!(
        mb.join("bin/busybox").exists(),
        "the other container is untouched"
    );
    let (rm_ok, _, err) = lfs(&root, &["image", "rm", "bb-multi-docker:1"]);
    assert!(!rm_ok && err.contains("in use"), "{err}");

    // `which` on a container names the image layer (by diff_id) a file comes from.
    let inspect: serde_json::Value =
        serde_json::from_str(&ok(&root, &["image", "inspect", "bb-multi-docker:1"])).unwrap();
    let diff_ids: Vec<String> = inspect[0]["RootFS"]["Layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let which = || -> serde_json::Value {
        let busybox = mb.join("bin/busybox");
        let out = ok(
            &root,
            &["which", "--format", "json", busybox.to_str().unwrap()],
        );
        serde_json::from_str(&out).unwrap()
    };
    let w = which();
    assert_eq!(w[0]["served_by"]["store"], diff_ids[0].as_str(), "{w}");
    fs::write(mb.join("bin/busybox"), b"replaced").unwrap();
    let w = which();
    assert_eq!(w[0]["served_by"]["store"], "container b");
    assert_eq!(w[0]["copied_up_from"]["store"], diff_ids[0].as_str());
}

#[test]
fn image_layers_maps_a_real_image_and_draws_it() {
    require_fuse!();
    let s = Scratch::new();
    let root = s.path("store");
    ok(
        &root,
        &[
            "image",
            "load",
            fixture("docker-save-multi.tar").to_str().unwrap(),
        ],
    );
    let svg = s.path("layers.svg");
    let maps: serde_json::Value = serde_json::from_str(&ok(
        &root,
        &[
            "image",
            "layers",
            "bb-committed-docker:1",
            "--format",
            "json",
            "--svg",
            svg.to_str().unwrap(),
        ],
    ))
    .unwrap();
    let maps = maps.as_array().unwrap();
    assert_eq!(maps.len(), 5);
    let bottom = &maps[4];
    // The imported busybox rootfs adds everything and changes nothing.
    assert!(bottom["adds"].as_u64().unwrap() > 100, "{bottom}");
    assert_eq!(
        (bottom["changes"].as_u64(), bottom["deletes"].as_u64()),
        (Some(0), Some(0))
    );
    // The committed top layer replaced /usr/sbin by an empty dir: opaque, hiding its entries.
    let top = &maps[0];
    assert!(top["opaque_dirs"].as_u64().unwrap() >= 1, "{top}");
    assert!(top["deletes"].as_u64().unwrap() > 10, "{top}");
    assert!(top["hides_bytes"].as_u64().unwrap() > 0, "{top}");
    // `rm /bin/vi /etc/motd && rm -rf /data/...`: whiteouts that hide bytes.
    assert!(maps[2]["deletes"].as_u64().unwrap() >= 2, "{}", maps[2]);
    let inspect: serde_json::Value =
        serde_json::from_str(&ok(&root, &["image", "inspect", "bb-committed-docker:1"])).unwrap();
    assert_eq!(maps[4]["store"], inspect[0]["RootFS"]["Layers"][0]);
    let text = fs::read_to_string(&svg).unwrap();
    let doc = roxmltree::Document::parse(&text).expect("well-formed SVG");
    let layers = doc
        .descendants()
        .filter(|n| n.attribute("class") == Some("layer"))
        .count();
    assert_eq!(layers, 5);
    let (bad, _, err) = lfs(&root, &["image", "layers", "no-such:1"]);
    assert!(!bad && err.trim().lines().count() == 1, "{err}");
}

#[test]
fn tags_move_and_rm_deletes_only_unshared_layers() {
    require_fuse!();
    let s = Scratch::new();
    let root = buildah_store(&s);
    ok(&root, &["image", "tag", "bb-multi", "mine:v1"]);
    ok(&root, &["image", "tag", "bb-base", "mine:v1"]); // retag moves it
    let ls = ok(&root, &["images", "--format", "json"]);
    let v: serde_json::Value = serde_json::from_str(&ls).unwrap();
    let base_id = v
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["Repository"] == "bb-base")
        .unwrap()["ID"]
        .clone();
    let mine = v
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["Repository"] == "mine")
        .unwrap();
    assert_eq!(mine["ID"], base_id);
    // Removing bb-multi keeps the base layer (bb-base uses it), drops the other three.
    ok(&root, &["image", "rm", "bb-multi"]);
    assert_eq!(layer_count(&root), 1);
    let (bad, _, err) = lfs(&root, &["image", "inspect", "nosuch"]);
    assert!(
        !bad && err.trim() == "layerfs: no such image: nosuch",
        "{err}"
    );
}

/// Copy the buildah layout and let `spoil` damage it.
fn spoiled(s: &Scratch, name: &str, spoil: impl FnOnce(&Path)) -> PathBuf {
    let dst = s.path(name);
    let (okc, _, e) = run_timeout(
        Command::new("cp")
            .arg("-a")
            .arg(fixture("buildah-oci"))
            .arg(&dst),
        30,
    );
    assert!(okc, "{e}");
    spoil(&dst);
    dst
}

fn blobs(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir.join("blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort_by_key(|p| std::cmp::Reverse(fs::metadata(p).unwrap().len()));
    v
}

#[test]
fn bad_input_is_refused_and_leaves_the_store_as_it_was() {
    require_fuse!();
    let s = Scratch::new();
    let root = s.path("store");
    let cases: Vec<(&str, PathBuf, &str)> = vec![
        (
            "digest mismatch",
            spoiled(&s, "flip", |d| {
                let b = &blobs(d)[0];
                let mut data = fs::read(b).unwrap();
                let i = data.len() / 2;
                data[i] ^= 0xff;
                fs::write(b, data).unwrap();
            }),
            "does not match its digest",
        ),
        (
            "truncated blob",
            spoiled(&s, "trunc", |d| {
                let b = &blobs(d)[0];
                let data = fs::read(b).unwrap();
                fs::write(b, &data[..data.len() / 2]).unwrap();
            }),
            "truncated",
        ),
        (
            "missing blob",
            spoiled(&s, "missing", |d| fs::remove_file(&blobs(d)[0]).unwrap()),
            "missing",
        ),
        (
            "config not JSON",
            spoiled(&s, "badjson", |d| {
                fs::write(d.join("index.json"), b"{not json").unwrap()
            }),
            "not valid JSON",
        ),
    ];
    // Files that are no image archive at all: one line that says so (not the tar reader's
    // words about the bytes it met); a compressed archive cut short or damaged says that.
    let text = s.path("passwd");
    fs::write(&text, "root:x:0:0:root:/root:/bin/bash\n".repeat(40)).unwrap();
    let compressed = |tool: &str| {
        let out = s.path(&format!("docker-save.tar.{tool}"));
        shell(&format!(
            "{tool} -c {} > {}",
            fixture("docker-save-multi.tar").display(),
            out.display()
        ));
        fs::read(out).unwrap()
    };
    let xz = s.path("cut.tar.xz");
    let data = compressed("xz");
    fs::write(&xz, &data[..data.len() / 3]).unwrap();
    let bz = s.path("damaged.tar.bz2");
    let mut data = compressed("bzip2");
    let i = data.len() / 2;
    data[i] ^= 0xff;
    fs::write(&bz, data).unwrap();
    let cases = cases.into_iter().chain([
        (
            "text file",
            text,
            "not an image archive (a tar, plain or gzip-, zstd-, xz- or bzip2-compressed",
        ),
        ("xz cut short", xz, "truncated or corrupt xz data"),
        ("bzip2 damaged", bz, "truncated or corrupt bzip2 data"),
    ]);
    for (what, path, needle) in cases {
        let (okl, _, err) = lfs(&root, &["image", "load", path.to_str().unwrap()]);
        assert!(!okl, "{what}: must fail");
        let err = err.trim();
        assert!(err.contains(needle), "{what}: {err}");
        assert_eq!(
            err.lines().filter(|l| l.starts_with("layerfs:")).count(),
            1,
            "{what}: one error line: {err}"
        );
        assert_eq!(
            fs::read_dir(root.join("images")).unwrap().count(),
            0,
            "{what}: no image recorded"
        );
        assert_eq!(
            fs::read_dir(root.join("tmp")).unwrap().count(),
            0,
            "{what}: no staging left"
        );
    }
}

/// One raw tar entry: (name, type flag, link name, data).
type RawEntry<'a> = (&'a [u8], u8, &'a [u8], &'a [u8]);

/// A tar whose entry names are given raw (so `..` and absolute names can be written).
fn raw_tar(entries: &[RawEntry<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, kind, link, data) in entries {
        let mut h = tar::Header::new_old();
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::new(*kind));
        h.set_cksum();
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}

#[test]
fn hostile_layers_never_write_outside_the_store() {
    require_fuse!();
    let s = Scratch::new();
    let outside = s.mkdir("outside");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("dot-dot", raw_tar(&[(b"../../escape", b'0', b"", b"x")])),
        (
            "symlink then write through it",
            raw_tar(&[
                (b"link", b'2', outside.to_str().unwrap().as_bytes(), b""),
                (b"link/pwned", b'0', b"", b"x"),
            ]),
        ),
        (
            "hard link outside",
            raw_tar(&[(b"h", b'1', b"../../etc/passwd", b"")]),
        ),
    ];
    for (what, layer) in cases {
        let dir = s.mkdir(&format!("layer-{}", what.len()));
        let root = layerfs::sys::open_dir_path(&dir).unwrap();
        let r = layerfs::store::unpack::unpack(
            &layer[..],
            std::os::fd::AsFd::as_fd(&root),
            layerfs::union::format::MarkerNs::Trusted,
        );
        assert!(r.is_err(), "{what}: refused");
        assert_eq!(
            fs::read_dir(&outside).unwrap().count(),
            0,
            "{what}: nothing written outside"
        );
    }
}

fn manifest_layer_digests(dir: &Path) -> Vec<String> {
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.join("index.json")).unwrap()).unwrap();
    let mut out = Vec::new();
    for m in index["manifests"].as_array().unwrap() {
        let d = m["digest"].as_str().unwrap().trim_start_matches("sha256:");
        let man: serde_json::Value =
            serde_json::from_slice(&fs::read(dir.join("blobs/sha256").join(d)).unwrap()).unwrap();
        for l in man["layers"].as_array().unwrap() {
            out.push(l["digest"].as_str().unwrap().to_string());
        }
    }
    out.sort();
    out.dedup();
    out
}

/// A plain layer has no redirects and no metadata-only copies, yet `mv` of a lower directory
/// in a container makes one and `metacopy=on` the other: the commit packs the renamed
/// directory whole (opaque) and the copies with their data, and the image it makes shows
/// what the kernel shows for the container (its upper read over the image's layers). `container
/// diff` lists the same changes as docker's; `container export` writes that tree.
#[test]
fn a_commit_holds_renamed_lower_dirs_and_metadata_only_copies_as_the_kernel_shows_them() {
    require_fuse!();
    let s = Scratch::new();
    let root = buildah_store(&s);
    ok(&root, &["container", "create", "bb-multi", "--name", "c"]);
    let insp: serde_json::Value =
        serde_json::from_str(&ok(&root, &["container", "inspect", "c"])).unwrap();
    let dir = |k: &str| PathBuf::from(insp[0][k].as_str().unwrap());
    let lowers: Vec<PathBuf> = insp[0]["LowerDirs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| PathBuf::from(p.as_str().unwrap()))
        .collect();
    let upper = dir("UpperDir");
    let mnt = s.mkdir("mnt");
    {
        let m = Layerfs::mount(
            &format!(
                "lowerdir={},upperdir={},workdir={},metacopy=on",
                lowerdir(&lowers),
                upper.display(),
                dir("WorkDir").display()
            ),
            &mnt,
        );
        let at = |p: &str| m.mnt.join(p);
        fs::hard_link(at("data/hello.txt"), at("data/hello.link")).unwrap();
        chmod(at("data/keep"), 0o600);
        fs::rename(at("data"), at("data2")).unwrap();
        fs::rename(at("data2/sub"), at("data2/sub2")).unwrap();
        fs::create_dir(at("data2/sub2/deeper")).unwrap();
        write(at("data2/new"), b"made after the move");
        set_xattr(at("data2/new"), "user.k", b"v");
        fs::remove_file(at("data2/built-on")).unwrap();
        chmod(at("bin/busybox"), 0o700);
        fs::rename(at("etc/passwd"), at("etc/passwd.moved")).unwrap();
        // A lower dir replaced by a new one of the same name (opaque).
        fs::remove_dir_all(at("usr")).unwrap();
        fs::create_dir_all(at("usr/bin")).unwrap();
        write(at("usr/bin/awk"), b"not busybox");
    }
    // What the upper holds is what this test is about.
    let has = |rel: &str, x: &str| get_xattr(upper.join(rel), x).is_some();
    assert!(has("data2", "trusted.overlay.redirect"));
    assert!(has("bin/busybox", "trusted.overlay.metacopy"));
    assert!(has("etc/passwd.moved", "trusted.overlay.metacopy"));

    // `container diff` as `docker diff` lists it: all a renamed directory holds is added
    // (nothing in it deleted); what an opaque directory hides is deleted, at its top.
    let diff = ok(&root, &["container", "diff", "c"]);
    let lines: Vec<&str> = diff.lines().collect();
    for want in [
        "D /data",
        "A /data2",
        "A /data2/hello.link",
        "A /data2/hello.txt",
        "A /data2/keep",
        "A /data2/new",
        "A /data2/sub2/b",
        "A /data2/sub2/deeper",
        "C /bin/busybox",
        "D /etc/passwd",
        "A /etc/passwd.moved",
        "C /usr",
        "C /usr/bin",
        "C /usr/bin/awk",
        "D /usr/sbin",
        "D /usr/bin/ar",
    ] {
        assert!(lines.contains(&want), "{want} in {diff}");
    }
    for not in ["/data2/built-on", "/etc/group", "/usr/sbin/"] {
        assert!(!diff.contains(not), "{not} in {diff}");
    }
    let mut upper_and_lowers = vec![upper.clone()];
    upper_and_lowers.extend(lowers);
    let kernel = {
        let k = Kernel::mount(
            &format!(
                "lowerdir={},metacopy=on,redirect_dir=follow",
                lowerdir(&upper_and_lowers)
            ),
            &s.path("kmnt"),
        );
        snapshot(&k.mnt)
    };
    let id = ok(&root, &["container", "commit", "c", "moved:1"]);
    assert!(id.starts_with("sha256:"), "{id}");
    ok(&root, &["container", "create", "moved:1", "--name", "c2"]);
    let mnt2 = s.mkdir("mnt2");
    ok(&root, &["container", "mount", "c2", mnt2.to_str().unwrap()]);
    let committed = {
        let _g = Mounted(mnt2.clone());
        snapshot(&mnt2)
    };
    // A merged directory counts one link in the kernel; committed, it is a plain one.
    let plain = |t: &Tree| -> Tree {
        t.iter()
            .map(|(k, v)| {
                let mut v = v.clone();
                if v.kind == 'd' {
                    v.nlink = 0;
                }
                (k.clone(), v)
            })
            .collect()
    };
    assert_same_tree(
        "committed image vs the kernel's view of the container",
        &plain(&kernel),
        &plain(&committed),
    );
    // `container export` writes the same tree as one plain tar: flattened into an image
    // (`export | import -`, as with docker), it mounts as the kernel shows the container.
    let flat = shell(&format!(
        "{BIN} --root {r} container export c | {BIN} --root {r} image import - flat:1",
        r = root.display()
    ));
    assert!(flat.starts_with("sha256:"), "{flat}");
    ok(&root, &["container", "create", "flat:1", "--name", "c3"]);
    let mnt3 = s.mkdir("mnt3");
    ok(&root, &["container", "mount", "c3", mnt3.to_str().unwrap()]);
    let flattened = {
        let _g = Mounted(mnt3.clone());
        snapshot(&mnt3)
    };
    assert_same_tree(
        "exported and imported vs the kernel's view of the container",
        &plain(&kernel),
        &plain(&flattened),
    );
    assert_eq!(committed[&b"data2/hello.link"[..]].nlink, 2);
    assert_eq!(committed[&b"bin/busybox"[..]].mode & 0o777, 0o700);
    // The layer: the old name whited out, the new one opaque.
    let insp: serde_json::Value =
        serde_json::from_str(&ok(&root, &["image", "inspect", "moved:1"])).unwrap();
    let layers = insp[0]["RootFS"]["Layers"].as_array().unwrap();
    let diff_id = layers.last().unwrap().as_str().unwrap();
    let blob = fs::File::open(root.join("blobs/sha256").join(&diff_id["sha256:".len()..])).unwrap();
    let top: Vec<String> = tar::Archive::new(blob)
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
        .collect();
    for want in [".wh.data", "data2/.wh..wh..opq", "data2/sub2/deeper/"] {
        assert!(top.iter().any(|n| n == want), "{want}: {top:?}");
    }
}

#[test]
fn commit_and_save_round_trip_through_another_store() {
    require_fuse!();
    let s = Scratch::new();
    let (root, root2) = (s.path("store"), s.path("store2"));
    ok(
        &root,
        &["image", "load", fixture("buildah-oci").to_str().unwrap()],
    );
    // Save reproduces the loaded blobs byte for byte.
    let saved = s.path("saved-oci");
    ok(
        &root,
        &[
            "image",
            "save",
            "bb-multi",
            "bb-base",
            "-o",
            saved.to_str().unwrap(),
            "--format",
            "oci-dir",
        ],
    );
    assert_eq!(
        manifest_layer_digests(&saved),
        manifest_layer_digests(&fixture("buildah-oci"))
    );

    // Changes in a container: a deleted lower file, a new file, a lower dir replaced.
    ok(&root, &["container", "create", "bb-multi", "--name", "c"]);
    let mnt = s.mkdir("mnt");
    ok(&root, &["container", "mount", "c", mnt.to_str().unwrap()]);
    {
        let _g = Mounted(mnt.clone());
        fs::remove_file(mnt.join("bin/busybox")).unwrap();
        fs::write(mnt.join("etc/committed"), b"yes").unwrap();
        fs::remove_dir_all(mnt.join("etc")).ok();
        fs::create_dir_all(mnt.join("etc")).unwrap();
        fs::write(mnt.join("etc/only"), b"fresh etc").unwrap();
        ok(&root, &["container", "umount", "c"]);
    }
    let id = ok(
        &root,
        &[
            "container",
            "commit",
            "c",
            "committed:v1",
            "-m",
            "from a test",
        ],
    );
    assert!(id.trim().starts_with("sha256:"));
    let hist = ok(&root, &["image", "history", "committed:v1"]);
    assert!(
        hist.contains("layerfs container commit") && hist.contains("from a test"),
        "{hist}"
    );
    // The new layer is an OCI layer: whiteouts as .wh. files, the replaced dir opaque.
    let insp: serde_json::Value =
        serde_json::from_str(&ok(&root, &["image", "inspect", "committed:v1"])).unwrap();
    let top = insp[0]["RootFS"]["Layers"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .as_str()
        .unwrap()
        .to_string();
    let blob = fs::read(
        root.join("blobs/sha256")
            .join(top.trim_start_matches("sha256:")),
    )
    .unwrap();
    let names: Vec<String> = tar::Archive::new(&blob[..])
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().any(|n| n == "bin/.wh.busybox"), "{names:?}");
    assert!(names.iter().any(|n| n == "etc/.wh..wh..opq"), "{names:?}");

    // Saved as a docker archive and loaded elsewhere: the same tree.
    let arch = s.path("committed.tar");
    ok(
        &root,
        &[
            "image",
            "save",
            "committed:v1",
            "-o",
            arch.to_str().unwrap(),
            "--format",
            "docker-archive",
        ],
    );
    ok(&root2, &["image", "load", arch.to_str().unwrap()]);
    let trees: Vec<Tree> = [(&root, "c1"), (&root2, "c2")]
        .iter()
        .map(|(r, name)| {
            ok(r, &["container", "create", "committed:v1", "--name", name]);
            let m = s.mkdir(&format!("m-{name}"));
            ok(r, &["container", "mount", name, m.to_str().unwrap()]);
            let _g = Mounted(m.clone());
            let t = snapshot(&m);
            ok(r, &["container", "umount", name]);
            t
        })
        .collect();
    assert!(!trees[0].contains_key(b"bin/busybox".as_slice()));
    assert!(
        trees[0].contains_key(b"etc/only".as_slice())
            && !trees[0].contains_key(b"etc/os-release".as_slice())
    );
    assert_same_tree(
        "committed image loaded in another store",
        &trees[0],
        &trees[1],
    );
    // An oci-archive loads too.
    let oa = s.path("committed-oci.tar");
    ok(
        &root,
        &["image", "save", "committed:v1", "-o", oa.to_str().unwrap()],
    );
    let (okl, out, err) = lfs(&root2, &["image", "load", oa.to_str().unwrap()]);
    assert!(okl && out.contains("0 new layer"), "{out}{err}");
}

#[test]
fn import_a_rootfs_tarball_and_system_df_counts_sharing() {
    require_fuse!();
    let s = Scratch::new();
    let root = s.path("store");
    let tb = s.path("rootfs.tar.gz");
    let (okt, _, e) = run_timeout(
        Command::new("tar")
            .arg("-czf")
            .arg(&tb)
            .arg("-C")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/sample/base"))
            .arg("."),
        30,
    );
    assert!(okt, "{e}");
    let id = ok(&root, &["image", "import", tb.to_str().unwrap(), "sample"]);
    assert!(id.trim().starts_with("sha256:"));
    ok(&root, &["container", "create", "sample", "--name", "s"]);
    let m = s.mkdir("m");
    ok(&root, &["container", "mount", "s", m.to_str().unwrap()]);
    {
        let _g = Mounted(m.clone());
        assert_eq!(
            fs::read_to_string(m.join("etc/motd")).unwrap(),
            "Welcome to the base layer\n"
        );
        ok(&root, &["container", "umount", "s"]);
    }
    ok(
        &root,
        &["image", "load", fixture("buildah-oci").to_str().unwrap()],
    );
    let df: serde_json::Value =
        serde_json::from_str(&ok(&root, &["system", "df", "--format", "json"])).unwrap();
    assert_eq!(df["Images"], 3);
    assert_eq!(
        df["Layers"], 5,
        "bb-base's layer is bb-multi's: 1 + 4 stored"
    );
    assert_eq!(df["SharedLayers"], 1);
    assert_eq!(df["Containers"], 1);
    // Every blob kept counts: configs and layers as distributed.
    assert_eq!(df["Blobs"].as_u64().unwrap() as usize, blob_count(&root));
    let sizes = ["LayersSize", "ContainersSize", "BlobsSize"].map(|k| df[k].as_u64().unwrap());
    assert!(
        sizes[2] > 0 && df["TotalSize"] == sizes.iter().sum::<u64>(),
        "{df}"
    );
    let (bad, _, err) = lfs(&root, &["image", "import", "/nonexistent.tar", "x"]);
    assert!(!bad && err.trim().lines().count() == 1, "{err}");
}

#[test]
fn skopeo_accepts_what_image_save_writes() {
    require_fuse!();
    if Command::new("skopeo").arg("--version").output().is_err() {
        eprintln!("SKIPPED store::skopeo_accepts_what_image_save_writes: skopeo is not installed");
        return;
    }
    let s = Scratch::new();
    let root = buildah_store(&s);
    let dir = s.path("oci");
    let arch = s.path("img.tar");
    ok(
        &root,
        &[
            "image",
            "save",
            "bb-multi",
            "-o",
            dir.to_str().unwrap(),
            "--format",
            "oci-dir",
        ],
    );
    ok(
        &root,
        &[
            "image",
            "save",
            "bb-multi",
            "-o",
            arch.to_str().unwrap(),
            "--format",
            "docker-archive",
        ],
    );
    let (oki, out, err) = run_timeout(
        Command::new("skopeo")
            .args(["inspect", "--raw"])
            .arg(format!("oci:{}:bb-multi:latest", dir.display())),
        60,
    );
    assert!(oki, "skopeo inspect: {err}");
    assert!(out.contains("\"layers\""), "{out}");
    let copied = s.path("copied");
    let (okc, _, err) = run_timeout(
        Command::new("skopeo")
            .arg("copy")
            .arg(format!("docker-archive:{}", arch.display()))
            .arg(format!("oci:{}:again", copied.display())),
        120,
    );
    assert!(okc, "skopeo copy: {err}");
    // And what skopeo wrote loads back.
    let (okl, out, err) = lfs(&root, &["image", "load", copied.to_str().unwrap()]);
    assert!(okl, "{err}");
    assert!(out.contains("again:latest"), "{out}");
}

#[test]
fn duplicate_entries_and_absurdly_deep_paths_are_contained() {
    require_fuse!();
    let s = Scratch::new();
    // Duplicates: the later entry wins, as in every tar extractor.
    let dup = raw_tar(&[(b"f", b'0', b"", b"first"), (b"f", b'0', b"", b"second")]);
    let d1 = s.mkdir("dup");
    let r1 = layerfs::sys::open_dir_path(&d1).unwrap();
    layerfs::store::unpack::unpack(
        &dup[..],
        std::os::fd::AsFd::as_fd(&r1),
        layerfs::union::format::MarkerNs::Trusted,
    )
    .unwrap();
    assert_eq!(fs::read(d1.join("f")).unwrap(), b"second");
    // 10,000 levels: refused with a clear message, nothing half-written escapes.
    let mut b = tar::Builder::new(Vec::new());
    let deep = "a/".repeat(10_000) + "f";
    let mut h = tar::Header::new_gnu();
    h.set_size(1);
    h.set_mode(0o644);
    b.append_data(&mut h, &deep, &b"x"[..]).unwrap();
    let deep_tar = b.into_inner().unwrap();
    let d2 = s.mkdir("deep");
    let r2 = layerfs::sys::open_dir_path(&d2).unwrap();
    let e = layerfs::store::unpack::unpack(
        &deep_tar[..],
        std::os::fd::AsFd::as_fd(&r2),
        layerfs::union::format::MarkerNs::Trusted,
    )
    .unwrap_err();
    assert!(e.to_string().contains("levels deep"), "{e}");
}

#[test]
fn zstd_layers_load_and_containers_inspect() {
    require_fuse!();
    let s = Scratch::new();
    let root = s.path("store");
    let mut b = tar::Builder::new(Vec::new());
    b.append_dir_all(
        ".",
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/sample/app"),
    )
    .unwrap();
    let plain = b.into_inner().unwrap();
    let zst =
        ruzstd::encoding::compress_to_vec(&plain[..], ruzstd::encoding::CompressionLevel::Fastest);
    assert_eq!(&zst[..4], &[0x28, 0xb5, 0x2f, 0xfd]);
    let p = s.path("app.tar.zst");
    fs::write(&p, &zst).unwrap();
    ok(&root, &["image", "import", p.to_str().unwrap(), "app:zstd"]);
    let insp: serde_json::Value =
        serde_json::from_str(&ok(&root, &["image", "inspect", "app:zstd"])).unwrap();
    // The diff_id is the uncompressed tar's.
    let want = format!(
        "sha256:{}",
        layerfs::store::digest::Digest::of(&plain).hex()
    );
    assert_eq!(insp[0]["RootFS"]["Layers"][0].as_str().unwrap(), want);
    ok(&root, &["container", "create", "app:zstd", "--name", "z"]);
    let ci: serde_json::Value =
        serde_json::from_str(&ok(&root, &["container", "inspect", "z"])).unwrap();
    assert_eq!(ci[0]["Name"], "z");
    assert_eq!(ci[0]["LowerDirs"].as_array().unwrap().len(), 1);
    let low = PathBuf::from(ci[0]["LowerDirs"][0].as_str().unwrap());
    assert!(low.join("app/run.sh").is_file());
    // The OCI whiteout in the tarball became a kernel whiteout.
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let wh = fs::symlink_metadata(low.join("etc/motd")).unwrap();
    assert!(wh.file_type().is_char_device() && wh.rdev() == 0);
}

/// The archive `src` with its manifest.json's first RepoTags replaced by `tags`.
fn retagged_docker_archive(src: &Path, dst: &Path, tags: &[&str]) {
    let mut ar = tar::Archive::new(fs::File::open(src).unwrap());
    let mut out = tar::Builder::new(fs::File::create(dst).unwrap());
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let mut h = e.header().clone();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut data).unwrap();
        if e.path().unwrap() == Path::new("manifest.json") {
            let mut m: serde_json::Value = serde_json::from_slice(&data).unwrap();
            m[0]["RepoTags"] = serde_json::json!(tags);
            data = serde_json::to_vec(&m).unwrap();
            h.set_size(data.len() as u64);
            h.set_cksum();
        }
        out.append(&h, &data[..]).unwrap();
    }
    out.finish().unwrap();
}

#[test]
fn references_and_names_follow_dockers_rules_before_anything_is_written() {
    require_fuse!();
    let s = Scratch::new();
    let root = buildah_store(&s);
    let (layers, images) = (layer_count(&root), 2);
    let image_count = || fs::read_dir(root.join("images")).unwrap().count();
    assert_eq!(image_count(), images);
    let one_error = |args: &[&str], needle: &str| {
        let (okc, _, err) = lfs(&root, args);
        assert!(!okc, "{args:?} must fail");
        let err = err.trim();
        assert!(err.contains(needle), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: one line: {err}");
        assert!(err.starts_with("layerfs: "), "{err}");
    };
    // Names and tags Docker refuses are refused by `image tag`, with the reason.
    let long_tag = format!("x:{}", "t".repeat(129));
    for (bad, why) in [
        ("UPPER:Tag", "must be lowercase"),
        ("x:", "a tag is"),
        ("x:-y", "a tag is"),
        (":x", "name component"),
        ("../x", "registry part"),
        ("x/../y", "name component"),
        ("x@sha256:00", "digest references"),
        (long_tag.as_str(), "a tag is"),
    ] {
        one_error(&["image", "tag", "bb-base", bad], why);
    }
    let tags_before = fs::read(root.join("tags.json")).unwrap();
    // A registry with a port and every separator Docker allows.
    let good = "localhost:5000/team/web_app__x-y.z:v1.0-rc_1";
    ok(&root, &["image", "tag", "bb-base", good]);
    let ls: serde_json::Value =
        serde_json::from_str(&ok(&root, &["image", "ls", "--format", "json"])).unwrap();
    assert!(
        ls.as_array()
            .unwrap()
            .iter()
            .any(|r| r["Repository"] == "localhost:5000/team/web_app__x-y.z"
                && r["Tag"] == "v1.0-rc_1"),
        "{ls}"
    );
    assert_ne!(fs::read(root.join("tags.json")).unwrap(), tags_before);
    // import and commit refuse a bad name before they read or pack anything.
    let rootfs = s.path("rootfs.tar");
    let mut b = tar::Builder::new(fs::File::create(&rootfs).unwrap());
    let mut h = tar::Header::new_gnu();
    h.set_size(2);
    h.set_mode(0o644);
    b.append_data(&mut h, "f", &b"hi"[..]).unwrap();
    b.finish().unwrap();
    one_error(
        &["image", "import", rootfs.to_str().unwrap(), "Bad"],
        "must be lowercase",
    );
    assert_eq!(layer_count(&root), layers, "import stored no layer");
    // Container names: Docker's characters, refused before the container dir exists.
    for bad in ["a b", "-x", ".hidden", "a/b", "x\ny"] {
        one_error(
            &["container", "create", "bb-base", &format!("--name={bad}")],
            "bad container name",
        );
    }
    assert!(
        !root.join("containers").exists()
            || fs::read_dir(root.join("containers")).unwrap().count() == 0
    );
    ok(
        &root,
        &["container", "create", "bb-base", "--name", "c1.web-2_x"],
    );
    one_error(
        &["container", "commit", "c1.web-2_x", "x::y"],
        "name component",
    );
    assert_eq!(image_count(), images, "commit recorded no image");
    assert_eq!(layer_count(&root), layers, "commit stored no layer");
    ok(&root, &["container", "rm", "c1.web-2_x"]);
    // An archive that names its image badly is refused whole; the store stays as it was.
    let bad_archive = s.path("bad-tags.tar");
    retagged_docker_archive(
        &fixture("docker-save-multi.tar"),
        &bad_archive,
        &["Bad:Tag"],
    );
    one_error(
        &["image", "load", bad_archive.to_str().unwrap()],
        "must be lowercase",
    );
    assert_eq!(image_count(), images, "no image recorded");
    assert_eq!(layer_count(&root), layers, "no layer stored");
    assert_eq!(
        fs::read_dir(root.join("tmp")).unwrap().count(),
        0,
        "no staging left"
    );
    // The same archive with a good name loads (the rewrite itself is sound).
    let good_archive = s.path("good-tags.tar");
    retagged_docker_archive(
        &fixture("docker-save-multi.tar"),
        &good_archive,
        &["bb-base-docker:renamed"],
    );
    ok(&root, &["image", "load", good_archive.to_str().unwrap()]);
    ok(&root, &["image", "inspect", "bb-base-docker:renamed"]);
    // An OCI layout may name an image as Docker would not ('+', uppercase): it loads
    // untagged, with a warning that says how to name it.
    let odd = spoiled(&s, "odd-name", |d| {
        let index = fs::read_to_string(d.join("index.json")).unwrap();
        fs::write(
            d.join("index.json"),
            index.replace("\"bb-base\"", "\"BB+base\""),
        )
        .unwrap();
    });
    let root2 = s.path("store2");
    let (okl, _, err) = lfs(&root2, &["image", "load", odd.to_str().unwrap()]);
    assert!(okl, "{err}");
    assert!(
        err.contains("warning: bad image reference \"BB+base\"")
            && err.contains("loaded without a tag"),
        "{err}"
    );
    let ls: serde_json::Value =
        serde_json::from_str(&ok(&root2, &["image", "ls", "--format", "json"])).unwrap();
    let rows = ls.as_array().unwrap();
    assert_eq!(rows.len(), 2, "{ls}");
    assert!(rows.iter().any(|r| r["Repository"] == "bb-multi"), "{ls}");
    assert!(rows.iter().any(|r| r["Tag"] == "<none>"), "{ls}");
}

/// A tar written by the tar crate (GNU long names for names over 100 bytes).
fn gnu_tar(add: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    add(&mut b);
    b.into_inner().unwrap()
}

#[test]
fn unpack_errors_name_the_entry_on_one_line() {
    let s = Scratch::new();
    let cases: Vec<(&str, Vec<u8>, &[&str])> = vec![
        (
            "empty symlink target",
            raw_tar(&[(b"s", b'2', b"", b"")]),
            &["symlink s has no target"],
        ),
        (
            "newline in a hard-link target",
            raw_tar(&[(b"h", b'1', b"no\nsuch", b"")]),
            &["hard link h -> no\\nsuch", "No such file or directory"],
        ),
        (
            "a 300-byte symlink name",
            gnu_tar(|b| {
                let mut h = tar::Header::new_gnu();
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                h.set_mode(0o777);
                b.append_link(&mut h, "n".repeat(300), "t").unwrap();
            }),
            &["layer entry nnnn", "...(300 bytes)", "File name too long"],
        ),
        (
            "a 300-byte directory name",
            gnu_tar(|b| {
                let mut h = tar::Header::new_gnu();
                h.set_size(1);
                h.set_mode(0o644);
                b.append_data(&mut h, "n".repeat(300) + "/f", &b"x"[..])
                    .unwrap();
            }),
            &["creating nnnn", "...(300 bytes)", "File name too long"],
        ),
    ];
    for (i, (what, layer, needles)) in cases.into_iter().enumerate() {
        let dir = s.mkdir(&format!("layer{i}"));
        let root = layerfs::sys::open_dir_path(&dir).unwrap();
        let e = layerfs::store::unpack::unpack(
            &layer[..],
            std::os::fd::AsFd::as_fd(&root),
            layerfs::union::format::MarkerNs::Trusted,
        )
        .unwrap_err()
        .to_string();
        for n in needles {
            assert!(e.contains(n), "{what}: {e:?} lacks {n:?}");
        }
        assert!(
            !e.contains('\n') && e.len() < 200,
            "{what}: one short line: {e:?}"
        );
    }
}

fn blob_count(root: &Path) -> usize {
    fs::read_dir(root.join("blobs/sha256")).unwrap().count()
}

/// Clears the immutable flag under a path on drop, so the scratch dir can go.
struct Mutable(PathBuf);
impl Drop for Mutable {
    fn drop(&mut self) {
        run_timeout(Command::new("chattr").arg("-R").arg("-i").arg(&self.0), 30);
    }
}

/// `image rm` frees what only that image used, its blobs too (they stayed before, and
/// `system df` said 0B over megabytes), and whatever a crash left unused; it takes a layer
/// out of layers/ before deleting it: a delete that stops part way (here at a file that cannot be unlinked, where ^C or a
/// crash would stop it) never leaves a layer the next load takes for present.
#[test]
fn image_rm_frees_layers_and_blobs_and_never_leaves_half_a_layer() {
    let s = Scratch::new();
    let root = s.path("store");
    let archive = fixture("docker-save-multi.tar");
    let archive = archive.to_str().unwrap();
    ok(&root, &["image", "load", archive]);
    let (layers, blobs) = (layer_count(&root), blob_count(&root));
    // What a load stopped between its layers and its image record leaves: no image uses it.
    let orphan = "ab".repeat(32);
    fs::create_dir_all(root.join("layers").join(&orphan).join("diff")).unwrap();
    fs::write(root.join("blobs/sha256").join(&orphan), b"x").unwrap();
    // bb-multi-docker's layers are all bb-committed-docker's too.
    ok(&root, &["image", "rm", "bb-multi-docker:1"]);
    assert_eq!(
        (layer_count(&root), blob_count(&root)),
        (layers, blobs - 1),
        "only bb-multi-docker's config and the orphans go"
    );
    ok(&root, &["image", "rm", "bb-committed-docker:1"]);
    ok(&root, &["image", "rm", "bb-base-docker:1"]);
    assert_eq!((layer_count(&root), blob_count(&root)), (0, 0));

    ok(&root, &["image", "load", archive]);
    let busybox = fs::read_dir(root.join("layers"))
        .unwrap()
        .map(|e| e.unwrap().path().join("diff/bin/busybox"))
        .find(|p| p.is_file())
        .expect("a layer with bin/busybox");
    let whole = fs::read(&busybox).unwrap();
    let _undo = Mutable(root.clone());
    let (pinned, _o, err) = run_timeout(Command::new("chattr").arg("+i").arg(&busybox), 30);
    if !pinned {
        eprintln!("SKIPPED the interrupted delete: chattr +i: {}", err.trim());
        return;
    }
    for image in [
        "bb-multi-docker:1",
        "bb-committed-docker:1",
        "bb-base-docker:1",
    ] {
        ok(&root, &["image", "rm", image]);
    }
    assert_eq!(layer_count(&root), 0, "no layer is left in layers/");
    ok(&root, &["image", "load", archive]);
    let reference = s.path("reference");
    ok(&reference, &["image", "load", archive]);
    assert_same_tree(
        "layers loaded again after an interrupted image rm",
        &snapshot(&reference.join("layers")),
        &snapshot(&root.join("layers")),
    );
    assert!(
        fs::read(&busybox).unwrap() == whole,
        "bin/busybox whole again"
    );
}

/// `layerfs --root ROOT ARGS` with its heap capped (RLIMIT_DATA) at `mib` MiB.
fn capped(mib: u64, root: &Path, args: &[&str]) -> String {
    let (ok, out, err) = run_timeout(
        Command::new("prlimit")
            .arg(format!("--data={}", mib << 20))
            .arg(BIN)
            .arg("--root")
            .arg(root)
            .args(args),
        120,
    );
    assert!(ok, "layerfs {args:?} within {mib} MiB of heap: {err}");
    out
}

/// `left` bytes of a pattern, streamed (the test never holds a big layer in memory either).
struct Pattern {
    left: u64,
    at: u64,
}

impl std::io::Read for Pattern {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.left as usize);
        for b in &mut buf[..n] {
            *b = (self.at % 251) as u8 ^ (self.at >> 16) as u8;
            self.at += 1;
        }
        self.left -= n as u64;
        Ok(n)
    }
}

fn pattern(size: u64) -> Pattern {
    Pattern { left: size, at: 0 }
}

/// sha256 of a stream.
fn digest_of(r: impl std::io::Read) -> String {
    let (d, _) = layerfs::store::digest::HashingReader::new(r)
        .finish()
        .unwrap();
    d.to_string()
}

fn file_digest(p: &Path) -> String {
    digest_of(fs::File::open(p).unwrap())
}

/// A layer of 96 MiB goes through import, save (both archive formats), load and commit with
/// the heap capped at 48 MiB: blobs stream through files. Before, each was read whole
/// into memory (a 203 MB rootfs import peaked at 204 MB), and an OCI load held every
/// layer of the image at once.
#[test]
fn layers_larger_than_the_heap_stream_through_import_save_load_and_commit() {
    require_fuse!();
    const BIG: u64 = 96 << 20;
    const HEAP: u64 = 48;
    let s = Scratch::new();
    let rootfs = s.path("rootfs.tar");
    {
        let mut b = tar::Builder::new(fs::File::create(&rootfs).unwrap());
        let mut h = tar::Header::new_gnu();
        h.set_size(BIG);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, "big", pattern(BIG)).unwrap();
        b.into_inner().unwrap().sync_all().unwrap();
    }
    let want = digest_of(pattern(BIG));
    let root = s.path("store");
    capped(
        HEAP,
        &root,
        &["image", "import", rootfs.to_str().unwrap(), "big:1"],
    );
    let mut loaded = Vec::new();
    for format in ["docker-archive", "oci-archive"] {
        let out = s.path(&format!("{format}.tar"));
        capped(
            HEAP,
            &root,
            &[
                "image",
                "save",
                "big:1",
                "-o",
                out.to_str().unwrap(),
                "--format",
                format,
            ],
        );
        let other = s.path(&format!("store-{format}"));
        capped(HEAP, &other, &["image", "load", out.to_str().unwrap()]);
        loaded.push(other);
    }
    for r in loaded.iter().chain([&root]) {
        let layer = fs::read_dir(r.join("layers"))
            .unwrap()
            .next()
            .unwrap()
            .unwrap();
        assert_eq!(
            file_digest(&layer.path().join("diff/big")),
            want,
            "{}",
            r.display()
        );
    }
    // A container that wrote another 96 MiB, committed.
    ok(&root, &["container", "create", "big:1", "--name", "c"]);
    let mnt = s.mkdir("mnt");
    ok(&root, &["container", "mount", "c", mnt.to_str().unwrap()]);
    let written = {
        let _g = Mounted(mnt.clone());
        let w = fs::File::create(mnt.join("more"))
            .and_then(|mut f| std::io::copy(&mut pattern(BIG), &mut f));
        ok(&root, &["container", "umount", "c"]);
        w
    };
    assert_eq!(written.unwrap(), BIG);
    capped(HEAP, &root, &["container", "commit", "c", "big:2"]);
    let v: serde_json::Value =
        serde_json::from_str(&ok(&root, &["image", "inspect", "big:2"])).unwrap();
    let top = v[0]["RootFS"]["Layers"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    let hex = top.as_str().unwrap().trim_start_matches("sha256:");
    assert_eq!(
        file_digest(&root.join("layers").join(hex).join("diff/more")),
        want
    );
}

/// `image save` without -o (or with `-o -`) streams the tar to standard output, `image load`
/// without a path reads standard input, as `docker save | docker load`, and `image import -`
/// reads a tarball from it, as `docker import -`; a
/// save to a file leaves nothing but the file (it is written under a temporary name and
/// renamed: interrupted, it leaves no half tar under the name asked for).
#[test]
fn image_save_streams_to_standard_output_and_load_reads_standard_input() {
    let s = Scratch::new();
    let (a, b, c) = (s.path("a"), s.path("b"), s.path("c"));
    ok(
        &a,
        &["image", "load", fixture("buildah-oci").to_str().unwrap()],
    );
    // The last three: a compressed archive loads as docker load takes it (`save | gzip |
    // load`); a zstd-compressed file follows.
    let (gz, xz, bz) = (s.path("gz"), s.path("xz"), s.path("bz"));
    for (to, format, load, compress) in [
        (&b, "docker-archive", "", ""),
        (&c, "oci-archive", " -", ""),
        (&gz, "docker-archive", "", " | gzip -c"),
        (&xz, "oci-archive", "", " | xz -T2 -c"),
        (&bz, "docker-archive", " -", " | bzip2 -c"),
    ] {
        let pipe = format!(
            "{BIN} --root {} image save bb-multi --format {format}{compress} | {BIN} --root {} image load{load}",
            a.display(),
            to.display()
        );
        let out = shell(&pipe);
        assert!(
            out.contains("Loaded image: bb-multi:latest"),
            "{pipe}: {out}"
        );
        assert_same_tree(
            format,
            &snapshot(&a.join("layers")),
            &snapshot(&to.join("layers")),
        );
    }
    let tar = s.path("bb.plain.tar");
    ok(
        &a,
        &["image", "save", "bb-multi", "-o", tar.to_str().unwrap()],
    );
    let zst = s.path("bb.tar.zst");
    fs::write(
        &zst,
        ruzstd::encoding::compress_to_vec(
            &fs::read(&tar).unwrap()[..],
            ruzstd::encoding::CompressionLevel::Fastest,
        ),
    )
    .unwrap();
    let z = s.path("z");
    let out = ok(&z, &["image", "load", zst.to_str().unwrap()]);
    assert!(out.contains("Loaded image: bb-multi:latest"), "{out}");
    assert_same_tree(
        "zstd",
        &snapshot(&a.join("layers")),
        &snapshot(&z.join("layers")),
    );
    let dir = s.mkdir("out");
    let file = dir.join("bb.tar");
    ok(
        &a,
        &["image", "save", "bb-base", "-o", file.to_str().unwrap()],
    );
    assert_eq!(listing(&dir), vec![std::ffi::OsString::from("bb.tar")]);
    let (refused, _, err) = lfs(&a, &["image", "save", "bb-base", "--format", "oci-dir"]);
    assert!(!refused && err.contains("-o DIR"), "{err}");

    // `image import -` reads a rootfs tarball from standard input (once: it is a pipe).
    let rootfs = s.mkdir("rootfs");
    write(rootfs.join("etc/hello"), b"from a pipe");
    let d = s.path("d");
    let pipe = format!(
        "tar -C {} -czf - . | {BIN} --root {} image import - piped:1",
        rootfs.display(),
        d.display()
    );
    assert!(shell(&pipe).starts_with("sha256:"), "{pipe}");
    assert_eq!(only_layer_file(&d, "etc/hello"), b"from a pipe");
    // A rootfs tarball compressed with xz or bzip2 (as distributions ship them) imports as
    // `docker import` takes it. The layer blob is the tar itself, which no layer may be
    // compressed with either; the two imports share it, and it saves and loads elsewhere.
    let blobs = blob_count(&d);
    for (tool, name) in [("xz", "xz:1"), ("bzip2", "bz:1")] {
        let file = s.path(&format!("rootfs.{tool}"));
        let pipe = format!(
            "tar -C {} -cf - . | {tool} -c > {} && {BIN} --root {} image import {} {name}",
            rootfs.display(),
            file.display(),
            d.display(),
            file.display(),
        );
        assert!(shell(&pipe).starts_with("sha256:"), "{pipe}");
    }
    // One layer blob, the tar (its digest is the diff_id), beside two configs.
    assert_eq!(blob_count(&d), blobs + 3);
    let diff_id = |img: &str| {
        let v: serde_json::Value =
            serde_json::from_str(&ok(&d, &["image", "inspect", img])).unwrap();
        v[0]["RootFS"]["Layers"][0].as_str().unwrap().to_string()
    };
    let tar = diff_id("xz:1");
    assert_eq!(tar, diff_id("bz:1"));
    assert!(
        d.join("blobs/sha256")
            .join(&tar["sha256:".len()..])
            .is_file(),
        "{tar}"
    );
    let moved = s.path("moved");
    let pipe = format!(
        "{BIN} --root {} image save xz:1 | {BIN} --root {} image load",
        d.display(),
        moved.display()
    );
    assert!(shell(&pipe).contains("Loaded image: xz:1"), "{pipe}");
    assert_eq!(only_layer_file(&moved, "etc/hello"), b"from a pipe");
    // What is not a tar leaves no blob behind.
    let blobs = blob_count(&d);
    let pipe = format!(
        "echo garbage | {BIN} --root {} image import - bad:1",
        d.display()
    );
    let (bad, _, err) = run_timeout(Command::new("sh").arg("-c").arg(&pipe), 120);
    assert_eq!(
        (bad, err.trim()),
        (
            false,
            "layerfs: /dev/stdin: not a tar archive (plain or gzip-, zstd-, xz- or bzip2-compressed)"
        ),
        "{pipe}"
    );
    assert_eq!(blob_count(&d), blobs);
}
