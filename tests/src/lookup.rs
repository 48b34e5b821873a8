//! Helpers of the enrichment tests: a real HTTP lookup service on loopback that serves JSON
//! documents by path and counts requests, and a Redis key prefix of one's own that is deleted
//! afterwards.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

#[derive(Default)]
struct Inner {
    docs: HashMap<String, Value>,
    /// Statuses answered to the next requests (any path), before the documents.
    failures: VecDeque<u16>,
    hits: HashMap<String, usize>,
}

/// A JSON lookup service: `GET <path>` answers the document set for the path (200), or 404.
#[derive(Clone)]
pub struct LookupServer {
    pub addr: std::net::SocketAddr,
    inner: Arc<Mutex<Inner>>,
    _task: Arc<AbortOnDrop>,
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn serve(State(inner): State<Arc<Mutex<Inner>>>, uri: Uri) -> Response {
    let path = uri.path().to_string();
    let mut g = inner.lock().unwrap();
    *g.hits.entry(path.clone()).or_default() += 1;
    if let Some(status) = g.failures.pop_front() {
        let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return (code, format!("lookup service says {status}")).into_response();
    }
    match g.docs.get(&path) {
        Some(doc) => (
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            doc.to_string(),
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "no such document").into_response(),
    }
}

impl LookupServer {
    pub async fn start() -> LookupServer {
        let inner = Arc::new(Mutex::new(Inner::default()));
        let app = axum::Router::new()
            .fallback(serve)
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind lookup server");
        let addr = listener.local_addr().expect("lookup server addr");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        LookupServer {
            addr,
            inner,
            _task: Arc::new(AbortOnDrop(task)),
        }
    }

    /// `http://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Serves `doc` at `path`.
    pub fn set(&self, path: &str, doc: Value) {
        self.inner.lock().unwrap().docs.insert(path.into(), doc);
    }

    /// The next `n` requests are answered `status`.
    pub fn fail_next(&self, n: usize, status: u16) {
        let mut g = self.inner.lock().unwrap();
        g.failures.extend(std::iter::repeat_n(status, n));
    }

    /// Requests received for `path` so far.
    pub fn hits(&self, path: &str) -> usize {
        self.inner
            .lock()
            .unwrap()
            .hits
            .get(path)
            .copied()
            .unwrap_or(0)
    }
}

/// A unique Redis key prefix; every key under it is deleted when dropped.
pub struct RedisPrefix {
    pub prefix: String,
}

/// The Redis URL of the tests (`TEST_REDIS_URL`, default the loopback server).
pub fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

impl RedisPrefix {
    pub fn new() -> RedisPrefix {
        RedisPrefix {
            prefix: format!("obs_test_{}", uuid::Uuid::new_v4().simple()),
        }
    }

    /// A `[redis]` section pointing at the test server with this prefix.
    pub fn section(&self) -> String {
        format!(
            "[redis]\nurl = \"{}\"\nkey_prefix = \"{}\"\n",
            redis_url(),
            self.prefix
        )
    }

    fn conn() -> redis::Connection {
        redis::Client::open(redis_url())
            .and_then(|c| c.get_connection())
            .expect("connect to the test Redis")
    }

    /// The value of `<prefix>:<part>`.
    pub fn get(&self, part: &str) -> Option<String> {
        redis::cmd("GET")
            .arg(format!("{}:{part}", self.prefix))
            .query(&mut Self::conn())
            .expect("Redis GET")
    }

    /// The TTL of `<prefix>:<part>` in seconds (-2 missing, -1 no TTL).
    pub fn ttl(&self, part: &str) -> i64 {
        redis::cmd("TTL")
            .arg(format!("{}:{part}", self.prefix))
            .query(&mut Self::conn())
            .expect("Redis TTL")
    }
}

impl Default for RedisPrefix {
    fn default() -> Self {
        RedisPrefix::new()
    }
}

impl Drop for RedisPrefix {
    fn drop(&mut self) {
        let pattern = format!("{}:*", self.prefix);
        // A plain thread: Drop may run inside a tokio runtime, and this uses the blocking client.
        let _ = std::thread::spawn(move || {
            let Ok(mut conn) = redis::Client::open(redis_url()).and_then(|c| c.get_connection())
            else {
                return;
            };
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(&pattern)
                .query(&mut conn)
                .unwrap_or_default();
            if !keys.is_empty() {
                let _: redis::RedisResult<()> = redis::cmd("DEL").arg(keys).query(&mut conn);
            }
        })
        .join();
    }
}
