//! The FUSE side: the thin adapter over the engine, and the mount session around it.

pub mod adapter;
pub mod session;
