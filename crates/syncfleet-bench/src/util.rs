//! The bench's world: two private PostgreSQL clusters (the app's source and
//! the destination, as in any real deployment: they share this machine's
//! cores but not a WAL, a buffer pool or a checkpointer), the local broker
//! under a private prefix, config files and worker processes.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use syncfleet_chaos::postgres::PrivatePostgres;
use tokio::process::{Child, Command};
use tokio_postgres::{Client, NoTls};

pub fn ms(t: Duration) -> String {
    format!("{:.2}", t.as_secs_f64())
}

/// `reference / measured` as a ratio of speeds (higher is better).
pub fn ratio(reference: Duration, measured: Duration) -> String {
    format!(
        "{:.2}",
        reference.as_secs_f64() / measured.as_secs_f64().max(1e-9)
    )
}

/// A target and whether the unrounded figure meets it: a ratio of 0.596
/// shows as 0.60 and misses "≥ 0.60".
pub fn target(text: &str, met: bool) -> String {
    format!("{text}: {}", if met { "met" } else { "**missed**" })
}

/// `reference / measured`, unrounded.
pub fn speed(reference: Duration, measured: Duration) -> f64 {
    reference.as_secs_f64() / measured.as_secs_f64().max(1e-9)
}

pub async fn connect(url: &str) -> Result<Client, String> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .map_err(|e| format!("connect {url}: {e}"))?;
    tokio::spawn(connection);
    Ok(client)
}

pub fn db_err(e: tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => db.message().to_string(),
        None => e.to_string(),
    }
}

pub struct Bench {
    pub source_pg: PrivatePostgres,
    pub dest_pg: PrivatePostgres,
    pub dir: PathBuf,
    pub syncfleet: PathBuf,
    pub amqp_url: String,
    pub prefix: String,
    pub src: Client,
    pub dst: Client,
    _remove: RemoveOnDrop,
}

impl Bench {
    pub async fn start(syncfleet: PathBuf, amqp_url: String) -> Result<Self, String> {
        if !syncfleet.exists() {
            return Err(format!(
                "no syncfleet binary at {} (build it with --release)",
                syncfleet.display()
            ));
        }
        let dir = std::env::temp_dir().join(format!("sfbench_{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let start = |name: &str, extra: &[&str]| {
            let mut settings = vec!["max_connections = 200", "shared_buffers = '512MB'"];
            settings.extend_from_slice(extra);
            tokio::task::block_in_place(|| PrivatePostgres::start_with(&dir.join(name), &settings))
                .map_err(|e| e.to_string())
        };
        let source_pg = start(
            "source",
            &[
                "shared_preload_libraries = 'pg_stat_statements'",
                "pg_stat_statements.track = top",
            ],
        )?;
        let dest_pg = start("destination", &[])?;
        for (pg, db) in [(&source_pg, "bench_src"), (&dest_pg, "bench_dst")] {
            connect(&pg.url("postgres"))
                .await?
                .batch_execute(&format!("CREATE DATABASE {db}"))
                .await
                .map_err(db_err)?;
        }
        let src = connect(&source_pg.url("bench_src")).await?;
        src.batch_execute("CREATE EXTENSION pg_stat_statements")
            .await
            .map_err(db_err)?;
        let dst = connect(&dest_pg.url("bench_dst")).await?;
        let bench = Self {
            source_pg,
            dest_pg,
            dir: dir.clone(),
            syncfleet,
            amqp_url,
            prefix: format!("sfbench-{}", std::process::id()),
            src,
            dst,
            _remove: RemoveOnDrop(dir),
        };
        let config = bench.config("none", "", "");
        bench.syncfleet_ok(&config, &["migrate"]).await?;
        Ok(bench)
    }

    pub async fn machine(&self) -> Result<String, String> {
        let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
        let memory = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find(|l| l.starts_with("MemTotal:"))
                    .and_then(|l| {
                        l.split_whitespace()
                            .nth(1)
                            .and_then(|k| k.parse::<u64>().ok())
                    })
            })
            .map_or("?".into(), |kb| format!("{:.1} GiB", kb as f64 / 1048576.0));
        let pg: String = self
            .src
            .query_one("SHOW server_version", &[])
            .await
            .map_err(db_err)?
            .get(0);
        let rabbit = std::process::Command::new("rabbitmqctl")
            .args(["version"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        Ok(format!(
            "{cores} cores, {memory} memory; PostgreSQL {pg} (two private clusters, source and destination: shared_buffers 512MB, fsync off); RabbitMQ {rabbit}"
        ))
    }

    pub fn src_url(&self) -> String {
        self.source_pg.url("bench_src")
    }

    pub fn dst_url(&self) -> String {
        self.dest_pg.url("bench_dst")
    }

    /// Writes a config for one stream over `table` and returns its path.
    pub fn config(&self, table: &str, stream_extra: &str, source_extra: &str) -> PathBuf {
        self.config_as(table, table, stream_extra, source_extra)
    }

    /// The same for a stream named `name` over `table`.
    pub fn config_as(
        &self,
        name: &str,
        table: &str,
        stream_extra: &str,
        source_extra: &str,
    ) -> PathBuf {
        let file = format!(
            "{name}-{table}-{:x}.toml",
            hash(&(stream_extra.to_string() + source_extra))
        );
        let path = self.dir.join(file);
        let text = format!(
            "[source]\nurl = \"{}\"\n{source_extra}\n[destination]\nurl = \"{}\"\n\
             [broker]\nurl = \"{}\"\nprefix = \"{}\"\n\
             [[stream]]\nname = \"{name}\"\ntable = \"{table}\"\n{stream_extra}\n",
            self.src_url(),
            self.dst_url(),
            self.amqp_url,
            self.prefix
        );
        let _ = std::fs::write(&path, text);
        path
    }

    pub async fn syncfleet_ok(&self, config: &Path, args: &[&str]) -> Result<String, String> {
        let out =
            syncfleet_chaos::run_syncfleet(&self.syncfleet, config, args, Duration::from_secs(600))
                .await
                .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!(
                "syncfleet {args:?} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Plans a run (no waiting) and returns its id.
    pub async fn plan(&self, config: &Path) -> Result<i64, String> {
        self.syncfleet_ok(config, &["sync"])
            .await?
            .trim()
            .parse()
            .map_err(|_| "sync printed no run id".to_string())
    }

    /// How many batches a run has.
    async fn batches(&self, run_id: i64) -> Result<i64, String> {
        Ok(self
            .dst
            .query_one(
                "SELECT count(*) FROM syncfleet.batches WHERE run_id = $1",
                &[&run_id],
            )
            .await
            .map_err(db_err)?
            .get(0))
    }

    /// A full sync with `--wait`, timed.
    pub async fn sync_wait(&self, config: &Path) -> Result<Duration, String> {
        let t = Instant::now();
        self.syncfleet_ok(config, &["sync", "--wait"]).await?;
        Ok(t.elapsed())
    }

    /// A sync (waited for) and the WAL the destination wrote meanwhile.
    pub async fn sync_wal(&self, config: &Path) -> Result<(Duration, u64), String> {
        let lsn = || async {
            let row = self
                .dst
                .query_one(
                    "SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0')::int8",
                    &[],
                )
                .await
                .map_err(db_err)?;
            Ok::<_, String>(row.get::<_, i64>(0))
        };
        let before = lsn().await?;
        let took = self.sync_wait(config).await?;
        Ok((took, (lsn().await? - before) as u64))
    }

    pub async fn verify(&self, config: &Path) -> Result<(), String> {
        self.syncfleet_ok(config, &["verify"]).await.map(|_| ())
    }

    /// The throughput table: about 200 bytes a row, mixed types.
    pub async fn generate_wide(&self, rows: u64) -> Result<(), String> {
        self.src
            .batch_execute(&format!(
                "DROP TABLE IF EXISTS wide;
                 CREATE TABLE wide (id bigint PRIMARY KEY, account int NOT NULL, name text NOT NULL,
                   email text NOT NULL, created_at timestamptz NOT NULL, amount numeric(12,2),
                   attrs jsonb, note text);
                 INSERT INTO wide SELECT i, i % 10000, 'name ' || md5(i::text), 'user' || i || '@example.com',
                   timestamptz '2024-01-01' + i * interval '1 second', (i % 100000) / 100.0,
                   jsonb_build_object('plan', (ARRAY['free','pro','team'])[1 + i % 3], 'n', i % 97),
                   repeat('x', 40 + (i % 30)::int)
                 FROM generate_series(1, {rows}) i;
                 ANALYZE wide;"
            ))
            .await
            .map_err(db_err)
    }

    const WIDE_DDL: &str = "(id bigint PRIMARY KEY, account int NOT NULL, name text NOT NULL, \
        email text NOT NULL, created_at timestamptz NOT NULL, amount numeric(12,2), attrs jsonb, note text)";

    /// The raw ceiling, best of two.
    pub async fn ceiling(&self) -> Result<Duration, String> {
        let mut best = Duration::MAX;
        for _ in 0..2 {
            self.dst
                .batch_execute(&format!(
                    "DROP TABLE IF EXISTS ceiling; CREATE TABLE ceiling {}",
                    Self::WIDE_DDL
                ))
                .await
                .map_err(db_err)?;
            let script = format!(
                "psql -X -q '{}' -c 'COPY (SELECT * FROM wide) TO STDOUT' | psql -X -q '{}' -c 'COPY ceiling FROM STDIN'",
                self.src_url(),
                self.dst_url()
            );
            let t = Instant::now();
            let status = Command::new("bash")
                .args(["-o", "pipefail", "-c", &script])
                .stdout(Stdio::null())
                .status()
                .await
                .map_err(|e| e.to_string())?;
            if !status.success() {
                return Err("the COPY ceiling pipeline failed (is psql installed?)".into());
            }
            best = best.min(t.elapsed());
        }
        self.dst
            .batch_execute("DROP TABLE ceiling")
            .await
            .map_err(db_err)?;
        Ok(best)
    }

    /// Quiets both clusters before a measurement: no autovacuum or
    /// checkpoint left over from the sections before it.
    pub async fn settle(&self) -> Result<(), String> {
        for client in [&self.src, &self.dst] {
            // Two statements: VACUUM cannot run inside a multi-statement query.
            for statement in ["VACUUM ANALYZE", "CHECKPOINT"] {
                client.batch_execute(statement).await.map_err(db_err)?;
            }
        }
        Ok(())
    }

    /// An empty destination for the throughput table.
    pub async fn reset_destination(&self) -> Result<(), String> {
        self.dst
            .batch_execute("DROP TABLE IF EXISTS wide; CHECKPOINT")
            .await
            .map_err(db_err)
    }

    pub async fn touch_every_row(&self) -> Result<(), String> {
        self.src
            .batch_execute("UPDATE wide SET note = note || '.'; ANALYZE wide")
            .await
            .map_err(db_err)
    }

    async fn run_done(&self, run_id: i64) -> Result<bool, String> {
        let status: String = self
            .dst
            .query_one(
                "SELECT status FROM syncfleet.runs WHERE id = $1",
                &[&run_id],
            )
            .await
            .map_err(db_err)?
            .get(0);
        match status.as_str() {
            "succeeded" => Ok(true),
            "failed" => Err(format!("run {run_id} failed")),
            _ => Ok(false),
        }
    }

    async fn wait_run(&self, run_id: i64) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(600);
        while !self.run_done(run_id).await? {
            if Instant::now() > deadline {
                return Err(format!("run {run_id} did not finish in 600 s"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Plans (no workers), resets `pg_stat_statements`, runs the jobs and
    /// counts the source statements per batch.
    ///
    /// The COPYs are counted as the table's scans (`pg_stat_user_tables`):
    /// the workers prepare each COPY once per connection, and PostgreSQL
    /// 15's `pg_stat_statements` counts only the first execution of a
    /// prepared utility statement on each connection (10 of 2,001 COPYs in
    /// one run). Its own count is shown beside.
    pub async fn statements_per_batch(&self, batch: u32) -> Result<(i64, f64, String), String> {
        self.src
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS qpb AS SELECT i AS id, md5(i::text) AS v FROM generate_series(1, 200000) i;
                 ALTER TABLE qpb DROP CONSTRAINT IF EXISTS qpb_pkey; ALTER TABLE qpb ADD PRIMARY KEY (id);",
            )
            .await
            .map_err(db_err)?;
        self.dst
            .batch_execute("DROP TABLE IF EXISTS qpb")
            .await
            .map_err(db_err)?;
        let config = self.config("qpb", &format!("batch_size = {batch}"), "");
        let run_id = self.plan(&config).await?;
        let batches = self.batches(run_id).await?;
        // A backend reports its counters as it exits: wait for the
        // planner's to be gone (and a moment more, as it leaves the
        // activity view just before it reports), so that its index scans,
        // one per boundary, are not counted as the workers'.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let others: i64 = self
                .src
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                     AND backend_type = 'client backend' AND pid <> pg_backend_pid()",
                    &[],
                )
                .await
                .map_err(db_err)?
                .get(0);
            if others == 0 {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{others} other session(s) still on the source 10 s after planning: \
                     their statements would be counted as the workers'"
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        self.src
            .batch_execute(
                "SELECT pg_stat_statements_reset(); \
                 SELECT pg_stat_reset_single_table_counters('qpb'::regclass); \
                 SELECT pg_stat_reset_single_table_counters('qpb_pkey'::regclass)",
            )
            .await
            .map_err(db_err)?;
        let workers = Workers::start(self, &config, 2).await?;
        self.wait_run(run_id).await?;
        // Their backends flush their counters as they exit.
        workers.stop().await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let scans: i64 = self
            .src
            .query_one(
                "SELECT pg_stat_clear_snapshot(), \
                 (SELECT coalesce(seq_scan, 0) + coalesce(idx_scan, 0) \
                  FROM pg_stat_user_tables WHERE relid = 'qpb'::regclass)",
                &[],
            )
            .await
            .map_err(db_err)?
            .get(1);
        // Grouped by kind: the COPY text differs between the first, middle
        // and last batches (open ranges), the rest runs once per process.
        let rows = self
            .src
            .query(
                "SELECT CASE WHEN query LIKE 'COPY%' THEN 'COPY (SELECT … WHERE key range) TO STDOUT' \
                             WHEN query LIKE 'START TRANSACTION%' THEN 'START TRANSACTION … READ ONLY' \
                             WHEN query LIKE 'SELECT set_config%' THEN 'SELECT set_config(…)' \
                             WHEN query LIKE 'COMMIT%' THEN 'COMMIT' \
                             ELSE 'describe the stream (per worker process)' END, sum(calls)::int8 \
                 FROM pg_stat_statements \
                 WHERE dbid = (SELECT oid FROM pg_database WHERE datname = 'bench_src') \
                 AND query <> 'SELECT $1' AND query NOT LIKE '%pg_stat_statements_reset%' \
                 AND query NOT LIKE '%pg_stat_reset_single_table_counters%' \
                 AND query NOT LIKE '%pg_stat_clear_snapshot%' \
                 GROUP BY 1 ORDER BY 2 DESC",
                &[],
            )
            .await
            .map_err(db_err)?;
        let mut total = scans;
        let mut kinds = Vec::new();
        for row in &rows {
            let (kind, calls) = (row.get::<_, String>(0), row.get::<_, i64>(1));
            if kind.starts_with("COPY") {
                kinds.push(format!(
                    "`{kind}` ×{scans} (table scans; `pg_stat_statements` saw {calls})"
                ));
            } else {
                total += calls;
                kinds.push(format!("`{kind}` ×{calls}"));
            }
        }
        Ok((batches, total as f64 / batches as f64, kinds.join("; ")))
    }

    /// Empty jobs end to end against a bare lapin loop, both `n + 1`
    /// messages and both timed from the first publish, consumers attached,
    /// to the last ack. The loop runs before and after the jobs; the faster
    /// of the two is returned, the harder reference (the broker's speed
    /// drifts by a third between runs on this machine).
    pub async fn job_overhead(&self, n: usize) -> Result<(usize, Duration, Duration), String> {
        // The planner walks the keys of one table, the workers read the
        // stream from another, empty: every job is a zero-row batch (the
        // last, open one too: n + 1 jobs in all), and the workers can be
        // consuming before the first one is published.
        self.src
            .batch_execute(&format!(
                "DROP TABLE IF EXISTS empty_jobs, empty_job_keys;
                 CREATE TABLE empty_jobs (id int PRIMARY KEY);
                 CREATE TABLE empty_job_keys (id int PRIMARY KEY);
                 INSERT INTO empty_job_keys SELECT generate_series(1, {n});"
            ))
            .await
            .map_err(db_err)?;
        self.dst
            .batch_execute("DROP TABLE IF EXISTS empty_jobs")
            .await
            .map_err(db_err)?;
        let planner = self.config_as(
            "empty_jobs",
            "empty_job_keys",
            "batch_size = 1\ndestination_table = \"empty_jobs\"",
            "",
        );
        let executor = self.config("empty_jobs", "batch_size = 1", "");
        let jobs = n + 1;
        let before = self.bare_loop(jobs).await?;
        self.settle().await?;
        let workers = Workers::start(self, &executor, 2).await?;
        let t = Instant::now();
        let run_id = self.plan(&planner).await?;
        let publish = t.elapsed();
        self.wait_run(run_id).await?;
        let ours = t.elapsed();
        workers.stop().await;
        let batches = self.batches(run_id).await?;
        if batches != jobs as i64 {
            return Err(format!("{batches} empty jobs, expected {jobs}"));
        }
        eprintln!("bench: empty jobs: {ours:?}, of which planning and publishing {publish:?}");
        let after = self.bare_loop(jobs).await?;
        eprintln!("bench: bare loop {before:?} before, {after:?} after");
        Ok((jobs, ours, before.min(after)))
    }

    /// Consumers of the work queue (0 while it does not exist).
    async fn work_consumers(&self) -> u32 {
        let Ok(connection) =
            Connection::connect(&self.amqp_url, ConnectionProperties::default()).await
        else {
            return 0;
        };
        let consumers = async {
            let channel = connection.create_channel().await.ok()?;
            let queue = channel
                .queue_declare(
                    format!("{}.work", self.prefix).as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
                .ok()?;
            Some(queue.consumer_count())
        }
        .await;
        let _ = connection.close(200, "".into()).await;
        consumers.unwrap_or(0)
    }

    async fn bare_loop(&self, n: usize) -> Result<Duration, String> {
        let e = |e: lapin::Error| e.to_string();
        let connection = Connection::connect(&self.amqp_url, ConnectionProperties::default())
            .await
            .map_err(e)?;
        let channel = connection.create_channel().await.map_err(e)?;
        let queue = format!("{}.bare", self.prefix);
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(LongString::from(b"quorum".to_vec())),
        );
        let durable = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        channel
            .queue_declare(queue.as_str().into(), durable, args)
            .await
            .map_err(e)?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(e)?;
        let body =
            br#"{"v":1,"run_id":1,"stream":"s","batch":1,"range":{"lower":null,"upper":null}}"#;
        // The consumer attached first, as the workers are: publishing and
        // consuming overlap, as they do for the jobs.
        let consumer_channel = connection.create_channel().await.map_err(e)?;
        consumer_channel
            .basic_qos(8, BasicQosOptions::default())
            .await
            .map_err(e)?;
        let mut consumer = consumer_channel
            .basic_consume(
                queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(e)?;
        let consumed = tokio::spawn(async move {
            for _ in 0..n {
                let delivery = consumer
                    .next()
                    .await
                    .ok_or("consumer closed")?
                    .map_err(|e| e.to_string())?;
                delivery
                    .ack(BasicAckOptions::default())
                    .await
                    .map_err(|e| e.to_string())?;
            }
            Ok::<_, String>(())
        });
        let t = Instant::now();
        let mut confirms = Vec::with_capacity(n);
        for _ in 0..n {
            confirms.push(
                channel
                    .basic_publish(
                        "".into(),
                        queue.as_str().into(),
                        BasicPublishOptions::default(),
                        body,
                        BasicProperties::default().with_delivery_mode(2),
                    )
                    .await
                    .map_err(e)?,
            );
        }
        for c in confirms {
            c.await.map_err(e)?;
        }
        tokio::time::timeout(Duration::from_secs(120), consumed)
            .await
            .map_err(|_| "the bare loop's consumer took over 120 s".to_string())?
            .map_err(|e| e.to_string())??;
        let elapsed = t.elapsed();
        let _ = channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await;
        let _ = connection.close(200, "".into()).await;
        Ok(elapsed)
    }

    /// Plans a fresh table of `rows` rows (no workers): wall time and the
    /// planner's peak RSS.
    pub async fn planner(&self, rows: u64) -> Result<(Duration, u64), String> {
        let table = format!("plan_{rows}");
        self.src
            .batch_execute(&format!(
                "DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (id bigint PRIMARY KEY, v text);
                 INSERT INTO {table} SELECT i, 'v' FROM generate_series(1, {rows}) i; ANALYZE {table};"
            ))
            .await
            .map_err(db_err)?;
        let config = self.config(&table, "batch_size = 1000", "");
        let t = Instant::now();
        let mut child = syncfleet_chaos::syncfleet_command(&self.syncfleet)
            .arg("--config")
            .arg(&config)
            .arg("sync")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| e.to_string())?;
        let pid = child.id().unwrap_or(0);
        let mut peak = 0;
        let status = loop {
            peak = peak.max(vm_hwm_kb(pid));
            if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
                break status;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let elapsed = t.elapsed();
        if !status.success() {
            return Err(format!("planning {rows} rows failed"));
        }
        // Nobody executes these jobs: take them out of the queue again.
        self.purge_work().await?;
        Ok((elapsed, peak))
    }

    async fn purge_work(&self) -> Result<(), String> {
        let e = |e: lapin::Error| e.to_string();
        let c = Connection::connect(&self.amqp_url, ConnectionProperties::default())
            .await
            .map_err(e)?;
        let channel = c.create_channel().await.map_err(e)?;
        channel
            .queue_purge(format!("{}.work", self.prefix).into(), Default::default())
            .await
            .map_err(e)?;
        let _ = c.close(200, "".into()).await;
        Ok(())
    }

    /// Removes the broker objects and the work folder; the cluster stops
    /// when the bench is dropped.
    pub async fn cleanup(&self) {
        if let Ok(c) = Connection::connect(&self.amqp_url, ConnectionProperties::default()).await {
            if let Ok(channel) = c.create_channel().await {
                // Everything syncfleet declares under the prefix (delay
                // queues of up to 10 attempts), then the bare loop's queue.
                let _ = syncfleet_broker::Topology::new(&self.prefix)
                    .delete(&channel, 10)
                    .await;
                let _ = channel
                    .queue_delete(
                        format!("{}.bare", self.prefix).into(),
                        QueueDeleteOptions::default(),
                    )
                    .await;
            }
            let _ = c.close(200, "".into()).await;
        }
    }
}

/// Removes the bench's folder. The last field of [`Bench`], so that it
/// runs after the clusters inside the folder have stopped.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn hash(s: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    s.hash(&mut h);
    h.finish()
}

/// A process's peak resident set (VmHWM) in kB, 0 once it is gone.
pub fn vm_hwm_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// Worker processes of the release binary.
pub struct Workers {
    children: Vec<Child>,
}

impl Workers {
    pub async fn start(bench: &Bench, config: &Path, n: usize) -> Result<Self, String> {
        let mut children = Vec::new();
        for _ in 0..n {
            children.push(
                syncfleet_chaos::syncfleet_command(&bench.syncfleet)
                    .arg("--config")
                    .arg(config)
                    .arg("worker")
                    .env(
                        "RUST_LOG",
                        std::env::var("BENCH_WORKER_LOG").unwrap_or_else(|_| "warn".into()),
                    )
                    .stdout(Stdio::null())
                    .spawn()
                    .map_err(|e| e.to_string())?,
            );
        }
        let mut workers = Self { children };
        // Until each consumes: a measurement starts with the fleet ready.
        let deadline = Instant::now() + Duration::from_secs(60);
        while bench.work_consumers().await < n as u32 {
            for child in &mut workers.children {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(format!("a worker exited at start: {status}"));
                }
            }
            if Instant::now() > deadline {
                workers.stop().await;
                return Err(format!("{n} worker(s) did not consume within 60 s"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(workers)
    }

    pub fn peak_rss_kb(&self) -> u64 {
        self.children
            .iter()
            .filter_map(|c| c.id())
            .map(vm_hwm_kb)
            .max()
            .unwrap_or(0)
    }

    pub async fn stop(mut self) {
        syncfleet_chaos::stop_processes(&mut self.children).await;
    }
}
