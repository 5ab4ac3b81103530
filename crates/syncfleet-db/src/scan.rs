//! Walks a stream's key space in key order and yields every n-th key: the
//! boundaries of batches (planning) and of checksum ranges (verify).
//!
//! One query per stream, read through a portal a chunk at a time, so the
//! planner holds at most one chunk of boundaries however large the table.
//! Keyset boundaries, never OFFSET: a batch is a key range, and executing it
//! reads the range through the key's index.

use syncfleet_core::ident;
use syncfleet_core::job::{Key, KeyRange};
use tokio_postgres::{Portal, Transaction};

use crate::error::DbError;
use crate::shape::{ShapeError, StreamShape};
use crate::sql::{Binding, RangePredicate};
use tokio_postgres::types::ToSql;

/// Boundaries read per round trip.
pub const CHUNK: i32 = 1000;

/// An open scan over one stream's keys.
pub struct KeyScan<'t> {
    tx: &'t Transaction<'t>,
    portal: Portal,
    stream: String,
    key_names: Vec<String>,
    finished: bool,
}

impl<'t> KeyScan<'t> {
    /// Starts a scan yielding the key of every `every`-th row, counting
    /// from the first key after `after` (from the start when `None`). Run
    /// it in a REPEATABLE READ transaction so the boundaries come from one
    /// snapshot.
    pub async fn start(
        tx: &'t Transaction<'t>,
        shape: &StreamShape,
        every: u32,
        after: Option<&Key>,
    ) -> Result<KeyScan<'t>, ShapeError> {
        let keys = shape.key_names();
        let as_text: Vec<String> = keys
            .iter()
            .map(|k| format!("s.{}::text", ident::quote(k)))
            .collect();
        let any_null: Vec<String> = keys
            .iter()
            .map(|k| format!("s.{} IS NULL", ident::quote(k)))
            .collect();
        // Rows with a NULL key could never be addressed by a key range, so
        // they are returned too and rejected below rather than skipped.
        let from = KeyRange {
            lower: after.cloned(),
            upper: None,
        };
        let start = RangePredicate::new(shape, "q", &from, Binding::Params { first: 2 });
        let sql = format!(
            "SELECT {} FROM (SELECT {}, row_number() OVER (ORDER BY {}) AS syncfleet_rn \
             FROM {} AS q WHERE {}) AS s WHERE s.syncfleet_rn % $1 = 0 OR {} ORDER BY s.syncfleet_rn",
            as_text.join(", "),
            ident::list(&keys, Some("q")),
            ident::list(&keys, Some("q")),
            shape.relation,
            start.sql,
            any_null.join(" OR "),
        );
        let every = i64::from(every);
        let mut params: Vec<&(dyn ToSql + Sync)> = vec![&every];
        params.extend(start.params.iter().map(|p| p as &(dyn ToSql + Sync)));
        let portal = tx.bind(&sql, &params).await.map_err(|e| ShapeError::Db {
            stream: shape.stream.clone(),
            source: e.into(),
        })?;
        Ok(KeyScan {
            tx,
            portal,
            stream: shape.stream.clone(),
            key_names: keys.iter().map(|k| k.to_string()).collect(),
            finished: false,
        })
    }

    /// The next chunk of boundaries, or `None` when the scan is over.
    pub async fn next_chunk(&mut self) -> Result<Option<Vec<Key>>, ShapeError> {
        if self.finished {
            return Ok(None);
        }
        let rows = self
            .tx
            .query_portal(&self.portal, CHUNK)
            .await
            .map_err(|e| ShapeError::Db {
                stream: self.stream.clone(),
                source: DbError::from(e),
            })?;
        if rows.len() < CHUNK as usize {
            self.finished = true;
        }
        let mut keys = Vec::with_capacity(rows.len());
        for row in &rows {
            let mut key = Vec::with_capacity(self.key_names.len());
            for (i, name) in self.key_names.iter().enumerate() {
                let value: Option<String> = row.get(i);
                key.push(value.ok_or_else(|| ShapeError::Invalid {
                    stream: self.stream.clone(),
                    field: "key",
                    message: format!(
                        "key column '{name}' has NULL values; key columns must be NOT NULL"
                    ),
                })?);
            }
            keys.push(key);
        }
        if keys.is_empty() && self.finished {
            return Ok(None);
        }
        Ok(Some(keys))
    }
}

/// Turns a sequence of boundaries into consecutive ranges covering the whole
/// key space: `(-inf, b1], (b1, b2], …, (bn, +inf)`.
#[derive(Debug, Default)]
pub struct Ranges {
    previous: Option<Key>,
}

impl Ranges {
    /// Ranges continuing after `key` (a resumed plan); from the start when `None`.
    pub fn after(key: Option<Key>) -> Self {
        Self { previous: key }
    }

    /// The range ending at this boundary.
    pub fn until(&mut self, boundary: Key) -> KeyRange {
        KeyRange {
            lower: self.previous.replace(boundary.clone()),
            upper: Some(boundary),
        }
    }

    /// The final range, unbounded above.
    pub fn last(self) -> KeyRange {
        KeyRange {
            lower: self.previous,
            upper: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_cover_the_key_space() {
        let mut r = Ranges::default();
        let a = r.until(vec!["10".into()]);
        let b = r.until(vec!["20".into()]);
        let c = r.last();
        assert_eq!(a.lower, None);
        assert_eq!(a.upper, b.lower);
        assert_eq!(b.upper, c.lower);
        assert_eq!(c.upper, None);
        assert_eq!(Ranges::default().last(), KeyRange::default());
    }
}
