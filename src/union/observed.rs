//! The engine's side of observability: names for layers and paths, and events that are built
//! only while someone listens.

use std::ffi::OsStr;
use std::sync::atomic::Ordering::Relaxed;

use serde_json::Value;

use super::Union;
use super::node::ROOT_ID;
use crate::observe::stats::{bump, ratio};

impl Union {
    /// "upper", or "lower N" counting from the top lower layer (as `which` and `layers` do),
    /// or "data N" for a data-only layer.
    pub fn layer_label(&self, layer: usize) -> String {
        if self.layers.is_upper(layer) {
            "upper".into()
        } else if layer >= self.layers.len() {
            format!("data {}", layer - self.layers.len())
        } else {
            format!("lower {}", layer - self.layers.first_lower())
        }
    }

    /// The union path of `name` in directory `parent` ("/a/b"), as far as it is known.
    pub fn path_in(&self, parent: u64, name: &OsStr) -> String {
        let mut parts = vec![name.to_os_string()];
        let mut cur = parent;
        // Bounded: a path has at most PATH_MAX/2 components.
        for _ in 0..2048 {
            if cur == ROOT_ID {
                break;
            }
            let Some(n) = self.nodes.get(cur) else { break };
            let s = n.state.read().expect("node state lock");
            parts.push(s.name.to_os_string());
            cur = s.parent;
        }
        parts.reverse();
        super::format::show_path(&parts)
    }

    /// Emit event `kind` if anyone listens; `fields` is only built then.
    pub(crate) fn event(&self, kind: &str, fields: impl FnOnce() -> Value) {
        if self.obs.events.active() {
            let missed = self.obs.events.emit(kind, fields());
            self.obs.stats.events_dropped.fetch_add(missed, Relaxed);
        }
    }

    /// A copy-up of the node now at `st` from layer `from` finished: `bytes` of data copied
    /// (None: metadata only).
    pub(crate) fn copied_up(
        &self,
        st: &super::node::NodeState,
        from: usize,
        bytes: Option<u64>,
        took: std::time::Duration,
    ) {
        self.obs.stats.record_copy_up(bytes, took);
        self.event("copy-up", || {
            serde_json::json!({
                "path": self.path_in(st.parent, &st.name),
                "from": self.layer_label(from),
                "bytes": bytes.unwrap_or(0),
                "data": bytes.is_some(),
                "ms": (took.as_secs_f64() * 1e5).round() / 100.0,
            })
        });
    }

    /// A whiteout was written at `parent/name`.
    pub(crate) fn whiteout_written(&self, parent: u64, name: &OsStr) {
        bump(&self.obs.stats.whiteouts);
        self.event(
            "whiteout",
            || serde_json::json!({"path": self.path_in(parent, name)}),
        );
    }

    /// Directory `parent/name` was marked opaque.
    pub(crate) fn opaque_written(&self, parent: u64, name: &OsStr) {
        bump(&self.obs.stats.opaque_dirs);
        self.event(
            "opaque",
            || serde_json::json!({"path": self.path_in(parent, name)}),
        );
    }
}

impl Union {
    /// `parent/name` left the union (`how`: unlink or rmdir), leaving a whiteout or not.
    pub(crate) fn removed(&self, parent: u64, name: &OsStr, how: &str, whiteout: bool) {
        bump(&self.obs.stats.unlinks);
        if whiteout {
            self.whiteout_written(parent, name);
        }
        self.event(
            how,
            || serde_json::json!({"path": self.path_in(parent, name), "whiteout": whiteout}),
        );
    }

    /// A rename from `from` to `to`; a whiteout was left at `from` when a lower layer has it.
    pub(crate) fn renamed(
        &self,
        from: impl Fn() -> String,
        to: (u64, &OsStr),
        whiteout: bool,
        exchange: bool,
    ) {
        bump(&self.obs.stats.renames);
        if whiteout {
            bump(&self.obs.stats.whiteouts);
            self.event("whiteout", || serde_json::json!({"path": from()}));
        }
        self.event("rename", || {
            serde_json::json!({"from": from(), "to": self.path_in(to.0, to.1), "exchange": exchange})
        });
    }

    /// Directory `path` got a redirect to `lower` (its path in the layers below).
    pub(crate) fn redirect_written(&self, at: (u64, &OsStr), lower: &[std::ffi::OsString]) {
        bump(&self.obs.stats.redirects);
        self.event("redirect", || {
            serde_json::json!({"path": self.path_in(at.0, at.1), "lower_path": super::format::show_path(lower)})
        });
    }
}

/// Resident and peak resident memory (VmRSS, VmHWM) in bytes, from one read of
/// /proc/self/status.
fn memory() -> (Option<u64>, Option<u64>) {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        let v = s
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))?;
        Some(v.trim().trim_end_matches("kB").trim().parse::<u64>().ok()? * 1024)
    };
    (field("VmRSS"), field("VmHWM"))
}

impl Union {
    /// Every counter and gauge `layerfs stats` shows.
    pub fn stats(&self) -> Value {
        let mut v = self.obs.stats.snapshot();
        let g = |c: &std::sync::atomic::AtomicU64| c.load(Relaxed);
        v["open_files"] = g(&self.handles.open_files).into();
        v["inodes"] = self.node_count().into();
        v["cache"] = serde_json::json!({
            "dir_fd_hit_rate": ratio(g(&self.fds.hits), g(&self.fds.misses)),
            "dir_names_hit_rate": ratio(g(&self.names.hits), g(&self.names.misses)),
        });
        v["catalog"] = match self.catalog() {
            Some(c) => {
                let (dirs, subdirs) = c.size();
                serde_json::json!({
                    "directories": dirs,
                    "subdirectories": subdirs,
                    "answers": g(&c.answers),
                })
            }
            None => Value::Null,
        };
        let (rss, peak) = memory();
        v["rss_bytes"] = rss.into();
        v["peak_rss_bytes"] = peak.into();
        v
    }
}
