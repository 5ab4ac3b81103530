//! Errors whose variant is the decision.

use syncfleet_db::{DbError, ErrorClass, ShapeError};

/// Why a job did not complete, and so what to do with its message.
#[derive(Debug, Clone, thiserror::Error)]
pub enum JobError {
    /// A database is unreachable: the job waits for it without using up
    /// an attempt, however long the outage.
    #[error("{0}")]
    Unavailable(String),
    /// The standby the job reads (`source.replica_url`) had not replayed as
    /// far as the job needs by half its deadline: not the job's fault, so
    /// waited for like an outage, however long the lag, and not tried
    /// again in the worker, where each try would wait as long.
    #[error("{0}")]
    Lagging(String),
    /// A connection broke while the job used it: waited for like an
    /// outage, but counted, since a job can also break it itself (a
    /// statement that ends its session or crashes the server). Too many,
    /// and the job is dead-lettered.
    #[error("{0}")]
    Disconnected(String),
    /// Worth another attempt later: a conflict, a timeout, a deadline.
    #[error("{0}")]
    Retry(String),
    /// Retrying gives the same answer: dead-letter it and fail the batch.
    #[error("{0}")]
    Reject(String),
    /// A value is not valid where the job puts it: SQLSTATE class 22 (a
    /// data exception, such as an event's id its key column cannot take)
    /// or 23 (a constraint the destination enforces on a row). Retrying
    /// gives the same answer, as for [`JobError::Reject`]; but an event job
    /// of several rows is split in halves instead (see `Job::halves`), so
    /// that one bad value fails only itself, not the window it came in.
    #[error("{0}")]
    BadValue(String),
    /// A unique index of the destination other than the key's holds one of
    /// the job's values in another row. Another batch may be moving it (a
    /// value passed from a row of one batch to a row of another, written
    /// first): retried like [`JobError::Retry`]; once the attempts are used
    /// up, a [`JobError::BadValue`]. (Never another job's write on the key's
    /// own index: the write locks keep every other job off the job's keys.
    /// A query stream whose key repeats meets it there, and is
    /// dead-lettered once its attempts are used up.)
    #[error("{0}")]
    Conflict(String),
    /// A column the job's statements name is gone (dropped under a
    /// running run): tried again in the worker with the stream described
    /// anew, and rejected if that does not help (a column the destination
    /// lacks, say).
    #[error("{0}")]
    ShapeChanged(String),
    /// Not begun in time (it waited at the read gate until it could no
    /// longer finish within the broker's consumer timeout): handed back
    /// to the queue untried, as the same attempt. A group's jobs go on one
    /// by one, each against its own time.
    #[error("{0}")]
    NotStarted(String),
    /// No fleet read slot came free by half the deadline (or by the time
    /// it had to begin), or no connection of this worker, which its jobs
    /// waiting for a slot hold: handed back untried like [`JobError::NotStarted`],
    /// a group's jobs all at once, since alone each would wait as long.
    #[error("{0}")]
    NoReadSlot(String),
}

impl JobError {
    /// Handed back to the queue untried.
    pub fn not_started(&self) -> bool {
        matches!(self, JobError::NotStarted(_) | JobError::NoReadSlot(_))
    }

    fn classified(class: ErrorClass, message: String) -> Self {
        match class {
            ErrorClass::Unavailable => JobError::Unavailable(message),
            ErrorClass::Disconnected => JobError::Disconnected(message),
            ErrorClass::Transient => JobError::Retry(message),
            ErrorClass::Permanent => JobError::Reject(message),
        }
    }
}

/// The control schema's statements: never a [`JobError::BadValue`], whose
/// split would multiply a job whose values are not at fault.
impl From<DbError> for JobError {
    fn from(e: DbError) -> Self {
        JobError::classified(e.class(), e.to_string())
    }
}

/// The job's own statements: its read, its write, and their settings.
impl From<tokio_postgres::Error> for JobError {
    fn from(e: tokio_postgres::Error) -> Self {
        use tokio_postgres::error::SqlState;
        let class = e.code().map(|c| &c.code()[..2]);
        if e.code() == Some(&SqlState::UNDEFINED_COLUMN) {
            JobError::ShapeChanged(syncfleet_db::error::describe(&e))
        } else if e.code() == Some(&SqlState::UNIQUE_VIOLATION) {
            JobError::Conflict(syncfleet_db::error::describe(&e))
        } else if matches!(class, Some("22" | "23")) {
            JobError::BadValue(syncfleet_db::error::describe(&e))
        } else {
            DbError::from(e).into()
        }
    }
}

impl From<ShapeError> for JobError {
    fn from(e: ShapeError) -> Self {
        JobError::classified(e.class(), e.to_string())
    }
}
