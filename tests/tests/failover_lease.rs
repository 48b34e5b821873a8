//! The `failover` layer against real processes and real Postgres: a standby takes over after a
//! `kill -9` (through the holder's vanished session, not the lease), after SIGTERM (the lease is
//! handed back), after SIGSTOP past the lease (and the paused leader is fenced and stands by on
//! SIGCONT), when the leader's backends are terminated, and when its connections are
//! black-holed (a loopback proxy that stops forwarding). With dedup off, steady state with two
//! and three instances delivers every event exactly once; each test prints what it measured.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use observer_tests::metrics::{free_port, get, sample};
use observer_tests::tcp_proxy::TcpProxy;
use observer_tests::*;

const T: Duration = Duration::from_secs(30);

/// A test config: one webhook observer, the failover layer on with `lease_ms`.
fn failover_config(db: &TestDb, rx: &Receiver, lease_ms: u64, extra: &str) -> String {
    db.config(&format!(
        "[features]\nfailover = true\n\n[failover]\nlease_ms = {lease_ms}\n\n{extra}\n\n{}",
        webhook_observer("o", "Order", &rx.url("/h"), "", "")
    ))
}

/// Deliveries per event id, and whether every copy of an event carried one idempotency key.
fn per_event(rx: &Receiver) -> (HashMap<String, usize>, bool) {
    let mut m = HashMap::new();
    let mut keys: HashMap<String, String> = HashMap::new();
    let mut same = true;
    for r in rx.requests() {
        *m.entry(r.event_id()).or_insert(0) += 1;
        let k = r.idempotency_key().to_string();
        if let Some(old) = keys.insert(r.event_id(), k.clone()) {
            same &= old == k;
        }
    }
    (m, same)
}

fn assert_once(rx: &Receiver, n: usize) {
    let (m, _) = per_event(rx);
    assert_eq!(m.len(), n, "events delivered: {m:?}");
    let dups: Vec<_> = m.iter().filter(|(_, &c)| c != 1).collect();
    assert!(dups.is_empty(), "events delivered more than once: {dups:?}");
}

/// Starts a leader and then a standby (in that order, so which is which is known).
async fn pair(db: &TestDb, leader_cfg: &str, standby_cfg: &str) -> (Daemon, Daemon) {
    let leader = Daemon::start(db, leader_cfg).await;
    leader.wait_log("this instance is now the leader", T).await;
    let standby = Daemon::start(db, standby_cfg).await;
    standby.wait_log("standing by", T).await;
    (leader, standby)
}

/// Inserts order `id` and returns how long until it reached the receiver.
async fn time_to_delivery(db: &TestDb, rx: &Receiver, id: i64, from: Instant) -> Duration {
    db.insert_order(id, "new", 1.0).await;
    let before = rx.count();
    rx.wait_until(T, &format!("order {id} delivered"), |r| {
        r.len() > before
            && r.iter()
                .any(|q| q.json()["entity_id"] == serde_json::json!(id.to_string()))
    })
    .await;
    from.elapsed()
}

/// A leader and a standby on a fresh database (the leader's config passed through
/// `leader_cfg`), orders 1..=5 delivered and checkpointed.
async fn settled_pair(
    lease_ms: u64,
    leader_cfg: impl FnOnce(&str) -> String,
) -> (TestDb, Receiver, Daemon, Daemon) {
    let db = TestDb::new().await;
    let rx = Receiver::start().await;
    let cfg = failover_config(&db, &rx, lease_ms, "");
    let (leader, standby) = pair(&db, &leader_cfg(&cfg), &cfg).await;
    deliver_batch(&db, &rx, 1..=5).await;
    db.wait_caught_up("test", T).await;
    (db, rx, leader, standby)
}

/// Waits until the checkpoint covers everything, then checks `n` events arrived once each.
async fn caught_up_once(db: &TestDb, rx: &Receiver, n: usize) {
    db.wait_caught_up("test", T).await;
    assert_once(rx, n);
}

async fn deliver_batch(db: &TestDb, rx: &Receiver, ids: std::ops::RangeInclusive<i64>) {
    let n = ids.clone().count();
    let before = per_event(rx).0.len();
    for i in ids {
        db.insert_order(i, "new", 1.0).await;
    }
    rx.wait_until(T, "the batch delivered", |_| {
        per_event(rx).0.len() >= before + n
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_delivers_within_seconds_of_a_kill_9() {
    // The default lease: the takeover must come from the vanished session, not its expiry.
    let (db, rx, mut leader, mut standby) = settled_pair(5_000, str::to_string).await;

    leader.kill9().await;
    let killed = Instant::now();
    let took = time_to_delivery(&db, &rx, 6, killed).await;
    println!("kill -9: standby delivered {took:?} after the kill (lease 5 s)");
    assert!(
        took <= Duration::from_secs(5),
        "standby took {took:?}:\n{}",
        standby.logs()
    );
    assert!(
        standby.logs().contains("is gone"),
        "the standby saw the holder's session end:\n{}",
        standby.logs()
    );
    caught_up_once(&db, &rx, 6).await;
    assert!(standby.stop().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_hands_the_lease_back_and_a_standby_delivers_within_a_second() {
    let (db, rx, mut leader, mut standby) = settled_pair(5_000, str::to_string).await;

    let stopped = Instant::now();
    leader.signal("TERM");
    assert!(leader.wait_exit(T).await.expect("leader exits").success());
    let exited = stopped.elapsed();
    let took = time_to_delivery(&db, &rx, 6, stopped).await;
    println!(
        "SIGTERM: leader exited after {exited:?}; standby delivered {took:?} after the signal"
    );
    assert!(
        leader.logs().contains("failover lease handed back"),
        "{}",
        leader.logs()
    );
    assert!(
        took <= Duration::from_secs(1),
        "standby took {took:?} after SIGTERM:\n{}",
        standby.logs()
    );
    caught_up_once(&db, &rx, 6).await;
    assert!(standby.stop().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_paused_past_its_lease_is_fenced_and_stands_by_again() {
    let lease = Duration::from_millis(2_000);
    let (db, rx, mut leader, mut standby) =
        settled_pair(lease.as_millis() as u64, str::to_string).await;

    // Event 6 is in flight at the leader when it stops: the receiver holds its answer. The
    // pause comes once the writer has saved the checkpoint after event 6 was dispatched (a
    // flush or, at the latest, the 5 s heartbeat), so the writer is between transactions and,
    // with nothing else changing, stays there: it tries its next write after SIGCONT. (Paused
    // inside a transaction, its session is ended by the server after a lease: see the fence in
    // failover.rs.)
    rx.set_delay(Duration::from_secs(8));
    db.insert_order(6, "new", 1.0).await;
    rx.wait_for(6, T).await;
    let dispatched = chrono::Utc::now().to_rfc3339();
    eventually(
        T,
        "a checkpoint save after event 6 was dispatched",
        || async {
            let rows = db
                .json_rows(&format!(
                "SELECT updated_at > '{dispatched}'::timestamptz AS saved FROM observer_checkpoints"
            ))
                .await;
            (rows.first()?["saved"] == true).then_some(())
        },
    )
    .await;
    leader.signal("STOP");
    let paused = Instant::now();
    rx.set_delay(Duration::ZERO);
    let took = time_to_delivery(&db, &rx, 7, paused).await;
    println!("SIGSTOP: standby delivered {took:?} after the pause (lease {lease:?})");
    assert!(
        took <= lease + Duration::from_secs(1),
        "standby took {took:?}:\n{}",
        standby.logs()
    );
    // The paused leader's event 6 was redelivered by the new leader, with the same key.
    rx.wait_until(T, "event 6 redelivered", |_| {
        per_event(&rx).0.values().sum::<usize>() >= 8
    })
    .await;

    leader.signal("CONT");
    leader.wait_log("going back to standby", T).await;
    leader.wait_log("write refused", T).await;
    // Back to standby, and it stays there.
    eventually(T, "the old leader stands by again", || async {
        let logs = leader.logs();
        let back = logs.rfind("going back to standby")?;
        logs[back..].contains("standing by").then_some(())
    })
    .await;
    for i in 8..=12 {
        db.insert_order(i, "new", 1.0).await;
    }
    db.wait_caught_up("test", T).await;
    let (m, same_keys) = per_event(&rx);
    assert_eq!(m.len(), 12, "{m:?}");
    let dups: Vec<_> = m
        .iter()
        .filter(|(_, &c)| c > 1)
        .map(|(e, c)| (e.clone(), *c))
        .collect();
    println!("SIGSTOP: duplicates {dups:?} (in flight at the pause)");
    assert!(
        dups.len() <= 1 && dups.iter().all(|(_, c)| *c == 2),
        "{dups:?}"
    );
    assert!(same_keys, "a redelivery carries the same idempotency key");
    // Only the new leader's outcome for event 6 was recorded: the old one's write was refused.
    let rows = db
        .json_rows(
            "SELECT count(*) AS n FROM observer_action_log l JOIN tb_entity_change_log c ON c.id = l.event_id
             WHERE c.object_id = '6'",
        )
        .await;
    assert_eq!(
        rows[0]["n"], 1,
        "one recorded outcome for event 6: {rows:?}"
    );
    assert!(standby.stop().await.success());
    assert!(leader.stop().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_backends_are_terminated_stops_and_a_standby_takes_over() {
    let lease = Duration::from_millis(3_000);
    let (db, rx, mut leader, mut standby) =
        settled_pair(lease.as_millis() as u64, str::to_string).await;

    let killed = db
        .json_rows(&format!(
            "SELECT pg_terminate_backend(pid) AS ok FROM pg_stat_activity
             WHERE datname = current_database() AND application_name LIKE 'fraiseql-observers pid {} %'
                OR datname = current_database() AND application_name = 'fraiseql-observers pid {}'",
            leader.pid, leader.pid
        ))
        .await;
    assert!(killed.len() >= 3, "the leader's sessions: {killed:?}");
    let at = Instant::now();
    let took = time_to_delivery(&db, &rx, 6, at).await;
    println!(
        "pg_terminate_backend of {} sessions: standby delivered {took:?} after",
        killed.len()
    );
    assert!(
        took <= lease + Duration::from_secs(1),
        "{took:?}:\n{}",
        standby.logs()
    );
    leader.wait_log("standing by", T).await;
    deliver_batch(&db, &rx, 7..=10).await;
    caught_up_once(&db, &rx, 10).await;
    assert!(standby.stop().await.success());
    assert!(leader.stop().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_postgres_loses_its_lease_and_a_standby_takes_over() {
    let lease = Duration::from_millis(2_000);
    let proxy = TcpProxy::start("127.0.0.1:5432".parse().expect("addr")).await;
    let (db, rx, mut leader, mut standby) = settled_pair(lease.as_millis() as u64, |cfg| {
        let via_proxy = cfg.replace(
            "127.0.0.1:5432",
            &format!("127.0.0.1:{}", proxy.addr.port()),
        );
        assert_ne!(via_proxy, cfg, "the leader's config goes through the proxy");
        via_proxy
    })
    .await;

    proxy.freeze();
    let cut = Instant::now();
    let cut_at = chrono::Utc::now();
    let took = time_to_delivery(&db, &rx, 6, cut).await;
    println!("black hole: standby delivered {took:?} after the cut (lease {lease:?})");
    assert!(
        took <= lease + Duration::from_secs(1),
        "{took:?}:\n{}",
        standby.logs()
    );
    leader.wait_log("failover lease lost", lease * 2).await;
    // When it stopped, by the timestamp of its own log line.
    let logs = leader.logs();
    let line = logs
        .lines()
        .find(|l| l.contains("failover lease lost"))
        .unwrap_or_default();
    let logged: chrono::DateTime<chrono::Utc> = line
        .split_whitespace()
        .next()
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("no timestamp in {line:?}"));
    let stopped = (logged - cut_at).to_std().unwrap_or_default();
    println!("black hole: the cut-off leader stopped dispatching {stopped:?} after the cut");
    assert!(stopped <= lease, "{stopped:?}: {line}");

    proxy.thaw();
    leader.wait_log("standing by", T).await;
    deliver_batch(&db, &rx, 7..=10).await;
    caught_up_once(&db, &rx, 10).await;
    assert!(standby.stop().await.success());
    assert!(leader.stop().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_deliver_each_event_once_and_status_lists_them() {
    let db = TestDb::new().await;
    let rx = Receiver::start().await;
    let ports = [free_port(), free_port(), free_port()];
    let cfgs: Vec<String> = ports
        .iter()
        .map(|p| {
            failover_config(
                &db,
                &rx,
                5_000,
                &format!("[metrics]\nlisten = \"127.0.0.1:{p}\"\n"),
            )
            .replace("[features]\n", "[features]\nmetrics = true\n")
        })
        .collect();
    let leader = Daemon::start(&db, &cfgs[0]).await;
    leader.wait_log("now the leader", T).await;
    let mut others = Vec::new();
    for c in &cfgs[1..] {
        let d = Daemon::start(&db, c).await;
        d.wait_log("standing by", T).await;
        others.push(d);
    }
    // Steady state with three instances, then with two after the leader's clean stop.
    for burst in 0..4 {
        deliver_batch(&db, &rx, (burst * 50 + 1)..=(burst * 50 + 50)).await;
    }
    db.wait_caught_up("test", T).await;
    assert_once(&rx, 200);

    let metrics = |p: u16| async move {
        get(&format!("http://127.0.0.1:{p}/metrics"))
            .await
            .map(|(_, body)| body)
            .unwrap_or_else(|e| panic!("metrics of port {p}: {e}"))
    };
    let text = metrics(ports[0]).await;
    assert_eq!(sample(&text, "observer_leader", &[]), Some(1.0), "{text}");
    assert_eq!(
        sample(
            &text,
            "observer_leader_takeovers_total",
            &[("reason", "vacant")]
        ),
        Some(1.0)
    );
    assert!(sample(&text, "observer_lease_seconds_since_renewal", &[]).is_some_and(|s| s < 5.0));
    for p in &ports[1..] {
        let text = metrics(*p).await;
        assert_eq!(sample(&text, "observer_leader", &[]), Some(0.0), "{text}");
    }

    let status_cfg = db.write_file("status.toml", &cfgs[0]);
    let out = run_cli(&["--config", status_cfg.to_str().unwrap(), "status", "--json"]).await;
    assert!(out.status.success(), "{}", output_text(&out));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    let instances = j["instances"].as_array().expect("instances").clone();
    assert_eq!(instances.len(), 3, "{j}");
    let leaders: Vec<_> = instances.iter().filter(|i| i["leads"] == true).collect();
    assert_eq!(leaders.len(), 1, "{j}");
    assert_eq!(leaders[0]["pid"], leader.pid, "{j}");
    assert_eq!(j["lease"]["held"], true, "{j}");
    assert_eq!(j["state"], "running", "{j}");
    for i in &instances {
        assert!(
            i["heartbeat_age_secs"].as_f64().is_some_and(|a| a < 5.0),
            "{i}"
        );
        for key in ["host", "pid", "role", "since", "heartbeat_at"] {
            assert!(!i[key].is_null(), "{key} in {i}");
        }
    }
    let out = run_cli(&["--config", status_cfg.to_str().unwrap(), "status"]).await;
    let text = output_text(&out);
    assert!(text.contains("instances     3"), "{text}");
    assert!(text.contains(&format!(":{}  leader", leader.pid)), "{text}");
    assert_eq!(text.matches("standby").count(), 2, "{text}");

    let mut leader = leader;
    assert!(leader.stop().await.success());
    deliver_batch(&db, &rx, 201..=250).await;
    db.wait_caught_up("test", T).await;
    assert_once(&rx, 250);
    // The stopped leader deregistered; the two left are a leader and a standby.
    let out = run_cli(&["--config", status_cfg.to_str().unwrap(), "status", "--json"]).await;
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    assert_eq!(j["instances"].as_array().map(Vec::len), Some(2), "{j}");
    for mut d in others {
        assert!(d.stop().await.success());
    }
}

#[tokio::test]
async fn failover_without_checkpoints_is_refused_naming_both_keys() {
    let db = TestDb::new().await;
    let rx = Receiver::start().await;
    let cfg = failover_config(&db, &rx, 5_000, "")
        .replace("[features]\n", "[features]\ncheckpoint = false\n");
    let out = db.cli_with(&cfg, &["run"]).await;
    let text = output_text(&out);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("features.failover") && text.contains("features.checkpoint"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_design_example_with_failover_on_validates_and_runs_as_a_pair() {
    let db = TestDb::new().await;
    let example = workspace_root().join("config/example-ha.toml");
    let env = [
        ("DATABASE_URL", db.url.as_str()),
        (
            "ORDERS_WEBHOOK_SECRET",
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        ),
    ];
    let mut c = command();
    c.args([
        "--config",
        example.to_str().unwrap(),
        "validate",
        example.to_str().unwrap(),
    ]);
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().await.expect("run validate");
    assert!(out.status.success(), "{}", output_text(&out));
    let text = std::fs::read_to_string(&example).expect("read the example");
    let mut leader = Daemon::start_with_env(&db, &text, &env).await;
    leader.wait_log("now the leader", T).await;
    let mut standby = Daemon::start_with_env(&db, &text, &env).await;
    standby.wait_log("standing by", T).await;
    assert!(leader.stop().await.success());
    standby.wait_log("now the leader", T).await;
    assert!(standby.stop().await.success());
}
