//! layerfs: a copy-on-write union filesystem for container images, through FUSE.

pub mod cli;
pub mod control;
pub mod error;
pub mod fuse;
pub mod inspect;
pub mod observe;
pub mod runtime;
pub mod store;
pub mod sys;
pub mod union;
