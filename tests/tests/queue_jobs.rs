//! The `queue` layer against real Redis, Postgres and a real receiver: a failing job ends in
//! the dead-letter queue after its retries (and `queue retry` puts it back), an unreadable job is
//! dead-lettered at once, and a worker killed with SIGKILL mid-job has the job taken over and
//! completed once, with the same idempotency key.

use std::time::Duration;

use observer_tests::redis_server::{shared_redis_url, RedisPrefix};
use observer_tests::*;

const T: Duration = Duration::from_secs(40);

/// A config with the queue layer on, one queued webhook observer `jobs`, and `queue` settings.
fn config(db: &TestDb, redis: &RedisPrefix, url: &str, queue: &str, retry: &str) -> String {
    db.config(&format!(
        "[features]\nqueue = true\n\n{}\n[queue]\n{queue}\n\n{}",
        redis.section(),
        webhook_observer(
            "jobs",
            "Order",
            url,
            "queue = true",
            &format!("  timeout_ms = 10000\n  {retry}")
        )
    ))
}

async fn redis_conn(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect to redis")
}

async fn xlen(redis: &RedisPrefix, queue: &str) -> i64 {
    let mut c = redis_conn(&redis.url).await;
    redis::cmd("XLEN")
        .arg(format!("{}:queue:{queue}:jobs", redis.prefix))
        .query_async(&mut c)
        .await
        .expect("XLEN")
}

/// The action-log outcomes in the order their attempts were made (the run loop's `enqueued` row
/// and the worker's rows are written by different tasks, so their row ids may interleave).
async fn outcomes(db: &TestDb) -> Vec<String> {
    let mut rows: Vec<(chrono::DateTime<chrono::Utc>, String)> = db
        .action_log()
        .await
        .iter()
        .map(|r| {
            (
                r["attempts"][0]["at"]
                    .as_str()
                    .and_then(|t| t.parse().ok())
                    .unwrap_or_default(),
                r["outcome"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    rows.sort();
    rows.into_iter().map(|(_, o)| o).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_job_is_retried_then_dead_lettered_and_queue_retry_puts_it_back() {
    let db = TestDb::new().await;
    let redis = RedisPrefix::new(&shared_redis_url());
    let rx = Receiver::start().await;
    rx.set_path_status("/job", 500);
    let cfg = config(
        &db,
        &redis,
        &rx.url("/job"),
        "workers = 2",
        r#"retry = { max_attempts = 3, backoff = "fixed", initial_ms = 50, max_ms = 1000 }"#,
    );
    let mut d = Daemon::start(&db, &cfg).await;
    db.insert_order(1, "new", 10.0).await;

    let dead = eventually(T, "the job is dead-lettered", || async {
        let d = db.dead_letters().await;
        (!d.is_empty()).then_some(d)
    })
    .await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["reason"], "retries_exhausted");
    assert_eq!(dead[0]["observer"], "jobs");
    let reqs = rx.requests_to("/job");
    assert_eq!(reqs.len(), 3, "three attempts, the action's max_attempts");
    let key = reqs[0].idempotency_key().to_string();
    assert!(reqs.iter().all(|r| r.idempotency_key() == key));
    assert_eq!(dead[0]["idempotency_key"], key.as_str());
    // The event's part was done when the job was enqueued; the worker's attempts follow.
    let got = eventually(T, "the worker's rows are written", || async {
        let o = outcomes(&db).await;
        o.contains(&"dead_lettered".to_string()).then_some(o)
    })
    .await;
    assert_eq!(
        got,
        [
            "enqueued",
            "retry_scheduled",
            "retry_scheduled",
            "dead_lettered"
        ]
    );
    eventually(T, "the job leaves the stream", || async {
        (xlen(&redis, "default").await == 0).then_some(())
    })
    .await;
    db.wait_caught_up("test", T).await;

    // debug-event shows the job's progress: enqueued, then each attempt.
    let event_id = reqs[0].event_id();
    let out = db.cli_with(&cfg, &["debug-event", &event_id]).await;
    let text = output_text(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("dead_lettered"), "{text}");
    assert!(
        text.contains("result enqueued") || text.contains("enqueued"),
        "{text}"
    );

    // The receiver is fixed; `queue retry` moves the dead letter back into the queue.
    rx.set_path_status("/job", 204);
    let out = db.cli_with(&cfg, &["queue", "retry", "default"]).await;
    let text = output_text(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("back in queue default as job"), "{text}");
    rx.wait_for(4, T).await;
    let got = eventually(T, "the retried job is delivered", || async {
        let o = outcomes(&db).await;
        (o.last().map(String::as_str) == Some("delivered")).then_some(o)
    })
    .await;
    assert_eq!(got.len(), 5, "{got:?}");
    assert_eq!(rx.requests_to("/job")[3].idempotency_key(), key);
    let dl = db.dead_letters().await;
    assert_eq!(dl[0]["status"], "resolved");

    // `queue stats` reads the real numbers; nothing is left.
    let out = db.cli_with(&cfg, &["queue", "stats", "--json"]).await;
    let text = output_text(&out);
    assert!(out.status.success(), "{text}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stats JSON");
    let q = &v["queues"][0];
    assert_eq!(q["queue"], "default");
    assert_eq!(q["depth"], 0);
    assert_eq!(q["pending"], 0);
    assert!(
        q["consumers"].as_array().is_some_and(|c| !c.is_empty()),
        "the daemon's worker is a consumer: {v}"
    );
    let out = db.cli_with(&cfg, &["status", "--json"]).await;
    let text = output_text(&out);
    assert!(out.status.success(), "{text}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    assert_eq!(v["queues"]["reachable"], true, "{v}");
    assert_eq!(v["queues"]["queues"][0]["depth"], 0, "{v}");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_job_is_dead_lettered_at_once() {
    let db = TestDb::new().await;
    let redis = RedisPrefix::new(&shared_redis_url());
    let rx = Receiver::start().await;
    let cfg = config(&db, &redis, &rx.url("/job"), "workers = 1", FAST_RETRY);
    let mut d = Daemon::start(&db, &cfg).await;
    // A job written by something else, missing every field a job has.
    let mut c = redis_conn(&redis.url).await;
    let _: String = redis::cmd("XADD")
        .arg(format!("{}:queue:default:jobs", redis.prefix))
        .arg("*")
        .arg("garbage")
        .arg("1")
        .query_async(&mut c)
        .await
        .expect("XADD");
    let dead = eventually(T, "the poison job is dead-lettered", || async {
        let d = db.dead_letters().await;
        (!d.is_empty()).then_some(d)
    })
    .await;
    assert_eq!(dead[0]["reason"], "poison_job");
    assert!(
        dead[0]["last_error"]
            .as_str()
            .unwrap_or("")
            .contains("no field `key`"),
        "{:?}",
        dead[0]
    );
    eventually(T, "the poison job leaves the stream", || async {
        (xlen(&redis, "default").await == 0).then_some(())
    })
    .await;
    assert_eq!(rx.count(), 0);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_job_has_its_job_taken_over_and_completed_once() {
    let db = TestDb::new().await;
    let redis = RedisPrefix::new(&shared_redis_url());
    let rx = Receiver::start().await;
    rx.set_path_delay("/slow", Duration::from_secs(3));
    // The daemon only enqueues; separate worker processes work the job off.
    let listener = config(&db, &redis, &rx.url("/slow"), "workers = 0", FAST_RETRY);
    let worker = config(
        &db,
        &redis,
        &rx.url("/slow"),
        "workers = 1\nvisibility_timeout_ms = 1500",
        FAST_RETRY,
    );
    let mut d = Daemon::start(&db, &listener).await;
    db.insert_order(7, "new", 10.0).await;
    db.wait_caught_up("test", T).await;
    assert_eq!(xlen(&redis, "default").await, 1, "enqueued, not executed");
    assert_eq!(rx.count(), 0);

    let mut w1 = Daemon::start_args(
        &db,
        &worker,
        &["--role", "queue-worker"],
        "job workers started",
    )
    .await;
    rx.wait_for(1, T).await;
    w1.kill9().await;
    let mut w2 = Daemon::start_args(
        &db,
        &worker,
        &["--role", "queue-worker"],
        "job workers started",
    )
    .await;
    w2.wait_log("took over jobs", T).await;
    eventually(T, "the job is completed", || async {
        outcomes(&db)
            .await
            .contains(&"delivered".to_string())
            .then_some(())
    })
    .await;
    eventually(T, "the job leaves the stream", || async {
        (xlen(&redis, "default").await == 0).then_some(())
    })
    .await;
    // Nothing runs it a third time.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let reqs = rx.requests_to("/slow");
    assert_eq!(
        reqs.len(),
        2,
        "the interrupted attempt and the one that completed"
    );
    assert_eq!(reqs[0].idempotency_key(), reqs[1].idempotency_key());
    let o = outcomes(&db).await;
    assert_eq!(o, ["enqueued", "delivered"], "completed once");
    let log = db.action_log().await;
    assert_eq!(
        log[1]["attempts"][0]["attempt"], 2,
        "the taken-over job continues the attempt count: {log:?}"
    );
    w2.stop().await;
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_commands_say_so_when_redis_is_unreachable() {
    let db = TestDb::new().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let cfg = db.config(&format!(
        "[features]\nqueue = true\n\n[redis]\nurl = \"redis://127.0.0.1:{port}\"\ntimeout_ms = 300\n\n{}",
        webhook_observer("jobs", "Order", "http://127.0.0.1:9/x", "queue = true", "")
    ));
    for args in [
        &["queue", "stats"][..],
        &["queue", "list", "default"],
        &["queue", "purge", "default", "--yes"],
    ] {
        let out = db.cli_with(&cfg, args).await;
        let text = output_text(&out);
        assert!(!out.status.success(), "{args:?}: {text}");
        assert!(
            text.contains(&format!("127.0.0.1:{port}")),
            "{args:?} names the server: {text}"
        );
    }
    let out = db.cli_with(&cfg, &["queue", "purge", "default"]).await;
    assert!(!out.status.success());
    assert!(output_text(&out).contains("--yes"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_features_queue_off_a_queued_observer_runs_inline() {
    let db = TestDb::new().await;
    let redis = RedisPrefix::new(&shared_redis_url());
    let rx = Receiver::start().await;
    let cfg = config(&db, &redis, &rx.url("/job"), "workers = 1", FAST_RETRY)
        .replace("[features]\nqueue = true", "[features]\nqueue = false");
    let file = db.write_file("inline.toml", &cfg);
    let out = run_cli(&["validate", file.to_str().unwrap()]).await;
    let text = output_text(&out);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("features.queue is off: the actions of jobs"),
        "{text}"
    );
    let mut d = Daemon::start(&db, &cfg).await;
    db.insert_order(3, "new", 1.0).await;
    rx.wait_for(1, T).await;
    db.wait_caught_up("test", T).await;
    assert_eq!(
        outcomes(&db).await,
        ["delivered"],
        "executed in the event path"
    );
    assert_eq!(xlen(&redis, "default").await, 0);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switching_the_layer_off_still_works_off_the_jobs_left_in_the_queue() {
    let db = TestDb::new().await;
    let redis = RedisPrefix::new(&shared_redis_url());
    let rx = Receiver::start().await;
    // Enqueue only (no worker anywhere), then stop.
    let on = config(&db, &redis, &rx.url("/job"), "workers = 0", FAST_RETRY);
    let mut d = Daemon::start(&db, &on).await;
    for i in 1..=5 {
        db.insert_order(i, "new", 1.0).await;
    }
    db.wait_caught_up("test", T).await;
    d.stop().await;
    assert_eq!(xlen(&redis, "default").await, 5);
    assert_eq!(rx.count(), 0);

    // Rolled back: the layer off and the observer no longer routed to a queue. The five jobs
    // left in Redis are found and worked off; new events run inline.
    let off = on
        .replace("[features]\nqueue = true", "[features]\nqueue = false")
        .replace("queue = true\n", "\n")
        .replace("workers = 0", "workers = 2");
    let mut d = Daemon::start(&db, &off).await;
    d.wait_log("working them off", T).await;
    db.insert_order(6, "new", 1.0).await;
    rx.wait_for(6, T).await;
    eventually(T, "the stream is drained", || async {
        (xlen(&redis, "default").await == 0).then_some(())
    })
    .await;
    db.wait_caught_up("test", T).await;
    // A grace period in which a duplicate delivery would still arrive (an absence has no
    // condition to wait for).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ids: std::collections::HashSet<String> = rx
        .requests()
        .iter()
        .map(|r| r.json()["entity_id"].to_string())
        .collect();
    assert_eq!(ids.len(), 6, "five jobs and one inline delivery, each once");
    assert_eq!(rx.count(), 6);
    d.stop().await;
}
