//! The PostgreSQL side of syncfleet.
//!
//! - [`ceiling`]: the fleet-wide ceiling on source reads, as advisory-lock
//!   slots in the destination.
//! - [`pool`]: connection pools for the source (the app database, read only)
//!   and the destination, with the session settings that make text values
//!   round-trip exactly between the two.
//! - [`shape`]: what a stream looks like on the source: its columns, their
//!   types and its key ([`StreamShape`]), found by asking the server to
//!   describe the stream's `SELECT`, so bad config fails before anything runs.
//! - [`sql`]: the SQL syncfleet runs, built from a shape; key-range predicates
//!   bind every value, and every identifier is quoted.
//! - [`scan`]: walks a stream's key space in order and yields batch
//!   boundaries, a bounded chunk at a time (planning and verify use it).
//! - [`ddl`]: creates a missing destination table (and the enum and domain
//!   types it needs) from the source's column types.
//! - [`control`]: the control schema in the destination (`syncfleet.runs`,
//!   `syncfleet.batches`, `syncfleet.run_streams` (which run holds each
//!   stream), `syncfleet.watermarks` (incremental runs' cursors), and
//!   `syncfleet.fleet_reads` and `syncfleet.standby_reads`, what a fleet's
//!   workers share about reading the source), its migrations and queries.
//! - [`tls`]: TLS to PostgreSQL as the URL's `sslmode` and `sslrootcert` ask.
//! - [`error`]: errors that say whether trying again can help.

pub mod ceiling;
pub mod control;
pub mod ddl;
pub mod error;
pub mod pool;
pub mod scan;
pub mod shape;
pub mod sql;
pub mod tls;

pub use error::{DbError, ErrorClass};
pub use pool::{Pool, Role};
pub use shape::{Column, ShapeError, StreamShape};
