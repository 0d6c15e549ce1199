//! Rename (and exchange) in the union: the kernel's ovl_rename checks and copy-ups, the
//! redirects a moved lower directory or metadata-only copy needs (EXDEV where the kernel's
//! would be too long), whiteouts and opaque markers left behind, and the node table moved.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;

use super::copyup::Data;
use super::format;
use super::node::{Kind, Node};
use super::workdir::remove_tree;
use super::write::{REDIRECT_MAX, check_new_name};
use super::{Union, check_name};
use crate::error::{Result, err};
use crate::sys::{self, XTarget};

impl Union {
    /// What ovl_rename refuses before it copies anything up, checked before the parents are
    /// copied: without redirects (the userxattr format) a directory with lower layers cannot
    /// move (ovl_can_move: EXDEV, after the VFS's own EEXIST, ENOTDIR, EISDIR, ENOENT), and a
    /// directory target that is merged or lower (not pure upper) must be empty (ENOTEMPTY): a
    /// failing rename then changes nothing. The main path re-checks under the parents' write
    /// locks, so a listing that races a change only decides which check refuses.
    fn rename_precheck(
        &self,
        p: &Arc<Node>,
        name: &OsStr,
        np: &Arc<Node>,
        newname: &OsStr,
        exchange: bool,
        noreplace: bool,
    ) -> Result<()> {
        let movability = self.cfg.marker_ns == format::MarkerNs::User;
        // (With both parents in the upper already nothing is copied up before the main path.)
        let emptiness = !exchange && (p.top_layer() != 0 || np.top_layer() != 0);
        if (!movability && !emptiness) || (p.id == np.id && name == newname) {
            return Ok(());
        }
        let (first, second) = if p.id <= np.id { (p, np) } else { (np, p) };
        let _g1 = first.dir_lock.read().expect("dir lock");
        let _g2 = (p.id != np.id).then(|| second.dir_lock.read().expect("dir lock"));
        let Some(src) = self.child(p, name)? else {
            return Ok(());
        };
        let dst = self.child(np, newname)?;
        if movability {
            let vfs_refuses = match &dst {
                Some(_) if noreplace => true,
                Some(d) => !exchange && d.is_dir() != src.is_dir(),
                None => exchange,
            };
            let dst_immovable = exchange && dst.as_ref().is_some_and(|d| self.is_immovable(d));
            if !vfs_refuses && (self.is_immovable(&src) || dst_immovable) {
                return Err(err(libc::EXDEV));
            }
        }
        // (A target that is the source or one of the parents is the kernel's to refuse, and
        // the main path's.)
        let Some(dst) = dst.filter(|d| ![src.id, p.id, np.id].contains(&d.id)) else {
            return Ok(());
        };
        // Not dst's own lock (the main path takes none either).
        if emptiness
            && src.is_dir()
            && dst.is_dir()
            && !self.is_pure_upper(&dst)
            && !self.is_empty_dir(&dst)?
        {
            return Err(err(libc::ENOTEMPTY));
        }
        Ok(())
    }

    /// ovl_clear_empty: a merged directory about to be replaced (empty in the union, so its
    /// upper copy holds only whiteouts) first becomes an upper-only opaque directory, its
    /// whiteouts gone. The kernel does this before it writes the source's redirect, so where
    /// that refuses (EXDEV, too long) the target stays opaque: a plain directory, nlink 2,
    /// not a merged one's 1 (soak seed 900048). Opaque first, so a crash in between never
    /// shows what the whiteouts hid; the directory keeps its times, as the kernel's copy does.
    fn clear_empty(&self, d: &Node) -> Result<()> {
        if d.top_layer() != 0 || d.state().layers.len() < 2 {
            return Ok(());
        }
        let (dfd, entries) = self.upper_listing(d)?;
        if entries.is_empty() {
            return Ok(());
        }
        let times = sys::fstat(dfd.as_fd())?;
        sys::setxattr(
            XTarget::Fd(dfd.as_fd()),
            self.cfg.marker_ns.opaque(),
            b"y",
            0,
        )?;
        // The kernel's new directory carries none of the old one's markers: no redirect.
        sys::removexattr_if_present(XTarget::Fd(dfd.as_fd()), self.cfg.marker_ns.redirect())?;
        for e in entries {
            remove_tree(dfd.as_fd(), &e.name, 0)?;
        }
        super::copyup::restore_times(dfd.as_fd(), &times);
        {
            let mut s = d.state.write().expect("node state lock");
            s.layers = smallvec::smallvec![0];
            s.lower_path = None;
            s.redirect_layer = 0;
        }
        self.attrs_changed(d.id);
        Ok(())
    }

    /// The entries of directory `d`'s upper copy, with that copy's fd.
    fn upper_listing(&self, d: &Node) -> Result<(Arc<OwnedFd>, Vec<sys::RawDirent>)> {
        let dfd = self.dir_fd(d, 0)?;
        let r = sys::openat(
            dfd.as_fd(),
            OsStr::new("."),
            libc::O_RDONLY | libc::O_DIRECTORY,
            0,
        )?;
        Ok((dfd, sys::read_dir_fd(r.as_fd())?))
    }

    /// A directory with lower layers: it cannot move without redirects.
    fn is_immovable(&self, n: &Node) -> bool {
        n.is_dir() && !self.is_pure_upper(n)
    }

    /// Only in the upper layer: ovl_pure_upper, whose emptiness the upper filesystem checks.
    fn is_pure_upper(&self, n: &Node) -> bool {
        n.state().layers.iter().all(|&l| self.layers.is_upper(l))
    }

    pub fn rename(
        &self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
    ) -> Result<()> {
        check_name(name)?;
        check_new_name(newname)?;
        let exchange = flags & sys::RENAME_EXCHANGE != 0;
        let noreplace = flags & sys::RENAME_NOREPLACE != 0;
        if flags & !(sys::RENAME_EXCHANGE | sys::RENAME_NOREPLACE) != 0 || (exchange && noreplace) {
            return Err(err(libc::EINVAL));
        }
        if !self.writable() {
            return Err(err(libc::EROFS));
        }
        let p = self.dir_node(parent)?;
        let np = self.dir_node(newparent)?;
        self.rename_precheck(&p, name, &np, newname, exchange, noreplace)?;
        if !self.layers.data_only().is_empty() || self.cfg.verity != super::Verity::Off {
            // As ovl_copy_up_flags: the source's data in a data-only layer is looked up and
            // its digest checked before anything is copied up; where that fails the parents
            // stay as they are.
            let src = {
                let _g = p.dir_lock.read().expect("dir lock");
                self.child(&p, name)?
            };
            if let Some(s) = src.filter(|s| s.kind == Kind::File) {
                self.verified_data(&s)?;
            }
        }
        self.copy_up(&p, Data::All)?;
        self.copy_up(&np, Data::All)?;
        // Two directory locks: lower id first.
        let (first, second) = if p.id <= np.id { (&p, &np) } else { (&np, &p) };
        let _g1 = first.dir_lock.write().expect("dir lock");
        let _g2 = if p.id != np.id {
            Some(second.dir_lock.write().expect("dir lock"))
        } else {
            None
        };
        Self::live_dir(&p)?;
        Self::live_dir(&np)?;

        let src = self.child(&p, name)?.ok_or_else(|| err(libc::ENOENT))?;
        let dst = self.child(&np, newname)?;
        if p.id == np.id && name == newname {
            return if noreplace {
                Err(err(libc::EEXIST))
            } else {
                Ok(())
            };
        }
        if noreplace && dst.is_some() {
            return Err(err(libc::EEXIST));
        }
        // Two names of one file: nothing happens (POSIX; the kernel's vfs_rename returns
        // before asking the filesystem, so only a caller of the engine gets here).
        if dst.as_ref().is_some_and(|d| d.id == src.id) {
            return Ok(());
        }
        if exchange && dst.is_none() {
            return Err(err(libc::ENOENT));
        }
        if let (Some(d), false) = (&dst, exchange) {
            if src.is_dir() && !d.is_dir() {
                return Err(err(libc::ENOTDIR));
            }
            if !src.is_dir() && d.is_dir() {
                return Err(err(libc::EISDIR));
            }
            if d.is_dir() && !self.is_empty_dir(d)? {
                // Over a pure-upper target the kernel copies the source up and sets its
                // redirect (EXDEV where too long: soak seed 70177), then the upper filesystem
                // refuses the rename (soak seed 11041) with its own errno (xfs: EEXIST, soak
                // seed 2250011); a merged or lower one is refused first, ENOTEMPTY.
                if self.is_pure_upper(d) {
                    self.copy_up(&src, Data::Meta)?;
                    if src.is_dir() && !self.is_pure_upper(&src) {
                        self.dir_redirect(&src, &p, name, p.id == np.id)?;
                    }
                    let work = self.work.as_ref().ok_or_else(|| err(libc::EROFS))?;
                    return Err(err(work.dir_over_full_dir_errno()));
                }
                return Err(err(libc::ENOTEMPTY));
            }
        }
        let samedir = p.id == np.id;
        let kernels = self.kernel_meta_data(&src, &p, name)?;
        self.copy_up(&src, Data::Meta)?;
        // An exchange's target is copied up too before any redirect is set, as in ovl_rename:
        // where a redirect turns out too long (EXDEV) both stay copied up (metacopy soak,
        // seed 993540: the target, a lower directory, became merged).
        let dst_kernels = match (&dst, exchange) {
            (Some(d), true) => {
                let k = self.kernel_meta_data(d, &np, newname)?;
                self.copy_up(d, Data::Meta)?;
                Some((d, k))
            }
            // A lower hard link about to be replaced: into the index first.
            (Some(d), false) => {
                self.index_before_removal(d)?;
                None
            }
            _ => None,
        };
        self.prepare_file_move(&src, &p, name, samedir, kernels)?;
        if let (Some(d), false) = (&dst, exchange)
            && d.is_dir()
        {
            self.clear_empty(d)?;
        }
        if let Some((d, kernels)) = dst_kernels {
            self.prepare_file_move(d, &np, newname, samedir, kernels)?;
        }
        if !samedir {
            // Moving something that shows a lower inode number: the new directory's listing
            // needs to know (the kernel's ovl_rename does the same).
            if self.shows_lower_ino(&src) {
                self.mark_impure(&np);
            }
            if let (Some(d), true) = (&dst, exchange)
                && self.shows_lower_ino(d)
            {
                self.mark_impure(&p);
            }
        }
        let up = self.dir_fd(&p, 0)?;
        let unp = self.dir_fd(&np, 0)?;
        let src_below = self.exists_below(&p, name)?;
        let dst_below = self.exists_below(&np, newname)?;

        // Markers first (harmless where the directory is now), then one rename moves it.
        let (src_redirect, src_opaque) =
            self.prepare_dir_move(&src, &p, name, p.id == np.id, dst_below)?;
        let (dst_redirect, dst_opaque) = match (&dst, exchange) {
            (Some(d), true) => self.prepare_dir_move(d, &np, newname, p.id == np.id, src_below)?,
            _ => (None, false),
        };
        // For events: the source path, taken while its name still means what it meant.
        let from_path = self.obs.events.active().then(|| self.path_in(parent, name));

        let dst_keep = match (&dst, exchange) {
            (Some(d), false) => self.keep_fd(d),
            _ => None,
        };
        let dst_dir_keep = match (&dst, exchange) {
            (Some(d), false) if d.is_dir() => self.dir_keep(d),
            _ => None,
        };
        // Both files are reached by fd until the node table says what the disk does.
        let src_keep = self.keep_fd(&src);
        let _src_pinned = self.pin_object(&src, src_keep.as_ref());
        let dst_moving = match (&dst, exchange) {
            (Some(d), true) => self.keep_fd(d),
            _ => dst_keep.clone(),
        };
        let _dst_pinned = dst
            .as_ref()
            .and_then(|d| self.pin_object(d, dst_moving.as_ref()));
        if let Some(d) = &dst
            && !exchange
            && d.is_dir()
            && d.top_layer() == 0
        {
            // Only whiteouts can be left in it (it is empty in the union): clear them so
            // the rename can replace it.
            let (dfd, entries) = self.upper_listing(d)?;
            for e in entries {
                remove_tree(dfd.as_fd(), &e.name, 0)?;
            }
        }
        // A directory's names change: opens by name wait for the node table to say so.
        let dir_moving = (src.is_dir() || dst.as_ref().is_some_and(|d| d.is_dir()))
            .then(|| self.dir_moves.begin());
        if exchange {
            sys::renameat2(up.as_fd(), name, unp.as_fd(), newname, sys::RENAME_EXCHANGE)?;
        } else {
            let upper_dst = sys::statat(unp.as_fd(), newname).ok();
            let over_wh = upper_dst
                .as_ref()
                .is_some_and(|st| format::is_whiteout_at(unp.as_fd(), newname, st));
            if src.is_dir() && over_wh {
                // A directory cannot replace the whiteout (a non-dir) by rename: swap them, and
                // the whiteout lands where the source was.
                sys::renameat2(up.as_fd(), name, unp.as_fd(), newname, sys::RENAME_EXCHANGE)?;
                if !src_below {
                    sys::unlinkat(up.as_fd(), name, false)?;
                }
            } else {
                // RENAME_NOREPLACE was decided on the union view above (under both directory
                // locks); the upper may hold a whiteout at the target, which must be replaced.
                let wflag = if src_below { sys::RENAME_WHITEOUT } else { 0 };
                sys::renameat2(up.as_fd(), name, unp.as_fd(), newname, wflag)?;
            }
        }

        // Bring the node table in line with the disk.
        if let Some(d) = &dst {
            if exchange {
                self.move_node(
                    d,
                    (newparent, newname),
                    (parent, name),
                    dst_redirect.clone(),
                );
            } else {
                self.detach(d, newparent, newname, dst_keep.or(dst_dir_keep));
                if d.is_dir() {
                    self.fds.drop_node(d.id);
                }
            }
        }
        self.move_node(
            &src,
            (parent, name),
            (newparent, newname),
            src_redirect.clone(),
        );
        drop(dir_moving);
        let from = || from_path.clone().unwrap_or_default();
        self.renamed(from, (newparent, newname), src_below && !exchange, exchange);
        if src_opaque {
            self.opaque_written(newparent, newname);
        }
        if dst_opaque {
            self.opaque_written(parent, name);
        }
        if let Some(r) = &src_redirect {
            self.redirect_written((newparent, newname), r);
        }
        if let (true, Some(r)) = (exchange, &dst_redirect) {
            self.redirect_written((parent, name), r);
        }
        Ok(())
    }

    /// With metacopy=on, the path of the data the kernel's copy-up of lower file `n`, named
    /// `name` in `p`, would point at: the kernel copies any lower regular file up
    /// metadata-only, ours comes up whole when empty or hard-linked, but the kernel's
    /// redirect (the path of the name used) and its refusal where too long must hold for it
    /// too (soak seed 40012). Taken before the copy-up.
    pub(super) fn kernel_meta_data(
        &self,
        n: &Node,
        p: &Node,
        name: &OsStr,
    ) -> Result<Option<Vec<OsString>>> {
        if !self.cfg.metacopy {
            // The kernel copies whole: no redirect (a lower metadata-only copy of a data-only
            // layer's file without metacopy=on; data-only soak, seed 1120209).
            return Ok(None);
        }
        let s = n.state();
        if let Some(d) = &s.data {
            return Ok(Some(d.first_lower.clone()));
        }
        if n.kind != Kind::File || (s.layers[0] == 0 && !s.kernel_meta) {
            return Ok(None);
        }
        if let (true, Some(r)) = (s.kernel_meta, &s.kernel_redirect) {
            return Ok(Some(r.to_vec()));
        }
        let mut here = self.lower_path_of(p, &p.state())?;
        here.push(name.to_os_string());
        Ok(Some(here))
    }

    /// Is the lower file metadata-only copy `n` was copied from (or, copied up whole where
    /// the kernel's copy would not be, took its data from) a hard link?
    fn data_is_hard_link(&self, n: &Node) -> Result<bool> {
        let s = n.state();
        Ok(match &s.data {
            // As ovl_need_absolute_redirect: the topmost lower object's links count.
            Some(d) => self.first_lower_real(d)?.stat()?.st_nlink > 1,
            // Our whole copy of a hard link is in the index.
            None => s.indexed,
        })
    }

    /// Before moving a metadata-only copy: point it at its data with a redirect, as the
    /// kernel's ovl_set_redirect does: the data's name when it stays in a directory whose
    /// lower path holds the data and the data is no hard link, else the absolute path, and
    /// EXDEV (`mv` then copies) when that is longer than the kernel's redirect_max (soak seed
    /// 8121 with metacopy=on: we brought the data up and renamed, the kernel refused).
    /// `kernels`: where the kernel's copy would point (`kernel_meta_data`); a copy of ours
    /// that came up whole writes no redirect but refuses where the kernel's would.
    fn prepare_file_move(
        &self,
        n: &Arc<Node>,
        p: &Node,
        name: &OsStr,
        samedir: bool,
        kernels: Option<Vec<OsString>>,
    ) -> Result<()> {
        let Some(path) = kernels.filter(|_| !n.is_dir()) else {
            return Ok(());
        };
        // As ovl_need_absolute_redirect: a relative redirect would do only within the
        // directory, and never for a lower hard link (its other names may be elsewhere;
        // metacopy soak, seed 987334).
        let in_place = samedir && !self.data_is_hard_link(n)?;
        // The upper directory of a metadata-only copy (ours came up whole: None).
        let up = match n.state().data {
            Some(_) => Some(self.dir_fd(p, 0)?),
            None => None,
        };
        if let Some(up) = &up {
            // A redirect the copy has stays, as ovl_set_redirect keeps one: where a relative
            // one would do, and always an absolute one (the kernel's link gives one: the
            // file's other names may be in other directories; data-only soak with swapped
            // uppers, seed 1210479, replaced it with a relative one and they lost the data).
            let has = sys::getxattr(XTarget::At(up.as_fd(), name), self.cfg.marker_ns.redirect())?
                .filter(|r| !r.is_empty());
            if let Some(r) = has
                && (r.first() == Some(&b'/') || in_place)
            {
                return Ok(());
            }
        }
        // Relative only where the data's directory is this one's lower path.
        let relative = match path.split_last() {
            Some((last, dir)) if in_place && *dir == self.lower_path_of(p, &p.state())? => {
                Some(last.as_bytes().to_vec())
            }
            _ => None,
        };
        let value = relative.unwrap_or_else(|| format::absolute_path(&path));
        if value.len() > REDIRECT_MAX {
            return Err(err(libc::EXDEV));
        }
        let Some(up) = up else {
            // Ours came up whole; the kernel's would carry this redirect from now on (metacopy
            // soak, seed 972050: moved across directories again, the kernel kept its
            // absolute redirect while we measured one from the new place and refused).
            if !n.state().kernel_meta {
                return Ok(());
            }
            sys::setxattr(
                XTarget::At(self.dir_fd(p, 0)?.as_fd(), name),
                self.cfg.marker_ns.whole_copy(),
                &format::absolute_path(&path),
                0,
            )?;
            n.state.write().expect("node state lock").kernel_redirect = Some(path.into());
            return Ok(());
        };
        sys::setxattr(
            XTarget::At(up.as_fd(), name),
            self.cfg.marker_ns.redirect(),
            &value,
            0,
        )?;
        Ok(())
    }

    /// The redirect directory `n` (named `name` in `p`, with lower layers) needs when moved
    /// (None: the one it has stays), and its path in the layers below; EXDEV where the
    /// kernel refuses the move.
    fn dir_redirect(
        &self,
        n: &Node,
        p: &Node,
        name: &OsStr,
        samedir: bool,
    ) -> Result<(Option<Vec<u8>>, Vec<OsString>)> {
        // Kernel overlayfs never follows redirects in the userxattr format (rootless), so
        // refuse as it does with redirect_dir=off: `mv` then copies the tree.
        if self.cfg.marker_ns == format::MarkerNs::User {
            return Err(err(libc::EXDEV));
        }
        let st = n.state();
        // As ovl_set_redirect: an upper directory that carries a redirect keeps it while it
        // stays in its directory (a relative one still names the same entry below), so none
        // is built or measured (shared-mount soak, seed 940000: a relative redirect to a
        // 254-byte name, moved again within its directory, was refused as if absolute).
        if samedir
            && st.redirect_layer == 0
            && let Some(lp) = &st.lower_path
        {
            return Ok((None, lp.as_ref().clone()));
        }
        let lower_path = match &st.lower_path {
            Some(lp) => lp.as_ref().clone(),
            None => {
                let mut v = self.lower_path_of(p, &p.state())?;
                v.push(name.to_os_string());
                v
            }
        };
        let value: Vec<u8> = if samedir && st.lower_path.is_none() {
            name.as_bytes().to_vec()
        } else {
            format::absolute_path(&lower_path)
        };
        // The kernel's redirect_max (256): a longer redirect could not be followed by kernel
        // overlayfs, so refuse as it does (EXDEV: `mv` then copies the tree instead).
        if value.len() > REDIRECT_MAX {
            return Err(err(libc::EXDEV));
        }
        Ok((Some(value), lower_path))
    }

    /// Before moving directory `n` (named `name` in `p`): write its redirect (it has lower
    /// layers) or opaque marker (it is upper-only and lands where a lower entry exists).
    fn prepare_dir_move(
        &self,
        n: &Node,
        p: &Node,
        name: &OsStr,
        samedir: bool,
        lands_over_lower: bool,
    ) -> Result<(Option<Arc<Vec<OsString>>>, bool)> {
        if !n.is_dir() {
            return Ok((None, false));
        }
        let st = n.state();
        let dfd = self.dir_fd(n, 0)?;
        let has_lowers = st.layers.len() > 1;
        if !has_lowers {
            if lands_over_lower {
                sys::setxattr(
                    XTarget::Fd(dfd.as_fd()),
                    self.cfg.marker_ns.opaque(),
                    b"y",
                    0,
                )?;
            }
            return Ok((None, lands_over_lower));
        }
        let (value, lower_path) = self.dir_redirect(n, p, name, samedir)?;
        if let Some(value) = value {
            sys::setxattr(
                XTarget::Fd(dfd.as_fd()),
                self.cfg.marker_ns.redirect(),
                &value,
                0,
            )?;
        }
        Ok((Some(Arc::new(lower_path)), false))
    }

    fn move_node(
        &self,
        n: &Node,
        from: (u64, &OsStr),
        to: (u64, &OsStr),
        redirect: Option<Arc<Vec<OsString>>>,
    ) {
        let new_name = {
            let mut s = n.state.write().expect("node state lock");
            let new_name = s.move_name(from.0, from.1, to.0, to.1);
            if let Some(r) = redirect {
                s.lower_path = Some(r);
                s.redirect_layer = 0;
            }
            new_name
        };
        // A node the table does not hold (a name nobody looked up, see `child`) has no index
        // entries, and must not move those of the registered node of its file. But its old
        // name's entry goes if nothing claims it: a FORGET served between `move_name` and
        // here dropped the node and unindexed only its new name, and the old one then led a
        // lookup or an unlink to the next node of its number (engine fuzz `races`: an unlink
        // of a name so left answered EEXIST, its whiteout meeting the file there).
        if self.nodes.get(n.id).is_some_and(|r| std::ptr::eq(&*r, n)) {
            self.nodes.reindex(n.id, from.0, from.1, to.0, new_name);
        } else {
            self.nodes.unindex_if(from.0, from.1, n.id);
        }
    }
}
