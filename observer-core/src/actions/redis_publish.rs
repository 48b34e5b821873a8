//! `type = "redis_publish"`: `PUBLISH channel message` or `XADD stream [MAXLEN ~ n] * event …
//! idempotency_key …`, on the process's `[redis]` connection.
//!
//! The message is the default envelope plus `idempotency_key`, or a `body` JSON template.
//! Channel and stream names are text templates, used as written (not under `key_prefix`: they
//! are the interface other programs subscribe to). Connection trouble is retried; a command the
//! server refuses (e.g. `WRONGTYPE`) is permanent.

use serde::{Deserialize, Serialize};

use crate::action::{permanent, ActionContext, CompiledAction, Outcome};
use crate::actions::{redis_failure, redis_of};
use crate::config::RetryConfig;
use crate::path::Scope;
use crate::template::{Target, Template};

/// Which Redis command a `redis_publish` action runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RedisPublishMode {
    /// `PUBLISH channel message` (fire and forget to current subscribers).
    #[default]
    Publish,
    /// `XADD stream * event <message> idempotency_key <key>` (durable, replayable).
    Xadd,
}

/// `type = "redis_publish"`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisPublishConfig {
    #[serde(default)]
    pub mode: RedisPublishMode,
    /// Pub/sub channel (text template); `mode = "publish"` only.
    #[serde(default)]
    pub channel: Option<String>,
    /// Stream key (text template); `mode = "xadd"` only.
    #[serde(default)]
    pub stream: Option<String>,
    /// JSON template of the message; default the envelope plus `idempotency_key`.
    #[serde(default)]
    pub body: Option<String>,
    /// `xadd` only: trim the stream to about this many entries (`MAXLEN ~`).
    #[serde(default)]
    pub maxlen: Option<u64>,
    #[serde(default)]
    pub retry: RetryConfig,
}

#[derive(Debug)]
pub struct RedisPublish {
    mode: RedisPublishMode,
    target: Template,
    body: Option<Template>,
    maxlen: Option<u64>,
}

pub(crate) fn compile(
    r: &RedisPublishConfig,
    issue: &mut dyn FnMut(&str, String),
) -> Option<CompiledAction> {
    let (field, target, other) = match r.mode {
        RedisPublishMode::Publish => ("channel", &r.channel, ("stream", &r.stream)),
        RedisPublishMode::Xadd => ("stream", &r.stream, ("channel", &r.channel)),
    };
    if other.1.is_some() {
        issue(
            other.0,
            format!(
                "`{}` is not used with mode = \"{}\": use `{field}`",
                other.0,
                if r.mode == RedisPublishMode::Xadd {
                    "xadd"
                } else {
                    "publish"
                }
            ),
        );
    }
    if r.maxlen.is_some() && r.mode != RedisPublishMode::Xadd {
        issue("maxlen", "only applies to mode = \"xadd\"".into());
    }
    if r.maxlen == Some(0) {
        issue("maxlen", "must be at least 1".into());
    }
    let target = match target {
        Some(t) if !t.trim().is_empty() => match Template::parse(t, Target::Text) {
            Ok(t) => Some(t),
            Err(e) => {
                issue(field, e.to_string());
                None
            }
        },
        _ => {
            issue(
                field,
                format!("required with this mode (the {field} name, a text template)"),
            );
            None
        }
    };
    let body = match &r.body {
        Some(b) => match Template::parse(b, Target::Json) {
            Ok(t) => Some(Some(t)),
            Err(e) => {
                issue("body", e.to_string());
                None
            }
        },
        None => Some(None),
    };
    Some(CompiledAction::RedisPublish(RedisPublish {
        mode: r.mode,
        target: target?,
        body: body?,
        maxlen: r.maxlen,
    }))
}

impl RedisPublish {
    pub(crate) async fn publish(&self, ctx: &ActionContext, scope: &Scope<'_>) -> Outcome {
        let redis = match redis_of(ctx, "redis_publish") {
            Ok(r) => r,
            Err(o) => return o,
        };
        let name = match self.target.render(scope) {
            Ok(n) if !n.is_empty() => n,
            Ok(_) => return permanent("the channel/stream template rendered an empty name"),
            Err(e) => return permanent(format!("channel/stream template: {e}")),
        };
        let key = scope.idempotency_key.unwrap_or_default();
        let message = match &self.body {
            Some(t) => match t.render(scope) {
                Ok(b) => b,
                Err(e) => return permanent(format!("body template: {e}")),
            },
            None => scope
                .event
                .envelope_json(scope.observer.unwrap_or_default(), Some(key)),
        };
        let mut conn = match redis.conn().await {
            Ok(c) => c,
            Err(e) => {
                return (
                    crate::action::AttemptResult::Retry { after_ms: None },
                    None,
                    Some(e),
                )
            }
        };
        let cmd = match self.mode {
            RedisPublishMode::Publish => {
                let mut c = redis::cmd("PUBLISH");
                c.arg(&name).arg(&message);
                c
            }
            RedisPublishMode::Xadd => {
                let mut c = redis::cmd("XADD");
                c.arg(&name);
                if let Some(n) = self.maxlen {
                    c.arg("MAXLEN").arg("~").arg(n);
                }
                c.arg("*")
                    .arg("event")
                    .arg(&message)
                    .arg("idempotency_key")
                    .arg(key);
                c
            }
        };
        let what = match self.mode {
            RedisPublishMode::Publish => format!("PUBLISH to `{name}`"),
            RedisPublishMode::Xadd => format!("XADD to `{name}`"),
        };
        let run = cmd.query_async::<redis::Value>(&mut conn);
        match tokio::time::timeout(redis.timeout, run).await {
            Ok(Ok(_)) => (crate::action::AttemptResult::Delivered, None, None),
            Ok(Err(e)) => redis_failure(&what, &e),
            Err(_) => (
                crate::action::AttemptResult::Retry { after_ms: None },
                None,
                Some(format!(
                    "{what}: Redis at {} did not answer within {} ms",
                    redis.server,
                    redis.timeout.as_millis()
                )),
            ),
        }
    }
}

impl RedisPublish {
    /// The templates this action renders (checked for `enrich.<name>` references at load).
    pub fn templates(&self) -> Vec<&Template> {
        std::iter::once(&self.target)
            .chain(self.body.iter())
            .collect()
    }
}
