//! The SQL syncfleet runs, built from a [`StreamShape`].
//!
//! Identifiers are always quoted. Key values are always bound: as statement
//! parameters where PostgreSQL allows them, and where it does not (inside
//! `COPY (SELECT …)`) as transaction-local settings set by a parameterised
//! `set_config` and read back with `current_setting`. Either way a value is
//! never spliced into SQL text, and it is cast to the key column's type on
//! the server, so ranges compare exactly as the source orders keys.

use std::time::Duration;
use syncfleet_core::config::TableName;
use syncfleet_core::ident;
use syncfleet_core::job::{KeyRange, Selection};

use crate::shape::{Column, StreamShape};

/// The temporary table a batch is copied into before it is merged. It is
/// created per transaction and dropped at commit, in `pg_temp` so that it can
/// never resolve to a real table.
pub const STAGE: &str = "pg_temp.syncfleet_stage";

/// How a range predicate receives its key values.
#[derive(Debug, Clone, Copy)]
pub enum Binding {
    /// As `$n` statement parameters, numbered from `first`.
    Params { first: usize },
    /// As settings applied with [`SET_SETTINGS`] in the same transaction.
    Settings,
}

/// A key-range predicate and the values it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangePredicate {
    /// SQL such as `(q."id") > ($1::text::integer) AND (q."id") <= ($2::text::integer)`.
    pub sql: String,
    /// For [`Binding::Params`]: the parameters, in order.
    pub params: Vec<String>,
    /// For [`Binding::Settings`]: setting names and values.
    pub settings: (Vec<String>, Vec<String>),
}

/// Text parameters as the driver binds them.
pub fn bind(params: &[String]) -> Vec<&(dyn tokio_postgres::types::ToSql + Sync)> {
    params.iter().map(|p| p as _).collect()
}

/// Applies [`Binding::Settings`] values: bind `settings.0` and `settings.1`.
pub const SET_SETTINGS: &str = "SELECT set_config(s.name, s.value, true) FROM unnest($1::text[], $2::text[]) AS s(name, value)";

impl RangePredicate {
    /// `lower < key <= upper` over `alias`'s key columns.
    pub fn new(shape: &StreamShape, alias: &str, range: &KeyRange, binding: Binding) -> Self {
        let lhs = format!("({})", shape.compared_key(alias));
        let types = shape.key_types();
        let mut out = RangePredicate {
            sql: String::new(),
            params: Vec::new(),
            settings: (Vec::new(), Vec::new()),
        };
        let mut conditions = Vec::new();
        for (bound, op, tag) in [(&range.lower, ">", "lo"), (&range.upper, "<=", "hi")] {
            let Some(values) = bound else { continue };
            let rhs: Vec<String> = values
                .iter()
                .zip(&types)
                .enumerate()
                .map(|(i, (value, ty))| {
                    let source = match binding {
                        Binding::Params { first } => {
                            out.params.push(value.clone());
                            format!("${}::text", first + out.params.len() - 1)
                        }
                        Binding::Settings => {
                            let name = format!("syncfleet.{tag}_{i}");
                            out.settings.0.push(name.clone());
                            out.settings.1.push(value.clone());
                            format!("current_setting('{name}')")
                        }
                    };
                    format!("{source}::{ty}")
                })
                .collect();
            conditions.push(format!("{lhs} {op} ({})", rhs.join(", ")));
        }
        out.sql = if conditions.is_empty() {
            "true".into()
        } else {
            conditions.join(" AND ")
        };
        out
    }
}

impl RangePredicate {
    /// `(columns) IN (values)` over `alias`: the rows a [`Selection`]
    /// names. Each column's values travel as one JSON array of texts (a
    /// parameter or a setting), unpacked and cast to the column's type on
    /// the server. Fails when a column is not among the stream's.
    pub fn selection(
        shape: &StreamShape,
        alias: &str,
        select: &Selection,
        binding: Binding,
    ) -> Result<Self, String> {
        let mut out = RangePredicate {
            sql: String::new(),
            params: Vec::new(),
            settings: (Vec::new(), Vec::new()),
        };
        if select.columns.is_empty() {
            return Err("its selection names no column".into());
        }
        if let Some(v) = select
            .values
            .iter()
            .find(|v| v.len() != select.columns.len())
        {
            return Err(format!(
                "a selected key of {} value(s) for {} column(s)",
                v.len(),
                select.columns.len()
            ));
        }
        let mut arrays = Vec::with_capacity(select.columns.len());
        let mut columns = Vec::with_capacity(select.columns.len());
        for (i, name) in select.columns.iter().enumerate() {
            let column = shape
                .columns
                .iter()
                .find(|c| &c.name == name)
                .ok_or_else(|| format!("column '{name}' is not among the stream's columns"))?;
            let values: Vec<&str> = select.values.iter().map(|v| v[i].as_str()).collect();
            let json = serde_json::to_string(&values).expect("strings serialize");
            let source = match binding {
                Binding::Params { first } => {
                    out.params.push(json);
                    format!("${}::text", first + out.params.len() - 1)
                }
                Binding::Settings => {
                    let setting = format!("syncfleet.in_{i}");
                    out.settings.0.push(setting.clone());
                    out.settings.1.push(json);
                    format!("current_setting('{setting}')")
                }
            };
            arrays.push(format!(
                "ARRAY(SELECT json_array_elements_text({source}::json))::{}[]",
                column.compare_sql
            ));
            columns.push(column.compared(format!("{alias}.{}", ident::quote(name))));
        }
        out.sql = format!(
            "({}) IN (SELECT * FROM unnest({}))",
            columns.join(", "),
            arrays.join(", ")
        );
        Ok(out)
    }
}

/// Reads one key range of the stream from the source in text COPY format.
pub fn copy_out(shape: &StreamShape, predicate: &RangePredicate, paced: bool) -> String {
    let select = format!(
        "SELECT {} FROM {} AS q WHERE {}",
        shape.select_list("q"),
        shape.relation,
        predicate.sql
    );
    if paced {
        // `OFFSET 0` keeps the pacing filter above the range filter, so
        // only rows of the batch ever pause.
        format!(
            "COPY (SELECT * FROM ({select} OFFSET 0) AS r WHERE {}) TO STDOUT",
            pace_filter()
        )
    } else {
        format!("COPY ({select}) TO STDOUT")
    }
}

/// A filter that is always true and paces the rows passing it (see
/// [`Pace`]): at about one row in fifty it checks how long the backend has
/// worked since it last woke (or since the statement began), and past the
/// work share it sleeps, then notes when it woke. Checking only some rows
/// keeps its cost out of the work.
///
/// The work is timed from the wake, not from a fixed schedule, because
/// `pg_sleep` overshoots: it waits in whole milliseconds and wakes up to one
/// later. Against a schedule (the statement's start, modulo a period) that
/// lateness came out of the next burst: at level 0.31 a paced read took
/// 1.9 times as long as its level implies; timed from the wake, 1.0 times.
pub(crate) fn pace_filter() -> String {
    let now = "date_part('epoch', clock_timestamp())";
    let since = format!(
        "greatest(coalesce(nullif(current_setting('{PACE_WAKE}', true), '')::float8, 0), \
         date_part('epoch', statement_timestamp()))"
    );
    let work = format!("current_setting('{PACE_WORK}')::float8");
    let sleep = format!("current_setting('{PACE_SLEEP}')::float8");
    // `||` evaluates its left side first: the wake is noted after the sleep.
    format!(
        "(random() >= 0.02 OR CASE WHEN {now} - {since} < {work} THEN true \
         ELSE (pg_sleep({sleep})::text || set_config('{PACE_WAKE}', {now}::text, true)) IS NOT NULL END)"
    )
}

/// Server-side pacing of a batch's statements: the backend works for
/// `work`, then sleeps for `sleep`, on its own clock, so a batch is read
/// (and merged) in short bursts with the CPU left free in between.
///
/// The worker cannot pace the source by reading slowly: the server's
/// socket send buffer (autotuned up to 4 MiB on Linux) holds a whole
/// batch, which the backend produces at full speed regardless.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pace {
    pub work: Duration,
    pub sleep: Duration,
}

const PACE_WORK: &str = "syncfleet.pace_work";
const PACE_SLEEP: &str = "syncfleet.pace_sleep";
/// When the backend last woke from a pacing sleep (epoch seconds).
const PACE_WAKE: &str = "syncfleet.pace_wake";

impl Pace {
    /// The pacing cycle below level one: as short as `pg_sleep`'s whole
    /// milliseconds allow, so that a burst is short. An app query that finds
    /// the cores busy waits out a burst: in the bench, at the floor, the app's
    /// p99 was 3.3–3.9 ms with 5 ms cycles and 3.1–3.5 ms with 2.5 ms (four
    /// runs each), 2.8–3.0 ms with 1.25 ms in three runs of four (the fourth
    /// 4.3), and the sync moved as many rows or more.
    pub const PERIOD: Duration = Duration::from_micros(1250);

    /// How a read is paced at the throttle's `level`: not at all from level
    /// one up.
    pub fn below_one(level: f64) -> Option<Pace> {
        (level < 1.0).then(|| Pace::at(level, Self::PERIOD))
    }

    /// Works `level` (0 to 1) of the time in cycles of about `period`. The
    /// sleep is whole milliseconds, the unit `pg_sleep` waits in, and the
    /// work is sized to it.
    pub fn at(level: f64, period: Duration) -> Self {
        let level = level.clamp(0.01, 0.99);
        let sleep_ms = (period.as_secs_f64() * 1000.0 * (1.0 - level))
            .round()
            .max(1.0);
        Pace {
            work: Duration::from_secs_f64(sleep_ms / 1000.0 * level / (1.0 - level)),
            sleep: Duration::from_millis(sleep_ms as u64),
        }
    }

    /// The settings the paced statements ([`copy_out`], [`upsert`],
    /// [`delete_missing`], [`fingerprint`]) read, to set in their
    /// transaction.
    pub fn settings(&self) -> [(String, String); 2] {
        // Asked for a little less: `pg_sleep` rounds up to the next
        // millisecond, and one asked for exactly N waits N + 1.
        let sleep = self.sleep.saturating_sub(Duration::from_micros(200));
        [
            (PACE_WORK.into(), self.work.as_secs_f64().to_string()),
            (PACE_SLEEP.into(), sleep.as_secs_f64().to_string()),
        ]
    }
}

/// Creates the stage with exactly the stream's columns, typed as in the
/// destination table.
pub fn create_stage(shape: &StreamShape, table: &TableName) -> String {
    format!(
        "CREATE TEMP TABLE syncfleet_stage ON COMMIT DROP AS SELECT {} FROM {table} WITH NO DATA",
        ident::list(&shape.column_names(), None)
    )
}

/// Drops the stage before the transaction ends, for the next job of the
/// same transaction.
pub fn drop_stage() -> String {
    format!("DROP TABLE {STAGE}")
}

pub fn copy_in_stage(shape: &StreamShape) -> String {
    copy_in(shape, STAGE)
}

/// `COPY table (columns) FROM STDIN`: the stage, or the destination table
/// itself when the batch's range there is empty.
pub fn copy_in(shape: &StreamShape, table: &str) -> String {
    format!(
        "COPY {table} ({}) FROM STDIN",
        ident::list(&shape.column_names(), None)
    )
}

/// Whether the destination has no row in the range: is there a first row
/// in key order? That is one index probe whatever the table's statistics
/// say, where a plain `NOT EXISTS` over an open range of a table not yet
/// analysed was planned as a scan from the table's start (0.5 s for the
/// last batch of a freshly loaded million rows). Parameters as in
/// `predicate` (built over alias `d`).
pub fn range_is_empty(
    shape: &StreamShape,
    table: &TableName,
    predicate: &RangePredicate,
) -> String {
    format!(
        "SELECT (SELECT 1 FROM {table} AS d WHERE {} ORDER BY {} LIMIT 1) IS NULL",
        predicate.sql,
        ident::list(&shape.key_names(), Some("d"))
    )
}

/// How [`upsert`] writes the stage into the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upsert {
    /// `MERGE` (PostgreSQL 15 and later).
    Merge,
    /// `INSERT … ON CONFLICT DO UPDATE … WHERE` changed.
    OnConflict,
}

/// Inserts or updates every staged row by key. A row whose values already
/// match is left alone: no new row version, no index churn, which is what
/// makes a re-sync of unchanged data cheap. Each value is compared as
/// cheaply as its type allows (see `EXACT_EQUALITY`). A paced upsert
/// reads the stage through `pace_filter`.
///
/// Both forms write the same rows, but `ON CONFLICT` locks every existing
/// row before its `WHERE` is checked, changed or not, while `MERGE` touches
/// only the rows it updates. Measured on 10,000 unchanged rows of the
/// bench's table: 28–43 ms and 561 KB of WAL (the row locks) against 18–22
/// ms and none; on 10,000 changed rows, 52–87 ms against 46–72 ms.
pub fn upsert(shape: &StreamShape, table: &TableName, paced: bool, how: Upsert) -> String {
    let columns = ident::list(&shape.column_names(), None);
    let new = match how {
        Upsert::Merge => "s",
        Upsert::OnConflict => "EXCLUDED",
    };
    // A key column whose `=` forgives differences is compared and written
    // too: the row its key finds may hold it in another form (`1.0` where
    // the source now has `1.00`).
    let values: Vec<&Column> = shape
        .columns
        .iter()
        .enumerate()
        .filter(|(i, c)| !shape.key.contains(i) || !EXACT_EQUALITY.contains(&c.type_oid))
        .map(|(_, c)| c)
        .collect();
    let set: Vec<String> = values
        .iter()
        .map(|c| {
            let c = ident::quote(&c.name);
            format!("{c} = {new}.{c}")
        })
        .collect();
    // Cheap comparisons first: `OR` stops at the first difference.
    let mut compared = values.clone();
    compared.sort_by_key(|c| !EXACT_EQUALITY.contains(&c.type_oid));
    let changed: Vec<String> = compared.into_iter().map(|c| changed(c, new)).collect();
    let filter = if paced {
        format!(" WHERE {}", pace_filter())
    } else {
        String::new()
    };
    let staged = format!("SELECT {columns} FROM {STAGE}{filter}");
    match how {
        Upsert::Merge => {
            let update = match values.is_empty() {
                true => String::new(),
                false => format!(
                    " WHEN MATCHED AND ({}) THEN UPDATE SET {}",
                    changed.join(" OR "),
                    set.join(", ")
                ),
            };
            format!(
                "MERGE INTO {table} AS d USING ({staged}) AS s ON ({}) = ({}){update} \
                 WHEN NOT MATCHED THEN INSERT ({columns}) VALUES ({})",
                shape.compared_key("d"),
                shape.compared_key("s"),
                ident::list(&shape.column_names(), Some("s")),
            )
        }
        Upsert::OnConflict => {
            let action = match values.is_empty() {
                true => "NOTHING".to_string(),
                false => format!(
                    "UPDATE SET {} WHERE {}",
                    set.join(", "),
                    changed.join(" OR ")
                ),
            };
            format!(
                "INSERT INTO {table} AS d ({columns}) {staged} ON CONFLICT ({}) DO {action}",
                ident::list(&shape.key_names(), None)
            )
        }
    }
}

/// Row count and fingerprint of one range, as `(int8, int8)`: the XOR of a
/// 64-bit hash of each row, so the same rows give the same pair on both
/// sides whatever their physical order (rows are distinct: they carry the
/// key). Values are hashed in their binary form where their type's
/// equality is exact, as text otherwise (see `EXACT_EQUALITY`): the
/// fingerprints differ wherever [`upsert`] would write. Measured on the
/// bench's table: 0.5 of the time of the `COPY` that reads the same rows,
/// against 10–15 times that for the destination to stage and merge them.
/// `paced` adds `pace_filter`.
pub fn fingerprint(
    shape: &StreamShape,
    relation: &str,
    alias: &str,
    predicate: &RangePredicate,
    paced: bool,
) -> String {
    let values: Vec<String> = shape
        .columns
        .iter()
        .map(|c| {
            let value = format!("{alias}.{}", ident::quote(&c.name));
            match EXACT_EQUALITY.contains(&c.type_oid) {
                true => value,
                false => format!("{value}::text"),
            }
        })
        .collect();
    let filter = match paced {
        true => format!(" AND {}", pace_filter()),
        false => String::new(),
    };
    format!(
        "SELECT count(*)::int8, coalesce(bit_xor(hash_record_extended(ROW({}), 0)), 0) \
         FROM {relation} AS {alias} WHERE {}{filter}",
        values.join(", "),
        predicate.sql
    )
}

/// Built-in types whose equality means the same text form, so a changed
/// value can be told by `=`: bool, int2/4/8, text, varchar, uuid, date,
/// time, timestamp, timestamptz, bytea, oid. Others compare as text,
/// because their `=` forgives differences a copy must keep: numeric scale
/// (`1.0 = 1.00`), float zero signs, jsonb numbers, interval units
/// (`'1 day' = '24 hours'`), bpchar's trailing blanks. Text equality is
/// bytewise under deterministic collations, which syncfleet's tables use.
const EXACT_EQUALITY: [u32; 13] = [
    16, 20, 21, 23, 25, 1043, 2950, 1082, 1083, 1114, 1184, 17, 26,
];

/// `d.col` differs from `{new}.col`, as cheaply as its type allows.
fn changed(column: &Column, new: &str) -> String {
    let c = ident::quote(&column.name);
    if EXACT_EQUALITY.contains(&column.type_oid) {
        format!("d.{c} IS DISTINCT FROM {new}.{c}")
    } else {
        format!("d.{c}::text IS DISTINCT FROM {new}.{c}::text")
    }
}

/// Deletes destination rows in the range that the source no longer has.
/// Parameters as in `predicate` (built over alias `d`).
pub fn delete_missing(
    shape: &StreamShape,
    table: &TableName,
    predicate: &RangePredicate,
    paced: bool,
) -> String {
    let filter = if paced {
        format!(" AND {}", pace_filter())
    } else {
        String::new()
    };
    format!(
        "DELETE FROM {table} AS d WHERE {}{filter} AND NOT EXISTS \
         (SELECT 1 FROM {STAGE} AS s WHERE ({}) = ({}))",
        predicate.sql,
        shape.compared_key("s"),
        shape.compared_key("d"),
    )
}

/// Deletes every destination row in the range: the source has none there.
/// Parameters as in `predicate` (built over alias `d`).
pub fn delete_range(table: &TableName, predicate: &RangePredicate) -> String {
    format!("DELETE FROM {table} AS d WHERE {}", predicate.sql)
}

/// Row count and an order-independent checksum of one key range: the sum of
/// a 64-bit hash of each row's text form. The same rows give the same sum on
/// both sides whatever their physical order. `paced` adds `pace_filter`.
pub fn checksum(
    shape: &StreamShape,
    relation: &str,
    predicate: &RangePredicate,
    paced: bool,
) -> String {
    let filter = match paced {
        true => format!(" AND {}", pace_filter()),
        false => String::new(),
    };
    format!(
        "SELECT count(*)::int8, \
         coalesce(sum(('x' || substr(md5(ROW({})::text), 1, 16))::bit(64)::int8::numeric), 0)::text \
         FROM {relation} AS q WHERE {}{filter}",
        shape.select_list("q"),
        predicate.sql
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shape::Column;

    fn shape() -> StreamShape {
        let col = |name: &str, ty: &str| {
            let oid = match ty {
                "text" => 25,
                "bigint" => 20,
                _ => 3802,
            };
            Column {
                name: name.into(),
                type_sql: ty.into(),
                type_oid: oid,
                base_oid: oid,
                compare_sql: ty.into(),
            }
        };
        StreamShape {
            stream: "s".into(),
            relation: "\"t\"".into(),
            is_table: true,
            columns: vec![
                col("org", "text"),
                col("id", "bigint"),
                col("v\"x", "jsonb"),
            ],
            key: vec![0, 1],
        }
    }

    #[test]
    fn a_pace_sleeps_whole_milliseconds_and_works_its_level_of_the_time() {
        let ms = Duration::from_millis;
        let pace = Pace::at(0.2, ms(5));
        assert_eq!((pace.work, pace.sleep), (ms(1), ms(4)));
        // Near one, the sleep is still a whole millisecond.
        let pace = Pace::at(0.9, ms(5));
        assert_eq!(pace.sleep, ms(1));
        assert!((pace.work.as_secs_f64() - 0.009).abs() < 1e-9);
        // Asked for a little less than it should sleep: pg_sleep rounds up.
        let [_, (_, sleep)] = Pace::at(0.2, ms(5)).settings();
        assert_eq!(sleep, "0.0038");
    }

    #[test]
    fn range_predicates_bind_values_and_cast_to_key_types() {
        let range = KeyRange {
            lower: Some(vec!["a'; DROP TABLE t; --".into(), "1".into()]),
            upper: Some(vec!["b".into(), "9".into()]),
        };
        let p = RangePredicate::new(&shape(), "d", &range, Binding::Params { first: 1 });
        assert_eq!(
            p.sql,
            "(d.\"org\", d.\"id\") > ($1::text::text, $2::text::bigint) AND \
             (d.\"org\", d.\"id\") <= ($3::text::text, $4::text::bigint)"
        );
        assert_eq!(p.params, vec!["a'; DROP TABLE t; --", "1", "b", "9"]);
        let s = RangePredicate::new(&shape(), "q", &range, Binding::Settings);
        assert!(!s.sql.contains("DROP"), "{}", s.sql);
        assert_eq!(s.settings.0[0], "syncfleet.lo_0");
        assert_eq!(s.settings.1[0], "a'; DROP TABLE t; --");
        let open = RangePredicate::new(&shape(), "q", &KeyRange::default(), Binding::Settings);
        assert_eq!(open.sql, "true");
    }

    #[test]
    fn a_selection_whose_keys_do_not_fit_its_columns_is_refused() {
        let select = |columns: &[&str], values: &[&[&str]]| Selection {
            columns: columns.iter().map(|c| c.to_string()).collect(),
            values: values
                .iter()
                .map(|v| v.iter().map(|s| s.to_string()).collect())
                .collect(),
        };
        let params = Binding::Params { first: 1 };
        let ok = RangePredicate::selection(
            &shape(),
            "d",
            &select(&["org", "id"], &[&["a", "1"]]),
            params,
        );
        assert!(ok.is_ok());
        let short =
            RangePredicate::selection(&shape(), "d", &select(&["org", "id"], &[&["a"]]), params);
        assert!(short.unwrap_err().contains("1 value(s) for 2 column(s)"));
        assert!(RangePredicate::selection(&shape(), "d", &select(&[], &[]), params).is_err());
    }

    #[test]
    fn a_domain_key_compares_as_its_base_type() {
        let mut shape = shape();
        shape.columns[0].type_sql = "mood_domain".into();
        shape.columns[0].type_oid = 16_384;
        shape.columns[0].compare_sql = "mood".into();
        let range = KeyRange {
            lower: Some(vec!["ok".into(), "1".into()]),
            upper: None,
        };
        let p = RangePredicate::new(&shape, "d", &range, Binding::Params { first: 1 });
        assert_eq!(
            p.sql,
            "((d.\"org\")::mood, d.\"id\") > ($1::text::mood, $2::text::bigint)"
        );
        let merge = upsert(
            &shape,
            &TableName::parse("t").unwrap(),
            false,
            Upsert::Merge,
        );
        assert!(
            merge.contains("ON ((d.\"org\")::mood, d.\"id\") = ((s.\"org\")::mood, s.\"id\")"),
            "{merge}"
        );
    }

    #[test]
    fn upsert_quotes_every_identifier() {
        let t = TableName::parse("rep.tab").unwrap();
        let merge = upsert(&shape(), &t, false, Upsert::Merge);
        assert!(merge.contains("\"v\"\"x\" = s.\"v\"\"x\""), "{merge}");
        assert!(
            merge.contains("ON (d.\"org\", d.\"id\") = (s.\"org\", s.\"id\")"),
            "{merge}"
        );
        let sql = upsert(&shape(), &t, false, Upsert::OnConflict);
        assert!(sql.contains("\"v\"\"x\" = EXCLUDED.\"v\"\"x\""), "{sql}");
        // jsonb's `=` forgives `1.0` against `1`: it compares as text.
        assert!(
            sql.contains("WHERE d.\"v\"\"x\"::text IS DISTINCT FROM EXCLUDED.\"v\"\"x\"::text"),
            "{sql}"
        );
        assert!(sql.contains("ON CONFLICT (\"org\", \"id\")"), "{sql}");
    }
}
