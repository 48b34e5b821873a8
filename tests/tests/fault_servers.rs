//! Fault suite, short forms: a private Postgres unreachable at start and restarted mid-run, and
//! a private Redis (dedup + caching) killed and restarted mid-run. Long forms:
//! `scripts/fault.sh pg-restart redis-restart`. See docs/reliability.md.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_down_at_start_and_restarted_mid_run() {
    observer_tests::fault::run_short("pg-restart").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_with_dedup_and_caching() {
    observer_tests::fault::run_short("redis-restart").await;
}
