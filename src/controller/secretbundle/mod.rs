//! The SecretBundle controller: Kubernetes Secrets rendered into one deterministic `.env`, pushed
//! to every selected Sandbox through its agent's `PUT /env` and to Fly.io apps through Fly's
//! Machines API (`POST /v1/apps/{app}/secrets`, staged; drift seen from the listed digests; keys
//! the bundle dropped unset) or `flyctl secrets import`.
//!
//! The reconcile reads the source Secrets, renders them ([`decide::render`]), asks
//! [`decide::plan`] which targets to push now, pushes at most `maxParallel` at a time, and writes
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

pub mod decide;
pub mod fly;
pub mod fly_api;
pub mod scrub;

pub use fly_api::FlyApiSettings;

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::Action as Requeue;
use kube::runtime::events::{Event as KEvent, EventType, Recorder};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{Controller, WatchStreamExt, predicates, watcher};
use kube::{Client, Resource, ResourceExt};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::io::AsyncWriteExt;
use tracing::{debug, info, warn};

use crate::agent::client::{AgentClient, AgentError, AgentToken, Timeouts};
use crate::api::{
    FlyMethod, Sandbox, SecretBundle, SecretBundleSpec, SecretBundleStatus, SecretKeyRef,
};
use crate::controller::sandboxes::{Change, SandboxWatch, changed};
use crate::metrics::Metrics;
use decide::{
    Assessment, Claim, Content, FlyBlock, FlyObs, Inputs, Memory, Outcome, SandboxObs, SourceData,
    Standing, TargetKey,
};
use scrub::Scrubber;

/// The field manager for status writes.
pub const MANAGER: &str = "sandbox-operator";
const CONTROLLER: &str = "secretbundle";

/// What can go wrong in one reconcile. Per-target failures are not errors: they are recorded in
/// the target's status entry and retried with backoff.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kubernetes API call failed.
    #[error("{what} for SecretBundle {object}: {source}")]
    Kube {
        /// What was being done.
        what: String,
        /// namespace/name.
        object: String,
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
    fn kind(&self) -> &'static str {
        match self {
            Error::Kube { .. } => "kube",
            Error::StoreNotReady(_) => "store",
            Error::Malformed(_) => "malformed",
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

/// Labels of the push counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PushLabels {
    /// Sandbox or FlyApp.
    kind: String,
    /// synced, failed or skipped.
    result: String,
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
    pushes: Family<PushLabels, Counter>,
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
        let pushes = Family::<PushLabels, Counter>::default();
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

    async fn publish(&self, obj: &SecretBundle, warning: bool, reason: &str, note: String) {
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
        if let Err(e) = self.recorder.publish(&ev, &obj.object_ref(&())).await {
            warn!(bundle = %key(obj), error = %e, "publishing an event failed");
        }
    }
}

fn key(obj: &SecretBundle) -> String {
    format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any())
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
                .is_some_and(|t| decide::selects(&t.selector, &labels, s.spec.environment));
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
            sources.push(key(b));
        }
        if source || token {
            refs.push(ObjectRef::from_obj(&**b));
        }
    }
    (refs, sources)
}

/// Requeues after an error, with backoff per bundle.
pub fn error_policy(obj: Arc<SecretBundle>, err: &Error, ctx: Arc<Context>) -> Requeue {
    ctx.metrics.reconcile_failed(CONTROLLER, err.kind());
    crate::controller::refused::error(CONTROLLER, "reconciling", err);
    warn!(bundle = %key(&obj), error = %err, "reconcile failed; will retry");
    let uid = obj.uid().unwrap_or_default();
    let n = {
        let mut errors = ctx.errors.lock().expect("errors");
        let n = errors.entry(uid).or_default();
        *n += 1;
        *n
    };
    let base = ctx.settings.decide.retry_base.max(Duration::from_secs(1));
    Requeue::requeue(decide::backoff(
        &decide::Settings {
            retry_base: base,
            retry_max: ctx.settings.decide.retry_max,
        },
        n,
    ))
}

/// One push to make.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PushTarget {
    /// A Sandbox's agent.
    Sandbox {
        /// The Sandbox.
        name: String,
        /// The agent URL.
        url: String,
        /// Where its token is.
        token: Option<SecretKeyRef>,
    },
    /// A Fly.io app, through flyctl.
    Fly {
        /// The app.
        app: String,
        /// `--stage`.
        stage: bool,
    },
    /// A Fly.io app, through the Machines API.
    FlyApi {
        /// The app.
        app: String,
        /// What the bundle knows of the app's secrets.
        known: fly::api::Known,
    },
}

impl PushTarget {
    /// The target's identity.
    pub fn key(&self) -> TargetKey {
        match self {
            PushTarget::Sandbox { name, .. } => TargetKey::Sandbox(name.clone()),
            PushTarget::Fly { app, .. } | PushTarget::FlyApi { app, .. } => {
                TargetKey::FlyApp(app.clone())
            }
        }
    }
}

/// The edge that carries out a push: the agent client or flyctl (a fake in tests).
pub trait Pusher {
    /// Pushes the content to one target.
    fn push(&self, target: &PushTarget) -> impl Future<Output = Outcome> + Send;
}

/// Pushes to `targets`, at most `max_parallel` at a time, yielding each outcome as it comes.
/// Once `stop` says so (the content changed meanwhile), no further push starts.
pub fn execute<'a, P: Pusher + Sync>(
    pusher: &'a P,
    targets: Vec<PushTarget>,
    max_parallel: usize,
    stop: impl Fn() -> bool + Send + 'a,
) -> impl Stream<Item = (TargetKey, Outcome)> + Send + 'a {
    futures::stream::iter(targets)
        .filter(move |_| futures::future::ready(!stop()))
        .map(move |t| async move {
            let outcome = pusher.push(&t).await;
            (t.key(), outcome)
        })
        .buffer_unordered(max_parallel.max(1))
}

/// The reconcile entry point.
pub async fn reconcile(obj: Arc<SecretBundle>, ctx: Arc<Context>) -> Result<Requeue, Error> {
    ctx.metrics.reconciled(CONTROLLER);
    let object = key(&obj);
    let ns = obj
        .namespace()
        .ok_or_else(|| Error::Malformed(object.clone()))?;
    let uid = obj.uid().ok_or_else(|| Error::Malformed(object.clone()))?;
    let stores = ctx
        .stores
        .get()
        .ok_or_else(|| Error::StoreNotReady(object.clone()))?;
    tokio::time::timeout(
        Duration::from_secs(30),
        crate::controller::sandboxes::wait_ready(&stores.sandboxes),
    )
    .await
    .map_err(|_| Error::StoreNotReady(object.clone()))?
    .map_err(|_| Error::StoreNotReady(object.clone()))?;
    // Read before the Secrets: a change after this point stops the pushes of what is read.
    let epoch = ctx.epoch(&object);
    let now = whole_seconds_now();
    let spec: &SecretBundleSpec = &obj.spec;
    let generation = obj.metadata.generation;
    let old = obj.status.clone().unwrap_or_default();
    let api: Api<SecretBundle> = Api::namespaced(ctx.client.clone(), &ns);
    let mut secrets = SecretCache::new(Api::namespaced(ctx.client.clone(), &ns), &object);

    // ---- Sources. ----
    let mut data = Vec::new();
    for src in &spec.sources {
        if data.iter().any(|d: &SourceData| d.name == src.secret_name) {
            continue;
        }
        let s = secrets.get(&src.secret_name).await?;
        data.push(SourceData {
            name: src.secret_name.clone(),
            data: s.map(|s| {
                s.data
                    .clone()
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.0))
                    .collect()
            }),
        });
    }
    // Every value of every source Secret is a secret of the whole operator: masked wherever an
    // agent's or a subprocess's text enters, from now on (and from start-up on, see
    // [`seed_redactor`]).
    crate::redact::process().set(&redaction_source(&uid), source_secrets(&data));
    // The validate step and the render: every problem of either is reported together.
    let (valid, content) = match (decide::validate(spec), decide::render(&spec.sources, &data)) {
        (Ok(v), Ok(c)) => (v, c),
        (v, c) => {
            let mut problems = v.err().unwrap_or_default();
            problems.extend(c.err().unwrap_or_default());
            drop(data);
            let new = decide::summarize_invalid(&old, generation, &problems, now);
            if ready_changed(&old, &new)
                && let Some(c) = decide_ready(&new)
            {
                warn!(bundle = %object, reason = %c.0, message = %c.1, "nothing pushed");
                ctx.publish(&obj, true, &c.0, c.1).await;
            }
            if new != old {
                write_status(&api, &obj, &new, &ctx).await?;
            }
            ctx.errors.lock().expect("errors").remove(&uid);
            // The watches on the bundle and its Secrets bring the next look.
            return Ok(Requeue::await_change());
        }
    };
    drop(data);
    let mut scrubber = Scrubber::new(
        content.vars.keys().map(String::as_str),
        content.vars.values().map(String::as_str),
    );

    // ---- Fly.io apps. ----
    let fly_stdin = fly::render_import(&content.vars);
    let mut fly_obs = Vec::new();
    let mut fly_tokens: HashMap<String, String> = HashMap::new();
    let default_method = if ctx.settings.fly_api_default {
        FlyMethod::Api
    } else {
        FlyMethod::Flyctl
    };
    for t in &spec.targets.fly_apps {
        let api = t.method.unwrap_or(default_method) == FlyMethod::Api;
        let r = &t.token_secret_ref;
        let mut fingerprint = 0;
        let mut blocked = match secrets.value(r).await? {
            Lookup::SecretMissing => Some(FlyBlock::Credential(format!(
                "the token Secret {} does not exist",
                r.name
            ))),
            Lookup::KeyMissing => Some(FlyBlock::Credential(format!(
                "the token Secret {} has no key {}",
                r.name, r.key
            ))),
            Lookup::Found(bytes) => {
                let raw = String::from_utf8_lossy(&bytes).to_string();
                scrubber.add(raw.trim());
                match fly::check_token(&raw) {
                    Ok(tok) => {
                        let mut h = std::collections::hash_map::DefaultHasher::new();
                        tok.hash(&mut h);
                        fingerprint = h.finish();
                        fly_tokens.insert(t.app.clone(), tok.to_string());
                        None
                    }
                    Err(p) => Some(FlyBlock::Credential(format!(
                        "token Secret {} key {}: {p}",
                        r.name, r.key
                    ))),
                }
            }
        };
        // The API takes any value as JSON; only flyctl's import text has limits.
        if blocked.is_none()
            && !api
            && let Err(e) = &fly_stdin
        {
            blocked = Some(FlyBlock::Value(e.to_string()));
        }
        fly_obs.push(FlyObs {
            app: t.app.clone(),
            blocked,
            fingerprint,
            api,
        });
    }

    // ---- Sandboxes. ----
    let all_bundles = stores.bundles.state();
    let claims: Vec<Claim<'_>> = all_bundles
        .iter()
        .filter(|b| b.namespace().as_deref() == Some(&ns))
        .filter(|b| b.metadata.deletion_timestamp.is_none())
        .map(|b| Claim {
            name: b.metadata.name.as_deref().unwrap_or_default(),
            created: b.metadata.creation_timestamp.as_ref().map(|t| t.0),
            selector: b.spec.targets.sandboxes.as_ref().map(|t| &t.selector),
        })
        .collect();
    let mut selected: Vec<Arc<Sandbox>> = match &spec.targets.sandboxes {
        None => Vec::new(),
        Some(t) => stores
            .sandboxes
            .state()
            .into_iter()
            .filter(|s| s.namespace().as_deref() == Some(&ns))
            .filter(|s| s.metadata.deletion_timestamp.is_none())
            .filter(|s| {
                let labels = s.metadata.labels.clone().unwrap_or_default();
                decide::selects(&t.selector, &labels, s.spec.environment)
            })
            .collect(),
    };
    selected.sort_by_key(|s| s.name_any());
    let me = obj.name_any();
    let sandbox_obs: Vec<SandboxObs> = selected
        .iter()
        .map(|s| {
            let labels = s.metadata.labels.clone().unwrap_or_default();
            let owner = decide::owner(&claims, &labels, s.spec.environment);
            sandbox_obs(s, owner.filter(|o| *o != me).map(str::to_string))
        })
        .collect();

    // ---- Plan. ----
    let memory = {
        let mut all = ctx.memory.lock().expect("memory");
        // Forget bundles that are gone.
        let live: std::collections::HashSet<String> =
            all_bundles.iter().filter_map(|b| b.uid()).collect();
        let gone: Vec<String> = all
            .keys()
            .filter(|u| !live.contains(*u) && **u != uid)
            .cloned()
            .collect();
        all.retain(|u, _| live.contains(u) || *u == uid);
        // Their values are no longer pushed anywhere: the redaction forgets them too.
        if !gone.is_empty() {
            crate::redact::process()
                .retain(|src| redaction_uid(src).is_none_or(|u| !gone.iter().any(|g| g == u)));
        }
        all.get(&uid).cloned().unwrap_or_default()
    };
    let refresh = valid.refresh;
    let settings = &ctx.settings.decide;
    let inputs = Inputs {
        content: &content,
        generation,
        sandboxes: &sandbox_obs,
        fly_apps: &fly_obs,
        status: &old,
        memory: &memory,
        refresh,
        now,
        settings,
    };
    let plan = decide::plan(&inputs);

    // ---- Push. ----
    let mut agent_tokens: HashMap<(String, String), Result<AgentToken, String>> = HashMap::new();
    let mut targets = Vec::new();
    for a in plan.pushes() {
        match &a.key {
            TargetKey::Sandbox(name) => {
                let Some(s) = sandbox_obs.iter().find(|s| &s.name == name) else {
                    continue;
                };
                let token_ref = selected
                    .iter()
                    .find(|x| &x.name_any() == name)
                    .and_then(|x| x.spec.agent.token_secret_ref.clone());
                if let Some(r) = &token_ref {
                    let k = (r.name.clone(), r.key.clone());
                    if let std::collections::hash_map::Entry::Vacant(slot) = agent_tokens.entry(k) {
                        let t = read_agent_token(&mut secrets, r).await?;
                        if let Ok(t) = &t {
                            scrubber.add(t.expose());
                        }
                        slot.insert(t);
                    }
                }
                targets.push(PushTarget::Sandbox {
                    name: name.clone(),
                    url: s.agent_url.clone().unwrap_or_default(),
                    token: token_ref,
                });
            }
            TargetKey::FlyApp(app) if fly_obs.iter().any(|f| &f.app == app && f.api) => {
                targets.push(PushTarget::FlyApi {
                    app: app.clone(),
                    known: decide::fly_known(&inputs, app),
                });
            }
            TargetKey::FlyApp(app) => {
                let stage = spec
                    .targets
                    .fly_apps
                    .iter()
                    .find(|f| &f.app == app)
                    .is_some_and(|f| f.stage);
                targets.push(PushTarget::Fly {
                    app: app.clone(),
                    stage,
                });
            }
        }
    }
    crate::redact::process().set(
        &format!("{}/tokens", redaction_source(&uid)),
        crate::redact::Secrets::values(
            fly_tokens.values().cloned().chain(
                agent_tokens
                    .values()
                    .flatten()
                    .map(|t| t.expose().to_string()),
            ),
        ),
    );
    let edge = Edge {
        ctx: &ctx,
        object: &object,
        content: &content,
        fly_stdin: fly_stdin.as_deref().ok(),
        restart_services: spec
            .targets
            .sandboxes
            .as_ref()
            .map(|t| t.restart_services.as_slice())
            .unwrap_or_default(),
        scrubber: &scrubber,
        agent_tokens: &agent_tokens,
        fly_tokens: &fly_tokens,
    };
    let pushing = targets.len();
    if pushing > 0 {
        info!(bundle = %object, content = %content.short_hash(), targets = pushing, max_parallel = spec.max_parallel, "pushing");
    }
    let mut outcomes: BTreeMap<TargetKey, (Outcome, Timestamp)> = BTreeMap::new();
    let mut new_memory = memory.clone();
    let mut current = old.clone();
    let mut last_write = Instant::now();
    let fingerprints: HashMap<TargetKey, u64> = sandbox_obs
        .iter()
        .map(|s| (TargetKey::Sandbox(s.name.clone()), s.fingerprint))
        .chain(
            fly_obs
                .iter()
                .map(|f| (TargetKey::FlyApp(f.app.clone()), f.fingerprint)),
        )
        .collect();
    let invalid_credentials: Vec<String> = plan
        .targets
        .iter()
        .filter_map(|a| a.invalid_credential.clone())
        .collect();
    {
        let ctx2 = ctx.clone();
        let object2 = object.clone();
        let stop = move || ctx2.epoch(&object2) != epoch;
        let max_parallel = usize::try_from(spec.max_parallel).unwrap_or(1).max(1);
        let mut stream = std::pin::pin!(execute(&edge, targets, max_parallel, stop));
        while let Some((target, outcome)) = stream.next().await {
            let at = whole_seconds_now();
            let fp = fingerprints.get(&target).copied().unwrap_or_default();
            let m = new_memory.entry(target.clone()).or_default();
            decide::remember(m, &outcome, &Inputs { now: at, ..inputs }, fp);
            let m = m.clone();
            ctx.memory
                .lock()
                .expect("memory")
                .entry(uid.clone())
                .or_default()
                .insert(target.clone(), m);
            record(&ctx, &obj, &object, &target, &outcome).await;
            outcomes.insert(target, (outcome, at));
            if last_write.elapsed() >= ctx.settings.progress_interval {
                let st = decide::summarize(
                    &current,
                    generation,
                    &content,
                    standings(&plan, &outcomes, &inputs),
                    &invalid_credentials,
                    now,
                );
                if st != current {
                    write_status(&api, &obj, &st, &ctx).await?;
                    current = st;
                }
                last_write = Instant::now();
            }
        }
    }
    let interrupted = ctx.epoch(&object) != epoch;

    // ---- Record. ----
    let new = decide::summarize(
        &current,
        generation,
        &content,
        standings(&plan, &outcomes, &inputs),
        &invalid_credentials,
        now,
    );
    let synced_now = outcomes
        .values()
        .filter(|(o, _)| matches!(o, Outcome::Synced { hash } if *hash == content.hash))
        .count();
    let staged_now: Vec<&str> = outcomes
        .iter()
        .filter(|(_, (o, _))| {
            matches!(o, Outcome::Staged { hash, fly } if *hash == content.hash && fly.set)
        })
        .map(|(k, _)| k.name())
        .collect();
    if !staged_now.is_empty() {
        ctx.publish(
            &obj,
            false,
            "Staged",
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
        ctx.publish(
            &obj,
            false,
            "Synced",
            format!(
                "pushed content {} ({} keys) to {synced_now} target(s)",
                content.short_hash(),
                content.vars.len()
            ),
        )
        .await;
    }
    // Ready turning False is reported once, unless this round's failures were reported
    // target by target already (or it is a rollout still under way).
    let failed_now = outcomes.values().any(|(o, _)| {
        matches!(
            o,
            Outcome::Failed { .. } | Outcome::FlyFailed { skip: false, .. }
        )
    });
    if ready_changed(&old, &new)
        && let Some((why, message)) = decide_ready(&new)
        && why != decide::reason::SYNCING
        && ((why != decide::reason::SYNC_FAILED && !why.starts_with("Fly")) || !failed_now)
    {
        ctx.publish(&obj, true, &why, message).await;
    }
    if new != current {
        write_status(&api, &obj, &new, &ctx).await?;
    }
    if pushing > 0 {
        info!(bundle = %object, content = %content.short_hash(), synced = new.synced_targets, total = new.total_targets, "push round done");
    }
    ctx.memory
        .lock()
        .expect("memory")
        .insert(uid.clone(), prune(new_memory, &plan));
    ctx.errors.lock().expect("errors").remove(&uid);
    if interrupted {
        // A source changed meanwhile: the watch has queued the next reconcile.
        return Ok(Requeue::requeue(Duration::from_millis(100)));
    }
    // When to look again: what the targets' waits say now.
    let memory_after = ctx
        .memory
        .lock()
        .expect("memory")
        .get(&uid)
        .cloned()
        .unwrap_or_default();
    let next = decide::plan(&Inputs {
        status: &new,
        memory: &memory_after,
        ..inputs
    });
    if next.pushes().next().is_some() {
        return Ok(Requeue::requeue(Duration::from_secs(1)));
    }
    debug!(bundle = %object, requeue = ?next.requeue, "reconciled");
    Ok(Requeue::requeue(next.requeue))
}

/// Now, in whole seconds (what a metav1.Time holds), so a status read back equals the one
/// written.
fn whole_seconds_now() -> Timestamp {
    let now = Timestamp::now();
    Timestamp::from_second(now.as_second()).unwrap_or(now)
}

/// Keeps the memory of the targets that still exist.
fn prune(
    mut memory: BTreeMap<TargetKey, Memory>,
    plan: &decide::Plan,
) -> BTreeMap<TargetKey, Memory> {
    memory.retain(|k, _| plan.targets.iter().any(|a| &a.key == k));
    memory
}

/// The targets' standing: the outcome of a push where there was one, the plan's otherwise.
fn standings(
    plan: &decide::Plan,
    outcomes: &BTreeMap<TargetKey, (Outcome, Timestamp)>,
    inputs: &Inputs<'_>,
) -> Vec<Standing> {
    plan.targets
        .iter()
        .map(|a: &Assessment| match outcomes.get(&a.key) {
            Some((o, at)) => Standing {
                entry: decide::entry_after(
                    a,
                    o,
                    &Inputs {
                        now: *at,
                        ..*inputs
                    },
                ),
                blocks_ready: decide::outcome_blocks_ready(o, inputs),
            },
            None => Standing {
                entry: a.entry.clone(),
                blocks_ready: a.blocks_ready,
            },
        })
        .collect()
}

fn decide_ready(st: &SecretBundleStatus) -> Option<(String, String)> {
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

impl Context {
    /// Records every sync result in the fleet ledger from now on.
    pub fn set_ledger(&self, ledger: crate::ledger::LedgerHandle) {
        let _ = self.ledger.set(ledger);
    }
}

/// Logs, counts and reports one outcome (an Event per failure), and records it in the ledger.
async fn record(ctx: &Context, obj: &SecretBundle, object: &str, target: &TargetKey, o: &Outcome) {
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
            debug!(bundle = %object, target = %target, content = %decide_short(hash), "synced");
        }
        Outcome::Failed { message } => {
            warn!(bundle = %object, target = %target, error = %message, "push failed; will retry with backoff");
            ctx.publish(obj, true, "SyncFailed", format!("{target}: {message}"))
                .await;
        }
        Outcome::Skipped { message } => {
            warn!(bundle = %object, target = %target, reason = %message, "target skipped");
            ctx.publish(obj, true, "TargetSkipped", format!("{target}: {message}"))
                .await;
        }
        Outcome::Staged { hash, fly } => {
            debug!(bundle = %object, target = %target, content = %decide_short(hash), set = fly.set, unset = ?fly.unset, "staged");
            if !fly.drifted.is_empty() || fly.drift_unnamed {
                let keys = if fly.drifted.is_empty() {
                    "the managed keys' digests differed from those recorded".to_string()
                } else {
                    format!("{} changed or missing", fly.drifted.join(", "))
                };
                warn!(bundle = %object, target = %target, drift = %keys, "drift on Fly.io corrected");
                ctx.publish(
                    obj,
                    true,
                    "FlyDrift",
                    format!("{target}: {keys} on Fly.io; set again"),
                )
                .await;
            }
            if !fly.unset.is_empty() {
                ctx.publish(
                    obj,
                    false,
                    "FlyUnset",
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
            ctx.publish(obj, true, reason, format!("{target}: {message}"))
                .await;
        }
    }
}

fn decide_short(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}

/// A Sandbox as [`decide`] sees it.
fn sandbox_obs(s: &Sandbox, claimed_by: Option<String>) -> SandboxObs {
    let st = s.status.as_ref();
    let instance_state = st
        .and_then(|st| st.instance.as_ref())
        .and_then(|i| i.state)
        .map(|s| s.as_str().to_string());
    let agent = st.and_then(|st| st.agent.as_ref());
    let agent_url = agent
        .and_then(|a| a.url.clone())
        .or_else(|| s.spec.agent.url.clone());
    let mut h = std::collections::hash_map::DefaultHasher::new();
    instance_state.hash(&mut h);
    agent_url.hash(&mut h);
    agent.map(|a| format!("{:?}", a.health)).hash(&mut h);
    s.spec.agent.token_secret_ref.hash(&mut h);
    SandboxObs {
        name: s.name_any(),
        instance_state,
        agent_url,
        reported_hash: agent.and_then(|a| a.env_sha256.clone()),
        reported_at: agent.and_then(|a| a.last_seen.as_ref()).map(|t| t.0),
        claimed_by,
        fingerprint: h.finish(),
    }
}

async fn write_status(
    api: &Api<SecretBundle>,
    obj: &SecretBundle,
    st: &SecretBundleStatus,
    ctx: &Context,
) -> Result<(), Error> {
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
    .map_err(|source| Error::Kube {
        what: "writing status".into(),
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

// ---------------------------------------------------------------------------------------------
// Secrets, read once per reconcile.
// ---------------------------------------------------------------------------------------------

enum Lookup {
    SecretMissing,
    KeyMissing,
    Found(Vec<u8>),
}

struct SecretCache<'a> {
    api: Api<Secret>,
    object: &'a str,
    cache: HashMap<String, Option<Secret>>,
}

impl<'a> SecretCache<'a> {
    fn new(api: Api<Secret>, object: &'a str) -> Self {
        Self {
            api,
            object,
            cache: HashMap::new(),
        }
    }

    async fn get(&mut self, name: &str) -> Result<Option<&Secret>, Error> {
        if !self.cache.contains_key(name) {
            let s = self.api.get_opt(name).await.map_err(|source| Error::Kube {
                what: format!("reading Secret {name}"),
                object: self.object.to_string(),
                source,
            })?;
            self.cache.insert(name.to_string(), s);
        }
        Ok(self.cache.get(name).and_then(Option::as_ref))
    }

    async fn value(&mut self, r: &SecretKeyRef) -> Result<Lookup, Error> {
        Ok(match self.get(&r.name).await? {
            None => Lookup::SecretMissing,
            Some(s) => match s.data.as_ref().and_then(|d| d.get(&r.key)) {
                Some(v) => Lookup::Found(v.0.clone()),
                None => Lookup::KeyMissing,
            },
        })
    }
}

/// The process-wide redactor's source for a bundle's values (`<source>/tokens` for the tokens
/// it uses).
fn redaction_source(uid: &str) -> String {
    format!("secretbundle/{uid}")
}

/// The bundle UID a redactor source belongs to.
fn redaction_uid(source: &str) -> Option<&str> {
    let rest = source.strip_prefix("secretbundle/")?;
    Some(rest.strip_suffix("/tokens").unwrap_or(rest))
}

/// Every key and value of the source Secrets, whether the bundle selects it or not.
fn source_secrets(data: &[SourceData]) -> crate::redact::Secrets {
    let mut s = crate::redact::Secrets::default();
    for d in data {
        for (k, v) in d.data.iter().flatten() {
            s.keys.push(k.clone());
            s.values.push(String::from_utf8_lossy(v).into_owned());
        }
    }
    s
}

/// Teaches the process-wide redactor ([`crate::redact::process`]) every secret the operator
/// may meet in an agent's or a subprocess's text before the controllers run, so that the first
/// reconciles after a restart mask what the previous process masked: the keys and values of
/// every SecretBundle's source Secrets, the Fly.io tokens they name, and every Sandbox's agent
/// token. Retries the lists for up to `patience`; a Secret that cannot be read is skipped (the
/// SecretBundle controller reads it again). Returns how many Secrets it read.
pub async fn seed_redactor(client: &Client, namespace: Option<&str>, patience: Duration) -> usize {
    let deadline = Instant::now() + patience;
    let mut delay = Duration::from_millis(200);
    loop {
        match seed_once(client, namespace).await {
            Ok(n) => {
                info!(
                    secrets = n,
                    sources = crate::redact::process().sources(),
                    "redaction seeded from SecretBundles and agent tokens"
                );
                return n;
            }
            Err(e) if Instant::now() + delay < deadline => {
                crate::controller::refused::error(CONTROLLER, "seeding the redaction", &e);
                debug!(error = %e, "seeding the redaction; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(e) => {
                warn!(error = %e, "could not seed the redaction from SecretBundles; the SecretBundle controller teaches it as it reconciles");
                return 0;
            }
        }
    }
}

async fn seed_once(client: &Client, namespace: Option<&str>) -> Result<usize, kube::Error> {
    let lp = kube::api::ListParams::default();
    let (bundles, sandboxes): (Api<SecretBundle>, Api<Sandbox>) = match namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
        ),
        None => (Api::all(client.clone()), Api::all(client.clone())),
    };
    let bundles = bundles.list(&lp).await?.items;
    let sandboxes = sandboxes.list(&lp).await?.items;
    // (namespace, Secret) -> Secret, read once each.
    let mut wanted: std::collections::BTreeSet<(String, String)> = Default::default();
    for b in &bundles {
        let ns = b.namespace().unwrap_or_default();
        for src in &b.spec.sources {
            wanted.insert((ns.clone(), src.secret_name.clone()));
        }
        for f in &b.spec.targets.fly_apps {
            wanted.insert((ns.clone(), f.token_secret_ref.name.clone()));
        }
    }
    for s in &sandboxes {
        if let Some(r) = &s.spec.agent.token_secret_ref {
            wanted.insert((s.namespace().unwrap_or_default(), r.name.clone()));
        }
    }
    let read: HashMap<(String, String), Secret> = futures::stream::iter(wanted)
        .map(|(ns, name)| {
            let api: Api<Secret> = Api::namespaced(client.clone(), &ns);
            async move {
                match api.get_opt(&name).await {
                    Ok(Some(s)) => Some(((ns, name), s)),
                    Ok(None) => None,
                    Err(e) => {
                        debug!(secret = %format!("{ns}/{name}"), error = %e, "seeding the redaction: Secret not read");
                        None
                    }
                }
            }
        })
        .buffer_unordered(16)
        .filter_map(futures::future::ready)
        .collect()
        .await;
    let value = |ns: &str, r: &SecretKeyRef| {
        read.get(&(ns.to_string(), r.name.clone()))
            .and_then(|s| s.data.as_ref()?.get(&r.key))
            .map(|v| String::from_utf8_lossy(&v.0).trim().to_string())
    };
    let p = crate::redact::process();
    for b in &bundles {
        let (Some(uid), ns) = (b.uid(), b.namespace().unwrap_or_default()) else {
            continue;
        };
        let data: Vec<SourceData> = b
            .spec
            .sources
            .iter()
            .map(|src| SourceData {
                name: src.secret_name.clone(),
                data: read
                    .get(&(ns.clone(), src.secret_name.clone()))
                    .and_then(|s| s.data.as_ref())
                    .map(|d| d.iter().map(|(k, v)| (k.clone(), v.0.clone())).collect()),
            })
            .collect();
        p.set(&redaction_source(&uid), source_secrets(&data));
        let tokens: Vec<String> = b
            .spec
            .targets
            .fly_apps
            .iter()
            .filter_map(|f| value(&ns, &f.token_secret_ref))
            .collect();
        p.set(
            &format!("{}/tokens", redaction_source(&uid)),
            crate::redact::Secrets::values(tokens),
        );
    }
    for s in &sandboxes {
        let ns = s.namespace().unwrap_or_default();
        if let Some(r) = &s.spec.agent.token_secret_ref
            && let Some(t) = value(&ns, r)
        {
            p.set_values(&format!("agent-token/{ns}/{}/{}", r.name, r.key), [t]);
        }
    }
    Ok(read.len())
}

/// An agent's token from its Secret, or what is wrong with the reference.
async fn read_agent_token(
    secrets: &mut SecretCache<'_>,
    r: &SecretKeyRef,
) -> Result<Result<AgentToken, String>, Error> {
    Ok(match secrets.value(r).await? {
        Lookup::Found(b) => Ok(AgentToken::new(String::from_utf8_lossy(&b).to_string())),
        Lookup::SecretMissing => Err(format!(
            "the agent token Secret {} does not exist (spec.agent.tokenSecretRef)",
            r.name
        )),
        Lookup::KeyMissing => Err(format!(
            "the agent token Secret {} has no key {} (spec.agent.tokenSecretRef)",
            r.name, r.key
        )),
    })
}

// ---------------------------------------------------------------------------------------------
// The edge: the agent and flyctl.
// ---------------------------------------------------------------------------------------------

/// Variables the `flyctl` child keeps from the operator's environment (everything else is
/// cleared, so nothing of the operator's own credentials reaches it).
const FLYCTL_PASSTHROUGH: &[&str] = &[
    "PATH",
    "HOME",
    "TMPDIR",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "HTTPS_PROXY",
    "HTTP_PROXY",
    "NO_PROXY",
    "https_proxy",
    "http_proxy",
    "no_proxy",
];

struct Edge<'a> {
    ctx: &'a Context,
    object: &'a str,
    content: &'a Content,
    fly_stdin: Option<&'a str>,
    restart_services: &'a [String],
    scrubber: &'a Scrubber,
    agent_tokens: &'a HashMap<(String, String), Result<AgentToken, String>>,
    fly_tokens: &'a HashMap<String, String>,
}

impl Pusher for Edge<'_> {
    async fn push(&self, target: &PushTarget) -> Outcome {
        match target {
            PushTarget::Sandbox { name, url, token } => {
                self.push_sandbox(name, url, token.as_ref()).await
            }
            PushTarget::Fly { app, stage } => self.push_fly(app, *stage).await,
            PushTarget::FlyApi { app, known } => self.push_fly_api(app, known).await,
        }
    }
}

impl Edge<'_> {
    async fn push_sandbox(&self, name: &str, url: &str, token: Option<&SecretKeyRef>) -> Outcome {
        let token = match token {
            None => None,
            Some(r) => match self.agent_tokens.get(&(r.name.clone(), r.key.clone())) {
                Some(Ok(t)) => Some(t.clone()),
                Some(Err(m)) => {
                    return Outcome::Failed { message: m.clone() };
                }
                None => {
                    return Outcome::Failed {
                        message: "the agent token was not read".into(),
                    };
                }
            },
        };
        let timeouts = Timeouts {
            put_env: self.ctx.settings.put_env_timeout,
            ..Timeouts::default()
        };
        let client = match AgentClient::with_http(self.ctx.http.clone(), url, token, timeouts) {
            Ok(c) => c.with_redactor(crate::redact::process().clone()),
            Err(e) => {
                return Outcome::Failed {
                    message: self.scrubber.scrub(&e.to_string()),
                };
            }
        };
        debug!(bundle = %self.object, sandbox = %name, agent = %url, "PUT /env");
        match client
            .put_env(&self.content.env, self.restart_services)
            .await
        {
            Ok(r) => Outcome::Synced { hash: r.sha256 },
            Err(AgentError::Unauthorized { url, .. }) => Outcome::Failed {
                message: format!(
                    "the agent at {url} refused the token (401): check spec.agent.tokenSecretRef of Sandbox {name}"
                ),
            },
            Err(e) => Outcome::Failed {
                message: self.scrubber.scrub(&e.to_string()),
            },
        }
    }

    /// A visit through Fly's Machines API: list the app's secrets, decide
    /// ([`fly::api::visit`]), set and unset in one update when needed, and report what the
    /// app's digests are now.
    async fn push_fly_api(&self, app: &str, known: &fly::api::Known) -> Outcome {
        let Some(token) = self.fly_tokens.get(app) else {
            return Outcome::Failed {
                message: "no usable token (see the conditions)".into(),
            };
        };
        let client = fly_api::FlyApi::new(&self.ctx.http, &self.ctx.settings.fly_api, app, token);
        let failed = |f: fly::api::Failure| Outcome::FlyFailed {
            message: fly::api::message(app, &f),
            reason: f.problem.reason().to_string(),
            retry_after: f.retry_after,
            skip: f.problem == fly::api::Problem::AppNotFound,
        };
        let listed = match client.list(self.scrubber).await {
            Ok(l) => l,
            Err(f) => return failed(f),
        };
        let vars = &self.content.vars;
        let v = fly::api::visit(vars.keys(), known, &listed.secrets);
        let after = if v.set || !v.unset.is_empty() {
            debug!(bundle = %self.object, app = %app, set = v.set, unset = ?v.unset, drifted = ?v.drifted, "Fly.io API: updating the app's secrets");
            match client.update(vars, v.set, &v.unset, self.scrubber).await {
                Err(f) => return failed(f),
                // The update answers the secrets with their new digests; list when it did not.
                Ok(u) if vars.keys().all(|k| u.secrets.iter().any(|s| &s.name == k)) => u,
                Ok(_) => match client.list(self.scrubber).await {
                    Ok(l) => l,
                    Err(f) => return failed(f),
                },
            }
        } else {
            listed
        };
        let digests: BTreeMap<String, String> = after
            .secrets
            .iter()
            .filter(|s| vars.contains_key(&s.name))
            .map(|s| (s.name.clone(), s.digest.clone().unwrap_or_default()))
            .collect();
        if let Some(k) = vars.keys().find(|k| !digests.contains_key(*k)) {
            return Outcome::FlyFailed {
                message: format!(
                    "Fly.io app {app} does not list key {k} after it was set; retried with backoff"
                ),
                reason: fly::api::Problem::Unreachable.reason().to_string(),
                retry_after: None,
                skip: false,
            };
        }
        Outcome::Staged {
            hash: self.content.hash.clone(),
            fly: decide::FlyVisit {
                managed_keys: vars.keys().cloned().collect(),
                fingerprint: fly::api::fingerprint(vars.keys(), &after.secrets),
                digests,
                drifted: v.drifted,
                drift_unnamed: v.drift_unnamed,
                unset: v.unset,
                set: v.set,
            },
        }
    }

    async fn push_fly(&self, app: &str, stage: bool) -> Outcome {
        let (Some(token), Some(stdin)) = (self.fly_tokens.get(app), self.fly_stdin) else {
            return Outcome::Failed {
                message: "no usable token or import text (see the conditions)".into(),
            };
        };
        let s = &self.ctx.settings;
        let mut cmd = tokio::process::Command::new(&s.flyctl);
        cmd.args(["secrets", "import", "--app", app]);
        if stage {
            cmd.arg("--stage");
        }
        cmd.env_clear();
        for k in FLYCTL_PASSTHROUGH {
            if let Some(v) = std::env::var_os(k) {
                cmd.env(k, v);
            }
        }
        for (k, v) in &s.flyctl_env {
            cmd.env(k, v);
        }
        // The token goes in the child's environment only: never argv, never a file.
        cmd.env("FLY_API_TOKEN", token);
        cmd.stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        debug!(bundle = %self.object, app = %app, stage, flyctl = %s.flyctl.display(), "flyctl secrets import");
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                return Outcome::Failed {
                    message: format!("cannot run {}: {e}", s.flyctl.display()),
                };
            }
        };
        let stdin_pipe = child.stdin.take();
        let write = async move {
            if let Some(mut p) = stdin_pipe {
                // A child that exits without reading its input is reported by its exit status.
                let _ = p.write_all(stdin.as_bytes()).await;
                let _ = p.shutdown().await;
            }
        };
        let (_, out) = tokio::join!(
            write,
            tokio::time::timeout(s.flyctl_timeout, child.wait_with_output())
        );
        let out = match out {
            Err(_) => {
                return Outcome::Failed {
                    message: format!(
                        "flyctl secrets import --app {app} did not finish within {:?}",
                        s.flyctl_timeout
                    ),
                };
            }
            Ok(Err(e)) => {
                return Outcome::Failed {
                    message: format!("waiting for flyctl: {e}"),
                };
            }
            Ok(Ok(o)) => o,
        };
        let text = self.scrubber.scrub(&format!(
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
        let excerpt = fly::excerpt(&text, 300);
        match fly::classify(out.status.success(), &text) {
            fly::FlyctlResult::Imported => Outcome::Synced {
                hash: self.content.hash.clone(),
            },
            fly::FlyctlResult::AppMissing => Outcome::Skipped {
                message: format!(
                    "Fly.io app {app} does not exist (or the token cannot see it); skipped until the spec or the content changes or refreshInterval passes: {excerpt}"
                ),
            },
            fly::FlyctlResult::Failed => Outcome::Failed {
                message: format!(
                    "flyctl secrets import --app {app} failed ({}): {excerpt}",
                    out.status
                ),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    struct FakePusher {
        in_flight: AtomicUsize,
        max_seen: AtomicUsize,
        started: AtomicUsize,
    }

    impl Pusher for FakePusher {
        async fn push(&self, t: &PushTarget) -> Outcome {
            self.started.fetch_add(1, Ordering::SeqCst);
            let n = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            self.max_seen.fetch_max(n, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(20)).await;
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            match t {
                PushTarget::Fly { .. } | PushTarget::FlyApi { .. } => Outcome::Failed {
                    message: "x".into(),
                },
                PushTarget::Sandbox { .. } => Outcome::Synced { hash: "h".into() },
            }
        }
    }

    fn targets(n: usize) -> Vec<PushTarget> {
        (0..n)
            .map(|i| PushTarget::Sandbox {
                name: format!("s{i:02}"),
                url: "http://x".into(),
                token: None,
            })
            .chain([PushTarget::Fly {
                app: "app".into(),
                stage: false,
            }])
            .collect()
    }

    #[tokio::test]
    async fn at_most_max_parallel_pushes_run_at_once_and_all_finish() {
        let p = FakePusher {
            in_flight: AtomicUsize::new(0),
            max_seen: AtomicUsize::new(0),
            started: AtomicUsize::new(0),
        };
        let out: Vec<(TargetKey, Outcome)> = execute(&p, targets(20), 5, || false).collect().await;
        assert_eq!(out.len(), 21);
        assert_eq!(p.max_seen.load(Ordering::SeqCst), 5);
        let keys: std::collections::BTreeSet<TargetKey> = out.iter().map(|o| o.0.clone()).collect();
        assert_eq!(keys.len(), 21);
        assert!(
            out.iter()
                .any(|(k, o)| *k == TargetKey::FlyApp("app".into())
                    && matches!(o, Outcome::Failed { .. }))
        );
    }

    #[tokio::test]
    async fn a_stop_starts_no_further_push() {
        let p = FakePusher {
            in_flight: AtomicUsize::new(0),
            max_seen: AtomicUsize::new(0),
            started: AtomicUsize::new(0),
        };
        let stop = AtomicBool::new(false);
        let mut s = std::pin::pin!(execute(&p, targets(20), 3, || stop.load(Ordering::SeqCst)));
        let mut done = 0;
        while let Some(_o) = s.next().await {
            done += 1;
            if done == 4 {
                stop.store(true, Ordering::SeqCst);
            }
        }
        // The three in flight (plus at most one started as the fourth finished) complete; no
        // more start.
        let started = p.started.load(Ordering::SeqCst);
        assert!((4..=7).contains(&started), "{started}");
        assert_eq!(done, started);
    }
}
