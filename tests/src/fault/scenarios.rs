//! The scenarios. Each drives the real daemon against real Postgres (the shared server for
//! most, a private cluster where the server is restarted), real Redis (a private server where it
//! is killed) and the fault-injecting receiver, and returns a [`Report`] of loss, duplicates
//! (and whether each was in flight and carried its event's key), recovery times and RSS.
//!
//! Each takes a [`Size`]: `Short` is what the test suite runs (seconds), `Long` is the issue's
//! sizes (100,000 events and ten kills, minutes of receiver outage, a one-hour soak).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;
use uuid::Uuid;

use super::private_pg::PrivatePostgres;
use super::sink::{Fault, Sink};
use super::world::*;
use crate::redis_server::{PrivateRedis, RedisPrefix};

pub const OBSERVER: &str = "fault-hook";
pub const LISTENER: &str = "fault";
const READY: [&str; 2] = ["no checkpoint", "resuming"];

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Size {
    Short,
    Long,
}

impl Size {
    fn pick<T>(self, short: T, long: T) -> T {
        match self {
            Size::Short => short,
            Size::Long => long,
        }
    }
}

/// Every scenario name, in the order `all` runs them.
pub const ALL: [&str; 14] = [
    "kill9",
    "failover-kill9",
    "failover-term",
    "failover-stop",
    "failover-backends",
    "pg-restart",
    "redis-restart",
    "receiver-500",
    "receiver-hang",
    "receiver-close",
    "receiver-slow",
    "receiver-down",
    "dlq-write-fail",
    "soak",
];

/// Runs one scenario by name.
pub async fn run(name: &str, setup: &Setup, size: Size) -> Result<Report> {
    let t0 = Instant::now();
    say(format!("scenario {name} ({size:?}), loadavg {}", loadavg()));
    let mut r = match name {
        "kill9" => kill9(setup, size).await,
        "failover-kill9" => failover(setup, size, name, LeaderFault::Kill9).await,
        "failover-term" => failover(setup, size, name, LeaderFault::Term).await,
        "failover-stop" => failover(setup, size, name, LeaderFault::Stop).await,
        "failover-backends" => failover(setup, size, name, LeaderFault::Backends).await,
        "pg-restart" => pg_restart(setup, size).await,
        "redis-restart" => redis_restart(setup, size).await,
        "receiver-500" => receiver(setup, size, name, Fault::Error500 { p: 0.5 }).await,
        "receiver-hang" => receiver(setup, size, name, Fault::Hang { p: 0.2 }).await,
        "receiver-close" => receiver(setup, size, name, Fault::CloseMidResponse { p: 0.3 }).await,
        "receiver-slow" => {
            receiver(
                setup,
                size,
                name,
                Fault::Slow {
                    delay: Duration::from_millis(200),
                },
            )
            .await
        }
        "receiver-down" => receiver_down(setup, size).await,
        "dlq-write-fail" => dlq_write_fail(setup, size).await,
        "soak" => soak(setup, size).await,
        other => bail!("unknown scenario `{other}` (known: {})", ALL.join(", ")),
    }?;
    r.seconds = r3(t0.elapsed().as_secs_f64());
    Ok(r)
}

/// The daemon's config: listener `fault` from the beginning with checkpoints, one webhook
/// observer `fault-hook` on `Order` INSERTs, the given layers and sections.
fn daemon_config(
    db_url: &str,
    sink_url: &str,
    features: &[&str],
    sections: &str,
    action: &str,
    enrich: bool,
) -> String {
    let mut f = String::from("checkpoint = true\n");
    for x in features {
        f.push_str(&format!("{x} = true\n"));
    }
    let enrich = if enrich {
        "  [[observers.enrich]]\n  name = \"tier\"\n  key = \"tier:{{ data.total }}\"\n  sql = \"SELECT $1::numeric AS total, 'gold' AS tier\"\n  params = [\"{{ data.total }}\"]\n  ttl_secs = 3600\n"
    } else {
        ""
    };
    let allow = crate::LOOPBACK_ALLOW;
    format!(
        r#"# written by observer-fault
[database]
url = "{db_url}"

# The sink is on loopback, which the outbound guard refuses unless allowed.
[outbound]
{allow}

[listener]
id = "{LISTENER}"
start_from = "beginning"
poll_interval_ms = 200
shutdown_timeout_ms = 10000

[features]
{f}
{sections}

[[observers]]
name = "{OBSERVER}"
entity = "Order"
events = ["INSERT"]
{enrich}
  [[observers.actions]]
  type = "webhook"
  url = "{sink_url}"
  {action}
"#
    )
}

const FAST_RETRY: &str =
    r#"retry = { max_attempts = 20, backoff = "exponential", initial_ms = 20, max_ms = 500 }"#;

/// Starts the daemon and waits until it has taken its start position.
async fn start_daemon(d: &mut DaemonProc) -> Result<()> {
    d.start()?;
    d.wait_log(&READY, Duration::from_secs(60)).await
}

/// Waits until the checkpoint covers the whole change log; seconds taken.
async fn wait_caught_up(s: &Scratch, timeout: Duration) -> Result<f64> {
    let t0 = Instant::now();
    loop {
        let left = s.uncovered(LISTENER).await?.len();
        if left == 0 {
            return Ok(t0.elapsed().as_secs_f64());
        }
        if t0.elapsed() > timeout {
            bail!("the checkpoint still leaves {left} events uncovered after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Loss/duplicate figures and the promises every scenario shares: nothing lost, every
/// delivery carried its event's key (and `webhook-id` = `Idempotency-Key`).
fn account_into(r: &mut Report, events: &[Uuid], sink: &Sink) -> Accounting {
    let a = account(events, OBSERVER, &sink.deliveries());
    r.set("events", a.expected);
    r.set("loss", a.lost);
    r.set("duplicates", a.duplicates);
    r.set("accounting", &a);
    r.set("receiver", sink.counts());
    r.check(a.expected > 0, "the run produced events");
    r.check(
        a.lost == 0,
        format!("loss 0 (lost {}, e.g. {:?})", a.lost, a.lost_sample),
    );
    r.check(
        a.keys_consistent,
        format!(
            "every delivery carries its event's idempotency key ({} mismatched, {} unknown)",
            a.key_mismatches, a.unknown_keys
        ),
    );
    a
}

fn rss_of(d: &DaemonProc) -> Option<u64> {
    d.pid().and_then(rss_kb)
}

// ---------------------------------------------------------------------------------------------
// kill -9
// ---------------------------------------------------------------------------------------------

/// `kill -9` of the daemon at random moments while events are inserted and delivered; each
/// time it is started again at once. Promise: loss 0; every duplicate was in flight at a kill
/// (accepted before it, not yet covered by the checkpoint saved when it died) and carried the
/// same key.
async fn kill9(setup: &Setup, size: Size) -> Result<Report> {
    use rand::{Rng, SeedableRng};
    let mut r = Report::new("kill9");
    let n: u64 = size.pick(6_000, 100_000);
    let kills = size.pick(3, 10);
    let s = Scratch::create(setup, &setup.admin_url, "kill9").await?;
    let sink = Sink::start(setup.seed).await?;
    let cfg = daemon_config(
        &s.url,
        &sink.url("/hook"),
        &["concurrent"],
        "[concurrent]\nmax_in_flight = 64\n",
        FAST_RETRY,
        false,
    );
    let mut d = DaemonProc::new(&setup.bin, &s.dir, &cfg, &[])?;
    let result = async {
        start_daemon(&mut d).await?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(setup.seed);
        let mut targets: Vec<u64> = (0..kills)
            .map(|_| rng.random_range(n / 20..n * 19 / 20))
            .collect();
        targets.sort();
        // Paced, so the kills fall at random moments of a run that lasts a while.
        let ins = Inserter::spawn(&s.url, n, 100, Some(size.pick(1_000.0, 2_000.0)));
        let mut kill_log = Vec::new();
        // (kill instant, the instant the next process was started, events not covered by the
        // checkpoint the kill left, how many of those the receiver had already accepted = the
        // work in flight)
        let mut in_flight: Vec<(Instant, Instant, HashSet<u128>, usize)> = Vec::new();
        let mut rss_peak = 0;
        for (i, target) in targets.iter().enumerate() {
            let t_wait = Instant::now();
            while (sink.accepted() as u64) < *target {
                if let Some(st) = d.exited() {
                    bail!("the daemon exited on its own ({st}); log:\n{}", d.log());
                }
                rss_peak = rss_peak.max(rss_of(&d).unwrap_or(0));
                if t_wait.elapsed() > Duration::from_secs(300) {
                    bail!("no progress to {target} deliveries within 300 s");
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let accepted_at_kill = sink.accepted();
            d.kill9();
            let killed_at = Instant::now();
            let uncovered: HashSet<u128> = s
                .uncovered(LISTENER)
                .await?
                .iter()
                .map(|u| u.as_u128())
                .collect();
            let accepted_events: HashSet<u128> =
                sink.deliveries().iter().map(|x| x.event).collect();
            let delivered_uncovered = uncovered.intersection(&accepted_events).count();
            let restart_at = Instant::now();
            d.start()?;
            d.wait_log(&READY, Duration::from_secs(60)).await?;
            // Recovery: from the restart to the next accepted delivery.
            let before = sink.accepted();
            let rec_deadline = Instant::now() + Duration::from_secs(120);
            while sink.accepted() == before
                && (ins.committed() < n || !s.uncovered(LISTENER).await?.is_empty())
            {
                if Instant::now() > rec_deadline {
                    bail!("no delivery within 120 s of restart #{}", i + 1);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let recovery = restart_at.elapsed().as_secs_f64();
            say(format!(
                "kill #{} at {accepted_at_kill} deliveries: {} uncovered, delivering again {recovery:.2} s after restart",
                i + 1,
                uncovered.len()
            ));
            kill_log.push(json!({
                "kill": i + 1,
                "accepted_before_kill": accepted_at_kill,
                "uncovered_by_checkpoint_at_kill": uncovered.len(),
                "in_flight_delivered_not_checkpointed": delivered_uncovered,
                "restart_to_next_delivery_s": r3(recovery),
            }));
            in_flight.push((killed_at, restart_at, uncovered, delivered_uncovered));
        }
        ins.finish(Duration::from_secs(600)).await?;
        let events = s.order_events().await?;
        let all = wait_all_delivered(&sink, &events, OBSERVER, Duration::from_secs(120)).await;
        let caught = wait_caught_up(&s, Duration::from_secs(120)).await;
        rss_peak = rss_peak.max(rss_of(&d).unwrap_or(0));
        let rss_end = rss_of(&d);
        let stop = d.stop(Duration::from_secs(30)).await;
        let a = account_into(&mut r, &events, &sink);
        r.check(all.is_some(), "every event delivered after the last restart");
        r.check(caught.is_ok(), "the checkpoint covers every event at the end");
        // Every duplicate: a kill between two of its arrivals, with its event uncovered then.
        let dups = duplicate_arrivals(&sink.deliveries());
        let key_event: HashMap<u128, u128> = sink
            .deliveries()
            .iter()
            .map(|d| (d.key, d.event))
            .collect();
        // Each repeat arrival must come from a process started after a kill, the previous
        // arrival from before that process existed, with the event not covered by the
        // checkpoint the kill left. "Before the next process existed", not "before the kill":
        // a request the killed process had already written to its socket is still in the
        // kernel's buffers and can reach the receiver after the kill. (One run of 4 failed this
        // check once at load 5-9 without a report of where the arrivals fell; 26 runs since,
        // with the report below, found none such. If it fails again, the sample says why.)
        let mut not_in_flight = 0;
        let mut not_in_flight_sample = Vec::new();
        // First arrivals that reached the receiver between the kill and the restart.
        let mut written_before_kill_arrived_after = 0;
        let mut per_kill = vec![0usize; in_flight.len()];
        for (key, arrivals) in &dups {
            let ev = key_event.get(key).copied().unwrap_or(0);
            let mut arrivals = arrivals.clone();
            arrivals.sort();
            for w in arrivals.windows(2) {
                let k = in_flight.iter().rposition(|(_, started, unc, _)| {
                    w[0] < *started && w[1] > *started && unc.contains(&ev)
                });
                match k {
                    Some(k) => {
                        per_kill[k] += 1;
                        if w[0] >= in_flight[k].0 {
                            written_before_kill_arrived_after += 1;
                        }
                    }
                    None => {
                        not_in_flight += 1;
                        if not_in_flight_sample.len() < 5 {
                            // Where the two arrivals fell against each kill, in ms.
                            let near: Vec<serde_json::Value> = in_flight
                                .iter()
                                .enumerate()
                                .map(|(i, (killed, started, unc, _))| {
                                    let ms = |t: Instant| {
                                        if t >= *killed {
                                            (t - *killed).as_secs_f64() * 1e3
                                        } else {
                                            -((*killed - t).as_secs_f64() * 1e3)
                                        }
                                    };
                                    json!({"kill": i + 1, "first_ms": r3(ms(w[0])), "second_ms": r3(ms(w[1])),
                                        "restart_ms": r3(ms(*started)), "uncovered": unc.contains(&ev)})
                                })
                                .collect();
                            not_in_flight_sample.push(json!({"event": format!("{ev:032x}"), "against_kills": near}));
                        }
                    }
                }
            }
        }
        let over_bound: Vec<usize> = (0..in_flight.len())
            .filter(|k| per_kill[*k] > in_flight[*k].3)
            .collect();
        let bound: usize = in_flight.iter().map(|(_, _, _, n)| n).sum();
        r.set("kills", kills);
        r.set("kill_log", kill_log);
        r.set("duplicates_per_kill", &per_kill);
        r.set("duplicate_bound_in_flight_at_kills", bound);
        r.set("duplicates_not_in_flight", not_in_flight);
        r.set("duplicates_not_in_flight_sample", not_in_flight_sample);
        r.set(
            "duplicates_first_arrived_between_kill_and_restart",
            written_before_kill_arrived_after,
        );
        r.set("rss_peak_kb", rss_peak);
        r.set("rss_end_kb", rss_end);
        r.set("daemon_starts", d.starts);
        r.set("exit_after_sigterm", stop);
        r.check(
            not_in_flight == 0,
            format!("every duplicate was in flight at a kill ({not_in_flight} were not)"),
        );
        r.check(
            over_bound.is_empty() && a.duplicates <= bound,
            format!(
                "duplicates of each kill ≤ what was in flight at it (delivered, not checkpointed): {per_kill:?} vs {:?}",
                in_flight.iter().map(|x| x.3).collect::<Vec<_>>()
            ),
        );
        Ok(())
    }
    .await;
    finish(&mut r, result, &d);
    s.drop_db().await;
    Ok(r)
}

// ---------------------------------------------------------------------------------------------
// Failover: the leader of a two-instance group killed, stopped or paused
// ---------------------------------------------------------------------------------------------

/// What is done to the leader of the group.
#[derive(Debug, Clone, Copy, PartialEq)]
enum LeaderFault {
    /// `kill -9`, then started again as a standby.
    Kill9,
    /// SIGTERM (hands the lease back), then started again as a standby.
    Term,
    /// SIGSTOP past the lease, then SIGCONT: it must find it lost the lease and stand by.
    Stop,
    /// Every Postgres session of the leader terminated (`pg_terminate_backend`): it must stop
    /// and stand by again on its own.
    Backends,
}

/// The failover layer's lease, shorter than the default so a paused leader costs seconds.
const FAILOVER_LEASE_MS: u64 = 2_000;

/// Two daemons with the `failover` layer on one listener, paced inserts, and `faults` times the
/// current leader is hit by `fault`. Promises: loss 0; a standby delivers again within the
/// bound of the fault (kill -9: 5 s, SIGTERM: 1 s, SIGSTOP: lease + 1 s); every duplicate was
/// in flight at a fault (delivered, not covered by the checkpoint then) and carried its key;
/// between faults (steady state, two instances) nothing is delivered twice.
async fn failover(setup: &Setup, size: Size, name: &str, fault: LeaderFault) -> Result<Report> {
    let mut r = Report::new(name);
    let faults = size.pick(3, 10);
    let rate = size.pick(500.0, 1_000.0);
    // Inserts outlast the faults, so there is always a next event to take the takeover time
    // from: a second of steady state before each fault, plus the fault's own cycle.
    let cycle_s = match fault {
        LeaderFault::Stop => 5.0,
        LeaderFault::Kill9 | LeaderFault::Term | LeaderFault::Backends => 2.5,
    };
    let n = (rate * (faults as f64 * cycle_s + 3.0)) as u64;
    let s = Scratch::create(setup, &setup.admin_url, &name.replace('-', "_")).await?;
    let sink = Sink::start(setup.seed).await?;
    let cfg = daemon_config(
        &s.url,
        &sink.url("/hook"),
        &["concurrent", "failover"],
        &format!(
            "[concurrent]\nmax_in_flight = 64\n\n[failover]\nlease_ms = {FAILOVER_LEASE_MS}\n"
        ),
        FAST_RETRY,
        false,
    );
    let bound = match fault {
        LeaderFault::Kill9 | LeaderFault::Backends => Duration::from_secs(5),
        LeaderFault::Term => Duration::from_secs(1),
        LeaderFault::Stop => Duration::from_millis(FAILOVER_LEASE_MS) + Duration::from_secs(1),
    };
    for d in ["a", "b"] {
        std::fs::create_dir_all(s.dir.join(d))?;
    }
    let mut ds = [
        DaemonProc::new(&setup.bin, &s.dir.join("a"), &cfg, &[])?,
        DaemonProc::new(&setup.bin, &s.dir.join("b"), &cfg, &[])?,
    ];
    let result = async {
        ds[0].start()?;
        ds[0].wait_log(&["now the leader"], Duration::from_secs(60)).await?;
        ds[1].start()?;
        ds[1].wait_log(&["standing by"], Duration::from_secs(60)).await?;
        let ins = Inserter::spawn(&s.url, n, 20, Some(rate));
        let mut takeovers: Vec<f64> = Vec::new();
        let mut fault_log = Vec::new();
        let mut in_flight: Vec<(Instant, HashSet<u128>, usize)> = Vec::new();
        for i in 0..faults {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if ins.is_finished() {
                bail!("the inserts ended before fault #{}: nothing left to measure a takeover by", i + 1);
            }
            let (leader, term) = leader_term(&s, &ds).await?;
            let other = 1 - leader;
            let standing_by = ds[leader].log().matches("standing by").count();
            let at = Instant::now();
            match fault {
                LeaderFault::Kill9 => ds[leader].kill9(),
                LeaderFault::Term => ds[leader].signal("TERM")?,
                LeaderFault::Stop => ds[leader].signal("STOP")?,
                LeaderFault::Backends => {
                    let pid = ds[leader].pid().context("the leader is not running")?;
                    let c = s.client().await?;
                    c.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                         WHERE datname = current_database()
                           AND (application_name = $1 OR application_name LIKE $1 || ' %')",
                        &[&format!("fraiseql-observers pid {pid}")],
                    )
                    .await?;
                }
            }
            // What the checkpoint leaves uncovered once the leader is stopped or gone (a
            // snapshot before the signal would miss events it delivered in between).
            let uncovered: HashSet<u128> = s
                .uncovered(LISTENER)
                .await?
                .iter()
                .map(|u| u.as_u128())
                .collect();
            // The lease moves to the other instance; from then on only it delivers. When only
            // the leader's sessions were terminated, its process lives on and may legitimately
            // win the next term itself (it reclaims a lease it still holds at once, with a new
            // token, fenced like any takeover): a new term by either instance is the takeover.
            let deadline = at + Duration::from_secs(60);
            let new_leader = loop {
                match leader_term(&s, &ds).await.ok() {
                    Some((l, _)) if l == other => break l,
                    Some((l, t)) if matches!(fault, LeaderFault::Backends) && t > term => break l,
                    _ => {}
                }
                if Instant::now() > deadline {
                    bail!("no takeover within 60 s of fault #{}", i + 1);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            };
            let moved = Instant::now();
            // Takeover: from the fault to the first delivery after the lease moved (inserts
            // keep coming, so there is always one to make).
            let after_move = |d: &[super::sink::Delivery]| d.iter().any(|x| x.at >= moved);
            while !after_move(&sink.deliveries()) {
                if Instant::now() > deadline {
                    bail!("no delivery within 60 s of fault #{}", i + 1);
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            let took = at.elapsed().as_secs_f64();
            takeovers.push(took);
            // What the old leader had delivered without its checkpoint covering it.
            let delivered_uncovered = sink
                .deliveries()
                .iter()
                .filter(|x| x.at < moved && uncovered.contains(&x.event))
                .map(|x| x.event)
                .collect::<HashSet<u128>>()
                .len();
            say(format!(
                "{name} #{}: leader {leader} hit; {} delivered again {took:.3} s later",
                i + 1,
                if new_leader == other { "the other" } else { "it (new term)" }
            ));
            // The old leader rejoins as a standby.
            match fault {
                LeaderFault::Kill9 => ds[leader].start()?,
                LeaderFault::Term => {
                    let t0 = Instant::now();
                    while ds[leader].exited().is_none() {
                        if t0.elapsed() > Duration::from_secs(30) {
                            bail!("the leader did not exit within 30 s of SIGTERM");
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    ds[leader].start()?
                }
                LeaderFault::Stop => ds[leader].signal("CONT")?,
                LeaderFault::Backends => {}
            }
            let t0 = Instant::now();
            let fresh = matches!(fault, LeaderFault::Kill9 | LeaderFault::Term);
            while new_leader == other && ds[leader].log().matches("standing by").count() <= if fresh { 0 } else { standing_by } {
                if t0.elapsed() > Duration::from_secs(60) {
                    bail!("the old leader did not stand by within 60 s; log:\n{}", ds[leader].log());
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            fault_log.push(json!({
                "fault": i + 1,
                "takeover_s": r3(took),
                "lease_moved_after_s": r3((moved - at).as_secs_f64()),
                "uncovered_by_checkpoint_at_fault": uncovered.len(),
                "in_flight_delivered_not_checkpointed": delivered_uncovered,
            }));
            in_flight.push((at, uncovered, delivered_uncovered));
        }
        ins.finish(Duration::from_secs(600)).await?;
        let events = s.order_events().await?;
        let all = wait_all_delivered(&sink, &events, OBSERVER, Duration::from_secs(120)).await;
        let caught = wait_caught_up(&s, Duration::from_secs(120)).await;
        account_into(&mut r, &events, &sink);
        r.check(all.is_some(), "every event delivered");
        r.check(caught.is_ok(), "the checkpoint covers every event at the end");
        let dups = duplicate_arrivals(&sink.deliveries());
        let key_event: HashMap<u128, u128> =
            sink.deliveries().iter().map(|d| (d.key, d.event)).collect();
        let mut not_in_flight = 0;
        let mut unexplained = Vec::new();
        let mut per_fault = vec![0usize; in_flight.len()];
        for (key, arrivals) in &dups {
            let ev = key_event.get(key).copied().unwrap_or(0);
            let mut arrivals = arrivals.clone();
            arrivals.sort();
            for w in arrivals.windows(2) {
                match in_flight
                    .iter()
                    .rposition(|(at, unc, _)| w[1] >= *at && unc.contains(&ev))
                {
                    Some(k) => per_fault[k] += 1,
                    None => {
                        not_in_flight += 1;
                        // Where the two arrivals fall against each fault, for the report.
                        let rel: Vec<String> = in_flight
                            .iter()
                            .map(|(at, unc, _)| {
                                let f = |t: Instant| {
                                    if t >= *at {
                                        (t - *at).as_secs_f64()
                                    } else {
                                        -(*at - t).as_secs_f64()
                                    }
                                };
                                format!("{:+.3}/{:+.3} uncovered={}", f(w[0]), f(w[1]), unc.contains(&ev))
                            })
                            .collect();
                        unexplained.push(json!({"event": Uuid::from_u128(ev).to_string(), "against_each_lease_move": rel}));
                    }
                }
            }
        }
        r.set("duplicates_unexplained", unexplained);
        let mut sorted = takeovers.clone();
        sorted.sort_by(f64::total_cmp);
        let p50 = sorted.get(sorted.len() / 2).copied().unwrap_or(0.0);
        let max = sorted.last().copied().unwrap_or(0.0);
        r.set("faults", faults);
        r.set("fault", format!("{fault:?}"));
        r.set("lease_ms", FAILOVER_LEASE_MS);
        r.set("takeover_p50_s", r3(p50));
        r.set("takeover_max_s", r3(max));
        r.set("fault_log", fault_log);
        r.set("duplicates_per_fault", &per_fault);
        r.set("duplicates_not_in_flight", not_in_flight);
        r.check(
            max <= bound.as_secs_f64(),
            format!("a standby delivers within {bound:?} of each fault (max {max:.3} s)"),
        );
        r.check(
            not_in_flight == 0,
            format!("every duplicate was in flight at a fault ({not_in_flight} were not): steady state delivers once"),
        );
        // In flight at a fault: what the checkpoint did not cover when the leader stopped
        // (read or dispatched and not completed, or committed and not yet read).
        let over: Vec<usize> = (0..in_flight.len())
            .filter(|k| per_fault[*k] > in_flight[*k].1.len())
            .collect();
        r.check(
            over.is_empty(),
            format!(
                "duplicates of each fault ≤ what its checkpoint left uncovered: {per_fault:?} vs {:?}",
                in_flight.iter().map(|x| x.1.len()).collect::<Vec<_>>()
            ),
        );
        for d in ds.iter_mut() {
            let st = d.stop(Duration::from_secs(30)).await;
            r.check(st.contains("exit status: 0"), format!("clean exit after SIGTERM ({st})"));
        }
        Ok(())
    }
    .await;
    let warnings: Vec<String> = ds.iter().flat_map(|d| d.warnings(8)).collect();
    if let Err(e) = result {
        r.check(false, format!("scenario error: {e:#}"));
    }
    if !r.passed {
        // Both logs, to see who held what when it went wrong.
        let tails: Vec<Vec<String>> = ds
            .iter()
            .map(|d| {
                let all = d.all_logs();
                let lines: Vec<&str> = all.lines().collect();
                lines[lines.len().saturating_sub(200)..]
                    .iter()
                    .map(|l| l.to_string())
                    .collect()
            })
            .collect();
        r.set("daemon_log_tails", tails);
        // And what every session of the database was doing then.
        if let Ok(c) = s.client().await {
            if let Ok(rows) = c
                .query(
                    "SELECT format('%s | %s | %s/%s | %s', application_name, state, wait_event_type, wait_event, left(query, 160))
                     FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()",
                    &[],
                )
                .await
            {
                let sessions: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
                r.set("sessions_at_failure", sessions);
            }
        }
    }
    r.set("daemon_warnings", warnings);
    for d in ds.iter_mut() {
        d.kill9();
    }
    s.drop_db().await;
    Ok(r)
}

/// Which of the two daemons holds the lease now, by the pid in the lease row.
/// Which daemon holds the lease, and its term (the fencing token).
async fn leader_term(s: &Scratch, ds: &[DaemonProc; 2]) -> Result<(usize, i64)> {
    let c = s.client().await?;
    let row = c
        .query_opt(
            "SELECT holder_name, token FROM observer_leases WHERE listener_id = $1 AND expires_at > now()",
            &[&LISTENER],
        )
        .await?;
    let (holder, token): (Option<String>, i64) = match row {
        Some(r) => (r.get(0), r.get(1)),
        None => (None, 0),
    };
    let holder = holder.context("no instance holds the lease")?;
    let i = ds
        .iter()
        .position(|d| d.pid().is_some_and(|p| holder.ends_with(&format!(":{p}"))))
        .with_context(|| format!("the lease holder {holder} is neither daemon"))?;
    Ok((i, token))
}

/// A scenario's error becomes a failed report (with the daemon's warnings) rather than an abort.
fn finish(r: &mut Report, result: Result<()>, d: &DaemonProc) {
    if let Err(e) = result {
        r.check(false, format!("scenario error: {e:#}"));
    }
    r.set("daemon_warnings", d.warnings(15));
}

// ---------------------------------------------------------------------------------------------
// Postgres unreachable at start, and restarted mid-run
// ---------------------------------------------------------------------------------------------

/// A private cluster: the daemon is started while it is down (it must say it is waiting, then
/// proceed when it comes up), then the server is restarted in the middle of a run (the daemon
/// must reconnect with backoff, stay up — no crash loop — and lose nothing).
async fn pg_restart(setup: &Setup, size: Size) -> Result<Report> {
    let mut r = Report::new("pg-restart");
    let pg_parent = setup.work.join(format!("pg-{}", std::process::id()));
    std::fs::create_dir_all(&pg_parent)?;
    let mut pg = PrivatePostgres::start(&pg_parent).context("starting a private postgres")?;
    let s = Scratch::create(setup, &pg.admin_url(), "pgrestart").await?;
    let sink = Sink::start(setup.seed).await?;
    let cfg = daemon_config(
        &s.url,
        &sink.url("/hook"),
        &["concurrent"],
        "",
        FAST_RETRY,
        false,
    )
    .replacen("[database]\n", "[database]\nconnect_timeout_ms = 2000\n", 1);
    let mut d = DaemonProc::new(&setup.bin, &s.dir, &cfg, &[])?;
    let down_at_start = Duration::from_secs(size.pick(4, 15));
    let outage = Duration::from_secs(size.pick(3, 20));
    let n: u64 = size.pick(3_000, 30_000);
    let rate = size.pick(500.0, 1_000.0);
    let result = async {
        // 1. unreachable at start
        pg.stop_server()?;
        d.start()?;
        d.wait_log(&["waiting and retrying"], Duration::from_secs(30))
            .await?;
        let waiting_line = d
            .log()
            .lines()
            .find(|l| l.contains("waiting and retrying"))
            .unwrap_or_default()
            .to_string();
        tokio::time::sleep(down_at_start).await;
        let alive_while_down = d.exited().is_none();
        let pid0 = d.pid();
        pg.start_server()?;
        let up_at = Instant::now();
        d.wait_log(&READY, Duration::from_secs(120)).await?;
        let start_recovery = up_at.elapsed().as_secs_f64();
        r.set("start_waiting_message", waiting_line.trim());
        r.set("start_db_down_for_s", down_at_start.as_secs());
        r.set("start_db_up_to_ready_s", r3(start_recovery));
        r.check(alive_while_down, "the daemon keeps waiting while the database is unreachable at start");

        // 2. restart mid-run
        let ins = Inserter::spawn(&s.url, n, 10, Some(rate));
        while ins.committed() < n / 3 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let before = sink.accepted();
        pg.stop_server()?;
        let stopped_at = Instant::now();
        tokio::time::sleep(outage).await;
        pg.start_server()?;
        let up_at = Instant::now();
        let deadline = Instant::now() + Duration::from_secs(180);
        let accepted_at_up = sink.accepted();
        while sink.accepted() == accepted_at_up {
            if Instant::now() > deadline {
                bail!("no delivery within 180 s of the server coming back");
            }
            if let Some(st) = d.exited() {
                bail!("the daemon exited ({st}) after the restart; log:\n{}", d.log());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let recovery = up_at.elapsed().as_secs_f64();
        say(format!("postgres back after {:.1} s; deliveries again {recovery:.2} s later", (up_at - stopped_at).as_secs_f64()));
        ins.finish(Duration::from_secs(600)).await?;
        let events = s.order_events().await?;
        let all = wait_all_delivered(&sink, &events, OBSERVER, Duration::from_secs(120)).await;
        let caught = wait_caught_up(&s, Duration::from_secs(120)).await;
        let same_process = d.pid() == pid0 && d.exited().is_none();
        let log = d.log();
        let reconnect_lines = log.lines().filter(|l| l.contains("waiting and retrying")).count();
        let run_restarts = log.lines().filter(|l| l.contains("restarting")).count();
        // After a run that delivered, the backoff starts over: the first restart waits 500 ms.
        let first_restart = log
            .lines()
            .find(|l| l.contains("restarting from the checkpoint"))
            .unwrap_or_default()
            .to_string();
        r.check(
            first_restart.is_empty() || first_restart.contains("retry_in_ms=500"),
            format!("a run that delivered restarts after the first backoff step, not a grown one ({first_restart})"),
        );
        r.set("accepted_before_restart", before);
        r.set("outage_s", r3((up_at - stopped_at).as_secs_f64()));
        r.set("db_up_to_next_delivery_s", r3(recovery));
        r.set("waiting_messages", reconnect_lines);
        r.set("run_restart_messages", run_restarts);
        r.set("rss_end_kb", rss_of(&d));
        r.set("daemon_process_restarts", 0);
        r.check(same_process, "one daemon process throughout (no crash, no crash loop)");
        r.check(all.is_some(), "every event delivered after the restart");
        r.check(caught.is_ok(), "the checkpoint covers every event at the end");
        let stop = d.stop(Duration::from_secs(30)).await;
        r.set("exit_after_sigterm", &stop);
        let a = account_into(&mut r, &events, &sink);
        r.set("insert_transactions_failed_during_outage", ins_failed(&a));
        Ok(())
    }
    .await;
    finish(&mut r, result, &d);
    d.kill9();
    s.drop_db().await;
    drop(pg);
    let _ = std::fs::remove_dir_all(&pg_parent);
    Ok(r)
}

fn ins_failed(_a: &Accounting) -> &'static str {
    "not counted as events (a failed transaction wrote no change-log row)"
}

// ---------------------------------------------------------------------------------------------
// Redis killed and restarted
// ---------------------------------------------------------------------------------------------

/// A private redis-server backing dedup (Redis backend) and caching (an enrichment lookup) is
/// killed mid-run and started again. Promise: loss 0, no duplicate (the daemon never restarts),
/// the daemon stays up; the dedup/cache error counters show the outage was noticed.
async fn redis_restart(setup: &Setup, size: Size) -> Result<Report> {
    let mut r = Report::new("redis-restart");
    let mut redis = PrivateRedis::start().await;
    let s = Scratch::create(setup, &setup.admin_url, "redis").await?;
    let sink = Sink::start(setup.seed).await?;
    let mport = free_port()?;
    let cfg = daemon_config(
        &s.url,
        &sink.url("/hook"),
        &["concurrent", "dedup", "caching", "metrics"],
        &format!(
            "[redis]\nurl = \"{}\"\nkey_prefix = \"fault\"\ntimeout_ms = 300\n\n[dedup]\nbackend = \"redis\"\non_unavailable = \"process\"\n\n[metrics]\nlisten = \"127.0.0.1:{mport}\"\nrefresh_secs = 1\n",
            redis.url()
        ),
        FAST_RETRY,
        true,
    );
    let mut d = DaemonProc::new(&setup.bin, &s.dir, &cfg, &[])?;
    let n: u64 = size.pick(4_000, 30_000);
    let rate = size.pick(500.0, 1_000.0);
    let outage = Duration::from_secs(size.pick(3, 20));
    let result = async {
        start_daemon(&mut d).await?;
        let pid0 = d.pid();
        let ins = Inserter::spawn(&s.url, n, 10, Some(rate));
        while ins.committed() < n / 3 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let hits_before = metric(mport, "observer_cache_hits_total").await;
        redis.kill();
        let killed_at = Instant::now();
        let accepted_at_kill = sink.accepted();
        tokio::time::sleep(outage).await;
        let delivered_during_outage = sink.accepted() - accepted_at_kill;
        redis.restart().await;
        let up_at = Instant::now();
        ins.finish(Duration::from_secs(600)).await?;
        let events = s.order_events().await?;
        let all = wait_all_delivered(&sink, &events, OBSERVER, Duration::from_secs(120)).await;
        let caught = wait_caught_up(&s, Duration::from_secs(120)).await;
        let unavailable = metric(mport, "observer_dedup_unavailable_total").await;
        let cache_errors = metric(mport, "observer_cache_errors_total").await;
        let hits_after = metric(mport, "observer_cache_hits_total").await;
        let dedup_keys_after: usize = {
            let c = redis::Client::open(redis.url())?;
            let mut conn = c.get_multiplexed_async_connection().await?;
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg("fault:dedup:*")
                .query_async(&mut conn)
                .await?;
            keys.len()
        };
        r.set("redis_outage_s", r3((up_at - killed_at).as_secs_f64()));
        r.set("delivered_during_outage", delivered_during_outage);
        r.set("dedup_unavailable_total", unavailable);
        r.set("cache_errors_total", cache_errors);
        r.set("cache_hits_before_kill", hits_before);
        r.set("cache_hits_end", hits_after);
        r.set("dedup_keys_in_redis_after_restart", dedup_keys_after);
        r.set("rss_end_kb", rss_of(&d));
        r.check(
            d.pid() == pid0 && d.exited().is_none(),
            "one daemon process throughout",
        );
        r.check(all.is_some(), "every event delivered");
        r.check(
            caught.is_ok(),
            "the checkpoint covers every event at the end",
        );
        r.check(
            delivered_during_outage > 0,
            "deliveries continue while Redis is down (on_unavailable = process)",
        );
        r.check(
            dedup_keys_after > 0,
            "dedup writes to Redis again after it is back",
        );
        let stop = d.stop(Duration::from_secs(30)).await;
        r.set("exit_after_sigterm", &stop);
        let a = account_into(&mut r, &events, &sink);
        r.check(
            a.duplicates == 0,
            format!("no duplicate without a daemon restart ({})", a.duplicates),
        );
        Ok(())
    }
    .await;
    finish(&mut r, result, &d);
    d.kill9();
    s.drop_db().await;
    Ok(r)
}

// ---------------------------------------------------------------------------------------------
// A misbehaving receiver
// ---------------------------------------------------------------------------------------------

/// The receiver misbehaves (500 half the time, hangs past the timeout, closes mid-response,
/// answers slowly) for the whole run. Promise: every event ends up accepted exactly once —
/// after `dlq retry-all` for any that exhausted their attempts — with its key.
async fn receiver(setup: &Setup, size: Size, name: &str, fault: Fault) -> Result<Report> {
    let mut r = Report::new(name);
    let s = Scratch::create(setup, &setup.admin_url, &name.replace('-', "_")).await?;
    let sink = Sink::start(setup.seed).await?;
    sink.set_fault(fault);
    // The webhook's own timeout is longer than the concurrent layer's action timeout, so a hung
    // receiver is cut off by the action timeout.
    let action = format!("timeout_ms = 5000\n  {FAST_RETRY}");
    let cfg = daemon_config(
        &s.url,
        &sink.url("/hook"),
        &["concurrent"],
        "[concurrent]\nmax_in_flight = 64\naction_timeout_ms = 1000\n",
        &action,
        false,
    );
    let mut d = DaemonProc::new(&setup.bin, &s.dir, &cfg, &[])?;
    let n: u64 = size.pick(1_500, 20_000);
    let result = async {
        start_daemon(&mut d).await?;
        let t0 = Instant::now();
        let ins = Inserter::spawn(&s.url, n, 100, None);
        ins.finish(Duration::from_secs(600)).await?;
        let events = s.order_events().await?;
        let caught = wait_caught_up(&s, Duration::from_secs(size.pick(180, 1800))).await;
        let through = t0.elapsed().as_secs_f64();
        let dead = s.pending_dead_letters().await?;
        sink.set_fault(Fault::None);
        let retry_out = if dead > 0 {
            Some(s.cli_with(&cfg_tail(&cfg), &["dlq", "retry-all"]).await?)
        } else {
            None
        };
        let all = wait_all_delivered(&sink, &events, OBSERVER, Duration::from_secs(60)).await;
        let dead_after = s.pending_dead_letters().await?;
        r.set("fault", format!("{fault:?}"));
        r.set("all_actions_done_s", r3(through));
        r.set("events_per_s_under_fault", (n as f64 / through).round());
        r.set("dead_lettered", dead);
        r.set("dead_letters_pending_after_retry_all", dead_after);
        r.set(
            "retry_all_exit",
            retry_out.as_ref().map(|o| o.status.to_string()),
        );
        r.set("rss_end_kb", rss_of(&d));
        r.check(
            caught.is_ok(),
            "every event delivered or dead-lettered (checkpoint covers all)",
        );
        r.check(
            all.is_some(),
            "every event delivered (after dlq retry-all when needed)",
        );
        r.check(dead_after == 0, "no dead letter left after retry-all");
        r.check(d.exited().is_none(), "the daemon stays up");
        let stop = d.stop(Duration::from_secs(30)).await;
        r.set("exit_after_sigterm", &stop);
        let a = account_into(&mut r, &events, &sink);
        r.check(
            a.duplicates == 0,
            format!("each event accepted once ({} duplicates)", a.duplicates),
        );
        Ok(())
    }
    .await;
    finish(&mut r, result, &d);
    d.kill9();
    s.drop_db().await;
    Ok(r)
}

/// The config without its `[database]` section (the CLI helper writes its own).
fn cfg_tail(cfg: &str) -> String {
    let mut out = Vec::new();
    let mut in_db = false;
    for l in cfg.lines() {
        if l.starts_with('[') {
            in_db = l.trim() == "[database]";
        }
        if !in_db {
            out.push(l);
        }
    }
    out.join("\n")
}

/// The receiver is down (listener closed) for minutes while events keep coming, with the
/// circuit breaker on. Promise: the breaker opens (seen in metrics and `status`), what exhausted
/// its attempts is in the DLQ, the rest is delivered when the receiver is back, and
/// `dlq retry-all` delivers every dead letter with its original key: loss 0.
async fn receiver_down(setup: &Setup, size: Size) -> Result<Report> {
    let mut r = Report::new("receiver-down");
    let s = Scratch::create(setup, &setup.admin_url, "down").await?;
    let sink = Sink::start(setup.seed).await?;
    let mport = free_port()?;
    let sections = format!(
        "[circuit_breaker]\nmin_requests = 5\nopen_ms = 1000\nmax_open_ms = 5000\nwindow_secs = 10\n\n[metrics]\nlisten = \"127.0.0.1:{mport}\"\nrefresh_secs = 1\n"
    );
    let action = r#"timeout_ms = 1000
  retry = { max_attempts = 1, backoff = "fixed", initial_ms = 100, max_ms = 100 }"#;
    let cfg = daemon_config(
        &s.url,
        &sink.url("/hook"),
        &["concurrent", "circuit_breaker", "metrics"],
        &sections,
        action,
        false,
    );
    let mut d = DaemonProc::new(&setup.bin, &s.dir, &cfg, &[])?;
    let outage = Duration::from_secs(size.pick(10, 180));
    let rate = size.pick(50.0, 100.0);
    let result = async {
        start_daemon(&mut d).await?;
        let ins0 = Inserter::spawn(&s.url, 50, 10, None);
        ins0.finish(Duration::from_secs(60)).await?;
        wait_caught_up(&s, Duration::from_secs(60)).await?;
        sink.down().await;
        let down_at = Instant::now();
        let n_during = (rate * outage.as_secs_f64()) as u64;
        let ins = Inserter::spawn(&s.url, n_during, 5, Some(rate));
        let mut breaker_open_seen = None;
        let mut status_text = String::new();
        while down_at.elapsed() < outage {
            if breaker_open_seen.is_none() {
                if let Some(st) = metric(mport, "observer_breaker_state").await {
                    if st >= 2.0 {
                        breaker_open_seen = Some(down_at.elapsed().as_secs_f64());
                        let out = s.cli_with(&cfg_tail(&cfg), &["status"]).await?;
                        status_text = String::from_utf8_lossy(&out.stdout).to_string();
                    }
                }
            }
            if let Some(st) = d.exited() {
                bail!("the daemon exited ({st}) while the receiver was down");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        ins.finish(Duration::from_secs(120)).await?;
        let dead_during = s.pending_dead_letters().await?;
        let opened_total = metric(mport, "observer_breaker_opened_total").await;
        sink.up().await?;
        let up_at = Instant::now();
        let caught = wait_caught_up(&s, Duration::from_secs(size.pick(180, 900))).await;
        let recovery = up_at.elapsed().as_secs_f64();
        let dead = s.pending_dead_letters().await?;
        let accepted_before_retry = sink.accepted();
        let out = s.cli_with(&cfg_tail(&cfg), &["dlq", "retry-all"]).await?;
        let events = s.order_events().await?;
        let all = wait_all_delivered(&sink, &events, OBSERVER, Duration::from_secs(60)).await;
        let dead_after = s.pending_dead_letters().await?;
        let breaker_line = status_text
            .lines()
            .filter(|l| l.to_ascii_lowercase().contains("breaker"))
            .collect::<Vec<_>>()
            .join(" | ");
        r.set("outage_s", outage.as_secs());
        r.set("breaker_open_after_s", breaker_open_seen.map(r3));
        r.set("breaker_opened_total", opened_total);
        r.set("status_breaker_line", breaker_line.clone());
        r.set("dead_letters_at_end_of_outage", dead_during);
        r.set("dead_letters_after_recovery", dead);
        r.set("receiver_up_to_caught_up_s", r3(recovery));
        r.set(
            "delivered_by_retry_all",
            sink.accepted() - accepted_before_retry,
        );
        r.set("retry_all_exit", out.status.to_string());
        r.set("rss_end_kb", rss_of(&d));
        r.check(
            breaker_open_seen.is_some(),
            "the breaker opens (observer_breaker_state = 2)",
        );
        r.check(
            breaker_line.contains("open"),
            format!("`status` shows the open breaker ({breaker_line:?})"),
        );
        r.check(dead > 0, "what exhausted its attempts is in the DLQ");
        r.check(
            caught.is_ok(),
            "after recovery every event is delivered or dead-lettered",
        );
        r.check(out.status.success(), "dlq retry-all succeeds");
        r.check(all.is_some(), "every event delivered after dlq retry-all");
        r.check(dead_after == 0, "no dead letter left");
        r.check(d.exited().is_none(), "the daemon stays up");
        let stop = d.stop(Duration::from_secs(30)).await;
        r.set("exit_after_sigterm", &stop);
        let a = account_into(&mut r, &events, &sink);
        r.check(
            a.duplicates == 0,
            format!("each event accepted once ({} duplicates)", a.duplicates),
        );
        Ok(())
    }
    .await;
    finish(&mut r, result, &d);
    d.kill9();
    s.drop_db().await;
    Ok(r)
}

// ---------------------------------------------------------------------------------------------
// The dead-letter write fails (disk full, read-only)
// ---------------------------------------------------------------------------------------------

/// Dead-letter inserts fail as on a full disk (SQLSTATE 53100), then as on a read-only
/// database (25006), while events keep coming and the receiver fails half of them (one attempt
/// each, so those go to the DLQ). Promise: the checkpoint does not move past the first event
/// whose dead letter could not be written, the daemon says why, nothing delivered is delivered
/// again, and once the fault is removed every failed event is dead-lettered exactly once and
/// delivered by `dlq retry-all`: loss 0.
async fn dlq_write_fail(setup: &Setup, size: Size) -> Result<Report> {
    let mut r = Report::new("dlq-write-fail");
    let s = Scratch::create(setup, &setup.admin_url, "dlqfail").await?;
    let sink = Sink::start(setup.seed).await?;
    let action = r#"timeout_ms = 1000
  retry = { max_attempts = 1, backoff = "fixed", initial_ms = 50, max_ms = 50 }"#;
    let cfg = daemon_config(&s.url, &sink.url("/hook"), &[], "", action, false);
    let mut d = DaemonProc::new(&setup.bin, &s.dir, &cfg, &[])?;
    let n_ok: u64 = 50;
    let n_fault: u64 = size.pick(400, 5_000);
    let hold = Duration::from_secs(size.pick(5, 60));
    let result = async {
        start_daemon(&mut d).await?;
        let c = s.client().await?;
        Inserter::spawn(&s.url, n_ok, 10, None)
            .finish(Duration::from_secs(60))
            .await?;
        wait_caught_up(&s, Duration::from_secs(60)).await?;
        let set_fault = |code: &str, msg: &str| {
            format!(
                "CREATE OR REPLACE FUNCTION fault_dlq_write() RETURNS trigger LANGUAGE plpgsql AS $$ \
                 BEGIN RAISE EXCEPTION '{msg}' USING ERRCODE = '{code}'; END $$;"
            )
        };
        c.batch_execute(&set_fault("53100", "could not extend file: No space left on device (injected)"))
            .await?;
        c.batch_execute(
            "CREATE TRIGGER fault_dlq_write BEFORE INSERT ON observer_dead_letters \
             FOR EACH ROW EXECUTE FUNCTION fault_dlq_write()",
        )
        .await?;
        sink.set_fault(Fault::Error500 { p: 0.5 });
        // Events keep coming through both faults.
        let ins = Inserter::spawn(&s.url, n_fault, 10, Some(n_fault as f64 / (2 * hold.as_secs()) as f64));
        tokio::time::sleep(hold).await;
        let uncovered_disk: HashSet<u128> =
            s.uncovered(LISTENER).await?.iter().map(|u| u.as_u128()).collect();
        let says_disk = d
            .log()
            .lines()
            .find(|l| l.contains("No space left") && l.contains("53100"))
            .map(String::from);
        c.batch_execute(&set_fault("25006", "cannot execute INSERT in a read-only transaction (injected)"))
            .await?;
        tokio::time::sleep(hold).await;
        let says_ro = d
            .log()
            .lines()
            .find(|l| l.contains("read-only transaction") && l.contains("25006"))
            .map(String::from);
        let run_restarts = d.log().lines().filter(|l| l.contains("restarting from the checkpoint")).count();
        let alive = d.exited().is_none();
        let accepted_during_fault = sink.accepted();
        ins.finish(Duration::from_secs(120)).await?;
        c.batch_execute("DROP TRIGGER fault_dlq_write ON observer_dead_letters")
            .await?;
        let fixed_at = Instant::now();
        let caught = wait_caught_up(&s, Duration::from_secs(120)).await;
        let recovery = fixed_at.elapsed().as_secs_f64();
        let dl_events: Vec<Uuid> = c
            .query("SELECT event_id FROM observer_dead_letters", &[])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let dl_distinct: HashSet<Uuid> = dl_events.iter().copied().collect();
        let first_dl_uncovered = dl_events.iter().filter(|e| uncovered_disk.contains(&e.as_u128())).count();
        sink.set_fault(Fault::None);
        let out = s.cli_with(&cfg_tail(&cfg), &["dlq", "retry-all"]).await?;
        let events = s.order_events().await?;
        let all = wait_all_delivered(&sink, &events, OBSERVER, Duration::from_secs(60)).await;
        r.set("events_during_fault", n_fault);
        r.set("fault_s", 2 * hold.as_secs());
        r.set("accepted_during_fault", accepted_during_fault);
        r.set("uncovered_while_disk_full", uncovered_disk.len());
        r.set("log_disk_full", says_disk.clone());
        r.set("log_read_only", says_ro.clone());
        r.set("run_restarts_during_fault", run_restarts);
        r.set("fault_removed_to_caught_up_s", r3(recovery));
        r.set("dead_letter_rows", dl_events.len());
        r.set("dead_letter_distinct_events", dl_distinct.len());
        r.set("retry_all_exit", out.status.to_string());
        r.check(!dl_events.is_empty(), "some events were dead-lettered");
        r.check(first_dl_uncovered > 0, "the checkpoint stayed before the events whose dead letter could not be written");
        r.check(says_disk.is_some(), "the daemon logs the disk-full error with its message and SQLSTATE");
        r.check(says_ro.is_some(), "the daemon logs the read-only error with its message and SQLSTATE");
        r.check(run_restarts == 0, format!("no run restart (and so no redelivery) while the write is refused ({run_restarts})"));
        r.check(alive, "the daemon stays up while the DLQ cannot be written");
        r.check(caught.is_ok(), "once the fault is gone the checkpoint covers every event");
        r.check(dl_events.len() == dl_distinct.len(), format!("each failed event dead-lettered once ({} rows, {} events)", dl_events.len(), dl_distinct.len()));
        r.check(out.status.success(), "dlq retry-all succeeds");
        r.check(all.is_some(), "every event delivered after dlq retry-all");
        let stop = d.stop(Duration::from_secs(30)).await;
        r.set("exit_after_sigterm", &stop);
        let a = account_into(&mut r, &events, &sink);
        r.check(a.duplicates == 0, format!("nothing delivered twice ({} duplicates)", a.duplicates));
        Ok(())
    }
    .await;
    finish(&mut r, result, &d);
    d.kill9();
    s.drop_db().await;
    Ok(r)
}

// ---------------------------------------------------------------------------------------------
// Soak
// ---------------------------------------------------------------------------------------------

/// A steady offered rate with every layer on (concurrent, dedup and caching on Redis, metrics,
/// circuit breaker, rate limit set above the rate, checkpoints). Sampled every interval: RSS
/// (and its anonymous and file-backed parts), open descriptors, server connections of the
/// daemon, lag. Promise: loss 0, no duplicate, and anonymous memory, descriptors, connections
/// and lag flat (last third against first third). Anonymous memory is what a leak or a growing
/// buffer shows in; the file-backed part is the executable's code, which the kernel maps in as
/// code runs for the first time, bounded by the executable's size (reported, not judged).
pub async fn soak(setup: &Setup, size: Size) -> Result<Report> {
    let secs: u64 = std::env::var("FAULT_SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(size.pick(45, 3600));
    let rate: f64 = size.pick(500.0, 1_000.0);
    let every = Duration::from_secs(size.pick(3, 30));
    let mut r = Report::new("soak");
    let prefix = RedisPrefix::new(&setup.redis_url);
    let s = Scratch::create(setup, &setup.admin_url, "soak").await?;
    let sink = Sink::start(setup.seed).await?;
    let mport = free_port()?;
    let sections = format!(
        "{}\n[dedup]\nbackend = \"redis\"\n\n[concurrent]\nmax_in_flight = 64\n\n[rate_limit.default]\nper_second = 20000\nmax_concurrent = 64\n\n[metrics]\nlisten = \"127.0.0.1:{mport}\"\n",
        prefix.section()
    );
    let cfg = daemon_config(
        &s.url,
        &sink.url("/hook"),
        &[
            "concurrent",
            "dedup",
            "caching",
            "metrics",
            "circuit_breaker",
            "rate_limit",
        ],
        &sections,
        FAST_RETRY,
        true,
    );
    let mut d = DaemonProc::new(&setup.bin, &s.dir, &cfg, &[])?;
    let result = async {
        start_daemon(&mut d).await?;
        let pid = d.pid().context("daemon pid")?;
        let total = (rate * secs as f64) as u64;
        let ins = Inserter::spawn(&s.url, total, 10, Some(rate));
        let t0 = Instant::now();
        let mut samples = Vec::new();
        let mut next = t0;
        while !ins.is_finished() {
            next += every;
            tokio::time::sleep_until(next.into()).await;
            if let Some(st) = d.exited() {
                bail!("the daemon exited during the soak ({st})");
            }
            let committed = ins.committed();
            let accepted = sink.accepted() as u64;
            let sample = json!({
                "t_s": r3(t0.elapsed().as_secs_f64()),
                "rss_kb": rss_kb(pid),
                "rss_anon_kb": rss_anon_kb(pid),
                "rss_file_kb": rss_file_kb(pid),
                "fds": open_fds(pid),
                "sink_connections": sockets_to_port(pid, sink.port),
                "db_connections": s.daemon_connections().await.ok(),
                "inserted": committed,
                "delivered": accepted,
                "lag_events": committed.saturating_sub(accepted),
                "lag_seconds_metric": metric(mport, "observer_lag_seconds").await,
                "loadavg": loadavg(),
            });
            if samples.len() % 10 == 0 {
                say(format!("soak {sample}"));
            }
            samples.push(sample);
        }
        let inserted = ins.finish(Duration::from_secs(60)).await?;
        let events = s.order_events().await?;
        let all = wait_all_delivered(&sink, &events, OBSERVER, Duration::from_secs(120)).await;
        let caught = wait_caught_up(&s, Duration::from_secs(120)).await;
        let hit_rate = metric(mport, "observer_cache_hit_rate").await;
        let dedup_checks = metric(mport, "observer_dedup_checks_total").await;
        let stop = d.stop(Duration::from_secs(30)).await;
        let col = |k: &str| -> Vec<f64> { samples.iter().filter_map(|x| x[k].as_f64()).collect() };
        let flat = |v: &[f64], slack: f64| -> (f64, f64, bool) {
            let third = (v.len() / 3).max(1);
            if v.len() < 3 {
                return (0.0, 0.0, true);
            }
            let first = v[..third].iter().cloned().fold(0.0, f64::max);
            let last = v[v.len() - third..].iter().cloned().fold(0.0, f64::max);
            (first, last, last <= first + slack)
        };
        let rss = col("rss_kb");
        let anon = col("rss_anon_kb");
        let anon_first = anon.first().copied().unwrap_or(0.0);
        let (rf, rl, _) = flat(&rss, 0.0);
        let (af, al, anon_flat) = flat(&anon, (anon_first * 0.10).max(8192.0));
        // A sample without `RssAnon` (unreadable /proc, a kernel before 4.5) must not pass as flat.
        let anon_ok = anon_flat && anon.len() == samples.len();
        let file = col("rss_file_kb");
        // Descriptors other than connections to the sink must stay flat; the connection pool to
        // the sink may grow with a burst (it is bounded by max_in_flight, 64, and idles out).
        let other_fds: Vec<f64> = samples
            .iter()
            .map(|x| {
                x["fds"].as_f64().unwrap_or(0.0) - x["sink_connections"].as_f64().unwrap_or(0.0)
            })
            .collect();
        let (ff, fl, fds_ok) = flat(&other_fds, 4.0);
        let sink_max = col("sink_connections").into_iter().fold(0.0, f64::max);
        r.set("sink_connections_max", sink_max);
        r.check(
            sink_max <= 64.0,
            format!("connections to the sink within max_in_flight ({sink_max} ≤ 64)"),
        );
        let (cf, cl, conns_ok) = flat(&col("db_connections"), 2.0);
        let (lf, ll, lag_ok) = flat(&col("lag_events"), rate * 5.0);
        r.set("duration_s", secs);
        r.set("offered_rate_per_s", rate);
        r.set("inserted", inserted);
        r.set(
            "achieved_insert_rate_per_s",
            (inserted as f64 / t0.elapsed().as_secs_f64()).round(),
        );
        r.set("sample_every_s", every.as_secs());
        r.set("rss_kb_first_third_max", rf);
        r.set("rss_kb_last_third_max", rl);
        r.set("rss_kb_peak", rss.iter().cloned().fold(0.0, f64::max));
        r.set("rss_anon_kb_first_third_max", af);
        r.set("rss_anon_kb_last_third_max", al);
        r.set("rss_file_kb_first", file.first().copied().unwrap_or(0.0));
        r.set("rss_file_kb_last", file.last().copied().unwrap_or(0.0));
        r.set("fds_first_third_max", ff);
        r.set("fds_last_third_max", fl);
        r.set("db_connections_first_third_max", cf);
        r.set("db_connections_last_third_max", cl);
        r.set("lag_events_first_third_max", lf);
        r.set("lag_events_last_third_max", ll);
        r.set("cache_hit_rate", hit_rate);
        r.set("dedup_checks", dedup_checks);
        r.set("exit_after_sigterm", &stop);
        r.set("samples", &samples);
        r.check(all.is_some(), "every event delivered");
        r.check(
            caught.is_ok(),
            "the checkpoint covers every event at the end",
        );
        r.check(
            anon_ok,
            format!(
                "anonymous memory flat (first third max {af} kB, last third max {al} kB; \
                 all of RSS {rf} → {rl} kB; RssAnon read in {} of {} samples)",
                anon.len(),
                samples.len()
            ),
        );
        r.check(
            fds_ok,
            format!("open descriptors other than sink connections flat ({ff} → {fl})"),
        );
        r.check(conns_ok, format!("database connections flat ({cf} → {cl})"));
        r.check(lag_ok, format!("lag flat ({lf} → {ll} events)"));
        let a = account_into(&mut r, &events, &sink);
        r.check(
            a.duplicates == 0,
            format!("no duplicate ({})", a.duplicates),
        );
        Ok(())
    }
    .await;
    finish(&mut r, result, &d);
    d.kill9();
    s.drop_db().await;
    drop(prefix);
    Ok(r)
}
