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
