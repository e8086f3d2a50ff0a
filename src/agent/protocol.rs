//! The agent's HTTP protocol: the JSON types shared by the server (`sandbox-agent`) and the
//! operator-side client.
//!
//! It is a superset of the seeds' `health-server.js` protocol: `GET /health` keeps the old field
//! names (`status`, `cpu`, `memoryTotalMb`, ...) and `POST /deploy` keeps `{"image_tag": ...}` and
//! `{"success": true, "message": ...}`. Every field the old server did not send is optional or
//! defaulted, so [`HealthReport`] decodes the old JSON as well as the new.

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

/// `GET /health`: host metrics, worker state, the running image tag, the last deploy, checks.
pub const PATH_HEALTH: &str = "/health";
/// `POST /deploy`: start a deploy of an image tag in the background.
pub const PATH_DEPLOY: &str = "/deploy";
/// `POST /drain`: ask the worker to drain and (by default) wait until it is deploy-safe.
pub const PATH_DRAIN: &str = "/drain";
/// `POST /restart`: restart an allow-listed service.
pub const PATH_RESTART: &str = "/restart";
/// `PUT /env`: replace the env file atomically and restart named services.
pub const PATH_ENV: &str = "/env";
/// `GET /healthz`: liveness of the agent process itself (always 200, no auth, no work).
pub const PATH_LIVENESS: &str = "/healthz";

/// Disk or memory use at or above this percentage fails its check and makes a report
/// [`HealthReport::degraded`].
pub const FAIL_PERCENT: f64 = 90.0;
/// Disk or memory use at or above this percentage warns.
pub const WARN_PERCENT: f64 = 80.0;

/// The longest image tag Docker accepts.
pub const MAX_IMAGE_TAG_LEN: usize = 128;

/// Whether `tag` is a valid Docker image tag: `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
pub fn is_valid_image_tag(tag: &str) -> bool {
    let bytes = tag.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= MAX_IMAGE_TAG_LEN
        && (bytes[0].is_ascii_alphanumeric() || bytes[0] == b'_')
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// The body of `GET /health`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HealthReport {
    /// `ok` when no check fails, `degraded` otherwise (the old server sent `ok`).
    #[serde(default)]
    pub status: String,
    /// Host CPU use, percent of all cores.
    #[serde(default)]
    pub cpu: f64,
    /// Total memory, MiB.
    #[serde(default)]
    pub memory_total_mb: f64,
    /// Memory in use, MiB.
    #[serde(default)]
    pub memory_used_mb: f64,
    /// Size of the disk, GiB.
    #[serde(default)]
    pub disk_total_gb: f64,
    /// Disk space in use, GiB.
    #[serde(default)]
    pub disk_used_gb: f64,
    /// AdsPower's state (`running`, `not_responding`, `stopped`, `unknown`); absent with chromium.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adspower_status: Option<String>,
    /// Browser profiles open in AdsPower, when it reports them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_profiles: Option<u32>,
    /// Jobs the worker is running; absent when the worker's status endpoint did not answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_workers: Option<u32>,
    /// Host uptime in seconds.
    #[serde(default)]
    pub uptime: f64,

    // ---- Fields the old health server did not send. ----
    /// The worker image tag the instance runs (during a deploy: the tag it is moving away from).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_tag: Option<String>,
    /// The current or last deploy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deploy: Option<DeployInfo>,
    /// sha256 (hex) of the env file's bytes, absent when the file does not exist.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env_sha256: Option<String>,
    /// The agent's version; absent from the old health server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    /// Whether the worker says it can be stopped without losing work.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deploy_safe: Option<bool>,
    /// `chromium` or `adspower`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub browser_engine: Option<String>,
    /// The configured browser engine's state, whichever it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub browser_status: Option<String>,
    /// When the metrics and checks below were taken (they are refreshed in the background).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checked_at: Option<Timestamp>,
    /// The seeds' `health-check.sh` checks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub checks: Vec<Check>,
    /// The standalone worker containers (label `gh.role=targeted-worker`), as the engine shows
    /// them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub targeted_workers: Vec<TargetedWorker>,
    /// When the worker was asked to drain (`POST /drain`): it takes no new work until a deploy
    /// replaces it. Absent when it was not (and from the old health server).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub draining_since: Option<Timestamp>,
}

/// A standalone worker container (the seeds' `deploy.sh start-worker`), as `/health` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TargetedWorker {
    /// The container's name.
    pub name: String,
    /// Its `gh.worker_id` label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_id: Option<String>,
    /// The image it runs (`repository:tag`).
    #[serde(default)]
    pub image: String,
    /// The tag of that image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_tag: Option<String>,
    /// The engine's state: `running`, `exited`, `created`, ...
    #[serde(default)]
    pub state: String,
    /// Its status port, when its environment names one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

impl HealthReport {
    /// Memory in use, percent of total (0 when the total is unknown).
    pub fn memory_percent(&self) -> f64 {
        percent(self.memory_used_mb, self.memory_total_mb)
    }

    /// Disk in use, percent of total (0 when the total is unknown).
    pub fn disk_percent(&self) -> f64 {
        percent(self.disk_used_gb, self.disk_total_gb)
    }

    /// Checks that failed.
    pub fn failing_checks(&self) -> Vec<&Check> {
        self.checks
            .iter()
            .filter(|c| c.status == CheckStatus::Fail)
            .collect()
    }

    /// Checks that warned.
    pub fn warning_checks(&self) -> Vec<&Check> {
        self.checks
            .iter()
            .filter(|c| c.status == CheckStatus::Warn)
            .collect()
    }

    /// The agent (or old health server) says it is fine: status `ok`/`healthy` and no check fails.
    pub fn is_healthy(&self) -> bool {
        matches!(self.status.as_str(), "ok" | "healthy") && self.failing_checks().is_empty()
    }

    /// Disk or memory at or above [`FAIL_PERCENT`].
    pub fn degraded(&self) -> bool {
        self.memory_percent() >= FAIL_PERCENT || self.disk_percent() >= FAIL_PERCENT
    }

    /// A deploy is running on the instance.
    pub fn deploy_running(&self) -> bool {
        self.deploy
            .as_ref()
            .is_some_and(|d| d.state == DeployState::Running)
    }

    /// The worker reported no active jobs (unknown counts as not idle).
    pub fn is_idle(&self) -> bool {
        self.active_workers == Some(0)
    }

    /// The worker can be stopped: `deploy_safe` when reported, else no active jobs.
    pub fn is_deploy_safe(&self) -> bool {
        self.deploy_safe.unwrap_or_else(|| self.is_idle())
    }

    /// The report comes from `sandbox-agent` (not from the old health server), so `/drain`,
    /// `/restart` and `/env` exist.
    pub fn is_agent(&self) -> bool {
        self.agent_version.is_some()
    }

    /// The report comes from the seeds' old `health-server.js`: none of the fields it never sent
    /// (`agentVersion`, `imageTag`, `deploy`) is present. Such a server cannot say which image
    /// it runs or how a deploy went; only that it answers, and how many workers are busy.
    pub fn is_legacy(&self) -> bool {
        self.agent_version.is_none() && self.image_tag.is_none() && self.deploy.is_none()
    }

    /// The check with this name.
    pub fn check(&self, name: &str) -> Option<&Check> {
        self.checks.iter().find(|c| c.name == name)
    }
}

fn percent(used: f64, total: f64) -> f64 {
    if total > 0.0 {
        used / total * 100.0
    } else {
        0.0
    }
}

/// One of the seeds' `health-check.sh` checks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    /// The check's name (`disk`, `memory`, `display`, ...).
    pub name: String,
    /// Whether it passed.
    pub status: CheckStatus,
    /// What it found, in a few words.
    #[serde(default)]
    pub message: String,
}

impl Check {
    /// A check with this outcome.
    pub fn new(name: &str, status: CheckStatus, message: impl Into<String>) -> Self {
        Self {
            name: name.to_string(),
            status,
            message: message.into(),
        }
    }
    /// A check that passed.
    pub fn pass(name: &str, message: impl Into<String>) -> Self {
        Self::new(name, CheckStatus::Pass, message)
    }
    /// A check that warns.
    pub fn warn(name: &str, message: impl Into<String>) -> Self {
        Self::new(name, CheckStatus::Warn, message)
    }
    /// A check that failed.
    pub fn fail(name: &str, message: impl Into<String>) -> Self {
        Self::new(name, CheckStatus::Fail, message)
    }
}

/// The outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckStatus {
    /// It passed.
    Pass,
    /// Not failed, but worth a look.
    Warn,
    /// It failed.
    Fail,
    /// A status this client does not know (a newer agent).
    #[serde(other)]
    Unknown,
}

/// The state of a deploy, as `/health` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeployState {
    /// Steps are still running.
    Running,
    /// Every step worked; the new tag runs, healthy.
    Succeeded,
    /// The deploy failed and so did the rollback (or nothing could be rolled back).
    Failed,
    /// The deploy failed and the previous tag runs again, healthy.
    RolledBack,
    /// A state this client does not know (a newer agent).
    #[serde(other)]
    Unknown,
}

impl DeployState {
    /// Whether the deploy has ended (anything but `Running`).
    pub fn is_terminal(self) -> bool {
        !matches!(self, DeployState::Running)
    }
    /// The state's name on the wire (`running`, `succeeded`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            DeployState::Running => "running",
            DeployState::Succeeded => "succeeded",
            DeployState::Failed => "failed",
            DeployState::RolledBack => "rolled_back",
            DeployState::Unknown => "unknown",
        }
    }
}

/// The steps of a deploy, in the order `gh-deploy.sh` runs them; the `Rollback*` steps run only
/// after a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeployStep {
    /// Read the current `GH_IMAGE_TAG` from the env file.
    RecordPrevious,
    /// Write the new `GH_IMAGE_TAG` into the env file.
    SetImageTag,
    /// The optional registry login (`aws ecr get-login-password | docker login ...`, or
    /// `docker login --password-stdin` with configured credentials).
    Login,
    /// `docker compose pull`.
    Pull,
    /// Ask the worker to drain, wait (bounded) for `deploy_safe`.
    Drain,
    /// `docker compose stop -t <grace> <worker>`.
    StopWorker,
    /// `docker compose up -d --remove-orphans`, then each targeted worker drained and recreated
    /// on the new tag.
    Up,
    /// Poll the worker's health URL.
    HealthCheck,
    /// Restore the previous `GH_IMAGE_TAG` in the env file.
    RollbackImageTag,
    /// `docker compose up -d --remove-orphans` with the previous tag, and the targeted workers
    /// back on the image each ran before.
    RollbackUp,
    /// Poll the worker's health URL again.
    RollbackHealthCheck,
    /// A step this client does not know (a newer agent).
    #[serde(other)]
    Unknown,
}

impl DeployStep {
    /// The step's name on the wire (`record_previous`, `pull`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            DeployStep::RecordPrevious => "record_previous",
            DeployStep::SetImageTag => "set_image_tag",
            DeployStep::Login => "login",
            DeployStep::Pull => "pull",
            DeployStep::Drain => "drain",
            DeployStep::StopWorker => "stop_worker",
            DeployStep::Up => "up",
            DeployStep::HealthCheck => "health_check",
            DeployStep::RollbackImageTag => "rollback_image_tag",
            DeployStep::RollbackUp => "rollback_up",
            DeployStep::RollbackHealthCheck => "rollback_health_check",
            DeployStep::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for DeployStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The outcome of one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    /// It is running now.
    Running,
    /// It worked.
    Succeeded,
    /// It did not fully work, and the deploy went on anyway (a drain that timed out).
    Warning,
    /// It failed.
    Failed,
    /// Nothing to do (no login command configured).
    Skipped,
    /// A status this client does not know (a newer agent).
    #[serde(other)]
    Unknown,
}

/// One step of a deploy, as it went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StepRecord {
    /// Which step.
    pub name: DeployStep,
    /// How it went.
    pub status: StepStatus,
    /// What it did or why it failed, in a sentence.
    #[serde(default)]
    pub message: String,
    /// When it started.
    pub started_at: Timestamp,
    /// When it ended (absent while it runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Timestamp>,
}

/// The current or last deploy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeployInfo {
    /// The deploy's id, given by the agent.
    pub id: String,
    /// The tag being deployed.
    pub tag: String,
    /// The tag the env file named before (absent when it named none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_tag: Option<String>,
    /// Where it stands.
    pub state: DeployState,
    /// The step running now, or the last step that ran.
    pub step: DeployStep,
    /// What happened, in a sentence (for a failure: which step and why).
    #[serde(default)]
    pub message: String,
    /// When it started.
    pub started_at: Timestamp,
    /// When it ended (absent while it runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Timestamp>,
    /// Every step so far, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<StepRecord>,
}

/// `POST /deploy` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployRequest {
    /// The image tag to deploy (`imageTag` accepted too).
    #[serde(alias = "imageTag")]
    pub image_tag: String,
}

/// `POST /deploy` answer (202), and the body of its 409 (with `success: false` and the running
/// deploy's id).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeployAccepted {
    /// Whether the deploy was started.
    pub success: bool,
    /// Why not, or that it started.
    #[serde(default)]
    pub message: String,
    /// Absent from the old health server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deploy_id: Option<String>,
}

/// `POST /drain` body (optional: an empty body means "drain and wait the configured time").
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DrainRequest {
    /// Wait for `deploy_safe` (default true); false answers right after asking the worker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait: Option<bool>,
    /// How long to wait at most, in seconds; capped by the agent's configured drain timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u64>,
}

/// `POST /drain` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainResponse {
    /// Whether the worker may be stopped now.
    pub deploy_safe: bool,
    /// Jobs the worker still runs, when it said.
    #[serde(rename = "activeWorkers", default)]
    pub active_workers: Option<u32>,
}

/// `POST /restart` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestartRequest {
    /// The allow-listed service to restart.
    pub service: String,
}

/// `POST /restart` answer, and one entry of `PUT /env`'s `restarted`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestartResponse {
    /// Whether the restart worked.
    pub success: bool,
    /// The service.
    pub service: String,
    /// What the restart said, in a sentence.
    #[serde(default)]
    pub message: String,
}

/// `PUT /env` body: the whole env file, and the allow-listed services to restart once it is
/// written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PutEnvRequest {
    /// The whole env file.
    pub content: String,
    /// Allow-listed services to restart once the file is written.
    #[serde(default)]
    pub restart_services: Vec<String>,
}

/// `PUT /env` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutEnvResponse {
    /// sha256 (hex) of the bytes written.
    pub sha256: String,
    /// The services restarted, each with its outcome.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub restarted: Vec<RestartResponse>,
}

/// The body of every error answer (4xx, 5xx).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorBody {
    /// Always false on an error answer.
    #[serde(default)]
    pub success: bool,
    /// What went wrong (`error` accepted too).
    #[serde(default, alias = "error")]
    pub message: String,
    /// On a 409 from `/deploy`: the running deploy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deploy_id: Option<String>,
    /// On a failed restart after `PUT /env`: the file was written with this hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_tags() {
        for ok in ["v1.2.3", "latest", "abc123def", "_x", "a", &"a".repeat(128)] {
            assert!(is_valid_image_tag(ok), "{ok}");
        }
        for bad in ["", "-x", ".x", "a b", "a:b", "a/b", &"a".repeat(129), "ä"] {
            assert!(!is_valid_image_tag(bad), "{bad}");
        }
    }

    #[test]
    fn old_health_server_json_decodes() {
        let old = r#"{"status":"ok","cpu":15.2,"memoryTotalMb":8192,"memoryUsedMb":3456,
            "diskTotalGb":40,"diskUsedGb":12,"adspowerStatus":"running","activeProfiles":2,
            "activeWorkers":3,"uptime":86400}"#;
        let r: HealthReport = serde_json::from_str(old).unwrap();
        assert_eq!(r.active_workers, Some(3));
        assert_eq!(r.memory_total_mb, 8192.0);
        assert!(r.is_healthy());
        assert!(!r.degraded());
        assert!(!r.is_agent());
        assert!(r.is_legacy());
        let new = HealthReport {
            agent_version: Some("0.1.0".into()),
            ..r.clone()
        };
        assert!(!new.is_legacy());
        let tagged = HealthReport {
            image_tag: Some("v1".into()),
            ..r.clone()
        };
        assert!(!tagged.is_legacy());
        assert!(r.deploy.is_none() && r.checks.is_empty());
        assert!(!r.is_deploy_safe());
    }

    #[test]
    fn degraded_at_90_percent() {
        let r = HealthReport {
            status: "ok".into(),
            disk_total_gb: 40.0,
            disk_used_gb: 36.0,
            memory_total_mb: 100.0,
            memory_used_mb: 10.0,
            ..Default::default()
        };
        assert!(r.degraded());
        let r = HealthReport {
            disk_used_gb: 35.9,
            ..r
        };
        assert!(!r.degraded());
    }

    #[test]
    fn unknown_enum_values_decode() {
        let c: Check = serde_json::from_str(r#"{"name":"x","status":"meh"}"#).unwrap();
        assert_eq!(c.status, CheckStatus::Unknown);
        assert_eq!(
            serde_json::to_string(&DeployState::RolledBack).unwrap(),
            "\"rolled_back\""
        );
    }
}
