//! `migrate` on an existing FraiseQL change log (`core.tb_entity_change_log`, a UUID object_id,
//! extra columns and rows already in it): runs twice, keeps every column and row, and the daemon
//! then delivers from it.

use std::time::Duration;

use observer_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_adopts_an_existing_fraiseql_change_log_and_is_idempotent() {
    let db = TestDb::new().await;
    db.exec(
        "CREATE SCHEMA core;
         CREATE TABLE core.tb_entity_change_log (
             pk_entity_change_log BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
             id UUID NOT NULL DEFAULT gen_random_uuid(),
             fk_customer_org UUID,
             fk_contact UUID,
             object_type TEXT NOT NULL,
             object_id UUID NOT NULL,
             modification_type TEXT NOT NULL,
             change_status TEXT,
             object_data JSONB,
             extra_metadata JSONB,
             created_at TIMESTAMPTZ NOT NULL DEFAULT now());
         INSERT INTO core.tb_entity_change_log (object_type, object_id, modification_type, change_status, object_data, extra_metadata)
         VALUES ('Contact', '11111111-1111-1111-1111-111111111111', 'INSERT', 'new', '{\"name\": \"old\"}', '{\"source\": \"legacy\"}');",
    )
    .await;

    let rx = Receiver::start().await;
    let observers = webhook_observer("contacts", "Contact", &rx.url("/contacts"), "", "");
    let cfg = db.config_raw(&format!(
        "[change_log]\ntable = \"core.tb_entity_change_log\"\n\n[listener]\nid = \"fraiseql\"\npoll_interval_ms = 200\n\n{observers}"
    ));
    for round in 1..=2 {
        let out = db.cli_with(&cfg, &["migrate"]).await;
        assert!(
            out.status.success(),
            "migrate round {round}: {}",
            output_text(&out)
        );
    }

    // Nothing lost: the old row and its extra columns are intact; our columns were added.
    let rows = db
        .json_rows("SELECT change_status, extra_metadata, object_id::text AS oid, txid IS NOT NULL AS has_txid, object_data_before FROM core.tb_entity_change_log")
        .await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["change_status"], "new");
    assert_eq!(rows[0]["extra_metadata"]["source"], "legacy");
    assert_eq!(rows[0]["has_txid"], true);
    let tables = db
        .json_rows(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'core' ORDER BY 1",
        )
        .await;
    let names: Vec<&str> = tables
        .iter()
        .filter_map(|t| t["table_name"].as_str())
        .collect();
    assert_eq!(
        names,
        [
            "observer_action_log",
            "observer_checkpoints",
            "observer_dead_letters",
            "tb_entity_change_log"
        ],
        "our tables live beside the change log"
    );

    // The application keeps writing its own columns; the daemon delivers from the adopted table.
    let mut daemon = Daemon::start(&db, &cfg).await;
    db.exec(
        "INSERT INTO core.tb_entity_change_log (object_type, object_id, modification_type, change_status, object_data)
         VALUES ('Contact', '22222222-2222-2222-2222-222222222222', 'UPDATE', 'new', '{\"name\": \"Ada\"}')",
    )
    .await;
    let reqs = rx.wait_for(1, Duration::from_secs(20)).await;
    let body = reqs[0].json();
    assert_eq!(body["entity"], "Contact");
    assert_eq!(
        body["entity_id"], "22222222-2222-2222-2222-222222222222",
        "a UUID object_id is read as text"
    );
    assert_eq!(body["data"]["name"], "Ada");
    assert!(daemon.stop().await.success());
    let cps = db
        .json_rows("SELECT listener_id FROM core.observer_checkpoints")
        .await;
    assert_eq!(
        cps.len(),
        1,
        "the checkpoint is kept in the change log's schema"
    );
}
