//! Plans a sync run and publishes its jobs.
//!
//! A run goes through three steps, in this order, so that a bad config
//! publishes nothing and a worker never sees a job the control schema does
//! not know:
//!
//! 1. [`prepare`]: describe every selected stream on the source and check
//!    (or create) its destination table. Any error stops here, before a run
//!    exists.
//! 2. Create the run, then for each stream walk its keys in one snapshot
//!    ([`syncfleet_db::scan`]) and, a chunk at a time, record the chunk's
//!    batches in the control schema and publish one job per batch, waiting
//!    for the broker's confirms (while the next chunk is read and
//!    recorded).
//! 3. Mark the run planned; from then on the workers finish it.
//!
//! A batch is marked published only after the broker confirmed its job. If
//! planning stops halfway (the producer died, the broker refused
//! publishes), [`resume_run`] publishes exactly the batches that are
//! neither done nor published, re-opens failed ones, and continues each
//! unfinished stream's key walk after its last recorded batch.
//!
//! A stream has one run going at a time: creating a run, resuming one and
//! replaying a dead job are refused ([`PlanError::Going`]) while another
//! run of the stream is still going (see [`control::runs_going`]).
//!
//! [`start_incremental_run`] plans only the rows changed since a stream's
//! watermark; [`service`] is the long-running, leader-elected producer and
//! [`events`] turns upstream change events into jobs.

pub mod events;
pub mod service;

use std::fmt;
use std::time::Duration;

use syncfleet_broker::{BrokerError, Publisher};
use syncfleet_core::Config;
use syncfleet_core::config::StreamConfig;
use syncfleet_core::job::{Job, Key, KeyRange, Lsn};
use syncfleet_db::ceiling::Ceiling;
use syncfleet_db::control;
use syncfleet_db::ddl::{self, TableState};
use syncfleet_db::scan::{CHUNK, KeyScan, Ranges};
use syncfleet_db::{DbError, Pool, ShapeError, StreamShape};

/// Why a run could not be planned.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// The config asks for something the databases cannot give (exit 2).
    #[error(transparent)]
    Invalid(ShapeError),
    #[error(transparent)]
    Schema(#[from] control::SchemaMismatch),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("{0}")]
    Broker(#[from] BrokerError),
    #[error(
        "run {run_id} stopped while planning: {reason}; publish the rest with `syncfleet sync --resume {run_id}`"
    )]
    Stopped { run_id: i64, reason: String },
    #[error("no run with id {0}")]
    UnknownRun(i64),
    /// Refused: another run of the stream is still going, and the jobs of
    /// two runs of one stream are not ordered against each other.
    #[error(
        "{0}: its jobs and another run's of the same stream could undo each other's newer rows; wait until it ends (`syncfleet status`), then try again"
    )]
    Going(control::Going),
    /// Refused: another process (a `sync`, the producer service) is
    /// planning or resuming the run right now.
    #[error(
        "run {0} is being planned by another process right now; resume it once that planner has stopped"
    )]
    Planning(i64),
}

impl From<ShapeError> for PlanError {
    fn from(e: ShapeError) -> Self {
        match e {
            ShapeError::Db { source, .. } => PlanError::Db(source),
            invalid => PlanError::Invalid(invalid),
        }
    }
}

impl From<tokio_postgres::Error> for PlanError {
    fn from(e: tokio_postgres::Error) -> Self {
        PlanError::Db(e.into())
    }
}

/// A stream ready to plan.
pub struct PreparedStream<'c> {
    pub config: &'c StreamConfig,
    pub shape: StreamShape,
}

/// Checks that the destination's control schema matches this build.
pub async fn check_schema(destination: &Pool) -> Result<(), PlanError> {
    Ok(control::check_schema(&**destination.get().await?).await??)
}

/// Step 1: describes each stream and prepares its destination table.
pub async fn prepare<'c>(
    source: &Pool,
    destination: &Pool,
    streams: &[&'c StreamConfig],
) -> Result<Vec<PreparedStream<'c>>, PlanError> {
    let src = source.get().await?;
    let mut dest = destination.get().await?;
    let mut prepared = Vec::with_capacity(streams.len());
    for &config in streams {
        let shape = StreamShape::describe(&**src, config).await?;
        let table = ddl::ensure_table(&**src, &mut dest, &shape, &config.destination_table).await?;
        if table == TableState::Created {
            tracing::info!(stream = %config.name, table = %config.destination_table, "created destination table");
        }
        prepared.push(PreparedStream { config, shape });
    }
    Ok(prepared)
}

/// What planning produced, per stream.
#[derive(Debug, Clone)]
pub struct RunPlan {
    pub run_id: i64,
    pub batches: Vec<(String, i64)>,
}

impl fmt::Display for RunPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .batches
            .iter()
            .map(|(s, n)| format!("{s}: {n} batches"))
            .collect();
        write!(f, "run {} planned ({})", self.run_id, parts.join(", "))
    }
}

/// Steps 1 to 3: plans a full run of `streams` and publishes its jobs.
/// `stale_after` is how long a run may go without progress before it no
/// longer holds its streams (`broker.consumer_timeout`).
pub async fn start_run(
    source: &Pool,
    destination: &Pool,
    publisher: &Publisher,
    ceiling: &Ceiling,
    streams: &[&StreamConfig],
    stale_after: Duration,
) -> Result<RunPlan, PlanError> {
    check_schema(destination).await?;
    let prepared = prepare(source, destination, streams).await?;
    let names: Vec<&str> = streams.iter().map(|s| s.name.as_str()).collect();
    let run_id = control::create_run_of(
        &mut **destination.get().await?,
        publisher.topology().prefix(),
        "full",
        &names,
        stale_after,
    )
    .await?
    .map_err(PlanError::Going)?;
    tracing::info!(run_id, streams = ?names, "planning run");
    let _planner = new_run_planner(destination, run_id).await?;
    let mut plan = RunPlan {
        run_id,
        batches: Vec::new(),
    };
    for stream in &prepared {
        let planned = plan_stream(
            source,
            destination,
            publisher,
            ceiling,
            run_id,
            stream,
            0,
            None,
        )
        .await;
        match planned {
            Ok(n) => plan.batches.push((stream.config.name.clone(), n)),
            Err(e) => return Err(planning_failed(destination, run_id, e).await),
        }
    }
    control::mark_planned(&**destination.get().await?, run_id).await?;
    Ok(plan)
}

/// Becomes `run_id`'s planner ([`control::plan_run`]) until dropped.
async fn planner(destination: &Pool, run_id: i64) -> Result<control::Planner, PlanError> {
    control::plan_run(destination, run_id)
        .await?
        .ok_or(PlanError::Planning(run_id))
}

/// [`planner`] of a run just created, failed if it cannot be.
async fn new_run_planner(destination: &Pool, run_id: i64) -> Result<control::Planner, PlanError> {
    match planner(destination, run_id).await {
        Ok(planner) => Ok(planner),
        Err(e) => Err(planning_failed(destination, run_id, e).await),
    }
}

/// Fails `run_id`, whose planning failed with `e` (best effort: the run is
/// failed whether or not this lands), and says why: a stream the databases
/// cannot serve as configured as itself (exit 2), anything else as the run
/// stopped.
async fn planning_failed(destination: &Pool, run_id: i64, e: PlanError) -> PlanError {
    if let Ok(client) = destination.get().await {
        let _ = control::fail_run(&**client, run_id, &format!("planning failed: {e}")).await;
    }
    match e {
        invalid @ PlanError::Invalid(_) => invalid,
        other => PlanError::Stopped {
            run_id,
            reason: other.to_string(),
        },
    }
}

/// Plans one stream after batch `count` (0 from the start), whose upper key
/// was `after`: records and publishes its batches a chunk at a time. Each
/// read of the walk holds a slot of the fleet's `ceiling`, and the walk
/// works at the pace of the fleet's reads.
#[allow(clippy::too_many_arguments)]
async fn plan_stream(
    source: &Pool,
    destination: &Pool,
    publisher: &Publisher,
    ceiling: &Ceiling,
    run_id: i64,
    stream: &PreparedStream<'_>,
    mut count: i64,
    after: Option<Key>,
) -> Result<i64, PlanError> {
    let name = &stream.config.name;
    let pace = ceiling.pace(destination).await;
    let mut src = source.get().await?;
    let tx = syncfleet_db::pool::read_snapshot(&mut src).await?;
    let lsn = syncfleet_db::pool::wal_position(&*tx).await?;
    let every = stream.config.batch_size;
    let mut scan = KeyScan::start(&tx, &stream.shape, every, after.as_ref(), pace).await?;
    let mut ranges = Ranges::after(after);
    let mut numbered = |range: KeyRange| {
        count += 1;
        (count, range)
    };
    // A chunk recorded is published while the next is read and recorded:
    // the broker's confirms and the databases' work overlap. Published
    // in order, each after it was recorded.
    let mut recorded: Vec<(i64, KeyRange)> = Vec::new();
    loop {
        let publishing = async {
            match recorded.is_empty() {
                true => Ok(()),
                false => publish(destination, publisher, run_id, name, &recorded, lsn).await,
            }
        };
        let next = async {
            // Stops before asking for a slot that no read would use.
            if scan.is_finished() {
                return Ok(None);
            }
            let read = async { Ok::<_, PlanError>(scan.next_chunk().await?) };
            let Some(chunk) = ceiling.read(destination, read).await? else {
                return Ok(None);
            };
            let batches: Vec<(i64, KeyRange)> = chunk
                .into_iter()
                .map(|boundary| numbered(ranges.until(boundary)))
                .collect();
            control::insert_batches(&**destination.get().await?, run_id, name, &batches).await?;
            Ok::<_, PlanError>(Some(batches))
        };
        // Not `try_join!`: a failed read must not cut a publish short,
        // leaving confirmed jobs unmarked (a resume would send them twice).
        let (published, next) = tokio::join!(publishing, next);
        published?;
        match next? {
            Some(batches) => recorded = batches,
            None => break,
        }
    }
    let last = numbered(ranges.last());
    let total = last.0;
    record_and_publish(destination, publisher, run_id, name, &[last], lsn).await?;
    tx.commit().await?;
    control::finish_stream_planning(&**destination.get().await?, run_id, name, total).await?;
    tracing::info!(run_id, stream = %name, batches = total, "stream planned");
    Ok(total)
}

/// Records batches first, then publishes them: a worker may pick a job up
/// the moment it is confirmed, and must find its batch.
async fn record_and_publish(
    destination: &Pool,
    publisher: &Publisher,
    run_id: i64,
    stream: &str,
    batches: &[(i64, KeyRange)],
    lsn: Option<Lsn>,
) -> Result<(), PlanError> {
    control::insert_batches(&**destination.get().await?, run_id, stream, batches).await?;
    publish(destination, publisher, run_id, stream, batches, lsn).await
}

/// Publishes recorded batches, stamped with the source's WAL position
/// `lsn`, and marks them published once confirmed.
async fn publish(
    destination: &Pool,
    publisher: &Publisher,
    run_id: i64,
    stream: &str,
    batches: &[(i64, KeyRange)],
    lsn: Option<Lsn>,
) -> Result<(), PlanError> {
    let jobs: Vec<Job> = batches
        .iter()
        .map(|(n, range)| Job::new(run_id, stream, *n, range.clone()).at(lsn))
        .collect();
    // Taken first: a pool with no connection to spare (the planner reads
    // the next chunk meanwhile) fails before the jobs go out, not after,
    // which would leave them to be published again by a resume.
    let marking = destination.get().await?;
    publisher.publish_jobs(&jobs).await?;
    let numbers: Vec<i64> = batches.iter().map(|(n, _)| *n).collect();
    control::mark_published(&**marking, run_id, stream, &numbers).await?;
    Ok(())
}

/// Resumes a run whose planning stopped halfway or whose batches failed:
/// publishes every batch that is neither done nor already published (failed
/// ones are re-opened), then finishes planning the streams that were not
/// fully planned. Returns the number of jobs published.
pub async fn resume_run(
    source: &Pool,
    destination: &Pool,
    publisher: &Publisher,
    ceiling: &Ceiling,
    config: &Config,
    run_id: i64,
) -> Result<u64, PlanError> {
    check_schema(destination).await?;
    let states = control::plan_states(&**destination.get().await?, run_id).await?;
    if states.is_empty() {
        return Err(PlanError::UnknownRun(run_id));
    }
    let names: Vec<String> = states.iter().map(|s| s.stream.clone()).collect();
    let streams = config.select_streams(&names).map_err(|e| {
        PlanError::Invalid(ShapeError::Invalid {
            stream: names.join(", "),
            field: "name",
            message: format!("run {run_id} has a stream this config lacks: {e}"),
        })
    })?;
    let prepared = prepare(source, destination, &streams).await?;
    let _planner = planner(destination, run_id).await?;
    // A run failed, or still planning (its planner gone), cannot finish
    // without this resume: one that stops fails it (again).
    let unfinishable = control::run(&**destination.get().await?, run_id)
        .await?
        .is_some_and(|r| r.status == "failed" || r.status == "planning");
    control::reopen(
        &mut **destination.get().await?,
        &config.broker.prefix,
        run_id,
        None,
        config.broker.consumer_timeout,
    )
    .await?
    .map_err(PlanError::Going)?;
    // Re-opened, such a run holds its streams: a resume that stops here
    // fails it, as planning does, rather than leave it going until
    // abandoned. A run that was running stays so: its jobs may well
    // finish it.
    let resumed = resume_reopened(
        source,
        destination,
        publisher,
        ceiling,
        run_id,
        &states,
        &names,
        &prepared,
    )
    .await;
    match resumed {
        Ok(published) => Ok(published),
        Err(e) if unfinishable => Err(planning_failed(destination, run_id, e).await),
        Err(e) => Err(e),
    }
}

/// [`resume_run`] once its run is re-opened.
#[allow(clippy::too_many_arguments)]
async fn resume_reopened(
    source: &Pool,
    destination: &Pool,
    publisher: &Publisher,
    ceiling: &Ceiling,
    run_id: i64,
    states: &[control::PlanState],
    names: &[String],
    prepared: &[PreparedStream<'_>],
) -> Result<u64, PlanError> {
    let lsn = syncfleet_db::pool::wal_position(&**source.get().await?).await?;
    let mut published = 0u64;

    let unfinished = control::unfinished_batches(&**destination.get().await?, run_id).await?;
    for stream in names {
        let todo = unfinished
            .iter()
            .filter(|b| &b.stream == stream && !b.published);
        let (selections, ranges): (Vec<_>, Vec<_>) = todo.partition(|b| b.selection.is_some());
        let batches: Vec<(i64, KeyRange)> = ranges
            .iter()
            .map(|b| (b.batch_no, b.range.clone()))
            .collect();
        for chunk in batches.chunks(CHUNK as usize) {
            publish(destination, publisher, run_id, stream, chunk, lsn).await?;
            published += chunk.len() as u64;
        }
        for b in selections {
            let select = b.selection.clone().expect("partitioned on it");
            publisher
                .publish_jobs(&[Job::selection(run_id, stream, b.batch_no, select).at(lsn)])
                .await?;
            control::mark_published(&**destination.get().await?, run_id, stream, &[b.batch_no])
                .await?;
            published += 1;
        }
    }
    let incremental: bool = destination
        .get()
        .await?
        .query_one(
            "SELECT kind = 'incremental' FROM syncfleet.runs WHERE id = $1",
            &[&run_id],
        )
        .await?
        .get(0);
    for state in states.iter().filter(|s| s.batches_planned.is_none()) {
        // An incremental scan cannot be resumed midway; its watermark has
        // not moved, so the stream's next run picks up the rest. A full
        // run's open last batch recorded leaves only the bookkeeping.
        if incremental || (state.last_batch > 0 && state.last_upper.is_none()) {
            control::finish_stream_planning(
                &**destination.get().await?,
                run_id,
                &state.stream,
                state.last_batch,
            )
            .await?;
            continue;
        }
        let stream = prepared
            .iter()
            .find(|p| p.config.name == state.stream)
            .expect("every run stream was prepared");
        let total = plan_stream(
            source,
            destination,
            publisher,
            ceiling,
            run_id,
            stream,
            state.last_batch,
            state.last_upper.clone(),
        )
        .await?;
        published += (total - state.last_batch) as u64;
    }
    control::mark_planned(&**destination.get().await?, run_id).await?;
    Ok(published)
}

/// Plans an incremental run of one stream: one selection job per
/// `batch_size` rows changed since the stream's watermark. A stream without
/// a `cursor` gets a full run instead.
///
/// The scan walks `(cursor, key)` in order in one snapshot, so rows that
/// share a cursor value are never split and lost between batches, and it
/// starts `cursor_overlap` before the watermark rather than at it. Why an
/// overlap and not a snapshot bound: a row's cursor (`updated_at = now()`)
/// is stamped when its transaction writes it, but the row only becomes
/// visible at commit. A transaction that stamped its rows before this scan
/// and commits after it leaves rows behind the next watermark; looking back
/// over the overlap picks up every such row whose transaction lasted less
/// than the overlap. The rows re-read inside the window cost a re-check
/// (unchanged rows are not rewritten). A snapshot bound (`xmin`) would be
/// exact, but query streams (joins) have no single `xmin` per row; longer
/// transactions, rows without a cursor value and deletes are all settled by
/// the periodic full run.
pub async fn start_incremental_run(
    source: &Pool,
    destination: &Pool,
    publisher: &Publisher,
    ceiling: &Ceiling,
    stream: &StreamConfig,
    stale_after: Duration,
) -> Result<RunPlan, PlanError> {
    let Some(cursor) = &stream.cursor else {
        return start_run(
            source,
            destination,
            publisher,
            ceiling,
            &[stream],
            stale_after,
        )
        .await;
    };
    check_schema(destination).await?;
    let prepared = prepare(source, destination, &[stream]).await?;
    let shape = &prepared[0].shape;
    let Some(cursor_col) = shape.columns.iter().find(|c| &c.name == cursor) else {
        return Err(PlanError::Invalid(ShapeError::Invalid {
            stream: stream.name.clone(),
            field: "cursor",
            message: format!(
                "column '{cursor}' is not among the stream's columns ({})",
                shape.column_names().join(", ")
            ),
        }));
    };
    // The look-back is for a date or a timestamp, also under a domain's
    // name (`stamp` over timestamptz); a time of day would wrap at midnight.
    let time_like = matches!(cursor_col.base_oid, 1082 | 1114 | 1184);
    let watermark = control::watermark(&**destination.get().await?, &stream.name).await?;
    let run_id = control::create_run_of(
        &mut **destination.get().await?,
        publisher.topology().prefix(),
        "incremental",
        &[&stream.name],
        stale_after,
    )
    .await?
    .map_err(PlanError::Going)?;
    let _planner = new_run_planner(destination, run_id).await?;
    let result = plan_incremental(
        source,
        destination,
        publisher,
        ceiling,
        run_id,
        stream,
        shape,
        (cursor_col, time_like),
        watermark,
    )
    .await;
    match result {
        Ok(total) => {
            control::mark_planned(&**destination.get().await?, run_id).await?;
            Ok(RunPlan {
                run_id,
                batches: vec![(stream.name.clone(), total)],
            })
        }
        Err(e) => Err(planning_failed(destination, run_id, e).await),
    }
}

#[allow(clippy::too_many_arguments)]
async fn plan_incremental(
    source: &Pool,
    destination: &Pool,
    publisher: &Publisher,
    ceiling: &Ceiling,
    run_id: i64,
    stream: &StreamConfig,
    shape: &StreamShape,
    (cursor_col, time_like): (&syncfleet_db::shape::Column, bool),
    watermark: Option<(String, Key)>,
) -> Result<i64, PlanError> {
    use syncfleet_core::ident;
    let cursor = stream
        .cursor
        .as_deref()
        .expect("an incremental stream has a cursor");
    let keys = shape.key_names();
    let key_types = shape.key_types();
    let c = format!("q.{}", ident::quote(cursor));
    let (compared, cursor_type) = (cursor_col.compared(c.clone()), &cursor_col.compare_sql);
    let mut params: Vec<String> = Vec::new();
    let lower = match &watermark {
        None => "true".to_string(),
        Some((wc, _)) if time_like && !stream.cursor_overlap.is_zero() => {
            params.push(wc.clone());
            params.push(format!(
                "{} milliseconds",
                stream.cursor_overlap.as_millis()
            ));
            format!("{compared} >= $1::text::{cursor_type} - $2::text::interval")
        }
        Some((wc, wk)) => {
            params.push(wc.clone());
            params.extend(wk.iter().cloned());
            let rhs: Vec<String> = std::iter::once(format!("$1::text::{cursor_type}"))
                .chain(
                    key_types
                        .iter()
                        .enumerate()
                        .map(|(i, t)| format!("${}::text::{t}", i + 2)),
                )
                .collect();
            format!(
                "({compared}, {}) > ({})",
                shape.compared_key("q"),
                rhs.join(", ")
            )
        }
    };
    let key_text: Vec<String> = keys
        .iter()
        .map(|k| format!("q.{}::text", ident::quote(k)))
        .collect();
    let pace = ceiling.pace(destination).await;
    let mut src = source.get().await?;
    let tx = syncfleet_db::pool::read_snapshot(&mut src).await?;
    let lsn = syncfleet_db::pool::wal_position(&*tx).await?;
    let filter = syncfleet_db::scan::apply_pace(&tx, pace).await?;
    let sql = format!(
        "SELECT {c}::text, {} FROM {} AS q WHERE {lower} AND {c} IS NOT NULL{filter} ORDER BY {c}, {}",
        key_text.join(", "),
        shape.relation,
        ident::list(&keys, Some("q")),
    );
    let portal = tx.bind(&sql, &syncfleet_db::sql::bind(&params)).await?;
    let mut count = 0i64;
    let mut last: Option<(String, Key)> = None;
    loop {
        let read =
            async { Ok::<_, PlanError>(tx.query_portal(&portal, stream.batch_size as i32).await?) };
        let rows = ceiling.read(destination, read).await?;
        if rows.is_empty() {
            break;
        }
        let values: Vec<Key> = rows
            .iter()
            .map(|r| syncfleet_db::scan::row_key(r, 1, &stream.name, &keys))
            .collect::<Result<_, _>>()
            .map_err(PlanError::Invalid)?;
        let end = rows.last().expect("rows is not empty");
        last = Some((end.get(0), values.last().cloned().unwrap_or_default()));
        count += 1;
        let select = syncfleet_core::job::Selection {
            columns: keys.iter().map(|k| k.to_string()).collect(),
            values,
        };
        control::insert_selection_batches(
            &**destination.get().await?,
            run_id,
            &stream.name,
            &[(count, select.clone())],
        )
        .await?;
        publisher
            .publish_jobs(&[Job::selection(run_id, &stream.name, count, select).at(lsn)])
            .await?;
        control::mark_published(&**destination.get().await?, run_id, &stream.name, &[count])
            .await?;
        if rows.len() < stream.batch_size as usize {
            break;
        }
    }
    tx.commit().await?;
    let client = destination.get().await?;
    if let Some((cursor_value, key)) = last {
        control::set_scan_end(&**client, run_id, &stream.name, &cursor_value, &key).await?;
    }
    control::finish_stream_planning(&**client, run_id, &stream.name, count).await?;
    tracing::info!(run_id, stream = %stream.name, batches = count, "incremental run planned");
    Ok(count)
}
