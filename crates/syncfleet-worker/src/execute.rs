//! Executing jobs: each converges one key range of the destination.
//!
//! Per job, whatever the batch size:
//! - source (in a REPEATABLE READ, READ ONLY transaction): set the range
//!   bounds, then one `COPY (SELECT … WHERE range) TO STDOUT` (preceded by
//!   the range's fingerprint when comparing);
//! - destination (in a transaction): take the write locks that order jobs
//!   over the same rows, and check that the job's run still holds its
//!   stream (a job of a run abandoned and superseded since is dropped,
//!   unread); check whether the range is empty
//!   there (for a range job of a large batch, by taking the range's
//!   fingerprint, and if it holds rows comparing it with the source's,
//!   taken beside it or after it, see [`crate::unchanged`]: equal means
//!   done, and a re-sync of unchanged rows writes nothing);
//!   then either `COPY` the source's bytes straight into the table, or
//!   into a stage followed by one upsert (`MERGE`, or `INSERT … ON
//!   CONFLICT` before PostgreSQL 15) and one `DELETE` of rows the source no
//!   longer has in the range; then mark the batch done. Then commit; only
//!   then is the job acknowledged.
//!
//! Small jobs share their transactions ([`Executor::execute_group`]): one
//! `BEGIN`, read slot, done-mark statement and `COMMIT` on each side serve
//! the whole group, which commits all or nothing.
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

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder, Retryable};
use deadpool_postgres::Object;
use futures_util::{SinkExt, StreamExt};
use syncfleet_core::Config;
use syncfleet_core::backoff::full_jitter;
use syncfleet_core::config::StreamConfig;
use syncfleet_core::job::{Job, Lsn, NO_RUN};
use syncfleet_core::metrics as m;
use syncfleet_db::pool::{CANCEL_TIMEOUT, Client};
use syncfleet_db::sql::{self, Binding, RangePredicate};
use syncfleet_db::{Pool, Role, StreamShape, ceiling, control};
use tokio_postgres::types::ToSql;

use crate::error::JobError;
use crate::throttle::ReadGate;
use crate::unchanged::{Compare, Found};

/// Quick retries of a transient error inside the worker, before the job
/// goes back to the broker.
const IN_WORKER_RETRIES: usize = 3;

/// A read-gate permit that goes back to the gate however the job ends,
/// a panic included (the worker catches job panics and carries on, and a
/// lost permit would shrink the gate for good).
struct GatePermit<'a> {
    gate: &'a ReadGate,
    permit: Option<crate::throttle::Permit>,
}

impl Drop for GatePermit<'_> {
    fn drop(&mut self) {
        if let Some(permit) = self.permit.take() {
            self.gate.finish(permit);
        }
    }
}

/// A pooled connection that goes back to the pool only when its attempt
/// ended cleanly ([`Unpooled::keep`]). Any other way out (an error, the
/// deadline, a panic the worker catches, a job aborted at shutdown) closes
/// it, which also rolls its transaction back: the next job must not get a
/// connection in the middle of a transaction, a `COPY` or a cancelled
/// statement. And cancels what may still run on it: the driver closes a
/// dropped connection only once every pending response has come, so a
/// statement left running (a lock or slot wait, a paced merge) would go on
/// holding the job's locks until it ended by itself.
struct Unpooled {
    client: Option<Client>,
    tls: syncfleet_db::tls::Tls,
}

/// Cancels of dropped connections not sent yet, for a stopping worker to
/// wait for ([`cancels_sent`]).
static CANCELS: AtomicUsize = AtomicUsize::new(0);

impl Unpooled {
    fn new(client: Client, tls: syncfleet_db::tls::Tls) -> Self {
        Unpooled {
            client: Some(client),
            tls,
        }
    }

    fn get(&mut self) -> &mut Client {
        self.client.as_mut().expect("held until kept or dropped")
    }

    /// Back to the pool.
    fn keep(mut self) {
        self.client.take();
    }

    /// Closed, once what runs on it is cancelled (within [`CANCEL_TIMEOUT`]).
    async fn cancel(mut self) -> Result<(), tokio_postgres::Error> {
        match self.close() {
            Some(cancel) => cancel.await,
            None => Ok(()),
        }
    }

    /// Takes the connection out of the pool, closing it, and gives the
    /// cancel of what may still run on it; `None` once kept or closed.
    fn close(
        &mut self,
    ) -> Option<impl Future<Output = Result<(), tokio_postgres::Error>> + Send + 'static> {
        let client = self.client.take()?;
        let token = client.cancel_token();
        drop(Object::take(client));
        let tls = self.tls.clone();
        Some(async move {
            tokio::time::timeout(CANCEL_TIMEOUT, token.cancel_query(tls))
                .await
                .unwrap_or(Ok(()))
        })
    }
}

impl Drop for Unpooled {
    fn drop(&mut self) {
        let Some(cancel) = self.close() else {
            return;
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            // Counted down however the task ends, also dropped unpolled
            // by a runtime shutting down.
            struct Sent;
            impl Drop for Sent {
                fn drop(&mut self) {
                    CANCELS.fetch_sub(1, Ordering::Relaxed);
                }
            }
            CANCELS.fetch_add(1, Ordering::Relaxed);
            let sent = Sent;
            runtime.spawn(async move {
                let _sent = sent;
                let _ = cancel.await;
            });
        }
    }
}

/// Waits, at most [`CANCEL_TIMEOUT`], until the cancels of the connections
/// that jobs dropped have been sent: a worker's last step, after aborting
/// the jobs still running past its shutdown grace.
pub async fn cancels_sent() {
    let by = Instant::now() + CANCEL_TIMEOUT;
    while CANCELS.load(Ordering::Relaxed) > 0 && Instant::now() < by {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Why a job waits for its standby beyond where it was made.
const EARLIER_READ: &str = "as far as an earlier job of its stream may have read another standby";

/// Waits until the standby `src` has replayed the source's WAL up to `lsn`
/// (`why`: what that position is), until `by` at the latest; past it the
/// jobs wait in the broker, as for an outage.
async fn replayed_to(src: &Client, lsn: Lsn, by: Instant, why: &str) -> Result<(), JobError> {
    let replayed = src.prepare_cached(syncfleet_db::pool::REPLAYED).await?;
    let lsn = lsn.to_string();
    let mut pause = Duration::from_millis(10);
    loop {
        if src.query_one(&replayed, &[&lsn]).await?.get::<_, bool>(0) {
            return Ok(());
        }
        if Instant::now() >= by {
            return Err(JobError::Lagging(format!(
                "the source's standby (replica_url) has not replayed the WAL up to {lsn}, {why}, \
                 by half the job's deadline"
            )));
        }
        tokio::time::sleep(full_jitter(pause).min(by.saturating_duration_since(Instant::now())))
            .await;
        pause = (pause * 2).min(Duration::from_millis(500));
    }
}

/// A stream's shape as described for a job of `run_id`.
struct CachedShape {
    shape: Arc<StreamShape>,
    run_id: i64,
    described: Instant,
}

/// The streams' shapes as last described, and how often each was
/// forgotten: a description begun before its stream was last forgotten is
/// not kept, since it may predate the change that failed a job.
#[derive(Default)]
struct Shapes {
    cached: HashMap<String, CachedShape>,
    forgotten: HashMap<String, u64>,
}

impl Shapes {
    fn forget(&mut self, stream: &str) {
        self.cached.remove(stream);
        *self.forgotten.entry(stream.to_string()).or_default() += 1;
    }

    fn generation(&self, stream: &str) -> u64 {
        self.forgotten.get(stream).copied().unwrap_or(0)
    }
}

/// The column names of a destination table (none if it does not exist).
const DESTINATION_COLUMNS: &str = "SELECT coalesce(array_agg(attname::text), '{}') FROM pg_attribute \
     WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped";

/// How long event jobs (of no run) go by one description of their stream.
const EVENT_SHAPE_AGE: Duration = Duration::from_secs(60);

/// One job of a transaction, with what it needs.
#[derive(Clone, Copy)]
struct Work<'a> {
    job: &'a Job,
    stream: &'a StreamConfig,
    shape: &'a StreamShape,
}

/// Batches of fewer rows do not compare fingerprints: for them the extra
/// round trips cost more than the rows (see [`crate::unchanged`]).
const COMPARE_MIN_ROWS: u32 = 1000;

/// What one job wrote, before its transaction commits.
struct RangeDone {
    rows_copied: u64,
    rows_deleted: u64,
    rows_unchanged: u64,
    /// When its rows were in; the destination's time after it is the write's.
    copy_done: Instant,
    /// The source transaction was committed before the merge.
    source_ended: bool,
}

/// What one job did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchOutcome {
    /// Rows read from the source range and upserted.
    pub rows_copied: u64,
    /// Destination rows in the range the source no longer has.
    pub rows_deleted: u64,
    /// Rows not copied because the range was found equal on both sides.
    pub rows_unchanged: u64,
    /// This job's commit completed its run.
    pub finished_run: bool,
    /// Its run no longer holds its stream (another run started, or was
    /// re-opened, after this one stopped going): nothing was read or
    /// written, and the batch is left as it was.
    pub superseded: bool,
}

impl BatchOutcome {
    const SUPERSEDED: Self = Self {
        rows_copied: 0,
        rows_deleted: 0,
        rows_unchanged: 0,
        finished_run: false,
        superseded: true,
    };
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
    /// Stream shapes, each described for the run whose job asked first (see
    /// [`Executor::shape`]). An entry is also dropped when a job of its
    /// stream fails, so a changed source schema is seen again.
    shapes: Mutex<Shapes>,
    /// One description of a stream at a time: the jobs that begin a run
    /// together wait for the first one's instead of each describing it.
    describing: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Every source read of this process passes this gate (adaptive
    /// throttle, rows per second).
    gate: Arc<ReadGate>,
    /// Which streams' ranges are worth comparing before copying.
    odds: crate::unchanged::Odds,
    /// Both servers can fingerprint a range.
    fingerprints: bool,
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
        let id = format!(
            "{}:{}",
            syncfleet_db::pool::process_name(),
            INSTANCE.fetch_add(1, Ordering::Relaxed)
        );
        Self {
            id,
            fingerprints: source.has_row_hash() && destination.has_row_hash(),
            source,
            destination,
            shapes: Mutex::new(Shapes::default()),
            describing: Mutex::new(HashMap::new()),
            odds: Default::default(),
            gate: Arc::new(ReadGate::new(
                config.worker.concurrency,
                config.reads.max_concurrent,
                config.reads.throttle.as_ref(),
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
        self.execute_by(job, None).await
    }

    /// Executes one job that must begin by `start_by` (see
    /// [`Self::execute_group`]).
    pub async fn execute_by(
        &self,
        job: &Job,
        start_by: Option<Instant>,
    ) -> Result<BatchOutcome, JobError> {
        let mut outcomes = self
            .execute_group(std::slice::from_ref(job), start_by)
            .await?;
        Ok(outcomes.pop().expect("one outcome per job"))
    }

    /// Executes jobs together: one source snapshot, one destination
    /// transaction and one read slot for all of them, so small jobs share
    /// the fixed cost of a transaction. They commit together or not at all,
    /// under the earliest of their deadlines. A lost connection is retried
    /// here a few times, and so is any transient error of a single job; a
    /// group's other errors are not: its caller runs the jobs one by one
    /// instead, which also tells which of them failed.
    ///
    /// The jobs begin once the read gate lets them, and not after
    /// `start_by`: past it they would not finish before the broker takes
    /// their deliveries back, and they end [`JobError::NotStarted`]. If no
    /// fleet read slot comes free by half their deadline (or by
    /// `start_by`), they end [`JobError::NoReadSlot`].
    pub async fn execute_group(
        &self,
        jobs: &[Job],
        start_by: Option<Instant>,
    ) -> Result<Vec<BatchOutcome>, JobError> {
        let streams = jobs
            .iter()
            .map(|job| {
                self.config.stream(&job.stream).ok_or_else(|| {
                    JobError::Reject(format!(
                        "job {} names stream '{}', which this worker's config does not have",
                        job.id(),
                        job.stream
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let budget = streams
            .iter()
            .map(|s| s.deadline)
            .min()
            .ok_or_else(|| JobError::Reject("an empty group of jobs".into()))?;
        // Waiting for the gate is not part of the job's deadline: the job
        // has not touched the source yet. The broker's consumer timeout
        // bounds it, through `start_by`.
        let late = || {
            JobError::NotStarted(
                "it could no longer finish within the broker's consumer timeout (held at the read \
                 gate, or behind the other jobs of a failed group)"
                    .into(),
            )
        };
        let acquire = self.gate.acquire();
        let permit = match start_by {
            None => acquire.await,
            // A free gate would let a job that is already late through.
            Some(by) if Instant::now() >= by => return Err(late()),
            Some(by) => tokio::time::timeout_at(by.into(), acquire)
                .await
                .map_err(|_| late())?,
        };
        let permit = GatePermit {
            gate: &self.gate,
            permit: Some(permit),
        };
        let deadline = Instant::now() + budget;
        // The other half is the work's. A job that waits longer for a read
        // slot (many workers, a low ceiling) is handed back untried: timed
        // out, it would use up an attempt each time and, in a fleet busy
        // long enough, be dead-lettered without ever having run.
        let slot_by = (deadline - budget / 2).min(start_by.unwrap_or(deadline));
        let backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(2))
            .with_max_times(IN_WORKER_RETRIES)
            .build()
            .map(full_jitter as fn(Duration) -> Duration);
        // An unreachable database is the whole group's; any other error may
        // be one job's, which its caller finds by running the jobs alone. A
        // connection that broke under the job is not retried here: if the
        // job broke it, each retry would do so again.
        let retried = |e: &JobError| match e {
            JobError::Unavailable(_) | JobError::ShapeChanged(_) => true,
            JobError::Retry(_) | JobError::Conflict(_) => jobs.len() == 1,
            JobError::Reject(_)
            | JobError::BadValue(_)
            | JobError::Disconnected(_)
            | JobError::Lagging(_)
            | JobError::NotStarted(_)
            | JobError::NoReadSlot(_) => false,
        };
        // A failed attempt describes its streams again: the error may have
        // come from a column added or dropped since. (Not one that did not
        // begin, or found a database down: in a busy fleet, each hand-back
        // would describe the stream again.)
        let tries = AtomicU32::new(0);
        // The last error of an attempt that began: a retry handed back
        // untried (its slot or connections not had in time) must not hide
        // it, or a job failing late in its deadline would be handed back,
        // as the same attempt, for ever.
        let failed: std::sync::Mutex<Option<JobError>> = std::sync::Mutex::new(None);
        let attempt = || async {
            let result = self
                .attempt(&streams, jobs, deadline, budget, slot_by)
                .await;
            // Attempts that began: one handed back untried described
            // nothing anew.
            if !matches!(&result, Err(e) if e.not_started()) {
                tries.fetch_add(1, Ordering::Relaxed);
            }
            if let Err(e) = &result
                && !e.not_started()
            {
                *failed.lock().expect("last error") = Some(e.clone());
                if !matches!(e, JobError::Unavailable(_) | JobError::Lagging(_)) {
                    let mut shapes = self.shapes.lock().expect("shape cache");
                    for stream in &streams {
                        shapes.forget(&stream.name);
                    }
                }
            }
            result
        };
        // Past `slot_by` a retry could only be handed back untried.
        let attempts = attempt
            .retry(backoff)
            .sleep(tokio::time::sleep)
            .when(|e| retried(e) && Instant::now() < slot_by)
            .notify(|e, delay| {
                tracing::debug!(job = %jobs[0].id(), error = %e, ?delay, "retrying in this worker");
            });
        // Each attempt stops itself at the deadline (cancelling its
        // statements, both at once); this outer bound only catches what lies
        // between attempts, so it must not fire first and skip that cancel.
        let outer = deadline + CANCEL_TIMEOUT + Duration::from_secs(1);
        let result = tokio::time::timeout_at(outer.into(), attempts).await;
        drop(permit);
        let result = match (result, failed.into_inner().expect("last error")) {
            (Ok(Err(e)), Some(failed)) if e.not_started() => Ok(Err(failed)),
            (result, _) => result,
        };
        match result {
            // Out of time before a second try: the next attempt will tell.
            Ok(Err(JobError::ShapeChanged(e))) if tries.load(Ordering::Relaxed) < 2 => {
                Err(JobError::Retry(e))
            }
            Ok(Err(JobError::ShapeChanged(e))) => Err(JobError::Reject(format!(
                "{e} (still so with the stream described anew)"
            ))),
            Ok(result) => result,
            Err(_) => Err(JobError::Retry(format!("deadline of {budget:?} passed"))),
        }
    }

    /// The stream's shape for a job of `run_id`: described again for each
    /// new run, after its planner described it, so that a column added to
    /// the source (and the destination) is copied from the first run
    /// planned after; for event jobs, which belong to no run, at least
    /// every `EVENT_SHAPE_AGE`. A shape described for a newer run serves an
    /// older run's job too (a resumed run's, or a superseded one's about to
    /// be dropped): runs alternating in the queue must not make every job
    /// describe the stream again.
    ///
    /// Only the columns the destination table has are copied: a column
    /// added to the source first (as migrations usually go) is refused by
    /// the next run's planning until the destination has it too, and must
    /// not fail the jobs of a run planned before, nor event jobs, meanwhile.
    async fn shape(
        &self,
        stream: &StreamConfig,
        run_id: i64,
        src: &Client,
        dst: &Client,
    ) -> Result<Arc<StreamShape>, JobError> {
        let cached = || {
            let shapes = self.shapes.lock().expect("shape cache");
            let cached = shapes.cached.get(&stream.name)?;
            (cached.run_id >= run_id
                && (run_id != NO_RUN || cached.described.elapsed() < EVENT_SHAPE_AGE))
                .then(|| cached.shape.clone())
        };
        if let Some(shape) = cached() {
            return Ok(shape);
        }
        let describing = self
            .describing
            .lock()
            .expect("describing")
            .entry(stream.name.clone())
            .or_default()
            .clone();
        // Inside the job's deadline, as the description itself is.
        let _describing = describing.lock().await;
        if let Some(shape) = cached() {
            return Ok(shape);
        }
        let generation = self
            .shapes
            .lock()
            .expect("shape cache")
            .generation(&stream.name);
        let described = StreamShape::describe(&***src, stream).await?;
        let destination: Vec<String> = dst
            .query_one(
                DESTINATION_COLUMNS,
                &[&stream.destination_table.to_string()],
            )
            .await?
            .get(0);
        let destination: HashSet<String> = destination.into_iter().collect();
        let (shape, left_out) = described.restricted_to(&destination);
        if !left_out.is_empty() {
            tracing::warn!(stream = %stream.name, columns = ?left_out, "source columns the destination table lacks are not copied until it has them");
        }
        let shape = Arc::new(shape);
        let cached = CachedShape {
            shape: shape.clone(),
            run_id,
            described: Instant::now(),
        };
        let mut shapes = self.shapes.lock().expect("shape cache");
        if shapes.generation(&stream.name) == generation {
            shapes.cached.insert(stream.name.clone(), cached);
        }
        Ok(shape)
    }

    /// One attempt, cut off at `deadline` (`budget` after the first began)
    /// with a server-side cancel. The streams are described inside it, on
    /// its own connections: a description waiting for a lock (an app's
    /// migration) is cancelled with the rest, and one read from a standby
    /// comes after the standby has replayed as far as the jobs need.
    async fn attempt(
        &self,
        streams: &[&StreamConfig],
        jobs: &[Job],
        deadline: Instant,
        budget: Duration,
        slot_by: Instant,
    ) -> Result<Vec<BatchOutcome>, JobError> {
        // The destination first: while it is down, attempts cost the source
        // (the app's database) no connection. Both checked out before either
        // is `Unpooled`: one that cannot be had sends the other, unused,
        // back to its pool.
        // A worker's connections are taken by its jobs waiting for the
        // fleet's read slots too: one that waited for them past its time
        // for a slot (or for the pool's whole checkout timeout: all taken by
        // this worker's jobs, not a database down) goes back untried, as if
        // it had waited for the slot, not to time out and use up an attempt.
        let no_connection = || {
            JobError::NoReadSlot(format!(
                "no database connection of this worker came free within half the job's deadline ({:?})",
                budget / 2
            ))
        };
        let untried = |checkout: Result<Client, syncfleet_db::DbError>| match checkout {
            Err(syncfleet_db::DbError::PoolTimeout { .. }) => Err(no_connection()),
            other => other.map_err(JobError::from),
        };
        let dst = untried(self.destination.get().await)?;
        let src = untried(self.source.get().await)?;
        if Instant::now() >= slot_by {
            return Err(no_connection());
        }
        let mut dst = Unpooled::new(dst, self.destination.tls());
        let mut src = Unpooled::new(src, self.source.tls());
        let (src_client, dst_client) = (src.get(), dst.get());
        // Every wait for a standby to catch up ends by then.
        let replay_by =
            Instant::now() + streams.iter().map(|s| s.deadline).min().unwrap_or_default() / 2;
        let converge = async {
            self.wait_for_replay(jobs, src_client, dst_client, replay_by)
                .await?;
            let mut shapes = Vec::with_capacity(streams.len());
            for (stream, job) in streams.iter().zip(jobs) {
                shapes.push(
                    self.shape(stream, job.run_id, src_client, dst_client)
                        .await?,
                );
            }
            let work: Vec<Work> = jobs
                .iter()
                .zip(streams)
                .zip(&shapes)
                .map(|((job, stream), shape)| Work { job, stream, shape })
                .collect();
            self.converge(&work, src_client, dst_client, slot_by, replay_by)
                .await
        };
        match tokio::time::timeout_at(deadline.into(), converge).await {
            Ok(Ok(outcomes)) => {
                src.keep();
                dst.keep();
                Ok(outcomes)
            }
            // No read slot came free: nothing was begun on the source (its
            // read starts after the slot), so its connection goes back to
            // the pool; a hand-back must not cost the app's database a
            // connection. The destination's, whose wait for the slot may
            // still run on the server, is cancelled and closed.
            Ok(Err(e @ JobError::NoReadSlot(_))) => {
                src.keep();
                Err(e)
            }
            // A statement failed, possibly in the middle of a COPY (or of
            // a pipeline): the connections are cancelled and closed, not
            // pooled.
            Ok(Err(e)) => Err(e),
            Err(_) => {
                let (src_cancelled, dst_cancelled) = tokio::join!(src.cancel(), dst.cancel());
                for e in [src_cancelled, dst_cancelled]
                    .into_iter()
                    .filter_map(Result::err)
                {
                    tracing::warn!(job = %jobs[0].id(), error = %e, "could not cancel a statement past its deadline");
                }
                Err(JobError::Retry(format!(
                    "deadline of {budget:?} passed; its statements were cancelled"
                )))
            }
        }
    }

    /// Reading from a standby, waits (until `by`) until it has replayed the
    /// source's WAL as far as the newest of the jobs was made at
    /// (`Job::source_lsn`), so that the read sees every change they were
    /// sent for, and as far as an earlier job of their streams may have read
    /// (see `control::last_standby_read`; checked again under the write
    /// locks, where it mostly passes at once).
    async fn wait_for_replay(
        &self,
        jobs: &[Job],
        src: &Client,
        dst: &Client,
        by: Instant,
    ) -> Result<(), JobError> {
        if self.config.reads.replica_url.is_none() {
            return Ok(());
        }
        let made = jobs.iter().filter_map(|job| job.source_lsn).max();
        if let Some(lsn) = made {
            replayed_to(src, lsn, by, "where the job was made").await?;
        }
        let streams: Vec<&str> = jobs.iter().map(|job| job.stream.as_str()).collect();
        match control::last_standby_read(dst, &streams).await? {
            Some(lsn) if Some(lsn) > made => replayed_to(src, lsn, by, EARLIER_READ).await,
            _ => Ok(()),
        }
    }

    /// Opens both transactions, converges each job's range in turn, then
    /// commits.
    async fn converge(
        &self,
        work: &[Work<'_>],
        src: &mut Client,
        dst: &mut Client,
        slot_by: Instant,
        replay_by: Instant,
    ) -> Result<Vec<BatchOutcome>, JobError> {
        // Read once per transaction: its batches keep the pace they started
        // with.
        let pace = self.gate.pace();
        let pace_settings: Option<(Vec<String>, Vec<String>)> =
            pace.map(|p| p.settings().into_iter().unzip());

        // Statements are prepared once per connection (the text of each
        // depends only on the stream, the range's form and the pace, values
        // travelling as parameters or settings), so that what follows can be
        // pipelined: requests joined with `biased;` are sent in the order
        // written, on their first poll, and share one round trip. That order
        // matters: `BEGIN` must reach the server before the settings and the
        // advisory lock that live in its transaction.
        //
        // The transactions are begun by hand, not through a guard: any
        // error closes both connections (see `attempt`), which rolls back.
        let slot = dst.prepare_cached(ceiling::TAKE_READ_SLOT).await?;
        let lock_writes = dst.prepare_cached(control::LOCK_WRITES).await?;
        let superseded = dst.prepare_cached(control::SUPERSEDED).await?;
        let set_destination = dst.prepare_cached(sql::SET_SETTINGS).await?;
        // Cached for the pipelined commit at the end.
        dst.prepare_cached(control::COMPLETE_BATCHES).await?;
        dst.prepare_cached(control::TRY_FINISH_RUN).await?;
        let rate = self.config.reads.max_rows_per_second;
        if rate.is_some() {
            dst.prepare_cached(control::CHARGE_READ).await?;
        }

        // The destination transaction holds the read slot of the fleet-wide
        // ceiling until it ends, however it ends, and the slot is taken
        // before the source query starts. The jobs read one after another,
        // so one slot covers them all. The throttle narrows the slots.
        let slots = self.gate.slots().map(|n| n.min(i32::MAX as u32) as i32);
        let namespace = ceiling::namespace(&self.config.broker.prefix);
        // Read committed whatever the server's default: each statement's
        // snapshot is taken when it starts, so the check under the write
        // locks sees a claim committed while they were awaited.
        let begin = dst.batch_execute("BEGIN ISOLATION LEVEL READ COMMITTED");
        // Before the slot: a job waiting for another to commit holds none.
        let (lock_names, exclusive) =
            control::write_locks(&self.config.broker.prefix, work.iter().map(|w| w.job));
        let lock_params: [&(dyn ToSql + Sync); 2] = [&lock_names, &exclusive];
        let locks = dst.execute(&lock_writes, &lock_params);
        // Under the write locks: whether each job's run still holds its
        // stream. Event jobs belong to no run, and are never superseded.
        let (runs, streams): (Vec<i64>, Vec<&str>) = work
            .iter()
            .filter(|w| w.job.run_id != NO_RUN)
            .map(|w| (w.job.run_id, w.job.stream.as_str()))
            .unzip();
        let held = async {
            if runs.is_empty() {
                return Ok(Vec::new());
            }
            let rows = dst.query(&superseded, &[&runs, &streams]).await?;
            Ok(rows
                .iter()
                .map(|r| (r.get::<_, i64>(0), r.get::<_, String>(1)))
                .collect::<Vec<_>>())
        };
        let first_try = async {
            match slots {
                Some(n) => Ok(dst
                    .query_opt(&slot, &[&n, &namespace, &fastrand::i32(0..n)])
                    .await?
                    .is_some()),
                None => Ok(true),
            }
        };
        // A paced batch is merged at the same pace: on a machine the two
        // databases share, the merge's burst would undo the read's.
        let settings = async {
            if let Some((names, values)) = &pace_settings {
                dst.execute(&set_destination, &[names, values]).await?;
            }
            Ok(())
        };
        let ((), _, superseded, got_slot, ()) =
            tokio::try_join!(biased; begin, locks, held, first_try, settings)?;
        let is_superseded = |w: &Work| {
            superseded
                .iter()
                .any(|(run, stream)| *run == w.job.run_id && *stream == w.job.stream)
        };
        let all = work;
        let live: Vec<Work> = all.iter().copied().filter(|w| !is_superseded(w)).collect();
        let work = &live[..];
        if work.is_empty() {
            // Nothing to read or write; the locks and the slot end with it.
            dst.batch_execute("ROLLBACK").await?;
            return Ok(vec![BatchOutcome::SUPERSEDED; all.len()]);
        }
        if let (false, Some(n)) = (got_slot, slots) {
            let none_free = || {
                JobError::NoReadSlot(
                    "no fleet read slot came free by half its deadline (source.max_concurrent_reads, \
                     or the throttle, holds the fleet's reads to fewer than the jobs waiting; \
                     `syncfleet status` shows who holds the slots)"
                        .into(),
                )
            };
            // Not even begun: a cancel could reach the server before the
            // wait does, and miss it.
            if Instant::now() >= slot_by {
                return Err(none_free());
            }
            let wait = ceiling::take_read_slot(&*dst, n, &namespace);
            if let Ok(taken) = tokio::time::timeout_at(slot_by.into(), wait).await {
                taken?;
            } else {
                // The wait goes on on the server, holding the write locks,
                // until cancelled: by the connection's drop (see
                // `Unpooled`), apart, so that it does not eat the deadline
                // and cost an attempt.
                return Err(none_free());
            }
        }
        // Reading from standbys: as far as an earlier job of the streams
        // may have read (see `control::last_standby_read`), asked again
        // under the write locks, so that none commits a newer read
        // meanwhile. A wait here holds the read slot too; it is mostly
        // over before the locks, in `wait_for_replay`.
        let standbys = self.config.reads.replica_url.is_some();
        // Nothing collected (no allocation) on the common path, without standbys.
        let read_streams: Vec<&str> = match standbys {
            true => work.iter().map(|w| w.job.stream.as_str()).collect(),
            false => Vec::new(),
        };
        if standbys && let Some(lsn) = control::last_standby_read(&*dst, &read_streams).await? {
            replayed_to(src, lsn, replay_by, EARLIER_READ).await?;
        }
        // When the reads began, for the fleet's rows/s budget.
        let began = Instant::now();

        let mut done = Vec::with_capacity(work.len());
        for (i, w) in work.iter().enumerate() {
            let first = i == 0;
            let last = i + 1 == work.len();
            done.push(self.converge_range(w, pace, first, last, src, dst).await?);
        }
        // After the snapshot: at least as far as it holds.
        let replayed: Option<Lsn> = match standbys {
            true => {
                let read_at = src.prepare_cached(syncfleet_db::pool::READ_AT_MOST).await?;
                dst.prepare_cached(control::RECORD_STANDBY_READ).await?;
                let at: i64 = src.query_one(&read_at, &[]).await?.get(0);
                Some(Lsn(at as u64))
            }
            false => None,
        };

        // Marking the batches done, the COMMIT and the run-finished checks
        // are pipelined on one connection, so each check runs after the
        // commit and sees these batches done, with every batch committed
        // before: of the workers committing a run's last batches at once,
        // the last to commit sees none left. (Both statements were prepared
        // with the set-up, so each call below sends at once.) Event jobs
        // belong to no run: nothing to record.
        let batches: Vec<control::DoneBatch> = work
            .iter()
            .zip(&done)
            .filter(|(w, _)| w.job.run_id != NO_RUN)
            .map(|(w, d)| control::DoneBatch {
                run_id: w.job.run_id,
                stream: &w.job.stream,
                batch_no: w.job.batch,
                rows_copied: d.rows_copied as i64,
                rows_deleted: d.rows_deleted as i64,
                rows_unchanged: d.rows_unchanged as i64,
            })
            .collect();
        let mut runs: Vec<i64> = batches.iter().map(|b| b.run_id).collect();
        runs.sort_unstable();
        runs.dedup();
        let destination_commit = async {
            let complete = async {
                match batches.is_empty() {
                    true => Ok(true),
                    false => control::complete_batches(&*dst, &batches, &self.id).await,
                }
            };
            let record = async {
                match replayed {
                    Some(lsn) => control::record_standby_read(&*dst, &read_streams, lsn).await,
                    None => Ok(()),
                }
            };
            let commit = dst.batch_execute("COMMIT");
            let finish = async {
                let mut finished = Vec::new();
                for &run_id in &runs {
                    if control::try_finish_run(&*dst, run_id).await? {
                        finished.push(run_id);
                    }
                }
                Ok::<_, syncfleet_db::DbError>(finished)
            };
            let (known, recorded, committed, finished) =
                tokio::join!(biased; complete, record, commit, finish);
            // Checked first: after a failed statement the server answers
            // COMMIT by rolling back, and reports that as a success.
            let known = known?;
            recorded?;
            committed?;
            // Once committed (a failed attempt is not charged), in its own
            // transaction: the fleet's rows/s budget is one row every worker
            // updates.
            if let Some(rate) = rate {
                let rows: u64 = done.iter().map(|d| d.rows_copied + d.rows_unchanged).sum();
                let cost = Duration::from_secs_f64(rows as f64 / f64::from(rate));
                let prefix = &self.config.broker.prefix;
                let charged = control::charge_read(&*dst, prefix, began.elapsed(), cost).await;
                // Without the fleet's clock, this worker still keeps the rate.
                let wait = charged.unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "could not charge the fleet's rows/s budget");
                    cost
                });
                self.gate.hold_until((Instant::now() + wait).into());
            }
            if !known {
                // Its run is gone from the control schema. Writing the
                // range was harmless (every write converges it to the
                // source); the job itself cannot be recorded.
                return Err(JobError::Reject(format!(
                    "job {} names a batch the control schema does not have",
                    work[0].job.id()
                )));
            }
            // The batches are committed: from here on an error must not fail
            // the jobs; the next batch or `status` finishes the run.
            Ok::<_, JobError>(finished.unwrap_or_else(|e| {
                tracing::warn!(runs = ?runs, error = %e, "could not check whether a run finished");
                Vec::new()
            }))
        };
        let source_ended = done.last().is_some_and(|d| d.source_ended);
        // The source's transaction only read, and its COPY has ended: once
        // the destination has committed, a failed COMMIT there (its session
        // ended meanwhile) changes nothing, and must not fail the jobs. A
        // closed connection does not go back to the pool.
        let source_commit = async {
            if !source_ended && let Err(e) = src.batch_execute("COMMIT").await {
                tracing::warn!(error = %e, "the source's read-only transaction could not commit; its reads were complete");
            }
        };
        let (finished, ()) = tokio::join!(destination_commit, source_commit);
        let finished = finished?;
        let mut outcomes = Vec::with_capacity(work.len());
        for (i, (w, d)) in work.iter().zip(&done).enumerate() {
            let stream = &w.stream.name;
            // The merge and the commit: what the destination spends after
            // the COPY.
            metrics::histogram!(m::DESTINATION_WRITE, "stream" => stream.clone())
                .record(d.copy_done.elapsed().as_secs_f64());
            for (how, rows) in [("copied", d.rows_copied), ("unchanged", d.rows_unchanged)] {
                metrics::counter!(m::ROWS, "stream" => stream.clone(), "how" => how)
                    .increment(rows);
            }
            // The run's last job in the group reports its finish.
            let finished_run = finished.contains(&w.job.run_id)
                && !work[i + 1..]
                    .iter()
                    .any(|later| later.job.run_id == w.job.run_id);
            outcomes.push(BatchOutcome {
                rows_copied: d.rows_copied,
                rows_deleted: d.rows_deleted,
                rows_unchanged: d.rows_unchanged,
                finished_run,
                superseded: false,
            });
        }
        let mut outcomes = outcomes.into_iter();
        Ok(all
            .iter()
            .map(|w| match is_superseded(w) {
                true => BatchOutcome::SUPERSEDED,
                false => outcomes.next().expect("an outcome per job run"),
            })
            .collect())
    }

    /// Converges one job's range inside the open transactions: the
    /// destination's emptiness check and the source's read share a round
    /// trip, then the rows go in. `first` begins the source transaction;
    /// a stage that a later job would create again is dropped unless `last`.
    async fn converge_range(
        &self,
        work: &Work<'_>,
        pace: Option<sql::Pace>,
        first: bool,
        last: bool,
        src: &Client,
        dst: &Client,
    ) -> Result<RangeDone, JobError> {
        let Work { job, stream, shape } = *work;
        let table = &stream.destination_table;
        let predicate = |alias, binding| match &job.select {
            Some(select) => RangePredicate::selection(shape, alias, select, binding)
                .map_err(|e| JobError::Reject(format!("job {}: {e}", job.id()))),
            // A bound of another length would be cut short or fail as SQL.
            None => match [&job.range.lower, &job.range.upper]
                .into_iter()
                .flatten()
                .find(|bound| bound.len() != shape.key.len())
            {
                Some(bound) => Err(JobError::Reject(format!(
                    "job {}: a range bound of {} value(s) for a key of {} column(s)",
                    job.id(),
                    bound.len(),
                    shape.key.len()
                ))),
                None => Ok(RangePredicate::new(shape, alias, &job.range, binding)),
            },
        };
        let mut source_range = predicate("q", Binding::Settings)?;
        for (name, value) in pace.iter().flat_map(|p| p.settings()) {
            source_range.settings.0.push(name);
            source_range.settings.1.push(value);
        }
        let dest_range = predicate("d", Binding::Params { first: 1 })?;
        let params = sql::bind(&dest_range.params);
        let paced = pace.is_some();
        // Fingerprints first only where a match saves a copy: a key range
        // (a selection is an event's changed rows), large enough to pay for
        // the round trips, of a stream whose ranges have been matching.
        let compare = match self.fingerprints
            && job.select.is_none()
            && stream.batch_size >= COMPARE_MIN_ROWS
        {
            true => self.odds.compare(&stream.name),
            false => Compare::No,
        };
        let (dest_check, (set_source, copy_out, source_fingerprint)) = tokio::try_join!(
            async {
                let check = match compare {
                    Compare::No => sql::range_is_empty(shape, table, &dest_range),
                    _ => sql::fingerprint(shape, &table.to_string(), "d", &dest_range, paced),
                };
                dst.prepare_cached(&check).await
            },
            async {
                let set = match source_range.settings.0.is_empty() {
                    true => None,
                    false => Some(src.prepare_cached(sql::SET_SETTINGS).await?),
                };
                let copy = sql::copy_out(shape, &source_range, paced);
                let fingerprint = match compare {
                    Compare::No => None,
                    _ => Some(
                        src.prepare_cached(&sql::fingerprint(
                            shape,
                            &shape.relation,
                            "q",
                            &source_range,
                            paced,
                        ))
                        .await?,
                    ),
                };
                Ok((set, src.prepare_cached(&copy).await?, fingerprint))
            },
        )?;

        let read_started = Instant::now();
        // The source transaction and the range's bounds go with the first
        // read of the range, in one round trip and in one transaction:
        // separate statements could reach different server sessions behind
        // a transaction-pooling proxy (PgBouncer), and read another job's
        // range.
        let begin = async {
            match first {
                true => src.batch_execute(syncfleet_db::pool::READ_SNAPSHOT).await,
                false => Ok(()),
            }
        };
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
        let (empty, rows) = match source_fingerprint {
            // The destination's count and fingerprint, and the source's:
            // at once, or only if the destination holds rows there, so
            // that an initial load spends nothing on the source.
            Some(source_fingerprint) => {
                let source = async {
                    match compare {
                        Compare::AtOnce => src.query_one(&source_fingerprint, &[]).await.map(Some),
                        _ => Ok(None),
                    }
                };
                let (dest, ((), (), source)) = tokio::try_join!(
                    async { Ok::<_, JobError>(dst.query_one(&dest_check, &params).await?) },
                    async { Ok(tokio::try_join!(biased; begin, bounds, source)?) },
                )?;
                let dest = (dest.get::<_, i64>(0), dest.get::<_, i64>(1));
                if dest.0 == 0 {
                    self.odds.record(&stream.name, Found::Empty);
                } else {
                    let source = match source {
                        Some(source) => source,
                        None => src.query_one(&source_fingerprint, &[]).await?,
                    };
                    let unchanged = (source.get::<_, i64>(0), source.get::<_, i64>(1)) == dest;
                    let found = match unchanged {
                        true => Found::Unchanged,
                        false => Found::Changed,
                    };
                    self.odds.record(&stream.name, found);
                    if unchanged {
                        metrics::histogram!(m::SOURCE_READ, "stream" => stream.name.clone())
                            .record(read_started.elapsed().as_secs_f64());
                        return Ok(RangeDone {
                            rows_copied: 0,
                            rows_deleted: 0,
                            rows_unchanged: dest.0 as u64,
                            copy_done: Instant::now(),
                            source_ended: false,
                        });
                    }
                }
                (dest.0 == 0, src.copy_out(&copy_out).await?)
            }
            None => {
                let empty =
                    async { Ok(dst.query_one(&dest_check, &params).await?.get::<_, bool>(0)) };
                let read = async {
                    let ((), (), rows) =
                        tokio::try_join!(biased; begin, bounds, src.copy_out(&copy_out))?;
                    Ok::<_, JobError>(rows)
                };
                tokio::try_join!(empty, read)?
            }
        };
        // A selection on another column (an event's `users = "user_id"`)
        // says nothing about keys: "no row with that user_id" does not mean
        // "no row with those keys", so it always merges.
        let by_key = job
            .select
            .as_ref()
            .is_none_or(|s| s.columns.iter().map(String::as_str).eq(shape.key_names()));
        let empty = empty && by_key;
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
        // Once its rows are read, the source has sent all it will in this
        // transaction: for the transaction's last job it ends beside the
        // destination's writes, not after them, so that it never sits idle
        // in its transaction while the destination works (a source's
        // `idle_in_transaction_session_timeout` would end the session, and
        // every later attempt's with it).
        let end_source = || async move {
            match last {
                true => src.batch_execute("COMMIT").await,
                false => Ok(()),
            }
        };
        if source_empty {
            source_read.record(read_started.elapsed().as_secs_f64());
            let delete = async {
                if empty || !by_key {
                    return Ok(0);
                }
                let statement = dst
                    .prepare_cached(&sql::delete_range(table, &dest_range))
                    .await?;
                dst.execute(&statement, &params).await
            };
            let (deleted, ended) = tokio::join!(delete, end_source());
            let rows_deleted = deleted?;
            ended?;
            return Ok(RangeDone {
                rows_copied: 0,
                rows_deleted,
                rows_unchanged: 0,
                copy_done: Instant::now(),
                source_ended: last,
            });
        }
        if empty {
            // Fast path (an initial load): nothing to update or delete, so
            // the rows go straight into the table.
            let statement = dst
                .prepare_cached(&sql::copy_in(shape, &table.to_string()))
                .await?;
            let sink = dst.copy_in(&statement).await?;
            futures_util::pin_mut!(sink);
            let rows_copied = async {
                sink.as_mut().send_all(&mut rows).await?;
                sink.finish().await
            }
            .await
            .inspect(|_| source_read.record(read_started.elapsed().as_secs_f64()))?;
            return Ok(RangeDone {
                rows_copied,
                rows_deleted: 0,
                rows_unchanged: 0,
                copy_done: Instant::now(),
                source_ended: false,
            });
        }
        dst.batch_execute(&sql::create_stage(shape, table)).await?;
        let statement = dst.prepare_cached(&sql::copy_in_stage(shape)).await?;
        let stage = dst.copy_in(&statement).await?;
        futures_util::pin_mut!(stage);
        stage.as_mut().send_all(&mut rows).await?;
        let rows_copied = stage.finish().await?;
        let copy_done = Instant::now();
        source_read.record(read_started.elapsed().as_secs_f64());
        let how = match self.destination.has_merge() {
            true => sql::Upsert::Merge,
            false => sql::Upsert::OnConflict,
        };
        let statement = dst
            .prepare_cached(&sql::upsert(shape, table, pace.is_some(), how))
            .await?;
        let (merged, ended) = tokio::join!(dst.execute(&statement, &[]), end_source());
        // A unique violation here is the data's, never a race: the job's
        // write locks keep every other job off its rows. A query stream's
        // key repeated, or a unique index of the destination's own.
        merged?;
        ended?;
        // Only a range or a key selection owns the rows it names: a row
        // missing from a selection on another column may merely have moved
        // (a profile now under another user), so deletes are left to
        // key-based jobs and full runs.
        let rows_deleted = if by_key {
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
        if !last {
            // The stage drops at commit; a later job of this transaction
            // creates its own.
            dst.batch_execute(&sql::drop_stage()).await?;
        }
        Ok(RangeDone {
            rows_copied,
            rows_deleted,
            rows_unchanged: 0,
            copy_done,
            source_ended: last,
        })
    }

    /// Records a job that cannot succeed: its batch and run become failed.
    /// False if its batch was done already (see `control::fail_batch`).
    pub async fn fail(&self, job: &Job, reason: &str) -> Result<bool, syncfleet_db::DbError> {
        let mut client = self.destination.get().await?;
        let (run, stream, batch) = (job.run_id, &job.stream, job.batch);
        control::fail_batch(
            &mut client,
            run,
            stream,
            batch,
            reason,
            control::SETTLE_WITHIN,
        )
        .await
    }

    /// Records a failed attempt that will be retried through the broker.
    pub async fn record_retry(&self, job: &Job, reason: &str) -> Result<(), syncfleet_db::DbError> {
        let mut client = self.destination.get().await?;
        control::record_retry(&mut client, job.run_id, &job.stream, job.batch, reason).await
    }
}

#[cfg(test)]
mod tests {
    use std::panic::AssertUnwindSafe;

    use futures_util::FutureExt;

    use super::*;

    /// The backend's pid, and whether the panicked transaction is still open
    /// on it.
    async fn backend(client: &Client) -> (i32, bool) {
        let row = client
            .query_one(
                "SELECT pg_backend_pid(), current_setting('application_name') = 'mid-transaction'",
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    }

    /// Against the test server (`SYNCFLEET_TEST_PG_URL`), as the
    /// integration tests are.
    #[tokio::test]
    async fn a_connection_that_a_panic_leaves_in_a_transaction_is_closed_not_pooled() {
        let url = std::env::var("SYNCFLEET_TEST_PG_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
        let manager = deadpool_postgres::Manager::new(url.parse().unwrap(), tokio_postgres::NoTls);
        let pool = deadpool_postgres::Pool::builder(manager)
            .max_size(1)
            .build()
            .unwrap();
        let tls = syncfleet_db::tls::config(&url).unwrap().1;
        let mut kept = Unpooled::new(pool.get().await.unwrap(), tls.clone());
        let (first, _) = backend(kept.get()).await;
        kept.keep();
        let mut held = Unpooled::new(pool.get().await.unwrap(), tls);
        assert_eq!(backend(held.get()).await.0, first, "kept: pooled");

        let panicked = AssertUnwindSafe(async move {
            held.get()
                .batch_execute("BEGIN; SET LOCAL application_name = 'mid-transaction'")
                .await
                .unwrap();
            panic!("a bug in a job, mid-transaction");
        })
        .catch_unwind()
        .await;
        assert!(panicked.is_err());
        let (next, open) = backend(&pool.get().await.unwrap()).await;
        assert!(next != first && !open, "a new connection");
    }
}
