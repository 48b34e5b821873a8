//! The `nats` layer end to end, against a private `nats-server -js` (its own port and store),
//! real Postgres and a real HTTP receiver: a publisher (`run --role publisher`) and workers
//! (`run --role worker`) as separate processes. Every test waits on conditions, never on time.

use std::collections::HashMap;
use std::time::Duration;

use observer_tests::nats_server::{nats_section, PrivateNats};
use observer_tests::*;

const T: Duration = Duration::from_secs(60);
const WORKER_READY: &str = "starting as a worker";

/// A config for both roles: the nats layer on, the worker stack concurrent, one webhook
/// observer on `Order`.
fn config(
    db: &TestDb,
    nats: &PrivateNats,
    stream: &str,
    partitions: u32,
    features: &str,
    nats_extra: &str,
    observer: &str,
) -> String {
    db.config(&format!(
        "[features]\nnats = true\nconcurrent = true\n{features}\n\n[concurrent]\nmax_in_flight = 64\n\n{}\n\n{observer}",
        nats_section(&nats.url(), stream, partitions, nats_extra)
    ))
}

async fn migrate_nats(db: &TestDb, cfg: &str) {
    let out = db.cli_with(cfg, &["migrate", "--nats"]).await;
    assert!(
        out.status.success(),
        "migrate --nats: {}",
        output_text(&out)
    );
}

async fn worker(db: &TestDb, cfg: &str) -> Daemon {
    Daemon::start_args(db, cfg, &["--role", "worker"], WORKER_READY).await
}

async fn publisher(db: &TestDb, cfg: &str) -> Daemon {
    publisher_env(db, cfg, &[]).await
}

async fn publisher_env(db: &TestDb, cfg: &str, env: &[(&str, &str)]) -> Daemon {
    let d =
        Daemon::spawn_args(&db.dir, cfg, &["--role", "publisher"], env).expect("spawn publisher");
    d.wait_log_any(&READY_MARKERS, T).await;
    d
}

/// Deliveries per event id.
fn per_event(rx: &Receiver) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for r in rx.requests() {
        *m.entry(r.event_id()).or_insert(0) += 1;
    }
    m
}

async fn insert_orders(db: &TestDb, ids: std::ops::Range<i64>) {
    for id in ids {
        db.insert_order(id, "new", 1.0).await;
    }
}

/// `status --json`'s nats section.
async fn nats_status(db: &TestDb, cfg: &str) -> serde_json::Value {
    let out = db.cli_with(cfg, &["status", "--json"]).await;
    assert!(out.status.success(), "status: {}", output_text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status --json");
    v["nats"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_share_the_load_and_every_event_is_delivered() {
    let nats = PrivateNats::start().await;
    let db = TestDb::new().await;
    let rx = Receiver::start().await;
    rx.set_delay(Duration::from_millis(5));
    let cfg = config(
        &db,
        &nats,
        "SHARE",
        8,
        "",
        "",
        &webhook_observer("o", "Order", &rx.url("/h"), "", ""),
    );
    migrate_nats(&db, &cfg).await;
    let mut w = Vec::new();
    for _ in 0..3 {
        w.push(worker(&db, &cfg).await);
    }
    let mut p = publisher(&db, &cfg).await;
    let n = 300;
    insert_orders(&db, 1..n + 1).await;
    rx.wait_until(T, "every event delivered", |r| {
        r.iter()
            .map(|x| x.event_id())
            .collect::<std::collections::HashSet<_>>()
            .len()
            == n as usize
    })
    .await;
    let m = per_event(&rx);
    assert_eq!(m.len(), n as usize);
    assert!(
        m.values().all(|&c| c == 1),
        "steady state delivers each event once: {m:?}"
    );
    // status: the stream drains, and each worker acknowledged a share.
    let status = eventually(
        T,
        "the stream empty and every worker's share acknowledged",
        || async {
            let s = nats_status(&db, &cfg).await;
            let workers = s["stream"]["workers"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let acked: u64 = workers
                .iter()
                .map(|w| w["acked"].as_u64().unwrap_or(0))
                .sum();
            (s["stream"]["messages"] == 0 && workers.len() == 3 && acked == n as u64).then_some(s)
        },
    )
    .await;
    let workers = status["stream"]["workers"].as_array().unwrap();
    for wk in workers {
        assert!(
            wk["acked"].as_u64().unwrap() > 0,
            "a worker that delivered nothing: {status}"
        );
    }
    assert_eq!(
        status["stream"]["consumers"].as_array().unwrap().len(),
        8,
        "{status}"
    );
    println!(
        "shares: {:?}",
        workers
            .iter()
            .map(|w| w["acked"].clone())
            .collect::<Vec<_>>()
    );
    p.stop().await;
    for mut d in w {
        d.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_stream_loses_nothing() {
    let nats = PrivateNats::start().await;
    let db = TestDb::new().await;
    let rx = Receiver::start().await;
    rx.set_delay(Duration::from_millis(20));
    let partitions = 8;
    let cfg = config(
        &db,
        &nats,
        "KILLW",
        partitions,
        "",
        "",
        &webhook_observer("o", "Order", &rx.url("/h"), "", ""),
    );
    migrate_nats(&db, &cfg).await;
    let mut a = worker(&db, &cfg).await;
    let mut b = worker(&db, &cfg).await;
    let mut p = publisher(&db, &cfg).await;
    let n = 200;
    insert_orders(&db, 1..n + 1).await;
    rx.wait_for(40, T).await;
    a.kill9().await;
    rx.wait_until(T, "every event delivered after the kill", |r| {
        r.iter()
            .map(|x| x.event_id())
            .collect::<std::collections::HashSet<_>>()
            .len()
            == n as usize
    })
    .await;
    let m = per_event(&rx);
    let ids: std::collections::HashSet<String> = db
        .change_log()
        .await
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        m.keys().cloned().collect::<std::collections::HashSet<_>>(),
        ids,
        "loss 0"
    );
    let dups: usize = m.values().map(|c| c - 1).sum();
    // Only what the killed worker had in flight comes again: at most one per partition.
    assert!(dups <= partitions as usize, "{dups} duplicates");
    // Each duplicate carries the same idempotency key as its first delivery.
    let mut keys: HashMap<String, String> = HashMap::new();
    for r in rx.requests() {
        let k = r.idempotency_key().to_string();
        if let Some(old) = keys.insert(r.event_id(), k.clone()) {
            assert_eq!(old, k);
        }
    }
    println!("duplicates after kill -9 of a worker: {dups}");
    p.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_publisher_is_replaced_and_the_stream_holds_each_event_once() {
    let nats = PrivateNats::start().await;
    let db = TestDb::new().await;
    let rx = Receiver::start().await;
    let cfg = config(
        &db,
        &nats,
        "KILLP",
        4,
        "failover = true\n\n[failover]\nlease_ms = 2000",
        "",
        &webhook_observer("o", "Order", &rx.url("/h"), "", ""),
    );
    migrate_nats(&db, &cfg).await;
    // The checkpoint is written every 2 s, so at the kill the stream surely holds events past
    // it: the standby republishes them, and only `Nats-Msg-Id` keeps them from being stored twice.
    let slow_checkpoint = [("OBSERVER__LISTENER__FLUSH_INTERVAL_MS", "2000")];
    let mut a = publisher_env(&db, &cfg, &slow_checkpoint).await;
    a.wait_log("this instance is now the leader", T).await;
    // The standby's metrics say how many of its publishes the stream already held.
    let metrics_at = format!("127.0.0.1:{}", observer_tests::metrics::free_port());
    let mut b = publisher_env(
        &db,
        &cfg,
        &[
            slow_checkpoint[0],
            ("OBSERVER__FEATURES__METRICS", "true"),
            ("OBSERVER__METRICS__LISTEN", &metrics_at),
        ],
    )
    .await;
    b.wait_log("standing by", T).await;
    // No worker yet: the stream keeps everything published, so its count is the proof.
    let n = 300i64;
    let writer = {
        let url = db.url.clone();
        tokio::spawn(async move {
            let c = connect(&url).await;
            for id in 1..=n {
                c.execute(
                    "INSERT INTO orders (id, status, total) VALUES ($1, 'new', 1)",
                    &[&id],
                )
                .await
                .expect("insert");
                if id % 20 == 0 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        })
    };
    eventually(T, "the first publisher has published some", || async {
        (nats.stream_last_sequence("KILLP").await >= 50).then_some(())
    })
    .await;
    a.kill9().await;
    writer.await.expect("writer");
    b.wait_log("this instance is now the leader", T).await;
    eventually(T, "every event in the stream", || async {
        (nats.stream_messages("KILLP").await >= n as u64).then_some(())
    })
    .await;
    // Give the new leader a moment past catching up: nothing more may arrive.
    db.wait_caught_up("test", T).await;
    assert_eq!(
        nats.stream_messages("KILLP").await,
        n as u64,
        "each event stored once"
    );
    assert_eq!(
        nats.stream_last_sequence("KILLP").await,
        n as u64,
        "no duplicate was stored"
    );
    let (_, text) = observer_tests::metrics::get(&format!("http://{metrics_at}/metrics"))
        .await
        .expect("the standby's metrics");
    let dups =
        observer_tests::metrics::sample(&text, "observer_nats_publish_duplicates_total", &[])
            .unwrap_or(0.0);
    assert!(
        dups > 0.0,
        "the standby republished nothing the first had published: the test proved nothing"
    );
    println!("republished after the takeover and absorbed by the duplicate window: {dups}");
    let mut w = worker(&db, &cfg).await;
    rx.wait_until(T, "every event delivered", |r| r.len() >= n as usize)
        .await;
    let m = per_event(&rx);
    assert_eq!(m.len(), n as usize);
    assert!(m.values().all(|&c| c == 1), "{m:?}");
    w.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_restart_mid_run_loses_nothing() {
    let mut nats = PrivateNats::start().await;
    let db = TestDb::new().await;
    let rx = Receiver::start().await;
    let cfg = config(
        &db,
        &nats,
        "RESTART",
        4,
        "",
        "",
        &webhook_observer("o", "Order", &rx.url("/h"), "", ""),
    );
    migrate_nats(&db, &cfg).await;
    let mut w1 = worker(&db, &cfg).await;
    let mut w2 = worker(&db, &cfg).await;
    let mut p = publisher(&db, &cfg).await;
    insert_orders(&db, 1..51).await;
    rx.wait_for(50, T).await;
    nats.kill();
    insert_orders(&db, 51..101).await;
    nats.restart().await;
    insert_orders(&db, 101..151).await;
    rx.wait_until(T, "every event delivered after the restart", |r| {
        r.iter()
            .map(|x| x.event_id())
            .collect::<std::collections::HashSet<_>>()
            .len()
            == 150
    })
    .await;
    assert!(
        p.try_status().is_none() && w1.try_status().is_none() && w2.try_status().is_none(),
        "everyone stayed up"
    );
    p.stop().await;
    w1.stop().await;
    w2.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_entity_order_holds_across_three_workers_with_a_flaky_receiver() {
    let nats = PrivateNats::start().await;
    let db = TestDb::new().await;
    let rx = Receiver::start().await;
    // Every other answer fails: each event is retried before the next of its entity starts.
    rx.behave(|b| {
        b.path_sequence.insert(
            "/h".into(),
            (0..4000)
                .map(|i| if i % 2 == 0 { 503 } else { 204 })
                .collect(),
        );
    });
    let observer = webhook_observer(
        "o",
        "Order",
        &rx.url("/h"),
        "",
        r#"retry = { max_attempts = 50, backoff = "fixed", initial_ms = 10, max_ms = 10 }"#,
    );
    let cfg = config(&db, &nats, "ORDER", 8, "", "", &observer);
    migrate_nats(&db, &cfg).await;
    let mut w = Vec::new();
    for _ in 0..3 {
        w.push(worker(&db, &cfg).await);
    }
    let mut p = publisher(&db, &cfg).await;
    let (orders, updates) = (12i64, 8);
    insert_orders(&db, 1..orders + 1).await;
    for round in 0..updates {
        for id in 1..=orders {
            db.set_status(id, &format!("s{round}")).await;
        }
    }
    let total = (orders * (updates + 1)) as usize;
    rx.wait_until(T, "every event delivered", |r| {
        r.iter()
            .filter(|x| x.status < 300)
            .map(|x| x.event_id())
            .collect::<std::collections::HashSet<_>>()
            .len()
            == total
    })
    .await;
    let pk: HashMap<String, i64> = db
        .change_log()
        .await
        .iter()
        .map(|r| {
            (
                r["id"].as_str().unwrap().to_string(),
                r["pk_entity_change_log"].as_i64().unwrap(),
            )
        })
        .collect();
    let mut last: HashMap<String, i64> = HashMap::new();
    for r in rx.requests() {
        let entity = r.json()["entity_id"].as_str().unwrap().to_string();
        let this = pk[&r.event_id()];
        if let Some(prev) = last.insert(entity.clone(), this) {
            assert!(
                prev <= this,
                "order {entity}: event pk {this} started after pk {prev}"
            );
        }
    }
    p.stop().await;
    for mut d in w {
        d.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_event_ends_in_the_dead_letter_table_after_max_deliver() {
    let nats = PrivateNats::start().await;
    let db = TestDb::new().await;
    let rx = Receiver::start().await;
    // The receiver never answers in time: each worker that takes the event is killed while
    // its action runs — as a worker that crashes on this event would be.
    rx.set_delay(Duration::from_secs(120));
    let observer = webhook_observer("o", "Order", &rx.url("/h"), "", "timeout_ms = 300000");
    let cfg = config(&db, &nats, "POISON", 2, "", "max_deliver = 2\n", &observer);
    migrate_nats(&db, &cfg).await;
    let mut p = publisher(&db, &cfg).await;
    db.insert_order(1, "new", 1.0).await;
    for delivery in 1..=2 {
        let mut w = worker(&db, &cfg).await;
        rx.wait_for(delivery, T).await;
        w.kill9().await;
    }
    let mut last = worker(&db, &cfg).await;
    let dl = eventually(T, "the event dead-lettered", || async {
        let d = db.dead_letters().await;
        (!d.is_empty()).then_some(d)
    })
    .await;
    assert_eq!(dl.len(), 1, "{dl:?}");
    assert_eq!(dl[0]["reason"], "max_deliver_exceeded", "{dl:?}");
    assert!(
        dl[0]["last_error"]
            .as_str()
            .unwrap()
            .contains("nats.max_deliver = 2"),
        "{dl:?}"
    );
    let ids = db.event_ids("Order", "1").await;
    assert_eq!(dl[0]["event_id"], ids[0].to_string());
    eventually(T, "the stream empty", || async {
        (nats.stream_messages("POISON").await == 0).then_some(())
    })
    .await;
    assert_eq!(rx.count(), 2, "the third delivery did not run the action");
    last.stop().await;
    p.stop().await;
}
