//! The HTTP client of the per-event webhook request, the daemon's hot path: hyper-util's pooled
//! HTTP/1 client over a connector of ours. A probe on the project's machines measured this kind of
//! client at about half the CPU per request of reqwest; in the daemon, hyper is now 7.5 % of its CPU
//! per event (docs/benchmarks.md, "Hot path (issue 16)"). reqwest stays for the cold paths:
//! Slack, batched webhooks, enrichment lookups, the CLI.
//!
//! It keeps every guarantee of docs/security.md that the reqwest client gives:
//! - **the outbound guard is the connector**: [`GuardedResolve`] resolves a name and keeps only
//!   the addresses [`Guard::filter`] admits, so the sockets opened are to checked addresses only;
//!   an IP-literal host never reaches a resolver, so [`GuardedConnector`] checks it before
//!   connecting (and `ActionContext::checked_url` before the request is built);
//! - **no redirects**: this client never follows one (hyper-util's client has no redirect
//!   logic); a 3xx is judged by the action's status policy, which names the `Location`;
//! - **no proxy**: the connector dials the destination itself, whatever `HTTP(S)_PROXY` say;
//! - **TLS verified** with rustls and the platform verifier (the system's roots and the host
//!   name), as reqwest's `rustls` feature does; there is no way to turn it off;
//! - **bounded reads and time**: [`read_excerpt`] reads at most [`crate::action::DRAIN_LIMIT`]
//!   bytes of an answer, and the caller bounds the whole exchange (connect, send, answer, body)
//!   by the action's `timeout_ms`.
//!
//! Connections are kept alive and pooled per host (idle ones closed after 90 s).

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::Uri;
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use crate::outbound::Guard;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How long an unused pooled connection is kept (reqwest's default too).
const POOL_IDLE: Duration = Duration::from_secs(90);

/// The resolver of the webhook client: the system resolver (getaddrinfo on a blocking thread),
/// then [`Guard::filter`]. A name whose every address is refused fails with the
/// [`crate::outbound::Refused`] itself, found again by [`crate::outbound::refusal`].
#[derive(Debug, Clone)]
pub struct GuardedResolve {
    guard: Arc<Guard>,
}

impl GuardedResolve {
    pub fn new(guard: Arc<Guard>) -> GuardedResolve {
        GuardedResolve { guard }
    }

    /// Resolves `host` and keeps the admitted addresses (port 0: the connector sets the port).
    pub async fn resolve(&self, host: &str) -> Result<Vec<SocketAddr>, BoxError> {
        // The error of a failed lookup names no host: a host may come from a secret URL.
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, 0)).await?.collect();
        Ok(self.guard.filter(host, addrs)?)
    }
}

impl tower::Service<Name> for GuardedResolve {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { Ok(this.resolve(name.as_str()).await?.into_iter()) })
    }
}

/// The TCP connector: an IP-literal host is checked against the guard (the resolver never sees
/// it), a name goes through [`GuardedResolve`]; then hyper-util's connector dials the admitted
/// addresses, with `TCP_NODELAY`.
#[derive(Debug, Clone)]
pub struct GuardedConnector {
    guard: Arc<Guard>,
    http: HttpConnector<GuardedResolve>,
}

impl GuardedConnector {
    pub fn new(guard: Arc<Guard>) -> GuardedConnector {
        let mut http = HttpConnector::new_with_resolver(GuardedResolve::new(guard.clone()));
        // https:// is handled by the TLS connector wrapped around this one.
        http.enforce_http(false);
        http.set_nodelay(true);
        GuardedConnector { guard, http }
    }
}

impl tower::Service<Uri> for GuardedConnector {
    type Response = TokioIo<tokio::net::TcpStream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.http.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        if let Some(host) = dst.host() {
            let bare = host.trim_start_matches('[').trim_end_matches(']');
            if let Ok(ip) = bare.parse::<IpAddr>() {
                if let Err(r) = self.guard.check_addr(host, ip) {
                    return Box::pin(async move { Err(r.into()) });
                }
            }
        }
        let connecting = self.http.call(dst);
        Box::pin(async move { connecting.await.map_err(Into::into) })
    }
}

type Connector = hyper_rustls::HttpsConnector<GuardedConnector>;

/// The pooled client of the webhook action. Cheap to clone (the pool is shared).
#[derive(Clone, Debug)]
pub struct WebhookClient {
    client: hyper_util::client::legacy::Client<Connector, Full<Bytes>>,
}

/// Why the client could not be built.
#[derive(Debug, thiserror::Error)]
#[error("TLS setup of the webhook client: {0}")]
pub struct BuildError(#[from] rustls::Error);

impl WebhookClient {
    /// A client that dials through `guard`, keeping up to `max_idle_per_host` idle connections
    /// per host (the daemon passes `concurrent.max_in_flight`, so a full window of requests to
    /// one receiver finds its connections again).
    pub fn new(guard: Arc<Guard>, max_idle_per_host: usize) -> Result<WebhookClient, BuildError> {
        use rustls_platform_verifier::BuilderVerifierExt;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_platform_verifier()?
            .with_no_client_auth();
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(GuardedConnector::new(guard));
        let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE)
            .pool_max_idle_per_host(max_idle_per_host.max(1))
            .pool_timer(TokioTimer::new())
            .build(connector);
        Ok(WebhookClient { client })
    }

    /// Sends one request and returns the answer's head; the body is the caller's to read (with
    /// [`read_excerpt`]) inside the same time bound.
    pub async fn send(
        &self,
        req: hyper::Request<Full<Bytes>>,
    ) -> Result<hyper::Response<Incoming>, hyper_util::client::legacy::Error> {
        self.client.request(req).await
    }
}

/// Reads at most [`crate::action::DRAIN_LIMIT`] bytes of `body` and returns a short printable
/// excerpt of it (for an error message). A body read to its end lets the connection go back to
/// the pool; a longer one is dropped unread, which closes the connection.
pub async fn read_excerpt(mut body: Incoming) -> String {
    let mut excerpt = crate::action::Excerpt::default();
    while let Some(Ok(frame)) = body.frame().await {
        if let Ok(chunk) = frame.into_data() {
            if !excerpt.push(&chunk) {
                break;
            }
        }
    }
    excerpt.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn guard(allow: &[&str]) -> Arc<Guard> {
        Arc::new(Guard::new(&allow.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap())
    }

    #[tokio::test]
    async fn the_resolver_refuses_loopback_names_unless_allowed() {
        let refused = GuardedResolve::new(guard(&[]))
            .resolve("localhost")
            .await
            .unwrap_err();
        let r = crate::outbound::refusal(&*refused)
            .unwrap_or_else(|| panic!("no refusal in {refused:?}"));
        assert_eq!(r.host, "localhost");
        assert!(r.addr.is_loopback(), "{r}");

        // By name, and by range: both admit what localhost resolves to, and only that.
        for allow in [&["localhost"][..], &["127.0.0.0/8", "::1"][..]] {
            let kept = GuardedResolve::new(guard(allow))
                .resolve("localhost")
                .await
                .unwrap();
            assert!(!kept.is_empty(), "{allow:?}");
            assert!(kept.iter().all(|a| a.ip().is_loopback()), "{kept:?}");
        }
        // A host entry admits its own name only.
        let other = GuardedResolve::new(guard(&["hooks.internal"]))
            .resolve("localhost")
            .await
            .unwrap_err();
        assert!(crate::outbound::refusal(&*other).is_some(), "{other:?}");
    }

    /// A listener that counts the connections it accepts (and answers nothing).
    async fn counting_listener() -> (u16, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    drop(s);
                });
            }
        });
        (port, accepted)
    }

    fn get(url: &str) -> hyper::Request<Full<Bytes>> {
        hyper::Request::get(url).body(Full::default()).unwrap()
    }

    #[tokio::test]
    async fn refused_destinations_are_never_dialled() {
        let (port, accepted) = counting_listener().await;
        let client = WebhookClient::new(guard(&[]), 4).unwrap();
        for url in [
            format!("http://localhost:{port}/"),
            format!("http://127.0.0.1:{port}/"),
            format!("http://[::ffff:127.0.0.1]:{port}/"),
            format!("https://localhost:{port}/"),
        ] {
            let e = client.send(get(&url)).await.unwrap_err();
            let r = crate::outbound::refusal(&e).unwrap_or_else(|| panic!("{url}: {e:?}"));
            assert!(r.addr.to_canonical().is_loopback(), "{url}: {r}");
            assert!(e.is_connect(), "{url}: {e:?}");
        }
        // IP literals in refused ranges other than loopback are checked before any dial too.
        for url in ["http://169.254.169.254/latest/", "http://[fd00:ec2::254]/"] {
            let e = client.send(get(url)).await.unwrap_err();
            assert!(crate::outbound::refusal(&e).is_some(), "{url}: {e:?}");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn allowed_destinations_are_dialled() {
        let (port, accepted) = counting_listener().await;
        for allow in ["localhost", "127.0.0.1"] {
            let before = accepted.load(Ordering::SeqCst);
            let client = WebhookClient::new(guard(&[allow]), 4).unwrap();
            let host = if allow == "localhost" {
                "localhost"
            } else {
                "127.0.0.1"
            };
            let sent = tokio::time::timeout(
                Duration::from_millis(300),
                client.send(get(&format!("http://{host}:{port}/"))),
            )
            .await;
            assert!(sent.is_err(), "the listener never answers: {sent:?}");
            assert!(
                accepted.load(Ordering::SeqCst) > before,
                "{allow} is allowed: the client connects"
            );
        }
    }

    /// A tiny HTTP/1.1 server: answers every request on a connection with `answer`, counting
    /// connections and requests.
    async fn answering_server(answer: &'static str) -> (u16, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let conns = Arc::new(AtomicUsize::new(0));
        let reqs = Arc::new(AtomicUsize::new(0));
        let (c, r) = (conns.clone(), reqs.clone());
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                let r = r.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        // One request: headers only (the tests send no body).
                        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                            match s.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                        buf.drain(..end);
                        r.fetch_add(1, Ordering::SeqCst);
                        if s.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (port, conns, reqs)
    }

    #[tokio::test]
    async fn redirects_are_not_followed_and_connections_are_reused() {
        let (port, conns, reqs) = answering_server(
            "HTTP/1.1 302 Found\r\nLocation: http://169.254.169.254/\r\nContent-Length: 4\r\n\r\nmove",
        )
        .await;
        let client = WebhookClient::new(guard(&["127.0.0.1"]), 4).unwrap();
        for _ in 0..3 {
            let resp = client
                .send(get(&format!("http://127.0.0.1:{port}/hook")))
                .await
                .unwrap();
            assert_eq!(resp.status(), 302);
            assert_eq!(read_excerpt(resp.into_body()).await, "move");
        }
        assert_eq!(reqs.load(Ordering::SeqCst), 3, "no request to the Location");
        assert_eq!(conns.load(Ordering::SeqCst), 1, "one kept-alive connection");
    }

    #[tokio::test]
    async fn tls_is_verified() {
        // A real TLS server on loopback with a self-signed certificate for `localhost` (test
        // fixture, trusted by nobody): the handshake must fail on the certificate, and not one
        // byte of a request may reach the server's TLS layer.
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/");
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_file_iter(format!("{dir}untrusted-localhost.pem"))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
        let key = PrivateKeyDer::from_pem_file(format!("{dir}untrusted-localhost.key")).unwrap();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let server = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let handshakes = Arc::new(AtomicUsize::new(0));
        let done = handshakes.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                if acceptor.accept(s).await.is_ok() {
                    done.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
        let client = WebhookClient::new(guard(&["localhost"]), 4).unwrap();
        let e = tokio::time::timeout(
            Duration::from_secs(10),
            client.send(get(&format!("https://localhost:{port}/"))),
        )
        .await
        .expect("the handshake ends")
        .unwrap_err();
        let chain = crate::error_chain(&e).to_ascii_lowercase();
        assert!(e.is_connect(), "{e:?}");
        assert!(chain.contains("certificate"), "{chain}");
        assert_eq!(
            handshakes.load(Ordering::SeqCst),
            0,
            "no session established"
        );
    }
}
