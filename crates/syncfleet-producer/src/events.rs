//! Upstream change events into selection jobs.
//!
//! Any service publishes JSON to the `<prefix>.events` topic exchange with
//! any routing key:
//!
//! ```json
//! {"table": "users", "op": "upsert", "ids": [42, 43]}
//! ```
//!
//! `op` is `upsert` or `delete`; `ids` are the table's ids, an array per
//! id for composite keys. The leader maps the table to every stream that
//! reads it (a `table =` stream by its key, a query stream through its
//! `[stream.events]` column), coalesces ids per stream for `event_window`
//! or `event_max_keys`, and publishes one selection job per stream and
//! chunk. Deletes and upserts make the same job, because a worker always
//! writes the source's current state: rows found are upserted, rows gone
//! are deleted. Events are acked only after their jobs are confirmed.
//! A malformed event goes to the dead-letter queue with the reason; events
//! for tables no stream reads are counted and dropped.
//!
//! One stream that cannot take events (its table is missing, its
//! `[stream.events]` column is not among its columns) stops no other: the
//! streams that can still take its tables' events do, and a copy of each
//! goes to the dead letters as unroutable, naming the stream and why, for
//! `dead-letters replay` to send back once it is fixed. A flush
//! that cannot publish keeps its events unacked and is tried again with
//! backoff, so a source or broker outage neither loses them nor spins.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::FieldTable;
use serde_json::Value;
use syncfleet_broker::headers::UNROUTABLE_EVENT;
use syncfleet_broker::{BrokerError, Meta, Publisher};
use syncfleet_core::Config;
use syncfleet_core::backoff::RetryPolicy;
use syncfleet_core::job::{Job, Key, NO_RUN, Selection};
use syncfleet_core::metrics as m;
use syncfleet_core::shutdown::ShutdownSignal;
use syncfleet_db::{Pool, StreamShape};
use tokio::time::Instant;

use crate::service::Counters;

/// Bound on reading the source's WAL position for a flush.
const POSITION_TIMEOUT: Duration = Duration::from_secs(5);

/// How often the streams that cannot take events are looked at again.
const ROUTES_RECHECK: Duration = Duration::from_secs(30);

/// Between failed flushes, and between failed consumer sessions. Capped
/// well inside the broker's consumer timeout, which bounds how long a
/// flush may keep its events unacked.
const RETRY: RetryPolicy = RetryPolicy {
    initial: Duration::from_millis(250),
    max: Duration::from_secs(30),
    max_attempts: u32::MAX,
};

/// One stream an event table refreshes, and the columns its ids name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Route {
    stream: String,
    columns: Vec<String>,
    /// The columns' (base) type OIDs, to check ids against (see [`fits`]):
    /// a selection compares its values as the base type.
    types: Vec<u32>,
}

/// Whether `value` is valid input for the type `oid`, as far as syncfleet
/// can tell without asking the server: integers and uuids are checked, a
/// NUL character (which no PostgreSQL type takes) is refused everywhere,
/// other types pass. An id the server cannot cast would fail the coalesced
/// job it shares with other events' ids, and cost the worker a split of
/// that job per halving (see `Job::halves`) to find it: it is
/// dead-lettered with its event instead, which names where it came from.
fn fits(oid: u32, value: &str) -> bool {
    if value.contains('\0') {
        return false;
    }
    // The server skips C's `isspace` around an integer, no other space.
    let int = value.trim_matches(|c| matches!(c, ' ' | '\t' | '\n' | '\x0b' | '\x0c' | '\r'));
    match oid {
        // Any width's integer: a column widened on the source (int to
        // bigint, past 2^31) is seen here only when the routes are
        // described again. One too wide for its column still fails on the
        // server, in a job the worker splits and dead-letters on its own,
        // where `dead-letters replay` can send it again.
        20 | 21 | 23 => int.parse::<i64>().is_ok(),
        2950 => is_uuid(value),
        _ => true,
    }
}

/// PostgreSQL's `uuid_in`: 32 hex digits, a `-` allowed after each group of
/// four but the last, the whole optionally in one pair of braces, and
/// nothing else (no spaces).
fn is_uuid(value: &str) -> bool {
    let b = value.as_bytes();
    let (b, braces) = match b.strip_prefix(b"{") {
        Some(rest) => (rest, true),
        None => (b, false),
    };
    let mut at = 0;
    for byte in 0..16 {
        match b.get(at..at + 2) {
            Some(pair) if pair.iter().all(u8::is_ascii_hexdigit) => at += 2,
            _ => return false,
        }
        if byte % 2 == 1 && byte < 15 && b.get(at) == Some(&b'-') {
            at += 1;
        }
    }
    let rest = &b[at..];
    match braces {
        true => rest == b"}",
        false => rest.is_empty(),
    }
}

/// A parsed event.
#[derive(Debug, PartialEq)]
struct Event {
    table: String,
    ids: Vec<Vec<Value>>,
}

/// Parses and checks an event, or says what is wrong with it.
fn parse(body: &[u8]) -> Result<Event, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    let table = v
        .get("table")
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
        .ok_or("field \"table\" must be a non-empty string")?;
    match v.get("op").and_then(Value::as_str) {
        Some("upsert") | Some("delete") => {}
        _ => return Err("field \"op\" must be \"upsert\" or \"delete\"".into()),
    }
    let ids = v
        .get("ids")
        .and_then(Value::as_array)
        .ok_or("field \"ids\" must be an array")?;
    let ids: Vec<Vec<Value>> = ids
        .iter()
        .map(|id| match id {
            Value::Array(parts) => parts.clone(),
            scalar => vec![scalar.clone()],
        })
        .collect();
    // A JSON number past 64-bit integers is read as a float, whose text
    // names another id (1.2345678901234568e23): it must come as a string.
    if let Some(n) = ids.iter().flatten().find_map(|v| match v {
        Value::Number(n)
            if n.as_f64()
                .is_some_and(|f| f.abs() >= 9_007_199_254_740_992.0)
                && n.is_f64() =>
        {
            Some(n)
        }
        _ => None,
    }) {
        return Err(format!(
            "ids: the number {n} cannot be read exactly; send ids of more than 15 digits as strings"
        ));
    }
    Ok(Event {
        table: table.to_string(),
        ids,
    })
}

/// A JSON scalar in PostgreSQL's text form.
fn text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Where each table's events go.
#[derive(Debug, Default)]
struct Routes {
    /// Table name → the streams it refreshes.
    tables: HashMap<String, Vec<Route>>,
    /// Table name → why a stream that reads it cannot take its events.
    broken: HashMap<String, String>,
}

impl Routes {
    /// Describes every stream on the source. A stream that cannot be
    /// described for good (its table is missing, its query is wrong), or
    /// whose `[stream.events]` names a column it does not have, is left
    /// out on its own, its tables marked broken. Any other failure (a lost
    /// connection, a lock or statement timeout) says nothing about the
    /// stream and is the whole resolution's error, tried again later.
    async fn resolve(config: &Config, source: &Pool) -> Result<Self, String> {
        let client = source.get().await.map_err(|e| e.to_string())?;
        let mut routes = Routes::default();
        for stream in &config.streams {
            let described = match StreamShape::describe(&**client, stream).await {
                Ok(shape) => stream_routes(stream, &shape),
                Err(e) if e.class() == syncfleet_db::ErrorClass::Permanent => Err(e.to_string()),
                Err(e) => return Err(e.to_string()),
            };
            match described {
                Ok(found) => {
                    for (table, route) in found {
                        routes.tables.entry(table).or_default().push(route);
                    }
                }
                Err(e) => {
                    let why = format!("stream '{}' cannot take events: {e}", stream.name);
                    tracing::error!(error = %why, "its tables' events are dead-lettered as unroutable until it is fixed");
                    for (table, _) in stream.event_tables() {
                        routes
                            .broken
                            .entry(table)
                            .and_modify(|w| *w = format!("{w}; {why}"))
                            .or_insert_with(|| why.clone());
                    }
                }
            }
        }
        Ok(routes)
    }

    /// The streams an event's table refreshes, and why others that read it
    /// cannot take it, if any do. A name with its schema on one side only
    /// matches the other's by its table name (`app.users` and `users`);
    /// with a schema on both, the schemas must agree too, so that tenants'
    /// schemas with tables of one name keep their events apart.
    fn find(&self, table: &str) -> (Vec<&Route>, Option<String>) {
        let mut routes: Vec<&Route> = Vec::new();
        for route in matching(&self.tables, table).flatten() {
            if !routes.contains(&route) {
                routes.push(route);
            }
        }
        let broken: Vec<&str> = matching(&self.broken, table).map(String::as_str).collect();
        (routes, (!broken.is_empty()).then(|| broken.join("; ")))
    }
}

/// The entries of `map` (by table name as configured) that an event's
/// `table` matches (see [`Routes::find`]), in the order of their names.
fn matching<'a, T>(map: &'a HashMap<String, T>, table: &str) -> impl Iterator<Item = &'a T> {
    let (schema, name) = split_table(table);
    let mut found: Vec<(&String, &T)> = map
        .iter()
        .filter(|(configured, _)| {
            let (s, n) = split_table(configured);
            n == name && (s.is_none() || schema.is_none() || s == schema)
        })
        .collect();
    found.sort_by(|a, b| a.0.cmp(b.0));
    found.into_iter().map(|(_, v)| v)
}

/// `schema.table` as (schema, table); a bare name has no schema.
fn split_table(table: &str) -> (Option<&str>, &str) {
    match table.rsplit_once('.') {
        Some((schema, name)) => (Some(schema), name),
        None => (None, table),
    }
}

/// The tables whose events refresh `stream`, each with its route.
fn stream_routes(
    stream: &syncfleet_core::config::StreamConfig,
    shape: &StreamShape,
) -> Result<Vec<(String, Route)>, String> {
    let mut routes = Vec::new();
    for (table, column) in stream.event_tables() {
        let columns: Vec<String> = match column {
            Some(c) => {
                if !shape.columns.iter().any(|col| col.name == c) {
                    return Err(format!(
                        "events.{table}: column '{c}' is not among the stream's columns ({})",
                        shape.column_names().join(", ")
                    ));
                }
                vec![c]
            }
            None => shape.key_names().iter().map(|k| k.to_string()).collect(),
        };
        let types = columns
            .iter()
            .map(|c| {
                shape
                    .columns
                    .iter()
                    .find(|col| &col.name == c)
                    .map_or(0, |col| col.base_oid)
            })
            .collect();
        let stream = stream.name.clone();
        routes.push((
            table,
            Route {
                stream,
                columns,
                types,
            },
        ));
    }
    Ok(routes)
}

/// Consumes events until shutdown, reconnecting when the broker goes away.
pub async fn consume(
    config: Arc<Config>,
    source: Pool,
    publisher: Arc<Publisher>,
    counters: Arc<Counters>,
    mut shutdown: ShutdownSignal,
) {
    let mut failures = 0u32;
    while !shutdown.is_triggered() {
        let mut consumed = false;
        match session(
            &config,
            &source,
            &publisher,
            &counters,
            &mut shutdown,
            &mut consumed,
        )
        .await
        {
            Ok(()) => return,
            Err(e) => {
                // Counted from the last session that got as far as
                // consuming, so a later outage is backed off from the start.
                failures = if consumed { 1 } else { failures + 1 };
                let delay = RETRY.delay(failures);
                tracing::warn!(error = %e, attempt = failures, ?delay, "the event consumer stopped; starting it again");
                tokio::select! {
                    _ = shutdown.wait() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// Coalesced ids waiting to be published, and the events they came from.
#[derive(Default)]
struct Buffer {
    ids: HashMap<Route, HashSet<Key>>,
    deliveries: Vec<Delivery>,
    keys: usize,
    since: Option<Instant>,
    /// Flushes that failed in a row, and when to try the next.
    failures: u32,
    retry_at: Option<Instant>,
}

impl Buffer {
    /// When to flush: a window after the first event, and not before a
    /// failed flush's backoff is over.
    fn flush_at(&self, window: Duration) -> Option<Instant> {
        let due = self.since? + window;
        Some(self.retry_at.map_or(due, |r| r.max(due)))
    }

    /// Whether the backoff of a failed flush still holds the next back.
    fn backing_off(&self) -> bool {
        self.retry_at.is_some_and(|r| Instant::now() < r)
    }
}

async fn session(
    config: &Config,
    source: &Pool,
    publisher: &Publisher,
    counters: &Counters,
    shutdown: &mut ShutdownSignal,
    consumed: &mut bool,
) -> Result<(), String> {
    let mut routes = Routes::resolve(config, source).await?;
    let mut recheck_at = Instant::now() + ROUTES_RECHECK;
    let topology = publisher.topology().clone();
    let broker = |e: lapin::Error| BrokerError::from(e).to_string();
    let connection = syncfleet_broker::connect(&config.broker, "events")
        .await
        .map_err(|e| e.to_string())?;
    let channel = connection.create_channel().await.map_err(broker)?;
    topology
        .declare(&channel)
        .await
        .map_err(|e| e.to_string())?;
    let window = config.producer.event_window;
    let max_keys = config.producer.event_max_keys;
    // Enough unacked events to fill a window.
    let prefetch = (max_keys * 2).min(u16::MAX as usize) as u16;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await
        .map_err(broker)?;
    let mut consumer = channel
        .basic_consume(
            topology.events_queue().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(broker)?;
    tracing::info!(queue = %topology.events_queue(), "consuming upstream events");
    *consumed = true;
    let mut buffer = Buffer::default();
    loop {
        let flush_at = buffer.flush_at(window);
        tokio::select! {
            _ = shutdown.wait() => {
                // One last try; what it cannot publish goes back to the
                // queue with the connection.
                flush(&mut buffer, source, publisher, counters, max_keys).await;
                let _ = connection.close(200, "stopping".into()).await;
                return Ok(());
            }
            _ = async { tokio::time::sleep_until(flush_at.expect("guarded")).await }, if flush_at.is_some() => {
                flush(&mut buffer, source, publisher, counters, max_keys).await;
            }
            _ = tokio::time::sleep_until(recheck_at), if !routes.broken.is_empty() => {
                recheck_at = Instant::now() + ROUTES_RECHECK;
                // Kept as they were if the source cannot say now.
                match Routes::resolve(config, source).await {
                    Ok(fresh) => routes = fresh,
                    Err(e) => tracing::warn!(error = %e, "could not look at the streams that cannot take events again"),
                }
            }
            delivery = consumer.next() => {
                let delivery = match delivery {
                    Some(Ok(d)) => d,
                    Some(Err(e)) => return Err(broker(e)),
                    None => return Err("the broker cancelled the event consumer".into()),
                };
                take(delivery, &routes, &mut buffer, publisher, counters).await;
                if buffer.keys >= max_keys && !buffer.backing_off() {
                    flush(&mut buffer, source, publisher, counters, max_keys).await;
                }
            }
        }
    }
}

/// Files one event into the buffer (or dead-letters or drops it).
async fn take(
    delivery: Delivery,
    routes: &Routes,
    buffer: &mut Buffer,
    publisher: &Publisher,
    counters: &Counters,
) {
    counters.events_received.fetch_add(1, Ordering::Relaxed);
    metrics::counter!(m::EVENTS, "outcome" => "received").increment(1);
    let event = match parse(&delivery.data) {
        Ok(e) => e,
        Err(reason) => return dead(delivery, publisher, counters, MALFORMED, &reason).await,
    };
    let (targets, broken) = routes.find(&event.table);
    if targets.is_empty() && broken.is_none() {
        counters.events_dropped.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(m::EVENTS, "outcome" => "dropped").increment(1);
        let _ = delivery.ack(BasicAckOptions::default()).await;
        return;
    }
    // Each stream takes the ids that fit its columns. Every route is
    // checked before any is buffered, so that what one refuses is settled
    // first: ids buffered without their delivery would wait for an
    // unrelated event.
    let (mut routed, mut refused) = (Vec::new(), Vec::new());
    for route in targets {
        match route_keys(&event, route) {
            Ok(keys) => routed.push((route, keys)),
            Err(reason) => refused.push(reason),
        }
    }
    // A stream that cannot take events now makes the event unroutable,
    // which `dead-letters replay` sends back once it is fixed; ids that
    // fit no column of a stream make it malformed.
    let reason = match broken {
        Some(_) => UNROUTABLE_EVENT,
        None => MALFORMED,
    };
    let why: Vec<String> = broken.into_iter().chain(refused).collect();
    if !why.is_empty() {
        let why = why.join("; ");
        if routed.is_empty() {
            return dead(delivery, publisher, counters, reason, &why).await;
        }
        // The streams that can take it still do, once a copy for the
        // others is safe in the dead letters.
        if !dead_letter(&delivery, publisher, counters, reason, &why).await {
            let requeue = BasicNackOptions {
                requeue: true,
                ..Default::default()
            };
            let _ = delivery.nack(requeue).await;
            return;
        }
    }
    for (route, keys) in routed {
        let set = buffer.ids.entry(route.clone()).or_default();
        for k in keys {
            if set.insert(k) {
                buffer.keys += 1;
            } else {
                metrics::counter!(m::EVENTS, "outcome" => "coalesced").increment(1);
            }
        }
    }
    buffer.since.get_or_insert_with(Instant::now);
    buffer.deliveries.push(delivery);
}

/// The event's ids as keys of `route`'s columns, or why they are not.
fn route_keys(event: &Event, route: &Route) -> Result<Vec<Key>, String> {
    let mut keys = Vec::with_capacity(event.ids.len());
    for id in &event.ids {
        let key: Option<Key> = id.iter().map(text).collect();
        match key {
            Some(k) if k.len() == route.columns.len() => {
                match k.iter().zip(&route.types).position(|(v, t)| !fits(*t, v)) {
                    None => keys.push(k),
                    Some(i) => {
                        return Err(format!(
                            "ids for table {}: '{}' is not a valid value of column {} of stream '{}'",
                            event.table, k[i], route.columns[i], route.stream
                        ));
                    }
                }
            }
            _ => {
                return Err(format!(
                    "ids for table {} must each be {} scalar value(s) ({}), got {}",
                    event.table,
                    route.columns.len(),
                    route.columns.join(", "),
                    Value::Array(id.clone())
                ));
            }
        }
    }
    Ok(keys)
}

/// The dead-letter reason of an event that is wrong in itself.
const MALFORMED: &str = "malformed event";

/// Dead-letters an event: a copy to the dead letters, then the ack (or, if
/// that copy cannot be published, a reject, which the events queue
/// dead-letters without syncfleet's headers).
async fn dead(
    delivery: Delivery,
    publisher: &Publisher,
    counters: &Counters,
    reason: &'static str,
    error: &str,
) {
    let options = BasicNackOptions {
        requeue: false,
        ..Default::default()
    };
    let _ = match dead_letter(&delivery, publisher, counters, reason, error).await {
        true => delivery.ack(BasicAckOptions::default()).await,
        false => delivery.nack(options).await,
    };
}

/// Publishes a copy of an event to the dead letters with why; whether the
/// broker confirmed it.
async fn dead_letter(
    delivery: &Delivery,
    publisher: &Publisher,
    counters: &Counters,
    reason: &'static str,
    error: &str,
) -> bool {
    counters.events_dead.fetch_add(1, Ordering::Relaxed);
    metrics::counter!(m::EVENTS, "outcome" => "dead_lettered").increment(1);
    metrics::counter!(m::DEAD_LETTERS, "reason" => reason).increment(1);
    let clipped = syncfleet_broker::headers::clip(error);
    tracing::warn!(error = %clipped, "dead-lettering an event: {reason}");
    let headers = Meta::first().dead(reason, error, syncfleet_broker::headers::now_ms());
    let id = delivery
        .properties
        .message_id()
        .as_ref()
        .map(|s| s.to_string())
        .unwrap_or_else(|| "event".into());
    publisher
        .publish_dead(&delivery.data, &id, headers)
        .await
        .is_ok()
}

/// Publishes the buffered ids as jobs, then acks the events they came from.
/// The jobs carry the source's WAL position, which lies after every change
/// the events announce (each was committed before its event was sent), so
/// a worker reading from a standby waits until it has them. When that
/// fails, the events stay in the buffer, unacked, for the next flush after
/// a backoff (events that arrive meanwhile join them).
async fn flush(
    buffer: &mut Buffer,
    source: &Pool,
    publisher: &Publisher,
    counters: &Counters,
    max_keys: usize,
) {
    if buffer.deliveries.is_empty() {
        return;
    }
    // Event jobs belong to no run; their number (microseconds since the
    // epoch, plus one per job) only tells their messages apart, so that a
    // dead letter can be replayed by its id alone.
    let first = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_micros() as i64);
    let mut jobs = Vec::new();
    for (route, ids) in &buffer.ids {
        let mut ids: Vec<&Key> = ids.iter().collect();
        ids.sort();
        for chunk in ids.chunks(max_keys) {
            jobs.push(Job::selection(
                NO_RUN,
                &route.stream,
                first + jobs.len() as i64,
                Selection {
                    columns: route.columns.clone(),
                    values: chunk.iter().map(|k| (*k).clone()).collect(),
                },
            ));
        }
    }
    let published = async {
        let lsn = source
            .bounded(POSITION_TIMEOUT, async |c| {
                syncfleet_db::pool::wal_position(&***c).await
            })
            .await
            .ok_or_else(|| format!("the source's WAL position took over {POSITION_TIMEOUT:?}"))?
            .map_err(|e| format!("reading the source's WAL position: {e}"))?;
        let jobs: Vec<Job> = jobs.into_iter().map(|job| job.at(lsn)).collect();
        publisher
            .publish_jobs(&jobs)
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(jobs.len())
    };
    match published.await {
        Ok(published) => {
            counters
                .event_jobs
                .fetch_add(published as u64, Ordering::Relaxed);
            for d in std::mem::take(buffer).deliveries {
                let _ = d.ack(BasicAckOptions::default()).await;
            }
        }
        Err(e) => {
            counters
                .event_flushes_failed
                .fetch_add(1, Ordering::Relaxed);
            buffer.failures += 1;
            let delay = RETRY.delay(buffer.failures);
            buffer.retry_at = Some(Instant::now() + delay);
            tracing::warn!(error = %e, events = buffer.deliveries.len(), attempt = buffer.failures, ?delay, "could not publish event jobs; the events wait unacked for the next try");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked_against_integer_and_uuid_columns() {
        assert!(fits(20, "42") && fits(20, " -9223372036854775808 ") && fits(23, "+7"));
        assert!(!fits(20, "abc") && !fits(21, "1.5") && !fits(23, "9223372036854775808"));
        // Any integer width's: the column may have been widened since.
        assert!(fits(23, "4294967296") && fits(21, "-70000"));
        assert!(fits(2950, "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"));
        assert!(fits(2950, "{A0EEBC999C0B4EF8BB6D6BB9BD380A11}"));
        assert!(!fits(2950, "a0eebc99-9c0b") && !fits(2950, "g0eebc999c0b4ef8bb6d6bb9bd380a11"));
        // What the server takes, and nothing it refuses (each checked with
        // `::uuid` on PostgreSQL 15).
        assert!(fits(2950, "a0ee-bc99-9c0b-4ef8-bb6d-6bb9-bd38-0a11"));
        for refused in [
            " a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11-",
            "a0e-ebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "{{a0eebc999c0b4ef8bb6d6bb9bd380a11}}",
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}",
        ] {
            assert!(!fits(2950, refused), "{refused:?}");
        }
        // Integers: C's spaces around them, not Unicode's.
        assert!(fits(20, "\t42\x0b") && !fits(20, "\u{a0}42"));
        assert!(fits(25, "anything") && fits(1700, "not checked"));
        assert!(!fits(25, "nul\0inside") && !fits(1700, "1\0"));
    }

    #[test]
    fn a_failed_flush_holds_the_next_back_until_its_backoff_is_over() {
        let window = Duration::from_millis(250);
        let mut buffer = Buffer::default();
        assert_eq!(buffer.flush_at(window), None, "nothing to flush");
        let now = Instant::now();
        buffer.since = Some(now);
        assert_eq!(buffer.flush_at(window), Some(now + window));
        assert!(!buffer.backing_off());
        buffer.retry_at = Some(now + Duration::from_secs(10));
        assert_eq!(buffer.flush_at(window), buffer.retry_at);
        assert!(buffer.backing_off());
    }

    #[test]
    fn parses_events_and_names_what_is_wrong() {
        let e =
            parse(br#"{"table": "users", "op": "upsert", "ids": [42, "43", [1, "a"]]}"#).unwrap();
        assert_eq!(e.table, "users");
        assert_eq!(e.ids.len(), 3);
        assert_eq!(e.ids[2].len(), 2);
        assert!(parse(b"nope").unwrap_err().contains("not JSON"));
        assert!(
            parse(br#"{"op": "upsert", "ids": []}"#)
                .unwrap_err()
                .contains("table")
        );
        assert!(
            parse(br#"{"table": "t", "op": "merge", "ids": []}"#)
                .unwrap_err()
                .contains("op")
        );
        assert!(
            parse(br#"{"table": "t", "op": "delete", "ids": 5}"#)
                .unwrap_err()
                .contains("ids")
        );
        assert_eq!(text(&serde_json::json!(12)), Some("12".into()));
        assert_eq!(text(&serde_json::json!(null)), None);
        // Past 64 bits a JSON number is a float naming another id.
        let big =
            parse(br#"{"table": "t", "op": "upsert", "ids": [[1, 123456789012345678901234]]}"#);
        assert!(big.unwrap_err().contains("as strings"));
        assert!(
            parse(br#"{"table": "t", "op": "upsert", "ids": [18446744073709551615, 1.5]}"#).is_ok()
        );
    }

    #[test]
    fn events_match_tables_by_name_and_by_schema_where_both_name_one() {
        let route = |stream: &str| Route {
            stream: stream.into(),
            columns: vec!["id".into()],
            types: vec![20],
        };
        let mut routes = Routes::default();
        for (table, stream) in [("users", "bare"), ("app.users", "app"), ("b.users", "b")] {
            routes
                .tables
                .entry(table.into())
                .or_default()
                .push(route(stream));
        }
        routes.broken.insert("b.users".into(), "b is broken".into());
        let find = |table| {
            let (found, broken) = routes.find(table);
            let streams: Vec<String> = found.iter().map(|r| r.stream.clone()).collect();
            (streams, broken)
        };
        assert_eq!(find("users").0, ["app", "b", "bare"]);
        assert_eq!(find("app.users"), (vec!["app".into(), "bare".into()], None));
        assert_eq!(
            find("b.users"),
            (vec!["b".into(), "bare".into()], Some("b is broken".into()))
        );
        assert_eq!(find("other.users").0, ["bare"]);
        assert!(find("orders").0.is_empty());
    }

    #[test]
    fn ids_are_keys_of_the_streams_whose_columns_they_fit() {
        let event = parse(br#"{"table": "t", "op": "upsert", "ids": [1, "x"]}"#).unwrap();
        let ints = Route {
            stream: "a".into(),
            columns: vec!["id".into()],
            types: vec![20],
        };
        let texts = Route {
            stream: "b".into(),
            columns: vec!["name".into()],
            types: vec![25],
        };
        assert_eq!(route_keys(&event, &texts).unwrap().len(), 2);
        let refused = route_keys(&event, &ints).unwrap_err();
        assert!(
            refused.contains("'x'") && refused.contains("stream 'a'"),
            "{refused}"
        );
    }
}
