//! Open files and directories: open (copying up for writes), read, write, sync, and the
//! offsets of a merged directory listing.

use std::collections::HashMap;
use std::ffi::{CStr, OsStr};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex, RwLock};

use super::copyup::Data;
use super::handle::{Handle, Open};
use super::readdir::DirEntry;
use super::write::{Caller, NewObj, open_flags};
use super::{Entry, Union};
use crate::error::{Result, err};
use crate::sys::{self, XTarget};

/// Flags that only matter to the open itself, never to the real file.
const OPEN_ONLY: i32 = libc::O_CREAT | libc::O_EXCL | libc::O_NOCTTY;

fn wants_write(flags: i32) -> bool {
    flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0
}

impl Union {
    pub fn open(&self, id: u64, flags: i32) -> Result<u64> {
        // A copy-up done by a first try that failed later stays done: the second finds it.
        self.with_fd_room(|| self.open_once(id, flags))
    }

    fn open_once(&self, id: u64, flags: i32) -> Result<u64> {
        let node = self.node(id)?;
        if node.is_dir() {
            return Err(err(libc::EISDIR));
        }
        if wants_write(flags) {
            if !self.writable() {
                return Err(err(libc::EROFS));
            }
            let data = if flags & libc::O_TRUNC != 0 {
                Data::Empty
            } else {
                Data::All
            };
            self.copy_up(&node, data)?;
        }
        let (fd, layer) = self.open_source(&node, flags & !OPEN_ONLY)?;
        Ok(self.add_handle(node, fd, layer, flags))
    }

    /// Open where a node's data is read from, and say that layer: its top object, or for a
    /// metadata-only copy the lower file holding its data. The node's own object is opened
    /// again by its new name if a rename or unlink moved it meanwhile.
    fn open_source(&self, node: &super::node::Node, flags: i32) -> Result<(OwnedFd, usize)> {
        match self.verified_data(node)? {
            Some(d) => Ok((
                self.data_real(&d)?.open(flags, false)?,
                d.layer().unwrap_or(0),
            )),
            None => {
                let layer = node.top_layer();
                let open = |r: &super::real::Real| r.open(flags, false);
                // Nothing there, or a whiteout (a device no driver has).
                let gone = |r: &Result<OwnedFd>| matches!(r, Err(e) if matches!(e.errno(), libc::ENOENT | libc::ENXIO));
                let (_, fd) = self.on_real(node, open, gone)?;
                Ok((fd, layer))
            }
        }
    }

    fn add_handle(
        &self,
        node: Arc<super::node::Node>,
        fd: OwnedFd,
        layer: usize,
        flags: i32,
    ) -> u64 {
        self.handles.insert(Open::File(Arc::new(Handle {
            node,
            fd: RwLock::new((Arc::new(fd), layer)),
            flags,
        })))
    }

    /// open(2) with O_TMPFILE: a new unnamed upper file, opened.
    pub fn tmpfile(&self, parent: u64, mode: u32, flags: i32, c: Caller) -> Result<(Entry, u64)> {
        let (entry, fd) = self.create_tmpfile(parent, mode, flags, c)?;
        let node = self.node(entry.id)?;
        Ok((entry, self.add_handle(node, fd, 0, open_flags(flags))))
    }

    /// create(2) with O_CREAT: a new upper file, opened.
    pub fn create(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        flags: i32,
        c: Caller,
    ) -> Result<(Entry, u64)> {
        if !self.writable() {
            return Err(err(libc::EROFS));
        }
        let (entry, fd) = self.create_obj(parent, name, NewObj::File { mode, flags }, c)?;
        let fd = fd.ok_or_else(|| err(libc::EIO))?;
        let node = self.node(entry.id)?;
        Ok((entry, self.add_handle(node, fd, 0, flags)))
    }

    /// What FUSE passthrough of this handle would be backed by: its own open file (the kernel
    /// only takes the path from it and opens its own file there with each open's flags) and
    /// the layer that file is in, 0 being the writable upper. Handles open for writing are
    /// always on the upper (copied up at open); a metadata-only copy's handle is on its data.
    pub fn backing_of(&self, fh: u64) -> Option<(Arc<OwnedFd>, usize, bool)> {
        let h = self.handles.file(fh)?;
        let (fd, layer) = h.fd.read().expect("handle fd lock").clone();
        Some((fd, layer, self.writable() && layer == 0))
    }

    fn handle(&self, fh: u64) -> Result<Arc<Handle>> {
        self.handles.file(fh).ok_or_else(|| err(libc::EBADF))
    }

    /// The fd to read from: a read-only handle opened on a lower file follows a later copy-up
    /// of the same node, so readers see what writers wrote (as the kernel does since 4.19).
    fn read_fd(&self, h: &Handle) -> Result<Arc<OwnedFd>> {
        let (fd, layer) = h.fd.read().expect("handle fd lock").clone();
        let now = h.node.state.read().expect("node state lock").read_layer();
        if layer == 0 || layer == now || !self.writable() {
            return Ok(fd);
        }
        let mut w = h.fd.write().expect("handle fd lock");
        if w.1 != now {
            let (nfd, now) = self.open_source(&h.node, h.flags & !(OPEN_ONLY | libc::O_TRUNC))?;
            *w = (Arc::new(nfd), now);
        }
        Ok(w.0.clone())
    }

    /// Read up to `size` bytes at `offset` and hand the outcome to `reply` (called exactly once),
    /// through a per-thread buffer reused (never re-zeroed) across requests.
    pub fn read_with<R>(
        &self,
        fh: u64,
        offset: u64,
        size: u32,
        reply: impl FnOnce(Result<&[u8]>) -> R,
    ) -> R {
        thread_local! {
            static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let fd = match self.handle(fh).and_then(|h| self.read_fd(&h)) {
            Ok(fd) => fd,
            Err(e) => return reply(Err(e)),
        };
        BUF.with(|b| {
            let mut buf = b.borrow_mut();
            let want = size as usize;
            if buf.len() < want {
                buf.resize(want, 0);
            }
            let mut got = 0;
            while got < want {
                match sys::pread(fd.as_fd(), &mut buf[got..want], offset + got as u64) {
                    Ok(0) => break,
                    Ok(n) => got += n,
                    Err(e) => return reply(Err(e.into())),
                }
            }
            reply(Ok(&buf[..got]))
        })
    }

    /// Write; `kill_privs` (an unprivileged writer, with its gid) first drops set-id bits
    /// and file capabilities, as a write does on any filesystem.
    pub fn write(
        &self,
        fh: u64,
        offset: u64,
        data: &[u8],
        kill_privs: Option<u32>,
    ) -> Result<usize> {
        let h = self.handle(fh)?;
        if h.layer() != 0 {
            return Err(err(libc::EBADF)); // opened read-only
        }
        if let Some(gid) = kill_privs {
            drop_privs(h.fd().as_fd(), gid)?;
        }
        Ok(sys::pwrite(h.fd().as_fd(), data, offset)?)
    }

    /// Drop set-id bits and capabilities of node `id` (truncate or O_TRUNC by an unprivileged
    /// caller of group `gid`).
    pub fn kill_privs(&self, id: u64, gid: u32) -> Result<()> {
        let n = self.node(id)?;
        if n.kind != super::node::Kind::File || n.top_layer() != 0 {
            return Ok(());
        }
        let fd = self.with_real(&n, |r| r.open(libc::O_PATH, false))?;
        drop_privs(fd.as_fd(), gid)
    }

    /// Does this handle's file carry privileges a write must drop (set-id bits, file
    /// capabilities)? Such files are never given to passthrough, whose writes would keep them.
    pub fn has_privs(&self, fh: u64) -> bool {
        let Some(h) = self.handles.file(fh) else {
            return false;
        };
        let fd = h.fd();
        sys::fstat(fd.as_fd()).is_ok_and(|st| st.st_mode & (libc::S_ISUID | libc::S_ISGID) != 0)
            || sys::getxattr(XTarget::Fd(fd.as_fd()), CAPS).is_ok_and(|v| v.is_some())
    }

    pub fn release(&self, fh: u64) {
        self.handles.remove(fh);
    }

    pub fn fsync(&self, fh: u64, datasync: bool) -> Result<()> {
        let h = self.handle(fh)?;
        Ok(sys::fsync(h.fd().as_fd(), datasync)?)
    }

    pub fn fallocate(&self, fh: u64, offset: u64, len: u64, mode: i32) -> Result<()> {
        let h = self.handle(fh)?;
        if h.layer() != 0 {
            return Err(err(libc::EBADF));
        }
        Ok(sys::fallocate(h.fd().as_fd(), mode, offset, len)?)
    }

    pub fn lseek(&self, fh: u64, offset: i64, whence: i32) -> Result<i64> {
        let h = self.handle(fh)?;
        let fd = self.read_fd(&h)?;
        Ok(sys::lseek(fd.as_fd(), offset, whence)?)
    }

    /// The listing of directory `id` for a read at `offset` (offset n = the n-th entry). The
    /// listing is re-read at 0, so a rewinddir sees changes and the reads of one pass are
    /// stable; it is dropped once a read reaches its end. There is no opendir (the kernel
    /// caches listings itself), so a pass is keyed by the directory, not by a handle.
    pub fn readdir(&self, id: u64, offset: u64) -> Result<Arc<Vec<DirEntry>>> {
        self.dir_node(id)?;
        let kept = (offset != 0).then(|| self.passes.get(id)).flatten();
        let entries = match kept {
            Some(e) => e,
            None => Arc::new(self.list_dir(id)?),
        };
        self.passes
            .set(id, (offset < entries.len() as u64).then(|| entries.clone()));
        Ok(entries)
    }

    pub fn fsyncdir(&self, id: u64, datasync: bool) -> Result<()> {
        let node = self.dir_node(id)?;
        if node.top_layer() != 0 || !self.writable() {
            return Ok(());
        }
        let fd = self.dir_fd(&node, 0)?;
        let rfd = sys::openat(
            fd.as_fd(),
            OsStr::new("."),
            libc::O_RDONLY | libc::O_DIRECTORY,
            0,
        )?;
        Ok(sys::fsync(rfd.as_fd(), datasync)?)
    }
}

const CAPS: &CStr = c"security.capability";

/// What a write by an unprivileged process of group `gid` does to a file's privileges (the
/// kernel's file_remove_privs; with FUSE_HANDLE_KILLPRIV_V2 it is left to us, since the
/// daemon's own writes would keep them): set-user-ID goes; set-group-ID goes with group
/// execute, or when the writer is not of the file's group.
fn drop_privs(fd: BorrowedFd<'_>, gid: u32) -> Result<()> {
    let st = sys::fstat(fd)?;
    let mut mode = st.st_mode & 0o7777 & !libc::S_ISUID;
    if mode & libc::S_ISGID != 0 && (mode & libc::S_IXGRP != 0 || gid != st.st_gid) {
        mode &= !libc::S_ISGID;
    }
    if mode != st.st_mode & 0o7777 {
        sys::chmod_fd(fd, mode)?;
    }
    // Only when present: removing it at all needs CAP_SETFCAP, which a rootless daemon lacks.
    if sys::getxattr(XTarget::Fd(fd), CAPS).is_ok_and(|v| v.is_some()) {
        sys::removexattr(XTarget::Fd(fd), CAPS)?;
    }
    Ok(())
}

/// The listings of readdir passes under way, by directory node: few at a time, so kept
/// here rather than in every node.
#[derive(Default)]
pub(crate) struct Passes {
    shards: [Mutex<HashMap<u64, Arc<Vec<DirEntry>>>>; 8],
}

impl Passes {
    fn shard(&self, id: u64) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Vec<DirEntry>>>> {
        self.shards[id as usize % self.shards.len()]
            .lock()
            .expect("passes lock")
    }

    fn get(&self, id: u64) -> Option<Arc<Vec<DirEntry>>> {
        self.shard(id).get(&id).cloned()
    }

    /// Keep `listing` for the pass's next read, or drop what was kept (None).
    pub(crate) fn set(&self, id: u64, listing: Option<Arc<Vec<DirEntry>>>) {
        let mut s = self.shard(id);
        match listing {
            Some(l) => s.insert(id, l),
            None => s.remove(&id),
        };
    }
}
