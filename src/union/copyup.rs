//! Copy-up: bring a lower object into the upper layer, atomically and with its metadata.
//!
//! The copy is built in the work directory (data, owner, mode, times, xattrs, fsync), then
//! renamed into place; a crash leaves either the lower view or the complete copy. Parents are
//! copied up first and their times restored afterwards, as the kernel does.

use std::ffi::{CString, OsStr};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use super::format;
use super::node::{DataAt, DataSrc, Kind, Node, ROOT_ID};
use super::real::Real;
use super::{Union, Verity};
use crate::error::{Result, err};
use crate::sys::{self, Stat, XTarget};
use std::sync::atomic::Ordering::{Relaxed, SeqCst};

/// Rounds of linking up a hard link's names that lookups joined during its copy-up.
const COPY_LINK_ROUNDS: usize = 8;

/// How much of a file a copy-up brings along.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Data {
    /// All data (a write, chmod, link... of a lower file).
    All,
    /// None: the file is about to be truncated to zero (O_TRUNC open, truncate(0)).
    Empty,
    /// Metadata only where the mount allows it (`metacopy=on`: chmod, chown, utimes, xattrs,
    /// rename of a lower file); the data stays in the lower layer until a write needs it.
    Meta,
}

/// How `copy_up_one` ended: the node is in the upper layer (copied now or already), or the
/// name it is reachable by now is in a directory not copied up yet.
enum Landed {
    Done,
    NeedsParent,
}

impl Union {
    fn require_upper(&self) -> Result<()> {
        if !self.writable() {
            return Err(err(libc::EROFS));
        }
        Ok(())
    }

    /// Make sure `node` exists in the upper layer (copying its parents first).
    pub(crate) fn copy_up(&self, node: &Arc<Node>, data: Data) -> Result<()> {
        self.require_upper()?;
        if node.kind == Kind::File {
            // As the kernel before any copy-up (ovl_copy_up_flags): data in a data-only layer
            // is looked up first and its digest checked; either failing fails the change.
            self.verified_data(node)?;
        }
        if node.top_layer() == 0 {
            if data != Data::Meta {
                // Every change in a directory asks this of it: a read lock, a write one rarely.
                let (meta, kernel_meta) = {
                    let s = node.state.read().expect("node state lock");
                    (s.data.is_some(), s.kernel_meta)
                };
                if kernel_meta {
                    // The kernel's copy would get its data now: it moves like any file.
                    let x = self.cfg.marker_ns.whole_copy();
                    self.with_real(node, |r| Ok(sys::removexattr_if_present(r.xtarget(), x)?))?;
                    let mut s = node.state.write().expect("node state lock");
                    s.kernel_meta = false;
                    s.kernel_redirect = None;
                    s.shrink();
                }
                if meta {
                    return self.copy_up_data(node, data);
                }
            }
            return Ok(());
        }
        // A hard link's names can change while this runs: the kernel may forget the
        // directories of one name (memory pressure; their FORGETs served meanwhile), which
        // then goes (`prune_names`), and the copy lands by a name left, whose ancestors may
        // need copying first. So a copy that lost its way is tried again by the name left.
        let mut tries = 0;
        loop {
            tries += 1;
            let lost = match self.copy_up_by_a_name(node, data) {
                Ok(Landed::Done) => return Ok(()),
                Ok(Landed::NeedsParent) => err(libc::ESTALE),
                Err(e) if e.errno() == libc::ESTALE => e,
                Err(e) => return Err(e),
            };
            if tries == 3 {
                return Err(lost);
            }
        }
    }

    /// Ancestors first, root down, so every copy has an upper parent to land in: those of a
    /// name the node can be reached by.
    fn copy_up_by_a_name(&self, node: &Arc<Node>, data: Data) -> Result<Landed> {
        let mut chain = Vec::new();
        let (mut cur, _) = self.reachable_name(node)?;
        while cur.id != ROOT_ID && cur.top_layer() != 0 {
            let up = cur.state.read().expect("node state lock").parent;
            chain.push(cur);
            cur = self.node(up)?;
        }
        for anc in chain.iter().rev() {
            if let Landed::NeedsParent = self.copy_up_one(anc, Data::All)? {
                return Ok(Landed::NeedsParent);
            }
        }
        self.copy_up_one(node, data)
    }

    fn copy_up_one(&self, node: &Arc<Node>, data: Data) -> Result<Landed> {
        let _g = node.copy_lock.lock().expect("copy lock");
        let st = node.state();
        if st.layers[0] == 0 {
            return Ok(Landed::Done); // another opener won the race
        }
        if st.unlinked && node.is_dir() {
            return Err(err(self.removed_dir_copy_up(&st)));
        }
        if st.unlinked {
            // A lower file changed through an fd after its last name went (fchmod, fsetxattr):
            // the kernel copies it up to the name it had, where a whiteout or another entry
            // now is (EEXIST), or into a directory since removed (ENOENT).
            let parent_gone = self
                .node(st.parent)
                .map_or(true, |p| p.state.read().expect("node state lock").unlinked);
            return Err(err(if parent_gone {
                libc::ENOENT
            } else {
                libc::EEXIST
            }));
        }
        let work = self.work.as_ref().ok_or_else(|| err(libc::EROFS))?;
        let started = std::time::Instant::now();
        // The name the copy lands by: the first still reachable. The parent is held here, so
        // a FORGET of it from now on does not matter.
        let (parent, name) = self.reachable_name(node)?;
        if parent.top_layer() != 0 {
            return Ok(Landed::NeedsParent);
        }
        let src = self.real_in(node, st.layers[0])?;
        let sst = src.stat()?;
        let upper_parent = self.dir_fd(&parent, 0)?;
        let parent_times = sys::fstat(upper_parent.as_fd())?;
        let wfd = work.fd.clone();
        let tmp = work.temp_name();

        let may_meta = data == Data::Meta && self.cfg.metacopy && node.kind == Kind::File;
        // With verity=on|require a metadata-only copy records its data's fs-verity digest;
        // with require, data without one is copied whole (the kernel's ovl_need_meta_copy_up
        // falls back so).
        let digest = match (may_meta, self.cfg.verity) {
            (true, Verity::On | Verity::Require) => {
                let data_file = match &st.data {
                    Some(d) => self.data_real(d)?,
                    None => src.clone(),
                };
                sys::measure_verity(data_file.open(libc::O_RDONLY, false)?.as_fd())?
            }
            _ => None,
        };
        let may_meta = may_meta && !(self.cfg.verity == Verity::Require && digest.is_none());
        // Hard links copy whole (their other names must stay one file with full data).
        let meta = may_meta && sst.st_size > 0 && sst.st_nlink == 1;
        // The kernel would have copied it metadata-only all the same.
        let kernel_meta = may_meta && !meta;
        let data = if data == Data::Meta && !meta {
            Data::All
        } else {
            data
        };
        // The data comes from the source itself or, for a lower metadata-only copy, from its
        // data file; a new metadata-only copy points at that (with a redirect if elsewhere).
        let (fill, meta_src) = match (data, &st.data) {
            (Data::Empty, _) => (Fill::Nothing, None),
            (Data::Meta, d) => {
                let mut here = self.lower_path_of(&parent, &parent.state())?;
                here.push(name.to_os_string());
                let redirect = d
                    .as_ref()
                    .filter(|d| d.first_lower != here)
                    .map(|d| format::absolute_path(&d.first_lower));
                let d = d.clone().unwrap_or_else(|| {
                    let at = DataAt::File {
                        layer: st.layers[0],
                        path: here.clone(),
                        blocks: sst.st_blocks,
                    };
                    DataSrc::new(at, here, st.layers[0])
                });
                (
                    Fill::Meta(redirect, format::metacopy_value(digest.as_ref())),
                    Some(d),
                )
            }
            (_, Some(d)) => (Fill::Data(self.data_real(d)?), None),
            (_, None) => (Fill::Data(src.clone()), None),
        };

        let built = self
            .build_copy(wfd.as_fd(), &tmp, &src, &sst, node.kind, &fill)
            .and_then(|()| {
                // On the copy itself, so the hard link's other names and a remount know it.
                if kernel_meta {
                    let t = XTarget::At(wfd.as_fd(), &tmp);
                    sys::setxattr(t, self.cfg.marker_ns.whole_copy(), b"", 0)?;
                }
                Ok(())
            });
        if let Err(e) = built {
            let _ = super::workdir::remove_tree(wfd.as_fd(), &tmp, 0);
            return Err(e);
        }
        // The copy keeps the lower object's inode number (origin.rs); directories keep
        // theirs through their lower copies.
        let origin = (node.kind != Kind::Dir)
            .then(|| self.origin_of(&src, st.layers[0]))
            .flatten()
            .map(|o| o.encode())
            .filter(|o| {
                let t = XTarget::At(wfd.as_fd(), &tmp);
                sys::setxattr(t, self.cfg.marker_ns.origin(), o, 0)
                    .inspect_err(|e| log::warn!("copy-up of {name:?}: no origin: {e}"))
                    .is_ok()
            });
        let index_key = self.index_copy(origin.as_deref(), &sst, wfd.as_fd(), &tmp);
        self.mark_impure(&parent);
        if let Err(e) = sys::renameat2(
            wfd.as_fd(),
            &tmp,
            upper_parent.as_fd(),
            &name,
            sys::RENAME_NOREPLACE,
        ) {
            if let Some(key) = &index_key {
                self.unindex(key);
            }
            let _ = super::workdir::remove_tree(wfd.as_fd(), &tmp, 0);
            return Err(e.into());
        }
        // The copy's data was fsynced before the rename; the directory is not (as the
        // kernel): a journaling filesystem commits the rename with the next fsync of the file,
        // and until then a crash shows the lower object, never a partial copy.
        restore_times(upper_parent.as_fd(), &parent_times);

        let publish = |s: &mut super::node::NodeState| {
            if node.is_dir() {
                s.layers.insert(0, 0);
            } else {
                s.layers = smallvec::smallvec![0];
            }
            s.data = meta_src.clone();
            s.kernel_meta = kernel_meta;
            s.indexed = index_key.is_some();
            s.shrink();
            self.copies.fetch_add(1, SeqCst);
        };
        // Other names of a lower hard link stay one file: link them up beside the copy. Names
        // in directories the kernel forgot are dropped (`prune_names`): looked up again, they
        // are linked up then, through the live node or the index. They link from the index
        // entry where there is one: the copy's own name may meanwhile be whited out by an
        // unlink in another directory.
        let src = match &index_key {
            Some(key) => LinkSrc::Index(key),
            None => LinkSrc::Name(&parent, &name),
        };
        // The node shows the copy only once every name it has is in the upper layer: a name
        // it showed the copy by before that was linked up could be its first (its first
        // removed meanwhile) and not be there (an unlink's fd on the file then failed, and
        // the node, once its last name went, answered by a whiteout; engine fuzz `races`).
        // A name a lookup adds meanwhile is linked up too; once shown, lookups link theirs up
        // from the index themselves (`NodeTable::join`).
        let mut linked = vec![(parent.id, name.clone())];
        let mut rounds = 0;
        let all_linked = loop {
            rounds += 1;
            let left: Vec<_> = self
                .prune_names(node)
                .into_iter()
                .filter(|(d, n)| !linked.iter().any(|(p, m)| (*p, &**m) == (d.id, &**n)))
                .collect();
            if left.is_empty() {
                let mut s = node.state.write().expect("node state lock");
                let known = |p: u64, n: &OsStr| linked.iter().any(|(q, m)| (*q, &**m) == (p, n));
                // (A name whose directory the kernel forgot is dropped by the next round; a
                // few rounds at most, lookups joining or not.)
                if rounds == COPY_LINK_ROUNDS || s.named().all(|(p, n)| known(p, &n)) {
                    publish(&mut s);
                    break Ok(());
                }
                continue;
            }
            if let Err(e) = left
                .iter()
                .try_for_each(|(dir, an)| self.link_up_at(src, dir.id, an))
            {
                break Err(e);
            }
            linked.extend(left.into_iter().map(|(d, n)| (d.id, n)));
        };
        if let Err(e) = all_linked {
            // The copy is in place: the node shows it all the same.
            publish(&mut node.state.write().expect("node state lock"));
            return Err(e);
        }
        // nlink (a dir becomes merged), ctime and a broken hard link's count change.
        self.attrs_changed(node.id);
        let bytes = (node.kind == Kind::File && data == Data::All).then_some(sst.st_size as u64);
        let from = match (&st.data, meta) {
            (Some(d), false) => d.layer().unwrap_or(st.layers[0]),
            _ => st.layers[0],
        };
        self.copied_up(&st, from, bytes, started.elapsed());
        log::debug!("copied up {name:?} (node {}, {data:?})", node.id);
        Ok(Landed::Done)
    }

    /// What a change to a removed lower directory answers (the kernel copies it up to its
    /// old name): ENOTDIR where the whiteout its rmdir left is there, as the kernel's rename
    /// of the copy over it; ENOENT otherwise. Where a rename put an empty directory there,
    /// the kernel replaces that one on disk, and it is gone after a remount: a kernel bug not
    /// copied (`write_path::a_removed_directory_still_held_answers_as_itself_as_in_the_kernel`).
    fn removed_dir_copy_up(&self, st: &super::node::NodeState) -> i32 {
        let whiteout_left = self
            .node(st.parent)
            .ok()
            .filter(|p| !p.state.read().expect("node state lock").unlinked)
            .and_then(|p| self.dir_fd(&p, 0).ok())
            .is_some_and(|dir| {
                sys::statat(dir.as_fd(), &st.name)
                    .is_ok_and(|s| format::is_whiteout_at(dir.as_fd(), &st.name, &s))
            });
        if whiteout_left {
            libc::ENOTDIR
        } else {
            libc::ENOENT
        }
    }

    /// Build the copy of `src` as `tmp` in the work directory.
    fn build_copy(
        &self,
        wfd: BorrowedFd<'_>,
        tmp: &OsStr,
        src: &Real,
        sst: &Stat,
        kind: Kind,
        fill: &Fill,
    ) -> Result<()> {
        let perm = sst.st_mode & 0o7777;
        // Did the copy write data (not a clone of the lower file's extents)?
        let mut wrote = false;
        let file: Option<OwnedFd> = match kind {
            Kind::File => {
                let dst =
                    sys::openat(wfd, tmp, libc::O_CREAT | libc::O_EXCL | libc::O_RDWR, 0o600)?;
                match fill {
                    Fill::Data(from) if sst.st_size > 0 => {
                        let sfd = from.open(libc::O_RDONLY, false)?;
                        let size = sst.st_size as u64;
                        wrote = !copy_data(sfd.as_fd(), dst.as_fd(), size, self.cfg.fsync)?;
                    }
                    // A hole of the file's size, as the kernel writes it: stat shows the size.
                    Fill::Meta(..) => sys::ftruncate(dst.as_fd(), sst.st_size as u64)?,
                    _ => {}
                }
                Some(dst)
            }
            Kind::Dir => {
                sys::mkdirat(wfd, tmp, 0o700)?;
                None
            }
            Kind::Symlink => {
                sys::symlinkat(&src.readlink()?, wfd, tmp)?;
                None
            }
            Kind::Fifo | Kind::Socket | Kind::CharDev | Kind::BlockDev => {
                sys::mknodat(wfd, tmp, sst.st_mode, sst.st_rdev)?;
                None
            }
        };
        // chown first: it clears set-id bits and security.capability.
        let chowned = sys::chownat(wfd, tmp, sst.st_uid, sst.st_gid);
        copy_xattrs(src.xtarget(), XTarget::At(wfd, tmp))?;
        if matches!(kind, Kind::File | Kind::Dir) {
            let fd = file.as_ref().map(|f| f.as_fd());
            self.copy_fileattr(src, kind == Kind::Dir, wfd, tmp, fd)?;
        }
        if let Fill::Meta(redirect, mark) = fill {
            let ns = self.cfg.marker_ns;
            sys::setxattr(XTarget::At(wfd, tmp), ns.metacopy(), mark, 0)?;
            if let Some(r) = redirect {
                sys::setxattr(XTarget::At(wfd, tmp), ns.redirect(), r, 0)?;
            }
        }
        match chowned {
            Ok(()) => {}
            // Unprivileged: the copy is ours. With xattr_permissions the owner lives on in the
            // override xattr (copied above, or written now from the real owner).
            Err(e) if e.raw_os_error() == Some(libc::EPERM) && sys::geteuid() != 0 => {
                if let Some(x) = self.cfg.ids.xattr
                    && src.getxattr(x).is_err()
                {
                    let v = super::ids::format_override(sst.st_uid, sst.st_gid, sst.st_mode);
                    sys::setxattr(XTarget::At(wfd, tmp), x, &v, 0)?;
                }
            }
            Err(e) => return Err(e.into()),
        }
        if kind != Kind::Symlink {
            sys::chmodat(wfd, tmp, perm)?;
        }
        sys::utimensat(
            wfd,
            tmp,
            Some(Some((sst.st_atime, sst.st_atime_nsec))),
            Some(Some((sst.st_mtime, sst.st_mtime_nsec))),
        )?;
        // Only written data needs its fsync before the rename (as the kernel): metadata,
        // a reflink's shared extents included, reaches the journal in order, so a crash
        // shows the lower object or the whole copy.
        if let (Some(f), true) = (file, self.cfg.fsync && wrote) {
            sys::fsync(f.as_fd(), false)?;
        }
        Ok(())
    }
}

/// What a copied-up file is filled with.
enum Fill {
    Nothing,
    Data(Real),
    /// No data: a metadata-only copy (with the redirect to its data, if not at its own path).
    /// The second field is the metacopy mark's value (with the data's fs-verity digest).
    Meta(Option<Vec<u8>>, Vec<u8>),
}

impl Union {
    /// The data file of a metadata-only copy.
    pub(crate) fn data_real(&self, d: &DataSrc) -> Result<Real> {
        let found;
        let (layer, path) = match &d.at {
            DataAt::File { layer, path, .. } => (*layer, path),
            DataAt::Deferred(r) => {
                found = self.find_in_data_layers(r)?;
                (found.0, &found.1)
            }
        };
        let (last, dirs) = path.split_last().ok_or_else(|| err(libc::EIO))?;
        Ok(Real::At(
            self.walk_path(layer, dirs)?,
            Arc::from(last.as_os_str()),
        ))
    }

    /// A metadata-only copy's data source, a deferred one looked up in the data-only layers
    /// and kept: at the first open or copy-up, as the kernel's ovl_maybe_lookup_lowerdata.
    pub(crate) fn data_source(&self, node: &Node) -> Result<Option<Arc<DataSrc>>> {
        let d = node.state.read().expect("node state lock").data.clone();
        let Some(d) = d else { return Ok(None) };
        let DataAt::Deferred(r) = &d.at else {
            return Ok(Some(d));
        };
        let (layer, path, st) = self.find_in_data_layers(r).inspect_err(|e| {
            log::warn!(
                "data of node {} ({:?}) not found in the data-only layers: {e}",
                node.id,
                String::from_utf8_lossy(r)
            )
        })?;
        let at = DataAt::File {
            layer,
            path,
            blocks: st.st_blocks,
        };
        let found = DataSrc::new(at, d.first_lower.clone(), d.first_layer);
        {
            let mut s = node.state.write().expect("node state lock");
            if s.data.as_ref().is_some_and(|x| Arc::ptr_eq(x, &d)) {
                s.data = Some(found.clone());
            }
        }
        // Its st_blocks are the data's from now on, no longer estimated from the size.
        self.attrs_changed(node.id);
        Ok(Some(found))
    }

    /// `data_source`, its data then checked against the fs-verity digest the copy records,
    /// as the kernel's ovl_verify_lowerdata (at the first open or copy-up; EIO where the
    /// digest differs, the data has none, or with `verity=require` the copy records none).
    pub(crate) fn verified_data(&self, node: &Node) -> Result<Option<Arc<DataSrc>>> {
        let Some(d) = self.data_source(node)? else {
            return Ok(None);
        };
        if self.cfg.verity == Verity::Off {
            return Ok(Some(d));
        }
        if d.verified.load(Relaxed) {
            return Ok(Some(d));
        }
        let mark = self.with_real(node, |top| {
            Ok(sys::getxattr(top.xtarget(), self.cfg.marker_ns.metacopy())?)
        })?;
        let what = || format::show_path(&d.first_lower);
        match format::metacopy_digest(&mark.unwrap_or_default())? {
            None if self.cfg.verity == Verity::Require => {
                log::warn!("metacopy file {} has no digest specified", what());
                return Err(err(libc::EIO));
            }
            None => {}
            Some(want) => {
                let data = self.data_real(&d)?.open(libc::O_RDONLY, false)?;
                match sys::measure_verity(data.as_fd())? {
                    Some(got) if got == want => {}
                    Some(_) => {
                        log::warn!("the data of {} has the wrong fs-verity digest", what());
                        return Err(err(libc::EIO));
                    }
                    None => {
                        log::warn!("the data of {} has no fs-verity digest", what());
                        return Err(err(libc::EIO));
                    }
                }
            }
        }
        d.verified.store(true, Relaxed);
        Ok(Some(d))
    }

    /// The topmost lower object of a metadata-only copy (the kernel's ovl_dentry_lower).
    pub(crate) fn first_lower_real(&self, d: &DataSrc) -> Result<Real> {
        let (last, dirs) = d.first_lower.split_last().ok_or_else(|| err(libc::EIO))?;
        Ok(Real::At(
            self.walk_path(d.first_layer, dirs)?,
            Arc::from(last.as_os_str()),
        ))
    }

    /// Bring a metadata-only copy's data up into its upper file (in place: until the
    /// metacopy marker goes, a crash still shows the lower data), or drop it (`Empty`).
    fn copy_up_data(&self, node: &Arc<Node>, data: Data) -> Result<()> {
        let _g = node.copy_lock.lock().expect("copy lock");
        let Some(d) = node.state().data.clone() else {
            return Ok(()); // another writer won the race
        };
        let started = std::time::Instant::now();
        let real = self.real_in(node, 0)?;
        let dst = real.open(libc::O_WRONLY, false)?;
        let before = sys::fstat(dst.as_fd())?;
        let size = before.st_size as u64;
        // (bytes brought up, whether they were written rather than cloned)
        let (bytes, wrote) = if data == Data::All && size > 0 {
            let src = self.data_real(&d)?.open(libc::O_RDONLY, false)?;
            let cloned = copy_data(src.as_fd(), dst.as_fd(), size, self.cfg.fsync)?;
            sys::ftruncate(dst.as_fd(), size)?;
            (Some(size), !cloned)
        } else {
            sys::ftruncate(dst.as_fd(), 0)?;
            (None, false)
        };
        // Bringing the data up is not a change of the file: keep its times.
        sys::futimens(
            dst.as_fd(),
            Some(Some((before.st_atime, before.st_atime_nsec))),
            Some(Some((before.st_mtime, before.st_mtime_nsec))),
        )?;
        // (A clone is metadata, in order before the marker's removal, as in build_copy.)
        if self.cfg.fsync && wrote {
            sys::fsync(dst.as_fd(), false)?;
        }
        let ns = self.cfg.marker_ns;
        for x in [ns.metacopy(), ns.redirect()] {
            sys::removexattr_if_present(real.xtarget(), x)?;
        }
        {
            let mut s = node.state.write().expect("node state lock");
            s.data = None;
            s.shrink();
            self.copies.fetch_add(1, SeqCst);
        }
        self.attrs_changed(node.id);
        let st = node.state();
        self.copied_up(&st, d.layer().unwrap_or(0), bytes, started.elapsed());
        log::debug!("copied up the data of {:?} (node {})", st.name, node.id);
        Ok(())
    }

    /// Link a further name of copied-up `node` into the upper layer.
    pub(crate) fn link_up_alias(
        &self,
        node: &Arc<Node>,
        parent: u64,
        name: &OsStr,
        lower: usize,
    ) -> Result<()> {
        // An indexed copy is linked from its index entry: the names the node knows may not
        // be in the upper yet (another lookup is linking them up) or no longer (an unlink
        // whited one out before it dropped the name); test
        // `index::a_further_name_looked_up_while_the_copys_node_goes_reaches_the_copy`.
        let indexed = node.state.read().expect("node state lock").indexed;
        let p = self.node(parent)?;
        if indexed && self.link_up_from_index(&p, name, lower)? {
            return Ok(());
        }
        // Else from a name the copy has in the upper layer: never the one being linked up
        // (the node took it as an alias before this).
        let others = self
            .prune_names(node)
            .into_iter()
            .filter(|(d, n)| !(d.id == parent && **n == *name));
        for (d, n) in others {
            match self.link_up_at(LinkSrc::Name(&d, &n), parent, name) {
                Err(e) if e.errno() == libc::ENOENT => continue,
                r => return r,
            }
        }
        // If every other name was in a directory the kernel forgot (soak seed 1700706), the
        // index still holds the copy.
        if !indexed && self.link_up_from_index(&p, name, lower)? {
            return Ok(());
        }
        Err(err(libc::ESTALE))
    }

    /// Hard-link the upper object `src` as `parent/name` (copying `parent` up first).
    pub(crate) fn link_up_at(&self, src: LinkSrc<'_>, parent: u64, name: &OsStr) -> Result<()> {
        let ap = self.node(parent)?;
        self.copy_up(&ap, Data::All)?;
        // The name shows the copy's origin's inode number.
        self.mark_impure(&ap);
        let adir = self.dir_fd(&ap, 0)?;
        let times = sys::fstat(adir.as_fd())?;
        let _links = self.index().map(|ix| ix.links_lock());
        let linked = match src {
            LinkSrc::Name(sp, sn) => {
                let sdir = self.dir_fd(sp, 0)?;
                sys::linkat(sdir.as_fd(), sn, adir.as_fd(), name)
            }
            LinkSrc::Index(key) => {
                let ix = self.index().ok_or_else(|| err(libc::ESTALE))?;
                sys::linkat(ix.dir(), key, adir.as_fd(), name)
            }
        };
        match linked {
            Ok(()) => self.linked_up(XTarget::At(adir.as_fd(), name)),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => return Err(e.into()),
        }
        restore_times(adir.as_fd(), &times);
        Ok(())
    }
}

/// Where a name linked up into the upper layer links from.
#[derive(Clone, Copy)]
pub(crate) enum LinkSrc<'a> {
    /// An upper name of the copy: (its directory, its name).
    Name(&'a Node, &'a OsStr),
    /// The copy's index entry, by its name in the index.
    Index(&'a OsStr),
}

/// Put back a directory's atime/mtime after we changed its entries for a copy-up.
pub(crate) fn restore_times(dir: BorrowedFd<'_>, st: &Stat) {
    let _ = sys::futimens(
        dir,
        Some(Some((st.st_atime, st.st_atime_nsec))),
        Some(Some((st.st_mtime, st.st_mtime_nsec))),
    );
}

/// Copy every xattr except the union's own markers (POSIX ACLs and capabilities included).
pub(crate) fn copy_xattrs(src: XTarget<'_>, dst: XTarget<'_>) -> Result<()> {
    for name in sys::listxattr(src)? {
        if format::is_private_xattr(&name) {
            continue;
        }
        let c = CString::new(name).map_err(|_| err(libc::EINVAL))?;
        let Some(v) = sys::getxattr(src, &c)? else {
            continue;
        };
        if let Err(e) = sys::setxattr(dst, &c, &v, 0) {
            // The upper may not support a namespace the lower had (e.g. on tmpfs).
            if e.raw_os_error() == Some(libc::ENOTSUP) {
                log::warn!("copy-up: xattr {:?} not supported by the upper layer", c);
                continue;
            }
            return Err(e.into());
        }
    }
    Ok(())
}

/// Copy `size` bytes: reflink if the filesystem can, else copy_file_range over the data
/// extents only (holes stay holes), else plain reads and writes. With `durable` (an fsync
/// follows), each copied chunk is sent to the disk at once, so the disk writes the copy
/// while the rest is copied instead of all of it during the final fsync. True where the
/// copy is a reflink: it wrote no data, and its fsync can go (the kernel skips it then).
pub(crate) fn copy_data(
    src: BorrowedFd<'_>,
    dst: BorrowedFd<'_>,
    size: u64,
    durable: bool,
) -> Result<bool> {
    if sys::ficlone(dst, src).is_ok() {
        return Ok(true);
    }
    let mut off = 0u64;
    while off < size {
        let data = match sys::lseek(src, off as i64, libc::SEEK_DATA) {
            Ok(d) => d as u64,
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => break, // only a hole remains
            Err(_) => off, // no SEEK_DATA support: copy everything
        };
        let end = match sys::lseek(src, data as i64, libc::SEEK_HOLE) {
            Ok(h) => (h as u64).min(size),
            Err(_) => size,
        };
        copy_range(src, dst, data, end, durable)?;
        if end <= off {
            break; // no progress: a filesystem with odd SEEK_* answers
        }
        off = end;
    }
    sys::ftruncate(dst, size)?;
    Ok(false)
}

/// Chunk of a data copy-up: small enough that the disk starts early, large enough that the
/// syscalls cost nothing against the copy.
const COPY_CHUNK: usize = 8 << 20;

fn copy_range(
    src: BorrowedFd<'_>,
    dst: BorrowedFd<'_>,
    mut off: u64,
    end: u64,
    durable: bool,
) -> Result<()> {
    let mut use_cfr = true;
    let mut buf = Vec::new();
    while off < end {
        let len = ((end - off) as usize).min(COPY_CHUNK);
        if use_cfr {
            match sys::copy_file_range(src, off, dst, off, len) {
                Ok(0) => return Ok(()), // source shorter than it said
                Ok(n) => {
                    if durable {
                        // Best effort: the fsync at the end is what makes the copy durable.
                        let _ = sys::start_writeback(dst, off, n as u64);
                    }
                    off += n as u64;
                    continue;
                }
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EXDEV | libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP)
                    ) =>
                {
                    use_cfr = false;
                }
                Err(e) => return Err(e.into()),
            }
        }
        if buf.is_empty() {
            buf = vec![0u8; 1 << 20];
        }
        let want = len.min(buf.len());
        let n = sys::pread(src, &mut buf[..want], off)?;
        if n == 0 {
            return Ok(());
        }
        let mut w = 0;
        while w < n {
            w += sys::pwrite(dst, &buf[w..n], off + w as u64)?;
        }
        if durable {
            let _ = sys::start_writeback(dst, off, n as u64);
        }
        off += n as u64;
    }
    Ok(())
}
