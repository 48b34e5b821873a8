//! The `queue` layer's durability against a private Redis with AOF on (`appendfsync always`):
//! Redis killed with SIGKILL and restarted loses no job — those enqueued before are still there,
//! deliveries due while it was down wait and are enqueued once it is back, none twice — and a
//! backlog of jobs is drained by the workers, with the throughput printed (a figure for the
//! reader, not an assertion: speed is measured by the benchmark, `scripts/bench-layers.sh`).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use observer_tests::redis_server::PrivateRedis;
use observer_tests::*;

const T: Duration = Duration::from_secs(60);

fn config(db: &TestDb, redis_url: &str, url: &str, queue: &str) -> String {
    db.config(&format!(
        "[features]\nqueue = true\nconcurrent = true\n\n[concurrent]\nmax_in_flight = 64\n\n[redis]\nurl = \"{redis_url}\"\nkey_prefix = \"q\"\ntimeout_ms = 500\n\n[queue]\n{queue}\n\n{}",
        webhook_observer("jobs", "Order", url, "queue = true\nordering = \"none\"", "  timeout_ms = 10000")
    ))
}

async fn xlen(url: &str) -> i64 {
    let Ok(Ok(mut c)) = tokio::time::timeout(
        Duration::from_secs(1),
        redis::Client::open(url)
            .expect("url")
            .get_multiplexed_async_connection(),
    )
    .await
    else {
        return -1;
    };
    redis::cmd("XLEN")
        .arg("q:queue:default:jobs")
        .query_async(&mut c)
        .await
        .unwrap_or(-1)
}

async fn insert_orders(db: &TestDb, from: i64, to: i64) {
    db.exec(&format!(
        "INSERT INTO orders (id, status, total) SELECT g, 'new', 1 FROM generate_series({from}, {to}) g"
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_with_aof_loses_no_job() {
    let db = TestDb::new().await;
    let mut redis = PrivateRedis::start_aof(&db.dir).await;
    let rx = Receiver::start().await;
    // The listener only enqueues; the jobs are worked off afterwards by a worker process.
    let mut d = Daemon::start(
        &db,
        &config(&db, &redis.url(), &rx.url("/job"), "workers = 0"),
    )
    .await;
    insert_orders(&db, 1, 100).await;
    eventually(T, "100 jobs enqueued", || async {
        (xlen(&redis.url()).await == 100).then_some(())
    })
    .await;

    redis.kill();
    insert_orders(&db, 101, 200).await;
    d.wait_log("could not enqueue", T).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    redis.restart().await;
    assert!(
        xlen(&redis.url()).await >= 100,
        "the AOF kept the jobs enqueued before the kill"
    );
    db.wait_caught_up("test", T).await;
    assert_eq!(xlen(&redis.url()).await, 200, "every job once, none lost");
    assert_eq!(rx.count(), 0, "nothing executed in the event path");

    let worker = config(&db, &redis.url(), &rx.url("/job"), "workers = 16");
    let mut w = Daemon::start_args(
        &db,
        &worker,
        &["--role", "queue-worker"],
        "job workers started",
    )
    .await;
    let got = rx.wait_for(200, T).await;
    eventually(T, "the stream is drained", || async {
        (xlen(&redis.url()).await == 0).then_some(())
    })
    .await;
    // A grace period in which a duplicate delivery would still arrive (an absence has no
    // condition to wait for).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ids: HashSet<String> = got
        .iter()
        .map(|r| r.json()["entity_id"].to_string())
        .collect();
    assert_eq!(ids.len(), 200, "every order's job ran");
    assert_eq!(rx.count(), 200, "and each once");
    w.stop().await;
    d.stop().await;
}

/// Jobs as the queue layer writes them (see observer-features/src/queue/store.rs), XADDed
/// directly so the test measures the workers, not the event path.
async fn backlog(url: &str, n: usize) {
    let mut c = redis::Client::open(url)
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    for chunk in (0..n).collect::<Vec<_>>().chunks(5_000) {
        let mut pipe = redis::pipe();
        for i in chunk {
            let event = observer_core::event::ChangeEvent {
                pk: *i as i64 + 1,
                id: uuid::Uuid::new_v4(),
                created_at: chrono::Utc::now(),
                entity: "Order".into(),
                entity_id: Some(i.to_string()),
                operation: observer_core::event::Operation::Insert,
                data: Some(serde_json::json!({"id": i})),
                before: None,
                tenant_id: None,
                txid: 1,
            };
            let key = observer_core::executor::idempotency_key(event.id, "jobs", 0);
            pipe.cmd("XADD")
                .arg("q:queue:default:jobs")
                .arg("*")
                .arg("key")
                .arg(key)
                .arg("observer")
                .arg("jobs")
                .arg("action")
                .arg("0")
                .arg("event_id")
                .arg(event.id.to_string())
                .arg("event")
                .arg(serde_json::to_string(&event).expect("event JSON"))
                .ignore();
        }
        let () = pipe.query_async(&mut c).await.expect("XADD backlog");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_of_jobs_is_drained() {
    // 10,000 by default so a debug build finishes in about 15 s on a shared 2-core machine (it
    // drains ~650 jobs/s there, CPU-bound in the debug worker); QUEUE_BACKLOG_JOBS=100000 runs
    // the full backlog (docs/benchmarks.md has its figure).
    let n: usize = std::env::var("QUEUE_BACKLOG_JOBS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let db = TestDb::new().await;
    let redis = PrivateRedis::start().await;
    let rx = Receiver::start().await;
    backlog(&redis.url(), n).await;
    assert_eq!(xlen(&redis.url()).await, n as i64);
    let cfg = config(&db, &redis.url(), &rx.url("/job"), "workers = 64");
    let started = Instant::now();
    let mut w = Daemon::start_args(
        &db,
        &cfg,
        &["--role", "queue-worker"],
        "job workers started",
    )
    .await;
    eventually(
        Duration::from_secs(300),
        "the backlog is drained",
        || async { (xlen(&redis.url()).await == 0).then_some(()) },
    )
    .await;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "queue backlog: {n} jobs drained in {secs:.1} s = {:.0} jobs/s (64 workers, debug or release as built)",
        n as f64 / secs
    );
    assert!(rx.count() >= n, "every job ran: {} of {n}", rx.count());
    let keys: HashSet<String> = rx
        .requests()
        .iter()
        .map(|r| r.idempotency_key().to_string())
        .collect();
    assert_eq!(keys.len(), n, "every job's own key");
    w.stop().await;
}
