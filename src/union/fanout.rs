//! Independent blocking jobs side by side. On a cold cache each directory listing or stat in a
//! lower layer is a disk read, and the disk serves several at once: listing and stat-ing the
//! 2,000 directories of the bench's 100-layer stack took 235 ms one by one, 80 ms on 8
//! threads, 115 ms on 4 and 260 ms on 32. Worth the thread starts only for many jobs.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::Duration;

/// A few reads of one directory (stat, open, list, check for markers) that took longer than
/// this came from the disk; cached, they take a few microseconds. Callers fan out the rest
/// of such work only then: on a warm cache the threads cost more than they save.
/// `LAYERFS_COLD_US` in the daemon's environment sets it (0: always fan out, as the tests
/// do to take this path on a warm cache).
pub fn cold() -> Duration {
    static COLD: OnceLock<Duration> = OnceLock::new();
    *COLD.get_or_init(|| {
        let us = std::env::var("LAYERFS_COLD_US")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(50);
        Duration::from_micros(us)
    })
}

/// Threads at most, the calling one included.
const THREADS: usize = 8;
/// Fewer jobs than this per thread and the thread starts cost more than they save.
const MIN_JOBS_PER_THREAD: usize = 4;
/// The jobs block in syscalls with heap buffers: a small stack each.
const STACK: usize = 128 << 10;

/// `f` over `items`, results in order. The calling thread works too; helpers that cannot be
/// started just leave it more to do.
pub fn map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let threads = (items.len() / MIN_JOBS_PER_THREAD).min(THREADS);
    if threads <= 1 {
        return items.iter().map(&f).collect();
    }
    let next = AtomicUsize::new(0);
    let work = || {
        let mut out = Vec::new();
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(item) = items.get(i) else {
                return out;
            };
            out.push((i, f(item)));
        }
    };
    let mut done = thread::scope(|s| {
        let helpers: Vec<_> = (1..threads)
            .filter_map(|_| {
                thread::Builder::new()
                    .name("layerfs-fanout".into())
                    .stack_size(STACK)
                    .spawn_scoped(s, move || {
                        // Started by a CPU-pinned FUSE queue thread, it would share that CPU.
                        let _ = crate::sys::unpin_thread();
                        work()
                    })
                    .ok()
            })
            .collect();
        let mut all = work();
        for h in helpers {
            match h.join() {
                Ok(part) => all.extend(part),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        all
    });
    done.sort_unstable_by_key(|e| e.0);
    done.into_iter().map(|e| e.1).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_come_back_in_order_whatever_thread_ran_them() {
        for n in [0, 1, 3, 4, 7, 8, 9, 33, 100, 1000] {
            let items: Vec<usize> = (0..n).collect();
            let got = map(&items, |&i| {
                if i % 7 == 0 {
                    thread::yield_now();
                }
                i * 3
            });
            assert_eq!(
                got,
                items.iter().map(|i| i * 3).collect::<Vec<_>>(),
                "n = {n}"
            );
        }
    }

    #[test]
    fn many_jobs_run_on_several_threads() {
        let items: Vec<usize> = (0..64).collect();
        let ids = map(&items, |_| {
            std::thread::sleep(std::time::Duration::from_millis(2));
            thread::current().id()
        });
        let distinct: std::collections::HashSet<_> = ids.into_iter().collect();
        assert!(distinct.len() > 1, "one thread ran all 64 jobs");
    }
}
