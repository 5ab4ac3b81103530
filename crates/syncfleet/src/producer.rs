//! `syncfleet producer`

use std::process::ExitCode;
use std::sync::Arc;

use syncfleet_core::Config;
use syncfleet_core::shutdown::Shutdown;
use syncfleet_producer::service::{self, Counters};

use crate::error::CliError;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where to serve /metrics, /healthz and /readyz
    #[arg(long, default_value = "0.0.0.0:9464")]
    metrics_addr: std::net::SocketAddr,
}

pub async fn run(config: Arc<Config>, args: Args) -> Result<ExitCode, CliError> {
    config.check_deadlines()?;
    let shutdown = Shutdown::new();
    crate::signals::install(shutdown.clone())?;
    crate::serve::start(args.metrics_addr, shutdown.signal()).await;
    service::run(config, Arc::new(Counters::default()), shutdown.signal()).await?;
    Ok(ExitCode::SUCCESS)
}
