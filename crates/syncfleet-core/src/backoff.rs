//! Backoff arithmetic shared by the in-worker retries and the broker's
//! delayed retries: capped exponential growth with full jitter.
//!
//! Full jitter (a uniformly random delay between zero and the exponential
//! value) spreads a burst of failures, say every worker losing the database
//! at once, over the whole window instead of retrying in lockstep.

use std::time::Duration;

/// When to retry: after attempt `n` (1-based) wait up to
/// `min(initial · 2ⁿ⁻¹, max)`, at most `max_attempts` attempts in all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub initial: Duration,
    pub max: Duration,
    pub max_attempts: u32,
}

impl RetryPolicy {
    /// The ceiling of the delay after attempt `attempt` (1-based).
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32
            .checked_shl(attempt.saturating_sub(1))
            .unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// The delay after attempt `attempt`, with full jitter.
    pub fn delay(&self, attempt: u32) -> Duration {
        full_jitter(self.ceiling(attempt))
    }
}

/// A uniformly random duration in `[0, ceiling]`.
pub fn full_jitter(ceiling: Duration) -> Duration {
    let millis = ceiling.as_millis().min(u64::MAX as u128) as u64;
    Duration::from_millis(fastrand::u64(0..=millis))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_exponentially_up_to_the_cap_with_jitter_below_it() {
        let p = RetryPolicy {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(10),
            max_attempts: 5,
        };
        assert_eq!(p.ceiling(1), Duration::from_secs(1));
        assert_eq!(p.ceiling(2), Duration::from_secs(2));
        assert_eq!(p.ceiling(4), Duration::from_secs(8));
        assert_eq!(p.ceiling(5), Duration::from_secs(10));
        assert_eq!(p.ceiling(500), Duration::from_secs(10));
        let delays: Vec<Duration> = (0..200).map(|_| p.delay(3)).collect();
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(4)));
        assert!(
            delays.iter().any(|d| *d < Duration::from_secs(2)),
            "spread over the window"
        );
    }
}
