//! The SandboxDeploy controller's decisions, as a pure function of plain data: the deploy's
//! spec (read once by [`validate_all`]) and status, what each target Sandbox reports, which
//! sandboxes newer deploys claim, and the clock. The reconciler gathers the inputs, carries out
//! the actions and writes the status.
//!
//! [`decide`] runs one pass in named steps, each a method of the pass: `retry` (the retry
//! annotation puts failed targets back in line), the validate check (an unusable spec holds the
//! deploy), `start` (choose the targets and their waves), `follow` (each started target's
//! progress as its Sandbox reports it), `advance` (abort, halt, pause, the next wave or the end)
//! and `summarize` (counts and conditions).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::Timestamp;

use crate::api::conditions::{self, Desired, FALSE, TRUE};
use crate::api::{
    DeployPhase, DeployTarget, FailurePolicy, ImageDeployState, InvalidSelector, ParsedSelector,
    SandboxDeploySpec, SandboxDeployStatus, TargetPhase, deploy_reason as reason,
};
use crate::controller::sandbox::decide::deploy_state;
use crate::util::parse_duration;

/// Condition types (the vocabulary lives in `api`).
pub use crate::api::deploy_condition as cond;

/// The condition reason of a spec the deploy cannot act on.
pub const INVALID_SPEC: &str = reason::INVALID_SPEC;

/// Where the deploy's selector sits, as status messages name it.
pub const SELECTOR_FIELD: &str = "spec.selector";

/// The spec's durations, parsed once: the decisions use these instead of the raw strings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidSpec {
    /// `spec.strategy.drainTimeout`.
    pub drain_timeout: Duration,
    /// `spec.strategy.targetDeadline`.
    pub target_deadline: Duration,
}

/// Why a spec's durations cannot be used: one sentence per field, naming it and what to write.
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

/// Every duration of the spec parsed (the CRD's rules check them too, but not for objects
/// stored before those rules).
pub fn validate(spec: &SandboxDeploySpec) -> Result<ValidSpec, InvalidSpec> {
    let mut problems = Vec::new();
    let mut duration = |field: &str, value: &str| {
        parse_duration(value)
            .map_err(|e| problems.push(format!("{field}: {e}")))
            .unwrap_or_default()
    };
    let drain_timeout = duration("spec.strategy.drainTimeout", &spec.strategy.drain_timeout);
    let target_deadline = duration(
        "spec.strategy.targetDeadline",
        &spec.strategy.target_deadline,
    );
    if !problems.is_empty() {
        return Err(InvalidSpec { problems });
    }
    Ok(ValidSpec {
        drain_timeout,
        target_deadline,
    })
}

/// The spec as the validate step read it: its durations and its selector (kube's selector
/// type), or what is wrong with each.
#[derive(Clone, Debug, PartialEq)]
pub struct Validated {
    /// `spec.strategy`'s durations.
    pub durations: Result<ValidSpec, InvalidSpec>,
    /// `spec.selector`.
    pub selector: Result<ParsedSelector, InvalidSelector>,
}

/// The validate step: the spec read once into typed settings. Neither problem is defaulted: a
/// bad duration holds the deploy wherever it is; a bad selector holds it before it starts
/// (once started, its targets are chosen and the selector is not read again).
pub fn validate_all(spec: &SandboxDeploySpec) -> Validated {
    Validated {
        durations: validate(spec),
        selector: spec.selector.parse(SELECTOR_FIELD),
    }
}

/// What one target Sandbox looks like now.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TargetObs {
    /// The Sandbox exists.
    pub exists: bool,
    /// `spec.image.tag`.
    pub spec_tag: Option<String>,
    /// The tag the agent reports running.
    pub reported_tag: Option<String>,
    /// The instance runs and the spec wants it running.
    pub running: bool,
    /// The Sandbox's own record of its last image deploy: (tag, state, attempt, message).
    pub deploy: Option<(String, ImageDeployState, Option<String>, Option<String>)>,
    /// The Sandbox's Ready condition is True.
    pub ready: bool,
    /// Why the Sandbox is not healthy (phase Unhealthy or Failed, or its agent reported
    /// unhealthy); `None` when it is healthy or merely stopped or starting.
    pub unhealthy: Option<String>,
}

/// Everything [`decide`] looks at.
#[derive(Clone, Debug)]
pub struct Inputs<'a> {
    /// The spec.
    pub spec: &'a SandboxDeploySpec,
    /// The spec as the validate step read it.
    pub valid: &'a Validated,
    /// The status as last written.
    pub status: &'a SandboxDeployStatus,
    /// `metadata.generation`.
    pub generation: Option<i64>,
    /// The deploy's UID (attempt markers derive from it).
    pub uid: &'a str,
    /// The abort annotation is "true".
    pub abort: bool,
    /// The retry annotation's value.
    pub retry: Option<&'a str>,
    /// Sandboxes (by name) that the selector picks now, with what they look like: used when the
    /// rollout starts.
    pub selected: &'a BTreeMap<String, TargetObs>,
    /// What each target looks like now, by name.
    pub observed: &'a BTreeMap<String, TargetObs>,
    /// Sandboxes a newer, still running deploy targets.
    pub claimed_by_newer: &'a BTreeSet<String>,
    /// Now.
    pub now: Timestamp,
}

/// Something the reconciler must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Set the Sandbox's `spec.image.tag` (server-side apply, the deploy field manager), with
    /// the attempt marker that lets the Sandbox controller retry a tag it failed before.
    SetTag {
        /// The Sandbox.
        sandbox: String,
        /// The tag.
        tag: String,
        /// The attempt marker.
        attempt: String,
    },
}

/// An Event to publish.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    /// Warning (true) or Normal.
    pub warning: bool,
    /// CamelCase reason.
    pub reason: &'static str,
    /// The message.
    pub message: String,
    /// What it is about beyond the deploy: a wave ("Wave2") or a target Sandbox's name. Each
    /// distinct value makes its own Event rather than a repeat of the last one.
    pub about: Option<String>,
}

/// What [`decide`] returns.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// The status to write.
    pub status: SandboxDeployStatus,
    /// What to do.
    pub actions: Vec<Action>,
    /// Events.
    pub notes: Vec<Note>,
    /// When to look again (None: only on change).
    pub requeue: Option<Duration>,
}

/// Whether a deploy phase is final.
pub fn finished(phase: Option<DeployPhase>) -> bool {
    matches!(
        phase,
        Some(
            DeployPhase::Succeeded
                | DeployPhase::Failed
                | DeployPhase::Aborted
                | DeployPhase::Superseded
        )
    )
}

fn target_done(p: TargetPhase) -> bool {
    matches!(
        p,
        TargetPhase::Succeeded
            | TargetPhase::Failed
            | TargetPhase::RolledBack
            | TargetPhase::Deferred
            | TargetPhase::Superseded
            | TargetPhase::Skipped
    )
}

fn in_flight(p: TargetPhase) -> bool {
    matches!(
        p,
        TargetPhase::Draining | TargetPhase::Deploying | TargetPhase::Verifying
    )
}

fn failed(p: TargetPhase) -> bool {
    matches!(p, TargetPhase::Failed | TargetPhase::RolledBack)
}

/// The wave size for `total` targets: a count, or a percent of the targets rounded up; at
/// least 1.
pub fn wave_size(max_unavailable: &IntOrString, total: usize) -> usize {
    let n = match max_unavailable {
        IntOrString::Int(n) => (*n).max(1) as usize,
        IntOrString::String(s) => {
            let pct: usize = s.trim_end_matches('%').parse().unwrap_or(100);
            (total * pct).div_ceil(100)
        }
    };
    n.max(1)
}

fn attempt_marker(uid: &str, retry: Option<&str>) -> String {
    match retry {
        Some(r) => format!("{uid}/{r}"),
        None => format!("{uid}/0"),
    }
}

/// The decision for one SandboxDeploy: one [`Pass`], step by step.
pub fn decide(i: &Inputs<'_>) -> Decision {
    let mut p = Pass::new(i);
    p.retry();
    if finished(p.st.phase) {
        return p.end(None);
    }
    let valid = match &i.valid.durations {
        Ok(v) => v,
        Err(invalid) => {
            // Not started: it waits in Pending; started: its phase stays, and no target is
            // set, failed or timed out until the spec is fixed.
            let phase = p.st.phase.unwrap_or(DeployPhase::Pending);
            return p.held_invalid(
                phase,
                format!("invalid spec: {invalid}; nothing is done until it is fixed"),
            );
        }
    };
    if p.st.started_at.is_none() {
        match p.start() {
            Start::Go => {}
            Start::End => return p.end(None),
            Start::Held(phase, message) => return p.held_invalid(phase, message),
        }
    }
    p.follow(valid.target_deadline);
    p.advance();
    p.summarize()
}

/// What the `start` step came to.
enum Start {
    /// The rollout started (or had): go on following it.
    Go,
    /// Nothing more this pass (aborted, awaiting approval, or no targets).
    End,
    /// The spec cannot be acted on: held in this phase with this message.
    Held(DeployPhase, String),
}

/// One pass of [`decide`]: the status being built, and what it asks for.
struct Pass<'i, 'a> {
    i: &'i Inputs<'a>,
    st: SandboxDeployStatus,
    cs: Vec<Condition>,
    actions: Vec<Action>,
    notes: Vec<Note>,
    /// The tag rolled out.
    tag: String,
    /// The attempt marker set on each Sandbox (known after the retry step).
    attempt: String,
}

impl<'i, 'a> Pass<'i, 'a> {
    fn new(i: &'i Inputs<'a>) -> Self {
        let mut st = i.status.clone();
        st.observed_generation = i.generation;
        let cs = std::mem::take(&mut st.conditions);
        Self {
            i,
            st,
            cs,
            actions: Vec::new(),
            notes: Vec::new(),
            tag: i.spec.image.tag.clone(),
            attempt: String::new(),
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

    fn note(
        &mut self,
        warning: bool,
        reason: &'static str,
        about: Option<String>,
        message: String,
    ) {
        self.notes.push(Note {
            about,
            warning,
            reason,
            message,
        });
    }

    /// The decision as it stands.
    fn end(mut self, requeue: Option<Duration>) -> Decision {
        self.st.conditions = self.cs;
        Decision {
            status: self.st,
            actions: self.actions,
            notes: self.notes,
            requeue,
        }
    }

    /// Step `retry`: a new retry annotation value puts the failed targets back in line, once
    /// per value; and the attempt marker follows the last value acted on.
    fn retry(&mut self) {
        let i = self.i;
        let retry_new = i
            .retry
            .is_some_and(|r| !r.is_empty() && self.st.last_retry.as_deref() != Some(r));
        if retry_new && self.st.targets.iter().any(|t| failed(t.phase)) && !i.abort {
            // The failed targets go first, in the waves right after the current one; the
            // targets still pending move back to make room.
            let st = &mut self.st;
            let current = st.wave.unwrap_or(0);
            let size = wave_size(&i.spec.strategy.max_unavailable, st.targets.len());
            let k = st.targets.iter().filter(|t| failed(t.phase)).count();
            let shift = k.div_ceil(size) as i32;
            for t in st
                .targets
                .iter_mut()
                .filter(|t| t.phase == TargetPhase::Pending)
            {
                t.wave = t.wave.map(|w| if w > current { w + shift } else { w });
            }
            for (n, t) in st
                .targets
                .iter_mut()
                .filter(|t| failed(t.phase))
                .enumerate()
            {
                t.phase = TargetPhase::Pending;
                t.wave = Some(current + 1 + (n / size) as i32);
                t.started_at = None;
                t.finished_at = None;
                t.message = Some("retrying".into());
            }
            st.phase = Some(DeployPhase::Progressing);
            st.finished_at = None;
            self.note(
                false,
                reason::RETRYING,
                None,
                format!("retrying {k} failed targets"),
            );
        }
        if i.retry.is_some() && retry_new {
            self.st.last_retry = i.retry.map(str::to_string);
        }
        self.attempt = attempt_marker(i.uid, self.st.last_retry.as_deref());
    }

    /// A spec that cannot be acted on: held in `phase` with Ready and Progressing False
    /// (InvalidSpec) and the message, a warning Event when the message is new, nothing done.
    fn held_invalid(mut self, phase: DeployPhase, message: String) -> Decision {
        if self.st.message.as_deref() != Some(message.as_str()) {
            self.note(true, reason::INVALID_SPEC, None, message.clone());
        }
        self.st.phase = Some(phase);
        self.st.message = Some(message.clone());
        self.set(
            cond::PROGRESSING,
            FALSE,
            reason::INVALID_SPEC,
            message.clone(),
        );
        self.set(cond::READY, FALSE, reason::INVALID_SPEC, message);
        self.end(None)
    }

    /// Step `start`, before the first wave: abort, the selector's validity, the approval
    /// gate, then the targets chosen in name order and cut into waves.
    fn start(&mut self) -> Start {
        let i = self.i;
        let now = i.now;
        if i.abort {
            self.st.phase = Some(DeployPhase::Aborted);
            self.st.finished_at = Some(Time(now));
            self.st.message = Some("aborted before it started".into());
            self.finish_conditions();
            return Start::End;
        }
        // A selector the CRD would refuse today (stored before its rules) selects nothing: say
        // so instead of succeeding with no targets.
        if let Err(invalid) = &i.valid.selector {
            return Start::Held(
                DeployPhase::Pending,
                format!(
                    "invalid {}: {}; fix it to start the rollout",
                    invalid.field,
                    invalid.problems.join("; ")
                ),
            );
        }
        if i.spec.paused {
            let message = format!(
                "waiting for approval: set spec.paused to false to roll out {}",
                self.tag
            );
            self.st.phase = Some(DeployPhase::AwaitingApproval);
            self.st.message = Some(message.clone());
            self.set(
                cond::PROGRESSING,
                FALSE,
                reason::AWAITING_APPROVAL,
                message.clone(),
            );
            self.set(cond::READY, FALSE, reason::AWAITING_APPROVAL, message);
            return Start::End;
        }
        let size = wave_size(&i.spec.strategy.max_unavailable, i.selected.len());
        self.st.targets = i
            .selected
            .iter()
            .enumerate()
            .map(|(n, (name, obs))| DeployTarget {
                name: name.clone(),
                phase: TargetPhase::Pending,
                from_tag: obs.spec_tag.clone().or_else(|| obs.reported_tag.clone()),
                wave: Some((n / size) as i32 + 1),
                started_at: None,
                finished_at: None,
                message: None,
            })
            .collect();
        self.st.started_at = Some(Time(now));
        self.st.total = self.st.targets.len() as i32;
        self.st.phase = Some(DeployPhase::Progressing);
        if self.st.targets.is_empty() {
            let message = "the selector matched no sandboxes: nothing to do".to_string();
            self.st.phase = Some(DeployPhase::Succeeded);
            self.st.finished_at = Some(Time(now));
            self.st.message = Some(message.clone());
            self.note(false, reason::NO_TARGETS, None, message);
            self.finish_conditions();
            return Start::End;
        }
        let waves = self
            .st
            .targets
            .iter()
            .filter_map(|t| t.wave)
            .max()
            .unwrap_or(1);
        let message = format!(
            "rolling {} to {} sandboxes in {waves} waves of at most {size}",
            self.tag,
            self.st.targets.len()
        );
        self.note(false, reason::ROLLOUT_STARTED, None, message);
        Start::Go
    }

    /// Step `follow`: every started target's phase from what its Sandbox reports; a target
    /// past `deadline` fails.
    fn follow(&mut self, deadline: Duration) {
        let Pass {
            i,
            st,
            actions,
            notes,
            tag,
            attempt,
            ..
        } = self;
        let i: &Inputs<'_> = i;
        let now = i.now;
        let tag = tag.as_str();
        let attempt = attempt.as_str();
        for t in st.targets.iter_mut() {
            let obs = observation(i, &t.name);
            if t.phase == TargetPhase::Pending && i.claimed_by_newer.contains(&t.name) {
                t.phase = TargetPhase::Superseded;
                t.message = Some("a newer SandboxDeploy took this sandbox over".into());
                continue;
            }
            if !in_flight(t.phase) {
                continue;
            }
            let fail = |t: &mut DeployTarget, msg: String, notes: &mut Vec<Note>| {
                t.phase = TargetPhase::Failed;
                t.finished_at = Some(Time(now));
                notes.push(Note {
                    about: Some(t.name.clone()),
                    warning: true,
                    reason: reason::TARGET_FAILED,
                    message: format!("{}: {msg}", t.name),
                });
                t.message = Some(msg);
            };
            if !obs.exists {
                fail(t, "the Sandbox was deleted".into(), notes);
                continue;
            }
            if obs.spec_tag.as_deref() != Some(tag) {
                t.phase = TargetPhase::Superseded;
                t.finished_at = Some(Time(now));
                t.message = Some(format!(
                    "spec.image.tag was changed to {} by someone else",
                    obs.spec_tag.as_deref().unwrap_or("nothing")
                ));
                continue;
            }
            let record = obs
                .deploy
                .as_ref()
                .filter(|(dt, _, att, _)| dt == tag && att.as_deref().is_none_or(|a| a == attempt));
            match record.map(|(_, s, _, m)| (*s, m.clone())) {
                Some((deploy_state::DRAINING, _)) => t.phase = TargetPhase::Draining,
                Some((deploy_state::DEPLOYING, _)) => t.phase = TargetPhase::Deploying,
                Some((deploy_state::VERIFYING, _)) => t.phase = TargetPhase::Verifying,
                Some((deploy_state::SUCCEEDED, _)) => {
                    t.phase = TargetPhase::Succeeded;
                    t.finished_at = Some(Time(now));
                    t.message = Some(format!("running {tag}"));
                }
                Some((deploy_state::FAILED | deploy_state::ROLLED_BACK, m)) => {
                    let why = m.unwrap_or_else(|| "the deploy failed".into());
                    match (&t.from_tag, i.spec.strategy.auto_rollback) {
                        (Some(from), true) if from != tag => {
                            actions.push(Action::SetTag {
                                sandbox: t.name.clone(),
                                tag: from.clone(),
                                attempt: attempt.to_string(),
                            });
                            t.phase = TargetPhase::RolledBack;
                            t.finished_at = Some(Time(now));
                            notes.push(Note {
                                about: Some(t.name.clone()),
                                warning: true,
                                reason: reason::TARGET_ROLLED_BACK,
                                message: format!("{}: {why}; set back to {from}", t.name),
                            });
                            t.message = Some(format!("{why}; set back to {from}"));
                        }
                        _ => fail(t, why, notes),
                    }
                }
                _ => {
                    if obs.reported_tag.as_deref() == Some(tag) && obs.ready && record.is_none() {
                        t.phase = TargetPhase::Succeeded;
                        t.finished_at = Some(Time(now));
                        t.message = Some(format!("already running {tag}"));
                    } else if !obs.running {
                        t.phase = TargetPhase::Deferred;
                        t.message = Some(format!("stopped: it gets {tag} when it starts"));
                    }
                }
            }
            if in_flight(t.phase)
                && let Some(start) = &t.started_at
                && now.as_second() - start.0.as_second() >= deadline.as_secs() as i64
            {
                fail(
                    t,
                    format!(
                        "not done within targetDeadline {}",
                        i.spec.strategy.target_deadline
                    ),
                    notes,
                );
            }
        }
    }

    /// Step `advance`: abort, halt after a failure, pause, start the next wave, or finish.
    fn advance(&mut self) {
        let i = self.i;
        let now = i.now;
        let st = &self.st;
        let any_failed = st.targets.iter().any(|t| failed(t.phase));
        let flying = st.targets.iter().any(|t| in_flight(t.phase));
        let current = st.wave.unwrap_or(0);
        let wave_done = st
            .targets
            .iter()
            .filter(|t| t.wave == Some(current))
            .all(|t| target_done(t.phase) || t.phase == TargetPhase::Pending && current == 0);
        let pending: Vec<i32> = st
            .targets
            .iter()
            .filter(|t| t.phase == TargetPhase::Pending)
            .filter_map(|t| t.wave)
            .collect();
        if i.abort {
            let message: String = if flying {
                "aborted: no new target starts; those deploying finish on their own".into()
            } else {
                "aborted".into()
            };
            self.st.phase = Some(DeployPhase::Aborted);
            self.st.finished_at = Some(Time(now));
            self.st.message = Some(message.clone());
            self.note(true, reason::ABORTED, None, message);
        } else if any_failed
            && i.spec.strategy.failure_policy == FailurePolicy::Halt
            && !pending.is_empty()
        {
            if !flying {
                let message = format!(
                    "halted after a failure; {} targets left pending",
                    pending.len()
                );
                self.st.phase = Some(DeployPhase::Failed);
                self.st.finished_at = Some(Time(now));
                self.st.message = Some(message.clone());
                self.note(true, reason::HALTED, None, message);
            }
        } else if wave_done && !pending.is_empty() {
            let next = pending.iter().copied().min().unwrap_or(current + 1);
            if i.spec.paused {
                self.st.phase = Some(DeployPhase::Paused);
                self.st.message = Some(format!("paused before wave {next}"));
            } else {
                self.start_wave(next);
            }
        } else if pending.is_empty() && !flying {
            self.finish(any_failed);
        } else if i.spec.paused && !flying {
            self.st.phase = Some(DeployPhase::Paused);
        } else {
            self.st.phase = Some(DeployPhase::Progressing);
        }
    }

    /// Starts wave `next`: each of its targets is set to the tag, or skipped (not healthy),
    /// failed (deleted) or deferred (stopped).
    fn start_wave(&mut self, next: i32) {
        let Pass {
            i,
            st,
            actions,
            notes,
            tag,
            attempt,
            ..
        } = self;
        let i: &Inputs<'_> = i;
        let now = i.now;
        st.phase = Some(DeployPhase::Progressing);
        st.wave = Some(next);
        let mut started = 0;
        for t in st
            .targets
            .iter_mut()
            .filter(|t| t.wave == Some(next) && t.phase == TargetPhase::Pending)
        {
            let obs = observation(i, &t.name);
            if !obs.exists {
                t.phase = TargetPhase::Failed;
                t.message = Some("the Sandbox was deleted".into());
                continue;
            }
            if let Some(why) = obs
                .unhealthy
                .as_ref()
                .filter(|_| !i.spec.strategy.include_unhealthy)
            {
                // As the seeds did (only active sandboxes): left on the tag it runs.
                t.phase = TargetPhase::Skipped;
                t.finished_at = Some(Time(now));
                let msg = format!(
                    "skipped, not deployed: not healthy ({why}); set spec.strategy.includeUnhealthy to deploy to it"
                );
                notes.push(Note {
                    about: Some(t.name.clone()),
                    warning: true,
                    reason: reason::TARGET_SKIPPED,
                    message: format!("{}: {msg}", t.name),
                });
                t.message = Some(msg);
                continue;
            }
            actions.push(Action::SetTag {
                sandbox: t.name.clone(),
                tag: tag.clone(),
                attempt: attempt.clone(),
            });
            t.started_at = Some(Time(now));
            if obs.running {
                t.phase = TargetPhase::Draining;
                t.message = Some(format!("deploying {tag}"));
            } else {
                t.phase = TargetPhase::Deferred;
                t.finished_at = Some(Time(now));
                t.message = Some(format!("stopped: it gets {tag} when it starts"));
            }
            started += 1;
        }
        st.message = Some(format!("wave {next}: {started} targets"));
        notes.push(Note {
            about: Some(format!("Wave{next}")),
            warning: false,
            reason: reason::WAVE_STARTED,
            message: format!("wave {next}: deploying {tag} to {started} sandboxes"),
        });
    }

    /// Nothing pending or in flight: the rollout ends Failed, Superseded or Succeeded.
    fn finish(&mut self, any_failed: bool) {
        let tag = self.tag.clone();
        let st = &mut self.st;
        let superseded = st
            .targets
            .iter()
            .filter(|t| t.phase == TargetPhase::Superseded)
            .count();
        st.finished_at = Some(Time(self.i.now));
        st.phase = Some(if any_failed {
            DeployPhase::Failed
        } else if superseded > 0 {
            // Nothing is left to this one: a newer deploy took over what it had not done.
            DeployPhase::Superseded
        } else {
            DeployPhase::Succeeded
        });
        let skipped = skipped_names(st);
        let message: String = match st.phase {
            Some(DeployPhase::Failed) => "finished with failed targets".into(),
            Some(DeployPhase::Superseded) => "a newer deploy took over every target".into(),
            _ if !skipped.is_empty() => format!(
                "{tag} rolled out to the healthy sandboxes; {} skipped, not deployed, as not healthy: {}",
                skipped.len(),
                skipped.join(", ")
            ),
            _ => format!("{tag} rolled out"),
        };
        st.message = Some(message.clone());
        let reason = if any_failed {
            reason::ROLLOUT_FAILED
        } else {
            reason::ROLLOUT_FINISHED
        };
        self.note(any_failed, reason, None, message);
    }

    /// Step `summarize`: the counts, the conditions, and when to look again.
    fn summarize(mut self) -> Decision {
        let st = &mut self.st;
        st.total = st.targets.len() as i32;
        st.updated = st
            .targets
            .iter()
            .filter(|t| t.phase == TargetPhase::Succeeded)
            .count() as i32;
        st.failed = st.targets.iter().filter(|t| failed(t.phase)).count() as i32;
        st.skipped = skipped_names(st).len() as i32;
        if finished(self.st.phase) {
            self.finish_conditions();
        } else {
            let msg = format!("{}/{} updated", self.st.updated, self.st.total);
            match self.st.phase {
                Some(DeployPhase::Paused) => {
                    let message = self.st.message.clone().unwrap_or_default();
                    self.set(cond::PROGRESSING, FALSE, reason::PAUSED, message);
                    self.set(cond::READY, FALSE, reason::PAUSED, msg);
                }
                _ => {
                    self.set(cond::PROGRESSING, TRUE, reason::PROGRESSING, msg.clone());
                    self.set(cond::READY, FALSE, reason::PROGRESSING, msg);
                }
            }
            if self.st.failed > 0 {
                let message = format!("{} targets failed", self.st.failed);
                self.set(cond::FAILED, TRUE, reason::TARGET_FAILED, message);
            }
        }
        let requeue = (!finished(self.st.phase)).then_some(Duration::from_secs(2));
        self.end(requeue)
    }

    /// The conditions of a finished deploy.
    fn finish_conditions(&mut self) {
        let st = &self.st;
        let msg = st.message.clone().unwrap_or_default();
        let mut counts = format!("{}/{} updated, {} failed", st.updated, st.total, st.failed);
        if st.skipped > 0 {
            counts.push_str(&format!(", {} skipped as not healthy", st.skipped));
        }
        let (skipped, phase) = (st.skipped, st.phase);
        match phase {
            Some(DeployPhase::Succeeded) if skipped > 0 => {
                // Finished, but not everywhere: the skipped ones were not deployed.
                let why = reason::SUCCEEDED_WITH_SKIPPED;
                self.set(cond::PROGRESSING, FALSE, reason::FINISHED, counts.clone());
                self.set(cond::COMPLETE, TRUE, why, msg.clone());
                self.set(cond::FAILED, FALSE, reason::NO_FAILURES, counts);
                self.set(cond::READY, TRUE, why, msg);
            }
            Some(DeployPhase::Succeeded) => {
                self.set(cond::PROGRESSING, FALSE, reason::FINISHED, counts.clone());
                self.set(cond::COMPLETE, TRUE, reason::SUCCEEDED, msg.clone());
                self.set(cond::FAILED, FALSE, reason::NO_FAILURES, counts);
                self.set(cond::READY, TRUE, reason::SUCCEEDED, msg);
            }
            Some(DeployPhase::Failed) => {
                self.set(cond::PROGRESSING, FALSE, reason::FINISHED, counts.clone());
                self.set(cond::COMPLETE, FALSE, reason::FAILED, counts);
                self.set(cond::FAILED, TRUE, reason::TARGET_FAILED, msg.clone());
                self.set(cond::READY, FALSE, reason::FAILED, msg);
            }
            Some(DeployPhase::Aborted) => {
                self.set(cond::PROGRESSING, FALSE, reason::ABORTED, msg.clone());
                self.set(cond::COMPLETE, FALSE, reason::ABORTED, counts);
                self.set(cond::READY, FALSE, reason::ABORTED, msg);
            }
            Some(DeployPhase::Superseded) => {
                self.set(cond::PROGRESSING, FALSE, reason::SUPERSEDED, msg.clone());
                self.set(cond::COMPLETE, FALSE, reason::SUPERSEDED, counts);
                self.set(cond::READY, TRUE, reason::SUPERSEDED, msg);
            }
            _ => {}
        }
    }
}

/// What a target looks like now (targets chosen in this very pass are observed through the
/// selection; an unknown one does not exist).
fn observation<'x>(i: &'x Inputs<'_>, name: &str) -> &'x TargetObs {
    static NOTHING: std::sync::OnceLock<TargetObs> = std::sync::OnceLock::new();
    i.observed
        .get(name)
        .or_else(|| i.selected.get(name))
        .unwrap_or_else(|| NOTHING.get_or_init(TargetObs::default))
}

fn skipped_names(st: &SandboxDeployStatus) -> Vec<String> {
    st.targets
        .iter()
        .filter(|t| t.phase == TargetPhase::Skipped)
        .map(|t| t.name.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(extra: serde_json::Value) -> SandboxDeploySpec {
        let mut v = serde_json::json!({"image": {"tag": "v2"}});
        if let (Some(a), serde_json::Value::Object(b)) = (v.as_object_mut(), extra) {
            a.extend(b);
        }
        serde_json::from_value(v).unwrap()
    }

    fn obs(tag: &str) -> TargetObs {
        TargetObs {
            exists: true,
            spec_tag: None,
            reported_tag: Some(tag.into()),
            running: true,
            deploy: None,
            ready: true,
            unhealthy: None,
        }
    }

    struct Run {
        spec: SandboxDeploySpec,
        status: SandboxDeployStatus,
        selected: BTreeMap<String, TargetObs>,
        observed: BTreeMap<String, TargetObs>,
        claimed: BTreeSet<String>,
        abort: bool,
        retry: Option<String>,
        now: i64,
    }

    impl Run {
        fn new(spec: SandboxDeploySpec, names: &[&str]) -> Self {
            let selected: BTreeMap<_, _> =
                names.iter().map(|n| (n.to_string(), obs("v1"))).collect();
            Run {
                spec,
                status: Default::default(),
                observed: selected.clone(),
                selected,
                claimed: BTreeSet::new(),
                abort: false,
                retry: None,
                now: 0,
            }
        }
        fn step(&mut self) -> Decision {
            let valid = validate_all(&self.spec);
            let d = decide(&Inputs {
                spec: &self.spec,
                valid: &valid,
                status: &self.status,
                generation: Some(1),
                uid: "uid",
                abort: self.abort,
                retry: self.retry.as_deref(),
                selected: &self.selected,
                observed: &self.observed,
                claimed_by_newer: &self.claimed,
                now: Timestamp::from_second(1_800_000_000 + self.now).unwrap(),
            });
            // The SetTag actions land on the Sandboxes.
            for a in &d.actions {
                let Action::SetTag { sandbox, tag, .. } = a;
                self.observed.get_mut(sandbox).unwrap().spec_tag = Some(tag.clone());
            }
            self.status = d.status.clone();
            d
        }
        fn sandbox_reports(&mut self, name: &str, state: ImageDeployState) {
            let o = self.observed.get_mut(name).unwrap();
            o.deploy = Some((
                "v2".into(),
                state,
                Some(format!(
                    "uid/{}",
                    self.status.last_retry.as_deref().unwrap_or("0")
                )),
                Some("msg".into()),
            ));
            if state == deploy_state::SUCCEEDED {
                o.reported_tag = Some("v2".into());
            }
        }
        fn phase_of(&self, name: &str) -> TargetPhase {
            self.status
                .targets
                .iter()
                .find(|t| t.name == name)
                .unwrap()
                .phase
        }
    }

    #[test]
    fn wave_sizes() {
        assert_eq!(wave_size(&IntOrString::Int(2), 5), 2);
        assert_eq!(wave_size(&IntOrString::Int(0), 5), 1);
        assert_eq!(wave_size(&IntOrString::String("25%".into()), 10), 3);
        assert_eq!(wave_size(&IntOrString::String("1%".into()), 3), 1);
        assert_eq!(wave_size(&IntOrString::String("100%".into()), 7), 7);
    }

    #[test]
    fn waves_of_at_most_max_unavailable_in_order() {
        let mut r = Run::new(
            spec(serde_json::json!({"strategy": {"maxUnavailable": 2}})),
            &["a", "b", "c"],
        );
        let d = r.step();
        assert_eq!(d.actions.len(), 2);
        assert_eq!(r.status.phase, Some(DeployPhase::Progressing));
        assert_eq!(
            (r.phase_of("a"), r.phase_of("c")),
            (TargetPhase::Draining, TargetPhase::Pending)
        );
        r.sandbox_reports("a", deploy_state::SUCCEEDED);
        assert!(
            r.step().actions.is_empty(),
            "the wave is not done while b deploys"
        );
        r.sandbox_reports("b", deploy_state::SUCCEEDED);
        let d = r.step();
        assert_eq!(
            d.actions,
            vec![Action::SetTag {
                sandbox: "c".into(),
                tag: "v2".into(),
                attempt: "uid/0".into()
            }]
        );
        assert_eq!(r.status.wave, Some(2));
        r.sandbox_reports("c", deploy_state::SUCCEEDED);
        r.step();
        assert_eq!(r.status.phase, Some(DeployPhase::Succeeded));
        assert_eq!(
            (r.status.updated, r.status.failed, r.status.total),
            (3, 0, 3)
        );
    }

    #[test]
    fn halt_stops_after_a_failure_and_rolls_back_then_retry_goes_on() {
        let mut r = Run::new(
            spec(serde_json::json!({"strategy": {"maxUnavailable": 1}})),
            &["a", "b"],
        );
        r.step();
        r.sandbox_reports("a", deploy_state::ROLLED_BACK);
        let d = r.step();
        assert_eq!(
            d.actions,
            vec![Action::SetTag {
                sandbox: "a".into(),
                tag: "v1".into(),
                attempt: "uid/0".into()
            }]
        );
        assert_eq!(r.phase_of("a"), TargetPhase::RolledBack);
        assert_eq!(r.phase_of("b"), TargetPhase::Pending);
        assert_eq!(r.status.phase, Some(DeployPhase::Failed));
        assert!(
            r.step().actions.is_empty(),
            "a finished deploy does nothing"
        );
        // Retry: only the failed target, with a new attempt marker; then the rest.
        r.retry = Some("1".into());
        let d = r.step();
        assert_eq!(
            d.actions,
            vec![Action::SetTag {
                sandbox: "a".into(),
                tag: "v2".into(),
                attempt: "uid/1".into()
            }]
        );
        assert_eq!(r.status.phase, Some(DeployPhase::Progressing));
        assert!(
            r.step().actions.is_empty(),
            "the same retry value does not retry twice"
        );
        r.sandbox_reports("a", deploy_state::SUCCEEDED);
        let d = r.step();
        assert_eq!(
            d.actions,
            vec![Action::SetTag {
                sandbox: "b".into(),
                tag: "v2".into(),
                attempt: "uid/1".into()
            }]
        );
    }

    #[test]
    fn continue_goes_on_after_a_failure_without_rollback() {
        let mut r = Run::new(
            spec(
                serde_json::json!({"strategy": {"maxUnavailable": 1, "failurePolicy": "Continue", "autoRollback": false}}),
            ),
            &["a", "b"],
        );
        r.step();
        r.sandbox_reports("a", deploy_state::FAILED);
        let d = r.step();
        assert_eq!(
            d.actions,
            vec![Action::SetTag {
                sandbox: "b".into(),
                tag: "v2".into(),
                attempt: "uid/0".into()
            }]
        );
        assert_eq!(r.phase_of("a"), TargetPhase::Failed);
        r.sandbox_reports("b", deploy_state::SUCCEEDED);
        r.step();
        assert_eq!(r.status.phase, Some(DeployPhase::Failed));
        assert_eq!((r.status.updated, r.status.failed), (1, 1));
    }

    #[test]
    fn approval_gate_and_abort() {
        let mut r = Run::new(spec(serde_json::json!({"paused": true})), &["a"]);
        let d = r.step();
        assert!(d.actions.is_empty());
        assert_eq!(r.status.phase, Some(DeployPhase::AwaitingApproval));
        r.spec.paused = false;
        assert_eq!(r.step().actions.len(), 1);
        let mut r = Run::new(spec(serde_json::json!({"paused": true})), &["a"]);
        r.step();
        r.abort = true;
        assert!(r.step().actions.is_empty());
        assert_eq!(r.status.phase, Some(DeployPhase::Aborted));
    }

    #[test]
    fn stopped_targets_are_deferred_and_do_not_block() {
        let mut r = Run::new(
            spec(serde_json::json!({"strategy": {"maxUnavailable": 1}})),
            &["a", "b"],
        );
        r.selected.get_mut("a").unwrap().running = false;
        r.observed.get_mut("a").unwrap().running = false;
        let d = r.step();
        assert_eq!(r.phase_of("a"), TargetPhase::Deferred);
        assert_eq!(
            d.actions.len(),
            1,
            "a still gets the tag for when it starts"
        );
        let d = r.step();
        assert_eq!(
            d.actions,
            vec![Action::SetTag {
                sandbox: "b".into(),
                tag: "v2".into(),
                attempt: "uid/0".into()
            }]
        );
    }

    #[test]
    fn deadline_fails_a_stuck_target() {
        let mut r = Run::new(
            spec(
                serde_json::json!({"strategy": {"targetDeadline": "1m", "failurePolicy": "Continue"}}),
            ),
            &["a"],
        );
        r.step();
        r.now = 61;
        r.step();
        assert_eq!(r.phase_of("a"), TargetPhase::Failed);
    }

    #[test]
    fn an_unreadable_duration_is_an_invalid_spec_naming_the_field_never_a_default() {
        // As stored before the CRD checked durations.
        let bad = spec(serde_json::json!({"strategy": {"targetDeadline": "15 minutes"}}));
        let e = validate(&bad).unwrap_err();
        assert_eq!(e.problems.len(), 1, "{e}");
        assert!(
            e.problems[0].starts_with("spec.strategy.targetDeadline: ")
                && e.problems[0].contains("\"15 minutes\"")
                && e.problems[0].contains("such as 30s, 5m or 1h30m"),
            "{e}"
        );
        let bad = spec(serde_json::json!({"strategy": {"drainTimeout": "5"}}));
        assert!(
            validate(&bad).unwrap_err().problems[0].starts_with("spec.strategy.drainTimeout: ")
        );

        // Before the rollout: nothing is set, Pending with Ready=False InvalidSpec, one Event.
        let mut r = Run::new(
            spec(serde_json::json!({"strategy": {"targetDeadline": "15 minutes"}})),
            &["a"],
        );
        let d = r.step();
        assert!(d.actions.is_empty() && r.status.targets.is_empty());
        assert_eq!(r.status.phase, Some(DeployPhase::Pending));
        let ready = conditions::get(&r.status.conditions, cond::READY).unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", INVALID_SPEC)
        );
        assert!(
            ready.message.contains("spec.strategy.targetDeadline"),
            "{}",
            ready.message
        );
        let progressing = conditions::get(&r.status.conditions, cond::PROGRESSING).unwrap();
        assert_eq!(progressing.reason, INVALID_SPEC);
        assert_eq!(d.notes.len(), 1);
        assert_eq!(d.notes[0].reason, INVALID_SPEC);
        assert!(
            r.step().notes.is_empty(),
            "one Event, not one per reconcile"
        );

        // Fixed, the rollout starts.
        r.spec.strategy.target_deadline = "1m".into();
        let d = r.step();
        assert_eq!(d.actions.len(), 1);
        let phase = r.phase_of("a");
        assert!(in_flight(phase), "{phase:?}");

        // Broken mid-rollout: no deadline is applied from a made-up value; the target is left
        // as it is, the phase kept, and the status says why.
        r.spec.strategy.target_deadline = "1 minute".into();
        r.now = 3600;
        let d = r.step();
        assert!(d.actions.is_empty());
        assert_eq!(r.phase_of("a"), phase);
        assert_eq!(r.status.phase, Some(DeployPhase::Progressing));
        let ready = conditions::get(&r.status.conditions, cond::READY).unwrap();
        assert_eq!(ready.reason, INVALID_SPEC);
        // Fixed again, the deadline it names applies.
        r.spec.strategy.target_deadline = "1m".into();
        r.step();
        assert_eq!(r.phase_of("a"), TargetPhase::Failed);
    }

    #[test]
    fn a_newer_deploy_supersedes_and_an_empty_selection_succeeds() {
        let mut r = Run::new(
            spec(serde_json::json!({"strategy": {"maxUnavailable": 1}})),
            &["a", "b"],
        );
        r.step();
        r.claimed.insert("b".into());
        r.observed.get_mut("a").unwrap().spec_tag = Some("v3".into());
        r.step();
        assert_eq!(
            (r.phase_of("a"), r.phase_of("b")),
            (TargetPhase::Superseded, TargetPhase::Superseded)
        );
        assert_eq!(r.status.phase, Some(DeployPhase::Superseded));
        let mut r = Run::new(spec(serde_json::json!({})), &[]);
        r.step();
        assert_eq!(r.status.phase, Some(DeployPhase::Succeeded));
        assert!(
            r.status
                .message
                .as_deref()
                .unwrap()
                .contains("matched no sandboxes")
        );
    }

    #[test]
    fn a_misspelt_operator_is_an_invalid_spec_not_an_empty_success() {
        // As stored before the CRD checked operators; the reconciler's selection is empty.
        let bad = spec(serde_json::json!({"selector": {"matchExpressions": [
            {"key": "tier", "operator": "Inn", "values": ["gold"]}
        ]}}));
        let mut r = Run::new(bad, &[]);
        let d = r.step();
        assert_eq!(r.status.phase, Some(DeployPhase::Pending));
        assert!(r.status.targets.is_empty() && d.actions.is_empty());
        assert_eq!(r.status.started_at, None, "the rollout has not started");
        let ready = conditions::get(&r.status.conditions, cond::READY).unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "InvalidSpec")
        );
        assert!(
            ready.message.contains("unknown operator \"Inn\"")
                && ready.message.contains("In, NotIn, Exists or DoesNotExist"),
            "{}",
            ready.message
        );
        assert_eq!(d.notes.len(), 1);
        assert_eq!(d.notes[0].reason, "InvalidSpec");
        assert!(
            r.step().notes.is_empty(),
            "one Event, not one per reconcile"
        );

        // Fixed (a spec edit), the rollout starts with what the selector picks.
        r.spec.selector.match_expressions[0].operator = "In".into();
        r.selected.insert("a".into(), obs("v1"));
        r.observed = r.selected.clone();
        let d = r.step();
        assert_eq!(r.status.phase, Some(DeployPhase::Progressing));
        assert_eq!(d.actions.len(), 1);
    }

    fn unhealthy(r: &mut Run, name: &str) {
        for m in [&mut r.selected, &mut r.observed] {
            let o = m.get_mut(name).unwrap();
            o.unhealthy = Some("phase Unhealthy: 3 consecutive probes failed".into());
            o.ready = false;
        }
    }

    #[test]
    fn an_unhealthy_sandbox_is_skipped_by_default_and_reported_never_as_updated() {
        let mut r = Run::new(
            spec(serde_json::json!({"strategy": {"maxUnavailable": 2}})),
            &["a", "b"],
        );
        unhealthy(&mut r, "b");
        let d = r.step();
        // Only a gets the tag; b is skipped, with an Event naming it and the way to include it.
        assert_eq!(
            d.actions,
            vec![Action::SetTag {
                sandbox: "a".into(),
                tag: "v2".into(),
                attempt: "uid/0".into()
            }]
        );
        assert_eq!(r.phase_of("b"), TargetPhase::Skipped);
        let skip = d
            .notes
            .iter()
            .find(|n| n.reason == "TargetSkipped")
            .unwrap();
        assert!(
            skip.warning && skip.message.contains("includeUnhealthy"),
            "{skip:?}"
        );
        assert_eq!(r.status.skipped, 1);
        r.sandbox_reports("a", deploy_state::SUCCEEDED);
        let d = r.step();
        assert_eq!(r.status.phase, Some(DeployPhase::Succeeded));
        assert_eq!(
            (r.status.updated, r.status.skipped, r.status.total),
            (1, 1, 2),
            "the skipped one is not counted as updated"
        );
        assert!(d.actions.is_empty(), "b never gets the tag");
        let msg = r.status.message.clone().unwrap();
        assert!(msg.contains("1 skipped") && msg.contains('b'), "{msg}");
        let complete = conditions::get(&r.status.conditions, cond::COMPLETE).unwrap();
        assert_eq!(complete.reason, "SucceededWithSkipped");
        let ready = conditions::get(&r.status.conditions, cond::READY).unwrap();
        assert_eq!(ready.reason, "SucceededWithSkipped");
        let progressing = conditions::get(&r.status.conditions, cond::PROGRESSING).unwrap();
        assert!(
            progressing.message.contains("1/2 updated")
                && progressing.message.contains("1 skipped"),
            "{}",
            progressing.message
        );
    }

    #[test]
    fn include_unhealthy_deploys_to_it_and_a_stopped_one_is_still_deferred() {
        let mut r = Run::new(
            spec(serde_json::json!({"strategy": {"maxUnavailable": 3, "includeUnhealthy": true}})),
            &["a", "b", "c"],
        );
        unhealthy(&mut r, "b");
        for m in [&mut r.selected, &mut r.observed] {
            m.get_mut("c").unwrap().running = false;
        }
        let d = r.step();
        assert_eq!(d.actions.len(), 3, "{:?}", d.actions);
        assert_eq!(r.phase_of("b"), TargetPhase::Draining);
        assert_eq!(r.phase_of("c"), TargetPhase::Deferred);
        assert_eq!(r.status.skipped, 0);
        r.sandbox_reports("a", deploy_state::SUCCEEDED);
        r.sandbox_reports("b", deploy_state::SUCCEEDED);
        r.step();
        assert_eq!(r.status.phase, Some(DeployPhase::Succeeded));
        assert_eq!(r.status.updated, 2);
        let complete = conditions::get(&r.status.conditions, cond::COMPLETE).unwrap();
        assert_eq!(complete.reason, "Succeeded");
    }

    #[test]
    fn a_sandbox_turned_unhealthy_before_its_wave_is_skipped_then() {
        let mut r = Run::new(
            spec(serde_json::json!({"strategy": {"maxUnavailable": 1}})),
            &["a", "b"],
        );
        r.step();
        assert_eq!(r.phase_of("b"), TargetPhase::Pending);
        // b turns unhealthy while a deploys: when its wave comes, it is skipped.
        r.observed.get_mut("b").unwrap().unhealthy = Some("phase Failed: InstanceNotFound".into());
        r.sandbox_reports("a", deploy_state::SUCCEEDED);
        let d = r.step();
        assert!(d.actions.is_empty(), "{:?}", d.actions);
        assert_eq!(r.phase_of("b"), TargetPhase::Skipped);
        r.step();
        assert_eq!(r.status.phase, Some(DeployPhase::Succeeded));
        assert_eq!((r.status.updated, r.status.skipped), (1, 1));
    }

    #[test]
    fn the_validate_step_parses_the_selector_once_and_names_the_field_when_it_cannot() {
        let bad = spec(serde_json::json!({"selector": {"matchExpressions": [
            {"key": "tier", "operator": "Exists", "values": ["x"]}
        ]}}));
        let v = validate_all(&bad);
        assert!(v.durations.is_ok());
        let e = v.selector.unwrap_err();
        assert_eq!(e.field, "spec.selector");
        assert!(
            e.problems[0].contains("operator Exists takes no values"),
            "{e}"
        );
        // Held before it starts, the message naming the field.
        let mut r = Run::new(bad, &[]);
        r.step();
        let ready = conditions::get(&r.status.conditions, cond::READY).unwrap();
        assert_eq!(ready.reason, INVALID_SPEC);
        assert!(
            ready
                .message
                .starts_with("invalid spec.selector: matchExpressions[0]"),
            "{}",
            ready.message
        );

        let good = spec(serde_json::json!({"selector": {
            "matchLabels": {"group": "web"},
            "matchExpressions": [{"key": "canary", "operator": "DoesNotExist"}],
            "environment": "staging",
        }}));
        let sel = validate_all(&good).selector.unwrap();
        let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        use crate::api::Environment;
        assert!(sel.matches(&labels(&[("group", "web")]), Environment::Staging));
        assert!(!sel.matches(&labels(&[("group", "web")]), Environment::Prod));
        assert!(!sel.matches(
            &labels(&[("group", "web"), ("canary", "1")]),
            Environment::Staging
        ));
    }
}
