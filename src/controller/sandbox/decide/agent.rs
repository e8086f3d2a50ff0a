//! The agent step: what the probe said, the health verdict, and the agent URL.

use k8s_openapi::jiff::Timestamp;

use super::*;
use crate::agent::protocol::{CheckStatus, HealthReport};
use crate::api::conditions::{FALSE, TRUE, UNKNOWN};
use crate::api::sandbox_conditions::reason;
use crate::api::sandbox_events as events;
use crate::api::{AgentHealth, AgentStatus, SandboxSpec};
use crate::ec2::Instance;

pub(super) fn clear_agent(agent: Option<AgentStatus>) -> Option<AgentStatus> {
    // Keep the last known image tag and versions; what is about a live process goes.
    agent.map(|a| AgentStatus {
        health: AgentHealth::Unknown,
        active_workers: None,
        cpu_percent: None,
        memory_percent: None,
        disk_percent: None,
        draining_since: None,
        browser_status: None,
        consecutive_failures: 0,
        message: None,
        ..a
    })
}

pub(super) fn reason_static(reason: &str) -> &'static str {
    match reason {
        "TokenSecretMissing" => "TokenSecretMissing",
        "TokenSecretKeyMissing" => "TokenSecretKeyMissing",
        "AgentUrlUnknown" => "AgentUrlUnknown",
        "Unauthorized" => "Unauthorized",
        _ => "AgentMisconfigured",
    }
}

/// Reads an agent report: Unhealthy when it says so or a check fails (other than disk and
/// memory, which make it Degraded), Degraded at 90% disk or memory, Healthy otherwise.
pub fn judge_report(r: &HealthReport) -> (AgentHealth, &'static str, String) {
    let resource = |name: &str| matches!(name, "disk" | "memory");
    let failing: Vec<String> = r
        .checks
        .iter()
        .filter(|c| c.status == CheckStatus::Fail && !resource(&c.name))
        .map(|c| format!("{}: {}", c.name, c.message))
        .collect();
    let status_ok = matches!(r.status.as_str(), "ok" | "healthy" | "degraded" | "");
    if !failing.is_empty() {
        return (
            AgentHealth::Unhealthy,
            reason::CHECKS_FAILING,
            format!("failing checks: {}", failing.join("; ")),
        );
    }
    if !status_ok {
        return (
            AgentHealth::Unhealthy,
            reason::AGENT_REPORTS_UNHEALTHY,
            format!("the agent reports status {:?}", r.status),
        );
    }
    if r.degraded() {
        return (
            AgentHealth::Degraded,
            reason::DEGRADED,
            format!(
                "disk at {:.0}%, memory at {:.0}% (90% or more is degraded)",
                r.disk_percent(),
                r.memory_percent()
            ),
        );
    }
    let warnings: Vec<String> = r
        .warning_checks()
        .iter()
        .filter(|c| c.message != "not configured")
        .map(|c| format!("{}: {}", c.name, c.message))
        .collect();
    if warnings.is_empty() {
        (AgentHealth::Healthy, reason::HEALTHY, String::new())
    } else {
        (
            AgentHealth::Healthy,
            reason::HEALTHY_WITH_WARNINGS,
            format!("warnings: {}", warnings.join("; ")),
        )
    }
}

/// The agent URL for an instance: the explicit URL, or the template (default
/// `http://{privateIp}:{port}`) filled from the instance's addresses. `None` when the template
/// needs an address the instance does not have.
pub fn agent_url(spec: &SandboxSpec, inst: &Instance) -> Option<String> {
    if let Some(url) = &spec.agent.url {
        return Some(url.trim_end_matches('/').to_string());
    }
    let template = spec
        .agent
        .url_template
        .as_deref()
        .unwrap_or("http://{privateIp}:{port}");
    let mut out = template
        .replace("{port}", &spec.agent.port.to_string())
        .replace("{instanceId}", &inst.id);
    for (key, value) in [
        ("{privateIp}", &inst.private_ip),
        ("{publicIp}", &inst.public_ip),
        ("{privateDns}", &inst.private_dns),
        ("{publicDns}", &inst.public_dns),
    ] {
        if out.contains(key) {
            out = out.replace(key, value.as_deref().filter(|v| !v.is_empty())?);
        }
    }
    Some(out.trim_end_matches('/').to_string())
}

/// The agent step: the probe's answer (or its failure) folded into `status.agent` and the
/// AgentHealthy condition.
pub(super) fn step(d: &mut Draft<'_, '_>, seen: &Seen<'_>) {
    let i = d.i;
    let now = i.now;
    let (instance, running) = (seen.instance, seen.running);
    d.st.no_vnc_url = instance
        .public_ip
        .as_ref()
        .or(instance.private_ip.as_ref())
        .map(|ip| format!("http://{ip}:{}/vnc.html", i.spec.agent.no_vnc_port));
    let threshold = i.spec.agent.failure_threshold.max(1);
    if !running {
        d.st.agent = clear_agent(d.st.agent.take());
        d.st.idle_since = None;
        d.set(
            cond::AGENT_HEALTHY,
            UNKNOWN,
            reason::INSTANCE_NOT_RUNNING,
            "the agent is not probed while the instance is not running".into(),
        );
    } else {
        let mut agent = d.st.agent.take().unwrap_or(AgentStatus {
            health: AgentHealth::Unknown,
            url: None,
            image_tag: None,
            active_workers: None,
            cpu_percent: None,
            memory_percent: None,
            disk_percent: None,
            draining_since: None,
            browser_status: None,
            up_since: None,
            env_sha256: None,
            agent_version: None,
            consecutive_failures: 0,
            last_seen: None,
            message: None,
        });
        agent.url = i.agent_url.map(str::to_string);
        match i.probe {
            ProbeObs::NotProbed => {}
            ProbeObs::Misconfigured { reason, message } => {
                agent.health = AgentHealth::Unknown;
                agent.message = Some(message.clone());
                d.set(
                    cond::AGENT_HEALTHY,
                    FALSE,
                    reason_static(reason),
                    message.clone(),
                );
            }
            ProbeObs::Failed(err) => {
                agent.consecutive_failures += 1;
                agent.message = Some(err.clone());
                if agent.consecutive_failures >= threshold {
                    if agent.health != AgentHealth::Unhealthy {
                        d.notes.push(Note {
                            warning: true,
                            reason: reason::AGENT_UNHEALTHY,
                            message: format!(
                                "{} consecutive probes failed: {err}",
                                agent.consecutive_failures
                            ),
                        });
                    }
                    agent.health = AgentHealth::Unhealthy;
                    d.set(
                        cond::AGENT_HEALTHY,
                        FALSE,
                        reason::PROBE_FAILED,
                        format!(
                            "{} consecutive probes failed; last: {err}",
                            agent.consecutive_failures
                        ),
                    );
                } else if conditions::get(&d.cs, cond::AGENT_HEALTHY).is_none() {
                    d.set(
                        cond::AGENT_HEALTHY,
                        UNKNOWN,
                        reason::PROBING,
                        format!(
                            "probe failed ({} of {threshold} allowed): {err}",
                            agent.consecutive_failures
                        ),
                    );
                }
            }
            ProbeObs::Report(r) => {
                let was_unhealthy = agent.health == AgentHealth::Unhealthy;
                agent.consecutive_failures = 0;
                agent.last_seen = Some(time(now));
                agent.image_tag = r.image_tag.clone();
                agent.active_workers = r.active_workers.map(|n| n as i32);
                agent.cpu_percent = Some(r.cpu.round() as i32);
                agent.memory_percent = Some(r.memory_percent().round() as i32);
                agent.disk_percent = Some(r.disk_percent().round() as i32);
                agent.browser_status = r
                    .browser_status
                    .clone()
                    .or_else(|| r.adspower_status.clone());
                let previous = agent.up_since.take();
                agent.up_since = (r.uptime > 0.0).then(|| {
                    let up = now.as_second() - r.uptime as i64;
                    // The agent samples its uptime in the background, so the derived boot time
                    // wobbles by seconds: keep the recorded one unless it moved by more than two
                    // minutes (a reboot), so the value is stable across probes.
                    match &previous {
                        Some(p) if (p.0.as_second() - up).abs() <= 120 => p.clone(),
                        _ => time(Timestamp::from_second(up - up.rem_euclid(60)).unwrap_or(now)),
                    }
                });
                agent.env_sha256 = r.env_sha256.clone();
                agent.agent_version = r.agent_version.clone();
                agent.draining_since = r.draining_since.map(time);
                let (health, reason, message) = judge_report(r);
                if was_unhealthy && health != AgentHealth::Unhealthy {
                    d.notes.push(Note {
                        warning: false,
                        reason: events::AGENT_RECOVERED,
                        message: "the agent answers and reports healthy again".into(),
                    });
                }
                agent.health = health;
                agent.message = (!message.is_empty()).then(|| message.clone());
                let status = if health == AgentHealth::Unhealthy {
                    FALSE
                } else {
                    TRUE
                };
                d.set(cond::AGENT_HEALTHY, status, reason, message);
            }
        }
        if agent.health == AgentHealth::Unknown
            && conditions::get(&d.cs, cond::AGENT_HEALTHY).is_none_or(|c| {
                c.reason == reason::INSTANCE_NOT_RUNNING || c.reason == INVALID_SPEC
            })
        {
            d.set(
                cond::AGENT_HEALTHY,
                UNKNOWN,
                reason::AWAITING_FIRST_PROBE,
                "waiting for the agent's first answer".into(),
            );
        }
        d.st.agent = Some(agent);
    }
}
