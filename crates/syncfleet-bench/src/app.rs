//! Benchmark 3: the app's latency alone and while syncs run.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::process::Command;

use crate::util::{Bench, Workers, db_err};

/// The seed's user operations: sign-up, a lookup by email, a profile update.
const SCRIPT: &str = r"\set uid random(1, 100000)
\set nid random(1, 1000000000)
BEGIN;
INSERT INTO app_users (email, first_name, last_name) VALUES ('new' || :nid || '-' || :client_id || '@example.com', 'New', 'User') ON CONFLICT (email) DO NOTHING;
SELECT id, first_name, last_name FROM app_users WHERE email = 'user' || :uid || '@example.com';
UPDATE app_profiles SET bio = 'updated ' || :nid, updated_at = now() WHERE user_id = :uid;
END;
";

/// The app's own hot lookup, as the throttle's probe.
const APP_PROBE: &str = "SELECT id FROM app_users WHERE email = 'user42@example.com'";

struct Mode {
    name: &'static str,
    source: String,
    /// Measured this many times: the adaptive mode, whose target lies
    /// within the noise of one 20 s phase, more than once.
    rounds: usize,
}

/// Each mode's phase comes right after a phase of the app alone, and its
/// p99 is compared with that one: on this machine the app's p99 alone
/// drifts (1.0–12 ms across days, up to 40% between two phases a minute
/// apart), and a neighbour drifts least.
pub async fn run(
    bench: &Bench,
    seconds: u64,
    rate: u32,
    only: &[usize],
    rounds: usize,
) -> Result<Vec<Vec<String>>, String> {
    bench
        .src
        .batch_execute(
            "DROP TABLE IF EXISTS app_profiles, app_users;
             CREATE TABLE app_users (id bigserial PRIMARY KEY, email text NOT NULL UNIQUE,
               first_name text NOT NULL, last_name text NOT NULL, created_at timestamptz NOT NULL DEFAULT now());
             INSERT INTO app_users (email, first_name, last_name)
               SELECT 'user' || i || '@example.com', 'First' || i, 'Last' || i FROM generate_series(1, 100000) i;
             CREATE TABLE app_profiles (user_id bigint PRIMARY KEY REFERENCES app_users, bio text, updated_at timestamptz);
             INSERT INTO app_profiles SELECT i, 'bio', now() FROM generate_series(1, 100000) i;
             ANALYZE app_users; ANALYZE app_profiles;",
        )
        .await
        .map_err(db_err)?;
    let script = bench.dir.join("app.sql");
    std::fs::write(&script, SCRIPT).map_err(|e| e.to_string())?;

    let modes: Vec<Mode> = [
        Mode {
            name: "unthrottled: no ceiling, no throttle",
            source: "max_concurrent_reads = 1000\n[source.throttle]\nenabled = false\n".into(),
            rounds: 1,
        },
        Mode {
            name: "default settings: ceiling 4, no throttle",
            source: String::new(),
            rounds: 1,
        },
        Mode {
            name: "fleet-wide ceiling 1, no throttle",
            source: "max_concurrent_reads = 1\n[source.throttle]\nenabled = false\n".into(),
            rounds: 1,
        },
        Mode {
            name: "adaptive throttle probing the app's lookup (50 ms, floor 500 µs)",
            source: format!(
                "[source.throttle]\nprobe = \"{APP_PROBE}\"\ninterval = \"50ms\"\nmin_latency = \"500us\"\n"
            ),
            rounds,
        },
    ]
    .into_iter()
    .enumerate()
    .filter(|(i, _)| only.is_empty() || only.contains(i))
    .map(|(_, mode)| mode)
    .collect();
    // Without the unthrottled mode there is nothing to compare rows/s to.
    let mut unthrottled = f64::NAN;
    let mut rows = Vec::new();
    for (i, mode) in modes.iter().enumerate() {
        let config = bench.config("wide", "batch_size = 10000", &mode.source);
        let adaptive = mode.name.starts_with("adaptive");
        let mut measured = Vec::new();
        for round in 1..=mode.rounds {
            let name = match mode.rounds {
                1 => mode.name.to_string(),
                n => format!("{}, round {round} of {n}", mode.name),
            };
            eprintln!("bench: app latency alone, then with {name}");
            let ((_, alone_p99), idle) =
                alone(bench, &script, seconds, rate, &format!("alone{i}-{round}")).await?;
            let tag = format!("mode{i}-{round}");
            let ((p50, p99, rows_per_s), busy) =
                during_syncs(bench, &config, &script, seconds, rate, &tag).await?;
            if mode.name.starts_with("unthrottled") {
                unthrottled = rows_per_s.max(1.0);
            }
            let row = [
                alone_p99,
                p50,
                p99,
                p99 / alone_p99,
                rows_per_s,
                rows_per_s / unthrottled,
                idle.cores,
                busy.cores,
                idle.steal.max(busy.steal),
            ];
            // The target is the adaptive mode's, judged once: on its one
            // round, or on the median of its rounds below.
            let judged = adaptive && mode.rounds == 1;
            rows.push(app_row(name, &row, judged));
            measured.push(row);
        }
        if mode.rounds > 1 {
            let median = std::array::from_fn(|column| {
                let mut values: Vec<f64> = measured.iter().map(|row| row[column]).collect();
                values.sort_by(f64::total_cmp);
                values[values.len() / 2]
            });
            rows.push(app_row(
                format!(
                    "{}: the median of each column over its {} rounds",
                    mode.name, mode.rounds
                ),
                &median,
                adaptive,
            ));
        }
    }
    Ok(rows)
}

/// alone p99, p50, p99, ratio, rows/s, vs unthrottled; the machine's busy
/// cores alone and with the syncs, and the larger steal of the two phases;
/// with the adaptive throttle's target when `judged`.
fn app_row(
    name: String,
    [alone, p50, p99, ratio, rows_per_s, speed, idle, busy, steal]: &[f64; 9],
    judged: bool,
) -> Vec<String> {
    vec![
        name,
        format!("{alone:.2}"),
        format!("{p50:.2}"),
        format!("{p99:.2}"),
        format!("{ratio:.2}"),
        format!("{rows_per_s:.0}"),
        format!("{speed:.2}"),
        format!("{idle:.2} → {busy:.2}"),
        format!("{:.0}", rows_per_s / (busy - idle)),
        format!("{:.1}", steal * 100.0),
        match judged {
            true => crate::util::target(
                "p99 ≤ 1.5× at ≥ 0.20 of unthrottled",
                *ratio <= 1.5 && *speed >= 0.20,
            ),
            false => String::new(),
        },
    ]
}

/// How busy the whole machine was over a phase, from `/proc/stat`.
#[derive(Debug, Clone, Copy)]
pub struct Cpu {
    /// Cores busy on average (user, system, interrupts), out of all.
    pub cores: f64,
    /// The share of time the hypervisor ran something else (0 to 1).
    pub steal: f64,
}

/// The `cpu` line of `/proc/stat`: busy, steal and all ticks.
fn cpu_ticks() -> Result<[u64; 3], String> {
    let stat = std::fs::read_to_string("/proc/stat").map_err(|e| format!("/proc/stat: {e}"))?;
    let t: Vec<u64> = stat
        .lines()
        .next()
        .filter(|l| l.starts_with("cpu "))
        .ok_or("/proc/stat: no cpu line")?
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|v| {
            v.parse()
                .map_err(|_| format!("/proc/stat: {v} is not a count"))
        })
        .collect::<Result<_, _>>()?;
    // user nice system idle iowait irq softirq steal
    let [user, nice, system, _, _, irq, softirq, steal] = t[..] else {
        return Err("/proc/stat: fewer than 8 cpu fields".into());
    };
    Ok([user + nice + system + irq + softirq, steal, t.iter().sum()])
}

/// Runs `phase`, measuring the machine's CPU over it.
async fn measured<T>(phase: impl Future<Output = Result<T, String>>) -> Result<(T, Cpu), String> {
    let before = cpu_ticks()?;
    let out = phase.await?;
    let after = cpu_ticks()?;
    let [busy, steal, all] = std::array::from_fn(|i| after[i].saturating_sub(before[i]) as f64);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let all = all.max(1.0);
    Ok((
        out,
        Cpu {
            cores: busy / all * cores,
            steal: steal / all,
        },
    ))
}

/// pgbench with no sync running, once the databases are quiet: vacuumed
/// (so autovacuum has nothing left to do) and checkpointed.
async fn alone(
    bench: &Bench,
    script: &Path,
    seconds: u64,
    rate: u32,
    tag: &str,
) -> Result<((f64, f64), Cpu), String> {
    bench.settle().await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    measured(pgbench(bench, script, seconds, rate, tag)).await
}

/// pgbench while 2 workers run back-to-back full syncs.
async fn during_syncs(
    bench: &Bench,
    config: &Path,
    script: &Path,
    seconds: u64,
    rate: u32,
    tag: &str,
) -> Result<((f64, f64, f64), Cpu), String> {
    let workers = Workers::start(bench, config, 2).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let syncs = {
        let stop = stop.clone();
        let (binary, config) = (bench.syncfleet.clone(), config.to_path_buf());
        // The syncs that did not succeed: a phase whose syncs failed would
        // measure the app alone.
        tokio::spawn(async move {
            let mut failed = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let out = syncfleet_chaos::syncfleet_command(&binary)
                    .arg("--config")
                    .arg(&config)
                    .args(["sync", "--wait"])
                    .env("RUST_LOG", "error")
                    .output()
                    .await;
                match out {
                    Ok(out) if out.status.success() => {}
                    Ok(out) => failed.push(format!(
                        "{}: {}",
                        out.status,
                        String::from_utf8_lossy(&out.stderr).trim()
                    )),
                    Err(e) => failed.push(e.to_string()),
                }
            }
            failed
        })
    };
    let measurement = async {
        // Let the syncs get going before measuring.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let window_start: f64 = bench
            .dst
            .query_one("SELECT extract(epoch FROM clock_timestamp())::float8", &[])
            .await
            .map_err(db_err)?
            .get(0);
        let ((p50, p99), cpu) = measured(pgbench(bench, script, seconds, rate, tag)).await?;
        let copied: f64 = bench
            .dst
            .query_one(
                "SELECT coalesce(sum(rows_copied + coalesce(rows_unchanged, 0)), 0)::float8 FROM syncfleet.batches \
                 WHERE finished_at >= to_timestamp($1) AND finished_at < to_timestamp($1) + make_interval(secs => $2)",
                &[&window_start, &(seconds as f64)],
            )
            .await
            .map_err(db_err)?
            .get(0);
        Ok::<_, String>(((p50, p99, copied / seconds as f64), cpu))
    }
    .await;
    // However the measurement ended: the last sync, past its bound, is
    // killed with its task, not left to run into the next phase.
    stop.store(true, Ordering::Relaxed);
    let abort = syncs.abort_handle();
    let failed = tokio::time::timeout(Duration::from_secs(120), syncs).await;
    abort.abort();
    workers.stop().await;
    match failed {
        Ok(Ok(failed)) if !failed.is_empty() => Err(format!(
            "{} sync(s) failed during the phase, first: {}",
            failed.len(),
            failed[0]
        )),
        Ok(Ok(_)) => measurement,
        _ => Err("the last sync of the phase did not end within 120 s".into()),
    }
}

/// Runs pgbench at a fixed rate; returns p50 and p99 latency in ms.
async fn pgbench(
    bench: &Bench,
    script: &Path,
    seconds: u64,
    rate: u32,
    tag: &str,
) -> Result<(f64, f64), String> {
    let prefix = bench.dir.join(format!("pgbench-{tag}"));
    let out = Command::new("pgbench")
        .args([
            "-n",
            "-c",
            "2",
            "-j",
            "2",
            "-R",
            &rate.to_string(),
            "-T",
            &seconds.to_string(),
        ])
        .arg("-f")
        .arg(script)
        .arg("-l")
        .arg(format!("--log-prefix={}", prefix.display()))
        .arg(bench.src_url())
        .current_dir(&bench.dir)
        .output()
        .await
        .map_err(|e| format!("pgbench: {e} (is it installed? it comes with postgresql-contrib)"))?;
    if !out.status.success() {
        return Err(format!(
            "pgbench failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    // One log file per thread: `client txn latency_us script epoch us [lag]`.
    let mut latencies: Vec<f64> = Vec::new();
    for entry in std::fs::read_dir(&bench.dir)
        .map_err(|e| e.to_string())?
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(&format!("pgbench-{tag}.")) {
            let text = std::fs::read_to_string(entry.path()).map_err(|e| e.to_string())?;
            latencies.extend(
                text.lines()
                    .filter_map(|l| l.split_whitespace().nth(2)?.parse::<f64>().ok())
                    .map(|us| us / 1000.0),
            );
            let _ = std::fs::remove_file(entry.path());
        }
    }
    if latencies.is_empty() {
        return Err("pgbench logged no transactions".into());
    }
    latencies.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| latencies[((latencies.len() as f64 - 1.0) * q).round() as usize];
    Ok((at(0.50), at(0.99)))
}
