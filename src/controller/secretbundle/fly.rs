//! Fly.io, the pure part: the token format check, the text `flyctl secrets import` reads on
//! stdin, a port of flyctl's parser of that text (to prove each value survives it), and the
//! reading of flyctl's output (app missing or failed).
//!
//! `flyctl secrets import` reads `NAME=VALUE` lines (flyctl's `internal/command/secrets/parser.go`):
//! - a line is cut at its first `=`; the name is trimmed, the value loses its leading spaces;
//! - a value starting with `"""` runs over the following lines up to the first line that ends
//!   with `"""` (kept verbatim, lines joined with `\n`);
//! - otherwise a value that starts and ends with `"` loses those two quotes; nothing is
//!   unescaped;
//! - lines are read with Go's `bufio.Scanner`: a `\r` before a line's `\n` is dropped, and a
//!   line over 64 KiB ends the input silently.
//!
//! So a one-line value is written `KEY="VALUE"`, a multi-line one `KEY="""VALUE"""`, and the
//! few values that cannot survive either form are refused, naming the key, rather than
//! imported changed.

use std::collections::BTreeMap;
use std::fmt;

/// The longest line written (flyctl's scanner gives up silently at 64 KiB).
pub const MAX_LINE: usize = 60 * 1024;

/// Why a Fly.io token is refused. Never shows the token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenProblem {
    /// Empty (or only whitespace).
    Empty,
    /// Not one of the formats Fly.io issues.
    UnknownFormat,
    /// Spaces, line breaks or control characters inside the token.
    BadCharacters,
}

impl fmt::Display for TokenProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenProblem::Empty => f.write_str("the Fly.io token is empty"),
            TokenProblem::UnknownFormat => f.write_str(
                "the value is not a Fly.io token: expected \"FlyV1 fm2_...\" (fly tokens create), a bare fm1a_/fm1r_/fm2_ macaroon, or fo1_... (fly auth token)",
            ),
            TokenProblem::BadCharacters => f.write_str(
                "the Fly.io token contains spaces, line breaks or other characters no Fly.io token has",
            ),
        }
    }
}

/// Checks that `raw` (trimmed) has the form of a token Fly.io issues: `FlyV1 ` followed by
/// comma-separated macaroons (`fm1a_`, `fm1r_`, `fm2_`), such a macaroon list without the
/// `FlyV1 ` scheme, or a `fo1_` user token. Returns the trimmed token.
pub fn check_token(raw: &str) -> Result<&str, TokenProblem> {
    let token = raw.trim();
    if token.is_empty() {
        return Err(TokenProblem::Empty);
    }
    let body = token.strip_prefix("FlyV1 ").unwrap_or(token);
    if body
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || !c.is_ascii())
    {
        return Err(TokenProblem::BadCharacters);
    }
    let charset = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=' | b'_' | b'-'))
    };
    if let Some(rest) = body.strip_prefix("fo1_") {
        return if charset(rest) && body == token {
            Ok(token)
        } else {
            Err(TokenProblem::UnknownFormat)
        };
    }
    let ok = body.split(',').all(|part| {
        ["fm1a_", "fm1r_", "fm2_"]
            .iter()
            .any(|p| part.strip_prefix(p).is_some_and(charset))
    });
    if ok {
        Ok(token)
    } else {
        Err(TokenProblem::UnknownFormat)
    }
}

/// A value `flyctl secrets import` would not read back unchanged. Names the key, never the
/// value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValueProblem {
    /// The key.
    pub key: String,
    /// Why.
    pub why: &'static str,
}

impl fmt::Display for ValueProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the value of key {} cannot pass through flyctl secrets import unchanged: {}",
            self.key, self.why
        )
    }
}

/// The stdin of `flyctl secrets import`: one `KEY="VALUE"` (or `KEY="""VALUE"""`) per key,
/// sorted. Checked against [`parse_import`] so what flyctl reads is exactly `vars`.
pub fn render_import(vars: &BTreeMap<String, String>) -> Result<String, ValueProblem> {
    let mut out = String::new();
    for (k, v) in vars {
        let snippet = render_one(k, v)?;
        // Belt and braces: what flyctl will read is exactly this key and value.
        let back = parse_import(&snippet);
        if back.as_ref().and_then(|m| m.get(k)) != Some(v) || back.is_some_and(|m| m.len() != 1) {
            return Err(ValueProblem {
                key: k.clone(),
                why: "flyctl would not read it back unchanged",
            });
        }
        out.push_str(&snippet);
    }
    Ok(out)
}

fn render_one(k: &str, v: &str) -> Result<String, ValueProblem> {
    let problem = |why| ValueProblem {
        key: k.to_string(),
        why,
    };
    if v.contains('\n') {
        let lines: Vec<&str> = v.split('\n').collect();
        let last = lines.len() - 1;
        for (i, l) in lines.iter().enumerate() {
            if i < last && l.ends_with('\r') {
                return Err(problem(
                    "a line ends with a carriage return, which flyctl drops",
                ));
            }
            if i > 0 && i < last && l.ends_with("\"\"\"") {
                return Err(problem(
                    "a line ends with \"\"\", which ends flyctl's multi-line value early",
                ));
            }
            if l.len() + k.len() + 4 > MAX_LINE {
                return Err(problem("a line is longer than flyctl reads (60 KiB)"));
            }
        }
        return Ok(format!("{k}=\"\"\"{v}\"\"\"\n"));
    }
    let line = if !v.starts_with("\"\"") && v != "\"" {
        // `"` + value + `"`, which must not start with `"""`.
        format!("{k}=\"{v}\"")
    } else if !v.starts_with("\"\"\"") && !v.ends_with('"') {
        // `KEY=""x` is read verbatim (it does not end with a quote).
        format!("{k}={v}")
    } else {
        return Err(problem(
            "it starts and ends with double quotes in a way flyctl reads as quoting",
        ));
    };
    if line.len() > MAX_LINE {
        return Err(problem("it is longer than flyctl reads (60 KiB)"));
    }
    Ok(format!("{line}\n"))
}

/// What `flyctl secrets import` reads from `text`: a port of flyctl's parser (see the module
/// doc). `None` where flyctl would fail or stop early (a line without `=`, a line too long).
pub fn parse_import(text: &str) -> Option<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let mut multi: Option<(String, String)> = None;
    // bufio.ScanLines: split on \n, drop one \r before it; a final line without \n counts.
    let body = text.strip_suffix('\n').unwrap_or(text);
    if text.is_empty() {
        return Some(out);
    }
    for raw in body.split('\n') {
        if raw.len() >= 64 * 1024 {
            return None;
        }
        let line = raw.strip_suffix('\r').unwrap_or(raw);
        match multi.take() {
            None => {
                if line.starts_with('#') || line.trim().is_empty() {
                    continue;
                }
                let (key, value) = line.split_once('=')?;
                let key = key.trim().to_string();
                let value = value.trim_start_matches(' ');
                if let Some(rest) = value.strip_prefix("\"\"\"") {
                    multi = Some((key, format!("{rest}\n")));
                } else {
                    let v = if value.len() >= 2 && value.starts_with('"') && value.ends_with('"') {
                        &value[1..value.len() - 1]
                    } else if value == "\"" {
                        // flyctl slices value[1:0] here and panics.
                        return None;
                    } else {
                        value
                    };
                    out.insert(key, v.to_string());
                }
            }
            Some((key, mut acc)) => {
                if let Some(end) = line.strip_suffix("\"\"\"") {
                    acc.push_str(end);
                    out.insert(key, acc);
                } else {
                    acc.push_str(line);
                    acc.push('\n');
                    multi = Some((key, acc));
                }
            }
        }
    }
    // An unterminated multi-line value is dropped by flyctl.
    Some(out)
}

/// What a finished `flyctl secrets import` says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FlyctlResult {
    /// Exit 0.
    Imported,
    /// The app does not exist (or the token cannot see it).
    AppMissing,
    /// Any other failure.
    Failed,
}

/// Reads flyctl's exit status and (already scrubbed) output.
pub fn classify(success: bool, output: &str) -> FlyctlResult {
    if success {
        return FlyctlResult::Imported;
    }
    let lower = output.to_ascii_lowercase();
    let missing = [
        "could not find app",
        "could not resolve app",
        "app not found",
        "failed to find app",
    ];
    if missing.iter().any(|m| lower.contains(m)) {
        FlyctlResult::AppMissing
    } else {
        FlyctlResult::Failed
    }
}

/// The last few non-empty lines of flyctl's output, at most `max` characters, for a message.
pub fn excerpt(output: &str, max: usize) -> String {
    let lines: Vec<&str> = output
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let tail = lines[lines.len().saturating_sub(3)..].join(" | ");
    if tail.chars().count() <= max {
        return tail;
    }
    let skip = tail.chars().count() - max;
    format!("...{}", tail.chars().skip(skip).collect::<String>())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn tokens() {
        let good = [
            "FlyV1 fm2_lJPECAAAAAAAAMB7xBDmN+6aGvHY8A==",
            "FlyV1 fm2_abc,fm2_def/+=",
            "fm2_abcDEF123",
            "fm1r_abc",
            "fm1a_abc",
            "fo1_abcdefghijklmnopqrstuvwxyz0123456789-_ABCDEFG",
            "  FlyV1 fm2_abc\n",
        ];
        for t in good {
            assert_eq!(check_token(t), Ok(t.trim()), "{t:?}");
        }
        let bad = [
            ("", TokenProblem::Empty),
            ("   \n", TokenProblem::Empty),
            ("not-a-token", TokenProblem::UnknownFormat),
            ("ghp_abcdefghijklmnop", TokenProblem::UnknownFormat),
            ("fm2_", TokenProblem::UnknownFormat),
            ("FlyV1 fm2_abc,ghp_x", TokenProblem::UnknownFormat),
            ("FlyV1 fo1_abc", TokenProblem::UnknownFormat),
            ("FlyV1 fm2_a b", TokenProblem::BadCharacters),
            ("fm2_abc\ndef", TokenProblem::BadCharacters),
        ];
        for (t, p) in bad {
            assert_eq!(check_token(t), Err(p.clone()), "{t:?}");
            assert!(!p.to_string().contains("abc"));
        }
    }

    #[test]
    fn flyctls_own_parser_tests_pass_on_the_port() {
        // flyctl's parser_test.go cases.
        let text =
            "\n# A comment plus a new line with spaces\n\nFOO=BAR\n# Another comment\nQUX=NAH\n";
        assert_eq!(
            parse_import(text),
            Some(vars(&[("FOO", "BAR"), ("QUX", "NAH")]))
        );
        assert_eq!(
            parse_import("FOO=BAR\r\nQUX=NAH\r\n"),
            Some(vars(&[("FOO", "BAR"), ("QUX", "NAH")]))
        );
        let multi = "\nFOO=BAR\nMULTILINE=\"\"\"SOMETHING\nANOTHER LINE\n\nENDSHERE\"\"\"\nTRAILERENV=what\nFIN=\"\"\"Here is the end,\nmy only friend\"\"\"\n";
        assert_eq!(
            parse_import(multi),
            Some(vars(&[
                ("FOO", "BAR"),
                ("MULTILINE", "SOMETHING\nANOTHER LINE\n\nENDSHERE"),
                ("TRAILERENV", "what"),
                ("FIN", "Here is the end,\nmy only friend"),
            ]))
        );
        assert_eq!(
            parse_import("FOO=\"BAR BAZ\""),
            Some(vars(&[("FOO", "BAR BAZ")]))
        );
        assert_eq!(parse_import("FOO = BAR"), Some(vars(&[("FOO", "BAR")])));
        assert_eq!(parse_import("NOEQUALS"), None);
    }

    #[test]
    fn any_representable_value_round_trips_through_flyctls_parser() {
        let values = [
            "plain",
            "",
            " leading spaces",
            "trailing spaces  ",
            "\"quoted\"",
            "\"x",
            "a\"b",
            "\"\"x",
            "# hash first",
            "a=b=c",
            "back\\slash \\n not a newline",
            "multi\nline",
            "ends with newline\n",
            "\nstarts with newline",
            "\n\n",
            "-----BEGIN KEY-----\nMIIB\"\"\"x\n-----END KEY-----\r",
            "cr\r in the middle",
            "ünïcødé ✓",
            "$HOME ${X} `x`",
        ];
        let kv: Vec<(String, String)> = values
            .iter()
            .enumerate()
            .map(|(i, v)| (format!("K{i:02}"), v.to_string()))
            .collect();
        let m: BTreeMap<String, String> = kv.into_iter().collect();
        let text = render_import(&m).unwrap();
        assert_eq!(parse_import(&text), Some(m));
    }

    #[test]
    fn unrepresentable_values_name_the_key() {
        let secret = "s3cr3t";
        for v in [
            format!("\"\"{secret}\""),
            format!("\"\"\"{secret}"),
            "\"\"".to_string(),
            "\"".to_string(),
            format!("{secret}\r\nsecond line"),
            format!("first\n{secret}\"\"\"\nlast"),
            "x".repeat(MAX_LINE + 1),
        ] {
            let e = render_import(&vars(&[("KEY_X", &v)])).unwrap_err();
            assert_eq!(e.key, "KEY_X");
            assert!(!e.to_string().contains(secret), "{e}");
        }
    }

    #[test]
    fn reading_flyctl_output() {
        assert_eq!(classify(true, "Error: anything"), FlyctlResult::Imported);
        assert_eq!(
            classify(false, "Error: Could not find App \"valet-api\"\n"),
            FlyctlResult::AppMissing
        );
        assert_eq!(
            classify(false, "Error: failed to get app: app not found"),
            FlyctlResult::AppMissing
        );
        assert_eq!(
            classify(false, "Error Could not resolve App"),
            FlyctlResult::AppMissing
        );
        assert_eq!(
            classify(false, "Error: server returned 500"),
            FlyctlResult::Failed
        );
        assert_eq!(excerpt("a\n\nb\nc\nd\n", 100), "b | c | d");
        assert_eq!(excerpt("0123456789", 4), "...6789");
    }
}
