//! The union engine, free of FUSE: a layer stack seen as one tree. The FUSE adapter (and the
//! tests) call these methods with node ids and names and get stats, entries and errnos back.

pub mod catalog;
pub mod copyup;
pub mod dirmoves;
pub mod fanout;
pub mod fdcache;
pub mod fileattr;
pub mod files;
pub mod format;
pub mod handle;
pub mod ids;
pub mod index;
pub mod layer;
pub mod lookup;
pub mod names;
pub mod node;
mod observed;
pub mod origin;
pub mod readdir;
pub mod real;
pub mod reclaim;
pub mod rename;
pub mod workdir;
pub mod write;

use std::ffi::{CString, OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock};

use crate::error::{Error, Result, err};
use crate::observe::Observer;
use crate::sys::{self, Stat, XTarget};
use fdcache::FdCache;
use format::MarkerNs;
use handle::HandleTable;
use layer::LayerStack;
use node::{Kind, Node, NodeState, NodeTable, ROOT_ID};
use real::Real;
use workdir::WorkDir;

pub use handle::Handle;
pub use readdir::DirEntry;

/// How the union behaves, from mount options.
#[derive(Clone, Debug)]
pub struct Config {
    pub upper: Option<PathBuf>,
    pub work: Option<PathBuf>,
    pub lowers: Vec<PathBuf>,
    /// Data-only lower layers (`lowerdir=A::D`, `datadir+=D`): not part of the tree; only
    /// lower metadata-only copies' absolute redirects reach their files.
    pub data_lowers: Vec<PathBuf>,
    /// fsync copied-up data before it becomes visible (metadata-only copies need none).
    pub fsync: bool,
    /// `metacopy=on`: chmod, chown, utimes, xattr changes and renames of a lower file copy up
    /// its metadata only; the data follows at the first open for writing.
    pub metacopy: bool,
    /// Namespace of the markers layerfs writes.
    pub marker_ns: MarkerNs,
    /// Owner translation (uidmapping, squash_to_*, xattr_permissions).
    pub ids: ids::Ids,
    /// `catalog=FILE`: keep what lookups learn about deep lower directories across mounts.
    pub catalog: Option<PathBuf>,
    /// `verity=`: check the fs-verity digests metadata-only copies record for their data.
    pub verity: Verity,
}

/// The kernel's `verity=` modes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Verity {
    /// Digests are neither checked nor recorded.
    #[default]
    Off,
    /// A digest a metadata-only copy records is checked against its data's fs-verity digest
    /// at the first open or copy-up (EIO if it differs or the data has none); a new
    /// metadata-only copy records its data's digest where the data has one.
    On,
    /// As `On`, and a metadata-only copy without a digest is refused (EIO); a copy-up whose
    /// data has no fs-verity digest copies the data.
    Require,
}

/// A node returned to the kernel: its id and attributes.
pub struct Entry {
    pub id: u64,
    pub attr: Stat,
}

/// Tells the kernel that something it caches changed behind its back.
pub trait Invalidate: Send + Sync {
    /// Node `id`'s attributes. Done before the request that changed them is answered: a
    /// failed rename that copied a directory up gets no refresh from the kernel, so the
    /// caller's next stat must already miss the cache. Must not wait on the kernel's locks.
    fn attrs(&self, id: u64);
    /// The entry (parent, name). May be queued: the kernel takes the parent's lock for it,
    /// which the request being served can hold.
    fn entry(&self, parent: u64, name: std::ffi::OsString);
}

pub struct Union {
    pub layers: LayerStack,
    pub(crate) nodes: NodeTable,
    pub(crate) fds: FdCache,
    /// Renames and removals of directories, against opens by their names (`dir_fd`).
    pub(crate) dir_moves: dirmoves::DirMoves,
    /// Copy-ups published so far (`Union::lookup` checks none came during its resolve).
    pub(crate) copies: AtomicU64,
    pub(crate) names: names::NameIndex,
    catalog: Option<catalog::Lazy>,
    pub(crate) handles: HandleTable,
    pub(crate) passes: files::Passes,
    /// Counts forgotten nodes, for the daemon's thread that gives their memory back.
    pub reclaim: reclaim::Reclaim,
    pub(crate) work: Option<WorkDir>,
    pub cfg: Config,
    /// Where to say what the kernel caches that changed behind its back (attributes of a
    /// parent after a copy-up, names given to a reissued node): the FUSE side tells the kernel.
    invalidate: OnceLock<Box<dyn Invalidate>>,
    /// Counters and the event stream (`layerfs stats`, `layerfs events`).
    pub obs: Arc<Observer>,
}

/// Directory fds opened by name on the way to one, by node id (`Union::dir_fd`).
type Opened = Vec<(u64, Arc<OwnedFd>)>;

/// The on-disk name of an xattr named through the union (escaped; EOPNOTSUPP if refused).
pub(crate) fn disk_xattr_name(name: &OsStr) -> Result<CString> {
    let disk = format::escape_xattr(name.as_bytes()).ok_or_else(|| err(libc::EOPNOTSUPP))?;
    CString::new(disk).map_err(|_| err(libc::EINVAL))
}

/// Refuse names the kernel would never send, and names too long for any layer.
pub(crate) fn check_name(name: &OsStr) -> Result<()> {
    let b = name.as_bytes();
    if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') || b.contains(&0) {
        return Err(err(libc::EINVAL));
    }
    if b.len() > 255 {
        return Err(err(libc::ENAMETOOLONG));
    }
    Ok(())
}

/// The most descriptors the fd table is grown for at start (a 128 KiB table).
const MAX_RESERVED_FDS: usize = 16384;

/// Tries of a request on a file whose name moved meanwhile, by its new name (`Union::on_real`).
const MOVED_TRIES: usize = 4;

impl Union {
    /// Open the layers, clean the workdir and build the root node.
    pub fn new(cfg: Config) -> Result<Union> {
        let limit = sys::raise_nofile_limit() as usize;
        // Half the limit for directory fds, the rest for open files (each holds one) and
        // copy-ups; where the limit is low, a quarter (the cache sheds when it runs out).
        let fd_cache = if limit >= 1024 { limit / 2 } else { limit / 4 };
        // Room for the layer roots and the fd cache up front (the daemon has no threads yet),
        // so no request later waits for the kernel to grow the fd table (see reserve_fds);
        // capped, as a table for a million fds would cost megabytes of kernel memory.
        let want = (fd_cache + cfg.lowers.len() + cfg.data_lowers.len() + 64)
            .min(limit)
            .min(MAX_RESERVED_FDS);
        if let Err(e) = sys::reserve_fds(want as u32) {
            log::debug!("fd table not grown to {want}: {e}");
        }
        let layers = LayerStack::open(cfg.upper.as_deref(), &cfg.lowers, &cfg.data_lowers)?;
        let work = match (&cfg.upper, &cfg.work) {
            (Some(_), Some(w)) => Some(WorkDir::open(w, &layers, cfg.marker_ns, !cfg.fsync)?),
            (Some(_), None) => return Err(Error::msg("upperdir needs a workdir too")),
            (None, Some(_)) => return Err(Error::msg("workdir given without an upperdir")),
            (None, None) => None,
        };
        let u = Union {
            fds: FdCache::new(fd_cache),
            dir_moves: Default::default(),
            copies: AtomicU64::new(0),
            names: names::NameIndex::new(8192),
            catalog: cfg
                .catalog
                .as_deref()
                .map(|p| catalog::Lazy::new(p, &layers)),
            nodes: NodeTable::new(),
            handles: HandleTable::new(),
            passes: Default::default(),
            reclaim: Default::default(),
            layers,
            work,
            cfg,
            invalidate: OnceLock::new(),
            obs: Arc::new(Observer::default()),
        };
        u.build_root()?;
        Ok(u)
    }

    /// The lower catalog (`catalog=`), read on first use.
    pub(crate) fn catalog(&self) -> Option<&catalog::Catalog> {
        self.catalog.as_ref().map(catalog::Lazy::get)
    }

    /// Write what this mount added to its catalog (once the mount is gone).
    pub fn save_catalog(&self) {
        if let Some(c) = self.catalog.as_ref().and_then(catalog::Lazy::if_read)
            && let Err(e) = c.save()
        {
            log::warn!("{e}");
        }
    }

    fn build_root(&self) -> Result<()> {
        // Every layer's root merges: as in the kernel, a layer root is never opaque (an
        // opaque marker on it, of any format, hides nothing below).
        let merged: Vec<usize> = (0..self.layers.len()).collect();
        let st_ino = self.layers.union_ino(0, self.layers.layers[0].ino);
        let mut state = NodeState::new(ROOT_ID, OsStr::new(""), merged);
        if self.layers.has_upper {
            state.impure = format::dir_markers(self.layers.layers[0].root.as_fd()).impure;
        }
        self.nodes
            .insert_root(Node::new(ROOT_ID, Kind::Dir, st_ino, state));
        Ok(())
    }

    /// Ask to be told when something the kernel caches goes stale.
    pub fn set_invalidator(&self, inval: Box<dyn Invalidate>) {
        let _ = self.invalidate.set(inval);
    }

    pub(crate) fn attrs_changed(&self, id: u64) {
        if let Some(inval) = self.invalidate.get() {
            inval.attrs(id);
        }
    }

    /// A change made through a retired node (an fd from before a copy-up): the kernel's
    /// inode of the node its names lead to now holds stale attributes.
    pub(crate) fn successors_changed(&self, node: &Node) {
        if let Some(n) = node.successor_ino().and_then(|ino| self.nodes.live(ino))
            && n.id != node.id
        {
            log::debug!(
                "node {}: attributes of its successor {} dropped",
                node.id,
                n.id
            );
            self.attrs_changed(n.id);
        }
    }

    /// Give node `id`'s names to a new node (see `NodeTable::reissue`) and have the kernel
    /// drop its cached entries for them, so path walks reach the new one.
    pub fn reissue(&self, id: u64) {
        let Some(old) = self.nodes.get(id) else {
            return;
        };
        // The old node keeps reaching this object whatever later happens to its names.
        let keep = self.keep_fd(&old);
        // Its top object is in the upper layer now: the number a lookup would give it (its
        // origin's, so normally the same as before).
        let natural = keep.as_ref().map_or(0, |fd| {
            sys::fstat(fd.as_fd()).map_or(0, |st| match old.top_layer() {
                0 if self.layers.has_upper => self.upper_ino(XTarget::Fd(fd.as_fd()), &st),
                l => self.layers.union_ino(l, st.st_ino),
            })
        });
        let Some(new) = self.nodes.reissue(&old, natural) else {
            return;
        };
        crate::observe::stats::bump(&self.obs.stats.reissued);
        if keep.is_some() {
            old.state.write().expect("node state lock").detached = keep;
        }
        log::debug!("node {id} reissued as {}", new.id);
        if let Some(inval) = self.invalidate.get() {
            for (p, n) in new.state().names() {
                inval.entry(p, n.to_owned());
            }
        }
    }

    pub fn writable(&self) -> bool {
        self.layers.has_upper
    }

    pub(crate) fn node(&self, id: u64) -> Result<Arc<Node>> {
        self.nodes.get(id).ok_or_else(|| err(libc::ESTALE))
    }

    pub(crate) fn dir_node(&self, id: u64) -> Result<Arc<Node>> {
        let n = self.node(id)?;
        if !n.is_dir() {
            return Err(err(libc::ENOTDIR));
        }
        Ok(n)
    }

    /// A directory removed (rmdir, a rename over it) takes no new names and lists none:
    /// ENOENT, as the kernel's IS_DEADDIR. Asked under the directory's lock, which the
    /// removal held: else a request on it that came in meanwhile (a process whose working
    /// directory it was) went by its old name, to whatever is there now (engine fuzz
    /// `races`: an unlink in it answered ENOTDIR).
    pub(crate) fn live_dir(p: &Node) -> Result<()> {
        match p.state.read().expect("node state lock").unlinked {
            true => Err(err(libc::ENOENT)),
            false => Ok(()),
        }
    }

    /// The fd of directory `node` in `layer`, from the cache or rebuilt from its parent's (or,
    /// for a redirected directory's lower layers, from the layer root along its lower path).
    pub(crate) fn dir_fd(&self, node: &Node, layer: usize) -> Result<Arc<OwnedFd>> {
        if node.id == ROOT_ID {
            return Ok(self.layers.layers[layer].root.clone());
        }
        if let Some(fd) = self.fds.get(node.id, layer) {
            return Ok(fd);
        }
        // By names, with no rename of a directory meanwhile (`dirmoves`).
        let (got, consistent) = self.dir_moves.read(|| self.dir_fd_by_names(node, layer));
        let (fd, opened) = got?;
        if consistent {
            for (id, fd) in opened {
                self.fds.put(id, layer, fd);
            }
        }
        Ok(fd)
    }

    /// Open directory `node` in `layer` by its names from the nearest cached fd up (or its
    /// lower path), with the fds opened on the way (node id, fd) for the cache.
    fn dir_fd_by_names(&self, node: &Node, layer: usize) -> Result<(Arc<OwnedFd>, Opened)> {
        // Walk up (iteratively: trees can be thousands deep) to the nearest known fd.
        let mut chain: Vec<(u64, Arc<OsStr>)> = Vec::new();
        let mut opened = Vec::new();
        let mut cur = node.id;
        let mut base: Arc<OwnedFd>;
        loop {
            if cur == ROOT_ID {
                base = self.layers.layers[layer].root.clone();
                break;
            }
            if let Some(fd) = self.fds.get(cur, layer) {
                base = fd;
                break;
            }
            // (The node itself may be one a change holds that the table no longer has.)
            let held;
            let n = match cur == node.id {
                true => node,
                false => {
                    held = self.node(cur)?;
                    &*held
                }
            };
            let st = n.state.read().expect("node state lock");
            if st.unlinked {
                // Removed: its old name may lead to another directory now, or a whiteout.
                return Err(err(libc::ENOENT));
            }
            if let (Some(path), false) = (&st.lower_path, layer <= st.redirect_layer) {
                base = self.walk_path(layer, path)?;
                opened.push((cur, base.clone()));
                break;
            }
            chain.push((cur, st.name.clone()));
            cur = st.parent;
        }
        for (id, name) in chain.into_iter().rev() {
            base = Arc::new(self.open_subdir(base.as_fd(), &name)?);
            opened.push((id, base.clone()));
        }
        Ok((base, opened))
    }

    /// Open `path` (components from the root) in `layer`, directory by directory.
    pub(crate) fn walk_path(&self, layer: usize, path: &[OsString]) -> Result<Arc<OwnedFd>> {
        let mut fd = self.layers.layers[layer].root.clone();
        for c in path {
            fd = Arc::new(self.open_subdir(fd.as_fd(), c)?);
        }
        Ok(fd)
    }

    /// Open directory `name` of `dir` as a handle for the `*at` calls (O_PATH; O_NOFOLLOW
    /// is in every `sys::openat`), making room in the fd cache if the process ran out.
    pub(crate) fn open_subdir(&self, dir: BorrowedFd<'_>, name: &OsStr) -> Result<OwnedFd> {
        self.with_fd_room(|| Ok(sys::openat(dir, name, libc::O_PATH | libc::O_DIRECTORY, 0)?))
    }

    /// Run `f`, and once more after emptying the directory fd cache if the process ran out
    /// of descriptors (EMFILE): for `f` that may simply be run again.
    pub(crate) fn with_fd_room<T>(&self, mut f: impl FnMut() -> Result<T>) -> Result<T> {
        match f() {
            Err(e) if e.errno() == libc::EMFILE => {
                log::debug!("out of file descriptors: directory fd cache emptied");
                self.fds.shed();
                f()
            }
            r => r,
        }
    }

    /// The real object behind `node` in `layer`.
    pub(crate) fn real_in(&self, node: &Node, layer: usize) -> Result<Real> {
        if node.is_dir() {
            return match self.dir_fd(node, layer) {
                Err(e) if e.errno() == libc::ENOENT => self.removed_dir(node, layer).ok_or(e),
                fd => Ok(Real::Fd(fd?)),
            };
        }
        // Only what is needed, under the lock (this runs on every getattr and open).
        let (parent, name) = {
            let st = node.state.read().expect("node state lock");
            if let Some(fd) = &st.detached {
                return Ok(Real::Fd(fd.clone()));
            }
            if let Some((_, fd)) = st.moving.iter().find(|(l, _)| *l == layer) {
                return Ok(Real::Fd(fd.clone()));
            }
            (st.parent, st.name.clone())
        };
        let (parent, name) = match self.nodes.get(parent) {
            Some(p) => (p, name),
            None => match self.reachable_name(node) {
                Ok(at) => at,
                Err(e) => return self.kept_fd(node, layer).ok_or(e),
            },
        };
        Ok(Real::At(self.dir_fd(&parent, layer)?, name))
    }

    /// A removed directory that a process still holds, in its top layer: the fd its removal
    /// kept, by which it answers as itself (getattr, chmod, xattrs), as the kernel's
    /// overlayfs answers through the real directory its inode keeps. Never by its old name.
    fn removed_dir(&self, node: &Node, layer: usize) -> Option<Real> {
        let s = node.state.read().expect("node state lock");
        match (&s.detached, s.unlinked && s.layers[0] == layer) {
            (Some(fd), true) => Some(Real::Fd(fd.clone())),
            _ => None,
        }
    }

    /// The fd kept on a hard link's object in `layer` when one of its names went (see
    /// `Rare::kept`), for when no name is left to reach it by.
    pub(crate) fn kept_fd(&self, node: &Node, layer: usize) -> Option<Real> {
        let s = node.state.read().expect("node state lock");
        match &s.kept {
            Some((l, fd)) if *l == layer => Some(Real::Fd(fd.clone())),
            _ => None,
        }
    }

    /// The node's directory and name to reach it by: its first name whose directory is still
    /// a node (see `prune_names`). ESTALE where no name is left to reach it by.
    pub(crate) fn reachable_name(&self, node: &Node) -> Result<(Arc<Node>, Arc<OsStr>)> {
        self.prune_names(node)
            .into_iter()
            .next()
            .ok_or_else(|| err(libc::ESTALE))
    }

    /// The node's names whose directories are still nodes, first first. The kernel may forget
    /// the directory of a hard link's name while another name keeps the file in use (memory
    /// pressure drops the unused entries; a failed rename drops those it named): the names
    /// in forgotten directories are the kernel's no more, so they go (unless none would be
    /// left), and the first name left is one a copy-up can follow. A name looked up again
    /// later is the node's again.
    pub(crate) fn prune_names(&self, node: &Node) -> Vec<(Arc<Node>, Arc<OsStr>)> {
        // The node's lock is not held while the table is asked (the table's lock comes first).
        let names: Vec<(u64, Arc<OsStr>)> = node
            .state
            .read()
            .expect("node state lock")
            .named()
            .collect();
        let mut live = Vec::new();
        let mut gone = Vec::new();
        for (p, n) in names {
            match self.nodes.get(p) {
                Some(dir) => live.push((dir, n)),
                None => gone.push((p, n)),
            }
        }
        if !live.is_empty() && !gone.is_empty() {
            self.nodes.drop_names(node, &gone);
            log::debug!(
                "node {}: names in forgotten dirs dropped: {gone:?}",
                node.id
            );
        }
        live
    }

    /// The topmost real object behind `node`.
    pub(crate) fn real(&self, node: &Node) -> Result<Real> {
        self.real_in(node, node.top_layer())
    }

    /// Attributes as the union shows them.
    pub(crate) fn attr_of(&self, node: &Node) -> Result<Stat> {
        // (What the object is presented as is read while the name still leads to it.)
        let op = |r: &Real| {
            let st = r.stat()?;
            match sys::is_whiteout_stat(&st) {
                true => Ok(None),
                false => self.present(node, Some(r), st).map(Some),
            }
        };
        let gone = |st: &Result<Option<Stat>>| match st {
            Ok(st) => st.is_none(),
            Err(e) => e.errno() == libc::ENOENT,
        };
        let (_, st) = self.on_real(node, op, gone)?;
        st.ok_or_else(|| err(libc::ENOENT))
    }

    /// `op` on the node's object (`real`), and the object it ran on, with no rename or unlink
    /// changing what the name leads to meanwhile (`Node::reach`). One whose object could
    /// not be pinned may have moved the name between its read and `op`, which then meets
    /// nothing there or a whiteout (`gone` says): `op` again by the name the node has now,
    /// where that changed (test `write_path::a_file_being_renamed_answers_as_itself`).
    pub(crate) fn on_real<T>(
        &self,
        node: &Node,
        op: impl Fn(&Real) -> Result<T>,
        gone: impl Fn(&Result<T>) -> bool,
    ) -> Result<(Real, T)> {
        let _reach = node.reach();
        let mut real = self.real(node)?;
        let mut tries = 0;
        loop {
            let r = op(&real);
            if !node.is_dir() && tries < MOVED_TRIES && gone(&r) {
                let now = self.real(node)?;
                if !now.same(&real) {
                    real = now;
                    tries += 1;
                    continue;
                }
            }
            return r.map(|t| (real, t));
        }
    }

    /// `op` on the node's object, with no rename or unlink changing what the name leads to
    /// meanwhile (`Node::reach`).
    pub(crate) fn with_real<T>(
        &self,
        node: &Node,
        op: impl FnOnce(&Real) -> Result<T>,
    ) -> Result<T> {
        let _reach = node.reach();
        op(&self.real(node)?)
    }

    /// The attributes the union shows for `node`, given the real stat of its top object.
    /// `real` is that object when the caller has it at hand; it is built only if needed.
    pub(crate) fn present(&self, node: &Node, real: Option<&Real>, mut st: Stat) -> Result<Stat> {
        // As the kernel: the recorded union count only for the index's own entry. It has the
        // index's link besides its name, so a single link settles it without the lock, unless
        // the object is reached through a detached fd (the name went while the file's other
        // names live on: `named_elsewhere`).
        let linked = !node.is_dir() && (st.st_nlink > 1 || matches!(real, Some(Real::Fd(_)))) && {
            let s = node.state.read().expect("node state lock");
            s.indexed && (st.st_nlink > 1 || s.named_elsewhere) && self.layers.is_upper(s.layers[0])
        };
        let mapped = !self.cfg.ids.is_identity();
        let built;
        let real = match real {
            Some(r) => Some(r),
            None if linked || mapped => {
                built = self.real(node)?;
                Some(&built)
            }
            None => None,
        };
        if let (true, Some(real)) = (linked, real) {
            st.st_nlink = format::adjusted_nlink(real.xtarget(), st.st_nlink);
        }
        st.st_ino = node.st_ino();
        if !node.is_dir()
            && let Some(d) = &node.state.read().expect("node state lock").data
        {
            // A metadata-only copy is a hole; its blocks are its data's (as the kernel), or
            // until a data-only layer's file is looked up, the size's (as ovl_getattr).
            st.st_blocks = match d.at {
                node::DataAt::File { blocks, .. } => blocks,
                node::DataAt::Deferred(_) => {
                    let bs = st.st_blksize.max(1);
                    (st.st_size + bs - 1) / bs * bs / 512
                }
            };
        }
        if let (true, Some(real)) = (mapped, real) {
            let ov = self
                .cfg
                .ids
                .xattr
                .and_then(|x| real.getxattr(x).ok())
                .and_then(|v| ids::parse_override(&v));
            self.cfg.ids.present(&mut st, ov);
        }
        // As kernel overlayfs: a merged directory reports nlink 1 (`find` accepts it).
        if node.is_dir() && node.state.read().expect("node state lock").layers.len() > 1 {
            st.st_nlink = 1;
        }
        Ok(st)
    }

    /// Close every cached directory fd, as when the process runs out of descriptors: each
    /// directory is then opened by its names again (tests race that against renames).
    pub fn shed_fd_cache(&self) {
        self.fds.shed();
    }

    pub fn getattr(&self, id: u64) -> Result<Stat> {
        let node = self.node(id)?;
        self.attr_of(&node)
    }

    /// The entry of a node whose lookup count was just raised, or the error that kept it
    /// from being answered: the kernel counts only answered lookups, so that one is undone.
    pub(crate) fn counted(&self, node: &Node, attr: Result<Stat>) -> Result<Entry> {
        match attr {
            Ok(attr) => Ok(Entry { id: node.id, attr }),
            Err(e) => {
                self.forget(node.id, 1);
                Err(e)
            }
        }
    }

    pub fn forget(&self, id: u64, n: u64) {
        if self.nodes.forget(id, n) {
            self.fds.drop_node(id);
            self.names.drop_node(id);
            self.passes.set(id, None);
            self.reclaim.forgot();
        }
    }

    pub fn readlink(&self, id: u64) -> Result<OsString> {
        let node = self.node(id)?;
        if node.kind != Kind::Symlink {
            return Err(err(libc::EINVAL));
        }
        self.with_real(&node, |r| r.readlink())
    }

    pub fn statfs(&self) -> Result<libc::statfs> {
        let top = &self.layers.layers[0];
        let mut st = sys::fstatfs(top.root.as_fd())?;
        st.f_namelen = 255;
        Ok(st)
    }

    pub fn getxattr(&self, id: u64, name: &OsStr) -> Result<Vec<u8>> {
        let node = self.node(id)?;
        if self.is_override_xattr(name.as_bytes()) {
            return Err(err(libc::ENODATA));
        }
        let c = disk_xattr_name(name)?;
        self.with_real(&node, |r| r.getxattr(&c))
    }

    /// With xattr_permissions, the override xattr is ours: stat shows it, xattr calls don't.
    pub(crate) fn is_override_xattr(&self, name: &[u8]) -> bool {
        self.cfg.ids.xattr.is_some_and(|x| x.to_bytes() == name)
    }

    pub fn listxattr(&self, id: u64) -> Result<Vec<u8>> {
        let node = self.node(id)?;
        let mut out = Vec::new();
        for n in self.with_real(&node, |r| r.listxattr())? {
            if let Some(shown) = format::unescape_xattr(&n)
                && !self.is_override_xattr(&shown)
            {
                out.extend_from_slice(&shown);
                out.push(0);
            }
        }
        Ok(out)
    }

    pub fn access(&self, id: u64, mask: i32) -> Result<()> {
        let _ = self.node(id)?;
        if mask & libc::W_OK != 0 && !self.writable() {
            return Err(err(libc::EROFS));
        }
        Ok(())
    }

    /// Which layers hold node `id` (top first) and whether it is a directory (for `which`).
    pub fn layers_of(&self, id: u64) -> Result<(Vec<usize>, bool)> {
        let n = self.node(id)?;
        Ok((n.state().layers.to_vec(), n.is_dir()))
    }

    /// For a renamed (redirected) directory: the path its lower layers are merged from.
    pub fn redirected_from(&self, id: u64) -> Result<Option<String>> {
        let st = self.node(id)?.state();
        Ok(st.lower_path.as_ref().map(|lp| format::show_path(lp)))
    }

    /// For a metadata-only copy: the layer and path its data is read from (a data-only
    /// layer's file looked up now if need be), or why it cannot be read.
    pub fn data_of(&self, id: u64) -> Result<Option<Result<(usize, String)>>> {
        let n = self.node(id)?;
        Ok(match self.data_source(&n) {
            Ok(None) => None,
            Ok(Some(d)) => match &d.at {
                node::DataAt::File { layer, path, .. } => {
                    Some(Ok((*layer, format::show_path(path))))
                }
                node::DataAt::Deferred(_) => None,
            },
            Err(e) => Some(Err(e)),
        })
    }

    /// Is `name` under directory `parent` also present in a layer below the top one it is
    /// served from (for `which`: was it copied up, or does it shadow something)?
    pub fn layers_with_name(&self, parent: u64, name: &OsStr) -> Result<Vec<usize>> {
        let p = self.dir_node(parent)?;
        let mut out = Vec::new();
        for &l in &p.state().layers {
            let fd = self.dir_fd(&p, l)?;
            if sys::statat(fd.as_fd(), name)
                .is_ok_and(|st| !format::is_whiteout_at(fd.as_fd(), name, &st))
            {
                out.push(l);
            }
        }
        Ok(out)
    }

    /// Entries each layer contributes to directory `id` (markers not counted).
    pub fn entries_per_layer(&self, id: u64) -> Result<Vec<(usize, usize)>> {
        let n = self.dir_node(id)?;
        let mut out = Vec::new();
        for &l in &n.state().layers {
            let fd = self.dir_fd(&n, l)?;
            let r = sys::openat(
                fd.as_fd(),
                OsStr::new("."),
                libc::O_RDONLY | libc::O_DIRECTORY,
                0,
            )?;
            let count = sys::read_dir_fd(r.as_fd())?
                .into_iter()
                .filter(|e| !format::is_marker_name(&e.name))
                .count();
            out.push((l, count));
        }
        Ok(out)
    }

    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }
}
