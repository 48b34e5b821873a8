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
    /// The condition reads `enrich.…`: it is evaluated by the executor after the lookups, not
    /// while matching (the run loop then matches on entity and operation only).
    pub condition_at_delivery: bool,
    /// `[[observers.enrich]]`: lookups the executor runs before the actions, once per dispatch.
    pub enrich: Vec<crate::enrich::Enricher>,
    /// `ordering = "entity"` (the default): actions for one (entity, id) start in commit order.
    pub ordered: bool,
    /// `queue = …`: the job queue this observer's actions go to (the `queue` layer).
    pub queue: Option<Arc<str>>,
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
    /// Entity and operation match; the condition reads enrichment results, so it is evaluated
    /// at delivery (a false condition is then recorded as the outcome `condition_false`).
    ConditionAtDelivery,
}

impl MatchVerdict {
    /// Whether the run loop schedules the observer's actions for the event.
    pub fn scheduled(&self) -> bool {
        matches!(
            self,
            MatchVerdict::Matched | MatchVerdict::ConditionAtDelivery
        )
    }
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
        if self.condition_at_delivery {
            return MatchVerdict::ConditionAtDelivery;
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
            match compile_observer(o, &at, secrets, config.caching.default_ttl_secs) {
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
            .filter(move |o| o.verdict(event).scheduled())
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
    default_ttl_secs: u64,
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
    let enrich = match crate::enrich::compile(&o.enrich, at, default_ttl_secs, secrets) {
        Ok(e) => e,
        Err(mut e) => {
            issues.append(&mut e);
            Vec::new()
        }
    };
    let names: Vec<&str> = o.enrich.iter().map(|e| e.name.as_str()).collect();
    let unknown = |p: &str| {
        format!(
            "`enrich.{p}` names no enrich entry of this observer ({})",
            if names.is_empty() {
                "it has none".to_string()
            } else {
                format!(
                    "it has {}",
                    names
                        .iter()
                        .map(|n| format!("`{n}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        )
    };
    let mut condition_at_delivery = false;
    if let Some(c) = &condition {
        for n in c.enrich_names() {
            condition_at_delivery = true;
            if !names.contains(&n) {
                issues.push(issue("condition", unknown(n)));
            }
        }
    }
    if let Some(q) = &o.queue {
        if !crate::config::valid_queue_name(q) {
            issues.push(issue(
                "queue",
                format!("`{q}` is not a queue name: expected true, or 1-64 letters, digits, `-`, `_` or `.`"),
            ));
        }
    }
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
            Ok(action) => {
                for t in action.templates() {
                    for p in t.paths() {
                        if let Some(n) = p.enrich_name() {
                            if !names.contains(&n) {
                                issues.push(ConfigIssue {
                                    location: loc.clone(),
                                    message: unknown(n),
                                });
                            }
                        }
                    }
                }
                actions.push(ObserverAction {
                    destination: action
                        .destination()
                        .unwrap_or_else(|| format!("{}/{j}", o.name))
                        .into(),
                    action,
                    retry: a.retry(),
                    config: redacted(a),
                })
            }
            Err(mut e) => issues.append(&mut e),
        }
    }
    if issues.is_empty() {
        Ok(Observer {
            name: o.name.clone(),
            entity,
            events: o.events.iter().map(|e| e.0).collect(),
            condition,
            condition_at_delivery,
            enrich,
            ordered: o.ordering == crate::config::Ordering::Entity,
            queue: o.queue.as_deref().map(Arc::from),
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
/// `${file:…}` references are kept (they name where the secret lives), and so are template
/// placeholders, but every literal header value, every literal query value of a webhook URL, a
/// literal signing secret, a Slack URL and any password in a URL are replaced by `<redacted>`,
/// so no secret written into a config file ever reaches the database or the terminal.
///
/// Nothing reads a stored action back to deliver: `dlq retry` and `replay` compile the action of
/// the current config (observer name and action index), so redaction loses nothing needed to
/// retry.
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
        for (i, secret) in w.secrets.iter().enumerate() {
            if !is_reference(secret) {
                v["secrets"][i] = HIDDEN.into();
            }
        }
        for (name, value) in &w.headers {
            v["headers"][name] = redact_literals(value).into();
        }
        v["url"] = redact_url(&w.url).into();
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

/// `text` with its `${…}` references, `{{ … }}` placeholders and whitespace kept and every other
/// run of characters (literal text, which may be a credential) replaced by `<redacted>`:
/// `Bearer abc ${env:K}` → `<redacted> <redacted> ${env:K}`.
fn redact_literals(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut literal = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        let kept = if rest.starts_with("${") {
            rest.find('}').map(|end| end + 1)
        } else if rest.starts_with("{{") {
            rest.find("}}").map(|end| end + 2)
        } else if c.is_whitespace() {
            Some(c.len_utf8())
        } else {
            None
        };
        match kept {
            Some(len) => {
                out.push_str(&rest[..len]);
                rest = &rest[len..];
                literal = false;
            }
            None => {
                if !literal {
                    out.push_str("<redacted>");
                    literal = true;
                }
                rest = &rest[c.len_utf8()..];
            }
        }
    }
    out
}

/// A webhook URL template with the password of its user info and the literal part of every
/// query value redacted ([`redact_literals`]); the scheme, host, path, parameter names, references
/// and placeholders are kept. A component without `=` is redacted whole (`?TOKEN`).
fn redact_url(url: &str) -> String {
    let (before_fragment, fragment) = match url.find('#') {
        Some(i) => url.split_at(i),
        None => (url, ""),
    };
    let (base, query) = match before_fragment.find('?') {
        Some(i) => (&before_fragment[..i], Some(&before_fragment[i + 1..])),
        None => (before_fragment, None),
    };
    let mut out = String::with_capacity(url.len());
    // user:password@ in the authority.
    let authority_start = base.find("://").map(|i| i + 3).unwrap_or(0);
    let authority_end = base[authority_start..]
        .find('/')
        .map(|i| authority_start + i)
        .unwrap_or(base.len());
    match base[authority_start..authority_end].rfind('@') {
        Some(at) => {
            let userinfo = &base[authority_start..authority_start + at];
            out.push_str(&base[..authority_start]);
            match userinfo.split_once(':') {
                Some((user, password)) => {
                    out.push_str(user);
                    out.push(':');
                    out.push_str(&redact_literals(password));
                }
                None => out.push_str(userinfo),
            }
            out.push_str(&base[authority_start + at..]);
        }
        None => out.push_str(base),
    }
    if let Some(query) = query {
        out.push('?');
        for (i, component) in query.split('&').enumerate() {
            if i > 0 {
                out.push('&');
            }
            match component.split_once('=') {
                Some((name, value)) => {
                    out.push_str(name);
                    out.push('=');
                    out.push_str(&redact_literals(value));
                }
                None => out.push_str(&redact_literals(component)),
            }
        }
    }
    out.push_str(fragment);
    out
}

/// Re-exported so callers can name the config type next to the compiled one.
pub type ActionSpec = ActionConfig;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::WebhookConfig;

    fn compile_json(observer: serde_json::Value) -> Result<Observers, Vec<ConfigIssue>> {
        let config: Config =
            serde_json::from_value(serde_json::json!({ "observers": [observer] })).unwrap();
        Observers::compile_with(&config, action::Secrets::Unresolved)
    }

    fn issues(observer: serde_json::Value) -> String {
        compile_json(observer)
            .expect_err("expected config issues")
            .iter()
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn enrich_references_are_checked_where_they_are_written() {
        let hook = |body: &str| serde_json::json!({"type": "webhook", "url": "http://127.0.0.1:1/h", "body": body});
        let user = serde_json::json!({
            "name": "user", "key": "user:{{ data.user_id }}",
            "http": "http://127.0.0.1:1/users/{{ data.user_id }}"
        });
        let text = issues(serde_json::json!({
            "name": "o", "entity": "Order", "condition": "enrich.usr.vip == true",
            "enrich": [user], "actions": [hook(r#"{"e": "{{ enrich.user.email }}"}"#)]
        }));
        assert!(
            text.contains("observers[0] \"o\".condition: `enrich.usr` names no enrich entry of this observer (it has `user`)"),
            "{text}"
        );
        let text = issues(serde_json::json!({
            "name": "o", "entity": "Order",
            "actions": [hook(r#"{"e": "{{ enrich.user.email }}"}"#)]
        }));
        assert!(
            text.contains("observers[0] \"o\".actions[0] (webhook): `enrich.user` names no enrich entry of this observer (it has none)"),
            "{text}"
        );
        let obs = compile_json(serde_json::json!({
            "name": "o", "entity": "Order", "condition": "data.total > 1 && enrich.user.vip == true",
            "enrich": [user], "actions": [hook(r#"{"e": "{{ enrich.user.email }}"}"#)]
        }))
        .unwrap();
        let o = &obs.list[0];
        assert!(o.condition_at_delivery);
        assert_eq!(o.enrich.len(), 1);
        assert_eq!(o.enrich[0].ttl, std::time::Duration::from_secs(60));
        let e: ChangeEvent = serde_json::from_value(serde_json::json!({
            "id": "0b7c4c36-3c1c-4a4e-9d43-4f5b8a9c1d2e", "pk": 1, "txid": 1,
            "entity": "Order", "entity_id": "1", "operation": "INSERT",
            "data": {"total": 0}, "before": null, "tenant_id": null,
            "created_at": "2026-01-01T00:00:00Z"
        }))
        .unwrap();
        assert_eq!(o.verdict(&e), MatchVerdict::ConditionAtDelivery);
        assert_eq!(obs.matching(&e).count(), 1);
    }

    #[test]
    fn enrich_entries_are_validated() {
        let hook = serde_json::json!({"type": "log"});
        let text = issues(serde_json::json!({
            "name": "o", "entity": "Order", "actions": [hook],
            "enrich": [
                {"name": "9bad", "key": "k", "http": "http://x/{{ data.id }}", "timeout_ms": 0},
                {"name": "both", "key": "k", "http": "http://x/", "sql": "SELECT 1"},
                {"name": "none", "key": "k"},
                {"name": "q", "key": "", "sql": "SELECT * FROM u WHERE id = $1 AND t = $2", "params": ["{{ data.id }}"]},
                {"name": "later", "key": "k:{{ enrich.after.id }}", "http": "ftp://x/{{ data.nope | bogus }}", "ttl_secs": 0},
                {"name": "after", "key": "k", "sql": "SELECT 1"},
                {"name": "after", "key": "k:{{ enrich.q.id }}", "sql": "SELECT 1"}
            ]
        }));
        for needle in [
            "enrich[0] \"9bad\".name: must be 1-64 letters",
            "enrich[0] \"9bad\".timeout_ms: 0 is out of range",
            "enrich[1] \"both\": sets both `http` and `sql`",
            "enrich[2] \"none\": sets neither `http` nor `sql`",
            "enrich[3] \"q\".key: is empty",
            "enrich[3] \"q\".params: has 1 entries but `sql` uses parameters up to $2",
            "enrich[4] \"later\".key: `enrich.after.id` reads no earlier enrich entry",
            "enrich[4] \"later\".http: must start with http:// or https://",
            "enrich[4] \"later\".http: column",
            "enrich[4] \"later\".ttl_secs: 0 is out of range",
            "enrich[6] \"after\".name: another enrich entry of this observer has this name",
        ] {
            assert!(text.contains(needle), "missing `{needle}` in:\n{text}");
        }
        assert!(!text.contains("enrich[6] \"after\".key"), "{text}");
    }

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
            secrets: vec!["whsec_b2xkc2VjcmV0".into(), "${env:OLD}".into()],
            retry: RetryConfig::default(),
            batch: None,
        });
        let v = redacted(&a);
        let text = v.to_string();
        assert_eq!(v["secrets"][1], "${env:OLD}");
        for leaked in ["abc123", "hunter2", "whsec_c2VjcmV0", "whsec_b2xkc2VjcmV0"] {
            assert!(!text.contains(leaked), "{leaked} leaked: {text}");
        }
        assert_eq!(
            v["headers"]["X-Api-Key"], "${env:API_KEY}",
            "references are kept"
        );
        assert_eq!(v["headers"]["X-Team"], "<redacted>", "every literal value");
        let mut mixed = a.clone();
        if let ActionConfig::Webhook(w) = &mut mixed {
            w.url = "https://example.com/h/{{ data.id }}?token=lit-tok&id={{ data.id }}&k=${env:K}&flag"
                .into();
            w.headers.clear();
            w.headers.insert(
                "X-Api-Auth".into(),
                "lit-auth ${env:AUTH} {{ data.id }}".into(),
            );
            w.headers.insert("X-Blank".into(), String::new());
        }
        let v = redacted(&mixed);
        assert_eq!(
            v["url"],
            "https://example.com/h/{{ data.id }}?token=<redacted>&id={{ data.id }}&k=${env:K}&<redacted>"
        );
        assert_eq!(
            v["headers"]["X-Api-Auth"],
            "<redacted> ${env:AUTH} {{ data.id }}"
        );
        assert_eq!(v["headers"]["X-Blank"], "");
        let mut with_ref = a.clone();
        if let ActionConfig::Webhook(w) = &mut with_ref {
            w.secret = Some("${env:ORDERS_SECRET}".into());
        }
        assert_eq!(redacted(&with_ref)["secret"], "${env:ORDERS_SECRET}");
    }
}
