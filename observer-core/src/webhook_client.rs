//! The HTTP client of the per-event webhook request, the daemon's hot path: a small pool of
//! hyper HTTP/1 connections over a connector of ours. reqwest stays for the cold paths: Slack,
//! batched webhooks, enrichment lookups, the CLI.
//!
//! It keeps every guarantee of docs/security.md that the reqwest client gives:
//! - **the outbound guard is the connector**: [`GuardedResolve`] resolves a name and keeps only
//!   the addresses [`Guard::filter`] admits, so the sockets opened are to checked addresses only;
//!   an IP-literal host never reaches a resolver, so [`GuardedConnector`] checks it before
//!   connecting (and `ActionContext::checked_url` before the request is built);
//! - **no redirects**: this client never follows one; a 3xx is judged by the action's status
//!   policy, which names the `Location`;
//! - **no proxy**: the connector dials the destination itself, whatever `HTTP(S)_PROXY` say;
//! - **TLS verified** with rustls and the platform verifier (the system's roots and the host
//!   name), as reqwest's `rustls` feature does; there is no way to turn it off;
//! - **bounded reads and time**: [`WebhookClient::send_to`] reads at most
//!   [`crate::action::DRAIN_LIMIT`] bytes of an answer, and the caller bounds the whole exchange
//!   (connect, send, answer, body) by the action's `timeout_ms`.
//!
//! Connections are kept alive and pooled per scheme and authority (at most
//! `max_idle_per_host` idle ones, each closed after 90 s unused). The pool is ours rather than
//! hyper-util's: that client spawned a task per request to put the connection back once it was
//! ready again, and went through its pool's checkout machinery around every request; here the
//! request's own future puts its connection back after reading the answer (docs/benchmarks.md).
//! A request that a pooled connection could not take because the server had closed it
//! meanwhile (hyper hands the unsent request back) is sent on another connection, as
//! hyper-util's client does.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::FutureExt;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HeaderValue, HOST};
use hyper::http::uri::{Authority, PathAndQuery, Scheme};
use hyper::Uri;
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tower::ServiceExt;

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

/// How often, at most, the pool looks through every host's idle connections for expired ones.
const SWEEP_EVERY: Duration = Duration::from_secs(30);

/// The pooled client of the webhook action. Cheap to clone (the pool is shared).
#[derive(Clone)]
pub struct WebhookClient {
    pool: Arc<Pool>,
}

impl std::fmt::Debug for WebhookClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookClient")
            .field("max_idle_per_host", &self.pool.max_idle_per_host)
            .finish_non_exhaustive()
    }
}

/// A destination: connections are shared by requests with the same scheme and authority.
#[derive(Debug, Clone)]
struct Key {
    https: bool,
    authority: Authority,
    /// `http(s)://authority` in lower case: what the pool compares (`Authority`'s own
    /// comparison folds case byte by byte on every lookup).
    id: Arc<str>,
}

impl PartialEq for Key {
    fn eq(&self, other: &Key) -> bool {
        self.id == other.id
    }
}

impl Eq for Key {}

impl std::hash::Hash for Key {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.id.hash(h);
    }
}

/// An idle keep-alive connection, and since when.
struct Idle {
    tx: SendRequest<Full<Bytes>>,
    since: Instant,
}

struct Pool {
    connector: Connector,
    idle: Mutex<Idles>,
    max_idle_per_host: usize,
}

/// The idle connections by destination, and when they are next looked through for expired ones.
struct Idles {
    by_key: foldhash::HashMap<Key, Vec<Idle>>,
    next_sweep: Instant,
}

/// Why a request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection could be opened: refused by the outbound guard, not resolvable, not
    /// reachable, or the TLS handshake failed.
    #[error("{0}")]
    Connect(#[source] BoxError),
    /// The connection failed while the request was sent or answered.
    #[error(transparent)]
    Http(#[from] hyper::Error),
    /// The URL cannot be requested (no scheme or authority, or a scheme other than http(s)).
    /// The URL is not repeated: it may hold a secret (the caller names it, redacted).
    #[error("not an http:// or https:// URL with a host")]
    Target,
}

impl SendError {
    /// True when no connection was made (nothing was sent).
    pub fn is_connect(&self) -> bool {
        matches!(self, SendError::Connect(_))
    }
}

/// The answer to a request: its head, and a short printable excerpt of its body.
#[derive(Debug)]
pub struct Answer {
    pub head: hyper::http::response::Parts,
    pub excerpt: String,
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
        let pool = Arc::new(Pool {
            connector,
            idle: Mutex::new(Idles {
                by_key: Default::default(),
                next_sweep: Instant::now() + SWEEP_EVERY,
            }),
            max_idle_per_host: max_idle_per_host.max(1),
        });
        // Idle connections are also closed when nothing is sent at all (the sweep in `keep`
        // needs traffic); the task ends with the last clone of the client.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let weak = Arc::downgrade(&pool);
            runtime.spawn(async move {
                loop {
                    tokio::time::sleep(SWEEP_EVERY).await;
                    let Some(pool) = weak.upgrade() else { break };
                    pool.sweep(Instant::now());
                }
            });
        }
        Ok(WebhookClient { pool })
    }

    /// Sends one request (its URI absolute) and reads the answer: see [`WebhookClient::send_to`].
    /// The tests' shorthand; the daemon works its targets out once, beforehand.
    #[cfg(test)]
    async fn exchange(&self, req: hyper::Request<Full<Bytes>>) -> Result<Answer, SendError> {
        let target = Target::new(req.uri())?;
        self.send_to(&target, req).await
    }

    /// Sends one request to `target` (whatever `req`'s URI says) and reads the answer: its head,
    /// and at most [`crate::action::DRAIN_LIMIT`] bytes of its body, of which a short excerpt is
    /// kept. An answer read to its end leaves the connection for the next request; a longer one
    /// is dropped unread, which closes the connection.
    pub async fn send_to(
        &self,
        target: &Target,
        mut req: hyper::Request<Full<Bytes>>,
    ) -> Result<Answer, SendError> {
        *req.uri_mut() = target.path.clone();
        if !req.headers().contains_key(HOST) {
            req.headers_mut().insert(HOST, target.host.clone());
        }
        loop {
            let (mut tx, reused) = match self.pool.checkout(&target.key) {
                Some(tx) => (tx, true),
                // Boxed: the TLS stream and the handshake are large, and only a new
                // connection needs them (see `CompiledAction::attempt`).
                None => (Box::pin(self.pool.connect(&target.key)).await?, false),
            };
            match tx.try_send_request(req).await {
                Ok(resp) => {
                    let (head, body) = resp.into_parts();
                    let (excerpt, complete) = read_body(body).await;
                    if complete {
                        self.pool.put_back(target.key.clone(), tx);
                    }
                    return Ok(Answer { head, excerpt });
                }
                Err(mut e) => match e.take_message() {
                    // Closed by the server while idle, before this request was written: it was
                    // not sent, so it goes out on another connection.
                    Some(unsent) if reused => req = unsent,
                    _ => return Err(SendError::Http(e.into_error())),
                },
            }
        }
    }
}

/// Where requests to one URL go, worked out once (a webhook URL without placeholders is worked
/// out once per action): the pool's key, the request target in origin form (what HTTP/1 sends
/// to a server) and the `Host` header.
#[derive(Debug, Clone)]
pub struct Target {
    key: Key,
    path: Uri,
    host: HeaderValue,
}

impl Target {
    /// The target of an absolute http:// or https:// URI.
    pub fn new(uri: &Uri) -> Result<Target, SendError> {
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(SendError::Target),
        };
        let Some(authority) = uri.authority().cloned() else {
            return Err(SendError::Target);
        };
        let path = uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        // The port only when it is not the scheme's default, as browsers and hyper-util do.
        let host = match authority.port_u16() {
            Some(p) if p != if https { 443 } else { 80 } => format!("{}:{p}", authority.host()),
            _ => authority.host().to_string(),
        };
        let host = HeaderValue::from_str(&host).map_err(|_| SendError::Target)?;
        Ok(Target {
            key: Key {
                https,
                id: format!(
                    "{}://{}",
                    if https { "https" } else { "http" },
                    authority.as_str().to_ascii_lowercase()
                )
                .into(),
                authority,
            },
            path: Uri::from(path),
            host,
        })
    }
}

impl Pool {
    /// An idle connection to `key` that can take a request now, if any (the most recently used
    /// first; closed and expired ones are dropped on the way).
    fn checkout(&self, key: &Key) -> Option<SendRequest<Full<Bytes>>> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.by_key.get_mut(key)?;
        while let Some(c) = list.pop() {
            if c.since.elapsed() < POOL_IDLE && c.tx.is_ready() {
                return Some(c.tx);
            }
        }
        None
    }

    /// Opens a connection to `key` through the guarded connector (TLS for https) and starts the
    /// task that drives it; the task ends when the connection closes or is dropped.
    async fn connect(&self, key: &Key) -> Result<SendRequest<Full<Bytes>>, SendError> {
        let dst = Uri::builder()
            .scheme(if key.https {
                Scheme::HTTPS
            } else {
                Scheme::HTTP
            })
            .authority(key.authority.clone())
            .path_and_query("/")
            .build()
            .map_err(|e| SendError::Connect(e.into()))?;
        let io = self
            .connector
            .clone()
            .oneshot(dst)
            .await
            .map_err(SendError::Connect)?;
        let (tx, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| SendError::Connect(e.into()))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "webhook connection closed with an error");
            }
        });
        Ok(tx)
    }

    /// Keeps a connection whose answer was read to its end for the next request to `key`.
    fn put_back(self: &Arc<Self>, key: Key, mut tx: SendRequest<Full<Bytes>>) {
        match tx.ready().now_or_never() {
            Some(Ok(())) => self.keep(key, tx),
            Some(Err(_)) => {}
            // Not ready the moment the answer was read (its end not yet processed by the
            // connection's task): wait for it off this request's path, within a bound.
            None => {
                let pool = self.clone();
                tokio::spawn(async move {
                    if let Ok(Ok(())) = tokio::time::timeout(POOL_READY, tx.ready()).await {
                        pool.keep(key, tx);
                    }
                });
            }
        }
    }

    fn keep(&self, key: Key, tx: SendRequest<Full<Bytes>>) {
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if now >= idle.next_sweep {
            idle.sweep(now);
        }
        let list = idle.by_key.entry(key).or_default();
        if list.len() < self.max_idle_per_host {
            list.push(Idle { tx, since: now });
        }
    }
}

impl Pool {
    /// Closes the idle connections that expired or that their server closed.
    fn sweep(&self, now: Instant) {
        self.idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .sweep(now);
    }
}

impl Idles {
    fn sweep(&mut self, now: Instant) {
        self.next_sweep = now + SWEEP_EVERY;
        self.by_key.retain(|_, list| {
            list.retain(|c| now.duration_since(c.since) < POOL_IDLE && !c.tx.is_closed());
            !list.is_empty()
        });
    }
}

/// How long a connection whose answer was read may take to be ready for the next request
/// before it is dropped instead of pooled.
const POOL_READY: Duration = Duration::from_secs(5);

/// Reads at most [`crate::action::DRAIN_LIMIT`] bytes of `body` and returns a short printable
/// excerpt of it (for an error message), and whether the body was read to its end.
async fn read_body(mut body: Incoming) -> (String, bool) {
    let mut excerpt = crate::action::Excerpt::default();
    let complete = loop {
        match body.frame().await {
            None => break true,
            Some(Ok(frame)) => {
                if let Ok(chunk) = frame.into_data() {
                    if !excerpt.push(&chunk) {
                        break false;
                    }
                }
            }
            Some(Err(_)) => break false,
        }
    };
    (excerpt.finish(), complete)
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
            let e = client.exchange(get(&url)).await.unwrap_err();
            let r = crate::outbound::refusal(&e).unwrap_or_else(|| panic!("{url}: {e:?}"));
            assert!(r.addr.to_canonical().is_loopback(), "{url}: {r}");
            assert!(e.is_connect(), "{url}: {e:?}");
        }
        // IP literals in refused ranges other than loopback are checked before any dial too.
        for url in ["http://169.254.169.254/latest/", "http://[fd00:ec2::254]/"] {
            let e = client.exchange(get(url)).await.unwrap_err();
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
                client.exchange(get(&format!("http://{host}:{port}/"))),
            )
            .await;
            assert!(sent.is_err(), "the listener never answers: {sent:?}");
            assert!(
                accepted.load(Ordering::SeqCst) > before,
                "{allow} is allowed: the client connects"
            );
        }
    }

    #[tokio::test]
    async fn redirects_are_not_followed_and_connections_are_reused() {
        let (port, conns, heads) = recording_server(
            "HTTP/1.1 302 Found\r\nLocation: http://169.254.169.254/\r\nContent-Length: 4\r\n\r\nmove",
            false,
        )
        .await;
        let client = WebhookClient::new(guard(&["127.0.0.1"]), 4).unwrap();
        for _ in 0..3 {
            let answer = client
                .exchange(get(&format!("http://127.0.0.1:{port}/hook")))
                .await
                .unwrap();
            assert_eq!(answer.head.status, 302);
            assert_eq!(answer.excerpt, "move");
        }
        assert_eq!(heads.lock().unwrap().len(), 3, "no request to the Location");
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
            client.exchange(get(&format!("https://localhost:{port}/"))),
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

    /// A tiny HTTP/1.1 server that keeps the head of every request it reads, answers each with
    /// `answer`, and closes the connection after each answer when `close_after` (without saying
    /// so: what a server or proxy that drops idle keep-alive connections looks like).
    async fn recording_server(
        answer: &'static str,
        close_after: bool,
    ) -> (u16, Arc<AtomicUsize>, Arc<std::sync::Mutex<Vec<String>>>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let conns = Arc::new(AtomicUsize::new(0));
        let heads = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (c, h) = (conns.clone(), heads.clone());
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                let h = h.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                            match s.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                        let head: Vec<u8> = buf.drain(..end).collect();
                        h.lock()
                            .unwrap()
                            .push(String::from_utf8_lossy(&head).into_owned());
                        if s.write_all(answer.as_bytes()).await.is_err() || close_after {
                            return;
                        }
                    }
                });
            }
        });
        (port, conns, heads)
    }

    #[tokio::test]
    async fn requests_go_in_origin_form_with_the_host_header() {
        let (port, _, heads) = recording_server("HTTP/1.1 204 No Content\r\n\r\n", false).await;
        let client = WebhookClient::new(guard(&["127.0.0.1"]), 4).unwrap();
        let answer = client
            .exchange(get(&format!("http://127.0.0.1:{port}/hooks/a?x=1")))
            .await
            .unwrap();
        assert_eq!(answer.head.status, 204);
        let head = heads.lock().unwrap()[0].to_ascii_lowercase();
        assert!(head.starts_with("get /hooks/a?x=1 http/1.1\r\n"), "{head}");
        assert!(
            head.contains(&format!("\r\nhost: 127.0.0.1:{port}\r\n")),
            "{head}"
        );
        // A URL without a path asks for `/`; a scheme other than http(s) is refused, unsent.
        client
            .exchange(get(&format!("http://127.0.0.1:{port}")))
            .await
            .unwrap();
        assert!(heads.lock().unwrap()[1].starts_with("GET / HTTP/1.1"));
        let e = client
            .exchange(
                hyper::Request::get("ftp://127.0.0.1/")
                    .body(Full::default())
                    .unwrap(),
            )
            .await
            .unwrap_err();
        assert!(matches!(e, SendError::Target), "{e:?}");
    }

    /// A server that closes every connection after its answer: the pooled connection is found
    /// closed, and the next request goes out on a new one, answered, not failed.
    #[tokio::test]
    async fn a_connection_the_server_closed_is_not_reused() {
        let (port, conns, heads) =
            recording_server("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", true).await;
        let client = WebhookClient::new(guard(&["127.0.0.1"]), 4).unwrap();
        for i in 0..5 {
            let answer = client
                .exchange(get(&format!("http://127.0.0.1:{port}/{i}")))
                .await
                .unwrap_or_else(|e| panic!("request {i}: {e}"));
            assert_eq!(answer.excerpt, "ok");
        }
        assert_eq!(heads.lock().unwrap().len(), 5, "each request sent once");
        assert_eq!(conns.load(Ordering::SeqCst), 5);
    }

    /// Concurrent requests each get a connection; afterwards at most `max_idle_per_host` are
    /// kept, and the next round reuses them.
    #[tokio::test]
    async fn the_pool_keeps_at_most_its_idle_limit_and_reuses_it() {
        let (port, conns, heads) = recording_server("HTTP/1.1 204 No Content\r\n\r\n", false).await;
        let client = WebhookClient::new(guard(&["127.0.0.1"]), 2).unwrap();
        let round = || {
            futures::future::join_all(
                (0..4).map(|_| client.exchange(get(&format!("http://127.0.0.1:{port}/")))),
            )
        };
        for r in round().await {
            assert_eq!(r.unwrap().head.status, 204);
        }
        assert_eq!(
            conns.load(Ordering::SeqCst),
            4,
            "four at once, four connections"
        );
        // Sequential requests take the kept connections: no new ones.
        for _ in 0..6 {
            client
                .exchange(get(&format!("http://127.0.0.1:{port}/")))
                .await
                .unwrap();
        }
        assert_eq!(conns.load(Ordering::SeqCst), 4);
        // Four at once again: the two kept ones and two new ones.
        for r in round().await {
            r.unwrap();
        }
        assert_eq!(conns.load(Ordering::SeqCst), 6);
        assert_eq!(heads.lock().unwrap().len(), 14);
    }

    /// An idle connection past its 90 s is closed by the sweep, traffic or not.
    #[tokio::test]
    async fn idle_connections_expire() {
        let (port, conns, _) = recording_server("HTTP/1.1 204 No Content\r\n\r\n", false).await;
        let client = WebhookClient::new(guard(&["127.0.0.1"]), 4).unwrap();
        client
            .exchange(get(&format!("http://127.0.0.1:{port}/")))
            .await
            .unwrap();
        let idle = || {
            client
                .pool
                .idle
                .lock()
                .unwrap()
                .by_key
                .values()
                .map(Vec::len)
                .sum::<usize>()
        };
        assert_eq!(idle(), 1);
        client.pool.sweep(Instant::now() + POOL_IDLE / 2);
        assert_eq!(idle(), 1, "not yet expired");
        client.pool.sweep(Instant::now() + POOL_IDLE);
        assert_eq!(idle(), 0, "expired and closed");
        client
            .exchange(get(&format!("http://127.0.0.1:{port}/")))
            .await
            .unwrap();
        assert_eq!(
            conns.load(Ordering::SeqCst),
            2,
            "a new connection after expiry"
        );
    }
}
