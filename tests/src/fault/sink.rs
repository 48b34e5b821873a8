//! The fault-injection receiver: a small HTTP/1.1 server written on raw TCP so it can misbehave
//! in the ways a real destination does — answer 500, hang past the client's timeout, close the
//! connection in the middle of the status line, answer slowly, or be down (listener closed,
//! open connections dropped) and come back on the same port.
//!
//! It records every request it *accepted* (answered 2xx): the `Idempotency-Key` header, the
//! `webhook-id` header and the `event_id` of the body, so the harness can count loss, duplicates
//! and check that every redelivery carried the same key. Requests failed on purpose are only
//! counted. Memory per recorded request is a few dozen bytes, so a one-hour soak fits.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How the receiver answers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fault {
    /// 204 to everything.
    None,
    /// 500 with probability `p` (seeded), 204 otherwise.
    Error500 { p: f64 },
    /// With probability `p`, never answers: holds the connection until the client gives up.
    Hang { p: f64 },
    /// With probability `p`, reads the request, writes half a status line and closes.
    CloseMidResponse { p: f64 },
    /// Answers 204 after `delay`.
    Slow { delay: Duration },
}

/// One accepted (2xx) delivery.
#[derive(Debug, Clone, Copy)]
pub struct Delivery {
    /// `Idempotency-Key` as a UUID (0 when missing or not a UUID).
    pub key: u128,
    /// `event_id` of the body (0 when missing).
    pub event: u128,
    /// `webhook-id` equals `Idempotency-Key`.
    pub webhook_id_matches: bool,
    pub at: Instant,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    answered_500: AtomicU64,
    hung: AtomicU64,
    closed_mid_response: AtomicU64,
    unparsable: AtomicU64,
}

struct Shared {
    fault: Mutex<Fault>,
    rng: Mutex<StdRng>,
    deliveries: Mutex<Vec<Delivery>>,
    counters: Counters,
}

/// The receiver. Dropping it stops it.
pub struct Sink {
    pub port: u16,
    shared: Arc<Shared>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// Counts of what the receiver did.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct SinkCounts {
    pub requests: u64,
    pub accepted: u64,
    pub answered_500: u64,
    pub hung: u64,
    pub closed_mid_response: u64,
    pub unparsable: u64,
}

impl Sink {
    /// Starts on a free loopback port, answering 204, with `seed` for the fault decisions.
    pub async fn start(seed: u64) -> std::io::Result<Sink> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let shared = Arc::new(Shared {
            fault: Mutex::new(Fault::None),
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
            deliveries: Mutex::new(Vec::new()),
            counters: Counters::default(),
        });
        let sink = Sink {
            port,
            shared,
            task: Mutex::new(None),
        };
        sink.serve(listener);
        Ok(sink)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn set_fault(&self, f: Fault) {
        *self.shared.fault.lock().unwrap() = f;
    }

    fn serve(&self, listener: TcpListener) {
        let shared = self.shared.clone();
        let task = tokio::spawn(async move {
            // Owned here: aborting the accept task drops every open connection with it.
            let mut conns = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        let _ = stream.set_nodelay(true);
                        conns.spawn(connection(stream, shared.clone()));
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        *self.task.lock().unwrap() = Some(task);
    }

    /// Closes the listener and drops every open connection: new connections are refused.
    pub async fn down(&self) {
        let t = self.task.lock().unwrap().take();
        if let Some(t) = t {
            t.abort();
            let _ = t.await;
        }
    }

    /// Listens again on the same port.
    pub async fn up(&self) -> std::io::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match TcpListener::bind(("127.0.0.1", self.port)).await {
                Ok(l) => break l,
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        self.serve(listener);
        Ok(())
    }

    /// Accepted deliveries so far (a copy).
    pub fn deliveries(&self) -> Vec<Delivery> {
        self.shared.deliveries.lock().unwrap().clone()
    }

    /// Number of accepted deliveries so far.
    pub fn accepted(&self) -> usize {
        self.shared.deliveries.lock().unwrap().len()
    }

    pub fn counts(&self) -> SinkCounts {
        let c = &self.shared.counters;
        SinkCounts {
            requests: c.requests.load(Ordering::Relaxed),
            accepted: self.accepted() as u64,
            answered_500: c.answered_500.load(Ordering::Relaxed),
            hung: c.hung.load(Ordering::Relaxed),
            closed_mid_response: c.closed_mid_response.load(Ordering::Relaxed),
            unparsable: c.unparsable.load(Ordering::Relaxed),
        }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        if let Some(t) = self.task.lock().unwrap().take() {
            t.abort();
        }
    }
}

const NO_CONTENT: &[u8] = b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n";
const ERROR_500: &[u8] =
    b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 14\r\n\r\ninjected fault";

/// Serves one keep-alive connection until the peer closes it or a fault ends it.
async fn connection(mut stream: TcpStream, shared: Arc<Shared>) {
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    loop {
        let Some(req) = read_request(&mut stream, &mut buf).await else {
            return;
        };
        shared.counters.requests.fetch_add(1, Ordering::Relaxed);
        let fault = *shared.fault.lock().unwrap();
        let roll = |p: f64| p > 0.0 && shared.rng.lock().unwrap().random_bool(p.min(1.0));
        match fault {
            Fault::Error500 { p } if roll(p) => {
                shared.counters.answered_500.fetch_add(1, Ordering::Relaxed);
                if stream.write_all(ERROR_500).await.is_err() {
                    return;
                }
                continue;
            }
            Fault::Hang { p } if roll(p) => {
                shared.counters.hung.fetch_add(1, Ordering::Relaxed);
                // Hold the connection until the client gives up (reads EOF) or 10 minutes.
                let mut one = [0u8; 1];
                let _ = tokio::time::timeout(Duration::from_secs(600), stream.read(&mut one)).await;
                return;
            }
            Fault::CloseMidResponse { p } if roll(p) => {
                shared
                    .counters
                    .closed_mid_response
                    .fetch_add(1, Ordering::Relaxed);
                let _ = stream.write_all(b"HTTP/1.1 20").await;
                let _ = stream.shutdown().await;
                return;
            }
            Fault::Slow { delay } => tokio::time::sleep(delay).await,
            _ => {}
        }
        let d = Delivery {
            key: req.key,
            event: req.event,
            webhook_id_matches: req.webhook_id_matches,
            at: Instant::now(),
        };
        if req.key == 0 || req.event == 0 {
            shared.counters.unparsable.fetch_add(1, Ordering::Relaxed);
        }
        // Recorded before answering: once the client sees 2xx, the delivery is on record.
        shared.deliveries.lock().unwrap().push(d);
        if stream.write_all(NO_CONTENT).await.is_err() {
            return;
        }
    }
}

struct Request {
    key: u128,
    event: u128,
    webhook_id_matches: bool,
}

/// Reads one request (head + `content-length` body) from `stream`, keeping any bytes of the
/// next request in `buf`. `None` on EOF or a malformed request.
async fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Request> {
    let head_end = loop {
        if let Some(p) = find(buf, b"\r\n\r\n") {
            break p + 4;
        }
        if buf.len() > 64 * 1024 {
            return None;
        }
        let mut chunk = [0u8; 8192];
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = std::str::from_utf8(&buf[..head_end]).ok()?.to_string();
    let mut content_length = 0usize;
    let mut key = None;
    let mut webhook_id = None;
    for line in head.split("\r\n").skip(1) {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => content_length = value.parse().ok()?,
            "idempotency-key" => key = Some(value.to_string()),
            "webhook-id" => webhook_id = Some(value.to_string()),
            _ => {}
        }
    }
    while buf.len() < head_end + content_length {
        let mut chunk = [0u8; 16384];
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = &buf[head_end..head_end + content_length];
    let event = event_id(body).unwrap_or(0);
    let parsed_key = key
        .as_deref()
        .and_then(|k| uuid::Uuid::parse_str(k).ok())
        .map(|u| u.as_u128())
        .unwrap_or(0);
    let req = Request {
        key: parsed_key,
        event,
        webhook_id_matches: key.is_some() && key == webhook_id,
    };
    buf.drain(..head_end + content_length);
    Some(req)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// `event_id` of the default webhook body, by a byte scan (no JSON parse on the hot path).
fn event_id(body: &[u8]) -> Option<u128> {
    let k = find(body, b"\"event_id\"")?;
    let rest = &body[k + 10..];
    let q = rest.iter().position(|&c| c == b'"')?;
    let rest = &rest[q + 1..];
    let end = rest.iter().position(|&c| c == b'"')?;
    let s = std::str::from_utf8(&rest[..end]).ok()?;
    uuid::Uuid::parse_str(s).ok().map(|u| u.as_u128())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_event_id() {
        let b = br#"{"before":null,"event_id": "0191e7a2-0000-7000-8000-00000000000a","x":1}"#;
        assert_eq!(event_id(b), Some(0x0191e7a2_0000_7000_8000_00000000000a));
        assert_eq!(event_id(br#"{"x":1}"#), None);
    }

    #[tokio::test]
    async fn records_keys_and_injects_faults() {
        let sink = Sink::start(7).await.unwrap();
        let client = reqwest::Client::new();
        let key = uuid::Uuid::new_v4().to_string();
        let body = format!(r#"{{"event_id":"{}"}}"#, uuid::Uuid::new_v4());
        let r = client
            .post(sink.url("/h"))
            .header("Idempotency-Key", &key)
            .header("webhook-id", &key)
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 204);
        let d = sink.deliveries();
        assert_eq!(d.len(), 1);
        assert!(d[0].webhook_id_matches);
        assert_eq!(d[0].key, uuid::Uuid::parse_str(&key).unwrap().as_u128());

        sink.set_fault(Fault::Error500 { p: 1.0 });
        let r = client
            .post(sink.url("/h"))
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 500);

        sink.set_fault(Fault::CloseMidResponse { p: 1.0 });
        assert!(client
            .post(sink.url("/h"))
            .body(body.clone())
            .send()
            .await
            .is_err());

        sink.set_fault(Fault::None);
        sink.down().await;
        assert!(client
            .post(sink.url("/h"))
            .body(body.clone())
            .send()
            .await
            .is_err());
        sink.up().await.unwrap();
        let r = client.post(sink.url("/h")).body(body).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 204);
        let c = sink.counts();
        assert_eq!(
            (c.accepted, c.answered_500, c.closed_mid_response),
            (2, 1, 1)
        );
    }
}
