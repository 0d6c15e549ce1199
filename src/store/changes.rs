//! `container diff`: what a container changed against its image, as `docker diff` lists it
//! (A added, C changed, D deleted), read from its upper. Whether a path is in the image is
//! asked of the image's merged view, so a name a middle layer deleted counts as absent; a
//! renamed lower directory (a redirect) lists all it holds as the container shows it.

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use super::merged::{Below, Merged};
use crate::error::Result;
use crate::sys;
use crate::union::format;

/// (kind, path under the root) for each change, sorted by path.
pub fn changes(upper: &Path, below: &Below) -> Result<Vec<(char, String)>> {
    let mut d = Diff {
        upper,
        below,
        image: Merged::of(below.lowers.clone(), below.ns)?,
        container: None,
        out: Vec::new(),
    };
    d.walk("", false)?;
    d.out.sort_by(|a, b| a.1.cmp(&b.1));
    Ok(d.out)
}

struct Diff<'a> {
    upper: &'a Path,
    below: &'a Below,
    image: Merged,
    /// Opened at the first redirect met.
    container: Option<Merged>,
    out: Vec<(char, String)>,
}

impl Diff<'_> {
    fn kind(&self, rel: &str) -> char {
        if self.image.exists(rel) { 'C' } else { 'A' }
    }

    /// The upper dir `rel`; `hides`: an opaque dir at or above it hides the image's entries.
    fn walk(&mut self, rel: &str, hides: bool) -> Result<()> {
        if hides {
            self.hidden(rel)?;
        }
        let mut names: Vec<_> = fs::read_dir(self.upper.join(rel))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<std::io::Result<_>>()?;
        names.sort();
        for name in &names {
            let r = match rel {
                "" => name.to_string_lossy().into_owned(),
                _ => format!("{rel}/{}", name.to_string_lossy()),
            };
            let md = fs::symlink_metadata(self.upper.join(&r))?;
            if md.file_type().is_char_device() && md.rdev() == 0 {
                self.out.push(('D', r));
                continue;
            }
            self.out.push((self.kind(&r), r.clone()));
            if !md.is_dir() {
                continue;
            }
            let d = sys::open_dir_path(&self.upper.join(&r))?;
            let markers = format::dir_markers(std::os::fd::AsFd::as_fd(&d));
            if markers.redirect.is_some() {
                self.renamed(&r)?;
            } else {
                self.walk(&r, hides || markers.opaque)?;
            }
        }
        Ok(())
    }

    /// A renamed lower directory: all it holds, as the container shows it.
    fn renamed(&mut self, rel: &str) -> Result<()> {
        if self.container.is_none() {
            self.container = Some(Merged::container(self.upper, self.below)?);
        }
        let c = self.container.as_ref().expect("just opened");
        let mut found = Vec::new();
        c.walk(c.resolve(rel)?, rel, &mut |r, _, _| {
            found.push(r.to_string());
            Ok(())
        })?;
        for r in found {
            let k = self.kind(&r);
            self.out.push((k, r));
        }
        Ok(())
    }

    /// An opaque directory (or one under it) hides what the image has in it: each entry the
    /// upper does not replace is deleted.
    fn hidden(&mut self, rel: &str) -> Result<()> {
        let Ok(dir) = self.image.resolve(rel) else {
            return Ok(());
        };
        for name in self.image.names(dir)? {
            if fs::symlink_metadata(self.upper.join(rel).join(&name)).is_err() {
                let r = match rel {
                    "" => name.to_string_lossy().into_owned(),
                    _ => format!("{rel}/{}", name.to_string_lossy()),
                };
                self.out.push(('D', r));
            }
        }
        Ok(())
    }
}
