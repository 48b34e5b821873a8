//! `dedup`: one delivery per idempotency key within the window — across duplicate change-log
//! rows, two daemons and a restart — against real Postgres, real Redis and a real receiver; and
//! nothing lost while Redis is down (`process` runs anyway, `wait` defers until it is back).

use std::collections::HashSet;
use std::time::Duration;

use observer_tests::redis_server::{shared_redis_url, PrivateRedis, RedisPrefix};
use observer_tests::*;
use serde_json::json;

const T: Duration = Duration::from_secs(40);

fn config(db: &TestDb, listener: &str, sections: &str, url: &str) -> String {
    db.config_listener(
        &format!("id = \"{listener}\"\nstart_from = \"beginning\""),
        &format!(
            "{sections}\n{}",
            webhook_observer("o", "Order", url, "", "  timeout_ms = 2000")
        ),
    )
}

fn features(extra: &str) -> String {
    format!("[features]\ndedup = true\nconcurrent = true\n{extra}\n")
}

/// Two change-log rows carrying one event id (as a replayed outbox write would).
async fn duplicate_rows(db: &TestDb, object_id: &str) -> uuid::Uuid {
    let id = uuid::Uuid::new_v4();
    for _ in 0..2 {
        db.client
            .execute(
                "INSERT INTO tb_entity_change_log (id, object_type, object_id, modification_type, object_data)
                 VALUES ($1, 'Order', $2, 'INSERT', $3)",
                &[&id, &object_id, &json!({"id": object_id})],
            )
            .await
            .expect("insert duplicate change-log row");
    }
    id
}

fn outcomes(log: &[serde_json::Value]) -> Vec<String> {
    log.iter()
        .map(|r| r["outcome"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_rows_with_one_event_id_are_delivered_once() {
    let db = TestDb::new().await;
    let rx = Receiver::start().await;
    let redis = RedisPrefix::new(&shared_redis_url());
    let cfg = config(
        &db,
        "test",
        &format!("{}{}", features(""), redis.section()),
        &rx.url("/h"),
    );
    let mut daemon = Daemon::start(&db, &cfg).await;
    let dup = duplicate_rows(&db, "1").await;
    let other = db
        .insert_change("Order", Some("2"), "INSERT", Some(json!({"id": "2"})))
        .await;
    db.wait_caught_up("test", T).await;
    let reqs = rx.requests();
    let ids: Vec<String> = reqs.iter().map(|r| r.event_id()).collect();
    assert_eq!(reqs.len(), 2, "one request per event id: {ids:?}");
    assert!(ids.contains(&dup.to_string()) && ids.contains(&other.to_string()));
    let log = db.action_log().await;
    let mut o = outcomes(&log);
    o.sort();
    assert_eq!(o, ["delivered", "delivered", "duplicate"], "{log:?}");
    let key = idempotency_key(dup, "o", 0);
    assert_eq!(
        redis.get(&format!("dedup:{key}")).await.as_deref(),
        Some("done")
    );
    assert!(daemon.stop().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switched_off_from_the_environment_the_duplicate_is_delivered_twice() {
    let db = TestDb::new().await;
    let rx = Receiver::start().await;
    let redis = RedisPrefix::new(&shared_redis_url());
    let cfg = config(
        &db,
        "test",
        &format!("{}{}", features(""), redis.section()),
        &rx.url("/h"),
    );
    let mut daemon =
        Daemon::start_with_env(&db, &cfg, &[("OBSERVER__FEATURES__DEDUP", "false")]).await;
    let dup = duplicate_rows(&db, "1").await;
    db.wait_caught_up("test", T).await;
    let reqs = rx.requests();
    assert_eq!(reqs.len(), 2);
    assert!(reqs.iter().all(|r| r.event_id() == dup.to_string()));
    assert_eq!(outcomes(&db.action_log().await), ["delivered", "delivered"]);
    assert!(
        redis.keys("dedup:*").await.is_empty(),
        "the layer is not in the stack"
    );
    assert!(daemon.stop().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_on_one_redis_deliver_each_key_once() {
    let db = TestDb::new().await;
    let rx = Receiver::start().await;
    rx.set_delay(Duration::from_millis(20));
    let redis = RedisPrefix::new(&shared_redis_url());
    let sections = format!("{}{}", features(""), redis.section());
    let mut a = Daemon::start(&db, &config(&db, "a", &sections, &rx.url("/h"))).await;
    let mut b = Daemon::start(&db, &config(&db, "b", &sections, &rx.url("/h"))).await;
    db.exec(
        "INSERT INTO tb_entity_change_log (object_type, object_id, modification_type, object_data)
         SELECT 'Order', g::text, 'INSERT', jsonb_build_object('id', g) FROM generate_series(1, 30) g",
    )
    .await;
    db.wait_caught_up("a", T).await;
    db.wait_caught_up("b", T).await;
    let reqs = rx.requests();
    let keys: HashSet<&str> = reqs.iter().map(|r| r.idempotency_key()).collect();
    assert_eq!(keys.len(), 30, "every event delivered");
    assert_eq!(reqs.len(), 30, "and each once, by one of the two daemons");
    let log = db.action_log().await;
    let o = outcomes(&log);
    assert_eq!(o.len(), 60, "both listeners recorded every event");
    assert_eq!(o.iter().filter(|x| *x == "delivered").count(), 30);
    assert_eq!(o.iter().filter(|x| *x == "duplicate").count(), 30);
    assert!(db.dead_letters().await.is_empty());
    assert!(a.stop().await.success());
    assert!(b.stop().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_replaying_within_the_window_does_not_redeliver() {
    let db = TestDb::new().await;
    let rx = Receiver::start().await;
    let redis = RedisPrefix::new(&shared_redis_url());
    let cfg = config(
        &db,
        "test",
        &format!("{}{}", features(""), redis.section()),
        &rx.url("/h"),
    );
    let mut daemon = Daemon::start(&db, &cfg).await;
    for i in 1..=3 {
        db.insert_order(i, "new", 1.0).await;
    }
    db.wait_caught_up("test", T).await;
    assert_eq!(rx.count(), 3);
    assert!(daemon.stop().await.success());
    let first = db.event_ids("Order", "1").await[0].to_string();
    let out = db
        .cli_with(&cfg, &["checkpoint", "set", "--event-id", &first, "--yes"])
        .await;
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(
        db.unprocessed("test").await >= 3,
        "the checkpoint went back"
    );
    let mut daemon = Daemon::start(&db, &cfg).await;
    db.wait_caught_up("test", T).await;
    assert_eq!(rx.count(), 3, "nothing delivered again");
    let o = outcomes(&db.action_log().await);
    assert_eq!(
        o,
        [
            "delivered",
            "delivered",
            "delivered",
            "duplicate",
            "duplicate",
            "duplicate"
        ]
    );
    assert!(daemon.stop().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_with_process_still_delivers() {
    let db = TestDb::new().await;
    let rx = Receiver::start().await;
    let mut server = PrivateRedis::start().await;
    let redis = RedisPrefix::new(&server.url());
    let cfg = config(
        &db,
        "test",
        &format!(
            "{}{}[dedup]\non_unavailable = \"process\"\n",
            features(""),
            redis.section()
        ),
        &rx.url("/h"),
    );
    let mut daemon = Daemon::start(&db, &cfg).await;
    db.insert_order(1, "new", 1.0).await;
    rx.wait_for(1, T).await;
    db.wait_caught_up("test", T).await;
    server.kill();
    for i in 2..=4 {
        db.insert_order(i, "new", 1.0).await;
    }
    db.wait_caught_up("test", T).await;
    assert_eq!(rx.count(), 4, "delivered without the dedup store");
    assert_eq!(
        outcomes(&db.action_log().await),
        ["delivered", "delivered", "delivered", "delivered"]
    );
    let logs = daemon.logs();
    assert_eq!(
        logs.matches("dedup: Redis unreachable").count(),
        1,
        "logged once per outage:\n{logs}"
    );
    assert!(daemon.stop().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_with_wait_defers_then_delivers_after_it_is_back() {
    let db = TestDb::new().await;
    let rx = Receiver::start().await;
    let mut server = PrivateRedis::start().await;
    let redis = RedisPrefix::new(&server.url());
    let cfg = config(
        &db,
        "test",
        &format!(
            "{}{}[dedup]\non_unavailable = \"wait\"\n",
            features(""),
            redis.section()
        ),
        &rx.url("/h"),
    );
    let mut daemon = Daemon::start(&db, &cfg).await;
    db.insert_order(1, "new", 1.0).await;
    rx.wait_for(1, T).await;
    db.wait_caught_up("test", T).await;
    server.kill();
    for i in 2..=4 {
        db.insert_order(i, "new", 1.0).await;
    }
    daemon
        .wait_log("dedup: Redis unreachable", Duration::from_secs(20))
        .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(rx.count(), 1, "nothing runs while the dedup store is down");
    assert!(db.unprocessed("test").await >= 3, "and nothing is skipped");
    server.restart().await;
    db.wait_caught_up("test", T).await;
    let reqs = rx.requests();
    let keys: HashSet<&str> = reqs.iter().map(|r| r.idempotency_key()).collect();
    assert_eq!(
        (reqs.len(), keys.len()),
        (4, 4),
        "each delivered once after Redis returned"
    );
    assert!(db.dead_letters().await.is_empty());
    let logs = daemon.logs();
    assert_eq!(
        logs.matches("dedup: Redis unreachable").count(),
        1,
        "logged once per outage:\n{logs}"
    );
    assert!(logs.contains("dedup: Redis answers again"), "{logs}");
    // The deliveries were deferred, not attempted: one attempt each.
    for row in db.action_log().await {
        assert_eq!(row["attempts"].as_array().map(Vec::len), Some(1), "{row}");
    }
    assert!(daemon.stop().await.success());
}
