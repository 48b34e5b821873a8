//! The `search` layer with `[search] backend = "elasticsearch"`: the indexer feeds the cluster
//! from the Postgres audit trail.
//!
//! * Always: against [`BulkServer`], an HTTP server in this test process that speaks `_bulk`
//!   (NDJSON action/document pairs, a result per item) and refuses what each test plans —
//!   items refused with 429/503/400, whole requests answered 429, an outage with every
//!   connection closed. No Elasticsearch can be installed on the project's machines.
//! * When scripts/setup.sh has installed it: against `osmem-server`, an in-memory
//!   OpenSearch-compatible emulator — a contract test of our `_bulk`/`_search`/`_count` calls
//!   and of `search` answering from the cluster. Skipped, saying so, when it is missing.
//! * Only when `ELASTICSEARCH_URL` is set: the same contract test against that real cluster.
//!   Skipped, saying so, otherwise.

use std::time::Duration;

use base64::Engine as _;
use observer_tests::search_servers::{BulkServer, Osmem};
use observer_tests::*;
use serde_json::Value;

const PASSWORD: &str = "pw-secret-7731";

fn config(db: &TestDb, rx: &Receiver, url: &str, prefix: &str, extra: &str) -> String {
    db.config(&format!(
        "[features]\nsearch = true\n\n[search]\nbackend = \"elasticsearch\"\nurl = \"{url}\"\nindex_prefix = \"{prefix}\"\npoll_interval_ms = 100\nmax_backoff_ms = 400\n{extra}\n\n{}",
        webhook_observer(
            "order-hook",
            "Order",
            &rx.url("/hooks/{{ event.entity_id }}"),
            "",
            ""
        )
    ))
}

/// Runs the CLI with `config` and extra environment.
async fn cli_env(
    db: &TestDb,
    config: &str,
    env: &[(&str, &str)],
    args: &[&str],
) -> std::process::Output {
    let path = db.write_file("cli-env.toml", config);
    let mut c = command();
    c.arg("--config").arg(&path).args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().await.expect("run the CLI")
}

async fn status_search(db: &TestDb, cfg: &str, env: &[(&str, &str)]) -> Value {
    let out = cli_env(db, cfg, env, &["status", "--json"]).await;
    assert!(out.status.success(), "{}", output_text(&out));
    let v: Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    v["search"].clone()
}

async fn watermark(db: &TestDb) -> (i64, i64, Option<String>) {
    let r = db
        .client
        .query_one(
            "SELECT indexed_id, documents, last_error FROM observer_search_index WHERE listener_id = 'test'",
            &[],
        )
        .await
        .expect("the indexer's watermark row");
    (r.get(0), r.get(1), r.get(2))
}

fn today_index(prefix: &str) -> String {
    format!("{prefix}-{}", chrono::Utc::now().format("%Y.%m.%d"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_items_and_429s_are_sent_again_and_no_record_is_lost() {
    let db = TestDb::new().await;
    let rx = Receiver::start().await;
    let es = BulkServer::start().await;
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("elastic:{PASSWORD}"));
    {
        let mut g = es.state.lock().unwrap();
        g.auth = Some(format!("Basic {basic}"));
        g.item_plan.insert("test:2".into(), [429, 503].into());
        g.item_plan.insert("test:4".into(), [400].into());
        g.request_plan.push_back(429);
        g.retry_after = Some(1);
    }
    let cfg = config(
        &db,
        &rx,
        &es.url(),
        "audit",
        "username = \"elastic\"\npassword = \"${env:ES_TEST_PASSWORD}\"",
    );
    let env = [("ES_TEST_PASSWORD", PASSWORD)];

    let out = cli_env(&db, &cfg, &env, &["migrate", "--search"]).await;
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(
        output_text(&out).contains("installed index template `audit`"),
        "{}",
        output_text(&out)
    );
    {
        let g = es.state.lock().unwrap();
        let t = g
            .templates
            .get("audit")
            .expect("template `audit` installed");
        assert_eq!(t["index_patterns"], serde_json::json!(["audit-*"]));
        assert_eq!(
            t["template"]["mappings"]["properties"]["data"]["enabled"],
            false
        );
    }

    let mut daemon = Daemon::start_with_env(&db, &cfg, &env).await;
    for id in 1..=6 {
        db.insert_order(id, "new", 5.0).await;
    }
    rx.wait_for(6, Duration::from_secs(30)).await;
    eventually(
        Duration::from_secs(30),
        "six documents accepted",
        || async { (es.ids().len() == 6).then_some(()) },
    )
    .await;
    eventually(
        Duration::from_secs(10),
        "the watermark at the sixth row",
        || async {
            let (id, docs, err) = watermark(&db).await;
            (id == 6 && docs == 6 && err.is_none()).then_some(())
        },
    )
    .await;
    let want: Vec<String> = (1..=6).map(|i| format!("test:{i}")).collect();
    assert_eq!(sorted_ids(&es), want);
    {
        let g = es.state.lock().unwrap();
        assert!(
            g.writes.values().all(|n| *n == 1),
            "only refused items are sent again: {:?}",
            g.writes
        );
        assert_eq!(g.refused_items.get(&429), Some(&1));
        assert_eq!(g.refused_items.get(&503), Some(&1));
        assert_eq!(g.refused_items.get(&400), Some(&1));
        assert_eq!(g.refused_requests, 1, "the whole-request 429 was answered");
        for (index, doc) in g.docs.values() {
            assert_eq!(index, &today_index("audit"));
            assert_eq!(doc["entity"], "Order");
            assert_eq!(doc["entity_key"], "order");
            assert_eq!(doc["outcomes"], serde_json::json!(["delivered"]));
            assert_eq!(doc["observers"], serde_json::json!(["order-hook"]));
            assert_eq!(doc["listener"], "test");
            assert!(doc["data_text"].as_str().unwrap().contains("new"));
        }
        assert!(
            g.auth_seen
                .iter()
                .all(|a| a.as_deref() == Some(format!("Basic {basic}").as_str())),
            "every request carries the credentials"
        );
    }
    let st = status_search(&db, &cfg, &env).await;
    assert_eq!(st["backend"], "elasticsearch");
    assert_eq!(st["indexer"]["watermark"], 6);
    assert_eq!(st["indexer"]["lag_rows"], 0);
    assert_eq!(st["cluster"]["documents"], 6, "{st}");
    daemon.stop().await;
    assert!(
        !daemon.logs().contains(PASSWORD),
        "the password is never logged"
    );
}

/// The accepted document ids in audit-id order.
fn sorted_ids(es: &BulkServer) -> Vec<String> {
    let mut ids = es.ids();
    ids.sort_by_key(|id| id.rsplit(':').next().and_then(|n| n.parse::<i64>().ok()));
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_is_indexed_again_from_postgres_and_deliveries_go_on() {
    let db = TestDb::new().await;
    let rx = Receiver::start().await;
    let es = BulkServer::start().await;
    let cfg = config(&db, &rx, &es.url(), "audit", "");
    let mut daemon = Daemon::start(&db, &cfg).await;
    for id in 1..=3 {
        db.insert_order(id, "new", 1.0).await;
    }
    eventually(Duration::from_secs(30), "three documents", || async {
        (es.ids().len() == 3).then_some(())
    })
    .await;

    // The cluster goes away: deliveries go on, the indexer keeps its watermark and says why.
    es.stop().await;
    for id in 4..=8 {
        db.insert_order(id, "new", 1.0).await;
    }
    rx.wait_for(8, Duration::from_secs(30)).await;
    let st = eventually(Duration::from_secs(30), "the outage in status", || async {
        let st = status_search(&db, &cfg, &[]).await;
        (st["indexer"]["lag_rows"] == 5 && st["indexer"]["last_error"].is_string()).then_some(st)
    })
    .await;
    let err = st["indexer"]["last_error"].as_str().unwrap();
    assert!(
        err.contains(&es.url()),
        "the error names the cluster: {err}"
    );
    assert_eq!(st["indexer"]["watermark"], 3);
    assert_eq!(st["cluster"]["reachable"], false);

    // Back: the gap is indexed from Postgres.
    es.restart().await;
    eventually(
        Duration::from_secs(30),
        "eight documents after the outage",
        || async { (es.ids().len() == 8).then_some(()) },
    )
    .await;
    eventually(Duration::from_secs(10), "the error cleared", || async {
        let (id, _, err) = watermark(&db).await;
        (id == 8 && err.is_none()).then_some(())
    })
    .await;

    // A second outage across a restart of the daemon: the watermark is durable.
    es.stop().await;
    for id in 9..=10 {
        db.insert_order(id, "new", 1.0).await;
    }
    rx.wait_for(10, Duration::from_secs(30)).await;
    db.wait_caught_up("test", Duration::from_secs(30)).await;
    daemon.stop().await;
    es.restart().await;
    let mut daemon = Daemon::start(&db, &cfg).await;
    eventually(
        Duration::from_secs(30),
        "ten documents after the restart",
        || async { (es.ids().len() == 10).then_some(()) },
    )
    .await;
    {
        let g = es.state.lock().unwrap();
        assert!(
            g.writes.values().all(|n| *n == 1),
            "each document accepted once: {:?}",
            g.writes
        );
    }
    assert_eq!(rx.count(), 10, "every event delivered once, cluster or not");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_that_cannot_be_reached_or_refuses_is_named() {
    let db = TestDb::new().await;
    let rx = Receiver::start().await;
    // A port nobody listens on.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let url = format!("http://{closed}");
    let cfg = config(&db, &rx, &url, "audit", "");
    let out = db.cli_with(&cfg, &["migrate", "--search"]).await;
    assert!(!out.status.success());
    let text = output_text(&out);
    assert!(
        text.contains(&format!("cannot reach the search cluster at {url}")),
        "{text}"
    );
    let out = db.cli_with(&cfg, &["search", "42"]).await;
    assert!(!out.status.success());
    assert!(output_text(&out).contains(&url), "{}", output_text(&out));

    // Refused: the server wants credentials we do not send.
    let es = BulkServer::start().await;
    es.state.lock().unwrap().auth = Some("Basic nope".into());
    let cfg = config(&db, &rx, &es.url(), "audit", "");
    let out = db.cli_with(&cfg, &["migrate", "--search"]).await;
    assert!(!out.status.success());
    let text = output_text(&out);
    assert!(
        text.contains(&format!(
            "the search cluster at {} refused the request: HTTP 401",
            es.url()
        )),
        "{text}"
    );

    // A credential written into the file is refused before anything connects.
    let cfg = config(
        &db,
        &rx,
        &es.url(),
        "audit",
        "username = \"u\"\npassword = \"hunter2\"",
    );
    let out = db.cli_with(&cfg, &["search", "x"]).await;
    assert!(!out.status.success());
    let text = output_text(&out);
    assert!(
        text.contains("search.password") && !text.contains("hunter2"),
        "{text}"
    );
}

/// `search` answering from a cluster that stores and searches for real (osmem-server or an
/// Elasticsearch), after events went through a real daemon.
async fn contract(url: &str) {
    let db = TestDb::new().await;
    let rx = Receiver::start().await;
    rx.set_path_status("/hooks/42", 500);
    let prefix = db.name.replace('_', "-");
    let cfg = config(&db, &rx, url, &prefix, "");
    let out = db.cli_with(&cfg, &["migrate", "--search"]).await;
    assert!(out.status.success(), "{}", output_text(&out));
    let mut daemon = Daemon::start(&db, &cfg).await;
    db.insert_order(42, "new", 10.0).await;
    db.set_status(42, "paid").await;
    db.insert_order(7, "new", 42.0).await;
    db.insert_order(420, "new", 1.0).await;
    db.insert_change(
        "Customer",
        Some("42"),
        "INSERT",
        Some(serde_json::json!({"name": "Ada"})),
    )
    .await;
    eventually(Duration::from_secs(60), "five rows indexed", || async {
        let n: i64 = db
            .client
            .query_one(
                "SELECT coalesce(max(indexed_id), 0) FROM observer_search_index",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        (n >= 5).then_some(())
    })
    .await;
    // Searches see new documents after the cluster's refresh (about a second).
    let found = eventually(
        Duration::from_secs(30),
        "search answers from the cluster",
        || async {
            let out = db
                .cli_with(
                    &cfg,
                    &[
                        "search",
                        "42",
                        "--entity",
                        "order",
                        "--outcome",
                        "failed",
                        "--json",
                    ],
                )
                .await;
            assert!(out.status.success(), "{}", output_text(&out));
            let v: Value = serde_json::from_slice(&out.stdout).unwrap();
            let v = v.as_array().unwrap().clone();
            (v.len() == 2).then_some(v)
        },
    )
    .await;
    for r in &found {
        assert_eq!(r["entity_id"], "42");
        assert_eq!(r["outcomes"], serde_json::json!(["dead_lettered"]));
        assert_eq!(r["actions"][0]["attempts"].as_array().unwrap().len(), 3);
    }
    assert_eq!(found[0]["operation"], "UPDATE", "newest first");
    let out = db.cli_with(&cfg, &["search", "42", "--json"]).await;
    let all: Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut ids: Vec<String> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            format!(
                "{}:{}",
                r["entity"].as_str().unwrap(),
                r["entity_id"].as_str().unwrap()
            )
        })
        .collect();
    ids.sort();
    assert_eq!(
        ids,
        ["Customer:42", "Order:42", "Order:42", "Order:7"],
        "{all:#}"
    );
    let out = db
        .cli_with(
            &cfg,
            &[
                "search",
                "",
                "--entity",
                "customer",
                "--outcome",
                "no_match",
                "--json",
            ],
        )
        .await;
    let c: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(c.as_array().unwrap().len(), 1, "{c}");
    let st = status_search(&db, &cfg, &[]).await;
    assert_eq!(st["cluster"]["documents"], 5, "{st}");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contract_with_osmem_server() {
    let Some(bin) = Osmem::binary() else {
        eprintln!("SKIPPED: osmem-server is not installed (scripts/setup.sh installs it into target/osmem-venv, or set OSMEM_SERVER_BIN)");
        return;
    };
    let server = Osmem::start(&bin).await;
    contract(&server.url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contract_with_a_real_elasticsearch() {
    let Ok(url) = std::env::var("ELASTICSEARCH_URL") else {
        eprintln!("SKIPPED: ELASTICSEARCH_URL is not set (docs/operations.md, \"Search\", says how to run one)");
        return;
    };
    contract(&url).await;
}
