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

/// Selects Sandboxes in the object's namespace by label and, optionally, by environment. An
/// empty selector selects every Sandbox in the namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SandboxSelector {
    /// Labels a Sandbox must carry, all of them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 32))]
    pub match_labels: BTreeMap<String, String>,
    /// Label requirements (In, NotIn, Exists, DoesNotExist), all of which must hold.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub match_expressions: Vec<LabelSelectorRequirement>,
    /// Only Sandboxes of this environment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment: Option<Environment>,
}

impl SandboxSelector {
    /// Whether a Sandbox with these labels and this environment is selected.
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
            match req.operator.as_str() {
                "In" => value.is_some_and(|v| values.contains(v)),
                "NotIn" => value.is_none_or(|v| !values.contains(v)),
                "Exists" => value.is_some(),
                "DoesNotExist" => value.is_none(),
                // The API server accepts only the four operators above.
                _ => false,
            }
        })
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
}
