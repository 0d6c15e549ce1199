//! A sequence lock over changes to directories' names (rename and rmdir of directories).
//!
//! A directory fd not in the cache is opened by the names the node table has, one component
//! at a time. A rename moves the directory on disk first and updates the table after: an open
//! by the old name in between answered ENOENT (engine fuzz `races`, seed 250010: a getattr of
//! a directory), or reached the directory renamed into its place. Such opens are rare (a fd
//! cache miss) and so are directory renames, so the openers check that no change ran
//! meanwhile and try again if one did; the changes never wait.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Tries of an open by names while directories keep moving; after them its answer stands
/// (as before this lock existed), and is not cached.
const TRIES: u32 = 64;

#[derive(Default)]
pub struct DirMoves {
    started: AtomicU64,
    finished: AtomicU64,
}

/// A change to directory names under way, from before its first call on the disk until the
/// node table says what the disk does.
pub struct Moving<'a>(&'a DirMoves);

impl Drop for Moving<'_> {
    fn drop(&mut self) {
        self.0.finished.fetch_add(1, Ordering::SeqCst);
    }
}

impl DirMoves {
    pub fn begin(&self) -> Moving<'_> {
        self.started.fetch_add(1, Ordering::SeqCst);
        Moving(self)
    }

    /// Run `read` (it reads names from the node table and opens by them) until no change ran
    /// during it. The flag says whether its answer is consistent (only then is it cached).
    pub fn read<T>(&self, mut read: impl FnMut() -> T) -> (T, bool) {
        let mut tries = 0;
        loop {
            let seen = self.finished.load(Ordering::SeqCst);
            let out = read();
            // Equal only if no change was under way at `seen` and none began since.
            if self.started.load(Ordering::SeqCst) == seen {
                return (out, true);
            }
            tries += 1;
            if tries == TRIES {
                return (out, false);
            }
            // A change takes microseconds, unless its thread was preempted.
            if tries < 8 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_during_a_change_is_tried_again() {
        let m = DirMoves::default();
        let mut runs = 0;
        let mut change = Some(m.begin());
        let (_, ok) = m.read(|| {
            runs += 1;
            if runs == 2 {
                change.take();
            }
        });
        assert!(ok);
        assert_eq!(
            runs, 3,
            "in flight at the first run, finished in the second"
        );
        let (_, ok) = m.read(|| ());
        assert!(ok);
    }

    #[test]
    fn a_change_that_never_ends_leaves_the_answer_unconfirmed() {
        let m = DirMoves::default();
        let _change = m.begin();
        let (_, ok) = m.read(|| ());
        assert!(!ok);
    }
}
