//! What a stream looks like on the source.
//!
//! The server describes the stream's `SELECT` for us (a prepared statement's
//! row description carries every column's name, type and modifier), so a
//! table and a query are handled the same way, and a wrong table, column or
//! query is caught before a run is planned.

use std::collections::HashSet;

use syncfleet_core::config::{StreamConfig, StreamSource};
use syncfleet_core::ident;
use tokio_postgres::GenericClient;
use tokio_postgres::error::SqlState;

use crate::error::{DbError, ErrorClass, classify, describe};

/// One output column of a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    /// The type as SQL, with its modifier: `numeric(12,2)`, `mood`, `text[]`.
    pub type_sql: String,
    pub type_oid: u32,
    /// `type_oid`, or for a domain its base type's (through domains over
    /// domains).
    pub base_oid: u32,
    /// The type its values are compared as: `type_sql`, or for a domain its
    /// base type without a modifier (which would make the cast a call the
    /// key's index cannot see through). PostgreSQL finds `<` and `=` of an
    /// enum for the enum itself, not for a domain over it ("operator does
    /// not exist: mood_domain > mood_domain").
    pub compare_sql: String,
}

impl Column {
    /// `expr` (a value of this column) as its values compare: cast to the
    /// base type for a domain, which keeps the key's index usable (the cast
    /// is a relabelling the planner sees through).
    pub fn compared(&self, expr: String) -> String {
        match self.base_oid == self.type_oid {
            true => expr,
            false => format!("({expr})::{}", self.compare_sql),
        }
    }
}

/// A stream's columns and key, as the source describes them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamShape {
    pub stream: String,
    /// The FROM item: a quoted table name or a parenthesised query.
    pub relation: String,
    /// Whether `relation` is a table (rather than a query).
    pub is_table: bool,
    pub columns: Vec<Column>,
    /// Indexes into `columns`, in key order.
    pub key: Vec<usize>,
}

/// A stream that cannot be synced as configured, or a failure to find out.
#[derive(Debug, thiserror::Error)]
pub enum ShapeError {
    #[error("stream '{stream}': {field}: {message}")]
    Invalid {
        stream: String,
        field: &'static str,
        message: String,
    },
    #[error("stream '{stream}': {source}")]
    Db { stream: String, source: DbError },
}

impl ShapeError {
    /// Turns a driver error met while working on `stream` into this.
    pub(crate) fn db(stream: &str) -> impl Fn(tokio_postgres::Error) -> ShapeError + Copy + '_ {
        move |e| ShapeError::Db {
            stream: stream.to_string(),
            source: e.into(),
        }
    }

    pub fn class(&self) -> ErrorClass {
        match self {
            ShapeError::Invalid { .. } => ErrorClass::Permanent,
            ShapeError::Db { source, .. } => source.class(),
        }
    }
}

impl StreamShape {
    pub fn column_names(&self) -> Vec<&str> {
        self.columns.iter().map(|c| c.name.as_str()).collect()
    }

    pub fn key_names(&self) -> Vec<&str> {
        self.key
            .iter()
            .map(|&i| self.columns[i].name.as_str())
            .collect()
    }

    /// The key columns' types as they compare ([`Column::compare_sql`]).
    pub fn key_types(&self) -> Vec<&str> {
        self.key
            .iter()
            .map(|&i| self.columns[i].compare_sql.as_str())
            .collect()
    }

    /// `alias."a", alias."b"`, for comparing the key with `<`, `=` and the
    /// like ([`Column::compared`]); plain key names elsewhere.
    pub fn compared_key(&self, alias: &str) -> String {
        let keys: Vec<String> = self
            .key
            .iter()
            .map(|&i| {
                let column = &self.columns[i];
                column.compared(format!("{alias}.{}", ident::quote(&column.name)))
            })
            .collect();
        keys.join(", ")
    }

    /// Asks the source to describe the stream.
    pub async fn describe(
        client: &impl GenericClient,
        stream: &StreamConfig,
    ) -> Result<Self, ShapeError> {
        let (relation, field) = match &stream.source {
            StreamSource::Table(t) => (t.to_string(), "table"),
            // The newline ends a `--` comment the query may close with.
            StreamSource::Query(q) => (format!("({q}\n)"), "query"),
        };
        let invalid = |field: &'static str, message: String| ShapeError::Invalid {
            stream: stream.name.clone(),
            field,
            message,
        };
        let db = ShapeError::db(&stream.name);

        let statement = match client
            .prepare(&format!("SELECT * FROM {relation} AS q LIMIT 0"))
            .await
        {
            Ok(s) => s,
            // A lost connection or a conflict says nothing about the stream.
            Err(e) if classify(&e) != ErrorClass::Permanent => return Err(db(e)),
            Err(e) => {
                let message = match (&stream.source, e.code()) {
                    (StreamSource::Table(t), Some(&SqlState::UNDEFINED_TABLE)) => {
                        format!("table {t} does not exist in the source database")
                    }
                    (StreamSource::Query(_), Some(&SqlState::SYNTAX_ERROR)) => format!(
                        "must be a single SELECT statement usable as a subquery: {}",
                        describe(&e)
                    ),
                    _ => describe(&e),
                };
                return Err(invalid(field, message));
            }
        };

        let described = statement.columns();
        if described.is_empty() {
            return Err(invalid(field, "returns no columns".into()));
        }
        let mut seen = HashSet::new();
        for c in described {
            if !seen.insert(c.name()) {
                return Err(invalid(
                    field,
                    format!(
                        "returns two columns named '{}'; give them distinct names with AS",
                        c.name()
                    ),
                ));
            }
        }
        // The row description gives a domain column its base type; a
        // column read straight from a table also names that table and
        // column, whose catalog entry has the real (domain) type.
        let oids: Vec<u32> = described.iter().map(|c| c.type_().oid()).collect();
        let mods: Vec<i32> = described.iter().map(|c| c.type_modifier()).collect();
        let tables: Vec<u32> = described
            .iter()
            .map(|c| c.table_oid().unwrap_or(0))
            .collect();
        let attnums: Vec<i16> = described
            .iter()
            .map(|c| c.column_id().unwrap_or(0))
            .collect();
        // A domain's base type is followed down to a type that is not one.
        let types: Vec<(u32, String, u32, String)> = client
            .query(
                "SELECT c.ty, format_type(c.ty, NULLIF(c.tm, -1)), b.ty, \
                        CASE b.ty WHEN c.ty THEN format_type(c.ty, NULLIF(c.tm, -1)) ELSE format_type(b.ty, NULL) END \
                 FROM (SELECT t.n, coalesce(a.atttypid, t.oid) AS ty, coalesce(a.atttypmod, t.typmod) AS tm \
                       FROM unnest($1::oid[], $2::int4[], $3::oid[], $4::int2[]) \
                            WITH ORDINALITY AS t(oid, typmod, rel, att, n) \
                       LEFT JOIN pg_attribute a ON a.attrelid = t.rel AND a.attnum = t.att AND t.att > 0) AS c \
                 CROSS JOIN LATERAL (WITH RECURSIVE up(ty) AS ( \
                     SELECT c.ty \
                     UNION ALL \
                     SELECT p.typbasetype FROM up JOIN pg_type p ON p.oid = up.ty WHERE p.typtype = 'd') \
                   SELECT up.ty FROM up JOIN pg_type p ON p.oid = up.ty WHERE p.typtype <> 'd') AS b \
                 ORDER BY c.n",
                &[&oids, &mods, &tables, &attnums],
            )
            .await
            .map_err(db)?
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect();
        if types.len() != described.len() {
            return Err(invalid(field, "a column's type is not in pg_type".into()));
        }
        let columns: Vec<Column> = described
            .iter()
            .zip(types)
            .map(|(c, (type_oid, type_sql, base_oid, compare_sql))| Column {
                name: c.name().to_string(),
                type_sql,
                type_oid,
                base_oid,
                compare_sql,
            })
            .collect();

        let key_names = match (&stream.key, &stream.source) {
            (Some(k), _) => k.clone(),
            (None, StreamSource::Table(t)) => {
                let pk: Vec<String> = client
                    .query(
                        "SELECT a.attname::text FROM pg_index i \
                         JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey) \
                         WHERE i.indrelid = $1::text::regclass AND i.indisprimary \
                         ORDER BY array_position(i.indkey::int2[], a.attnum)",
                        &[&t.to_string()],
                    )
                    .await
                    .map_err(db)?
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                if pk.is_empty() {
                    return Err(invalid(
                        "key",
                        format!("table {t} has no primary key; set key = [\"column\", ...]"),
                    ));
                }
                pk
            }
            (None, StreamSource::Query(_)) => {
                return Err(invalid("key", "a query stream needs key = [...]".into()));
            }
        };
        let mut key = Vec::with_capacity(key_names.len());
        for k in &key_names {
            match columns.iter().position(|c| &c.name == k) {
                Some(i) => key.push(i),
                None => {
                    let names: Vec<&str> = columns.iter().map(|c| c.name.as_str()).collect();
                    return Err(invalid(
                        "key",
                        format!(
                            "column '{k}' is not among the stream's columns ({})",
                            names.join(", ")
                        ),
                    ));
                }
            }
        }
        Ok(StreamShape {
            stream: stream.name.clone(),
            is_table: matches!(stream.source, StreamSource::Table(_)),
            relation,
            columns,
            key,
        })
    }

    /// This shape without the columns that `destination` (its table's
    /// column names) lacks, key columns excepted, and the names left out.
    /// An empty `destination` (no table yet) leaves every column in.
    pub fn restricted_to(&self, destination: &HashSet<String>) -> (StreamShape, Vec<String>) {
        if destination.is_empty() {
            return (self.clone(), Vec::new());
        }
        let keys: Vec<&str> = self.key_names();
        let (kept, left_out): (Vec<&Column>, Vec<&Column>) = self
            .columns
            .iter()
            .partition(|c| keys.contains(&c.name.as_str()) || destination.contains(&c.name));
        let key = keys
            .iter()
            .map(|k| {
                kept.iter()
                    .position(|c| c.name == *k)
                    .expect("key columns are kept")
            })
            .collect();
        let shape = StreamShape {
            columns: kept.into_iter().cloned().collect(),
            key,
            ..self.clone()
        };
        (
            shape,
            left_out.into_iter().map(|c| c.name.clone()).collect(),
        )
    }

    /// `q."a", q."b"`: every column, with an alias.
    pub fn select_list(&self, alias: &str) -> String {
        ident::list(&self.column_names(), Some(alias))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn column(name: &str) -> Column {
        Column {
            name: name.into(),
            type_sql: "text".into(),
            type_oid: 25,
            base_oid: 25,
            compare_sql: "text".into(),
        }
    }

    #[test]
    fn a_shape_restricted_to_the_destination_keeps_its_key() {
        let shape = StreamShape {
            stream: "s".into(),
            relation: "\"t\"".into(),
            is_table: true,
            columns: ["a", "id", "new", "b"].map(column).to_vec(),
            key: vec![1],
        };
        let destination: HashSet<String> = ["a", "b", "old"].map(String::from).into();
        let (restricted, left_out) = shape.restricted_to(&destination);
        assert_eq!(restricted.column_names(), ["a", "id", "b"]);
        assert_eq!(
            restricted.key_names(),
            ["id"],
            "the key stays, found or not"
        );
        assert_eq!(left_out, ["new"]);
        let (whole, none) = shape.restricted_to(&HashSet::new());
        assert_eq!((whole, none.len()), (shape, 0), "no table: every column");
    }
}
