//! Executing one job: converge one key range of the destination.
//!
//! Per job, whatever the batch size:
//! - source (one REPEATABLE READ, READ ONLY transaction): set the range
//!   bounds, then one `COPY (SELECT … WHERE range) TO STDOUT`;
//! - destination (one transaction): create the stage, `COPY` the source's
//!   bytes straight into it, one upsert (`MERGE`, or `INSERT … ON CONFLICT`
//!   before PostgreSQL 15), one `DELETE` of rows the source no longer has
//!   in the range, and marking the batch done. Then commit; only then is
//!   the job acknowledged.
//!
//! Rows travel in PostgreSQL's own text COPY format and are never decoded
//! here, so every type (enums, domains, arrays, intervals, …) arrives as the
//! source had it, and memory stays at one in-flight chunk per job.
//!
//! Every job runs under its stream's deadline. Transient errors are retried
//! here a few times with exponential backoff and full jitter, all within
//! the deadline. When the deadline passes, the running statements are
//! cancelled *on the server* (dropping a future would leave them running),
//! the destination transaction rolls back with its connection, and the job
//! goes back to the broker for a later attempt.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder, Retryable};
use deadpool_postgres::Object;
use futures_util::{SinkExt, StreamExt};
use syncfleet_core::Config;
use syncfleet_core::backoff::full_jitter;
use syncfleet_core::config::StreamConfig;
use syncfleet_core::job::{Job, NO_RUN};
use syncfleet_core::metrics as m;
use syncfleet_db::pool::Client;
use syncfleet_db::sql::{self, Binding, RangePredicate};
use syncfleet_db::{Pool, Role, StreamShape, control};
use tokio_postgres::NoTls;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;

use crate::error::JobError;
use crate::throttle::ReadGate;

/// Quick retries of a transient error inside the worker, before the job
/// goes back to the broker.
const IN_WORKER_RETRIES: usize = 3;
/// Bound on asking the server to cancel a statement.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(5);

/// A read-gate permit that goes back to the gate however the job ends,
/// a panic included (the worker catches job panics and carries on, and a
/// lost permit would shrink the gate for good).
struct GatePermit<'a> {
    gate: &'a ReadGate,
    permit: Option<crate::throttle::Permit>,
    rows: u64,
}

impl Drop for GatePermit<'_> {
    fn drop(&mut self) {
        if let Some(permit) = self.permit.take() {
            self.gate.finish(permit, self.rows);
        }
    }
}

/// Waits for one of the fleet's `slots` source-read slots: transaction-level
/// advisory locks in the destination, which every worker of the fleet
/// shares, so the ceiling holds however many processes run, and a slot is
/// released with its transaction even if the worker dies. The deadline
/// around the job bounds the wait. `statement` is [`sql::TAKE_READ_SLOT`].
///
/// Between tries it sleeps a random time up to 1, 2, 4 … 32 ms: a slot held
/// by a short job is free again within a few milliseconds, one held by a
/// 10,000-row batch for a second or more, and the waiters of the whole
/// fleet should neither miss the first nor poll the second hard.
async fn take_read_slot(
    client: &Client,
    statement: &tokio_postgres::Statement,
    slots: i32,
    namespace: &str,
) -> Result<(), JobError> {
    let mut cap_ms = 1;
    loop {
        tokio::time::sleep(Duration::from_micros(fastrand::u64(500..=cap_ms * 1000))).await;
        cap_ms = (cap_ms * 2).min(32);
        let start = fastrand::i32(0..slots);
        if client
            .query_opt(statement, &[&slots, &namespace, &start])
            .await?
            .is_some()
        {
            return Ok(());
        }
    }
}

/// A unique violation while inserting rows this job saw as new: another
/// job wrote them since (a replay racing its original). Not permanent: the
/// next attempt sees them and merges.
fn raced(e: tokio_postgres::Error) -> JobError {
    match e.code() {
        Some(&SqlState::UNIQUE_VIOLATION) => JobError::Retry(format!(
            "rows of the range were written concurrently: {}",
            syncfleet_db::error::describe(&e)
        )),
        _ => JobError::from(e),
    }
}

/// What one job did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchOutcome {
    /// Rows read from the source range and upserted.
    pub rows_copied: u64,
    /// Destination rows in the range the source no longer has.
    pub rows_deleted: u64,
    /// This job's commit completed its run.
    pub finished_run: bool,
}

/// Executes jobs against the source and destination pools.
pub struct Executor {
    /// Names this worker in the control schema (`batches.worker`) and logs:
    /// the host (the pod name under Kubernetes), the process and an instance
    /// number, since one process may run several executors.
    id: String,
    config: Arc<Config>,
    source: Pool,
    destination: Pool,
    /// Stream shapes described once per process. An entry is dropped when a
    /// job of its stream fails, so a changed source schema is seen again.
    shapes: Mutex<HashMap<String, Arc<StreamShape>>>,
    /// Every source read of this process passes this gate (adaptive
    /// throttle, rows per second).
    gate: Arc<ReadGate>,
}

impl Executor {
    /// Connects both pools (and fails fast, naming the server, if either
    /// database is unreachable).
    /// Reads go to `source.replica_url` when one is set.
    pub async fn connect(config: Arc<Config>) -> Result<Self, syncfleet_db::DbError> {
        let source = match &config.reads.replica_url {
            Some(url) => {
                let replica = syncfleet_core::config::DbConfig {
                    url: url.clone(),
                    ..config.source.clone()
                };
                Pool::connect(Role::Source, &replica).await?
            }
            None => Pool::connect(Role::Source, &config.source).await?,
        };
        let destination = Pool::connect(Role::Destination, &config.destination).await?;
        Ok(Self::new(config, source, destination))
    }

    pub fn new(config: Arc<Config>, source: Pool, destination: Pool) -> Self {
        static INSTANCE: AtomicU32 = AtomicU32::new(0);
        let host = std::env::var("HOSTNAME")
            .ok()
            .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "worker".into());
        let id = format!(
            "{host}:{}:{}",
            std::process::id(),
            INSTANCE.fetch_add(1, Ordering::Relaxed)
        );
        Self {
            id,
            source,
            destination,
            shapes: Mutex::new(HashMap::new()),
            gate: Arc::new(ReadGate::new(
                config.worker.concurrency,
                config.reads.throttle.as_ref(),
                config.reads.max_rows_per_second,
            )),
            config,
        }
    }

    pub fn gate(&self) -> &Arc<ReadGate> {
        &self.gate
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn source(&self) -> &Pool {
        &self.source
    }

    pub fn destination(&self) -> &Pool {
        &self.destination
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Executes one job; see the module docs for the statements it runs.
    pub async fn execute(&self, job: &Job) -> Result<BatchOutcome, JobError> {
        let stream = self.config.stream(&job.stream).ok_or_else(|| {
            JobError::Reject(format!(
                "job {} names stream '{}', which this worker's config does not have",
                job.id(),
                job.stream
            ))
        })?;
        let deadline = Instant::now() + stream.deadline;
        let backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(2))
            .with_max_times(IN_WORKER_RETRIES)
            .build()
            .map(full_jitter as fn(Duration) -> Duration);
        let attempts = (|| self.attempt(stream, job, deadline))
            .retry(backoff)
            .sleep(tokio::time::sleep)
            .when(|e| !matches!(e, JobError::Reject(_)) && Instant::now() < deadline)
            .notify(|e, delay| {
                tracing::debug!(job = %job.id(), error = %e, ?delay, "retrying in this worker");
            });
        // Each attempt stops itself at the deadline (cancelling its
        // statements); this outer bound only catches what lies between
        // attempts, so it must not fire first and skip that cancel.
        let outer = deadline + CANCEL_TIMEOUT + Duration::from_secs(1);
        // Waiting for the gate is not part of the job's deadline: the job
        // has not touched the source yet.
        let mut permit = GatePermit {
            gate: &self.gate,
            permit: Some(self.gate.acquire().await),
            rows: 0,
        };
        let result = tokio::time::timeout_at(outer.into(), attempts).await;
        if let Ok(Ok(outcome)) = &result {
            permit.rows = outcome.rows_copied;
        }
        drop(permit);
        let result = match result {
            Ok(result) => result,
            Err(_) => Err(JobError::Retry(format!(
                "deadline of {:?} passed",
                stream.deadline
            ))),
        };
        if result.is_err() {
            self.shapes
                .lock()
                .expect("shape cache")
                .remove(&stream.name);
        }
        result
    }

    async fn shape(&self, stream: &StreamConfig) -> Result<Arc<StreamShape>, JobError> {
        if let Some(shape) = self.shapes.lock().expect("shape cache").get(&stream.name) {
            return Ok(shape.clone());
        }
        let shape = Arc::new(StreamShape::describe(&**self.source.get().await?, stream).await?);
        self.shapes
            .lock()
            .expect("shape cache")
            .insert(stream.name.clone(), shape.clone());
        Ok(shape)
    }

    /// One attempt, cut off at `deadline` with a server-side cancel.
    async fn attempt(
        &self,
        stream: &StreamConfig,
        job: &Job,
        deadline: Instant,
    ) -> Result<BatchOutcome, JobError> {
        let shape = self.shape(stream).await?;
        let mut src = self.source.get().await?;
        let mut dst = self.destination.get().await?;
        let cancel = [src.cancel_token(), dst.cancel_token()];
        let converge = self.converge(&shape, stream, job, &mut src, &mut dst);
        match tokio::time::timeout_at(deadline.into(), converge).await {
            Ok(Ok(outcome)) => Ok(outcome),
            Ok(Err(e)) => {
                // A statement failed, possibly in the middle of a COPY: the
                // protocol state of these connections is not worth trusting
                // to the next job, so they are closed, not pooled.
                drop(Object::take(src));
                drop(Object::take(dst));
                Err(e)
            }
            Err(_) => {
                for token in cancel {
                    if let Err(e) = tokio::time::timeout(CANCEL_TIMEOUT, token.cancel_query(NoTls))
                        .await
                        .unwrap_or(Ok(()))
                    {
                        tracing::warn!(job = %job.id(), error = %e, "could not cancel a statement past its deadline");
                    }
                }
                // Mid-statement connections never go back to the pool: closing
                // them also rolls the destination transaction back.
                drop(Object::take(src));
                drop(Object::take(dst));
                Err(JobError::Retry(format!(
                    "deadline of {:?} passed; its statements were cancelled",
                    stream.deadline
                )))
            }
        }
    }

    async fn converge(
        &self,
        shape: &StreamShape,
        stream: &StreamConfig,
        job: &Job,
        src: &mut Client,
        dst: &mut Client,
    ) -> Result<BatchOutcome, JobError> {
        let table = &stream.destination_table;
        let predicate = |alias, binding| match &job.select {
            Some(select) => RangePredicate::selection(shape, alias, select, binding)
                .map_err(|e| JobError::Reject(format!("job {}: {e}", job.id()))),
            None => Ok(RangePredicate::new(shape, alias, &job.range, binding)),
        };
        let mut source_range = predicate("q", Binding::Settings)?;
        // Read once per job: a batch keeps the pace it started with.
        let pace = self.gate.pace();
        for (name, value) in pace.iter().flat_map(|p| p.settings()) {
            source_range.settings.0.push(name);
            source_range.settings.1.push(value);
        }
        let dest_range = predicate("d", Binding::Params { first: 1 })?;
        let params: Vec<&(dyn ToSql + Sync)> = dest_range
            .params
            .iter()
            .map(|p| p as &(dyn ToSql + Sync))
            .collect();

        // Statements are prepared first (once per connection: the text of
        // each depends only on the stream, the range's form and the pace,
        // values travelling as parameters or settings), so that what
        // follows can be pipelined: requests joined with `biased;` are sent
        // in the order written, on their first poll, and share one round
        // trip. That order matters: `BEGIN` must reach the server before
        // the settings and the advisory lock that live in its transaction.
        //
        // The transactions are begun by hand, not through a guard: any
        // error closes both connections (see `attempt`), which rolls back.
        let (source_statements, destination_statements) = tokio::try_join!(
            async {
                let set = match source_range.settings.0.is_empty() {
                    true => None,
                    false => Some(src.prepare_cached(sql::SET_SETTINGS).await?),
                };
                let copy = sql::copy_out(shape, &source_range, pace.is_some());
                Ok::<_, tokio_postgres::Error>((set, src.prepare_cached(&copy).await?))
            },
            async {
                let slot = dst.prepare_cached(sql::TAKE_READ_SLOT).await?;
                // Cached for the pipelined commit at the end.
                dst.prepare_cached(control::COMPLETE_BATCH).await?;
                dst.prepare_cached(control::TRY_FINISH_RUN).await?;
                let settings = dst.prepare_cached(sql::SET_SETTINGS).await?;
                let empty = dst
                    .prepare_cached(&sql::range_is_empty(shape, table, &dest_range))
                    .await?;
                Ok::<_, tokio_postgres::Error>((slot, settings, empty))
            },
        )?;
        let (set_source, copy_out) = source_statements;
        let (slot, set_destination, is_empty) = destination_statements;
        let pace_settings: Option<(Vec<String>, Vec<String>)> =
            pace.map(|p| p.settings().into_iter().unzip());

        // The destination transaction holds this read's slot of the
        // fleet-wide ceiling until it ends, however it ends, and the slot is
        // taken before the source query starts.
        let destination_ready = async {
            let begin = dst.batch_execute("BEGIN");
            let slots = self.config.reads.max_concurrent.map(|n| n as i32);
            let namespace = format!("syncfleet.reads/{}", self.config.broker.prefix);
            let first_try = async {
                match slots {
                    Some(n) => Ok(dst
                        .query_opt(&slot, &[&n, &namespace, &fastrand::i32(0..n)])
                        .await?
                        .is_some()),
                    None => Ok(true),
                }
            };
            // A paced batch is merged at the same pace: on a machine the
            // two databases share, the merge's burst would undo the read's.
            let settings = async {
                if let Some((names, values)) = &pace_settings {
                    dst.execute(&set_destination, &[names, values]).await?;
                }
                Ok(())
            };
            let empty = async { Ok(dst.query_one(&is_empty, &params).await?.get::<_, bool>(0)) };
            let ((), got_slot, (), empty) =
                tokio::try_join!(biased; begin, first_try, settings, empty)?;
            if let (false, Some(n)) = (got_slot, slots) {
                take_read_slot(dst, &slot, n, &namespace).await?;
            }
            Ok::<_, JobError>(empty)
        };
        let empty = destination_ready.await?;
        // A selection on another column (an event's `users = "user_id"`)
        // says nothing about keys: "no row with that user_id" does not mean
        // "no row with those keys", so it always merges.
        let by_key = job
            .select
            .as_ref()
            .is_none_or(|s| s.columns.iter().map(String::as_str).eq(shape.key_names()));
        let empty = empty && by_key;
        let read_started = Instant::now();
        // The range's bounds and the COPY that reads them, in one round trip
        // and in one transaction: separate statements could reach different
        // server sessions behind a transaction-pooling proxy (PgBouncer),
        // and the COPY read another job's range.
        let begin = src.batch_execute(syncfleet_db::pool::READ_SNAPSHOT);
        let bounds = async {
            if let Some(statement) = &set_source {
                src.execute(
                    statement,
                    &[&source_range.settings.0, &source_range.settings.1],
                )
                .await?;
            }
            Ok(())
        };
        let ((), (), rows) = tokio::try_join!(biased; begin, bounds, src.copy_out(&copy_out))?;
        let bytes = metrics::counter!(m::BYTES, "stream" => stream.name.clone());
        let rows = rows.inspect(move |chunk| {
            if let Ok(chunk) = chunk {
                bytes.increment(chunk.len() as u64);
            }
        });
        let rows = rows.peekable();
        futures_util::pin_mut!(rows);
        // A range the source has no rows in needs no COPY on the
        // destination: nothing to write, or only a range to clear.
        let source_empty = rows.as_mut().peek().await.is_none();
        let source_read = metrics::histogram!(m::SOURCE_READ, "stream" => stream.name.clone());
        let (rows_copied, rows_deleted, copy_done) = if source_empty {
            source_read.record(read_started.elapsed().as_secs_f64());
            let deleted = if empty || !by_key {
                0
            } else {
                let statement = dst
                    .prepare_cached(&sql::delete_range(table, &dest_range))
                    .await?;
                dst.execute(&statement, &params).await?
            };
            (0, deleted, Instant::now())
        } else if empty {
            // Fast path (an initial load): nothing to update or delete, so
            // the rows go straight into the table.
            let statement = dst
                .prepare_cached(&sql::copy_in(shape, &table.to_string()))
                .await?;
            let sink = dst.copy_in(&statement).await?;
            futures_util::pin_mut!(sink);
            let copied = async {
                sink.as_mut().send_all(&mut rows).await?;
                sink.finish().await
            }
            .await
            .inspect(|_| source_read.record(read_started.elapsed().as_secs_f64()))
            .map_err(raced)?;
            (copied, 0, Instant::now())
        } else {
            dst.batch_execute(&sql::create_stage(shape, table)).await?;
            let statement = dst.prepare_cached(&sql::copy_in_stage(shape)).await?;
            let stage = dst.copy_in(&statement).await?;
            futures_util::pin_mut!(stage);
            stage.as_mut().send_all(&mut rows).await?;
            let copied = stage.finish().await?;
            let copy_done = Instant::now();
            source_read.record(read_started.elapsed().as_secs_f64());
            let how = match self.destination.has_merge() {
                true => sql::Upsert::Merge,
                false => sql::Upsert::OnConflict,
            };
            let statement = dst
                .prepare_cached(&sql::upsert(shape, table, pace.is_some(), how))
                .await?;
            dst.execute(&statement, &[]).await.map_err(raced)?;
            // Only a range or a key selection owns the rows it names: a row
            // missing from a selection on another column may merely have
            // moved (a profile now under another user), so deletes are left
            // to key-based jobs and full runs.
            let deleted = if by_key {
                dst.execute(
                    &dst.prepare_cached(&sql::delete_missing(
                        shape,
                        table,
                        &dest_range,
                        pace.is_some(),
                    ))
                    .await?,
                    &params,
                )
                .await?
            } else {
                0
            };
            (copied, deleted, copy_done)
        };
        // Marking the batch done, the COMMIT and the run-finished check
        // are pipelined on one connection, so the check runs after the
        // commit and sees this batch done, with every batch committed
        // before: of the workers committing a run's last batches at once,
        // the last to commit sees none left. (Both statements were
        // prepared with the set-up, so each call below sends at once.)
        // Event jobs belong to no run: nothing to record.
        let destination_commit = async {
            let complete = async {
                match job.run_id {
                    NO_RUN => Ok(true),
                    run_id => {
                        control::complete_batch(
                            &*dst,
                            run_id,
                            &job.stream,
                            job.batch,
                            rows_copied as i64,
                            rows_deleted as i64,
                            &self.id,
                        )
                        .await
                    }
                }
            };
            let commit = dst.batch_execute("COMMIT");
            let finish = async {
                match job.run_id {
                    NO_RUN => Ok(false),
                    run_id => control::try_finish_run(&*dst, run_id).await,
                }
            };
            let (known, committed, finished) = tokio::join!(biased; complete, commit, finish);
            // Checked first: after a failed statement the server answers
            // COMMIT by rolling back, and reports that as a success.
            let known = known?;
            committed?;
            if !known {
                // Its run is gone from the control schema. Writing the
                // range was harmless (every write converges it to the
                // source); the job itself cannot be recorded.
                return Err(JobError::Reject(format!(
                    "job {} names a batch the control schema does not have",
                    job.id()
                )));
            }
            // The batch is committed: from here on an error must not fail
            // the job; the next batch or `status` finishes the run.
            Ok::<_, JobError>(finished.unwrap_or_else(|e| {
                tracing::warn!(run_id = job.run_id, error = %e, "could not check whether the run finished");
                false
            }))
        };
        let source_commit = async { Ok::<_, JobError>(src.batch_execute("COMMIT").await?) };
        let (finished_run, ()) = tokio::try_join!(destination_commit, source_commit)?;
        // The merge and the commit: what the destination spends after the COPY.
        metrics::histogram!(m::DESTINATION_WRITE, "stream" => stream.name.clone())
            .record(copy_done.elapsed().as_secs_f64());
        metrics::counter!(m::ROWS, "stream" => stream.name.clone()).increment(rows_copied);
        Ok(BatchOutcome {
            rows_copied,
            rows_deleted,
            finished_run,
        })
    }

    /// Records a job that cannot succeed: its batch and run become failed.
    pub async fn fail(&self, job: &Job, reason: &str) -> Result<(), syncfleet_db::DbError> {
        let mut client = self.destination.get().await?;
        control::fail_batch(&mut client, job.run_id, &job.stream, job.batch, reason).await
    }

    /// Records a failed attempt that will be retried through the broker.
    pub async fn record_retry(&self, job: &Job, reason: &str) -> Result<(), syncfleet_db::DbError> {
        let client = self.destination.get().await?;
        control::record_retry(&**client, job.run_id, &job.stream, job.batch, reason).await
    }
}
