//! The plan step: each target's standing (the content it holds, its retry state, whether it
//! can take a push now) and which targets to push in this round.

use super::*;

// ---------------------------------------------------------------------------------------------
// Targets.
// ---------------------------------------------------------------------------------------------

/// A target's identity.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TargetKey {
    /// A Sandbox, by name.
    Sandbox(String),
    /// A Fly.io app, by name.
    FlyApp(String),
}

impl TargetKey {
    /// The kind, as status names it.
    pub fn kind(&self) -> BundleTargetKind {
        match self {
            TargetKey::Sandbox(_) => BundleTargetKind::Sandbox,
            TargetKey::FlyApp(_) => BundleTargetKind::FlyApp,
        }
    }

    /// The Sandbox's or the app's name.
    pub fn name(&self) -> &str {
        match self {
            TargetKey::Sandbox(n) | TargetKey::FlyApp(n) => n,
        }
    }

    fn of(entry: &BundleTargetStatus) -> TargetKey {
        match entry.kind {
            BundleTargetKind::Sandbox => TargetKey::Sandbox(entry.name.clone()),
            BundleTargetKind::FlyApp => TargetKey::FlyApp(entry.name.clone()),
        }
    }
}

impl fmt::Display for TargetKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TargetKey::Sandbox(n) => write!(f, "sandbox {n}"),
            TargetKey::FlyApp(n) => write!(f, "Fly.io app {n}"),
        }
    }
}

/// A selected Sandbox, as the Sandbox controller last reported it.
#[derive(Clone, Debug, PartialEq)]
pub struct SandboxObs {
    /// The Sandbox's name.
    pub name: String,
    /// `status.instance.state`, if reported.
    pub instance_state: Option<InstanceState>,
    /// The agent URL (`status.agent.url`, else `spec.agent.url`).
    pub agent_url: Option<String>,
    /// The env hash the agent last reported (`status.agent.envSha256`).
    pub reported_hash: Option<String>,
    /// When the agent last answered (`status.agent.lastSeen`).
    pub reported_at: Option<Timestamp>,
    /// The older bundle that owns this sandbox's env file, when it is not this one.
    pub claimed_by: Option<String>,
    /// A fingerprint of what matters for retrying (state, URL, health): a failed push is
    /// retried at once, without waiting for its backoff, when it changes.
    pub fingerprint: u64,
}

/// Why a Fly.io app cannot be pushed to, whatever is tried: it waits for an edit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FlyBlock {
    /// The token Secret, its key, or the token's format is wrong (Ready reason InvalidSpec).
    Credential(String),
    /// A value cannot pass through `flyctl secrets import` unchanged.
    Value(String),
}

/// A Fly.io app target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlyObs {
    /// The app.
    pub app: String,
    /// Why it cannot be pushed to, if so.
    pub blocked: Option<FlyBlock>,
    /// A fingerprint of the credential (a changed token retries at once).
    pub fingerprint: u64,
    /// Pushed through Fly's Machines API (else through flyctl).
    pub api: bool,
}

/// What the reconciler remembers about one target between reconciles (in memory only: after a
/// restart every target is tried once more).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Memory {
    /// Failed attempts in a row.
    pub failures: u32,
    /// No attempt before this time.
    pub retry_at: Option<Timestamp>,
    /// The content hash the last outcome was for.
    pub hash: Option<String>,
    /// The bundle generation the last outcome was for.
    pub generation: Option<i64>,
    /// The target's fingerprint when the last outcome came.
    pub fingerprint: u64,
    /// The last outcome was a skip (the Fly.io app does not exist).
    pub skipped: bool,
    /// The last outcome's message (never a value).
    pub message: Option<String>,
    /// A Fly.io app (API): the digest of each managed key Fly answered after the last set.
    pub fly_digests: BTreeMap<String, String>,
}

/// What a visit of a Fly.io app through the API found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlyVisit {
    /// The keys the bundle now manages there (its keys).
    pub managed_keys: Vec<String>,
    /// The fingerprint of their digests as Fly lists them now.
    pub fingerprint: String,
    /// Their digests.
    pub digests: BTreeMap<String, String>,
    /// Managed keys found changed or missing (then set again).
    pub drifted: Vec<String>,
    /// Drift seen from the fingerprint alone (no key could be named).
    pub drift_unnamed: bool,
    /// Keys it unset (no longer in the bundle).
    pub unset: Vec<String>,
    /// Whether it set the values (else it only listed and compared).
    pub set: bool,
}

/// What a push to one target gave.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The target holds content with this hash.
    Synced {
        /// The hash the target acknowledged.
        hash: String,
    },
    /// It failed; retried with backoff.
    Failed {
        /// What went wrong (scrubbed).
        message: String,
    },
    /// Skipped on purpose (the Fly.io app does not exist); retried on refresh or a change.
    Skipped {
        /// Why (scrubbed).
        message: String,
    },
    /// A Fly.io app's secrets (API) hold this content, staged: listed, and set where needed.
    Staged {
        /// The content hash.
        hash: String,
        /// What the visit found and did.
        fly: FlyVisit,
    },
    /// A Fly.io API call failed.
    FlyFailed {
        /// What went wrong (scrubbed).
        message: String,
        /// The CamelCase reason (FlyUnauthorized, FlyThrottled, ...).
        reason: String,
        /// How long Fly asked to wait (`Retry-After`).
        retry_after: Option<Duration>,
        /// The app does not exist: skipped until refresh or a change, like flyctl's answer.
        skip: bool,
    },
}

/// Timings of the decisions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// The first retry delay after a failure; doubled per failure.
    pub retry_base: Duration,
    /// The longest retry delay.
    pub retry_max: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            retry_base: Duration::from_secs(5),
            retry_max: Duration::from_secs(300),
        }
    }
}

/// The delay before retry number `failures` (1-based): doubling from the base, capped.
pub fn backoff(settings: &Settings, failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(20);
    settings
        .retry_base
        .saturating_mul(1u32 << exp)
        .min(settings.retry_max)
}

/// Everything [`plan`] looks at.
#[derive(Clone, Copy, Debug)]
pub struct Inputs<'a> {
    /// The content to push.
    pub content: &'a Content,
    /// `metadata.generation`.
    pub generation: Option<i64>,
    /// The selected Sandboxes (deleting ones left out).
    pub sandboxes: &'a [SandboxObs],
    /// The Fly.io apps, in spec order.
    pub fly_apps: &'a [FlyObs],
    /// The status as last written.
    pub status: &'a SecretBundleStatus,
    /// Memory per target.
    pub memory: &'a BTreeMap<TargetKey, Memory>,
    /// `spec.refreshInterval`.
    pub refresh: Duration,
    /// Now (whole seconds).
    pub now: Timestamp,
    /// Timings.
    pub settings: &'a Settings,
}

/// Why a target is pushed to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Why {
    /// It never received this content (new target or new content).
    Outdated,
    /// Its agent reports a different env hash than what was pushed.
    Drift,
    /// The last attempt failed or was skipped, and its wait is over.
    Retry,
}

/// One target's standing before any push.
#[derive(Clone, Debug, PartialEq)]
pub struct Assessment {
    /// The target.
    pub key: TargetKey,
    /// Its status entry if nothing is pushed.
    pub entry: BundleTargetStatus,
    /// Push now, and why.
    pub push: Option<Why>,
    /// Look again at this time (a backoff or refresh ends).
    pub wake_at: Option<Timestamp>,
    /// While in this state, the bundle is not Ready (stopped sandboxes and skipped apps do not
    /// hold Ready back).
    pub blocks_ready: bool,
    /// A credential problem (Ready reason InvalidSpec), if any.
    pub invalid_credential: Option<String>,
}

/// The targets' standing: which to push now and when to look again.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// One per target, sandboxes (by name) then Fly.io apps (by name).
    pub targets: Vec<Assessment>,
    /// When to look again if nothing else happens.
    pub requeue: Duration,
}

impl Plan {
    /// The targets to push now.
    pub fn pushes(&self) -> impl Iterator<Item = &Assessment> {
        self.targets.iter().filter(|a| a.push.is_some())
    }
}

pub(super) fn add(t: Timestamp, d: Duration) -> Timestamp {
    t.saturating_add(d).unwrap_or(Timestamp::MAX)
}

pub(super) fn until(now: Timestamp, t: Timestamp) -> Duration {
    Duration::try_from(now.duration_until(t)).unwrap_or(Duration::ZERO)
}

/// Decides, for every target, whether to push now.
pub fn plan(inp: &Inputs<'_>) -> Plan {
    let previous: BTreeMap<TargetKey, &BundleTargetStatus> = inp
        .status
        .targets
        .iter()
        .map(|e| (TargetKey::of(e), e))
        .collect();
    let mut targets = Vec::new();
    for s in inp.sandboxes {
        let key = TargetKey::Sandbox(s.name.clone());
        let prev = previous.get(&key).copied();
        let mem = relevant_memory(inp, &key, s.fingerprint);
        targets.push(assess_sandbox(inp, key, s, prev, mem));
    }
    for f in inp.fly_apps {
        let key = TargetKey::FlyApp(f.app.clone());
        let prev = previous.get(&key).copied();
        let mem = relevant_memory(inp, &key, f.fingerprint);
        targets.push(assess_fly(inp, key, f, prev, mem));
    }
    targets.sort_by(|a, b| a.key.cmp(&b.key));
    targets.dedup_by(|a, b| a.key == b.key);
    // Look again when the first wait ends, and at least every refreshInterval (drift, skipped
    // apps, and anything a missed watch event hid).
    let requeue = targets
        .iter()
        .filter_map(|a| a.wake_at)
        .map(|t| until(inp.now, t))
        .min()
        .unwrap_or(inp.refresh)
        .min(inp.refresh)
        .max(Duration::from_secs(1));
    Plan { targets, requeue }
}

/// The memory of a target, if it still applies: same content, same generation, same
/// fingerprint. Anything else earns an immediate attempt.
pub(super) fn relevant_memory<'a>(
    inp: &Inputs<'a>,
    key: &TargetKey,
    fingerprint: u64,
) -> Option<&'a Memory> {
    inp.memory.get(key).filter(|m| {
        m.hash.as_deref() == Some(inp.content.hash.as_str())
            && m.generation == inp.generation
            && m.fingerprint == fingerprint
    })
}

pub(super) fn entry(key: &TargetKey, prev: Option<&BundleTargetStatus>) -> BundleTargetStatus {
    BundleTargetStatus {
        kind: key.kind(),
        name: key.name().to_string(),
        synced_hash: prev.and_then(|p| p.synced_hash.clone()),
        synced_at: prev.and_then(|p| p.synced_at.clone()),
        state: BundleTargetState::Pending,
        message: None,
        reason: None,
        // The keys a bundle manages on a Fly.io app survive every state: they are the only
        // ones it may ever unset.
        fly: prev.and_then(|p| p.fly.clone()),
    }
}

/// Applies the backoff gate to a push: wait while the last failure's delay runs.
pub(super) fn gate(inp: &Inputs<'_>, a: &mut Assessment, mem: Option<&Memory>, why: Why) {
    if let Some(m) = mem
        && let Some(at) = m.retry_at
        && at > inp.now
    {
        a.entry.state = if m.skipped {
            BundleTargetState::Skipped
        } else {
            BundleTargetState::Failed
        };
        a.entry.message = m.message.clone();
        a.wake_at = Some(at);
        a.blocks_ready = !m.skipped;
        a.push = None;
        return;
    }
    a.push = Some(if mem.is_some_and(|m| m.retry_at.is_some()) {
        Why::Retry
    } else {
        why
    });
    a.entry.state = BundleTargetState::Pending;
    a.entry.message = Some(format!("syncing content {}", inp.content.short_hash()));
    a.blocks_ready = true;
}

pub(super) fn assess_sandbox(
    inp: &Inputs<'_>,
    key: TargetKey,
    s: &SandboxObs,
    prev: Option<&BundleTargetStatus>,
    mem: Option<&Memory>,
) -> Assessment {
    let hash = inp.content.hash.as_str();
    let mut a = Assessment {
        entry: entry(&key, prev),
        key,
        push: None,
        wake_at: None,
        blocks_ready: false,
        invalid_credential: None,
    };
    if let Some(owner) = &s.claimed_by {
        a.entry.state = BundleTargetState::Skipped;
        a.entry.message = Some(format!(
            "SecretBundle {owner} also selects this sandbox and, created first, owns its env file; combine the sources into one bundle"
        ));
        return a;
    }
    if s.instance_state != Some(InstanceState::Running) {
        a.entry.state = BundleTargetState::Pending;
        a.entry.message = Some(match &s.instance_state {
            None => "waiting for the Sandbox controller to report the instance".into(),
            Some(st) => format!("instance is {st}; synced when it runs"),
        });
        return a;
    }
    if s.agent_url.is_none() {
        a.entry.state = BundleTargetState::Pending;
        a.entry.message = Some("waiting for the agent URL (status.agent.url)".into());
        return a;
    }
    // The last push to this target failed (its status entry says so, or this process remembers
    // it). The agent's env hash cannot clear that: a push whose service restart fails has
    // written the file (so the hash matches) while the services still run on the old values.
    // Only a push that succeeds, restart included, makes the target Synced again.
    let failed_before = prev.is_some_and(|p| p.state == BundleTargetState::Failed)
        || mem.is_some_and(|m| m.retry_at.is_some() && !m.skipped);
    if failed_before {
        gate(inp, &mut a, mem, Why::Retry);
        return a;
    }
    // The agent holds other content that this process pushed since the entry's sync (a change
    // and then its revert, whether or not that push's restart succeeded): the entry's older sync
    // no longer describes the file. Not foreign drift: push the current content now.
    // (The memory of another content's outcome is not `mem`, which only keeps this content's.)
    let holds_our_other_push = inp.memory.get(&a.key).is_some_and(|m| {
        m.hash.as_deref().is_some_and(|h| h != hash)
            && s.reported_hash.as_deref() == m.hash.as_deref()
    });
    if holds_our_other_push {
        gate(inp, &mut a, mem, Why::Outdated);
        return a;
    }
    // A failed push since (of other content) may have replaced the file the agent held: the
    // target holds what it last acknowledged only while no push to it has failed.
    let synced = prev.is_some_and(|p| {
        p.synced_hash.as_deref() == Some(hash) && p.state != BundleTargetState::Failed
    });
    if synced {
        let synced_at = prev.and_then(|p| p.synced_at.as_ref()).map(|t| t.0);
        // Drift: the agent, asked after the push, reports a different file.
        let drift = match (&s.reported_hash, s.reported_at) {
            (Some(h), Some(at)) => h != hash && synced_at.is_none_or(|t| at > t),
            _ => false,
        };
        if !drift {
            a.entry.state = BundleTargetState::Synced;
            return a;
        }
        // Corrected at most once per refreshInterval, so two writers cannot fight in a storm.
        let due = synced_at.map_or(inp.now, |t| add(t, inp.refresh));
        if due > inp.now {
            a.entry.state = BundleTargetState::Pending;
            a.entry.message = Some(format!(
                "the agent reports env sha256 {}, not {}; corrected at {due}",
                short(s.reported_hash.as_deref().unwrap_or_default()),
                inp.content.short_hash()
            ));
            a.wake_at = Some(due);
            a.blocks_ready = true;
            return a;
        }
        gate(inp, &mut a, mem, Why::Drift);
        return a;
    }
    // The last push of this content failed: the agent may hold the file (it writes it before
    // restarting the services) while a service did not come back. The file alone is not a
    // push that took effect: the push is retried (after its backoff).
    let last_push_failed = prev.is_some_and(|p| p.state == BundleTargetState::Failed)
        || mem.is_some_and(|m| m.hash.as_deref() == Some(hash) && m.failures > 0 && !m.skipped);
    if s.reported_hash.as_deref() == Some(hash) && !last_push_failed {
        // The agent already holds this content (for example after the bundle's status was lost):
        // record it instead of rewriting the file and restarting services.
        a.entry.state = BundleTargetState::Synced;
        a.entry.synced_hash = Some(hash.to_string());
        a.entry.synced_at = Some(Time(s.reported_at.unwrap_or(inp.now)));
        a.entry.message = None;
        return a;
    }
    gate(inp, &mut a, mem, Why::Outdated);
    a
}

pub(super) fn assess_fly(
    inp: &Inputs<'_>,
    key: TargetKey,
    f: &FlyObs,
    prev: Option<&BundleTargetStatus>,
    mem: Option<&Memory>,
) -> Assessment {
    let hash = inp.content.hash.as_str();
    let mut a = Assessment {
        entry: entry(&key, prev),
        key,
        push: None,
        wake_at: None,
        blocks_ready: false,
        invalid_credential: None,
    };
    match &f.blocked {
        Some(FlyBlock::Credential(m)) => {
            a.entry.state = BundleTargetState::Failed;
            a.entry.message = Some(m.clone());
            a.blocks_ready = true;
            a.invalid_credential = Some(format!("Fly.io app {}: {m}", f.app));
            return a;
        }
        Some(FlyBlock::Value(m)) => {
            a.entry.state = BundleTargetState::Failed;
            a.entry.message = Some(m.clone());
            a.blocks_ready = true;
            return a;
        }
        None => {}
    }
    if f.api {
        return assess_fly_api(inp, a, prev, mem);
    }
    // (Content only staged through the API, before a switch to flyctl, is imported again: an
    // import without --stage deploys it.)
    if prev.is_some_and(|p| {
        p.synced_hash.as_deref() == Some(hash) && p.state != BundleTargetState::Staged
    }) {
        // flyctl reports no digest that could show drift: what was imported stays imported.
        a.entry.state = BundleTargetState::Synced;
        return a;
    }
    // A skipped app is tried again once per refreshInterval (not in a storm).
    if let Some(m) = mem
        && m.skipped
        && m.retry_at.is_none_or(|t| t > inp.now)
    {
        a.entry.state = BundleTargetState::Skipped;
        a.entry.message = m.message.clone();
        a.wake_at = m.retry_at;
        return a;
    }
    gate(inp, &mut a, mem, Why::Outdated);
    a
}

/// A Fly.io app through the API: its digests are listed and compared once per
/// refreshInterval (drift), and a new content is set at once.
pub(super) fn assess_fly_api(
    inp: &Inputs<'_>,
    mut a: Assessment,
    prev: Option<&BundleTargetStatus>,
    mem: Option<&Memory>,
) -> Assessment {
    let hash = inp.content.hash.as_str();
    let staged = prev
        .filter(|p| p.synced_hash.as_deref() == Some(hash) && p.state == BundleTargetState::Staged);
    if let Some(p) = staged {
        let last = p
            .fly
            .as_ref()
            .and_then(|f| f.checked_at.as_ref())
            .or(p.synced_at.as_ref())
            .map(|t| t.0);
        let due = last.map_or(inp.now, |t| add(t, inp.refresh));
        if due > inp.now {
            a.entry.state = BundleTargetState::Staged;
            a.entry.message = p.message.clone();
            a.wake_at = Some(due);
            return a;
        }
        // Time to compare digests: the app keeps its standing meanwhile.
        gate(inp, &mut a, mem, Why::Drift);
        if a.push.is_some() {
            a.entry.state = BundleTargetState::Staged;
            a.entry.message = p.message.clone();
            a.blocks_ready = false;
        }
        return a;
    }
    if let Some(m) = mem
        && m.skipped
        && m.retry_at.is_none_or(|t| t > inp.now)
    {
        a.entry.state = BundleTargetState::Skipped;
        a.entry.message = m.message.clone();
        a.entry.reason = prev.and_then(|p| p.reason.clone());
        a.wake_at = m.retry_at;
        return a;
    }
    gate(inp, &mut a, mem, Why::Outdated);
    if a.push.is_none() {
        a.entry.reason = prev.and_then(|p| p.reason.clone());
    }
    a
}

/// What the reconciler hands the API edge about one app: the keys it manages there and what
/// it recorded (from status, and the per-key digests this process remembers).
pub fn fly_known(inp: &Inputs<'_>, app: &str) -> crate::controller::secretbundle::fly::api::Known {
    let key = TargetKey::FlyApp(app.to_string());
    let prev = inp.status.targets.iter().find(|t| TargetKey::of(t) == key);
    let fly = prev.and_then(|p| p.fly.clone()).unwrap_or_default();
    let mut desired: Vec<String> = inp.content.vars.keys().cloned().collect();
    desired.sort();
    let mut managed = fly.managed_keys.clone();
    managed.sort();
    let digests = inp
        .memory
        .get(&key)
        .filter(|m| m.hash.as_deref() == Some(inp.content.hash.as_str()))
        .map(|m| m.fly_digests.clone())
        .unwrap_or_default();
    // Current when the status says so, or when this process staged this very content there
    // (its memory holds Fly's digest of every key): a status read from the cache before the
    // last write landed must not turn a drift check into a silent re-set.
    let staged_here = !desired.is_empty() && desired.iter().all(|k| digests.contains_key(k));
    let current = (prev.is_some_and(|p| {
        p.synced_hash.as_deref() == Some(inp.content.hash.as_str())
            && p.state == BundleTargetState::Staged
    }) && managed == desired)
        || staged_here;
    crate::controller::secretbundle::fly::api::Known {
        current,
        managed: fly.managed_keys,
        fingerprint: fly.digest_fingerprint,
        digests,
    }
}

/// Updates a target's memory with the outcome of a push.
pub fn remember(mem: &mut Memory, outcome: &Outcome, inp: &Inputs<'_>, fingerprint: u64) {
    if mem.hash.as_deref() != Some(inp.content.hash.as_str()) {
        // Fly's digests belong to the content they were answered for.
        mem.fly_digests.clear();
    }
    mem.hash = Some(inp.content.hash.clone());
    mem.generation = inp.generation;
    mem.fingerprint = fingerprint;
    match outcome {
        Outcome::Synced { .. } => {
            mem.failures = 0;
            mem.retry_at = None;
            mem.skipped = false;
            mem.message = None;
        }
        Outcome::Failed { message } => {
            mem.failures = if mem.skipped { 1 } else { mem.failures + 1 };
            mem.retry_at = Some(add(inp.now, backoff(inp.settings, mem.failures)));
            mem.skipped = false;
            mem.message = Some(message.clone());
        }
        Outcome::Skipped { message } => {
            mem.failures = 0;
            mem.retry_at = Some(add(inp.now, inp.refresh));
            mem.skipped = true;
            mem.message = Some(message.clone());
        }
        Outcome::Staged { fly, .. } => {
            mem.failures = 0;
            mem.retry_at = None;
            mem.skipped = false;
            mem.message = None;
            mem.fly_digests = fly.digests.clone();
        }
        Outcome::FlyFailed {
            message,
            skip: true,
            ..
        } => {
            mem.failures = 0;
            mem.retry_at = Some(add(inp.now, inp.refresh));
            mem.skipped = true;
            mem.message = Some(message.clone());
        }
        Outcome::FlyFailed {
            message,
            retry_after,
            ..
        } => {
            mem.failures = if mem.skipped { 1 } else { mem.failures + 1 };
            // The controller's backoff, or longer when Fly asked for longer.
            let wait = backoff(inp.settings, mem.failures).max(retry_after.unwrap_or_default());
            mem.retry_at = Some(add(inp.now, wait));
            mem.skipped = false;
            mem.message = Some(message.clone());
        }
    }
}

/// A target's status entry after a push.
pub fn entry_after(a: &Assessment, outcome: &Outcome, inp: &Inputs<'_>) -> BundleTargetStatus {
    let mut e = a.entry.clone();
    match outcome {
        Outcome::Synced { hash } if *hash == inp.content.hash => {
            e.state = BundleTargetState::Synced;
            e.synced_hash = Some(hash.clone());
            e.synced_at = Some(Time(inp.now));
            e.message = None;
        }
        Outcome::Synced { hash } => {
            e.state = BundleTargetState::Failed;
            e.message = Some(format!(
                "the target acknowledged content {} instead of {}",
                short(hash),
                inp.content.short_hash()
            ));
        }
        Outcome::Failed { message } => {
            e.state = BundleTargetState::Failed;
            e.message = Some(message.clone());
        }
        Outcome::Skipped { message } => {
            e.state = BundleTargetState::Skipped;
            e.message = Some(message.clone());
        }
        Outcome::Staged { hash, fly } if *hash == inp.content.hash => {
            e.state = BundleTargetState::Staged;
            if fly.set || e.synced_hash.as_deref() != Some(hash) {
                e.synced_at = Some(Time(inp.now));
            }
            e.synced_hash = Some(hash.clone());
            e.reason = None;
            let mut st = e.fly.take().unwrap_or_default();
            st.managed_keys = fly.managed_keys.clone();
            st.managed_keys.sort();
            st.digest_fingerprint = Some(fly.fingerprint.clone());
            st.checked_at = Some(Time(inp.now));
            if !fly.drifted.is_empty() || fly.drift_unnamed {
                st.drifted_keys = fly.drifted.clone();
                st.drift_seen_at = Some(Time(inp.now));
            }
            e.message = Some(staged_message(fly, inp));
            e.fly = Some(st);
        }
        Outcome::Staged { hash, .. } => {
            e.state = BundleTargetState::Failed;
            e.message = Some(format!(
                "the target acknowledged content {} instead of {}",
                short(hash),
                inp.content.short_hash()
            ));
        }
        Outcome::FlyFailed {
            message,
            reason,
            skip,
            ..
        } => {
            e.state = if *skip {
                BundleTargetState::Skipped
            } else {
                BundleTargetState::Failed
            };
            e.message = Some(message.clone());
            e.reason = Some(reason.clone());
        }
    }
    e
}

/// The message of a staged Fly.io app: what was done, and that Machines take it later.
pub(super) fn staged_message(fly: &FlyVisit, inp: &Inputs<'_>) -> String {
    let mut m = if fly.set {
        format!(
            "set content {} ({} keys) through Fly's API: staged, not deployed; the app's Machines take it at their next deploy or update",
            inp.content.short_hash(),
            fly.managed_keys.len()
        )
    } else {
        format!(
            "content {} is staged on the app (digests unchanged); the app's Machines take it at their next deploy or update",
            inp.content.short_hash()
        )
    };
    if !fly.unset.is_empty() {
        m.push_str(&format!(
            "; unset keys no longer in the bundle: {}",
            fly.unset.join(", ")
        ));
    }
    if !fly.drifted.is_empty() {
        m.push_str(&format!(
            "; drift corrected: {} changed or missing on Fly.io",
            fly.drifted.join(", ")
        ));
    } else if fly.drift_unnamed {
        m.push_str("; drift corrected: the keys' digests on Fly.io differed from those recorded");
    }
    m
}

/// Whether an outcome counts against Ready.
pub fn outcome_blocks_ready(outcome: &Outcome, inp: &Inputs<'_>) -> bool {
    match outcome {
        Outcome::Synced { hash } | Outcome::Staged { hash, .. } => *hash != inp.content.hash,
        Outcome::Failed { .. } => true,
        Outcome::Skipped { .. } => false,
        Outcome::FlyFailed { skip, .. } => !skip,
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::*;
    use super::*;

    fn sbx(name: &str, state: &str) -> SandboxObs {
        SandboxObs {
            name: name.into(),
            instance_state: Some(InstanceState::parse(state).unwrap_or(InstanceState::Unknown)),
            agent_url: Some(format!("http://{name}:8000")),
            reported_hash: None,
            reported_at: None,
            claimed_by: None,
            fingerprint: 7,
        }
    }

    fn synced_entry(name: &str, hash: &str, at: Timestamp) -> BundleTargetStatus {
        BundleTargetStatus {
            kind: BundleTargetKind::Sandbox,
            name: name.into(),
            synced_hash: Some(hash.into()),
            synced_at: Some(Time(at)),
            state: BundleTargetState::Synced,
            message: None,
            reason: None,
            fly: None,
        }
    }

    struct Case {
        content: Content,
        sandboxes: Vec<SandboxObs>,
        fly: Vec<FlyObs>,
        status: SecretBundleStatus,
        memory: BTreeMap<TargetKey, Memory>,
        now: Timestamp,
        settings: Settings,
    }

    impl Case {
        fn new() -> Self {
            Self {
                content: content(),
                sandboxes: vec![],
                fly: vec![],
                status: SecretBundleStatus::default(),
                memory: BTreeMap::new(),
                now: now(),
                settings: Settings::default(),
            }
        }
        fn inputs(&self) -> Inputs<'_> {
            Inputs {
                content: &self.content,
                generation: Some(1),
                sandboxes: &self.sandboxes,
                fly_apps: &self.fly,
                status: &self.status,
                memory: &self.memory,
                refresh: Duration::from_secs(3600),
                now: self.now,
                settings: &self.settings,
            }
        }
        fn plan(&self) -> Plan {
            plan(&self.inputs())
        }
    }

    fn pushed(p: &Plan) -> Vec<String> {
        p.pushes().map(|a| a.key.name().to_string()).collect()
    }

    #[test]
    fn running_sandboxes_without_the_content_are_pushed_stopped_ones_wait() {
        let mut c = Case::new();
        c.sandboxes = vec![
            sbx("a", "running"),
            sbx("b", "stopped"),
            sbx("c", "running"),
        ];
        c.sandboxes.push(SandboxObs {
            instance_state: None,
            ..sbx("d", "x")
        });
        let p = c.plan();
        assert_eq!(pushed(&p), ["a", "c"]);
        let b = p.targets.iter().find(|a| a.key.name() == "b").unwrap();
        assert_eq!(b.entry.state, BundleTargetState::Pending);
        assert!(!b.blocks_ready);
        assert!(b.entry.message.as_deref().unwrap().contains("stopped"));
        assert_eq!(p.requeue, Duration::from_secs(3600));
    }

    #[test]
    fn synced_sandboxes_stay_put_and_drift_is_corrected_once_per_refresh() {
        let mut c = Case::new();
        let h = c.content.hash.clone();
        let pushed_at = now() - Duration::from_secs(600);
        c.status.targets = vec![synced_entry("a", &h, pushed_at)];
        c.sandboxes = vec![sbx("a", "running")];
        assert!(pushed(&c.plan()).is_empty());

        // A stale report (taken before the push) is not drift.
        c.sandboxes[0].reported_hash = Some("old".into());
        c.sandboxes[0].reported_at = Some(pushed_at - Duration::from_secs(5));
        let p = c.plan();
        assert!(pushed(&p).is_empty());
        assert_eq!(p.targets[0].entry.state, BundleTargetState::Synced);

        // A report after the push with another hash is drift, corrected when the last push is
        // a refreshInterval old.
        c.sandboxes[0].reported_at = Some(pushed_at + Duration::from_secs(5));
        let p = c.plan();
        assert!(pushed(&p).is_empty());
        assert_eq!(p.targets[0].entry.state, BundleTargetState::Pending);
        assert_eq!(p.requeue, Duration::from_secs(3000));
        c.now = pushed_at + Duration::from_secs(3600);
        let p = c.plan();
        assert_eq!(pushed(&p), ["a"]);
        assert_eq!(p.targets[0].push, Some(Why::Drift));
    }

    #[test]
    fn an_agent_already_holding_the_content_is_recorded_not_rewritten() {
        let mut c = Case::new();
        c.sandboxes = vec![sbx("a", "running")];
        c.sandboxes[0].reported_hash = Some(c.content.hash.clone());
        let p = c.plan();
        assert!(pushed(&p).is_empty());
        assert_eq!(p.targets[0].entry.state, BundleTargetState::Synced);
        assert_eq!(
            p.targets[0].entry.synced_hash.as_ref(),
            Some(&c.content.hash)
        );
    }

    #[test]
    fn a_failed_push_is_not_synced_because_the_agent_holds_the_file() {
        let mut c = Case::new();
        c.sandboxes = vec![sbx("a", "running")];
        let mut mem = Memory::default();
        let msg = "env file written (sha256 x), but restarting worker: recreated, but not healthy";
        remember(
            &mut mem,
            &Outcome::Failed {
                message: msg.into(),
            },
            &c.inputs(),
            7,
        );
        c.memory.insert(TargetKey::Sandbox("a".into()), mem.clone());
        // The agent reports the new file (it was written before the restart failed).
        c.sandboxes[0].reported_hash = Some(c.content.hash.clone());
        c.sandboxes[0].reported_at = Some(c.now);
        let p = c.plan();
        assert!(pushed(&p).is_empty());
        assert_eq!(p.targets[0].entry.state, BundleTargetState::Failed);
        assert_eq!(p.targets[0].entry.message.as_deref(), Some(msg));
        // Retried when the backoff is over, not recorded as synced.
        c.now = mem.retry_at.unwrap();
        assert_eq!(c.plan().targets[0].push, Some(Why::Retry));
        // Without the memory (a restarted operator), the Failed entry of the status says so.
        c.memory.clear();
        c.status.targets = vec![p.targets[0].entry.clone()];
        assert_eq!(pushed(&c.plan()), ["a"]);
    }

    #[test]
    fn a_revert_after_our_own_push_of_other_content_is_pushed_not_waited_on_as_drift() {
        let mut c = Case::new();
        c.sandboxes = vec![sbx("a", "running")];
        let good = c.content.hash.clone();
        let synced_at = c.now;
        c.status.targets = vec![synced_entry("a", &good, synced_at)];
        // This process pushed other content since (its outcome remembered), and the agent
        // reports it; then the bundle went back to the good content.
        let mem = Memory {
            hash: Some("other".into()),
            ..Default::default()
        };
        c.memory.insert(TargetKey::Sandbox("a".into()), mem);
        c.sandboxes[0].reported_hash = Some("other".into());
        c.sandboxes[0].reported_at = Some(synced_at + Duration::from_secs(5));
        c.now = synced_at + Duration::from_secs(10);
        let p = c.plan();
        assert_eq!(pushed(&p), ["a"], "{:?}", p.targets[0]);
        // Foreign drift (content nobody here pushed) still waits for the refresh.
        c.memory.clear();
        let p = c.plan();
        assert!(pushed(&p).is_empty());
        assert_eq!(p.targets[0].entry.state, BundleTargetState::Pending);
    }

    #[test]
    fn a_revert_after_a_failed_push_is_pushed_at_once() {
        let mut c = Case::new();
        c.sandboxes = vec![sbx("a", "running")];
        let good = c.content.clone();
        // Synced with the good content; then other content failed (its file written, a service
        // did not come back) and the bundle went back to the good content.
        let synced_at = c.now;
        c.status.targets = vec![BundleTargetStatus {
            kind: BundleTargetKind::Sandbox,
            name: "a".into(),
            synced_hash: Some(good.hash.clone()),
            synced_at: Some(Time(synced_at)),
            state: BundleTargetState::Failed,
            message: Some("restarting worker: recreated, but not healthy".into()),
            reason: None,
            fly: None,
        }];
        c.sandboxes[0].reported_hash = Some("bad".into());
        c.sandboxes[0].reported_at = Some(synced_at + Duration::from_secs(30));
        c.now = synced_at + Duration::from_secs(60);
        let p = c.plan();
        assert_eq!(pushed(&p), ["a"], "{:?}", p.targets[0]);
    }

    #[test]
    fn failures_back_off_exponentially_and_a_changed_sandbox_retries_at_once() {
        let mut c = Case::new();
        c.sandboxes = vec![sbx("a", "running")];
        let key = TargetKey::Sandbox("a".into());
        let mut mem = Memory::default();
        let mut delays = vec![];
        for _ in 0..8 {
            let inp = c.inputs();
            remember(
                &mut mem,
                &Outcome::Failed {
                    message: "agent down".into(),
                },
                &inp,
                7,
            );
            delays.push(until(c.now, mem.retry_at.unwrap()).as_secs());
        }
        assert_eq!(delays, [5, 10, 20, 40, 80, 160, 300, 300]);
        c.memory.insert(key.clone(), mem.clone());
        let p = c.plan();
        assert!(pushed(&p).is_empty());
        assert_eq!(p.targets[0].entry.state, BundleTargetState::Failed);
        assert_eq!(p.targets[0].entry.message.as_deref(), Some("agent down"));
        assert_eq!(p.requeue, Duration::from_secs(300));
        // The wait is over: retried.
        c.now = mem.retry_at.unwrap();
        assert_eq!(c.plan().targets[0].push, Some(Why::Retry));
        // The sandbox changed (say its agent came back): retried at once.
        c.now = now();
        c.sandboxes[0].fingerprint = 8;
        assert_eq!(pushed(&c.plan()), ["a"]);
        // New content: retried at once.
        c.sandboxes[0].fingerprint = 7;
        c.content = render(&[src("s", None)], &[data("s", &[("A", "2")])]).unwrap();
        assert_eq!(pushed(&c.plan()), ["a"]);
    }

    /// A push whose restart failed, as the agent answers it: the file is written, the
    /// service did not restart.
    fn restart_failed() -> Outcome {
        Outcome::Failed {
            message: "the agent answered 502: env file written (sha256 abc), but restarting worker: exit status 1".into(),
        }
    }

    fn standing_of(p: &Plan) -> Vec<Standing> {
        p.targets
            .iter()
            .map(|a| Standing {
                entry: a.entry.clone(),
                blocks_ready: a.blocks_ready,
            })
            .collect()
    }

    #[test]
    fn a_failed_restart_stays_failed_whatever_hash_the_agent_reports() {
        let mut c = Case::new();
        c.sandboxes = vec![sbx("a", "running")];
        let key = TargetKey::Sandbox("a".into());
        let hash = c.content.hash.clone();
        let p = c.plan();
        assert_eq!(pushed(&p), ["a"]);
        // The push wrote the file; the restart failed.
        let mut mem = Memory::default();
        remember(&mut mem, &restart_failed(), &c.inputs(), 7);
        let e = entry_after(&p.targets[0], &restart_failed(), &c.inputs());
        assert_eq!(e.state, BundleTargetState::Failed);
        assert_eq!(e.synced_hash, None);
        c.status.targets = vec![e];
        c.status.content_hash = Some(hash.clone());
        c.memory.insert(key.clone(), mem.clone());
        // A second later the agent reports the new file's hash, read after the push.
        c.now = now() + Duration::from_secs(1);
        c.sandboxes[0].reported_hash = Some(hash.clone());
        c.sandboxes[0].reported_at = Some(c.now);
        let p = c.plan();
        assert!(pushed(&p).is_empty(), "retried before its backoff");
        let a = &p.targets[0];
        assert_eq!(a.entry.state, BundleTargetState::Failed);
        assert!(a.blocks_ready);
        assert_eq!(a.entry.synced_hash, None);
        assert!(
            a.entry
                .message
                .as_deref()
                .unwrap()
                .contains("restarting worker"),
            "{a:?}"
        );
        assert_eq!(a.wake_at, mem.retry_at);
        // The bundle's Ready says so, in the failure's own words.
        let st = summarize(&c.status, Some(1), &c.content, standing_of(&p), &[], c.now);
        let r = conditions::get(&st.conditions, cond::READY).unwrap();
        assert_eq!(
            (r.status.as_str(), r.reason.as_str()),
            (FALSE, reason::SYNC_FAILED)
        );
        assert!(
            r.message.contains("sandbox a") && r.message.contains("restarting worker"),
            "{}",
            r.message
        );
        assert_eq!(st.synced_targets, 0);
        // When the backoff ends it is pushed again (a push restarts), not taken on its hash.
        c.now = mem.retry_at.unwrap();
        let p = c.plan();
        assert_eq!(p.targets[0].push, Some(Why::Retry));
        // This process forgot (a restart of the operator): the status entry alone keeps it
        // from Synced, and it is pushed at once.
        c.memory.clear();
        c.now = now() + Duration::from_secs(2);
        let p = c.plan();
        assert_eq!(pushed(&p), ["a"]);
        assert_ne!(p.targets[0].entry.state, BundleTargetState::Synced);
        // A push that succeeds, restart included, makes it Synced; then it stays put.
        let ok = Outcome::Synced { hash: hash.clone() };
        let e = entry_after(&p.targets[0], &ok, &c.inputs());
        assert_eq!(e.state, BundleTargetState::Synced);
        assert_eq!(e.synced_hash.as_ref(), Some(&hash));
        let mut mem = Memory::default();
        remember(&mut mem, &ok, &c.inputs(), 7);
        c.status.targets = vec![e];
        c.memory.insert(key, mem);
        let p = c.plan();
        assert!(pushed(&p).is_empty());
        assert_eq!(p.targets[0].entry.state, BundleTargetState::Synced);
    }

    #[test]
    fn a_failed_drift_correction_is_not_cleared_by_the_hash_either() {
        let mut c = Case::new();
        let h = c.content.hash.clone();
        let pushed_at = now() - Duration::from_secs(7200);
        c.status.targets = vec![synced_entry("a", &h, pushed_at)];
        c.status.content_hash = Some(h.clone());
        c.sandboxes = vec![sbx("a", "running")];
        c.sandboxes[0].reported_hash = Some("tampered".into());
        c.sandboxes[0].reported_at = Some(now() - Duration::from_secs(10));
        let p = c.plan();
        assert_eq!(pushed(&p), ["a"]);
        assert_eq!(p.targets[0].push, Some(Why::Drift));
        // The correction rewrote the file; the restart failed.
        let e = entry_after(&p.targets[0], &restart_failed(), &c.inputs());
        let mut mem = Memory::default();
        remember(&mut mem, &restart_failed(), &c.inputs(), 7);
        // The entry still names the hash last synced, but it is Failed...
        assert_eq!(e.synced_hash.as_ref(), Some(&h));
        c.status.targets = vec![e];
        c.memory.insert(TargetKey::Sandbox("a".into()), mem);
        // ...and the agent's matching hash does not turn it back into Synced.
        c.now = now() + Duration::from_secs(1);
        c.sandboxes[0].reported_hash = Some(h.clone());
        c.sandboxes[0].reported_at = Some(c.now);
        let p = c.plan();
        assert!(pushed(&p).is_empty());
        assert_eq!(p.targets[0].entry.state, BundleTargetState::Failed);
        assert!(p.targets[0].blocks_ready);
    }

    #[test]
    fn skipped_fly_apps_wait_for_refresh_or_a_change() {
        let mut c = Case::new();
        c.fly = vec![FlyObs {
            app: "gone".into(),
            blocked: None,
            fingerprint: 1,
            api: false,
        }];
        assert_eq!(pushed(&c.plan()), ["gone"]);
        let mut mem = Memory::default();
        remember(
            &mut mem,
            &Outcome::Skipped {
                message: "no such app".into(),
            },
            &c.inputs(),
            1,
        );
        c.memory.insert(TargetKey::FlyApp("gone".into()), mem);
        let p = c.plan();
        assert!(pushed(&p).is_empty());
        assert_eq!(p.targets[0].entry.state, BundleTargetState::Skipped);
        assert!(!p.targets[0].blocks_ready);
        assert_eq!(p.requeue, Duration::from_secs(3600));
        c.now = now() + Duration::from_secs(3600);
        assert_eq!(pushed(&c.plan()), ["gone"]);
    }

    #[test]
    fn blocked_fly_apps_are_never_pushed() {
        let mut c = Case::new();
        c.fly = vec![FlyObs {
            app: "app".into(),
            blocked: Some(FlyBlock::Credential("token is empty".into())),
            fingerprint: 1,
            api: false,
        }];
        let p = c.plan();
        assert!(pushed(&p).is_empty());
        assert_eq!(p.targets[0].entry.state, BundleTargetState::Failed);
        assert!(p.targets[0].invalid_credential.is_some());
    }

    fn api_app(c: &mut Case) {
        c.fly = vec![FlyObs {
            app: "web".into(),
            blocked: None,
            fingerprint: 1,
            api: true,
        }];
    }

    fn visit(set: bool, drifted: &[&str]) -> Outcome {
        Outcome::Staged {
            hash: content().hash,
            fly: FlyVisit {
                managed_keys: vec!["A".into()],
                fingerprint: "f".repeat(64),
                digests: [("A".to_string(), "d1".to_string())].into(),
                drifted: drifted.iter().map(|s| s.to_string()).collect(),
                drift_unnamed: false,
                unset: vec![],
                set,
            },
        }
    }

    /// Applies an outcome to the case as the reconciler does (status entry and memory).
    fn apply(c: &mut Case, o: &Outcome) {
        let p = c.plan();
        let a = p.targets.iter().find(|a| a.key.name() == "web").unwrap();
        let e = entry_after(a, o, &c.inputs());
        let mut m = c.memory.get(&a.key).cloned().unwrap_or_default();
        remember(&mut m, o, &c.inputs(), 1);
        c.memory.insert(a.key.clone(), m);
        c.status.targets = vec![e];
    }

    #[test]
    fn api_apps_are_staged_never_synced_and_checked_for_drift_once_per_refresh() {
        let mut c = Case::new();
        api_app(&mut c);
        assert_eq!(pushed(&c.plan()), ["web"]);
        apply(&mut c, &visit(true, &[]));
        let e = &c.status.targets[0];
        assert_eq!(e.state, BundleTargetState::Staged);
        assert!(
            e.message
                .as_deref()
                .unwrap()
                .contains("staged, not deployed"),
            "{e:?}"
        );
        let fly = e.fly.clone().unwrap();
        assert_eq!(fly.managed_keys, ["A"]);
        assert_eq!(fly.checked_at, Some(Time(c.now)));
        // The bundle knows what it set: handed to the next visit.
        let known = fly_known(&c.inputs(), "web");
        assert!(known.current);
        assert_eq!(known.managed, ["A"]);
        assert_eq!(known.digests.get("A").map(String::as_str), Some("d1"));
        // A status read from the cache before that write landed: still current (this process
        // staged it), so a drift check names the drifted keys instead of setting all again.
        let written = std::mem::take(&mut c.status.targets);
        let known = fly_known(&c.inputs(), "web");
        assert!(known.current);
        assert_eq!(known.digests.get("A").map(String::as_str), Some("d1"));
        c.status.targets = written;
        // Staged holds Ready (reason Staged), counted apart from Synced.
        let p = c.plan();
        assert!(pushed(&p).is_empty());
        assert_eq!(p.targets[0].entry.state, BundleTargetState::Staged);
        assert!(!p.targets[0].blocks_ready);
        assert_eq!(p.requeue, Duration::from_secs(3600));
        let st = summarize(&c.status, Some(1), &c.content, standing_of(&p), &[], c.now);
        assert_eq!(st.synced_targets, 0);
        let ready = conditions::get(&st.conditions, cond::READY).unwrap();
        assert_eq!(ready.reason, reason::STAGED);
        assert!(
            ready
                .message
                .contains("staged, not deployed: Fly.io app web")
        );
        // A refresh later: a check (keeps its standing while it runs).
        c.now += Duration::from_secs(3600);
        let p = c.plan();
        assert_eq!(pushed(&p), ["web"]);
        assert_eq!(p.targets[0].push, Some(Why::Drift));
        assert_eq!(p.targets[0].entry.state, BundleTargetState::Staged);
        assert!(!p.targets[0].blocks_ready);
        // Drift found and corrected: named in status, kept after the next quiet check.
        apply(&mut c, &visit(true, &["A"]));
        let fly = c.status.targets[0].fly.clone().unwrap();
        assert_eq!(fly.drifted_keys, ["A"]);
        assert_eq!(fly.drift_seen_at, Some(Time(c.now)));
        c.now += Duration::from_secs(3600);
        apply(&mut c, &visit(false, &[]));
        let e = &c.status.targets[0];
        assert_eq!(e.fly.as_ref().unwrap().drifted_keys, ["A"]);
        assert!(e.message.as_deref().unwrap().contains("digests unchanged"));
        // New content: not current any more, pushed at once.
        c.content = render(&[src("s", None)], &[data("s", &[("A", "2")])]).unwrap();
        assert!(!fly_known(&c.inputs(), "web").current);
        assert_eq!(c.plan().targets[0].push, Some(Why::Outdated));
        // Its push failed: the old content's digests are not taken for the new content's.
        apply(
            &mut c,
            &Outcome::FlyFailed {
                message: "Fly.io answered 500".into(),
                reason: "FlyUnavailable".into(),
                retry_after: None,
                skip: false,
            },
        );
        let known = fly_known(&c.inputs(), "web");
        assert!(!known.current);
        assert!(known.digests.is_empty());
    }

    #[test]
    fn api_failures_carry_their_reason_and_honour_retry_after() {
        let mut c = Case::new();
        api_app(&mut c);
        let throttled = Outcome::FlyFailed {
            message: "throttled".into(),
            reason: "FlyThrottled".into(),
            retry_after: Some(Duration::from_secs(40)),
            skip: false,
        };
        apply(&mut c, &throttled);
        let e = &c.status.targets[0];
        assert_eq!(e.state, BundleTargetState::Failed);
        assert_eq!(e.reason.as_deref(), Some("FlyThrottled"));
        // Fly's 40 s, not the 5 s backoff.
        let p = c.plan();
        assert!(pushed(&p).is_empty());
        assert_eq!(p.requeue, Duration::from_secs(40));
        let st = summarize(&c.status, Some(1), &c.content, standing_of(&p), &[], c.now);
        assert_eq!(
            conditions::get(&st.conditions, cond::READY).unwrap().reason,
            "FlyThrottled"
        );
        assert_eq!(
            conditions::get(&st.conditions, cond::DEGRADED)
                .unwrap()
                .reason,
            "FlyThrottled"
        );
        c.now += Duration::from_secs(40);
        assert_eq!(pushed(&c.plan()), ["web"]);
        // 404: skipped with its reason, looked at again after refreshInterval.
        let missing = Outcome::FlyFailed {
            message: "no such app".into(),
            reason: "FlyAppNotFound".into(),
            retry_after: None,
            skip: true,
        };
        apply(&mut c, &missing);
        let p = c.plan();
        assert!(pushed(&p).is_empty());
        assert_eq!(p.targets[0].entry.state, BundleTargetState::Skipped);
        assert_eq!(p.targets[0].entry.reason.as_deref(), Some("FlyAppNotFound"));
        let st = summarize(&c.status, Some(1), &c.content, standing_of(&p), &[], c.now);
        assert!(conditions::is_true(&st.conditions, cond::READY));
        assert_eq!(
            conditions::get(&st.conditions, cond::DEGRADED)
                .unwrap()
                .reason,
            "FlyAppNotFound"
        );
        // The managed keys survive a failure: they are what the next success may unset.
        apply(&mut c, &visit(true, &[]));
        apply(
            &mut c,
            &Outcome::FlyFailed {
                message: "down".into(),
                reason: "FlyUnavailable".into(),
                retry_after: None,
                skip: false,
            },
        );
        assert_eq!(
            c.status.targets[0].fly.as_ref().unwrap().managed_keys,
            ["A"]
        );
    }

    #[test]
    fn claimed_sandboxes_are_skipped() {
        let mut c = Case::new();
        c.sandboxes = vec![SandboxObs {
            claimed_by: Some("older".into()),
            ..sbx("a", "running")
        }];
        let p = c.plan();
        assert!(pushed(&p).is_empty());
        assert_eq!(p.targets[0].entry.state, BundleTargetState::Skipped);
    }
}
