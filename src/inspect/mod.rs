//! Offline views of layer stacks: what each layer adds, changes, deletes and hides.

pub mod layers;
pub mod svg;
