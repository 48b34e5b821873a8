//! The wake-up: only one committing writer at a time sends the NOTIFY (schema.rs explains
//! why), yet no change waits for the polling fallback. These tests set the poll to ten minutes,
//! so a change whose wake-up was lost would miss every deadline here.

use std::time::Duration;

use observer_tests::*;

const NO_POLL: &str = "id = \"test\"\nstart_from = \"beginning\"\npoll_interval_ms = 600000";

fn config(db: &TestDb, rx: &Receiver) -> String {
    // `config_listener` writes its own poll_interval_ms first; the later key would be a TOML
    // duplicate, so build the listener section here.
    db.config_raw(&format!(
        "[listener]\nshutdown_timeout_ms = 15000\n{NO_POLL}\n\n{}",
        webhook_observer("all", "Order", &rx.url("/h"), "", "")
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_are_delivered_without_the_poll() {
    let db = TestDb::new().await;
    let rx = Receiver::start().await;
    let mut daemon = Daemon::start(&db, &config(&db, &rx)).await;

    // Sixteen connections committing single-row inserts as fast as they can: most commits
    // overlap another's, so most skip the NOTIFY. Two more hold a transaction open across
    // other commits (one writes early and commits late; one writes late).
    const WRITERS: i64 = 16;
    const EACH: i64 = 60;
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let client = db.connect().await;
        tasks.push(tokio::spawn(async move {
            for i in 0..EACH {
                client
                    .execute(
                        "INSERT INTO orders (id, status) VALUES ($1, 'new')",
                        &[&(w * 1000 + i)],
                    )
                    .await
                    .expect("insert");
            }
        }));
    }
    for (id, sleep_before, sleep_after) in [(900_001i64, 0.0f64, 0.4f64), (900_002, 0.3, 0.0)] {
        let mut client = db.connect().await;
        tasks.push(tokio::spawn(async move {
            let tx = client.transaction().await.expect("begin");
            tx.execute("SELECT pg_sleep($1)", &[&sleep_before])
                .await
                .expect("sleep");
            tx.execute("INSERT INTO orders (id) VALUES ($1)", &[&id])
                .await
                .expect("insert");
            tx.execute("SELECT pg_sleep($1)", &[&sleep_after])
                .await
                .expect("sleep");
            tx.commit().await.expect("commit");
        }));
    }
    for t in tasks {
        t.await.expect("writer");
    }
    let total = (WRITERS * EACH + 2) as usize;
    let got = rx.wait_for(total, Duration::from_secs(60)).await;
    assert_eq!(got.len(), total, "every change delivered");

    // Then a lone change after the burst: its own NOTIFY wakes the reader.
    db.insert_order(999_999, "new", 1.0).await;
    let got = rx.wait_for(total + 1, Duration::from_secs(10)).await;
    assert_eq!(got.len(), total + 1);
    daemon.stop().await;
}

/// The case the `committing` lock exists for, made deterministic: a writer skips the NOTIFY
/// (this test holds `notifying`, as a committing notifier would), its commit is slowed by a
/// deferred trigger that runs after ours, and the notification arrives while it is still
/// committing. The reader must notice the writer still committing and look again; looking
/// once and then waiting for the (ten-minute) poll would miss this change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_still_committing_after_the_notification_is_read() {
    let db = TestDb::new().await;
    let rx = Receiver::start().await;
    let mut daemon = Daemon::start(&db, &config(&db, &rx)).await;
    let locks = observer_core::schema::WakeLocks::for_channel("fraiseql_observers");

    // Runs after `fraiseql_observers_notify` (same event, later name): holds the writer in its
    // commit, `committing` already taken, for 700 ms.
    db.exec(
        "CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN PERFORM pg_sleep(0.7); RETURN NULL; END $$;
         CREATE CONSTRAINT TRIGGER zz_slow_commit AFTER INSERT ON tb_entity_change_log
           DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
           WHEN (NEW.object_id = '77') EXECUTE FUNCTION slow_commit();",
    )
    .await;
    let notifier = db.connect().await;
    notifier
        .execute(
            "SELECT pg_advisory_lock($1, $2)",
            &[
                &observer_core::schema::WakeLocks::NOTIFYING_CLASS,
                &locks.key,
            ],
        )
        .await
        .unwrap();

    let writer = db.connect().await;
    let write = tokio::spawn(async move {
        writer
            .execute("INSERT INTO orders (id) VALUES (77)", &[])
            .await
            .expect("insert");
    });
    // The writer is now in its commit: it holds `committing`, skipped the NOTIFY.
    eventually(
        Duration::from_secs(5),
        "the writer to hold `committing`",
        || async {
            let n: i64 = db
            .client
            .query_one(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid::int8 = $1
                 AND objid::int8 = $2 AND objsubid = 2 AND granted",
                &[
                    &i64::from(observer_core::schema::WakeLocks::COMMITTING_CLASS as u32),
                    &i64::from(locks.key as u32),
                ],
            )
            .await
            .unwrap()
            .get(0);
            (n > 0).then_some(())
        },
    )
    .await;
    // The notifier's commit ends: its notification arrives, then it lets go of `notifying`.
    notifier
        .batch_execute("NOTIFY fraiseql_observers")
        .await
        .unwrap();
    notifier
        .execute(
            "SELECT pg_advisory_unlock($1, $2)",
            &[
                &observer_core::schema::WakeLocks::NOTIFYING_CLASS,
                &locks.key,
            ],
        )
        .await
        .unwrap();
    write.await.unwrap();

    let got = rx.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(got[0].json()["entity_id"], "77");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_savepoint_does_not_swallow_the_wake_up() {
    let db = TestDb::new().await;
    let rx = Receiver::start().await;
    let mut daemon = Daemon::start(&db, &config(&db, &rx)).await;

    // The first change-log row of the transaction queues its wake-up; rolling that back must
    // let the next row queue it again.
    db.exec(
        "BEGIN;
         SAVEPOINT a;
         INSERT INTO orders (id) VALUES (1);
         ROLLBACK TO SAVEPOINT a;
         INSERT INTO orders (id) VALUES (2);
         COMMIT;",
    )
    .await;
    let got = rx.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].json()["entity_id"], "2");

    // Several statements in one transaction: one wake-up, every row delivered.
    db.exec(
        "BEGIN;
         INSERT INTO orders (id) VALUES (3);
         INSERT INTO orders (id) VALUES (4), (5);
         UPDATE orders SET status = 'paid' WHERE id = 3;
         COMMIT;",
    )
    .await;
    let got = rx.wait_for(5, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 5);
    daemon.stop().await;
}

/// A change log still carrying the per-statement NOTIFY trigger of earlier builds (not
/// migrated since the upgrade): the daemon says so at start and still delivers; with no wake-up
/// trigger at all it says deliveries wait for the poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_or_missing_wake_up_trigger_is_reported_at_start() {
    let db = TestDb::new().await;
    let rx = Receiver::start().await;
    db.exec(
        "DROP TRIGGER fraiseql_observers_notify ON tb_entity_change_log;
         CREATE FUNCTION old_notify() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN PERFORM pg_notify('fraiseql_observers', 'x'); RETURN NULL; END $$;
         CREATE TRIGGER fraiseql_observers_notify AFTER INSERT ON tb_entity_change_log
           FOR EACH STATEMENT EXECUTE FUNCTION old_notify();",
    )
    .await;
    let mut daemon = Daemon::start(&db, &config(&db, &rx)).await;
    daemon
        .wait_log("is from an earlier build", Duration::from_secs(10))
        .await;
    db.insert_order(1, "new", 1.0).await;
    rx.wait_for(1, Duration::from_secs(10)).await;
    daemon.stop().await;

    db.exec("DROP TRIGGER fraiseql_observers_notify ON tb_entity_change_log")
        .await;
    let mut daemon = Daemon::start(&db, &config(&db, &rx)).await;
    daemon
        .wait_log("no enabled wake-up trigger", Duration::from_secs(10))
        .await;
    daemon.stop().await;

    // `migrate` puts the current one back, and the warning goes away.
    assert!(db.cli(&["migrate"]).await.status.success());
    let mut daemon = Daemon::start(&db, &config(&db, &rx)).await;
    db.insert_order(2, "new", 1.0).await;
    rx.wait_for(2, Duration::from_secs(10)).await;
    let logs = daemon.logs();
    assert!(!logs.contains("wake-up trigger"), "{logs}");
    daemon.stop().await;
}
