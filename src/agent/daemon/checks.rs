//! The seeds' `health-check.sh` checks, done locally instead of over SSH, and the snapshot that
//! the background refresher builds for `/health`: host metrics, worker status, browser engine,
//! env file hash and image tag, and the checks.
//!
//! | check            | pass                        | warn                                | fail                        |
//! |------------------|-----------------------------|-------------------------------------|-----------------------------|
//! | `display`        | probe passes                | not configured                      | probe fails                 |
//! | `vnc`            | probe passes                | not configured                      | probe fails                 |
//! | `novnc`          | probe passes (HTTP 200/301/302) | not configured                  | probe fails                 |
//! | `adspower`       | API answers                 | service runs, API does not          | service not running         |
//! | `chromium`       | binary found                | not found (it may run in the image) | --                          |
//! | `worker_service` | active, restarts < N        | active, restarts >= N; not configured | not active                |
//! | `compose`        | listed services running     | a service starting; not configured  | a service missing/not running/unhealthy |
//! | `worker_status`  | status endpoint answers     | --                                  | it does not                 |
//! | `worker_api`     | health URL answers 2xx      | --                                  | it does not                 |
//! | `disk`, `memory` | < warn%                     | warn% .. fail%                      | >= fail%                    |
//! | `uptime`         | always                      | --                                  | --                          |

use crate::agent::daemon::config::{AgentConfig, BrowserEngine, Probe, WorkerServiceCheck};
use crate::agent::daemon::exec::{self, Redactor};
use crate::agent::daemon::metrics::{HostSample, Sampler};
use crate::agent::daemon::worker::{self, WorkerStatus};
use crate::agent::envfile;
use crate::agent::protocol::Check;
use crate::redact::Secrets;
use jiff::Timestamp;
use serde_json::Value;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// What the refresher found, read by `/health` without waiting for anything.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The host's CPU, memory, disk and uptime.
    pub host: HostSample,
    /// The worker's status, or why it could not be read.
    pub worker: Result<WorkerStatus, String>,
    /// AdsPower's state (`running`, `not_responding`, `stopped`, `unknown`); `None` with chromium.
    pub adspower_status: Option<String>,
    /// Browser profiles AdsPower has open, when it said.
    pub active_profiles: Option<u32>,
    /// The browser's state in a word, as `/health` reports it.
    pub browser_status: String,
    /// The image tag named by the deploy env file.
    pub image_tag: Option<String>,
    /// The checks and their outcomes.
    pub checks: Vec<Check>,
    /// When this snapshot's collection started (what it says is at least this fresh).
    pub taken_at: Timestamp,
}

/// `docker [compose args] <sub...>`: the compose invocation every docker call of the agent uses.
pub fn compose_args(cfg: &AgentConfig, sub: &[&str]) -> Vec<OsString> {
    let mut a: Vec<OsString> = vec!["compose".into()];
    if let Some(p) = &cfg.docker.project_name {
        a.push("-p".into());
        a.push(p.into());
    }
    if let Some(d) = &cfg.docker.project_directory {
        a.push("--project-directory".into());
        a.push(d.into());
    }
    for f in &cfg.docker.compose_files {
        a.push("-f".into());
        a.push(f.into());
    }
    if cfg.docker.pass_env_file {
        a.push("--env-file".into());
        a.push(cfg.deploy_env_file().into());
    }
    a.extend(sub.iter().map(OsString::from));
    a
}

/// The sha256 of the env file, kept apart from the snapshot: it is updated under the env-file lock
/// by both the refresher and `PUT /env`, so a refresh that read the file before a write can never
/// overwrite the newer hash.
pub type EnvHash = Arc<std::sync::RwLock<Option<String>>>;

/// Builds snapshots. Owns the sysinfo sampler.
pub struct Collector {
    cfg: Arc<AgentConfig>,
    http: reqwest::Client,
    redactor: Redactor,
    sampler: Option<Sampler>,
    env_lock: Arc<tokio::sync::Mutex<()>>,
    env_hash: EnvHash,
}

impl Collector {
    /// A collector for `cfg`, sharing the env-file lock and hash with `PUT /env`.
    pub fn new(
        cfg: Arc<AgentConfig>,
        redactor: Redactor,
        env_lock: Arc<tokio::sync::Mutex<()>>,
        env_hash: EnvHash,
    ) -> Self {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .build()
            .unwrap_or_default();
        let sampler = Some(Sampler::new(&cfg.checks.disk_path));
        Self {
            cfg,
            http,
            redactor,
            sampler,
            env_lock,
            env_hash,
        }
    }

    fn timeout(&self) -> Duration {
        self.cfg.probe_timeout.0
    }

    /// Takes one snapshot: everything is probed concurrently, each probe bounded by
    /// `probeTimeout`.
    pub async fn collect(&mut self) -> Snapshot {
        let taken_at = Timestamp::now();
        let mut sampler = self
            .sampler
            .take()
            .unwrap_or_else(|| Sampler::new(&self.cfg.checks.disk_path));
        let host_task = tokio::task::spawn_blocking(move || {
            let s = sampler.sample();
            (sampler, s)
        });
        let cfg = self.cfg.clone();
        let t = self.timeout();
        let (worker, browser, display, vnc, novnc, compose_ps, worker_api, env) = tokio::join!(
            async {
                worker::fetch_status(&self.http, &cfg.worker.status_url, t)
                    .await
                    .map_err(|e| e.to_string())
            },
            self.browser(),
            self.probe_check("display", cfg.checks.display.as_ref()),
            self.probe_check("vnc", cfg.checks.vnc.as_ref()),
            self.probe_check("novnc", cfg.checks.novnc.as_ref()),
            self.compose_ps(),
            worker::check_health(&self.http, &cfg.worker.health_url, t),
            self.read_env_files(),
        );
        let worker_service = self
            .worker_service_check(cfg.checks.worker_service.as_ref(), compose_ps.as_ref())
            .await;
        let host = match host_task.await {
            Ok((sampler, s)) => {
                self.sampler = Some(sampler);
                s
            }
            Err(_) => HostSample::default(),
        };
        let image_tag = env;

        let mut checks = vec![display, vnc, novnc];
        checks.push(browser.check);
        checks.push(worker_service);
        checks.push(compose_check(
            &cfg.checks.compose_services,
            compose_ps.as_deref().map_err(String::as_str),
        ));
        checks.push(match &worker {
            Ok(w) => Check::pass(
                "worker_status",
                format!(
                    "{} active, deploy_safe {}",
                    w.active_workers
                        .map(|n| n.to_string())
                        .unwrap_or_else(|| "unknown".into()),
                    w.deploy_safe
                ),
            ),
            Err(e) => Check::fail("worker_status", format!("worker status endpoint: {e}")),
        });
        checks.push(match worker_api {
            Ok(()) => Check::pass("worker_api", "health URL answers"),
            Err(e) => Check::fail("worker_api", format!("health URL: {e}")),
        });
        checks.push(match &host.disk_mount {
            Some(m) => percent_check(
                "disk",
                host.disk_used_gb,
                host.disk_total_gb,
                "GB",
                &format!(" on {}", m.display()),
                cfg.checks.warn_percent,
                cfg.checks.fail_percent,
            ),
            None => Check::warn(
                "disk",
                format!("no disk found for {}", cfg.checks.disk_path.display()),
            ),
        });
        checks.push(percent_check(
            "memory",
            host.memory_used_mb,
            host.memory_total_mb,
            "MB",
            "",
            cfg.checks.warn_percent,
            cfg.checks.fail_percent,
        ));
        checks.push(Check::pass(
            "uptime",
            format!("up {}", human_uptime(host.uptime_secs)),
        ));
        // The last layer: whatever a probe or a command said, with the env files as just read.
        for c in &mut checks {
            self.redactor.redact_in_place(&mut c.message);
        }

        Snapshot {
            host,
            worker,
            adspower_status: browser.adspower_status,
            active_profiles: browser.active_profiles,
            browser_status: browser.status,
            image_tag,
            checks,
            taken_at,
        }
    }

    /// Reads both env files: the hash of the one `PUT /env` writes (stored under the env-file
    /// lock), the tag from the deploy one, and the values of both for the redactor.
    async fn read_env_files(&self) -> Option<String> {
        let main = {
            let _g = self.env_lock.lock().await;
            let main = tokio::fs::read(&self.cfg.env_file).await.ok();
            *self.env_hash.write().unwrap_or_else(|e| e.into_inner()) =
                main.as_deref().map(envfile::sha256_hex);
            main
        };
        let tag_key = self.cfg.deploy.image_tag_key.as_str();
        if let Some(bytes) = &main {
            self.redactor.set("env", env_secrets(bytes, &[tag_key]));
        }
        let deploy_path = self.cfg.deploy_env_file();
        let deploy = if deploy_path == self.cfg.env_file {
            main
        } else {
            tokio::fs::read(deploy_path).await.ok()
        };
        deploy.as_deref().and_then(|b| {
            self.redactor.set("deploy-env", env_secrets(b, &[tag_key]));
            envfile::parse_bytes(b)
                .ok()?
                .get(&self.cfg.deploy.image_tag_key)
                .map(str::to_string)
        })
    }

    async fn probe_check(&self, name: &str, probe: Option<&Probe>) -> Check {
        match probe {
            None => Check::warn(name, "not configured"),
            Some(p) => {
                match run_probe(&self.cfg, &self.http, p, self.timeout(), &self.redactor).await {
                    Ok(m) => Check::pass(name, m),
                    Err(m) => Check::fail(name, m),
                }
            }
        }
    }

    async fn browser(&self) -> BrowserInfo {
        match self.cfg.browser_engine {
            BrowserEngine::Adspower => self.adspower().await,
            BrowserEngine::Chromium => {
                let found = find_chromium(self.cfg.chromium.binary.as_deref());
                match found {
                    Some(p) => BrowserInfo {
                        status: "available".into(),
                        adspower_status: None,
                        active_profiles: None,
                        check: Check::pass("chromium", format!("found at {}", p.display())),
                    },
                    None => BrowserInfo {
                        status: "not_found".into(),
                        adspower_status: None,
                        active_profiles: None,
                        check: Check::warn(
                            "chromium",
                            "no chromium binary on the host (it may run inside the worker image)",
                        ),
                    },
                }
            }
        }
    }

    async fn adspower(&self) -> BrowserInfo {
        let key = self
            .cfg
            .adspower
            .api_key_file
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .map(|s| s.trim().to_string());
        if let Some(k) = &key {
            self.redactor.set_values("adspower-key", [k.clone()]);
        }
        let api = worker::fetch_adspower(
            &self.http,
            &self.cfg.adspower.api_url,
            key.as_deref(),
            self.timeout(),
        )
        .await;
        let service = match &self.cfg.adspower.service {
            Some(p) => Some(
                run_probe(&self.cfg, &self.http, p, self.timeout(), &self.redactor)
                    .await
                    .is_ok(),
            ),
            None => None,
        };
        let (api_ok, profiles, api_err) = match api {
            Ok(s) => (
                s.api_ok,
                s.active_profiles,
                (!s.api_ok).then(|| "API answered with an error code".to_string()),
            ),
            Err(e) => (false, None, Some(e)),
        };
        let (status, check) = adspower_check(api_ok, profiles, api_err.as_deref(), service);
        BrowserInfo {
            status: status.to_string(),
            adspower_status: Some(status.to_string()),
            active_profiles: profiles,
            check,
        }
    }

    async fn compose_ps(&self) -> Result<String, String> {
        if self.cfg.checks.compose_services.is_empty()
            && self
                .cfg
                .checks
                .worker_service
                .as_ref()
                .is_none_or(|w| w.compose_service.is_none())
        {
            return Err("not configured".into());
        }
        let args = compose_args(&self.cfg, &["ps", "--all", "--format", "json"]);
        match exec::run(&self.cfg.docker.binary, &args, self.timeout()).await {
            Ok(out) if out.success() => Ok(out.stdout),
            Ok(out) => Err(format!(
                "docker compose ps: {}",
                out.describe(&self.redactor)
            )),
            Err(e) => Err(self.redactor.redact(&e.to_string())),
        }
    }

    async fn worker_service_check(
        &self,
        cfg: Option<&WorkerServiceCheck>,
        compose_ps: Result<&String, &String>,
    ) -> Check {
        let warn_at = self.cfg.checks.worker_restart_warn;
        let Some(w) = cfg else {
            return Check::warn("worker_service", "not configured");
        };
        if let Some(unit) = &w.systemd_unit {
            let args: Vec<OsString> = vec![
                "show".into(),
                unit.into(),
                "--property=ActiveState,NRestarts".into(),
            ];
            return match exec::run(&self.cfg.systemctl, &args, self.timeout()).await {
                Ok(out) if out.success() => {
                    let (state, restarts) = parse_systemctl_show(&out.stdout);
                    service_check(unit, state == "active", &state, restarts, warn_at)
                }
                Ok(out) => Check::fail(
                    "worker_service",
                    format!("systemctl show {unit}: {}", out.describe(&self.redactor)),
                ),
                Err(e) => Check::fail("worker_service", e.to_string()),
            };
        }
        let Some(svc) = &w.compose_service else {
            return Check::warn("worker_service", "not configured");
        };
        let ps = match compose_ps {
            Ok(ps) => ps,
            Err(e) => return Check::fail("worker_service", e.clone()),
        };
        let Some(container) = parse_compose_ps(ps)
            .into_iter()
            .find(|c| &c.service == svc)
            .map(|c| c.name)
        else {
            return Check::fail("worker_service", format!("no container for service {svc}"));
        };
        let args: Vec<OsString> = vec![
            "inspect".into(),
            "--format".into(),
            "{{.State.Status}} {{.RestartCount}}".into(),
            container.clone().into(),
        ];
        match exec::run(&self.cfg.docker.binary, &args, self.timeout()).await {
            Ok(out) if out.success() => {
                let mut parts = out.stdout.split_whitespace();
                let state = parts.next().unwrap_or("unknown").to_string();
                let restarts = parts.next().and_then(|n| n.parse().ok());
                service_check(svc, state == "running", &state, restarts, warn_at)
            }
            Ok(out) => Check::fail(
                "worker_service",
                format!(
                    "docker inspect {container}: {}",
                    out.describe(&self.redactor)
                ),
            ),
            Err(e) => Check::fail("worker_service", e.to_string()),
        }
    }
}

struct BrowserInfo {
    status: String,
    adspower_status: Option<String>,
    active_profiles: Option<u32>,
    check: Check,
}

/// Runs one probe. `Ok(message)` means pass.
pub async fn run_probe(
    cfg: &AgentConfig,
    http: &reqwest::Client,
    p: &Probe,
    timeout: Duration,
    redactor: &Redactor,
) -> Result<String, String> {
    if let Some(addr) = &p.tcp {
        return match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr.as_str()))
            .await
        {
            Ok(Ok(_)) => Ok(format!("{addr} accepts connections")),
            Ok(Err(e)) => Err(format!("{addr}: {e}")),
            Err(_) => Err(format!("{addr}: connect timed out")),
        };
    }
    if let Some(url) = &p.http {
        return match http.get(url).timeout(timeout).send().await {
            Ok(r) if matches!(r.status().as_u16(), 200 | 301 | 302) => {
                Ok(format!("HTTP {}", r.status().as_u16()))
            }
            Ok(r) => Err(format!("HTTP {}", r.status().as_u16())),
            Err(e) => Err(worker::describe_reqwest(&e)),
        };
    }
    if let Some(argv) = &p.command {
        return match exec::run_argv(argv, timeout).await {
            Ok(out) if out.success() => Ok(format!("{} exits 0", argv[0])),
            Ok(out) => Err(format!("{}: {}", argv[0], out.describe(redactor))),
            Err(e) => Err(redactor.redact(&e.to_string())),
        };
    }
    if let Some(name) = &p.process {
        let name2 = name.clone();
        let n = tokio::task::spawn_blocking(move || count_processes(&name2))
            .await
            .unwrap_or(0);
        return if n > 0 {
            Ok(format!("{n} {name} process(es) running"))
        } else {
            Err(format!("no {name} process running"))
        };
    }
    if let Some(unit) = &p.systemd_unit {
        let args: Vec<OsString> = vec!["is-active".into(), unit.into()];
        return match exec::run(&cfg.systemctl, &args, timeout).await {
            Ok(out) => {
                let state = out.stdout.trim();
                if out.success() && state == "active" {
                    Ok(format!("{unit} is active"))
                } else if state.is_empty() {
                    Err(format!("{unit}: {}", out.describe(redactor)))
                } else {
                    Err(format!("{unit} is {state}"))
                }
            }
            Err(e) => Err(e.to_string()),
        };
    }
    if let Some(path) = &p.path {
        return if tokio::fs::metadata(path).await.is_ok() {
            Ok(format!("{} exists", path.display()))
        } else {
            Err(format!("{} does not exist", path.display()))
        };
    }
    Err("empty probe".into())
}

/// Processes whose `/proc/PID/comm` is `name`.
pub fn count_processes(name: &str) -> usize {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    dir.filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter(|e| {
            std::fs::read_to_string(e.path().join("comm"))
                .map(|c| c.trim_end() == name)
                .unwrap_or(false)
        })
        .count()
}

fn find_chromium(configured: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = configured {
        return p.is_file().then(|| p.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    for dir in std::env::split_paths(&path) {
        for name in ["chromium", "chromium-browser", "google-chrome", "chrome"] {
            let p = dir.join(name);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

/// Values of an env file's lines, even when the file is not valid (for the redactor).
pub fn loose_values(bytes: &[u8]) -> Vec<String> {
    env_secrets(bytes, &[]).values
}

/// What the redactor learns from an env file (valid or not): its keys and values, decoded and as
/// written (see [`Secrets::from_env_text`]), except the keys in `skip` (the image tag, which is
/// no secret).
pub fn env_secrets(bytes: &[u8], skip: &[&str]) -> Secrets {
    Secrets::from_env_text(&String::from_utf8_lossy(bytes), skip)
}

/// `used / total` against the thresholds.
pub fn percent_check(
    name: &str,
    used: f64,
    total: f64,
    unit: &str,
    suffix: &str,
    warn: f64,
    fail: f64,
) -> Check {
    if total <= 0.0 {
        return Check::warn(name, "total unknown");
    }
    let pct = used / total * 100.0;
    let msg = format!("{used:.1} of {total:.1} {unit} used ({pct:.0}%){suffix}");
    if pct >= fail {
        Check::fail(name, msg)
    } else if pct >= warn {
        Check::warn(name, msg)
    } else {
        Check::pass(name, msg)
    }
}

/// The `worker_service` rule: active with few restarts passes, many restarts warns, inactive fails.
pub fn service_check(
    what: &str,
    active: bool,
    state: &str,
    restarts: Option<u32>,
    warn_at: u32,
) -> Check {
    let r = restarts
        .map(|n| format!("{n} restarts"))
        .unwrap_or_else(|| "restarts unknown".into());
    if !active {
        Check::fail("worker_service", format!("{what} is {state} ({r})"))
    } else if restarts.is_some_and(|n| n >= warn_at) {
        Check::warn(
            "worker_service",
            format!("{what} is {state} but restarted often ({r})"),
        )
    } else {
        Check::pass("worker_service", format!("{what} is {state} ({r})"))
    }
}

/// `ActiveState=active\nNRestarts=2\n` → ("active", Some(2)).
pub fn parse_systemctl_show(out: &str) -> (String, Option<u32>) {
    let mut state = "unknown".to_string();
    let mut restarts = None;
    for line in out.lines() {
        if let Some(v) = line.strip_prefix("ActiveState=") {
            state = v.trim().to_string();
        } else if let Some(v) = line.strip_prefix("NRestarts=") {
            restarts = v.trim().parse().ok();
        }
    }
    (state, restarts)
}

/// The AdsPower rule. Returns `adspowerStatus` and the check.
pub fn adspower_check(
    api_ok: bool,
    profiles: Option<u32>,
    api_err: Option<&str>,
    service_running: Option<bool>,
) -> (&'static str, Check) {
    if api_ok {
        let p = profiles
            .map(|n| format!(", {n} browsers open"))
            .unwrap_or_default();
        return (
            "running",
            Check::pass("adspower", format!("API responds{p}")),
        );
    }
    let why = api_err.unwrap_or("no answer");
    match service_running {
        Some(true) => (
            "not_responding",
            Check::warn(
                "adspower",
                format!("service running, API not responding ({why})"),
            ),
        ),
        Some(false) => (
            "stopped",
            Check::fail("adspower", format!("service not running ({why})")),
        ),
        None => (
            "not_responding",
            Check::fail("adspower", format!("API not responding ({why})")),
        ),
    }
}

/// One container from `docker compose ps --format json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComposeContainer {
    /// The compose service.
    pub service: String,
    /// The container's name.
    pub name: String,
    /// Its state (`running`, `exited`, ...).
    pub state: String,
    /// Its health (`healthy`, `unhealthy`, `starting`, or empty without a health check).
    pub health: String,
}

/// Parses `docker compose ps --format json`: a JSON array (compose < 2.21) or one JSON object
/// per line (newer).
pub fn parse_compose_ps(out: &str) -> Vec<ComposeContainer> {
    let values: Vec<Value> = match serde_json::from_str::<Value>(out.trim()) {
        Ok(Value::Array(a)) => a,
        Ok(v @ Value::Object(_)) => vec![v],
        _ => out
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l.trim()).ok())
            .collect(),
    };
    let s = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    values
        .iter()
        .map(|v| ComposeContainer {
            service: s(v, "Service"),
            name: s(v, "Name"),
            state: s(v, "State").to_lowercase(),
            health: s(v, "Health").to_lowercase(),
        })
        .collect()
}

/// The `compose` rule: every expected service has a running container that is not unhealthy.
pub fn compose_check(expected: &[String], ps: Result<&str, &str>) -> Check {
    if expected.is_empty() {
        return Check::warn("compose", "not configured");
    }
    let ps = match ps {
        Ok(ps) => ps,
        Err(e) => return Check::fail("compose", e.to_string()),
    };
    let containers = parse_compose_ps(ps);
    let mut bad = Vec::new();
    let mut starting = Vec::new();
    for svc in expected {
        let mine: Vec<_> = containers.iter().filter(|c| &c.service == svc).collect();
        if mine.is_empty() {
            bad.push(format!("{svc} has no container"));
        } else if let Some(c) = mine.iter().find(|c| c.state != "running") {
            bad.push(format!("{svc} is {}", c.state));
        } else if mine.iter().any(|c| c.health == "unhealthy") {
            bad.push(format!("{svc} is unhealthy"));
        } else if mine.iter().any(|c| c.health == "starting") {
            starting.push(format!("{svc} is starting"));
        }
    }
    if !bad.is_empty() {
        Check::fail("compose", bad.join(", "))
    } else if !starting.is_empty() {
        Check::warn("compose", starting.join(", "))
    } else {
        Check::pass("compose", format!("{} running", expected.join(", ")))
    }
}

/// `93784` → `1d 2h 3m`.
pub fn human_uptime(secs: u64) -> String {
    let (d, h, m) = (secs / 86400, secs % 86400 / 3600, secs % 3600 / 60);
    if d > 0 {
        format!("{d}d {h}h {m}m")
    } else if h > 0 {
        format!("{h}h {m}m")
    } else {
        format!("{m}m {}s", secs % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::protocol::CheckStatus;

    #[test]
    fn percent_thresholds() {
        let st = |u| percent_check("disk", u, 100.0, "GB", "", 80.0, 90.0).status;
        assert_eq!(st(79.9), CheckStatus::Pass);
        assert_eq!(st(80.0), CheckStatus::Warn);
        assert_eq!(st(89.9), CheckStatus::Warn);
        assert_eq!(st(90.0), CheckStatus::Fail);
        assert_eq!(
            percent_check("m", 1.0, 0.0, "MB", "", 80.0, 90.0).status,
            CheckStatus::Warn
        );
    }

    #[test]
    fn worker_service_rule() {
        assert_eq!(
            service_check("w", true, "active", Some(4), 5).status,
            CheckStatus::Pass
        );
        assert_eq!(
            service_check("w", true, "active", Some(5), 5).status,
            CheckStatus::Warn
        );
        assert_eq!(
            service_check("w", false, "failed", Some(0), 5).status,
            CheckStatus::Fail
        );
        assert_eq!(
            parse_systemctl_show("ActiveState=active\nNRestarts=7\n"),
            ("active".to_string(), Some(7))
        );
    }

    #[test]
    fn adspower_rule() {
        assert_eq!(adspower_check(true, Some(2), None, None).0, "running");
        let (s, c) = adspower_check(false, None, Some("timed out"), Some(true));
        assert_eq!((s, c.status), ("not_responding", CheckStatus::Warn));
        let (s, c) = adspower_check(false, None, None, Some(false));
        assert_eq!((s, c.status), ("stopped", CheckStatus::Fail));
    }

    #[test]
    fn compose_rule() {
        let expected = vec!["api".to_string(), "worker".to_string()];
        let ndjson = "{\"Service\":\"api\",\"Name\":\"gh-api-1\",\"State\":\"running\",\"Health\":\"healthy\"}\n{\"Service\":\"worker\",\"Name\":\"gh-worker-1\",\"State\":\"running\",\"Health\":\"\"}\n";
        assert_eq!(
            compose_check(&expected, Ok(ndjson)).status,
            CheckStatus::Pass
        );
        let array = "[{\"Service\":\"api\",\"State\":\"running\"},{\"Service\":\"worker\",\"State\":\"exited\"}]";
        let c = compose_check(&expected, Ok(array));
        assert_eq!(c.status, CheckStatus::Fail);
        assert!(c.message.contains("worker is exited"), "{}", c.message);
        let starting = "{\"Service\":\"api\",\"State\":\"running\",\"Health\":\"starting\"}\n{\"Service\":\"worker\",\"State\":\"running\"}";
        assert_eq!(
            compose_check(&expected, Ok(starting)).status,
            CheckStatus::Warn
        );
        assert_eq!(compose_check(&expected, Ok("")).status, CheckStatus::Fail);
        assert_eq!(compose_check(&[], Ok("")).status, CheckStatus::Warn);
        assert_eq!(
            compose_check(&expected, Err("boom")).status,
            CheckStatus::Fail
        );
    }

    #[test]
    fn uptime_text() {
        assert_eq!(human_uptime(93784), "1d 2h 3m");
        assert_eq!(human_uptime(3720), "1h 2m");
        assert_eq!(human_uptime(61), "1m 1s");
    }

    #[test]
    fn loose_values_of_invalid_files() {
        assert_eq!(loose_values(b"A=1\nB=\"two\"\n"), vec!["1", "two"]);
        assert_eq!(
            loose_values(b"A=1\nbroken line\nB = 'x y'\n"),
            vec!["1", "x y"]
        );
    }
}
