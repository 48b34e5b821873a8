//! The `metrics` layer: an HTTP server on `[metrics] listen` serving
//!
//! - `/metrics`: the Prometheus text exposition of [`Metrics`] (every collector of the process);
//! - `/health`: 200 while the process is alive (a JSON body names the listener and the pid);
//! - `/ready`: 200 only when this instance should receive traffic and is keeping up, else 503.
//!   Three checks, each reported in the JSON body:
//!   `database` (`SELECT 1` answers within [`DB_CHECK_TIMEOUT`]), `listener` (this process holds
//!   the listener lock and runs: a standby instance is alive but **not** ready, so a load
//!   balancer or an orchestrator waiting for readiness only counts the active one) and `lag`
//!   (`observer_lag_seconds` is at most `ready_max_lag_secs`).
//!
//! Besides serving, a background task refreshes every `refresh_secs` the gauges the run loop
//! cannot know cheaply: `observer_dlq_size` (pending dead letters of this listener) and
//! `observer_backlog_events` (change-log rows after the saved checkpoint; needs
//! `features.checkpoint`, since without it the position lives only in the run loop's memory).
//!
//! It is not a tower layer around the executor: it observes the process, it does not touch a
//! delivery.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use observer_core::change_log::ChangeLog;
use observer_core::http_server::{self, ServerLimits};
use observer_core::metrics::Metrics;
use observer_core::schema::Objects;
use observer_core::store::CheckpointStore;
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How long `/ready` waits for the database to answer `SELECT 1`.
pub const DB_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// How long requests in flight may take to finish once the endpoint stops.
pub const STOP_GRACE: Duration = Duration::from_secs(2);

/// The Prometheus text exposition format version we serve.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What the endpoint reads from.
pub struct Sources {
    pub metrics: Arc<Metrics>,
    /// The daemon's pool (the ready probe and the refresh each take one connection briefly).
    pub pool: deadpool_postgres::Pool,
    pub objects: Arc<Objects>,
    /// `[listener] id`: dead letters and the checkpoint are counted for this listener.
    pub listener: String,
    /// The checkpoint store, when `features.checkpoint` is on (for `observer_backlog_events`).
    pub checkpoint: Option<Arc<dyn CheckpointStore>>,
    /// `[metrics] ready_max_lag_secs`.
    pub ready_max_lag_secs: u64,
    /// `[metrics] refresh_secs`.
    pub refresh: Duration,
}

/// Start-up errors of the endpoint.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("metrics.listen: `{0}` is not an address like 127.0.0.1:9464")]
    BadAddress(String),
    #[error("cannot serve metrics on {addr} (metrics.listen): {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

/// The running endpoint; [`MetricsServer::stop`] ends it.
pub struct MetricsServer {
    pub addr: SocketAddr,
    stop: watch::Sender<bool>,
    server: JoinHandle<()>,
    refresher: JoinHandle<()>,
}

struct Shared {
    sources: Sources,
    started: Instant,
}

impl MetricsServer {
    /// Binds `listen` and starts serving (within `limits`: `[metrics] max_connections`,
    /// `header_read_timeout_ms`, `idle_timeout_ms`) and refreshing. Failing to bind is an error
    /// naming the address.
    pub async fn start(
        listen: &str,
        sources: Sources,
        limits: ServerLimits,
    ) -> Result<MetricsServer, MetricsError> {
        let want: SocketAddr = listen
            .parse()
            .map_err(|_| MetricsError::BadAddress(listen.to_string()))?;
        let tcp = tokio::net::TcpListener::bind(want)
            .await
            .map_err(|source| MetricsError::Bind {
                addr: listen.to_string(),
                source,
            })?;
        let addr = tcp.local_addr().map_err(|source| MetricsError::Bind {
            addr: listen.to_string(),
            source,
        })?;
        let shared = Arc::new(Shared {
            sources,
            started: Instant::now(),
        });
        let (stop, stopped) = watch::channel(false);
        let app = Router::new()
            .route("/metrics", get(metrics))
            .route("/health", get(health))
            .route("/ready", get(ready))
            .with_state(shared.clone());
        let mut stop_serving = stopped.clone();
        let server = tokio::spawn(async move {
            let graceful = async move {
                let _ = stop_serving.wait_for(|s| *s).await;
            };
            http_server::serve(tcp, app, limits, "metrics endpoint", graceful, STOP_GRACE).await;
        });
        let refresher = tokio::spawn(refresh_loop(shared, stopped));
        Ok(MetricsServer {
            addr,
            stop,
            server,
            refresher,
        })
    }

    /// `http://ADDR/metrics`.
    pub fn url(&self) -> String {
        format!("http://{}/metrics", self.addr)
    }

    /// Stops serving (open requests get up to [`STOP_GRACE`]) and stops the refresh task.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let mut server = self.server;
        if tokio::time::timeout(STOP_GRACE + Duration::from_secs(1), &mut server)
            .await
            .is_err()
        {
            server.abort();
        }
        let mut refresher = self.refresher;
        if tokio::time::timeout(Duration::from_secs(2), &mut refresher)
            .await
            .is_err()
        {
            refresher.abort();
        }
    }
}

async fn metrics(State(s): State<Arc<Shared>>) -> Response {
    (
        [(header::CONTENT_TYPE, CONTENT_TYPE)],
        s.sources.metrics.render(),
    )
        .into_response()
}

async fn health(State(s): State<Arc<Shared>>) -> Response {
    json_response(
        StatusCode::OK,
        &json!({
            "status": "alive",
            "listener": s.sources.listener,
            "pid": std::process::id(),
            "uptime_secs": s.started.elapsed().as_secs(),
            "listener_active": s.sources.metrics.listener_active.get() == 1,
            "leader": s.sources.metrics.leader.get() == 1,
        }),
    )
}

async fn ready(State(s): State<Arc<Shared>>) -> Response {
    let db = database_check(&s.sources.pool).await;
    let m = &s.sources.metrics;
    let (ok, body) = judge(
        db,
        m.listener_active.get(),
        m.lag_seconds.get(),
        s.sources.ready_max_lag_secs,
    );
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json_response(status, &body)
}

fn json_response(status: StatusCode, body: &Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// `SELECT 1` through the pool within [`DB_CHECK_TIMEOUT`]: how long it took, or why not.
async fn database_check(pool: &deadpool_postgres::Pool) -> Result<Duration, String> {
    let t = Instant::now();
    let probe = async {
        let client = pool
            .get()
            .await
            .map_err(|e| format!("database pool: {e}"))?;
        client
            .simple_query("SELECT 1")
            .await
            .map_err(|e| format!("SELECT 1 failed: {e}"))?;
        Ok::<(), String>(())
    };
    match tokio::time::timeout(DB_CHECK_TIMEOUT, probe).await {
        Ok(Ok(())) => Ok(t.elapsed()),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(format!(
            "SELECT 1 did not answer within {} ms",
            DB_CHECK_TIMEOUT.as_millis()
        )),
    }
}

/// The readiness verdict and its JSON explanation (one entry per check).
pub fn judge(
    db: Result<Duration, String>,
    listener_active: i64,
    lag_seconds: f64,
    max_lag_secs: u64,
) -> (bool, Value) {
    let db_ok = db.is_ok();
    let database = match db {
        Ok(d) => {
            json!({"ok": true, "detail": format!("SELECT 1 answered in {} ms", d.as_millis())})
        }
        Err(e) => json!({"ok": false, "detail": e}),
    };
    let active = listener_active == 1;
    let listener = json!({
        "ok": active,
        "detail": if active {
            "this instance holds the listener lock and runs"
        } else {
            "not active: standing by for the listener lock held by another instance, or (re)starting"
        },
    });
    let lag_ok = lag_seconds <= max_lag_secs as f64;
    let lag = json!({
        "ok": lag_ok,
        "lag_seconds": lag_seconds,
        "max_lag_secs": max_lag_secs,
        "detail": if lag_ok {
            format!("oldest unfinished event is {lag_seconds:.1}s old (limit {max_lag_secs}s)")
        } else {
            format!("oldest unfinished event is {lag_seconds:.1}s old, over the limit of {max_lag_secs}s (metrics.ready_max_lag_secs)")
        },
    });
    let ok = db_ok && active && lag_ok;
    let failed: Vec<&str> = [("database", db_ok), ("listener", active), ("lag", lag_ok)]
        .into_iter()
        .filter(|(_, ok)| !ok)
        .map(|(n, _)| n)
        .collect();
    (
        ok,
        json!({
            "ready": ok,
            "failed": failed,
            "checks": {"database": database, "listener": listener, "lag": lag},
        }),
    )
}

/// Refreshes `observer_dlq_size` and `observer_backlog_events` until stopped. A failed pass is
/// logged once (and its recovery once), the gauges keep their last value.
async fn refresh_loop(shared: Arc<Shared>, mut stopped: watch::Receiver<bool>) {
    let s = &shared.sources;
    let mut failing = false;
    loop {
        let pass = tokio::time::timeout(s.refresh.max(Duration::from_secs(1)), refresh_once(s));
        let result = tokio::select! {
            _ = stopped.wait_for(|v| *v) => return,
            r = pass => r.unwrap_or_else(|_| Err("refresh took too long".into())),
        };
        match result {
            Ok(()) if failing => {
                failing = false;
                tracing::info!("metrics refresh (dlq size, backlog) works again");
            }
            Ok(()) => {}
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(error = %e, "metrics refresh (dlq size, backlog) failed; keeping the last values and retrying");
            }
            Err(_) => {}
        }
        tokio::select! {
            _ = stopped.wait_for(|v| *v) => return,
            _ = tokio::time::sleep(s.refresh) => {}
        }
    }
}

async fn refresh_once(s: &Sources) -> Result<(), String> {
    let client = s
        .pool
        .get()
        .await
        .map_err(|e| format!("database pool: {e}"))?;
    let client: &tokio_postgres::Client = &client;
    let sql = format!(
        "SELECT count(*) FROM {} WHERE listener_id = $1 AND status = 'pending'",
        s.objects.dead_letters.sql()
    );
    let pending: i64 = client
        .query_one(&sql, &[&s.listener])
        .await
        .map_err(|e| format!("counting pending dead letters: {e}"))?
        .get(0);
    s.metrics.dlq_size.set(pending);
    if let Some(store) = &s.checkpoint {
        let pos = store
            .load(client, &s.listener)
            .await
            .map_err(|e| format!("loading the checkpoint: {e}"))?;
        if let Some(pos) = pos {
            let (rows, _) = ChangeLog::new(s.objects.change_log.clone())
                .backlog(client, &pos)
                .await
                .map_err(|e| format!("counting the backlog: {e}"))?;
            s.metrics.backlog_events.set(rows);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_every_check_passes() {
        let (ok, body) = judge(Ok(Duration::from_millis(3)), 1, 0.5, 300);
        assert!(ok, "{body}");
        assert_eq!(body["failed"], json!([]));
        assert_eq!(body["checks"]["database"]["ok"], json!(true));
    }

    #[test]
    fn a_standby_is_alive_but_not_ready() {
        let (ok, body) = judge(Ok(Duration::from_millis(3)), 0, 0.0, 300);
        assert!(!ok);
        assert_eq!(body["failed"], json!(["listener"]));
        assert!(body["checks"]["listener"]["detail"]
            .as_str()
            .unwrap()
            .contains("standing by"));
    }

    #[test]
    fn each_failed_check_is_named() {
        let (ok, body) = judge(Err("SELECT 1 failed: boom".into()), 1, 301.0, 300);
        assert!(!ok);
        assert_eq!(body["failed"], json!(["database", "lag"]));
        assert_eq!(
            body["checks"]["database"]["detail"],
            json!("SELECT 1 failed: boom")
        );
        assert!(body["checks"]["lag"]["detail"]
            .as_str()
            .unwrap()
            .contains("ready_max_lag_secs"));
        // At the limit is still ready.
        assert!(judge(Ok(Duration::ZERO), 1, 300.0, 300).0);
    }
}
