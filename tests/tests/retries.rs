//! Retries: transient failures are retried with the same key, permanent ones dead-lettered at
//! once, `Retry-After` honoured, and a failing destination delays nobody else.

use std::time::Duration;

use observer_tests::*;
use serde_json::json;

const T: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_503s_then_delivered_on_attempt_three_with_same_key() {
    let db = TestDb::new().await;
    let rx = Receiver::start().await;
    rx.fail_first(2, 503);
    let retry =
        r#"  retry = { max_attempts = 5, backoff = "exponential", initial_ms = 50, max_ms = 500 }"#;
    let mut daemon = Daemon::start(
        &db,
        &db.config(&webhook_observer("o", "Order", &rx.url("/h"), "", retry)),
    )
    .await;
    db.insert_order(1, "new", 1.0).await;
    db.wait_caught_up("test", T).await;
    let reqs = rx.requests();
    assert_eq!(
        reqs.iter().map(|r| r.status).collect::<Vec<_>>(),
        [503, 503, 204]
    );
    let id = db.event_ids("Order", "1").await[0];
    for r in &reqs {
        assert_eq!(
            r.idempotency_key(),
            idempotency_key(id, "o", 0),
            "same key on every attempt"
        );
        assert_eq!(r.header("webhook-id"), Some(r.idempotency_key()));
    }
    let log = db.action_log().await;
    assert_eq!(log.len(), 1, "{log:?}");
    assert_eq!(log[0]["outcome"], "delivered");
    assert_eq!(log[0]["attempts"].as_array().unwrap().len(), 3);
    assert!(db.dead_letters().await.is_empty());
    assert!(daemon.stop().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_400_is_dead_lettered_at_once() {
    let db = TestDb::new().await;
    let rx = Receiver::start().await;
    rx.set_status(400);
    let mut daemon = Daemon::start(
        &db,
        &db.config(&webhook_observer("o", "Order", &rx.url("/h"), "", "")),
    )
    .await;
    db.insert_order(1, "new", 1.0).await;
    db.wait_caught_up("test", T).await;
    assert_eq!(rx.count(), 1, "a 4xx is not retried");
    let dl = db.dead_letters().await;
    assert_eq!(dl.len(), 1, "{dl:?}");
    assert_eq!(dl[0]["reason"], "permanent_failure");
    assert_eq!(dl[0]["attempts"].as_array().unwrap().len(), 1);
    assert_eq!(dl[0]["status"], "pending");
    assert_eq!(dl[0]["observer"], "o");
    assert!(
        dl[0]["last_error"].as_str().unwrap().contains("400"),
        "{}",
        dl[0]["last_error"]
    );
    assert!(daemon.stop().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_honoured() {
    let db = TestDb::new().await;
    let rx = Receiver::start().await;
    rx.set_path_sequence("/h", &[503]);
    rx.set_retry_after(Some("1"));
    let retry =
        r#"  retry = { max_attempts = 3, backoff = "fixed", initial_ms = 50, max_ms = 5000 }"#;
    let mut daemon = Daemon::start(
        &db,
        &db.config(&webhook_observer("o", "Order", &rx.url("/h"), "", retry)),
    )
    .await;
    db.insert_order(1, "new", 1.0).await;
    let reqs = rx.wait_for(2, T).await;
    assert_eq!(reqs[0].status, 503);
    assert_eq!(reqs[1].status, 204);
    let gap = reqs[1].at.duration_since(reqs[0].at);
    assert!(
        gap >= Duration::from_millis(1000),
        "Retry-After: 1 not honoured: gap {gap:?}"
    );
    assert_eq!(reqs[0].idempotency_key(), reqs[1].idempotency_key());
    assert!(daemon.stop().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_destination_does_not_delay_unrelated_events() {
    let db = TestDb::new().await;
    let rx = Receiver::start().await;
    rx.set_path_status("/bad", 503);
    let bad_retry =
        r#"  retry = { max_attempts = 8, backoff = "fixed", initial_ms = 500, max_ms = 500 }"#;
    let observers = [
        webhook_observer("bad", "Order", &rx.url("/bad"), "", bad_retry),
        webhook_observer("good", "Customer", &rx.url("/good"), "", ""),
    ]
    .concat();
    let mut daemon = Daemon::start(&db, &db.config(&observers)).await;
    db.insert_order(1, "new", 1.0).await;
    rx.wait_until(T, "first attempt at /bad", |r| {
        r.iter().any(|r| r.path == "/bad")
    })
    .await;
    let started = std::time::Instant::now();
    for i in 0..5 {
        db.insert_change(
            "Customer",
            Some(&format!("c{i}")),
            "INSERT",
            Some(json!({"i": i})),
        )
        .await;
    }
    rx.wait_until(T, "5 deliveries at /good", |r| {
        r.iter().filter(|r| r.path == "/good").count() >= 5
    })
    .await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "unrelated deliveries took {took:?} while /bad was retrying"
    );
    assert!(
        db.dead_letters().await.is_empty(),
        "/bad must still be retrying, not finished"
    );
    let bad = rx.requests_to("/bad");
    assert!(
        bad.len() < 8,
        "bad finished its attempts already: {}",
        bad.len()
    );
    // Its retries keep going after the unrelated ones were delivered.
    rx.wait_until(T, "a retry at /bad after the /good deliveries", |r| {
        let last_good = r.iter().filter(|r| r.path == "/good").map(|r| r.at).max();
        r.iter().any(|b| b.path == "/bad" && Some(b.at) > last_good)
    })
    .await;
    assert!(daemon.stop().await.success());
}
