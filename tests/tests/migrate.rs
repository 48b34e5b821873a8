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
            "observer_audit",
            "observer_checkpoints",
            "observer_dead_letters",
            "observer_instances",
            "observer_leases",
            "observer_search_index",
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

/// Issue 18, item 5: `listener.channel` was written into the NOTIFY function's body, so a channel
/// holding `$fn$` closed the body and ran the rest as SQL (with `check_function_bodies` off the
/// broken body was accepted too). A channel must now be an identifier: `validate`, `migrate` and
/// `run` refuse anything else with an error naming `listener.channel`, and nothing runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_that_is_not_an_identifier_is_refused_before_it_reaches_sql() {
    let db = TestDb::new().await;
    db.exec(&format!(
        "ALTER DATABASE {} SET check_function_bodies = off",
        db.name
    ))
    .await;
    let pwned = || async {
        !db.json_rows("SELECT 1 FROM pg_class WHERE relname = 'pwned'")
            .await
            .is_empty()
    };
    for channel in [
        "a$fn$;CREATE TABLE pwned ();SELECT $fn$",
        "it's",
        "with space",
        "1starts_with_a_digit",
    ] {
        let cfg = db.config_raw(&format!(
            "[listener]\nchannel = \"{channel}\"\n\n{}",
            webhook_observer("orders", "Order", "http://127.0.0.1:9/", "", "")
        ));
        let file = db.write_file("channel.toml", &cfg);
        for args in [
            vec!["validate", file.to_str().unwrap()],
            vec!["--config", file.to_str().unwrap(), "migrate"],
        ] {
            let out = run_cli(&args).await;
            let text = output_text(&out);
            assert!(
                !out.status.success(),
                "{args:?} accepted `{channel}`: {text}"
            );
            assert!(
                text.contains("listener.channel") && text.contains("letters, digits"),
                "{args:?} `{channel}`: {text}"
            );
        }
        assert!(!pwned().await, "`{channel}` ran as SQL");
    }

    // A channel that is an identifier works, with the function bodies unchecked as well. The
    // poll is a minute, so the delivery below is woken by the NOTIFY of the function `migrate`
    // installed for this channel.
    let rx = Receiver::start().await;
    let cfg = db.config_raw(&format!(
        "[listener]\nid = \"test\"\nstart_from = \"beginning\"\npoll_interval_ms = 60000\n\
         channel = \"Orders_Wake_1\"\n\n{}",
        webhook_observer("orders", "Order", &rx.url("/orders"), "", "")
    ));
    let out = db.cli_with(&cfg, &["migrate"]).await;
    assert!(out.status.success(), "{}", output_text(&out));
    let mut daemon = Daemon::start(&db, &cfg).await;
    db.insert_order(1, "new", 1.0).await;
    rx.wait_for(1, Duration::from_secs(20)).await;
    assert!(daemon.stop().await.success());
}

/// The second wall of item 5: the NOTIFY function's statement is rendered by the server, so even
/// a channel full of quotes, backslashes and dollar tags (which the config check refuses) becomes
/// exactly that channel, with `standard_conforming_strings` off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_notify_function_is_quoted_by_the_server_whatever_the_string_settings() {
    use futures::StreamExt as _;

    let db = TestDb::new().await;
    let channel = r"it's \a $fn$ channel";
    let (client, mut conn) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    let (notes_tx, mut notes) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(m)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = m {
                let _ = notes_tx.send((n.channel().to_string(), n.payload().to_string()));
            }
        }
    });
    client
        .batch_execute("SET standard_conforming_strings = off; CREATE SCHEMA quoting")
        .await
        .expect("session");
    let create: String = client
        .query_one(
            observer_core::schema::NOTIFY_FUNCTION_QUERY,
            &[&"quoting", &1i32, &2i32, &3i32, &channel],
        )
        .await
        .expect("render the function")
        .get(0);
    client.batch_execute(&create).await.expect(&create);
    client
        .batch_execute(&format!(
            "CREATE TABLE quoting.t (x int);
             CREATE TRIGGER n AFTER INSERT ON quoting.t FOR EACH ROW
                 EXECUTE FUNCTION quoting.fraiseql_observers_notify();
             LISTEN {};
             INSERT INTO quoting.t VALUES (1);",
            observer_core::schema::quote_ident(channel)
        ))
        .await
        .expect("listen and insert");
    let got = tokio::time::timeout(Duration::from_secs(10), notes.recv())
        .await
        .expect("no notification within 10 s");
    assert_eq!(got, Some((channel.to_string(), "quoting.t".to_string())));
}
