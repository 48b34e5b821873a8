//! `migrate --nats` against a private `nats-server`: creates the stream and the partition
//! consumers, checks them when run again, and names the server and the setting when the
//! stream is incompatible, the server has no JetStream, or nothing answers.

use observer_tests::nats_server::{connect, nats_section, PrivateNats};
use observer_tests::{output_text, TestDb};

fn config(db: &TestDb, url: &str, stream: &str, extra: &str) -> String {
    db.config_raw(&format!(
        "[features]\nnats = true\n\n{}",
        nats_section(url, stream, 4, extra)
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_nats_creates_the_stream_and_consumers_then_checks_them() {
    let nats = PrivateNats::start().await;
    let db = TestDb::new().await;
    let cfg = config(&db, &nats.url(), "MIG", "");
    let out = db.cli_with(&cfg, &["migrate", "--nats"]).await;
    let text = output_text(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("stream `MIG` created"), "{text}");
    assert!(text.contains("4 created, 0 checked"), "{text}");

    let js = async_nats::jetstream::new(connect(&nats.url()).await);
    let mut stream = js.get_stream("MIG").await.expect("the stream exists");
    let info = stream.info().await.expect("info").clone();
    assert_eq!(info.config.subjects, vec!["tMIG.>".to_string()]);
    assert_eq!(
        info.config.retention,
        async_nats::jetstream::stream::RetentionPolicy::WorkQueue
    );
    assert_eq!(
        info.config.storage,
        async_nats::jetstream::stream::StorageType::File
    );
    assert_eq!(
        info.config.discard,
        async_nats::jetstream::stream::DiscardPolicy::New
    );
    for p in 0..4 {
        let mut c = stream
            .get_consumer::<async_nats::jetstream::consumer::pull::Config>(&format!("wMIG-{p}"))
            .await
            .expect("the partition consumer exists");
        let ci = c.info().await.expect("consumer info");
        assert_eq!(ci.config.max_ack_pending, 1);
        assert_eq!(ci.config.filter_subject, format!("tMIG.*.{p}"));
    }

    // Idempotent: a second run checks and creates nothing.
    let out = db.cli_with(&cfg, &["migrate", "--nats"]).await;
    let text = output_text(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("stream `MIG` checked"), "{text}");
    assert!(text.contains("0 created, 4 checked"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incompatible_stream_is_named_with_its_setting() {
    let nats = PrivateNats::start().await;
    let db = TestDb::new().await;
    // Someone else's stream under our name: limits retention, memory storage.
    let js = async_nats::jetstream::new(connect(&nats.url()).await);
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "BAD".into(),
        subjects: vec!["tBAD.>".into()],
        storage: async_nats::jetstream::stream::StorageType::Memory,
        ..Default::default()
    })
    .await
    .expect("create a limits stream");
    let out = db
        .cli_with(&config(&db, &nats.url(), "BAD", ""), &["migrate", "--nats"])
        .await;
    let text = output_text(&out);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("the stream `BAD`"), "{text}");
    assert!(text.contains(&format!("127.0.0.1:{}", nats.port)), "{text}");
    assert!(text.contains("retention"), "{text}");
    assert!(text.contains("storage"), "{text}");
    assert!(!text.contains("panicked"), "{text}");

    // A workers' setting changed after migrate: the consumer is named with the setting.
    let cfg = config(&db, &nats.url(), "OK1", "");
    assert!(db
        .cli_with(&cfg, &["migrate", "--nats"])
        .await
        .status
        .success());
    let changed = cfg.replace("ack_wait_ms = 2000", "ack_wait_ms = 9000");
    let out = db.cli_with(&changed, &["migrate", "--nats"]).await;
    let text = output_text(&out);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("consumer `wOK1-0`"), "{text}");
    assert!(text.contains("nats.ack_wait_ms"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_jetstream_is_named() {
    let nats = PrivateNats::start_without_jetstream().await;
    let db = TestDb::new().await;
    let out = db
        .cli_with(
            &config(&db, &nats.url(), "NOJS", ""),
            &["migrate", "--nats"],
        )
        .await;
    let text = output_text(&out);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("has no JetStream"), "{text}");
    assert!(text.contains(&format!("127.0.0.1:{}", nats.port)), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_is_named() {
    let db = TestDb::new().await;
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("nats://user:s3cret@127.0.0.1:{port}");
    let out = db
        .cli_with(&config(&db, &url, "GONE", ""), &["migrate", "--nats"])
        .await;
    let text = output_text(&out);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("cannot connect to the NATS server"), "{text}");
    assert!(text.contains(&format!("nats://127.0.0.1:{port}")), "{text}");
    assert!(text.contains("nats.url"), "{text}");
    assert!(
        !text.contains("s3cret"),
        "the password is never shown: {text}"
    );

    // The roles refuse to start without the layer switched on.
    let plain = db.config_raw(&nats_section(&url, "GONE", 4, ""));
    for role in ["publisher", "worker"] {
        let out = db.cli_with(&plain, &["run", "--role", role]).await;
        let text = output_text(&out);
        assert!(!out.status.success(), "{text}");
        assert!(text.contains("features.nats = true"), "{role}: {text}");
    }
}
