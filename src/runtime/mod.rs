//! Running a container from the store with an OCI runtime (runc, crun): the bundle's
//! config.json, derived from the image config, and the runtime's invocation.

pub mod spec;
pub mod users;
