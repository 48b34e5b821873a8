//! Only matching events are delivered: conditions, `*` entities and the events filter.

use std::time::Duration;

use observer_tests::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_matching_events_are_delivered() {
    let db = TestDb::new().await;
    let rx = Receiver::start().await;
    let observers = [
        webhook_observer(
            "big-paid",
            "Order",
            &rx.url("/paid"),
            "events = [\"INSERT\", \"UPDATE\"]\ncondition = \"data.status == 'paid' && data.total > 100 && changed('status')\"",
            "",
        ),
        webhook_observer("any-insert", "*", &rx.url("/any"), "events = [\"insert\"]", ""),
        webhook_observer("order-deletes", "Order", &rx.url("/deletes"), "events = [\"DELETE\"]", ""),
    ]
    .concat();
    let mut daemon = Daemon::start(&db, &db.config(&observers)).await;

    db.insert_order(1, "new", 50.0).await; // any-insert
    db.insert_order(2, "new", 500.0).await; // any-insert
    db.insert_change("Invoice", Some("inv-1"), "INSERT", Some(json!({"n": 1})))
        .await; // any-insert (entity *)
    db.insert_change(
        "Invoice",
        Some("inv-1"),
        "UPDATE",
        Some(json!({"status": "paid", "total": 1000})),
    )
    .await; // nothing
    db.set_status(1, "paid").await; // total 50: no
    db.set_status(2, "paid").await; // big-paid
    db.exec("UPDATE orders SET note = 'gift' WHERE id = 2")
        .await; // status unchanged: no
    db.insert_order(3, "paid", 900.0).await; // any-insert; INSERT has no before: changed('status')?
    db.exec("DELETE FROM orders WHERE id = 1").await; // order-deletes

    db.wait_caught_up("test", Duration::from_secs(30)).await;
    let reqs = rx.requests();
    let summary = |path: &str| -> Vec<(String, String, String)> {
        let mut v: Vec<_> = reqs
            .iter()
            .filter(|r| r.path == path)
            .map(|r| {
                let b = r.json();
                (
                    b["entity"].as_str().unwrap().to_string(),
                    b["entity_id"].as_str().unwrap().to_string(),
                    b["operation"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        v.sort();
        v
    };
    let s = |e: &str, i: &str, o: &str| (e.to_string(), i.to_string(), o.to_string());
    assert_eq!(
        summary("/any"),
        vec![
            s("Invoice", "inv-1", "INSERT"),
            s("Order", "1", "INSERT"),
            s("Order", "2", "INSERT"),
            s("Order", "3", "INSERT")
        ]
    );
    assert_eq!(summary("/deletes"), vec![s("Order", "1", "DELETE")]);
    // An INSERT of a paid order: changed('status') holds when there is no before-image (it was
    // created with that status) — either way order 2's UPDATE to paid must be there.
    let paid = summary("/paid");
    assert!(paid.contains(&s("Order", "2", "UPDATE")), "{paid:?}");
    assert!(
        !paid.iter().any(|p| p.1 == "1"),
        "order 1 (total 50) must not match: {paid:?}"
    );
    assert_eq!(
        paid.iter().filter(|p| p.1 == "2").count(),
        1,
        "note-only update must not match: {paid:?}"
    );
    for r in rx.requests_to("/paid") {
        assert_eq!(r.json()["observer"], "big-paid");
    }
    assert!(db.dead_letters().await.is_empty());
    assert!(daemon.stop().await.success());
}
