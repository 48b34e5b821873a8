//! How an HTTP action (webhook, Slack) reads a non-2xx answer: `retry_on`, `dead_letter_on`,
//! `retry_after_max_ms` and `abort_header` of its `retry` table, compiled once.

use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderName};
use reqwest::StatusCode;

use crate::action::{drain, parse_retry_after, AttemptResult, Outcome};
use crate::config::{RetryConfig, StatusSpec};

/// A status code or a class (`5xx` = 500..=599).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Match {
    Code(u16),
    Class(u16),
}

impl Match {
    fn parse(s: &StatusSpec) -> Option<Match> {
        let t = s.0.trim().to_ascii_lowercase();
        if let Some(d) = t.strip_suffix("xx") {
            return match d.parse::<u16>() {
                Ok(c) if (1..=5).contains(&c) && d.len() == 1 => Some(Match::Class(c)),
                _ => None,
            };
        }
        match t.parse::<u16>() {
            Ok(c) if (100..=599).contains(&c) => Some(Match::Code(c)),
            _ => None,
        }
    }

    fn matches(self, code: u16) -> bool {
        match self {
            Match::Code(c) => c == code,
            Match::Class(c) => code / 100 == c,
        }
    }
}

/// The compiled status policy of one HTTP action.
#[derive(Debug, Clone)]
pub struct HttpPolicy {
    retry_on: Vec<Match>,
    dead_letter_on: Vec<Match>,
    retry_after_max: Duration,
    abort_header: Option<HeaderName>,
}

impl HttpPolicy {
    /// Compiles `retry`; every problem names its key (`retry_on: ...`).
    pub fn compile(r: &RetryConfig) -> Result<HttpPolicy, Vec<String>> {
        let mut problems = Vec::new();
        let mut list = |key: &str, specs: &[StatusSpec]| -> Vec<Match> {
            let mut out = Vec::new();
            for s in specs {
                match Match::parse(s) {
                    Some(m) => out.push(m),
                    None => problems.push(format!(
                        "{key}: `{}` is not an HTTP status: expected a code 100..=599 (e.g. 503) or a class \"1xx\"..\"5xx\"",
                        s.0
                    )),
                }
            }
            out
        };
        let retry_on = list("retry_on", &r.retry_on);
        let dead_letter_on = list("dead_letter_on", &r.dead_letter_on);
        if r.retry_after_max_ms > 3_600_000 {
            problems.push(format!(
                "retry_after_max_ms: {} is out of range: expected 0..=3600000 ms",
                r.retry_after_max_ms
            ));
        }
        let abort_header = match r.abort_header.trim() {
            "" => None,
            h => match HeaderName::from_bytes(h.as_bytes()) {
                Ok(n) => Some(n),
                Err(_) => {
                    problems.push(format!("abort_header: `{h}` is not a valid header name"));
                    None
                }
            },
        };
        if problems.is_empty() {
            Ok(HttpPolicy {
                retry_on,
                dead_letter_on,
                retry_after_max: Duration::from_millis(r.retry_after_max_ms),
                abort_header,
            })
        } else {
            Err(problems)
        }
    }

    /// The outcome of a response: delivered on 2xx, else by the policy. `what` starts the error
    /// message (e.g. "Slack answered "). Reads at most a short excerpt of the body.
    pub async fn outcome(&self, resp: reqwest::Response, what: &str) -> Outcome {
        let status = resp.status();
        if status.is_success() {
            drain(resp).await;
            return (AttemptResult::Delivered, Some(status.as_u16()), None);
        }
        let head = self.head(status, resp.headers());
        let excerpt = drain(resp).await;
        self.judge(head, &excerpt, what)
    }

    /// What the policy needs of a non-2xx answer's head, taken before its body is read.
    pub fn head(&self, status: StatusCode, headers: &HeaderMap) -> AnswerHead {
        let abort = self
            .abort_header
            .as_ref()
            .filter(|h| {
                headers
                    .get(*h)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
            })
            .map(|h| h.as_str().to_string());
        let retry_after = headers
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after)
            .map(|d| d.min(self.retry_after_max));
        let location = headers
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .filter(|_| status.is_redirection())
            .map(str::to_string);
        AnswerHead {
            status,
            abort,
            retry_after,
            location,
        }
    }

    /// The outcome of an answer from its head and an excerpt of its body (delivered on 2xx).
    pub fn judge(&self, head: AnswerHead, excerpt: &str, what: &str) -> Outcome {
        let code = head.status.as_u16();
        if head.status.is_success() {
            return (AttemptResult::Delivered, Some(code), None);
        }
        let mut error = format!("{what}HTTP {code}");
        if let Some(l) = head.location {
            error.push_str(&format!(" redirect to `{l}` (redirects are not followed)"));
        }
        if !excerpt.is_empty() {
            error.push_str(": ");
            error.push_str(excerpt);
        }
        let result = if let Some(h) = head.abort {
            error.push_str(&format!(
                " (aborted by the receiver with `{h}: true`: dead-lettered without further retries)"
            ));
            AttemptResult::Permanent
        } else if self.dead_letter_on.iter().any(|m| m.matches(code)) {
            error.push_str(" (listed in retry.dead_letter_on)");
            AttemptResult::Permanent
        } else if self.retry_on.iter().any(|m| m.matches(code)) {
            AttemptResult::Retry {
                after_ms: head.retry_after.map(|d| d.as_millis() as u64),
            }
        } else {
            AttemptResult::Permanent
        };
        (result, Some(code), Some(error))
    }
}

/// The parts of an answer's head the status policy reads.
#[derive(Debug)]
pub struct AnswerHead {
    status: StatusCode,
    /// The `abort_header` when the receiver set it to `true`.
    abort: Option<String>,
    retry_after: Option<Duration>,
    /// `Location` of a 3xx.
    location: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(retry_on: &[&str], dead: &[&str]) -> Result<HttpPolicy, Vec<String>> {
        HttpPolicy::compile(&RetryConfig {
            retry_on: retry_on.iter().map(|s| StatusSpec::from(*s)).collect(),
            dead_letter_on: dead.iter().map(|s| StatusSpec::from(*s)).collect(),
            ..RetryConfig::default()
        })
    }

    #[test]
    fn codes_and_classes_parse_and_bad_ones_name_their_key() {
        let p = policy(&["409", "5XX"], &["501"]).unwrap();
        assert!(p.retry_on[0].matches(409));
        assert!(p.retry_on[1].matches(599));
        assert!(!p.retry_on[1].matches(600));
        assert!(p.dead_letter_on[0].matches(501));
        let e = policy(&["6xx", "99", "abc"], &["55x"]).unwrap_err();
        assert_eq!(e.len(), 4, "{e:?}");
        assert!(e[0].starts_with("retry_on: `6xx`"), "{e:?}");
        assert!(e[3].starts_with("dead_letter_on: `55x`"), "{e:?}");
        let e = HttpPolicy::compile(&RetryConfig {
            abort_header: "bad header".into(),
            retry_after_max_ms: 3_600_001,
            ..RetryConfig::default()
        })
        .unwrap_err();
        assert!(e.iter().any(|m| m.starts_with("abort_header")), "{e:?}");
        assert!(
            e.iter().any(|m| m.starts_with("retry_after_max_ms")),
            "{e:?}"
        );
    }
}
