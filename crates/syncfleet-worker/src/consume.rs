//! The worker loop: deliveries in, settled deliveries out.
//!
//! Deliveries wait for one of `concurrency` slots. A slot takes the next
//! group: the first delivery waiting, and those after it while their jobs
//! are small (see `GROUP_ROWS`); the group runs in one transaction, and if
//! it fails its jobs run again one by one, so each is settled on its own.
//!
//! A session is one broker connection with one consumer. When the broker
//! goes away the session ends, the worker reconnects with backoff, declares
//! the topology again and resumes; jobs that were unacked are redelivered by
//! the broker and applied again, idempotently. Every delivery is settled in
//! exactly one of these ways:
//!
//! | outcome | what happens |
//! | --- | --- |
//! | committed | ack |
//! | superseded: another run has claimed its stream since (see `control::SUPERSEDED`) | ack, nothing written |
//! | a database is unreachable | re-published to `P.delay.0` as the same attempt, after a backoff that grows while the outage lasts, then ack |
//! | a connection broke under the job | as for an unreachable database, counted in the message; after `max_attempts` of them, as for a permanent failure (a job that ends its own session or crashes the server each time must not do so forever) |
//! | transient failure, attempts left | re-published to `P.delay.N` (confirmed), then ack |
//! | a bad value (a data exception or a constraint of the destination; a unique conflict once its attempts are used up) in an event job of several rows | its two halves published (confirmed) as first attempts, then ack: halved, at most 6 times, until only the values at fault are dead-lettered |
//! | permanent failure, attempts used up, or not a job | batch marked failed, message published to `P.dead` with the reason (confirmed), then ack; if the destination is unreachable to mark it, as for an unreachable database |
//! | the job panicked | nack with requeue; the queue's delivery limit dead-letters a job that keeps doing so |
//!
//! Publishing before acking means a crash in between duplicates a message
//! rather than losing it, and duplicates are harmless.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use futures_util::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
};
use lapin::types::FieldTable;
use syncfleet_broker::headers::now_ms;
use syncfleet_broker::{BrokerError, Meta, Publisher};
use syncfleet_core::backoff::RetryPolicy;
use syncfleet_core::config::SETTLE_SLACK;
use syncfleet_core::job::{Job, JobDecodeError};
use syncfleet_core::metrics as m;
use syncfleet_core::shutdown::ShutdownSignal;
use syncfleet_core::{Config, ConfigError, health};
use syncfleet_db::{DbError, control};
use tokio::task::JoinSet;

use crate::error::JobError;
use crate::execute::{BatchOutcome, Executor};

/// Why a worker stopped other than by shutdown.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error(transparent)]
    Schema(#[from] control::SchemaMismatch),
}

impl From<lapin::Error> for WorkerError {
    fn from(e: lapin::Error) -> Self {
        WorkerError::Broker(e.into())
    }
}

/// Backoff between reconnection attempts.
const RECONNECT: RetryPolicy = RetryPolicy {
    initial: Duration::from_millis(250),
    max: Duration::from_secs(10),
    max_attempts: u32::MAX,
};

/// Backoff for jobs waiting out a database outage.
const OUTAGE: RetryPolicy = RetryPolicy {
    initial: Duration::from_millis(500),
    max: Duration::from_secs(5),
    max_attempts: u32::MAX,
};

/// Rows one destination transaction takes on when it groups small jobs.
/// A transaction and its read slot cost about a millisecond of round trips
/// and wake-ups on both databases: nothing against a batch of 1,000 rows or
/// more, most of the work of a batch of a few. (Measured in
/// `docs/benchmarks.md`, section 4.)
const GROUP_ROWS: u32 = 1_000;
/// Most jobs in one group, whatever their size. 64 against 16: section 4's
/// empty jobs at 0.57–0.66 of the bare loop against 0.43–0.52, five runs
/// each, alternating (`docs/benchmarks.md`).
const MAX_GROUP: usize = 64;

/// About how many rows a job may bring, for grouping: a range up to its
/// stream's batch size, a selection about one per value. A job this worker
/// cannot read goes alone.
fn weight(config: &Config, job: &Result<Job, JobDecodeError>) -> u32 {
    let Ok(job) = job else { return GROUP_ROWS };
    match (&job.select, config.stream(&job.stream)) {
        (Some(select), _) => u32::try_from(select.values.len()).unwrap_or(u32::MAX),
        (None, Some(stream)) => stream.batch_size,
        (None, None) => GROUP_ROWS,
    }
}

/// Jobs per group of the config's smallest batches: the prefetch is
/// `concurrency` times this, so that groups can form while every slot is
/// busy, and stays `concurrency` for batches of `GROUP_ROWS` or more, which
/// never share a transaction (a worker should not hoard large jobs that an
/// idle one could take; with streams of both sizes it can, and hands back
/// those it cannot get to in time, see [`Pending::hand_back_at`]).
fn group_size(config: &Config) -> u16 {
    let smallest = config
        .streams
        .iter()
        .map(|s| s.batch_size)
        .min()
        .unwrap_or(GROUP_ROWS);
    (GROUP_ROWS / smallest.max(1)).clamp(1, MAX_GROUP as u32) as u16
}

/// A delivery waiting for a free slot, decoded once.
struct Pending {
    delivery: Delivery,
    job: Result<Job, JobDecodeError>,
    /// When it is handed back to the broker if it still waits: its
    /// deadline after it came. The prefetch that lets small jobs group also
    /// lets a worker hold many large ones; one of them waiting here longer
    /// than it may run goes back for an idle worker to take, and no
    /// delivery is held past the broker's consumer timeout (every deadline
    /// is under half of it).
    hand_back_at: tokio::time::Instant,
    /// The latest it may begin (get past the read gate) and still be
    /// settled within the broker's consumer timeout: else the broker
    /// closes the channel and every job of the session runs twice.
    start_by: Instant,
    /// The channel it came on. Once that is no longer connected (the
    /// connection lost), the broker has put the delivery back for another
    /// worker: this one neither runs it nor records or publishes anything
    /// in its stead (a failure, a retry, halves, a dead letter), which would
    /// make two of each.
    channel: lapin::Channel,
}

/// Takes the next group from the front of `pending`.
fn next_group(config: &Config, pending: &mut VecDeque<Pending>) -> Vec<Pending> {
    let len = group_len(pending.iter().map(|p| weight(config, &p.job)));
    pending.drain(..len).collect()
}

/// How many of the jobs waiting, in arrival order, make the next group: at
/// least one, then while their weights fit [`GROUP_ROWS`], up to
/// [`MAX_GROUP`].
fn group_len(weights: impl Iterator<Item = u32>) -> usize {
    let mut rows = 0u32;
    let mut len = 0;
    for w in weights.take(MAX_GROUP) {
        rows = rows.saturating_add(w);
        if len > 0 && rows > GROUP_ROWS {
            break;
        }
        len += 1;
    }
    len
}

/// Everything a delivery handler needs.
struct Context {
    executor: Executor,
    publisher: Publisher,
    /// Jobs that found a database unreachable since the last success: the
    /// outage's backoff, and logging it once rather than once per job.
    outage: AtomicU32,
}

/// How a session ended.
enum SessionEnd {
    /// Shutdown was requested and the session drained.
    Stopped,
    /// The broker connection or channel failed; `consumed` says whether the
    /// session got as far as consuming (which ends an outage).
    Lost { error: WorkerError, consumed: bool },
}

/// Consumes jobs until `shutdown`, running up to `worker.concurrency` at once.
///
/// Starting fails fast, naming what is wrong (config, database, broker,
/// schema); once running, the worker rides out broker and database restarts.
pub async fn run(config: Arc<Config>, mut shutdown: ShutdownSignal) -> Result<(), WorkerError> {
    config.check_deadlines()?;
    let concurrency = config.worker.concurrency;
    let executor = Executor::connect(config.clone()).await?;
    control::check_schema(&**executor.destination().get().await?).await??;
    let publisher = Publisher::connect(&config.broker, "worker").await?;
    for reason in m::DEAD_LETTER_REASONS {
        metrics::counter!(m::DEAD_LETTERS, "reason" => reason).absolute(0);
    }
    if let Some(throttle) = &config.reads.throttle {
        // The probe times the primary, where the app runs, even when the
        // fleet reads a replica.
        let probe = syncfleet_core::config::DbConfig {
            max_connections: 1,
            ..config.source.clone()
        };
        let probe = syncfleet_db::Pool::connect(syncfleet_db::Role::Source, &probe).await?;
        // Before the first job: a worker that joins a backlog must not read
        // at the ceiling while the fleet is backing off.
        crate::throttle::resume_fleet_level(
            executor.gate(),
            executor.destination(),
            &config.broker.prefix,
        )
        .await;
        tokio::spawn(crate::throttle::run_probe(
            executor.gate().clone(),
            probe,
            executor.destination().clone(),
            config.broker.prefix.clone(),
            throttle.clone(),
            shutdown.clone(),
        ));
    }
    let context = Arc::new(Context {
        executor,
        publisher,
        outage: AtomicU32::new(0),
    });
    tokio::spawn(report_gauges(context.clone(), shutdown.clone()));
    let mut in_flight = JoinSet::new();
    let mut failures = 0u32;
    loop {
        match session(&context, concurrency, &mut shutdown, &mut in_flight).await {
            SessionEnd::Stopped => break,
            SessionEnd::Lost { error: e, consumed } => {
                health::set_ready(false);
                metrics::counter!(m::BROKER_RECONNECTS).increment(1);
                if consumed {
                    failures = 0;
                }
                // Logged once per outage, not once per attempt.
                if failures == 0 {
                    tracing::warn!(error = %e, "lost the broker; reconnecting");
                } else {
                    tracing::debug!(error = %e, failures, "still reconnecting to the broker");
                }
                failures += 1;
                tokio::select! {
                    _ = shutdown.wait() => break,
                    _ = tokio::time::sleep(RECONNECT.delay(failures)) => {}
                }
            }
        }
    }
    // Jobs of earlier, lost sessions may still be running; their acks go
    // nowhere and the broker redelivers them, but let them end cleanly.
    let grace = context.executor.config().worker.shutdown_grace;
    if tokio::time::timeout(grace, drain(&mut in_flight))
        .await
        .is_err()
    {
        abandon(&mut in_flight).await;
    }
    context.publisher.close().await;
    tracing::info!(worker = %context.executor.id(), "worker stopped");
    Ok(())
}

/// One connection's worth of consuming. Drains and returns `Stopped` on
/// shutdown; returns `Lost` when the broker goes away.
async fn session(
    context: &Arc<Context>,
    concurrency: u16,
    shutdown: &mut ShutdownSignal,
    in_flight: &mut JoinSet<()>,
) -> SessionEnd {
    let config = context.executor.config();
    let topology = context.publisher.topology().clone();
    let opened = async {
        let connection = syncfleet_broker::connect(&config.broker, "worker").await?;
        let channel = connection.create_channel().await?;
        topology.declare(&channel).await?;
        // The prefetch bounds the jobs held: the broker sends no more
        // until one is settled.
        let prefetch = concurrency.saturating_mul(group_size(config));
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        let consumer = channel
            .basic_consume(
                topology.work_queue().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok::<_, WorkerError>((connection, channel, consumer))
    }
    .await;
    let (connection, channel, mut consumer) = match opened {
        Ok(parts) => parts,
        Err(error) => {
            return SessionEnd::Lost {
                error,
                consumed: false,
            };
        }
    };
    tracing::info!(
        worker = %context.executor.id(),
        queue = %topology.work_queue(),
        concurrency,
        "worker consuming"
    );
    health::set_ready(true);

    // Deliveries wait here for one of the `concurrency` slots; a slot that
    // frees up takes every small job waiting, up to a group.
    let mut pending = VecDeque::new();
    // Hand-backs, apart from the jobs: they take no slot.
    let mut handing_back = JoinSet::new();
    let lost = loop {
        while in_flight.len() < usize::from(concurrency) && !pending.is_empty() {
            let group = next_group(config, &mut pending);
            in_flight.spawn(handle_group(context.clone(), group));
        }
        let hand_back_at = pending.iter().map(|p| p.hand_back_at).min();
        tokio::select! {
            _ = shutdown.wait() => break None,
            _ = async { tokio::time::sleep_until(hand_back_at.expect("guarded")).await }, if hand_back_at.is_some() => {
                hand_back_waiting(context, &mut pending, &mut handing_back);
            }
            Some(_) = handing_back.join_next(), if !handing_back.is_empty() => {}
            Some(done) = in_flight.join_next(), if !in_flight.is_empty() => {
                if let Err(e) = done {
                    tracing::error!(error = %e, "a job task failed to complete");
                }
            }
            delivery = consumer.next() => match delivery {
                Some(Ok(delivery)) => {
                    let job = Job::decode(&delivery.data);
                    let deadline = job
                        .as_ref()
                        .ok()
                        .and_then(|j| config.stream(&j.stream))
                        .map_or(config.jobs.deadline, |s| s.deadline);
                    let hand_back_at = tokio::time::Instant::now() + deadline;
                    let start_by = Instant::now()
                        + config.broker.consumer_timeout.saturating_sub(deadline + SETTLE_SLACK);
                    let channel = channel.clone();
                    pending.push_back(Pending { delivery, job, hand_back_at, start_by, channel });
                }
                Some(Err(e)) => break Some(WorkerError::from(e)),
                None => break Some(WorkerError::Broker(BrokerError::Connect {
                    url: config.broker.url.redacted(),
                    detail: "the broker cancelled the consumer".into(),
                })),
            },
        }
    };
    if let Some(error) = lost {
        let _ = connection.close(200, "reconnecting".into()).await;
        return SessionEnd::Lost {
            error,
            consumed: true,
        };
    }

    health::set_ready(false);
    // Graceful drain: take no more jobs, let those in flight finish and be
    // acked within the grace, then leave. Jobs still running after it are
    // abandoned; closing the channel hands them back to the broker.
    let _ = channel
        .basic_cancel(consumer.tag(), BasicCancelOptions::default())
        .await;
    let grace = config.worker.shutdown_grace;
    tracing::info!(in_flight = in_flight.len(), ?grace, "draining");
    let drained = async {
        drain(in_flight).await;
        drain(&mut handing_back).await;
    };
    if tokio::time::timeout(grace, drained).await.is_err() {
        tracing::warn!(
            abandoned = in_flight.len(),
            "jobs still running after the shutdown grace; the broker will redeliver them"
        );
        abandon(in_flight).await;
    }
    let _ = channel.close(200, "worker stopping".into()).await;
    let _ = connection.close(200, "worker stopping".into()).await;
    SessionEnd::Stopped
}

/// Hands the deliveries that waited here past their time back to the
/// broker (see [`Pending::hand_back_at`]). As tasks: a publish held up by
/// the broker (a memory alarm) must not stop the consume loop from seeing
/// a shutdown or a lost channel, and a shutdown's drain waits for them as
/// for jobs.
fn hand_back_waiting(
    context: &Arc<Context>,
    pending: &mut VecDeque<Pending>,
    handing_back: &mut JoinSet<()>,
) {
    let now = tokio::time::Instant::now();
    let (expired, kept): (VecDeque<Pending>, VecDeque<Pending>) = std::mem::take(pending)
        .into_iter()
        .partition(|p| p.hand_back_at <= now);
    *pending = kept;
    if !expired.is_empty() {
        tracing::info!(
            jobs = expired.len(),
            "jobs waited here for a free slot longer than their deadline; handing them back for an idle worker"
        );
    }
    for p in expired {
        let context = context.clone();
        handing_back.spawn(async move {
            let (id, stream) = match &p.job {
                Ok(job) => (job.id(), job.stream.as_str()),
                Err(_) => ("job".into(), "?"),
            };
            hand_back(&context, &p.delivery, &id, stream).await;
        });
    }
}

/// Hands an untried delivery back: a copy to the back of the work queue, as
/// the same attempt, then an ack. A requeue would count against the work
/// queue's delivery limit, and a delay queue could hold it behind a long
/// retry. Counted as the outcome `handed_back`.
async fn hand_back(context: &Context, delivery: &Delivery, id: &str, stream: &str) {
    let stream = stream_label(context.executor.config(), stream);
    metrics::counter!(m::JOBS, "stream" => stream, "outcome" => "handed_back").increment(1);
    let headers = Meta::from_properties(&delivery.properties).again(now_ms());
    let copied = context
        .publisher
        .publish_work(&delivery.data, id, headers)
        .await;
    ack_if_copied(
        delivery,
        id,
        copied,
        "could not hand the job back; requeueing it",
        true,
    )
    .await;
}

/// A job's stream as a metrics label: one of the config's streams, or
/// `unknown`. A message may name any stream, and each name would be a new
/// series for as long as the worker runs.
fn stream_label(config: &Config, stream: &str) -> String {
    match config.stream(stream) {
        Some(s) => s.name.clone(),
        None => "unknown".into(),
    }
}

/// Every few seconds: pool use and queue depths, for dashboards.
async fn report_gauges(context: Arc<Context>, mut shutdown: ShutdownSignal) {
    let config = context.executor.config();
    let mut depths = syncfleet_broker::DepthGauges::new(context.publisher.topology().clone());
    loop {
        for (database, pool) in [
            ("source", context.executor.source()),
            ("destination", context.executor.destination()),
        ] {
            let s = pool.status();
            for (state, value) in [
                ("size", s.size),
                ("available", s.available),
                ("waiting", s.waiting),
            ] {
                metrics::gauge!(m::POOL, "database" => database, "state" => state)
                    .set(value as f64);
            }
        }
        depths.report(&config.broker).await;
        tokio::select! {
            _ = shutdown.wait() => break,
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
    depths.close().await;
}

async fn drain(in_flight: &mut JoinSet<()>) {
    while in_flight.join_next().await.is_some() {}
}

/// Aborts the jobs still running, and sends the cancels of the statements
/// they leave on the servers (see `execute::Unpooled`): otherwise those go
/// on holding the jobs' locks, against the workers their deliveries go to.
async fn abandon(in_flight: &mut JoinSet<()>) {
    in_flight.abort_all();
    drain(in_flight).await;
    crate::execute::cancels_sent().await;
}

/// Executes a group of deliveries in one transaction and settles each (see
/// the module docs). If the group fails, its jobs run again one by one, so
/// that each meets its own fate: one bad job does not fail the others.
async fn handle_group(context: Arc<Context>, group: Vec<Pending>) {
    let Some(channel) = group.first().map(|p| p.channel.clone()) else {
        return;
    };
    let mut deliveries = Vec::with_capacity(group.len());
    let mut jobs = Vec::with_capacity(group.len());
    let mut start_by = Vec::with_capacity(group.len());
    for Pending {
        delivery,
        job,
        start_by: by,
        ..
    } in group
    {
        match job {
            Ok(job) => {
                deliveries.push(delivery);
                jobs.push(job);
                start_by.push(by);
            }
            // Its redelivery dead-letters it once the channel is gone.
            Err(_) if !channel.status().connected() => {}
            Err(e) => {
                tracing::error!(error = %e, "dead-lettering a message that is not a valid job");
                let meta = Meta::from_properties(&delivery.properties);
                // Under its publisher's id, for `dead-letters` to name it.
                let id = delivery
                    .properties
                    .message_id()
                    .as_ref()
                    .map_or("?".to_string(), |id| id.to_string());
                dead_letter(&context, &delivery, &id, meta, "malformed", &e.to_string()).await;
            }
        }
    }
    if jobs.len() > 1 {
        let started = Instant::now();
        let by = start_by.iter().min().copied();
        let result = executing(jobs.len(), context.executor.execute_group(&jobs, by)).await;
        match result {
            Ok(Ok(outcomes)) => {
                for ((delivery, job), outcome) in deliveries.iter().zip(&jobs).zip(outcomes) {
                    conclude(&context, &channel, delivery, job, started, Ok(Ok(outcome))).await;
                }
                return;
            }
            // An outage is every job's: each waits for the database as it
            // would alone. No read slot came free in time: alone, each
            // would wait as long again.
            Ok(Err(
                e @ (JobError::Unavailable(_) | JobError::Lagging(_) | JobError::NoReadSlot(_)),
            )) => {
                for (delivery, job) in deliveries.iter().zip(&jobs) {
                    conclude(
                        &context,
                        &channel,
                        delivery,
                        job,
                        started,
                        Ok(Err(e.clone())),
                    )
                    .await;
                }
                return;
            }
            // Held past the earliest job's start-by: each goes on by its
            // own, alone below, and only those past theirs are handed back.
            Ok(Err(JobError::NotStarted(_))) => {}
            Ok(Err(e)) => {
                tracing::debug!(jobs = jobs.len(), error = %e, "a group of jobs failed; running them one by one");
            }
            Err(_panic) => {
                tracing::warn!(
                    jobs = jobs.len(),
                    "a group of jobs panicked; running them one by one"
                );
            }
        }
    }
    for ((delivery, job), by) in deliveries.iter().zip(&jobs).zip(start_by) {
        if !channel.status().connected() {
            return;
        }
        let started = Instant::now();
        let result = executing(1, context.executor.execute_by(job, Some(by))).await;
        conclude(&context, &channel, delivery, job, started, result).await;
    }
}

/// Runs `jobs` jobs' execution, counted in flight and with panics caught.
async fn executing<T>(
    jobs: usize,
    execution: impl Future<Output = Result<T, JobError>>,
) -> std::thread::Result<Result<T, JobError>> {
    let in_flight = metrics::gauge!(m::IN_FLIGHT);
    in_flight.increment(jobs as f64);
    let result = AssertUnwindSafe(execution).catch_unwind().await;
    in_flight.decrement(jobs as f64);
    result
}

/// Settles one executed delivery by its result, unless the `channel` it
/// came on is no longer connected ([`Pending::channel`]).
async fn conclude(
    context: &Context,
    channel: &lapin::Channel,
    delivery: &Delivery,
    job: &Job,
    started: Instant,
    result: std::thread::Result<Result<BatchOutcome, JobError>>,
) {
    let retry = context.executor.config().jobs.retry;
    let meta = Meta::from_properties(&delivery.properties);
    let id = job.id();
    if !channel.status().connected() {
        tracing::debug!(job = %id, "the broker connection it came on was lost: the broker has put it back, and its next delivery settles it");
        return;
    }
    let stream = stream_label(context.executor.config(), &job.stream);
    if !matches!(&result, Ok(Err(e)) if e.not_started()) {
        metrics::histogram!(m::JOB_DURATION, "stream" => stream.clone())
            .record(started.elapsed().as_secs_f64());
    }
    let finished = |o: &'static str| {
        metrics::counter!(m::JOBS, "stream" => stream.clone(), "outcome" => o).increment(1);
    };
    match result {
        Ok(Err(JobError::NotStarted(reason) | JobError::NoReadSlot(reason))) => {
            tracing::info!(job = %id, %reason, "handing the job back untried");
            hand_back(context, delivery, &id, &job.stream).await;
        }
        Ok(Ok(outcome)) if outcome.superseded => {
            tracing::info!(
                job = %id,
                "dropped: another run has claimed the stream since (started or re-opened); \
                 `sync --resume` of this job's run publishes its batch again"
            );
            finished("superseded");
            settle(delivery.ack(BasicAckOptions::default()).await);
        }
        Ok(Ok(outcome)) => {
            tracing::debug!(
                job = %id,
                attempt = meta.attempt,
                rows = outcome.rows_copied,
                deleted = outcome.rows_deleted,
                unchanged = outcome.rows_unchanged,
                ms = started.elapsed().as_millis() as u64,
                "batch done"
            );
            if outcome.finished_run {
                tracing::info!(run_id = job.run_id, "run finished");
            }
            finished("succeeded");
            if context.outage.swap(0, Ordering::Relaxed) > 0 {
                tracing::info!("databases reachable again");
            }
            settle(delivery.ack(BasicAckOptions::default()).await);
        }
        Ok(Err(JobError::Unavailable(reason) | JobError::Lagging(reason))) => {
            finished("waiting");
            wait_out_outage(context, delivery, &id, meta, &reason).await;
        }
        Ok(Err(JobError::Disconnected(reason)))
            if meta.lost_connections.saturating_add(1) < retry.max_attempts =>
        {
            finished("waiting");
            let meta = meta.lost_connection();
            wait_out_outage(context, delivery, &id, meta, &reason).await;
        }
        Ok(Err(JobError::BadValue(reason) | JobError::Conflict(reason)))
            if let Some((a, b)) = halves(job, meta, retry.max_attempts, &result) =>
        {
            let rows = [&a, &b].map(|j| j.select.as_ref().map_or(0, |s| s.values.len()));
            tracing::warn!(job = %id, ?rows, %reason, "a value of the event job is bad; splitting it in halves, so that only the values at fault are dead-lettered");
            finished("split");
            // New jobs, each with its attempts ahead of it (a unique
            // conflict is split only once its own are used up).
            let halves = Meta {
                attempt: 1,
                ..meta.split()
            };
            let copied = context
                .publisher
                .publish_jobs_as(&[a, b], halves.again(now_ms()))
                .await;
            let failed = "could not publish the job's halves; requeueing it";
            ack_if_copied(delivery, &id, copied, failed, true).await;
        }
        Ok(Err(JobError::Retry(reason) | JobError::Conflict(reason)))
            if meta.attempt < retry.max_attempts =>
        {
            let delay = retry.delay(meta.attempt);
            tracing::warn!(job = %id, attempt = meta.attempt, %reason, ?delay, "batch failed; retrying later");
            finished("retried");
            metrics::counter!(m::RETRIES, "stream" => stream.clone()).increment(1);
            if let Err(e) = context.executor.record_retry(job, &reason).await {
                tracing::debug!(job = %id, error = %e, "could not record the failed attempt");
            }
            park(context, delivery, &id, meta, delay, true).await;
        }
        Ok(Err(e)) => {
            let (kind, reason, meta) = match e {
                JobError::Reject(r) | JobError::BadValue(r) | JobError::ShapeChanged(r) => {
                    ("permanent", r, meta)
                }
                JobError::Conflict(r) => ("attempts exhausted", r, meta),
                // (Not begun: handed back above, never dead-lettered.)
                JobError::Retry(r)
                | JobError::Unavailable(r)
                | JobError::Lagging(r)
                | JobError::NotStarted(r)
                | JobError::NoReadSlot(r) => ("attempts exhausted", r, meta),
                JobError::Disconnected(r) => {
                    let meta = meta.lost_connection();
                    let r = format!(
                        "{r}; a database connection broke under this job {} times: \
                         a statement of it may be ending its own session or crashing the server",
                        meta.lost_connections
                    );
                    ("connection lost every time", r, meta)
                }
            };
            let recorded = format!("{reason} ({kind} after {} attempt(s))", meta.attempt);
            match context.executor.fail(job, &recorded).await {
                // Dead-lettered now, the batch would stay pending and its
                // run `running`: the job waits for the destination (or the
                // lock on its control schema) like any other, and fails
                // again, recorded, once it is back.
                Err(e) if e.class() != syncfleet_db::ErrorClass::Permanent => {
                    let reason = format!("could not record the failed batch: {e}");
                    finished("waiting");
                    wait_out_outage(context, delivery, &id, meta, &reason).await;
                    return;
                }
                Err(e) => {
                    tracing::error!(job = %id, error = %e, "could not record the failed batch")
                }
                // An attempt cut off after its commit (by its deadline,
                // say) did the job; failing it would dead-letter done work.
                Ok(false) => {
                    tracing::info!(job = %id, %reason, "the job's batch was done by an earlier attempt; acking it");
                    finished("succeeded");
                    settle(delivery.ack(BasicAckOptions::default()).await);
                    return;
                }
                Ok(true) => {}
            }
            tracing::error!(job = %id, attempt = meta.attempt, %reason, kind, "batch failed for good; dead-lettering it");
            finished("dead_lettered");
            dead_letter(context, delivery, &id, meta, kind, &reason).await;
        }
        Err(_panic) => {
            tracing::error!(job = %id, "job panicked; handing it back (the delivery limit stops a job that keeps doing so)");
            let requeue = BasicNackOptions {
                requeue: true,
                ..Default::default()
            };
            settle(delivery.nack(requeue).await);
        }
    }
}

/// How many times an event job is halved at most: a window of up to
/// `event_max_keys` rows is cut into at most 64 parts. Enough to keep all
/// but a few good rows out of the dead letters when one value is bad,
/// without a dead letter per row when every row fails alike (a column the
/// destination requires and the source leaves empty): at most 64, and 127
/// executions.
const MAX_SPLITS: u32 = 6;

/// The halves of an event job that failed on a bad value (see
/// [`JobError::BadValue`]; a [`JobError::Conflict`] once its attempts are
/// used up), if it has more than one row and halving budget left.
fn halves(
    job: &Job,
    meta: Meta,
    max_attempts: u32,
    result: &std::thread::Result<Result<BatchOutcome, JobError>>,
) -> Option<(Job, Job)> {
    let bad = match result {
        Ok(Err(JobError::BadValue(_))) => true,
        Ok(Err(JobError::Conflict(_))) => meta.attempt >= max_attempts,
        _ => false,
    };
    match bad && meta.splits < MAX_SPLITS {
        true => job.halves(),
        false => None,
    }
}

/// Parks a job that met an unreachable database, as the same attempt,
/// after a delay that grows while the outage lasts.
async fn wait_out_outage(
    context: &Context,
    delivery: &Delivery,
    id: &str,
    meta: Meta,
    reason: &str,
) {
    let streak = context.outage.fetch_add(1, Ordering::Relaxed) + 1;
    if streak == 1 {
        tracing::warn!(job = %id, %reason, "a database cannot take jobs for now (unreachable, a standby behind, or the control schema locked); jobs wait for it without using up attempts");
    }
    park(context, delivery, id, meta, OUTAGE.delay(streak), false).await;
}

/// Parks the job in a delay queue for `delay`, then acks it; if that
/// publish fails, hands it straight back instead.
async fn park(
    context: &Context,
    delivery: &Delivery,
    id: &str,
    meta: Meta,
    delay: Duration,
    counts: bool,
) {
    let copied = context
        .publisher
        .publish_retry(&delivery.data, id, meta, delay, counts)
        .await;
    let failed = "could not park the job for a retry; requeueing it";
    ack_if_copied(delivery, id, copied, failed, true).await;
}

/// Publishes the message to the dead-letter queue with why, then acks it.
/// If that publish fails, a reject makes the broker dead-letter it instead
/// (without syncfleet's reason, but not lost).
async fn dead_letter(
    context: &Context,
    delivery: &Delivery,
    id: &str,
    meta: Meta,
    kind: &str,
    reason: &str,
) {
    metrics::counter!(m::DEAD_LETTERS, "reason" => kind.to_string()).increment(1);
    let headers = meta.dead(kind, reason, now_ms());
    let copied = context
        .publisher
        .publish_dead(&delivery.data, id, headers)
        .await;
    let failed =
        "could not publish the dead letter; rejecting to the broker's dead-letter exchange";
    ack_if_copied(delivery, id, copied, failed, false).await;
}

/// Acks a delivery once its copy is published (confirmed) elsewhere; if
/// the publish `failed`, nacks it instead, back to its queue (`requeue`) or
/// to the queue's dead-letter exchange.
async fn ack_if_copied(
    delivery: &Delivery,
    id: &str,
    copied: Result<(), BrokerError>,
    failed: &str,
    requeue: bool,
) {
    match copied {
        Ok(()) => settle(delivery.ack(BasicAckOptions::default()).await),
        Err(e) => {
            tracing::warn!(job = %id, error = %e, "{failed}");
            settle(
                delivery
                    .nack(BasicNackOptions {
                        requeue,
                        ..Default::default()
                    })
                    .await,
            );
        }
    }
}

/// A failed settle is not lost work: the broker redelivers the job, and
/// executing it again is idempotent.
fn settle(result: Result<bool, lapin::Error>) {
    match result {
        Ok(true) => {}
        Ok(false) => tracing::warn!("delivery was already settled"),
        Err(e) => {
            tracing::debug!(error = %e, "could not settle a delivery; the broker will redeliver it")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use syncfleet_core::job::{NO_RUN, Selection};

    #[test]
    fn an_event_job_is_halved_on_a_bad_value_within_its_budget() {
        let job = Job::selection(
            NO_RUN,
            "s",
            1,
            Selection {
                columns: vec!["id".into()],
                values: (0..100).map(|i| vec![i.to_string()]).collect(),
            },
        );
        let bad = Ok(Err(JobError::BadValue("bad".into())));
        let conflict = Ok(Err(JobError::Conflict("taken".into())));
        let retry = Ok(Err(JobError::Retry("later".into())));
        let meta = |attempt, splits| Meta {
            attempt,
            splits,
            ..Meta::first()
        };
        assert!(halves(&job, meta(1, 0), 3, &bad).is_some());
        assert!(halves(&job, meta(1, MAX_SPLITS - 1), 3, &bad).is_some());
        assert!(halves(&job, meta(1, MAX_SPLITS), 3, &bad).is_none());
        // A conflict is retried first, and halved once its attempts are up.
        assert!(halves(&job, meta(2, 0), 3, &conflict).is_none());
        assert!(halves(&job, meta(3, 0), 3, &conflict).is_some());
        assert!(halves(&job, meta(3, 0), 3, &retry).is_none());
        let (a, _) = halves(&job, meta(1, 0), 3, &bad).unwrap();
        assert!(halves(&a, meta(1, 0).split(), 3, &bad).is_some());
    }

    #[test]
    fn small_jobs_share_a_group_and_large_ones_go_alone() {
        assert_eq!(group_len([1; 100].into_iter()), MAX_GROUP);
        assert_eq!(group_len([1; 40].into_iter()), 40);
        assert_eq!(group_len([100; 40].into_iter()), 10);
        assert_eq!(group_len([1_000; 3].into_iter()), 1);
        assert_eq!(group_len([10_000; 3].into_iter()), 1);
        // A job too large to join the group ends it; the next group starts
        // with it.
        assert_eq!(group_len([10, 10, 10_000, 10].into_iter()), 2);
        assert_eq!(group_len([u32::MAX, u32::MAX].into_iter()), 1);
        assert_eq!(group_len([5].into_iter()), 1);
        assert_eq!(group_len(std::iter::empty()), 0);
    }

    #[test]
    fn the_prefetch_leaves_room_for_groups_of_the_smallest_batches() {
        let config = |sizes: &[u32]| {
            let streams: String = sizes
                .iter()
                .enumerate()
                .map(|(i, n)| {
                    format!("[[stream]]\nname = \"s{i}\"\ntable = \"t{i}\"\nbatch_size = {n}\n")
                })
                .collect();
            let text = format!(
                "[source]\nurl = \"postgres://a@h/s\"\n[destination]\nurl = \"postgres://a@h/d\"\n\
                 [broker]\nurl = \"amqp://h\"\nprefix = \"p\"\n{streams}"
            );
            Config::parse("test.toml", &text, |_| None).unwrap()
        };
        assert_eq!(group_size(&config(&[10_000])), 1);
        assert_eq!(group_size(&config(&[1_000, 10_000])), 1);
        assert_eq!(group_size(&config(&[100, 10_000])), 10);
        assert_eq!(group_size(&config(&[1])), MAX_GROUP as u16);
    }
}
