//! `observer-fault`: the fault-injection suite of fraiseql-observers, one scenario per name.
//!
//! ```text
//! observer-fault [--short] [--json-out FILE] [SCENARIO...]     # no scenario = all
//! ```
//!
//! Each scenario drives the real daemon against real Postgres/Redis and a receiver that records
//! idempotency keys, prints its report (loss, duplicates, recovery times, RSS) and the process
//! exits 1 when any scenario broke its promise. See docs/reliability.md.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use observer_tests::fault::{self, Setup, Size};

struct Args {
    short: bool,
    json_out: Option<PathBuf>,
    daemon_bin: Option<PathBuf>,
    seed: u64,
    scenarios: Vec<String>,
}

const USAGE: &str = "usage: observer-fault [--short] [--json-out FILE] [--daemon-bin PATH] [--seed N] [SCENARIO...]
scenarios: kill9 failover-kill9 failover-term failover-stop failover-backends pg-restart redis-restart receiver-500 receiver-hang receiver-close receiver-slow receiver-down dlq-write-fail soak (default: all)
environment: FAULT_DATABASE_URL (admin URL of the shared Postgres), FAULT_REDIS_URL, FAULT_SOAK_SECS, FAULT_PG_BIN";

fn parse() -> Result<Args> {
    let mut a = Args {
        short: false,
        json_out: None,
        daemon_bin: None,
        seed: 42,
        scenarios: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(x) = it.next() {
        match x.as_str() {
            "--short" => a.short = true,
            "--json-out" => a.json_out = Some(it.next().context("--json-out needs a file")?.into()),
            "--daemon-bin" => {
                a.daemon_bin = Some(it.next().context("--daemon-bin needs a path")?.into())
            }
            "--seed" => {
                a.seed = it
                    .next()
                    .context("--seed needs a number")?
                    .parse()
                    .context("--seed needs a number")?
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            s if s.starts_with('-') => bail!("unknown option {s}\n{USAGE}"),
            "all" => a.scenarios.extend(fault::ALL.iter().map(|s| s.to_string())),
            s if fault::ALL.contains(&s) => a.scenarios.push(s.to_string()),
            s => bail!("unknown scenario {s}\n{USAGE}"),
        }
    }
    if a.scenarios.is_empty() {
        a.scenarios = fault::ALL.iter().map(|s| s.to_string()).collect();
    }
    Ok(a)
}

fn main() {
    let result = parse().and_then(|args| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?
            .block_on(real_main(args))
    });
    if let Err(e) = result {
        eprintln!("observer-fault: {e:#}");
        std::process::exit(1);
    }
}

async fn real_main(args: Args) -> Result<()> {
    let bin = match args.daemon_bin {
        Some(b) => b,
        None => std::env::current_exe()?.with_file_name("fraiseql-observers"),
    };
    if !bin.exists() {
        bail!(
            "daemon binary {} not found (build it, or pass --daemon-bin)",
            bin.display()
        );
    }
    let work = std::env::temp_dir().join(format!("observer-fault-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let setup = Setup {
        bin,
        admin_url: std::env::var("FAULT_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into()),
        redis_url: std::env::var("FAULT_REDIS_URL")
            .unwrap_or_else(|_| "redis://127.0.0.1:6379".into()),
        work: work.clone(),
        seed: args.seed,
    };
    let size = if args.short { Size::Short } else { Size::Long };
    let started = chrono::Utc::now();
    let mut reports = Vec::new();
    for name in &args.scenarios {
        let r = fault::run(name, &setup, size).await?;
        print_report(&r);
        reports.push(r);
        if let Some(p) = &args.json_out {
            write_json(p, started, size, &setup, &reports)?;
        }
    }
    let _ = std::fs::remove_dir_all(&work);
    println!();
    println!("summary ({:?}, seed {})", size, setup.seed);
    for r in &reports {
        println!(
            "  {:<16} {}  {:>8.1} s  loss {}  duplicates {}",
            r.scenario,
            if r.passed { "PASS" } else { "FAIL" },
            r.seconds,
            r.figures["loss"],
            r.figures["duplicates"]
        );
    }
    if reports.iter().any(|r| !r.passed) {
        bail!("some scenarios broke their promises (see FAIL above)");
    }
    Ok(())
}

fn write_json(
    p: &PathBuf,
    started: chrono::DateTime<chrono::Utc>,
    size: Size,
    setup: &Setup,
    reports: &[fault::Report],
) -> Result<()> {
    let v = serde_json::json!({
        "date": started.to_rfc3339(),
        "size": format!("{size:?}"),
        "seed": setup.seed,
        "daemon_binary": setup.bin.display().to_string(),
        "nproc": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "reports": reports,
    });
    std::fs::write(p, serde_json::to_string_pretty(&v)? + "\n")
        .with_context(|| format!("writing {}", p.display()))
}

fn print_report(r: &fault::Report) {
    println!();
    println!(
        "== {} — {} ({:.1} s, loadavg at start {})",
        r.scenario,
        if r.passed { "PASS" } else { "FAIL" },
        r.seconds,
        r.loadavg_at_start
    );
    if let Some(m) = r.figures.as_object() {
        for (k, v) in m {
            if k == "samples" || k == "accounting" {
                continue;
            }
            println!("  {k:<40} {v}");
        }
    }
    for f in &r.failures {
        println!("  BROKEN: {f}");
    }
}
