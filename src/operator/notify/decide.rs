//! The notifier's decisions, as pure functions of plain data and a clock: what an object's status
//! says ([`Observation`]), which transitions between two observations are worth telling
//! ([`transitions`]), whether one sink sends a notice now ([`SinkGate`]: its event filter, its
//! duplicate window and its token bucket) and the bodies each kind of sink receives
//! ([`slack_body`], [`webhook_body`]), masked by the process redaction.
//!
//! No client, no timer and no I/O live here: the edge ([`super`]) watches the resources, keeps
//! the last observation of each object, and posts what this module returns.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use serde::Serialize;

use crate::api::conditions;
use crate::api::{DeployPhase, Sandbox, SandboxDeploy, SandboxPhase, SecretBundle, TargetPhase};
use crate::redact::Redaction;

/// The resources the notifier watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Kind {
    /// A rollout.
    SandboxDeploy,
    /// A sandbox.
    Sandbox,
    /// A secret bundle.
    SecretBundle,
}

impl Kind {
    /// The resource's kind, as Kubernetes spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::SandboxDeploy => "SandboxDeploy",
            Kind::Sandbox => "Sandbox",
            Kind::SecretBundle => "SecretBundle",
        }
    }
}

/// What a notification announces. The names follow the seeds' admin WebSocket events
/// (`deploy_ready`, `deploy_update`): snake_case, the subject first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Event {
    /// A rollout started its first wave (or started again on a retry).
    DeployStarted,
    /// A rollout was created paused and waits for approval.
    DeployAwaitingApproval,
    /// Every target of a rollout runs the new tag.
    DeploySucceeded,
    /// A rollout finished with failed targets.
    DeployFailed,
    /// A rollout stopped at a failure with targets left pending (failurePolicy Halt).
    DeployHalted,
    /// A target's deploy failed and the target was set back to its previous tag.
    DeployRolledBack,
    /// A rollout was aborted by annotation.
    DeployAborted,
    /// A sandbox's agent fails its probes or reports itself unhealthy.
    SandboxUnhealthy,
    /// A sandbox has a terminal problem that needs a person.
    SandboxFailed,
    /// A secret bundle could not be synced (a target failed, or its sources are unusable).
    SecretSyncFailed,
}

impl Event {
    /// Every event, in documentation order.
    pub const ALL: [Event; 10] = [
        Event::DeployStarted,
        Event::DeployAwaitingApproval,
        Event::DeploySucceeded,
        Event::DeployFailed,
        Event::DeployHalted,
        Event::DeployRolledBack,
        Event::DeployAborted,
        Event::SandboxUnhealthy,
        Event::SandboxFailed,
        Event::SecretSyncFailed,
    ];

    /// The event's name in configurations and payloads.
    pub fn as_str(self) -> &'static str {
        match self {
            Event::DeployStarted => "deploy_started",
            Event::DeployAwaitingApproval => "deploy_awaiting_approval",
            Event::DeploySucceeded => "deploy_succeeded",
            Event::DeployFailed => "deploy_failed",
            Event::DeployHalted => "deploy_halted",
            Event::DeployRolledBack => "deploy_rolled_back",
            Event::DeployAborted => "deploy_aborted",
            Event::SandboxUnhealthy => "sandbox_unhealthy",
            Event::SandboxFailed => "sandbox_failed",
            Event::SecretSyncFailed => "secret_sync_failed",
        }
    }

    /// The event named `s`, or an error listing the names there are.
    pub fn parse(s: &str) -> Result<Event, String> {
        Event::ALL
            .into_iter()
            .find(|e| e.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown event {s:?}; the events are {}",
                    Event::ALL.map(Event::as_str).join(", ")
                )
            })
    }

    /// Whether it is bad news.
    pub fn warning(self) -> bool {
        !matches!(
            self,
            Event::DeployStarted | Event::DeployAwaitingApproval | Event::DeploySucceeded
        )
    }
}

/// Where an object is, as far as notifications go: the facts transitions are found in.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observation {
    /// The phase (deploy or sandbox), as its API spells it.
    pub phase: Option<String>,
    /// A rollout: it has started (its `startedAt` is set).
    pub started: bool,
    /// A rollout: the targets rolled back.
    pub rolled_back: BTreeSet<String>,
    /// A rollout: a failure left targets pending (halted).
    pub halted: bool,
    /// A secret bundle: the reason it is failing, when it is.
    pub failing: Option<String>,
    /// The reason and message that explain the current state (a condition's, or the status's).
    pub reason: Option<String>,
    /// The message.
    pub message: Option<String>,
    /// Facts a notice carries along (the tag, counts).
    pub details: BTreeMap<String, serde_json::Value>,
    /// Per rolled-back target, what happened to it.
    pub target_messages: BTreeMap<String, String>,
}

fn phase_name<T: std::fmt::Debug>(p: Option<T>) -> Option<String> {
    p.map(|p| format!("{p:?}"))
}

/// What a SandboxDeploy's status says.
pub fn observe_deploy(d: &SandboxDeploy) -> Observation {
    let st = d.status.clone().unwrap_or_default();
    let mut o = Observation {
        phase: phase_name(st.phase),
        started: st.started_at.is_some(),
        halted: st.phase == Some(DeployPhase::Failed)
            && st.targets.iter().any(|t| t.phase == TargetPhase::Pending),
        message: st.message.clone(),
        ..Default::default()
    };
    for t in &st.targets {
        if t.phase == TargetPhase::RolledBack {
            o.rolled_back.insert(t.name.clone());
            if let Some(m) = &t.message {
                o.target_messages.insert(t.name.clone(), m.clone());
            }
        }
    }
    let key = match st.phase {
        Some(DeployPhase::Failed | DeployPhase::Succeeded | DeployPhase::Aborted) => "Ready",
        _ => "Progressing",
    };
    o.reason = conditions::get(&st.conditions, key).map(|c| c.reason.clone());
    o.details
        .insert("tag".into(), d.spec.image.tag.clone().into());
    o.details.insert("total".into(), st.total.into());
    o.details.insert("updated".into(), st.updated.into());
    o.details.insert("failed".into(), st.failed.into());
    if let Some(s) = &d.spec.source
        && let Some(sha) = &s.commit_sha
    {
        o.details.insert("commitSha".into(), sha.clone().into());
    }
    o
}

/// What a Sandbox's status says.
pub fn observe_sandbox(s: &Sandbox) -> Observation {
    let st = s.status.clone().unwrap_or_default();
    let ready = conditions::get(&st.conditions, "Ready");
    let mut o = Observation {
        phase: phase_name(st.phase),
        ..Default::default()
    };
    if st.phase == Some(SandboxPhase::Failed) && st.failure_reason.is_some() {
        o.reason = st.failure_reason.clone();
        o.message = st.failure_message.clone();
    } else {
        o.reason = ready.map(|c| c.reason.clone());
        o.message = ready.map(|c| c.message.clone());
    }
    o.details
        .insert("environment".into(), s.spec.environment.as_str().into());
    if let Some(i) = &st.instance {
        o.details.insert("instanceId".into(), i.id.clone().into());
    }
    o
}

/// The Ready reasons of a SecretBundle that mean its content did not reach its targets (or
/// could not be built). Fly.io's API answers that name their failure (every failing target
/// refused the same way) count too; throttling is retried and is not told.
pub const BUNDLE_FAILING_REASONS: [&str; 11] = [
    "SyncFailed",
    "SourceSecretMissing",
    "SourceKeyMissing",
    "InvalidValue",
    "InvalidSpec",
    "NoKeys",
    "FlyUnauthorized",
    "FlyAppNotFound",
    "FlyRejected",
    "FlyUnavailable",
    "FlyUnreachable",
];

/// What a SecretBundle's status says.
pub fn observe_bundle(b: &SecretBundle) -> Observation {
    let st = b.status.clone().unwrap_or_default();
    let ready = conditions::get(&st.conditions, "Ready");
    let failing = ready
        .filter(|c| {
            c.status == conditions::FALSE && BUNDLE_FAILING_REASONS.contains(&c.reason.as_str())
        })
        .map(|c| c.reason.clone());
    let mut o = Observation {
        failing,
        phase: ready.map(|c| c.reason.clone()),
        reason: ready.map(|c| c.reason.clone()),
        message: ready.map(|c| c.message.clone()),
        ..Default::default()
    };
    o.details
        .insert("syncedTargets".into(), st.synced_targets.into());
    o.details
        .insert("totalTargets".into(), st.total_targets.into());
    o
}

/// One object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    /// Its kind.
    pub kind: Kind,
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

/// Something to tell.
#[derive(Clone, Debug, PartialEq)]
pub struct Notice {
    /// The object.
    pub object: ObjectKey,
    /// What happened.
    pub event: Event,
    /// A rollout's target it is about (a rollback), if any.
    pub target: Option<String>,
    /// A CamelCase reason.
    pub reason: String,
    /// What happened, in words.
    pub message: String,
    /// When it was noticed.
    pub at: Timestamp,
    /// The tag, counts and such.
    pub details: BTreeMap<String, serde_json::Value>,
}

impl Notice {
    /// What the duplicate window is kept by: the object, the event and the target.
    pub fn dedup_key(&self) -> String {
        format!(
            "{}/{}/{}/{}/{}",
            self.object.kind.as_str(),
            self.object.namespace,
            self.object.name,
            self.event.as_str(),
            self.target.as_deref().unwrap_or("")
        )
    }
}

/// The notices for an object going from `old` (None: seen for the first time since the
/// notifier started watching it) to `new`.
pub fn transitions(
    object: &ObjectKey,
    old: Option<&Observation>,
    new: &Observation,
    now: Timestamp,
) -> Vec<Notice> {
    let empty = Observation::default();
    let old = old.unwrap_or(&empty);
    let mut out = Vec::new();
    let notice = |event: Event, target: Option<String>, reason: String, message: String| Notice {
        object: object.clone(),
        event,
        target,
        reason,
        message,
        at: now,
        details: new.details.clone(),
    };
    let into = |p: &str| new.phase.as_deref() == Some(p) && old.phase.as_deref() != Some(p);
    let reason = |fallback: &str| new.reason.clone().unwrap_or_else(|| fallback.to_string());
    let message = new.message.clone().unwrap_or_default();
    let name = format!("{}/{}", object.namespace, object.name);
    match object.kind {
        Kind::SandboxDeploy => {
            let tag = new
                .details
                .get("tag")
                .and_then(|t| t.as_str())
                .unwrap_or("?")
                .to_string();
            let count = |k: &str| new.details.get(k).and_then(|v| v.as_i64()).unwrap_or(0);
            if into("AwaitingApproval") {
                out.push(notice(
                    Event::DeployAwaitingApproval,
                    None,
                    "AwaitingApproval".into(),
                    format!("rollout {name} of {tag} is waiting for approval ({message})"),
                ));
            }
            let retried = matches!(old.phase.as_deref(), Some("Failed"))
                && new.phase.as_deref() == Some("Progressing");
            if new.started && (!old.started || retried) {
                out.push(notice(
                    Event::DeployStarted,
                    None,
                    if retried {
                        "Retrying"
                    } else {
                        "RolloutStarted"
                    }
                    .into(),
                    format!(
                        "rollout {name} of {tag} started: {} targets",
                        count("total")
                    ),
                ));
            }
            for t in new.rolled_back.difference(&old.rolled_back) {
                let why = new.target_messages.get(t).cloned().unwrap_or_default();
                out.push(notice(
                    Event::DeployRolledBack,
                    Some(t.clone()),
                    "TargetRolledBack".into(),
                    format!("rollout {name} of {tag}: {t} was rolled back: {why}"),
                ));
            }
            let counts = format!(
                "{}/{} updated, {} failed",
                count("updated"),
                count("total"),
                count("failed")
            );
            if into("Succeeded") {
                out.push(notice(
                    Event::DeploySucceeded,
                    None,
                    reason("Succeeded"),
                    format!("rollout {name} of {tag} succeeded: {counts}"),
                ));
            }
            if into("Failed") {
                let (event, what) = if new.halted {
                    (Event::DeployHalted, "halted")
                } else {
                    (Event::DeployFailed, "failed")
                };
                out.push(notice(
                    event,
                    None,
                    if new.halted {
                        "Halted".into()
                    } else {
                        reason("Failed")
                    },
                    format!("rollout {name} of {tag} {what}: {counts}; {message}"),
                ));
            }
            if into("Aborted") {
                out.push(notice(
                    Event::DeployAborted,
                    None,
                    "Aborted".into(),
                    format!("rollout {name} of {tag} aborted: {counts}; {message}"),
                ));
            }
        }
        Kind::Sandbox => {
            if into("Unhealthy") {
                out.push(notice(
                    Event::SandboxUnhealthy,
                    None,
                    reason("Unhealthy"),
                    format!("sandbox {name} is unhealthy: {message}"),
                ));
            }
            if into("Failed") {
                out.push(notice(
                    Event::SandboxFailed,
                    None,
                    reason("Failed"),
                    format!("sandbox {name} failed: {message}"),
                ));
            }
        }
        Kind::SecretBundle => {
            if let Some(why) = &new.failing
                && old.failing.as_ref() != Some(why)
            {
                out.push(notice(
                    Event::SecretSyncFailed,
                    None,
                    why.clone(),
                    format!("secret bundle {name} failed to sync: {message}"),
                ));
            }
        }
    }
    out
}

/// The Ready reasons of a SecretBundle that settle nothing: a push round under way, after which
/// it is synced or failing again.
pub const BUNDLE_UNSETTLED_REASONS: [&str; 1] = ["Syncing"];

/// What to remember of `new`: a secret bundle that is pushing again ([`BUNDLE_UNSETTLED_REASONS`])
/// is still failing if it was (its retry is no recovery, and the same failure after it is no
/// news); anything else is remembered as seen.
pub fn settle(kind: Kind, old: Option<&Observation>, mut new: Observation) -> Observation {
    if kind == Kind::SecretBundle
        && new.failing.is_none()
        && new
            .phase
            .as_deref()
            .is_some_and(|p| BUNDLE_UNSETTLED_REASONS.contains(&p))
        && let Some(old) = old
    {
        new.failing = old.failing.clone();
    }
    new
}

/// What the notifier remembers of the objects it watches, and the notices their changes make.
#[derive(Debug, Default)]
pub struct Memory {
    last: BTreeMap<ObjectKey, Observation>,
    listing: BTreeMap<Kind, BTreeSet<ObjectKey>>,
}

impl Memory {
    /// How many objects it remembers.
    pub fn len(&self) -> usize {
        self.last.len()
    }

    /// Whether it remembers none.
    pub fn is_empty(&self) -> bool {
        self.last.is_empty()
    }

    /// A (re)list of `kind` begins.
    pub fn list_started(&mut self, kind: Kind) {
        self.listing.insert(kind, BTreeSet::new());
    }

    /// An object seen during a list: one the notifier knew is compared with what it knew (a
    /// change missed while the watch was down is told); one it did not know is recorded
    /// without a notice, so a restart does not announce again what was true before it.
    pub fn listed(&mut self, key: ObjectKey, new: Observation, now: Timestamp) -> Vec<Notice> {
        if let Some(seen) = self.listing.get_mut(&key.kind) {
            seen.insert(key.clone());
        }
        match self.last.get(&key) {
            Some(old) => {
                let new = settle(key.kind, Some(old), new);
                let out = transitions(&key, Some(old), &new, now);
                self.last.insert(key, new);
                out
            }
            None => {
                self.last.insert(key, new);
                Vec::new()
            }
        }
    }

    /// The list of `kind` is complete: objects not in it are gone.
    pub fn list_done(&mut self, kind: Kind) {
        if let Some(seen) = self.listing.remove(&kind) {
            self.last.retain(|k, _| k.kind != kind || seen.contains(k));
        }
    }

    /// An object changed (or appeared) while watching: the notices of its transition.
    pub fn changed(&mut self, key: ObjectKey, new: Observation, now: Timestamp) -> Vec<Notice> {
        let new = settle(key.kind, self.last.get(&key), new);
        let out = transitions(&key, self.last.get(&key), &new, now);
        self.last.insert(key, new);
        out
    }

    /// An object was deleted.
    pub fn deleted(&mut self, key: &ObjectKey) {
        self.last.remove(key);
    }
}

/// A token bucket: `capacity` notices at once, refilled at `per_second`.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    capacity: f64,
    per_second: f64,
    tokens: f64,
    last: Option<Timestamp>,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(capacity: u32, per_second: f64) -> Self {
        Self {
            capacity: f64::from(capacity.max(1)),
            per_second: per_second.max(0.0),
            tokens: f64::from(capacity.max(1)),
            last: None,
        }
    }

    /// Takes a token if there is one.
    pub fn take(&mut self, now: Timestamp) -> bool {
        if let Some(last) = self.last {
            let dt = (now.as_millisecond() - last.as_millisecond()).max(0) as f64 / 1000.0;
            self.tokens = (self.tokens + dt * self.per_second).min(self.capacity);
        }
        self.last = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Whether a sink sends a notice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Send it.
    Send,
    /// The sink's event filter does not list it (not counted).
    Filtered,
    /// The same object and event were sent within the duplicate window.
    Duplicate,
    /// The sink's token bucket is empty.
    RateLimited,
}

impl Verdict {
    /// The `result` label of the notifications metric (None: not counted).
    pub fn result(self) -> Option<&'static str> {
        match self {
            Verdict::Send | Verdict::Filtered => None,
            Verdict::Duplicate => Some("deduplicated"),
            Verdict::RateLimited => Some("rate_limited"),
        }
    }
}

/// One sink's filter, duplicate window and rate limit.
#[derive(Clone, Debug)]
pub struct SinkGate {
    events: Option<BTreeSet<Event>>,
    window: Duration,
    sent: BTreeMap<String, Timestamp>,
    bucket: TokenBucket,
}

impl SinkGate {
    /// A gate passing `events` (None: every event), sending the same object and event once per
    /// `window`, at most `bucket` allows.
    pub fn new(events: Option<BTreeSet<Event>>, window: Duration, bucket: TokenBucket) -> Self {
        Self {
            events,
            window,
            sent: BTreeMap::new(),
            bucket,
        }
    }

    /// Whether to send `n` now; a notice let through is remembered for the window.
    pub fn verdict(&mut self, n: &Notice, now: Timestamp) -> Verdict {
        if self.events.as_ref().is_some_and(|e| !e.contains(&n.event)) {
            return Verdict::Filtered;
        }
        let window_ms = self.window.as_millis() as i64;
        self.sent
            .retain(|_, at| now.as_millisecond() - at.as_millisecond() < window_ms);
        let key = n.dedup_key();
        if self.sent.contains_key(&key) {
            return Verdict::Duplicate;
        }
        if !self.bucket.take(now) {
            return Verdict::RateLimited;
        }
        self.sent.insert(key, now);
        Verdict::Send
    }
}

/// The body a generic JSON webhook receives (documented in the README).
#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
pub struct WebhookBody<'a> {
    /// The payload's version.
    pub version: u32,
    /// `SandboxDeploy`, `Sandbox` or `SecretBundle`.
    pub kind: &'a str,
    /// The namespace.
    pub namespace: &'a str,
    /// The name.
    pub name: &'a str,
    /// The event (`deploy_failed`, ...).
    pub event: &'a str,
    /// `info` or `warning`.
    pub severity: &'a str,
    /// A CamelCase reason.
    pub reason: &'a str,
    /// What happened.
    pub message: &'a str,
    /// A rollout's target (rollbacks).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<&'a str>,
    /// RFC 3339, UTC.
    pub timestamp: String,
    /// The tag, counts and such.
    pub details: &'a BTreeMap<String, serde_json::Value>,
}

fn severity(e: Event) -> &'static str {
    if e.warning() { "warning" } else { "info" }
}

/// `v` with every string in it masked.
fn mask_value(v: &serde_json::Value, redaction: &Redaction) -> serde_json::Value {
    use serde_json::Value;
    match v {
        Value::String(s) => Value::String(redaction.redact(s)),
        Value::Array(a) => Value::Array(a.iter().map(|x| mask_value(x, redaction)).collect()),
        Value::Object(o) => Value::Object(
            o.iter()
                .map(|(k, x)| (redaction.redact(k), mask_value(x, redaction)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// `n` with every known secret masked in each of its texts. Each text is masked on its own,
/// before any encoding: masking a rendered JSON document would let a `KEY=` rule swallow the
/// rest of its line, the closing quotes and braces included.
pub fn masked(n: &Notice, redaction: &Redaction) -> Notice {
    let r = |s: &str| redaction.redact(s);
    Notice {
        object: ObjectKey {
            kind: n.object.kind,
            namespace: r(&n.object.namespace),
            name: r(&n.object.name),
        },
        event: n.event,
        target: n.target.as_deref().map(r),
        reason: r(&n.reason),
        message: r(&n.message),
        at: n.at,
        details: n
            .details
            .iter()
            .map(|(k, v)| (r(k), mask_value(v, redaction)))
            .collect(),
    }
}

/// The generic webhook's JSON body for `n`, every known secret masked.
pub fn webhook_body(n: &Notice, redaction: &Redaction) -> String {
    let n = &masked(n, redaction);
    let body = WebhookBody {
        version: 1,
        kind: n.object.kind.as_str(),
        namespace: &n.object.namespace,
        name: &n.object.name,
        event: n.event.as_str(),
        severity: severity(n.event),
        reason: &n.reason,
        message: &n.message,
        target: n.target.as_deref(),
        timestamp: n.at.to_string(),
        details: &n.details,
    };
    serde_json::to_string(&body).unwrap_or_default()
}

/// Escapes Slack's three control characters in text.
fn slack_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The one-line text of a notice (Slack's `text`, the fallback of its blocks).
pub fn text(n: &Notice) -> String {
    let mark = if n.event.warning() {
        "[warning]"
    } else {
        "[info]"
    };
    format!("{mark} {} ({})", n.message, n.event.as_str())
}

/// A Slack-compatible incoming webhook's JSON body for `n` (`text`, and `blocks` with the
/// message and a context line), every known secret masked.
pub fn slack_body(n: &Notice, redaction: &Redaction) -> String {
    let n = &masked(n, redaction);
    let text = slack_escape(&text(n));
    let context = slack_escape(&format!(
        "{} {}/{} · {} · {} · {}",
        n.object.kind.as_str(),
        n.object.namespace,
        n.object.name,
        n.event.as_str(),
        n.reason,
        n.at
    ));
    let body = serde_json::json!({
        "text": text,
        "blocks": [
            {"type": "section", "text": {"type": "mrkdwn", "text": text}},
            {"type": "context", "elements": [{"type": "mrkdwn", "text": context}]},
        ],
    });
    body.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::redact::{MASK, Secrets};

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn key(kind: Kind, name: &str) -> ObjectKey {
        ObjectKey {
            kind,
            namespace: "fleet".into(),
            name: name.into(),
        }
    }

    fn deploy(phase: Option<&str>, started: bool) -> Observation {
        let mut o = Observation {
            phase: phase.map(str::to_string),
            started,
            ..Default::default()
        };
        o.details.insert("tag".into(), "v2".into());
        o.details.insert("total".into(), 3.into());
        o.details.insert("updated".into(), 2.into());
        o.details.insert("failed".into(), 1.into());
        o
    }

    fn events(n: &[Notice]) -> Vec<&'static str> {
        n.iter().map(|n| n.event.as_str()).collect()
    }

    #[test]
    fn a_rollout_tells_its_start_approval_end_and_rollbacks_once_each() {
        let now = at("2026-03-01T12:00:00Z");
        let k = key(Kind::SandboxDeploy, "web-v2");
        let pending = deploy(Some("Pending"), false);
        let waiting = deploy(Some("AwaitingApproval"), false);
        assert_eq!(
            events(&transitions(&k, Some(&pending), &waiting, now)),
            ["deploy_awaiting_approval"]
        );
        assert!(transitions(&k, Some(&waiting), &waiting, now).is_empty());
        let running = deploy(Some("Progressing"), true);
        assert_eq!(
            events(&transitions(&k, Some(&waiting), &running, now)),
            ["deploy_started"]
        );
        let mut rolled = running.clone();
        rolled.rolled_back.insert("w1".into());
        rolled
            .target_messages
            .insert("w1".into(), "health check failed; set back to v1".into());
        let n = transitions(&k, Some(&running), &rolled, now);
        assert_eq!(events(&n), ["deploy_rolled_back"]);
        assert_eq!(n[0].target.as_deref(), Some("w1"));
        assert!(
            n[0].message.contains("health check failed"),
            "{}",
            n[0].message
        );
        // Still rolled back on the next look: nothing new.
        assert!(transitions(&k, Some(&rolled), &rolled, now).is_empty());
        let mut failed = rolled.clone();
        failed.phase = Some("Failed".into());
        failed.halted = true;
        let n = transitions(&k, Some(&rolled), &failed, now);
        assert_eq!(events(&n), ["deploy_halted"]);
        assert!(
            n[0].message.contains("2/3 updated, 1 failed"),
            "{}",
            n[0].message
        );
        failed.halted = false;
        assert_eq!(
            events(&transitions(&k, Some(&rolled), &failed, now)),
            ["deploy_failed"]
        );
        // A retry starts it again.
        assert_eq!(
            events(&transitions(&k, Some(&failed), &running, now)),
            ["deploy_started"]
        );
        let done = deploy(Some("Succeeded"), true);
        let n = transitions(&k, Some(&running), &done, now);
        assert_eq!(events(&n), ["deploy_succeeded"]);
        assert_eq!(n[0].details["tag"], "v2");
        // Seen for the first time already started and finished: both told (a rollout faster
        // than the watch).
        assert_eq!(
            events(&transitions(&k, None, &done, now)),
            ["deploy_started", "deploy_succeeded"]
        );
        let aborted = deploy(Some("Aborted"), true);
        assert_eq!(
            events(&transitions(&k, Some(&running), &aborted, now)),
            ["deploy_aborted"]
        );
    }

    #[test]
    fn a_sandbox_tells_unhealthy_and_failed_not_recovery() {
        let now = at("2026-03-01T12:00:00Z");
        let k = key(Kind::Sandbox, "w1");
        let ph = |p: &str, r: &str| Observation {
            phase: Some(p.into()),
            reason: Some(r.into()),
            message: Some(format!("{r} says so")),
            ..Default::default()
        };
        let active = ph("Active", "Healthy");
        let sick = ph("Unhealthy", "AgentUnreachable");
        let n = transitions(&k, Some(&active), &sick, now);
        assert_eq!(events(&n), ["sandbox_unhealthy"]);
        assert_eq!(n[0].reason, "AgentUnreachable");
        assert!(
            n[0].message.contains("fleet/w1") && n[0].message.contains("AgentUnreachable says so")
        );
        assert!(transitions(&k, Some(&sick), &sick, now).is_empty());
        assert!(transitions(&k, Some(&sick), &active, now).is_empty());
        assert_eq!(
            events(&transitions(
                &k,
                Some(&sick),
                &ph("Failed", "InstanceTerminated"),
                now
            )),
            ["sandbox_failed"]
        );
        assert!(transitions(&k, Some(&active), &ph("Deploying", "Deploying"), now).is_empty());
    }

    #[test]
    fn a_bundle_refused_by_fly_reads_failing_and_a_throttled_one_does_not() {
        let example = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/secretbundle.yaml"
        ))
        .unwrap();
        let doc = example
            .split("\n---")
            .find(|d| d.contains("kind: SecretBundle"))
            .expect("the example holds a SecretBundle");
        let mut b: SecretBundle = serde_yaml::from_str(doc).unwrap();
        let with_ready = |b: &mut SecretBundle, status: &str, reason: &str| {
            b.status = Some(crate::api::SecretBundleStatus {
                conditions: vec![k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
                    type_: "Ready".into(),
                    status: status.into(),
                    reason: reason.into(),
                    message: "1 of 1 targets".into(),
                    last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(at(
                        "2026-03-01T12:00:00Z",
                    )),
                    observed_generation: None,
                }],
                ..Default::default()
            });
        };
        for reason in [
            "FlyUnauthorized",
            "FlyAppNotFound",
            "FlyRejected",
            "FlyUnavailable",
            "FlyUnreachable",
            "SyncFailed",
        ] {
            with_ready(&mut b, "False", reason);
            assert_eq!(
                observe_bundle(&b).failing.as_deref(),
                Some(reason),
                "{reason}"
            );
        }
        for (status, reason) in [
            ("False", "FlyThrottled"),
            ("False", "Syncing"),
            ("True", "Staged"),
        ] {
            with_ready(&mut b, status, reason);
            assert_eq!(observe_bundle(&b).failing, None, "{status} {reason}");
        }
    }

    #[test]
    fn a_bundle_tells_a_new_failure_reason_once() {
        let now = at("2026-03-01T12:00:00Z");
        let k = key(Kind::SecretBundle, "gh");
        let ok = Observation::default();
        let bad = |r: &str| Observation {
            failing: Some(r.into()),
            message: Some("1 of 2 targets failed".into()),
            ..Default::default()
        };
        let n = transitions(&k, Some(&ok), &bad("SyncFailed"), now);
        assert_eq!(events(&n), ["secret_sync_failed"]);
        assert_eq!(n[0].reason, "SyncFailed");
        assert!(transitions(&k, Some(&bad("SyncFailed")), &bad("SyncFailed"), now).is_empty());
        assert_eq!(
            events(&transitions(
                &k,
                Some(&bad("SyncFailed")),
                &bad("SourceKeyMissing"),
                now
            )),
            ["secret_sync_failed"]
        );
    }

    #[test]
    fn a_bundle_pushing_again_is_still_failing_and_its_same_failure_is_no_news() {
        let now = at("2026-03-01T12:00:00Z");
        let k = key(Kind::SecretBundle, "gh");
        let ready = |r: &str, failing: bool| Observation {
            phase: Some(r.into()),
            reason: Some(r.into()),
            failing: failing.then(|| r.to_string()),
            ..Default::default()
        };
        let mut m = Memory::default();
        m.list_started(Kind::SecretBundle);
        m.listed(k.clone(), ready("SyncFailed", true), now);
        m.list_done(Kind::SecretBundle);
        // A retry round (after a restart, or the backoff's next try) fails the same way.
        assert!(
            m.changed(k.clone(), ready("Syncing", false), now)
                .is_empty()
        );
        assert!(
            m.changed(k.clone(), ready("SyncFailed", true), now)
                .is_empty()
        );
        // Synced is a recovery: the next failure is news.
        assert!(m.changed(k.clone(), ready("Synced", false), now).is_empty());
        assert!(
            m.changed(k.clone(), ready("Syncing", false), now)
                .is_empty()
        );
        assert_eq!(
            events(&m.changed(k.clone(), ready("SyncFailed", true), now)),
            ["secret_sync_failed"]
        );
    }

    #[test]
    fn a_list_at_start_records_without_telling_and_a_relist_tells_what_was_missed() {
        let now = at("2026-03-01T12:00:00Z");
        let mut m = Memory::default();
        let k = key(Kind::SandboxDeploy, "web-v2");
        let failed = deploy(Some("Failed"), true);
        m.list_started(Kind::SandboxDeploy);
        assert!(
            m.listed(k.clone(), failed.clone(), now).is_empty(),
            "a restart re-announces nothing"
        );
        m.list_done(Kind::SandboxDeploy);
        assert_eq!(m.len(), 1);
        // A retry while watching.
        let running = deploy(Some("Progressing"), true);
        assert_eq!(
            events(&m.changed(k.clone(), running, now)),
            ["deploy_started"]
        );
        // The watch restarts: the change missed meanwhile is told; an object gone is forgotten.
        let other = key(Kind::SandboxDeploy, "gone");
        m.changed(other.clone(), deploy(Some("Pending"), false), now);
        m.list_started(Kind::SandboxDeploy);
        assert_eq!(
            events(&m.listed(k.clone(), deploy(Some("Succeeded"), true), now)),
            ["deploy_succeeded"]
        );
        m.list_done(Kind::SandboxDeploy);
        assert_eq!(m.len(), 1, "the object missing from the list is forgotten");
        // A new object, first seen while watching, is compared with nothing.
        let sb = key(Kind::Sandbox, "w1");
        let sick = Observation {
            phase: Some("Unhealthy".into()),
            ..Default::default()
        };
        assert_eq!(
            events(&m.changed(sb.clone(), sick, now)),
            ["sandbox_unhealthy"]
        );
        m.deleted(&sb);
        assert_eq!(m.len(), 1);
    }

    fn notice(name: &str, event: Event, at_: Timestamp) -> Notice {
        Notice {
            object: key(Kind::SandboxDeploy, name),
            event,
            target: None,
            reason: "R".into(),
            message: "m".into(),
            at: at_,
            details: BTreeMap::new(),
        }
    }

    #[test]
    fn a_gate_filters_deduplicates_within_its_window_and_rate_limits() {
        let t0 = at("2026-03-01T12:00:00Z");
        let plus = |ms: i64| Timestamp::from_millisecond(t0.as_millisecond() + ms).unwrap();
        let mut g = SinkGate::new(
            Some([Event::DeployFailed, Event::DeployStarted].into()),
            Duration::from_secs(60),
            TokenBucket::new(2, 0.5),
        );
        assert_eq!(
            g.verdict(&notice("a", Event::DeploySucceeded, t0), t0),
            Verdict::Filtered
        );
        assert_eq!(
            g.verdict(&notice("a", Event::DeployFailed, t0), t0),
            Verdict::Send
        );
        assert_eq!(
            g.verdict(&notice("a", Event::DeployFailed, plus(1000)), plus(1000)),
            Verdict::Duplicate
        );
        // Another object, another event: not duplicates.
        assert_eq!(
            g.verdict(&notice("b", Event::DeployFailed, t0), t0),
            Verdict::Send
        );
        // The bucket (2, refilled at 0.5/s) is empty now.
        assert_eq!(
            g.verdict(&notice("c", Event::DeployStarted, plus(100)), plus(100)),
            Verdict::RateLimited
        );
        assert_eq!(
            g.verdict(&notice("c", Event::DeployStarted, plus(2100)), plus(2100)),
            Verdict::Send,
            "one token back after 2 s"
        );
        // Past the window the same notice goes again.
        assert_eq!(
            g.verdict(
                &notice("a", Event::DeployFailed, plus(61_000)),
                plus(61_000)
            ),
            Verdict::Send
        );
        // A rate-limited notice is not remembered as sent.
        let mut g = SinkGate::new(None, Duration::from_secs(60), TokenBucket::new(1, 0.0));
        assert_eq!(
            g.verdict(&notice("a", Event::DeployStarted, t0), t0),
            Verdict::Send
        );
        assert_eq!(
            g.verdict(&notice("b", Event::DeployStarted, t0), t0),
            Verdict::RateLimited
        );
        assert_eq!(
            g.verdict(&notice("b", Event::DeployStarted, t0), t0),
            Verdict::RateLimited
        );
    }

    #[test]
    fn event_names_parse_and_unknown_ones_list_the_known() {
        for e in Event::ALL {
            assert_eq!(Event::parse(e.as_str()), Ok(e));
        }
        let err = Event::parse("deploy_exploded").unwrap_err();
        assert!(
            err.contains("deploy_failed") && err.contains("secret_sync_failed"),
            "{err}"
        );
    }

    #[test]
    fn bodies_carry_the_fields_and_never_a_secret_canary() {
        let canary = "canary-Zq8-\"quoted\"-value";
        let redaction = Redaction::of([&Secrets::new(["API_KEY"], [canary])]);
        let mut n = notice("web-v2", Event::DeployFailed, at("2026-03-01T12:00:00Z"));
        // A `KEY=` line in a message masks the rest of that text, never the body around it.
        n.message = format!("agent said: {canary} <&> | API_KEY=short");
        n.reason = "TargetFailed".into();
        n.details.insert("tag".into(), "v2".into());
        n.details.insert("leak".into(), canary.into());
        let generic = webhook_body(&n, &redaction);
        let slack = slack_body(&n, &redaction);
        for (what, body) in [("webhook", &generic), ("slack", &slack)] {
            for form in crate::redact::forms(canary) {
                assert!(
                    !body.contains(&form),
                    "{what} body carries the canary as {form:?}: {body}"
                );
            }
            assert!(body.contains(MASK), "{what}: {body}");
        }
        let g: serde_json::Value = serde_json::from_str(&generic).unwrap();
        assert_eq!(
            g["message"],
            format!("agent said: {MASK} <&> | API_KEY={MASK}")
        );
        assert_eq!(g["details"]["leak"], MASK);
        assert_eq!(g["version"], 1);
        assert_eq!(g["kind"], "SandboxDeploy");
        assert_eq!(g["namespace"], "fleet");
        assert_eq!(g["name"], "web-v2");
        assert_eq!(g["event"], "deploy_failed");
        assert_eq!(g["severity"], "warning");
        assert_eq!(g["reason"], "TargetFailed");
        assert_eq!(g["timestamp"], "2026-03-01T12:00:00Z");
        assert_eq!(g["details"]["tag"], "v2");
        assert!(g.get("target").is_none());
        let s: serde_json::Value = serde_json::from_str(&slack).unwrap();
        let text = s["text"].as_str().unwrap();
        assert!(text.starts_with("[warning] agent said: "), "{text}");
        assert!(
            text.contains("&lt;&amp;&gt;") && text.contains("(deploy_failed)"),
            "{text}"
        );
        assert_eq!(s["blocks"][0]["text"]["text"], text);
        assert!(
            s["blocks"][1]["elements"][0]["text"]
                .as_str()
                .unwrap()
                .contains("SandboxDeploy fleet/web-v2")
        );
    }
}
