//! The queue's Prometheus series, registered once per process on the core registry.

use prometheus::{GaugeVec, IntCounterVec, IntGaugeVec, Opts, Registry};

/// The `outcome` labels of `observer_queue_jobs_total`.
pub const OUTCOMES: [&str; 5] = [
    "enqueued",
    "completed",
    "failed",
    "retried",
    "dead_lettered",
];

pub struct QueueMetrics {
    /// Jobs in each queue's stream (refreshed every few seconds from Redis).
    pub depth: IntGaugeVec,
    /// Of those, read by a worker and not finished.
    pub pending: IntGaugeVec,
    /// Age of each queue's oldest job, in seconds.
    pub oldest_age: GaugeVec,
    /// Jobs by queue and outcome: `enqueued` (by the event path), `completed`, `failed` (an
    /// attempt failed), `retried` (an attempt scheduled again), `dead_lettered`.
    pub jobs: IntCounterVec,
}

impl QueueMetrics {
    /// Registers the series on `registry` (the core `Metrics::registry`).
    pub fn register(registry: &Registry) -> Result<QueueMetrics, prometheus::Error> {
        let depth = IntGaugeVec::new(
            Opts::new(
                "observer_queue_depth",
                "Jobs in the queue (waiting, running or retrying).",
            ),
            &["queue"],
        )?;
        let pending = IntGaugeVec::new(
            Opts::new(
                "observer_queue_pending",
                "Jobs read by a worker and not yet finished.",
            ),
            &["queue"],
        )?;
        let oldest_age = GaugeVec::new(
            Opts::new(
                "observer_queue_oldest_age_seconds",
                "Age of the oldest job in the queue (0 when empty).",
            ),
            &["queue"],
        )?;
        let jobs = IntCounterVec::new(
            Opts::new("observer_queue_jobs_total", "Jobs by queue and outcome."),
            &["queue", "outcome"],
        )?;
        registry.register(Box::new(depth.clone()))?;
        registry.register(Box::new(pending.clone()))?;
        registry.register(Box::new(oldest_age.clone()))?;
        registry.register(Box::new(jobs.clone()))?;
        Ok(QueueMetrics {
            depth,
            pending,
            oldest_age,
            jobs,
        })
    }

    /// Touches every series of `queue`, so dashboards never read "no data".
    pub fn init_queue(&self, queue: &str) {
        self.depth.with_label_values(&[queue]);
        self.pending.with_label_values(&[queue]);
        self.oldest_age.with_label_values(&[queue]);
        for o in OUTCOMES {
            self.jobs.with_label_values(&[queue, o]);
        }
    }

    pub fn count(&self, queue: &str, outcome: &str) {
        self.jobs.with_label_values(&[queue, outcome]).inc();
    }

    pub fn observe(&self, s: &super::store::QueueStats) {
        self.depth
            .with_label_values(&[&s.queue])
            .set(s.depth as i64);
        self.pending
            .with_label_values(&[&s.queue])
            .set(s.pending as i64);
        self.oldest_age
            .with_label_values(&[&s.queue])
            .set(s.oldest_age_secs);
    }
}
