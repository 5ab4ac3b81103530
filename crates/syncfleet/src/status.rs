//! `syncfleet status`, and waiting for a run.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use syncfleet_broker::{BrokerError, Topology};
use syncfleet_core::Config;
use syncfleet_db::control::{self, RunSummary, StreamProgress};
use syncfleet_db::{Pool, Role};

use crate::error::CliError;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The run to show [default: the latest, plus a list of recent runs]
    run_id: Option<i64>,
}

pub async fn run(config: &Config, args: Args) -> Result<ExitCode, CliError> {
    let destination = Pool::connect(Role::Destination, &config.destination).await?;
    let client = destination.get().await?;
    let run = match args.run_id {
        Some(id) => Some(
            control::run(&**client, id)
                .await?
                .ok_or_else(|| CliError::Usage(format!("no run with id {id}")))?,
        ),
        None => control::recent_runs(&**client, 1).await?.pop(),
    };
    match &run {
        Some(run) => {
            print_run(run);
            print_progress(&control::run_progress(&**client, run.id).await?);
            let failed = control::failed_batches(&**client, run.id).await?;
            if !failed.is_empty() {
                println!("  failed batches:");
                for b in failed {
                    println!(
                        "    {} batch {} after {} attempt(s): {}",
                        b.stream, b.batch_no, b.attempts, b.error
                    );
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
    print_queues(config).await;
    Ok(ExitCode::SUCCESS)
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
        let mut lines = Vec::new();
        for q in topology.queues() {
            // A passive declare of a missing queue closes the channel, so
            // each queue gets its own.
            let channel = connection.create_channel().await?;
            match topology.depth(&channel, &q).await {
                Ok((ready, consumers)) => {
                    lines.push(format!("queue {q}: {ready} ready, {consumers} consumers"))
                }
                Err(_) => lines.push(format!("queue {q}: not declared yet")),
            }
        }
        let _ = connection.close(200, "status".into()).await;
        Ok::<_, BrokerError>(lines)
    }
    .await;
    match result {
        Ok(lines) => lines.iter().for_each(|l| println!("{l}")),
        Err(e) => println!("queues: unavailable ({e})"),
    }
}

/// Polls a run until it succeeds or fails, printing progress to stderr
/// when `show`. Bounded by `timeout`.
pub async fn wait_for_run(
    destination: &Pool,
    run_id: i64,
    timeout: Duration,
    show: bool,
) -> Result<RunSummary, CliError> {
    let started = Instant::now();
    let mut last_line = String::new();
    loop {
        let client = destination.get().await?;
        let run = control::run(&**client, run_id)
            .await?
            .ok_or_else(|| CliError::Failed(format!("run {run_id} disappeared")))?;
        if show {
            let progress = control::run_progress(&**client, run_id).await?;
            let line = progress
                .iter()
                .map(|s| format!("{} {}/{}", s.stream, s.batches_done, s.batches_total))
                .collect::<Vec<_>>()
                .join("  ");
            if line != last_line {
                eprintln!("run {run_id} {}: {line}", run.status);
                last_line = line;
            }
        }
        match run.status.as_str() {
            "succeeded" => return Ok(run),
            "failed" => {
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
        drop(client);
        if started.elapsed() > timeout {
            return Err(CliError::Failed(format!(
                "run {run_id} did not finish within {timeout:?}; it goes on: see `syncfleet status {run_id}`"
            )));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
