//! A [`SandboxSelector`] read once into kube's label-selector type.
//!
//! A controller's validate step calls [`SandboxSelector::parse`] with the path of the field the
//! selector sits at; from then on it matches Sandboxes with the [`ParsedSelector`] it got. A
//! selector the CRD would refuse today (stored before its rules) is an error whose sentences
//! name that field, so the object's status can say what to fix: it is never read as "select
//! everything" or "select nothing".

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::core::{Selector, SelectorExt};

use super::common::{Environment, SandboxSelector};

/// A selector that was checked and converted: kube's label selector (matchLabels and
/// matchExpressions together) and the environment, if the selector names one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ParsedSelector {
    /// matchLabels and matchExpressions, as kube's selector.
    pub labels: Selector,
    /// Only Sandboxes of this environment, when set.
    pub environment: Option<Environment>,
}

/// Why a selector cannot be used: one sentence per problem, each naming the field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidSelector {
    /// The field the selector sits at, for example `spec.selector`.
    pub field: String,
    /// The problems, each starting with the part of the selector at fault
    /// (`matchExpressions[0]: ...`).
    pub problems: Vec<String>,
}

impl std::fmt::Display for InvalidSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "invalid {}: {}", self.field, self.problems.join("; "))
    }
}

impl std::error::Error for InvalidSelector {}

impl SandboxSelector {
    /// Checks the selector as the API server would and converts it into kube's selector type.
    /// `field` is where it sits in the object (for example `spec.targets.sandboxes.selector`);
    /// every problem is reported, not only the first.
    pub fn parse(&self, field: &str) -> Result<ParsedSelector, InvalidSelector> {
        let invalid = |problems| InvalidSelector {
            field: field.to_owned(),
            problems,
        };
        let problems = self.problems();
        if !problems.is_empty() {
            return Err(invalid(problems));
        }
        let label_selector = LabelSelector {
            match_labels: (!self.match_labels.is_empty()).then(|| self.match_labels.clone()),
            match_expressions: (!self.match_expressions.is_empty())
                .then(|| self.match_expressions.clone()),
        };
        // The checks above refuse everything kube's conversion refuses; were that ever not so,
        // its answer is reported all the same.
        let labels = Selector::try_from(label_selector)
            .map_err(|e| invalid(vec![format!("matchExpressions: {e}")]))?;
        Ok(ParsedSelector {
            labels,
            environment: self.environment,
        })
    }
}

impl ParsedSelector {
    /// Whether a Sandbox with these labels and this environment is selected.
    pub fn matches(&self, labels: &BTreeMap<String, String>, environment: Environment) -> bool {
        self.environment.is_none_or(|e| e == environment) && self.labels.matches(labels)
    }

    /// Whether a Sandbox is selected (its labels and `spec.environment`).
    pub fn selects(&self, sandbox: &super::Sandbox) -> bool {
        const NONE: &BTreeMap<String, String> = &BTreeMap::new();
        let labels = sandbox.metadata.labels.as_ref().unwrap_or(NONE);
        self.matches(labels, sandbox.spec.environment)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn req(key: &str, op: &str, values: Option<&[&str]>) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: values.map(|vs| vs.iter().map(|v| v.to_string()).collect()),
        }
    }

    fn parsed(s: SandboxSelector) -> ParsedSelector {
        s.parse("spec.selector").expect("a valid selector")
    }

    #[test]
    fn the_empty_selector_selects_every_sandbox_of_every_environment() {
        let p = parsed(SandboxSelector::default());
        assert!(p.labels.selects_all());
        assert!(p.matches(&labels(&[]), Environment::Dev));
        assert!(p.matches(&labels(&[("a", "b")]), Environment::Prod));
    }

    #[test]
    fn match_labels_need_every_pair() {
        let p = parsed(SandboxSelector {
            match_labels: labels(&[("fleet", "workers"), ("tier", "a")]),
            ..Default::default()
        });
        assert!(p.matches(
            &labels(&[("fleet", "workers"), ("tier", "a")]),
            Environment::Dev
        ));
        assert!(p.matches(
            &labels(&[("fleet", "workers"), ("tier", "a"), ("extra", "x")]),
            Environment::Dev
        ));
        assert!(!p.matches(&labels(&[("fleet", "workers")]), Environment::Dev));
        assert!(!p.matches(
            &labels(&[("fleet", "workers"), ("tier", "b")]),
            Environment::Dev
        ));
    }

    #[test]
    fn in_and_not_in() {
        let p = parsed(SandboxSelector {
            match_expressions: vec![req("tier", "In", Some(&["a", "b"]))],
            ..Default::default()
        });
        assert!(p.matches(&labels(&[("tier", "a")]), Environment::Dev));
        assert!(p.matches(&labels(&[("tier", "b")]), Environment::Dev));
        assert!(!p.matches(&labels(&[("tier", "c")]), Environment::Dev));
        assert!(
            !p.matches(&labels(&[]), Environment::Dev),
            "In needs the key"
        );

        let p = parsed(SandboxSelector {
            match_expressions: vec![req("tier", "NotIn", Some(&["a"]))],
            ..Default::default()
        });
        assert!(!p.matches(&labels(&[("tier", "a")]), Environment::Dev));
        assert!(p.matches(&labels(&[("tier", "b")]), Environment::Dev));
        assert!(
            p.matches(&labels(&[]), Environment::Dev),
            "NotIn holds without the key"
        );
    }

    #[test]
    fn exists_and_does_not_exist() {
        let p = parsed(SandboxSelector {
            match_expressions: vec![req("canary", "Exists", None)],
            ..Default::default()
        });
        assert!(p.matches(&labels(&[("canary", "")]), Environment::Dev));
        assert!(!p.matches(&labels(&[("other", "x")]), Environment::Dev));

        let p = parsed(SandboxSelector {
            match_expressions: vec![req("canary", "DoesNotExist", None)],
            ..Default::default()
        });
        assert!(!p.matches(&labels(&[("canary", "1")]), Environment::Dev));
        assert!(p.matches(&labels(&[("other", "x")]), Environment::Dev));
    }

    #[test]
    fn labels_expressions_and_environment_all_hold() {
        let p = parsed(SandboxSelector {
            match_labels: labels(&[("fleet", "workers")]),
            match_expressions: vec![
                req("tier", "In", Some(&["a"])),
                req("canary", "DoesNotExist", None),
            ],
            environment: Some(Environment::Staging),
        });
        let good = labels(&[("fleet", "workers"), ("tier", "a")]);
        assert!(p.matches(&good, Environment::Staging));
        assert!(!p.matches(&good, Environment::Prod), "another environment");
        let mut canary = good.clone();
        canary.insert("canary".into(), "1".into());
        assert!(!p.matches(&canary, Environment::Staging));
        assert!(!p.matches(&labels(&[("tier", "a")]), Environment::Staging));
    }

    #[test]
    fn a_selector_the_api_would_refuse_is_an_error_naming_the_field_never_a_default() {
        let bad = SandboxSelector {
            match_expressions: vec![
                req("tier", "Inn", Some(&["a"])),
                req("tier", "In", None),
                req("canary", "Exists", Some(&["x"])),
            ],
            ..Default::default()
        };
        let e = bad.parse("spec.targets.sandboxes.selector").unwrap_err();
        assert_eq!(e.field, "spec.targets.sandboxes.selector");
        assert_eq!(e.problems.len(), 3, "{e}");
        let text = e.to_string();
        assert!(
            text.starts_with("invalid spec.targets.sandboxes.selector: "),
            "{text}"
        );
        for want in [
            "matchExpressions[0]: unknown operator \"Inn\"",
            "matchExpressions[1]: operator In needs at least one value",
            "matchExpressions[2]: operator Exists takes no values",
        ] {
            assert!(text.contains(want), "missing {want:?} in {text}");
        }
        // An empty value list is refused too (kube's conversion alone would accept it).
        let empty_in = SandboxSelector {
            match_expressions: vec![req("tier", "In", Some(&[]))],
            ..Default::default()
        };
        assert!(empty_in.parse("spec.selector").is_err());
        let bad_key = SandboxSelector {
            match_labels: labels(&[("bad key", "v")]),
            ..Default::default()
        };
        let e = bad_key.parse("spec.selector").unwrap_err();
        assert!(e.problems[0].contains("matchLabels key \"bad key\""), "{e}");
    }
}
