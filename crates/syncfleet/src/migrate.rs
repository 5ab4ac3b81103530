//! `syncfleet migrate`

use std::process::ExitCode;

use syncfleet_core::Config;
use syncfleet_db::{Pool, Role, control};

use crate::error::CliError;

pub async fn run(config: &Config) -> Result<ExitCode, CliError> {
    let pool = Pool::connect(Role::Destination, &config.destination).await?;
    let applied = control::migrate(&mut **pool.get().await?).await?;
    if applied.is_empty() {
        println!(
            "control schema is up to date (version {})",
            control::SCHEMA_VERSION
        );
    } else {
        println!(
            "control schema migrated to version {}",
            control::SCHEMA_VERSION
        );
    }
    Ok(ExitCode::SUCCESS)
}
