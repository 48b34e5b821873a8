//! Enrichment lookups (`[[observers.enrich]]`): compiled once with their observer, run by the
//! core executor once per dispatch before the observer's actions, and read by its condition and
//! templates as `enrich.<name>`.
//!
//! A lookup is an HTTP GET (a JSON body is the result, 404 is `null`) or a SQL query (its first
//! row as a JSON object, no row is `null`). Results go through a [`LookupCache`]: [`NoCache`]
//! when the `caching` layer is off, the Redis backend of `observer-features` when it is on. The
//! cache is an optimisation only: its errors are counted and the lookup runs uncached.
//!
//! Failure semantics: a lookup that fails (timeout, connection error, a non-2xx answer other
//! than 404, a body that is not JSON or larger than `[outbound] max_response_bytes`, a SQL
//! error) fails the whole dispatch of its observer as a retryable attempt naming the lookup; no
//! action runs on missing data. A destination refused by the outbound guard
//! ([`crate::outbound`]) is a permanent failure instead: retrying cannot change the answer.

use std::time::{Duration, Instant};

use serde_json::{Map, Value};

use crate::action::ActionContext;
use crate::event::ChangeEvent;
use crate::path::Scope;
use crate::template::{Target, Template};

/// Where cached lookup results live. Keys are the rendered `key` templates; values are JSON
/// (`null` for "not found"). Implementations must be cheap to call concurrently.
#[async_trait::async_trait]
pub trait LookupCache: Send + Sync {
    /// The cached value: `Ok(None)` when not cached, `Ok(Some(Value::Null))` for a cached
    /// "not found". An `Err` is a cache failure (the caller runs the lookup uncached).
    async fn get(&self, key: &str) -> Result<Option<Value>, String>;
    /// Stores `value` for `ttl`. A backend may decline to store `null` (`[caching]
    /// cache_misses = false`).
    async fn put(&self, key: &str, value: &Value, ttl: Duration) -> Result<(), String>;
    /// False for the null backend: nothing is counted as a hit or a miss.
    fn active(&self) -> bool {
        true
    }
}

/// The null backend: nothing is cached, every lookup runs (the `caching` layer off).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoCache;

#[async_trait::async_trait]
impl LookupCache for NoCache {
    async fn get(&self, _key: &str) -> Result<Option<Value>, String> {
        Ok(None)
    }

    async fn put(&self, _key: &str, _value: &Value, _ttl: Duration) -> Result<(), String> {
        Ok(())
    }

    fn active(&self) -> bool {
        false
    }
}

/// What a lookup queries.
#[derive(Debug)]
pub enum Source {
    /// GET this URL. `secret`: it was written with a `${env:…}`/`${file:…}` reference, so
    /// messages never show it.
    Http { url: Template, secret: bool },
    /// `SELECT to_jsonb(q) FROM (<query>) q LIMIT 1`, the parameters passed as text.
    Sql {
        statement: String,
        params: Vec<Template>,
    },
}

impl Source {
    /// The `source` label of `observer_enrich_duration_seconds`.
    pub fn kind(&self) -> &'static str {
        match self {
            Source::Http { .. } => "http",
            Source::Sql { .. } => "sql",
        }
    }
}

/// One compiled `[[observers.enrich]]` entry.
#[derive(Debug)]
pub struct Enricher {
    pub name: String,
    pub key: Template,
    pub ttl: Duration,
    pub source: Source,
    pub timeout: Duration,
}

/// The lookup results of one observer for one event, by lookup name.
pub type Results = Map<String, Value>;

/// A lookup that failed; the message names the lookup.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct LookupError {
    pub message: String,
    /// Retrying cannot help (the outbound guard refused the destination).
    pub permanent: bool,
}

/// Runs `enrichers` in order for `event` (each may read the results of the ones before it).
/// Returns the results by name, or the first failure.
pub async fn run(
    enrichers: &[Enricher],
    ctx: &ActionContext,
    event: &ChangeEvent,
    observer: &str,
) -> Result<Results, LookupError> {
    let mut results = Results::new();
    for e in enrichers {
        let value = {
            let scope = Scope {
                event,
                observer: Some(observer),
                idempotency_key: None,
                enrich: Some(&results),
            };
            e.lookup(ctx, &scope).await?
        };
        results.insert(e.name.clone(), value);
    }
    Ok(results)
}

impl Enricher {
    /// One lookup through the cache.
    async fn lookup(&self, ctx: &ActionContext, scope: &Scope<'_>) -> Result<Value, LookupError> {
        let fail = |(m, permanent): (String, bool)| LookupError {
            message: format!("enrich `{}`: {m}", self.name),
            permanent,
        };
        let key = self
            .key
            .render(scope)
            .map_err(|e| fail((format!("key template: {e}"), false)))?;
        let cache = ctx.cache.as_ref();
        let mut cache_ok = cache.active();
        if cache_ok {
            let started = Instant::now();
            match cache.get(&key).await {
                Ok(Some(v)) => {
                    ctx.metrics.record_cache(true);
                    ctx.metrics
                        .enrich_duration
                        .with_label_values(&["cache"])
                        .observe(started.elapsed().as_secs_f64());
                    return Ok(v);
                }
                Ok(None) => ctx.metrics.record_cache(false),
                Err(e) => {
                    // The cache is an optimisation: count it, look up uncached, skip the put
                    // (it would most likely wait out the same trouble). The backend logs the
                    // outage once; per lookup it is only a debug line.
                    ctx.metrics.cache_errors.inc();
                    tracing::debug!(lookup = %self.name, error = %e, "lookup cache failed; looked up uncached");
                    cache_ok = false;
                }
            }
        }
        let started = Instant::now();
        let value = match &self.source {
            Source::Http { url, secret } => self.http(ctx, url, *secret, scope).await,
            Source::Sql { statement, params } => self
                .sql(ctx, statement, params, scope)
                .await
                .map_err(|m| (m, false)),
        }
        .map_err(fail)?;
        ctx.metrics
            .enrich_duration
            .with_label_values(&[self.source.kind()])
            .observe(started.elapsed().as_secs_f64());
        if cache_ok {
            if let Err(e) = cache.put(&key, &value, self.ttl).await {
                ctx.metrics.cache_errors.inc();
                tracing::warn!(lookup = %self.name, error = %e, "cannot store a lookup result in the cache");
            }
        }
        Ok(value)
    }

    async fn http(
        &self,
        ctx: &ActionContext,
        url: &Template,
        secret: bool,
        scope: &Scope<'_>,
    ) -> Result<Value, (String, bool)> {
        let url = url
            .render(scope)
            .map_err(|e| (format!("http template: {e}"), false))?;
        let shown = crate::action::shown_url(&url, secret);
        // A URL that is not one, one whose path would change on parsing, or a refused
        // destination, is permanent: retrying cannot help.
        if let Some(segment) = crate::action::dot_segment(&url) {
            return Err((
                format!("GET {}", crate::action::dot_segment_error(&shown, &segment)),
                true,
            ));
        }
        let url = reqwest::Url::parse(&url)
            .map_err(|e| (format!("GET {shown}: not a URL: {e}"), true))?;
        ctx.guard
            .check_url(&url)
            .map_err(|r| (format!("GET {shown}: {r}"), true))?;
        let limit = ctx.max_response_bytes;
        let request = async {
            let mut resp = ctx
                .http
                .get(url)
                .header(reqwest::header::ACCEPT, "application/json")
                .send()
                .await
                .map_err(|e| {
                    if let Some(r) = crate::outbound::refusal(&e) {
                        return (format!("GET {shown}: {r}"), true);
                    }
                    let e = e.without_url();
                    let m = if e.is_connect() {
                        format!("GET {shown}: cannot connect: {}", crate::error_chain(&e))
                    } else {
                        format!("GET {shown}: {}", crate::error_chain(&e))
                    };
                    (m, false)
                })?;
            let retryable = |m: String| (m, false);
            let status = resp.status();
            if status == reqwest::StatusCode::NOT_FOUND {
                crate::action::drain(resp).await;
                return Ok(Value::Null);
            }
            if !status.is_success() {
                let excerpt: String = crate::action::drain(resp).await.chars().take(200).collect();
                return Err(retryable(format!(
                    "GET {shown}: HTTP {}: {excerpt}",
                    status.as_u16()
                )));
            }
            // A declared length over the cap fails before anything is read.
            if let Some(n) = resp.content_length().filter(|n| *n > limit as u64) {
                return Err(retryable(format!(
                    "GET {shown}: the body ({n} bytes) is larger than outbound.max_response_bytes ({limit})"
                )));
            }
            let mut body = Vec::new();
            while let Some(chunk) = resp.chunk().await.map_err(|e| {
                retryable(format!(
                    "GET {shown}: reading the body: {}",
                    e.without_url()
                ))
            })? {
                if body.len() + chunk.len() > limit {
                    return Err(retryable(format!(
                        "GET {shown}: the body is larger than outbound.max_response_bytes ({limit})"
                    )));
                }
                body.extend_from_slice(&chunk);
            }
            if body.iter().all(u8::is_ascii_whitespace) {
                return Ok(Value::Null);
            }
            serde_json::from_slice(&body)
                .map_err(|e| retryable(format!("GET {shown}: the body is not JSON: {e}")))
        };
        tokio::time::timeout(self.timeout, request)
            .await
            .unwrap_or_else(|_| {
                Err((
                    format!(
                        "GET {shown}: timed out after {} ms",
                        self.timeout.as_millis()
                    ),
                    false,
                ))
            })
    }

    async fn sql(
        &self,
        ctx: &ActionContext,
        statement: &str,
        params: &[Template],
        scope: &Scope<'_>,
    ) -> Result<Value, String> {
        let mut values = Vec::with_capacity(params.len());
        for (i, p) in params.iter().enumerate() {
            values.push(TextParam(
                p.render(scope)
                    .map_err(|e| format!("params[{i}] template: {e}"))?,
            ));
        }
        let query =
            async {
                let client = ctx
                    .pool
                    .get()
                    .await
                    .map_err(|e| format!("database pool: {e}"))?;
                let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = values
                    .iter()
                    .map(|v| v as &(dyn tokio_postgres::types::ToSql + Sync))
                    .collect();
                let row = client.query_opt(statement, &refs).await.map_err(|e| {
                    match e.as_db_error() {
                        Some(db) => {
                            format!("query failed: {} ({})", db.message(), db.code().code())
                        }
                        None => format!("query failed: {}", crate::error_chain(&e)),
                    }
                })?;
                match row {
                    None => Ok(Value::Null),
                    Some(r) => r
                        .try_get::<_, Value>(0)
                        .map_err(|e| format!("reading the row: {e}")),
                }
            };
        tokio::time::timeout(self.timeout, query)
            .await
            .unwrap_or_else(|_| {
                Err(format!(
                    "query timed out after {} ms",
                    self.timeout.as_millis()
                ))
            })
    }
}

/// A query parameter sent in text format, so Postgres parses it as whatever type the query
/// gives `$n` (as psql does): `WHERE id = $1` works for a `bigint` id with a text template.
#[derive(Debug)]
struct TextParam(String);

impl tokio_postgres::types::ToSql for TextParam {
    fn to_sql(
        &self,
        _ty: &tokio_postgres::types::Type,
        out: &mut tokio_postgres::types::private::BytesMut,
    ) -> Result<tokio_postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        out.extend_from_slice(self.0.as_bytes());
        Ok(tokio_postgres::types::IsNull::No)
    }

    fn accepts(_ty: &tokio_postgres::types::Type) -> bool {
        true
    }

    fn encode_format(&self, _ty: &tokio_postgres::types::Type) -> tokio_postgres::types::Format {
        tokio_postgres::types::Format::Text
    }

    tokio_postgres::types::to_sql_checked!();
}

/// The statement a `sql` lookup runs: its first row as one JSON object.
pub fn sql_statement(query: &str) -> String {
    let q = query.trim().trim_end_matches(';').trim_end();
    format!("SELECT to_jsonb(q) FROM ({q}) q LIMIT 1")
}

/// The highest `$n` in `query`, ignoring quoted strings, identifiers and comments.
pub fn max_param(query: &str) -> usize {
    let b = query.as_bytes();
    let mut i = 0;
    let mut max = 0;
    while i < b.len() {
        match b[i] {
            q @ (b'\'' | b'"') => {
                i += 1;
                while i < b.len() && b[i] != q {
                    i += 1;
                }
            }
            b'-' if b.get(i + 1) == Some(&b'-') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                i += 2;
                while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                    i += 1;
                }
                i += 1;
            }
            b'$' => {
                let start = i + 1;
                let mut j = start;
                while j < b.len() && b[j].is_ascii_digit() {
                    j += 1;
                }
                // `$1` is a parameter; `$tag$`/`$$` start dollar quoting, and a digit run
                // directly after an identifier character is part of the identifier.
                let after_ident = i > 0 && (b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_');
                if j > start && !after_ident {
                    if let Ok(n) = query[start..j].parse::<usize>() {
                        max = max.max(n);
                    }
                } else if !after_ident {
                    // Dollar-quoted string: skip to the closing tag.
                    let mut k = start;
                    while k < b.len() && (b[k].is_ascii_alphanumeric() || b[k] == b'_') {
                        k += 1;
                    }
                    if b.get(k) == Some(&b'$') {
                        let tag = &query[i..=k];
                        match query[k + 1..].find(tag) {
                            Some(end) => {
                                i = k + 1 + end + tag.len();
                                continue;
                            }
                            None => return max,
                        }
                    }
                }
                i = j.max(i + 1);
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    max
}

/// Collects the issues of one enrich entry.
struct Issues<'a> {
    loc: String,
    list: &'a mut Vec<crate::observer::ConfigIssue>,
}

impl Issues<'_> {
    fn at(&mut self, field: &str, message: String) {
        let location = if field.is_empty() {
            self.loc.clone()
        } else {
            format!("{}.{field}", self.loc)
        };
        self.list
            .push(crate::observer::ConfigIssue { location, message });
    }

    /// Parses a template; it may read the lookups before this one (they run in order).
    fn template(
        &mut self,
        field: &str,
        src: &str,
        target: Target,
        earlier: &[&str],
    ) -> Option<Template> {
        self.checked(field, Template::parse(src, target), earlier)
    }

    /// Checks a parsed template's `enrich.…` references (or reports why it did not parse).
    fn checked(
        &mut self,
        field: &str,
        parsed: Result<Template, crate::template::TemplateError>,
        earlier: &[&str],
    ) -> Option<Template> {
        match parsed {
            Ok(t) => {
                for p in t.paths() {
                    if let Some(n) = p.enrich_name() {
                        if !earlier.contains(&n) {
                            self.at(
                                field,
                                format!("`{p}` reads no earlier enrich entry of this observer (lookups run in order and may read only the ones before them)"),
                            );
                        }
                    }
                }
                Some(t)
            }
            Err(err) => {
                self.at(field, err.to_string());
                None
            }
        }
    }
}

/// Whether `name` can be read as `enrich.<name>`.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Compiles the `[[observers.enrich]]` entries of one observer (`at` is its location). Every
/// problem is returned with its location.
pub fn compile(
    entries: &[crate::config::EnrichConfig],
    at: &str,
    default_ttl_secs: u64,
    mode: crate::action::Secrets,
) -> Result<Vec<Enricher>, Vec<crate::observer::ConfigIssue>> {
    let mut list = Vec::new();
    let mut out: Vec<Enricher> = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let mut issues = Issues {
            loc: format!("{at}.enrich[{i}] \"{}\"", e.name),
            list: &mut list,
        };
        let earlier: Vec<&str> = entries[..i].iter().map(|o| o.name.as_str()).collect();
        if !valid_name(&e.name) {
            issues.at(
                "name",
                "must be 1-64 letters, digits or `_`, not starting with a digit (it is read as `enrich.<name>`)".into(),
            );
        }
        if earlier.contains(&e.name.as_str()) {
            issues.at(
                "name",
                "another enrich entry of this observer has this name".into(),
            );
        }
        let key = if e.key.trim().is_empty() {
            issues.at(
                "key",
                "is empty: the cache key must identify what is looked up, e.g. `user:{{ data.user_id }}`".into(),
            );
            None
        } else {
            issues.template("key", &e.key, Target::Text, &earlier)
        };
        let source = match (&e.http, &e.sql) {
            (Some(url), None) => {
                if !e.params.is_empty() {
                    issues.at("params", "is only used with `sql`".into());
                }
                let parsed =
                    crate::action::secret_template(url, "http", Target::UrlComponent, mode);
                // As it renders when it parsed; as written (a reference may supply the start)
                // when it did not.
                let start = match &parsed {
                    Ok(t) => t.literal_text("{{}}"),
                    Err(_) if url.starts_with("${") => "http://".into(),
                    Err(_) => url.clone(),
                };
                if !(start.starts_with("http://") || start.starts_with("https://")) {
                    issues.at("http", "must start with http:// or https://".into());
                }
                issues
                    .checked("http", parsed, &earlier)
                    .map(|t| Source::Http {
                        url: t,
                        secret: url.contains("${"),
                    })
            }
            (None, Some(query)) => {
                let params: Vec<Template> = e
                    .params
                    .iter()
                    .enumerate()
                    .filter_map(|(j, p)| {
                        issues.template(&format!("params[{j}]"), p, Target::Text, &earlier)
                    })
                    .collect();
                let used = max_param(query);
                if query.trim().is_empty() {
                    issues.at("sql", "is empty".into());
                } else if used != e.params.len() {
                    issues.at(
                        "params",
                        format!(
                            "has {} entries but `sql` uses parameters up to ${used}: give one text template per `$n`",
                            e.params.len()
                        ),
                    );
                }
                (params.len() == e.params.len()).then(|| Source::Sql {
                    statement: sql_statement(query),
                    params,
                })
            }
            (Some(_), Some(_)) => {
                issues.at(
                    "",
                    "sets both `http` and `sql`: an enrich entry has exactly one".into(),
                );
                None
            }
            (None, None) => {
                issues.at(
                    "",
                    "sets neither `http` nor `sql`: an enrich entry has exactly one".into(),
                );
                None
            }
        };
        if e.timeout_ms == 0 || e.timeout_ms > 600_000 {
            issues.at(
                "timeout_ms",
                format!("{} is out of range: expected 1..=600000", e.timeout_ms),
            );
        }
        let ttl = e.ttl_secs.unwrap_or(default_ttl_secs);
        if e.ttl_secs.is_some() && !(1..=30 * 86_400).contains(&ttl) {
            issues.at(
                "ttl_secs",
                format!("{ttl} is out of range: expected 1..=2592000"),
            );
        }
        if let (Some(key), Some(source)) = (key, source) {
            out.push(Enricher {
                name: e.name.clone(),
                key,
                ttl: Duration::from_secs(ttl),
                source,
                timeout: Duration::from_millis(e.timeout_ms),
            });
        }
    }
    if list.is_empty() {
        Ok(out)
    } else {
        Err(list)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_parameters_outside_quotes_and_comments() {
        assert_eq!(max_param("SELECT 1"), 0);
        assert_eq!(max_param("SELECT * FROM u WHERE id = $1 AND t = $2"), 2);
        assert_eq!(max_param("SELECT '$3', \"$4\" FROM u WHERE id = $1"), 1);
        assert_eq!(
            max_param("SELECT $$ $9 $$ || $tag$ $8 $tag$, $2 -- $7\n"),
            2
        );
        assert_eq!(max_param("SELECT a$1 FROM t /* $5 */ WHERE x=$10"), 10);
    }

    #[test]
    fn messages_never_show_secret_urls_or_passwords() {
        assert_eq!(
            crate::action::shown_url("https://api.example.com/u/7?key=s3cret", true),
            "<url from a secret reference>"
        );
        let shown = crate::action::shown_url("https://bob:hunter2@api.example.com/u/7", false);
        assert!(!shown.contains("hunter2"), "{shown}");
        assert_eq!(
            crate::action::shown_url("http://127.0.0.1:9/u/7", false),
            "http://127.0.0.1:9/u/7"
        );
    }

    #[test]
    fn wraps_the_query_for_its_first_row() {
        assert_eq!(
            sql_statement(" SELECT email FROM users WHERE id = $1; "),
            "SELECT to_jsonb(q) FROM (SELECT email FROM users WHERE id = $1) q LIMIT 1"
        );
    }
}
