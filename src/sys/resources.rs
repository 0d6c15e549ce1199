//! Limits and placement: open files, CPUs, locked code pages, thread pinning.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::check;

/// Raise the soft open-file limit to the hard limit; returns the new soft limit.
pub fn raise_nofile_limit() -> u64 {
    // SAFETY: zeroed rlimit is valid; getrlimit/setrlimit take valid pointers.
    unsafe {
        let mut rl: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) != 0 {
            return 1024;
        }
        rl.rlim_cur = rl.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &rl);
        rl.rlim_cur
    }
}

/// Grow this process's fd table to hold `n` descriptors now. The kernel grows it on demand by
/// doubling, and in a multi-threaded process each growth waits out an RCU grace period
/// (`expand_fdtable` calls `synchronize_rcu`): milliseconds during which the request that
/// opened the descriptor stalls. Called before any thread exists, the growth costs nothing.
/// Best effort: Err only says the table kept its size.
pub fn reserve_fds(n: u32) -> io::Result<()> {
    if n == 0 {
        return Ok(());
    }
    let nul = std::fs::File::open("/dev/null")?;
    // SAFETY: F_DUPFD on a valid fd returns a new fd (>= n - 1) or -1; the new fd is owned
    // here and closed at once.
    let fd = check(unsafe { libc::fcntl(nul.as_raw_fd(), libc::F_DUPFD_CLOEXEC, (n - 1) as i32) })?;
    // SAFETY: fd was just returned by fcntl and is owned by nothing else.
    drop(unsafe { OwnedFd::from_raw_fd(fd) });
    Ok(())
}

/// CPUs this process may run on. (std's available_parallelism also reads the cgroup's CPU
/// quota from /sys: a third of a millisecond on every mount, for a thread count.)
pub fn cpus_allowed() -> usize {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; sched_getaffinity fills it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return 1;
        }
        libc::CPU_COUNT(&set) as usize
    }
}

/// Load and lock the executable's code in memory (best effort; needs CAP_IPC_LOCK or room
/// under RLIMIT_MEMLOCK). A page fault in the daemon stalls every process using the mount:
/// after a cache drop or under memory pressure, the first lookups would read the daemon's
/// own code from disk. Returns the bytes locked.
pub fn lock_own_code() -> io::Result<usize> {
    let exe = std::fs::read_link("/proc/self/exe")?;
    let maps = std::fs::read_to_string("/proc/self/maps")?;
    let mut locked = 0;
    for line in maps.lines() {
        // "start-end perms offset dev inode path"
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 6 || !f[1].contains('x') || std::path::Path::new(f[5]) != exe {
            continue;
        }
        let Some((a, b)) = f[0].split_once('-') else {
            continue;
        };
        let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)) else {
            continue;
        };
        lock_range(a, b, f[1].starts_with('r'))?;
        locked += b - a;
    }
    Ok(locked)
}

/// Lock mapped range [a, b) of this process's code. Marked locked-on-fault first (a quick
/// change of the mapping), then loaded a page at a time by reading it: a plain mlock() loads
/// the whole range under the process's mmap lock, and the low-priority thread doing it held
/// that lock while a request needing it (a brk, an mmap) waited, about 0.1 ms on the first
/// request after a mount.
fn lock_range(a: usize, b: usize, readable: bool) -> io::Result<()> {
    // SAFETY: mlock2 only changes how pages of a range mapped in this process are kept.
    if !readable
        || unsafe { libc::mlock2(a as *const libc::c_void, b - a, libc::MLOCK_ONFAULT) } != 0
    {
        // SAFETY: as above (kernels before 4.4 have no mlock2; a page that cannot be read
        // is loaded by the kernel).
        return check(unsafe { libc::mlock(a as *const libc::c_void, b - a) }).map(drop);
    }
    // SAFETY: sysconf has no preconditions.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    for p in (a..b).step_by(page.max(1)) {
        // SAFETY: p lies in a readable mapping of this process's executable (an r-x line of
        // /proc/self/maps), which stays mapped for the life of the process.
        unsafe { std::ptr::read_volatile(p as *const u8) };
    }
    Ok(())
}

/// Let the calling thread run on every CPU the process's main thread may use (a thread
/// started by a CPU-pinned one inherits its pin).
pub fn unpin_thread() -> io::Result<()> {
    // SAFETY: both calls read or write only the cpu_set_t owned here, of the size passed.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        let size = std::mem::size_of::<libc::cpu_set_t>();
        check(libc::sched_getaffinity(libc::getpid(), size, &mut set))?;
        check(libc::sched_setaffinity(0, size, &set))?;
    }
    Ok(())
}

/// Run the calling thread at SCHED_IDLE: it gets a CPU only when nothing else wants one (for
/// work that must never delay a request).
pub fn idle_priority() -> io::Result<()> {
    // SAFETY: a zeroed sched_param is valid (priority 0, the only one SCHED_IDLE takes).
    let param: libc::sched_param = unsafe { std::mem::zeroed() };
    // SAFETY: pid 0 is the calling thread; param is a valid pointer for the call.
    check(unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) }).map(|_| ())
}

/// Cap glibc's malloc arenas at `n`, unless MALLOC_ARENA_MAX chose already. By default each
/// thread that finds the arenas busy gets one more (up to 8 per CPU): a daemon's nodes, made
/// by whichever worker served the lookup, end up spread over several arenas around the
/// freed holes of each one's transient buffers. A 300k-file walk then held 95-112 MiB run
/// to run; with one arena, 95-99 (the per-thread caches keep the lock out of most calls).
/// Call before threads start.
pub fn limit_malloc_arenas(n: i32) {
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
        return;
    }
    // SAFETY: mallopt takes two ints and has no memory-safety preconditions.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, n);
    }
}

/// Give the pages of freed heap memory back to the system (glibc's malloc_trim): a daemon
/// whose kernel just forgot a walk's worth of inodes otherwise keeps their memory for good.
/// True if any was given back.
pub fn release_free_memory() -> bool {
    // SAFETY: malloc_trim takes a size and has no memory-safety preconditions.
    unsafe { libc::malloc_trim(0) == 1 }
}
