//! What the pool controller reads: its members (listed from the API server, not a cache, so a
//! member just created or deleted is never counted twice or missed), each turned into a
//! [`Member`], and the SandboxDeploys that picked its members.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;

use super::decide::{DeployObs, Member};
use crate::api::conditions::{self, AGENT_REGISTERED, FALSE, REASON_REGISTRATION_TIMED_OUT};
use crate::api::{
    DeployPhase, InstanceState, POOL_LABEL, PowerState, RETIRING_ANNOTATION, Sandbox,
    SandboxDeploy, SandboxPhase, SandboxPool, TEMPLATE_HASH_LABEL,
};

/// Whether `s` is a member of `pool`: it names the pool as its controlling owner.
pub fn is_member(s: &Sandbox, pool_uid: &str) -> bool {
    s.owner_references()
        .iter()
        .any(|o| o.controller == Some(true) && o.kind == "SandboxPool" && o.uid == pool_uid)
}

/// The name of the pool that controls `s`, if any.
pub fn owner_pool(s: &Sandbox) -> Option<String> {
    s.owner_references()
        .iter()
        .find(|o| o.controller == Some(true) && o.kind == "SandboxPool")
        .map(|o| o.name.clone())
}

/// Since when each member's agent has reported zero active workers, by pool and member UID.
/// Kept in memory: after a restart the idle window starts again (a member is kept longer, never
/// removed sooner).
#[derive(Default)]
pub struct IdleClock {
    since: Mutex<HashMap<String, HashMap<String, Timestamp>>>,
}

impl IdleClock {
    /// Updates the clock of one member from its report and returns its idle-since.
    fn observe(&self, pool: &str, uid: &str, idle: bool, now: Timestamp) -> Option<Timestamp> {
        let mut m = self.since.lock().unwrap_or_else(|e| e.into_inner());
        let m = m.entry(pool.to_owned()).or_default();
        if idle {
            Some(*m.entry(uid.to_owned()).or_insert(now))
        } else {
            m.remove(uid);
            None
        }
    }

    /// Forgets the members of `pool` not in `keep` (all of them with an empty `keep`).
    pub fn retain(&self, pool: &str, keep: &std::collections::HashSet<String>) {
        let mut m = self.since.lock().unwrap_or_else(|e| e.into_inner());
        if keep.is_empty() {
            m.remove(pool);
        } else if let Some(p) = m.get_mut(pool) {
            p.retain(|k, _| keep.contains(k));
        }
    }
}

/// One member as the decision sees it.
pub fn member(s: &Sandbox, pool_uid: &str, clock: &IdleClock, now: Timestamp) -> Member {
    let st = s.status.clone().unwrap_or_default();
    let ready = conditions::is_true(&st.conditions, "Ready");
    let instance_state = st.instance.as_ref().and_then(|i| i.state);
    let active_workers = st.agent.as_ref().and_then(|a| a.active_workers);
    let serving = ready && instance_state == Some(InstanceState::Running);
    let idle = serving && active_workers.unwrap_or(0) == 0;
    let unregistered = conditions::get(&st.conditions, AGENT_REGISTERED)
        .is_some_and(|c| c.status == FALSE && c.reason == REASON_REGISTRATION_TIMED_OUT);
    let broken = match st.phase {
        Some(SandboxPhase::Failed) => Some(format!(
            "phase Failed ({})",
            st.failure_reason.as_deref().unwrap_or("see its status")
        )),
        Some(SandboxPhase::Terminated) => Some("phase Terminated".to_string()),
        _ => None,
    };
    Member {
        name: s.name_any(),
        hash: s
            .labels()
            .get(TEMPLATE_HASH_LABEL)
            .cloned()
            .unwrap_or_default(),
        created: s
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0)
            .unwrap_or(now),
        deleting: s.metadata.deletion_timestamp.is_some(),
        standby: s.spec.power_state == PowerState::Stopped,
        instance_stopped: instance_state == Some(InstanceState::Stopped),
        ready: serving,
        active_workers,
        idle_since: clock.observe(pool_uid, &s.uid().unwrap_or_default(), idle, now),
        unregistered,
        broken,
        retiring_since: s
            .annotations()
            .get(RETIRING_ANNOTATION)
            .and_then(|v| v.parse::<Timestamp>().ok()),
    }
}

/// The labels every member of `pool` carries.
pub fn member_labels(pool: &SandboxPool, hash: &str) -> BTreeMap<String, String> {
    let mut labels = pool.spec.template.metadata.labels.clone();
    labels.insert(POOL_LABEL.to_owned(), pool.name_any());
    labels.insert(TEMPLATE_HASH_LABEL.to_owned(), hash.to_owned());
    labels
}

/// The SandboxDeploys of the pool's namespace as the tag decision sees them.
pub fn deploys(pool: &SandboxPool, all: &[std::sync::Arc<SandboxDeploy>]) -> Vec<DeployObs> {
    let ns = pool.namespace();
    let mut labels = pool.spec.template.metadata.labels.clone();
    labels.insert(POOL_LABEL.to_owned(), pool.name_any());
    let env = pool.spec.template.spec.environment;
    all.iter()
        .filter(|d| d.namespace() == ns)
        .map(|d| {
            let st = d.status.as_ref();
            DeployObs {
                name: d.name_any(),
                tag: d.spec.image.tag.clone(),
                succeeded: st.and_then(|s| s.phase) == Some(DeployPhase::Succeeded),
                finished_at: st.and_then(|s| s.finished_at.as_ref()).map(|t| t.0),
                selects_members: d.spec.selector.matches(&labels, env),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sandbox(status: serde_json::Value, annotations: serde_json::Value) -> Sandbox {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "fleet.valet.dev/v1alpha1", "kind": "Sandbox",
            "metadata": {
                "name": "web-abcde", "uid": "m1", "annotations": annotations,
                "labels": {"fleet.valet.dev/pool": "web", "fleet.valet.dev/template-hash": "h1"},
                "ownerReferences": [{"apiVersion": "fleet.valet.dev/v1alpha1", "kind": "SandboxPool", "name": "web", "uid": "p1", "controller": true}],
            },
            "spec": {"environment": "staging", "instanceType": "t3.large", "launch": {"imageId": "ami-12345678"}},
            "status": status,
        }))
        .unwrap()
    }

    fn cond(type_: &str, status: &str, reason: &str) -> serde_json::Value {
        serde_json::json!({"type": type_, "status": status, "reason": reason, "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"})
    }

    #[test]
    fn a_member_reads_as_the_decision_needs_it() {
        let t0: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let t1: Timestamp = "2026-01-01T00:01:00Z".parse().unwrap();
        let clock = IdleClock::default();
        let serving = sandbox(
            serde_json::json!({
                "conditions": [cond("Ready", "True", "Active")],
                "instance": {"id": "i-1", "state": "running"},
                "agent": {"health": "Healthy", "activeWorkers": 0},
            }),
            serde_json::json!({}),
        );
        assert_eq!(owner_pool(&serving).as_deref(), Some("web"));
        assert!(is_member(&serving, "p1") && !is_member(&serving, "p2"));
        let m = member(&serving, "p1", &clock, t0);
        assert!(m.ready && !m.unregistered && m.broken.is_none() && !m.standby);
        assert_eq!(m.hash, "h1");
        // The idle clock keeps its first sighting ...
        assert_eq!(m.idle_since, Some(t0));
        assert_eq!(member(&serving, "p1", &clock, t1).idle_since, Some(t0));
        // ... and restarts after a busy report.
        let busy = sandbox(
            serde_json::json!({
                "conditions": [cond("Ready", "True", "Active")],
                "instance": {"id": "i-1", "state": "running"},
                "agent": {"health": "Healthy", "activeWorkers": 2},
            }),
            serde_json::json!({}),
        );
        let m = member(&busy, "p1", &clock, t1);
        assert_eq!((m.idle_since, m.active_workers), (None, Some(2)));
        assert_eq!(member(&serving, "p1", &clock, t1).idle_since, Some(t1));

        let never = sandbox(
            serde_json::json!({"conditions": [cond("AgentRegistered", "False", "RegistrationTimedOut")]}),
            serde_json::json!({"fleet.valet.dev/retiring-since": "2026-01-01T00:00:00Z"}),
        );
        let m = member(&never, "p1", &clock, t1);
        assert!(m.unregistered && !m.ready);
        assert_eq!(m.retiring_since, Some(t0));
        // Registering late (True) or another reason is not "never registered".
        let pending = sandbox(
            serde_json::json!({"conditions": [cond("AgentRegistered", "False", "Waiting")]}),
            serde_json::json!({}),
        );
        assert!(!member(&pending, "p1", &clock, t1).unregistered);
        let failed = sandbox(
            serde_json::json!({"phase": "Failed", "failureReason": "InstanceTerminated"}),
            serde_json::json!({}),
        );
        assert!(
            member(&failed, "p1", &clock, t1)
                .broken
                .unwrap()
                .contains("InstanceTerminated")
        );
    }
}
