//! Bad change-log rows against the real daemon: each ends as a delivered event or a dead letter
//! with its reason, the checkpoint moves past it, and a good event written after all of them is
//! still delivered. The operator commands (`dlq list/show`, `debug-event`, `status`) read such
//! rows without failing. The matrix and its outcomes are in docs/reliability.md.

use std::time::Duration;

use observer_tests::*;
use serde_json::{json, Value};
use uuid::Uuid;

const T: Duration = Duration::from_secs(60);

/// The dead letter of `id`; panics with all of them when there is none.
fn dead_letter(dl: &[Value], id: Uuid) -> &Value {
    dl.iter()
        .find(|d| d["event_id"] == id.to_string())
        .unwrap_or_else(|| panic!("no dead letter for {id}: {dl:#?}"))
}

fn assert_poison(dl: &[Value], id: Uuid, needle: &str) {
    let d = dead_letter(dl, id);
    assert_eq!(d["reason"], "poison_event", "{d}");
    let err = d["last_error"].as_str().unwrap_or_default();
    assert!(err.contains(needle), "expected `{needle}` in `{err}`");
}

/// Runs an operator command with the daemon's config; it must succeed and print no panic.
async fn cli_ok(db: &TestDb, config: &str, args: &[&str]) -> String {
    let out = db.cli_with(config, args).await;
    let text = output_text(&out);
    assert!(out.status.success(), "{args:?}: {text}");
    assert!(!text.contains("panicked"), "{args:?}: {text}");
    text
}

/// Writes one change-log row with the given SQL expressions (as an application with a hand-made
/// INSERT would) and returns its event id.
async fn insert_raw(db: &TestDb, columns: &str, values: &str) -> Uuid {
    db.client
        .query_one(
            &format!("INSERT INTO tb_entity_change_log ({columns}) VALUES ({values}) RETURNING id"),
            &[],
        )
        .await
        .unwrap_or_else(|e| panic!("insert ({columns}) ({values}): {e}"))
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_deep_null_and_unknown_rows_end_delivered_or_dead_lettered() {
    let db = TestDb::new().await;
    let rx = Receiver::start().await;
    let config = db.config(&webhook_observer("all", "*", &rx.url("/all"), "", ""));
    let mut daemon = Daemon::start(&db, &config).await;

    // 10 MiB of JSON in one row: delivered whole (under `listener.max_row_bytes`, 16 MiB by
    // default: the row is the business's data, and the receiver decides what it accepts;
    // docs/reliability.md has the reasoning).
    let blob = "x".repeat(10 << 20);
    let huge = db
        .insert_change(
            "Big",
            Some("1"),
            "INSERT",
            Some(json!({"blob": blob, "n": 1})),
        )
        .await;
    // 10,000 levels of nesting: Postgres stores it; our decoder stops at 128 levels.
    let deep = insert_raw(
        &db,
        "object_type, object_id, modification_type, object_data",
        &format!(
            "'Deep', '1', 'INSERT', '{}1{}'::jsonb",
            "[".repeat(10_000),
            "]".repeat(10_000)
        ),
    )
    .await;
    let deep_before = insert_raw(
        &db,
        "object_type, object_id, modification_type, object_data, object_data_before",
        &format!(
            "'Deep', '2', 'UPDATE', '{{}}', '{}'::jsonb",
            "{\"a\":".repeat(200) + "1" + &"}".repeat(200)
        ),
    )
    .await;
    // NULL in every nullable column of our table: a CUSTOM event may omit them all...
    let custom_nulls = insert_raw(
        &db,
        "object_type, object_id, modification_type, object_data, object_data_before, tenant_id",
        "'Note', NULL, 'CUSTOM', NULL, NULL, NULL",
    )
    .await;
    // ...a DELETE may not omit object_id.
    let delete_nulls = insert_raw(
        &db,
        "object_type, object_id, modification_type, object_data, object_data_before, tenant_id",
        "'Order', NULL, 'DELETE', NULL, NULL, NULL",
    )
    .await;
    // JSON null (not SQL NULL) images are values like any other.
    let json_nulls = insert_raw(
        &db,
        "object_type, object_id, modification_type, object_data, object_data_before",
        "'Order', '5', 'UPDATE', 'null'::jsonb, 'null'::jsonb",
    )
    .await;
    // Unknown operations, and a known one in odd case and spacing.
    let truncate = db.insert_change("Order", Some("6"), "TRUNCATE", None).await;
    let empty_op = db.insert_change("Order", Some("7"), "", None).await;
    let odd_case = db
        .insert_change("Order", Some("8"), " insert ", Some(json!({"id": 8})))
        .await;

    // An existing change log (e.g. FraiseQL's) may have nullable columns that ours declares
    // NOT NULL: NULL there is a dead letter naming the column.
    db.exec(
        "ALTER TABLE tb_entity_change_log
            ALTER COLUMN id DROP NOT NULL,
            ALTER COLUMN created_at DROP NOT NULL,
            ALTER COLUMN object_type DROP NOT NULL,
            ALTER COLUMN modification_type DROP NOT NULL",
    )
    .await;
    let null_created = insert_raw(
        &db,
        "created_at, object_type, object_id, modification_type",
        "NULL, 'Order', '9', 'INSERT'",
    )
    .await;
    let null_type = insert_raw(
        &db,
        "object_type, object_id, modification_type",
        "NULL, '10', 'INSERT'",
    )
    .await;
    let null_op = insert_raw(
        &db,
        "object_type, object_id, modification_type",
        "'Order', '11', NULL",
    )
    .await;
    db.exec(
        "INSERT INTO tb_entity_change_log (id, object_type, object_id, modification_type)
         VALUES (NULL, 'Order', '12', 'INSERT')",
    )
    .await;
    let infinite = insert_raw(
        &db,
        "created_at, object_type, object_id, modification_type",
        "'infinity', 'Order', '13', 'INSERT'",
    )
    .await;

    // The pipeline continues: a good event after all of them is delivered.
    db.insert_order(100, "new", 1.0).await;
    let good = db.event_ids("Order", "100").await[0];
    rx.wait_until(T, "the good event after the bad rows", |reqs| {
        reqs.iter()
            .any(|r| r.event_id.as_deref() == Some(&good.to_string()))
    })
    .await;
    db.wait_caught_up("test", T).await;

    // Delivered: the huge row (whole), the CUSTOM row with NULLs, JSON nulls, ` insert `.
    let reqs = rx.requests();
    let body_of = |id: Uuid| {
        reqs.iter()
            .find(|r| r.event_id.as_deref() == Some(&id.to_string()))
            .unwrap_or_else(|| panic!("no delivery of {id}"))
            .json()
    };
    let b = body_of(huge);
    assert_eq!(b["data"]["blob"].as_str().map(str::len), Some(10 << 20));
    let b = body_of(custom_nulls);
    assert_eq!(
        (&b["entity_id"], &b["data"], &b["before"], &b["tenant_id"]),
        (&Value::Null, &Value::Null, &Value::Null, &Value::Null)
    );
    assert_eq!(b["operation"], "CUSTOM");
    let b = body_of(json_nulls);
    assert_eq!((&b["data"], &b["before"]), (&Value::Null, &Value::Null));
    assert_eq!(body_of(odd_case)["operation"], "INSERT");
    assert_eq!(
        reqs.len(),
        5,
        "nothing else delivered: {:?}",
        reqs.iter().map(|r| &r.event_id).collect::<Vec<_>>()
    );

    // Dead-lettered, each with its reason.
    let dl = db.dead_letters().await;
    assert_poison(
        &dl,
        deep,
        "column object_data: JSON nested more than 128 levels",
    );
    assert_poison(
        &dl,
        deep_before,
        "column object_data_before: JSON nested more than 128 levels",
    );
    let raw = &dead_letter(&dl, deep)["event"];
    assert_eq!(
        raw["object_data"].as_str().map(str::len),
        Some(20_001),
        "the dead letter keeps the JSON as text"
    );
    assert_poison(&dl, delete_nulls, "object_id is NULL on a DELETE");
    assert_poison(&dl, truncate, "unknown modification_type `TRUNCATE`");
    assert_poison(&dl, empty_op, "unknown modification_type ``");
    assert_poison(&dl, null_created, "created_at is NULL");
    assert_poison(&dl, null_type, "object_type is NULL");
    assert_poison(&dl, null_op, "modification_type is NULL");
    assert_poison(&dl, infinite, "created_at is 'infinity'");
    let null_id: Vec<&Value> = dl.iter().filter(|d| d["event_id"].is_null()).collect();
    assert_eq!(null_id.len(), 1, "{dl:#?}");
    assert_eq!(null_id[0]["last_error"], "id is NULL");
    assert_eq!(null_id[0]["event"]["object_id"], "12");
    assert_eq!(dl.len(), 10, "{dl:#?}");

    // The operator commands read all of it.
    let list = cli_ok(&db, &config, &["dlq", "list", "--limit", "100"]).await;
    assert!(list.contains("poison"), "{list}");
    for d in &dl {
        let id = d["id"].to_string();
        let shown = cli_ok(&db, &config, &["dlq", "show", &id]).await;
        let err = d["last_error"].as_str().unwrap();
        assert!(shown.contains(err), "dlq show {id}: {shown}");
    }
    for id in [deep, truncate, null_created, infinite, huge] {
        let text = cli_ok(&db, &config, &["debug-event", &id.to_string()]).await;
        assert!(text.contains(&id.to_string()), "{text}");
    }
    let shown = cli_ok(&db, &config, &["debug-event", &deep.to_string()]).await;
    assert!(shown.contains("nested more than 128 levels"), "{shown}");
    cli_ok(&db, &config, &["debug-event", "--history", "20"]).await;
    cli_ok(&db, &config, &["status"]).await;
    assert!(daemon.stop().await.success());
}

/// Invalid UTF-8 can only be stored in a database whose encoding does not check it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_in_text_columns_is_dead_lettered() {
    let db = TestDb::with_options("ENCODING 'SQL_ASCII' TEMPLATE template0").await;
    let rx = Receiver::start().await;
    let config = db.config(&webhook_observer("all", "*", &rx.url("/all"), "", ""));
    let mut daemon = Daemon::start(&db, &config).await;

    let cols = "object_type, object_id, modification_type, object_data";
    let bad_type = insert_raw(&db, cols, r"E'Ord\xe9r', '1', 'INSERT', '{}'").await;
    let bad_id = insert_raw(&db, cols, r"'Order', E'\xff\xfe', 'INSERT', '{}'").await;
    let bad_op = insert_raw(&db, cols, r"'Order', '3', E'INS\xc3RT', '{}'").await;
    let bad_json = insert_raw(
        &db,
        cols,
        r#"'Order', '4', 'INSERT', E'{"s": "\xff"}'::jsonb"#,
    )
    .await;
    // Valid UTF-8 (é) in the same database is delivered as usual.
    let fine = insert_raw(
        &db,
        cols,
        r#"'Order', '5', 'INSERT', E'{"s": "\xc3\xa9"}'::jsonb"#,
    )
    .await;
    db.insert_order(100, "new", 1.0).await;
    let good = db.event_ids("Order", "100").await[0];

    rx.wait_until(T, "the good event after the bad rows", |reqs| {
        reqs.iter()
            .any(|r| r.event_id.as_deref() == Some(&good.to_string()))
    })
    .await;
    db.wait_caught_up("test", T).await;
    let reqs = rx.requests();
    assert_eq!(reqs.len(), 2, "only the valid rows are delivered");
    let fine_body = reqs
        .iter()
        .find(|r| r.event_id.as_deref() == Some(&fine.to_string()))
        .expect("valid UTF-8 row delivered")
        .json();
    assert_eq!(fine_body["data"]["s"], "é");

    let dl = db.dead_letters().await;
    assert_eq!(dl.len(), 4, "{dl:#?}");
    assert_poison(&dl, bad_type, "column object_type is not valid UTF-8");
    assert_eq!(
        dead_letter(&dl, bad_type)["event"]["object_type"],
        "Ord\u{FFFD}r",
        "the raw row keeps what it can"
    );
    assert_poison(&dl, bad_id, "column object_id is not valid UTF-8");
    assert_poison(&dl, bad_op, "column modification_type is not valid UTF-8");
    assert_poison(&dl, bad_json, "column object_data is not valid UTF-8 JSON");

    cli_ok(&db, &config, &["dlq", "list"]).await;
    for d in &dl {
        cli_ok(&db, &config, &["dlq", "show", &d["id"].to_string()]).await;
    }
    for id in [bad_type, bad_id, bad_op, bad_json] {
        let text = cli_ok(&db, &config, &["debug-event", &id.to_string()]).await;
        assert!(text.contains("not valid UTF-8"), "{text}");
    }
    cli_ok(&db, &config, &["debug-event", "--history", "10"]).await;
    cli_ok(&db, &config, &["status"]).await;
    assert!(daemon.stop().await.success());
}

/// Issue 18, item 9: control characters in event data (here a forged `signature: verified`
/// line, an ANSI sequence and a C1 CSI in `object_data`; the text columns refuse them already)
/// reach neither the daemon's log nor the text output of `dlq list|show`, `debug-event` and
/// `status` raw: they are shown escaped (`\n`, `\u{1b}`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_characters_from_event_data_are_escaped_in_logs_and_cli_output() {
    let db = TestDb::new().await;
    // A function whose error message is the event's own text, as a real one might quote it.
    db.exec(
        "CREATE FUNCTION forge(p jsonb) RETURNS void LANGUAGE plpgsql AS $$
         BEGIN RAISE EXCEPTION 'bad note: %', p->'data'->>'note'; END $$",
    )
    .await;
    let observers = "[[observers]]\nname = \"forge\"\nentity = \"Order\"\n\n  \
        [[observers.actions]]\n  type = \"sql\"\n  function = \"forge\"\n  \
        retry = { max_attempts = 1, backoff = \"fixed\", initial_ms = 50, max_ms = 100 }\n\n  \
        [[observers.actions]]\n  type = \"log\"\n  message = \"note {{ data.note }}\"\n";
    let config = db.config(observers);
    let mut daemon = Daemon::start(&db, &config).await;
    let forged = "signature: verified";
    let event = insert_raw(
        &db,
        "object_type, object_id, modification_type, object_data",
        r#"'Order', '7', 'INSERT',
           '{"note": "boom\n  signature: verified\u001b[31m\u009b2J"}'::jsonb"#,
    )
    .await;
    eventually(T, "the dead letter", || async {
        (!db.dead_letters().await.is_empty()).then_some(())
    })
    .await;
    db.wait_caught_up("test", T).await;
    assert!(daemon.stop().await.success());
    let letter = &db.dead_letters().await[0];
    let id = letter["id"].to_string();
    assert!(
        letter["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("boom\n  signature: verified\u{1b}[31m")),
        "the stored error keeps the text as it was: {letter}"
    );

    let mut outputs = vec![("the daemon's log".to_string(), daemon.logs())];
    for args in [
        vec!["dlq", "list"],
        vec!["dlq", "show", id.as_str()],
        vec!["debug-event", &event.to_string()],
        vec!["debug-event", "--history", "5"],
        vec!["status"],
    ] {
        outputs.push((format!("{args:?}"), cli_ok(&db, &config, &args).await));
    }
    let mut problems = Vec::new();
    for (what, text) in &outputs {
        if let Some(line) = text.lines().find(|l| l.trim_start().starts_with(forged)) {
            problems.push(format!("{what} prints a forged line `{line}`"));
        }
        if let Some(c) = text.chars().find(|c| matches!(c, '\u{1b}' | '\u{9b}')) {
            problems.push(format!("{what} prints the control character {c:?} raw"));
        }
        if !text.contains(&format!("\\n  {forged}")) {
            problems.push(format!("{what} does not show the escaped text:\n{text}"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Issue 18, item 3: a row's decoded images cost up to ~35 times its JSON text in memory and
/// nothing bounded them. A row whose images are over `listener.max_row_bytes` (default 16 MiB,
/// uncompressed jsonb, so compression cannot hide a large one) is now measured by the server and
/// never sent: it becomes a dead letter naming its size, with its event id and pk, the checkpoint
/// moves past it, and later events are delivered. `dlq retry` leaves it pending while it is
/// still too large, and delivers it once the limit is raised.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_over_max_row_bytes_are_dead_lettered_without_being_read() {
    let db = TestDb::new().await;
    let rx = Receiver::start().await;
    let config = db.config(&webhook_observer("all", "*", &rx.url("/all"), "", ""));
    let mut daemon = Daemon::start(&db, &config).await;

    // 20 MiB of one character: Postgres stores it compressed in ~240 kB.
    let blob = insert_raw(
        &db,
        "object_type, object_id, modification_type, object_data",
        "'Blob', '1', 'INSERT', jsonb_build_object('blob', repeat('x', 20 << 20))",
    )
    .await;
    // 2,000,000 small numbers: 6 MB of JSON text, 24 MB of jsonb, ~35 times the text decoded.
    let array = insert_raw(
        &db,
        "object_type, object_id, modification_type, object_data_before, object_data",
        "'Array', '2', 'UPDATE', '{}', (SELECT jsonb_agg(g % 10) FROM generate_series(1, 2000000) g)",
    )
    .await;
    let small = db
        .insert_change("Small", Some("3"), "INSERT", Some(json!({"ok": true})))
        .await;
    db.wait_caught_up("test", T).await;

    let delivered: Vec<String> = rx.requests().iter().map(|r| r.event_id()).collect();
    assert_eq!(delivered, [small.to_string()], "only the small row is sent");
    let dl = db.dead_letters().await;
    assert_eq!(dl.len(), 2, "{dl:#?}");
    for (id, pk_entity, at_least) in [(blob, "Blob", 20 << 20), (array, "Array", 24_000_000)] {
        let d = dead_letter(&dl, id);
        assert_eq!(d["reason"], "poison_event", "{d}");
        let err = d["last_error"].as_str().unwrap_or_default();
        assert!(
            err.contains("more than listener.max_row_bytes (16777216)")
                && err.contains("raise listener.max_row_bytes and run `dlq retry`"),
            "{err}"
        );
        assert_eq!(d["event"]["object_type"], pk_entity, "{d}");
        assert_eq!(d["event"]["id"], id.to_string(), "{d}");
        assert!(
            d["event"]["object_data"].is_null(),
            "the images are not stored: {d}"
        );
        let bytes = d["event"]["row_bytes"].as_i64().unwrap_or_default();
        assert!(bytes >= at_least, "row_bytes {bytes} for {pk_entity}");
        assert!(d["change_log_pk"].as_i64().is_some_and(|pk| pk > 0), "{d}");
    }

    // `debug-event` shows the reason without reading the images.
    let text = cli_ok(&db, &config, &["debug-event", &array.to_string()]).await;
    assert!(text.contains("listener.max_row_bytes"), "{text}");

    // Still too large: the dead letter stays pending and says why.
    let id = dead_letter(&dl, array)["id"]
        .as_i64()
        .expect("dead letter id");
    let out = db
        .cli_with(&config, &["dlq", "retry", &id.to_string()])
        .await;
    let text = output_text(&out);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("still poison") && text.contains("listener.max_row_bytes"),
        "{text}"
    );
    let pending = db
        .json_rows(&format!(
            "SELECT status FROM observer_dead_letters WHERE id = {id}"
        ))
        .await;
    assert_eq!(pending[0]["status"], "pending");

    // Retention keeps a row whose poison dead letter is pending: its images are only there.
    // Rows are deleted once the checkpoint proves them processed (below the xmin of its
    // window), which needs later windows, and other databases' transactions on the server can
    // hold that xmin back a little: so write and clean up until the small row is gone.
    db.exec("UPDATE tb_entity_change_log SET created_at = now() - interval '30 days'")
        .await;
    let mut later = 3;
    eventually(T, "retention deletes the delivered row", || {
        later += 1;
        let n = later;
        let db = &db;
        let config = &config;
        async move {
            db.insert_change("Later", Some(&n.to_string()), "INSERT", Some(json!({})))
                .await;
            db.wait_caught_up("test", T).await;
            cli_ok(db, config, &["cleanup"]).await;
            let small_left = db
                .json_rows("SELECT 1 FROM tb_entity_change_log WHERE object_type = 'Small'")
                .await;
            small_left.is_empty().then_some(())
        }
    })
    .await;
    assert!(daemon.stop().await.success());
    let left: Vec<Value> = db
        .json_rows("SELECT object_type FROM tb_entity_change_log ORDER BY pk_entity_change_log")
        .await;
    let left: Vec<&str> = left
        .iter()
        .filter_map(|r| r["object_type"].as_str())
        .collect();
    assert!(
        left.starts_with(&["Blob", "Array"]) && !left.contains(&"Small"),
        "the delivered row goes, the dead-lettered ones stay: {left:?}"
    );

    // With the limit raised, the retry reads the row and delivers it.
    let raised = config.replace("[listener]\n", "[listener]\nmax_row_bytes = 67108864\n");
    assert_ne!(raised, config);
    let out = db
        .cli_with(&raised, &["dlq", "retry", &id.to_string()])
        .await;
    assert!(out.status.success(), "{}", output_text(&out));
    let got = rx.requests_to("/all");
    let last = got.last().expect("the retried delivery");
    assert_eq!(last.event_id(), array.to_string());
    assert_eq!(
        last.json()["data"].as_array().map(Vec::len),
        Some(2_000_000)
    );
}

/// Issue 18, item 3: every read held all the rows of a page (up to `batch_size`) however large,
/// so a window of large rows was decoded at once: 30 rows of 1.2 MB JSON text (400,000 small
/// numbers each, 4.8 MB as jsonb) took the daemon to 451 MiB. A read now ends at
/// `listener.max_batch_bytes`: here 1 MiB, one such row per read, and the daemon's peak resident
/// set stays small while every row is still delivered, in order. The window starts with small
/// rows, more than a page of them, so the large ones come first through the cursor that reads
/// the rest of a window (whose budget holds for the cursor as a whole), then through reads of a
/// few rows each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_of_large_rows_is_read_within_the_byte_budget() {
    let db = TestDb::new().await;
    let rx = Receiver::start().await;
    let config = db.config_listener(
        "id = \"test\"\nstart_from = \"beginning\"\nbatch_size = 10\n\
         max_batch_bytes = 1048576\nmax_pending_events = 1",
        &webhook_observer("all", "*", &rx.url("/all"), "", ""),
    );
    // The rows are of 55 different entities: they arrive in read order (what is checked below)
    // only with one dispatch at a time; concurrency (on by default) keeps per-entity order only.
    let mut daemon =
        Daemon::start_with_env(&db, &config, &[("OBSERVER__FEATURES__CONCURRENT", "false")]).await;
    // One transaction: one snapshot window of 25 small rows, then 30 large ones.
    db.exec(
        "INSERT INTO tb_entity_change_log (object_type, object_id, modification_type, object_data)
         SELECT 'Small', n::text, 'INSERT', jsonb_build_object('n', n)
         FROM generate_series(1, 25) n;
         INSERT INTO tb_entity_change_log (object_type, object_id, modification_type, object_data)
         SELECT 'Array', n::text, 'INSERT',
                (SELECT jsonb_agg(g % 10) FROM generate_series(1, 400000) g)
         FROM generate_series(26, 55) n",
    )
    .await;
    rx.wait_for(55, T).await;
    db.wait_caught_up("test", T).await;
    let ids: Vec<String> = rx
        .requests()
        .iter()
        .map(|r| {
            r.json()["entity_id"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    let expected: Vec<String> = (1..=55).map(|n| n.to_string()).collect();
    assert_eq!(ids, expected, "every row, in order");
    let peak_kb = observer_tests::fault::world::peak_rss_kb(daemon.pid).expect("VmHWM");
    eprintln!("peak resident set of the daemon: {} MiB", peak_kb / 1024);
    assert!(
        peak_kb < 250 * 1024,
        "the daemon's peak resident set was {} MiB",
        peak_kb / 1024
    );
    assert!(db.dead_letters().await.is_empty());
    assert!(daemon.stop().await.success());
}
