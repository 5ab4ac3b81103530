//! Connection pools with syncfleet's session settings.

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, RecyclingMethod, Runtime, Timeouts};
use syncfleet_core::config::DbConfig;
use syncfleet_core::job::Lsn;

use crate::error::{DbError, describe};

/// Which database a pool talks to; it decides the session settings and
/// names the database in errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Source,
    Destination,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Source => "source",
            Role::Destination => "destination",
        }
    }
}

/// A pool plus what its errors need to say.
#[derive(Clone)]
pub struct Pool {
    inner: deadpool_postgres::Pool,
    role: Role,
    url: String,
    /// `server_version_num` of the server, read at connect.
    version: i32,
    /// The TLS its connections use, for their cancel requests too.
    tls: crate::tls::Tls,
}

pub type Client = deadpool_postgres::Object;

/// Bound on asking the server to cancel a statement.
pub const CANCEL_TIMEOUT: Duration = Duration::from_secs(5);

/// Starts the transaction every source read runs in: one consistent
/// snapshot (REPEATABLE READ), and READ ONLY, so syncfleet can never write
/// to the app's database.
pub const READ_SNAPSHOT: &str = "START TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY";

/// [`READ_SNAPSHOT`] as a transaction guard, for code that does not
/// pipeline it.
pub async fn read_snapshot(
    client: &mut Client,
) -> Result<deadpool_postgres::Transaction<'_>, tokio_postgres::Error> {
    client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
}

/// The source's WAL position now: on a primary where it inserts, on a
/// standby what it has replayed. Every change committed before lies before
/// it, so a job stamped with it (see `Job::source_lsn`) is read from a
/// standby only once the standby has replayed that far. The insert
/// position, not the write position: under `synchronous_commit = off` a
/// commit returns (and its event is sent) before its WAL is written.
pub async fn wal_position(
    client: &impl tokio_postgres::GenericClient,
) -> Result<Option<Lsn>, DbError> {
    let position: Option<String> = client
        .query_one(
            "SELECT (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() \
             ELSE pg_current_wal_insert_lsn() END)::text",
            &[],
        )
        .await?
        .get(0);
    Ok(position.and_then(|p| p.parse().ok()))
}

/// Whether this source session has replayed WAL up to `$1` (a `pg_lsn` as
/// text); true on a primary (one promoted too), which has all it wrote.
pub const REPLAYED: &str = "SELECT NOT pg_is_in_recovery() \
     OR coalesce(pg_last_wal_replay_lsn() >= $1::text::pg_lsn, false)";

/// A WAL position (bytes from `0/0`) past everything this source session's
/// snapshot, taken before, can hold: how far a standby has replayed, or a
/// primary's insert position (a load balancer may send a read to either).
pub const READ_AT_MOST: &str = "SELECT pg_wal_lsn_diff(CASE WHEN pg_is_in_recovery() \
     THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_insert_lsn() END, '0/0')::int8";

/// Session settings for both sides. Rows travel in PostgreSQL's text COPY
/// format, so both sessions must print and parse values the same way: ISO
/// dates, UTC, floats with every digit, `money` in the C locale, and `xml`
/// parsed as content (a fragment), as it is stored.
const SESSION_SETTINGS: &str = "-c DateStyle=ISO,YMD -c IntervalStyle=postgres -c TimeZone=UTC \
     -c extra_float_digits=3 -c bytea_output=hex -c lc_monetary=C -c xmloption=content";

/// This process, as `host:pid` (the host is the pod's name under
/// Kubernetes): the creator of the runs it starts (`runs.created_by`), and
/// the start of a worker's name.
pub fn process_name() -> &'static str {
    static NAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    NAME.get_or_init(|| {
        let host = std::env::var("HOSTNAME")
            .ok()
            .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "syncfleet".into());
        format!("{host}:{}", std::process::id())
    })
}

/// Server-side TCP keepalives for every session: a peer gone without a
/// word is found within about a minute.
const SERVER_KEEPALIVES: &str =
    " -c tcp_keepalives_idle=30 -c tcp_keepalives_interval=10 -c tcp_keepalives_count=3";

impl Pool {
    /// Builds a pool and checks out one connection, so an unreachable or
    /// misconfigured server is reported now, by name, without its password.
    pub async fn connect(role: Role, config: &DbConfig) -> Result<Self, DbError> {
        let url = config.url.redacted();
        let connect_error = |detail: String| DbError::Connect {
            role: role.name(),
            url: url.clone(),
            detail,
        };
        let (mut pg, tls) = crate::tls::config(config.url.expose())
            .map_err(|e| connect_error(format!("invalid URL: {e}")))?;
        let mut options = pg.get_options().unwrap_or_default().to_string();
        options.push(' ');
        options.push_str(SESSION_SETTINGS);
        if role == Role::Source {
            // Belt and braces: every source transaction is also started READ ONLY.
            options.push_str(" -c default_transaction_read_only=on");
        }
        if let Some(timeout) = config.statement_timeout {
            options.push_str(&format!(" -c statement_timeout={}", timeout.as_millis()));
        }
        // The server's side of the keepalives below: a worker cut off in
        // the middle of a job leaves its session in a transaction, holding
        // the job's locks (a stream's write lock, a read slot) until the
        // server notices, which by the kernel's default takes two hours.
        if !options.contains("tcp_keepalives") {
            options.push_str(SERVER_KEEPALIVES);
        }
        pg.options(options.trim());
        if pg.get_application_name().is_none() {
            pg.application_name(format!("syncfleet-{}", role.name()));
        }
        pg.connect_timeout(config.connect_timeout);
        // Pooled connections sit idle between jobs. Probed every half
        // minute, a NAT or load balancer does not silently forget them, and
        // one whose peer vanished is found closed, and not handed to a job,
        // within about a minute rather than the kernel's two hours (unless
        // the URL sets its own).
        if pg.get_keepalives_idle() == Duration::from_secs(2 * 60 * 60) {
            pg.keepalives_idle(Duration::from_secs(30))
                .keepalives_interval(Duration::from_secs(10))
                .keepalives_retries(3);
        }
        let manager = Manager::from_config(
            pg,
            tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let inner = deadpool_postgres::Pool::builder(manager)
            .max_size(config.max_connections)
            .runtime(Runtime::Tokio1)
            .timeouts(Timeouts {
                wait: Some(config.connect_timeout),
                create: Some(config.connect_timeout),
                recycle: Some(Duration::from_secs(5)),
            })
            .build()
            .map_err(|e| connect_error(e.to_string()))?;
        let mut pool = Self {
            inner,
            role,
            url: url.clone(),
            version: 0,
            tls,
        };
        let version = pool
            .get()
            .await?
            .query_one("SELECT current_setting('server_version_num')::int", &[])
            .await
            .map_err(|e| connect_error(describe(&e)))?;
        pool.version = version.get(0);
        Ok(pool)
    }

    /// Whether the server has `hash_record_extended` and `bit_xor`
    /// (PostgreSQL 14 and later), for [`crate::sql::fingerprint`].
    pub fn has_row_hash(&self) -> bool {
        self.version >= 140_000
    }

    /// The TLS connector of this pool's connections, for their cancel
    /// requests.
    pub fn tls(&self) -> crate::tls::Tls {
        self.tls.clone()
    }

    /// Whether the server has `MERGE` (PostgreSQL 15 and later).
    pub fn has_merge(&self) -> bool {
        self.version >= 150_000
    }

    /// A pooled connection, waiting at most the connect timeout.
    pub async fn get(&self) -> Result<Client, DbError> {
        use deadpool_postgres::{PoolError, TimeoutType};
        self.inner.get().await.map_err(|e| match e {
            // Every connection made and in use, by this process's own work.
            PoolError::Timeout(TimeoutType::Wait)
                if self.inner.status().size >= self.inner.status().max_size =>
            {
                DbError::PoolTimeout {
                    role: self.role.name(),
                    size: self.inner.status().max_size,
                }
            }
            // A server that does not answer (the wait was behind
            // connections being made): an outage.
            PoolError::Timeout(_) => DbError::Connect {
                role: self.role.name(),
                url: self.url.clone(),
                detail: "no answer within the connect timeout".into(),
            },
            PoolError::Backend(e) => DbError::Connect {
                role: self.role.name(),
                url: self.url.clone(),
                detail: describe(&e),
            },
            other => DbError::Connect {
                role: self.role.name(),
                url: self.url.clone(),
                detail: other.to_string(),
            },
        })
    }

    /// `work` on a pooled connection, within `bound` (the checkout
    /// included). A lock on the control schema (a migration, an operator's
    /// `LOCK TABLE`) must not hold up a loop that also watches other
    /// things, or a command past its own timeout. A connection past the
    /// bound is cancelled and closed, not handed back to the pool busy,
    /// where the next user would wait behind it. `None` past the bound.
    pub async fn bounded<T>(
        &self,
        bound: Duration,
        work: impl AsyncFnOnce(&mut Client) -> Result<T, DbError>,
    ) -> Option<Result<T, DbError>> {
        let by = tokio::time::Instant::now() + bound;
        let mut client = match tokio::time::timeout_at(by, self.get()).await {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => return Some(Err(e)),
            Err(_) => return None,
        };
        let cancel = client.cancel_token();
        match tokio::time::timeout_at(by, work(&mut client)).await {
            Ok(done) => Some(done),
            Err(_) => {
                let tls = self.tls();
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(CANCEL_TIMEOUT, cancel.cancel_query(tls)).await;
                });
                drop(Client::take(client));
                None
            }
        }
    }

    /// Pool size, available and waiting counts, for status and metrics.
    pub fn status(&self) -> deadpool_postgres::Status {
        self.inner.status()
    }
}
