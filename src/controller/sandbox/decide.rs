//! The Sandbox controller's decisions, as a pure function of plain data: the spec, the status
//! written last time, the instance as EC2 reports it, the agent's answer and the clock. No
//! client lives here; the reconciler gathers the inputs, calls [`decide`], carries out the
//! actions and writes the status it returns.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use crate::agent::protocol::{CheckStatus, DeployState, HealthReport};
use crate::api::conditions::{self, Desired, FALSE, TRUE, UNKNOWN};
use crate::api::{
    AgentHealth, AgentStatus, ImageDeployState, ImageDeployStatus, InstanceStatus,
    ManagementPolicy, Market, PowerState, SandboxPhase, SandboxSpec, SandboxStatus, StopReason,
    URL_PLACEHOLDERS,
};
use crate::ec2::{Instance, InstanceState};
use crate::util::parse_duration;

/// Condition types.
pub mod cond {
    /// The summary: the sandbox is as declared.
    pub const READY: &str = "Ready";
    /// EC2 reports the instance running.
    pub const INSTANCE_RUNNING: &str = "InstanceRunning";
    /// The agent answers its probes and reports itself healthy.
    pub const AGENT_HEALTHY: &str = "AgentHealthy";
    /// The agent runs the declared image tag.
    pub const IMAGE_UP_TO_DATE: &str = "ImageUpToDate";
    /// Auto-stop: the agent reports no active workers.
    pub const IDLE: &str = "Idle";
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
    Bootstrap(super::bootstrap::Hold),
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

/// The condition reason and failure reason of a spec the operator cannot act on.
pub const INVALID_SPEC: &str = "InvalidSpec";

/// The spec, parsed once: the decisions use these instead of the raw strings.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidSpec {
    /// `agent.probeInterval`.
    pub probe_interval: Duration,
    /// `agent.timeout`.
    pub probe_timeout: Duration,
    /// `autoStop.idleAfter`, when auto-stop is on.
    pub idle_after: Option<Duration>,
    /// `agent.bootstrap.registrationTimeout`, when bootstrap is on.
    pub registration_timeout: Option<Duration>,
}

/// Why a spec cannot be acted on: one sentence per problem, each naming the field and what to
/// fix. Reported as Ready=False with reason InvalidSpec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidSpec {
    /// The problems.
    pub problems: Vec<String>,
}

impl std::fmt::Display for InvalidSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.problems.join("; "))
    }
}

/// The validate step: what the CRD's schema and CEL rules check, checked again for objects
/// stored before those rules (or applied without them), plus the parse of every duration.
pub fn validate(spec: &SandboxSpec) -> Result<ValidSpec, InvalidSpec> {
    let mut problems = Vec::new();
    let agent = &spec.agent;
    if let Some(url) = &agent.url
        && let Err(e) = check_agent_url(url)
    {
        problems.push(format!("agent.url {url:?} {e}"));
    }
    if let Some(t) = &agent.url_template {
        match template_placeholders(t) {
            Err(e) => problems.push(format!("agent.urlTemplate {t:?} {e}")),
            Ok(found) => {
                let unknown: Vec<&str> = found
                    .iter()
                    .copied()
                    .filter(|p| !URL_PLACEHOLDERS.contains(p))
                    .collect();
                if !unknown.is_empty() {
                    problems.push(format!(
                        "agent.urlTemplate has unknown placeholder{} {}: use {}",
                        if unknown.len() > 1 { "s" } else { "" },
                        unknown.join(", "),
                        URL_PLACEHOLDERS.join(", ")
                    ));
                } else {
                    let sample = fill_template(t, |p| match p {
                        "{privateIp}" | "{publicIp}" => "10.0.0.1".into(),
                        "{privateDns}" => "ip-10-0-0-1.ec2.internal".into(),
                        "{publicDns}" => "ec2-10-0-0-1.compute-1.amazonaws.com".into(),
                        "{instanceId}" => "i-0123456789abcdef0".into(),
                        _ => agent.port.to_string(),
                    });
                    if let Err(e) = check_agent_url(&sample) {
                        problems.push(format!(
                            "agent.urlTemplate {t:?} does not make a usable URL once filled in ({sample}): {e}"
                        ));
                    }
                }
            }
        }
    }
    let mut duration = |field: &str, value: &str| {
        parse_duration(value)
            .map_err(|e| problems.push(format!("{field}: {e}")))
            .unwrap_or_default()
    };
    let probe_interval = duration("agent.probeInterval", &agent.probe_interval);
    let probe_timeout = duration("agent.timeout", &agent.timeout);
    let idle_after = spec
        .auto_stop
        .as_ref()
        .map(|a| duration("autoStop.idleAfter", &a.idle_after));
    let registration_timeout = super::bootstrap::check_spec(spec, &mut problems);
    if !problems.is_empty() {
        return Err(InvalidSpec { problems });
    }
    Ok(ValidSpec {
        probe_interval,
        probe_timeout,
        idle_after,
        registration_timeout,
    })
}

/// The placeholders of a URL template, in order, or what is wrong with its braces.
fn template_placeholders(t: &str) -> Result<Vec<&str>, &'static str> {
    let mut found = Vec::new();
    let mut rest = t;
    while let Some(open) = rest.find(['{', '}']) {
        if rest[open..].starts_with('}') {
            return Err("has an unmatched }");
        }
        let after = &rest[open + 1..];
        match after.find(['{', '}']) {
            Some(close) if after[close..].starts_with('}') => {
                found.push(&rest[open..open + 1 + close + 1]);
                rest = &after[close + 1..];
            }
            _ => return Err("has an unmatched {"),
        }
    }
    Ok(found)
}

/// The template with each placeholder replaced by `value(placeholder)`.
fn fill_template(t: &str, mut value: impl FnMut(&str) -> String) -> String {
    let mut out = t.to_string();
    for p in URL_PLACEHOLDERS {
        if out.contains(p) {
            out = out.replace(p, &value(p));
        }
    }
    out
}

/// The check the agent client makes of a base URL: http or https, with a host, no whitespace.
fn check_agent_url(url: &str) -> Result<(), String> {
    if url.chars().any(char::is_whitespace) {
        return Err("contains whitespace".into());
    }
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("is not a URL: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host().is_none() {
        return Err("must be http(s)://host[:port]".into());
    }
    Ok(())
}

/// The decision for a spec the validate step refused: nothing is launched, started, stopped,
/// probed or deployed; the instance (if any) is still reported.
fn invalid_spec_decision(i: &Inputs<'_>, invalid: &InvalidSpec) -> Decision {
    let mut st = i.status.clone();
    st.observed_generation = i.generation;
    let message = format!("invalid spec: {invalid}; nothing is done until it is fixed");
    let mut notes = Vec::new();
    if conditions::get(&st.conditions, cond::READY)
        .is_none_or(|c| c.reason != INVALID_SPEC || c.message != message)
    {
        notes.push(Note {
            warning: true,
            reason: INVALID_SPEC,
            message: message.clone(),
        });
    }
    if let InstanceObs::Found(inst) = i.instance {
        let launched_by_operator = st
            .instance
            .as_ref()
            .map(|s| s.launched_by_operator)
            .unwrap_or(i.spec.launch.is_some());
        st.instance = Some(instance_status(inst, launched_by_operator));
    }
    st.phase = Some(SandboxPhase::Failed);
    st.failure_reason = Some(INVALID_SPEC.into());
    st.failure_message = Some(message.clone());
    st.agent = clear_agent(st.agent.take());
    for (type_, status, msg) in [
        (
            cond::AGENT_HEALTHY,
            UNKNOWN,
            "the agent is not probed while the spec is invalid".to_string(),
        ),
        (cond::READY, FALSE, message),
    ] {
        conditions::set(
            &mut st.conditions,
            Desired {
                type_,
                status,
                reason: INVALID_SPEC,
                message: msg,
            },
            i.generation,
            i.now,
        );
    }
    Decision {
        status: st,
        actions: Vec::new(),
        notes,
        requeue: i.settings.resync,
    }
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
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            drain_timeout: Duration::from_secs(300),
            deploy_deadline: Duration::from_secs(900),
            legacy_settle: Duration::from_secs(180),
            resync: Duration::from_secs(300),
            poll: Duration::from_secs(2),
        }
    }
}

/// Something the reconciler must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
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

/// The instance as status reports it.
pub fn instance_status(i: &Instance, launched_by_operator: bool) -> InstanceStatus {
    InstanceStatus {
        id: i.id.clone(),
        instance_type: i.instance_type.clone(),
        state: Some(i.state),
        private_ip: i.private_ip.clone(),
        public_ip: i.public_ip.clone(),
        private_dns: i.private_dns.clone(),
        public_dns: i.public_dns.clone(),
        availability_zone: i.availability_zone.clone(),
        launch_time: i.launch_time.map(time),
        market: Some(if i.spot {
            Market::Spot
        } else {
            Market::OnDemand
        }),
        launched_by_operator,
    }
}

/// Whether a start request (annotation) is new: set, and not the one acted on last.
pub fn new_start_request(start_request: Option<&str>, status: &SandboxStatus) -> bool {
    match start_request {
        Some(v) if !v.trim().is_empty() => status.last_start_request.as_deref() != Some(v),
        _ => false,
    }
}

/// The words of the Ready and InstanceRunning conditions while there is no instance id.
fn launch_words(spec: &SandboxSpec, stage: &LaunchStage) -> (&'static str, String) {
    if let Some(id) = &spec.instance_id {
        return ("Adopting", format!("looking up instance {id} in EC2"));
    }
    match stage {
        LaunchStage::Pending => (
            "PendingLaunch",
            "the instance is to be launched: looking for one launched earlier for this Sandbox, then RunInstances".into(),
        ),
        LaunchStage::Paced {
            turn_at,
            burst,
            per_second,
        } => {
            let pacing = format!(
                "waiting for EC2 capacity in the operator's own client-side pacing of RunInstances ({burst} at once, then {per_second} per second; AWS has throttled nothing)"
            );
            let message = match turn_at {
                Some(at) => format!(
                    "{pacing}: this launch's turn comes at {}",
                    at.round(jiff::Unit::Second).unwrap_or(*at)
                ),
                None => format!(
                    "{pacing}: more launches are queued than it takes on; this one asks again later"
                ),
            };
            ("LaunchPaced", message)
        }
        LaunchStage::Launching => ("Launching", "launching the instance".into()),
        LaunchStage::Retrying { reason, message } => (reason, message.clone()),
    }
}

/// Whether the instance in status may simply not be shown by EC2 yet: the operator launched
/// it moments ago and has seen nothing of it but what RunInstances answered (`pending`). One
/// seen running, stopped or anything else was visible, so its vanishing is real.
fn launched_within_grace(s: &InstanceStatus, now: Timestamp) -> bool {
    s.launched_by_operator
        && s.state == Some(InstanceState::Pending)
        && s.launch_time
            .as_ref()
            .is_some_and(|t| since(now, t) < crate::ec2::LAUNCH_GRACE)
}

/// The decision for a Sandbox that is not being deleted: its declared state, then the day-2
/// action asked by annotation, if any.
pub fn decide(i: &Inputs<'_>) -> Decision {
    let mut d = decide_state(i);
    if let Some(req) = i.action {
        day2_step(i, req, &mut d);
    }
    d
}

fn decide_state(i: &Inputs<'_>) -> Decision {
    let valid = match validate(i.spec) {
        Ok(v) => v,
        Err(invalid) => return invalid_spec_decision(i, &invalid),
    };
    let mut st = i.status.clone();
    st.observed_generation = i.generation;
    if st.failure_reason.as_deref() == Some(INVALID_SPEC) {
        // The spec was fixed: the phase is decided afresh below.
        st.failure_reason = None;
        st.failure_message = None;
        st.phase = Some(SandboxPhase::Provisioning);
    }
    let mut actions = Vec::new();
    let mut notes = Vec::new();
    let mut requeue = i.settings.resync;
    let observe_only = i.spec.management_policy == ManagementPolicy::ObserveOnly;
    let now = i.now;
    let cs = &mut Vec::new();
    std::mem::swap(cs, &mut st.conditions);
    let gen_ = i.generation;
    let set = |cs: &mut Vec<_>, type_, status, reason, message: String| {
        conditions::set(
            cs,
            Desired {
                type_,
                status,
                reason,
                message,
            },
            gen_,
            now,
        );
    };

    // ---- The instance. ----
    let instance = match i.instance {
        InstanceObs::NoInstance => {
            st.phase = Some(SandboxPhase::Provisioning);
            if let Some(rej) = i.launch_rejection {
                set(
                    cs,
                    cond::INSTANCE_RUNNING,
                    FALSE,
                    "LaunchFailed",
                    format!(
                        "EC2 refused to launch the instance: {}: {}",
                        rej.code, rej.message
                    ),
                );
                set(
                    cs,
                    cond::READY,
                    FALSE,
                    "LaunchFailed",
                    format!(
                        "EC2 refused to launch the instance ({}); edit the spec to try again",
                        rej.code
                    ),
                );
            } else if let Some(hold) = i.launch_hold {
                let reason = hold.reason();
                if conditions::get(cs, cond::READY).is_none_or(|c| c.reason != reason) {
                    notes.push(Note {
                        warning: true,
                        reason,
                        message: hold.message(),
                    });
                }
                set(cs, cond::INSTANCE_RUNNING, FALSE, reason, hold.message());
                set(cs, cond::READY, FALSE, reason, hold.message());
                st.conditions = std::mem::take(cs);
                return Decision {
                    status: st,
                    actions,
                    notes,
                    requeue: hold_recheck(i.settings),
                };
            } else {
                let (reason, message) = launch_words(i.spec, &i.launch);
                set(cs, cond::INSTANCE_RUNNING, FALSE, reason, message.clone());
                set(cs, cond::READY, FALSE, reason, message);
            }
            st.conditions = std::mem::take(cs);
            return Decision {
                status: st,
                actions,
                notes,
                requeue: i.settings.poll,
            };
        }
        InstanceObs::Missing { id }
            if st
                .instance
                .as_ref()
                .is_some_and(|s| s.id == *id && launched_within_grace(s, now)) =>
        {
            // EC2 is eventually consistent: an instance the operator launched moments ago may
            // be unknown to DescribeInstances for a while. Not gone, not to be relaunched.
            st.phase = Some(SandboxPhase::Provisioning);
            let msg = format!(
                "launched instance {id}; EC2 does not list it yet (it is eventually consistent after RunInstances)"
            );
            set(cs, cond::INSTANCE_RUNNING, FALSE, "Launching", msg.clone());
            set(cs, cond::READY, FALSE, "Launching", msg);
            st.conditions = std::mem::take(cs);
            return Decision {
                status: st,
                actions,
                notes,
                requeue: i.settings.poll,
            };
        }
        InstanceObs::Missing { id } if terminated_on_request(&st) => {
            // EC2 forgets terminated instances after a while.
            return terminated_decision(i, st, cs, id, InstanceState::Terminated);
        }
        InstanceObs::Missing { id } => {
            let launched = st.instance.as_ref().is_some_and(|s| s.launched_by_operator);
            if launched {
                // It existed once: a vanished instance is terminal and never silently replaced.
                st.phase = Some(SandboxPhase::Failed);
                st.failure_reason = Some("InstanceNotFound".into());
                st.failure_message = Some(format!(
                    "instance {id} no longer exists in EC2; delete and recreate the Sandbox to launch a new one"
                ));
            } else {
                st.phase = Some(SandboxPhase::Provisioning);
            }
            let msg = format!("EC2 does not know instance {id}");
            set(
                cs,
                cond::INSTANCE_RUNNING,
                FALSE,
                "InstanceNotFound",
                msg.clone(),
            );
            set(
                cs,
                cond::READY,
                FALSE,
                "InstanceNotFound",
                format!("{msg}; nothing is launched in its place"),
            );
            st.conditions = std::mem::take(cs);
            return Decision {
                status: st,
                actions,
                notes,
                requeue: i.settings.resync,
            };
        }
        InstanceObs::Found(inst) => inst,
    };
    let launched_by_operator = st
        .instance
        .as_ref()
        .map(|s| s.launched_by_operator)
        .unwrap_or(i.spec.launch.is_some());
    let prev_state = st.instance.as_ref().and_then(|s| s.state);
    st.instance = Some(instance_status(instance, launched_by_operator));
    if prev_state != Some(instance.state) {
        match instance.state {
            InstanceState::Running => st.last_started_at = Some(time(now)),
            InstanceState::Stopped => st.last_stopped_at = Some(time(now)),
            _ => {}
        }
    }

    // ---- What the operator wants of the power state. ----
    let woken = new_start_request(i.start_request, &st);
    let auto_stopped = st.stop_reason == Some(stop_reason::IDLE);
    let want_running = i.spec.power_state == PowerState::Running && (!auto_stopped || woken);
    let id = instance.id.clone();

    match instance.state {
        InstanceState::ShuttingDown | InstanceState::Terminated if terminated_on_request(&st) => {
            return terminated_decision(i, st, cs, &id, instance.state);
        }
        InstanceState::ShuttingDown | InstanceState::Terminated => {
            st.phase = Some(SandboxPhase::Failed);
            st.failure_reason = Some("InstanceTerminated".into());
            st.failure_message = Some(format!(
                "instance {id} was terminated outside the operator; it is not relaunched: delete and recreate the Sandbox for a new one"
            ));
            if !matches!(
                prev_state,
                Some(InstanceState::ShuttingDown | InstanceState::Terminated)
            ) {
                notes.push(Note {
                    warning: true,
                    reason: "InstanceTerminated",
                    message: format!(
                        "instance {id} was terminated outside the operator; not relaunching"
                    ),
                });
            }
            set(
                cs,
                cond::INSTANCE_RUNNING,
                FALSE,
                "InstanceTerminated",
                format!("instance {id} is {}", instance.state.as_str()),
            );
            set(
                cs,
                cond::AGENT_HEALTHY,
                UNKNOWN,
                "InstanceNotRunning",
                "the agent is not probed while the instance is not running".into(),
            );
            set(
                cs,
                cond::READY,
                FALSE,
                "InstanceTerminated",
                format!("instance {id} was terminated outside the operator"),
            );
            st.agent = clear_agent(st.agent.take());
            st.conditions = std::mem::take(cs);
            return Decision {
                status: st,
                actions,
                notes,
                requeue: i.settings.resync,
            };
        }
        InstanceState::Pending => {
            st.phase = Some(SandboxPhase::Provisioning);
            set(
                cs,
                cond::INSTANCE_RUNNING,
                FALSE,
                "Pending",
                format!("instance {id} is pending"),
            );
            requeue = i.settings.poll;
        }
        // Never made from EC2's answer (the EC2 layer refuses names it does not know); should
        // one reach here, nothing is done to the instance and it is looked at again.
        InstanceState::Unknown => {
            set(
                cs,
                cond::INSTANCE_RUNNING,
                UNKNOWN,
                "UnknownState",
                format!("instance {id} is in a state this operator does not know"),
            );
            requeue = i.settings.poll;
        }
        InstanceState::Stopping => {
            st.phase = Some(SandboxPhase::Stopped);
            set(
                cs,
                cond::INSTANCE_RUNNING,
                FALSE,
                "Stopping",
                format!("instance {id} is stopping"),
            );
            requeue = i.settings.poll;
        }
        InstanceState::Stopped => {
            st.phase = Some(SandboxPhase::Stopped);
            set(
                cs,
                cond::INSTANCE_RUNNING,
                FALSE,
                "Stopped",
                format!("instance {id} is stopped"),
            );
            if st.stop_reason.is_none() {
                // Nobody here asked for it: stopped outside the operator.
                st.stop_reason = Some(stop_reason::EXTERNAL);
            }
            if want_running && !observe_only {
                let why = if woken {
                    StartWhy::Woken
                } else if st.stop_reason == Some(stop_reason::EXTERNAL) {
                    StartWhy::RestartAfterExternalStop
                } else {
                    StartWhy::Requested
                };
                actions.push(Action::Start {
                    id: id.clone(),
                    why,
                });
                requeue = i.settings.poll;
            }
        }
        InstanceState::Running => {
            set(
                cs,
                cond::INSTANCE_RUNNING,
                TRUE,
                "Running",
                format!("instance {id} is running"),
            );
            if !want_running && !observe_only {
                let reason = if auto_stopped {
                    stop_reason::IDLE
                } else {
                    stop_reason::REQUESTED
                };
                actions.push(Action::Stop {
                    id: id.clone(),
                    reason,
                });
                requeue = i.settings.poll;
            }
        }
    }
    if woken
        && (instance.state == InstanceState::Running
            || actions.iter().any(|a| matches!(a, Action::Start { .. })))
    {
        st.last_start_request = i.start_request.map(str::to_string);
    }
    if instance.state == InstanceState::Running {
        // Once it runs again, the reason it was stopped no longer applies.
        st.stop_reason = None;
    }
    for a in &actions {
        match a {
            Action::Stop { reason, .. } => st.stop_reason = Some(*reason),
            Action::Start { .. } => st.stop_reason = None,
            _ => {}
        }
    }

    let running = instance.state == InstanceState::Running
        && !actions.iter().any(|a| matches!(a, Action::Stop { .. }));

    // ---- The agent. ----
    st.no_vnc_url = instance
        .public_ip
        .as_ref()
        .or(instance.private_ip.as_ref())
        .map(|ip| format!("http://{ip}:{}/vnc.html", i.spec.agent.no_vnc_port));
    let threshold = i.spec.agent.failure_threshold.max(1);
    if !running {
        st.agent = clear_agent(st.agent.take());
        st.idle_since = None;
        set(
            cs,
            cond::AGENT_HEALTHY,
            UNKNOWN,
            "InstanceNotRunning",
            "the agent is not probed while the instance is not running".into(),
        );
    } else {
        let mut agent = st.agent.take().unwrap_or(AgentStatus {
            health: AgentHealth::Unknown,
            url: None,
            image_tag: None,
            active_workers: None,
            cpu_percent: None,
            memory_percent: None,
            disk_percent: None,
            draining_since: None,
            browser_status: None,
            up_since: None,
            env_sha256: None,
            agent_version: None,
            consecutive_failures: 0,
            last_seen: None,
            message: None,
        });
        agent.url = i.agent_url.map(str::to_string);
        match i.probe {
            ProbeObs::NotProbed => {}
            ProbeObs::Misconfigured { reason, message } => {
                agent.health = AgentHealth::Unknown;
                agent.message = Some(message.clone());
                set(
                    cs,
                    cond::AGENT_HEALTHY,
                    FALSE,
                    reason_static(reason),
                    message.clone(),
                );
            }
            ProbeObs::Failed(err) => {
                agent.consecutive_failures += 1;
                agent.message = Some(err.clone());
                if agent.consecutive_failures >= threshold {
                    if agent.health != AgentHealth::Unhealthy {
                        notes.push(Note {
                            warning: true,
                            reason: "AgentUnhealthy",
                            message: format!(
                                "{} consecutive probes failed: {err}",
                                agent.consecutive_failures
                            ),
                        });
                    }
                    agent.health = AgentHealth::Unhealthy;
                    set(
                        cs,
                        cond::AGENT_HEALTHY,
                        FALSE,
                        "ProbeFailed",
                        format!(
                            "{} consecutive probes failed; last: {err}",
                            agent.consecutive_failures
                        ),
                    );
                } else if conditions::get(cs, cond::AGENT_HEALTHY).is_none() {
                    set(
                        cs,
                        cond::AGENT_HEALTHY,
                        UNKNOWN,
                        "Probing",
                        format!(
                            "probe failed ({} of {threshold} allowed): {err}",
                            agent.consecutive_failures
                        ),
                    );
                }
            }
            ProbeObs::Report(r) => {
                let was_unhealthy = agent.health == AgentHealth::Unhealthy;
                agent.consecutive_failures = 0;
                agent.last_seen = Some(time(now));
                agent.image_tag = r.image_tag.clone();
                agent.active_workers = r.active_workers.map(|n| n as i32);
                agent.cpu_percent = Some(r.cpu.round() as i32);
                agent.memory_percent = Some(r.memory_percent().round() as i32);
                agent.disk_percent = Some(r.disk_percent().round() as i32);
                agent.browser_status = r
                    .browser_status
                    .clone()
                    .or_else(|| r.adspower_status.clone());
                let previous = agent.up_since.take();
                agent.up_since = (r.uptime > 0.0).then(|| {
                    let up = now.as_second() - r.uptime as i64;
                    // The agent samples its uptime in the background, so the derived boot time
                    // wobbles by seconds: keep the recorded one unless it moved by more than two
                    // minutes (a reboot), so the value is stable across probes.
                    match &previous {
                        Some(p) if (p.0.as_second() - up).abs() <= 120 => p.clone(),
                        _ => time(Timestamp::from_second(up - up.rem_euclid(60)).unwrap_or(now)),
                    }
                });
                agent.env_sha256 = r.env_sha256.clone();
                agent.agent_version = r.agent_version.clone();
                agent.draining_since = r.draining_since.map(time);
                let (health, reason, message) = judge_report(r);
                if was_unhealthy && health != AgentHealth::Unhealthy {
                    notes.push(Note {
                        warning: false,
                        reason: "AgentRecovered",
                        message: "the agent answers and reports healthy again".into(),
                    });
                }
                agent.health = health;
                agent.message = (!message.is_empty()).then(|| message.clone());
                let status = if health == AgentHealth::Unhealthy {
                    FALSE
                } else {
                    TRUE
                };
                set(cs, cond::AGENT_HEALTHY, status, reason, message);
            }
        }
        if agent.health == AgentHealth::Unknown
            && conditions::get(cs, cond::AGENT_HEALTHY)
                .is_none_or(|c| c.reason == "InstanceNotRunning" || c.reason == INVALID_SPEC)
        {
            set(
                cs,
                cond::AGENT_HEALTHY,
                UNKNOWN,
                "AwaitingFirstProbe",
                "waiting for the agent's first answer".into(),
            );
        }
        st.agent = Some(agent);
    }

    // ---- Idle auto-stop. ----
    let report = match i.probe {
        ProbeObs::Report(r) => Some(r.as_ref()),
        _ => None,
    };
    // `valid.idle_after` is set exactly when `autoStop` is.
    match (i.spec.auto_stop.as_ref().zip(valid.idle_after), running) {
        (Some((auto, idle_after)), true) => {
            let deploying = st
                .deploy
                .as_ref()
                .is_some_and(|d| deploy_state::in_progress(&d.state));
            if let Some(r) = report {
                if r.active_workers == Some(0) && !r.deploy_running() && !deploying {
                    if st.idle_since.is_none() {
                        st.idle_since = Some(time(now));
                    }
                } else if r.active_workers.is_some_and(|n| n > 0) || deploying {
                    st.idle_since = None;
                }
            }
            match &st.idle_since {
                Some(since_t) => {
                    let idle_for = since(now, since_t);
                    if idle_for >= idle_after && !observe_only {
                        actions.push(Action::Stop {
                            id: id.clone(),
                            reason: stop_reason::IDLE,
                        });
                        st.stop_reason = Some(stop_reason::IDLE);
                        notes.push(Note {
                            warning: false,
                            reason: "IdleStop",
                            message: format!(
                                "no active workers for {}s (idleAfter {}): stopping instance {id}",
                                idle_for.as_secs(),
                                auto.idle_after
                            ),
                        });
                        set(
                            cs,
                            cond::IDLE,
                            TRUE,
                            "IdleStopped",
                            format!("stopped after no active workers for {}", auto.idle_after),
                        );
                    } else {
                        set(
                            cs,
                            cond::IDLE,
                            TRUE,
                            "NoActiveWorkers",
                            format!(
                                "no active workers since {}; stops after {}",
                                since_t.0, auto.idle_after
                            ),
                        );
                        requeue = requeue.min(
                            idle_after
                                .saturating_sub(idle_for)
                                .max(Duration::from_secs(1)),
                        );
                    }
                }
                None => set(
                    cs,
                    cond::IDLE,
                    FALSE,
                    "ActiveWorkers",
                    "the agent reports active workers (or has not reported yet)".into(),
                ),
            }
        }
        (Some((auto, _)), false) => {
            if st.stop_reason == Some(stop_reason::IDLE) {
                set(
                    cs,
                    cond::IDLE,
                    TRUE,
                    "IdleStopped",
                    format!(
                        "stopped after no active workers for {}; annotate {} to start it",
                        auto.idle_after,
                        crate::api::START_REQUESTED_ANNOTATION
                    ),
                );
            } else {
                set(
                    cs,
                    cond::IDLE,
                    FALSE,
                    "NotRunning",
                    "the instance is not running".into(),
                );
            }
        }
        (None, _) => {
            conditions::remove(cs, cond::IDLE);
            st.idle_since = None;
        }
    }
    let stopping_now = actions.iter().any(|a| matches!(a, Action::Stop { .. }));

    // ---- The worker image. ----
    let desired_tag = i.spec.image.as_ref().map(|im| im.tag.clone());
    let reported_tag = st.agent.as_ref().and_then(|a| a.image_tag.clone());
    match &desired_tag {
        None => {
            set(
                cs,
                cond::IMAGE_UP_TO_DATE,
                TRUE,
                "NoImageDeclared",
                "spec.image is not set: the sandbox keeps whatever it runs".into(),
            );
        }
        Some(tag) if !running || stopping_now => {
            if reported_tag.as_deref() == Some(tag) {
                set(
                    cs,
                    cond::IMAGE_UP_TO_DATE,
                    TRUE,
                    "UpToDate",
                    format!("running {tag}"),
                );
            } else if conditions::get(cs, cond::IMAGE_UP_TO_DATE).is_none_or(|c| c.status != FALSE)
            {
                set(
                    cs,
                    cond::IMAGE_UP_TO_DATE,
                    UNKNOWN,
                    "InstanceNotRunning",
                    format!("{tag} is deployed when the instance runs"),
                );
            }
        }
        Some(tag) => {
            let (acts, image_cond, deploy_requeue) =
                image_step(&mut st, tag, report, i, &mut notes);
            actions.extend(acts);
            let (status, reason, message) = image_cond;
            set(cs, cond::IMAGE_UP_TO_DATE, status, reason, message);
            if let Some(d) = deploy_requeue {
                requeue = requeue.min(d);
            }
        }
    }

    // ---- Phase and Ready. ----
    let deploying = st
        .deploy
        .as_ref()
        .is_some_and(|d| deploy_state::in_progress(&d.state))
        && running;
    let health = st.agent.as_ref().map(|a| a.health);
    if running {
        st.failure_reason = None;
        st.failure_message = None;
        st.phase = Some(if deploying {
            SandboxPhase::Deploying
        } else {
            match health {
                Some(AgentHealth::Unhealthy) => SandboxPhase::Unhealthy,
                Some(AgentHealth::Healthy | AgentHealth::Degraded) => SandboxPhase::Active,
                _ => SandboxPhase::Provisioning,
            }
        });
    } else if instance.state == InstanceState::Stopped || instance.state == InstanceState::Stopping
    {
        st.failure_reason = None;
        st.failure_message = None;
    }
    let (ready, reason, message) = ready_summary(
        &st,
        cs,
        want_running && !stopping_now,
        observe_only,
        instance,
    );
    set(cs, cond::READY, ready, reason, message);
    if running {
        requeue = requeue.min(valid.probe_interval);
    }
    st.conditions = std::mem::take(cs);
    Decision {
        status: st,
        actions,
        notes,
        requeue,
    }
}

/// Whether the instance was terminated by a terminate request (the phase says so, or a terminate
/// request asked EC2 for it).
fn terminated_on_request(st: &SandboxStatus) -> bool {
    st.phase == Some(SandboxPhase::Terminated)
        || st.last_action.as_ref().is_some_and(|a| {
            matches!(a.name.as_str(), day2::TERMINATE | day2::TERMINATE_FORCE)
                && (a.reason == TERMINATING || a.reason == TERMINATED)
        })
}

const TERMINATING: &str = "Terminating";
const TERMINATED: &str = "Terminated";

/// The decision for a Sandbox whose instance a terminate request terminated: phase Terminated,
/// kept as the record, nothing launched, started or probed.
fn terminated_decision(
    i: &Inputs<'_>,
    mut st: SandboxStatus,
    cs: &mut Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>,
    id: &str,
    state: InstanceState,
) -> Decision {
    let mut notes = Vec::new();
    if st.phase != Some(SandboxPhase::Terminated) {
        notes.push(Note {
            warning: false,
            reason: TERMINATED,
            message: format!("instance {id} is {state}, as a terminate request asked"),
        });
    }
    st.phase = Some(SandboxPhase::Terminated);
    st.failure_reason = None;
    st.failure_message = None;
    st.agent = clear_agent(st.agent.take());
    st.idle_since = None;
    if let Some(inst) = st.instance.as_mut() {
        inst.state = Some(state);
    }
    for (type_, status, reason, message) in [
        (
            cond::INSTANCE_RUNNING,
            FALSE,
            TERMINATED,
            format!("instance {id} is {state}, as a terminate request asked"),
        ),
        (
            cond::AGENT_HEALTHY,
            UNKNOWN,
            "InstanceNotRunning",
            "the agent is not probed while the instance is not running".to_string(),
        ),
        (
            cond::READY,
            FALSE,
            TERMINATED,
            format!(
                "instance {id} was terminated on request; nothing is launched in its place: delete the Sandbox when its record is no longer wanted"
            ),
        ),
    ] {
        conditions::set(
            cs,
            Desired {
                type_,
                status,
                reason,
                message,
            },
            i.generation,
            i.now,
        );
    }
    st.conditions = std::mem::take(cs);
    Decision {
        status: st,
        actions: Vec::new(),
        notes,
        requeue: i.settings.resync,
    }
}

fn clear_agent(agent: Option<AgentStatus>) -> Option<AgentStatus> {
    // Keep the last known image tag and versions; what is about a live process goes.
    agent.map(|a| AgentStatus {
        health: AgentHealth::Unknown,
        active_workers: None,
        cpu_percent: None,
        memory_percent: None,
        disk_percent: None,
        draining_since: None,
        browser_status: None,
        consecutive_failures: 0,
        message: None,
        ..a
    })
}

fn reason_static(reason: &str) -> &'static str {
    match reason {
        "TokenSecretMissing" => "TokenSecretMissing",
        "TokenSecretKeyMissing" => "TokenSecretKeyMissing",
        "AgentUrlUnknown" => "AgentUrlUnknown",
        "Unauthorized" => "Unauthorized",
        _ => "AgentMisconfigured",
    }
}

/// Reads an agent report: Unhealthy when it says so or a check fails (other than disk and
/// memory, which make it Degraded), Degraded at 90% disk or memory, Healthy otherwise.
pub fn judge_report(r: &HealthReport) -> (AgentHealth, &'static str, String) {
    let resource = |name: &str| matches!(name, "disk" | "memory");
    let failing: Vec<String> = r
        .checks
        .iter()
        .filter(|c| c.status == CheckStatus::Fail && !resource(&c.name))
        .map(|c| format!("{}: {}", c.name, c.message))
        .collect();
    let status_ok = matches!(r.status.as_str(), "ok" | "healthy" | "degraded" | "");
    if !failing.is_empty() {
        return (
            AgentHealth::Unhealthy,
            "ChecksFailing",
            format!("failing checks: {}", failing.join("; ")),
        );
    }
    if !status_ok {
        return (
            AgentHealth::Unhealthy,
            "AgentReportsUnhealthy",
            format!("the agent reports status {:?}", r.status),
        );
    }
    if r.degraded() {
        return (
            AgentHealth::Degraded,
            "Degraded",
            format!(
                "disk at {:.0}%, memory at {:.0}% (90% or more is degraded)",
                r.disk_percent(),
                r.memory_percent()
            ),
        );
    }
    let warnings: Vec<String> = r
        .warning_checks()
        .iter()
        .filter(|c| c.message != "not configured")
        .map(|c| format!("{}: {}", c.name, c.message))
        .collect();
    if warnings.is_empty() {
        (AgentHealth::Healthy, "Healthy", String::new())
    } else {
        (
            AgentHealth::Healthy,
            "HealthyWithWarnings",
            format!("warnings: {}", warnings.join("; ")),
        )
    }
}

type CondOut = (&'static str, &'static str, String);

/// One step of the image deploy state machine kept in `status.deploy`.
fn image_step(
    st: &mut SandboxStatus,
    tag: &str,
    report: Option<&HealthReport>,
    i: &Inputs<'_>,
    notes: &mut Vec<Note>,
) -> (Vec<Action>, CondOut, Option<Duration>) {
    let now = i.now;
    let observe_only = i.spec.management_policy == ManagementPolicy::ObserveOnly;
    let reported = st.agent.as_ref().and_then(|a| a.image_tag.clone());
    let healthy = st
        .agent
        .as_ref()
        .is_some_and(|a| matches!(a.health, AgentHealth::Healthy | AgentHealth::Degraded));
    let poll = Some(i.settings.poll);
    // What a legacy health server was last assumed to run (it never reports a tag).
    let assumed = st
        .deploy
        .as_ref()
        .filter(|d| d.legacy_agent && d.state == deploy_state::SUCCEEDED)
        .map(|d| d.tag.clone());

    // Same tag as the last deploy record? A failed one counts only for the attempt it answered:
    // a new attempt marker (a SandboxDeploy's retry) starts afresh.
    let record = st.deploy.clone().filter(|d| {
        d.tag == tag
            && !(matches!(
                d.state,
                ImageDeployState::Failed | ImageDeployState::RolledBack
            ) && i.deploy_attempt.is_some()
                && d.attempt.as_deref() != i.deploy_attempt)
    });
    if let Some(d) = &record
        && !deploy_state::in_progress(&d.state)
    {
        if reported.as_deref() == Some(tag) {
            return (vec![], (TRUE, "UpToDate", format!("running {tag}")), None);
        }
        if d.legacy_agent
            && d.state == deploy_state::SUCCEEDED
            && report.is_none_or(HealthReport::is_legacy)
        {
            return (vec![], assumed_up_to_date(tag, d), None);
        }
        if matches!(
            d.state,
            ImageDeployState::Failed | ImageDeployState::RolledBack
        ) {
            // Never retried in a loop: a new tag (or deleting status.deploy) tries again.
            return (
                vec![],
                (
                    FALSE,
                    "DeployFailed",
                    format!(
                        "deploying {tag} failed and is not retried: {}",
                        d.message.clone().unwrap_or_default()
                    ),
                ),
                None,
            );
        }
    }
    if record.is_none() && reported.as_deref() == Some(tag) {
        return (vec![], (TRUE, "UpToDate", format!("running {tag}")), None);
    }
    if observe_only {
        return (
            vec![],
            (
                FALSE,
                "ObserveOnly",
                format!(
                    "the agent runs {}, the spec says {tag}; ObserveOnly never deploys",
                    reported.as_deref().unwrap_or("an unknown tag")
                ),
            ),
            None,
        );
    }
    let Some(report) = report else {
        // No fresh report this round: wait for the next probe, but never past the deadline
        // (an agent that never answers again must not keep the deploy open for ever).
        if let Some(mut d) = record
            .clone()
            .filter(|d| deploy_state::in_progress(&d.state))
        {
            if let Some(out) = past_deadline(&mut d, tag, i, notes) {
                st.deploy = Some(d);
                return (vec![], out, None);
            }
            if d.legacy_agent
                && d.state == deploy_state::VERIFYING
                && let ProbeObs::Failed(err) = i.probe
            {
                // The healthy answers must be consecutive: start counting again.
                d.state = deploy_state::DEPLOYING;
                d.message = Some(format!(
                    "the legacy health server stopped answering after the deploy ({err}); waiting for it to answer healthy again"
                ));
                st.deploy = Some(d);
                return (
                    vec![],
                    (
                        FALSE,
                        "Deploying",
                        format!(
                            "waiting for the legacy health server to answer healthy after deploying {tag}"
                        ),
                    ),
                    poll,
                );
            }
        }
        let msg = match &record {
            Some(d) => format!("deploying {tag}: {}", d.state),
            None => format!("waiting for the agent before deploying {tag}"),
        };
        let reason = if record.is_some() {
            "Deploying"
        } else {
            "Pending"
        };
        return (vec![], (FALSE, reason, msg), poll);
    };
    let mut d = match record {
        Some(d) => d,
        None => {
            // A new deploy: drain first.
            let legacy = report.is_legacy();
            let d = ImageDeployStatus {
                tag: tag.to_string(),
                previous_tag: reported.clone().or(assumed),
                state: deploy_state::DRAINING,
                id: None,
                attempt: i.deploy_attempt.map(str::to_string),
                message: Some("waiting for active workers to finish".into()),
                started_at: Some(time(now)),
                finished_at: None,
                requested_at: None,
                legacy_agent: legacy,
            };
            notes.push(Note {
                warning: false,
                reason: "DeployStarted",
                message: format!(
                    "deploying {tag} (from {}){}: draining",
                    d.previous_tag.as_deref().unwrap_or("unknown"),
                    if legacy {
                        " to a legacy health server"
                    } else {
                        ""
                    }
                ),
            });
            let mut actions = if report.is_agent() {
                vec![Action::Drain]
            } else {
                vec![]
            };
            if report.is_deploy_safe() && !report.deploy_running() {
                // Nothing to wait for: deploy in the same pass.
                let mut d = d;
                ask_to_deploy(&mut d, now);
                st.deploy = Some(d);
                actions.push(Action::Deploy {
                    tag: tag.to_string(),
                });
                return (
                    actions,
                    (FALSE, "Deploying", format!("deploying {tag}")),
                    poll,
                );
            }
            st.deploy = Some(d.clone());
            return (
                actions,
                (
                    FALSE,
                    "Draining",
                    format!("draining before deploying {tag}"),
                ),
                poll,
            );
        }
    };
    let started = d.started_at.clone().unwrap_or(time(now));
    let elapsed = since(now, &started);
    let finish = |d: &mut ImageDeployStatus, state: ImageDeployState, msg: String| {
        d.state = state;
        d.message = Some(msg);
        d.finished_at = Some(time(now));
    };
    let mut actions = vec![];
    let out: CondOut;
    match d.state {
        deploy_state::DRAINING => {
            if report.is_deploy_safe() && !report.deploy_running() {
                ask_to_deploy(&mut d, now);
                actions.push(Action::Deploy {
                    tag: tag.to_string(),
                });
                out = (FALSE, "Deploying", format!("deploying {tag}"));
            } else if elapsed >= i.settings.drain_timeout {
                let msg = format!(
                    "active workers did not drain within {}s",
                    i.settings.drain_timeout.as_secs()
                );
                finish(&mut d, deploy_state::FAILED, msg.clone());
                notes.push(Note {
                    warning: true,
                    reason: "DeployFailed",
                    message: format!("deploying {tag}: {msg}"),
                });
                out = (
                    FALSE,
                    "DeployFailed",
                    format!("deploying {tag} failed: {msg}"),
                );
            } else {
                out = (
                    FALSE,
                    "Draining",
                    format!(
                        "waiting for {} active workers to finish before deploying {tag}",
                        report.active_workers.unwrap_or(0)
                    ),
                );
            }
        }
        _ if d.legacy_agent => {
            let agent_message = st.agent.as_ref().and_then(|a| a.message.clone());
            out = legacy_progress(&mut d, tag, healthy, agent_message.as_deref(), i, notes);
            if let Some(failed) = past_deadline(&mut d, tag, i, notes) {
                st.deploy = Some(d);
                return (actions, failed, None);
            }
        }
        _ => {
            // Deploying or Verifying: follow the agent's own deploy record.
            let agent_deploy = report.deploy.as_ref().filter(|ad| ad.tag == tag);
            match agent_deploy.map(|ad| ad.state) {
                Some(DeployState::Succeeded) | None if report.image_tag.as_deref() == Some(tag) => {
                    if healthy {
                        finish(
                            &mut d,
                            deploy_state::SUCCEEDED,
                            format!("running {tag} and healthy"),
                        );
                        notes.push(Note {
                            warning: false,
                            reason: "DeploySucceeded",
                            message: format!("now running {tag}"),
                        });
                        out = (TRUE, "UpToDate", format!("running {tag}"));
                    } else {
                        d.state = deploy_state::VERIFYING;
                        d.message =
                            Some("running the new tag; waiting for a healthy report".into());
                        out = (
                            FALSE,
                            "Verifying",
                            format!("waiting for a healthy report on {tag}"),
                        );
                    }
                }
                Some(DeployState::Failed) | Some(DeployState::RolledBack) => {
                    let ad = agent_deploy.expect("matched Some");
                    let (state, word) = if ad.state == DeployState::RolledBack {
                        (deploy_state::ROLLED_BACK, "rolled back")
                    } else {
                        (deploy_state::FAILED, "failed")
                    };
                    d.id = Some(ad.id.clone());
                    finish(&mut d, state, format!("{word}: {}", ad.message));
                    notes.push(Note {
                        warning: true,
                        reason: "DeployFailed",
                        message: format!("deploying {tag} {word}: {}", ad.message),
                    });
                    out = (
                        FALSE,
                        "DeployFailed",
                        format!("deploying {tag} {word}: {}", ad.message),
                    );
                }
                _ => {
                    if let Some(ad) = agent_deploy {
                        d.id = Some(ad.id.clone());
                        d.message =
                            Some(format!("agent step {}: {}", ad.step.as_str(), ad.message));
                    }
                    out = (FALSE, "Deploying", format!("deploying {tag}"));
                }
            }
            if let Some(failed) = past_deadline(&mut d, tag, i, notes) {
                st.deploy = Some(d);
                return (actions, failed, None);
            }
        }
    }
    let again = deploy_state::in_progress(&d.state).then_some(i.settings.poll);
    st.deploy = Some(d);
    (actions, out, again)
}

/// Moves a deploy record to Deploying: the agent is asked for the tag now.
fn ask_to_deploy(d: &mut ImageDeployStatus, now: Timestamp) {
    d.state = deploy_state::DEPLOYING;
    d.requested_at = Some(time(now));
    d.message = Some(if d.legacy_agent {
        "asked the legacy health server to deploy".into()
    } else {
        "asked the agent to deploy".into()
    });
}

/// Fails an in-progress deploy that has run past the deploy deadline; the condition to report.
fn past_deadline(
    d: &mut ImageDeployStatus,
    tag: &str,
    i: &Inputs<'_>,
    notes: &mut Vec<Note>,
) -> Option<CondOut> {
    let started = d.started_at.clone().unwrap_or(time(i.now));
    if !deploy_state::in_progress(&d.state) || since(i.now, &started) < i.settings.deploy_deadline {
        return None;
    }
    let deadline = i.settings.deploy_deadline.as_secs();
    let msg = if d.legacy_agent && d.state != deploy_state::DRAINING {
        format!(
            "the legacy health server did not answer healthy again within {deadline}s of the deploy starting (it reports no deploy progress: see the deploy script's log on the instance); last: {}",
            d.message.clone().unwrap_or_default()
        )
    } else {
        format!("not done within {deadline}s")
    };
    d.state = deploy_state::FAILED;
    d.message = Some(msg.clone());
    d.finished_at = Some(time(i.now));
    notes.push(Note {
        warning: true,
        reason: "DeployFailed",
        message: format!("deploying {tag}: {msg}"),
    });
    Some((
        FALSE,
        "DeployFailed",
        format!("deploying {tag} failed: {msg}"),
    ))
}

/// A deploy to a legacy health server after `POST /deploy` was accepted. The old server answers
/// at once and runs the deploy script in the background; its `/health` carries no tag and no
/// progress, and it keeps answering while the script runs. So: leave the script
/// [`Settings::legacy_settle`] to work, then count consecutive healthy answers (Verifying after
/// the first, Succeeded after [`deploy_state::LEGACY_HEALTHY_REPORTS`]); an unhealthy answer
/// or a failed probe starts the count again. The deadline fails it otherwise.
fn legacy_progress(
    d: &mut ImageDeployStatus,
    tag: &str,
    healthy: bool,
    agent_message: Option<&str>,
    i: &Inputs<'_>,
    notes: &mut Vec<Note>,
) -> CondOut {
    let now = i.now;
    let requested = d
        .requested_at
        .clone()
        .or(d.started_at.clone())
        .unwrap_or(time(now));
    let settle = i.settings.legacy_settle;
    if since(now, &requested) < settle {
        d.state = deploy_state::DEPLOYING;
        d.message = Some(format!(
            "the legacy health server accepted the deploy and reports no progress: its deploy script is given {}s before health counts",
            settle.as_secs()
        ));
        return (
            FALSE,
            "Deploying",
            format!("deploying {tag} to a legacy health server"),
        );
    }
    if !healthy {
        let why = agent_message.unwrap_or("it does not report healthy");
        d.state = deploy_state::DEPLOYING;
        d.message = Some(format!(
            "waiting for the legacy health server to answer healthy after the deploy: {why}"
        ));
        return (
            FALSE,
            "Deploying",
            format!("waiting for the legacy health server to answer healthy after deploying {tag}"),
        );
    }
    if d.state == deploy_state::VERIFYING {
        let msg = format!(
            "assumed to run {tag}: the legacy health server answered healthy {} times in a row after the deploy (it does not report its image tag)",
            deploy_state::LEGACY_HEALTHY_REPORTS
        );
        d.state = deploy_state::SUCCEEDED;
        d.message = Some(msg.clone());
        d.finished_at = Some(time(now));
        notes.push(Note {
            warning: false,
            reason: "DeploySucceeded",
            message: msg,
        });
        return assumed_up_to_date(tag, d);
    }
    d.state = deploy_state::VERIFYING;
    d.message = Some(format!(
        "the legacy health server answered healthy after the deploy (1 of {})",
        deploy_state::LEGACY_HEALTHY_REPORTS
    ));
    (
        FALSE,
        "Verifying",
        format!(
            "waiting for the legacy health server to answer healthy again after deploying {tag}"
        ),
    )
}

/// ImageUpToDate for a legacy health server after a deploy of `tag` succeeded: True, with the tag
/// named as assumed.
fn assumed_up_to_date(tag: &str, d: &ImageDeployStatus) -> CondOut {
    let when = d
        .finished_at
        .as_ref()
        .map(|t| format!(" at {}", t.0))
        .unwrap_or_default();
    (
        TRUE,
        ASSUMED_BY_LEGACY_AGENT,
        format!(
            "assumed to run {tag}, not reported: the agent is a legacy health server, which does not report its image tag; it accepted the deploy of {tag} and answered healthy after it{when}"
        ),
    )
}

fn ready_summary(
    st: &SandboxStatus,
    cs: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    want_running: bool,
    observe_only: bool,
    instance: &Instance,
) -> (&'static str, &'static str, String) {
    let running = instance.state == InstanceState::Running;
    if !want_running && !observe_only {
        return match instance.state {
            InstanceState::Stopped => match st.stop_reason {
                Some(stop_reason::IDLE) => (
                    TRUE,
                    "IdleStopped",
                    "stopped by auto-stop, as configured".into(),
                ),
                _ => (TRUE, "Stopped", "stopped, as declared".into()),
            },
            _ => (
                FALSE,
                "Stopping",
                format!(
                    "instance {} is {}; stopping",
                    instance.id,
                    instance.state.as_str()
                ),
            ),
        };
    }
    if !running {
        return (
            FALSE,
            "InstanceNotRunning",
            format!("instance {} is {}", instance.id, instance.state.as_str()),
        );
    }
    let agent = conditions::get(cs, cond::AGENT_HEALTHY);
    if agent.is_none_or(|c| c.status != TRUE) {
        let msg = agent.map(|c| c.message.clone()).unwrap_or_default();
        let reason = if agent.is_some_and(|c| c.status == FALSE) {
            "AgentUnhealthy"
        } else {
            "AwaitingAgent"
        };
        return (FALSE, reason, msg);
    }
    if st
        .deploy
        .as_ref()
        .is_some_and(|d| deploy_state::in_progress(&d.state))
    {
        return (
            FALSE,
            "Deploying",
            "a worker image deploy is under way".into(),
        );
    }
    let image = conditions::get(cs, cond::IMAGE_UP_TO_DATE);
    if let Some(c) = image.filter(|c| c.status != TRUE) {
        return (FALSE, "ImageNotUpToDate", c.message.clone());
    }
    (
        TRUE,
        "Active",
        "running, agent healthy, image up to date".into(),
    )
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

/// What deleting the Sandbox requires, given the instance as EC2 reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeleteStep {
    /// Nothing (more) to do: remove the finalizer.
    Done,
    /// Call TerminateInstances, then look again.
    Terminate(String),
    /// Call StopInstances, then remove the finalizer.
    Stop(String),
    /// Wait for EC2 to finish (shutting-down), then look again.
    Wait,
}

/// The deletion policy carried out against the observed instance.
pub fn decide_delete(spec: &SandboxSpec, instance: &InstanceObs) -> DeleteStep {
    use crate::api::DeletionPolicy;
    if spec.management_policy == ManagementPolicy::ObserveOnly {
        return DeleteStep::Done;
    }
    let inst = match instance {
        InstanceObs::Found(i) => i,
        _ => return DeleteStep::Done,
    };
    match spec.effective_deletion_policy() {
        DeletionPolicy::Retain => DeleteStep::Done,
        DeletionPolicy::Stop => match inst.state {
            InstanceState::Running | InstanceState::Pending => DeleteStep::Stop(inst.id.clone()),
            _ => DeleteStep::Done,
        },
        DeletionPolicy::Terminate => match inst.state {
            InstanceState::Terminated => DeleteStep::Done,
            InstanceState::ShuttingDown => DeleteStep::Wait,
            _ => DeleteStep::Terminate(inst.id.clone()),
        },
    }
}

/// [`decide_delete`], knowing also the status and the clock: an instance the operator launched
/// moments ago that EC2 does not list yet (it is eventually consistent) is terminated all the
/// same, not taken for gone.
pub fn decide_delete_seen(
    spec: &SandboxSpec,
    status: &SandboxStatus,
    instance: &InstanceObs,
    now: Timestamp,
) -> DeleteStep {
    use crate::api::DeletionPolicy;
    if let InstanceObs::Missing { id } = instance
        && spec.management_policy == ManagementPolicy::Full
        && spec.effective_deletion_policy() == DeletionPolicy::Terminate
        && status
            .instance
            .as_ref()
            .is_some_and(|s| s.id == *id && launched_within_grace(s, now))
    {
        return DeleteStep::Terminate(id.clone());
    }
    decide_delete(spec, instance)
}

/// The agent URL for an instance: the explicit URL, or the template (default
/// `http://{privateIp}:{port}`) filled from the instance's addresses. `None` when the template
/// needs an address the instance does not have.
pub fn agent_url(spec: &SandboxSpec, inst: &Instance) -> Option<String> {
    if let Some(url) = &spec.agent.url {
        return Some(url.trim_end_matches('/').to_string());
    }
    let template = spec
        .agent
        .url_template
        .as_deref()
        .unwrap_or("http://{privateIp}:{port}");
    let mut out = template
        .replace("{port}", &spec.agent.port.to_string())
        .replace("{instanceId}", &inst.id);
    for (key, value) in [
        ("{privateIp}", &inst.private_ip),
        ("{publicIp}", &inst.public_ip),
        ("{privateDns}", &inst.private_dns),
        ("{publicDns}", &inst.public_dns),
    ] {
        if out.contains(key) {
            out = out.replace(key, value.as_deref().filter(|v| !v.is_empty())?);
        }
    }
    Some(out.trim_end_matches('/').to_string())
}

/// Day-2 actions asked by annotation (`fleet.valet.dev/action` and `fleet.valet.dev/action-id`),
/// recorded in `status.lastAction`.
pub mod day2 {
    /// `POST /restart` of the agent's `adspower` service.
    pub const RESTART_ADSPOWER: &str = "restart-adspower";
    /// Probe the agent at once and report its health.
    pub const PROBE: &str = "probe";
    /// Ask the worker to take no new work (`POST /drain`).
    pub const DRAIN: &str = "drain";
    /// Drain, wait for the active workers to finish (up to the drain timeout), then delete the
    /// Sandbox, whose finalizer terminates the instance.
    pub const TERMINATE: &str = "terminate";
    /// Terminate without draining.
    pub const TERMINATE_FORCE: &str = "terminate-force";
    /// The service name a restart-adspower restarts (the agent's allow-list).
    pub const ADSPOWER_SERVICE: &str = "adspower";

    /// Results in `status.lastAction.result`.
    pub const IN_PROGRESS: &str = "InProgress";
    /// Done.
    pub const SUCCEEDED: &str = "Succeeded";
    /// Tried, did not work.
    pub const FAILED: &str = "Failed";
    /// Not understood or not allowed: nothing was tried.
    pub const REJECTED: &str = "Rejected";

    /// Whether a result is final.
    pub fn is_final(result: &str) -> bool {
        result != IN_PROGRESS
    }
}

/// A day-2 action request: the annotations' values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ActionRequest<'a> {
    /// `fleet.valet.dev/action`.
    pub name: &'a str,
    /// `fleet.valet.dev/action-id`.
    pub id: &'a str,
}

impl ActionRequest<'_> {
    fn is(&self, last: Option<&LastAction>) -> bool {
        last.is_some_and(|a| a.name == self.name && a.request_id == self.id)
    }
}

use crate::api::{DAY2_ACTIONS, LastAction};

/// Whether the request has its final result in `status` (the annotations can go).
pub fn request_done(status: &SandboxStatus, req: ActionRequest<'_>) -> bool {
    let last = status.last_action.as_ref();
    req.is(last) && last.is_some_and(|a| day2::is_final(&a.result))
}

/// Whether the request needs a fresh answer from the agent this reconcile (the probe is made at
/// once rather than when the probe interval says): a new probe, restart, drain or terminate, or
/// a terminate waiting for the drain.
pub fn action_wants_probe(status: &SandboxStatus, req: Option<ActionRequest<'_>>) -> bool {
    let Some(req) = req else { return false };
    let last = status.last_action.as_ref();
    if req.is(last) {
        return last.is_some_and(|a| a.result == day2::IN_PROGRESS && a.reason == DRAINING);
    }
    DAY2_ACTIONS.contains(&req.name) && req.name != day2::TERMINATE_FORCE
}

const DRAINING: &str = "Draining";

/// The result of an action the reconciler carried out ([`Action::RestartService`],
/// [`Action::DrainNow`], a refused [`Action::TerminateInstance`]): recorded in
/// `status.lastAction` (`reason` when it failed), with the Event to publish.
pub fn finish_action(
    status: &mut SandboxStatus,
    ok: bool,
    reason: &str,
    message: String,
    now: Timestamp,
) -> Option<Note> {
    let a = status.last_action.as_mut()?;
    if a.result != day2::IN_PROGRESS {
        return None;
    }
    a.result = if ok { day2::SUCCEEDED } else { day2::FAILED }.into();
    a.reason = if ok { "Done" } else { reason }.into();
    a.message = Some(message.clone());
    a.finished_at = Some(time(now));
    let drained = ok && a.name == day2::DRAIN;
    let note = Note {
        warning: !ok,
        reason: if ok {
            "ActionSucceeded"
        } else {
            "ActionFailed"
        },
        message: format!("{}: {message}", a.name),
    };
    if drained && let Some(agent) = status.agent.as_mut() {
        // Until the next probe brings the agent's own time.
        agent.draining_since.get_or_insert(time(now));
    }
    Some(note)
}

fn set_action(
    d: &mut Decision,
    req: ActionRequest<'_>,
    result: &str,
    reason: &str,
    message: String,
    now: Timestamp,
) {
    let started = d
        .status
        .last_action
        .as_ref()
        .filter(|a| req.is(Some(a)))
        .and_then(|a| a.started_at.clone())
        .unwrap_or(time(now));
    let finished = day2::is_final(result).then(|| time(now));
    let (warning, event) = match result {
        day2::SUCCEEDED => (false, "ActionSucceeded"),
        day2::FAILED => (true, "ActionFailed"),
        day2::REJECTED => (true, "ActionRejected"),
        _ => (false, "ActionStarted"),
    };
    let changed = d
        .status
        .last_action
        .as_ref()
        .is_none_or(|a| !req.is(Some(a)) || a.result != result || a.reason != reason);
    if changed {
        d.notes.push(Note {
            warning,
            reason: event,
            message: format!("{}: {message}", req.name),
        });
    }
    d.status.last_action = Some(LastAction {
        name: req.name.to_string(),
        request_id: req.id.to_string(),
        result: result.to_string(),
        reason: reason.to_string(),
        message: Some(message),
        started_at: Some(started),
        finished_at: finished,
    });
}

/// Where the instance stands, for a terminate request.
enum Gone {
    /// No instance id yet.
    NoInstance,
    /// Terminated, shutting down, or forgotten by EC2.
    Terminated(String),
    /// It exists: running (`true`) or not.
    Exists { id: String, running: bool },
}

fn gone(i: &Inputs<'_>, st: &SandboxStatus) -> Gone {
    match i.instance {
        InstanceObs::NoInstance => Gone::NoInstance,
        InstanceObs::Missing { id } => Gone::Terminated(id.clone()),
        InstanceObs::Found(inst) => match inst.state {
            InstanceState::ShuttingDown | InstanceState::Terminated => {
                Gone::Terminated(inst.id.clone())
            }
            s => Gone::Exists {
                id: inst.id.clone(),
                running: s == InstanceState::Running && st.phase != Some(SandboxPhase::Terminated),
            },
        },
    }
}

/// Asks EC2 to terminate the instance: nothing else is done to it this pass.
fn terminate_now(d: &mut Decision, req: ActionRequest<'_>, id: &str, why: String, now: Timestamp) {
    d.actions.clear();
    d.actions
        .push(Action::TerminateInstance { id: id.to_string() });
    set_action(d, req, day2::IN_PROGRESS, TERMINATING, why, now);
    d.requeue = d.requeue.min(Duration::from_secs(2));
}

/// The day-2 step: what the request asks, given what the state step saw.
fn day2_step(i: &Inputs<'_>, req: ActionRequest<'_>, d: &mut Decision) {
    let now = i.now;
    let last = d.status.last_action.clone();
    let terminate = matches!(req.name, day2::TERMINATE | day2::TERMINATE_FORCE);
    if req.is(last.as_ref()) {
        let last = last.expect("matched");
        if day2::is_final(&last.result) {
            return;
        }
        if terminate {
            match gone(i, &d.status) {
                Gone::Terminated(id) => set_action(
                    d,
                    req,
                    day2::SUCCEEDED,
                    TERMINATED,
                    format!(
                        "instance {id} is terminated; the Sandbox stays in phase Terminated as its record"
                    ),
                    now,
                ),
                Gone::Exists { .. } if last.reason == TERMINATING => {
                    // Asked of EC2 already: wait for it to say so, doing nothing else.
                    d.actions.clear();
                    d.requeue = d.requeue.min(i.settings.poll);
                }
                Gone::Exists { id, running } => {
                    terminate_when_drained(i, req, &last, &id, running, d)
                }
                Gone::NoInstance => set_action(
                    d,
                    req,
                    day2::FAILED,
                    "NoInstance",
                    "the sandbox has no instance: nothing was terminated".into(),
                    now,
                ),
            }
        } else {
            // Asked of the agent earlier, but its answer was never recorded (the operator
            // stopped in between): say so rather than do it twice.
            set_action(
                d,
                req,
                day2::FAILED,
                "Interrupted",
                "the operator stopped before it recorded the agent's answer; ask again with a new action-id to retry".into(),
                now,
            );
        }
        return;
    }
    if !DAY2_ACTIONS.contains(&req.name) {
        set_action(
            d,
            req,
            day2::REJECTED,
            "UnknownAction",
            format!(
                "unknown action {:?}: use one of {}",
                req.name,
                DAY2_ACTIONS.join(", ")
            ),
            now,
        );
        return;
    }
    let observe_only = i.spec.management_policy == ManagementPolicy::ObserveOnly;
    if observe_only && req.name != day2::PROBE {
        set_action(
            d,
            req,
            day2::REJECTED,
            "ObserveOnly",
            format!(
                "managementPolicy ObserveOnly: the operator never acts on this sandbox, so {} is refused (only probe is allowed)",
                req.name
            ),
            now,
        );
        return;
    }
    let state = d
        .status
        .instance
        .as_ref()
        .and_then(|s| s.state)
        .filter(|_| !matches!(i.instance, InstanceObs::NoInstance));
    let running = matches!(i.instance, InstanceObs::Found(inst) if inst.state == InstanceState::Running)
        && !d.actions.iter().any(|a| matches!(a, Action::Stop { .. }))
        && d.status.phase != Some(SandboxPhase::Terminated)
        && validate(i.spec).is_ok();
    let not_running = || match &state {
        Some(s) => format!("the instance is {s}"),
        None => "the sandbox has no instance".to_string(),
    };
    match req.name {
        day2::PROBE => match i.probe {
            ProbeObs::Report(r) => {
                let (health, reason, msg) = judge_report(r);
                let health = format!("{health:?}");
                let detail = if msg.is_empty() {
                    String::new()
                } else {
                    format!(": {msg}")
                };
                set_action(
                    d,
                    req,
                    day2::SUCCEEDED,
                    "Probed",
                    format!("probed now: the agent is {health} ({reason}){detail}"),
                    now,
                );
            }
            ProbeObs::Failed(e) => set_action(
                d,
                req,
                day2::FAILED,
                "ProbeFailed",
                format!("probed now: the agent did not answer: {e}"),
                now,
            ),
            ProbeObs::Misconfigured { reason, message } => set_action(
                d,
                req,
                day2::FAILED,
                reason_static(reason),
                format!("probed now: {message}"),
                now,
            ),
            ProbeObs::NotProbed => set_action(
                d,
                req,
                day2::FAILED,
                "InstanceNotRunning",
                format!("{}: there is no agent to probe", not_running()),
                now,
            ),
        },
        day2::RESTART_ADSPOWER | day2::DRAIN => {
            let what = if req.name == day2::DRAIN {
                "drain"
            } else {
                "restart AdsPower"
            };
            if !running {
                set_action(
                    d,
                    req,
                    day2::FAILED,
                    "InstanceNotRunning",
                    format!("{}: nothing to {what}", not_running()),
                    now,
                );
                return;
            }
            if let ProbeObs::Misconfigured { reason, message } = i.probe {
                set_action(
                    d,
                    req,
                    day2::FAILED,
                    reason_static(reason),
                    format!("cannot reach the agent to {what}: {message}"),
                    now,
                );
                return;
            }
            d.actions.push(if req.name == day2::DRAIN {
                Action::DrainNow
            } else {
                Action::RestartService {
                    service: day2::ADSPOWER_SERVICE,
                }
            });
            let (reason, message) = if req.name == day2::DRAIN {
                (DRAINING, "asking the agent to drain".to_string())
            } else {
                (
                    "Restarting",
                    format!(
                        "asking the agent to restart its {} service",
                        day2::ADSPOWER_SERVICE
                    ),
                )
            };
            set_action(d, req, day2::IN_PROGRESS, reason, message, now);
        }
        _ => match gone(i, &d.status) {
            Gone::NoInstance => set_action(
                d,
                req,
                day2::FAILED,
                "NoInstance",
                "the sandbox has no instance: nothing was terminated".into(),
                now,
            ),
            Gone::Terminated(id) => set_action(
                d,
                req,
                day2::SUCCEEDED,
                TERMINATED,
                format!("instance {id} is terminated already"),
                now,
            ),
            Gone::Exists { id, .. } if req.name == day2::TERMINATE_FORCE => terminate_now(
                d,
                req,
                &id,
                format!("force: not draining; terminating instance {id}"),
                now,
            ),
            Gone::Exists { id, running: false } => terminate_now(
                d,
                req,
                &id,
                format!(
                    "{}: nothing to drain; terminating instance {id}",
                    not_running()
                ),
                now,
            ),
            Gone::Exists { id, running: true } => {
                set_action(
                    d,
                    req,
                    day2::IN_PROGRESS,
                    DRAINING,
                    "draining before terminating".into(),
                    now,
                );
                if let ProbeObs::Report(r) = i.probe
                    && r.is_agent()
                {
                    d.actions.push(Action::Drain);
                }
                let last = d.status.last_action.clone().expect("just set");
                terminate_when_drained(i, req, &last, &id, true, d);
            }
        },
    }
}

/// A terminate waiting for the drain: terminates the instance once the worker is deploy-safe
/// (or the instance no longer runs), fails after the drain timeout without terminating anything.
fn terminate_when_drained(
    i: &Inputs<'_>,
    req: ActionRequest<'_>,
    last: &LastAction,
    id: &str,
    running: bool,
    d: &mut Decision,
) {
    let now = i.now;
    let report = match i.probe {
        ProbeObs::Report(r) => Some(r.as_ref()),
        _ => None,
    };
    if !running {
        let why = format!("the instance no longer runs: terminating instance {id}");
        terminate_now(d, req, id, why, now);
        return;
    }
    if let Some(r) = report
        && r.is_deploy_safe()
        && !r.deploy_running()
    {
        let why = format!(
            "drained ({} active workers): terminating instance {id}",
            r.active_workers.unwrap_or(0)
        );
        terminate_now(d, req, id, why, now);
        return;
    }
    let started = last.started_at.clone().unwrap_or(time(now));
    let timeout = i.settings.drain_timeout;
    if since(now, &started) >= timeout {
        set_action(
            d,
            req,
            day2::FAILED,
            "DrainTimedOut",
            format!(
                "the active workers did not finish within {}s: nothing was terminated; use terminate-force to terminate without draining",
                timeout.as_secs()
            ),
            now,
        );
        return;
    }
    let waiting = match (report, i.probe) {
        (Some(r), _) => format!(
            "draining before terminating: waiting for {} active workers to finish",
            r.active_workers
                .map(|n| n.to_string())
                .unwrap_or_else(|| "the".into())
        ),
        (None, ProbeObs::Failed(e)) => {
            format!("draining before terminating: the agent does not answer ({e})")
        }
        _ => "draining before terminating".into(),
    };
    // Only the message moves: no Event per probe.
    if let Some(a) = d.status.last_action.as_mut() {
        a.message = Some(waiting);
    }
    d.requeue = d.requeue.min(i.settings.poll);
}
