//! The publisher's [`Forwarder`]: one JetStream publish per event, `Nats-Msg-Id` = event id,
//! on `<prefix>.<entity>.<partition>`, acknowledged before the run loop counts it done.
//!
//! Publishes are asynchronous: the run loop keeps up to `max_outstanding_acks` dispatches in
//! flight (the publisher stack's concurrency limit) and the JetStream context allows as many
//! unacknowledged publishes, so the connection carries a window of publishes rather than one
//! round trip per event. Events of one (entity, entity id) are still published one after the
//! other (the publisher's observer is ordered per entity), so a retried publish can never land
//! after a later change of the same entity.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::context::{Context, PublishErrorKind};
use async_nats::jetstream::message::PublishMessage as Publish;
use observer_core::config::NatsConfig;
use observer_core::event::ChangeEvent;
use observer_core::forward::{ForwardError, Forwarder};

use super::NatsMetrics;

/// Publishes change events to the stream of `[nats]`.
pub struct JetStreamForwarder {
    js: Context,
    prefix: String,
    partitions: u32,
    stream: String,
    server: String,
    metrics: Arc<NatsMetrics>,
}

impl std::fmt::Debug for JetStreamForwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JetStreamForwarder")
            .field("server", &self.server)
            .field("stream", &self.stream)
            .finish()
    }
}

impl JetStreamForwarder {
    pub fn new(
        client: async_nats::Client,
        cfg: &NatsConfig,
        metrics: Arc<NatsMetrics>,
    ) -> JetStreamForwarder {
        let js = async_nats::jetstream::context::ContextBuilder::new()
            .timeout(Duration::from_millis(cfg.publish_timeout_ms))
            .max_ack_inflight(cfg.max_outstanding_acks.max(1))
            .backpressure_on_inflight(true)
            .build(client);
        JetStreamForwarder {
            js,
            prefix: cfg.subject_prefix.clone(),
            partitions: cfg.partitions,
            stream: cfg.stream.clone(),
            server: super::shown_servers(&cfg.url),
            metrics,
        }
    }
}

#[async_trait::async_trait]
impl Forwarder for JetStreamForwarder {
    async fn forward(&self, event: &ChangeEvent) -> Result<(), ForwardError> {
        let partition =
            super::partition(&event.entity, event.entity_id.as_deref(), self.partitions);
        let subject = super::subject(&self.prefix, &event.entity, partition);
        let payload = serde_json::to_vec(event).map_err(|e| ForwardError {
            message: format!("encoding the event: {e}"),
            permanent: true,
        })?;
        let started = Instant::now();
        let failed = |kind: &str, e: &dyn std::fmt::Display, permanent: bool| {
            self.metrics.publish_errors.inc();
            ForwardError {
                message: format!(
                    "publishing to stream `{}` on {} ({kind}): {e}",
                    self.stream, self.server
                ),
                permanent,
            }
        };
        let publish = Publish::build()
            .payload(payload.into())
            .message_id(event.id.to_string())
            .expected_stream(self.stream.as_str());
        let ack = match self.js.send_publish(subject, publish).await {
            Ok(ack) => ack,
            Err(e) => {
                let permanent = e.kind() == PublishErrorKind::MaxPayloadExceeded;
                return Err(failed("send", &e, permanent));
            }
        };
        match ack.await {
            Ok(ack) => {
                self.metrics
                    .publish_ack
                    .observe(started.elapsed().as_secs_f64());
                self.metrics.published.inc();
                if ack.duplicate {
                    self.metrics.duplicates.inc();
                }
                Ok(())
            }
            Err(e) => Err(failed("acknowledgement", &e, false)),
        }
    }

    fn destination(&self) -> String {
        format!("nats/{}", self.stream)
    }
}
