//! `syncfleet-bench` (`just bench`): every performance figure of syncfleet,
//! each beside a reference measured in the same run on the same machine.
//!
//! It runs on two private PostgreSQL clusters, source (with
//! `pg_stat_statements` preloaded) and destination, and on the local
//! RabbitMQ under a private prefix; it drives the release `syncfleet` binary
//! as real worker processes, prints a Markdown report and writes it to
//! `docs/benchmarks.md`.
//!
//! 1. throughput against the `COPY … TO STDOUT | COPY … FROM STDIN` ceiling;
//! 2. source statements per batch at three batch sizes;
//! 3. the app's pgbench latency alone and during continuous syncs, per
//!    protection mode;
//! 4. empty-job overhead against a bare lapin publish→consume→ack loop;
//! 5. worker memory, scaling over worker processes, planner time and memory;
//! 6. freshness through upstream events: source commit to destination row.

mod app;
mod freshness;
mod report;
mod util;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use crate::report::Report;
use crate::util::{Bench, Workers, ms, ratio, speed, target};

#[derive(Debug, Parser)]
struct Args {
    /// Rows of the throughput table
    #[arg(long, default_value_t = 1_000_000)]
    rows: u64,
    /// Seconds of each pgbench phase
    #[arg(long, default_value_t = 20)]
    app_seconds: u64,
    /// pgbench transactions per second (a fixed rate)
    #[arg(long, default_value_t = 100)]
    app_rate: u32,
    /// Events per second of the freshness benchmark
    #[arg(long, default_value_t = 500)]
    event_rate: u32,
    /// Seconds of the freshness benchmark
    #[arg(long, default_value_t = 60)]
    event_seconds: u64,
    /// Where to write the report
    #[arg(long, default_value = "docs/benchmarks.md")]
    out: PathBuf,
    /// The syncfleet binary [default: next to this one]
    #[arg(long)]
    syncfleet: Option<PathBuf>,
    /// Run only these sections (1-6, repeatable) [default: all]
    #[arg(long = "only", value_name = "N")]
    only: Vec<u8>,
    /// Run only these modes of section 3 (0 unthrottled … 3 adaptive,
    /// repeatable) [default: all]
    #[arg(long = "app-mode", value_name = "N")]
    app_modes: Vec<usize>,
    /// Rounds of the adaptive mode of section 3, each after its own phase
    /// of the app alone
    #[arg(long, default_value_t = 3)]
    app_rounds: usize,
    /// RabbitMQ URL
    #[arg(
        long,
        env = "SYNCFLEET_TEST_AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    amqp_url: String,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let syncfleet = args.syncfleet.clone().unwrap_or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(|d| d.join("syncfleet")))
            .unwrap_or_else(|| PathBuf::from("syncfleet"))
    });
    // From the start: the clusters' initdb and setup count too.
    let started = std::time::Instant::now();
    let bench = match Bench::start(syncfleet, args.amqp_url.clone()).await {
        Ok(b) => b,
        Err(e) => {
            eprintln!("bench: {e}");
            return ExitCode::from(1);
        }
    };
    // Interrupted, it still stops its clusters and removes what it made
    // (the clusters run in sessions of their own, out of the signal's way).
    let result = tokio::select! {
        result = run(&bench, &args, started) => result,
        _ = tokio::signal::ctrl_c() => Err("interrupted".into()),
    };
    bench.cleanup().await;
    match result {
        Ok(report) => {
            let text = report.markdown();
            println!("{text}");
            if let Some(dir) = args.out.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            if let Err(e) = std::fs::write(&args.out, &text) {
                eprintln!("bench: cannot write {}: {e}", args.out.display());
                return ExitCode::from(1);
            }
            eprintln!("bench: written to {}", args.out.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("bench: {e}");
            ExitCode::from(1)
        }
    }
}

async fn run(bench: &Bench, args: &Args, started: std::time::Instant) -> Result<Report, String> {
    let mut report = Report::new(bench.machine().await?);

    let wanted = |n: u8| args.only.is_empty() || args.only.contains(&n);
    eprintln!("bench: generating {} rows", args.rows);
    bench.generate_wide(args.rows).await?;
    let config = bench.config("wide", "batch_size = 10000", "");
    let mut peak_rss = 0;
    let rows = args.rows as f64;

    // 1. Throughput against the ceiling.
    if wanted(1) {
        let ceiling = bench.ceiling().await?;
        let workers = Workers::start(bench, &config, 2).await?;
        bench.reset_destination().await?;
        let (initial, initial_wal) = bench.sync_wal(&config).await?;
        let (resync, resync_wal) = bench.sync_wal(&config).await?;
        bench.touch_every_row().await?;
        let (changed, changed_wal) = bench.sync_wal(&config).await?;
        peak_rss = workers.peak_rss_kb();
        workers.stop().await;
        bench.verify(&config).await?;
        report.section(
            "1. Full sync throughput against the COPY ceiling",
            &format!(
                "{} rows of about 200 bytes (bigint, int, text, timestamptz, numeric, jsonb), \
             2 worker processes, batches of 10,000 rows, default settings (fleet ceiling 4; \
             the adaptive throttle is off unless configured, see section 3). The ceiling is `psql -c \"COPY (SELECT …) \
             TO STDOUT\" | psql -c \"COPY … FROM STDIN\"` into an empty table with the same \
             primary key, best of two. WAL is what the destination wrote during the sync.",
                args.rows
            ),
            &["measurement", "seconds", "rows/s", "vs ceiling", "target", "WAL"],
            vec![
                vec![
                    "ceiling: COPY out piped into COPY in".into(),
                    ms(ceiling),
                    per_s(rows, ceiling),
                    "1.00".into(),
                    "".into(),
                    "".into(),
                ],
                vec![
                    "initial load into an empty destination".into(),
                    ms(initial),
                    per_s(rows, initial),
                    ratio(ceiling, initial),
                    target("≥ 0.60", speed(ceiling, initial) >= 0.60),
                    mb(initial_wal),
                ],
                vec![
                    "re-sync, destination already holds every row".into(),
                    ms(resync),
                    per_s(rows, resync),
                    ratio(ceiling, resync),
                    target("≥ 0.30", speed(ceiling, resync) >= 0.30),
                    mb(resync_wal),
                ],
                vec![
                    "re-sync after every source row changed".into(),
                    ms(changed),
                    per_s(rows, changed),
                    ratio(ceiling, changed),
                    target("≥ 0.30", speed(ceiling, changed) >= 0.30),
                    mb(changed_wal),
                ],
            ],
        );
    }

    // 2. Queries per batch.
    if wanted(2) {
        eprintln!("bench: statements per batch");
        let mut rows_2 = Vec::new();
        for batch in [100u32, 1_000, 10_000] {
            let (batches, per_batch, kinds) = bench.statements_per_batch(batch).await?;
            rows_2.push(vec![
                batch.to_string(),
                batches.to_string(),
                format!("{per_batch:.2}"),
                kinds,
            ]);
        }
        report.section(
            "2. Source statements per batch",
            "From `pg_stat_statements` on the source over 200,000 rows, counting every statement \
         the workers ran (the throttle's probe aside), reset after planning. Jobs of batches \
         under 1,000 rows that wait in a worker together share one transaction (up to 64 jobs \
         and 1,000 rows), so `START TRANSACTION` and `COMMIT` are paid once per group: 4 \
         statements per batch, fewer for small batches, plus each worker process's description \
         of the stream, spread over the batches.",
            &[
                "batch size",
                "batches",
                "statements per batch",
                "statements",
            ],
            rows_2,
        );
    }

    // 3. The app stays fast.
    if wanted(3) {
        if !wanted(1) {
            // The syncs below re-sync a destination that holds the table.
            let workers = Workers::start(bench, &config, 2).await?;
            bench.sync_wait(&config).await?;
            workers.stop().await;
        }
        eprintln!("bench: app latency ({} s per phase)", args.app_seconds);
        let phases = app::run(
            bench,
            args.app_seconds,
            args.app_rate,
            &args.app_modes,
            args.app_rounds.max(1),
        )
        .await?;
        report.section(
            "3. The app's latency while syncs run",
            &format!(
                "pgbench at a fixed {} transactions/s (2 clients) running the seed's user \
             operations against the source (insert a user, look one up by email, update a \
             profile), during back-to-back full syncs of the {}-row table by 2 worker \
             processes, each such phase right after a phase of the app alone whose p99 is its \
             reference (the app's p99 alone drifts on this machine; its neighbour drifts least). \
             rows/s is the sync's own rate in the same window: rows copied, or found unchanged \
             by comparing a range's fingerprints. The machine's busy cores (from \
             `/proc/stat`: user, system and interrupt time, whatever runs) over the phase of \
             the app alone and over the phase with the syncs; the difference is what the sync \
             took (its workers, the broker, both databases' backends), and rows per sync \
             core-second divides its rows/s by it. Steal is the larger share of the two phases' \
             time that the hypervisor gave to something else.",
                args.app_rate, args.rows
            ),
            &[
                "mode",
                "alone p99 ms",
                "p50 ms",
                "p99 ms",
                "p99 vs alone",
                "sync rows/s",
                "vs unthrottled",
                "busy cores alone → with syncs",
                "rows per sync core-s",
                "steal %",
                "target",
            ],
            phases,
        );
    }

    // 4. Job overhead.
    if wanted(4) {
        eprintln!("bench: job overhead");
        let (jobs, ours, bare) = bench.job_overhead(5_000).await?;
        report.section(
            "4. Job overhead",
            &format!(
                "{jobs} empty jobs (zero-row batches) end to end, from the `syncfleet sync` that \
             plans and publishes them (with confirms) to the last ack, 2 worker processes \
             consuming from the start (each job a source read; jobs waiting in a worker \
             together share one source and one destination transaction, up to 64), against a \
             bare lapin loop publishing {jobs} messages with confirms to a consumer attached \
             from the start that acks each, in the same run, once before and once after; the \
             faster of the two is the reference."
            ),
            &["measurement", "seconds", "jobs/s", "vs bare loop", "target"],
            vec![
                vec![
                    "bare lapin publish → consume → ack".into(),
                    ms(bare),
                    per_s(jobs as f64, bare),
                    "1.00".into(),
                    "".into(),
                ],
                vec![
                    "syncfleet empty jobs".into(),
                    ms(ours),
                    per_s(jobs as f64, ours),
                    ratio(bare, ours),
                    target("≥ 0.50", speed(bare, ours) >= 0.5),
                ],
            ],
        );
    }

    // 5. Memory and scaling.
    if wanted(5) {
        eprintln!("bench: scaling");
        let mut scaling = vec![vec![
            "peak RSS of one worker, batches of 10,000".into(),
            match peak_rss {
                0 => "not measured (section 1 did not run)".into(),
                kb => format!("{:.1} MB", kb as f64 / 1024.0),
            },
            match peak_rss {
                0 => "< 150 MB".into(),
                kb => target("< 150 MB", kb < 150 * 1024),
            },
        ]];
        let mut one = None;
        for n in [1usize, 2, 4] {
            let workers = Workers::start(bench, &config, n).await?;
            bench.reset_destination().await?;
            let t = bench.sync_wait(&config).await?;
            workers.stop().await;
            let base = *one.get_or_insert(t);
            scaling.push(vec![
                format!("initial load, {n} worker process(es)"),
                format!("{} rows/s", per_s(rows, t)),
                format!("{} of 1 worker", ratio(base, t)),
            ]);
        }
        for n in [100_000u64, 1_000_000] {
            let (t, rss) = bench.planner(n).await?;
            scaling.push(vec![
                format!("planning {n} rows (batches of 1,000)"),
                format!("{} s, peak RSS {:.1} MB", ms(t), rss as f64 / 1024.0),
                String::new(),
            ]);
        }
        report.section(
            "5. Memory and scaling",
            "Peak RSS is the worker's VmHWM from /proc. All processes share the machine's cores \
         with both databases and the broker.",
            &["measurement", "value", "note"],
            scaling,
        );
    }

    // 6. Freshness of event-driven syncs.
    if wanted(6) {
        eprintln!(
            "bench: freshness ({} events/s for {} s)",
            args.event_rate, args.event_seconds
        );
        let f = freshness::run(bench, args.event_rate, args.event_seconds).await?;
        report.section(
            "6. Freshness: source commit to destination row, through events",
            &format!(
                "An external publisher (plain lapin) inserts or updates one row at a time in the \
                 source and publishes an event for it, {} a second for {} s, while a producer and \
                 2 worker processes run with default settings (events coalesced for up to 250 ms). \
                 Lag is the destination's write time minus the source's commit time, both taken \
                 from this machine's clock (both clusters run here).",
                args.event_rate, args.event_seconds
            ),
            &[
                "events published",
                "rows checked",
                "p50 s",
                "p99 s",
                "max s",
                "target",
            ],
            vec![vec![
                f.events.to_string(),
                f.seen.to_string(),
                format!("{:.3}", f.p50),
                format!("{:.3}", f.p99),
                format!("{:.3}", f.max),
                target("p99 < 1 s", f.p99 < 1.0),
            ]],
        );
    }
    report.elapsed = started.elapsed();
    Ok(report)
}

fn per_s(n: f64, t: Duration) -> String {
    format!("{:.0}", n / t.as_secs_f64().max(1e-9))
}

fn mb(bytes: u64) -> String {
    format!("{:.0} MB", bytes as f64 / 1e6)
}
