//! Counters since mount, and latency histograms per operation.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use serde_json::{Value, json};

use super::request::Op;

/// Log-linear latency buckets: 4 per power of two of nanoseconds (<19% error), up to ~2^47 ns.
const SUB: u32 = 2;
const BUCKETS: usize = 48 << SUB;

fn bucket(ns: u64) -> usize {
    if ns < (1 << SUB) {
        return ns as usize;
    }
    let log = 63 - ns.leading_zeros();
    let sub = (ns >> (log - SUB)) & ((1 << SUB) - 1);
    (((log - SUB + 1) << SUB) as usize + sub as usize).min(BUCKETS - 1)
}

/// The middle of bucket `b`, in ns.
fn bucket_mid(b: usize) -> f64 {
    if b < (1 << SUB) {
        return b as f64;
    }
    let log = (b >> SUB) as u32 + SUB - 1;
    let sub = (b & ((1 << SUB) - 1)) as u64;
    let lo = (1u64 << log) + (sub << (log - SUB));
    lo as f64 + (1u64 << (log - SUB)) as f64 / 2.0
}

pub struct OpStats {
    count: AtomicU64,
    total_ns: AtomicU64,
    hist: Vec<AtomicU64>,
}

impl Default for OpStats {
    fn default() -> Self {
        OpStats {
            count: AtomicU64::new(0),
            total_ns: AtomicU64::new(0),
            hist: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl OpStats {
    fn percentile(&self, counts: &[u64], total: u64, p: f64) -> f64 {
        let want = ((total as f64) * p).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (b, &n) in counts.iter().enumerate() {
            seen += n;
            if seen >= want {
                return bucket_mid(b);
            }
        }
        0.0
    }

    fn snapshot(&self) -> Option<Value> {
        let count = self.count.load(Relaxed);
        if count == 0 {
            return None;
        }
        let counts: Vec<u64> = self.hist.iter().map(|h| h.load(Relaxed)).collect();
        let total: u64 = counts.iter().sum();
        let us = |ns: f64| (ns / 10.0).round() / 100.0;
        Some(json!({
            "count": count,
            "mean_us": us(self.total_ns.load(Relaxed) as f64 / count as f64),
            "p50_us": us(self.percentile(&counts, total, 0.50)),
            "p90_us": us(self.percentile(&counts, total, 0.90)),
            "p99_us": us(self.percentile(&counts, total, 0.99)),
        }))
    }
}

/// Everything `layerfs stats` reports that the engine and adapter count.
pub struct Stats {
    ops: Vec<OpStats>,
    pub copy_ups: AtomicU64,
    pub copy_ups_data: AtomicU64,
    pub copy_up_bytes: AtomicU64,
    pub copy_up_ns: AtomicU64,
    pub whiteouts: AtomicU64,
    pub opaque_dirs: AtomicU64,
    pub redirects: AtomicU64,
    pub renames: AtomicU64,
    pub unlinks: AtomicU64,
    pub passthrough_opens: AtomicU64,
    pub cached_opens: AtomicU64,
    /// Nodes reissued after a copy-up because an early reader bound them to the lower file
    /// (see `NodeTable::reissue`); the open that found it is sent back for a new path walk.
    pub reissued: AtomicU64,
    pub events_dropped: AtomicU64,
    /// Requests served by an io_uring queue thread / by a /dev/fuse reader.
    pub via_io_uring: AtomicU64,
    pub via_dev_fuse: AtomicU64,
}

impl Default for Stats {
    fn default() -> Self {
        let z = || AtomicU64::new(0);
        Stats {
            ops: Op::ALL.iter().map(|_| OpStats::default()).collect(),
            copy_ups: z(),
            copy_ups_data: z(),
            copy_up_bytes: z(),
            copy_up_ns: z(),
            whiteouts: z(),
            opaque_dirs: z(),
            redirects: z(),
            renames: z(),
            unlinks: z(),
            passthrough_opens: z(),
            cached_opens: z(),
            reissued: z(),
            events_dropped: z(),
            via_io_uring: z(),
            via_dev_fuse: z(),
        }
    }
}

thread_local! {
    /// fuser names the threads serving its io_uring queues `fuser-uring-<cpu>-<n>`.
    static URING_THREAD: bool = std::thread::current()
        .name()
        .is_some_and(|n| n.starts_with("fuser-uring-"));
}

fn on_io_uring_thread() -> bool {
    URING_THREAD.with(|u| *u)
}

/// Add one to a counter.
pub fn bump(c: &AtomicU64) {
    c.fetch_add(1, Relaxed);
}

/// hits / (hits + misses), or null before the first use.
pub fn ratio(hit: u64, miss: u64) -> Value {
    if hit + miss == 0 {
        Value::Null
    } else {
        json!(((hit as f64 / (hit + miss) as f64) * 1000.0).round() / 1000.0)
    }
}

impl Stats {
    pub fn record_op(&self, op: Op, d: Duration) {
        let ns = d.as_nanos().min(u64::MAX as u128) as u64;
        let s = &self.ops[op as usize];
        s.count.fetch_add(1, Relaxed);
        s.total_ns.fetch_add(ns, Relaxed);
        s.hist[bucket(ns)].fetch_add(1, Relaxed);
        bump(if on_io_uring_thread() {
            &self.via_io_uring
        } else {
            &self.via_dev_fuse
        });
    }

    pub fn record_copy_up(&self, bytes: Option<u64>, d: Duration) {
        bump(&self.copy_ups);
        if let Some(b) = bytes {
            bump(&self.copy_ups_data);
            self.copy_up_bytes.fetch_add(b, Relaxed);
        }
        self.copy_up_ns
            .fetch_add(d.as_nanos().min(u64::MAX as u128) as u64, Relaxed);
    }

    /// The counters as JSON (gauges the engine owns are added by the caller).
    pub fn snapshot(&self) -> Value {
        let g = |c: &AtomicU64| c.load(Relaxed);
        // Kept by the transport (one mount per daemon process).
        let commits = fuser::uring_commit_stats();
        let ops: serde_json::Map<String, Value> = Op::ALL
            .iter()
            .filter_map(|&op| {
                self.ops[op as usize]
                    .snapshot()
                    .map(|v| (op.name().to_string(), v))
            })
            .collect();
        let n = g(&self.copy_ups);
        json!({
            "copy_ups": {
                "count": n,
                "with_data": g(&self.copy_ups_data),
                "metadata_only": n - g(&self.copy_ups_data).min(n),
                "bytes": g(&self.copy_up_bytes),
                "total_ms": (g(&self.copy_up_ns) as f64 / 1e4).round() / 100.0,
            },
            "whiteouts": g(&self.whiteouts),
            "opaque_dirs": g(&self.opaque_dirs),
            "redirects": g(&self.redirects),
            "renames": g(&self.renames),
            "unlinks": g(&self.unlinks),
            "passthrough_opens": g(&self.passthrough_opens),
            "cached_opens": g(&self.cached_opens),
            "reissued": g(&self.reissued),
            "events_dropped": g(&self.events_dropped),
            "transport": {
                "io_uring": g(&self.via_io_uring),
                "dev_fuse": g(&self.via_dev_fuse),
                // Replies over io_uring that woke a caller: committed at SCHED_IDLE (the
                // caller then stays on its CPU) or plainly, and callers seen moving anyway.
                "idle_commits": commits.idle,
                "plain_commits": commits.plain,
                "caller_moves": commits.moves,
            },
            "ops": ops,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_their_middles_fall_inside() {
        let mut last = 0;
        for ns in [
            0u64,
            1,
            3,
            4,
            5,
            7,
            8,
            100,
            1000,
            12_345,
            1 << 30,
            u64::MAX / 2,
        ] {
            let b = bucket(ns);
            assert!(b >= last, "{ns}");
            last = b;
            if (8..1 << 40).contains(&ns) {
                let mid = bucket_mid(b);
                assert!((mid - ns as f64).abs() / (ns as f64) < 0.2, "{ns} -> {mid}");
            }
        }
    }
}
