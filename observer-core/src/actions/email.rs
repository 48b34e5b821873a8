//! `type = "email"`: sends one message over SMTP (lettre, rustls; no OpenSSL).
//!
//! TLS is `starttls` (default: plain connect, then STARTTLS is required), `tls` (implicit TLS,
//! "SMTPS") or `none`. `none` sends credentials and mail in clear text, so it is refused unless
//! the server is a loopback address (`127.0.0.0/8`, `::1`, `localhost`) or `allow_plaintext =
//! true` says so explicitly. Each message carries `Message-ID: <idempotency key@fraiseql-observers>`
//! and `X-Idempotency-Key: <key>`, the same on every attempt, so receivers can deduplicate.
//!
//! A transient SMTP answer (4xx) or connection/timeout trouble is retried; a permanent answer
//! (5xx), a refused STARTTLS or a TLS failure is permanent (retrying cannot fix it).

use std::time::Duration;

use lettre::message::header::{HeaderName, HeaderValue};
use lettre::message::{Mailbox, MultiPart, SinglePart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use serde::{Deserialize, Serialize};

use crate::action::{permanent, secret, AttemptResult, CompiledAction, Outcome, Secrets};
use crate::config::RetryConfig;
use crate::path::Scope;
use crate::template::{Target, Template};

/// How the SMTP connection is secured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EmailTls {
    /// Connect in clear, then STARTTLS (required: a server that does not offer it is refused).
    #[default]
    Starttls,
    /// TLS from the first byte (SMTPS, usually port 465).
    Tls,
    /// No TLS: only to loopback, or with `allow_plaintext = true`.
    None,
}

/// `type = "email"`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmailConfig {
    /// `smtp://[user:pass@]host[:port]` or `smtps://…` (implies `tls = "tls"`); or use `host`.
    #[serde(default)]
    pub smtp_url: Option<String>,
    #[serde(default)]
    pub host: Option<String>,
    /// Default 587 (starttls), 465 (tls), 25 (none).
    #[serde(default)]
    pub port: Option<u16>,
    /// Default `starttls` (`tls` for an `smtps://` URL).
    #[serde(default)]
    pub tls: Option<EmailTls>,
    /// Allow `tls = "none"` to a server that is not on loopback.
    #[serde(default)]
    pub allow_plaintext: bool,
    /// SMTP user; may be a secret reference.
    #[serde(default)]
    pub username: Option<String>,
    /// SMTP password; write `${env:NAME}` or `${file:/path}`.
    #[serde(default)]
    pub password: Option<String>,
    /// Sender mailbox (text template), e.g. `Shop <shop@example.com>`.
    pub from: String,
    /// Recipient mailboxes (text templates); at least one.
    pub to: Vec<String>,
    /// Subject (text template).
    pub subject: String,
    /// Plain-text body (text template).
    pub body: String,
    /// Optional HTML alternative (text template; placeholder values are not HTML-escaped).
    #[serde(default)]
    pub html: Option<String>,
    /// Per-attempt timeout of each SMTP step.
    #[serde(default = "email_timeout")]
    pub timeout_ms: u64,
    #[serde(default)]
    pub retry: RetryConfig,
}

fn email_timeout() -> u64 {
    10_000
}

pub struct Email {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    server: String,
    /// The SMTP host (without brackets) and port, checked by the outbound guard before each send.
    host: String,
    port: u16,
    from: Template,
    to: Vec<Template>,
    subject: Template,
    body: Template,
    html: Option<Template>,
}

impl std::fmt::Debug for Email {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Email")
            .field("server", &self.server)
            .field("subject", &self.subject)
            .finish_non_exhaustive()
    }
}

/// `X-Idempotency-Key`.
#[derive(Clone)]
struct IdempotencyKey(String);

impl lettre::message::header::Header for IdempotencyKey {
    fn name() -> HeaderName {
        HeaderName::new_from_ascii_str("X-Idempotency-Key")
    }
    fn parse(s: &str) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        Ok(IdempotencyKey(s.to_string()))
    }
    fn display(&self) -> HeaderValue {
        HeaderValue::new(Self::name(), self.0.clone())
    }
}

fn is_loopback(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    h.eq_ignore_ascii_case("localhost")
        || h.parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz");
            if let Ok(v) = u8::from_str_radix(hex, 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub(crate) fn compile(
    e: &EmailConfig,
    issue: &mut dyn FnMut(&str, String),
    mode: Secrets,
) -> Option<CompiledAction> {
    let mut host = e.host.clone();
    let mut port = e.port;
    let mut tls = e.tls;
    let mut username = match &e.username {
        Some(u) => match secret(u, "username", mode) {
            Ok(u) => Some(u),
            Err(err) => {
                issue("username", err.to_string());
                None
            }
        },
        None => None,
    };
    let mut password = match &e.password {
        Some(p) => match secret(p, "password", mode) {
            Ok(p) => Some(p),
            Err(err) => {
                issue("password", err.to_string());
                None
            }
        },
        None => None,
    };
    match (&e.smtp_url, &e.host) {
        (Some(_), Some(_)) => issue("smtp_url", "give `smtp_url` or `host`, not both".into()),
        (None, None) => issue("host", "an email action needs `smtp_url` or `host`".into()),
        (Some(raw), None) => match secret(raw, "smtp_url", mode) {
            Ok(u) if mode == Secrets::Unresolved => {
                let _ = u;
                host = Some("unresolved".into());
            }
            // Messages never repeat the URL: it may hold a password.
            Ok(u) => match reqwest::Url::parse(&u) {
                Ok(url) if matches!(url.scheme(), "smtp" | "smtps") && url.host_str().is_some() => {
                    host = url.host_str().map(str::to_string);
                    port = port.or(url.port());
                    if url.scheme() == "smtps" {
                        if matches!(tls, Some(EmailTls::Starttls | EmailTls::None)) {
                            issue("tls", "an smtps:// URL uses implicit TLS: set tls = \"tls\" or leave it out".into());
                        }
                        tls = Some(EmailTls::Tls);
                    }
                    if !url.username().is_empty() {
                        username = Some(percent_decode(url.username()));
                    }
                    if let Some(p) = url.password() {
                        password = Some(percent_decode(p));
                    }
                }
                Ok(url) => issue(
                    "smtp_url",
                    format!(
                        "scheme `{}`: expected smtp://host[:port] or smtps://host[:port]",
                        url.scheme()
                    ),
                ),
                Err(err) => issue("smtp_url", format!("not a URL ({err})")),
            },
            Err(err) => issue("smtp_url", err.to_string()),
        },
        (None, Some(h)) => {
            if h.trim().is_empty() {
                issue("host", "is empty".into());
            }
        }
    }
    let tls = tls.unwrap_or_default();
    if let Some(h) = &host {
        if tls == EmailTls::None
            && !e.allow_plaintext
            && !is_loopback(h)
            && mode == Secrets::Resolve
        {
            issue(
                "tls",
                format!("\"none\" sends mail and password in clear text: allowed only to a loopback server, or with allow_plaintext = true (server `{h}`)"),
            );
        }
    }
    if username.is_some() != password.is_some() {
        issue("password", "`username` and `password` go together".into());
    }
    if e.timeout_ms == 0 || e.timeout_ms > 600_000 {
        issue("timeout_ms", "expected 1..=600000".into());
    }
    let mut text = |field: &str, src: &str| match Template::parse(src, Target::Text) {
        Ok(t) => Some(t),
        Err(err) => {
            issue(field, err.to_string());
            None
        }
    };
    let from = text("from", &e.from);
    let subject = text("subject", &e.subject);
    let body = text("body", &e.body);
    let html = match &e.html {
        Some(h) => text("html", h).map(Some),
        None => Some(None),
    };
    let mut to = Vec::new();
    let mut to_ok = true;
    for (i, t) in e.to.iter().enumerate() {
        match text(&format!("to[{i}]"), t) {
            Some(t) => to.push(t),
            None => to_ok = false,
        }
    }
    if e.to.is_empty() {
        issue("to", "lists no recipient".into());
    }
    // Static addresses are checked now rather than at the first delivery.
    for (field, t) in std::iter::once(("from".to_string(), from.as_ref())).chain(
        to.iter()
            .enumerate()
            .map(|(i, t)| (format!("to[{i}]"), Some(t))),
    ) {
        if let Some(t) = t.filter(|t| t.is_static()) {
            if let Err(err) = t.source().parse::<Mailbox>() {
                issue(&field, format!("`{}` is not a mailbox: {err}", t.source()));
            }
        }
    }
    let host = host?;
    let port = port.unwrap_or(match tls {
        EmailTls::Starttls => 587,
        EmailTls::Tls => 465,
        EmailTls::None => 25,
    });
    let tls_host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let tls_setting = match tls {
        EmailTls::None => Some(Tls::None),
        EmailTls::Starttls | EmailTls::Tls => match TlsParameters::new(tls_host.clone()) {
            Ok(p) if tls == EmailTls::Tls => Some(Tls::Wrapper(p)),
            Ok(p) => Some(Tls::Required(p)),
            Err(err) => {
                issue("tls", format!("cannot set up TLS for `{tls_host}`: {err}"));
                None
            }
        },
    };
    let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(tls_host.clone())
        .port(port)
        .tls(tls_setting?)
        .timeout(Some(Duration::from_millis(e.timeout_ms)));
    if let (Some(u), Some(p)) = (username, password) {
        builder = builder.credentials(Credentials::new(u, p));
    }
    if !to_ok {
        return None;
    }
    Some(CompiledAction::Email(Email {
        transport: builder.build(),
        server: format!("{host}:{port}"),
        host: tls_host,
        port,
        from: from?,
        to,
        subject: subject?,
        body: body?,
        html: html?,
    }))
}

impl Email {
    pub(crate) fn destination(&self) -> String {
        self.server.clone()
    }

    /// The message of one delivery.
    pub fn message(&self, scope: &Scope<'_>) -> Result<Message, String> {
        let key = scope.idempotency_key.unwrap_or_default();
        let mailbox = |what: &str, t: &Template| -> Result<Mailbox, String> {
            let v = t
                .render(scope)
                .map_err(|e| format!("{what} template: {e}"))?;
            v.trim()
                .parse::<Mailbox>()
                .map_err(|e| format!("{what}: `{v}` is not a mailbox: {e}"))
        };
        let mut b = Message::builder()
            .from(mailbox("from", &self.from)?)
            .subject(
                self.subject
                    .render(scope)
                    .map_err(|e| format!("subject template: {e}"))?,
            )
            .message_id(Some(format!("<{key}@fraiseql-observers>")))
            .header(IdempotencyKey(key.to_string()));
        for (i, t) in self.to.iter().enumerate() {
            b = b.to(mailbox(&format!("to[{i}]"), t)?);
        }
        let text = self
            .body
            .render(scope)
            .map_err(|e| format!("body template: {e}"))?;
        let built = match &self.html {
            Some(h) => {
                let html = h.render(scope).map_err(|e| format!("html template: {e}"))?;
                b.multipart(MultiPart::alternative_plain_html(text, html))
            }
            None => b.singlepart(SinglePart::plain(text)),
        };
        built.map_err(|e| format!("cannot build the message: {e}"))
    }

    pub(crate) async fn send(
        &self,
        ctx: &crate::action::ActionContext,
        scope: &Scope<'_>,
    ) -> Outcome {
        let msg = match self.message(scope) {
            Ok(m) => m,
            Err(e) => return permanent(e),
        };
        // lettre resolves the host itself, so every address the name has now must be admitted;
        // see docs/security.md for the window between this lookup and lettre's.
        match ctx.guard.resolve_checked(&self.host, self.port).await {
            Ok(_) => {}
            Err(crate::outbound::GuardError::Refused(r)) => {
                return permanent(format!("SMTP {}: {r}", self.server))
            }
            Err(e) => {
                return (
                    AttemptResult::Retry { after_ms: None },
                    None,
                    Some(format!("SMTP {}: {e}", self.server)),
                )
            }
        }
        match self.transport.send(msg).await {
            Ok(_) => (AttemptResult::Delivered, None, None),
            Err(e) => {
                let code = e
                    .status()
                    .map(|c| c.to_string().parse::<u16>().unwrap_or(0));
                let msg = format!("SMTP {}: {}", self.server, crate::error_chain(&e));
                let result = if e.is_transient() || e.is_timeout() {
                    AttemptResult::Retry { after_ms: None }
                } else if e.is_permanent() || e.is_client() || e.is_tls() {
                    AttemptResult::Permanent
                } else {
                    // Connection refused or dropped, a garbled answer: worth another try.
                    AttemptResult::Retry { after_ms: None }
                };
                (result, code.filter(|c| *c > 0), Some(msg))
            }
        }
    }
}

impl Email {
    /// The templates this action renders (checked for `enrich.<name>` references at load).
    pub fn templates(&self) -> Vec<&Template> {
        std::iter::once(&self.from)
            .chain(self.to.iter())
            .chain([&self.subject, &self.body])
            .chain(self.html.iter())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_and_decoding() {
        assert!(is_loopback("127.0.0.1"));
        assert!(is_loopback("127.8.0.1"));
        assert!(is_loopback("[::1]"));
        assert!(is_loopback("LOCALHOST"));
        assert!(!is_loopback("mail.example.com"));
        assert!(!is_loopback("10.0.0.1"));
        assert_eq!(percent_decode("p%40ss%3a"), "p@ss:");
        assert_eq!(percent_decode("50%"), "50%");
    }
}
