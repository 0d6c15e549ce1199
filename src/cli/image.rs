//! `layerfs image ...` and `layerfs container ...`: the store's commands.

use std::collections::BTreeMap;
use std::fs;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use clap::Subcommand;
use serde_json::{Value, json};

use crate::error::{Context, Error, Result};
use crate::store::digest::Digest;
use crate::store::{Image, Store, load, normalize_ref};

#[derive(Subcommand, Debug)]
pub enum ImageCmd {
    /// Load images from an OCI layout dir, an oci-archive tar or a docker-archive tar.
    #[command(
        after_help = "Examples:\n  layerfs image load ./oci-layout-dir\n  layerfs image load busybox.oci.tar\n  docker save busybox | layerfs image load\n  docker save busybox | gzip > bb.tar.gz; layerfs image load bb.tar.gz\n  layerfs image save app:1 | ssh host layerfs image load"
    )]
    Load {
        /// An OCI image layout directory, or an oci-archive or docker-archive tar (plain,
        /// gzip, zstd, xz or bzip2); standard input when absent or `-` (as `docker load`).
        path: Option<PathBuf>,
    },
    /// A flat rootfs tarball (plain, gzip, zstd, xz or bzip2) as a one-layer image, like
    /// `docker import`.
    #[command(
        after_help = "Examples:\n  layerfs image import rootfs.tar.xz debian:12\n  tar -C ./rootfs -cf - . | layerfs image import - mine:1"
    )]
    Import {
        /// The rootfs tarball; `-` reads standard input (as `docker import -`).
        tar: PathBuf,
        /// The new image's name[:tag] (tag `latest` if none).
        reference: String,
    },
    /// List images: REPOSITORY TAG IMAGE-ID CREATED SIZE.
    #[command(alias = "list")]
    Ls {
        #[arg(long, value_parser = ["table", "json"], default_value = "table")]
        format: String,
    },
    /// Add a tag (SOURCE: name[:tag] or id; TARGET: name[:tag]); retagging moves a tag.
    Tag {
        /// The image: name[:tag], its ID or a unique prefix of the ID.
        source: String,
        /// The new name[:tag]: Docker's rules (lowercase name, tag of up to 128 characters).
        target: String,
    },
    /// Untag an image; an image left without tags is deleted with its unshared layers.
    #[command(alias = "remove")]
    #[command(
        after_help = "Each reference is removed in turn; one that cannot be is reported and the rest go on (exit 1 if any failed), as `docker rmi`."
    )]
    Rm {
        /// name[:tag] (removes that tag), or an ID (removes the image and all its tags).
        #[arg(required = true)]
        references: Vec<String>,
    },
    /// Per layer, newest first: CREATED, CREATED BY, SIZE, COMMENT.
    History {
        /// name[:tag] or ID.
        image: String,
        #[arg(long, value_parser = ["table", "json"], default_value = "table")]
        format: String,
    },
    /// JSON: Id, RepoTags, Created, Config, RootFS.Layers, Size, layer paths.
    #[command(
        after_help = "Several images give one JSON array, in the order asked; one that is not found is reported and the rest are shown (exit 1), as `docker image inspect`."
    )]
    Inspect {
        /// name[:tag] or ID.
        #[arg(required = true)]
        images: Vec<String>,
    },
    /// Per layer, top first: the files it adds, changes and deletes relative to the layers
    /// below, its size, and the bytes of lower files it hides; --svg draws the stack.
    Layers {
        /// name[:tag] or ID.
        image: String,
        /// Also write the stack as an SVG picture (opens in a browser).
        #[arg(long, value_name = "FILE")]
        svg: Option<PathBuf>,
        #[arg(long, value_parser = ["table", "json"], default_value = "table")]
        format: String,
    },
    /// Write images out: an OCI layout dir, an oci-archive or a docker-archive tar.
    #[command(
        after_help = "Examples:\n  layerfs image save app:1 -o app.tar\n  layerfs image save app:1 --format docker-archive | docker load\n  layerfs image save app:1 -o ./app-layout --format oci-dir"
    )]
    Save {
        /// Images (name[:tag] or ID) to write, with their tags.
        #[arg(required = true)]
        images: Vec<String>,
        /// Where to write: a tar file (written whole under a temporary name, then renamed),
        /// or a new directory for oci-dir. A tar goes to standard output when absent or `-`
        /// (as `docker save`), unless that is a terminal.
        #[arg(short = 'o', long = "output")]
        output: Option<PathBuf>,
        /// The output format.
        #[arg(long, value_parser = ["oci-dir", "oci-archive", "docker-archive"], default_value = "oci-archive")]
        format: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum ContainerCmd {
    /// A new writable layer over an image's layers.
    #[command(
        after_help = "Example:\n  layerfs container create busybox --name web && layerfs container mount web /mnt/web"
    )]
    Create {
        /// The image: name[:tag] or ID.
        image: String,
        /// The container's name: letters, digits, '_', '.', '-' (not first); default c-<hex>.
        #[arg(long)]
        name: Option<String>,
    },
    /// List containers.
    Ls {
        #[arg(long, value_parser = ["table", "json"], default_value = "table")]
        format: String,
    },
    /// Delete a container's writable layer (the image stays).
    #[command(
        after_help = "Each container is removed in turn and its name printed; one that cannot be is reported and the rest go on (exit 1 if any failed), as `docker rm`."
    )]
    Rm {
        /// The containers.
        #[arg(required = true)]
        names: Vec<String>,
        /// Unmount a mounted container first (refused while something on it is busy).
        #[arg(short, long)]
        force: bool,
    },
    /// JSON: name, image, its layer dirs (top first), the writable layer, the mountpoint.
    #[command(
        after_help = "Several containers give one JSON array, in the order asked; one that is not found is reported and the rest are shown (exit 1), as `docker inspect`."
    )]
    Inspect {
        /// The containers.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Mount a container's root filesystem (image layers + its writable layer).
    Mount {
        /// The container.
        name: String,
        /// An existing directory to mount it on.
        mountpoint: PathBuf,
    },
    /// Unmount it.
    Umount {
        /// The container.
        name: String,
    },
    /// A/C/D lines, like `docker diff`, read from the writable layer.
    Diff {
        /// The container.
        name: String,
    },
    /// Write an OCI runtime bundle: DIR/config.json from the image config (Env,
    /// Entrypoint/Cmd, WorkingDir, User, Labels) and the rootfs mounted at DIR/rootfs.
    #[command(
        after_help = "Example:\n  layerfs container bundle web /tmp/web && runc run --bundle /tmp/web web"
    )]
    Bundle {
        /// The container.
        name: String,
        /// The bundle directory (created if missing).
        dir: PathBuf,
        /// Allocate a terminal (process.terminal = true).
        #[arg(short, long)]
        tty: bool,
        /// Command replacing the image's Cmd.
        #[arg(last = true)]
        cmd: Vec<String>,
    },
    /// Run the container with an OCI runtime: mounts it (if it is not), writes the bundle,
    /// streams the output, returns the container's exit code, unmounts what it mounted.
    #[command(
        after_help = "Examples:\n  layerfs container run web\n  layerfs container run web -- sh -c 'echo hi > /tmp/x'\n  layerfs container run web --runtime crun -- ls /"
    )]
    Run {
        /// The container.
        name: String,
        /// The OCI runtime (a name on PATH or a path).
        #[arg(long, default_value = "runc")]
        runtime: String,
        /// Allocate a terminal.
        #[arg(short, long)]
        tty: bool,
        /// Command replacing the image's Cmd (the Entrypoint still applies).
        #[arg(last = true)]
        cmd: Vec<String>,
    },
    /// The container's filesystem as one plain tar (image layers and writable layer, as
    /// mounted), like `docker export`.
    #[command(
        after_help = "Examples:\n  layerfs container export web -o web.tar\n  layerfs container export web | layerfs image import - web-flat:1"
    )]
    Export {
        /// The container.
        name: String,
        /// The tar file to write (whole or not at all); standard output when absent or `-`,
        /// unless that is a terminal.
        #[arg(short = 'o', long = "output")]
        output: Option<PathBuf>,
    },
    /// The writable layer as a new layer: a new image NEW[:TAG] with a history entry.
    #[command(after_help = "Example:\n  layerfs container commit web web:v2 -m 'installed nginx'")]
    Commit {
        /// The container.
        name: String,
        /// The new image's name[:tag] (tag `latest` if none).
        new: String,
        /// The history entry's comment.
        #[arg(short = 'm', long)]
        message: Option<String>,
    },
}

fn human(n: u64) -> String {
    let units = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1000.0 && i + 1 < units.len() {
        v /= 1000.0;
        i += 1;
    }
    if i == 0 {
        format!("{n}B")
    } else {
        format!("{v:.3}{}", units[i]).replace(".000", "")
    }
}

fn image_size(store: &Store, img: &Image) -> u64 {
    img.layers
        .iter()
        .map(|l| store.layer_size(&l.diff_id))
        .sum()
}

fn tags_of(tags: &BTreeMap<String, Digest>, id: &Digest) -> Vec<String> {
    tags.iter()
        .filter(|(_, v)| *v == id)
        .map(|(k, _)| k.clone())
        .collect()
}

fn print_json(v: &impl serde::Serialize) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// Where a tar goes: `-o FILE`, else standard output (`-`), unless that is a terminal.
fn tar_output(output: Option<PathBuf>) -> Result<PathBuf> {
    match output {
        Some(p) if p != Path::new("-") => Ok(p),
        _ if std::io::stdout().is_terminal() => Err(Error::msg(
            "refusing to write a tar to a terminal: give -o FILE or redirect the output",
        )),
        _ => Ok(PathBuf::from("-")),
    }
}

fn progress(line: String) {
    eprintln!("{line}");
}

pub fn run_image(root: &Path, cmd: ImageCmd) -> Result<i32> {
    match cmd {
        ImageCmd::Load { path } => {
            let path = match path {
                Some(p) if p != Path::new("-") => p,
                _ if std::io::stdin().is_terminal() => {
                    return Err(Error::msg(
                        "no image given and standard input is a terminal: name a file or pipe a tar in",
                    ));
                }
                _ => PathBuf::from("/dev/stdin"),
            };
            let store = Store::open(root, true)?;
            for l in load::load(&store, &path, &mut progress)? {
                let names = if l.tags.is_empty() {
                    l.id.short().to_string()
                } else {
                    l.tags.join(", ")
                };
                println!(
                    "Loaded image: {names} ({}; {} new layer(s), {} already present)",
                    l.id, l.new_layers, l.reused_layers
                );
            }
        }
        ImageCmd::Import { tar, reference } => {
            let tar = match tar.to_str() {
                Some("-") => PathBuf::from("/dev/stdin"),
                _ => tar,
            };
            let store = Store::open(root, true)?;
            let l = load::import(&store, &tar, &reference, &mut progress)?;
            println!("{}", l.id);
        }
        ImageCmd::Ls { format } => {
            let store = Store::open(root, false)?;
            let tags = store.tags()?;
            let mut rows = Vec::new();
            for img in store.images()? {
                let mut names = tags_of(&tags, &img.id);
                if names.is_empty() {
                    names.push("<none>:<none>".into());
                }
                for n in names {
                    let (repo, tag) = n.rsplit_once(':').unwrap_or((&n, ""));
                    rows.push(
                        json!({"Repository": repo, "Tag": tag, "ID": img.id.as_str(),
                        "Created": img.created, "Size": image_size(&store, &img)}),
                    );
                }
            }
            if format == "json" {
                print_json(&rows);
            } else {
                println!(
                    "{:<30} {:<12} {:<14} {:<22} SIZE",
                    "REPOSITORY", "TAG", "IMAGE ID", "CREATED"
                );
                for r in rows {
                    let id = r["ID"].as_str().unwrap_or("");
                    println!(
                        "{:<30} {:<12} {:<14} {:<22} {}",
                        r["Repository"].as_str().unwrap_or(""),
                        r["Tag"].as_str().unwrap_or(""),
                        id.get(7..19).unwrap_or(id),
                        r["Created"].as_str().unwrap_or("").get(..19).unwrap_or(""),
                        human(r["Size"].as_u64().unwrap_or(0))
                    );
                }
            }
        }
        ImageCmd::Tag { source, target } => {
            let store = Store::open(root, true)?;
            let img = store.resolve(&source)?;
            let mut tags = store.tags()?;
            tags.insert(normalize_ref(&target)?, img.id);
            store.set_tags(&tags)?;
        }
        ImageCmd::Rm { references } => {
            let store = Store::open(root, true)?;
            return Ok(each(&references, |r| remove_image(&store, r)));
        }
        ImageCmd::History { image, format } => {
            let store = Store::open(root, false)?;
            let img = store.resolve(&image)?;
            let cfg = store.config(&img)?;
            let mut layer_sizes = img.layers.iter().map(|l| store.layer_size(&l.diff_id));
            let mut rows = Vec::new();
            for h in cfg
                .get("history")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let empty = h
                    .get("empty_layer")
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
                let size = if empty {
                    0
                } else {
                    layer_sizes.next().unwrap_or(0)
                };
                rows.push(
                    json!({"Created": h.get("created"), "CreatedBy": h.get("created_by"),
                    "Size": size, "Comment": h.get("comment")}),
                );
            }
            rows.reverse();
            if format == "json" {
                print_json(&rows);
            } else {
                println!(
                    "{:<22} {:<50} {:<10} COMMENT",
                    "CREATED", "CREATED BY", "SIZE"
                );
                for r in rows {
                    let by = r["CreatedBy"].as_str().unwrap_or("");
                    let by: String = by.chars().take(48).collect();
                    println!(
                        "{:<22} {:<50} {:<10} {}",
                        r["Created"].as_str().unwrap_or("").get(..19).unwrap_or(""),
                        by,
                        human(r["Size"].as_u64().unwrap_or(0)),
                        r["Comment"].as_str().unwrap_or("")
                    );
                }
            }
        }
        ImageCmd::Save {
            images,
            output,
            format,
        } => {
            let output = match output {
                Some(p) if p != Path::new("-") => p,
                _ if format == "oci-dir" => {
                    return Err(Error::msg(
                        "--format oci-dir writes a directory: give it with -o DIR",
                    ));
                }
                _ => tar_output(None)?,
            };
            if output != Path::new("-")
                && output.exists()
                && (format != "oci-dir"
                    || fs::read_dir(&output)
                        .map(|mut d| d.next().is_some())
                        .unwrap_or(true))
            {
                return Err(Error::msg(format!("{} already exists", output.display())));
            }
            let store = Store::open(root, false)?;
            let tags = store.tags()?;
            let mut sel = Vec::new();
            for r in &images {
                let img = store.resolve(r)?;
                let t = match normalize_ref(r) {
                    Ok(n) if tags.contains_key(&n) => vec![n],
                    _ => tags_of(&tags, &img.id),
                };
                sel.push((img, t));
            }
            crate::store::save::save(&store, &sel, &output, &format)?;
            let to = match output.to_str() {
                Some("-") => "standard output".to_string(),
                _ => output.display().to_string(),
            };
            eprintln!("saved {} image(s) to {to} ({format})", sel.len());
        }
        ImageCmd::Layers { image, svg, format } => {
            let store = Store::open(root, false)?;
            super::observe::image_layer_maps(&store, &image, &format, svg.as_deref())?;
        }
        ImageCmd::Inspect { images } => {
            let store = Store::open(root, false)?;
            let mut found = Vec::new();
            let code = each(&images, |r| {
                let img = store.resolve(r)?;
                let cfg = store.config(&img)?;
                let tags = tags_of(&store.tags()?, &img.id);
                found.push(json!({
                    "Id": img.id.as_str(),
                    "RepoTags": tags,
                    "Created": img.created,
                    "Architecture": cfg.get("architecture"),
                    "Os": cfg.get("os"),
                    "Config": cfg.get("config"),
                    "RootFS": {"Type": "layers", "Layers": img.layers.iter().map(|l| l.diff_id.as_str()).collect::<Vec<_>>()},
                    "Size": image_size(&store, &img),
                    "LayerPaths": img.layers.iter().map(|l| store.layer_dir(&l.diff_id).join("diff")).collect::<Vec<_>>(),
                }));
                Ok(())
            });
            print_json(&Value::Array(found));
            return Ok(code);
        }
    }
    Ok(0)
}

// ---------------------------------------------------------------- containers

/// A new container's name: Docker's characters, so it is a safe directory name and a valid
/// runc container id.
fn check_new_container_name(name: &str) -> Result<()> {
    let b = name.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 128
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Error::msg(format!(
            "bad container name {name:?}: up to 128 letters, digits, '_', '.' or '-', starting with a letter or digit"
        )))
    }
}

fn container_dir(store: &Store, name: &str) -> Result<PathBuf> {
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        return Err(Error::msg(format!("bad container name {name:?}")));
    }
    Ok(store.root.join("containers").join(name))
}

fn read_meta(store: &Store, name: &str) -> Result<Value> {
    let p = container_dir(store, name)?.join("meta.json");
    let d = fs::read(&p).map_err(|_| Error::msg(format!("no such container: {name}")))?;
    serde_json::from_slice(&d)
        .map_err(|e| Error::msg(format!("container {name}: corrupt meta.json: {e}")))
}

fn write_meta(store: &Store, name: &str, v: &Value) -> Result<()> {
    let p = container_dir(store, name)?.join("meta.json");
    let data = serde_json::to_vec_pretty(v).unwrap_or_default();
    crate::store::write_atomic(&store.tmp(), &p, &data)
}

fn containers_using(store: &Store, id: &Digest) -> Result<Vec<String>> {
    let mut v = Vec::new();
    for e in fs::read_dir(store.root.join("containers"))?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Ok(m) = read_meta(store, &name)
            && m["Image"].as_str() == Some(id.as_str())
        {
            v.push(name);
        }
    }
    Ok(v)
}

/// Where container `name` is mounted now, if it is (a recorded mountpoint that is live).
pub(crate) fn mounted_at(store: &Store, name: &str) -> Result<Option<PathBuf>> {
    let m = read_meta(store, name)?;
    Ok(m["Mountpoint"]
        .as_str()
        .map(PathBuf::from)
        .filter(|mp| crate::sys::is_mountpoint(mp)))
}

/// Mount container `name` (its image's layers and its writable layer) on `mountpoint`.
pub(crate) fn mount_container(store: &Store, name: &str, mountpoint: &Path) -> Result<PathBuf> {
    let mut m = read_meta(store, name)?;
    if let Some(mp) = mounted_at(store, name)? {
        return Err(Error::msg(format!(
            "container {name} is already mounted on {}",
            mp.display()
        )));
    }
    let img = store.resolve(m["Image"].as_str().unwrap_or(""))?;
    let dir = container_dir(store, name)?;
    let low: Vec<String> = store
        .lowers(&img)
        .iter()
        .map(|p| p.to_string_lossy().replace(':', "\\:").replace(',', "\\,"))
        .collect();
    // Image layers never change: their containers' mounts share one lower catalog.
    let opts = format!(
        "lowerdir={},upperdir={},workdir={},catalog={}",
        low.join(":"),
        dir.join("upper").display(),
        dir.join("work").display(),
        store
            .catalog_path(&img)
            .to_string_lossy()
            .replace(',', "\\,")
    );
    let args = super::MountArgs {
        options: vec![opts],
        foreground: false,
        debug: false,
        log_file: None,
        mountpoint: mountpoint.to_path_buf(),
    };
    super::mount::mount(args)?;
    let abs = fs::canonicalize(mountpoint)?;
    m["Mountpoint"] = json!(abs);
    write_meta(store, name, &m)?;
    Ok(abs)
}

/// Unmount container `name`.
pub(crate) fn umount_container(store: &Store, name: &str) -> Result<()> {
    let mut m = read_meta(store, name)?;
    let mp = m["Mountpoint"]
        .as_str()
        .map(PathBuf::from)
        .ok_or_else(|| Error::msg(format!("container {name} is not mounted")))?;
    super::mount::umount(&mp, false)?;
    m["Mountpoint"] = Value::Null;
    write_meta(store, name, &m)
}

/// The image config blob of container `name`'s image.
pub(crate) fn container_image_config(store: &Store, name: &str) -> Result<Value> {
    let m = read_meta(store, name)?;
    let img = store.resolve(m["Image"].as_str().unwrap_or(""))?;
    store.config(&img)
}

pub(crate) fn container_path(store: &Store, name: &str) -> Result<PathBuf> {
    read_meta(store, name)?;
    container_dir(store, name)
}

/// `image rm` of one reference: untag it, and delete the image when no tag is left.
fn remove_image(store: &Store, reference: &str) -> Result<()> {
    let img = store.resolve(reference)?;
    let mut tags = store.tags()?;
    let by_tag = normalize_ref(reference)
        .ok()
        .filter(|t| tags.contains_key(t));
    let users = containers_using(store, &img.id)?;
    match &by_tag {
        Some(t) if tags_of(&tags, &img.id).len() > 1 => {
            tags.remove(t);
            store.set_tags(&tags)?;
            println!("Untagged: {t}");
            return Ok(());
        }
        _ => {}
    }
    if !users.is_empty() {
        return Err(Error::msg(format!(
            "image {} is in use by container(s) {}",
            img.id.short(),
            users.join(", ")
        )));
    }
    for t in tags_of(&tags, &img.id) {
        tags.remove(&t);
        println!("Untagged: {t}");
    }
    store.set_tags(&tags)?;
    for l in store.remove_image(&img)? {
        println!("Deleted layer: {l}");
    }
    println!("Deleted: {}", img.id);
    Ok(())
}

/// Run `f` on each of `items`, reporting each failure on its own line and going on, as docker
/// does with several names; the exit code is 1 if any failed.
fn each(items: &[String], mut f: impl FnMut(&str) -> Result<()>) -> i32 {
    let mut code = 0;
    for i in items {
        if let Err(e) = f(i) {
            eprintln!("layerfs: {}", crate::error::one_line(&e.to_string()));
            code = 1;
        }
    }
    code
}

/// `container rm` of one container; `force` unmounts a mounted one first.
fn remove_container(store: &Store, name: &str, force: bool) -> Result<()> {
    let m = read_meta(store, name)?;
    if let Some(mp) = m["Mountpoint"].as_str()
        && crate::sys::is_mountpoint(Path::new(mp))
    {
        if !force {
            return Err(Error::msg(format!(
                "container {name} is mounted on {mp}: unmount it first (or rm -f)"
            )));
        }
        umount_container(store, name)?;
    }
    store.discard(&container_dir(store, name)?)
}

pub fn run_container(root: &Path, cmd: ContainerCmd) -> Result<i32> {
    match cmd {
        ContainerCmd::Create { image, name } => {
            let store = Store::open(root, true)?;
            let img = store.resolve(&image)?;
            let name = name.unwrap_or_else(|| {
                format!(
                    "c-{}",
                    &Digest::of(format!("{:?}", std::time::SystemTime::now()).as_bytes()).hex()
                        [..10]
                )
            });
            check_new_container_name(&name)?;
            let dir = container_dir(&store, &name)?;
            if dir.exists() {
                return Err(Error::msg(format!("container {name} already exists")));
            }
            fs::create_dir_all(dir.join("upper")).ctx("creating the container")?;
            fs::create_dir_all(dir.join("work"))?;
            write_meta(
                &store,
                &name,
                &json!({"Name": name, "Image": img.id.as_str(), "Mountpoint": null}),
            )?;
            println!("{name}");
        }
        ContainerCmd::Ls { format } => {
            let store = Store::open(root, false)?;
            let mut rows = Vec::new();
            for e in fs::read_dir(store.root.join("containers"))?.flatten() {
                if let Ok(m) = read_meta(&store, &e.file_name().to_string_lossy()) {
                    rows.push(m);
                }
            }
            if format == "json" {
                print_json(&rows);
            } else {
                println!("{:<20} {:<14} MOUNTPOINT", "NAME", "IMAGE ID");
                for r in rows {
                    let id = r["Image"].as_str().unwrap_or("");
                    println!(
                        "{:<20} {:<14} {}",
                        r["Name"].as_str().unwrap_or(""),
                        id.get(7..19).unwrap_or(id),
                        r["Mountpoint"].as_str().unwrap_or("-")
                    );
                }
            }
        }
        ContainerCmd::Inspect { names } => {
            let store = Store::open(root, false)?;
            let mut found = Vec::new();
            let code = each(&names, |name| {
                let mut m = read_meta(&store, name)?;
                let img = store.resolve(m["Image"].as_str().unwrap_or(""))?;
                let dir = container_dir(&store, name)?;
                m["LowerDirs"] = json!(store.lowers(&img));
                m["UpperDir"] = json!(dir.join("upper"));
                m["WorkDir"] = json!(dir.join("work"));
                m["ImageTags"] = json!(tags_of(&store.tags()?, &img.id));
                found.push(m);
                Ok(())
            });
            print_json(&Value::Array(found));
            return Ok(code);
        }
        ContainerCmd::Rm { names, force } => {
            let store = Store::open(root, true)?;
            return Ok(each(&names, |name| {
                remove_container(&store, name, force)?;
                println!("{name}");
                Ok(())
            }));
        }
        ContainerCmd::Mount { name, mountpoint } => {
            let store = Store::open(root, true)?;
            mount_container(&store, &name, &mountpoint)?;
        }
        ContainerCmd::Bundle {
            name,
            dir,
            tty,
            cmd,
        } => {
            let store = Store::open(root, true)?;
            return super::run::bundle(&store, &name, &dir, &cmd, tty);
        }
        ContainerCmd::Run {
            name,
            runtime,
            tty,
            cmd,
        } => {
            return super::run::run(root, &name, &runtime, &cmd, tty);
        }
        ContainerCmd::Umount { name } => {
            let store = Store::open(root, true)?;
            umount_container(&store, &name)?;
        }
        ContainerCmd::Export { name, output } => {
            let output = tar_output(output)?;
            let store = Store::open(root, false)?;
            let m = read_meta(&store, &name)?;
            let img = store.resolve(m["Image"].as_str().unwrap_or(""))?;
            let upper = container_dir(&store, &name)?.join("upper");
            let below = store.below(&img);
            crate::store::save::write_out(&output, |w| {
                crate::store::pack::pack_merged(&upper, &below, w)
            })?;
        }
        ContainerCmd::Commit { name, new, message } => {
            let store = Store::open(root, true)?;
            let m = read_meta(&store, &name)?;
            let base = store.resolve(m["Image"].as_str().unwrap_or(""))?;
            let upper = container_dir(&store, &name)?.join("upper");
            let img = store.commit(&base, &upper, Some(new.clone()), message)?;
            println!("{}", img.id);
        }
        ContainerCmd::Diff { name } => {
            let store = Store::open(root, false)?;
            let m = read_meta(&store, &name)?;
            let img = store.resolve(m["Image"].as_str().unwrap_or(""))?;
            let upper = container_dir(&store, &name)?.join("upper");
            for (k, p) in crate::store::changes::changes(&upper, &store.below(&img))? {
                println!("{k} /{p}");
            }
        }
    }
    Ok(0)
}

/// `system df`: images, layers, containers; what is shared and the total.
pub fn system_df(root: &Path, format: &str) -> Result<i32> {
    let store = Store::open(root, false)?;
    let images = store.images()?;
    let mut uses: BTreeMap<Digest, usize> = BTreeMap::new();
    for i in &images {
        for l in &i.layers {
            *uses.entry(l.diff_id.clone()).or_default() += 1;
        }
    }
    let layer_bytes: u64 = uses.keys().map(|d| store.layer_size(d)).sum();
    let shared: Vec<&Digest> = uses
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(d, _)| d)
        .collect();
    let shared_bytes: u64 = shared.iter().map(|d| store.layer_size(d)).sum();
    let mut containers = 0;
    let mut cbytes = 0;
    for e in fs::read_dir(store.root.join("containers"))?.flatten() {
        containers += 1;
        cbytes += du(&e.path().join("upper"));
    }
    // The layers as distributed (kept so `image save` reproduces their digests) and configs.
    let (mut blobs, mut blob_bytes) = (0, 0);
    for e in fs::read_dir(store.root.join("blobs/sha256"))?.flatten() {
        blobs += 1;
        blob_bytes += e.metadata().map_or(0, |m| m.len());
    }
    let total = layer_bytes + cbytes + blob_bytes;
    let v = json!({"Images": images.len(), "Layers": uses.len(), "LayersSize": layer_bytes,
        "SharedLayers": shared.len(), "SharedSize": shared_bytes, "Containers": containers,
        "ContainersSize": cbytes, "Blobs": blobs, "BlobsSize": blob_bytes, "TotalSize": total});
    if format == "json" {
        print_json(&v);
    } else {
        println!(
            "{:<12} {:>6} {:>12} {:>14}",
            "TYPE", "TOTAL", "SIZE", "SHARED"
        );
        println!(
            "{:<12} {:>6} {:>12} {:>14}",
            "Images",
            images.len(),
            human(layer_bytes),
            ""
        );
        println!(
            "{:<12} {:>6} {:>12} {:>14}",
            "Layers",
            uses.len(),
            human(layer_bytes),
            format!("{} ({})", shared.len(), human(shared_bytes))
        );
        println!(
            "{:<12} {:>6} {:>12} {:>14}",
            "Containers",
            containers,
            human(cbytes),
            ""
        );
        println!(
            "{:<12} {:>6} {:>12} {:>14}",
            "Blobs",
            blobs,
            human(blob_bytes),
            ""
        );
        println!("{:<12} {:>6} {:>12}", "Total", "", human(total));
    }
    Ok(0)
}

fn du(p: &Path) -> u64 {
    let Ok(rd) = fs::read_dir(p) else { return 0 };
    rd.flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => du(&e.path()),
            _ => e.metadata().map(|m| m.len()).unwrap_or(0),
        })
        .sum()
}
