//! Operations: /metrics, /healthz, /readyz, the dashboard and alert rules,
//! the Kubernetes manifests, and a real Prometheus scraping a worker.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::TestEnv;

/// A plain HTTP GET on loopback: (status code, body).
async fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect(("127.0.0.1", port)),
    )
    .await
    .ok()?
    .ok()?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .ok()?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

fn free_port() -> u16 {
    syncfleet_chaos::broker::free_port().unwrap()
}

/// The value of the first sample of `family` whose labels contain all of
/// `labels` (`name="value"` pairs).
fn sample(metrics: &str, family: &str, labels: &[&str]) -> Option<f64> {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(family) && l[family.len()..].starts_with(['{', ' ']))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

fn spawn(env: &TestEnv, args: &[&str]) -> tokio::process::Child {
    crate::helpers::syncfleet()
        .arg("--config")
        .arg(env.dir.join("syncfleet.toml"))
        .args(args)
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_cover_a_real_sync() {
    let env = TestEnv::new().await;
    env.source
        .batch_execute(
            "CREATE TABLE items (id int PRIMARY KEY, v text, updated_at timestamptz NOT NULL DEFAULT now());
             INSERT INTO items SELECT i, 'v' || i, now() FROM generate_series(1, 300) i;",
        )
        .await
        .unwrap();
    env.migrate().await;
    // The throttle is on (it is off by default) so that its level is
    // exported too.
    env.write(
        "syncfleet.toml",
        &env.config_text_with(
            "[source.throttle]\nprobe = \"SELECT 1\"\n",
            "[producer]\ninterval = \"1s\"\nstagger = \"0s\"\n\
             [[stream]]\nname = \"items\"\ntable = \"items\"\nbatch_size = 50\ncursor = \"updated_at\"\n",
        ),
    );
    let (worker_port, producer_port) = (free_port(), free_port());
    let worker_addr = format!("127.0.0.1:{worker_port}");
    let producer_addr = format!("127.0.0.1:{producer_port}");
    let _worker = spawn(&env, &["worker", "--metrics-addr", &worker_addr]);
    let _producer = spawn(&env, &["producer", "--metrics-addr", &producer_addr]);
    // The producer's scheduled runs (every second) do the syncing.
    env.eventually("worker metrics with synced rows", 60, || async {
        get(worker_port, "/metrics")
            .await
            .and_then(|(_, m)| sample(&m, "syncfleet_rows_synced_total", &["stream=\"items\""]))
            .is_some_and(|v| v >= 300.0)
    })
    .await;
    env.eventually(
        "producer metrics with run progress and a watermark",
        60,
        || async {
            get(producer_port, "/metrics").await.is_some_and(|(_, m)| {
                sample(
                    &m,
                    "syncfleet_run_batches",
                    &["stream=\"items\"", "state=\"total\""],
                )
                .is_some()
                    && sample(&m, "syncfleet_watermark_age_seconds", &["stream=\"items\""])
                        .is_some()
                    && sample(&m, "syncfleet_queue_messages", &["queue=\""]).is_some()
            })
        },
    )
    .await;
    // `status` shows the level the throttle holds the fleet's reads to.
    let path = env.dir.join("syncfleet.toml");
    env.eventually("status with the throttle's level", 30, || async {
        let out = env.cli(&path, &["status"]).await;
        String::from_utf8_lossy(&out.stdout).contains("held, 0 waiting (the throttle's level: ")
    })
    .await;
    let (status, worker) = get(worker_port, "/metrics").await.unwrap();
    assert_eq!(status, 200);
    let items = ["stream=\"items\""];
    for family in [
        "syncfleet_bytes_synced_total",
        "syncfleet_job_duration_seconds_count",
        "syncfleet_source_read_seconds_count",
        "syncfleet_destination_write_seconds_count",
    ] {
        assert!(
            sample(&worker, family, &items).unwrap_or(0.0) > 0.0,
            "{family}:\n{worker}"
        );
    }
    assert!(
        sample(
            &worker,
            "syncfleet_jobs_total",
            &["stream=\"items\"", "outcome=\"succeeded\""]
        )
        .unwrap_or(0.0)
            > 0.0,
        "{worker}"
    );
    assert!(
        sample(
            &worker,
            "syncfleet_pool_connections",
            &["database=\"source\"", "state=\"size\""]
        )
        .is_some(),
        "{worker}"
    );
    assert!(
        sample(&worker, "syncfleet_jobs_in_flight", &[]).is_some(),
        "{worker}"
    );
    assert!(
        sample(&worker, "syncfleet_throttle_level", &[]).is_some(),
        "{worker}"
    );
    assert!(
        sample(&worker, "syncfleet_queue_consumers", &["queue=\""]).is_some(),
        "{worker}"
    );
    let (_, producer) = get(producer_port, "/metrics").await.unwrap();
    assert_eq!(
        sample(&producer, "syncfleet_leader", &[]),
        Some(1.0),
        "{producer}"
    );
    // A standby reports the fleet's gauges too, so that none of its values
    // goes stale while it stands by (after a step-down, say).
    let standby_port = free_port();
    let standby_addr = format!("127.0.0.1:{standby_port}");
    let _standby = spawn(&env, &["producer", "--metrics-addr", &standby_addr]);
    let work = format!("queue=\"{}.work\"", env.name);
    env.eventually("the standby's gauges", 60, || async {
        get(standby_port, "/metrics").await.is_some_and(|(_, m)| {
            sample(&m, "syncfleet_leader", &[]) == Some(0.0)
                && sample(&m, "syncfleet_queue_messages", &[&work]).is_some()
                && sample(
                    &m,
                    "syncfleet_run_batches",
                    &["stream=\"items\"", "state=\"total\""],
                )
                .is_some()
        })
    })
    .await;
    assert_eq!(get(worker_port, "/healthz").await.map(|r| r.0), Some(200));
    assert_eq!(get(worker_port, "/readyz").await.map(|r| r.0), Some(200));
}

/// A producer whose reading of the fleet's progress queues behind a lock
/// on the control schema (a migration, say) goes on reporting queue depths,
/// and its progress timestamp says how old the progress gauges are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_control_schema_holds_up_no_gauge_but_its_own() {
    let env = TestEnv::new().await;
    env.source
        .batch_execute(
            "CREATE TABLE items (id int PRIMARY KEY, v text); INSERT INTO items VALUES (1, 'a');",
        )
        .await
        .unwrap();
    env.migrate().await;
    env.write(
        "syncfleet.toml",
        &env.config_text(
            "[producer]\ninterval = \"1h\"\n[[stream]]\nname = \"items\"\ntable = \"items\"\n",
        ),
    );
    let port = free_port();
    let _producer = spawn(
        &env,
        &["producer", "--metrics-addr", &format!("127.0.0.1:{port}")],
    );
    let work = format!("queue=\"{}.work\"", env.name);
    let metrics = || async move {
        get(port, "/metrics")
            .await
            .map(|(_, m)| m)
            .unwrap_or_default()
    };
    let read = |m: &str, family: &str, labels: &[&str]| sample(m, family, labels);
    // No worker runs: the first run's one job waits in the work queue.
    env.eventually(
        "the first run's progress and its job counted",
        60,
        || async {
            let m = metrics().await;
            read(
                &m,
                "syncfleet_run_batches",
                &["stream=\"items\"", "state=\"total\""],
            ) == Some(1.0)
                && read(&m, "syncfleet_queue_messages", &[&work]) == Some(1.0)
                && read(&m, "syncfleet_progress_timestamp_seconds", &[]).is_some()
        },
    )
    .await;
    env.dest
        .batch_execute("BEGIN; LOCK TABLE syncfleet.batches IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    env.publish_raw(b"{}", "not-a-job").await;
    env.eventually("the second message counted beside the lock", 60, || async {
        read(&metrics().await, "syncfleet_queue_messages", &[&work]) == Some(2.0)
    })
    .await;
    // A report that began before the lock may still land; none after it can.
    // A scrape the loaded machine answers too late is tried again.
    let stamp = || async {
        for _ in 0..30 {
            let m = metrics().await;
            if let Some(s) = read(&m, "syncfleet_progress_timestamp_seconds", &[]) {
                return s;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        panic!("no progress timestamp in 30 scrapes");
    };
    let locked = stamp().await;
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert_eq!(stamp().await, locked, "progress read through the lock");
    env.dest.batch_execute("COMMIT").await.unwrap();
    env.eventually("progress read again once the lock is gone", 60, || async {
        stamp().await > locked
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_broker() {
    let env = TestEnv::new().await;
    env.migrate().await;
    let broker = tokio::task::block_in_place(|| {
        syncfleet_chaos::broker::PrivateBroker::start(&env.dir, &format!("{}_mq", env.name))
    })
    .unwrap();
    let text = env
        .config_text("")
        .replace(&crate::helpers::amqp_url(), &broker.url());
    env.write("syncfleet.toml", &text);
    let port = free_port();
    let _worker = spawn(
        &env,
        &["worker", "--metrics-addr", &format!("127.0.0.1:{port}")],
    );
    let ready = || async { get(port, "/readyz").await.map(|r| r.0) };
    env.eventually("ready", 30, || async { ready().await == Some(200) })
        .await;
    tokio::task::block_in_place(|| broker.stop());
    env.eventually("not ready while the broker is down", 30, || async {
        ready().await == Some(503)
    })
    .await;
    assert_eq!(
        get(port, "/healthz").await.map(|r| r.0),
        Some(200),
        "alive all the same"
    );
    tokio::task::block_in_place(|| broker.start_again()).unwrap();
    env.eventually("ready again", 60, || async { ready().await == Some(200) })
        .await;
}

/// Every `syncfleet_*` name in a file, with histogram suffixes removed.
fn names_in(path: &str) -> Vec<String> {
    let text = std::fs::read_to_string(format!("{}/../../{path}", env!("CARGO_MANIFEST_DIR")))
        .unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut names: Vec<String> = text
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("syncfleet_"))
        .map(|w| {
            ["_bucket", "_count", "_sum"]
                .iter()
                .fold(w.to_string(), |n, s| {
                    n.strip_suffix(s).map(str::to_string).unwrap_or(n)
                })
        })
        .collect();
    names.sort();
    names.dedup();
    names
}

#[test]
fn the_dashboard_and_alerts_use_only_exported_metrics() {
    for file in [
        "deploy/grafana/syncfleet.json",
        "deploy/prometheus/alerts.yml",
    ] {
        let names = names_in(file);
        assert!(!names.is_empty(), "{file} uses no syncfleet metric");
        for n in names {
            assert!(
                syncfleet_core::metrics::ALL.contains(&n.as_str()),
                "{file} uses {n}, which syncfleet does not export"
            );
        }
    }
}

#[test]
fn the_kubernetes_manifests_and_alert_rules_validate() {
    // promtool comes with it; check.sh would install it by itself.
    crate::helpers::prometheus();
    let out = std::process::Command::new("bash")
        .arg(format!(
            "{}/../../deploy/check.sh",
            env!("CARGO_MANIFEST_DIR")
        ))
        .current_dir(format!("{}/../..", env!("CARGO_MANIFEST_DIR")))
        .output()
        .expect("bash runs");
    assert!(
        out.status.success(),
        "deploy/check.sh failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_queue_depth_from_a_worker() {
    let env = TestEnv::new().await;
    env.source
        .batch_execute(
            "CREATE TABLE items (id int PRIMARY KEY, v text);
             INSERT INTO items SELECT i, 'v' || i FROM generate_series(1, 200) i;",
        )
        .await
        .unwrap();
    env.migrate().await;
    let config = env.config("[[stream]]\nname = \"items\"\ntable = \"items\"\nbatch_size = 20\n");
    let worker_port = free_port();
    let _worker = spawn(
        &env,
        &[
            "worker",
            "--metrics-addr",
            &format!("127.0.0.1:{worker_port}"),
        ],
    );
    let prom_port = free_port();
    let prom_dir = env.dir.join("prometheus");
    std::fs::create_dir_all(&prom_dir).unwrap();
    std::fs::write(
        prom_dir.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: syncfleet\n    static_configs:\n      - targets: ['127.0.0.1:{worker_port}']\n"
        ),
    )
    .unwrap();
    let binary = tokio::task::block_in_place(crate::helpers::prometheus);
    let _prometheus = tokio::process::Command::new(binary)
        .arg(format!(
            "--config.file={}",
            prom_dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            prom_dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let plan = env.plan(&config).await;
    env.wait(plan.run_id).await;
    let work_queue = format!("{}.work", env.name);
    env.eventually("Prometheus to hold the work queue's depth", 90, || async {
        get(prom_port, "/api/v1/query?query=syncfleet_queue_messages")
            .await
            .is_some_and(|(status, body)| status == 200 && body.contains(&work_queue))
    })
    .await;
}

/// Jobs that find no fleet read slot free by half their deadline (one
/// slot, held elsewhere for several deadlines) are handed back untried
/// rather than timed out: no attempt is used up, nothing is dead-lettered,
/// and the run completes once the slot is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_that_find_no_read_slot_by_half_their_deadline_are_handed_back() {
    let env = TestEnv::new().await;
    env.source
        .batch_execute(
            "CREATE TABLE items (id int PRIMARY KEY, v text);
             INSERT INTO items SELECT i, 'v' || i FROM generate_series(1, 50) i;",
        )
        .await
        .unwrap();
    env.migrate().await;
    let text = env
        .config_text_with(
            "max_concurrent_reads = 1\n",
            "[[stream]]\nname = \"items\"\ntable = \"items\"\nbatch_size = 10\n",
        )
        // 4 s: 2 s of margin between the slot's give-up (half of it) and
        // the deadline on a loaded machine, where a job cut off there would
        // discard its connections.
        .replace("[jobs]\n", "[jobs]\ndeadline = \"4s\"\n");
    let path = env.write("syncfleet.toml", &text);
    let config = std::sync::Arc::new(syncfleet_core::Config::load(&path).unwrap());
    let plan = env.plan(&config).await;
    let batches = plan.batches[0].1 as f64;
    // The fleet's one read slot, taken the way a worker takes it: in a
    // transaction, which here stays open.
    let holder = crate::helpers::connect(&env.dest_url).await;
    holder.batch_execute("BEGIN").await.unwrap();
    holder
        .execute(
            "SELECT pg_advisory_xact_lock(hashtext($1), 0)",
            &[&syncfleet_db::ceiling::namespace(&env.name)],
        )
        .await
        .unwrap();
    let port = free_port();
    let _worker = spawn(
        &env,
        &["worker", "--metrics-addr", &format!("127.0.0.1:{port}")],
    );
    let metrics = || async {
        get(port, "/metrics")
            .await
            .map(|(_, m)| m)
            .unwrap_or_default()
    };
    let outcome = |metrics: &str, o: &str| {
        sample(
            metrics,
            "syncfleet_jobs_total",
            &["stream=\"items\"", &format!("outcome=\"{o}\"")],
        )
        .unwrap_or(0.0)
    };
    // Three attempts' deadlines and more: timed out instead, the jobs
    // would have been dead-lettered by now.
    env.eventually("jobs handed back while the slot is held", 30, || async {
        outcome(&metrics().await, "handed_back") >= 4.0
    })
    .await;
    // Handing jobs back costs the source no new connections: nothing was
    // begun there, so the worker's stay in its pool.
    let sessions = || async {
        let mut pids: Vec<i32> = env
            .source
            .query(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() \
                 AND application_name = 'syncfleet-source'",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        pids.sort_unstable();
        pids
    };
    let before = sessions().await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let handed_back = outcome(&metrics().await, "handed_back");
    assert!(!before.is_empty());
    assert_eq!(sessions().await, before, "after {handed_back} hand-backs");
    let held = metrics().await;
    assert_eq!(outcome(&held, "succeeded"), 0.0, "{held}");
    assert_eq!(outcome(&held, "retried"), 0.0, "{held}");
    assert_eq!(env.dead_letters().await, 0);

    // An operator sees who holds the slot, and, once it is held longer
    // than a job's deadline and settling (4 + 10 s), that it is not a
    // job's hold, in `status` and in the producer's gauges.
    let pid: i32 = holder
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let out = env.cli(&path, &["status"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("read slots: 1 of 1 held"), "{text}");
    assert!(text.contains(&format!("slot 0: pid {pid} (")), "{text}");
    env.eventually(
        "status --json shows the holder stuck, and a waiter",
        30,
        || async {
            let out = env.cli(&path, &["status", "--json"]).await;
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
            let sessions = v["read_slots"]["sessions"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let holds = sessions.first().is_some_and(|s| {
                s["granted"] == true && s["pid"] == pid && s["slot"] == 0 && s["stuck"] == true
            });
            holds && sessions.iter().any(|s| s["granted"] == false)
        },
    )
    .await;
    let out = env.cli(&path, &["status"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("pg_terminate_backend({pid})")),
        "{text}"
    );
    let producer_port = free_port();
    let producer = spawn(
        &env,
        &[
            "producer",
            "--metrics-addr",
            &format!("127.0.0.1:{producer_port}"),
        ],
    );
    env.eventually("the producer's read-slot gauges", 30, || async {
        get(producer_port, "/metrics").await.is_some_and(|(_, m)| {
            let slots =
                |state: &str| sample(&m, "syncfleet_read_slots", &[&format!("state=\"{state}\"")]);
            slots("held") == Some(1.0)
                && slots("stuck") == Some(1.0)
                && slots("waiting").is_some_and(|n| n >= 1.0)
                && sample(&m, "syncfleet_read_slot_held_seconds", &[]).is_some_and(|s| s > 14.0)
        })
    })
    .await;
    drop(producer);
    drop(holder);
    env.wait(plan.run_id).await;
    // The run succeeds in the last job's commit, a little before its
    // worker counts the job.
    env.eventually("every job counted", 30, || async {
        outcome(&metrics().await, "succeeded") == batches
    })
    .await;
    let done = metrics().await;
    assert_eq!(outcome(&done, "succeeded"), batches, "{done}");
    assert_eq!(outcome(&done, "retried"), 0.0, "{done}");
    assert_eq!(env.dead_letters().await, 0);
    env.assert_same_rows("SELECT * FROM items").await;
}

/// A job the read gate holds so long that it could no longer finish within
/// the broker's consumer timeout is handed back untried, rather than held
/// until the broker takes the whole session's jobs back; the run still
/// completes, each batch once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_the_read_gate_holds_too_long_is_handed_back_untried() {
    let env = TestEnv::new().await;
    env.source
        .batch_execute(
            "CREATE TABLE items (id int PRIMARY KEY, v text);
             INSERT INTO items SELECT i, 'v' || i FROM generate_series(1, 2000) i;",
        )
        .await
        .unwrap();
    env.migrate().await;
    // Batches of 1,000 rows (too large to share a transaction) each cost
    // 10 s of the rows/s budget; a job may begin at most 20 - (2 + 10) = 8 s
    // after it came, so the second waits too long. With one slot and such
    // batches the prefetch is 1: no job waits for a slot (the other way a
    // job is handed back), only at the gate.
    let text = env
        .config_text_with(
            "max_rows_per_second = 100\n[source.throttle]\nenabled = false\n",
            "[[stream]]\nname = \"items\"\ntable = \"items\"\nbatch_size = 1000\ndeadline = \"2s\"\n",
        )
        .replace(
            "connect_timeout = \"5s\"\n[jobs]",
            "connect_timeout = \"5s\"\nconsumer_timeout = \"20s\"\n[jobs]",
        )
        .replace("[jobs]\n", "[jobs]\ndeadline = \"2s\"\n")
        .replace("concurrency = 3", "concurrency = 1");
    let path = env.write("syncfleet.toml", &text);
    let config = std::sync::Arc::new(syncfleet_core::Config::load(&path).unwrap());
    assert_eq!(
        config.broker.consumer_timeout,
        Duration::from_secs(20),
        "{text}"
    );
    let port = free_port();
    let _worker = spawn(
        &env,
        &["worker", "--metrics-addr", &format!("127.0.0.1:{port}")],
    );
    let plan = env.plan(&config).await;
    let batches = plan.batches[0].1 as f64;
    env.wait(plan.run_id).await;
    let outcome = |metrics: &str, o: &str| {
        sample(
            metrics,
            "syncfleet_jobs_total",
            &["stream=\"items\"", &format!("outcome=\"{o}\"")],
        )
        .unwrap_or(0.0)
    };
    let metrics = || async {
        get(port, "/metrics")
            .await
            .map(|(_, m)| m)
            .unwrap_or_default()
    };
    // The run succeeds in the last job's commit, a little before its
    // worker counts the job.
    env.eventually("every job counted", 30, || async {
        outcome(&metrics().await, "succeeded") == batches
    })
    .await;
    let metrics = metrics().await;
    assert!(outcome(&metrics, "handed_back") >= 1.0, "{metrics}");
    assert_eq!(outcome(&metrics, "succeeded"), batches, "{metrics}");
    env.assert_same_rows("SELECT * FROM items").await;
}

/// A management API that does not answer leaves the queue gauges to
/// passive declares rather than frozen or missing; and the dead-letter
/// counter starts at 0 for every reason, so that the alert's `increase()`
/// sees a pod's first dead letter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_gauges_outlive_a_silent_management_api() {
    let env = TestEnv::new().await;
    env.migrate().await;
    let closed = free_port();
    let text = env.config_text("").replace(
        "connect_timeout = \"5s\"\n[jobs]",
        &format!(
            "connect_timeout = \"5s\"\nmanagement_url = \"http://127.0.0.1:{closed}\"\n[jobs]"
        ),
    );
    env.write("syncfleet.toml", &text);
    let port = free_port();
    let _worker = spawn(
        &env,
        &["worker", "--metrics-addr", &format!("127.0.0.1:{port}")],
    );
    let work = format!("queue=\"{}.work\"", env.name);
    env.eventually(
        "the worker counted as the work queue's consumer",
        60,
        || async {
            get(port, "/metrics").await.is_some_and(|(_, m)| {
                sample(&m, "syncfleet_queue_consumers", &[&work]).unwrap_or(0.0) >= 1.0
            })
        },
    )
    .await;
    let (_, metrics) = get(port, "/metrics").await.unwrap();
    for reason in syncfleet_core::metrics::DEAD_LETTER_REASONS {
        assert_eq!(
            sample(
                &metrics,
                "syncfleet_dead_letters_total",
                &[&format!("reason=\"{reason}\"")]
            ),
            Some(0.0),
            "{metrics}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_depth_counts_unacked_jobs_through_the_management_api() {
    let env = TestEnv::new().await;
    env.source
        .batch_execute(
            "CREATE TABLE items (id int PRIMARY KEY, v text);
             INSERT INTO items SELECT i, 'v' || i FROM generate_series(1, 100) i;",
        )
        .await
        .unwrap();
    env.migrate().await;
    let (broker, management) = tokio::task::block_in_place(|| {
        syncfleet_chaos::broker::PrivateBroker::start_with_management(
            &env.dir,
            &format!("{}_mgmt", env.name),
        )
    })
    .unwrap();
    // Each batch takes 2 s to read, so jobs sit unacked in the workers.
    let text = env
        .config_text(
            "[[stream]]\nname = \"items\"\nquery = \"SELECT id, v FROM items WHERE id > (SELECT -1 FROM pg_sleep(2))\"\n\
             key = [\"id\"]\nbatch_size = 10\n",
        )
        .replace(&crate::helpers::amqp_url(), &broker.url())
        .replace("connect_timeout = \"5s\"\n[jobs]", &format!("connect_timeout = \"5s\"\nmanagement_url = \"{management}\"\n[jobs]"));
    let path = env.write("syncfleet.toml", &text);
    let config = std::sync::Arc::new(syncfleet_core::Config::load(&path).unwrap());
    assert!(config.broker.management_url.is_some(), "{text}");
    let port = free_port();
    let _worker = spawn(
        &env,
        &["worker", "--metrics-addr", &format!("127.0.0.1:{port}")],
    );
    env.plan(&config).await;
    let work = format!("queue=\"{}.work\"", env.name);
    env.eventually("unacked jobs in the queue gauge", 60, || async {
        get(port, "/metrics").await.is_some_and(|(_, m)| {
            sample(
                &m,
                "syncfleet_queue_messages",
                &[&work, "state=\"unacked\""],
            )
            .unwrap_or(0.0)
                >= 1.0
        })
    })
    .await;
    drop(broker);
}
