//! The SecretBundle controller's decisions, as pure functions of plain data: the spec, the
//! source Secrets' bytes, the Sandboxes as the Sandbox controller reported them, what each target
//! answered last time and the clock. No client lives here; the reconciler gathers the inputs,
//! pushes to the targets this module picks and writes the status it builds.
//!
//! The steps: [`validate`] reads the spec once (durations and the sandbox selector, into
//! kube's selector type, here); [`render()`] turns the source Secrets into one `.env` (in
//! [`mod@render`]); [`plan()`] picks the targets to push now (in [`mod@plan`]); and
//! [`summarize`] builds the status (in [`status`]).
//!
//! Nothing here ever puts a secret value into a message: problems name keys and Secrets, and
//! [`Content`]'s `Debug` shows key names and the hash only.

pub mod plan;
pub mod render;
pub mod status;

pub use plan::*;
pub use render::*;
pub use status::*;

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use crate::agent::envfile;
use crate::api::conditions::{self, Desired, FALSE, TRUE};
use crate::api::{
    BundleTargetKind, BundleTargetState, BundleTargetStatus, Environment, InstanceState,
    InvalidSelector, ParsedSelector, SandboxSelector, SecretBundleSpec, SecretBundleStatus,
    SecretSource,
};

/// Condition types (the vocabulary lives in `api`).
pub use crate::api::bundle_condition as cond;
/// Ready and Degraded reasons (the vocabulary lives in `api`).
pub use crate::api::bundle_reason as reason;

// ---------------------------------------------------------------------------------------------
// The validate step.
// ---------------------------------------------------------------------------------------------

/// Where a bundle's sandbox selector sits, as status messages name it.
pub const SELECTOR_FIELD: &str = "spec.targets.sandboxes.selector";

/// The spec's settings, parsed once: the decisions use these instead of the raw strings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidSpec {
    /// `spec.refreshInterval`, at least [`MIN_REFRESH`].
    pub refresh: Duration,
    /// `spec.targets.sandboxes.selector`, as kube's selector (`None`: no sandbox targets).
    pub selector: Option<ParsedSelector>,
}

/// The shortest refresh honoured (the CRD refuses less; an older object's shorter one is
/// raised to it).
pub const MIN_REFRESH: Duration = Duration::from_secs(10);

/// The validate step: every duration of the spec parsed and the sandbox selector read into
/// kube's selector type (the CRD's rules check them too, but not for objects stored before
/// those rules). A value that does not parse is an InvalidSpec problem naming the field, never
/// a default; every problem is reported.
pub fn validate(spec: &SecretBundleSpec) -> Result<ValidSpec, Vec<SourceProblem>> {
    let refresh = crate::util::parse_duration(&spec.refresh_interval).map_err(|e| {
        SourceProblem::InvalidDuration {
            field: "spec.refreshInterval",
            problem: e.to_string(),
        }
    });
    let selector = match &spec.targets.sandboxes {
        None => Ok(None),
        Some(t) => t
            .selector
            .parse(SELECTOR_FIELD)
            .map(Some)
            .map_err(SourceProblem::InvalidSelector),
    };
    match (refresh, selector) {
        (Ok(d), Ok(selector)) => Ok(ValidSpec {
            refresh: d.max(MIN_REFRESH),
            selector,
        }),
        (r, s) => Err(r.err().into_iter().chain(s.err()).collect()),
    }
}

// ---------------------------------------------------------------------------------------------
// Selectors.
// ---------------------------------------------------------------------------------------------

/// Whether `sel` selects a Sandbox with these labels and environment, for a one-off check: it
/// parses the selector on each call, and one that does not parse selects nothing. A reconcile
/// parses once ([`validate`]) and matches with the [`ParsedSelector`].
pub fn selects(sel: &SandboxSelector, labels: &BTreeMap<String, String>, env: Environment) -> bool {
    sel.parse(SELECTOR_FIELD)
        .is_ok_and(|p| p.matches(labels, env))
}

/// A bundle as another bundle sees it, to settle which one owns a sandbox's env file.
#[derive(Clone, Debug, PartialEq)]
pub struct Claim<'a> {
    /// The bundle's name.
    pub name: &'a str,
    /// Its creation time.
    pub created: Option<Timestamp>,
    /// Its sandbox selector, parsed (`None`: it has no sandbox targets, or an invalid
    /// selector, so it pushes to no Sandbox).
    pub selector: Option<&'a ParsedSelector>,
}

/// The bundle that owns the env file of a sandbox several bundles select: the oldest (then the
/// first by name). Only one bundle may write a sandbox's env file, or they would overwrite each
/// other forever.
pub fn owner<'a>(
    claims: &[Claim<'a>],
    labels: &BTreeMap<String, String>,
    env: Environment,
) -> Option<&'a str> {
    claims
        .iter()
        .filter(|c| c.selector.is_some_and(|s| s.matches(labels, env)))
        .min_by(|a, b| {
            let ka = (a.created.unwrap_or(Timestamp::MAX), a.name);
            let kb = (b.created.unwrap_or(Timestamp::MAX), b.name);
            ka.cmp(&kb)
        })
        .map(|c| c.name)
}

/// What the tests of every step share: sources, their data, rendered content and a clock.
#[cfg(test)]
pub(crate) mod fixtures {
    use super::*;

    pub(crate) fn src(name: &str, keys: Option<&[&str]>) -> SecretSource {
        SecretSource {
            secret_name: name.into(),
            keys: keys.map(|k| k.iter().map(|s| s.to_string()).collect()),
        }
    }

    pub(crate) fn data(name: &str, kv: &[(&str, &str)]) -> SourceData {
        SourceData {
            name: name.into(),
            data: Some(
                kv.iter()
                    .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
                    .collect(),
            ),
        }
    }

    pub(crate) fn content() -> Content {
        render(&[src("s", None)], &[data("s", &[("A", "1")])]).unwrap()
    }

    pub(crate) fn now() -> Timestamp {
        "2026-03-01T12:00:00Z".parse().unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::*;
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    #[test]
    fn selectors() {
        let labels: BTreeMap<String, String> = [("app", "worker"), ("tier", "gold")]
            .map(|(k, v)| (k.into(), v.into()))
            .into();
        let mut sel = SandboxSelector::default();
        assert!(selects(&sel, &labels, Environment::Staging));
        sel.match_labels.insert("app".into(), "worker".into());
        assert!(selects(&sel, &labels, Environment::Staging));
        sel.environment = Some(Environment::Prod);
        assert!(!selects(&sel, &labels, Environment::Staging));
        sel.environment = None;
        let req = |op: &str, vals: &[&str]| LabelSelectorRequirement {
            key: "tier".into(),
            operator: op.into(),
            values: Some(vals.iter().map(|s| s.to_string()).collect()),
        };
        sel.match_expressions = vec![req("In", &["gold", "silver"])];
        assert!(selects(&sel, &labels, Environment::Dev));
        sel.match_expressions = vec![req("NotIn", &["gold"])];
        assert!(!selects(&sel, &labels, Environment::Dev));
        sel.match_expressions = vec![req("Exists", &[])];
        assert!(selects(&sel, &labels, Environment::Dev));
        sel.match_expressions = vec![req("DoesNotExist", &[])];
        assert!(!selects(&sel, &labels, Environment::Dev));
        sel.match_expressions = vec![req("Bogus", &[])];
        assert!(!selects(&sel, &labels, Environment::Dev));
    }

    #[test]
    fn the_oldest_bundle_owns_a_shared_sandbox() {
        let labels: BTreeMap<String, String> = [("app".to_string(), "w".to_string())].into();
        let all = SandboxSelector::default().parse(SELECTOR_FIELD).unwrap();
        let t0: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let t1: Timestamp = "2026-01-02T00:00:00Z".parse().unwrap();
        let claims = [
            Claim {
                name: "young",
                created: Some(t1),
                selector: Some(&all),
            },
            Claim {
                name: "old",
                created: Some(t0),
                selector: Some(&all),
            },
            Claim {
                name: "fly-only",
                created: None,
                selector: None,
            },
        ];
        assert_eq!(owner(&claims, &labels, Environment::Dev), Some("old"));
    }

    #[test]
    fn an_unreadable_refresh_interval_is_an_invalid_spec_naming_the_field_never_a_default() {
        let spec = |refresh: &str| -> SecretBundleSpec {
            serde_json::from_value(serde_json::json!({
                "sources": [{"secretName": "db"}],
                "targets": {},
                "refreshInterval": refresh,
            }))
            .unwrap()
        };
        assert_eq!(
            validate(&spec("30m")).unwrap().refresh,
            Duration::from_secs(1800)
        );
        // An older object's shorter interval is raised to the floor, not refused.
        assert_eq!(validate(&spec("2s")).unwrap().refresh, MIN_REFRESH);

        // As stored before the CRD checked durations.
        let problems = validate(&spec("1 hour")).unwrap_err();
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].reason(), reason::INVALID_SPEC);
        let said = problems[0].to_string();
        assert!(
            said.starts_with("spec.refreshInterval: ")
                && said.contains("\"1 hour\"")
                && said.contains("such as 30s, 5m or 1h30m"),
            "{said}"
        );
        // Reported as Ready=False InvalidSpec, together with a problem of the sources, the
        // duration first.
        let mut all = problems.clone();
        all.push(SourceProblem::SecretMissing {
            secret: "db".into(),
        });
        let st = summarize_invalid(&SecretBundleStatus::default(), Some(2), &all, now());
        let r = conditions::get(&st.conditions, cond::READY).unwrap();
        assert_eq!(
            (r.status.as_str(), r.reason.as_str()),
            (FALSE, reason::INVALID_SPEC)
        );
        assert!(
            r.message.contains("spec.refreshInterval") && r.message.contains("db"),
            "{}",
            r.message
        );
    }

    #[test]
    fn a_selector_the_api_refuses_is_an_invalid_spec_naming_the_field_never_an_empty_selection() {
        // As stored before the CRD checked operators.
        let spec: SecretBundleSpec = serde_json::from_value(serde_json::json!({
            "sources": [{"secretName": "db"}],
            "targets": {"sandboxes": {"selector": {"matchExpressions": [
                {"key": "tier", "operator": "Inn", "values": ["gold"]}
            ]}}},
        }))
        .unwrap();
        let problems = validate(&spec).unwrap_err();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].reason(), reason::INVALID_SPEC);
        let said = problems[0].to_string();
        assert!(
            said.starts_with("invalid spec.targets.sandboxes.selector: ")
                && said.contains("matchExpressions[0]: unknown operator \"Inn\""),
            "{said}"
        );
        let st = summarize_invalid(&SecretBundleStatus::default(), Some(2), &problems, now());
        let r = conditions::get(&st.conditions, cond::READY).unwrap();
        assert_eq!(
            (r.status.as_str(), r.reason.as_str()),
            (FALSE, reason::INVALID_SPEC)
        );
        assert!(
            r.message.contains("spec.targets.sandboxes.selector"),
            "{}",
            r.message
        );

        // Fixed, it parses into kube's selector and matches with it.
        let mut spec = spec;
        let sel = &mut spec.targets.sandboxes.as_mut().unwrap().selector;
        sel.match_expressions[0].operator = "In".into();
        let valid = validate(&spec).unwrap();
        let parsed = valid.selector.expect("a sandbox selector");
        let gold: BTreeMap<String, String> = [("tier".to_string(), "gold".to_string())].into();
        assert!(parsed.matches(&gold, Environment::Dev));
        assert!(!parsed.matches(&BTreeMap::new(), Environment::Dev));
        // No sandbox targets: no selector, and nothing to refuse.
        let fly_only: SecretBundleSpec = serde_json::from_value(serde_json::json!({
            "sources": [{"secretName": "db"}],
            "targets": {},
        }))
        .unwrap();
        assert_eq!(validate(&fly_only).unwrap().selector, None);
    }
}
