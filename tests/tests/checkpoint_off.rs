//! OBSERVER__FEATURES__CHECKPOINT=false: start at the tail, write no checkpoint.

use std::time::Duration;

use observer_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_off_starts_at_tail_and_writes_nothing() {
    let db = TestDb::new().await;
    let rx = Receiver::start().await;
    db.insert_order(1, "before-start", 1.0).await;
    // No start_from: the default is the tail.
    let cfg = db.config_listener(
        "id = \"nockpt\"",
        &webhook_observer("o", "Order", &rx.url("/h"), "", ""),
    );
    // One dispatch at a time (concurrency is on by default): the proof below needs read order.
    let mut daemon = Daemon::start_with_env(
        &db,
        &cfg,
        &[
            ("OBSERVER__FEATURES__CHECKPOINT", "false"),
            ("OBSERVER__FEATURES__CONCURRENT", "false"),
        ],
    )
    .await;
    db.insert_order(2, "after-start", 1.0).await;
    let reqs = rx.wait_for(1, Duration::from_secs(30)).await;
    assert_eq!(reqs[0].json()["entity_id"], "2");
    // The row written before start precedes order 2 in the change log; had it been read it would
    // have been dispatched first (one dispatch at a time, in read order).
    assert_eq!(rx.count(), 1, "a row written before start was delivered");
    assert!(daemon.stop().await.success());
    assert_eq!(rx.count(), 1);
    assert!(
        db.checkpoints().await.is_empty(),
        "no checkpoint row with the checkpoint off"
    );
}
