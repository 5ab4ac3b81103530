//! Errors that say whether trying again can help.

use tokio_postgres::error::SqlState;

/// What the caller should do about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The database cannot be reached (refused, starting up or shutting
    /// down, out of connections, pool exhausted) or cannot take writes
    /// (read-only): an outage, not a property of the work. Wait for it
    /// without counting attempts.
    Unavailable,
    /// A working connection broke while in use (closed, reset, terminated
    /// by an administrator or by a crash of the server). Mostly an outage;
    /// but it can be the work itself, a statement that ends its own session
    /// or crashes the server each time it runs. Wait for it like an outage,
    /// but count it, apart from attempts.
    Disconnected,
    /// The same work may succeed soon: a conflict with a concurrent
    /// transaction, a lock or statement timeout, a cancelled query.
    Transient,
    /// The work itself is wrong (missing table, type mismatch, constraint
    /// violation): retrying gives the same answer.
    Permanent,
}

/// An error talking to one of the databases.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("cannot connect to the {role} database {url}: {detail}")]
    Connect {
        role: &'static str,
        url: String,
        detail: String,
    },
    #[error("timed out waiting for a {role} database connection (pool of {size})")]
    PoolTimeout { role: &'static str, size: usize },
    #[error("{}", describe(.0))]
    Postgres(#[from] tokio_postgres::Error),
    #[error(
        "no slot of the fleet's source-read ceiling (source.max_concurrent_reads) came free within {0:?}"
    )]
    NoReadSlot(std::time::Duration),
}

impl DbError {
    pub fn class(&self) -> ErrorClass {
        match self {
            DbError::Connect { .. } | DbError::PoolTimeout { .. } => ErrorClass::Unavailable,
            DbError::NoReadSlot(_) => ErrorClass::Transient,
            DbError::Postgres(e) => classify(e),
        }
    }
}

/// Sorts a driver error from a connection that was established (failures
/// to connect are [`DbError::Connect`]).
pub fn classify(error: &tokio_postgres::Error) -> ErrorClass {
    let Some(code) = error.code() else {
        // No SQLSTATE: the connection broke, timed out or closed.
        return ErrorClass::Disconnected;
    };
    // A read-only transaction: a destination switched over, its old
    // primary still taking connections as a standby (the source's sessions
    // are read-only by design, and only a stream's query that writes meets
    // this there, which planning does first). A full disk stays transient:
    // on the source it can be the job's own doing (a query stream's sort
    // spilling), and waiting for ever would fill it again and again.
    let unavailable = [
        SqlState::CANNOT_CONNECT_NOW,
        SqlState::TOO_MANY_CONNECTIONS,
        SqlState::READ_ONLY_SQL_TRANSACTION,
    ];
    // A session ended under the job: by an operator, a crash, or the
    // server's `idle_session_timeout` racing a pooled connection's reuse.
    let disconnected = [
        SqlState::ADMIN_SHUTDOWN,
        SqlState::CRASH_SHUTDOWN,
        SqlState::IDLE_SESSION_TIMEOUT,
    ];
    let transient = [
        SqlState::T_R_SERIALIZATION_FAILURE,
        SqlState::T_R_DEADLOCK_DETECTED,
        SqlState::LOCK_NOT_AVAILABLE,
        SqlState::QUERY_CANCELED,
        SqlState::IDLE_IN_TRANSACTION_SESSION_TIMEOUT,
    ];
    if unavailable.contains(code) {
        ErrorClass::Unavailable
    } else if disconnected.contains(code) || code.code().starts_with("08") {
        ErrorClass::Disconnected
    } else if transient.contains(code) || code.code().starts_with("53") {
        ErrorClass::Transient
    } else {
        ErrorClass::Permanent
    }
}

/// The server's own message with its detail and hint, or the driver's chain
/// of causes for errors that did not come from the server.
pub fn describe(error: &tokio_postgres::Error) -> String {
    if let Some(db) = error.as_db_error() {
        let mut text = db.message().to_string();
        if let Some(detail) = db.detail() {
            text.push_str(&format!(" ({detail})"));
        }
        if let Some(hint) = db.hint() {
            text.push_str(&format!(" hint: {hint}"));
        }
        return text;
    }
    let mut text = error.to_string();
    let mut cause = std::error::Error::source(error);
    while let Some(c) = cause {
        text.push_str(&format!(": {c}"));
        cause = c.source();
    }
    text
}
