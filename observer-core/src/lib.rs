//! fraiseql-observers core: the change event, the change-log source, observers and their
//! conditions and templates, the built-in actions, the `Executor` seam and the run loop.
//!
//! Nothing here depends on `observer-features`; the layers there wrap the executor defined here.

pub mod event;
pub mod path;
pub mod condition;
pub mod signing;
pub mod template;
