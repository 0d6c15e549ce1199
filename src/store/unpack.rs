//! Unpack a layer tar into a directory in the kernel overlayfs format: OCI `.wh.NAME` entries
//! become char 0/0 whiteouts, `.wh..wh..opq` becomes `trusted.overlay.opaque=y` (or `user.`).
//!
//! Every path is resolved from the layer root one component at a time with `O_NOFOLLOW`, so an
//! entry can never be written through a symlink or outside the layer; `..` and absolute names
//! are refused, hard links must point inside the layer.

use std::collections::HashMap;
use std::ffi::{CString, OsStr, OsString};
use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::sys::{self, XTarget};
use crate::union::format::{self, MarkerNs};

/// Deeper paths are refused: a layer is a filesystem tree, not a stress test.
const MAX_DEPTH: usize = 4096;

/// What an unpack did (for the progress line and `system df`).
#[derive(Default, Debug)]
pub struct Unpacked {
    pub entries: u64,
    pub bytes: u64,
    pub whiteouts: u64,
    pub skipped_devices: u64,
}

struct Ctx<'a> {
    root: BorrowedFd<'a>,
    ns: MarkerNs,
    privileged: bool,
    /// Directories opened on the way (path -> fd), so deep trees stay linear.
    dirs: HashMap<Vec<OsString>, Arc<OwnedFd>>,
    /// Directory times to set once their contents are in.
    dir_times: Vec<(Vec<OsString>, i64)>,
}

fn bad(what: impl Into<String>) -> Error {
    Error::msg(what.into())
}

/// Split a tar path into safe components; refuse `..`.
fn components(p: &Path) -> Result<Vec<OsString>> {
    let mut out = Vec::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n.to_os_string()),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir => {
                return Err(bad(format!(
                    "layer entry {} escapes the layer (..)",
                    p.display()
                )));
            }
            Component::Prefix(_) => {
                return Err(bad(format!("layer entry {} has a bad prefix", p.display())));
            }
        }
    }
    if out.len() > MAX_DEPTH {
        return Err(bad(format!(
            "layer entry is {} levels deep (limit {MAX_DEPTH})",
            out.len()
        )));
    }
    Ok(out)
}

impl Ctx<'_> {
    /// The fd of directory `path` in the layer, creating missing directories; never follows a
    /// symlink (a component that is one is an error: an entry written through a symlink).
    fn dir(&mut self, path: &[OsString]) -> Result<Arc<OwnedFd>> {
        if let Some(fd) = self.dirs.get(path) {
            return Ok(fd.clone());
        }
        let parent = match path.split_last() {
            None => {
                // The layer root: opened once, cached like every other directory.
                let fd = Arc::new(sys::openat(
                    self.root,
                    OsStr::new("."),
                    libc::O_PATH | libc::O_DIRECTORY,
                    0,
                )?);
                self.dirs.insert(Vec::new(), fd.clone());
                return Ok(fd);
            }
            Some((_, dirs)) => self.dir(dirs)?,
        };
        let name = path.last().expect("non-empty");
        sys::mkdirat_if_missing(parent.as_fd(), name, 0o755)
            .map_err(|e| Error::from(e).context(format!("creating {}", show(path))))?;
        let fd = sys::openat(parent.as_fd(), name, libc::O_PATH | libc::O_DIRECTORY, 0).map_err(
            |e| {
                if matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR)) {
                    bad(format!(
                        "layer entry under {} would be written through a symlink or file",
                        show(path)
                    ))
                } else {
                    Error::from(e).context(show(path))
                }
            },
        )?;
        let fd = Arc::new(fd);
        self.dirs.insert(path.to_vec(), fd.clone());
        Ok(fd)
    }

    /// Remove whatever is at `name` in `dir` (a later entry replaces an earlier one).
    fn clear(&mut self, dir: BorrowedFd<'_>, path: &[OsString], name: &OsStr) -> Result<()> {
        match sys::statat(dir, name) {
            Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFDIR => {
                crate::union::workdir::remove_tree(dir, name, 0)?;
                self.dirs.retain(|k, _| !k.starts_with(path));
            }
            Ok(_) => sys::unlinkat(dir, name, false)?,
            Err(_) => {}
        }
        Ok(())
    }
}

/// A path of the layer for a one-line message: control characters escaped, an absurdly
/// long component cut short.
fn show(p: &[OsString]) -> String {
    const LONG: usize = 64;
    p.iter()
        .map(|c| {
            let s = c.to_string_lossy();
            let mut out = crate::error::one_line(&s.chars().take(LONG).collect::<String>());
            if s.chars().count() > LONG {
                out.push_str(&format!("...({} bytes)", c.len()));
            }
            out
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// The stream `input`, whole, once its first 512-byte block has been checked to be a tar
/// header (or the zero block that ends an archive; an empty stream passes too). What is no tar
/// gets the error `not_tar` (worded for what the caller reads) instead of the tar reader's
/// words about the bytes it met.
pub fn tar_start<R: Read>(
    mut input: R,
    not_tar: &str,
) -> Result<std::io::Chain<std::io::Cursor<Vec<u8>>, R>> {
    let mut block = Vec::with_capacity(512);
    (&mut input)
        .take(512)
        .read_to_end(&mut block)
        .map_err(|e| bad(format!("reading: {e}")))?;
    let zero = block.iter().all(|&b| b == 0);
    if !block.is_empty() && !(block.len() == 512 && (zero || header_checksum_ok(&block))) {
        return Err(bad(not_tar));
    }
    Ok(std::io::Cursor::new(block).chain(input))
}

/// Does the tar header `h` (512 bytes) carry its own checksum: the sum of its bytes with the
/// checksum field (148..156) counted as spaces, in octal there? Old tars summed signed bytes.
fn header_checksum_ok(h: &[u8]) -> bool {
    let field = &h[148..156];
    let digits: Vec<u8> = field
        .iter()
        .copied()
        .skip_while(|&b| b == b' ')
        .take_while(|b| b.is_ascii_digit())
        .collect();
    let Some(want) = std::str::from_utf8(&digits)
        .ok()
        .and_then(|d| i64::from_str_radix(d, 8).ok())
    else {
        return false;
    };
    let outside = h[..148].iter().chain(&h[156..]);
    let unsigned: i64 = outside.clone().map(|&b| i64::from(b)).sum::<i64>() + 8 * 32;
    let signed: i64 = outside.map(|&b| i64::from(b as i8)).sum::<i64>() + 8 * 32;
    want == unsigned || want == signed
}

/// Unpack the tar stream `input` into the (empty) directory `root`.
pub fn unpack(input: impl Read, root: BorrowedFd<'_>, ns: MarkerNs) -> Result<Unpacked> {
    let mut ar = tar::Archive::new(tar_start(input, "not a tar archive")?);
    let mut cx = Ctx {
        root,
        ns,
        privileged: sys::geteuid() == 0,
        dirs: HashMap::new(),
        dir_times: Vec::new(),
    };
    let mut out = Unpacked::default();
    let entries = ar
        .entries()
        .map_err(|e| bad(format!("reading the layer tar: {e}")))?;
    for entry in entries {
        let mut e = entry.map_err(|e| bad(format!("reading the layer tar: {e}")))?;
        let path = e
            .path()
            .map_err(|e| bad(format!("bad entry name: {e}")))?
            .into_owned();
        let comps = components(&path)?;
        if comps.is_empty() {
            continue;
        }
        out.entries += 1;
        // An OS error with no words of its own says which entry it came from.
        unpack_entry(&mut cx, &mut e, &comps, &mut out)
            .map_err(|err| err.or_context(format!("layer entry {}", show(&comps))))?;
    }
    // Directory times last, deepest first (creating children changed them).
    cx.dir_times.sort_by_key(|d| std::cmp::Reverse(d.0.len()));
    for (p, t) in std::mem::take(&mut cx.dir_times) {
        if let Some((name, parent)) = p.split_last() {
            let d = cx.dir(parent)?;
            sys::utimensat(d.as_fd(), name, Some(Some((t, 0))), Some(Some((t, 0))))?;
        }
    }
    Ok(out)
}

/// Write one entry (`comps` non-empty) into the layer.
fn unpack_entry<R: Read>(
    cx: &mut Ctx<'_>,
    e: &mut tar::Entry<'_, R>,
    comps: &[OsString],
    out: &mut Unpacked,
) -> Result<()> {
    let (name, parent) = comps.split_last().expect("non-empty");
    let dfd = cx.dir(parent)?;
    let hdr = e.header().clone();
    let kind = hdr.entry_type();
    // Whiteouts, whatever entry type carries them (image writers hard-link later ones).
    if name.as_bytes() == format::WH_OPAQUE {
        sys::setxattr(XTarget::Fd(dfd.as_fd()), cx.ns.opaque(), b"y", 0)
            .map_err(|e| Error::from(e).context(format!("marking {} opaque", show(parent))))?;
        return Ok(());
    }
    if let Some(hidden) = format::oci_whited_out(name) {
        let hidden = hidden.to_os_string();
        let mut p = parent.to_vec();
        p.push(hidden.clone());
        cx.clear(dfd.as_fd(), &p, &hidden)?;
        sys::mknodat(dfd.as_fd(), &hidden, libc::S_IFCHR, 0)
            .map_err(|e| Error::from(e).context(format!("whiteout {}", show(&p))))?;
        out.whiteouts += 1;
        return Ok(());
    }
    let mode = hdr.mode().unwrap_or(0o644) & 0o7777;
    let mtime = hdr.mtime().unwrap_or(0) as i64;
    if kind.is_dir() {
        let _ = cx.dir(comps)?;
        sys::chmodat(dfd.as_fd(), name, mode)?;
        apply_owner_xattrs(e, dfd.as_fd(), name)?;
        sys::chmodat(dfd.as_fd(), name, mode)?;
        cx.dir_times.push((comps.to_vec(), mtime));
        return Ok(());
    }
    cx.clear(dfd.as_fd(), comps, name)?;
    if kind.is_file() || kind == tar::EntryType::Continuous {
        let fd = sys::openat(
            dfd.as_fd(),
            name,
            libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY,
            0o600,
        )?;
        let mut f = std::fs::File::from(fd);
        out.bytes += std::io::copy(e, &mut f)
            .map_err(|err| bad(format!("layer data of {}: {err}", show(comps))))?;
    } else if kind.is_symlink() {
        let target = e
            .link_name()
            .ok()
            .flatten()
            .filter(|t| !t.as_os_str().is_empty())
            .ok_or_else(|| bad(format!("symlink {} has no target", show(comps))))?;
        sys::symlinkat(target.as_os_str(), dfd.as_fd(), name)?;
    } else if kind.is_hard_link() {
        let target = e
            .link_name()
            .ok()
            .flatten()
            .ok_or_else(|| bad(format!("hard link {} has no target", show(comps))))?;
        let t = components(&target).map_err(|_| {
            bad(format!(
                "hard link {} points outside the layer",
                show(comps)
            ))
        })?;
        let (tname, tparent) = t
            .split_last()
            .ok_or_else(|| bad("hard link to the layer root"))?;
        let tdir = cx.dir(tparent)?;
        sys::linkat(tdir.as_fd(), tname, dfd.as_fd(), name).map_err(|err| {
            Error::from(err).context(format!("hard link {} -> {}", show(comps), show(&t)))
        })?;
        return Ok(()); // shares the target's metadata
    } else if kind.is_fifo() {
        sys::mknodat(dfd.as_fd(), name, libc::S_IFIFO | mode, 0)?;
    } else if kind.is_character_special() || kind.is_block_special() {
        if !cx.privileged {
            out.skipped_devices += 1;
            log::warn!("skipping device {} (needs privileges)", show(comps));
            return Ok(());
        }
        let (maj, min) = (
            hdr.device_major().ok().flatten().unwrap_or(0),
            hdr.device_minor().ok().flatten().unwrap_or(0),
        );
        let t = if kind.is_character_special() {
            libc::S_IFCHR
        } else {
            libc::S_IFBLK
        };
        sys::mknodat(dfd.as_fd(), name, t | mode, libc::makedev(maj, min))?;
    } else {
        // PAX/GNU metadata entries are consumed by the tar reader; anything else is skipped.
        return Ok(());
    }
    apply_owner_xattrs(e, dfd.as_fd(), name)?;
    if !kind.is_symlink() {
        sys::chmodat(dfd.as_fd(), name, mode)?;
    }
    sys::utimensat(
        dfd.as_fd(),
        name,
        Some(Some((mtime, 0))),
        Some(Some((mtime, 0))),
    )?;
    Ok(())
}

fn apply_owner_xattrs<R: Read>(
    e: &mut tar::Entry<'_, R>,
    dir: BorrowedFd<'_>,
    name: &OsStr,
) -> Result<()> {
    let h = e.header();
    let (uid, gid) = (h.uid().unwrap_or(0) as u32, h.gid().unwrap_or(0) as u32);
    if sys::geteuid() == 0 {
        sys::chownat(dir, name, uid, gid)?;
    }
    if let Ok(Some(exts)) = e.pax_extensions() {
        for ext in exts.flatten() {
            let Some(key) = ext.key_bytes().strip_prefix(b"SCHILY.xattr.") else {
                continue;
            };
            let Ok(c) = CString::new(key) else { continue };
            if let Err(err) = sys::setxattr(XTarget::At(dir, name), &c, ext.value_bytes(), 0) {
                log::warn!("xattr {:?} on {:?}: {err}", c, name);
            }
        }
    }
    Ok(())
}
