//! The `syncfleet` command: wires the producer, the worker and the database
//! and broker crates into one binary.
//!
//! - `migrate`, `sync`, `worker`, `producer`, `status`, `verify`,
//!   `dead-letters`, `demo`: one module each under this crate, named after
//!   the command.
//! - [`error`]: every failure ends here and picks the exit code: 2 for bad
//!   usage or config, 3 for data found wrong, 4 for a wait that ran out,
//!   5 for a run refused while another of its stream goes on, 1 for
//!   anything else.
//! - [`progress`]: a run's live progress, a bar per stream; [`serve`]: `/metrics`, `/healthz` and
//!   `/readyz` of the long-running commands.
//! - [`signals`]: SIGINT/SIGTERM into the shared shutdown signal (a second
//!   one exits at once, with 130).

mod dead_letters;
mod demo;
mod error;
mod migrate;
mod producer;
mod progress;
mod serve;
mod signals;
mod status;
mod sync;
mod verify;
mod worker;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use syncfleet_core::Config;
use syncfleet_core::config;

use crate::error::CliError;

/// syncfleet: copies PostgreSQL tables into a reporting database through a
/// RabbitMQ-driven fleet of workers.
#[derive(Debug, Parser)]
#[command(name = "syncfleet", version, about, long_about = None)]
struct Cli {
    /// Config file [default: $SYNCFLEET_CONFIG, else ./syncfleet.toml]
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create or upgrade syncfleet's control schema in the destination (idempotent)
    Migrate,
    /// Plan a sync run (full, --incremental, or --resume) and publish its jobs; prints the run id(s)
    Sync(sync::Args),
    /// Consume and execute jobs until stopped (SIGINT/SIGTERM drains, a second signal exits)
    Worker(worker::Args),
    /// Run syncs on a schedule and turn upstream change events into jobs, until stopped
    /// (replicas elect one leader)
    Producer(producer::Args),
    /// Show runs, per-stream progress and queue depth
    Status(status::Args),
    /// Compare source and destination per key range (row count and checksum); exit 3 on any difference
    Verify(verify::Args),
    /// List, replay or purge jobs in the dead-letter queue
    #[command(name = "dead-letters")]
    DeadLetters(dead_letters::Args),
    /// Create a seed-shaped app database, sync it with in-process workers, verify, and summarise
    Demo(demo::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            e.exit_code()
        }
    }
}

async fn run(cli: Cli) -> Result<ExitCode, CliError> {
    if let Command::Demo(args) = cli.command {
        return demo::run(args).await;
    }
    let config = Arc::new(Config::load(&config::default_path(cli.config.as_deref()))?);
    check_urls(&config, &cli.command)?;
    match cli.command {
        Command::Migrate => migrate::run(&config).await,
        Command::Sync(args) => sync::run(&config, args).await,
        Command::Worker(args) => worker::run(config, args).await,
        Command::Producer(args) => producer::run(config, args).await,
        Command::Status(args) => status::run(&config, args).await,
        Command::Verify(args) => verify::run(&config, args).await,
        Command::DeadLetters(args) => dead_letters::run(&config, args).await,
        Command::Demo(_) => unreachable!("handled above"),
    }
}

/// Reads every URL the command uses as its driver will, before it starts:
/// a bad port, an unknown `sslmode` or an unreadable `sslrootcert` is bad
/// config (exit 2), named by its field, rather than a failure to connect
/// (exit 1). The URLs it does not use are not its business (`status` runs
/// where the source's CA file may not be).
fn check_urls(config: &Config, command: &Command) -> Result<(), CliError> {
    let (source, broker) = match command {
        Command::Migrate => (false, false),
        Command::Status(_) | Command::DeadLetters(_) => (false, true),
        Command::Verify(_) => (true, false),
        _ => (true, true),
    };
    // Named as the config names them: by their variable when it is set.
    let field = |name: &str, env: &str| match std::env::var(env) {
        Ok(v) if !v.trim().is_empty() => format!("{name} (from {env})"),
        _ => name.to_string(),
    };
    let bad = |field: String, message: String| {
        CliError::from(config::ConfigError::Invalid {
            origin: config.origin.clone(),
            field,
            message: syncfleet_core::secret::redact(&message),
        })
    };
    let databases = [
        (
            field("source.url", config::ENV_SOURCE_URL),
            Some(&config.source.url).filter(|_| source),
        ),
        (
            field("destination.url", config::ENV_DESTINATION_URL),
            Some(&config.destination.url),
        ),
        (
            "source.replica_url".into(),
            config.reads.replica_url.as_ref().filter(|_| source),
        ),
    ];
    for (name, url) in databases {
        if let Some(url) = url {
            syncfleet_db::tls::config(url.expose()).map_err(|e| bad(name, e))?;
        }
    }
    match broker {
        true => syncfleet_broker::check_url(config.broker.url.expose())
            .map_err(|e| bad(field("broker.url", config::ENV_AMQP_URL), e)),
        false => Ok(()),
    }
}

/// Logs go to stderr (stdout is for results). `RUST_LOG` overrides.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(
            // deadpool logs every broken connection; syncfleet logs an
            // outage once, so keep deadpool's to errors.
            "warn,deadpool=error,lapin=off,syncfleet=info,syncfleet_producer=info,syncfleet_worker=info,syncfleet_db=info",
        )
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
