//! The control schema: runs and their batches, kept in the destination.
//!
//! Keeping it in the destination is what lets a worker write a batch *and*
//! record it done in one transaction: a batch is done exactly when its rows
//! are committed, and the broker message is acked only after that commit.
//! A run's state is derived from its batches; whichever worker commits the
//! last batch marks the run finished (see [`try_finish_run`]).
//!
//! It also holds what a fleet's workers share about reading the source
//! beyond the ceiling's advisory locks: the `max_rows_per_second` clock
//! ([`charge_read`]) and the throttle level a starting worker takes up
//! ([`fleet_level`]), and the order in which jobs that may write the same
//! rows commit ([`write_locks`]).

use std::time::Duration;

use serde_json::Value;
use syncfleet_core::job::{Job, KeyRange, Lsn, NO_RUN, Selection};
use tokio_postgres::{Client, GenericClient};

use crate::error::DbError;
use crate::pool::Pool;

/// Migrations, in order. Each runs once, in its own transaction; the
/// version table records how many have run.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE syncfleet.runs (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind        text NOT NULL DEFAULT 'full',
    status      text NOT NULL DEFAULT 'planning'
                CHECK (status IN ('planning', 'running', 'succeeded', 'failed')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    planned_at  timestamptz,
    finished_at timestamptz,
    error       text
);
CREATE TABLE syncfleet.run_streams (
    run_id      bigint NOT NULL REFERENCES syncfleet.runs (id) ON DELETE CASCADE,
    stream      text NOT NULL,
    -- NULL until planning of this stream has published every batch.
    batches_planned bigint,
    PRIMARY KEY (run_id, stream)
);
CREATE TABLE syncfleet.batches (
    run_id      bigint NOT NULL,
    stream      text NOT NULL,
    batch_no    bigint NOT NULL,
    lower_key   jsonb,
    upper_key   jsonb,
    status      text NOT NULL DEFAULT 'pending'
                CHECK (status IN ('pending', 'done', 'failed')),
    rows_copied  bigint,
    rows_deleted bigint,
    attempts    integer NOT NULL DEFAULT 0,
    error       text,
    -- Set once the broker confirmed the batch's job; a resumed run
    -- publishes the pending batches that never were.
    published_at timestamptz,
    -- Which worker wrote the batch, and when its transaction started and ended.
    worker      text,
    started_at  timestamptz,
    finished_at timestamptz,
    PRIMARY KEY (run_id, stream, batch_no),
    FOREIGN KEY (run_id, stream) REFERENCES syncfleet.run_streams ON DELETE CASCADE
);
CREATE INDEX batches_pending ON syncfleet.batches (run_id) WHERE status <> 'done';
"#,
    r#"
-- Incremental runs: where each stream's last finished run got to.
CREATE TABLE syncfleet.watermarks (
    stream      text PRIMARY KEY,
    cursor_value text NOT NULL,
    key_value   jsonb NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
-- Where this run's scan of the stream ended; becomes the watermark when
-- the run finishes, and only then.
ALTER TABLE syncfleet.run_streams ADD COLUMN cursor_to text, ADD COLUMN key_to jsonb;
-- The rows a batch names when it is not a key range (incremental runs).
ALTER TABLE syncfleet.batches ADD COLUMN selection jsonb;
"#,
    r#"
-- Pending batches in key order, so that "the first pending batch of a run"
-- is a few index entries however many of its batches are done. Once its
-- statistics say a run's batches are pending, the planner answers a bare
-- "is any pending?" by scanning the table from its finished batches on,
-- which made each job's run-finished check cost more as its run went on.
DROP INDEX syncfleet.batches_pending;
CREATE INDEX batches_pending ON syncfleet.batches (run_id, stream, batch_no) WHERE status <> 'done';
"#,
    r#"
-- Rows of a batch found already equal in the destination, and so not
-- copied (a re-sync of unchanged rows).
ALTER TABLE syncfleet.batches ADD COLUMN rows_unchanged bigint;
"#,
    r#"
-- What the workers of a fleet (a broker prefix) share about reading the
-- source, besides the ceiling's advisory locks.
CREATE TABLE syncfleet.fleet_reads (
    fleet       text PRIMARY KEY,
    -- max_rows_per_second: when the fleet may start its next read, every
    -- batch's rows charged to one clock.
    next_read   timestamptz,
    -- The adaptive throttle's level as a worker last reported it; a worker
    -- that starts begins there rather than at the ceiling.
    level       double precision,
    level_at    timestamptz
);
"#,
    r#"
-- When a failed run was last re-opened (resume, dead-letter replay): it
-- counts as progress, or a run re-opened after a quiet day would count as
-- abandoned at once and lose its hold on its streams.
ALTER TABLE syncfleet.runs ADD COLUMN reopened_at timestamptz;
"#,
    r#"
-- Which run holds a stream: the one that claimed it last, by starting or
-- by being re-opened (see claim_streams). A job of any other run of the
-- stream is superseded: dropped, not run beside the holder's jobs.
-- Existing rows are numbered in the order their runs last claimed, the
-- runs still going last: each holds its streams.
CREATE SEQUENCE syncfleet.claims;
ALTER TABLE syncfleet.run_streams ADD COLUMN claim bigint;
UPDATE syncfleet.run_streams rs SET claim = o.n
  FROM (SELECT s.run_id, s.stream,
               row_number() OVER (ORDER BY r.status IN ('planning', 'running'),
                                  greatest(r.created_at, r.reopened_at), r.id) AS n
          FROM syncfleet.run_streams s JOIN syncfleet.runs r ON r.id = s.run_id) o
 WHERE rs.run_id = o.run_id AND rs.stream = o.stream;
SELECT setval('syncfleet.claims', coalesce((SELECT max(claim) FROM syncfleet.run_streams), 0) + 1, false);
ALTER TABLE syncfleet.run_streams
  ALTER COLUMN claim SET DEFAULT nextval('syncfleet.claims'),
  ALTER COLUMN claim SET NOT NULL;
CREATE INDEX run_streams_claims ON syncfleet.run_streams (stream, claim);
-- The process that created a run (`host:pid`): a producer that stops
-- mid-plan fails its own run, not one started by hand.
ALTER TABLE syncfleet.runs ADD COLUMN created_by text;
"#,
    r#"
-- Waits in the calling transaction for one of `slots` read slots of the
-- fleet `ns` (see ceiling::take_read_slot), and returns it: queued on the
-- server for one slot at a time, so that waiters get slots in turn, in
-- slices of 50 ms under a lock_timeout of its own (the role's stays for
-- the rest of the transaction), between which it tries every slot.
CREATE FUNCTION syncfleet.take_read_slot(slots int, ns text) RETURNS int
LANGUAGE plpgsql AS $fn$
DECLARE
  kept text := current_setting('lock_timeout');
  key int := hashtext(ns);
  start int;
  got int;
BEGIN
  LOOP
    start := floor(random() * slots)::int;
    SELECT (x + start) % slots INTO got FROM generate_series(0, slots - 1) AS x
     WHERE pg_try_advisory_xact_lock(key, (x + start) % slots) LIMIT 1;
    IF got IS NOT NULL THEN
      RETURN got;
    END IF;
    BEGIN
      PERFORM set_config('lock_timeout', '50ms', true);
      PERFORM pg_advisory_xact_lock(key, start);
      PERFORM set_config('lock_timeout', kept, true);
      RETURN start;
    EXCEPTION WHEN lock_not_available THEN
      NULL;
    END;
  END LOOP;
END
$fn$;
"#,
    r#"
-- Reading from standbys (source.replica_url): per stream, the furthest
-- WAL position a job's read may have seen (an upper bound of its
-- snapshot). A later job of the stream waits until its own standby has
-- replayed as far (see last_standby_read).
CREATE TABLE syncfleet.standby_reads (
    stream   text PRIMARY KEY,
    replayed pg_lsn NOT NULL
);
"#,
];

/// The schema version this build expects.
pub const SCHEMA_VERSION: i32 = MIGRATIONS.len() as i32;

/// Creates or upgrades the control schema. Safe to run concurrently and
/// repeatedly; returns the versions applied now.
pub async fn migrate(client: &mut Client) -> Result<Vec<i32>, DbError> {
    let tx = client.transaction().await?;
    // Serialises concurrent migrations across processes.
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext('syncfleet.migrate'))",
        &[],
    )
    .await?;
    tx.batch_execute(
        "CREATE SCHEMA IF NOT EXISTS syncfleet;
         CREATE TABLE IF NOT EXISTS syncfleet.schema_version (version integer NOT NULL);",
    )
    .await?;
    let current = schema_version(&tx).await?;
    let mut applied = Vec::new();
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        let version = i as i32 + 1;
        tx.batch_execute(sql).await?;
        tx.execute(
            "INSERT INTO syncfleet.schema_version VALUES ($1)",
            &[&version],
        )
        .await?;
        applied.push(version);
    }
    tx.commit().await?;
    Ok(applied)
}

/// The control schema's version, 0 when it does not exist.
/// The destination's control schema is not the one this build needs.
#[derive(Debug, thiserror::Error)]
#[error(
    "the control schema in the destination is at version {found}, this syncfleet needs {needed}: run `syncfleet migrate`"
)]
pub struct SchemaMismatch {
    pub found: i32,
    pub needed: i32,
}

/// Checks that the control schema is the one this build needs.
pub async fn check_schema(
    client: &impl GenericClient,
) -> Result<Result<(), SchemaMismatch>, DbError> {
    let found = schema_version(client).await?;
    Ok(if found == SCHEMA_VERSION {
        Ok(())
    } else {
        Err(SchemaMismatch {
            found,
            needed: SCHEMA_VERSION,
        })
    })
}

pub async fn schema_version(client: &impl GenericClient) -> Result<i32, DbError> {
    match client
        .query_one(
            "SELECT coalesce(max(version), 0) FROM syncfleet.schema_version",
            &[],
        )
        .await
    {
        Ok(r) => Ok(r.get(0)),
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => Ok(0),
        Err(e) => Err(e.into()),
    }
}

/// A run that keeps a stream from getting another: see [`runs_going`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("stream '{stream}' has run {run_id} still going")]
pub struct Going {
    pub stream: String,
    pub run_id: i64,
}

/// Creates a run of a kind (`full`, `incremental`) in state `planning`,
/// unless one of its streams has a run still going ([`runs_going`]):
/// jobs of two runs of one stream are not ordered against each other.
/// The check and the insert are one transaction under a per-stream lock,
/// so two producers (the service and a `sync` by hand) cannot both pass;
/// see [`claim_streams`]. `prefix` is the fleet's (the broker's) prefix.
pub async fn create_run_of(
    client: &mut Client,
    prefix: &str,
    kind: &str,
    streams: &[&str],
    stale_after: Duration,
) -> Result<Result<i64, Going>, DbError> {
    let tx = match begin_claim(client, prefix, streams, None, stale_after).await? {
        Ok(tx) => tx,
        Err(going) => return Ok(Err(going)),
    };
    let id: i64 = tx
        .query_one(
            "INSERT INTO syncfleet.runs (kind, created_by) VALUES ($1, $2) RETURNING id",
            &[&kind, &crate::pool::process_name()],
        )
        .await?
        .get(0);
    // Each row takes the next claim: this run now holds its streams.
    tx.execute(
        "INSERT INTO syncfleet.run_streams (run_id, stream) SELECT $1, unnest($2::text[])",
        &[&id, &streams],
    )
    .await?;
    tx.commit().await?;
    Ok(Ok(id))
}

/// The transaction in which a run starts (or `except`, re-opens) and
/// claims `streams`, or the run that keeps one of them going. Refused
/// before taking the streams' write locks, which would wait for the going
/// run's jobs in flight; the abandonments the checks make are kept.
async fn begin_claim<'c>(
    client: &'c mut Client,
    prefix: &str,
    streams: &[&str],
    except: Option<i64>,
    stale_after: Duration,
) -> Result<Result<tokio_postgres::Transaction<'c>, Going>, DbError> {
    if let Some(going) = runs_going(&*client, streams, except, stale_after)
        .await?
        .pop()
    {
        return Ok(Err(going));
    }
    let tx = read_committed(client).await?;
    if let Err(going) = claim_streams(&tx, prefix, streams, except, stale_after).await? {
        tx.commit().await?;
        return Ok(Err(going));
    }
    Ok(Ok(tx))
}

/// A transaction that is read committed whatever the server's default, so
/// that each statement sees what others committed while it waited for
/// their locks (claims in [`claim_streams`], the run's row in
/// [`fail_batch`]).
async fn read_committed(client: &mut Client) -> Result<tokio_postgres::Transaction<'_>, DbError> {
    Ok(client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::ReadCommitted)
        .start()
        .await?)
}

/// How long a run's start (or re-opening) waits for the jobs of its
/// streams still in a transaction ([`claim_streams`]): each ends within
/// its deadline (60 s by default) unless its session is stranded (a
/// worker cut off mid-job, whose session the server keeps until its
/// keepalive probes fail, about a minute: see `pool`). Past it, the start
/// fails, to be tried again (the next tick). It bounds each lock wait.
const CLAIM_WAIT: &str = "120s";

/// In a transaction that starts or re-opens (`except`) a run of
/// `streams`: a run other than `except` still going there, if any
/// ([`runs_going`]); if none, the streams are claimed for the run.
///
/// Takes two locks per stream, to the end of the transaction:
/// - the stream's run lock, so that such transactions take turns and each
///   sees the runs the others started;
/// - its write lock ([`write_locks`]), exclusively, unless `except`
///   already holds the stream. That waits for every job of the stream
///   still in a transaction: such a job has checked that its run holds
///   the stream ([`SUPERSEDED`]) and may be reading, and the claim must
///   not commit before it does, or a job of the new holder could read
///   after it and commit before it. Jobs that lock after the claim commits
///   see it, and those of other runs drop out.
///
/// The write locks come before the abandoning check ([`runs_going`]), not
/// after: it fails abandoned runs and marks their pending batches, whose
/// jobs, were any running, would wait on those rows while holding the
/// write lock. A read-only check comes before both, so that a refusal
/// waits for nothing.
///
/// A claim makes the pending batches that other runs had published in
/// these streams unpublished: their jobs will be dropped, so `sync
/// --resume` of their run publishes them again. `except` takes the next
/// claims itself; a new run's rows take theirs when inserted.
async fn claim_streams(
    tx: &impl GenericClient,
    prefix: &str,
    streams: &[&str],
    except: Option<i64>,
    stale_after: Duration,
) -> Result<Result<(), Going>, DbError> {
    // Bounds every wait of the transaction, for locks and rows alike.
    tx.execute(
        "SELECT set_config('lock_timeout', $1, true)",
        &[&CLAIM_WAIT],
    )
    .await?;
    let mut runs: Vec<String> = streams
        .iter()
        .map(|s| format!("syncfleet.runs/{s}"))
        .collect();
    runs.sort();
    // Each statement takes its locks in the order given, waiting for each.
    let lock_all =
        "SELECT pg_advisory_xact_lock(hashtextextended(n, 0))::text FROM unnest($1::text[]) AS n";
    tx.execute(lock_all, &[&runs]).await?;
    // Under the run locks, no other claim moves: what `except` holds stays.
    let taken: Vec<String> = tx
        .query(
            "SELECT s FROM unnest($1::text[]) AS s WHERE NOT EXISTS ( \
               SELECT 1 FROM syncfleet.run_streams mine WHERE mine.run_id = $2 AND mine.stream = s \
               AND NOT EXISTS (SELECT 1 FROM syncfleet.run_streams later \
                               WHERE later.stream = s AND later.claim > mine.claim))",
            &[&streams, &except],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    // Refused before waiting for the write locks: under the run locks no
    // other claim can set a run going in these streams meanwhile.
    if let Some(going) = going(tx, streams, except, stale_after).await?.pop() {
        return Ok(Err(going));
    }
    let mut writes: Vec<String> = taken.iter().map(|s| stream_write_lock(prefix, s)).collect();
    writes.sort();
    tx.execute(lock_all, &[&writes]).await?;
    if let Some(going) = runs_going(tx, streams, except, stale_after).await?.pop() {
        return Ok(Err(going));
    }
    tx.execute(
        "UPDATE syncfleet.batches SET published_at = NULL \
         WHERE stream = ANY($1) AND run_id IS DISTINCT FROM $2 \
         AND status = 'pending' AND published_at IS NOT NULL",
        &[&taken, &except],
    )
    .await?;
    if let Some(run_id) = except {
        tx.execute(
            "UPDATE syncfleet.run_streams SET claim = nextval('syncfleet.claims') \
             WHERE run_id = $1 AND stream = ANY($2)",
            &[&run_id, &taken],
        )
        .await?;
    }
    Ok(Ok(()))
}

fn key_json(key: &Option<Vec<String>>) -> Option<Value> {
    key.as_ref()
        .map(|k| Value::Array(k.iter().cloned().map(Value::String).collect()))
}

/// Records planned batches (one statement for the whole chunk).
pub async fn insert_batches(
    client: &impl GenericClient,
    run_id: i64,
    stream: &str,
    batches: &[(i64, KeyRange)],
) -> Result<(), DbError> {
    let numbers: Vec<i64> = batches.iter().map(|(n, _)| *n).collect();
    let lowers: Vec<Option<Value>> = batches.iter().map(|(_, r)| key_json(&r.lower)).collect();
    let uppers: Vec<Option<Value>> = batches.iter().map(|(_, r)| key_json(&r.upper)).collect();
    client
        .execute(
            "INSERT INTO syncfleet.batches (run_id, stream, batch_no, lower_key, upper_key) \
             SELECT $1, $2, b.n, b.lo, b.hi FROM unnest($3::int8[], $4::jsonb[], $5::jsonb[]) AS b(n, lo, hi)",
            &[&run_id, &stream, &numbers, &lowers, &uppers],
        )
        .await?;
    Ok(())
}

/// Records that the broker confirmed these batches' jobs, unless another
/// run has claimed the stream since (an abandoned run's planner still at
/// work): those jobs will be dropped ([`SUPERSEDED`]), and a resume of the
/// run must publish them again.
pub async fn mark_published(
    client: &impl GenericClient,
    run_id: i64,
    stream: &str,
    batch_nos: &[i64],
) -> Result<(), DbError> {
    client
        .execute(
            "UPDATE syncfleet.batches SET published_at = now() \
             WHERE run_id = $1 AND stream = $2 AND batch_no = ANY ($3) \
             AND NOT EXISTS (SELECT 1 FROM syncfleet.run_streams mine \
                             JOIN syncfleet.run_streams later \
                               ON later.stream = mine.stream AND later.claim > mine.claim \
                             WHERE mine.run_id = $1 AND mine.stream = $2)",
            &[&run_id, &stream, &batch_nos],
        )
        .await?;
    Ok(())
}

/// A recorded batch, as resuming a run needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchRecord {
    pub stream: String,
    pub batch_no: i64,
    pub range: KeyRange,
    /// Set for the batches of incremental runs, which name rows, not a range.
    pub selection: Option<Selection>,
    pub status: String,
    pub published: bool,
}

fn key_from_json(value: Option<Value>) -> Option<Vec<String>> {
    value.and_then(|v| serde_json::from_value(v).ok())
}

/// The batches of a run that are not done, in order.
pub async fn unfinished_batches(
    client: &impl GenericClient,
    run_id: i64,
) -> Result<Vec<BatchRecord>, DbError> {
    let rows = client
        .query(
            "SELECT stream, batch_no, lower_key, upper_key, status, published_at IS NOT NULL, selection \
             FROM syncfleet.batches WHERE run_id = $1 AND status <> 'done' ORDER BY stream, batch_no",
            &[&run_id],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| BatchRecord {
            stream: r.get(0),
            batch_no: r.get(1),
            range: KeyRange {
                lower: key_from_json(r.get(2)),
                upper: key_from_json(r.get(3)),
            },
            status: r.get(4),
            published: r.get(5),
            selection: r
                .get::<_, Option<Value>>(6)
                .and_then(|s| serde_json::from_value(s).ok()),
        })
        .collect())
}

/// Where a stream's planning got to: `Some(n)` batches when it finished,
/// else the number and upper key of the last batch recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanState {
    pub stream: String,
    pub batches_planned: Option<i64>,
    pub last_batch: i64,
    pub last_upper: Option<Vec<String>>,
}

pub async fn plan_states(
    client: &impl GenericClient,
    run_id: i64,
) -> Result<Vec<PlanState>, DbError> {
    let rows = client
        .query(
            "SELECT rs.stream, rs.batches_planned, coalesce(b.batch_no, 0), b.upper_key \
             FROM syncfleet.run_streams rs LEFT JOIN LATERAL ( \
                SELECT batch_no, upper_key FROM syncfleet.batches \
                WHERE run_id = rs.run_id AND stream = rs.stream ORDER BY batch_no DESC LIMIT 1) b ON true \
             WHERE rs.run_id = $1 ORDER BY rs.stream",
            &[&run_id],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| PlanState {
            stream: r.get(0),
            batches_planned: r.get(1),
            last_batch: r.get(2),
            last_upper: key_from_json(r.get(3)),
        })
        .collect())
}

/// A run's planner, for as long as it plans or resumes the run: holds a
/// session advisory lock on a connection of its own, out of the pool.
/// Dropped, the connection closes and the server lets the lock go, as it
/// does when the planner's process dies.
pub struct Planner {
    _session: deadpool_postgres::ClientWrapper,
}

/// Becomes `run_id`'s planner, unless another process is (`None`): two
/// planners of one run would walk its keys side by side and number its
/// batches twice.
pub async fn plan_run(destination: &Pool, run_id: i64) -> Result<Option<Planner>, DbError> {
    let client = destination.get().await?;
    let mine: bool = client
        .query_one(
            "SELECT pg_try_advisory_lock(hashtextextended('syncfleet.planning ' || $1::int8, 0))",
            &[&run_id],
        )
        .await?
        .get(0);
    Ok(mine.then(|| Planner {
        _session: deadpool_postgres::Object::take(client),
    }))
}

/// Makes failed batches of a run pending again and the run running again
/// (resume and dead-letter replay); returns how many batches were reopened.
///
/// Refused while another run of one of its streams is still going
/// ([`runs_going`]): the re-opened jobs would not be ordered against that
/// run's.
pub async fn reopen(
    client: &mut Client,
    prefix: &str,
    run_id: i64,
    only: Option<(&str, i64)>,
    stale_after: Duration,
) -> Result<Result<u64, Going>, DbError> {
    let (stream, batch) = match only {
        Some((s, b)) => (Some(s), Some(b)),
        None => (None, None),
    };
    let streams: Vec<String> = match stream {
        Some(s) => vec![s.to_string()],
        // The streams it has work left in: a resume publishes to no other.
        None => client
            .query(
                "SELECT rs.stream FROM syncfleet.run_streams rs WHERE rs.run_id = $1 \
                 AND (rs.batches_planned IS NULL OR EXISTS (SELECT 1 FROM syncfleet.batches b \
                      WHERE b.run_id = rs.run_id AND b.stream = rs.stream AND b.status <> 'done'))",
                &[&run_id],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect(),
    };
    let streams: Vec<&str> = streams.iter().map(String::as_str).collect();
    let tx = match begin_claim(client, prefix, &streams, Some(run_id), stale_after).await? {
        Ok(tx) => tx,
        Err(going) => return Ok(Err(going)),
    };
    // The run's row before its batches', the order every transaction that
    // changes both takes them in (see `runs_going`, `fail_batch`).
    // A run not failed (its planner or its jobs gone quiet, not abandoned
    // yet) counts as making progress from now on too.
    tx.execute(
        "UPDATE syncfleet.runs SET status = CASE WHEN planned_at IS NULL THEN 'planning' ELSE 'running' END, \
         error = NULL, finished_at = NULL, reopened_at = now() \
         WHERE id = $1 AND status IN ('failed', 'planning', 'running')",
        &[&run_id],
    )
    .await?;
    let n = tx
        .execute(
            "UPDATE syncfleet.batches SET status = 'pending', attempts = 0, error = NULL, finished_at = NULL, \
             published_at = NULL \
             WHERE run_id = $1 AND status = 'failed' \
             AND ($2::text IS NULL OR stream = $2) AND ($3::int8 IS NULL OR batch_no = $3)",
            &[&run_id, &stream, &batch],
        )
        .await?;
    tx.commit().await?;
    Ok(Ok(n))
}

/// Records a failed attempt that will be retried: the batch stays pending.
pub async fn record_retry(
    client: &mut Client,
    run_id: i64,
    stream: &str,
    batch_no: i64,
    error: &str,
) -> Result<(), DbError> {
    let tx = settling(client, SETTLE_WITHIN).await?;
    tx.execute(
        "UPDATE syncfleet.batches SET attempts = attempts + 1, error = $4 \
         WHERE run_id = $1 AND stream = $2 AND batch_no = $3 AND status = 'pending'",
        &[&run_id, &stream, &batch_no, &error],
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// How long recording a job's end may take: within the slack the broker
/// leaves after a job's deadline (`SETTLE_SLACK`). A lock held on the
/// control schema (a migration, `VACUUM FULL`) then fails the record in a
/// few seconds rather than holding the job's delivery, and its worker's
/// slot, for as long as the lock lasts.
pub const SETTLE_WITHIN: std::time::Duration = std::time::Duration::from_secs(3);

/// A transaction whose statements each end `within`.
async fn settling(
    client: &mut Client,
    within: std::time::Duration,
) -> Result<tokio_postgres::Transaction<'_>, DbError> {
    let tx = read_committed(client).await?;
    tx.batch_execute(&format!(
        "SET LOCAL statement_timeout = {}",
        within.as_millis().max(1)
    ))
    .await?;
    Ok(tx)
}

/// A failed batch, for `status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedBatch {
    pub stream: String,
    pub batch_no: i64,
    pub attempts: i32,
    pub error: String,
}

pub async fn failed_batches(
    client: &impl GenericClient,
    run_id: i64,
) -> Result<Vec<FailedBatch>, DbError> {
    let rows = client
        .query(
            "SELECT stream, batch_no, attempts, coalesce(error, '') FROM syncfleet.batches \
             WHERE run_id = $1 AND status = 'failed' ORDER BY stream, batch_no LIMIT 20",
            &[&run_id],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| FailedBatch {
            stream: r.get(0),
            batch_no: r.get(1),
            attempts: r.get(2),
            error: r.get(3),
        })
        .collect())
}

/// Records that a stream's planning is complete with `count` batches.
pub async fn finish_stream_planning(
    client: &impl GenericClient,
    run_id: i64,
    stream: &str,
    count: i64,
) -> Result<(), DbError> {
    client
        .execute(
            "UPDATE syncfleet.run_streams SET batches_planned = $3 WHERE run_id = $1 AND stream = $2",
            &[&run_id, &stream, &count],
        )
        .await?;
    Ok(())
}

/// Moves a fully published run from `planning` to `running`, then finishes
/// it if the workers were quicker than the planner.
pub async fn mark_planned(client: &impl GenericClient, run_id: i64) -> Result<(), DbError> {
    client
        .execute(
            // A run can fail while it plans (a batch dead-lettered before
            // the last chunk is published): it is planned all the same, so
            // that re-opened it runs rather than waits for a planner.
            "UPDATE syncfleet.runs SET planned_at = now(), \
               status = CASE status WHEN 'planning' THEN 'running' ELSE status END \
             WHERE id = $1 AND planned_at IS NULL",
            &[&run_id],
        )
        .await?;
    client.query_one(TRY_FINISH_RUN, &[&run_id]).await?;
    Ok(())
}

/// Marks a run failed with a reason (for example, planning failed).
pub async fn fail_run(
    client: &impl GenericClient,
    run_id: i64,
    error: &str,
) -> Result<(), DbError> {
    client
        .execute(
            "UPDATE syncfleet.runs SET status = 'failed', finished_at = now(), error = $2 \
             WHERE id = $1 AND status IN ('planning', 'running')",
            &[&run_id, &error],
        )
        .await?;
    Ok(())
}

/// One batch a destination transaction wrote.
#[derive(Debug, Clone, Copy)]
pub struct DoneBatch<'a> {
    pub run_id: i64,
    pub stream: &'a str,
    pub batch_no: i64,
    pub rows_copied: i64,
    pub rows_deleted: i64,
    pub rows_unchanged: i64,
}

/// Marks batches done inside the transaction that wrote their rows, in one
/// statement however many there are. Returns false when the control schema
/// does not know one of them.
pub async fn complete_batches(
    client: &impl deadpool_postgres::GenericClient,
    batches: &[DoneBatch<'_>],
    worker: &str,
) -> Result<bool, DbError> {
    // Prepared once per connection: it runs once per transaction.
    let statement = client.prepare_cached(COMPLETE_BATCHES).await?;
    let column = |f: fn(&DoneBatch) -> i64| batches.iter().map(f).collect::<Vec<i64>>();
    let streams: Vec<&str> = batches.iter().map(|b| b.stream).collect();
    let n = client
        .execute(
            &statement,
            &[
                &column(|b| b.run_id),
                &streams,
                &column(|b| b.batch_no),
                &column(|b| b.rows_copied),
                &column(|b| b.rows_deleted),
                &column(|b| b.rows_unchanged),
                &worker,
            ],
        )
        .await?;
    // A batch named twice (a redelivery grouped with its original) is
    // updated once.
    let mut distinct: Vec<(i64, &str, i64)> = batches
        .iter()
        .map(|b| (b.run_id, b.stream, b.batch_no))
        .collect();
    distinct.sort_unstable();
    distinct.dedup();
    Ok(n == distinct.len() as u64)
}

/// The advisory locks a destination transaction takes, before its source
/// snapshot begins, for the jobs it runs, as `(names, exclusive)` for
/// [`LOCK_WRITES`].
///
/// Two jobs that write the same rows must commit in the order their
/// source snapshots were taken, or the older read lands last: a run's
/// 10,000-row batch that read a row before the app changed it, merged
/// after the event job that carried the change, would put the old value
/// back until the next run. Holding the lock from before the snapshot
/// until the commit orders them. Which jobs can meet:
/// - a job of no run (an upstream event's rows) and any other job of its
///   stream: an event job takes its stream exclusively, every other job
///   shares it;
/// - two copies of one batch (a redelivery racing its original): each
///   takes its batch exclusively;
/// - jobs of two runs of a stream: no run starts while another is going
///   ([`runs_going`]), but an abandoned run's jobs may still be in the
///   broker. A run's start takes its streams exclusively
///   ([`claim_streams`]), and a job that finds its run no longer holds its
///   stream ([`SUPERSEDED`]) is dropped.
///
/// Two batches of one run never hold the same keys, so range jobs still
/// run side by side. Names are sorted, so that transactions wait for each
/// other in one order.
pub fn write_locks<'a>(
    prefix: &str,
    jobs: impl IntoIterator<Item = &'a Job>,
) -> (Vec<String>, Vec<bool>) {
    let mut locks: Vec<(String, bool)> = Vec::new();
    for job in jobs {
        let stream = stream_write_lock(prefix, &job.stream);
        match job.run_id {
            NO_RUN => locks.push((stream, true)),
            run => {
                locks.push((format!("{stream}/{run}/{}", job.batch), true));
                locks.push((stream, false));
            }
        }
    }
    locks.sort();
    // A name taken both ways is taken exclusively.
    locks.dedup_by(|later, kept| {
        let same = later.0 == kept.0;
        kept.1 |= same && later.1;
        same
    });
    locks.into_iter().unzip()
}

/// The lock that orders a stream's writes: see [`write_locks`].
fn stream_write_lock(prefix: &str, stream: &str) -> String {
    format!("syncfleet.writes/{prefix}/{stream}")
}

/// Takes [`write_locks`] in the open transaction, waiting for each in turn.
pub const LOCK_WRITES: &str = "SELECT (CASE WHEN u.exclusive \
     THEN pg_advisory_xact_lock(hashtextextended(u.name, 0)) \
     ELSE pg_advisory_xact_lock_shared(hashtextextended(u.name, 0)) END)::text \
     FROM unnest($1::text[], $2::bool[]) AS u(name, exclusive)";

/// Of a transaction's jobs (`$1` their runs, `$2` their streams), those
/// whose run no longer holds the stream: another run claimed it since
/// ([`claim_streams`]), so the job's batch is that run's to cover. Run
/// after [`LOCK_WRITES`] in the same transaction: a claim either committed
/// before the lock was granted, and is seen here, or waits for this
/// transaction to end.
pub const SUPERSEDED: &str = "SELECT u.run_id, u.stream \
     FROM unnest($1::bigint[], $2::text[]) AS u(run_id, stream) \
     JOIN syncfleet.run_streams mine ON mine.run_id = u.run_id AND mine.stream = u.stream \
     WHERE EXISTS (SELECT 1 FROM syncfleet.run_streams later \
                   WHERE later.stream = u.stream AND later.claim > mine.claim)";

/// Reading from standbys: the furthest WAL position the reads of any
/// earlier job of `streams` may have seen ([`record_standby_read`]).
/// Behind a load balancer over several standbys, a job's standby can be
/// behind the one an earlier job of its rows read, and a read of it would
/// put rows older than that job's back; a job waits until its standby has
/// replayed this far, before its snapshot and again under its write locks.
/// Those order the jobs that may write the same rows: an event job takes
/// its stream exclusively, and the jobs of one run that share it cover
/// disjoint key ranges. With one standby, replay only moves forward and
/// the answer is always behind it.
pub async fn last_standby_read(
    client: &impl deadpool_postgres::GenericClient,
    streams: &[&str],
) -> Result<Option<Lsn>, DbError> {
    let statement = client
        .prepare_cached(
            "SELECT pg_wal_lsn_diff(max(replayed), '0/0')::int8 FROM syncfleet.standby_reads \
             WHERE stream = ANY($1)",
        )
        .await?;
    let row = client.query_one(&statement, &[&streams]).await?;
    Ok(row.get::<_, Option<i64>>(0).map(|n| Lsn(n as u64)))
}

/// See [`record_standby_read`]: the streams (`$1`, sorted, so that two
/// transactions lock their rows in one order) and the position (`$2`).
pub const RECORD_STANDBY_READ: &str = "INSERT INTO syncfleet.standby_reads AS r (stream, replayed) \
     SELECT s, $2::text::pg_lsn FROM unnest($1::text[]) AS s ORDER BY s \
     ON CONFLICT (stream) DO UPDATE SET replayed = greatest(r.replayed, excluded.replayed)";

/// Records, in the transaction that writes a job's rows, a WAL position
/// its source session had reached after its snapshot was taken
/// ([`crate::pool::READ_AT_MOST`]): at least as far as the snapshot holds.
/// Concurrent jobs of a stream update its one row, so their commits take
/// turns (reading from standbys only). Prepared once per connection, and
/// sent at once if it has been, so that it can be pipelined before the
/// `COMMIT`.
pub async fn record_standby_read(
    client: &impl deadpool_postgres::GenericClient,
    streams: &[&str],
    replayed: Lsn,
) -> Result<(), DbError> {
    let statement = client.prepare_cached(RECORD_STANDBY_READ).await?;
    let mut streams = streams.to_vec();
    streams.sort_unstable();
    streams.dedup();
    client
        .execute(&statement, &[&streams, &replayed.to_string()])
        .await?;
    Ok(())
}

/// See [`complete_batches`].
pub const COMPLETE_BATCHES: &str = "UPDATE syncfleet.batches b SET status = 'done', \
     rows_copied = u.rows_copied, rows_deleted = u.rows_deleted, rows_unchanged = u.rows_unchanged, \
     attempts = b.attempts + 1, error = NULL, worker = $7, started_at = now(), \
     finished_at = clock_timestamp() \
     FROM unnest($1::bigint[], $2::text[], $3::bigint[], $4::bigint[], $5::bigint[], $6::bigint[]) \
       AS u(run_id, stream, batch_no, rows_copied, rows_deleted, rows_unchanged) \
     WHERE b.run_id = u.run_id AND b.stream = u.stream AND b.batch_no = u.batch_no";

/// Marks the run succeeded if it is fully planned and no batch is left.
///
/// Called after each batch commit. Of the workers committing a run's last
/// batches concurrently, the one that commits last runs this after every
/// other commit is visible, so exactly that check sees zero pending batches.
pub async fn try_finish_run(
    client: &impl deadpool_postgres::GenericClient,
    run_id: i64,
) -> Result<bool, DbError> {
    let statement = client.prepare_cached(TRY_FINISH_RUN).await?;
    let finished: i64 = client.query_one(&statement, &[&run_id]).await?.get(0);
    Ok(finished == 1)
}

/// Finishes the run if nothing is left, and in the same statement moves
/// its streams' watermarks to where its scans ended. An incremental scan
/// that found nothing new leaves its watermark where it is, but marks it
/// current (`updated_at`): a quiet stream is not a stale one. A failed run
/// finishes too once every stream is planned and every batch done: a
/// batch failed by one copy of its job (a duplicate out of its attempts)
/// and then done by another.
pub const TRY_FINISH_RUN: &str = "WITH fin AS ( \
       UPDATE syncfleet.runs SET status = 'succeeded', finished_at = now(), error = NULL, \
         planned_at = coalesce(planned_at, now()) \
       WHERE id = $1 AND (status = 'running' OR status = 'failed' AND NOT EXISTS \
         (SELECT 1 FROM syncfleet.run_streams WHERE run_id = $1 AND batches_planned IS NULL)) \
       AND (SELECT batch_no FROM syncfleet.batches WHERE run_id = $1 AND status <> 'done' \
            ORDER BY stream, batch_no LIMIT 1) IS NULL \
       RETURNING id, kind), \
     wm AS ( \
       INSERT INTO syncfleet.watermarks (stream, cursor_value, key_value) \
       SELECT rs.stream, rs.cursor_to, rs.key_to FROM syncfleet.run_streams rs JOIN fin ON fin.id = rs.run_id \
       WHERE rs.cursor_to IS NOT NULL \
       ON CONFLICT (stream) DO UPDATE SET cursor_value = EXCLUDED.cursor_value, \
         key_value = EXCLUDED.key_value, updated_at = now()), \
     quiet AS ( \
       UPDATE syncfleet.watermarks w SET updated_at = now() \
       FROM syncfleet.run_streams rs JOIN fin ON fin.id = rs.run_id \
       WHERE fin.kind = 'incremental' AND rs.cursor_to IS NULL AND rs.batches_planned = 0 \
       AND w.stream = rs.stream) \
     SELECT count(*) FROM fin";

/// A stream's watermark: the cursor value and key where its last finished
/// incremental run ended.
pub async fn watermark(
    client: &impl GenericClient,
    stream: &str,
) -> Result<Option<(String, Vec<String>)>, DbError> {
    let row = client
        .query_opt(
            "SELECT cursor_value, key_value FROM syncfleet.watermarks WHERE stream = $1",
            &[&stream],
        )
        .await?;
    Ok(row.map(|r| {
        let key: Value = r.get(1);
        (r.get(0), serde_json::from_value(key).unwrap_or_default())
    }))
}

/// Records where this run's scan of a stream ended.
pub async fn set_scan_end(
    client: &impl GenericClient,
    run_id: i64,
    stream: &str,
    cursor: &str,
    key: &[String],
) -> Result<(), DbError> {
    let key = Value::Array(key.iter().cloned().map(Value::String).collect());
    client
        .execute(
            "UPDATE syncfleet.run_streams SET cursor_to = $3, key_to = $4 WHERE run_id = $1 AND stream = $2",
            &[&run_id, &stream, &cursor, &key],
        )
        .await?;
    Ok(())
}

/// How long ago, on the destination's clock, the newest full run of
/// `stream` that has not failed was created; `None` if there is none.
pub async fn last_full_run_age(
    client: &impl GenericClient,
    stream: &str,
) -> Result<Option<std::time::Duration>, DbError> {
    let seconds: Option<f64> = client
        .query_one(
            "SELECT extract(epoch FROM now() - max(r.created_at))::float8 \
             FROM syncfleet.runs r JOIN syncfleet.run_streams rs ON rs.run_id = r.id \
             WHERE rs.stream = $1 AND r.kind = 'full' AND r.status <> 'failed'",
            &[&stream],
        )
        .await?
        .get(0);
    Ok(seconds.map(|s| std::time::Duration::from_secs_f64(s.max(0.0))))
}

/// The newest run's id (0 before any): runs started later have higher ids.
pub async fn last_run_id(client: &impl GenericClient) -> Result<i64, DbError> {
    Ok(client
        .query_one("SELECT coalesce(max(id), 0)::int8 FROM syncfleet.runs", &[])
        .await?
        .get(0))
}

/// Fails the runs of `stream` newer than `after` that this process created
/// (`runs.created_by`) and that are still planning, saying `why` and how
/// to resume them: a planner stopped on purpose, so that the next leader's
/// tick need not wait for them to count as abandoned. A run started by
/// hand meanwhile is not this process's to fail. Returns their ids.
pub async fn fail_planning_runs(
    client: &impl GenericClient,
    stream: &str,
    after: i64,
    why: &str,
) -> Result<Vec<i64>, DbError> {
    Ok(client
        .query(
            "UPDATE syncfleet.runs r SET status = 'failed', finished_at = now(), \
               error = format('%s; resume it with syncfleet sync --resume %s', $3::text, r.id) \
             FROM syncfleet.run_streams rs \
             WHERE rs.run_id = r.id AND rs.stream = $1 AND r.id > $2 AND r.status = 'planning' \
             AND r.created_by = $4 \
             RETURNING r.id",
            &[&stream, &after, &why, &crate::pool::process_name()],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Whether a stream has a run still going: see [`runs_going`].
pub async fn stream_busy(
    client: &impl GenericClient,
    stream: &str,
    stale_after: Duration,
) -> Result<bool, DbError> {
    Ok(!runs_going(client, &[stream], None, stale_after)
        .await?
        .is_empty())
}

/// The runs of `streams` (but `except`) still going, one per stream: a run
/// still planning or running that has made progress within `stale_after`,
/// or a failed run (one of its batches dead-lettered, say) whose other
/// published batches are still pending and that made progress within it.
/// Progress is the run's creation, planning or re-opening, or a batch
/// finished. Only the stream's holder (its last claim) counts: a run
/// superseded there (re-opened for another of its streams, say) has its
/// jobs in that stream dropped, and must not block it.
///
/// Runs planning or running without progress are failed here first
/// ("abandoned"): a producer that died mid-plan, or a batch the broker
/// dead-lettered by its delivery limit, must not block the stream for ever.
/// Their pending batches count as unpublished from then on: whatever became
/// of their jobs, `sync --resume` publishes them again. One with nothing
/// left (its finish lost after its last commit) is finished instead.
pub async fn runs_going(
    client: &impl GenericClient,
    streams: &[&str],
    except: Option<i64>,
    stale_after: Duration,
) -> Result<Vec<Going>, DbError> {
    let seconds = stale_after.as_secs_f64();
    let abandoned = client
        .query(
            "WITH abandoned AS ( \
               UPDATE syncfleet.runs r SET status = 'failed', finished_at = now(), \
                 error = format('abandoned: no progress for %s seconds; resume it with syncfleet sync --resume %s', $2::float8, r.id) \
               FROM syncfleet.run_streams rs \
               WHERE rs.run_id = r.id AND rs.stream = ANY($1) AND r.status IN ('planning', 'running') \
               AND greatest(r.created_at, r.planned_at, r.reopened_at, \
                     (SELECT max(b.finished_at) FROM syncfleet.batches b WHERE b.run_id = r.id)) \
                   < now() - make_interval(secs => $2::float8) \
               RETURNING r.id) \
             , unpublished AS ( \
               UPDATE syncfleet.batches b SET published_at = NULL FROM abandoned a \
               WHERE b.run_id = a.id AND b.status = 'pending') \
             SELECT id FROM abandoned",
            &[&streams, &seconds],
        )
        .await?;
    for row in abandoned {
        client
            .query_one(TRY_FINISH_RUN, &[&row.get::<_, i64>(0)])
            .await?;
    }
    going(client, streams, except, stale_after).await
}

/// [`runs_going`] without failing the abandoned runs (which it leaves out
/// all the same): reads only.
async fn going(
    client: &impl GenericClient,
    streams: &[&str],
    except: Option<i64>,
    stale_after: Duration,
) -> Result<Vec<Going>, DbError> {
    let seconds = stale_after.as_secs_f64();
    Ok(client
        .query(
            "SELECT DISTINCT ON (rs.stream) rs.stream, r.id \
             FROM syncfleet.runs r JOIN syncfleet.run_streams rs ON rs.run_id = r.id \
             WHERE rs.stream = ANY($1) AND r.id IS DISTINCT FROM $3 \
             AND NOT EXISTS (SELECT 1 FROM syncfleet.run_streams later \
                             WHERE later.stream = rs.stream AND later.claim > rs.claim) \
             AND (r.status IN ('planning', 'running') \
               OR (r.status = 'failed' \
                   AND EXISTS (SELECT 1 FROM syncfleet.batches b WHERE b.run_id = r.id AND b.stream = rs.stream \
                               AND b.status = 'pending' AND b.published_at IS NOT NULL))) \
             AND greatest(r.created_at, r.planned_at, r.reopened_at, r.finished_at, \
                   (SELECT max(b.finished_at) FROM syncfleet.batches b WHERE b.run_id = r.id)) \
                 >= now() - make_interval(secs => $2::float8) \
             ORDER BY rs.stream, r.id DESC",
            &[&streams, &seconds, &except],
        )
        .await?
        .iter()
        .map(|r| Going {
            stream: r.get(0),
            run_id: r.get(1),
        })
        .collect())
}

/// Records planned selection batches (incremental runs).
pub async fn insert_selection_batches(
    client: &impl GenericClient,
    run_id: i64,
    stream: &str,
    batches: &[(i64, Selection)],
) -> Result<(), DbError> {
    let numbers: Vec<i64> = batches.iter().map(|(n, _)| *n).collect();
    let selections: Vec<Value> = batches
        .iter()
        .map(|(_, s)| serde_json::to_value(s).expect("a selection serializes"))
        .collect();
    client
        .execute(
            "INSERT INTO syncfleet.batches (run_id, stream, batch_no, selection) \
             SELECT $1, $2, b.n, b.s FROM unnest($3::int8[], $4::jsonb[]) AS b(n, s)",
            &[&run_id, &stream, &numbers, &selections],
        )
        .await?;
    Ok(())
}

/// One run as `status` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSummary {
    pub id: i64,
    pub status: String,
    pub created_at: String,
    pub finished_at: Option<String>,
    pub seconds: f64,
    pub error: Option<String>,
}

/// Progress of one stream in a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamProgress {
    pub stream: String,
    pub batches_done: i64,
    pub batches_failed: i64,
    /// Batches recorded so far; final once `planned` is true.
    pub batches_total: i64,
    pub planned: bool,
    /// Rows of its finished batches: copied, or found unchanged.
    pub rows: i64,
}

const RUN_COLUMNS: &str = "id, status, to_char(created_at, 'YYYY-MM-DD HH24:MI:SS'), \
     to_char(finished_at, 'YYYY-MM-DD HH24:MI:SS'), \
     extract(epoch FROM coalesce(finished_at, now()) - created_at)::float8, error";

fn run_from_row(r: &tokio_postgres::Row) -> RunSummary {
    RunSummary {
        id: r.get(0),
        status: r.get(1),
        created_at: r.get(2),
        finished_at: r.get(3),
        seconds: r.get(4),
        error: r.get(5),
    }
}

pub async fn recent_runs(
    client: &impl GenericClient,
    limit: i64,
) -> Result<Vec<RunSummary>, DbError> {
    let rows = client
        .query(
            &format!("SELECT {RUN_COLUMNS} FROM syncfleet.runs ORDER BY id DESC LIMIT $1"),
            &[&limit],
        )
        .await?;
    Ok(rows.iter().map(run_from_row).collect())
}

pub async fn run(client: &impl GenericClient, run_id: i64) -> Result<Option<RunSummary>, DbError> {
    let row = client
        .query_opt(
            &format!("SELECT {RUN_COLUMNS} FROM syncfleet.runs WHERE id = $1"),
            &[&run_id],
        )
        .await?;
    Ok(row.as_ref().map(run_from_row))
}

pub async fn run_progress(
    client: &impl GenericClient,
    run_id: i64,
) -> Result<Vec<StreamProgress>, DbError> {
    let rows = client
        .query(
            "SELECT rs.stream, \
                    count(*) FILTER (WHERE b.status = 'done'), \
                    count(*) FILTER (WHERE b.status = 'failed'), \
                    count(b.batch_no), \
                    rs.batches_planned IS NOT NULL, \
                    coalesce(sum(b.rows_copied + coalesce(b.rows_unchanged, 0)), 0)::int8 \
             FROM syncfleet.run_streams rs \
             LEFT JOIN syncfleet.batches b ON b.run_id = rs.run_id AND b.stream = rs.stream \
             WHERE rs.run_id = $1 GROUP BY rs.stream, rs.batches_planned ORDER BY rs.stream",
            &[&run_id],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| StreamProgress {
            stream: r.get(0),
            batches_done: r.get(1),
            batches_failed: r.get(2),
            batches_total: r.get(3),
            planned: r.get(4),
            rows: r.get(5),
        })
        .collect())
}

/// Records a batch that cannot succeed, and fails its run with the reason,
/// each statement ending `within` (a worker's: [`SETTLE_WITHIN`]). A batch
/// already done stays done, and its run is left alone: then this returns
/// false. Its job committed before (an attempt cut off after its commit,
/// or a job delivered again after it succeeded).
pub async fn fail_batch(
    client: &mut Client,
    run_id: i64,
    stream: &str,
    batch_no: i64,
    error: &str,
    within: std::time::Duration,
) -> Result<bool, DbError> {
    let tx = settling(client, within).await?;
    // The run's row first, as an abandoning check (`runs_going`) takes it:
    // taken the other way round, the two could deadlock.
    tx.execute(
        "SELECT 1 FROM syncfleet.runs WHERE id = $1 FOR UPDATE",
        &[&run_id],
    )
    .await?;
    let failed = tx
        .execute(
            "UPDATE syncfleet.batches SET status = 'failed', attempts = attempts + 1, error = $4, \
             finished_at = now() WHERE run_id = $1 AND stream = $2 AND batch_no = $3 AND status <> 'done'",
            &[&run_id, &stream, &batch_no, &error],
        )
        .await?;
    if failed == 0 {
        let done = tx
            .query_opt(
                "SELECT 1 FROM syncfleet.batches \
                 WHERE run_id = $1 AND stream = $2 AND batch_no = $3 AND status = 'done'",
                &[&run_id, &stream, &batch_no],
            )
            .await?;
        return Ok(done.is_none());
    }
    fail_run(
        &tx,
        run_id,
        &format!("stream {stream} batch {batch_no} failed: {error}"),
    )
    .await?;
    tx.commit().await?;
    Ok(true)
}

/// Charges a read to the fleet's rows/s budget ([`charge_read`]): `$2` is
/// how long ago the read started, `$3` its cost (rows / rate), in seconds.
/// A leaky bucket: the fleet's next read may start `cost` after this one
/// started or after the fleet's last charged read, whichever is later. The
/// times are the database's, the one clock every worker shares.
pub const CHARGE_READ: &str = "INSERT INTO syncfleet.fleet_reads AS b (fleet, next_read) \
     VALUES ($1, clock_timestamp() + make_interval(secs => $3::float8 - $2::float8)) \
     ON CONFLICT (fleet) DO UPDATE \
     SET next_read = greatest(b.next_read + make_interval(secs => $3::float8), excluded.next_read) \
     RETURNING extract(epoch FROM b.next_read - clock_timestamp())::float8";

/// Charges a read of `cost` (its rows over the rate) that started `ago` to
/// the fleet's budget, in its own transaction; returns the wait before the
/// fleet's next read (zero if it may start now).
pub async fn charge_read(
    client: &impl deadpool_postgres::GenericClient,
    fleet: &str,
    ago: std::time::Duration,
    cost: std::time::Duration,
) -> Result<std::time::Duration, DbError> {
    let statement = client.prepare_cached(CHARGE_READ).await?;
    let wait: f64 = client
        .query_one(
            &statement,
            &[&fleet, &ago.as_secs_f64(), &cost.as_secs_f64()],
        )
        .await?
        .get(0);
    Ok(std::time::Duration::from_secs_f64(wait.max(0.0)))
}

/// How old a reported throttle level may be for a starting worker to
/// begin there, or the planner to pace its reads by it. Workers report
/// theirs about once a second.
pub const FLEET_LEVEL_FRESH: std::time::Duration = std::time::Duration::from_secs(10);

/// The throttle level a worker of the fleet reported within
/// [`FLEET_LEVEL_FRESH`].
pub async fn fleet_level(client: &impl GenericClient, fleet: &str) -> Result<Option<f64>, DbError> {
    let row = client
        .query_opt(
            "SELECT level FROM syncfleet.fleet_reads WHERE fleet = $1 \
             AND level_at > clock_timestamp() - make_interval(secs => $2)",
            &[&fleet, &FLEET_LEVEL_FRESH.as_secs_f64()],
        )
        .await?;
    Ok(row.and_then(|r| r.get(0)))
}

/// Records this worker's throttle level as the fleet's.
pub async fn report_level(
    client: &impl GenericClient,
    fleet: &str,
    level: f64,
) -> Result<(), DbError> {
    client
        .execute(
            "INSERT INTO syncfleet.fleet_reads (fleet, level, level_at) \
             VALUES ($1, $2, clock_timestamp()) \
             ON CONFLICT (fleet) DO UPDATE SET level = excluded.level, level_at = excluded.level_at",
            &[&fleet, &level],
        )
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(run_id: i64, stream: &str, batch: i64) -> Job {
        Job {
            v: syncfleet_core::job::JOB_VERSION,
            run_id,
            stream: stream.into(),
            batch,
            range: KeyRange::default(),
            select: None,
            source_lsn: None,
        }
    }

    #[test]
    fn event_jobs_take_their_stream_exclusively_and_batches_share_it() {
        let jobs = [
            job(7, "users", 2),
            job(NO_RUN, "users", 0),
            job(7, "orders", 1),
        ];
        let (names, exclusive) = write_locks("p", &jobs);
        let locks: Vec<(&str, bool)> = names.iter().map(String::as_str).zip(exclusive).collect();
        assert_eq!(
            locks,
            [
                ("syncfleet.writes/p/orders", false),
                ("syncfleet.writes/p/orders/7/1", true),
                ("syncfleet.writes/p/users", true),
                ("syncfleet.writes/p/users/7/2", true),
            ]
        );
        // A batch twice in one group (a redelivery beside its original).
        let (names, _) = write_locks("p", &[job(7, "users", 2), job(7, "users", 2)]);
        assert_eq!(names.len(), 2);
    }
}
