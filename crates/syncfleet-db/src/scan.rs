//! Walks a stream's key space in key order and yields every n-th key: the
//! boundaries of batches (planning) and of checksum ranges (verify).
//!
//! One query per stream, read through a portal a chunk at a time, so the
//! planner holds at most one chunk of boundaries however large the table.
//! A table whose key has a suitable index is walked along it
//! (`walk`); anything else is numbered in key order (`window`). Either
//! way a batch is a key range, and executing it reads the range through
//! the key's index. A scan can be [paced](crate::sql::Pace) as the
//! workers' reads are, so that planning a large table does not undo the
//! throttle.

use syncfleet_core::ident;
use syncfleet_core::job::{Key, KeyRange};
use tokio_postgres::{Portal, Transaction};

use crate::shape::{ShapeError, StreamShape};
use crate::sql::{Binding, Pace, RangePredicate, SET_SETTINGS, pace_filter};
use tokio_postgres::types::ToSql;

/// Boundaries read per round trip, at most.
pub const CHUNK: i32 = 1000;
/// Boundaries read by the first round trip; each next one reads twice as
/// many, up to [`CHUNK`]. The planner publishes each chunk's batches before
/// it reads the next, so small first chunks put workers to work early: a
/// chunk of 1,000 boundaries of 10,000 rows is a walk over 10,000,000 rows,
/// and far longer than that at the throttle's lowest levels.
const FIRST_CHUNK: i32 = 16;

/// Below this many rows per boundary, numbering rows is cheaper than
/// walking the index: each step of the walk pays an index descent
/// (1,000,000 rows: every key 7.4 s against 1.2 s, every 10th 0.73 s
/// against 0.33 s, every 100th 0.19 s against 0.53 s).
const WALK_MIN_EVERY: u32 = 64;

/// An open scan over one stream's keys.
pub struct KeyScan<'t> {
    tx: &'t Transaction<'t>,
    portal: Portal,
    stream: String,
    key_names: Vec<String>,
    finished: bool,
    walks: bool,
    /// Boundaries the next round trip reads.
    chunk: i32,
}

impl<'t> KeyScan<'t> {
    /// Starts a scan yielding the key of every `every`-th row, counting
    /// from the first key after `after` (from the start when `None`),
    /// working at `pace` for the whole scan. Run it in a REPEATABLE READ
    /// transaction so the boundaries come from one snapshot.
    pub async fn start(
        tx: &'t Transaction<'t>,
        shape: &StreamShape,
        every: u32,
        after: Option<&Key>,
        pace: Option<Pace>,
    ) -> Result<KeyScan<'t>, ShapeError> {
        let db = ShapeError::db(&shape.stream);
        let keys = shape.key_names();
        let from = KeyRange {
            lower: after.cloned(),
            upper: None,
        };
        let start = RangePredicate::new(shape, "q", &from, Binding::Params { first: 2 });
        let walkable = shape.is_table
            && every >= WALK_MIN_EVERY
            && tx
                .query_one(WALKABLE, &[&shape.relation, &keys])
                .await
                .map_err(db)?
                .get::<_, bool>(0);
        let filter = apply_pace(tx, pace).await.map_err(db)?;
        let sql = match walkable {
            true => walk(shape, &start, &filter),
            false => window(shape, &start, &filter),
        };
        let every = i64::from(every);
        let mut params: Vec<&(dyn ToSql + Sync)> = vec![&every];
        params.extend(crate::sql::bind(&start.params));
        let portal = tx.bind(&sql, &params).await.map_err(db)?;
        Ok(KeyScan {
            tx,
            portal,
            stream: shape.stream.clone(),
            key_names: keys.iter().map(|k| k.to_string()).collect(),
            finished: false,
            walks: walkable,
            chunk: FIRST_CHUNK,
        })
    }

    /// Whether the scan walks the key's index rather than numbering rows.
    pub fn walks(&self) -> bool {
        self.walks
    }

    /// True once the scan has read its last chunk.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// The next chunk of boundaries, or `None` when the scan is over.
    pub async fn next_chunk(&mut self) -> Result<Option<Vec<Key>>, ShapeError> {
        if self.finished {
            return Ok(None);
        }
        let rows = self
            .tx
            .query_portal(&self.portal, self.chunk)
            .await
            .map_err(ShapeError::db(&self.stream))?;
        if rows.len() < self.chunk as usize {
            self.finished = true;
        }
        self.chunk = (self.chunk * 2).min(CHUNK);
        let keys = rows
            .iter()
            .map(|row| row_key(row, 0, &self.stream, &self.key_names))
            .collect::<Result<Vec<Key>, _>>()?;
        if keys.is_empty() && self.finished {
            return Ok(None);
        }
        Ok(Some(keys))
    }
}

/// Sets `pace` in the transaction and returns the filter (` AND …`) that
/// paces a statement of it by that, or nothing without a pace.
pub async fn apply_pace(
    tx: &Transaction<'_>,
    pace: Option<Pace>,
) -> Result<String, tokio_postgres::Error> {
    let Some(pace) = pace else {
        return Ok(String::new());
    };
    let (names, values): (Vec<String>, Vec<String>) = pace.settings().into_iter().unzip();
    tx.execute(SET_SETTINGS, &[&names, &values]).await?;
    Ok(format!(" AND {}", pace_filter()))
}

/// The key that `row` holds in its columns from `first` on, in the text
/// form of `key_names`' columns. A NULL key could never be addressed by a
/// key range: it is an error naming the stream and the column.
pub fn row_key(
    row: &tokio_postgres::Row,
    first: usize,
    stream: &str,
    key_names: &[impl AsRef<str>],
) -> Result<Key, ShapeError> {
    key_names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            row.get::<_, Option<String>>(first + i)
                .ok_or_else(|| ShapeError::Invalid {
                    stream: stream.to_string(),
                    field: "key",
                    message: format!(
                        "key column '{}' has NULL values; key columns must be NOT NULL",
                        name.as_ref()
                    ),
                })
        })
        .collect()
}

/// Whether table `$1` has a btree index that walks key `$2` (column
/// names, in order) in `ORDER BY` order, over key columns that are all
/// NOT NULL: its leading columns are the key's, ascending, in the
/// columns' own collations and default operator classes.
const WALKABLE: &str = "SELECT EXISTS (SELECT FROM pg_index i \
     JOIN pg_class ic ON ic.oid = i.indexrelid \
     JOIN pg_am am ON am.oid = ic.relam AND am.amname = 'btree' \
     WHERE i.indrelid = $1::text::regclass AND i.indisvalid AND i.indpred IS NULL \
       AND i.indnkeyatts >= cardinality($2::text[]) \
       AND cardinality($2::text[]) = (SELECT count(*) \
         FROM unnest($2::text[]) WITH ORDINALITY AS k(name, n) \
         JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attname = k.name \
         JOIN pg_opclass oc ON oc.oid = i.indclass[k.n::int - 1] \
         WHERE a.attnotnull AND oc.opcdefault AND i.indkey[k.n::int - 1] = a.attnum \
           AND i.indcollation[k.n::int - 1] = a.attcollation AND i.indoption[k.n::int - 1] = 0))";

/// Every `$1`-th key, hopping along the key's index: each step of the
/// recursion reads the next `$1` index entries from where the last one
/// stopped. One pass over the index, and 5 times cheaper on the source
/// than numbering every row (a 1,000,000-row table, every 10,000th key:
/// 96 ms against 505 ms). The recursion yields its rows in the order it
/// finds them (breadth first, one row per step), which is key order.
/// `filter` (the pacing) is checked on every index entry a step reads.
fn walk(shape: &StreamShape, start: &RangePredicate, filter: &str) -> String {
    let keys = shape.key_names();
    let q = ident::list(&keys, Some("q"));
    format!(
        "WITH RECURSIVE syncfleet_walk AS (\
           (SELECT {q} FROM {rel} AS q WHERE {start}{filter} ORDER BY {q} OFFSET $1::int8 - 1 LIMIT 1) \
           UNION ALL \
           SELECT n.* FROM syncfleet_walk AS b CROSS JOIN LATERAL \
             (SELECT {q} FROM {rel} AS q WHERE ({qt}) > ({bt}){filter} ORDER BY {q} OFFSET $1::int8 - 1 LIMIT 1) AS n) \
         SELECT {out} FROM syncfleet_walk AS b",
        rel = shape.relation,
        start = start.sql,
        qt = shape.compared_key("q"),
        bt = shape.compared_key("b"),
        out = as_text(&keys, "b"),
    )
}

/// Every `$1`-th key by numbering every row in key order: for a query
/// stream, a table without an index that walks its key, or boundaries
/// under [`WALK_MIN_EVERY`] rows apart. Rows with a
/// NULL key could never be addressed by a key range, so they are returned
/// too and rejected by [`KeyScan::next_chunk`] rather than skipped.
fn window(shape: &StreamShape, start: &RangePredicate, filter: &str) -> String {
    let keys = shape.key_names();
    let any_null: Vec<String> = keys
        .iter()
        .map(|k| format!("s.{} IS NULL", ident::quote(k)))
        .collect();
    format!(
        "SELECT {} FROM (SELECT {}, row_number() OVER (ORDER BY {}) AS syncfleet_rn \
         FROM {} AS q WHERE {}{filter}) AS s WHERE s.syncfleet_rn % $1 = 0 OR {} ORDER BY s.syncfleet_rn",
        as_text(&keys, "s"),
        ident::list(&keys, Some("q")),
        ident::list(&keys, Some("q")),
        shape.relation,
        start.sql,
        any_null.join(" OR "),
    )
}

/// `alias."k"::text, …`: the key as the texts a [`Key`] holds.
fn as_text(keys: &[&str], alias: &str) -> String {
    keys.iter()
        .map(|k| format!("{alias}.{}::text", ident::quote(k)))
        .collect::<Vec<_>>()
        .join(", ")
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
