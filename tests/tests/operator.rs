//! `checkpoint set --event-id` (replay from a point: the event and later transactions are
//! delivered again with their original keys, earlier ones are not) and `dlq purge`.

use std::time::Duration;

use observer_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_set_event_id_replays_from_that_event_and_purge_deletes_what_it_says() {
    let db = TestDb::new().await;
    let rx = Receiver::start().await;
    rx.set_path_status("/broken", 400);
    let mut observers = webhook_observer(
        "orders",
        "Order",
        &rx.url("/orders"),
        "events = [\"INSERT\"]",
        "",
    );
    observers.push_str(&webhook_observer(
        "broken",
        "Order",
        &rx.url("/broken"),
        "events = [\"INSERT\"]",
        "",
    ));
    let cfg = db.config(&observers);
    let mut daemon = Daemon::start(&db, &cfg).await;
    for id in 1..=3 {
        db.insert_order(id, "new", 1.0).await; // one transaction each
    }
    db.wait_caught_up("test", Duration::from_secs(20)).await;
    assert!(daemon.stop().await.success());
    // (entity id, key) in arrival order; keyed by entity, since concurrency (on by default)
    // keeps each entity's order but not the order across entities.
    let keyed = |reqs: &[Received]| -> Vec<(String, String)> {
        reqs.iter()
            .map(|r| {
                let id = r.json()["entity_id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                (id, r.idempotency_key().to_string())
            })
            .collect()
    };
    let mut first = keyed(&rx.requests_to("/orders"));
    first.sort();
    assert_eq!(first.len(), 3);

    // Replay from order 2's event: orders 2 and 3 again, with the same keys; order 1 not.
    let from = db.event_ids("Order", "2").await[0].to_string();
    let out = db
        .cli_with(&cfg, &["checkpoint", "set", "--event-id", &from])
        .await;
    assert!(
        !out.status.success(),
        "without --yes nothing is applied: {}",
        output_text(&out)
    );
    let out = db
        .cli_with(&cfg, &["checkpoint", "set", "--event-id", &from, "--yes"])
        .await;
    assert!(out.status.success(), "{}", output_text(&out));
    let mut daemon = Daemon::start(&db, &cfg).await;
    rx.wait_until(Duration::from_secs(20), "two redeliveries", |r| {
        r.iter().filter(|q| q.path == "/orders").count() >= 5
    })
    .await;
    db.wait_caught_up("test", Duration::from_secs(20)).await;
    assert!(daemon.stop().await.success());
    let all = keyed(&rx.requests_to("/orders"));
    assert_eq!(all.len(), 5, "orders 2 and 3 again, order 1 not: {all:?}");
    let mut replayed = all[3..].to_vec();
    replayed.sort();
    assert_eq!(
        first.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>(),
        ["1", "2", "3"]
    );
    assert_eq!(
        replayed,
        &first[1..],
        "the replay carries orders 2 and 3 with their original keys"
    );

    // The broken observer dead-lettered 3 + 2 (replayed) rows, all pending.
    let dead = db.dead_letters().await;
    assert_eq!(dead.len(), 5, "{dead:?}");
    let out = db
        .cli_with(&cfg, &["dlq", "purge", "--status", "pending"])
        .await;
    assert!(
        !out.status.success(),
        "pending entries need --yes: {}",
        output_text(&out)
    );
    assert_eq!(
        db.dead_letters().await.len(),
        5,
        "nothing deleted without --yes"
    );
    let out = db.cli_with(&cfg, &["dlq", "purge"]).await;
    assert!(out.status.success(), "{}", output_text(&out));
    assert_eq!(
        db.dead_letters().await.len(),
        5,
        "the default purges resolved entries only"
    );
    let out = db
        .cli_with(
            &cfg,
            &[
                "dlq",
                "purge",
                "--status",
                "pending",
                "--yes",
                "--observer",
                "broken",
            ],
        )
        .await;
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(db.dead_letters().await.is_empty());
}
