//! `syncfleet status`, and waiting for a run.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use syncfleet_broker::{BrokerError, Topology};
use syncfleet_core::Config;
use syncfleet_db::ceiling::Slots;
use syncfleet_db::control::{self, RunSummary, StreamProgress};
use syncfleet_db::{Pool, Role};

use crate::error::CliError;
use crate::progress::Progress;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The run to show [default: the latest, plus a list of recent runs]
    run_id: Option<i64>,
    /// Follow the run live (a bar per stream) until it finishes
    #[arg(long, conflicts_with = "json")]
    watch: bool,
    /// Print the run, its streams and the queues as JSON
    #[arg(long)]
    json: bool,
}

/// Bound on each statement `status` runs, and on each poll of a run waited
/// for: a lock on the control schema (a migration, `VACUUM FULL`) must not
/// hang a command, nor hold `sync --wait` past its `--timeout`.
const READ_BOUND: Duration = Duration::from_secs(10);

/// A connection whose statements each end within [`READ_BOUND`].
async fn reader(destination: &Pool) -> Result<syncfleet_db::pool::Client, CliError> {
    let client = destination.get().await?;
    client
        .batch_execute(&format!(
            "SET statement_timeout = {}",
            READ_BOUND.as_millis()
        ))
        .await?;
    Ok(client)
}

pub async fn run(config: &Config, args: Args) -> Result<ExitCode, CliError> {
    let destination = Pool::connect(Role::Destination, &config.destination).await?;
    syncfleet_producer::check_schema(&destination).await?;
    if args.json {
        return json(config, &destination, args.run_id).await;
    }
    if args.watch {
        // Exits as `sync --wait` does: 3 if the run fails.
        let client = reader(&destination).await?;
        let id = chosen_run(&client, args.run_id)
            .await?
            .ok_or_else(|| CliError::Usage("no runs yet".into()))?
            .id;
        drop(client);
        let run = wait_for_run(&destination, id, Duration::from_secs(86_400), true).await?;
        print_run(&run);
        return Ok(match run.status.as_str() {
            "succeeded" => ExitCode::SUCCESS,
            _ => crate::error::found_wrong(),
        });
    }
    let client = reader(&destination).await?;
    let run = chosen_run(&client, args.run_id).await?;
    match &run {
        Some(run) => {
            print_run(run);
            let progress = control::run_progress(&**client, run.id).await?;
            print_progress(&progress);
            let failed = control::failed_batches(&**client, run.id).await?;
            if !failed.is_empty() {
                println!("  failed batches:");
                for b in &failed {
                    println!(
                        "    {} batch {} after {} attempt(s): {}",
                        b.stream, b.batch_no, b.attempts, b.error
                    );
                }
                let more = failed_total(&progress) - failed.len() as i64;
                if more > 0 {
                    println!("    … and {more} more");
                }
            }
        }
        None => println!("no runs yet"),
    }
    if args.run_id.is_none() {
        let recent = control::recent_runs(&**client, 10).await?;
        if recent.len() > 1 {
            println!("\nrecent runs:");
            for r in &recent {
                println!(
                    "  {:>6}  {:<10} {}  {:.1}s",
                    r.id, r.status, r.created_at, r.seconds
                );
            }
        }
    }
    println!();
    print_read_slots(config, &client).await?;
    print_queues(config).await;
    Ok(ExitCode::SUCCESS)
}

/// Who holds the fleet's read slots, and how many wait for them. A stuck
/// hold (see `SlotSession::stuck`) is flagged with how to end it: the jobs
/// that need the slot are handed back until it is freed.
async fn print_read_slots(
    config: &Config,
    client: &tokio_postgres::Client,
) -> Result<(), CliError> {
    let Some(slots) = Slots::read(client, config).await? else {
        println!("read slots: no fleet-wide ceiling (source.max_concurrent_reads is unset)");
        return Ok(());
    };
    // Below the ceiling, the throttle's level is what the fleet may use.
    let level = match config.reads.throttle {
        Some(_) => control::fleet_level(client, &config.broker.prefix)
            .await?
            .map_or(" (no throttle level reported lately)".into(), |l| {
                format!(" (the throttle's level: {l:.2})")
            }),
        None => String::new(),
    };
    println!(
        "read slots: {} of {} held, {} waiting{level}",
        slots.held().count(),
        slots.ceiling,
        slots.waiting()
    );
    for s in slots.held() {
        let held = s
            .seconds
            .map_or("for an unknown time".into(), |t| format!("up to {t:.1}s"));
        let (who, free) = match s.pid {
            Some(pid) => (
                format!(
                    "pid {pid} ({}, {})",
                    or_hidden(&s.application_name),
                    or_hidden(&s.state)
                ),
                format!("pg_terminate_backend({pid})"),
            ),
            None => (s.state.clone(), "ROLLBACK PREPARED".into()),
        };
        let stuck = match s.stuck {
            true => format!(
                ": longer than a live syncfleet process holds one (a holder cut off from its \
                 process, which the server's keepalives end within about a minute, or not \
                 syncfleet's); {free} in the destination frees it"
            ),
            false => String::new(),
        };
        println!("  slot {}: {who}, held {held}{stuck}", s.slot);
    }
    Ok(())
}

fn or_hidden(s: &str) -> &str {
    if s.is_empty() {
        "not visible to this role"
    } else {
        s
    }
}

fn print_run(run: &RunSummary) {
    let finished = match &run.finished_at {
        Some(f) => format!("finished {f}"),
        None => "not finished".into(),
    };
    println!(
        "run {}  {}  started {}  {}  {:.1}s",
        run.id, run.status, run.created_at, finished, run.seconds
    );
    if let Some(e) = &run.error {
        println!("  error: {e}");
    }
}

fn print_progress(streams: &[StreamProgress]) {
    println!(
        "  {:<24} {:>17} {:>8} {:>12}",
        "stream", "batches done", "failed", "rows"
    );
    for s in streams {
        // Until planning ends, the total is what has been planned so far.
        let total = if s.planned {
            s.batches_total.to_string()
        } else {
            format!("{}+", s.batches_total)
        };
        println!(
            "  {:<24} {:>17} {:>8} {:>12}",
            s.stream,
            format!("{}/{}", s.batches_done, total),
            s.batches_failed,
            s.rows
        );
    }
}

/// Queue depth from the broker. An unreachable broker is shown, not fatal:
/// the database half of the status is still useful.
async fn print_queues(config: &Config) {
    let topology = Topology::new(&config.broker.prefix);
    let result = async {
        let connection = syncfleet_broker::connect(&config.broker, "status").await?;
        let depths = topology.depths(&connection).await;
        let _ = connection.close(200, "status".into()).await;
        let lines = depths?.into_iter().map(|(q, depth)| match depth {
            Some((ready, consumers)) => format!("queue {q}: {ready} ready, {consumers} consumers"),
            None => format!("queue {q}: not declared yet"),
        });
        Ok::<_, BrokerError>(lines.collect::<Vec<_>>())
    }
    .await;
    match result {
        Ok(lines) => lines.iter().for_each(|l| println!("{l}")),
        Err(e) => println!("queues: unavailable ({e})"),
    }
}

/// Polls a run until it succeeds or fails, printing progress to stderr
/// when `show`. Bounded by `timeout`, each poll too (a poll that gets no
/// answer in time, the control schema locked, is tried again).
pub async fn wait_for_run(
    destination: &Pool,
    run_id: i64,
    timeout: Duration,
    show: bool,
) -> Result<RunSummary, CliError> {
    let started = Instant::now();
    let mut display = Progress::new(run_id);
    let mut unanswered = false;
    loop {
        let left = timeout.saturating_sub(started.elapsed());
        let bound = READ_BOUND.min(left).max(Duration::from_millis(500));
        let polled = destination
            .bounded(bound, async |client| {
                let run = control::run(&***client, run_id).await?;
                let progress = match show && run.is_some() {
                    true => control::run_progress(&***client, run_id).await?,
                    false => Vec::new(),
                };
                Ok((run, progress))
            })
            .await;
        let Some(polled) = polled else {
            unanswered = true;
            if started.elapsed() > timeout {
                return Err(CliError::TimedOut(format!(
                    "run {run_id}: the control schema gave no answer within {bound:?} \
                     (is it locked?), and the wait's {timeout:?} are up; it goes on: \
                     see `syncfleet status {run_id}`"
                )));
            }
            continue;
        };
        let (run, progress) = polled?;
        let run = run.ok_or_else(|| CliError::Failed(format!("run {run_id} disappeared")))?;
        if std::mem::take(&mut unanswered) && show {
            eprintln!("run {run_id}: the control schema answers again");
        }
        if show {
            display.update(&run, &progress);
        }
        match run.status.as_str() {
            "succeeded" => {
                display.finish();
                return Ok(run);
            }
            "failed" => {
                display.finish();
                if show {
                    eprintln!(
                        "run {run_id} failed: {}",
                        run.error.as_deref().unwrap_or("no reason recorded")
                    );
                }
                return Ok(run);
            }
            _ => {}
        }
        if started.elapsed() > timeout {
            return Err(CliError::TimedOut(format!(
                "run {run_id} did not finish within {timeout:?}; it goes on: see `syncfleet status {run_id}`"
            )));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Failed batches of a run, all of them (`failed_batches` lists the first
/// few).
fn failed_total(progress: &[StreamProgress]) -> i64 {
    progress.iter().map(|s| s.batches_failed).sum()
}

/// The run asked for (exit 2 if there is none of that id), else the latest
/// if any.
async fn chosen_run(
    client: &tokio_postgres::Client,
    id: Option<i64>,
) -> Result<Option<RunSummary>, CliError> {
    Ok(match id {
        Some(id) => Some(
            control::run(client, id)
                .await?
                .ok_or_else(|| CliError::Usage(format!("no run with id {id}")))?,
        ),
        None => control::recent_runs(client, 1).await?.pop(),
    })
}

/// `status --json`: the run (latest by default), its streams and the queues.
async fn json(
    config: &Config,
    destination: &Pool,
    run_id: Option<i64>,
) -> Result<ExitCode, CliError> {
    use serde_json::json;
    let client = reader(destination).await?;
    let run = chosen_run(&client, run_id).await?;
    let run_json = match &run {
        Some(r) => {
            let progress = control::run_progress(&**client, r.id).await?;
            let streams: Vec<serde_json::Value> = progress
                .iter()
                .map(|s| {
                    json!({"stream": s.stream, "batches_done": s.batches_done,
                           "batches_failed": s.batches_failed, "batches_total": s.batches_total,
                           "planned": s.planned, "rows": s.rows})
                })
                .collect();
            let failed: Vec<serde_json::Value> = control::failed_batches(&**client, r.id)
                .await?
                .iter()
                .map(|b| json!({"stream": b.stream, "batch": b.batch_no, "attempts": b.attempts, "error": b.error}))
                .collect();
            json!({"id": r.id, "status": r.status, "created_at": r.created_at,
                   "finished_at": r.finished_at, "seconds": r.seconds, "error": r.error,
                   "streams": streams, "failed_batches": failed,
                   "failed_batches_total": failed_total(&progress)})
        }
        None => serde_json::Value::Null,
    };
    let read_slots = match Slots::read(&**client, config).await? {
        Some(slots) => {
            let sessions: Vec<serde_json::Value> = slots
                .sessions
                .iter()
                .map(|s| {
                    json!({"slot": s.slot, "pid": s.pid, "granted": s.granted,
                           "application_name": s.application_name, "state": s.state,
                           "seconds": s.seconds, "stuck": s.stuck})
                })
                .collect();
            json!({"ceiling": slots.ceiling, "sessions": sessions})
        }
        None => serde_json::Value::Null,
    };
    // A queue not declared yet has no depth (null); a broker that cannot
    // be asked says why, so that a script can tell it from an empty one.
    let topology = Topology::new(&config.broker.prefix);
    let mut queues = Vec::new();
    let mut queues_error = None;
    match syncfleet_broker::connect(&config.broker, "status").await {
        Ok(connection) => {
            match topology.depths(&connection).await {
                Ok(depths) => {
                    for (q, depth) in depths {
                        let (ready, consumers) = depth.unzip();
                        queues.push(json!({"queue": q, "ready": ready, "consumers": consumers}));
                    }
                }
                Err(e) => queues_error = Some(e.to_string()),
            }
            let _ = connection.close(200, "status".into()).await;
        }
        Err(e) => queues_error = Some(e.to_string()),
    }
    println!(
        "{}",
        serde_json::to_string_pretty(&json!({"run": run_json, "read_slots": read_slots,
                                              "queues": queues, "queues_error": queues_error}))
        .expect("JSON serializes")
    );
    Ok(ExitCode::SUCCESS)
}
