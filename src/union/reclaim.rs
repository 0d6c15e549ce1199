//! Giving back the memory of forgotten nodes. Memory pressure (or a `drop_caches`) makes the
//! kernel forget inodes by the thousand; their nodes go, but freed heap pages stay with the
//! process unless trimmed, and a walk's worth of memory (94 MiB for 300k files) stayed for
//! good. Forgets are counted here; once many came and then stopped for a moment, a thread of
//! the daemon's own trims the heap, off the request path and once per burst.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use crate::sys;

/// Forgotten nodes (about 300 bytes each with their names and map slots) worth a trim.
const ENOUGH: u64 = 1024;
/// A burst is over when no node was forgotten for this long.
const QUIET: Duration = Duration::from_millis(200);

#[derive(Default)]
pub struct Reclaim {
    forgotten: AtomicU64,
    lock: Mutex<()>,
    woken: Condvar,
}

impl Reclaim {
    /// A node left the table.
    pub fn forgot(&self) {
        if self.forgotten.fetch_add(1, Ordering::Relaxed) + 1 == ENOUGH {
            let _g = self.lock.lock().expect("reclaim lock");
            self.woken.notify_one();
        }
    }

    /// Trim after each burst of forgets, for ever (the daemon's `reclaim` thread).
    pub fn run(&self) -> ! {
        loop {
            {
                let mut g = self.lock.lock().expect("reclaim lock");
                while self.forgotten.load(Ordering::Relaxed) < ENOUGH {
                    g = self.woken.wait(g).expect("reclaim lock");
                }
            }
            // Wait for the burst to end: a trim in its middle would find half the holes.
            let mut seen = self.forgotten.load(Ordering::Relaxed);
            loop {
                std::thread::sleep(QUIET);
                let now = self.forgotten.load(Ordering::Relaxed);
                if now == seen {
                    break;
                }
                seen = now;
            }
            let n = self.forgotten.swap(0, Ordering::Relaxed);
            let t = std::time::Instant::now();
            let gave = sys::release_free_memory();
            log::debug!(
                "{n} nodes forgotten: heap trimmed in {:?} (pages given back: {gave})",
                t.elapsed()
            );
        }
    }
}
