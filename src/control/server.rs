//! The daemon's end of the control socket.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use serde_json::{Value, json};

use super::{socket_dirs, socket_name};
use crate::error::{Error, Result};
use crate::store::describe_layer_dir;
use crate::sys;
use crate::union::Union;
use crate::union::format::MarkerNs;

/// At most this many clients at once (each has a thread).
const MAX_CLIENTS: usize = 64;

/// A private directory for our sockets: created 0700, and refused if someone else owns it or
/// others may enter it.
fn private_dir(uid: u32) -> Result<PathBuf> {
    let mut why = String::new();
    for d in socket_dirs(uid) {
        let _ = std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&d);
        match std::fs::symlink_metadata(&d) {
            Ok(m) if m.is_dir() && m.uid() == uid && m.mode() & 0o077 == 0 => return Ok(d),
            Ok(m) => {
                why = format!(
                    "{} is not a private directory of uid {uid} (owner {}, mode {:o})",
                    d.display(),
                    m.uid(),
                    m.mode() & 0o7777
                )
            }
            Err(e) => why = format!("{}: {e}", d.display()),
        }
    }
    Err(Error::msg(format!(
        "no directory for the control socket: {why}"
    )))
}

/// What `info` answers: the mount and its layers, top first.
fn info(fs: &Union, mountpoint: &Path) -> Value {
    let mut layers = Vec::new();
    let dirs = fs
        .cfg
        .upper
        .iter()
        .chain(&fs.cfg.lowers)
        .chain(&fs.cfg.data_lowers);
    for (i, d) in dirs.enumerate() {
        let mut l = json!({"index": i, "label": fs.layer_label(i), "dir": d});
        if let Some(s) = describe_layer_dir(d) {
            l["store"] = json!(s);
        }
        layers.push(l);
    }
    json!({
        "mountpoint": mountpoint,
        "pid": std::process::id(),
        "writable": fs.writable(),
        "work": fs.cfg.work,
        "layers": layers,
        // How the layers' markers are read (for `which` to read them alike).
        "markers": if fs.cfg.marker_ns == MarkerNs::User { "user" } else { "trusted" },
        "metacopy": fs.cfg.metacopy,
    })
}

pub struct Control {
    pub path: PathBuf,
    /// The socket file's (device, inode) as bound.
    id: (u64, u64),
}

impl Control {
    /// Remove the socket file if it is still this daemon's. A mount's name comes from its
    /// device number, which the kernel hands to the next mount once this one is gone: a
    /// daemon still on its way out must not delete the socket of a new mount's daemon (a
    /// test found `layerfs stats` answered "it has died" for a live mount).
    pub fn remove(&self) {
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.id) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Listen on this mount's control socket, answering from a thread of its own.
pub fn start(fs: Arc<Union>, mountpoint: PathBuf) -> Result<Control> {
    let uid = sys::geteuid();
    // Just mounted, so ours is the filesystem on top there.
    let dev =
        sys::mounted_dev(&mountpoint).map_err(|e| Error::from(e).context(mountpoint.display()))?;
    let path = private_dir(uid)?.join(socket_name(&dev));
    // A file left by a daemon that died: its mount is gone, so the name is free.
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).map_err(|e| Error::from(e).context(path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    let md = std::fs::symlink_metadata(&path)?;
    let id = (md.dev(), md.ino());
    info!("control socket {}", path.display());
    let started = Instant::now();
    let clients = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                if clients.load(Ordering::Relaxed) >= MAX_CLIENTS {
                    let _ = refuse(conn, "too many control clients");
                    continue;
                }
                let (fs, mp, clients) = (fs.clone(), mountpoint.clone(), clients.clone());
                clients.fetch_add(1, Ordering::Relaxed);
                let _ = std::thread::Builder::new()
                    .name("control-client".into())
                    .spawn(move || {
                        if let Err(e) = serve(conn, &fs, &mp, uid, started) {
                            debug!("control client: {e}");
                        }
                        clients.fetch_sub(1, Ordering::Relaxed);
                    });
            }
        })?;
    Ok(Control { path, id })
}

fn refuse(mut conn: UnixStream, msg: &str) -> std::io::Result<()> {
    writeln!(conn, "{}", json!({ "error": msg }))
}

fn serve(
    conn: UnixStream,
    fs: &Union,
    mp: &Path,
    uid: u32,
    started: Instant,
) -> std::io::Result<()> {
    let peer = sys::peer_uid(conn.as_fd())?;
    if peer != uid && peer != 0 {
        warn!("control: refused uid {peer}");
        return refuse(conn, &format!("this mount belongs to uid {uid}"));
    }
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut line = String::new();
    BufReader::new(&conn).take(4096).read_line(&mut line)?;
    let req: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
    let mut out = &conn;
    match req["op"].as_str().unwrap_or("") {
        "info" => writeln!(out, "{}", info(fs, mp)),
        "stats" => {
            let mut v = fs.stats();
            v["uptime_s"] = json!(started.elapsed().as_secs_f64());
            v["event_listeners"] = json!(fs.obs.events.listeners());
            writeln!(out, "{v}")
        }
        "events" => stream_events(conn, fs),
        other => refuse(conn, &format!("unknown request {other:?}")),
    }
}

/// Send events until the client goes away (noticed within a quarter second even when idle).
fn stream_events(conn: UnixStream, fs: &Union) -> std::io::Result<()> {
    let sub = fs.obs.events.subscribe();
    let mut out = &conn;
    writeln!(out, "{}", json!({"event": "subscribed"}))?;
    conn.set_read_timeout(Some(Duration::from_millis(1)))?;
    let mut probe = [0u8; 64];
    loop {
        match sub.rx.recv_timeout(Duration::from_millis(250)) {
            Ok(line) => {
                out.write_all(line.as_bytes())?;
                out.write_all(b"\n")?;
            }
            Err(RecvTimeoutError::Timeout) => match (&conn).read(&mut probe) {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Err(e),
            },
            Err(RecvTimeoutError::Disconnected) => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bound(path: &Path) -> (UnixListener, (u64, u64)) {
        let l = UnixListener::bind(path).unwrap();
        let md = std::fs::symlink_metadata(path).unwrap();
        (l, (md.dev(), md.ino()))
    }

    #[test]
    fn a_daemon_on_its_way_out_leaves_a_newer_daemons_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sock");
        let (_old, id) = bound(&path);
        let old = Control {
            path: path.clone(),
            id,
        };
        // A new mount got the same device number: its daemon replaced the file.
        std::fs::remove_file(&path).unwrap();
        let (_new, new_id) = bound(&path);
        old.remove();
        let md = std::fs::symlink_metadata(&path).expect("new socket kept");
        assert_eq!((md.dev(), md.ino()), new_id);
        // Its own socket it does remove.
        let new = Control {
            path: path.clone(),
            id: new_id,
        };
        drop(new);
        assert!(
            std::fs::symlink_metadata(&path).is_err(),
            "own socket removed"
        );
    }
}
