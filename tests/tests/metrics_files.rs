//! The shipped Prometheus alert rules and Grafana dashboard name only metrics the code exports,
//! and the operations runbook documents every metric: the files cannot drift from
//! `observer_core::metrics`.

use std::collections::BTreeSet;

use observer_core::metrics::Metrics;
use observer_tests::workspace_root;
use serde_json::Value;

/// Family names and sample names of the exposition, with every labelled collector touched.
fn exported() -> (BTreeSet<String>, BTreeSet<String>) {
    let m = Metrics::new();
    // Vectors render nothing until a label set exists: touch the ones `Metrics::new` leaves empty.
    m.init_observer("o", &["webhook"]);
    m.breaker_state.with_label_values(&["d"]).set(0);
    m.breaker_opened.with_label_values(&["d"]);
    let text = m.render();
    let mut families = BTreeSet::new();
    let mut samples = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            families.insert(rest.split_whitespace().next().unwrap().to_string());
        } else if !line.starts_with('#') && !line.is_empty() {
            let name = line.split(['{', ' ']).next().unwrap();
            samples.insert(name.to_string());
        }
    }
    (families, samples)
}

/// Every `observer_…` identifier in `expr`.
fn referenced(expr: &str) -> Vec<String> {
    let b = expr.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(off) = expr[i..].find("observer_") {
        let start = i + off;
        let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
        let mut end = start;
        while end < b.len() && word(b[end]) {
            end += 1;
        }
        if start == 0 || !word(b[start - 1]) {
            out.push(expr[start..end].to_string());
        }
        i = end;
    }
    out
}

fn assert_exported(
    what: &str,
    name: &str,
    families: &BTreeSet<String>,
    samples: &BTreeSet<String>,
) {
    let base = ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|s| name.strip_suffix(s))
        .unwrap_or(name);
    assert!(
        families.contains(name) || samples.contains(name) || families.contains(base),
        "{what} names `{name}`, which observer_core::metrics does not export; exported: {families:?}"
    );
}

#[test]
fn alert_rules_name_only_exported_metrics() {
    let (families, samples) = exported();
    let path = workspace_root().join("config/prometheus-alerts.yml");
    let text = std::fs::read_to_string(&path).expect("read alerts");
    let doc: Value = config::Config::builder()
        .add_source(config::File::from_str(&text, config::FileFormat::Yaml))
        .build()
        .and_then(|c| c.try_deserialize())
        .unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", path.display()));
    let groups = doc["groups"].as_array().expect("groups");
    let mut alerts = Vec::new();
    for g in groups {
        for r in g["rules"].as_array().expect("rules") {
            let name = r["alert"]
                .as_str()
                .expect("every rule is an alert")
                .to_string();
            let expr = r["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("{name}: no expr"));
            assert!(r["labels"]["severity"].is_string(), "{name}: no severity");
            assert!(
                r["annotations"]["summary"].is_string(),
                "{name}: no summary"
            );
            for m in referenced(expr) {
                assert_exported(&format!("alert {name}"), &m, &families, &samples);
            }
            alerts.push((name, expr.to_string()));
        }
    }
    // The alerts the runbook promises, on the right metrics.
    for (alert, metric) in [
        ("ObserverLagHigh", "observer_lag_seconds"),
        ("ObserverDeadLettersGrowing", "observer_dlq_size"),
        ("ObserverBreakerOpen", "observer_breaker_state"),
        ("ObserverActionErrorRate", "observer_actions_failed_total"),
        ("ObserverListenerNotActive", "observer_listener_active"),
        ("ObserverNoLeader", "observer_leader"),
        (
            "ObserverLeaseRenewFailing",
            "observer_lease_renew_failures_total",
        ),
        ("ObserverMetricsDown", "up{"),
    ] {
        let found = alerts.iter().find(|(n, _)| n == alert);
        let (_, expr) = found.unwrap_or_else(|| panic!("alert {alert} is missing"));
        assert!(
            expr.contains(metric),
            "alert {alert} does not use {metric}: {expr}"
        );
    }
    // Documented in the runbook.
    let ops = std::fs::read_to_string(workspace_root().join("docs/operations.md")).unwrap();
    for (name, _) in &alerts {
        assert!(
            ops.contains(name.as_str()),
            "docs/operations.md does not describe alert {name}"
        );
    }
}

#[test]
fn dashboard_targets_name_only_exported_metrics() {
    let (families, samples) = exported();
    let path = workspace_root().join("config/grafana-dashboard.json");
    let d: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
    // Importable anywhere: the data source is a variable, not a fixed uid.
    let vars = d["templating"]["list"].as_array().expect("templating");
    assert!(vars
        .iter()
        .any(|v| v["type"] == "datasource" && v["query"] == "prometheus"));
    let panels = d["panels"].as_array().expect("panels");
    let mut used = BTreeSet::new();
    for p in panels {
        assert_eq!(
            p["datasource"]["uid"], "${datasource}",
            "panel {}",
            p["title"]
        );
        for t in p["targets"].as_array().expect("targets") {
            let expr = t["expr"].as_str().expect("expr");
            for m in referenced(expr) {
                assert_exported(&format!("panel {}", p["title"]), &m, &families, &samples);
                used.insert(m);
            }
        }
    }
    for v in vars {
        if let Some(q) = v["query"]["query"].as_str() {
            for m in referenced(q) {
                assert_exported("a dashboard variable", &m, &families, &samples);
            }
        }
    }
    for needed in [
        "observer_events_processed_total",
        "observer_lag_seconds",
        "observer_action_duration_seconds_bucket",
        "observer_actions_total",
        "observer_dlq_size",
        "observer_dedup_skips_total",
        "observer_cache_hit_rate",
        "observer_breaker_state",
    ] {
        assert!(
            used.contains(needed),
            "the dashboard has no panel on {needed}"
        );
    }
}

#[test]
fn the_runbook_documents_every_metric() {
    let (families, _) = exported();
    let ops = std::fs::read_to_string(workspace_root().join("docs/operations.md")).unwrap();
    for f in &families {
        assert!(
            ops.contains(&format!("`{f}`")),
            "docs/operations.md does not document `{f}`"
        );
    }
}

#[test]
fn promtool_accepts_the_rules() {
    let path = workspace_root().join("config/prometheus-alerts.yml");
    match std::process::Command::new("promtool")
        .args(["check", "rules"])
        .arg(&path)
        .output()
    {
        Ok(out) => assert!(
            out.status.success(),
            "promtool check rules failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        // scripts/setup.sh installs promtool (Debian's prometheus package) for `.ci/run`, so
        // there a missing promtool is a failure; a bare `cargo test` elsewhere only says so.
        Err(e) if std::env::var_os("CI").is_some() => {
            panic!("promtool not found ({e}) although CI is set: scripts/setup.sh installs it")
        }
        Err(e) => eprintln!("promtool not installed ({e}); the other tests still check the names"),
    }
}
