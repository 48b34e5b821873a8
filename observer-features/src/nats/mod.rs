//! The `nats` layer: scale-out over NATS JetStream (docs/scaling.md).
//!
//! * A publisher (`run --role publisher`) is the ordinary listener whose one observer forwards
//!   every change event to the stream ([`publisher`]): the checkpoint moves only past events
//!   the stream has acknowledged; `Nats-Msg-Id` = event id, so the stream's duplicate window
//!   absorbs a republish after a crash or a takeover.
//! * Workers (`run --role worker`, any number) take events from one durable pull consumer per
//!   partition ([`worker`]) and run them through the same loop and executor stack as a single
//!   process; a message is acknowledged once its outcomes are durable in Postgres.
//! * [`stream`]: what `migrate --nats` creates and checks, and what `status` reads.
//! * [`metrics`]: the `observer_nats_*` series.

pub mod metrics;
pub mod publisher;
pub mod stream;
pub mod worker;

use std::time::Duration;

use observer_core::config::NatsConfig;

pub use metrics::NatsMetrics;
pub use publisher::JetStreamForwarder;
pub use worker::Workers;

/// Errors of the layer; each names the server (credentials removed) and what failed.
#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    #[error("nats.url: `{url}` is not a server address: {error}")]
    BadUrl { url: String, error: String },
    #[error("cannot connect to the NATS server at {server} (nats.url): {error}")]
    Unreachable { server: String, error: String },
    #[error("the NATS server at {server} has no JetStream: start it with JetStream enabled (`nats-server -js`, or `jetstream {{}}` in its configuration) ({error})")]
    NoJetStream { server: String, error: String },
    #[error(
        "the stream `{stream}` on {server} does not exist: run `fraiseql-observers migrate --nats`"
    )]
    NoStream { server: String, stream: String },
    #[error("{what} on {server} has incompatible settings: {problems}. Change them on the server (or remove it, when it holds nothing needed, and run `migrate --nats` again), or change [nats] to match")]
    Incompatible {
        server: String,
        what: String,
        problems: String,
    },
    #[error("NATS server {server}: {what}: {error}")]
    Request {
        server: String,
        what: String,
        error: String,
    },
}

/// The servers of `nats.url` with any credentials removed, for messages.
pub fn shown_servers(url: &str) -> String {
    url.split(',')
        .map(|u| {
            let u = u.trim();
            match (u.find("://"), u.rfind('@')) {
                (Some(scheme), Some(at)) if at > scheme => {
                    format!("{}{}", &u[..scheme + 3], &u[at + 1..])
                }
                (None, Some(at)) => u[at + 1..].to_string(),
                _ => u.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Connects to `nats.url`. Fails (naming the server) when none of its servers answers within
/// `connect_timeout_ms`; once connected, the client reconnects by itself for as long as it
/// takes, and publishes and pulls fail meanwhile (and are retried by their callers).
pub async fn connect(cfg: &NatsConfig, name: &str) -> Result<async_nats::Client, NatsError> {
    let server = shown_servers(&cfg.url);
    let mut addrs = Vec::new();
    for part in cfg.url.split(',') {
        let part = part.trim();
        let addr = part
            .parse::<async_nats::ServerAddr>()
            .map_err(|e| NatsError::BadUrl {
                url: shown_servers(part),
                error: e.to_string(),
            })?;
        addrs.push(addr);
    }
    let timeout = Duration::from_millis(cfg.connect_timeout_ms);
    let options = async_nats::ConnectOptions::new()
        .name(name)
        .connection_timeout(timeout)
        .max_reconnects(None)
        // A reconnect loop capped at 1 s: the server's restart is the wait, not our backoff.
        .reconnect_delay_callback(|attempts| {
            Duration::from_millis((100 * attempts as u64).min(1_000))
        })
        .event_callback(|event| async move {
            match event {
                async_nats::Event::Disconnected => {
                    tracing::warn!("NATS connection lost; reconnecting")
                }
                async_nats::Event::Connected => tracing::debug!("NATS connection established"),
                other => tracing::debug!(event = %other, "NATS client event"),
            }
        });
    match tokio::time::timeout(timeout + Duration::from_secs(1), options.connect(addrs)).await {
        Ok(Ok(client)) => Ok(client),
        Ok(Err(e)) => Err(NatsError::Unreachable {
            server,
            error: e.to_string(),
        }),
        Err(_) => Err(NatsError::Unreachable {
            server,
            error: format!("no answer within {} ms", cfg.connect_timeout_ms),
        }),
    }
}

/// The partition of an (entity, entity id): FNV-1a (64 bit) over the entity, a 0 byte and the
/// id, modulo `partitions`. Fixed forever: every publisher and every version must agree, so it
/// never uses a per-process seed.
pub fn partition(entity: &str, entity_id: Option<&str>, partitions: u32) -> u32 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = OFFSET;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(PRIME);
        }
    };
    eat(entity.as_bytes());
    eat(&[0]);
    if let Some(id) = entity_id {
        eat(id.as_bytes());
    }
    (h % u64::from(partitions.max(1))) as u32
}

/// `<prefix>.<entity>.<partition>`; characters a subject token cannot hold (`.`, `*`, `>`,
/// spaces, …) become `_` in the entity token (the partition, not the token, routes the event).
pub fn subject(prefix: &str, entity: &str, partition: u32) -> String {
    let token: String = entity
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let token = if token.is_empty() { "_".into() } else { token };
    format!("{prefix}.{token}.{partition}")
}

/// The subjects of one partition: `<prefix>.*.<partition>`.
pub fn partition_filter(prefix: &str, partition: u32) -> String {
    format!("{prefix}.*.{partition}")
}

/// The durable consumer of one partition: `<consumer_prefix>-<partition>`.
pub fn consumer_name(prefix: &str, partition: u32) -> String {
    format!("{prefix}-{partition}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_stable_and_spread() {
        // Fixed values: a change here moves entities between partitions on upgrade.
        assert_eq!(
            partition("Order", Some("42"), 64),
            partition("Order", Some("42"), 64)
        );
        let fixed = [
            partition("Order", Some("1"), 64),
            partition("Order", Some("2"), 64),
            partition("User", Some("1"), 64),
            partition("Order", None, 64),
        ];
        assert_eq!(
            fixed,
            [
                fnv("Order\u{0}1"),
                fnv("Order\u{0}2"),
                fnv("User\u{0}1"),
                fnv("Order\u{0}")
            ]
        );
        let mut seen = std::collections::HashSet::new();
        for i in 0..1000 {
            seen.insert(partition("Order", Some(&i.to_string()), 64));
        }
        assert_eq!(seen.len(), 64, "1000 ids cover every partition");
        assert_eq!(partition("Order", Some("7"), 1), 0);
    }

    /// FNV-1a of the whole key, written out independently.
    fn fnv(key: &str) -> u32 {
        let mut h: u64 = 14695981039346656037;
        for b in key.bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(1099511628211);
        }
        (h % 64) as u32
    }

    #[test]
    fn subjects_hold_only_valid_tokens() {
        assert_eq!(subject("observer", "Order", 3), "observer.Order.3");
        assert_eq!(subject("a.b", "my.Ent ty>*", 0), "a.b.my_Ent_ty__.0");
        assert_eq!(subject("p", "", 1), "p._.1");
        assert_eq!(partition_filter("p", 5), "p.*.5");
    }

    #[test]
    fn credentials_are_not_shown() {
        assert_eq!(
            shown_servers("nats://u:secret@h1:4222, nats://h2:4222"),
            "nats://h1:4222,nats://h2:4222"
        );
        assert_eq!(shown_servers("tok@h:1"), "h:1");
    }
}
