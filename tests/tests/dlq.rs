//! Exhausted retries land in the dead-letter queue with every attempt; `dlq retry-all`
//! delivers them with the same idempotency key and resolves the row.

use std::time::Duration;

use observer_tests::*;

const T: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_retries_dead_letter_then_retry_all_resolves() {
    let db = TestDb::new().await;
    let rx = Receiver::start().await;
    rx.set_status(500);
    let cfg = db.config(&webhook_observer("o", "Order", &rx.url("/h"), "", ""));
    let mut daemon = Daemon::start(&db, &cfg).await;
    db.insert_order(1, "new", 1.0).await;
    db.wait_caught_up("test", T).await;

    let id = db.event_ids("Order", "1").await[0];
    let key = idempotency_key(id, "o", 0);
    assert_eq!(rx.count(), 3, "max_attempts = 3");
    let dl = db.dead_letters().await;
    assert_eq!(dl.len(), 1, "{dl:?}");
    let row = &dl[0];
    assert_eq!(row["reason"], "retries_exhausted");
    assert_eq!(row["status"], "pending");
    assert_eq!(row["event_id"], id.to_string());
    assert_eq!(row["idempotency_key"], key);
    assert_eq!(row["observer"], "o");
    assert_eq!(row["action_type"], "webhook");
    assert!(row["last_error"].as_str().unwrap().contains("500"));
    let attempts = row["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 3);
    let mut prev = None;
    for (i, a) in attempts.iter().enumerate() {
        assert_eq!(a["attempt"], (i + 1) as u64, "{a}");
        assert_eq!(a["status"], 500, "{a}");
        assert!(a["error"].as_str().unwrap_or("").contains("500"), "{a}");
        let at = chrono::DateTime::parse_from_rfc3339(a["at"].as_str().expect("at"))
            .expect("at is a timestamp");
        if let Some(p) = prev {
            assert!(at > p, "attempt timestamps increase");
        }
        prev = Some(at);
    }
    assert!(rx.requests().iter().all(|r| r.idempotency_key() == key));

    // The receiver recovers; the operator retries everything pending.
    rx.set_status(204);
    let out = db.cli_with(&cfg, &["dlq", "retry-all"]).await;
    assert!(
        out.status.success(),
        "dlq retry-all failed: {}",
        output_text(&out)
    );
    let reqs = rx
        .wait_until(T, "the manual retry", |r| r.iter().any(|r| r.status == 204))
        .await;
    let ok: Vec<_> = reqs.iter().filter(|r| r.status == 204).collect();
    assert_eq!(ok.len(), 1);
    assert_eq!(ok[0].idempotency_key(), key, "manual retry keeps the key");
    assert_eq!(ok[0].event_id(), id.to_string());
    eventually(T, "the dead letter to be resolved", || async {
        let dl = db.dead_letters().await;
        (dl.len() == 1 && dl[0]["status"] == "resolved").then_some(())
    })
    .await;
    let dl = db.dead_letters().await;
    assert!(dl[0]["resolved_at"].is_string());
    assert!(daemon.stop().await.success());
}
