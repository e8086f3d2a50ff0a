//! When to look: whether the agent is asked this reconcile, how old the EC2 view may be, and
//! whether the first status is still to be written. Decided here so the edge only follows.

use std::time::Duration;

use super::*;

/// Slack on the probe interval: a requeue that comes back a moment early still probes.
const PROBE_SLACK: Duration = Duration::from_millis(250);

/// What [`probe_now`] looks at.
#[derive(Clone, Copy, Debug)]
pub struct Due<'a> {
    /// The spec.
    pub spec: &'a SandboxSpec,
    /// `metadata.generation`.
    pub generation: Option<i64>,
    /// The status as last written.
    pub status: &'a SandboxStatus,
    /// The value of the deploy-attempt annotation, if set.
    pub deploy_attempt: Option<&'a str>,
    /// The day-2 action asked by annotation.
    pub action: Option<ActionRequest<'a>>,
    /// `agent.probeInterval`, parsed.
    pub interval: Duration,
    /// How long ago the agent was last asked (`None`: not since the operator started).
    pub since_last: Option<Duration>,
}

/// Whether the agent is asked this reconcile (the instance runs and the spec is valid). At the
/// probe interval; at once when something is under way (an instance changing state, an image
/// deploy), when the spec changed since the status was written (a new image tag is deployed
/// in the same reconcile, not at the next probe), when the declared tag is not the one
/// recorded, when a new deploy attempt is asked, or when a day-2 request wants a fresh answer.
pub fn probe_now(q: &Due<'_>) -> bool {
    let st = q.status;
    let due = q.since_last.is_none_or(|t| t + PROBE_SLACK >= q.interval);
    let in_flight = st
        .instance
        .as_ref()
        .and_then(|i| i.state)
        .is_some_and(|s| s.is_transitional())
        || st.deploy.as_ref().is_some_and(|d| d.state.in_progress());
    let spec_changed = q.generation.is_some() && q.generation != st.observed_generation;
    let new_tag = q.spec.image.as_ref().is_some_and(|im| {
        st.deploy.as_ref().is_none_or(|d| d.tag != im.tag)
            && st.agent.as_ref().and_then(|a| a.image_tag.as_deref()) != Some(im.tag.as_str())
    });
    let new_attempt = q.deploy_attempt.is_some()
        && st
            .deploy
            .as_ref()
            .is_some_and(|d| d.attempt.as_deref() != q.deploy_attempt);
    due || in_flight || spec_changed || new_tag || new_attempt || action_wants_probe(st, q.action)
}

/// How old the shared EC2 view of the instance may be for this reconcile: fresh to the poll
/// while the instance changes state (pending, stopping, shutting down), otherwise up to the
/// resync period but never more than 30 s. An image deploy is followed through the agent, not
/// EC2, so it does not make the view fresher: its quick passes never wait on a
/// DescribeInstances (an instance stopped meanwhile still wakes the Sandbox through the EC2
/// view's change feed). An instance launched in this reconcile is described afresh (zero).
pub fn ec2_max_age(status: &SandboxStatus, settings: &Settings, launched_now: bool) -> Duration {
    if launched_now {
        return Duration::ZERO;
    }
    let changing = status
        .instance
        .as_ref()
        .and_then(|i| i.state)
        .is_some_and(|s| s.is_transitional());
    if changing {
        settings.poll
    } else {
        settings.resync.min(Duration::from_secs(30))
    }
}

/// Whether the Sandbox still lacks its first status (a phase and a Ready condition), which is
/// written before any call that may wait (pacing, batching, throttling).
pub fn first_status(status: &SandboxStatus) -> bool {
    status.instance.is_none()
        && (status.phase.is_none() || conditions::get(&status.conditions, cond::READY).is_none())
}
