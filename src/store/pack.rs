//! Pack a container's writable layer (kernel overlayfs format) into an OCI layer tar: char 0/0
//! whiteouts become `.wh.NAME` files, opaque directories get a `.wh..wh..opq` entry, hard links
//! stay links, xattrs (but the overlay's own) go into PAX `SCHILY.xattr.*` records. What has no
//! plain-layer form is packed from the merged view: a renamed lower directory (a redirect) as
//! a whole opaque directory, a metadata-only copy with its data.
//! Entries are sorted, so the same upper always packs to the same bytes.

use std::collections::HashMap;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::rc::Rc;

use super::merged::{Below, Merged};
use crate::error::{Context, Error, Result};
use crate::sys::{self, XTarget};
use crate::union::format;

fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
    // "<len> key=value\n", where len counts itself.
    let body = key.len() + value.len() + 3;
    let mut len = body + body.to_string().len();
    if len.to_string().len() != body.to_string().len() {
        len += 1;
    }
    let mut v = format!("{len} {key}=").into_bytes();
    v.extend_from_slice(value);
    v.push(b'\n');
    v
}

fn header(md: &fs::Metadata, kind: tar::EntryType, size: u64) -> tar::Header {
    header_of(md.mode(), md.uid(), md.gid(), md.mtime(), kind, size)
}

fn header_of(
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    kind: tar::EntryType,
    size: u64,
) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode & 0o7777);
    h.set_uid(uid as u64);
    h.set_gid(gid as u64);
    h.set_mtime(mtime.max(0) as u64);
    h.set_size(size);
    h
}

struct Packer<'a, W: Write> {
    tar: tar::Builder<W>,
    /// (dev, ino) of files already packed -> their path, for hard links; files packed from
    /// the merged view are keyed (MERGED_DEV, its st_ino).
    links: HashMap<(u64, u64), String>,
    upper: &'a Path,
    below: &'a Below,
    /// The container's view, opened at the first redirect or metadata-only copy met.
    merged: Option<Rc<Merged>>,
}

/// The `links` key space of files packed from the merged view.
const MERGED_DEV: u64 = u64::MAX;

impl<W: Write> Packer<'_, W> {
    fn merged(&mut self) -> Result<Rc<Merged>> {
        if self.merged.is_none() {
            self.merged = Some(Rc::new(Merged::container(self.upper, self.below)?));
        }
        Ok(self.merged.clone().expect("just opened"))
    }

    fn xattrs(&mut self, full: &Path, rel: &str, is_symlink: bool) -> Result<()> {
        if is_symlink {
            return Ok(());
        }
        let dir = sys::open_dir_path(full.parent().unwrap_or(Path::new("/")))?;
        let name = full.file_name().unwrap_or_default();
        let t = XTarget::At(std::os::fd::AsFd::as_fd(&dir), name);
        let mut pairs = Vec::new();
        for n in sys::listxattr(t)? {
            if format::is_private_xattr(&n) {
                continue;
            }
            let c = std::ffi::CString::new(n.clone()).map_err(|_| Error::msg("bad xattr name"))?;
            if let Some(v) = sys::getxattr(t, &c)? {
                pairs.push((n, v));
            }
        }
        self.pax(rel, &pairs)
    }

    /// A PAX header carrying `pairs` as `SCHILY.xattr.*` records for the entry `rel`.
    fn pax(&mut self, rel: &str, pairs: &[(Vec<u8>, Vec<u8>)]) -> Result<()> {
        let mut recs = Vec::new();
        for (n, v) in pairs {
            recs.extend(pax_record(
                &format!("SCHILY.xattr.{}", String::from_utf8_lossy(n)),
                v,
            ));
        }
        if !recs.is_empty() {
            let mut h = tar::Header::new_ustar();
            h.set_entry_type(tar::EntryType::XHeader);
            h.set_size(recs.len() as u64);
            h.set_mode(0o644);
            let pax_name = format!("PaxHeaders/{}", rel.rsplit('/').next().unwrap_or(rel));
            let _ = h.set_path(pax_name.chars().take(99).collect::<String>());
            h.set_cksum();
            self.tar.append(&h, &recs[..])?;
        }
        Ok(())
    }

    fn walk(&mut self, root: &Path, rel: &str) -> Result<()> {
        let dir = if rel.is_empty() {
            root.to_path_buf()
        } else {
            root.join(rel)
        };
        let mut names: Vec<_> = fs::read_dir(&dir)?
            .flatten()
            .map(|e| e.file_name())
            .collect();
        names.sort();
        for name in names {
            let full = dir.join(&name);
            let r = if rel.is_empty() {
                name.to_string_lossy().into_owned()
            } else {
                format!("{rel}/{}", name.to_string_lossy())
            };
            let md = fs::symlink_metadata(&full)?;
            let ft = md.file_type();
            if ft.is_char_device() && md.rdev() == 0 {
                let wh = match r.rsplit_once('/') {
                    Some((p, n)) => format!("{p}/.wh.{n}"),
                    None => format!(".wh.{r}"),
                };
                let mut h = header(&md, tar::EntryType::Regular, 0);
                h.set_mode(0o644);
                self.tar.append_data(&mut h, &wh, std::io::empty())?;
                continue;
            }
            if ft.is_dir() {
                let d = sys::open_dir_path(&full)?;
                let markers = format::dir_markers(std::os::fd::AsFd::as_fd(&d));
                self.xattrs(&full, &r, false)?;
                let mut h = header(&md, tar::EntryType::Directory, 0);
                self.tar
                    .append_data(&mut h, format!("{r}/"), std::io::empty())?;
                if markers.redirect.is_some() {
                    // A renamed lower directory. A plain layer has no redirects: it holds
                    // the directory whole, opaque, as the mount shows it (the whiteout at
                    // its old name is in the upper already).
                    self.opaque(&md, &r)?;
                    let m = self.merged()?;
                    let id = m.resolve(&r)?;
                    self.walk_merged(&m, id, &r)?;
                    continue;
                }
                if markers.opaque {
                    self.opaque(&md, &r)?;
                }
                self.walk(root, &r)?;
                continue;
            }
            if md.nlink() > 1 && !ft.is_dir() {
                if let Some(first) = self.links.get(&(md.dev(), md.ino())) {
                    let mut h = header(&md, tar::EntryType::Link, 0);
                    self.tar.append_link(&mut h, &r, first)?;
                    continue;
                }
                self.links.insert((md.dev(), md.ino()), r.clone());
            }
            self.xattrs(&full, &r, ft.is_symlink())?;
            if ft.is_file() {
                let mut h = header(&md, tar::EntryType::Regular, md.len());
                // A metadata-only copy (metacopy=on): its data is in a layer below.
                let data = if md.len() > 0 && is_metacopy(&full)? {
                    let m = self.merged()?;
                    m.data(m.resolve(&r)?)?
                } else {
                    fs::File::open(&full)?
                };
                self.tar.append_data(&mut h, &r, data.take(md.len()))?;
            } else if ft.is_symlink() {
                let target = fs::read_link(&full)?;
                let mut h = header(&md, tar::EntryType::Symlink, 0);
                self.tar.append_link(&mut h, &r, &target)?;
            } else {
                let kind = if ft.is_fifo() {
                    tar::EntryType::Fifo
                } else if ft.is_char_device() {
                    tar::EntryType::Char
                } else if ft.is_block_device() {
                    tar::EntryType::Block
                } else {
                    continue; // sockets are not layer content
                };
                let mut h = header(&md, kind, 0);
                let _ = h.set_device_major(libc::major(md.rdev()));
                let _ = h.set_device_minor(libc::minor(md.rdev()));
                self.tar.append_data(&mut h, &r, std::io::empty())?;
            }
        }
        Ok(())
    }
}

impl<W: Write> Packer<'_, W> {
    /// The `.wh..wh..opq` entry that makes directory `rel` hide what the layers below hold.
    fn opaque(&mut self, md: &fs::Metadata, rel: &str) -> Result<()> {
        let mut o = header(md, tar::EntryType::Regular, 0);
        o.set_mode(0o644);
        self.tar
            .append_data(&mut o, format!("{rel}/.wh..wh..opq"), std::io::empty())?;
        Ok(())
    }

    /// Everything under directory `dir` of the merged view, at `rel` in the tar.
    fn walk_merged(&mut self, m: &Merged, dir: u64, rel: &str) -> Result<()> {
        m.walk(dir, rel, &mut |r, id, st| self.merged_entry(m, id, st, r))
    }

    fn merged_entry(&mut self, m: &Merged, id: u64, st: &sys::Stat, r: &str) -> Result<()> {
        let fmt = st.st_mode & libc::S_IFMT;
        let head =
            |kind, size| header_of(st.st_mode, st.st_uid, st.st_gid, st.st_mtime, kind, size);
        if fmt != libc::S_IFDIR && st.st_nlink > 1 {
            let key = (MERGED_DEV, st.st_ino);
            if let Some(first) = self.links.get(&key) {
                let mut h = head(tar::EntryType::Link, 0);
                self.tar.append_link(&mut h, r, first)?;
                return Ok(());
            }
            self.links.insert(key, r.to_string());
        }
        if fmt != libc::S_IFLNK {
            self.pax(r, &m.xattrs(id)?)?;
        }
        match fmt {
            libc::S_IFDIR => {
                let mut h = head(tar::EntryType::Directory, 0);
                self.tar
                    .append_data(&mut h, format!("{r}/"), std::io::empty())?;
            }
            libc::S_IFREG => {
                let size = st.st_size as u64;
                let mut h = head(tar::EntryType::Regular, size);
                self.tar.append_data(&mut h, r, m.data(id)?.take(size))?;
            }
            libc::S_IFLNK => {
                let mut h = head(tar::EntryType::Symlink, 0);
                self.tar.append_link(&mut h, r, m.readlink(id)?)?;
            }
            libc::S_IFIFO | libc::S_IFCHR | libc::S_IFBLK => {
                let kind = match fmt {
                    libc::S_IFIFO => tar::EntryType::Fifo,
                    libc::S_IFCHR => tar::EntryType::Char,
                    _ => tar::EntryType::Block,
                };
                let mut h = head(kind, 0);
                let _ = h.set_device_major(libc::major(st.st_rdev));
                let _ = h.set_device_minor(libc::minor(st.st_rdev));
                self.tar.append_data(&mut h, r, std::io::empty())?;
            }
            _ => {} // sockets are not layer content
        }
        Ok(())
    }
}

/// Does this upper file carry a metacopy marker (its data lives in a lower layer)?
fn is_metacopy(full: &Path) -> Result<bool> {
    let dir = sys::open_dir_path(full.parent().unwrap_or(Path::new("/")))?;
    let name = full.file_name().unwrap_or_default();
    for ns in [format::MarkerNs::Trusted, format::MarkerNs::User] {
        if sys::has_xattr_at(std::os::fd::AsFd::as_fd(&dir), name, ns.metacopy())? {
            return Ok(true);
        }
    }
    Ok(false)
}

impl<'a, W: Write> Packer<'a, W> {
    fn new(upper: &'a Path, below: &'a Below, out: W) -> Self {
        let mut tar = tar::Builder::new(out);
        tar.mode(tar::HeaderMode::Complete);
        Packer {
            tar,
            links: HashMap::new(),
            upper,
            below,
            merged: None,
        }
    }
}

/// Write the upper dir `upper`, over the layers `below`, as an OCI layer tar into `out`.
pub fn pack_upper(upper: &Path, below: &Below, out: impl Write) -> Result<()> {
    let mut p = Packer::new(upper, below, out);
    p.walk(upper, "")
        .ctx(format!("packing {}", upper.display()))?;
    p.tar.into_inner()?;
    Ok(())
}

/// Write the container's whole tree, as its mount shows it (upper over the layers `below`),
/// as a plain tar into `out`: `container export`, as `docker export`.
pub fn pack_merged(upper: &Path, below: &Below, out: impl Write) -> Result<()> {
    let mut p = Packer::new(upper, below, out);
    let m = p.merged()?;
    p.walk_merged(&m, m.resolve("")?, "")
        .ctx(format!("exporting {}", upper.display()))?;
    p.tar.into_inner()?;
    Ok(())
}
