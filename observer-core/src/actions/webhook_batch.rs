//! `batch = { max_events, max_wait_ms }` on a webhook: deliveries of one action that are in
//! flight together are sent as ONE request whose body is a JSON array of the per-event bodies.
//!
//! Each webhook action with `batch` has one batcher task per process, started on first use and
//! fed through a channel; every caller (one delivery's attempt) waits on a oneshot for the
//! outcome of the request its body went out in, so the run loop and the layers see an ordinary
//! attempt per delivery. Members are grouped by rendered URL and headers; a group is sent when
//! it holds `max_events` bodies or `max_wait_ms` after its first body arrived, whichever comes
//! first. All members share the outcome (delivered, retried, dead-lettered) of that request.
//!
//! Each array element is the delivery's body with `"idempotency_key"` set (a body that is not a
//! JSON object is wrapped as `{"idempotency_key": …, "body": …}`). The request's own
//! `Idempotency-Key` and `webhook-id` are the UUIDv5, in namespace [`BATCH_NAMESPACE`], of the
//! member keys sorted and joined with `,`; it is signed like a single webhook.
//!
//! Only dispatches running at the same time can be merged, which needs `features.concurrent`;
//! without it every batch holds one event (sent after `max_wait_ms`).

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Duration;

use chrono::Utc;
use reqwest::header::{HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use uuid::Uuid;

use crate::action::{AttemptResult, Outcome};
use crate::actions::http_policy::HttpPolicy;
use crate::config::WebhookConfig;
use crate::signing::{signature_headers, SigningKey};

/// `batch = { … }` on a webhook action.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BatchConfig {
    /// Most bodies in one request.
    pub max_events: usize,
    /// Longest wait for more bodies after the first one of a batch arrived.
    pub max_wait_ms: u64,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_events: 100,
            max_wait_ms: 50,
        }
    }
}

/// The namespace of batch request keys (UUIDv5), fixed forever.
pub const BATCH_NAMESPACE: Uuid = Uuid::from_u128(0x3b0e_9a61_5c27_4f8d_a1e4_7d92_c0b5_6e13);

/// The key of a batch request: UUIDv5 of the sorted member keys joined with `,`.
pub fn batch_key(member_keys: &[&str]) -> String {
    let mut keys = member_keys.to_vec();
    keys.sort_unstable();
    Uuid::new_v5(&BATCH_NAMESPACE, keys.join(",").as_bytes()).to_string()
}

/// What sending a batch needs from its webhook (constant per action).
#[derive(Clone)]
pub(crate) struct BatchSend {
    pub http: reqwest::Client,
    pub method: reqwest::Method,
    pub timeout: Duration,
    pub keys: Vec<SigningKey>,
    pub policy: HttpPolicy,
    /// The URL came from a secret reference: errors do not name it.
    pub url_secret: bool,
}

struct Item {
    url: String,
    headers: Vec<(HeaderName, HeaderValue)>,
    /// The array element, serialized.
    element: String,
    key: String,
    reply: oneshot::Sender<Outcome>,
}

type GroupKey = (String, Vec<(HeaderName, HeaderValue)>);

struct Group {
    deadline: Instant,
    items: Vec<Item>,
}

/// The per-action batcher.
pub struct Batcher {
    max_events: usize,
    max_wait: Duration,
    tx: OnceLock<mpsc::UnboundedSender<Item>>,
}

impl std::fmt::Debug for Batcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher")
            .field("max_events", &self.max_events)
            .field("max_wait", &self.max_wait)
            .finish()
    }
}

impl Batcher {
    pub(crate) fn compile(
        b: &BatchConfig,
        w: &WebhookConfig,
        issue: &mut dyn FnMut(&str, String),
    ) -> Option<Batcher> {
        let mut ok = true;
        if b.max_events == 0 || b.max_events > 10_000 {
            issue(
                "batch.max_events",
                format!("{} is out of range: expected 1..=10000", b.max_events),
            );
            ok = false;
        }
        if b.max_wait_ms == 0 || b.max_wait_ms > 60_000 {
            issue(
                "batch.max_wait_ms",
                format!("{} is out of range: expected 1..=60000 ms", b.max_wait_ms),
            );
            ok = false;
        }
        let _ = w;
        ok.then(|| Batcher {
            max_events: b.max_events,
            max_wait: Duration::from_millis(b.max_wait_ms),
            tx: OnceLock::new(),
        })
    }

    /// Adds one delivery's array element (see [`element`]) to a batch and waits for the outcome
    /// of the request it went in.
    pub(crate) async fn submit(
        &self,
        send: impl FnOnce() -> BatchSend,
        url: String,
        headers: Vec<(HeaderName, HeaderValue)>,
        element: String,
        key: &str,
    ) -> Outcome {
        let tx = self.tx.get_or_init(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(run(rx, send(), self.max_events, self.max_wait));
            tx
        });
        let (reply, answer) = oneshot::channel();
        let item = Item {
            url,
            headers,
            element,
            key: key.to_string(),
            reply,
        };
        if tx.send(item).is_err() {
            return (
                AttemptResult::Retry { after_ms: None },
                None,
                Some("the batch sender of this webhook has stopped".into()),
            );
        }
        answer.await.unwrap_or((
            AttemptResult::Retry { after_ms: None },
            None,
            Some("the batch request was abandoned before it finished".into()),
        ))
    }
}

/// The array element of a delivery whose body a template rendered: the body with
/// `"idempotency_key"` set when it is a JSON object, else wrapped as `{"idempotency_key", "body"}`.
pub(crate) fn element(body: &str, key: &str) -> String {
    match serde_json::from_str::<Value>(body) {
        Ok(Value::Object(mut o)) => {
            o.insert("idempotency_key".into(), key.into());
            Value::Object(o)
        }
        Ok(other) => serde_json::json!({"idempotency_key": key, "body": other}),
        Err(_) => serde_json::json!({"idempotency_key": key, "body": body}),
    }
    .to_string()
}

async fn run(
    mut rx: mpsc::UnboundedReceiver<Item>,
    send: BatchSend,
    max_events: usize,
    max_wait: Duration,
) {
    let mut groups: HashMap<GroupKey, Group> = HashMap::new();
    loop {
        let next = groups.values().map(|g| g.deadline).min();
        tokio::select! {
            item = rx.recv() => match item {
                Some(item) => {
                    let gk = (item.url.clone(), item.headers.clone());
                    let g = groups.entry(gk.clone()).or_insert_with(|| Group {
                        deadline: Instant::now() + max_wait,
                        items: Vec::new(),
                    });
                    g.items.push(item);
                    if g.items.len() >= max_events {
                        if let Some(g) = groups.remove(&gk) {
                            tokio::spawn(flush(send.clone(), gk, g.items));
                        }
                    }
                }
                None => {
                    for (gk, g) in groups.drain() {
                        tokio::spawn(flush(send.clone(), gk, g.items));
                    }
                    return;
                }
            },
            _ = tokio::time::sleep_until(next.unwrap_or_else(Instant::now)), if next.is_some() => {
                let now = Instant::now();
                let due: Vec<GroupKey> = groups
                    .iter()
                    .filter(|(_, g)| g.deadline <= now)
                    .map(|(k, _)| k.clone())
                    .collect();
                for gk in due {
                    if let Some(g) = groups.remove(&gk) {
                        tokio::spawn(flush(send.clone(), gk, g.items));
                    }
                }
            }
        }
    }
}

/// Sends one batch and answers every member with its outcome.
async fn flush(send: BatchSend, (url, headers): GroupKey, items: Vec<Item>) {
    let keys: Vec<&str> = items.iter().map(|i| i.key.as_str()).collect();
    let id = batch_key(&keys);
    let n = items.len();
    let mut body =
        String::with_capacity(items.iter().map(|i| i.element.len() + 1).sum::<usize>() + 2);
    body.push('[');
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(&item.element);
    }
    body.push(']');
    let mut req = send
        .http
        .request(send.method.clone(), &url)
        .timeout(send.timeout)
        .header("idempotency-key", &id);
    if !headers
        .iter()
        .any(|(n, _)| n == reqwest::header::CONTENT_TYPE)
    {
        req = req.header(reqwest::header::CONTENT_TYPE, "application/json");
    }
    for (name, value) in headers {
        req = req.header(name, value);
    }
    let sig = signature_headers(&send.keys, &id, Utc::now().timestamp(), body.as_bytes());
    req = req
        .header("webhook-id", sig.id)
        .header("webhook-timestamp", sig.timestamp);
    if let Some(s) = sig.signature {
        req = req.header("webhook-signature", s);
    }
    let (result, status, error) = match req.body(body).send().await {
        Ok(resp) => send.policy.outcome(resp, "").await,
        Err(e) => {
            let e = crate::action::shown_error(e, &url, send.url_secret);
            let what = if e.is_timeout() {
                format!("timed out after {} ms", send.timeout.as_millis())
            } else if e.is_connect() {
                format!("cannot connect: {}", crate::error_chain(&e))
            } else {
                format!("request failed: {}", crate::error_chain(&e))
            };
            let refused = crate::outbound::refusal(&e).map(|r| r.to_string());
            let what = refused.clone().unwrap_or(what);
            let result = if e.is_builder() || refused.is_some() {
                AttemptResult::Permanent
            } else {
                AttemptResult::Retry { after_ms: None }
            };
            (result, None, Some(what))
        }
    };
    let error = error.map(|e| format!("batch {id} of {n} event(s): {e}"));
    for item in items {
        let _ = item.reply.send((result.clone(), status, error.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_key_ignores_member_order() {
        let a = batch_key(&["k2", "k1", "k3"]);
        assert_eq!(a, batch_key(&["k1", "k3", "k2"]));
        assert_ne!(a, batch_key(&["k1", "k2"]));
        assert_eq!(a.len(), 36);
    }
}
