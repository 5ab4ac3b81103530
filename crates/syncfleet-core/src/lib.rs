//! Types every syncfleet component shares, and nothing that does I/O beyond
//! reading the config file and the TLS files it names.
//!
//! - [`config`]: the TOML file and its environment overrides, validated once
//!   into typed values ([`Config`]). Everything downstream trusts these values.
//! - [`job`]: the message a producer publishes and a worker executes: one
//!   batch of one stream, named by its key range ([`Job`]).
//! - [`ident`]: SQL identifier quoting. Every identifier that reaches SQL goes
//!   through it; every value is bound instead.
//! - [`secret`]: connection URLs that never print their password.
//! - [`shutdown`]: the one stop signal every long-running task selects on.
//! - [`backoff`]: capped exponential delays with full jitter.
//! - [`duration`]: `"250ms"`, `"60s"`, `"5m"` for config fields.
//! - [`health`]: the process's readiness, for `/readyz`.
//! - [`metrics`]: the name of every metric syncfleet exports.

pub mod backoff;
pub mod config;
pub mod duration;
pub mod health;
pub mod ident;
pub mod job;
pub mod metrics;
pub mod secret;
pub mod shutdown;

pub use config::{Config, ConfigError, StreamConfig, StreamSource, TableName};
pub use job::{Job, KeyRange, Selection};
pub use secret::SecretUrl;
