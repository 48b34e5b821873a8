//! Fault suite, short form: `kill -9` of the daemon at random moments (three times) during a
//! run; loss 0, every duplicate was in flight at a kill and carried its event's key.
//! Long form: `scripts/fault.sh kill9` (100,000 events, ten kills). See docs/reliability.md.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_loses_nothing_and_duplicates_only_in_flight_work() {
    observer_tests::fault::run_short("kill9").await;
}
