//! The Markdown report.

use std::time::Duration;

pub struct Section {
    title: String,
    note: String,
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

pub struct Report {
    machine: String,
    sections: Vec<Section>,
    pub elapsed: Duration,
}

impl Report {
    pub fn new(machine: String) -> Self {
        Self {
            machine,
            sections: Vec::new(),
            elapsed: Duration::ZERO,
        }
    }

    pub fn section(&mut self, title: &str, note: &str, header: &[&str], rows: Vec<Vec<String>>) {
        self.sections.push(Section {
            title: title.into(),
            note: note.into(),
            header: header.iter().map(|h| h.to_string()).collect(),
            rows,
        });
    }

    pub fn markdown(&self) -> String {
        let mut out = format!(
            "# syncfleet benchmarks\n\nWritten by `just bench`. Machine: {}. The bench took {:.0} s. \
             Every speed is shown beside a reference measured in the same run, as a ratio \
             (reference time / measured time: 1.00 is as fast as the reference).\n",
            self.machine,
            self.elapsed.as_secs_f64()
        );
        for s in &self.sections {
            out.push_str(&format!("\n## {}\n\n{}\n\n", s.title, s.note));
            out.push_str(&format!("| {} |\n", s.header.join(" | ")));
            out.push_str(&format!(
                "|{}\n",
                s.header.iter().map(|_| " --- |").collect::<String>()
            ));
            for r in &s.rows {
                out.push_str(&format!("| {} |\n", r.join(" | ")));
            }
        }
        out.push_str(include_str!("decisions.md"));
        out
    }
}
