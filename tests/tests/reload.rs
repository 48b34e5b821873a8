//! SIGHUP: a good file replaces observers and layer settings without a restart; a bad file is
//! refused with its errors and the running configuration goes on; settings that need a restart
//! are named and kept.

use std::time::Duration;

use observer_tests::*;

const T: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_a_good_file_and_refuses_a_bad_one() {
    let db = TestDb::new().await;
    let rx = Receiver::start().await;
    let mut d = Daemon::start(
        &db,
        &db.config(&webhook_observer("o", "Order", &rx.url("/a"), "", "")),
    )
    .await;
    db.insert_order(1, "new", 1.0).await;
    rx.wait_until(T, "first event at /a", |r| r.iter().any(|q| q.path == "/a"))
        .await;

    // A good file: the observer now sends to /b, a second observer appears, concurrency is
    // switched on, and a restart-only setting changes.
    let good = db
        .config(&format!(
            "{}{}",
            webhook_observer("o", "Order", &rx.url("/b"), "", ""),
            webhook_observer("o2", "Order", &rx.url("/c"), "", "")
        ))
        .replace("[listener]", "[listener]\nbatch_size = 10")
        + "\n[features]\nconcurrent = true\n";
    std::fs::write(&d.config_path, &good).unwrap();
    d.signal("HUP");
    d.wait_log("reload accepted", T).await;
    assert!(
        d.logs().contains("take effect only after a restart"),
        "the listener change is named: {}",
        d.logs()
    );
    db.insert_order(2, "new", 1.0).await;
    rx.wait_until(T, "second event at /b and /c", |r| {
        r.iter().any(|q| q.path == "/b") && r.iter().any(|q| q.path == "/c")
    })
    .await;

    // A bad file: refused, with the problem named; the running observers go on.
    let bad = db.config(&webhook_observer(
        "o",
        "Order",
        &rx.url("/d"),
        "condition = \"data.status = 'x'\"",
        "",
    ));
    std::fs::write(&d.config_path, &bad).unwrap();
    d.signal("HUP");
    d.wait_log("reload refused", T).await;
    assert!(d.logs().contains("condition"), "{}", d.logs());
    db.insert_order(3, "new", 1.0).await;
    rx.wait_until(T, "third event at /b and /c", |r| {
        r.iter()
            .filter(|q| q.path == "/b" || q.path == "/c")
            .count()
            == 4
    })
    .await;
    db.wait_caught_up("test", T).await;
    assert!(rx.requests_to("/d").is_empty());
    assert_eq!(rx.requests_to("/a").len(), 1);
    assert!(d.stop().await.success(), "still running after both reloads");
}
