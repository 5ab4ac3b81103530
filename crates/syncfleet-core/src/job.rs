//! The job message: what a producer publishes and a worker executes.
//!
//! A job names one batch of one stream by its key range, never by its rows,
//! so a message stays a few hundred bytes whatever the batch size, and
//! executing it always reads the source's *current* rows in that range. That
//! is what makes a replay harmless: running the same job again converges the
//! destination range to the source range again.

use serde::{Deserialize, Serialize};

/// The message format version. A worker dead-letters versions it does not know.
pub const JOB_VERSION: u32 = 1;

/// A key value: one text value per key column, in PostgreSQL's text output
/// form (`42`, `b3c1…-uuid`, `O'Brien`). Text keeps every key type intact and
/// is cast back to the column's type on the server.
pub type Key = Vec<String>;

/// A half-open slice of a stream's key space: `lower < key <= upper`.
/// `None` is unbounded, so the first and last batches of a run cover keys
/// inserted after planning, and together a run's batches cover every key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct KeyRange {
    pub lower: Option<Key>,
    pub upper: Option<Key>,
}

/// One batch of one stream of one run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    /// Message format version, [`JOB_VERSION`].
    pub v: u32,
    /// The run this batch belongs to (`syncfleet.runs.id`).
    pub run_id: i64,
    /// Stream name; the worker resolves it in its own config.
    pub stream: String,
    /// Batch number within the run's stream (`syncfleet.batches.batch_no`).
    pub batch: i64,
    /// The key range to converge.
    pub range: KeyRange,
    /// Instead of the whole range, only the rows whose `columns` hold one
    /// of `values` (incremental runs and upstream events): the rows found
    /// are upserted, and destination rows with those values that the source
    /// no longer has are deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub select: Option<Selection>,
    /// The source primary's WAL position when the job was made: every
    /// change the job is about lies before it. A worker that reads from a
    /// standby (`source.replica_url`) first waits until the standby has
    /// replayed that far, or it could converge the range to rows older
    /// than the change it was sent for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_lsn: Option<Lsn>,
}

/// A PostgreSQL WAL position (`pg_lsn`), written as PostgreSQL writes it:
/// two hexadecimal halves, `16/B374D848`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Lsn(pub u64);

impl std::str::FromStr for Lsn {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parsed = s.split_once('/').and_then(|(high, low)| {
            let high = u32::from_str_radix(high, 16).ok()?;
            let low = u32::from_str_radix(low, 16).ok()?;
            Some(Lsn(u64::from(high) << 32 | u64::from(low)))
        });
        parsed.ok_or_else(|| format!("expected a WAL position like 16/B374D848, got '{s}'"))
    }
}

impl TryFrom<String> for Lsn {
    type Error = String;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Lsn> for String {
    fn from(lsn: Lsn) -> String {
        lsn.to_string()
    }
}

impl std::fmt::Display for Lsn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

/// A set of rows named by the values of some output columns of a stream:
/// its key columns, or a column that carries another table's id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Selection {
    pub columns: Vec<String>,
    /// One value per column for each row, in PostgreSQL's text form.
    pub values: Vec<Key>,
}

/// `run_id` of jobs that belong to no run (upstream events): nothing is
/// recorded in the control schema for them.
pub const NO_RUN: i64 = 0;

/// Why a message body is not a job we can execute.
#[derive(Debug, thiserror::Error)]
pub enum JobDecodeError {
    #[error(
        "message is not a syncfleet job (expected JSON with v, run_id, stream, batch, range): {0}"
    )]
    Malformed(#[from] serde_json::Error),
    #[error(
        "job message version {0} is not supported (this worker understands version {JOB_VERSION})"
    )]
    UnknownVersion(u32),
}

impl Job {
    pub fn new(run_id: i64, stream: impl Into<String>, batch: i64, range: KeyRange) -> Self {
        Self {
            v: JOB_VERSION,
            run_id,
            stream: stream.into(),
            batch,
            range,
            select: None,
            source_lsn: None,
        }
    }

    /// The same job, stamped with the source's WAL position.
    pub fn at(self, source_lsn: Option<Lsn>) -> Self {
        Self { source_lsn, ..self }
    }

    /// A job for the rows that `select` names.
    pub fn selection(
        run_id: i64,
        stream: impl Into<String>,
        batch: i64,
        select: Selection,
    ) -> Self {
        Self {
            select: Some(select),
            ..Self::new(run_id, stream, batch, KeyRange::default())
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a job always serializes")
    }

    pub fn decode(body: &[u8]) -> Result<Self, JobDecodeError> {
        let job: Job = serde_json::from_slice(body)?;
        if job.v != JOB_VERSION {
            return Err(JobDecodeError::UnknownVersion(job.v));
        }
        Ok(job)
    }

    /// An event job's two halves, each naming half its rows, or `None`
    /// for a job of one row or of a run (whose batch is recorded as one).
    /// A worker splits an event job one of whose values fails it (see the
    /// worker's `JobError::BadValue`), until only the values at fault are
    /// dead-lettered: the rest of a coalesced window still arrives. The
    /// halves keep the job's id, so `dead-letters replay ID` replays them
    /// all.
    pub fn halves(&self) -> Option<(Job, Job)> {
        let select = self.select.as_ref().filter(|s| s.values.len() > 1)?;
        if self.run_id != NO_RUN {
            return None;
        }
        let (first, second) = select.values.split_at(select.values.len() / 2);
        let half = |values: &[Key]| Job {
            select: Some(Selection {
                columns: select.columns.clone(),
                values: values.to_vec(),
            }),
            ..self.clone()
        };
        Some((half(first), half(second)))
    }

    /// A stable id for logs and the broker's `message_id`.
    pub fn id(&self) -> String {
        format!("{}:{}:{}", self.run_id, self.stream, self.batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_event_jobs_of_several_rows_split() {
        let select = |n: usize| Selection {
            columns: vec!["id".into()],
            values: (0..n).map(|i| vec![i.to_string()]).collect(),
        };
        let job = Job::selection(NO_RUN, "users", 9, select(5)).at(Some(Lsn(7)));
        let (a, b) = job.halves().unwrap();
        assert_eq!(a.select.unwrap().values, select(5).values[..2]);
        assert_eq!(b.select.as_ref().unwrap().values, select(5).values[2..]);
        assert_eq!((b.id(), b.source_lsn), (job.id(), Some(Lsn(7))));
        assert!(
            Job::selection(NO_RUN, "users", 9, select(1))
                .halves()
                .is_none()
        );
        assert!(Job::selection(3, "users", 9, select(5)).halves().is_none());
        assert!(
            Job::new(NO_RUN, "users", 9, KeyRange::default())
                .halves()
                .is_none()
        );
    }

    #[test]
    fn round_trips_and_rejects_bad_messages() {
        let job = Job::new(
            7,
            "users",
            3,
            KeyRange {
                lower: Some(vec!["10".into(), "O'Brien \"x\"".into()]),
                upper: None,
            },
        );
        assert_eq!(Job::decode(&job.encode()).unwrap(), job);
        let stamped = job.clone().at(Some(Lsn(0x16_B374_D848)));
        assert!(
            String::from_utf8_lossy(&stamped.encode()).contains(r#""source_lsn":"16/B374D848""#)
        );
        assert_eq!(Job::decode(&stamped.encode()).unwrap(), stamped);
        let bad = String::from_utf8(stamped.encode())
            .unwrap()
            .replace("16/B374D848", "16-B374D848");
        assert!(matches!(
            Job::decode(bad.as_bytes()),
            Err(JobDecodeError::Malformed(e)) if e.to_string().contains("expected a WAL position")
        ));
        assert_eq!("0/0".parse::<Lsn>(), Ok(Lsn(0)));
        assert!(Lsn(0x1_0000_0000) > "0/FFFFFFFF".parse().unwrap());
        assert!(matches!(
            Job::decode(b"{not json"),
            Err(JobDecodeError::Malformed(_))
        ));
        let mut future = job.clone();
        future.v = 99;
        assert!(matches!(
            Job::decode(&future.encode()),
            Err(JobDecodeError::UnknownVersion(99))
        ));
    }
}
