//! When to compare a range's fingerprints before copying it.
//!
//! A re-sync mostly meets ranges the destination already holds: comparing
//! a fingerprint of the range on both sides ([`syncfleet_db::sql::fingerprint`])
//! costs each database about half a `COPY` of the range, where staging and
//! merging it costs the destination 10–15 times that. But when the rows
//! did change, the comparison is spent for nothing, so a stream whose
//! recent comparisons all differed compares only now and then, until one
//! matches again.

use std::collections::HashMap;
use std::sync::Mutex;

/// Differing comparisons in a row before a stream compares less often.
const MISSES_TO_BACK_OFF: u32 = 3;
/// While backed off, one range in this many is compared: enough to notice
/// when a stream's ranges start matching again, at an eighth of the cost.
const COMPARE_ONE_IN: u32 = 8;

/// Per stream, in one worker process.
#[derive(Default)]
pub struct Odds {
    streams: Mutex<HashMap<String, Stream>>,
}

#[derive(Default)]
struct Stream {
    misses: u32,
    skipped: u32,
}

impl Odds {
    /// Whether the next range of `stream` is worth comparing first.
    pub fn compare(&self, stream: &str) -> bool {
        let mut streams = self.streams.lock().expect("odds");
        let Some(s) = streams.get_mut(stream) else {
            return true;
        };
        if s.misses < MISSES_TO_BACK_OFF {
            return true;
        }
        s.skipped += 1;
        if s.skipped < COMPARE_ONE_IN {
            return false;
        }
        s.skipped = 0;
        true
    }

    /// Records what a comparison found.
    pub fn record(&self, stream: &str, unchanged: bool) {
        let mut streams = self.streams.lock().expect("odds");
        let s = streams.entry(stream.to_string()).or_default();
        s.misses = match unchanged {
            true => 0,
            false => s.misses.saturating_add(1),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_whose_ranges_keep_changing_compares_one_range_in_eight() {
        let odds = Odds::default();
        let compared = |n: usize| {
            (0..n)
                .filter(|_| {
                    let c = odds.compare("s");
                    if c {
                        odds.record("s", false);
                    }
                    c
                })
                .count()
        };
        // The first three differ; from then on one in eight is compared.
        assert_eq!(compared(3), 3);
        assert_eq!(compared(80), 10);
        // Another stream is not affected.
        assert!(odds.compare("t"));
    }

    #[test]
    fn one_match_brings_back_comparing_every_range() {
        let odds = Odds::default();
        for _ in 0..5 {
            odds.record("s", false);
        }
        let until_compared = (1..=COMPARE_ONE_IN).find(|_| odds.compare("s"));
        assert_eq!(until_compared, Some(COMPARE_ONE_IN));
        odds.record("s", true);
        assert!((0..10).all(|_| odds.compare("s")));
    }
}
