//! `rate_limit`: a destination limited to 10/s receives a burst of 50 over about four seconds,
//! each exactly once, while an unlimited destination in the same run is not slowed; with
//! `shared = true` two daemons together hold the one limit through Redis.

use std::collections::HashSet;
use std::time::Duration;

use observer_tests::redis_server::{shared_redis_url, RedisPrefix};
use observer_tests::*;

const T: Duration = Duration::from_secs(60);

fn span(reqs: &[Received]) -> Duration {
    let first = reqs.iter().map(|r| r.at).min().expect("requests");
    let last = reqs.iter().map(|r| r.at).max().expect("requests");
    last - first
}

fn unique(reqs: &[Received]) -> usize {
    reqs.iter()
        .map(|r| r.idempotency_key().to_string())
        .collect::<HashSet<_>>()
        .len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_events_at_ten_per_second_take_four_seconds_and_others_are_not_slowed() {
    let db = TestDb::new().await;
    let limited = Receiver::start().await;
    let free = Receiver::start().await;
    let observers = format!(
        "{}{}",
        webhook_observer("limited", "Order", &limited.url("/l"), "", ""),
        webhook_observer("free", "Order", &free.url("/f"), "", "")
    );
    let sections = format!(
        "[features]\nconcurrent = true\nrate_limit = true\n\n\
         [rate_limit.default]\nper_second = 0\nmax_concurrent = 0\n\n\
         [rate_limit.destinations.\"{}\"]\nper_second = 10\nmax_concurrent = 4\n",
        limited.addr
    );
    let cfg = db.config_listener(
        "id = \"test\"\nstart_from = \"beginning\"",
        &format!("{sections}\n{observers}"),
    );
    let mut daemon = Daemon::start(&db, &cfg).await;
    db.exec(
        "INSERT INTO orders (id, status, total) SELECT g, 'new', 1 FROM generate_series(1, 50) g",
    )
    .await;
    db.wait_caught_up("test", T).await;
    let l = limited.requests();
    let f = free.requests();
    assert_eq!((l.len(), unique(&l)), (50, 50), "all arrive, once each");
    assert_eq!((f.len(), unique(&f)), (50, 50));
    // One second of burst (10), then 40 more at 10/s.
    assert!(
        span(&l) >= Duration::from_millis(3_600),
        "the limit held: 50 requests in {:?}",
        span(&l)
    );
    assert!(
        span(&f) * 3 < span(&l),
        "the unlimited destination was slowed: {:?} vs {:?}",
        span(&f),
        span(&l)
    );
    // No window of one second (after the burst) saw more than the burst plus the rate.
    for r in &l {
        let within = l
            .iter()
            .filter(|q| q.at >= r.at && q.at < r.at + Duration::from_secs(1))
            .count();
        assert!(within <= 20, "{within} requests within one second");
    }
    assert!(db.dead_letters().await.is_empty());
    let log = db.action_log().await;
    assert!(
        log.iter()
            .all(|r| r["attempts"].as_array().map(Vec::len) == Some(1)),
        "deferrals are not attempts"
    );
    assert!(daemon.stop().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_limit_holds_across_two_daemons() {
    let db = TestDb::new().await;
    let rx = Receiver::start().await;
    let redis = RedisPrefix::new(&shared_redis_url());
    let sections = format!(
        "[features]\nconcurrent = true\nrate_limit = true\n\n{}\n\
         [rate_limit]\nshared = true\n\n\
         [rate_limit.destinations.\"{}\"]\nper_second = 10\nmax_concurrent = 0\n",
        redis.section(),
        rx.addr
    );
    let observers = webhook_observer("o", "Order", &rx.url("/h"), "", "");
    let cfg = |listener: &str| {
        db.config_listener(
            &format!("id = \"{listener}\"\nstart_from = \"beginning\""),
            &format!("{sections}\n{observers}"),
        )
    };
    let mut a = Daemon::start(&db, &cfg("a")).await;
    let mut b = Daemon::start(&db, &cfg("b")).await;
    db.exec(
        "INSERT INTO orders (id, status, total) SELECT g, 'new', 1 FROM generate_series(1, 30) g",
    )
    .await;
    db.wait_caught_up("a", T).await;
    db.wait_caught_up("b", T).await;
    let reqs = rx.requests();
    // Each listener delivers every event: 60 requests, 30 keys.
    assert_eq!((reqs.len(), unique(&reqs)), (60, 30));
    // Together at 10/s: one second of burst, then 50 more. Each alone at 10/s would take ~2 s.
    assert!(
        span(&reqs) >= Duration::from_millis(4_500),
        "the shared limit held: 60 requests in {:?}",
        span(&reqs)
    );
    assert!(db.dead_letters().await.is_empty());
    assert!(a.stop().await.success());
    assert!(b.stop().await.success());
}
