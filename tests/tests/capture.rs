//! `capture add|list|remove`: object_id from a primary key of any type, the list, and removal.

use observer_tests::*;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_any_key_type_list_and_remove() {
    let db = TestDb::new().await;
    db.exec(
        "CREATE TABLE contacts (id UUID PRIMARY KEY, email TEXT NOT NULL);
         CREATE TABLE skus (code TEXT PRIMARY KEY, tenant UUID, tenant_id UUID);",
    )
    .await;
    for (table, entity) in [("contacts", "Contact"), ("skus", "Sku")] {
        let out = db.cli(&["capture", "add", table, "--entity", entity]).await;
        assert!(out.status.success(), "{}", output_text(&out));
    }
    let out = db.cli(&["capture", "list", "--json"]).await;
    assert!(out.status.success(), "{}", output_text(&out));
    let list: Value = serde_json::from_slice(&out.stdout).expect("capture list --json");
    let tables: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["table"].as_str())
        .collect();
    assert_eq!(tables, ["public.contacts", "public.orders", "public.skus"]);
    let skus = list
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["table"] == "public.skus")
        .unwrap();
    assert_eq!(
        skus["tenant_column"], "tenant_id",
        "a uuid tenant_id column is captured as tenant_id"
    );

    let tenant = uuid::Uuid::new_v4();
    db.exec(
        "INSERT INTO contacts VALUES ('6f1c2b7e-8d3a-4c59-9e02-5b1d7a4f3c81', 'a@example.com')",
    )
    .await;
    db.client
        .execute("INSERT INTO skus VALUES ('SKU-1', NULL, $1)", &[&tenant])
        .await
        .unwrap();
    let rows = db
        .json_rows("SELECT object_type, object_id, tenant_id FROM tb_entity_change_log ORDER BY pk_entity_change_log")
        .await;
    assert_eq!(
        rows[0]["object_id"], "6f1c2b7e-8d3a-4c59-9e02-5b1d7a4f3c81",
        "a uuid key as text"
    );
    assert_eq!(rows[1]["object_id"], "SKU-1", "a text key");
    assert_eq!(rows[1]["tenant_id"], tenant.to_string());

    // A table without a primary key needs --id-column; a missing table is an error.
    db.exec("CREATE TABLE loose (a INT, b TEXT)").await;
    let out = db
        .cli(&["capture", "add", "loose", "--entity", "Loose"])
        .await;
    assert!(!out.status.success());
    assert!(
        output_text(&out).contains("--id-column"),
        "{}",
        output_text(&out)
    );
    let out = db
        .cli(&[
            "capture",
            "add",
            "loose",
            "--entity",
            "Loose",
            "--id-column",
            "a",
        ])
        .await;
    assert!(out.status.success(), "{}", output_text(&out));
    let out = db
        .cli(&["capture", "add", "nope", "--entity", "Nope"])
        .await;
    assert!(!out.status.success());
    assert!(
        output_text(&out).contains("does not exist"),
        "{}",
        output_text(&out)
    );

    // Removed: further changes write nothing.
    let out = db.cli(&["capture", "remove", "contacts"]).await;
    assert!(out.status.success(), "{}", output_text(&out));
    db.exec("UPDATE contacts SET email = 'b@example.com'").await;
    let n = db
        .json_rows("SELECT 1 FROM tb_entity_change_log WHERE object_type = 'Contact'")
        .await
        .len();
    assert_eq!(n, 1, "no change-log row after capture remove");
    let out = db.cli(&["capture", "remove", "contacts"]).await;
    assert!(
        !out.status.success(),
        "removing twice says there is nothing to remove"
    );
}

/// Issue 18, item 5: `capture add --entity` wrote the entity into `CREATE TRIGGER` as a literal
/// quoted on our side (`'` doubled), which holds only while `standard_conforming_strings` is on.
/// With it off, `\'` ends the literal early and the rest of the entity ran as SQL. The trigger
/// arguments are now quoted by the server, so the entity arrives verbatim whatever its settings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_add_quotes_the_entity_whatever_the_string_settings() {
    let db = TestDb::new().await;
    db.exec(&format!(
        "ALTER DATABASE {} SET standard_conforming_strings = off",
        db.name
    ))
    .await;
    db.exec("CREATE TABLE notes (id BIGINT PRIMARY KEY, body TEXT)")
        .await;
    let entity = r"Note\'); CREATE TABLE IF NOT EXISTS pwned (); --";
    let out = db
        .cli(&["capture", "add", "notes", "--entity", entity])
        .await;
    assert!(out.status.success(), "{}", output_text(&out));
    let pwned = db
        .json_rows("SELECT 1 FROM pg_class WHERE relname = 'pwned'")
        .await;
    assert!(
        pwned.is_empty(),
        "the entity ran as SQL: table pwned exists"
    );

    let out = db.cli(&["capture", "list", "--json"]).await;
    assert!(out.status.success(), "{}", output_text(&out));
    let list: Value = serde_json::from_slice(&out.stdout).expect("capture list --json");
    let notes = list
        .as_array()
        .and_then(|l| l.iter().find(|c| c["table"] == "public.notes"))
        .unwrap_or_else(|| panic!("no capture on notes: {list}"));
    assert_eq!(notes["entity"], entity, "{notes}");
    assert_eq!(notes["id_columns"], serde_json::json!(["id"]), "{notes}");

    // The trigger writes that entity, and the row's key, for a change.
    db.exec("INSERT INTO notes VALUES (1, 'hi')").await;
    let rows = db
        .json_rows(
            "SELECT object_type, object_id FROM tb_entity_change_log WHERE object_id = '1' \
             AND object_type <> 'Order'",
        )
        .await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["object_type"], entity);

    // An entity no change-log row could carry is refused up front, naming the flag.
    for bad in ["", "  ", "Line\nbreak"] {
        let out = db.cli(&["capture", "add", "notes", "--entity", bad]).await;
        let text = output_text(&out);
        assert!(!out.status.success(), "{bad:?} accepted: {text}");
        assert!(text.contains("--entity"), "{bad:?}: {text}");
    }
}
