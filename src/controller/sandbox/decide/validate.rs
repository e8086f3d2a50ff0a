//! The validate step: the spec parsed once into typed settings, or the reasons it cannot be
//! acted on.

use super::*;
use crate::api::sandbox_conditions::reason;

/// The condition reason and failure reason of a spec the operator cannot act on.
pub const INVALID_SPEC: &str = reason::INVALID_SPEC;

/// The spec, parsed once: the decisions use these instead of the raw strings.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidSpec {
    /// `agent.probeInterval`.
    pub probe_interval: Duration,
    /// `agent.timeout`.
    pub probe_timeout: Duration,
    /// `autoStop.idleAfter`, when auto-stop is on.
    pub idle_after: Option<Duration>,
    /// `agent.bootstrap.registrationTimeout`, when bootstrap is on.
    pub registration_timeout: Option<Duration>,
}

/// Why a spec cannot be acted on: one sentence per problem, each naming the field and what to
/// fix. Reported as Ready=False with reason InvalidSpec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidSpec {
    /// The problems.
    pub problems: Vec<String>,
}

impl std::fmt::Display for InvalidSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.problems.join("; "))
    }
}

/// The validate step: what the CRD's schema and CEL rules check, checked again for objects
/// stored before those rules (or applied without them), plus the parse of every duration.
pub fn validate(spec: &SandboxSpec) -> Result<ValidSpec, InvalidSpec> {
    let mut problems = Vec::new();
    let agent = &spec.agent;
    if let Some(url) = &agent.url
        && let Err(e) = check_agent_url(url)
    {
        problems.push(format!("agent.url {url:?} {e}"));
    }
    if let Some(t) = &agent.url_template {
        match template_placeholders(t) {
            Err(e) => problems.push(format!("agent.urlTemplate {t:?} {e}")),
            Ok(found) => {
                let unknown: Vec<&str> = found
                    .iter()
                    .copied()
                    .filter(|p| !URL_PLACEHOLDERS.contains(p))
                    .collect();
                if !unknown.is_empty() {
                    problems.push(format!(
                        "agent.urlTemplate has unknown placeholder{} {}: use {}",
                        if unknown.len() > 1 { "s" } else { "" },
                        unknown.join(", "),
                        URL_PLACEHOLDERS.join(", ")
                    ));
                } else {
                    let sample = fill_template(t, |p| match p {
                        "{privateIp}" | "{publicIp}" => "10.0.0.1".into(),
                        "{privateDns}" => "ip-10-0-0-1.ec2.internal".into(),
                        "{publicDns}" => "ec2-10-0-0-1.compute-1.amazonaws.com".into(),
                        "{instanceId}" => "i-0123456789abcdef0".into(),
                        _ => agent.port.to_string(),
                    });
                    if let Err(e) = check_agent_url(&sample) {
                        problems.push(format!(
                            "agent.urlTemplate {t:?} does not make a usable URL once filled in ({sample}): {e}"
                        ));
                    }
                }
            }
        }
    }
    let mut duration = |field: &str, value: &str| {
        parse_duration(value)
            .map_err(|e| problems.push(format!("{field}: {e}")))
            .unwrap_or_default()
    };
    let probe_interval = duration("agent.probeInterval", &agent.probe_interval);
    let probe_timeout = duration("agent.timeout", &agent.timeout);
    let idle_after = spec
        .auto_stop
        .as_ref()
        .map(|a| duration("autoStop.idleAfter", &a.idle_after));
    let registration_timeout =
        crate::controller::sandbox::bootstrap::check_spec(spec, &mut problems);
    if !problems.is_empty() {
        return Err(InvalidSpec { problems });
    }
    Ok(ValidSpec {
        probe_interval,
        probe_timeout,
        idle_after,
        registration_timeout,
    })
}

/// The placeholders of a URL template, in order, or what is wrong with its braces.
fn template_placeholders(t: &str) -> Result<Vec<&str>, &'static str> {
    let mut found = Vec::new();
    let mut rest = t;
    while let Some(open) = rest.find(['{', '}']) {
        if rest[open..].starts_with('}') {
            return Err("has an unmatched }");
        }
        let after = &rest[open + 1..];
        match after.find(['{', '}']) {
            Some(close) if after[close..].starts_with('}') => {
                found.push(&rest[open..open + 1 + close + 1]);
                rest = &after[close + 1..];
            }
            _ => return Err("has an unmatched {"),
        }
    }
    Ok(found)
}

/// The template with each placeholder replaced by `value(placeholder)`.
fn fill_template(t: &str, mut value: impl FnMut(&str) -> String) -> String {
    let mut out = t.to_string();
    for p in URL_PLACEHOLDERS {
        if out.contains(p) {
            out = out.replace(p, &value(p));
        }
    }
    out
}

/// The check the agent client makes of a base URL: http or https, with a host, no whitespace.
fn check_agent_url(url: &str) -> Result<(), String> {
    if url.chars().any(char::is_whitespace) {
        return Err("contains whitespace".into());
    }
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("is not a URL: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host().is_none() {
        return Err("must be http(s)://host[:port]".into());
    }
    Ok(())
}

/// The decision for a spec the validate step refused: nothing is launched, started, stopped,
/// probed or deployed; the instance (if any) is still reported.
pub(super) fn invalid_spec_decision(i: &Inputs<'_>, invalid: &InvalidSpec) -> Decision {
    let mut st = i.status.clone();
    st.observed_generation = i.generation;
    let message = format!("invalid spec: {invalid}; nothing is done until it is fixed");
    let mut notes = Vec::new();
    if conditions::get(&st.conditions, cond::READY)
        .is_none_or(|c| c.reason != INVALID_SPEC || c.message != message)
    {
        notes.push(Note {
            warning: true,
            reason: INVALID_SPEC,
            message: message.clone(),
        });
    }
    if let InstanceObs::Found(inst) = i.instance {
        let launched_by_operator = st
            .instance
            .as_ref()
            .map(|s| s.launched_by_operator)
            .unwrap_or(i.spec.launch.is_some());
        st.instance = Some(instance_status(inst, launched_by_operator));
    }
    st.phase = Some(SandboxPhase::Failed);
    st.failure_reason = Some(INVALID_SPEC.into());
    st.failure_message = Some(message.clone());
    st.agent = clear_agent(st.agent.take());
    for (type_, status, msg) in [
        (
            cond::AGENT_HEALTHY,
            UNKNOWN,
            "the agent is not probed while the spec is invalid".to_string(),
        ),
        (cond::READY, FALSE, message),
    ] {
        conditions::set(
            &mut st.conditions,
            Desired {
                type_,
                status,
                reason: INVALID_SPEC,
                message: msg,
            },
            i.generation,
            i.now,
        );
    }
    Decision {
        status: st,
        actions: Vec::new(),
        notes,
        requeue: i.settings.resync,
    }
}
