//! The daemon under a least-privilege role: exactly the grants docs/security.md lists (read from
//! the document, so the two cannot drift), a missing grant named at start, and row-level
//! security on the change log (refused when it would hide every row, warned about when policies
//! filter, fine with BYPASSRLS or ownership).

use std::time::Duration;

use observer_tests::*;

/// The ```sql block after the `grants:daemon` marker in docs/security.md.
fn documented_grants() -> String {
    let doc = std::fs::read_to_string(workspace_root().join("docs/security.md"))
        .expect("read docs/security.md");
    let from = doc
        .find("<!-- grants:daemon")
        .expect("docs/security.md has the grants:daemon marker");
    let rest = &doc[from..];
    let start = rest
        .find("```sql\n")
        .expect("a ```sql block after the marker")
        + 7;
    let end = rest[start..].find("```").expect("the block ends") + start;
    rest[start..end].to_string()
}

/// A login role for one test, with the documented grants on `db` (optionally without one
/// statement). Dropped (with what it owns and was granted in `db`) on drop.
struct Role {
    name: String,
    db_url: String,
}

impl Role {
    async fn create(db: &TestDb, skip: Option<&str>) -> Role {
        let name = format!("obs_role_{}", &db.name["obs_test_".len()..]);
        let mut sql = documented_grants().replace("observer_daemon", &name);
        if let Some(skip) = skip {
            let line = sql
                .lines()
                .find(|l| l.contains(skip))
                .unwrap_or_else(|| panic!("no grant line containing {skip:?}"))
                .to_string();
            sql = sql.replace(&line, "");
        }
        db.exec(&sql).await;
        Role {
            name,
            db_url: db.url.clone(),
        }
    }

    /// `url` (the test database's) logging in as this role instead.
    fn url(&self, url: &str) -> String {
        let (scheme, rest) = url.split_once("://").expect("postgres://…");
        let host = rest.split_once('@').map(|(_, h)| h).unwrap_or(rest);
        format!("{scheme}://{}@{host}", self.name)
    }
}

impl Drop for Role {
    fn drop(&mut self) {
        let name = self.name.clone();
        let db_url = self.db_url.clone();
        let cleanup = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                for (url, sql) in [
                    (db_url, format!("DROP OWNED BY {name}")),
                    (admin_url(), format!("DROP ROLE IF EXISTS {name}")),
                ] {
                    if let Ok((client, conn)) =
                        tokio_postgres::connect(&url, tokio_postgres::NoTls).await
                    {
                        tokio::spawn(conn);
                        let _ = client.batch_execute(&sql).await;
                    }
                }
            });
        });
        let _ = cleanup.join();
    }
}

/// The test's usual config, logging in as `role`, with retention running every second so its
/// DELETE grants are exercised.
fn config_as(db: &TestDb, role: &Role, observers: &str) -> String {
    config_with(db, role, "", observers)
}

/// [`config_as`] with a `[features]` body.
fn config_with(db: &TestDb, role: &Role, features: &str, observers: &str) -> String {
    let config = db.config(&format!(
        "[features]\n{features}\n\n[retention]\ninterval_secs = 1\naction_log_days = 1\ndead_letter_days = 1\nchange_log_days = 1\n\n{observers}"
    ));
    config.replacen(&db.url, &role.url(&db.url), 1)
}

fn observers(rx: &Receiver) -> String {
    format!(
        "{}{}",
        webhook_observer("ok", "Order", &rx.url("/ok"), "", ""),
        webhook_observer("bad", "Order", &rx.url("/bad"), "", "")
    )
}

/// Runs the daemon until it exits (it is expected to refuse to start) and returns its log.
async fn refused(db: &TestDb, config: &str) -> String {
    let mut d = Daemon::spawn(&db.dir, config, &[]).expect("spawn");
    let status = d
        .wait_exit(Duration::from_secs(30))
        .await
        .expect("the daemon exits");
    let logs = d.logs();
    assert!(!status.success(), "expected a failed start; log:\n{logs}");
    logs
}

#[tokio::test]
async fn runs_with_exactly_the_documented_grants() {
    documented_grants_suffice("").await;
}

/// The search layer's audit trail is written, and purged by retention, with its documented grants.
#[tokio::test]
async fn runs_with_the_documented_grants_with_the_search_layer_on() {
    documented_grants_suffice("search = true").await;
}

async fn documented_grants_suffice(features: &str) {
    let db = TestDb::new().await;
    let rx = Receiver::start().await;
    rx.set_path_status("/bad", 400);
    let role = Role::create(&db, None).await;
    let mut d = Daemon::start(&db, &config_with(&db, &role, features, &observers(&rx))).await;
    for id in 1..=5 {
        db.insert_order(id, "new", 10.0).await;
    }
    rx.wait_until(Duration::from_secs(30), "5 deliveries to /ok", |r| {
        r.iter().filter(|q| q.path == "/ok").count() >= 5
    })
    .await;
    eventually(Duration::from_secs(30), "5 dead letters", || async {
        (db.dead_letters().await.len() == 5).then_some(())
    })
    .await;
    db.wait_caught_up("test", Duration::from_secs(30)).await;
    if features.contains("search") {
        let rows = db
            .json_rows("SELECT count(*) AS n FROM observer_audit")
            .await;
        assert_eq!(rows[0]["n"], 5, "one audit row per event: {rows:?}");
    }
    // A retention pass (every second) has run with the role's DELETE grants.
    d.wait_log("retention", Duration::from_secs(10)).await;
    let logs = d.logs();
    assert!(
        !logs.contains("permission denied") && !logs.contains("lacks"),
        "the daemon hit a privilege error; log:\n{logs}"
    );
    assert!(d.try_status().is_none(), "daemon exited; log:\n{logs}");
    // Read-only operator commands work with the same role.
    let config = db.write_file("as-role.toml", &config_as(&db, &role, ""));
    for args in [vec!["status"], vec!["dlq", "list"], vec!["dlq", "stats"]] {
        let mut full = vec!["--config", config.to_str().unwrap()];
        full.extend(args.iter().copied());
        let out = run_cli(&full).await;
        assert!(
            out.status.success(),
            "{args:?} as the daemon role: {}",
            output_text(&out)
        );
    }
    d.stop().await;
}

#[tokio::test]
async fn a_missing_grant_is_named_at_start() {
    let db = TestDb::new().await;
    let rx = Receiver::start().await;
    let role = Role::create(&db, Some("SELECT, INSERT ON public.observer_dead_letters")).await;
    let logs = refused(&db, &config_as(&db, &role, &observers(&rx))).await;
    assert!(
        logs.contains("INSERT on public.observer_dead_letters (dead-lettering failed actions)")
            && logs.contains("GRANT INSERT ON \"public\".\"observer_dead_letters\""),
        "log should name the missing grant and how to give it:\n{logs}"
    );
    assert!(
        !logs.contains("restarting from the checkpoint"),
        "a missing grant must not crash-loop:\n{logs}"
    );
}

#[tokio::test]
async fn row_level_security_on_the_change_log() {
    let db = TestDb::new().await;
    let rx = Receiver::start().await;
    let role = Role::create(&db, None).await;
    let obs = webhook_observer("ok", "Order", &rx.url("/ok"), "", "");
    let config = config_as(&db, &role, &obs);
    db.exec("ALTER TABLE tb_entity_change_log ENABLE ROW LEVEL SECURITY")
        .await;
    db.insert_order(1, "new", 1.0).await;
    db.insert_order(2, "paid", 2.0).await;

    // No policy: every row hidden → refused, saying what to do.
    let logs = refused(&db, &config).await;
    assert!(
        logs.contains("row-level security is enabled on public.tb_entity_change_log")
            && logs.contains("can see none of its rows")
            && logs.contains("BYPASSRLS"),
        "{logs}"
    );

    // A policy that filters: starts, warns naming the policy, delivers what it can see.
    db.exec(&format!(
        "CREATE POLICY only_paid ON tb_entity_change_log FOR SELECT TO {} \
         USING (object_data->>'status' = 'paid')",
        role.name
    ))
    .await;
    let mut d = Daemon::start(&db, &config).await;
    let logs = d.logs();
    assert!(
        logs.contains("row-level security policies (only_paid) filter what role"),
        "{logs}"
    );
    rx.wait_for(1, Duration::from_secs(30)).await;
    d.stop().await;
    assert_eq!(rx.count(), 1, "only the visible event is delivered");

    // BYPASSRLS: every event, no warning.
    db.exec(&format!("ALTER ROLE {} BYPASSRLS", role.name))
        .await;
    db.exec("DELETE FROM observer_checkpoints").await;
    let mut d = Daemon::start(&db, &config).await;
    rx.wait_for(3, Duration::from_secs(30)).await;
    assert!(!d.logs().contains("row-level security"), "{}", d.logs());
    d.stop().await;

    // Ownership (RLS not forced) works as well; forcing it on the owner is refused again.
    db.exec(&format!(
        "ALTER ROLE {r} NOBYPASSRLS; DROP POLICY only_paid ON tb_entity_change_log; \
         ALTER TABLE tb_entity_change_log OWNER TO {r}; DELETE FROM observer_checkpoints",
        r = role.name
    ))
    .await;
    let mut d = Daemon::start(&db, &config).await;
    rx.wait_for(5, Duration::from_secs(30)).await;
    assert!(!d.logs().contains("row-level security"), "{}", d.logs());
    d.stop().await;
    db.exec("ALTER TABLE tb_entity_change_log FORCE ROW LEVEL SECURITY")
        .await;
    let logs = refused(&db, &config).await;
    assert!(logs.contains("forces row security on its owner"), "{logs}");
    // The owner must give the table back before the role is dropped.
    db.exec("ALTER TABLE tb_entity_change_log OWNER TO postgres")
        .await;
}
