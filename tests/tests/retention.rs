//! The daemon's own retention pass (`[retention] interval_secs`): processed change-log rows and
//! action-log rows past their age are deleted while the daemon runs, with no `cleanup` command.

use std::time::Duration;

use observer_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_applies_retention_to_processed_rows() {
    let db = TestDb::new().await;
    let rx = Receiver::start().await;
    let observers = webhook_observer("orders", "Order", &rx.url("/orders"), "", "");
    let cfg = db.config_raw(&format!(
        "[listener]\nid = \"test\"\nstart_from = \"beginning\"\npoll_interval_ms = 200\n\n\
         [retention]\ninterval_secs = 1\nchange_log_days = 2\naction_log_days = 2\ndead_letter_days = 2\nbatch_size = 2\n\n{observers}"
    ));
    let mut daemon = Daemon::start(&db, &cfg).await;
    for id in 1..=5 {
        db.insert_order(id, "new", 1.0).await;
    }
    rx.wait_for(5, Duration::from_secs(20)).await;
    db.wait_caught_up("test", Duration::from_secs(20)).await;

    // Age three of the processed rows past the policy; two stay young.
    db.exec(
        "UPDATE tb_entity_change_log SET created_at = now() - interval '3 days'
           WHERE object_id IN ('1', '2', '3');
         UPDATE observer_action_log SET finished_at = now() - interval '3 days'
           WHERE event_id IN (SELECT id FROM tb_entity_change_log WHERE object_id IN ('1', '2'));",
    )
    .await;
    eventually(
        Duration::from_secs(15),
        "the daemon's retention pass",
        || async {
            let cl = db
                .json_rows("SELECT object_id FROM tb_entity_change_log ORDER BY 1")
                .await;
            let al = db.json_rows("SELECT 1 FROM observer_action_log").await;
            (cl.len() == 2 && al.len() == 3).then_some(())
        },
    )
    .await;
    let left: Vec<String> = db
        .json_rows("SELECT object_id FROM tb_entity_change_log ORDER BY 1")
        .await
        .iter()
        .map(|r| r["object_id"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(
        left,
        ["4", "5"],
        "only the aged, processed rows are deleted"
    );
    assert!(daemon.stop().await.success());
}

/// Issue 18, item 4: day counts were cast `u32 → i32`, so 4294967295 became -1 ("older than
/// tomorrow") and deleted every row. Such a count is now refused — by `validate`, by `cleanup`
/// and by `dlq purge --older-than` — with an error naming the key or flag, and nothing is deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn day_counts_past_the_range_are_refused_and_delete_nothing() {
    let db = TestDb::new().await;
    // Fresh rows: no honest policy deletes any of them.
    db.exec(
        "INSERT INTO observer_action_log
             (listener_id, event_id, change_log_pk, observer, action_index, action_type, idempotency_key, outcome, attempts)
         VALUES ('test', gen_random_uuid(), 1, 'o', 0, 'log', 'k', 'delivered', '[]');
         INSERT INTO observer_dead_letters
             (listener_id, event_id, change_log_pk, event, reason, last_error, status, resolved_at)
         VALUES ('test', gen_random_uuid(), 1, '{}', 'retries_exhausted', 'e', 'resolved', now()),
                ('test', gen_random_uuid(), 2, '{}', 'retries_exhausted', 'e', 'pending', NULL)",
    )
    .await;
    let counts = || async {
        (
            db.json_rows("SELECT 1 FROM observer_action_log")
                .await
                .len(),
            db.json_rows("SELECT 1 FROM observer_dead_letters")
                .await
                .len(),
        )
    };
    assert_eq!(counts().await, (1, 2));

    for key in ["change_log_days", "action_log_days", "dead_letter_days"] {
        let cfg = db.config_raw(&format!(
            "[retention]\n{key} = 4294967295\n\n{}",
            webhook_observer("orders", "Order", "http://127.0.0.1:9/", "", "")
        ));
        let file = db.write_file(&format!("retention-{key}.toml"), &cfg);
        let out = run_cli(&["validate", file.to_str().unwrap()]).await;
        let text = output_text(&out);
        assert!(!out.status.success(), "validate accepted {key}: {text}");
        assert!(
            text.contains(&format!("retention.{key}")) && text.contains("0..=36500"),
            "{text}"
        );
        let out = db.cli_with(&cfg, &["cleanup"]).await;
        let text = output_text(&out);
        assert!(!out.status.success(), "cleanup ran with {key}: {text}");
        assert!(
            text.contains(&format!("retention.{key}")) && text.contains("0..=36500"),
            "{text}"
        );
        assert_eq!(counts().await, (1, 2), "cleanup with {key} deleted rows");
    }

    let cfg = db.config_raw("");
    let out = db
        .cli_with(
            &cfg,
            &[
                "dlq",
                "purge",
                "--status",
                "all",
                "--yes",
                "--older-than",
                "4294967295",
            ],
        )
        .await;
    let text = output_text(&out);
    assert!(!out.status.success(), "purge accepted the count: {text}");
    assert!(
        text.contains("--older-than") && text.contains("0..=36500"),
        "{text}"
    );
    assert_eq!(counts().await, (1, 2), "dlq purge deleted rows");

    // The largest accepted count is honoured: nothing is that old.
    let out = db
        .cli_with(
            &cfg,
            &[
                "dlq",
                "purge",
                "--status",
                "all",
                "--yes",
                "--older-than",
                "36500",
            ],
        )
        .await;
    assert!(out.status.success(), "{}", output_text(&out));
    assert_eq!(counts().await, (1, 2));
}
