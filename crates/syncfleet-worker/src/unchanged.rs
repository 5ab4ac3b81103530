//! When to compare a range's fingerprints before copying it.
//!
//! A re-sync mostly meets ranges the destination already holds: comparing
//! a fingerprint of the range on both sides ([`syncfleet_db::sql::fingerprint`])
//! costs each database about half a `COPY` of the range, where staging and
//! merging it costs the destination 10–15 times that. But when the rows
//! did change, the comparison is spent for nothing, so a stream whose
//! recent comparisons all differed compares only now and then, until one
//! matches again.
//!
//! The two fingerprints are taken at once while the stream's ranges are
//! found holding rows on the destination, so that each side's paced query
//! runs in the time of one; otherwise the destination's comes first, and
//! an initial load (nothing there yet) spends nothing on the source.

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
    /// The last comparison found rows on the destination.
    held_rows: bool,
}

/// Whether and how to compare a range's fingerprints before copying it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compare {
    /// Copy without comparing.
    No,
    /// The destination's fingerprint, then the source's if it holds rows.
    DestinationFirst,
    /// Both fingerprints at once.
    AtOnce,
}

/// What a comparison found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// No rows on the destination: nothing to compare.
    Empty,
    Unchanged,
    Changed,
}

impl Odds {
    /// Whether and how the next range of `stream` is compared first.
    pub fn compare(&self, stream: &str) -> Compare {
        let mut streams = self.streams.lock().expect("odds");
        let Some(s) = streams.get_mut(stream) else {
            return Compare::DestinationFirst;
        };
        let how = match s.held_rows {
            true => Compare::AtOnce,
            false => Compare::DestinationFirst,
        };
        if s.misses < MISSES_TO_BACK_OFF {
            return how;
        }
        s.skipped += 1;
        if s.skipped < COMPARE_ONE_IN {
            return Compare::No;
        }
        s.skipped = 0;
        how
    }

    /// Records what a comparison found.
    pub fn record(&self, stream: &str, found: Found) {
        let mut streams = self.streams.lock().expect("odds");
        let s = streams.entry(stream.to_string()).or_default();
        s.held_rows = found != Found::Empty;
        s.misses = match found {
            Found::Empty => s.misses,
            Found::Unchanged => 0,
            Found::Changed => s.misses.saturating_add(1),
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
                    let c = odds.compare("s") != Compare::No;
                    if c {
                        odds.record("s", Found::Changed);
                    }
                    c
                })
                .count()
        };
        // The first three differ; from then on one in eight is compared.
        assert_eq!(compared(3), 3);
        assert_eq!(compared(80), 10);
        // Another stream is not affected.
        assert_ne!(odds.compare("t"), Compare::No);
    }

    #[test]
    fn one_match_brings_back_comparing_every_range() {
        let odds = Odds::default();
        for _ in 0..5 {
            odds.record("s", Found::Changed);
        }
        let until_compared = (1..=COMPARE_ONE_IN).find(|_| odds.compare("s") != Compare::No);
        assert_eq!(until_compared, Some(COMPARE_ONE_IN));
        odds.record("s", Found::Unchanged);
        assert!((0..10).all(|_| odds.compare("s") == Compare::AtOnce));
    }

    #[test]
    fn both_sides_compare_at_once_only_while_the_destination_holds_rows() {
        let odds = Odds::default();
        // Not known yet, and an initial load: the destination first.
        assert_eq!(odds.compare("s"), Compare::DestinationFirst);
        odds.record("s", Found::Empty);
        assert_eq!(odds.compare("s"), Compare::DestinationFirst);
        odds.record("s", Found::Changed);
        assert_eq!(odds.compare("s"), Compare::AtOnce);
        odds.record("s", Found::Unchanged);
        assert_eq!(odds.compare("s"), Compare::AtOnce);
        // A range the destination has no rows in does not count as a miss.
        for _ in 0..5 {
            odds.record("s", Found::Empty);
        }
        assert_eq!(odds.compare("s"), Compare::DestinationFirst);
    }
}
