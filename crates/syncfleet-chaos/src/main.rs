//! `syncfleet-chaos`: the chaos harness as a command (`just chaos`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

/// Runs a full sync while killing workers, restarting the broker and
/// terminating database backends; exits 0 only if nothing was lost or doubled.
#[derive(Debug, Parser)]
struct Args {
    /// Rows in all, over three streams
    #[arg(long, default_value_t = 300_000)]
    rows: u64,
    /// Rows per batch
    #[arg(long, default_value_t = 100)]
    batch_size: u32,
    /// Worker processes
    #[arg(long, default_value_t = 3)]
    workers: usize,
    /// Seconds between worker kills
    #[arg(long, default_value_t = 3)]
    kill_every: u64,
    /// Give up after this many seconds
    #[arg(long, default_value_t = 900)]
    timeout: u64,
    /// The syncfleet binary [default: next to this one]
    #[arg(long)]
    syncfleet: Option<PathBuf>,
    /// PostgreSQL superuser URL
    #[arg(
        long,
        env = "SYNCFLEET_TEST_PG_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    pg_url: String,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let syncfleet = args.syncfleet.unwrap_or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(|d| d.join("syncfleet")))
            .unwrap_or_else(|| PathBuf::from("syncfleet"))
    });
    let options = syncfleet_chaos::Options {
        syncfleet,
        pg_url: args.pg_url,
        rows: args.rows,
        workers: args.workers,
        kill_every: Duration::from_secs(args.kill_every),
        terminate_at: 0.15,
        restart_at: 0.4,
        batch_size: args.batch_size,
        timeout: Duration::from_secs(args.timeout),
        name: format!("sfchaos_{}", std::process::id()),
    };
    let run = syncfleet_chaos::run(&options);
    let result = tokio::select! {
        r = run => r,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("chaos: interrupted; cleaning up");
            syncfleet_chaos::cleanup(&options).await;
            return ExitCode::from(130);
        }
    };
    match result {
        Ok(report) => {
            println!("{report}");
            if report.passed() {
                ExitCode::SUCCESS
            } else {
                eprintln!("chaos: FAILED");
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(1)
        }
    }
}
