//! Property-based fuzzing of everything that parses input we do not control: the condition
//! language (parser and evaluator), templates (parser and renderer), the config loader (TOML,
//! YAML, environment overrides) and the change-log row decoder.
//!
//! The properties: no panic, every case finishes within [`CASE_LIMIT`], and what can grow is
//! bounded (rendered templates, config arrays). Each target mixes arbitrary input with structured
//! generators that produce valid-ish input (deep nesting, long operator chains, huge literals),
//! since purely random bytes rarely get past the first token.
//!
//! `cargo nextest run -p observer-core --test fuzz` runs a modest number of cases (CI);
//! `scripts/fuzz.sh --secs N` runs each target for N seconds with many more (see
//! docs/reliability.md). Environment: `PROPTEST_CASES` (cases per round, default 64) and
//! `FUZZ_SECS` (keep running rounds with fresh seeds until this many seconds have passed).
//! A failing case is shrunk and saved in `tests/fuzz.regressions`, and replayed first on
//! every later run.

use std::time::{Duration, Instant};

use chrono::Utc;
use observer_core::change_log::{decode, raw_json, ChangeRow, RawRow};
use observer_core::condition::Condition;
use observer_core::config::load_with_env;
use observer_core::event::{ChangeEvent, Operation};
use observer_core::observer::Observers;
use observer_core::path::Scope;
use observer_core::template::{Target, Template, MAX_RENDERED_BYTES};
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence, TestCaseError, TestRunner};
use serde_json::{json, Value};

/// Longest one case may take (debug build, a loaded 2-core machine): anything near this is a
/// super-linear blow-up, not noise.
const CASE_LIMIT: Duration = Duration::from_secs(5);

/// Runs `test` over `strategy`: one round of `PROPTEST_CASES` cases, or rounds with fresh seeds
/// until `FUZZ_SECS` have passed. Prints the figures the fuzz script reports.
fn fuzz<S>(name: &str, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S: Strategy,
    S::Value: std::fmt::Debug,
{
    let cases: u32 = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    let budget = std::env::var("FUZZ_SECS")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .map(Duration::from_secs_f64);
    let start = Instant::now();
    let mut total = 0u64;
    let slowest = std::cell::Cell::new(Duration::ZERO);
    loop {
        let mut runner = TestRunner::new(Config {
            cases,
            source_file: Some(file!()),
            failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("regressions"))),
            max_shrink_iters: 2048,
            ..Config::default()
        });
        let result = runner.run(&strategy, |value| {
            let t = Instant::now();
            test(value)?;
            let took = t.elapsed();
            slowest.set(slowest.get().max(took));
            prop_assert!(took < CASE_LIMIT, "one case took {took:?}");
            Ok(())
        });
        if let Err(e) = result {
            panic!("fuzz target {name} failed after {total} cases: {e}");
        }
        total += u64::from(cases);
        match budget {
            Some(b) if start.elapsed() < b => continue,
            _ => break,
        }
    }
    eprintln!(
        "fuzz target {name}: {total} cases in {:.1} s, slowest case {:.1} ms",
        start.elapsed().as_secs_f64(),
        slowest.get().as_secs_f64() * 1000.0
    );
}

// ---------------------------------------------------------------------------------------------
// Generators shared by the targets
// ---------------------------------------------------------------------------------------------

/// Arbitrary JSON, a few levels deep, with the awkward values (huge numbers, unicode, empty keys).
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        "\\PC{0,12}".prop_map(Value::String),
        prop_oneof![Just("paid"), Just("new"), Just(""), Just("é"), Just("a\nb")]
            .prop_map(|s| Value::String(s.into())),
    ];
    leaf.prop_recursive(6, 64, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    Just("status".to_string()),
                    Just("total".to_string()),
                    Just("items".to_string()),
                    Just("d".to_string()),
                    "\\PC{0,6}"
                ],
                inner,
                0..6
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// JSON nested `levels` deep (up to the 128 levels the row decoder admits, and beyond).
fn deep_value(levels: usize, object: bool) -> Value {
    let mut v = json!("leaf");
    for _ in 0..levels {
        v = if object {
            json!({ "d": v })
        } else {
            Value::Array(vec![v])
        };
    }
    v
}

fn image() -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        4 => json_value().prop_map(Some),
        1 => Just(None),
        1 => (0usize..140, any::<bool>()).prop_map(|(n, o)| Some(deep_value(n, o))),
        1 => (0usize..200_000).prop_map(|n| Some(json!({"status": "x".repeat(n), "items": [1, 2]}))),
    ]
}

fn event() -> impl Strategy<Value = ChangeEvent> {
    (
        image(),
        image(),
        prop_oneof![
            Just(Operation::Insert),
            Just(Operation::Update),
            Just(Operation::Delete),
            Just(Operation::Custom)
        ],
        proptest::option::of("\\PC{0,20}"),
        any::<i64>(),
        any::<u64>(),
    )
        .prop_map(
            |(data, before, operation, entity_id, pk, txid)| ChangeEvent {
                pk,
                id: uuid::Uuid::from_u128(u128::from(txid) << 7 | 5),
                created_at: Utc::now(),
                entity: "Order".into(),
                entity_id,
                operation,
                data,
                before,
                tenant_id: None,
                txid,
            },
        )
}

// ---------------------------------------------------------------------------------------------
// Conditions
// ---------------------------------------------------------------------------------------------

fn path_text() -> impl Strategy<Value = String> {
    let root = prop_oneof![
        Just("data"),
        Just("before"),
        Just("event"),
        Just("enrich"),
        Just("observer")
    ];
    let step = prop_oneof![
        Just(".status".to_string()),
        Just(".d".to_string()),
        Just(".items".to_string()),
        Just(".total".to_string()),
        Just(".id".to_string()),
        Just(".pk".to_string()),
        (0usize..3).prop_map(|i| format!("[{i}]")),
        Just("[18446744073709551616]".to_string()),
        Just("['odd key']".to_string()),
        Just("[\"d\"]".to_string()),
        "\\.[a-z_]{1,8}",
    ];
    (root, prop::collection::vec(step, 0..8)).prop_map(|(r, s)| format!("{r}{}", s.concat()))
}

fn literal_text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|i| i.to_string()),
        Just("18446744073709551615".to_string()),
        Just("99999999999999999999999999999999999999".to_string()),
        Just(format!("1{}", "0".repeat(400))),
        Just(format!("0.{}1", "0".repeat(400))),
        any::<f64>().prop_map(|f| format!("{f:?}")),
        "[a-zA-Z0-9 é\\\\']{0,16}"
            .prop_map(|s| format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))),
        (0usize..9_000).prop_map(|n| format!("'{}'", "y".repeat(n))),
        Just("true".to_string()),
        Just("false".to_string()),
        Just("null".to_string()),
    ]
}

/// Valid-ish condition source: mostly grammatical, sometimes not, nesting past the depth limit.
fn condition_text() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![path_text(), literal_text()];
    leaf.prop_recursive(80, 400, 8, |inner| {
        let op = prop_oneof![
            Just("=="),
            Just("!="),
            Just("<"),
            Just("<="),
            Just(">"),
            Just(">="),
            Just("&&"),
            Just("||")
        ];
        let func = prop_oneof![
            Just("contains"),
            Just("starts_with"),
            Just("ends_with"),
            Just("lower"),
            Just("upper"),
            Just("len"),
            Just("changed"),
            Just("nope")
        ];
        prop_oneof![
            (inner.clone(), op, inner.clone()).prop_map(|(a, o, b)| format!("{a} {o} {b}")),
            inner.clone().prop_map(|a| format!("({a})")),
            inner.clone().prop_map(|a| format!("!{a}")),
            (func, prop::collection::vec(inner.clone(), 0..3))
                .prop_map(|(f, args)| format!("{f}({})", args.join(", "))),
            (
                inner.clone(),
                any::<bool>(),
                prop::collection::vec(inner.clone(), 0..4)
            )
                .prop_map(|(n, neg, l)| format!(
                    "{n} {}in [{}]",
                    if neg { "not " } else { "" },
                    l.join(", ")
                )),
            prop::collection::vec(inner.clone(), 0..4).prop_map(|l| format!("[{}]", l.join(","))),
            // Long flat chains: `&&`/`||` are stored flat, so length must not mean depth.
            // Copies multiply, so the chain is shortened to keep the generated text (not the
            // parser: it refuses more than 10,000 characters at once) within ~100 KB; nested
            // chains of 2,000 once asked the generator for 2.6 GB.
            (inner, 2usize..2_000, any::<bool>()).prop_map(|(a, n, and)| {
                let n = n.min((100_000 / a.len().max(1)).max(1));
                vec![a; n].join(if and { " && " } else { " || " })
            }),
        ]
    })
}

/// Mutates text at the byte level (then back to a string), the way hand-edited input goes wrong.
fn mutated(source: impl Strategy<Value = String>) -> impl Strategy<Value = String> {
    (
        source,
        prop::collection::vec((any::<prop::sample::Index>(), 0u8..4, any::<u8>()), 0..6),
    )
        .prop_map(|(s, edits)| {
            let mut b = s.into_bytes();
            for (at, kind, byte) in edits {
                let i = at.index(b.len() + 1);
                match kind {
                    0 if i < b.len() => b[i] = byte,
                    1 if i < b.len() => {
                        b.remove(i);
                    }
                    2 => b.insert(i, byte),
                    _ => b.truncate(i),
                }
            }
            String::from_utf8_lossy(&b).into_owned()
        })
}

fn check_condition(src: &str, events: &[ChangeEvent]) -> Result<(), TestCaseError> {
    match Condition::parse(src) {
        Ok(c) => {
            for e in events {
                c.evaluate(&Scope::event(e));
            }
        }
        Err(e) => {
            prop_assert!(e.column >= 1, "{e}");
            prop_assert!(!e.message.is_empty());
        }
    }
    Ok(())
}

#[test]
fn condition_arbitrary_text() {
    fuzz(
        "condition_arbitrary_text",
        (any::<String>(), event()),
        |(src, ev)| check_condition(&src, &[ev]),
    );
}

#[test]
fn condition_structured() {
    fuzz(
        "condition_structured",
        (
            prop_oneof![3 => condition_text(), 1 => mutated(condition_text())],
            prop::collection::vec(event(), 1..3),
        ),
        |(src, evs)| check_condition(&src, &evs),
    );
}

// ---------------------------------------------------------------------------------------------
// Templates
// ---------------------------------------------------------------------------------------------

fn template_text() -> impl Strategy<Value = String> {
    let placeholder = (
        prop_oneof![
            path_text(),
            Just("data".to_string()),
            Just("before".to_string())
        ],
        prop::collection::vec(
            prop_oneof![
                Just(" | json".to_string()),
                Just(" | upper".to_string()),
                Just(" | lower".to_string()),
                Just(" | default(\"n/a\")".to_string()),
                Just(" | default('x')".to_string()),
                Just(" | default(1e999)".to_string()),
                Just(" | default(\"\\ud800\")".to_string()),
                Just(" | bogus".to_string()),
            ],
            0..4,
        ),
    )
        .prop_map(|(p, f)| format!("{{{{ {p}{} }}}}", f.concat()));
    let piece = prop_oneof![
        3 => placeholder,
        2 => "[ a-z{}\\[\\]\":,\\\\0-9]{0,10}",
        1 => Just("\\{{".to_string()),
        1 => Just("{{{".to_string()),
        1 => Just("}}".to_string()),
        1 => "\\PC{0,8}",
    ];
    prop_oneof![
        prop::collection::vec(piece.clone(), 0..20).prop_map(|p| p.concat()),
        // JSON bodies, the shape most templates have.
        prop::collection::vec((Just("\"k\": "), piece.clone()), 0..10).prop_map(|kv| {
            let items: Vec<String> = kv.into_iter().map(|(k, v)| format!("{k}{v}")).collect();
            format!("{{{}}}", items.join(", "))
        }),
        prop::collection::vec(piece, 0..6).prop_map(|p| format!(
            "{{\"s\": \"{}\", \"v\": [{}]}}",
            p.concat(),
            p.concat()
        )),
    ]
}

fn target() -> impl Strategy<Value = Target> {
    prop_oneof![
        Just(Target::Text),
        Just(Target::Json),
        Just(Target::UrlComponent),
        Just(Target::Header),
        Just(Target::Glob)
    ]
}

fn check_template(src: &str, target: Target, ev: &ChangeEvent) -> Result<(), TestCaseError> {
    let Ok(t) = Template::parse(src, target) else {
        return Ok(());
    };
    let scope = Scope {
        event: ev,
        observer: Some("obs"),
        idempotency_key: Some("key"),
        enrich: None,
    };
    if let Ok(out) = t.render(&scope) {
        prop_assert!(out.len() <= MAX_RENDERED_BYTES, "{} bytes", out.len());
        match target {
            Target::Json => prop_assert!(
                serde_json::from_str::<serde::de::IgnoredAny>(&out).is_ok(),
                "rendered JSON does not parse: {out}"
            ),
            Target::Header => prop_assert!(
                !out.contains(['\r', '\n', '\0']),
                "header with CR/LF/NUL: {out:?}"
            ),
            Target::UrlComponent | Target::Text | Target::Glob => {}
        }
    }
    Ok(())
}

#[test]
fn template_arbitrary_text() {
    fuzz(
        "template_arbitrary_text",
        (any::<String>(), target(), event()),
        |(src, target, ev)| check_template(&src, target, &ev),
    );
}

#[test]
fn template_structured() {
    fuzz(
        "template_structured",
        (
            prop_oneof![3 => template_text(), 1 => mutated(template_text())],
            target(),
            event(),
        ),
        |(src, target, ev)| check_template(&src, target, &ev),
    );
}

/// A template that repeats a big value many times would multiply the event's size; the renderer
/// stops at [`MAX_RENDERED_BYTES`] with an error instead.
#[test]
fn template_output_is_capped() {
    let src = "{{ data | json }}".repeat(5_000);
    let ev = ChangeEvent {
        pk: 1,
        id: uuid::Uuid::nil(),
        created_at: Utc::now(),
        entity: "Order".into(),
        entity_id: Some("1".into()),
        operation: Operation::Insert,
        data: Some(json!({ "blob": "x".repeat(1 << 20) })),
        before: None,
        tenant_id: None,
        txid: 1,
    };
    // Text only: every target goes through the same check, and producing the 64 MiB that are
    // allowed is slow in a debug build (5 s for text, twice that for the escaping targets).
    let t = Template::parse(&src, Target::Text).unwrap();
    let t0 = Instant::now();
    let err = t.render(&Scope::event(&ev)).unwrap_err();
    assert!(err.0.contains("rendered"), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(60), "{:?}", t0.elapsed());
}

// ---------------------------------------------------------------------------------------------
// The config loader
// ---------------------------------------------------------------------------------------------

const GOOD_TOML: &str = r#"
[database]
url = "postgres://postgres@127.0.0.1:5432/app"

[listener]
id = "orders"
batch_size = 500

[features]
checkpoint = true

[[observers]]
name = "paid"
entity = "Order"
events = ["INSERT", "UPDATE"]
condition = "data.status == 'paid' && changed('status')"

  [[observers.actions]]
  type = "webhook"
  url = "https://example.com/hooks/{{ data.id }}"
  body = '{"id": {{ data.id }}, "s": "{{ data.status | upper }}"}'
  retry = { max_attempts = 5, backoff = "exponential", initial_ms = 200, max_ms = 30000 }

  [[observers.actions]]
  type = "log"
"#;

const GOOD_YAML: &str = r#"
database:
  url: postgres://postgres@127.0.0.1:5432/app
listener:
  id: orders
observers:
  - name: paid
    entity: Order
    events: [INSERT, UPDATE]
    condition: "data.status == 'paid'"
    actions:
      - type: webhook
        url: "https://example.com/hooks"
        retry: &r {max_attempts: 3}
      - type: log
"#;

fn env_key() -> impl Strategy<Value = String> {
    let seg = prop_oneof![
        Just("LISTENER".to_string()),
        Just("BATCH_SIZE".to_string()),
        Just("FEATURES".to_string()),
        Just("DEDUP".to_string()),
        Just("OBSERVERS".to_string()),
        Just("OBSERVERS[0]".to_string()),
        Just("OBSERVERS[4000000000]".to_string()),
        Just("OBSERVERS[-9000000000]".to_string()),
        Just("X[".to_string()),
        Just("".to_string()),
        "[A-Za-z0-9_\\[\\]\\.\\-]{0,10}",
    ];
    prop::collection::vec(seg, 1..5).prop_map(|s| format!("OBSERVER__{}", s.join("__")))
}

fn env_value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("true".to_string()),
        Just("0".to_string()),
        Just("-1".to_string()),
        Just("99999999999999999999".to_string()),
        Just("${env:NOPE}".to_string()),
        "\\PC{0,16}",
    ]
}

/// Whether text looks like YAML to the loader (by file extension).
fn check_config(text: &str, yaml: bool, env: Vec<(String, String)>) -> Result<(), TestCaseError> {
    let dir = std::env::temp_dir().join(format!("obs-fuzz-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let name = format!(
        "{:?}.{}",
        std::thread::current().id(),
        if yaml { "yaml" } else { "toml" }
    )
    .replace(|c: char| !c.is_ascii_alphanumeric() && c != '.', "_");
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    if let Ok(cfg) = load_with_env(Some(&path), env) {
        let _ = cfg.check();
        let _ = Observers::compile_with(&cfg, observer_core::action::Secrets::Unresolved);
    }
    Ok(())
}

#[test]
fn config_arbitrary_text() {
    fuzz(
        "config_arbitrary_text",
        (any::<String>(), any::<bool>()),
        |(text, yaml)| check_config(&text, yaml, vec![]),
    );
}

#[test]
fn config_mutated_files_and_env() {
    fuzz(
        "config_mutated_files_and_env",
        (
            prop_oneof![
                mutated(Just(GOOD_TOML.to_string())).prop_map(|t| (t, false)),
                mutated(Just(GOOD_YAML.to_string())).prop_map(|t| (t, true)),
            ],
            prop::collection::vec((env_key(), env_value()), 0..4),
        ),
        |((text, yaml), env)| check_config(&text, yaml, env),
    );
}

/// Regression: nesting and alias expansion that the config crate would follow without limit.
/// Before the fix, the ten-line alias file below ("billion laughs") made the loader allocate
/// until the process died, and an index in an environment override made it allocate 384 GB.
#[test]
fn config_pathological_files_are_errors() {
    let try_load = |text: &str, yaml: bool| {
        let dir = std::env::temp_dir().join(format!("obs-fuzz-patho-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(if yaml { "c.yaml" } else { "c.toml" });
        std::fs::write(&path, text).unwrap();
        let t0 = Instant::now();
        let r = load_with_env(Some(&path), []);
        assert!(t0.elapsed() < CASE_LIMIT, "{:?}", t0.elapsed());
        r.map(|_| ()).map_err(|e| e.to_string())
    };
    let load = |text: &str, yaml: bool| try_load(text, yaml).unwrap_err();
    let deep_toml = format!("x = {}1{}", "[".repeat(100_000), "]".repeat(100_000));
    assert!(load(&deep_toml, false).contains("recurs"));
    let deep_toml_tables = format!("x = {}1{}", "{a = ".repeat(100_000), "}".repeat(100_000));
    assert!(load(&deep_toml_tables, false).contains("recurs"));
    let deep_yaml = format!("x: {}1{}", "[".repeat(100_000), "]".repeat(100_000));
    // yaml-rust2's own limit (128) answers flow style first; ours (64) block style.
    let e = load(&deep_yaml, true);
    assert!(e.contains("recursion limit exceeded"), "{e}");
    let deep_yaml_block: String = (0..20_000)
        .map(|i| format!("{}- \n", " ".repeat(i)))
        .collect();
    let e = load(&deep_yaml_block, true);
    assert!(e.contains("nested more than 64 levels"), "{e}");
    let mut laughs = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 1..10 {
        let refs = vec![format!("*a{}", i - 1); 10].join(", ");
        laughs.push_str(&format!("a{i}: &a{i} [{refs}]\n"));
    }
    let e = load(&laughs, true);
    assert!(e.contains("expands to more than 1000000 values"), "{e}");
    // A modest use of aliases still loads.
    try_load(GOOD_YAML, true).unwrap();

    for key in [
        "OBSERVER__OBSERVERS[4000000000]__NAME",
        "OBSERVER__OBSERVERS[-4000000000]__NAME",
        "OBSERVER__LISTENER[",
        "OBSERVER____ID",
    ] {
        let err = load_with_env(None, [(key.to_string(), "x".to_string())]).unwrap_err();
        assert!(err.to_string().contains(key), "{err}");
    }
    let ok = load_with_env(
        None,
        [(
            "OBSERVER__LISTENER__BATCH_SIZE".to_string(),
            "7".to_string(),
        )],
    )
    .unwrap();
    assert_eq!(ok.listener.batch_size, 7);
}

// ---------------------------------------------------------------------------------------------
// The change-log row decoder
// ---------------------------------------------------------------------------------------------

/// Column values as a `RawRow` borrows them.
#[derive(Debug, Clone)]
struct Columns {
    pk: i64,
    cols: [Option<Vec<u8>>; 9],
}

fn text_bytes(valid: impl Strategy<Value = String>) -> impl Strategy<Value = Option<Vec<u8>>> {
    prop_oneof![
        4 => valid.prop_map(|s| Some(s.into_bytes())),
        1 => Just(None),
        // Any bytes but NUL, which no Postgres text value can hold.
        1 => prop::collection::vec(1u8.., 0..40).prop_map(Some),
        1 => (0usize..3000).prop_map(|n| Some(vec![b'7'; n])),
    ]
}

fn json_bytes() -> impl Strategy<Value = Option<Vec<u8>>> {
    prop_oneof![
        4 => json_value().prop_map(move |v| Some(v.to_string().into_bytes())),
        2 => Just(None),
        1 => (100usize..20_000).prop_map(move |n| Some(
            format!("{}1{}", "[".repeat(n), "]".repeat(n)).into_bytes()
        )),
        1 => (0usize..200).prop_map(move |n| Some(deep_value(n, true).to_string().into_bytes())),
        1 => prop::collection::vec(any::<u8>(), 0..40).prop_map(Some),
        1 => (prop::collection::vec(any::<u8>(), 0..20)).prop_map(move |b| {
            let mut t = b"{\"s\": \"".to_vec();
            t.extend(b);
            t.extend(b"\"}");
            Some(t)
        }),
    ]
}

fn timestamp_bytes() -> impl Strategy<Value = Option<Vec<u8>>> {
    prop_oneof![
        4 => (-1i64 << 50..1i64 << 50).prop_map(|t| Some(t.to_be_bytes().to_vec())),
        1 => prop_oneof![Just(i64::MAX), Just(i64::MIN), any::<i64>()]
            .prop_map(|t| Some(t.to_be_bytes().to_vec())),
        1 => Just(None),
        1 => prop::collection::vec(any::<u8>(), 0..12).prop_map(Some),
    ]
}

fn columns() -> impl Strategy<Value = Columns> {
    let uuid = || {
        prop_oneof![
            any::<u128>().prop_map(|u| uuid::Uuid::from_u128(u).to_string()),
            "\\PC{0,40}",
        ]
    };
    let op = prop_oneof![
        Just("INSERT".to_string()),
        Just("update".to_string()),
        Just(" DELETE ".to_string()),
        Just("CUSTOM".to_string()),
        Just("UPSERT".to_string()),
        "\\PC{0,10}",
    ];
    (
        any::<i64>(),
        text_bytes(uuid()),
        timestamp_bytes(),
        text_bytes(prop_oneof![
            Just("Order".to_string()),
            Just(" ".to_string()),
            "\\PC{0,12}"
        ]),
        text_bytes(prop_oneof![
            any::<u32>().prop_map(|i| i.to_string()),
            "\\PC{0,12}"
        ]),
        text_bytes(op),
        json_bytes(),
        json_bytes(),
        text_bytes(uuid()),
        text_bytes(prop_oneof![
            any::<u64>().prop_map(|i| i.to_string()),
            "\\PC{0,8}"
        ]),
    )
        .prop_map(|(pk, id, ca, ot, oi, mt, od, odb, tid, txid)| Columns {
            pk,
            cols: [id, ca, ot, oi, mt, od, odb, tid, txid],
        })
}

fn check_row(c: &Columns) -> Result<(), TestCaseError> {
    let col = |i: usize| c.cols[i].as_deref();
    let raw = RawRow {
        pk: c.pk,
        id: col(0),
        created_at: col(1),
        object_type: col(2),
        object_id: col(3),
        modification_type: col(4),
        object_data: col(5),
        object_data_before: col(6),
        tenant_id: col(7),
        txid: col(8),
    };
    match decode(&raw) {
        ChangeRow::Event(e) => {
            prop_assert_eq!(e.pk, c.pk);
            prop_assert!(!e.entity.trim().is_empty());
            prop_assert!(e.entity_id.is_some() || e.operation == Operation::Custom);
            // What an action sends must serialise.
            serde_json::to_vec(&e.envelope("o")).map_err(|e| TestCaseError::fail(e.to_string()))?;
        }
        ChangeRow::Poison {
            pk, reason, raw: r, ..
        } => {
            prop_assert_eq!(pk, c.pk);
            prop_assert!(!reason.is_empty());
            // The dead letter stores `raw` in a jsonb column, which refuses NUL characters.
            let text = serde_json::to_string(&r).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert!(!text.contains("\\u0000"), "{text}");
        }
    }
    // The dead-letter view of any row must serialise too.
    serde_json::to_string(&raw_json(&raw)).map_err(|e| TestCaseError::fail(e.to_string()))?;
    Ok(())
}

#[test]
fn change_log_row_decoder() {
    fuzz("change_log_row_decoder", columns(), |c| check_row(&c));
}
