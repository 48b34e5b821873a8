//! fraiseql-observers core: the change event, the change-log source, observers and their
//! conditions and templates, the built-in actions, the `Executor` seam and the run loop.
//!
//! Nothing here depends on `observer-features`; the layers there wrap the executor defined here.

pub mod action;
pub mod actions;
pub mod audit;
pub mod change_log;
pub mod condition;
pub mod config;
pub mod enrich;
pub mod event;
pub mod executor;
pub mod forward;
pub mod http_server;
pub mod leadership;
pub mod metrics;
pub mod observer;
pub mod outbound;
pub mod path;
pub mod preflight;
pub mod printable;
pub mod redeliver;
pub mod retention;
pub mod runloop;
pub mod schema;
pub mod signing;
pub mod store;
pub mod template;
pub mod timestamp;
pub mod tls;
pub mod webhook_client;

/// An error and its causes, joined with `: ` (`tokio_postgres::Error` and `reqwest::Error` keep
/// the useful part, such as "connection refused", in their sources).
/// A Postgres error with the server's message and SQLSTATE (`tokio_postgres::Error` alone
/// displays only "db error"), e.g. `db error: ERROR: could not extend file …: No space left on
/// device (SQLSTATE 53100)`.
pub fn pg_error(e: &tokio_postgres::Error) -> String {
    let mut s = error_chain(e);
    if let Some(code) = e.code() {
        s.push_str(&format!(" (SQLSTATE {})", code.code()));
    }
    s
}

pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}
