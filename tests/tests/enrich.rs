//! Enrichment lookups (`[[observers.enrich]]`) and the `caching` layer, end to end: the real
//! daemon, real Postgres, real Redis (a key prefix per test), a real HTTP lookup service and a
//! real webhook receiver.

use std::time::Duration;

use observer_tests::lookup::{LookupServer, RedisPrefix};
use observer_tests::*;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(30);

/// An observer `enriched` on `Order` INSERTs with one `user` lookup (`lookup_extra` sets its
/// source) and one webhook whose body reads the lookup.
fn observer(condition: &str, lookup_extra: &str, hook_url: &str, body: &str) -> String {
    format!(
        r#"[[observers]]
name = "enriched"
entity = "Order"
events = ["INSERT"]
{condition}

  [[observers.enrich]]
  name = "user"
  key = "user:{{{{ data.customer.id }}}}"
{lookup_extra}

  [[observers.actions]]
  type = "webhook"
  url = "{hook_url}"
  body = '''{body}'''
  retry = {{ max_attempts = 5, backoff = "fixed", initial_ms = 100, max_ms = 1000 }}
"#
    )
}

fn http_lookup(lookup: &LookupServer, extra: &str) -> String {
    format!(
        "  http = \"{}\"\n{extra}",
        lookup.url("/users/{{ data.customer.id }}")
    )
}

const EMAIL_BODY: &str = r#"{"order": {{ data.id }}, "email": "{{ enrich.user.email }}"}"#;

async fn insert(db: &TestDb, id: i64, customer: Value) {
    db.client
        .execute(
            "INSERT INTO orders (id, customer) VALUES ($1, $2)",
            &[&id, &customer],
        )
        .await
        .expect("insert order");
}

/// Features and `[redis]` go in front of the observers (after `[listener]`).
fn config(db: &TestDb, caching: bool, redis: &RedisPrefix, observers: &str) -> String {
    db.config(&format!(
        "[features]\ncaching = {caching}\n\n{}\n{observers}",
        redis.section()
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn template_renders_the_looked_up_value() {
    let db = TestDb::new().await;
    let rx = Receiver::start().await;
    let lookup = LookupServer::start().await;
    let redis = RedisPrefix::new();
    lookup.set("/users/7", json!({"email": "ann@example.com", "vip": true}));
    let cfg = config(
        &db,
        false,
        &redis,
        &observer("", &http_lookup(&lookup, ""), &rx.url("/hook"), EMAIL_BODY),
    );
    let mut daemon = Daemon::start(&db, &cfg).await;
    insert(&db, 1, json!({"id": 7})).await;
    let reqs = rx.wait_for(1, WAIT).await;
    assert_eq!(
        reqs[0].json(),
        json!({"order": 1, "email": "ann@example.com"})
    );
    assert_eq!(lookup.hits("/users/7"), 1);
    assert!(daemon.stop().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn condition_on_a_lookup_filters_and_is_recorded() {
    let db = TestDb::new().await;
    let rx = Receiver::start().await;
    let lookup = LookupServer::start().await;
    let redis = RedisPrefix::new();
    lookup.set("/users/1", json!({"email": "vip@example.com", "vip": true}));
    lookup.set(
        "/users/2",
        json!({"email": "plain@example.com", "vip": false}),
    );
    let cfg = config(
        &db,
        false,
        &redis,
        &observer(
            "condition = \"enrich.user.vip == true\"",
            &http_lookup(&lookup, ""),
            &rx.url("/hook"),
            EMAIL_BODY,
        ),
    );
    let mut daemon = Daemon::start(&db, &cfg).await;
    insert(&db, 10, json!({"id": 2})).await;
    insert(&db, 11, json!({"id": 1})).await;
    db.wait_caught_up("test", WAIT).await;
    let reqs = rx.requests();
    assert_eq!(reqs.len(), 1, "only the VIP's order is delivered");
    assert_eq!(reqs[0].json()["email"], "vip@example.com");
    // Both were looked up: the condition is evaluated after the lookup.
    assert_eq!(lookup.hits("/users/1"), 1);
    assert_eq!(lookup.hits("/users/2"), 1);
    let plain = db.event_ids("Order", "10").await[0];
    let log = db
        .json_rows(&format!(
            "SELECT observer, outcome FROM observer_action_log WHERE event_id = '{plain}'"
        ))
        .await;
    assert_eq!(
        log,
        vec![json!({"observer": "enriched", "outcome": "condition_false"})]
    );
    assert!(db.dead_letters().await.is_empty());

    // debug-event tells the truth about where the condition is evaluated.
    let out = db
        .cli_with(&cfg, &["debug-event", &plain.to_string()])
        .await;
    let text = output_text(&out);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("condition needs enrichment; evaluated at delivery"),
        "{text}"
    );
    assert!(text.contains("condition_false"), "{text}");
    assert!(daemon.stop().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_hit_skips_the_lookup() {
    let db = TestDb::new().await;
    let rx = Receiver::start().await;
    let lookup = LookupServer::start().await;
    let redis = RedisPrefix::new();
    let doc = json!({"email": "ann@example.com", "vip": true});
    lookup.set("/users/7", doc.clone());
    let cfg = config(
        &db,
        true,
        &redis,
        &observer("", &http_lookup(&lookup, ""), &rx.url("/hook"), EMAIL_BODY),
    );
    let mut daemon = Daemon::start(&db, &cfg).await;
    insert(&db, 1, json!({"id": 7})).await;
    rx.wait_for(1, WAIT).await;
    insert(&db, 2, json!({"id": 7})).await;
    let reqs = rx.wait_for(2, WAIT).await;
    for r in &reqs {
        assert_eq!(r.json()["email"], "ann@example.com");
    }
    assert_eq!(
        lookup.hits("/users/7"),
        1,
        "the second event is served from Redis"
    );
    // Stored under `<prefix>:cache:<key>` as JSON text with the default TTL (60 s).
    let cached: Value = serde_json::from_str(&redis.get("cache:user:7").expect("cached")).unwrap();
    assert_eq!(cached, doc);
    let ttl = redis.ttl("cache:user:7");
    assert!((1..=60).contains(&ttl), "ttl {ttl}");
    assert!(daemon.stop().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_caching_switched_off_every_event_looks_up() {
    let db = TestDb::new().await;
    let rx = Receiver::start().await;
    let lookup = LookupServer::start().await;
    let redis = RedisPrefix::new();
    lookup.set("/users/7", json!({"email": "ann@example.com"}));
    // The file says caching = true; the environment rolls it back.
    let cfg = config(
        &db,
        true,
        &redis,
        &observer("", &http_lookup(&lookup, ""), &rx.url("/hook"), EMAIL_BODY),
    );
    let mut daemon =
        Daemon::start_with_env(&db, &cfg, &[("OBSERVER__FEATURES__CACHING", "false")]).await;
    insert(&db, 1, json!({"id": 7})).await;
    rx.wait_for(1, WAIT).await;
    insert(&db, 2, json!({"id": 7})).await;
    rx.wait_for(2, WAIT).await;
    assert_eq!(lookup.hits("/users/7"), 2);
    assert_eq!(redis.get("cache:user:7"), None, "nothing written to Redis");
    assert!(daemon.stop().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_entry_is_fetched_again() {
    let db = TestDb::new().await;
    let rx = Receiver::start().await;
    let lookup = LookupServer::start().await;
    let redis = RedisPrefix::new();
    lookup.set("/users/7", json!({"email": "old@example.com"}));
    let cfg = config(
        &db,
        true,
        &redis,
        &observer(
            "",
            &http_lookup(&lookup, "  ttl_secs = 1\n"),
            &rx.url("/hook"),
            EMAIL_BODY,
        ),
    );
    let mut daemon = Daemon::start(&db, &cfg).await;
    insert(&db, 1, json!({"id": 7})).await;
    rx.wait_for(1, WAIT).await;
    lookup.set("/users/7", json!({"email": "new@example.com"}));
    insert(&db, 2, json!({"id": 7})).await;
    let reqs = rx.wait_for(2, WAIT).await;
    // Within the second of its TTL the cached (old) value is served.
    assert_eq!(reqs[1].json()["email"], "old@example.com");
    assert_eq!(lookup.hits("/users/7"), 1);
    eventually(WAIT, "the cached entry to expire", || async {
        redis.get("cache:user:7").is_none().then_some(())
    })
    .await;
    insert(&db, 3, json!({"id": 7})).await;
    let reqs = rx.wait_for(3, WAIT).await;
    assert_eq!(reqs[2].json()["email"], "new@example.com");
    assert_eq!(lookup.hits("/users/7"), 2);
    assert!(daemon.stop().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_lookup_reads_the_first_row_and_no_row_is_null() {
    let db = TestDb::new().await;
    let rx = Receiver::start().await;
    let redis = RedisPrefix::new();
    db.exec(
        "CREATE TABLE customers (id BIGINT PRIMARY KEY, email TEXT NOT NULL, vip BOOLEAN NOT NULL);
         INSERT INTO customers VALUES (7, 'ann@example.com', true);",
    )
    .await;
    let sql = "  sql = \"SELECT email, vip FROM customers WHERE id = $1\"\n  params = [\"{{ data.customer.id }}\"]\n";
    let body = r#"{"order": {{ data.id }}, "email": "{{ enrich.user.email | default('none') }}", "vip": {{ enrich.user.vip | default(null) }}}"#;
    let cfg = config(
        &db,
        true,
        &redis,
        &observer("", sql, &rx.url("/hook"), body),
    );
    let mut daemon = Daemon::start(&db, &cfg).await;
    insert(&db, 1, json!({"id": 7})).await;
    insert(&db, 2, json!({"id": 8})).await;
    rx.wait_for(2, WAIT).await;
    db.wait_caught_up("test", WAIT).await;
    let mut bodies: Vec<Value> = rx.requests().iter().map(|r| r.json()).collect();
    bodies.sort_by_key(|b| b["order"].as_i64());
    assert_eq!(
        bodies,
        vec![
            json!({"order": 1, "email": "ann@example.com", "vip": true}),
            json!({"order": 2, "email": "none", "vip": null}),
        ]
    );
    // A miss is cached as null (`cache_misses` defaults to true).
    assert_eq!(redis.get("cache:user:8").as_deref(), Some("null"));
    assert!(daemon.stop().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_lookup_retries_the_delivery_until_it_recovers() {
    let db = TestDb::new().await;
    let rx = Receiver::start().await;
    let lookup = LookupServer::start().await;
    let redis = RedisPrefix::new();
    lookup.set("/users/7", json!({"email": "ann@example.com"}));
    lookup.fail_next(2, 500);
    let cfg = config(
        &db,
        true,
        &redis,
        &observer("", &http_lookup(&lookup, ""), &rx.url("/hook"), EMAIL_BODY),
    );
    let mut daemon = Daemon::start(&db, &cfg).await;
    insert(&db, 1, json!({"id": 7})).await;
    let reqs = rx.wait_for(1, WAIT).await;
    assert_eq!(reqs[0].json()["email"], "ann@example.com");
    db.wait_caught_up("test", WAIT).await;
    assert_eq!(rx.count(), 1, "the webhook ran only once the lookup worked");
    assert_eq!(lookup.hits("/users/7"), 3);
    let log = db.action_log().await;
    assert_eq!(log.len(), 1, "{log:?}");
    assert_eq!(log[0]["outcome"], "delivered");
    let attempts = log[0]["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 3, "{attempts:?}");
    for a in &attempts[..2] {
        assert_eq!(a["result"], "retry");
        let e = a["error"].as_str().unwrap();
        assert!(e.contains("enrich `user`") && e.contains("HTTP 500"), "{e}");
    }
    assert_eq!(attempts[2]["result"], "delivered");
    assert!(db.dead_letters().await.is_empty());
    assert!(daemon.stop().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_cache_never_fails_the_delivery() {
    let db = TestDb::new().await;
    let rx = Receiver::start().await;
    let lookup = LookupServer::start().await;
    lookup.set("/users/7", json!({"email": "ann@example.com"}));
    // Nothing listens on port 1: every cache call fails at once.
    let cfg = db.config(&format!(
        "[features]\ncaching = true\n\n[redis]\nurl = \"redis://127.0.0.1:1\"\ntimeout_ms = 200\n\n{}",
        observer("", &http_lookup(&lookup, ""), &rx.url("/hook"), EMAIL_BODY)
    ));
    let mut daemon = Daemon::start(&db, &cfg).await;
    insert(&db, 1, json!({"id": 7})).await;
    insert(&db, 2, json!({"id": 7})).await;
    let reqs = rx.wait_for(2, WAIT).await;
    for r in &reqs {
        assert_eq!(r.json()["email"], "ann@example.com");
    }
    assert_eq!(lookup.hits("/users/7"), 2, "looked up uncached each time");
    daemon
        .wait_log("lookup cache unavailable; looking up uncached", WAIT)
        .await;
    assert_eq!(
        daemon
            .logs()
            .matches("lookup cache unavailable; looking up uncached")
            .count(),
        1,
        "one warning per outage, not per lookup: {}",
        daemon.logs()
    );
    assert!(daemon.stop().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caching_without_redis_is_a_startup_error_naming_both_keys() {
    let db = TestDb::new().await;
    let cfg = db.config("[features]\ncaching = true\n\n[[observers]]\nname = \"o\"\nentity = \"Order\"\n  [[observers.actions]]\n  type = \"log\"\n");
    let out = db.cli_with(&cfg, &["run"]).await;
    let text = output_text(&out);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("features.caching") && text.contains("redis.url"),
        "{text}"
    );
    assert!(!text.contains("panicked"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_names_a_reference_to_a_missing_lookup() {
    let db = TestDb::new().await;
    let cfg = db.config(
        "[[observers]]\nname = \"o\"\nentity = \"Order\"\ncondition = \"enrich.user.vip == true\"\n  [[observers.actions]]\n  type = \"log\"\n",
    );
    let file = db.write_file("bad-enrich.toml", &cfg);
    let out = run_cli(&["validate", file.to_str().unwrap()]).await;
    let text = output_text(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("observers[0] \"o\".condition")
            && text.contains("`enrich.user` names no enrich entry"),
        "{text}"
    );
}
