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
