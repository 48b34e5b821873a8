//! Fault suite, short forms: a receiver answering 500 half the time, hanging past the timeout,
//! closing connections mid-response, answering slowly, and down for a while with the circuit
//! breaker on (then `dlq retry-all`). Long forms: `scripts/fault.sh receiver-500 …
//! receiver-down`. See docs/reliability.md.

use observer_tests::fault::run_short;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_answering_500_half_the_time() {
    run_short("receiver-500").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_hanging_past_the_timeout() {
    run_short("receiver-hang").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_closing_connections_mid_response() {
    run_short("receiver-close").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_answering_slowly() {
    run_short("receiver-slow").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_down_breaker_opens_dlq_holds_retry_all_delivers() {
    run_short("receiver-down").await;
}
