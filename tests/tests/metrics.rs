//! The `metrics` layer end to end: the real daemon serving `/metrics`, `/health` and `/ready`,
//! the `metrics` command and `status` reading it, the standby's readiness, and the failure
//! modes (feature off, address taken).

use std::time::Duration;

use observer_tests::metrics::{free_port, get, sample};
use observer_tests::{eventually, output_text, webhook_observer, Daemon, Receiver, TestDb};
use serde_json::Value;

fn metrics_env(port: u16) -> Vec<(&'static str, String)> {
    vec![
        ("OBSERVER__FEATURES__METRICS", "true".into()),
        ("OBSERVER__METRICS__LISTEN", format!("127.0.0.1:{port}")),
        ("OBSERVER__METRICS__REFRESH_SECS", "1".into()),
    ]
}

async fn start(db: &TestDb, cfg: &str, env: &[(&'static str, String)]) -> Daemon {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Daemon::start_with_env(db, cfg, &env).await
}

/// Polls `/metrics` until `pred` holds; returns that exposition.
async fn scrape_until(port: u16, what: &str, pred: impl Fn(&str) -> bool) -> String {
    let url = format!("http://127.0.0.1:{port}/metrics");
    eventually(Duration::from_secs(20), what, || async {
        let (status, body) = get(&url).await.ok()?;
        (status == 200 && pred(&body)).then_some(body)
    })
    .await
}

#[tokio::test]
async fn endpoint_counts_deliveries_dead_letters_and_readiness() {
    let db = TestDb::new().await;
    let rx = Receiver::start().await;
    rx.set_path_status("/bad", 500);
    let observers = format!(
        "{}{}",
        webhook_observer("ok", "Order", &rx.url("/ok"), "", ""),
        webhook_observer(
            "bad",
            "Order",
            &rx.url("/bad"),
            "condition = \"data.status == 'bad'\"",
            ""
        )
    );
    let cfg = db.config(&observers);
    let port = free_port();
    let mut daemon = start(&db, &cfg, &metrics_env(port)).await;
    assert!(
        daemon
            .logs()
            .contains(&format!("http://127.0.0.1:{port}/metrics")),
        "the URL is logged at start:\n{}",
        daemon.logs()
    );

    // N changes delivered to the real receiver.
    const N: i64 = 3;
    for i in 1..=N {
        db.insert_order(i, "new", 10.0).await;
    }
    rx.wait_for(N as usize, Duration::from_secs(20)).await;
    db.wait_caught_up("test", Duration::from_secs(20)).await;
    let max_pk: i64 = db
        .client
        .query_one(
            "SELECT max(pk_entity_change_log) FROM tb_entity_change_log",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let ok = [("observer", "ok"), ("type", "webhook")];
    let text = scrape_until(
        port,
        "N events processed and the checkpoint at the last",
        |t| {
            sample(t, "observer_events_processed_total", &[]) == Some(N as f64)
                && sample(t, "observer_checkpoint_pk", &[]) == Some(max_pk as f64)
        },
    )
    .await;
    let delivered = [
        ("observer", "ok"),
        ("type", "webhook"),
        ("outcome", "delivered"),
    ];
    assert_eq!(
        sample(&text, "observer_actions_total", &delivered),
        Some(N as f64),
        "{text}"
    );
    assert_eq!(
        sample(&text, "observer_action_duration_seconds_count", &ok),
        Some(N as f64),
        "{text}"
    );
    assert_eq!(
        sample(&text, "observer_lag_seconds", &[]),
        Some(0.0),
        "{text}"
    );
    assert_eq!(sample(&text, "observer_listener_active", &[]), Some(1.0));
    assert_eq!(sample(&text, "observer_dlq_size", &[]), Some(0.0));
    assert_eq!(sample(&text, "observer_backlog_events", &[]), Some(0.0));

    // The content type Prometheus expects.
    let resp = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .unwrap();
    let ct = resp.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");

    // One action dead-lettered: the DLQ gauge follows within the refresh period.
    db.insert_order(100, "bad", 1.0).await;
    db.wait_caught_up("test", Duration::from_secs(20)).await;
    assert_eq!(db.dead_letters().await.len(), 1);
    let text = scrape_until(port, "observer_dlq_size 1", |t| {
        sample(t, "observer_dlq_size", &[]) == Some(1.0)
    })
    .await;
    let bad = [("observer", "bad"), ("type", "webhook")];
    assert_eq!(
        sample(
            &text,
            "observer_actions_total",
            &[("observer", "bad"), ("outcome", "dead_lettered")]
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "observer_actions_failed_total", &bad),
        Some(3.0),
        "{text}"
    );
    assert_eq!(sample(&text, "observer_dead_letters_total", &[]), Some(1.0));

    // Health and readiness of the active instance.
    let (status, body) = get(&format!("http://127.0.0.1:{port}/health"))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let health: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["listener"], "test");
    let (status, body) = get(&format!("http://127.0.0.1:{port}/ready"))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let ready: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(ready["ready"], true, "{body}");
    assert_eq!(ready["checks"]["database"]["ok"], true, "{body}");

    // The CLI: readable, filtered, raw, JSON; default URL from the config's [metrics] listen.
    let url = format!("http://127.0.0.1:{port}");
    let out = db.cli(&["metrics", "--url", &url]).await;
    let text = output_text(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("observer_events_processed_total 4"), "{text}");
    assert!(
        text.contains("# observer_dlq_size (gauge): Pending dead letters"),
        "{text}"
    );
    assert!(
        text.contains(
            "observer_actions_total{observer=\"ok\",outcome=\"delivered\",type=\"webhook\"} 4"
        ),
        "{text}"
    );
    assert!(
        text.contains(
            "observer_action_duration_seconds{observer=\"ok\",type=\"webhook\"} count=4 sum="
        ),
        "{text}"
    );
    let cli_cfg = db.config_raw(&format!("[metrics]\nlisten = \"127.0.0.1:{port}\""));
    let out = db
        .cli_with(&cli_cfg, &["metrics", "--filter", "dlq_size"])
        .await;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{}", output_text(&out));
    assert_eq!(
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .collect::<Vec<_>>(),
        ["observer_dlq_size 1"],
        "{text}"
    );
    let out = db
        .cli_with(&cli_cfg, &["metrics", "--filter", "no_such_metric"])
        .await;
    assert!(!out.status.success());
    assert!(
        output_text(&out).contains("no metric at"),
        "{}",
        output_text(&out)
    );
    let out = db
        .cli_with(&cli_cfg, &["metrics", "--raw", "--filter", "checkpoint_pk"])
        .await;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let last_pk: i64 = db
        .client
        .query_one(
            "SELECT max(pk_entity_change_log) FROM tb_entity_change_log",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        text.lines().skip(1).collect::<Vec<_>>(),
        [
            "# TYPE observer_checkpoint_pk gauge".to_string(),
            format!("observer_checkpoint_pk {last_pk}")
        ],
        "{text}"
    );
    let out = db
        .cli_with(
            &cli_cfg,
            &["metrics", "--json", "--filter", "events_processed"],
        )
        .await;
    let j: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", output_text(&out)));
    assert_eq!(j["metrics"][0]["series"][0]["value"], 4.0);

    // status adds the live figures.
    let cfg_with_port = format!("{cfg}\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n");
    let out = db.cli_with(&cfg_with_port, &["status"]).await;
    let text = output_text(&out);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(&format!(
            "live          from http://127.0.0.1:{port}/metrics: active"
        )),
        "{text}"
    );
    assert!(
        text.contains("in flight     0 dispatches, lag 0s"),
        "{text}"
    );
    let out = db.cli_with(&cfg_with_port, &["status", "--json"]).await;
    let j: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", output_text(&out)));
    assert_eq!(j["live"]["reachable"], true, "{j}");
    assert_eq!(j["live"]["dlq_size"], 1.0, "{j}");
    assert_eq!(j["live"]["listener_active"], true, "{j}");
    assert!(j["live"]["lag_seconds"].is_number(), "{j}");

    // A standby (same listener id): alive, not ready, saying why.
    let port2 = free_port();
    let mut standby = start(&db, &cfg, &metrics_env(port2)).await;
    assert!(standby.logs().contains("standing by"), "{}", standby.logs());
    let (status, _) = get(&format!("http://127.0.0.1:{port2}/health"))
        .await
        .unwrap();
    assert_eq!(status, 200);
    let (status, body) = get(&format!("http://127.0.0.1:{port2}/ready"))
        .await
        .unwrap();
    assert_eq!(status, 503, "{body}");
    let ready: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(ready["failed"], serde_json::json!(["listener"]), "{body}");
    assert_eq!(ready["checks"]["database"]["ok"], true, "{body}");
    // When the active one stops, the standby takes over and becomes ready.
    assert!(daemon.stop().await.success());
    eventually(
        Duration::from_secs(20),
        "the standby to become ready",
        || async {
            let (s, _) = get(&format!("http://127.0.0.1:{port2}/ready")).await.ok()?;
            (s == 200).then_some(())
        },
    )
    .await;
    // The stopped daemon's endpoint is closed.
    assert!(get(&format!("http://127.0.0.1:{port}/health"))
        .await
        .is_err());
    assert!(standby.stop().await.success());
}

#[tokio::test]
async fn metrics_off_nothing_listens_and_the_cli_says_so() {
    let db = TestDb::new().await;
    let rx = Receiver::start().await;
    let cfg = db.config(&webhook_observer("ok", "Order", &rx.url("/ok"), "", ""));
    let port = free_port();
    let mut env = metrics_env(port);
    env[0].1 = "false".into();
    let mut daemon = start(&db, &cfg, &env).await;
    db.insert_order(1, "new", 1.0).await;
    rx.wait_for(1, Duration::from_secs(20)).await;
    assert!(get(&format!("http://127.0.0.1:{port}/metrics"))
        .await
        .is_err());

    let cfg_with_port = format!("{cfg}\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n");
    let out = db.cli_with(&cfg_with_port, &["metrics"]).await;
    let text = output_text(&out);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains(&format!(
            "metrics endpoint not reachable at http://127.0.0.1:{port}/metrics"
        )),
        "{text}"
    );
    assert!(text.contains("features.metrics"), "{text}");
    assert!(out.stdout.is_empty(), "no output but the error: {text}");

    // status keeps working and says the endpoint does not answer.
    db.wait_caught_up("test", Duration::from_secs(20)).await;
    let out = db.cli_with(&cfg_with_port, &["status"]).await;
    let text = output_text(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("state         running"), "{text}");
    assert!(
        text.contains(&format!(
            "live          metrics endpoint not reachable at http://127.0.0.1:{port}/metrics"
        )),
        "{text}"
    );
    let out = db.cli_with(&cfg_with_port, &["status", "--json"]).await;
    let j: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["live"]["reachable"], false, "{j}");
    assert!(daemon.stop().await.success());
}

#[tokio::test]
async fn an_address_in_use_is_a_start_up_error_naming_it() {
    let db = TestDb::new().await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let cfg = db.config("");
    let env = metrics_env(port);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut d = Daemon::spawn(&db.dir, &cfg, &env).unwrap();
    let status = d.wait_exit(Duration::from_secs(20)).await.unwrap();
    assert!(!status.success());
    let logs = d.logs();
    assert!(
        logs.contains(&format!(
            "cannot serve metrics on 127.0.0.1:{port} (metrics.listen)"
        )),
        "{logs}"
    );
    // Nothing ran: no checkpoint was claimed.
    assert!(db.checkpoints().await.is_empty(), "{logs}");
    drop(taken);
}

/// Issue 18, item 10: `metrics` (and `status`, which uses the same client) talk to the daemon's
/// own endpoint directly: `HTTP_PROXY`/`ALL_PROXY` would send the request, and what it reads,
/// through another host.
#[tokio::test]
async fn the_metrics_command_ignores_proxy_variables() {
    let endpoint = Receiver::start().await;
    let proxy = Receiver::start().await;
    let mut c = observer_tests::command();
    c.args(["metrics", "--url", &endpoint.url("/metrics")]);
    for k in ["HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"] {
        c.env(k, proxy.url("/"));
    }
    c.env_remove("NO_PROXY").env_remove("no_proxy");
    let out = c.output().await.expect("run the CLI");
    assert_eq!(
        proxy.count(),
        0,
        "the metrics command went through HTTP_PROXY: {:?}",
        proxy.requests()
    );
    assert_eq!(endpoint.requests_to("/metrics").len(), 1);
    assert!(out.status.success(), "{}", output_text(&out));
}

/// Issue 18, item 2: the endpoint kept every connection for as long as the client liked: 200
/// idle connections held 200 of the daemon's descriptors, and a delivery then failed with "Too
/// many open files". Now at most `max_connections` are served (the rest are answered 503 and
/// closed at once, not queued), an idle one is closed after `header_read_timeout_ms`, the
/// descriptors stay bounded, deliveries go on and the endpoint still answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_capped_and_closed_and_the_endpoint_still_answers() {
    use tokio::io::AsyncReadExt as _;

    let db = TestDb::new().await;
    let rx = Receiver::start().await;
    let cfg = db.config(&webhook_observer("ok", "Order", &rx.url("/ok"), "", ""));
    let port = free_port();
    let mut env = metrics_env(port);
    env.push(("OBSERVER__METRICS__MAX_CONNECTIONS", "8".into()));
    env.push(("OBSERVER__METRICS__HEADER_READ_TIMEOUT_MS", "1500".into()));
    let mut daemon = start(&db, &cfg, &env).await;
    let url = format!("http://127.0.0.1:{port}/metrics");
    eventually(Duration::from_secs(20), "the endpoint answers", || async {
        get(&url).await.ok().filter(|(s, _)| *s == 200)
    })
    .await;
    let fds = || observer_tests::fault::world::open_fds(daemon.pid).expect("open descriptors");
    let before = fds();

    let mut idle = Vec::new();
    for _ in 0..200 {
        idle.push(
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .expect("connect"),
        );
    }
    // What each connection is sent before the daemon closes it, read from all at once for
    // less than the header timeout; `None` while it stays open.
    let seen = futures::future::join_all(idle.iter_mut().map(|s| async move {
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_millis(700), s.read_to_end(&mut got))
            .await
            .ok()
            .map(|_| String::from_utf8_lossy(&got).into_owned())
    }))
    .await;
    let refused = seen
        .iter()
        .flatten()
        .filter(|t| t.starts_with("HTTP/1.1 503"))
        .count();
    let open = seen.iter().filter(|s| s.is_none()).count();
    assert!(
        open <= 8 && refused + open == 200,
        "open {open}, refused {refused} (cap 8): connections over the cap are refused, not queued"
    );
    let during = fds();
    assert!(
        during <= before + 8 + 4,
        "the daemon's descriptors went from {before} to {during} with 200 client connections"
    );
    // A delivery while the clients hold their connections.
    db.insert_order(1, "new", 1.0).await;
    rx.wait_for(1, Duration::from_secs(20)).await;

    // The accepted ones are closed by the header timeout, not kept.
    let mut still_open: Vec<_> = idle
        .into_iter()
        .zip(&seen)
        .filter(|(_, s)| s.is_none())
        .map(|(c, _)| c)
        .collect();
    for c in &mut still_open {
        let mut got = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut got)).await;
        assert!(matches!(closed, Ok(Ok(_))), "still open: {closed:?}");
    }
    let (status, body) = get(&url).await.expect("the endpoint answers afterwards");
    assert_eq!(status, 200);
    assert!(body.contains("observer_events_read_total"), "{body}");
    assert!(db.dead_letters().await.is_empty());
    assert!(daemon.stop().await.success());
}
