//! Resolve an image's `User` ("name", "uid", "name:group", "uid:gid") against the container's
//! own /etc/passwd and /etc/group, read through the mounted rootfs without following links
//! (a symlinked /etc/passwd in an image must not make us read a host file).

use std::ffi::OsStr;
use std::io::Read;
use std::os::fd::AsFd;
use std::path::Path;

use crate::error::{Error, Result};
use crate::sys;

/// The process identity for the runtime spec.
#[derive(Debug, PartialEq, Eq)]
pub struct Ids {
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
}

/// Read `etc/NAME` under `rootfs`, each component opened with O_NOFOLLOW.
fn read_etc(rootfs: &Path, name: &str) -> Option<String> {
    let root = sys::open_dir_path(rootfs).ok()?;
    let etc = sys::openat(
        root.as_fd(),
        OsStr::new("etc"),
        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
        0,
    )
    .ok()?;
    let f = sys::openat(
        etc.as_fd(),
        OsStr::new(name),
        libc::O_RDONLY | libc::O_NOFOLLOW,
        0,
    )
    .ok()?;
    let mut s = String::new();
    std::fs::File::from(f)
        .take(16 << 20)
        .read_to_string(&mut s)
        .ok()?;
    Some(s)
}

/// Entries of a passwd/group style file: (name, id, rest of the fields).
fn entries(text: &str) -> impl Iterator<Item = Vec<&str>> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(|f| f.len() >= 3)
}

/// Resolve `user` (empty: root) for the rootfs at `rootfs`.
pub fn resolve(user: &str, rootfs: &Path) -> Result<Ids> {
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let passwd = read_etc(rootfs, "passwd").unwrap_or_default();
    let group = read_etc(rootfs, "group").unwrap_or_default();
    let (uid, primary, name) = if u.is_empty() {
        (0, Some(0), "root".to_string())
    } else if let Ok(n) = u.parse::<u32>() {
        let e = entries(&passwd).find(|f| f[2] == u);
        let gid = e.as_ref().and_then(|f| f.get(3)?.parse().ok());
        let name = e.map_or(String::new(), |f| f[0].to_string());
        (n, gid, name)
    } else {
        let f = entries(&passwd)
            .find(|f| f[0] == u)
            .ok_or_else(|| Error::msg(format!("user {u:?} is not in the image's /etc/passwd")))?;
        let uid = f[2]
            .parse()
            .map_err(|_| Error::msg(format!("bad uid for {u:?} in /etc/passwd")))?;
        (uid, f.get(3).and_then(|g| g.parse().ok()), u.to_string())
    };
    let gid = match g {
        None => primary.unwrap_or(0),
        Some(g) => match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => entries(&group)
                .find(|f| f[0] == g)
                .and_then(|f| f[2].parse().ok())
                .ok_or_else(|| {
                    Error::msg(format!("group {g:?} is not in the image's /etc/group"))
                })?,
        },
    };
    // Supplementary groups: those listing the user by name (as docker does).
    let mut additional_gids: Vec<u32> = if name.is_empty() {
        Vec::new()
    } else {
        entries(&group)
            .filter(|f| f.get(3).is_some_and(|m| m.split(',').any(|x| x == name)))
            .filter_map(|f| f[2].parse().ok())
            .filter(|&x| x != gid)
            .collect()
    };
    additional_gids.dedup();
    Ok(Ids {
        uid,
        gid,
        additional_gids,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_numbers_and_groups_resolve_from_the_image_only() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("etc")).unwrap();
        std::fs::write(
            d.path().join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\nweb:x:33:44::/var/www:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(
            d.path().join("etc/group"),
            "root:x:0:\nwww:x:44:\nlog:x:50:web,x\n",
        )
        .unwrap();
        let r = |u: &str| resolve(u, d.path());
        assert_eq!(
            r("").unwrap(),
            Ids {
                uid: 0,
                gid: 0,
                additional_gids: vec![]
            }
        );
        assert_eq!(
            r("web").unwrap(),
            Ids {
                uid: 33,
                gid: 44,
                additional_gids: vec![50]
            }
        );
        assert_eq!(r("web:root").unwrap().gid, 0);
        assert_eq!(r("33").unwrap().gid, 44);
        assert_eq!(
            r("1000:1000").unwrap(),
            Ids {
                uid: 1000,
                gid: 1000,
                additional_gids: vec![]
            }
        );
        assert!(
            r("nobody")
                .unwrap_err()
                .to_string()
                .contains("not in the image")
        );
        assert!(r("web:nogroup").is_err());
        // A symlinked /etc/passwd is not followed out of the image.
        std::fs::remove_file(d.path().join("etc/passwd")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", d.path().join("etc/passwd")).unwrap();
        assert!(r("root").is_err(), "host passwd must not be read");
    }
}
