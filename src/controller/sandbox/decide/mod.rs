//! The Sandbox controller's decisions, as a pure function of plain data: the spec, the status
//! written last time, the instance as EC2 reports it, the agent's answer and the clock. No
//! client lives here; the reconciler gathers the inputs, calls [`decide`], carries out the
//! actions and writes the status it returns.

use std::ops::ControlFlow;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

use crate::agent::protocol::HealthReport;
use crate::api::conditions::{self, Desired, FALSE, UNKNOWN};
use crate::api::{
    ManagementPolicy, SandboxPhase, SandboxSpec, SandboxStatus, StopReason, URL_PLACEHOLDERS,
};
use crate::ec2::{Instance, InstanceState};
use crate::util::parse_duration;

mod agent;
pub mod day2;
mod delete;
mod idle;
mod image;
mod instance;
mod ready;
pub mod registration;
mod schedule;
mod validate;

pub use agent::{agent_url, judge_report};
pub use day2::{ActionRequest, action_wants_probe, finish_action, request_done};
pub use delete::{DeletePlan, DeleteStep, decide_delete, decide_delete_seen, decide_deletion};
pub use image::{DeployAnswer, after_deploy};
pub use instance::{instance_status, new_start_request};
pub use schedule::{Due, ec2_max_age, first_status, probe_now};
pub use validate::{INVALID_SPEC, InvalidSpec, ValidSpec, validate};

use agent::clear_agent;
use day2::day2_step;
use registration::registration_step;
use validate::invalid_spec_decision;

/// Condition types (defined in [`crate::api::sandbox_conditions`], where every controller that
/// reads a Sandbox's conditions finds them with their reasons).
pub mod cond {
    pub use crate::api::sandbox_conditions::{
        AGENT_HEALTHY, IDLE, IMAGE_UP_TO_DATE, INSTANCE_RUNNING, READY,
    };
}

/// The ImageUpToDate reason when the agent is the seeds' old `health-server.js`: it cannot say
/// which tag it runs, so the tag of the last deploy it accepted and came back healthy from is
/// assumed.
pub const ASSUMED_BY_LEGACY_AGENT: &str = "AssumedByLegacyAgent";

/// Why an instance is stopped, as status reports it.
pub mod stop_reason {
    use crate::api::StopReason;
    /// The spec says Stopped.
    pub const REQUESTED: StopReason = StopReason::Requested;
    /// Auto-stop stopped it after the idle period.
    pub const IDLE: StopReason = StopReason::Idle;
    /// Something outside the operator stopped it.
    pub const EXTERNAL: StopReason = StopReason::External;
}

/// Deploy states in `status.deploy.state`.
pub mod deploy_state {
    use crate::api::ImageDeployState as DeployState;
    /// Waiting for active workers to finish.
    pub const DRAINING: DeployState = DeployState::Draining;
    /// The agent is deploying.
    pub const DEPLOYING: DeployState = DeployState::Deploying;
    /// Waiting for the new tag and a healthy report.
    pub const VERIFYING: DeployState = DeployState::Verifying;
    /// Done.
    pub const SUCCEEDED: DeployState = DeployState::Succeeded;
    /// Failed; the agent could not roll back (or the operator gave up).
    pub const FAILED: DeployState = DeployState::Failed;
    /// Failed and the agent rolled back to the previous tag.
    pub const ROLLED_BACK: DeployState = DeployState::RolledBack;

    /// Consecutive healthy answers a legacy health server must give after the settle time
    /// before its deploy counts as done (the first moves the deploy to Verifying).
    pub const LEGACY_HEALTHY_REPORTS: u32 = 2;

    /// Whether a deploy in this state is still under way.
    pub fn in_progress(state: &DeployState) -> bool {
        state.in_progress()
    }
}

/// What EC2 said about the sandbox's instance.
#[derive(Clone, Debug, PartialEq)]
pub enum InstanceObs {
    /// There is no instance id yet (nothing launched, or the launch is still to be found).
    NoInstance,
    /// EC2 does not know the id.
    Missing {
        /// The id looked up.
        id: String,
    },
    /// EC2 reported the instance.
    Found(Instance),
}

/// What the agent said this round.
#[derive(Clone, Debug, PartialEq)]
pub enum ProbeObs {
    /// Not probed this round (not due, or the instance is not running).
    NotProbed,
    /// `/health` answered.
    Report(Box<HealthReport>),
    /// The probe failed: unreachable, timed out, refused.
    Failed(String),
    /// The probe could not be made: the token Secret is missing, the URL cannot be built.
    Misconfigured {
        /// A CamelCase reason.
        reason: String,
        /// What to fix.
        message: String,
    },
}

/// Where a launch stands while the Sandbox has no instance id yet.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum LaunchStage {
    /// Nothing asked of EC2 yet: the status written on the first reconcile, before any call
    /// that may wait (the look-up of an earlier launch, the pacing of RunInstances).
    Pending,
    /// The operator's own client-side pacing of RunInstances holds the launch back (AWS has
    /// throttled nothing).
    Paced {
        /// When its turn comes; `None`: more launches are queued than the pacing takes on.
        turn_at: Option<Timestamp>,
        /// The RunInstances bucket: launches at once.
        burst: f64,
        /// The RunInstances bucket: launches per second after the burst.
        per_second: f64,
    },
    /// RunInstances is under way (the default).
    #[default]
    Launching,
    /// No instance is known and nothing has been asked of EC2 this round: [`decide`] returns
    /// [`Action::Launch`] unless something holds the launch back (an invalid spec, an EC2
    /// refusal of this generation, missing user data).
    ToLaunch,
    /// RunInstances answered moments ago, in this reconcile, with the instance now observed:
    /// the decision records that the operator launched it and says so in an Event.
    Launched,
    /// RunInstances did not go through for a reason that passes (AWS throttling, capacity,
    /// server trouble); it is tried again.
    Retrying {
        /// A CamelCase reason (`LaunchThrottled`, `InsufficientCapacity`, `LaunchRetrying`).
        reason: &'static str,
        /// What happened, in words that do not change from one attempt to the next.
        message: String,
    },
}

/// Everything [`decide`] looks at.
#[derive(Clone, Debug)]
pub struct Inputs<'a> {
    /// The spec.
    pub spec: &'a SandboxSpec,
    /// `metadata.generation`.
    pub generation: Option<i64>,
    /// The value of the start annotation, if set.
    pub start_request: Option<&'a str>,
    /// The value of the deploy-attempt annotation, if set.
    pub deploy_attempt: Option<&'a str>,
    /// The day-2 action asked by annotation, with its request id.
    pub action: Option<ActionRequest<'a>>,
    /// The status as last written.
    pub status: &'a SandboxStatus,
    /// What EC2 said.
    pub instance: &'a InstanceObs,
    /// What the agent said.
    pub probe: &'a ProbeObs,
    /// The agent URL in use, if one could be built.
    pub agent_url: Option<&'a str>,
    /// The last EC2 refusal for this generation (for example an unknown AMI), which must not be
    /// retried until the spec changes.
    pub launch_rejection: Option<&'a Rejection>,
    /// Why the reconciler held the launch back before calling EC2 (its user data is missing).
    pub launch_hold: Option<&'a LaunchHold>,
    /// Where the launch stands while there is no instance id (read only then).
    pub launch: LaunchStage,
    /// Now.
    pub now: Timestamp,
    /// Operator-wide settings.
    pub settings: &'a Settings,
}

/// An AWS refusal remembered so it is not retried in a storm.
#[derive(Clone, Debug, PartialEq)]
pub struct Rejection {
    /// AWS's error code, used as the condition reason.
    pub code: String,
    /// AWS's message.
    pub message: String,
}

/// Why a launch was held back before any EC2 call: the instance is never launched without the
/// user data its spec names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LaunchHold {
    /// The user-data Secret does not exist.
    UserDataSecretMissing {
        /// namespace/name of the Secret.
        secret: String,
        /// The key the spec names.
        key: String,
    },
    /// The Secret exists but has no such key.
    UserDataKeyMissing {
        /// namespace/name of the Secret.
        secret: String,
        /// The key the spec names.
        key: String,
    },
    /// The value is larger than EC2 accepts (16 KiB before base64).
    UserDataTooLarge {
        /// namespace/name of the Secret.
        secret: String,
        /// The key.
        key: String,
        /// The value's size in bytes.
        bytes: usize,
    },
    /// `agent.bootstrap`: the token or the rendered user data is not to be had.
    Bootstrap(crate::controller::sandbox::bootstrap::Hold),
}

/// The most user data EC2 accepts, in bytes before base64.
pub const MAX_USER_DATA_BYTES: usize = 16 * 1024;

impl LaunchHold {
    /// The condition reason.
    pub fn reason(&self) -> &'static str {
        match self {
            LaunchHold::UserDataSecretMissing { .. } => "UserDataSecretMissing",
            LaunchHold::UserDataKeyMissing { .. } => "UserDataKeyMissing",
            LaunchHold::UserDataTooLarge { .. } => "UserDataTooLarge",
            LaunchHold::Bootstrap(h) => h.reason(),
        }
    }

    /// What is wrong and what to do, naming the Secret and key (never the value).
    pub fn message(&self) -> String {
        match self {
            LaunchHold::UserDataSecretMissing { secret, key } => format!(
                "the user-data Secret {secret} (spec.launch.userDataSecretRef, key {key:?}) does not exist: create it; the instance is not launched without its user data"
            ),
            LaunchHold::UserDataKeyMissing { secret, key } => format!(
                "the user-data Secret {secret} has no key {key:?} (spec.launch.userDataSecretRef): add it; the instance is not launched without its user data"
            ),
            LaunchHold::UserDataTooLarge { secret, key, bytes } => format!(
                "the user data in Secret {secret} key {key:?} is {bytes} bytes; EC2 accepts at most {MAX_USER_DATA_BYTES}: shorten it"
            ),
            LaunchHold::Bootstrap(h) => h.message(),
        }
    }
}

/// How long to wait before reading a missing user-data Secret again (Secrets are not watched).
pub fn hold_recheck(settings: &Settings) -> Duration {
    (settings.poll * 5).clamp(Duration::from_secs(2), Duration::from_secs(30))
}

/// Operator-wide timing settings the decisions use.
#[derive(Clone, Debug)]
pub struct Settings {
    /// How long to wait for active workers to drain before an image deploy fails.
    pub drain_timeout: Duration,
    /// How long one image deploy may take in all.
    pub deploy_deadline: Duration,
    /// A deploy to a legacy health server (which reports no image tag and no deploy progress):
    /// how long after `POST /deploy` the box is left to its deploy script before its health
    /// counts. The seeds' `gh-deploy.sh` drains for up to 60s, stops the worker with a 35s
    /// grace, starts it and checks its health 30 times 2s apart: about two and a half minutes
    /// besides the image pull.
    pub legacy_settle: Duration,
    /// How often to look again while nothing is changing.
    pub resync: Duration,
    /// How often to look while something is in flight (pending, stopping, deploying).
    pub poll: Duration,
    /// How often to ask the agent while it deploys an image (Deploying, Verifying): short, so
    /// the end of a deploy is seen within moments of the agent finishing it.
    pub deploy_poll: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            drain_timeout: Duration::from_secs(300),
            deploy_deadline: Duration::from_secs(900),
            legacy_settle: Duration::from_secs(180),
            resync: Duration::from_secs(300),
            poll: Duration::from_secs(2),
            deploy_poll: Duration::from_millis(500),
        }
    }
}

/// Something the reconciler must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Launch the instance: take the launch's turn in the pacing of RunInstances, look for an
    /// instance launched earlier for this Sandbox (by its UID tag), then RunInstances. What
    /// came of it goes back to [`decide`] as the [`LaunchStage`], hold or refusal it ended in.
    Launch,
    /// Start the instance.
    Start {
        /// The instance id.
        id: String,
        /// Why, for the Event.
        why: StartWhy,
    },
    /// Stop the instance.
    Stop {
        /// The instance id.
        id: String,
        /// `stop_reason::REQUESTED` or `stop_reason::IDLE`.
        reason: StopReason,
    },
    /// Ask the agent to drain.
    Drain,
    /// Ask the agent to deploy this tag.
    Deploy {
        /// The tag.
        tag: String,
    },
    /// Day-2: restart an allow-listed service on the agent (`POST /restart`); the answer is the
    /// request's result ([`finish_action`]).
    RestartService {
        /// The agent's service name.
        service: &'static str,
    },
    /// Day-2: ask the agent to drain now (`POST /drain`, not waiting); the answer is the
    /// request's result ([`finish_action`]).
    DrainNow,
    /// Day-2 terminate: TerminateInstances. The Sandbox stays, in phase Terminated, as the
    /// record of what ran; nothing is launched in its place.
    TerminateInstance {
        /// The instance id.
        id: String,
    },
}

/// Why an instance is being started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartWhy {
    /// The spec says Running.
    Requested,
    /// The start annotation carries a newer time.
    Woken,
    /// It was stopped outside the operator and the spec says Running.
    RestartAfterExternalStop,
}

/// An Event to publish.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    /// Warning (true) or Normal.
    pub warning: bool,
    /// A CamelCase reason.
    pub reason: &'static str,
    /// The message.
    pub message: String,
}

/// What [`decide`] returns.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// The status to write (the reconciler writes it only if it differs materially).
    pub status: SandboxStatus,
    /// What to do, in order.
    pub actions: Vec<Action>,
    /// Events to publish about what was observed (actions publish their own).
    pub notes: Vec<Note>,
    /// When to look again at the latest.
    pub requeue: Duration,
}

fn time(ts: Timestamp) -> Time {
    Time(ts)
}

fn since(now: Timestamp, then: &Time) -> Duration {
    let secs = now.as_second() - then.0.as_second();
    Duration::from_secs(secs.max(0) as u64)
}

/// The decision for a Sandbox that is not being deleted, in steps: validate, its declared
/// state, the day-2 action asked by annotation (if any), then the registration of a
/// bootstrapped agent (the AgentRegistered condition).
pub fn decide(i: &Inputs<'_>) -> Decision {
    let valid = validate(i.spec);
    let mut d = match &valid {
        Ok(valid) => decide_state(i, valid),
        Err(invalid) => invalid_spec_decision(i, invalid),
    };
    if let Some(req) = i.action {
        day2_step(i, req, &mut d);
    }
    registration_step(valid.as_ref().ok(), i.generation, i.now, &mut d);
    d
}

/// The declared state of a valid spec, decided in steps: instance, agent, idle, image and
/// ready, each reading what the steps before it decided.
fn decide_state(i: &Inputs<'_>, valid: &ValidSpec) -> Decision {
    let mut d = Draft::new(i);
    let seen = match instance::step(&mut d) {
        ControlFlow::Break(requeue) => return d.finish(requeue),
        ControlFlow::Continue(seen) => seen,
    };
    agent::step(&mut d, &seen);
    idle::step(&mut d, &seen, valid);
    image::step(&mut d, &seen);
    ready::step(&mut d, &seen, valid);
    let requeue = d.requeue;
    d.finish(requeue)
}

/// The decision as the steps build it up: the status (its conditions apart while they are
/// set), the actions, the Events and the requeue so far.
pub(super) struct Draft<'i, 'a> {
    /// The inputs.
    i: &'i Inputs<'a>,
    /// The status being decided (its conditions are in `cs` until the end).
    st: SandboxStatus,
    /// The conditions being decided.
    cs: Vec<Condition>,
    /// What to do, in order.
    actions: Vec<Action>,
    /// Events to publish.
    notes: Vec<Note>,
    /// When to look again at the latest.
    requeue: Duration,
}

impl<'i, 'a> Draft<'i, 'a> {
    fn new(i: &'i Inputs<'a>) -> Self {
        let mut st = i.status.clone();
        st.observed_generation = i.generation;
        if st.failure_reason.as_deref() == Some(INVALID_SPEC) {
            // The spec was fixed: the phase is decided afresh.
            st.failure_reason = None;
            st.failure_message = None;
            st.phase = Some(SandboxPhase::Provisioning);
        }
        let cs = std::mem::take(&mut st.conditions);
        Self {
            i,
            st,
            cs,
            actions: Vec::new(),
            notes: Vec::new(),
            requeue: i.settings.resync,
        }
    }

    /// Sets a condition (its transition time moves only when its status flips).
    fn set(&mut self, type_: &str, status: &str, reason: &str, message: String) {
        conditions::set(
            &mut self.cs,
            Desired {
                type_,
                status,
                reason,
                message,
            },
            self.i.generation,
            self.i.now,
        );
    }

    /// Whether a step decided to stop the instance.
    fn stopping(&self) -> bool {
        self.actions
            .iter()
            .any(|a| matches!(a, Action::Stop { .. }))
    }

    fn finish(mut self, requeue: Duration) -> Decision {
        self.st.conditions = self.cs;
        Decision {
            status: self.st,
            actions: self.actions,
            notes: self.notes,
            requeue,
        }
    }
}

/// What the instance step saw, for the steps after it.
pub(super) struct Seen<'i> {
    /// The instance as EC2 reports it.
    instance: &'i Instance,
    /// Whether the instance should run (the spec, auto-stop and a wake request together).
    want_running: bool,
    /// Whether it runs and stays running this round (no stop decided).
    running: bool,
}

/// Whether `new` differs from `old` in a way worth a status write. Values that move on every
/// probe (the last-seen time, CPU, memory and disk use) do not count, so a healthy idle fleet
/// causes no writes per probe.
pub fn material_change(old: &SandboxStatus, new: &SandboxStatus) -> bool {
    let strip = |s: &SandboxStatus| {
        let mut s = s.clone();
        if let Some(a) = s.agent.as_mut() {
            a.last_seen = None;
            a.cpu_percent = None;
            a.memory_percent = None;
            a.disk_percent = None;
        }
        s
    };
    // Load figures alone never cause a write: they go to the Prometheus gauges on every probe,
    // and into status with the next change that matters (crossing 90% changes the health, and
    // that is such a change).
    strip(old) != strip(new)
}

#[cfg(test)]
mod schedule_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod validate_tests;
