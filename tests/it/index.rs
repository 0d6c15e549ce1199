//! The inode index (`workdir/index`, the kernel's `index=on` format): copies of lower hard
//! links are shared by all their names in layerfs and in the kernel mounting the same upper,
//! both ways; link counts are the union's; an entry goes when its last name does.

use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use layerfs::sys;

use crate::require_fuse;
use crate::support::*;

/// A lower layer with `h1`, `h2`, `h3`: one file ("hard") under three names.
fn linked_lower(s: &Scratch) -> PathBuf {
    let low = s.mkdir("low");
    write(low.join("h1"), b"hard");
    fs::create_dir_all(low.join("d")).unwrap();
    fs::hard_link(low.join("h1"), low.join("h2")).unwrap();
    fs::hard_link(low.join("h1"), low.join("d/h3")).unwrap();
    low
}

fn append(p: &Path, b: &[u8]) {
    let mut f = OpenOptions::new().append(true).open(p).unwrap();
    f.write_all(b).unwrap();
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .map(|rd| {
            rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Kernel overlayfs options with its inode index.
fn index_opts(low: &Path, up: &Path, work: &Path) -> String {
    format!(
        "lowerdir={},upperdir={},workdir={},index=on",
        low.display(),
        up.display(),
        work.display()
    )
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// (content, nlink, st_ino) of each name.
fn names(mnt: &Path) -> Vec<(Vec<u8>, u64, u64)> {
    ["h1", "h2", "d/h3"]
        .iter()
        .map(|n| {
            let md = fs::metadata(mnt.join(n)).unwrap();
            (fs::read(mnt.join(n)).unwrap(), md.nlink(), md.ino())
        })
        .collect()
}

#[test]
fn copies_of_lower_hard_links_are_shared_through_the_kernels_index_both_ways() {
    require_fuse!();
    let s = Scratch::new();
    let low = linked_lower(&s);
    let ino = fs::metadata(low.join("h1")).unwrap().ino();

    // layerfs writes; the kernel (index=on) reads.
    let (up, work) = (s.mkdir("up"), s.mkdir("work"));
    {
        let l = Layerfs::mount(&rw_opts(&low, &up, &work), &s.path("mnt"));
        append(&l.mnt.join("h1"), b" more");
        // The union's count: all three names, as the kernel with index=on.
        assert_eq!(fs::metadata(l.mnt.join("h1")).unwrap().nlink(), 3);
    }
    let origin = get_xattr(up.join("h1"), "trusted.overlay.origin").expect("origin");
    assert_eq!(entries(&work.join("index")), vec![hex(&origin)]);
    assert_eq!(
        fs::metadata(work.join("index").join(hex(&origin)))
            .unwrap()
            .ino(),
        fs::metadata(up.join("h1")).unwrap().ino(),
        "the entry is the copy"
    );
    assert!(!work.join("layerfs-index").exists());
    {
        let k = Kernel::mount(&index_opts(&low, &up, &work), &s.path("kmnt"));
        let seen = names(&k.mnt);
        for (i, (data, nlink, _)) in seen.iter().enumerate() {
            assert_eq!(data, b"hard more", "kernel on our upper: name {i}");
            assert_eq!(*nlink, 3, "kernel on our upper: nlink of name {i}");
        }
        assert!(seen.iter().all(|n| n.2 == seen[0].2), "one inode: {seen:?}");
    }

    // The kernel (index=on) writes; layerfs reads.
    let (kup, kwork) = (s.mkdir("kup"), s.mkdir("kwork"));
    {
        let k = Kernel::mount(&index_opts(&low, &kup, &kwork), &s.path("kmnt"));
        append(&k.mnt.join("h1"), b" more");
    }
    let l = Layerfs::mount(&rw_opts(&low, &kup, &kwork), &s.path("mnt"));
    for (i, (data, nlink, n_ino)) in names(&l.mnt).into_iter().enumerate() {
        assert_eq!(
            data, b"hard more",
            "layerfs on the kernel's upper: name {i}"
        );
        assert_eq!(nlink, 3, "layerfs on the kernel's upper: nlink of name {i}");
        assert_eq!(
            n_ino, ino,
            "layerfs on the kernel's upper: st_ino of name {i}"
        );
    }
}

#[test]
fn an_index_entry_goes_with_the_last_name_of_its_file() {
    require_fuse!();
    let s = Scratch::new();
    let low = linked_lower(&s);
    let (up, work) = (s.mkdir("up"), s.mkdir("work"));
    let index = work.join("index");
    {
        let l = Layerfs::mount(&rw_opts(&low, &up, &work), &s.path("mnt"));
        append(&l.mnt.join("h1"), b" more");
        fs::remove_file(l.mnt.join("h1")).unwrap();
        // d/h3, never looked up, still needs the entry.
        assert_eq!(entries(&index).len(), 1);
        assert_eq!(fs::metadata(l.mnt.join("h2")).unwrap().nlink(), 2);
        let mut held = fs::File::open(l.mnt.join("h2")).unwrap();
        fs::remove_file(l.mnt.join("h2")).unwrap();
        assert_eq!(entries(&index).len(), 1);
        fs::remove_file(l.mnt.join("d/h3")).unwrap();
        assert_eq!(entries(&index), Vec::<String>::new(), "last name gone");
        // A file still open keeps its data.
        let mut got = Vec::new();
        held.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"hard more");
    }
    // Renamed over, too.
    let (up2, work2) = (s.mkdir("up2"), s.mkdir("work2"));
    {
        let l = Layerfs::mount(&rw_opts(&low, &up2, &work2), &s.path("mnt"));
        append(&l.mnt.join("d/h3"), b" more");
        for n in ["h1", "h2"] {
            fs::remove_file(l.mnt.join(n)).unwrap();
        }
        write(l.mnt.join("new"), b"new");
        assert_eq!(entries(&work2.join("index")).len(), 1);
        fs::rename(l.mnt.join("new"), l.mnt.join("d/h3")).unwrap();
        assert_eq!(entries(&work2.join("index")), Vec::<String>::new());
    }
    // A crash between the unlink of the last name and the entry's removal leaves an orphan:
    // the next mount removes it (as the kernel's index cleanup does).
    let (up3, work3) = (s.mkdir("up3"), s.mkdir("work3"));
    let opts3 = rw_opts(&low, &up3, &work3);
    {
        let l = Layerfs::mount(&opts3, &s.path("mnt"));
        append(&l.mnt.join("h1"), b" more");
        for n in ["h2", "d/h3"] {
            fs::remove_file(l.mnt.join(n)).unwrap();
        }
    }
    fs::remove_file(up3.join("h1")).unwrap();
    whiteout(up3.join("h1"));
    assert_eq!(entries(&work3.join("index")).len(), 1);
    let l = Layerfs::mount(&opts3, &s.path("mnt"));
    assert_eq!(entries(&work3.join("index")), Vec::<String>::new());
    assert_eq!(entries(&l.mnt), vec!["d".to_string()]);
}

/// An upper written by layerfs before the kernel's index format (`workdir/layerfs-index`,
/// entries named device-type-handle, copies without an origin) is brought over at mount.
#[test]
fn a_legacy_layerfs_index_is_brought_into_the_kernels_format() {
    require_fuse!();
    let s = Scratch::new();
    let low = linked_lower(&s);
    let (up, work) = (s.mkdir("up"), s.mkdir("work"));
    write(up.join("h1"), b"hard more");
    set_xattr(up.join("h1"), "trusted.overlay.nlink", b"U-1");
    let lowfd = sys::open_dir_path(&low).unwrap();
    let (kind, handle) = sys::file_handle_at(lowfd.as_fd(), "h1".as_ref()).unwrap();
    let dev = fs::metadata(low.join("h1")).unwrap().dev();
    let legacy = work.join("layerfs-index");
    fs::create_dir_all(&legacy).unwrap();
    fs::hard_link(
        up.join("h1"),
        legacy.join(format!("{dev:x}-{kind:x}-{}", hex(&handle))),
    )
    .unwrap();
    let l = Layerfs::mount(&rw_opts(&low, &up, &work), &s.path("mnt"));
    assert_eq!(fs::read(l.mnt.join("h2")).unwrap(), b"hard more");
    assert_eq!(fs::read(l.mnt.join("d/h3")).unwrap(), b"hard more");
    assert!(!legacy.exists(), "legacy index emptied and removed");
    let origin = get_xattr(up.join("h1"), "trusted.overlay.origin").expect("origin written");
    assert_eq!(entries(&work.join("index")), vec![hex(&origin)]);
}

/// `linked_lower` mounted (index=on) on the kernel or on layerfs: (scratch, mount, mountpoint).
fn linked_mount(kernel: bool) -> (Scratch, Either, PathBuf) {
    let s = Scratch::new();
    let low = linked_lower(&s);
    let (up, work, mnt) = (s.mkdir("up"), s.mkdir("work"), s.mkdir("mnt"));
    let m = Either::mount(kernel, &index_opts(&low, &up, &work), &mnt);
    (s, m, mnt)
}

/// Found by the data-only-layers soak (metacopy=on, seed 1631371): the kernel may forget the
/// directory of the name a hard link was first looked up by while another name keeps the
/// file in use: memory pressure drops unused cached entries (as `drop_caches` does here), and
/// a failed rename drops those it named. Every later request on the file (getxattr, fchmod,
/// fstat through the open fd) answered ESTALE, as the daemon reached the file only through
/// that first name. Now it goes by a name whose directory it still knows, as the kernel
/// does: the same sequence on both, with the file copied up first and with it still lower.
#[test]
fn a_hard_link_in_use_by_one_name_outlives_the_directory_of_its_first_name() {
    require_fuse!();
    for copied in [true, false] {
        let mut seen = Vec::new();
        for kernel in [true, false] {
            let (_s, _m, mnt) = linked_mount(kernel);
            // First looked up as d/h3: the node's first name is in d.
            if copied {
                append(&mnt.join("d/h3"), b" more");
            } else {
                fs::read(mnt.join("d/h3")).unwrap();
            }
            let f = fs::File::open(mnt.join("h1")).unwrap();
            // Unused entries go, d and d/h3 among them; h1 stays (the open file holds it).
            fs::write("/proc/sys/vm/drop_caches", "2").unwrap();
            let xattr = sys::getxattr(sys::XTarget::Fd(f.as_fd()), c"user.none")
                .map_err(|e| e.raw_os_error());
            let chmod = f
                .set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .map_err(|e| e.raw_os_error());
            let mode = f
                .metadata()
                .map(|md| md.mode() & 0o777)
                .map_err(|e| e.raw_os_error());
            let after: Vec<(Vec<u8>, u64, u32)> = ["h1", "h2", "d/h3"]
                .iter()
                .map(|n| {
                    let md = fs::metadata(mnt.join(n)).unwrap();
                    (
                        fs::read(mnt.join(n)).unwrap(),
                        md.nlink(),
                        md.mode() & 0o777,
                    )
                })
                .collect();
            // The name the copy-up could not link up (its directory gone) counts no more
            // once unlinked.
            fs::remove_file(mnt.join("d/h3")).unwrap();
            let left = fs::metadata(mnt.join("h1")).unwrap().nlink();
            seen.push(format!("{xattr:?} {chmod:?} {mode:?} {after:?} {left}"));
        }
        assert_eq!(
            seen[0], seen[1],
            "copied first: {copied}; kernel, then layerfs"
        );
        assert!(
            seen[1].starts_with("Ok(None) Ok(()) Ok(384)"),
            "{}",
            seen[1]
        );
    }
}

/// The same, when the name the file is open by is unlinked and its other name known to the
/// daemon is in a directory the kernel forgot: the fd kept working on the kernel and answered
/// ESTALE on layerfs, which took that forgotten name for the file's name.
#[test]
fn a_hard_link_open_by_a_name_since_unlinked_outlives_the_directory_of_its_other_name() {
    require_fuse!();
    let mut seen = Vec::new();
    for kernel in [true, false] {
        let (_s, _m, mnt) = linked_mount(kernel);
        append(&mnt.join("h1"), b" more");
        fs::read(mnt.join("d/h3")).unwrap();
        let f = fs::File::open(mnt.join("h1")).unwrap();
        fs::write("/proc/sys/vm/drop_caches", "2").unwrap();
        fs::remove_file(mnt.join("h1")).unwrap();
        let chmod = f
            .set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .map_err(|e| e.raw_os_error());
        let through_fd = f
            .metadata()
            .map(|md| (md.mode() & 0o777, md.nlink()))
            .map_err(|e| e.raw_os_error());
        let others: Vec<(u64, u32)> = ["h2", "d/h3"]
            .iter()
            .map(|n| {
                let md = fs::metadata(mnt.join(n)).unwrap();
                (md.nlink(), md.mode() & 0o777)
            })
            .collect();
        seen.push(format!("{chmod:?} {through_fd:?} {others:?}"));
    }
    assert_eq!(seen[0], seen[1], "kernel, then layerfs");
    assert!(seen[1].starts_with("Ok(()) Ok((384, 2))"), "{}", seen[1]);
}

/// Found by the drop-caches soak (seed 1700706, 2 times in 5 on session 24's code): a lower
/// hard link copied up through names in one directory; the kernel forgot that directory,
/// with the file's own forget still queued; meanwhile a lookup of another of its names
/// (never looked up before) took the new name as the one to link it up from, though the
/// new name was not in the upper yet. The lookup answered ENOENT, and so did every name of
/// the file after, as its node now reached it by that name. The kernel links the new name
/// up from its index entry. The race between the kernel's two forgets cannot be forced
/// through a mount, so the union is driven through its own calls, as the FUSE side calls it.
#[test]
fn a_new_name_of_a_hard_link_whose_known_names_directory_was_forgotten_is_linked_up() {
    use std::ffi::OsStr;
    let s = Scratch::new();
    let low = s.mkdir("low");
    fs::create_dir_all(low.join("d")).unwrap();
    write(low.join("d/h1"), b"hard");
    fs::hard_link(low.join("d/h1"), low.join("d/h2")).unwrap();
    fs::hard_link(low.join("d/h1"), low.join("f0")).unwrap();
    let (u, up) = engine(&s, low);
    let d = u.lookup(1, OsStr::new("d")).unwrap();
    let h1 = u.lookup(d.id, OsStr::new("h1")).unwrap();
    let h2 = u.lookup(d.id, OsStr::new("h2")).unwrap();
    assert_eq!(h1.id, h2.id, "one file, one node");
    // A write copies it up, with its names known so far (h1, h2).
    let fh = u.open(h1.id, libc::O_WRONLY | libc::O_APPEND).unwrap();
    u.write(fh, 4, b" more", None).unwrap();
    u.release(fh);
    // The kernel forgets the directory (both its lookups); the file's forget is still queued.
    u.forget(d.id, 1);
    let f0 = u
        .lookup(1, OsStr::new("f0"))
        .expect("another name of the copied-up file");
    assert_eq!(f0.id, h1.id, "still one file");
    assert_eq!(f0.attr.st_nlink, 3);
    assert_eq!(f0.attr.st_size, 9);
    assert_eq!(
        fs::read(up.join("f0")).unwrap(),
        b"hard more",
        "linked up, copy and all"
    );
    // Its names in the directory answer again once the kernel looks it up anew.
    let d = u.lookup(1, OsStr::new("d")).unwrap();
    for n in ["h1", "h2"] {
        let e = u.lookup(d.id, OsStr::new(n)).unwrap();
        assert_eq!((e.id, e.attr.st_size), (h1.id, 9), "{n}");
    }
}

/// The race behind the test above, forced through the union's own calls (CI, session 30):
/// the kernel forgot the directory of the file's other name before it unlinked the name the
/// file is open by, but the daemon got that directory's FORGET (over /dev/fuse) after the
/// UNLINK (over io_uring). At the unlink the other name still looked live, so the node kept
/// no fd of its own; once the directory's node went, every request through the open fd
/// answered ESTALE. The kernel keeps the file's inode, and so must the node.
#[test]
fn a_hard_link_unlinked_before_the_forget_of_its_other_names_directory_keeps_working() {
    use layerfs::union::write::SetAttr;
    use std::ffi::OsStr;
    let s = Scratch::new();
    let low = linked_lower(&s);
    let (u, _up) = engine(&s, low);
    let h1 = u.lookup(1, OsStr::new("h1")).unwrap();
    let fh = u.open(h1.id, libc::O_WRONLY | libc::O_APPEND).unwrap();
    u.write(fh, 4, b" more", None).unwrap();
    u.release(fh);
    let d = u.lookup(1, OsStr::new("d")).unwrap();
    let h3 = u.lookup(d.id, OsStr::new("h3")).unwrap();
    assert_eq!(h3.id, h1.id, "one file, one node");
    // The kernel forgot d/h3 and d, then unlinked h1; the daemon sees the unlink first.
    u.unlink(1, OsStr::new("h1")).unwrap();
    u.forget(d.id, 1);
    // The file is still open by h1: its node must reach it.
    let attr = u
        .setattr(
            h1.id,
            SetAttr {
                mode: Some(0o600),
                ..Default::default()
            },
        )
        .expect("chmod through the open fd");
    assert_eq!((attr.st_mode & 0o777, attr.st_nlink), (0o600, 2));
    let attr = u.getattr(h1.id).expect("fstat through the open fd");
    assert_eq!((attr.st_size, attr.st_nlink), (9, 2));
    // Its names answer again once the kernel looks them up anew.
    let d = u.lookup(1, OsStr::new("d")).unwrap();
    for (p, n) in [(d.id, "h3"), (1, "h2")] {
        let e = u.lookup(p, OsStr::new(n)).unwrap();
        assert_eq!((e.attr.st_mode & 0o777, e.attr.st_size), (0o600, 9), "{n}");
    }
}

/// A lookup of a further name of a copied-up hard link, racing the FORGET, the removal or
/// the move of the node that answered for the copy, must reach the copy: never the lower
/// file, nor what is left where a moved name was (a whiteout).
#[test]
fn a_further_name_looked_up_while_the_copys_node_goes_reaches_the_copy() {
    use std::ffi::{OsStr, OsString};
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    const NAMES: usize = 3000;
    let s = Scratch::new();
    let low = s.mkdir("low");
    write(low.join("h"), b"hard");
    for d in ["a", "b"] {
        fs::create_dir(low.join(d)).unwrap();
        for i in 0..NAMES {
            fs::hard_link(low.join("h"), low.join(format!("{d}/{i}"))).unwrap();
        }
    }
    let (u, up) = engine(&s, low);
    let h = u.lookup(1, OsStr::new("h")).unwrap();
    let fh = u.open(h.id, libc::O_WRONLY | libc::O_APPEND).unwrap();
    u.write(fh, 4, b" more", None).unwrap();
    u.release(fh);
    u.forget(h.id, 1);
    let a = u.lookup(1, OsStr::new("a")).unwrap().id;
    let b = u.lookup(1, OsStr::new("b")).unwrap().id;
    let mut stale: Vec<(&str, OsString, i64)> = Vec::new();
    // Names in `a` taken so far; those of them removed, and renamed.
    let (next_a, unlinked, renamed) = (
        AtomicUsize::new(0),
        AtomicUsize::new(0),
        AtomicUsize::new(0),
    );
    // While the names in `b` are looked up, the kernel looks the copy's name up and forgets
    // it, over and over; then removes names in `a`, then renames them, each the only name
    // the daemon knows of the file when it goes.
    let third = NAMES / 3;
    for (phase, names) in [
        ("forget", 0..third),
        ("unlink", third..2 * third),
        ("rename", 2 * third..NAMES),
    ] {
        let done = AtomicBool::new(false);
        std::thread::scope(|t| {
            t.spawn(|| {
                while !done.load(Ordering::Relaxed) {
                    if phase == "forget" {
                        let e = u.lookup(1, OsStr::new("h")).unwrap();
                        u.forget(e.id, 1);
                        continue;
                    }
                    let i = next_a.fetch_add(1, Ordering::Relaxed);
                    if i >= NAMES {
                        break;
                    }
                    let name = OsString::from(i.to_string());
                    let e = u
                        .lookup(a, &name)
                        .unwrap_or_else(|e| panic!("{phase} a/{i}: {e:?}"));
                    if phase == "unlink" {
                        u.unlink(a, &name).unwrap();
                        unlinked.fetch_add(1, Ordering::Relaxed);
                    } else {
                        u.rename(a, &name, a, OsStr::new(&format!("r{i}")), 0)
                            .unwrap();
                        renamed.fetch_add(1, Ordering::Relaxed);
                    }
                    u.forget(e.id, 1);
                }
            });
            for i in names {
                let name = OsString::from(i.to_string());
                let e = u.lookup(b, &name).unwrap();
                if e.attr.st_size != 9 {
                    stale.push((phase, name, e.attr.st_size));
                }
                u.forget(e.id, 1);
            }
            done.store(true, Ordering::Relaxed);
        });
    }
    assert_eq!(
        stale,
        Vec::new(),
        "names that reached the lower file or a whiteout"
    );
    assert!(renamed.load(Ordering::Relaxed) > 0, "no rename raced");
    // Every name left is one file with the copy in the upper layer, and counts.
    let ino = fs::metadata(up.join("h")).unwrap().ino();
    for i in 0..NAMES {
        let md = fs::metadata(up.join(format!("b/{i}"))).unwrap();
        assert_eq!((md.ino(), md.len()), (ino, 9), "b/{i} in the upper");
    }
    let e = u.lookup(1, OsStr::new("h")).unwrap();
    let names = 1 + 2 * NAMES - unlinked.load(Ordering::Relaxed);
    assert_eq!(e.attr.st_nlink, names as u64, "h and the names not removed");
}

/// A link made from a name of a hard link that a rename is moving away meanwhile (leaving a
/// whiteout, the name being in the lower layer too) links the file, never that whiteout.
/// The engine, driven from two threads.
#[test]
fn a_link_from_a_name_being_moved_links_the_file() {
    use std::ffi::OsStr;
    use std::sync::atomic::{AtomicBool, Ordering};
    let s = Scratch::new();
    let low = linked_lower(&s);
    fs::create_dir(low.join("e")).unwrap();
    let (u, _up) = engine(&s, low);
    let d = u.lookup(1, OsStr::new("d")).unwrap().id;
    let e = u.lookup(1, OsStr::new("e")).unwrap().id;
    // Known by d/h3 only: the name a link is made from.
    let h = u.lookup(d, OsStr::new("h3")).unwrap();
    let fh = u.open(h.id, libc::O_WRONLY | libc::O_APPEND).unwrap();
    u.write(fh, 4, b" more", None).unwrap();
    u.release(fh);
    let done = AtomicBool::new(false);
    let mut wrong = Vec::new();
    std::thread::scope(|t| {
        t.spawn(|| {
            while !done.load(Ordering::Relaxed) {
                u.rename(d, OsStr::new("h3"), d, OsStr::new("h4"), 0)
                    .unwrap();
                u.rename(d, OsStr::new("h4"), d, OsStr::new("h3"), 0)
                    .unwrap();
            }
        });
        for _ in 0..600 {
            match u.link(h.id, e, OsStr::new("n")) {
                Ok(n) => {
                    let st = n.attr;
                    if st.st_mode & libc::S_IFMT != libc::S_IFREG || st.st_size != 9 {
                        wrong.push(format!("mode {:o} size {}", st.st_mode, st.st_size));
                    }
                    u.forget(n.id, 1);
                    u.unlink(e, OsStr::new("n")).unwrap();
                }
                Err(err) => wrong.push(format!("{err:?}")),
            }
        }
        done.store(true, Ordering::Relaxed);
    });
    wrong.dedup();
    assert_eq!(
        wrong,
        Vec::<String>::new(),
        "links made while the name moved"
    );
}
