//! The outbound guard end to end (`[outbound]`, docs/security.md): the real daemon refuses
//! loopback, link-local and metadata destinations of every outbound action unless the
//! allow-list names them, dead-letters them at once with a reason, never connects, and keeps
//! delivering everything else. Also response-size caps and header/URL injection.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use observer_tests::action_helpers::SmtpSink;
use observer_tests::lookup::LookupServer;
use observer_tests::*;
use serde_json::Value;

const T: Duration = Duration::from_secs(30);

/// An observer on `Order` with one action (TOML lines of `[[observers.actions]]`), one attempt
/// at most so a retryable failure would show as `retries_exhausted`, not a refusal.
fn observer(name: &str, condition: &str, action: &str) -> String {
    format!(
        "[[observers]]\nname = \"{name}\"\nentity = \"Order\"\n{condition}\n\n  [[observers.actions]]\n{action}\n  retry = {{ max_attempts = 3, backoff = \"fixed\", initial_ms = 50, max_ms = 500 }}\n\n"
    )
}

fn by_observer(dl: &[Value], name: &str) -> Value {
    dl.iter()
        .find(|r| r["observer"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no dead letter of `{name}` in {dl:#?}"))
}

/// A refusal: permanent at the first attempt, its reason naming host, address, why and key.
fn assert_refused(row: &Value, host: &str, addr: &str, why: &str) {
    let err = row["last_error"].as_str().unwrap_or_default();
    assert_eq!(row["reason"], "permanent_failure", "{row:#}");
    assert_eq!(
        row["attempts"].as_array().map(Vec::len),
        Some(1),
        "a refusal is never retried: {row:#}"
    );
    for needle in [
        "outbound guard refused",
        &format!("`{host}`"),
        addr,
        why,
        "outbound.allow",
        "OBSERVER__OUTBOUND__ALLOW",
    ] {
        assert!(err.contains(needle), "no `{needle}` in: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_every_outbound_action_refuses_non_public_destinations() {
    let db = TestDb::new().await;
    let rx = Receiver::start().await;
    let lookup = LookupServer::start().await;
    let sink = SmtpSink::start(db.dir.join("mail"), &[]).await;
    let port = rx.addr.port();
    let observers = [
        // An IP literal (never reaches a resolver: checked before the request is built).
        observer(
            "literal",
            "",
            &format!("  type = \"webhook\"\n  url = \"{}\"", rx.url("/literal")),
        ),
        // A name that resolves to loopback: refused after resolution.
        observer(
            "by-name",
            "",
            &format!("  type = \"webhook\"\n  url = \"http://localhost:{port}/by-name\""),
        ),
        // The IPv4-mapped IPv6 form of loopback.
        observer(
            "mapped",
            "",
            &format!("  type = \"webhook\"\n  url = \"http://[::ffff:127.0.0.1]:{port}/mapped\""),
        ),
        // Cloud metadata: refused without a connection attempt (a connect would hang here).
        observer(
            "metadata",
            "",
            "  type = \"webhook\"\n  url = \"http://169.254.169.254/latest/meta-data/\"\n  timeout_ms = 20000",
        ),
        observer(
            "batched",
            "",
            &format!(
                "  type = \"webhook\"\n  url = \"http://localhost:{port}/batched\"\n  batch = {{ max_events = 10, max_wait_ms = 50 }}"
            ),
        ),
        observer(
            "slack",
            "",
            "  type = \"slack\"\n  webhook_url = \"${env:OBS_TEST_SLACK_URL}\"\n  text = \"hi\"",
        ),
        observer(
            "email",
            "",
            &format!(
                "  type = \"email\"\n  host = \"localhost\"\n  port = {}\n  tls = \"none\"\n  from = \"shop@example.com\"\n  to = [\"ops@example.com\"]\n  subject = \"s\"\n  body = \"b\"",
                sink.port
            ),
        ),
        format!(
            "[[observers]]\nname = \"enriched\"\nentity = \"Order\"\n\n  [[observers.enrich]]\n  name = \"user\"\n  key = \"u\"\n  http = \"{}\"\n\n  [[observers.actions]]\n  type = \"log\"\n\n",
            lookup.url("/users/1")
        ),
    ]
    .concat();
    let slack_url = rx.url("/services/T000/B000/secret-token");
    let mut daemon = Daemon::start_with_env(
        &db,
        &db.config_with_outbound("allow = []", &observers),
        &[("OBS_TEST_SLACK_URL", slack_url.as_str())],
    )
    .await;
    db.insert_order(1, "new", 1.0).await;
    db.wait_caught_up("test", T).await;

    let dl = db.dead_letters().await;
    assert_eq!(dl.len(), 8, "{dl:#?}");
    let lo = "127.0.0.1";
    assert_refused(&by_observer(&dl, "literal"), lo, lo, "loopback");
    assert!(by_observer(&dl, "literal")["last_error"]
        .as_str()
        .unwrap()
        .contains("\"127.0.0.1/32\""));
    let by_name = by_observer(&dl, "by-name");
    assert_refused(&by_name, "localhost", "", "loopback");
    assert!(
        by_name["last_error"]
            .as_str()
            .unwrap()
            .contains("add \"localhost\""),
        "{by_name:#}"
    );
    assert_refused(
        &by_observer(&dl, "mapped"),
        "[::ffff:7f00:1]",
        "::ffff:7f00:1",
        "IPv4-mapped",
    );
    let meta = by_observer(&dl, "metadata");
    assert_refused(&meta, "169.254.169.254", "169.254.169.254", "link-local");
    assert!(
        meta["attempts"][0]["duration_ms"]
            .as_u64()
            .unwrap_or(u64::MAX)
            < 1000,
        "refused before any connection attempt: {meta:#}"
    );
    assert_refused(&by_observer(&dl, "batched"), "localhost", "", "loopback");
    let slack = by_observer(&dl, "slack");
    assert_refused(&slack, lo, lo, "loopback");
    assert!(
        !slack.to_string().contains("secret-token"),
        "the Slack URL is a credential: {slack:#}"
    );
    assert_refused(&by_observer(&dl, "email"), "localhost", "", "loopback");
    let enriched = by_observer(&dl, "enriched");
    assert_refused(&enriched, lo, lo, "loopback");
    assert!(enriched["last_error"]
        .as_str()
        .unwrap()
        .starts_with("enrich `user`"));

    assert_eq!(
        rx.count(),
        0,
        "nothing reached the receiver: {:?}",
        rx.requests()
    );
    assert_eq!(lookup.hits("/users/1"), 0);
    assert!(sink.mails().is_empty());
    assert!(daemon.stop().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_allow_list_admits_exactly_what_it_names_and_events_keep_flowing() {
    let db = TestDb::new().await;
    let one = Receiver::start().await; // 127.0.0.1
    let two = Receiver::start_on("127.0.0.2").await;
    let p1 = one.addr.port();
    let observers = [
        // Event 1: an address the list does not name (a host entry never admits an IP literal).
        observer(
            "refused",
            "condition = \"data.id == 1\"",
            &format!("  type = \"webhook\"\n  url = \"{}\"", one.url("/refused")),
        ),
        // Event 2: admitted by the CIDR entry.
        observer(
            "by-range",
            "condition = \"data.id == 2\"",
            &format!("  type = \"webhook\"\n  url = \"{}\"", two.url("/by-range")),
        ),
        // Event 2: admitted by the host entry (localhost resolves to 127.0.0.1 here).
        observer(
            "by-host",
            "condition = \"data.id == 2\"",
            &format!("  type = \"webhook\"\n  url = \"http://localhost:{p1}/by-host\""),
        ),
        // Event 2: a neighbour of the range is not in it.
        observer(
            "neighbour",
            "condition = \"data.id == 2\"",
            "  type = \"webhook\"\n  url = \"http://127.0.0.3:9/neighbour\"",
        ),
    ]
    .concat();
    let cfg = db.config_with_outbound("allow = [\"127.0.0.2/32\", \"localhost\"]", &observers);
    let mut daemon = Daemon::start(&db, &cfg).await;
    db.insert_order(1, "new", 1.0).await;
    db.insert_order(2, "new", 1.0).await;
    two.wait_for(1, T).await;
    one.wait_for(1, T).await;
    db.wait_caught_up("test", T).await;
    assert_eq!(one.requests_to("/by-host").len(), 1);
    assert!(one.requests_to("/refused").is_empty());
    let dl = db.dead_letters().await;
    assert_eq!(dl.len(), 2, "{dl:#?}");
    assert_refused(
        &by_observer(&dl, "refused"),
        "127.0.0.1",
        "127.0.0.1",
        "loopback",
    );
    assert_refused(
        &by_observer(&dl, "neighbour"),
        "127.0.0.3",
        "127.0.0.3",
        "loopback",
    );
    assert!(daemon.stop().await.success());
}

/// docs/security.md, "Redirects": none is followed, on the per-event webhook path (hyper-util)
/// and the batched one (reqwest) alike. The redirect points at an admitted path of the same
/// receiver, so only not following it keeps that path empty; the dead letter names the target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_are_not_followed_and_name_their_target() {
    let db = TestDb::new().await;
    let rx = Receiver::start().await;
    let target = rx.url("/target");
    for (path, status) in [("/moved", 302), ("/moved-batch", 307), ("/moved-perm", 308)] {
        rx.set_path_redirect(path, status, &target);
    }
    let observers = [
        observer(
            "moved",
            "",
            &format!("  type = \"webhook\"\n  url = \"{}\"", rx.url("/moved")),
        ),
        observer(
            "moved-perm",
            "",
            &format!("  type = \"webhook\"\n  url = \"{}\"", rx.url("/moved-perm")),
        ),
        observer(
            "moved-batch",
            "",
            &format!(
                "  type = \"webhook\"\n  url = \"{}\"\n  batch = {{ max_events = 10, max_wait_ms = 50 }}",
                rx.url("/moved-batch")
            ),
        ),
    ]
    .concat();
    let cfg = db.config_with_outbound("allow = [\"127.0.0.1/32\"]", &observers);
    let mut daemon = Daemon::start(&db, &cfg).await;
    db.insert_order(1, "new", 1.0).await;
    db.wait_caught_up("test", T).await;
    let dl = db.dead_letters().await;
    assert_eq!(dl.len(), 3, "{dl:#?}");
    for (name, status) in [("moved", 302), ("moved-perm", 308), ("moved-batch", 307)] {
        let row = by_observer(&dl, name);
        let err = row["last_error"].as_str().unwrap_or_default();
        assert_eq!(row["reason"], "permanent_failure", "{row:#}");
        assert_eq!(row["attempts"].as_array().map(Vec::len), Some(1), "{row:#}");
        for needle in [
            format!("HTTP {status}"),
            format!("redirect to `{target}`"),
            "redirects are not followed".to_string(),
        ] {
            assert!(err.contains(&needle), "{name}: no `{needle}` in: {err}");
        }
    }
    assert!(
        rx.requests_to("/target").is_empty(),
        "a redirect was followed"
    );
    for path in ["/moved", "/moved-perm", "/moved-batch"] {
        assert_eq!(rx.requests_to(path).len(), 1, "{path}");
    }
    assert!(daemon.stop().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_allow_entries_are_config_errors_naming_the_entry() {
    let db = TestDb::new().await;
    let file = db.write_file(
        "bad-outbound.toml",
        &db.config_with_outbound(
            "allow = [\"10.0.0.0/8\", \"10.0.0.1/8\", \"hooks.internal:8080\", \"not a host\"]",
            "",
        ),
    );
    let out = run_cli(&["validate", file.to_str().unwrap()]).await;
    let text = output_text(&out);
    assert!(!out.status.success(), "{text}");
    for needle in [
        "outbound.allow[1]",
        "`10.0.0.1/8`",
        "did you mean 10.0.0.0/8",
        "outbound.allow[2]",
        "ports are not part",
        "outbound.allow[3]",
        "`not a host`",
    ] {
        assert!(text.contains(needle), "no `{needle}` in:\n{text}");
    }
    assert!(!text.contains("outbound.allow[0]"), "{text}");

    // The same list from the environment (comma-separated) is checked the same way by `run`.
    let good = db.write_file("good.toml", &db.config(""));
    let run = command()
        .args(["-c", good.to_str().unwrap(), "run"])
        .env("OBSERVER__OUTBOUND__ALLOW", "127.0.0.1/32, 169.254.0.1/16")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(T, run)
        .await
        .expect("`run` with a bad allow-list must exit at once")
        .expect("run");
    let text = output_text(&out);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("outbound.allow[1]") && text.contains("169.254.0.1/16"),
        "{text}"
    );
}

/// A raw HTTP server answering every request with `head` and then up to `size` bytes of body,
/// counting the body bytes it managed to write before the client went away.
struct BigBody {
    port: u16,
    written: Arc<AtomicU64>,
    connections: Arc<AtomicUsize>,
    _task: tokio::task::JoinHandle<()>,
}

impl BigBody {
    async fn start(head: &'static str, size: u64) -> BigBody {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let written = Arc::new(AtomicU64::new(0));
        let connections = Arc::new(AtomicUsize::new(0));
        let (w, c) = (written.clone(), connections.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                let w = w.clone();
                tokio::spawn(async move {
                    let mut req = vec![0u8; 64 * 1024];
                    let _ = s.read(&mut req).await;
                    if s.write_all(head.as_bytes()).await.is_err() {
                        return;
                    }
                    let chunk = vec![b'x'; 64 * 1024];
                    let mut sent = 0u64;
                    while sent < size {
                        match s.write_all(&chunk).await {
                            Ok(()) => {
                                sent += chunk.len() as u64;
                                w.fetch_add(chunk.len() as u64, Ordering::SeqCst);
                            }
                            Err(_) => return,
                        }
                    }
                });
            }
        });
        BigBody {
            port,
            written,
            connections,
            _task: task,
        }
    }
}

const FIFTY_MIB: u64 = 50 * 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_response_bodies_are_not_read() {
    let db = TestDb::new().await;
    let rx = Receiver::start().await;
    // A webhook receiver failing with a 50 MiB error page (declared length) ...
    let hook = BigBody::start(
        "HTTP/1.1 500 Internal Server Error\r\ncontent-type: text/plain\r\ncontent-length: 52428800\r\n\r\n",
        FIFTY_MIB,
    )
    .await;
    // ... and a lookup answering 200 with a 50 MiB body of unknown length (read until close).
    let lookup = BigBody::start(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n",
        FIFTY_MIB,
    )
    .await;
    let observers = [
        observer(
            "hook",
            "",
            &format!(
                "  type = \"webhook\"\n  url = \"http://127.0.0.1:{}/hook\"\n  timeout_ms = 60000",
                hook.port
            ),
        ),
        format!(
            "[[observers]]\nname = \"enriched\"\nentity = \"Order\"\n\n  [[observers.enrich]]\n  name = \"user\"\n  key = \"u\"\n  http = \"http://127.0.0.1:{}/users/1\"\n  timeout_ms = 60000\n\n  [[observers.actions]]\n  type = \"webhook\"\n  url = \"{}\"\n  retry = {{ max_attempts = 1 }}\n\n",
            lookup.port,
            rx.url("/enriched")
        ),
    ]
    .concat();
    let cfg = db.config_with_outbound(
        &format!("{LOOPBACK_ALLOW}\nmax_response_bytes = 1048576"),
        &observers,
    );
    let mut daemon = Daemon::start(&db, &cfg).await;
    db.insert_order(1, "new", 1.0).await;
    db.wait_caught_up("test", Duration::from_secs(60)).await;
    let dl = db.dead_letters().await;
    assert_eq!(dl.len(), 2, "{dl:#?}");
    let err = by_observer(&dl, "hook")["last_error"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(err.starts_with("HTTP 500: xxx"), "{err}");
    assert!(
        err.len() < 1024,
        "the excerpt is short: {} bytes",
        err.len()
    );
    let err = by_observer(&dl, "enriched")["last_error"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        err.contains("larger than outbound.max_response_bytes (1048576)"),
        "{err}"
    );
    assert_eq!(rx.count(), 0, "no action runs on a failed lookup");
    // Whatever the kernel buffers on loopback, far less than the body was taken.
    let limit = 16 * 1024 * 1024;
    for (what, b) in [("webhook", &hook), ("lookup", &lookup)] {
        assert!(b.connections.load(Ordering::SeqCst) >= 1);
        let w = b.written.load(Ordering::SeqCst);
        assert!(
            w < limit,
            "{what}: the server wrote {w} bytes before the daemon hung up"
        );
    }
    assert!(daemon.stop().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placeholder_values_cannot_inject_headers_or_change_the_url() {
    let db = TestDb::new().await;
    let rx = Receiver::start().await;
    let sink = SmtpSink::start(db.dir.join("mail"), &[]).await;
    let port = rx.addr.port();
    let observers = [
        observer(
            "header",
            "",
            &format!(
                "  type = \"webhook\"\n  url = \"{}\"\n  headers = {{ \"X-Note\" = \"{{{{ data.note }}}}\" }}",
                rx.url("/header")
            ),
        ),
        // A value in the path cannot add an authority, user info or a new path root.
        observer(
            "path",
            "",
            &format!(
                "  type = \"webhook\"\n  url = \"{}\"",
                rx.url("/path/{{ data.status }}")
            ),
        ),
        // A value right after the authority cannot become part of it.
        observer(
            "authority",
            "",
            &format!("  type = \"webhook\"\n  url = \"http://127.0.0.1:{port}{{{{ data.status }}}}/x\""),
        ),
        observer(
            "mail",
            "",
            &format!(
                "  type = \"email\"\n  host = \"127.0.0.1\"\n  port = {}\n  tls = \"none\"\n  from = \"shop@example.com\"\n  to = [\"ops@example.com\"]\n  subject = \"Order {{{{ data.note }}}}\"\n  body = \"b\"",
                sink.port
            ),
        ),
    ]
    .concat();
    let mut daemon = Daemon::start(&db, &db.config(&observers)).await;
    db.exec(
        "INSERT INTO orders (id, status, note) VALUES (1, '@evil.example//evil.example/../x', e'a\\r\\nX-Evil: 1\\r\\nBcc: thief@evil.example')",
    )
    .await;
    db.wait_caught_up("test", T).await;

    let dl = db.dead_letters().await;
    let header = by_observer(&dl, "header");
    assert_eq!(header["reason"], "permanent_failure");
    let err = header["last_error"].as_str().unwrap();
    assert!(
        err.contains("header `x-note`") && err.contains("CR, LF or NUL"),
        "{err}"
    );
    assert!(rx.requests_to("/header").is_empty());
    assert!(rx.requests().iter().all(|r| r.header("x-evil").is_none()));

    let path: Vec<Received> = rx
        .requests()
        .into_iter()
        .filter(|r| r.path.starts_with("/path/"))
        .collect();
    assert_eq!(path.len(), 1, "{:?}", rx.requests());
    assert_eq!(
        path[0].path,
        "/path/%40evil.example%2F%2Fevil.example%2F..%2Fx"
    );
    let authority = by_observer(&dl, "authority");
    assert_eq!(authority["reason"], "permanent_failure");
    assert!(
        authority["last_error"]
            .as_str()
            .unwrap()
            .contains("is not a URL"),
        "{authority:#}"
    );
    assert_eq!(dl.len(), 2, "{dl:#?}");

    // lettre encodes the subject: the line breaks never start a header of their own.
    let mails = sink.mails();
    assert_eq!(mails.len(), 1);
    assert_eq!(mails[0].rcpt_tos, ["ops@example.com"]);
    let head = mails[0].data.split("\r\n\r\n").next().unwrap_or_default();
    for line in head.lines() {
        let l = line.to_ascii_lowercase();
        assert!(
            !l.starts_with("x-evil") && !l.starts_with("bcc"),
            "smuggled header line `{line}` in:\n{head}"
        );
    }
    assert!(daemon.stop().await.success());
}

/// Issue 18, item 1: a placeholder value of `..` (or `.`) made a whole path segment, which the
/// URL parser removes together with the segment before it: `/hooks/{{ data.note }}/end` with
/// `..` was sent to `/end`. Such a delivery is now a permanent failure (dead-lettered at once
/// with the reason) and nothing is sent; `%2e%2e` in a value is percent-encoded like any other
/// text and reaches the path it names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dot_segments_made_by_values_are_dead_lettered_not_sent_elsewhere() {
    let db = TestDb::new().await;
    let rx = Receiver::start().await;
    let hook = |name: &str, condition: &str, path: &str, extra: &str| {
        observer(
            name,
            &format!("condition = \"{condition}\""),
            &format!("  type = \"webhook\"\n  url = \"{}\"{extra}", rx.url(path)),
        )
    };
    let observers = [
        hook("segment", "data.id <= 4", "/hooks/{{ data.note }}/end", ""),
        hook(
            "batched",
            "data.id == 1",
            "/batch/{{ data.note }}/end",
            "\n  batch = { max_events = 10, max_wait_ms = 50 }",
        ),
        // Literal text and a value together make the segment.
        hook("joined", "data.id == 5", "/hooks/.{{ data.note }}/end", ""),
        // An enrichment lookup's URL is checked the same way.
        format!(
            "[[observers]]\nname = \"enriched\"\nentity = \"Order\"\ncondition = \"data.id == 1\"\n\n  [[observers.enrich]]\n  name = \"user\"\n  key = \"u\"\n  http = \"{}\"\n\n  [[observers.actions]]\n  type = \"log\"\n\n",
            rx.url("/lookup/{{ data.note }}/end")
        ),
    ]
    .concat();
    let mut daemon = Daemon::start(&db, &db.config(&observers)).await;
    db.exec(
        "INSERT INTO orders (id, note) VALUES
           (1, '..'), (2, '.'), (3, '%2e%2e'), (4, 'a..b'), (5, '.')",
    )
    .await;
    db.wait_caught_up("test", T).await;

    let mut paths: Vec<String> = rx.requests().into_iter().map(|r| r.path).collect();
    paths.sort();
    assert_eq!(
        paths,
        ["/hooks/%252e%252e/end", "/hooks/a..b/end"],
        "only the deliveries whose path stays where the template put it are sent"
    );
    let dl = db.dead_letters().await;
    assert_eq!(dl.len(), 5, "{dl:#?}");
    for (observer, entity_id, segment) in [
        ("segment", "1", ".."),
        ("segment", "2", "."),
        ("batched", "1", ".."),
        ("joined", "5", ".."),
        ("enriched", "1", ".."),
    ] {
        let row = dl
            .iter()
            .find(|r| r["observer"] == observer && r["event"]["entity_id"] == entity_id)
            .unwrap_or_else(|| {
                panic!("no dead letter of {observer} for order {entity_id}: {dl:#?}")
            });
        assert_eq!(row["reason"], "permanent_failure", "{row:#}");
        assert_eq!(row["attempts"].as_array().map(Vec::len), Some(1), "{row:#}");
        let err = row["last_error"].as_str().unwrap_or_default();
        assert!(
            err.contains(&format!("segment `{segment}`"))
                && err.contains("would move the request to another path"),
            "{observer} / {entity_id}: {err}"
        );
    }
    assert!(daemon.stop().await.success());
}
