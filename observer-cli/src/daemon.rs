//! `run`: the daemon. Loads and checks everything before starting, builds the executor stack,
//! and runs the supervised loop until SIGTERM/SIGINT.

use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, Context, Result};
use observer_core::action::ActionContext;
use observer_core::observer::Observers;
use observer_core::runloop::{self, RunContext};
use observer_core::store::CheckpointStore;
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::stack;

pub async fn run(config: Option<&Path>) -> Result<()> {
    let app = App::load(config)?;
    let cfg = app.config.clone();
    stack::check_features(&cfg)?;
    let problems = cfg.check();
    if !problems.is_empty() {
        let list: Vec<String> = problems
            .iter()
            .map(|(k, m)| format!("  {k}: {m}"))
            .collect();
        anyhow::bail!("invalid settings:\n{}", list.join("\n"));
    }
    let observers = Observers::compile(&cfg).map_err(|issues| {
        let list: Vec<String> = issues.iter().map(|i| format!("  {i}")).collect();
        anyhow!(
            "invalid observers in {}:\n{}",
            app.config_path
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "(defaults)".into()),
            list.join("\n")
        )
    })?;
    if observers.list.is_empty() {
        tracing::warn!(
            "no enabled observer: events will be read and checkpointed, nothing executed"
        );
    }
    let pool = app.pool()?;
    let http = ActionContext::http_client().context("building the HTTP client")?;
    let metrics = observer_core::metrics::Metrics::new();
    for o in &observers.list {
        let kinds: Vec<&str> = o.actions.iter().map(|a| a.action.kind()).collect();
        metrics.init_observer(&o.name, &kinds);
    }
    let redis = app.redis()?;
    let actions = ActionContext {
        http,
        pool: pool.clone(),
        cache: stack::lookup_cache(&cfg, redis.as_ref()),
        redis,
        metrics: metrics.clone(),
    };
    let layers = Arc::new(stack::LayerState::new(&cfg, metrics.clone()));
    let checkpoint: Option<Arc<dyn CheckpointStore>> = checkpoint_store(&app);
    let owner = format!(
        "{}:{}",
        std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "host".into()),
        std::process::id()
    );
    let (observers_tx, observers_rx) = tokio::sync::watch::channel(Arc::new(observers));
    let ctx = RunContext {
        database: app.where_db(),
        config: cfg.clone(),
        observers: observers_rx,
        objects: app.objects.clone(),
        pg_config: app.pg_config.clone(),
        tls: app.tls.clone(),
        checkpoint,
        owner,
        metrics: metrics.clone(),
    };
    tracing::info!(
        listener = %cfg.listener.id,
        database = %app.where_db(),
        tls = app.tls_on,
        change_log = %app.objects.change_log,
        observers = ctx.observers.borrow().list.len(),
        checkpoint = cfg.features.checkpoint,
        "starting"
    );
    let shutdown = CancellationToken::new();
    tokio::spawn(signals(shutdown.clone()));
    let cfg2 = cfg.clone();
    let _reload = observers_tx;
    let make = move || stack::build(&cfg2, actions.clone(), &layers);
    // Owned: stopped by the same token and awaited before we return.
    let retention = tokio::spawn(retention_pass(
        pool.clone(),
        app.objects.clone(),
        cfg.retention.clone(),
        shutdown.clone(),
    ));
    let result = runloop::supervise(&ctx, &make, shutdown.clone()).await;
    shutdown.cancel();
    if let Err(e) = retention.await {
        tracing::warn!(error = %e, "retention task ended abnormally");
    }
    result?;
    Ok(())
}

/// Applies `[retention]` every `interval_secs` (0 = off) until shutdown. A failed pass is logged
/// and tried again at the next interval; it never stops the daemon.
async fn retention_pass(
    pool: deadpool_postgres::Pool,
    objects: Arc<observer_core::schema::Objects>,
    policy: observer_core::config::RetentionConfig,
    shutdown: CancellationToken,
) {
    if policy.interval_secs == 0 {
        return;
    }
    let every = std::time::Duration::from_secs(policy.interval_secs);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let pass = async {
            let client = pool
                .get()
                .await
                .map_err(|e| anyhow!("database pool: {e}"))?;
            observer_core::retention::apply(&**client, &objects, &policy, false)
                .await
                .map_err(anyhow::Error::from)
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = pass => match r {
                Ok(r) => tracing::info!(
                    change_log = r.change_log, action_log = r.action_log, dead_letters = r.dead_letters,
                    note = r.change_log_note.as_deref().unwrap_or(""), "retention pass"
                ),
                Err(e) => tracing::warn!(error = %format!("{e:#}"), "retention pass failed; retrying next interval"),
            }
        }
    }
}

#[cfg(feature = "checkpoint")]
fn checkpoint_store(app: &App) -> Option<Arc<dyn CheckpointStore>> {
    app.config.features.checkpoint.then(|| {
        Arc::new(observer_features::checkpoint::PostgresCheckpointStore::new(
            &app.objects.checkpoints,
        )) as Arc<dyn CheckpointStore>
    })
}

#[cfg(not(feature = "checkpoint"))]
fn checkpoint_store(_app: &App) -> Option<Arc<dyn CheckpointStore>> {
    None
}

async fn signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    shutdown.cancel();
}
