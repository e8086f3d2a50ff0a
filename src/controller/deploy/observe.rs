//! What a SandboxDeploy's reconcile sees: its target Sandboxes from the process's shared
//! Sandbox store (never a LIST), what each looks like to a rollout, and which Sandboxes newer
//! deploys have taken on.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use kube::ResourceExt;
use kube::runtime::reflector::{ObjectRef, Store};

use super::decide::{self, TargetObs};
use super::{Context, Error};
use crate::api::conditions;
use crate::api::{ParsedSelector, Sandbox, SandboxDeploy, SandboxDeployStatus};

/// The deploy's world as the reconcile saw it.
pub struct Observed {
    /// The Sandboxes the selector picks now (by name): the targets, should the rollout start.
    pub selected: BTreeMap<String, TargetObs>,
    /// Each target of the status as it looks now (by name; a deleted one as not existing).
    pub observed: BTreeMap<String, TargetObs>,
    /// Sandboxes a newer, still running deploy of the namespace has taken on.
    pub claimed_by_newer: BTreeSet<String>,
}

/// Reads the deploy's targets from the shared store. `selector` is the deploy's own, as the
/// validate step parsed it (`None` when it is invalid: nothing is selected, and the decision
/// says why).
pub async fn observe(
    ctx: &Context,
    d: &SandboxDeploy,
    status: &SandboxDeployStatus,
    selector: Option<&ParsedSelector>,
) -> Result<Observed, Error> {
    let ns = d.namespace().unwrap_or_default();
    let items = sandboxes_in(ctx, &ns, &super::key(d)).await?;
    let by_name: BTreeMap<String, &Sandbox> = items.iter().map(|s| (s.name_any(), &**s)).collect();
    let selected = items
        .iter()
        .filter(|s| s.metadata.deletion_timestamp.is_none())
        .filter(|s| selector.is_some_and(|sel| sel.selects(s)))
        .map(|s| (s.name_any(), target_obs(s)))
        .collect();
    let observed = status
        .targets
        .iter()
        .map(|t| {
            let obs = by_name.get(&t.name).map(|s| target_obs(s));
            (t.name.clone(), obs.unwrap_or_default())
        })
        .collect();
    let claimed_by_newer = claimed_by_newer(ctx, d, &items);
    tracing::debug!(sandboxes = items.len(), "deploy inputs");
    Ok(Observed {
        selected,
        observed,
        claimed_by_newer,
    })
}

/// The Sandboxes of `ns` from the shared store (once its first list is in), each replaced by
/// what this controller's last patch of it returned while the store has not caught up.
async fn sandboxes_in(ctx: &Context, ns: &str, object: &str) -> Result<Vec<Arc<Sandbox>>, Error> {
    let not_ready = || Error::StoreNotReady {
        object: object.to_owned(),
    };
    let store = ctx
        .sandboxes
        .lock()
        .expect("sandbox store")
        .clone()
        .ok_or_else(not_ready)?;
    tokio::time::timeout(
        Duration::from_secs(30),
        crate::controller::sandboxes::wait_ready(&store),
    )
    .await
    .map_err(|_| not_ready())?
    .map_err(|_| not_ready())?;
    let all = store.state();
    // What was patched of Sandboxes gone since is forgotten.
    let uids: HashSet<String> = all.iter().filter_map(|s| s.uid()).collect();
    ctx.patched.retain(|uid| uids.contains(uid));
    Ok(all
        .into_iter()
        .filter(|s| s.namespace().as_deref() == Some(ns))
        .map(|s| {
            let uid = s.uid().unwrap_or_default();
            let rv = s.metadata.resource_version.clone();
            ctx.patched.fresh_value(&uid, rv.as_deref(), s)
        })
        .collect())
}

/// Sandboxes a newer deploy of the namespace, still running, has taken on: the targets it
/// chose once started, what its selector picks now while it is about to start (not held for
/// approval).
fn claimed_by_newer(ctx: &Context, d: &SandboxDeploy, items: &[Arc<Sandbox>]) -> BTreeSet<String> {
    let (ns, uid, mine) = (d.namespace(), d.uid(), created(d));
    let deploys = ctx
        .store
        .lock()
        .expect("store")
        .as_ref()
        .map(|s| s.state())
        .unwrap_or_default();
    let mut claimed = BTreeSet::new();
    for o in deploys.iter().filter(|o| {
        o.namespace() == ns
            && o.uid() != uid
            && created(o) > mine
            && !decide::finished(o.status.as_ref().and_then(|s| s.phase))
    }) {
        match o.status.as_ref().filter(|s| s.started_at.is_some()) {
            Some(s) => claimed.extend(s.targets.iter().map(|t| t.name.clone())),
            // An invalid selector is held before it starts: it claims nothing.
            None if !o.spec.paused => {
                if let Ok(sel) = o.spec.selector.parse(decide::SELECTOR_FIELD) {
                    let picked = items.iter().filter(|s| sel.selects(s));
                    claimed.extend(picked.map(|s| s.name_any()));
                }
            }
            None => {}
        }
    }
    claimed
}

/// The running deploys of a Sandbox's namespace that target it (or have not chosen their
/// targets yet): what a change of the Sandbox wakes at once, so a rollout sees a target's
/// progress when it happens rather than at its next poll.
pub fn deploys_for_sandbox(
    deploys: &Store<SandboxDeploy>,
    sandbox: &Sandbox,
) -> Vec<ObjectRef<SandboxDeploy>> {
    let ns = sandbox.namespace();
    let name = sandbox.name_any();
    deploys
        .state()
        .into_iter()
        .filter(|d| {
            d.namespace() == ns && !decide::finished(d.status.as_ref().and_then(|s| s.phase))
        })
        .filter(|d| {
            d.status
                .as_ref()
                .is_none_or(|s| s.targets.is_empty() || s.targets.iter().any(|t| t.name == name))
        })
        .map(|d| ObjectRef::from_obj(&*d))
        .collect()
}

/// A Sandbox as a rollout sees it.
pub fn target_obs(s: &Sandbox) -> TargetObs {
    let st = s.status.clone().unwrap_or_default();
    let running = st.instance.as_ref().and_then(|i| i.state)
        == Some(crate::api::InstanceState::Running)
        && s.spec.power_state == crate::api::PowerState::Running;
    TargetObs {
        exists: s.metadata.deletion_timestamp.is_none(),
        spec_tag: s.spec.image.as_ref().map(|i| i.tag.clone()),
        reported_tag: st.agent.as_ref().and_then(|a| a.image_tag.clone()),
        running,
        deploy: st
            .deploy
            .as_ref()
            .map(|d| (d.tag.clone(), d.state, d.attempt.clone(), d.message.clone())),
        ready: conditions::is_true(&st.conditions, conditions::READY),
        unhealthy: unhealthy(&st),
    }
}

/// Why a Sandbox counts as not healthy for a rollout, if it does.
fn unhealthy(st: &crate::api::SandboxStatus) -> Option<String> {
    use crate::api::{AgentHealth, SandboxPhase};
    let agent_msg = || {
        st.agent
            .as_ref()
            .and_then(|a| a.message.clone())
            .map(|m| format!(": {m}"))
            .unwrap_or_default()
    };
    match st.phase {
        Some(SandboxPhase::Unhealthy) => Some(format!("phase Unhealthy{}", agent_msg())),
        Some(SandboxPhase::Terminated) => {
            Some("phase Terminated: its instance was terminated on request".into())
        }
        Some(SandboxPhase::Failed) => Some(format!(
            "phase Failed: {}",
            st.failure_reason.as_deref().unwrap_or("see its status")
        )),
        _ if st
            .agent
            .as_ref()
            .is_some_and(|a| a.health == AgentHealth::Unhealthy) =>
        {
            Some(format!("agent unhealthy{}", agent_msg()))
        }
        _ => None,
    }
}

/// A deploy's age key: creation second, then name.
pub fn created(d: &SandboxDeploy) -> (i64, String) {
    (
        d.metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.as_second())
            .unwrap_or(0),
        d.name_any(),
    )
}
