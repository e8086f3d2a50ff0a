//! The instance step: the instance as EC2 reports it, the power state the spec wants, and
//! the status of a launch still under way.

use std::ops::ControlFlow;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;

use super::*;
use crate::api::conditions::{FALSE, TRUE, UNKNOWN};
use crate::api::sandbox_conditions::reason;
use crate::api::sandbox_events as events;
use crate::api::{InstanceStatus, Market, PowerState, SandboxPhase, SandboxSpec, SandboxStatus};
use crate::ec2::{Instance, InstanceState};

/// The instance as status reports it.
pub fn instance_status(i: &Instance, launched_by_operator: bool) -> InstanceStatus {
    InstanceStatus {
        id: i.id.clone(),
        instance_type: i.instance_type.clone(),
        state: Some(i.state),
        private_ip: i.private_ip.clone(),
        public_ip: i.public_ip.clone(),
        private_dns: i.private_dns.clone(),
        public_dns: i.public_dns.clone(),
        availability_zone: i.availability_zone.clone(),
        launch_time: i.launch_time.map(time),
        market: Some(if i.spot {
            Market::Spot
        } else {
            Market::OnDemand
        }),
        launched_by_operator,
    }
}

/// Whether a start request (annotation) is new: set, and not the one acted on last.
pub fn new_start_request(start_request: Option<&str>, status: &SandboxStatus) -> bool {
    match start_request {
        Some(v) if !v.trim().is_empty() => status.last_start_request.as_deref() != Some(v),
        _ => false,
    }
}

/// The words of the Ready and InstanceRunning conditions while there is no instance id.
fn launch_words(spec: &SandboxSpec, stage: &LaunchStage) -> (&'static str, String) {
    if let Some(id) = &spec.instance_id {
        return (reason::ADOPTING, format!("looking up instance {id} in EC2"));
    }
    match stage {
        LaunchStage::Pending | LaunchStage::ToLaunch | LaunchStage::Launched => (
            reason::PENDING_LAUNCH,
            "the instance is to be launched: looking for one launched earlier for this Sandbox, then RunInstances".into(),
        ),
        LaunchStage::Paced {
            turn_at,
            burst,
            per_second,
        } => {
            let pacing = format!(
                "waiting for EC2 capacity in the operator's own client-side pacing of RunInstances ({burst} at once, then {per_second} per second; AWS has throttled nothing)"
            );
            let message = match turn_at {
                Some(at) => format!(
                    "{pacing}: this launch's turn comes at {}",
                    at.round(jiff::Unit::Second).unwrap_or(*at)
                ),
                None => format!(
                    "{pacing}: more launches are queued than it takes on; this one asks again later"
                ),
            };
            (reason::LAUNCH_PACED, message)
        }
        LaunchStage::Launching => (reason::LAUNCHING, "launching the instance".into()),
        LaunchStage::Retrying { reason, message } => (reason, message.clone()),
    }
}

/// Whether the instance in status may simply not be shown by EC2 yet: the operator launched
/// it moments ago and has seen nothing of it but what RunInstances answered (`pending`). One
/// seen running, stopped or anything else was visible, so its vanishing is real.
pub(super) fn launched_within_grace(s: &InstanceStatus, now: Timestamp) -> bool {
    s.launched_by_operator
        && s.state == Some(InstanceState::Pending)
        && s.launch_time
            .as_ref()
            .is_some_and(|t| since(now, t) < crate::ec2::LAUNCH_GRACE)
}

/// Whether the instance was terminated by a terminate request (the phase says so, or a terminate
/// request asked EC2 for it).
pub(super) fn terminated_on_request(st: &SandboxStatus) -> bool {
    st.phase == Some(SandboxPhase::Terminated)
        || st.last_action.as_ref().is_some_and(|a| {
            matches!(a.name.as_str(), day2::TERMINATE | day2::TERMINATE_FORCE)
                && (a.reason == TERMINATING || a.reason == TERMINATED)
        })
}

pub(super) const TERMINATING: &str = "Terminating";
pub(super) const TERMINATED: &str = "Terminated";

/// The decision for a Sandbox whose instance a terminate request terminated: phase Terminated,
/// kept as the record, nothing launched, started or probed.
fn terminated(d: &mut Draft<'_, '_>, id: &str, state: InstanceState) -> Duration {
    if d.st.phase != Some(SandboxPhase::Terminated) {
        d.notes.push(Note {
            warning: false,
            reason: TERMINATED,
            message: format!("instance {id} is {state}, as a terminate request asked"),
        });
    }
    d.st.phase = Some(SandboxPhase::Terminated);
    d.st.failure_reason = None;
    d.st.failure_message = None;
    d.st.agent = clear_agent(d.st.agent.take());
    d.st.idle_since = None;
    if let Some(inst) = d.st.instance.as_mut() {
        inst.state = Some(state);
    }
    for (type_, status, reason, message) in [
        (
            cond::INSTANCE_RUNNING,
            FALSE,
            TERMINATED,
            format!("instance {id} is {state}, as a terminate request asked"),
        ),
        (
            cond::AGENT_HEALTHY,
            UNKNOWN,
            reason::INSTANCE_NOT_RUNNING,
            "the agent is not probed while the instance is not running".to_string(),
        ),
        (
            cond::READY,
            FALSE,
            TERMINATED,
            format!(
                "instance {id} was terminated on request; nothing is launched in its place: delete the Sandbox when its record is no longer wanted"
            ),
        ),
    ] {
        d.set(type_, status, reason, message);
    }
    d.i.settings.resync
}

/// The instance step: what EC2 says of the instance and what the spec wants of its power
/// state. Stops the decision early (with its requeue) when there is no instance to go on with.
pub(super) fn step<'i>(d: &mut Draft<'i, '_>) -> ControlFlow<Duration, Seen<'i>> {
    let i = d.i;
    let now = i.now;
    let observe_only = i.spec.management_policy == ManagementPolicy::ObserveOnly;
    let instance = match i.instance {
        InstanceObs::NoInstance => {
            d.st.phase = Some(SandboxPhase::Provisioning);
            if let Some(rej) = i.launch_rejection {
                d.set(
                    cond::INSTANCE_RUNNING,
                    FALSE,
                    reason::LAUNCH_FAILED,
                    format!(
                        "EC2 refused to launch the instance: {}: {}",
                        rej.code, rej.message
                    ),
                );
                d.set(
                    cond::READY,
                    FALSE,
                    reason::LAUNCH_FAILED,
                    format!(
                        "EC2 refused to launch the instance ({}); edit the spec to try again",
                        rej.code
                    ),
                );
            } else if let Some(hold) = i.launch_hold {
                let reason = hold.reason();
                if conditions::get(&d.cs, cond::READY).is_none_or(|c| c.reason != reason) {
                    d.notes.push(Note {
                        warning: true,
                        reason,
                        message: hold.message(),
                    });
                }
                d.set(cond::INSTANCE_RUNNING, FALSE, reason, hold.message());
                d.set(cond::READY, FALSE, reason, hold.message());
                return ControlFlow::Break(hold_recheck(i.settings));
            } else {
                let (reason, message) = launch_words(i.spec, &i.launch);
                d.set(cond::INSTANCE_RUNNING, FALSE, reason, message.clone());
                d.set(cond::READY, FALSE, reason, message);
                if i.launch == LaunchStage::ToLaunch && i.spec.instance_id.is_none() {
                    d.actions.push(Action::Launch);
                }
            }
            return ControlFlow::Break(i.settings.poll);
        }
        InstanceObs::Missing { id }
            if d.st
                .instance
                .as_ref()
                .is_some_and(|s| s.id == *id && launched_within_grace(s, now)) =>
        {
            // EC2 is eventually consistent: an instance the operator launched moments ago may
            // be unknown to DescribeInstances for a while. Not gone, not to be relaunched.
            d.st.phase = Some(SandboxPhase::Provisioning);
            let msg = format!(
                "launched instance {id}; EC2 does not list it yet (it is eventually consistent after RunInstances)"
            );
            d.set(
                cond::INSTANCE_RUNNING,
                FALSE,
                reason::LAUNCHING,
                msg.clone(),
            );
            d.set(cond::READY, FALSE, reason::LAUNCHING, msg);
            return ControlFlow::Break(i.settings.poll);
        }
        InstanceObs::Missing { id } if terminated_on_request(&d.st) => {
            // EC2 forgets terminated instances after a while.
            return ControlFlow::Break(terminated(d, id, InstanceState::Terminated));
        }
        InstanceObs::Missing { id } => {
            let launched =
                d.st.instance
                    .as_ref()
                    .is_some_and(|s| s.launched_by_operator);
            if launched {
                // It existed once: a vanished instance is terminal and never silently replaced.
                d.st.phase = Some(SandboxPhase::Failed);
                d.st.failure_reason = Some(reason::INSTANCE_NOT_FOUND.into());
                d.st.failure_message = Some(format!(
                    "instance {id} no longer exists in EC2; delete and recreate the Sandbox to launch a new one"
                ));
            } else {
                d.st.phase = Some(SandboxPhase::Provisioning);
            }
            let msg = format!("EC2 does not know instance {id}");
            d.set(
                cond::INSTANCE_RUNNING,
                FALSE,
                reason::INSTANCE_NOT_FOUND,
                msg.clone(),
            );
            d.set(
                cond::READY,
                FALSE,
                reason::INSTANCE_NOT_FOUND,
                format!("{msg}; nothing is launched in its place"),
            );
            return ControlFlow::Break(i.settings.resync);
        }
        InstanceObs::Found(inst) => inst,
    };
    let launched_now = i.launch == LaunchStage::Launched;
    if launched_now {
        d.notes.push(Note {
            warning: false,
            reason: events::LAUNCHED,
            message: format!("launched instance {}", instance.id),
        });
    }
    let launched_by_operator = launched_now
        || d.st
            .instance
            .as_ref()
            .map(|s| s.launched_by_operator)
            .unwrap_or(i.spec.launch.is_some());
    let prev_state = d.st.instance.as_ref().and_then(|s| s.state);
    d.st.instance = Some(instance_status(instance, launched_by_operator));
    if prev_state != Some(instance.state) {
        match instance.state {
            InstanceState::Running => d.st.last_started_at = Some(time(now)),
            InstanceState::Stopped => d.st.last_stopped_at = Some(time(now)),
            _ => {}
        }
    }

    // ---- What the operator wants of the power state. ----
    let woken = new_start_request(i.start_request, &d.st);
    let auto_stopped = d.st.stop_reason == Some(stop_reason::IDLE);
    let want_running = i.spec.power_state == PowerState::Running && (!auto_stopped || woken);
    let id = instance.id.clone();

    match instance.state {
        InstanceState::ShuttingDown | InstanceState::Terminated if terminated_on_request(&d.st) => {
            return ControlFlow::Break(terminated(d, &id, instance.state));
        }
        InstanceState::ShuttingDown | InstanceState::Terminated => {
            d.st.phase = Some(SandboxPhase::Failed);
            d.st.failure_reason = Some(reason::INSTANCE_TERMINATED.into());
            d.st.failure_message = Some(format!(
                "instance {id} was terminated outside the operator; it is not relaunched: delete and recreate the Sandbox for a new one"
            ));
            if !matches!(
                prev_state,
                Some(InstanceState::ShuttingDown | InstanceState::Terminated)
            ) {
                d.notes.push(Note {
                    warning: true,
                    reason: reason::INSTANCE_TERMINATED,
                    message: format!(
                        "instance {id} was terminated outside the operator; not relaunching"
                    ),
                });
            }
            d.set(
                cond::INSTANCE_RUNNING,
                FALSE,
                reason::INSTANCE_TERMINATED,
                format!("instance {id} is {}", instance.state.as_str()),
            );
            d.set(
                cond::AGENT_HEALTHY,
                UNKNOWN,
                reason::INSTANCE_NOT_RUNNING,
                "the agent is not probed while the instance is not running".into(),
            );
            d.set(
                cond::READY,
                FALSE,
                reason::INSTANCE_TERMINATED,
                format!("instance {id} was terminated outside the operator"),
            );
            d.st.agent = clear_agent(d.st.agent.take());
            return ControlFlow::Break(i.settings.resync);
        }
        InstanceState::Pending => {
            d.st.phase = Some(SandboxPhase::Provisioning);
            d.set(
                cond::INSTANCE_RUNNING,
                FALSE,
                reason::PENDING,
                format!("instance {id} is pending"),
            );
            d.requeue = i.settings.poll;
        }
        // Never made from EC2's answer (the EC2 layer refuses names it does not know); should
        // one reach here, nothing is done to the instance and it is looked at again.
        InstanceState::Unknown => {
            d.set(
                cond::INSTANCE_RUNNING,
                UNKNOWN,
                reason::UNKNOWN_STATE,
                format!("instance {id} is in a state this operator does not know"),
            );
            d.requeue = i.settings.poll;
        }
        InstanceState::Stopping => {
            d.st.phase = Some(SandboxPhase::Stopped);
            d.set(
                cond::INSTANCE_RUNNING,
                FALSE,
                reason::STOPPING,
                format!("instance {id} is stopping"),
            );
            d.requeue = i.settings.poll;
        }
        InstanceState::Stopped => {
            d.st.phase = Some(SandboxPhase::Stopped);
            d.set(
                cond::INSTANCE_RUNNING,
                FALSE,
                reason::STOPPED,
                format!("instance {id} is stopped"),
            );
            if d.st.stop_reason.is_none() {
                // Nobody here asked for it: stopped outside the operator.
                d.st.stop_reason = Some(stop_reason::EXTERNAL);
            }
            if want_running && !observe_only {
                let why = if woken {
                    StartWhy::Woken
                } else if d.st.stop_reason == Some(stop_reason::EXTERNAL) {
                    StartWhy::RestartAfterExternalStop
                } else {
                    StartWhy::Requested
                };
                d.actions.push(Action::Start {
                    id: id.clone(),
                    why,
                });
                d.requeue = i.settings.poll;
            }
        }
        InstanceState::Running => {
            d.set(
                cond::INSTANCE_RUNNING,
                TRUE,
                reason::RUNNING,
                format!("instance {id} is running"),
            );
            if !want_running && !observe_only {
                let reason = if auto_stopped {
                    stop_reason::IDLE
                } else {
                    stop_reason::REQUESTED
                };
                d.actions.push(Action::Stop {
                    id: id.clone(),
                    reason,
                });
                d.requeue = i.settings.poll;
            }
        }
    }
    if woken
        && (instance.state == InstanceState::Running
            || d.actions.iter().any(|a| matches!(a, Action::Start { .. })))
    {
        d.st.last_start_request = i.start_request.map(str::to_string);
    }
    if instance.state == InstanceState::Running {
        // Once it runs again, the reason it was stopped no longer applies.
        d.st.stop_reason = None;
    }
    for a in &d.actions {
        match a {
            Action::Stop { reason, .. } => d.st.stop_reason = Some(*reason),
            Action::Start { .. } => d.st.stop_reason = None,
            _ => {}
        }
    }

    let running = instance.state == InstanceState::Running
        && !d.actions.iter().any(|a| matches!(a, Action::Stop { .. }));

    ControlFlow::Continue(Seen {
        instance,
        want_running,
        running,
    })
}
