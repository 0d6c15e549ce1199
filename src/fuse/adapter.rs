//! `fuser::Filesystem` over the union engine: each method converts arguments, calls the engine,
//! and replies or maps the one error. No union logic lives here.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, BackingId, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, IoctlFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry,
    ReplyIoctl, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow,
    WriteFlags,
};
use log::debug;

use crate::error::Error;
use crate::fuse::session::Passthrough;
use crate::observe::Op;
use crate::observe::stats::bump;
use crate::sys::{Stat, TimeSpec};
use crate::union::fileattr::AttrKind;
use crate::union::node::Kind;
use crate::union::write::{Caller, NewObj, SetAttr};
use crate::union::{Entry, Union};

/// Lower layers never change and the upper changes only through us (side effects on other
/// nodes are invalidated explicitly), so the kernel may cache entries, attrs and misses long.
const TTL: Duration = Duration::from_secs(60);

pub struct Adapter {
    pub fs: Arc<Union>,
    /// Asked for at mount; in effect only if the kernel agreed at init.
    pub want_passthrough: Passthrough,
    passthrough: Passthrough,
    posix_acl: bool,
    /// FUSE_DONT_MASK in effect: creates carry the caller's umask for us to apply.
    dont_mask: bool,
    backing: Mutex<Backing>,
}

/// Passthrough bookkeeping. The kernel binds an inode to one backing file while passthrough
/// opens of it exist, and refuses any other open of it. So a node is bound to the file of its
/// first passthrough open and later opens share it while it still holds the node's data. Once
/// the node has moved on (a reader of the lower file is still open after a copy-up), the open
/// is refused with ESTALE after the node's names went to a new node: the kernel then walks the
/// path again, finds the new node (a new inode) and opens that.
#[derive(Default)]
struct Backing {
    by_node: HashMap<u64, Bound>,
    /// handle -> (node, whether it is a page-cache open), for release
    by_handle: HashMap<u64, (u64, bool)>,
    /// nodes with page-cache (non-passthrough) opens, and how many
    cached: HashMap<u64, usize>,
}

struct Bound {
    id: Arc<BackingId>,
    /// open handles using it
    users: usize,
    /// the layer of the file it is on
    layer: usize,
}

/// How one open is served.
enum Served {
    Passthrough(Arc<BackingId>),
    /// By the daemon, with these open flags.
    Daemon(FopenFlags),
    /// Not on this node: it is bound to a file that no longer holds its data.
    Stale,
}

impl Adapter {
    /// The caller of a create, with the umask left to us under FUSE_DONT_MASK.
    fn creator(&self, req: &Request, umask: u32) -> Caller {
        Caller {
            umask: if self.dont_mask { umask & 0o777 } else { 0 },
            ..caller(req)
        }
    }

    pub fn new(fs: Arc<Union>, want_passthrough: Passthrough, posix_acl: bool) -> Adapter {
        Adapter {
            fs,
            want_passthrough,
            passthrough: Passthrough::Off,
            posix_acl,
            dont_mask: false,
            backing: Mutex::new(Backing::default()),
        }
    }

    /// Decide how handle `fh` of node `ino` is served.
    /// `fresh`: the file was created by this very request without set-id bits, so it has no
    /// privileges to look for.
    fn choose(
        &self,
        ino: u64,
        fh: u64,
        fresh: bool,
        open_backing: impl FnOnce(&OwnedFd) -> io::Result<BackingId>,
    ) -> Served {
        let st = &self.fs.obs.stats;
        let (fd, layer, upper) = match self.fs.backing_of(fh) {
            Some(b) if self.passthrough != Passthrough::Off => b,
            _ => {
                bump(&st.cached_opens);
                // Nothing bypasses the page cache: it stays good across opens.
                return Served::Daemon(FopenFlags::FOPEN_KEEP_CACHE);
            }
        };
        let mut guard = self.backing.lock().expect("backing lock");
        let b = &mut *guard;
        let served = match b.by_node.get_mut(&ino) {
            Some(bound) if bound.layer == layer => {
                bound.users += 1;
                Served::Passthrough(bound.id.clone())
            }
            // Bound to the lower file a reader from before the copy-up still has open.
            Some(_) => Served::Stale,
            None if b.cached.contains_key(&ino) => cached(upper),
            None if !upper && self.passthrough == Passthrough::Upper => cached(upper),
            // Writes through passthrough would keep set-id bits and capabilities.
            None if upper && !fresh && self.fs.has_privs(fh) => cached(upper),
            None => match open_backing(&fd) {
                Ok(id) => {
                    let id = Arc::new(id);
                    let bound = Bound {
                        id: id.clone(),
                        users: 1,
                        layer,
                    };
                    b.by_node.insert(ino, bound);
                    Served::Passthrough(id)
                }
                Err(e) => {
                    log::warn!("passthrough refused for node {ino}: {e}");
                    cached(upper)
                }
            },
        };
        match &served {
            Served::Passthrough(_) => {
                bump(&st.passthrough_opens);
                b.by_handle.insert(fh, (ino, false));
            }
            Served::Stale => {}
            Served::Daemon(_) => {
                bump(&st.cached_opens);
                *b.cached.entry(ino).or_default() += 1;
                b.by_handle.insert(fh, (ino, true));
            }
        }
        served
    }

    fn released(&self, fh: u64) {
        let mut b = self.backing.lock().expect("backing lock");
        let Some((ino, cached)) = b.by_handle.remove(&fh) else {
            return;
        };
        if cached {
            if let Some(n) = b.cached.get_mut(&ino) {
                *n -= 1;
                if *n == 0 {
                    b.cached.remove(&ino);
                }
            }
        } else if let Some(e) = b.by_node.get_mut(&ino) {
            e.users -= 1;
            if e.users == 0 {
                b.by_node.remove(&ino);
            }
        }
    }

    /// Answer a create or tmpfile with its new node and open file.
    fn reply_created(&self, made: crate::error::Result<(Entry, u64)>, reply: ReplyCreate) {
        match made {
            Ok((e, fh)) => {
                let (ttl, a) = (ttl_for(&e.attr), attr(&e.attr));
                let fresh = e.attr.st_mode & (libc::S_ISUID | libc::S_ISGID) == 0;
                match self.choose(e.id, fh, fresh, |f| reply.open_backing(f)) {
                    Served::Passthrough(id) => reply.created_passthrough_node(
                        INodeNo(e.id),
                        &ttl,
                        &a,
                        Generation(0),
                        FileHandle(fh),
                        FopenFlags::empty(),
                        &id,
                    ),
                    Served::Daemon(flags) => reply.created_node(
                        INodeNo(e.id),
                        &ttl,
                        &a,
                        Generation(0),
                        FileHandle(fh),
                        flags,
                    ),
                    // A new file is bound to nothing.
                    Served::Stale => {
                        self.fs.release(fh);
                        reply.error(Errno::EIO);
                    }
                }
            }
            Err(e) => reply.error(errno(&e)),
        }
    }
}

/// A page-cache open under passthrough. An upper file's cache may be stale (passthrough
/// writes bypass it), so the kernel drops it at open; lower data never changes, so it is kept.
fn cached(upper: bool) -> Served {
    Served::Daemon(if upper {
        FopenFlags::empty()
    } else {
        FopenFlags::FOPEN_KEEP_CACHE
    })
}

/// A negative entry: "no such name", cached by the kernel for TTL.
fn negative_attr() -> FileAttr {
    FileAttr {
        ino: INodeNo(0),
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: FileType::RegularFile,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

fn errno(e: &Error) -> Errno {
    Errno::from_i32(e.errno())
}

fn kind(k: Kind) -> FileType {
    match k {
        Kind::Dir => FileType::Directory,
        Kind::File => FileType::RegularFile,
        Kind::Symlink => FileType::Symlink,
        Kind::Fifo => FileType::NamedPipe,
        Kind::Socket => FileType::Socket,
        Kind::CharDev => FileType::CharDevice,
        Kind::BlockDev => FileType::BlockDevice,
    }
}

fn time(s: i64, ns: i64) -> SystemTime {
    if s >= 0 {
        UNIX_EPOCH + Duration::new(s as u64, ns as u32)
    } else {
        UNIX_EPOCH - Duration::new(s.unsigned_abs(), 0) + Duration::new(0, ns as u32)
    }
}

fn attr(st: &Stat) -> FileAttr {
    FileAttr {
        ino: INodeNo(st.st_ino),
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        atime: time(st.st_atime, st.st_atime_nsec),
        mtime: time(st.st_mtime, st.st_mtime_nsec),
        ctime: time(st.st_ctime, st.st_ctime_nsec),
        crtime: UNIX_EPOCH,
        kind: kind(Kind::from_mode(st.st_mode)),
        perm: (st.st_mode & 0o7777) as u16,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev as u32,
        blksize: st.st_blksize as u32,
        flags: 0,
    }
}

/// A hard-linked file may change through another name (another node): never cache its attrs.
fn ttl_for(st: &Stat) -> Duration {
    if st.st_mode & libc::S_IFMT != libc::S_IFDIR && st.st_nlink > 1 {
        Duration::ZERO
    } else {
        TTL
    }
}

/// The node id is st_ino, except for an object that got a fresh id because the kernel still
/// holds a removed one under its number (`NodeTable::id_for`).
fn reply_entry(reply: ReplyEntry, r: Result<Entry, Error>) {
    match r {
        Ok(e) => reply.entry_node(
            INodeNo(e.id),
            &ttl_for(&e.attr),
            &attr(&e.attr),
            Generation(0),
        ),
        Err(e) => reply.error(errno(&e)),
    }
}

fn timespec(t: Option<TimeOrNow>) -> TimeSpec {
    match t {
        None => None,
        Some(TimeOrNow::Now) => Some(None),
        Some(TimeOrNow::SpecificTime(t)) => Some(Some(match t.duration_since(UNIX_EPOCH) {
            Ok(d) => (d.as_secs() as i64, d.subsec_nanos() as i64),
            Err(e) => (-(e.duration().as_secs() as i64), 0),
        })),
    }
}

fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
        umask: 0,
    }
}

impl Filesystem for Adapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        // O_TRUNC arrives with the open, so a truncating open copies up no data; readdirplus
        // saves a lookup round trip per entry for `ls -l`, `find`, `du`. A node's symlink
        // target never changes (a new target is a new node), so the kernel may keep it:
        // otherwise every path through a symlink costs a READLINK (/bin and /lib64 in a
        // merged-/usr rootfs: 5 per exec).
        let want = InitFlags::FUSE_ATOMIC_O_TRUNC
            | InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_HANDLE_KILLPRIV_V2
            | InitFlags::FUSE_CACHE_SYMLINKS;
        let have = config.capabilities();
        let _ = config.add_capabilities(want & have);
        // The kernel then checks permissions against ACLs, as overlayfs does (mode bits alone
        // refused what an ACL grants), and caches them: `ls -l` asks for
        // system.posix_acl_access of every entry, a round trip each without the cache.
        if self.posix_acl
            && have.contains(InitFlags::FUSE_POSIX_ACL)
            && config.add_capabilities(InitFlags::FUSE_POSIX_ACL).is_ok()
        {
            log::info!("POSIX ACLs: checked and cached by the kernel");
            // With ACLs the umask is not applied under a default ACL: leave it to us (the
            // kernel would apply it to every create).
            self.dont_mask = have.contains(InitFlags::FUSE_DONT_MASK)
                && config.add_capabilities(InitFlags::FUSE_DONT_MASK).is_ok();
        }
        if self.want_passthrough != Passthrough::Off {
            // Backing files live on plain filesystems: one level of stacking is enough.
            if have.contains(InitFlags::FUSE_PASSTHROUGH)
                && config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
                && config.set_max_stack_depth(1).is_ok()
            {
                self.passthrough = self.want_passthrough;
            }
        }
        log::info!(
            "data path: {}",
            if self.passthrough == Passthrough::All {
                "FUSE passthrough"
            } else if self.passthrough == Passthrough::Upper {
                "FUSE passthrough for upper files, page cache for lower ones"
            } else {
                "FUSE reads/writes with page cache (keep_cache)"
            }
        );
        Ok(())
    }

    fn destroy(&mut self) {
        super::session::exit_after_unmount();
    }

    fn disconnected(&self) {
        super::session::exit_soon();
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let _op = self.fs.obs.begin(Op::Lookup, req.pid());
        debug!("lookup {} {:?}", parent.0, name);
        match self.fs.lookup(parent.0, name) {
            // Misses are cached too: a $PATH search or a failed stat costs one request.
            Err(e) if e.errno() == libc::ENOENT => {
                reply.entry(&TTL, &negative_attr(), Generation(0))
            }
            r => reply_entry(reply, r),
        }
    }

    fn forget(&self, req: &Request, ino: INodeNo, nlookup: u64) {
        let _op = self.fs.obs.begin(Op::Forget, req.pid());
        self.fs.forget(ino.0, nlookup);
    }

    fn getattr(&self, req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let _op = self.fs.obs.begin(Op::Getattr, req.pid());
        debug!("getattr {}", ino.0);
        match self.fs.getattr(ino.0) {
            Ok(st) => reply.attr(&ttl_for(&st), &attr(&st)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let _op = self.fs.obs.begin(Op::Setattr, req.pid());
        debug!(
            "setattr {} mode={mode:?} uid={uid:?} gid={gid:?} size={size:?}",
            ino.0
        );
        let a = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: timespec(atime),
            mtime: timespec(mtime),
            fh: fh.map(|f| f.0),
            // FUSE_HANDLE_KILLPRIV_V2 hides FATTR_KILL_SUIDGID from fuser: any caller but root
            // is taken to lack CAP_FSETID.
            kill_privs: (req.uid() != 0).then_some(req.gid()),
        };
        match self.fs.setattr(ino.0, a) {
            Ok(st) => reply.attr(&ttl_for(&st), &attr(&st)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readlink(&self, req: &Request, ino: INodeNo, reply: ReplyData) {
        let _op = self.fs.obs.begin(Op::Readlink, req.pid());
        debug!("readlink {}", ino.0);
        match self.fs.readlink(ino.0) {
            Ok(t) => reply.data(std::os::unix::ffi::OsStrExt::as_bytes(t.as_os_str())),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let _op = self.fs.obs.begin(Op::Mknod, req.pid());
        debug!("mknod {} {:?} {mode:o}", parent.0, name);
        let obj = NewObj::Node {
            mode,
            rdev: rdev as u64,
        };
        reply_entry(
            reply,
            self.fs
                .create_obj(parent.0, name, obj, self.creator(req, umask))
                .map(|r| r.0),
        );
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let _op = self.fs.obs.begin(Op::Mkdir, req.pid());
        debug!("mkdir {} {:?} {mode:o}", parent.0, name);
        reply_entry(
            reply,
            self.fs
                .create_obj(
                    parent.0,
                    name,
                    NewObj::Dir { mode },
                    self.creator(req, umask),
                )
                .map(|r| r.0),
        );
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _op = self.fs.obs.begin(Op::Unlink, req.pid());
        debug!("unlink {} {:?}", parent.0, name);
        match self.fs.unlink(parent.0, name) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _op = self.fs.obs.begin(Op::Rmdir, req.pid());
        debug!("rmdir {} {:?}", parent.0, name);
        match self.fs.rmdir(parent.0, name) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let _op = self.fs.obs.begin(Op::Symlink, req.pid());
        debug!("symlink {} {:?} -> {:?}", parent.0, link_name, target);
        let obj = NewObj::Symlink {
            target: target.as_os_str(),
        };
        reply_entry(
            reply,
            self.fs
                .create_obj(parent.0, link_name, obj, caller(req))
                .map(|r| r.0),
        );
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let _op = self.fs.obs.begin(Op::Rename, req.pid());
        debug!(
            "rename {} {:?} -> {} {:?} {flags:?}",
            parent.0, name, newparent.0, newname
        );
        match self
            .fs
            .rename(parent.0, name, newparent.0, newname, flags.bits())
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn link(
        &self,
        req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let _op = self.fs.obs.begin(Op::Link, req.pid());
        debug!("link {} -> {} {:?}", ino.0, newparent.0, newname);
        reply_entry(reply, self.fs.link(ino.0, newparent.0, newname));
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let _op = self.fs.obs.begin(Op::Open, req.pid());
        debug!("open {} {:#x}", ino.0, flags.0);
        match self.fs.open(ino.0, flags.0) {
            Ok(fh) => {
                // As for truncate: an O_TRUNC open by a caller other than root drops set-id bits.
                if flags.0 & libc::O_TRUNC != 0
                    && req.uid() != 0
                    && let Err(e) = self.fs.kill_privs(ino.0, req.gid())
                {
                    self.fs.release(fh);
                    return reply.error(errno(&e));
                }
                match self.choose(ino.0, fh, false, |f| reply.open_backing(f)) {
                    Served::Passthrough(id) => {
                        reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), &id)
                    }
                    Served::Daemon(flags) => reply.opened(FileHandle(fh), flags),
                    Served::Stale => {
                        // open(2) retries a path walk that ends in ESTALE once, revalidating
                        // every entry: it finds the successor.
                        self.fs.release(fh);
                        self.fs.reissue(ino.0);
                        reply.error(Errno::ESTALE);
                    }
                }
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn read(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let _op = self.fs.obs.begin(Op::Read, req.pid());
        self.fs.read_with(fh.0, offset, size, |r| match r {
            Ok(d) => reply.data(d),
            Err(e) => reply.error(errno(&e)),
        });
    }

    fn write(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let _op = self.fs.obs.begin(Op::Write, req.pid());
        // With FUSE_HANDLE_KILLPRIV_V2 the kernel flags writes by callers without CAP_FSETID.
        let kill = write_flags
            .contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID)
            .then_some(req.gid());
        match self.fs.write(fh.0, offset, data, kill) {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn flush(
        &self,
        req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        let _op = self.fs.obs.begin(Op::Flush, req.pid());
        // Nothing is buffered and locks are the kernel's: ENOSYS tells it to stop sending
        // FLUSH on every close (it then counts as success), saving a round trip.
        reply.error(Errno::ENOSYS);
    }

    fn release(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let _op = self.fs.obs.begin(Op::Release, req.pid());
        self.released(fh.0);
        self.fs.release(fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let _op = self.fs.obs.begin(Op::Fsync, req.pid());
        match self.fs.fsync(fh.0, datasync) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn opendir(&self, req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let _op = self.fs.obs.begin(Op::Opendir, req.pid());
        // ENOSYS: the kernel stops sending OPENDIR and RELEASEDIR (two round trips per
        // directory walked) and caches listings (FOPEN_CACHE_DIR | FOPEN_KEEP_CACHE), which
        // change only through this mount, which tells it.
        debug!("opendir {}: ENOSYS", ino.0);
        reply.error(Errno::ENOSYS);
    }

    fn readdir(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let _op = self.fs.obs.begin(Op::Readdir, req.pid());
        debug!("readdir {} off={offset}", ino.0);
        match self.fs.readdir(ino.0, offset) {
            Ok(entries) => {
                for (i, e) in entries.iter().enumerate().skip(offset as usize) {
                    if reply.add(INodeNo(e.ino), (i + 1) as u64, kind(e.kind), &e.name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdirplus(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let _op = self.fs.obs.begin(Op::Readdirplus, req.pid());
        debug!("readdirplus {} off={offset}", ino.0);
        let entries = match self.fs.readdir(ino.0, offset) {
            Ok(e) => e,
            Err(e) => return reply.error(errno(&e)),
        };
        let dir_attr = match self.fs.getattr(ino.0) {
            Ok(st) => attr(&st),
            Err(e) => return reply.error(errno(&e)),
        };
        for (i, e) in entries.iter().enumerate().skip(offset as usize) {
            let off = (i + 1) as u64;
            let b = e.name.as_encoded_bytes();
            if b == b"." || b == b".." {
                // The kernel neither links nor counts these.
                let mut a = dir_attr;
                a.ino = INodeNo(e.ino);
                if reply.add(
                    INodeNo(e.ino),
                    off,
                    &e.name,
                    &Duration::ZERO,
                    &a,
                    Generation(0),
                ) {
                    break;
                }
                continue;
            }
            // Each entry returned counts as a lookup of it.
            let ent = match self.fs.lookup(ino.0, &e.name) {
                Ok(ent) => ent,
                Err(err) if err.errno() == libc::ENOENT => continue, // gone meanwhile
                Err(_) => {
                    // There but unreadable (a metadata-only copy without its data: EIO;
                    // not followed: EPERM): listed, as the kernel's readdir lists it, with
                    // node id 0 (no attributes: a stat asks again and gets the error).
                    let mut a = negative_attr();
                    a.ino = INodeNo(e.ino);
                    a.kind = kind(e.kind);
                    if reply.add(INodeNo(0), off, &e.name, &Duration::ZERO, &a, Generation(0)) {
                        break;
                    }
                    continue;
                }
            };
            if reply.add(
                INodeNo(ent.id),
                off,
                &e.name,
                &ttl_for(&ent.attr),
                &attr(&ent.attr),
                Generation(0),
            ) {
                self.fs.forget(ent.id, 1); // did not fit: not handed to the kernel
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        // Never sent once opendir said ENOSYS.
        let _op = self.fs.obs.begin(Op::Releasedir, req.pid());
        reply.ok();
    }

    fn fsyncdir(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let _op = self.fs.obs.begin(Op::Fsyncdir, req.pid());
        match self.fs.fsyncdir(ino.0, datasync) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn statfs(&self, req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let _op = self.fs.obs.begin(Op::Statfs, req.pid());
        match self.fs.statfs() {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                s.f_namelen as u32,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let _op = self.fs.obs.begin(Op::Setxattr, req.pid());
        debug!("setxattr {} {:?}", ino.0, name);
        match self.fs.setxattr(ino.0, name, value, flags) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn getxattr(&self, req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let _op = self.fs.obs.begin(Op::Getxattr, req.pid());
        debug!("getxattr {} {:?}", ino.0, name);
        xattr_reply(reply, size, self.fs.getxattr(ino.0, name));
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let _op = self.fs.obs.begin(Op::Listxattr, req.pid());
        debug!("listxattr {}", ino.0);
        xattr_reply(reply, size, self.fs.listxattr(ino.0));
    }

    fn removexattr(&self, req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _op = self.fs.obs.begin(Op::Removexattr, req.pid());
        debug!("removexattr {} {:?}", ino.0, name);
        match self.fs.removexattr(ino.0, name) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        let _op = self.fs.obs.begin(Op::Access, req.pid());
        match self.fs.access(ino.0, mask.bits()) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let _op = self.fs.obs.begin(Op::Create, req.pid());
        debug!("create {} {:?} {mode:o} {flags:#x}", parent.0, name);
        let made = self
            .fs
            .create(parent.0, name, mode, flags, self.creator(req, umask));
        self.reply_created(made, reply);
    }

    fn tmpfile(
        &self,
        req: &Request,
        parent: INodeNo,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let _op = self.fs.obs.begin(Op::Tmpfile, req.pid());
        debug!("tmpfile {} {mode:o} {flags:#x}", parent.0);
        let made = self
            .fs
            .tmpfile(parent.0, mode, flags, self.creator(req, umask));
        self.reply_created(made, reply);
    }

    /// Only the file-attribute ioctls (lsattr/chattr), which the kernel sends on its own
    /// for FS_IOC_GETFLAGS & co.; anything else is not a union's to answer (ENOTTY).
    fn ioctl(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        cmd: u32,
        in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        let _op = self.fs.obs.begin(Op::Ioctl, req.pid());
        debug!("ioctl {} {cmd:#x}", ino.0);
        let Some((kind, get)) = AttrKind::of(cmd) else {
            return reply.error(Errno::ENOTTY);
        };
        let done = if get {
            self.fs.fileattr_get(ino.0, kind)
        } else {
            self.fs
                .fileattr_set(ino.0, kind, in_data)
                .map(|()| Vec::new())
        };
        match done {
            Ok(out) => reply.ioctl(0, &out),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn fallocate(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let _op = self.fs.obs.begin(Op::Fallocate, req.pid());
        match self.fs.fallocate(fh.0, offset, length, mode) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn lseek(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let _op = self.fs.obs.begin(Op::Lseek, req.pid());
        match self.fs.lseek(fh.0, offset, whence) {
            Ok(o) => reply.offset(o),
            Err(e) => reply.error(errno(&e)),
        }
    }
}

fn xattr_reply(reply: ReplyXattr, size: u32, r: Result<Vec<u8>, Error>) {
    match r {
        Ok(v) if size == 0 => reply.size(v.len() as u32),
        Ok(v) if v.len() > size as usize => reply.error(Errno::from_i32(libc::ERANGE)),
        Ok(v) => reply.data(&v),
        Err(e) => reply.error(errno(&e)),
    }
}
