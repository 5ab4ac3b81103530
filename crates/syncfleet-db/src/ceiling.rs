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

/// Waits in the open transaction of `client` for one of `slots` slots.
/// `statement` is [`TAKE_READ_SLOT`], text or prepared. The caller bounds
/// the wait.
///
/// Between tries it sleeps a random time up to 1, 2, 4 … 32 ms: a slot held
/// by a short job is free again within a few milliseconds, one held by a
/// 10,000-row batch for a second or more, and the waiters of the whole
/// fleet should neither miss the first nor poll the second hard.
pub async fn take_read_slot<S>(
    client: &impl GenericClient,
    statement: &S,
    slots: i32,
    namespace: &str,
) -> Result<(), DbError>
where
    S: ?Sized + tokio_postgres::ToStatement + Sync + Send,
{
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

impl Ceiling {
    pub fn new(config: &Config) -> Self {
        Self {
            slots: config
                .reads
                .max_concurrent
                .map(|n| n.min(i32::MAX as u32) as i32),
            namespace: namespace(&config.broker.prefix),
            wait: config
                .source
                .statement_timeout
                .unwrap_or(Duration::from_secs(300)),
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
        let fleet = self.fleet.as_ref()?;
        let level = async {
            let client = destination.get().await.ok()?;
            control::fleet_level(&**client, fleet, control::FLEET_LEVEL_FRESH)
                .await
                .ok()?
        };
        let level = tokio::time::timeout(Duration::from_secs(5), level)
            .await
            .ok()??;
        Pace::below_one(level)
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
        let mut client = destination.get().await?;
        let tx = client.transaction().await.map_err(DbError::from)?;
        // A first try at once: the waits below start at half a millisecond
        // and grow, and a worker's first try rides with its `BEGIN`.
        let free = tx
            .query_opt(
                TAKE_READ_SLOT,
                &[&slots, &self.namespace, &fastrand::i32(0..slots)],
            )
            .await
            .map_err(DbError::from)?;
        if free.is_none() {
            tokio::time::timeout(
                self.wait,
                take_read_slot(&tx, TAKE_READ_SLOT, slots, &self.namespace),
            )
            .await
            .map_err(|_| DbError::NoReadSlot(self.wait))??;
        }
        let out = read.await;
        // Ending the transaction frees the slot; a connection that fails
        // here has ended its session, and the slot with it.
        let _ = tx.rollback().await;
        out
    }
}
