//! The README's first command, as written: `scripts/quickstart.sh` brings up what is missing,
//! makes the demo database (its own, `fraiseql_observers_demo`, recreated on every run), starts
//! the sink and the daemon, writes sample changes and shows the deliveries. With
//! `QUICKSTART_EXIT_AFTER=1` it exits 0 once the four sample deliveries have arrived, verified.

use observer_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quickstart_script_delivers_the_sample_changes() {
    let script = workspace_root().join("scripts/quickstart.sh");
    let out = tokio::process::Command::new("bash")
        .arg(&script)
        .env("QUICKSTART_EXIT_AFTER", "1")
        .env_remove("DATABASE_URL")
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .expect("run scripts/quickstart.sh");
    let text = output_text(&out);
    assert!(out.status.success(), "quickstart failed:\n{text}");
    assert!(text.contains("4 deliveries received"), "{text}");
    assert_eq!(
        text.matches("signature: verified").count(),
        4,
        "every sample delivery is signed and verifies:\n{text}"
    );
    assert!(
        text.contains("paid by grace@example.com"),
        "the paid-orders log action ran:\n{text}"
    );
}
