//! open(2) with O_TMPFILE: an unnamed upper file, named later by linkat, step by step against
//! kernel overlayfs (which supports it since Linux 6.6).

use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use layerfs::sys;

use crate::pair::{Pair, outcome};
use crate::require_fuse;
use crate::support::*;

fn stack(s: &Scratch) -> Vec<PathBuf> {
    let low = s.mkdir("low");
    write(low.join("a"), b"lower a\n");
    write(low.join("d/sub/f"), b"f");
    fs::create_dir(low.join("sgid")).unwrap();
    std::os::unix::fs::chown(low.join("sgid"), None, Some(100)).unwrap();
    chmod(low.join("sgid"), 0o2775);
    vec![low]
}

fn tmpfile(dir: &Path, excl: bool) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_TMPFILE | if excl { libc::O_EXCL } else { 0 })
        .mode(0o666)
        .open(dir)
}

/// linkat of the file's /proc fd to `to` (the way glibc users name an O_TMPFILE file).
fn name(f: &File, to: &Path) -> Result<(), i32> {
    let d = sys::open_dir_path(to.parent().unwrap()).unwrap();
    sys::link_fd(f.as_fd(), d.as_fd(), to.file_name().unwrap())
        .map_err(|e| e.raw_os_error().unwrap_or(-1))
}

/// (nlink, size, mode, gid) of an open file.
fn fstat(f: &File) -> (u64, u64, u32, u32) {
    let m = f.metadata().unwrap();
    (m.nlink(), m.len(), m.mode(), m.gid())
}

#[test]
fn o_tmpfile_files_are_unnamed_until_linked_as_in_the_kernel() {
    require_fuse!();
    let mut p = Pair::new(stack);
    // In a directory only a lower layer has: it is copied up (the file lives in the upper
    // directory), and the umask applies to the mode.
    p.same("write, link and read back", |m| {
        let mut f = tmpfile(&m.join("d/sub"), false).unwrap();
        sys::pwrite(f.as_fd(), b"unnamed\n", 0).unwrap();
        let before = fstat(&f);
        let listed = listing(&m.join("d/sub"));
        let linked = name(&f, &m.join("d/sub/t1"));
        let after = fstat(&f);
        sys::pwrite(f.as_fd(), b"named!\n", 8).unwrap();
        let mut s = String::new();
        f.read_to_string(&mut s).unwrap();
        let named = fs::read(m.join("d/sub/t1")).unwrap();
        let same_ino =
            fs::metadata(m.join("d/sub/t1")).unwrap().ino() == f.metadata().unwrap().ino();
        (before, listed, linked, after, s, named, same_ino)
    });
    // Named over a deleted lower file (a whiteout), into another directory, and refused
    // where the name is taken or the file was opened O_EXCL.
    p.same("name over a whiteout", |m| {
        fs::remove_file(m.join("a")).unwrap();
        let f = tmpfile(m, false).unwrap();
        sys::pwrite(f.as_fd(), b"new a\n", 0).unwrap();
        (
            name(&f, &m.join("a")),
            fs::read(m.join("a")).unwrap(),
            fstat(&f).0,
        )
    });
    p.same("name in another directory, then a second name", |m| {
        let f = tmpfile(&m.join("d"), false).unwrap();
        let first = name(&f, &m.join("d/sub/t2"));
        let second = name(&f, &m.join("t2b"));
        (
            first,
            second,
            fstat(&f).0,
            fs::metadata(m.join("t2b")).unwrap().nlink(),
        )
    });
    p.same("taken name", |m| {
        let f = tmpfile(m, false).unwrap();
        name(&f, &m.join("d"))
    });
    p.same("O_EXCL cannot be named", |m| {
        let f = tmpfile(m, true).unwrap();
        name(&f, &m.join("excl"))
    });
    // The group of a set-group-ID directory, as for any new file.
    p.same("in a set-group-ID directory", |m| {
        let f = tmpfile(&m.join("sgid"), false).unwrap();
        let st = fstat(&f);
        (name(&f, &m.join("sgid/g")), st)
    });
    // Never named: nothing is left once it is closed.
    p.same("never named", |m| {
        let f = tmpfile(&m.join("d"), false).unwrap();
        sys::pwrite(f.as_fd(), &[1u8; 70_000], 0).unwrap();
        drop(f);
        listing(&m.join("d"))
    });
    p.same("not in a file", |m| {
        outcome(tmpfile(&m.join("d/sub/f"), false).map(drop))
    });
    p.same("read-only", |m| {
        outcome(
            OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_TMPFILE)
                .mode(0o600)
                .open(m.join("d"))
                .map(drop),
        )
    });
    p.check("after the tmpfiles");
    // The copied-up d holds its copied-up sub alone: an unnamed file leaves nothing.
    assert_eq!(listing(&p.upper().join("d")), ["sub"]);
    p.check_interop();
}
