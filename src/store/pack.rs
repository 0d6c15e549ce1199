//! Pack a container's writable layer (kernel overlayfs format) into an OCI layer tar: char 0/0
//! whiteouts become `.wh.NAME` files, opaque directories get a `.wh..wh..opq` entry, hard links
//! stay links, xattrs (but the overlay's own) go into PAX `SCHILY.xattr.*` records.
//! Entries are sorted, so the same upper always packs to the same bytes.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

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
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(md.mode() & 0o7777);
    h.set_uid(md.uid() as u64);
    h.set_gid(md.gid() as u64);
    h.set_mtime(md.mtime().max(0) as u64);
    h.set_size(size);
    h
}

struct Packer<W: Write> {
    tar: tar::Builder<W>,
    /// (dev, ino) of files already packed -> their path, for hard links.
    links: HashMap<(u64, u64), String>,
}

impl<W: Write> Packer<W> {
    fn xattrs(&mut self, full: &Path, rel: &str, is_symlink: bool) -> Result<()> {
        if is_symlink {
            return Ok(());
        }
        let dir = sys::open_dir_path(full.parent().unwrap_or(Path::new("/")))?;
        let name = full.file_name().unwrap_or_default();
        let t = XTarget::At(std::os::fd::AsFd::as_fd(&dir), name);
        let mut recs = Vec::new();
        for n in sys::listxattr(t)? {
            if format::is_private_xattr(&n) {
                continue;
            }
            let c = std::ffi::CString::new(n.clone()).map_err(|_| Error::msg("bad xattr name"))?;
            if let Some(v) = sys::getxattr(t, &c)? {
                recs.extend(pax_record(
                    &format!("SCHILY.xattr.{}", String::from_utf8_lossy(&n)),
                    &v,
                ));
            }
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
                if format::dir_markers(std::os::fd::AsFd::as_fd(&d))
                    .redirect
                    .is_some()
                {
                    return Err(Error::msg(format!(
                        "/{r} is a renamed lower directory (a redirect); committing those is not supported yet"
                    )));
                }
                self.xattrs(&full, &r, false)?;
                let mut h = header(&md, tar::EntryType::Directory, 0);
                self.tar
                    .append_data(&mut h, format!("{r}/"), std::io::empty())?;
                if format::dir_markers(std::os::fd::AsFd::as_fd(&d)).opaque {
                    let mut o = header(&md, tar::EntryType::Regular, 0);
                    o.set_mode(0o644);
                    self.tar
                        .append_data(&mut o, format!("{r}/.wh..wh..opq"), std::io::empty())?;
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
            if ft.is_file() && md.len() > 0 && is_metacopy(&full)? {
                return Err(Error::msg(format!(
                    "/{r} is a metadata-only copy (metacopy=on) whose data is in a lower layer; committing those is not supported yet"
                )));
            }
            self.xattrs(&full, &r, ft.is_symlink())?;
            if ft.is_file() {
                let mut h = header(&md, tar::EntryType::Regular, md.len());
                self.tar.append_data(&mut h, &r, fs::File::open(&full)?)?;
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

/// The layer tar of an upper directory.
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

/// Write the upper dir `upper` as an OCI layer tar into `out`.
pub fn pack_upper(upper: &Path, out: impl Write) -> Result<()> {
    let mut p = Packer {
        tar: tar::Builder::new(out),
        links: HashMap::new(),
    };
    p.tar.mode(tar::HeaderMode::Complete);
    p.walk(upper, "")
        .ctx(format!("packing {}", upper.display()))?;
    p.tar.into_inner()?;
    Ok(())
}
