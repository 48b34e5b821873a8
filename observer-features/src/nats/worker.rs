//! The worker's message source: one pull loop per partition consumer, each handing its
//! messages to the run loop (`observer_core::runloop::supervise_work`) as [`Item`]s whose
//! [`Settle`] acknowledges them once their outcomes are written.
//!
//! * Each partition's consumer has `max_ack_pending = 1` (see `stream.rs`), so a loop that asks
//!   for the next message while the current one is worked on simply waits: the next message of
//!   a partition goes to whichever worker asks, only after the current one is acknowledged.
//! * While a message is held (waiting in the loop, its actions running or retrying, its outcome
//!   being written), the worker reports it in progress every `progress_interval_ms`, so the
//!   server does not hand it to another worker after `ack_wait_ms`.
//! * A message dropped without being settled (the run failed, or the worker stops) is given
//!   back at once (a negative ack): another worker takes it, with the same idempotency keys.
//!   A worker killed outright gives nothing back: its message is redelivered after the ack wait.
//! * A message delivered more than `max_deliver` times is not run: it is dead-lettered
//!   (reason `max_deliver_exceeded`) and acknowledged. One that cannot be decoded is
//!   dead-lettered at once (reason `poison_event`).
//!
//! Shutdown: the pull loops stop asking; what the run loop finishes is acknowledged, the rest
//! given back; [`Workers::finish`] waits (bounded) until those acks are on the wire.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::pull;
use async_nats::jetstream::message::Acker;
use async_nats::jetstream::{AckKind, Context};
use futures::StreamExt;
use observer_core::config::NatsConfig;
use observer_core::event::ChangeEvent;
use observer_core::runloop::{Item, Settle};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{consumer_name, shown_servers, NatsMetrics};

/// How long one pull request waits on the server before it is renewed.
const PULL_EXPIRES: Duration = Duration::from_secs(30);
/// The server's idle heartbeat on a waiting pull: two missed ones end the stream, and the loop
/// opens a new one (a server restart or a lost connection is noticed within 10 s).
const PULL_HEARTBEAT: Duration = Duration::from_secs(5);
/// Messages one pull request may deliver over its life (one at a time per partition).
const PULL_BATCH: usize = 64;

/// The subject workers answer "who is there" on (outside the stream's subjects).
pub fn roll_call_subject(cfg: &NatsConfig) -> String {
    format!("_OBSERVER.{}.workers", cfg.stream)
}

/// The message sources of one worker process.
pub struct Workers {
    client: async_nats::Client,
    js: Context,
    cfg: NatsConfig,
    metrics: Arc<NatsMetrics>,
    /// This worker's name (`host:pid`), in logs and the roll call.
    name: String,
    /// Acks and negative acks still being sent.
    acks: TaskTracker,
    /// The last `pending` the server reported per partition (the consumer lag).
    lag: Arc<Vec<AtomicU64>>,
    started: Instant,
}

impl Workers {
    pub fn new(
        client: async_nats::Client,
        cfg: &NatsConfig,
        metrics: Arc<NatsMetrics>,
        name: String,
    ) -> Arc<Workers> {
        let js = async_nats::jetstream::new(client.clone());
        let lag = (0..cfg.partitions).map(|_| AtomicU64::new(0)).collect();
        Arc::new(Workers {
            client,
            js,
            cfg: cfg.clone(),
            metrics,
            name,
            acks: TaskTracker::new(),
            lag: Arc::new(lag),
            started: Instant::now(),
        })
    }

    /// Starts one pull loop per partition (and the roll-call responder), sending items to
    /// `items` until `shutdown`.
    pub fn start(
        self: &Arc<Self>,
        items: mpsc::Sender<Result<Vec<Item>, String>>,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinSet<()> {
        let mut set = tokio::task::JoinSet::new();
        for p in 0..self.cfg.partitions {
            set.spawn(self.clone().pull_loop(p, items.clone(), shutdown.clone()));
        }
        set.spawn(self.clone().answer_roll_call(shutdown));
        tracing::info!(worker = %self.name, server = %shown_servers(&self.cfg.url), stream = %self.cfg.stream,
            partitions = self.cfg.partitions, "worker: pulling from every partition consumer");
        set
    }

    /// Waits (at most `within`) for the acknowledgements still being sent, then flushes the
    /// connection so they are on the wire before the process exits.
    pub async fn finish(&self, within: Duration) {
        self.acks.close();
        if tokio::time::timeout(within, self.acks.wait())
            .await
            .is_err()
        {
            tracing::warn!("some acknowledgements were not sent in time; those messages are redelivered after the ack wait");
        }
        let _ = tokio::time::timeout(within, self.client.flush()).await;
    }

    async fn pull_loop(
        self: Arc<Self>,
        partition: u32,
        items: mpsc::Sender<Result<Vec<Item>, String>>,
        shutdown: CancellationToken,
    ) {
        let name = consumer_name(&self.cfg.consumer_prefix, partition);
        let mut consumer: Option<async_nats::jetstream::consumer::PullConsumer> = None;
        let mut backoff = Duration::from_millis(100);
        loop {
            if shutdown.is_cancelled() {
                return;
            }
            let open = async {
                if consumer.is_none() {
                    let c = self
                        .js
                        .get_consumer_from_stream::<pull::Config, _, _>(&name, &self.cfg.stream)
                        .await
                        .map_err(|e| format!("consumer `{name}`: {e}"))?;
                    consumer = Some(c);
                }
                let Some(c) = consumer.as_ref() else {
                    return Err(format!("consumer `{name}`: not found"));
                };
                // A continuous pull: one waiting request asks for up to PULL_BATCH messages and
                // is refilled as they arrive, and the server hands this partition's next message
                // to a waiting request only once the current one is acknowledged
                // (`max_ack_pending = 1`). One pull request per message (`fetch` in a loop) cost
                // nats-server more CPU than the worker itself (measured: 208 µs of server CPU
                // per event, 64 partitions, one worker; docs/scaling.md).
                c.stream()
                    .max_messages_per_batch(PULL_BATCH)
                    .expires(PULL_EXPIRES)
                    .heartbeat(PULL_HEARTBEAT)
                    .messages()
                    .await
                    .map_err(|e| format!("pull from `{name}`: {e}"))
            };
            let opened = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = open => r,
            };
            let error = match opened {
                Err(e) => e,
                Ok(mut messages) => loop {
                    let next = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        m = messages.next() => m,
                    };
                    match next {
                        Some(Ok(m)) => {
                            backoff = Duration::from_millis(100);
                            let item = self.item(partition, m);
                            // A full channel means the loop is busy: wait; the message is
                            // reported in progress meanwhile.
                            tokio::select! {
                                _ = shutdown.cancelled() => return,
                                sent = items.send(Ok(vec![item])) => if sent.is_err() { return },
                            }
                        }
                        Some(Err(e)) => break format!("pull from `{name}`: {e}"),
                        None => break format!("pull from `{name}`: the message stream ended"),
                    }
                },
            };
            if error.contains("not found") {
                consumer = None;
            }
            tracing::warn!(worker = %self.name, partition, error = %error, retry_in_ms = backoff.as_millis() as u64,
                "cannot pull from the stream; retrying");
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// Makes the run loop's item of one message.
    fn item(&self, partition: u32, m: async_nats::jetstream::Message) -> Item {
        let (delivered, pending, seq) = match m.info() {
            Ok(i) => (i.delivered, i.pending, i.stream_sequence),
            Err(_) => (1, 0, 0),
        };
        if let Some(slot) = self.lag.get(partition as usize) {
            slot.store(pending, Ordering::Relaxed);
            let total: u64 = self.lag.iter().map(|s| s.load(Ordering::Relaxed)).sum();
            self.metrics.consumer_lag.set(total as i64);
        }
        self.metrics.count("received");
        if delivered > 1 {
            self.metrics.count("redelivered");
        }
        let reply = m.reply.clone();
        let (message, _) = m.split();
        let settle = Box::new(NatsSettle::new(
            self.js.clone(),
            reply,
            Duration::from_millis(self.cfg.progress_interval_ms),
            self.acks.clone(),
            self.metrics.clone(),
        ));
        let event: ChangeEvent = match serde_json::from_slice(&message.payload) {
            Ok(e) => e,
            Err(e) => {
                self.metrics.count("dead_lettered");
                return Item::Refused {
                    event_id: None,
                    pk: 0,
                    raw: serde_json::Value::String(
                        String::from_utf8_lossy(&message.payload).into_owned(),
                    ),
                    reason: "poison_event",
                    error: format!(
                        "message {seq} of stream `{}` ({}) is not a change event: {e}",
                        self.cfg.stream, message.subject
                    ),
                    settle,
                };
            }
        };
        if delivered > self.cfg.max_deliver {
            self.metrics.count("dead_lettered");
            return Item::Refused {
                event_id: Some(event.id),
                pk: event.pk,
                raw: serde_json::to_value(&event).unwrap_or(serde_json::Value::Null),
                reason: "max_deliver_exceeded",
                error: format!(
                    "delivered {delivered} times (nats.max_deliver = {}) without completing: every worker that had it died, hung or stopped before its actions finished",
                    self.cfg.max_deliver
                ),
                settle,
            };
        }
        Item::Message(event, settle)
    }

    /// Answers `status`'s roll call with this worker's name and counts.
    async fn answer_roll_call(self: Arc<Self>, shutdown: CancellationToken) {
        let Ok(mut sub) = self.client.subscribe(roll_call_subject(&self.cfg)).await else {
            tracing::warn!(
                "cannot subscribe to the worker roll call; `status` will not list this worker"
            );
            return;
        };
        loop {
            let msg = tokio::select! {
                _ = shutdown.cancelled() => return,
                m = sub.next() => match m { Some(m) => m, None => return },
            };
            let Some(reply) = msg.reply else { continue };
            let me = WorkerSeen {
                name: self.name.clone(),
                up_secs: self.started.elapsed().as_secs(),
                acked: self.metrics.messages.with_label_values(&["acked"]).get(),
            };
            if let Ok(body) = serde_json::to_vec(&me) {
                let _ = self.client.publish(reply, body.into()).await;
            }
        }
    }
}

/// One worker as `status` lists it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct WorkerSeen {
    pub name: String,
    pub up_secs: u64,
    /// Messages it acknowledged since it started.
    pub acked: u64,
}

/// The workers that answer a roll call within half a second.
pub async fn seen(client: &async_nats::Client, cfg: &NatsConfig) -> Vec<WorkerSeen> {
    let inbox = client.new_inbox();
    let Ok(mut sub) = client.subscribe(inbox.clone()).await else {
        return Vec::new();
    };
    if client
        .publish_with_reply(roll_call_subject(cfg), inbox, "".into())
        .await
        .is_err()
    {
        return Vec::new();
    }
    let mut out = Vec::new();
    let deadline = tokio::time::sleep(Duration::from_millis(500));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = &mut deadline => break,
            m = sub.next() => match m {
                Some(m) => if let Ok(w) = serde_json::from_slice::<WorkerSeen>(&m.payload) { out.push(w) },
                None => break,
            },
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Acknowledges one message once its outcomes are written; reports it in progress until then.
struct NatsSettle {
    js: Context,
    reply: Option<async_nats::Subject>,
    progress: Option<tokio::task::JoinHandle<()>>,
    acks: TaskTracker,
    metrics: Arc<NatsMetrics>,
    settled: bool,
}

impl NatsSettle {
    fn new(
        js: Context,
        reply: Option<async_nats::Subject>,
        every: Duration,
        acks: TaskTracker,
        metrics: Arc<NatsMetrics>,
    ) -> NatsSettle {
        let (pjs, preply) = (js.clone(), reply.clone());
        let progress = tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                let _ = Acker::new(pjs.clone(), preply.clone())
                    .ack_with(AckKind::Progress)
                    .await;
            }
        });
        NatsSettle {
            js,
            reply,
            progress: Some(progress),
            acks,
            metrics,
            settled: false,
        }
    }

    fn send(&mut self, kind: AckKind) {
        if let Some(p) = self.progress.take() {
            p.abort();
        }
        let acker = Acker::new(self.js.clone(), self.reply.clone());
        if tokio::runtime::Handle::try_current().is_ok() {
            self.acks.spawn(async move {
                if let Err(e) = acker.ack_with(kind).await {
                    tracing::warn!(error = %e, "could not acknowledge a message; it is redelivered after the ack wait (same idempotency keys)");
                }
            });
        }
    }
}

impl Settle for NatsSettle {
    fn done(mut self: Box<Self>) {
        self.settled = true;
        self.metrics.count("acked");
        self.send(AckKind::Ack);
    }
}

impl Drop for NatsSettle {
    fn drop(&mut self) {
        if !self.settled {
            // Not done here: give it back so another worker takes it now, not after ack_wait.
            self.send(AckKind::Nak(None));
        }
    }
}
