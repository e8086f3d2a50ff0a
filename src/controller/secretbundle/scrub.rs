//! Scrubbing: every text that leaves the controller (a status message, an Event, a log line)
//! and may hold something a child process or an agent printed passes through a [`Scrubber`]
//! built from the bundle's values and the tokens in use, so no value reaches it even when a
//! failing `flyctl` echoes its input. The masking itself is the project's one redaction,
//! [`crate::redact`]: every form of a value (escaped for `.env` and JSON, line by line, base64).

use crate::redact::Redaction;

/// What a value is replaced with.
pub use crate::redact::MASK as REDACTED;
/// Values shorter than this are not searched for on their own; they are still caught in
/// `KEY=value` lines.
pub use crate::redact::MIN_LEN;

/// Replaces secret values (in every form) in text. Its `Debug` shows counts and key names.
#[derive(Clone, Debug, Default)]
pub struct Scrubber(Redaction);

impl Scrubber {
    /// A scrubber for these key names and secret values.
    pub fn new<'a>(
        keys: impl IntoIterator<Item = &'a str>,
        values: impl IntoIterator<Item = &'a str>,
    ) -> Self {
        Self(Redaction::new(keys, values))
    }

    /// A scrubber for a bundle's rendered variables: their names and values.
    pub fn for_vars(vars: &std::collections::BTreeMap<String, String>) -> Self {
        Self::new(
            vars.keys().map(String::as_str),
            vars.values().map(String::as_str),
        )
    }

    /// Adds one secret (a value or a token), in all its forms.
    pub fn add(&mut self, value: &str) {
        self.0.add(value);
    }

    /// `text` with every secret replaced by [`REDACTED`], and the rest of every line that
    /// starts a `KEY=` of the bundle replaced too.
    pub fn scrub(&self, text: &str) -> String {
        self.0.redact(text)
    }
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
