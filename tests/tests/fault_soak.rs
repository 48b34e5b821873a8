//! Fault suite, short form of the soak: 45 s at 500 events/s with every layer on; anonymous
//! memory, open descriptors, database connections and lag stay flat, nothing lost or
//! duplicated. Long form (one hour at 1,000 events/s): `scripts/fault.sh soak`. See
//! docs/reliability.md.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_soak_with_every_layer_on_stays_flat() {
    observer_tests::fault::run_short("soak").await;
}
