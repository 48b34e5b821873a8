//! `run`: the daemon. Loads and checks everything before starting, builds the executor stack,
//! and runs the supervised loop until SIGTERM/SIGINT.

use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, Context, Result};
use observer_core::action::ActionContext;
use observer_core::config::Config;
use observer_core::observer::Observers;
use observer_core::runloop::{self, RunContext};
use observer_core::store::CheckpointStore;
use observer_core::webhook_client::WebhookClient;
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::role::Role;
use crate::stack;

pub async fn run(config: Option<&Path>, role: Role) -> Result<()> {
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
    let inline = cfg.queued_but_inline();
    if !inline.is_empty() {
        tracing::warn!(observers = %inline.join(", "), "features.queue is off: these observers set `queue`, and their actions run inline");
    }
    if observers.list.is_empty() {
        tracing::warn!(
            "no enabled observer: events will be read and checkpointed, nothing executed"
        );
    }
    let pool = app.pool()?;
    let guard = Arc::new(
        observer_core::outbound::Guard::new(&cfg.outbound.allow).map_err(|p| {
            let list: Vec<String> = p.iter().map(|(k, m)| format!("{k}: {m}")).collect();
            anyhow!("invalid settings: {}", list.join("; "))
        })?,
    );
    let http = ActionContext::http_client(guard.clone()).context("building the HTTP client")?;
    let webhook = WebhookClient::new(guard.clone(), cfg.concurrent.max_in_flight)
        .context("building the webhook client")?;
    let metrics = observer_core::metrics::Metrics::new();
    for o in &observers.list {
        let kinds: Vec<&str> = o.actions.iter().map(|a| a.action.kind()).collect();
        metrics.init_observer(&o.name, &kinds);
    }
    let redis = app.redis()?;
    let actions = ActionContext {
        http,
        webhook,
        pool: pool.clone(),
        cache: stack::lookup_cache(&cfg, redis.as_ref()),
        redis,
        metrics: metrics.clone(),
        guard,
        max_response_bytes: cfg.outbound.max_response_bytes,
    };
    let layers = Arc::new(stack::LayerState::new(&cfg, metrics.clone()));
    let checkpoint: Option<Arc<dyn CheckpointStore>> = checkpoint_store(&app);
    // Bound before anything runs, so a taken address is a start-up error naming it.
    let endpoint = metrics_endpoint(
        &app,
        layers.metrics.clone(),
        pool.clone(),
        checkpoint.clone(),
    )
    .await?;
    if role == Role::QueueWorker {
        return queue_worker(&app, &cfg, &actions, &layers, Arc::new(observers), endpoint).await;
    }
    if matches!(role, Role::Publisher | Role::Worker) && !cfg.features.nats {
        anyhow::bail!(
            "--role {} needs the `nats` layer: set features.nats = true (OBSERVER__FEATURES__NATS=true) with its [nats] section, \
             and create the stream with `fraiseql-observers migrate --nats`",
            if role == Role::Publisher { "publisher" } else { "worker" }
        );
    }
    if role == Role::Worker {
        return crate::nats::worker(&app, &cfg, &actions, &layers, Arc::new(observers), endpoint)
            .await;
    }
    // A publisher runs the same listener with one observer that forwards every event to the
    // stream (observer_core::forward), through its own small stack (`stack::build_publisher`).
    let publishing = role == Role::Publisher;
    let (cfg, observers) = if publishing {
        let forwarder = crate::nats::forwarder(&cfg, &layers).await?;
        let observers = observer_core::forward::forwarding_observers(forwarder);
        metrics.init_observer(observer_core::forward::PUBLISHER_OBSERVER, &["forward"]);
        (Arc::new(stack::publisher_config(&cfg)), observers)
    } else {
        (cfg, observers)
    };
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "host".into());
    let owner = format!("{host}:{}", std::process::id());
    let leadership = stack::leadership(
        &cfg,
        &host,
        &app.objects,
        &app.pg_config,
        &app.tls,
        &metrics,
    );
    let (observers_tx, observers_rx) = tokio::sync::watch::channel(Arc::new(observers));
    #[cfg(feature = "queue")]
    let (job_actions, job_observers) = (actions.clone(), observers_rx.clone());
    let ctx = RunContext {
        database: app.where_db(),
        config: cfg.clone(),
        observers: observers_rx,
        objects: app.objects.clone(),
        pg_config: app.pg_config.clone(),
        tls: app.tls.clone(),
        checkpoint,
        leadership: leadership.clone(),
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
        failover = cfg.features.failover,
        role = ?role,
        "starting"
    );
    let shutdown = CancellationToken::new();
    tokio::spawn(signals(shutdown.clone()));
    // The stack is rebuilt from the current config whenever a reload is accepted.
    let current = Arc::new(std::sync::RwLock::new(cfg.clone()));
    if publishing {
        // Its observers are not the file's: a reload has nothing to change.
        tokio::spawn(ignore_hup(observers_tx, shutdown.clone()));
    } else {
        tokio::spawn(reload_on_hup(
            app.config_path.clone(),
            current.clone(),
            observers_tx,
            metrics.clone(),
            shutdown.clone(),
        ));
    }
    #[cfg(feature = "queue")]
    let (layers_for_jobs, current_for_jobs) = (layers.clone(), current.clone());
    let layers_settle = layers.clone();
    let make = move || {
        let cfg = current
            .read()
            .map(|c| c.clone())
            .unwrap_or_else(|poisoned| poisoned.into_inner().clone());
        if publishing {
            stack::build_publisher(&cfg, actions.clone())
        } else {
            stack::build(&cfg, actions.clone(), &layers)
        }
    };
    // Owned: stopped by the same token and awaited before we return.
    let retention = tokio::spawn(retention_pass(
        pool.clone(),
        app.objects.clone(),
        cfg.retention.clone(),
        app.config.features.search,
        shutdown.clone(),
    ));
    let indexer = search_indexer(&app, &metrics, shutdown.clone())?;
    #[cfg(feature = "queue")]
    let jobs = crate::jobs::start(
        &app,
        &cfg,
        &job_actions,
        &layers_for_jobs,
        job_observers,
        current_for_jobs,
        shutdown.clone(),
    )
    .await?;
    let result = runloop::supervise(&ctx, &make, shutdown.clone()).await;
    shutdown.cancel();
    layers_settle.settle().await;
    #[cfg(feature = "queue")]
    if let Some(jobs) = jobs {
        let _ = jobs.await;
    }
    if let Some(indexer) = indexer {
        if let Err(e) = indexer.await {
            tracing::warn!(error = %e, "search indexer task ended abnormally");
        }
    }
    leadership.retire().await;
    if let Some(endpoint) = endpoint {
        endpoint.stop().await;
    }
    if let Err(e) = retention.await {
        tracing::warn!(error = %e, "retention task ended abnormally");
    }
    result?;
    Ok(())
}

/// `run --role queue-worker`: only the job workers (and the metrics endpoint), until a signal.
async fn queue_worker(
    app: &App,
    cfg: &Arc<Config>,
    actions: &ActionContext,
    layers: &Arc<stack::LayerState>,
    observers: Arc<Observers>,
    endpoint: Option<impl Stoppable>,
) -> Result<()> {
    #[cfg(feature = "queue")]
    {
        crate::jobs::check_worker(cfg)?;
        let shutdown = CancellationToken::new();
        tokio::spawn(signals(shutdown.clone()));
        let (observers_tx, rx) = tokio::sync::watch::channel(observers);
        let current = Arc::new(std::sync::RwLock::new(cfg.clone()));
        // SIGHUP reloads observers (jobs run with the new ones) as in the daemon.
        tokio::spawn(reload_on_hup(
            app.config_path.clone(),
            current.clone(),
            observers_tx,
            layers.metrics.clone(),
            shutdown.clone(),
        ));
        tracing::info!(database = %app.where_db(), "starting as a queue worker (no change-log listener)");
        let workers =
            crate::jobs::start(app, cfg, actions, layers, rx, current, shutdown.clone()).await?;
        let Some(workers) = workers else {
            if let Some(e) = endpoint {
                e.stop().await;
            }
            anyhow::bail!(
                "no job queue to work: no observer sets `queue`, and Redis holds no jobs under the key prefix `{}`",
                cfg.redis.key_prefix
            );
        };
        let _ = workers.await;
        layers.settle().await;
        if let Some(e) = endpoint {
            e.stop().await;
        }
        Ok(())
    }
    #[cfg(not(feature = "queue"))]
    {
        let _ = (app, cfg, actions, layers, observers);
        if let Some(e) = endpoint {
            e.stop().await;
        }
        anyhow::bail!("--role queue-worker needs the `queue` layer, and this binary was built without it (cargo feature `queue`)")
    }
}

/// What `queue_worker` needs of the metrics endpoint.
pub(crate) trait Stoppable {
    async fn stop(self);
}

#[cfg(feature = "metrics")]
impl Stoppable for observer_features::metrics::MetricsServer {
    async fn stop(self) {
        observer_features::metrics::MetricsServer::stop(self).await
    }
}

#[cfg(not(feature = "metrics"))]
impl Stoppable for NoEndpoint {
    async fn stop(self) {}
}

/// Applies `[retention]` every `interval_secs` (0 = off) until shutdown. A failed pass is logged
/// and tried again at the next interval; it never stops the daemon.
async fn retention_pass(
    pool: deadpool_postgres::Pool,
    objects: Arc<observer_core::schema::Objects>,
    policy: observer_core::config::RetentionConfig,
    audit: bool,
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
            observer_core::retention::apply(&**client, &objects, &policy, audit, false)
                .await
                .map_err(anyhow::Error::from)
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = pass => match r {
                Ok(r) => tracing::info!(
                    change_log = r.change_log, action_log = r.action_log, audit = r.audit, dead_letters = r.dead_letters,
                    note = r.change_log_note.as_deref().unwrap_or(""), "retention pass"
                ),
                Err(e) => tracing::warn!(error = %format!("{e:#}"), "retention pass failed; retrying next interval"),
            }
        }
    }
}

/// The `metrics` layer's endpoint, when `features.metrics` is on.
#[cfg(feature = "metrics")]
async fn metrics_endpoint(
    app: &App,
    metrics: Arc<observer_core::metrics::Metrics>,
    pool: deadpool_postgres::Pool,
    checkpoint: Option<Arc<dyn CheckpointStore>>,
) -> Result<Option<observer_features::metrics::MetricsServer>> {
    let cfg = &app.config;
    if !cfg.features.metrics {
        return Ok(None);
    }
    let sources = observer_features::metrics::Sources {
        metrics,
        pool,
        objects: app.objects.clone(),
        listener: cfg.listener.id.clone(),
        checkpoint,
        ready_max_lag_secs: cfg.metrics.ready_max_lag_secs,
        refresh: std::time::Duration::from_secs(cfg.metrics.refresh_secs.max(1)),
    };
    let server = observer_features::metrics::MetricsServer::start(
        &cfg.metrics.listen,
        sources,
        cfg.metrics.server_limits(),
    )
    .await?;
    tracing::info!(
        url = %server.url(),
        "metrics endpoint: {} (also /health and /ready)",
        server.url()
    );
    Ok(Some(server))
}

/// Without the cargo feature `check_features` has already refused `features.metrics = true`.
#[cfg(not(feature = "metrics"))]
async fn metrics_endpoint(
    _app: &App,
    _metrics: Arc<observer_core::metrics::Metrics>,
    _pool: deadpool_postgres::Pool,
    _checkpoint: Option<Arc<dyn CheckpointStore>>,
) -> Result<Option<NoEndpoint>> {
    Ok(None)
}

#[cfg(not(feature = "metrics"))]
struct NoEndpoint;

#[cfg(not(feature = "metrics"))]
impl NoEndpoint {
    async fn stop(self) {}
}

/// The `search` layer's indexer, when `features.search` is on with a cluster backend: it feeds
/// the cluster from `observer_audit` on its own connection (observer-features/src/search.rs).
#[cfg(feature = "search")]
fn search_indexer(
    app: &App,
    metrics: &Arc<observer_core::metrics::Metrics>,
    shutdown: CancellationToken,
) -> Result<Option<tokio::task::JoinHandle<()>>> {
    use observer_features::search::{Cluster, Indexer, SearchMetrics};
    let cfg = &app.config;
    if !cfg.features.search
        || cfg.search.backend != observer_core::config::SearchBackend::Elasticsearch
    {
        return Ok(None);
    }
    let cluster = Cluster::from_config(&cfg.search)?;
    tracing::info!(cluster = %cluster.url(), index_prefix = %cluster.prefix(), "search indexer: feeding the audit trail to the cluster");
    let indexer = Indexer {
        cluster: Arc::new(cluster),
        pg: app.pg_config.clone(),
        tls: app.tls.clone(),
        objects: app.objects.clone(),
        listener: cfg.listener.id.clone(),
        batch_size: cfg.search.batch_size,
        poll: std::time::Duration::from_millis(cfg.search.poll_interval_ms),
        max_backoff: std::time::Duration::from_millis(cfg.search.max_backoff_ms),
        metrics: SearchMetrics::register(&metrics.registry),
        leader: metrics.leader.clone(),
    };
    Ok(Some(tokio::spawn(indexer.run(shutdown))))
}

/// Without the cargo feature `check_features` has already refused `features.search = true`.
#[cfg(not(feature = "search"))]
fn search_indexer(
    _app: &App,
    _metrics: &Arc<observer_core::metrics::Metrics>,
    _shutdown: CancellationToken,
) -> Result<Option<tokio::task::JoinHandle<()>>> {
    Ok(None)
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

/// Sections a running daemon cannot change (its connections, its position, its endpoints): a
/// reload keeps their running values and says which ones need a restart.
fn restart_only(old: &Config, new: &mut Config) -> Vec<&'static str> {
    let mut kept = Vec::new();
    macro_rules! keep {
        ($($field:ident).+, $name:expr) => {
            if serde_json::to_value(&old.$($field).+).ok() != serde_json::to_value(&new.$($field).+).ok() {
                new.$($field).+ = old.$($field).+.clone();
                kept.push($name);
            }
        };
    }
    keep!(database, "database");
    keep!(change_log, "change_log");
    keep!(listener, "listener");
    keep!(action_log, "action_log");
    keep!(retention, "retention");
    keep!(redis, "redis");
    keep!(metrics, "metrics");
    keep!(runtime, "runtime");
    keep!(outbound, "outbound");
    keep!(features.checkpoint, "features.checkpoint");
    keep!(features.metrics, "features.metrics");
    keep!(features.caching, "features.caching");
    // The job workers are started with the process (docs/configuration.md, `[queue]`).
    keep!(features.queue, "features.queue");
    keep!(queue, "queue");
    keep!(caching, "caching");
    keep!(features.search, "features.search");
    keep!(search, "search");
    // A worker's connection, stream and consumers are set up at start.
    keep!(features.nats, "features.nats");
    keep!(nats, "nats");
    kept
}

/// Loads, checks and compiles a configuration the way `run` does before starting.
fn load_checked(path: Option<&Path>) -> Result<(Config, Observers)> {
    let cfg = observer_core::config::load(path)?;
    stack::check_features(&cfg)?;
    let problems = cfg.check();
    if !problems.is_empty() {
        let list: Vec<String> = problems.iter().map(|(k, m)| format!("{k}: {m}")).collect();
        anyhow::bail!("invalid settings: {}", list.join("; "));
    }
    let observers = Observers::compile(&cfg).map_err(|issues| {
        let list: Vec<String> = issues.iter().map(|i| i.to_string()).collect();
        anyhow!("invalid observers: {}", list.join("; "))
    })?;
    Ok((cfg, observers))
}

/// SIGHUP: reload the file, validate it completely, and only then swap observers and the
/// executor stack (layer toggles and their settings); on any error keep running as before.
pub(crate) async fn reload_on_hup(
    path: Option<std::path::PathBuf>,
    current: Arc<std::sync::RwLock<Arc<Config>>>,
    observers: tokio::sync::watch::Sender<Arc<Observers>>,
    metrics: Arc<observer_core::metrics::Metrics>,
    shutdown: CancellationToken,
) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::error!("cannot install the SIGHUP handler; reload is unavailable");
        return;
    };
    let file = path
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "(defaults and environment)".into());
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = hup.recv() => {}
        }
        tracing::info!(file = %file, "SIGHUP: reloading the configuration");
        let old = current
            .read()
            .map(|c| c.clone())
            .unwrap_or_else(|p| p.into_inner().clone());
        match load_checked(path.as_deref()) {
            Ok((mut cfg, compiled)) => {
                let kept = restart_only(&old, &mut cfg);
                if !kept.is_empty() {
                    tracing::warn!(sections = %kept.join(", "), "these settings changed but take effect only after a restart; keeping the running values");
                }
                for o in &compiled.list {
                    let kinds: Vec<&str> = o.actions.iter().map(|a| a.action.kind()).collect();
                    metrics.init_observer(&o.name, &kinds);
                }
                let n = compiled.list.len();
                match current.write() {
                    Ok(mut c) => *c = Arc::new(cfg),
                    Err(p) => *p.into_inner() = Arc::new(cfg),
                }
                let _ = observers.send(Arc::new(compiled));
                tracing::info!(file = %file, observers = n, "reload accepted");
            }
            Err(e) => {
                tracing::error!(file = %file, error = %format!("{e:#}"), "reload refused; the running configuration is unchanged");
            }
        }
    }
}

/// SIGHUP for a publisher: logged and otherwise ignored (its one observer does not come from
/// the file; restart it to change `[nats]` or `[listener]`).
async fn ignore_hup(
    _observers: tokio::sync::watch::Sender<Arc<Observers>>,
    shutdown: CancellationToken,
) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        return;
    };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = hup.recv() => tracing::info!("SIGHUP: a publisher has no observers to reload; restart it to change its settings"),
        }
    }
}

pub(crate) async fn signals(shutdown: CancellationToken) {
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
