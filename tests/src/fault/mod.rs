//! The fault-injection suite (`observer-fault`, `scripts/fault.sh`, `tests/tests/fault_*.rs`):
//! scenarios that kill, restart and starve what the daemon depends on and report loss,
//! duplicates, recovery time and RSS. See docs/reliability.md.

pub mod private_pg;
pub mod scenarios;
pub mod sink;
pub mod world;

pub use scenarios::{run, Size, ALL};
pub use world::{Report, Setup};

/// The setup the e2e tests use: the debug binary, the shared Postgres and Redis.
pub fn test_setup(tag: &str) -> Setup {
    Setup {
        bin: crate::binary().to_path_buf(),
        admin_url: crate::admin_url(),
        redis_url: crate::redis_server::shared_redis_url(),
        work: crate::temp_dir(&format!("fault-{tag}-{}", std::process::id())),
        seed: std::env::var("FAULT_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(42),
    }
}

/// Runs a short scenario from a test and fails the test, with the report, when it fails.
pub async fn run_short(name: &str) -> Report {
    let setup = test_setup(name);
    let report = run(name, &setup, Size::Short)
        .await
        .unwrap_or_else(|e| panic!("scenario {name} could not run: {e:#}"));
    let text = serde_json::to_string_pretty(&report).unwrap_or_default();
    eprintln!("{text}");
    let _ = std::fs::remove_dir_all(&setup.work);
    assert!(
        report.passed,
        "scenario {name} broke its promises: {:?}\n{text}",
        report.failures
    );
    report
}
