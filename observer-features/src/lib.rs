//! Production layers around the observer executor. Each module is one layer (or store) behind
//! its own cargo feature, gated once here; nothing in `observer-core` knows these exist.

#[cfg(feature = "checkpoint")]
pub mod checkpoint;

#[cfg(feature = "concurrent")]
pub mod concurrent;

#[cfg(feature = "caching")]
pub mod caching;
