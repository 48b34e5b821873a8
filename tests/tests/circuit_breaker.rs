//! `circuit_breaker`: a destination that refuses connections opens its breaker (deliveries are
//! deferred, not attempted, not dead-lettered), a flaky destination in the same run keeps going,
//! and when the dead one comes back on the same address everything is delivered.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use observer_tests::redis_server::Gate;
use observer_tests::*;

const N: usize = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_down_destination_is_held_back_while_a_flaky_one_keeps_its_speed() {
    let db = TestDb::new().await;
    let down_rx = Receiver::start().await;
    let mut gate = Gate::closed(down_rx.addr);
    let flaky = Receiver::start().await;
    // 500 every other request, so half the attempts fail.
    flaky.set_path_sequence("/f", &[500, 204].repeat(4 * N));
    let down_url = format!("http://127.0.0.1:{}/d", gate.port);
    // Six attempts 200 ms apart: without the breaker every delivery to the dead destination
    // would be dead-lettered within about a second.
    let retry =
        r#"  retry = { max_attempts = 6, backoff = "fixed", initial_ms = 200, max_ms = 200 }"#;
    let flaky_retry =
        r#"  retry = { max_attempts = 10, backoff = "fixed", initial_ms = 50, max_ms = 50 }"#;
    let observers = format!(
        "{}{}",
        webhook_observer("down", "Order", &down_url, "", retry),
        webhook_observer("flaky", "Order", &flaky.url("/f"), "", flaky_retry)
    );
    let sections = "[features]\nconcurrent = true\ncircuit_breaker = true\n\n\
        [circuit_breaker]\nfailure_rate = 0.9\nwindow_secs = 1\nmin_requests = 4\nopen_ms = 1000\nmax_open_ms = 2000\n";
    let cfg = db.config_listener(
        "id = \"test\"\nstart_from = \"beginning\"",
        &format!("{sections}\n{observers}"),
    );
    let mut daemon = Daemon::start(&db, &cfg).await;
    let started = Instant::now();
    db.exec(&format!(
        "INSERT INTO orders (id, status, total) SELECT g, 'new', 1 FROM generate_series(1, {N}) g"
    ))
    .await;
    daemon
        .wait_log("circuit breaker opened", Duration::from_secs(20))
        .await;
    // The flaky destination gets every event while the other breaker is open.
    flaky
        .wait_until(
            Duration::from_secs(20),
            "every event at the flaky receiver",
            |r| {
                r.iter()
                    .filter(|q| q.status == 204)
                    .map(|q| q.idempotency_key().to_string())
                    .collect::<HashSet<_>>()
                    .len()
                    == N
            },
        )
        .await;
    let flaky_done = started.elapsed();
    // Keep the destination down a while longer: its deliveries wait, none is dead-lettered.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        db.dead_letters().await.is_empty(),
        "deferred deliveries are not attempts: {:?}",
        db.dead_letters().await
    );
    assert_eq!(down_rx.count(), 0);
    gate.open().await;
    db.wait_caught_up("test", Duration::from_secs(60)).await;
    let got: HashSet<String> = down_rx
        .requests()
        .iter()
        .map(|r| r.idempotency_key().to_string())
        .collect();
    assert_eq!(
        got.len(),
        N,
        "every delivery to the recovered destination arrived"
    );
    assert!(db.dead_letters().await.is_empty());
    let log = db.action_log().await;
    let down: Vec<_> = log.iter().filter(|r| r["observer"] == "down").collect();
    assert_eq!(down.len(), N);
    assert!(down.iter().all(|r| r["outcome"] == "delivered"), "{down:?}");
    // While open only probes count as attempts: far fewer failed attempts than six per delivery.
    let attempts: usize = down
        .iter()
        .map(|r| r["attempts"].as_array().map(Vec::len).unwrap_or(0))
        .sum();
    assert!(
        attempts < 2 * N + 10,
        "{attempts} attempts for {N} deliveries: deferrals were counted as attempts"
    );
    assert!(
        flaky_done < Duration::from_secs(15),
        "the flaky destination was held back: {flaky_done:?}"
    );
    let logs = daemon.logs();
    assert!(logs.contains("circuit breaker closed"), "{logs}");
    assert!(daemon.stop().await.success());
}
