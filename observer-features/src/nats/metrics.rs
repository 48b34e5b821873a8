//! The `observer_nats_*` series, registered once per process on the core registry.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// The `outcome` labels of `observer_nats_messages_total` (worker side).
pub const OUTCOMES: [&str; 4] = ["received", "acked", "redelivered", "dead_lettered"];

pub struct NatsMetrics {
    /// Events published and acknowledged by the stream (publisher).
    pub published: IntCounter,
    /// Of those, acknowledged as duplicates (`Nats-Msg-Id` already in the duplicate window):
    /// republished after a crash or a takeover, stored once.
    pub duplicates: IntCounter,
    /// Publishes that failed (no acknowledgement in time, stream full, no connection); each is
    /// retried.
    pub publish_errors: IntCounter,
    /// From publish to the stream's acknowledgement.
    pub publish_ack: Histogram,
    /// Messages by outcome (worker): `received`, `acked`, `redelivered` (a delivery after the
    /// first), `dead_lettered` (`max_deliver` exceeded or undecodable).
    pub messages: IntCounterVec,
    /// Messages waiting in this worker's consumers, as last reported by the server with a
    /// delivery (summed over partitions): the consumer lag.
    pub consumer_lag: IntGauge,
}

impl NatsMetrics {
    pub fn register(registry: &Registry) -> Result<NatsMetrics, prometheus::Error> {
        let published = IntCounter::new(
            "observer_nats_published_total",
            "Events published to the stream and acknowledged by it.",
        )?;
        let duplicates = IntCounter::new(
            "observer_nats_publish_duplicates_total",
            "Publishes the stream acknowledged as duplicates (same event id within the duplicate window).",
        )?;
        let publish_errors = IntCounter::new(
            "observer_nats_publish_errors_total",
            "Publishes that failed and are retried.",
        )?;
        let publish_ack = Histogram::with_opts(
            HistogramOpts::new(
                "observer_nats_publish_ack_seconds",
                "Time from publish to the stream's acknowledgement.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
            ]),
        )?;
        let messages = IntCounterVec::new(
            Opts::new(
                "observer_nats_messages_total",
                "Messages taken from the stream by this worker, by outcome.",
            ),
            &["outcome"],
        )?;
        let consumer_lag = IntGauge::new(
            "observer_nats_consumer_lag",
            "Messages waiting in the partition consumers, as last reported with a delivery.",
        )?;
        registry.register(Box::new(published.clone()))?;
        registry.register(Box::new(duplicates.clone()))?;
        registry.register(Box::new(publish_errors.clone()))?;
        registry.register(Box::new(publish_ack.clone()))?;
        registry.register(Box::new(messages.clone()))?;
        registry.register(Box::new(consumer_lag.clone()))?;
        for o in OUTCOMES {
            messages.with_label_values(&[o]);
        }
        Ok(NatsMetrics {
            published,
            duplicates,
            publish_errors,
            publish_ack,
            messages,
            consumer_lag,
        })
    }

    pub fn count(&self, outcome: &str) {
        self.messages.with_label_values(&[outcome]).inc();
    }
}
