//! The SandboxPool controller: keeps `replicas` members running and `standby` more launched
//! but stopped, made from the pool's template; removes members busy-aware (not ready, stopped,
//! idle first; a busy one only once drained); replaces members of an older template within
//! `maxSurge`/`maxUnavailable`, members that never registered and members that failed; takes
//! the tag of a SandboxDeploy that succeeded on its members into the template; and, with
//! `autoscale`, sets its own size from the agents' load.
//!
//! Wiring here; reads in [`observe`], every choice in [`decide`], writes in [`act`], Events in
//! [`record`].

pub mod act;
pub mod decide;
pub mod expect;
pub mod observe;
pub mod record;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action as Requeue;
use kube::runtime::events::Recorder;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{Controller, WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use tracing::{debug, info, warn};

use crate::api::pool_events as events;
use crate::api::{POOL_LABEL, Sandbox, SandboxDeploy, SandboxPool, SandboxPoolStatus, Scaler};
use crate::controller::ErrorCategory;
use crate::controller::key;
use crate::controller::sandboxes::{Change, Owned, SandboxWatch};
use crate::metrics::Metrics;
use decide::{Action, Inputs};

const CONTROLLER: &str = "sandboxpool";
/// The field manager of pool status writes.
pub const STATUS_MANAGER: &str = "sandbox-operator";

/// What can go wrong in one reconcile, one variant per kind of operation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kubernetes API call failed.
    #[error("{what} for SandboxPool {object}: {source}")]
    Kube {
        /// What was being done.
        what: String,
        /// namespace/name.
        object: String,
        /// The error.
        source: kube::Error,
    },
    /// The shared Sandbox store's watch ended.
    #[error("the shared Sandbox store is gone (its watch ended)")]
    StoreGone,
}

impl Error {
    /// The metric label of this error.
    pub fn category(&self) -> ErrorCategory {
        match self {
            Error::Kube { .. } | Error::StoreGone => ErrorCategory::Kubernetes,
        }
    }
}

/// Shared state of the controller.
pub struct Context {
    client: Client,
    recorder: Recorder,
    metrics: Arc<Metrics>,
    deploys: Mutex<Option<Store<SandboxDeploy>>>,
    /// The shared Sandbox store, read by owner: the members.
    members: Mutex<Option<Owned>>,
    /// Member writes the store has not shown yet.
    expectations: expect::Expectations,
    written: super::WrittenStatus<SandboxPoolStatus>,
    idle: observe::IdleClock,
}

impl Context {
    /// The controller's context, publishing Events through `recorder`.
    pub fn with_recorder(client: Client, metrics: Arc<Metrics>, recorder: Recorder) -> Arc<Self> {
        Arc::new(Self {
            client,
            recorder,
            metrics,
            deploys: Mutex::default(),
            members: Mutex::default(),
            expectations: Default::default(),
            written: Default::default(),
            idle: Default::default(),
        })
    }

    /// The controller's context with an event recorder of its own.
    pub fn new(client: Client, metrics: Arc<Metrics>) -> Arc<Self> {
        let recorder = super::recorder(client.clone(), "sandbox-operator");
        Self::with_recorder(client, metrics, recorder)
    }
}

/// Runs the controller until `shutdown` resolves, with a Sandbox watch of its own.
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
/// starts): a member's change wakes its pool; a SandboxDeploy's change wakes the pools of its
/// namespace.
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
    let sandbox_stream = sandboxes.changes().map(Change::into_sandbox);
    *ctx.members.lock().expect("member store") = Some(sandboxes.owned());
    let (pools, deploys): (Api<SandboxPool>, Api<SandboxDeploy>) = match &namespace {
        Some(ns) => (
            Api::namespaced(ctx.client.clone(), ns),
            Api::namespaced(ctx.client.clone(), ns),
        ),
        None => (Api::all(ctx.client.clone()), Api::all(ctx.client.clone())),
    };
    let (store, writer) = reflector::store();
    let pool_stream = crate::controller::refused::reported(
        CONTROLLER,
        watcher(pools, watcher::Config::default().any_semantic()),
    )
    .backoff(crate::controller::watch::backoff())
    .reflect(writer)
    .applied_objects();
    let (deploy_store, deploy_writer) = reflector::store();
    *ctx.deploys.lock().expect("deploy store") = Some(deploy_store);
    let deploy_stream = crate::controller::refused::reported(
        CONTROLLER,
        watcher(deploys, watcher::Config::default().any_semantic()),
    )
    .backoff(crate::controller::watch::backoff())
    .reflect(deploy_writer)
    .applied_objects();
    let pools_of_ns = store.clone();
    Controller::for_stream(pool_stream, store)
        .with_config(crate::controller::runtime_config(concurrency))
        .trigger_backoff(crate::controller::watch::trigger_backoff())
        .watches_shared_stream(sandbox_stream, |s: Arc<Sandbox>| {
            let ns = s.namespace();
            observe::owner_pool(&s).map(|name| {
                let r = ObjectRef::<SandboxPool>::new(&name);
                match ns {
                    Some(ns) => r.within(&ns),
                    None => r,
                }
            })
        })
        .watches_stream(deploy_stream, move |d: SandboxDeploy| {
            let ns = d.namespace();
            pools_of_ns
                .state()
                .into_iter()
                .filter(|p| p.namespace() == ns)
                .map(|p| ObjectRef::from_obj(&*p))
                .collect::<Vec<_>>()
        })
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|_| futures::future::ready(()))
}

/// Requeues after an error.
pub fn error_policy(p: Arc<SandboxPool>, err: &Error, ctx: Arc<Context>) -> Requeue {
    ctx.metrics
        .reconcile_failed(CONTROLLER, err.category().as_str());
    crate::controller::refused::error(CONTROLLER, "reconciling", err);
    warn!(pool = %key(p.as_ref()), error = %err, "reconcile failed; will retry");
    Requeue::requeue(Duration::from_secs(5))
}

/// The reconcile.
pub async fn reconcile(p: Arc<SandboxPool>, ctx: Arc<Context>) -> Result<Requeue, Error> {
    ctx.metrics.reconciled(CONTROLLER);
    let mut pool = (*p).clone();
    let uid = pool.uid().unwrap_or_default();
    if pool.metadata.deletion_timestamp.is_some() {
        // The garbage collector deletes the members (their ownerReferences); each Sandbox's
        // own deletion handles its instance.
        ctx.written.forget(&uid);
        ctx.idle.retain(&uid, &HashSet::new());
        ctx.expectations.forget(&uid);
        return Ok(Requeue::await_change());
    }
    let ns = pool.namespace().unwrap_or_default();
    let name = pool.name_any();
    let pools: Api<SandboxPool> = Api::namespaced(ctx.client.clone(), &ns);
    let sbx: Api<Sandbox> = Api::namespaced(ctx.client.clone(), &ns);
    let mut status = ctx.written.fresh(
        &uid,
        pool.metadata.resource_version.as_deref(),
        pool.status.as_ref(),
    );
    let before = status.clone();
    let now = Timestamp::now();

    // The fleet's tag: a SandboxDeploy that succeeded on the members.
    let deploys = ctx
        .deploys
        .lock()
        .expect("deploy store")
        .as_ref()
        .map(|s| s.state())
        .unwrap_or_default();
    let seen = observe::deploys(&pool, &deploys);
    if let Some(d) = decide::template_tag(&seen, status.image_deploy.as_deref()) {
        let current = pool
            .spec
            .template
            .spec
            .image
            .as_ref()
            .map(|i| i.tag.as_str());
        if current != Some(d.tag.as_str()) {
            pool = act::set_template_tag(&pools, &pool, &d.tag).await?;
            info!(pool = %key(&pool), tag = %d.tag, deploy = %d.name, "template tag set from a succeeded deploy");
            record::event(
                &ctx,
                &pool,
                false,
                events::TEMPLATE_TAG_SET,
                format!(
                    "SandboxDeploy {} succeeded on the members: members created from now on run {}",
                    d.name, d.tag
                ),
            )
            .await;
        }
        status.image_deploy = Some(d.name.clone());
    }

    // The members, from the shared Sandbox store (by controlling owner); writes of this pool
    // the store has not shown yet are awaited below.
    let owned = ctx
        .members
        .lock()
        .expect("member store")
        .clone()
        .expect("the controller is wired to the shared Sandbox store");
    owned.wait_ready().await.map_err(|_| Error::StoreGone)?;
    let raw: Vec<Arc<Sandbox>> = owned
        .get(&ns, "SandboxPool", &name)
        .into_iter()
        .filter(|s| observe::is_member(s, &uid))
        .collect();
    let members: Vec<decide::Member> = raw
        .iter()
        .map(|s| observe::member(s, &uid, &ctx.idle, now))
        .collect();
    ctx.idle.retain(
        &uid,
        &raw.iter()
            .filter_map(|s| s.uid())
            .collect::<HashSet<String>>(),
    );
    let settled = ctx.expectations.settle(&uid, &members, now);
    for e in &settled.expired {
        warn!(pool = %key(&pool), member = %e.name, write = ?e.write, "the Sandbox store never showed this write; acting without it");
    }

    // The autoscaler sets replicas when the spec asks it to; otherwise someone else does.
    let mut extra_requeue = None;
    let scaler = match decide::autoscale_settings(&pool.spec) {
        Ok(Some(a)) => {
            let active: i32 = members
                .iter()
                .filter(|m| !m.deleting && !m.standby && m.ready)
                .map(|m| m.active_workers.unwrap_or(0).max(0))
                .sum();
            let out = decide::autoscale(
                &a,
                pool.spec.replicas,
                active,
                status.scale_down_since.as_ref().map(|t| t.0),
                now,
            );
            status.recommended_replicas = Some(out.recommended);
            status.scale_down_since = out.lower_since.map(Time);
            if out.lower_since.is_some() {
                extra_requeue = Some(decide::POLL);
            }
            if out.replicas != pool.spec.replicas {
                let from = pool.spec.replicas;
                pool = act::set_replicas(&pools, &pool, out.replicas).await?;
                record::event(
                    &ctx,
                    &pool,
                    false,
                    events::AUTOSCALED,
                    format!(
                        "{from} -> {} replicas: {active} active workers, {} sessions per member at target {}",
                        out.replicas, a.capacity, a.target
                    ),
                )
                .await;
            }
            Scaler::Autoscale
        }
        _ => {
            status.recommended_replicas = None;
            status.scale_down_since = None;
            Scaler::External
        }
    };

    let settings = decide::settings(&pool.spec).and_then(|s| {
        decide::autoscale_settings(&pool.spec)?;
        Ok(s)
    });
    let hash = settings.as_ref().map(|s| s.template_hash.clone()).ok();
    let decision = decide::decide(&Inputs {
        settings,
        status: &status,
        generation: pool.metadata.generation,
        selector: format!("{POOL_LABEL}={name}"),
        image_tag: pool
            .spec
            .template
            .spec
            .image
            .as_ref()
            .map(|i| i.tag.clone()),
        scaler,
        members: &members,
        now,
    });

    if !settled.waiting.is_empty() {
        // The store is behind this pool's own writes: acting now could create a member twice
        // (or drain one again), and the status would count what is no longer so. Look again
        // when the store catches up (its change wakes the pool) or soon.
        let wait = ctx
            .expectations
            .next_timeout(&settled.waiting, now)
            .unwrap_or(Duration::ZERO)
            .clamp(Duration::from_millis(200), Duration::from_secs(1));
        debug!(pool = %key(&pool), waiting = settled.waiting.len(), "member writes in flight; waiting for the store");
        return Ok(Requeue::requeue(wait));
    }

    for action in &decision.actions {
        match action {
            Action::Create { standby } => {
                let hash = hash.as_deref().unwrap_or_default();
                let made = act::create(&sbx, &pool, hash, *standby).await?;
                ctx.expectations
                    .expect(&uid, &made.name_any(), expect::Write::Created, now);
                record::event(
                    &ctx,
                    &pool,
                    false,
                    if *standby {
                        events::STANDBY_CREATED
                    } else {
                        events::MEMBER_CREATED
                    },
                    format!(
                        "member {} created{}",
                        made.name_any(),
                        if *standby {
                            " as standby (stopped)"
                        } else {
                            ""
                        }
                    ),
                )
                .await;
            }
            Action::Start { name } => {
                act::start(&sbx, &pool, name).await?;
                ctx.expectations
                    .expect(&uid, name, expect::Write::Started, now);
                record::event(
                    &ctx,
                    &pool,
                    false,
                    events::STANDBY_STARTED,
                    format!("standby member {name} started"),
                )
                .await;
            }
            Action::Retire { name, drain } => {
                act::retire(&sbx, &pool, name, *drain, now).await?;
                ctx.expectations
                    .expect(&uid, name, expect::Write::Retired, now);
                record::event(
                    &ctx,
                    &pool,
                    false,
                    events::MEMBER_DRAINING,
                    format!("member {name} is drained, then removed"),
                )
                .await;
            }
            Action::Delete {
                name,
                reason,
                message,
            } => {
                act::delete(&sbx, &pool, name).await?;
                ctx.expectations
                    .expect(&uid, name, expect::Write::Deleted, now);
                let warning =
                    matches!(*reason, events::MEMBER_UNREGISTERED | events::MEMBER_FAILED);
                record::event(&ctx, &pool, warning, reason, message.clone()).await;
            }
        }
    }

    if decision.status != before {
        let patch = serde_json::json!({
            "apiVersion": "fleet.valet.dev/v1alpha1",
            "kind": "SandboxPool",
            "status": decision.status,
        });
        let out = pools
            .patch_status(
                &name,
                &PatchParams::apply(STATUS_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await
            .map_err(|source| Error::Kube {
                what: "writing status".into(),
                object: key(&pool),
                source,
            })?;
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
    let requeue = match (decision.requeue, extra_requeue) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    Ok(match requeue {
        Some(d) => Requeue::requeue(d),
        // A periodic look: the idle clock and the agents' load move without an event.
        None => Requeue::requeue(Duration::from_secs(30)),
    })
}
