//! The idle step: auto-stop after `autoStop.idleAfter` without active workers.

use std::time::Duration;

use super::*;
use crate::api::conditions::{FALSE, TRUE};
use crate::api::sandbox_conditions::reason;
use crate::api::sandbox_events as events;

/// The idle step: starts or ends the idle period from the agent's report, and stops the
/// instance once it has lasted `idleAfter`.
pub(super) fn step(d: &mut Draft<'_, '_>, seen: &Seen<'_>, valid: &ValidSpec) {
    let i = d.i;
    let now = i.now;
    let observe_only = i.spec.management_policy == ManagementPolicy::ObserveOnly;
    let running = seen.running;
    let id = seen.instance.id.clone();
    let report = match i.probe {
        ProbeObs::Report(r) => Some(r.as_ref()),
        _ => None,
    };
    // `valid.idle_after` is set exactly when `autoStop` is.
    match (i.spec.auto_stop.as_ref().zip(valid.idle_after), running) {
        (Some((auto, idle_after)), true) => {
            let deploying =
                d.st.deploy
                    .as_ref()
                    .is_some_and(|d| deploy_state::in_progress(&d.state));
            if let Some(r) = report {
                if r.active_workers == Some(0) && !r.deploy_running() && !deploying {
                    if d.st.idle_since.is_none() {
                        d.st.idle_since = Some(time(now));
                    }
                } else if r.active_workers.is_some_and(|n| n > 0) || deploying {
                    d.st.idle_since = None;
                }
            }
            match &d.st.idle_since {
                Some(since_t) => {
                    let idle_for = since(now, since_t);
                    if idle_for >= idle_after && !observe_only {
                        d.actions.push(Action::Stop {
                            id: id.clone(),
                            reason: stop_reason::IDLE,
                        });
                        d.st.stop_reason = Some(stop_reason::IDLE);
                        d.notes.push(Note {
                            warning: false,
                            reason: events::IDLE_STOP,
                            message: format!(
                                "no active workers for {}s (idleAfter {}): stopping instance {id}",
                                idle_for.as_secs(),
                                auto.idle_after
                            ),
                        });
                        d.set(
                            cond::IDLE,
                            TRUE,
                            reason::IDLE_STOPPED,
                            format!("stopped after no active workers for {}", auto.idle_after),
                        );
                    } else {
                        d.set(
                            cond::IDLE,
                            TRUE,
                            reason::NO_ACTIVE_WORKERS,
                            format!(
                                "no active workers since {}; stops after {}",
                                since_t.0, auto.idle_after
                            ),
                        );
                        d.requeue = d.requeue.min(
                            idle_after
                                .saturating_sub(idle_for)
                                .max(Duration::from_secs(1)),
                        );
                    }
                }
                None => d.set(
                    cond::IDLE,
                    FALSE,
                    reason::ACTIVE_WORKERS,
                    "the agent reports active workers (or has not reported yet)".into(),
                ),
            }
        }
        (Some((auto, _)), false) => {
            if d.st.stop_reason == Some(stop_reason::IDLE) {
                d.set(
                    cond::IDLE,
                    TRUE,
                    reason::IDLE_STOPPED,
                    format!(
                        "stopped after no active workers for {}; annotate {} to start it",
                        auto.idle_after,
                        crate::api::START_REQUESTED_ANNOTATION
                    ),
                );
            } else {
                d.set(
                    cond::IDLE,
                    FALSE,
                    reason::NOT_RUNNING,
                    "the instance is not running".into(),
                );
            }
        }
        (None, _) => {
            conditions::remove(&mut d.cs, cond::IDLE);
            d.st.idle_since = None;
        }
    }
}
