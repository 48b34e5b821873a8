//! SIGTERM while a request is in flight: the daemon waits for it, exits 0, checkpoints the
//! event, and a restart does not deliver it again.

use std::time::{Duration, Instant};

use observer_tests::*;

const T: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_waits_for_in_flight_request_and_checkpoints_it() {
    let db = TestDb::new().await;
    let rx = Receiver::start().await;
    rx.set_delay(Duration::from_secs(2));
    let cfg = db.config(&webhook_observer("o", "Order", &rx.url("/h"), "", ""));
    let mut daemon = Daemon::start(&db, &cfg).await;
    db.insert_order(1, "new", 1.0).await;
    let first = rx.wait_for(1, T).await;
    let arrived = first[0].at;
    let event = first[0].event_id();

    let status = daemon.stop().await;
    let stopped = Instant::now();
    assert!(
        status.success(),
        "exit status {status:?}; log:\n{}",
        daemon.logs()
    );
    assert!(
        stopped.duration_since(arrived) >= Duration::from_millis(1900),
        "exited {:?} after the request arrived, before it completed",
        stopped.duration_since(arrived)
    );
    assert_eq!(
        db.unprocessed("test").await,
        0,
        "the checkpoint includes the in-flight event"
    );
    let log = db.action_log().await;
    assert_eq!(log.len(), 1);
    assert_eq!(log[0]["outcome"], "delivered");

    rx.set_delay(Duration::ZERO);
    let mut daemon = Daemon::start(&db, &cfg).await;
    db.insert_order(2, "new", 1.0).await;
    rx.wait_for(2, T).await;
    db.wait_caught_up("test", T).await;
    let reqs = rx.requests();
    assert_eq!(
        reqs.iter().filter(|r| r.event_id() == event).count(),
        1,
        "not redelivered after restart"
    );
    assert_eq!(reqs.len(), 2);
    assert!(daemon.stop().await.success());
}
