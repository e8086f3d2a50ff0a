//! The Sandbox controller: one EC2 instance per Sandbox, reported truthfully.
//!
//! The rooms, in the order a reconcile passes through them:
//! - this module: the wiring, the shared [`Context`], the [`Error`] of each operation, and the
//!   reconcile itself, which only splits live objects from deleted ones (the finalizer);
//! - [`observe`]: the status last written, the instance from the shared EC2 view, the agent's
//!   `/health` (with its token read from the Secret), gathered into plain data;
//! - [`decide`]: every choice, from that data and a clock: launch, start, stop, probe now,
//!   deploy, how soon to look again, and the status to write;
//! - `act`: carries out the actions `decide` returns (launch included) and writes the status
//!   only when it changed materially;
//! - `cleanup`: the deletion policy once the Sandbox is deleted; `orphans`: the sweep for
//!   tagged instances whose Sandbox is gone; `record`: the ledger, Events and gauges.
//!
//! The finalizer is set before the first EC2 call; the launch is made idempotent by a
//! ClientToken derived from the UID and a look-up by UID tag before launching, so a crash
//! between RunInstances and the status write neither leaks nor duplicates an instance.

mod act;
pub mod bootstrap;
mod cleanup;
pub mod decide;
mod observe;
mod orphans;
mod record;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::api::Api;
use kube::runtime::Controller;
use kube::runtime::controller::Action as Requeue;
use kube::runtime::events::Recorder;
use kube::runtime::finalizer::{Event as Fin, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::{Client, ResourceExt};
use tracing::{Instrument, info, warn};

use crate::api::{SANDBOX_FINALIZER, Sandbox, SandboxStatus};
use crate::controller::ErrorCategory;
use crate::controller::key;
use crate::controller::sandboxes::{Change, SandboxWatch, changed};
use crate::ec2::{Ec2, Ec2Error};
use crate::metrics::Metrics;
use decide::{Rejection, Settings};

/// The field manager for status writes.
pub const MANAGER: &str = "sandbox-operator";
const CONTROLLER: &str = "sandbox";

/// What can go wrong in one reconcile: a variant per operation, each naming the Sandbox
/// (namespace/name) and carrying the cause. [`Error::category`] is the metrics label.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The object has no namespace or UID (never true of a stored object).
    #[error("Sandbox {object} lacks a namespace or UID")]
    Malformed {
        /// namespace/name (or the name alone).
        object: String,
    },
    /// Adding a request id to a day-2 action asked without one.
    #[error("adding a request id to the day-2 action of Sandbox {object}: {source}")]
    AssigningRequestId {
        /// namespace/name.
        object: String,
        /// The Kubernetes error.
        source: kube::Error,
    },
    /// Removing a day-2 request whose result is in status.
    #[error("removing the handled day-2 action of Sandbox {object}: {source}")]
    ClearingRequest {
        /// namespace/name.
        object: String,
        /// The Kubernetes error.
        source: kube::Error,
    },
    /// Writing the status.
    #[error("writing the status of Sandbox {object}: {source}")]
    WritingStatus {
        /// namespace/name.
        object: String,
        /// The Kubernetes error.
        source: kube::Error,
    },
    /// Reading the Secret that holds the launch's user data.
    #[error("reading the user-data Secret of Sandbox {object}: {source}")]
    ReadingUserData {
        /// namespace/name.
        object: String,
        /// The Kubernetes error.
        source: kube::Error,
    },
    /// Taking the launch's turn in the client-side pacing of RunInstances.
    #[error("taking a turn to launch for Sandbox {object}: {source}")]
    TakingLaunchTurn {
        /// namespace/name.
        object: String,
        /// The EC2 error.
        source: Ec2Error,
    },
    /// Looking for an instance launched earlier for this Sandbox, by its UID tag.
    #[error("looking up the instance of Sandbox {object} by UID tag: {source}")]
    FindingByUid {
        /// namespace/name.
        object: String,
        /// The EC2 error.
        source: Ec2Error,
    },
    /// Describing the instance.
    #[error("describing the instance of Sandbox {object}: {source}")]
    Describing {
        /// namespace/name.
        object: String,
        /// The EC2 error.
        source: Ec2Error,
    },
    /// RunInstances.
    #[error("launching the instance of Sandbox {object}: {source}")]
    Launching {
        /// namespace/name.
        object: String,
        /// The EC2 error.
        source: Ec2Error,
    },
    /// StartInstances.
    #[error("starting the instance of Sandbox {object}: {source}")]
    Starting {
        /// namespace/name.
        object: String,
        /// The EC2 error.
        source: Ec2Error,
    },
    /// StopInstances (asked by the spec, auto-stop, or a Stop deletion policy).
    #[error("stopping the instance of Sandbox {object}: {source}")]
    Stopping {
        /// namespace/name.
        object: String,
        /// The EC2 error.
        source: Ec2Error,
    },
    /// TerminateInstances on delete.
    #[error("terminating the instance of Sandbox {object}: {source}")]
    Terminating {
        /// namespace/name.
        object: String,
        /// The EC2 error.
        source: Ec2Error,
    },
    /// Removing the operator's ownership tags from an instance the deletion policy leaves.
    #[error("releasing the instance of Sandbox {object}: {source}")]
    Releasing {
        /// namespace/name.
        object: String,
        /// The EC2 error.
        source: Ec2Error,
    },
    /// Reading the agent token Secret of a bootstrapped Sandbox.
    #[error("reading the agent token Secret of Sandbox {object}: {source}")]
    ReadingAgentToken {
        /// namespace/name.
        object: String,
        /// The Kubernetes error.
        source: kube::Error,
    },
    /// Creating the agent token Secret of a bootstrapped Sandbox (minting its token).
    #[error("creating the agent token Secret of Sandbox {object}: {source}")]
    MintingAgentToken {
        /// namespace/name.
        object: String,
        /// The Kubernetes error.
        source: kube::Error,
    },
    /// Not an error: the launch is held back before any EC2 call (its user data or bootstrap
    /// token is not to be had); the launch turns it into a hold reported in status.
    #[error("Sandbox {object}: {}", hold.message())]
    LaunchHeld {
        /// namespace/name.
        object: String,
        /// Why.
        hold: decide::LaunchHold,
    },
    /// The finalizer bookkeeping (adding or removing it) failed.
    #[error("the finalizer of Sandbox {object}: {message}")]
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
}

impl Error {
    /// The EC2 error behind this one, if an EC2 call failed.
    pub fn ec2(&self) -> Option<&Ec2Error> {
        match self {
            Error::TakingLaunchTurn { source, .. }
            | Error::FindingByUid { source, .. }
            | Error::Describing { source, .. }
            | Error::Launching { source, .. }
            | Error::Starting { source, .. }
            | Error::Stopping { source, .. }
            | Error::Terminating { source, .. }
            | Error::Releasing { source, .. } => Some(source),
            _ => None,
        }
    }

    /// The category the reconcile-error metric counts this under.
    pub fn category(&self) -> ErrorCategory {
        if let Some(e) = self.ec2() {
            // The operator's own pacing and AWS's throttling are counted apart.
            return match e {
                Ec2Error::Paced { .. } => ErrorCategory::Ec2Paced,
                Ec2Error::Throttled { .. } => ErrorCategory::Ec2Throttled,
                e if e.is_transient() => ErrorCategory::Ec2Transient,
                _ => ErrorCategory::Ec2,
            };
        }
        match self {
            Error::Malformed { .. } => ErrorCategory::InvalidSpec,
            Error::Finalizer { .. } => ErrorCategory::Finalizer,
            Error::Waiting { .. } | Error::LaunchHeld { .. } => ErrorCategory::Waiting,
            _ => ErrorCategory::Kubernetes,
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
    pub(super) client: Client,
    pub(super) ec2: Ec2,
    pub(super) recorder: Recorder,
    pub(super) settings: ControllerSettings,
    pub(super) metrics: Arc<Metrics>,
    pub(super) http: reqwest::Client,
    /// When each sandbox (by UID) was last probed: kept here, not in status, so probes cause
    /// no writes.
    pub(super) last_probe: Mutex<HashMap<String, Instant>>,
    /// EC2 refusals of a launch, by UID, with the generation they answered.
    pub(super) rejections: Mutex<HashMap<String, (Option<i64>, Rejection)>>,
    /// Which Sandbox an instance belongs to, for mapping EC2 changes back.
    pub(super) owners: Mutex<HashMap<String, ObjectRef<Sandbox>>>,
    /// The status last written per UID, with the resourceVersion the write produced: a
    /// reconcile that starts before the watch delivers that write uses it instead of the stale
    /// copy in the cache.
    pub(super) written: super::WrittenStatus<SandboxStatus>,
    /// The fleet ledger, when one is configured: EC2 actions, instance states, image deploy
    /// steps and the `sandboxes` table. Recording never waits for the database.
    pub(super) ledger: Option<crate::ledger::LedgerHandle>,
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
}

/// Runs the Sandbox controller until `shutdown` resolves. Sandboxes in every namespace the
/// client may list (or one namespace when `namespace` is set), from a watch of its own (the
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
    tokio::spawn(orphans::sweep(ctx.clone(), namespace, reader.clone()));
    tokio::spawn(record::phase_gauges(ctx.clone(), reader.clone()));
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

/// The reconcile entry point: the finalizer helper, then [`act::apply`] for a live Sandbox or
/// [`cleanup::cleanup`] for a deleted one, inside a span naming the Sandbox.
pub async fn reconcile(obj: Arc<Sandbox>, ctx: Arc<Context>) -> Result<Requeue, Error> {
    let span = tracing::info_span!(
        "reconcile",
        controller = CONTROLLER,
        namespace = %obj.namespace().unwrap_or_default(),
        name = %obj.name_any(),
    );
    reconcile_inner(obj, ctx).instrument(span).await
}

async fn reconcile_inner(obj: Arc<Sandbox>, ctx: Arc<Context>) -> Result<Requeue, Error> {
    ctx.metrics.reconciled(CONTROLLER);
    let object = key(obj.as_ref());
    let ns = obj.namespace().ok_or_else(|| Error::Malformed {
        object: obj.name_any(),
    })?;
    let api: Api<Sandbox> = Api::namespaced(ctx.client.clone(), &ns);
    let result = finalizer(&api, SANDBOX_FINALIZER, obj, |event| async {
        match event {
            Fin::Apply(s) => act::apply(s, ctx.clone()).await,
            Fin::Cleanup(s) => cleanup::cleanup(s, ctx.clone()).await,
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
    ctx.metrics
        .reconcile_failed(CONTROLLER, err.category().as_str());
    crate::controller::refused::error(CONTROLLER, "reconciling", err);
    let jitter = Duration::from_millis(u64::from(
        obj.uid()
            .map(|u| u.bytes().map(u32::from).sum::<u32>())
            .unwrap_or(0)
            % 1000,
    ));
    if let Some(Ec2Error::Paced { wait, .. }) = err.ec2() {
        // The operator's own pacing held the call back: nothing failed and AWS throttled
        // nothing.
        info!(sandbox = %key(obj.as_ref()), error = %err, "waiting for the operator's client-side EC2 pacing");
        return Requeue::requeue(
            (*wait).clamp(Duration::from_secs(1), Duration::from_secs(60)) + jitter,
        );
    }
    warn!(sandbox = %key(obj.as_ref()), error = %err, "reconcile failed; will retry");
    match err.ec2() {
        // A capacity shortage does not pass in seconds.
        Some(Ec2Error::Rejected { .. }) => Requeue::requeue(Duration::from_secs(30) + jitter),
        Some(source) if source.is_transient() => Requeue::requeue(Duration::from_secs(3) + jitter),
        _ => Requeue::requeue(Duration::from_secs(10) + jitter),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn describing(source: Ec2Error) -> Error {
        Error::Describing {
            object: "ns/a".into(),
            source,
        }
    }

    #[test]
    fn each_error_is_counted_under_the_label_it_had_before_the_split() {
        let paced = describing(Ec2Error::Paced {
            action: "DescribeInstances",
            wait: Duration::from_secs(3),
        });
        assert_eq!(paced.category().as_str(), "ec2_paced");
        let throttled = Error::Launching {
            object: "ns/a".into(),
            source: Ec2Error::Throttled {
                action: "RunInstances",
            },
        };
        assert_eq!(throttled.category().as_str(), "ec2_throttled");
        let unavailable = Error::Starting {
            object: "ns/a".into(),
            source: Ec2Error::Unavailable {
                action: "StartInstances",
                message: "503".into(),
            },
        };
        assert_eq!(unavailable.category().as_str(), "ec2_transient");
        let refused = Error::Launching {
            object: "ns/a".into(),
            source: Ec2Error::Rejected {
                action: "RunInstances",
                code: "InvalidAMIID.NotFound".into(),
                message: "no such AMI".into(),
                request_id: None,
            },
        };
        assert_eq!(refused.category().as_str(), "ec2");
        let waiting = Error::Waiting {
            object: "ns/a".into(),
            message: "terminating".into(),
        };
        assert_eq!(waiting.category().as_str(), "waiting");
        let fin = Error::Finalizer {
            object: "ns/a".into(),
            message: "conflict".into(),
        };
        assert_eq!(fin.category().as_str(), "finalizer");
        // The message names the operation and the object.
        let msg = refused.to_string();
        assert!(
            msg.starts_with("launching the instance of Sandbox ns/a"),
            "{msg}"
        );
    }
}
