//! Every metric name syncfleet exports, defined once. The Grafana dashboard
//! and the alert rules in `deploy/` use only these (a test checks).

/// Jobs settled, by `stream` and `outcome` (succeeded, superseded,
/// retried, waiting, handed_back, split, dead_lettered).
pub const JOBS: &str = "syncfleet_jobs_total";
/// Job duration, by `stream` (histogram).
pub const JOB_DURATION: &str = "syncfleet_job_duration_seconds";
/// Rows synced, by `stream` and `how`: `copied`, or `unchanged` when a
/// batch's range was found equal on both sides and not copied.
pub const ROWS: &str = "syncfleet_rows_synced_total";
/// Bytes of COPY data read from the source, by `stream`.
pub const BYTES: &str = "syncfleet_bytes_synced_total";
/// Source read (COPY out) latency, by `stream` (histogram).
pub const SOURCE_READ: &str = "syncfleet_source_read_seconds";
/// Destination write latency, by `stream` (histogram).
pub const DESTINATION_WRITE: &str = "syncfleet_destination_write_seconds";
/// Jobs running in this process.
pub const IN_FLIGHT: &str = "syncfleet_jobs_in_flight";
/// Jobs parked for a later attempt, by `stream`.
pub const RETRIES: &str = "syncfleet_retries_total";
/// Messages sent to the dead-letter queue, by `reason`.
pub const DEAD_LETTERS: &str = "syncfleet_dead_letters_total";
/// Every `reason` of [`DEAD_LETTERS`]. A worker or producer starts each at
/// 0: the dead-letter alert asks for an `increase()`, and a series that
/// appears at 1 (a pod's first dead letter) has not increased.
pub const DEAD_LETTER_REASONS: [&str; 6] = [
    "permanent",
    "attempts exhausted",
    "connection lost every time",
    "malformed",
    "malformed event",
    "unroutable event",
];
/// Pool connections by `database` (source, destination) and `state`
/// (size, available, waiting).
pub const POOL: &str = "syncfleet_pool_connections";
/// Broker reconnections of this process.
pub const BROKER_RECONNECTS: &str = "syncfleet_broker_reconnects_total";
/// Batches of the latest run of each `stream`, by `state` (done, total).
pub const RUN_BATCHES: &str = "syncfleet_run_batches";
/// Seconds since each `stream`'s watermark last moved, or was confirmed
/// by an incremental run that found nothing new.
pub const WATERMARK_AGE: &str = "syncfleet_watermark_age_seconds";
/// Upstream events by `outcome` (received, coalesced, dropped, dead_lettered).
pub const EVENTS: &str = "syncfleet_events_total";
/// 1 while this producer is the leader.
pub const LEADER: &str = "syncfleet_leader";
/// Messages in each `queue`, by `state`: ready, and unacked when the
/// management API is configured.
pub const QUEUE_MESSAGES: &str = "syncfleet_queue_messages";
/// Consumers of each `queue`.
pub const QUEUE_CONSUMERS: &str = "syncfleet_queue_consumers";
/// The adaptive throttle's read level as this process sees it: the
/// source reads the whole fleet may run at once.
pub const THROTTLE_LEVEL: &str = "syncfleet_throttle_level";
/// Sessions holding one of the fleet's read slots
/// (`source.max_concurrent_reads`) or waiting for one, from the
/// destination's `pg_locks`, by `state`: held, waiting, and stuck (held
/// longer than syncfleet ever holds one, so not syncfleet's own hold: the
/// jobs that need it are handed back until it is freed, and `syncfleet
/// status` names the holder).
pub const READ_SLOTS: &str = "syncfleet_read_slots";
/// The longest any read slot has been held (its holder's transaction
/// age); 0 when none is.
pub const READ_SLOT_HELD: &str = "syncfleet_read_slot_held_seconds";
/// When this producer last read the run, watermark and read-slot gauges
/// above from the destination (Unix seconds): they keep their last values
/// while it cannot.
pub const PROGRESS_TIMESTAMP: &str = "syncfleet_progress_timestamp_seconds";

/// All of them.
pub const ALL: &[&str] = &[
    JOBS,
    JOB_DURATION,
    ROWS,
    BYTES,
    SOURCE_READ,
    DESTINATION_WRITE,
    IN_FLIGHT,
    RETRIES,
    DEAD_LETTERS,
    POOL,
    BROKER_RECONNECTS,
    RUN_BATCHES,
    WATERMARK_AGE,
    EVENTS,
    LEADER,
    QUEUE_MESSAGES,
    QUEUE_CONSUMERS,
    THROTTLE_LEVEL,
    READ_SLOTS,
    READ_SLOT_HELD,
    PROGRESS_TIMESTAMP,
];
