//! A stuck operation (a FIFO opened for writing with no reader, a daemon that never answers)
//! must end the run with its seed and operation, never wedge the machine: when no operation
//! has finished for `LAYERFS_STUCK_SECS` (default 120), the watchdog prints what was running,
//! lazily unmounts everything under the run's scratch directory and exits the test process.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

use layerfs::sys;

static START: Once = Once::new();
static BEAT: AtomicU64 = AtomicU64::new(0);
static NOW: Mutex<Option<(String, PathBuf)>> = Mutex::new(None);

fn secs_since(t0: Instant) -> u64 {
    t0.elapsed().as_secs()
}

/// Record progress: `what` is running on the pair whose scratch directory is `scratch`.
pub fn beat(what: String, scratch: PathBuf) {
    static T0: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let t0 = *T0.get_or_init(Instant::now);
    BEAT.store(secs_since(t0), Ordering::Relaxed);
    *NOW.lock().unwrap() = Some((what, scratch));
    START.call_once(|| {
        let limit = super::env_u64("LAYERFS_STUCK_SECS", 120);
        std::thread::spawn(move || {
            loop {
                std::thread::sleep(Duration::from_secs(5));
                if secs_since(t0).saturating_sub(BEAT.load(Ordering::Relaxed)) > limit {
                    stuck(limit);
                }
            }
        });
    });
}

fn stuck(limit: u64) -> ! {
    let now = NOW.lock().map(|g| g.clone()).unwrap_or(None);
    let (what, scratch) = now.unwrap_or_default();
    eprintln!("differential: no progress for {limit} s during {what}; unmounting and exiting");
    let mut mine: Vec<PathBuf> = sys::mounts()
        .into_iter()
        .map(|m| m.mountpoint)
        .filter(|m| !scratch.as_os_str().is_empty() && m.starts_with(&scratch))
        .collect();
    mine.sort_by_key(|m| std::cmp::Reverse(m.as_os_str().len()));
    for m in mine {
        let _ = sys::umount(&m, true);
    }
    std::process::exit(101)
}
