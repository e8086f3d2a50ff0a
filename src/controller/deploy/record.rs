//! What a SandboxDeploy's reconcile leaves behind: the status (written only when it changed),
//! its Events, the ledger's record of phases and target steps, the per-phase gauge, and the
//! history limit.

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::events::{Event as KEvent, EventType};
use kube::runtime::reflector::Store;
use kube::{Resource, ResourceExt};
use tracing::warn;

use super::decide::{self, Note};
use super::observe::created;
use super::{CONTROLLER, Context, Error, STATUS_MANAGER, key};
use crate::api::{DeployPhase, SandboxDeploy, SandboxDeployStatus, TargetPhase};

/// The status to decide from: the one this controller last wrote while the cached object is
/// older, else the cached one.
pub fn fresh_status(d: &SandboxDeploy, ctx: &Context, uid: &str) -> SandboxDeployStatus {
    ctx.written.fresh(
        uid,
        d.metadata.resource_version.as_deref(),
        d.status.as_ref(),
    )
}

/// Writes `new` (server-side apply of the status) when it differs from `old`, and remembers
/// the write so the next reconcile decides from it even before the watch delivers it.
pub async fn write_status(
    ctx: &Context,
    d: &SandboxDeploy,
    old: &SandboxDeployStatus,
    new: &SandboxDeployStatus,
) -> Result<(), Error> {
    if new == old {
        return Ok(());
    }
    let api: Api<SandboxDeploy> =
        Api::namespaced(ctx.client.clone(), &d.namespace().unwrap_or_default());
    let patch = serde_json::json!({"apiVersion": "fleet.valet.dev/v1alpha1", "kind": "SandboxDeploy", "status": new});
    let out = api
        .patch_status(
            &d.name_any(),
            &PatchParams::apply(STATUS_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map_err(|source| Error::WritingStatus {
            object: key(d),
            source,
        })?;
    ctx.metrics
        .status_writes
        .get_or_create(&crate::metrics::ControllerLabels {
            controller: CONTROLLER.into(),
        })
        .inc();
    ctx.written.remember(
        &d.uid().unwrap_or_default(),
        out.metadata.resource_version.as_deref(),
        new.clone(),
    );
    Ok(())
}

/// Publishes the decision's Events (a failure to publish is logged, never fatal).
pub async fn publish(ctx: &Context, d: &SandboxDeploy, notes: &[Note]) {
    for note in notes {
        let ev = KEvent {
            type_: if note.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: note.reason.into(),
            note: Some(note.message.clone()),
            action: note.about.clone().unwrap_or_else(|| note.reason.into()),
            secondary: None,
        };
        if let Err(e) = ctx.recorder.publish(&ev, &d.object_ref(&())).await {
            warn!(deploy = %key(d), error = %e, "publishing an event failed");
        }
    }
}

/// Records the deploy's phase changes and each target's step changes in the ledger.
pub fn ledger_steps(
    ctx: &Context,
    d: &SandboxDeploy,
    old: &SandboxDeployStatus,
    new: &SandboxDeployStatus,
) {
    use crate::ledger::{DeployStepEvent, Outcome};
    let Some(ledger) = ctx.ledger.get() else {
        return;
    };
    let event = |sandbox: Option<String>,
                 step: &str,
                 previous_tag: Option<String>,
                 outcome: Outcome,
                 message: Option<String>| DeployStepEvent {
        at: Timestamp::now(),
        namespace: d.namespace().unwrap_or_default(),
        deploy: Some(d.name_any()),
        sandbox,
        environment: d.spec.selector.environment,
        tag: d.spec.image.tag.clone(),
        previous_tag,
        step: step.to_owned(),
        outcome,
        message,
    };
    if old.phase != new.phase
        && let Some(phase) = new.phase
    {
        let outcome = match phase {
            DeployPhase::Succeeded => Outcome::Succeeded,
            DeployPhase::Failed | DeployPhase::Aborted => Outcome::Failed,
            _ => Outcome::Started,
        };
        ledger.record(event(
            None,
            phase.as_str(),
            None,
            outcome,
            new.message.clone(),
        ));
    }
    for t in &new.targets {
        let before = old
            .targets
            .iter()
            .find(|o| o.name == t.name)
            .map(|o| o.phase);
        if before != Some(t.phase) {
            let outcome = match t.phase {
                TargetPhase::Succeeded => Outcome::Succeeded,
                TargetPhase::Failed | TargetPhase::RolledBack => Outcome::Failed,
                _ => Outcome::Started,
            };
            ledger.record(event(
                Some(t.name.clone()),
                t.phase.as_str(),
                t.from_tag.clone(),
                outcome,
                t.message.clone(),
            ));
        }
    }
}

/// The label of deploys with no phase yet in the per-phase gauge.
const NO_PHASE: &str = "Unknown";

/// Keeps the per-phase gauge (`sandboxdeploys`) in step with the store: a rollout stuck in
/// Progressing, or a Failed one, is visible to an alert without reading the objects.
pub async fn phase_gauges(ctx: std::sync::Arc<Context>, store: Store<SandboxDeploy>) {
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    loop {
        tick.tick().await;
        let mut counts: std::collections::BTreeMap<&'static str, i64> = Default::default();
        for d in store.state() {
            let phase = d.status.as_ref().and_then(|st| st.phase);
            *counts
                .entry(phase.map(DeployPhase::as_str).unwrap_or(NO_PHASE))
                .or_default() += 1;
        }
        let labels = DeployPhase::ALL.map(DeployPhase::as_str);
        for phase in labels.into_iter().chain([NO_PHASE]) {
            ctx.metrics
                .sandboxdeploys
                .get_or_create(&crate::metrics::PhaseLabels {
                    phase: phase.into(),
                })
                .set(counts.get(phase).copied().unwrap_or(0));
        }
    }
}

/// Deletes finished deploys beyond the history limit in `ns`, oldest first.
pub async fn prune_history(ctx: &Context, ns: &str) {
    let api: Api<SandboxDeploy> = Api::namespaced(ctx.client.clone(), ns);
    // From the store, each with the status last written (the store may not have it yet).
    let Some(store) = ctx.store.lock().expect("store").clone() else {
        return;
    };
    let items: Vec<SandboxDeploy> = store
        .state()
        .iter()
        .filter(|d| d.namespace().as_deref() == Some(ns))
        .map(|d| {
            let mut d = (**d).clone();
            let uid = d.uid().unwrap_or_default();
            d.status = Some(fresh_status(&d, ctx, &uid));
            d
        })
        .collect();
    let mut done: Vec<&SandboxDeploy> = items
        .iter()
        .filter(|d| decide::finished(d.status.as_ref().and_then(|s| s.phase)))
        .collect();
    if done.len() <= ctx.settings.history_limit {
        return;
    }
    done.sort_by_key(|d| {
        let s = d.status.as_ref();
        (
            s.and_then(|s| s.finished_at.as_ref())
                .map(|t| t.0.as_second())
                .unwrap_or(0),
            created(d),
        )
    });
    let excess = done.len() - ctx.settings.history_limit;
    for d in done.into_iter().take(excess) {
        match api.delete(&d.name_any(), &DeleteParams::default()).await {
            Ok(_) => tracing::info!(deploy = %key(d), "deleted: beyond the history limit"),
            // Deleted already (the store had not caught up with an earlier prune).
            Err(kube::Error::Api(status)) if status.is_not_found() => {}
            Err(e) => warn!(deploy = %key(d), error = %e, "deleting an old deploy failed"),
        }
    }
}
