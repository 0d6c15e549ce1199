//! The live event stream: copy-ups, whiteouts, opaque dirs, redirects, renames, unlinks.
//!
//! Each listener has a bounded queue. The request path never waits for a listener: when a
//! queue is full the event is dropped for that listener and counted.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use super::request;

const QUEUE: usize = 8192;

#[derive(Default)]
pub struct Events {
    listeners: AtomicUsize,
    next_id: AtomicU64,
    subs: Mutex<Vec<(u64, SyncSender<Arc<str>>)>>,
}

/// A listener's end: events as JSON lines. Unsubscribes when dropped.
pub struct Subscription<'a> {
    events: &'a Events,
    id: u64,
    pub rx: Receiver<Arc<str>>,
}

impl Drop for Subscription<'_> {
    fn drop(&mut self) {
        let mut s = self.events.subs.lock().expect("events lock");
        s.retain(|(id, _)| *id != self.id);
        self.events.listeners.store(s.len(), Relaxed);
    }
}

/// The command name of a process (or thread), if it still exists.
fn comm(pid: u32) -> Option<String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    Some(s.trim_end().to_string())
}

/// FUSE reports the calling thread; events name its process.
fn tgid(pid: u32) -> u32 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Tgid:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(pid)
}

impl Events {
    /// Is anybody listening? One atomic load: callers skip building events when not.
    pub fn active(&self) -> bool {
        self.listeners.load(Relaxed) > 0
    }

    pub fn listeners(&self) -> usize {
        self.listeners.load(Relaxed)
    }

    pub fn subscribe(&self) -> Subscription<'_> {
        let (tx, rx) = sync_channel(QUEUE);
        let id = self.next_id.fetch_add(1, Relaxed);
        let mut s = self.subs.lock().expect("events lock");
        s.push((id, tx));
        self.listeners.store(s.len(), Relaxed);
        Subscription {
            events: self,
            id,
            rx,
        }
    }

    /// Send event `kind` with `fields` to every listener, stamped with the time and the
    /// operation and process being served. Returns how many listeners missed it.
    pub fn emit(&self, kind: &str, mut fields: Value) -> u64 {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        fields["event"] = json!(kind);
        fields["time"] = json!((now.as_micros() as f64) / 1e6);
        if let Some((op, pid)) = request::current() {
            let pid = tgid(pid);
            fields["op"] = json!(op.name());
            fields["pid"] = json!(pid);
            fields["comm"] = json!(comm(pid));
        }
        let line: Arc<str> = fields.to_string().into();
        let mut dropped = 0;
        for (_, tx) in self.subs.lock().expect("events lock").iter() {
            if let Err(TrySendError::Full(_)) = tx.try_send(line.clone()) {
                dropped += 1;
            }
        }
        dropped
    }
}
