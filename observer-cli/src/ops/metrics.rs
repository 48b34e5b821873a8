//! `metrics`: fetch a running daemon's `/metrics` and print it readably (or raw, or as JSON).
//! Also the parser and fetcher `status` uses for the live figures.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use clap::Args;
use serde_json::{json, Value};

use super::print_json;

#[derive(Debug, Args)]
pub struct MetricsArgs {
    /// The endpoint (default: http://<[metrics] listen>/metrics of the config); a URL without a
    /// path gets `/metrics`.
    #[arg(long)]
    url: Option<String>,
    /// Keep only metrics whose name contains this text.
    #[arg(long)]
    filter: Option<String>,
    /// Print the exposition exactly as served.
    #[arg(long, conflicts_with = "json")]
    raw: bool,
    /// One JSON document instead of text.
    #[arg(long)]
    json: bool,
}

pub async fn run(config: Option<&Path>, args: MetricsArgs) -> Result<ExitCode> {
    let url = match &args.url {
        Some(u) => normalise_url(u)?,
        None => {
            let cfg = observer_core::config::load(config)?;
            default_url(&cfg.metrics.listen)?
        }
    };
    let text = fetch(&url, Duration::from_secs(5)).await?;
    let mut families =
        parse(&text).map_err(|e| anyhow!("{url} served an unreadable exposition: {e}"))?;
    if let Some(f) = &args.filter {
        families.retain(|m| m.name.contains(f.as_str()));
    }
    if args.raw {
        match &args.filter {
            None => print!("{text}"),
            Some(_) => print!("{}", raw_of(&text, &families)),
        }
    } else if args.json {
        print_json(&json!({
            "url": url,
            "metrics": families.iter().map(Family::to_json).collect::<Vec<_>>(),
        }))?;
    } else {
        for (i, f) in families.iter().enumerate() {
            if i > 0 {
                println!();
            }
            print!("{}", f.to_text());
        }
    }
    if families.is_empty() {
        if let Some(f) = &args.filter {
            eprintln!("no metric at {url} has a name containing `{f}`");
            return Ok(ExitCode::FAILURE);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `http://<listen>/metrics`; an unspecified address (`0.0.0.0`, `[::]`) is asked on loopback.
pub fn default_url(listen: &str) -> Result<String> {
    let mut addr: std::net::SocketAddr = listen
        .parse()
        .map_err(|_| anyhow!("metrics.listen: `{listen}` is not an address like 127.0.0.1:9464"))?;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr.ip() {
            std::net::IpAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::IpAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    Ok(format!("http://{addr}/metrics"))
}

/// Adds `http://` when no scheme is given and `/metrics` when no path is.
fn normalise_url(u: &str) -> Result<String> {
    let with_scheme = if u.contains("://") {
        u.to_string()
    } else {
        format!("http://{u}")
    };
    let mut url =
        reqwest::Url::parse(&with_scheme).map_err(|e| anyhow!("--url `{u}` is not a URL: {e}"))?;
    if url.path().is_empty() || url.path() == "/" {
        url.set_path("/metrics");
    }
    Ok(url.to_string())
}

/// GETs `url`; an unreachable endpoint or a non-2xx answer is an error naming the URL. Never
/// through a proxy: the endpoint is the daemon's own, usually on loopback, and `HTTP_PROXY`
/// set for other tools must not send the request (and what it reads) through another host.
pub async fn fetch(url: &str, timeout: Duration) -> Result<String> {
    let client = reqwest::Client::builder()
        .no_proxy()
        .connect_timeout(timeout.min(Duration::from_secs(2)))
        .timeout(timeout)
        .build()?;
    let hint = "is the daemon running with features.metrics = true (OBSERVER__FEATURES__METRICS=true) and [metrics] listen at that address?";
    let resp = client.get(url).send().await.map_err(|e| {
        let cause = std::error::Error::source(&e)
            .map(|s| format!(": {s}"))
            .unwrap_or_default();
        anyhow!("metrics endpoint not reachable at {url} ({e}{cause}); {hint}")
    })?;
    let status = resp.status();
    let body = resp
        .text()
        .await
        .map_err(|e| anyhow!("reading the answer of {url}: {e}"))?;
    if !status.is_success() {
        bail!(
            "{url} answered {status}: {}",
            body.chars().take(200).collect::<String>()
        );
    }
    Ok(body)
}

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, k: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
    }
}

/// A metric family: its HELP, TYPE and samples (for a histogram, the `_bucket`, `_sum` and
/// `_count` samples).
#[derive(Debug, Clone, Default)]
pub struct Family {
    pub name: String,
    pub kind: String,
    pub help: String,
    pub samples: Vec<Sample>,
}

/// One histogram series, summarised.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSeries {
    pub labels: Vec<(String, String)>,
    pub count: f64,
    pub sum: f64,
    /// (upper bound, cumulative count), ascending.
    pub buckets: Vec<(f64, f64)>,
}

impl HistogramSeries {
    /// The `q` quantile estimated from the buckets as Prometheus' `histogram_quantile` does
    /// (linear within the bucket); `None` without observations.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.buckets.last().map(|b| b.1)?;
        if total <= 0.0 || !self.buckets.last()?.0.is_infinite() {
            return None;
        }
        let rank = q * total;
        let i = self.buckets.iter().position(|b| b.1 >= rank)?;
        let (end, cum) = self.buckets[i];
        if end.is_infinite() {
            // Above the highest finite bound: that bound is the best we can say.
            return Some(if i > 0 { self.buckets[i - 1].0 } else { 0.0 });
        }
        let (start, cum_start) = if i > 0 {
            self.buckets[i - 1]
        } else {
            (0.0_f64.min(end), 0.0)
        };
        if cum == cum_start {
            return Some(end);
        }
        Some(start + (end - start) * (rank - cum_start) / (cum - cum_start))
    }
}

impl Family {
    /// The series of a histogram family, grouped by labels without `le`.
    pub fn histogram(&self) -> Vec<HistogramSeries> {
        let mut out: Vec<HistogramSeries> = Vec::new();
        for s in &self.samples {
            let labels: Vec<(String, String)> = s
                .labels
                .iter()
                .filter(|(k, _)| k != "le")
                .cloned()
                .collect();
            let idx = match out.iter().position(|h| h.labels == labels) {
                Some(i) => i,
                None => {
                    out.push(HistogramSeries {
                        labels,
                        count: 0.0,
                        sum: 0.0,
                        buckets: Vec::new(),
                    });
                    out.len() - 1
                }
            };
            let h = &mut out[idx];
            if s.name.ends_with("_bucket") {
                let le = s.label("le").and_then(parse_value).unwrap_or(f64::NAN);
                h.buckets.push((le, s.value));
            } else if s.name.ends_with("_sum") {
                h.sum = s.value;
            } else if s.name.ends_with("_count") {
                h.count = s.value;
            }
        }
        for h in &mut out {
            h.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        }
        out
    }

    fn is_histogram(&self) -> bool {
        self.kind == "histogram"
    }

    /// `# name (type): help` and one line per series.
    pub fn to_text(&self) -> String {
        let mut out = format!("# {} ({})", self.name, self.kind);
        if !self.help.is_empty() {
            out.push_str(&format!(": {}", self.help));
        }
        out.push('\n');
        if self.is_histogram() {
            for h in self.histogram() {
                let q = |p: f64| {
                    h.quantile(p)
                        .map(fmt_value)
                        .unwrap_or_else(|| "-".to_string())
                };
                out.push_str(&format!(
                    "{}{} count={} sum={} p50={} p99={}\n",
                    self.name,
                    fmt_labels(&h.labels),
                    fmt_value(h.count),
                    fmt_value(h.sum),
                    q(0.5),
                    q(0.99)
                ));
            }
        } else {
            for s in &self.samples {
                out.push_str(&format!(
                    "{}{} {}\n",
                    s.name,
                    fmt_labels(&s.labels),
                    fmt_value(s.value)
                ));
            }
        }
        out
    }

    pub fn to_json(&self) -> Value {
        let labels = |l: &[(String, String)]| -> Value {
            Value::Object(
                l.iter()
                    .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                    .collect(),
            )
        };
        let series: Vec<Value> = if self.is_histogram() {
            self.histogram()
                .iter()
                .map(|h| {
                    json!({
                        "labels": labels(&h.labels),
                        "count": h.count,
                        "sum": h.sum,
                        "p50": h.quantile(0.5),
                        "p99": h.quantile(0.99),
                        "buckets": h.buckets.iter().map(|(le, c)| json!({"le": fmt_value(*le), "count": c})).collect::<Vec<_>>(),
                    })
                })
                .collect()
        } else {
            self.samples
                .iter()
                .map(|s| json!({"labels": labels(&s.labels), "value": json_number(s.value)}))
                .collect()
        };
        json!({"name": self.name, "type": self.kind, "help": self.help, "series": series})
    }
}

fn json_number(v: f64) -> Value {
    serde_json::Number::from_f64(v)
        .map(Value::Number)
        .unwrap_or_else(|| Value::String(fmt_value(v)))
}

/// Integers without a fraction, `+Inf`/`-Inf`/`NaN` as Prometheus writes them.
pub fn fmt_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

fn fmt_labels(l: &[(String, String)]) -> String {
    if l.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = l
        .iter()
        .map(|(k, v)| {
            format!(
                "{k}=\"{}\"",
                v.replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n")
            )
        })
        .collect();
    format!("{{{}}}", parts.join(","))
}

fn parse_value(t: &str) -> Option<f64> {
    match t {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => t.parse().ok(),
    }
}

/// Parses the Prometheus text exposition (version 0.0.4) into families, in served order.
pub fn parse(text: &str) -> Result<Vec<Family>, String> {
    let mut families: Vec<Family> = Vec::new();
    let mut index: BTreeMap<String, usize> = BTreeMap::new();
    fn family<'a>(
        families: &'a mut Vec<Family>,
        index: &mut BTreeMap<String, usize>,
        name: &str,
    ) -> &'a mut Family {
        let i = *index.entry(name.to_string()).or_insert_with(|| {
            families.push(Family {
                name: name.to_string(),
                kind: "untyped".into(),
                ..Family::default()
            });
            families.len() - 1
        });
        &mut families[i]
    }
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix('#') {
            let rest = rest.trim_start();
            if let Some(r) = rest.strip_prefix("HELP ") {
                let (name, help) = r.split_once(' ').unwrap_or((r, ""));
                family(&mut families, &mut index, name).help =
                    help.replace("\\n", "\n").replace("\\\\", "\\");
            } else if let Some(r) = rest.strip_prefix("TYPE ") {
                let (name, kind) = r.split_once(' ').unwrap_or((r, "untyped"));
                family(&mut families, &mut index, name).kind = kind.trim().to_string();
            }
            continue;
        }
        let sample = parse_sample(line).map_err(|e| format!("line {}: {e}: {line}", n + 1))?;
        let owner = if index.contains_key(&sample.name) {
            sample.name.clone()
        } else {
            ["_bucket", "_sum", "_count"]
                .iter()
                .filter_map(|suffix| sample.name.strip_suffix(suffix))
                .find(|base| {
                    index
                        .get(*base)
                        .map(|i| matches!(families[*i].kind.as_str(), "histogram" | "summary"))
                        .unwrap_or(false)
                })
                .map(str::to_string)
                .unwrap_or_else(|| sample.name.clone())
        };
        family(&mut families, &mut index, &owner)
            .samples
            .push(sample);
    }
    Ok(families)
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .ok_or("no value")?;
    let name = line[..name_end].to_string();
    if name.is_empty() {
        return Err("no metric name".into());
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if rest.starts_with('{') {
        let mut chars = rest.char_indices().skip(1).peekable();
        let mut end = None;
        loop {
            // Skip separators.
            while let Some((_, c)) = chars.peek() {
                if *c == ',' || c.is_whitespace() {
                    chars.next();
                } else {
                    break;
                }
            }
            let Some((i, c)) = chars.next() else { break };
            if c == '}' {
                end = Some(i);
                break;
            }
            let mut key = String::from(c);
            for (_, c) in chars.by_ref() {
                if c == '=' {
                    break;
                }
                key.push(c);
            }
            match chars.next() {
                Some((_, '"')) => {}
                _ => return Err(format!("label `{key}` has no quoted value")),
            }
            let mut value = String::new();
            let mut closed = false;
            while let Some((_, c)) = chars.next() {
                match c {
                    '\\' => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, other)) => value.push(other),
                        None => break,
                    },
                    '"' => {
                        closed = true;
                        break;
                    }
                    other => value.push(other),
                }
            }
            if !closed {
                return Err(format!("label `{key}` value is not closed"));
            }
            labels.push((key.trim().to_string(), value));
        }
        let end = end.ok_or("labels are not closed with `}`")?;
        rest = &rest[end + 1..];
    }
    let value_text = rest.split_whitespace().next().ok_or("no value")?;
    let value = parse_value(value_text).ok_or_else(|| format!("`{value_text}` is not a number"))?;
    Ok(Sample {
        name,
        labels,
        value,
    })
}

/// The served lines (HELP, TYPE, samples) of the kept families only.
fn raw_of(text: &str, keep: &[Family]) -> String {
    let names: Vec<&str> = keep.iter().map(|f| f.name.as_str()).collect();
    let owned = |metric: &str| {
        names.iter().any(|n| {
            metric == *n
                || ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|s| metric.strip_suffix(s) == Some(n))
        })
    };
    let mut out = String::new();
    for line in text.lines() {
        let metric = match line.strip_prefix("# ") {
            Some(r) => r.split_whitespace().nth(1).unwrap_or(""),
            None => line
                .split(|c: char| c == '{' || c.is_whitespace())
                .next()
                .unwrap_or(""),
        };
        if owned(metric) {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// The live in-process figures `status` shows, read from one scrape.
pub fn live_figures(families: &[Family]) -> Value {
    let find = |name: &str| families.iter().find(|f| f.name == name);
    let single = |name: &str| -> Value {
        find(name)
            .and_then(|f| f.samples.first())
            .map(|s| json_number(s.value))
            .unwrap_or(Value::Null)
    };
    let breakers: serde_json::Map<String, Value> = find("observer_breaker_state")
        .map(|f| {
            f.samples
                .iter()
                .map(|s| {
                    let state = match s.value as i64 {
                        0 => "closed",
                        1 => "half-open",
                        2 => "open",
                        _ => "unknown",
                    };
                    (
                        s.label("destination").unwrap_or("").to_string(),
                        Value::String(state.into()),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    json!({
        "listener_active": find("observer_listener_active").and_then(|f| f.samples.first()).map(|s| s.value == 1.0),
        "leader": find("observer_leader").and_then(|f| f.samples.first()).map(|s| s.value == 1.0),
        "lease_seconds_since_renewal": single("observer_lease_seconds_since_renewal"),
        "in_flight": single("observer_in_flight"),
        "lag_seconds": single("observer_lag_seconds"),
        "lag_events": single("observer_lag_events"),
        "dlq_size": single("observer_dlq_size"),
        "breakers": breakers,
        "dedup_skips": single("observer_dedup_skips_total"),
        "dedup_rate": single("observer_dedup_rate"),
        "cache_hit_rate": single("observer_cache_hit_rate"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP observer_actions_total Action outcomes by observer, type and outcome
# TYPE observer_actions_total counter
observer_actions_total{observer="a \"q\"",outcome="delivered",type="webhook"} 3
observer_actions_total{observer="b,c",outcome="dead_lettered",type="webhook"} 1
# HELP observer_d Duration
# TYPE observer_d histogram
observer_d_bucket{observer="a",le="0.1"} 0
observer_d_bucket{observer="a",le="1"} 10
observer_d_bucket{observer="a",le="2"} 20
observer_d_bucket{observer="a",le="+Inf"} 20
observer_d_sum{observer="a"} 21.5
observer_d_count{observer="a"} 20
# HELP observer_lag_seconds Age
# TYPE observer_lag_seconds gauge
observer_lag_seconds 0.25
"#;

    #[test]
    fn parses_families_labels_and_histograms() {
        let f = parse(TEXT).unwrap();
        assert_eq!(
            f.iter().map(|x| x.name.as_str()).collect::<Vec<_>>(),
            [
                "observer_actions_total",
                "observer_d",
                "observer_lag_seconds"
            ]
        );
        assert_eq!(f[0].samples[0].label("observer"), Some("a \"q\""));
        assert_eq!(f[0].samples[1].label("observer"), Some("b,c"));
        assert_eq!(f[0].samples[1].value, 1.0);
        let h = f[1].histogram();
        assert_eq!(h.len(), 1);
        assert_eq!(h[0].count, 20.0);
        assert_eq!(h[0].sum, 21.5);
        // Half the observations are in (0.1, 1]: p50 = the top of that bucket.
        assert!((h[0].quantile(0.5).unwrap() - 1.0).abs() < 1e-9);
        // p99 = 1 + (2-1) * (19.8-10)/10
        assert!((h[0].quantile(0.99).unwrap() - 1.98).abs() < 1e-9);
        let text = f[1].to_text();
        assert!(
            text.contains("observer_d{observer=\"a\"} count=20 sum=21.5 p50=1 p99=1.98"),
            "{text}"
        );
        assert!(f[0]
            .to_text()
            .contains("observer_actions_total{observer=\"a \\\"q\\\"\",outcome=\"delivered\",type=\"webhook\"} 3"));
    }

    #[test]
    fn empty_histogram_has_no_quantile_and_bad_lines_are_named() {
        let f = parse("# TYPE h histogram\nh_bucket{le=\"+Inf\"} 0\nh_sum 0\nh_count 0\n").unwrap();
        assert_eq!(f[0].histogram()[0].quantile(0.5), None);
        let e = parse("x{a=\"1\" 3\n").unwrap_err();
        assert!(e.contains("line 1"), "{e}");
        let e = parse("x abc\n").unwrap_err();
        assert!(e.contains("`abc` is not a number"), "{e}");
    }

    #[test]
    fn urls() {
        assert_eq!(
            default_url("0.0.0.0:9464").unwrap(),
            "http://127.0.0.1:9464/metrics"
        );
        assert_eq!(default_url("[::]:1").unwrap(), "http://[::1]:1/metrics");
        assert_eq!(
            normalise_url("127.0.0.1:9").unwrap(),
            "http://127.0.0.1:9/metrics"
        );
        assert_eq!(normalise_url("http://h:9/x").unwrap(), "http://h:9/x");
    }

    #[test]
    fn raw_filter_keeps_whole_families() {
        let f: Vec<Family> = parse(TEXT)
            .unwrap()
            .into_iter()
            .filter(|f| f.name.contains("observer_d"))
            .collect();
        let raw = raw_of(TEXT, &f);
        assert_eq!(raw.lines().count(), 8, "{raw}");
        assert!(!raw.contains("lag"));
    }
}
