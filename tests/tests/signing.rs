//! Standard Webhooks signatures, verified here with our own HMAC-SHA256.

use std::time::Duration;

use base64::Engine;
use hmac::{Hmac, Mac};
use observer_tests::*;

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_when_secret_and_unsigned_without() {
    let db = TestDb::new().await;
    let rx = Receiver::start().await;
    let key: Vec<u8> = (0..32u8)
        .map(|i| i.wrapping_mul(37).wrapping_add(11))
        .collect();
    let secret = format!("whsec_{}", b64().encode(&key));
    let observers = [
        webhook_observer(
            "signed",
            "Order",
            &rx.url("/signed"),
            "",
            &format!("  secret = \"{secret}\""),
        ),
        webhook_observer("plain", "Order", &rx.url("/plain"), "", ""),
    ]
    .concat();
    let mut daemon = Daemon::start(&db, &db.config(&observers)).await;
    db.insert_order(1, "new", 5.0).await;
    rx.wait_for(2, Duration::from_secs(30)).await;

    let signed = &rx.requests_to("/signed")[0];
    let id = signed.header("webhook-id").expect("webhook-id");
    let ts = signed
        .header("webhook-timestamp")
        .expect("webhook-timestamp");
    let sig = signed
        .header("webhook-signature")
        .expect("webhook-signature");
    assert_eq!(Some(id), signed.header("idempotency-key"));
    let ts_num: i64 = ts.parse().expect("timestamp is integer seconds");
    let now = chrono::Utc::now().timestamp();
    assert!(
        (now - ts_num).abs() <= 60,
        "timestamp {ts_num} not recent (now {now})"
    );

    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{id}.{ts}.").as_bytes());
    mac.update(&signed.body);
    let expected = format!("v1,{}", b64().encode(mac.finalize().into_bytes()));
    assert!(
        sig.split(' ').any(|s| s == expected),
        "signature {sig} does not verify (expected {expected} among them)"
    );
    // A tampered body must not verify with the same header.
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{id}.{ts}.").as_bytes());
    mac.update(b"{}");
    let forged = format!("v1,{}", b64().encode(mac.finalize().into_bytes()));
    assert!(!sig.split(' ').any(|s| s == forged));

    let plain = &rx.requests_to("/plain")[0];
    assert!(
        plain.header("webhook-signature").is_none(),
        "no secret → no signature"
    );
    assert!(plain.header("webhook-id").is_some());
    assert!(daemon.stop().await.success());
}

/// Secret rotation: with `secret` (the new one) and `secrets` (the old one, from the
/// environment), every request — single and batched — carries a signature for each, so a
/// receiver still holding only the old secret and one already on the new one both verify it,
/// and a secret the daemon does not hold verifies nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_signs_with_every_secret_so_either_receiver_verifies() {
    use observer_core::signing::{verify, SigningKey, DEFAULT_TOLERANCE_SECS};
    let db = TestDb::new().await;
    let rx = Receiver::start().await;
    let new = format!("whsec_{}", b64().encode([7u8; 32]));
    let old = format!("whsec_{}", b64().encode([9u8; 24]));
    let other = format!("whsec_{}", b64().encode([1u8; 32]));
    let keys = format!("  secret = \"{new}\"\n  secrets = [\"${{env:OBS_TEST_OLD_SECRET}}\"]");
    let observers = [
        webhook_observer("single", "Order", &rx.url("/single"), "", &keys),
        webhook_observer(
            "batched",
            "Order",
            &rx.url("/batched"),
            "",
            &format!("{keys}\n  batch = {{ max_events = 10, max_wait_ms = 20 }}"),
        ),
    ]
    .concat();
    let mut daemon = Daemon::start_with_env(
        &db,
        &db.config(&observers),
        &[("OBS_TEST_OLD_SECRET", old.as_str())],
    )
    .await;
    db.insert_order(1, "new", 5.0).await;
    rx.wait_for(2, Duration::from_secs(30)).await;
    let key = |s: &str| SigningKey::parse(s).expect("key");
    for r in rx.requests() {
        let sig = r.header("webhook-signature").expect("signed");
        assert_eq!(sig.split(' ').count(), 2, "one signature per secret: {sig}");
        let check = |keys: &[SigningKey]| {
            verify(
                keys,
                r.header("webhook-id").unwrap_or_default(),
                r.header("webhook-timestamp").unwrap_or_default(),
                sig,
                &r.body,
                chrono::Utc::now().timestamp(),
                DEFAULT_TOLERANCE_SECS,
            )
        };
        assert!(check(&[key(&old)]).is_ok(), "{}: old secret", r.path);
        assert!(check(&[key(&new)]).is_ok(), "{}: new secret", r.path);
        assert!(check(&[key(&other)]).is_err(), "{}: unknown secret", r.path);
    }
    // Neither secret reaches the log.
    let text = daemon.logs();
    assert!(!text.contains(&old) && !text.contains(&new));
    assert!(daemon.stop().await.success());
}
