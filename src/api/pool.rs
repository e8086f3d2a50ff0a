//! `SandboxPool` (short name `sbxpool`): a fleet of Sandboxes of a declared size, made from one
//! template, with a warm standby of stopped instances, busy-aware scale-in and, optionally,
//! scaling from the agents' load. `kubectl scale`, an HPA or KEDA drive its scale subresource.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::sandbox::SandboxSpec;

/// The label every member carries: the name of the pool that owns it.
pub const POOL_LABEL: &str = "fleet.valet.dev/pool";
/// The label naming the template launch settings a member was made from (a hash of them): a
/// member whose hash differs from the pool's is replaced.
pub const TEMPLATE_HASH_LABEL: &str = "fleet.valet.dev/template-hash";
/// Set by the pool on a member it is removing (the time it started): the member is drained and
/// deleted once its workers are done, or per `scaleDown.afterDrainTimeout`.
pub const RETIRING_ANNOTATION: &str = "fleet.valet.dev/retiring-since";
/// The field manager the pool creates and changes its members with.
pub const POOL_FIELD_MANAGER: &str = "sandbox-operator-pool";
/// The field manager the pool's autoscaler sets `spec.replicas` with.
pub const AUTOSCALE_FIELD_MANAGER: &str = "sandbox-operator-autoscale";

/// A fleet of Sandboxes of a declared size, like a ReplicaSet for sandboxes.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "fleet.valet.dev",
    version = "v1alpha1",
    kind = "SandboxPool",
    namespaced,
    status = "SandboxPoolStatus",
    shortname = "sbxpool",
    category = "fleet",
    derive = "PartialEq",
    doc = "A SandboxPool keeps a number of Sandboxes made from one template running, a standby of stopped ones, and scales in without interrupting a busy worker.",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(name = "Desired", type_ = "integer", json_path = ".spec.replicas"),
    printcolumn(name = "Current", type_ = "integer", json_path = ".status.replicas"),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.ready"),
    printcolumn(name = "Busy", type_ = "integer", json_path = ".status.busy"),
    printcolumn(name = "Standby", type_ = "integer", json_path = ".status.standby"),
    printcolumn(name = "Image", type_ = "string", json_path = ".status.imageTag"),
    printcolumn(name = "Scaler", type_ = "string", json_path = ".status.scaler"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("has(self.template.spec.launch) && !has(self.template.spec.instanceId)").message("a pool launches its members: set template.spec.launch and leave template.spec.instanceId unset"),
    validation = Rule::new("self.template.spec.managementPolicy != 'ObserveOnly'").message("a pool starts, stops and deletes its members: template.spec.managementPolicy must be Full"),
    validation = Rule::new("self.maxSurge + self.maxUnavailable >= 1").message("maxSurge and maxUnavailable cannot both be 0: a replacement could never start"),
    validation = Rule::new("!has(self.autoscale) || self.autoscale.minReplicas <= self.autoscale.maxReplicas").message("autoscale.minReplicas must not be greater than autoscale.maxReplicas"),
    validation = Rule::new("!has(self.autoscale) || (self.replicas >= self.autoscale.minReplicas && self.replicas <= self.autoscale.maxReplicas)").message("with autoscale set, replicas must lie within autoscale.minReplicas and autoscale.maxReplicas: change the bounds, or remove autoscale to scale by hand or with an HPA/KEDA")
)]
pub struct SandboxPoolSpec {
    /// How many members should run (powerState Running). The scale subresource's replicas.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: i32,
    /// The Sandbox every member is made from.
    pub template: PoolTemplate,
    /// How many extra members to keep launched but stopped: a scale-out starts these first
    /// (seconds) and launches new instances only for the rest.
    #[serde(default)]
    #[schemars(range(min = 0, max = 100))]
    pub standby: i32,
    /// How members are removed on scale-in.
    #[serde(default)]
    pub scale_down: ScaleDownPolicy,
    /// How many members beyond `replicas` may exist while members are replaced (template
    /// launch settings changed).
    #[serde(default = "default_max_surge")]
    #[schemars(range(min = 0, max = 100))]
    pub max_surge: i32,
    /// How many of `replicas` may be out of service at once while members are replaced.
    #[serde(default)]
    #[schemars(range(min = 0, max = 100))]
    pub max_unavailable: i32,
    /// Let the pool set `replicas` itself from its agents' load. Leave it out when an HPA,
    /// KEDA or a person drives the scale subresource.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscale: Option<AutoscaleSpec>,
}

fn default_replicas() -> i32 {
    1
}
fn default_max_surge() -> i32 {
    1
}

/// The template of a member.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PoolTemplate {
    /// Labels of every member.
    #[serde(default)]
    pub metadata: PoolTemplateMeta,
    /// The Sandbox spec of every member. Its `launch` and `instanceType` may change (members
    /// are then replaced, within `maxSurge` and `maxUnavailable`); `image.tag` is set by a
    /// SandboxDeploy that succeeded on the members (its field manager) so later members run the
    /// fleet's tag.
    #[schemars(schema_with = "template_spec_schema")]
    pub spec: SandboxSpec,
}

/// Labels of a member.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PoolTemplateMeta {
    /// Labels every member carries (besides `fleet.valet.dev/pool`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 32, "additionalProperties" = {"type": "string", "maxLength": 63}))]
    #[x_kube(validation = Rule::new("self.all(k, size(k) <= 253 && !k.startsWith('fleet.valet.dev/'))").message("template labels must not use the fleet.valet.dev/ prefix: the pool sets fleet.valet.dev/pool and fleet.valet.dev/template-hash itself"))]
    pub labels: BTreeMap<String, String>,
}

/// A Sandbox's schema without its rules that compare with the old object (a template's launch
/// settings may change: that replaces the members, it does not edit them).
fn template_spec_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let mut schema = <SandboxSpec as schemars::JsonSchema>::json_schema(generator);
    if let Some(rules) = schema
        .as_object_mut()
        .and_then(|o| o.get_mut("x-kubernetes-validations"))
        .and_then(|v| v.as_array_mut())
    {
        rules.retain(|r| {
            !r.get("rule")
                .and_then(|r| r.as_str())
                .is_some_and(|r| r.contains("oldSelf"))
        });
    }
    schema
}

/// How members are removed on scale-in.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ScaleDownPolicy {
    /// A member counts as idle once its agent has reported zero active workers for this long;
    /// idle members go before busy ones.
    #[serde(default = "default_idle_window")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new(r"self.matches('^([0-9]+(\\.[0-9]+)?(ms|s|m|h))+$') && duration(self) >= duration('0s')").message("scaleDown.idleWindow must be a duration, such as 5m"))]
    pub idle_window: String,
    /// How long a busy member being removed may take to finish its workers after it was
    /// drained.
    #[serde(default = "default_drain_timeout")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new(r"self.matches('^([0-9]+(\\.[0-9]+)?(ms|s|m|h))+$') && duration(self) >= duration('1s')").message("scaleDown.drainTimeout must be a duration of at least 1s, such as 10m"))]
    pub drain_timeout: String,
    /// What happens when the drain timeout passes with workers still active: Wait (keep the
    /// member until they finish) or Force (delete it anyway).
    #[serde(default)]
    pub after_drain_timeout: AfterDrainTimeout,
}

impl Default for ScaleDownPolicy {
    fn default() -> Self {
        Self {
            idle_window: default_idle_window(),
            drain_timeout: default_drain_timeout(),
            after_drain_timeout: AfterDrainTimeout::default(),
        }
    }
}

fn default_idle_window() -> String {
    "5m".into()
}
fn default_drain_timeout() -> String {
    "10m".into()
}

/// What happens to a member still busy when its drain timeout passes.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
pub enum AfterDrainTimeout {
    /// Keep it until its workers finish: a browser session is never cut.
    #[default]
    Wait,
    /// Delete it anyway.
    Force,
}

/// Scaling from the agents' load.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AutoscaleSpec {
    /// The fewest members.
    #[serde(default = "default_min_replicas")]
    #[schemars(range(min = 0, max = 1000))]
    pub min_replicas: i32,
    /// The most members.
    #[schemars(range(min = 1, max = 1000))]
    pub max_replicas: i32,
    /// The share of the members' capacity (browser sessions) that should be busy: the pool
    /// sizes itself to ceil(active workers / (capacity per member x this)).
    #[serde(default = "default_target")]
    #[schemars(range(min = 0.05, max = 1.0))]
    pub target_busy_fraction: f64,
    /// A lower size is applied only once every recommendation for this long has been lower
    /// (scale-up is immediate).
    #[serde(default = "default_window")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new(r"self.matches('^([0-9]+(\\.[0-9]+)?(ms|s|m|h))+$') && duration(self) >= duration('0s')").message("autoscale.stabilizationWindow must be a duration, such as 5m"))]
    pub stabilization_window: String,
}

fn default_min_replicas() -> i32 {
    1
}
fn default_target() -> f64 {
    0.7
}
fn default_window() -> String {
    "5m".into()
}

/// Who sets `spec.replicas`.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scaler {
    /// The pool itself, from its agents' load (`spec.autoscale`).
    Autoscale,
    /// Someone else through the scale subresource or the spec: a person (`kubectl scale`), an
    /// HPA or KEDA. The pool follows `spec.replicas`.
    External,
}

/// The observed state of a pool.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SandboxPoolStatus {
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Members meant to run (powerState Running), not being removed. The scale subresource's
    /// replicas.
    #[serde(default)]
    pub replicas: i32,
    /// Running members whose Sandbox is Ready.
    #[serde(default)]
    pub ready: i32,
    /// Ready members that are not being drained for removal.
    #[serde(default)]
    pub available: i32,
    /// Ready members whose agent reports active workers.
    #[serde(default)]
    pub busy: i32,
    /// Ready members whose agent reports no active workers.
    #[serde(default)]
    pub idle: i32,
    /// Standby members (launched, then stopped).
    #[serde(default)]
    pub standby: i32,
    /// Members made from the current template launch settings.
    #[serde(default)]
    pub updated: i32,
    /// Members being drained and removed.
    #[serde(default)]
    pub retiring: i32,
    /// The template's image tag: what members created now run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_tag: Option<String>,
    /// The SandboxDeploy whose success last set the template's image tag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_deploy: Option<String>,
    /// The label selector of the members, for the scale subresource (HPA, KEDA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// Who sets `spec.replicas`: Autoscale (the pool) or External.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scaler: Option<Scaler>,
    /// The autoscaler's last recommendation (before the stabilisation window).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recommended_replicas: Option<i32>,
    /// Since when every autoscale recommendation has been below `spec.replicas`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_down_since: Option<Time>,
    /// Ready and Progressing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// The reasons of the Events the SandboxPool controller publishes about a pool (CamelCase).
/// Users and tests match on these values: they do not change.
pub mod pool_events {
    /// A member never registered its agent (AgentRegistered False, RegistrationTimedOut) and is
    /// deleted to be replaced (Warning).
    pub const MEMBER_UNREGISTERED: &str = "MemberUnregistered";
    /// A member will not serve again (failed, its instance terminated) and is deleted to be
    /// replaced (Warning).
    pub const MEMBER_FAILED: &str = "MemberFailed";
    /// A member being removed was deleted: drained, idle, or its instance stopped.
    pub const MEMBER_REMOVED: &str = "MemberRemoved";
    /// A member still busy after the drain timeout was deleted (afterDrainTimeout Force).
    pub const MEMBER_REMOVED_BUSY: &str = "MemberRemovedBusy";
    /// A member from an older template was deleted; a new one takes its place.
    pub const MEMBER_REPLACED: &str = "MemberReplaced";
    /// A member was created.
    pub const MEMBER_CREATED: &str = "MemberCreated";
    /// A standby member was created (stopped).
    pub const STANDBY_CREATED: &str = "StandbyCreated";
    /// A standby member was started to serve.
    pub const STANDBY_STARTED: &str = "StandbyStarted";
    /// A member is drained, then removed.
    pub const MEMBER_DRAINING: &str = "MemberDraining";
    /// The template's image tag was set from a SandboxDeploy that succeeded on the members.
    pub const TEMPLATE_TAG_SET: &str = "TemplateTagSet";
    /// The autoscaler changed `spec.replicas`.
    pub const AUTOSCALED: &str = "Autoscaled";
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;

    #[test]
    fn the_template_keeps_the_sandbox_rules_but_not_its_immutability() {
        let crd = serde_json::to_value(SandboxPool::crd()).unwrap();
        let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
        let template_rules =
            spec["properties"]["template"]["properties"]["spec"]["x-kubernetes-validations"]
                .as_array()
                .unwrap();
        let rules: Vec<&str> = template_rules
            .iter()
            .map(|r| r["rule"].as_str().unwrap())
            .collect();
        assert!(rules.iter().all(|r| !r.contains("oldSelf")), "{rules:?}");
        assert!(
            rules.iter().any(|r| r.contains("has(self.launch)")),
            "{rules:?}"
        );
        let scale = &crd["spec"]["versions"][0]["subresources"]["scale"];
        assert_eq!(scale["specReplicasPath"], ".spec.replicas");
        assert_eq!(scale["statusReplicasPath"], ".status.replicas");
        assert_eq!(scale["labelSelectorPath"], ".status.selector");
    }
}
