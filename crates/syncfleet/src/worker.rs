//! `syncfleet worker`

use std::process::ExitCode;
use std::sync::Arc;

use syncfleet_core::Config;
use syncfleet_core::shutdown::Shutdown;

use crate::error::CliError;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Jobs (or groups of small jobs) executed at once [default: worker.concurrency, 4]
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1000))]
    concurrency: Option<u16>,
    /// Where to serve /metrics, /healthz and /readyz
    #[arg(long, default_value = "0.0.0.0:9464")]
    metrics_addr: std::net::SocketAddr,
}

pub async fn run(config: Arc<Config>, args: Args) -> Result<ExitCode, CliError> {
    let shutdown = Shutdown::new();
    crate::signals::install(shutdown.clone())?;
    crate::serve::start(args.metrics_addr, shutdown.signal()).await;
    let mut config = (*config).clone();
    if let Some(n) = args.concurrency {
        config.worker.concurrency = n;
    }
    syncfleet_worker::run(Arc::new(config), shutdown.signal()).await?;
    Ok(ExitCode::SUCCESS)
}
