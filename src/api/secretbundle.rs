//! `SecretBundle` (short name `secbundle`): Secrets rendered into a `.env` on every sandbox and
//! pushed to Fly.io apps.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::common::{SandboxSelector, SecretKeyRef};

/// Secrets rendered into one deterministic `.env` and pushed to sandboxes and Fly.io apps.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "fleet.valet.dev",
    version = "v1alpha1",
    kind = "SecretBundle",
    namespaced,
    status = "SecretBundleStatus",
    shortname = "secbundle",
    category = "fleet",
    derive = "PartialEq",
    doc = "A SecretBundle renders Kubernetes Secrets into a .env pushed to sandboxes and Fly.io apps.",
    printcolumn(
        name = "Hash",
        type_ = "string",
        json_path = ".status.contentHash",
        priority = 1
    ),
    printcolumn(name = "Keys", type_ = "integer", json_path = ".status.keyCount"),
    printcolumn(
        name = "Synced",
        type_ = "integer",
        json_path = ".status.syncedTargets"
    ),
    printcolumn(
        name = "Targets",
        type_ = "integer",
        json_path = ".status.totalTargets"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.targets.sandboxes) || size(self.targets.flyApps) > 0").message("spec.targets needs sandboxes, flyApps or both"))]
pub struct SecretBundleSpec {
    /// The Secrets to render, in this namespace. A key that two sources define is an error, not
    /// a silent override.
    #[schemars(length(min = 1, max = 16))]
    pub sources: Vec<SecretSource>,
    /// Where the rendered `.env` goes.
    pub targets: BundleTargets,
    /// How often to compare what targets hold with what they should hold, and resync drift,
    /// for example 1h. Source Secret changes resync at once, by watch.
    #[serde(default = "default_refresh_interval")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new(r"self.matches('^([0-9]+(\\.[0-9]+)?(ms|s|m|h))+$') && duration(self) >= duration('10s')").message("refreshInterval must be a duration of at least 10s, such as 1h"))]
    pub refresh_interval: String,
    /// The most targets synced at once.
    #[serde(default = "default_max_parallel")]
    #[schemars(range(min = 1, max = 100))]
    pub max_parallel: i32,
}

fn default_refresh_interval() -> String {
    "1h".into()
}
fn default_max_parallel() -> i32 {
    5
}

/// One source Secret.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretSource {
    /// The Secret's name, in this namespace.
    #[schemars(length(min = 1, max = 253))]
    pub secret_name: String,
    /// Only these keys; every key of the Secret when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256), inner(length(max = 253)))]
    #[x_kube(validation = Rule::new("self.all(k, k.matches('^[A-Za-z_][A-Za-z0-9_]*$'))").message("keys must be environment variable names: letters, digits and _, not starting with a digit"))]
    pub keys: Option<Vec<String>>,
}

/// Where a bundle's `.env` goes.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BundleTargets {
    /// Sandboxes whose agent writes the `.env` and restarts the named services.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandboxes: Option<SandboxTargets>,
    /// Fly.io apps that get the values, each listed once: through Fly's Machines API (the app
    /// secrets endpoints) or through `flyctl secrets import` (see `method`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new("self.all(a, self.exists_one(b, b.app == a.app))").message("flyApps lists an app more than once: list each app once"))]
    pub fly_apps: Vec<FlyAppTarget>,
}

/// The Sandboxes a bundle goes to.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SandboxTargets {
    /// Which Sandboxes, in this namespace.
    #[serde(default)]
    pub selector: SandboxSelector,
    /// Services the agent restarts after writing the file (each must be on the agent's allow
    /// list): names of letters, digits, `-`, `_`, `.` and `@`, each listed once.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(length(min = 1, max = 63)))]
    #[x_kube(
        validation = Rule::new("self.all(s, s.matches('^[A-Za-z0-9_.@-]+$'))").message(Message::Expression("'restartServices entry ' + self.filter(s, !s.matches('^[A-Za-z0-9_.@-]+$'))[0] + ' is not a service name: use letters, digits, -, _, . and @ (the name on the agent allow list)'".into())),
        validation = Rule::new("self.all(s, self.exists_one(t, t == s))").message(Message::Expression("'restartServices lists ' + self.filter(s, !self.exists_one(t, t == s))[0] + ' more than once'".into()))
    )]
    pub restart_services: Vec<String>,
}

/// One Fly.io app.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FlyAppTarget {
    /// The Fly.io app name: lower-case letters, digits and `-`, starting and ending with a letter
    /// or digit.
    #[schemars(length(min = 1, max = 63))]
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([a-z0-9-]*[a-z0-9])?$')").message(Message::Expression("'app must be a Fly.io app name: lower-case letters, digits and -, starting and ending with a letter or digit (got ' + self + ')'".into())))]
    pub app: String,
    /// The Secret key holding the Fly.io API token for this app.
    pub token_secret_ref: SecretKeyRef,
    /// Stage the secrets (`--stage`): the app picks them up on its next deploy instead of
    /// restarting now. flyctl only: the API always stages (Fly's Machines take new secrets when
    /// they are next updated or deployed).
    #[serde(default)]
    pub stage: bool,
    /// How the secrets reach the app: `Api` (Fly's Machines API, no CLI needed) or `Flyctl`
    /// (`flyctl secrets import`). Unset: the operator's default (`Api`, or `Flyctl` when the
    /// operator is started with `--flyctl`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<FlyMethod>,
}

/// How a bundle's secrets reach a Fly.io app.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FlyMethod {
    /// Fly's Machines API (`/v1/apps/{app}/secrets`): the secrets are set and staged; drift is
    /// seen from their digests, and keys the bundle no longer holds are unset.
    Api,
    /// `flyctl secrets import`: the operator's image must hold flyctl.
    Flyctl,
}

/// The kind of a bundle target.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum BundleTargetKind {
    /// A Sandbox, through its agent.
    Sandbox,
    /// A Fly.io app, through its API or flyctl.
    FlyApp,
}

/// Where one target of a bundle stands.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum BundleTargetState {
    /// Not synced yet (or waiting for its sandbox to start).
    Pending,
    /// Holds the bundle's current content.
    Synced,
    /// The last sync failed; it is retried with backoff.
    Failed,
    /// Not synced, on purpose (for example a Fly.io app that does not exist).
    Skipped,
    /// A Fly.io app's secrets hold the bundle's content, staged: its Machines take it when they
    /// are next updated or deployed (Fly's API sets secrets without deploying them).
    Staged,
}

/// The observed state of a bundle.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretBundleStatus {
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready and, on problems, Degraded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The sha256 of the rendered `.env`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_hash: Option<String>,
    /// The key names in the `.env` (never the values).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<String>,
    /// How many keys.
    #[serde(default)]
    pub key_count: i32,
    /// How many targets hold the current content.
    #[serde(default)]
    pub synced_targets: i32,
    /// How many targets there are.
    #[serde(default)]
    pub total_targets: i32,
    /// One entry per target.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<BundleTargetStatus>,
}

/// Where one target of a bundle stands.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BundleTargetStatus {
    /// Sandbox or FlyApp.
    pub kind: BundleTargetKind,
    /// The Sandbox's or app's name.
    pub name: String,
    /// The content hash the target last acknowledged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub synced_hash: Option<String>,
    /// When it was last synced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub synced_at: Option<Time>,
    /// Pending, Synced, Staged, Failed or Skipped.
    pub state: BundleTargetState,
    /// What happened (never a value).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Why it failed or was skipped, in one CamelCase word (Fly.io API targets: FlyUnauthorized,
    /// FlyAppNotFound, FlyRejected, FlyThrottled, FlyUnavailable, FlyUnreachable).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// A Fly.io app pushed through the API: the keys this bundle manages there and what its
    /// digests looked like after the last set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fly: Option<FlyAppStatus>,
}

/// What a bundle knows of a Fly.io app's secrets (API method). Key names and a fingerprint of
/// Fly's digests only, never a value or a digest.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FlyAppStatus {
    /// The keys this bundle set on the app: the only ones it ever unsets. Secrets that others
    /// set are left alone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub managed_keys: Vec<String>,
    /// sha256 of the managed keys' names and the digests Fly reported right after the last
    /// set: a later list whose digests differ is drift.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest_fingerprint: Option<String>,
    /// When the app's secrets were last listed and compared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checked_at: Option<Time>,
    /// The managed keys last found changed or missing on Fly.io (then set again).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drifted_keys: Vec<String>,
    /// When that drift was seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drift_seen_at: Option<Time>,
}

/// The condition types of a SecretBundle's status.
pub mod bundle_condition {
    /// The summary: every target that can hold the content holds it.
    pub const READY: &str = crate::api::conditions::READY;
    /// The warning: some targets are skipped or failing (present only then).
    pub const DEGRADED: &str = "Degraded";
}

/// The reasons of a SecretBundle's conditions and Events (CamelCase).
pub mod bundle_reason {
    /// A key is not an environment variable name, or two sources define it, or a Fly.io token
    /// is not a Fly.io token, or a field does not parse (a duration, the selector).
    pub const INVALID_SPEC: &str = "InvalidSpec";
    /// A value cannot be an environment variable (not UTF-8, or a NUL byte).
    pub const INVALID_VALUE: &str = "InvalidValue";
    /// A source Secret does not exist.
    pub const SOURCE_SECRET_MISSING: &str = "SourceSecretMissing";
    /// A key listed in `sources[].keys` is not in its Secret.
    pub const SOURCE_KEY_MISSING: &str = "SourceKeyMissing";
    /// The sources hold no key at all (an empty `.env` would wipe every target).
    pub const NO_KEYS: &str = "NoKeys";
    /// Every target that can hold the content holds it (and the Event of a round's pushes).
    pub const SYNCED: &str = "Synced";
    /// Nothing matches and no Fly.io app is named.
    pub const NO_TARGETS: &str = "NoTargets";
    /// Some running targets do not hold the content yet.
    pub const SYNCING: &str = "Syncing";
    /// Some targets failed (retried with backoff); also the Event of one failed push.
    pub const SYNC_FAILED: &str = "SyncFailed";
    /// Every target holds the content, some Fly.io apps staged (their Machines take it at their
    /// next deploy or update); also the Event of a round's staged sets.
    pub const STAGED: &str = "Staged";
    /// Degraded: targets are failing.
    pub const TARGETS_FAILED: &str = "TargetsFailed";
    /// Degraded: targets are skipped.
    pub const TARGETS_SKIPPED: &str = "TargetsSkipped";
    /// Event: a target was skipped.
    pub const TARGET_SKIPPED: &str = "TargetSkipped";
    /// Event: a Fly.io app's secrets had drifted from the bundle and were set again.
    pub const FLY_DRIFT: &str = "FlyDrift";
    /// Event: keys the bundle no longer holds were unset on a Fly.io app.
    pub const FLY_UNSET: &str = "FlyUnset";
    /// Fly's API refused the token (401 or 403).
    pub const FLY_UNAUTHORIZED: &str = "FlyUnauthorized";
    /// The Fly.io app does not exist, or the token cannot see it.
    pub const FLY_APP_NOT_FOUND: &str = "FlyAppNotFound";
    /// Fly's API refused the request itself (another 4xx).
    pub const FLY_REJECTED: &str = "FlyRejected";
    /// Fly's API throttled the call (429).
    pub const FLY_THROTTLED: &str = "FlyThrottled";
    /// Fly's API failed (5xx).
    pub const FLY_UNAVAILABLE: &str = "FlyUnavailable";
    /// Fly's API could not be reached, or its answer could not be read.
    pub const FLY_UNREACHABLE: &str = "FlyUnreachable";
    /// Every reason a failure of Fly's API is told by.
    pub const FLY_FAILURES: [&str; 6] = [
        FLY_UNAUTHORIZED,
        FLY_APP_NOT_FOUND,
        FLY_REJECTED,
        FLY_THROTTLED,
        FLY_UNAVAILABLE,
        FLY_UNREACHABLE,
    ];
}
