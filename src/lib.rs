//! layerfs: a copy-on-write union filesystem for container images, through FUSE.

pub mod cli;
pub mod error;
pub mod fuse;
pub mod store;
pub mod sys;
pub mod union;
