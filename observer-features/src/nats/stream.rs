//! The stream and its consumers: what `migrate --nats` creates (or checks), what the publisher
//! and the workers check before they start, and what `status` reads.
//!
//! The stream: subjects `<prefix>.>`, work-queue retention (a message is removed once a worker
//! acknowledged it), file storage, discard `new` with `max_messages`/`max_bytes` limits (a full
//! stream refuses publishes, the publisher retries and its checkpoint waits: nothing is ever
//! dropped), and the duplicate window that makes a republish after a crash harmless.
//!
//! The consumers: one durable pull consumer per partition, filtered on `<prefix>.*.<n>`, with
//! explicit acks and `max_ack_pending = 1`: at most one message of a partition is out at a time,
//! across all workers, so events of one (entity, entity id) — always in the same partition —
//! are worked on in stream order, and different partitions run in parallel. `max_deliver` is
//! not left to the server (it would stop delivering silently): the server redelivers without
//! limit, and the worker dead-letters a message delivered more than `nats.max_deliver` times.

use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::stream::{self, DiscardPolicy, RetentionPolicy, StorageType};
use observer_core::config::NatsConfig;

use super::{consumer_name, partition_filter, shown_servers, NatsError};

/// The stream `[nats]` describes.
pub fn stream_config(cfg: &NatsConfig) -> stream::Config {
    stream::Config {
        name: cfg.stream.clone(),
        subjects: vec![format!("{}.>", cfg.subject_prefix)],
        retention: RetentionPolicy::WorkQueue,
        storage: StorageType::File,
        discard: DiscardPolicy::New,
        max_messages: cfg.max_messages,
        max_bytes: cfg.max_bytes,
        duplicate_window: Duration::from_secs(cfg.duplicate_window_secs),
        num_replicas: cfg.replicas,
        description: Some("fraiseql-observers change events (migrate --nats)".into()),
        ..Default::default()
    }
}

/// The durable consumer of `partition`.
pub fn consumer_config(cfg: &NatsConfig, partition: u32) -> pull::Config {
    pull::Config {
        durable_name: Some(consumer_name(&cfg.consumer_prefix, partition)),
        filter_subject: partition_filter(&cfg.subject_prefix, partition),
        deliver_policy: DeliverPolicy::All,
        ack_policy: AckPolicy::Explicit,
        ack_wait: Duration::from_millis(cfg.ack_wait_ms),
        max_deliver: -1,
        max_ack_pending: 1,
        backoff: cfg
            .backoff_ms
            .iter()
            .map(|ms| Duration::from_millis(*ms))
            .collect(),
        num_replicas: cfg.replicas,
        ..Default::default()
    }
}

/// What `migrate --nats` did.
#[derive(Debug, Default)]
pub struct Setup {
    pub server: String,
    pub stream_created: bool,
    pub consumers_created: usize,
    pub consumers_checked: usize,
}

/// Checks that the server has JetStream: a plain request to `$JS.API.INFO` (read as JSON, so
/// any server version's answer is understood).
pub async fn probe(client: &async_nats::Client, server: &str) -> Result<(), NatsError> {
    let no_js = |error: String| NatsError::NoJetStream {
        server: server.to_string(),
        error,
    };
    let request = client.request("$JS.API.INFO", "".into());
    let answer = match tokio::time::timeout(Duration::from_secs(5), request).await {
        Err(_) => return Err(no_js("$JS.API.INFO: no answer within 5 s".into())),
        Ok(Err(e)) => {
            return match e.kind() {
                async_nats::RequestErrorKind::NoResponders => {
                    Err(no_js("$JS.API.INFO: no responders".into()))
                }
                async_nats::RequestErrorKind::TimedOut => {
                    Err(no_js("$JS.API.INFO: timed out".into()))
                }
                _ => Err(NatsError::Request {
                    server: server.to_string(),
                    what: "$JS.API.INFO".into(),
                    error: e.to_string(),
                }),
            }
        }
        Ok(Ok(m)) => m,
    };
    let v: serde_json::Value = serde_json::from_slice(&answer.payload).unwrap_or_default();
    match v.get("error") {
        None => Ok(()),
        Some(e) if e["code"] == 503 => Err(no_js(format!(
            "$JS.API.INFO: {}",
            e["description"].as_str().unwrap_or("unavailable")
        ))),
        Some(e) => Err(NatsError::Request {
            server: server.to_string(),
            what: "$JS.API.INFO".into(),
            error: e.to_string(),
        }),
    }
}

/// Connects and checks JetStream, the stream and every partition's consumer, creating what
/// is missing when `create` (migrate); without it a missing stream or consumer is an error.
/// Settings that differ from `[nats]` are an error naming each of them, either way.
pub async fn ensure(cfg: &NatsConfig, create: bool) -> Result<Setup, NatsError> {
    let server = shown_servers(&cfg.url);
    let client = super::connect(cfg, "fraiseql-observers migrate").await?;
    probe(&client, &server).await?;
    let js = async_nats::jetstream::new(client);
    let req = |what: String| {
        let server = server.clone();
        move |e: &dyn std::fmt::Display| NatsError::Request {
            server,
            what,
            error: e.to_string(),
        }
    };
    let mut setup = Setup {
        server: server.clone(),
        ..Setup::default()
    };
    let want = stream_config(cfg);
    let mut stream = match js.get_stream(&cfg.stream).await {
        Ok(s) => s,
        Err(e) if e.to_string().contains("not found") => {
            if !create {
                return Err(NatsError::NoStream {
                    server,
                    stream: cfg.stream.clone(),
                });
            }
            let s = js
                .create_stream(want.clone())
                .await
                .map_err(|e| req(format!("creating the stream `{}`", cfg.stream))(&e))?;
            setup.stream_created = true;
            s
        }
        Err(e) => return Err(req(format!("reading the stream `{}`", cfg.stream))(&e)),
    };
    let have = stream
        .info()
        .await
        .map_err(|e| req(format!("reading the stream `{}`", cfg.stream))(&e))?
        .config
        .clone();
    let problems = stream_problems(&want, &have);
    if !problems.is_empty() {
        return Err(NatsError::Incompatible {
            server,
            what: format!("the stream `{}`", cfg.stream),
            problems: problems.join("; "),
        });
    }
    for p in 0..cfg.partitions {
        let want = consumer_config(cfg, p);
        let name = consumer_name(&cfg.consumer_prefix, p);
        match stream.get_consumer::<pull::Config>(&name).await {
            Ok(mut c) => {
                let have = c
                    .info()
                    .await
                    .map_err(|e| req(format!("reading the consumer `{name}`"))(&e))?
                    .config
                    .clone();
                let problems = consumer_problems(&want, &have);
                if !problems.is_empty() {
                    return Err(NatsError::Incompatible {
                        server,
                        what: format!("the consumer `{name}` of stream `{}`", cfg.stream),
                        problems: problems.join("; "),
                    });
                }
                setup.consumers_checked += 1;
            }
            Err(e) if e.to_string().contains("not found") && create => {
                stream
                    .create_consumer(want)
                    .await
                    .map_err(|e| req(format!("creating the consumer `{name}`"))(&e))?;
                setup.consumers_created += 1;
            }
            Err(e) if e.to_string().contains("not found") => {
                return Err(NatsError::Incompatible {
                    server,
                    what: format!("the stream `{}`", cfg.stream),
                    problems: format!(
                        "its consumer `{name}` is missing (nats.partitions = {} needs {} consumers): run `fraiseql-observers migrate --nats`",
                        cfg.partitions, cfg.partitions
                    ),
                });
            }
            Err(e) => return Err(req(format!("reading the consumer `{name}`"))(&e)),
        }
    }
    // Consumers of partitions beyond `partitions`: the setting was lowered while some may
    // still hold messages that no worker would ever take.
    let extra = consumer_name(&cfg.consumer_prefix, cfg.partitions);
    if stream.get_consumer::<pull::Config>(&extra).await.is_ok() {
        return Err(NatsError::Incompatible {
            server,
            what: format!("the stream `{}`", cfg.stream),
            problems: format!(
                "it has the consumer `{extra}`, so it was set up for more than nats.partitions = {} partitions; \
                 set nats.partitions back (it cannot change once the stream holds messages)",
                cfg.partitions
            ),
        });
    }
    Ok(setup)
}

fn stream_problems(want: &stream::Config, have: &stream::Config) -> Vec<String> {
    let mut out = Vec::new();
    let mut cmp = |setting: &str, key: &str, w: String, h: String| {
        if w != h {
            out.push(format!("{setting} is {h}, [nats] needs {w} ({key})"));
        }
    };
    cmp(
        "subjects",
        "nats.subject_prefix",
        format!("{:?}", want.subjects),
        format!("{:?}", have.subjects),
    );
    cmp(
        "retention",
        "work-queue retention",
        format!("{:?}", want.retention),
        format!("{:?}", have.retention),
    );
    cmp(
        "storage",
        "file storage",
        format!("{:?}", want.storage),
        format!("{:?}", have.storage),
    );
    cmp(
        "discard",
        "discard new",
        format!("{:?}", want.discard),
        format!("{:?}", have.discard),
    );
    cmp(
        "max_msgs",
        "nats.max_messages",
        want.max_messages.to_string(),
        have.max_messages.to_string(),
    );
    cmp(
        "max_bytes",
        "nats.max_bytes",
        want.max_bytes.to_string(),
        have.max_bytes.to_string(),
    );
    cmp(
        "duplicate_window",
        "nats.duplicate_window_secs",
        format!("{} s", want.duplicate_window.as_secs()),
        format!("{} s", have.duplicate_window.as_secs()),
    );
    cmp(
        "num_replicas",
        "nats.replicas",
        want.num_replicas.to_string(),
        have.num_replicas.max(1).to_string(),
    );
    out
}

fn consumer_problems(
    want: &pull::Config,
    have: &async_nats::jetstream::consumer::Config,
) -> Vec<String> {
    let mut out = Vec::new();
    let mut cmp = |setting: &str, key: &str, w: String, h: String| {
        if w != h {
            out.push(format!("{setting} is {h}, [nats] needs {w} ({key})"));
        }
    };
    cmp(
        "filter_subject",
        "nats.subject_prefix, nats.partitions",
        want.filter_subject.clone(),
        have.filter_subject.clone(),
    );
    cmp(
        "ack_policy",
        "explicit acks",
        format!("{:?}", want.ack_policy),
        format!("{:?}", have.ack_policy),
    );
    cmp(
        "max_ack_pending",
        "one message per partition at a time",
        want.max_ack_pending.to_string(),
        have.max_ack_pending.to_string(),
    );
    cmp(
        "max_deliver",
        "unlimited on the server; the worker enforces nats.max_deliver",
        want.max_deliver.to_string(),
        have.max_deliver.to_string(),
    );
    // With a backoff list the server uses its first value as the ack wait.
    if want.backoff.is_empty() {
        cmp(
            "ack_wait",
            "nats.ack_wait_ms",
            format!("{} ms", want.ack_wait.as_millis()),
            format!("{} ms", have.ack_wait.as_millis()),
        );
    }
    cmp(
        "backoff",
        "nats.backoff_ms",
        format!(
            "{:?}",
            want.backoff
                .iter()
                .map(|d| d.as_millis())
                .collect::<Vec<_>>()
        ),
        format!(
            "{:?}",
            have.backoff
                .iter()
                .map(|d| d.as_millis())
                .collect::<Vec<_>>()
        ),
    );
    out
}

/// One consumer as `status` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ConsumerStats {
    pub name: String,
    /// Messages of its partition not yet delivered.
    pub pending: u64,
    /// Delivered and not yet acknowledged (0 or 1).
    pub ack_pending: usize,
    /// Messages delivered more than once, currently outstanding.
    pub redelivered: usize,
    /// Pull requests waiting (workers polling this partition).
    pub waiting: usize,
}

/// The stream as `status` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StreamStats {
    pub server: String,
    pub stream: String,
    /// Events waiting or being worked on.
    pub messages: u64,
    pub bytes: u64,
    pub consumers: Vec<ConsumerStats>,
    /// The workers that answered the roll call.
    pub workers: Vec<super::worker::WorkerSeen>,
}

/// Reads the stream's depth and each partition consumer's counts.
pub async fn stats(cfg: &NatsConfig) -> Result<StreamStats, NatsError> {
    let server = shown_servers(&cfg.url);
    let client = super::connect(cfg, "fraiseql-observers status").await?;
    probe(&client, &server).await?;
    let js = async_nats::jetstream::new(client.clone());
    let mut stream = match js.get_stream(&cfg.stream).await {
        Ok(s) => s,
        Err(e) if e.to_string().contains("not found") => {
            return Err(NatsError::NoStream {
                server,
                stream: cfg.stream.clone(),
            })
        }
        Err(e) => {
            return Err(NatsError::Request {
                server,
                what: format!("reading the stream `{}`", cfg.stream),
                error: e.to_string(),
            })
        }
    };
    let state = stream
        .info()
        .await
        .map_err(|e| NatsError::Request {
            server: server.clone(),
            what: format!("reading the stream `{}`", cfg.stream),
            error: e.to_string(),
        })?
        .state
        .clone();
    let mut consumers = Vec::new();
    for p in 0..cfg.partitions {
        let name = consumer_name(&cfg.consumer_prefix, p);
        let Ok(mut c) = stream.get_consumer::<pull::Config>(&name).await else {
            continue;
        };
        if let Ok(i) = c.info().await {
            consumers.push(ConsumerStats {
                name,
                pending: i.num_pending,
                ack_pending: i.num_ack_pending,
                redelivered: i.num_redelivered,
                waiting: i.num_waiting,
            });
        }
    }
    let workers = super::worker::seen(&client, cfg).await;
    Ok(StreamStats {
        server,
        stream: cfg.stream.clone(),
        messages: state.messages,
        bytes: state.bytes,
        consumers,
        workers,
    })
}
