//! Body, header and URL templates.

use std::time::Duration;

use observer_tests::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_header_and_url_templates_render() {
    let db = TestDb::new().await;
    let rx = Receiver::start().await;
    let body = r#"body = '''{"order": {{ data.id }}, "who": "{{ data.customer.name }}", "city": {{ data.customer.address.city }}, "first_tag": "{{ data.customer.tags[0] }}", "note": {{ data.note }}, "note_in_text": "note={{ data.note }}", "event": "{{ event.id }}", "op": "{{ event.operation }}", "entity": "{{ event.entity }}", "observer": "{{ observer.name }}", "key": "{{ delivery.idempotency_key }}", "missing": {{ data.nope | default("n/a") }}}'''
  headers = { "X-Order" = "order-{{ data.id }}", "X-Status" = "{{ data.status | upper }}" }"#;
    let url = format!(
        "http://{}/hooks/{{{{ data.customer.name }}}}?status={{{{ data.status }}}}",
        rx.addr
    );
    let cfg = db.config(&webhook_observer("tmpl", "Order", &url, "", body));
    let mut daemon = Daemon::start(&db, &cfg).await;

    let name = "Ann & Bob/Ü \"x\"";
    let note = "He said \"hi\"\nsecond line \\ backslash\ttab";
    let customer = json!({"name": name, "address": {"city": "Zürich"}, "tags": ["vip", "b"]});
    db.client
        .execute(
            "INSERT INTO orders (id, status, total, note, customer) VALUES (42, 'paid', 1, $1, $2)",
            &[&note, &customer],
        )
        .await
        .unwrap();

    let reqs = rx.wait_for(1, Duration::from_secs(30)).await;
    let r = &reqs[0];
    let event_id = db.event_ids("Order", "42").await[0];
    let b = r.json(); // valid JSON despite quotes and newlines in the data
    assert_eq!(b["order"], 42);
    assert_eq!(b["who"], name);
    assert_eq!(b["city"], "Zürich");
    assert_eq!(b["first_tag"], "vip");
    assert_eq!(b["note"], note);
    assert_eq!(b["note_in_text"], format!("note={note}"));
    assert_eq!(b["event"], event_id.to_string());
    assert_eq!(b["op"], "INSERT");
    assert_eq!(b["entity"], "Order");
    assert_eq!(b["observer"], "tmpl");
    assert_eq!(b["key"], idempotency_key(event_id, "tmpl", 0));
    assert_eq!(b["missing"], "n/a");

    assert_eq!(r.header("x-order"), Some("order-42"));
    assert_eq!(r.header("x-status"), Some("PAID"));

    // URL: the placeholder is percent-encoded, so it stays one path segment.
    let seg = r
        .path
        .strip_prefix("/hooks/")
        .unwrap_or_else(|| panic!("path {}", r.path));
    assert!(
        !seg.contains('/') && !seg.contains(' ') && !seg.contains('&') && !seg.contains('"'),
        "not encoded: {}",
        r.path
    );
    assert_eq!(percent_decode(seg), name);
    assert_eq!(r.query.as_deref(), Some("status=paid"));
    assert!(daemon.stop().await.success());
}
