//! The ready step: the phase and the Ready summary, from what the other steps decided.

use super::*;
use crate::api::conditions::{FALSE, TRUE};
use crate::api::sandbox_conditions::reason;
use crate::api::{AgentHealth, SandboxPhase};
use crate::ec2::{Instance, InstanceState};

/// The ready step: the phase, then Ready summing up the other conditions.
pub(super) fn step(d: &mut Draft<'_, '_>, seen: &Seen<'_>, valid: &ValidSpec) {
    let i = d.i;
    let observe_only = i.spec.management_policy == ManagementPolicy::ObserveOnly;
    let (instance, running, want_running) = (seen.instance, seen.running, seen.want_running);
    let stopping_now = d.stopping();
    let deploying =
        d.st.deploy
            .as_ref()
            .is_some_and(|d| deploy_state::in_progress(&d.state))
            && running;
    let health = d.st.agent.as_ref().map(|a| a.health);
    if running {
        d.st.failure_reason = None;
        d.st.failure_message = None;
        d.st.phase = Some(if deploying {
            SandboxPhase::Deploying
        } else {
            match health {
                Some(AgentHealth::Unhealthy) => SandboxPhase::Unhealthy,
                Some(AgentHealth::Healthy | AgentHealth::Degraded) => SandboxPhase::Active,
                _ => SandboxPhase::Provisioning,
            }
        });
    } else if instance.state == InstanceState::Stopped || instance.state == InstanceState::Stopping
    {
        d.st.failure_reason = None;
        d.st.failure_message = None;
    }
    let (ready, reason, message) = ready_summary(
        &d.st,
        &d.cs,
        want_running && !stopping_now,
        observe_only,
        instance,
    );
    d.set(cond::READY, ready, reason, message);
    if running {
        d.requeue = d.requeue.min(valid.probe_interval);
    }
}

fn ready_summary(
    st: &SandboxStatus,
    cs: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    want_running: bool,
    observe_only: bool,
    instance: &Instance,
) -> (&'static str, &'static str, String) {
    let running = instance.state == InstanceState::Running;
    if !want_running && !observe_only {
        return match instance.state {
            InstanceState::Stopped => match st.stop_reason {
                Some(stop_reason::IDLE) => (
                    TRUE,
                    reason::IDLE_STOPPED,
                    "stopped by auto-stop, as configured".into(),
                ),
                _ => (TRUE, reason::STOPPED, "stopped, as declared".into()),
            },
            _ => (
                FALSE,
                reason::STOPPING,
                format!(
                    "instance {} is {}; stopping",
                    instance.id,
                    instance.state.as_str()
                ),
            ),
        };
    }
    if !running {
        return (
            FALSE,
            reason::INSTANCE_NOT_RUNNING,
            format!("instance {} is {}", instance.id, instance.state.as_str()),
        );
    }
    let agent = conditions::get(cs, cond::AGENT_HEALTHY);
    if agent.is_none_or(|c| c.status != TRUE) {
        let msg = agent.map(|c| c.message.clone()).unwrap_or_default();
        let reason = if agent.is_some_and(|c| c.status == FALSE) {
            reason::AGENT_UNHEALTHY
        } else {
            reason::AWAITING_AGENT
        };
        return (FALSE, reason, msg);
    }
    if st
        .deploy
        .as_ref()
        .is_some_and(|d| deploy_state::in_progress(&d.state))
    {
        return (
            FALSE,
            reason::DEPLOYING,
            "a worker image deploy is under way".into(),
        );
    }
    let image = conditions::get(cs, cond::IMAGE_UP_TO_DATE);
    if let Some(c) = image.filter(|c| c.status != TRUE) {
        return (FALSE, reason::IMAGE_NOT_UP_TO_DATE, c.message.clone());
    }
    (
        TRUE,
        reason::ACTIVE,
        "running, agent healthy, image up to date".into(),
    )
}
