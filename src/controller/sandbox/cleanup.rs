//! Deletion: the Sandbox's deletion policy carried out against its instance (terminate, stop,
//! retain), the finalizer kept until EC2 says it is done. Observed by
//! [`observe::deleting`], decided by [`decide::decide_deletion`] (the step, the status edit,
//! the release, the ledger row); this edge carries it out and records.

use std::sync::Arc;

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::Action as Requeue;

use super::act::write_status;
use super::decide::{self, DeleteStep, Note};
use super::observe;
use super::{Context, Error, key};
use crate::api::Sandbox;
use crate::api::sandbox_events as events;

/// Cleans up after a deleted Sandbox as its deletion policy says; an `Err` keeps the
/// finalizer while EC2 is still at work.
pub(super) async fn cleanup(obj: Arc<Sandbox>, ctx: Arc<Context>) -> Result<Requeue, Error> {
    let object = key(obj.as_ref());
    let ns = obj.namespace().unwrap_or_default();
    let api: Api<Sandbox> = Api::namespaced(ctx.client.clone(), &ns);
    let uid = obj.uid().unwrap_or_default();

    // ---- Observe. ----
    let seen = observe::deleting(&ctx, &obj, &uid).await?;

    // ---- Decide. ----
    let plan = decide::decide_deletion(
        &obj.spec,
        &seen.status,
        seen.id.as_deref(),
        &seen.instance,
        Timestamp::now(),
    );

    // ---- Carry out, and record. ----
    if let Some(status) = &plan.status {
        write_status(&api, &obj, status, &ctx).await?;
    }
    match plan.step {
        DeleteStep::Done => {
            if let Some(id) = &plan.release {
                ctx.ec2
                    .release(id)
                    .await
                    .map_err(|source| Error::Releasing {
                        object: object.clone(),
                        source,
                    })?;
                ctx.publish(&obj, &Note { warning: false, reason: events::RELEASED, message: format!("instance {id} is left as the deletion policy says, without the operator's ownership tags") }).await;
            }
            if let Some(id) = &seen.id {
                ctx.ec2.untrack(id);
                ctx.owners.lock().expect("owners").remove(id);
            }
            ctx.last_probe.lock().expect("last_probe").remove(&uid);
            ctx.written.forget(&uid);
            let source = super::bootstrap::redaction_source(&uid);
            crate::redact::process().retain(|s| s != source);
            ctx.rejections.lock().expect("rejections").remove(&uid);
            ctx.metrics.forget_sandbox(&ns, &obj.name_any());
            if let Some(ledger) = &ctx.ledger {
                if plan.terminated {
                    let mut row_obj = (*obj).clone();
                    row_obj.status = Some(seen.status.clone());
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
                    reason: events::STOPPING,
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
                    reason: events::TERMINATING,
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
