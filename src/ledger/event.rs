//! What the ledger records: the append-only events and the power changes derived from them.

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::api::{Environment, Market};

/// A namespaced object's name: a Sandbox, a SandboxDeploy or a SecretBundle.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NamespacedName {
    /// The namespace.
    pub namespace: String,
    /// The name.
    pub name: String,
}

impl NamespacedName {
    /// `namespace/name`.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl std::fmt::Display for NamespacedName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// How an action or step ended (or that it began).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The action or step began.
    Started,
    /// It succeeded.
    Succeeded,
    /// It failed; the event's message (and error code, for EC2) says why.
    Failed,
}

impl Outcome {
    /// `started`, `succeeded` or `failed`: the value of the `outcome` column.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Started => "started",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
        }
    }
}

/// Why an instance stopped. `Idle` (auto-stop) is what the cost report counts as saved.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StopReason {
    /// The spec asked for it (powerState Stopped, deletion policy Stop).
    Requested,
    /// Auto-stop: the agent reported no active workers for `idleAfter`.
    Idle,
    /// Stopped outside the operator.
    External,
    /// The instance was terminated.
    Terminated,
    /// A spot interruption.
    Interrupted,
}

impl StopReason {
    /// The value of the `stop_reason` columns: `Requested`, `Idle`, ... (as Sandbox status says).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Requested => "Requested",
            Self::Idle => "Idle",
            Self::External => "External",
            Self::Terminated => "Terminated",
            Self::Interrupted => "Interrupted",
        }
    }

    /// The reason Sandbox status names (`Requested`, `Idle`, `External`, ...).
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "Requested" => Self::Requested,
            "Idle" => Self::Idle,
            "External" => Self::External,
            "Terminated" => Self::Terminated,
            "Interrupted" => Self::Interrupted,
            _ => return None,
        })
    }
}

/// `on-demand` or `spot`: how the ledger's tables spell a market.
pub fn market_str(market: Market) -> &'static str {
    match market {
        Market::OnDemand => "on-demand",
        Market::Spot => "spot",
    }
}

/// The market a table value names (`on-demand` or `spot`).
pub fn parse_market(s: &str) -> Option<Market> {
    match s {
        "on-demand" => Some(Market::OnDemand),
        "spot" => Some(Market::Spot),
        _ => None,
    }
}

/// One append-only ledger entry. Serialized with a `kind` tag (`ec2_action`, `instance_state`,
/// `deploy_step`, `secret_sync`); the whole event is kept as the row's JSON `payload`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LedgerEvent {
    /// A call the operator made to EC2.
    Ec2Action(Ec2ActionEvent),
    /// An instance state change the operator observed (or a power change recorded explicitly):
    /// what the power intervals, and so the cost report, are derived from.
    InstanceState(InstanceStateEvent),
    /// One step of an image deploy to one sandbox (or of a SandboxDeploy as a whole).
    DeployStep(DeployStepEvent),
    /// The result of syncing a SecretBundle to one target. Hashes and key names only.
    SecretSync(SecretSyncEvent),
}

impl LedgerEvent {
    /// When it happened.
    pub fn at(&self) -> Timestamp {
        match self {
            Self::Ec2Action(e) => e.at,
            Self::InstanceState(e) => e.at,
            Self::DeployStep(e) => e.at,
            Self::SecretSync(e) => e.at,
        }
    }

    /// The `kind` column: `ec2_action`, `instance_state`, `deploy_step` or `secret_sync`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Ec2Action(_) => "ec2_action",
            Self::InstanceState(_) => "instance_state",
            Self::DeployStep(_) => "deploy_step",
            Self::SecretSync(_) => "secret_sync",
        }
    }

    /// Makes the event safe to store: secret key names lose anything from a `=` on (so a
    /// `KEY=value` line handed over by mistake never reaches the database), sorted and unique.
    pub fn sanitize(&mut self) {
        if let Self::SecretSync(e) = self {
            e.keys = sanitize_keys(std::mem::take(&mut e.keys));
        }
    }
}

macro_rules! into_event {
    ($($ty:ident => $variant:ident),* $(,)?) => {
        $(impl From<$ty> for LedgerEvent {
            fn from(e: $ty) -> Self {
                LedgerEvent::$variant(e)
            }
        })*
    };
}

into_event!(
    Ec2ActionEvent => Ec2Action,
    InstanceStateEvent => InstanceState,
    DeployStepEvent => DeployStep,
    SecretSyncEvent => SecretSync,
);

/// Key names only: everything from the first `=` on is cut, blanks dropped, sorted, unique.
pub fn sanitize_keys(keys: Vec<String>) -> Vec<String> {
    let mut out: Vec<String> = keys
        .into_iter()
        .map(|k| match k.split_once('=') {
            Some((name, _)) => name.trim().to_string(),
            None => k.trim().to_string(),
        })
        .filter(|k| !k.is_empty())
        .collect();
    out.sort();
    out.dedup();
    out
}

/// A call the operator made to EC2.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Ec2ActionEvent {
    /// When the call returned.
    pub at: Timestamp,
    /// The EC2 API action: `RunInstances`, `StartInstances`, `StopInstances`,
    /// `TerminateInstances`, `CreateTags`, ...
    pub action: String,
    /// The instance acted on (unset for a RunInstances that failed before EC2 named one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    /// The Sandbox the action was for (unset for the orphan sweep).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<NamespacedName>,
    /// Succeeded or Failed.
    pub outcome: Outcome,
    /// AWS's error code on failure (`RequestLimitExceeded`, `InsufficientInstanceCapacity`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<String>,
    /// What happened, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// AWS's request id, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

/// An observed instance state change. `running` opens a power interval; `stopping`, `stopped`,
/// `shutting-down` and `terminated` close it (`pending` changes nothing).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct InstanceStateEvent {
    /// When the state was observed (or, better, when EC2 says it changed).
    pub at: Timestamp,
    /// The instance.
    pub instance_id: String,
    /// The Sandbox it belongs to, when known: the cost report groups by it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<NamespacedName>,
    /// The instance type (`t3.large`): the price list is keyed by it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_type: Option<String>,
    /// On-demand or spot.
    #[serde(default)]
    pub market: Market,
    /// EC2's state name: `pending`, `running`, `stopping`, `stopped`, `shutting-down`,
    /// `terminated`.
    pub state: String,
    /// Why it stopped, for the stopping states. `Idle` counts as saved by auto-stop.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<StopReason>,
}

/// What an instance state does to the power intervals.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PowerEffect {
    /// Opens an interval (unless one is open).
    Start,
    /// Closes the open interval.
    Stop,
    /// Closes the open interval, or records a zero-length one so that a stopped instance's idle
    /// gap ends here.
    Terminate,
    /// Nothing (`pending`, unknown names).
    None,
}

impl InstanceStateEvent {
    /// What this state does to the power intervals.
    pub fn power_effect(&self) -> PowerEffect {
        match self.state.as_str() {
            "running" => PowerEffect::Start,
            "stopping" | "stopped" => PowerEffect::Stop,
            "shutting-down" | "terminated" => PowerEffect::Terminate,
            _ => PowerEffect::None,
        }
    }
}

/// An explicit power change: what [`super::LedgerHandle::record_power`] takes. It is recorded as an
/// [`InstanceStateEvent`] with state `running` or `stopped`.
#[derive(Clone, Debug, PartialEq)]
pub struct PowerChange {
    /// The instance.
    pub instance_id: String,
    /// Its type (`t3.large`).
    pub instance_type: String,
    /// On-demand or spot.
    pub market: Market,
    /// Whether it now runs.
    pub running: bool,
    /// When.
    pub at: Timestamp,
    /// The Sandbox it belongs to.
    pub sandbox: Option<NamespacedName>,
    /// Why it stopped (`Idle` for auto-stop).
    pub stop_reason: Option<StopReason>,
}

impl PowerChange {
    /// A power change with no sandbox and no stop reason; see [`Self::sandbox`] and
    /// [`Self::reason`].
    pub fn new(
        instance_id: impl Into<String>,
        instance_type: impl Into<String>,
        market: Market,
        running: bool,
        at: Timestamp,
    ) -> Self {
        Self {
            instance_id: instance_id.into(),
            instance_type: instance_type.into(),
            market,
            running,
            at,
            sandbox: None,
            stop_reason: None,
        }
    }

    /// The Sandbox the instance belongs to.
    pub fn sandbox(mut self, namespace: impl Into<String>, name: impl Into<String>) -> Self {
        self.sandbox = Some(NamespacedName::new(namespace, name));
        self
    }

    /// Why it stopped.
    pub fn reason(mut self, reason: StopReason) -> Self {
        self.stop_reason = Some(reason);
        self
    }
}

impl From<PowerChange> for LedgerEvent {
    fn from(c: PowerChange) -> Self {
        LedgerEvent::InstanceState(InstanceStateEvent {
            at: c.at,
            instance_id: c.instance_id,
            sandbox: c.sandbox,
            instance_type: Some(c.instance_type),
            market: c.market,
            state: if c.running { "running" } else { "stopped" }.to_string(),
            stop_reason: if c.running { None } else { c.stop_reason },
        })
    }
}

/// One step of an image deploy.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct DeployStepEvent {
    /// When the step began or ended.
    pub at: Timestamp,
    /// The namespace of the SandboxDeploy and its Sandboxes.
    pub namespace: String,
    /// The SandboxDeploy, unset for a deploy the Sandbox controller did on its own (a tag set by
    /// hand).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deploy: Option<String>,
    /// The target Sandbox, unset for a step of the SandboxDeploy as a whole (Progressing,
    /// Halted, Succeeded, Superseded, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
    /// The environment: the deploy report groups by it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment: Option<Environment>,
    /// The image tag being deployed.
    pub tag: String,
    /// The tag it replaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_tag: Option<String>,
    /// The step or phase: Pending, Draining, Deploying, Verifying, Succeeded, Failed,
    /// RolledBack, Deferred (per sandbox); Progressing, Paused, Halted, Aborted, Superseded (per
    /// deploy).
    pub step: String,
    /// Started, Succeeded or Failed.
    pub outcome: Outcome,
    /// What happened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Where a SecretBundle was synced to.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum SecretTargetKind {
    /// A Sandbox's `.env`, written by its agent.
    Sandbox,
    /// A Fly.io app's secrets.
    FlyApp,
}

impl SecretTargetKind {
    /// `sandbox` or `fly_app`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sandbox => "sandbox",
            Self::FlyApp => "fly_app",
        }
    }
}

/// The result of syncing a SecretBundle to one target. It holds the content hash and the key
/// names, never a value: there is no field a value could go in.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct SecretSyncEvent {
    /// When the sync ended.
    pub at: Timestamp,
    /// The SecretBundle.
    pub bundle: NamespacedName,
    /// A Sandbox or a Fly.io app.
    pub target_kind: SecretTargetKind,
    /// The Sandbox's or the Fly.io app's name.
    pub target_name: String,
    /// The sha256 of the rendered content.
    pub content_hash: String,
    /// The key names (sorted). Anything from a `=` on is cut before storing.
    pub keys: Vec<String>,
    /// Succeeded or Failed.
    pub outcome: Outcome,
    /// What happened (must not quote a value: the SecretBundle controller scrubs its errors).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_names_lose_values_and_are_sorted() {
        let keys = sanitize_keys(vec![
            "B".into(),
            "A=canary-value".into(),
            " C ".into(),
            "B".into(),
            "=x".into(),
        ]);
        assert_eq!(keys, vec!["A", "B", "C"]);
    }

    #[test]
    fn events_serialize_with_a_kind_tag() {
        let at: Timestamp = "2024-05-01T10:00:00Z".parse().unwrap();
        let e: LedgerEvent = PowerChange::new("i-1", "t3.large", Market::Spot, false, at)
            .sandbox("ns", "a")
            .reason(StopReason::Idle)
            .into();
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(json["kind"], "instance_state");
        assert_eq!(json["state"], "stopped");
        assert_eq!(json["stop_reason"], "Idle");
        let back: LedgerEvent = serde_json::from_value(json).unwrap();
        assert_eq!(back, e);
        let LedgerEvent::InstanceState(s) = &e else {
            unreachable!()
        };
        assert_eq!(s.power_effect(), PowerEffect::Stop);
    }

    #[test]
    fn power_effects_follow_ec2_state_names() {
        let mut e = InstanceStateEvent {
            at: Timestamp::UNIX_EPOCH,
            instance_id: "i-1".into(),
            sandbox: None,
            instance_type: None,
            market: Market::OnDemand,
            state: String::new(),
            stop_reason: None,
        };
        for (state, effect) in [
            ("pending", PowerEffect::None),
            ("running", PowerEffect::Start),
            ("stopping", PowerEffect::Stop),
            ("stopped", PowerEffect::Stop),
            ("shutting-down", PowerEffect::Terminate),
            ("terminated", PowerEffect::Terminate),
        ] {
            e.state = state.into();
            assert_eq!(e.power_effect(), effect, "{state}");
        }
    }
}
