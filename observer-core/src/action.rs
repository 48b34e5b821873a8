//! The built-in actions (`webhook`, `log`, `sql`): compiled from config once, then attempted
//! once per call. Retrying is not done here: an attempt reports whether it may be retried and
//! when, and the run loop schedules the next attempt, so a slow or failing destination never
//! holds up anything else.

use std::time::{Duration, Instant};

use chrono::Utc;
use reqwest::header::{HeaderName, HeaderValue};

use crate::config::{resolve_secret, ActionConfig, LogConfig, SqlConfig, WebhookConfig};
use crate::observer::ConfigIssue;
use crate::path::Scope;
use crate::schema::quote_ident;
use crate::signing::{signature_headers, SigningKey};
use crate::template::{Target, Template};

/// What an action needs at run time: the HTTP clients and one database pool per process.
#[derive(Clone)]
pub struct ActionContext {
    /// The client of the cold HTTP paths (Slack, batched webhooks, enrichment lookups).
    pub http: reqwest::Client,
    /// The client of the per-event webhook request (see [`crate::webhook_client`]); it dials
    /// through the same guard.
    pub webhook: crate::webhook_client::WebhookClient,
    pub pool: deadpool_postgres::Pool,
    /// The `[redis]` connection, when one is configured (multiplexed and reconnecting).
    pub redis: Option<RedisHandle>,
    pub metrics: std::sync::Arc<crate::metrics::Metrics>,
    /// Where enrichment lookup results are cached: `NoCache` unless the `caching` layer is on.
    pub cache: std::sync::Arc<dyn crate::enrich::LookupCache>,
    /// `[outbound] allow`: the guard every destination passes (the HTTP client's resolver
    /// holds the same one).
    pub guard: std::sync::Arc<crate::outbound::Guard>,
    /// `[outbound] max_response_bytes`: the most of a lookup's answer that is read.
    pub max_response_bytes: usize,
}

/// A shared Redis connection and the key prefix of this deployment. The connection is made on
/// first use (so the daemon starts while Redis is down) and then multiplexed and re-established
/// by `ConnectionManager`.
#[derive(Clone)]
pub struct RedisHandle {
    client: redis::Client,
    conn: std::sync::Arc<tokio::sync::OnceCell<redis::aio::ConnectionManager>>,
    /// `[redis] key_prefix`; every key this process writes starts with it and `:`.
    pub prefix: std::sync::Arc<str>,
    /// `[redis] timeout_ms`, applied to connecting and to each command.
    pub timeout: Duration,
    /// `host:port` of the server, for messages (never the password).
    pub server: std::sync::Arc<str>,
}

impl RedisHandle {
    /// Parses `url` (already resolved). Fails with a message that never repeats the URL (it may
    /// hold a password). Does not connect.
    pub fn new(url: &str, prefix: &str, timeout: Duration) -> Result<RedisHandle, String> {
        let client = redis::Client::open(url)
            .map_err(|e| format!("[redis] url is not a valid Redis URL ({:?})", e.kind()))?;
        let server = client.get_connection_info().addr().to_string();
        Ok(RedisHandle {
            client,
            conn: Default::default(),
            prefix: prefix.into(),
            timeout,
            server: server.into(),
        })
    }

    /// The connection, connecting first if this is the first use.
    pub async fn conn(&self) -> Result<redis::aio::ConnectionManager, String> {
        let timeout = self.timeout;
        self.conn
            .get_or_try_init(|| async {
                let cfg = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(timeout))
                    .set_response_timeout(Some(timeout))
                    .set_number_of_retries(1);
                tokio::time::timeout(
                    timeout * 2,
                    redis::aio::ConnectionManager::new_with_config(self.client.clone(), cfg),
                )
                .await
                .map_err(|_| format!("cannot connect to Redis at {}: timed out", self.server))?
                .map_err(|e| format!("cannot connect to Redis at {}: {e}", self.server))
            })
            .await
            .cloned()
    }

    /// The client, for a connection of a caller's own (a blocking read must not hold up the
    /// shared one).
    pub fn client(&self) -> &redis::Client {
        &self.client
    }

    /// `prefix:part`.
    pub fn key(&self, part: &str) -> String {
        format!("{}:{part}", self.prefix)
    }

    /// Sends `pipe` on the shared connection within `timeout`; the error names the server.
    pub async fn query_pipeline<T: redis::FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
    ) -> Result<T, String> {
        let mut conn = self.conn().await?;
        tokio::time::timeout(self.timeout, pipe.query_async(&mut conn))
            .await
            .map_err(|_| {
                format!(
                    "Redis at {} did not answer within {} ms",
                    self.server,
                    self.timeout.as_millis()
                )
            })?
            .map_err(|e| format!("Redis at {}: {e}", self.server))
    }
}

impl ActionContext {
    /// The process's HTTP client: rustls with verified TLS (there is no setting that turns
    /// verification off), no redirects followed (a redirect is reported as a failure naming its
    /// target, so a receiver cannot bounce us elsewhere), names resolved through the outbound
    /// `guard`, and no proxy (`HTTP(S)_PROXY` are ignored: through a proxy the guard would see
    /// only the proxy's address, never the destination's).
    pub fn http_client(
        guard: std::sync::Arc<crate::outbound::Guard>,
    ) -> Result<reqwest::Client, reqwest::Error> {
        reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .dns_resolver(crate::outbound::GuardedResolver::new(guard))
            .user_agent(USER_AGENT)
            .pool_max_idle_per_host(1024)
            .tcp_nodelay(true)
            .build()
    }

    /// Parses a rendered URL and checks an IP-literal host against the guard (names are checked
    /// after resolution by the client's resolver). `Err` is a permanent failure's message.
    /// `shown` names the URL in an error; it is called only then (it may parse the URL again).
    pub fn checked_url(
        &self,
        url: &str,
        shown: impl FnOnce() -> String,
    ) -> Result<reqwest::Url, String> {
        if let Some(segment) = dot_segment(url) {
            return Err(dot_segment_error(&shown(), &segment));
        }
        let parsed = match reqwest::Url::parse(url) {
            Ok(p) => p,
            Err(e) => return Err(format!("`{}` is not a URL: {e}", shown())),
        };
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(format!(
                "`{}`: scheme `{}` is not http or https",
                shown(),
                parsed.scheme()
            ));
        }
        self.guard.check_url(&parsed).map_err(|r| r.to_string())?;
        Ok(parsed)
    }
}

/// A compiled action.
#[derive(Debug)]
pub enum CompiledAction {
    Webhook(Webhook),
    Log(Log),
    Sql(Sql),
    Slack(crate::actions::slack::Slack),
    Email(crate::actions::email::Email),
    RedisPublish(crate::actions::redis_publish::RedisPublish),
    Cache(crate::actions::cache::Cache),
    /// The publisher role's only action: hand the event to another system (`forward.rs`).
    Forward(crate::forward::Forward),
}

impl CompiledAction {
    /// Where this action sends to, for per-destination layers (breaker, rate limit): the
    /// `host:port` of a webhook whose authority holds no placeholder, else `None` (the layer
    /// then uses the action target `observer/index`).
    pub fn destination(&self) -> Option<String> {
        match self {
            CompiledAction::Webhook(w) => static_authority(&w.url.literal_text("{{}}")),
            CompiledAction::Sql(_) => Some("postgres".into()),
            CompiledAction::Log(_) => Some("log".into()),
            CompiledAction::Slack(s) => s.destination(),
            CompiledAction::Email(e) => Some(e.destination()),
            CompiledAction::RedisPublish(_) | CompiledAction::Cache(_) => Some("redis".into()),
            CompiledAction::Forward(f) => Some(f.to.destination()),
        }
    }

    /// The templates it renders (to check which `enrich.<name>` lookups they read).
    pub fn templates(&self) -> Vec<&Template> {
        match self {
            CompiledAction::Webhook(w) => std::iter::once(&w.url)
                .chain(w.headers.iter().map(|(_, t)| t))
                .chain(w.body.iter())
                .collect(),
            CompiledAction::Log(l) => l.message.iter().collect(),
            CompiledAction::Sql(_) => Vec::new(),
            CompiledAction::Slack(s) => s.templates(),
            CompiledAction::Email(e) => e.templates(),
            CompiledAction::RedisPublish(r) => r.templates(),
            CompiledAction::Cache(c) => c.templates(),
            CompiledAction::Forward(_) => Vec::new(),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            CompiledAction::Webhook(_) => "webhook",
            CompiledAction::Log(_) => "log",
            CompiledAction::Sql(_) => "sql",
            CompiledAction::Slack(_) => "slack",
            CompiledAction::Email(_) => "email",
            CompiledAction::RedisPublish(_) => "redis_publish",
            CompiledAction::Cache(_) => "cache",
            CompiledAction::Forward(_) => "forward",
        }
    }
}

#[derive(Debug)]
pub struct Webhook {
    method: reqwest::Method,
    url: Template,
    headers: Vec<(HeaderName, Template)>,
    body: Option<Template>,
    timeout: Duration,
    keys: Vec<SigningKey>,
    policy: crate::actions::http_policy::HttpPolicy,
    batcher: Option<crate::actions::webhook_batch::Batcher>,
    /// The URL was written with a `${env:…}`/`${file:…}` reference (e.g. a token in the query):
    /// messages then never show it.
    url_secret: bool,
    /// For a URL without placeholders: the request target, parsed and checked against the guard
    /// once (with the address of the guard it was checked against), not for every event — it
    /// was 3 % of the daemon's CPU in a drain (docs/benchmarks.md).
    static_target: std::sync::OnceLock<StaticTarget>,
}

/// A static URL's target and the guard it was checked against (held weakly: its allocation then
/// stays, so another guard cannot take its address and pass for it).
type StaticTarget = (
    std::sync::Weak<crate::outbound::Guard>,
    Result<RequestTarget, String>,
);

/// Where a webhook request goes: the URI, and its `user:password@` as a Basic header.
#[derive(Debug, Clone)]
struct RequestTarget {
    target: crate::webhook_client::Target,
    basic: Option<HeaderValue>,
}

#[derive(Debug)]
pub struct Log {
    message: Option<Template>,
    level: tracing::Level,
}

#[derive(Debug)]
pub struct Sql {
    statement: String,
}

/// A URL as messages show it: not at all when it came from a secret reference, and never with
/// a password or the values of its query (`?token=…` is a common way to pass a credential):
/// `https://h/p?token=redacted&id=redacted`.
pub fn shown_url(url: &str, secret: bool) -> String {
    if secret {
        return "<url from a secret reference>".into();
    }
    let redact_query = |query: &str| {
        query
            .split('&')
            .map(|c| match c.split_once('=') {
                Some((name, _)) => format!("{name}=redacted"),
                None => "redacted".to_string(),
            })
            .collect::<Vec<_>>()
            .join("&")
    };
    match reqwest::Url::parse(url) {
        Ok(mut u) if u.password().is_some() || u.query().is_some() => {
            if u.password().is_some() {
                let _ = u.set_password(Some("redacted"));
            }
            if let Some(q) = u.query().map(redact_query) {
                u.set_query(Some(&q));
            }
            u.to_string()
        }
        Ok(_) => url.to_string(),
        // Not a URL: shown up to its query.
        Err(_) => match url.split_once('?') {
            Some((base, _)) => format!("{base}?redacted"),
            None => url.to_string(),
        },
    }
}

/// A reqwest error as messages show it: reqwest puts the request's URL in its errors, so it is
/// removed when the URL came from a secret reference and shown as [`shown_url`] otherwise.
pub(crate) fn shown_error(e: reqwest::Error, url: &str, secret: bool) -> reqwest::Error {
    if secret || e.url().is_none() {
        return e.without_url();
    }
    match reqwest::Url::parse(&shown_url(url, false)) {
        Ok(u) => e.with_url(u),
        Err(_) => e.without_url(),
    }
}

/// The first `.` or `..` path segment of an `http(s)` URL as written, in any spelling the URL
/// parser takes for one (`%2e`, `.%2E`, …), or `None`. The parser removes such a segment (and,
/// for `..`, the one before it), so the request would go to another path than the template
/// names: `/hooks/{{ data.note }}/end` with `..` goes to `/end`. Placeholder values are
/// percent-encoded except `.`, so this is how a value could still move a request; the query and
/// fragment are not looked at. Follows the WHATWG parser for special schemes: tabs and line
/// breaks are dropped, `\` separates segments like `/`.
pub fn dot_segment(url: &str) -> Option<String> {
    let url: String = url
        .chars()
        .filter(|c| !matches!(c, '\t' | '\n' | '\r'))
        .collect();
    let (_, rest) = url.trim_matches(|c: char| c <= ' ').split_once(':')?;
    let rest = rest.trim_start_matches(['/', '\\']);
    let path_start = rest.find(['/', '\\', '?', '#'])?;
    let path = &rest[path_start..];
    let path = &path[..path.find(['?', '#']).unwrap_or(path.len())];
    path.split(['/', '\\'])
        .find(|segment| {
            let s = segment.to_ascii_lowercase().replace("%2e", ".");
            s == "." || s == ".."
        })
        .map(str::to_string)
}

/// The permanent failure (or config error) for a URL with a dot segment; `shown` is the URL as
/// messages may show it.
pub(crate) fn dot_segment_error(shown: &str, segment: &str) -> String {
    format!(
        "`{shown}`: the path segment `{segment}` would move the request to another path when the \
         URL is parsed (`.` and `..` segments are removed, `..` with the segment before it); a \
         placeholder value cannot make a whole path segment of `.` or `..`"
    )
}

/// `host:port` of a URL template whose scheme and authority hold no placeholder.
pub fn static_authority(url: &str) -> Option<String> {
    let rest = url
        .strip_prefix("https://")
        .map(|r| (r, 443))
        .or_else(|| url.strip_prefix("http://").map(|r| (r, 80)));
    let (rest, default_port) = rest?;
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..end];
    if authority.is_empty() || authority.contains("{{") || authority.contains('@') {
        return None;
    }
    let parsed = reqwest::Url::parse(&format!("http://{authority}/")).ok()?;
    let host = parsed.host_str()?;
    Some(format!("{host}:{}", parsed.port().unwrap_or(default_port)))
}

/// How one attempt ended.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum AttemptResult {
    /// Done; never attempted again.
    Delivered,
    /// Failed in a way worth retrying, no sooner than `after_ms` when the receiver asked.
    Retry { after_ms: Option<u64> },
    /// Failed in a way retrying cannot fix (4xx, a bad template result, a missing function).
    Permanent,
    /// Not attempted: a layer put it back (breaker open, rate limit, dedup claim held
    /// elsewhere). It is tried again after `after_ms` and does not count as an attempt.
    Deferred { after_ms: u64, reason: &'static str },
    /// Not attempted because it already ran within the dedup window.
    Duplicate,
    /// Not attempted: the observer's condition over its enrichment results was false.
    ConditionFalse,
    /// Not attempted here: handed to the job queue `queue` (the `queue` layer) as stream entry
    /// `job` (for a key an earlier run had already enqueued, that run's entry).
    Enqueued { queue: String, job: String },
}

impl Attempt {
    /// An attempt a layer answered without running the action.
    pub fn answered(attempt: u32, result: AttemptResult, note: Option<String>) -> Attempt {
        Attempt {
            attempt,
            at: Utc::now(),
            duration_ms: 0,
            status: None,
            error: note,
            result,
        }
    }
}

/// One attempt, as recorded in the action log and the dead-letter queue.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub attempt: u32,
    pub at: chrono::DateTime<Utc>,
    pub duration_ms: u64,
    pub status: Option<u16>,
    pub error: Option<String>,
    pub result: AttemptResult,
}

/// `{"attempt":…,"at":…,"duration_ms":…[,"status":…][,"error":…],"result":…[, its fields]}`:
/// what deriving it with `result` flattened wrote, written directly (every attempt of every
/// delivery is written to the action log; serde's flatten and internally tagged enums go
/// through a generic map, 2,400 instructions an attempt in a drain).
impl serde::Serialize for Attempt {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("attempt", &self.attempt)?;
        m.serialize_entry(
            "at",
            &crate::timestamp::Rfc3339::new(&self.at, crate::timestamp::Fraction::Auto),
        )?;
        m.serialize_entry("duration_ms", &self.duration_ms)?;
        if let Some(status) = self.status {
            m.serialize_entry("status", &status)?;
        }
        if let Some(error) = &self.error {
            m.serialize_entry("error", error)?;
        }
        match &self.result {
            AttemptResult::Delivered => m.serialize_entry("result", "delivered")?,
            AttemptResult::Retry { after_ms } => {
                m.serialize_entry("result", "retry")?;
                m.serialize_entry("after_ms", after_ms)?;
            }
            AttemptResult::Permanent => m.serialize_entry("result", "permanent")?,
            AttemptResult::Deferred { after_ms, reason } => {
                m.serialize_entry("result", "deferred")?;
                m.serialize_entry("after_ms", after_ms)?;
                m.serialize_entry("reason", reason)?;
            }
            AttemptResult::Duplicate => m.serialize_entry("result", "duplicate")?,
            AttemptResult::ConditionFalse => m.serialize_entry("result", "condition_false")?,
            AttemptResult::Enqueued { queue, job } => {
                m.serialize_entry("result", "enqueued")?;
                m.serialize_entry("queue", queue)?;
                m.serialize_entry("job", job)?;
            }
        }
        m.end()
    }
}

/// Whether `${env:…}`/`${file:…}` references are resolved while compiling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Secrets {
    /// Resolve them (the daemon, retries, replay): a missing variable is an error.
    Resolve,
    /// Leave them as written and sign nothing: for commands that only match and display
    /// (`debug-event`), so inspecting needs no secret. Such actions must not be executed.
    Unresolved,
}

pub(crate) fn secret(
    value: &str,
    location: &str,
    mode: Secrets,
) -> Result<String, crate::config::ConfigError> {
    match mode {
        Secrets::Resolve => resolve_secret(value, location),
        Secrets::Unresolved => Ok(value.to_string()),
    }
}

/// Compiles a template whose text may hold `${env:…}`/`${file:…}` references. The text as
/// written is parsed; with `Secrets::Resolve` each reference becomes its value as literal text
/// ([`Template::parse_with_references`]), so a secret is never read as template syntax nor
/// quoted in an error. With `Secrets::Unresolved` the references stay as written.
pub(crate) fn secret_template(
    value: &str,
    location: &str,
    target: Target,
    mode: Secrets,
) -> Result<Template, crate::template::TemplateError> {
    match mode {
        Secrets::Resolve => Template::parse_with_references(value, target, &mut |reference| {
            resolve_secret(reference, location).map_err(|e| match e {
                crate::config::ConfigError::Secret { message, .. } => message,
                other => other.to_string(),
            })
        }),
        Secrets::Unresolved => Template::parse(value, target),
    }
}

/// Compiles one action; every problem is returned with its location.
pub fn compile(
    config: &ActionConfig,
    at: &str,
    mode: Secrets,
) -> Result<CompiledAction, Vec<ConfigIssue>> {
    let mut issues = Vec::new();
    let mut issue = |field: &str, message: String| {
        issues.push(ConfigIssue {
            location: format!("{at}.{field}"),
            message,
        })
    };
    let action = match config {
        ActionConfig::Webhook(w) => compile_webhook(w, &mut issue, mode),
        ActionConfig::Log(l) => compile_log(l, &mut issue),
        ActionConfig::Sql(s) => compile_sql(s, &mut issue),
        ActionConfig::Slack(s) => crate::actions::slack::compile(s, &mut issue, mode),
        ActionConfig::Email(e) => crate::actions::email::compile(e, &mut issue, mode),
        ActionConfig::RedisPublish(r) => crate::actions::redis_publish::compile(r, &mut issue),
        ActionConfig::Cache(c) => crate::actions::cache::compile(c, &mut issue),
    };
    match action {
        Some(a) if issues.is_empty() => Ok(a),
        _ => Err(issues),
    }
}

fn compile_webhook(
    w: &WebhookConfig,
    issue: &mut dyn FnMut(&str, String),
    mode: Secrets,
) -> Option<CompiledAction> {
    let method = match reqwest::Method::from_bytes(w.method.to_ascii_uppercase().as_bytes()) {
        Ok(m) => Some(m),
        Err(_) => {
            issue("method", format!("`{}` is not an HTTP method", w.method));
            None
        }
    };
    let url = match secret_template(&w.url, "url", Target::UrlComponent, mode) {
        Ok(t) => {
            // The URL as it renders, placeholders aside (it may hold resolved secrets).
            let u = t.literal_text("{{}}");
            if t.is_static() {
                match reqwest::Url::parse(&u) {
                    Ok(parsed) if matches!(parsed.scheme(), "http" | "https") => {
                        if let Some(segment) = dot_segment(&u) {
                            let shown = shown_url(&u, w.url.contains("${"));
                            issue("url", dot_segment_error(&shown, &segment));
                        }
                    }
                    Ok(parsed) => issue(
                        "url",
                        format!("scheme `{}` is not http or https", parsed.scheme()),
                    ),
                    Err(e) => issue(
                        "url",
                        format!(
                            "`{}` is not a URL: {e}",
                            shown_url(&u, w.url.contains("${"))
                        ),
                    ),
                }
            } else if !(u.starts_with("http://") || u.starts_with("https://")) {
                issue("url", "must start with http:// or https://".into());
            }
            Some(t)
        }
        Err(e) => {
            issue("url", e.to_string());
            None
        }
    };
    let mut headers = Vec::new();
    for (name, value) in &w.headers {
        let field = format!("headers.{name}");
        let hn = match HeaderName::from_bytes(name.as_bytes()) {
            Ok(h) => h,
            Err(_) => {
                issue(&field, format!("`{name}` is not a valid header name"));
                continue;
            }
        };
        let lower = hn.as_str();
        if [
            "idempotency-key",
            "webhook-id",
            "webhook-timestamp",
            "webhook-signature",
            "content-length",
            "host",
        ]
        .contains(&lower)
        {
            issue(
                &field,
                format!("`{name}` is set by the webhook action itself"),
            );
            continue;
        }
        match secret_template(value, &field, Target::Header, mode) {
            Ok(t) => headers.push((hn, t)),
            Err(e) => issue(&field, e.to_string()),
        }
    }
    let body = match &w.body {
        Some(b) => match Template::parse(b, Target::Json) {
            Ok(t) => Some(t),
            Err(e) => {
                issue("body", e.to_string());
                None
            }
        },
        None => None,
    };
    if w.timeout_ms == 0 || w.timeout_ms > 600_000 {
        issue("timeout_ms", "expected 1..=600000".into());
    }
    let mut keys = Vec::new();
    let all = w.secret.iter().map(|s| ("secret".to_string(), s)).chain(
        w.secrets
            .iter()
            .enumerate()
            .map(|(i, s)| (format!("secrets[{i}]"), s)),
    );
    for (field, secret) in all {
        if mode != Secrets::Resolve {
            break;
        }
        match resolve_secret(secret, &field) {
            Ok(s) => match SigningKey::parse(&s) {
                Ok(k) => keys.push(k),
                Err(e) => issue(&field, e.to_string()),
            },
            Err(e) => issue(&field, e.to_string()),
        }
    }
    // Problems of `retry` are reported by the observer (with the `retry` location).
    let policy = crate::actions::http_policy::HttpPolicy::compile(&w.retry).ok();
    let batcher = match &w.batch {
        Some(b) => crate::actions::webhook_batch::Batcher::compile(b, w, issue),
        None => None,
    };
    Some(CompiledAction::Webhook(Webhook {
        method: method?,
        url: url?,
        headers,
        body: if w.body.is_some() { Some(body?) } else { None },
        timeout: Duration::from_millis(w.timeout_ms),
        keys,
        policy: policy?,
        batcher: if w.batch.is_some() {
            Some(batcher?)
        } else {
            None
        },
        url_secret: w.url.contains("${"),
        static_target: std::sync::OnceLock::new(),
    }))
}

fn compile_log(l: &LogConfig, issue: &mut dyn FnMut(&str, String)) -> Option<CompiledAction> {
    let level = match l.level.to_ascii_lowercase().as_str() {
        "info" => tracing::Level::INFO,
        "warn" => tracing::Level::WARN,
        "debug" => tracing::Level::DEBUG,
        other => {
            issue("level", format!("`{other}`: expected info, warn or debug"));
            return None;
        }
    };
    let message = match &l.message {
        Some(m) => match Template::parse(m, Target::Text) {
            Ok(t) => Some(t),
            Err(e) => {
                issue("message", e.to_string());
                return None;
            }
        },
        None => None,
    };
    Some(CompiledAction::Log(Log { message, level }))
}

fn compile_sql(s: &SqlConfig, issue: &mut dyn FnMut(&str, String)) -> Option<CompiledAction> {
    let parts: Vec<&str> = s.function.split('.').collect();
    let ok = !parts.is_empty()
        && parts.len() <= 2
        && parts.iter().all(|p| {
            let mut c = p.chars();
            matches!(c.next(), Some(f) if f.is_ascii_alphabetic() || f == '_')
                && c.all(|x| x.is_ascii_alphanumeric() || x == '_')
        });
    if !ok {
        issue(
            "function",
            format!(
                "`{}` is not a function name: expected `name` or `schema.name`",
                s.function
            ),
        );
        return None;
    }
    let name = parts
        .iter()
        .map(|p| quote_ident(p))
        .collect::<Vec<_>>()
        .join(".");
    Some(CompiledAction::Sql(Sql {
        statement: format!("SELECT {name}($1::jsonb)"),
    }))
}

/// Longest response excerpt kept in an error message.
const EXCERPT: usize = 512;

impl CompiledAction {
    /// Performs one attempt. Never panics; every failure is an `Attempt` with its error.
    pub async fn attempt(&self, ctx: &ActionContext, scope: &Scope<'_>, attempt: u32) -> Attempt {
        let at = Utc::now();
        let started = Instant::now();
        // Every action but the webhook runs boxed: a future is as large as its largest state,
        // and the whole of it is copied when the dispatch's future is boxed, for every event —
        // the SMTP, reqwest and SQL futures made the webhook's dispatch pay for their size.
        let (result, status, error) = match self {
            CompiledAction::Webhook(w) => w.send(ctx, scope).await,
            CompiledAction::Log(l) => l.write(scope),
            CompiledAction::Sql(s) => Box::pin(s.call(ctx, scope)).await,
            CompiledAction::Slack(s) => Box::pin(s.send(ctx, scope)).await,
            CompiledAction::Email(e) => Box::pin(e.send(ctx, scope)).await,
            CompiledAction::RedisPublish(r) => Box::pin(r.publish(ctx, scope)).await,
            CompiledAction::Cache(c) => Box::pin(c.invalidate(ctx, scope)).await,
            CompiledAction::Forward(f) => Box::pin(f.send(scope.event)).await,
        };
        Attempt {
            attempt,
            at,
            duration_ms: started.elapsed().as_millis() as u64,
            status,
            error,
            result,
        }
    }
}

pub(crate) type Outcome = (AttemptResult, Option<u16>, Option<String>);

pub(crate) fn permanent(e: impl std::fmt::Display) -> Outcome {
    (AttemptResult::Permanent, None, Some(e.to_string()))
}

impl Webhook {
    /// Parses and checks a rendered URL into a request target. `Err` is a permanent failure's
    /// message.
    fn request_target(&self, ctx: &ActionContext, url: &str) -> Result<RequestTarget, String> {
        let mut parsed = ctx.checked_url(url, || shown_url(url, self.url_secret))?;
        let basic = take_basic_auth(&mut parsed);
        match parsed.as_str().parse::<hyper::Uri>() {
            Ok(uri) => match crate::webhook_client::Target::new(&uri) {
                Ok(target) => Ok(RequestTarget { target, basic }),
                Err(e) => Err(format!(
                    "cannot build request to `{}`: {e}",
                    shown_url(url, self.url_secret)
                )),
            },
            Err(e) => Err(format!(
                "cannot build request to `{}`: {e}",
                shown_url(url, self.url_secret)
            )),
        }
    }

    /// The target of a URL without placeholders, computed once per guard.
    fn static_target(&self, ctx: &ActionContext) -> Result<RequestTarget, String> {
        let compute = || self.request_target(ctx, &self.url.literal_text(""));
        let (checked_with, target) = self
            .static_target
            .get_or_init(|| (std::sync::Arc::downgrade(&ctx.guard), compute()));
        if std::ptr::eq(checked_with.as_ptr(), std::sync::Arc::as_ptr(&ctx.guard)) {
            target.clone()
        } else {
            compute()
        }
    }

    async fn send(&self, ctx: &ActionContext, scope: &Scope<'_>) -> Outcome {
        let mut url = None;
        let target = if self.url.is_static() && self.batcher.is_none() {
            self.static_target(ctx)
        } else {
            match self.url.render(scope) {
                Ok(u) => {
                    let t = self.request_target(ctx, &u);
                    url = Some(u);
                    t
                }
                Err(e) => return permanent(format!("url template: {e}")),
            }
        };
        let RequestTarget { target, basic } = match target {
            Ok(t) => t,
            Err(e) => return permanent(e),
        };
        let key = scope.idempotency_key.unwrap_or_default();
        let observer = scope.observer.unwrap_or_default();
        let rendered_body = match &self.body {
            Some(t) => match t.render(scope) {
                Ok(b) => Some(b),
                Err(e) => return permanent(format!("body template: {e}")),
            },
            None => None,
        };
        let mut rendered = Vec::with_capacity(self.headers.len());
        for (name, t) in &self.headers {
            match t.render(scope).map_err(|e| e.to_string()).and_then(|v| {
                HeaderValue::from_str(&v).map_err(|_| "invalid header value".to_string())
            }) {
                Ok(v) => rendered.push((name.clone(), v)),
                Err(e) => return permanent(format!("header `{name}`: {e}")),
            }
        }
        if let Some(b) = &self.batcher {
            let send = || crate::actions::webhook_batch::BatchSend {
                http: ctx.http.clone(),
                method: self.method.clone(),
                timeout: self.timeout,
                keys: self.keys.clone(),
                policy: self.policy.clone(),
                url_secret: self.url_secret,
            };
            let element = match &rendered_body {
                Some(body) => crate::actions::webhook_batch::element(body, key),
                None => scope.event.envelope_json(observer, Some(key)),
            };
            let url = url.unwrap_or_else(|| self.url.literal_text(""));
            return Box::pin(b.submit(send, url, rendered, element, key)).await;
        }
        let body = match rendered_body {
            Some(b) => b.into_bytes(),
            None => scope.event.envelope_bytes(observer, None),
        };
        let sig = signature_headers(&self.keys, key, Utc::now().timestamp(), &body);
        let (Ok(id), Ok(timestamp)) = (
            HeaderValue::from_str(&sig.id),
            HeaderValue::from_str(&sig.timestamp),
        ) else {
            return permanent(format!(
                "cannot build request to `{}`: invalid idempotency key",
                shown_url(
                    &url.unwrap_or_else(|| self.url.literal_text("")),
                    self.url_secret
                )
            ));
        };
        // Built in place: the builder moved the whole request for every header.
        let mut req = hyper::Request::new(http_body_util::Full::new(bytes::Bytes::from(body)));
        *req.method_mut() = self.method.clone();
        let headers = req.headers_mut();
        headers.reserve(8 + rendered.len());
        headers.append(
            reqwest::header::USER_AGENT,
            HeaderValue::from_static(USER_AGENT),
        );
        // As reqwest sent it, so a receiver sees the same request from either client.
        headers.append(reqwest::header::ACCEPT, HeaderValue::from_static("*/*"));
        headers.append(IDEMPOTENCY_KEY, id.clone());
        if let Some(b) = basic {
            headers.append(reqwest::header::AUTHORIZATION, b);
        }
        if !self
            .headers
            .iter()
            .any(|(n, _)| n == reqwest::header::CONTENT_TYPE)
        {
            headers.append(
                reqwest::header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
        }
        for (name, v) in rendered {
            headers.append(name, v);
        }
        headers.append(WEBHOOK_ID, id);
        headers.append(WEBHOOK_TIMESTAMP, timestamp);
        if let Some(s) = sig.signature {
            match HeaderValue::from_str(&s) {
                Ok(v) => {
                    headers.append(WEBHOOK_SIGNATURE, v);
                }
                Err(_) => return permanent("cannot build request: invalid signature header"),
            }
        }
        // One bound for the whole exchange, as reqwest's request timeout: connecting, sending,
        // the answer's head and the part of its body that is read.
        match tokio::time::timeout(self.timeout, ctx.webhook.send_to(&target, req)).await {
            Ok(Ok(answer)) => {
                let status = answer.head.status;
                if status.is_success() {
                    return (AttemptResult::Delivered, Some(status.as_u16()), None);
                }
                let head = self.policy.head(status, &answer.head.headers);
                self.policy.judge(head, &answer.excerpt, "")
            }
            Ok(Err(e)) => webhook_failure(&e),
            Err(_) => (
                AttemptResult::Retry { after_ms: None },
                None,
                Some(format!("timed out after {} ms", self.timeout.as_millis())),
            ),
        }
    }
}

/// `user:password@` of a URL as a Basic `Authorization` value (percent-decoded), removed from the
/// URL: what reqwest does for the cold paths, so a webhook URL with credentials means the same
/// on both clients. `None` when the URL has none.
fn take_basic_auth(url: &mut reqwest::Url) -> Option<HeaderValue> {
    use base64::Engine;
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8()
            .ok()
            .map(|c| c.into_owned())
    };
    let user = decode(url.username())?;
    let password = match url.password() {
        Some(p) => Some(decode(p)?),
        None => None,
    };
    if user.is_empty() && password.is_none() {
        return None;
    }
    url.set_username("").ok()?;
    url.set_password(None).ok()?;
    let pair = format!("{user}:{}", password.unwrap_or_default());
    let mut v = HeaderValue::from_str(&format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(pair)
    ))
    .ok()?;
    v.set_sensitive(true);
    Some(v)
}

// Header names made at compile time: a `&str` name is parsed (and checked against the standard
// names) on every request.
const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
const WEBHOOK_ID: HeaderName = HeaderName::from_static("webhook-id");
const WEBHOOK_TIMESTAMP: HeaderName = HeaderName::from_static("webhook-timestamp");
const WEBHOOK_SIGNATURE: HeaderName = HeaderName::from_static("webhook-signature");

/// `User-Agent` of every request the daemon makes.
pub const USER_AGENT: &str = concat!("fraiseql-observers/", env!("CARGO_PKG_VERSION"));

/// The outcome of a webhook request that got no answer: a guard refusal is permanent, anything
/// else (cannot connect, connection reset, TLS failure) is retried. hyper's errors never hold
/// the URL, so nothing secret is quoted.
fn webhook_failure(e: &crate::webhook_client::SendError) -> Outcome {
    if let Some(r) = crate::outbound::refusal(e) {
        return permanent(r);
    }
    let what = if e.is_connect() {
        format!("cannot connect: {}", crate::error_chain(e))
    } else {
        format!("request failed: {}", crate::error_chain(e))
    };
    (AttemptResult::Retry { after_ms: None }, None, Some(what))
}

/// Most of a response body read before the connection is dropped: a short body is read to its
/// end so the connection can be reused; a longer one is abandoned (the connection is closed).
pub const DRAIN_LIMIT: usize = 64 * 1024;

/// Reads at most a short excerpt of the body (for the error message) and drops the rest,
/// reading no more than [`DRAIN_LIMIT`] bytes however much the receiver sends.
pub(crate) async fn drain(mut resp: reqwest::Response) -> String {
    let mut excerpt = Excerpt::default();
    while let Ok(Some(chunk)) = resp.chunk().await {
        if !excerpt.push(&chunk) {
            break;
        }
    }
    excerpt.finish()
}

/// The first [`EXCERPT`] bytes of a body being read, and how much was read: what both HTTP
/// clients keep of an answer.
#[derive(Default)]
pub(crate) struct Excerpt {
    buf: Vec<u8>,
    read: usize,
}

impl Excerpt {
    /// Takes one chunk; `false` once [`DRAIN_LIMIT`] bytes were read (stop reading).
    pub(crate) fn push(&mut self, chunk: &[u8]) -> bool {
        if self.buf.len() < EXCERPT {
            let room = EXCERPT - self.buf.len();
            self.buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
        }
        self.read += chunk.len();
        self.read < DRAIN_LIMIT
    }

    /// The excerpt as one printable line.
    pub(crate) fn finish(self) -> String {
        if self.buf.is_empty() {
            return String::new();
        }
        let text = String::from_utf8_lossy(&self.buf);
        text.chars()
            .filter(|c| !c.is_control() || *c == ' ')
            .collect::<String>()
            .trim()
            .to_string()
    }
}

/// `Retry-After`: delay-seconds or an HTTP date; capped at one hour.
pub fn parse_retry_after(v: &str) -> Option<Duration> {
    let cap = Duration::from_secs(3600);
    if let Ok(secs) = v.trim().parse::<u64>() {
        return Some(Duration::from_secs(secs).min(cap));
    }
    let when = chrono::DateTime::parse_from_rfc2822(v.trim()).ok()?;
    let delta = when.with_timezone(&Utc) - Utc::now();
    Some(delta.to_std().unwrap_or(Duration::ZERO).min(cap))
}

impl Log {
    fn write(&self, scope: &Scope<'_>) -> Outcome {
        let e = scope.event;
        let message = match &self.message {
            Some(t) => match t.render(scope) {
                Ok(m) => m,
                Err(err) => return permanent(format!("message template: {err}")),
            },
            None => format!(
                "{} {} {} ({})",
                e.operation,
                e.entity,
                e.entity_id.as_deref().unwrap_or("-"),
                e.id
            ),
        };
        let observer = scope.observer.unwrap_or_default();
        match self.level {
            tracing::Level::WARN => {
                tracing::warn!(target: "fraiseql_observers::action", observer, event_id = %e.id, "{message}")
            }
            tracing::Level::DEBUG => {
                tracing::debug!(target: "fraiseql_observers::action", observer, event_id = %e.id, "{message}")
            }
            _ => {
                tracing::info!(target: "fraiseql_observers::action", observer, event_id = %e.id, "{message}")
            }
        }
        (AttemptResult::Delivered, None, None)
    }
}

impl Sql {
    async fn call(&self, ctx: &ActionContext, scope: &Scope<'_>) -> Outcome {
        let mut payload = scope.event.envelope(scope.observer.unwrap_or_default());
        if let Some(obj) = payload.as_object_mut() {
            obj.insert(
                "idempotency_key".into(),
                scope.idempotency_key.unwrap_or_default().into(),
            );
        }
        let client = match ctx.pool.get().await {
            Ok(c) => c,
            Err(e) => {
                return (
                    AttemptResult::Retry { after_ms: None },
                    None,
                    Some(format!("database pool: {e}")),
                )
            }
        };
        match client.execute(self.statement.as_str(), &[&payload]).await {
            Ok(_) => (AttemptResult::Delivered, None, None),
            Err(e) => {
                let transient = match e.code() {
                    // Connection, rollback (serialization, deadlock), resources, operator intervention.
                    Some(code) => matches!(&code.code()[..2], "08" | "40" | "53" | "57" | "58"),
                    None => true,
                };
                let msg = match e.as_db_error() {
                    Some(db) => format!("{} ({})", db.message(), db.code().code()),
                    None => crate::error_chain(&e),
                };
                let result = if transient {
                    AttemptResult::Retry { after_ms: None }
                } else {
                    AttemptResult::Permanent
                };
                (result, None, Some(msg))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shown_urls_hide_secrets_passwords_and_query_values() {
        assert_eq!(
            shown_url("https://u:pw@h.example/p?token=abc&id=7&flag", false),
            "https://u:redacted@h.example/p?token=redacted&id=redacted&redacted"
        );
        assert_eq!(
            shown_url("https://h.example/p", false),
            "https://h.example/p"
        );
        assert_eq!(shown_url("nope?token=abc", false), "nope?redacted");
        assert_eq!(
            shown_url("https://h.example/?t=abc", true),
            "<url from a secret reference>"
        );
    }

    #[test]
    fn url_credentials_become_basic_auth_and_leave_the_url() {
        let mut u = reqwest::Url::parse("https://us%40er:p%3Ass@hooks.example/x?a=1").unwrap();
        let v = take_basic_auth(&mut u).unwrap();
        // base64("us@er:p:ss")
        assert_eq!(v.to_str().unwrap(), "Basic dXNAZXI6cDpzcw==");
        assert!(v.is_sensitive());
        assert_eq!(u.as_str(), "https://hooks.example/x?a=1");
        let mut u = reqwest::Url::parse("https://only@hooks.example/").unwrap();
        assert_eq!(
            take_basic_auth(&mut u).unwrap().to_str().unwrap(),
            "Basic b25seTo="
        );
        let mut u = reqwest::Url::parse("https://hooks.example/").unwrap();
        assert!(take_basic_auth(&mut u).is_none());
    }

    /// The hand-written form writes what the derived one did, for every result.
    #[test]
    fn attempts_serialize_as_the_derived_form_did() {
        #[derive(serde::Serialize)]
        struct Derived<'a> {
            attempt: u32,
            at: chrono::DateTime<Utc>,
            duration_ms: u64,
            #[serde(skip_serializing_if = "Option::is_none")]
            status: Option<u16>,
            #[serde(skip_serializing_if = "Option::is_none")]
            error: Option<&'a str>,
            #[serde(flatten)]
            result: &'a AttemptResult,
        }
        let results = [
            AttemptResult::Delivered,
            AttemptResult::Retry { after_ms: None },
            AttemptResult::Retry {
                after_ms: Some(1500),
            },
            AttemptResult::Permanent,
            AttemptResult::Deferred {
                after_ms: 100,
                reason: "breaker_open",
            },
            AttemptResult::Duplicate,
            AttemptResult::ConditionFalse,
            AttemptResult::Enqueued {
                queue: "q\"1".into(),
                job: "1-0".into(),
            },
        ];
        let at = chrono::DateTime::from_timestamp(1_700_000_000, 123_456_789).unwrap();
        for result in results {
            for (status, error) in [(None, None), (Some(503), Some("bad \u{1} \"gateway\""))] {
                let a = Attempt {
                    attempt: 3,
                    at,
                    duration_ms: 12,
                    status,
                    error: error.map(str::to_string),
                    result: result.clone(),
                };
                let d = Derived {
                    attempt: 3,
                    at,
                    duration_ms: 12,
                    status,
                    error,
                    result: &result,
                };
                assert_eq!(
                    serde_json::to_string(&a).unwrap(),
                    serde_json::to_string(&d).unwrap()
                );
            }
        }
    }

    #[test]
    fn retry_after_forms() {
        assert_eq!(parse_retry_after("3"), Some(Duration::from_secs(3)));
        assert_eq!(parse_retry_after("999999"), Some(Duration::from_secs(3600)));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
    }

    /// Issue 18, item 1: `dot_segment` finds exactly the paths the URL parser would change, in
    /// every spelling the parser takes for a dot segment; other dots are left alone.
    #[test]
    fn dot_segments_are_found_in_every_spelling_and_only_in_the_path() {
        let moved = [
            ("http://h/hooks/../end", ".."),
            ("http://h/hooks/./end", "."),
            ("http://h/hooks/%2e%2E/end", "%2e%2E"),
            ("http://h/hooks/.%2e/end", ".%2e"),
            ("http://h/hooks/%2E./end", "%2E."),
            ("http://h/hooks/%2e/end", "%2e"),
            ("http://h:8080/..", ".."),
            ("https://h/hooks/..", ".."),
            ("https://h/hooks/.", "."),
            ("http://h/hooks\\..\\end", ".."),
            ("http://h/hooks/.\t./end", ".\t."),
            ("http://h//..//x", ".."),
        ];
        for (url, segment) in moved {
            let found = dot_segment(url);
            let expected = segment.replace('\t', "");
            assert_eq!(found.as_deref(), Some(expected.as_str()), "{url:?}");
            let parsed = reqwest::Url::parse(url).unwrap();
            let raw = url.split_once("://").unwrap().1;
            let raw_path = &raw[raw.find(['/', '\\']).unwrap()..];
            assert_ne!(
                parsed.path(),
                raw_path,
                "{url:?} is not moved by the parser"
            );
        }
        let kept = [
            "http://h/hooks/a..b/end",
            "http://h/hooks/.../end",
            "http://h/hooks/%252e%252e/end",
            "http://h/hooks/.well-known/x",
            "http://h/hooks/.b",
            "http://h/hooks?x=../..",
            "http://h/hooks#../..",
            "http://h?..",
            "http://h/",
            "http://h:1/a/b%2Fc",
        ];
        for url in kept {
            assert_eq!(dot_segment(url), None, "{url:?}");
            let parsed = reqwest::Url::parse(url).unwrap();
            let raw = url.split_once("://").unwrap().1;
            let raw_path = raw
                .find('/')
                .map(|i| &raw[i..raw.find(['?', '#']).unwrap_or(raw.len())])
                .unwrap_or("/");
            assert_eq!(parsed.path(), raw_path, "{url:?}");
        }
        // Not a URL at all: nothing to say (the parser reports it).
        assert_eq!(dot_segment("no scheme"), None);
        assert_eq!(dot_segment("http://host-only"), None);

        // A static URL with a dot segment is a config error naming `url`.
        let w: ActionConfig = serde_json::from_value(serde_json::json!({
            "type": "webhook", "url": "http://127.0.0.1:9/a/../b"
        }))
        .unwrap();
        let issues = compile(&w, "observers[0].actions[0]", Secrets::Resolve).unwrap_err();
        assert_eq!(issues.len(), 1, "{issues:?}");
        assert_eq!(issues[0].location, "observers[0].actions[0].url");
        assert!(
            issues[0].message.contains("segment `..`"),
            "{}",
            issues[0].message
        );
    }
}
