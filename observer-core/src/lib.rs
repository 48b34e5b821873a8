//! fraiseql-observers core: the change event, the change-log source, observers and their
//! conditions and templates, the built-in actions, the `Executor` seam and the run loop.
//!
//! Nothing here depends on `observer-features`; the layers there wrap the executor defined here.

pub mod action;
pub mod change_log;
pub mod condition;
pub mod config;
pub mod event;
pub mod executor;
pub mod observer;
pub mod path;
pub mod redeliver;
pub mod retention;
pub mod runloop;
pub mod schema;
pub mod signing;
pub mod store;
pub mod template;
