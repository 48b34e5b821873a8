//! The `queue` layer: observers marked `queue = true` (or `queue = "name"`) do not run their
//! actions in the event path. The layer enqueues one job per delivery on a Redis stream
//! (idempotently: the same idempotency key is enqueued once, whatever is replayed), the event
//! is done once its jobs are durably there, and workers — in the daemon (`[queue] workers`) or
//! in separate `run --role queue-worker` processes — work the jobs off through the same executor
//! stack, with the action's retry policy and the same dead-letter table after the last attempt.
//!
//! * [`store`]: the Redis Streams backend (enqueue script, consumer group, take-over, stats).
//! * [`layer`]: the tower layer in the event path.
//! * [`worker`]: the worker pool.
//! * [`metrics`]: the `observer_queue_*` series.

pub mod layer;
pub mod metrics;
pub mod store;
pub mod worker;

pub use layer::QueueLayer;
pub use metrics::QueueMetrics;
pub use store::{JobQueue, QueueError, QueueStats};
pub use worker::Workers;
