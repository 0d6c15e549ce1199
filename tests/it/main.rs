//! Integration tests: everything here mounts for real (FUSE and kernel overlayfs) and skips with
//! a printed reason where that is impossible.

mod pair;
mod podman;
mod support;

mod catalog;
mod cli;
mod crash;
mod data_only;
mod differential;
mod fd_limit;
mod full_disk;
mod index;
mod inodes;
mod metacopy;
mod observe;
mod power_cut;
mod races;
mod read_side;
mod rootless;
mod runtime;
mod store;
mod tmpfile;
mod transport;
mod write_path;
