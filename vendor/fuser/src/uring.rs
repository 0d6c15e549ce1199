//! FUSE over io_uring (layerfs addition; Linux 6.14+, `fuse.enable_uring=Y`).
//!
//! The kernel keeps one request queue per possible CPU and puts each request on the queue
//! of the CPU its caller runs on. Each queue here is served by threads pinned to that CPU,
//! each with its own ring: a request and its reply cost no cross-CPU wake-up, and a reply
//! and the fetch of the next request are one `io_uring_enter`. FORGET and INTERRUPT still
//! arrive on /dev/fuse, as do all requests until every queue has registered.
//!
//! Entry buffer layout (one allocation per ring entry, 8-byte aligned):
//! `[fuse_uring_req_header: 288][gap: 256][payload: payload_size]`.
//! The kernel writes `fuse_in_header` at 0, the op header at 128 and the rest (names, data)
//! into the payload; before dispatch the header and op header are copied into the gap so
//! that they end where the payload starts, giving the contiguous request fuser parses.

use std::io;
use std::io::IoSlice;
use std::os::fd::AsFd;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::Condvar;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use io_uring::IoUring;
use io_uring::cqueue;
use io_uring::opcode;
use io_uring::squeue;
use io_uring::types;
use log::debug;
use log::warn;

use crate::Filesystem;
use crate::UringConfig;
use crate::channel::ChannelSender;
use crate::ll::Errno;
use crate::ll::Operation;
use crate::ll::RequestId;
use crate::ll::ResponseErrno;
use crate::ll::fuse_abi::fuse_opcode;
use crate::ll::reply::Response;
use crate::reply::ReplyEmpty;
use crate::reply::ReplySender;
use crate::request::RequestWithSender;
use crate::session::SessionEventLoop;

const CMD_REGISTER: u32 = 1;
const CMD_COMMIT_AND_FETCH: u32 = 2;
/// `struct fuse_in_header`.
const IN_HEADER: usize = 40;
/// `struct fuse_out_header`.
const OUT_HEADER: usize = 16;
/// Offsets in `struct fuse_uring_req_header`: in_out[128], op_in[128], ring_ent_in_out.
const OP_IN: usize = 128;
const ENT_IN_OUT: usize = 256;
const REQ_HEADER: usize = 288;
/// Room before the payload for the in header and the largest op header (128).
const GAP: usize = 256;
const PAYLOAD: usize = REQ_HEADER + GAP;

/// One ring entry's buffer, never freed (the kernel holds its address; see serve_queue).
/// Only the thread that owns the entry touches it, between a completion and the commit that
/// hands it back (replies are staged in `UringSlot` and copied in by that thread).
#[derive(Debug)]
struct EntryBuf {
    base: *mut u64,
    payload_size: usize,
    iov: [libc::iovec; 2],
}

// SAFETY: the buffer belongs to one entry; the kernel uses it until a completion, then only
// the entry's thread reads and writes it until the commit.
unsafe impl Send for EntryBuf {}
unsafe impl Sync for EntryBuf {}

impl EntryBuf {
    fn new(payload_size: usize) -> Box<EntryBuf> {
        let words = (PAYLOAD + payload_size).div_ceil(8);
        let base = Box::into_raw(vec![0u64; words].into_boxed_slice()) as *mut u64;
        let bytes = base as *mut u8;
        let mut b = Box::new(EntryBuf {
            base,
            payload_size,
            iov: [
                libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0,
                },
                libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0,
                },
            ],
        });
        b.iov[0] = libc::iovec {
            iov_base: bytes.cast(),
            iov_len: REQ_HEADER,
        };
        b.iov[1] = libc::iovec {
            // SAFETY: PAYLOAD + payload_size bytes were allocated.
            iov_base: unsafe { bytes.add(PAYLOAD) }.cast(),
            iov_len: payload_size,
        };
        b
    }

    fn bytes(&self) -> *mut u8 {
        self.base as *mut u8
    }

    fn read_u32(&self, off: usize) -> u32 {
        let mut v = [0u8; 4];
        // SAFETY: off + 4 is inside the header area.
        unsafe { std::ptr::copy_nonoverlapping(self.bytes().add(off), v.as_mut_ptr(), 4) };
        u32::from_ne_bytes(v)
    }

    fn read_u64(&self, off: usize) -> u64 {
        let mut v = [0u8; 8];
        // SAFETY: off + 8 is inside the header area.
        unsafe { std::ptr::copy_nonoverlapping(self.bytes().add(off), v.as_mut_ptr(), 8) };
        u64::from_ne_bytes(v)
    }

    /// The request the kernel put in this entry, as one contiguous `/dev/fuse` message.
    /// None if the sizes the kernel wrote don't add up.
    fn request(&self) -> Option<&[u8]> {
        let len = self.read_u32(0) as usize;
        let payload_sz = self.read_u32(ENT_IN_OUT + 16) as usize;
        let op = len.checked_sub(IN_HEADER)?.checked_sub(payload_sz)?;
        if op > OP_IN || payload_sz > self.payload_size {
            return None;
        }
        let start = PAYLOAD - op - IN_HEADER;
        // SAFETY: all ranges are inside the allocation; the kernel is done writing (we hold
        // a completion for this entry), and the gap is ours alone.
        unsafe {
            let b = self.bytes();
            std::ptr::copy_nonoverlapping(b, b.add(start), IN_HEADER);
            std::ptr::copy_nonoverlapping(b.add(OP_IN), b.add(start + IN_HEADER), op);
            Some(std::slice::from_raw_parts(b.add(start), len))
        }
    }

    /// Write a reply (out header + payload) where the kernel's commit reads it. Only once
    /// the request (which lives in the same buffer) is no longer borrowed.
    fn write_reply(&self, reply: &[u8]) -> io::Result<()> {
        if reply.len() < OUT_HEADER || reply.len() - OUT_HEADER > self.payload_size {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let payload = reply.len() - OUT_HEADER;
        // SAFETY: the header fits the header area and the rest the payload (checked above);
        // the kernel does not touch the entry until we commit it.
        unsafe {
            let b = self.bytes();
            std::ptr::copy_nonoverlapping(reply.as_ptr(), b, OUT_HEADER);
            std::ptr::copy_nonoverlapping(reply.as_ptr().add(OUT_HEADER), b.add(PAYLOAD), payload);
            let sz = (payload as u32).to_ne_bytes();
            std::ptr::copy_nonoverlapping(sz.as_ptr(), b.add(ENT_IN_OUT + 16), 4);
        }
        Ok(())
    }
}

/// A ring entry as replies see it.
#[derive(Debug)]
pub(crate) struct UringSlot {
    buf: Box<EntryBuf>,
    reply: Mutex<Staged>,
    cv: Condvar,
}

/// A reply waits here until the request is done with: the request's names and data live
/// in the payload area the reply goes to.
#[derive(Debug, Default)]
struct Staged {
    replied: bool,
    /// The entry's thread sleeps on `cv` for a reply from another thread. Replies almost
    /// always come from the entry's own thread: notify only when someone waits (a futex
    /// wake is a syscall even with nobody to wake).
    waiting: bool,
    bytes: Vec<u8>,
}

/// Reply sender for a request that came through io_uring: stages the reply for the
/// entry's thread, which writes it into the entry and commits it.
#[derive(Clone, Debug)]
pub(crate) struct UringReply {
    slot: Arc<UringSlot>,
    /// For passthrough backing ids, which are /dev/fuse ioctls.
    pub(crate) ch: ChannelSender,
}

impl UringReply {
    pub(crate) fn send(&self, data: &[IoSlice<'_>]) -> io::Result<()> {
        let mut st = self.slot.reply.lock().unwrap_or_else(|e| e.into_inner());
        if st.replied {
            return Err(io::Error::from_raw_os_error(libc::EALREADY));
        }
        st.bytes.clear();
        for d in data {
            st.bytes.extend_from_slice(d);
        }
        st.replied = true;
        if st.waiting {
            self.slot.cv.notify_all();
        }
        Ok(())
    }
}

/// An EIO reply to `unique`, as fuser encodes replies.
fn eio(unique: u64) -> Vec<u8> {
    ResponseErrno(Errno::EIO).with_iovec(RequestId(unique), |iov| {
        iov.iter().flat_map(|s| s.iter().copied()).collect()
    })
}

const POSSIBLE: &str = "/sys/devices/system/cpu/possible";

/// The CPUs the kernel makes queues for (`num_possible_cpus`, ids 0..n), if sysfs says.
/// No guess where it does not (a sandbox without /sys): one queue too few and the kernel
/// would hold every request for it.
fn possible_cpus() -> Option<usize> {
    let s = std::fs::read_to_string(POSSIBLE).ok()?;
    let last = s
        .trim()
        .split(',')
        .filter_map(|r| r.rsplit('-').next())
        .filter_map(|n| n.parse::<usize>().ok())
        .max()?;
    Some(last + 1)
}

fn set_policy(policy: i32) -> bool {
    // SAFETY: plain syscall on a zeroed sched_param owned here (pid 0: this thread).
    unsafe {
        let p: libc::sched_param = std::mem::zeroed();
        libc::sched_setscheduler(0, policy, &p) == 0
    }
}

/// May a queue thread drop to SCHED_IDLE for its commits? Only if it runs SCHED_OTHER (a
/// real-time or batch daemon keeps its policy) and may switch back, which takes
/// CAP_SYS_NICE or RLIMIT_NICE >= 20: tried once on a throwaway thread, never on a queue
/// thread that could be left idle.
fn idle_commit_possible() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| {
        // SAFETY: plain syscall.
        if unsafe { libc::sched_getscheduler(0) } != libc::SCHED_OTHER {
            return false;
        }
        let ok =
            std::thread::spawn(|| set_policy(libc::SCHED_IDLE) && set_policy(libc::SCHED_OTHER))
                .join()
                .unwrap_or(false);
        debug!("io_uring: replies committed at SCHED_IDLE: {ok}");
        ok
    })
}

/// How the io_uring queue threads of this process committed replies that woke a caller,
/// and how many woken callers were seen on another CPU next (for a filesystem's statistics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UringCommitStats {
    /// Committed at SCHED_IDLE.
    pub idle: u64,
    /// Committed plainly (idle commits off, not allowed, or not paying).
    pub plain: u64,
    /// Callers that ran on another CPU after a reply woke them.
    pub moves: u64,
}

static COMMITS_IDLE: AtomicU64 = AtomicU64::new(0);
static COMMITS_PLAIN: AtomicU64 = AtomicU64::new(0);
static MOVES: AtomicU64 = AtomicU64::new(0);

/// The counts so far, over every session of this process.
pub fn uring_commit_stats() -> UringCommitStats {
    UringCommitStats {
        idle: COMMITS_IDLE.load(Ordering::Relaxed),
        plain: COMMITS_PLAIN.load(Ordering::Relaxed),
        moves: MOVES.load(Ordering::Relaxed),
    }
}

/// Which queue thread's reply woke each caller last, to tell when a woken caller ran on
/// another CPU (it moved: the scheduler put it on an idle CPU rather than wait for ours).
/// A slot per tid hash: `tid << 32 | thread + 1`; a collision only loses a sample.
pub(crate) struct MoveBoard {
    last: Vec<AtomicU64>,
    /// Per queue thread: its callers seen moving, ever (wrapping).
    moved: Vec<AtomicU32>,
    /// Per queue thread: its CPU.
    cpu: Vec<usize>,
}

impl MoveBoard {
    const SLOTS: usize = 1024;

    /// A board for queue threads `0..cpus.len()`, thread `i` serving CPU `cpus[i]`.
    pub(crate) fn new(cpus: Vec<usize>) -> MoveBoard {
        MoveBoard {
            last: (0..Self::SLOTS).map(|_| AtomicU64::new(0)).collect(),
            moved: (0..cpus.len()).map(|_| AtomicU32::new(0)).collect(),
            cpu: cpus,
        }
    }

    fn slot(&self, tid: u32) -> &AtomicU64 {
        &self.last[tid as usize % Self::SLOTS]
    }

    /// Queue thread `me` is about to commit a reply that wakes `tid`.
    fn woke(&self, tid: u32, me: usize) {
        if tid != 0 {
            self.slot(tid)
                .store(u64::from(tid) << 32 | (me as u64 + 1), Ordering::Relaxed);
        }
    }

    /// A request from `tid` arrived on the queue of `cpu`.
    fn arrived(&self, tid: u32, cpu: usize) {
        if tid == 0 {
            return;
        }
        let slot = self.slot(tid);
        let v = slot.load(Ordering::Relaxed);
        if v >> 32 != u64::from(tid) {
            return;
        }
        let waker = (v & 0xffff_ffff) as usize;
        slot.store(0, Ordering::Relaxed);
        if let Some(w) = waker.checked_sub(1)
            && self.cpu.get(w).is_some_and(|&c| c != cpu)
        {
            self.moved[w].fetch_add(1, Ordering::Relaxed);
            MOVES.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn moved(&self, me: usize) -> u32 {
        self.moved[me].load(Ordering::Relaxed)
    }
}

/// Whether a queue thread commits its next waking reply at SCHED_IDLE. The switch there and
/// back costs about 3 us; it pays only where a caller woken by a plain commit would move to
/// an idle CPU (a wake-up there costs 20-60 us). Plain commits show that directly (their
/// callers move or not); idle ones only through a plain probe now and then.
#[derive(Debug)]
pub(crate) struct CommitPolicy {
    idle: bool,
    /// Waking commits in the current window, and the thread's move count when it began.
    commits: u32,
    moved_at_start: Option<u32>,
}

impl Default for CommitPolicy {
    fn default() -> Self {
        // Idle first: a lone caller on a quiet machine (where it pays) is the common case.
        CommitPolicy {
            idle: true,
            commits: 0,
            moved_at_start: None,
        }
    }
}

impl CommitPolicy {
    /// Plain commits per look at how many of their callers moved.
    const PLAIN_WINDOW: u32 = 64;
    /// More moves than this in a plain window: go idle.
    const PLAIN_MOVES: u32 = 8;
    /// In idle mode, one commit in this many is a plain probe...
    const PROBE_EVERY: u32 = 256;
    /// ...and after this many probes, fewer than 2 moves among them: go plain.
    const PROBES: u32 = 8;

    /// Commit the next waking reply idle? `moved` is the thread's move count so far.
    pub(crate) fn idle_next(&mut self, moved: u32) -> bool {
        let start = *self.moved_at_start.get_or_insert(moved);
        self.commits += 1;
        if self.idle {
            if self.commits < Self::PROBE_EVERY * Self::PROBES {
                return self.commits % Self::PROBE_EVERY != 0;
            }
            // The window's last commit is its last probe; its caller is still to show
            // whether it moves, so that probe counts in the next window's look.
            if moved.wrapping_sub(start) < 2 {
                self.idle = false;
                debug!("io_uring: callers stay put after plain commits: committing plainly");
            }
        } else {
            if self.commits < Self::PLAIN_WINDOW {
                return false;
            }
            if moved.wrapping_sub(start) > Self::PLAIN_MOVES {
                self.idle = true;
                debug!("io_uring: callers move after plain commits: committing at SCHED_IDLE");
            }
        }
        self.commits = 0;
        self.moved_at_start = Some(moved);
        false
    }
}

fn pin_to_cpu(cpu: usize) {
    // SAFETY: plain syscall on a zeroed cpu_set_t owned here.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
            debug!(
                "io_uring queue {cpu}: not pinned: {}",
                io::Error::last_os_error()
            );
        }
    }
}

fn uring_cmd(fd: i32, op: u32, qid: u16, commit_id: u64, user_data: u64) -> squeue::Entry128 {
    let mut cmd = [0u8; 80];
    // struct fuse_uring_cmd_req { u64 flags; u64 commit_id; u16 qid; u8 padding[6]; }
    cmd[8..16].copy_from_slice(&commit_id.to_ne_bytes());
    cmd[16..18].copy_from_slice(&qid.to_ne_bytes());
    opcode::UringCmd80::new(types::Fd(fd), op)
        .cmd(cmd)
        .build()
        .user_data(user_data)
}

fn register_cmd(fd: i32, qid: u16, buf: &EntryBuf, user_data: u64) -> squeue::Entry128 {
    let e = uring_cmd(fd, CMD_REGISTER, qid, 0, user_data);
    // The io-uring crate has no setter for `len` on a uring command; REGISTER passes the
    // iovec array in addr/len (sqe offsets 16 and 24).
    // SAFETY: Entry128 is repr(C), 128 bytes: a 64-byte io_uring_sqe then 64 bytes of cmd.
    let mut raw: [u8; 128] = unsafe { std::mem::transmute(e) };
    raw[16..24].copy_from_slice(&(buf.iov.as_ptr() as u64).to_ne_bytes());
    raw[24..28].copy_from_slice(&2u32.to_ne_bytes());
    // SAFETY: same layout as above.
    unsafe { std::mem::transmute::<[u8; 128], squeue::Entry128>(raw) }
}

pub(crate) type Ring = IoUring<squeue::Entry128, cqueue::Entry>;

/// Rings made at INIT for the queues of `cpus` CPUs, waiting for their queue threads.
#[derive(Default)]
pub(crate) struct Rings {
    pub(crate) cpus: usize,
    pub(crate) rings: Vec<Ring>,
}

impl std::fmt::Debug for Rings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} rings for {} CPUs", self.rings.len(), self.cpus)
    }
}

/// Everything FUSE over io_uring needs before INIT may ask for it (see `create_rings`): the
/// number of queues the kernel will wait for, and a ring for each queue thread. None, with
/// a warning saying why, where either is missing: the session then serves over /dev/fuse.
pub(crate) fn prepare(cfg: &UringConfig) -> Option<Rings> {
    let Some(cpus) = possible_cpus() else {
        warn!(
            "transport: /dev/fuse (no {POSSIBLE}: the kernel waits for a queue per possible CPU)"
        );
        return None;
    };
    match create_rings(cpus * cfg.threads_per_queue.max(1), cfg) {
        Ok(rings) => Some(Rings { cpus, rings }),
        Err(e) => {
            let why = match e.raw_os_error() {
                Some(libc::ENOMEM) => {
                    "; io_uring counts them against RLIMIT_MEMLOCK without CAP_IPC_LOCK"
                }
                Some(libc::EPERM | libc::ENOSYS) => {
                    "; io_uring is off for this process: kernel.io_uring_disabled, or a \
                     seccomp filter"
                }
                _ => "",
            };
            warn!("transport: /dev/fuse (io_uring rings could not be made: {e}{why})");
            None
        }
    }
}

/// The rings of every queue thread (`queues` of them), made before INIT answers. Once INIT
/// asks for FUSE over io_uring, the kernel holds every request until each queue has
/// registered, and nothing can take that back: a ring that cannot be made then (io_uring_setup
/// fails with ENOMEM past RLIMIT_MEMLOCK, as in a container without CAP_IPC_LOCK) would leave
/// the mount hanging. Made here, such a failure means /dev/fuse instead. Each is made
/// disabled, so the queue thread that enables it becomes its single issuer.
fn create_rings(queues: usize, cfg: &UringConfig) -> io::Result<Vec<Ring>> {
    let entries = (cfg.entries.max(1) as u32).next_power_of_two().max(2);
    (0..queues)
        .map(|_| {
            IoUring::builder()
                .setup_single_issuer()
                .setup_defer_taskrun()
                .setup_coop_taskrun()
                .setup_r_disabled()
                .build(entries)
        })
        .collect()
}

/// A queue thread's place: the kernel's queue (`qid`, a CPU), the thread's index among all
/// queue threads (`me`, for the `MoveBoard`), and its ring.
pub(crate) struct QueueThread {
    pub(crate) qid: usize,
    pub(crate) me: usize,
    pub(crate) ring: Ring,
}

/// Serve queue `qid` until the connection ends. Returns Err only if the queue could not
/// be set up; if that happens before `registered` is called, the kernel holds every request
/// of the connection (see `create_rings`).
pub(crate) fn serve_queue<FS: Filesystem>(
    se: &SessionEventLoop<FS>,
    q: QueueThread,
    board: &MoveBoard,
    cfg: UringConfig,
    payload_size: usize,
    registered: &mut dyn FnMut(),
) -> io::Result<()> {
    let QueueThread { qid, me, ring } = q;
    pin_to_cpu(qid);
    let n = cfg.entries.max(1);
    let slots: Vec<Arc<UringSlot>> = (0..n)
        .map(|_| {
            Arc::new(UringSlot {
                buf: EntryBuf::new(payload_size),
                reply: Mutex::new(Staged::default()),
                cv: Condvar::new(),
            })
        })
        .collect();
    // The ring was made disabled (see `create_rings`): the thread enabling it is its issuer.
    let r = ring
        .submitter()
        .register_enable_rings()
        .map(|()| ring)
        .and_then(|mut ring| {
            register(se, qid, &mut ring, &slots)?;
            registered();
            // After registering: the probe starts a thread, which the mount need not wait for.
            let idle_commit = cfg.idle_commit && idle_commit_possible();
            let modes = (idle_commit, cfg.adaptive_commit);
            serve_ring(se, qid, me, board, &mut ring, &slots, modes)
        });
    // The buffers stay allocated: after a queue ends (the connection is going away) the
    // kernel may still be tearing down other entries of this ring asynchronously, and the
    // process ends soon after anyway.
    std::mem::forget(slots);
    r
}

/// Hand the kernel every entry of the queue now, before waiting for a request: once every
/// queue has, the kernel sends requests over io_uring (the session then reports the mount
/// serving). An entry refused with EAGAIN is registered again by `serve_ring`.
fn register<FS: Filesystem>(
    se: &SessionEventLoop<FS>,
    qid: usize,
    ring: &mut IoUring<squeue::Entry128, cqueue::Entry>,
    slots: &[Arc<UringSlot>],
) -> io::Result<()> {
    let fd = se.ch.as_fd().as_raw_fd();
    for (i, s) in slots.iter().enumerate() {
        let sqe = register_cmd(fd, qid as u16, &s.buf, i as u64);
        // SAFETY: the iovecs and buffers in `slots` are never freed (see serve_queue).
        unsafe { ring.submission().push(&sqe) }
            .map_err(|_| io::Error::other("io_uring submission queue full"))?;
    }
    match ring.submit() {
        Err(e) if e.raw_os_error() != Some(libc::EINTR) => Err(e),
        _ => Ok(()),
    }
}

fn serve_ring<FS: Filesystem>(
    se: &SessionEventLoop<FS>,
    qid: usize,
    me: usize,
    board: &MoveBoard,
    ring: &mut IoUring<squeue::Entry128, cqueue::Entry>,
    slots: &[Arc<UringSlot>],
    (mut idle_commit, adaptive): (bool, bool),
) -> io::Result<()> {
    let fd = se.ch.as_fd().as_raw_fd();
    let n = slots.len();
    let mut register_retries = 0;
    let sender = se.ch.sender();
    let mut done = Vec::with_capacity(n);
    // Does a commit waiting in the submission queue wake a caller? (RELEASE, sent in the
    // background, wakes nobody: no need to go idle for it.)
    let mut wakes = false;
    // Caller of the reply waiting in the submission queue, and the policy for its commit.
    let mut woken = 0u32;
    let mut policy = CommitPolicy::default();
    loop {
        let waking = std::mem::take(&mut wakes) && !ring.submission().is_empty();
        let idle_now = waking && idle_commit && (!adaptive || policy.idle_next(board.moved(me)));
        if waking {
            board.woke(woken, me);
            let count = if idle_now {
                &COMMITS_IDLE
            } else {
                &COMMITS_PLAIN
            };
            count.fetch_add(1, Ordering::Relaxed);
        }
        if idle_now {
            // The commit wakes the caller while this thread still runs; at SCHED_IDLE this
            // CPU counts as free, so the caller stays (preempting us) rather than move to an
            // idle CPU. Back to SCHED_OTHER before waiting: a request is never served idle.
            set_policy(libc::SCHED_IDLE);
            let r = ring.submit();
            if !set_policy(libc::SCHED_OTHER) {
                // Allowed at the probe, refused now (a lowered RLIMIT_NICE?): stop switching.
                warn!(
                    "io_uring queue {qid}: cannot leave SCHED_IDLE: {}",
                    io::Error::last_os_error()
                );
                idle_commit = false;
            }
            match r {
                Err(e) if e.raw_os_error() != Some(libc::EINTR) => return Err(e),
                _ => {}
            }
        }
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => return Err(e),
        }
        done.clear();
        done.extend(
            ring.completion()
                .map(|c| (c.user_data() as usize, c.result())),
        );
        for &(i, res) in &done {
            if res == -libc::EAGAIN && register_retries < 100 {
                // REGISTER before the kernel finished processing INIT: try again shortly.
                register_retries += 1;
                std::thread::sleep(std::time::Duration::from_millis(1));
                let sqe = register_cmd(fd, qid as u16, &slots[i].buf, i as u64);
                // SAFETY: as above.
                unsafe { ring.submission().push(&sqe) }
                    .map_err(|_| io::Error::other("io_uring submission queue full"))?;
                continue;
            }
            if res < 0 {
                let err = io::Error::from_raw_os_error(-res);
                return match -res {
                    libc::ENOTCONN | libc::ECANCELED | libc::ENODEV | libc::ECONNABORTED => {
                        debug!("io_uring queue {qid}: connection ended ({err})");
                        if let Some(fs) = &se.filesystem.fs {
                            fs.disconnected();
                        }
                        Ok(())
                    }
                    _ => {
                        warn!("io_uring queue {qid}: {err}");
                        Err(err)
                    }
                };
            }
            se.uring_live
                .store(true, std::sync::atomic::Ordering::Relaxed);
            let slot = &slots[i];
            slot.reply.lock().unwrap_or_else(|e| e.into_inner()).replied = false;
            let reply = ReplySender::Uring(UringReply {
                slot: slot.clone(),
                ch: sender.clone(),
            });
            let unique = slot.buf.read_u64(8);
            // RELEASE and RELEASEDIR are sent in the background: nobody waits on their reply.
            let op = slot.buf.read_u32(4);
            wakes |=
                op != fuse_opcode::FUSE_RELEASE as u32 && op != fuse_opcode::FUSE_RELEASEDIR as u32;
            // fuse_in_header.pid: the calling thread. If a reply from another CPU's queue
            // woke it last, it moved here to run.
            woken = slot.buf.read_u32(32);
            board.arrived(woken, qid);
            match slot.buf.request() {
                Some(data) => match RequestWithSender::new(reply.clone(), data) {
                    Some(req) => {
                        if let Ok(Operation::Destroy(_)) = req.request.operation() {
                            req.reply::<ReplyEmpty>().ok();
                        } else {
                            req.dispatch(se);
                        }
                    }
                    None => {
                        let _ = reply.send(&[IoSlice::new(&eio(unique))]);
                    }
                },
                None => {
                    warn!("io_uring queue {qid}: malformed request {unique}");
                    let _ = reply.send(&[IoSlice::new(&eio(unique))]);
                }
            }
            // A filesystem may answer from another thread; the entry waits for it.
            let mut st = slot.reply.lock().unwrap_or_else(|e| e.into_inner());
            while !st.replied {
                st.waiting = true;
                st = slot.cv.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            st.waiting = false;
            if slot.buf.write_reply(&st.bytes).is_err() {
                warn!("io_uring queue {qid}: reply to {unique} too large for the entry");
                slot.buf.write_reply(&eio(unique))?;
            }
            drop(st);
            let sqe = uring_cmd(fd, CMD_COMMIT_AND_FETCH, qid as u16, unique, i as u64);
            // SAFETY: as for the registration above.
            if unsafe { ring.submission().push(&sqe) }.is_err() {
                ring.submit()?;
                // SAFETY: as above.
                unsafe { ring.submission().push(&sqe) }
                    .map_err(|_| io::Error::other("io_uring submission queue full"))?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{CommitPolicy, MoveBoard};

    /// Drive `n` waking commits, `moves(i, idle)` saying whether commit i's caller moves.
    fn run(p: &mut CommitPolicy, b: &MoveBoard, n: u32, moves: impl Fn(u32, bool) -> bool) -> u32 {
        let mut idle = 0;
        for i in 0..n {
            let is_idle = p.idle_next(b.moved(0));
            idle += u32::from(is_idle);
            b.woke(4242, 0);
            b.arrived(4242, if moves(i, is_idle) { 1 } else { 0 });
        }
        idle
    }

    #[test]
    fn callers_that_move_after_plain_commits_keep_idle_commits() {
        let b = MoveBoard::new(vec![0, 1]);
        let mut p = CommitPolicy::default();
        // Every plain commit's caller moves; idle commits keep it.
        let idle = run(&mut p, &b, 10_000, |_, idle| !idle);
        assert!(idle > 9_900, "{idle} of 10000 idle");
    }

    #[test]
    fn callers_that_stay_put_get_plain_commits_and_moving_ones_bring_idle_back() {
        let b = MoveBoard::new(vec![0, 1]);
        let mut p = CommitPolicy::default();
        // Nobody moves: after one probe window (2048 commits) every commit is plain.
        let idle = run(&mut p, &b, 2048, |_, _| false);
        assert!(idle > 2000, "idle first: {idle}");
        assert_eq!(run(&mut p, &b, 5_000, |_, _| false), 0);
        // Callers start moving after plain commits: idle again within two plain windows.
        let mut first_idle = None;
        for i in 0..1_000 {
            let idle = p.idle_next(b.moved(0));
            if idle && first_idle.is_none() {
                first_idle = Some(i);
            }
            b.woke(7, 0);
            b.arrived(7, if idle { 0 } else { 1 });
        }
        assert!(first_idle.is_some_and(|i| i <= 128), "{first_idle:?}");
    }

    #[test]
    fn a_move_is_counted_for_the_waker_once_and_only_across_cpus() {
        // Threads 0 and 1 serve CPU 0, thread 2 CPU 1.
        let b = MoveBoard::new(vec![0, 0, 1]);
        b.woke(9, 1);
        b.arrived(9, 0); // same CPU, other thread: not a move
        assert_eq!((b.moved(0), b.moved(1), b.moved(2)), (0, 0, 0));
        b.woke(9, 1);
        b.arrived(9, 1);
        b.arrived(9, 1); // counted once
        assert_eq!((b.moved(0), b.moved(1), b.moved(2)), (0, 1, 0));
        b.arrived(10, 0); // never woken by anyone
        assert_eq!(b.moved(1), 1);
    }
}
