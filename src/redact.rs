//! One redaction for every encoding, shared by the agent and the operator.
//!
//! A secret value travels in more shapes than its own: the `.env` file holds it double-quoted
//! with `\"`, `\\`, `\$`, `` \` `` and `\n` escapes ([`crate::agent::envfile::render_value`]),
//! `/health`, the state file and the ledger's payloads hold it JSON-escaped, a PEM key is
//! printed line by line, and Kubernetes and EC2 carry bytes in base64. A [`Redaction`] built
//! from a value searches for all of these [`forms`] at once and replaces each with [`MASK`]:
//!
//! - the value, trimmed and untrimmed;
//! - its `.env` escaping (the content between the double quotes), its JSON string escaping
//!   (serde's, and the Go encoder's, which also escapes `<`, `>`, `&`, U+2028 and U+2029) and
//!   the JSON escaping of its `.env` form (a JSON document quoting a printed env file);
//! - for a multi-line value, each line, trimmed, and each line's escaped forms (what a reader
//!   that prints the file or the value line by line shows);
//! - base64 of the value and of its `.env` form: the whole encoding, and the part of the
//!   encoding that is the same wherever the value sits in a longer encoded text (one for each
//!   of the three byte alignments).
//!
//! Forms shorter than [`MIN_LEN`] characters are not searched for (a `1` or `true` would turn
//! every message into confetti and protect nothing), and a value whose trimmed length is below
//! it contributes no form at all. Such short values are still caught in `KEY=value` lines: the
//! rest of a line after the `KEY=` of a known key is masked too.
//!
//! Overlapping matches (two secrets that share characters, a value and its trimmed form) are
//! merged before replacing, so no part of a secret survives at the edge of another's mask, and
//! the mask itself is never searched again.
//!
//! [`Redactor`] keeps the secrets of several sources (a token, an env file, a SecretBundle) and
//! rebuilds its [`Redaction`] when one changes. The operator has one for the whole process,
//! [`process`], fed by the SecretBundle controller and seeded at start-up; the agent has one fed
//! by its token and its env files.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, LazyLock, OnceLock, RwLock};

use aho_corasick::AhoCorasick;
use base64::Engine as _;

/// What every secret is replaced with, everywhere.
pub const MASK: &str = "***[redacted]";

/// Forms shorter than this many characters are not searched for on their own; they are still
/// caught in `KEY=value` lines.
pub const MIN_LEN: usize = 6;

/// Base64 forms shorter than this are not searched for (four characters of base64 turn up by
/// chance in any identifier).
const MIN_BASE64_LEN: usize = 8;

/// The secrets of one source: values, and the key names they stand under (for `KEY=value`
/// lines). Its `Debug` shows counts only.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secrets {
    /// Key names (`DATABASE_URL`): the rest of a line after `KEY=` is masked.
    pub keys: Vec<String>,
    /// The values themselves.
    pub values: Vec<String>,
}

impl fmt::Debug for Secrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Secrets")
            .field("keys", &self.keys)
            .field("values", &self.values.len())
            .finish()
    }
}

impl Secrets {
    /// Values with no key names (a token).
    pub fn values<S: Into<String>>(values: impl IntoIterator<Item = S>) -> Self {
        Self {
            keys: Vec::new(),
            values: values.into_iter().map(Into::into).collect(),
        }
    }

    /// Key names and values.
    pub fn new<K: Into<String>, V: Into<String>>(
        keys: impl IntoIterator<Item = K>,
        values: impl IntoIterator<Item = V>,
    ) -> Self {
        Self {
            keys: keys.into_iter().map(Into::into).collect(),
            values: values.into_iter().map(Into::into).collect(),
        }
    }

    /// The keys and values of an env file's text, valid or not, except the keys in `skip` (the
    /// image tag, which is no secret). Besides the decoded values, each `KEY=` line's text after
    /// the `=` (quotes and `export` removed) counts as a value: a file written by hand may escape
    /// differently from [`crate::agent::envfile::render_value`], and printed, it shows that text.
    pub fn from_env_text(text: &str, skip: &[&str]) -> Self {
        let mut s = Self::default();
        let skipped = |k: &str| skip.contains(&k);
        if let Ok(f) = crate::agent::envfile::parse(text) {
            for e in &f.entries {
                if !skipped(&e.key) {
                    s.keys.push(e.key.clone());
                    s.values.push(e.value.clone());
                }
            }
        }
        for line in text.lines() {
            let body = line.trim_start();
            let body = body
                .strip_prefix("export")
                .filter(|r| r.starts_with([' ', '\t']))
                .map(str::trim_start)
                .unwrap_or(body);
            let Some((key, rest)) = body.split_once('=') else {
                continue;
            };
            if body.starts_with('#') || skipped(key.trim()) {
                continue;
            }
            if crate::agent::envfile::is_valid_key(key) && !s.keys.iter().any(|k| k == key) {
                s.keys.push(key.to_string());
            }
            let rest = rest.trim();
            let unquoted = rest
                .strip_prefix(['"', '\''])
                .map(|r| r.strip_suffix(['"', '\'']).unwrap_or(r))
                .unwrap_or(rest);
            s.values.push(unquoted.to_string());
        }
        s.values.sort();
        s.values.dedup();
        s
    }

    fn extend(&mut self, other: &Secrets) {
        self.keys.extend(other.keys.iter().cloned());
        self.values.extend(other.values.iter().cloned());
    }
}

/// The content of a JSON string holding `s` (serde's escaping).
fn json_escape(s: &str) -> String {
    let j = serde_json::to_string(s).unwrap_or_default();
    j.get(1..j.len().saturating_sub(1))
        .unwrap_or_default()
        .to_string()
}

/// The same as the Go encoder (the API server, kubectl) writes it: `<`, `>`, `&`, U+2028 and
/// U+2029 escaped too.
fn go_json_escape(s: &str) -> String {
    let mut out = String::new();
    for c in json_escape(s).chars() {
        match c {
            '<' => out.push_str("\\u003c"),
            '>' => out.push_str("\\u003e"),
            '&' => out.push_str("\\u0026"),
            '\u{2028}' => out.push_str("\\u2028"),
            '\u{2029}' => out.push_str("\\u2029"),
            c => out.push(c),
        }
    }
    out
}

/// The content between the double quotes of the value's line in an env file.
fn env_escape(s: &str) -> String {
    let r = crate::agent::envfile::render_value(s);
    match r.strip_prefix('"').and_then(|x| x.strip_suffix('"')) {
        Some(inner) => inner.to_string(),
        None => r,
    }
}

/// Base64 of `bytes` (standard alphabet): the whole encoding, and for each of the three
/// alignments the encoding of the whole 3-byte groups, which is what shows of `bytes` inside the
/// encoding of a longer text.
fn base64_forms(bytes: &[u8], out: &mut Vec<String>) {
    let b64 = &base64::engine::general_purpose::STANDARD;
    out.push(b64.encode(bytes));
    for skip in 0..3 {
        let Some(rest) = bytes.get(skip..) else { break };
        let whole = rest.len() / 3 * 3;
        if whole > 0 {
            out.push(b64.encode(&rest[..whole]));
        }
    }
}

/// Every form of `value` that is searched for (see the module docs), longest first. Empty when
/// the trimmed value is shorter than [`MIN_LEN`].
pub fn forms(value: &str) -> Vec<String> {
    let long = |s: &str| s.chars().count() >= MIN_LEN;
    if !long(value.trim()) {
        return Vec::new();
    }
    let mut parts: Vec<&str> = vec![value, value.trim()];
    if value.contains(['\n', '\r']) {
        // Lines, and the pieces between any line break (a lone `\r` included).
        parts.extend(value.split('\n').map(str::trim));
        parts.extend(value.split(['\n', '\r']).map(str::trim));
    }
    let mut out: Vec<String> = Vec::new();
    for p in parts {
        if !long(p) {
            continue;
        }
        let env = env_escape(p);
        out.push(json_escape(p));
        out.push(go_json_escape(p));
        out.push(json_escape(&env));
        out.push(go_json_escape(&env));
        out.push(env);
        out.push(p.to_string());
    }
    let mut b64 = Vec::new();
    base64_forms(value.as_bytes(), &mut b64);
    let env = env_escape(value);
    if env != value {
        base64_forms(env.as_bytes(), &mut b64);
    }
    out.extend(b64.into_iter().filter(|f| f.len() >= MIN_BASE64_LEN));
    out.retain(|f| long(f));
    out.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
    out.dedup();
    out
}

/// A compiled set of secrets: replaces every form of every value, and the rest of every
/// `KEY=` line, with [`MASK`]. Its `Debug` shows counts and key names, never a value.
#[derive(Clone, Default)]
pub struct Redaction {
    /// Every form of every value, longest first.
    needles: Vec<String>,
    /// `KEY=` for every key.
    keys: Vec<String>,
    /// Built on first use (and again after a change).
    automata: OnceLock<Automata>,
}

#[derive(Clone, Default)]
struct Automata {
    needles: Option<AhoCorasick>,
    keys: Option<AhoCorasick>,
}

impl fmt::Debug for Redaction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Redaction")
            .field("needles", &self.needles.len())
            .field("keys", &self.keys)
            .finish()
    }
}

impl Redaction {
    /// A redaction of these key names and values.
    pub fn new<'a>(
        keys: impl IntoIterator<Item = &'a str>,
        values: impl IntoIterator<Item = &'a str>,
    ) -> Self {
        let mut r = Self::default();
        for k in keys {
            r.add_key(k);
        }
        for v in values {
            r.add(v);
        }
        r
    }

    /// A redaction of everything in `secrets`.
    pub fn of<'a>(secrets: impl IntoIterator<Item = &'a Secrets>) -> Self {
        let mut r = Self::default();
        for s in secrets {
            for k in &s.keys {
                r.add_key(k);
            }
            for v in &s.values {
                r.push_forms(v);
            }
        }
        r.finish();
        r
    }

    /// Adds a value (all its forms).
    pub fn add(&mut self, value: &str) {
        self.push_forms(value);
        self.finish();
    }

    /// Adds a key name: the rest of a line after `KEY=` (where `KEY` starts a word) is masked.
    pub fn add_key(&mut self, key: &str) {
        let k = format!("{}=", key.trim());
        if k.len() > 1 && !self.keys.contains(&k) {
            self.keys.push(k);
            self.keys.sort();
            self.automata = OnceLock::new();
        }
    }

    fn push_forms(&mut self, value: &str) {
        self.needles.extend(forms(value));
    }

    fn finish(&mut self) {
        self.needles
            .sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        self.needles.dedup();
        self.automata = OnceLock::new();
    }

    /// Nothing to mask.
    pub fn is_empty(&self) -> bool {
        self.needles.is_empty() && self.keys.is_empty()
    }

    fn automata(&self) -> &Automata {
        self.automata.get_or_init(|| Automata {
            needles: (!self.needles.is_empty())
                .then(|| AhoCorasick::new(&self.needles).ok())
                .flatten(),
            keys: (!self.keys.is_empty())
                .then(|| AhoCorasick::new(&self.keys).ok())
                .flatten(),
        })
    }

    /// `text` with every form of every value, and the rest of every `KEY=` line, replaced by
    /// [`MASK`] (overlapping and adjacent matches become one mask).
    pub fn redact(&self, text: &str) -> String {
        if self.is_empty() || text.is_empty() {
            return text.to_string();
        }
        let a = self.automata();
        let mut spans: Vec<(usize, usize)> = Vec::new();
        if let Some(ac) = &a.needles {
            spans.extend(ac.find_overlapping_iter(text).map(|m| (m.start(), m.end())));
        }
        if let Some(ac) = &a.keys {
            for m in ac.find_overlapping_iter(text) {
                let word_start = text[..m.start()]
                    .chars()
                    .next_back()
                    .is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_'));
                if !word_start {
                    continue;
                }
                let from = m.end();
                let to = text[from..]
                    .find(['\n', '\r'])
                    .map_or(text.len(), |i| from + i);
                if to > from {
                    spans.push((from, to));
                }
            }
        }
        if spans.is_empty() {
            return text.to_string();
        }
        spans.sort_unstable();
        // Merge overlapping and adjacent spans, then replace each merged span once.
        let mut merged: Vec<(usize, usize)> = Vec::with_capacity(spans.len());
        for (s, e) in spans {
            match merged.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        let mut out = String::with_capacity(text.len());
        let mut pos = 0;
        for (s, e) in merged {
            out.push_str(&text[pos..s]);
            out.push_str(MASK);
            pos = e;
        }
        out.push_str(&text[pos..]);
        out
    }
}

/// The secrets of several sources, by name (`token`, an env file, `secretbundle/<uid>`), and
/// their compiled [`Redaction`]. Cheap to clone (clones share the secrets); its `Debug` shows
/// counts only.
#[derive(Clone, Default)]
pub struct Redactor {
    inner: Arc<RwLock<Inner>>,
}

#[derive(Default)]
struct Inner {
    sources: BTreeMap<String, Secrets>,
    compiled: Arc<Redaction>,
}

impl fmt::Debug for Redactor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        f.debug_struct("Redactor")
            .field("sources", &inner.sources.len())
            .field("compiled", &inner.compiled)
            .finish()
    }
}

impl Redactor {
    /// Replaces the secrets of `source` (compiles again only when they changed).
    pub fn set(&self, source: &str, secrets: Secrets) {
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        if inner.sources.get(source) == Some(&secrets) {
            return;
        }
        inner.sources.insert(source.to_string(), secrets);
        inner.rebuild();
    }

    /// Replaces the secrets of `source` with these values (no key names).
    pub fn set_values<S: Into<String>>(&self, source: &str, values: impl IntoIterator<Item = S>) {
        self.set(source, Secrets::values(values));
    }

    /// Forgets the sources `keep` says no to.
    pub fn retain(&self, mut keep: impl FnMut(&str) -> bool) {
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        let before = inner.sources.len();
        inner.sources.retain(|k, _| keep(k));
        if inner.sources.len() != before {
            inner.rebuild();
        }
    }

    /// How many sources it knows.
    pub fn sources(&self) -> usize {
        self.inner
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .sources
            .len()
    }

    /// The compiled redaction as of now.
    pub fn current(&self) -> Arc<Redaction> {
        self.inner
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .compiled
            .clone()
    }

    /// `text` with every known secret masked (see [`Redaction::redact`]).
    pub fn redact(&self, text: &str) -> String {
        self.current().redact(text)
    }

    /// [`Self::redact`] in place.
    pub fn redact_in_place(&self, text: &mut String) {
        let r = self.current();
        if !r.is_empty() {
            *text = r.redact(text);
        }
    }
}

impl Inner {
    fn rebuild(&mut self) {
        let mut all = Secrets::default();
        for s in self.sources.values() {
            all.extend(s);
        }
        self.compiled = Arc::new(Redaction::of([&all]));
    }
}

/// The operator's redactor: one for the whole process, fed by the SecretBundle controller (the
/// values of every bundle's source Secrets, Fly.io and agent tokens) and seeded before the
/// controllers start; applied where an agent's or a subprocess's text enters the operator and,
/// last, by the ledger writer. Empty in a process that never feeds it.
pub fn process() -> &'static Redactor {
    static PROCESS: LazyLock<Redactor> = LazyLock::new(Redactor::default);
    &PROCESS
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::envfile;
    use std::collections::BTreeMap;

    #[test]
    fn masks_values_tokens_and_their_forms() {
        let r = Redactor::default();
        r.set_values("token", ["tok-abcdef"]);
        r.set_values("env", ["secret-1", "secret-1-long", "1"]);
        assert_eq!(
            r.redact("a tok-abcdef b secret-1-long c secret-1 d 1"),
            format!("a {MASK} b {MASK} c {MASK} d 1")
        );
        // A source's secrets are replaced as a whole.
        r.set_values("env", ["other-value"]);
        assert_eq!(r.redact("secret-1 tok-abcdef"), format!("secret-1 {MASK}"));
        r.retain(|s| s != "token");
        assert_eq!(
            r.redact("tok-abcdef other-value"),
            format!("tok-abcdef {MASK}")
        );
        assert_eq!(r.sources(), 1);
        let dbg = format!("{r:?}");
        assert!(!dbg.contains("other-value"), "{dbg}");
    }

    #[test]
    fn escaped_and_multi_line_forms() {
        let special = "sp\"ec\\ial $HOME `x` é";
        let pem = "-----BEGIN KEY-----\nMIIBOgIBAAJBAK\nXYZ\n-----END KEY-----\n";
        let r = Redaction::new([], [special, pem]);
        let env_special = envfile::render_value(special);
        let env_pem = envfile::render_value(pem);
        let text = format!(
            "raw {special}\nenv X={env_special}\njson {}\nY={env_pem}\nline MIIBOgIBAAJBAK\n",
            serde_json::to_string(special).unwrap()
        );
        let out = r.redact(&text);
        for leak in ["ec\\ial", "ec\\\\ial", "MIIBOgIBAAJBAK", "BEGIN KEY"] {
            assert!(!out.contains(leak), "{leak} in {out}");
        }
        // Short lines are not searched for on their own.
        assert!(!forms(pem).iter().any(|f| f == "XYZ"));
        // The surroundings survive.
        assert!(out.starts_with("raw ") && out.contains("\nline "), "{out}");
    }

    #[test]
    fn short_values_only_in_key_lines() {
        let r = Redaction::new(["DB_URL", "PIN"], ["ab", "12345"]);
        assert_eq!(r.redact("tab ab 12345"), "tab ab 12345");
        assert_eq!(
            r.redact("echo: DB_URL=ab\nnext PIN=12345"),
            format!("echo: DB_URL={MASK}\nnext PIN={MASK}")
        );
        // A key inside another name is not that key.
        assert_eq!(r.redact("MY_DB_URL=x"), "MY_DB_URL=x");
        // An empty value has nothing to mask.
        assert_eq!(r.redact("PIN=\n"), "PIN=\n");
    }

    #[test]
    fn overlapping_secrets_leave_no_edge() {
        let r = Redaction::new([], ["abcdef12", "12345678"]);
        assert_eq!(r.redact("x abcdef12345678 y"), format!("x {MASK} y"));
        // Masking twice changes nothing more.
        let once = r.redact("abcdef12");
        assert_eq!(r.redact(&once), once);
    }

    #[test]
    fn base64_in_every_alignment() {
        let secret = "base64-canary-value-0123";
        let r = Redaction::new([], [secret]);
        let b64 = &base64::engine::general_purpose::STANDARD;
        for pad in 0..3 {
            let blob = format!("{}{secret}-tail", "p".repeat(pad));
            let enc = b64.encode(&blob);
            let out = r.redact(&format!("user data {enc}"));
            assert!(out.contains(MASK), "{pad}: {out}");
            // What is left of the encoding decodes to nothing of the secret's middle.
            assert!(!out.contains(&enc[8..20]), "{pad}: {out}");
        }
        assert_eq!(r.redact(&b64.encode(secret)), MASK);
    }

    #[test]
    fn env_text_secrets_cover_hand_written_files() {
        let text = "# c\nexport A='single $x'\nB=\"dq \\'x\\' \\n\"\nGH_IMAGE_TAG=v1.2.3-abc\nC=plain-value\n";
        assert!(envfile::parse(text).is_ok());
        let s = Secrets::from_env_text(text, &["GH_IMAGE_TAG"]);
        assert!(s.keys.contains(&"A".to_string()) && s.keys.contains(&"C".to_string()));
        assert!(!s.keys.iter().any(|k| k == "GH_IMAGE_TAG"));
        let r = Redaction::of([&s]);
        let out = r.redact(text);
        assert!(
            !out.contains("plain-value") && !out.contains("single $x"),
            "{out}"
        );
        assert!(out.contains("GH_IMAGE_TAG=v1.2.3-abc"), "{out}");
        // A file that does not parse still gives its lines' values.
        let s = Secrets::from_env_text("A=\"unterminated-secret\nB=ok-value-2\n", &[]);
        let r = Redaction::of([&s]);
        assert!(
            !r.redact("x unterminated-secret ok-value-2")
                .contains("secret")
        );
    }

    // ---- The property: no form of a value survives, in any output the project makes. ----

    use proptest::prelude::*;

    /// Cases run by the property test (printed when it runs).
    const CASES: u32 = 2048;

    fn value_char() -> impl Strategy<Value = char> {
        prop_oneof![
            6 => prop::char::range('a', 'z'),
            2 => prop::char::range('A', 'Z'),
            2 => prop::char::range('0', '9'),
            4 => prop::sample::select(vec![
                '\n', '"', '\\', '$', '=', ' ', '\'', '`', '#', '\t', '\r', '<', '&', '/', '+',
                'é', 'ü', '✓', '中', '🔑', '\u{2028}', '\u{1}', '-', '_', '.', ':', '@', '%',
            ]),
        ]
    }

    fn value() -> impl Strategy<Value = String> {
        prop::collection::vec(value_char(), 6..48)
            .prop_map(|cs| cs.into_iter().collect::<String>())
            .prop_filter("long enough to be searched for", |v| {
                v.trim().chars().count() >= MIN_LEN
            })
    }

    /// The forms the property looks for, computed from the encoders, not from [`forms`].
    fn looked_for(v: &str) -> Vec<String> {
        let json = |s: &str| {
            let j = serde_json::to_string(s).unwrap();
            j[1..j.len() - 1].to_string()
        };
        let env = |s: &str| {
            let r = envfile::render_value(s);
            r.strip_prefix('"')
                .and_then(|x| x.strip_suffix('"'))
                .map(str::to_string)
                .unwrap_or(r)
        };
        let mut parts = vec![v.to_string(), v.trim().to_string()];
        parts.extend(v.split('\n').map(|l| l.trim().to_string()));
        let mut out = Vec::new();
        for p in parts {
            out.push(json(&p));
            out.push(env(&p));
            out.push(json(&env(&p)));
            out.push(p);
        }
        out.push(base64::engine::general_purpose::STANDARD.encode(v));
        out.retain(|f| f.chars().count() >= MIN_LEN);
        out
    }

    /// What shows of `inner` (at byte `at` of `text`) inside the base64 of `text`: the
    /// characters that encode only bytes of `inner`.
    fn base64_window(text: &str, at: usize, len: usize) -> Option<String> {
        let enc = base64::engine::general_purpose::STANDARD.encode(text);
        let first = at.div_ceil(3);
        let last = (at + len) / 3;
        (last > first)
            .then(|| enc[first * 4..last * 4].to_string())
            .filter(|w| w.len() >= MIN_BASE64_LEN)
    }

    /// Every text a value may be printed in: free text, a rendered `.env` file inside a failing
    /// command's output, that output as JSON (a state file, `/health`), line by line, and base64.
    fn outputs(v: &str) -> (Vec<String>, Option<(String, String)>) {
        let mut vars = BTreeMap::new();
        vars.insert("OTHER".to_string(), "~~keep~~".to_string());
        vars.insert("SECRET_X".to_string(), v.to_string());
        let file = envfile::render(&vars);
        let stderr = format!("~~keep~~ fake docker: pull failed\n{file}");
        let json_doc = serde_json::to_string(&serde_json::json!({
            "message": format!("~~keep~~ {v} and {stderr}"),
            "steps": [{"message": file}],
        }))
        .unwrap();
        let lines: String = v.lines().map(|l| format!("~~keep~~ {l}\n")).collect();
        let b64 = base64::engine::general_purpose::STANDARD;
        let texts = vec![
            format!("~~keep~~ {v} ~~keep~~"),
            format!("~~keep~~{v}~~keep~~"),
            stderr.clone(),
            json_doc,
            lines,
            format!("~~keep~~ {}", b64.encode(v)),
        ];
        // The rendered file in base64, with the window that encodes only the value's bytes.
        let rendered = envfile::render_value(v);
        let mut at = file.find(&format!("SECRET_X={rendered}")).unwrap() + "SECRET_X=".len();
        let mut len = rendered.len();
        if rendered.starts_with('"') {
            // The quotes are the file's, not the value's.
            at += 1;
            len -= 2;
        }
        let window =
            base64_window(&file, at, len).map(|w| (format!("~~keep~~ {}", b64.encode(&file)), w));
        (texts, window)
    }

    #[test]
    fn no_form_of_a_value_survives_redaction() {
        use proptest::test_runner::{Config, TestCaseError, TestRunner};
        let mut runner = TestRunner::new(Config {
            cases: CASES,
            ..Config::default()
        });
        let ran = std::sync::atomic::AtomicU32::new(0);
        let result = runner.run(&(value(), value()), |(v, other)| {
            ran.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let r = Redactor::default();
            // No key names: each form must be found as it is (the `KEY=` rule would hide a
            // missing form in the env file's line).
            r.set_values("env", [v.clone()]);
            // An unrelated secret of another source, masked at the same time.
            r.set_values("token", [other.clone()]);
            let (texts, window) = outputs(&v);
            for text in &texts {
                let out = r.redact(text);
                if !out.contains("~~keep~~") {
                    return Err(TestCaseError::fail(format!("everything masked: {out:?}")));
                }
                // Masks are no part of any form: take them out before looking.
                let seen = out.replace(MASK, "\u{0}");
                for f in looked_for(&v) {
                    if seen.contains(&f) {
                        return Err(TestCaseError::fail(format!(
                            "{f:?} survives in {out:?} (from {text:?})"
                        )));
                    }
                }
            }
            if let Some((text, w)) = window {
                let out = r.redact(&text);
                if out.contains(&w) {
                    return Err(TestCaseError::fail(format!(
                        "base64 {w:?} survives in {out:?}"
                    )));
                }
            }
            Ok(())
        });
        let ran = ran.into_inner();
        // Recorded for the notes (run with --nocapture to see it).
        println!("PROPTEST no_form_of_a_value_survives_redaction: {ran} cases passed");
        if let Err(e) = result {
            panic!("{e}");
        }
        assert!(ran >= CASES, "only {ran} cases ran");
    }
}
