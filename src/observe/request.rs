//! The FUSE operation a worker thread is serving, and for whom.
//!
//! The adapter marks it on entry; the engine reads it when it emits an event, so the engine's
//! API carries no observability arguments.

use std::cell::Cell;
use std::time::Instant;

use super::stats::Stats;

macro_rules! ops {
    ($($v:ident => $n:literal),+ $(,)?) => {
        /// Every FUSE operation the adapter serves.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Op { $($v),+ }
        impl Op {
            pub const ALL: &'static [Op] = &[$(Op::$v),+];
            pub fn name(self) -> &'static str {
                match self { $(Op::$v => $n),+ }
            }
        }
    };
}

ops! {
    Lookup => "lookup", Forget => "forget", Getattr => "getattr", Setattr => "setattr",
    Readlink => "readlink", Mknod => "mknod", Mkdir => "mkdir", Unlink => "unlink",
    Rmdir => "rmdir", Symlink => "symlink", Rename => "rename", Link => "link", Open => "open",
    Read => "read", Write => "write", Flush => "flush", Release => "release", Fsync => "fsync",
    Opendir => "opendir", Readdir => "readdir", Readdirplus => "readdirplus",
    Releasedir => "releasedir", Fsyncdir => "fsyncdir", Statfs => "statfs",
    Setxattr => "setxattr", Getxattr => "getxattr", Listxattr => "listxattr",
    Removexattr => "removexattr", Access => "access", Create => "create",
    Fallocate => "fallocate", Lseek => "lseek", Tmpfile => "tmpfile",
    Ioctl => "ioctl",
}

thread_local! {
    static CURRENT: Cell<Option<(Op, u32)>> = const { Cell::new(None) };
}

/// The operation this thread is serving and the pid that asked, if any.
pub fn current() -> Option<(Op, u32)> {
    CURRENT.with(|c| c.get())
}

/// Times one operation; records it in the stats when dropped.
pub struct OpGuard<'a> {
    stats: &'a Stats,
    op: Op,
    start: Instant,
}

impl<'a> OpGuard<'a> {
    pub(super) fn new(stats: &'a Stats, op: Op, pid: u32) -> OpGuard<'a> {
        CURRENT.with(|c| c.set(Some((op, pid))));
        OpGuard {
            stats,
            op,
            start: Instant::now(),
        }
    }
}

impl Drop for OpGuard<'_> {
    fn drop(&mut self) {
        CURRENT.with(|c| c.set(None));
        self.stats.record_op(self.op, self.start.elapsed());
    }
}
