//! Live progress of a run: a bar per stream on a terminal (batches
//! done/total, rows, rows/s, ETA), plain lines when not on one.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::time::Instant;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use syncfleet_db::control::{RunSummary, StreamProgress};

pub struct Progress {
    run_id: i64,
    /// `None` when stderr is not a terminal.
    bars: Option<(MultiProgress, HashMap<String, ProgressBar>)>,
    last_line: String,
    /// Rows and when they were seen, per stream, for rows/s.
    seen: HashMap<String, (i64, Instant, f64)>,
}

impl Progress {
    pub fn new(run_id: i64) -> Self {
        Self {
            run_id,
            bars: std::io::stderr()
                .is_terminal()
                .then(|| (MultiProgress::new(), HashMap::new())),
            last_line: String::new(),
            seen: HashMap::new(),
        }
    }

    /// rows/s of a stream, smoothed over updates.
    fn rate(&mut self, stream: &str, rows: i64) -> f64 {
        let now = Instant::now();
        let entry = self
            .seen
            .entry(stream.to_string())
            .or_insert((rows, now, 0.0));
        let dt = now.duration_since(entry.1).as_secs_f64();
        if dt >= 0.5 {
            let instant = (rows - entry.0) as f64 / dt;
            entry.2 = if entry.2 == 0.0 {
                instant
            } else {
                0.5 * entry.2 + 0.5 * instant
            };
            entry.0 = rows;
            entry.1 = now;
        }
        entry.2
    }

    pub fn update(&mut self, run: &RunSummary, streams: &[StreamProgress]) {
        let rates: Vec<f64> = streams
            .iter()
            .map(|s| self.rate(&s.stream, s.rows))
            .collect();
        match &mut self.bars {
            Some((multi, bars)) => {
                for (s, rate) in streams.iter().zip(rates) {
                    let bar = bars.entry(s.stream.clone()).or_insert_with(|| {
                        let bar = multi.add(ProgressBar::new(0));
                        bar.set_style(
                            ProgressStyle::with_template(
                                "{prefix:<20} [{bar:30}] {pos}/{len} batches  {msg}  eta {eta}",
                            )
                            .expect("a valid template")
                            .progress_chars("=> "),
                        );
                        bar.set_prefix(s.stream.clone());
                        bar
                    });
                    bar.set_length(s.batches_total.max(0) as u64);
                    bar.set_position(s.batches_done.max(0) as u64);
                    bar.set_message(format!("{} rows, {:.0} rows/s", s.rows, rate));
                }
            }
            None => {
                let line = streams
                    .iter()
                    .map(|s| format!("{} {}/{}", s.stream, s.batches_done, s.batches_total))
                    .collect::<Vec<_>>()
                    .join("  ");
                if line != self.last_line {
                    eprintln!("run {} {}: {line}", self.run_id, run.status);
                    self.last_line = line;
                }
            }
        }
    }

    pub fn finish(&self) {
        if let Some((_, bars)) = &self.bars {
            for bar in bars.values() {
                bar.finish();
            }
        }
    }
}
