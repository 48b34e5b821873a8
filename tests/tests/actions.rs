//! The `sql` action (a database function called with the event as JSON) and the `log` action,
//! end to end: delivered calls, a failing function dead-lettered with its error, and the
//! idempotency key passed along so the function can deduplicate.

use std::time::Duration;

use observer_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_action_calls_the_function_and_failures_dead_letter() {
    let db = TestDb::new().await;
    db.exec(
        "CREATE TABLE audit (idempotency_key TEXT PRIMARY KEY, event JSONB NOT NULL);
         CREATE FUNCTION record_order(ev jsonb) RETURNS void LANGUAGE sql AS $$
             INSERT INTO audit VALUES (ev->>'idempotency_key', ev) ON CONFLICT DO NOTHING $$;
         CREATE FUNCTION reject_order(ev jsonb) RETURNS void LANGUAGE plpgsql AS $$
             BEGIN RAISE EXCEPTION 'order % rejected', ev->>'entity_id'; END $$;",
    )
    .await;
    let cfg = db.config(
        r#"[[observers]]
name = "audit"
entity = "Order"
events = ["INSERT"]

  [[observers.actions]]
  type = "sql"
  function = "public.record_order"

  [[observers.actions]]
  type = "log"
  message = "order {{ event.entity_id }} recorded"

[[observers]]
name = "rejecter"
entity = "Order"
events = ["INSERT"]
condition = "data.total > 100"

  [[observers.actions]]
  type = "sql"
  function = "reject_order"
  retry = { max_attempts = 3, initial_ms = 20, max_ms = 50 }
"#,
    );
    let mut daemon = Daemon::start(&db, &cfg).await;
    db.insert_order(1, "new", 10.0).await;
    db.insert_order(2, "new", 500.0).await;
    db.wait_caught_up("test", Duration::from_secs(20)).await;

    let audit = db
        .json_rows("SELECT idempotency_key, event FROM audit ORDER BY event->>'entity_id'")
        .await;
    assert_eq!(audit.len(), 2, "one call per inserted order: {audit:?}");
    let ids = db.event_ids("Order", "1").await;
    assert_eq!(
        audit[0]["idempotency_key"],
        idempotency_key(ids[0], "audit", 0),
        "the key reaches the function"
    );
    assert_eq!(audit[0]["event"]["entity"], "Order");
    assert_eq!(audit[0]["event"]["operation"], "INSERT");
    assert_eq!(audit[0]["event"]["data"]["total"], 10);

    // A function that raises is a permanent failure: dead-lettered at once with its message.
    let dead = db.dead_letters().await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0]["observer"], "rejecter");
    assert_eq!(dead[0]["reason"], "permanent_failure");
    assert!(
        dead[0]["last_error"]
            .as_str()
            .unwrap_or("")
            .contains("order 2 rejected"),
        "{}",
        dead[0]
    );
    assert_eq!(dead[0]["attempts"].as_array().map(Vec::len), Some(1));

    assert!(daemon.stop().await.success());
    assert!(
        daemon.logs().contains("order 1 recorded"),
        "the log action wrote its message"
    );
}
