//! Scrubbing: every text that leaves the controller (a status message, an Event, a log line)
//! and may hold something a child process or an agent printed passes through a [`Scrubber`]
//! built from the bundle's values and the tokens in use, so no value reaches it even when a
//! failing `flyctl` echoes its input.

use std::fmt;

/// What a value is replaced with.
pub const REDACTED: &str = "[redacted]";

/// Values shorter than this are not searched for on their own (a `1` or `on` would turn every
/// message into confetti and protects nothing); they are still caught in `KEY=value` lines.
pub const MIN_LEN: usize = 3;

/// Replaces secret values (and their escaped forms) in text.
#[derive(Clone, Default)]
pub struct Scrubber {
    /// Longest first, so a value that contains another is replaced whole.
    needles: Vec<String>,
    /// `KEY=` prefixes: the rest of such a line is replaced (an echoed input line).
    keys: Vec<String>,
}

impl fmt::Debug for Scrubber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scrubber")
            .field("needles", &self.needles.len())
            .field("keys", &self.keys)
            .finish()
    }
}

impl Scrubber {
    /// A scrubber for these key names and secret values.
    pub fn new<'a>(
        keys: impl IntoIterator<Item = &'a str>,
        values: impl IntoIterator<Item = &'a str>,
    ) -> Self {
        let mut s = Self {
            needles: Vec::new(),
            keys: keys.into_iter().map(|k| format!("{k}=")).collect(),
        };
        for v in values {
            s.add(v);
        }
        s
    }

    /// Adds one secret (a value or a token): itself, its escaped forms (JSON, the `.env`
    /// quoting) and, for a multi-line value, each of its lines.
    pub fn add(&mut self, value: &str) {
        let mut forms = vec![value.to_string(), value.trim().to_string()];
        if let Ok(json) = serde_json::to_string(value) {
            forms.push(json[1..json.len() - 1].to_string());
        }
        let rendered = crate::agent::envfile::render_value(value);
        forms.push(
            rendered
                .strip_prefix('"')
                .and_then(|r| r.strip_suffix('"'))
                .unwrap_or(&rendered)
                .to_string(),
        );
        if value.contains('\n') {
            forms.extend(value.split('\n').map(|l| l.trim().to_string()));
        }
        for f in forms {
            if f.chars().count() >= MIN_LEN && !self.needles.contains(&f) {
                self.needles.push(f);
            }
        }
        self.needles
            .sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
    }

    /// `text` with every secret replaced by [`REDACTED`], and the rest of every line that
    /// starts a `KEY=` of the bundle replaced too.
    pub fn scrub(&self, text: &str) -> String {
        let mut out = text.to_string();
        for n in &self.needles {
            if out.contains(n.as_str()) {
                out = out.replace(n.as_str(), REDACTED);
            }
        }
        if self.keys.is_empty() {
            return out;
        }
        let mut lines: Vec<String> = Vec::new();
        for line in out.split('\n') {
            match self.keys.iter().filter_map(|k| key_end(line, k)).min() {
                Some(end) => lines.push(format!("{}{REDACTED}", &line[..end])),
                None => lines.push(line.to_string()),
            }
        }
        lines.join("\n")
    }
}

/// Where the value starts after `key_eq` (`KEY=`) in `line`, when `KEY` stands as a word.
fn key_end(line: &str, key_eq: &str) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = line[from..].find(key_eq) {
        let at = from + i;
        let word_start = line[..at]
            .chars()
            .next_back()
            .is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_'));
        if word_start {
            return Some(at + key_eq.len());
        }
        from = at + key_eq.len();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_values_and_their_forms() {
        let canary = "canary-Z9 \"quoted\" $x";
        let s = Scrubber::new(["DB_URL"], [canary, "ab", "multi-line-one\nline-two-xx"]);
        let text = format!(
            "plain {canary}; json {}; env {}; lines line-two-xx",
            serde_json::to_string(canary).unwrap(),
            crate::agent::envfile::render_value(canary)
        );
        let out = s.scrub(&text);
        assert!(!out.contains("canary-Z9"), "{out}");
        assert!(!out.contains("line-two-xx"), "{out}");
        assert!(out.contains(REDACTED));
        // Short values are left alone on their own...
        assert_eq!(s.scrub("tab ab"), "tab ab");
        // ...but not in an echoed KEY=value line.
        assert_eq!(
            s.scrub("echo: DB_URL=ab\nnext"),
            format!("echo: DB_URL={REDACTED}\nnext")
        );
        assert_eq!(s.scrub("MY_DB_URL=x"), "MY_DB_URL=x");
        let dbg = format!("{s:?}");
        assert!(!dbg.contains("canary"), "{dbg}");
    }
}
