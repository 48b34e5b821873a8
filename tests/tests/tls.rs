//! Postgres over TLS: `sslmode=require` verifies the server certificate (system roots plus
//! `[database] ca_file`) and its name; the daemon's connections are then encrypted and it delivers
//! as usual. Uses the server's own certificate (Debian's snakeoil, issued to `localhost`) as the
//! trusted CA, the way an operator passes a private CA.

use std::time::Duration;

use observer_tests::*;

const SNAKEOIL: &str = "/etc/ssl/certs/ssl-cert-snakeoil.pem";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslmode_require_verifies_the_server_and_encrypts_every_connection() {
    let db = TestDb::new().await;
    let ssl_on: String = db.client.query_one("SHOW ssl", &[]).await.unwrap().get(0);
    let cert: String = db
        .client
        .query_one("SHOW ssl_cert_file", &[])
        .await
        .unwrap()
        .get(0);
    let tls_url = format!(
        "{}?sslmode=require",
        db.url.replacen("127.0.0.1", "localhost", 1)
    );

    // The certificate is checked against the host name: the same server reached as 127.0.0.1
    // (its certificate names `localhost`) is refused, whatever the trusted roots.
    let wrong_name = format!(
        "[database]\nurl = \"{}?sslmode=require\"\nca_file = \"{SNAKEOIL}\"\n",
        db.url
    );
    let out = db.cli_with(&wrong_name, &["status"]).await;
    assert!(!out.status.success());
    let text = output_text(&out);
    assert!(
        text.contains("TLS") || text.contains("certificate"),
        "{text}"
    );
    if ssl_on != "on" || cert != SNAKEOIL {
        eprintln!("server has ssl={ssl_on} cert={cert}: only the refusal was checked");
        return;
    }

    let rx = Receiver::start().await;
    let cfg = format!(
        "[database]\nurl = \"{tls_url}\"\nca_file = \"{SNAKEOIL}\"\n\n[outbound]\n{}\n\n[listener]\nid = \"test\"\nstart_from = \"beginning\"\n\n{}",
        LOOPBACK_ALLOW,
        webhook_observer("orders", "Order", &rx.url("/orders"), "", "")
    );
    let mut daemon = Daemon::start(&db, &cfg).await;
    db.insert_order(1, "new", 1.0).await;
    rx.wait_for(1, Duration::from_secs(20)).await;
    let rows = db
        .json_rows(
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a ON a.pid = s.pid
             WHERE a.application_name LIKE 'fraiseql-observers pid %' AND a.datname = current_database()",
        )
        .await;
    assert!(rows.len() >= 3, "the daemon's connections: {rows:?}");
    assert!(
        rows.iter().all(|r| r["ssl"] == true),
        "every daemon connection is TLS: {rows:?}"
    );
    assert!(daemon.stop().await.success());
    assert!(daemon.logs().contains("tls=true"), "{}", daemon.logs());
}
