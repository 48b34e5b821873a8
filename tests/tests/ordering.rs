//! Snapshot windows: a late commit is not skipped, an unrelated open transaction delays nobody,
//! and two transactions updating one row arrive in commit order.

use std::time::{Duration, Instant};

use observer_tests::*;

const T: Duration = Duration::from_secs(30);

fn entity_ids(reqs: &[Received]) -> Vec<String> {
    reqs.iter()
        .map(|r| r.json()["entity_id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_commit_is_not_skipped() {
    let db = TestDb::new().await;
    let rx = Receiver::start().await;
    let mut daemon = Daemon::start(
        &db,
        &db.config(&webhook_observer("o", "Order", &rx.url("/h"), "", "")),
    )
    .await;

    let a = db.connect().await;
    let b = db.connect().await;
    a.batch_execute("BEGIN; INSERT INTO orders (id) VALUES (1)")
        .await
        .unwrap();
    b.batch_execute("INSERT INTO orders (id) VALUES (2)")
        .await
        .unwrap();
    let pks = db
        .json_rows("SELECT object_id, pk_entity_change_log AS pk FROM tb_entity_change_log ORDER BY pk_entity_change_log")
        .await;
    assert_eq!(pks.len(), 1, "A is not visible yet");
    assert_eq!(pks[0]["object_id"], "2");

    let reqs = rx.wait_for(1, T).await;
    assert_eq!(entity_ids(&reqs), ["2"], "B is delivered while A is open");
    a.batch_execute("COMMIT").await.unwrap();
    let all = db
        .json_rows(
            "SELECT object_id, pk_entity_change_log AS pk FROM tb_entity_change_log ORDER BY 2",
        )
        .await;
    assert_eq!(all[0]["object_id"], "1", "A holds the lower pk: {all:?}");
    let reqs = rx.wait_for(2, T).await;
    assert_eq!(
        entity_ids(&reqs),
        ["2", "1"],
        "A is delivered after it commits"
    );
    db.wait_caught_up("test", T).await;
    assert_eq!(rx.count(), 2);
    assert!(daemon.stop().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unrelated_open_transaction_does_not_delay_delivery() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE scratch (x INT)").await;
    let rx = Receiver::start().await;
    let mut daemon = Daemon::start(
        &db,
        &db.config(&webhook_observer("o", "Order", &rx.url("/h"), "", "")),
    )
    .await;

    let open = db.connect().await;
    open.batch_execute("BEGIN; INSERT INTO scratch VALUES (1)")
        .await
        .unwrap();
    let xid: String = open
        .query_one("SELECT pg_current_xact_id()::text", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!xid.is_empty());

    let t0 = Instant::now();
    for i in 1..=3 {
        db.insert_order(i, "new", 1.0).await;
    }
    rx.wait_for(3, Duration::from_secs(3)).await;
    let took = t0.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "deliveries took {took:?} behind an unrelated open transaction"
    );
    // The transaction is still open.
    let open_now: i64 = db
        .client
        .query_one("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND state = 'idle in transaction'", &[])
        .await
        .unwrap()
        .get(0);
    assert!(open_now >= 1);
    open.batch_execute("ROLLBACK").await.unwrap();
    assert!(daemon.stop().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interleaved_updates_of_one_row_arrive_in_commit_order() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE scratch (x INT)").await;
    let rx = Receiver::start().await;
    let mut daemon = Daemon::start(
        &db,
        &db.config(&webhook_observer("o", "Order", &rx.url("/h"), "", "")),
    )
    .await;
    db.insert_order(5, "new", 1.0).await;
    rx.wait_for(1, T).await;

    let t1 = db.connect().await;
    let t2 = db.connect().await;
    // T2 takes its transaction id first (so ordering by xid would put it first) ...
    t2.batch_execute("BEGIN; INSERT INTO scratch VALUES (2)")
        .await
        .unwrap();
    // ... T1 updates the row ...
    t1.batch_execute("BEGIN; UPDATE orders SET status = 't1' WHERE id = 5")
        .await
        .unwrap();
    // ... T2 blocks on the row lock (from another task).
    let blocked = tokio::spawn(async move {
        t2.batch_execute("UPDATE orders SET status = 't2' WHERE id = 5")
            .await
            .unwrap();
        t2
    });
    eventually(T, "T2 to wait on T1's row lock", || async {
        let n: i64 = db
            .client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        (n >= 1).then_some(())
    })
    .await;
    t1.batch_execute("COMMIT").await.unwrap();
    let t2 = blocked.await.unwrap();
    t2.batch_execute("COMMIT").await.unwrap();

    let reqs = rx.wait_for(3, T).await;
    let statuses: Vec<String> = reqs
        .iter()
        .map(|r| {
            format!(
                "{}:{}",
                r.json()["operation"].as_str().unwrap(),
                r.json()["data"]["status"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        statuses,
        ["INSERT:new", "UPDATE:t1", "UPDATE:t2"],
        "commit order"
    );
    let upd = reqs[2].json();
    assert_eq!(upd["before"]["status"], "t1", "T2 saw T1's committed row");
    assert!(daemon.stop().await.success());
}
