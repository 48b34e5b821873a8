//! The `concurrent` layer and per-observer ordering: unrelated entities run in parallel, one
//! entity's events start in commit order, a retrying event holds back only its own entity (for
//! `ordering = "entity"` observers), a hung destination is bounded by `action_timeout_ms`, and
//! the layer switches from the environment.

use std::time::Duration;

use observer_tests::*;

const T: Duration = Duration::from_secs(40);

fn entity_ids(reqs: &[Received]) -> Vec<String> {
    reqs.iter()
        .map(|r| r.json()["entity_id"].as_str().unwrap().to_string())
        .collect()
}

const ON: &[(&str, &str)] = &[("OBSERVER__FEATURES__CONCURRENT", "true")];
/// On by default since issue 16: the sequential case must say so.
const OFF: &[(&str, &str)] = &[("OBSERVER__FEATURES__CONCURRENT", "false")];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unrelated_entities_run_in_parallel_only_when_the_layer_is_on() {
    let delay = Duration::from_millis(300);
    for (env, parallel) in [(ON, true), (OFF, false), (&[][..], true)] {
        let db = TestDb::new().await;
        let rx = Receiver::start().await;
        rx.set_delay(delay);
        let mut d = Daemon::start_with_env(
            &db,
            &db.config(&webhook_observer("o", "Order", &rx.url("/h"), "", "")),
            env,
        )
        .await;
        for id in 1..=8 {
            db.insert_order(id, "new", 1.0).await;
        }
        rx.wait_for(8, T).await;
        db.wait_caught_up("test", T).await;
        let overlap = rx.max_overlap(delay);
        if parallel {
            assert!(
                overlap >= 4,
                "8 entities with concurrent on: expected parallel requests, max overlap {overlap}"
            );
        } else {
            assert_eq!(overlap, 1, "concurrent off: one request at a time");
        }
        assert_eq!(rx.count(), 8, "each event delivered once");
        assert!(d.stop().await.success());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_entity_order_holds_under_concurrency() {
    let db = TestDb::new().await;
    let rx = Receiver::start().await;
    // Uneven latencies, so a loop that let one entity's events overlap would reorder them.
    rx.set_delay(Duration::from_millis(15));
    let mut d = Daemon::start_with_env(
        &db,
        &db.config(&webhook_observer("o", "Order", &rx.url("/h"), "", "")),
        ON,
    )
    .await;
    for id in 1..=5 {
        db.insert_order(id, "s0", 1.0).await;
    }
    for step in 1..=9 {
        for id in 1..=5 {
            db.set_status(id, &format!("s{step}")).await;
        }
    }
    let reqs = rx.wait_for(50, T).await;
    for id in 1..=5 {
        let statuses: Vec<String> = reqs
            .iter()
            .filter(|r| r.json()["entity_id"] == serde_json::json!(id.to_string()))
            .map(|r| r.json()["data"]["status"].as_str().unwrap().to_string())
            .collect();
        let expected: Vec<String> = (0..=9).map(|s| format!("s{s}")).collect();
        assert_eq!(statuses, expected, "entity {id} in commit order");
    }
    assert!(
        rx.max_overlap(Duration::from_millis(15)) > 1,
        "different entities overlapped"
    );
    assert!(d.stop().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retrying_event_holds_back_its_entity_only_for_ordered_observers() {
    let db = TestDb::new().await;
    let rx = Receiver::start().await;
    // The ordered observer's first request fails twice; its retries wait 700 ms each.
    rx.set_path_sequence("/ordered", &[503, 503]);
    let slow_retry =
        r#"retry = { max_attempts = 5, backoff = "fixed", initial_ms = 700, max_ms = 700 }"#;
    let observers = format!(
        "{}{}{}",
        webhook_observer("ordered", "Order", &rx.url("/ordered"), "", slow_retry),
        webhook_observer(
            "unordered",
            "Order",
            &rx.url("/unordered"),
            "ordering = \"none\"",
            ""
        ),
        webhook_observer("other", "Customer", &rx.url("/other"), "", ""),
    );
    let mut d = Daemon::start_with_env(&db, &db.config(&observers), ON).await;
    db.insert_order(1, "a", 1.0).await;
    db.set_status(1, "b").await;
    db.insert_change(
        "Customer",
        Some("9"),
        "INSERT",
        Some(serde_json::json!({"id": 9})),
    )
    .await;

    // While order 1's first event is retrying: the unordered observer has both events, the
    // other entity is delivered, and the ordered observer has not started the second event.
    rx.wait_until(T, "unordered x2 and other x1", |r| {
        r.iter().filter(|q| q.path == "/unordered").count() == 2
            && r.iter().any(|q| q.path == "/other")
    })
    .await;
    let ordered: Vec<Received> = rx.requests_to("/ordered");
    assert!(
        ordered.iter().all(|r| r.json()["data"]["status"] == "a"),
        "the second event waits behind the retrying first: {:?}",
        entity_ids(&ordered)
    );
    // Then the first succeeds and the second follows, in order.
    let reqs = rx
        .wait_until(T, "ordered: a (x3) then b", |r| {
            r.iter()
                .filter(|q| q.path == "/ordered" && q.status < 300)
                .count()
                == 2
        })
        .await;
    let delivered: Vec<String> = reqs
        .iter()
        .filter(|q| q.path == "/ordered" && q.status < 300)
        .map(|q| q.json()["data"]["status"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(delivered, ["a", "b"]);
    db.wait_caught_up("test", T).await;
    assert!(d.stop().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_destination_is_bounded_by_the_action_timeout() {
    let db = TestDb::new().await;
    let rx = Receiver::start().await;
    rx.set_path_delay("/hung", Duration::from_secs(30));
    let observers = format!(
        "{}{}",
        webhook_observer(
            "hung",
            "Order",
            &rx.url("/hung"),
            "",
            r#"retry = { max_attempts = 2, backoff = "fixed", initial_ms = 50, max_ms = 50 }"#
        ),
        webhook_observer("fine", "Customer", &rx.url("/fine"), "", ""),
    );
    let env = [
        ("OBSERVER__FEATURES__CONCURRENT", "true"),
        ("OBSERVER__CONCURRENT__ACTION_TIMEOUT_MS", "400"),
    ];
    let mut d = Daemon::start_with_env(&db, &db.config(&observers), &env).await;
    db.insert_order(1, "a", 1.0).await;
    db.insert_change(
        "Customer",
        Some("9"),
        "INSERT",
        Some(serde_json::json!({"id": 9})),
    )
    .await;
    rx.wait_until(T, "the other destination", |r| {
        r.iter().any(|q| q.path == "/fine")
    })
    .await;
    // Two attempts, each abandoned at 400 ms, then the dead letter says why.
    let dead = eventually(T, "a dead letter for the hung destination", || async {
        let rows = db.dead_letters().await;
        (!rows.is_empty()).then_some(rows)
    })
    .await;
    let err = dead[0]["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(err.contains("timed out after 400 ms"), "{err}");
    assert_eq!(rx.requests_to("/hung").len(), 2);
    db.wait_caught_up("test", T).await;
    assert!(d.stop().await.success());
}
