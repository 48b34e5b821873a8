//! Webhook signing and verification following Standard Webhooks
//! (<https://www.standardwebhooks.com>).
//!
//! Every delivery carries three headers: `webhook-id` (unique per message, stable across
//! retries), `webhook-timestamp` (integer seconds since the Unix epoch) and `webhook-signature`.
//! The signature is `v1,` followed by the base64 HMAC-SHA256 of `{id}.{timestamp}.{body}`. During
//! secret rotation a sender signs with every active key and the header carries all signatures,
//! space-separated; a receiver accepts the message if any of them matches one of its keys.
//!
//! The daemon signs outgoing webhooks with [`signature_headers`]; the `listen` debugging sink
//! checks them with [`verify`].

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Name of the header carrying the message id.
pub const HEADER_ID: &str = "webhook-id";
/// Name of the header carrying the send time, in seconds since the Unix epoch.
pub const HEADER_TIMESTAMP: &str = "webhook-timestamp";
/// Name of the header carrying the signature(s).
pub const HEADER_SIGNATURE: &str = "webhook-signature";

/// The clock skew [`verify`] should accept by default, as recommended by Standard Webhooks:
/// five minutes either way.
pub const DEFAULT_TOLERANCE_SECS: i64 = 5 * 60;

/// Prefix of secrets written in the Standard Webhooks form.
const SECRET_PREFIX: &str = "whsec_";

/// Prefix of a signature made with the symmetric (HMAC-SHA256) scheme.
const SIGNATURE_PREFIX: &str = "v1,";

/// An HMAC key used to sign or verify webhooks.
///
/// `Debug` never shows the key bytes, so a key can sit inside logged configuration safely.
#[derive(Clone)]
pub struct SigningKey {
    key: Vec<u8>,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningKey(<redacted>)")
    }
}

impl SigningKey {
    /// Parses a configured secret.
    ///
    /// * `whsec_<base64>` — the Standard Webhooks form: the part after the prefix is decoded
    ///   (standard base64 alphabet, padded) and the decoded bytes are the key. This is the form
    ///   the Standard Webhooks receiver libraries expect, so use it whenever the receiver
    ///   verifies with one of them.
    /// * anything else that is non-empty — used as-is, its UTF-8 bytes being the key. This lets
    ///   users keep a shared secret they already have; a receiver then has to compute the HMAC
    ///   itself (or be given `whsec_` + base64 of the same bytes).
    ///
    /// Errors never include the secret or any part of it.
    pub fn parse(secret: &str) -> Result<SigningKey, SigningError> {
        if secret.is_empty() {
            return Err(SigningError::Empty);
        }
        let key = match secret.strip_prefix(SECRET_PREFIX) {
            // The decode error is dropped on purpose: its message quotes the offending
            // character, which is part of the secret.
            Some(encoded) => BASE64
                .decode(encoded)
                .map_err(|_| SigningError::InvalidBase64)?,
            None => secret.as_bytes().to_vec(),
        };
        if key.is_empty() {
            return Err(SigningError::EmptyKey);
        }
        Ok(SigningKey { key })
    }

    /// `v1,<base64>` for the given id, timestamp (seconds) and body.
    pub fn sign(&self, msg_id: &str, timestamp: i64, body: &[u8]) -> String {
        let tag = self
            .mac(msg_id, &timestamp.to_string(), body)
            .finalize()
            .into_bytes();
        format!("{SIGNATURE_PREFIX}{}", BASE64.encode(tag))
    }

    /// The HMAC state after feeding the signed content. The timestamp is taken as the exact
    /// header text so verification hashes what the sender sent, not a re-rendering of it.
    fn mac(&self, msg_id: &str, timestamp: &str, body: &[u8]) -> HmacSha256 {
        // HMAC accepts keys of any length, so this cannot fail; the fallback keeps the
        // function total without a panic path.
        let mut mac = match HmacSha256::new_from_slice(&self.key) {
            Ok(mac) => mac,
            Err(_) => <HmacSha256 as Mac>::new(&Default::default()),
        };
        // Fed piecewise so large bodies are not copied into a concatenated buffer.
        mac.update(msg_id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.as_bytes());
        mac.update(b".");
        mac.update(body);
        mac
    }
}

/// The three Standard Webhooks headers for one delivery, signature present when keys given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureHeaders {
    /// Value of `webhook-id`.
    pub id: String,
    /// Value of `webhook-timestamp`: integer seconds since the Unix epoch.
    pub timestamp: String,
    /// Value of `webhook-signature`; `None` when no key is configured.
    pub signature: Option<String>,
}

/// Signs with every key given (several during rotation) → one header value, space-separated.
pub fn signature_headers(
    keys: &[SigningKey],
    msg_id: &str,
    timestamp: i64,
    body: &[u8],
) -> SignatureHeaders {
    let signature = if keys.is_empty() {
        None
    } else {
        let parts: Vec<String> = keys
            .iter()
            .map(|k| k.sign(msg_id, timestamp, body))
            .collect();
        Some(parts.join(" "))
    };
    SignatureHeaders {
        id: msg_id.to_owned(),
        timestamp: timestamp.to_string(),
        signature,
    }
}

/// Checks a received webhook.
///
/// `msg_id`, `timestamp_header` and `signature_header` are the raw values of `webhook-id`,
/// `webhook-timestamp` and `webhook-signature` (pass `""` for an absent header). `now` is the
/// current time in seconds since the epoch and `tolerance_secs` the accepted skew either way
/// (see [`DEFAULT_TOLERANCE_SECS`]); the window keeps a captured request from being replayed
/// later.
///
/// Passes when any `v1,` signature in the header matches any key. Entries with another
/// version prefix or invalid base64 are skipped rather than rejected, so a sender may add
/// schemes this code does not know. Comparison is constant-time. With no keys nothing can
/// match, so the result is [`VerifyError::NoMatchingSignature`].
pub fn verify(
    keys: &[SigningKey],
    msg_id: &str,
    timestamp_header: &str,
    signature_header: &str,
    body: &[u8],
    now: i64,
    tolerance_secs: i64,
) -> Result<(), VerifyError> {
    if msg_id.is_empty() {
        return Err(VerifyError::MissingHeader(HEADER_ID));
    }
    if timestamp_header.trim().is_empty() {
        return Err(VerifyError::MissingHeader(HEADER_TIMESTAMP));
    }
    if signature_header.trim().is_empty() {
        return Err(VerifyError::MissingHeader(HEADER_SIGNATURE));
    }

    // Only plain decimal digits: `i64::from_str` would also take a sign, which no sender
    // writes and which would make the signed text ambiguous.
    let timestamp = if timestamp_header.bytes().all(|b| b.is_ascii_digit()) {
        timestamp_header.parse::<i64>().ok()
    } else {
        None
    };
    let Some(timestamp) = timestamp else {
        return Err(VerifyError::BadTimestamp(truncate_for_error(
            timestamp_header,
        )));
    };
    // i128 so extreme values cannot overflow the subtraction.
    if (i128::from(now) - i128::from(timestamp)).abs() > i128::from(tolerance_secs) {
        return Err(VerifyError::TimestampOutOfTolerance {
            timestamp,
            now,
            tolerance_secs,
        });
    }

    let candidates: Vec<Vec<u8>> = signature_header
        .split_whitespace()
        .filter_map(|entry| entry.strip_prefix(SIGNATURE_PREFIX))
        .filter_map(|encoded| BASE64.decode(encoded).ok())
        .collect();

    for key in keys {
        let mac = key.mac(msg_id, timestamp_header, body);
        for candidate in &candidates {
            // `verify_slice` compares in constant time; clone because it consumes the state.
            if mac.clone().verify_slice(candidate).is_ok() {
                return Ok(());
            }
        }
    }
    Err(VerifyError::NoMatchingSignature)
}

/// Keeps error messages bounded when a header value is garbage.
fn truncate_for_error(value: &str) -> String {
    const MAX: usize = 64;
    match value.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}…", &value[..cut]),
        None => value.to_owned(),
    }
}

/// Why a secret could not be turned into a [`SigningKey`]. Messages never quote the secret.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SigningError {
    /// The secret is the empty string.
    #[error("signing secret is empty")]
    Empty,
    /// The secret starts with `whsec_` but the rest is not valid base64.
    #[error("signing secret starts with `whsec_` but the rest is not valid base64")]
    InvalidBase64,
    /// The secret decodes to zero key bytes (e.g. just `whsec_`).
    #[error("signing secret decodes to an empty key")]
    EmptyKey,
}

/// Why a received webhook failed verification.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum VerifyError {
    /// A required header is absent or empty; carries the header name.
    #[error("missing header {0}")]
    MissingHeader(&'static str),
    /// `webhook-timestamp` is not an integer number of seconds; carries the (shortened) value.
    #[error("webhook-timestamp is not an integer number of seconds: {0:?}")]
    BadTimestamp(String),
    /// `webhook-timestamp` is further from `now` than the tolerance allows.
    #[error(
        "webhook-timestamp {timestamp} is {} s away from now ({now}); tolerance is {tolerance_secs} s",
        (i128::from(*now) - i128::from(*timestamp)).abs()
    )]
    TimestampOutOfTolerance {
        /// The timestamp received.
        timestamp: i64,
        /// The receiver's current time.
        now: i64,
        /// The accepted skew, in seconds.
        tolerance_secs: i64,
    },
    /// No signature in the header matches any key.
    #[error("no signature matches the configured secret(s)")]
    NoMatchingSignature,
}

#[cfg(test)]
mod tests {
    use super::*;

    // The example from the Standard Webhooks specification; the expected signature was
    // computed independently with Python's hmac module:
    // python3 -c "import hmac,hashlib,base64; k=base64.b64decode('MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw');
    //   print(base64.b64encode(hmac.new(k,b'msg_p5jXN8AQM9LWM0D4loKWxJek.1614265330.{\"test\": 2432232314}',hashlib.sha256).digest()).decode())"
    const SPEC_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const SPEC_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const SPEC_TS: i64 = 1614265330;
    const SPEC_BODY: &[u8] = br#"{"test": 2432232314}"#;
    const SPEC_SIG: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    fn key(secret: &str) -> SigningKey {
        match SigningKey::parse(secret) {
            Ok(k) => k,
            Err(e) => panic!("test secret rejected: {e}"),
        }
    }

    fn check(
        keys: &[SigningKey],
        id: &str,
        ts: &str,
        sig: &str,
        body: &[u8],
    ) -> Result<(), VerifyError> {
        verify(keys, id, ts, sig, body, SPEC_TS, DEFAULT_TOLERANCE_SECS)
    }

    #[test]
    fn signing_known_answer() {
        assert_eq!(key(SPEC_SECRET).sign(SPEC_ID, SPEC_TS, SPEC_BODY), SPEC_SIG);
    }

    #[test]
    fn signing_raw_secret_known_answer() {
        // python3 -c "import hmac,hashlib,base64; print(base64.b64encode(hmac.new(
        //   b'raw-shared-secret',b'evt_1.1700000000.hello',hashlib.sha256).digest()).decode())"
        assert_eq!(
            key("raw-shared-secret").sign("evt_1", 1_700_000_000, b"hello"),
            "v1,r4cdPL9B9giRo210yVcwf0w/AkeOKSJMh+7NU70aAiM="
        );
    }

    #[test]
    fn signing_verifies_spec_example() {
        let keys = [key(SPEC_SECRET)];
        assert_eq!(
            check(&keys, SPEC_ID, "1614265330", SPEC_SIG, SPEC_BODY),
            Ok(())
        );
    }

    #[test]
    fn signing_round_trip() {
        let keys = [key("whsec_c2VjcmV0LWJ5dGVzLWZvci10ZXN0cw==")];
        let h = signature_headers(&keys, "msg_1", SPEC_TS, b"{\"a\":1}");
        assert_eq!(h.id, "msg_1");
        assert_eq!(h.timestamp, SPEC_TS.to_string());
        let sig = h.signature.unwrap_or_default();
        assert_eq!(
            check(&keys, &h.id, &h.timestamp, &sig, b"{\"a\":1}"),
            Ok(())
        );
    }

    #[test]
    fn signing_without_keys_has_no_signature() {
        let h = signature_headers(&[], "msg_1", SPEC_TS, b"x");
        assert_eq!(h.signature, None);
        assert_eq!(h.timestamp, "1614265330");
    }

    #[test]
    fn signing_rotation() {
        let old = key("whsec_b2xkLWtleQ==");
        let new = key("new-raw-key");
        let other = key("unrelated");
        let h = signature_headers(&[old.clone(), new.clone()], "m", SPEC_TS, b"b");
        let sig = h.signature.unwrap_or_default();
        assert_eq!(sig.split(' ').count(), 2);
        assert!(sig.split(' ').all(|s| s.starts_with("v1,")));
        // A receiver that only knows one of the keys still accepts.
        assert_eq!(
            check(std::slice::from_ref(&old), "m", &h.timestamp, &sig, b"b"),
            Ok(())
        );
        assert_eq!(
            check(std::slice::from_ref(&new), "m", &h.timestamp, &sig, b"b"),
            Ok(())
        );
        // A receiver holding several keys accepts a single signature from any of them.
        let single = new.sign("m", SPEC_TS, b"b");
        assert_eq!(
            check(&[other.clone(), new], "m", &h.timestamp, &single, b"b"),
            Ok(())
        );
        assert_eq!(
            check(&[other], "m", &h.timestamp, &sig, b"b"),
            Err(VerifyError::NoMatchingSignature)
        );
    }

    #[test]
    fn signing_skips_unknown_and_malformed_entries() {
        let keys = [key(SPEC_SECRET)];
        let header = format!("v1a,AAAA v1,!!!notbase64 garbage {SPEC_SIG}");
        assert_eq!(
            check(&keys, SPEC_ID, "1614265330", &header, SPEC_BODY),
            Ok(())
        );
        assert_eq!(
            check(
                &keys,
                SPEC_ID,
                "1614265330",
                "v1a,AAAA v1,!!! garbage",
                SPEC_BODY
            ),
            Err(VerifyError::NoMatchingSignature)
        );
    }

    #[test]
    fn signing_tampering_fails() {
        let keys = [key(SPEC_SECRET)];
        let ts = "1614265330";
        assert_eq!(
            check(&keys, SPEC_ID, ts, SPEC_SIG, br#"{"test": 2432232315}"#),
            Err(VerifyError::NoMatchingSignature)
        );
        assert_eq!(
            check(&keys, "msg_other", ts, SPEC_SIG, SPEC_BODY),
            Err(VerifyError::NoMatchingSignature)
        );
        assert_eq!(
            check(&keys, SPEC_ID, "1614265331", SPEC_SIG, SPEC_BODY),
            Err(VerifyError::NoMatchingSignature)
        );
        // Leading zeros name the same second but are different signed text.
        assert_eq!(
            check(&keys, SPEC_ID, "01614265330", SPEC_SIG, SPEC_BODY),
            Err(VerifyError::NoMatchingSignature)
        );
        let truncated = &SPEC_SIG[..SPEC_SIG.len() - 4];
        assert_eq!(
            check(&keys, SPEC_ID, ts, truncated, SPEC_BODY),
            Err(VerifyError::NoMatchingSignature)
        );
        assert_eq!(
            check(&[key("whsec_b3RoZXI=")], SPEC_ID, ts, SPEC_SIG, SPEC_BODY),
            Err(VerifyError::NoMatchingSignature)
        );
        assert_eq!(
            check(&[], SPEC_ID, ts, SPEC_SIG, SPEC_BODY),
            Err(VerifyError::NoMatchingSignature)
        );
    }

    #[test]
    fn signing_tolerance() {
        let keys = [key(SPEC_SECRET)];
        let at = |now: i64| verify(&keys, SPEC_ID, "1614265330", SPEC_SIG, SPEC_BODY, now, 300);
        assert_eq!(at(SPEC_TS + 300), Ok(()));
        assert_eq!(at(SPEC_TS - 300), Ok(()));
        assert_eq!(
            at(SPEC_TS + 301),
            Err(VerifyError::TimestampOutOfTolerance {
                timestamp: SPEC_TS,
                now: SPEC_TS + 301,
                tolerance_secs: 300
            })
        );
        assert!(matches!(
            at(SPEC_TS - 301),
            Err(VerifyError::TimestampOutOfTolerance { .. })
        ));
        // Extreme clocks must not overflow.
        assert!(matches!(
            at(i64::MIN),
            Err(VerifyError::TimestampOutOfTolerance { .. })
        ));
        let err = verify(
            &keys,
            SPEC_ID,
            "9223372036854775807",
            SPEC_SIG,
            SPEC_BODY,
            i64::MIN,
            300,
        );
        assert!(matches!(
            err,
            Err(VerifyError::TimestampOutOfTolerance { .. })
        ));
        let msg = at(SPEC_TS + 400)
            .map_err(|e| e.to_string())
            .err()
            .unwrap_or_default();
        assert!(msg.contains("400 s away"), "{msg}");
    }

    #[test]
    fn signing_malformed_headers() {
        let keys = [key(SPEC_SECRET)];
        assert_eq!(
            check(&keys, "", "1614265330", SPEC_SIG, SPEC_BODY),
            Err(VerifyError::MissingHeader("webhook-id"))
        );
        assert_eq!(
            check(&keys, SPEC_ID, "", SPEC_SIG, SPEC_BODY),
            Err(VerifyError::MissingHeader("webhook-timestamp"))
        );
        assert_eq!(
            check(&keys, SPEC_ID, "1614265330", "  ", SPEC_BODY),
            Err(VerifyError::MissingHeader("webhook-signature"))
        );
        for bad in [
            "abc",
            "1614265330.5",
            "-1614265330",
            "+1614265330",
            " 1614265330",
            "99999999999999999999",
        ] {
            assert_eq!(
                check(&keys, SPEC_ID, bad, SPEC_SIG, SPEC_BODY),
                Err(VerifyError::BadTimestamp(bad.to_owned())),
                "{bad:?}"
            );
        }
        let long = "x".repeat(500);
        match check(&keys, SPEC_ID, &long, SPEC_SIG, SPEC_BODY) {
            Err(VerifyError::BadTimestamp(shown)) => assert!(shown.chars().count() <= 65),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn signing_secret_parsing() {
        assert_eq!(SigningKey::parse("").err(), Some(SigningError::Empty));
        assert_eq!(
            SigningKey::parse("whsec_").err(),
            Some(SigningError::EmptyKey)
        );
        assert_eq!(
            SigningKey::parse("whsec_not base64!").err(),
            Some(SigningError::InvalidBase64)
        );
        // Missing padding is not the canonical form the reference libraries produce.
        assert_eq!(
            SigningKey::parse("whsec_b3RoZXI").err(),
            Some(SigningError::InvalidBase64)
        );
        assert_eq!(key("whsec_b3RoZXI=").key, b"other");
        // Any other string is the key itself, including one that merely contains the prefix.
        assert_eq!(key("hunter2").key, b"hunter2");
        assert_eq!(key("xwhsec_abc").key, b"xwhsec_abc");
        // Error messages do not leak secret material.
        let msg = SigningKey::parse("whsec_s3cr3t!x")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(!msg.contains("s3cr3t") && !msg.contains('!'), "{msg}");
    }

    #[test]
    fn signing_key_debug_is_redacted() {
        assert_eq!(format!("{:?}", key("hunter2")), "SigningKey(<redacted>)");
    }
}
