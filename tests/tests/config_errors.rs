//! Configuration errors are reported with their location and a non-zero exit.

use std::time::Duration;

use observer_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_reports_observer_and_column_of_bad_condition() {
    let dir = temp_dir(&format!("validate-{}", std::process::id()));
    let file = dir.join("bad-condition.toml");
    std::fs::write(
        &file,
        "[[observers]]\nname = \"paid-orders\"\nentity = \"Order\"\ncondition = \"data.status == 'paid' &&\"\n\n  [[observers.actions]]\n  type = \"log\"\n",
    )
    .unwrap();
    let out = run_cli(&["validate", file.to_str().unwrap()]).await;
    let text = output_text(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("paid-orders"), "names the observer: {text}");
    assert!(text.contains("condition"), "names the field: {text}");
    assert!(
        text.contains("column 24") || text.contains("column 25"),
        "points at the column: {text}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_with_unknown_key_fails_naming_file_and_key() {
    let dir = temp_dir(&format!("unknown-key-{}", std::process::id()));
    let file = dir.join("typo.toml");
    std::fs::write(&file, "[listener]\nid = \"x\"\npoll_intervall_ms = 100\n").unwrap();
    let out = run_cli(&["--config", file.to_str().unwrap(), "run"]).await;
    let text = output_text(&out);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("typo.toml"), "names the file: {text}");
    assert!(text.contains("poll_intervall_ms"), "names the key: {text}");
    assert!(!text.contains("panicked"), "{text}");
    let _ = std::fs::remove_dir_all(dir);
}

/// The daemon keeps retrying an unreachable database (a restart-from-checkpoint loop). It must
/// say clearly, naming the address, that it cannot connect and is retrying — or exit non-zero
/// naming the address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_with_unreachable_database_names_the_address() {
    let dir = temp_dir(&format!("unreachable-{}", std::process::id()));
    // Port 1 on loopback: nothing listens there.
    let cfg = "[database]\nurl = \"postgres://postgres@127.0.0.1:1/nowhere\"\nconnect_timeout_ms = 500\n\n[[observers]]\nname = \"o\"\nentity = \"Order\"\n  [[observers.actions]]\n  type = \"log\"\n";
    let mut d = Daemon::spawn(&dir, cfg, &[]).expect("spawn");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = d.try_status() {
            let logs = d.logs();
            assert!(
                !status.success(),
                "exit 0 with an unreachable database: {logs}"
            );
            assert!(
                logs.contains("127.0.0.1:1"),
                "the error names the address: {logs}"
            );
            break;
        }
        let logs = d.logs();
        // Still running: a line that says it cannot connect, where, and that it retries.
        let clear = logs.lines().any(|l| {
            l.contains("127.0.0.1:1")
                && (l.contains("connect") || l.contains("unreachable"))
                && (l.contains("retry") || l.contains("retrying") || l.contains("waiting"))
        });
        if clear {
            let status = d.stop().await;
            assert!(
                status.code().is_some(),
                "stops on SIGTERM while waiting for the database"
            );
            break;
        }
        if std::time::Instant::now() >= deadline {
            d.kill9().await;
            panic!(
                "after 10 s the daemon neither exited nor logged a line naming 127.0.0.1:1 with a connect failure and a retry; log:\n{logs}"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = std::fs::remove_dir_all(dir);
}

// There is no test here of a layer switched on that the binary was built without: since the
// `nats` layer landed, the default build holds every layer, so no such layer exists to switch
// on. `stack::check_features` still refuses one in a build made with fewer cargo features.
