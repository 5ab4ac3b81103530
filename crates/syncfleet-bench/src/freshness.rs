//! Benchmark 6: freshness of event-driven syncs.
//!
//! An external publisher (this bench, over plain lapin) changes rows in the
//! source and announces each change on the events exchange at a steady
//! rate, while a producer and 2 workers run. The destination table carries
//! one extra column, stamped by a trigger whenever syncfleet writes a row;
//! the source's commit time travels with the row, so the lag of every
//! change is measured on this machine's one clock (both clusters run
//! here).

use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Connection, ConnectionProperties};

use crate::util::{Bench, Workers, db_err};

pub struct Freshness {
    pub events: usize,
    pub seen: usize,
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

pub async fn run(bench: &Bench, rate: u32, seconds: u64) -> Result<Freshness, String> {
    bench
        .src
        .batch_execute(
            "DROP TABLE IF EXISTS fresh;
             CREATE TABLE fresh (id bigint PRIMARY KEY, v text NOT NULL, committed_at timestamptz NOT NULL);
             INSERT INTO fresh SELECT i, 'seed', now() - interval '1 day' FROM generate_series(1, 100000) i;",
        )
        .await
        .map_err(db_err)?;
    bench
        .dst
        .batch_execute(
            "DROP TABLE IF EXISTS fresh;
             CREATE TABLE fresh (id bigint PRIMARY KEY, v text NOT NULL, committed_at timestamptz NOT NULL,
                                 seen_at timestamptz);
             CREATE FUNCTION stamp_seen() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN NEW.seen_at := clock_timestamp(); RETURN NEW; END $$;
             CREATE TRIGGER stamp_seen BEFORE INSERT OR UPDATE ON fresh FOR EACH ROW EXECUTE FUNCTION stamp_seen();",
        )
        .await
        .map_err(db_err)?;
    let config = bench.config("fresh", "batch_size = 1000", "");
    // A producer for the events (its first scheduled run fills the table).
    let text = std::fs::read_to_string(&config).map_err(|e| e.to_string())?;
    std::fs::write(
        &config,
        text.replace(
            "[[stream]]",
            "[producer]\ninterval = \"1h\"\nstagger = \"0s\"\n\n[[stream]]",
        ),
    )
    .map_err(|e| e.to_string())?;
    let workers = Workers::start(bench, &config, 2).await?;
    let mut producer = syncfleet_chaos::syncfleet_command(&bench.syncfleet)
        .arg("--config")
        .arg(&config)
        .arg("producer")
        .env("RUST_LOG", "warn")
        .spawn()
        .map_err(|e| e.to_string())?;
    tokio::time::sleep(Duration::from_secs(3)).await;

    let e = |e: lapin::Error| e.to_string();
    let connection = Connection::connect(&bench.amqp_url, ConnectionProperties::default())
        .await
        .map_err(e)?;
    let channel = connection.create_channel().await.map_err(e)?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(e)?;
    let exchange = format!("{}.events", bench.prefix);
    let window_start: f64 = bench
        .src
        .query_one("SELECT extract(epoch FROM clock_timestamp())::float8", &[])
        .await
        .map_err(db_err)?
        .get(0);
    // Half new rows, half updates of rows nobody has touched in the window;
    // every 10 ms, the events due by then at `rate`.
    let mut ticks = 0u64;
    let mut ticker = tokio::time::interval(Duration::from_millis(10));
    let insert = bench
        .src
        .prepare("INSERT INTO fresh VALUES ($1, 'new', clock_timestamp())")
        .await
        .map_err(db_err)?;
    let update = bench
        .src
        .prepare("UPDATE fresh SET v = 'changed', committed_at = clock_timestamp() WHERE id = $1")
        .await
        .map_err(db_err)?;
    let mut next_new: i64 = 1_000_000;
    let mut next_old: i64 = 1;
    let mut events = 0usize;
    let end = tokio::time::Instant::now() + Duration::from_secs(seconds);
    while tokio::time::Instant::now() < end {
        ticker.tick().await;
        ticks += 1;
        let due = (ticks * u64::from(rate) / 100) as usize;
        let mut confirms = Vec::with_capacity(due.saturating_sub(events));
        while events < due {
            let id = if events.is_multiple_of(2) {
                next_new += 1;
                bench
                    .src
                    .execute(&insert, &[&next_new])
                    .await
                    .map_err(db_err)?;
                next_new
            } else {
                next_old = next_old % 100_000 + 1;
                bench
                    .src
                    .execute(&update, &[&next_old])
                    .await
                    .map_err(db_err)?;
                next_old
            };
            let body = format!(r#"{{"table": "fresh", "op": "upsert", "ids": [{id}]}}"#);
            confirms.push(
                channel
                    .basic_publish(
                        exchange.as_str().into(),
                        "fresh".into(),
                        BasicPublishOptions::default(),
                        body.as_bytes(),
                        BasicProperties::default().with_delivery_mode(2),
                    )
                    .await
                    .map_err(e)?,
            );
            events += 1;
        }
        for c in confirms {
            c.await.map_err(e)?;
        }
    }
    let _ = connection.close(200, "".into()).await;

    // Let the last events land (bounded), then measure.
    let touched: i64 = bench
        .src
        .query_one(
            "SELECT count(*) FROM fresh WHERE committed_at >= to_timestamp($1)",
            &[&window_start],
        )
        .await
        .map_err(db_err)?
        .get(0);
    let drain_end = tokio::time::Instant::now() + Duration::from_secs(30);
    while seen(bench, window_start).await? < touched && tokio::time::Instant::now() < drain_end {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut lags: Vec<f64> = bench
        .dst
        .query(
            "SELECT extract(epoch FROM seen_at - committed_at)::float8 FROM fresh \
             WHERE committed_at >= to_timestamp($1) AND seen_at >= committed_at",
            &[&window_start],
        )
        .await
        .map_err(db_err)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let _ = producer.start_kill();
    let _ = producer.wait().await;
    workers.stop().await;
    if lags.is_empty() {
        return Err("no event reached the destination".into());
    }
    // A row that never arrived is no lag left out of the percentiles.
    if (lags.len() as i64) < touched {
        return Err(format!(
            "{} of {touched} changed rows did not reach the destination within 30 s of the last",
            touched - lags.len() as i64
        ));
    }
    lags.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| lags[((lags.len() as f64 - 1.0) * q).round() as usize];
    Ok(Freshness {
        events,
        seen: lags.len(),
        p50: at(0.5),
        p99: at(0.99),
        max: *lags.last().expect("not empty"),
    })
}

/// Rows changed in the window that the destination already shows.
async fn seen(bench: &Bench, window_start: f64) -> Result<i64, String> {
    bench
        .dst
        .query_one(
            "SELECT count(*) FILTER (WHERE seen_at >= committed_at) FROM fresh WHERE committed_at >= to_timestamp($1)",
            &[&window_start],
        )
        .await
        .map(|r| r.get::<_, i64>(0))
        .map_err(db_err)
}
