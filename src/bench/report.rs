//! The bench's results: rows of (scenario, figure, value, target, verdict), printed as a table
//! and written as JSON with each scenario's details.

use serde::Serialize;
use serde_json::Value;

/// How a figure compares with its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// The target is met.
    Met,
    /// The target is missed.
    Missed,
    /// A figure without a target.
    Info,
    /// The scenario could not run; the note says why.
    NotRun,
}

impl Verdict {
    fn as_str(self) -> &'static str {
        match self {
            Verdict::Met => "met",
            Verdict::Missed => "MISSED",
            Verdict::Info => "",
            Verdict::NotRun => "not run",
        }
    }

    /// `Met` when `ok`, else `Missed`.
    pub fn of(ok: bool) -> Self {
        if ok { Verdict::Met } else { Verdict::Missed }
    }
}

/// One line of the table.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// The scenario (`converge-500`, ...).
    pub scenario: String,
    /// What is measured.
    pub figure: String,
    /// The measured value, formatted.
    pub value: String,
    /// The number behind `value`, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub number: Option<f64>,
    /// The target, formatted ("" when none).
    pub target: String,
    /// How it compares.
    pub verdict: Verdict,
    /// A short note (settings, what limits it).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub note: String,
}

/// Everything the bench found.
#[derive(Debug, Default, Serialize)]
pub struct Results {
    /// The rows, in order.
    pub rows: Vec<Row>,
    /// Per-scenario details (calls per action, bounds, samples...).
    pub details: serde_json::Map<String, Value>,
}

impl Results {
    /// Adds a row.
    #[allow(clippy::too_many_arguments)]
    pub fn row(
        &mut self,
        scenario: &str,
        figure: &str,
        value: impl Into<String>,
        number: Option<f64>,
        target: &str,
        verdict: Verdict,
        note: impl Into<String>,
    ) {
        let row = Row {
            scenario: scenario.to_owned(),
            figure: figure.to_owned(),
            value: value.into(),
            number,
            target: target.to_owned(),
            verdict,
            note: note.into(),
        };
        println!(
            "[bench] {:<14} {:<44} {:>14}  target {:<14} {}{}",
            row.scenario,
            row.figure,
            row.value,
            if row.target.is_empty() {
                "-"
            } else {
                &row.target
            },
            row.verdict.as_str(),
            if row.note.is_empty() {
                String::new()
            } else {
                format!("  ({})", row.note)
            }
        );
        self.rows.push(row);
    }

    /// Records a scenario's details.
    pub fn detail(&mut self, scenario: &str, value: Value) {
        self.details.insert(scenario.to_owned(), value);
    }

    /// The table, as text.
    pub fn table(&self) -> String {
        let headers = ["scenario", "figure", "value", "target", "verdict"];
        let cells: Vec<[String; 5]> = self
            .rows
            .iter()
            .map(|r| {
                [
                    r.scenario.clone(),
                    r.figure.clone(),
                    r.value.clone(),
                    if r.target.is_empty() {
                        "-".into()
                    } else {
                        r.target.clone()
                    },
                    r.verdict.as_str().to_owned(),
                ]
            })
            .collect();
        let mut width = headers.map(str::len);
        for c in &cells {
            for (w, s) in width.iter_mut().zip(c) {
                *w = (*w).max(s.chars().count());
            }
        }
        let line = |c: &[String; 5]| {
            let mut s = String::from("|");
            for (i, cell) in c.iter().enumerate() {
                let pad = width[i] - cell.chars().count();
                if i == 2 {
                    s.push_str(&format!(" {}{} |", " ".repeat(pad), cell));
                } else {
                    s.push_str(&format!(" {}{} |", cell, " ".repeat(pad)));
                }
            }
            s
        };
        let mut out = String::new();
        out.push_str(&line(&headers.map(str::to_owned)));
        out.push('\n');
        out.push('|');
        for w in width {
            out.push_str(&format!("{}|", "-".repeat(w + 2)));
        }
        out.push('\n');
        for c in &cells {
            out.push_str(&line(c));
            out.push('\n');
        }
        let notes: Vec<String> = self
            .rows
            .iter()
            .filter(|r| !r.note.is_empty())
            .map(|r| format!("- {} / {}: {}", r.scenario, r.figure, r.note))
            .collect();
        if !notes.is_empty() {
            out.push_str("\nNotes:\n");
            for n in notes {
                out.push_str(&n);
                out.push('\n');
            }
        }
        out
    }
}

/// The value at quantile `q` (0..=1) of `values` by the nearest-rank method (`None` if empty).
pub fn quantile(values: &[f64], q: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    Some(v[rank - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_quantiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), Some(50.0));
        assert_eq!(quantile(&v, 0.99), Some(99.0));
        assert_eq!(quantile(&[3.0], 0.99), Some(3.0));
        assert_eq!(quantile(&[], 0.5), None);
    }

    #[test]
    fn table_aligns() {
        let mut r = Results::default();
        r.row("a", "b", "1", Some(1.0), "", Verdict::Info, "");
        r.row(
            "long-name",
            "figure",
            "12.5 s",
            None,
            "<= 3",
            Verdict::Missed,
            "x",
        );
        let t = r.table();
        assert!(t.contains("MISSED"), "{t}");
        assert_eq!(
            t.lines().next().unwrap().len(),
            t.lines().nth(2).unwrap().len()
        );
    }
}
