//! Fly.io: the Machines API's requests and answers ([`api`]; the calls are in
//! [`super::fly_api`]), the token format check, the text `flyctl secrets import` reads on
//! stdin, a port of flyctl's parser of that text (to prove each value survives it), the
//! reading of flyctl's output (app missing or failed), and at the edge what a reconcile knows
//! of the apps ([`observe`]) and flyctl's process ([`import`]).
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

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::hash::{Hash, Hasher};

use tokio::io::AsyncWriteExt;
use tracing::debug;

use super::decide::{Content, FlyBlock, FlyObs, Outcome};
use super::scrub::Scrubber;
use super::sources::{Lookup, SecretCache};
use super::{ControllerSettings, Error};
use crate::api::{FlyMethod, SecretBundleSpec};

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

// ---------------------------------------------------------------------------------------------
// The Machines API (method `Api`): the pure part. The HTTP calls are in `fly_api.rs`.
// ---------------------------------------------------------------------------------------------

/// What Fly.io's documentation says about the app secrets endpoints, in our words (no CLI is
/// needed for any of it):
///
/// - "Working with the Machines API": the public base URL is `https://api.machines.dev`; every
///   request carries `Authorization: Bearer <token>` (a token from `fly tokens deploy` manages
///   one app). Status codes: 200/201/202/204 success; 400 bad parameters; 401 the token is
///   missing or invalid; 404 the resource (here the app) was not found; 408 timed out; 422
///   validation failed; 5xx an error of Fly's servers. Rate limits apply per action and per app
///   (about 1 request per second with short bursts); the page lists no 429 body, so a 429 is
///   read like any error and its `Retry-After` (seconds) is honoured when present.
/// - The Machines API reference (its OpenAPI spec, operations "List app secrets", "Update app
///   secrets", "Delete an app secret"): `GET /v1/apps/{app}/secrets` answers
///   `{"secrets": [{"name", "digest", "created_at", "updated_at"}]}` (values only with
///   `show_secrets`, which this operator never asks for); `POST /v1/apps/{app}/secrets` takes
///   `{"values": {"NAME": "value", "OTHER": null}}` (a null unsets) and answers the secrets
///   with their new digests and a `version`; errors are `{"error": "..."}`.
/// - "Apps resource" (section "Set app secrets"): Machines inherit the app's secrets, and
///   existing Machines must be updated to pick up secrets set after they were created. So a
///   set through the API is *staged*: the status says Staged, never Synced.
/// - "Secrets and Fly Apps" and "fly secrets list": the list shows a digest of each value, never
///   the value. How Fly computes the digest is not documented, so drift is found by comparing
///   the digests listed now with those Fly answered right after this bundle's last set
///   (recorded as a fingerprint in status, and per key in memory to name the keys).
pub mod api {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use serde::Deserialize;
    use sha2::{Digest, Sha256};

    /// The public base URL.
    pub const DEFAULT_URL: &str = "https://api.machines.dev";

    /// One secret as listed (or as an update answers it).
    #[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
    pub struct Listed {
        /// The secret's name.
        pub name: String,
        /// Fly's digest of its value.
        #[serde(default)]
        pub digest: Option<String>,
        /// When it was last set.
        #[serde(default)]
        pub updated_at: Option<String>,
    }

    /// The answer of `GET /v1/apps/{app}/secrets` (and, with `version`, of the update).
    #[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
    pub struct SecretList {
        /// The secrets.
        #[serde(default)]
        pub secrets: Vec<Listed>,
        /// The secrets' version (update answers).
        #[serde(default)]
        pub version: Option<i64>,
    }

    /// Fly's error body.
    #[derive(Clone, Debug, Default, Deserialize)]
    struct ErrorBody {
        #[serde(default)]
        error: Option<String>,
    }

    /// What this bundle knows of the app before a visit.
    #[derive(Clone, Debug, Default, PartialEq, Eq)]
    pub struct Known {
        /// The app's status entry holds the current content (last set, or confirmed).
        pub current: bool,
        /// The keys this bundle set there before.
        pub managed: Vec<String>,
        /// The fingerprint recorded after the last set.
        pub fingerprint: Option<String>,
        /// Per key, the digest Fly answered after the last set (this process only).
        pub digests: BTreeMap<String, String>,
    }

    /// What to do on a visit.
    #[derive(Clone, Debug, Default, PartialEq, Eq)]
    pub struct Visit {
        /// Set every desired key (the content is new, or drifted, or a key is missing).
        pub set: bool,
        /// Keys this bundle set before, no longer in it, and still on the app: unset them.
        pub unset: Vec<String>,
        /// Managed keys whose digest differs from the one recorded (or that are missing).
        pub drifted: Vec<String>,
        /// The recorded fingerprint differs, though no single key could be named (after a
        /// restart, with no digests in memory).
        pub drift_unnamed: bool,
    }

    /// sha256 (hex) over the names and digests of `keys` as listed: `name\0digest\n`, sorted,
    /// a missing key or digest counting as empty.
    pub fn fingerprint<'a>(
        keys: impl IntoIterator<Item = &'a String>,
        listed: &[Listed],
    ) -> String {
        let by_name: BTreeMap<&str, &str> = listed
            .iter()
            .map(|l| (l.name.as_str(), l.digest.as_deref().unwrap_or("")))
            .collect();
        let mut keys: Vec<&String> = keys.into_iter().collect();
        keys.sort();
        keys.dedup();
        let mut h = Sha256::new();
        for k in keys {
            h.update(k.as_bytes());
            h.update([0]);
            h.update(by_name.get(k.as_str()).copied().unwrap_or("").as_bytes());
            h.update(b"\n");
        }
        hex::encode(h.finalize())
    }

    /// Decides a visit: the desired keys, what this bundle knew, and the app's list.
    pub fn visit<'a>(
        desired: impl IntoIterator<Item = &'a String>,
        known: &Known,
        listed: &[Listed],
    ) -> Visit {
        let desired: Vec<&String> = desired.into_iter().collect();
        let on_app: BTreeMap<&str, Option<&str>> = listed
            .iter()
            .map(|l| (l.name.as_str(), l.digest.as_deref()))
            .collect();
        let mut v = Visit {
            unset: known
                .managed
                .iter()
                .filter(|k| !desired.contains(k) && on_app.contains_key(k.as_str()))
                .cloned()
                .collect(),
            ..Visit::default()
        };
        if !known.current {
            v.set = true;
            return v;
        }
        for k in &desired {
            match on_app.get(k.as_str()) {
                None => v.drifted.push((*k).clone()),
                Some(d) => {
                    if let Some(was) = known.digests.get(*k)
                        && Some(was.as_str()) != *d
                    {
                        v.drifted.push((*k).clone());
                    }
                }
            }
        }
        let fp_differs = known
            .fingerprint
            .as_ref()
            .is_some_and(|f| *f != fingerprint(desired.iter().copied(), listed));
        v.drift_unnamed = v.drifted.is_empty() && fp_differs;
        v.set = !v.drifted.is_empty() || v.drift_unnamed;
        v
    }

    /// The `POST /v1/apps/{app}/secrets` body: every desired value, and null for each key to
    /// unset. Holds values: never logged, never in a message.
    pub fn update_body(
        values: &BTreeMap<String, String>,
        set: bool,
        unset: &[String],
    ) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        if set {
            for (k, v) in values {
                m.insert(k.clone(), serde_json::Value::String(v.clone()));
            }
        }
        for k in unset {
            m.insert(k.clone(), serde_json::Value::Null);
        }
        serde_json::json!({ "values": m })
    }

    /// What a failed call means.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Problem {
        /// 401 or 403: the token is missing, invalid, or may not manage this app.
        Unauthorized,
        /// 404: no such app (or the token cannot see it).
        AppNotFound,
        /// 400 or 422: Fly refused the request (a name or value it does not accept).
        Rejected,
        /// 429: too many requests.
        Throttled,
        /// 408 or 5xx: Fly's servers failed or timed out.
        Unavailable,
        /// No answer (connection, TLS, timeout) or an answer that is not Fly's.
        Unreachable,
    }

    impl Problem {
        /// The CamelCase reason status and conditions carry.
        pub fn reason(self) -> &'static str {
            use crate::api::bundle_reason as r;
            match self {
                Problem::Unauthorized => r::FLY_UNAUTHORIZED,
                Problem::AppNotFound => r::FLY_APP_NOT_FOUND,
                Problem::Rejected => r::FLY_REJECTED,
                Problem::Throttled => r::FLY_THROTTLED,
                Problem::Unavailable => r::FLY_UNAVAILABLE,
                Problem::Unreachable => r::FLY_UNREACHABLE,
            }
        }
    }

    /// A failed call, read: what it means, Fly's own words (an excerpt, to be scrubbed), and
    /// how long Fly asked to wait.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct Failure {
        /// What it means.
        pub problem: Problem,
        /// The HTTP status.
        pub status: u16,
        /// Fly's `error` text, or the start of the body.
        pub said: String,
        /// `Retry-After`, in seconds.
        pub retry_after: Option<Duration>,
    }

    /// Reads a non-2xx answer.
    pub fn classify(status: u16, body: &str, retry_after: Option<&str>) -> Failure {
        let problem = match status {
            401 | 403 => Problem::Unauthorized,
            404 => Problem::AppNotFound,
            400 | 422 => Problem::Rejected,
            429 => Problem::Throttled,
            408 | 500..=599 => Problem::Unavailable,
            _ => Problem::Unreachable,
        };
        let said = serde_json::from_str::<ErrorBody>(body)
            .ok()
            .and_then(|b| b.error)
            .unwrap_or_else(|| body.trim().to_string());
        let said = super::excerpt(&said, 200);
        let retry_after = retry_after
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(|s| Duration::from_secs(s.min(3600)));
        Failure {
            problem,
            status,
            said,
            retry_after,
        }
    }

    /// The message for a failure (`said` already scrubbed), telling what to fix.
    pub fn message(app: &str, f: &Failure) -> String {
        let what = match f.problem {
            Problem::Unauthorized => format!(
                "Fly.io refused the token for app {app} ({}): store a token that may manage the app (fly tokens create deploy -a {app}) in the token Secret",
                f.status
            ),
            Problem::AppNotFound => format!(
                "Fly.io app {app} does not exist (or the token cannot see it) (404); skipped until the spec or the content changes or refreshInterval passes"
            ),
            Problem::Rejected => format!(
                "Fly.io refused the secrets of app {app} ({}); retried with backoff",
                f.status
            ),
            Problem::Throttled => match f.retry_after {
                Some(d) => format!(
                    "Fly.io throttled the requests for app {app} (429); retried in {}s as it asked",
                    d.as_secs()
                ),
                None => format!(
                    "Fly.io throttled the requests for app {app} (429); retried with backoff"
                ),
            },
            Problem::Unavailable => format!(
                "Fly.io's API failed for app {app} ({}); retried with backoff",
                f.status
            ),
            Problem::Unreachable => format!(
                "Fly.io's API answered app {app} unexpectedly ({}); retried with backoff",
                f.status
            ),
        };
        if f.said.is_empty() {
            what
        } else {
            format!("{what}: {}", f.said)
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn listed(kv: &[(&str, &str)]) -> Vec<Listed> {
            kv.iter()
                .map(|(k, d)| Listed {
                    name: k.to_string(),
                    digest: Some(d.to_string()),
                    updated_at: None,
                })
                .collect()
        }

        fn keys(k: &[&str]) -> Vec<String> {
            k.iter().map(|s| s.to_string()).collect()
        }

        #[test]
        fn new_content_sets_everything_and_unsets_only_managed_keys_still_there() {
            let desired = keys(&["A", "B"]);
            let known = Known {
                current: false,
                managed: keys(&["A", "GONE", "ALREADY_GONE"]),
                ..Known::default()
            };
            let on_app = listed(&[("A", "d1"), ("GONE", "d2"), ("THEIRS", "d3")]);
            let v = visit(&desired, &known, &on_app);
            assert!(v.set);
            assert_eq!(v.unset, keys(&["GONE"]));
            assert!(v.drifted.is_empty());
            // THEIRS (set by someone else) is never touched, in the body either.
            let values: BTreeMap<String, String> =
                [("A".into(), "1".into()), ("B".into(), "2".into())].into();
            let body = update_body(&values, v.set, &v.unset);
            assert_eq!(
                body,
                serde_json::json!({"values": {"A": "1", "B": "2", "GONE": null}})
            );
        }

        #[test]
        fn current_content_with_the_same_digests_needs_nothing() {
            let desired = keys(&["A", "B"]);
            let on_app = listed(&[("A", "d1"), ("B", "d2"), ("THEIRS", "x")]);
            let known = Known {
                current: true,
                managed: desired.clone(),
                fingerprint: Some(fingerprint(&desired, &on_app)),
                digests: [("A".into(), "d1".into()), ("B".into(), "d2".into())].into(),
            };
            assert_eq!(visit(&desired, &known, &on_app), Visit::default());
            // Someone else's secret changing is not drift of this bundle.
            let mut other = on_app.clone();
            other[2].digest = Some("y".into());
            assert_eq!(visit(&desired, &known, &other), Visit::default());
        }

        #[test]
        fn changed_or_missing_managed_keys_are_drift_and_set_again() {
            let desired = keys(&["A", "B"]);
            let on_app = listed(&[("A", "d1"), ("B", "d2")]);
            let known = Known {
                current: true,
                managed: desired.clone(),
                fingerprint: Some(fingerprint(&desired, &on_app)),
                digests: [("A".into(), "d1".into()), ("B".into(), "d2".into())].into(),
            };
            let changed = listed(&[("A", "d1"), ("B", "zz")]);
            let v = visit(&desired, &known, &changed);
            assert!(v.set);
            assert_eq!(v.drifted, keys(&["B"]));
            let missing = listed(&[("B", "d2")]);
            assert_eq!(visit(&desired, &known, &missing).drifted, keys(&["A"]));
            // After a restart (no digests in memory) the fingerprint still shows it.
            let restarted = Known {
                digests: BTreeMap::new(),
                ..known.clone()
            };
            let v = visit(&desired, &restarted, &changed);
            assert!(v.set && v.drift_unnamed && v.drifted.is_empty());
            assert!(!visit(&desired, &restarted, &on_app).set);
        }

        #[test]
        fn the_fingerprint_depends_on_names_and_digests_only_of_the_keys_given() {
            let a = listed(&[("A", "1"), ("B", "2"), ("X", "9")]);
            let b = listed(&[("B", "2"), ("A", "1")]);
            let k = keys(&["B", "A"]);
            assert_eq!(fingerprint(&k, &a), fingerprint(&k, &b));
            assert_ne!(fingerprint(&k, &a), fingerprint(&k, &listed(&[("A", "1")])));
            assert_ne!(
                fingerprint(&k, &a),
                fingerprint(&k, &listed(&[("A", "1"), ("B", "3")]))
            );
            assert_eq!(fingerprint(&k, &a).len(), 64);
        }

        #[test]
        fn errors_are_read_by_status() {
            let f = classify(401, r#"{"error":"unauthorized"}"#, None);
            assert_eq!(f.problem, Problem::Unauthorized);
            assert_eq!(f.said, "unauthorized");
            assert_eq!(f.problem.reason(), "FlyUnauthorized");
            assert_eq!(classify(403, "", None).problem, Problem::Unauthorized);
            let f = classify(404, r#"{"error":"app not found"}"#, None);
            assert_eq!(f.problem.reason(), "FlyAppNotFound");
            assert_eq!(classify(422, "{}", None).problem, Problem::Rejected);
            assert_eq!(classify(400, "bad", None).said, "bad");
            let f = classify(429, r#"{"error":"rate limited"}"#, Some("7"));
            assert_eq!(f.problem, Problem::Throttled);
            assert_eq!(f.retry_after, Some(Duration::from_secs(7)));
            assert_eq!(
                classify(429, "", Some("Wed, 21 Oct 2015 07:28:00 GMT")).retry_after,
                None
            );
            assert_eq!(classify(503, "", None).problem, Problem::Unavailable);
            assert_eq!(classify(500, "<html>", None).said, "<html>");
            assert_eq!(classify(302, "", None).problem, Problem::Unreachable);
            let m = message("api", &classify(401, "{}", None));
            assert!(m.contains("fly tokens create deploy -a api"), "{m}");
            let m = message("api", &classify(429, "{}", Some("3")));
            assert!(m.contains("retried in 3s"), "{m}");
        }

        #[test]
        fn answers_parse_as_documented() {
            let l: SecretList = serde_json::from_str(
                r#"{"secrets":[{"name":"A","digest":"abc","created_at":"2026-01-01T00:00:00Z","updated_at":"2026-01-01T00:00:00Z"}]}"#,
            )
            .unwrap();
            assert_eq!(l.secrets[0].name, "A");
            assert_eq!(l.secrets[0].digest.as_deref(), Some("abc"));
            let u: SecretList =
                serde_json::from_str(r#"{"secrets":[],"version":3,"Version":3}"#).unwrap();
            assert_eq!(u.version, Some(3));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The edge: what a reconcile knows of the apps, and flyctl's process.
// ---------------------------------------------------------------------------------------------

/// Variables the `flyctl` child keeps from the operator's environment (everything else is
/// cleared, so nothing of the operator's own credentials reaches it).
pub const FLYCTL_PASSTHROUGH: &[&str] = &[
    "PATH",
    "HOME",
    "TMPDIR",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "HTTPS_PROXY",
    "HTTP_PROXY",
    "NO_PROXY",
    "https_proxy",
    "http_proxy",
    "no_proxy",
];

/// What a reconcile knows of a bundle's Fly.io apps.
pub struct FlyTargets {
    /// Each app as [`decide`](super::decide) sees it.
    pub obs: Vec<FlyObs>,
    /// The usable token of each app (never logged; taught to the redactor).
    pub tokens: HashMap<String, String>,
    /// The text `flyctl secrets import` reads, or why the content cannot be written so.
    pub import: Result<String, ValueProblem>,
}

/// Reads each app's token (checking its format) and decides its method: the Machines API when
/// the spec says so, or names no method and the operator's default is the API; flyctl
/// otherwise. Every token
/// read is added to `scrubber`.
pub(super) async fn observe(
    secrets: &mut SecretCache<'_>,
    spec: &SecretBundleSpec,
    content: &Content,
    settings: &ControllerSettings,
    scrubber: &mut Scrubber,
) -> Result<FlyTargets, Error> {
    let import = render_import(&content.vars);
    let api_default = settings.fly_api_default;
    let mut obs = Vec::new();
    let mut tokens = HashMap::new();
    let default_method = if api_default {
        FlyMethod::Api
    } else {
        FlyMethod::Flyctl
    };
    for t in &spec.targets.fly_apps {
        let api = t.method.unwrap_or(default_method) == FlyMethod::Api;
        let r = &t.token_secret_ref;
        let mut fingerprint = 0;
        let mut blocked = match secrets.fly_token(r).await? {
            Lookup::SecretMissing => Some(FlyBlock::Credential(format!(
                "the token Secret {} does not exist",
                r.name
            ))),
            Lookup::KeyMissing => Some(FlyBlock::Credential(format!(
                "the token Secret {} has no key {}",
                r.name, r.key
            ))),
            Lookup::Found(bytes) => {
                let raw = String::from_utf8_lossy(&bytes).to_string();
                scrubber.add(raw.trim());
                match check_token(&raw) {
                    Ok(tok) => {
                        let mut h = std::collections::hash_map::DefaultHasher::new();
                        tok.hash(&mut h);
                        fingerprint = h.finish();
                        tokens.insert(t.app.clone(), tok.to_string());
                        None
                    }
                    Err(p) => Some(FlyBlock::Credential(format!(
                        "token Secret {} key {}: {p}",
                        r.name, r.key
                    ))),
                }
            }
        };
        // The API takes any value as JSON; only flyctl's import text has limits.
        if blocked.is_none()
            && !api
            && let Err(e) = &import
        {
            blocked = Some(FlyBlock::Value(e.to_string()));
        }
        obs.push(FlyObs {
            app: t.app.clone(),
            blocked,
            fingerprint,
            api,
        });
    }
    Ok(FlyTargets {
        obs,
        tokens,
        import,
    })
}

/// Runs `flyctl secrets import --app <app> [--stage]` for the bundle `object`
/// (namespace/name): the import text on stdin, the token in the child's environment only
/// (never argv, never a file), the rest of the environment cleared but for
/// [`FLYCTL_PASSTHROUGH`] and the configured extras, bounded by the configured timeout. `hash`
/// is the content's; everything flyctl prints is scrubbed before it reaches a message.
#[allow(clippy::too_many_arguments)]
pub(super) async fn import(
    s: &ControllerSettings,
    object: &str,
    app: &str,
    stage: bool,
    token: &str,
    stdin: &str,
    hash: &str,
    scrubber: &Scrubber,
) -> Outcome {
    let mut cmd = tokio::process::Command::new(&s.flyctl);
    cmd.args(["secrets", "import", "--app", app]);
    if stage {
        cmd.arg("--stage");
    }
    cmd.env_clear();
    for k in FLYCTL_PASSTHROUGH {
        if let Some(v) = std::env::var_os(k) {
            cmd.env(k, v);
        }
    }
    for (k, v) in &s.flyctl_env {
        cmd.env(k, v);
    }
    // The token goes in the child's environment only: never argv, never a file.
    cmd.env("FLY_API_TOKEN", token);
    cmd.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    debug!(bundle = %object, app = %app, stage, flyctl = %s.flyctl.display(), "flyctl secrets import");
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return Outcome::Failed {
                message: format!("cannot run {}: {e}", s.flyctl.display()),
            };
        }
    };
    let stdin_pipe = child.stdin.take();
    let write = async move {
        if let Some(mut p) = stdin_pipe {
            // A child that exits without reading its input is reported by its exit status.
            let _ = p.write_all(stdin.as_bytes()).await;
            let _ = p.shutdown().await;
        }
    };
    let (_, out) = tokio::join!(
        write,
        tokio::time::timeout(s.flyctl_timeout, child.wait_with_output())
    );
    let out = match out {
        Err(_) => {
            return Outcome::Failed {
                message: format!(
                    "flyctl secrets import --app {app} did not finish within {:?}",
                    s.flyctl_timeout
                ),
            };
        }
        Ok(Err(e)) => {
            return Outcome::Failed {
                message: format!("waiting for flyctl: {e}"),
            };
        }
        Ok(Ok(o)) => o,
    };
    let text = scrubber.scrub(&format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ));
    let excerpt = excerpt(&text, 300);
    match classify(out.status.success(), &text) {
        FlyctlResult::Imported => Outcome::Synced {
            hash: hash.to_owned(),
        },
        FlyctlResult::AppMissing => Outcome::Skipped {
            message: format!(
                "Fly.io app {app} does not exist (or the token cannot see it); skipped until the spec or the content changes or refreshInterval passes: {excerpt}"
            ),
        },
        FlyctlResult::Failed => Outcome::Failed {
            message: format!(
                "flyctl secrets import --app {app} failed ({}): {excerpt}",
                out.status
            ),
        },
    }
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
