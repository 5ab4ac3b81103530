//! The chaos harness: proof that a killed worker, a restarted broker and
//! terminated database backends lose and double nothing.
//!
//! [`run`] builds a source with several streams, starts a private RabbitMQ
//! node ([`broker`]) and worker processes of the real `syncfleet` binary,
//! plans a full sync, and while it runs, on a bounded schedule:
//!
//! - terminates every backend of the source and destination databases once
//!   (`pg_terminate_backend`),
//! - restarts the RabbitMQ node once,
//! - SIGKILLs a random worker every few seconds and starts it again.
//!
//! At the end the run must have succeeded, `syncfleet verify` must pass, and
//! comparing every row's hash on both sides gives the lost and duplicated
//! counts of the [`Report`]. Everything it started is stopped and removed
//! when [`run`] returns, whatever happened.

pub mod broker;
pub mod postgres;

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};
use tokio_postgres::{Client, NoTls};

use crate::broker::PrivateBroker;

#[derive(Debug, thiserror::Error)]
#[error("chaos: {0}")]
pub struct ChaosError(pub String);

impl From<std::io::Error> for ChaosError {
    fn from(e: std::io::Error) -> Self {
        ChaosError(e.to_string())
    }
}

impl From<tokio_postgres::Error> for ChaosError {
    fn from(e: tokio_postgres::Error) -> Self {
        match e.as_db_error() {
            Some(db) => ChaosError(format!("database: {}", db.message())),
            None => ChaosError(format!("database: {e}")),
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// The `syncfleet` binary to test.
    pub syncfleet: PathBuf,
    /// A superuser URL of the PostgreSQL server (the `postgres` database).
    pub pg_url: String,
    /// Rows in all, spread over three streams.
    pub rows: u64,
    /// Worker processes.
    pub workers: usize,
    /// Time between two worker kills.
    pub kill_every: Duration,
    /// When to terminate the database backends, and when to restart the
    /// broker, as the fraction of the run's batches done: tied to progress,
    /// not time, so both happen mid-run however fast the machine is.
    pub terminate_at: f64,
    pub restart_at: f64,
    /// Rows per batch.
    pub batch_size: u32,
    /// Upper bound on the whole run; the harness stops by itself after it.
    pub timeout: Duration,
    /// Names the databases, the broker node and the work folder.
    pub name: String,
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub rows: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub kills: u32,
    pub broker_restarts: u32,
    pub pg_terminations: u32,
    pub elapsed: Duration,
    pub verified: bool,
    pub run_status: String,
}

impl Report {
    /// The run is proven: every chaos event happened during it, the run
    /// succeeded, verify passed, nothing lost, nothing doubled.
    pub fn passed(&self) -> bool {
        self.lost == 0
            && self.duplicated == 0
            && self.verified
            && self.run_status == "succeeded"
            && self.kills > 0
            && self.broker_restarts == 1
            && self.pg_terminations == 1
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "chaos: rows={} lost={} duplicated={} kills={} broker_restarts={} pg_terminations={} elapsed={:.1}s verified={} run={}",
            self.rows,
            self.lost,
            self.duplicated,
            self.kills,
            self.broker_restarts,
            self.pg_terminations,
            self.elapsed.as_secs_f64(),
            self.verified,
            self.run_status
        )
    }
}

/// The three streams: a bigint key, a uuid key and a composite key.
const SOURCE: &str = "
CREATE TABLE orders (id bigint PRIMARY KEY, customer text NOT NULL, amount numeric(12,2),
                     created_at timestamptz NOT NULL, payload jsonb);
INSERT INTO orders SELECT i, 'customer ' || (i % 977), (i % 100000) / 100.0,
       timestamptz '2025-01-01' + i * interval '1 second', jsonb_build_object('n', i, 'tag', 'ß✓')
FROM generate_series(1, $1::int) i;
CREATE TABLE events (id uuid PRIMARY KEY, kind text NOT NULL, at timestamptz NOT NULL);
INSERT INTO events SELECT md5('e' || i)::uuid, (ARRAY['view','click','buy'])[1 + i % 3],
       timestamptz '2025-02-01' + i * interval '1 second'
FROM generate_series(1, $2::int) i;
CREATE TABLE line_items (order_id bigint, line_no int, sku text NOT NULL, qty int NOT NULL,
                         PRIMARY KEY (order_id, line_no));
INSERT INTO line_items SELECT 1 + i / 4, i % 4, 'SKU-' || (i % 5000), 1 + i % 9
FROM generate_series(0, $3::int - 1) i;
";

const STREAMS: [(&str, &str); 3] = [
    ("orders", "id"),
    ("events", "id"),
    ("line_items", "order_id, line_no"),
];

fn url_for(base: &str, db: &str) -> String {
    let slash = base.rfind('/').unwrap_or(base.len());
    format!("{}/{db}", &base[..slash])
}

async fn connect(url: &str) -> Result<Client, ChaosError> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

/// Everything the harness started, stopped when dropped.
struct Fleet {
    syncfleet: PathBuf,
    config: PathBuf,
    log: PathBuf,
    workers: Vec<Child>,
}

impl Fleet {
    fn spawn_worker(&self) -> Result<Child, ChaosError> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        Ok(syncfleet_command(&self.syncfleet)
            .arg("--config")
            .arg(&self.config)
            .arg("worker")
            .env("RUST_LOG", "warn,syncfleet_worker=info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?)
    }

    /// Restarts every worker that has exited (one that started while the
    /// broker was down exits at once, by design).
    fn revive(&mut self) -> Result<(), ChaosError> {
        for i in 0..self.workers.len() {
            if self.workers[i].try_wait()?.is_some() {
                self.workers[i] = self.spawn_worker()?;
            }
        }
        Ok(())
    }

    async fn kill_one(&mut self) -> Result<(), ChaosError> {
        let i = fastrand::usize(..self.workers.len());
        let _ = self.workers[i].start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.workers[i].wait()).await;
        self.workers[i] = self.spawn_worker()?;
        Ok(())
    }

    async fn stop(&mut self) {
        stop_processes(&mut self.workers).await;
    }
}

/// SIGTERM (a graceful drain) to every process, then SIGKILL for any still
/// running after 20 s.
pub async fn stop_processes(children: &mut [Child]) {
    for c in children.iter() {
        if let Some(pid) = c.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
    }
    for c in children.iter_mut() {
        if tokio::time::timeout(Duration::from_secs(20), c.wait())
            .await
            .is_err()
        {
            let _ = c.start_kill();
            let _ = c.wait().await;
        }
    }
}

async fn syncfleet(
    binary: &Path,
    config: &Path,
    args: &[&str],
) -> Result<std::process::Output, ChaosError> {
    run_syncfleet(binary, config, args, Duration::from_secs(300)).await
}

/// A `syncfleet` command that takes nothing from the environment's
/// overrides (an operator's `SYNCFLEET_DESTINATION_URL` must not send a
/// harness's writes to a real database), killed if dropped.
pub fn syncfleet_command(binary: &Path) -> Command {
    let mut command = Command::new(binary);
    for var in syncfleet_core::config::ENV_VARS {
        command.env_remove(var);
    }
    command.kill_on_drop(true);
    command
}

/// Runs one `syncfleet` command against `config`, bounded by `limit`.
pub async fn run_syncfleet(
    binary: &Path,
    config: &Path,
    args: &[&str],
    limit: Duration,
) -> Result<std::process::Output, ChaosError> {
    let out = tokio::time::timeout(
        limit,
        syncfleet_command(binary)
            .arg("--config")
            .arg(config)
            .args(args)
            .env("RUST_LOG", "warn")
            .output(),
    )
    .await
    .map_err(|_| ChaosError(format!("syncfleet {args:?} took over {limit:?}")))??;
    Ok(out)
}

/// Removes the databases and the work folder of an interrupted run (the
/// processes and the broker node stop with the dropped [`run`] future).
pub async fn cleanup(options: &Options) {
    if let Ok(admin) = connect(&options.pg_url).await {
        for db in ["src", "dst"] {
            let _ = admin
                .batch_execute(&format!(
                    "DROP DATABASE IF EXISTS \"{}_{db}\" WITH (FORCE)",
                    options.name
                ))
                .await;
        }
    }
    let _ = std::fs::remove_dir_all(std::env::temp_dir().join(&options.name));
}

/// Runs the whole scenario; see the crate docs.
pub async fn run(options: &Options) -> Result<Report, ChaosError> {
    let dir = std::env::temp_dir().join(&options.name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let src_db = format!("{}_src", options.name);
    let dst_db = format!("{}_dst", options.name);
    let admin = connect(&options.pg_url).await?;
    let result = scenario(options, &dir, &admin, &src_db, &dst_db).await;
    for db in [&src_db, &dst_db] {
        let _ = admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)"))
            .await;
    }
    if result.is_ok() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

async fn scenario(
    options: &Options,
    dir: &Path,
    admin: &Client,
    src_db: &str,
    dst_db: &str,
) -> Result<Report, ChaosError> {
    for db in [src_db, dst_db] {
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)"))
            .await?;
        admin
            .batch_execute(&format!("CREATE DATABASE \"{db}\""))
            .await?;
    }
    let src_url = url_for(&options.pg_url, src_db);
    let dst_url = url_for(&options.pg_url, dst_db);
    let (orders, events) = (options.rows / 2, options.rows * 3 / 10);
    let lines = options.rows - orders - events;
    let source = connect(&src_url).await?;
    // The counts are the harness's own numbers, not input: spliced in.
    let sql = SOURCE
        .replace("$1::int", &orders.to_string())
        .replace("$2::int", &events.to_string())
        .replace("$3::int", &lines.to_string());
    source.batch_execute(&sql).await?;
    drop(source);

    let broker = PrivateBroker::start(dir, &options.name)?;
    let config = dir.join("syncfleet.toml");
    std::fs::write(
        &config,
        format!(
            r#"[source]
url = "{src_url}"
max_connections = 3
[destination]
url = "{dst_url}"
max_connections = 3
[broker]
url = "{amqp}"
prefix = "chaos"
connect_timeout = "5s"
[jobs]
deadline = "30s"
max_attempts = 10
retry_initial = "200ms"
retry_max = "2s"
[worker]
concurrency = 2
shutdown_grace = "10s"
[[stream]]
name = "orders"
table = "orders"
batch_size = {batch}
[[stream]]
name = "events"
table = "events"
batch_size = {batch}
[[stream]]
name = "line_items"
table = "line_items"
batch_size = {batch}
"#,
            amqp = broker.url(),
            batch = options.batch_size,
        ),
    )?;
    let migrate = syncfleet(&options.syncfleet, &config, &["migrate"]).await?;
    if !migrate.status.success() {
        return Err(ChaosError(format!(
            "migrate failed: {}",
            String::from_utf8_lossy(&migrate.stderr)
        )));
    }

    let mut fleet = Fleet {
        syncfleet: options.syncfleet.clone(),
        config: config.clone(),
        log: dir.join("workers.log"),
        workers: Vec::new(),
    };
    let outcome = chaos(
        options, &broker, &mut fleet, admin, &config, &dst_url, src_db, dst_db,
    )
    .await;
    fleet.stop().await;
    drop(broker);
    let (run_id, mut report) = match outcome {
        Ok(x) => x,
        Err(e) => {
            // The workers' warnings and errors (a port already taken by
            // another process aside), then the log's last lines.
            let log = std::fs::read_to_string(&fleet.log).unwrap_or_default();
            let warnings: Vec<&str> = log
                .lines()
                .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
                .filter(|l| !l.contains("metrics endpoint disabled"))
                .take(40)
                .collect();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            return Err(ChaosError(format!(
                "{e}\nworker warnings and errors:\n{}\nlast worker log lines:\n{}",
                warnings.join("\n"),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            )));
        }
    };

    let verify = syncfleet(&options.syncfleet, &config, &["verify"]).await?;
    report.verified = verify.status.success();
    if !report.verified {
        eprintln!("{}", String::from_utf8_lossy(&verify.stdout));
    }
    let dest = connect(&dst_url).await?;
    let source = connect(&src_url).await?;
    report.run_status = dest
        .query_one(
            "SELECT status FROM syncfleet.runs WHERE id = $1",
            &[&run_id],
        )
        .await?
        .get(0);
    for (table, key) in STREAMS {
        let (lost, duplicated) = compare(&source, &dest, table, key).await?;
        report.lost += lost;
        report.duplicated += duplicated;
    }
    Ok(report)
}

/// Rows of the source missing (or different) in the destination, and rows
/// of the destination beyond the source's: a multiset difference of row
/// hashes, plus any key stored twice.
async fn compare(
    source: &Client,
    dest: &Client,
    table: &str,
    key: &str,
) -> Result<(u64, u64), ChaosError> {
    let (a, b) = (
        row_hashes(source, table).await?,
        row_hashes(dest, table).await?,
    );
    let (mut i, mut j, mut lost, mut extra) = (0, 0, 0u64, 0u64);
    while i < a.len() || j < b.len() {
        match (a.get(i), b.get(j)) {
            (Some(x), Some(y)) if x == y => {
                i += 1;
                j += 1;
            }
            (Some(x), Some(y)) if x < y => {
                lost += 1;
                i += 1;
            }
            (Some(_), None) => {
                lost += 1;
                i += 1;
            }
            _ => {
                extra += 1;
                j += 1;
            }
        }
    }
    let doubled: i64 = dest
        .query_one(
            &format!("SELECT count(*) - count(DISTINCT ({key})) FROM \"{table}\""),
            &[],
        )
        .await?
        .get(0);
    Ok((lost, extra + doubled as u64))
}

async fn row_hashes(client: &Client, table: &str) -> Result<Vec<String>, ChaosError> {
    let sql = format!("SELECT md5(t::text) FROM \"{table}\" t ORDER BY 1");
    Ok(client
        .query(&sql, &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Plans the run, starts the workers, then applies the chaos schedule
/// until the run finishes. The workers start after planning: the planner
/// publishes a chunk of batches at a time, and a fleet already running
/// could finish a small run before the schedule's first event.
#[allow(clippy::too_many_arguments)]
async fn chaos(
    options: &Options,
    broker: &PrivateBroker,
    fleet: &mut Fleet,
    admin: &Client,
    config: &Path,
    dst_url: &str,
    src_db: &str,
    dst_db: &str,
) -> Result<(i64, Report), ChaosError> {
    let sync = syncfleet(&options.syncfleet, config, &["sync"]).await?;
    if !sync.status.success() {
        return Err(ChaosError(format!(
            "sync failed: {}",
            String::from_utf8_lossy(&sync.stderr)
        )));
    }
    let run_id: i64 = String::from_utf8_lossy(&sync.stdout)
        .trim()
        .parse()
        .map_err(|_| ChaosError("sync printed no run id".into()))?;
    for _ in 0..options.workers {
        let w = fleet.spawn_worker()?;
        fleet.workers.push(w);
    }
    let started = Instant::now();
    let mut report = Report {
        rows: options.rows,
        lost: 0,
        duplicated: 0,
        kills: 0,
        broker_restarts: 0,
        pg_terminations: 0,
        elapsed: Duration::ZERO,
        verified: false,
        run_status: String::new(),
    };
    let mut next_kill = options.kill_every;
    loop {
        let elapsed = started.elapsed();
        if elapsed > options.timeout {
            // Which batches never finished, and how often each was tried,
            // say where to look (a dead letter, a lost job, a stuck worker).
            let left = match connect(dst_url).await {
                Ok(c) => c
                    .query(
                        "SELECT stream || ' ' || batch_no || ' (' || status || ', ' || attempts \
                         || ' attempt(s))' FROM syncfleet.batches WHERE run_id = $1 \
                         AND status <> 'done' ORDER BY stream, batch_no LIMIT 20",
                        &[&run_id],
                    )
                    .await
                    .map(|rows| rows.iter().map(|r| r.get::<_, String>(0)).collect())
                    .unwrap_or_else(|e| vec![e.to_string()]),
                Err(e) => vec![e.to_string()],
            };
            return Err(ChaosError(format!(
                "run {run_id} did not finish within {:?}; batches not done: {}; queues: {}",
                options.timeout,
                left.join(", "),
                broker.queues()
            )));
        }
        // A fresh connection per look: the harness's own would be
        // terminated with the others.
        let (status, done) = match connect(dst_url).await {
            Ok(c) => c
                .query_one(
                    "SELECT r.status, (SELECT count(*) FILTER (WHERE b.status = 'done')::float8 \
                     / greatest(count(*), 1) FROM syncfleet.batches b WHERE b.run_id = r.id) \
                     FROM syncfleet.runs r WHERE r.id = $1",
                    &[&run_id],
                )
                .await
                .map(|r| (r.get::<_, String>(0), r.get::<_, f64>(1)))
                .unwrap_or_default(),
            Err(_) => (String::new(), 0.0),
        };
        match status.as_str() {
            "succeeded" => break,
            "failed" => return Err(ChaosError(format!("run {run_id} failed"))),
            _ => {}
        }
        if report.pg_terminations == 0 && done >= options.terminate_at {
            let n: i64 = admin
                .query_one(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                     WHERE datname IN ($1, $2) AND pid <> pg_backend_pid()",
                    &[&src_db, &dst_db],
                )
                .await?
                .get(0);
            eprintln!(
                "chaos: +{:.1}s ({:.0}% done) terminated {n} database backends",
                elapsed.as_secs_f64(),
                done * 100.0
            );
            // One that hit nothing is no chaos: tried again next time round.
            if n > 0 {
                report.pg_terminations += 1;
            }
        }
        if report.broker_restarts == 0 && done >= options.restart_at {
            eprintln!(
                "chaos: +{:.1}s ({:.0}% done) restarting the broker",
                elapsed.as_secs_f64(),
                done * 100.0
            );
            broker.restart()?;
            report.broker_restarts += 1;
        }
        // The first kill comes early in the run whatever its speed; then
        // one every `kill_every`.
        if elapsed >= next_kill || (report.kills == 0 && done >= 0.05) {
            fleet.kill_one().await?;
            report.kills += 1;
            eprintln!(
                "chaos: +{:.1}s ({:.0}% done) killed a worker",
                elapsed.as_secs_f64(),
                done * 100.0
            );
            next_kill = elapsed + options.kill_every;
        }
        fleet.revive()?;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    report.elapsed = started.elapsed();
    Ok((run_id, report))
}
