//! Test environment: private databases, a private broker prefix, config
//! files, in-process workers and the real `syncfleet` binary.

use std::path::PathBuf;
use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use syncfleet_broker::{Publisher, Topology};
use syncfleet_core::Config;
use syncfleet_core::job::{Job, KeyRange};
use syncfleet_core::shutdown::Shutdown;
use syncfleet_db::{Pool, Role, control};
use syncfleet_producer::{PlanError, RunPlan};
use tokio::task::JoinSet;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls};

pub fn pg_url() -> String {
    std::env::var("SYNCFLEET_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

pub fn amqp_url() -> String {
    std::env::var("SYNCFLEET_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// `postgres://host/x` → `postgres://host/{db}`.
pub fn url_for(db: &str) -> String {
    let url = pg_url();
    let slash = url.rfind('/').expect("a database URL");
    format!("{}/{db}", &url[..slash])
}

/// The plan the server would use for `sql` with `params`, as text.
pub async fn explain(client: &Client, sql: &str, params: &[&(dyn ToSql + Sync)]) -> String {
    client
        .query(&format!("EXPLAIN {sql}"), params)
        .await
        .unwrap_or_else(|e| panic!("EXPLAIN {sql}: {e}"))
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect::<Vec<_>>()
        .join("\n")
}

pub async fn connect(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"));
    tokio::spawn(connection);
    client
}

/// Sessions of `client`'s database waiting for a lock, running a statement
/// `LIKE pattern`.
pub async fn lock_waiters(client: &Client, pattern: &str) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND wait_event_type = 'Lock' AND query LIKE $1",
            &[&pattern],
        )
        .await
        .unwrap()
        .get(0)
}

/// The `syncfleet` binary under test, with none of the environment's
/// overrides: it runs on the test's databases and broker only.
pub fn syncfleet() -> tokio::process::Command {
    syncfleet_chaos::syncfleet_command(std::path::Path::new(env!("CARGO_BIN_EXE_syncfleet")))
}

fn init_logging() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("TEST_LOG").is_some() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(
                    std::env::var("TEST_LOG_FILTER").unwrap_or_else(|_| "info,lapin=warn".into()),
                )
                .with_test_writer()
                .try_init();
        }
    });
}

/// One test's private world.
pub struct TestEnv {
    /// Unique per test: database names and the broker prefix start with it.
    pub name: String,
    pub source_url: String,
    pub dest_url: String,
    /// Where config files go.
    pub dir: PathBuf,
    /// Connections for the test's own queries.
    pub source: Client,
    pub dest: Client,
}

impl TestEnv {
    pub async fn new() -> Self {
        init_logging();
        // The fleets and planners the tests run in process read the
        // environment's overrides: one left in the shell would send a test's
        // writes (and deletes) to a real database.
        if let Some(var) = syncfleet_core::config::ENV_VARS
            .into_iter()
            .find(|v| std::env::var_os(v).is_some())
        {
            panic!(
                "{var} is set: unset it to run the tests, which would use it instead of their own"
            );
        }
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let name = format!(
            "sft_{}_{}_{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let admin = connect(&pg_url()).await;
        for db in [format!("{name}_src"), format!("{name}_dst")] {
            admin
                .batch_execute(&format!("CREATE DATABASE \"{db}\""))
                .await
                .unwrap();
        }
        let dir = std::env::temp_dir().join(&name);
        std::fs::create_dir_all(&dir).unwrap();
        let source_url = url_for(&format!("{name}_src"));
        let dest_url = url_for(&format!("{name}_dst"));
        TestEnv {
            source: connect(&source_url).await,
            dest: connect(&dest_url).await,
            name,
            source_url,
            dest_url,
            dir,
        }
    }

    /// A config file with this test's databases and prefix, plus `streams`.
    pub fn config_text(&self, streams: &str) -> String {
        self.config_text_with("", streams)
    }

    /// Same, with extra `[source]` keys.
    pub fn config_text_with(&self, source: &str, streams: &str) -> String {
        format!(
            "[source]\nurl = \"{}\"\nmax_connections = 4\nconnect_timeout = \"5s\"\n{source}\n\
             [destination]\nurl = \"{}\"\nmax_connections = 6\nconnect_timeout = \"5s\"\n\
             [broker]\nurl = \"{}\"\nprefix = \"{}\"\nconnect_timeout = \"5s\"\n\
             [jobs]\nretry_initial = \"100ms\"\nretry_max = \"500ms\"\n\
             [worker]\nconcurrency = 3\nshutdown_grace = \"20s\"\n\n{streams}\n",
            self.source_url,
            self.dest_url,
            amqp_url(),
            self.name
        )
    }

    pub fn write(&self, file: &str, text: &str) -> PathBuf {
        let path = self.dir.join(file);
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Rewrites the `syncfleet.toml` that [`TestEnv::config`] wrote to
    /// allow 50 attempts, and loads it: for a test whose job fails until
    /// the test lifts the cause, however late a loaded machine lets it.
    pub fn patient(&self) -> Arc<Config> {
        let path = self.dir.join("syncfleet.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("[jobs]\n"));
        let text = text.replace("[jobs]\n", "[jobs]\nmax_attempts = 50\n");
        Arc::new(Config::load(&self.write("syncfleet.toml", &text)).unwrap())
    }

    /// Writes and loads a config the way the binary does.
    pub fn config(&self, streams: &str) -> Arc<Config> {
        let path = self.write("syncfleet.toml", &self.config_text(streams));
        Arc::new(Config::load(&path).unwrap())
    }

    pub async fn migrate(&self) {
        let mut dest = connect(&self.dest_url).await;
        control::migrate(&mut dest).await.unwrap();
    }

    /// Plans and publishes a full run of every stream (no workers).
    pub async fn plan(&self, config: &Config) -> RunPlan {
        self.try_plan(config).await.unwrap()
    }

    /// Same, returning planning's error.
    pub async fn try_plan(&self, config: &Config) -> Result<RunPlan, PlanError> {
        let source = Pool::connect(Role::Source, &config.source).await.unwrap();
        let dest = Pool::connect(Role::Destination, &config.destination)
            .await
            .unwrap();
        let publisher = Publisher::connect(&config.broker, "test").await.unwrap();
        let streams = config.select_streams(&[]).unwrap();
        let ceiling = syncfleet_db::ceiling::Ceiling::new(config);
        let plan = syncfleet_producer::start_run(
            &source,
            &dest,
            &publisher,
            &ceiling,
            &streams,
            config.broker.consumer_timeout,
        )
        .await;
        publisher.close().await;
        plan
    }

    /// Plans and publishes an incremental run of `config`'s first stream
    /// (no workers).
    pub async fn plan_incremental(&self, config: &Config) -> RunPlan {
        self.try_plan_incremental(config).await.unwrap()
    }

    /// Same, returning planning's error.
    pub async fn try_plan_incremental(&self, config: &Config) -> Result<RunPlan, PlanError> {
        let source = Pool::connect(Role::Source, &config.source).await.unwrap();
        let dest = Pool::connect(Role::Destination, &config.destination)
            .await
            .unwrap();
        let publisher = Publisher::connect(&config.broker, "test").await.unwrap();
        let ceiling = syncfleet_db::ceiling::Ceiling::new(config);
        let plan = syncfleet_producer::start_incremental_run(
            &source,
            &dest,
            &publisher,
            &ceiling,
            &config.streams[0],
            config.broker.consumer_timeout,
        )
        .await;
        publisher.close().await;
        plan
    }

    /// A run's jobs of one stream exactly as published, rebuilt from the
    /// control schema.
    pub async fn jobs(&self, run_id: i64, stream: &str) -> Vec<Job> {
        self.dest
            .query(
                "SELECT batch_no, lower_key, upper_key FROM syncfleet.batches \
                 WHERE run_id = $1 AND stream = $2 ORDER BY batch_no",
                &[&run_id, &stream],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| {
                let key =
                    |v: Option<serde_json::Value>| v.map(|v| serde_json::from_value(v).unwrap());
                Job::new(
                    run_id,
                    stream,
                    r.get(0),
                    KeyRange {
                        lower: key(r.get(1)),
                        upper: key(r.get(2)),
                    },
                )
            })
            .collect()
    }

    /// A full run through the broker with `workers` in-process workers;
    /// returns the run id once it succeeded.
    pub async fn sync(&self, config: &Arc<Config>, workers: usize) -> i64 {
        let fleet = Fleet::start(config, workers);
        let plan = self.plan(config).await;
        self.wait(plan.run_id).await;
        fleet.stop().await;
        plan.run_id
    }

    /// Waits (bounded) until a run succeeded; panics if it failed.
    pub async fn wait(&self, run_id: i64) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        loop {
            let run = control::run(&self.dest, run_id).await.unwrap().unwrap();
            match run.status.as_str() {
                "succeeded" => return,
                "failed" => panic!("run {run_id} failed: {:?}", run.error),
                _ => {}
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "run {run_id} did not finish in time: {run:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Every row of a query, each row as one text (`row::text`), sorted.
    pub async fn rows(client: &Client, sql: &str) -> Vec<String> {
        let mut rows: Vec<String> = client
            .query(&format!("SELECT s::text FROM ({sql}) AS s"), &[])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .iter()
            .map(|r| r.get(0))
            .collect();
        rows.sort();
        rows
    }

    /// Asserts that `sql` returns the same rows on the source and the
    /// destination.
    pub async fn assert_same_rows(&self, sql: &str) {
        assert_eq!(
            Self::rows(&self.source, sql).await,
            Self::rows(&self.dest, sql).await,
            "{sql} differs between source and destination"
        );
    }

    /// Runs the real binary with a config file; bounded by a timeout.
    pub async fn cli(&self, config: &std::path::Path, args: &[&str]) -> Output {
        let mut command = syncfleet();
        command
            .arg("--config")
            .arg(config)
            .args(args)
            .env("RUST_LOG", "warn");
        tokio::time::timeout(Duration::from_secs(120), command.output())
            .await
            .expect("syncfleet finished in time")
            .expect("syncfleet ran")
    }

    /// Drops every job ready in this test's work queue, as a broker losing
    /// them would; returns how many there were.
    pub async fn purge_work_queue(&self) -> u32 {
        let connection = lapin::Connection::connect(&amqp_url(), Default::default())
            .await
            .unwrap();
        let purged = connection
            .create_channel()
            .await
            .unwrap()
            .queue_purge(
                Topology::new(&self.name).work_queue().into(),
                Default::default(),
            )
            .await
            .unwrap();
        let _ = connection.close(200, "".into()).await;
        purged
    }

    /// Messages ready in this test's work queue (0 if it does not exist).
    pub async fn queue_depth(&self) -> u32 {
        self.depth_of(&Topology::new(&self.name).work_queue()).await
    }

    /// Waits until no job is left ready in the work queue: every one has
    /// reached a worker, for a check that something did *not* happen to
    /// mean anything.
    pub async fn delivered(&self) {
        self.eventually("the jobs to reach a worker", 60, || async {
            self.queue_depth().await == 0
        })
        .await;
    }

    /// Messages in this test's dead-letter queue.
    pub async fn dead_letters(&self) -> u32 {
        self.depth_of(&Topology::new(&self.name).dead_queue()).await
    }

    pub async fn depth_of(&self, queue: &str) -> u32 {
        self.ready_and_consumers(queue).await.0
    }

    /// Consumers of this test's work queue (0 if it does not exist).
    pub async fn work_consumers(&self) -> u32 {
        let queue = Topology::new(&self.name).work_queue();
        self.ready_and_consumers(&queue).await.1
    }

    async fn ready_and_consumers(&self, queue: &str) -> (u32, u32) {
        let connection = lapin::Connection::connect(&amqp_url(), Default::default())
            .await
            .unwrap();
        let channel = connection.create_channel().await.unwrap();
        let counts = match Topology::new(&self.name).depth(&channel, queue).await {
            Ok(counts) => counts,
            // A queue not declared yet holds nothing; any other error is
            // no answer, not an empty queue.
            Err(e) if e.to_string().contains("NOT_FOUND") => (0, 0),
            Err(e) => panic!("the depth of {queue}: {e}"),
        };
        let _ = connection.close(200, "".into()).await;
        counts
    }

    /// Publishes an upstream event with a plain lapin publisher, as any
    /// upstream service would.
    pub async fn publish_event(&self, routing_key: &str, body: &str) {
        let connection = lapin::Connection::connect(&amqp_url(), Default::default())
            .await
            .unwrap();
        let channel = connection.create_channel().await.unwrap();
        channel.confirm_select(Default::default()).await.unwrap();
        channel
            .basic_publish(
                Topology::new(&self.name).events_exchange().into(),
                routing_key.into(),
                Default::default(),
                body.as_bytes(),
                lapin::BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_content_type("application/json".into()),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        let _ = connection.close(200, "".into()).await;
    }

    /// Publishes a raw body to this test's work queue, as a foreign
    /// publisher (or a buggy one) would.
    pub async fn publish_raw(&self, body: &[u8], message_id: &str) {
        let connection = lapin::Connection::connect(&amqp_url(), Default::default())
            .await
            .unwrap();
        let channel = connection.create_channel().await.unwrap();
        let topology = Topology::new(&self.name);
        topology.declare(&channel).await.unwrap();
        channel.confirm_select(Default::default()).await.unwrap();
        channel
            .basic_publish(
                topology.work_exchange().into(),
                topology.work_queue().into(),
                Default::default(),
                body,
                lapin::BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_message_id(message_id.into()),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        let _ = connection.close(200, "".into()).await;
    }

    /// Waits (bounded) until `check` holds.
    pub async fn eventually<F, Fut>(&self, what: &str, seconds: u64, mut check: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(seconds);
        while !check().await {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out after {seconds}s waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for TestEnv {
    /// Removes the databases, the broker objects and the config folder,
    /// whether the test passed or panicked.
    fn drop(&mut self) {
        let name = self.name.clone();
        let dir = self.dir.clone();
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let admin = connect(&pg_url()).await;
                for db in [format!("{name}_src"), format!("{name}_dst")] {
                    let _ = admin
                        .batch_execute(&format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)"))
                        .await;
                }
                if let Ok(c) = lapin::Connection::connect(&amqp_url(), Default::default()).await {
                    if let Ok(channel) = c.create_channel().await {
                        let _ = Topology::new(&name).delete(&channel, 10).await;
                    }
                    let _ = c.close(200, "".into()).await;
                }
            });
            let _ = std::fs::remove_dir_all(dir);
        });
        let _ = cleanup.join();
    }
}

/// The producer service running in this process until [`Producer::stop`].
pub struct Producer {
    shutdown: Shutdown,
    pub counters: Arc<syncfleet_producer::service::Counters>,
    task: tokio::task::JoinHandle<Result<(), PlanError>>,
}

impl Producer {
    pub fn start(config: &Arc<Config>) -> Self {
        let shutdown = Shutdown::new();
        let counters = Arc::new(syncfleet_producer::service::Counters::default());
        let task = tokio::spawn(syncfleet_producer::service::run(
            config.clone(),
            counters.clone(),
            shutdown.signal(),
        ));
        Producer {
            shutdown,
            counters,
            task,
        }
    }

    pub async fn stop(self) {
        self.shutdown.trigger();
        self.task.await.unwrap().unwrap();
    }
}

/// Workers running in this process until [`Fleet::stop`].
pub struct Fleet {
    shutdown: Shutdown,
    tasks: JoinSet<Result<(), syncfleet_worker::WorkerError>>,
}

impl Fleet {
    pub fn start(config: &Arc<Config>, workers: usize) -> Self {
        let shutdown = Shutdown::new();
        let mut tasks = JoinSet::new();
        for _ in 0..workers {
            tasks.spawn(syncfleet_worker::run(config.clone(), shutdown.signal()));
        }
        Fleet { shutdown, tasks }
    }

    pub async fn stop(mut self) {
        self.shutdown.trigger();
        while let Some(result) = self.tasks.join_next().await {
            result.unwrap().unwrap();
        }
    }
}

/// The Prometheus binary on `PATH`, installed with `deploy/local/services.sh
/// tools` (Debian's package, with promtool) if this machine lacks it, once
/// per test process: `just test` runs the script first, a bare `cargo test`
/// on a fresh machine does not, and two tests installing at once would
/// fight over apt's lock.
pub fn prometheus() -> PathBuf {
    static INSTALLED: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    let find = || {
        let path = std::env::var_os("PATH")?;
        std::env::split_paths(&path)
            .map(|dir| dir.join("prometheus"))
            .find(|p| p.is_file())
    };
    INSTALLED
        .get_or_init(|| {
            if let Some(found) = find() {
                return Ok(found);
            }
            let script = format!(
                "{}/../../deploy/local/services.sh",
                env!("CARGO_MANIFEST_DIR")
            );
            let out = std::process::Command::new("bash")
                .arg(&script)
                .arg("tools")
                .output()
                .map_err(|e| format!("{script}: {e}"))?;
            find().ok_or_else(|| {
                format!(
                    "prometheus is not installed, and {script} did not install it:\n{}",
                    String::from_utf8_lossy(&out.stderr)
                )
            })
        })
        .clone()
        .unwrap_or_else(|e| panic!("{e}"))
}
