//! The SecretBundle controller: Kubernetes Secrets rendered into one deterministic `.env`, pushed
//! to every selected Sandbox through its agent's `PUT /env` and to Fly.io apps through Fly's
//! Machines API (`POST /v1/apps/{app}/secrets`, staged; drift seen from the listed digests; keys
//! the bundle dropped unset) or `flyctl secrets import`.
//!
//! The reconcile reads the source Secrets, renders them ([`decide::render()`]), asks
//! [`decide::plan()`] which targets to push now, pushes at most `maxParallel` at a time, and writes
//! the status only when it changed. What wakes it:
//! - a change of a source Secret (or a Fly.io token Secret): a metadata-only watch on Secrets,
//!   mapped to the bundles that name the Secret through the bundle store; this is rotation, by
//!   watch, not by polling (an in-flight rollout of stale content stops starting new pushes);
//! - a Sandbox change that matters (labels, environment, instance state, agent URL, health, the
//!   agent's env hash), mapped to the bundles that select it or list it: a sandbox that starts,
//!   a new matching sandbox, and drift reported by the agent;
//! - a spec change of the bundle itself;
//! - a timer: the next retry of a failed target (exponential backoff), and `refreshInterval`.
//!
//! Values never leave this module except towards a target: messages name keys and Secrets, and
//! everything an agent or flyctl says passes through a [`scrub::Scrubber`] first.
//!
//! The rooms: [`sources`] reads the Secrets, [`decide`] validates, renders, plans and
//! summarizes, [`fly`] and [`fly_api`] hold everything Fly.io (flyctl's process included),
//! [`push`] selects the Sandboxes and carries out a round of pushes, [`record`] writes the
//! status and tells what happened, [`scrub`] masks values in what comes back.

pub mod decide;
pub mod fly;
pub mod fly_api;
pub mod push;
pub mod record;
pub mod scrub;
pub mod sources;

pub use fly_api::FlyApiSettings;
pub use push::{PushTarget, Pusher, execute};
pub use sources::seed_redactor;

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::Action as Requeue;
use kube::runtime::events::Recorder;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{Controller, WatchStreamExt, predicates, watcher};
use kube::{Client, ResourceExt};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tracing::{Instrument, warn};

use crate::api::{Sandbox, SecretBundle};
use crate::controller::ErrorCategory;
use crate::controller::key;
use crate::controller::sandboxes::{Change, SandboxWatch, changed};
use crate::metrics::Metrics;
use decide::{Inputs, Memory, TargetKey};
use scrub::Scrubber;

/// The field manager for status writes.
pub const MANAGER: &str = "sandbox-operator";
const CONTROLLER: &str = "secretbundle";

/// What can go wrong in one reconcile, a variant per operation. Per-target failures (pushing
/// to an agent, setting a Fly.io app's secrets) are not errors: they are recorded in the
/// target's status entry and retried with backoff.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Writing the bundle's status failed.
    #[error("writing status for SecretBundle {object}: {source}")]
    WritingStatus {
        /// namespace/name.
        object: String,
        /// The error.
        source: kube::Error,
    },
    /// Reading a source Secret failed (a missing one is not an error: the status says so).
    #[error("reading source Secret {secret} for SecretBundle {object}: {source}")]
    ReadingSource {
        /// namespace/name.
        object: String,
        /// The Secret.
        secret: String,
        /// The error.
        source: kube::Error,
    },
    /// Reading a Fly.io app's token Secret failed.
    #[error("reading Fly.io token Secret {secret} for SecretBundle {object}: {source}")]
    ReadingFlyToken {
        /// namespace/name.
        object: String,
        /// The Secret.
        secret: String,
        /// The error.
        source: kube::Error,
    },
    /// Reading a Sandbox agent's token Secret failed.
    #[error("reading agent token Secret {secret} for SecretBundle {object}: {source}")]
    ReadingAgentToken {
        /// namespace/name.
        object: String,
        /// The Secret.
        secret: String,
        /// The error.
        source: kube::Error,
    },
    /// The Sandbox cache did not fill in time (no permission to list Sandboxes?).
    #[error("SecretBundle {0}: the Sandbox cache is not ready")]
    StoreNotReady(String),
    /// The bundle has no namespace or UID (never true of a stored object).
    #[error("SecretBundle {0} lacks a namespace or UID")]
    Malformed(String),
}

impl Error {
    /// The kind of failure, the reconcile-error metric's label.
    pub fn category(&self) -> ErrorCategory {
        match self {
            Error::WritingStatus { .. }
            | Error::ReadingSource { .. }
            | Error::ReadingFlyToken { .. }
            | Error::ReadingAgentToken { .. } => ErrorCategory::Kubernetes,
            Error::StoreNotReady(_) => ErrorCategory::NotReady,
            Error::Malformed(_) => ErrorCategory::InvalidSpec,
        }
    }
}

/// Operator-wide settings of the SecretBundle controller.
#[derive(Clone, Debug)]
pub struct ControllerSettings {
    /// The `flyctl` binary (a name looked up in PATH, or a path).
    pub flyctl: PathBuf,
    /// Extra environment for `flyctl` (for example `FLY_CONFIG_DIR` or a proxy). The child's
    /// environment is otherwise cleared, keeping only PATH, HOME, TMPDIR, the TLS trust and
    /// proxy variables, plus `FLY_API_TOKEN`.
    pub flyctl_env: Vec<(String, String)>,
    /// How long one `flyctl secrets import` may take (it waits for the app's redeploy unless
    /// staged).
    pub flyctl_timeout: Duration,
    /// How long one `PUT /env` may take (it includes restarting the named services).
    pub put_env_timeout: Duration,
    /// Retry timings for failed targets.
    pub decide: decide::Settings,
    /// During a long rollout, write progress to status at most this often.
    pub progress_interval: Duration,
    /// The name events are reported under.
    pub reporter: String,
    /// Fly's Machines API (for apps whose method is `Api`).
    pub fly_api: FlyApiSettings,
    /// Whether the API (else flyctl) is the method of Fly.io apps whose spec names none. The
    /// operator's `--fly-method` sets it (default: the API); `false` here keeps a library user
    /// on flyctl, as before the API existed.
    pub fly_api_default: bool,
}

impl Default for ControllerSettings {
    fn default() -> Self {
        Self {
            flyctl: PathBuf::from("flyctl"),
            flyctl_env: Vec::new(),
            flyctl_timeout: Duration::from_secs(300),
            put_env_timeout: Duration::from_secs(120),
            decide: decide::Settings::default(),
            progress_interval: Duration::from_secs(2),
            reporter: "sandbox-operator".into(),
            fly_api: FlyApiSettings::default(),
            fly_api_default: false,
        }
    }
}

struct Stores {
    bundles: Store<SecretBundle>,
    sandboxes: Store<Sandbox>,
}

/// Shared state of the controller.
pub struct Context {
    client: Client,
    recorder: Recorder,
    settings: ControllerSettings,
    metrics: Arc<Metrics>,
    pushes: Family<record::PushLabels, Counter>,
    http: reqwest::Client,
    stores: OnceLock<Stores>,
    /// Per bundle UID, per target: retry state (in memory only).
    memory: Mutex<HashMap<String, BTreeMap<TargetKey, Memory>>>,
    /// Per bundle (namespace/name): bumped when a source Secret changes, so a rollout of the
    /// old content stops starting pushes.
    epochs: Mutex<HashMap<String, u64>>,
    /// Per bundle UID: reconcile errors in a row, for the error backoff.
    errors: Mutex<HashMap<String, u32>>,
    /// The fleet ledger, when one is configured: one event per sync result (hashes and key
    /// names only).
    ledger: OnceLock<crate::ledger::LedgerHandle>,
}

impl Context {
    /// Creates the controller's context, with an event recorder of its own.
    pub fn new(client: Client, metrics: Arc<Metrics>, settings: ControllerSettings) -> Arc<Self> {
        let recorder = super::recorder(client.clone(), &settings.reporter);
        Self::with_recorder(client, metrics, settings, recorder)
    }

    /// Creates the controller's context, publishing Events through `recorder` (the process's
    /// one recorder).
    pub fn with_recorder(
        client: Client,
        metrics: Arc<Metrics>,
        settings: ControllerSettings,
        recorder: Recorder,
    ) -> Arc<Self> {
        let pushes = Family::<record::PushLabels, Counter>::default();
        metrics.register_with(|r| {
            r.register(
                "secretbundle_pushes",
                "SecretBundle pushes per target kind and result",
                pushes.clone(),
            );
        });
        crate::util::install_crypto_provider();
        Arc::new(Self {
            recorder,
            client,
            settings,
            metrics,
            pushes,
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(2)
                .build()
                .expect("building the agent HTTP client"),
            stores: OnceLock::new(),
            ledger: OnceLock::new(),
            memory: Mutex::default(),
            epochs: Mutex::default(),
            errors: Mutex::default(),
        })
    }

    fn epoch(&self, object: &str) -> u64 {
        self.epochs
            .lock()
            .expect("epochs")
            .get(object)
            .copied()
            .unwrap_or(0)
    }

    fn bump(&self, object: String) {
        *self
            .epochs
            .lock()
            .expect("epochs")
            .entry(object)
            .or_default() += 1;
    }

    /// Records every sync result in the fleet ledger from now on.
    pub fn set_ledger(&self, ledger: crate::ledger::LedgerHandle) {
        let _ = self.ledger.set(ledger);
    }

    /// The stores, once the Sandbox store holds its first list.
    async fn ready_stores(&self, object: &str) -> Result<&Stores, Error> {
        let not_ready = || Error::StoreNotReady(object.to_owned());
        let stores = self.stores.get().ok_or_else(not_ready)?;
        tokio::time::timeout(
            Duration::from_secs(30),
            crate::controller::sandboxes::wait_ready(&stores.sandboxes),
        )
        .await
        .map_err(|_| not_ready())?
        .map_err(|_| not_ready())?;
        Ok(stores)
    }

    /// The retry state of bundle `uid`'s targets; that of bundles gone is forgotten (and so
    /// are their values, in the redaction: they are pushed nowhere any more).
    fn memory_of(&self, uid: &str, stores: &Stores) -> BTreeMap<TargetKey, Memory> {
        let live: std::collections::HashSet<String> = stores
            .bundles
            .state()
            .iter()
            .filter_map(|b| b.uid())
            .collect();
        let mut all = self.memory.lock().expect("memory");
        let gone: Vec<String> = all
            .keys()
            .filter(|u| !live.contains(*u) && *u != uid)
            .cloned()
            .collect();
        all.retain(|u, _| live.contains(u) || u == uid);
        sources::forget(&gone);
        all.get(uid).cloned().unwrap_or_default()
    }
}

/// Runs the SecretBundle controller until `shutdown` resolves: SecretBundles in every namespace
/// the client may list (or one namespace when `namespace` is set), with watches on Sandboxes (a
/// watch of its own; the operator shares one between its controllers: [`run_shared`]) and
/// (metadata only) Secrets.
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
    let sandbox_reader = sandboxes.store();
    // Passes on a Sandbox when something a bundle acts on changed, and always when it is
    // deleted.
    let sandbox_stream = changed(sandboxes.changes(), sandbox_relevance).map(Change::into_sandbox);
    let client = ctx.client.clone();
    let (bundles, secrets): (Api<SecretBundle>, Api<PartialObjectMeta<Secret>>) = match &namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client, ns),
        ),
        None => (Api::all(client.clone()), Api::all(client)),
    };
    let (bundle_reader, bundle_writer) = reflector::store();
    let bundle_stream = {
        let ctx = ctx.clone();
        crate::controller::refused::reported(
            CONTROLLER,
            watcher(bundles, watcher::Config::default().any_semantic()),
        )
        .backoff(crate::controller::watch::backoff())
        .reflect(bundle_writer)
        .applied_objects()
        // Spec changes (and deletion) wake it; its own status writes do not.
        .predicate_filter(predicates::generation, Default::default())
        .inspect(move |b| {
            if let Ok(b) = b {
                ctx.bump(key(b));
            }
        })
    };
    // Metadata only: the operator never holds every Secret's data; it reads the few it needs.
    let secret_stream = crate::controller::refused::reported(
        CONTROLLER,
        watcher(secrets, watcher::Config::default().any_semantic()),
    )
    .backoff(crate::controller::watch::backoff())
    .touched_objects();
    let _ = ctx.stores.set(Stores {
        bundles: bundle_reader.clone(),
        sandboxes: sandbox_reader,
    });
    let sandbox_mapper = {
        let store = bundle_reader.clone();
        move |s: Arc<Sandbox>| bundles_for_sandbox(&store, &s)
    };
    let secret_mapper = {
        let store = bundle_reader.clone();
        let ctx = ctx.clone();
        move |s: PartialObjectMeta<Secret>| {
            let (refs, sources) = bundles_for_secret(&store, &s);
            for b in sources {
                ctx.bump(b);
            }
            refs
        }
    };
    Controller::for_stream(bundle_stream, bundle_reader)
        .with_config(crate::controller::runtime_config(concurrency))
        .trigger_backoff(crate::controller::watch::trigger_backoff())
        .watches_shared_stream(sandbox_stream, sandbox_mapper)
        .watches_stream(secret_stream, secret_mapper)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|_| futures::future::ready(()))
}

fn sandbox_relevance(s: &Sandbox) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    s.metadata.labels.hash(&mut h);
    s.metadata.deletion_timestamp.is_some().hash(&mut h);
    s.spec.environment.hash(&mut h);
    s.spec.agent.url.hash(&mut h);
    s.spec.agent.token_secret_ref.hash(&mut h);
    let st = s.status.as_ref();
    st.and_then(|st| st.instance.as_ref())
        .and_then(|i| i.state.as_ref())
        .hash(&mut h);
    if let Some(a) = st.and_then(|st| st.agent.as_ref()) {
        a.url.hash(&mut h);
        a.env_sha256.hash(&mut h);
        format!("{:?}", a.health).hash(&mut h);
    }
    h.finish()
}

/// The bundles a Sandbox concerns: those whose selector matches it, and those that list it
/// (it may have stopped matching).
fn bundles_for_sandbox(store: &Store<SecretBundle>, s: &Sandbox) -> Vec<ObjectRef<SecretBundle>> {
    let ns = s.namespace();
    let name = s.name_any();
    let labels = s.metadata.labels.clone().unwrap_or_default();
    store
        .state()
        .iter()
        .filter(|b| b.namespace() == ns)
        .filter(|b| {
            let selected = b
                .spec
                .targets
                .sandboxes
                .as_ref()
                .and_then(|t| t.selector.parse(decide::SELECTOR_FIELD).ok())
                .is_some_and(|sel| sel.matches(&labels, s.spec.environment));
            let listed = b.status.as_ref().is_some_and(|st| {
                st.targets
                    .iter()
                    .any(|t| t.kind == crate::api::BundleTargetKind::Sandbox && t.name == name)
            });
            selected || listed
        })
        .map(|b| ObjectRef::from_obj(&**b))
        .collect()
}

/// The bundles that name a Secret (as a source or as a Fly.io token), and, of those, the ones
/// (namespace/name) whose content it feeds.
fn bundles_for_secret(
    store: &Store<SecretBundle>,
    s: &PartialObjectMeta<Secret>,
) -> (Vec<ObjectRef<SecretBundle>>, Vec<String>) {
    let ns = s.namespace();
    let name = s.name_any();
    let mut refs = Vec::new();
    let mut sources = Vec::new();
    for b in store.state().iter().filter(|b| b.namespace() == ns) {
        let source = b.spec.sources.iter().any(|src| src.secret_name == name);
        let token = b
            .spec
            .targets
            .fly_apps
            .iter()
            .any(|f| f.token_secret_ref.name == name);
        if source {
            sources.push(key(b.as_ref()));
        }
        if source || token {
            refs.push(ObjectRef::from_obj(&**b));
        }
    }
    (refs, sources)
}

/// Requeues after an error, with backoff per bundle.
pub fn error_policy(obj: Arc<SecretBundle>, err: &Error, ctx: Arc<Context>) -> Requeue {
    ctx.metrics
        .reconcile_failed(CONTROLLER, err.category().as_str());
    crate::controller::refused::error(CONTROLLER, "reconciling", err);
    warn!(bundle = %key(obj.as_ref()), error = %err, "reconcile failed; will retry");
    let uid = obj.uid().unwrap_or_default();
    let n = {
        let mut errors = ctx.errors.lock().expect("errors");
        let n = errors.entry(uid).or_default();
        *n += 1;
        *n
    };
    Requeue::requeue(push::error_backoff(&ctx.settings.decide, n))
}

/// The reconcile entry point, in a span naming the bundle.
pub async fn reconcile(obj: Arc<SecretBundle>, ctx: Arc<Context>) -> Result<Requeue, Error> {
    let span = tracing::info_span!(
        "reconcile",
        controller = CONTROLLER,
        namespace = %obj.namespace().unwrap_or_default(),
        name = %obj.name_any(),
    );
    reconcile_bundle(obj, ctx).instrument(span).await
}

/// Read the sources, validate and render (or say why nothing can be pushed), then a round.
async fn reconcile_bundle(obj: Arc<SecretBundle>, ctx: Arc<Context>) -> Result<Requeue, Error> {
    ctx.metrics.reconciled(CONTROLLER);
    let object = key(obj.as_ref());
    let (Some(ns), Some(uid)) = (obj.namespace(), obj.uid()) else {
        return Err(Error::Malformed(object));
    };
    let stores = ctx.ready_stores(&object).await?;
    // Read before the Secrets: a change after this point stops the pushes of what is read.
    let epoch = ctx.epoch(&object);
    let now = push::whole_seconds_now();
    let secrets = Api::namespaced(ctx.client.clone(), &ns);
    let mut secrets = sources::SecretCache::new(secrets, &object);
    let data = sources::read_sources(&mut secrets, &obj.spec, &uid).await?;
    // The validate step and the render: every problem of either is reported together.
    let validated = decide::validate(&obj.spec);
    let (valid, content) = match (validated, decide::render(&obj.spec.sources, &data)) {
        (Ok(v), Ok(c)) => (v, c),
        (v, c) => {
            let problems: Vec<_> = v.err().into_iter().chain(c.err()).flatten().collect();
            let done = record::invalid(&ctx, &obj, &problems, now).await?;
            ctx.errors.lock().expect("errors").remove(&uid);
            return Ok(done);
        }
    };
    drop(data);
    let bundle = Bundle {
        obj: &obj,
        object: &object,
        uid: &uid,
        stores,
        epoch,
        now,
    };
    round(&ctx, bundle, &valid, &content, secrets).await
}

/// What a round knows of the bundle it pushes.
struct Bundle<'a> {
    obj: &'a SecretBundle,
    object: &'a str,
    uid: &'a str,
    stores: &'a Stores,
    epoch: u64,
    now: k8s_openapi::jiff::Timestamp,
}

/// One round: observe the Fly.io apps and the selected Sandboxes, plan, push, record, and say
/// when to look again.
async fn round(
    ctx: &Arc<Context>,
    b: Bundle<'_>,
    valid: &decide::ValidSpec,
    content: &decide::Content,
    mut secrets: sources::SecretCache<'_>,
) -> Result<Requeue, Error> {
    let (obj, spec) = (b.obj, &b.obj.spec);
    let mut scrubber = Scrubber::for_vars(&content.vars);
    let fly = fly::observe(&mut secrets, spec, content, &ctx.settings, &mut scrubber).await?;
    let selection = push::select(b.stores, obj, valid.selector.as_ref());
    let memory = ctx.memory_of(b.uid, b.stores);
    let status = obj.status.clone().unwrap_or_default();
    let inputs = Inputs {
        content,
        generation: obj.metadata.generation,
        sandboxes: &selection.obs,
        fly_apps: &fly.obs,
        status: &status,
        memory: &memory,
        refresh: valid.refresh,
        now: b.now,
        settings: &ctx.settings.decide,
    };
    let plan = decide::plan(&inputs);
    let pick = push::Picked::new(&plan, &inputs, &selection, obj);
    let (targets, tokens) = pick.targets(&mut secrets, &mut scrubber).await?;
    let edge = push::Edge::new(ctx, b.object, obj, content, &fly, &scrubber, &tokens);
    let round = push::round(ctx, obj, &edge, targets, &plan, &inputs, b.epoch).await?;
    let new = record::after_round(ctx, obj, &plan, &inputs, &round).await?;
    let kept = push::prune(round.memory, &plan);
    ctx.memory
        .lock()
        .expect("memory")
        .insert(b.uid.to_owned(), kept);
    ctx.errors.lock().expect("errors").remove(b.uid);
    Ok(record::next_look(
        ctx,
        b.uid,
        &new,
        inputs,
        round.interrupted,
    ))
}
