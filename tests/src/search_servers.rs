//! Search clusters for the `search` layer's tests.
//!
//! * [`BulkServer`]: our own HTTP server in the test process that speaks the part of the
//!   Elasticsearch REST API the indexer uses — `_bulk` (NDJSON action/document pairs, an answer
//!   per item), `_index_template`, `_count` — and can refuse chosen items, answer whole
//!   requests with 429, or go away entirely (listener and every connection closed) and come
//!   back on the same port. No Elasticsearch can be installed on the project's machines; this
//!   is what lets the failure paths be driven exactly.
//! * [`Osmem`]: `osmem-server`, an in-memory OpenSearch-compatible server (installed by
//!   scripts/setup.sh), for a contract test of the real request and answer shapes of
//!   `_bulk`/`_search`/`_count` — an emulator, not proof against a cluster.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{post, put};
use serde_json::{json, Value};

/// What the bulk server holds and how it answers.
#[derive(Default)]
pub struct BulkState {
    /// Accepted documents by id: (index, source).
    pub docs: BTreeMap<String, (String, Value)>,
    /// How many times each document id was accepted.
    pub writes: HashMap<String, usize>,
    /// `_bulk` requests received (answered or refused).
    pub bulk_requests: usize,
    /// Items refused so far, by status.
    pub refused_items: HashMap<u16, usize>,
    /// Per document id: the statuses to answer its next items with (then 201).
    pub item_plan: HashMap<String, VecDeque<u16>>,
    /// Statuses to answer the next whole `_bulk` requests with (then the items are read).
    pub request_plan: VecDeque<u16>,
    /// `Retry-After` seconds sent with a planned 429.
    pub retry_after: Option<u64>,
    /// Whole requests refused so far.
    pub refused_requests: usize,
    /// Installed index templates by name.
    pub templates: HashMap<String, Value>,
    /// Required `Authorization` header; anything else is answered 401.
    pub auth: Option<String>,
    /// `Authorization` headers seen.
    pub auth_seen: Vec<Option<String>>,
}

/// See the module comment.
pub struct BulkServer {
    pub addr: SocketAddr,
    pub state: Arc<Mutex<BulkState>>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

fn error_body(kind: &str, reason: &str) -> Value {
    json!({"error": {"type": kind, "reason": reason}, "status": 400})
}

fn authorised(state: &mut BulkState, headers: &HeaderMap) -> bool {
    let got = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    state.auth_seen.push(got.clone());
    match &state.auth {
        Some(want) => got.as_deref() == Some(want.as_str()),
        None => true,
    }
}

async fn bulk(
    State(state): State<Arc<Mutex<BulkState>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut g = state.lock().unwrap();
    if !authorised(&mut g, &headers) {
        return (
            StatusCode::UNAUTHORIZED,
            axum::Json(error_body(
                "security_exception",
                "missing or wrong credentials",
            )),
        )
            .into_response();
    }
    g.bulk_requests += 1;
    let ct = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !ct.starts_with("application/x-ndjson") {
        return (
            StatusCode::NOT_ACCEPTABLE,
            axum::Json(error_body(
                "content_type",
                &format!("Content-Type header [{ct}] is not supported"),
            )),
        )
            .into_response();
    }
    if let Some(status) = g.request_plan.pop_front() {
        g.refused_requests += 1;
        let mut resp = (
            StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            axum::Json(error_body(
                "es_rejected_execution_exception",
                "rejected execution (planned by the test)",
            )),
        )
            .into_response();
        if let Some(s) = g.retry_after {
            resp.headers_mut()
                .insert("retry-after", s.to_string().parse().unwrap());
        }
        return resp;
    }
    let text = String::from_utf8_lossy(&body);
    if !text.ends_with('\n') {
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(error_body(
                "illegal_argument_exception",
                "The bulk request must be terminated by a newline [\\n]",
            )),
        )
            .into_response();
    }
    let lines: Vec<&str> = text.lines().collect();
    if !lines.len().is_multiple_of(2) {
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(error_body(
                "illegal_argument_exception",
                "an action line without its document",
            )),
        )
            .into_response();
    }
    let mut items = Vec::new();
    let mut errors = false;
    for pair in lines.chunks(2) {
        let (Ok(action), Ok(source)) = (
            serde_json::from_str::<Value>(pair[0]),
            serde_json::from_str::<Value>(pair[1]),
        ) else {
            return (
                StatusCode::BAD_REQUEST,
                axum::Json(error_body(
                    "x_content_parse_exception",
                    "a line is not JSON",
                )),
            )
                .into_response();
        };
        let Some(meta) = action.get("index") else {
            return (
                StatusCode::BAD_REQUEST,
                axum::Json(error_body(
                    "illegal_argument_exception",
                    "only `index` actions are expected",
                )),
            )
                .into_response();
        };
        let index = meta["_index"].as_str().unwrap_or("").to_string();
        let id = meta["_id"].as_str().unwrap_or("").to_string();
        if index.is_empty() || id.is_empty() || !source.is_object() {
            return (
                StatusCode::BAD_REQUEST,
                axum::Json(error_body(
                    "illegal_argument_exception",
                    "an item lacks _index, _id or an object source",
                )),
            )
                .into_response();
        }
        let status = g
            .item_plan
            .get_mut(&id)
            .and_then(VecDeque::pop_front)
            .unwrap_or(201);
        if status >= 300 {
            errors = true;
            *g.refused_items.entry(status).or_default() += 1;
            let kind = if status == 429 {
                "es_rejected_execution_exception"
            } else {
                "mapper_parsing_exception"
            };
            items.push(json!({"index": {"_index": index, "_id": id, "status": status,
                "error": {"type": kind, "reason": format!("refused by the test's plan ({status})")}}}));
        } else {
            *g.writes.entry(id.clone()).or_default() += 1;
            let created = g.docs.insert(id.clone(), (index.clone(), source)).is_none();
            let status = if created { 201 } else { 200 };
            items.push(
                json!({"index": {"_index": index, "_id": id, "status": status,
                "result": if created { "created" } else { "updated" }}}),
            );
        }
    }
    axum::Json(json!({"took": 1, "errors": errors, "items": items})).into_response()
}

async fn template(
    State(state): State<Arc<Mutex<BulkState>>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut g = state.lock().unwrap();
    if !authorised(&mut g, &headers) {
        return (
            StatusCode::UNAUTHORIZED,
            axum::Json(error_body(
                "security_exception",
                "missing or wrong credentials",
            )),
        )
            .into_response();
    }
    match serde_json::from_slice::<Value>(&body) {
        Ok(v) if v["index_patterns"].is_array() => {
            g.templates.insert(name, v);
            axum::Json(json!({"acknowledged": true})).into_response()
        }
        _ => (
            StatusCode::BAD_REQUEST,
            axum::Json(error_body("parse_exception", "bad template")),
        )
            .into_response(),
    }
}

async fn count(
    State(state): State<Arc<Mutex<BulkState>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut g = state.lock().unwrap();
    if !authorised(&mut g, &headers) {
        return (
            StatusCode::UNAUTHORIZED,
            axum::Json(error_body(
                "security_exception",
                "missing or wrong credentials",
            )),
        )
            .into_response();
    }
    let q: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let listener = q.pointer("/query/term/listener").and_then(Value::as_str);
    let n = g
        .docs
        .values()
        .filter(|(_, d)| listener.is_none_or(|l| d["listener"] == l))
        .count();
    axum::Json(json!({"count": n})).into_response()
}

impl BulkServer {
    pub async fn start() -> BulkServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind bulk server");
        let addr = listener.local_addr().expect("bulk server addr");
        let server = BulkServer {
            addr,
            state: Arc::new(Mutex::new(BulkState::default())),
            task: Mutex::new(None),
        };
        server.serve(listener);
        server
    }

    fn serve(&self, listener: tokio::net::TcpListener) {
        let app = axum::Router::new()
            .route("/_bulk", post(bulk))
            .route("/_index_template/{name}", put(template))
            .route("/{index}/_count", post(count))
            .layer(axum::extract::DefaultBodyLimit::max(64 << 20))
            .with_state(self.state.clone());
        // Our own accept loop, so `stop` can close every connection with the listener.
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let svc = hyper_util::service::TowerToHyperService::new(app.clone());
                conns.spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
                while conns.try_join_next().is_some() {}
            }
        });
        *self.task.lock().unwrap() = Some(task);
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// An outage: the listener and every open connection are closed (connections are refused
    /// until [`BulkServer::restart`]).
    pub async fn stop(&self) {
        let task = self.task.lock().unwrap().take();
        if let Some(t) = task {
            t.abort();
            let _ = t.await;
        }
    }

    /// Back on the same port, with the same documents.
    pub async fn restart(&self) {
        let mut tries = 0;
        let listener = loop {
            match tokio::net::TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) if tries < 50 => {
                    tries += 1;
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("rebind {}: {e}", self.addr),
            }
        };
        self.serve(listener);
    }

    /// Ids of the accepted documents.
    pub fn ids(&self) -> Vec<String> {
        self.state.lock().unwrap().docs.keys().cloned().collect()
    }
}

impl Drop for BulkServer {
    fn drop(&mut self) {
        if let Some(t) = self.task.lock().unwrap().take() {
            t.abort();
        }
    }
}

/// A running `osmem-server` (see the module comment); stopped on drop.
pub struct Osmem {
    pub url: String,
    child: tokio::process::Child,
}

impl Osmem {
    /// Where the binary is: `OSMEM_SERVER_BIN`, else the venv scripts/setup.sh installs.
    pub fn binary() -> Option<PathBuf> {
        if let Some(p) = std::env::var_os("OSMEM_SERVER_BIN") {
            return Some(PathBuf::from(p));
        }
        let lib = crate::workspace_root().join("target/osmem-venv/lib");
        let entries = std::fs::read_dir(&lib).ok()?;
        entries
            .filter_map(Result::ok)
            .map(|e| e.path().join("site-packages/osmem_server/bin/osmem-server"))
            .find(|p| p.exists())
    }

    pub async fn start(bin: &std::path::Path) -> Osmem {
        use tokio::io::AsyncBufReadExt;
        let mut child = tokio::process::Command::new(bin)
            .args(["-addr", "127.0.0.1:0"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start osmem-server");
        let stdout = child.stdout.take().expect("osmem stdout");
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
            .await
            .expect("osmem-server prints its URL")
            .expect("read osmem stdout")
            .expect("a line");
        let v: Value = serde_json::from_str(&line).expect("osmem's first line is JSON");
        let url = v["url"].as_str().expect("url").to_string();
        Osmem { url, child }
    }
}

impl Drop for Osmem {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}
