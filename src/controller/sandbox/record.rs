//! What a reconcile leaves on record: Events, the fleet ledger (EC2 actions, instance states,
//! image deploy steps, the `sandboxes` table) and the Prometheus gauges.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::runtime::events::{Event as KEvent, EventType};
use kube::runtime::reflector::Store;
use kube::{Resource, ResourceExt};
use tracing::warn;

use super::decide::{self, Note, ProbeObs};
use super::{Context, key};
use crate::api::{AgentHealth, Sandbox, SandboxStatus};
use crate::ec2::Ec2Error;
use crate::metrics::SandboxLabels;

impl Context {
    /// Publishes an Event about the Sandbox through the process's recorder.
    pub(super) async fn publish(&self, obj: &Sandbox, note: &Note) {
        let ev = KEvent {
            type_: if note.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: note.reason.into(),
            note: Some(note.message.clone()),
            action: note.reason.into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &obj.object_ref(&())).await {
            warn!(sandbox = %key(obj), error = %e, "publishing an event failed");
        }
    }
}

/// Counts a probe by its result.
pub(super) fn record_probe(ctx: &Context, _obj: &Sandbox, probe: &ProbeObs) {
    let result = match probe {
        ProbeObs::NotProbed => return,
        ProbeObs::Report(r) => match decide::judge_report(r).0 {
            AgentHealth::Healthy => "healthy",
            AgentHealth::Degraded => "degraded",
            _ => "unhealthy",
        },
        ProbeObs::Failed(_) => "failed",
        ProbeObs::Misconfigured { .. } => "misconfigured",
    };
    ctx.metrics
        .probes
        .get_or_create(&crate::metrics::ProbeLabels {
            result: result.into(),
        })
        .inc();
}

/// Sets (or forgets) the Sandbox's load gauges from its status.
pub(super) fn update_gauges(ctx: &Context, obj: &Sandbox, st: &SandboxStatus) {
    let labels = SandboxLabels {
        namespace: obj.namespace().unwrap_or_default(),
        name: obj.name_any(),
    };
    match st.agent.as_ref().filter(|a| a.cpu_percent.is_some()) {
        Some(a) => {
            ctx.metrics
                .sandbox_cpu
                .get_or_create(&labels)
                .set(f64::from(a.cpu_percent.unwrap_or(0)));
            ctx.metrics
                .sandbox_memory
                .get_or_create(&labels)
                .set(f64::from(a.memory_percent.unwrap_or(0)));
            ctx.metrics
                .sandbox_disk
                .get_or_create(&labels)
                .set(f64::from(a.disk_percent.unwrap_or(0)));
            ctx.metrics
                .sandbox_active_workers
                .get_or_create(&labels)
                .set(i64::from(a.active_workers.unwrap_or(0)));
        }
        None => ctx.metrics.forget_sandbox(&labels.namespace, &labels.name),
    }
}

/// Keeps the per-phase gauge in step with the store.
pub(super) async fn phase_gauges(ctx: Arc<Context>, store: Store<Sandbox>) {
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    loop {
        tick.tick().await;
        let mut counts: BTreeMap<String, i64> = BTreeMap::new();
        for s in store.state() {
            let phase = s
                .status
                .as_ref()
                .and_then(|st| st.phase)
                .map(|p| format!("{p:?}"))
                .unwrap_or_else(|| "Unknown".into());
            *counts.entry(phase).or_default() += 1;
        }
        for phase in [
            "Provisioning",
            "Active",
            "Deploying",
            "Unhealthy",
            "Stopped",
            "Terminating",
            "Terminated",
            "Failed",
            "Unknown",
        ] {
            ctx.metrics
                .sandboxes
                .get_or_create(&crate::metrics::PhaseLabels {
                    phase: phase.into(),
                })
                .set(counts.get(phase).copied().unwrap_or(0));
        }
    }
}

/// Records an EC2 call made for the Sandbox in the ledger (when one is configured).
pub(super) fn ledger_ec2(
    ctx: &Context,
    obj: &Sandbox,
    action: &str,
    instance: Option<&str>,
    result: Result<(), &Ec2Error>,
) {
    use crate::ledger::{Ec2ActionEvent, NamespacedName, Outcome};
    let Some(ledger) = &ctx.ledger else { return };
    let (outcome, error_code, message) = match result {
        Ok(()) => (Outcome::Succeeded, None, None),
        Err(e) => (Outcome::Failed, Some(e.reason()), Some(e.to_string())),
    };
    ledger.record(Ec2ActionEvent {
        at: Timestamp::now(),
        action: action.to_string(),
        instance_id: instance.map(str::to_string),
        sandbox: Some(NamespacedName::new(
            obj.namespace().unwrap_or_default(),
            obj.name_any(),
        )),
        outcome,
        error_code,
        message,
        request_id: None,
    });
}

/// Records what changed between the old and new status: the instance's state (the power
/// intervals of the cost report come from these) and the image deploy's steps.
pub(super) fn ledger_status(
    ctx: &Context,
    obj: &Sandbox,
    old: &SandboxStatus,
    new: &SandboxStatus,
) {
    use crate::ledger::{DeployStepEvent, InstanceStateEvent, NamespacedName, Outcome, StopReason};
    let Some(ledger) = &ctx.ledger else { return };
    let ns = obj.namespace().unwrap_or_default();
    let name = obj.name_any();
    let state = |s: &SandboxStatus| s.instance.as_ref().and_then(|i| i.state);
    if let Some(inst) = &new.instance
        && state(old) != state(new)
        && let Some(st) = state(new)
    {
        ledger.record(InstanceStateEvent {
            at: Timestamp::now(),
            instance_id: inst.id.clone(),
            sandbox: Some(NamespacedName::new(ns.clone(), name.clone())),
            instance_type: inst.instance_type.clone(),
            market: inst.market.unwrap_or_default(),
            state: st.as_str().to_string(),
            stop_reason: new.stop_reason.and_then(|r| StopReason::parse(r.as_str())),
        });
    }
    let step = |s: &SandboxStatus| s.deploy.as_ref().map(|d| (d.tag.clone(), d.state));
    if let Some(d) = &new.deploy
        && step(old) != step(new)
    {
        let outcome = match d.state {
            decide::deploy_state::SUCCEEDED => Outcome::Succeeded,
            decide::deploy_state::FAILED | decide::deploy_state::ROLLED_BACK => Outcome::Failed,
            _ => Outcome::Started,
        };
        ledger.record(DeployStepEvent {
            at: Timestamp::now(),
            namespace: ns,
            deploy: None,
            sandbox: Some(name),
            environment: Some(obj.spec.environment),
            tag: d.tag.clone(),
            previous_tag: d.previous_tag.clone(),
            step: d.state.as_str().to_string(),
            outcome,
            message: d.message.clone(),
        });
    }
}
