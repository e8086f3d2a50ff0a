//! Types and CEL fragments shared by the three resources.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;
use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// A Go-style duration as the API accepts it: one or more number-unit pairs, for example `30s`,
/// `5m`, `1h30m` or `1.5h`. Units: `ms`, `s`, `m`, `h`.
pub const DURATION_REGEX: &str = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$";

/// A reference to one key of a Secret in the same namespace as the object that names it.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret, in the same namespace.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key within the Secret's data.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// The environment a sandbox serves. It is tagged on the instance and is what deploy webhooks
/// and selectors match on.
#[derive(
    schemars::JsonSchema,
    Serialize,
    Deserialize,
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
)]
#[serde(rename_all = "lowercase")]
pub enum Environment {
    /// Development.
    Dev,
    /// Staging.
    Staging,
    /// Production.
    Prod,
}

impl Environment {
    /// The lower-case name used in tags, labels and the ledger.
    pub fn as_str(self) -> &'static str {
        match self {
            Environment::Dev => "dev",
            Environment::Staging => "staging",
            Environment::Prod => "prod",
        }
    }
}

impl std::fmt::Display for Environment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A label key, as Kubernetes accepts it on an object: an optional DNS-subdomain prefix of at
/// most 253 characters and `/`, then a name of 1 to 63 letters, digits, `-`, `_` and `.` that
/// starts and ends with a letter or digit. (CEL rules use this regex together with
/// [`LABEL_KEY_PREFIX_TOO_LONG_REGEX`].)
pub const LABEL_KEY_REGEX: &str = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$";
/// Matches a label key whose prefix is longer than 253 characters.
pub const LABEL_KEY_PREFIX_TOO_LONG_REGEX: &str = r"^[^/]{254,}/";
/// A label value: empty, or 1 to 63 letters, digits, `-`, `_` and `.` starting and ending with a
/// letter or digit.
pub const LABEL_VALUE_REGEX: &str = r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$";

/// What is wrong with `key` as a label key, or `None` when Kubernetes would accept it.
pub fn label_key_problem(key: &str) -> Option<&'static str> {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix {
        if p.is_empty() || p.len() > 253 {
            return Some("its prefix (before /) must be 1 to 253 characters");
        }
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if !p.split('.').all(label_ok) {
            return Some(
                "its prefix (before /) must be a DNS subdomain: lower-case letters, digits, - and .",
            );
        }
    }
    if name.is_empty() || name.len() > 63 {
        return Some("its name (after any prefix/) must be 1 to 63 characters");
    }
    if !label_name_chars_ok(name) {
        return Some(
            "its name must be letters, digits, -, _ and ., starting and ending with a letter or digit",
        );
    }
    None
}

/// What is wrong with `value` as a label value, or `None` when Kubernetes would accept it.
pub fn label_value_problem(value: &str) -> Option<&'static str> {
    if value.is_empty() {
        return None;
    }
    if value.len() > 63 {
        return Some("a label value is at most 63 characters");
    }
    if !label_name_chars_ok(value) {
        return Some(
            "a label value is letters, digits, -, _ and ., starting and ending with a letter or digit",
        );
    }
    None
}

fn label_name_chars_ok(s: &str) -> bool {
    let alnum = |b: u8| b.is_ascii_alphanumeric();
    let b = s.as_bytes();
    !b.is_empty()
        && alnum(b[0])
        && alnum(b[b.len() - 1])
        && b.iter()
            .all(|&c| alnum(c) || matches!(c, b'-' | b'_' | b'.'))
}

/// The operator of a selector requirement. The API server accepts only these four (the CRD
/// schema makes it an enum); [`SelectorOperator::parse`] reads one an older CRD stored.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SelectorOperator {
    /// The label is set to one of `values`.
    In,
    /// The label is unset or set to none of `values`.
    NotIn,
    /// The label is set (to anything); `values` must be empty.
    Exists,
    /// The label is unset; `values` must be empty.
    DoesNotExist,
}

impl SelectorOperator {
    /// Every operator, in the order the API documents them.
    pub const ALL: [SelectorOperator; 4] = [
        SelectorOperator::In,
        SelectorOperator::NotIn,
        SelectorOperator::Exists,
        SelectorOperator::DoesNotExist,
    ];

    /// The operator's name as the API spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            SelectorOperator::In => "In",
            SelectorOperator::NotIn => "NotIn",
            SelectorOperator::Exists => "Exists",
            SelectorOperator::DoesNotExist => "DoesNotExist",
        }
    }

    /// The operator named `s` (exact spelling), if it is one.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|o| o.as_str() == s)
    }

    /// Whether the operator takes values (In, NotIn) or none (Exists, DoesNotExist).
    pub fn takes_values(self) -> bool {
        matches!(self, SelectorOperator::In | SelectorOperator::NotIn)
    }
}

// The schema of one `matchExpressions` entry: a bounded, checked form of Kubernetes'
// LabelSelectorRequirement. The Rust field keeps k8s-openapi's type (its operator a string), so
// an object stored before these rules still reads, and is reported as an invalid spec rather than
// stopping the watch.
/// One label requirement: a key, an operator and, for In and NotIn, the values.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.operator in ['Exists', 'DoesNotExist'] ? (!has(self.values) || size(self.values) == 0) : (has(self.values) && size(self.values) > 0)").message(Message::Expression("'matchExpressions with key ' + self.key + ': operator ' + self.operator + (self.operator in ['Exists', 'DoesNotExist'] ? ' takes no values: remove values' : ' needs at least one value in values')".into())))]
pub struct SelectorRequirement {
    /// The label key.
    #[schemars(length(min = 1, max = 317))]
    #[x_kube(validation = Rule::new(r"self.matches('^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$') && !self.matches('^[^/]{254,}/')").message(Message::Expression("'matchExpressions key ' + self + ' is not a label key: an optional DNS-subdomain prefix and /, then a name of 1 to 63 letters, digits, -, _ or . starting and ending with a letter or digit'".into())))]
    pub key: String,
    /// In, NotIn, Exists or DoesNotExist.
    pub operator: SelectorOperator,
    /// The values for In and NotIn; empty for Exists and DoesNotExist.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(max = 63)))]
    #[x_kube(validation = Rule::new(r"self.all(v, v.matches('^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$'))").message(Message::Expression("'matchExpressions value ' + self.filter(v, !v.matches('^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$'))[0] + ' is not a label value: at most 63 letters, digits, -, _ or . starting and ending with a letter or digit'".into())))]
    pub values: Vec<String>,
}

/// Selects Sandboxes in the object's namespace by label and, optionally, by environment. An
/// empty selector selects every Sandbox in the namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SandboxSelector {
    /// Labels a Sandbox must carry, all of them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 32, "additionalProperties" = {"type": "string", "maxLength": 63}))]
    #[x_kube(
        validation = Rule::new(r"self.all(k, k.matches('^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$') && !k.matches('^[^/]{254,}/'))").message(Message::Expression(r"'matchLabels key ' + self.filter(k, !(k.matches('^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$') && !k.matches('^[^/]{254,}/')))[0] + ' is not a label key: an optional DNS-subdomain prefix and /, then a name of 1 to 63 letters, digits, -, _ or . starting and ending with a letter or digit'".into())),
        validation = Rule::new(r"self.all(k, self[k].matches('^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$'))").message(Message::Expression(r"'matchLabels value of ' + self.filter(k, !self[k].matches('^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$'))[0] + ' is not a label value: at most 63 letters, digits, -, _ or . starting and ending with a letter or digit'".into()))
    )]
    pub match_labels: BTreeMap<String, String>,
    /// Label requirements (operator In, NotIn, Exists or DoesNotExist), all of which must hold.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(with = "Vec<SelectorRequirement>", length(max = 16))]
    pub match_expressions: Vec<LabelSelectorRequirement>,
    /// Only Sandboxes of this environment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment: Option<Environment>,
}

impl SandboxSelector {
    /// Whether a Sandbox with these labels and this environment is selected. A requirement with
    /// an unknown operator (stored before the CRD checked it) selects nothing; see
    /// [`Self::problems`].
    pub fn matches(&self, labels: &BTreeMap<String, String>, environment: Environment) -> bool {
        if self.environment.is_some_and(|e| e != environment) {
            return false;
        }
        if !self
            .match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
        {
            return false;
        }
        self.match_expressions.iter().all(|req| {
            let values = req.values.as_deref().unwrap_or_default();
            let value = labels.get(&req.key);
            match SelectorOperator::parse(&req.operator) {
                Some(SelectorOperator::In) => value.is_some_and(|v| values.contains(v)),
                Some(SelectorOperator::NotIn) => value.is_none_or(|v| !values.contains(v)),
                Some(SelectorOperator::Exists) => value.is_some(),
                Some(SelectorOperator::DoesNotExist) => value.is_none(),
                None => false,
            }
        })
    }

    /// What is wrong with the selector, one sentence per problem naming the field and what to
    /// fix: the checks the CRD's schema and CEL rules make, for objects stored before them.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (k, v) in &self.match_labels {
            if let Some(p) = label_key_problem(k) {
                out.push(format!("matchLabels key {k:?} is not a label key: {p}"));
            }
            if let Some(p) = label_value_problem(v) {
                out.push(format!(
                    "matchLabels value of {k:?} is not a label value: {p}"
                ));
            }
        }
        for (n, req) in self.match_expressions.iter().enumerate() {
            let at = format!("matchExpressions[{n}]");
            if let Some(p) = label_key_problem(&req.key) {
                out.push(format!("{at}: key {:?} is not a label key: {p}", req.key));
            }
            let values = req.values.as_deref().unwrap_or_default();
            match SelectorOperator::parse(&req.operator) {
                None => out.push(format!(
                    "{at}: unknown operator {:?}: use In, NotIn, Exists or DoesNotExist",
                    req.operator
                )),
                Some(op) if op.takes_values() && values.is_empty() => out.push(format!(
                    "{at}: operator {} needs at least one value in values",
                    op.as_str()
                )),
                Some(op) if !op.takes_values() && !values.is_empty() => out.push(format!(
                    "{at}: operator {} takes no values: remove values",
                    op.as_str()
                )),
                Some(_) => {}
            }
            for v in values {
                if let Some(p) = label_value_problem(v) {
                    out.push(format!("{at}: value {v:?} is not a label value: {p}"));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn selector_matches_labels_expressions_and_environment() {
        let empty = SandboxSelector::default();
        assert!(empty.matches(&labels(&[]), Environment::Dev));
        let s = SandboxSelector {
            match_labels: labels(&[("fleet", "workers")]),
            match_expressions: vec![
                LabelSelectorRequirement {
                    key: "tier".into(),
                    operator: "In".into(),
                    values: Some(vec!["a".into(), "b".into()]),
                },
                LabelSelectorRequirement {
                    key: "canary".into(),
                    operator: "DoesNotExist".into(),
                    values: None,
                },
            ],
            environment: Some(Environment::Staging),
        };
        assert!(s.matches(
            &labels(&[("fleet", "workers"), ("tier", "a")]),
            Environment::Staging
        ));
        assert!(!s.matches(
            &labels(&[("fleet", "workers"), ("tier", "a")]),
            Environment::Prod
        ));
        assert!(!s.matches(
            &labels(&[("fleet", "workers"), ("tier", "c")]),
            Environment::Staging
        ));
        assert!(!s.matches(
            &labels(&[("fleet", "workers"), ("tier", "a"), ("canary", "1")]),
            Environment::Staging
        ));
        assert!(!s.matches(&labels(&[("tier", "a")]), Environment::Staging));
    }

    fn req(key: &str, op: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: (!values.is_empty()).then(|| values.iter().map(|v| v.to_string()).collect()),
        }
    }

    #[test]
    fn an_unknown_operator_selects_nothing_and_is_named() {
        let s = SandboxSelector {
            match_expressions: vec![req("tier", "Inn", &["a"])],
            ..Default::default()
        };
        assert!(!s.matches(&labels(&[("tier", "a")]), Environment::Dev));
        let p = s.problems();
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].contains("matchExpressions[0]") && p[0].contains("unknown operator \"Inn\""),
            "{p:?}"
        );
        for op in SelectorOperator::ALL {
            assert_eq!(SelectorOperator::parse(op.as_str()), Some(op));
        }
        assert_eq!(SelectorOperator::parse("in"), None, "spelling is exact");
    }

    #[test]
    fn selector_problems_match_what_kubernetes_refuses() {
        let ok = SandboxSelector {
            match_labels: labels(&[("fleet.valet.dev/pool", "a-1"), ("tier", "")]),
            match_expressions: vec![
                req("app.kubernetes.io/name", "In", &["worker", "w_2.x"]),
                req("canary", "DoesNotExist", &[]),
            ],
            environment: None,
        };
        assert_eq!(ok.problems(), Vec::<String>::new());
        let bad = SandboxSelector {
            match_labels: labels(&[("bad key", "v"), ("ok", "-v")]),
            match_expressions: vec![
                req("tier", "In", &[]),
                req("tier", "Exists", &["x"]),
                req("Upper.Case/x", "Exists", &[]),
            ],
            environment: None,
        };
        let p = bad.problems().join("\n");
        for want in [
            "matchLabels key \"bad key\" is not a label key",
            "matchLabels value of \"ok\" is not a label value",
            "matchExpressions[0]: operator In needs at least one value",
            "matchExpressions[1]: operator Exists takes no values",
            "matchExpressions[2]: key \"Upper.Case/x\" is not a label key",
        ] {
            assert!(p.contains(want), "missing {want:?} in:\n{p}");
        }
    }

    #[test]
    fn label_keys_and_values() {
        for good in [
            "a",
            "app",
            "a.b-c_d",
            "example.com/x",
            "a-b.c/D9",
            &"x".repeat(63),
            &format!("{}/n", "a".repeat(253)),
        ] {
            assert_eq!(label_key_problem(good), None, "{good:?}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "a b",
            "/a",
            "a/",
            "a/b/c",
            "Example.com/x",
            "a..b/x",
            &"x".repeat(64),
            &format!("{}/n", "a".repeat(254)),
        ] {
            assert!(
                label_key_problem(bad).is_some(),
                "{bad:?} should be refused"
            );
        }
        assert_eq!(label_value_problem(""), None);
        assert_eq!(label_value_problem("a.b_c-d"), None);
        for bad in ["-a", "a-", "a b", &"v".repeat(64)] {
            assert!(label_value_problem(bad).is_some(), "{bad:?}");
        }
    }

    /// Every CEL rule and message expression in the generated CRDs, and every enum value.
    pub(crate) fn crd_strings() -> (Vec<String>, Vec<String>) {
        fn walk(v: &serde_json::Value, rules: &mut Vec<String>, enums: &mut Vec<String>) {
            match v {
                serde_json::Value::Object(m) => {
                    for (k, v) in m {
                        match (k.as_str(), v) {
                            ("rule" | "messageExpression", serde_json::Value::String(s)) => {
                                rules.push(s.clone())
                            }
                            ("enum", serde_json::Value::Array(a)) => enums
                                .extend(a.iter().filter_map(|e| e.as_str().map(str::to_string))),
                            _ => walk(v, rules, enums),
                        }
                    }
                }
                serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, rules, enums)),
                _ => {}
            }
        }
        let (mut rules, mut enums) = (Vec::new(), Vec::new());
        for crd in crate::api::crds() {
            walk(&serde_json::to_value(crd).unwrap(), &mut rules, &mut enums);
        }
        (rules, enums)
    }

    #[test]
    fn the_crd_rules_use_the_documented_regexes() {
        // The CEL rules spell the regexes out (escaped for a CEL string); keep them in step with
        // the constants the Rust checks document.
        let (rules, enums) = crd_strings();
        for re in [
            LABEL_KEY_REGEX,
            LABEL_KEY_PREFIX_TOO_LONG_REGEX,
            LABEL_VALUE_REGEX,
        ] {
            let cel = re.replace('\\', "\\\\");
            assert!(
                rules.iter().any(|r| r.contains(&cel)),
                "no CEL rule uses {re}"
            );
        }
        for op in SelectorOperator::ALL {
            assert!(
                enums.iter().any(|e| e == op.as_str()),
                "{op:?} not in the schema"
            );
        }
        for p in crate::api::URL_PLACEHOLDERS {
            assert!(
                rules.iter().any(|r| r.contains(&format!("'{p}'"))),
                "no urlTemplate rule knows {p}"
            );
        }
    }
}
