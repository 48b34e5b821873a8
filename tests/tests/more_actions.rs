//! The `slack`, `redis_publish`, `cache` and `email` actions against real receivers on loopback
//! (HTTP receiver, Redis, an aiosmtpd SMTP server), the retry status policy (`retry_on`,
//! `dead_letter_on`, `retry_after_max_ms`, `abort_header`) and webhook batching.

use std::collections::HashMap;
use std::time::Duration;

use futures::StreamExt;
use observer_tests::action_helpers::*;
use observer_tests::*;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(30);

fn observer(name: &str, action: &str) -> String {
    format!(
        "[[observers]]\nname = \"{name}\"\nentity = \"Order\"\n\n  [[observers.actions]]\n{action}\n  retry = {{ max_attempts = 3, backoff = \"fixed\", initial_ms = 50, max_ms = 1000 }}\n\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slack_gets_the_json_it_expects_and_its_error_text_is_kept() {
    let db = TestDb::new().await;
    let rx = Receiver::start().await;
    let gone = ScriptedServer::start(404, &[("content-type", "text/plain")], "no_service").await;
    let actions = [
        observer(
            "slack",
            r##"  type = "slack"
  webhook_url = "${env:SLACK_TEST_URL}"
  text = "Order {{ data.id }} is {{ data.status }}"
  blocks = '[{"type": "section", "text": {"type": "mrkdwn", "text": "*Order {{ data.id }}* total {{ data.total }}"}}]'
  channel = "#orders"
  username = "shop-bot""##,
        ),
        observer(
            "gone",
            r#"  type = "slack"
  webhook_url = "${env:SLACK_GONE_URL}"
  text = "x""#,
        ),
    ]
    .concat();
    let slack_url = rx.url("/services/T000/B000/XXXX");
    let gone_url = gone.url("/services/GONE/SECRET/TOKEN");
    let mut daemon = Daemon::start_with_env(
        &db,
        &db.config(&actions),
        &[
            ("SLACK_TEST_URL", &slack_url),
            ("SLACK_GONE_URL", &gone_url),
        ],
    )
    .await;
    db.insert_order(1, "paid", 5.0).await;
    db.wait_caught_up("test", T).await;
    let reqs = rx.requests();
    assert_eq!(reqs.len(), 1, "{reqs:?}");
    assert_eq!(reqs[0].method, "POST");
    assert_eq!(reqs[0].path, "/services/T000/B000/XXXX");
    assert_eq!(reqs[0].header("content-type"), Some("application/json"));
    assert_eq!(
        reqs[0].json(),
        json!({
            "text": "Order 1 is paid",
            "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": "*Order 1* total 5"}}],
            "channel": "#orders",
            "username": "shop-bot"
        })
    );
    assert_eq!(gone.hits(), 1, "a 404 is not retried");
    let dl = db.dead_letters().await;
    assert_eq!(dl.len(), 1, "{dl:?}");
    assert_eq!(dl[0]["observer"], "gone");
    assert_eq!(dl[0]["reason"], "permanent_failure");
    let err = dl[0]["last_error"].as_str().unwrap();
    assert!(err.contains("404") && err.contains("no_service"), "{err}");
    assert_eq!(dl[0]["action"]["webhook_url"], "${env:SLACK_GONE_URL}");
    let stored = dl[0].to_string();
    assert!(!stored.contains("SECRET/TOKEN"), "the URL leaked: {stored}");
    assert!(daemon.stop().await.success());
    assert!(
        !daemon.logs().contains("SECRET/TOKEN"),
        "the Slack URL was logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slack_429_honours_retry_after() {
    let db = TestDb::new().await;
    let rx = Receiver::start().await;
    rx.set_path_sequence("/hook", &[429]);
    rx.set_retry_after(Some("1"));
    let mut daemon = Daemon::start_with_env(
        &db,
        &db.config(&observer(
            "s",
            "  type = \"slack\"\n  webhook_url = \"${env:SLACK_TEST_URL}\"\n  text = \"hi\"",
        )),
        &[("SLACK_TEST_URL", &rx.url("/hook"))],
    )
    .await;
    db.insert_order(1, "new", 1.0).await;
    db.wait_caught_up("test", T).await;
    let reqs = rx.requests();
    assert_eq!(
        reqs.iter().map(|r| r.status).collect::<Vec<_>>(),
        [429, 204]
    );
    let gap = reqs[1].at.duration_since(reqs[0].at);
    assert!(gap >= Duration::from_millis(1000), "gap {gap:?}");
    assert!(db.dead_letters().await.is_empty());
    assert!(daemon.stop().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_publish_publishes_and_appends_to_a_stream() {
    let db = TestDb::new().await;
    let r = TestRedis::new().await;
    let channel = format!("{}:orders", r.prefix);
    let mut pubsub = r.client.get_async_pubsub().await.expect("pubsub");
    pubsub.subscribe(&channel).await.expect("subscribe");
    let observers = [
        observer(
            "pub",
            &format!("  type = \"redis_publish\"\n  channel = \"{channel}\""),
        ),
        observer(
            "x",
            &format!(
                "  type = \"redis_publish\"\n  mode = \"xadd\"\n  stream = \"{}:stream:{{{{ data.status }}}}\"\n  maxlen = 100\n  body = '{{\"id\": {{{{ data.id }}}}, \"key\": \"{{{{ delivery.idempotency_key }}}}\"}}'",
                r.prefix
            ),
        ),
    ]
    .concat();
    let config = format!("{}\n{}", r.config_section(), db.config(&observers));
    let mut daemon = Daemon::start(&db, &config).await;
    db.insert_order(1, "paid", 1.0).await;
    db.insert_order(2, "paid", 2.0).await;
    db.wait_caught_up("test", T).await;
    let ids = [
        db.event_ids("Order", "1").await[0],
        db.event_ids("Order", "2").await[0],
    ];
    let mut got = Vec::new();
    {
        let mut messages = pubsub.on_message();
        for _ in 0..2 {
            let m = tokio::time::timeout(T, messages.next())
                .await
                .expect("a published message")
                .expect("pubsub open");
            let v: Value = serde_json::from_str(&m.get_payload::<String>().unwrap()).unwrap();
            got.push(v);
        }
    }
    // Orders 1 and 2 are different entities: with `concurrent` on (the default) their actions
    // run side by side, so they may arrive in either order. Each must arrive once.
    got.sort_by_key(|v| v["data"]["id"].as_i64());
    for (v, id) in got.iter().zip(ids) {
        assert_eq!(v["event_id"], id.to_string(), "{v}");
        assert_eq!(v["entity"], "Order");
        assert_eq!(v["observer"], "pub");
        assert_eq!(v["idempotency_key"], idempotency_key(id, "pub", 0));
    }
    let mut c = r.conn.clone();
    let entries: Vec<(String, HashMap<String, String>)> = redis::cmd("XRANGE")
        .arg(format!("{}:stream:paid", r.prefix))
        .arg("-")
        .arg("+")
        .query_async(&mut c)
        .await
        .expect("XRANGE");
    assert_eq!(entries.len(), 2, "{entries:?}");
    let mut entries: Vec<_> = entries.into_iter().map(|(_, fields)| fields).collect();
    entries.sort_by_key(|f| {
        serde_json::from_str::<Value>(&f["event"])
            .ok()
            .and_then(|e| e["id"].as_i64())
    });
    for (fields, (n, id)) in entries.iter().zip([(1, ids[0]), (2, ids[1])]) {
        let key = idempotency_key(id, "x", 0);
        assert_eq!(fields["idempotency_key"], key);
        let event: Value = serde_json::from_str(&fields["event"]).unwrap();
        assert_eq!(event, json!({"id": n, "key": key}));
    }
    assert!(db.dead_letters().await.is_empty());
    assert!(daemon.stop().await.success());
    r.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_unlinks_keys_and_scanned_patterns_under_the_cache_prefix() {
    let db = TestDb::new().await;
    let r = TestRedis::new().await;
    let p = &r.prefix;
    let keep = [
        format!("{p}:cache:user:2"),
        format!("{p}:cache:session:2:a"),
        format!("{p}:cache:session:10:a"),
        format!("{p}:user:1"),
    ];
    let gone = [
        format!("{p}:cache:user:1"),
        format!("{p}:cache:session:1:a"),
        format!("{p}:cache:session:1:b"),
    ];
    for k in keep.iter().chain(&gone) {
        r.set(k, "v").await;
    }
    for i in 0..1500 {
        r.set(&format!("{p}:cache:session:1:bulk{i}"), "v").await;
    }
    let action = "  type = \"cache\"\n  keys = [\"user:{{ data.id }}\", \"user:404\"]\n  patterns = [\"session:{{ data.id }}:*\"]\n  scan_count = 200";
    let config = format!(
        "{}\n{}",
        r.config_section(),
        db.config(&observer("inv", action))
    );
    let mut daemon = Daemon::start(&db, &config).await;
    db.insert_order(1, "new", 1.0).await;
    db.wait_caught_up("test", T).await;
    for k in &gone {
        assert!(!r.exists(k).await, "{k} should be gone");
    }
    for k in &keep {
        assert!(r.exists(k).await, "{k} should be kept");
    }
    let left = r.keys().await;
    assert_eq!(left.len(), keep.len(), "{left:?}");
    let log = db.action_log().await;
    assert_eq!(log[0]["outcome"], "delivered", "{log:?}");
    assert!(daemon.stop().await.success());
    r.cleanup().await;
}

/// Issue 18, item 8: glob characters in event data match literally. `patterns` are globs in
/// the config's own text only: a value `*` removes the key `user:*`, not every `user:` key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_patterns_match_event_values_literally() {
    let db = TestDb::new().await;
    let r = TestRedis::new().await;
    let p = &r.prefix;
    let cache = |k: &str| format!("{p}:cache:{k}");
    // (event value, the one key it must remove)
    let cases = [
        ("*", "user:*:profile"),
        ("?", "user:?:profile"),
        ("[12]", "user:[12]:profile"),
        ("a\\b", "user:a\\b:profile"),
        ("c]", "user:c]:profile"),
    ];
    let keep = [
        "user:1:profile",
        "user:2:profile",
        "user:12:profile",
        "user:ab:profile",
        "user:x:profile",
    ];
    for k in keep.iter().chain(cases.iter().map(|(_, k)| k)) {
        r.set(&cache(k), "v").await;
    }
    let action = "  type = \"cache\"\n  patterns = [\"user:{{ data.uid }}:prof*\"]";
    let config = format!(
        "{}\n{}",
        r.config_section(),
        db.config(&observer("inv", action))
    );
    let mut daemon = Daemon::start(&db, &config).await;
    for (i, (value, _)) in cases.iter().enumerate() {
        db.insert_change(
            "Order",
            Some(&i.to_string()),
            "INSERT",
            Some(json!({ "uid": value })),
        )
        .await;
    }
    db.wait_caught_up("test", T).await;
    let log = db.action_log().await;
    assert_eq!(log.len(), cases.len(), "{log:?}");
    assert!(log.iter().all(|l| l["outcome"] == "delivered"), "{log:?}");
    for (value, k) in &cases {
        assert!(
            !r.exists(&cache(k)).await,
            "{k} should be gone (value {value:?})"
        );
    }
    for k in &keep {
        assert!(
            r.exists(&cache(k)).await,
            "{k} was removed by an event value used as a glob"
        );
    }
    assert!(daemon.stop().await.success());
    r.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_on_dead_letter_on_abort_header_and_retry_after_cap() {
    let db = TestDb::new().await;
    let rx = Receiver::start().await;
    rx.set_path_sequence("/conflict", &[409]);
    rx.set_path_status("/unavailable", 503);
    rx.set_path_sequence("/slow", &[503]);
    rx.set_retry_after(Some("30"));
    let abort = ScriptedServer::start(503, &[("x-observer-abort", "true")], "stop").await;
    let retry = |extra: &str| {
        format!("  retry = {{ max_attempts = 4, backoff = \"fixed\", initial_ms = 50, max_ms = 1000{extra} }}")
    };
    let observers = [
        webhook_observer(
            "conflict",
            "Order",
            &rx.url("/conflict"),
            "",
            &retry(", retry_on = [409], retry_after_max_ms = 100"),
        ),
        webhook_observer(
            "unavailable",
            "Order",
            &rx.url("/unavailable"),
            "",
            &retry(", retry_on = [\"5xx\"], dead_letter_on = [503]"),
        ),
        webhook_observer("abort", "Order", &abort.url("/a"), "", &retry("")),
        webhook_observer(
            "slow",
            "Order",
            &rx.url("/slow"),
            "",
            &retry(", retry_after_max_ms = 300"),
        ),
    ]
    .concat();
    let mut daemon = Daemon::start(&db, &db.config(&observers)).await;
    db.insert_order(1, "new", 1.0).await;
    db.wait_caught_up("test", T).await;
    let statuses = |p: &str| {
        rx.requests_to(p)
            .iter()
            .map(|r| r.status)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        statuses("/conflict"),
        [409, 204],
        "409 is retried when listed"
    );
    assert_eq!(
        statuses("/unavailable"),
        [503],
        "dead_letter_on wins over retry_on"
    );
    assert_eq!(abort.hits(), 1, "the abort header stops retries");
    let slow = rx.requests_to("/slow");
    assert_eq!(
        slow.iter().map(|r| r.status).collect::<Vec<_>>(),
        [503, 204]
    );
    let gap = slow[1].at.duration_since(slow[0].at);
    assert!(
        gap < Duration::from_secs(5),
        "Retry-After 30 s was not capped: {gap:?}"
    );
    assert!(gap >= Duration::from_millis(250), "{gap:?}");
    let dl = db.dead_letters().await;
    let by: HashMap<String, &Value> = dl
        .iter()
        .map(|d| (d["observer"].as_str().unwrap().to_string(), d))
        .collect();
    assert_eq!(by.len(), 2, "{dl:?}");
    let e = by["unavailable"]["last_error"].as_str().unwrap();
    assert!(e.contains("503") && e.contains("dead_letter_on"), "{e}");
    assert_eq!(by["unavailable"]["reason"], "permanent_failure");
    let e = by["abort"]["last_error"].as_str().unwrap();
    assert!(
        e.contains("aborted by the receiver") && e.contains("x-observer-abort"),
        "{e}"
    );
    assert_eq!(by["abort"]["attempts"].as_array().unwrap().len(), 1);
    assert!(daemon.stop().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_names_bad_status_codes_missing_redis_and_plaintext_smtp() {
    let dir = temp_dir(&format!("validate-actions-{}", std::process::id()));
    let cfg = r#"
[[observers]]
name = "o"
entity = "Order"

  [[observers.actions]]
  type = "webhook"
  url = "http://127.0.0.1:1/x"
  retry = { retry_on = ["6xx", 503], dead_letter_on = [99] }

  [[observers.actions]]
  type = "cache"
  keys = ["user:{{ data.id }}"]

  [[observers.actions]]
  type = "email"
  host = "mail.example.com"
  tls = "none"
  from = "a@example.com"
  to = ["not an address"]
  subject = "s"
  body = "b"

  [[observers.actions]]
  type = "slack"
  webhook_url = "https://hooks.slack.com/services/x"
"#;
    let file = dir.join("bad.toml");
    std::fs::write(&file, cfg).unwrap();
    let out = run_cli(&["validate", file.to_str().unwrap()]).await;
    let text = output_text(&out);
    assert!(!out.status.success(), "{text}");
    for needle in [
        "actions[0] (webhook).retry",
        "retry_on: `6xx`",
        "dead_letter_on: `99`",
        "actions[1] (cache): needs a Redis server",
        "actions[2] (email).tls",
        "allow_plaintext",
        "actions[2] (email).to[0]",
        "actions[3] (slack).text",
    ] {
        assert!(text.contains(needle), "no `{needle}` in:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn email_is_sent_over_real_smtp_with_the_idempotency_key() {
    let db = TestDb::new().await;
    let sink = SmtpSink::start(
        db.dir.join("mail"),
        &[("reject.test", "550 5.1.1 mailbox unavailable")],
    )
    .await;
    let port = sink.port;
    let observers = [
        observer(
            "mail",
            &format!(
                r#"  type = "email"
  host = "127.0.0.1"
  port = {port}
  tls = "none"
  from = "Shop <shop@example.com>"
  to = ["customer-{{{{ data.id }}}}@example.com", "ops@example.com"]
  subject = "Order {{{{ data.id }}}} is {{{{ data.status }}}}"
  body = "Total: {{{{ data.total }}}}"
  html = "<p>Total: {{{{ data.total }}}}</p>""#
            ),
        ),
        observer(
            "rejected",
            &format!(
                "  type = \"email\"\n  smtp_url = \"smtp://127.0.0.1:{port}\"\n  tls = \"none\"\n  from = \"shop@example.com\"\n  to = [\"x@reject.test\"]\n  subject = \"s\"\n  body = \"b\""
            ),
        ),
        observer(
            "starttls",
            &format!(
                "  type = \"email\"\n  host = \"127.0.0.1\"\n  port = {port}\n  from = \"shop@example.com\"\n  to = [\"y@example.com\"]\n  subject = \"s\"\n  body = \"b\""
            ),
        ),
    ]
    .concat();
    let mut daemon = Daemon::start(&db, &db.config(&observers)).await;
    db.insert_order(7, "paid", 12.5).await;
    db.wait_caught_up("test", T).await;
    let id = db.event_ids("Order", "7").await[0];
    let mails = sink.mails();
    assert_eq!(mails.len(), 1, "{mails:?}");
    let m = &mails[0];
    assert_eq!(m.mail_from, "shop@example.com");
    assert_eq!(m.rcpt_tos, ["customer-7@example.com", "ops@example.com"]);
    assert_eq!(m.header("Subject").as_deref(), Some("Order 7 is paid"));
    let key = idempotency_key(id, "mail", 0);
    assert_eq!(m.header("X-Idempotency-Key"), Some(key.clone()));
    assert_eq!(
        m.header("Message-ID"),
        Some(format!("<{key}@fraiseql-observers>"))
    );
    assert!(m.data.contains("Total: 12.5"), "{}", m.data);
    assert!(m.data.contains("<p>Total: 12.5</p>"), "{}", m.data);
    let dl = db.dead_letters().await;
    let by: HashMap<String, &Value> = dl
        .iter()
        .map(|d| (d["observer"].as_str().unwrap().to_string(), d))
        .collect();
    assert_eq!(by.len(), 2, "{dl:?}");
    for name in ["rejected", "starttls"] {
        assert_eq!(by[name]["reason"], "permanent_failure", "{name}");
        assert_eq!(by[name]["attempts"].as_array().unwrap().len(), 1, "{name}");
    }
    let e = by["rejected"]["last_error"].as_str().unwrap();
    assert!(
        e.contains("550") && e.contains("mailbox unavailable"),
        "{e}"
    );
    let e = by["starttls"]["last_error"].as_str().unwrap();
    assert!(e.to_ascii_lowercase().contains("starttls"), "{e}");
    assert!(daemon.stop().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_webhook_sends_fewer_requests_carrying_every_key_once() {
    let db = TestDb::new().await;
    let rx = Receiver::start().await;
    rx.set_delay(Duration::from_millis(100));
    let observers = webhook_observer(
        "b",
        "Order",
        &rx.url("/batch"),
        "",
        "  batch = { max_events = 50, max_wait_ms = 200 }\n  secret = \"whsec_c2VjcmV0LWtleS1mb3ItdGVzdHM=\"",
    );
    let mut daemon = Daemon::start_with_env(
        &db,
        &db.config(&observers),
        &[("OBSERVER__FEATURES__CONCURRENT", "true")],
    )
    .await;
    db.exec("INSERT INTO orders (id) SELECT g FROM generate_series(1, 20) g")
        .await;
    db.wait_caught_up("test", T).await;
    let reqs = rx.requests();
    assert!(
        !reqs.is_empty() && reqs.len() < 20,
        "{} requests",
        reqs.len()
    );
    let mut expected = Vec::new();
    for i in 1..=20 {
        let id = db.event_ids("Order", &i.to_string()).await[0];
        expected.push(idempotency_key(id, "b", 0));
    }
    expected.sort();
    let mut seen = Vec::new();
    for r in &reqs {
        let arr = r.json();
        let arr = arr.as_array().expect("a JSON array body");
        let keys: Vec<String> = arr
            .iter()
            .map(|e| e["idempotency_key"].as_str().unwrap().to_string())
            .collect();
        for e in arr {
            assert_eq!(e["entity"], "Order");
            assert_eq!(e["observer"], "b");
        }
        let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        let batch = observer_core::actions::webhook_batch::batch_key(&refs);
        assert_eq!(r.idempotency_key(), batch);
        assert_eq!(r.header("webhook-id"), Some(batch.as_str()));
        assert!(r.header("webhook-signature").is_some());
        seen.extend(keys);
    }
    seen.sort();
    assert_eq!(seen, expected, "every key exactly once");
    assert!(db.dead_letters().await.is_empty());
    assert!(daemon.stop().await.success());
}
