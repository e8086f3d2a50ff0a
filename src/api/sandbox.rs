//! `Sandbox` (short name `sbx`): one EC2 instance and the agent on it.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::common::{Environment, SecretKeyRef};

/// The annotation that asks an auto-stopped (or stopped) sandbox to start again: an RFC 3339
/// time newer than the last one acted on. `kubectl sandbox wake` sets it.
pub const START_REQUESTED_ANNOTATION: &str = "fleet.valet.dev/start-requested-at";
/// Set by a SandboxDeploy together with `spec.image.tag`: a new value lets the Sandbox
/// controller deploy a tag whose last deploy failed (a retry); without it, a failed tag is never
/// retried in a loop.
pub const DEPLOY_ATTEMPT_ANNOTATION: &str = "fleet.valet.dev/deploy-attempt";
/// A day-2 action asked of the Sandbox controller: `restart-adspower`, `probe`, `drain`,
/// `terminate` or `terminate-force` (see [`DAY2_ACTIONS`]); terminate leaves the Sandbox in
/// phase Terminated. Done once per
/// [`ACTION_ID_ANNOTATION`] value; the result goes to `status.lastAction` and the annotations are
/// removed once it is final. `kubectl sandbox restart-adspower|probe|drain|terminate` sets both.
pub const ACTION_ANNOTATION: &str = "fleet.valet.dev/action";
/// The request id of the action in [`ACTION_ANNOTATION`] (any string, for example a time): the
/// same id is never acted on twice. Left out, the controller adds one before acting.
pub const ACTION_ID_ANNOTATION: &str = "fleet.valet.dev/action-id";
/// The day-2 actions [`ACTION_ANNOTATION`] accepts.
pub const DAY2_ACTIONS: &[&str] = &[
    "restart-adspower",
    "probe",
    "drain",
    "terminate",
    "terminate-force",
];
/// The finalizer the Sandbox controller sets before its first EC2 call.
pub const SANDBOX_FINALIZER: &str = "fleet.valet.dev/instance";

/// The desired state of one sandbox: where its instance comes from, whether it runs, what it runs
/// and how the operator reaches its agent.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "fleet.valet.dev",
    version = "v1alpha1",
    kind = "Sandbox",
    namespaced,
    status = "SandboxStatus",
    shortname = "sbx",
    category = "fleet",
    derive = "PartialEq",
    doc = "A Sandbox is one EC2 browser-worker instance, launched or adopted, and the agent on it.",
    selectable = ".spec.environment",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Env", type_ = "string", json_path = ".spec.environment"),
    printcolumn(name = "Instance", type_ = "string", json_path = ".status.instance.id"),
    printcolumn(name = "EC2", type_ = "string", json_path = ".status.instance.state"),
    printcolumn(name = "Health", type_ = "string", json_path = ".status.agent.health"),
    printcolumn(name = "Image", type_ = "string", json_path = ".status.agent.imageTag"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("has(self.launch) != has(self.instanceId)").message("exactly one of spec.launch (start a new instance) and spec.instanceId (adopt an existing one) must be set"),
    validation = Rule::new("has(self.instanceId) == has(oldSelf.instanceId) && (!has(self.instanceId) || self.instanceId == oldSelf.instanceId)").message("spec.instanceId cannot be added, removed or changed; create a new Sandbox to adopt another instance"),
    validation = Rule::new("!has(oldSelf.launch) || (has(self.launch) && self.launch == oldSelf.launch)").message("spec.launch is immutable once set; create a new Sandbox for another launch configuration"),
    validation = Rule::new("!has(self.launch) || has(self.instanceType)").message("spec.instanceType is required with spec.launch"),
    validation = Rule::new("self.managementPolicy != 'ObserveOnly' || has(self.instanceId)").message("managementPolicy ObserveOnly never launches: set spec.instanceId to observe an existing instance"),
    validation = Rule::new("self.managementPolicy != 'ObserveOnly' || !has(self.deletionPolicy) || self.deletionPolicy == 'Retain'").message("managementPolicy ObserveOnly never changes the instance: deletionPolicy must be Retain or unset"),
    validation = Rule::new("self.managementPolicy != 'ObserveOnly' || self.powerState == 'Running' && !has(self.autoStop)").message("managementPolicy ObserveOnly never starts or stops the instance: leave powerState Running and autoStop unset"),
    validation = Rule::new("!has(self.agent) || !has(self.agent.bootstrap) || has(self.launch)").message("agent.bootstrap installs the agent on an instance the operator launches: it needs spec.launch (an adopted instance is set up already)"),
    validation = Rule::new("!has(self.agent) || !has(self.agent.bootstrap) || !has(self.launch) || !has(self.launch.userDataSecretRef)").message("agent.bootstrap renders the instance's user data: leave spec.launch.userDataSecretRef unset"),
    validation = Rule::new("!has(self.agent) || !has(self.agent.bootstrap) || !has(self.agent.tokenSecretRef)").message("agent.bootstrap mints the agent's token into the Secret <sandbox>-agent-token: leave agent.tokenSecretRef unset")
)]
pub struct SandboxSpec {
    /// The environment this sandbox serves: dev, staging or prod. Tagged on the instance.
    pub environment: Environment,

    /// The EC2 instance type, for example t3.large. Required with `launch`. For an adopted
    /// instance EC2's value is reported in status and this field, if set, is informational.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64), regex(pattern = r"^[a-z0-9-]+\.[a-z0-9]+$"))]
    pub instance_type: Option<String>,

    /// The browser engine the worker drives: chromium or adspower.
    #[serde(default)]
    pub browser_engine: BrowserEngine,

    /// How many browser sessions the sandbox runs at once.
    #[serde(default = "default_capacity")]
    #[schemars(range(min = 1, max = 256))]
    pub capacity: i32,

    /// Launch a new instance with these settings. Exactly one of `launch` and `instanceId`.
    /// Immutable once set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launch: Option<LaunchSpec>,

    /// Adopt this existing instance (i-xxxxxxxx or i-xxxxxxxxxxxxxxxxx) instead of launching one.
    /// Exactly one of `launch` and `instanceId`. Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 19), regex(pattern = r"^i-([0-9a-f]{8}|[0-9a-f]{17})$"))]
    #[x_kube(validation = Rule::new("self.matches('^i-([0-9a-f]{8}|[0-9a-f]{17})$')").message("instanceId must look like i- followed by 8 or 17 lower-case hex digits"))]
    pub instance_id: Option<String>,

    /// Full: the operator starts, stops and terminates the instance as the spec says.
    /// ObserveOnly: it only reads the instance and its agent, never calling a mutating EC2 API.
    #[serde(default)]
    pub management_policy: ManagementPolicy,

    /// Whether the instance should be running. A stopped instance whose spec says Running is
    /// started again.
    #[serde(default)]
    pub power_state: PowerState,

    /// Stop the instance after its agent has reported no active workers for a while.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_stop: Option<AutoStopSpec>,

    /// The worker image this sandbox should run. Usually left out of git and set by a
    /// SandboxDeploy, whose field manager then owns it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageSpec>,

    /// How to reach the agent on the instance.
    #[serde(default)]
    pub agent: AgentSpec,

    /// What happens to the instance when the Sandbox is deleted: Terminate, Stop or Retain.
    /// Defaults to Terminate for launched instances and Retain for adopted ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion_policy: Option<DeletionPolicy>,
}

fn default_capacity() -> i32 {
    1
}

impl SandboxSpec {
    /// The deletion policy in force: the explicit one, or the default for how the instance came.
    pub fn effective_deletion_policy(&self) -> DeletionPolicy {
        self.deletion_policy
            .unwrap_or(if self.instance_id.is_some() {
                DeletionPolicy::Retain
            } else {
                DeletionPolicy::Terminate
            })
    }
}

/// The browser engine a sandbox's worker drives.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
#[serde(rename_all = "lowercase")]
pub enum BrowserEngine {
    /// Chromium, headless or on the virtual display.
    #[default]
    Chromium,
    /// AdsPower, reached through its local API.
    Adspower,
}

/// How far the operator may act on the instance.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
pub enum ManagementPolicy {
    /// Launch or adopt, start, stop, deploy and terminate as the spec says.
    #[default]
    Full,
    /// Read only: report the instance and its agent, never call a mutating EC2 API.
    ObserveOnly,
}

/// Whether the instance should run.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
pub enum PowerState {
    /// The instance should be running.
    #[default]
    Running,
    /// The instance should be stopped.
    Stopped,
}

/// What happens to the instance when the Sandbox is deleted.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeletionPolicy {
    /// Terminate the instance and wait until EC2 reports it terminated.
    Terminate,
    /// Stop the instance and leave it.
    Stop,
    /// Leave the instance as it is.
    Retain,
}

/// Whether a launched instance is on-demand or spot.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
pub enum Market {
    /// On-demand capacity.
    #[default]
    OnDemand,
    /// Spot capacity (one-time request, stop on interruption).
    Spot,
}

/// How to launch a new instance.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LaunchSpec {
    /// The AMI to launch, for example ami-0abcdef1234567890.
    #[schemars(length(max = 21), regex(pattern = r"^ami-([0-9a-f]{8}|[0-9a-f]{17})$"))]
    pub image_id: String,
    /// The subnet to launch into (subnet-...). The account's default subnet when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 24),
        regex(pattern = r"^subnet-([0-9a-f]{8}|[0-9a-f]{17})$")
    )]
    pub subnet_id: Option<String>,
    /// Security groups (sg-...) for the instance's network interface.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 16),
        inner(length(max = 20), regex(pattern = r"^sg-([0-9a-f]{8}|[0-9a-f]{17})$"))
    )]
    pub security_group_ids: Vec<String>,
    /// The EC2 key pair name for SSH.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255))]
    pub key_name: Option<String>,
    /// The IAM instance profile, by name or ARN.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 2048))]
    pub iam_instance_profile: Option<String>,
    /// Size of the root EBS volume in GiB (gp3). The AMI's size when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 8, max = 16384))]
    pub root_volume_size_gib: Option<i32>,
    /// OnDemand or Spot.
    #[serde(default)]
    pub market: Market,
    /// A Secret key whose value is the instance's user data (cloud-init), base64-encoded by the
    /// operator on launch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data_secret_ref: Option<SecretKeyRef>,
    /// Extra tags for the instance and its volumes. Keys starting with `aws:` or
    /// `fleet.valet.dev/` are reserved.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 40, "additionalProperties" = {"type": "string", "maxLength": 256}))]
    #[x_kube(validation = Rule::new("self.all(k, size(k) <= 128 && !k.startsWith('aws:') && !k.startsWith('fleet.valet.dev/'))").message("tag keys must be at most 128 characters and must not start with aws: or fleet.valet.dev/"))]
    pub tags: BTreeMap<String, String>,
}

/// Idle auto-stop.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AutoStopSpec {
    /// Stop the instance once its agent has reported zero active workers for this long, for
    /// example 30m or 1h30m. At least 1m.
    #[serde(default = "default_idle_after")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new(r"self.matches('^([0-9]+(\\.[0-9]+)?(ms|s|m|h))+$') && duration(self) >= duration('1m')").message("idleAfter must be a duration of at least 1m, such as 30m or 1h30m"))]
    pub idle_after: String,
}

fn default_idle_after() -> String {
    "30m".into()
}

/// The worker image a sandbox should run.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ImageSpec {
    /// The image repository, for information (the agent's compose file names the image).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512))]
    pub repository: Option<String>,
    /// The image tag, for example a commit sha or v1.2.3.
    #[schemars(
        length(min = 1, max = 128),
        regex(pattern = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
    )]
    pub tag: String,
}

/// The placeholders `agent.urlTemplate` may use (the CRD's CEL rules list the same).
pub const URL_PLACEHOLDERS: [&str; 6] = [
    "{privateIp}",
    "{publicIp}",
    "{privateDns}",
    "{publicDns}",
    "{instanceId}",
    "{port}",
];

/// How the operator reaches and probes the agent.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!(has(self.url) && has(self.urlTemplate))").message("set at most one of agent.url and agent.urlTemplate"),
    validation = Rule::new(r"!self.timeout.matches('^([0-9]+(\\.[0-9]+)?(ms|s|m|h))+$') || !self.probeInterval.matches('^([0-9]+(\\.[0-9]+)?(ms|s|m|h))+$') || duration(self.timeout) <= duration(self.probeInterval)").message("agent.timeout must not be longer than agent.probeInterval")
)]
pub struct AgentSpec {
    /// The agent's base URL, for example http://10.0.1.5:8000. Overrides `urlTemplate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512))]
    #[x_kube(
        validation = Rule::new("self.startsWith('http://') || self.startsWith('https://')").message("agent.url must start with http:// or https://"),
        validation = Rule::new(r"isURL(self) && url(self).getHostname() != '' && !self.matches('\\s')").message("agent.url must be a URL with a host and no spaces, such as http://10.0.1.5:8000")
    )]
    pub url: Option<String>,
    /// A template for the agent's base URL over the instance's addresses: `{privateIp}`,
    /// `{publicIp}`, `{privateDns}`, `{publicDns}`, `{instanceId}` and `{port}`. Default:
    /// `http://{privateIp}:{port}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512))]
    #[x_kube(
        validation = Rule::new("self.startsWith('http://') || self.startsWith('https://')").message("agent.urlTemplate must start with http:// or https://"),
        validation = Rule::new(r"self.matches('^[^{}]*(\\{[^{}]*\\}[^{}]*)*$')").message("agent.urlTemplate has an unmatched { or }: placeholders are written {privateIp}, {publicIp}, {privateDns}, {publicDns}, {instanceId} or {port}"),
        validation = Rule::new(r"self.findAll('\\{[^{}]*\\}').all(p, p in ['{privateIp}', '{publicIp}', '{privateDns}', '{publicDns}', '{instanceId}', '{port}'])").message(Message::Expression(r"'agent.urlTemplate has unknown placeholder ' + self.findAll('\\{[^{}]*\\}').filter(p, !(p in ['{privateIp}', '{publicIp}', '{privateDns}', '{publicDns}', '{instanceId}', '{port}']))[0] + ': use {privateIp}, {publicIp}, {privateDns}, {publicDns}, {instanceId} or {port}'".into())),
        validation = Rule::new(r"!self.matches('^[^{}]*(\\{[^{}]*\\}[^{}]*)*$') || [self.replace('{privateIp}', '10.0.0.1').replace('{publicIp}', '10.0.0.1').replace('{privateDns}', 'ip-10-0-0-1.ec2.internal').replace('{publicDns}', 'ec2-10-0-0-1.compute-1.amazonaws.com').replace('{instanceId}', 'i-0123456789abcdef0').replace('{port}', '8000')].all(u, u.findAll('\\{[^{}]*\\}').size() > 0 || (isURL(u) && url(u).getHostname() != '' && !u.matches('\\s')))").message("agent.urlTemplate must make a URL with a host and no spaces once its placeholders are filled in, such as http://{privateIp}:{port}")
    )]
    pub url_template: Option<String>,
    /// The agent's port, used by the URL template.
    #[serde(default = "default_agent_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// The noVNC port on the instance, for the noVNC URL in status.
    #[serde(default = "default_novnc_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub no_vnc_port: i32,
    /// The Secret key holding the agent's bearer token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_secret_ref: Option<SecretKeyRef>,
    /// How often to probe the agent's /health while the instance runs, for example 30s.
    #[serde(default = "default_probe_interval")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new(r"self.matches('^([0-9]+(\\.[0-9]+)?(ms|s|m|h))+$') && duration(self) >= duration('1s')").message("agent.probeInterval must be a duration of at least 1s, such as 30s"))]
    pub probe_interval: String,
    /// How long one probe may take, for example 5s.
    #[serde(default = "default_probe_timeout")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new(r"self.matches('^([0-9]+(\\.[0-9]+)?(ms|s|m|h))+$') && duration(self) >= duration('100ms')").message("agent.timeout must be a duration of at least 100ms, such as 5s"))]
    pub timeout: String,
    /// Consecutive failed probes before AgentHealthy turns False.
    #[serde(default = "default_failure_threshold")]
    #[schemars(range(min = 1, max = 100))]
    pub failure_threshold: i32,
    /// Install and start the agent on a launched instance with no human step: the operator
    /// mints the agent's token into the Secret `<sandbox>-agent-token` (owned by the Sandbox)
    /// and launches the instance with user data that downloads the agent's release tarball,
    /// checks its sha256, installs it and writes the token and configuration. Needs
    /// `spec.launch`; leave `agent.tokenSecretRef` and `launch.userDataSecretRef` unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bootstrap: Option<BootstrapSpec>,
}

/// How a launched instance gets its agent (`spec.agent.bootstrap`).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BootstrapSpec {
    /// Where the instance downloads the agent's release tarball (`make dist`'s
    /// `sandbox-agent-<version>-linux-<arch>.tar.gz`), http:// or https://.
    #[schemars(length(min = 1, max = 2048))]
    #[x_kube(
        validation = Rule::new("self.startsWith('https://') || self.startsWith('http://')").message("agent.bootstrap.downloadUrl must start with https:// or http://"),
        validation = Rule::new(r"isURL(self) && url(self).getHostname() != '' && !self.matches('\\s')").message("agent.bootstrap.downloadUrl must be a URL with a host and no spaces, such as https://downloads.example.com/sandbox-agent-0.1.0-linux-x86_64.tar.gz")
    )]
    pub download_url: String,
    /// The tarball's sha256, 64 lower-case hex digits (the `.tar.gz.sha256` file `make dist`
    /// writes beside it). The instance refuses a download that does not match.
    #[schemars(length(min = 64, max = 64))]
    #[x_kube(validation = Rule::new("self.matches('^[0-9a-f]{64}$')").message("agent.bootstrap.sha256 must be 64 lower-case hex digits (sha256sum's output for the tarball)"))]
    pub sha256: String,
    /// How long after the instance launches its agent has to report healthy; after that the
    /// Sandbox's AgentRegistered condition turns False with reason RegistrationTimedOut (a
    /// SandboxPool replaces such a member). For example 10m.
    #[serde(default = "default_registration_timeout")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new(r"self.matches('^([0-9]+(\\.[0-9]+)?(ms|s|m|h))+$') && duration(self) >= duration('1s')").message("agent.bootstrap.registrationTimeout must be a duration of at least 1s, such as 10m"))]
    pub registration_timeout: String,
    /// The agent's configuration (`/etc/sandbox-agent/agent.yaml`, YAML), written before the
    /// agent is installed. Unset: the tarball's `agent.yaml` (the GhostHands sandbox). Either
    /// way the bootstrap sets the listen port (`agent.port`), the token file and
    /// `requireAuthForHealth: true` through the agent's environment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 12288))]
    pub config: Option<String>,
}

fn default_registration_timeout() -> String {
    "10m".into()
}

impl Default for AgentSpec {
    fn default() -> Self {
        Self {
            url: None,
            url_template: None,
            port: default_agent_port(),
            no_vnc_port: default_novnc_port(),
            token_secret_ref: None,
            probe_interval: default_probe_interval(),
            timeout: default_probe_timeout(),
            failure_threshold: default_failure_threshold(),
            bootstrap: None,
        }
    }
}

fn default_agent_port() -> i32 {
    8000
}
fn default_novnc_port() -> i32 {
    6080
}
fn default_probe_interval() -> String {
    "30s".into()
}
fn default_probe_timeout() -> String {
    "5s".into()
}
fn default_failure_threshold() -> i32 {
    3
}

/// The lifecycle phase of a sandbox, as the seeds' state machine named them.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SandboxPhase {
    /// The instance is being launched, adopted or started.
    Provisioning,
    /// Running, and the agent is healthy.
    Active,
    /// A worker image deploy is under way.
    Deploying,
    /// Running, but the agent fails its probes or reports itself unhealthy.
    Unhealthy,
    /// The instance is stopped (see `stopReason`).
    Stopped,
    /// The Sandbox is being deleted and the deletion policy is being carried out.
    Terminating,
    /// The instance was terminated by a terminate request (`kubectl sandbox terminate`). The
    /// Sandbox stays as its record, as the seeds' table kept terminated sandboxes, and nothing is
    /// launched in its place: delete it when it is no longer wanted.
    Terminated,
    /// A terminal problem that needs a person: see `failureReason` and `failureMessage`.
    Failed,
}

/// Why the instance is stopped: Requested (spec), Idle (auto-stop) or External.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StopReason {
    /// The spec says Stopped.
    Requested,
    /// Auto-stop stopped it after the idle period.
    Idle,
    /// Something outside the operator stopped it.
    External,
    /// A value this version does not know (written by another version); kept as `Unknown`.
    #[serde(other)]
    Unknown,
}

impl StopReason {
    /// The name as status spells it (`Requested`, `Idle`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Requested => "Requested",
            Self::Idle => "Idle",
            Self::External => "External",
            Self::Unknown => "Unknown",
        }
    }
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where the last image deploy of a sandbox stands (`status.deploy.state`).
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ImageDeployState {
    /// Waiting for active workers to finish.
    Draining,
    /// The agent is deploying.
    Deploying,
    /// Waiting for the new tag and a healthy report.
    Verifying,
    /// Done.
    Succeeded,
    /// Failed; the agent could not roll back (or the operator gave up).
    Failed,
    /// Failed and the agent rolled back to the previous tag.
    RolledBack,
    /// A value this version does not know (written by another version): read as a deploy that
    /// is not under way.
    #[serde(other)]
    Unknown,
}

impl ImageDeployState {
    /// The name as status spells it (`Draining`, `RolledBack`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Draining => "Draining",
            Self::Deploying => "Deploying",
            Self::Verifying => "Verifying",
            Self::Succeeded => "Succeeded",
            Self::Failed => "Failed",
            Self::RolledBack => "RolledBack",
            Self::Unknown => "Unknown",
        }
    }

    /// Whether a deploy in this state is still under way.
    pub fn in_progress(self) -> bool {
        matches!(self, Self::Draining | Self::Deploying | Self::Verifying)
    }
}

impl std::fmt::Display for ImageDeployState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The observed state of a sandbox.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SandboxStatus {
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The lifecycle phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<SandboxPhase>,
    /// Ready, InstanceRunning, AgentHealthy, ImageUpToDate and, with auto-stop, Idle.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The EC2 instance as last observed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<InstanceStatus>,
    /// The agent's last report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentStatus>,
    /// The last worker image deploy the operator asked this sandbox's agent for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deploy: Option<ImageDeployStatus>,
    /// When the instance was last seen to start running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_started_at: Option<Time>,
    /// When the instance was last seen to stop.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_stopped_at: Option<Time>,
    /// Since when the agent has reported zero active workers, while auto-stop applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_since: Option<Time>,
    /// Why the instance is stopped: Requested (spec), Idle (auto-stop) or External.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<StopReason>,
    /// The value of the start annotation last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_start_request: Option<String>,
    /// The noVNC URL for watching the browser.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub no_vnc_url: Option<String>,
    /// A CamelCase reason, set only for terminal problems (for example InstanceTerminated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_reason: Option<String>,
    /// A human-readable account of the terminal problem.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_message: Option<String>,
    /// The last day-2 action asked by annotation (`fleet.valet.dev/action`) and what came of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_action: Option<LastAction>,
}

/// A day-2 action request and its result.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LastAction {
    /// The action as asked (`restart-adspower`, `probe`, `drain`, `terminate`,
    /// `terminate-force`, or what was written instead).
    pub name: String,
    /// The request id (`fleet.valet.dev/action-id`): a request is done once.
    pub request_id: String,
    /// InProgress, Succeeded, Failed or Rejected (not understood or not allowed: never tried).
    pub result: String,
    /// A CamelCase reason.
    pub reason: String,
    /// What happened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When the request was taken up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    /// When it reached its result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Time>,
}

/// EC2's state name: pending, running, stopping, stopped, shutting-down or terminated.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum InstanceState {
    /// `pending`: launching or starting.
    Pending,
    /// `running`.
    Running,
    /// `stopping`.
    Stopping,
    /// `stopped`.
    Stopped,
    /// `shutting-down`: terminating.
    ShuttingDown,
    /// `terminated`.
    Terminated,
    /// A name this version does not know, read from a status another version wrote; never
    /// made from EC2's answer ([`InstanceState::parse`] refuses unknown names).
    #[serde(other)]
    Unknown,
}

impl InstanceState {
    /// EC2's name for the state (`shutting-down`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Stopping => "stopping",
            Self::Stopped => "stopped",
            Self::ShuttingDown => "shutting-down",
            Self::Terminated => "terminated",
            Self::Unknown => "unknown",
        }
    }

    /// The state EC2 names `name`.
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "pending" => Self::Pending,
            "running" => Self::Running,
            "stopping" => Self::Stopping,
            "stopped" => Self::Stopped,
            "shutting-down" => Self::ShuttingDown,
            "terminated" => Self::Terminated,
            _ => return None,
        })
    }

    /// Pending, stopping or shutting-down: EC2 will move it on by itself.
    pub fn is_transitional(self) -> bool {
        matches!(self, Self::Pending | Self::Stopping | Self::ShuttingDown)
    }

    /// Shutting-down or terminated: the instance is gone for good.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::ShuttingDown | Self::Terminated)
    }
}

impl std::fmt::Display for InstanceState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The EC2 instance as last observed.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct InstanceStatus {
    /// The instance id.
    pub id: String,
    /// The instance type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_type: Option<String>,
    /// EC2's state name: pending, running, stopping, stopped, shutting-down or terminated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<InstanceState>,
    /// The private IPv4 address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_ip: Option<String>,
    /// The public IPv4 address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_ip: Option<String>,
    /// The private DNS name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_dns: Option<String>,
    /// The public DNS name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_dns: Option<String>,
    /// The availability zone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub availability_zone: Option<String>,
    /// When EC2 last launched (started) the instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launch_time: Option<Time>,
    /// OnDemand or Spot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub market: Option<Market>,
    /// Whether the operator launched the instance (false: adopted).
    #[serde(default)]
    pub launched_by_operator: bool,
}

/// The agent's health as the operator reads it.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum AgentHealth {
    /// Probes succeed and the agent reports itself healthy.
    Healthy,
    /// Probes succeed but disk or memory is at 90% or more, or a check warns.
    Degraded,
    /// `failureThreshold` consecutive probes failed, or the agent reports itself unhealthy.
    Unhealthy,
    /// Not probed (the instance is not running) or no answer yet.
    Unknown,
}

/// The agent's last report.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AgentStatus {
    /// The summary health.
    pub health: AgentHealth,
    /// The agent URL the operator probes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The worker image tag the agent reports running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_tag: Option<String>,
    /// Active workers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_workers: Option<i32>,
    /// CPU use, percent (whole numbers, so small wobbles do not rewrite status).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_percent: Option<i32>,
    /// Memory use, percent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_percent: Option<i32>,
    /// Disk use, percent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_percent: Option<i32>,
    /// Since when the worker has been draining (asked by `POST /drain`, for example by the drain
    /// action): it takes no new work until a deploy replaces it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub draining_since: Option<Time>,
    /// The browser engine's status as the agent reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub browser_status: Option<String>,
    /// When the agent's host came up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub up_since: Option<Time>,
    /// The sha256 of the env file the agent holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env_sha256: Option<String>,
    /// The agent's version; unset for the older health server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    /// Failed probes in a row.
    #[serde(default)]
    pub consecutive_failures: i32,
    /// When the last successful probe answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<Time>,
    /// A short account of failing checks or the last probe error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// The last image deploy the operator asked this sandbox's agent for.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ImageDeployStatus {
    /// The tag deployed.
    pub tag: String,
    /// The tag it replaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_tag: Option<String>,
    /// Draining, Deploying, Verifying, Succeeded, Failed or RolledBack.
    pub state: ImageDeployState,
    /// The agent's deploy id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The deploy-attempt annotation this deploy answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<String>,
    /// What happened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When the deploy started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    /// When it finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Time>,
    /// When the agent was asked to deploy (`POST /deploy`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_at: Option<Time>,
    /// The agent is the old `health-server.js`, which reports neither its image tag nor the
    /// deploy's progress: the deploy counts as done once the box answers healthy again after
    /// the settle time, and the tag is then assumed, not reported (ImageUpToDate reason
    /// AssumedByLegacyAgent).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub legacy_agent: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_vocabularies_keep_their_wire_names_and_read_unknown_values() {
        let st: SandboxStatus = serde_json::from_value(serde_json::json!({
            "stopReason": "Idle",
            "deploy": {"tag": "v2", "state": "RolledBack"},
        }))
        .unwrap();
        assert_eq!(st.stop_reason, Some(StopReason::Idle));
        assert_eq!(
            st.deploy.as_ref().unwrap().state,
            ImageDeployState::RolledBack
        );
        let back = serde_json::to_value(&st).unwrap();
        assert_eq!(back["stopReason"], "Idle");
        assert_eq!(back["deploy"]["state"], "RolledBack");
        for (s, name) in [
            (ImageDeployState::Draining, "Draining"),
            (ImageDeployState::Deploying, "Deploying"),
            (ImageDeployState::Verifying, "Verifying"),
            (ImageDeployState::Succeeded, "Succeeded"),
            (ImageDeployState::Failed, "Failed"),
            (ImageDeployState::RolledBack, "RolledBack"),
        ] {
            assert_eq!(serde_json::to_value(s).unwrap(), name);
            assert_eq!(s.as_str(), name);
        }
        for (r, name) in [
            (StopReason::Requested, "Requested"),
            (StopReason::Idle, "Idle"),
            (StopReason::External, "External"),
        ] {
            assert_eq!(serde_json::to_value(r).unwrap(), name);
            assert_eq!(r.as_str(), name);
        }

        // A value another version wrote still reads: the object is not lost to a parse error.
        let st: SandboxStatus = serde_json::from_value(serde_json::json!({
            "stopReason": "Hibernated",
            "deploy": {"tag": "v2", "state": "Paused"},
        }))
        .unwrap();
        assert_eq!(st.stop_reason, Some(StopReason::Unknown));
        let d = st.deploy.unwrap();
        assert_eq!(d.state, ImageDeployState::Unknown);
        assert!(!d.state.in_progress());
    }

    #[test]
    fn instance_states_keep_ec2s_names_on_the_wire() {
        for name in [
            "pending",
            "running",
            "stopping",
            "stopped",
            "shutting-down",
            "terminated",
        ] {
            let s = InstanceState::parse(name).unwrap();
            assert_eq!(s.as_str(), name);
            assert_eq!(serde_json::to_value(s).unwrap(), name);
            let read: InstanceStatus =
                serde_json::from_value(serde_json::json!({"id": "i-1", "state": name})).unwrap();
            assert_eq!(read.state, Some(s));
        }
        // EC2's answers never make Unknown; an old or foreign status value reads as it.
        assert_eq!(InstanceState::parse("rebooting"), None);
        let read: InstanceStatus =
            serde_json::from_value(serde_json::json!({"id": "i-1", "state": "rebooting"})).unwrap();
        assert_eq!(read.state, Some(InstanceState::Unknown));
        assert!(!InstanceState::Unknown.is_transitional() && !InstanceState::Unknown.is_terminal());
    }
}
