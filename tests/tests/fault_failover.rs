//! Fault suite, short form: the leader of a two-instance `failover` group is hit three times
//! while events flow — `kill -9` (restarted as a standby), SIGTERM (restarted), SIGSTOP past
//! its lease (then SIGCONT: it must stand by), every Postgres session of it terminated (it must
//! stand by on its own) — and a standby must deliver again within the bound of each (5 s, 1 s,
//! lease + 1 s, 5 s), with loss 0 and duplicates only of what was in flight.
//! Long form: `scripts/fault.sh failover-kill9 failover-term failover-stop failover-backends`
//! (ten faults each).
//! See docs/reliability.md.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_kill9_of_the_leader() {
    observer_tests::fault::run_short("failover-kill9").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_sigterm_of_the_leader() {
    observer_tests::fault::run_short("failover-term").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_sigstop_of_the_leader() {
    observer_tests::fault::run_short("failover-stop").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_backends_of_the_leader_terminated() {
    observer_tests::fault::run_short("failover-backends").await;
}
