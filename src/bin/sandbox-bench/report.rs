//! The bench's results: rows of (scenario, figure, value, target, verdict), printed as a table
//! and written as JSON with each scenario's details.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
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

/// One figure of an earlier run, as its results file holds it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct PreviousFigure {
    /// The value as it was printed.
    pub value: String,
    /// The number behind it, when there was one.
    #[serde(default)]
    pub number: Option<f64>,
}

/// The figures of the previous run (its results file), keyed by scenario and figure, printed
/// beside the new ones.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Previous {
    figures: BTreeMap<(String, String), PreviousFigure>,
}

impl Previous {
    /// Reads the rows of a results file's text; `Err` says why it is not one.
    pub fn parse(text: &str) -> Result<Self, String> {
        #[derive(Deserialize)]
        struct File {
            rows: Vec<FileRow>,
        }
        #[derive(Deserialize)]
        struct FileRow {
            scenario: String,
            figure: String,
            #[serde(flatten)]
            previous: PreviousFigure,
        }
        let file: File = serde_json::from_str(text).map_err(|e| e.to_string())?;
        Ok(Self {
            figures: file
                .rows
                .into_iter()
                .map(|r| ((r.scenario, r.figure), r.previous))
                .collect(),
        })
    }

    /// The previous run's figure for this scenario and figure, if it had one.
    pub fn get(&self, scenario: &str, figure: &str) -> Option<&PreviousFigure> {
        self.figures.get(&(scenario.to_owned(), figure.to_owned()))
    }

    /// `value` with the previous run's figure beside it: `new (previous: old, ratio x)`, the
    /// ratio new / old when both are numbers and the old one is not zero; `value` alone when the
    /// previous run had no such figure.
    pub fn beside(&self, scenario: &str, figure: &str, value: &str, number: Option<f64>) -> String {
        match self.get(scenario, figure) {
            None => value.to_owned(),
            Some(old) => match ratio(number, old.number) {
                Some(r) => format!("{value} (previous: {}, ratio {r:.2}x)", old.value),
                None => format!("{value} (previous: {})", old.value),
            },
        }
    }
}

/// new / old, when both are finite numbers and old is not zero.
fn ratio(new: Option<f64>, old: Option<f64>) -> Option<f64> {
    let (new, old) = (new?, old?);
    let r = new / old;
    (new.is_finite() && old.is_finite() && old != 0.0 && r.is_finite()).then_some(r)
}

/// Everything the bench found.
#[derive(Debug, Default, Serialize)]
pub struct Results {
    /// The rows, in order.
    pub rows: Vec<Row>,
    /// Per-scenario details (calls per action, bounds, samples...).
    pub details: serde_json::Map<String, Value>,
    /// The previous run's figures, printed beside the new ones (not written to the results).
    #[serde(skip)]
    pub previous: Option<Previous>,
}

impl Results {
    /// No rows yet; each figure will be printed beside `previous`'s, if given.
    pub fn comparing(previous: Option<Previous>) -> Self {
        Self {
            previous,
            ..Self::default()
        }
    }

    /// A row's value, with the previous run's figure beside it when there is one.
    fn shown(&self, r: &Row) -> String {
        match &self.previous {
            Some(p) => p.beside(&r.scenario, &r.figure, &r.value, r.number),
            None => r.value.clone(),
        }
    }

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
            self.shown(&row),
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
                    self.shown(r),
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

    const OLD: &str = r#"{
      "rows": [
        {"scenario": "memory-2000", "figure": "RSS", "value": "136.0 MiB", "number": 136.0,
         "target": "< 64 MiB", "verdict": "missed"},
        {"scenario": "steady-1000", "figure": "status writes/min", "value": "0", "number": 0.0,
         "target": "0", "verdict": "met"},
        {"scenario": "rollout", "figure": "controller", "value": "SandboxDeploy",
         "target": "", "verdict": "info"}
      ],
      "details": {"run": {"mode": "full"}},
      "elapsedSeconds": 12.5
    }"#;

    #[test]
    fn previous_figures_beside_new_ones() {
        let p = Previous::parse(OLD).unwrap();
        assert_eq!(
            p.beside("memory-2000", "RSS", "68.0 MiB", Some(68.0)),
            "68.0 MiB (previous: 136.0 MiB, ratio 0.50x)"
        );
        // A zero before: no ratio, the old value still shown.
        assert_eq!(
            p.beside("steady-1000", "status writes/min", "3", Some(3.0)),
            "3 (previous: 0)"
        );
        // A figure without a number.
        assert_eq!(
            p.beside("rollout", "controller", "bench waves", None),
            "bench waves (previous: SandboxDeploy)"
        );
        // A figure the previous run did not have, or had under another scenario.
        assert_eq!(
            p.beside("memory-10000", "RSS", "200 MiB", Some(200.0)),
            "200 MiB"
        );
        assert_eq!(p.beside("memory-2000", "CPU", "1 %", Some(1.0)), "1 %");
    }

    #[test]
    fn previous_file_that_is_not_results() {
        assert!(Previous::parse("not json").is_err());
        assert!(Previous::parse(r#"{"details": {}}"#).is_err());
        assert_eq!(
            Previous::parse(r#"{"rows": []}"#).unwrap(),
            Previous::default()
        );
    }

    #[test]
    fn table_shows_previous_run() {
        let mut r = Results::comparing(Some(Previous::parse(OLD).unwrap()));
        r.row(
            "memory-2000",
            "RSS",
            "34.0 MiB",
            Some(34.0),
            "< 64 MiB",
            Verdict::Met,
            "",
        );
        r.row("reaction", "p99", "1.0 s", Some(1.0), "", Verdict::Info, "");
        let t = r.table();
        let lines: Vec<&str> = t.lines().collect();
        assert!(
            lines[2].contains("34.0 MiB (previous: 136.0 MiB, ratio 0.25x)"),
            "{t}"
        );
        assert!(lines[3].contains(" 1.0 s |"), "{t}");
        assert!(!lines[3].contains("previous"), "{t}");
        assert_eq!(lines[0].len(), lines[2].len(), "{t}");
        assert_eq!(lines[0].len(), lines[3].len(), "{t}");
        // The JSON written keeps the new figures only.
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["rows"][0]["value"], "34.0 MiB");
        assert!(json.get("previous").is_none());
    }
}
