//! The Sandbox controller: one EC2 instance per Sandbox, reported truthfully.
//!
//! The reconcile gathers plain data (the instance from the shared EC2 view, the agent's
//! `/health`), hands it to [`decide::decide`], carries out the actions it returns and writes the
//! status only when it changed materially. The finalizer is set before the first EC2 call; the
//! launch is made idempotent by a ClientToken derived from the UID and a look-up by UID tag
//! before launching, so a crash between RunInstances and the status write neither leaks nor
//! duplicates an instance.

pub mod decide;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::Controller;
use kube::runtime::controller::Action as Requeue;
use kube::runtime::events::{Event as KEvent, EventType, Recorder};
use kube::runtime::finalizer::{Event as Fin, finalizer};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, Resource, ResourceExt};
use tracing::{info, warn};

use crate::agent::client::{AgentClient, AgentError, AgentToken, Timeouts};
use crate::api::{
    ACTION_ANNOTATION, ACTION_ID_ANNOTATION, AgentHealth, SANDBOX_FINALIZER,
    START_REQUESTED_ANNOTATION, Sandbox, SandboxPhase, SandboxSpec, SandboxStatus,
};
use crate::controller::sandboxes::{Change, SandboxWatch, changed};
use crate::ec2::{self, Ec2, Ec2Error, InstanceState, LaunchRequest};
use crate::metrics::{Metrics, SandboxLabels};
use decide::{
    Action, ActionRequest, DeleteStep, Inputs, InstanceObs, LaunchHold, LaunchStage, Note,
    ProbeObs, Rejection, Settings, StartWhy,
};

/// The field manager for status writes.
pub const MANAGER: &str = "sandbox-operator";
const CONTROLLER: &str = "sandbox";

/// What can go wrong in one reconcile.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kubernetes API call failed.
    #[error("{what} for Sandbox {object}: {source}")]
    Kube {
        /// What was being done.
        what: &'static str,
        /// namespace/name.
        object: String,
        /// The error.
        source: kube::Error,
    },
    /// An EC2 call failed (transient ones requeue with backoff).
    #[error("{what} for Sandbox {object}: {source}")]
    Ec2 {
        /// What was being done.
        what: &'static str,
        /// namespace/name.
        object: String,
        /// The error.
        source: Ec2Error,
    },
    /// The finalizer helper failed.
    #[error("finalizer for Sandbox {object}: {message}")]
    Finalizer {
        /// namespace/name.
        object: String,
        /// What went wrong.
        message: String,
    },
    /// Not an error: cleanup waits for EC2 (an Err keeps the finalizer in place).
    #[error("Sandbox {object}: {message}")]
    Waiting {
        /// namespace/name.
        object: String,
        /// What it waits for.
        message: String,
    },
    /// The Sandbox has no namespace or UID (never true of a stored object).
    #[error("Sandbox {0} lacks a namespace or UID")]
    Malformed(String),
    /// Not an error: the launch is held back for its user data (reported in status).
    #[error("Sandbox {object}: {}", hold.message())]
    LaunchHeld {
        /// namespace/name.
        object: String,
        /// Why.
        hold: LaunchHold,
    },
}

impl Error {
    fn kind(&self) -> &'static str {
        match self {
            Error::Kube { .. } => "kube",
            // The operator's own pacing and AWS's throttling are counted apart.
            Error::Ec2 {
                source: Ec2Error::Paced { .. },
                ..
            } => "ec2_paced",
            Error::Ec2 {
                source: Ec2Error::Throttled { .. },
                ..
            } => "ec2_throttled",
            Error::Ec2 { source, .. } if source.is_transient() => "ec2_transient",
            Error::Ec2 { .. } => "ec2",
            Error::Finalizer { .. } => "finalizer",
            Error::Waiting { .. } => "waiting",
            Error::Malformed(_) => "malformed",
            Error::LaunchHeld { .. } => "launch_held",
        }
    }
}

/// Operator-wide settings for the Sandbox controller.
#[derive(Clone, Debug)]
pub struct ControllerSettings {
    /// Decision timings.
    pub decide: Settings,
    /// Terminate tagged instances whose Sandbox has been gone this long (None: only report).
    pub orphan_grace: Option<Duration>,
    /// How often to look for orphans.
    pub orphan_sweep_interval: Duration,
    /// The name events are reported under.
    pub reporter: String,
}

impl Default for ControllerSettings {
    fn default() -> Self {
        Self {
            decide: Settings::default(),
            orphan_grace: Some(Duration::from_secs(600)),
            orphan_sweep_interval: Duration::from_secs(120),
            reporter: "sandbox-operator".into(),
        }
    }
}

/// Shared state of the controller.
pub struct Context {
    client: Client,
    ec2: Ec2,
    recorder: Recorder,
    settings: ControllerSettings,
    metrics: Arc<Metrics>,
    http: reqwest::Client,
    /// When each sandbox (by UID) was last probed: kept here, not in status, so probes cause
    /// no writes.
    last_probe: Mutex<HashMap<String, Instant>>,
    /// EC2 refusals of a launch, by UID, with the generation they answered.
    rejections: Mutex<HashMap<String, (Option<i64>, Rejection)>>,
    /// Which Sandbox an instance belongs to, for mapping EC2 changes back.
    owners: Mutex<HashMap<String, ObjectRef<Sandbox>>>,
    /// The status last written per UID, with the resourceVersion the write produced: a
    /// reconcile that starts before the watch delivers that write uses it instead of the stale
    /// copy in the cache.
    written: super::WrittenStatus<SandboxStatus>,
    /// The fleet ledger, when one is configured: EC2 actions, instance states, image deploy
    /// steps and the `sandboxes` table. Recording never waits for the database.
    ledger: Option<crate::ledger::LedgerHandle>,
}

impl Context {
    /// Creates the controller's context, with an event recorder of its own.
    pub fn new(
        client: Client,
        ec2: Ec2,
        metrics: Arc<Metrics>,
        settings: ControllerSettings,
        ledger: Option<crate::ledger::LedgerHandle>,
    ) -> Arc<Self> {
        let recorder = super::recorder(client.clone(), &settings.reporter);
        Self::with_recorder(client, ec2, metrics, settings, ledger, recorder)
    }

    /// Creates the controller's context, publishing Events through `recorder` (the process's
    /// one recorder).
    pub fn with_recorder(
        client: Client,
        ec2: Ec2,
        metrics: Arc<Metrics>,
        settings: ControllerSettings,
        ledger: Option<crate::ledger::LedgerHandle>,
        recorder: Recorder,
    ) -> Arc<Self> {
        Arc::new(Self {
            recorder,
            client,
            ec2,
            settings,
            metrics,
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(2)
                .build()
                .expect("building the agent HTTP client"),
            last_probe: Mutex::default(),
            rejections: Mutex::default(),
            owners: Mutex::default(),
            written: Default::default(),
            ledger,
        })
    }

    async fn publish(&self, obj: &Sandbox, note: &Note) {
        let ev = KEvent {
            type_: if note.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: note.reason.into(),
            note: Some(note.message.clone()),
            action: note.reason.into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &obj.object_ref(&())).await {
            warn!(sandbox = %key(obj), error = %e, "publishing an event failed");
        }
    }
}

fn key(obj: &Sandbox) -> String {
    format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any())
}

/// Runs the Sandbox controller until `shutdown` resolves. Sandboxes in every namespace the
/// client may list (or one namespace when `namespace` is set), from a watch of its own (the
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

/// The Sandbox controller on the process's shared Sandbox watch (subscribed now, before the
/// watch starts), with at most `concurrency` reconciles at once. The orphan sweep and the
/// phase gauges read the same store.
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
    let reader = sandboxes.store();
    // Status-only updates do not wake the controller; spec, annotations (the start request)
    // and finalizer changes do.
    let stream = changed(sandboxes.changes(), spec_annotations_finalizers).filter_map(|c| {
        futures::future::ready(match c {
            Change::Applied(s) => Some(s),
            Change::Deleted(_) => None,
        })
    });
    let changes = {
        let ctx = ctx.clone();
        ctx.ec2.changes().filter_map(move |id| {
            let owner = ctx.owners.lock().expect("owners").get(&id).cloned();
            async move { owner }
        })
    };
    tokio::spawn(orphan_sweep(ctx.clone(), namespace, reader.clone()));
    tokio::spawn(phase_gauges(ctx.clone(), reader.clone()));
    Controller::for_shared_stream(stream, reader)
        .with_config(crate::controller::runtime_config(concurrency))
        .trigger_backoff(crate::controller::watch::trigger_backoff())
        .reconcile_on(changes)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|_| futures::future::ready(()))
}

/// What wakes the controller: the generation (spec and deletion), the annotations (the start
/// request) and the finalizers; status-only writes do not.
fn spec_annotations_finalizers(s: &Sandbox) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    s.metadata.generation.hash(&mut h);
    s.metadata.annotations.hash(&mut h);
    s.metadata.finalizers.hash(&mut h);
    s.metadata
        .deletion_timestamp
        .as_ref()
        .map(|t| t.0.as_second())
        .hash(&mut h);
    h.finish()
}

/// The reconcile entry point: the finalizer helper, then apply or clean up.
pub async fn reconcile(obj: Arc<Sandbox>, ctx: Arc<Context>) -> Result<Requeue, Error> {
    ctx.metrics.reconciled(CONTROLLER);
    let ns = obj
        .namespace()
        .ok_or_else(|| Error::Malformed(obj.name_any()))?;
    let api: Api<Sandbox> = Api::namespaced(ctx.client.clone(), &ns);
    let object = key(&obj);
    let result = finalizer(&api, SANDBOX_FINALIZER, obj, |event| async {
        match event {
            Fin::Apply(s) => apply(s, ctx.clone()).await,
            Fin::Cleanup(s) => cleanup(s, ctx.clone()).await,
        }
    })
    .await;
    let e = match result {
        Ok(requeue) => return Ok(requeue),
        Err(e) => e,
    };
    match e {
        // The cleanup succeeded and the object is gone already: a reconcile that started from
        // a cached copy (an EC2 change or a requeue queued while the finalizer was being
        // removed) found nothing left to remove the finalizer from. What it wanted is done.
        kube::runtime::finalizer::Error::RemoveFinalizer(kube::Error::Api(status))
            if status.is_not_found() =>
        {
            tracing::debug!(sandbox = %object, "the Sandbox is gone already; nothing to finalize");
            Ok(Requeue::await_change())
        }
        kube::runtime::finalizer::Error::ApplyFailed(e)
        | kube::runtime::finalizer::Error::CleanupFailed(e) => Err(e),
        other => Err(Error::Finalizer {
            object,
            message: other.to_string(),
        }),
    }
}

/// Requeues after an error: transient EC2 trouble (throttling) soon and with jitter, the rest
/// a little later. The object is never marked failed for a transient error.
pub fn error_policy(obj: Arc<Sandbox>, err: &Error, ctx: Arc<Context>) -> Requeue {
    if let Error::Waiting { .. } = err {
        return Requeue::requeue(ctx.settings.decide.poll);
    }
    ctx.metrics.reconcile_failed(CONTROLLER, err.kind());
    crate::controller::refused::error(CONTROLLER, "reconciling", err);
    let jitter = Duration::from_millis(u64::from(
        obj.uid()
            .map(|u| u.bytes().map(u32::from).sum::<u32>())
            .unwrap_or(0)
            % 1000,
    ));
    if let Error::Ec2 {
        source: Ec2Error::Paced { wait, .. },
        ..
    } = err
    {
        // The operator's own pacing held the call back: nothing failed and AWS throttled
        // nothing.
        info!(sandbox = %key(&obj), error = %err, "waiting for the operator's client-side EC2 pacing");
        return Requeue::requeue(
            (*wait).clamp(Duration::from_secs(1), Duration::from_secs(60)) + jitter,
        );
    }
    warn!(sandbox = %key(&obj), error = %err, "reconcile failed; will retry");
    match err {
        // A capacity shortage does not pass in seconds.
        Error::Ec2 {
            source: Ec2Error::Rejected { .. },
            ..
        } => Requeue::requeue(Duration::from_secs(30) + jitter),
        Error::Ec2 { source, .. } if source.is_transient() => {
            Requeue::requeue(Duration::from_secs(3) + jitter)
        }
        _ => Requeue::requeue(Duration::from_secs(10) + jitter),
    }
}

/// A launch whose turn in the client-side pacing is this close goes ahead (sleeping until the
/// turn); one further off requeues for it, saying so in its status.
const LAUNCH_HOLD: Duration = Duration::from_secs(2);

/// Up to 5 s, fixed per UID: spreads the requeues of Sandboxes refused together.
fn spread(uid: &str) -> Duration {
    Duration::from_millis(u64::from(uid.bytes().map(u32::from).sum::<u32>()) * 37 % 5000)
}

/// The launch stage for a RunInstances that did not go through for a passing reason. The
/// message stays the same from one attempt to the next (no request ids), so retries cause no
/// status writes.
fn retrying(e: &Ec2Error) -> LaunchStage {
    let (reason, message) = match e {
        Ec2Error::Throttled { .. } => (
            "LaunchThrottled",
            "AWS throttled RunInstances (RequestLimitExceeded: the account's request rate limit) after the operator's retries; trying again shortly".to_string(),
        ),
        Ec2Error::Rejected { code, .. } => (
            "InsufficientCapacity",
            format!("EC2 cannot launch this instance right now ({code}); trying again shortly"),
        ),
        _ => (
            "LaunchRetrying",
            format!(
                "RunInstances did not go through ({}); trying again shortly",
                e.reason()
            ),
        ),
    };
    LaunchStage::Retrying { reason, message }
}

/// Writes the status of a Sandbox whose instance is not known yet, before the calls that may
/// wait: the first reconcile's status, and where the launch stands.
struct Early<'a> {
    ctx: &'a Context,
    api: &'a Api<Sandbox>,
    obj: &'a Sandbox,
    uid: &'a str,
}

impl Early<'_> {
    async fn write(&self, status: &mut SandboxStatus, stage: LaunchStage) -> Result<(), Error> {
        let obj = self.obj;
        let d = decide::decide(&Inputs {
            spec: &obj.spec,
            generation: obj.metadata.generation,
            start_request: None,
            deploy_attempt: None,
            action: None,
            status,
            instance: &InstanceObs::NoInstance,
            probe: &ProbeObs::NotProbed,
            agent_url: None,
            launch_rejection: None,
            launch_hold: None,
            launch: stage,
            now: Timestamp::now(),
            settings: &self.ctx.settings.decide,
        });
        if decide::material_change(status, &d.status) {
            let rv = write_status(self.api, obj, &d.status, self.ctx).await?;
            self.ctx
                .written
                .remember(self.uid, rv.as_deref(), d.status.clone());
        }
        *status = d.status;
        Ok(())
    }
}

fn client_token(uid: &str) -> String {
    // ClientToken allows 64 ASCII characters; a UID is 36.
    format!("sandbox-{uid}")
}

async fn apply(obj: Arc<Sandbox>, ctx: Arc<Context>) -> Result<Requeue, Error> {
    let object = key(&obj);
    let ns = obj.namespace().unwrap_or_default();
    let uid = obj.uid().ok_or_else(|| Error::Malformed(object.clone()))?;
    let api: Api<Sandbox> = Api::namespaced(ctx.client.clone(), &ns);
    let mut status = fresh_status(&obj, &ctx, &uid);
    let spec = &obj.spec;
    let generation = obj.metadata.generation;
    let settings = &ctx.settings.decide;

    // ---- A day-2 action without a request id gets one first, so it is done once. ----
    let annotations = obj.annotations();
    let action = annotations
        .get(ACTION_ANNOTATION)
        .map(|v| v.trim())
        .filter(|v| !v.is_empty());
    let action_id = annotations
        .get(ACTION_ID_ANNOTATION)
        .map(|v| v.trim())
        .filter(|v| !v.is_empty());
    if let (Some(name), None) = (action, action_id) {
        let id = Timestamp::now().to_string();
        assign_action_id(&api, &obj, name, &id).await?;
        return Ok(Requeue::requeue(Duration::from_millis(50)));
    }
    let request = match (action, action_id) {
        (Some(name), Some(id)) => Some(ActionRequest { name, id }),
        _ => None,
    };

    let in_flight = status
        .instance
        .as_ref()
        .and_then(|i| i.state)
        .is_some_and(InstanceState::is_transitional)
        || status
            .deploy
            .as_ref()
            .is_some_and(|d| decide::deploy_state::in_progress(&d.state));
    let max_age = if in_flight {
        settings.poll
    } else {
        ctx.settings.decide.resync.min(Duration::from_secs(30))
    };

    // Forget a launch refusal once the spec changed.
    let rejection = {
        let mut r = ctx.rejections.lock().expect("rejections");
        match r.get(&uid) {
            Some((g, _)) if *g != generation => {
                r.remove(&uid);
                None
            }
            Some((_, rej)) => Some(rej.clone()),
            None => None,
        }
    };

    // ---- Status first: a new Sandbox shows a phase, Ready=False with a reason and its
    // observedGeneration before any call that may wait (batching, pacing, throttling). ----
    let first = status.instance.is_none()
        && (status.phase.is_none()
            || crate::api::conditions::get(&status.conditions, decide::cond::READY).is_none());
    let early = Early {
        ctx: &ctx,
        api: &api,
        obj: &obj,
        uid: &uid,
    };

    // ---- Which instance? ----
    // A spec the validate step refuses is reported, never acted on (no launch, no probe).
    let valid = decide::validate(spec).ok();
    let mut launch_hold = None;
    let mut launched_now = false;
    let instance_id = match (
        &spec.instance_id,
        status.instance.as_ref().map(|i| i.id.clone()),
    ) {
        (Some(id), _) => {
            if first {
                early.write(&mut status, LaunchStage::Launching).await?;
            }
            Some(id.clone())
        }
        (None, Some(id)) => Some(id),
        (None, None) if rejection.is_some() || valid.is_none() => None,
        (None, None) => {
            // Take this launch's turn in the client-side pacing of RunInstances (at once,
            // without waiting), then say where it stands before anything else.
            let run = ctx.ec2.rate_limits().run;
            let paced = |turn_at| LaunchStage::Paced {
                turn_at,
                burst: run.capacity,
                per_second: run.refill_per_second,
            };
            match ctx.ec2.launch_turn(&client_token(&uid)) {
                Ok(turn) if turn.wait > LAUNCH_HOLD => {
                    early.write(&mut status, paced(Some(turn.at))).await?;
                    return Ok(Requeue::requeue(turn.wait));
                }
                Ok(_) => {
                    if first {
                        early.write(&mut status, LaunchStage::Pending).await?;
                    }
                }
                Err(Ec2Error::Paced { wait, .. }) => {
                    early.write(&mut status, paced(None)).await?;
                    return Ok(Requeue::requeue(wait + spread(&uid)));
                }
                Err(source) => {
                    return Err(Error::Ec2 {
                        what: "taking a turn to launch",
                        object,
                        source,
                    });
                }
            }
            // Before launching, look for an instance this Sandbox launched already (a crash
            // between RunInstances and the status write).
            let found = ctx
                .ec2
                .find_by_uid(&uid)
                .await
                .map_err(|source| Error::Ec2 {
                    what: "looking up the instance by UID tag",
                    object: object.clone(),
                    source,
                })?;
            match found {
                Some(inst) => {
                    info!(sandbox = %object, instance = %inst.id, "found the instance launched earlier by UID tag");
                    Some(inst.id)
                }
                None => match launch(&obj, &uid, &ctx).await {
                    Ok(id) => {
                        ledger_ec2(&ctx, &obj, "RunInstances", Some(&id), Ok(()));
                        launched_now = true;
                        Some(id)
                    }
                    Err(Error::Ec2 {
                        source: source @ Ec2Error::Rejected { .. },
                        ..
                    }) if !source.is_transient() => {
                        let Ec2Error::Rejected { code, message, .. } = source else {
                            unreachable!("matched Rejected")
                        };
                        let rej = Rejection {
                            code: code.clone(),
                            message: message.clone(),
                        };
                        ctx.publish(
                            &obj,
                            &Note {
                                warning: true,
                                reason: "LaunchFailed",
                                message: format!("EC2 refused RunInstances: {code}: {message}"),
                            },
                        )
                        .await;
                        ctx.rejections
                            .lock()
                            .expect("rejections")
                            .insert(uid.clone(), (generation, rej));
                        None
                    }
                    Err(Error::LaunchHeld { hold, .. }) => {
                        launch_hold = Some(hold);
                        None
                    }
                    Err(Error::Ec2 {
                        source: Ec2Error::Paced { wait, .. },
                        ..
                    }) => {
                        // The turn lapsed and the bucket is busy: back in line.
                        let run = ctx.ec2.rate_limits().run;
                        let stage = LaunchStage::Paced {
                            turn_at: None,
                            burst: run.capacity,
                            per_second: run.refill_per_second,
                        };
                        early.write(&mut status, stage).await?;
                        return Ok(Requeue::requeue(
                            wait.min(Duration::from_secs(60)) + spread(&uid),
                        ));
                    }
                    Err(Error::Ec2 {
                        what,
                        object,
                        source,
                    }) if source.is_transient() => {
                        // Say so, then requeue with backoff (error_policy).
                        early.write(&mut status, retrying(&source)).await?;
                        return Err(Error::Ec2 {
                            what,
                            object,
                            source,
                        });
                    }
                    Err(e) => return Err(e),
                },
            }
        }
    };
    let rejection = ctx
        .rejections
        .lock()
        .expect("rejections")
        .get(&uid)
        .map(|(_, r)| r.clone());

    let observed = match &instance_id {
        None => InstanceObs::NoInstance,
        Some(id) => {
            ctx.owners
                .lock()
                .expect("owners")
                .insert(id.clone(), ObjectRef::from_obj(&*obj));
            let age = if launched_now {
                Duration::ZERO
            } else {
                max_age
            };
            match ctx
                .ec2
                .describe(id, age)
                .await
                .map_err(|source| Error::Ec2 {
                    what: "describing the instance",
                    object: object.clone(),
                    source,
                })? {
                Some(i) => InstanceObs::Found(i),
                None => InstanceObs::Missing { id: id.clone() },
            }
        }
    };

    // ---- The agent, when the instance runs and a probe is due. ----
    let mut agent_url = None;
    let mut probe = ProbeObs::NotProbed;
    let mut agent_client = None;
    if let InstanceObs::Found(inst) = &observed
        && inst.state == InstanceState::Running
        && let Some(valid) = &valid
    {
        agent_url = decide::agent_url(spec, inst);
        let interval = valid.probe_interval;
        let due = {
            let lp = ctx.last_probe.lock().expect("last_probe");
            lp.get(&uid)
                .is_none_or(|t| t.elapsed() + Duration::from_millis(250) >= interval)
                || in_flight
                // A day-2 request (probe now, restart, drain, terminate) wants a fresh answer.
                || decide::action_wants_probe(&status, request)
        };
        if due {
            match agent_client_for(&obj, agent_url.as_deref(), valid.probe_timeout, &ctx).await {
                Ok(c) => {
                    probe = match c.health().await {
                        Ok(r) => ProbeObs::Report(Box::new(r)),
                        Err(AgentError::Unauthorized { .. }) => ProbeObs::Misconfigured {
                            reason: "Unauthorized".into(),
                            message:
                                "the agent refused the token (401): check spec.agent.tokenSecretRef"
                                    .into(),
                        },
                        Err(e) => ProbeObs::Failed(e.to_string()),
                    };
                    agent_client = Some(c);
                }
                Err(p) => probe = p,
            }
            ctx.last_probe
                .lock()
                .expect("last_probe")
                .insert(uid.clone(), Instant::now());
            record_probe(&ctx, &obj, &probe);
        }
    }

    let start_request = obj
        .annotations()
        .get(START_REQUESTED_ANNOTATION)
        .map(String::as_str);
    let deploy_attempt = obj
        .annotations()
        .get(crate::api::DEPLOY_ATTEMPT_ANNOTATION)
        .map(String::as_str);
    let inputs = Inputs {
        spec,
        generation,
        start_request,
        deploy_attempt,
        action: request,
        status: &status,
        instance: &observed,
        probe: &probe,
        agent_url: agent_url.as_deref(),
        launch_rejection: rejection.as_ref(),
        launch_hold: launch_hold.as_ref(),
        launch: LaunchStage::Launching,
        now: Timestamp::now(),
        settings,
    };
    let mut decision = decide::decide(&inputs);
    if launched_now {
        decision.notes.insert(
            0,
            Note {
                warning: false,
                reason: "Launched",
                message: format!(
                    "launched instance {}",
                    instance_id.clone().unwrap_or_default()
                ),
            },
        );
        if let Some(i) = decision.status.instance.as_mut() {
            i.launched_by_operator = true;
        }
    }

    // ---- Carry out the actions. ----
    let mut ec2_error = None;
    for action in &decision.actions {
        match action {
            Action::Start { id, why } => match ctx
                .ec2
                .start(id)
                .await
                .inspect(|()| ledger_ec2(&ctx, &obj, "StartInstances", Some(id), Ok(())))
                .inspect_err(|e| ledger_ec2(&ctx, &obj, "StartInstances", Some(id), Err(e)))
            {
                Ok(()) => {
                    let (reason, message) = match why {
                        StartWhy::Requested => (
                            "Starting",
                            format!("starting instance {id}: the spec says Running"),
                        ),
                        StartWhy::Woken => (
                            "Waking",
                            format!("starting instance {id}: a newer {START_REQUESTED_ANNOTATION}"),
                        ),
                        StartWhy::RestartAfterExternalStop => (
                            "RestartingAfterExternalStop",
                            format!(
                                "instance {id} was stopped outside the operator; starting it again because the spec says Running"
                            ),
                        ),
                    };
                    decision.notes.push(Note {
                        warning: *why == StartWhy::RestartAfterExternalStop,
                        reason,
                        message,
                    });
                }
                Err(e) => ec2_error = Some(("starting the instance", e)),
            },
            Action::Stop { id, reason } => match ctx
                .ec2
                .stop(id)
                .await
                .inspect(|()| ledger_ec2(&ctx, &obj, "StopInstances", Some(id), Ok(())))
                .inspect_err(|e| ledger_ec2(&ctx, &obj, "StopInstances", Some(id), Err(e)))
            {
                Ok(()) => decision.notes.push(Note {
                    warning: false,
                    reason: "Stopping",
                    message: format!("stopping instance {id} ({reason})"),
                }),
                Err(e) => ec2_error = Some(("stopping the instance", e)),
            },
            Action::RestartService { service } => {
                let (ok, message) = match &agent_client {
                    Some(c) => match c.restart(service).await {
                        Ok(r) if r.success => (
                            true,
                            format!("the agent restarted {service}: {}", r.message),
                        ),
                        Ok(r) => (
                            false,
                            format!("the agent could not restart {service}: {}", r.message),
                        ),
                        Err(e) => (false, format!("restarting {service}: {e}")),
                    },
                    None => (
                        false,
                        "the agent could not be reached this time: ask again".into(),
                    ),
                };
                if let Some(n) = decide::finish_action(
                    &mut decision.status,
                    ok,
                    "AgentRefused",
                    message,
                    Timestamp::now(),
                ) {
                    decision.notes.push(n);
                }
            }
            Action::DrainNow => {
                let (ok, message) = match &agent_client {
                    Some(c) => match c
                        .drain_with(&crate::agent::protocol::DrainRequest {
                            wait: Some(false),
                            timeout_seconds: None,
                        })
                        .await
                    {
                        Ok(r) => (
                            true,
                            format!(
                                "the worker was asked to drain and takes no new work ({} active workers, deploy-safe: {})",
                                r.active_workers
                                    .map(|n| n.to_string())
                                    .unwrap_or_else(|| "unknown".into()),
                                r.deploy_safe
                            ),
                        ),
                        Err(e) => (false, format!("asking the agent to drain: {e}")),
                    },
                    None => (
                        false,
                        "the agent could not be reached this time: ask again".into(),
                    ),
                };
                if let Some(n) = decide::finish_action(
                    &mut decision.status,
                    ok,
                    "AgentRefused",
                    message,
                    Timestamp::now(),
                ) {
                    decision.notes.push(n);
                }
            }
            Action::TerminateInstance { id } => match ctx
                .ec2
                .terminate(id)
                .await
                .inspect(|()| ledger_ec2(&ctx, &obj, "TerminateInstances", Some(id), Ok(())))
                .inspect_err(|e| ledger_ec2(&ctx, &obj, "TerminateInstances", Some(id), Err(e)))
            {
                Ok(()) => decision.notes.push(Note {
                    warning: false,
                    reason: "Terminating",
                    message: format!("terminating instance {id}, as a terminate request asked"),
                }),
                Err(e) => {
                    if let Some(n) = decide::finish_action(
                        &mut decision.status,
                        false,
                        "TerminateFailed",
                        format!("EC2 did not terminate instance {id}: {e}"),
                        Timestamp::now(),
                    ) {
                        decision.notes.push(n);
                    }
                }
            },
            Action::Drain => {
                if let Some(c) = &agent_client
                    && let Err(e) = c
                        .drain_with(&crate::agent::protocol::DrainRequest {
                            wait: Some(false),
                            timeout_seconds: None,
                        })
                        .await
                {
                    warn!(sandbox = %object, error = %e, "asking the agent to drain failed; waiting for active workers anyway");
                }
            }
            Action::Deploy { tag } => {
                let result = match &agent_client {
                    // The old health server answers 200 with `success: false` when it refuses.
                    Some(c) => c.deploy(tag).await.and_then(|a| {
                        if a.success {
                            Ok(a.deploy_id)
                        } else {
                            Err(AgentError::Rejected {
                                url: c.base_url().to_string(),
                                op: "deploy",
                                status: 200,
                                message: a.message,
                            })
                        }
                    }),
                    None => Err(AgentError::Transport {
                        url: String::new(),
                        op: "deploy",
                        message: "no agent client".into(),
                    }),
                };
                match result {
                    Ok(id) => {
                        if let Some(d) = decision.status.deploy.as_mut() {
                            d.id = id;
                        }
                        decision.notes.push(Note {
                            warning: false,
                            reason: "Deploying",
                            message: format!("asked the agent to deploy {tag}"),
                        });
                    }
                    Err(e) if e.running_deploy_id().is_some() => {
                        if let Some(d) = decision.status.deploy.as_mut() {
                            d.message = Some(format!(
                                "the agent is busy with deploy {}",
                                e.running_deploy_id().unwrap_or_default()
                            ));
                            d.state = decide::deploy_state::DRAINING;
                        }
                    }
                    Err(e) => {
                        if let Some(d) = decision.status.deploy.as_mut() {
                            d.state = decide::deploy_state::DRAINING;
                            d.message = Some(format!(
                                "asking the agent to deploy failed, will retry: {e}"
                            ));
                        }
                    }
                }
            }
        }
    }

    // ---- Record. ----
    for note in &decision.notes {
        ctx.publish(&obj, note).await;
    }
    ledger_status(&ctx, &obj, &status, &decision.status);
    if let Some(ledger) = &ctx.ledger {
        let mut row_obj = (*obj).clone();
        row_obj.status = Some(decision.status.clone());
        // Unchanged rows are not written again (the writer keeps the latest per Sandbox).
        ledger.upsert_sandbox(crate::ledger::SandboxRow::from_sandbox(&row_obj));
    }
    if launched_now || decide::material_change(&status, &decision.status) {
        let rv = write_status(&api, &obj, &decision.status, &ctx).await?;
        ctx.written
            .remember(&uid, rv.as_deref(), decision.status.clone());
    }
    update_gauges(&ctx, &obj, &decision.status);
    // ---- The day-2 request, once its result is in status. ----
    if let Some(req) = request
        && decide::request_done(&decision.status, req)
    {
        clear_action(&api, &obj, req).await?;
    }
    if let Some((what, source)) = ec2_error {
        return Err(Error::Ec2 {
            what,
            object,
            source,
        });
    }
    if rejection.is_some() && instance_id.is_none() {
        // Refused by EC2: wait for the spec to change instead of retrying in a storm.
        return Ok(Requeue::await_change());
    }
    Ok(Requeue::requeue(decision.requeue))
}

/// `/metadata/annotations/<key>` as a JSON Pointer.
fn annotation_path(key: &str) -> String {
    format!(
        "/metadata/annotations/{}",
        key.replace('~', "~0").replace('/', "~1")
    )
}

/// Adds a request id to a day-2 action asked without one, provided the action is still the one
/// read (a JSON Patch `test`), so a request is done once.
async fn assign_action_id(
    api: &Api<Sandbox>,
    obj: &Sandbox,
    name: &str,
    id: &str,
) -> Result<(), Error> {
    let ops = serde_json::json!([
        {"op": "test", "path": annotation_path(ACTION_ANNOTATION), "value": obj.annotations().get(ACTION_ANNOTATION)},
        {"op": "add", "path": annotation_path(ACTION_ID_ANNOTATION), "value": id},
    ]);
    patch_annotations(api, obj, ops, "adding a request id to the day-2 action").await?;
    info!(sandbox = %key(obj), action = name, id, "day-2 action: request id assigned");
    Ok(())
}

/// Removes a day-2 request whose result is in status, provided the annotations still hold that
/// very request (a newer one written meanwhile stays).
async fn clear_action(
    api: &Api<Sandbox>,
    obj: &Sandbox,
    req: ActionRequest<'_>,
) -> Result<(), Error> {
    let a = obj.annotations();
    let ops = serde_json::json!([
        {"op": "test", "path": annotation_path(ACTION_ANNOTATION), "value": a.get(ACTION_ANNOTATION)},
        {"op": "test", "path": annotation_path(ACTION_ID_ANNOTATION), "value": a.get(ACTION_ID_ANNOTATION)},
        {"op": "remove", "path": annotation_path(ACTION_ANNOTATION)},
        {"op": "remove", "path": annotation_path(ACTION_ID_ANNOTATION)},
    ]);
    patch_annotations(api, obj, ops, "removing the handled day-2 action").await?;
    tracing::debug!(sandbox = %key(obj), action = req.name, id = req.id, "day-2 action: request removed");
    Ok(())
}

async fn patch_annotations(
    api: &Api<Sandbox>,
    obj: &Sandbox,
    ops: serde_json::Value,
    what: &'static str,
) -> Result<(), Error> {
    let patch: json_patch::Patch = serde_json::from_value(ops).expect("a JSON Patch");
    match api
        .patch(
            &obj.name_any(),
            &PatchParams::default(),
            &Patch::Json::<()>(patch),
        )
        .await
    {
        Ok(_) => Ok(()),
        // The annotations changed meanwhile (a `test` failed: 422), or the object is gone: the
        // next reconcile sees the new state.
        Err(kube::Error::Api(s)) if s.code == 422 || s.code == 409 || s.is_not_found() => Ok(()),
        Err(source) => Err(Error::Kube {
            what,
            object: key(obj),
            source,
        }),
    }
}

async fn launch(obj: &Sandbox, uid: &str, ctx: &Context) -> Result<String, Error> {
    let object = key(obj);
    let spec: &SandboxSpec = &obj.spec;
    let l = spec
        .launch
        .as_ref()
        .expect("launch is set when instanceId is not (CEL rule)");
    let ns = obj.namespace().unwrap_or_default();
    let user_data = match &l.user_data_secret_ref {
        Some(r) => {
            // Never launched without the user data the spec names: a missing Secret or key
            // holds the launch (Ready=False with a reason naming both) until it appears.
            let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
            let secret = format!("{ns}/{}", r.name);
            let held = |hold| Error::LaunchHeld {
                object: object.clone(),
                hold,
            };
            let s = secrets
                .get_opt(&r.name)
                .await
                .map_err(|source| Error::Kube {
                    what: "reading the user-data Secret",
                    object: object.clone(),
                    source,
                })?;
            let Some(s) = s else {
                return Err(held(LaunchHold::UserDataSecretMissing {
                    secret,
                    key: r.key.clone(),
                }));
            };
            let Some(value) = s.data.and_then(|mut d| d.remove(&r.key)) else {
                return Err(held(LaunchHold::UserDataKeyMissing {
                    secret,
                    key: r.key.clone(),
                }));
            };
            if value.0.len() > decide::MAX_USER_DATA_BYTES {
                return Err(held(LaunchHold::UserDataTooLarge {
                    secret,
                    key: r.key.clone(),
                    bytes: value.0.len(),
                }));
            }
            use base64::Engine as _;
            Some(base64::engine::general_purpose::STANDARD.encode(value.0))
        }
        None => None,
    };
    let mut tags: BTreeMap<String, String> = l.tags.clone();
    tags.insert(ec2::TAG_MANAGED_BY.into(), "sandbox-operator".into());
    tags.insert(ec2::TAG_UID.into(), uid.into());
    tags.insert(ec2::TAG_NAMESPACE.into(), ns.clone());
    tags.insert(ec2::TAG_NAME.into(), obj.name_any());
    tags.insert(ec2::TAG_ENVIRONMENT.into(), spec.environment.to_string());
    tags.entry("Name".into())
        .or_insert_with(|| format!("{ns}/{}", obj.name_any()));
    let req = LaunchRequest {
        client_token: client_token(uid),
        image_id: l.image_id.clone(),
        instance_type: spec.instance_type.clone().unwrap_or_default(),
        subnet_id: l.subnet_id.clone(),
        security_group_ids: l.security_group_ids.clone(),
        key_name: l.key_name.clone(),
        iam_instance_profile: l.iam_instance_profile.clone(),
        root_volume_size_gib: l.root_volume_size_gib,
        spot: l.market == crate::api::Market::Spot,
        user_data_base64: user_data,
        tags,
    };
    let inst = ctx.ec2.launch(&req).await.map_err(|source| Error::Ec2 {
        what: "launching the instance",
        object: object.clone(),
        source,
    })?;
    info!(sandbox = %object, instance = %inst.id, "launched");
    Ok(inst.id)
}

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
    let token = match &obj.spec.agent.token_secret_ref {
        None => None,
        Some(r) => {
            let ns = obj.namespace().unwrap_or_default();
            let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
            match secrets.get_opt(&r.name).await {
                Ok(Some(s)) => match s.data.as_ref().and_then(|d| d.get(&r.key)) {
                    Some(v) => Some(AgentToken::new(
                        String::from_utf8_lossy(&v.0).trim().to_string(),
                    )),
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

fn record_probe(ctx: &Context, _obj: &Sandbox, probe: &ProbeObs) {
    let result = match probe {
        ProbeObs::NotProbed => return,
        ProbeObs::Report(r) => match decide::judge_report(r).0 {
            AgentHealth::Healthy => "healthy",
            AgentHealth::Degraded => "degraded",
            _ => "unhealthy",
        },
        ProbeObs::Failed(_) => "failed",
        ProbeObs::Misconfigured { .. } => "misconfigured",
    };
    ctx.metrics
        .probes
        .get_or_create(&crate::metrics::ProbeLabels {
            result: result.into(),
        })
        .inc();
}

fn update_gauges(ctx: &Context, obj: &Sandbox, st: &SandboxStatus) {
    let labels = SandboxLabels {
        namespace: obj.namespace().unwrap_or_default(),
        name: obj.name_any(),
    };
    match st.agent.as_ref().filter(|a| a.cpu_percent.is_some()) {
        Some(a) => {
            ctx.metrics
                .sandbox_cpu
                .get_or_create(&labels)
                .set(f64::from(a.cpu_percent.unwrap_or(0)));
            ctx.metrics
                .sandbox_memory
                .get_or_create(&labels)
                .set(f64::from(a.memory_percent.unwrap_or(0)));
            ctx.metrics
                .sandbox_disk
                .get_or_create(&labels)
                .set(f64::from(a.disk_percent.unwrap_or(0)));
            ctx.metrics
                .sandbox_active_workers
                .get_or_create(&labels)
                .set(i64::from(a.active_workers.unwrap_or(0)));
        }
        None => ctx.metrics.forget_sandbox(&labels.namespace, &labels.name),
    }
}

/// Writes the status (server-side apply, so fields this controller no longer sets are removed)
/// and returns the resourceVersion the write produced.
async fn write_status(
    api: &Api<Sandbox>,
    obj: &Sandbox,
    st: &SandboxStatus,
    ctx: &Context,
) -> Result<Option<String>, Error> {
    let patch = serde_json::json!({ "apiVersion": "fleet.valet.dev/v1alpha1", "kind": "Sandbox", "status": st });
    let out = api
        .patch_status(
            &obj.name_any(),
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map_err(|source| Error::Kube {
            what: "writing status",
            object: key(obj),
            source,
        })?;
    ctx.metrics
        .status_writes
        .get_or_create(&crate::metrics::ControllerLabels {
            controller: CONTROLLER.into(),
        })
        .inc();
    Ok(out.metadata.resource_version)
}

fn fresh_status(obj: &Sandbox, ctx: &Context, uid: &str) -> SandboxStatus {
    ctx.written.fresh(
        uid,
        obj.metadata.resource_version.as_deref(),
        obj.status.as_ref(),
    )
}

async fn cleanup(obj: Arc<Sandbox>, ctx: Arc<Context>) -> Result<Requeue, Error> {
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
            .map_err(|source| Error::Ec2 {
                what: "looking up the instance by UID tag",
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
            .map_err(|source| Error::Ec2 {
                what: "describing the instance",
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
                ctx.ec2.release(id).await.map_err(|source| Error::Ec2 {
                    what: "releasing the retained instance",
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
            ctx.ec2.stop(&id).await.map_err(|source| Error::Ec2 {
                what: "stopping the instance on delete",
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
            ctx.ec2.release(&id).await.map_err(|source| Error::Ec2 {
                what: "releasing the stopped instance",
                object: object.clone(),
                source,
            })?;
            Ok(Requeue::await_change())
        }
        DeleteStep::Terminate(id) => {
            ctx.ec2.terminate(&id).await.map_err(|source| Error::Ec2 {
                what: "terminating the instance",
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

/// Finds instances the operator tagged whose Sandbox no longer exists: counts them, logs them,
/// and terminates those it launched once they have been orphaned for the grace period.
async fn orphan_sweep(ctx: Arc<Context>, namespace: Option<String>, store: Store<Sandbox>) {
    let mut first_seen: HashMap<String, Instant> = HashMap::new();
    let mut tick = tokio::time::interval(ctx.settings.orphan_sweep_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // An instance is only called an orphan against a complete list: the store once its first
    // list is in (after a re-list it swaps the whole list in at once). The grace period covers
    // the moment a watch lags behind.
    if let Err(e) = crate::controller::sandboxes::wait_ready(&store).await {
        warn!(error = %e, "orphan sweep: the Sandbox store never filled; no sweeps");
        return;
    }
    loop {
        tick.tick().await;
        let uids: std::collections::HashSet<String> =
            store.state().iter().filter_map(|s| s.uid()).collect();
        let instances = match ctx.ec2.list_managed().await {
            Ok(v) => v,
            Err(e) => {
                warn!(error = %e, "orphan sweep: listing tagged instances failed");
                continue;
            }
        };
        tracing::debug!(
            instances = instances.len(),
            sandboxes = uids.len(),
            "orphan sweep"
        );
        let mut orphans = 0;
        let mut seen = std::collections::HashSet::new();
        for inst in instances {
            if matches!(
                inst.state,
                InstanceState::Terminated | InstanceState::ShuttingDown
            ) {
                continue;
            }
            let Some(uid) = inst.tags.get(ec2::TAG_UID) else {
                continue;
            };
            if uids.contains(uid) {
                continue;
            }
            // Watching one namespace, the operator knows only that namespace's Sandboxes.
            if let Some(ns) = &namespace
                && inst.tags.get(ec2::TAG_NAMESPACE) != Some(ns)
            {
                continue;
            }
            orphans += 1;
            seen.insert(inst.id.clone());
            let since = *first_seen
                .entry(inst.id.clone())
                .or_insert_with(Instant::now);
            let owner = format!(
                "{}/{}",
                inst.tags
                    .get(ec2::TAG_NAMESPACE)
                    .map(String::as_str)
                    .unwrap_or("?"),
                inst.tags
                    .get(ec2::TAG_NAME)
                    .map(String::as_str)
                    .unwrap_or("?")
            );
            match ctx.settings.orphan_grace {
                Some(grace) if since.elapsed() >= grace => {
                    match ctx.ec2.terminate(&inst.id).await {
                        Ok(()) => {
                            warn!(instance = %inst.id, sandbox = %owner, "terminated an orphaned instance (its Sandbox is gone)")
                        }
                        Err(e) => {
                            warn!(instance = %inst.id, error = %e, "terminating an orphaned instance failed")
                        }
                    }
                }
                _ => {
                    warn!(instance = %inst.id, sandbox = %owner, "orphaned instance: tagged by the operator, but its Sandbox is gone")
                }
            }
        }
        first_seen.retain(|id, _| seen.contains(id));
        ctx.metrics.orphans.set(orphans);
    }
}

/// Keeps the per-phase gauge in step with the store.
async fn phase_gauges(ctx: Arc<Context>, store: Store<Sandbox>) {
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    loop {
        tick.tick().await;
        let mut counts: BTreeMap<String, i64> = BTreeMap::new();
        for s in store.state() {
            let phase = s
                .status
                .as_ref()
                .and_then(|st| st.phase)
                .map(|p| format!("{p:?}"))
                .unwrap_or_else(|| "Unknown".into());
            *counts.entry(phase).or_default() += 1;
        }
        for phase in [
            "Provisioning",
            "Active",
            "Deploying",
            "Unhealthy",
            "Stopped",
            "Terminating",
            "Terminated",
            "Failed",
            "Unknown",
        ] {
            ctx.metrics
                .sandboxes
                .get_or_create(&crate::metrics::PhaseLabels {
                    phase: phase.into(),
                })
                .set(counts.get(phase).copied().unwrap_or(0));
        }
    }
}

fn ledger_ec2(
    ctx: &Context,
    obj: &Sandbox,
    action: &str,
    instance: Option<&str>,
    result: Result<(), &Ec2Error>,
) {
    use crate::ledger::{Ec2ActionEvent, NamespacedName, Outcome};
    let Some(ledger) = &ctx.ledger else { return };
    let (outcome, error_code, message) = match result {
        Ok(()) => (Outcome::Succeeded, None, None),
        Err(e) => (Outcome::Failed, Some(e.reason()), Some(e.to_string())),
    };
    ledger.record(Ec2ActionEvent {
        at: Timestamp::now(),
        action: action.to_string(),
        instance_id: instance.map(str::to_string),
        sandbox: Some(NamespacedName::new(
            obj.namespace().unwrap_or_default(),
            obj.name_any(),
        )),
        outcome,
        error_code,
        message,
        request_id: None,
    });
}

/// Records what changed between the old and new status: the instance's state (the power
/// intervals of the cost report come from these) and the image deploy's steps.
fn ledger_status(ctx: &Context, obj: &Sandbox, old: &SandboxStatus, new: &SandboxStatus) {
    use crate::ledger::{DeployStepEvent, InstanceStateEvent, NamespacedName, Outcome, StopReason};
    let Some(ledger) = &ctx.ledger else { return };
    let ns = obj.namespace().unwrap_or_default();
    let name = obj.name_any();
    let state = |s: &SandboxStatus| s.instance.as_ref().and_then(|i| i.state);
    if let Some(inst) = &new.instance
        && state(old) != state(new)
        && let Some(st) = state(new)
    {
        ledger.record(InstanceStateEvent {
            at: Timestamp::now(),
            instance_id: inst.id.clone(),
            sandbox: Some(NamespacedName::new(ns.clone(), name.clone())),
            instance_type: inst.instance_type.clone(),
            market: inst.market.unwrap_or_default(),
            state: st.as_str().to_string(),
            stop_reason: new.stop_reason.and_then(|r| StopReason::parse(r.as_str())),
        });
    }
    let step = |s: &SandboxStatus| s.deploy.as_ref().map(|d| (d.tag.clone(), d.state));
    if let Some(d) = &new.deploy
        && step(old) != step(new)
    {
        let outcome = match d.state {
            decide::deploy_state::SUCCEEDED => Outcome::Succeeded,
            decide::deploy_state::FAILED | decide::deploy_state::ROLLED_BACK => Outcome::Failed,
            _ => Outcome::Started,
        };
        ledger.record(DeployStepEvent {
            at: Timestamp::now(),
            namespace: ns,
            deploy: None,
            sandbox: Some(name),
            environment: Some(obj.spec.environment),
            tag: d.tag.clone(),
            previous_tag: d.previous_tag.clone(),
            step: d.state.as_str().to_string(),
            outcome,
            message: d.message.clone(),
        });
    }
}
