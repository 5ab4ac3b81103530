//! `syncfleet verify`: source and destination compared per key range.
//!
//! Each stream's key space is cut into ranges of about `--range-rows`
//! source rows (the planner's keyset walk), and each range is compared by
//! row count and an order-independent checksum of the rows' text form. The
//! ranges are unbounded at both ends, so destination rows outside every
//! source key are caught too.
//!
//! Its source reads are the fleet's too: each holds a slot of the ceiling
//! (`source.max_concurrent_reads`), and while the throttle holds the fleet
//! below level one they are paced at its level, as the planner's are.

use std::process::ExitCode;

use syncfleet_core::Config;
use syncfleet_core::config::StreamConfig;
use syncfleet_core::job::KeyRange;
use syncfleet_db::ceiling::Ceiling;
use syncfleet_db::scan::{KeyScan, Ranges};
use syncfleet_db::sql::{self, Binding, RangePredicate};
use syncfleet_db::{Pool, Role, StreamShape};

use crate::error::CliError;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Only these streams (repeatable) [default: all]
    #[arg(long = "stream", value_name = "NAME")]
    streams: Vec<String>,
    /// Source rows per compared key range
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    range_rows: u32,
}

/// One key range whose two sides differ.
#[derive(Debug, Clone)]
pub struct RangeDiff {
    pub range: KeyRange,
    pub source_rows: i64,
    pub destination_rows: i64,
}

/// The comparison of one stream.
#[derive(Debug, Clone)]
pub struct StreamReport {
    pub stream: String,
    pub ranges: u64,
    pub source_rows: i64,
    pub destination_rows: i64,
    pub differences: Vec<RangeDiff>,
}

impl StreamReport {
    pub fn matches(&self) -> bool {
        self.differences.is_empty()
    }
}

pub async fn run(config: &Config, args: Args) -> Result<ExitCode, CliError> {
    let streams = config.select_streams(&args.streams)?;
    if streams.is_empty() {
        return Err(CliError::Usage(format!(
            "config {}: no [[stream]] is configured: nothing to verify",
            config.origin
        )));
    }
    let source = Pool::connect(Role::Source, &config.source).await?;
    let destination = Pool::connect(Role::Destination, &config.destination).await?;
    let ceiling = Ceiling::new(config);
    let mut reports = Vec::new();
    for stream in streams {
        let report = compare(&source, &destination, &ceiling, stream, args.range_rows).await;
        reports.push(report.map_err(|e| e.at(&format!("stream '{}'", stream.name)))?);
    }
    print_reports(&reports);
    Ok(if reports.iter().all(StreamReport::matches) {
        ExitCode::SUCCESS
    } else {
        crate::error::found_wrong()
    })
}

/// Compares one stream, range by range, each source read within the
/// fleet's `ceiling`.
pub async fn compare(
    source: &Pool,
    destination: &Pool,
    ceiling: &Ceiling,
    stream: &StreamConfig,
    range_rows: u32,
) -> Result<StreamReport, CliError> {
    let mut src = source.get().await?;
    let shape = StreamShape::describe(&**src, stream).await?;
    let exists: bool = destination
        .get()
        .await?
        .query_one(
            "SELECT to_regclass($1::text) IS NOT NULL",
            &[&stream.destination_table.to_string()],
        )
        .await?
        .get(0);
    if !exists {
        return Err(CliError::Failed(format!(
            "destination table {} does not exist (has it been synced?)",
            stream.destination_table
        )));
    }
    let tx = syncfleet_db::pool::read_snapshot(&mut src).await?;
    let mut report = StreamReport {
        stream: stream.name.clone(),
        ranges: 0,
        source_rows: 0,
        destination_rows: 0,
        differences: Vec::new(),
    };
    let destination_relation = stream.destination_table.to_string();
    let pace = ceiling.pace(destination).await;
    let mut scan = KeyScan::start(&tx, &shape, range_rows, None, pace).await?;
    let mut ranges = Ranges::default();
    let mut pending = Vec::new();
    loop {
        let chunk = match scan.is_finished() {
            true => None,
            false => {
                let read = async { Ok::<_, CliError>(scan.next_chunk().await?) };
                ceiling.read(destination, read).await?
            }
        };
        let last = chunk.is_none();
        match chunk {
            Some(boundaries) => pending.extend(boundaries.into_iter().map(|b| ranges.until(b))),
            None => pending.push(std::mem::take(&mut ranges).last()),
        }
        for range in pending.drain(..) {
            let predicate = RangePredicate::new(&shape, "q", &range, Binding::Params { first: 1 });
            let params = sql::bind(&predicate.params);
            let read = async {
                let checksum = sql::checksum(&shape, &shape.relation, &predicate, pace.is_some());
                Ok::<_, CliError>(tx.query_one(&checksum, &params).await?)
            };
            let s = ceiling.read(destination, read).await?;
            let d = destination
                .get()
                .await?
                .query_one(
                    &sql::checksum(&shape, &destination_relation, &predicate, false),
                    &params,
                )
                .await
                .map_err(|e| CliError::from(e).at("on the destination"))?;
            let (source_rows, source_sum): (i64, String) = (s.get(0), s.get(1));
            let (destination_rows, destination_sum): (i64, String) = (d.get(0), d.get(1));
            report.ranges += 1;
            report.source_rows += source_rows;
            report.destination_rows += destination_rows;
            if source_rows != destination_rows || source_sum != destination_sum {
                report.differences.push(RangeDiff {
                    range,
                    source_rows,
                    destination_rows,
                });
            }
        }
        if last {
            break;
        }
    }
    tx.commit().await?;
    Ok(report)
}

/// `(-inf, 42]`, `(42, +inf)`, `('a', 7), ('b', 1)]`.
pub fn format_range(range: &KeyRange) -> String {
    let key = |k: &Vec<String>| {
        if k.len() == 1 {
            k[0].clone()
        } else {
            format!("({})", k.join(", "))
        }
    };
    let lower = range
        .lower
        .as_ref()
        .map(key)
        .unwrap_or_else(|| "-inf".into());
    match &range.upper {
        Some(u) => format!("({lower}, {}]", key(u)),
        None => format!("({lower}, +inf)"),
    }
}

pub fn print_reports(reports: &[StreamReport]) {
    println!(
        "{:<24} {:>7} {:>12} {:>12}  result",
        "stream", "ranges", "source rows", "dest rows"
    );
    for r in reports {
        println!(
            "{:<24} {:>7} {:>12} {:>12}  {}",
            r.stream,
            r.ranges,
            r.source_rows,
            r.destination_rows,
            if r.matches() { "ok" } else { "DIFFERENT" }
        );
    }
    for r in reports.iter().filter(|r| !r.matches()) {
        println!(
            "\nstream '{}': {} key range(s) differ:",
            r.stream,
            r.differences.len()
        );
        for d in &r.differences {
            println!(
                "  key range {}: source {} rows, destination {} rows{}",
                format_range(&d.range),
                d.source_rows,
                d.destination_rows,
                if d.source_rows == d.destination_rows {
                    " (same count, different content)"
                } else {
                    ""
                }
            );
        }
    }
}
