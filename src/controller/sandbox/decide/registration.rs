//! The registration step (`agent.bootstrap`): the AgentRegistered condition, decided from the
//! status the steps before it decided and the clock. The edge parts of bootstrap (minting the
//! token, rendering the user data) are in [`crate::controller::sandbox::bootstrap`].

use super::*;
use crate::api::AgentHealth;
use crate::api::conditions::{AGENT_REGISTERED, REASON_REGISTRATION_TIMED_OUT, TRUE};

/// AgentRegistered reason once the agent has reported healthy.
pub const REASON_AGENT_REPORTED: &str = "AgentReported";
/// AgentRegistered reason while the registration timeout has not passed yet.
pub const REASON_AWAITING_REGISTRATION: &str = "AwaitingRegistration";
/// AgentRegistered reason while the instance has not been launched (no launch time yet).
pub const REASON_INSTANCE_NOT_LAUNCHED: &str = "InstanceNotLaunched";

/// The AgentRegistered condition as it should be, and how soon to look again for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registration {
    /// `True`, `False` or `Unknown`.
    pub status: &'static str,
    /// [`REASON_AGENT_REPORTED`], [`REASON_AWAITING_REGISTRATION`],
    /// [`REASON_REGISTRATION_TIMED_OUT`] or [`REASON_INSTANCE_NOT_LAUNCHED`].
    pub reason: &'static str,
    /// What it means.
    pub message: String,
    /// When the timeout runs out, if it has not yet: the reconcile comes back then.
    pub recheck: Option<Duration>,
    /// The condition just turned False (publish an Event once).
    pub timed_out_now: bool,
}

/// The registration decision. `timeout` is `registrationTimeout` as the validate step parsed it;
/// `status` is the status as decided this round (the instance with EC2's launch time, the agent's
/// health from its last report); `previous` the condition as last written.
///
/// Registered means the agent has reported healthy (Healthy or Degraded) since the instance
/// launched: its report to the operator's probe, which carries the minted token
/// (`requireAuthForHealth` is on), proves the bootstrap installed it, started it and gave it the
/// token. Once True it stays True for the instance (later trouble is AgentHealthy's to report).
pub fn registration(
    timeout: Duration,
    status: &SandboxStatus,
    previous: Option<&Condition>,
    now: Timestamp,
) -> Registration {
    let healthy = status
        .agent
        .as_ref()
        .is_some_and(|a| matches!(a.health, AgentHealth::Healthy | AgentHealth::Degraded));
    let was_true = previous.is_some_and(|c| c.status == TRUE);
    if healthy || was_true {
        return Registration {
            status: TRUE,
            reason: REASON_AGENT_REPORTED,
            message: "the bootstrapped agent has reported healthy with its minted token".into(),
            recheck: None,
            timed_out_now: false,
        };
    }
    let launched = status
        .instance
        .as_ref()
        .and_then(|i| i.launch_time.as_ref())
        .map(|t| t.0);
    let Some(launched) = launched else {
        return Registration {
            status: UNKNOWN,
            reason: REASON_INSTANCE_NOT_LAUNCHED,
            message: "the agent registers once the instance is launched".into(),
            recheck: None,
            timed_out_now: false,
        };
    };
    let waited =
        Duration::from_secs(now.as_second().saturating_sub(launched.as_second()).max(0) as u64);
    if waited >= timeout {
        return Registration {
            status: FALSE,
            reason: REASON_REGISTRATION_TIMED_OUT,
            message: format!(
                "the agent has not reported healthy within registrationTimeout ({}s) of the instance's launch at {launched}",
                timeout.as_secs()
            ),
            recheck: None,
            timed_out_now: previous.is_none_or(|c| c.reason != REASON_REGISTRATION_TIMED_OUT),
        };
    }
    Registration {
        status: UNKNOWN,
        reason: REASON_AWAITING_REGISTRATION,
        message: format!(
            "waiting for the bootstrapped agent to report healthy (registrationTimeout {}s from the launch at {launched})",
            timeout.as_secs()
        ),
        recheck: Some((timeout - waited).max(Duration::from_secs(1))),
        timed_out_now: false,
    }
}

/// Applies [`registration`] to a decision of the Sandbox controller: sets (or, without
/// bootstrap, removes) the AgentRegistered condition, adds a Warning note the first time it
/// times out, and brings the requeue forward to the timeout. `valid` is the validate step's
/// result (`None`: the spec is invalid and the condition is left as it was).
pub fn registration_step(
    valid: Option<&ValidSpec>,
    generation: Option<i64>,
    now: Timestamp,
    decision: &mut Decision,
) {
    let Some(valid) = valid else { return };
    let Some(timeout) = valid.registration_timeout else {
        conditions::remove(&mut decision.status.conditions, AGENT_REGISTERED);
        return;
    };
    let previous = conditions::get(&decision.status.conditions, AGENT_REGISTERED);
    let r = registration(timeout, &decision.status, previous, now);
    if r.timed_out_now {
        decision.notes.push(Note {
            warning: true,
            reason: REASON_REGISTRATION_TIMED_OUT,
            message: r.message.clone(),
        });
    }
    if let Some(d) = r.recheck {
        decision.requeue = decision.requeue.min(d);
    }
    conditions::set(
        &mut decision.status.conditions,
        Desired {
            type_: AGENT_REGISTERED,
            status: r.status,
            reason: r.reason,
            message: r.message,
        },
        generation,
        now,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{AgentStatus, InstanceStatus};

    const SHA: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

    fn spec(bootstrap: serde_json::Value) -> SandboxSpec {
        serde_json::from_value(serde_json::json!({
            "environment": "dev",
            "instanceType": "t3.large",
            "launch": {"imageId": "ami-12345678"},
            "agent": {"bootstrap": bootstrap},
        }))
        .unwrap()
    }

    fn t(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn status(launched: Option<&str>, health: Option<AgentHealth>) -> SandboxStatus {
        SandboxStatus {
            instance: Some(InstanceStatus {
                id: "i-1".into(),
                launch_time: launched.map(|l| Time(t(l))),
                ..Default::default()
            }),
            agent: health.map(|health| AgentStatus {
                health,
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
            }),
            ..Default::default()
        }
    }

    fn cond(status: &str, reason: &str) -> Condition {
        Condition {
            type_: AGENT_REGISTERED.into(),
            status: status.into(),
            reason: reason.into(),
            message: String::new(),
            observed_generation: None,
            last_transition_time: Time(t("2026-01-01T00:00:00Z")),
        }
    }

    #[test]
    fn registration_waits_then_times_out_and_turns_true_once_the_agent_reports_healthy() {
        let timeout = Duration::from_secs(300);
        let launched = Some("2026-01-01T00:00:00Z");
        // Not launched yet: unknown, no clock.
        let r = registration(
            timeout,
            &SandboxStatus::default(),
            None,
            t("2026-01-01T00:10:00Z"),
        );
        assert_eq!((r.status, r.recheck), ("Unknown", None));
        // Within the timeout: waiting, and looked at again when it runs out.
        let r = registration(
            timeout,
            &status(launched, Some(AgentHealth::Unknown)),
            None,
            t("2026-01-01T00:01:00Z"),
        );
        assert_eq!(r.status, "Unknown");
        assert_eq!(r.reason, REASON_AWAITING_REGISTRATION);
        assert_eq!(r.recheck, Some(Duration::from_secs(240)));
        // An unhealthy report is no registration.
        let r = registration(
            timeout,
            &status(launched, Some(AgentHealth::Unhealthy)),
            None,
            t("2026-01-01T00:04:59Z"),
        );
        assert_eq!(r.reason, REASON_AWAITING_REGISTRATION);
        // At the timeout: False, RegistrationTimedOut, an Event the first time only.
        let r = registration(
            timeout,
            &status(launched, None),
            None,
            t("2026-01-01T00:05:00Z"),
        );
        assert_eq!(
            (r.status, r.reason, r.timed_out_now),
            (FALSE, REASON_REGISTRATION_TIMED_OUT, true)
        );
        assert!(r.message.contains("300s"), "{}", r.message);
        let prev = cond(FALSE, REASON_REGISTRATION_TIMED_OUT);
        let r = registration(
            timeout,
            &status(launched, None),
            Some(&prev),
            t("2026-01-01T00:06:00Z"),
        );
        assert_eq!((r.status, r.timed_out_now), (FALSE, false));
        // A late healthy report still registers it.
        let r = registration(
            timeout,
            &status(launched, Some(AgentHealth::Degraded)),
            Some(&prev),
            t("2026-01-01T00:07:00Z"),
        );
        assert_eq!((r.status, r.reason), (TRUE, REASON_AGENT_REPORTED));
        // Healthy in time: True; and it stays True when the agent later stops answering.
        let r = registration(
            timeout,
            &status(launched, Some(AgentHealth::Healthy)),
            None,
            t("2026-01-01T00:00:30Z"),
        );
        assert_eq!(r.status, TRUE);
        let prev = cond(TRUE, REASON_AGENT_REPORTED);
        let r = registration(
            timeout,
            &status(launched, Some(AgentHealth::Unhealthy)),
            Some(&prev),
            t("2026-01-01T01:00:00Z"),
        );
        assert_eq!(r.status, TRUE);
    }

    #[test]
    fn registration_step_sets_the_condition_only_with_bootstrap() {
        let s = spec(
            serde_json::json!({"downloadUrl": "https://h.example/a.tgz", "sha256": SHA, "registrationTimeout": "1m"}),
        );
        let v = validate(&s).unwrap();
        assert_eq!(v.registration_timeout, Some(Duration::from_secs(60)));
        let v = Some(&v);
        let mut d = Decision {
            status: status(Some("2026-01-01T00:00:00Z"), None),
            actions: Vec::new(),
            notes: Vec::new(),
            requeue: Duration::from_secs(300),
        };
        registration_step(v, Some(3), t("2026-01-01T00:00:20Z"), &mut d);
        let c = crate::api::conditions::get(&d.status.conditions, AGENT_REGISTERED).unwrap();
        assert_eq!(
            (c.status.as_str(), c.observed_generation),
            ("Unknown", Some(3))
        );
        assert_eq!(d.requeue, Duration::from_secs(40));
        registration_step(v, Some(3), t("2026-01-01T00:01:00Z"), &mut d);
        assert_eq!(d.notes.len(), 1);
        assert_eq!(d.notes[0].reason, REASON_REGISTRATION_TIMED_OUT);
        registration_step(v, Some(3), t("2026-01-01T00:01:30Z"), &mut d);
        assert_eq!(d.notes.len(), 1, "one Event per timeout");
        // An invalid spec leaves it as it was.
        registration_step(None, Some(3), t("2026-01-01T00:02:00Z"), &mut d);
        assert!(crate::api::conditions::get(&d.status.conditions, AGENT_REGISTERED).is_some());
        let mut plain = s.clone();
        plain.agent.bootstrap = None;
        let pv = validate(&plain).unwrap();
        registration_step(Some(&pv), Some(3), t("2026-01-01T00:02:00Z"), &mut d);
        assert!(crate::api::conditions::get(&d.status.conditions, AGENT_REGISTERED).is_none());
    }
}
