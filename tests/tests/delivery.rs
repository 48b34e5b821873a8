//! INSERT/UPDATE/DELETE through the capture trigger arrive as the default envelope.

use std::time::Duration;

use observer_tests::*;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insert_update_delete_arrive_as_default_envelope() {
    let db = TestDb::new().await;
    let rx = Receiver::start().await;
    let cfg = db.config(&webhook_observer(
        "all-orders",
        "Order",
        &rx.url("/hooks/orders"),
        "",
        "",
    ));
    let mut daemon = Daemon::start(&db, &cfg).await;

    let tenant = uuid::Uuid::new_v4();
    db.client
        .execute(
            "INSERT INTO orders (id, status, total, tenant_id) VALUES (1, 'new', 10.5, $1)",
            &[&tenant],
        )
        .await
        .unwrap();
    db.set_status(1, "paid").await;
    db.exec("DELETE FROM orders WHERE id = 1").await;

    let reqs = rx.wait_for(3, Duration::from_secs(30)).await;
    assert_eq!(reqs.len(), 3, "exactly three deliveries");
    let ids = db.event_ids("Order", "1").await;
    assert_eq!(ids.len(), 3);
    let ops: Vec<String> = reqs
        .iter()
        .map(|r| r.json()["operation"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        ops,
        ["INSERT", "UPDATE", "DELETE"],
        "one entity's changes arrive in commit order"
    );

    for (r, id) in reqs.iter().zip(&ids) {
        assert_eq!(r.method, "POST");
        assert_eq!(r.path, "/hooks/orders");
        assert!(r
            .header("content-type")
            .unwrap_or("")
            .starts_with("application/json"));
        let body = r.json();
        let keys: std::collections::BTreeSet<&str> = body
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let expected: std::collections::BTreeSet<&str> = [
            "event_id",
            "entity",
            "entity_id",
            "operation",
            "data",
            "before",
            "tenant_id",
            "created_at",
            "observer",
        ]
        .into_iter()
        .collect();
        assert_eq!(keys, expected, "envelope keys: {body}");
        assert_eq!(body["event_id"], json!(id.to_string()));
        assert_eq!(body["entity"], "Order");
        assert_eq!(body["entity_id"], "1");
        assert_eq!(body["observer"], "all-orders");
        assert_eq!(body["tenant_id"], json!(tenant.to_string()));
        let created = body["created_at"].as_str().unwrap();
        chrono::DateTime::parse_from_rfc3339(created)
            .unwrap_or_else(|e| panic!("created_at {created}: {e}"));
        let key = r.idempotency_key();
        assert_eq!(
            Some(key),
            r.header("webhook-id"),
            "Idempotency-Key == webhook-id"
        );
        assert_eq!(
            key,
            idempotency_key(*id, "all-orders", 0),
            "key derived from (event, observer, action)"
        );
        assert!(r.header("webhook-timestamp").is_some());
    }
    let (ins, upd, del) = (reqs[0].json(), reqs[1].json(), reqs[2].json());
    assert_eq!(ins["data"]["id"], 1);
    assert_eq!(ins["data"]["status"], "new");
    assert_eq!(ins["data"]["total"], json!(10.5));
    assert_eq!(ins["before"], Value::Null);
    assert_eq!(upd["data"]["status"], "paid");
    assert_eq!(upd["before"]["status"], "new");
    assert_eq!(del["data"], Value::Null);
    assert_eq!(del["before"]["status"], "paid");
    let keys: std::collections::HashSet<&str> = reqs.iter().map(|r| r.idempotency_key()).collect();
    assert_eq!(keys.len(), 3, "distinct events have distinct keys");

    assert!(daemon.stop().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn composite_primary_key_gives_json_array_object_id() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE order_lines (order_id BIGINT, line_no INT, sku TEXT, PRIMARY KEY (order_id, line_no))")
        .await;
    let out = db
        .cli(&["capture", "add", "order_lines", "--entity", "OrderLine"])
        .await;
    assert!(out.status.success(), "{}", output_text(&out));
    let rx = Receiver::start().await;
    let cfg = db.config(&webhook_observer(
        "lines",
        "OrderLine",
        &rx.url("/lines"),
        "",
        "",
    ));
    let mut daemon = Daemon::start(&db, &cfg).await;

    db.exec("INSERT INTO order_lines VALUES (7, 2, 'abc')")
        .await;
    let reqs = rx.wait_for(1, Duration::from_secs(30)).await;
    let body = reqs[0].json();
    assert_eq!(body["entity"], "OrderLine");
    let id = body["entity_id"].as_str().expect("entity_id is a string");
    let parsed: Value =
        serde_json::from_str(id).unwrap_or_else(|e| panic!("entity_id {id} is not JSON: {e}"));
    assert_eq!(parsed, json!([7, 2]));
    assert_eq!(body["data"]["sku"], "abc");
    assert!(daemon.stop().await.success());
}

/// `user:password@` in a webhook URL is sent as Basic authorization (percent-decoded) and not
/// in the request line, as reqwest did before the hot path moved to hyper-util; the request
/// also names the daemon in `User-Agent`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn url_credentials_are_sent_as_basic_authorization() {
    let db = TestDb::new().await;
    let rx = Receiver::start().await;
    let url = rx
        .url("/auth")
        .replacen("http://", "http://hook%40user:s%3Acret@", 1);
    let cfg = db.config(&webhook_observer("auth", "Order", &url, "", ""));
    let mut daemon = Daemon::start(&db, &cfg).await;
    db.insert_order(1, "new", 1.0).await;
    let reqs = rx.wait_for(1, Duration::from_secs(30)).await;
    use base64::Engine;
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("hook@user:s:cret")
    );
    assert_eq!(reqs[0].header("authorization"), Some(expected.as_str()));
    assert_eq!(reqs[0].path, "/auth");
    assert!(
        reqs[0]
            .header("user-agent")
            .is_some_and(|u| u.starts_with("fraiseql-observers/")),
        "{:?}",
        reqs[0].header("user-agent")
    );
    assert!(daemon.stop().await.success());
}
