//! Human-friendly durations in config: `"500us"`, `"250ms"`, `"60s"`, `"5m"`, `"1h"`,
//! `"1d"`. A bare number is seconds, matching the seed's `*_SECONDS` variables.

use std::time::Duration;

/// Parses a duration, or says what form was expected.
pub fn parse(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let expected = || format!("expected a duration like \"250ms\", \"60s\", \"5m\", got {text:?}");
    let n: u64 = num.parse().map_err(|_| expected())?;
    let per_unit_us = match unit.trim() {
        "us" => 1,
        "ms" => 1_000,
        "" | "s" => 1_000_000,
        "m" => 60_000_000,
        "h" => 3_600_000_000,
        "d" => 86_400_000_000,
        _ => return Err(expected()),
    };
    n.checked_mul(per_unit_us)
        .map(Duration::from_micros)
        .ok_or_else(expected)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_rejects_garbage() {
        assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse("500us"), Ok(Duration::from_micros(500)));
        assert_eq!(parse("60s"), Ok(Duration::from_secs(60)));
        assert_eq!(parse("300"), Ok(Duration::from_secs(300)));
        assert_eq!(parse("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse("1d"), Ok(Duration::from_secs(86_400)));
        assert!(parse("soon").is_err());
        assert!(parse("-1s").is_err());
        assert!(parse("5 years").is_err());
    }
}
