//! A bounded HTTP/1 server for the process's own endpoints: the `metrics` layer's `/metrics`,
//! `/health` and `/ready`, and the `listen` webhook sink.
//!
//! `axum::serve` accepts every connection and keeps it for as long as the client likes: 200
//! idle connections to the metrics port held 200 descriptors, until the daemon could not open a
//! socket for a delivery and dead-lettered it with "Too many open files" (issue 18). Here:
//!
//! - each connection holds one of [`ServerLimits::max_connections`] permits; a connection over
//!   the cap is answered `503` and closed at once, never queued;
//! - a request's headers must arrive within [`ServerLimits::header_read_timeout`] of the
//!   connection opening or of the previous response (hyper's header timer), so a connection
//!   that sends nothing, sends its headers a byte at a time, or sits idle between keep-alive
//!   requests is closed after it;
//! - a connection that moves no byte either way for [`ServerLimits::idle_timeout`] in the middle
//!   of a request (a body trickling in, a client that stopped reading the answer, a handler that
//!   waits that long) is closed.
//!
//! Shutdown, in order: when `shutdown` resolves the listener is closed, every connection is asked
//! to finish the request it is serving and close (hyper's graceful shutdown), and whatever is
//! still open after `grace` is dropped.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How much a connection may cost the process (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerLimits {
    /// Connections served at once; one more is answered 503 and closed.
    pub max_connections: usize,
    /// A request's headers must be complete this long after the connection opened or the
    /// previous response ended.
    pub header_read_timeout: Duration,
    /// A connection that moves no byte for this long is closed.
    pub idle_timeout: Duration,
}

/// What a connection over the cap is told before it is closed.
const REFUSAL: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";

/// The pause after an accept error (out of descriptors, a connection reset before it was
/// accepted): the listener is kept, and the error is not retried in a tight loop.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// How often a repeated warning (refused connections, accept errors) is logged at most.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// Serves `router` on `listener` within `limits` until `shutdown` resolves, then drains the
/// open connections for up to `grace` (see the module documentation). `what` names the
/// endpoint in log lines ("metrics endpoint", "listen").
pub async fn serve(
    listener: TcpListener,
    router: axum::Router,
    limits: ServerLimits,
    what: &'static str,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let closing = CancellationToken::new();
    let mut connections = JoinSet::new();
    let mut refused = Warnings::default();
    let mut accept_errors = Warnings::default();
    tokio::pin!(shutdown);
    loop {
        // Finished connections are reaped as we go, so the set holds the open ones only.
        while connections.try_join_next().is_some() {}
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    if let Some(n) = accept_errors.due() {
                        tracing::warn!(error = %e, errors = n, "{what}: cannot accept a connection");
                    }
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
        };
        match permits.clone().try_acquire_owned() {
            Ok(permit) => {
                connections.spawn(connection(
                    stream,
                    router.clone(),
                    limits,
                    closing.clone(),
                    permit,
                ));
            }
            Err(_) => {
                refuse(stream);
                if let Some(n) = refused.due() {
                    tracing::warn!(
                        %peer,
                        refused = n,
                        max_connections = limits.max_connections,
                        "{what}: connection refused: {} connections are open, the most it serves at once",
                        limits.max_connections
                    );
                }
            }
        }
    }
    drop(listener);
    closing.cancel();
    let drained = tokio::time::timeout(grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::debug!(
            open = connections.len(),
            "{what}: dropping connections still open after the shutdown grace"
        );
        connections.abort_all();
    }
}

/// One accepted connection, served until it closes, times out, or shutdown drains it.
async fn connection(
    stream: TcpStream,
    router: axum::Router,
    limits: ServerLimits,
    closing: CancellationToken,
    _permit: OwnedSemaphorePermit,
) {
    let _ = stream.set_nodelay(true);
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Watched {
        inner: stream,
        activity: activity.clone(),
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let conn = builder.serve_connection(io, TowerToHyperService::new(router));
    tokio::pin!(conn);
    let mut draining = false;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "connection closed");
                }
                return;
            }
            () = closing.cancelled(), if !draining => {
                conn.as_mut().graceful_shutdown();
                draining = true;
            }
            () = tokio::time::sleep_until(activity.last() + limits.idle_timeout) => {
                if activity.last() + limits.idle_timeout <= Instant::now() {
                    tracing::debug!(idle = ?limits.idle_timeout, "closing an idle connection");
                    return;
                }
            }
        }
    }
}

/// Tells a connection over the cap why it is closed, without waiting for it: what it has sent
/// so far is read first (when unread input is left, closing resets the connection and the
/// client may never see the answer).
fn refuse(stream: TcpStream) {
    let mut sink = [0u8; 4096];
    let _ = stream.try_read(&mut sink);
    let _ = stream.try_write(REFUSAL);
}

/// When a connection last moved a byte, in milliseconds after it opened.
struct Activity {
    opened: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            opened: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.opened + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// The connection's socket, noting every byte read or written in its [`Activity`].
struct Watched {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.activity.touch();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// A warning repeated at most every [`WARN_EVERY`], with how many times it happened since.
#[derive(Default)]
struct Warnings {
    last: Option<Instant>,
    since: u64,
}

impl Warnings {
    /// Counts one occurrence; `Some(count)` when it should be logged now.
    fn due(&mut self) -> Option<u64> {
        self.since += 1;
        let now = Instant::now();
        match self.last {
            Some(at) if now.duration_since(at) < WARN_EVERY => None,
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.since))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// Serves a router (`GET /` answers `ok`, `POST /` its body, `/slow` after 300 ms) until the
    /// returned sender fires.
    async fn start(
        limits: ServerLimits,
    ) -> (
        SocketAddr,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    ) {
        let router = axum::Router::new()
            .route(
                "/",
                axum::routing::get(|| async { "ok" }).post(|body: String| async move { body }),
            )
            .route(
                "/slow",
                axum::routing::get(|| async {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    "slow"
                }),
            );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(
            listener,
            router,
            limits,
            "test endpoint",
            async move {
                let _ = stopped.await;
            },
            Duration::from_secs(2),
        ));
        (addr, stop, server)
    }

    /// Everything the server sends until it closes the connection, or `None` when it is still
    /// open after `within`.
    async fn until_closed(stream: &mut TcpStream, within: Duration) -> Option<String> {
        let mut got = Vec::new();
        let read = tokio::time::timeout(within, async {
            let mut buf = [0u8; 1024];
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
        })
        .await;
        read.ok()
            .map(|()| String::from_utf8_lossy(&got).into_owned())
    }

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        until_closed(&mut s, Duration::from_secs(5))
            .await
            .expect("no answer within 5 s")
    }

    /// Issue 18, item 2: the cap holds (connections over it are answered 503 and closed at once,
    /// not queued), connections that send nothing are closed after the header timeout, and the
    /// endpoint answers afterwards.
    #[tokio::test]
    async fn the_cap_holds_idle_connections_are_closed_and_it_still_answers() {
        let limits = ServerLimits {
            max_connections: 4,
            header_read_timeout: Duration::from_millis(500),
            idle_timeout: Duration::from_secs(30),
        };
        let (addr, stop, server) = start(limits).await;
        let mut idle = Vec::new();
        for _ in 0..20 {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        // Read from all of them at once, for less than the header timeout.
        let seen = futures::future::join_all(
            idle.iter_mut()
                .map(|s| until_closed(s, Duration::from_millis(250))),
        )
        .await;
        let mut refused = 0;
        let mut open = Vec::new();
        for (s, seen) in idle.into_iter().zip(seen) {
            match seen {
                Some(text) => {
                    assert!(text.starts_with("HTTP/1.1 503"), "{text:?}");
                    refused += 1;
                }
                None => open.push(s),
            }
        }
        assert_eq!(
            refused, 16,
            "every connection over the cap of 4 is refused at once"
        );
        for mut s in open {
            let text = until_closed(&mut s, Duration::from_secs(5)).await;
            assert_eq!(
                text.as_deref(),
                Some(""),
                "a connection that sends no request is closed after the header timeout"
            );
        }
        let answer = get(addr, "/").await;
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.ends_with("ok"),
            "{answer}"
        );
        let _ = stop.send(());
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("serve returns after shutdown")
            .unwrap();
    }

    /// A request whose body stops arriving is closed after the idle timeout, although its
    /// headers came in time (so the header timer no longer runs).
    #[tokio::test]
    async fn a_request_that_stops_moving_is_closed_after_the_idle_timeout() {
        let limits = ServerLimits {
            max_connections: 4,
            header_read_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_millis(400),
        };
        let (addr, _stop, _server) = start(limits).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n0123456789")
            .await
            .unwrap();
        let started = std::time::Instant::now();
        let closed = until_closed(&mut s, Duration::from_secs(10)).await;
        assert!(closed.is_some(), "still open after 10 s");
        assert!(
            started.elapsed() >= Duration::from_millis(300),
            "{:?}",
            started.elapsed()
        );
        // The permit came back.
        for _ in 0..5 {
            assert!(get(addr, "/").await.starts_with("HTTP/1.1 200"));
        }
    }

    /// Shutdown lets a request in flight finish, refuses new connections, and returns.
    #[tokio::test]
    async fn shutdown_finishes_the_request_in_flight() {
        let limits = ServerLimits {
            max_connections: 4,
            header_read_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(5),
        };
        let (addr, stop, server) = start(limits).await;
        let slow = tokio::spawn(get(addr, "/slow"));
        tokio::time::sleep(Duration::from_millis(100)).await;
        let _ = stop.send(());
        let answer = slow.await.unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.ends_with("slow"),
            "{answer}"
        );
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("serve returns after shutdown")
            .unwrap();
        assert!(
            TcpStream::connect(addr).await.is_err(),
            "the listener is closed"
        );
    }
}
