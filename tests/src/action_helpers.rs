//! Helpers of the tests of the `slack`, `email`, `redis_publish` and `cache` actions and of the
//! retry status policy: a real Redis connection with a per-test key prefix, an HTTP server
//! that answers with chosen headers and body, and a real SMTP server (aiosmtpd) on loopback.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::IntoResponse;
use serde_json::Value;
use tokio::io::AsyncBufReadExt;

use crate::workspace_root;

// ---------------------------------------------------------------------------------------------
// Redis
// ---------------------------------------------------------------------------------------------

/// `REDIS_URL`, default `redis://127.0.0.1:6379`.
pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A connection and a key prefix of this test alone; [`TestRedis::cleanup`] removes its keys.
pub struct TestRedis {
    pub client: redis::Client,
    pub conn: redis::aio::MultiplexedConnection,
    /// Unique per test: use as `[redis] key_prefix` and to name channels and streams.
    pub prefix: String,
}

impl TestRedis {
    pub async fn new() -> TestRedis {
        let client = redis::Client::open(redis_url()).expect("redis url");
        let conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("connect to Redis (scripts/setup.sh starts it)");
        let prefix = format!("obs_test_{}", uuid::Uuid::new_v4().simple());
        TestRedis {
            client,
            conn,
            prefix,
        }
    }

    /// `[redis]` section for a config using this prefix.
    pub fn config_section(&self) -> String {
        format!(
            "[redis]\nurl = \"{}\"\nkey_prefix = \"{}\"\n",
            redis_url(),
            self.prefix
        )
    }

    pub async fn set(&self, key: &str, value: &str) {
        let mut c = self.conn.clone();
        redis::cmd("SET")
            .arg(key)
            .arg(value)
            .query_async::<()>(&mut c)
            .await
            .expect("SET");
    }

    pub async fn exists(&self, key: &str) -> bool {
        let mut c = self.conn.clone();
        redis::cmd("EXISTS")
            .arg(key)
            .query_async::<i64>(&mut c)
            .await
            .expect("EXISTS")
            == 1
    }

    /// Every key starting with the prefix.
    pub async fn keys(&self) -> Vec<String> {
        let mut c = self.conn.clone();
        let mut out = Vec::new();
        let mut cursor = 0u64;
        loop {
            let (next, found): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{}*", self.prefix))
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut c)
                .await
                .expect("SCAN");
            out.extend(found);
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        out.sort();
        out
    }

    /// Removes every key of this test.
    pub async fn cleanup(&self) {
        let keys = self.keys().await;
        if !keys.is_empty() {
            let mut c = self.conn.clone();
            let _: i64 = redis::cmd("DEL")
                .arg(&keys)
                .query_async(&mut c)
                .await
                .expect("DEL");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// An HTTP server answering with chosen status, headers and body
// ---------------------------------------------------------------------------------------------

/// Answers every request with the same status, headers and body; counts requests.
#[derive(Clone)]
pub struct ScriptedServer {
    pub addr: SocketAddr,
    hits: Arc<Mutex<usize>>,
    _task: Arc<AbortTask>,
}

struct AbortTask(tokio::task::JoinHandle<()>);

impl Drop for AbortTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl ScriptedServer {
    pub async fn start(status: u16, headers: &[(&str, &str)], body: &str) -> ScriptedServer {
        let hits = Arc::new(Mutex::new(0usize));
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.insert(
                HeaderName::from_bytes(k.as_bytes()).expect("header name"),
                HeaderValue::from_str(v).expect("header value"),
            );
        }
        let (h, body, code) = (
            hits.clone(),
            body.to_string(),
            StatusCode::from_u16(status).expect("status"),
        );
        let app = axum::Router::new().fallback(move || {
            let (h, map, body) = (h.clone(), map.clone(), body.clone());
            async move {
                *h.lock().unwrap() += 1;
                (code, map, body).into_response()
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        ScriptedServer {
            addr,
            hits,
            _task: Arc::new(AbortTask(task)),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn hits(&self) -> usize {
        *self.hits.lock().unwrap()
    }
}

// ---------------------------------------------------------------------------------------------
// SMTP
// ---------------------------------------------------------------------------------------------

/// A Python that can `import aiosmtpd`: the system one if it can, else the venv at
/// `target/aiosmtpd-venv` (made by `scripts/setup.sh`, or here when missing).
pub fn smtp_python() -> PathBuf {
    let can_import = |py: &std::path::Path| {
        std::process::Command::new(py)
            .args(["-c", "import aiosmtpd"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    let venv = workspace_root().join("target").join("aiosmtpd-venv");
    let py = venv.join("bin").join("python");
    if can_import(&py) {
        return py;
    }
    if can_import(std::path::Path::new("python3")) {
        return "python3".into();
    }
    // Build in a private directory, then move into place (tests run in parallel processes).
    let tmp = workspace_root().join("target").join(format!(
        "aiosmtpd-venv.tmp-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    ));
    let ok = std::process::Command::new("python3")
        .args(["-m", "venv"])
        .arg(&tmp)
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
        && std::process::Command::new(tmp.join("bin").join("python"))
            .args(["-m", "pip", "install", "--quiet", "aiosmtpd==1.4.6"])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
    assert!(ok, "cannot install aiosmtpd into {}", tmp.display());
    if std::fs::rename(&tmp, &venv).is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    assert!(
        can_import(&py),
        "aiosmtpd not importable from {}",
        py.display()
    );
    py
}

/// One message the sink accepted.
#[derive(Debug, Clone)]
pub struct Mail {
    pub mail_from: String,
    pub rcpt_tos: Vec<String>,
    /// The message as received (headers and body).
    pub data: String,
}

impl Mail {
    /// A header's (unfolded) value, by case-insensitive name.
    pub fn header(&self, name: &str) -> Option<String> {
        let head = self.data.split("\r\n\r\n").next().unwrap_or("");
        let head = head.replace("\r\n ", " ").replace("\r\n\t", " ");
        head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }
}

/// `tests/support/smtp_sink.py` as a child process: a real SMTP server on 127.0.0.1.
pub struct SmtpSink {
    pub port: u16,
    pub dir: PathBuf,
    _child: tokio::process::Child,
}

impl SmtpSink {
    /// `reject` maps recipient domains to SMTP replies (e.g. `("bad.test", "550 5.1.1 no")`).
    pub async fn start(dir: PathBuf, reject: &[(&str, &str)]) -> SmtpSink {
        std::fs::create_dir_all(&dir).expect("mail dir");
        let script = workspace_root().join("tests/support/smtp_sink.py");
        let mut c = tokio::process::Command::new(smtp_python());
        c.arg(script).arg("--dir").arg(&dir);
        for (d, r) in reject {
            c.arg("--reject").arg(format!("{d}={r}"));
        }
        c.stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true);
        let mut child = c.spawn().expect("start smtp_sink.py");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .expect("smtp sink did not start within 20 s")
            .expect("read smtp sink")
            .expect("smtp sink exited");
        let v: Value = serde_json::from_str(&line).expect("smtp sink JSON line");
        SmtpSink {
            port: v["port"].as_u64().expect("port") as u16,
            dir,
            _child: child,
        }
    }

    /// Messages accepted so far.
    pub fn mails(&self) -> Vec<Mail> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.extension().and_then(|x| x.to_str()) != Some("json") {
                continue;
            }
            let v: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap_or_default())
                .unwrap_or(Value::Null);
            out.push(Mail {
                mail_from: v["mail_from"].as_str().unwrap_or_default().to_string(),
                rcpt_tos: v["rcpt_tos"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|x| x.as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default(),
                data: v["data"].as_str().unwrap_or_default().to_string(),
            });
        }
        out
    }
}
