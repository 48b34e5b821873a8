//! End-to-end tests of the operator commands: a scratch database, the real daemon, a real HTTP
//! receiver, and the built binary's JSON output.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode, Uri};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_fraiseql-observers");
const ADMIN: &str = "host=127.0.0.1 port=5432 user=postgres dbname=postgres";

/// The webhook receiver: records (path, idempotency key); `/fail` answers 500 while `fail` is set.
#[derive(Default)]
struct Receiver {
    fail: AtomicBool,
    seen: Mutex<Vec<(String, String)>>,
}

impl Receiver {
    fn count(&self, path: &str) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _)| p == path)
            .count()
    }
    fn keys(&self, path: &str) -> Vec<String> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _)| p == path)
            .map(|(_, k)| k.clone())
            .collect()
    }
}

async fn start_receiver() -> (Arc<Receiver>, u16) {
    let state = Arc::new(Receiver {
        fail: AtomicBool::new(true),
        ..Receiver::default()
    });
    let s = state.clone();
    let app = axum::Router::new().fallback(move |uri: Uri, headers: HeaderMap| {
        let s = s.clone();
        async move {
            let key = headers
                .get("idempotency-key")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            s.seen.lock().unwrap().push((uri.path().to_string(), key));
            if uri.path() == "/fail" && s.fail.load(Ordering::SeqCst) {
                StatusCode::INTERNAL_SERVER_ERROR
            } else {
                StatusCode::NO_CONTENT
            }
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (state, port)
}

async fn connect(conn: &str) -> tokio_postgres::Client {
    let (client, c) = tokio_postgres::connect(conn, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(c);
    client
}

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Out {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}\nstderr: {}", self.stdout, self.stderr))
    }
}

fn cli(config: &Path, args: &[&str]) -> Out {
    let o = Command::new(BIN)
        .arg("--config")
        .arg(config)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    Out {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into(),
        stderr: String::from_utf8_lossy(&o.stderr).into(),
    }
}

fn ok(config: &Path, args: &[&str]) -> Value {
    let o = cli(config, args);
    assert_eq!(o.code, 0, "{args:?} failed:\n{}\n{}", o.stdout, o.stderr);
    o.json()
}

fn start_daemon(config: &Path, log: &Path) -> Child {
    let f = std::fs::File::create(log).unwrap();
    Command::new(BIN)
        .arg("--config")
        .arg(config)
        .arg("run")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(f)
        .spawn()
        .unwrap()
}

fn stop_daemon(mut child: Child) {
    Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            assert!(status.success(), "daemon exited with {status}");
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    panic!("daemon did not stop on SIGTERM");
}

fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out waiting for {what}");
}

async fn insert(db: &tokio_postgres::Client, entity: &str, op: &str, data: Value) -> (i64, String) {
    let r = db
        .query_one(
            "INSERT INTO tb_entity_change_log (object_type, object_id, modification_type, object_data)
             VALUES ($1, 'x1', $2, $3) RETURNING pk_entity_change_log, id::text",
            &[&entity, &op, &data],
        )
        .await
        .unwrap();
    (r.get(0), r.get(1))
}

fn write_config(dir: &Path, db: &str, port: u16) -> PathBuf {
    let retry = "retry = { max_attempts = 2, backoff = \"fixed\", initial_ms = 10, max_ms = 10 }";
    let text = format!(
        r#"
[database]
url = "postgres://postgres@127.0.0.1:5432/{db}"
# The receivers of this test listen on loopback, which the outbound guard refuses by default.
[outbound]
allow = ["127.0.0.1/32"]
[listener]
id = "ops-test"
start_from = "beginning"
poll_interval_ms = 100
shutdown_timeout_ms = 2000
[retention]
change_log_days = 1
action_log_days = 0
dead_letter_days = 0
interval_secs = 0
batch_size = 1
[[observers]]
name = "orders-ok"
entity = "Order"
events = ["INSERT"]
condition = "data.total > 100"
  [[observers.actions]]
  type = "webhook"
  url = "http://127.0.0.1:{port}/ok"
  secret = "${{env:OPS_TEST_SECRET}}"
  {retry}
[[observers]]
name = "orders-fail"
entity = "Order"
events = ["INSERT"]
  [[observers.actions]]
  type = "webhook"
  url = "http://127.0.0.1:{port}/fail"
  {retry}
"#
    );
    let p = dir.join("ops.toml");
    std::fs::write(&p, text).unwrap();
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_commands_end_to_end() {
    std::env::set_var(
        "OPS_TEST_SECRET",
        "whsec_dGVzdHNlY3JldHRlc3RzZWNyZXR0ZXN0c2VjcmV0",
    );
    let name = format!(
        "ops_scratch_{}_{}",
        std::process::id(),
        chrono::Utc::now().timestamp_micros()
    );
    let admin = connect(ADMIN).await;
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    let dir = std::env::temp_dir().join(&name);
    std::fs::create_dir_all(&dir).unwrap();
    // The scenario runs on this (non-worker) thread: it blocks while the binary runs, and the
    // receiver's tasks must stay free to run on the workers.
    let result =
        futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(scenario(&dir, &name))).await;
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

async fn scenario(dir: &Path, name: &str) {
    let (rx, port) = start_receiver().await;
    let cfg = write_config(dir, name, port);
    let cfg = cfg.as_path();

    // Not migrated: every command says so and fails.
    let o = cli(cfg, &["status", "--json"]);
    assert_ne!(o.code, 0);
    assert!(o.stderr.contains("migrate"), "{}", o.stderr);
    // An unreachable database: the error says where.
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        "[database]\nurl = \"postgres://postgres@127.0.0.1:1/nowhere\"\nconnect_timeout_ms = 500\n",
    )
    .unwrap();
    let o = cli(&bad, &["dlq", "stats"]);
    assert_ne!(o.code, 0);
    assert!(o.stderr.contains("127.0.0.1:1/nowhere"), "{}", o.stderr);

    assert_eq!(cli(cfg, &["migrate"]).code, 0);
    let o = cli(cfg, &["status"]);
    assert_ne!(o.code, 0);
    assert!(
        o.stderr.contains("no checkpoint for listener ops-test"),
        "{}",
        o.stderr
    );

    let db = connect(&format!(
        "host=127.0.0.1 port=5432 user=postgres dbname={name}"
    ))
    .await;
    let (pk_a, id_a) = insert(&db, "Order", "INSERT", serde_json::json!({"total": 50})).await;
    let (pk_b, id_b) = insert(&db, "Order", "INSERT", serde_json::json!({"total": 150})).await;
    let (_pk_c, id_c) = insert(&db, "Order", "INSERT", serde_json::json!({"total": 200})).await;
    let (_pk_u, id_u) = insert(&db, "User", "INSERT", serde_json::json!({"total": 999})).await;
    let (_pk_p, _) = insert(&db, "Order", "BOGUS", serde_json::json!({})).await;

    // First run: orders-ok delivers B and C; orders-fail dead-letters A, B, C; the poison row too.
    let daemon = start_daemon(cfg, &dir.join("run1.log"));
    wait_for("the daemon to drain the change log", 20, || {
        let o = cli(cfg, &["status", "--json"]);
        o.code == 0 && {
            let s = o.json();
            s["lag_events"] == 0 && s["dead_letters"]["pending"] == 4
        }
    });
    stop_daemon(daemon);
    assert_eq!(rx.count("/ok"), 2);
    assert_eq!(rx.count("/fail"), 6);

    let s = ok(cfg, &["status", "--json"]);
    assert_eq!(s["listener"], "ops-test");
    assert_eq!(s["lag_events"], 0);
    assert_eq!(s["lag_seconds"], 0.0);
    assert_eq!(s["position"]["events_processed"], 4);
    assert!(s["position"]["window_lo"].as_str().unwrap().contains(':'));
    assert_eq!(s["dead_letters"]["pending"], 4);
    assert!(s["last_error"].is_string());
    let all = ok(cfg, &["status", "--all", "--json"]);
    assert_eq!(all["listeners"].as_array().unwrap().len(), 1);
    let o = cli(cfg, &["status", "--listener", "nope"]);
    assert_ne!(o.code, 0);
    assert!(
        o.stderr.contains("no checkpoint for listener nope"),
        "{}",
        o.stderr
    );

    // debug-event: verdicts, outcomes, attempts, keys, dead letters.
    let d = ok(cfg, &["debug-event", &id_a, "--json"]);
    assert_eq!(d["processed"], true);
    let obs = d["observers"].as_array().unwrap();
    assert_eq!(obs[0]["observer"], "orders-ok");
    assert_eq!(obs[0]["verdict"], "condition_false");
    assert_eq!(obs[0]["condition"], "data.total > 100");
    assert_eq!(obs[1]["verdict"], "matched");
    assert_eq!(obs[1]["actions"][0]["status"], "dead_lettered");
    assert_eq!(
        obs[1]["actions"][0]["outcomes"][0]["attempts"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert_eq!(
        obs[1]["actions"][0]["outcomes"][0]["attempts"][0]["status"],
        500
    );
    assert_eq!(d["dead_letters"].as_array().unwrap().len(), 1);
    let d = ok(cfg, &["debug-event", &id_b, "--json"]);
    let act = &d["observers"][0]["actions"][0];
    assert_eq!(act["status"], "delivered");
    assert!(rx
        .keys("/ok")
        .contains(&act["idempotency_key"].as_str().unwrap().to_string()));
    let d = ok(cfg, &["debug-event", &id_u, "--json"]);
    assert_eq!(d["observers"][0]["verdict"], "other_entity");
    let h = ok(cfg, &["debug-event", "--history", "5", "--json"]);
    let events = h["events"].as_array().unwrap();
    assert_eq!(events.len(), 5);
    assert!(events[0]["poison"]["reason"]
        .as_str()
        .unwrap()
        .contains("BOGUS"));

    // dlq stats / list / show.
    let st = ok(cfg, &["dlq", "stats", "--json"]);
    assert_eq!(st["pending"], 4);
    assert_eq!(st["resolved"], 0);
    assert!(st["oldest_pending_age_secs"].as_f64().unwrap() >= 0.0);
    let groups = st["by_observer_reason"].as_array().unwrap();
    assert!(groups.iter().any(|g| g["observer"] == "orders-fail"
        && g["reason"] == "retries_exhausted"
        && g["pending"] == 3));
    assert!(groups
        .iter()
        .any(|g| g["observer"].is_null() && g["reason"] == "poison_event"));
    let l = ok(cfg, &["dlq", "list", "--observer", "orders-fail", "--json"]);
    let rows = l["dead_letters"].as_array().unwrap().clone();
    assert_eq!(rows.len(), 3);
    let first = rows[0]["id"].as_i64().unwrap().to_string();
    let sh = ok(cfg, &["dlq", "show", &first, "--json"]);
    assert_eq!(sh["attempts"].as_array().unwrap().len(), 2);
    assert_eq!(sh["event"]["id"], id_a);
    assert_eq!(sh["action"]["type"], "webhook");

    // Retry while the receiver still fails: still pending, counted, non-zero exit.
    let o = cli(cfg, &["dlq", "retry", &first, "--json"]);
    assert_ne!(o.code, 0);
    assert_eq!(o.json()["status"], "failed");
    let sh = ok(cfg, &["dlq", "show", &first, "--json"]);
    assert_eq!(sh["status"], "pending");
    assert_eq!(sh["manual_retries"], 1);
    assert_eq!(sh["attempts"].as_array().unwrap().len(), 4);

    // Dry run changes nothing; then retry-all delivers with the original keys.
    let dry = ok(cfg, &["dlq", "retry-all", "--dry-run", "--json"]);
    assert_eq!(dry["would_retry"], 4);
    let fail_keys_before = rx.keys("/fail");
    rx.fail.store(false, Ordering::SeqCst);
    let all = ok(cfg, &["dlq", "retry-all", "--json"]);
    assert_eq!(all["delivered"], 3, "{all}");
    assert_eq!(all["still_failing"], 0);
    assert_eq!(all["skipped"], 1, "the poison row stays pending: {all}");
    let fail_keys = rx.keys("/fail");
    for k in &fail_keys[fail_keys_before.len()..] {
        assert!(
            fail_keys_before.contains(k),
            "retry used a new idempotency key {k}"
        );
    }
    let st = ok(cfg, &["dlq", "stats", "--json"]);
    assert_eq!(st["pending"], 1);
    assert_eq!(st["resolved"], 3);
    let d = ok(cfg, &["debug-event", &id_a, "--json"]);
    assert_eq!(d["observers"][1]["actions"][0]["status"], "delivered");

    // checkpoint set: refused while a daemon is active (it holds the listener lock), allowed
    // once it stopped; --beginning then re-delivers with the same keys.
    let daemon = start_daemon(cfg, &dir.join("run-active.log"));
    wait_for("the daemon to hold the listener", 20, || {
        let o = cli(cfg, &["status", "--json"]);
        o.code == 0 && o.json()["alive"] == true
    });
    let o = cli(cfg, &["checkpoint", "set", "--beginning", "--yes"]);
    assert_ne!(o.code, 0);
    assert!(o.stderr.contains("is active"), "{}", o.stderr);
    stop_daemon(daemon);
    let st = ok(cfg, &["status", "--json"]);
    assert_eq!(
        st["alive"], false,
        "a stopped daemon is not reported as running: {st}"
    );
    let c = ok(cfg, &["checkpoint", "show", "--json"]);
    let epoch = c["epoch"].as_i64().unwrap();
    let o = cli(cfg, &["checkpoint", "set", "--beginning", "--force"]);
    assert_ne!(o.code, 0, "without --yes nothing is applied");
    assert_eq!(ok(cfg, &["checkpoint", "show", "--json"])["epoch"], epoch);
    let set = ok(
        cfg,
        &[
            "checkpoint",
            "set",
            "--beginning",
            "--force",
            "--yes",
            "--json",
        ],
    );
    assert_eq!(set["epoch"], epoch + 1);
    assert_eq!(ok(cfg, &["status", "--json"])["lag_events"], 5);
    let ok_keys = rx.keys("/ok");
    let daemon = start_daemon(cfg, &dir.join("run2.log"));
    wait_for("the re-delivery", 20, || {
        rx.count("/ok") == 4 && rx.count("/fail") >= 9 + 3
    });
    wait_for("the checkpoint", 10, || {
        ok(cfg, &["status", "--json"])["lag_events"] == 0
    });
    stop_daemon(daemon);
    let again = rx.keys("/ok");
    assert_eq!(&again[..2], &ok_keys[..]);
    assert_eq!(
        &again[2..],
        &ok_keys[..],
        "re-delivery must carry the same idempotency keys"
    );

    // Replay: dry run counts only; a real run delivers the range with the daemon's keys.
    let dry = ok(
        cfg,
        &[
            "replay",
            "--from",
            &id_a,
            "--to",
            &id_c,
            "--observer",
            "orders-ok",
            "--dry-run",
            "--json",
        ],
    );
    assert_eq!(dry["events_read"], 3);
    assert_eq!(dry["events_matched"], 2);
    assert_eq!(dry["deliveries"], 2);
    assert_eq!(rx.count("/ok"), 4);
    let r = ok(
        cfg,
        &[
            "replay",
            "--from",
            &id_a,
            "--to",
            &id_c,
            "--observer",
            "orders-ok",
            "--json",
        ],
    );
    assert_eq!(r["delivered"], 2);
    assert_eq!(r["dead_lettered"], 0);
    assert_eq!(&rx.keys("/ok")[4..], &ok_keys[..]);
    let r = ok(cfg, &["replay", "--from", "2000-01-01T00:00:00Z", "--json"]);
    assert_eq!(r["events_read"], 5);
    assert_eq!(r["poison_skipped"], 1);
    assert_eq!(r["deliveries"], 5);

    // Cleanup: old processed rows go, an old unprocessed row stays.
    let (pk_d, _) = insert(&db, "Order", "INSERT", serde_json::json!({"total": 1})).await;
    db.execute(
        "UPDATE tb_entity_change_log SET created_at = now() - interval '3 days' WHERE pk_entity_change_log = ANY($1)",
        &[&vec![pk_a, pk_b, pk_d]],
    )
    .await
    .unwrap();
    let dry = ok(cfg, &["cleanup", "--dry-run", "--json"]);
    assert_eq!(dry["change_log"], 2, "{dry}");
    let done = ok(cfg, &["cleanup", "--json"]);
    assert_eq!(done["change_log"], 2, "{done}");
    let left: Vec<i64> = db
        .query(
            "SELECT pk_entity_change_log FROM tb_entity_change_log ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(!left.contains(&pk_a) && !left.contains(&pk_b));
    assert!(left.contains(&pk_d), "an unprocessed row was deleted");
    assert_eq!(ok(cfg, &["cleanup", "--json"])["change_log"], 0);
}
