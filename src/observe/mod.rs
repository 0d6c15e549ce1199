//! What the daemon is doing, for `layerfs stats` and `layerfs events`.
//!
//! Counters are always kept (relaxed atomics: a few nanoseconds against a FUSE round trip of
//! microseconds). Events are built only while someone listens: with no listener an event
//! costs one atomic load. Nothing here touches the layers.

pub mod events;
pub mod request;
pub mod stats;

pub use events::Events;
pub use request::{Op, OpGuard};
pub use stats::Stats;

#[derive(Default)]
pub struct Observer {
    pub stats: Stats,
    pub events: Events,
}

impl Observer {
    /// Start timing operation `op` asked by process `pid`; the guard records it when dropped
    /// and, meanwhile, tells events which operation and process caused them.
    pub fn begin(&self, op: Op, pid: u32) -> OpGuard<'_> {
        OpGuard::new(&self.stats, op, pid)
    }
}
