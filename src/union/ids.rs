//! Owner translation between the layers (host ids on disk) and the mount (container ids),
//! as fuse-overlayfs does it for rootless containers: `uidmapping=`/`gidmapping=`, the
//! `squash_to_*` options, and `xattr_permissions=` (owner and mode kept in an xattr so an
//! unprivileged store can hold root-owned files).

use std::ffi::CStr;

use crate::error::{Error, Result, err};
use crate::sys::Stat;

/// The id shown for a host id that no mapping covers (the kernel's overflow id).
pub const OVERFLOW: u32 = 65534;

/// `CONTAINER:HOST:LEN[:CONTAINER:HOST:LEN...]`; empty maps every id to itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdMap {
    ranges: Vec<(u32, u32, u32)>,
}

impl IdMap {
    pub fn parse(what: &str, s: &str) -> Result<IdMap> {
        let bad = |why: &str| Error::msg(format!("{what}={s}: {why}"));
        let nums: Vec<u64> = s
            .split(':')
            .map(|x| x.trim().parse::<u64>())
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| bad("expected CONTAINER:HOST:LEN[:CONTAINER:HOST:LEN...] numbers"))?;
        if nums.is_empty() || !nums.len().is_multiple_of(3) {
            return Err(bad("expected triples CONTAINER:HOST:LEN"));
        }
        let mut ranges = Vec::new();
        for t in nums.chunks(3) {
            let (c, h, n) = (t[0], t[1], t[2]);
            if n == 0 {
                return Err(bad("a range of length 0"));
            }
            if c + n > 1 << 32 || h + n > 1 << 32 {
                return Err(bad("a range overflows 32-bit ids"));
            }
            ranges.push((c as u32, h as u32, n as u32));
        }
        // Both sides must be one-to-one: no two ranges overlap on either side.
        for (i, a) in ranges.iter().enumerate() {
            for b in &ranges[i + 1..] {
                let over = |x: u32, y: u32| {
                    (x as u64) < y as u64 + b.2 as u64 && (y as u64) < x as u64 + a.2 as u64
                };
                if over(a.0, b.0) {
                    return Err(bad("container ranges overlap"));
                }
                if over(a.1, b.1) {
                    return Err(bad("host ranges overlap"));
                }
            }
        }
        Ok(IdMap { ranges })
    }

    pub fn is_identity(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The container id of host id `h` (OVERFLOW when unmapped).
    pub fn to_container(&self, h: u32) -> u32 {
        if self.ranges.is_empty() {
            return h;
        }
        self.ranges
            .iter()
            .find(|(_, hs, n)| h >= *hs && h - hs < *n)
            .map_or(OVERFLOW, |(c, hs, _)| c + (h - hs))
    }

    /// The host id of container id `c`, if mapped.
    pub fn to_host(&self, c: u32) -> Option<u32> {
        if self.ranges.is_empty() {
            return Some(c);
        }
        self.ranges
            .iter()
            .find(|(cs, _, n)| c >= *cs && c - cs < *n)
            .map(|(cs, h, _)| h + (c - cs))
    }
}

/// Where `xattr_permissions=` keeps owner and mode.
pub fn override_xattr(level: u32) -> Option<&'static CStr> {
    match level {
        1 => Some(c"security.fuseoverlayfs.override_stat"),
        2 => Some(c"user.containers.override_stat"),
        _ => None,
    }
}

/// Owner and permission bits from an override xattr: `UID:GID:MODE[:TYPE]` (mode octal).
pub fn parse_override(v: &[u8]) -> Option<(u32, u32, u32)> {
    let s = std::str::from_utf8(v).ok()?;
    let mut f = s.trim_end_matches('\0').split(':');
    let uid = f.next()?.parse().ok()?;
    let gid = f.next()?.parse().ok()?;
    let mode = u32::from_str_radix(f.next()?, 8).ok()?;
    Some((uid, gid, mode & 0o7777))
}

/// The override xattr value for an object of mode `st_mode` (type bits taken from it).
pub fn format_override(uid: u32, gid: u32, st_mode: u32) -> Vec<u8> {
    let ty = match st_mode & libc::S_IFMT {
        libc::S_IFDIR => "dir",
        libc::S_IFLNK => "symlink",
        libc::S_IFIFO => "pipe",
        libc::S_IFSOCK => "socket",
        _ => "file",
    };
    format!("{uid}:{gid}:0{:o}:{ty}", st_mode & 0o7777).into_bytes()
}

/// Every owner translation of one mount.
#[derive(Clone, Debug, Default)]
pub struct Ids {
    pub uid: IdMap,
    pub gid: IdMap,
    pub squash_uid: Option<u32>,
    pub squash_gid: Option<u32>,
    pub xattr: Option<&'static CStr>,
}

impl Ids {
    /// Nothing to translate: attrs pass through untouched.
    pub fn is_identity(&self) -> bool {
        self.uid.is_identity()
            && self.gid.is_identity()
            && self.squash_uid.is_none()
            && self.squash_gid.is_none()
            && self.xattr.is_none()
    }

    /// What the mount shows for a real stat, given its override xattr (if any).
    pub fn present(&self, st: &mut Stat, ov: Option<(u32, u32, u32)>) {
        if let Some((u, g, m)) = ov {
            st.st_uid = u;
            st.st_gid = g;
            st.st_mode = (st.st_mode & libc::S_IFMT) | m;
        }
        st.st_uid = self
            .squash_uid
            .unwrap_or_else(|| self.uid.to_container(st.st_uid));
        st.st_gid = self
            .squash_gid
            .unwrap_or_else(|| self.gid.to_container(st.st_gid));
    }

    /// Host ids for an owner asked for through the mount (chown): EINVAL when unmapped, as
    /// chown(2) in a user namespace.
    pub fn to_host(
        &self,
        uid: Option<u32>,
        gid: Option<u32>,
    ) -> Result<(Option<u32>, Option<u32>)> {
        let u = match uid {
            Some(u) => Some(self.uid.to_host(u).ok_or_else(|| err(libc::EINVAL))?),
            None => None,
        };
        let g = match gid {
            Some(g) => Some(self.gid.to_host(g).ok_or_else(|| err(libc::EINVAL))?),
            None => None,
        };
        Ok((u, g))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mappings_translate_both_ways_and_refuse_overlaps() {
        let m = IdMap::parse("uidmapping", "0:1000:1:1:100000:65536").unwrap();
        assert_eq!(m.to_container(1000), 0);
        assert_eq!(m.to_container(100_000), 1);
        assert_eq!(m.to_container(100_009), 10);
        assert_eq!(m.to_container(0), OVERFLOW);
        assert_eq!(m.to_host(0), Some(1000));
        assert_eq!(m.to_host(65536), Some(165_535));
        assert_eq!(m.to_host(65537), None);
        for bad in [
            "0:1000",
            "0:1000:0",
            "a:b:c",
            "0:1000:10:5:2000:1",
            "0:1000:10:20:1005:1",
            "0:4294967295:2",
            "",
        ] {
            assert!(IdMap::parse("uidmapping", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn override_xattrs_round_trip() {
        let v = format_override(0, 5, libc::S_IFDIR | 0o1755);
        assert_eq!(v, b"0:5:01755:dir");
        assert_eq!(parse_override(&v), Some((0, 5, 0o1755)));
        assert_eq!(parse_override(b"33:44:644"), Some((33, 44, 0o644)));
        assert_eq!(parse_override(b"x"), None);
    }
}
