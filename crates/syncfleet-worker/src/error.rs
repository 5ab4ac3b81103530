//! Errors whose variant is the decision.

use syncfleet_db::{DbError, ErrorClass, ShapeError};

/// Why a job did not complete, and so what to do with its message.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// Worth another attempt later: a database or connection hiccup.
    #[error("{0} (will retry)")]
    Retry(String),
    /// Retrying gives the same answer: dead-letter it and fail the batch.
    #[error("{0}")]
    Reject(String),
}

impl From<DbError> for JobError {
    fn from(e: DbError) -> Self {
        match e.class() {
            ErrorClass::Transient => JobError::Retry(e.to_string()),
            ErrorClass::Permanent => JobError::Reject(e.to_string()),
        }
    }
}

impl From<tokio_postgres::Error> for JobError {
    fn from(e: tokio_postgres::Error) -> Self {
        DbError::from(e).into()
    }
}

impl From<ShapeError> for JobError {
    fn from(e: ShapeError) -> Self {
        match e.class() {
            ErrorClass::Transient => JobError::Retry(e.to_string()),
            ErrorClass::Permanent => JobError::Reject(e.to_string()),
        }
    }
}
