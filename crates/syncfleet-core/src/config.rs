//! The configuration file, validated once into typed values.
//!
//! One TOML file (`syncfleet.toml`, `--config PATH` or `SYNCFLEET_CONFIG`)
//! with environment overrides for the three URLs. Unknown keys are errors,
//! not silently ignored, and every error names the file and the field.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::backoff::RetryPolicy;
use crate::duration;
use crate::ident;
use crate::secret::{SecretUrl, percent_decode};

/// Environment variables that override the file.
pub const ENV_SOURCE_URL: &str = "SYNCFLEET_SOURCE_URL";
pub const ENV_DESTINATION_URL: &str = "SYNCFLEET_DESTINATION_URL";
pub const ENV_AMQP_URL: &str = "SYNCFLEET_AMQP_URL";
pub const ENV_MANAGEMENT_URL: &str = "SYNCFLEET_RABBITMQ_MANAGEMENT_URL";
/// The seed's knobs: retry attempts, and the delay between attempts.
pub const ENV_MAX_RETRIES: &str = "SYNC_MAX_RETRIES";
pub const ENV_DELAY_SECONDS: &str = "SYNC_DELAY_SECONDS";
pub const ENV_INTERVAL_SECONDS: &str = "SYNC_INTERVAL_SECONDS";
pub const ENV_ENABLE_INCREMENTAL: &str = "SYNC_ENABLE_INCREMENTAL";
/// Every variable above, for a tool that runs syncfleet on its own
/// databases and broker whatever the operator's shell points at.
pub const ENV_VARS: [&str; 8] = [
    ENV_SOURCE_URL,
    ENV_DESTINATION_URL,
    ENV_AMQP_URL,
    ENV_MANAGEMENT_URL,
    ENV_MAX_RETRIES,
    ENV_DELAY_SECONDS,
    ENV_INTERVAL_SECONDS,
    ENV_ENABLE_INCREMENTAL,
];

/// Everything a syncfleet process needs to know, validated.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the config came from, for error messages.
    pub origin: String,
    pub source: DbConfig,
    /// How gently the fleet reads the source (the rest of `[source]`).
    pub reads: ReadLimits,
    pub destination: DbConfig,
    pub broker: BrokerConfig,
    pub jobs: JobsConfig,
    pub worker: WorkerConfig,
    pub producer: ProducerConfig,
    pub streams: Vec<StreamConfig>,
}

#[derive(Debug, Clone)]
pub struct DbConfig {
    pub url: SecretUrl,
    /// Pool size. For the source this is also the most connections the whole
    /// process takes from the app database.
    pub max_connections: usize,
    /// Bounds connecting and waiting for a pooled connection.
    pub connect_timeout: Duration,
    /// Set on every session: the server cancels any statement running longer.
    pub statement_timeout: Option<Duration>,
}

/// Protection of the source database while the fleet reads it.
#[derive(Debug, Clone)]
pub struct ReadLimits {
    /// Fleet-wide: source reads running at once across every worker
    /// process, however many pods run. `None` is unlimited.
    pub max_concurrent: Option<u32>,
    /// Fleet-wide: rows read per second, on average, across every worker
    /// process. `None` is unlimited.
    pub max_rows_per_second: Option<u32>,
    /// Read from this standby instead; the primary (`source.url`) is still
    /// the one probed for the app's latency.
    pub replica_url: Option<SecretUrl>,
    /// The adaptive throttle; `None` when disabled.
    pub throttle: Option<ThrottleConfig>,
}

/// The adaptive throttle: back off when the app's own latency rises.
#[derive(Debug, Clone, PartialEq)]
pub struct ThrottleConfig {
    /// A cheap query standing for the app's hot path, timed on the primary.
    pub probe: String,
    /// Time between probes.
    pub interval: Duration,
    /// Back off when a probe takes longer than the idle baseline times this.
    pub factor: f64,
    /// ...and longer than this, so that noise on sub-millisecond probes
    /// does not count as a rise.
    pub min_latency: Duration,
}

#[derive(Debug, Clone)]
pub struct BrokerConfig {
    pub url: SecretUrl,
    /// Every exchange and queue name starts with this, so several deployments
    /// (and tests) can share one broker.
    pub prefix: String,
    pub connect_timeout: Duration,
    /// The broker's `consumer_timeout`: a delivery unacked for this long
    /// closes its channel. Every job deadline must stay well below it.
    pub consumer_timeout: Duration,
    /// RabbitMQ's management API (`http://user:pass@host:15672`, or
    /// `https://`), for queue depths that include unacked messages.
    /// Optional.
    pub management_url: Option<SecretUrl>,
    /// The files an `amqps://` URL names for TLS.
    pub tls: BrokerTls,
}

/// The PEM files an `amqps://` URL names in its query, under RabbitMQ's
/// URI parameter names: `cacertfile` (CAs trusted besides the system's),
/// `certfile` and `keyfile` (a client certificate, for a broker that asks
/// for one). The broker's certificate is always checked, chain and host.
/// They are read again at each connection, so renewed files are picked
/// up without a restart.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BrokerTls {
    pub ca_file: Option<PathBuf>,
    /// The client's certificate and its key.
    pub client: Option<(PathBuf, PathBuf)>,
}

#[derive(Debug, Clone)]
pub struct JobsConfig {
    /// Default rows per batch for streams that do not set their own.
    pub batch_size: u32,
    /// Default bound on one job, for streams that do not set their own.
    pub deadline: Duration,
    /// Attempts per job before it is dead-lettered, and the delays between.
    pub retry: RetryPolicy,
}

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Transactions one worker process runs at once, each one job or a group
    /// of small ones; its broker prefetch is this times the group size.
    pub concurrency: u16,
    /// How long a stopping worker lets jobs in flight finish.
    pub shutdown_grace: Duration,
}

/// One reporting tab: where its rows come from and where they go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamConfig {
    pub name: String,
    pub source: StreamSource,
    /// Key columns; `None` means the source table's primary key.
    pub key: Option<Vec<String>>,
    pub batch_size: u32,
    pub destination_table: TableName,
    /// Bound on one job of this stream: past it, the job's queries are
    /// cancelled on the server and the job is retried later.
    pub deadline: Duration,
    /// The change-marker column of incremental runs (`updated_at`, say).
    pub cursor: Option<String>,
    /// How far back each incremental run looks before the last watermark,
    /// so rows committed late by long transactions are not missed.
    pub cursor_overlap: Duration,
    /// Upstream event tables that refresh this stream, and the stream's
    /// output column that carries their ids. A `table` stream listens to
    /// its own table by key without being told.
    pub events: Vec<(String, String)>,
}

impl StreamConfig {
    /// The tables whose events refresh this stream, each with the columns
    /// its ids name (`None` for the stream's own key).
    pub fn event_tables(&self) -> Vec<(String, Option<String>)> {
        let mut tables: Vec<(String, Option<String>)> = self
            .events
            .iter()
            .map(|(t, c)| (t.clone(), Some(c.clone())))
            .collect();
        // The stream's own table as configured, with its schema if it has
        // one (events for a table of that name in another schema are not
        // its own); `[stream.events]` naming it takes its place.
        if let StreamSource::Table(t) = &self.source {
            let own = match &t.schema {
                Some(schema) => format!("{schema}.{}", t.name),
                None => t.name.clone(),
            };
            if !tables
                .iter()
                .any(|(name, _)| *name == own || *name == t.name)
            {
                tables.push((own, None));
            }
        }
        tables
    }
}

/// What a job may take beyond its deadline before its delivery is settled:
/// the cancel of its statements, and the settling itself.
pub const SETTLE_SLACK: Duration = Duration::from_secs(10);

/// The producer service's schedule (`[producer]`).
#[derive(Debug, Clone)]
pub struct ProducerConfig {
    /// Between two runs of a stream (`SYNC_INTERVAL_SECONDS`).
    pub interval: Duration,
    /// Whether the interval runs are incremental (`SYNC_ENABLE_INCREMENTAL`).
    pub incremental: bool,
    /// Between two streams' runs, so they do not all start at once
    /// (`SYNC_DELAY_SECONDS`).
    pub stagger: Duration,
    /// Between two full reconcile runs of a stream (they also propagate
    /// deletes, which incremental runs cannot see).
    pub full_interval: Duration,
    /// Events are coalesced for this long...
    pub event_window: Duration,
    /// ...or until this many keys, whichever comes first.
    pub event_max_keys: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamSource {
    Table(TableName),
    /// A single SELECT, used as a subquery.
    Query(String),
}

/// An optionally schema-qualified table name. `Display` quotes it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TableName {
    pub schema: Option<String>,
    pub name: String,
}

impl TableName {
    /// `"users"` or `"reporting.users"`; at most one dot.
    pub fn parse(text: &str) -> Result<Self, String> {
        let parts: Vec<&str> = text.split('.').collect();
        let bad = || format!("expected \"table\" or \"schema.table\", got {text:?}");
        match parts.as_slice() {
            [name] if !name.is_empty() => Ok(Self {
                schema: None,
                name: name.to_string(),
            }),
            [schema, name] if !schema.is_empty() && !name.is_empty() => Ok(Self {
                schema: Some(schema.to_string()),
                name: name.to_string(),
            }),
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.schema {
            Some(s) => write!(f, "{}.{}", ident::quote(s), ident::quote(&self.name)),
            None => f.write_str(&ident::quote(&self.name)),
        }
    }
}

/// A configuration that cannot be used. Each names where and what.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {detail}")]
    Parse { path: String, detail: String },
    #[error("config {origin}: {field}: {message}")]
    Invalid {
        origin: String,
        field: String,
        message: String,
    },
}

// ---- the file as written ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    source: Option<RawSource>,
    destination: Option<RawDb>,
    broker: Option<RawBroker>,
    #[serde(default)]
    jobs: RawJobs,
    #[serde(default)]
    worker: RawWorker,
    #[serde(default)]
    producer: RawProducer,
    #[serde(default, rename = "stream")]
    streams: Vec<RawStream>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDb {
    url: Option<String>,
    max_connections: Option<usize>,
    connect_timeout: Option<String>,
    statement_timeout: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSource {
    url: Option<String>,
    max_connections: Option<usize>,
    connect_timeout: Option<String>,
    statement_timeout: Option<String>,
    max_concurrent_reads: Option<u32>,
    max_rows_per_second: Option<u32>,
    replica_url: Option<String>,
    throttle: Option<RawThrottle>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawThrottle {
    enabled: Option<bool>,
    probe: Option<String>,
    interval: Option<String>,
    factor: Option<f64>,
    min_latency: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawBroker {
    url: Option<String>,
    prefix: Option<String>,
    connect_timeout: Option<String>,
    consumer_timeout: Option<String>,
    management_url: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawJobs {
    batch_size: Option<u32>,
    deadline: Option<String>,
    max_attempts: Option<u32>,
    retry_initial: Option<String>,
    retry_max: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawWorker {
    concurrency: Option<u16>,
    shutdown_grace: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStream {
    name: String,
    table: Option<String>,
    query: Option<String>,
    key: Option<Vec<String>>,
    batch_size: Option<u32>,
    destination_table: Option<String>,
    deadline: Option<String>,
    cursor: Option<String>,
    cursor_overlap: Option<String>,
    events: Option<std::collections::BTreeMap<String, String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawProducer {
    interval: Option<String>,
    incremental: Option<bool>,
    stagger: Option<String>,
    full_interval: Option<String>,
    event_window: Option<String>,
    event_max_keys: Option<usize>,
}

const DEFAULT_BATCH_SIZE: u32 = 500;
const MAX_BATCH_SIZE: u32 = 1_000_000;
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_DEADLINE: Duration = Duration::from_secs(60);
const DEFAULT_CONSUMER_TIMEOUT: Duration = Duration::from_secs(30 * 60);
const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
const DEFAULT_MAX_ATTEMPTS: u32 = 3;
const DEFAULT_RETRY_INITIAL: Duration = Duration::from_secs(1);
const DEFAULT_RETRY_MAX: Duration = Duration::from_secs(60);
const DEFAULT_CURSOR_OVERLAP: Duration = Duration::from_secs(60);
const DEFAULT_INTERVAL: Duration = Duration::from_secs(300);
const DEFAULT_STAGGER: Duration = Duration::from_secs(10);
const DEFAULT_FULL_INTERVAL: Duration = Duration::from_secs(86_400);
const DEFAULT_EVENT_WINDOW: Duration = Duration::from_millis(250);
const DEFAULT_SOURCE_STATEMENT_TIMEOUT: &str = "5m";
const DEFAULT_MAX_CONCURRENT_READS: u32 = 4;
const DEFAULT_THROTTLE_PROBE: &str = "SELECT 1";
const DEFAULT_THROTTLE_INTERVAL: Duration = Duration::from_millis(100);
const DEFAULT_THROTTLE_FACTOR: f64 = 2.0;
const DEFAULT_THROTTLE_MIN_LATENCY: Duration = Duration::from_millis(1);

impl Config {
    /// Reads and validates a config file, applying overrides from the process
    /// environment.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&path.display().to_string(), &text, |k| {
            std::env::var(k).ok()
        })
    }

    /// Validates config text. `env` looks up overrides; tests pass their own.
    pub fn parse(
        origin: &str,
        text: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        // The parser quotes the offending line, which may be a URL with its
        // password (`uri = "postgres://app:pw@db/app"`, a typo of `url`).
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_string(),
            detail: e
                .to_string()
                .trim_end()
                .lines()
                .map(crate::secret::redact)
                .collect::<Vec<_>>()
                .join("\n"),
        })?;
        let v = Validator { origin };
        let raw_source = raw.source.unwrap_or_default();
        let reads = v.reads(&raw_source)?;
        let source = v.db(
            "source",
            RawDb {
                url: raw_source.url,
                max_connections: raw_source.max_connections,
                connect_timeout: raw_source.connect_timeout,
                statement_timeout: raw_source
                    .statement_timeout
                    .or_else(|| Some(DEFAULT_SOURCE_STATEMENT_TIMEOUT.into())),
            },
            env(ENV_SOURCE_URL),
        )?;
        let destination = v.db(
            "destination",
            raw.destination.unwrap_or_default(),
            env(ENV_DESTINATION_URL),
        )?;
        let broker = v.broker(
            raw.broker.unwrap_or_default(),
            env(ENV_AMQP_URL),
            env(ENV_MANAGEMENT_URL),
        )?;
        let jobs = v.jobs(raw.jobs, &env)?;
        let concurrency = raw.worker.concurrency.unwrap_or(4);
        if concurrency == 0 {
            return Err(v.invalid("worker.concurrency", "must be at least 1"));
        }
        let worker = WorkerConfig {
            concurrency,
            shutdown_grace: v.duration(
                "worker.shutdown_grace",
                raw.worker.shutdown_grace,
                DEFAULT_SHUTDOWN_GRACE,
            )?,
        };
        let streams = v.streams(raw.streams, &jobs)?;
        let producer = v.producer(raw.producer, &env)?;
        Ok(Config {
            origin: origin.to_string(),
            source,
            reads,
            destination,
            broker,
            jobs,
            worker,
            producer,
            streams,
        })
    }

    /// A worker holds each delivery for up to its stream's deadline, plus
    /// [`SETTLE_SLACK`], after it may have waited (for a slot, at the read
    /// gate) about as long. The broker closes the channel of a delivery
    /// unacked past its `consumer_timeout` (and redelivers it elsewhere
    /// while it may still be running), so every deadline must stay under
    /// half of what that timeout leaves after the slack. So must the
    /// producer's event window, for which it holds events unacked: past
    /// the timeout the broker would take them back, window after window.
    pub fn check_deadlines(&self) -> Result<(), ConfigError> {
        let limit = self.broker.consumer_timeout.saturating_sub(SETTLE_SLACK) / 2;
        let deadlines = [
            ("jobs.deadline".to_string(), self.jobs.deadline),
            (
                "producer.event_window".to_string(),
                self.producer.event_window,
            ),
        ]
        .into_iter()
        .chain(
            self.streams
                .iter()
                .map(|s| (format!("stream '{}' deadline", s.name), s.deadline)),
        );
        for (what, deadline) in deadlines {
            if deadline > limit {
                let held = match what.as_str() {
                    "producer.event_window" => "events held unacked that long could be taken back",
                    _ => "a job that long could be redelivered while it still runs",
                };
                return Err(self.invalid_field(
                    &what,
                    format!(
                        "{deadline:?} is not comfortably below the broker's consumer_timeout \
                         ({:?}, broker.consumer_timeout): {held}; keep it under {limit:?}, or \
                         raise the broker's consumer_timeout and broker.consumer_timeout with it",
                        self.broker.consumer_timeout
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The longest any job may run: past it, a worker cancels the job.
    pub fn longest_deadline(&self) -> Duration {
        self.streams
            .iter()
            .map(|s| s.deadline)
            .fold(self.jobs.deadline, Duration::max)
    }

    fn invalid_field(&self, field: &str, message: String) -> ConfigError {
        ConfigError::Invalid {
            origin: self.origin.clone(),
            field: field.to_string(),
            message,
        }
    }

    pub fn stream(&self, name: &str) -> Option<&StreamConfig> {
        self.streams.iter().find(|s| s.name == name)
    }

    /// The streams named, in config order, or all of them when `names` is
    /// empty. An unknown name is a usage error naming the known ones.
    pub fn select_streams(&self, names: &[String]) -> Result<Vec<&StreamConfig>, ConfigError> {
        if let Some(unknown) = names.iter().find(|n| self.stream(n).is_none()) {
            let known: Vec<&str> = self.streams.iter().map(|s| s.name.as_str()).collect();
            return Err(self.invalid_field(
                "--stream",
                format!(
                    "no stream named '{unknown}' (configured: {})",
                    known.join(", ")
                ),
            ));
        }
        Ok(self
            .streams
            .iter()
            .filter(|s| names.is_empty() || names.contains(&s.name))
            .collect())
    }
}

/// An environment variable's whole number of seconds, at most what a
/// duration in the file can say (so that adding it to a clock cannot
/// overflow).
fn seconds(name: &str, value: &str) -> Result<Duration, ConfigError> {
    value
        .trim()
        .parse::<u64>()
        .ok()
        .filter(|s| s.checked_mul(1_000_000).is_some())
        .map(Duration::from_secs)
        .ok_or_else(|| {
            env_invalid(
                name,
                format!("expected a whole number of seconds, got {value:?}"),
            )
        })
}

/// The environment variable `name` cannot be used, and why.
fn env_invalid(name: &str, message: String) -> ConfigError {
    ConfigError::Invalid {
        origin: "environment".into(),
        field: name.into(),
        message,
    }
}

/// Where a URL field's value came from, for its errors: the variable wins
/// over the file.
fn origin(field: &str, from_env: Option<&str>, env_name: &str) -> String {
    match from_env.filter(|u| !u.trim().is_empty()) {
        Some(_) => format!("{field} (from {env_name})"),
        None => field.to_string(),
    }
}

struct Validator<'a> {
    origin: &'a str,
}

impl Validator<'_> {
    fn invalid(&self, field: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            origin: self.origin.to_string(),
            field: field.to_string(),
            message: message.into(),
        }
    }

    fn url(
        &self,
        field: &str,
        from_file: Option<String>,
        from_env: Option<String>,
        env_name: &str,
        schemes: &[&str],
    ) -> Result<SecretUrl, ConfigError> {
        let from_env = from_env.filter(|u| !u.trim().is_empty());
        let origin = origin(field, from_env.as_deref(), env_name);
        let url = from_env.or(from_file).ok_or_else(|| {
            self.invalid(field, format!("missing; set it in the file or {env_name}"))
        })?;
        if !schemes.iter().any(|s| url.starts_with(&format!("{s}://"))) {
            return Err(self.invalid(
                &origin,
                format!(
                    "expected a URL starting with {}, got {}",
                    schemes
                        .iter()
                        .map(|s| format!("{s}://"))
                        .collect::<Vec<_>>()
                        .join(" or "),
                    SecretUrl::new(url.clone())
                ),
            ));
        }
        Ok(SecretUrl::new(url))
    }

    fn timeout(&self, field: &str, text: Option<String>) -> Result<Duration, ConfigError> {
        self.duration(field, text, DEFAULT_CONNECT_TIMEOUT)
    }

    /// A positive duration field, or its default.
    fn duration(
        &self,
        field: &str,
        text: Option<String>,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        match text {
            None => Ok(default),
            Some(t) => match duration::parse(&t) {
                Ok(d) if !d.is_zero() => Ok(d),
                Ok(_) => Err(self.invalid(field, "must be greater than zero")),
                Err(e) => Err(self.invalid(field, e)),
            },
        }
    }

    fn db(
        &self,
        section: &str,
        raw: RawDb,
        env_url: Option<String>,
    ) -> Result<DbConfig, ConfigError> {
        let env_name = if section == "source" {
            ENV_SOURCE_URL
        } else {
            ENV_DESTINATION_URL
        };
        let url = self.url(
            &format!("{section}.url"),
            raw.url,
            env_url,
            env_name,
            &["postgres", "postgresql"],
        )?;
        let max_connections = raw.max_connections.unwrap_or(4);
        if !(1..=1000).contains(&max_connections) {
            return Err(self.invalid(
                &format!("{section}.max_connections"),
                format!("expected 1 to 1000, got {max_connections}"),
            ));
        }
        // PostgreSQL takes whole milliseconds in an int: less than one would
        // be 0, no timeout at all, and more than about 24 days is refused
        // at connect time.
        let statement_timeout = match raw.statement_timeout {
            None => None,
            Some(t) => {
                let field = format!("{section}.statement_timeout");
                let d = self.duration(&field, Some(t), Duration::ZERO)?;
                let max = Duration::from_millis(i32::MAX as u64);
                if d < Duration::from_millis(1) || d > max {
                    return Err(self.invalid(
                        &field,
                        format!("expected 1ms to {}s, got {d:?}", max.as_secs()),
                    ));
                }
                Some(d)
            }
        };
        Ok(DbConfig {
            url,
            max_connections,
            connect_timeout: self
                .timeout(&format!("{section}.connect_timeout"), raw.connect_timeout)?,
            statement_timeout,
        })
    }

    fn reads(&self, raw: &RawSource) -> Result<ReadLimits, ConfigError> {
        let positive = |field: &str, v: Option<u32>, otherwise: &str| match v {
            Some(0) => Err(self.invalid(field, format!("must be at least 1 ({otherwise})"))),
            other => Ok(other),
        };
        let replica_url = match &raw.replica_url {
            Some(u) => Some(self.url(
                "source.replica_url",
                Some(u.clone()),
                None,
                "",
                &["postgres", "postgresql"],
            )?),
            None => None,
        };
        let t = raw.throttle.as_ref();
        // Off unless `[source.throttle]` is there: it knows only what its
        // probe tells it, so it should be given the app's own lookup.
        let throttle = if t.is_some_and(|t| t.enabled.unwrap_or(true)) {
            let factor = t.and_then(|t| t.factor).unwrap_or(DEFAULT_THROTTLE_FACTOR);
            if !(factor > 1.0 && factor.is_finite()) {
                return Err(self.invalid(
                    "source.throttle.factor",
                    format!("expected a number above 1, got {factor}"),
                ));
            }
            let probe = t
                .and_then(|t| t.probe.clone())
                .unwrap_or_else(|| DEFAULT_THROTTLE_PROBE.into());
            if probe.trim().is_empty() {
                return Err(self.invalid("source.throttle.probe", "is empty"));
            }
            Some(ThrottleConfig {
                probe,
                interval: self.duration(
                    "source.throttle.interval",
                    t.and_then(|t| t.interval.clone()),
                    DEFAULT_THROTTLE_INTERVAL,
                )?,
                factor,
                min_latency: self.duration(
                    "source.throttle.min_latency",
                    t.and_then(|t| t.min_latency.clone()),
                    DEFAULT_THROTTLE_MIN_LATENCY,
                )?,
            })
        } else {
            None
        };
        Ok(ReadLimits {
            max_concurrent: match raw.max_concurrent_reads {
                None => Some(DEFAULT_MAX_CONCURRENT_READS),
                v => positive(
                    "source.max_concurrent_reads",
                    v,
                    "a large value for no practical limit",
                )?,
            },
            max_rows_per_second: positive(
                "source.max_rows_per_second",
                raw.max_rows_per_second,
                "leave it out for no limit",
            )?,
            replica_url,
            throttle,
        })
    }

    fn broker(
        &self,
        raw: RawBroker,
        env_url: Option<String>,
        management_env: Option<String>,
    ) -> Result<BrokerConfig, ConfigError> {
        let url_origin = origin("broker.url", env_url.as_deref(), ENV_AMQP_URL);
        let url = self.url(
            "broker.url",
            raw.url,
            env_url,
            ENV_AMQP_URL,
            &["amqp", "amqps"],
        )?;
        let tls = self.broker_tls(&url_origin, url.expose())?;
        let prefix = raw.prefix.unwrap_or_else(|| "syncfleet".into());
        let ok = !prefix.is_empty()
            && prefix.len() <= 100
            && prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
        if !ok {
            return Err(self.invalid(
                "broker.prefix",
                format!("expected 1-100 characters from [A-Za-z0-9_.-], got {prefix:?}"),
            ));
        }
        Ok(BrokerConfig {
            url,
            prefix,
            connect_timeout: self.timeout("broker.connect_timeout", raw.connect_timeout)?,
            consumer_timeout: self.duration(
                "broker.consumer_timeout",
                raw.consumer_timeout,
                DEFAULT_CONSUMER_TIMEOUT,
            )?,
            management_url: match (
                raw.management_url,
                management_env.filter(|u| !u.trim().is_empty()),
            ) {
                (None, None) => None,
                (from_file, from_env) => Some(self.url(
                    "broker.management_url",
                    from_file,
                    from_env,
                    ENV_MANAGEMENT_URL,
                    &["http", "https"],
                )?),
            },
            tls,
        })
    }

    /// The TLS files of an AMQP URL's query (see [`BrokerTls`]), each
    /// checked to hold what it names; and what else of the URL the AMQP
    /// client would misread.
    fn broker_tls(&self, field: &str, url: &str) -> Result<BrokerTls, ConfigError> {
        let query = url.split_once('?').map_or("", |(_, q)| q);
        let query = query.split('#').next().unwrap_or("");
        let param = |name: &str| {
            query
                .split('&')
                .filter_map(|pair| pair.split_once('='))
                .find(|(k, _)| *k == name)
                .map(|(_, v)| percent_decode(v))
        };
        let invalid = |message: String| self.invalid(field, message);
        // lapin reads such a host as none at all, and connects to localhost.
        if url.split_once("://").is_some_and(|(_, rest)| {
            let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
            authority.rsplit('@').next().unwrap_or("").starts_with('[')
        }) {
            return Err(invalid(
                "IPv6 address literals are not supported by the AMQP client; use a host name"
                    .into(),
            ));
        }
        for (name, why) in [
            (
                "password",
                "encrypted keys are not supported; give keyfile unencrypted",
            ),
            (
                "server_name_indication",
                "the certificate is checked for the URL's host",
            ),
        ] {
            if param(name).is_some() {
                return Err(invalid(format!("{name}: not supported: {why}")));
            }
        }
        if let Some(verify) = param("verify")
            && verify != "verify_peer"
        {
            return Err(invalid(format!(
                "verify: syncfleet always checks the broker's certificate (verify_peer); to trust \
                 a CA of your own, name its PEM file with cacertfile (got verify={verify})"
            )));
        }
        // Each file must hold what its parameter names: a certificate
        // (`cacertfile`, `certfile`) or an unencrypted private key.
        let pem = |name: &str| -> Result<Option<PathBuf>, ConfigError> {
            use rustls_pki_types::pem::PemObject;
            use rustls_pki_types::{CertificateDer, PrivateKeyDer};
            let Some(path) = param(name) else {
                return Ok(None);
            };
            if !url.starts_with("amqps://") {
                return Err(invalid(format!(
                    "{name}: TLS files apply to amqps:// URLs only"
                )));
            }
            let bytes = std::fs::read(&path)
                .map_err(|e| invalid(format!("{name}: cannot read {path}: {e}")))?;
            let (ok, expected) = match name {
                "keyfile" => (
                    PrivateKeyDer::from_pem_slice(&bytes).is_ok(),
                    "an unencrypted private key (-----BEGIN PRIVATE KEY-----)",
                ),
                _ => (
                    CertificateDer::pem_slice_iter(&bytes).any(|c| c.is_ok()),
                    "certificates (-----BEGIN CERTIFICATE-----)",
                ),
            };
            if !ok {
                return Err(invalid(format!(
                    "{name}: expected a PEM file of {expected}, {path} holds none"
                )));
            }
            Ok(Some(PathBuf::from(path)))
        };
        let client = match (pem("certfile")?, pem("keyfile")?) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            _ => {
                return Err(invalid(
                    "certfile and keyfile: a client certificate needs both".into(),
                ));
            }
        };
        Ok(BrokerTls {
            ca_file: pem("cacertfile")?,
            client,
        })
    }

    fn producer(
        &self,
        raw: RawProducer,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<ProducerConfig, ConfigError> {
        let env_seconds = |name: &str| env(name).map(|v| seconds(name, &v)).transpose();
        let interval = match env_seconds(ENV_INTERVAL_SECONDS)? {
            Some(d) if !d.is_zero() => d,
            Some(_) => {
                return Err(env_invalid(ENV_INTERVAL_SECONDS, "must be above 0".into()));
            }
            None => self.duration("producer.interval", raw.interval, DEFAULT_INTERVAL)?,
        };
        let incremental = match env(ENV_ENABLE_INCREMENTAL) {
            Some(v) => match v.trim().to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "on" => true,
                "false" | "0" | "no" | "off" => false,
                _ => {
                    return Err(env_invalid(
                        ENV_ENABLE_INCREMENTAL,
                        format!("expected true or false, got {v:?}"),
                    ));
                }
            },
            None => raw.incremental.unwrap_or(true),
        };
        let stagger = match env_seconds(ENV_DELAY_SECONDS)? {
            Some(d) => d,
            None => match raw.stagger {
                Some(t) => duration::parse(&t).map_err(|e| self.invalid("producer.stagger", e))?,
                None => DEFAULT_STAGGER,
            },
        };
        let event_max_keys = raw.event_max_keys.unwrap_or(1000);
        if !(1..=100_000).contains(&event_max_keys) {
            return Err(self.invalid(
                "producer.event_max_keys",
                format!("expected 1 to 100000, got {event_max_keys}"),
            ));
        }
        Ok(ProducerConfig {
            interval,
            incremental,
            stagger,
            full_interval: self.duration(
                "producer.full_interval",
                raw.full_interval,
                DEFAULT_FULL_INTERVAL,
            )?,
            event_window: self.duration(
                "producer.event_window",
                raw.event_window,
                DEFAULT_EVENT_WINDOW,
            )?,
            event_max_keys,
        })
    }

    fn jobs(
        &self,
        raw: RawJobs,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<JobsConfig, ConfigError> {
        let max_attempts = match env(ENV_MAX_RETRIES) {
            Some(v) => v.trim().parse::<u32>().map_err(|_| {
                env_invalid(
                    ENV_MAX_RETRIES,
                    format!("expected a whole number of attempts, got {v:?}"),
                )
            })?,
            None => raw.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS),
        };
        if !(1..=100).contains(&max_attempts) {
            let message = format!("expected 1 to 100, got {max_attempts}");
            return Err(match env(ENV_MAX_RETRIES) {
                Some(_) => env_invalid(ENV_MAX_RETRIES, message),
                None => self.invalid("jobs.max_attempts", message),
            });
        }
        let retry_initial = match env(ENV_DELAY_SECONDS) {
            Some(v) => match seconds(ENV_DELAY_SECONDS, &v)? {
                secs if !secs.is_zero() => secs,
                _ => {
                    return Err(env_invalid(
                        ENV_DELAY_SECONDS,
                        format!(
                            "expected a whole number of seconds above 0 (it also sets \
                             jobs.retry_initial, the first retry's delay, and a retry without \
                             backoff would hammer a failing database), got {v:?}"
                        ),
                    ));
                }
            },
            None => self.duration(
                "jobs.retry_initial",
                raw.retry_initial,
                DEFAULT_RETRY_INITIAL,
            )?,
        };
        // Unset, the ceiling rises to a first delay set above it (as
        // SYNC_DELAY_SECONDS may be); set, it must hold it.
        let retry_max = match raw.retry_max {
            None => DEFAULT_RETRY_MAX.max(retry_initial),
            set => self.duration("jobs.retry_max", set, DEFAULT_RETRY_MAX)?,
        };
        if retry_max < retry_initial {
            let from = match env(ENV_DELAY_SECONDS) {
                Some(_) => format!(", from {ENV_DELAY_SECONDS}"),
                None => String::new(),
            };
            return Err(self.invalid(
                "jobs.retry_max",
                format!("must be at least jobs.retry_initial ({retry_initial:?}{from})"),
            ));
        }
        Ok(JobsConfig {
            batch_size: self.batch_size("jobs.batch_size", raw.batch_size)?,
            deadline: self.duration("jobs.deadline", raw.deadline, DEFAULT_DEADLINE)?,
            retry: RetryPolicy {
                initial: retry_initial,
                max: retry_max,
                max_attempts,
            },
        })
    }

    fn batch_size(&self, field: &str, value: Option<u32>) -> Result<u32, ConfigError> {
        match value {
            None => Ok(DEFAULT_BATCH_SIZE),
            Some(n) if (1..=MAX_BATCH_SIZE).contains(&n) => Ok(n),
            Some(n) => Err(self.invalid(field, format!("expected 1 to {MAX_BATCH_SIZE}, got {n}"))),
        }
    }

    fn streams(
        &self,
        raw: Vec<RawStream>,
        jobs: &JobsConfig,
    ) -> Result<Vec<StreamConfig>, ConfigError> {
        let mut names = HashSet::new();
        let mut destinations = HashSet::new();
        let mut out = Vec::with_capacity(raw.len());
        for (i, s) in raw.into_iter().enumerate() {
            let field = |f: &str| format!("stream[{i}] ('{}').{f}", s.name);
            let valid_name = !s.name.is_empty()
                && s.name.len() <= 63
                && s.name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            if !valid_name {
                return Err(self.invalid(
                    &format!("stream[{i}].name"),
                    format!(
                        "expected 1-63 characters from [A-Za-z0-9_-], got {:?}",
                        s.name
                    ),
                ));
            }
            if !names.insert(s.name.clone()) {
                return Err(self.invalid(&field("name"), "another stream has the same name"));
            }
            let source = match (s.table, s.query) {
                (Some(t), None) => StreamSource::Table(
                    TableName::parse(&t).map_err(|e| self.invalid(&field("table"), e))?,
                ),
                (None, Some(q)) => {
                    let q = q.trim().trim_end_matches(';').trim().to_string();
                    if q.is_empty() {
                        return Err(self.invalid(&field("query"), "is empty"));
                    }
                    StreamSource::Query(q)
                }
                (Some(_), Some(_)) => {
                    return Err(
                        self.invalid(&field("table"), "set either table or query, not both")
                    );
                }
                (None, None) => {
                    return Err(self.invalid(&field("table"), "set either table or query"));
                }
            };
            if let Some(key) = &s.key {
                if key.is_empty() {
                    return Err(self.invalid(&field("key"), "needs at least one column"));
                }
                let unique: HashSet<&String> = key.iter().collect();
                if unique.len() != key.len() {
                    return Err(self.invalid(&field("key"), "names a column twice"));
                }
            } else if matches!(source, StreamSource::Query(_)) {
                return Err(self.invalid(
                    &field("key"),
                    "a query stream needs key = [\"column\", ...] (there is no primary key to default to)",
                ));
            }
            let destination_table = match s.destination_table {
                Some(t) => TableName::parse(&t)
                    .map_err(|e| self.invalid(&field("destination_table"), e))?,
                None => TableName {
                    schema: None,
                    name: s.name.clone(),
                },
            };
            // syncfleet's own tables (runs, batches, watermarks) would be
            // written and deleted from like any range.
            if let Some(schema) = &destination_table.schema
                && (schema == "syncfleet"
                    || schema.starts_with("pg_")
                    || schema == "information_schema")
            {
                return Err(self.invalid(
                    &field("destination_table"),
                    format!(
                        "{destination_table} is in schema {schema}, which holds syncfleet's or \
                         PostgreSQL's own tables; choose a table in another schema"
                    ),
                ));
            }
            // Compared as the destination resolves them with its default
            // search_path: `users` is `public.users`.
            let resolved = (
                destination_table
                    .schema
                    .clone()
                    .unwrap_or_else(|| "public".into()),
                destination_table.name.clone(),
            );
            if !destinations.insert(resolved) {
                return Err(self.invalid(
                    &field("destination_table"),
                    format!(
                        "{destination_table} is already written by another stream (an unqualified \
                         name is taken as in schema public); each stream needs its own table"
                    ),
                ));
            }
            let batch_size =
                self.batch_size(&field("batch_size"), s.batch_size.or(Some(jobs.batch_size)))?;
            let deadline = self.duration(&field("deadline"), s.deadline, jobs.deadline)?;
            let cursor_overlap = match s.cursor_overlap {
                Some(t) => {
                    duration::parse(&t).map_err(|e| self.invalid(&field("cursor_overlap"), e))?
                }
                None => DEFAULT_CURSOR_OVERLAP,
            };
            let events: Vec<(String, String)> = s.events.unwrap_or_default().into_iter().collect();
            if let Some((table, _)) = events.iter().find(|(_, c)| c.trim().is_empty()) {
                return Err(self.invalid(
                    &field(&format!("events.{table}")),
                    "name the stream's output column that carries the table's ids",
                ));
            }
            out.push(StreamConfig {
                batch_size,
                deadline,
                cursor: s.cursor,
                cursor_overlap,
                events,
                name: s.name,
                source,
                key: s.key,
                destination_table,
            });
        }
        Ok(out)
    }
}

/// Resolves the config path: the flag, else `SYNCFLEET_CONFIG`, else
/// `syncfleet.toml` in the working directory.
pub fn default_path(flag: Option<&Path>) -> PathBuf {
    flag.map(Path::to_path_buf)
        .or_else(|| std::env::var_os("SYNCFLEET_CONFIG").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("syncfleet.toml"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        [source]
        url = "postgres://app:pw@127.0.0.1/app"
        max_connections = 2
        [destination]
        url = "postgres://postgres@127.0.0.1/reporting"
        [broker]
        url = "amqp://guest:guest@127.0.0.1:5672/%2f"
        prefix = "t1"
        [[stream]]
        name = "users"
        table = "public.users"
        batch_size = 10
        [[stream]]
        name = "profiles"
        query = "SELECT id, bio FROM user_profiles;"
        key = ["id"]
        destination_table = "rep.profiles_tab"
    "#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse("test.toml", text, |_| None)
    }

    #[test]
    fn parses_a_good_file_with_defaults() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.source.max_connections, 2);
        assert_eq!(c.destination.max_connections, 4);
        assert_eq!(c.broker.prefix, "t1");
        assert_eq!(c.streams[0].batch_size, 10);
        assert_eq!(c.streams[0].destination_table.to_string(), "\"users\"");
        assert_eq!(c.streams[1].batch_size, DEFAULT_BATCH_SIZE);
        assert_eq!(
            c.streams[1].source,
            StreamSource::Query("SELECT id, bio FROM user_profiles".into())
        );
        assert_eq!(
            c.streams[1].destination_table.to_string(),
            "\"rep\".\"profiles_tab\""
        );
    }

    #[test]
    fn the_shipped_example_is_valid() {
        let text = include_str!("../../../syncfleet.example.toml");
        let c = parse(text).unwrap();
        assert_eq!(c.streams.len(), 2);
        assert_eq!(c.streams[0].batch_size, 10);
        assert_eq!(c.streams[1].batch_size, 50);
        assert_eq!(c.jobs.batch_size, 500);
    }

    #[test]
    fn the_throttle_is_off_unless_its_table_is_there() {
        assert!(parse(GOOD).unwrap().reads.throttle.is_none());
        let on = parse(&format!(
            "{GOOD}\n[source.throttle]\nmin_latency = \"500us\"\n"
        ))
        .unwrap();
        let throttle = on
            .reads
            .throttle
            .expect("a [source.throttle] table turns it on");
        assert_eq!(throttle.probe, "SELECT 1");
        assert_eq!(throttle.min_latency, Duration::from_micros(500));
        let off = parse(&format!("{GOOD}\n[source.throttle]\nenabled = false\n")).unwrap();
        assert!(off.reads.throttle.is_none());
    }

    #[test]
    fn a_parse_error_does_not_print_the_password_of_the_line_it_quotes() {
        for line in [
            "uri = \"postgres://app:s3cret@db/app\"",
            "url = postgres://app:s3cret@db/app",
        ] {
            let text = GOOD.replace("url = \"postgres://app:pw@127.0.0.1/app\"", line);
            let e = parse(&text).unwrap_err().to_string();
            assert!(e.contains("line 3"), "{e}");
            assert!(e.contains("app:***@db") && !e.contains("s3cret"), "{e}");
        }
    }

    #[test]
    fn a_statement_timeout_postgresql_cannot_take_is_refused() {
        for t in ["500us", "30d"] {
            let text = GOOD.replace(
                "max_connections = 2",
                &format!("max_connections = 2\nstatement_timeout = \"{t}\""),
            );
            let e = parse(&text).unwrap_err().to_string();
            assert!(
                e.contains("source.statement_timeout") && e.contains("expected 1ms"),
                "{e}"
            );
        }
    }

    #[test]
    fn the_seed_variables_override_retries() {
        let c = Config::parse("test.toml", GOOD, |k| match k {
            ENV_MAX_RETRIES => Some("7".into()),
            ENV_DELAY_SECONDS => Some("10".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(c.jobs.retry.max_attempts, 7);
        assert_eq!(c.jobs.retry.initial, Duration::from_secs(10));
        let e = Config::parse("test.toml", GOOD, |k| {
            (k == ENV_MAX_RETRIES).then(|| "lots".into())
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("SYNC_MAX_RETRIES") && e.contains("lots"), "{e}");

        // Errors name the variable that caused them, not a field the file
        // never set.
        let with = |name: &'static str, value: &'static str| {
            Config::parse("test.toml", GOOD, move |k| {
                (k == name).then(|| value.into())
            })
        };
        let e = with(ENV_MAX_RETRIES, "0").unwrap_err().to_string();
        assert!(
            e.contains("environment") && e.contains("SYNC_MAX_RETRIES"),
            "{e}"
        );
        // A first delay above the default ceiling raises the ceiling.
        let c = with(ENV_DELAY_SECONDS, "120").unwrap();
        assert_eq!(
            (c.jobs.retry.initial, c.jobs.retry.max),
            (Duration::from_secs(120), Duration::from_secs(120))
        );
        let capped = Config::parse(
            "test.toml",
            &GOOD.replace("[broker]", "[jobs]\nretry_max = \"60s\"\n[broker]"),
            |k| (k == ENV_DELAY_SECONDS).then(|| "120".into()),
        );
        let e = capped.unwrap_err().to_string();
        assert!(
            e.contains("jobs.retry_max") && e.contains("from SYNC_DELAY_SECONDS"),
            "{e}"
        );
        // Seconds a clock cannot add are refused, not a panic later.
        for name in [ENV_INTERVAL_SECONDS, ENV_DELAY_SECONDS] {
            let e = with(name, "18446744073709551615").unwrap_err().to_string();
            assert!(
                e.contains(name) && e.contains("whole number of seconds"),
                "{e}"
            );
        }
    }

    #[test]
    fn deadlines_must_stay_well_below_the_consumer_timeout() {
        let ok = parse(GOOD).unwrap();
        assert!(ok.check_deadlines().is_ok());
        let long =
            parse(&GOOD.replace("batch_size = 10", "batch_size = 10\ndeadline = \"20m\"")).unwrap();
        let e = long.check_deadlines().unwrap_err().to_string();
        assert!(
            e.contains("stream 'users' deadline") && e.contains("consumer_timeout"),
            "{e}"
        );
        let raised = parse(
            &GOOD
                .replace("batch_size = 10", "batch_size = 10\ndeadline = \"20m\"")
                .replace(
                    "prefix = \"t1\"",
                    "prefix = \"t1\"\nconsumer_timeout = \"2h\"",
                ),
        )
        .unwrap();
        assert!(raised.check_deadlines().is_ok());
        let window =
            parse(&GOOD.replace("[source]", "[producer]\nevent_window = \"1h\"\n[source]"))
                .unwrap();
        let e = window.check_deadlines().unwrap_err().to_string();
        assert!(e.contains("producer.event_window"), "{e}");
    }

    #[test]
    fn environment_overrides_urls() {
        let c = Config::parse("test.toml", GOOD, |k| {
            (k == ENV_AMQP_URL).then(|| "amqp://other:secret@mq/%2f".to_string())
        })
        .unwrap();
        assert_eq!(c.broker.url.expose(), "amqp://other:secret@mq/%2f");
        // A wrong value from the environment names the variable.
        let e = Config::parse("test.toml", GOOD, |k| {
            (k == ENV_SOURCE_URL).then(|| "mysql://app:pw@db/app".to_string())
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("source.url (from SYNCFLEET_SOURCE_URL)"), "{e}");
        assert!(!e.contains("pw@"), "{e}");
    }

    fn error_of(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn unknown_keys_name_the_file_and_key() {
        let e = error_of(&GOOD.replace("prefix = \"t1\"", "prefix = \"t1\"\nprefetch_count = 3"));
        assert!(
            e.contains("test.toml") && e.contains("prefetch_count"),
            "{e}"
        );
    }

    #[test]
    fn two_streams_may_not_write_one_destination_table() {
        for same in ["users", "public.users"] {
            let text = GOOD.replace("\"rep.profiles_tab\"", &format!("\"{same}\""));
            let e = error_of(&text);
            assert!(
                e.contains("stream[1] ('profiles').destination_table")
                    && e.contains("already written by another stream"),
                "{same}: {e}"
            );
        }
        assert!(parse(&GOOD.replace("\"rep.profiles_tab\"", "\"rep.users\"")).is_ok());
    }

    #[test]
    fn a_stream_may_not_write_syncfleets_or_the_catalogs_tables() {
        for table in [
            "syncfleet.runs",
            "pg_catalog.pg_class",
            "information_schema.tables",
        ] {
            let text = GOOD.replace("\"rep.profiles_tab\"", &format!("\"{table}\""));
            let e = error_of(&text);
            assert!(
                e.contains("stream[1] ('profiles').destination_table")
                    && e.contains("another schema"),
                "{table}: {e}"
            );
        }
    }

    #[test]
    fn bad_streams_name_the_stream_and_field() {
        let e = error_of(&GOOD.replace("key = [\"id\"]", ""));
        assert!(e.contains("stream[1] ('profiles').key"), "{e}");
        let e = error_of(&GOOD.replace("table = \"public.users\"", "table = \"a.b.c\""));
        assert!(e.contains("('users').table"), "{e}");
        let e = error_of(&GOOD.replace("batch_size = 10", "batch_size = 0"));
        assert!(e.contains("('users').batch_size"), "{e}");
        let e = error_of(&GOOD.replace("name = \"profiles\"", "name = \"users\""));
        assert!(e.contains("same name"), "{e}");
    }

    #[test]
    fn an_amqps_url_names_its_tls_files_with_rabbitmqs_parameters() {
        let dir = std::env::temp_dir().join(format!("syncfleet-config-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pem = dir.join("ca.pem");
        std::fs::write(
            &pem,
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let not_pem = dir.join("ca.der");
        std::fs::write(&not_pem, [0x30, 0x82]).unwrap();
        let key = dir.join("key.pem");
        std::fs::write(
            &key,
            "-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let encrypted = dir.join("encrypted.pem");
        std::fs::write(
            &encrypted,
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIB\n-----END ENCRYPTED PRIVATE KEY-----\n",
        )
        .unwrap();
        let (k, enc) = (key.display(), encrypted.display());
        let with_url = |url: String| GOOD.replace("amqp://guest:guest@127.0.0.1:5672/%2f", &url);
        let amqps = |query: &str| with_url(format!("amqps://guest:pw@mq:5671/%2f?{query}"));
        let p = pem.display();
        let c = parse(&amqps(&format!("heartbeat=30&cacertfile={p}"))).unwrap();
        assert_eq!(c.broker.tls.ca_file.as_deref(), Some(pem.as_path()));
        assert_eq!(c.broker.tls.client, None);
        // Percent-encoded, as a URL's query may be.
        let encoded = p.to_string().replace('/', "%2F");
        let c = parse(&amqps(&format!(
            "certfile={encoded}&keyfile={k}&verify=verify_peer"
        )))
        .unwrap();
        assert_eq!(c.broker.tls.client, Some((pem.clone(), key.clone())));
        assert_eq!(parse(GOOD).unwrap().broker.tls, BrokerTls::default());
        for (query, expected) in [
            (
                "cacertfile=/no/such.pem".to_string(),
                "cacertfile: cannot read /no/such.pem",
            ),
            (
                format!("cacertfile={}", not_pem.display()),
                "expected a PEM file",
            ),
            (format!("certfile={p}"), "a client certificate needs both"),
            (
                format!("certfile={k}&keyfile={p}"),
                "certfile: expected a PEM file of certificates",
            ),
            (
                format!("certfile={p}&keyfile={enc}"),
                "keyfile: expected a PEM file of an unencrypted private key",
            ),
            (
                format!("certfile={p}&keyfile={enc}&password=x"),
                "password: not supported",
            ),
            (
                "verify=verify_none".to_string(),
                "always checks the broker's certificate",
            ),
        ] {
            let e = error_of(&amqps(&query));
            assert!(
                e.contains("broker.url") && e.contains(expected),
                "{query}: {e}"
            );
            assert!(!e.contains(":pw@"), "{e}");
        }
        let e = error_of(&with_url(format!("amqp://guest:pw@mq/%2f?cacertfile={p}")));
        assert!(e.contains("apply to amqps:// URLs only"), "{e}");
        let e = error_of(&with_url("amqp://guest:pw@[::1]:5672/%2f".into()));
        assert!(e.contains("broker.url") && e.contains("IPv6"), "{e}");
        assert!(parse(&with_url("amqp://guest:pw@10.0.0.5:5672/%2f".into())).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_or_wrong_urls_never_print_passwords() {
        let e = error_of(&GOOD.replace("postgres://app:pw@", "mysql://app:pw@"));
        assert!(e.contains("source.url") && !e.contains(":pw@"), "{e}");
        let e = error_of(&GOOD.replace("url = \"amqp://guest:guest@127.0.0.1:5672/%2f\"", ""));
        assert!(e.contains("broker.url") && e.contains(ENV_AMQP_URL), "{e}");
    }
}
