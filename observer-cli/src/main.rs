//! `fraiseql-observers`: the daemon (`run`) and the operator commands around it.

mod app;
mod daemon;
#[cfg(feature = "queue")]
mod jobs;
mod listen;
mod log_fields;
mod nats;
mod ops;
mod role;
mod setup;
mod stack;
mod validate;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "fraiseql-observers",
    version,
    about = "Tails a Postgres change log and runs observers' actions: webhooks, SQL, logs."
)]
struct Cli {
    /// Configuration file (TOML or YAML); OBSERVER__SECTION__KEY variables override it.
    #[arg(long, short, global = true, env = "FRAISEQL_OBSERVERS_CONFIG")]
    config: Option<PathBuf>,
    /// Log format on stderr.
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon: tail the change log and execute observers until SIGTERM/SIGINT.
    Run {
        /// What this process does: `all` (the listener, and job workers when the `queue`
        /// layer has any), `queue-worker` (only the job workers), `publisher` (the listener,
        /// publishing events to NATS JetStream) or `worker` (working events off JetStream).
        #[arg(long, value_enum, default_value_t = role::Role::All)]
        role: role::Role,
    },
    /// Install or upgrade the schema (change-log table, triggers, bookkeeping tables); idempotent.
    Migrate(setup::MigrateArgs),
    /// Attach, list or remove capture triggers on business tables.
    #[command(subcommand)]
    Capture(setup::CaptureCommand),
    /// Check a configuration file: every condition, template and action; exit 1 on any error.
    Validate(validate::ValidateArgs),
    /// A local webhook sink that prints each delivery and verifies its signature.
    Listen(listen::ListenArgs),
    // @ops-commands (operator commands are declared below this line)
    /// A running daemon's Prometheus metrics, readably (needs features.metrics on the daemon).
    Metrics(ops::metrics::MetricsArgs),
    /// Where a listener is, whether it runs, how far behind it is, and its dead letters.
    Status(ops::status::StatusArgs),
    /// Why an event did or did not trigger each observer, and what became of its actions.
    DebugEvent(ops::debug_event::DebugEventArgs),
    /// The dead-letter queue: stats, list, show, retry, retry-all, purge.
    #[command(subcommand)]
    Dlq(ops::dlq::DlqCommand),
    /// Show or move a listener's checkpoint.
    #[command(subcommand)]
    Checkpoint(ops::checkpoint::CheckpointCommand),
    /// Deliver a range of the change log again, in this process (a backfill).
    Replay(ops::replay::ReplayArgs),
    /// Apply the [retention] policy once.
    Cleanup(ops::cleanup::CleanupArgs),
    /// The audit trail: what happened to an event, an entity, an observer (features.search).
    Search(ops::search::SearchArgs),
    /// The job queues of the `queue` layer: stats, list, retry, purge.
    #[command(subcommand)]
    Queue(ops::queue::QueueCommand),
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,tokio_postgres=warn,async_nats=warn")
    });
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    if format == "json" {
        builder.json().init();
    } else {
        // Field values escaped: many come from event data, receivers or the database.
        builder.fmt_fields(log_fields::EscapedFields).init();
    }
}

// glibc malloc was a fifth of the daemon's CPU at full speed (perf; many small allocations per
// event across threads); mimalloc measured faster in observer-bench (docs/benchmarks.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// How long mimalloc keeps freed pages before returning them to the system, in milliseconds,
/// unless `MIMALLOC_PURGE_DELAY` says otherwise. Its own default (1,000 ms in mimalloc 3) let a
/// long-running daemon's RSS climb with memory it was no longer using: a 30-minute soak at
/// 1,000 events/s went from 19.8 to 42.3 MiB, the same soak with the delay at 0 stayed within
/// 25–28 MiB (docs/reliability.md). 10 ms is mimalloc 2's default: freed memory goes back within
/// a tick without a system call on every free.
const PURGE_DELAY_MS: std::os::raw::c_long = 10;

/// `mi_option_purge_delay` in mimalloc 3's `mi_option_t` (include/mimalloc.h; libmimalloc-sys
/// exports no constant for it). `MIMALLOC_VERBOSE=1` prints the value in effect at start.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Sets the purge delay and turns transparent huge pages off. Runs before logging is set up, so
/// a refused `prctl` is returned for `main` to report once it can.
fn tune_allocator() -> std::io::Result<()> {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets one integer option of the allocator; mimalloc reads options atomically.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) };
    }
    disable_transparent_huge_pages()
}

/// No transparent huge pages for this process. With them, RSS counts every 2 MiB region the
/// allocator has touched, a purge of part of one frees nothing, and khugepaged collapses a
/// region with a single page in use back into a whole huge page: an hour-long soak's RSS climbed
/// from 25 to 43 MiB with 30 of its 31 MiB of anonymous memory in huge pages
/// (`AnonHugePages` in /proc/PID/smaps_rollup). mimalloc is built with
/// `no_thp` (it never asks for them); this also covers hosts whose THP mode is `always`.
fn disable_transparent_huge_pages() -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: PR_SET_THP_DISABLE takes an integer flag and no pointers.
        if unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let allocator = tune_allocator();
    let cli = Cli::parse();
    init_logging(&cli.log_format);
    if let Err(e) = allocator {
        tracing::warn!(error = %e, "could not turn transparent huge pages off for this process (prctl PR_SET_THP_DISABLE); RSS may count whole 2 MiB pages");
    }
    // `[runtime] worker_threads` (default automatic: `RuntimeConfig::threads`). One thread when
    // one dispatch runs at a time: threads bought only cross-thread wake-ups (observer-bench:
    // +26 % events/s, -22 % CPU against the multi-threaded runtime). With `concurrent`, one
    // worker per core on hosts of more than two cores, one thread on two or fewer (measured
    // there; see `RuntimeConfig::threads`). A config that does not load here is reported by the
    // command itself.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = observer_core::config::load(cli.config.as_deref())
        .map(|c| c.runtime.threads(c.features.concurrent, cores))
        .unwrap_or(1);
    let mut builder = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads.min(256));
        b
    };
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let config = cli.config.as_deref();
    let result: anyhow::Result<ExitCode> = runtime.block_on(async move {
        match cli.command {
            Command::Migrate(a) => setup::migrate(config, a).await.map(|_| ExitCode::SUCCESS),
            // On a runtime worker, not on this thread: every dispatch the run loop spawns from
            // `block_on`'s thread went through the runtime's shared inject queue and woke a
            // worker with a futex, and every completion woke this thread back (docs/benchmarks.md,
            // "Hot path": the loop's thread was at 84 % of a core in a drain).
            Command::Run { role } => {
                let config = config.map(PathBuf::from);
                match tokio::spawn(async move { daemon::run(config.as_deref(), role).await }).await
                {
                    Ok(r) => r.map(|_| ExitCode::SUCCESS),
                    Err(e) => Err(anyhow::anyhow!("the daemon task ended abnormally: {e}")),
                }
            }
            Command::Capture(c) => setup::capture(config, c).await.map(|_| ExitCode::SUCCESS),
            Command::Validate(a) => validate::run(a).await,
            Command::Listen(a) => listen::run(a).await.map(|_| ExitCode::SUCCESS),
            // @ops-dispatch (operator commands are dispatched below this line)
            Command::Metrics(a) => ops::metrics::run(config, a).await,
            Command::Status(a) => ops::status::run(config, a).await,
            Command::DebugEvent(a) => ops::debug_event::run(config, a).await,
            Command::Dlq(c) => ops::dlq::run(config, c).await,
            Command::Checkpoint(c) => ops::checkpoint::run(config, c).await,
            Command::Replay(a) => ops::replay::run(config, a).await,
            Command::Cleanup(a) => ops::cleanup::run(config, a).await,
            Command::Search(a) => ops::search::run(config, a).await,
            Command::Queue(c) => ops::queue::run(config, c).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `MI_OPTION_PURGE_DELAY` names the purge delay: mimalloc 3's default for it is 1,000 ms,
    /// which no other option has. Fails when a mimalloc upgrade renumbers its options.
    #[test]
    fn the_option_set_at_start_is_the_purge_delay() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
            return;
        }
        // SAFETY: reads one integer option.
        let default = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        assert_eq!(default, 1000);
        tune_allocator().expect("prctl PR_SET_THP_DISABLE");
        // SAFETY: as above.
        let set = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        assert_eq!(set, PURGE_DELAY_MS);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn transparent_huge_pages_are_off_after_start() {
        disable_transparent_huge_pages().expect("prctl PR_SET_THP_DISABLE");
        // SAFETY: PR_GET_THP_DISABLE takes no arguments and returns the flag.
        let off = unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) };
        assert_eq!(off, 1);
    }
}
