//! The edge that looks: the status last written (or the cached copy, whichever is newer), the
//! instance from the shared EC2 view, and the agent's `/health` with its token read from the
//! Secret the spec names. What it finds is plain data for [`super::decide`]; a probe that
//! fails is an observation too, never an error of the reconcile.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::reflector::ObjectRef;

use super::decide::{InstanceObs, ProbeObs};
use super::{Context, Error, key};
use crate::agent::client::{AgentClient, AgentError, AgentToken, Timeouts};
use crate::api::{Sandbox, SandboxStatus};

/// What the agent said, with the client that asked (for the actions that follow).
pub(super) struct Probed {
    /// The answer, or why there is none.
    pub(super) probe: ProbeObs,
    /// The client, when one could be built (the token read and the URL valid).
    pub(super) client: Option<AgentClient>,
}

/// The status to decide from: the one this controller wrote last when the cache has not caught
/// up with it yet, else the cached object's.
pub(super) fn fresh_status(obj: &Sandbox, ctx: &Context, uid: &str) -> SandboxStatus {
    ctx.written.fresh(
        uid,
        obj.metadata.resource_version.as_deref(),
        obj.status.as_ref(),
    )
}

/// What a deletion looks at: the status as last written, the instance id known for the
/// Sandbox and what EC2 reports for it.
pub(super) struct Deleting {
    /// The status as last written (see [`fresh_status`]).
    pub(super) status: SandboxStatus,
    /// The spec's instance id, else the status's, else the one found by the UID tag.
    pub(super) id: Option<String>,
    /// What EC2 reports for `id`.
    pub(super) instance: InstanceObs,
}

/// The deletion's observe step: the status last written, even if the cached copy does not show
/// it yet (an instance id recorded moments ago must not be missed: EC2 may not list the
/// instance by its tags yet); the instance id (an instance launched but never recorded, after
/// a crash, is found by its UID tag); and the instance from the EC2 view no older than the
/// poll interval.
pub(super) async fn deleting(ctx: &Context, obj: &Sandbox, uid: &str) -> Result<Deleting, Error> {
    let status = fresh_status(obj, ctx, uid);
    let id = match (
        &obj.spec.instance_id,
        status.instance.as_ref().map(|i| i.id.clone()),
    ) {
        (Some(id), _) => Some(id.clone()),
        (None, Some(id)) => Some(id),
        (None, None) => ctx
            .ec2
            .find_by_uid(uid)
            .await
            .map_err(|source| Error::FindingByUid {
                object: key(obj),
                source,
            })?
            .map(|i| i.id),
    };
    let instance = match &id {
        None => InstanceObs::NoInstance,
        Some(id) => match ctx
            .ec2
            .describe(id, ctx.settings.decide.poll)
            .await
            .map_err(|source| Error::Describing {
                object: key(obj),
                source,
            })? {
            Some(i) => InstanceObs::Found(i),
            None => InstanceObs::Missing { id: id.clone() },
        },
    };
    Ok(Deleting {
        status,
        id,
        instance,
    })
}

/// The instance by id, from the shared EC2 view no older than `max_age`; the instance is
/// remembered as this Sandbox's so EC2 changes to it wake the Sandbox.
pub(super) async fn instance(
    ctx: &Context,
    obj: &Sandbox,
    id: &str,
    max_age: Duration,
) -> Result<InstanceObs, Error> {
    ctx.owners
        .lock()
        .expect("owners")
        .insert(id.to_string(), ObjectRef::from_obj(obj));
    let found = ctx
        .ec2
        .describe(id, max_age)
        .await
        .map_err(|source| Error::Describing {
            object: key(obj),
            source,
        })?;
    Ok(match found {
        Some(i) => InstanceObs::Found(i),
        None => InstanceObs::Missing { id: id.to_string() },
    })
}

/// How long ago the agent of this Sandbox was last asked (not since the operator started:
/// `None`).
pub(super) fn since_last_probe(ctx: &Context, uid: &str) -> Option<Duration> {
    ctx.last_probe
        .lock()
        .expect("last_probe")
        .get(uid)
        .map(Instant::elapsed)
}

/// Asks the agent for `/health` (the token read from its Secret first), and notes the time.
pub(super) async fn probe(
    ctx: &Context,
    obj: &Sandbox,
    uid: &str,
    url: Option<&str>,
    timeout: Duration,
) -> Probed {
    let out = match agent_client_for(obj, url, timeout, ctx).await {
        Ok(c) => {
            let probe = match c.health().await {
                Ok(r) => ProbeObs::Report(Box::new(r)),
                Err(AgentError::Unauthorized { .. }) => ProbeObs::Misconfigured {
                    reason: "Unauthorized".into(),
                    message: "the agent refused the token (401): check spec.agent.tokenSecretRef"
                        .into(),
                },
                Err(e) => ProbeObs::Failed(e.to_string()),
            };
            Probed {
                probe,
                client: Some(c),
            }
        }
        Err(probe) => Probed {
            probe,
            client: None,
        },
    };
    ctx.last_probe
        .lock()
        .expect("last_probe")
        .insert(uid.to_string(), Instant::now());
    out
}

/// The agent client for the Sandbox, with the token read from the Secret the spec names; what
/// stops one being built is a misconfiguration to report.
async fn agent_client_for(
    obj: &Sandbox,
    url: Option<&str>,
    timeout: Duration,
    ctx: &Context,
) -> Result<AgentClient, ProbeObs> {
    let Some(url) = url else {
        return Err(ProbeObs::Misconfigured {
            reason: "AgentUrlUnknown".into(),
            message: "cannot build the agent URL: the instance lacks the address spec.agent.urlTemplate needs".into(),
        });
    };
    // agent.tokenSecretRef, else the token minted for agent.bootstrap.
    let token_ref = super::bootstrap::token_ref(&obj.spec, &obj.name_any());
    let token = match &token_ref {
        None => None,
        Some(r) => {
            let ns = obj.namespace().unwrap_or_default();
            let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
            match secrets.get_opt(&r.name).await {
                Ok(Some(s)) => match s.data.as_ref().and_then(|d| d.get(&r.key)) {
                    Some(v) => {
                        let token = String::from_utf8_lossy(&v.0).trim().to_string();
                        if obj.spec.agent.token_secret_ref.is_none() {
                            // The minted token, masked wherever the agent's text enters (an
                            // operator restarted since it was minted learns it here).
                            crate::redact::process().set_values(
                                &super::bootstrap::redaction_source(&obj.uid().unwrap_or_default()),
                                [token.clone()],
                            );
                        }
                        Some(AgentToken::new(token))
                    }
                    None => {
                        return Err(ProbeObs::Misconfigured {
                            reason: "TokenSecretKeyMissing".into(),
                            message: format!(
                                "the agent token Secret {ns}/{} has no key {:?}",
                                r.name, r.key
                            ),
                        });
                    }
                },
                Ok(None) => {
                    return Err(ProbeObs::Misconfigured {
                        reason: "TokenSecretMissing".into(),
                        message: format!("the agent token Secret {ns}/{} does not exist", r.name),
                    });
                }
                Err(e) => {
                    return Err(ProbeObs::Failed(format!(
                        "reading the agent token Secret {ns}/{}: {e}",
                        r.name
                    )));
                }
            }
        }
    };
    let timeouts = Timeouts {
        health: timeout,
        ..Timeouts::default()
    };
    AgentClient::with_http(ctx.http.clone(), url, token, timeouts)
        // Where the agent's text enters: masked again with every secret the operator knows.
        .map(|c| c.with_redactor(crate::redact::process().clone()))
        .map_err(|e| ProbeObs::Misconfigured {
            reason: "AgentUrlInvalid".into(),
            message: e.to_string(),
        })
}
