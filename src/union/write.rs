//! Changes to the union: every one lands in the upper layer, in the kernel's on-disk format
//! (char 0/0 whiteouts, `overlay.opaque`, `overlay.redirect`); lower layers are never touched.

use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;

use super::copyup::Data;
use super::format;
use super::names::Probe;
use super::node::{Kind, Node, NodeState};
use super::readdir::Listing;
use super::real::Real;
use super::workdir::remove_tree;
use super::{Entry, Union, check_name, disk_xattr_name};
use crate::error::{Result, err};
use crate::sys::{self, Stat, TimeSpec, XTarget};

/// Longest redirect kernel overlayfs writes or follows (its `redirect_max` default).
pub(super) const REDIRECT_MAX: usize = 256;

const DEFAULT_ACL: &std::ffi::CStr = c"system.posix_acl_default";

/// Who asks: new objects are owned by the caller, as through the kernel's overlayfs.
#[derive(Clone, Copy, Debug)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    /// The caller's umask where the kernel left it to us (FUSE_DONT_MASK), else 0.
    pub umask: u32,
}

/// What to create.
#[derive(Clone, Copy)]
pub enum NewObj<'a> {
    File { mode: u32, flags: i32 },
    Dir { mode: u32 },
    Node { mode: u32, rdev: u64 },
    Symlink { target: &'a OsStr },
}

impl NewObj<'_> {
    /// The same object with `umask` taken off its mode.
    fn masked(self, umask: u32) -> Self {
        match self {
            NewObj::File { mode, flags } => NewObj::File {
                mode: mode & !umask,
                flags,
            },
            NewObj::Dir { mode } => NewObj::Dir {
                mode: mode & !umask,
            },
            NewObj::Node { mode, rdev } => NewObj::Node {
                mode: mode & !umask,
                rdev,
            },
            s @ NewObj::Symlink { .. } => s,
        }
    }
}

/// Make `obj` (with `make`) under the caller's umask: FUSE_DONT_MASK leaves it ours to
/// apply. The upper filesystem applies a thread's own umask as for the kernel's overlayfs,
/// not under a default ACL, whose entries it turns into the new object's ACLs; a thread
/// that can't have a umask of its own masks the mode here. Returns the object as made.
fn with_umask<'a, T>(
    c: Caller,
    obj: NewObj<'a>,
    make: impl FnOnce(&NewObj<'a>) -> T,
) -> (NewObj<'a>, T) {
    let umask = (c.umask != 0)
        .then(|| sys::ThreadUmask::set(c.umask))
        .flatten();
    let obj = if c.umask != 0 && umask.is_none() {
        obj.masked(c.umask)
    } else {
        obj
    };
    let made = make(&obj);
    drop(umask);
    (obj, made)
}

/// The flags of a create's open that the upper file is opened with: its access mode and
/// the status flags that change how it is written.
pub(crate) fn open_flags(flags: i32) -> i32 {
    flags & (libc::O_ACCMODE | libc::O_APPEND | libc::O_DIRECT | libc::O_SYNC | libc::O_DSYNC)
}

/// setattr's arguments, engine-side.
#[derive(Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: TimeSpec,
    pub mtime: TimeSpec,
    pub fh: Option<u64>,
    /// The caller may not keep set-id bits on truncate (no CAP_FSETID): its gid.
    pub kill_privs: Option<u32>,
}

/// A node reached by a fd while its names change (see `Union::pin_object`).
pub(super) struct Pinned(Arc<Node>, Arc<OwnedFd>);

impl Drop for Pinned {
    fn drop(&mut self) {
        let mut s = self.0.state.write().expect("node state lock");
        if let Some(i) = s.moving.iter().position(|(_, fd)| Arc::ptr_eq(fd, &self.1)) {
            s.moving.swap_remove(i);
        }
        s.shrink();
    }
}

/// A name a user may create: markers are refused so a user file can never act as a whiteout.
pub(super) fn check_new_name(name: &OsStr) -> Result<()> {
    check_name(name)?;
    if format::is_marker_name(name) {
        return Err(err(libc::EINVAL));
    }
    Ok(())
}

impl Union {
    /// The node for `name` in `p` (known, or resolved now), or None. Caller holds p.dir_lock.
    pub(super) fn child(&self, p: &Node, name: &OsStr) -> Result<Option<Arc<Node>>> {
        if let Some(n) = self
            .nodes
            .peek(p.id, name)
            .and_then(|id| self.nodes.get(id))
        {
            return Ok(Some(n));
        }
        Ok(self
            .resolve(p, name)?
            .map(|f| Arc::new(self.node_of(p.id, name, f))))
    }

    /// Does `name` exist (as something other than a whiteout) in a lower layer of `p`?
    pub(crate) fn exists_below(&self, p: &Node, name: &OsStr) -> Result<bool> {
        let layers = p.state().layers;
        let merged = self.merged_names(p, &layers)?;
        let direct = self.direct_layer(&layers, merged.is_some());
        for &l in layers.iter().filter(|&&l| !self.layers.is_upper(l)) {
            let last = Some(l) == direct;
            if !last {
                match self.probe_lower(p, merged.as_deref(), l, name)? {
                    Probe::Absent => continue,
                    Probe::WhitedOut => return Ok(false),
                    Probe::Present => {}
                }
            }
            let pfd = self.dir_fd(p, l)?;
            match sys::statat(pfd.as_fd(), name) {
                Ok(st) => return Ok(!format::is_whiteout_at(pfd.as_fd(), name, &st)),
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                    if !last && format::has_oci_whiteout(pfd.as_fd(), name) {
                        return Ok(false);
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(false)
    }

    pub(super) fn is_empty_dir(&self, n: &Node) -> Result<bool> {
        let st = n.state();
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        for &l in &st.layers {
            self.list_layer_into(n, l, &mut seen, &mut out, Listing::Emptiness)?;
            if !out.is_empty() {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Owner of a new object in upper dir `pst`: the caller, with the group of a set-gid parent.
    fn new_owner(pst: &Stat, c: Caller) -> (u32, u32) {
        if pst.st_mode & libc::S_ISGID != 0 {
            (c.uid, pst.st_gid)
        } else {
            (c.uid, c.gid)
        }
    }

    fn make_obj(
        &self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        obj: &NewObj<'_>,
        setgid_parent: bool,
    ) -> Result<Option<OwnedFd>> {
        match *obj {
            NewObj::File { mode, flags } => Ok(Some(sys::openat(
                dir,
                name,
                libc::O_CREAT | libc::O_EXCL | open_flags(flags),
                mode & 0o7777,
            )?)),
            NewObj::Dir { mode } => {
                let extra = if setgid_parent { libc::S_ISGID } else { 0 };
                sys::mkdirat(dir, name, (mode & 0o7777) | extra)?;
                Ok(None)
            }
            NewObj::Node { mode, rdev } => {
                sys::mknodat(dir, name, mode, rdev)?;
                Ok(None)
            }
            NewObj::Symlink { target } => {
                sys::symlinkat(target, dir, name)?;
                Ok(None)
            }
        }
    }

    /// Create `name` in directory `parent`. Returns the new entry and, for files, the open fd.
    pub fn create_obj(
        &self,
        parent: u64,
        name: &OsStr,
        obj: NewObj<'_>,
        c: Caller,
    ) -> Result<(Entry, Option<OwnedFd>)> {
        check_new_name(name)?;
        let p = self.dir_node(parent)?;
        self.copy_up(&p, Data::All)?;
        let _g = p.dir_lock.write().expect("dir lock");
        Self::live_dir(&p)?;
        let upper = self.dir_fd(&p, 0)?;
        // The lower layers answer from their name sets. A name none of them holds is
        // created at once: O_EXCL tells if the upper has it (then one look says whether
        // that is a whiteout to create over); a lower name needs that look first.
        let below = self.exists_below(&p, name)?;
        let mut over_whiteout = below && self.deleted_in_upper(upper.as_fd(), name)?;
        let pst = sys::fstat(upper.as_fd())?;
        let (uid, gid) = Self::new_owner(&pst, c);
        let setgid = pst.st_mode & libc::S_ISGID != 0;
        let is_dir = matches!(obj, NewObj::Dir { .. });
        let mut fd = None;
        if !over_whiteout {
            let (obj, made) = with_umask(c, obj, |obj| {
                self.make_obj(upper.as_fd(), name, obj, setgid)
            });
            match made {
                Err(e) if e.errno() == libc::EEXIST && !below => {
                    // Only a whiteout is created over; anything else stays EEXIST.
                    over_whiteout = self.deleted_in_upper(upper.as_fd(), name)?;
                }
                made => {
                    fd = made?;
                    if let Err(e) =
                        self.finish_owner(XTarget::At(upper.as_fd(), name), &obj, uid, gid)
                    {
                        let _ = sys::unlinkat(upper.as_fd(), name, is_dir);
                        return Err(e);
                    }
                }
            }
        }
        if over_whiteout {
            // Build aside, then replace the whiteout in one rename: never a moment where the
            // deleted lower object shows through.
            let work = self.work.as_ref().ok_or_else(|| err(libc::EROFS))?;
            let tmp = work.temp_name();
            // Under a default ACL, aside means in a work subdirectory carrying the same one
            // (the kernel sets the ACLs on its work-dir copy, ovl_set_upper_acl).
            let (wfd, sub) = match sys::getxattr(XTarget::Fd(upper.as_fd()), DEFAULT_ACL)? {
                Some(acl) => {
                    let sub = work.temp_name();
                    (self.acl_dir(work.fd.as_fd(), &sub, &acl)?, Some(sub))
                }
                None => (work.fd.clone(), None),
            };
            let obj = if sub.is_none() {
                obj.masked(c.umask)
            } else {
                obj
            };
            let built = (|| -> Result<Option<OwnedFd>> {
                let fd = self.make_obj(wfd.as_fd(), &tmp, &obj, setgid)?;
                self.finish_owner(XTarget::At(wfd.as_fd(), &tmp), &obj, uid, gid)?;
                if is_dir {
                    // A directory replacing a deleted one must not merge with what was deleted.
                    sys::setxattr(
                        XTarget::At(wfd.as_fd(), &tmp),
                        self.cfg.marker_ns.opaque(),
                        b"y",
                        0,
                    )?;
                    sys::renameat2(wfd.as_fd(), &tmp, upper.as_fd(), name, sys::RENAME_EXCHANGE)?;
                    sys::unlinkat(wfd.as_fd(), &tmp, false)?;
                } else {
                    sys::renameat2(wfd.as_fd(), &tmp, upper.as_fd(), name, 0)?;
                }
                Ok(fd)
            })();
            if built.is_err() {
                let _ = remove_tree(wfd.as_fd(), &tmp, 0);
            }
            if let Some(sub) = sub {
                let _ = remove_tree(work.fd.as_fd(), &sub, 0);
            }
            fd = built?;
            if is_dir {
                self.opaque_written(parent, name);
            }
        }
        let st = match &fd {
            Some(f) => sys::fstat(f.as_fd())?,
            None => sys::statat(upper.as_fd(), name)?,
        };
        let node = self.new_upper_node(parent, name, &st);
        Ok((self.counted(&node, self.present(&node, None, st))?, fd))
    }

    /// open(2) with O_TMPFILE in directory `parent`: an unnamed upper file (the kernel's
    /// overlayfs makes it in the upper directory too, copying that up first: ovl_tmpfile).
    /// Its node is born detached, as an unlinked file still open, until `link` names it.
    pub fn create_tmpfile(
        &self,
        parent: u64,
        mode: u32,
        flags: i32,
        c: Caller,
    ) -> Result<(Entry, OwnedFd)> {
        if !self.writable() {
            return Err(err(libc::EROFS));
        }
        let p = self.dir_node(parent)?;
        self.copy_up(&p, Data::All)?;
        let _g = p.dir_lock.read().expect("dir lock");
        Self::live_dir(&p)?;
        let upper = self.dir_fd(&p, 0)?;
        let pst = sys::fstat(upper.as_fd())?;
        let (uid, gid) = Self::new_owner(&pst, c);
        let (obj, fd) = with_umask(c, NewObj::File { mode, flags }, |obj| {
            let NewObj::File { mode, .. } = *obj else {
                unreachable!("a file stays a file")
            };
            sys::openat(
                upper.as_fd(),
                OsStr::new("."),
                libc::O_TMPFILE | open_flags(flags),
                mode & 0o7777,
            )
        });
        let fd = fd?;
        self.finish_owner(XTarget::Fd(fd.as_fd()), &obj, uid, gid)?;
        let st = sys::fstat(fd.as_fd())?;
        let none = OsStr::new("");
        let node = self.new_upper_node(parent, none, &st);
        let attr = fd
            .try_clone()
            .map_err(Into::into)
            .map(|dup| self.detach(&node, parent, none, Some(Arc::new(dup))))
            .and_then(|()| self.present(&node, None, st));
        Ok((self.counted(&node, attr)?, fd))
    }

    /// Is upper `name` (of a name that exists below or that O_EXCL found taken) a deletion
    /// to create over? A whiteout is; an OCI `.wh.` file (fuse-overlayfs without CAP_MKNOD
    /// writes them) becomes the kernel's marker first, so the name stays deleted throughout.
    /// Anything else there, or a lower name not deleted, is EEXIST.
    fn deleted_in_upper(&self, upper: BorrowedFd<'_>, name: &OsStr) -> Result<bool> {
        match sys::statat(upper, name) {
            Ok(st) if format::is_whiteout_at(upper, name, &st) => Ok(true),
            Ok(_) => Err(err(libc::EEXIST)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                if format::has_oci_whiteout(upper, name) {
                    self.whiteout(upper, name, false)?;
                    sys::unlinkat(upper, &format::oci_whiteout_name(name), false)?;
                    Ok(true)
                } else {
                    Err(err(libc::EEXIST))
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    /// A work subdirectory `sub` with default ACL `acl`, to build new objects in.
    fn acl_dir(&self, work: BorrowedFd<'_>, sub: &OsStr, acl: &[u8]) -> Result<Arc<OwnedFd>> {
        sys::mkdirat(work, sub, 0o700)?;
        let made = sys::setxattr(XTarget::At(work, sub), DEFAULT_ACL, acl, 0)
            .and_then(|()| sys::openat(work, sub, libc::O_RDONLY | libc::O_DIRECTORY, 0));
        match made {
            Ok(fd) => Ok(Arc::new(fd)),
            Err(e) => {
                let _ = remove_tree(work, sub, 0);
                Err(e.into())
            }
        }
    }

    fn finish_owner(&self, at: XTarget<'_>, obj: &NewObj<'_>, uid: u32, gid: u32) -> Result<()> {
        // The caller's ids are the mount's; the disk has host ids. A caller outside the
        // mapping gets the daemon's own ids (all an unprivileged daemon can give).
        let ids = &self.cfg.ids;
        let me = sys::own_ids();
        let (uid, gid) = (
            ids.uid.to_host(uid).unwrap_or(me.0),
            ids.gid.to_host(gid).unwrap_or(me.1),
        );
        // The daemon creates as itself; hand the object to the caller (a no-op skipped).
        if (uid, gid) != me {
            if let Some(x) = ids.xattr {
                let v = super::ids::format_override(uid, gid, at.stat()?.st_mode);
                sys::setxattr(at, x, &v, 0)?;
                return Ok(());
            }
            at.chown(uid, gid)?;
        }
        // chown clears set-id bits; put back what was asked for (on the permissions the
        // umask or a default ACL left).
        let setid = match *obj {
            NewObj::File { mode, .. } | NewObj::Node { mode, .. } => {
                mode & (libc::S_ISUID | libc::S_ISGID)
            }
            NewObj::Dir { .. } | NewObj::Symlink { .. } => 0,
        };
        if setid != 0 {
            at.chmod((at.stat()?.st_mode & 0o1777) | setid)?;
        }
        Ok(())
    }

    fn new_upper_node(&self, parent: u64, name: &OsStr, st: &Stat) -> Arc<Node> {
        let natural = self.layers.union_ino(0, st.st_ino);
        let id = self.nodes.id_for(natural);
        let kind = Kind::from_mode(st.st_mode);
        if kind == Kind::Dir {
            self.fds.drop_node(id);
        }
        let node = Node::new(id, kind, natural, NodeState::new(parent, name, vec![0]));
        self.nodes.insert(node).node().clone()
    }

    /// A hard link: copy the source up, then link it in the upper layer.
    pub fn link(&self, id: u64, newparent: u64, newname: &OsStr) -> Result<Entry> {
        check_new_name(newname)?;
        let src = self.node(id)?;
        if src.is_dir() {
            return Err(err(libc::EPERM));
        }
        let np = self.dir_node(newparent)?;
        // As ovl_link: the source is copied up first, then the new parent, so a source that
        // cannot come up (its data missing from a data-only layer) leaves the parent lower
        // (data-only soak, seed 1120072).
        if self.cfg.metacopy {
            // The kernel links a metadata-only copy that points at its data with an absolute
            // redirect, and refuses (EXDEV) where that path exceeds redirect_max (soak seed
            // 8123). We bring the data up instead, but refuse where the kernel does. The
            // kernel measures the path the caller named; FUSE's LINK names only the inode, so
            // a file known under several names is measured by its shortest (metacopy soak,
            // seed 972115: refusing by another name's length would fail links the kernel
            // makes; this way only those it refuses through a long name go through).
            let s = src.state();
            let mut shortest: Option<usize> = None;
            for (pid, name) in s.names() {
                // A name whose directory the kernel forgot is not one it links by.
                let Some(sp) = self.nodes.get(pid) else {
                    continue;
                };
                if let Some(d) = self.kernel_meta_data(&src, &sp, name)? {
                    let len = format::absolute_path(&d).len();
                    shortest = Some(shortest.map_or(len, |m| m.min(len)));
                }
            }
            self.copy_up(&src, Data::Meta)?;
            self.copy_up(&np, Data::All)?;
            if shortest.is_some_and(|len| len > REDIRECT_MAX) {
                return Err(err(libc::EXDEV));
            }
        }
        self.copy_up(&src, Data::All)?;
        self.copy_up(&np, Data::All)?;
        let _g = np.dir_lock.write().expect("dir lock");
        Self::live_dir(&np)?;
        let node = {
            // Linked from the source's object (its name, or the fd a rename or unlink pinned)
            // under its object lock, as the kernel's vfs_link holds the source inode's: no
            // rename or unlink can make that name a whiteout or another file meanwhile (a
            // link from a name being moved linked either; engine fuzz `races`).
            let _reach = src.reach();
            self.link_locked(&src, &np, newname)?
        };
        self.counted(&node, self.attr_of(&node))
    }

    /// `link` once the new name's directory is locked and the source's object lock held.
    fn link_locked(&self, src: &Arc<Node>, np: &Arc<Node>, newname: &OsStr) -> Result<Arc<Node>> {
        let newparent = np.id;
        if self.child(np, newname)?.is_some() {
            return Err(err(libc::EEXIST));
        }
        let s = src.state();
        let from = match &s.detached {
            // No name: an O_TMPFILE file (the only such file the kernel lets be linked).
            Some(fd) if s.unlinked => Real::Fd(fd.clone()),
            _ => self.real_in(src, 0)?,
        };
        let link_to = |dir: BorrowedFd<'_>, name: &OsStr| match &from {
            Real::Fd(fd) => sys::link_fd(fd.as_fd(), dir, name),
            Real::At(sdir, sname) => sys::linkat(sdir.as_fd(), sname, dir, name),
        };
        let upper = self.dir_fd(np, 0)?;
        match sys::statat(upper.as_fd(), newname) {
            Ok(st) if format::is_whiteout_at(upper.as_fd(), newname, &st) => {
                let work = self.work.as_ref().ok_or_else(|| err(libc::EROFS))?;
                let tmp = work.temp_name();
                link_to(work.fd.as_fd(), &tmp)?;
                if let Err(e) = sys::renameat2(work.fd.as_fd(), &tmp, upper.as_fd(), newname, 0) {
                    let _ = sys::unlinkat(work.fd.as_fd(), &tmp, false);
                    return Err(e.into());
                }
            }
            Ok(_) => return Err(err(libc::EEXIST)),
            Err(_) => link_to(upper.as_fd(), newname)?,
        }
        if newparent != s.parent && self.shows_lower_ino(src) {
            self.mark_impure(np);
        }
        // The new name is one more name of the same node (same inode, same st_ino).
        let alias = Node::new(
            src.id,
            src.kind,
            src.st_ino(),
            NodeState::new(newparent, newname, vec![0]),
        );
        Ok(self.nodes.insert(alias).node().clone())
    }

    /// Put a whiteout at `name` in upper dir `upper`, replacing whatever the upper has there.
    fn whiteout(&self, upper: BorrowedFd<'_>, name: &OsStr, replace: bool) -> Result<()> {
        let work = self.work.as_ref().ok_or_else(|| err(libc::EROFS))?;
        if !replace {
            return work.link_whiteout(upper, name);
        }
        // Build it aside and rename it over the upper object: one atomic step.
        let tmp = work.temp_name();
        work.link_whiteout(work.fd.as_fd(), &tmp)?;
        if let Err(e) = sys::renameat2(work.fd.as_fd(), &tmp, upper, name, 0) {
            let _ = sys::unlinkat(work.fd.as_fd(), &tmp, false);
            return Err(e.into());
        }
        Ok(())
    }

    /// An O_PATH fd that keeps reaching a non-directory after its name goes away.
    /// Does upper node `n` show another inode number than its upper object's (a merged
    /// directory, a copy with an origin)?
    pub(super) fn shows_lower_ino(&self, n: &Node) -> bool {
        self.real_in(n, 0)
            .and_then(|r| r.stat())
            .is_ok_and(|st| self.layers.union_ino(0, st.st_ino) != n.st_ino())
    }

    /// Reach non-directory `n` by `fd` (from `keep_fd`: its object in its top layer) while a
    /// rename or unlink changes its names on disk, until the guard drops, when its names say
    /// what the disk does. A request meanwhile (a getattr through another name of a hard
    /// link) would else meet the whiteout, or the file put in its place.
    pub(super) fn pin_object(&self, n: &Arc<Node>, fd: Option<&Arc<OwnedFd>>) -> Option<Pinned> {
        let fd = fd?;
        {
            let mut s = n.state.write().expect("node state lock");
            let layer = s.layers[0];
            s.moving.push((layer, fd.clone()));
        }
        // A request that read the name before it was pinned is done with it before it changes.
        n.await_reachers();
        Some(Pinned(n.clone(), fd.clone()))
    }

    /// An O_PATH fd on non-directory `n`'s object, opened by its first name (not by the name
    /// an unlink removes: that fd would keep its directory, removed later, from being freed).
    /// Under its object lock: a rename of that name elsewhere cannot make it a whiteout
    /// meanwhile (a link made later from a whiteout's fd would link the whiteout; engine
    /// fuzz `races`), and one under way gives its pinned fd.
    pub(crate) fn keep_fd(&self, n: &Node) -> Option<Arc<OwnedFd>> {
        if n.is_dir() {
            return None;
        }
        self.with_real(n, |r| match r {
            Real::At(dir, name) => Ok(Arc::new(sys::openat(dir.as_fd(), name, libc::O_PATH, 0)?)),
            Real::Fd(fd) => Ok(fd.clone()),
        })
        .ok()
    }

    /// An fd on directory `n` in its top layer, taken before its removal: a process that
    /// still holds it (its working directory) gets its attributes, as from the kernel.
    pub(super) fn dir_keep(&self, n: &Node) -> Option<Arc<OwnedFd>> {
        self.dir_fd(n, n.top_layer()).ok()
    }

    /// `parent/name` left the union. A node with no name left is marked unlinked and keeps
    /// working (through `keep`) for whoever still holds it; an upper file's index entry goes
    /// with its last name.
    pub(super) fn detach(&self, n: &Node, parent: u64, name: &OsStr, keep: Option<Arc<OwnedFd>>) {
        // Its other names in directories the kernel forgot do not keep it named.
        if !n.is_dir() && !n.state.read().expect("node state lock").aliases.is_empty() {
            self.prune_names(n);
        }
        let named_elsewhere = keep
            .as_ref()
            .filter(|_| n.top_layer() == 0 && !n.is_dir())
            .is_some_and(|k| self.name_dropped(k));
        {
            let mut s = n.state.write().expect("node state lock");
            if s.remove_name(parent, name) {
                s.unlinked = true;
                s.named_elsewhere = named_elsewhere;
                // (Without an fd from this removal, the one an earlier one kept reaches it.)
                let top = s.layers[0];
                let kept = s
                    .kept
                    .as_ref()
                    .filter(|(l, _)| *l == top)
                    .map(|(_, fd)| fd.clone());
                if let Some(k) = keep.or(kept) {
                    s.detached = Some(k);
                }
            } else if let Some(k) = keep {
                s.kept = Some((s.layers[0], k));
            }
        }
        self.nodes.unindex_if(parent, name, n.id);
    }

    pub fn unlink(&self, parent: u64, name: &OsStr) -> Result<()> {
        check_name(name)?;
        if !self.writable() {
            return Err(err(libc::EROFS));
        }
        let p = self.dir_node(parent)?;
        self.copy_up(&p, Data::All)?;
        let _g = p.dir_lock.write().expect("dir lock");
        Self::live_dir(&p)?;
        let n = self.child(&p, name)?.ok_or_else(|| err(libc::ENOENT))?;
        if n.is_dir() {
            return Err(err(libc::EISDIR));
        }
        self.index_before_removal(&n)?;
        let upper = self.dir_fd(&p, 0)?;
        // No copy-up of the file lands meanwhile (the kernel's copy-up holds the upper
        // parent's lock): a whiteout made for a lower file would meet the copy (EEXIST;
        // engine fuzz `races`), and the copy-up, once this is done, finds it unlinked.
        let _copying = n.copy_lock.lock().expect("copy lock");
        let in_upper = n.top_layer() == 0;
        let below = self.exists_below(&p, name)?;
        let keep = self.keep_fd(&n);
        let _pinned = self.pin_object(&n, keep.as_ref());
        match (in_upper, below) {
            (true, false) => sys::unlinkat(upper.as_fd(), name, false)?,
            (true, true) => self.whiteout(upper.as_fd(), name, true)?,
            (false, _) => self.whiteout(upper.as_fd(), name, false)?,
        }
        self.detach(&n, p.id, name, keep);
        self.removed(p.id, name, "unlink", !in_upper || below);
        Ok(())
    }

    /// Before a name of a lower hard link goes (unlink, rename over it), copy the file up
    /// into the index, as the kernel's ovl_nlink_start: the union count kept there then
    /// drops with the name, the file's other names (met later) share the copy, and an fd
    /// still open on the removed name changes that copy.
    pub(super) fn index_before_removal(&self, n: &Arc<Node>) -> Result<()> {
        if n.kind != Kind::File || n.top_layer() == 0 || self.index().is_none() {
            return Ok(());
        }
        if self.real(n)?.stat()?.st_nlink > 1 {
            self.copy_up(n, Data::Meta)?;
        }
        Ok(())
    }

    pub fn rmdir(&self, parent: u64, name: &OsStr) -> Result<()> {
        check_name(name)?;
        if !self.writable() {
            return Err(err(libc::EROFS));
        }
        let p = self.dir_node(parent)?;
        if p.top_layer() != 0 {
            // As the kernel, a failing rmdir changes nothing: check before copying the parent
            // up (found by the soak, seed 10487), and again below under the write lock.
            let _g = p.dir_lock.read().expect("dir lock");
            let n = self.child(&p, name)?.ok_or_else(|| err(libc::ENOENT))?;
            if !n.is_dir() {
                return Err(err(libc::ENOTDIR));
            }
            let _cg = n.dir_lock.read().expect("dir lock");
            if !self.is_empty_dir(&n)? {
                return Err(err(libc::ENOTEMPTY));
            }
        }
        self.copy_up(&p, Data::All)?;
        let _g = p.dir_lock.write().expect("dir lock");
        Self::live_dir(&p)?;
        let n = self.child(&p, name)?.ok_or_else(|| err(libc::ENOENT))?;
        if !n.is_dir() {
            return Err(err(libc::ENOTDIR));
        }
        let _cg = n.dir_lock.write().expect("dir lock");
        if !self.is_empty_dir(&n)? {
            return Err(err(libc::ENOTEMPTY));
        }
        let upper = self.dir_fd(&p, 0)?;
        let below = self.exists_below(&p, name)?;
        let keep = self.dir_keep(&n);
        // (No copy-up of it lands meanwhile: see `unlink`.)
        let _copying = n.copy_lock.lock().expect("copy lock");
        // Its name goes (another directory may take it): see `dirmoves`.
        let dir_moving = self.dir_moves.begin();
        if n.top_layer() == 0 {
            let work = self.work.as_ref().ok_or_else(|| err(libc::EROFS))?;
            let direct = if below {
                Err(err(libc::ENOTEMPTY))
            } else {
                sys::unlinkat(upper.as_fd(), name, true).map_err(Into::into)
            };
            if direct.is_err() {
                // The upper dir holds whiteouts (or must leave one): move it aside atomically,
                // leaving a whiteout if a lower layer has the name, then clear it.
                let tmp = work.temp_name();
                let flags = if below { sys::RENAME_WHITEOUT } else { 0 };
                sys::renameat2(upper.as_fd(), name, work.fd.as_fd(), &tmp, flags)?;
                remove_tree(work.fd.as_fd(), &tmp, 0)?;
            }
        } else {
            self.whiteout(upper.as_fd(), name, false)?;
        }
        self.detach(&n, p.id, name, keep);
        self.fds.drop_node(n.id);
        drop(dir_moving);
        self.removed(p.id, name, "rmdir", n.top_layer() != 0 || below);
        Ok(())
    }

    pub fn setattr(&self, id: u64, a: SetAttr) -> Result<Stat> {
        let n = self.node(id)?;
        if !self.writable() {
            return Err(err(libc::EROFS));
        }
        let data = match a.size {
            Some(0) => Data::Empty,
            Some(_) => Data::All,
            None => Data::Meta,
        };
        self.copy_up(&n, data)?;
        if let Some(size) = a.size {
            if n.is_dir() {
                return Err(err(libc::EISDIR));
            }
            match a.fh.and_then(|fh| self.handles.file(fh)) {
                Some(h) if h.layer() == 0 => sys::ftruncate(h.fd().as_fd(), size)?,
                _ => self.with_real(&n, |r| {
                    Ok(sys::ftruncate(
                        r.open(libc::O_WRONLY, false)?.as_fd(),
                        size,
                    )?)
                })?,
            }
            if let Some(gid) = a.kill_privs {
                self.kill_privs(id, gid)?;
            }
        }
        let (uid, gid) = self.cfg.ids.to_host(a.uid, a.gid)?;
        self.with_real(&n, |real| self.set_meta(&n, real, &a, (uid, gid)))?;
        self.successors_changed(&n);
        self.attr_of(&n)
    }

    /// Owner, mode and times of `n`'s object `real`, as `a` asks (`ids`: the owner on the host).
    fn set_meta(
        &self,
        n: &Node,
        real: &Real,
        a: &SetAttr,
        ids: (Option<u32>, Option<u32>),
    ) -> Result<()> {
        let (uid, gid) = ids;
        if let Some(x) = self.cfg.ids.xattr
            && (uid.is_some() || gid.is_some() || a.mode.is_some())
        {
            // Owner and mode live in the override xattr; the real file stays the daemon's.
            let st = real.stat()?;
            let (ou, og, om) = real
                .getxattr(x)
                .ok()
                .and_then(|v| super::ids::parse_override(&v))
                .unwrap_or((st.st_uid, st.st_gid, st.st_mode & 0o7777));
            let mode = (st.st_mode & libc::S_IFMT) | a.mode.map_or(om, |m| m & 0o7777);
            let v = super::ids::format_override(uid.unwrap_or(ou), gid.unwrap_or(og), mode);
            sys::setxattr(real.xtarget(), x, &v, 0)?;
        } else if uid.is_some() || gid.is_some() {
            let (u, g) = (uid.unwrap_or(u32::MAX), gid.unwrap_or(u32::MAX));
            real.xtarget().chown(u, g)?;
        }
        if let Some(mode) = a.mode.filter(|_| self.cfg.ids.xattr.is_none()) {
            if n.kind == Kind::Symlink {
                return Err(err(libc::EOPNOTSUPP));
            }
            real.xtarget().chmod(mode & 0o7777)?;
        }
        if a.atime.is_some() || a.mtime.is_some() {
            match real {
                Real::At(d, name) => sys::utimensat(d.as_fd(), name, a.atime, a.mtime)?,
                Real::Fd(fd) => sys::futimens(fd.as_fd(), a.atime, a.mtime)?,
            }
        }
        Ok(())
    }

    pub fn setxattr(&self, id: u64, name: &OsStr, value: &[u8], flags: i32) -> Result<()> {
        if self.is_override_xattr(name.as_bytes()) {
            return Err(err(libc::EPERM));
        }
        let c = disk_xattr_name(name)?;
        if !self.writable() {
            return Err(err(libc::EROFS));
        }
        let n = self.node(id)?;
        self.copy_up(&n, Data::Meta)?;
        self.with_real(&n, |r| Ok(sys::setxattr(r.xtarget(), &c, value, flags)?))?;
        // (An ACL changes the mode.)
        self.successors_changed(&n);
        Ok(())
    }

    pub fn removexattr(&self, id: u64, name: &OsStr) -> Result<()> {
        if self.is_override_xattr(name.as_bytes()) {
            return Err(err(libc::EPERM));
        }
        let c = disk_xattr_name(name)?;
        if !self.writable() {
            return Err(err(libc::EROFS));
        }
        let n = self.node(id)?;
        // Removing an attribute that is not there copies nothing up (as the kernel).
        self.with_real(&n, |r| r.getxattr(&c))?;
        self.copy_up(&n, Data::Meta)?;
        self.with_real(&n, |r| Ok(sys::removexattr(r.xtarget(), &c)?))
    }
}
