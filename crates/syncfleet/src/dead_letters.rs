//! `syncfleet dead-letters list | replay [ID|--all] | purge`

use std::process::ExitCode;

use lapin::message::BasicGetMessage;
use lapin::options::{BasicAckOptions, BasicGetOptions, QueuePurgeOptions};
use lapin::types::FieldTable;
use syncfleet_broker::headers::UNROUTABLE_EVENT;
use syncfleet_broker::{BrokerError, DeadLetter, Publisher, Topology};
use syncfleet_core::Config;
use syncfleet_core::job::{Job, NO_RUN};
use syncfleet_db::{Pool, Role, control};

use crate::error::CliError;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    action: Action,
}

#[derive(Debug, clap::Subcommand)]
enum Action {
    /// Show the dead letters: job id, reason, attempts, when, and the error
    List,
    /// Publish dead jobs to the work queue again with a fresh attempt count
    /// (their batches and runs are re-opened), and unroutable events to the
    /// events exchange
    Replay {
        /// The job id to replay (`RUN:STREAM:BATCH`, as `list` shows it)
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<String>,
        /// Replay every dead letter that is a job or an unroutable event
        #[arg(long)]
        all: bool,
    },
    /// Delete every dead letter
    Purge,
}

pub async fn run(config: &Config, args: Args) -> Result<ExitCode, CliError> {
    let topology = Topology::new(&config.broker.prefix);
    let connection = syncfleet_broker::connect(&config.broker, "dead-letters").await?;
    let channel = connection
        .create_channel()
        .await
        .map_err(BrokerError::from)?;
    topology.declare(&channel).await?;
    let (depth, _) = topology.depth(&channel, &topology.dead_queue()).await?;
    let mut acked = 0;
    let result = match args.action {
        Action::List => list(&channel, &topology, depth).await,
        Action::Purge => {
            let n = channel
                .queue_purge(topology.dead_queue().into(), QueuePurgeOptions::default())
                .await
                .map_err(BrokerError::from)?;
            println!("purged {n} dead letter(s)");
            acked = n;
            Ok(ExitCode::SUCCESS)
        }
        Action::Replay { id, all } => {
            let wanted = (id.as_deref(), all);
            replay(config, &channel, &topology, depth, wanted, &mut acked).await
        }
    };
    // Closing the channel returns every message fetched and not acked.
    let _ = channel.close(200, "done".into()).await;
    back_in_queue(&connection, &topology, depth.saturating_sub(acked)).await;
    let _ = connection.close(200, "done".into()).await;
    result
}

/// How long a command waits for the letters it fetched to be back.
const RETURN_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// A quorum queue takes back the messages of a closed channel after the
/// close completes: waits (a few seconds at most) until the dead letters
/// number at least `expected` again, so that a command run right after this
/// one (`list`, then `replay`) finds every letter this one left.
async fn back_in_queue(connection: &lapin::Connection, topology: &Topology, expected: u32) {
    let Ok(channel) = connection.create_channel().await else {
        return;
    };
    let deadline = tokio::time::Instant::now() + RETURN_WAIT;
    while tokio::time::Instant::now() < deadline {
        match topology.depth(&channel, &topology.dead_queue()).await {
            Ok((n, _)) if n < expected => {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await
            }
            _ => break,
        }
    }
    let _ = channel.close(200, "done".into()).await;
}

/// Fetches every dead letter without acking it. Bounded by the queue's
/// depth when we started, so new arrivals cannot keep us looping.
async fn fetch_all(
    channel: &lapin::Channel,
    topology: &Topology,
    depth: u32,
) -> Result<Vec<BasicGetMessage>, CliError> {
    let mut messages = Vec::new();
    for _ in 0..depth {
        match channel
            .basic_get(
                topology.dead_queue().into(),
                BasicGetOptions { no_ack: false },
            )
            .await
            .map_err(BrokerError::from)?
        {
            Some(m) => messages.push(m),
            None => break,
        }
    }
    Ok(messages)
}

async fn list(
    channel: &lapin::Channel,
    topology: &Topology,
    depth: u32,
) -> Result<ExitCode, CliError> {
    let messages = fetch_all(channel, topology, depth).await?;
    if messages.is_empty() {
        println!("no dead letters in {}", topology.dead_queue());
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<28} {:<20} {:>8} {:<20} {:<20} error",
        "id", "reason", "attempts", "first attempt", "dead-lettered"
    );
    for m in &messages {
        let d = DeadLetter::from_properties(&m.delivery.properties);
        println!(
            "{:<28} {:<20} {:>8} {:<20} {:<20} {}",
            d.id,
            d.reason,
            d.attempts,
            format_time(d.first_attempt_at_ms),
            format_time(d.dead_lettered_at_ms),
            d.error
        );
    }
    println!("{} dead letter(s)", messages.len());
    Ok(ExitCode::SUCCESS)
}

/// Replays the dead letters `(id, all)` names, counting in `acked` those
/// taken out of the queue.
async fn replay(
    config: &Config,
    channel: &lapin::Channel,
    topology: &Topology,
    depth: u32,
    (id, all): (Option<&str>, bool),
    acked: &mut u32,
) -> Result<ExitCode, CliError> {
    let destination = Pool::connect(Role::Destination, &config.destination).await?;
    let publisher = Publisher::connect(&config.broker, "replay").await?;
    let (mut replayed, mut events, mut kept, mut skipped) = (0, 0, 0, 0);
    for m in fetch_all(channel, topology, depth).await? {
        let dead = DeadLetter::from_properties(&m.delivery.properties);
        if !all && Some(dead.id.as_str()) != id {
            continue;
        }
        // An event that came while its stream could not take events goes
        // back to the producer, which routes it as it would a new one.
        if dead.reason == UNROUTABLE_EVENT {
            publisher.publish_event(&m.delivery.data, &dead.id).await?;
            m.delivery
                .ack(BasicAckOptions::default())
                .await
                .map_err(BrokerError::from)?;
            println!("replayed event {}", dead.id);
            *acked += 1;
            events += 1;
            continue;
        }
        let job = match Job::decode(&m.delivery.data) {
            Ok(job) => job,
            Err(e) => {
                println!("skipping {}: {e}", dead.id);
                skipped += 1;
                continue;
            }
        };
        // Re-open first: a worker may finish the replayed job at once. An
        // event job (of no run) has nothing to re-open, and its write lock
        // orders it against any run's jobs.
        let reopened = match job.run_id {
            NO_RUN => Ok(0),
            run_id => {
                control::reopen(
                    &mut **destination.get().await?,
                    &config.broker.prefix,
                    run_id,
                    Some((&job.stream, job.batch)),
                    config.broker.consumer_timeout,
                )
                .await?
            }
        };
        if let Err(going) = reopened {
            // Left unacked, it goes back to the dead letters.
            println!("kept {}: {going}; replay it once that run ends", job.id());
            kept += 1;
            continue;
        }
        publisher
            .publish_work(&m.delivery.data, &job.id(), FieldTable::default())
            .await?;
        m.delivery
            .ack(BasicAckOptions::default())
            .await
            .map_err(BrokerError::from)?;
        println!("replayed {}", job.id());
        *acked += 1;
        replayed += 1;
    }
    publisher.close().await;
    if let (0, 0, 0, Some(id)) = (replayed, events, kept, id) {
        return Err(CliError::Usage(match skipped {
            0 => format!("no dead letter with id {id}"),
            _ => format!(
                "dead letter {id} cannot be replayed: it is not a job (see above); \
                 `dead-letters purge` deletes it once read"
            ),
        }));
    }
    println!("{replayed} job(s) replayed");
    if events > 0 {
        println!("{events} event(s) replayed");
    }
    match kept {
        0 => Ok(ExitCode::SUCCESS),
        n => Err(CliError::Busy(format!(
            "{n} job(s) kept in the dead letters: their streams have another run still going"
        ))),
    }
}

/// Unix milliseconds as `YYYY-MM-DD HH:MM:SS` (UTC).
fn format_time(ms: Option<i64>) -> String {
    let Some(ms) = ms else { return "-".into() };
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil-from-days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::format_time;

    #[test]
    fn formats_unix_milliseconds_as_utc() {
        assert_eq!(format_time(Some(0)), "1970-01-01 00:00:00");
        assert_eq!(format_time(Some(1_709_251_199_000)), "2024-02-29 23:59:59");
        assert_eq!(format_time(None), "-");
    }
}
