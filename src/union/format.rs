//! On-disk markers: whiteouts, opaque directories and redirects, in every format read in the wild
//! (kernel/fuse-overlayfs char-dev whiteouts, OCI `.wh.` files, the overlay xattrs) and the one
//! format layerfs writes (the kernel's).

use std::ffi::{CStr, OsStr, OsString};
use std::os::fd::BorrowedFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};

use crate::sys::{self, XTarget};

/// Prefix of OCI whiteout files; names with it are markers, never user content.
pub const WH_PREFIX: &[u8] = b".wh.";
/// OCI opaque-directory marker.
pub const WH_OPAQUE: &[u8] = b".wh..wh..opq";

const OPAQUE_XATTRS: [&CStr; 3] = [
    c"trusted.overlay.opaque",
    c"user.overlay.opaque",
    c"user.fuseoverlayfs.opaque",
];
const REDIRECT_XATTRS: [&CStr; 2] = [c"trusted.overlay.redirect", c"user.overlay.redirect"];
const XWHITEOUT_XATTRS: [&CStr; 2] = [c"trusted.overlay.whiteout", c"user.overlay.whiteout"];
const IMPURE_XATTRS: [&CStr; 2] = [c"trusted.overlay.impure", c"user.overlay.impure"];

/// The xattr namespace layerfs writes its own markers in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MarkerNs {
    /// `trusted.overlay.*` (privileged; what the kernel writes by default).
    Trusted,
    /// `user.overlay.*` (the kernel's `userxattr` format, for unprivileged mounts).
    User,
}

impl MarkerNs {
    pub fn opaque(self) -> &'static CStr {
        match self {
            MarkerNs::Trusted => c"trusted.overlay.opaque",
            MarkerNs::User => c"user.overlay.opaque",
        }
    }
    pub fn redirect(self) -> &'static CStr {
        match self {
            MarkerNs::Trusted => c"trusted.overlay.redirect",
            MarkerNs::User => c"user.overlay.redirect",
        }
    }
    /// The union link count of an indexed copy, relative to its real one (`U+N`, `U-N`).
    pub fn nlink(self) -> &'static CStr {
        match self {
            MarkerNs::Trusted => c"trusted.overlay.nlink",
            MarkerNs::User => c"user.overlay.nlink",
        }
    }
    /// A copy-up's origin: the lower object's file handle (`Origin`).
    pub fn origin(self) -> &'static CStr {
        match self {
            MarkerNs::Trusted => c"trusted.overlay.origin",
            MarkerNs::User => c"user.overlay.origin",
        }
    }
    /// On an upper directory: some entry in it has an origin (a copy-up, or moved in), so a
    /// listing's inode numbers need looking up.
    pub fn impure(self) -> &'static CStr {
        match self {
            MarkerNs::Trusted => c"trusted.overlay.impure",
            MarkerNs::User => c"user.overlay.impure",
        }
    }
    /// Immutable (`i`) and append-only (`a`) attributes of an upper object, which the
    /// kernel keeps here rather than on the object itself (they would stop it managing it).
    pub fn protattr(self) -> &'static CStr {
        match self {
            MarkerNs::Trusted => c"trusted.overlay.protattr",
            MarkerNs::User => c"user.overlay.protattr",
        }
    }
    /// Marks a metadata-only copy whose data is in a lower layer.
    pub fn metacopy(self) -> &'static CStr {
        match self {
            MarkerNs::Trusted => c"trusted.overlay.metacopy",
            MarkerNs::User => c"user.overlay.metacopy",
        }
    }
    /// layerfs's own: on an upper file copied up whole (an empty file, a hard link) where
    /// the kernel's copy with metacopy=on would be metadata-only, the redirect that copy
    /// would carry (an absolute path; empty: none). A private overlay xattr, so neither the
    /// kernel nor the union's listings show it, and the hard link's other names share it.
    pub fn whole_copy(self) -> &'static CStr {
        match self {
            MarkerNs::Trusted => c"trusted.overlay.layerfs.wholecopy",
            MarkerNs::User => c"user.overlay.layerfs.wholecopy",
        }
    }
}

/// True for names that are markers in some format and so never visible in the union.
pub fn is_marker_name(name: &OsStr) -> bool {
    name.as_bytes().starts_with(WH_PREFIX)
}

/// The OCI whiteout name for `name`: `.wh.NAME`.
pub fn oci_whiteout_name(name: &OsStr) -> OsString {
    let mut v = WH_PREFIX.to_vec();
    v.extend_from_slice(name.as_bytes());
    OsString::from_vec(v)
}

/// For an OCI whiteout `.wh.NAME` (not the opaque marker), the NAME it hides.
pub fn oci_whited_out(name: &OsStr) -> Option<&OsStr> {
    let b = name.as_bytes();
    if b == WH_OPAQUE || !b.starts_with(WH_PREFIX) {
        return None;
    }
    Some(OsStr::from_bytes(&b[WH_PREFIX.len()..]))
}

const OVERLAY_PREFIXES: [&[u8]; 2] = [b"trusted.overlay.", b"user.overlay."];

/// Xattrs that belong to the union's own bookkeeping and are never shown through the mount
/// (their escaped forms, `*.overlay.overlay.*`, are user data).
pub fn is_private_xattr(name: &[u8]) -> bool {
    if name.starts_with(b"user.fuseoverlayfs.") {
        return true;
    }
    OVERLAY_PREFIXES
        .iter()
        .any(|p| name.starts_with(p) && !name[p.len()..].starts_with(b"overlay."))
}

/// The on-disk name of an xattr set through the union. As kernel overlayfs (6.7+) does for
/// nesting, `PREFIX.overlay.X` is stored escaped as `PREFIX.overlay.overlay.X`. None: refused.
pub fn escape_xattr(name: &[u8]) -> Option<Vec<u8>> {
    if name.starts_with(b"user.fuseoverlayfs.") {
        return None;
    }
    for p in OVERLAY_PREFIXES {
        if let Some(rest) = name.strip_prefix(p) {
            let mut v = p.to_vec();
            v.extend_from_slice(b"overlay.");
            v.extend_from_slice(rest);
            return Some(v);
        }
    }
    Some(name.to_vec())
}

/// The union name of an on-disk xattr; None for the union's own markers (never listed).
pub fn unescape_xattr(disk: &[u8]) -> Option<Vec<u8>> {
    if is_private_xattr(disk) {
        return None;
    }
    for p in OVERLAY_PREFIXES {
        if let Some(rest) = disk.strip_prefix(p) {
            let mut v = p.to_vec();
            v.extend_from_slice(&rest[b"overlay.".len()..]);
            return Some(v);
        }
    }
    Some(disk.to_vec())
}

/// What a real directory says about the merge below it.
#[derive(Default, Debug)]
pub struct DirMarkers {
    pub opaque: bool,
    /// Marked impure (`overlay.impure`): entries with an origin may be in it.
    pub impure: bool,
    /// Raw redirect value: absolute (`/a/b`) from the layer root, or a name relative to the
    /// parent's lower path.
    pub redirect: Option<Vec<u8>>,
}

/// Read the opaque and redirect markers of a real directory (`dir` is its own fd).
pub fn dir_markers(dir: BorrowedFd<'_>) -> DirMarkers {
    dir_markers_of(XTarget::Fd(dir), dir)
}

/// `dir_markers`, with the xattrs read through `x` (naming the directory by its parent fd
/// and name is cheaper than by its own O_PATH fd).
pub fn dir_markers_of(x: XTarget<'_>, dir: BorrowedFd<'_>) -> DirMarkers {
    let mut m = DirMarkers::default();
    // One listxattr tells which markers exist; most directories carry none.
    let names = sys::listxattr(x).unwrap_or_default();
    for n in &names {
        if !is_private_xattr(n) {
            continue;
        }
        if IMPURE_XATTRS.iter().any(|a| a.to_bytes() == n.as_slice()) {
            m.impure = true;
        }
        if let Some(a) = OPAQUE_XATTRS.iter().find(|a| a.to_bytes() == n.as_slice())
            && let Ok(Some(v)) = sys::getxattr(x, a)
        {
            // "y" is opaque; "x" (kernel 6.7+) only flags xwhiteouts inside, not opacity.
            if v.as_slice() == b"y" {
                m.opaque = true;
            }
        }
        if let Some(a) = REDIRECT_XATTRS
            .iter()
            .find(|a| a.to_bytes() == n.as_slice())
            && let Ok(Some(v)) = sys::getxattr(x, a)
            && !v.is_empty()
        {
            m.redirect = Some(v);
        }
    }
    if !m.opaque && sys::statat(dir, OsStr::from_bytes(WH_OPAQUE)).is_ok() {
        m.opaque = true;
    }
    m
}

/// Is object `name` in `dir` (stat `st`) a whiteout? The kernel's char 0/0 device, or (kernel
/// 6.7+, ovl_path_is_whiteout) an empty regular file carrying `overlay.whiteout`: an
/// "xwhiteout", as composefs writes where it cannot make devices. A lookup takes both alike,
/// in any layer; the xattr is read only for empty files.
pub fn is_whiteout_at(dir: BorrowedFd<'_>, name: &OsStr, st: &sys::Stat) -> bool {
    if sys::is_whiteout_stat(st) {
        return true;
    }
    may_be_xwhiteout(st) && has_xwhiteout_mark(XTarget::At(dir, name))
}

/// Does the object carry the xwhiteout mark (whatever its kind and size)?
pub fn has_xwhiteout_mark(x: XTarget<'_>) -> bool {
    sys::listxattr(x).is_ok_and(|names| names.iter().any(|n| is_xwhiteout_xattr(n)))
}

/// An empty regular file: what an xwhiteout is (its xattr says whether it is one).
pub fn may_be_xwhiteout(st: &sys::Stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFREG && st.st_size == 0
}

/// The xattr that makes an empty file an xwhiteout, in either namespace.
pub fn is_xwhiteout_xattr(name: &[u8]) -> bool {
    XWHITEOUT_XATTRS.iter().any(|x| x.to_bytes() == name)
}

/// Does lower directory `dir` (a readable fd) say it holds xwhiteouts (`overlay.opaque=x`)?
/// A listing hides them only there, as the kernel's readdir does.
pub fn dir_has_xwhiteouts(dir: BorrowedFd<'_>) -> bool {
    let x = XTarget::Fd(dir);
    sys::listxattr(x).is_ok_and(|names| {
        names.iter().any(|n| {
            OPAQUE_XATTRS
                .iter()
                .find(|a| a.to_bytes() == n.as_slice())
                .is_some_and(|a| matches!(sys::getxattr(x, a), Ok(Some(v)) if v == b"x"))
        })
    })
}

/// Is `name` in `dir` deleted by an OCI whiteout file next to it?
pub fn has_oci_whiteout(dir: BorrowedFd<'_>, name: &OsStr) -> bool {
    sys::statat(dir, &oci_whiteout_name(name)).is_ok()
}

/// `/a/b/c` from components: the kernel's absolute redirect form, and how paths are shown.
pub fn absolute_path(path: &[OsString]) -> Vec<u8> {
    let mut v = Vec::new();
    for c in path {
        v.push(b'/');
        v.extend_from_slice(c.as_bytes());
    }
    v
}

/// An fs-verity digest as `overlay.metacopy` carries it: hash algorithm (FS_VERITY_HASH_ALG_*)
/// and digest.
pub type VerityDigest = (u8, Vec<u8>);

/// The digest in an `overlay.metacopy` value (struct ovl_metacopy: version 0, total length,
/// flags, algorithm, digest); None for a value of 4 bytes or less (the kernel never reads
/// those) or algorithm 0. A longer value of another version or a wrong length is invalid
/// (the kernel's EIO).
pub fn metacopy_digest(v: &[u8]) -> crate::error::Result<Option<VerityDigest>> {
    match v {
        _ if v.len() <= 4 => Ok(None),
        [0, len, _flags, algo, digest @ ..] if usize::from(*len) == v.len() => {
            Ok((*algo != 0).then(|| (*algo, digest.to_vec())))
        }
        _ => Err(crate::error::err(libc::EIO)),
    }
}

/// The `overlay.metacopy` value for a copy whose data has fs-verity digest `d` (the empty
/// value without one), as the kernel writes it.
pub fn metacopy_value(d: Option<&VerityDigest>) -> Vec<u8> {
    match d {
        None => Vec::new(),
        Some((algo, digest)) => {
            let mut v = vec![0, (4 + digest.len()) as u8, 0, *algo];
            v.extend_from_slice(digest);
            v
        }
    }
}

/// A metacopy mark too short to be the kernel's header: the kernel's lookup fails (EIO).
pub fn metacopy_mark_is_invalid(v: &[u8]) -> bool {
    (1..4).contains(&v.len())
}

/// `absolute_path` as text, for messages and events.
pub fn show_path(path: &[OsString]) -> String {
    String::from_utf8_lossy(&absolute_path(path)).into_owned()
}

/// Split a redirect path into components, refusing `..` and empty parts.
pub fn redirect_components(v: &[u8]) -> Option<Vec<OsString>> {
    let mut out = Vec::new();
    for c in v.split(|&b| b == b'/') {
        if c.is_empty() || c == b"." {
            continue;
        }
        if c == b".." {
            return None;
        }
        out.push(OsString::from_vec(c.to_vec()));
    }
    Some(out)
}

/// The kernel's `overlay.nlink` xattr on an indexed copy of a lower hard link: the union's
/// link count relative to the upper file's (`U+N`/`U-N`: the upper count includes the index's
/// own link, the union's counts names not yet linked up) or to the lower origin's (`L+N`).
/// Returns the base and the difference.
pub fn nlink_diff(target: XTarget<'_>) -> Option<(u8, i64)> {
    for x in [c"trusted.overlay.nlink", c"user.overlay.nlink"] {
        let Ok(Some(v)) = sys::getxattr(target, x) else {
            continue;
        };
        let Some((&base, rest)) = v.split_first() else {
            continue;
        };
        if let Some(diff) = std::str::from_utf8(rest)
            .ok()
            .and_then(|d| d.parse::<i64>().ok())
        {
            return Some((base, diff));
        }
    }
    None
}

/// The `overlay.nlink` value for a union count `diff` links off the upper file's.
pub fn nlink_value(diff: i64) -> Vec<u8> {
    format!("U{diff:+}").into_bytes()
}

/// The link count to report for an upper hard link, given its real nlink.
pub fn adjusted_nlink(target: XTarget<'_>, real: u64) -> u64 {
    let n = match nlink_diff(target) {
        None => return real,
        Some((b'U', diff)) => real as i64 + diff,
        // "L" is relative to the lower origin's count, which this upper no longer reaches;
        // the index holds one link either way.
        Some(_) => real as i64 - 1,
    };
    // As the kernel's ovl_get_nlink: a count that makes no sense falls back to the real one.
    if n > 0 { n as u64 } else { real }
}

/// A copy-up origin as the kernel stores it (`struct ovl_fb`): version 0, magic 0xfb, total
/// length, flags, the handle's type, the lower filesystem's UUID, then the handle itself.
#[derive(Debug, PartialEq, Eq)]
pub struct Origin {
    pub kind: u8,
    pub uuid: [u8; 16],
    pub handle: Vec<u8>,
}

const FB_HEADER: usize = 5 + 16;
/// The handle was made on a big-endian CPU.
const FH_FLAG_BIG_ENDIAN: u8 = 1;
/// The handle names an upper object (the kernel's index entries), not a lower origin.
const FH_FLAG_PATH_UPPER: u8 = 4;
/// The byte-order flag of handles made here.
const FH_FLAG_CPU: u8 = if cfg!(target_endian = "big") {
    FH_FLAG_BIG_ENDIAN
} else {
    0
};

impl Origin {
    pub fn encode(&self) -> Vec<u8> {
        let len = FB_HEADER + self.handle.len();
        let mut v = vec![0, 0xfb, len as u8, FH_FLAG_CPU, self.kind];
        v.extend_from_slice(&self.uuid);
        v.extend_from_slice(&self.handle);
        v
    }

    /// None for anything but a lower origin written on a CPU of this byte order.
    pub fn decode(v: &[u8]) -> Option<Origin> {
        if v.len() < FB_HEADER || v.len() > 255 || v[0] != 0 || v[1] != 0xfb {
            return None;
        }
        let flags = v[3];
        if v[2] as usize != v.len()
            || flags & FH_FLAG_PATH_UPPER != 0
            || flags & FH_FLAG_BIG_ENDIAN != FH_FLAG_CPU
        {
            return None;
        }
        Some(Origin {
            kind: v[4],
            uuid: v[5..21].try_into().ok()?,
            handle: v[21..].to_vec(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metacopy_marks_carry_digests_in_the_kernels_layout() {
        let d: VerityDigest = (1, vec![9; 32]);
        let v = metacopy_value(Some(&d));
        // struct ovl_metacopy: version, len, flags, digest_algo, digest.
        assert_eq!(&v[..4], &[0, 36, 0, 1]);
        assert_eq!(metacopy_digest(&v).unwrap(), Some(d));
        assert_eq!(metacopy_value(None), b"");
        assert_eq!(metacopy_digest(b"").unwrap(), None);
        // Four bytes or less are never read as a header; algorithm 0 is no digest.
        assert_eq!(metacopy_digest(&[1, 4, 0, 0]).unwrap(), None);
        assert_eq!(metacopy_digest(&[0, 5, 0, 0, 1]).unwrap(), None);
        // A longer value of another version or length is the kernel's EIO.
        assert!(metacopy_digest(&[1, 5, 0, 1, 1]).is_err());
        assert!(metacopy_digest(&[0, 6, 0, 1, 1]).is_err());
        assert!(metacopy_mark_is_invalid(b"\0\x03") && !metacopy_mark_is_invalid(b""));
    }

    #[test]
    fn origins_round_trip_in_the_kernels_layout() {
        let o = Origin {
            kind: 1,
            uuid: [7; 16],
            handle: vec![1, 2, 3, 4, 5, 6, 7, 8],
        };
        let v = o.encode();
        // struct ovl_fb: version, magic, len, flags, type, uuid, fid.
        assert_eq!(&v[..5], &[0, 0xfb, 29, 0, 1]);
        assert_eq!(v.len(), 29);
        assert_eq!(Origin::decode(&v), Some(o));
        // An upper-path handle (the kernel's index entries) or a bad length is no origin.
        let mut upper = v.clone();
        upper[3] = 4;
        assert_eq!(Origin::decode(&upper), None);
        assert_eq!(Origin::decode(&v[..28]), None);
        assert_eq!(Origin::decode(&[0, 0xfb]), None);
    }
}
