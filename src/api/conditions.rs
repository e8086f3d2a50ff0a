//! Helpers for `metav1.Condition` lists: set a condition so that `lastTransitionTime` changes
//! only when its status flips, and read one back.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

/// Condition status `True`.
pub const TRUE: &str = "True";
/// Condition status `False`.
pub const FALSE: &str = "False";
/// Condition status `Unknown`.
pub const UNKNOWN: &str = "Unknown";
/// The `Ready` condition type: the summary every resource here carries.
pub const READY: &str = "Ready";

/// Condition type on a Sandbox launched with `agent.bootstrap`: whether its agent has reported
/// healthy since the instance was launched.
pub const AGENT_REGISTERED: &str = "AgentRegistered";
/// Reason of `AgentRegistered=False` once `agent.bootstrap.registrationTimeout` has passed since
/// launch with no healthy report (a SandboxPool replaces such a member).
pub const REASON_REGISTRATION_TIMED_OUT: &str = "RegistrationTimedOut";

/// A condition as a controller wants it to be, before the transition time is decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Desired<'a> {
    /// The condition type, for example `Ready`.
    pub type_: &'a str,
    /// `True`, `False` or `Unknown`.
    pub status: &'a str,
    /// A CamelCase reason.
    pub reason: &'a str,
    /// A human-readable message.
    pub message: String,
}

/// Sets `desired` in `conditions`. The transition time is `now` when the condition is new or its
/// status flips, and is kept otherwise. Returns whether anything changed.
pub fn set(
    conditions: &mut Vec<Condition>,
    desired: Desired<'_>,
    observed_generation: Option<i64>,
    now: Timestamp,
) -> bool {
    match conditions.iter_mut().find(|c| c.type_ == desired.type_) {
        Some(c) => {
            let mut changed = false;
            if c.status != desired.status {
                c.status = desired.status.to_string();
                c.last_transition_time = Time(now);
                changed = true;
            }
            if c.reason != desired.reason {
                c.reason = desired.reason.to_string();
                changed = true;
            }
            if c.message != desired.message {
                c.message = desired.message;
                changed = true;
            }
            if c.observed_generation != observed_generation {
                c.observed_generation = observed_generation;
                changed = true;
            }
            changed
        }
        None => {
            conditions.push(Condition {
                type_: desired.type_.to_string(),
                status: desired.status.to_string(),
                reason: desired.reason.to_string(),
                message: desired.message,
                observed_generation,
                last_transition_time: Time(now),
            });
            true
        }
    }
}

/// Removes the condition of type `type_`. Returns whether it was there.
pub fn remove(conditions: &mut Vec<Condition>, type_: &str) -> bool {
    let before = conditions.len();
    conditions.retain(|c| c.type_ != type_);
    before != conditions.len()
}

/// The condition of type `type_`, if present.
pub fn get<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Whether the condition of type `type_` is present with status `True`.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    get(conditions, type_).is_some_and(|c| c.status == TRUE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready(status: &'static str, reason: &'static str, message: &str) -> Desired<'static> {
        Desired {
            type_: "Ready",
            status,
            reason,
            message: message.to_string(),
        }
    }

    #[test]
    fn transition_time_changes_only_when_status_flips() {
        let t0: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let t1: Timestamp = "2026-01-01T00:01:00Z".parse().unwrap();
        let t2: Timestamp = "2026-01-01T00:02:00Z".parse().unwrap();
        let mut cs = Vec::new();
        assert!(set(
            &mut cs,
            ready(FALSE, "Provisioning", "launching"),
            Some(1),
            t0
        ));
        assert_eq!(cs[0].last_transition_time.0, t0);
        // Same status, new reason and message: changed, but the transition time stays.
        assert!(set(
            &mut cs,
            ready(FALSE, "Pending", "instance pending"),
            Some(1),
            t1
        ));
        assert_eq!(cs[0].last_transition_time.0, t0);
        assert_eq!(cs[0].reason, "Pending");
        // Nothing new: unchanged.
        assert!(!set(
            &mut cs,
            ready(FALSE, "Pending", "instance pending"),
            Some(1),
            t2
        ));
        // Status flips: the transition time moves.
        assert!(set(&mut cs, ready(TRUE, "Active", "running"), Some(1), t2));
        assert_eq!(cs[0].last_transition_time.0, t2);
        assert!(is_true(&cs, "Ready"));
        assert!(remove(&mut cs, "Ready"));
        assert!(get(&cs, "Ready").is_none());
    }

    #[test]
    fn observed_generation_change_counts_as_change() {
        let t0: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let mut cs = Vec::new();
        set(&mut cs, ready(TRUE, "Active", "ok"), Some(1), t0);
        assert!(set(&mut cs, ready(TRUE, "Active", "ok"), Some(2), t0));
        assert_eq!(cs[0].observed_generation, Some(2));
    }
}
