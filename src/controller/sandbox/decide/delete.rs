//! The delete step: what the deletion policy asks of the instance.

use k8s_openapi::jiff::Timestamp;

use super::instance::launched_within_grace;
use super::*;

/// What deleting the Sandbox requires, given the instance as EC2 reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeleteStep {
    /// Nothing (more) to do: remove the finalizer.
    Done,
    /// Call TerminateInstances, then look again.
    Terminate(String),
    /// Call StopInstances, then remove the finalizer.
    Stop(String),
    /// Wait for EC2 to finish (shutting-down), then look again.
    Wait,
}

/// The deletion policy carried out against the observed instance.
pub fn decide_delete(spec: &SandboxSpec, instance: &InstanceObs) -> DeleteStep {
    use crate::api::DeletionPolicy;
    if spec.management_policy == ManagementPolicy::ObserveOnly {
        return DeleteStep::Done;
    }
    let inst = match instance {
        InstanceObs::Found(i) => i,
        _ => return DeleteStep::Done,
    };
    match spec.effective_deletion_policy() {
        DeletionPolicy::Retain => DeleteStep::Done,
        DeletionPolicy::Stop => match inst.state {
            InstanceState::Running | InstanceState::Pending => DeleteStep::Stop(inst.id.clone()),
            _ => DeleteStep::Done,
        },
        DeletionPolicy::Terminate => match inst.state {
            InstanceState::Terminated => DeleteStep::Done,
            InstanceState::ShuttingDown => DeleteStep::Wait,
            _ => DeleteStep::Terminate(inst.id.clone()),
        },
    }
}

/// [`decide_delete`], knowing also the status and the clock: an instance the operator launched
/// moments ago that EC2 does not list yet (it is eventually consistent) is terminated all the
/// same, not taken for gone.
pub fn decide_delete_seen(
    spec: &SandboxSpec,
    status: &SandboxStatus,
    instance: &InstanceObs,
    now: Timestamp,
) -> DeleteStep {
    use crate::api::DeletionPolicy;
    if let InstanceObs::Missing { id } = instance
        && spec.management_policy == ManagementPolicy::Full
        && spec.effective_deletion_policy() == DeletionPolicy::Terminate
        && status
            .instance
            .as_ref()
            .is_some_and(|s| s.id == *id && launched_within_grace(s, now))
    {
        return DeleteStep::Terminate(id.clone());
    }
    decide_delete(spec, instance)
}

/// What deleting the Sandbox comes to this round: the step the deletion policy asks for, the
/// status edit to write before it is carried out, and what is left to do once it is done.
#[derive(Clone, Debug, PartialEq)]
pub struct DeletePlan {
    /// What the deletion policy asks of the instance ([`decide_delete_seen`]).
    pub step: DeleteStep,
    /// The status to write before the step is carried out (phase Terminating, the instance as
    /// EC2 reports it), when the deletion is not done and this is not written yet.
    pub status: Option<SandboxStatus>,
    /// Once done: the instance the operator launched and now leaves behind (Retain, or Stop
    /// once stopped), to be released: its ownership tags go, so no orphan sweep touches it.
    pub release: Option<String>,
    /// Once done: the ledger keeps the Sandbox's row, marked terminated (dashboards count what
    /// ran); otherwise (the instance left behind, or none ever) the row leaves the table.
    pub terminated: bool,
}

/// The deletion decided from what was observed: `status` as last written, `id` the instance
/// id known for the Sandbox (the spec's, the status's, or found by its UID tag) and `instance`
/// what EC2 reports for it.
pub fn decide_deletion(
    spec: &SandboxSpec,
    status: &SandboxStatus,
    id: Option<&str>,
    instance: &InstanceObs,
    now: Timestamp,
) -> DeletePlan {
    use crate::api::DeletionPolicy;
    let step = decide_delete_seen(spec, status, instance, now);
    let full = spec.management_policy == ManagementPolicy::Full;
    if step != DeleteStep::Done {
        let status = (status.phase != Some(SandboxPhase::Terminating)).then(|| {
            let mut st = status.clone();
            st.phase = Some(SandboxPhase::Terminating);
            if let InstanceObs::Found(i) = instance {
                st.instance = Some(instance_status(
                    i,
                    st.instance.as_ref().is_some_and(|s| s.launched_by_operator),
                ));
            }
            st
        });
        return DeletePlan {
            step,
            status,
            release: None,
            terminated: false,
        };
    }
    let release = match (id, instance) {
        (Some(id), InstanceObs::Found(inst))
            if full
                && inst.state != InstanceState::Terminated
                && inst.tags.contains_key(crate::ec2::TAG_MANAGED_BY) =>
        {
            Some(id.to_string())
        }
        _ => None,
    };
    let terminated = full
        && match instance {
            InstanceObs::Found(i) => i.state == InstanceState::Terminated,
            InstanceObs::Missing { .. } => {
                status.phase == Some(SandboxPhase::Terminated)
                    || status.phase == Some(SandboxPhase::Terminating)
                        && spec.effective_deletion_policy() == DeletionPolicy::Terminate
            }
            InstanceObs::NoInstance => false,
        };
    DeletePlan {
        step,
        status: None,
        release,
        terminated,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::api::{DeletionPolicy, InstanceStatus};

    const ID: &str = "i-0123456789abcdef0";

    fn now() -> Timestamp {
        Timestamp::from_second(1_800_000_000).unwrap()
    }

    fn spec(policy: DeletionPolicy) -> SandboxSpec {
        let mut s: SandboxSpec = serde_json::from_value(serde_json::json!({
            "environment": "staging",
            "instanceType": "t3.large",
            "launch": {"imageId": "ami-0123456789abcdef0"},
        }))
        .unwrap();
        s.deletion_policy = Some(policy);
        s
    }

    fn inst(state: InstanceState, managed: bool) -> InstanceObs {
        let mut tags = BTreeMap::new();
        if managed {
            tags.insert(
                crate::ec2::TAG_MANAGED_BY.to_string(),
                "sandbox-operator".into(),
            );
        }
        InstanceObs::Found(Instance {
            id: ID.into(),
            state,
            instance_type: Some("t3.large".into()),
            private_ip: Some("10.0.0.5".into()),
            public_ip: None,
            private_dns: None,
            public_dns: None,
            availability_zone: Some("us-east-1a".into()),
            launch_time: Some(Timestamp::from_second(1_800_000_000 - 3600).unwrap()),
            spot: false,
            tags,
        })
    }

    fn running_status(launched_by_operator: bool) -> SandboxStatus {
        SandboxStatus {
            phase: Some(SandboxPhase::Active),
            instance: Some(InstanceStatus {
                id: ID.into(),
                state: Some(InstanceState::Pending),
                launched_by_operator,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn terminating_writes_the_phase_and_the_instance_once() {
        let s = spec(DeletionPolicy::Terminate);
        let st = running_status(true);
        let seen = inst(InstanceState::Running, true);
        let p = decide_deletion(&s, &st, Some(ID), &seen, now());
        assert_eq!(p.step, DeleteStep::Terminate(ID.into()));
        let written = p.status.expect("the status edit");
        assert_eq!(written.phase, Some(SandboxPhase::Terminating));
        let i = written.instance.expect("the instance");
        assert_eq!(i.state, Some(InstanceState::Running), "as EC2 reports it");
        assert!(i.launched_by_operator, "kept from the status");
        assert_eq!((p.release, p.terminated), (None, false));
        // Written already: not again.
        let p = decide_deletion(&s, &written_again(), Some(ID), &seen, now());
        assert_eq!(p.status, None);
        // Shutting down: waited for, still Terminating.
        let p = decide_deletion(
            &s,
            &st,
            Some(ID),
            &inst(InstanceState::ShuttingDown, true),
            now(),
        );
        assert_eq!(p.step, DeleteStep::Wait);
        assert_eq!(
            p.status.and_then(|s| s.phase),
            Some(SandboxPhase::Terminating)
        );
    }

    fn written_again() -> SandboxStatus {
        SandboxStatus {
            phase: Some(SandboxPhase::Terminating),
            ..running_status(true)
        }
    }

    #[test]
    fn an_instance_left_behind_is_released_only_when_the_operator_owns_it() {
        let st = running_status(true);
        // Retain: done at once, the managed instance released, its row gone from the ledger.
        let s = spec(DeletionPolicy::Retain);
        let p = decide_deletion(
            &s,
            &st,
            Some(ID),
            &inst(InstanceState::Running, true),
            now(),
        );
        assert_eq!(p.step, DeleteStep::Done);
        assert_eq!(p.status, None, "no status edit once done");
        assert_eq!(p.release.as_deref(), Some(ID));
        assert!(!p.terminated);
        // Without the ownership tag there is nothing to release.
        let p = decide_deletion(
            &s,
            &st,
            Some(ID),
            &inst(InstanceState::Running, false),
            now(),
        );
        assert_eq!(p.release, None);
        // ObserveOnly never touches it.
        let mut observe = s.clone();
        observe.management_policy = ManagementPolicy::ObserveOnly;
        let p = decide_deletion(
            &observe,
            &st,
            Some(ID),
            &inst(InstanceState::Running, true),
            now(),
        );
        assert_eq!(
            (p.step, p.release, p.terminated),
            (DeleteStep::Done, None, false)
        );
        // Stop: stopped first (no release decided before that step is done), released once stopped.
        let s = spec(DeletionPolicy::Stop);
        let p = decide_deletion(
            &s,
            &st,
            Some(ID),
            &inst(InstanceState::Running, true),
            now(),
        );
        assert_eq!(p.step, DeleteStep::Stop(ID.into()));
        assert_eq!(p.release, None);
        let p = decide_deletion(
            &s,
            &st,
            Some(ID),
            &inst(InstanceState::Stopped, true),
            now(),
        );
        assert_eq!((p.step, p.release.as_deref()), (DeleteStep::Done, Some(ID)));
    }

    #[test]
    fn the_ledger_keeps_the_row_of_what_was_terminated() {
        let s = spec(DeletionPolicy::Terminate);
        let st = written_again();
        // Terminated: done, nothing released, the row kept as terminated.
        let p = decide_deletion(
            &s,
            &st,
            Some(ID),
            &inst(InstanceState::Terminated, true),
            now(),
        );
        assert_eq!(
            (p.step, p.release, p.terminated),
            (DeleteStep::Done, None, true)
        );
        // Gone from EC2 after the operator terminated it (long after its launch).
        let mut old = st.clone();
        old.instance = None;
        let missing = InstanceObs::Missing { id: ID.into() };
        let p = decide_deletion(&s, &old, Some(ID), &missing, now());
        assert_eq!((p.step, p.terminated), (DeleteStep::Done, true));
        // Gone, but never terminating and not Terminated: the row leaves.
        old.phase = Some(SandboxPhase::Failed);
        assert!(!decide_deletion(&s, &old, Some(ID), &missing, now()).terminated);
        old.phase = Some(SandboxPhase::Terminated);
        assert!(decide_deletion(&s, &old, Some(ID), &missing, now()).terminated);
        // Terminating under another policy: not counted as terminated.
        old.phase = Some(SandboxPhase::Terminating);
        let p = decide_deletion(
            &spec(DeletionPolicy::Retain),
            &old,
            Some(ID),
            &missing,
            now(),
        );
        assert!(!p.terminated);
        // Never launched: done, nothing else.
        let p = decide_deletion(
            &s,
            &SandboxStatus::default(),
            None,
            &InstanceObs::NoInstance,
            now(),
        );
        assert_eq!(
            p,
            DeletePlan {
                step: DeleteStep::Done,
                status: None,
                release: None,
                terminated: false,
            }
        );
    }
}
