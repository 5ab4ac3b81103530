//! The worker loop: deliveries in, acks out.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    BasicRejectOptions,
};
use lapin::types::FieldTable;
use syncfleet_broker::{BrokerError, Topology};
use syncfleet_core::Config;
use syncfleet_core::job::Job;
use syncfleet_core::shutdown::ShutdownSignal;
use syncfleet_db::{DbError, control};
use tokio::task::JoinSet;

use crate::error::JobError;
use crate::execute::Executor;

/// Why a worker stopped other than by shutdown.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error(
        "the control schema in the destination is at version {found}, this syncfleet needs {needed}: run `syncfleet migrate`"
    )]
    Schema { found: i32, needed: i32 },
    #[error("the broker closed the consumer")]
    ConsumerClosed,
}

impl From<lapin::Error> for WorkerError {
    fn from(e: lapin::Error) -> Self {
        WorkerError::Broker(e.into())
    }
}

/// How long a job that hit a transient error waits before it is handed back.
const RETRY_PAUSE: Duration = Duration::from_secs(1);
/// How long a stopping worker waits for jobs in flight.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Consumes jobs until `shutdown`, running up to `concurrency` at once.
pub async fn run(
    config: Arc<Config>,
    concurrency: u16,
    mut shutdown: ShutdownSignal,
) -> Result<(), WorkerError> {
    let executor = Arc::new(Executor::connect(config.clone()).await?);
    let found = control::schema_version(&**executor.destination().get().await?).await?;
    if found != control::SCHEMA_VERSION {
        return Err(WorkerError::Schema {
            found,
            needed: control::SCHEMA_VERSION,
        });
    }
    let topology = Topology::new(&config.broker.prefix);
    let connection = syncfleet_broker::connect(&config.broker, "worker").await?;
    let channel = connection.create_channel().await?;
    topology.declare(&channel).await?;
    // The prefetch bounds the jobs in flight: the broker sends no more until
    // one is acked, so memory and connections stay bounded.
    channel
        .basic_qos(concurrency, BasicQosOptions::default())
        .await?;
    let mut consumer = channel
        .basic_consume(
            topology.work_queue().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    tracing::info!(worker = %executor.id(), queue = %topology.work_queue(), concurrency, "worker consuming");

    let mut in_flight = JoinSet::new();
    let outcome = loop {
        tokio::select! {
            _ = shutdown.wait() => break Ok(()),
            Some(done) = in_flight.join_next(), if !in_flight.is_empty() => {
                if let Err(e) = done {
                    tracing::error!(error = %e, "job task panicked; its message will be redelivered");
                }
            }
            delivery = consumer.next() => match delivery {
                Some(Ok(delivery)) => {
                    in_flight.spawn(handle(executor.clone(), delivery));
                }
                Some(Err(e)) => break Err(WorkerError::from(e)),
                None => break Err(WorkerError::ConsumerClosed),
            },
        }
    };

    // Stop taking jobs, let those in flight finish and ack, then leave.
    let _ = channel
        .basic_cancel(consumer.tag(), BasicCancelOptions::default())
        .await;
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while in_flight.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            abandoned = in_flight.len(),
            "jobs still running after the drain timeout; the broker will redeliver them"
        );
        in_flight.abort_all();
    }
    let _ = channel.close(200, "worker stopping".into()).await;
    let _ = connection.close(200, "worker stopping".into()).await;
    tracing::info!("worker stopped");
    outcome
}

/// Executes one delivery and settles it: ack after commit, reject to the
/// dead-letter queue when retrying cannot help, nack (requeue) otherwise.
async fn handle(executor: Arc<Executor>, delivery: Delivery) {
    let job = match Job::decode(&delivery.data) {
        Ok(job) => job,
        Err(e) => {
            tracing::error!(error = %e, "dead-lettering a message that is not a valid job");
            settle(delivery.reject(BasicRejectOptions { requeue: false }).await);
            return;
        }
    };
    let started = std::time::Instant::now();
    match executor.execute(&job).await {
        Ok(outcome) => {
            tracing::debug!(
                job = %job.id(),
                rows = outcome.rows_copied,
                deleted = outcome.rows_deleted,
                ms = started.elapsed().as_millis() as u64,
                "batch done"
            );
            if outcome.finished_run {
                tracing::info!(run_id = job.run_id, "run finished");
            }
            settle(delivery.ack(BasicAckOptions::default()).await);
        }
        Err(JobError::Retry(reason)) => {
            tracing::warn!(job = %job.id(), %reason, "batch failed; handing it back for another attempt");
            tokio::time::sleep(RETRY_PAUSE).await;
            settle(
                delivery
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..Default::default()
                    })
                    .await,
            );
        }
        Err(JobError::Reject(reason)) => {
            tracing::error!(job = %job.id(), %reason, "batch cannot succeed; dead-lettering it");
            if let Err(e) = executor.fail(&job, &reason).await {
                // Reject anyway: the dead letter carries the job, and a
                // replay re-runs it.
                tracing::error!(job = %job.id(), error = %e, "could not record the failed batch");
            }
            settle(delivery.reject(BasicRejectOptions { requeue: false }).await);
        }
    }
}

/// A failed ack or reject is not lost work: the broker redelivers the job,
/// and executing it again is idempotent.
fn settle(result: Result<bool, lapin::Error>) {
    match result {
        Ok(true) => {}
        Ok(false) => tracing::warn!("delivery was already settled"),
        Err(e) => {
            tracing::warn!(error = %e, "could not settle a delivery; the broker will redeliver it")
        }
    }
}
