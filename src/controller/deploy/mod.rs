//! The SandboxDeploy controller: rolls an image tag across selected Sandboxes in waves. It
//! paces the rollout by setting each target Sandbox's `spec.image.tag` with server-side apply
//! under its own field manager, and reads the Sandboxes' status to learn the outcome (the
//! Sandbox controller does the per-instance drain, deploy and verification).
//!
//! A reconcile validates the spec ([`decide::validate_all`]: durations and the selector, parsed
//! once), observes the targets in the shared Sandbox store ([`observe`]), decides
//! ([`decide::decide`]), sets the tags it was told to, and records ([`record`]: status, Events,
//! ledger). A change of any target Sandbox wakes the deploys that target it at once.

pub mod decide;
pub mod observe;
pub mod record;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action as Requeue;
use kube::runtime::events::Recorder;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{Controller, WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use tracing::{Instrument, warn};

use crate::api::{
    ABORT_ANNOTATION, DEPLOY_ATTEMPT_ANNOTATION, DEPLOY_FIELD_MANAGER, RETRY_ANNOTATION, Sandbox,
    SandboxDeploy, SandboxDeployStatus,
};
use crate::controller::ErrorCategory;
use crate::controller::key;
use crate::controller::sandboxes::{Change, SandboxWatch};
use crate::metrics::Metrics;
use decide::{Action, Inputs};

const CONTROLLER: &str = "sandboxdeploy";
/// The field manager for deploy status writes.
pub const STATUS_MANAGER: &str = "sandbox-operator";

/// What can go wrong in one reconcile: a variant per operation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Writing the deploy's status failed.
    #[error("writing status for SandboxDeploy {object}: {source}")]
    WritingStatus {
        /// namespace/name.
        object: String,
        /// The error.
        source: kube::Error,
    },
    /// Setting a target Sandbox's `spec.image.tag` failed.
    #[error("setting image.tag on Sandbox {sandbox} for SandboxDeploy {object}: {source}")]
    SettingTag {
        /// namespace/name of the deploy.
        object: String,
        /// The Sandbox.
        sandbox: String,
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

impl Error {
    /// The kind of failure, the reconcile-error metric's label.
    pub fn category(&self) -> ErrorCategory {
        match self {
            Error::WritingStatus { .. } | Error::SettingTag { .. } => ErrorCategory::Kubernetes,
            Error::StoreNotReady { .. } => ErrorCategory::NotReady,
        }
    }
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

    /// Records every deploy phase and target step in the fleet ledger from now on.
    pub fn set_ledger(&self, ledger: crate::ledger::LedgerHandle) {
        let _ = self.ledger.set(ledger);
    }
}

/// Runs the controller until `shutdown` resolves, with a Sandbox watch of its own (the
/// operator shares one between its controllers: [`run_shared`]).
pub async fn run(
    ctx: Arc<Context>,
    namespace: Option<String>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    crate::controller::sandboxes::run_on_own_watch(client, ctx, namespace, shutdown, run_shared)
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
    // Every change of a Sandbox (its status included): a target's progress is seen when it
    // happens, not at the next poll.
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
            observe::deploys_for_sandbox(&mapper_store, &sbx)
        })
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|_| futures::future::ready(()));
    async move {
        let gauges = tokio::spawn(record::phase_gauges(gauge_ctx, gauge_store));
        controller.await;
        gauges.abort();
    }
}

/// Requeues after an error.
pub fn error_policy(d: Arc<SandboxDeploy>, err: &Error, ctx: Arc<Context>) -> Requeue {
    ctx.metrics
        .reconcile_failed(CONTROLLER, err.category().as_str());
    crate::controller::refused::error(CONTROLLER, "reconciling", err);
    warn!(deploy = %key(d.as_ref()), error = %err, "reconcile failed; will retry");
    Requeue::requeue(Duration::from_secs(5))
}

/// The reconcile, in a span naming the deploy.
pub async fn reconcile(d: Arc<SandboxDeploy>, ctx: Arc<Context>) -> Result<Requeue, Error> {
    let span = tracing::info_span!(
        "reconcile",
        controller = CONTROLLER,
        namespace = %d.namespace().unwrap_or_default(),
        name = %d.name_any(),
    );
    reconcile_deploy(d, ctx).instrument(span).await
}

/// Validate, observe, decide, act, record.
async fn reconcile_deploy(d: Arc<SandboxDeploy>, ctx: Arc<Context>) -> Result<Requeue, Error> {
    ctx.metrics.reconciled(CONTROLLER);
    let uid = d.uid().unwrap_or_default();
    let status = record::fresh_status(&d, &ctx, &uid);
    let retry = d.annotations().get(RETRY_ANNOTATION).map(String::as_str);
    if decide::finished(status.phase)
        && retry.is_none_or(|r| status.last_retry.as_deref() == Some(r))
    {
        return Ok(Requeue::await_change());
    }
    let valid = decide::validate_all(&d.spec);
    let seen = observe::observe(&ctx, &d, &status, valid.selector.as_ref().ok()).await?;
    let decision = decide::decide(&Inputs {
        spec: &d.spec,
        valid: &valid,
        status: &status,
        generation: d.metadata.generation,
        uid: &uid,
        abort: d
            .annotations()
            .get(ABORT_ANNOTATION)
            .is_some_and(|v| v == "true"),
        retry,
        selected: &seen.selected,
        observed: &seen.observed,
        claimed_by_newer: &seen.claimed_by_newer,
        now: Timestamp::now(),
    });
    for action in &decision.actions {
        act(&ctx, &d, action).await?;
    }
    record::publish(&ctx, &d, &decision.notes).await;
    record::ledger_steps(&ctx, &d, &status, &decision.status);
    record::write_status(&ctx, &d, &status, &decision.status).await?;
    if decide::finished(decision.status.phase) {
        record::prune_history(&ctx, &d.namespace().unwrap_or_default()).await;
    }
    Ok(match decision.requeue {
        Some(_) => Requeue::requeue(ctx.settings.poll),
        None => Requeue::await_change(),
    })
}

/// Carries out one action: sets a Sandbox's image tag (and the attempt marker) under the
/// deploy's field manager, and remembers what the patch returned.
async fn act(ctx: &Context, d: &SandboxDeploy, action: &Action) -> Result<(), Error> {
    let Action::SetTag {
        sandbox,
        tag,
        attempt,
    } = action;
    let sandboxes: Api<Sandbox> =
        Api::namespaced(ctx.client.clone(), &d.namespace().unwrap_or_default());
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
        .map_err(|source| Error::SettingTag {
            object: key(d),
            sandbox: sandbox.clone(),
            source,
        })?;
    crate::controller::sandboxes::strip(&mut patched);
    ctx.patched.remember(
        &patched.uid().unwrap_or_default(),
        patched.metadata.resource_version.clone().as_deref(),
        Arc::new(patched),
    );
    Ok(())
}
