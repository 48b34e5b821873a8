//! Observers compiled from config: entity + operations + condition, and their actions.
//!
//! Compilation happens once at load (conditions parsed, templates checked, secrets resolved);
//! matching an event is then a cheap walk over the list. Every problem found while compiling is
//! collected with its location, so `validate` can report them all at once.

use std::collections::HashSet;
use std::sync::Arc;

use crate::action::{self, CompiledAction};
use crate::condition::Condition;
use crate::config::{ActionConfig, Config, ObserverConfig, RetryConfig};
use crate::event::{ChangeEvent, Operation};
use crate::path::Scope;

/// A problem in the configuration, with where it is (`observers[2] "paid".condition`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ConfigIssue {
    pub location: String,
    pub message: String,
}

impl std::fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.location, self.message)
    }
}

/// One observer, ready to match and execute.
#[derive(Debug)]
pub struct Observer {
    pub name: String,
    /// `None` for `*`.
    pub entity: Option<String>,
    pub events: HashSet<Operation>,
    pub condition: Option<Condition>,
    /// `ordering = "entity"` (the default): actions for one (entity, id) start in commit order.
    pub ordered: bool,
    pub actions: Vec<ObserverAction>,
}

/// One action of an observer with its retry policy and the config it came from.
#[derive(Debug)]
pub struct ObserverAction {
    pub action: CompiledAction,
    pub retry: RetryConfig,
    /// The action as written in config (secrets still as references): shown by `dlq show`.
    pub config: serde_json::Value,
    /// What per-destination layers (breaker, rate limit) key on: the webhook's `host:port`,
    /// or `observer/index` when the action has no fixed destination.
    pub destination: Arc<str>,
}

/// Why an observer did or did not match an event (for `debug-event`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MatchVerdict {
    Matched,
    OtherEntity,
    OtherOperation,
    ConditionFalse,
}

impl Observer {
    /// Whether the event matches, and if not, the first reason why not.
    pub fn verdict(&self, event: &ChangeEvent) -> MatchVerdict {
        if let Some(e) = &self.entity {
            if *e != event.entity {
                return MatchVerdict::OtherEntity;
            }
        }
        if !self.events.contains(&event.operation) {
            return MatchVerdict::OtherOperation;
        }
        if let Some(c) = &self.condition {
            if !c.evaluate(&Scope::event(event)) {
                return MatchVerdict::ConditionFalse;
            }
        }
        MatchVerdict::Matched
    }
}

/// The enabled observers, in config order.
#[derive(Debug, Default)]
pub struct Observers {
    pub list: Vec<Arc<Observer>>,
}

impl Observers {
    /// Compiles every enabled observer, resolving secrets; all issues are returned together.
    pub fn compile(config: &Config) -> Result<Observers, Vec<ConfigIssue>> {
        Observers::compile_with(config, action::Secrets::Resolve)
    }

    /// Compiles with the given secret handling (`Unresolved` only for commands that never execute).
    pub fn compile_with(
        config: &Config,
        secrets: action::Secrets,
    ) -> Result<Observers, Vec<ConfigIssue>> {
        let mut issues = Vec::new();
        let mut list = Vec::new();
        let mut names = HashSet::new();
        for (i, o) in config.observers.iter().enumerate() {
            let at = format!("observers[{i}] \"{}\"", o.name);
            if !names.insert(o.name.clone()) {
                issues.push(ConfigIssue {
                    location: at.clone(),
                    message: "duplicate observer name".into(),
                });
            }
            // Actions that talk to Redis need a server: say so at load, not at the first event.
            for (j, a) in o.actions.iter().enumerate() {
                if matches!(a, ActionConfig::RedisPublish(_) | ActionConfig::Cache(_))
                    && config.redis.url.is_none()
                {
                    issues.push(ConfigIssue {
                        location: format!("{at}.actions[{j}] ({})", a.kind()),
                        message: "needs a Redis server: set [redis] url (or REDIS_URL)".into(),
                    });
                }
            }
            match compile_observer(o, &at, secrets) {
                Ok(obs) if o.enabled => list.push(Arc::new(obs)),
                Ok(_) => {}
                Err(mut e) => issues.append(&mut e),
            }
        }
        if issues.is_empty() {
            Ok(Observers { list })
        } else {
            Err(issues)
        }
    }

    /// The observers that match `event`, in config order.
    pub fn matching<'a>(
        &'a self,
        event: &'a ChangeEvent,
    ) -> impl Iterator<Item = &'a Arc<Observer>> + 'a {
        self.list
            .iter()
            .filter(move |o| o.verdict(event) == MatchVerdict::Matched)
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Observer>> {
        self.list.iter().find(|o| o.name == name)
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn compile_observer(
    o: &ObserverConfig,
    at: &str,
    secrets: action::Secrets,
) -> Result<Observer, Vec<ConfigIssue>> {
    let mut issues = Vec::new();
    let issue = |field: &str, message: String| ConfigIssue {
        location: format!("{at}.{field}"),
        message,
    };
    if !valid_name(&o.name) {
        issues.push(issue(
            "name",
            "must be 1-128 letters, digits, `-`, `_` or `.` (it is part of every idempotency key)"
                .into(),
        ));
    }
    let entity = match o.entity.trim() {
        "" => {
            issues.push(issue(
                "entity",
                "must name an entity (object_type) or be `*`".into(),
            ));
            None
        }
        "*" => None,
        e => Some(e.to_string()),
    };
    if o.events.is_empty() {
        issues.push(issue(
            "events",
            "lists no operation: expected some of INSERT, UPDATE, DELETE, CUSTOM".into(),
        ));
    }
    let condition = match &o.condition {
        Some(src) => match Condition::parse(src) {
            Ok(c) => Some(c),
            Err(e) => {
                issues.push(issue("condition", e.to_string()));
                None
            }
        },
        None => None,
    };
    if o.actions.is_empty() {
        issues.push(issue(
            "actions",
            "an observer needs at least one action".into(),
        ));
    }
    let mut actions = Vec::new();
    for (j, a) in o.actions.iter().enumerate() {
        let loc = format!("{at}.actions[{j}] ({})", a.kind());
        if let Err(m) = check_retry(&a.retry()) {
            issues.push(ConfigIssue {
                location: format!("{loc}.retry"),
                message: m,
            });
        }
        match action::compile(a, &loc, secrets) {
            Ok(action) => actions.push(ObserverAction {
                destination: action
                    .destination()
                    .unwrap_or_else(|| format!("{}/{j}", o.name))
                    .into(),
                action,
                retry: a.retry(),
                config: redacted(a),
            }),
            Err(mut e) => issues.append(&mut e),
        }
    }
    if issues.is_empty() {
        Ok(Observer {
            name: o.name.clone(),
            entity,
            events: o.events.iter().map(|e| e.0).collect(),
            condition,
            ordered: o.ordering == crate::config::Ordering::Entity,
            actions,
        })
    } else {
        Err(issues)
    }
}

fn check_retry(r: &RetryConfig) -> Result<(), String> {
    if r.max_attempts == 0 {
        return Err("max_attempts must be at least 1".into());
    }
    if r.max_attempts > 100 {
        return Err("max_attempts must be at most 100".into());
    }
    if r.initial_ms == 0 || r.max_ms < r.initial_ms {
        return Err("expected 0 < initial_ms <= max_ms".into());
    }
    crate::actions::http_policy::HttpPolicy::compile(r).map_err(|e| e.join("; "))?;
    Ok(())
}

/// The action's config as stored with dead letters and shown by `dlq show`: `${env:…}` and
/// `${file:…}` references are kept (they name where the secret lives), but a literal signing
/// secret, a literal value of a credential-like header and a password in the URL are replaced,
/// so no secret written into a config file ever reaches the database or the terminal.
pub fn redacted(action: &ActionConfig) -> serde_json::Value {
    const HIDDEN: &str = "<redacted>";
    let is_reference = |v: &str| v.trim_start().starts_with("${") && v.trim_end().ends_with('}');
    let mut v = serde_json::to_value(action).unwrap_or(serde_json::Value::Null);
    if let ActionConfig::Webhook(w) = action {
        if let Some(secret) = &w.secret {
            if !is_reference(secret) {
                v["secret"] = HIDDEN.into();
            }
        }
        for (name, value) in &w.headers {
            let n = name.to_ascii_lowercase();
            let sensitive = [
                "authorization",
                "cookie",
                "token",
                "secret",
                "key",
                "password",
                "signature",
            ]
            .iter()
            .any(|s| n.contains(s));
            if sensitive && !value.contains("${") {
                v["headers"][name] = HIDDEN.into();
            }
        }
        if let Ok(mut url) = reqwest::Url::parse(&w.url) {
            if url.password().is_some() && url.set_password(Some(HIDDEN)).is_ok() {
                v["url"] = url.to_string().into();
            }
        }
    }
    match action {
        // The incoming-webhook URL is the credential itself.
        ActionConfig::Slack(s) if !is_reference(&s.webhook_url) => {
            v["webhook_url"] = HIDDEN.into();
        }
        ActionConfig::Email(e) => {
            if e.password.as_deref().is_some_and(|p| !is_reference(p)) {
                v["password"] = HIDDEN.into();
            }
            if let Some(Ok(mut url)) = e.smtp_url.as_deref().map(reqwest::Url::parse) {
                if url.password().is_some() && url.set_password(Some(HIDDEN)).is_ok() {
                    v["smtp_url"] = url.to_string().into();
                }
            }
        }
        _ => {}
    }
    v
}

/// Re-exported so callers can name the config type next to the compiled one.
pub type ActionSpec = ActionConfig;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::WebhookConfig;

    #[test]
    fn stored_action_configs_carry_no_literal_secret() {
        let mut headers = std::collections::BTreeMap::new();
        headers.insert("Authorization".to_string(), "Bearer abc123".to_string());
        headers.insert("X-Api-Key".to_string(), "${env:API_KEY}".to_string());
        headers.insert("X-Team".to_string(), "billing".to_string());
        let a = ActionConfig::Webhook(WebhookConfig {
            url: "https://user:hunter2@example.com/hook".into(),
            method: "POST".into(),
            headers,
            body: None,
            timeout_ms: 1000,
            secret: Some("whsec_c2VjcmV0".into()),
            retry: RetryConfig::default(),
            batch: None,
        });
        let v = redacted(&a);
        let text = v.to_string();
        for leaked in ["abc123", "hunter2", "whsec_c2VjcmV0"] {
            assert!(!text.contains(leaked), "{leaked} leaked: {text}");
        }
        assert_eq!(
            v["headers"]["X-Api-Key"], "${env:API_KEY}",
            "references are kept"
        );
        assert_eq!(v["headers"]["X-Team"], "billing");
        let mut with_ref = a.clone();
        if let ActionConfig::Webhook(w) = &mut with_ref {
            w.secret = Some("${env:ORDERS_SECRET}".into());
        }
        assert_eq!(redacted(&with_ref)["secret"], "${env:ORDERS_SECRET}");
    }
}
