//! `SandboxDeploy` (short name `sbxdeploy`): roll a worker image tag across selected sandboxes.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::common::SandboxSelector;

/// Set to "true" to abort a running deploy: no new target starts, running ones finish.
pub const ABORT_ANNOTATION: &str = "fleet.valet.dev/abort";
/// Set to a new value (any string, for example a time) to retry the failed targets once.
pub const RETRY_ANNOTATION: &str = "fleet.valet.dev/retry";
/// The field manager a SandboxDeploy uses when it sets a Sandbox's `image.tag`.
pub const DEPLOY_FIELD_MANAGER: &str = "sandbox-operator-deploy";

/// A rollout of one worker image tag across the Sandboxes a selector picks, in waves.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "fleet.valet.dev",
    version = "v1alpha1",
    kind = "SandboxDeploy",
    namespaced,
    status = "SandboxDeployStatus",
    shortname = "sbxdeploy",
    category = "fleet",
    derive = "PartialEq",
    doc = "A SandboxDeploy rolls a worker image tag across the Sandboxes its selector picks, in waves.",
    printcolumn(name = "Image", type_ = "string", json_path = ".spec.image.tag"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Updated", type_ = "integer", json_path = ".status.updated"),
    printcolumn(name = "Total", type_ = "integer", json_path = ".status.total"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.image == oldSelf.image").message("spec.image is immutable; create a new SandboxDeploy for another tag"))]
pub struct SandboxDeploySpec {
    /// The image to roll out.
    pub image: DeployImage,
    /// Which Sandboxes, in this namespace, to roll it to. Chosen once, when the rollout starts.
    #[serde(default)]
    pub selector: SandboxSelector,
    /// How to pace the rollout and what to do on failure.
    #[serde(default)]
    pub strategy: DeployStrategy,
    /// The approval gate: while true nothing new starts (AwaitingApproval before the first wave,
    /// Paused between waves). Set it to false to approve or continue.
    #[serde(default)]
    pub paused: bool,
    /// What CI said about this build.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<DeploySource>,
}

/// The image a deploy rolls out.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DeployImage {
    /// The image repository, for information.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512))]
    pub repository: Option<String>,
    /// The tag to roll out.
    #[schemars(length(max = 128))]
    #[x_kube(validation = Rule::new("self.matches('^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$')").message("image.tag must be a non-empty docker tag: letters, digits, _ . - (not starting with . or -), at most 128 characters"))]
    pub tag: String,
}

/// How a deploy is paced and what it does on failure.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DeployStrategy {
    /// The most targets deploying at once: a count (at least 1) or a percent of the targets
    /// (1% to 100%, rounded up).
    #[serde(default = "default_max_unavailable")]
    #[x_kube(validation = Rule::new("type(self) == int ? self >= 1 : self.matches('^([1-9][0-9]?|100)%$')").message("maxUnavailable must be a count of at least 1 or a percent from 1% to 100%"))]
    pub max_unavailable: IntOrString,
    /// How long to wait for a target's active workers to drain before deploying anyway fails it.
    #[serde(default = "default_drain_timeout")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new(r"self.matches('^([0-9]+(\\.[0-9]+)?(ms|s|m|h))+$') && duration(self) >= duration('1s')").message("drainTimeout must be a duration of at least 1s, such as 5m"))]
    pub drain_timeout: String,
    /// The most one target may take, from drain to verified, before it counts as failed.
    #[serde(default = "default_target_deadline")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new(r"self.matches('^([0-9]+(\\.[0-9]+)?(ms|s|m|h))+$') && duration(self) >= duration('10s')").message("targetDeadline must be a duration of at least 10s, such as 15m"))]
    pub target_deadline: String,
    /// Halt: start no new wave after a failure. Continue: go on with the rest.
    #[serde(default)]
    pub failure_policy: FailurePolicy,
    /// Set failed targets back to the tag they had before.
    #[serde(default = "default_true")]
    pub auto_rollback: bool,
    /// Deploy also to sandboxes that are not healthy (phase Unhealthy, Failed or Terminated, or an agent
    /// reported unhealthy). By default they are skipped, as the seeds deployed only to active
    /// sandboxes, and counted in `status.skipped`.
    #[serde(default)]
    pub include_unhealthy: bool,
}

impl Default for DeployStrategy {
    fn default() -> Self {
        Self {
            max_unavailable: default_max_unavailable(),
            drain_timeout: default_drain_timeout(),
            target_deadline: default_target_deadline(),
            failure_policy: FailurePolicy::default(),
            auto_rollback: true,
            include_unhealthy: false,
        }
    }
}

fn default_max_unavailable() -> IntOrString {
    IntOrString::Int(1)
}
fn default_drain_timeout() -> String {
    "5m".into()
}
fn default_target_deadline() -> String {
    "15m".into()
}
fn default_true() -> bool {
    true
}
fn is_zero(n: &i32) -> bool {
    *n == 0
}

/// What a deploy does after a target fails.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
pub enum FailurePolicy {
    /// Start no new wave; the deploy ends Failed and the rest stay Pending.
    #[default]
    Halt,
    /// Go on with the remaining targets.
    Continue,
}

/// What CI said about the build being deployed.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DeploySource {
    /// The commit sha.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub commit_sha: Option<String>,
    /// The commit message (first 1024 characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub commit_message: Option<String>,
    /// The branch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub branch: Option<String>,
    /// The repository, owner/name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub repository: Option<String>,
    /// The CI run id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub run_id: Option<String>,
    /// The CI run's URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub run_url: Option<String>,
}

/// The phase of a deploy.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeployPhase {
    /// Not started yet.
    Pending,
    /// Paused before the first wave: waiting for `spec.paused` to become false.
    AwaitingApproval,
    /// Rolling out.
    Progressing,
    /// Paused between waves.
    Paused,
    /// Every target succeeded (or was deferred).
    Succeeded,
    /// A target failed.
    Failed,
    /// Aborted by annotation.
    Aborted,
    /// A newer deploy took over every target left to this one.
    Superseded,
}

/// The phase of one target of a deploy.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetPhase {
    /// Waiting for its wave.
    Pending,
    /// Waiting for active workers to finish.
    Draining,
    /// The agent is deploying the new tag.
    Deploying,
    /// Waiting for the agent to report the new tag and healthy.
    Verifying,
    /// Running the new tag and healthy.
    Succeeded,
    /// The deploy failed.
    Failed,
    /// The deploy failed and the sandbox was set back to its previous tag.
    RolledBack,
    /// The sandbox was stopped: it gets the tag when it starts.
    Deferred,
    /// A newer deploy took this target over.
    Superseded,
    /// Not deployed: the sandbox was not healthy when its wave came (see
    /// `spec.strategy.includeUnhealthy`).
    Skipped,
}

/// The observed state of a deploy.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SandboxDeployStatus {
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<DeployPhase>,
    /// Progressing, Complete, Failed and Ready.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// How many targets the deploy has.
    #[serde(default)]
    pub total: i32,
    /// How many run the new tag.
    #[serde(default)]
    pub updated: i32,
    /// How many failed.
    #[serde(default)]
    pub failed: i32,
    /// How many were skipped, not deployed, because they were not healthy (see
    /// `spec.strategy.includeUnhealthy`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub skipped: i32,
    /// The current wave, counting from 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wave: Option<i32>,
    /// One entry per target.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub targets: Vec<DeployTarget>,
    /// The last retry annotation value acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_retry: Option<String>,
    /// When the rollout started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    /// When it finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Time>,
    /// A summary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// One target Sandbox of a deploy.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DeployTarget {
    /// The Sandbox's name.
    pub name: String,
    /// Where this target is.
    pub phase: TargetPhase,
    /// The tag it had before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_tag: Option<String>,
    /// The wave it belongs to, counting from 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wave: Option<i32>,
    /// When its deploy started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    /// When it finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Time>,
    /// What happened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl DeployPhase {
    /// Every phase, in the order a rollout meets them.
    pub const ALL: [DeployPhase; 8] = [
        DeployPhase::Pending,
        DeployPhase::AwaitingApproval,
        DeployPhase::Progressing,
        DeployPhase::Paused,
        DeployPhase::Succeeded,
        DeployPhase::Failed,
        DeployPhase::Aborted,
        DeployPhase::Superseded,
    ];

    /// The phase as written in `status.phase`.
    pub fn as_str(self) -> &'static str {
        match self {
            DeployPhase::Pending => "Pending",
            DeployPhase::AwaitingApproval => "AwaitingApproval",
            DeployPhase::Progressing => "Progressing",
            DeployPhase::Paused => "Paused",
            DeployPhase::Succeeded => "Succeeded",
            DeployPhase::Failed => "Failed",
            DeployPhase::Aborted => "Aborted",
            DeployPhase::Superseded => "Superseded",
        }
    }
}

impl TargetPhase {
    /// The phase as written in `status.targets[].phase`.
    pub fn as_str(self) -> &'static str {
        match self {
            TargetPhase::Pending => "Pending",
            TargetPhase::Draining => "Draining",
            TargetPhase::Deploying => "Deploying",
            TargetPhase::Verifying => "Verifying",
            TargetPhase::Succeeded => "Succeeded",
            TargetPhase::Failed => "Failed",
            TargetPhase::RolledBack => "RolledBack",
            TargetPhase::Deferred => "Deferred",
            TargetPhase::Superseded => "Superseded",
            TargetPhase::Skipped => "Skipped",
        }
    }
}

/// The condition types of a SandboxDeploy's status.
pub mod deploy_condition {
    /// Rolling out (or waiting to).
    pub const PROGRESSING: &str = "Progressing";
    /// Finished with every target updated.
    pub const COMPLETE: &str = "Complete";
    /// A target failed.
    pub const FAILED: &str = "Failed";
    /// The summary.
    pub const READY: &str = crate::api::conditions::READY;
}

/// The reasons of a SandboxDeploy's conditions and Events (CamelCase).
pub mod deploy_reason {
    /// A spec the deploy cannot act on (an unreadable duration, a selector the API refuses).
    pub const INVALID_SPEC: &str = "InvalidSpec";
    /// Held before the first wave until `spec.paused` is false.
    pub const AWAITING_APPROVAL: &str = "AwaitingApproval";
    /// Held between waves while `spec.paused` is true.
    pub const PAUSED: &str = "Paused";
    /// Rolling out.
    pub const PROGRESSING: &str = "Progressing";
    /// Finished (Progressing=False once the rollout ended, however it ended).
    pub const FINISHED: &str = "Finished";
    /// Every target updated.
    pub const SUCCEEDED: &str = "Succeeded";
    /// Finished; the targets not healthy when their wave came were skipped.
    pub const SUCCEEDED_WITH_SKIPPED: &str = "SucceededWithSkipped";
    /// Finished with no target failed (Failed=False).
    pub const NO_FAILURES: &str = "NoFailures";
    /// Finished with failed targets.
    pub const FAILED: &str = "Failed";
    /// Aborted by annotation.
    pub const ABORTED: &str = "Aborted";
    /// A newer deploy took over every target left.
    pub const SUPERSEDED: &str = "Superseded";
    /// A target failed (condition Failed=True, and the per-target Event).
    pub const TARGET_FAILED: &str = "TargetFailed";
    /// Event: a failed target was set back to its previous tag.
    pub const TARGET_ROLLED_BACK: &str = "TargetRolledBack";
    /// Event: a target was skipped, not deployed, as it was not healthy.
    pub const TARGET_SKIPPED: &str = "TargetSkipped";
    /// Event: the failed targets are put back in line by the retry annotation.
    pub const RETRYING: &str = "Retrying";
    /// Event: the selector matched no Sandbox.
    pub const NO_TARGETS: &str = "NoTargets";
    /// Event: the targets were chosen and the rollout started.
    pub const ROLLOUT_STARTED: &str = "RolloutStarted";
    /// Event: a wave started.
    pub const WAVE_STARTED: &str = "WaveStarted";
    /// Event: no new wave starts after a failure (failurePolicy Halt).
    pub const HALTED: &str = "Halted";
    /// Event: the rollout finished with failed targets.
    pub const ROLLOUT_FAILED: &str = "RolloutFailed";
    /// Event: the rollout finished.
    pub const ROLLOUT_FINISHED: &str = "RolloutFinished";
}
