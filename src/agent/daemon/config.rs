//! The agent's configuration: a YAML file (`--config`), with command-line flags and
//! `SANDBOX_AGENT_*` environment variables overriding its most used settings.
//!
//! Every setting has a default that matches the seeds' GhostHands instance (docker compose project
//! in `/opt/ghosthands`, worker status on `:3101`, API health on `:3100`, 30 health tries 2 s apart,
//! a 35 s stop grace, a 60 s drain). Probes of the instance's other parts (display, VNC, noVNC,
//! worker service, compose services) are off until configured; an unconfigured check reports
//! `warn` with "not configured". `examples/agent/agent.yaml` configures all of them.

use clap::Parser;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Errors loading or checking the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("reading config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why it could not be read.
        source: std::io::Error,
    },
    /// The config file is not valid YAML for this configuration.
    #[error("parsing config file {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the YAML parser said.
        source: serde_yaml::Error,
    },
    /// A value is out of range or settings contradict each other.
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// A duration written as `150ms`, `2s`, `5m`, `1h` or a number of seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dur(pub Duration);

impl Dur {
    /// `s` seconds.
    pub const fn secs(s: u64) -> Self {
        Dur(Duration::from_secs(s))
    }
    /// `ms` milliseconds.
    pub const fn millis(ms: u64) -> Self {
        Dur(Duration::from_millis(ms))
    }
}

impl std::str::FromStr for Dur {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_duration(s).map(Dur)
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms.is_multiple_of(1000) {
            write!(f, "{}s", ms / 1000)
        } else {
            write!(f, "{ms}ms")
        }
    }
}

/// Parses `150ms`, `2s`, `1.5s`, `5m`, `1h`, `1h30m` (the crate's one duration parser,
/// [`crate::util::parse_duration`]), or a bare number of seconds, as the config file has always
/// accepted.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return match s.parse::<f64>() {
            Ok(n) if n.is_finite() => Ok(Duration::from_secs_f64(n)),
            _ => Err(format!(
                "invalid duration {s:?} (expected e.g. 150ms, 2s, 5m)"
            )),
        };
    }
    crate::util::parse_duration(s).map_err(|e| e.to_string())
}

impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Num(f64),
            Str(String),
        }
        match Raw::deserialize(d)? {
            Raw::Num(n) if n >= 0.0 && n.is_finite() => Ok(Dur(Duration::from_secs_f64(n))),
            Raw::Num(n) => Err(serde::de::Error::custom(format!("invalid duration {n}"))),
            Raw::Str(s) => parse_duration(&s)
                .map(Dur)
                .map_err(serde::de::Error::custom),
        }
    }
}

/// Which browser engine the instance runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "lowercase")]
pub enum BrowserEngine {
    /// Chromium (the default).
    #[default]
    Chromium,
    /// AdsPower.
    Adspower,
}

impl BrowserEngine {
    /// The engine's name as configured and reported: `chromium` or `adspower`.
    pub fn as_str(self) -> &'static str {
        match self {
            BrowserEngine::Chromium => "chromium",
            BrowserEngine::Adspower => "adspower",
        }
    }
}

/// How to look at one part of the instance. Exactly one field is set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Probe {
    /// Pass when a TCP connection to `host:port` succeeds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<String>,
    /// Pass when `GET url` answers 200, 301 or 302 (what `health-check.sh` accepted for noVNC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<String>,
    /// Pass when the command (argv, no shell) exits 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// Pass when a process with this exact name (`/proc/PID/comm`) runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<String>,
    /// Pass when `systemctl is-active UNIT` says `active`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub systemd_unit: Option<String>,
    /// Pass when the path exists (e.g. the X socket `/tmp/.X11-unix/X99`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
}

impl Probe {
    fn kinds(&self) -> usize {
        [
            self.tcp.is_some(),
            self.http.is_some(),
            self.command.is_some(),
            self.process.is_some(),
            self.systemd_unit.is_some(),
            self.path.is_some(),
        ]
        .into_iter()
        .filter(|b| *b)
        .count()
    }
}

/// What restarting an allow-listed service does. Exactly one field is set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceAction {
    /// `systemctl restart UNIT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub systemd_unit: Option<String>,
    /// `docker compose ... restart SERVICE`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compose_service: Option<String>,
    /// Any command (argv, no shell).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// `true`: recreate the running targeted workers (see `targetedWorkers`) on their image, so
    /// they read their env files again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub targeted_workers: Option<bool>,
    /// After the restart, poll this URL until it answers 2xx (`deploy.healthCheckTries` tries,
    /// `deploy.healthCheckInterval` apart); a service that does not is reported failed. Without
    /// it: a compose service must be running (and healthy, if it has a health check), a systemd
    /// unit active.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_url: Option<String>,
}

/// How the deploy logs in to the registry before pulling. Exactly one form.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoginConfig {
    /// A shell command (`sh -c`), e.g. the ECR form
    /// `aws ecr get-login-password --region REGION | docker login --username AWS
    /// --password-stdin ACCOUNT.dkr.ecr.REGION.amazonaws.com`. Its output is shown redacted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell: Option<String>,
    /// The registry for `docker login` (with `username` and `passwordFile`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry: Option<String>,
    /// The user for `docker login` (with `registry` and `passwordFile`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// The password (first line), given to `docker login --password-stdin` on its stdin: never
    /// in argv, never logged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
}

/// What the deploy does when the worker is not deploy-safe after `drainTimeout`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DrainTimeoutAction {
    /// Stop it anyway with `stopGrace` (what `gh-deploy.sh` did).
    #[default]
    Proceed,
    /// Give up: the deploy fails at `drain`, the env file is restored, the containers are
    /// left running.
    Abort,
}

/// Standalone worker containers (the seeds' `deploy.sh start-worker`), recreated on the new image
/// during a deploy (after `up`, before the health check) and rolled back with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct TargetedWorkersConfig {
    /// Label filters (`key=value` or `key`) a container must all match; empty: no targeted
    /// workers.
    pub selector: Vec<String>,
    /// The env files whose variables the workers get when recreated, in order (later wins).
    /// Empty: `deploy.envFile`.
    pub env_files: Vec<PathBuf>,
    /// Variables taken from the running container when it is recreated (its own settings, set
    /// when it was started), on top of the env files.
    pub own_keys: Vec<String>,
    /// The variable holding a worker's status port (for `statusUrl`, `drainUrl`).
    pub port_key: String,
    /// A worker's status; `{port}` is replaced by its port.
    pub status_url: String,
    /// POST here drains a worker; `{port}` as above.
    pub drain_url: String,
    /// The image repository to run; default: the container's current image without its tag.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

impl Default for TargetedWorkersConfig {
    fn default() -> Self {
        Self {
            selector: vec!["gh.role=targeted-worker".into()],
            env_files: Vec::new(),
            own_keys: vec!["GH_WORKER_ID".into(), "GH_WORKER_PORT".into()],
            port_key: "GH_WORKER_PORT".into(),
            status_url: "http://127.0.0.1:{port}/worker/status".into(),
            drain_url: "http://127.0.0.1:{port}/worker/drain".into(),
            image: None,
        }
    }
}

/// The worker's service, for the `worker_service` check (state and restart count).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkerServiceCheck {
    /// A systemd unit: `systemctl show UNIT -p ActiveState,NRestarts`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub systemd_unit: Option<String>,
    /// A compose service: its container's state and `RestartCount` from `docker inspect`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compose_service: Option<String>,
}

/// AdsPower's local API and service (the `adspower` section).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct AdsPowerConfig {
    /// AdsPower's local API (`GET {apiUrl}/status`; open browsers from
    /// `/api/v1/browser/local-active`).
    pub api_url: String,
    /// Where AdsPower's API key is (sent as a bearer token), if the API needs one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_key_file: Option<PathBuf>,
    /// How to tell "service running, API not answering" (warn) from "not running" (fail).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<Probe>,
}

impl Default for AdsPowerConfig {
    fn default() -> Self {
        Self {
            api_url: "http://127.0.0.1:50325".into(),
            api_key_file: None,
            service: None,
        }
    }
}

/// The chromium browser (the `chromium` section).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ChromiumConfig {
    /// The chromium binary; when unset, `chromium`, `chromium-browser`, `google-chrome` are looked
    /// up in `PATH`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub binary: Option<PathBuf>,
}

/// The docker CLI and the compose project (the `docker` section).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct DockerConfig {
    /// The docker CLI.
    pub binary: PathBuf,
    /// Compose files (`-f`), in order.
    pub compose_files: Vec<PathBuf>,
    /// `--project-directory` (default: none, compose uses the first file's directory).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub project_directory: Option<PathBuf>,
    /// `-p` (default: none, compose derives it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub project_name: Option<String>,
    /// Pass the deploy env file as `--env-file` (so compose reads the tag from it).
    pub pass_env_file: bool,
    /// The compose service of the worker (stopped with a grace before `up`).
    pub worker_service: String,
    /// How often the running containers are looked at (`docker compose ps` for the worker's
    /// image tag, the targeted workers) for `/health`.
    pub observe_interval: Dur,
}

impl Default for DockerConfig {
    fn default() -> Self {
        Self {
            binary: "docker".into(),
            compose_files: vec!["/opt/ghosthands/docker-compose.prod.yml".into()],
            project_directory: Some("/opt/ghosthands".into()),
            project_name: None,
            pass_env_file: true,
            worker_service: "worker".into(),
            observe_interval: Dur::secs(5),
        }
    }
}

/// The worker's HTTP endpoints (the `worker` section).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// The worker's status (JSON with `activeWorkers`/`active_jobs` and `deploy_safe`).
    pub status_url: String,
    /// `POST` here asks the worker to finish its jobs and take no more.
    pub drain_url: String,
    /// The API health URL the deploy polls after `up` (2xx = healthy).
    pub health_url: String,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            status_url: "http://127.0.0.1:3101/worker/status".into(),
            drain_url: "http://127.0.0.1:3101/worker/drain".into(),
            health_url: "http://127.0.0.1:3100/health".into(),
        }
    }
}

/// How a deploy runs (the `deploy` section).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct DeployConfig {
    /// The env file that holds the image tag (compose's `.env`); default: the top-level `envFile`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub env_file: Option<PathBuf>,
    /// The variable that names the image tag.
    pub image_tag_key: String,
    /// A command run before `pull` (e.g. a registry login script); none by default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub login_command: Option<Vec<String>>,
    /// The registry login before `pull`: a shell command or credentials (instead of
    /// `loginCommand`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub login: Option<LoginConfig>,
    /// When the worker is not deploy-safe after `drainTimeout`: `proceed` or `abort`.
    pub on_drain_timeout: DrainTimeoutAction,
    /// How long to wait for the worker to become deploy-safe after asking it to drain.
    pub drain_timeout: Dur,
    /// How often to ask the worker's status while draining.
    pub drain_poll_interval: Dur,
    /// `docker compose stop -t` for the worker.
    pub stop_grace: Dur,
    /// Health checks after `up` (and after a rollback's `up`).
    pub health_check_tries: u32,
    /// Time between health checks.
    pub health_check_interval: Dur,
    /// Timeout of one health check request.
    pub health_check_timeout: Dur,
    /// Timeout of one docker command (a pull can be slow).
    pub command_timeout: Dur,
}

impl Default for DeployConfig {
    fn default() -> Self {
        Self {
            env_file: None,
            image_tag_key: "GH_IMAGE_TAG".into(),
            login_command: None,
            login: None,
            on_drain_timeout: DrainTimeoutAction::Proceed,
            drain_timeout: Dur::secs(60),
            drain_poll_interval: Dur::secs(2),
            stop_grace: Dur::secs(35),
            health_check_tries: 30,
            health_check_interval: Dur::secs(2),
            health_check_timeout: Dur::secs(5),
            command_timeout: Dur::secs(600),
        }
    }
}

/// What the health checks look at (the `checks` section).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ChecksConfig {
    /// The virtual display (Xvfb), e.g. `{systemdUnit: xvfb}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub display: Option<Probe>,
    /// The VNC server, e.g. `{process: x11vnc}` or `{tcp: "127.0.0.1:5900"}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vnc: Option<Probe>,
    /// noVNC, e.g. `{http: "http://127.0.0.1:6080/vnc.html"}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub novnc: Option<Probe>,
    /// The worker's service and its restart count.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker_service: Option<WorkerServiceCheck>,
    /// Restarts at or above this count warn.
    pub worker_restart_warn: u32,
    /// Compose services that must be running (from `docker compose ps`); empty: not checked.
    pub compose_services: Vec<String>,
    /// The disk whose use is reported (the mount point holding this path).
    pub disk_path: PathBuf,
    /// Disk or memory use at or above this percent warns.
    pub warn_percent: f64,
    /// Disk or memory use at or above this percent fails.
    pub fail_percent: f64,
}

impl Default for ChecksConfig {
    fn default() -> Self {
        Self {
            display: None,
            vnc: None,
            novnc: None,
            worker_service: None,
            worker_restart_warn: 5,
            compose_services: Vec::new(),
            disk_path: "/".into(),
            warn_percent: 80.0,
            fail_percent: 90.0,
        }
    }
}

/// Request size and time limits (the `limits` section).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest body accepted by `/deploy`, `/drain`, `/restart` (bytes).
    pub body_bytes: usize,
    /// Largest body accepted by `PUT /env` (bytes).
    pub env_body_bytes: usize,
    /// Time limit of one request (`/drain` gets its drain timeout on top, `/restart` and
    /// `PUT /env` their restart timeout).
    pub request_timeout: Dur,
    /// Time limit of one service restart.
    pub restart_timeout: Dur,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            body_bytes: 16 * 1024,
            env_body_bytes: 1024 * 1024,
            request_timeout: Dur::secs(30),
            restart_timeout: Dur::secs(90),
        }
    }
}

/// The whole configuration (the YAML file's top level).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Address to listen on (port 0 picks a free port; see `--addr-file`).
    pub listen: SocketAddr,
    /// File holding the bearer token (its first line; readable by the agent only).
    pub token_file: PathBuf,
    /// Require the token for `GET /health` too.
    pub require_auth_for_health: bool,
    /// Where the deploy state is kept across restarts.
    pub state_file: PathBuf,
    /// The env file `PUT /env` writes and whose sha256 `/health` reports.
    pub env_file: PathBuf,
    /// `chromium` or `adspower`.
    pub browser_engine: BrowserEngine,
    /// AdsPower's API and service.
    pub adspower: AdsPowerConfig,
    /// The chromium browser.
    pub chromium: ChromiumConfig,
    /// The systemctl binary (for systemd probes and service restarts).
    pub systemctl: PathBuf,
    /// The docker CLI and the compose project.
    pub docker: DockerConfig,
    /// The worker's HTTP endpoints.
    pub worker: WorkerConfig,
    /// How a deploy runs.
    pub deploy: DeployConfig,
    /// Standalone worker containers the deploy recreates on the new image.
    pub targeted_workers: TargetedWorkersConfig,
    /// Services `POST /restart` and `PUT /env` may restart, by name.
    pub services: BTreeMap<String, ServiceAction>,
    /// What the health checks look at.
    pub checks: ChecksConfig,
    /// How often metrics, worker status and checks are refreshed in the background.
    pub refresh_interval: Dur,
    /// Timeout of one probe (TCP, HTTP, command) during a refresh.
    pub probe_timeout: Dur,
    /// Request size and time limits.
    pub limits: LimitsConfig,
}

impl Default for AgentConfig {
    fn default() -> Self {
        let mut services = BTreeMap::new();
        services.insert(
            "adspower".to_string(),
            ServiceAction {
                systemd_unit: Some("adspower".into()),
                ..Default::default()
            },
        );
        Self {
            listen: "0.0.0.0:8000".parse().expect("valid address"),
            token_file: "/etc/sandbox-agent/token".into(),
            require_auth_for_health: false,
            state_file: "/var/lib/sandbox-agent/state.json".into(),
            env_file: "/opt/valet/.env".into(),
            browser_engine: BrowserEngine::Chromium,
            adspower: AdsPowerConfig::default(),
            chromium: ChromiumConfig::default(),
            systemctl: "systemctl".into(),
            docker: DockerConfig::default(),
            worker: WorkerConfig::default(),
            deploy: DeployConfig {
                env_file: Some("/opt/ghosthands/.env".into()),
                ..DeployConfig::default()
            },
            targeted_workers: TargetedWorkersConfig::default(),
            services,
            checks: ChecksConfig::default(),
            refresh_interval: Dur::secs(5),
            probe_timeout: Dur::secs(2),
            limits: LimitsConfig::default(),
        }
    }
}

/// Whether `name` can name a service in the allow-list (and in requests).
pub fn is_valid_service_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'@'))
}

impl AgentConfig {
    /// Reads a YAML file (an empty file means all defaults).
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_yaml(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Reads the YAML text (an empty text is the default configuration); unknown fields are refused.
    pub fn from_yaml(text: &str) -> Result<Self, serde_yaml::Error> {
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        serde_yaml::from_str(text)
    }

    /// The env file that holds the image tag.
    pub fn deploy_env_file(&self) -> &Path {
        self.deploy.env_file.as_deref().unwrap_or(&self.env_file)
    }

    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        let probes = [
            ("checks.display", self.checks.display.as_ref()),
            ("checks.vnc", self.checks.vnc.as_ref()),
            ("checks.novnc", self.checks.novnc.as_ref()),
            ("adspower.service", self.adspower.service.as_ref()),
        ];
        for (name, p) in probes {
            if let Some(p) = p {
                if p.kinds() != 1 {
                    return bad(format!(
                        "{name}: set exactly one of tcp, http, command, process, systemdUnit, path"
                    ));
                }
                if p.command.as_ref().is_some_and(|c| c.is_empty()) {
                    return bad(format!("{name}.command: empty"));
                }
            }
        }
        if let Some(w) = &self.checks.worker_service
            && (w.systemd_unit.is_some() == w.compose_service.is_some())
        {
            return bad(
                "checks.workerService: set exactly one of systemdUnit, composeService".into(),
            );
        }
        for (name, s) in &self.services {
            if !is_valid_service_name(name) {
                return bad(format!("services: invalid service name {name:?}"));
            }
            let n = [
                s.systemd_unit.is_some(),
                s.compose_service.is_some(),
                s.command.is_some(),
                s.targeted_workers.is_some(),
            ]
            .into_iter()
            .filter(|b| *b)
            .count();
            if n != 1 {
                return bad(format!(
                    "services.{name}: set exactly one of systemdUnit, composeService, command, targetedWorkers"
                ));
            }
            if s.targeted_workers == Some(false) {
                return bad(format!(
                    "services.{name}.targetedWorkers: only true is meaningful"
                ));
            }
            if let Some(u) = &s.health_url
                && reqwest::Url::parse(u).is_err()
            {
                return bad(format!("services.{name}.healthUrl: not a URL"));
            }
            if s.command.as_ref().is_some_and(|c| c.is_empty()) {
                return bad(format!("services.{name}.command: empty"));
            }
        }
        for (name, url) in [
            ("worker.statusUrl", &self.worker.status_url),
            ("worker.drainUrl", &self.worker.drain_url),
            ("worker.healthUrl", &self.worker.health_url),
            ("adspower.apiUrl", &self.adspower.api_url),
        ] {
            if reqwest::Url::parse(url).is_err() {
                return bad(format!("{name}: not a URL"));
            }
        }
        if self.deploy.health_check_tries == 0 {
            return bad("deploy.healthCheckTries must be at least 1".into());
        }
        if self.docker.compose_files.is_empty() {
            return bad("docker.composeFiles must name at least one file".into());
        }
        if !crate::agent::envfile::is_valid_key(&self.deploy.image_tag_key) {
            return bad("deploy.imageTagKey is not a valid variable name".into());
        }
        if self.refresh_interval.0.is_zero() {
            return bad("refreshInterval must be positive".into());
        }
        if self
            .deploy
            .login_command
            .as_ref()
            .is_some_and(|c| c.is_empty())
        {
            return bad("deploy.loginCommand: empty".into());
        }
        if let Some(l) = &self.deploy.login {
            self.validate_login(l)?;
        }
        self.validate_targeted()?;
        if self.docker.observe_interval.0.is_zero() {
            return bad("docker.observeInterval must be positive".into());
        }
        if self.checks.warn_percent > self.checks.fail_percent {
            return bad("checks.warnPercent must not exceed checks.failPercent".into());
        }
        Ok(())
    }
}

impl AgentConfig {
    fn validate_login(&self, l: &LoginConfig) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(format!("deploy.login: {m}")));
        if self.deploy.login_command.is_some() {
            return bad("set either deploy.loginCommand or deploy.login, not both");
        }
        let creds = [
            l.registry.is_some(),
            l.username.is_some(),
            l.password_file.is_some(),
        ];
        match (&l.shell, creds.iter().filter(|b| **b).count()) {
            (Some(sh), 0) if sh.trim().is_empty() => bad("shell: empty"),
            (Some(_), 0) => Ok(()),
            (None, 3) => {
                let ok = |v: &Option<String>| {
                    v.as_deref().is_some_and(|v| {
                        !v.is_empty() && !v.starts_with('-') && !v.contains(char::is_whitespace)
                    })
                };
                if !ok(&l.registry) {
                    return bad("registry must be a host[:port] (no spaces, not starting with -)");
                }
                if !ok(&l.username) {
                    return bad("username must be a word (no spaces, not starting with -)");
                }
                Ok(())
            }
            (None, 0) => bad("set shell, or registry, username and passwordFile"),
            (None, _) => bad("registry, username and passwordFile go together"),
            (Some(_), _) => bad("set shell, or registry, username and passwordFile, not both"),
        }
    }

    fn validate_targeted(&self) -> Result<(), ConfigError> {
        let t = &self.targeted_workers;
        let bad = |m: String| Err(ConfigError::Invalid(format!("targetedWorkers.{m}")));
        for f in &t.selector {
            if f.is_empty() || f.starts_with('=') || f.contains(char::is_whitespace) {
                return bad(format!(
                    "selector: {f:?} is not a label filter (key or key=value)"
                ));
            }
        }
        for k in t.own_keys.iter().chain([&t.port_key]) {
            if !crate::agent::envfile::is_valid_key(k) {
                return bad(format!("ownKeys/portKey: {k:?} is not a variable name"));
            }
        }
        for (name, url) in [("statusUrl", &t.status_url), ("drainUrl", &t.drain_url)] {
            if reqwest::Url::parse(&url.replace("{port}", "1")).is_err() {
                return bad(format!("{name}: not a URL"));
            }
        }
        if let Some(img) = &t.image
            && (img.is_empty() || img.contains(char::is_whitespace) || img.starts_with('-'))
        {
            return bad("image: not an image repository".into());
        }
        Ok(())
    }

    /// The env files the targeted workers get.
    pub fn targeted_env_files(&self) -> Vec<PathBuf> {
        if self.targeted_workers.env_files.is_empty() {
            vec![self.deploy_env_file().to_path_buf()]
        } else {
            self.targeted_workers.env_files.clone()
        }
    }
}

/// sandbox-agent: the program on each sandbox instance that the operator talks to.
///
/// It serves GET /health (host metrics, worker state, image tag, last deploy, env file hash,
/// health checks), POST /deploy (pull, drain, stop, up, health check, roll back), POST /drain,
/// POST /restart and PUT /env. Every call but GET /health and GET /healthz needs
/// `Authorization: Bearer <token>`.
///
/// Settings come from the YAML file given with --config (see examples/agent/agent.yaml, which
/// documents every key); the flags below, or their SANDBOX_AGENT_* environment variables, override
/// the file. Durations are written like 150ms, 2s, 5m.
#[derive(Debug, Clone, Parser)]
#[command(name = "sandbox-agent", version, about, long_about, after_long_help = SETTINGS_HELP)]
pub struct Cli {
    /// YAML configuration file; without it, built-in defaults (GhostHands paths) apply.
    #[arg(long, short = 'c', env = "SANDBOX_AGENT_CONFIG")]
    pub config: Option<PathBuf>,

    /// Address to listen on, e.g. 0.0.0.0:8000 [config: listen; default 0.0.0.0:8000].
    #[arg(long, env = "SANDBOX_AGENT_LISTEN")]
    pub listen: Option<SocketAddr>,

    /// Write the address actually bound (useful with port 0) to this file once listening.
    #[arg(long, env = "SANDBOX_AGENT_ADDR_FILE")]
    pub addr_file: Option<PathBuf>,

    /// File holding the bearer token [config: tokenFile; default /etc/sandbox-agent/token].
    /// Re-read on SIGHUP.
    #[arg(long, env = "SANDBOX_AGENT_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,

    /// Require the bearer token for GET /health too [config: requireAuthForHealth].
    #[arg(long, env = "SANDBOX_AGENT_REQUIRE_AUTH_FOR_HEALTH")]
    pub require_auth_for_health: Option<bool>,

    /// Deploy state file, kept across restarts [config: stateFile; default
    /// /var/lib/sandbox-agent/state.json].
    #[arg(long, env = "SANDBOX_AGENT_STATE_FILE")]
    pub state_file: Option<PathBuf>,

    /// Env file written by PUT /env and hashed in /health [config: envFile; default
    /// /opt/valet/.env].
    #[arg(long, env = "SANDBOX_AGENT_ENV_FILE")]
    pub env_file: Option<PathBuf>,

    /// Env file holding the image tag variable [config: deploy.envFile; default
    /// /opt/ghosthands/.env].
    #[arg(long, env = "SANDBOX_AGENT_DEPLOY_ENV_FILE")]
    pub deploy_env_file: Option<PathBuf>,

    /// Browser engine of the instance [config: browserEngine; default chromium].
    #[arg(long, env = "SANDBOX_AGENT_BROWSER_ENGINE")]
    pub browser_engine: Option<BrowserEngine>,

    /// AdsPower's local API URL [config: adspower.apiUrl; default http://127.0.0.1:50325].
    #[arg(long, env = "SANDBOX_AGENT_ADSPOWER_URL")]
    pub adspower_url: Option<String>,

    /// The docker CLI [config: docker.binary; default docker].
    #[arg(long, env = "SANDBOX_AGENT_DOCKER")]
    pub docker: Option<PathBuf>,

    /// Compose file; repeat for several [config: docker.composeFiles; default
    /// /opt/ghosthands/docker-compose.prod.yml].
    #[arg(
        long = "compose-file",
        env = "SANDBOX_AGENT_COMPOSE_FILE",
        value_delimiter = ','
    )]
    pub compose_files: Vec<PathBuf>,

    /// Compose project directory [config: docker.projectDirectory; default /opt/ghosthands].
    #[arg(long, env = "SANDBOX_AGENT_PROJECT_DIR")]
    pub project_dir: Option<PathBuf>,

    /// Compose service of the worker [config: docker.workerService; default worker].
    #[arg(long, env = "SANDBOX_AGENT_WORKER_SERVICE")]
    pub worker_service: Option<String>,

    /// Worker status URL [config: worker.statusUrl; default
    /// http://127.0.0.1:3101/worker/status].
    #[arg(long, env = "SANDBOX_AGENT_WORKER_STATUS_URL")]
    pub worker_status_url: Option<String>,

    /// Worker drain URL [config: worker.drainUrl; default http://127.0.0.1:3101/worker/drain].
    #[arg(long, env = "SANDBOX_AGENT_WORKER_DRAIN_URL")]
    pub worker_drain_url: Option<String>,

    /// Worker API health URL polled after a deploy [config: worker.healthUrl; default
    /// http://127.0.0.1:3100/health].
    #[arg(long, env = "SANDBOX_AGENT_WORKER_HEALTH_URL")]
    pub worker_health_url: Option<String>,

    /// Health checks after `up` [config: deploy.healthCheckTries; default 30].
    #[arg(long, env = "SANDBOX_AGENT_HEALTH_CHECK_TRIES")]
    pub health_check_tries: Option<u32>,

    /// Time between health checks [config: deploy.healthCheckInterval; default 2s].
    #[arg(long, env = "SANDBOX_AGENT_HEALTH_CHECK_INTERVAL")]
    pub health_check_interval: Option<Dur>,

    /// Longest wait for the worker to drain [config: deploy.drainTimeout; default 60s].
    #[arg(long, env = "SANDBOX_AGENT_DRAIN_TIMEOUT")]
    pub drain_timeout: Option<Dur>,

    /// Grace given to the worker by `docker compose stop -t` [config: deploy.stopGrace; default
    /// 35s].
    #[arg(long, env = "SANDBOX_AGENT_STOP_GRACE")]
    pub stop_grace: Option<Dur>,

    /// How often metrics and checks are refreshed [config: refreshInterval; default 5s].
    #[arg(long, env = "SANDBOX_AGENT_REFRESH_INTERVAL")]
    pub refresh_interval: Option<Dur>,

    /// Log filter, e.g. info or sandbox_operator=debug (RUST_LOG syntax).
    #[arg(long, env = "SANDBOX_AGENT_LOG", default_value = "info")]
    pub log: String,

    /// Log format.
    #[arg(long, env = "SANDBOX_AGENT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Print the effective configuration as YAML and exit (the token is never printed).
    #[arg(long)]
    pub print_config: bool,
}

/// Every key of the YAML file, shown at the end of `--help`.
pub const SETTINGS_HELP: &str = "\
Configuration file keys (YAML, camelCase; defaults in brackets):
  listen                        address to listen on [0.0.0.0:8000]
  tokenFile                     bearer token file, first line [/etc/sandbox-agent/token]
  requireAuthForHealth          require the token for GET /health too [false]
  stateFile                     deploy state, kept across restarts [/var/lib/sandbox-agent/state.json]
  envFile                       env file PUT /env writes (mode 0600) and /health hashes [/opt/valet/.env]
  browserEngine                 chromium | adspower [chromium]
  adspower.apiUrl               AdsPower local API [http://127.0.0.1:50325]
  adspower.apiKeyFile           AdsPower API key, sent as a bearer token [none]
  adspower.service              probe telling 'running, API silent' (warn) from 'stopped' (fail)
  chromium.binary               chromium path [searched in PATH]
  systemctl                     systemctl binary [systemctl]
  docker.binary                 docker CLI [docker]
  docker.composeFiles           compose files, -f [/opt/ghosthands/docker-compose.prod.yml]
  docker.projectDirectory       --project-directory [/opt/ghosthands]
  docker.projectName            -p [none]
  docker.passEnvFile            pass deploy.envFile as --env-file [true]
  docker.workerService          compose service stopped before up [worker]
  docker.observeInterval        how often /health looks at the running containers [5s]
  worker.statusUrl              worker status JSON [http://127.0.0.1:3101/worker/status]
  worker.drainUrl               POST to drain the worker [http://127.0.0.1:3101/worker/drain]
  worker.healthUrl              API health polled after up [http://127.0.0.1:3100/health]
  deploy.envFile                env file holding the image tag [/opt/ghosthands/.env]
  deploy.imageTagKey            the image tag variable [GH_IMAGE_TAG]
  deploy.loginCommand           argv run before pull, e.g. a registry login [none]
  deploy.login.shell            or: a shell command, e.g. aws ecr get-login-password | docker login
                                --username AWS --password-stdin REGISTRY [none]
  deploy.login.registry|username|passwordFile
                                or: docker login --password-stdin with these credentials [none]
  deploy.onDrainTimeout         proceed (stop with the grace) | abort (fail the deploy) [proceed]
  deploy.drainTimeout           longest wait for deploy_safe [60s]
  deploy.drainPollInterval      worker status polling while draining [2s]
  deploy.stopGrace              docker compose stop -t [35s]
  deploy.healthCheckTries       health checks after up [30]
  deploy.healthCheckInterval    time between them [2s]
  deploy.healthCheckTimeout     one health check request [5s]
  deploy.commandTimeout         one docker command [600s]
  services.NAME                 restart allow-list: {systemdUnit: U} | {composeService: S} (recreated, so
                                it reads its env files again) | {command: [argv]} | {targetedWorkers: true};
                                optional healthUrl checked after the restart [adspower: {systemdUnit: adspower}]
  targetedWorkers.selector      label filters of standalone workers the deploy recreates
                                [gh.role=targeted-worker]
  targetedWorkers.envFiles      their env files [deploy.envFile]
  targetedWorkers.ownKeys       variables kept from the running container [GH_WORKER_ID, GH_WORKER_PORT]
  targetedWorkers.portKey       variable holding a worker's status port [GH_WORKER_PORT]
  targetedWorkers.statusUrl|drainUrl
                                [http://127.0.0.1:{port}/worker/status, .../worker/drain]
  targetedWorkers.image         repository to run [the container's image without its tag]
  checks.display|vnc|novnc      probes: {tcp: host:port} | {http: url} (200/301/302) | {command: [argv]}
                                | {process: name} | {systemdUnit: unit} | {path: file}; unset = warn
  checks.workerService          {systemdUnit: U} | {composeService: S}: state and restart count
  checks.workerRestartWarn      restarts that warn [5]
  checks.composeServices        compose services that must run [none]
  checks.diskPath               disk reported and checked [/]
  checks.warnPercent            disk/memory warn threshold [80]
  checks.failPercent            disk/memory fail threshold [90]
  refreshInterval               background refresh of metrics and checks [5s]
  probeTimeout                  one probe [2s]
  limits.bodyBytes              body limit of /deploy, /drain, /restart [16384]
  limits.envBodyBytes           body limit of PUT /env [1048576]
  limits.requestTimeout         request time limit [30s]
  limits.restartTimeout         one service restart [90s]

PUT /env body: {\"content\": \"<whole env file>\", \"restartServices\": [\"name\", ...]}.
SIGHUP re-reads the token file.";

/// How the agent writes its log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl Cli {
    /// The configuration file (if any) with the flags applied on top, validated.
    pub fn load(&self) -> Result<AgentConfig, ConfigError> {
        let mut c = match &self.config {
            Some(p) => AgentConfig::from_file(p)?,
            None => AgentConfig::default(),
        };
        self.apply(&mut c);
        c.validate()?;
        Ok(c)
    }

    /// Applies the flags that were given.
    pub fn apply(&self, c: &mut AgentConfig) {
        fn set<T: Clone>(dst: &mut T, src: &Option<T>) {
            if let Some(v) = src {
                *dst = v.clone();
            }
        }
        set(&mut c.listen, &self.listen);
        set(&mut c.token_file, &self.token_file);
        set(
            &mut c.require_auth_for_health,
            &self.require_auth_for_health,
        );
        set(&mut c.state_file, &self.state_file);
        set(&mut c.env_file, &self.env_file);
        if let Some(p) = &self.deploy_env_file {
            c.deploy.env_file = Some(p.clone());
        }
        set(&mut c.browser_engine, &self.browser_engine);
        set(&mut c.adspower.api_url, &self.adspower_url);
        set(&mut c.docker.binary, &self.docker);
        if !self.compose_files.is_empty() {
            c.docker.compose_files = self.compose_files.clone();
        }
        if let Some(p) = &self.project_dir {
            c.docker.project_directory = Some(p.clone());
        }
        set(&mut c.docker.worker_service, &self.worker_service);
        set(&mut c.worker.status_url, &self.worker_status_url);
        set(&mut c.worker.drain_url, &self.worker_drain_url);
        set(&mut c.worker.health_url, &self.worker_health_url);
        set(&mut c.deploy.health_check_tries, &self.health_check_tries);
        set(
            &mut c.deploy.health_check_interval,
            &self.health_check_interval,
        );
        set(&mut c.deploy.drain_timeout, &self.drain_timeout);
        set(&mut c.deploy.stop_grace, &self.stop_grace);
        set(&mut c.refresh_interval, &self.refresh_interval);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("150ms").unwrap(), Duration::from_millis(150));
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("10").unwrap(), Duration::from_secs(10));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("").is_err());
        assert_eq!(Dur::millis(100).to_string(), "100ms");
        assert_eq!(Dur::secs(35).to_string(), "35s");
    }

    #[test]
    fn defaults_validate_and_round_trip() {
        let c = AgentConfig::default();
        c.validate().unwrap();
        let yaml = serde_yaml::to_string(&c).unwrap();
        assert_eq!(AgentConfig::from_yaml(&yaml).unwrap(), c);
        assert_eq!(AgentConfig::from_yaml("").unwrap(), c);
    }

    #[test]
    fn yaml_overrides_and_rejects_unknown_keys() {
        let c = AgentConfig::from_yaml(
            "listen: 127.0.0.1:0\ndeploy:\n  healthCheckTries: 3\n  healthCheckInterval: 100ms\nchecks:\n  vnc: {tcp: \"127.0.0.1:5900\"}\n",
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.deploy.health_check_tries, 3);
        assert_eq!(c.deploy.health_check_interval, Dur::millis(100));
        assert_eq!(c.deploy.stop_grace, Dur::secs(35));
        assert_eq!(c.checks.vnc.unwrap().tcp.as_deref(), Some("127.0.0.1:5900"));
        assert!(AgentConfig::from_yaml("lisen: x\n").is_err());
        let two = AgentConfig::from_yaml("checks:\n  vnc: {tcp: a, process: b}\n").unwrap();
        assert!(two.validate().is_err());
    }

    #[test]
    fn flags_override_file() {
        let cli = Cli::parse_from([
            "sandbox-agent",
            "--listen",
            "127.0.0.1:9",
            "--health-check-interval",
            "250ms",
            "--compose-file",
            "/a.yml,/b.yml",
        ]);
        let mut c = AgentConfig::default();
        cli.apply(&mut c);
        assert_eq!(c.listen.port(), 9);
        assert_eq!(c.deploy.health_check_interval, Dur::millis(250));
        assert_eq!(c.docker.compose_files.len(), 2);
    }

    #[test]
    fn the_example_config_is_valid() {
        let text = include_str!("../../../examples/agent/agent.yaml");
        let c = AgentConfig::from_yaml(text).unwrap();
        c.validate().unwrap();
        // The service the SecretBundle examples restart reads the file PUT /env writes
        // (valet-worker: EnvironmentFile=/opt/valet/.env).
        assert_eq!(c.env_file, PathBuf::from("/opt/valet/.env"));
        assert_eq!(
            c.services["worker"].systemd_unit.as_deref(),
            Some("valet-worker")
        );
        // Its commented ECR login is valid too.
        let ecr = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("#   shell: "))
            .unwrap();
        let mut c = c;
        c.deploy.login = Some(LoginConfig {
            shell: Some(ecr.into()),
            ..Default::default()
        });
        c.validate().unwrap();
        assert!(ecr.starts_with("aws ecr get-login-password"), "{ecr}");
    }

    #[test]
    fn login_forms() {
        let ok = |y: &str| AgentConfig::from_yaml(y).unwrap().validate();
        ok("deploy:\n  login: {shell: \"aws ecr get-login-password | docker login --username AWS --password-stdin r.example\"}\n").unwrap();
        ok("deploy:\n  login: {registry: \"127.0.0.1:5000\", username: AWS, passwordFile: /etc/pw}\n").unwrap();
        for (y, why) in [
            (
                "deploy:\n  login: {registry: r, username: u}\n",
                "go together",
            ),
            ("deploy:\n  login: {}\n", "set shell, or"),
            ("deploy:\n  login: {shell: \" \"}\n", "empty"),
            (
                "deploy:\n  login: {shell: x, registry: r, username: u, passwordFile: /p}\n",
                "not both",
            ),
            (
                "deploy:\n  login: {registry: \"-x\", username: u, passwordFile: /p}\n",
                "host[:port]",
            ),
            (
                "deploy:\n  loginCommand: [x]\n  login: {shell: x}\n",
                "either",
            ),
        ] {
            let e = ok(y).unwrap_err().to_string();
            assert!(e.contains(why), "{y}: {e}");
        }
        assert!(AgentConfig::from_yaml("deploy:\n  login: {password: x}\n").is_err());
        let c = AgentConfig::from_yaml("deploy:\n  onDrainTimeout: abort\n").unwrap();
        assert_eq!(c.deploy.on_drain_timeout, DrainTimeoutAction::Abort);
        assert!(AgentConfig::from_yaml("deploy:\n  onDrainTimeout: wait\n").is_err());
    }

    #[test]
    fn targeted_workers_and_service_actions() {
        let c = AgentConfig::default();
        assert_eq!(c.targeted_workers.selector, vec!["gh.role=targeted-worker"]);
        assert_eq!(
            c.targeted_env_files(),
            vec![PathBuf::from("/opt/ghosthands/.env")]
        );
        let ok = |y: &str| AgentConfig::from_yaml(y).unwrap().validate();
        ok("targetedWorkers: {selector: [], envFiles: [/a, /b]}\nservices:\n  tw: {targetedWorkers: true}\n  w: {composeService: worker, healthUrl: \"http://127.0.0.1:3101/worker/status\"}\n").unwrap();
        for (y, why) in [
            (
                "targetedWorkers: {selector: [\"a b\"]}\n",
                "not a label filter",
            ),
            (
                "targetedWorkers: {ownKeys: [\"1X\"]}\n",
                "not a variable name",
            ),
            (
                "targetedWorkers: {statusUrl: \"nope {port}\"}\n",
                "statusUrl",
            ),
            ("services:\n  tw: {targetedWorkers: false}\n", "only true"),
            (
                "services:\n  w: {composeService: w, targetedWorkers: true}\n",
                "exactly one",
            ),
            (
                "services:\n  w: {composeService: w, healthUrl: x}\n",
                "healthUrl",
            ),
            ("docker: {observeInterval: 0s}\n", "observeInterval"),
        ] {
            let e = ok(y).unwrap_err().to_string();
            assert!(e.contains(why), "{y}: {e}");
        }
    }

    #[test]
    fn service_names() {
        assert!(is_valid_service_name("adspower"));
        assert!(is_valid_service_name("valet-worker.service"));
        assert!(!is_valid_service_name(""));
        assert!(!is_valid_service_name("a b"));
        assert!(!is_valid_service_name("../x"));
    }
}
