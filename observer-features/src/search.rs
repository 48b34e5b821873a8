//! The `search` layer's Elasticsearch side: a client for the three calls we make (`_bulk`,
//! `_search`, `_count`, plus the index template `migrate --search` installs) and the indexer
//! task that feeds the cluster from the Postgres audit trail (observer-core/src/audit.rs).
//!
//! The indexer is off the hot path by construction: the run loop's writer records each
//! completed event in `observer_audit` in the transaction that moves the checkpoint, and this
//! task tails that table by `id` on its own connection. Its position is a durable watermark
//! (one row per listener in `observer_search_index`) that moves only after every item of a bulk
//! request was accepted. So a slow or absent cluster never holds up a delivery, nothing is
//! buffered but the one batch in flight, and a gap after an outage is indexed again from
//! Postgres when the cluster is back. Items the cluster refuses are sent again (429 and 5xx
//! with backoff; any other refusal too, with the error kept in the watermark row for `status`),
//! never skipped. Document ids are `<listener>:<audit id>`, so sending a batch twice is
//! harmless.
//!
//! We speak the REST API with the process's reqwest (rustls, certificates verified) rather than
//! the official `elasticsearch` crate: that one is an alpha that brings a second HTTP stack and
//! native-tls (docs/architecture.md, "Search"). The same calls work against OpenSearch.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use observer_core::audit::{AuditQuery, AuditRecord};
use observer_core::config::{resolve_secret, SearchConfig};
use observer_core::schema::Objects;
use prometheus::{Gauge, IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

/// Why a call to the cluster failed. Messages name the URL (never its credentials).
#[derive(Debug, thiserror::Error)]
pub enum SearchError {
    #[error("search.{key}: {message}")]
    Config { key: &'static str, message: String },
    #[error("cannot reach the search cluster at {url}: {message}")]
    Unreachable { url: String, message: String },
    /// The cluster is overloaded or failing (429, 5xx): worth trying again later.
    #[error("the search cluster at {url} is busy or failing: HTTP {status}: {body}")]
    Busy {
        url: String,
        status: u16,
        body: String,
        retry_after: Option<Duration>,
    },
    #[error("the search cluster at {url} refused the request: HTTP {status}: {body}")]
    Refused {
        url: String,
        status: u16,
        body: String,
    },
    #[error("unexpected answer from the search cluster at {url}: {message}")]
    Answer { url: String, message: String },
}

impl SearchError {
    /// How long the cluster asked us to wait, when it did (`Retry-After` on a 429/503).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            SearchError::Busy { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

enum Auth {
    Basic { user: String, password: String },
    ApiKey(String),
}

/// One search cluster: where it is, how we authenticate, the index prefix.
pub struct Cluster {
    http: reqwest::Client,
    base: reqwest::Url,
    /// `base` without user info, for messages.
    shown: String,
    prefix: String,
    auth: Option<Auth>,
}

/// The result of one `_bulk` item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemResult {
    pub status: u16,
    /// The cluster's reason for a refused item.
    pub error: Option<String>,
}

impl ItemResult {
    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// One document of a `_bulk` request.
#[derive(Debug, Clone)]
pub struct BulkDoc {
    pub index: String,
    pub id: String,
    pub source: Value,
}

impl BulkDoc {
    pub fn of(prefix: &str, r: &AuditRecord) -> BulkDoc {
        BulkDoc {
            index: index_name(prefix, r.finished_at),
            id: r.document_id(),
            source: r.document(),
        }
    }
}

/// `<prefix>-YYYY.MM.DD` of the UTC day `at`.
pub fn index_name(prefix: &str, at: DateTime<Utc>) -> String {
    format!("{prefix}-{}", at.format("%Y.%m.%d"))
}

/// The NDJSON body of a `_bulk` request: one `index` action line and one source line per doc.
pub fn bulk_body(docs: &[BulkDoc]) -> String {
    let mut out = String::new();
    for d in docs {
        out.push_str(&json!({"index": {"_index": d.index, "_id": d.id}}).to_string());
        out.push('\n');
        out.push_str(&d.source.to_string());
        out.push('\n');
    }
    out
}

/// Reads a `_bulk` answer: one result per item, in order. Fails when the count does not match.
pub fn parse_bulk_answer(answer: &Value, sent: usize) -> Result<Vec<ItemResult>, String> {
    let items = answer
        .get("items")
        .and_then(Value::as_array)
        .ok_or("no `items` array")?;
    if items.len() != sent {
        return Err(format!("{} items answered for {sent} sent", items.len()));
    }
    items
        .iter()
        .map(|it| {
            let inner = it
                .as_object()
                .and_then(|o| o.values().next())
                .ok_or("an item is not an object")?;
            let status = inner
                .get("status")
                .and_then(Value::as_u64)
                .ok_or("an item has no status")? as u16;
            let error = inner.get("error").map(|e| {
                let kind = e.get("type").and_then(Value::as_str).unwrap_or("");
                let reason = e.get("reason").and_then(Value::as_str).unwrap_or("");
                match (kind, reason) {
                    ("", "") => excerpt(&e.to_string()),
                    _ => excerpt(&format!("{kind}: {reason}")),
                }
            });
            Ok(ItemResult { status, error })
        })
        .collect()
}

fn excerpt(s: &str) -> String {
    const MAX: usize = 300;
    if s.len() <= MAX {
        return s.to_string();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// The index template: date-based indices `<prefix>-*`, one shard, and a mapping in which
/// only our own fields are indexed (`dynamic: false`); the event data is full-text searched as
/// `data_text` and kept unindexed as `data`, so no event can break the mapping.
pub fn index_template(prefix: &str) -> Value {
    let kw = json!({"type": "keyword"});
    json!({
        "index_patterns": [format!("{prefix}-*")],
        "priority": 100,
        "template": {
            "settings": {"number_of_shards": 1},
            "mappings": {
                "dynamic": false,
                "properties": {
                    "audit_id": {"type": "long"},
                    "listener": kw,
                    "event_id": kw,
                    "change_log_pk": {"type": "long"},
                    "entity": kw,
                    "entity_key": kw,
                    "entity_id": kw,
                    "operation": kw,
                    "tenant_id": kw,
                    "event_at": {"type": "date"},
                    "finished_at": {"type": "date"},
                    "observers": kw,
                    "outcomes": kw,
                    "actions": {"type": "object", "enabled": false},
                    "data": {"type": "object", "enabled": false},
                    "data_text": {"type": "text"},
                    "text": {"type": "text"}
                }
            }
        }
    })
}

/// The `_search` body for `q`: newest first, the text in `text`, `data_text` and `entity_id`.
pub fn search_body(q: &AuditQuery) -> Value {
    let mut must = Vec::new();
    let text = q.text.trim();
    if !text.is_empty() {
        must.push(json!({"bool": {"should": [
            {"simple_query_string": {"query": text, "fields": ["text", "data_text"], "default_operator": "and"}},
            {"term": {"entity_id": text}}
        ], "minimum_should_match": 1}}));
    }
    let mut filter = Vec::new();
    if let Some(e) = &q.entity {
        filter.push(json!({"term": {"entity_key": e.to_lowercase()}}));
    }
    if let Some(s) = q.since {
        filter.push(json!({"range": {"finished_at": {"gte": s.to_rfc3339()}}}));
    }
    if let Some(o) = &q.outcome {
        filter.push(json!({"term": {"outcomes": o}}));
    }
    if let Some(l) = &q.listener {
        filter.push(json!({"term": {"listener": l}}));
    }
    json!({
        "size": q.limit,
        "sort": [{"finished_at": {"order": "desc"}}, {"audit_id": {"order": "desc"}}],
        "query": {"bool": {"must": must, "filter": filter}}
    })
}

impl Cluster {
    /// The cluster of `[search]`, with credentials resolved from their references and one
    /// reqwest client (rustls; the system's roots plus `ca_file`).
    pub fn from_config(cfg: &SearchConfig) -> Result<Cluster, SearchError> {
        let bad = |key: &'static str, message: String| SearchError::Config { key, message };
        let raw = cfg
            .url
            .as_deref()
            .ok_or_else(|| bad("url", "not set".into()))?;
        let url = resolve_secret(raw, "search.url").map_err(|e| bad("url", e.to_string()))?;
        let mut base =
            reqwest::Url::parse(&url).map_err(|e| bad("url", format!("not a URL: {e}")))?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(bad(
                "url",
                format!("scheme `{}` is not http or https", base.scheme()),
            ));
        }
        // Credentials in the URL are taken as basic auth and never shown.
        let mut auth = None;
        if !base.username().is_empty() {
            auth = Some(Auth::Basic {
                user: percent_decode(base.username()),
                password: percent_decode(base.password().unwrap_or("")),
            });
            let _ = base.set_username("");
            let _ = base.set_password(None);
        }
        if !base.path().ends_with('/') {
            let p = format!("{}/", base.path());
            base.set_path(&p);
        }
        let shown = base.as_str().trim_end_matches('/').to_string();
        if let (Some(user), Some(pw)) = (&cfg.username, &cfg.password) {
            let password = resolve_secret(pw, "search.password")
                .map_err(|e| bad("password", e.to_string()))?;
            auth = Some(Auth::Basic {
                user: user.clone(),
                password,
            });
        }
        if let Some(k) = &cfg.api_key {
            let key =
                resolve_secret(k, "search.api_key").map_err(|e| bad("api_key", e.to_string()))?;
            auth = Some(Auth::ApiKey(key));
        }
        let mut builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("fraiseql-observers/", env!("CARGO_PKG_VERSION")))
            .timeout(Duration::from_millis(cfg.request_timeout_ms.max(1)))
            .connect_timeout(Duration::from_millis(
                cfg.request_timeout_ms.clamp(1, 10_000),
            ));
        if let Some(path) = &cfg.ca_file {
            let pem = std::fs::read(path)
                .map_err(|e| bad("ca_file", format!("cannot read `{path}`: {e}")))?;
            let cert = reqwest::Certificate::from_pem(&pem)
                .map_err(|e| bad("ca_file", format!("`{path}` is not a PEM certificate: {e}")))?;
            builder = builder.add_root_certificate(cert);
        }
        let http = builder
            .build()
            .map_err(|e| bad("url", format!("cannot build the HTTP client: {e}")))?;
        Ok(Cluster {
            http,
            base,
            shown,
            prefix: cfg.index_prefix.clone(),
            auth,
        })
    }

    /// The cluster's URL without credentials.
    pub fn url(&self) -> &str {
        &self.shown
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let url = self.base.join(path).unwrap_or_else(|_| self.base.clone());
        let b = self.http.request(method, url);
        match &self.auth {
            Some(Auth::Basic { user, password }) => b.basic_auth(user, Some(password)),
            Some(Auth::ApiKey(k)) => b.header("authorization", format!("ApiKey {k}")),
            None => b,
        }
    }

    /// Sends a request and reads a JSON answer; non-2xx answers become errors.
    async fn call(&self, req: reqwest::RequestBuilder) -> Result<Value, SearchError> {
        let resp = req.send().await.map_err(|e| SearchError::Unreachable {
            url: self.shown.clone(),
            message: describe(&e),
        })?;
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let body = resp.text().await.map_err(|e| SearchError::Unreachable {
            url: self.shown.clone(),
            message: describe(&e),
        })?;
        if status == 429 || status >= 500 {
            return Err(SearchError::Busy {
                url: self.shown.clone(),
                status,
                body: excerpt(&body),
                retry_after,
            });
        }
        if !(200..300).contains(&status) {
            return Err(SearchError::Refused {
                url: self.shown.clone(),
                status,
                body: excerpt(&body),
            });
        }
        serde_json::from_str(&body).map_err(|e| SearchError::Answer {
            url: self.shown.clone(),
            message: format!("not JSON ({e}): {}", excerpt(&body)),
        })
    }

    /// Installs (or replaces) the index template `<prefix>`.
    pub async fn install_template(&self) -> Result<(), SearchError> {
        let req = self
            .request(
                reqwest::Method::PUT,
                &format!("_index_template/{}", self.prefix),
            )
            .json(&index_template(&self.prefix));
        let answer = self.call(req).await?;
        if answer.get("acknowledged").and_then(Value::as_bool) != Some(true) {
            return Err(SearchError::Answer {
                url: self.shown.clone(),
                message: format!(
                    "the index template was not acknowledged: {}",
                    excerpt(&answer.to_string())
                ),
            });
        }
        Ok(())
    }

    /// One `_bulk` request: every doc's result, in order.
    pub async fn bulk(&self, docs: &[BulkDoc]) -> Result<Vec<ItemResult>, SearchError> {
        let req = self
            .request(reqwest::Method::POST, "_bulk")
            .header("content-type", "application/x-ndjson")
            .body(bulk_body(docs));
        let answer = self.call(req).await?;
        parse_bulk_answer(&answer, docs.len()).map_err(|message| SearchError::Answer {
            url: self.shown.clone(),
            message: format!("bad _bulk answer: {message}"),
        })
    }

    /// Answers `q` from `<prefix>-*`, newest first.
    pub async fn search(&self, q: &AuditQuery) -> Result<Vec<AuditRecord>, SearchError> {
        let req = self
            .request(
                reqwest::Method::POST,
                &format!(
                    "{}-*/_search?ignore_unavailable=true&allow_no_indices=true",
                    self.prefix
                ),
            )
            .json(&search_body(q));
        let answer = self.call(req).await?;
        let hits = answer
            .pointer("/hits/hits")
            .and_then(Value::as_array)
            .ok_or_else(|| SearchError::Answer {
                url: self.shown.clone(),
                message: "no hits.hits in the _search answer".into(),
            })?;
        hits.iter()
            .map(|h| {
                let src = h.get("_source").unwrap_or(&Value::Null);
                AuditRecord::from_document(src).map_err(|e| SearchError::Answer {
                    url: self.shown.clone(),
                    message: format!("a hit is not one of our documents: {e}"),
                })
            })
            .collect()
    }

    /// Documents in `<prefix>-*` (of `listener`, when given).
    pub async fn count(&self, listener: Option<&str>) -> Result<u64, SearchError> {
        let query = match listener {
            Some(l) => json!({"query": {"term": {"listener": l}}}),
            None => json!({"query": {"match_all": {}}}),
        };
        let req = self
            .request(
                reqwest::Method::POST,
                &format!(
                    "{}-*/_count?ignore_unavailable=true&allow_no_indices=true",
                    self.prefix
                ),
            )
            .json(&query);
        let answer = self.call(req).await?;
        answer
            .get("count")
            .and_then(Value::as_u64)
            .ok_or_else(|| SearchError::Answer {
                url: self.shown.clone(),
                message: "no count in the _count answer".into(),
            })
    }
}

/// A reqwest error with its causes (the top level alone says only "error sending request").
fn describe(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The indexer's metrics, registered in the process registry.
#[derive(Clone)]
pub struct SearchMetrics {
    /// Documents the cluster accepted.
    pub indexed: IntCounter,
    /// Failed bulk requests (`request`) and refused items (`item`).
    pub failures: IntCounterVec,
    /// Bulk requests sent again after a failure.
    pub retries: IntCounter,
    /// Audit rows of this listener after the watermark.
    pub lag_rows: IntGauge,
    /// Age of the oldest audit row not yet indexed (0 when caught up).
    pub lag_seconds: Gauge,
    /// The watermark: the last audit id indexed.
    pub watermark: IntGauge,
}

impl SearchMetrics {
    pub fn register(registry: &Registry) -> SearchMetrics {
        let m = SearchMetrics {
            indexed: IntCounter::new(
                "observer_search_documents_indexed_total",
                "Audit documents the search cluster accepted",
            )
            .expect("metric"),
            failures: IntCounterVec::new(
                Opts::new(
                    "observer_search_bulk_failures_total",
                    "Failed _bulk requests (kind=request) and refused items (kind=item)",
                ),
                &["kind"],
            )
            .expect("metric"),
            retries: IntCounter::new(
                "observer_search_bulk_retries_total",
                "_bulk requests sent again after a failure",
            )
            .expect("metric"),
            lag_rows: IntGauge::new(
                "observer_search_indexer_lag_rows",
                "Audit rows of this listener not yet indexed",
            )
            .expect("metric"),
            lag_seconds: Gauge::new(
                "observer_search_indexer_lag_seconds",
                "Age of the oldest audit row not yet indexed (0 when caught up)",
            )
            .expect("metric"),
            watermark: IntGauge::new(
                "observer_search_indexer_watermark",
                "The last audit id indexed (observer_search_index.indexed_id)",
            )
            .expect("metric"),
        };
        for kind in ["request", "item"] {
            m.failures.with_label_values(&[kind]);
        }
        // Registered once per process; a second registration (a test building two) is harmless.
        let _ = registry.register(Box::new(m.indexed.clone()));
        let _ = registry.register(Box::new(m.failures.clone()));
        let _ = registry.register(Box::new(m.retries.clone()));
        let _ = registry.register(Box::new(m.lag_rows.clone()));
        let _ = registry.register(Box::new(m.lag_seconds.clone()));
        let _ = registry.register(Box::new(m.watermark.clone()));
        m
    }
}

/// The indexer task of one listener.
pub struct Indexer {
    pub cluster: Arc<Cluster>,
    pub pg: tokio_postgres::Config,
    pub tls: observer_core::tls::PgTls,
    pub objects: Arc<Objects>,
    pub listener: String,
    pub batch_size: usize,
    pub poll: Duration,
    pub max_backoff: Duration,
    pub metrics: SearchMetrics,
    /// 1 while this process leads its listener: a standby does not index (its leader does).
    pub leader: IntGauge,
}

/// What went wrong in one indexer step (kept in the watermark row and logged).
#[derive(Debug, thiserror::Error)]
enum StepError {
    #[error("database: {0}")]
    Db(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Cluster(#[from] SearchError),
    #[error("{0}")]
    Items(String),
}

const FIRST_BACKOFF: Duration = Duration::from_millis(200);

impl Indexer {
    /// Runs until `shutdown`: connects, then indexes batch after batch. A failure of the
    /// database or the cluster is retried with backoff; the task never ends on one.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut backoff = FIRST_BACKOFF;
        loop {
            if shutdown.is_cancelled() {
                return;
            }
            let err = match self.connect().await {
                Ok(client) => match self.serve(&client, &shutdown).await {
                    Ok(()) => return,
                    Err(e) => e,
                },
                Err(e) => StepError::Db(e),
            };
            tracing::warn!(error = %err, cluster = %self.cluster.url(), "search indexer: database connection lost; reconnecting");
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(self.max_backoff);
        }
    }

    async fn connect(&self) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let (client, conn) = self.pg.connect(self.tls.clone()).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "search indexer connection closed");
            }
        });
        Ok(client)
    }

    /// Indexes until shutdown; returns `Err` only when the database connection fails.
    async fn serve(
        &self,
        client: &tokio_postgres::Client,
        shutdown: &CancellationToken,
    ) -> Result<(), StepError> {
        let wm_table = self.objects.search_index.sql();
        client
            .execute(
                &format!(
                    "INSERT INTO {wm_table} (listener_id, backend, target) VALUES ($1, 'elasticsearch', $2)
                     ON CONFLICT (listener_id) DO UPDATE SET backend = 'elasticsearch', target = $2, updated_at = now()"
                ),
                &[&self.listener, &self.cluster.url()],
            )
            .await?;
        let read = format!(
            "SELECT {} FROM {} WHERE listener_id = $1 AND id > $2 ORDER BY id LIMIT $3",
            observer_core::audit::COLUMNS,
            self.objects.audit.sql()
        );
        let lag = format!(
            "SELECT count(*), min(finished_at) FROM (SELECT finished_at FROM {} WHERE listener_id = $1 AND id > $2 ORDER BY id LIMIT 10000000) t",
            self.objects.audit.sql()
        );
        let advance = format!(
            "UPDATE {wm_table} SET indexed_id = GREATEST(indexed_id, $2), documents = documents + $3,
                    indexed_at = now(), last_error = NULL, last_error_at = NULL, updated_at = now()
             WHERE listener_id = $1 RETURNING indexed_id"
        );
        let note_error = format!(
            "UPDATE {wm_table} SET last_error = $2, last_error_at = now(), updated_at = now() WHERE listener_id = $1"
        );
        loop {
            if shutdown.is_cancelled() {
                return Ok(());
            }
            if self.leader.get() != 1 {
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(self.poll) => continue,
                }
            }
            let wm: i64 = client
                .query_one(
                    &format!("SELECT indexed_id FROM {wm_table} WHERE listener_id = $1"),
                    &[&self.listener],
                )
                .await?
                .get(0);
            self.metrics.watermark.set(wm);
            let lag_row = client.query_one(&lag, &[&self.listener, &wm]).await?;
            let behind: i64 = lag_row.get(0);
            let oldest: Option<DateTime<Utc>> = lag_row.get(1);
            self.metrics.lag_rows.set(behind);
            self.metrics.lag_seconds.set(
                oldest
                    .map(|t| ((Utc::now() - t).num_milliseconds() as f64 / 1000.0).max(0.0))
                    .unwrap_or(0.0),
            );
            let limit = self.batch_size.max(1) as i64;
            let rows = client.query(&read, &[&self.listener, &wm, &limit]).await?;
            if rows.is_empty() {
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(self.poll) => continue,
                }
            }
            let mut docs = Vec::with_capacity(rows.len());
            let mut last = wm;
            for r in &rows {
                let rec = observer_core::audit::AuditRecord::from_row(r)?;
                last = last.max(rec.audit_id);
                docs.push(BulkDoc::of(self.cluster.prefix(), &rec));
            }
            match self.send_all(docs, client, &note_error, shutdown).await? {
                None => return Ok(()),
                Some(n) => {
                    let row = client
                        .query_one(&advance, &[&self.listener, &last, &(n as i64)])
                        .await?;
                    self.metrics.watermark.set(row.get(0));
                }
            }
        }
    }

    /// Sends `docs` until every one was accepted: `Some(count)`, or `None` on shutdown. Only
    /// the items still refused are sent again, after a backoff (the cluster's `Retry-After`
    /// when it gave one).
    async fn send_all(
        &self,
        mut docs: Vec<BulkDoc>,
        client: &tokio_postgres::Client,
        note_error: &str,
        shutdown: &CancellationToken,
    ) -> Result<Option<usize>, StepError> {
        let total = docs.len();
        let mut backoff = FIRST_BACKOFF;
        let mut failures = 0u32;
        loop {
            let err = match self.cluster.bulk(&docs).await {
                Ok(items) => {
                    let mut refused = Vec::new();
                    let mut first_error = None;
                    let mut accepted = 0u64;
                    for (doc, item) in docs.into_iter().zip(items) {
                        if item.ok() {
                            accepted += 1;
                        } else {
                            if first_error.is_none() {
                                first_error = Some(format!(
                                    "document {} refused: HTTP {}: {}",
                                    doc.id,
                                    item.status,
                                    item.error.as_deref().unwrap_or("no reason given")
                                ));
                            }
                            refused.push(doc);
                        }
                    }
                    self.metrics.indexed.inc_by(accepted);
                    if refused.is_empty() {
                        if failures > 0 {
                            tracing::info!(cluster = %self.cluster.url(), failed_attempts = failures, "search indexer: batch indexed after retries");
                        }
                        return Ok(Some(total));
                    }
                    self.metrics
                        .failures
                        .with_label_values(&["item"])
                        .inc_by(refused.len() as u64);
                    docs = refused;
                    StepError::Items(format!(
                        "{} of the batch refused; first: {}",
                        docs.len(),
                        first_error.unwrap_or_default()
                    ))
                }
                Err(e) => {
                    self.metrics.failures.with_label_values(&["request"]).inc();
                    if let Some(after) = e.retry_after() {
                        backoff = backoff.max(after.min(self.max_backoff));
                    }
                    StepError::Cluster(e)
                }
            };
            failures += 1;
            let text = err.to_string();
            if failures == 1 || failures.is_power_of_two() {
                tracing::warn!(error = %text, failed_attempts = failures, retry_in_ms = backoff.as_millis() as u64,
                    "search indexer: the batch is sent again (the watermark stays; deliveries are not affected)");
            }
            client.execute(note_error, &[&self.listener, &text]).await?;
            self.metrics.retries.inc();
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(None),
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(self.max_backoff);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bulk_body_is_action_and_source_lines() {
        let docs = vec![
            BulkDoc {
                index: "p-2026.12.02".into(),
                id: "l:1".into(),
                source: json!({"a": 1}),
            },
            BulkDoc {
                index: "p-2026.12.02".into(),
                id: "l:2".into(),
                source: json!({"a": "x\ny"}),
            },
        ];
        let body = bulk_body(&docs);
        let lines: Vec<&str> = body.lines().collect();
        assert_eq!(lines.len(), 4);
        assert_eq!(
            serde_json::from_str::<Value>(lines[0]).unwrap(),
            json!({"index": {"_index": "p-2026.12.02", "_id": "l:1"}})
        );
        assert_eq!(
            serde_json::from_str::<Value>(lines[3]).unwrap(),
            json!({"a": "x\ny"})
        );
        assert!(body.ends_with('\n'));
    }

    #[test]
    fn a_bulk_answer_gives_each_item_its_status_and_reason() {
        let answer = json!({"errors": true, "items": [
            {"index": {"_id": "a", "status": 201}},
            {"index": {"_id": "b", "status": 429, "error": {"type": "es_rejected_execution_exception", "reason": "queue full"}}}
        ]});
        let items = parse_bulk_answer(&answer, 2).unwrap();
        assert!(items[0].ok());
        assert_eq!(items[1].status, 429);
        assert_eq!(
            items[1].error.as_deref(),
            Some("es_rejected_execution_exception: queue full")
        );
        assert!(parse_bulk_answer(&answer, 3).is_err());
        assert!(parse_bulk_answer(&json!({}), 0).is_err());
    }

    #[test]
    fn indices_are_named_by_utc_day() {
        let at = DateTime::parse_from_rfc3339("2026-12-01T23:59:59-02:00")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(index_name("audit", at), "audit-2026.12.02");
    }

    #[test]
    fn credentials_in_the_url_are_taken_out_of_it() {
        let cfg = SearchConfig {
            url: Some("https://elastic:s%40cret@es.example:9200".into()),
            ..SearchConfig::default()
        };
        let c = Cluster::from_config(&cfg).unwrap();
        assert_eq!(c.url(), "https://es.example:9200");
        match &c.auth {
            Some(Auth::Basic { user, password }) => {
                assert_eq!(user, "elastic");
                assert_eq!(password, "s@cret");
            }
            _ => panic!("basic auth from the URL"),
        }
    }

    #[test]
    fn the_query_filters_what_was_asked() {
        let q = AuditQuery {
            text: "42".into(),
            entity: Some("Order".into()),
            outcome: Some("dead_lettered".into()),
            limit: 5,
            ..AuditQuery::default()
        };
        let b = search_body(&q);
        assert_eq!(b["size"], 5);
        let f = b.pointer("/query/bool/filter").unwrap().as_array().unwrap();
        assert!(f.contains(&json!({"term": {"entity_key": "order"}})));
        assert!(f.contains(&json!({"term": {"outcomes": "dead_lettered"}})));
    }
}
