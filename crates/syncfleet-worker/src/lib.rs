//! Consumes jobs and converges one destination key range per job.
//!
//! - [`execute`]: the step function. [`Executor::execute`] takes one job
//!   and makes the destination's key range equal to the source's, in a
//!   constant number of statements whatever the batch size;
//!   [`Executor::execute_group`] does so for several in one transaction.
//!   Tests call them directly, without a broker.
//! - [`consume`]: the loop around it: takes deliveries with a bounded
//!   prefetch, runs up to `concurrency` groups of jobs at once (small jobs
//!   waiting together share a transaction), and acks a job only after its
//!   destination transaction committed.
//! - [`error`]: a failed job says what happens next: retry or dead-letter.
//! - [`throttle`]: the gate every source read passes, and the adaptive
//!   throttle that sets how wide it opens.
//! - [`unchanged`]: when a re-sync compares a range's fingerprints before
//!   copying it.
//!
//! Delivery contract: a job is acked after its commit, so a crash between
//! commit and ack redelivers a job that is already applied. That is safe
//! because executing a job is idempotent: it rewrites the range from the
//! source's current rows and deletes what the source no longer has.

pub mod consume;
pub mod error;
pub mod execute;
pub mod throttle;
pub mod unchanged;

pub use consume::{WorkerError, run};
pub use error::JobError;
pub use execute::{BatchOutcome, Executor};
