//! Production layers around the observer executor. Each module is one layer (or store) behind
//! its own cargo feature, gated once here; nothing in `observer-core` knows these exist.

#[cfg(feature = "checkpoint")]
pub mod checkpoint;

#[cfg(feature = "concurrent")]
pub mod concurrent;

#[cfg(feature = "dedup")]
pub mod dedup;

#[cfg(feature = "circuit_breaker")]
pub mod circuit_breaker;

#[cfg(feature = "failover")]
pub mod failover;

#[cfg(feature = "metrics")]
pub mod metrics;
#[cfg(feature = "rate_limit")]
pub mod rate_limit;

#[cfg(feature = "caching")]
pub mod caching;

#[cfg(feature = "nats")]
pub mod nats;
#[cfg(feature = "queue")]
pub mod queue;
#[cfg(feature = "search")]
pub mod search;
