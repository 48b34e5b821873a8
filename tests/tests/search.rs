//! The `search` layer with its embedded default (`[search] backend = "postgres"`): events go
//! through a real daemon to a real HTTP receiver, and `fraiseql-observers search` answers from
//! `observer_audit` — every event (also one no observer matched), the observers it matched, and
//! each action's outcome and attempts.

use std::time::Duration;

use observer_tests::*;
use serde_json::{json, Value};

async fn search(db: &TestDb, cfg: &str, args: &[&str]) -> Vec<Value> {
    let mut all = vec!["search"];
    all.extend_from_slice(args);
    all.push("--json");
    let out = db.cli_with(cfg, &all).await;
    assert!(
        out.status.success(),
        "search {args:?}: {}",
        output_text(&out)
    );
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("search {args:?} prints JSON ({e}): {}", output_text(&out)));
    v.as_array().expect("an array").clone()
}

fn summary(records: &[Value]) -> Vec<(String, String, String, Vec<String>)> {
    let mut v: Vec<_> = records
        .iter()
        .map(|r| {
            (
                r["entity"].as_str().unwrap().to_string(),
                r["entity_id"].as_str().unwrap_or("-").to_string(),
                r["operation"].as_str().unwrap().to_string(),
                r["outcomes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|o| o.as_str().unwrap().to_string())
                    .collect(),
            )
        })
        .collect();
    v.sort();
    v
}

fn s(x: &str) -> String {
    x.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_finds_what_happened_to_order_42() {
    let db = TestDb::new().await;
    let rx = Receiver::start().await;
    // Deliveries for order 42 fail (three attempts, then the DLQ); the others are delivered.
    rx.set_path_status("/hooks/42", 500);
    let cfg = db.config(&format!(
        "[features]\nsearch = true\n\n{}",
        webhook_observer(
            "order-hook",
            "Order",
            &rx.url("/hooks/{{ event.entity_id }}"),
            "",
            ""
        )
    ));
    let mut daemon = Daemon::start(&db, &cfg).await;

    db.insert_order(42, "new", 10.0).await;
    db.set_status(42, "paid").await;
    // Its data holds 42 (the total), but it was delivered.
    db.insert_order(7, "new", 42.0).await;
    db.insert_order(420, "new", 1.0).await;
    // No observer for customers: recorded as `no_match`.
    db.insert_change(
        "Customer",
        Some("42"),
        "INSERT",
        Some(json!({"name": "Ada"})),
    )
    .await;

    eventually(Duration::from_secs(60), "five audit rows", || async {
        let n: i64 = db
            .client
            .query_one("SELECT count(*) FROM observer_audit", &[])
            .await
            .unwrap()
            .get(0);
        (n == 5).then_some(())
    })
    .await;
    assert_eq!(
        rx.requests_to("/hooks/42").len(),
        6,
        "3 attempts for each of the two events of order 42"
    );

    let failed = search(
        &db,
        &cfg,
        &["42", "--entity", "order", "--outcome", "failed"],
    )
    .await;
    assert_eq!(
        summary(&failed),
        vec![
            (s("Order"), s("42"), s("INSERT"), vec![s("dead_lettered")]),
            (s("Order"), s("42"), s("UPDATE"), vec![s("dead_lettered")]),
        ],
        "exactly the two failed events of order 42: {failed:#?}"
    );
    // Newest first; the UPDATE completed after the INSERT (per-entity order).
    assert_eq!(failed[0]["operation"], "UPDATE");
    for r in &failed {
        assert_eq!(r["observers"], json!(["order-hook"]));
        let a = &r["actions"][0];
        assert_eq!(a["observer"], "order-hook");
        assert_eq!(a["action_type"], "webhook");
        assert_eq!(a["outcome"], "dead_lettered");
        assert_eq!(a["attempts"].as_array().unwrap().len(), 3);
        assert!(
            a["error"].as_str().unwrap().contains("500"),
            "the last error is kept: {a}"
        );
        assert_eq!(r["data"]["id"], 42);
    }

    let all_42 = search(&db, &cfg, &["42"]).await;
    assert_eq!(
        summary(&all_42),
        vec![
            (s("Customer"), s("42"), s("INSERT"), vec![s("no_match")]),
            (s("Order"), s("42"), s("INSERT"), vec![s("dead_lettered")]),
            (s("Order"), s("42"), s("UPDATE"), vec![s("dead_lettered")]),
            (s("Order"), s("7"), s("INSERT"), vec![s("delivered")]),
        ],
        "the id, or 42 in the data; not order 420: {all_42:#?}"
    );
    let customer = search(&db, &cfg, &["42", "--entity", "Customer"]).await;
    assert_eq!(customer.len(), 1);
    assert_eq!(customer[0]["observers"], json!([]));
    assert_eq!(customer[0]["actions"], json!([]));
    let delivered = search(&db, &cfg, &["", "--outcome", "delivered"]).await;
    assert_eq!(
        summary(&delivered),
        vec![
            (s("Order"), s("420"), s("INSERT"), vec![s("delivered")]),
            (s("Order"), s("7"), s("INSERT"), vec![s("delivered")]),
        ]
    );
    assert_eq!(search(&db, &cfg, &["hook", "--limit", "2"]).await.len(), 2);
    assert!(search(&db, &cfg, &["42", "--since", "2099-01-01"])
        .await
        .is_empty());
    assert_eq!(search(&db, &cfg, &["42", "--since", "1h"]).await.len(), 4);
    // Words of the error are indexed too.
    assert_eq!(
        search(&db, &cfg, &["500", "--entity", "order"]).await.len(),
        2
    );

    // The text form.
    let out = db
        .cli_with(
            &cfg,
            &["search", "42", "--entity", "order", "--outcome", "failed"],
        )
        .await;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(
        text.contains("Order 42  UPDATE")
            && text.contains("order-hook webhook#0  dead_lettered  3 attempts  last error:")
            && text.trim_end().ends_with("2 events"),
        "{text}"
    );

    // Bad input is named.
    let out = db
        .cli_with(&cfg, &["search", "42", "--outcome", "exploded"])
        .await;
    assert!(!out.status.success());
    assert!(
        output_text(&out).contains("--outcome \"exploded\""),
        "{}",
        output_text(&out)
    );
    let out = db
        .cli_with(&cfg, &["search", "42", "--since", "yesterday"])
        .await;
    assert!(!out.status.success());
    assert!(
        output_text(&out).contains("--since \"yesterday\""),
        "{}",
        output_text(&out)
    );

    // `status` reports the audit trail.
    let out = db.cli_with(&cfg, &["status", "--json"]).await;
    assert!(out.status.success(), "{}", output_text(&out));
    let st: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(st["search"]["backend"], "postgres");
    assert_eq!(st["search"]["enabled"], true);
    assert_eq!(st["search"]["audit_rows"], 5);

    daemon.stop().await;

    // The planner can use the full-text index for the expression the search command queries.
    let plan: Vec<String> = db
        .client
        .simple_query(&format!(
            "SET enable_seqscan = off; EXPLAIN SELECT id FROM observer_audit WHERE {} @@ websearch_to_tsquery('simple'::regconfig, '42')",
            observer_core::audit::TSVECTOR
        ))
        .await
        .unwrap()
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .collect();
    assert!(
        plan.iter().any(|l| l.contains("observer_audit_search_idx")),
        "{plan:#?}"
    );

    // Retention: audit rows go with the action log's age, but never one the search indexer has
    // yet to index.
    db.exec("UPDATE observer_audit SET finished_at = now() - interval '40 days'")
        .await;
    let third: i64 = db
        .client
        .query_one(
            "SELECT id FROM observer_audit ORDER BY id OFFSET 2 LIMIT 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    db.client
        .execute(
            "INSERT INTO observer_search_index (listener_id, backend, indexed_id) VALUES ('test', 'elasticsearch', $1)",
            &[&third],
        )
        .await
        .unwrap();
    let out = db.cli(&["cleanup"]).await;
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("deleted 3 audit-trail rows"),
        "{}",
        output_text(&out)
    );
    let left: i64 = db
        .client
        .query_one("SELECT count(*) FROM observer_audit", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        left, 2,
        "the two rows after the indexer's watermark are kept"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_search_off_no_audit_rows_are_written() {
    let db = TestDb::new().await;
    let rx = Receiver::start().await;
    let cfg = db.config(&webhook_observer(
        "order-hook",
        "Order",
        &rx.url("/h"),
        "",
        "",
    ));
    let mut daemon = Daemon::start(&db, &cfg).await;
    db.insert_order(1, "new", 1.0).await;
    rx.wait_for(1, Duration::from_secs(30)).await;
    db.wait_caught_up("test", Duration::from_secs(30)).await;
    daemon.stop().await;
    let n: i64 = db
        .client
        .query_one("SELECT count(*) FROM observer_audit", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
    let out = db.cli_with(&cfg, &["search", "1"]).await;
    assert!(out.status.success());
    assert!(
        output_text(&out).contains("features.search is off"),
        "{}",
        output_text(&out)
    );
}
