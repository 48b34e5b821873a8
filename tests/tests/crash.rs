//! kill -9 mid-delivery, restart: every event delivered at least once, redeliveries carry the
//! same key, and the checkpoint row exists.

use std::collections::HashMap;
use std::time::Duration;

use observer_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_mid_delivery_then_resume_delivers_everything() {
    let db = TestDb::new().await;
    let rx = Receiver::start().await;
    rx.set_delay(Duration::from_millis(1));
    let cfg = db.config_listener(
        "id = \"test\"\nstart_from = \"beginning\"\nbatch_size = 100\nmax_pending_events = 100",
        &webhook_observer("o", "Order", &rx.url("/h"), "", ""),
    );
    let mut daemon = Daemon::start(&db, &cfg).await;
    db.exec(
        "INSERT INTO orders (id, status, total) SELECT g, 'new', g FROM generate_series(1, 2000) g",
    )
    .await;

    let t0 = std::time::Instant::now();
    rx.wait_for(300, Duration::from_secs(60)).await;
    eprintln!("300 deliveries took {:?}", t0.elapsed());
    daemon.kill9().await;
    let before_restart = rx.count();
    assert!(
        before_restart < 2000,
        "the daemon delivered everything before the kill; nothing was tested"
    );
    assert_eq!(
        db.checkpoints().await.len(),
        1,
        "a checkpoint row exists after the crash"
    );

    let mut daemon = Daemon::start(&db, &cfg).await;
    assert!(daemon.logs().contains("resuming"), "{}", daemon.logs());
    let ids: Vec<String> = db
        .change_log()
        .await
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 2000);
    eventually(
        Duration::from_secs(90),
        "every one of the 2000 events delivered at least once",
        || async {
            if rx.count() < ids.len() {
                return None;
            }
            let seen: std::collections::HashSet<String> =
                rx.requests().iter().map(|r| r.event_id()).collect();
            ids.iter().all(|i| seen.contains(i)).then_some(())
        },
    )
    .await;
    db.wait_caught_up("test", Duration::from_secs(30)).await;

    let mut keys: HashMap<String, Vec<String>> = HashMap::new();
    for r in rx.requests() {
        keys.entry(r.event_id())
            .or_default()
            .push(r.idempotency_key().to_string());
    }
    let mut redelivered = 0;
    for (event, ks) in &keys {
        let expected = idempotency_key(event.parse().unwrap(), "o", 0);
        assert!(
            ks.iter().all(|k| *k == expected),
            "event {event} delivered with keys {ks:?}"
        );
        if ks.len() > 1 {
            redelivered += 1;
        }
    }
    eprintln!(
        "delivered before kill: {before_restart}, events redelivered after restart: {redelivered}"
    );
    let cp = db.checkpoints().await;
    assert_eq!(cp.len(), 1);
    assert_eq!(cp[0]["listener_id"], "test");
    assert!(daemon.stop().await.success());
}
