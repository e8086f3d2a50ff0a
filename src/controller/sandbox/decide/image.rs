//! The image step: the worker image the agent runs against `spec.image.tag`, and the deploy
//! state machine kept in `status.deploy` (drain, deploy, verify; legacy health servers apart).

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;

use super::*;
use crate::agent::protocol::{DeployState, HealthReport};
use crate::api::conditions::{FALSE, TRUE, UNKNOWN};
use crate::api::sandbox_conditions::reason;
use crate::api::sandbox_events as events;
use crate::api::{AgentHealth, ImageDeployState, ImageDeployStatus};

type CondOut = (&'static str, &'static str, String);

/// One step of the image deploy state machine kept in `status.deploy`.
fn image_step(
    st: &mut SandboxStatus,
    tag: &str,
    report: Option<&HealthReport>,
    i: &Inputs<'_>,
    notes: &mut Vec<Note>,
) -> (Vec<Action>, CondOut, Option<Duration>) {
    let now = i.now;
    let observe_only = i.spec.management_policy == ManagementPolicy::ObserveOnly;
    let reported = st.agent.as_ref().and_then(|a| a.image_tag.clone());
    let healthy = st
        .agent
        .as_ref()
        .is_some_and(|a| matches!(a.health, AgentHealth::Healthy | AgentHealth::Degraded));
    let poll = Some(i.settings.poll);
    // What a legacy health server was last assumed to run (it never reports a tag).
    let assumed = st
        .deploy
        .as_ref()
        .filter(|d| d.legacy_agent && d.state == deploy_state::SUCCEEDED)
        .map(|d| d.tag.clone());

    // Same tag as the last deploy record? A failed one counts only for the attempt it answered:
    // a new attempt marker (a SandboxDeploy's retry) starts afresh.
    let record = st.deploy.clone().filter(|d| {
        d.tag == tag
            && !(matches!(
                d.state,
                ImageDeployState::Failed | ImageDeployState::RolledBack
            ) && i.deploy_attempt.is_some()
                && d.attempt.as_deref() != i.deploy_attempt)
    });
    if let Some(d) = &record
        && !deploy_state::in_progress(&d.state)
    {
        if reported.as_deref() == Some(tag) {
            return (
                vec![],
                (TRUE, reason::UP_TO_DATE, format!("running {tag}")),
                None,
            );
        }
        if d.legacy_agent
            && d.state == deploy_state::SUCCEEDED
            && report.is_none_or(HealthReport::is_legacy)
        {
            return (vec![], assumed_up_to_date(tag, d), None);
        }
        if matches!(
            d.state,
            ImageDeployState::Failed | ImageDeployState::RolledBack
        ) {
            // Never retried in a loop: a new tag (or deleting status.deploy) tries again.
            return (
                vec![],
                (
                    FALSE,
                    reason::DEPLOY_FAILED,
                    format!(
                        "deploying {tag} failed and is not retried: {}",
                        d.message.clone().unwrap_or_default()
                    ),
                ),
                None,
            );
        }
    }
    if record.is_none() && reported.as_deref() == Some(tag) {
        return (
            vec![],
            (TRUE, reason::UP_TO_DATE, format!("running {tag}")),
            None,
        );
    }
    if observe_only {
        return (
            vec![],
            (
                FALSE,
                reason::OBSERVE_ONLY,
                format!(
                    "the agent runs {}, the spec says {tag}; ObserveOnly never deploys",
                    reported.as_deref().unwrap_or("an unknown tag")
                ),
            ),
            None,
        );
    }
    let Some(report) = report else {
        // No fresh report this round: wait for the next probe, but never past the deadline
        // (an agent that never answers again must not keep the deploy open for ever).
        if let Some(mut d) = record
            .clone()
            .filter(|d| deploy_state::in_progress(&d.state))
        {
            if let Some(out) = past_deadline(&mut d, tag, i, notes) {
                st.deploy = Some(d);
                return (vec![], out, None);
            }
            if d.legacy_agent
                && d.state == deploy_state::VERIFYING
                && let ProbeObs::Failed(err) = i.probe
            {
                // The healthy answers must be consecutive: start counting again.
                d.state = deploy_state::DEPLOYING;
                d.message = Some(format!(
                    "the legacy health server stopped answering after the deploy ({err}); waiting for it to answer healthy again"
                ));
                st.deploy = Some(d);
                return (
                    vec![],
                    (
                        FALSE,
                        reason::DEPLOYING,
                        format!(
                            "waiting for the legacy health server to answer healthy after deploying {tag}"
                        ),
                    ),
                    poll,
                );
            }
        }
        let msg = match &record {
            Some(d) => format!("deploying {tag}: {}", d.state),
            None => format!("waiting for the agent before deploying {tag}"),
        };
        let reason = if record.is_some() {
            reason::DEPLOYING
        } else {
            reason::PENDING
        };
        return (vec![], (FALSE, reason, msg), poll);
    };
    let mut d = match record {
        Some(d) => d,
        None => {
            // A new deploy: drain first.
            let legacy = report.is_legacy();
            let d = ImageDeployStatus {
                tag: tag.to_string(),
                previous_tag: reported.clone().or(assumed),
                state: deploy_state::DRAINING,
                id: None,
                attempt: i.deploy_attempt.map(str::to_string),
                message: Some("waiting for active workers to finish".into()),
                started_at: Some(time(now)),
                finished_at: None,
                requested_at: None,
                legacy_agent: legacy,
            };
            notes.push(Note {
                warning: false,
                reason: events::DEPLOY_STARTED,
                message: format!(
                    "deploying {tag} (from {}){}: draining",
                    d.previous_tag.as_deref().unwrap_or("unknown"),
                    if legacy {
                        " to a legacy health server"
                    } else {
                        ""
                    }
                ),
            });
            let mut actions = if report.is_agent() {
                vec![Action::Drain]
            } else {
                vec![]
            };
            if report.is_deploy_safe() && !report.deploy_running() {
                // Nothing to wait for: deploy in the same pass.
                let mut d = d;
                ask_to_deploy(&mut d, now);
                let again = deploy_poll(&d, i.settings);
                st.deploy = Some(d);
                actions.push(Action::Deploy {
                    tag: tag.to_string(),
                });
                return (
                    actions,
                    (FALSE, reason::DEPLOYING, format!("deploying {tag}")),
                    Some(again),
                );
            }
            st.deploy = Some(d.clone());
            return (
                actions,
                (
                    FALSE,
                    reason::DRAINING,
                    format!("draining before deploying {tag}"),
                ),
                poll,
            );
        }
    };
    let started = d.started_at.clone().unwrap_or(time(now));
    let elapsed = since(now, &started);
    let finish = |d: &mut ImageDeployStatus, state: ImageDeployState, msg: String| {
        d.state = state;
        d.message = Some(msg);
        d.finished_at = Some(time(now));
    };
    let mut actions = vec![];
    let out: CondOut;
    match d.state {
        deploy_state::DRAINING => {
            if report.is_deploy_safe() && !report.deploy_running() {
                ask_to_deploy(&mut d, now);
                actions.push(Action::Deploy {
                    tag: tag.to_string(),
                });
                out = (FALSE, reason::DEPLOYING, format!("deploying {tag}"));
            } else if elapsed >= i.settings.drain_timeout {
                let msg = format!(
                    "active workers did not drain within {}s",
                    i.settings.drain_timeout.as_secs()
                );
                finish(&mut d, deploy_state::FAILED, msg.clone());
                notes.push(Note {
                    warning: true,
                    reason: reason::DEPLOY_FAILED,
                    message: format!("deploying {tag}: {msg}"),
                });
                out = (
                    FALSE,
                    reason::DEPLOY_FAILED,
                    format!("deploying {tag} failed: {msg}"),
                );
            } else {
                out = (
                    FALSE,
                    reason::DRAINING,
                    format!(
                        "waiting for {} active workers to finish before deploying {tag}",
                        report.active_workers.unwrap_or(0)
                    ),
                );
            }
        }
        _ if d.legacy_agent => {
            let agent_message = st.agent.as_ref().and_then(|a| a.message.clone());
            out = legacy_progress(&mut d, tag, healthy, agent_message.as_deref(), i, notes);
            if let Some(failed) = past_deadline(&mut d, tag, i, notes) {
                st.deploy = Some(d);
                return (actions, failed, None);
            }
        }
        _ => {
            // Deploying or Verifying: follow the agent's own deploy record.
            let agent_deploy = report.deploy.as_ref().filter(|ad| ad.tag == tag);
            match agent_deploy.map(|ad| ad.state) {
                Some(DeployState::Succeeded) | None if report.image_tag.as_deref() == Some(tag) => {
                    if healthy {
                        finish(
                            &mut d,
                            deploy_state::SUCCEEDED,
                            format!("running {tag} and healthy"),
                        );
                        notes.push(Note {
                            warning: false,
                            reason: events::DEPLOY_SUCCEEDED,
                            message: format!("now running {tag}"),
                        });
                        out = (TRUE, reason::UP_TO_DATE, format!("running {tag}"));
                    } else {
                        d.state = deploy_state::VERIFYING;
                        d.message =
                            Some("running the new tag; waiting for a healthy report".into());
                        out = (
                            FALSE,
                            reason::VERIFYING,
                            format!("waiting for a healthy report on {tag}"),
                        );
                    }
                }
                Some(DeployState::Failed) | Some(DeployState::RolledBack) => {
                    let ad = agent_deploy.expect("matched Some");
                    let (state, word) = if ad.state == DeployState::RolledBack {
                        (deploy_state::ROLLED_BACK, "rolled back")
                    } else {
                        (deploy_state::FAILED, "failed")
                    };
                    d.id = Some(ad.id.clone());
                    finish(&mut d, state, format!("{word}: {}", ad.message));
                    notes.push(Note {
                        warning: true,
                        reason: reason::DEPLOY_FAILED,
                        message: format!("deploying {tag} {word}: {}", ad.message),
                    });
                    out = (
                        FALSE,
                        reason::DEPLOY_FAILED,
                        format!("deploying {tag} {word}: {}", ad.message),
                    );
                }
                _ => {
                    if let Some(ad) = agent_deploy {
                        d.id = Some(ad.id.clone());
                        d.message =
                            Some(format!("agent step {}: {}", ad.step.as_str(), ad.message));
                    }
                    out = (FALSE, reason::DEPLOYING, format!("deploying {tag}"));
                }
            }
            if let Some(failed) = past_deadline(&mut d, tag, i, notes) {
                st.deploy = Some(d);
                return (actions, failed, None);
            }
        }
    }
    let again = deploy_state::in_progress(&d.state).then(|| deploy_poll(&d, i.settings));
    st.deploy = Some(d);
    (actions, out, again)
}

/// How soon to ask the agent again about a deploy under way: at the short deploy poll while
/// the agent deploys or verifies (its end is seen within moments), at the ordinary poll while
/// active workers drain or for a legacy health server (which reports no progress to follow).
pub(super) fn deploy_poll(d: &ImageDeployStatus, settings: &Settings) -> Duration {
    match d.state {
        ImageDeployState::Deploying | ImageDeployState::Verifying if !d.legacy_agent => {
            settings.deploy_poll.min(settings.poll)
        }
        _ => settings.poll,
    }
}

/// Moves a deploy record to Deploying: the agent is asked for the tag now.
fn ask_to_deploy(d: &mut ImageDeployStatus, now: Timestamp) {
    d.state = deploy_state::DEPLOYING;
    d.requested_at = Some(time(now));
    d.message = Some(if d.legacy_agent {
        "asked the legacy health server to deploy".into()
    } else {
        "asked the agent to deploy".into()
    });
}

/// Fails an in-progress deploy that has run past the deploy deadline; the condition to report.
fn past_deadline(
    d: &mut ImageDeployStatus,
    tag: &str,
    i: &Inputs<'_>,
    notes: &mut Vec<Note>,
) -> Option<CondOut> {
    let started = d.started_at.clone().unwrap_or(time(i.now));
    if !deploy_state::in_progress(&d.state) || since(i.now, &started) < i.settings.deploy_deadline {
        return None;
    }
    let deadline = i.settings.deploy_deadline.as_secs();
    let msg = if d.legacy_agent && d.state != deploy_state::DRAINING {
        format!(
            "the legacy health server did not answer healthy again within {deadline}s of the deploy starting (it reports no deploy progress: see the deploy script's log on the instance); last: {}",
            d.message.clone().unwrap_or_default()
        )
    } else {
        format!("not done within {deadline}s")
    };
    d.state = deploy_state::FAILED;
    d.message = Some(msg.clone());
    d.finished_at = Some(time(i.now));
    notes.push(Note {
        warning: true,
        reason: reason::DEPLOY_FAILED,
        message: format!("deploying {tag}: {msg}"),
    });
    Some((
        FALSE,
        reason::DEPLOY_FAILED,
        format!("deploying {tag} failed: {msg}"),
    ))
}

/// A deploy to a legacy health server after `POST /deploy` was accepted. The old server answers
/// at once and runs the deploy script in the background; its `/health` carries no tag and no
/// progress, and it keeps answering while the script runs. So: leave the script
/// [`Settings::legacy_settle`] to work, then count consecutive healthy answers (Verifying after
/// the first, Succeeded after [`deploy_state::LEGACY_HEALTHY_REPORTS`]); an unhealthy answer
/// or a failed probe starts the count again. The deadline fails it otherwise.
fn legacy_progress(
    d: &mut ImageDeployStatus,
    tag: &str,
    healthy: bool,
    agent_message: Option<&str>,
    i: &Inputs<'_>,
    notes: &mut Vec<Note>,
) -> CondOut {
    let now = i.now;
    let requested = d
        .requested_at
        .clone()
        .or(d.started_at.clone())
        .unwrap_or(time(now));
    let settle = i.settings.legacy_settle;
    if since(now, &requested) < settle {
        d.state = deploy_state::DEPLOYING;
        d.message = Some(format!(
            "the legacy health server accepted the deploy and reports no progress: its deploy script is given {}s before health counts",
            settle.as_secs()
        ));
        return (
            FALSE,
            reason::DEPLOYING,
            format!("deploying {tag} to a legacy health server"),
        );
    }
    if !healthy {
        let why = agent_message.unwrap_or("it does not report healthy");
        d.state = deploy_state::DEPLOYING;
        d.message = Some(format!(
            "waiting for the legacy health server to answer healthy after the deploy: {why}"
        ));
        return (
            FALSE,
            reason::DEPLOYING,
            format!("waiting for the legacy health server to answer healthy after deploying {tag}"),
        );
    }
    if d.state == deploy_state::VERIFYING {
        let msg = format!(
            "assumed to run {tag}: the legacy health server answered healthy {} times in a row after the deploy (it does not report its image tag)",
            deploy_state::LEGACY_HEALTHY_REPORTS
        );
        d.state = deploy_state::SUCCEEDED;
        d.message = Some(msg.clone());
        d.finished_at = Some(time(now));
        notes.push(Note {
            warning: false,
            reason: events::DEPLOY_SUCCEEDED,
            message: msg,
        });
        return assumed_up_to_date(tag, d);
    }
    d.state = deploy_state::VERIFYING;
    d.message = Some(format!(
        "the legacy health server answered healthy after the deploy (1 of {})",
        deploy_state::LEGACY_HEALTHY_REPORTS
    ));
    (
        FALSE,
        reason::VERIFYING,
        format!(
            "waiting for the legacy health server to answer healthy again after deploying {tag}"
        ),
    )
}

/// ImageUpToDate for a legacy health server after a deploy of `tag` succeeded: True, with the tag
/// named as assumed.
fn assumed_up_to_date(tag: &str, d: &ImageDeployStatus) -> CondOut {
    let when = d
        .finished_at
        .as_ref()
        .map(|t| format!(" at {}", t.0))
        .unwrap_or_default();
    (
        TRUE,
        ASSUMED_BY_LEGACY_AGENT,
        format!(
            "assumed to run {tag}, not reported: the agent is a legacy health server, which does not report its image tag; it accepted the deploy of {tag} and answered healthy after it{when}"
        ),
    )
}

/// The image step: ImageUpToDate, and the image deploy state machine while the instance runs.
pub(super) fn step(d: &mut Draft<'_, '_>, seen: &Seen<'_>) {
    let i = d.i;
    let running = seen.running;
    let stopping_now = d.stopping();
    let report = match i.probe {
        ProbeObs::Report(r) => Some(r.as_ref()),
        _ => None,
    };
    let desired_tag = i.spec.image.as_ref().map(|im| im.tag.clone());
    let reported_tag = d.st.agent.as_ref().and_then(|a| a.image_tag.clone());
    match &desired_tag {
        None => {
            d.set(
                cond::IMAGE_UP_TO_DATE,
                TRUE,
                reason::NO_IMAGE_DECLARED,
                "spec.image is not set: the sandbox keeps whatever it runs".into(),
            );
        }
        Some(tag) if !running || stopping_now => {
            if reported_tag.as_deref() == Some(tag) {
                d.set(
                    cond::IMAGE_UP_TO_DATE,
                    TRUE,
                    reason::UP_TO_DATE,
                    format!("running {tag}"),
                );
            } else if conditions::get(&d.cs, cond::IMAGE_UP_TO_DATE)
                .is_none_or(|c| c.status != FALSE)
            {
                d.set(
                    cond::IMAGE_UP_TO_DATE,
                    UNKNOWN,
                    reason::INSTANCE_NOT_RUNNING,
                    format!("{tag} is deployed when the instance runs"),
                );
            }
        }
        Some(tag) => {
            let (acts, image_cond, deploy_requeue) =
                image_step(&mut d.st, tag, report, i, &mut d.notes);
            d.actions.extend(acts);
            let (status, reason, message) = image_cond;
            d.set(cond::IMAGE_UP_TO_DATE, status, reason, message);
            if let Some(again) = deploy_requeue {
                d.requeue = d.requeue.min(again);
            }
        }
    }
}

/// What the agent answered to [`Action::Deploy`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeployAnswer {
    /// Accepted, with the agent's deploy id (a legacy health server gives none).
    Accepted(Option<String>),
    /// Busy with another deploy (its id).
    Busy(String),
    /// Refused, or the agent could not be asked (what went wrong).
    Failed(String),
}

/// The status edit after [`Action::Deploy`]: the agent's deploy id when it accepted (with the
/// Event to publish); back to Draining, to be asked again, when it is busy or was not reached.
pub fn after_deploy(status: &mut SandboxStatus, tag: &str, answer: DeployAnswer) -> Option<Note> {
    let d = status.deploy.as_mut()?;
    match answer {
        DeployAnswer::Accepted(id) => {
            d.id = id;
            return Some(Note {
                warning: false,
                reason: reason::DEPLOYING,
                message: format!("asked the agent to deploy {tag}"),
            });
        }
        DeployAnswer::Busy(running) => {
            d.message = Some(format!("the agent is busy with deploy {running}"));
        }
        DeployAnswer::Failed(e) => {
            d.message = Some(format!(
                "asking the agent to deploy failed, will retry: {e}"
            ));
        }
    }
    d.state = deploy_state::DRAINING;
    None
}
