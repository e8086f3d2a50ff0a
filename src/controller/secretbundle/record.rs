//! What a SecretBundle's reconcile leaves behind: each push's outcome (log, counter, Event,
//! ledger), the round's Events, and the status, written only when it changed.

use std::time::Duration;

use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action as Requeue;
use kube::runtime::events::{Event as KEvent, EventType};
use kube::{Resource, ResourceExt};
use prometheus_client::encoding::EncodeLabelSet;
use tracing::{debug, info, warn};

use super::decide::{self, Inputs, Outcome, Plan, SourceProblem, TargetKey, reason};
use super::push::{self, RoundResult};
use super::{CONTROLLER, Context, Error, MANAGER, key};
use crate::api::{SecretBundle, SecretBundleStatus};

/// Labels of the push counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct PushLabels {
    /// Sandbox or FlyApp.
    kind: String,
    /// synced, staged, failed or skipped.
    result: String,
}

/// The first 12 characters of a content hash, as messages show it.
fn short(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}

/// Publishes an Event about the bundle (a note over 1000 bytes is cut); a failure to publish
/// is logged, never fatal.
pub(super) async fn publish(
    ctx: &Context,
    obj: &SecretBundle,
    warning: bool,
    reason: &str,
    note: String,
) {
    let mut note = note;
    if note.len() > 1000 {
        let mut cut = 1000;
        while !note.is_char_boundary(cut) {
            cut -= 1;
        }
        note.truncate(cut);
        note.push_str("...");
    }
    let ev = KEvent {
        type_: if warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: reason.into(),
        note: Some(note),
        action: "Sync".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &obj.object_ref(&())).await {
        warn!(bundle = %key(obj), error = %e, "publishing an event failed");
    }
}

/// Writes the status (server-side apply).
pub(super) async fn write_status(
    ctx: &Context,
    obj: &SecretBundle,
    st: &SecretBundleStatus,
) -> Result<(), Error> {
    let api: Api<SecretBundle> =
        Api::namespaced(ctx.client.clone(), &obj.namespace().unwrap_or_default());
    let patch = serde_json::json!({
        "apiVersion": "fleet.valet.dev/v1alpha1",
        "kind": "SecretBundle",
        "status": st,
    });
    api.patch_status(
        &obj.name_any(),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(|source| Error::WritingStatus {
        object: key(obj),
        source,
    })?;
    ctx.metrics
        .status_writes
        .get_or_create(&crate::metrics::ControllerLabels {
            controller: CONTROLLER.into(),
        })
        .inc();
    Ok(())
}

/// Ready's reason and message when it is False.
fn ready_false(st: &SecretBundleStatus) -> Option<(String, String)> {
    crate::api::conditions::get(&st.conditions, decide::cond::READY)
        .filter(|c| c.status == crate::api::conditions::FALSE)
        .map(|c| (c.reason.clone(), c.message.clone()))
}

fn ready_changed(old: &SecretBundleStatus, new: &SecretBundleStatus) -> bool {
    let get = |s: &SecretBundleStatus| {
        crate::api::conditions::get(&s.conditions, decide::cond::READY)
            .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
    };
    get(old) != get(new)
}

/// A spec or sources nothing can be pushed from: the status says why (one warning Event when
/// Ready turns False), and the watches on the bundle and its Secrets bring the next look.
pub(super) async fn invalid(
    ctx: &Context,
    obj: &SecretBundle,
    problems: &[SourceProblem],
    now: k8s_openapi::jiff::Timestamp,
) -> Result<Requeue, Error> {
    let old = obj.status.clone().unwrap_or_default();
    let new = decide::summarize_invalid(&old, obj.metadata.generation, problems, now);
    if ready_changed(&old, &new)
        && let Some((why, message)) = ready_false(&new)
    {
        warn!(bundle = %key(obj), reason = %why, message = %message, "nothing pushed");
        publish(ctx, obj, true, &why, message).await;
    }
    if new != old {
        write_status(ctx, obj, &new).await?;
    }
    Ok(Requeue::await_change())
}

/// After a round: the status from its outcomes, the round's Events (content synced or staged;
/// Ready turning False, unless the failures were reported target by target already or a
/// rollout is under way), and the status written when it changed.
pub(super) async fn after_round(
    ctx: &Context,
    obj: &SecretBundle,
    plan: &Plan,
    inputs: &Inputs<'_>,
    round: &RoundResult,
) -> Result<SecretBundleStatus, Error> {
    let (content, old) = (inputs.content, inputs.status);
    let new = push::summarize(&round.status, plan, &round.outcomes, inputs);
    let synced_now = round
        .outcomes
        .values()
        .filter(|(o, _)| matches!(o, Outcome::Synced { hash } if *hash == content.hash))
        .count();
    let staged_now: Vec<&str> = round
        .outcomes
        .iter()
        .filter(|(_, (o, _))| {
            matches!(o, Outcome::Staged { hash, fly } if *hash == content.hash && fly.set)
        })
        .map(|(k, _)| k.name())
        .collect();
    if !staged_now.is_empty() {
        publish(
            ctx,
            obj,
            false,
            reason::STAGED,
            format!(
                "set content {} ({} keys) on Fly.io app(s) {} through Fly's API: staged, not deployed; the Machines take it at their next deploy or update",
                content.short_hash(),
                content.vars.len(),
                staged_now.join(", ")
            ),
        )
        .await;
    }
    if synced_now > 0 {
        publish(
            ctx,
            obj,
            false,
            reason::SYNCED,
            format!(
                "pushed content {} ({} keys) to {synced_now} target(s)",
                content.short_hash(),
                content.vars.len()
            ),
        )
        .await;
    }
    let failed_now = round.outcomes.values().any(|(o, _)| {
        matches!(
            o,
            Outcome::Failed { .. } | Outcome::FlyFailed { skip: false, .. }
        )
    });
    if ready_changed(old, &new)
        && let Some((why, message)) = ready_false(&new)
        && why != reason::SYNCING
        && ((why != reason::SYNC_FAILED && !reason::FLY_FAILURES.contains(&why.as_str()))
            || !failed_now)
    {
        publish(ctx, obj, true, &why, message).await;
    }
    if new != round.status {
        write_status(ctx, obj, &new).await?;
    }
    if !round.outcomes.is_empty() {
        info!(bundle = %key(obj), content = %content.short_hash(), synced = new.synced_targets, total = new.total_targets, "push round done");
    }
    Ok(new)
}

/// When to look again after a round: at once when a source changed meanwhile (the watch has
/// queued it), soon when pushes are due already, else when the targets' waits say.
pub(super) fn next_look(
    ctx: &Context,
    uid: &str,
    new: &SecretBundleStatus,
    inputs: Inputs<'_>,
    interrupted: bool,
) -> Requeue {
    if interrupted {
        return Requeue::requeue(Duration::from_millis(100));
    }
    let memory_after = ctx
        .memory
        .lock()
        .expect("memory")
        .get(uid)
        .cloned()
        .unwrap_or_default();
    let next = decide::plan(&Inputs {
        status: new,
        memory: &memory_after,
        ..inputs
    });
    if next.pushes().next().is_some() {
        return Requeue::requeue(Duration::from_secs(1));
    }
    debug!(requeue = ?next.requeue, "reconciled");
    Requeue::requeue(next.requeue)
}

/// Logs, counts and reports one outcome (an Event per failure), and records it in the ledger.
pub(super) async fn outcome(
    ctx: &Context,
    obj: &SecretBundle,
    object: &str,
    target: &TargetKey,
    o: &Outcome,
) {
    if let Some(ledger) = ctx.ledger.get() {
        use crate::ledger::{NamespacedName, Outcome as L, SecretSyncEvent, SecretTargetKind};
        let status = obj.status.clone().unwrap_or_default();
        let (target_kind, target_name) = match target {
            TargetKey::Sandbox(n) => (SecretTargetKind::Sandbox, n.clone()),
            TargetKey::FlyApp(n) => (SecretTargetKind::FlyApp, n.clone()),
        };
        let (outcome, hash, message) = match o {
            Outcome::Synced { hash } => (L::Succeeded, hash.clone(), None),
            Outcome::Failed { message } => (
                L::Failed,
                status.content_hash.clone().unwrap_or_default(),
                Some(message.clone()),
            ),
            Outcome::Skipped { message }
            | Outcome::FlyFailed {
                message,
                skip: true,
                ..
            } => (
                L::Failed,
                status.content_hash.clone().unwrap_or_default(),
                Some(format!("skipped: {message}")),
            ),
            Outcome::Staged { hash, .. } => (
                L::Succeeded,
                hash.clone(),
                Some(
                    "staged through Fly's API: the Machines take it at their next deploy or update"
                        .into(),
                ),
            ),
            Outcome::FlyFailed { message, .. } => (
                L::Failed,
                status.content_hash.clone().unwrap_or_default(),
                Some(message.clone()),
            ),
        };
        ledger.record(SecretSyncEvent {
            at: k8s_openapi::jiff::Timestamp::now(),
            bundle: NamespacedName::new(obj.namespace().unwrap_or_default(), obj.name_any()),
            target_kind,
            target_name,
            content_hash: hash,
            keys: status.keys.clone(),
            outcome,
            message,
        });
    }
    let kind = match target {
        TargetKey::Sandbox(_) => "Sandbox",
        TargetKey::FlyApp(_) => "FlyApp",
    };
    let result = match o {
        Outcome::Synced { .. } => "synced",
        Outcome::Staged { .. } => "staged",
        Outcome::Failed { .. } | Outcome::FlyFailed { skip: false, .. } => "failed",
        Outcome::Skipped { .. } | Outcome::FlyFailed { skip: true, .. } => "skipped",
    };
    ctx.pushes
        .get_or_create(&PushLabels {
            kind: kind.into(),
            result: result.into(),
        })
        .inc();
    match o {
        Outcome::Synced { hash } => {
            debug!(bundle = %object, target = %target, content = %short(hash), "synced");
        }
        Outcome::Failed { message } => {
            warn!(bundle = %object, target = %target, error = %message, "push failed; will retry with backoff");
            publish(
                ctx,
                obj,
                true,
                reason::SYNC_FAILED,
                format!("{target}: {message}"),
            )
            .await;
        }
        Outcome::Skipped { message } => {
            warn!(bundle = %object, target = %target, reason = %message, "target skipped");
            publish(
                ctx,
                obj,
                true,
                reason::TARGET_SKIPPED,
                format!("{target}: {message}"),
            )
            .await;
        }
        Outcome::Staged { hash, fly } => {
            debug!(bundle = %object, target = %target, content = %short(hash), set = fly.set, unset = ?fly.unset, "staged");
            if !fly.drifted.is_empty() || fly.drift_unnamed {
                let keys = if fly.drifted.is_empty() {
                    "the managed keys' digests differed from those recorded".to_string()
                } else {
                    format!("{} changed or missing", fly.drifted.join(", "))
                };
                warn!(bundle = %object, target = %target, drift = %keys, "drift on Fly.io corrected");
                publish(
                    ctx,
                    obj,
                    true,
                    reason::FLY_DRIFT,
                    format!("{target}: {keys} on Fly.io; set again"),
                )
                .await;
            }
            if !fly.unset.is_empty() {
                publish(
                    ctx,
                    obj,
                    false,
                    reason::FLY_UNSET,
                    format!(
                        "{target}: unset keys no longer in the bundle: {}",
                        fly.unset.join(", ")
                    ),
                )
                .await;
            }
        }
        Outcome::FlyFailed {
            message,
            reason,
            skip,
            ..
        } => {
            if *skip {
                warn!(bundle = %object, target = %target, %reason, message = %message, "target skipped");
            } else {
                warn!(bundle = %object, target = %target, %reason, error = %message, "push failed; will retry with backoff");
            }
            publish(ctx, obj, true, reason, format!("{target}: {message}")).await;
        }
    }
}
