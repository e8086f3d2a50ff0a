//! Env files (`KEY=VALUE` lines, as docker compose's `.env`/`env_file` and systemd's
//! `EnvironmentFile` read them): parsing and validation, rendering with correct quoting, editing one
//! key in place (what `gh-deploy.sh` did with `sed`), and writing files atomically.
//!
//! The syntax accepted is the common subset of those readers:
//! - blank lines and lines starting with `#` (after optional spaces) are ignored;
//! - `KEY=VALUE`, optionally preceded by `export `; `KEY` matches `[A-Za-z_][A-Za-z0-9_]*` and is
//!   immediately followed by `=`;
//! - a value is unquoted (the rest of the line, trailing spaces and a ` #comment` removed; it may
//!   not contain quotes or backslashes, which readers treat differently), single-quoted (literal,
//!   may span lines) or double-quoted (backslash escapes `\n \r \t \\ \" \$ \``, may span lines);
//!   after a closing quote only spaces and a `#comment` may follow;
//! - a key may appear once.
//!
//! Errors name the line and what is wrong, never the value (an env file holds secrets).

use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// One `KEY=VALUE` of an env file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The variable name.
    pub key: String,
    /// The value, unquoted and unescaped.
    pub value: String,
    /// 1-based line where the entry starts.
    pub line: usize,
}

/// A parsed env file, entries in file order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EnvFile {
    /// The entries, in file order.
    pub entries: Vec<Entry>,
}

impl EnvFile {
    /// The value of `key`, if the file sets it.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|e| e.key == key)
            .map(|e| e.value.as_str())
    }

    /// The keys, in file order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|e| e.key.as_str())
    }

    /// The values, in file order.
    pub fn values(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|e| e.value.as_str())
    }

    /// Every entry as a map from key to value.
    pub fn to_map(&self) -> BTreeMap<String, String> {
        self.entries
            .iter()
            .map(|e| (e.key.clone(), e.value.clone()))
            .collect()
    }
}

/// Why a line is not valid. The messages never quote the value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnvErrorKind {
    /// The content is not valid UTF-8.
    NotUtf8,
    /// A NUL byte.
    NulByte,
    /// No `=` on a line that is neither blank nor a comment.
    MissingEquals,
    /// The part before `=` is not a variable name (spaces around `=` land here too).
    InvalidName,
    /// The key was defined before.
    DuplicateKey {
        /// The key.
        key: String,
        /// The 1-based line of its first definition.
        first_line: usize,
    },
    /// A quoted value never closes.
    UnterminatedQuote,
    /// Something other than spaces or a comment after a closing quote.
    TrailingCharacters,
    /// An unquoted value holds a quote or a backslash.
    UnquotedSpecial,
}

/// An env file that is not valid, with the 1-based line where the problem starts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct EnvError {
    /// The 1-based line where the problem starts.
    pub line: usize,
    /// What is wrong.
    pub kind: EnvErrorKind,
}

impl fmt::Display for EnvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match &self.kind {
            EnvErrorKind::NotUtf8 => "content is not valid UTF-8".to_string(),
            EnvErrorKind::NulByte => "contains a NUL byte".to_string(),
            EnvErrorKind::MissingEquals => {
                "expected KEY=VALUE (no '=' found; comments start with '#')".to_string()
            }
            EnvErrorKind::InvalidName => {
                "invalid variable name (expected [A-Za-z_][A-Za-z0-9_]* directly followed by '=')"
                    .to_string()
            }
            EnvErrorKind::DuplicateKey { key, first_line } => {
                format!("duplicate key {key} (first defined on line {first_line})")
            }
            EnvErrorKind::UnterminatedQuote => "quoted value is never closed".to_string(),
            EnvErrorKind::TrailingCharacters => {
                "unexpected characters after the closing quote".to_string()
            }
            EnvErrorKind::UnquotedSpecial => {
                "unquoted value contains a quote or backslash (quote the value)".to_string()
            }
        };
        write!(f, "line {}: {what}", self.line)
    }
}

/// Whether `name` is a valid variable name.
pub fn is_valid_key(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Parses bytes (which must be UTF-8) as an env file.
pub fn parse_bytes(bytes: &[u8]) -> Result<EnvFile, EnvError> {
    let text = std::str::from_utf8(bytes).map_err(|e| EnvError {
        line: 1 + bytes[..e.valid_up_to()]
            .iter()
            .filter(|b| **b == b'\n')
            .count(),
        kind: EnvErrorKind::NotUtf8,
    })?;
    parse(text)
}

/// Parses and validates an env file.
pub fn parse(text: &str) -> Result<EnvFile, EnvError> {
    if let Some(pos) = text.find('\0') {
        return Err(EnvError {
            line: line_of(text, pos),
            kind: EnvErrorKind::NulByte,
        });
    }
    let lines: Vec<&str> = text
        .split('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .collect();
    let mut entries: Vec<Entry> = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line_no = i + 1;
        let line = lines[i];
        i += 1;
        let trimmed = line.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let err = |kind| EnvError {
            line: line_no,
            kind,
        };
        let body = trimmed
            .strip_prefix("export")
            .filter(|rest| rest.starts_with([' ', '\t']))
            .map(str::trim_start)
            .unwrap_or(trimmed);
        let Some(eq) = body.find('=') else {
            return Err(err(EnvErrorKind::MissingEquals));
        };
        let key = &body[..eq];
        if !is_valid_key(key) {
            return Err(err(EnvErrorKind::InvalidName));
        }
        let raw = &body[eq + 1..];
        let value = match raw.chars().next() {
            Some(q @ ('"' | '\'')) => {
                // A quoted value may span lines: gather until the closing quote.
                let (value, rest, consumed) = read_quoted(q, &raw[1..], &lines[i..])
                    .ok_or_else(|| err(EnvErrorKind::UnterminatedQuote))?;
                i += consumed;
                let rest = rest.trim_start();
                if !(rest.is_empty() || rest.starts_with('#')) {
                    return Err(EnvError {
                        line: line_no + consumed,
                        kind: EnvErrorKind::TrailingCharacters,
                    });
                }
                value
            }
            _ => {
                let v = strip_inline_comment(raw).trim_end();
                if v.contains(['"', '\'', '\\', '`']) {
                    return Err(err(EnvErrorKind::UnquotedSpecial));
                }
                v.to_string()
            }
        };
        if let Some(first) = entries.iter().find(|e| e.key == key) {
            return Err(err(EnvErrorKind::DuplicateKey {
                key: key.to_string(),
                first_line: first.line,
            }));
        }
        entries.push(Entry {
            key: key.to_string(),
            value,
            line: line_no,
        });
    }
    Ok(EnvFile { entries })
}

fn line_of(text: &str, byte_pos: usize) -> usize {
    1 + text.as_bytes()[..byte_pos]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
}

/// ` #comment` ends an unquoted value; a `#` inside a word does not (`a#b` stays).
fn strip_inline_comment(raw: &str) -> &str {
    let bytes = raw.as_bytes();
    for (i, b) in bytes.iter().enumerate() {
        if *b == b'#' && (i == 0 || bytes[i - 1] == b' ' || bytes[i - 1] == b'\t') {
            return &raw[..i];
        }
    }
    raw
}

/// Reads a quoted value starting after the opening quote on `first`, continuing on `more` lines.
/// Returns the value, what follows the closing quote on its line, and how many of `more` it used.
fn read_quoted<'a>(
    quote: char,
    first: &'a str,
    more: &[&'a str],
) -> Option<(String, &'a str, usize)> {
    let mut value = String::new();
    let mut consumed = 0;
    let mut current = first;
    loop {
        let mut chars = current.char_indices();
        while let Some((idx, c)) = chars.next() {
            if c == quote {
                return Some((value, &current[idx + 1..], consumed));
            }
            if quote == '"' && c == '\\' {
                match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, 'r')) => value.push('\r'),
                    Some((_, 't')) => value.push('\t'),
                    Some((_, e @ ('\\' | '"' | '$' | '`'))) => value.push(e),
                    Some((_, other)) => {
                        value.push('\\');
                        value.push(other);
                    }
                    // A backslash at the end of a line continues the value on the next line.
                    None => {
                        value.push('\\');
                    }
                }
                continue;
            }
            value.push(c);
        }
        let next = more.get(consumed)?;
        consumed += 1;
        value.push('\n');
        current = next;
    }
}

/// Whether a value can be written without quotes and read back the same by every reader.
fn needs_quotes(value: &str) -> bool {
    value.is_empty()
        || !value.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'_' | b'-'
                        | b'.'
                        | b'/'
                        | b':'
                        | b'@'
                        | b'%'
                        | b'+'
                        | b','
                        | b'='
                        | b'?'
                        | b'&'
                )
        })
}

/// Renders one value: unquoted when safe, else double-quoted with escapes (one line always).
pub fn render_value(value: &str) -> String {
    if !needs_quotes(value) {
        return value.to_string();
    }
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '$' => out.push_str("\\$"),
            // A backtick stays as it is: compose's env_file reader keeps the backslash of `\``.
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Renders a whole env file deterministically: sorted keys, one `KEY=VALUE` per line.
/// Keys must be valid names (see [`is_valid_key`]).
pub fn render(vars: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    for (k, v) in vars {
        out.push_str(k);
        out.push('=');
        out.push_str(&render_value(v));
        out.push('\n');
    }
    out
}

/// Sets `key` to `value` in the text of a valid env file, changing nothing else: the line that
/// defines `key` is replaced, or a line is appended. `value` is rendered with [`render_value`].
pub fn set_var(text: &str, key: &str, value: &str) -> Result<String, EnvError> {
    edit_var(text, key, Some(value))
}

/// Removes the definition of `key` from the text of a valid env file, changing nothing else.
pub fn remove_var(text: &str, key: &str) -> Result<String, EnvError> {
    edit_var(text, key, None)
}

fn edit_var(text: &str, key: &str, value: Option<&str>) -> Result<String, EnvError> {
    let parsed = parse(text)?;
    let new_line = value.map(|v| format!("{key}={}", render_value(v)));
    let Some(entry) = parsed.entries.iter().find(|e| e.key == key) else {
        let mut out = text.to_string();
        if let Some(l) = new_line {
            if !out.is_empty() && !out.ends_with('\n') {
                out.push('\n');
            }
            out.push_str(&l);
            out.push('\n');
        }
        return Ok(out);
    };
    // The entry spans from its line to the line of the next non-blank content; work out the
    // number of lines it takes by re-parsing just its lines.
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let start = entry.line - 1;
    let span = entry_span(&lines[start..]);
    let mut out = String::with_capacity(text.len() + 32);
    for l in &lines[..start] {
        out.push_str(l);
    }
    if let Some(l) = new_line {
        out.push_str(&l);
        let last = lines[start + span - 1];
        if last.ends_with("\r\n") {
            out.push_str("\r\n");
        } else if last.ends_with('\n') {
            out.push('\n');
        }
    }
    for l in &lines[start + span..] {
        out.push_str(l);
    }
    Ok(out)
}

/// How many lines the entry that starts at `lines[0]` takes (more than one for a multi-line
/// quoted value).
fn entry_span(lines: &[&str]) -> usize {
    for n in 1..=lines.len() {
        let chunk: String = lines[..n].concat();
        if let Ok(f) = parse(&chunk)
            && f.entries.len() == 1
        {
            return n;
        }
    }
    lines.len()
}

/// sha256 of `bytes`, lower-case hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Writes `bytes` to `path` atomically: a temporary file in the same directory (created
/// exclusively with `mode`), written and fsynced, given the owner and group of the file it
/// replaces, renamed over `path`, and the directory fsynced. A reader sees the old file or the
/// new one, never a part. On error the old file is untouched and the temporary file removed.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?
        .to_string_lossy();
    let existing = std::fs::metadata(path).ok();
    let tmp = dir.join(format!(
        ".{name}.tmp-{}-{}",
        std::process::id(),
        TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        // The umask may have narrowed the mode; set it exactly.
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        if let Some(meta) = &existing {
            let mine = f.metadata()?;
            if mine.uid() != meta.uid() || mine.gid() != meta.gid() {
                std::os::unix::fs::chown(&tmp, Some(meta.uid()), Some(meta.gid())).map_err(
                    |e| {
                        io::Error::new(
                            e.kind(),
                            format!(
                                "cannot keep owner {}:{} of {}: {e}",
                                meta.uid(),
                                meta.gid(),
                                path.display()
                            ),
                        )
                    },
                )?;
            }
        }
        drop(f);
        std::fs::rename(&tmp, path)?;
        // Make the rename durable.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_common_forms() {
        let text = "# comment\n\nA=1\nexport B=two words  # trailing\nC='single $x \"q\"'\nD=\"dq \\\"x\\\" \\n \\$HOME\"\nE=\nF=a#b\r\nG=\"multi\nline\"\n  H=postgresql://u:p@h:5432/db?x=1&y=2\n";
        let f = parse(text).unwrap();
        let m = f.to_map();
        assert_eq!(m["A"], "1");
        assert_eq!(m["B"], "two words");
        assert_eq!(m["C"], "single $x \"q\"");
        assert_eq!(m["D"], "dq \"x\" \n $HOME");
        assert_eq!(m["E"], "");
        assert_eq!(m["F"], "a#b");
        assert_eq!(m["G"], "multi\nline");
        assert_eq!(m["H"], "postgresql://u:p@h:5432/db?x=1&y=2");
        assert_eq!(f.entries.iter().find(|e| e.key == "G").unwrap().line, 9);
    }

    fn err_of(text: &str) -> EnvError {
        parse(text).unwrap_err()
    }

    #[test]
    fn errors_name_the_line_never_the_value() {
        let secret = "s3cr3t-VALUE";
        let cases = [
            (format!("A=1\n{secret}\n"), 2, EnvErrorKind::MissingEquals),
            (
                format!("A=1\n\nB C={secret}\n"),
                3,
                EnvErrorKind::InvalidName,
            ),
            (format!("KEY ={secret}\n"), 1, EnvErrorKind::InvalidName),
            (format!("1KEY={secret}\n"), 1, EnvErrorKind::InvalidName),
            (
                format!("A=\"{secret}\nB=2\n"),
                1,
                EnvErrorKind::UnterminatedQuote,
            ),
            (
                format!("A='{secret}' x\n"),
                1,
                EnvErrorKind::TrailingCharacters,
            ),
            (format!("A={secret}\"\n"), 1, EnvErrorKind::UnquotedSpecial),
            (format!("A=1\nx\0{secret}\n"), 2, EnvErrorKind::NulByte),
        ];
        for (text, line, kind) in cases {
            let e = err_of(&text);
            assert_eq!((e.line, &e.kind), (line, &kind), "{text:?}");
            let msg = e.to_string();
            assert!(msg.starts_with(&format!("line {line}:")), "{msg}");
            assert!(!msg.contains(secret), "{msg}");
        }
        let e = err_of("A=1\nB=2\nA=3\n");
        assert_eq!(e.line, 3);
        assert_eq!(
            e.to_string(),
            "line 3: duplicate key A (first defined on line 1)"
        );
    }

    #[test]
    fn not_utf8_names_the_line() {
        let e = parse_bytes(b"A=1\nB=\xff\n").unwrap_err();
        assert_eq!((e.line, e.kind), (2, EnvErrorKind::NotUtf8));
    }

    #[test]
    fn render_round_trips() {
        let mut m = BTreeMap::new();
        for (i, v) in [
            "plain",
            "",
            "with space",
            "quote\"s and 'single'",
            "back\\slash",
            "$dollar and `tick`",
            "new\nline\r\ttab",
            "postgresql://u:p@h:5432/db?pgbouncer=true&connection_limit=5",
            "#hash",
            "ünïcode",
        ]
        .iter()
        .enumerate()
        {
            m.insert(format!("K{i}"), v.to_string());
        }
        let text = render(&m);
        assert_eq!(parse(&text).unwrap().to_map(), m);
        // Deterministic.
        assert_eq!(render(&m), text);
    }

    #[test]
    fn set_and_remove_touch_one_line() {
        let text = "# head\nA=1\nGH_IMAGE_TAG=old\nM=\"x\ny\"\nZ=2";
        let t = set_var(text, "GH_IMAGE_TAG", "v2").unwrap();
        assert_eq!(t, "# head\nA=1\nGH_IMAGE_TAG=v2\nM=\"x\ny\"\nZ=2");
        let t2 = set_var(&t, "NEW", "n").unwrap();
        assert_eq!(t2, "# head\nA=1\nGH_IMAGE_TAG=v2\nM=\"x\ny\"\nZ=2\nNEW=n\n");
        let t3 = remove_var(&t2, "M").unwrap();
        assert_eq!(t3, "# head\nA=1\nGH_IMAGE_TAG=v2\nZ=2\nNEW=n\n");
        let t4 = set_var("", "K", "v").unwrap();
        assert_eq!(t4, "K=v\n");
        assert_eq!(remove_var("A=1\n", "B").unwrap(), "A=1\n");
        let crlf = set_var("A=1\r\nB=2\r\n", "A", "3").unwrap();
        assert_eq!(crlf, "A=3\r\nB=2\r\n");
    }

    #[test]
    fn atomic_write_sets_mode_and_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(".env");
        std::fs::write(&p, "OLD=1\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_atomic(&p, b"NEW=2\n", 0o600).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"NEW=2\n");
        let meta = std::fs::metadata(&p).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        // No temporary file left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        // Owner and group are kept (only root can give a file away, so only checked as root).
        let mine = std::fs::metadata(&p).unwrap();
        if mine.uid() == 0 {
            std::os::unix::fs::chown(&p, Some(4321), Some(4322)).unwrap();
            write_atomic(&p, b"NEWER=3\n", 0o600).unwrap();
            let meta = std::fs::metadata(&p).unwrap();
            assert_eq!((meta.uid(), meta.gid()), (4321, 4322));
            assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        }
        assert_eq!(
            sha256_hex(b"NEW=2\n"),
            hex::encode(Sha256::digest(b"NEW=2\n"))
        );
    }
}
