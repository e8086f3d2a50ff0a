//! One row of the `sandboxes` table: a Sandbox as the seeds' dashboards expect to read it.

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde::{Deserialize, Serialize};

use crate::api::{AgentHealth, BrowserEngine, Environment, Sandbox, SandboxPhase};

use super::db::{OptTimeColumn, TimeColumn};
use super::event::market_str;

/// A row of the `sandboxes` table. Field names are the column names (the seeds' names, plus
/// `namespace`, `phase`, `market`, `stop_reason` and `failure_reason`); enum columns hold the
/// seeds' lower-case values.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, sqlx::FromRow)]
pub struct SandboxRow {
    /// The Sandbox's UID (`namespace/name` when there is none).
    pub id: String,
    /// The namespace.
    pub namespace: String,
    /// The Sandbox's name.
    pub name: String,
    /// `dev`, `staging` or `prod`.
    pub environment: String,
    /// `i-...`, once known.
    pub instance_id: Option<String>,
    /// `t3.large`, ...
    pub instance_type: Option<String>,
    /// The public IPv4 address.
    pub public_ip: Option<String>,
    /// The private IPv4 address.
    pub private_ip: Option<String>,
    /// The seeds' `sandbox_status`: provisioning, active, deploying, unhealthy, stopping,
    /// stopped, terminating, terminated.
    pub status: String,
    /// The seeds' `sandbox_health_status`: healthy, degraded, unhealthy; `unknown` while the
    /// instance is not running or has not answered (never a false "unhealthy").
    pub health_status: String,
    /// When the agent last answered a probe.
    #[sqlx(try_from = "OptTimeColumn")]
    pub last_health_check_at: Option<Timestamp>,
    /// Browser sessions at once.
    pub capacity: i32,
    /// Active workers from the agent's last report.
    pub current_load: i32,
    /// The EC2 key pair.
    pub ssh_key_name: Option<String>,
    /// The noVNC URL.
    pub novnc_url: Option<String>,
    /// `chromium` or `adspower`.
    pub browser_engine: String,
    /// EC2's state: pending, running, stopping, stopped, shutting-down, terminated.
    pub ec2_status: Option<String>,
    /// When the instance last started running.
    #[sqlx(try_from = "OptTimeColumn")]
    pub last_started_at: Option<Timestamp>,
    /// When it last stopped.
    #[sqlx(try_from = "OptTimeColumn")]
    pub last_stopped_at: Option<Timestamp>,
    /// Whether idle auto-stop applies.
    pub auto_stop_enabled: bool,
    /// Auto-stop's idle time, in whole minutes (30 when auto-stop is off, as the seeds default).
    pub idle_minutes_before_stop: i32,
    /// The agent's version (unset for the older health server).
    pub agent_version: Option<String>,
    /// When the agent last answered.
    #[sqlx(try_from = "OptTimeColumn")]
    pub agent_last_seen_at: Option<Timestamp>,
    /// The worker image tag the agent reports.
    pub gh_image_tag: Option<String>,
    /// When the last image deploy to this sandbox succeeded.
    #[sqlx(try_from = "OptTimeColumn")]
    pub gh_image_updated_at: Option<Timestamp>,
    /// The Sandbox's phase, as the operator names it (Provisioning, Active, ... Failed).
    pub phase: Option<String>,
    /// `on-demand` or `spot`.
    pub market: Option<String>,
    /// Why the instance is stopped: Requested, Idle or External.
    pub stop_reason: Option<String>,
    /// The terminal problem, when there is one.
    pub failure_reason: Option<String>,
    /// When the Sandbox was created.
    #[sqlx(try_from = "TimeColumn")]
    pub created_at: Timestamp,
    /// When this row was last written (the writer skips rows that did not change otherwise).
    #[sqlx(try_from = "TimeColumn")]
    pub updated_at: Timestamp,
}

fn ts(t: &Option<Time>) -> Option<Timestamp> {
    t.as_ref().map(|t| micros(t.0))
}

/// To the microsecond: what both databases keep, so a row reads back as it was written.
fn micros(t: Timestamp) -> Timestamp {
    Timestamp::from_microsecond(t.as_microsecond()).unwrap_or(t)
}

impl SandboxRow {
    /// The row of a Sandbox that is gone with its instance terminated: kept, as the seeds'
    /// table kept it, with status and EC2 state `terminated` and nothing live left in it.
    pub fn terminated(mut self) -> Self {
        self.status = "terminated".into();
        self.ec2_status = Some("terminated".into());
        self.health_status = seeds_health(None).into();
        self.current_load = 0;
        self.public_ip = None;
        self.novnc_url = None;
        self.updated_at = micros(Timestamp::now());
        self
    }
}

/// The seeds' `sandbox_status` for a phase and EC2 state.
pub fn seeds_status(phase: Option<SandboxPhase>, ec2_state: Option<&str>) -> &'static str {
    let gone = matches!(ec2_state, Some("terminated" | "shutting-down"));
    match phase {
        None | Some(SandboxPhase::Provisioning) => "provisioning",
        Some(SandboxPhase::Active) => "active",
        Some(SandboxPhase::Deploying) => "deploying",
        Some(SandboxPhase::Unhealthy) => "unhealthy",
        Some(SandboxPhase::Stopped) if ec2_state == Some("stopping") => "stopping",
        Some(SandboxPhase::Stopped) => "stopped",
        Some(SandboxPhase::Terminating) if gone => "terminated",
        Some(SandboxPhase::Terminating) => "terminating",
        Some(SandboxPhase::Terminated) => "terminated",
        Some(SandboxPhase::Failed) if gone => "terminated",
        Some(SandboxPhase::Failed) => "unhealthy",
    }
}

/// The seeds' `sandbox_health_status` (plus `unknown`).
pub fn seeds_health(health: Option<AgentHealth>) -> &'static str {
    match health {
        Some(AgentHealth::Healthy) => "healthy",
        Some(AgentHealth::Degraded) => "degraded",
        Some(AgentHealth::Unhealthy) => "unhealthy",
        Some(AgentHealth::Unknown) | None => "unknown",
    }
}

fn engine(e: BrowserEngine) -> &'static str {
    match e {
        BrowserEngine::Chromium => "chromium",
        BrowserEngine::Adspower => "adspower",
    }
}

fn phase_name(p: SandboxPhase) -> String {
    // The serde name is the one kubectl shows.
    serde_json::to_value(p)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| format!("{p:?}"))
}

impl SandboxRow {
    /// The row for a Sandbox as the cluster has it, `updated_at` now.
    pub fn from_sandbox(sandbox: &Sandbox) -> SandboxRow {
        let meta = &sandbox.metadata;
        let namespace = meta.namespace.clone().unwrap_or_default();
        let name = meta.name.clone().unwrap_or_default();
        let spec = &sandbox.spec;
        let status = sandbox.status.clone().unwrap_or_default();
        let instance = status.instance.as_ref();
        let agent = status.agent.as_ref();
        let ec2_state = instance.and_then(|i| i.state.map(|s| s.as_str().to_string()));
        let deploy_done = status
            .deploy
            .as_ref()
            .filter(|d| d.state == crate::api::ImageDeployState::Succeeded)
            .and_then(|d| ts(&d.finished_at));
        let idle_minutes = spec
            .auto_stop
            .as_ref()
            .and_then(|a| crate::util::parse_duration(&a.idle_after).ok())
            .map(|d| d.as_secs().div_ceil(60).min(i32::MAX as u64) as i32)
            .unwrap_or(30);
        let now = micros(Timestamp::now());
        SandboxRow {
            id: meta
                .uid
                .clone()
                .unwrap_or_else(|| format!("{namespace}/{name}")),
            environment: spec.environment.as_str().to_string(),
            instance_id: instance
                .map(|i| i.id.clone())
                .or_else(|| spec.instance_id.clone()),
            instance_type: instance
                .and_then(|i| i.instance_type.clone())
                .or_else(|| spec.instance_type.clone()),
            public_ip: instance.and_then(|i| i.public_ip.clone()),
            private_ip: instance.and_then(|i| i.private_ip.clone()),
            status: seeds_status(status.phase, ec2_state.as_deref()).to_string(),
            health_status: seeds_health(agent.map(|a| a.health)).to_string(),
            last_health_check_at: agent.and_then(|a| ts(&a.last_seen)),
            capacity: spec.capacity,
            current_load: agent.and_then(|a| a.active_workers).unwrap_or(0),
            ssh_key_name: spec.launch.as_ref().and_then(|l| l.key_name.clone()),
            novnc_url: status.no_vnc_url.clone(),
            browser_engine: engine(spec.browser_engine).to_string(),
            ec2_status: ec2_state,
            last_started_at: ts(&status.last_started_at),
            last_stopped_at: ts(&status.last_stopped_at),
            auto_stop_enabled: spec.auto_stop.is_some(),
            idle_minutes_before_stop: idle_minutes,
            agent_version: agent.and_then(|a| a.agent_version.clone()),
            agent_last_seen_at: agent.and_then(|a| ts(&a.last_seen)),
            gh_image_tag: agent.and_then(|a| a.image_tag.clone()),
            gh_image_updated_at: deploy_done,
            phase: status.phase.map(phase_name),
            market: instance
                .and_then(|i| i.market)
                .or_else(|| spec.launch.as_ref().map(|l| l.market))
                .map(|m| market_str(m).to_string()),
            stop_reason: status.stop_reason.map(|r| r.as_str().to_string()),
            failure_reason: status.failure_reason.clone(),
            created_at: ts(&meta.creation_timestamp).unwrap_or(now),
            updated_at: now,
            namespace,
            name,
        }
    }

    /// A minimal row (status provisioning, health unknown), for tests and imports.
    pub fn new(
        namespace: impl Into<String>,
        name: impl Into<String>,
        environment: Environment,
    ) -> SandboxRow {
        let (namespace, name) = (namespace.into(), name.into());
        let now = micros(Timestamp::now());
        SandboxRow {
            id: format!("{namespace}/{name}"),
            namespace,
            name,
            environment: environment.as_str().to_string(),
            instance_id: None,
            instance_type: None,
            public_ip: None,
            private_ip: None,
            status: "provisioning".into(),
            health_status: "unknown".into(),
            last_health_check_at: None,
            capacity: 1,
            current_load: 0,
            ssh_key_name: None,
            novnc_url: None,
            browser_engine: "chromium".into(),
            ec2_status: None,
            last_started_at: None,
            last_stopped_at: None,
            auto_stop_enabled: false,
            idle_minutes_before_stop: 30,
            agent_version: None,
            agent_last_seen_at: None,
            gh_image_tag: None,
            gh_image_updated_at: None,
            phase: None,
            market: None,
            stop_reason: None,
            failure_reason: None,
            created_at: now,
            updated_at: now,
        }
    }

    /// Whether two rows say the same, `updated_at` aside (the writer skips such upserts).
    pub fn same_content(&self, other: &SandboxRow) -> bool {
        let mut a = self.clone();
        a.updated_at = other.updated_at;
        &a == other
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{
        AgentStatus, AutoStopSpec, InstanceStatus, Market, SandboxSpec, SandboxStatus,
    };

    fn sandbox() -> Sandbox {
        let spec: SandboxSpec = serde_json::from_value(serde_json::json!({
            "environment": "staging",
            "instanceId": "i-0123456789abcdef0",
            "browserEngine": "adspower",
            "capacity": 5,
            "autoStop": {"idleAfter": "1h30m"},
        }))
        .unwrap();
        let mut s = Sandbox::new("w1", spec);
        s.metadata.namespace = Some("fleet".into());
        s.metadata.uid = Some("5b7c".into());
        s.spec.auto_stop = Some(AutoStopSpec {
            idle_after: "90s".into(),
        });
        s.status = Some(SandboxStatus {
            phase: Some(SandboxPhase::Stopped),
            instance: Some(InstanceStatus {
                id: "i-0123456789abcdef0".into(),
                instance_type: Some("t3.medium".into()),
                state: Some(crate::api::InstanceState::Stopped),
                market: Some(Market::Spot),
                ..Default::default()
            }),
            agent: Some(AgentStatus {
                health: AgentHealth::Unknown,
                url: None,
                image_tag: Some("v1.2.3".into()),
                active_workers: Some(2),
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
            }),
            stop_reason: Some(crate::api::StopReason::Idle),
            no_vnc_url: Some("http://10.0.0.1:6080/vnc.html".into()),
            ..Default::default()
        });
        s
    }

    #[test]
    fn maps_a_sandbox_to_the_seeds_columns() {
        let row = SandboxRow::from_sandbox(&sandbox());
        assert_eq!(row.id, "5b7c");
        assert_eq!((row.namespace.as_str(), row.name.as_str()), ("fleet", "w1"));
        assert_eq!(row.environment, "staging");
        assert_eq!(row.status, "stopped");
        assert_eq!(
            row.health_status, "unknown",
            "a stopped instance is never 'unhealthy'"
        );
        assert_eq!(row.ec2_status.as_deref(), Some("stopped"));
        assert_eq!(row.instance_type.as_deref(), Some("t3.medium"));
        assert_eq!(row.browser_engine, "adspower");
        assert_eq!(row.capacity, 5);
        assert_eq!(row.current_load, 2);
        assert!(row.auto_stop_enabled);
        assert_eq!(
            row.idle_minutes_before_stop, 2,
            "90s rounds up to 2 minutes"
        );
        assert_eq!(row.market.as_deref(), Some("spot"));
        assert_eq!(row.phase.as_deref(), Some("Stopped"));
        assert_eq!(row.stop_reason.as_deref(), Some("Idle"));
        assert_eq!(row.gh_image_tag.as_deref(), Some("v1.2.3"));
    }

    #[test]
    fn status_follows_the_seeds_state_machine() {
        use SandboxPhase::*;
        assert_eq!(seeds_status(None, None), "provisioning");
        assert_eq!(seeds_status(Some(Active), Some("running")), "active");
        assert_eq!(seeds_status(Some(Deploying), Some("running")), "deploying");
        assert_eq!(seeds_status(Some(Stopped), Some("stopping")), "stopping");
        assert_eq!(seeds_status(Some(Stopped), Some("stopped")), "stopped");
        assert_eq!(
            seeds_status(Some(Terminating), Some("running")),
            "terminating"
        );
        assert_eq!(
            seeds_status(Some(Terminating), Some("terminated")),
            "terminated"
        );
        assert_eq!(seeds_status(Some(Failed), Some("terminated")), "terminated");
        assert_eq!(seeds_status(Some(Failed), Some("running")), "unhealthy");
    }

    #[test]
    fn same_content_ignores_updated_at() {
        let a = SandboxRow::new("ns", "a", Environment::Dev);
        let mut b = a.clone();
        b.updated_at = a.updated_at + jiff::SignedDuration::from_secs(5);
        assert!(a.same_content(&b));
        b.current_load = 1;
        assert!(!a.same_content(&b));
    }
}
