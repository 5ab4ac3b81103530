//! `syncfleet producer`

use std::process::ExitCode;
use std::sync::Arc;

use syncfleet_core::Config;
use syncfleet_core::shutdown::Shutdown;
use syncfleet_producer::service::{self, Counters};

use crate::error::CliError;

pub async fn run(config: Arc<Config>) -> Result<ExitCode, CliError> {
    let shutdown = Shutdown::new();
    crate::signals::install(shutdown.clone())?;
    service::run(config, Arc::new(Counters::default()), shutdown.signal()).await?;
    Ok(ExitCode::SUCCESS)
}
