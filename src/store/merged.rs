//! The tree a container's mount shows, read in this process: a read-only union of layer
//! dirs (no FUSE, no workdir, so it can be read while the container is mounted too). It
//! answers what a container's upper alone cannot: what a renamed lower directory (a redirect)
//! holds, where a metadata-only copy's data is, and whether a path exists in the image.

use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::error::{Result, err};
use crate::sys;
use crate::union::node::ROOT_ID;
use crate::union::{self, Union, format};

/// What a container's upper lies over: the image's layer dirs (top first) and the marker
/// namespace.
pub struct Below {
    pub lowers: Vec<PathBuf>,
    pub ns: format::MarkerNs,
}

pub struct Merged(Union);

impl Merged {
    /// The union of `layers` (top first).
    pub fn of(layers: Vec<PathBuf>, ns: format::MarkerNs) -> Result<Merged> {
        let cfg = union::Config {
            upper: None,
            work: None,
            lowers: layers,
            data_lowers: Vec::new(),
            fsync: false,
            metacopy: true,
            marker_ns: ns,
            ids: Default::default(),
            catalog: None,
            verity: union::Verity::Off,
        };
        Ok(Merged(Union::new(cfg)?))
    }

    /// The container's view: its upper over the image's layers.
    pub fn container(upper: &Path, below: &Below) -> Result<Merged> {
        let mut layers = vec![upper.to_path_buf()];
        layers.extend_from_slice(&below.lowers);
        Merged::of(layers, below.ns)
    }

    /// The node at `rel` ('/'-separated, under the root).
    pub fn resolve(&self, rel: &str) -> Result<u64> {
        let mut id = ROOT_ID;
        for c in rel.split('/').filter(|c| !c.is_empty()) {
            id = self.0.lookup(id, OsStr::new(c))?.id;
        }
        Ok(id)
    }

    pub fn exists(&self, rel: &str) -> bool {
        self.resolve(rel).is_ok()
    }

    /// The data of file `id` (a metadata-only copy's is read from the layer holding it).
    pub fn data(&self, id: u64) -> Result<fs::File> {
        let fh = self.0.open(id, libc::O_RDONLY)?;
        let fd = self.0.backing_of(fh).map(|(fd, _, _)| fd.try_clone());
        self.0.release(fh);
        Ok(fs::File::from(fd.ok_or_else(|| err(libc::EBADF))??))
    }

    pub fn readlink(&self, id: u64) -> Result<std::ffi::OsString> {
        self.0.readlink(id)
    }

    /// Its xattrs as a mount shows them (the overlay's own hidden).
    pub fn xattrs(&self, id: u64) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut out = Vec::new();
        for n in self.0.listxattr(id)?.split(|&b| b == 0) {
            if n.is_empty() || format::is_private_xattr(n) {
                continue;
            }
            out.push((n.to_vec(), self.0.getxattr(id, OsStr::from_bytes(n))?));
        }
        Ok(out)
    }

    /// The names in directory `dir`, sorted.
    pub fn names(&self, dir: u64) -> Result<Vec<std::ffi::OsString>> {
        let mut names: Vec<_> = self
            .0
            .list_dir(dir)?
            .into_iter()
            .map(|e| e.name)
            .filter(|n| n != "." && n != "..")
            .collect();
        names.sort();
        Ok(names)
    }

    /// Visit everything under directory `dir` (at `rel`), sorted by name, each entry before
    /// what it holds.
    pub fn walk(
        &self,
        dir: u64,
        rel: &str,
        visit: &mut dyn FnMut(&str, u64, &sys::Stat) -> Result<()>,
    ) -> Result<()> {
        for name in self.names(dir)? {
            let r = match rel {
                "" => name.to_string_lossy().into_owned(),
                _ => format!("{rel}/{}", name.to_string_lossy()),
            };
            let entry = self.0.lookup(dir, &name)?;
            let st = entry.attr;
            let done = visit(&r, entry.id, &st).and_then(|()| {
                if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
                    self.walk(entry.id, &r, visit)
                } else {
                    Ok(())
                }
            });
            // Nodes are dropped as the walk leaves them: a big tree is not held whole.
            self.0.forget(entry.id, 1);
            done?;
        }
        Ok(())
    }
}
