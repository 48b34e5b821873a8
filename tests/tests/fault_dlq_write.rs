//! Fault suite, short form: the dead-letter insert fails as on a full disk and then as on a
//! read-only database; the checkpoint stays before the affected events and nothing is lost once
//! the fault is gone. Long form: `scripts/fault.sh dlq-write-fail`. See docs/reliability.md.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_write_failing_holds_the_checkpoint() {
    observer_tests::fault::run_short("dlq-write-fail").await;
}
