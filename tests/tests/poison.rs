//! Poison rows are dead-lettered with a reason and do not stop the rows after them.

use std::time::Duration;

use observer_tests::*;
use serde_json::json;

const T: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_rows_dead_letter_and_later_rows_still_deliver() {
    let db = TestDb::new().await;
    let rx = Receiver::start().await;
    let observers = [
        webhook_observer("orders", "Order", &rx.url("/orders"), "", ""),
        webhook_observer(
            "tmpl",
            "Tmpl",
            &rx.url("/tmpl"),
            "",
            r#"  body = '{"x": {{ data.missing.path }}}'"#,
        ),
    ]
    .concat();
    let mut daemon = Daemon::start(&db, &db.config(&observers)).await;

    let null_id = db
        .insert_change("Order", None, "UPDATE", Some(json!({"id": 1})))
        .await;
    let upsert = db
        .insert_change("Order", Some("2"), "UPSERT", Some(json!({"id": 2})))
        .await;
    let tmpl = db
        .insert_change("Tmpl", Some("t1"), "INSERT", Some(json!({"present": 1})))
        .await;
    db.insert_order(10, "new", 1.0).await;
    let after = db.event_ids("Order", "10").await[0];

    let reqs = rx.wait_for(1, T).await;
    assert_eq!(
        reqs[0].event_id(),
        after.to_string(),
        "the row after the poison ones is delivered"
    );
    db.wait_caught_up("test", T).await;
    assert_eq!(
        rx.count(),
        1,
        "nothing delivered for the poison rows or the failed template"
    );

    let dl = db.dead_letters().await;
    assert_eq!(dl.len(), 3, "{dl:#?}");
    let find = |id: uuid::Uuid| {
        dl.iter()
            .find(|d| d["event_id"] == id.to_string())
            .unwrap_or_else(|| panic!("no dead letter for {id}: {dl:#?}"))
    };
    let d = find(null_id);
    assert_eq!(d["reason"], "poison_event");
    assert!(
        d["last_error"]
            .as_str()
            .unwrap()
            .contains("object_id is NULL"),
        "{d}"
    );
    let d = find(upsert);
    assert_eq!(d["reason"], "poison_event");
    assert!(d["last_error"].as_str().unwrap().contains("UPSERT"), "{d}");
    let d = find(tmpl);
    assert_eq!(d["reason"], "permanent_failure");
    assert_eq!(d["observer"], "tmpl");
    let err = d["last_error"].as_str().unwrap();
    assert!(
        err.contains("body template") && err.contains("missing"),
        "{err}"
    );
    assert_eq!(d["attempts"].as_array().unwrap().len(), 1);
    assert!(daemon.stop().await.success());
}
