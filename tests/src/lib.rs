//! Shared harness of the end-to-end tests: a throw-away database per test ([`TestDb`]), a
//! recording HTTP receiver with programmable answers ([`Receiver`]), and the real daemon binary
//! run as a child process ([`Daemon`]). Nothing here mocks Postgres or HTTP.
//!
//! Postgres: `TEST_DATABASE_ADMIN_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`).
//! The binary is built once per test process with `cargo build -p observer-cli`.

pub mod metrics;

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

pub use observer_core::executor::idempotency_key;

pub mod action_helpers;
pub mod fault;
pub mod lookup;
pub mod nats_server;
pub mod redis_server;
pub mod search_servers;
pub mod tcp_proxy;

// ---------------------------------------------------------------------------------------------
// The binary
// ---------------------------------------------------------------------------------------------

/// The workspace root (parent of this crate).
/// The `[outbound]` body of test configs: loopback (IPv4 and IPv6) admitted.
pub const LOOPBACK_ALLOW: &str = "allow = [\"127.0.0.0/8\", \"::1\"]";

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// The `fraiseql-observers` binary, built once per test process.
pub fn binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let root = workspace_root();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = std::process::Command::new(cargo)
            .args(["build", "-p", "observer-cli", "--bin", "fraiseql-observers"])
            .current_dir(&root)
            .status()
            .expect("cannot run cargo build");
        assert!(status.success(), "cargo build -p observer-cli failed");
        let target = match std::env::var_os("CARGO_TARGET_DIR") {
            Some(t) => {
                let t = PathBuf::from(t);
                if t.is_absolute() {
                    t
                } else {
                    root.join(t)
                }
            }
            None => root.join("target"),
        };
        let bin = target.join("debug").join("fraiseql-observers");
        assert!(bin.exists(), "binary not found at {}", bin.display());
        bin
    })
}

/// A command for the binary with the environment cleaned of anything that would override a
/// test's config (DATABASE_URL, OBSERVER__*).
pub fn command() -> tokio::process::Command {
    let mut c = tokio::process::Command::new(binary());
    for (k, _) in std::env::vars() {
        if k.starts_with("OBSERVER__") || k == "DATABASE_URL" || k == "FRAISEQL_OBSERVERS_CONFIG" {
            c.env_remove(k);
        }
    }
    c.env("RUST_LOG", "info,tokio_postgres=warn");
    c.stdin(Stdio::null());
    c
}

/// Runs the binary to completion with `args`; output captured.
pub async fn run_cli(args: &[&str]) -> Output {
    let mut c = command();
    c.args(args);
    tokio::time::timeout(Duration::from_secs(60), c.output())
        .await
        .expect("CLI command timed out")
        .expect("cannot run the binary")
}

/// stdout + stderr of a finished command, for messages.
pub fn output_text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

// ---------------------------------------------------------------------------------------------
// Polling
// ---------------------------------------------------------------------------------------------

/// Polls `check` every 25 ms until it yields `Some`, or fails after `timeout` with `what`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A fresh temp directory for one test.
pub fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir()
        .join("fraiseql-observers-tests")
        .join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("create temp dir");
    d
}

fn unique_suffix() -> String {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let rand = uuid::Uuid::new_v4().simple().to_string();
    format!("{}_{}_{}", std::process::id(), n, &rand[..8])
}

// ---------------------------------------------------------------------------------------------
// Database
// ---------------------------------------------------------------------------------------------

/// The admin URL (a database we may CREATE/DROP DATABASE from).
pub fn admin_url() -> String {
    std::env::var("TEST_DATABASE_ADMIN_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// `url` with its database name replaced by `db`.
pub fn url_with_db(url: &str, db: &str) -> String {
    let (scheme, rest) = url
        .split_once("://")
        .expect("admin URL must be postgres://…");
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, format!("?{q}")),
        None => (rest, String::new()),
    };
    let authority = rest.split('/').next().unwrap_or(rest);
    format!("{scheme}://{authority}/{db}{query}")
}

/// Connects and drives the connection in the background.
pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {url}: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// A uniquely named database with our schema migrated and a captured `orders` table (entity
/// `Order`). Dropped WITH (FORCE) when the value is dropped.
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub dir: PathBuf,
    pub client: tokio_postgres::Client,
}

/// The demo business table.
pub const ORDERS_DDL: &str = "CREATE TABLE orders (
    id BIGINT PRIMARY KEY,
    status TEXT NOT NULL DEFAULT 'new',
    total NUMERIC NOT NULL DEFAULT 0,
    note TEXT,
    customer JSONB,
    tenant_id UUID
)";

impl TestDb {
    pub async fn new() -> TestDb {
        TestDb::with_options("").await
    }

    /// Like [`TestDb::new`], with `options` appended to `CREATE DATABASE` (e.g.
    /// `ENCODING 'SQL_ASCII' TEMPLATE template0`, a database that stores text bytes unchecked).
    pub async fn with_options(options: &str) -> TestDb {
        let name = format!("obs_test_{}", unique_suffix());
        let admin = connect(&admin_url()).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name} {options}"))
            .await
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
        let url = url_with_db(&admin_url(), &name);
        let dir = temp_dir(&name);
        let client = connect(&url).await;
        let db = TestDb {
            name,
            url,
            dir,
            client,
        };
        let out = db.cli(&["migrate"]).await;
        assert!(
            out.status.success(),
            "migrate failed: {}",
            output_text(&out)
        );
        db.client
            .batch_execute(ORDERS_DDL)
            .await
            .expect("create orders");
        let out = db
            .cli(&["capture", "add", "orders", "--entity", "Order"])
            .await;
        assert!(
            out.status.success(),
            "capture add failed: {}",
            output_text(&out)
        );
        db
    }

    /// `[database]`, then `rest`, then an `[outbound]` section admitting loopback (every test
    /// receiver listens there; the daemon refuses loopback destinations by default).
    pub fn config_raw(&self, rest: &str) -> String {
        self.config_outbound(LOOPBACK_ALLOW, rest)
    }

    /// `[database]`, then `rest`, then `[outbound]` with the given body (e.g. `allow = []` to
    /// test the guard's defaults).
    pub fn config_outbound(&self, outbound: &str, rest: &str) -> String {
        format!(
            "[database]\nurl = \"{}\"\n\n{rest}\n\n[outbound]\n{outbound}\n",
            self.url
        )
    }

    /// Like [`TestDb::config`], with the given `[outbound]` body instead of [`LOOPBACK_ALLOW`].
    pub fn config_with_outbound(&self, outbound: &str, observers: &str) -> String {
        self.config_outbound(
            outbound,
            &format!(
                "[listener]\npoll_interval_ms = 200\nshutdown_timeout_ms = 15000\nid = \"test\"\nstart_from = \"beginning\"\n\n{observers}"
            ),
        )
    }

    /// A full config: database, a listener `test` reading from the beginning with fast polling,
    /// and `observers` (TOML `[[observers]]` entries).
    pub fn config(&self, observers: &str) -> String {
        self.config_listener("id = \"test\"\nstart_from = \"beginning\"", observers)
    }

    /// Like [`TestDb::config`] with the given `[listener]` body.
    pub fn config_listener(&self, listener: &str, observers: &str) -> String {
        self.config_raw(&format!(
            "[listener]\npoll_interval_ms = 200\nshutdown_timeout_ms = 15000\n{listener}\n\n{observers}"
        ))
    }

    /// Writes `text` to a file in this test's directory and returns its path.
    pub fn write_file(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.join(name);
        std::fs::write(&p, text).expect("write file");
        p
    }

    /// Runs `fraiseql-observers --config <file with [database] only> ARGS`.
    pub async fn cli(&self, args: &[&str]) -> Output {
        let cfg = self.write_file("cli.toml", &self.config_raw(""));
        let mut all = vec!["--config", cfg.to_str().unwrap()];
        all.extend_from_slice(args);
        run_cli(&all).await
    }

    /// Runs the CLI with a given config text.
    pub async fn cli_with(&self, config: &str, args: &[&str]) -> Output {
        let cfg = self.write_file(&format!("cli-{}.toml", unique_suffix()), config);
        let mut all = vec!["--config", cfg.to_str().unwrap()];
        all.extend_from_slice(args);
        run_cli(&all).await
    }

    /// A new connection to this database.
    pub async fn connect(&self) -> tokio_postgres::Client {
        connect(&self.url).await
    }

    pub async fn exec(&self, sql: &str) {
        self.client
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// Rows of `sql` as JSON objects (`SELECT to_jsonb(x) FROM (<sql>) x`).
    pub async fn json_rows(&self, sql: &str) -> Vec<Value> {
        let q = format!("SELECT to_jsonb(x) FROM ({sql}) x");
        self.client
            .query(&q, &[])
            .await
            .unwrap_or_else(|e| panic!("{q}: {e}"))
            .iter()
            .map(|r| r.get::<_, Value>(0))
            .collect()
    }

    /// Inserts an order through the capture trigger.
    pub async fn insert_order(&self, id: i64, status: &str, total: f64) {
        self.client
            .execute(
                "INSERT INTO orders (id, status, total) VALUES ($1, $2, $3::float8::numeric)",
                &[&id, &status, &total],
            )
            .await
            .expect("insert order");
    }

    pub async fn set_status(&self, id: i64, status: &str) {
        self.client
            .execute(
                "UPDATE orders SET status = $2 WHERE id = $1",
                &[&id, &status],
            )
            .await
            .expect("update order");
    }

    /// Writes one raw change-log row (as an application would) and returns its event id.
    pub async fn insert_change(
        &self,
        entity: &str,
        object_id: Option<&str>,
        modification_type: &str,
        data: Option<Value>,
    ) -> uuid::Uuid {
        self.client
            .query_one(
                "INSERT INTO tb_entity_change_log (object_type, object_id, modification_type, object_data)
                 VALUES ($1, $2, $3, $4) RETURNING id",
                &[&entity, &object_id, &modification_type, &data],
            )
            .await
            .expect("insert change-log row")
            .get(0)
    }

    /// Every change-log row, in pk order.
    pub async fn change_log(&self) -> Vec<Value> {
        self.json_rows(
            "SELECT pk_entity_change_log, id, object_type, object_id, modification_type, object_data
             FROM tb_entity_change_log ORDER BY pk_entity_change_log",
        )
        .await
    }

    /// The event id of change-log rows of `entity`/`object_id`, in pk order.
    pub async fn event_ids(&self, entity: &str, object_id: &str) -> Vec<uuid::Uuid> {
        self.client
            .query(
                "SELECT id FROM tb_entity_change_log WHERE object_type = $1 AND object_id = $2
                 ORDER BY pk_entity_change_log",
                &[&entity, &object_id],
            )
            .await
            .expect("event ids")
            .iter()
            .map(|r| r.get(0))
            .collect()
    }

    pub async fn dead_letters(&self) -> Vec<Value> {
        self.json_rows("SELECT * FROM observer_dead_letters ORDER BY id")
            .await
    }

    pub async fn action_log(&self) -> Vec<Value> {
        self.json_rows("SELECT * FROM observer_action_log ORDER BY id")
            .await
    }

    pub async fn checkpoints(&self) -> Vec<Value> {
        self.json_rows(
            "SELECT listener_id, window_lo::text, window_hi::text, after_pk, last_event_id, last_event_pk,
                    events_processed, owner, epoch
             FROM observer_checkpoints ORDER BY listener_id",
        )
        .await
    }

    /// Change-log rows the checkpoint of `listener` does not cover yet (all of them when there
    /// is no checkpoint row).
    pub async fn unprocessed(&self, listener: &str) -> i64 {
        self.client
            .query_one(
                "SELECT count(*) FROM tb_entity_change_log r
                 WHERE NOT EXISTS (
                     SELECT 1 FROM observer_checkpoints c
                     WHERE c.listener_id = $1
                       AND (pg_visible_in_snapshot(r.txid, c.window_lo)
                            OR (pg_visible_in_snapshot(r.txid, c.window_hi)
                                AND r.pk_entity_change_log <= c.after_pk)))",
                &[&listener],
            )
            .await
            .expect("unprocessed")
            .get(0)
    }

    /// Waits until the checkpoint of `listener` covers every change-log row written so far:
    /// every action of every event is then delivered or dead-lettered, and recorded.
    pub async fn wait_caught_up(&self, listener: &str, timeout: Duration) {
        eventually(
            timeout,
            &format!("checkpoint `{listener}` to cover the whole change log"),
            || async { (self.unprocessed(listener).await == 0).then_some(()) },
        )
        .await
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        let dir = self.dir.clone();
        // Our own runtime on a plain thread: Drop may run inside (or outside) a tokio runtime.
        let cleanup = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            if let Ok(rt) = rt {
                rt.block_on(async {
                    if let Ok((client, conn)) =
                        tokio_postgres::connect(&admin_url(), tokio_postgres::NoTls).await
                    {
                        tokio::spawn(async move {
                            let _ = conn.await;
                        });
                        let _ = client
                            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                            .await;
                    }
                });
            }
            let _ = std::fs::remove_dir_all(dir);
        });
        let _ = cleanup.join();
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP receiver
// ---------------------------------------------------------------------------------------------

/// One request as received.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    /// Raw path (still percent-encoded).
    pub path: String,
    pub query: Option<String>,
    /// Header names lower-cased.
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
    /// When it arrived (before any configured delay).
    pub at: Instant,
    pub time: SystemTime,
    /// The status we answered.
    pub status: u16,
    /// `event_id` of a default-envelope JSON body, parsed once on arrival.
    pub event_id: Option<String>,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }

    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON; panics with the body when it is not JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.body_text()))
    }

    pub fn idempotency_key(&self) -> &str {
        self.header("idempotency-key")
            .expect("Idempotency-Key header")
    }

    /// `event_id` of a default-envelope body.
    pub fn event_id(&self) -> String {
        self.event_id
            .clone()
            .unwrap_or_else(|| panic!("no event_id in body: {}", self.body_text()))
    }
}

/// How the receiver answers.
#[derive(Debug, Clone)]
pub struct Behaviour {
    /// Status when nothing more specific applies.
    pub status: u16,
    /// A fixed status per path.
    pub path_status: HashMap<String, u16>,
    /// Statuses answered in turn per path; when exhausted the other rules apply.
    pub path_sequence: HashMap<String, VecDeque<u16>>,
    /// The first `fail_first` requests (over all paths) get `fail_status`.
    pub fail_first: usize,
    pub fail_status: u16,
    /// Waited before answering.
    pub delay: Duration,
    /// Waited before answering requests to a path (instead of `delay`).
    pub path_delay: HashMap<String, Duration>,
    /// `Retry-After` header added to every non-2xx answer.
    pub retry_after: Option<String>,
    /// `Location` header added to the answers of a path (with a 3xx `path_status`: a redirect).
    pub path_location: HashMap<String, String>,
}

impl Default for Behaviour {
    fn default() -> Self {
        Behaviour {
            status: 204,
            path_status: HashMap::new(),
            path_sequence: HashMap::new(),
            fail_first: 0,
            fail_status: 503,
            delay: Duration::ZERO,
            path_delay: HashMap::new(),
            retry_after: None,
            path_location: HashMap::new(),
        }
    }
}

#[derive(Default)]
struct Inner {
    behaviour: Behaviour,
    requests: Vec<Received>,
    seen: usize,
}

/// A real HTTP server on 127.0.0.1 that records every request.
#[derive(Clone)]
pub struct Receiver {
    pub addr: std::net::SocketAddr,
    inner: Arc<Mutex<Inner>>,
    _server: Arc<ServerHandle>,
}

struct ServerHandle(tokio::task::JoinHandle<()>);

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn handle(
    State(inner): State<Arc<Mutex<Inner>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let at = Instant::now();
    let path = uri.path().to_string();
    let (status, delay, retry_after, location) = {
        let mut g = inner.lock().unwrap();
        let n = g.seen;
        g.seen += 1;
        let b = &mut g.behaviour;
        let status = if n < b.fail_first {
            b.fail_status
        } else if let Some(s) = b.path_sequence.get_mut(&path).and_then(|q| q.pop_front()) {
            s
        } else if let Some(s) = b.path_status.get(&path) {
            *s
        } else {
            b.status
        };
        let delay = b.path_delay.get(&path).copied().unwrap_or(b.delay);
        let retry_after = b.retry_after.clone();
        let location = b.path_location.get(&path).cloned();
        let rec = Received {
            method: method.to_string(),
            path: path.clone(),
            query: uri.query().map(str::to_string),
            headers: headers
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_ascii_lowercase(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            body: body.to_vec(),
            at,
            time: SystemTime::now(),
            status,
            event_id: serde_json::from_slice::<Value>(&body).ok().and_then(|v| {
                v.get("event_id")
                    .and_then(Value::as_str)
                    .map(str::to_string)
            }),
        };
        g.requests.push(rec);
        (status, delay, retry_after, location)
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut resp = (
        code,
        if code.is_success() {
            String::new()
        } else {
            format!("receiver says {status}")
        },
    )
        .into_response();
    if let Some(l) = location {
        resp.headers_mut()
            .insert("location", l.parse().expect("location value"));
    }
    if !code.is_success() {
        if let Some(r) = retry_after {
            resp.headers_mut()
                .insert("retry-after", r.parse().expect("retry-after value"));
        }
    }
    resp
}

impl Receiver {
    pub async fn start() -> Receiver {
        Receiver::start_on("127.0.0.1").await
    }

    /// A receiver on another loopback address (e.g. `127.0.0.2`: Linux routes all of
    /// 127.0.0.0/8 to `lo`), to tell an admitted loopback destination from a refused one.
    pub async fn start_on(ip: &str) -> Receiver {
        let inner = Arc::new(Mutex::new(Inner::default()));
        // Large enough for the 10 MiB rows of tests/tests/bad_rows.rs (axum's default is 2 MB).
        let app = axum::Router::new()
            .fallback(handle)
            .layer(axum::extract::DefaultBodyLimit::max(64 << 20))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind((ip, 0))
            .await
            .expect("bind receiver");
        let addr = listener.local_addr().expect("receiver addr");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Receiver {
            addr,
            inner,
            _server: Arc::new(ServerHandle(task)),
        }
    }

    /// `http://ADDRESS:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Changes how the receiver answers from now on.
    pub fn behave(&self, f: impl FnOnce(&mut Behaviour)) {
        f(&mut self.inner.lock().unwrap().behaviour);
    }

    pub fn set_status(&self, status: u16) {
        self.behave(|b| b.status = status);
    }

    pub fn set_path_status(&self, path: &str, status: u16) {
        self.behave(|b| {
            b.path_status.insert(path.to_string(), status);
        });
    }

    /// Answers `path` with `status` and `Location: location` (a redirect when 3xx).
    pub fn set_path_redirect(&self, path: &str, status: u16, location: &str) {
        self.behave(|b| {
            b.path_status.insert(path.to_string(), status);
            b.path_location
                .insert(path.to_string(), location.to_string());
        });
    }

    pub fn set_path_sequence(&self, path: &str, statuses: &[u16]) {
        self.behave(|b| {
            b.path_sequence
                .insert(path.to_string(), statuses.iter().copied().collect());
        });
    }

    pub fn fail_first(&self, n: usize, status: u16) {
        self.behave(|b| {
            b.fail_first = n;
            b.fail_status = status;
        });
    }

    pub fn set_delay(&self, d: Duration) {
        self.behave(|b| b.delay = d);
    }

    pub fn set_path_delay(&self, path: &str, d: Duration) {
        self.behave(|b| {
            b.path_delay.insert(path.to_string(), d);
        });
    }

    /// The most requests that were being answered at once, given that each took `delay`.
    pub fn max_overlap(&self, delay: Duration) -> usize {
        let reqs = self.requests();
        reqs.iter()
            .map(|r| {
                reqs.iter()
                    .filter(|o| o.at <= r.at && r.at < o.at + delay)
                    .count()
            })
            .max()
            .unwrap_or(0)
    }

    pub fn set_retry_after(&self, v: Option<&str>) {
        self.behave(|b| b.retry_after = v.map(str::to_string));
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<Received> {
        self.inner.lock().unwrap().requests.clone()
    }

    /// Requests to `path`.
    pub fn requests_to(&self, path: &str) -> Vec<Received> {
        self.requests()
            .into_iter()
            .filter(|r| r.path == path)
            .collect()
    }

    pub fn count(&self) -> usize {
        self.inner.lock().unwrap().requests.len()
    }

    /// Waits until at least `n` requests arrived; returns them all.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Received> {
        self.wait_until(timeout, &format!("{n} request(s) at the receiver"), |r| {
            r.len() >= n
        })
        .await
    }

    /// Waits until `cond` holds over all requests so far; the panic message includes what arrived.
    pub async fn wait_until(
        &self,
        timeout: Duration,
        what: &str,
        cond: impl Fn(&[Received]) -> bool,
    ) -> Vec<Received> {
        let deadline = Instant::now() + timeout;
        loop {
            let reqs = self.requests();
            if cond(&reqs) {
                return reqs;
            }
            if Instant::now() >= deadline {
                let summary: Vec<String> = reqs
                    .iter()
                    .take(20)
                    .map(|r| format!("{} {} -> {} {}", r.method, r.path, r.status, r.body_text()))
                    .collect();
                panic!(
                    "timed out after {timeout:?} waiting for {what}; {} request(s) arrived:\n{}",
                    reqs.len(),
                    summary.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The daemon
// ---------------------------------------------------------------------------------------------

/// Log lines meaning the daemon has taken its start position (or is standing by).
pub const READY_MARKERS: [&str; 3] = ["no checkpoint", "resuming", "standing by"];

/// `fraiseql-observers --config F run` as a child process.
pub struct Daemon {
    child: tokio::process::Child,
    pub pid: u32,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
}

impl Daemon {
    /// Starts the daemon and waits until it has taken its start position.
    pub async fn start(db: &TestDb, config: &str) -> Daemon {
        Daemon::start_with_env(db, config, &[]).await
    }

    pub async fn start_with_env(db: &TestDb, config: &str, env: &[(&str, &str)]) -> Daemon {
        let d = Daemon::spawn(&db.dir, config, env).expect("spawn daemon");
        d.wait_log_any(&READY_MARKERS, Duration::from_secs(20))
            .await;
        d
    }

    /// Spawns without waiting for anything.
    pub fn spawn(dir: &Path, config: &str, env: &[(&str, &str)]) -> Result<Daemon> {
        Daemon::spawn_args(dir, config, &[], env)
    }

    /// `run ARGS` (e.g. `--role queue-worker`), waiting until the log shows `ready`.
    pub async fn start_args(db: &TestDb, config: &str, args: &[&str], ready: &str) -> Daemon {
        let d = Daemon::spawn_args(&db.dir, config, args, &[]).expect("spawn daemon");
        d.wait_log(ready, Duration::from_secs(20)).await;
        d
    }

    /// Spawns `run ARGS` without waiting for anything.
    pub fn spawn_args(
        dir: &Path,
        config: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Daemon> {
        let id = unique_suffix();
        let config_path = dir.join(format!("daemon-{id}.toml"));
        std::fs::write(&config_path, config)?;
        let log_path = dir.join(format!("daemon-{id}.log"));
        let out = std::fs::File::create(dir.join(format!("daemon-{id}.out")))?;
        let err = std::fs::File::create(&log_path)?;
        let mut c = command();
        c.arg("--config").arg(&config_path).arg("run").args(args);
        for (k, v) in env {
            c.env(k, v);
        }
        c.stdout(out).stderr(err).kill_on_drop(true);
        let child = c.spawn().context("spawn fraiseql-observers run")?;
        let pid = child.id().context("child pid")?;
        Ok(Daemon {
            child,
            pid,
            config_path,
            log_path,
        })
    }

    /// Captured stderr (the log) so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Waits until the log contains `needle`.
    pub async fn wait_log(&self, needle: &str, timeout: Duration) {
        self.wait_log_any(&[needle], timeout).await
    }

    pub async fn wait_log_any(&self, needles: &[&str], timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let logs = self.logs();
            if needles.iter().any(|n| logs.contains(n)) {
                return;
            }
            if Instant::now() >= deadline {
                panic!("timed out after {timeout:?} waiting for the daemon to log one of {needles:?}; log:\n{logs}");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Whether the process has exited (without reaping it twice).
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Sends `signal` (e.g. "TERM", "KILL") with kill(1).
    pub fn signal(&self, signal: &str) {
        let ok = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid.to_string())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "kill -{signal} {} failed", self.pid);
    }

    /// Waits for the process to exit.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(r) => Ok(r?),
            Err(_) => bail!(
                "daemon {} did not exit within {timeout:?}; log:\n{}",
                self.pid,
                self.logs()
            ),
        }
    }

    /// SIGTERM, then waits (up to 30 s) for the exit status.
    pub async fn stop(&mut self) -> ExitStatus {
        if let Some(s) = self.try_status() {
            return s;
        }
        self.signal("TERM");
        match self.wait_exit(Duration::from_secs(30)).await {
            Ok(s) => s,
            Err(e) => panic!("{e}"),
        }
    }

    /// SIGKILL and reap.
    pub async fn kill9(&mut self) {
        if self.try_status().is_some() {
            return;
        }
        self.signal("KILL");
        let _ = self.wait_exit(Duration::from_secs(10)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Config snippets
// ---------------------------------------------------------------------------------------------

/// A fast retry policy for tests.
pub const FAST_RETRY: &str =
    r#"retry = { max_attempts = 3, backoff = "fixed", initial_ms = 50, max_ms = 1000 }"#;

/// One `[[observers]]` entry with one webhook action. `observer_extra` goes into the observer
/// (events, condition), `action_extra` into the action (secret, body, headers, retry…).
pub fn webhook_observer(
    name: &str,
    entity: &str,
    url: &str,
    observer_extra: &str,
    action_extra: &str,
) -> String {
    let retry = if action_extra.contains("retry") {
        ""
    } else {
        FAST_RETRY
    };
    format!(
        "[[observers]]\nname = \"{name}\"\nentity = \"{entity}\"\n{observer_extra}\n\n  [[observers.actions]]\n  type = \"webhook\"\n  url = \"{url}\"\n  {retry}\n{action_extra}\n\n"
    )
}

/// Percent-decodes a URL component.
pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) =
                u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16)
            {
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
