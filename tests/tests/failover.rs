//! Two daemons with one listener id: one delivers, the other stands by and takes over.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use observer_tests::*;

const T: Duration = Duration::from_secs(30);

fn per_event(rx: &Receiver) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for r in rx.requests() {
        *m.entry(r.event_id()).or_insert(0) += 1;
    }
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_one_active_and_standby_takes_over() {
    let db = TestDb::new().await;
    let rx = Receiver::start().await;
    let cfg = db.config(&webhook_observer("o", "Order", &rx.url("/h"), "", ""));
    let mut active = Daemon::start(&db, &cfg).await;
    let standby = Daemon::start(&db, &cfg).await;
    let mut standby = standby;
    assert!(
        standby.logs().contains("standing by"),
        "second daemon stands by:\n{}",
        standby.logs()
    );

    for i in 1..=20 {
        db.insert_order(i, "new", 1.0).await;
    }
    db.wait_caught_up("test", T).await;
    let m = per_event(&rx);
    assert_eq!(m.len(), 20);
    assert!(
        m.values().all(|&n| n == 1),
        "each event delivered once: {m:?}"
    );

    assert!(active.stop().await.success());
    let stopped = Instant::now();
    for i in 21..=25 {
        db.insert_order(i, "new", 1.0).await;
    }
    rx.wait_for(25, Duration::from_secs(10)).await;
    let took = stopped.elapsed();
    assert!(
        took <= Duration::from_secs(6),
        "standby took over after {took:?}"
    );
    db.wait_caught_up("test", T).await;
    let m = per_event(&rx);
    assert_eq!(m.len(), 25);
    assert!(
        m.values().all(|&n| n == 1),
        "each event delivered once: {m:?}"
    );
    assert!(
        standby.logs().contains("acquired") || standby.logs().contains("active"),
        "{}",
        standby.logs()
    );
    assert!(standby.stop().await.success());
}
