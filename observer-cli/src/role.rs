//! What a `run` process does: everything (the default), or one part of the pipeline.

/// `run --role …`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
#[clap(rename_all = "kebab-case")]
pub enum Role {
    /// Tail the change log and execute (or enqueue) actions; with the `queue` layer, also work
    /// jobs off when `[queue] workers` is above 0.
    #[default]
    All,
    /// Only work off the job queues (the `queue` layer), no change-log listener: scale the job
    /// workers out on their own.
    QueueWorker,
    /// Tail the change log and publish every event to the NATS JetStream stream of `[nats]`
    /// instead of running actions (the `nats` layer; failover-protected like any listener).
    Publisher,
    /// Work events off the JetStream stream through the executor stack: no change-log
    /// listener; run any number of them (the `nats` layer).
    Worker,
}
