//! Prepares the destination table of a stream: checks an existing one, or
//! creates a missing one from the source's column types and key. Either
//! way, its text key columns must sort as the source's do.
//!
//! Enum and domain types the columns need are created too (arrays of them
//! included). Any other type the destination lacks (composite, range, an
//! extension's type) is an error that says what to create, since guessing
//! its definition could change values.

use std::collections::HashSet;

use syncfleet_core::config::TableName;
use syncfleet_core::ident;
use tokio_postgres::{Client, GenericClient};

use crate::shape::{ShapeError, StreamShape};

/// What [`ensure_table`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableState {
    Existing,
    Created,
}

/// Checks or creates the destination table for `shape`.
pub async fn ensure_table(
    source: &impl GenericClient,
    destination: &mut Client,
    shape: &StreamShape,
    table: &TableName,
) -> Result<TableState, ShapeError> {
    let err = ShapeError::db(&shape.stream);
    let invalid = |message: String| ShapeError::Invalid {
        stream: shape.stream.clone(),
        field: "destination_table",
        message,
    };
    let tx = destination.transaction().await.map_err(err)?;
    // Two producers preparing the same table must not race on CREATE.
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext('syncfleet.ddl'))",
        &[],
    )
    .await
    .map_err(err)?;
    let oid: Option<u32> = tx
        .query_one("SELECT to_regclass($1::text)::oid", &[&table.to_string()])
        .await
        .map_err(err)?
        .get(0);

    if let Some(oid) = oid {
        let present: HashSet<String> = tx
            .query(
                "SELECT attname::text FROM pg_attribute WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped",
                &[&oid],
            )
            .await
            .map_err(err)?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let missing: Vec<&str> = shape
            .column_names()
            .into_iter()
            .filter(|c| !present.contains(*c))
            .collect();
        if !missing.is_empty() {
            return Err(invalid(format!(
                "destination table {table} lacks column(s) {} that the stream produces",
                missing.join(", ")
            )));
        }
        let unique_sets: Vec<Vec<String>> = tx
            .query(
                "SELECT array_agg(a.attname::text ORDER BY a.attname) FROM pg_index i \
                 JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey) \
                 WHERE i.indrelid = $1 AND i.indisunique AND i.indpred IS NULL AND i.indexprs IS NULL \
                 GROUP BY i.indexrelid",
                &[&oid],
            )
            .await
            .map_err(err)?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let mut key: Vec<String> = shape.key_names().iter().map(|k| k.to_string()).collect();
        key.sort();
        if !unique_sets.contains(&key) {
            let keys = ident::list(&shape.key_names(), None);
            return Err(invalid(format!(
                "destination table {table} has no primary key or unique index on ({keys}), \
                 which syncfleet needs to upsert by key; create one: CREATE UNIQUE INDEX ON {table} ({keys})"
            )));
        }
        check_key_order(source, &tx, shape, table, &invalid).await?;
        tx.commit().await.map_err(err)?;
        return Ok(TableState::Existing);
    }

    let mut done = HashSet::new();
    for column in &shape.columns {
        ensure_type(
            source,
            &tx,
            column.type_oid,
            &column.name,
            &mut done,
            &invalid,
        )
        .await
        .map_err(|e| match e {
            TypeError::Db(e) => err(e),
            TypeError::Invalid(e) => e,
        })?;
    }
    if let Some(schema) = &table.schema {
        tx.batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {}",
            ident::quote(schema)
        ))
        .await
        .map_err(err)?;
    }
    let columns: Vec<String> = shape
        .columns
        .iter()
        .map(|c| format!("{} {}", ident::quote(&c.name), c.type_sql))
        .collect();
    tx.batch_execute(&format!(
        "CREATE TABLE {table} ({}, PRIMARY KEY ({}))",
        columns.join(", "),
        ident::list(&shape.key_names(), None)
    ))
    .await
    .map_err(err)?;
    // A table created in a database of another locale is refused too, and
    // rolled back with this transaction.
    check_key_order(source, &tx, shape, table, &invalid).await?;
    tx.commit().await.map_err(err)?;
    Ok(TableState::Created)
}

/// Refuses a stream whose key columns sort differently in the two
/// databases: text by another collation, an enum by labels in another
/// order (`ADD VALUE … BEFORE` on one side, a plain `ADD VALUE` on the
/// other) or with labels the other lacks. A key range is read from the
/// source in the source's order and its stale rows are deleted from the
/// destination in the destination's: under two orders a range holds
/// different rows on each side, and a job would delete rows that belong
/// to its neighbours.
async fn check_key_order(
    source: &impl GenericClient,
    destination: &impl GenericClient,
    shape: &StreamShape,
    table: &TableName,
    invalid: &impl Fn(String) -> ShapeError,
) -> Result<(), ShapeError> {
    let err = ShapeError::db(&shape.stream);
    let key = shape.key_names();
    let theirs = key_order(source, &shape.relation, &key)
        .await
        .map_err(err)?;
    let ours = key_order(destination, &table.to_string(), &key)
        .await
        .map_err(err)?;
    for ((column, s), d) in key.iter().zip(&theirs).zip(&ours) {
        if s.as_deref().map(same_order) != d.as_deref().map(same_order) {
            let show = |o: &Option<String>| o.clone().unwrap_or_else(|| "none".into());
            return Err(invalid(format!(
                "key column {} sorts by collation {} in the source but {} in destination table {table}; \
                 a key range would hold different rows on each side, and rows at its edges could be \
                 deleted. Give the destination column a collation of the same locale \
                 (ALTER TABLE {table} ALTER COLUMN {} TYPE … COLLATE \"…\"), or create the destination \
                 database with the source's locale",
                ident::quote(column),
                show(s),
                show(d),
                ident::quote(column),
            )));
        }
    }
    let theirs = enum_order(source, &shape.relation, &key)
        .await
        .map_err(err)?;
    let ours = enum_order(destination, &table.to_string(), &key)
        .await
        .map_err(err)?;
    for ((column, s), d) in key.iter().zip(&theirs).zip(&ours) {
        if !sorts_alike(s.as_deref(), d.as_deref()) {
            let show = |o: &Option<String>| o.clone().unwrap_or_else(|| "not an enum".into());
            return Err(invalid(format!(
                "key column {} is an enum whose labels sort as {} in the source but {} in \
                 destination table {table}; a key range would hold different rows on each side, \
                 and rows at its edges could be deleted. Give the destination's type the same \
                 labels in the same order, or more (ALTER TYPE … ADD VALUE … BEFORE/AFTER)",
                ident::quote(column),
                show(s),
                show(d),
            )));
        }
    }
    Ok(())
}

/// Whether two enums' labels (JSON arrays, in sort order) order the
/// source's values alike on the destination: each of the source's labels
/// there, in the same order. Labels only the destination has (a migration
/// run there first) hold no synced row.
fn sorts_alike(source: Option<&str>, destination: Option<&str>) -> bool {
    let labels = |json: &str| serde_json::from_str::<Vec<String>>(json).unwrap_or_default();
    match (source, destination) {
        (None, None) => true,
        (Some(s), Some(d)) => {
            let mut ours = labels(d).into_iter();
            labels(s).iter().all(|l| ours.any(|o| &o == l))
        }
        _ => false,
    }
}

/// The labels in sort order (a JSON array) of each of `key`'s columns of
/// `relation` that is an enum, a domain over one or an array of one,
/// `None` for the others.
async fn enum_order(
    client: &impl GenericClient,
    relation: &str,
    key: &[&str],
) -> Result<Vec<Option<String>>, tokio_postgres::Error> {
    let types: Vec<String> = key
        .iter()
        .map(|k| format!("pg_typeof({})", no_value(relation, k)))
        .collect();
    // A domain's base type, an array's element type, down to the type
    // itself.
    let sql = format!(
        "SELECT (WITH RECURSIVE down(oid) AS ( \
                   SELECT n.t::oid \
                   UNION ALL SELECT CASE WHEN p.typbasetype <> 0 THEN p.typbasetype ELSE p.typelem END \
                   FROM pg_type p JOIN down ON p.oid = down.oid \
                   WHERE p.typbasetype <> 0 OR (p.typcategory = 'A' AND p.typelem <> 0)) \
                 SELECT jsonb_agg(e.enumlabel ORDER BY e.enumsortorder)::text \
                 FROM pg_enum e WHERE e.enumtypid IN (SELECT oid FROM down)) \
         FROM unnest(ARRAY[{}]::regtype[]) WITH ORDINALITY AS n(t, i) ORDER BY n.i",
        types.join(", ")
    );
    first_column(client, &sql).await
}

/// No row of `relation`'s column `key`, typed as the column: what the
/// catalog functions ask a column's type and collation of.
fn no_value(relation: &str, key: &str) -> String {
    format!(
        "(SELECT {} FROM {relation} AS s LIMIT 0)",
        ident::quote(key)
    )
}

/// The first column of every row `sql` returns, in order.
async fn first_column(
    client: &impl GenericClient,
    sql: &str,
) -> Result<Vec<Option<String>>, tokio_postgres::Error> {
    Ok(client
        .query(sql, &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// The collation of each of `key`'s columns of `relation`, as
/// `provider:locale` (`c` libc, `i` ICU, `b` built-in), or `None` for a
/// type without one. `default` is resolved to the database's own locale.
/// The locale columns differ between PostgreSQL versions, hence `to_jsonb`.
async fn key_order(
    client: &impl GenericClient,
    relation: &str,
    key: &[&str],
) -> Result<Vec<Option<String>>, tokio_postgres::Error> {
    let columns: Vec<String> = key
        .iter()
        .map(|k| {
            // `pg_collation_for` raises an error for a type without
            // collations, so it is asked only of the others.
            let value = no_value(relation, k);
            format!(
                "CASE WHEN (SELECT typcollation FROM pg_type WHERE oid = pg_typeof({value})) <> 0 \
                 THEN pg_collation_for({value}) END"
            )
        })
        .collect();
    let sql = format!(
        "SELECT CASE WHEN c.oid IS NULL THEN NULL \
           WHEN c.collname = 'default' THEN coalesce(to_jsonb(d) ->> 'datlocprovider', 'c') || ':' || \
             coalesce(to_jsonb(d) ->> 'datlocale', to_jsonb(d) ->> 'daticulocale', d.datcollate) \
           ELSE c.collprovider::text || ':' || \
             coalesce(to_jsonb(c) ->> 'colllocale', to_jsonb(c) ->> 'colliculocale', c.collcollate) END \
         FROM unnest(ARRAY[{}]::text[]) WITH ORDINALITY AS n(name, i) \
         LEFT JOIN pg_collation c ON c.oid = n.name::regcollation \
         JOIN pg_database d ON d.datname = current_database() ORDER BY n.i",
        columns.join(", ")
    );
    first_column(client, &sql).await
}

/// A collation as `provider:locale`, spelled so that two that order text
/// alike compare equal: case and dashes aside, and C, POSIX and C.UTF-8
/// (code point order, which is UTF-8's byte order) as one.
fn same_order(collation: &str) -> String {
    let c = collation.to_lowercase().replace('-', "");
    match c.split_once(':') {
        Some(("c" | "b", "c" | "posix" | "c.utf8")) => "c:c".into(),
        _ => c,
    }
}

enum TypeError {
    Db(tokio_postgres::Error),
    Invalid(ShapeError),
}

impl From<tokio_postgres::Error> for TypeError {
    fn from(e: tokio_postgres::Error) -> Self {
        TypeError::Db(e)
    }
}

/// Makes sure the destination has the type `oid` of the source, creating
/// enums and domains (and their dependencies) when missing.
async fn ensure_type(
    source: &impl GenericClient,
    dest: &impl GenericClient,
    oid: u32,
    column: &str,
    done: &mut HashSet<u32>,
    invalid: &impl Fn(String) -> ShapeError,
) -> Result<(), TypeError> {
    if !done.insert(oid) {
        return Ok(());
    }
    let t = source
        .query_one(
            "SELECT t.typtype::text, t.typcategory::text, n.nspname::text, t.typname::text, t.typelem, \
                    t.typbasetype, format_type(t.oid, NULL), format_type(t.typbasetype, NULLIF(t.typtypmod, -1)), \
                    t.typnotnull, pg_get_expr(t.typdefaultbin, 0) \
             FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace WHERE t.oid = $1",
            &[&oid],
        )
        .await?;
    let (kind, category, schema, name): (String, String, String, String) =
        (t.get(0), t.get(1), t.get(2), t.get(3));
    let (elem, base): (u32, u32) = (t.get(4), t.get(5));
    let (type_sql, base_sql): (String, String) = (t.get(6), t.get(7));
    if category == "A" && elem != 0 {
        return Box::pin(ensure_type(source, dest, elem, column, done, invalid)).await;
    }
    if schema == "pg_catalog" || schema == "information_schema" {
        return Ok(());
    }
    let exists: bool = dest
        .query_one("SELECT to_regtype($1) IS NOT NULL", &[&type_sql])
        .await?
        .get(0);
    if exists {
        return Ok(());
    }
    let qualified = format!("{}.{}", ident::quote(&schema), ident::quote(&name));
    dest.batch_execute(&format!(
        "CREATE SCHEMA IF NOT EXISTS {}",
        ident::quote(&schema)
    ))
    .await?;
    match kind.as_str() {
        "e" => {
            let labels: Vec<String> = source
                .query(
                    "SELECT enumlabel::text FROM pg_enum WHERE enumtypid = $1 ORDER BY enumsortorder",
                    &[&oid],
                )
                .await?
                .iter()
                .map(|r| r.get(0))
                .collect();
            // Labels are values: the server quotes them.
            let ddl: String = dest
                .query_one(
                    "SELECT format('CREATE TYPE %s AS ENUM (%s)', $1::text, \
                     (SELECT coalesce(string_agg(quote_literal(l), ', ' ORDER BY o), '') \
                      FROM unnest($2::text[]) WITH ORDINALITY AS x(l, o)))",
                    &[&qualified, &labels],
                )
                .await?
                .get(0);
            dest.batch_execute(&ddl).await?;
        }
        "d" => {
            Box::pin(ensure_type(source, dest, base, column, done, invalid)).await?;
            let checks: Vec<String> = source
                .query(
                    "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE contypid = $1 ORDER BY conname",
                    &[&oid],
                )
                .await?
                .iter()
                .map(|r| r.get(0))
                .collect();
            let not_null: bool = t.get(8);
            let default: Option<String> = t.get(9);
            let mut ddl = format!("CREATE DOMAIN {qualified} AS {base_sql}");
            if let Some(d) = default {
                ddl.push_str(&format!(" DEFAULT {d}"));
            }
            if not_null {
                ddl.push_str(" NOT NULL");
            }
            for c in checks {
                ddl.push(' ');
                ddl.push_str(&c);
            }
            dest.batch_execute(&ddl).await?;
        }
        other => {
            let what = match other {
                "c" => "a composite type",
                "r" | "m" => "a range type",
                "b" => "a base type from an extension",
                _ => "a type",
            };
            return Err(TypeError::Invalid(invalid(format!(
                "column '{column}' has type {type_sql}, {what} the destination database lacks; \
                 syncfleet creates only enum and domain types, so create {type_sql} in the \
                 destination first (for an extension: CREATE EXTENSION ...)"
            ))));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::same_order;

    #[test]
    fn collations_that_sort_alike_compare_equal() {
        for c in ["c:POSIX", "c:C.UTF-8", "c:C.utf8", "b:C.UTF-8"] {
            assert_eq!(same_order(c), same_order("c:C"), "{c}");
        }
        assert_eq!(same_order("c:en_US.UTF-8"), same_order("c:en_US.utf8"));
        assert_ne!(same_order("c:en_US.UTF-8"), same_order("c:en_GB.UTF-8"));
        assert_ne!(same_order("i:und"), same_order("c:C"));
        assert_ne!(same_order("i:en-US"), same_order("c:en_US.UTF-8"));
    }
}
