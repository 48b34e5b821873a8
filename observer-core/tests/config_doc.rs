//! Keeps docs/configuration.md true to the config structs: every key that `Config` serialises
//! (with one observer carrying one action of each kind) must be documented, and every key of a
//! table section must have its `OBSERVER__SECTION__KEY` variable written out.

use std::collections::BTreeSet;

use observer_core::config::{
    ActionConfig, BatchConfig, CacheConfig, Config, EmailConfig, EmailTls, EnrichConfig, LogConfig,
    ObserverConfig, RedisPublishConfig, RedisPublishMode, RetryConfig, SlackConfig, SqlConfig,
    WebhookConfig,
};
use serde_json::Value;

const DOC_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/configuration.md");

fn doc() -> String {
    std::fs::read_to_string(DOC_PATH).unwrap_or_else(|e| panic!("cannot read {DOC_PATH}: {e}"))
}

/// Maps whose keys are user data (header names), not configuration keys.
const USER_MAPS: &[&str] = &["headers", "destinations", "per_queue"];

fn sample() -> Config {
    let mut cfg = Config::default();
    cfg.observers.push(ObserverConfig {
        name: "doc-sample".into(),
        entity: "Order".into(),
        events: Vec::new(),
        condition: Some("data.status == 'paid'".into()),
        enabled: true,
        ordering: Default::default(),
        queue: Some("media".into()),
        enrich: vec![EnrichConfig {
            name: "user".into(),
            key: "user:{{ data.user_id }}".into(),
            ttl_secs: Some(60),
            http: Some("https://example.com/users/{{ data.user_id }}".into()),
            sql: Some("SELECT 1".into()),
            params: vec!["{{ data.user_id }}".into()],
            timeout_ms: 5_000,
        }],
        actions: vec![
            ActionConfig::Webhook(WebhookConfig {
                url: "https://example.com/hook".into(),
                method: "POST".into(),
                headers: Default::default(),
                body: Some("{}".into()),
                timeout_ms: 10_000,
                secret: Some("${env:SECRET}".into()),
                secrets: vec!["${env:OLD_SECRET}".into()],
                retry: RetryConfig {
                    dead_letter_on: vec!["501".into()],
                    ..RetryConfig::default()
                },
                batch: Some(BatchConfig::default()),
            }),
            ActionConfig::Slack(SlackConfig {
                webhook_url: "${env:SLACK_URL}".into(),
                text: Some("t".into()),
                blocks: Some("[]".into()),
                channel: Some("#c".into()),
                username: Some("u".into()),
                timeout_ms: 10_000,
                retry: RetryConfig::default(),
            }),
            ActionConfig::Email(EmailConfig {
                smtp_url: Some("smtp://127.0.0.1:25".into()),
                host: Some("127.0.0.1".into()),
                port: Some(25),
                tls: Some(EmailTls::None),
                allow_plaintext: false,
                username: Some("u".into()),
                password: Some("${env:P}".into()),
                from: "a@example.com".into(),
                to: vec!["b@example.com".into()],
                subject: "s".into(),
                body: "b".into(),
                html: Some("<p>b</p>".into()),
                timeout_ms: 10_000,
                retry: RetryConfig::default(),
            }),
            ActionConfig::RedisPublish(RedisPublishConfig {
                mode: RedisPublishMode::Xadd,
                channel: Some("c".into()),
                stream: Some("s".into()),
                body: Some("{}".into()),
                maxlen: Some(1000),
                retry: RetryConfig::default(),
            }),
            ActionConfig::Cache(CacheConfig {
                keys: vec!["user:1".into()],
                patterns: vec!["user:*".into()],
                scan_count: 500,
                retry: RetryConfig::default(),
            }),
            ActionConfig::Log(LogConfig {
                message: Some("m".into()),
                level: "info".into(),
            }),
            ActionConfig::Sql(SqlConfig {
                function: "f".into(),
                retry: RetryConfig::default(),
            }),
        ],
    });
    cfg
}

/// Collects (path, key) for every object key, descending into objects and array elements.
fn walk(value: &Value, path: &mut Vec<String>, out: &mut BTreeSet<(String, String)>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                out.insert((path.join("."), k.clone()));
                if USER_MAPS.contains(&k.as_str()) {
                    continue;
                }
                path.push(k.clone());
                walk(v, path, out);
                path.pop();
            }
        }
        Value::Array(items) => {
            for item in items {
                path.push("[]".into());
                walk(item, path, out);
                path.pop();
            }
        }
        _ => {}
    }
}

#[test]
fn every_config_key_is_documented() {
    let doc = doc();
    let json = serde_json::to_value(sample()).expect("config serialises");
    let mut keys = BTreeSet::new();
    walk(&json, &mut Vec::new(), &mut keys);
    assert!(keys.len() > 30, "walked too few keys: {keys:?}");

    let mut missing = Vec::new();
    for (parent, key) in &keys {
        // Sections are headed `[name]` (or `[[name]]` for arrays of tables); keys are `name`.
        let shown = if parent.is_empty() {
            format!("[{key}]")
        } else {
            format!("`{key}`")
        };
        if !doc.contains(&shown) {
            missing.push(format!("{parent}.{key} (no {shown} in the doc)"));
        }
        // Keys of table sections (not of the observers array) can be set from the environment;
        // the doc writes the variable out for each of them.
        if !parent.is_empty() && !parent.contains("[]") && parent != "observers" {
            let env = format!(
                "OBSERVER__{}__{}",
                parent.replace('.', "__").to_ascii_uppercase(),
                key.to_ascii_uppercase()
            );
            if !doc.contains(&env) {
                missing.push(format!("{parent}.{key} (no {env} in the doc)"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "docs/configuration.md does not document:\n  {}",
        missing.join("\n  ")
    );
}

#[test]
fn action_types_are_documented() {
    let doc = doc();
    for kind in [
        "webhook",
        "log",
        "sql",
        "slack",
        "email",
        "redis_publish",
        "cache",
    ] {
        assert!(
            doc.contains(&format!("type = \"{kind}\"")),
            "no `type = \"{kind}\"` section in the doc"
        );
    }
}
