//! Turns SIGINT/SIGTERM into the shared shutdown signal.

use syncfleet_core::shutdown::Shutdown;
use tokio::signal::unix::{SignalKind, signal};

/// Triggers `shutdown` on the first SIGINT or SIGTERM; exits the process at
/// once on the second, for an operator who does not want to wait.
pub fn install(shutdown: Shutdown) -> std::io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        let mut received = 0;
        loop {
            tokio::select! {
                _ = term.recv() => {},
                _ = int.recv() => {},
            }
            received += 1;
            if received == 1 {
                tracing::info!("stopping: finishing jobs in flight (signal again to exit now)");
                shutdown.trigger();
            } else {
                tracing::warn!("second signal: exiting now; unacked jobs will be redelivered");
                std::process::exit(130);
            }
        }
    });
    Ok(())
}
