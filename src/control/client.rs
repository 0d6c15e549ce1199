//! The client's end: find a mount's daemon from any path on it and ask it things.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};

use super::{mount_of, mount_owner, socket_dirs, socket_name};
use crate::error::{Error, Result};
use crate::sys::{self, MountEntry};

/// A connection to the daemon of the mount holding some path.
pub struct Client {
    pub mount: MountEntry,
    stream: UnixStream,
}

fn dead(m: &MountEntry) -> Error {
    Error::msg(format!(
        "no layerfs daemon answers for {} (it has died); `layerfs umount {}` clears the mount",
        m.mountpoint.display(),
        m.mountpoint.display()
    ))
}

impl Client {
    pub fn connect(path: &Path) -> Result<Client> {
        let m = mount_of(path)?;
        let me = sys::geteuid();
        let owner = mount_owner(&m).unwrap_or(me);
        if owner != me && me != 0 {
            return Err(Error::msg(format!(
                "the layerfs mount at {} belongs to uid {owner}: only that user or root can ask its daemon",
                m.mountpoint.display()
            )));
        }
        let name = socket_name(&m.dev);
        let mut dirs: Vec<PathBuf> = socket_dirs(owner);
        dirs.extend(socket_dirs(me));
        let sock = dirs
            .iter()
            .map(|d| d.join(&name))
            .find(|p| std::fs::symlink_metadata(p).is_ok())
            .ok_or_else(|| dead(&m))?;
        let md = std::fs::symlink_metadata(&sock)?;
        if md.uid() != me && me != 0 {
            return Err(Error::msg(format!(
                "control socket {} belongs to uid {}, not to you",
                sock.display(),
                md.uid()
            )));
        }
        let stream = match UnixStream::connect(&sock) {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return Err(dead(&m)),
            Err(e) => return Err(Error::from(e).context(sock.display())),
        };
        Ok(Client { mount: m, stream })
    }

    /// Send request `op`; the lines that come back are read with `next`.
    fn send(&self, op: &str, timeout: Option<Duration>) -> Result<BufReader<&UnixStream>> {
        self.stream.set_read_timeout(timeout).map_err(Error::from)?;
        writeln!(&self.stream, "{}", json!({ "op": op })).map_err(|e| self.broken(e))?;
        Ok(BufReader::new(&self.stream))
    }

    fn broken(&self, e: std::io::Error) -> Error {
        // A daemon killed while its socket still had our connection queued resets it
        // unanswered: that is a dead daemon, not a hang-up.
        if e.kind() == std::io::ErrorKind::ConnectionReset {
            return dead(&self.mount);
        }
        Error::msg(format!(
            "the layerfs daemon for {} hung up: {e}",
            self.mount.mountpoint.display()
        ))
    }

    /// One request, one JSON answer.
    pub fn ask(self, op: &str) -> Result<Value> {
        let mut r = self.send(op, Some(Duration::from_secs(30)))?;
        let mut line = String::new();
        r.read_line(&mut line).map_err(|e| self.broken(e))?;
        parse(&self.mount, &line)
    }

    /// Follow the event stream; `each` gets every event until it returns false or the daemon
    /// goes away (the mount was unmounted).
    pub fn follow(self, mut each: impl FnMut(Value) -> bool) -> Result<()> {
        let mount = self.mount.clone();
        let mut r = self.send("events", None)?;
        let mut line = String::new();
        loop {
            line.clear();
            match r.read_line(&mut line) {
                Ok(0) => return Ok(()),
                Ok(_) => {
                    if !each(parse(&mount, &line)?) {
                        return Ok(());
                    }
                }
                Err(e) => {
                    return Err(Error::msg(format!(
                        "events from {}: {e}",
                        mount.mountpoint.display()
                    )));
                }
            }
        }
    }
}

fn parse(m: &MountEntry, line: &str) -> Result<Value> {
    if line.is_empty() {
        return Err(Error::msg(format!(
            "the layerfs daemon for {} closed the connection",
            m.mountpoint.display()
        )));
    }
    let v: Value = serde_json::from_str(line).map_err(|e| {
        Error::msg(format!(
            "bad answer from the daemon for {}: {e}",
            m.mountpoint.display()
        ))
    })?;
    if let Some(e) = v["error"].as_str() {
        return Err(Error::msg(format!("{}: {e}", m.mountpoint.display())));
    }
    Ok(v)
}
