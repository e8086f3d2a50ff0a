//! The SandboxDeploy controller: rolls an image tag across selected Sandboxes in waves. It
//! paces the rollout by setting each target Sandbox's `spec.image.tag` with server-side apply
//! under its own field manager, and reads the Sandboxes' status to learn the outcome (the
//! Sandbox controller does the per-instance drain, deploy and verification).

pub mod decide;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::controller::Action as Requeue;
use kube::runtime::events::{Event as KEvent, EventType, Recorder};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{Controller, WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use tracing::warn;

use crate::api::conditions;
use crate::api::{
    ABORT_ANNOTATION, DEPLOY_ATTEMPT_ANNOTATION, DEPLOY_FIELD_MANAGER, RETRY_ANNOTATION, Sandbox,
    SandboxDeploy, SandboxDeployStatus,
};
use crate::controller::sandboxes::{Change, SandboxWatch};
use crate::metrics::Metrics;
use decide::{Action, Inputs, Note, TargetObs};

const CONTROLLER: &str = "sandboxdeploy";
/// The field manager for deploy status writes.
pub const STATUS_MANAGER: &str = "sandbox-operator";

/// What can go wrong in one reconcile.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kubernetes API call failed.
    #[error("{what} for SandboxDeploy {object}: {source}")]
    Kube {
        /// What was being done.
        what: String,
        /// namespace/name.
        object: String,
        /// The error.
        source: kube::Error,
    },
    /// The shared Sandbox store has not finished its first list.
    #[error("SandboxDeploy {object}: the Sandbox cache is not ready yet")]
    StoreNotReady {
        /// namespace/name.
        object: String,
    },
}

/// Operator-wide settings of the deploy controller.
#[derive(Clone, Debug)]
pub struct DeploySettings {
    /// Finished deploys kept per namespace; older ones are deleted.
    pub history_limit: usize,
    /// How often a running deploy is looked at.
    pub poll: Duration,
    /// The name events are reported under.
    pub reporter: String,
}

impl Default for DeploySettings {
    fn default() -> Self {
        Self {
            history_limit: 50,
            poll: Duration::from_secs(2),
            reporter: "sandbox-operator".into(),
        }
    }
}

/// Shared state of the controller.
pub struct Context {
    client: Client,
    recorder: Recorder,
    metrics: Arc<Metrics>,
    settings: DeploySettings,
    store: Mutex<Option<Store<SandboxDeploy>>>,
    /// The process's shared Sandbox store (the targets are read from it, not listed).
    sandboxes: Mutex<Option<Store<Sandbox>>>,
    /// The Sandboxes this controller last patched (their image tag), with the
    /// resourceVersion the patch produced: read instead of an older cached copy.
    patched: super::WrittenStatus<Arc<Sandbox>>,
    written: super::WrittenStatus<SandboxDeployStatus>,
    ledger: std::sync::OnceLock<crate::ledger::LedgerHandle>,
}

impl Context {
    /// Creates the controller's context, with an event recorder of its own.
    pub fn new(client: Client, metrics: Arc<Metrics>, settings: DeploySettings) -> Arc<Self> {
        let recorder = super::recorder(client.clone(), &settings.reporter);
        Self::with_recorder(client, metrics, settings, recorder)
    }

    /// Creates the controller's context, publishing Events through `recorder` (the process's
    /// one recorder).
    pub fn with_recorder(
        client: Client,
        metrics: Arc<Metrics>,
        settings: DeploySettings,
        recorder: Recorder,
    ) -> Arc<Self> {
        Arc::new(Self {
            recorder,
            client,
            metrics,
            settings,
            store: Mutex::default(),
            sandboxes: Mutex::default(),
            patched: Default::default(),
            written: Default::default(),
            ledger: std::sync::OnceLock::new(),
        })
    }

    /// The Sandboxes of `ns` from the shared store (once its first list is in), each replaced
    /// by what this controller's last patch of it returned while the store has not caught up.
    async fn sandboxes_in(&self, ns: &str, object: &str) -> Result<Vec<Arc<Sandbox>>, Error> {
        let not_ready = || Error::StoreNotReady {
            object: object.to_owned(),
        };
        let store = self
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
        let uids: std::collections::HashSet<String> = all.iter().filter_map(|s| s.uid()).collect();
        self.patched.retain(|uid| uids.contains(uid));
        Ok(all
            .into_iter()
            .filter(|s| s.namespace().as_deref() == Some(ns))
            .map(|s| {
                let uid = s.uid().unwrap_or_default();
                let rv = s.metadata.resource_version.clone();
                self.patched.fresh_value(&uid, rv.as_deref(), s)
            })
            .collect())
    }

    /// Records every deploy phase and target step in the fleet ledger from now on.
    pub fn set_ledger(&self, ledger: crate::ledger::LedgerHandle) {
        let _ = self.ledger.set(ledger);
    }
}

fn key(d: &SandboxDeploy) -> String {
    format!("{}/{}", d.namespace().unwrap_or_default(), d.name_any())
}

/// Runs the controller until `shutdown` resolves, with a Sandbox watch of its own (the
/// operator shares one between its controllers: [`run_shared`]).
pub async fn run(
    ctx: Arc<Context>,
    namespace: Option<String>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let (client, ns) = (ctx.client.clone(), namespace.clone());
    crate::controller::sandboxes::run_alone(client, ns.as_deref(), |watch| {
        run_shared(
            ctx,
            watch,
            namespace,
            crate::controller::DEFAULT_CONCURRENCY,
            shutdown,
        )
    })
    .await;
}

/// The controller on the process's shared Sandbox watch (subscribed now, before the watch
/// starts), with at most `concurrency` reconciles at once.
pub fn run_shared<S>(
    ctx: Arc<Context>,
    sandboxes: &SandboxWatch,
    namespace: Option<String>,
    concurrency: u16,
    shutdown: S,
) -> impl Future<Output = ()> + Send + use<S>
where
    S: Future<Output = ()> + Send + Sync + 'static,
{
    *ctx.sandboxes.lock().expect("sandbox store") = Some(sandboxes.store());
    let sandbox_stream = sandboxes.changes().map(Change::into_sandbox);
    let deploys: Api<SandboxDeploy> = match &namespace {
        Some(ns) => Api::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    };
    // Each watch paces its own retries (controller::watch), so one failing watch never holds
    // the other back.
    let (store, writer) = reflector::store();
    *ctx.store.lock().expect("store") = Some(store.clone());
    let (gauge_ctx, gauge_store) = (ctx.clone(), store.clone());
    let deploy_stream = crate::controller::refused::reported(
        CONTROLLER,
        watcher(deploys, watcher::Config::default().any_semantic()),
    )
    .backoff(crate::controller::watch::backoff())
    .reflect(writer)
    .applied_objects();
    // A Sandbox's change wakes the running deploys of its namespace that target it.
    let mapper_store = store.clone();
    let controller = Controller::for_stream(deploy_stream, store)
        .with_config(crate::controller::runtime_config(concurrency))
        .trigger_backoff(crate::controller::watch::trigger_backoff())
        .watches_shared_stream(sandbox_stream, move |sbx: Arc<Sandbox>| {
            let ns = sbx.namespace();
            let name = sbx.name_any();
            mapper_store
                .state()
                .into_iter()
                .filter(|d| {
                    d.namespace() == ns
                        && !decide::finished(d.status.as_ref().and_then(|s| s.phase))
                })
                .filter(|d| {
                    d.status.as_ref().is_none_or(|s| {
                        s.targets.is_empty() || s.targets.iter().any(|t| t.name == name)
                    })
                })
                .map(|d| ObjectRef::from_obj(&*d))
                .collect::<Vec<_>>()
        })
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|_| futures::future::ready(()));
    async move {
        let gauges = tokio::spawn(phase_gauges(gauge_ctx, gauge_store));
        controller.await;
        gauges.abort();
    }
}

/// Keeps the per-phase gauge (`sandboxdeploys`) in step with the store: a rollout stuck in
/// Progressing, or a Failed one, is visible to an alert without reading the objects.
async fn phase_gauges(ctx: Arc<Context>, store: reflector::Store<SandboxDeploy>) {
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    loop {
        tick.tick().await;
        let mut counts: std::collections::BTreeMap<String, i64> = Default::default();
        for d in store.state() {
            let phase = d
                .status
                .as_ref()
                .and_then(|st| st.phase)
                .map(|p| format!("{p:?}"))
                .unwrap_or_else(|| "Unknown".into());
            *counts.entry(phase).or_default() += 1;
        }
        for phase in [
            "Pending",
            "AwaitingApproval",
            "Progressing",
            "Paused",
            "Succeeded",
            "Failed",
            "Aborted",
            "Superseded",
            "Unknown",
        ] {
            ctx.metrics
                .sandboxdeploys
                .get_or_create(&crate::metrics::PhaseLabels {
                    phase: phase.into(),
                })
                .set(counts.get(phase).copied().unwrap_or(0));
        }
    }
}

/// Requeues after an error.
pub fn error_policy(d: Arc<SandboxDeploy>, err: &Error, ctx: Arc<Context>) -> Requeue {
    ctx.metrics.reconcile_failed(CONTROLLER, "kube");
    crate::controller::refused::error(CONTROLLER, "reconciling", err);
    warn!(deploy = %key(&d), error = %err, "reconcile failed; will retry");
    Requeue::requeue(Duration::from_secs(5))
}

fn target_obs(s: &Sandbox) -> TargetObs {
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
        ready: conditions::is_true(&st.conditions, "Ready"),
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

fn created(d: &SandboxDeploy) -> (i64, String) {
    (
        d.metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.as_second())
            .unwrap_or(0),
        d.name_any(),
    )
}

/// The reconcile.
pub async fn reconcile(d: Arc<SandboxDeploy>, ctx: Arc<Context>) -> Result<Requeue, Error> {
    ctx.metrics.reconciled(CONTROLLER);
    let object = key(&d);
    let ns = d.namespace().unwrap_or_default();
    let uid = d.uid().unwrap_or_default();
    let kube_err = |what: &str, object: &str| {
        let what = what.to_string();
        let object = object.to_string();
        move |source| Error::Kube {
            what,
            object,
            source,
        }
    };
    let sandboxes: Api<Sandbox> = Api::namespaced(ctx.client.clone(), &ns);
    let status = fresh_status(&d, &ctx, &uid);
    if decide::finished(status.phase)
        && d.annotations()
            .get(RETRY_ANNOTATION)
            .is_none_or(|r| status.last_retry.as_deref() == Some(r))
    {
        return Ok(Requeue::await_change());
    }
    let items = ctx.sandboxes_in(&ns, &object).await?;
    let by_name: BTreeMap<String, &Sandbox> = items.iter().map(|s| (s.name_any(), &**s)).collect();
    let selected: BTreeMap<String, TargetObs> = items
        .iter()
        .filter(|s| {
            s.metadata.deletion_timestamp.is_none()
                && d.spec
                    .selector
                    .matches(&s.labels().clone(), s.spec.environment)
        })
        .map(|s| (s.name_any(), target_obs(s)))
        .collect();
    let observed: BTreeMap<String, TargetObs> = status
        .targets
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                by_name
                    .get(&t.name)
                    .map(|s| target_obs(s))
                    .unwrap_or_default(),
            )
        })
        .collect();
    // Sandboxes a newer deploy, still running, has taken on.
    let mine = created(&d);
    let newer: Vec<Arc<SandboxDeploy>> = ctx
        .store
        .lock()
        .expect("store")
        .as_ref()
        .map(|s| s.state())
        .unwrap_or_default()
        .into_iter()
        .filter(|o| {
            o.namespace().as_deref() == Some(ns.as_str())
                && o.uid().as_deref() != Some(uid.as_str())
                && created(o) > mine
        })
        .filter(|o| !decide::finished(o.status.as_ref().and_then(|s| s.phase)))
        .collect();
    let mut claimed_by_newer: BTreeSet<String> = BTreeSet::new();
    for o in &newer {
        match o.status.as_ref().filter(|s| s.started_at.is_some()) {
            // Started: the targets it chose.
            Some(s) => claimed_by_newer.extend(s.targets.iter().map(|t| t.name.clone())),
            // About to start (not held for approval): what its selector picks now.
            None if !o.spec.paused => claimed_by_newer.extend(
                items
                    .iter()
                    .filter(|s| o.spec.selector.matches(s.labels(), s.spec.environment))
                    .map(|s| s.name_any()),
            ),
            None => {}
        }
    }
    tracing::debug!(deploy = %object, sandboxes = items.len(), selected = selected.len(), observed = ?observed.iter().map(|(n, o)| (n.clone(), o.exists)).collect::<Vec<_>>(), "deploy inputs");
    let abort = d
        .annotations()
        .get(ABORT_ANNOTATION)
        .is_some_and(|v| v == "true");
    let retry = d.annotations().get(RETRY_ANNOTATION).map(String::as_str);
    let decision = decide::decide(&Inputs {
        spec: &d.spec,
        status: &status,
        generation: d.metadata.generation,
        uid: &uid,
        abort,
        retry,
        selected: &selected,
        observed: &observed,
        claimed_by_newer: &claimed_by_newer,
        now: Timestamp::now(),
    });

    for action in &decision.actions {
        match action {
            Action::SetTag {
                sandbox,
                tag,
                attempt,
            } => {
                let patch = serde_json::json!({
                    "apiVersion": "fleet.valet.dev/v1alpha1",
                    "kind": "Sandbox",
                    "metadata": {"name": sandbox, "annotations": {DEPLOY_ATTEMPT_ANNOTATION: attempt}},
                    "spec": {"image": {"tag": tag}},
                });
                let mut patched = sandboxes
                    .patch(
                        sandbox,
                        &PatchParams::apply(DEPLOY_FIELD_MANAGER).force(),
                        &Patch::Apply(&patch),
                    )
                    .await
                    .map_err(kube_err(
                        &format!("setting image.tag on Sandbox {sandbox}"),
                        &object,
                    ))?;
                crate::controller::sandboxes::strip(&mut patched);
                ctx.patched.remember(
                    &patched.uid().unwrap_or_default(),
                    patched.metadata.resource_version.clone().as_deref(),
                    Arc::new(patched),
                );
            }
        }
    }
    for note in &decision.notes {
        publish(&ctx, &d, note).await;
    }
    record_steps(&ctx, &d, &status, &decision.status);
    if decision.status != status {
        let api: Api<SandboxDeploy> = Api::namespaced(ctx.client.clone(), &ns);
        let patch = serde_json::json!({"apiVersion": "fleet.valet.dev/v1alpha1", "kind": "SandboxDeploy", "status": decision.status});
        let out = api
            .patch_status(
                &d.name_any(),
                &PatchParams::apply(STATUS_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await
            .map_err(kube_err("writing status", &object))?;
        ctx.metrics
            .status_writes
            .get_or_create(&crate::metrics::ControllerLabels {
                controller: CONTROLLER.into(),
            })
            .inc();
        ctx.written.remember(
            &uid,
            out.metadata.resource_version.as_deref(),
            decision.status.clone(),
        );
    }
    if decide::finished(decision.status.phase) {
        prune_history(&ctx, &ns).await;
    }
    Ok(match decision.requeue {
        Some(_) => Requeue::requeue(ctx.settings.poll),
        None => Requeue::await_change(),
    })
}

fn fresh_status(d: &SandboxDeploy, ctx: &Context, uid: &str) -> SandboxDeployStatus {
    ctx.written.fresh(
        uid,
        d.metadata.resource_version.as_deref(),
        d.status.as_ref(),
    )
}

async fn publish(ctx: &Context, d: &SandboxDeploy, note: &Note) {
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

/// Deletes finished deploys beyond the history limit in `ns`, oldest first.
async fn prune_history(ctx: &Context, ns: &str) {
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

/// Records the deploy's phase changes and each target's step changes in the ledger.
fn record_steps(
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
                 step: String,
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
        step,
        outcome,
        message,
    };
    if old.phase != new.phase
        && let Some(phase) = new.phase
    {
        let outcome = match phase {
            crate::api::DeployPhase::Succeeded => Outcome::Succeeded,
            crate::api::DeployPhase::Failed | crate::api::DeployPhase::Aborted => Outcome::Failed,
            _ => Outcome::Started,
        };
        ledger.record(event(
            None,
            format!("{phase:?}"),
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
                crate::api::TargetPhase::Succeeded => Outcome::Succeeded,
                crate::api::TargetPhase::Failed | crate::api::TargetPhase::RolledBack => {
                    Outcome::Failed
                }
                _ => Outcome::Started,
            };
            ledger.record(event(
                Some(t.name.clone()),
                format!("{:?}", t.phase),
                t.from_tag.clone(),
                outcome,
                t.message.clone(),
            ));
        }
    }
}
