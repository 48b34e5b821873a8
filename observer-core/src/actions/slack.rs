//! `type = "slack"`: posts a message to a Slack incoming webhook.
//!
//! The webhook URL is the credential (anyone holding it can post), so it is a secret: written as
//! `${env:NAME}`/`${file:/path}`, never logged, and redacted from stored action configs. The
//! body is Slack's JSON: `text` (a text template), `blocks` (a JSON template that must render to
//! an array of blocks), optional `channel` and `username`. A 2xx answer is delivered; other
//! answers follow the action's `retry` status policy (by default 408, 429 and 5xx are retried,
//! 429 honouring `Retry-After`; any other 4xx, e.g. Slack's 400 `invalid_payload`, 403
//! `action_prohibited`, 404 `no_service`, 410 `channel_is_archived`, is a permanent failure
//! whose error carries Slack's answer).

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::action::{
    permanent, secret, static_authority, ActionContext, CompiledAction, Outcome, Secrets,
};
use crate::actions::http_policy::HttpPolicy;
use crate::config::RetryConfig;
use crate::path::Scope;
use crate::template::{Target, Template};

/// `type = "slack"`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlackConfig {
    /// The incoming-webhook URL; a secret: write `${env:NAME}` or `${file:/path}`.
    pub webhook_url: String,
    /// Message text (text template); required unless `blocks` is set (then it is the fallback
    /// shown in notifications).
    #[serde(default)]
    pub text: Option<String>,
    /// Block Kit blocks: a JSON template rendering to an array.
    #[serde(default)]
    pub blocks: Option<String>,
    /// Channel override (text template), for webhooks that allow it.
    #[serde(default)]
    pub channel: Option<String>,
    /// Sender name override (text template), for webhooks that allow it.
    #[serde(default)]
    pub username: Option<String>,
    /// Per-attempt timeout.
    #[serde(default = "slack_timeout")]
    pub timeout_ms: u64,
    #[serde(default)]
    pub retry: RetryConfig,
}

fn slack_timeout() -> u64 {
    10_000
}

/// A compiled `slack` action.
pub struct Slack {
    /// The resolved webhook URL (a secret: not shown by `Debug`).
    url: String,
    text: Option<Template>,
    blocks: Option<Template>,
    channel: Option<Template>,
    username: Option<Template>,
    timeout: Duration,
    policy: HttpPolicy,
}

impl std::fmt::Debug for Slack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slack")
            .field("url", &"<redacted>")
            .field("text", &self.text)
            .field("blocks", &self.blocks)
            .finish_non_exhaustive()
    }
}

pub(crate) fn compile(
    s: &SlackConfig,
    issue: &mut dyn FnMut(&str, String),
    mode: Secrets,
) -> Option<CompiledAction> {
    let url = match secret(&s.webhook_url, "webhook_url", mode) {
        Ok(u) => {
            if mode == Secrets::Resolve {
                // Never repeat the URL in a message: it is the credential.
                match reqwest::Url::parse(&u) {
                    Ok(_) if crate::action::dot_segment(&u).is_some() => issue(
                        "webhook_url",
                        "has a `.` or `..` path segment, which would send the request to another path"
                            .into(),
                    ),
                    Ok(p) if matches!(p.scheme(), "http" | "https") && p.host().is_some() => {}
                    Ok(p) => issue(
                        "webhook_url",
                        format!("scheme `{}` is not http or https", p.scheme()),
                    ),
                    Err(e) => issue("webhook_url", format!("not a URL ({e})")),
                }
            }
            Some(u)
        }
        Err(e) => {
            issue("webhook_url", e.to_string());
            None
        }
    };
    let mut template = |field: &str, src: &Option<String>, target: Target| match src {
        Some(t) => match Template::parse(t, target) {
            Ok(t) => Some(Some(t)),
            Err(e) => {
                issue(field, e.to_string());
                None
            }
        },
        None => Some(None),
    };
    let text = template("text", &s.text, Target::Text);
    let blocks = template("blocks", &s.blocks, Target::Json);
    let channel = template("channel", &s.channel, Target::Text);
    let username = template("username", &s.username, Target::Text);
    if s.text.is_none() && s.blocks.is_none() {
        issue(
            "text",
            "a slack action needs `text`, `blocks` or both".into(),
        );
    }
    if let Some(src) = &s.blocks {
        if let Ok(v) = serde_json::from_str::<Value>(src) {
            if !v.is_array() {
                issue("blocks", "must be a JSON array of Slack blocks".into());
            }
        }
    }
    if s.timeout_ms == 0 || s.timeout_ms > 600_000 {
        issue("timeout_ms", "expected 1..=600000".into());
    }
    let policy = HttpPolicy::compile(&s.retry).ok();
    Some(CompiledAction::Slack(Slack {
        url: url?,
        text: text?,
        blocks: blocks?,
        channel: channel?,
        username: username?,
        timeout: Duration::from_millis(s.timeout_ms),
        policy: policy?,
    }))
}

impl Slack {
    pub(crate) fn destination(&self) -> Option<String> {
        static_authority(&self.url)
    }

    /// The JSON Slack expects: `{"text"?, "blocks"?, "channel"?, "username"?}`.
    pub fn payload(&self, scope: &Scope<'_>) -> Result<Value, String> {
        let mut out = Map::new();
        if let Some(t) = &self.text {
            let text = t.render(scope).map_err(|e| format!("text template: {e}"))?;
            out.insert("text".into(), text.into());
        }
        if let Some(t) = &self.blocks {
            let raw = t
                .render(scope)
                .map_err(|e| format!("blocks template: {e}"))?;
            let v: Value =
                serde_json::from_str(&raw).map_err(|e| format!("blocks template: {e}"))?;
            if !v.is_array() {
                return Err("blocks template: rendered JSON is not an array of blocks".into());
            }
            out.insert("blocks".into(), v);
        }
        for (key, t) in [("channel", &self.channel), ("username", &self.username)] {
            if let Some(t) = t {
                let v = t
                    .render(scope)
                    .map_err(|e| format!("{key} template: {e}"))?;
                out.insert(key.into(), v.into());
            }
        }
        Ok(Value::Object(out))
    }

    pub(crate) async fn send(&self, ctx: &ActionContext, scope: &Scope<'_>) -> Outcome {
        let payload = match self.payload(scope) {
            Ok(p) => p,
            Err(e) => return permanent(e),
        };
        let key = scope.idempotency_key.unwrap_or_default();
        // The URL is the credential: messages show neither it nor its path.
        if let Err(e) = ctx.checked_url(&self.url, || "<slack webhook_url>".into()) {
            return permanent(format!("Slack: {e}"));
        }
        let req = ctx
            .http
            .post(&self.url)
            .timeout(self.timeout)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("idempotency-key", key)
            .body(payload.to_string());
        match req.send().await {
            Ok(resp) => self.policy.outcome(resp, "Slack answered ").await,
            Err(e) => {
                // reqwest errors name the URL; it is a secret, so it is removed.
                if let Some(r) = crate::outbound::refusal(&e) {
                    return permanent(format!("Slack: {r}"));
                }
                let e = e.without_url();
                let what = if e.is_timeout() {
                    format!("Slack: timed out after {} ms", self.timeout.as_millis())
                } else if e.is_connect() {
                    format!("Slack: cannot connect: {}", crate::error_chain(&e))
                } else if e.is_builder() {
                    return permanent(format!("Slack: cannot build the request: {e}"));
                } else {
                    format!("Slack: request failed: {}", crate::error_chain(&e))
                };
                (
                    crate::action::AttemptResult::Retry { after_ms: None },
                    None,
                    Some(what),
                )
            }
        }
    }
}

impl Slack {
    /// The templates this action renders (checked for `enrich.<name>` references at load).
    pub fn templates(&self) -> Vec<&Template> {
        self.text
            .iter()
            .chain(self.blocks.iter())
            .chain(self.channel.iter())
            .chain(self.username.iter())
            .collect()
    }
}
