//! The SecretBundle controller's decisions, as pure functions of plain data: the spec, the
//! source Secrets' bytes, the Sandboxes as the Sandbox controller reported them, what each target
//! answered last time and the clock. No client lives here; the reconciler gathers the inputs,
//! pushes to the targets this module picks and writes the status it builds.
//!
//! Nothing here ever puts a secret value into a message: problems name keys and Secrets, and
//! [`Content`]'s `Debug` shows key names and the hash only.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelectorRequirement, Time};
use k8s_openapi::jiff::Timestamp;

use crate::agent::envfile;
use crate::api::conditions::{self, Desired, FALSE, TRUE};
use crate::api::{
    BundleTargetKind, BundleTargetState, BundleTargetStatus, Environment, SandboxSelector,
    SecretBundleSpec, SecretBundleStatus, SecretSource,
};

/// Condition types.
pub mod cond {
    /// The summary: every target that can hold the content holds it.
    pub const READY: &str = "Ready";
    /// The warning: some targets are skipped or failing (present only then).
    pub const DEGRADED: &str = "Degraded";
}

/// Ready reasons (CamelCase) that callers and tests match on.
pub mod reason {
    /// A key is not an environment variable name, or two sources define it, or a Fly.io token
    /// is not a Fly.io token.
    pub const INVALID_SPEC: &str = "InvalidSpec";
    /// A value cannot be an environment variable (not UTF-8, or a NUL byte).
    pub const INVALID_VALUE: &str = "InvalidValue";
    /// A source Secret does not exist.
    pub const SOURCE_SECRET_MISSING: &str = "SourceSecretMissing";
    /// A key listed in `sources[].keys` is not in its Secret.
    pub const SOURCE_KEY_MISSING: &str = "SourceKeyMissing";
    /// The sources hold no key at all (an empty `.env` would wipe every target).
    pub const NO_KEYS: &str = "NoKeys";
    /// Every target that can hold the content holds it.
    pub const SYNCED: &str = "Synced";
    /// Nothing matches and no Fly.io app is named.
    pub const NO_TARGETS: &str = "NoTargets";
    /// Some running targets do not hold the content yet.
    pub const SYNCING: &str = "Syncing";
    /// Some targets failed (retried with backoff).
    pub const SYNC_FAILED: &str = "SyncFailed";
    /// Every target holds the content, some Fly.io apps staged (their Machines take it at their
    /// next deploy or update).
    pub const STAGED: &str = "Staged";
}

// ---------------------------------------------------------------------------------------------
// Content: the sources rendered into one `.env`.
// ---------------------------------------------------------------------------------------------

/// One source Secret as read: its data, or `None` when it does not exist.
#[derive(Clone, PartialEq, Eq)]
pub struct SourceData {
    /// The Secret's name.
    pub name: String,
    /// Its data (`None`: the Secret does not exist).
    pub data: Option<BTreeMap<String, Vec<u8>>>,
}

impl fmt::Debug for SourceData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SourceData")
            .field("name", &self.name)
            .field(
                "keys",
                &self.data.as_ref().map(|d| d.keys().collect::<Vec<_>>()),
            )
            .finish()
    }
}

/// The rendered bundle: the variables, the `.env` text and its sha256.
#[derive(Clone, PartialEq, Eq)]
pub struct Content {
    /// Key to value (sorted).
    pub vars: BTreeMap<String, String>,
    /// The `.env` text, as the agent writes it.
    pub env: String,
    /// sha256 (hex) of `env`'s bytes: the content hash.
    pub hash: String,
}

impl fmt::Debug for Content {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Content")
            .field("keys", &self.vars.keys().collect::<Vec<_>>())
            .field("hash", &self.hash)
            .finish()
    }
}

impl Content {
    /// The first 12 hex digits of the hash, for messages.
    pub fn short_hash(&self) -> &str {
        short(&self.hash)
    }
}

fn short(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}

/// Why the sources cannot be rendered. Messages name Secrets and keys, never values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceProblem {
    /// A Secret key that is not an environment variable name.
    InvalidKeyName {
        /// The Secret.
        secret: String,
        /// The key.
        key: String,
    },
    /// Two sources (or one source twice) define a key.
    DuplicateKey {
        /// The key.
        key: String,
        /// The Secret that defined it first.
        first: String,
        /// The Secret that defined it again.
        second: String,
    },
    /// A source Secret does not exist.
    SecretMissing {
        /// The Secret.
        secret: String,
    },
    /// A key listed in `keys` is not in the Secret.
    KeyMissing {
        /// The Secret.
        secret: String,
        /// The key.
        key: String,
    },
    /// A value is not UTF-8.
    NotUtf8 {
        /// The Secret.
        secret: String,
        /// The key.
        key: String,
    },
    /// A value holds a NUL byte (no environment variable can).
    NulByte {
        /// The Secret.
        secret: String,
        /// The key.
        key: String,
    },
    /// The sources hold no key.
    NoKeys,
    /// A duration field of the spec does not parse (stored before the CRD checked it).
    InvalidDuration {
        /// The field, as written in the spec (`spec.refreshInterval`).
        field: &'static str,
        /// What is wrong and what to write instead.
        problem: String,
    },
}

impl SourceProblem {
    /// The Ready reason.
    pub fn reason(&self) -> &'static str {
        match self {
            SourceProblem::InvalidKeyName { .. }
            | SourceProblem::DuplicateKey { .. }
            | SourceProblem::InvalidDuration { .. } => reason::INVALID_SPEC,
            SourceProblem::NotUtf8 { .. } | SourceProblem::NulByte { .. } => reason::INVALID_VALUE,
            SourceProblem::SecretMissing { .. } => reason::SOURCE_SECRET_MISSING,
            SourceProblem::KeyMissing { .. } => reason::SOURCE_KEY_MISSING,
            SourceProblem::NoKeys => reason::NO_KEYS,
        }
    }
}

impl fmt::Display for SourceProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SourceProblem::InvalidKeyName { secret, key } => write!(
                f,
                "key {key:?} of Secret {secret} is not an environment variable name (letters, digits and _, not starting with a digit); list the valid keys in sources[].keys"
            ),
            SourceProblem::DuplicateKey { key, first, second } if first == second => {
                write!(f, "key {key} is listed twice for Secret {first}")
            }
            SourceProblem::DuplicateKey { key, first, second } => write!(
                f,
                "key {key} is defined by Secret {first} and again by Secret {second}; a key may come from one source only"
            ),
            SourceProblem::SecretMissing { secret } => {
                write!(f, "source Secret {secret} does not exist")
            }
            SourceProblem::KeyMissing { secret, key } => {
                write!(f, "source Secret {secret} has no key {key}")
            }
            SourceProblem::NotUtf8 { secret, key } => {
                write!(
                    f,
                    "the value of key {key} in Secret {secret} is not UTF-8 text"
                )
            }
            SourceProblem::NulByte { secret, key } => write!(
                f,
                "the value of key {key} in Secret {secret} contains a NUL byte, which no environment variable can hold"
            ),
            SourceProblem::NoKeys => write!(
                f,
                "the sources hold no key; nothing is pushed (an empty .env would wipe every target)"
            ),
            SourceProblem::InvalidDuration { field, problem } => write!(f, "{field}: {problem}"),
        }
    }
}

/// The spec's settings, parsed once: the decisions use these instead of the raw strings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidSpec {
    /// `spec.refreshInterval`, at least [`MIN_REFRESH`].
    pub refresh: Duration,
}

/// The shortest refresh honoured (the CRD refuses less; an older object's shorter one is
/// raised to it).
pub const MIN_REFRESH: Duration = Duration::from_secs(10);

/// The validate step: every duration of the spec parsed (the CRD's rules check them too, but
/// not for objects stored before those rules). A value that does not parse is an InvalidSpec
/// problem naming the field, never a default.
pub fn validate(spec: &SecretBundleSpec) -> Result<ValidSpec, Vec<SourceProblem>> {
    match crate::util::parse_duration(&spec.refresh_interval) {
        Ok(d) => Ok(ValidSpec {
            refresh: d.max(MIN_REFRESH),
        }),
        Err(e) => Err(vec![SourceProblem::InvalidDuration {
            field: "spec.refreshInterval",
            problem: e.to_string(),
        }]),
    }
}

/// Renders the sources. Every problem is reported (missing Secrets first), never a value.
pub fn render(
    sources: &[SecretSource],
    data: &[SourceData],
) -> Result<Content, Vec<SourceProblem>> {
    let mut problems = Vec::new();
    for src in sources {
        let found = data.iter().find(|d| d.name == src.secret_name);
        if found.and_then(|d| d.data.as_ref()).is_none() {
            problems.push(SourceProblem::SecretMissing {
                secret: src.secret_name.clone(),
            });
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    let mut vars: BTreeMap<String, String> = BTreeMap::new();
    let mut origin: BTreeMap<String, String> = BTreeMap::new();
    for src in sources {
        let secret = &src.secret_name;
        let Some(d) = data
            .iter()
            .find(|d| &d.name == secret)
            .and_then(|d| d.data.as_ref())
        else {
            continue;
        };
        let keys: Vec<&String> = match &src.keys {
            Some(keys) => keys.iter().collect(),
            None => d.keys().collect(),
        };
        for key in keys {
            let Some(bytes) = d.get(key) else {
                problems.push(SourceProblem::KeyMissing {
                    secret: secret.clone(),
                    key: key.clone(),
                });
                continue;
            };
            if !envfile::is_valid_key(key) {
                problems.push(SourceProblem::InvalidKeyName {
                    secret: secret.clone(),
                    key: key.clone(),
                });
                continue;
            }
            if let Some(first) = origin.get(key) {
                problems.push(SourceProblem::DuplicateKey {
                    key: key.clone(),
                    first: first.clone(),
                    second: secret.clone(),
                });
                continue;
            }
            origin.insert(key.clone(), secret.clone());
            let Ok(value) = std::str::from_utf8(bytes) else {
                problems.push(SourceProblem::NotUtf8 {
                    secret: secret.clone(),
                    key: key.clone(),
                });
                continue;
            };
            if value.contains('\0') {
                problems.push(SourceProblem::NulByte {
                    secret: secret.clone(),
                    key: key.clone(),
                });
                continue;
            }
            vars.insert(key.clone(), value.to_string());
        }
    }
    if problems.is_empty() && vars.is_empty() {
        problems.push(SourceProblem::NoKeys);
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    let env = envfile::render(&vars);
    let hash = envfile::sha256_hex(env.as_bytes());
    Ok(Content { vars, env, hash })
}

/// One message for a list of problems: the first few, and how many more.
pub fn problems_message(problems: &[SourceProblem]) -> String {
    let mut msg = problems
        .iter()
        .take(5)
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ");
    if problems.len() > 5 {
        msg.push_str(&format!(" (and {} more)", problems.len() - 5));
    }
    msg.push_str("; nothing is pushed");
    msg
}

// ---------------------------------------------------------------------------------------------
// Selectors.
// ---------------------------------------------------------------------------------------------

/// Whether `sel` selects a Sandbox with these labels and environment.
pub fn selects(sel: &SandboxSelector, labels: &BTreeMap<String, String>, env: Environment) -> bool {
    sel.environment.is_none_or(|e| e == env)
        && sel
            .match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
        && sel
            .match_expressions
            .iter()
            .all(|r| requirement_holds(r, labels))
}

fn requirement_holds(r: &LabelSelectorRequirement, labels: &BTreeMap<String, String>) -> bool {
    let values = r.values.as_deref().unwrap_or_default();
    let v = labels.get(&r.key);
    match r.operator.as_str() {
        "In" => v.is_some_and(|v| values.contains(v)),
        "NotIn" => v.is_none_or(|v| !values.contains(v)),
        "Exists" => v.is_some(),
        "DoesNotExist" => v.is_none(),
        // An operator the API would refuse selects nothing rather than everything.
        _ => false,
    }
}

/// A bundle as another bundle sees it, to settle which one owns a sandbox's env file.
#[derive(Clone, Debug, PartialEq)]
pub struct Claim<'a> {
    /// The bundle's name.
    pub name: &'a str,
    /// Its creation time.
    pub created: Option<Timestamp>,
    /// Its sandbox selector (`None`: it has no sandbox targets).
    pub selector: Option<&'a SandboxSelector>,
}

/// The bundle that owns the env file of a sandbox several bundles select: the oldest (then the
/// first by name). Only one bundle may write a sandbox's env file, or they would overwrite each
/// other forever.
pub fn owner<'a>(
    claims: &[Claim<'a>],
    labels: &BTreeMap<String, String>,
    env: Environment,
) -> Option<&'a str> {
    claims
        .iter()
        .filter(|c| c.selector.is_some_and(|s| selects(s, labels, env)))
        .min_by(|a, b| {
            let ka = (a.created.unwrap_or(Timestamp::MAX), a.name);
            let kb = (b.created.unwrap_or(Timestamp::MAX), b.name);
            ka.cmp(&kb)
        })
        .map(|c| c.name)
}

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
    /// `status.instance.state` (EC2's state name), if reported.
    pub instance_state: Option<String>,
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

fn add(t: Timestamp, d: Duration) -> Timestamp {
    t.saturating_add(d).unwrap_or(Timestamp::MAX)
}

fn until(now: Timestamp, t: Timestamp) -> Duration {
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
fn relevant_memory<'a>(inp: &Inputs<'a>, key: &TargetKey, fingerprint: u64) -> Option<&'a Memory> {
    inp.memory.get(key).filter(|m| {
        m.hash.as_deref() == Some(inp.content.hash.as_str())
            && m.generation == inp.generation
            && m.fingerprint == fingerprint
    })
}

fn entry(key: &TargetKey, prev: Option<&BundleTargetStatus>) -> BundleTargetStatus {
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
fn gate(inp: &Inputs<'_>, a: &mut Assessment, mem: Option<&Memory>, why: Why) {
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

fn assess_sandbox(
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
    if s.instance_state.as_deref() != Some("running") {
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

fn assess_fly(
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
fn assess_fly_api(
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
fn staged_message(fly: &FlyVisit, inp: &Inputs<'_>) -> String {
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

/// A target as the summary sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct Standing {
    /// Its status entry.
    pub entry: BundleTargetStatus,
    /// Whether it holds Ready back.
    pub blocks_ready: bool,
}

/// Builds the status from the targets' standing (content valid).
pub fn summarize(
    old: &SecretBundleStatus,
    generation: Option<i64>,
    content: &Content,
    targets: Vec<Standing>,
    invalid_credentials: &[String],
    now: Timestamp,
) -> SecretBundleStatus {
    let mut st = old.clone();
    st.observed_generation = generation;
    st.content_hash = Some(content.hash.clone());
    st.keys = content.vars.keys().cloned().collect();
    st.key_count = i32::try_from(content.vars.len()).unwrap_or(i32::MAX);
    st.total_targets = i32::try_from(targets.len()).unwrap_or(i32::MAX);
    st.synced_targets = i32::try_from(
        targets
            .iter()
            .filter(|t| t.entry.state == BundleTargetState::Synced)
            .count(),
    )
    .unwrap_or(i32::MAX);
    let names = |pred: &dyn Fn(&Standing) -> bool| -> Vec<String> {
        targets
            .iter()
            .filter(|t| pred(t))
            .map(|t| match t.entry.kind {
                BundleTargetKind::Sandbox => format!("sandbox {}", t.entry.name),
                BundleTargetKind::FlyApp => format!("Fly.io app {}", t.entry.name),
            })
            .collect()
    };
    let failed = names(&|t| t.entry.state == BundleTargetState::Failed);
    // The first failure's own words (scrubbed at the edge), so Ready says what went wrong:
    // "restarting worker: ..." is not "synced", whatever hash the agent reports.
    let first_failure = targets
        .iter()
        .find(|t| t.entry.state == BundleTargetState::Failed)
        .and_then(|t| t.entry.message.as_deref())
        .map(|m| excerpt(m, 300));
    let skipped = names(&|t| t.entry.state == BundleTargetState::Skipped);
    let waiting = names(&|t| t.entry.state == BundleTargetState::Pending && t.blocks_ready);
    let parked = names(&|t| t.entry.state == BundleTargetState::Pending && !t.blocks_ready);
    let staged = names(&|t| t.entry.state == BundleTargetState::Staged);
    let total = targets.len();
    // Staged targets hold the content too (in the app's secrets, not yet in its Machines).
    let synced = total - failed.len() - skipped.len() - waiting.len() - parked.len();
    // The one reason every failed (or every skipped) target shares, when they carry one: a
    // Fly.io API answer (FlyUnauthorized, FlyThrottled, ...) says more than SyncFailed.
    let shared_reason = |state: BundleTargetState| -> Option<String> {
        let mut reasons = targets
            .iter()
            .filter(|t| t.entry.state == state)
            .map(|t| t.entry.reason.clone());
        let first = reasons.next()??;
        reasons
            .all(|r| r.as_deref() == Some(&first))
            .then_some(first)
    };
    let failed_reason = shared_reason(BundleTargetState::Failed);
    let skipped_reason = shared_reason(BundleTargetState::Skipped);
    st.targets = targets.into_iter().map(|t| t.entry).collect();

    let hash = content.short_hash();
    let (status, why, message) = if !invalid_credentials.is_empty() {
        (
            FALSE,
            reason::INVALID_SPEC,
            format!(
                "{}; that target waits for an edit",
                list(invalid_credentials)
            ),
        )
    } else if !failed.is_empty() {
        (
            FALSE,
            failed_reason.as_deref().unwrap_or(reason::SYNC_FAILED),
            match &first_failure {
                Some(m) => format!(
                    "{} of {total} targets failed to take content {hash}: {} (first: {m})",
                    failed.len(),
                    list(&failed)
                ),
                None => format!(
                    "{} of {total} targets failed to take content {hash}: {}",
                    failed.len(),
                    list(&failed)
                ),
            },
        )
    } else if !waiting.is_empty() {
        (
            FALSE,
            reason::SYNCING,
            format!(
                "{synced} of {total} targets hold content {hash}; waiting for {}",
                list(&waiting)
            ),
        )
    } else if total == 0 {
        (
            TRUE,
            reason::NO_TARGETS,
            "no Sandbox matches the selector and no Fly.io app is named".to_string(),
        )
    } else {
        let mut m = format!("{synced} of {total} targets hold content {hash}");
        if !parked.is_empty() {
            m.push_str(&format!(
                "; {} when they run: {}",
                parked.len(),
                list(&parked)
            ));
        }
        if !skipped.is_empty() {
            m.push_str(&format!("; skipped: {}", list(&skipped)));
        }
        if staged.is_empty() {
            (TRUE, reason::SYNCED, m)
        } else {
            m.push_str(&format!(
                "; staged, not deployed: {} (the apps' Machines take it at their next deploy or update)",
                list(&staged)
            ));
            (TRUE, reason::STAGED, m)
        }
    };
    conditions::set(
        &mut st.conditions,
        Desired {
            type_: cond::READY,
            status,
            reason: why,
            message,
        },
        generation,
        now,
    );
    let degraded = if !failed.is_empty() || !invalid_credentials.is_empty() {
        let mut all = failed.clone();
        all.extend(skipped.iter().cloned());
        let why = match (
            &failed_reason,
            invalid_credentials.is_empty(),
            skipped.is_empty(),
        ) {
            (Some(r), true, true) => r.as_str(),
            _ => "TargetsFailed",
        };
        Some((why, format!("failing: {}", list(&all))))
    } else if !skipped.is_empty() {
        Some((
            skipped_reason.as_deref().unwrap_or("TargetsSkipped"),
            format!("skipped: {}", list(&skipped)),
        ))
    } else {
        None
    };
    match degraded {
        Some((why, message)) => {
            conditions::set(
                &mut st.conditions,
                Desired {
                    type_: cond::DEGRADED,
                    status: TRUE,
                    reason: why,
                    message,
                },
                generation,
                now,
            );
        }
        None => {
            conditions::remove(&mut st.conditions, cond::DEGRADED);
        }
    }
    st
}

/// The status when the sources cannot be rendered: Ready False naming the problem, the targets
/// left as they are (they keep the last content they took).
pub fn summarize_invalid(
    old: &SecretBundleStatus,
    generation: Option<i64>,
    problems: &[SourceProblem],
    now: Timestamp,
) -> SecretBundleStatus {
    let mut st = old.clone();
    st.observed_generation = generation;
    let why = problems
        .first()
        .map_or(reason::INVALID_SPEC, SourceProblem::reason);
    conditions::set(
        &mut st.conditions,
        Desired {
            type_: cond::READY,
            status: FALSE,
            reason: why,
            message: problems_message(problems),
        },
        generation,
        now,
    );
    st
}

/// At most `max` bytes of `s` (cut on a character boundary), marked when cut.
fn excerpt(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut cut = max;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}...", &s[..cut])
}

fn list(names: &[String]) -> String {
    let mut out = names.iter().take(5).cloned().collect::<Vec<_>>().join(", ");
    if names.len() > 5 {
        out.push_str(&format!(" and {} more", names.len() - 5));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src(name: &str, keys: Option<&[&str]>) -> SecretSource {
        SecretSource {
            secret_name: name.into(),
            keys: keys.map(|k| k.iter().map(|s| s.to_string()).collect()),
        }
    }

    fn data(name: &str, kv: &[(&str, &str)]) -> SourceData {
        SourceData {
            name: name.into(),
            data: Some(
                kv.iter()
                    .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
                    .collect(),
            ),
        }
    }

    const SECRET_VALUE: &str = "hunter2-s3cr3t-value";

    #[test]
    fn renders_sorted_and_round_trips_through_the_agents_parser() {
        let nasty = [
            "plain",
            "",
            " leading and trailing spaces ",
            "quote\" and 'single' and \\ backslash",
            "multi\nline\nvalue\n",
            "\r\n windows \r\n",
            "$HOME and ${PATH} and `cmd` and $(cmd)",
            "# not a comment",
            "a=b=c",
            "\"\"\"triple\"\"\"",
            "tab\there",
            "ünïcødé ✓",
            "-----BEGIN KEY-----\nMIIB\n-----END KEY-----",
        ];
        let kv: Vec<(String, String)> = nasty
            .iter()
            .enumerate()
            .map(|(i, v)| (format!("K_{i:02}"), v.to_string()))
            .collect();
        let pairs: Vec<(&str, &str)> = kv.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let c = render(&[src("s", None)], &[data("s", &pairs)]).unwrap();
        let parsed = envfile::parse(&c.env).unwrap().to_map();
        assert_eq!(parsed, c.vars);
        assert_eq!(c.vars.len(), nasty.len());
        // Sorted keys, one file, deterministic hash.
        let keys: Vec<String> = envfile::parse(&c.env)
            .unwrap()
            .entries
            .into_iter()
            .map(|e| e.key)
            .collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);
        let again = render(&[src("s", None)], &[data("s", &pairs)]).unwrap();
        assert_eq!(again.hash, c.hash);
        assert_eq!(c.hash, envfile::sha256_hex(c.env.as_bytes()));
        // The Debug form shows keys and the hash, never a value.
        let dbg = format!("{c:?}");
        assert!(
            dbg.contains("K_00") && !dbg.contains("leading and trailing"),
            "{dbg}"
        );
    }

    #[test]
    fn order_of_sources_does_not_change_the_hash() {
        let a = data("a", &[("A", "1"), ("Z", "2")]);
        let b = data("b", &[("M", "3")]);
        let c1 = render(&[src("a", None), src("b", None)], &[a.clone(), b.clone()]).unwrap();
        let c2 = render(&[src("b", None), src("a", None)], &[b, a]).unwrap();
        assert_eq!(c1.hash, c2.hash);
    }

    #[test]
    fn subsets_pick_only_listed_keys() {
        let c = render(
            &[src("a", Some(&["B"]))],
            &[data("a", &[("A", "1"), ("B", "2")])],
        )
        .unwrap();
        assert_eq!(c.vars.keys().collect::<Vec<_>>(), ["B"]);
    }

    #[test]
    fn duplicate_keys_are_an_error_naming_the_key_never_the_value() {
        let err = render(
            &[src("a", None), src("b", None)],
            &[
                data("a", &[("DB_URL", SECRET_VALUE)]),
                data("b", &[("DB_URL", SECRET_VALUE), ("OK", "x")]),
            ],
        )
        .unwrap_err();
        assert_eq!(
            err,
            vec![SourceProblem::DuplicateKey {
                key: "DB_URL".into(),
                first: "a".into(),
                second: "b".into()
            }]
        );
        assert_eq!(err[0].reason(), reason::INVALID_SPEC);
        let msg = problems_message(&err);
        assert!(msg.contains("DB_URL") && msg.contains("Secret a") && msg.contains("Secret b"));
        assert!(!msg.contains(SECRET_VALUE), "{msg}");
        // A key listed twice for one source, too.
        let err = render(&[src("a", Some(&["K", "K"]))], &[data("a", &[("K", "v")])]).unwrap_err();
        assert!(matches!(&err[0], SourceProblem::DuplicateKey { key, .. } if key == "K"));
    }

    #[test]
    fn invalid_key_names_are_an_error_naming_the_key() {
        for bad in ["my-key", "1ABC", "tls.crt", "has space", ""] {
            let err = render(&[src("s", None)], &[data("s", &[(bad, SECRET_VALUE)])]).unwrap_err();
            assert_eq!(err[0].reason(), reason::INVALID_SPEC, "{bad}");
            let msg = problems_message(&err);
            assert!(msg.contains(&format!("{bad:?}")), "{msg}");
            assert!(!msg.contains(SECRET_VALUE), "{msg}");
        }
    }

    #[test]
    fn missing_sources_values_and_empty_bundles() {
        let err = render(
            &[src("gone", None), src("here", None)],
            &[
                SourceData {
                    name: "gone".into(),
                    data: None,
                },
                data("here", &[("A", "1")]),
            ],
        )
        .unwrap_err();
        assert_eq!(
            err,
            vec![SourceProblem::SecretMissing {
                secret: "gone".into()
            }]
        );
        assert_eq!(err[0].reason(), "SourceSecretMissing");
        assert!(problems_message(&err).contains("gone"));

        let err = render(&[src("s", Some(&["NOPE"]))], &[data("s", &[("A", "1")])]).unwrap_err();
        assert_eq!(err[0].reason(), "SourceKeyMissing");

        let mut d = data("s", &[]);
        d.data
            .as_mut()
            .unwrap()
            .insert("BIN".into(), vec![0xff, 0xfe]);
        let err = render(&[src("s", None)], &[d]).unwrap_err();
        assert_eq!(err[0].reason(), reason::INVALID_VALUE);

        let err = render(&[src("s", None)], &[data("s", &[("N", "a\0b")])]).unwrap_err();
        assert!(matches!(err[0], SourceProblem::NulByte { .. }));

        let err = render(&[src("s", None)], &[data("s", &[])]).unwrap_err();
        assert_eq!(err, vec![SourceProblem::NoKeys]);
    }

    #[test]
    fn selectors() {
        let labels: BTreeMap<String, String> = [("app", "worker"), ("tier", "gold")]
            .map(|(k, v)| (k.into(), v.into()))
            .into();
        let mut sel = SandboxSelector::default();
        assert!(selects(&sel, &labels, Environment::Staging));
        sel.match_labels.insert("app".into(), "worker".into());
        assert!(selects(&sel, &labels, Environment::Staging));
        sel.environment = Some(Environment::Prod);
        assert!(!selects(&sel, &labels, Environment::Staging));
        sel.environment = None;
        let req = |op: &str, vals: &[&str]| LabelSelectorRequirement {
            key: "tier".into(),
            operator: op.into(),
            values: Some(vals.iter().map(|s| s.to_string()).collect()),
        };
        sel.match_expressions = vec![req("In", &["gold", "silver"])];
        assert!(selects(&sel, &labels, Environment::Dev));
        sel.match_expressions = vec![req("NotIn", &["gold"])];
        assert!(!selects(&sel, &labels, Environment::Dev));
        sel.match_expressions = vec![req("Exists", &[])];
        assert!(selects(&sel, &labels, Environment::Dev));
        sel.match_expressions = vec![req("DoesNotExist", &[])];
        assert!(!selects(&sel, &labels, Environment::Dev));
        sel.match_expressions = vec![req("Bogus", &[])];
        assert!(!selects(&sel, &labels, Environment::Dev));
    }

    #[test]
    fn the_oldest_bundle_owns_a_shared_sandbox() {
        let labels: BTreeMap<String, String> = [("app".to_string(), "w".to_string())].into();
        let all = SandboxSelector::default();
        let t0: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let t1: Timestamp = "2026-01-02T00:00:00Z".parse().unwrap();
        let claims = [
            Claim {
                name: "young",
                created: Some(t1),
                selector: Some(&all),
            },
            Claim {
                name: "old",
                created: Some(t0),
                selector: Some(&all),
            },
            Claim {
                name: "fly-only",
                created: None,
                selector: None,
            },
        ];
        assert_eq!(owner(&claims, &labels, Environment::Dev), Some("old"));
    }

    // ---- planning ----

    fn content() -> Content {
        render(&[src("s", None)], &[data("s", &[("A", "1")])]).unwrap()
    }

    fn now() -> Timestamp {
        "2026-03-01T12:00:00Z".parse().unwrap()
    }

    fn sbx(name: &str, state: &str) -> SandboxObs {
        SandboxObs {
            name: name.into(),
            instance_state: Some(state.into()),
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

    #[test]
    fn summary_conditions() {
        let c = content();
        let old = SecretBundleStatus::default();
        let e = |name: &str, state| Standing {
            entry: BundleTargetStatus {
                kind: BundleTargetKind::Sandbox,
                name: name.into(),
                synced_hash: None,
                synced_at: None,
                state,
                message: None,
                reason: None,
                fly: None,
            },
            blocks_ready: state != BundleTargetState::Skipped,
        };
        let st = summarize(
            &old,
            Some(2),
            &c,
            vec![
                e("a", BundleTargetState::Synced),
                e("b", BundleTargetState::Synced),
            ],
            &[],
            now(),
        );
        assert_eq!(
            (st.synced_targets, st.total_targets, st.key_count),
            (2, 2, 1)
        );
        assert_eq!(st.keys, ["A"]);
        assert_eq!(st.content_hash.as_ref(), Some(&c.hash));
        assert!(conditions::is_true(&st.conditions, cond::READY));
        assert!(conditions::get(&st.conditions, cond::DEGRADED).is_none());
        // Unchanged input: unchanged status (so no write).
        let again = summarize(
            &st,
            Some(2),
            &c,
            vec![
                e("a", BundleTargetState::Synced),
                e("b", BundleTargetState::Synced),
            ],
            &[],
            now() + Duration::from_secs(60),
        );
        assert_eq!(again, st);

        let st = summarize(
            &st,
            Some(2),
            &c,
            vec![
                e("a", BundleTargetState::Synced),
                e("b", BundleTargetState::Skipped),
            ],
            &[],
            now(),
        );
        assert!(conditions::is_true(&st.conditions, cond::READY));
        let d = conditions::get(&st.conditions, cond::DEGRADED).unwrap();
        assert_eq!(
            (d.status.as_str(), d.reason.as_str()),
            (TRUE, "TargetsSkipped")
        );

        let st = summarize(
            &st,
            Some(2),
            &c,
            vec![
                e("a", BundleTargetState::Failed),
                e("b", BundleTargetState::Synced),
            ],
            &[],
            now(),
        );
        let r = conditions::get(&st.conditions, cond::READY).unwrap();
        assert_eq!(
            (r.status.as_str(), r.reason.as_str()),
            (FALSE, reason::SYNC_FAILED)
        );
        assert!(r.message.contains("sandbox a"));

        let st = summarize(
            &st,
            Some(2),
            &c,
            vec![],
            &["Fly.io app x: bad token".into()],
            now(),
        );
        let r = conditions::get(&st.conditions, cond::READY).unwrap();
        assert_eq!(r.reason, reason::INVALID_SPEC);

        let st = summarize_invalid(
            &st,
            Some(3),
            &[SourceProblem::SecretMissing {
                secret: "db".into(),
            }],
            now(),
        );
        let r = conditions::get(&st.conditions, cond::READY).unwrap();
        assert_eq!(r.reason, "SourceSecretMissing");
        assert!(r.message.contains("db"));
        assert_eq!(st.observed_generation, Some(3));
    }

    #[test]
    fn an_unreadable_refresh_interval_is_an_invalid_spec_naming_the_field_never_a_default() {
        let spec = |refresh: &str| -> SecretBundleSpec {
            serde_json::from_value(serde_json::json!({
                "sources": [{"secretName": "db"}],
                "targets": {},
                "refreshInterval": refresh,
            }))
            .unwrap()
        };
        assert_eq!(
            validate(&spec("30m")).unwrap().refresh,
            Duration::from_secs(1800)
        );
        // An older object's shorter interval is raised to the floor, not refused.
        assert_eq!(validate(&spec("2s")).unwrap().refresh, MIN_REFRESH);

        // As stored before the CRD checked durations.
        let problems = validate(&spec("1 hour")).unwrap_err();
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].reason(), reason::INVALID_SPEC);
        let said = problems[0].to_string();
        assert!(
            said.starts_with("spec.refreshInterval: ")
                && said.contains("\"1 hour\"")
                && said.contains("such as 30s, 5m or 1h30m"),
            "{said}"
        );
        // Reported as Ready=False InvalidSpec, together with a problem of the sources, the
        // duration first.
        let mut all = problems.clone();
        all.push(SourceProblem::SecretMissing {
            secret: "db".into(),
        });
        let st = summarize_invalid(&SecretBundleStatus::default(), Some(2), &all, now());
        let r = conditions::get(&st.conditions, cond::READY).unwrap();
        assert_eq!(
            (r.status.as_str(), r.reason.as_str()),
            (FALSE, reason::INVALID_SPEC)
        );
        assert!(
            r.message.contains("spec.refreshInterval") && r.message.contains("db"),
            "{}",
            r.message
        );
    }
}
