//! The command line: clap definitions and handlers. No filesystem logic lives here.

pub mod image;
pub mod mount;
pub mod observe;
pub mod options;
pub mod run;
pub mod which;

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::error::Result;

const MOUNT_HELP: &str = "\
Mount OPTIONS (comma-separated; -o may be repeated):
  lowerdir=TOP:...:BOTTOM  read-only layers, top first (kernel overlayfs order); \\: escapes a colon
  lowerdir+=DIR            one lower layer per option, top first, no escapes (the kernel's
                           new mount API form); not mixed with lowerdir=
  lowerdir=L1:L2::D1::D2   after '::', data-only layers: not in the tree, they only hold
  datadir+=DIR             data that metadata-only copies of the lower layers point at with
                           absolute redirects (composefs's object store); datadir+= after
                           the lowerdir+= ones
  upperdir=DIR             writable layer (all changes land here); needs workdir
  workdir=DIR              on the same filesystem as upperdir: work/ (scratch, emptied at
                           mount) and index/ (copied-up lower hard links, the kernel's
                           index=on format); keep it with the upper
  fsync=0 | volatile       don't fsync copy-ups (faster; a crash may lose recent copy-ups).
                           As the kernel's volatile: leaves workdir/work/incompat/volatile,
                           and every later mount refuses that workdir until it is removed
                           (remove it once the upper is known to be on disk, e.g. after sync)
  passthrough=1|upper|0    reads and writes of open files go straight to the real file (FUSE
                           passthrough; default 1 as root, needs kernel 6.9+). A reader open
                           on a lower file before a copy-up keeps its lower data (the kernel
                           switches it); `upper`: lower files go through the page cache and
                           such readers follow, as in the kernel; 0: everything through it
  io_uring=1|0             take requests over FUSE io_uring (per-CPU queues, served on the
                           caller's CPU: cheaper round trips, see docs/BENCHMARKS.md) when
                           the kernel offers it: kernel 6.14+ with fuse.enable_uring=Y (echo Y >
                           /sys/module/fuse/parameters/enable_uring). Default 1; 0: /dev/fuse
  catalog=FILE             keep what lookups learn about directories merged over more than 8
                           lower layers in FILE (written at unmount, read at the next mount
                           of the same layers): a cold lookup through 100 layers then reads
                           one layer, not 100. Only for lower layers that never change (as
                           image-store layers; its containers use one per image); a catalog
                           of other layers, or a damaged one, is ignored and rebuilt
  userxattr                write markers as user.overlay.* (default when not root)
  metacopy=on|off          chmod/chown/touch/setfattr/mv of a lower file copy up its metadata
                           only (as kernel overlayfs metacopy=on; root); the data follows at
                           the first open for writing. Off by default, as in the kernel
  verity=on|require        check the fs-verity digest a metadata-only copy records against its
                           data's at the first open or copy-up (EIO if it differs or the data
                           has none); require: a copy recording none fails too (composefs)
  uidmapping=C:H:N[:C:H:N...]  show host ids H..H+N-1 as container ids C..C+N-1 (and map
  gidmapping=C:H:N[:...]   chown/new files back); unmapped host ids show as 65534
  squash_to_root, squash_to_uid=N, squash_to_gid=N
                           report every file as owned by root (or uid/gid N)
  xattr_permissions=0|1|2  keep owner and mode in an xattr instead of chown/chmod (1:
                           security.fuseoverlayfs.override_stat, 2: user.containers.override_stat),
                           so an unprivileged store can hold root-owned files
  ro                       read-only even with an upperdir
  acl, noacl               POSIX ACLs checked (and cached) by the kernel, as in overlayfs: the
                           default, except with the id options above; noacl: mode bits only
  allow_other, default_permissions, dev, nodev, suid, nosuid, noexec, noatime, sync, dirsync
                           (as root, allow_other, default_permissions, dev and suid are on)
Accepted for compatibility and ignored (fuse-overlayfs, mount(8), kernel overlayfs):
  rw atime relatime strictatime nodiratime async exec defaults context= fscontext= defcontext=
  rootcontext= posix_acl ...; with the kernel's values checked: redirect_dir=on|off|follow|
  nofollow, index=on|off, xino=on|off|auto, nfs_export=on|off, uuid=on|off|null|auto

Examples:
  layerfs mount -o lowerdir=/img/l2:/img/l1,upperdir=/c/up,workdir=/c/work /c/rootfs
  layerfs -o lowerdir=/img/l1 /mnt/ro            # read-only; the form container tools use
  layerfs umount /c/rootfs";

#[derive(Parser, Debug)]
#[command(
    name = "layerfs",
    version,
    about = "A copy-on-write union filesystem for container images (FUSE, kernel overlayfs format)",
    after_help = "Without a subcommand, `layerfs -o OPTIONS MOUNTPOINT` mounts (as fuse-overlayfs is called).\nRUST_LOG=debug shows each filesystem operation (with -f or -d)."
)]
pub struct Cli {
    /// Image store root (default: $LAYERFS_ROOT, else /var/lib/layerfs as root,
    /// else $XDG_DATA_HOME/layerfs).
    #[arg(long, global = true, value_name = "DIR")]
    pub root: Option<PathBuf>,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Mount layers as one tree; returns once the mount is live (the daemon detaches).
    #[command(after_help = MOUNT_HELP)]
    Mount(MountArgs),
    /// Images in the store: load, import, ls, tag, rm, history, inspect, save.
    Image {
        #[command(subcommand)]
        cmd: image::ImageCmd,
    },
    /// List images (same as `image ls`).
    Images {
        #[arg(long, value_parser = ["table", "json"], default_value = "table")]
        format: String,
    },
    /// Containers: a writable layer over an image; create, ls, inspect, rm, mount, umount, diff,
    /// commit, export, and run with runc/crun (run, bundle).
    Container {
        #[command(subcommand)]
        cmd: image::ContainerCmd,
    },
    /// Store-wide information: `system df` shows images, layers, containers, blobs, shared and total.
    System {
        #[command(subcommand)]
        cmd: SystemCmd,
    },
    /// Which layer serves each PATH on a layerfs mount, whether it was copied up, and for a
    /// directory how many entries each layer contributes.
    Which {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        #[arg(long, value_parser = ["table", "json"], default_value = "table")]
        format: String,
    },
    /// Counters of a live mount since it was mounted: copy-ups, whiteouts, opaque dirs,
    /// redirects, operations with latency percentiles, opens, caches, inodes, memory.
    #[command(
        after_help = "Examples:\n  layerfs stats /c/rootfs\n  layerfs stats /c/rootfs --watch          # refreshes in place, like top\n  layerfs stats /c/rootfs --format json"
    )]
    Stats {
        /// The mountpoint, or any path on the mount.
        mountpoint: PathBuf,
        /// Refresh in place until Ctrl-C (with --format json: one JSON line per refresh).
        #[arg(short, long)]
        watch: bool,
        /// Seconds between refreshes with --watch.
        #[arg(long, default_value_t = 1.0, value_name = "SECS")]
        interval: f64,
        #[arg(long, value_parser = ["table", "json"], default_value = "table")]
        format: String,
    },
    /// A live stream of copy-ups, whiteouts, opaque dirs, redirects, renames and unlinks on a
    /// mount, each with the operation and the process (pid, command) that caused it.
    #[command(
        after_help = "Examples:\n  layerfs events /c/rootfs                  # one line per event; Ctrl-C ends\n  layerfs events /c/rootfs --format json | jq .\nSeveral readers may watch at once; with nobody watching, events cost nothing."
    )]
    Events {
        /// The mountpoint, or any path on the mount.
        mountpoint: PathBuf,
        #[arg(long, value_parser = ["text", "json"], default_value = "text")]
        format: String,
    },
    /// Per layer of a live mount (the upper included), top first: the files it adds, changes
    /// and deletes relative to the layers below, its size and the lower bytes it hides.
    Layers {
        /// The mountpoint, or any path on the mount.
        mountpoint: PathBuf,
        /// Also write the stack as an SVG picture (opens in a browser).
        #[arg(long, value_name = "FILE")]
        svg: Option<PathBuf>,
        #[arg(long, value_parser = ["table", "json"], default_value = "table")]
        format: String,
    },
    /// Unmount a layerfs mount (the daemon then exits).
    #[command(alias = "unmount")]
    Umount {
        mountpoint: PathBuf,
        /// Detach now even if busy; cleaned up when no longer in use.
        #[arg(short, long)]
        lazy: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum SystemCmd {
    /// Disk use: images, layers (and how many are shared), containers, the blobs kept for
    /// `image save`, total.
    Df {
        #[arg(long, value_parser = ["table", "json"], default_value = "table")]
        format: String,
    },
}

#[derive(clap::Args, Debug, Clone)]
pub struct MountArgs {
    /// Mount options (see below); may be repeated.
    #[arg(short = 'o', value_name = "OPTIONS", required = true)]
    pub options: Vec<String>,
    /// Stay in the foreground.
    #[arg(short = 'f', long)]
    pub foreground: bool,
    /// Foreground with debug logging of every operation.
    #[arg(short = 'd', long)]
    pub debug: bool,
    /// Write the daemon's log here (a detached daemon logs nowhere otherwise).
    #[arg(long, value_name = "FILE")]
    pub log_file: Option<PathBuf>,
    pub mountpoint: PathBuf,
}

/// `layerfs -o ... MOUNTPOINT` (a "mount program" call) means `layerfs mount -o ...`: the
/// first argument after any global `--root DIR` is an option rather than a command.
pub fn normalize_args(mut args: Vec<OsString>) -> Vec<OsString> {
    let mut i = 1;
    while let Some(a) = args.get(i).and_then(|a| a.to_str()) {
        if a == "--root" {
            i += 2;
        } else if a.starts_with("--root=") {
            i += 1;
        } else {
            break;
        }
    }
    if let Some(first) = args.get(i).and_then(|a| a.to_str()) {
        let is_global = matches!(first, "-h" | "--help" | "-V" | "--version");
        if first.starts_with('-') && !is_global {
            args.insert(i, "mount".into());
        }
    }
    args
}

pub fn run(cli: Cli) -> Result<i32> {
    let root = cli
        .root
        .clone()
        .unwrap_or_else(crate::store::Store::default_root);
    match cli.cmd {
        Cmd::Image { cmd } => image::run_image(&root, cmd),
        Cmd::Images { format } => image::run_image(&root, image::ImageCmd::Ls { format }),
        Cmd::Container { cmd } => image::run_container(&root, cmd),
        Cmd::System {
            cmd: SystemCmd::Df { format },
        } => image::system_df(&root, &format),
        Cmd::Which { paths, format } => which::which(&paths, &format),
        Cmd::Stats {
            mountpoint,
            watch,
            interval,
            format,
        } => observe::stats(&mountpoint, watch, interval, &format),
        Cmd::Events { mountpoint, format } => observe::events(&mountpoint, &format),
        Cmd::Layers {
            mountpoint,
            svg,
            format,
        } => observe::mount_layer_maps(&mountpoint, &format, svg.as_deref()),
        Cmd::Mount(a) => mount::mount(a),
        Cmd::Umount { mountpoint, lazy } => mount::umount(&mountpoint, lazy).map(|()| 0),
    }
}
