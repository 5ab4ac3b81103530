//! The fleet-wide ceiling on source reads (`source.max_concurrent_reads`):
//! slots that are transaction-level advisory locks in the destination,
//! which every process of the fleet shares, so the ceiling holds however
//! many of them run, and a slot is released with its transaction even if
//! its holder dies. Workers take one per batch transaction (pipelined with
//! its start); the planner and `syncfleet verify` take one per source read
//! through [`Ceiling`].
//!
//! While the adaptive throttle holds the fleet below level one, their reads
//! are paced as the workers' are ([`Ceiling::pace`]).

use std::future::Future;
use std::time::Duration;

use deadpool_postgres::GenericClient;
use syncfleet_core::Config;
use syncfleet_core::config::SETTLE_SLACK;

use crate::Pool;
use crate::control;
use crate::error::DbError;
use crate::sql::Pace;

/// Takes one free slot, if any: a transaction-level advisory lock
/// `(hashtext($2), slot)` for a slot in `0..$1`, trying from slot `$3` on.
/// Returns a row when it got one. The `LIMIT 1` stops the scan at the
/// first lock taken.
pub const TAKE_READ_SLOT: &str = "SELECT s FROM generate_series(0, $1::int - 1) AS s \
     WHERE pg_try_advisory_xact_lock(hashtext($2::text), (s + $3::int) % $1::int) LIMIT 1";

/// The advisory-lock namespace of the fleet with this broker prefix.
pub fn namespace(prefix: &str) -> String {
    format!("syncfleet.reads/{prefix}")
}

/// Waits in the open transaction of `client` for one of `slots` slots,
/// after a try of [`TAKE_READ_SLOT`] found none free. The caller bounds the
/// wait (a deadline's cancel); dropping this future leaves the statement
/// running.
///
/// It queues on the server (`syncfleet.take_read_slot`, one round trip)
/// for one slot at a time rather than polling them all: PostgreSQL grants a
/// lock to its waiters in turn, and refuses it to a new request while
/// others wait, so a process that ends a job and tries again at once cannot
/// take the slot back ahead of them. Polled, the slots went to whoever
/// tried first after each commit; with one slot (the throttle's floor) a
/// worker process whose next job was already waiting took it again after
/// each of its jobs, and another process's jobs starved past their
/// deadlines. Every 50 ms the wait tries every slot again, so a slot freed
/// beside the one it queues for does not stay idle, and each such slice
/// has a `lock_timeout` of its own, so the role's cannot end the wait.
/// (The same done from here took four more round trips: empty jobs 0.44
/// and 0.46 of the bare loop, against 0.54 and 0.56 for one plain wait.)
pub async fn take_read_slot(
    client: &impl GenericClient,
    slots: i32,
    namespace: &str,
) -> Result<(), DbError> {
    let statement = client
        .prepare_cached("SELECT syncfleet.take_read_slot($1, $2)")
        .await?;
    client.query_one(&statement, &[&slots, &namespace]).await?;
    Ok(())
}

/// The `application_name` of a destination session while it holds a slot
/// for a walk of the source (the planner's, `verify`'s), so that `status`
/// tells it from a job's.
pub const WALK_APPLICATION: &str = "syncfleet-walk";

/// The fleet's read slots, as the destination's `pg_locks` shows them.
#[derive(Debug, Clone, PartialEq)]
pub struct Slots {
    /// `source.max_concurrent_reads`.
    pub ceiling: u32,
    /// Holders first, the longest-held first, then the sessions waiting.
    pub sessions: Vec<SlotSession>,
}

/// A session that holds one of the fleet's read slots, or waits for one.
#[derive(Debug, Clone, PartialEq)]
pub struct SlotSession {
    pub slot: i64,
    /// `None` for a prepared transaction, which no session holds.
    pub pid: Option<i32>,
    pub granted: bool,
    pub application_name: String,
    /// Empty where the role may not see it (another role's session,
    /// without `pg_read_all_stats`), as `seconds` is then `None`; for a
    /// prepared transaction, `prepared transaction '<gid>'`.
    pub state: String,
    /// Seconds since its transaction began (a job's or a walk's slot lasts
    /// a transaction) or was prepared, or outside one since its session
    /// began. A session-level lock may be older than the transaction it is
    /// in now.
    pub seconds: Option<f64>,
    /// Held longer than a live syncfleet process holds a slot: a job for
    /// its deadline and the time to settle it, a walk for its wait and its
    /// read (each up to the source's `statement_timeout`); or by a prepared
    /// transaction, which never ends by itself. A holder cut off from its
    /// process keeps its session until the server's keepalives end it
    /// (about a minute). The jobs that need the slot are handed back, half
    /// a deadline at a time, until it is freed.
    pub stuck: bool,
}

impl Slots {
    /// The slots of this config's fleet; `None` without a ceiling.
    pub async fn read(
        client: &impl tokio_postgres::GenericClient,
        config: &Config,
    ) -> Result<Option<Slots>, DbError> {
        let Some(ceiling) = config.reads.max_concurrent else {
            return Ok(None);
        };
        let job = config.longest_deadline() + SETTLE_SLACK;
        let walk = 2 * walk_wait(config) + SETTLE_SLACK;
        // An advisory lock on two int4 keys shows the first as `classid`,
        // an oid: the key's bits read unsigned. A prepared transaction's
        // locks have no pid; its lock on its own xid shares their virtual
        // transaction.
        let rows = client
            .query(
                "SELECT l.objid::int8, l.pid, l.granted, coalesce(a.application_name, ''), \
                 coalesce('prepared transaction ' || quote_literal(p.gid), a.state, ''), \
                 extract(epoch FROM clock_timestamp() \
                 - coalesce(p.prepared, a.xact_start, a.backend_start))::float8 AS seconds \
                 FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid \
                 LEFT JOIN pg_locks x ON l.pid IS NULL AND x.locktype = 'transactionid' \
                 AND x.virtualtransaction = l.virtualtransaction \
                 LEFT JOIN pg_prepared_xacts p ON p.transaction = x.transactionid \
                 WHERE l.locktype = 'advisory' AND l.objsubid = 2 \
                 AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                 AND l.classid::int8 = hashtext($1)::int8 & 4294967295 \
                 ORDER BY l.granted DESC, seconds DESC NULLS LAST, l.objid",
                &[&namespace(&config.broker.prefix)],
            )
            .await?;
        let sessions = rows
            .iter()
            .map(|r| {
                let (pid, granted, application_name, seconds): (
                    Option<i32>,
                    bool,
                    String,
                    Option<f64>,
                ) = (r.get(1), r.get(2), r.get(3), r.get(5));
                let bound = match application_name == WALK_APPLICATION {
                    true => walk,
                    false => job,
                };
                let overdue = seconds.is_some_and(|s| s > bound.as_secs_f64());
                SlotSession {
                    slot: r.get(0),
                    pid,
                    granted,
                    state: r.get(4),
                    stuck: granted && (pid.is_none() || overdue),
                    application_name,
                    seconds,
                }
            })
            .collect();
        Ok(Some(Slots { ceiling, sessions }))
    }

    pub fn held(&self) -> impl Iterator<Item = &SlotSession> {
        self.sessions.iter().filter(|s| s.granted)
    }

    pub fn waiting(&self) -> usize {
        self.sessions.iter().filter(|s| !s.granted).count()
    }

    /// The longest any slot has been held, as far as this role can see.
    pub fn longest(&self) -> f64 {
        self.held().filter_map(|s| s.seconds).fold(0.0, f64::max)
    }
}

/// How long a walk waits for a slot, and at most reads the source while
/// it holds one: the source's `statement_timeout`.
fn walk_wait(config: &Config) -> Duration {
    config
        .source
        .statement_timeout
        .unwrap_or(Duration::from_secs(300))
}

/// The ceiling for source reads outside the workers' batches: the
/// planner's walk of a stream's keys, a chunk per read, and verify's
/// walk and checksums.
#[derive(Debug, Clone)]
pub struct Ceiling {
    slots: Option<i32>,
    namespace: String,
    /// Bound on waiting for a slot: the source's `statement_timeout`, far
    /// above any batch's hold on one (a job's deadline bounds a worker's).
    wait: Duration,
    /// The fleet (its broker prefix) whose throttle level to go by; `None`
    /// without a throttle.
    fleet: Option<String>,
}

/// The throttle level the `fleet`'s workers reported lately, if the
/// destination says within 5 s: best effort, for a reader that goes on
/// without one.
pub async fn fleet_level(destination: &Pool, fleet: &str) -> Option<f64> {
    destination
        .bounded(Duration::from_secs(5), async |client| {
            control::fleet_level(&***client, fleet).await
        })
        .await?
        .ok()?
}

impl Ceiling {
    pub fn new(config: &Config) -> Self {
        Self {
            slots: config
                .reads
                .max_concurrent
                .map(|n| n.min(i32::MAX as u32) as i32),
            namespace: namespace(&config.broker.prefix),
            wait: walk_wait(config),
            fleet: config
                .reads
                .throttle
                .is_some()
                .then(|| config.broker.prefix.clone()),
        }
    }

    /// How a source read the planner starts now is paced: as the workers'
    /// reads are at the level they last reported, if recently. Best effort:
    /// a planner that cannot read the level does not pace.
    ///
    /// The walk still takes one of the ceiling's slots, not one of the
    /// fewer the workers take below it: they take the one slot of the
    /// lowest levels again between their jobs far sooner than a waiter's
    /// polls find it free, and the planner starved until they ran out of
    /// jobs (bench 3 at the floor: 0.20 of the unthrottled rows/s in two
    /// runs, against 0.23–0.29 in four with the walk unpaced; with one of
    /// the ceiling's slots, 0.25–0.27 in two).
    pub async fn pace(&self, destination: &Pool) -> Option<Pace> {
        Pace::below_one(fleet_level(destination, self.fleet.as_ref()?).await?)
    }

    /// Runs `read`, one source query, holding a slot for as long as it
    /// runs; straight away without a ceiling.
    pub async fn read<T, E: From<DbError>>(
        &self,
        destination: &Pool,
        read: impl Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        let Some(slots) = self.slots else {
            return read.await;
        };
        let held = Held::new(destination.get().await?, destination.tls());
        let client = held.client();
        client
            .batch_execute(&format!(
                "BEGIN; SET LOCAL application_name = '{WALK_APPLICATION}'"
            ))
            .await
            .map_err(DbError::from)?;
        // A first try at once: the wait below queues for one slot only.
        let free = client
            .query_opt(
                TAKE_READ_SLOT,
                &[&slots, &self.namespace, &fastrand::i32(0..slots)],
            )
            .await
            .map_err(DbError::from)?;
        if free.is_none() {
            // Given up on, the wait is cancelled with the connection (see
            // `Held`).
            tokio::time::timeout(self.wait, take_read_slot(client, slots, &self.namespace))
                .await
                .map_err(|_| DbError::NoReadSlot(self.wait))??;
        }
        let out = read.await;
        // Ending the transaction frees the slot; a connection that fails
        // here has ended its session, and the slot with it.
        if client.batch_execute("ROLLBACK").await.is_ok() {
            held.release();
        }
        out
    }
}

/// A destination connection holding (or waiting for) a read slot: closed,
/// with its statement cancelled, unless released after its `ROLLBACK`. A
/// read dropped while it waits (a producer told to stop) must not leave
/// that wait running, nor pool its connection in the middle of it.
struct Held {
    object: Option<deadpool_postgres::Object>,
    cancel: tokio_postgres::CancelToken,
    tls: crate::tls::Tls,
}

impl Held {
    fn new(object: deadpool_postgres::Object, tls: crate::tls::Tls) -> Self {
        let cancel = object.cancel_token();
        Self {
            object: Some(object),
            cancel,
            tls,
        }
    }

    fn client(&self) -> &deadpool_postgres::Object {
        self.object
            .as_ref()
            .expect("held until released or dropped")
    }

    /// Back to the pool: its transaction has ended.
    fn release(mut self) {
        self.object = None;
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let Some(object) = self.object.take() else {
            return;
        };
        drop(deadpool_postgres::Object::take(object));
        let (cancel, tls) = (self.cancel.clone(), self.tls.clone());
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = tokio::time::timeout(crate::pool::CANCEL_TIMEOUT, cancel.cancel_query(tls))
                    .await;
            });
        }
    }
}
