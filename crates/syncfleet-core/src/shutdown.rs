//! The one shutdown pattern every long-running task uses.
//!
//! A [`Shutdown`] is held by whoever decides to stop (the signal handler, a
//! test, the demo); each task holds a [`ShutdownSignal`] and selects on
//! [`ShutdownSignal::wait`] beside its real work. Cloning a signal is cheap,
//! and a signal created after the trigger still sees it.

use tokio::sync::watch;

/// The trigger side.
#[derive(Debug, Clone)]
pub struct Shutdown(watch::Sender<bool>);

/// The listening side.
#[derive(Debug, Clone)]
pub struct ShutdownSignal(watch::Receiver<bool>);

impl Shutdown {
    pub fn new() -> Self {
        Self(watch::Sender::new(false))
    }

    /// Tells every signal to stop. Idempotent.
    pub fn trigger(&self) {
        self.0.send_replace(true);
    }

    pub fn signal(&self) -> ShutdownSignal {
        ShutdownSignal(self.0.subscribe())
    }
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl ShutdownSignal {
    pub fn is_triggered(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once shutdown is triggered (at once if it already was).
    pub async fn wait(&mut self) {
        // An error means every `Shutdown` is gone: nobody can trigger any
        // more, so treat it as a stop rather than waiting forever.
        let _ = self.0.wait_for(|stop| *stop).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn late_signals_see_an_earlier_trigger() {
        let s = Shutdown::new();
        let mut early = s.signal();
        assert!(!early.is_triggered());
        s.trigger();
        early.wait().await;
        let mut late = s.signal();
        assert!(late.is_triggered());
        late.wait().await;
    }
}
