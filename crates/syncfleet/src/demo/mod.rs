//! `syncfleet demo`: the seed's "sync all tabs", done by the fleet.
//!
//! Creates a seed-shaped app database (six tables) and an empty reporting
//! database, writes a config with the five streams of the seed's batch-size
//! table, starts workers in this process, runs a full sync through RabbitMQ,
//! verifies every stream and prints a summary.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use syncfleet_broker::{Publisher, Topology};
use syncfleet_core::Config;
use syncfleet_core::ident;
use syncfleet_core::shutdown::Shutdown;
use syncfleet_db::ceiling::Ceiling;
use syncfleet_db::{Pool, Role, control};
use tokio::task::JoinSet;

use crate::error::CliError;
use crate::status::wait_for_run;
use crate::verify;

const SCHEMA: &str = include_str!("seed.sql");
const DATA: &str = include_str!("data.sql");

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Users to create; the other tables are proportional (3x quiz responses,
    /// 5x engagement logs, 4x chat messages, 2x course progress)
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    users: u32,
    /// Worker tasks started in this process
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    workers: u16,
    /// Jobs each worker runs at once
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=1000))]
    concurrency: u16,
    /// PostgreSQL server URL to create the demo databases on
    #[arg(
        long,
        env = "SYNCFLEET_DEMO_PG_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres",
        hide_env_values = true
    )]
    pg_url: String,
    /// RabbitMQ URL
    #[arg(
        long,
        env = "SYNCFLEET_DEMO_AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        hide_env_values = true
    )]
    amqp_url: String,
    /// Name prefix for the demo databases and broker objects
    #[arg(long, default_value = "syncfleet_demo")]
    name: String,
    /// Where to write the demo's config file
    #[arg(long, default_value = "target/syncfleet-demo.toml")]
    write_config: PathBuf,
}

/// The five streams of the seed's table: (stream, source, batch size).
fn config_text(args: &Args, app_url: &str, reporting_url: &str) -> String {
    format!(
        r#"# Written by `syncfleet demo`: the seed's five reporting tabs.
[source]
url = "{app_url}"
max_connections = 4

[destination]
url = "{reporting_url}"
max_connections = 8

[broker]
url = "{amqp}"
prefix = "{prefix}"

[worker]
concurrency = {concurrency}

# User profiles joined with the users' names and emails, as the seed's bulk
# lookup did: one query per batch instead of one per user.
[[stream]]
name = "user_profiles"
query = """
SELECT p.id, p.user_id, u.first_name, u.last_name, u.email, u.role,
       p.bio, p.timezone, p.interests, p.settings, p.updated_at
FROM user_profiles p JOIN users u ON u.id = p.user_id"""
key = ["id"]
batch_size = 10
destination_table = "user_profiles_tab"

[[stream]]
name = "quiz_responses"
table = "quiz_responses"
batch_size = 50
destination_table = "quiz_responses_tab"

[[stream]]
name = "engagement_logs"
table = "engagement_logs"
batch_size = 25
destination_table = "engagement_logs_tab"

[[stream]]
name = "chat_logs"
table = "chat_logs"
batch_size = 50
destination_table = "chat_logs_tab"

[[stream]]
name = "course_progress"
table = "course_progress"
batch_size = 25
destination_table = "course_progress_tab"
"#,
        amqp = args.amqp_url,
        prefix = args.name,
        concurrency = args.concurrency,
    )
}

/// `postgres://…/postgres` with another database name.
fn with_database(url: &str, database: &str) -> Result<String, CliError> {
    let query = url.find('?').map(|i| &url[i..]).unwrap_or("");
    let base = &url[..url.len() - query.len()];
    let slash = base
        .find("://")
        .and_then(|s| base[s + 3..].find('/').map(|i| s + 3 + i))
        .ok_or_else(|| {
            CliError::Usage(format!(
                "--pg-url: expected postgres://host/db, got {}",
                syncfleet_core::secret::redact(url)
            ))
        })?;
    Ok(format!("{}/{database}{query}", &base[..slash]))
}

pub async fn run(args: Args) -> Result<ExitCode, CliError> {
    // It names databases that are dropped and made anew, the broker prefix
    // and a line of the config file: checked before any of them.
    let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-');
    if args.name.is_empty() || args.name.len() > 50 || !args.name.chars().all(plain) {
        return Err(CliError::Usage(format!(
            "--name: expected 1-50 characters from [A-Za-z0-9_-], got {:?}",
            args.name
        )));
    }
    let app_db = format!("{}_app", args.name);
    let reporting_db = format!("{}_reporting", args.name);
    let app_url = with_database(&args.pg_url, &app_db)?;
    let reporting_url = with_database(&args.pg_url, &reporting_db)?;

    println!("syncfleet demo: {} users", args.users);
    let t = Instant::now();
    recreate_databases(&args.pg_url, &[&app_db, &reporting_db]).await?;
    seed(&app_url, args.users).await?;
    println!(
        "  created {app_db} (seeded in {:.1}s) and an empty {reporting_db}",
        t.elapsed().as_secs_f64()
    );

    let text = config_text(&args, &app_url, &reporting_url);
    if let Some(dir) = args.write_config.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.write_config, &text)?;
    let config = Arc::new(Config::load(&args.write_config)?);
    println!("  config: {}", args.write_config.display());

    let destination = Pool::connect(Role::Destination, &config.destination).await?;
    control::migrate(&mut **destination.get().await?).await?;
    let source = Pool::connect(Role::Source, &config.source).await?;

    // A fresh broker topology, so leftovers of an earlier demo cannot mix in.
    let connection = syncfleet_broker::connect(&config.broker, "demo").await?;
    let channel = connection
        .create_channel()
        .await
        .map_err(syncfleet_broker::BrokerError::from)?;
    Topology::new(&config.broker.prefix)
        .delete(&channel, config.jobs.retry.max_attempts)
        .await?;
    let _ = connection.close(200, "reset".into()).await;
    let publisher = Publisher::connect(&config.broker, "demo").await?;

    let shutdown = Shutdown::new();
    let mut workers = JoinSet::new();
    for _ in 0..args.workers {
        workers.spawn(syncfleet_worker::run(config.clone(), shutdown.signal()));
    }
    println!(
        "  started {} workers x {} concurrent jobs",
        args.workers, args.concurrency
    );

    let started = Instant::now();
    let streams = config.select_streams(&[])?;
    let ceiling = Ceiling::new(&config);
    let result = async {
        let plan = syncfleet_producer::start_run(
            &source,
            &destination,
            &publisher,
            &ceiling,
            &streams,
            config.broker.consumer_timeout,
        )
        .await?;
        println!("  {plan}");
        wait_for_run(&destination, plan.run_id, Duration::from_secs(3600), true).await
    }
    .await;
    let elapsed = started.elapsed();
    shutdown.trigger();
    while let Some(done) = workers.join_next().await {
        match done {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("worker failed: {e}"),
            Err(e) => eprintln!("worker task failed: {e}"),
        }
    }
    publisher.close().await;
    let run = result?;
    if run.status != "succeeded" {
        return Err(CliError::Failed(format!(
            "run {} {}: {}",
            run.id,
            run.status,
            run.error.unwrap_or_default()
        )));
    }

    let mut reports = Vec::new();
    for stream in &streams {
        reports.push(verify::compare(&source, &destination, &ceiling, stream, 10_000).await?);
    }
    let client = destination.get().await?;
    let per_stream = client
        .query(
            "SELECT b.stream, count(*), coalesce(sum(b.rows_copied), 0)::int8, \
                    extract(epoch FROM max(b.finished_at) - min(b.started_at))::float8 \
             FROM syncfleet.batches b WHERE b.run_id = $1 GROUP BY b.stream",
            &[&run.id],
        )
        .await?;
    println!(
        "\n{:<18} {:>9} {:>8} {:>9} {:>10}  verified",
        "stream", "rows", "batches", "seconds", "rows/s"
    );
    let mut all_ok = true;
    for stream in &streams {
        let report = reports
            .iter()
            .find(|r| r.stream == stream.name)
            .expect("one report per stream");
        let row = per_stream
            .iter()
            .find(|r| r.get::<_, String>(0) == stream.name);
        let (batches, rows, secs) = row
            .map(|r| (r.get::<_, i64>(1), r.get::<_, i64>(2), r.get::<_, f64>(3)))
            .unwrap_or((0, 0, 0.0));
        all_ok &= report.matches();
        println!(
            "{:<18} {:>9} {:>8} {:>9.2} {:>10.0}  {}",
            stream.name,
            rows,
            batches,
            secs,
            rows as f64 / secs.max(0.001),
            if report.matches() { "yes" } else { "NO" }
        );
    }
    println!(
        "\nrun {} {} in {:.1}s; inspect it with: syncfleet --config {} status {}",
        run.id,
        run.status,
        elapsed.as_secs_f64(),
        args.write_config.display(),
        run.id
    );
    if !all_ok {
        verify::print_reports(&reports);
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

async fn admin(url: &str) -> Result<tokio_postgres::Client, CliError> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .map_err(|e| {
            CliError::Failed(format!(
                "cannot connect to PostgreSQL at {}: {}",
                syncfleet_core::secret::redact(url),
                syncfleet_db::error::describe(&e)
            ))
        })?;
    tokio::spawn(connection);
    Ok(client)
}

async fn recreate_databases(url: &str, names: &[&str]) -> Result<(), CliError> {
    let client = admin(url).await?;
    for name in names {
        let name = ident::quote(name);
        client
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await?;
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await?;
    }
    Ok(())
}

async fn seed(url: &str, users: u32) -> Result<(), CliError> {
    let client = admin(url).await?;
    client.batch_execute(SCHEMA).await?;
    let users = users as i32;
    for statement in DATA.split(";\n").map(str::trim).filter(|s| !s.is_empty()) {
        if statement.contains("$1") {
            client
                .execute(&statement.replace("$1", "$1::int"), &[&users])
                .await?;
        } else {
            client.batch_execute(statement).await?;
        }
    }
    Ok(())
}
