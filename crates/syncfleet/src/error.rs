//! Every failure of a command, and its exit code.

use std::process::ExitCode;

use syncfleet_core::ConfigError;
use syncfleet_db::{DbError, ShapeError};
use syncfleet_producer::PlanError;
use syncfleet_worker::WorkerError;

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad usage or config: exit 2.
    #[error("{0}")]
    Usage(String),
    /// Anything else: exit 1.
    #[error("{0}")]
    Failed(String),
    /// A bounded wait ran out while the work goes on (`sync --wait
    /// --timeout`): exit 4.
    #[error("{0}")]
    TimedOut(String),
    /// Refused for now: another run of the stream is still going (`sync`,
    /// `sync --resume`, `dead-letters replay`): exit 5, try again later.
    #[error("{0}")]
    Busy(String),
}

impl CliError {
    pub fn exit_code(&self) -> ExitCode {
        match self {
            CliError::Usage(_) => ExitCode::from(2),
            CliError::Failed(_) => ExitCode::from(1),
            CliError::TimedOut(_) => ExitCode::from(4),
            CliError::Busy(_) => ExitCode::from(5),
        }
    }
}

/// Exit 3: the command did its work and found the data wrong (`verify`
/// found a difference, a run `sync --wait` waited for failed), as opposed
/// to 1, not being able to do it (a server unreachable, say).
pub fn found_wrong() -> ExitCode {
    ExitCode::from(3)
}

impl From<ConfigError> for CliError {
    fn from(e: ConfigError) -> Self {
        CliError::Usage(e.to_string())
    }
}

impl From<ShapeError> for CliError {
    fn from(e: ShapeError) -> Self {
        match e {
            ShapeError::Invalid { .. } => CliError::Usage(e.to_string()),
            ShapeError::Db { .. } => CliError::Failed(e.to_string()),
        }
    }
}

impl From<PlanError> for CliError {
    fn from(e: PlanError) -> Self {
        match e {
            PlanError::Invalid(_) | PlanError::UnknownRun(_) => CliError::Usage(e.to_string()),
            PlanError::Going(_) | PlanError::Planning(_) => CliError::Busy(e.to_string()),
            _ => CliError::Failed(e.to_string()),
        }
    }
}

impl From<WorkerError> for CliError {
    fn from(e: WorkerError) -> Self {
        match e {
            WorkerError::Config(_) => CliError::Usage(e.to_string()),
            _ => CliError::Failed(e.to_string()),
        }
    }
}

macro_rules! failed_from {
    ($($t:ty),*) => {$(
        impl From<$t> for CliError {
            fn from(e: $t) -> Self {
                CliError::Failed(e.to_string())
            }
        }
    )*};
}

failed_from!(DbError, syncfleet_broker::BrokerError, std::io::Error);

/// The server's message, detail and hint: the driver's own `Display` is
/// only "db error".
impl From<tokio_postgres::Error> for CliError {
    fn from(e: tokio_postgres::Error) -> Self {
        CliError::Failed(DbError::from(e).to_string())
    }
}

impl CliError {
    /// The same error, its message prefixed with where it happened.
    pub fn at(self, place: &str) -> Self {
        match self {
            CliError::Usage(m) => CliError::Usage(format!("{place}: {m}")),
            CliError::Failed(m) => CliError::Failed(format!("{place}: {m}")),
            CliError::TimedOut(m) => CliError::TimedOut(format!("{place}: {m}")),
            CliError::Busy(m) => CliError::Busy(format!("{place}: {m}")),
        }
    }
}
