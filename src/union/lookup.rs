//! Name lookup across the layers: top-down, first non-directory wins, directories merge until
//! an opaque marker, a whiteout or a non-directory; redirects continue the merge elsewhere.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::catalog::{DirKey, ROOT_KEY};
use super::fanout;
use super::format;
use super::index::FromIndex;
use super::names::{MERGE_MIN_LAYERS, Merged, Probe};
use super::node::{DataAt, DataSrc, Inserted, Kind, Layers, Node, NodeState, ROOT_ID};
use super::{Entry, Union, check_name};
use crate::error::{Result, err};
use crate::sys::{self, Stat, XTarget};

/// What a lookup found for one name.
pub(crate) struct Found {
    pub kind: Kind,
    pub layers: Layers,
    pub top: Stat,
    pub lower_path: Option<Arc<Vec<OsString>>>,
    pub redirect_layer: usize,
    /// The union inode number of its topmost lower copy (a directory) or of the lower object
    /// it was copied up from (an upper non-directory with an origin): its st_ino, so copy-up
    /// doesn't change it.
    pub lower_ino: Option<u64>,
    /// A directory whose upper copy is marked impure.
    pub impure: bool,
    /// An upper non-directory that is the index's entry for its origin: its link count is
    /// the union's (`overlay.nlink`), as the kernel counts it only then.
    pub indexed: bool,
    /// Directory fds opened on the way, to seed the fd cache.
    pub fds: Vec<(usize, Arc<OwnedFd>)>,
    /// A metadata-only copy's data.
    pub data: Option<Arc<DataSrc>>,
    /// An upper file copied up whole where the kernel's copy would be metadata-only
    /// (`NodeState::kernel_meta`), and the redirect that copy would carry.
    pub kernel_meta: bool,
    pub kernel_redirect: Option<Box<[OsString]>>,
}

impl Found {
    /// A directory whose top copy has stat `st` (layers added as they are merged).
    fn dir(st: Stat) -> Found {
        Found {
            kind: Kind::Dir,
            layers: Layers::new(),
            top: st,
            lower_path: None,
            redirect_layer: 0,
            lower_ino: None,
            impure: false,
            indexed: false,
            fds: Vec::new(),
            data: None,
            kernel_meta: false,
            kernel_redirect: None,
        }
    }
}

/// Tries of a lookup whose name had to join a node that went meanwhile (`Union::lookup`).
const LOOKUP_TRIES: usize = 8;

enum Step {
    Continue,
    Stop,
}

/// How the directories of a lower path look in one layer.
enum LayerWalk {
    /// All there: the last one, and whether one on the way was opaque (then no layer below
    /// this one counts).
    Dir(Arc<OwnedFd>, bool),
    /// One is missing here: look in the next layer.
    Missing,
    /// A whiteout or a non-directory on the way, or a missing one past an opaque directory:
    /// no layer below counts.
    Blocked,
}

impl Union {
    pub fn lookup(&self, parent: u64, name: &OsStr) -> Result<Entry> {
        check_name(name)?;
        if format::is_marker_name(name) {
            return Err(err(libc::ENOENT));
        }
        let p = self.dir_node(parent)?;
        let _g = p.dir_lock.read().expect("dir lock");
        Self::live_dir(&p)?;
        if let Some(n) = self.nodes.lookup_existing(parent, name) {
            return self.counted(&n, self.attr_of(&n));
        }
        // A name that must join another name's node is looked up again if that node went
        // (forgotten, or its last name removed) before it joined: the copy is reached through
        // the index then. Each try saw the node live, so a few always do.
        for _ in 0..LOOKUP_TRIES {
            let copies = self.copies.load(Ordering::SeqCst);
            let found = self.resolve(&p, name)?.ok_or_else(|| err(libc::ENOENT))?;
            let (found, join) = match self.linked_from_index(&p, name, &found)? {
                FromIndex::Linked(copy) => (*copy, false),
                FromIndex::Live => (found, true),
                FromIndex::Not => (found, false),
            };
            let (top, layer) = (found.top, found.layers[0]);
            let Some(node) = self.node_from(parent, name, found, join)? else {
                log::debug!("lookup of {name:?}: its node went meanwhile, again");
                continue;
            };
            let attr = (|| {
                if self.copies.load(Ordering::SeqCst) != copies {
                    self.catch_up(&p, name, &node)?;
                }
                // The resolve just stat'ed the node's top object: no second fstatat, unless
                // the node's top moved meanwhile (an alias of a copied-up hard link was
                // linked up).
                if node.top_layer() == layer {
                    self.present(&node, None, top)
                } else {
                    self.attr_of(&node)
                }
            })();
            return self.counted(&node, attr);
        }
        Err(err(libc::ESTALE))
    }

    /// A copy-up was published while `node`'s name was resolved. Copy-ups do not take the
    /// parent's lock: the file's node then may have copied it up and been forgotten before
    /// this lookup registered a new node, from what it found before the copy landed (the
    /// lower file; engine fuzz `races`: an unlink of it answered EEXIST, its whiteout meeting
    /// the copy). Resolved again under the node's copy lock, it takes where the file is now.
    fn catch_up(&self, p: &Node, name: &OsStr, node: &Node) -> Result<()> {
        let _copying = node.copy_lock.lock().expect("copy lock");
        let Some(now) = self.resolve(p, name)? else {
            return Ok(());
        };
        let s = node.state.read().expect("node state lock");
        // Only up, and only a node known by this name alone: a hard link's other names
        // may not be in the upper layer (its copy-up links up the names its node had), and
        // a node showing the copy must reach it by its first name.
        let up = |l: &[usize]| self.layers.is_upper(l[0]);
        let missed = up(&now.layers)
            && (!up(&s.layers) || (s.data.is_some() && now.data.is_none()))
            && s.aliases.is_empty();
        if !missed || self.node_id(&now) != node.st_ino() {
            return Ok(());
        }
        drop(s);
        log::debug!("lookup of {name:?}: a copy-up landed meanwhile");
        let now = self.found_state(node.id, p.id, name, now);
        node.state.write().expect("node state lock").relocate(now);
        Ok(())
    }

    /// The node id (= st_ino) of a resolved object.
    pub(crate) fn node_id(&self, f: &Found) -> u64 {
        f.lower_ino
            .unwrap_or_else(|| self.layers.union_ino(f.layers[0], f.top.st_ino))
    }

    /// A node for a resolved name, not registered anywhere.
    pub(crate) fn node_of(&self, parent: u64, name: &OsStr, f: Found) -> Node {
        let natural = self.node_id(&f);
        let id = self.nodes.id_for(natural);
        let kind = f.kind;
        Node::new(id, kind, natural, self.found_state(id, parent, name, f))
    }

    /// The state of node `id` for a resolved name; a directory's fds in its layers go to the
    /// fd cache under `id` (those of its former layers, and its name sets, are dropped).
    fn found_state(&self, id: u64, parent: u64, name: &OsStr, f: Found) -> NodeState {
        let mut state = NodeState::new(parent, name, f.layers);
        state.lower_path = f.lower_path;
        state.redirect_layer = f.redirect_layer;
        state.data = f.data;
        state.impure = f.impure;
        state.indexed = f.indexed;
        state.kernel_meta = f.kernel_meta;
        state.kernel_redirect = f.kernel_redirect;
        state.shrink();
        if f.kind == Kind::Dir {
            self.fds.drop_node(id);
            self.names.drop_node(id);
            for (l, fd) in f.fds {
                self.fds.put(id, l, fd);
            }
        }
        state
    }

    /// Register a resolved name as a node (or as one more name of a known node). With
    /// `join`, only as a further name of the live node of its object: None if that is gone.
    pub(crate) fn node_from(
        &self,
        parent: u64,
        name: &OsStr,
        f: Found,
        join: bool,
    ) -> Result<Option<Arc<Node>>> {
        let found_layer = f.layers[0];
        let node = self.node_of(parent, name, f);
        let ins = if join {
            match self.nodes.join(node) {
                Some(ins) => ins,
                None => return Ok(None),
            }
        } else {
            self.nodes.insert(node)
        };
        let node = ins.node().clone();
        if let Inserted::Alias(_) = ins {
            // Another name of a hard link that was copied up: link this name up too, so the
            // union and the upper layer agree that both names are one file.
            if node.top_layer() == 0
                && found_layer != 0
                && let Err(e) = self.link_up_alias(&node, parent, name, found_layer)
            {
                // Not linked up (ENOSPC, say): the name is not the copy's, and the failed
                // lookup is not counted. Else the next lookup would find it registered as
                // the copy's and never link it up.
                self.nodes.drop_names(&node, &[(parent, name)]);
                self.forget(node.id, 1);
                return Err(e);
            }
        }
        Ok(Some(node))
    }

    /// Resolve `name` in directory `p` against the layers, without touching the node table.
    pub(crate) fn resolve(&self, p: &Node, name: &OsStr) -> Result<Option<Found>> {
        let pstate = p.state();
        let mut found: Option<Found> = None;
        let merged = self.merged_names(p, &pstate.layers)?;
        // A deep directory's subdirectory whose lower copies the catalog knows: no need to
        // visit every layer to find them.
        // (The catalog is asked, and so read, only in such a directory.)
        let known = merged.as_ref().and_then(|m| {
            let c = self.catalog()?;
            c.child(self.catalog_key(p, m.lowers()), m.lowers(), name)
        });
        // Through a merged index only the layers that list the name are visited (lookup cost
        // flat in the depth of the stack); else every layer, misses answered by its listing.
        let hits = merged.as_deref().map(|m| m.hits(name));
        let visit: std::borrow::Cow<[usize]> = match hits {
            Some(h) => pstate
                .layers
                .iter()
                .copied()
                .filter(|&l| self.layers.is_upper(l))
                .chain(h.iter().map(|e| e.0))
                .collect(),
            None => std::borrow::Cow::Borrowed(&pstate.layers),
        };
        // Many lower layers to merge: if the first of them turns out cold, the rest are read
        // side by side first (`warm`).
        let mut deep = hits.filter(|h| known.is_none() && h.len() > MERGE_MIN_LAYERS);
        // A layer that misses the name may still delete it with an OCI `.wh.` file; that
        // costs a syscall, so it is asked only once a layer below turns out to hold the name.
        let mut missed: Option<Arc<OwnedFd>> = None;
        let whited_out = |missed: &mut Option<Arc<OwnedFd>>| {
            missed
                .take()
                .is_some_and(|fd| format::has_oci_whiteout(fd.as_fd(), name))
        };
        let direct_layer = self.direct_layer(&visit, hits.is_some());
        for &l in visit.iter() {
            let direct = Some(l) == direct_layer;
            if !self.layers.is_upper(l) && !direct {
                if let Some(lowers) = &known {
                    if whited_out(&mut missed) {
                        break;
                    }
                    if self.known_dir(&mut found, p, name, lowers)? {
                        break;
                    }
                }
                // Lower layers never change: answer misses from their listings.
                let probe = match hits {
                    Some(h) => match h.iter().find(|e| e.0 == l) {
                        Some((_, true)) => Probe::Present,
                        _ => Probe::WhitedOut,
                    },
                    None => self.probe_lower(p, None, l, name)?,
                };
                match probe {
                    Probe::Absent => continue,
                    Probe::WhitedOut => break,
                    Probe::Present => {}
                }
                if whited_out(&mut missed) {
                    break;
                }
            }
            let pfd = self.dir_fd(p, l)?;
            let started = deep.is_some().then(Instant::now);
            let st = match sys::statat(pfd.as_fd(), name) {
                Ok(st) => st,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                    missed = Some(pfd);
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            // (A `.wh.` file above matters only once the name turns out to be here.)
            if direct && whited_out(&mut missed) {
                break;
            }
            let step = self.step(&mut found, l, &pfd, name, st, Some((p, &pstate)))?;
            if let (Some(h), Some(t)) = (deep.take(), started)
                && matches!(step, Step::Continue)
                && t.elapsed() > fanout::cold()
            {
                let below: Vec<(usize, bool)> = h.iter().copied().filter(|e| e.0 > l).collect();
                self.warm(p, name, &below);
            }
            if let Step::Stop = step {
                break;
            }
        }
        if let (Some(m), None, Some(f)) = (&merged, &known, &found)
            && f.kind == Kind::Dir
            && f.lower_path.is_none()
            && let Some(c) = self.catalog()
        {
            let lowers: Vec<usize> = f
                .layers
                .iter()
                .copied()
                .filter(|&l| !self.layers.is_upper(l))
                .collect();
            if !lowers.is_empty() {
                c.record_child(self.catalog_key(p, m.lowers()), m.lowers(), name, &lowers);
            }
        }
        Ok(found)
    }

    /// A directory listed by many lower layers whose top copy was cold: make the same reads
    /// in the layers below side by side, so the walk finds them cached. On a cold cache each
    /// copy costs an inode read and a read of its block (the `.wh..wh..opq` probe), one after
    /// another otherwise (a directory in each of 100 layers: 100 disk reads in a row; the
    /// bench's 1k stats through 100 layers, cold: 233 ms before, 133 ms with this). Only
    /// when cold: on a warm cache the threads cost more than the walk (46 against 60 ms).
    /// Reads only; the walk decides as before.
    fn warm(&self, p: &Node, name: &OsStr, hits: &[(usize, bool)]) {
        let listed: Vec<usize> = hits.iter().filter(|e| e.1).map(|e| e.0).collect();
        log::debug!(
            "cold: reading {name:?} in {} layers side by side",
            listed.len()
        );
        fanout::map(&listed, |&l| {
            let Ok(pfd) = self.dir_fd(p, l) else {
                return;
            };
            let is_dir = sys::statat(pfd.as_fd(), name)
                .is_ok_and(|st| Kind::from_mode(st.st_mode) == Kind::Dir);
            if is_dir
                && let Ok(dfd) = sys::openat(pfd.as_fd(), name, libc::O_PATH | libc::O_DIRECTORY, 0)
            {
                format::dir_markers_of(XTarget::At(pfd.as_fd(), name), dfd.as_fd());
            }
        });
    }

    /// Merge the lower copies of directory `name` that the catalog lists (`lowers`) into
    /// `found`; false (nothing changed) if the top one is not a directory there after all.
    fn known_dir(
        &self,
        found: &mut Option<Found>,
        p: &Node,
        name: &OsStr,
        lowers: &[usize],
    ) -> Result<bool> {
        if found
            .as_ref()
            .is_some_and(|f| f.kind != Kind::Dir || f.lower_path.is_some())
        {
            return Ok(false);
        }
        let top = lowers[0];
        let st = match sys::statat(self.dir_fd(p, top)?.as_fd(), name) {
            Ok(st) if Kind::from_mode(st.st_mode) == Kind::Dir => st,
            _ => {
                log::warn!("catalog out of date at {name:?}: looking it up in every layer");
                return Ok(false);
            }
        };
        let f = found.get_or_insert_with(|| Found::dir(st));
        f.lower_ino = Some(self.layers.union_ino(top, st.st_ino));
        f.layers.extend_from_slice(lowers);
        Ok(true)
    }

    /// Directory `p` as the catalog names it across mounts (its top lower copy).
    fn catalog_key(&self, p: &Node, lowers: &[usize]) -> DirKey {
        if p.id == ROOT_ID {
            return ROOT_KEY;
        }
        let top = lowers[0];
        (
            (top - self.layers.first_lower()) as u32,
            self.layers.real_ino(top, p.st_ino()),
        )
    }

    /// For a directory merged over many lower layers, its merged name index (a lookup then
    /// costs the same however deep the stack); None for a shallow one.
    pub(crate) fn merged_names(&self, p: &Node, layers: &[usize]) -> Result<Option<Arc<Merged>>> {
        let lower = |l: &usize| !self.layers.is_upper(*l);
        if layers.iter().filter(|l| lower(l)).count() <= MERGE_MIN_LAYERS {
            return Ok(None);
        }
        let lowers: Vec<usize> = layers.iter().copied().filter(lower).collect();
        let build = || {
            let key = self.catalog().map(|_| self.catalog_key(p, &lowers));
            if let (Some(c), Some(k)) = (self.catalog(), key)
                && let Some(m) = c.merged(k, &lowers)
            {
                return Ok(m);
            }
            let m = Arc::new(Merged::read(&lowers, |l| self.dir_fd(p, l))?);
            if let (Some(c), Some(k)) = (self.catalog(), key) {
                c.record_merged(k, &m);
            }
            Ok(m)
        };
        Ok(Some(self.names.merged(p.id, &lowers, build)?))
    }

    /// The lower layer of a directory (its `layers`, top first) that is looked at directly,
    /// by fstatat, not through its name set: the bottom one, where the look is one syscall
    /// either way and no `.wh.` file hides anything (reading its listing for that made a
    /// first lookup in a big directory read all of it). None under a merged index.
    pub(crate) fn direct_layer(&self, layers: &[usize], merged: bool) -> Option<usize> {
        let bottom = *layers.last()?;
        (!merged && !self.layers.is_upper(bottom)).then_some(bottom)
    }

    /// What lower layer `l` of directory `p` lists for `name` (no syscall once read).
    pub(crate) fn probe_lower(
        &self,
        p: &Node,
        merged: Option<&Merged>,
        l: usize,
        name: &OsStr,
    ) -> Result<Probe> {
        Ok(match merged {
            Some(m) => m.probe(name, l),
            None => {
                let dir = self.dir_fd(p, l)?;
                match self.names.get(p.id, l, dir.as_fd())?.probe(name) {
                    // The set holds hashes: a whiteout is confirmed before it hides a name.
                    Probe::WhitedOut if !format::has_oci_whiteout(dir.as_fd(), name) => {
                        Probe::Absent
                    }
                    probe => probe,
                }
            }
        })
    }

    /// What upper non-directory `pfd/name` (stat `st`) of directory `p` resolves to.
    pub(crate) fn found_upper(
        &self,
        p: &Node,
        pfd: &Arc<OwnedFd>,
        name: &OsStr,
        st: Stat,
    ) -> Result<Option<Found>> {
        let mut found = None;
        self.step(&mut found, 0, pfd, name, st, Some((p, &p.state())))?;
        Ok(found)
    }

    /// Merge one real entry found in layer `l` into `found`.
    fn step(
        &self,
        found: &mut Option<Found>,
        l: usize,
        pfd: &Arc<OwnedFd>,
        name: &OsStr,
        st: Stat,
        parent: Option<(&Node, &NodeState)>,
    ) -> Result<Step> {
        if sys::is_whiteout_stat(&st) {
            return Ok(Step::Stop);
        }
        let kind = Kind::from_mode(st.st_mode);
        if kind != Kind::Dir {
            if found.is_none() {
                let x = XTarget::At(pfd.as_fd(), name);
                // An upper file may carry several markers (origin, metacopy, ...), an empty
                // one may be an xwhiteout: one listxattr tells which to read (most objects
                // carry none). A lower file with data is asked for its metacopy mark alone.
                let upper = self.layers.is_upper(l);
                let empty = format::may_be_xwhiteout(&st);
                let marks = (upper || empty).then(|| sys::listxattr(x).ok()).flatten();
                let ns = self.cfg.marker_ns;
                let has = |m: &std::ffi::CStr| {
                    marks
                        .as_ref()
                        .is_none_or(|v| v.iter().any(|n| n.as_slice() == m.to_bytes()))
                };
                // An xwhiteout (an empty file marked as a whiteout) ends the lookup as a
                // whiteout does.
                if empty
                    && marks
                        .as_ref()
                        .is_some_and(|v| v.iter().any(|n| format::is_xwhiteout_xattr(n)))
                {
                    return Ok(Step::Stop);
                }
                // Every regular file, empty ones too, as ovl_lookup_single: a marked empty
                // file whose data is missing is EIO (EPERM without metacopy=on).
                let data = match (kind, parent) {
                    (Kind::File, Some(p)) if has(ns.metacopy()) => {
                        self.metacopy_data(l, pfd, name, p)?
                    }
                    _ => None,
                };
                let (lower_ino, indexed) = match upper && has(ns.origin()) {
                    true => self.copy_origin(x, st.st_ino).unzip(),
                    false => (None, None),
                };
                // Our whole copy of what the kernel would copy metadata-only: its moves
                // refuse where the kernel's redirect would be too long, after a remount and
                // through every name of a hard link alike (metacopy soak, seed 1400009).
                let whole_copy = match upper && self.cfg.metacopy && has(ns.whole_copy()) {
                    true => sys::getxattr(x, ns.whole_copy())?,
                    false => None,
                };
                let kernel_redirect = whole_copy
                    .as_deref()
                    .filter(|v| !v.is_empty())
                    .and_then(format::redirect_components);
                *found = Some(Found {
                    kind,
                    layers: smallvec::smallvec![l],
                    top: st,
                    lower_path: None,
                    redirect_layer: 0,
                    lower_ino,
                    impure: false,
                    indexed: indexed.unwrap_or(false),
                    fds: Vec::new(),
                    data,
                    kernel_meta: whole_copy.is_some(),
                    kernel_redirect: kernel_redirect.map(Vec::into_boxed_slice),
                });
            }
            // A non-directory hides everything below, whether it is on top or under a dir.
            return Ok(Step::Stop);
        }
        let dfd = Arc::new(self.open_subdir(pfd.as_fd(), name)?);
        let f = found.get_or_insert_with(|| Found::dir(st));
        if f.lower_ino.is_none() && !self.layers.is_upper(l) {
            f.lower_ino = Some(self.layers.union_ino(l, st.st_ino));
        }
        f.layers.push(l);
        // The bottom layer: an opaque or redirect marker there hides or points at nothing, so
        // the kernel doesn't read them (ovl_lookup_single, d->last), nor do we. That saves an
        // xattr read and a lookup inside every bottom-layer subdirectory (a read of its
        // directory block on a cold cache, for a stat of the directory alone).
        let markers = (l + 1 < self.layers.len())
            .then(|| format::dir_markers_of(XTarget::At(pfd.as_fd(), name), dfd.as_fd()));
        f.fds.push((l, dfd));
        let Some(markers) = markers else {
            return Ok(Step::Stop);
        };
        if self.layers.is_upper(l) {
            f.impure = markers.impure;
        }
        if markers.opaque {
            return Ok(Step::Stop);
        }
        if let Some(r) = markers.redirect {
            let base = match parent {
                Some((p, ps)) => self.lower_path_of(p, ps)?,
                None => f
                    .lower_path
                    .as_ref()
                    .map(|p| p[..p.len().saturating_sub(1)].to_vec())
                    .unwrap_or_default(),
            };
            let Some(path) = redirect_target(&base, &r) else {
                log::warn!(
                    "ignoring malformed redirect {:?}",
                    String::from_utf8_lossy(&r)
                );
                return Ok(Step::Stop);
            };
            f.lower_path = Some(Arc::new(path.clone()));
            f.redirect_layer = l;
            self.merge_redirected(found, l, &path)?;
            return Ok(Step::Stop);
        }
        Ok(Step::Continue)
    }

    /// Continue a directory's merge below layer `from` at `path` (a redirect), layer by layer.
    fn merge_redirected(
        &self,
        found: &mut Option<Found>,
        from: usize,
        path: &[OsString],
    ) -> Result<()> {
        let Some((last, dirs)) = path.split_last() else {
            return Ok(());
        };
        for l in from + 1..self.layers.len() {
            // As the kernel walks a redirect: an opaque directory on the way still lets this
            // layer's copy in, but no layer below it (found by the soak, seed 2004).
            let (fd, last_layer) = match self.walk_dirs(l, dirs)? {
                LayerWalk::Dir(fd, opaque) => (fd, opaque),
                LayerWalk::Missing => continue,
                LayerWalk::Blocked => return Ok(()),
            };
            let st = match sys::statat(fd.as_fd(), last) {
                Ok(st) => st,
                Err(_) => {
                    if last_layer || format::has_oci_whiteout(fd.as_fd(), last) {
                        return Ok(());
                    }
                    continue;
                }
            };
            let before = found.as_ref().map(|f| f.redirect_layer);
            match self.step(found, l, &fd, last, st, None)? {
                Step::Continue if !last_layer => {}
                _ => return Ok(()),
            }
            // A nested redirect inside step() already merged the rest.
            if found.as_ref().map(|f| f.redirect_layer) != before {
                return Ok(());
            }
        }
        Ok(())
    }

    /// For a regular file in layer `l` that is a metadata-only copy: where its data is.
    fn metacopy_data(
        &self,
        l: usize,
        pfd: &Arc<OwnedFd>,
        name: &OsStr,
        (p, ps): (&Node, &NodeState),
    ) -> Result<Option<Arc<DataSrc>>> {
        let ns = self.cfg.marker_ns;
        if !self.metacopy_mark(pfd.as_fd(), name)? {
            return Ok(None);
        }
        let base = self.lower_path_of(p, ps)?;
        let mut own = base.clone();
        own.push(name.to_os_string());
        let redirect =
            sys::getxattr(XTarget::At(pfd.as_fd(), name), ns.redirect())?.filter(|r| !r.is_empty());
        let absolute = redirect.as_ref().filter(|r| r.first() == Some(&b'/'));
        let upper = self.layers.is_upper(l);
        if !self.cfg.metacopy {
            // Data-only layers let a lower copy in the last lower layer point into them
            // without metacopy=on: the kernel's lookup has no layer left to refuse at, and
            // defers the data's lookup (ovl_lookup: "don't require metacopy=on").
            if let Some(r) = absolute
                && !upper
                && l + 1 == self.layers.len()
                && !self.layers.data_only().is_empty()
            {
                return Ok(Some(DataSrc::new(DataAt::Deferred(r.clone()), own, l)));
            }
            // As the kernel without metacopy=on: never follow (the file's own data is a hole).
            log::warn!("refusing to follow metacopy file {name:?} (mount with metacopy=on)");
            return Err(err(libc::EPERM));
        }
        let path = match &redirect {
            Some(r) => match redirect_target(&base, r) {
                Some(p) => p,
                // A `..` in an absolute one: the walk of the layers below refuses it where it
                // gets that far; where none does only the data-only layers see it, beneath
                // their roots (metacopy soaks over data-only layers, seeds 1130003, 1130004).
                None if absolute.is_some() => {
                    self.walk_to_dotdot(l, r)?;
                    Vec::new()
                }
                None => return Err(err(libc::EIO)),
            },
            None => own.clone(),
        };
        // By its name or a relative redirect the data is looked up in the layers the parent
        // directory merges (an opaque one below ends them); an absolute redirect looks from
        // every layer's root, as the kernel's lookup switches to the root's stack.
        let within = match absolute {
            Some(_) => None,
            None => Some(ps.layers.as_slice()),
        };
        // An upper copy's first lower object is where its redirect points; a lower copy is
        // its own first lower object.
        let chain = Chain {
            first: (!upper).then_some(l),
            first_lower: if upper { path.clone() } else { own },
            deferred: absolute.cloned(),
        };
        self.find_data(l, path, within, chain).map(Some)
    }

    /// The first full regular file at `path` below layer `above`, following the redirect of
    /// every metadata-only copy met on the way, as the kernel's lookup does (layers it wrote
    /// with metacopy=on and then stacked as lowers hold such chains).
    /// `within`: the only layers a search by name may use (the parent directory's), until
    /// an absolute redirect. `chain`: what is known of the way so far.
    fn find_data(
        &self,
        above: usize,
        mut path: Vec<OsString>,
        mut within: Option<&[usize]>,
        mut chain: Chain,
    ) -> Result<Arc<DataSrc>> {
        let mut l = above + 1;
        while l < self.layers.len() {
            if within.is_some_and(|w| !w.contains(&l)) {
                l += 1;
                continue;
            }
            let Some((last, dirs)) = path.split_last() else {
                break; // (a `..` redirect no layer walked: see walk_to_dotdot)
            };
            // The same walk as a redirect's: the data is the file the lower layers' union
            // shows at `path`, so a whiteout, a non-directory or an opaque directory on the
            // way ends the search as it ends a lookup.
            let (walk, passed) = self.walk_dirs_noting(l, dirs)?;
            if passed {
                // Data-only layers are searched only for a chain whose last redirect check
                // found an absolute one: a directory passed on the way ends that, so a
                // chain stopping below it fails (EIO), as the kernel's (metacopy soak with
                // data-only layers, seed 1530936).
                chain.deferred = None;
            }
            let (fd, last_layer) = match walk {
                LayerWalk::Dir(fd, opaque) => (fd, opaque),
                LayerWalk::Missing => {
                    l += 1;
                    continue;
                }
                LayerWalk::Blocked => break,
            };
            let st = match sys::statat(fd.as_fd(), last) {
                Ok(st) => st,
                Err(_) if last_layer || format::has_oci_whiteout(fd.as_fd(), last) => break,
                Err(_) => {
                    l += 1;
                    continue;
                }
            };
            if Kind::from_mode(st.st_mode) != Kind::File
                || format::is_whiteout_at(fd.as_fd(), last, &st)
            {
                break; // a whiteout or another kind of object: the data is gone
            }
            let first_layer = *chain.first.get_or_insert(l);
            let ns = self.cfg.marker_ns;
            if self.metacopy_mark(fd.as_fd(), last)? {
                // Metadata only here too: the data is further down, where this copy's own
                // redirect says (ovl_check_redirect), or at its own path. An opaque
                // directory passed on the way ends nothing (the kernel sets d->stop there,
                // then clears it at a metadata-only copy); by name, the parent's layers
                // (`within`) already end at one.
                let redirect = sys::getxattr(XTarget::At(fd.as_fd(), last), ns.redirect())?
                    .filter(|r| !r.is_empty());
                chain.deferred = redirect.clone().filter(|r| r.first() == Some(&b'/'));
                if let Some(r) = redirect {
                    let absolute = r.first() == Some(&b'/');
                    path = match redirect_target(dirs, &r) {
                        Some(p) => p,
                        // (As above: for the data-only layers, if no walk refuses it.)
                        None if absolute => {
                            self.walk_to_dotdot(l, &r)?;
                            break;
                        }
                        None => return Err(err(libc::EIO)),
                    };
                    if absolute {
                        within = None;
                    }
                }
                l += 1;
                continue;
            }
            let at = DataAt::File {
                layer: l,
                blocks: st.st_blocks,
                path,
            };
            return Ok(DataSrc::new(at, chain.first_lower, first_layer));
        }
        // Not in the tree's layers: a lower copy whose last redirect is absolute has its data
        // in a data-only layer, looked up when first needed (as the kernel: a lower object
        // found, `d.absolute_redirect`, data layers present).
        if let (Some(first_layer), Some(r)) = (chain.first, chain.deferred)
            && !self.layers.data_only().is_empty()
        {
            return Ok(DataSrc::new(
                DataAt::Deferred(r),
                chain.first_lower,
                first_layer,
            ));
        }
        log::warn!(
            "metacopy file {} has no lower data",
            format::show_path(&path)
        );
        Err(err(libc::EIO))
    }

    /// An absolute redirect with a `..` component, as the kernel's lookup walks it in each
    /// layer below `above`, one component at a time: the `..` itself is refused (EACCES)
    /// wherever the components before it all are directories; a missing one moves on to the
    /// next layer, a whiteout, a non-directory or an opaque directory ends the walk (Ok:
    /// nothing found, which leaves the data-only layers).
    fn walk_to_dotdot(&self, above: usize, raw: &[u8]) -> Result<()> {
        let before: Vec<OsString> = walked_components(raw)
            .take_while(|c| *c != b"..")
            .map(|c| OsStr::from_bytes(c).to_os_string())
            .collect();
        for l in above + 1..self.layers.len() {
            match self.walk_dirs(l, &before)? {
                LayerWalk::Dir(..) => return Err(err(libc::EACCES)),
                LayerWalk::Missing => continue,
                LayerWalk::Blocked => return Ok(()),
            }
        }
        Ok(())
    }

    /// Whether `dir/name` carries the metacopy mark. One too short to be the kernel's
    /// header fails the lookup, as ovl_check_metacopy_xattr (EIO).
    fn metacopy_mark(&self, dir: BorrowedFd<'_>, name: &OsStr) -> Result<bool> {
        match sys::getxattr(XTarget::At(dir, name), self.cfg.marker_ns.metacopy())? {
            None => Ok(false),
            Some(v) if format::metacopy_mark_is_invalid(&v) => {
                log::warn!("metacopy file {name:?} has too small a mark");
                Err(err(libc::EIO))
            }
            Some(_) => Ok(true),
        }
    }

    /// Look the data of a deferred metadata-only copy up in the data-only layers, top first,
    /// as ovl_lookup_data_layers: a plain walk beneath each one's root (no symlinks, no
    /// markers) to a regular file. The last layer's error if none has it.
    pub(crate) fn find_in_data_layers(
        &self,
        redirect: &[u8],
    ) -> Result<(usize, Vec<OsString>, Stat)> {
        let mut last = err(libc::ENOENT);
        for l in self.layers.data_only() {
            match self.data_file_in(l, redirect) {
                Ok((path, st)) => return Ok((l, path, st)),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// `redirect` beneath the root of layer `l`: its components and the regular file's stat.
    fn data_file_in(&self, l: usize, redirect: &[u8]) -> Result<(Vec<OsString>, Stat)> {
        let comps: Vec<&[u8]> = walked_components(redirect).collect();
        let Some((last, dirs)) = comps.split_last() else {
            return Err(err(libc::ENOENT)); // the root: not a regular file
        };
        let mut stack: Vec<(Arc<OwnedFd>, OsString)> = Vec::new();
        let root = self.layers.layers[l].root.clone();
        let top = |stack: &Vec<(Arc<OwnedFd>, OsString)>| {
            stack.last().map_or(root.clone(), |e| e.0.clone())
        };
        for c in dirs {
            if *c == b".." {
                // LOOKUP_BENEATH: never above the layer's root.
                stack.pop().ok_or_else(|| err(libc::EXDEV))?;
                continue;
            }
            let name = OsStr::from_bytes(c);
            let fd = top(&stack);
            let st = sys::statat(fd.as_fd(), name)?;
            match Kind::from_mode(st.st_mode) {
                Kind::Dir => {}
                Kind::Symlink => return Err(err(libc::ELOOP)),
                _ => return Err(err(libc::ENOTDIR)),
            }
            let next = self.open_subdir(fd.as_fd(), name)?;
            stack.push((Arc::new(next), name.to_os_string()));
        }
        if *last == b".." {
            stack.pop().ok_or_else(|| err(libc::EXDEV))?;
            return Err(err(libc::ENOENT)); // a directory
        }
        let name = OsStr::from_bytes(last);
        let st = sys::statat(top(&stack).as_fd(), name)?;
        if Kind::from_mode(st.st_mode) != Kind::File {
            return Err(err(libc::ENOENT));
        }
        let mut path: Vec<OsString> = stack.into_iter().map(|e| e.1).collect();
        path.push(name.to_os_string());
        Ok((path, st))
    }

    /// Walk the directories of lower path `dirs` in layer `l`, as the kernel's
    /// ovl_lookup_layer does.
    fn walk_dirs(&self, l: usize, dirs: &[OsString]) -> Result<LayerWalk> {
        Ok(self.walk_dirs_noting(l, dirs)?.0)
    }

    /// `walk_dirs`, and whether it passed a directory that is not opaque: the kernel's
    /// lookup checks each such directory for a redirect, which forgets whether the last
    /// redirect read was absolute (ovl_check_redirect).
    fn walk_dirs_noting(&self, l: usize, dirs: &[OsString]) -> Result<(LayerWalk, bool)> {
        let mut fd = self.layers.layers[l].root.clone();
        let (mut opaque, mut passed) = (false, false);
        for c in dirs {
            // One open per component: ENOTDIR is a non-directory (a whiteout, a symlink:
            // O_NOFOLLOW) standing there.
            match self.open_subdir(fd.as_fd(), c) {
                Ok(next) => {
                    let here =
                        format::dir_markers_of(XTarget::At(fd.as_fd(), c), next.as_fd()).opaque;
                    passed |= !here;
                    opaque |= here;
                    fd = Arc::new(next);
                }
                Err(e) if e.errno() == libc::ENOTDIR => {
                    return Ok((LayerWalk::Blocked, passed));
                }
                Err(_) if format::has_oci_whiteout(fd.as_fd(), c) => {
                    return Ok((LayerWalk::Blocked, passed));
                }
                // An opaque directory passed on the way hides the layers below even where the
                // rest of the path is missing here (the kernel's lookup stops at it).
                Err(_) if opaque => return Ok((LayerWalk::Blocked, passed)),
                Err(_) => return Ok((LayerWalk::Missing, passed)),
            }
        }
        Ok((LayerWalk::Dir(fd, opaque), passed))
    }

    /// The path of directory `p` in the lower layers: its redirect target, else its parent's
    /// lower path and its name, up to the nearest redirected ancestor (as the kernel builds
    /// redirects: a directory inside a renamed one lives under the rename's target).
    pub(crate) fn lower_path_of(&self, p: &Node, ps: &NodeState) -> Result<Vec<OsString>> {
        if let Some(lp) = &ps.lower_path {
            return Ok(lp.as_ref().clone());
        }
        if p.id == ROOT_ID {
            return Ok(Vec::new());
        }
        let mut names = vec![ps.name.to_os_string()];
        let mut cur = ps.parent;
        let mut prefix = Vec::new();
        while cur != ROOT_ID {
            let n = self.node(cur)?;
            let s = n.state.read().expect("node state lock");
            if let Some(lp) = &s.lower_path {
                prefix = lp.as_ref().clone();
                break;
            }
            names.push(s.name.to_os_string());
            cur = s.parent;
        }
        names.reverse();
        prefix.extend(names);
        Ok(prefix)
    }
}

/// What a lookup knows of a metadata-only copy's chain of lower objects so far.
struct Chain {
    /// The layer of its topmost lower object, once one is found.
    first: Option<usize>,
    /// That object's path (or, before it is found, where it is looked for).
    first_lower: Vec<OsString>,
    /// The last redirect read, if absolute: where the data-only layers are searched.
    deferred: Option<Vec<u8>>,
}

/// The components of a path as a walk takes them: empty ones and `.` skipped, `..` kept.
fn walked_components(raw: &[u8]) -> impl Iterator<Item = &[u8]> {
    raw.split(|&b| b == b'/')
        .filter(|c| !c.is_empty() && *c != b".")
}

/// Where a redirect points: absolute from the layer root, or a sibling name under `base`'s
/// parent directory (`base` being the parent's lower path).
fn redirect_target(base: &[OsString], raw: &[u8]) -> Option<Vec<OsString>> {
    let comps = format::redirect_components(raw)?;
    if comps.is_empty() {
        return None;
    }
    if raw.first() == Some(&b'/') {
        Some(comps)
    } else {
        let mut p = base.to_vec();
        p.extend(comps);
        Some(p)
    }
}
