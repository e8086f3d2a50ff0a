//! Fixtures for the controller tests: real `sandbox-agent` processes on loopback, each with the
//! fake `docker` CLI and a stand-in worker (status, drain, health) served from the test process.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use serde_json::json;

const AGENT_BIN: &str = env!("CARGO_BIN_EXE_sandbox-agent");
const FAKE_DOCKER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/tools/fake-docker");

#[derive(Clone)]
struct Worker {
    active: Arc<AtomicU32>,
    healthy: Arc<AtomicBool>,
    docker_dir: PathBuf,
}

/// One agent and its stand-in worker.
pub struct Agent {
    _tmp: tempfile::TempDir,
    /// The agent's directory (config, env files, fake docker's control files under `docker/`).
    pub dir: PathBuf,
    /// The agent's base URL.
    pub url: String,
    /// The bearer token.
    pub token: String,
    worker: Worker,
    child: Option<std::process::Child>,
    /// Extra arguments of the agent process.
    args: Vec<String>,
}

impl Agent {
    /// Starts an agent reporting `tag` as its running image, with `active` active workers.
    pub async fn start(tag: &str, active: u32) -> Agent {
        Self::start_with(tag, active, false).await
    }

    /// Starts an agent whose one env file (`gh.env`) is both the deploy env file and the file
    /// `PUT /env` writes (the configuration the agent allows and the seeds used), logging at
    /// debug level.
    pub async fn start_one_env_file(tag: &str) -> Agent {
        Self::start_with(tag, 0, true).await
    }

    async fn start_with(tag: &str, active: u32, one_env_file: bool) -> Agent {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let docker_dir = dir.join("docker");
        std::fs::create_dir_all(&docker_dir).unwrap();
        std::fs::write(docker_dir.join("running-tag"), format!("{tag}\n")).unwrap();
        let worker = Worker {
            active: Arc::new(AtomicU32::new(active)),
            healthy: Arc::new(AtomicBool::new(true)),
            docker_dir: docker_dir.clone(),
        };
        let router = axum::Router::new()
            .route(
                "/worker/status",
                get(|State(w): State<Worker>| async move {
                    let n = w.active.load(Ordering::SeqCst);
                    Json(json!({"activeWorkers": n, "deploy_safe": n == 0}))
                }),
            )
            .route(
                "/worker/drain",
                post(|| async { Json(json!({"draining": true})) }),
            )
            .route(
                "/health",
                get(|State(w): State<Worker>| async move {
                    let running = std::fs::read_to_string(w.docker_dir.join("running-tag"))
                        .unwrap_or_default();
                    let bad = std::fs::read_to_string(w.docker_dir.join("unhealthy-tags"))
                        .unwrap_or_default();
                    if !w.healthy.load(Ordering::SeqCst)
                        || bad
                            .lines()
                            .any(|l| !l.is_empty() && l.trim() == running.trim())
                    {
                        StatusCode::SERVICE_UNAVAILABLE
                    } else {
                        StatusCode::OK
                    }
                }),
            )
            .with_state(worker.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let w = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        // Padded: the agent refuses a token shorter than 16 characters, whatever the pid.
        let token = format!("agent-token-{:010}", std::process::id());
        std::fs::write(dir.join("token"), format!("{token}\n")).unwrap();
        std::fs::set_permissions(
            dir.join("token"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        std::fs::write(dir.join("gh.env"), format!("GH_IMAGE_TAG={tag}\n")).unwrap();
        std::fs::write(dir.join("valet.env"), "NODE_ENV=production\n").unwrap();
        std::fs::write(dir.join("docker-compose.yml"), "services: {}\n").unwrap();
        let d = dir.display();
        let env_file = if one_env_file { "gh.env" } else { "valet.env" };
        let yaml = format!(
            r#"listen: 127.0.0.1:0
tokenFile: {d}/token
stateFile: {d}/state/state.json
envFile: {d}/{env_file}
refreshInterval: 100ms
probeTimeout: 2s
docker:
  binary: {FAKE_DOCKER}
  composeFiles: [{d}/docker-compose.yml]
  projectDirectory: {d}
worker:
  statusUrl: http://{w}/worker/status
  drainUrl: http://{w}/worker/drain
  healthUrl: http://{w}/health
deploy:
  envFile: {d}/gh.env
  drainTimeout: 2s
  drainPollInterval: 50ms
  stopGrace: 1s
  healthCheckTries: 3
  healthCheckInterval: 100ms
  healthCheckTimeout: 2s
  commandTimeout: 60s
services:
  worker: {{composeService: worker}}
  adspower: {{command: [/bin/sh, -c, "date +%s%N >> {d}/adspower-restarts"]}}
{checks}"#,
            // The host's disk and memory are shared with whatever else runs here: thresholds no
            // test machine reaches keep a check's state (and so the Sandbox's status) from
            // flipping with other processes' builds.
            checks = if one_env_file {
                "checks:\n  composeServices: [api, worker]\n  warnPercent: 99.5\n  failPercent: 99.9\n"
            } else {
                "checks:\n  warnPercent: 99.5\n  failPercent: 99.9\n"
            },
        );
        std::fs::write(dir.join("agent.yaml"), yaml).unwrap();
        let mut a = Agent {
            _tmp: tmp,
            dir,
            url: String::new(),
            token,
            worker,
            child: None,
            args: if one_env_file {
                vec!["--log".into(), "debug".into()]
            } else {
                Vec::new()
            },
        };
        a.spawn();
        a
    }

    fn spawn(&mut self) {
        let addr_file = self.dir.join("addr");
        let _ = std::fs::remove_file(&addr_file);
        let mut cmd = Command::new(AGENT_BIN);
        cmd.arg("--config")
            .arg(self.dir.join("agent.yaml"))
            .arg("--addr-file")
            .arg(&addr_file)
            .args(&self.args)
            .env("FAKE_DOCKER_DIR", self.dir.join("docker"));
        let mut child =
            sandbox_operator::testenv::process::spawn_tied(cmd, &self.dir.join("agent.log"))
                .expect("starting sandbox-agent");
        let start = Instant::now();
        let addr = loop {
            if let Ok(s) = std::fs::read_to_string(&addr_file)
                && let Ok(a) = s.trim().parse::<SocketAddr>()
            {
                break a;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("sandbox-agent exited with {status}: {}", self.logs());
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "sandbox-agent did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        self.url = format!("http://{addr}");
        self.child = Some(child);
    }

    /// Stops the agent process (the "instance" keeps running; its agent is down).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sets the stand-in worker's active job count.
    pub fn set_active(&self, n: u32) {
        self.worker.active.store(n, Ordering::SeqCst);
    }

    /// Makes the worker's health URL fail for `tag` (a deploy of it then rolls back).
    pub fn fail_health_for(&self, tag: &str) {
        std::fs::write(
            self.dir.join("docker").join("unhealthy-tags"),
            format!("{tag}\n"),
        )
        .unwrap();
    }

    /// How many times the agent restarted its `adspower` service (a command that appends a line
    /// to a file, standing in for `systemctl restart adspower`).
    pub fn adspower_restarts(&self) -> usize {
        std::fs::read_to_string(self.dir.join("adspower-restarts"))
            .unwrap_or_default()
            .lines()
            .count()
    }

    /// The agent's own `/health`, asked directly.
    pub async fn health(&self) -> sandbox_operator::agent::protocol::HealthReport {
        use sandbox_operator::agent::client::{AgentClient, AgentToken};
        AgentClient::new(&self.url, Some(AgentToken::new(self.token.clone())))
            .unwrap()
            .health()
            .await
            .unwrap()
    }

    /// The fake docker's recorded calls.
    pub fn docker_calls(&self) -> String {
        std::fs::read_to_string(self.dir.join("docker").join("calls.log")).unwrap_or_default()
    }

    /// Creates (or, with `on` false, removes) a control file of the fake docker
    /// (tests/tools/fake-docker lists them).
    pub fn docker_control(&self, name: &str, on: bool) {
        let p = self.dir.join("docker").join(name);
        if on {
            std::fs::write(p, "").unwrap();
        } else {
            let _ = std::fs::remove_file(p);
        }
    }

    /// The agent's deploy state file.
    pub fn state_file(&self) -> String {
        std::fs::read_to_string(self.dir.join("state").join("state.json")).unwrap_or_default()
    }

    /// The agent's log.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
    }
}
