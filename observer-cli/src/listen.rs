//! `fraiseql-observers listen`: a local webhook sink for debugging observers.
//!
//! It accepts any request on any path, prints what arrived (method, path, idempotency key,
//! message id, signature verdict and body) and answers with a chosen status code, so users can
//! watch deliveries, check their signing secret and exercise the daemon's retry behaviour
//! without deploying a receiver.
//!
//! The server is factored out of [`run`] ([`serve`] takes a bound listener and a channel for
//! output) so tests can bind port 0 and read the printed lines back.

use std::fmt::Write as _;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context as _};
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest as _, Request, State};
use axum::http::header::CONTENT_LENGTH;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use chrono::{DateTime, Local, SecondsFormat, Utc};
use observer_core::http_server::{self, ServerLimits};
use observer_core::printable;
use observer_core::signing::{self, SigningKey};
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};

/// Largest request body accepted; larger ones are answered with 413.
const MAX_BODY_BYTES: usize = 10 * 1024 * 1024;
/// Non-JSON bodies are shown up to this many bytes.
const MAX_TEXT_BYTES: usize = 64 * 1024;
/// How long in-flight requests may take to finish once shutdown starts, so a stalled client
/// cannot keep the process alive after Ctrl-C.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Printed deliveries waiting for stdout; a full buffer makes handlers wait (backpressure
/// from a slow pipe) instead of growing memory.
const LINE_BUFFER: usize = 256;
/// Headers copied into the `--json` output. A fixed list so credentials such as
/// `Authorization` are never echoed.
const SHOWN_HEADERS: &[&str] = &[
    "content-type",
    "content-length",
    "user-agent",
    "idempotency-key",
    signing::HEADER_ID,
    signing::HEADER_TIMESTAMP,
    signing::HEADER_SIGNATURE,
    "traceparent",
];

/// Options of `fraiseql-observers listen`.
#[derive(clap::Args)]
pub struct ListenArgs {
    /// Port to listen on (127.0.0.1 unless --bind says otherwise).
    #[arg(long, default_value_t = 8787)]
    pub port: u16,
    /// Address to bind; use 0.0.0.0 to accept deliveries from other hosts or containers.
    #[arg(long, default_value = "127.0.0.1")]
    pub bind: IpAddr,
    /// Secret(s) to verify signatures with, whsec_… or raw (repeatable).
    // hide_env_values: otherwise `--help` would print the secret taken from the environment.
    #[arg(
        long = "secret",
        env = "FRAISEQL_LISTEN_SECRET",
        hide_env_values = true
    )]
    pub secrets: Vec<String>,
    /// Print one JSON object per delivery instead of the readable form.
    #[arg(long)]
    pub json: bool,
    /// Status code to answer with (default 204) — lets users exercise retries.
    #[arg(long, default_value_t = 204)]
    pub status: u16,
    /// Exit after this many deliveries (0 = run until Ctrl-C).
    #[arg(long, default_value_t = 0)]
    pub count: u64,
    /// Connections served at once; one more is answered 503 and closed (1..=10000).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub max_connections: u64,
    /// Close a connection whose request headers have not arrived this long after it opened or
    /// after the previous response (also how long an idle keep-alive connection is kept).
    #[arg(long, value_name = "MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(100..=600_000))]
    pub header_read_timeout_ms: u64,
    /// Close a connection that moves no byte for this long in the middle of a request.
    #[arg(long, value_name = "MS", default_value_t = 60_000, value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
    pub idle_timeout_ms: u64,
}

// Written by hand rather than derived so that debug-logging the parsed command line never
// shows the secrets.
impl std::fmt::Debug for ListenArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListenArgs")
            .field("port", &self.port)
            .field("bind", &self.bind)
            .field(
                "secrets",
                &format_args!("<{} redacted>", self.secrets.len()),
            )
            .field("json", &self.json)
            .field("status", &self.status)
            .field("count", &self.count)
            .field("max_connections", &self.max_connections)
            .field("header_read_timeout_ms", &self.header_read_timeout_ms)
            .field("idle_timeout_ms", &self.idle_timeout_ms)
            .finish()
    }
}

/// Runs the sink until Ctrl-C/SIGTERM, or until `--count` deliveries have been printed.
pub async fn run(args: ListenArgs) -> anyhow::Result<()> {
    // Validate everything before binding so a typo fails fast and leaves the port free.
    let config = SinkConfig::from_args(&args)?;
    let addr = SocketAddr::new(args.bind, args.port);
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| bind_error(addr, e))?;
    let local = listener
        .local_addr()
        .with_context(|| format!("cannot read the address bound for {addr}"))?;
    eprintln!(
        "listening on http://{local}/ (signatures: {})",
        config.describe_checking()
    );

    let (lines_tx, lines_rx) = mpsc::channel(LINE_BUFFER);
    let (finish_tx, finish_rx) = oneshot::channel();
    // Dropped when the printer ends, which before `finish` means stdout failed (e.g. the
    // reader of a pipe exited): stop then instead of answering deliveries nobody sees.
    let (printer_alive, printer_gone) = oneshot::channel::<()>();
    let printer = tokio::spawn(async move {
        let result = print_lines(lines_rx, finish_rx).await;
        drop(printer_alive);
        result
    });
    let shutdown = async move {
        tokio::select! {
            () = shutdown_signal() => {}
            _ = printer_gone => {}
        }
    };

    serve(listener, config, lines_tx, shutdown).await;

    // Let the printer drain what the last requests queued, then stop it.
    let _ = finish_tx.send(());
    let printed = printer.await.context("stdout printer task failed")?;
    match printed {
        // The reader went away (`listen | head`): nothing left to show, not a failure.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other.context("cannot write to stdout"),
    }
}

/// Validated options for the server.
struct SinkConfig {
    keys: Vec<SigningKey>,
    status: StatusCode,
    json: bool,
    count: u64,
    limits: ServerLimits,
}

impl SinkConfig {
    fn from_args(args: &ListenArgs) -> anyhow::Result<SinkConfig> {
        // 1xx cannot be a final response and 600+ is not HTTP; 3xx is allowed because
        // senders may well need to be tested against redirects.
        if !(200..=599).contains(&args.status) {
            return Err(anyhow!(
                "--status must be between 200 and 599, got {}",
                args.status
            ));
        }
        let status = StatusCode::from_u16(args.status)
            .map_err(|_| anyhow!("--status {} is not a valid HTTP status", args.status))?;
        let keys = args
            .secrets
            .iter()
            .enumerate()
            .map(|(i, secret)| {
                // The error text never includes the secret, only its position.
                SigningKey::parse(secret).map_err(|e| {
                    anyhow!("secret #{} (--secret / FRAISEQL_LISTEN_SECRET): {e}", i + 1)
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(SinkConfig {
            keys,
            status,
            json: args.json,
            count: args.count,
            limits: ServerLimits {
                max_connections: usize::try_from(args.max_connections).map_err(|_| {
                    anyhow!("--max-connections {} is too large", args.max_connections)
                })?,
                header_read_timeout: Duration::from_millis(args.header_read_timeout_ms),
                idle_timeout: Duration::from_millis(args.idle_timeout_ms),
            },
        })
    }

    fn describe_checking(&self) -> String {
        match self.keys.len() {
            0 => "not checked".to_owned(),
            n => format!("verified with {n} secret(s)"),
        }
    }
}

fn bind_error(addr: SocketAddr, e: std::io::Error) -> anyhow::Error {
    let hint = match e.kind() {
        std::io::ErrorKind::AddrInUse => " (is another process using the port? try --port)",
        std::io::ErrorKind::PermissionDenied => " (ports below 1024 need privileges; try --port)",
        std::io::ErrorKind::AddrNotAvailable => {
            " (no local interface has that address; see --bind)"
        }
        _ => "",
    };
    anyhow!("cannot listen on {addr}: {e}{hint}")
}

/// Shared state of the request handler.
struct Sink {
    config: SinkConfig,
    /// Deliveries printed so far, for `--count`.
    delivered: AtomicU64,
    /// Formatted output, one message per delivery.
    lines: mpsc::Sender<String>,
    /// Set to `true` to begin shutdown (count reached, or output gone).
    stop: watch::Sender<bool>,
}

/// Serves on `listener` until `shutdown` resolves, `--count` deliveries have been handled, or
/// the receiving end of `lines` is dropped. Each delivery becomes one message on `lines`
/// (a single line with `--json`; a multi-line block otherwise).
async fn serve(
    listener: TcpListener,
    config: SinkConfig,
    lines: mpsc::Sender<String>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let (stop_tx, mut stop_rx) = watch::channel(false);
    let limits = config.limits;
    let sink = Arc::new(Sink {
        config,
        delivered: AtomicU64::new(0),
        lines,
        stop: stop_tx,
    });
    let app = Router::new()
        .fallback(handle)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(sink);

    let signal = async move {
        tokio::select! {
            () = shutdown => {}
            _ = stop_rx.wait_for(|stop| *stop) => {}
        }
    };
    // Requests in flight at shutdown get SHUTDOWN_GRACE; connections still open after it are
    // dropped (with the senders of `lines` they hold).
    http_server::serve(listener, app, limits, "listen", signal, SHUTDOWN_GRACE).await;
}

/// Answers every request: records it, then replies with the configured status.
async fn handle(
    State(sink): State<Arc<Sink>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    request: Request,
) -> Response {
    let received_at = Utc::now();
    let path = uri
        .path_and_query()
        .map_or_else(|| uri.path().to_owned(), |pq| pq.as_str().to_owned());
    // A declared length over the limit is refused before reading anything, so the sender
    // gets its 413 at once instead of after uploading 10 MiB. Chunked bodies are caught by
    // `DefaultBodyLimit` while reading.
    let declared_len = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let too_large = declared_len.is_some_and(|len| len > MAX_BODY_BYTES as u64);
    let body = if too_large {
        Err((
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "body of {} bytes exceeds the {MAX_BODY_BYTES}-byte limit",
                declared_len.unwrap_or_default()
            ),
        ))
    } else {
        Bytes::from_request(request, &())
            .await
            .map_err(|rejection| (rejection.status(), rejection.body_text()))
    };
    let body = match body {
        Ok(body) => body,
        Err((status, reason)) => {
            // Typically the size limit (413). Shown so the user sees why the sender got an
            // error, but not counted as a delivery: nothing was received.
            let text = rejected_text(&sink.config, received_at, &method, &path, status, &reason);
            let _ = sink.lines.send(text).await;
            return (status, reason).into_response();
        }
    };

    let delivery = Delivery::new(
        &sink.config.keys,
        received_at,
        method,
        path,
        &headers,
        &body,
    );
    let text = if sink.config.json {
        delivery.to_json_line()
    } else {
        delivery.to_readable()
    };
    if sink.lines.send(text).await.is_err() {
        // Nobody prints any more (stdout closed); keep answering would only hide that.
        sink.stop.send_replace(true);
    }
    let delivered = sink.delivered.fetch_add(1, Ordering::SeqCst) + 1;
    if sink.config.count != 0 && delivered >= sink.config.count {
        // Graceful shutdown still lets this response go out.
        sink.stop.send_replace(true);
    }
    sink.config.status.into_response()
}

/// Outcome of the signature check of one delivery.
#[derive(Debug, Clone, PartialEq)]
enum Verdict {
    Verified,
    Invalid(String),
    Unsigned,
    Unchecked,
}

/// Everything printed about one request.
struct Delivery {
    received_at: DateTime<Utc>,
    method: Method,
    path: String,
    headers: Vec<(&'static str, String)>,
    idempotency_key: Option<String>,
    webhook_id: Option<String>,
    verdict: Verdict,
    body: ShownBody,
}

impl Delivery {
    fn new(
        keys: &[SigningKey],
        received_at: DateTime<Utc>,
        method: Method,
        path: String,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Delivery {
        let webhook_id = header_text(headers, signing::HEADER_ID);
        let verdict = check_signature(keys, headers, body, received_at.timestamp());
        Delivery {
            received_at,
            method,
            path,
            headers: SHOWN_HEADERS
                .iter()
                .filter_map(|&name| header_text(headers, name).map(|v| (name, v)))
                .collect(),
            idempotency_key: header_text(headers, "idempotency-key"),
            webhook_id,
            verdict,
            body: ShownBody::from_bytes(body),
        }
    }

    /// The block printed for a delivery. Everything the sender chose (path, header values,
    /// body) is escaped ([`printable`]), so it can neither print a line of the sink's own (a
    /// forged `signature: verified`) nor send control sequences to the terminal.
    fn to_readable(&self) -> String {
        let time = self
            .received_at
            .with_timezone(&Local)
            .format("%Y-%m-%d %H:%M:%S%.3f");
        let verdict = match &self.verdict {
            Verdict::Verified => "verified".to_owned(),
            Verdict::Invalid(reason) => format!("INVALID: {}", printable::escape(reason)),
            Verdict::Unsigned => "unsigned".to_owned(),
            Verdict::Unchecked => "not checked".to_owned(),
        };
        let mut out = format!(
            "{time} {} {}\n  idempotency-key: {}\n  webhook-id: {}\n  signature: {verdict}\n",
            self.method,
            printable::escape(&self.path),
            printable::escape(self.idempotency_key.as_deref().unwrap_or("-")),
            printable::escape(self.webhook_id.as_deref().unwrap_or("-")),
        );
        match &self.body {
            ShownBody::Empty => out.push_str("(empty body)\n"),
            ShownBody::Json { text, .. } => {
                // Line breaks between tokens are the indentation's own; JSON strings can
                // still hold DEL, C1 controls and line separators raw.
                out.push_str(&printable::escape_json(&reindent_json(text)));
                out.push('\n');
            }
            ShownBody::Text {
                text,
                total_bytes,
                truncated,
            } => {
                out.push_str(&printable::escape(text));
                out.push('\n');
                if *truncated {
                    let _ = writeln!(
                        out,
                        "… (truncated: showed the first {MAX_TEXT_BYTES} of {total_bytes} bytes)"
                    );
                }
            }
        }
        out
    }

    fn to_json_line(&self) -> String {
        let (signature, signature_error) = match &self.verdict {
            Verdict::Verified => ("verified", None),
            Verdict::Invalid(reason) => ("invalid", Some(reason.as_str())),
            Verdict::Unsigned => ("unsigned", None),
            Verdict::Unchecked => ("unchecked", None),
        };
        let headers: serde_json::Map<String, Value> = self
            .headers
            .iter()
            .map(|(name, value)| ((*name).to_owned(), Value::String(value.clone())))
            .collect();
        let mut object = json!({
            "received_at": self.received_at.to_rfc3339_opts(SecondsFormat::Millis, true),
            "method": self.method.as_str(),
            "path": self.path,
            "headers": headers,
            "idempotency_key": self.idempotency_key,
            "webhook_id": self.webhook_id,
            "signature": signature,
            "signature_error": signature_error,
        });
        let (body, truncated) = match &self.body {
            ShownBody::Empty => (Value::String(String::new()), false),
            ShownBody::Json { value, .. } => (value.clone(), false),
            ShownBody::Text {
                text, truncated, ..
            } => (Value::String(text.clone()), *truncated),
        };
        object["body"] = body;
        object["body_truncated"] = Value::Bool(truncated);
        object.to_string()
    }
}

/// How a body is shown.
enum ShownBody {
    Empty,
    /// Valid JSON: the parsed value for `--json`, and the text as sent for the readable form,
    /// which keeps the sender's key order and number spelling (a `Value` would sort keys and
    /// round `19.90` to `19.9`).
    Json {
        value: Value,
        text: String,
    },
    Text {
        text: String,
        total_bytes: usize,
        truncated: bool,
    },
}

impl ShownBody {
    fn from_bytes(body: &[u8]) -> ShownBody {
        if body.is_empty() {
            return ShownBody::Empty;
        }
        if let Ok(value) = serde_json::from_slice::<Value>(body) {
            // Valid JSON is valid UTF-8, so nothing is lost here.
            let text = String::from_utf8_lossy(body).into_owned();
            return ShownBody::Json { value, text };
        }
        // Lossy so binary or mis-encoded bodies still show something recognisable.
        let mut text =
            String::from_utf8_lossy(&body[..body.len().min(MAX_TEXT_BYTES)]).into_owned();
        let truncated = body.len() > MAX_TEXT_BYTES;
        if truncated {
            // The cut may split a multi-byte character; drop its replacement character.
            if text.ends_with('\u{FFFD}') {
                text.pop();
            }
        }
        ShownBody::Text {
            text,
            total_bytes: body.len(),
            truncated,
        }
    }
}

/// Pretty-prints already validated JSON text by re-indenting it, two spaces per level like
/// `serde_json::to_string_pretty`, without re-serialising values.
fn reindent_json(text: &str) -> String {
    fn newline(out: &mut String, depth: usize) {
        out.push('\n');
        out.extend(std::iter::repeat_n(' ', depth * 2));
    }
    let mut out = String::with_capacity(text.len() * 2);
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
            continue;
        }
        match c {
            '"' => {
                in_string = true;
                out.push(c);
            }
            '{' | '[' => {
                out.push(c);
                while chars.peek().is_some_and(|n| n.is_ascii_whitespace()) {
                    chars.next();
                }
                // Empty containers stay on one line: `{}` / `[]`.
                if let Some(&close @ ('}' | ']')) = chars.peek() {
                    out.push(close);
                    chars.next();
                } else {
                    depth += 1;
                    newline(&mut out, depth);
                }
            }
            '}' | ']' => {
                depth = depth.saturating_sub(1);
                newline(&mut out, depth);
                out.push(c);
            }
            ',' => {
                out.push(c);
                newline(&mut out, depth);
            }
            ':' => out.push_str(": "),
            c if c.is_ascii_whitespace() => {}
            c => out.push(c),
        }
    }
    out
}

/// Verifies a delivery's Standard Webhooks signature with the configured keys.
fn check_signature(keys: &[SigningKey], headers: &HeaderMap, body: &[u8], now: i64) -> Verdict {
    if keys.is_empty() {
        return Verdict::Unchecked;
    }
    // A proxy may have split a multi-signature header into several lines; rejoin them.
    let signatures: Vec<String> = headers
        .get_all(signing::HEADER_SIGNATURE)
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .collect();
    if signatures.is_empty() {
        return Verdict::Unsigned;
    }
    let id = header_text(headers, signing::HEADER_ID).unwrap_or_default();
    let timestamp = header_text(headers, signing::HEADER_TIMESTAMP).unwrap_or_default();
    match signing::verify(
        keys,
        &id,
        &timestamp,
        &signatures.join(" "),
        body,
        now,
        signing::DEFAULT_TOLERANCE_SECS,
    ) {
        Ok(()) => Verdict::Verified,
        Err(e) => Verdict::Invalid(e.to_string()),
    }
}

/// A header's value as text (several occurrences joined with `, `), if present.
fn header_text(headers: &HeaderMap, name: &str) -> Option<String> {
    let values: Vec<String> = headers
        .get_all(name)
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .collect();
    (!values.is_empty()).then(|| values.join(", "))
}

/// The message printed for a request whose body could not be read.
fn rejected_text(
    config: &SinkConfig,
    received_at: DateTime<Utc>,
    method: &Method,
    path: &str,
    status: StatusCode,
    reason: &str,
) -> String {
    if config.json {
        json!({
            "received_at": received_at.to_rfc3339_opts(SecondsFormat::Millis, true),
            "method": method.as_str(),
            "path": path,
            "rejected": reason,
            "status": status.as_u16(),
        })
        .to_string()
    } else {
        let time = received_at
            .with_timezone(&Local)
            .format("%Y-%m-%d %H:%M:%S%.3f");
        format!(
            "{time} {method} {}\n  REJECTED with {status}: {}\n",
            printable::escape(path),
            printable::escape(reason)
        )
    }
}

/// Writes queued output to stdout, flushing after each message so `listen | jq` sees
/// deliveries as they come. After `finish` fires it drains what is queued and returns.
async fn print_lines(
    mut lines: mpsc::Receiver<String>,
    mut finish: oneshot::Receiver<()>,
) -> std::io::Result<()> {
    let mut stdout = tokio::io::stdout();
    loop {
        tokio::select! {
            line = lines.recv() => match line {
                Some(line) => write_line(&mut stdout, &line).await?,
                None => return Ok(()),
            },
            _ = &mut finish => break,
        }
    }
    // Connection tasks may still hold a sender for a moment after the server returns, so
    // close the channel rather than wait for every sender to be dropped.
    lines.close();
    while let Some(line) = lines.recv().await {
        write_line(&mut stdout, &line).await?;
    }
    Ok(())
}

async fn write_line(stdout: &mut tokio::io::Stdout, line: &str) -> std::io::Result<()> {
    stdout.write_all(line.as_bytes()).await?;
    if !line.ends_with('\n') {
        stdout.write_all(b"\n").await?;
    }
    stdout.flush().await
}

/// Resolves on Ctrl-C or (on Unix) SIGTERM.
async fn shutdown_signal() {
    // If a handler cannot be installed, that signal simply never ends the run.
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
    eprintln!("stopping");
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt as _;
    use tokio::net::TcpStream;

    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    fn args(secrets: &[&str], json: bool, status: u16, count: u64) -> ListenArgs {
        ListenArgs {
            port: 0,
            bind: IpAddr::from([127, 0, 0, 1]),
            secrets: secrets.iter().map(|s| (*s).to_owned()).collect(),
            json,
            status,
            count,
            max_connections: 256,
            header_read_timeout_ms: 10_000,
            idle_timeout_ms: 60_000,
        }
    }

    /// Starts the sink on an ephemeral port; returns its address, the output lines and the
    /// server task.
    async fn start(
        args: &ListenArgs,
    ) -> (
        SocketAddr,
        mpsc::Receiver<String>,
        tokio::task::JoinHandle<()>,
    ) {
        let config = SinkConfig::from_args(args).expect("valid test args");
        let listener = TcpListener::bind((args.bind, 0))
            .await
            .expect("bind port 0");
        let addr = listener.local_addr().expect("local addr");
        let (tx, rx) = mpsc::channel(16);
        let server = tokio::spawn(serve(listener, config, tx, std::future::pending()));
        (addr, rx, server)
    }

    /// Sends one hand-written HTTP/1.1 request and returns the response status code.
    async fn request(addr: SocketAddr, head: &str, body: &[u8]) -> u16 {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let mut raw = format!("{head}Host: test\r\nConnection: close\r\n");
        if !head.contains("Content-Length") {
            raw.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        raw.push_str("\r\n");
        stream.write_all(raw.as_bytes()).await.expect("write head");
        stream.write_all(body).await.expect("write body");
        let mut response = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response))
            .await
            .expect("response in time")
            .expect("read response");
        let response = String::from_utf8_lossy(&response);
        let status_line = response.lines().next().unwrap_or_default().to_owned();
        status_line
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("bad response: {response:?}"))
    }

    async fn next_json(rx: &mut mpsc::Receiver<String>) -> Value {
        let line = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("output in time")
            .expect("output line");
        assert!(
            !line.contains('\n'),
            "--json output must be one line: {line}"
        );
        serde_json::from_str(&line).expect("output is JSON")
    }

    fn signed_head(key: &SigningKey, id: &str, body: &[u8], extra: &str) -> String {
        let now = Utc::now().timestamp();
        let h = signing::signature_headers(std::slice::from_ref(key), id, now, body);
        format!(
            "POST /hooks/orders?x=1 HTTP/1.1\r\nContent-Type: application/json\r\n\
             Idempotency-Key: idem-{id}\r\nwebhook-id: {}\r\nwebhook-timestamp: {}\r\n\
             webhook-signature: {}\r\n{extra}",
            h.id,
            h.timestamp,
            h.signature.unwrap_or_default()
        )
    }

    #[tokio::test]
    async fn verdicts_status_and_count_in_json_mode() {
        let (addr, mut rx, server) =
            start(&args(&["some-old-raw-secret", SECRET], true, 503, 3)).await;
        let key = SigningKey::parse(SECRET).expect("test secret");
        let body = br#"{"op":"INSERT","id":7}"#;

        // 1. Correctly signed.
        let status = request(addr, &signed_head(&key, "msg_ok", body, ""), body).await;
        assert_eq!(status, 503);
        let out = next_json(&mut rx).await;
        assert_eq!(out["signature"], "verified", "{out}");
        assert_eq!(out["signature_error"], Value::Null);
        assert_eq!(out["method"], "POST");
        assert_eq!(out["path"], "/hooks/orders?x=1");
        assert_eq!(out["idempotency_key"], "idem-msg_ok");
        assert_eq!(out["webhook_id"], "msg_ok");
        assert_eq!(out["body"], json!({"op": "INSERT", "id": 7}));
        assert_eq!(out["headers"]["content-type"], "application/json");
        assert!(out["received_at"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')));

        // 2. Signed with another key.
        let wrong = SigningKey::parse("not-the-secret").expect("test secret");
        let status = request(addr, &signed_head(&wrong, "msg_bad", body, ""), body).await;
        assert_eq!(status, 503);
        let out = next_json(&mut rx).await;
        assert_eq!(out["signature"], "invalid", "{out}");
        assert!(out["signature_error"]
            .as_str()
            .is_some_and(|e| e.contains("no signature matches")));

        // Too large: refused with 413 before reading the body, reported, not counted.
        let big = "PUT /big HTTP/1.1\r\nContent-Length: 11534336\r\n";
        assert_eq!(request(addr, big, b"").await, 413);
        let out = next_json(&mut rx).await;
        assert_eq!(out["status"], 413, "{out}");

        // 3. Unsigned, non-JSON body, any method and path; the third delivery ends the run.
        let status = request(addr, "PATCH /x HTTP/1.1\r\n", b"plain text").await;
        assert_eq!(status, 503);
        let out = next_json(&mut rx).await;
        assert_eq!(out["signature"], "unsigned", "{out}");
        assert_eq!(out["body"], "plain text");
        assert_eq!(out["idempotency_key"], Value::Null);

        let finished = tokio::time::timeout(Duration::from_secs(5), server).await;
        assert!(
            matches!(finished, Ok(Ok(()))),
            "server did not stop after --count"
        );
        // No secret ever reaches the output.
        while let Ok(line) = rx.try_recv() {
            assert!(!line.contains("some-old-raw-secret"));
        }
    }

    /// Issue 18, item 2: `listen` kept every connection for as long as the client liked, so idle
    /// connections used up the process's descriptors. Connections over `--max-connections` are
    /// answered 503 and closed at once, ones that send no request are closed after
    /// `--header-read-timeout-ms`, and deliveries are still received.
    #[tokio::test]
    async fn connections_are_capped_idle_ones_closed_and_deliveries_still_arrive() {
        let mut a = args(&[], true, 204, 0);
        a.max_connections = 4;
        a.header_read_timeout_ms = 500;
        let (addr, mut rx, server) = start(&a).await;
        let mut idle = Vec::new();
        for _ in 0..50 {
            idle.push(TcpStream::connect(addr).await.expect("connect"));
        }
        // What each sends back before closing, read from all at once for less than the header
        // timeout; `None` for the ones still open.
        let seen = futures::future::join_all(idle.iter_mut().map(|s| async move {
            let mut got = Vec::new();
            tokio::time::timeout(Duration::from_millis(250), s.read_to_end(&mut got))
                .await
                .ok()
                .map(|_| String::from_utf8_lossy(&got).into_owned())
        }))
        .await;
        let refused = seen
            .iter()
            .flatten()
            .filter(|t| t.starts_with("HTTP/1.1 503"))
            .count();
        assert_eq!(refused, 46, "{seen:?}");
        let mut open: Vec<TcpStream> = idle
            .into_iter()
            .zip(&seen)
            .filter(|(_, seen)| seen.is_none())
            .map(|(s, _)| s)
            .collect();
        assert_eq!(open.len(), 4);
        for s in &mut open {
            let mut got = Vec::new();
            let closed =
                tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got)).await;
            assert!(
                matches!(closed, Ok(Ok(0))),
                "an idle connection is closed after the header timeout: {closed:?}"
            );
        }
        let status = request(addr, "POST /hooks HTTP/1.1\r\n", b"{}").await;
        assert_eq!(status, 204);
        assert_eq!(next_json(&mut rx).await["path"], "/hooks");
        server.abort();
    }

    #[tokio::test]
    async fn readable_mode_without_secret() {
        let (addr, mut rx, server) = start(&args(&[], false, 204, 0)).await;
        let head = "POST /hook HTTP/1.1\r\nIdempotency-Key: k1\r\nwebhook-id: msg_1\r\n\
                    webhook-timestamp: 1\r\nwebhook-signature: v1,AAAA\r\n";
        assert_eq!(request(addr, head, br#"{"a":1}"#).await, 204);
        let text = rx.recv().await.expect("output");
        assert!(text.contains("POST /hook\n"), "{text}");
        assert!(text.contains("idempotency-key: k1"), "{text}");
        assert!(text.contains("webhook-id: msg_1"), "{text}");
        assert!(text.contains("signature: not checked"), "{text}");
        assert!(text.contains("{\n  \"a\": 1\n}"), "{text}");
        server.abort();
    }

    #[tokio::test]
    async fn readable_mode_reports_invalid_reason() {
        let (addr, mut rx, server) = start(&args(&[SECRET], false, 204, 0)).await;
        let key = SigningKey::parse(SECRET).expect("test secret");
        // Signed over a different body than the one sent.
        let head = signed_head(&key, "msg_t", b"original", "");
        assert_eq!(request(addr, &head, b"tampered").await, 204);
        let text = rx.recv().await.expect("output");
        assert!(
            text.contains("signature: INVALID: no signature matches"),
            "{text}"
        );
        assert!(text.contains("\ntampered\n"), "{text}");
        server.abort();
    }

    /// Issue 18, item 9: what a sender controls (body, header values) cannot print lines of
    /// the sink's own (a forged `signature: verified`) or terminal control sequences.
    #[tokio::test]
    async fn readable_mode_escapes_control_characters() {
        let (addr, mut rx, server) = start(&args(&[], false, 204, 0)).await;
        let forged = "signature: verified";
        let head = "POST /hook HTTP/1.1\r\nIdempotency-Key: k\u{9b}2J\r\n";
        let text_body = "hi\n  signature: verified\r\n\x1b[2J\u{9b}0m\ttab";
        // JSON allows DEL, C1 controls and U+2028 unescaped inside strings.
        let json_body = "{\"a\": \"x\u{9b}2J\u{7f}\u{2028}y\"}";
        for body in [text_body, json_body] {
            assert_eq!(request(addr, head, body.as_bytes()).await, 204);
            let text = rx.recv().await.expect("output");
            assert!(
                !text.lines().any(|l| l.trim_start().starts_with(forged)),
                "{text}"
            );
            assert!(
                !text.contains(['\x1b', '\u{9b}', '\u{7f}', '\u{2028}', '\r', '\t']),
                "{text:?}"
            );
            assert!(text.contains("idempotency-key: k\\u{9b}2J"), "{text}");
        }
        server.abort();
    }

    #[test]
    fn status_and_secrets_are_validated() {
        for bad in [99, 100, 199, 600, 1000] {
            let err = SinkConfig::from_args(&args(&[], false, bad, 0))
                .err()
                .map(|e| e.to_string());
            assert!(err.is_some_and(|e| e.contains("--status")), "{bad}");
        }
        for good in [200, 302, 429, 500, 599] {
            assert!(
                SinkConfig::from_args(&args(&[], false, good, 0)).is_ok(),
                "{good}"
            );
        }
        let err = SinkConfig::from_args(&args(&["ok", "whsec_%%%hidden"], false, 204, 0))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("secret #2"), "{err}");
        assert!(!err.contains("hidden") && !err.contains("%%%"), "{err}");
    }

    #[test]
    fn debug_redacts_secrets() {
        let shown = format!("{:?}", args(&["hunter2"], false, 204, 0));
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("<1 redacted>"), "{shown}");
    }

    #[test]
    fn json_bodies_keep_order_and_numbers() {
        let text = r#" {"b":19.90,"a":[1, 2,{ }],"c":{"e":[]},"d":"x,{y}:\"[","f":null} "#;
        let expected = "{\n  \"b\": 19.90,\n  \"a\": [\n    1,\n    2,\n    {}\n  ],\n  \"c\": {\n    \"e\": []\n  },\n  \"d\": \"x,{y}:\\\"[\",\n  \"f\": null\n}";
        assert_eq!(reindent_json(text), expected);
        // Same layout as serde_json's pretty printer when key order agrees.
        let sorted = r#"{"a":[1,{"k":true}],"b":"s"}"#;
        let value: Value = serde_json::from_str(sorted).expect("valid");
        assert_eq!(
            reindent_json(sorted),
            serde_json::to_string_pretty(&value).expect("prints")
        );
        assert_eq!(reindent_json("3"), "3");
    }

    #[test]
    fn long_text_bodies_are_truncated() {
        let body = "é".repeat(MAX_TEXT_BYTES); // two bytes each: twice the limit
        match ShownBody::from_bytes(body.as_bytes()) {
            ShownBody::Text {
                text,
                total_bytes,
                truncated,
            } => {
                assert!(truncated);
                assert_eq!(total_bytes, 2 * MAX_TEXT_BYTES);
                assert!(text.len() <= MAX_TEXT_BYTES && !text.ends_with('\u{FFFD}'));
            }
            _ => panic!("expected text"),
        }
    }

    #[test]
    fn cli_parses_defaults_and_repeated_secrets() {
        use clap::Parser as _;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            listen: ListenArgs,
        }
        let cli = Cli::try_parse_from(["x", "--secret", "a", "--secret", "whsec_b3RoZXI="])
            .expect("parses");
        assert_eq!(cli.listen.secrets.len(), 2);
        assert_eq!(cli.listen.port, 8787);
        assert_eq!(cli.listen.status, 204);
        assert_eq!(cli.listen.bind, IpAddr::from([127, 0, 0, 1]));
        assert!(Cli::try_parse_from(["x", "--bind", "nonsense"]).is_err());
    }
}
