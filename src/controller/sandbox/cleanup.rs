//! Deletion: the Sandbox's deletion policy carried out against its instance (terminate, stop,
//! retain), the finalizer kept until EC2 says it is done.

use std::sync::Arc;

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::Action as Requeue;

use super::act::write_status;
use super::decide::{self, DeleteStep, InstanceObs, Note};
use super::observe::fresh_status;
use super::{Context, Error, key};
use crate::api::{Sandbox, SandboxPhase};
use crate::ec2::{self, InstanceState};

/// Cleans up after a deleted Sandbox as its deletion policy says; an `Err` keeps the
/// finalizer while EC2 is still at work.
pub(super) async fn cleanup(obj: Arc<Sandbox>, ctx: Arc<Context>) -> Result<Requeue, Error> {
    let object = key(&obj);
    let ns = obj.namespace().unwrap_or_default();
    let api: Api<Sandbox> = Api::namespaced(ctx.client.clone(), &ns);
    let uid = obj.uid().unwrap_or_default();
    // What was written last, even if the cached copy does not show it yet (an instance id
    // recorded moments ago must not be missed: EC2 may not list the instance by its tags yet).
    let mut status = fresh_status(&obj, &ctx, &uid);
    let id = match (
        &obj.spec.instance_id,
        status.instance.as_ref().map(|i| i.id.clone()),
    ) {
        (Some(id), _) => Some(id.clone()),
        (None, Some(id)) => Some(id),
        // Launched but never recorded (a crash): find it by its UID tag.
        (None, None) => ctx
            .ec2
            .find_by_uid(&uid)
            .await
            .map_err(|source| Error::FindingByUid {
                object: object.clone(),
                source,
            })?
            .map(|i| i.id),
    };
    let observed = match &id {
        None => InstanceObs::NoInstance,
        Some(id) => match ctx
            .ec2
            .describe(id, ctx.settings.decide.poll)
            .await
            .map_err(|source| Error::Describing {
                object: object.clone(),
                source,
            })? {
            Some(i) => InstanceObs::Found(i),
            None => InstanceObs::Missing { id: id.clone() },
        },
    };
    let step = decide::decide_delete_seen(&obj.spec, &status, &observed, Timestamp::now());
    if status.phase != Some(SandboxPhase::Terminating) && step != DeleteStep::Done {
        status.phase = Some(SandboxPhase::Terminating);
        if let InstanceObs::Found(i) = &observed {
            status.instance = Some(decide::instance_status(
                i,
                status
                    .instance
                    .as_ref()
                    .is_some_and(|s| s.launched_by_operator),
            ));
        }
        write_status(&api, &obj, &status, &ctx).await?;
    }
    match step {
        DeleteStep::Done => {
            // An instance the operator launched and now leaves behind (Retain, or Stop once
            // stopped) is released: its ownership tags go, so no orphan sweep touches it.
            if let (Some(id), InstanceObs::Found(inst)) = (&id, &observed)
                && obj.spec.management_policy == crate::api::ManagementPolicy::Full
                && inst.state != InstanceState::Terminated
                && inst.tags.contains_key(ec2::TAG_MANAGED_BY)
            {
                ctx.ec2
                    .release(id)
                    .await
                    .map_err(|source| Error::Releasing {
                        object: object.clone(),
                        source,
                    })?;
                ctx.publish(&obj, &Note { warning: false, reason: "Released", message: format!("instance {id} is left as the deletion policy says, without the operator's ownership tags") }).await;
            }
            if let Some(id) = &id {
                ctx.ec2.untrack(id);
                ctx.owners.lock().expect("owners").remove(id);
            }
            ctx.last_probe.lock().expect("last_probe").remove(&uid);
            ctx.written.forget(&uid);
            let source = super::bootstrap::redaction_source(&uid);
            crate::redact::process().retain(|s| s != source);
            ctx.rejections.lock().expect("rejections").remove(&uid);
            ctx.metrics.forget_sandbox(&ns, &obj.name_any());
            // A terminated sandbox keeps its row, with status terminated (dashboards count what
            // ran); one whose instance is left behind (Retain, Stop, ObserveOnly) or that never
            // had one leaves the table.
            let terminated = match &observed {
                InstanceObs::Found(i) => i.state == InstanceState::Terminated,
                InstanceObs::Missing { .. } => {
                    status.phase == Some(SandboxPhase::Terminated)
                        || status.phase == Some(SandboxPhase::Terminating)
                            && obj.spec.effective_deletion_policy()
                                == crate::api::DeletionPolicy::Terminate
                }
                InstanceObs::NoInstance => false,
            } && obj.spec.management_policy == crate::api::ManagementPolicy::Full;
            if let Some(ledger) = &ctx.ledger {
                if terminated {
                    let mut row_obj = (*obj).clone();
                    row_obj.status = Some(status.clone());
                    ledger.upsert_sandbox(
                        crate::ledger::SandboxRow::from_sandbox(&row_obj).terminated(),
                    );
                } else {
                    ledger.delete_sandbox(&ns, &obj.name_any());
                }
            }
            Ok(Requeue::await_change())
        }
        // An Err keeps the finalizer: the instance is not gone yet.
        DeleteStep::Wait => Err(Error::Waiting {
            object,
            message: "waiting for the instance to finish terminating".into(),
        }),
        DeleteStep::Stop(id) => {
            ctx.ec2.stop(&id).await.map_err(|source| Error::Stopping {
                object: object.clone(),
                source,
            })?;
            ctx.publish(
                &obj,
                &Note {
                    warning: false,
                    reason: "Stopping",
                    message: format!("deletionPolicy Stop: stopping instance {id}"),
                },
            )
            .await;
            ctx.ec2
                .release(&id)
                .await
                .map_err(|source| Error::Releasing {
                    object: object.clone(),
                    source,
                })?;
            Ok(Requeue::await_change())
        }
        DeleteStep::Terminate(id) => {
            ctx.ec2
                .terminate(&id)
                .await
                .map_err(|source| Error::Terminating {
                    object: object.clone(),
                    source,
                })?;
            ctx.publish(
                &obj,
                &Note {
                    warning: false,
                    reason: "Terminating",
                    message: format!("deletionPolicy Terminate: terminating instance {id}"),
                },
            )
            .await;
            // Not done until EC2 says terminated: come back (an Err keeps the finalizer).
            Err(Error::Waiting {
                object,
                message: format!("waiting for instance {id} to terminate"),
            })
        }
    }
}
