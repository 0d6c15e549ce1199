//! `-o` mount options: parsed and checked into a `MountSpec`, with one-line errors.
//!
//! Syntax follows kernel overlayfs and fuse-overlayfs: comma-separated, `\,` escapes a comma;
//! in `lowerdir`, layers are colon-separated, top first, and `\:` escapes a colon.

use std::path::{Path, PathBuf};

use fuser::MountOption;

use crate::error::{Error, Result};
use crate::fuse::session::{MountSpec, Passthrough};
use crate::sys;
use crate::union::format::MarkerNs;
use crate::union::ids::{IdMap, Ids, override_xattr};
use crate::union::{Config, Verity};

/// Options accepted for compatibility and ignored: they either describe kernel overlayfs
/// features layerfs always has or never needs, or SELinux labels FUSE can't apply.
pub const IGNORED: &[&str] = &[
    "rw",
    "atime",
    "relatime",
    "strictatime",
    "nodiratime",
    "diratime",
    "async",
    "exec",
    "auto",
    "noauto",
    "nouser",
    "user",
    "defaults",
    "_netdev",
    "nofail",
    "lazytime",
    "nolazytime",
    "silent",
    "loud",
    "context",
    "fscontext",
    "defcontext",
    "rootcontext",
    "fast_ino",
    "threaded",
    "posix_acl",
    "override_creds",
    "noxattrs",
    "plugins",
];

/// Kernel overlayfs options that take a value, with the values the kernel accepts: checked
/// as the kernel checks them (a bad value fails the mount), then ignored (layerfs always
/// follows redirects, keeps the inode index, and has no NFS export or xino to configure),
/// except `verity`.
const KERNEL_VALUED: &[(&str, &[&str])] = &[
    ("redirect_dir", &["on", "off", "follow", "nofollow"]),
    ("index", &["on", "off"]),
    ("xino", &["on", "off", "auto"]),
    ("nfs_export", &["on", "off"]),
    ("uuid", &["on", "off", "null", "auto"]),
    ("verity", &["on", "off", "require"]),
];

/// Split on `sep`, honouring `\sep` (and `\\`) escapes.
pub fn split_escaped(s: &str, sep: char) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some(n) if n == sep || n == '\\' => cur.push(n),
                Some(n) => {
                    cur.push('\\');
                    cur.push(n);
                }
                None => cur.push('\\'),
            }
        } else if c == sep {
            out.push(std::mem::take(&mut cur));
        } else {
            cur.push(c);
        }
    }
    out.push(cur);
    out
}

/// Split a `-o` string into options, keeping `\:` escapes for lowerdir's own split. A
/// double-quoted part is one piece: containers-storage passes SELinux labels as
/// `context="system_u:object_r:container_file_t:s0:c1,c2"`.
fn split_options(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars();
    let mut quoted = false;
    while let Some(c) = chars.next() {
        if c == '"' {
            quoted = !quoted;
            cur.push(c);
        } else if quoted {
            cur.push(c);
        } else if c == '\\' {
            match chars.next() {
                Some(',') => cur.push(','),
                Some(n) => {
                    cur.push('\\');
                    cur.push(n);
                }
                None => cur.push('\\'),
            }
        } else if c == ',' {
            out.push(std::mem::take(&mut cur));
        } else {
            cur.push(c);
        }
    }
    out.push(cur);
    out.retain(|o| !o.is_empty());
    out
}

#[derive(Default, Debug)]
struct Raw {
    lower: Option<String>,
    /// `lower` was built from `lowerdir+=` options.
    lower_plus: bool,
    upper: Option<String>,
    work: Option<String>,
    fsync: bool,
    userxattr: bool,
    metacopy: bool,
    allow_other: Option<bool>,
    default_permissions: Option<bool>,
    kernel: Vec<MountOption>,
    ro: bool,
    passthrough: Option<Passthrough>,
    io_uring: Option<bool>,
    acl: Option<bool>,
    catalog: Option<String>,
    ids: Ids,
    /// `datadir+=` layers, top first.
    data: Vec<String>,
    verity: Verity,
}

fn parse_raw(opts: &[String]) -> Result<Raw> {
    let mut r = Raw {
        fsync: true,
        ..Raw::default()
    };
    for o in opts.iter().flat_map(|s| split_options(s)) {
        let (k, v) = match o.split_once('=') {
            Some((k, v)) => (k.to_string(), Some(v.to_string())),
            None => (o.clone(), None),
        };
        let need = |v: Option<String>| {
            v.filter(|s| !s.is_empty())
                .ok_or_else(|| Error::msg(format!("mount option '{k}' needs a value ({k}=...)")))
        };
        match k.as_str() {
            "lowerdir" if r.lower_plus || !r.data.is_empty() => {
                return Err(Error::msg(
                    "lowerdir cannot follow lowerdir+ or datadir+ (use one form)",
                ));
            }
            "lowerdir" => r.lower = Some(need(v)?),
            // The kernel's new mount API form: one layer per option, top first, no escapes.
            "lowerdir+" => {
                if !r.data.is_empty() {
                    return Err(Error::msg(
                        "lowerdir+ cannot follow datadir+ (data-only layers come last)",
                    ));
                }
                if r.lower.is_some() && !r.lower_plus {
                    return Err(Error::msg(
                        "lowerdir+ cannot follow lowerdir (use one form)",
                    ));
                }
                let layer = need(v)?.replace('\\', "\\\\").replace(':', "\\:");
                r.lower = Some(match r.lower.take() {
                    Some(l) => format!("{l}:{layer}"),
                    None => layer,
                });
                r.lower_plus = true;
            }
            // A data-only layer, below all lowerdir+ ones (the kernel's new mount API form).
            "datadir+" => {
                if r.lower.is_some() && !r.lower_plus {
                    return Err(Error::msg(
                        "datadir+ cannot follow lowerdir (use lowerdir=A::D, or lowerdir+ and datadir+)",
                    ));
                }
                r.data.push(need(v)?);
            }
            "upperdir" => r.upper = Some(need(v)?),
            "workdir" => r.work = Some(need(v)?),
            "fsync" => {
                r.fsync = match v.as_deref() {
                    Some("1") | None => true,
                    Some("0") => false,
                    Some(x) => {
                        return Err(Error::msg(format!(
                            "fsync={x}: expected fsync=0 or fsync=1"
                        )));
                    }
                }
            }
            "volatile" => r.fsync = false,
            "passthrough" => {
                r.passthrough = match v.as_deref() {
                    Some("1") | Some("on") | None => Some(Passthrough::All),
                    Some("upper") => Some(Passthrough::Upper),
                    Some("0") | Some("off") => Some(Passthrough::Off),
                    Some(x) => {
                        return Err(Error::msg(format!(
                            "passthrough={x}: expected passthrough=0, 1 or upper"
                        )));
                    }
                }
            }
            "io_uring" => {
                r.io_uring = match v.as_deref() {
                    Some("1") | Some("on") | None => Some(true),
                    Some("0") | Some("off") => Some(false),
                    Some(x) => {
                        return Err(Error::msg(format!(
                            "io_uring={x}: expected io_uring=0 or io_uring=1"
                        )));
                    }
                }
            }
            "acl" => r.acl = Some(true),
            "noacl" => r.acl = Some(false),
            "catalog" => r.catalog = Some(need(v)?),
            "userxattr" => r.userxattr = true,
            "metacopy" => {
                r.metacopy = match v.as_deref() {
                    Some("on") => true,
                    Some("off") => false,
                    _ => {
                        return Err(Error::msg(format!(
                            "{o}: expected metacopy=on or metacopy=off"
                        )));
                    }
                }
            }
            "uidmapping" => r.ids.uid = IdMap::parse("uidmapping", &need(v)?)?,
            "gidmapping" => r.ids.gid = IdMap::parse("gidmapping", &need(v)?)?,
            "squash_to_root" => (r.ids.squash_uid, r.ids.squash_gid) = (Some(0), Some(0)),
            "squash_to_uid" => r.ids.squash_uid = Some(parse_id(&k, &need(v)?)?),
            "squash_to_gid" => r.ids.squash_gid = Some(parse_id(&k, &need(v)?)?),
            "xattr_permissions" => {
                let v = need(v)?;
                r.ids.xattr = match v.as_str() {
                    "0" => None,
                    "1" | "2" => override_xattr(if v == "1" { 1 } else { 2 }),
                    _ => {
                        return Err(Error::msg(format!(
                            "xattr_permissions={v}: expected 0, 1 (security.fuseoverlayfs.override_stat) or 2 (user.containers.override_stat)"
                        )));
                    }
                }
            }
            "allow_other" => r.allow_other = Some(true),
            "allow_root" => r.allow_other = Some(true),
            "default_permissions" => r.default_permissions = Some(true),
            "ro" => r.ro = true,
            "dev" => r.kernel.push(MountOption::Dev),
            "nodev" => r.kernel.push(MountOption::NoDev),
            "suid" => r.kernel.push(MountOption::Suid),
            "nosuid" => r.kernel.push(MountOption::NoSuid),
            "noexec" => r.kernel.push(MountOption::NoExec),
            "noatime" => r.kernel.push(MountOption::NoAtime),
            "sync" => r.kernel.push(MountOption::Sync),
            "dirsync" => r.kernel.push(MountOption::DirSync),
            _ if IGNORED.contains(&k.as_str()) => log::debug!("ignoring mount option {o}"),
            _ if let Some((_, values)) = KERNEL_VALUED.iter().find(|(n, _)| *n == k) => {
                match v.as_deref() {
                    Some(x) if values.contains(&x) && k == "verity" => {
                        r.verity = match x {
                            "on" => Verity::On,
                            "require" => Verity::Require,
                            _ => Verity::Off,
                        }
                    }
                    Some(x) if values.contains(&x) => log::debug!("ignoring mount option {o}"),
                    _ => {
                        return Err(Error::msg(format!(
                            "{o}: expected {k}={} (as kernel overlayfs)",
                            values.join("|")
                        )));
                    }
                }
            }
            _ => {
                return Err(Error::msg(format!(
                    "unknown mount option '{o}' (see `layerfs mount --help` for the accepted list)"
                )));
            }
        }
    }
    Ok(r)
}

/// Data-only lower layers (`lowerdir=A::B`, `datadir+=`): the kernel hides them from the
/// namespace and reads them only through metacopy redirects; layerfs has no such layers, and
/// stacking them as ordinary ones would show files the kernel hides.
/// Split lowerdir into its layers and, after `::`, its data-only layers, as the kernel's
/// parser does. A single leading or trailing ':' is let pass, as it always was.
fn split_lowerdir(lower: &str) -> Result<(Vec<String>, Vec<String>)> {
    let (mut regular, mut data) = (Vec::new(), Vec::new());
    let mut gap = 0; // empty parts since the last layer: 1 is '::'
    for p in split_escaped(lower, ':') {
        if p.is_empty() {
            gap += 1;
            continue;
        }
        if regular.is_empty() {
            if gap > 1 {
                return Err(Error::msg(format!(
                    "lowerdir={lower}: '::' needs a lower layer before it"
                )));
            }
            regular.push(p);
        } else {
            match gap {
                0 if data.is_empty() => regular.push(p),
                0 => {
                    return Err(Error::msg(format!(
                        "lowerdir={lower}: a lower layer cannot follow data-only layers (separate those with '::')"
                    )));
                }
                1 => data.push(p),
                _ => {
                    return Err(Error::msg(format!(
                        "lowerdir={lower}: separate layers with ':', or with '::' before each data-only layer"
                    )));
                }
            }
        }
        gap = 0;
    }
    if gap > 1 && !regular.is_empty() {
        return Err(Error::msg(format!(
            "lowerdir={lower}: '::' must be followed by a data-only layer"
        )));
    }
    Ok((regular, data))
}

/// A numeric uid or gid option value.
fn parse_id(k: &str, v: &str) -> Result<u32> {
    v.parse()
        .map_err(|_| Error::msg(format!("{k}={v}: expected a number")))
}

/// `catalog=FILE`: an absolute path whose directory exists (the file need not).
fn catalog_file(p: &str) -> Result<PathBuf> {
    let path = Path::new(p);
    let name = path
        .file_name()
        .filter(|_| !p.ends_with('/'))
        .ok_or_else(|| Error::msg(format!("catalog={p}: expected a file path")))?;
    let parent = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let dir = existing_dir("catalog directory", &parent.to_string_lossy())?;
    let file = dir.join(name);
    if file.is_dir() {
        return Err(Error::msg(format!("catalog={p} is a directory")));
    }
    Ok(file)
}

/// Canonical paths of directories, remembered by parent: the layers of an image sit side by
/// side, and a mount of 100 of them then costs one realpath of their parent and one lstat
/// each, not a readlink per component of every path (~600 syscalls, most of the CLI's share
/// of the mount time).
#[derive(Default)]
struct Canon {
    parents: std::collections::HashMap<PathBuf, PathBuf>,
}

impl Canon {
    fn dir(&mut self, what: &str, p: &str) -> Result<PathBuf> {
        let path = Path::new(p);
        let split = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .zip(path.file_name());
        if let Some((parent, name)) = split
            && let Some(cp) = self.parents.get(parent)
            // A directory, not a symlink to one: its canonical path is the parent's plus
            // its name. Anything else takes the full check (and its error message).
            && std::fs::symlink_metadata(path).is_ok_and(|m| m.is_dir())
        {
            return Ok(cp.join(name));
        }
        let c = existing_dir(what, p)?;
        if let (Some((parent, name)), Some(cp)) = (split, c.parent())
            && c.file_name() == Some(name)
        {
            self.parents.insert(parent.to_path_buf(), cp.to_path_buf());
        }
        Ok(c)
    }
}

fn existing_dir(what: &str, p: &str) -> Result<PathBuf> {
    let path = Path::new(p);
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => {
            std::fs::canonicalize(path).map_err(|e| Error::from(e).context(format!("{what} {p}")))
        }
        Ok(_) => Err(Error::msg(format!("{what} {p} is not a directory"))),
        Err(e) => Err(Error::from(e).context(format!("{what} {p}"))),
    }
}

/// Build the mount spec from `-o` strings and the mountpoint, checking everything that can be
/// checked before mounting.
pub fn mount_spec(opts: &[String], mountpoint: &Path) -> Result<MountSpec> {
    let r = parse_raw(opts)?;
    let lower = r
        .lower
        .ok_or_else(|| Error::msg("no lowerdir given: use -o lowerdir=TOP:...:BOTTOM"))?;
    let mut canon = Canon::default();
    let (regular, mut data) = split_lowerdir(&lower)?;
    data.extend(r.data);
    let lowers: Vec<PathBuf> = regular
        .iter()
        .map(|p| canon.dir("lowerdir", p))
        .collect::<Result<_>>()?;
    let data_lowers: Vec<PathBuf> = data
        .iter()
        .map(|p| canon.dir("data-only lowerdir", p))
        .collect::<Result<_>>()?;
    if lowers.is_empty() {
        return Err(Error::msg(
            "lowerdir is empty: give at least one lower layer",
        ));
    }
    let mp = existing_dir("mountpoint", &mountpoint.to_string_lossy())?;
    let (upper, work) = match (r.upper, r.work, r.ro) {
        (Some(_), _, true) | (None, None, _) => (None, None),
        (Some(u), Some(w), false) => (
            Some(existing_dir("upperdir", &u)?),
            Some(existing_dir("workdir", &w)?),
        ),
        (Some(_), None, false) => {
            return Err(Error::msg("upperdir needs a workdir too (-o workdir=DIR)"));
        }
        (None, Some(_), _) => return Err(Error::msg("workdir given without an upperdir")),
    };
    let catalog = r.catalog.as_deref().map(catalog_file).transpose()?;
    // The catalog is written into none of the layers (they would change under it) nor the mount.
    if let Some(c) = &catalog
        && let Some(l) = lowers
            .iter()
            .chain(&data_lowers)
            .chain(&upper)
            .chain(&work)
            .find(|l| c.starts_with(l))
    {
        return Err(Error::msg(format!(
            "catalog {} is inside layer directory {} (keep it outside the layers)",
            c.display(),
            l.display()
        )));
    }
    if let Some(c) = &catalog
        && c.starts_with(&mp)
    {
        return Err(Error::msg(format!(
            "catalog {} is inside the mountpoint {}",
            c.display(),
            mp.display()
        )));
    }
    // A layer inside the mount would make the daemon call into itself (and hang).
    let mut layers: Vec<(&str, &PathBuf)> = lowers.iter().map(|l| ("lowerdir", l)).collect();
    layers.extend(data_lowers.iter().map(|l| ("data-only lowerdir", l)));
    if let Some(u) = &upper {
        layers.push(("upperdir", u));
    }
    if let Some(w) = &work {
        layers.push(("workdir", w));
    }
    for (what, p) in &layers {
        if p.starts_with(&mp) {
            return Err(Error::msg(format!(
                "{what} {} is inside the mountpoint {}",
                p.display(),
                mp.display()
            )));
        }
    }
    for (what, p) in [("upperdir", &upper), ("workdir", &work)] {
        let Some(p) = p else { continue };
        if let Some(l) = lowers
            .iter()
            .chain(&data_lowers)
            .find(|l| p.starts_with(l) || l.starts_with(p))
        {
            return Err(Error::msg(format!(
                "{what} {} overlaps lowerdir {} (layers must not contain each other)",
                p.display(),
                l.display()
            )));
        }
    }
    if let (Some(u), Some(w)) = (&upper, &work)
        && (u.starts_with(w) || w.starts_with(u))
    {
        return Err(Error::msg(format!(
            "upperdir {} and workdir {} must not contain each other",
            u.display(),
            w.display()
        )));
    }
    let root = sys::geteuid() == 0;
    let metacopy = r.metacopy && !r.userxattr && root;
    if r.metacopy && !metacopy {
        // A metadata-only copy points at its lower data through trusted.* xattrs; the kernel
        // refuses the mix, container tools pass metacopy=on regardless: ignore it, as before.
        log::warn!("metacopy=on needs root without userxattr; copy-ups copy data");
    }
    let mut kernel = r.kernel;
    if root {
        // What a container rootfs needs, unless the caller said otherwise.
        if !kernel.contains(&MountOption::NoDev) {
            kernel.push(MountOption::Dev);
        }
        if !kernel.contains(&MountOption::NoSuid) {
            kernel.push(MountOption::Suid);
        }
    }
    // ACL entries name host ids: the kernel would check and show them untranslated.
    let posix_acl = r.acl.unwrap_or(true) && r.ids.is_identity();
    if r.acl == Some(true) && !posix_acl {
        log::warn!("acl: off with uidmapping/gidmapping/squash_*/xattr_permissions");
    }
    Ok(MountSpec {
        mountpoint: mp,
        union: Config {
            upper,
            work,
            lowers,
            data_lowers,
            verity: r.verity,
            fsync: r.fsync,
            metacopy,
            catalog,
            ids: r.ids,
            marker_ns: if r.userxattr || !root {
                MarkerNs::User
            } else {
                MarkerNs::Trusted
            },
        },
        allow_other: r.allow_other.unwrap_or(root),
        default_permissions: r.default_permissions.unwrap_or(true),
        kernel_opts: kernel,
        threads: sys::cpus_allowed().max(2),
        // Passthrough needs CAP_SYS_ADMIN; unprivileged mounts use the page cache.
        passthrough: match r.passthrough {
            _ if !root => Passthrough::Off,
            None => Passthrough::All,
            Some(p) => p,
        },
        io_uring: r.io_uring.unwrap_or(true),
        posix_acl,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembered_parents_give_what_canonicalize_gives() {
        let t = tempfile::tempdir().unwrap();
        let base = t.path().canonicalize().unwrap();
        std::fs::create_dir_all(base.join("real/l0")).unwrap();
        std::fs::create_dir_all(base.join("real/l1")).unwrap();
        std::fs::create_dir_all(base.join("elsewhere/target")).unwrap();
        std::os::unix::fs::symlink(base.join("real"), base.join("link")).unwrap();
        std::os::unix::fs::symlink(base.join("elsewhere/target"), base.join("real/l2")).unwrap();
        std::fs::write(base.join("real/file"), b"x").unwrap();
        let mut c = Canon::default();
        // Through a symlinked parent, then a symlink layer beside plain ones, "." at the end.
        for p in [
            "link/l0",
            "link/l1",
            "link/l2",
            "link/l1/.",
            "real/l0",
            "link/l0/../l1",
        ] {
            let p = base.join(p);
            let p = p.to_str().unwrap();
            assert_eq!(
                c.dir("lowerdir", p).unwrap(),
                std::fs::canonicalize(p).unwrap(),
                "{p}"
            );
        }
        // Errors stay those of the full check.
        for bad in ["link/missing", "link/file"] {
            let p = base.join(bad);
            assert!(c.dir("lowerdir", p.to_str().unwrap()).is_err(), "{bad}");
        }
    }

    #[test]
    fn colon_and_comma_escapes() {
        assert_eq!(split_escaped(r"a\:b:c", ':'), vec!["a:b", "c"]);
        assert_eq!(
            split_options(r"lowerdir=a\,b:c,ro"),
            vec![r"lowerdir=a,b:c", "ro"]
        );
        assert_eq!(split_options(r"lowerdir=a\:b"), vec![r"lowerdir=a\:b"]);
    }

    #[test]
    fn passthrough_modes() {
        let mode = |o: &str| parse_raw(&[o.into()]).map(|r| r.passthrough);
        assert_eq!(mode("passthrough").unwrap(), Some(Passthrough::All));
        assert_eq!(mode("passthrough=upper").unwrap(), Some(Passthrough::Upper));
        assert_eq!(mode("passthrough=0").unwrap(), Some(Passthrough::Off));
        let e = mode("passthrough=lower").unwrap_err().to_string();
        assert!(e.contains("expected passthrough=0, 1 or upper"), "{e}");
    }

    #[test]
    fn unknown_option_is_refused() {
        let e = parse_raw(&["lowerdir=/x,bogus".into()]).unwrap_err();
        assert!(
            e.to_string().contains("unknown mount option 'bogus'"),
            "{e}"
        );
    }

    #[test]
    fn kernel_option_values_are_checked_and_lowerdir_plus_appends() {
        let raw = |o: &str| parse_raw(&[o.into()]);
        for ok in [
            "redirect_dir=nofollow",
            "index=off",
            "xino=auto",
            "uuid=null",
            "nfs_export=on",
            "verity=require",
        ] {
            assert!(raw(ok).is_ok(), "{ok}");
        }
        for bad in [
            "redirect_dir=x",
            "redirect_dir",
            "index",
            "xino=1",
            "uuid=",
            "verity=on2",
        ] {
            let e = raw(bad).unwrap_err().to_string();
            assert!(e.contains("(as kernel overlayfs)"), "{bad}: {e}");
        }
        let r = raw(r"lowerdir+=/a,lowerdir+=/b:c,lowerdir+=/d\e").unwrap();
        assert_eq!(r.lower.as_deref(), Some(r"/a:/b\:c:/d\\e"));
        assert_eq!(
            split_escaped(r.lower.as_deref().unwrap(), ':'),
            vec!["/a", "/b:c", r"/d\e"]
        );
        for bad in ["lowerdir=/a,lowerdir+=/b", "lowerdir+=/a,lowerdir=/b"] {
            assert!(
                raw(bad).unwrap_err().to_string().contains("cannot follow"),
                "{bad}"
            );
        }
        let e = raw("lowerdir=/a,datadir+=/b").unwrap_err().to_string();
        assert!(e.contains("datadir+ cannot follow lowerdir"), "{e}");
        let r = raw("lowerdir+=/a,datadir+=/d1,datadir+=/d2").unwrap();
        assert_eq!(r.data, vec!["/d1", "/d2"]);
    }

    #[test]
    fn double_colons_split_off_data_only_layers() {
        let split = |l: &str| split_lowerdir(l).map_err(|e| e.to_string());
        let v = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            split("/a:/b::/c::/d"),
            Ok((v(&["/a", "/b"]), v(&["/c", "/d"])))
        );
        assert_eq!(split(r"/a\:\:b::/c"), Ok((v(&["/a::b"]), v(&["/c"]))));
        assert_eq!(split("/a:"), Ok((v(&["/a"]), v(&[]))));
        for (bad, why) in [
            ("/a:::/b", "separate layers"),
            ("/a::", "must be followed"),
            ("::/a", "needs a lower layer"),
            ("/a::/b:/c", "cannot follow data-only"),
        ] {
            let e = split(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn compat_options_are_accepted() {
        let r =
            parse_raw(&["lowerdir=/x,noatime,rw,context=\"system_u:object_r:x\",volatile".into()])
                .unwrap();
        assert!(!r.fsync);
        assert!(r.kernel.contains(&MountOption::NoAtime));
        // What containers-storage passes, SELinux label with a comma included.
        let r = parse_raw(&[
            "lowerdir=/l,upperdir=/u,workdir=/w,context=\"system_u:object_r:container_file_t:s0:c1,c2\",\
             uidmapping=0:1000:1:1:100000:65536,gidmapping=0:1000:1,squash_to_uid=5,\
             xattr_permissions=2,metacopy=on,volatile,"
                .into(),
        ])
        .unwrap();
        assert_eq!(r.ids.uid.to_host(1), Some(100_000));
        assert_eq!(r.ids.squash_uid, Some(5));
        assert!(r.ids.xattr.is_some() && !r.fsync);
    }
}
