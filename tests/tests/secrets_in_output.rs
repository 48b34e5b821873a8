//! Secrets never appear in what the daemon and the CLI print: the daemon runs at `RUST_LOG=trace`
//! (every crate, the noisiest setting an operator can choose) through deliveries, retries,
//! dead letters, connection failures and a lost database, and then `status`, `dlq list|show|
//! retry`, `debug-event` and `validate` run over the result. Every byte they print is searched
//! for every secret.

use std::time::Duration;

use observer_tests::*;

/// A random token that cannot occur by chance.
fn token(label: &str) -> String {
    format!("{label}{}", uuid::Uuid::new_v4().simple())
}

struct Secrets {
    webhook: String,
    webhook_key: String,
    bearer: String,
    file_key: String,
    url_token: String,
    slack_path: String,
    db_password: String,
}

impl Secrets {
    fn new() -> Secrets {
        use base64::Engine;
        let key = token("k");
        let webhook_key = base64::engine::general_purpose::STANDARD.encode(key.as_bytes());
        Secrets {
            webhook: format!("whsec_{webhook_key}"),
            webhook_key,
            bearer: token("bearer"),
            file_key: token("filekey"),
            url_token: token("urltoken"),
            slack_path: token("slackpath"),
            db_password: token("dbpw"),
        }
    }

    fn all(&self) -> Vec<(&'static str, &str)> {
        vec![
            ("webhook secret", &self.webhook),
            ("webhook key", &self.webhook_key),
            ("bearer token", &self.bearer),
            ("file secret", &self.file_key),
            ("URL token", &self.url_token),
            ("Slack URL", &self.slack_path),
            ("database password", &self.db_password),
        ]
    }

    fn assert_absent(&self, what: &str, text: &str) {
        for (name, secret) in self.all() {
            assert!(
                !text.contains(secret),
                "the {name} appears in {what}:\n{}",
                excerpt(text, secret)
            );
        }
    }
}

fn excerpt(text: &str, needle: &str) -> String {
    let i = text.find(needle).unwrap_or(0);
    let mut from = i.saturating_sub(300);
    while !text.is_char_boundary(from) {
        from -= 1;
    }
    let mut to = (i + needle.len() + 300).min(text.len());
    while !text.is_char_boundary(to) {
        to += 1;
    }
    text[from..to].to_string()
}

/// `postgres://postgres:PASSWORD@host/db` for the test database (trust auth ignores it).
fn url_with_password(url: &str, password: &str) -> String {
    url.replacen(
        "postgres://postgres@",
        &format!("postgres://postgres:{password}@"),
        1,
    )
}

#[tokio::test]
async fn no_secret_reaches_logs_or_cli_output() {
    let db = TestDb::new().await;
    assert!(db.url.starts_with("postgres://postgres@"), "{}", db.url);
    let rx = Receiver::start().await;
    rx.set_path_status("/fail", 500);
    let s = Secrets::new();
    let key_file = db.write_file("api-key", &format!("{}\n", s.file_key));
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let retry = r#"retry = { max_attempts = 2, backoff = "fixed", initial_ms = 50, max_ms = 100 }"#;
    let webhook = |name: &str, url: String| {
        format!(
            "[[observers]]\nname = \"{name}\"\nentity = \"Order\"\n\n  [[observers.actions]]\n  type = \"webhook\"\n  \
             url = \"{url}\"\n  secret = \"${{env:OBS_T_WEBHOOK_SECRET}}\"\n  {retry}\n  timeout_ms = 2000\n  \
             headers = {{ Authorization = \"Bearer ${{env:OBS_T_BEARER}}\", X-Api-Key = \"${{file:{}}}\" }}\n\n",
            key_file.display()
        )
    };
    let slack = |name: &str, env: &str| {
        format!(
            "[[observers]]\nname = \"{name}\"\nentity = \"Order\"\n\n  [[observers.actions]]\n  type = \"slack\"\n  \
             webhook_url = \"${{env:{env}}}\"\n  text = \"order {{{{ data.id }}}}\"\n  {retry}\n\n"
        )
    };
    let observers = [
        webhook("ok", rx.url("/ok?token=${env:OBS_T_URL_TOKEN}")),
        webhook("fails", rx.url("/fail?token=${env:OBS_T_URL_TOKEN}")),
        webhook(
            "unreachable",
            format!("http://{closed}/hook?token=${{env:OBS_T_URL_TOKEN}}"),
        ),
        slack("slack-ok", "OBS_T_SLACK_OK"),
        slack("slack-fails", "OBS_T_SLACK_FAIL"),
    ]
    .concat();
    let config = db
        .config(&observers)
        .replacen(&db.url, "${env:OBS_T_DATABASE_URL}", 1);
    let db_url = url_with_password(&db.url, &s.db_password);
    let env: Vec<(&str, String)> = vec![
        ("RUST_LOG", "trace".into()),
        ("OBS_T_WEBHOOK_SECRET", s.webhook.clone()),
        ("OBS_T_BEARER", s.bearer.clone()),
        ("OBS_T_URL_TOKEN", s.url_token.clone()),
        (
            "OBS_T_SLACK_OK",
            rx.url(&format!("/slack/{}", s.slack_path)),
        ),
        (
            "OBS_T_SLACK_FAIL",
            format!("http://{closed}/services/{}", s.slack_path),
        ),
        ("OBS_T_DATABASE_URL", db_url.clone()),
    ];
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();

    let mut d = Daemon::start_with_env(&db, &config, &env_refs).await;
    for id in 1..=3 {
        db.insert_order(id, "new", 10.0).await;
    }
    // 3 events × (ok + slack-ok) delivered; fails, unreachable and slack-fails dead-lettered.
    rx.wait_until(Duration::from_secs(60), "the deliveries", |r| {
        r.iter()
            .filter(|q| q.status == 204 || q.status == 200)
            .count()
            >= 6
    })
    .await;
    eventually(Duration::from_secs(60), "9 dead letters", || async {
        (db.dead_letters().await.len() == 9).then_some(())
    })
    .await;
    db.wait_caught_up("test", Duration::from_secs(30)).await;
    // The receiver did get the secrets: they were resolved and used, not dropped.
    let got = rx.requests_to("/ok");
    assert!(got[0].header("authorization") == Some(&format!("Bearer {}", s.bearer)[..]));
    assert!(got[0].header("x-api-key") == Some(&s.file_key[..]));
    d.stop().await;
    s.assert_absent("the daemon's trace log", &d.logs());

    // The CLI over what the run left behind.
    let config_path = db.write_file("secrets.toml", &config);
    let cfg = config_path.to_str().unwrap();
    let letters = db.dead_letters().await;
    let first_letter = letters[0]["id"].to_string();
    let event_id = letters[0]["event_id"].as_str().unwrap().to_string();
    let mut commands: Vec<Vec<String>> = vec![
        vec!["status".into()],
        vec!["status".into(), "--json".into()],
        vec!["dlq".into(), "list".into()],
        vec!["dlq".into(), "list".into(), "--json".into()],
        vec!["dlq".into(), "stats".into()],
        vec!["debug-event".into(), event_id.clone()],
        vec!["debug-event".into(), "--history".into(), "10".into()],
        vec!["validate".into(), cfg.into()],
        vec!["dlq".into(), "retry".into(), first_letter.clone()],
    ];
    for l in &letters {
        commands.push(vec!["dlq".into(), "show".into(), l["id"].to_string()]);
        commands.push(vec![
            "dlq".into(),
            "show".into(),
            l["id"].to_string(),
            "--json".into(),
        ]);
    }
    for args in commands {
        let mut c = command();
        c.arg("--config").arg(cfg).args(&args);
        for (k, v) in &env_refs {
            c.env(k, v);
        }
        let out = c.output().await.expect("run the CLI");
        let text = output_text(&out);
        assert!(
            out.status.success() || args[0] == "dlq" && args[1] == "retry",
            "{args:?} failed: {text}"
        );
        s.assert_absent(&format!("the output of {args:?}"), &text);
    }
    // The dead-letter table itself keeps references, not values.
    let stored = db.json_rows("SELECT * FROM observer_dead_letters").await;
    s.assert_absent(
        "the dead-letter table",
        &serde_json::to_string(&stored).unwrap(),
    );

    // A database that cannot be reached: the daemon waits and says where, never with the password.
    let gone = url_with_password(&url_with_db(&db.url, "no_such_db"), &s.db_password).replacen(
        "127.0.0.1:5432",
        &closed.to_string(),
        1,
    );
    let mut env_gone = env_refs.clone();
    env_gone.retain(|(k, _)| *k != "OBS_T_DATABASE_URL");
    env_gone.push(("OBS_T_DATABASE_URL", &gone));
    let mut d = Daemon::spawn(&db.dir, &config, &env_gone).expect("spawn");
    d.wait_log("cannot connect to the database", Duration::from_secs(20))
        .await;
    d.kill9().await;
    s.assert_absent(
        "the log of a daemon that cannot reach its database",
        &d.logs(),
    );
    for args in [vec!["status"], vec!["dlq", "list"]] {
        let mut c = command();
        c.arg("--config").arg(cfg).args(&args);
        for (k, v) in &env_gone {
            c.env(k, v);
        }
        let out = c.output().await.expect("run the CLI");
        assert!(!out.status.success(), "{args:?} should fail");
        s.assert_absent(&format!("{args:?} without a database"), &output_text(&out));
    }
}

/// Issue 18, item 6: a resolved secret is literal text. One holding `{{ … }}` is neither read as
/// a placeholder (so `validate` and `run` accept it and never quote it in an error) nor
/// substituted: the receiver gets it byte for byte, in a header and in the URL.
#[tokio::test]
async fn resolved_secrets_are_literal_text_not_templates() {
    let db = TestDb::new().await;
    let rx = Receiver::start().await;
    let env_secret = format!("{{{{ {} }}}}", token("tplenv"));
    let file_secret = format!("abc{{{{ data.id }}}}{}", token("tplfile"));
    let path_secret = format!("p{{{{ data.id }}}}{}", token("tplpath"));
    let file = db.write_file("tpl-secret", &format!("{file_secret}\n"));
    let observers = webhook_observer(
        "tpl",
        "Order",
        &rx.url("/tpl/${env:OBS_T_TPL_PATH}"),
        "",
        &format!(
            "  headers = {{ X-Api-Auth = \"${{env:OBS_T_TPL}}\", X-File = \"${{file:{}}}\" }}",
            file.display()
        ),
    );
    let config = db.config(&observers);
    let env = [
        ("OBS_T_TPL", env_secret.as_str()),
        ("OBS_T_TPL_PATH", path_secret.as_str()),
    ];
    let leaked = |text: &str| {
        ["tplenv", "tplfile", "tplpath"]
            .into_iter()
            .find(|t| text.contains(t))
    };

    let cfg = db.write_file("tpl.toml", &config);
    let mut c = command();
    c.arg("validate").arg(&cfg).envs(env);
    let out = c.output().await.expect("run validate");
    let text = output_text(&out);
    assert!(
        out.status.success(),
        "validate read a secret as a template: {text}"
    );
    assert_eq!(leaked(&text), None, "validate printed a secret: {text}");

    let mut d = Daemon::start_with_env(&db, &config, &env).await;
    db.insert_order(7, "new", 1.0).await;
    let got = rx.wait_for(1, Duration::from_secs(30)).await;
    d.stop().await;
    assert_eq!(got[0].header("x-api-auth"), Some(env_secret.as_str()));
    assert_eq!(got[0].header("x-file"), Some(file_secret.as_str()));
    assert_eq!(
        percent_decode(&got[0].path),
        format!("/tpl/{path_secret}"),
        "the URL secret was substituted as a template"
    );
    assert_eq!(leaked(&d.logs()), None, "the daemon logged a secret");
}

/// Issue 18, item 7: literal header values and literal query values of a webhook are not stored
/// with its dead letters nor shown by `dlq show`/`debug-event`, while `dlq retry` (which
/// compiles the action from the current config) still sends them.
#[tokio::test]
async fn literal_header_values_and_query_tokens_are_redacted_and_retry_still_sends_them() {
    let db = TestDb::new().await;
    let rx = Receiver::start().await;
    rx.set_path_status("/lit", 500);
    let auth = token("litauth");
    let team = token("litteam");
    let query = token("litquery");
    let observers = webhook_observer(
        "lit",
        "Order",
        &rx.url(&format!("/lit?token={query}&id={{{{ data.id }}}}")),
        "",
        &format!("  headers = {{ X-Api-Auth = \"{auth}\", X-Team = \"{team}\" }}"),
    );
    let config = db.config(&observers);
    let mut d = Daemon::start(&db, &config).await;
    db.insert_order(1, "new", 1.0).await;
    eventually(Duration::from_secs(60), "the dead letter", || async {
        (db.dead_letters().await.len() == 1).then_some(())
    })
    .await;
    db.wait_caught_up("test", Duration::from_secs(30)).await;
    d.stop().await;
    assert_eq!(
        rx.requests_to("/lit")[0].header("x-api-auth"),
        Some(auth.as_str())
    );

    let letter = &db.dead_letters().await[0];
    let id = letter["id"].to_string();
    let event_id = letter["event_id"].as_str().unwrap_or_default().to_string();
    let mut shown = vec![(
        "the dead-letter table".to_string(),
        serde_json::to_string(&db.json_rows("SELECT * FROM observer_dead_letters").await)
            .unwrap_or_default(),
    )];
    for args in [
        vec!["dlq", "show", id.as_str()],
        vec!["dlq", "show", id.as_str(), "--json"],
        vec!["debug-event", event_id.as_str()],
        vec!["debug-event", event_id.as_str(), "--json"],
    ] {
        let out = db.cli_with(&config, &args).await;
        assert!(out.status.success(), "{args:?}: {}", output_text(&out));
        shown.push((format!("{args:?}"), output_text(&out)));
    }
    for (what, text) in &shown {
        for (name, value) in [("header", &auth), ("header", &team), ("query", &query)] {
            assert!(
                !text.contains(value.as_str()),
                "a literal {name} value appears in {what}:\n{}",
                excerpt(text, value)
            );
        }
    }
    // What is shown still says which header and parameter were set, and what was templated.
    let show = &shown[1].1;
    assert!(
        show.contains("X-Api-Auth") && show.contains("token=") && show.contains("{{ data.id }}"),
        "{show}"
    );

    rx.set_path_status("/lit", 204);
    let out = db.cli_with(&config, &["dlq", "retry", &id]).await;
    assert!(out.status.success(), "dlq retry: {}", output_text(&out));
    let retried = rx.requests_to("/lit");
    let last = retried.last().expect("the retried request");
    assert_eq!(last.status, 204);
    assert_eq!(last.header("x-api-auth"), Some(auth.as_str()));
    assert_eq!(last.header("x-team"), Some(team.as_str()));
    assert_eq!(
        last.query.as_deref(),
        Some(&format!("token={query}&id=1")[..])
    );
}
