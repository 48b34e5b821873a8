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
