//! `syncfleet producer`: the long-running producer.
//!
//! Several replicas may run; exactly one leads, holding a session-level
//! advisory lock on its own destination connection. The lock goes with the
//! connection, so when a leader dies (or its connection does) a standby's
//! next attempt, every [`ELECTION_EVERY`], takes over.
//!
//! The leader:
//! - runs each stream every `interval` (incremental when the stream has a
//!   cursor and incremental runs are on), and a full reconcile every
//!   `full_interval` after the last one recorded (see [`full_run_wait`]),
//!   streams staggered by `stagger`; a tick whose stream
//!   still has a run going is skipped and counted, never overlapped;
//! - consumes upstream change events (see [`events`](crate::events)).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use syncfleet_broker::Publisher;
use syncfleet_core::Config;
use syncfleet_core::config::{DbConfig, ProducerConfig};
use syncfleet_core::metrics as m;
use syncfleet_core::shutdown::{Shutdown, ShutdownSignal};
use syncfleet_db::ceiling::{Ceiling, Slots};
use syncfleet_db::pool::Client;
use syncfleet_db::{DbError, Pool, Role, control};
use tokio::time::Instant;

use crate::{PlanError, start_incremental_run, start_run};

/// How often a standby tries to become the leader.
pub const ELECTION_EVERY: Duration = Duration::from_secs(2);

/// How long the event consumer gets to publish what it holds when the
/// leader stops or steps down; past that, its events go back to the queue.
const EVENTS_STOP: Duration = Duration::from_secs(15);

/// Bounds one reading of the fleet's progress ([`report_progress`]) on
/// the server, so that a read queued behind a lock on the control schema
/// (a migration, an operator's `LOCK TABLE`) is cancelled there rather than
/// left to hold up the queue-depth gauges that come after it.
const PROGRESS_TIMEOUT: Duration = Duration::from_secs(5);

/// The bound on each control-schema statement of the leader's tick (see
/// [`bounded`]); one that runs out skips the stream's tick.
const TICK_TIMEOUT: Duration = Duration::from_secs(10);

/// What the service has done, for logs and tests.
#[derive(Debug, Default)]
pub struct Counters {
    pub runs_started: AtomicU64,
    pub ticks_skipped: AtomicU64,
    pub events_received: AtomicU64,
    pub events_dropped: AtomicU64,
    pub events_dead: AtomicU64,
    pub event_jobs: AtomicU64,
    /// Flushes of events whose jobs could not be published.
    pub event_flushes_failed: AtomicU64,
}

/// Runs the producer until `shutdown`.
pub async fn run(
    config: Arc<Config>,
    counters: Arc<Counters>,
    mut shutdown: ShutdownSignal,
) -> Result<(), PlanError> {
    let source = Pool::connect(Role::Source, &config.source).await?;
    let destination = Pool::connect(Role::Destination, &config.destination).await?;
    crate::check_schema(&destination).await?;
    let publisher = Arc::new(Publisher::connect(&config.broker, "producer").await?);
    metrics::gauge!(m::LEADER).set(0.0);
    for reason in m::DEAD_LETTER_REASONS {
        metrics::counter!(m::DEAD_LETTERS, "reason" => reason).absolute(0);
    }
    let gauges = tokio::spawn(report_gauges(
        config.clone(),
        destination.clone(),
        shutdown.clone(),
    ));
    syncfleet_core::health::set_ready(true);
    let key = format!("syncfleet.leader/{}", config.broker.prefix);
    // The last failure to stand for election, logged when it changes: a
    // standby that cannot take over says why.
    let mut failing: Option<String> = None;
    loop {
        // A dedicated connection: the lock lives exactly as long as it.
        let bound = config.destination.connect_timeout + ELECTION_EVERY * 5;
        let leader = tokio::select! {
            _ = shutdown.wait() => break,
            leader = tokio::time::timeout(bound, elect(&config.destination, &key)) => {
                leader.unwrap_or_else(|_| Err(format!("no answer within {bound:?}")))
            }
        };
        let leader = match leader {
            Ok(leader) => {
                if failing.take().is_some() {
                    tracing::info!("standing for election again");
                }
                leader
            }
            Err(e) => {
                if failing.as_ref() != Some(&e) {
                    tracing::warn!(
                        url = %config.destination.url.redacted(),
                        error = %e,
                        "could not stand for election as the producers' leader; trying again"
                    );
                }
                failing = Some(e);
                None
            }
        };
        let Some(lock) = leader else {
            tokio::select! {
                _ = shutdown.wait() => break,
                _ = tokio::time::sleep(ELECTION_EVERY) => continue,
            }
        };
        tracing::info!("this producer is the leader");
        metrics::gauge!(m::LEADER).set(1.0);
        let outcome = lead(
            &config,
            &source,
            &destination,
            &publisher,
            &counters,
            &lock,
            &mut shutdown,
        )
        .await;
        drop(lock);
        metrics::gauge!(m::LEADER).set(0.0);
        match outcome {
            Ok(()) => break,
            Err(e) => {
                tracing::warn!(error = %e, "stepped down as leader; standing for election again")
            }
        }
    }
    syncfleet_core::health::set_ready(false);
    publisher.close().await;
    // Its reads are bounded, its queue-depth calls not all: it is waited
    // for a moment, then left to stop with the process.
    let _ = tokio::time::timeout(Duration::from_secs(5), gauges).await;
    Ok(())
}

/// One attempt at leadership, on the `destination`: the lock's connection
/// when this process won, `None` when another holds the lock.
async fn elect(
    destination: &DbConfig,
    key: &str,
) -> Result<Option<tokio_postgres::Client>, String> {
    let (mut pg, tls) = syncfleet_db::tls::config(destination.url.expose())?;
    // Operators (and tests) find the leader by this name in pg_stat_activity.
    pg.application_name(format!("syncfleet-leader-{}", std::process::id()));
    pg.connect_timeout(destination.connect_timeout);
    // The lock lasts as long as the server keeps this session. Should the
    // leader's host vanish without closing it (a partition, a dropped NAT
    // entry), the server's keepalives end the session, and free the lock
    // for a standby, within about half a minute rather than the kernel's
    // default of over two hours.
    let options = format!(
        "{} -c tcp_keepalives_idle=10 -c tcp_keepalives_interval=5 -c tcp_keepalives_count=3 \
         -c tcp_user_timeout=30000",
        pg.get_options().unwrap_or_default()
    );
    pg.options(options.trim());
    pg.keepalives_idle(Duration::from_secs(10));
    let describe = |e: tokio_postgres::Error| syncfleet_db::error::describe(&e);
    let (client, connection) = pg.connect(tls).await.map_err(describe)?;
    tokio::spawn(connection);
    let won: bool = client
        .query_one("SELECT pg_try_advisory_lock(hashtext($1))", &[&key])
        .await
        .map_err(describe)?
        .get(0);
    Ok(won.then_some(client))
}

/// The leader's work, until shutdown (`Ok`) or the lock's connection is
/// lost (`Err`).
async fn lead(
    config: &Arc<Config>,
    source: &Pool,
    destination: &Pool,
    publisher: &Arc<Publisher>,
    counters: &Arc<Counters>,
    lock: &tokio_postgres::Client,
    shutdown: &mut ShutdownSignal,
) -> Result<(), PlanError> {
    // Stopped when leadership ends, for a shutdown or a step-down alike.
    let stop_events = Shutdown::new();
    let events = tokio::spawn(crate::events::consume(
        config.clone(),
        source.clone(),
        publisher.clone(),
        counters.clone(),
        stop_events.signal(),
    ));
    let schedule = &config.producer;
    let start = Instant::now();
    // Each stream's next incremental and full runs; streams staggered.
    let mut next: HashMap<String, (Instant, Instant)> = HashMap::new();
    for (i, s) in config.streams.iter().enumerate() {
        let first = start + schedule.stagger * i as u32;
        let full_due = first + full_run_wait(destination, &s.name, schedule.full_interval).await;
        next.insert(s.name.clone(), (first, full_due));
    }
    let result = 'lead: loop {
        tokio::select! {
            _ = shutdown.wait() => break Ok(()),
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
        let alive =
            tokio::time::timeout(Duration::from_secs(5), lock.simple_query("SELECT 1")).await;
        if !matches!(alive, Ok(Ok(_))) {
            break Err(PlanError::Db(syncfleet_db::DbError::Connect {
                role: "destination",
                url: config.destination.url.redacted(),
                detail: "the leader's lock connection was lost".into(),
            }));
        }
        let now = Instant::now();
        for stream in &config.streams {
            let (due, full_due) = next[&stream.name];
            if now < due {
                continue;
            }
            let full = now >= full_due || !schedule.incremental;
            // A run without progress for a whole consumer timeout is stuck.
            // Checked here before planning describes the stream on the
            // source; creating the run checks again, under the stream's lock.
            let stale = config.broker.consumer_timeout;
            let busy = bounded(destination, TICK_TIMEOUT, async |c| {
                control::stream_busy(&***c, &stream.name, stale).await
            });
            let busy = tokio::select! {
                _ = shutdown.wait() => break 'lead Ok(()),
                busy = busy => busy.unwrap_or(true),
            };
            let mut started = false;
            if busy {
                counters.ticks_skipped.fetch_add(1, Ordering::Relaxed);
                tracing::info!(stream = %stream.name, "previous run still going; tick skipped");
            } else {
                // The runs this tick starts are newer than this one.
                let before = bounded(destination, TICK_TIMEOUT, async |c| {
                    control::last_run_id(&***c).await
                })
                .await
                .ok();
                let ceiling = Ceiling::new(config);
                let plan = async {
                    match full {
                        true => {
                            start_run(source, destination, publisher, &ceiling, &[stream], stale)
                                .await
                        }
                        false => {
                            start_incremental_run(
                                source,
                                destination,
                                publisher,
                                &ceiling,
                                stream,
                                stale,
                            )
                            .await
                        }
                    }
                };
                // Planning a large table, or waiting for a read slot, takes
                // a while: shutdown stops it where it is, and fails its run
                // for `sync --resume` to publish the rest.
                let planned = tokio::select! {
                    _ = shutdown.wait() => None,
                    planned = plan => Some(planned),
                };
                let Some(planned) = planned else {
                    if let Some(before) = before {
                        fail_interrupted(destination, &stream.name, before).await;
                    }
                    break 'lead Ok(());
                };
                match planned {
                    Ok(plan) => {
                        started = true;
                        counters.runs_started.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(%plan, full, "scheduled run started");
                    }
                    // A `sync` by hand started one since the check above.
                    Err(PlanError::Going(going)) => {
                        counters.ticks_skipped.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(stream = %stream.name, %going, "tick skipped");
                    }
                    Err(e) => {
                        tracing::error!(stream = %stream.name, error = %e, "scheduled run failed to start")
                    }
                }
            }
            let entry = next
                .get_mut(&stream.name)
                .expect("every stream is scheduled");
            *entry = reschedule(*entry, now, schedule, full, started);
        }
    };
    stop_events.trigger();
    let abort = events.abort_handle();
    if tokio::time::timeout(EVENTS_STOP, events).await.is_err() {
        abort.abort();
    }
    result
}

/// Every few seconds, in every replica, leader or standby: run progress,
/// watermark ages and queue depths. A replica that reported them only
/// while it led would export its last values for as long as it stood by
/// after a step-down, and a dashboard or alert that takes the maximum over
/// replicas would go on showing them (a purged dead-letter queue still
/// counted, say).
async fn report_gauges(config: Arc<Config>, destination: Pool, mut shutdown: ShutdownSignal) {
    let topology = syncfleet_broker::Topology::new(&config.broker.prefix);
    let mut depths = syncfleet_broker::DepthGauges::new(topology);
    let mut failing = false;
    loop {
        match read_progress(&config, &destination).await.err() {
            None if failing => {
                tracing::info!("the fleet's progress can be read from the destination again");
                failing = false;
            }
            None => {}
            Some(error) if !failing => {
                tracing::warn!(
                    %error,
                    "cannot read the fleet's progress from the destination: the run, \
                     watermark and read-slot gauges keep their last values (see \
                     syncfleet_progress_timestamp_seconds) until it can"
                );
                failing = true;
            }
            Some(_) => {}
        }
        depths.report(&config.broker).await;
        tokio::select! {
            _ = shutdown.wait() => break,
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
    depths.close().await;
}

/// How long until the next full run of `stream` is due, counted from the
/// last one in the control schema, not from this process's start: a
/// leader that restarts more often than `full_interval` (deploys,
/// failovers) would otherwise never run one, and deletes reach the
/// destination only through full runs. Due at once if there has been none,
/// or if the destination cannot say.
async fn full_run_wait(destination: &Pool, stream: &str, full_interval: Duration) -> Duration {
    let age = bounded(destination, PROGRESS_TIMEOUT, async |c| {
        control::last_full_run_age(&***c, stream).await
    });
    match age.await {
        Ok(Some(age)) => full_interval.saturating_sub(age),
        Ok(None) => Duration::ZERO,
        Err(e) => {
            tracing::warn!(stream, error = %e, "could not read when the last full run was; one is due now");
            Duration::ZERO
        }
    }
}

/// When a stream's next run and next full run are due after a tick at
/// `now` that was due a full run (`full`) and did or did not start one: a
/// full run that did not start (its stream busy, or planning failed) stays
/// due, so the next tick tries it again rather than a whole
/// `full_interval` later; deletes reach the destination only through it.
fn reschedule(
    (_, full_due): (Instant, Instant),
    now: Instant,
    schedule: &ProducerConfig,
    full: bool,
    started: bool,
) -> (Instant, Instant) {
    let full_due = match full && started {
        true => now + schedule.full_interval,
        false => full_due,
    };
    (now + schedule.interval, full_due)
}

/// Fails the run a stopping leader was planning, so that the next leader's
/// first tick plans afresh instead of skipping the stream until the run
/// counts as abandoned (a whole `broker.consumer_timeout`). Best effort and
/// bounded: a run left planning is still abandoned in time, as a killed
/// pod's is.
async fn fail_interrupted(destination: &Pool, stream: &str, before: i64) {
    let why = "planning stopped: the producer shut down";
    let fail = bounded(destination, PROGRESS_TIMEOUT, async |c| {
        control::fail_planning_runs(&***c, stream, before, why).await
    });
    match fail.await {
        Ok(runs) => {
            for run_id in runs {
                tracing::warn!(
                    run_id,
                    stream,
                    "planning stopped at shutdown; the run is failed, resume it with sync --resume"
                );
            }
        }
        Err(e) => tracing::warn!(stream, error = %e, "could not fail the run being planned"),
    }
}

/// [`report_progress`] on a pooled connection, bounded on this side too,
/// for a server that does not answer at all (the server's own timeout ends
/// a slow read first).
async fn read_progress(config: &Config, destination: &Pool) -> Result<(), String> {
    bounded(destination, 2 * PROGRESS_TIMEOUT, async |client| {
        report_progress(config, client).await
    })
    .await
}

/// `work` on a pooled connection of the control schema, within `bound`
/// (see [`Pool::bounded`]): the leader's loop also watches its lock and
/// the stop signal.
async fn bounded<T>(
    destination: &Pool,
    bound: Duration,
    work: impl AsyncFnOnce(&mut Client) -> Result<T, DbError>,
) -> Result<T, String> {
    match destination.bounded(bound, work).await {
        Some(done) => done.map_err(|e| e.to_string()),
        None => Err(format!("no answer within {bound:?}")),
    }
}

/// Run progress of each stream's latest run, watermark ages, and who
/// holds the fleet's read slots, read in one snapshot (`pg_locks` aside,
/// which has none); then the time of this reading, which tells a dashboard
/// how old the others are.
async fn report_progress(config: &Config, client: &mut Client) -> Result<(), DbError> {
    let tx = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    tx.batch_execute(&format!(
        "SET LOCAL statement_timeout = {}",
        PROGRESS_TIMEOUT.as_millis()
    ))
    .await?;
    if let Some(slots) = Slots::read(&*tx, config).await? {
        let stuck = slots.held().filter(|s| s.stuck).count();
        for (state, n) in [
            ("held", slots.held().count()),
            ("waiting", slots.waiting()),
            ("stuck", stuck),
        ] {
            metrics::gauge!(m::READ_SLOTS, "state" => state).set(n as f64);
        }
        metrics::gauge!(m::READ_SLOT_HELD).set(slots.longest());
    }
    let rows = tx
        .query(
            "SELECT l.stream, count(*) FILTER (WHERE b.status = 'done'), count(b.batch_no) \
             FROM (SELECT DISTINCT ON (stream) stream, run_id FROM syncfleet.run_streams \
                   ORDER BY stream, run_id DESC) l \
             LEFT JOIN syncfleet.batches b ON b.run_id = l.run_id AND b.stream = l.stream \
             GROUP BY l.stream",
            &[],
        )
        .await?;
    for r in rows {
        let stream: String = r.get(0);
        for (state, i) in [("done", 1), ("total", 2)] {
            metrics::gauge!(m::RUN_BATCHES, "stream" => stream.clone(), "state" => state)
                .set(r.get::<_, i64>(i) as f64);
        }
    }
    let rows = tx
        .query(
            "SELECT stream, extract(epoch FROM now() - updated_at)::float8 FROM syncfleet.watermarks",
            &[],
        )
        .await?;
    for r in rows {
        metrics::gauge!(m::WATERMARK_AGE, "stream" => r.get::<_, String>(0))
            .set(r.get::<_, f64>(1));
    }
    tx.commit().await?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    metrics::gauge!(m::PROGRESS_TIMESTAMP).set(now.as_secs_f64());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against the test server (`SYNCFLEET_TEST_PG_URL`): the leader's
    /// session carries the keepalives that end it when its host vanishes.
    #[tokio::test]
    async fn the_leaders_session_ends_soon_after_its_host_vanishes() {
        let url = std::env::var("SYNCFLEET_TEST_PG_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
        let destination = DbConfig {
            url: syncfleet_core::secret::SecretUrl::new(url),
            max_connections: 1,
            connect_timeout: Duration::from_secs(5),
            statement_timeout: None,
        };
        let key = format!("syncfleet.test-leader/{}", std::process::id());
        let leader = elect(&destination, &key).await.unwrap().expect("elected");
        let settings: Vec<String> = leader
            .query(
                "SELECT name || '=' || setting FROM pg_settings \
                 WHERE name IN ('tcp_keepalives_idle', 'tcp_keepalives_interval', \
                                'tcp_keepalives_count', 'tcp_user_timeout') ORDER BY name",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(
            settings,
            [
                "tcp_keepalives_count=3",
                "tcp_keepalives_idle=10",
                "tcp_keepalives_interval=5",
                "tcp_user_timeout=30000"
            ]
        );
        assert!(
            elect(&destination, &key).await.unwrap().is_none(),
            "one leader at a time"
        );
        // A failure to stand says why, without the password.
        let refused = DbConfig {
            url: syncfleet_core::secret::SecretUrl::new(
                "postgres://postgres:secret@127.0.0.1:1/postgres",
            ),
            ..destination
        };
        let error = elect(&refused, &key).await.unwrap_err();
        assert!(!error.contains("secret"), "{error}");
    }

    #[test]
    fn a_full_run_that_did_not_start_stays_due() {
        let secs = Duration::from_secs;
        let schedule = ProducerConfig {
            interval: secs(60),
            incremental: true,
            stagger: secs(0),
            full_interval: secs(86_400),
            event_window: Duration::from_millis(250),
            event_max_keys: 1000,
        };
        let now = Instant::now();
        let due = (now, now);
        // Started: the next full run is a full interval away.
        assert_eq!(
            reschedule(due, now, &schedule, true, true),
            (now + secs(60), now + secs(86_400))
        );
        // Skipped or failed: the next tick tries the full run again.
        assert_eq!(
            reschedule(due, now, &schedule, true, false),
            (now + secs(60), now)
        );
        // An incremental tick leaves the full run's time alone.
        let later = now + secs(600);
        assert_eq!(
            reschedule((now, later), now, &schedule, false, true),
            (now + secs(60), later)
        );
    }
}
