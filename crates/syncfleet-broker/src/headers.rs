//! What a message carries besides the job.
//!
//! The job body never changes between attempts (its key range is the whole
//! job); the attempt number and failure history travel in headers, so a
//! replayed dead letter can be re-published with a fresh attempt count.

use std::time::{SystemTime, UNIX_EPOCH};

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, ShortString};

use crate::topology::text;

const ATTEMPT: &str = "x-syncfleet-attempt";
const FIRST_ATTEMPT_AT: &str = "x-syncfleet-first-attempt-at";
const ERROR: &str = "x-syncfleet-error";
const REASON: &str = "x-syncfleet-reason";
const DEAD_AT: &str = "x-syncfleet-dead-lettered-at";
const LOST_CONNECTIONS: &str = "x-syncfleet-lost-connections";
const SPLITS: &str = "x-syncfleet-splits";

/// The dead-letter reason of an upstream event that no stream could take
/// when it came (see the producer's event consumer): `dead-letters replay`
/// publishes such events again, unlike malformed ones.
pub const UNROUTABLE_EVENT: &str = "unroutable event";

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A work message's attempt number (1 for the first delivery), when its
/// first attempt happened, how many times a database connection broke
/// under it (counted apart from attempts: mostly outages, which use none),
/// and how many times the event job it is a part of was halved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    pub attempt: u32,
    pub first_attempt_at_ms: Option<i64>,
    pub lost_connections: u32,
    pub splits: u32,
}

impl Meta {
    pub fn first() -> Self {
        Self {
            attempt: 1,
            first_attempt_at_ms: None,
            lost_connections: 0,
            splits: 0,
        }
    }

    /// This meta for a half of its job.
    pub fn split(self) -> Self {
        Self {
            splits: self.splits.saturating_add(1),
            ..self
        }
    }

    /// This meta with one more connection lost under the job.
    pub fn lost_connection(self) -> Self {
        Self {
            lost_connections: self.lost_connections.saturating_add(1),
            ..self
        }
    }

    pub fn from_properties(properties: &BasicProperties) -> Self {
        let headers = properties.headers().as_ref();
        Self {
            attempt: headers
                .and_then(|h| int(h, ATTEMPT))
                .map(|a| a.clamp(1, u32::MAX as i64) as u32)
                .unwrap_or(1),
            first_attempt_at_ms: headers.and_then(|h| int(h, FIRST_ATTEMPT_AT)),
            lost_connections: headers
                .and_then(|h| int(h, LOST_CONNECTIONS))
                .map(|n| n.clamp(0, u32::MAX as i64) as u32)
                .unwrap_or(0),
            splits: headers
                .and_then(|h| int(h, SPLITS))
                .map(|n| n.clamp(0, u32::MAX as i64) as u32)
                .unwrap_or(0),
        }
    }

    /// This meta's headers, numbered `attempt`.
    fn headers(&self, attempt: u32, now_ms: i64) -> FieldTable {
        let mut h = FieldTable::default();
        h.insert(ATTEMPT.into(), AMQPValue::LongLongInt(attempt.into()));
        h.insert(
            FIRST_ATTEMPT_AT.into(),
            AMQPValue::LongLongInt(self.first_attempt_at_ms.unwrap_or(now_ms)),
        );
        h.insert(
            LOST_CONNECTIONS.into(),
            AMQPValue::LongLongInt(self.lost_connections.into()),
        );
        if self.splits > 0 {
            h.insert(SPLITS.into(), AMQPValue::LongLongInt(self.splits.into()));
        }
        h
    }

    /// Headers for the next attempt.
    pub fn next(&self, now_ms: i64) -> FieldTable {
        self.headers(self.attempt.saturating_add(1), now_ms)
    }

    /// Headers for the same attempt again.
    pub fn again(&self, now_ms: i64) -> FieldTable {
        self.headers(self.attempt, now_ms)
    }

    /// Headers for a dead letter: this meta plus why it died, the error
    /// [`clip`]ped.
    pub fn dead(&self, reason: &str, error: &str, now_ms: i64) -> FieldTable {
        let mut h = self.headers(self.attempt, now_ms);
        h.insert(REASON.into(), text(reason));
        h.insert(ERROR.into(), text(&clip(error)));
        h.insert(DEAD_AT.into(), AMQPValue::LongLongInt(now_ms));
        h
    }
}

/// The longest error text a dead letter carries, in bytes. The headers
/// travel in one frame the broker refuses past its `frame_max` (128 KiB by
/// default), closing the connection: an error that quotes an upstream
/// event's ids (any size) must not stop every publish behind it.
pub const MAX_ERROR: usize = 2048;

/// `error` cut to [`MAX_ERROR`] bytes (on a character boundary), saying so.
pub fn clip(error: &str) -> std::borrow::Cow<'_, str> {
    if error.len() <= MAX_ERROR {
        return error.into();
    }
    let mut end = MAX_ERROR;
    while !error.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes cut)", &error[..end], error.len() - end).into()
}

/// A message in the dead-letter queue, as `dead-letters list` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The job id (`run:stream:batch`), or `?` for a body that was no job.
    pub id: String,
    pub reason: String,
    pub error: String,
    pub attempts: u32,
    pub first_attempt_at_ms: Option<i64>,
    pub dead_lettered_at_ms: Option<i64>,
}

impl DeadLetter {
    /// Reads syncfleet's headers, or the broker's `x-death` for a message
    /// the broker dead-lettered itself (a poison message).
    pub fn from_properties(properties: &BasicProperties) -> Self {
        let empty = FieldTable::default();
        let h = properties.headers().as_ref().unwrap_or(&empty);
        let id = properties
            .message_id()
            .as_ref()
            .map(ShortString::to_string)
            .unwrap_or_else(|| "?".into());
        if let Some(reason) = string(h, REASON) {
            return Self {
                id,
                reason,
                error: string(h, ERROR).unwrap_or_default(),
                attempts: int(h, ATTEMPT).unwrap_or(1) as u32,
                first_attempt_at_ms: int(h, FIRST_ATTEMPT_AT),
                dead_lettered_at_ms: int(h, DEAD_AT),
            };
        }
        let broker_reason = string(h, "x-first-death-reason")
            .unwrap_or_else(|| "dead-lettered by the broker".into());
        let redeliveries = int(h, "x-delivery-count").unwrap_or(0);
        Self {
            id,
            error: format!(
                "the broker dead-lettered it ({broker_reason}) after {redeliveries} redeliveries: \
                 its worker never settled it (crashed or was killed each time)"
            ),
            reason: broker_reason,
            attempts: int(h, ATTEMPT).unwrap_or(1) as u32,
            first_attempt_at_ms: int(h, FIRST_ATTEMPT_AT),
            dead_lettered_at_ms: None,
        }
    }
}

fn int(h: &FieldTable, key: &str) -> Option<i64> {
    match h.inner().get(key)? {
        AMQPValue::LongLongInt(v) => Some(*v),
        AMQPValue::LongInt(v) => Some(*v as i64),
        AMQPValue::LongUInt(v) => Some(*v as i64),
        AMQPValue::ShortInt(v) => Some(*v as i64),
        AMQPValue::ShortUInt(v) => Some(*v as i64),
        AMQPValue::Timestamp(v) => i64::try_from(*v).ok()?.checked_mul(1000),
        _ => None,
    }
}

fn string(h: &FieldTable, key: &str) -> Option<String> {
    match h.inner().get(key)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempts_count_up_and_dead_letters_keep_their_history() {
        let first = Meta::first();
        let props = BasicProperties::default().with_headers(first.next(1_000));
        let second = Meta::from_properties(&props);
        assert_eq!(second.attempt, 2);
        assert_eq!(second.first_attempt_at_ms, Some(1_000));
        assert_eq!(second.lost_connections, 0);
        // A lost connection is counted apart, and kept across attempts.
        let lost = Meta::from_properties(
            &BasicProperties::default().with_headers(second.lost_connection().again(1_500)),
        );
        assert_eq!((lost.attempt, lost.lost_connections), (2, 1));
        let third =
            Meta::from_properties(&BasicProperties::default().with_headers(lost.next(2_000)));
        assert_eq!(third.lost_connections, 1);
        assert_eq!(
            third.first_attempt_at_ms,
            Some(1_000),
            "the first attempt time is kept"
        );
        let dead = BasicProperties::default()
            .with_headers(third.dead("attempts exhausted", "boom", 3_000))
            .with_message_id("1:s:2".into());
        let d = DeadLetter::from_properties(&dead);
        assert_eq!(d.id, "1:s:2");
        assert_eq!(d.attempts, 3);
        assert_eq!(d.error, "boom");
        assert_eq!(d.dead_lettered_at_ms, Some(3_000));
        assert_eq!(
            Meta::from_properties(&BasicProperties::default()),
            Meta::first()
        );
        // Halvings travel with the halves, and on to their retries.
        let half = Meta::from_properties(
            &BasicProperties::default().with_headers(third.split().split().again(4_000)),
        );
        assert_eq!((half.splits, half.attempt), (2, 3));
        let retried =
            Meta::from_properties(&BasicProperties::default().with_headers(half.next(5_000)));
        assert_eq!(retried.splits, 2);
    }

    #[test]
    fn a_timestamp_header_past_any_date_is_no_time() {
        let mut h = FieldTable::default();
        h.insert(FIRST_ATTEMPT_AT.into(), AMQPValue::Timestamp(u64::MAX / 10));
        let meta = Meta::from_properties(&BasicProperties::default().with_headers(h.clone()));
        assert_eq!(meta.first_attempt_at_ms, None);
        h.insert(FIRST_ATTEMPT_AT.into(), AMQPValue::Timestamp(1_700_000_000));
        let meta = Meta::from_properties(&BasicProperties::default().with_headers(h));
        assert_eq!(meta.first_attempt_at_ms, Some(1_700_000_000_000));
    }
}
