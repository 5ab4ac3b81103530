//! `syncfleet sync`

use std::process::ExitCode;
use std::time::{Duration, Instant};

use syncfleet_broker::Publisher;
use syncfleet_core::Config;
use syncfleet_db::ceiling::Ceiling;
use syncfleet_db::{Pool, Role};

use crate::error::CliError;
use crate::status;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Only these streams (repeatable) [default: all]
    #[arg(long = "stream", value_name = "NAME")]
    streams: Vec<String>,
    /// Wait for the run to finish, showing progress; exit 3 if it failed
    #[arg(long)]
    wait: bool,
    /// Resume this run instead of planning a new one: publish its batches
    /// that are neither done nor published, re-open failed ones, and finish
    /// planning streams that stopped halfway
    #[arg(long, value_name = "RUN_ID", conflicts_with = "streams")]
    resume: Option<i64>,
    /// Only the rows changed since each stream's watermark (streams with a
    /// `cursor`; the others get a full run)
    #[arg(long, conflicts_with = "resume")]
    incremental: bool,
    /// With --wait: give up after this long (e.g. 90s, 30m, 2h)
    #[arg(long, default_value = "1h", value_parser = syncfleet_core::duration::parse)]
    timeout: Duration,
}

pub async fn run(config: &Config, args: Args) -> Result<ExitCode, CliError> {
    let streams = config.select_streams(&args.streams)?;
    if streams.is_empty() {
        return Err(CliError::Usage(format!(
            "config {}: no [[stream]] is configured",
            config.origin
        )));
    }
    let source = Pool::connect(Role::Source, &config.source).await?;
    let destination = Pool::connect(Role::Destination, &config.destination).await?;
    let publisher = Publisher::connect(&config.broker, "producer").await?;
    let ceiling = Ceiling::new(config);
    // Streams refused for a run still going (incremental syncs go on with
    // the others and exit 5 at the end).
    let mut refused = Vec::new();
    let run_ids: Vec<i64> = match args.resume {
        Some(run_id) => {
            let result = syncfleet_producer::resume_run(
                &source,
                &destination,
                &publisher,
                &ceiling,
                config,
                run_id,
            )
            .await;
            publisher.close().await;
            let published = result?;
            eprintln!("resumed run {run_id}: published {published} job(s)");
            vec![run_id]
        }
        None if args.incremental => {
            let mut runs = Vec::with_capacity(streams.len());
            for stream in &streams {
                let result = syncfleet_producer::start_incremental_run(
                    &source,
                    &destination,
                    &publisher,
                    &ceiling,
                    stream,
                    config.broker.consumer_timeout,
                )
                .await;
                let plan = match result {
                    Ok(plan) => plan,
                    Err(syncfleet_producer::PlanError::Going(going)) => {
                        eprintln!("{going}: no incremental run of it now");
                        refused.push(going.stream);
                        continue;
                    }
                    Err(e) => {
                        publisher.close().await;
                        // The runs already started go on: say which.
                        for run_id in &runs {
                            println!("{run_id}");
                        }
                        return Err(e.into());
                    }
                };
                tracing::info!("{plan}");
                runs.push(plan.run_id);
            }
            publisher.close().await;
            runs
        }
        None => {
            let result = syncfleet_producer::start_run(
                &source,
                &destination,
                &publisher,
                &ceiling,
                &streams,
                config.broker.consumer_timeout,
            )
            .await;
            publisher.close().await;
            let plan = result?;
            tracing::info!("{plan}");
            vec![plan.run_id]
        }
    };
    for run_id in &run_ids {
        println!("{run_id}");
    }
    let refused = match refused.is_empty() {
        true => None,
        false => Some(CliError::Busy(format!(
            "refused for now, another run still going: {}",
            refused.join(", ")
        ))),
    };
    if !args.wait {
        return refused.map_or(Ok(ExitCode::SUCCESS), Err);
    }
    // Every run is waited for, within one timeout for all (an incremental
    // sync starts one run per stream). A failed run decides the exit code
    // before one still going: it is the news.
    let until = Instant::now() + args.timeout;
    let (mut failed, mut going) = (false, None);
    for run_id in run_ids {
        let left = until.saturating_duration_since(Instant::now());
        match status::wait_for_run(&destination, run_id, left, true).await {
            Ok(run) => failed |= run.status != "succeeded",
            Err(e @ CliError::TimedOut(_)) => going = Some(e),
            Err(e) => return Err(e),
        }
    }
    match (failed, going) {
        (true, going) => {
            if let Some(e) = going {
                eprintln!("{e}");
            }
            Ok(crate::error::found_wrong())
        }
        (false, Some(e)) => Err(e),
        (false, None) => refused.map_or(Ok(ExitCode::SUCCESS), Err),
    }
}
