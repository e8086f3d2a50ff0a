//! Day-2 actions asked by annotation (`fleet.valet.dev/action` and `fleet.valet.dev/action-id`),
//! recorded in `status.lastAction`: the action names, their results, and the step that carries
//! one out after the declared state is decided.

use k8s_openapi::jiff::Timestamp;

use super::agent::reason_static;
use super::instance::{TERMINATED, TERMINATING};
use super::*;
use crate::api::sandbox_events as events;

/// `POST /restart` of the agent's `adspower` service.
pub const RESTART_ADSPOWER: &str = "restart-adspower";
/// Probe the agent at once and report its health.
pub const PROBE: &str = "probe";
/// Ask the worker to take no new work (`POST /drain`).
pub const DRAIN: &str = "drain";
/// Drain, wait for the active workers to finish (up to the drain timeout), then delete the
/// Sandbox, whose finalizer terminates the instance.
pub const TERMINATE: &str = "terminate";
/// Terminate without draining.
pub const TERMINATE_FORCE: &str = "terminate-force";
/// The service name a restart-adspower restarts (the agent's allow-list).
pub const ADSPOWER_SERVICE: &str = "adspower";

/// Results in `status.lastAction.result`.
pub const IN_PROGRESS: &str = "InProgress";
/// Done.
pub const SUCCEEDED: &str = "Succeeded";
/// Tried, did not work.
pub const FAILED: &str = "Failed";
/// Not understood or not allowed: nothing was tried.
pub const REJECTED: &str = "Rejected";

/// Whether a result is final.
pub fn is_final(result: &str) -> bool {
    result != IN_PROGRESS
}
/// A day-2 action request: the annotations' values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ActionRequest<'a> {
    /// `fleet.valet.dev/action`.
    pub name: &'a str,
    /// `fleet.valet.dev/action-id`.
    pub id: &'a str,
}

impl ActionRequest<'_> {
    fn is(&self, last: Option<&LastAction>) -> bool {
        last.is_some_and(|a| a.name == self.name && a.request_id == self.id)
    }
}

use crate::api::{DAY2_ACTIONS, LastAction};

/// Whether the request has its final result in `status` (the annotations can go).
pub fn request_done(status: &SandboxStatus, req: ActionRequest<'_>) -> bool {
    let last = status.last_action.as_ref();
    req.is(last) && last.is_some_and(|a| is_final(&a.result))
}

/// Whether the request needs a fresh answer from the agent this reconcile (the probe is made at
/// once rather than when the probe interval says): a new probe, restart, drain or terminate, or
/// a terminate waiting for the drain.
pub fn action_wants_probe(status: &SandboxStatus, req: Option<ActionRequest<'_>>) -> bool {
    let Some(req) = req else { return false };
    let last = status.last_action.as_ref();
    if req.is(last) {
        return last.is_some_and(|a| a.result == IN_PROGRESS && a.reason == DRAINING);
    }
    DAY2_ACTIONS.contains(&req.name) && req.name != TERMINATE_FORCE
}

const DRAINING: &str = "Draining";

/// The result of an action the reconciler carried out ([`Action::RestartService`],
/// [`Action::DrainNow`], a refused [`Action::TerminateInstance`]): recorded in
/// `status.lastAction` (`reason` when it failed), with the Event to publish.
pub fn finish_action(
    status: &mut SandboxStatus,
    ok: bool,
    reason: &str,
    message: String,
    now: Timestamp,
) -> Option<Note> {
    let a = status.last_action.as_mut()?;
    if a.result != IN_PROGRESS {
        return None;
    }
    a.result = if ok { SUCCEEDED } else { FAILED }.into();
    a.reason = if ok { "Done" } else { reason }.into();
    a.message = Some(message.clone());
    a.finished_at = Some(time(now));
    let drained = ok && a.name == DRAIN;
    let note = Note {
        warning: !ok,
        reason: if ok {
            events::ACTION_SUCCEEDED
        } else {
            events::ACTION_FAILED
        },
        message: format!("{}: {message}", a.name),
    };
    if drained && let Some(agent) = status.agent.as_mut() {
        // Until the next probe brings the agent's own time.
        agent.draining_since.get_or_insert(time(now));
    }
    Some(note)
}

fn set_action(
    d: &mut Decision,
    req: ActionRequest<'_>,
    result: &str,
    reason: &str,
    message: String,
    now: Timestamp,
) {
    let started = d
        .status
        .last_action
        .as_ref()
        .filter(|a| req.is(Some(a)))
        .and_then(|a| a.started_at.clone())
        .unwrap_or(time(now));
    let finished = is_final(result).then(|| time(now));
    let (warning, event) = match result {
        SUCCEEDED => (false, events::ACTION_SUCCEEDED),
        FAILED => (true, events::ACTION_FAILED),
        REJECTED => (true, events::ACTION_REJECTED),
        _ => (false, events::ACTION_STARTED),
    };
    let changed = d
        .status
        .last_action
        .as_ref()
        .is_none_or(|a| !req.is(Some(a)) || a.result != result || a.reason != reason);
    if changed {
        d.notes.push(Note {
            warning,
            reason: event,
            message: format!("{}: {message}", req.name),
        });
    }
    d.status.last_action = Some(LastAction {
        name: req.name.to_string(),
        request_id: req.id.to_string(),
        result: result.to_string(),
        reason: reason.to_string(),
        message: Some(message),
        started_at: Some(started),
        finished_at: finished,
    });
}

/// Where the instance stands, for a terminate request.
enum Gone {
    /// No instance id yet.
    NoInstance,
    /// Terminated, shutting down, or forgotten by EC2.
    Terminated(String),
    /// It exists: running (`true`) or not.
    Exists { id: String, running: bool },
}

fn gone(i: &Inputs<'_>, st: &SandboxStatus) -> Gone {
    match i.instance {
        InstanceObs::NoInstance => Gone::NoInstance,
        InstanceObs::Missing { id } => Gone::Terminated(id.clone()),
        InstanceObs::Found(inst) => match inst.state {
            InstanceState::ShuttingDown | InstanceState::Terminated => {
                Gone::Terminated(inst.id.clone())
            }
            s => Gone::Exists {
                id: inst.id.clone(),
                running: s == InstanceState::Running && st.phase != Some(SandboxPhase::Terminated),
            },
        },
    }
}

/// Asks EC2 to terminate the instance: nothing else is done to it this pass.
fn terminate_now(d: &mut Decision, req: ActionRequest<'_>, id: &str, why: String, now: Timestamp) {
    d.actions.clear();
    d.actions
        .push(Action::TerminateInstance { id: id.to_string() });
    set_action(d, req, IN_PROGRESS, TERMINATING, why, now);
    d.requeue = d.requeue.min(Duration::from_secs(2));
}

/// The day-2 step: what the request asks, given what the state step saw.
pub(super) fn day2_step(i: &Inputs<'_>, req: ActionRequest<'_>, d: &mut Decision) {
    let now = i.now;
    let last = d.status.last_action.clone();
    let terminate = matches!(req.name, TERMINATE | TERMINATE_FORCE);
    if req.is(last.as_ref()) {
        let last = last.expect("matched");
        if is_final(&last.result) {
            return;
        }
        if terminate {
            match gone(i, &d.status) {
                Gone::Terminated(id) => set_action(
                    d,
                    req,
                    SUCCEEDED,
                    TERMINATED,
                    format!(
                        "instance {id} is terminated; the Sandbox stays in phase Terminated as its record"
                    ),
                    now,
                ),
                Gone::Exists { .. } if last.reason == TERMINATING => {
                    // Asked of EC2 already: wait for it to say so, doing nothing else.
                    d.actions.clear();
                    d.requeue = d.requeue.min(i.settings.poll);
                }
                Gone::Exists { id, running } => {
                    terminate_when_drained(i, req, &last, &id, running, d)
                }
                Gone::NoInstance => set_action(
                    d,
                    req,
                    FAILED,
                    "NoInstance",
                    "the sandbox has no instance: nothing was terminated".into(),
                    now,
                ),
            }
        } else {
            // Asked of the agent earlier, but its answer was never recorded (the operator
            // stopped in between): say so rather than do it twice.
            set_action(
                d,
                req,
                FAILED,
                "Interrupted",
                "the operator stopped before it recorded the agent's answer; ask again with a new action-id to retry".into(),
                now,
            );
        }
        return;
    }
    if !DAY2_ACTIONS.contains(&req.name) {
        set_action(
            d,
            req,
            REJECTED,
            "UnknownAction",
            format!(
                "unknown action {:?}: use one of {}",
                req.name,
                DAY2_ACTIONS.join(", ")
            ),
            now,
        );
        return;
    }
    let observe_only = i.spec.management_policy == ManagementPolicy::ObserveOnly;
    if observe_only && req.name != PROBE {
        set_action(
            d,
            req,
            REJECTED,
            "ObserveOnly",
            format!(
                "managementPolicy ObserveOnly: the operator never acts on this sandbox, so {} is refused (only probe is allowed)",
                req.name
            ),
            now,
        );
        return;
    }
    let state = d
        .status
        .instance
        .as_ref()
        .and_then(|s| s.state)
        .filter(|_| !matches!(i.instance, InstanceObs::NoInstance));
    let running = matches!(i.instance, InstanceObs::Found(inst) if inst.state == InstanceState::Running)
        && !d.actions.iter().any(|a| matches!(a, Action::Stop { .. }))
        && d.status.phase != Some(SandboxPhase::Terminated)
        && validate(i.spec).is_ok();
    let not_running = || match &state {
        Some(s) => format!("the instance is {s}"),
        None => "the sandbox has no instance".to_string(),
    };
    match req.name {
        PROBE => match i.probe {
            ProbeObs::Report(r) => {
                let (health, reason, msg) = judge_report(r);
                let health = format!("{health:?}");
                let detail = if msg.is_empty() {
                    String::new()
                } else {
                    format!(": {msg}")
                };
                set_action(
                    d,
                    req,
                    SUCCEEDED,
                    "Probed",
                    format!("probed now: the agent is {health} ({reason}){detail}"),
                    now,
                );
            }
            ProbeObs::Failed(e) => set_action(
                d,
                req,
                FAILED,
                "ProbeFailed",
                format!("probed now: the agent did not answer: {e}"),
                now,
            ),
            ProbeObs::Misconfigured { reason, message } => set_action(
                d,
                req,
                FAILED,
                reason_static(reason),
                format!("probed now: {message}"),
                now,
            ),
            ProbeObs::NotProbed => set_action(
                d,
                req,
                FAILED,
                "InstanceNotRunning",
                format!("{}: there is no agent to probe", not_running()),
                now,
            ),
        },
        RESTART_ADSPOWER | DRAIN => {
            let what = if req.name == DRAIN {
                "drain"
            } else {
                "restart AdsPower"
            };
            if !running {
                set_action(
                    d,
                    req,
                    FAILED,
                    "InstanceNotRunning",
                    format!("{}: nothing to {what}", not_running()),
                    now,
                );
                return;
            }
            if let ProbeObs::Misconfigured { reason, message } = i.probe {
                set_action(
                    d,
                    req,
                    FAILED,
                    reason_static(reason),
                    format!("cannot reach the agent to {what}: {message}"),
                    now,
                );
                return;
            }
            d.actions.push(if req.name == DRAIN {
                Action::DrainNow
            } else {
                Action::RestartService {
                    service: ADSPOWER_SERVICE,
                }
            });
            let (reason, message) = if req.name == DRAIN {
                (DRAINING, "asking the agent to drain".to_string())
            } else {
                (
                    "Restarting",
                    format!(
                        "asking the agent to restart its {} service",
                        ADSPOWER_SERVICE
                    ),
                )
            };
            set_action(d, req, IN_PROGRESS, reason, message, now);
        }
        _ => match gone(i, &d.status) {
            Gone::NoInstance => set_action(
                d,
                req,
                FAILED,
                "NoInstance",
                "the sandbox has no instance: nothing was terminated".into(),
                now,
            ),
            Gone::Terminated(id) => set_action(
                d,
                req,
                SUCCEEDED,
                TERMINATED,
                format!("instance {id} is terminated already"),
                now,
            ),
            Gone::Exists { id, .. } if req.name == TERMINATE_FORCE => terminate_now(
                d,
                req,
                &id,
                format!("force: not draining; terminating instance {id}"),
                now,
            ),
            Gone::Exists { id, running: false } => terminate_now(
                d,
                req,
                &id,
                format!(
                    "{}: nothing to drain; terminating instance {id}",
                    not_running()
                ),
                now,
            ),
            Gone::Exists { id, running: true } => {
                set_action(
                    d,
                    req,
                    IN_PROGRESS,
                    DRAINING,
                    "draining before terminating".into(),
                    now,
                );
                if let ProbeObs::Report(r) = i.probe
                    && r.is_agent()
                {
                    d.actions.push(Action::Drain);
                }
                let last = d.status.last_action.clone().expect("just set");
                terminate_when_drained(i, req, &last, &id, true, d);
            }
        },
    }
}

/// A terminate waiting for the drain: terminates the instance once the worker is deploy-safe
/// (or the instance no longer runs), fails after the drain timeout without terminating anything.
fn terminate_when_drained(
    i: &Inputs<'_>,
    req: ActionRequest<'_>,
    last: &LastAction,
    id: &str,
    running: bool,
    d: &mut Decision,
) {
    let now = i.now;
    let report = match i.probe {
        ProbeObs::Report(r) => Some(r.as_ref()),
        _ => None,
    };
    if !running {
        let why = format!("the instance no longer runs: terminating instance {id}");
        terminate_now(d, req, id, why, now);
        return;
    }
    if let Some(r) = report
        && r.is_deploy_safe()
        && !r.deploy_running()
    {
        let why = format!(
            "drained ({} active workers): terminating instance {id}",
            r.active_workers.unwrap_or(0)
        );
        terminate_now(d, req, id, why, now);
        return;
    }
    let started = last.started_at.clone().unwrap_or(time(now));
    let timeout = i.settings.drain_timeout;
    if since(now, &started) >= timeout {
        set_action(
            d,
            req,
            FAILED,
            "DrainTimedOut",
            format!(
                "the active workers did not finish within {}s: nothing was terminated; use terminate-force to terminate without draining",
                timeout.as_secs()
            ),
            now,
        );
        return;
    }
    let waiting = match (report, i.probe) {
        (Some(r), _) => format!(
            "draining before terminating: waiting for {} active workers to finish",
            r.active_workers
                .map(|n| n.to_string())
                .unwrap_or_else(|| "the".into())
        ),
        (None, ProbeObs::Failed(e)) => {
            format!("draining before terminating: the agent does not answer ({e})")
        }
        _ => "draining before terminating".into(),
    };
    // Only the message moves: no Event per probe.
    if let Some(a) = d.status.last_action.as_mut() {
        a.message = Some(waiting);
    }
    d.requeue = d.requeue.min(i.settings.poll);
}
