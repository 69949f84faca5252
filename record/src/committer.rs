//! Group commit: writes from every connection queue up here and are applied
//! in batches, one transaction each. A waiter hears back only after its
//! batch has committed, so an ack never leaves before the data is durable,
//! while one fsync serves a whole batch.

use std::sync::Arc;
use std::time::Instant;

use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts, Registry};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::store::{MessageStore, Outcome, Write};
use natter_node::telemetry::register;
use natter_node::Shutdown;

/// Why a write did not commit.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum CommitError {
    #[error("storage failed: {0}")]
    Failed(String),
    #[error("the committer has shut down")]
    Closed,
    #[error("the write queue is full")]
    Full,
}

impl From<CommitError> for natter_roles::Refusal {
    fn from(e: CommitError) -> natter_roles::Refusal {
        use natter_proto::ErrorCode;
        use natter_roles::Refusal;
        match e {
            CommitError::Closed => {
                Refusal::new(ErrorCode::ServerShutdown, "server is shutting down")
            }
            CommitError::Failed(_) => Refusal::new(ErrorCode::Internal, "storage failed; retry"),
            CommitError::Full => Refusal::new(ErrorCode::RateLimited, "the server is busy; retry"),
        }
    }
}

type Reply = oneshot::Sender<Result<Outcome, CommitError>>;

struct Job {
    write: Write,
    reply: Option<Reply>,
}

#[derive(Clone)]
struct Metrics {
    commit_seconds: Histogram,
    batch_size: Histogram,
    queue_depth: IntGauge,
    batches: IntCounterVec,
}

impl Metrics {
    fn new(registry: &Registry) -> Metrics {
        Metrics {
            commit_seconds: register(
                registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "natter_store_commit_seconds",
                        "Time to write and commit one batch.",
                    )
                    .buckets(vec![
                        0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                    ]),
                )
                .expect("valid histogram"),
            ),
            batch_size: register(
                registry,
                Histogram::with_opts(
                    HistogramOpts::new("natter_store_batch_size", "Writes per committed batch.")
                        .buckets(vec![
                            1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0,
                        ]),
                )
                .expect("valid histogram"),
            ),
            queue_depth: register(
                registry,
                IntGauge::new(
                    "natter_store_queue_depth",
                    "Writes waiting for the committer.",
                )
                .expect("valid gauge"),
            ),
            batches: register(
                registry,
                IntCounterVec::new(
                    Opts::new("natter_store_batches_total", "Batches by outcome."),
                    &["outcome"],
                )
                .expect("valid counter"),
            ),
        }
    }
}

/// The handle writers use; cheap to clone.
#[derive(Clone)]
pub struct Committer {
    tx: mpsc::Sender<Job>,
    metrics: Metrics,
}

impl Committer {
    /// Starts the committer task. It stops after `shutdown`, once the queue is drained.
    pub fn start(
        store: Arc<dyn MessageStore>,
        batch_max: usize,
        queue: usize,
        registry: &Registry,
        shutdown: Shutdown,
    ) -> (Committer, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(queue);
        let metrics = Metrics::new(registry);
        // The committer is a chain of awaits on the database, one batch at a
        // time. On a runtime busy with thousands of connection tasks each of
        // those wake-ups would queue behind them; on a thread of its own, the
        // database's reply resumes it at once.
        // A plain thread rather than the runtime's blocking pool: a runtime
        // being dropped (a test that failed before stopping its server) waits
        // for blocking-pool work, and this loop ends only on shutdown.
        let runtime = tokio::runtime::Handle::current();
        let worker_metrics = metrics.clone();
        let (done, finished) = tokio::sync::oneshot::channel::<()>();
        let spawned = std::thread::Builder::new()
            .name("natter-committer".into())
            .spawn(move || {
                runtime.block_on(run(store, rx, batch_max, worker_metrics, shutdown));
                let _ = done.send(());
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the committer thread");
        }
        let task = tokio::spawn(async move {
            let _ = finished.await;
        });
        (Committer { tx, metrics }, task)
    }

    /// Queues `write` and waits until its batch has committed.
    pub async fn write(&self, write: Write) -> Result<Outcome, CommitError> {
        let (reply, answer) = oneshot::channel();
        self.metrics.queue_depth.inc();
        if self
            .tx
            .send(Job {
                write,
                reply: Some(reply),
            })
            .await
            .is_err()
        {
            self.metrics.queue_depth.dec();
            return Err(CommitError::Closed);
        }
        answer.await.unwrap_or(Err(CommitError::Closed))
    }

    /// Queues `write` if there is room now; never waits.
    pub fn try_enqueue(&self, write: Write) -> Result<(), CommitError> {
        match self.tx.try_send(Job { write, reply: None }) {
            Ok(()) => {
                self.metrics.queue_depth.inc();
                Ok(())
            }
            Err(mpsc::error::TrySendError::Full(_)) => Err(CommitError::Full),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(CommitError::Closed),
        }
    }

    /// Queues `write` without waiting for the commit (for acknowledgements,
    /// whose loss costs a resend, never a message).
    pub async fn enqueue(&self, write: Write) -> Result<(), CommitError> {
        self.metrics.queue_depth.inc();
        self.tx.send(Job { write, reply: None }).await.map_err(|_| {
            self.metrics.queue_depth.dec();
            CommitError::Closed
        })
    }
}

async fn run(
    store: Arc<dyn MessageStore>,
    mut rx: mpsc::Receiver<Job>,
    batch_max: usize,
    metrics: Metrics,
    shutdown: Shutdown,
) {
    let mut jobs: Vec<Job> = Vec::with_capacity(batch_max);
    loop {
        let first = tokio::select! {
            biased;
            job = rx.recv() => job,
            _ = shutdown.cancelled() => {
                // Refuse new writes, then commit what is already queued.
                rx.close();
                rx.recv().await
            }
        };
        let Some(first) = first else { break };
        jobs.push(first);
        while jobs.len() < batch_max {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        metrics.queue_depth.sub(jobs.len() as i64);
        let writes: Vec<Write> = jobs.iter().map(|j| j.write.clone()).collect();
        let started = Instant::now();
        let result = store.write_batch(&writes).await;
        metrics
            .commit_seconds
            .observe(started.elapsed().as_secs_f64());
        metrics.batch_size.observe(jobs.len() as f64);
        match result {
            Ok(outcomes) => {
                metrics.batches.with_label_values(&["ok"]).inc();
                for (job, outcome) in jobs.drain(..).zip(outcomes) {
                    if let Some(reply) = job.reply {
                        let _ = reply.send(Ok(outcome));
                    }
                }
            }
            Err(e) => {
                metrics.batches.with_label_values(&["error"]).inc();
                tracing::error!(error = %e, writes = jobs.len(), "batch commit failed");
                let failure = CommitError::Failed(e.to_string());
                for job in jobs.drain(..) {
                    if let Some(reply) = job.reply {
                        let _ = reply.send(Err(failure.clone()));
                    }
                }
            }
        }
    }
    tracing::debug!("committer stopped");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sqlite::SqliteStore;
    use crate::suite::{text, u};

    #[tokio::test]
    async fn concurrent_writers_share_batches_and_all_commit() {
        let store: Arc<dyn MessageStore> = Arc::new(SqliteStore::memory().await.expect("store"));
        let registry = Registry::new();
        let shutdown = Shutdown::new();
        let (committer, task) =
            Committer::start(store.clone(), 64, 1024, &registry, shutdown.clone());
        let mut handles = Vec::new();
        for i in 0..200u64 {
            let c = committer.clone();
            handles.push(tokio::spawn(async move {
                c.write(Write::Message(text(1, 2, i))).await
            }));
        }
        for h in handles {
            assert!(matches!(h.await.expect("join"), Ok(Outcome::Stored(_))));
        }
        assert_eq!(
            store
                .sync(&u(2), 0, 500.into())
                .await
                .expect("sync")
                .items
                .len(),
            200
        );
        let batches = metrics_count(&registry, "natter_store_batch_size");
        assert!(batches < 200, "writes were batched ({batches} batches)");

        committer
            .enqueue(Write::SetCursor {
                owner: u(2),
                device: "d".into(),
                group: 0,
                cursor: 5,
            })
            .await
            .expect("queued");
        shutdown.cancel();
        task.await.expect("committer stops");
        // What was queued before shutdown committed; new writes are refused.
        assert_eq!(store.cursor(&u(2), "d", 0).await.expect("cursor"), 5);
        assert_eq!(
            committer.write(Write::Message(text(1, 2, 999))).await,
            Err(CommitError::Closed)
        );
    }

    #[tokio::test]
    async fn a_failed_batch_fails_every_waiter() {
        let store = Arc::new(SqliteStore::memory().await.expect("store"));
        store.close().await;
        let (committer, _task) = Committer::start(store, 8, 8, &Registry::new(), Shutdown::new());
        let err = committer
            .write(Write::Message(text(1, 2, 1)))
            .await
            .expect_err("store is closed");
        assert!(matches!(err, CommitError::Failed(_)));
    }

    fn metrics_count(registry: &Registry, name: &str) -> u64 {
        registry
            .gather()
            .iter()
            .find(|f| f.name() == name)
            .map(|f| f.get_metric()[0].get_histogram().get_sample_count())
            .unwrap_or(0)
    }
}
