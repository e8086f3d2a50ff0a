//! The sandbox agent, run as users run it: the real `sandbox-agent` binary on a loopback port,
//! a fake `docker` CLI (`tests/tools/fake-docker`) and a stand-in worker (status, drain and health
//! endpoints served from this process), driven through the operator-side `AgentClient` and raw
//! HTTP.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use sandbox_operator::agent::client::{AgentClient, AgentError, AgentToken};
use sandbox_operator::agent::protocol::{
    CheckStatus, DeployState, DeployStep, DrainRequest, HealthReport, StepStatus,
};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const AGENT_BIN: &str = env!("CARGO_BIN_EXE_sandbox-agent");
const FAKE_DOCKER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/tools/fake-docker");
const DEADLINE: Duration = Duration::from_secs(30);

fn install_crypto() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

// ---------------------------------------------------------------------------------------------
// The stand-in worker: GET /worker/status, POST /worker/drain, GET /health (503 while the fake
// docker's running tag is listed in unhealthy-tags), GET /novnc (302), and AdsPower's local API.

#[derive(Clone)]
struct Worker {
    active: Arc<AtomicU32>,
    drains: Arc<AtomicU32>,
    /// After a drain, active jobs fall to zero after this long (None: they never finish).
    finish_after_drain: Arc<Mutex<Option<Duration>>>,
    docker_dir: PathBuf,
    healthy: Arc<AtomicBool>,
}

async fn worker_status(State(w): State<Worker>) -> Json<Value> {
    let n = w.active.load(Ordering::SeqCst);
    Json(json!({"activeWorkers": n, "deploy_safe": n == 0}))
}

async fn worker_drain(State(w): State<Worker>) -> Json<Value> {
    w.drains.fetch_add(1, Ordering::SeqCst);
    let after = *w.finish_after_drain.lock().unwrap();
    if let Some(d) = after {
        let active = w.active.clone();
        tokio::spawn(async move {
            tokio::time::sleep(d).await;
            active.store(0, Ordering::SeqCst);
        });
    }
    Json(json!({"draining": true}))
}

async fn worker_health(State(w): State<Worker>) -> StatusCode {
    let running = std::fs::read_to_string(w.docker_dir.join("running-tag")).unwrap_or_default();
    let bad = std::fs::read_to_string(w.docker_dir.join("unhealthy-tags")).unwrap_or_default();
    let running = running.trim();
    if !w.healthy.load(Ordering::SeqCst)
        || bad.lines().any(|l| !l.is_empty() && l.trim() == running)
    {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    }
}

async fn serve(router: axum::Router) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(l, router).await;
    });
    addr
}

async fn start_worker(docker_dir: &Path) -> (Worker, SocketAddr) {
    let w = Worker {
        active: Arc::new(AtomicU32::new(0)),
        drains: Arc::new(AtomicU32::new(0)),
        finish_after_drain: Arc::new(Mutex::new(Some(Duration::ZERO))),
        docker_dir: docker_dir.to_path_buf(),
        healthy: Arc::new(AtomicBool::new(true)),
    };
    let router = axum::Router::new()
        .route("/worker/status", get(worker_status))
        .route("/worker/drain", post(worker_drain))
        .route("/health", get(worker_health))
        .route(
            "/novnc",
            get(|| async { (StatusCode::FOUND, [("location", "/vnc.html")]) }),
        )
        .route(
            "/status",
            get(|| async { Json(json!({"code": 0, "msg": "success"})) }),
        )
        .route(
            "/api/v1/browser/local-active",
            get(|| async {
                Json(json!({"code": 0, "data": {"list": [{"user_id": "a"}, {"user_id": "b"}]}}))
            }),
        )
        .with_state(w.clone());
    let addr = serve(router).await;
    (w, addr)
}

// ---------------------------------------------------------------------------------------------
// The agent under test.

struct Fixture {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    docker_dir: PathBuf,
    worker: Worker,
    worker_addr: SocketAddr,
    token: String,
    config: PathBuf,
    agent: Option<AgentProc>,
}

struct AgentProc {
    child: Child,
    addr: SocketAddr,
    logs: Arc<Mutex<String>>,
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        // Let a held fake `docker pull` finish so nothing outlives the test.
        let _ = std::fs::remove_file(self.docker_dir.join("hold-pull"));
    }
}

#[derive(Default)]
struct Options {
    /// The env file `PUT /env` writes is the deploy env file.
    same_env_file: bool,
    require_auth_for_health: bool,
    /// `limits.requestTimeout` (default 30s).
    request_timeout: Option<&'static str>,
    /// Point the worker URLs at a port nothing listens on (no worker runs).
    no_worker: bool,
}

impl Fixture {
    async fn new() -> Self {
        Self::with(Options::default()).await
    }

    async fn with(opts: Options) -> Self {
        install_crypto();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let docker_dir = dir.join("docker");
        std::fs::create_dir_all(&docker_dir).unwrap();
        let (worker, worker_addr) = start_worker(&docker_dir).await;
        let token = format!("canary-token-{}", std::process::id()) + "-0123456789abcdef";
        std::fs::write(dir.join("token"), format!("{token}\n")).unwrap();
        std::fs::set_permissions(dir.join("token"), std::fs::Permissions::from_mode(0o600))
            .unwrap();
        std::fs::write(
            dir.join("gh.env"),
            "# compose env\nGH_IMAGE_TAG=v1\nGH_API_PORT=3100\n",
        )
        .unwrap();
        std::fs::write(dir.join("valet.env"), "NODE_ENV=production\n").unwrap();
        std::fs::write(dir.join("docker-compose.yml"), "services: {}\n").unwrap();
        let env_file = if opts.same_env_file {
            dir.join("gh.env")
        } else {
            dir.join("valet.env")
        };
        let d = dir.display();
        let w = if opts.no_worker {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        } else {
            worker_addr
        };
        let yaml = format!(
            r#"listen: 127.0.0.1:0
tokenFile: {d}/token
requireAuthForHealth: {auth}
stateFile: {d}/state/state.json
envFile: {env}
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
  healthCheckTries: 3
  healthCheckInterval: 100ms
  healthCheckTimeout: 2s
  commandTimeout: 60s
services:
  adspower: {{command: [touch, {d}/restarted-adspower]}}
  worker: {{composeService: worker}}
  broken: {{command: ["false"]}}
limits:
  requestTimeout: {request_timeout}
"#,
            auth = opts.require_auth_for_health,
            env = env_file.display(),
            request_timeout = opts.request_timeout.unwrap_or("30s"),
        );
        let config = dir.join("agent.yaml");
        std::fs::write(&config, yaml).unwrap();
        let mut f = Self {
            _tmp: tmp,
            dir,
            docker_dir,
            worker,
            worker_addr,
            token,
            config,
            agent: None,
        };
        f.start_agent();
        f
    }

    /// Starts (or restarts) the agent and waits for its address file.
    fn start_agent(&mut self) {
        self.agent = None;
        let addr_file = self.dir.join("addr");
        let _ = std::fs::remove_file(&addr_file);
        let mut child = Command::new(AGENT_BIN)
            .arg("--config")
            .arg(&self.config)
            .arg("--addr-file")
            .arg(&addr_file)
            .arg("--log")
            .arg("debug")
            .env("FAKE_DOCKER_DIR", &self.docker_dir)
            .env_remove("SANDBOX_AGENT_CONFIG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start sandbox-agent");
        let logs = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        let start = Instant::now();
        let addr = loop {
            if let Ok(s) = std::fs::read_to_string(&addr_file)
                && let Ok(a) = s.trim().parse::<SocketAddr>()
            {
                break a;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "sandbox-agent exited with {status}: {}",
                    logs.lock().unwrap()
                );
            }
            assert!(start.elapsed() < DEADLINE, "sandbox-agent did not start");
            std::thread::sleep(Duration::from_millis(20));
        };
        self.agent = Some(AgentProc { child, addr, logs });
    }

    fn kill_agent(&mut self) {
        self.agent = None;
    }

    fn base(&self) -> String {
        format!("http://{}", self.agent.as_ref().unwrap().addr)
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base())
    }

    fn client(&self) -> AgentClient {
        AgentClient::new(&self.base(), Some(AgentToken::new(&self.token))).unwrap()
    }

    fn anonymous(&self) -> AgentClient {
        AgentClient::new(&self.base(), None).unwrap()
    }

    fn logs(&self) -> String {
        self.agent.as_ref().unwrap().logs.lock().unwrap().clone()
    }

    /// The fake docker's calls: (subcommand, tag in the env file at the time).
    fn docker_calls(&self) -> Vec<(String, String)> {
        std::fs::read_to_string(self.docker_dir.join("calls.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let (head, _) = l.split_once(" | ")?;
                let (sub, tag) = head.split_once(" tag=")?;
                Some((sub.to_string(), tag.to_string()))
            })
            .filter(|(sub, _)| sub != "ps" && sub != "inspect")
            .collect()
    }

    fn docker_control(&self, name: &str, content: &str) {
        std::fs::write(self.docker_dir.join(name), content).unwrap();
    }

    fn gh_env_tag(&self) -> String {
        std::fs::read_to_string(self.dir.join("gh.env"))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("GH_IMAGE_TAG=").map(str::to_string))
            .unwrap_or_default()
    }

    async fn health(&self) -> HealthReport {
        self.client().health().await.expect("GET /health")
    }

    /// Polls /health until `f` holds.
    async fn wait_health(&self, what: &str, f: impl Fn(&HealthReport) -> bool) -> HealthReport {
        let start = Instant::now();
        loop {
            let h = self.health().await;
            if f(&h) {
                return h;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "timed out waiting for {what}; last /health: {h:#?}\nagent logs:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn wait_deploy_done(&self, id: &str) -> HealthReport {
        self.wait_health("the deploy to finish", |h| {
            h.deploy
                .as_ref()
                .is_some_and(|d| d.id == id && d.state.is_terminal())
        })
        .await
    }
}

fn http() -> reqwest::Client {
    install_crypto();
    reqwest::Client::builder().no_proxy().build().unwrap()
}

// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_successful_deploy_runs_the_steps_in_order() {
    let f = Fixture::new().await;
    let h = f.health().await;
    assert_eq!(h.image_tag.as_deref(), Some("v1"));
    assert!(h.is_agent());

    let accepted = f.client().deploy("v2").await.unwrap();
    assert!(accepted.success, "{accepted:?}");
    assert_eq!(accepted.message, "Deploy of v2 initiated");
    let id = accepted.deploy_id.unwrap();

    let h = f.wait_deploy_done(&id).await;
    let d = h.deploy.clone().unwrap();
    assert_eq!(d.state, DeployState::Succeeded, "{d:#?}");
    assert_eq!(d.tag, "v2");
    assert_eq!(d.previous_tag.as_deref(), Some("v1"));
    assert!(d.finished_at.is_some());
    assert_eq!(h.image_tag.as_deref(), Some("v2"));
    let steps: Vec<DeployStep> = d.steps.iter().map(|s| s.name).collect();
    assert_eq!(
        steps,
        [
            DeployStep::RecordPrevious,
            DeployStep::SetImageTag,
            DeployStep::Login,
            DeployStep::Pull,
            DeployStep::Drain,
            DeployStep::StopWorker,
            DeployStep::Up,
            DeployStep::HealthCheck
        ]
    );
    assert_eq!(d.steps[2].status, StepStatus::Skipped);
    assert!(
        d.steps
            .iter()
            .filter(|s| s.name != DeployStep::Login)
            .all(|s| s.status == StepStatus::Succeeded),
        "{d:#?}"
    );

    // gh-deploy.sh's order, each call seeing the new tag in the env file.
    let calls = f.docker_calls();
    assert_eq!(
        calls,
        [
            ("pull".to_string(), "v2".to_string()),
            ("stop".into(), "v2".into()),
            ("up".into(), "v2".into())
        ]
    );
    let log = std::fs::read_to_string(f.docker_dir.join("calls.log")).unwrap();
    assert!(log.contains("stop -t 35 worker"), "{log}");
    assert!(log.contains("up -d --remove-orphans"), "{log}");
    assert!(
        log.contains(&format!("--env-file {}/gh.env", f.dir.display())),
        "{log}"
    );
    assert_eq!(f.gh_env_tag(), "v2");
    // The rest of the env file is untouched.
    let env = std::fs::read_to_string(f.dir.join("gh.env")).unwrap();
    assert_eq!(env, "# compose env\nGH_IMAGE_TAG=v2\nGH_API_PORT=3100\n");
    assert_eq!(f.worker.drains.load(Ordering::SeqCst), 1);

    // The state file says the same (it is written right after memory is updated).
    let start = Instant::now();
    loop {
        let state: Value =
            serde_json::from_slice(&std::fs::read(f.dir.join("state/state.json")).unwrap())
                .unwrap();
        assert_eq!(state["deploy"]["id"], Value::String(id.clone()));
        if state["deploy"]["state"] == "succeeded" {
            break;
        }
        assert!(start.elapsed() < DEADLINE, "state file says {state:#}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The snapshot catches up with the file, too.
    f.wait_health("the refreshed tag", |h| {
        h.image_tag.as_deref() == Some("v2")
            && h.checked_at > h.deploy.as_ref().unwrap().finished_at
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_failed_health_check_rolls_back() {
    let f = Fixture::new().await;
    f.docker_control("unhealthy-tags", "bad\n");
    let id = f.client().deploy("bad").await.unwrap().deploy_id.unwrap();
    let h = f.wait_deploy_done(&id).await;
    let d = h.deploy.clone().unwrap();
    assert_eq!(d.state, DeployState::RolledBack, "{d:#?}");
    assert!(
        d.message.contains("failed at health_check"),
        "{}",
        d.message
    );
    assert!(d.message.contains("rolled back to v1"), "{}", d.message);
    assert_eq!(h.image_tag.as_deref(), Some("v1"));
    assert_eq!(f.gh_env_tag(), "v1");
    let hc = d
        .steps
        .iter()
        .find(|s| s.name == DeployStep::HealthCheck)
        .unwrap();
    assert_eq!(hc.status, StepStatus::Failed);
    assert!(hc.message.contains("3 tries"), "{}", hc.message);
    let tail: Vec<DeployStep> = d.steps.iter().rev().take(3).rev().map(|s| s.name).collect();
    assert_eq!(
        tail,
        [
            DeployStep::RollbackImageTag,
            DeployStep::RollbackUp,
            DeployStep::RollbackHealthCheck
        ]
    );
    // compose up ran again, with the old tag.
    assert_eq!(
        f.docker_calls(),
        [
            ("pull".to_string(), "bad".to_string()),
            ("stop".into(), "bad".into()),
            ("up".into(), "bad".into()),
            ("up".into(), "v1".into())
        ]
    );
    assert_eq!(
        std::fs::read_to_string(f.docker_dir.join("running-tag"))
            .unwrap()
            .trim(),
        "v1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_failed_pull_restores_the_tag_and_a_failed_rollback_is_failed() {
    let f = Fixture::new().await;
    f.docker_control("fail-pull", "");
    let id = f.client().deploy("v2").await.unwrap().deploy_id.unwrap();
    let d = f.wait_deploy_done(&id).await.deploy.unwrap();
    assert_eq!(d.state, DeployState::RolledBack, "{d:#?}");
    assert!(d.message.contains("failed at pull"), "{}", d.message);
    assert_eq!(f.gh_env_tag(), "v1");
    // The containers were never touched.
    assert_eq!(f.docker_calls(), [("pull".to_string(), "v2".to_string())]);
    std::fs::remove_file(f.docker_dir.join("fail-pull")).unwrap();

    // A worker that stays unhealthy: the rollback's health check fails too.
    f.worker.healthy.store(false, Ordering::SeqCst);
    let id = f.client().deploy("v3").await.unwrap().deploy_id.unwrap();
    let d = f.wait_deploy_done(&id).await.deploy.unwrap();
    assert_eq!(d.state, DeployState::Failed, "{d:#?}");
    assert!(
        d.message
            .contains("rollback failed at rollback_health_check"),
        "{}",
        d.message
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_second_deploy_while_one_runs_is_409_and_health_stays_fast() {
    let f = Fixture::new().await;
    f.docker_control("hold-pull", "");
    let first = f.client().deploy("v2").await.unwrap().deploy_id.unwrap();
    f.wait_health("the pull step", |h| {
        h.deploy
            .as_ref()
            .is_some_and(|d| d.step == DeployStep::Pull && d.state == DeployState::Running)
    })
    .await;

    // Raw: 409 with the running deploy's id.
    let r = http()
        .post(f.url("/deploy"))
        .bearer_auth(&f.token)
        .json(&json!({"image_tag": "v3"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["success"], false);
    assert_eq!(body["deployId"], Value::String(first.clone()));

    // Typed.
    let e = f.client().deploy("v3").await.unwrap_err();
    assert!(matches!(e, AgentError::Conflict { .. }), "{e:?}");
    assert_eq!(e.running_deploy_id(), Some(first.as_str()));

    // /health answers while the deploy is stuck in a docker call, and says so.
    for _ in 0..20 {
        let h = f.health().await;
        let d = h.deploy.unwrap();
        assert_eq!((d.state, d.step), (DeployState::Running, DeployStep::Pull));
        // During the deploy, the tag reported is the one still running.
        assert_eq!(h.image_tag.as_deref(), Some("v1"));
    }

    std::fs::remove_file(f.docker_dir.join("hold-pull")).unwrap();
    let d = f.wait_deploy_done(&first).await.deploy.unwrap();
    assert_eq!(d.state, DeployState::Succeeded);
    // Now a new one is accepted.
    let next = f.client().deploy("v3").await.unwrap().deploy_id.unwrap();
    assert_ne!(next, first);
    f.wait_deploy_done(&next).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_deploy_validates_the_tag() {
    let f = Fixture::new().await;
    for body in [
        json!({"image_tag": ""}),
        json!({"image_tag": "-x"}),
        json!({"image_tag": "a b"}),
        json!({"image_tag": "x".repeat(129)}),
        json!({"image_tag": 5}),
        json!({"tag": "v2"}),
    ] {
        let r = http()
            .post(f.url("/deploy"))
            .bearer_auth(&f.token)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{body}");
    }
    let r = http()
        .post(f.url("/deploy"))
        .bearer_auth(&f.token)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let e = f.client().deploy("bad tag").await.unwrap_err();
    assert!(
        matches!(e, AgentError::Rejected { status: 400, .. }),
        "{e:?}"
    );
    assert!(f.docker_calls().is_empty());
    assert!(f.health().await.deploy.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_drain_waits_for_active_workers() {
    let f = Fixture::new().await;
    f.worker.active.store(2, Ordering::SeqCst);
    *f.worker.finish_after_drain.lock().unwrap() = Some(Duration::from_millis(300));
    let h = f
        .wait_health("the worker's 2 active jobs", |h| {
            h.active_workers == Some(2)
        })
        .await;
    assert_eq!(h.deploy_safe, Some(false));

    let r = f.client().drain().await.unwrap();
    assert!(r.deploy_safe, "{r:?}");
    assert_eq!(r.active_workers, Some(0));
    assert_eq!(f.worker.drains.load(Ordering::SeqCst), 1);

    // A worker that never finishes: the wait is bounded, and the answer says so.
    f.worker.active.store(1, Ordering::SeqCst);
    *f.worker.finish_after_drain.lock().unwrap() = None;
    let r = f
        .client()
        .drain_with(&DrainRequest {
            wait: Some(true),
            timeout_seconds: Some(1),
        })
        .await
        .unwrap();
    assert!(!r.deploy_safe);
    assert_eq!(r.active_workers, Some(1));

    // Raw JSON field names.
    let v: Value = http()
        .post(f.url("/drain"))
        .bearer_auth(&f.token)
        .json(&json!({"wait": false}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v, json!({"deploy_safe": false, "activeWorkers": 1}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_drain_is_reported_in_health_until_a_deploy_replaces_the_worker() {
    let f = Fixture::new().await;
    assert_eq!(f.health().await.draining_since, None);
    let no_wait = DrainRequest {
        wait: Some(false),
        timeout_seconds: None,
    };
    f.client().drain_with(&no_wait).await.unwrap();
    assert_eq!(f.worker.drains.load(Ordering::SeqCst), 1);
    let first = f.health().await.draining_since;
    assert!(first.is_some());
    // Asked again: the worker is asked again, the time it started draining stays.
    f.client().drain_with(&no_wait).await.unwrap();
    assert_eq!(f.worker.drains.load(Ordering::SeqCst), 2);
    assert_eq!(f.health().await.draining_since, first);
    let v: Value = http()
        .get(f.url("/health"))
        .bearer_auth(&f.token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(v["drainingSince"].is_string(), "{v}");
    // A deploy replaces the worker: the new one takes work again.
    let id = f.client().deploy("v2").await.unwrap().deploy_id.unwrap();
    let h = f.wait_deploy_done(&id).await;
    assert_eq!(h.draining_since, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_env_write_is_atomic_and_mode_0600() {
    let f = Fixture::new().await;
    let path = f.dir.join("valet.env");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let initial = std::fs::read_to_string(&path).unwrap();
    let big = |c: char| -> String {
        (0..2000)
            .map(|i| format!("KEY_{i}={}\n", c.to_string().repeat(100)))
            .collect()
    };
    let (a, b) = (big('a'), big('b'));
    assert!(a.len() > 200_000 && a.len() < 1024 * 1024);

    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (stop, path) = (stop.clone(), path.clone());
        let valid = [initial.clone(), a.clone(), b.clone()];
        std::thread::spawn(move || {
            let mut reads = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let mut s = String::new();
                std::fs::File::open(&path)
                    .unwrap()
                    .read_to_string(&mut s)
                    .unwrap();
                assert!(
                    valid.contains(&s),
                    "a reader saw a partial file ({} bytes)",
                    s.len()
                );
                reads += 1;
            }
            reads
        })
    };
    let client = f.client();
    for i in 0..20 {
        let content = if i % 2 == 0 { &a } else { &b };
        let r = client.put_env(content, &[]).await.unwrap();
        assert_eq!(
            r.sha256,
            sandbox_operator::agent::envfile::sha256_hex(content.as_bytes())
        );
    }
    stop.store(true, Ordering::SeqCst);
    let reads = reader.join().expect("reader saw only whole files");
    assert!(reads > 0);
    assert_eq!(std::fs::read_to_string(&path).unwrap(), b);
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    // No temporary files left next to it.
    let leftovers: Vec<_> = std::fs::read_dir(&f.dir)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // /health reports the hash of what is on disk.
    let h = f.health().await;
    assert_eq!(
        h.env_sha256.as_deref(),
        Some(sandbox_operator::agent::envfile::sha256_hex(b.as_bytes()).as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_env_restarts_named_services_and_refuses_bad_ones() {
    let f = Fixture::new().await;
    let r = f
        .client()
        .put_env("A=1\n", &["worker".to_string(), "adspower".to_string()])
        .await
        .unwrap();
    assert_eq!(r.restarted.len(), 2);
    assert!(r.restarted.iter().all(|r| r.success), "{r:?}");
    assert!(f.dir.join("restarted-adspower").exists());
    let log = std::fs::read_to_string(f.docker_dir.join("calls.log")).unwrap();
    // Recreated, not restarted: `docker compose restart` keeps the old environment (Docker
    // documents that it does not re-read env files).
    assert!(
        log.lines()
            .any(|l| l.ends_with("up -d --force-recreate --no-deps -t 35 worker")),
        "{log}"
    );
    assert!(!log.lines().any(|l| l.ends_with("restart worker")), "{log}");

    // A service outside the allow-list: 403, and nothing written.
    let before = std::fs::read(f.dir.join("valet.env")).unwrap();
    let e = f
        .client()
        .put_env("A=2\n", &["sshd".to_string()])
        .await
        .unwrap_err();
    assert!(matches!(e, AgentError::Forbidden { .. }), "{e:?}");
    assert_eq!(std::fs::read(f.dir.join("valet.env")).unwrap(), before);

    // A restart that fails: the file is written, the answer says which restart failed.
    let e = f
        .client()
        .put_env("A=3\n", &["broken".to_string()])
        .await
        .unwrap_err();
    assert!(
        matches!(&e, AgentError::Server { status: 502, message, .. } if message.contains("restarting broken")),
        "{e:?}"
    );
    assert_eq!(
        std::fs::read_to_string(f.dir.join("valet.env")).unwrap(),
        "A=3\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_invalid_env_is_400_naming_the_line_not_the_value() {
    let f = Fixture::new().await;
    let before = std::fs::read(f.dir.join("valet.env")).unwrap();
    let secret = "sk-live-canary-4242424242";
    for (content, line) in [
        (format!("A=1\n# ok\n{secret}\n"), 3),
        (format!("A=1\nB C={secret}\n"), 2),
        (format!("A=\"{secret}\n"), 1),
        (format!("A=1\nA={secret}\n"), 2),
    ] {
        let r = http()
            .put(f.url("/env"))
            .bearer_auth(&f.token)
            .json(&json!({"content": content}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
        let text = r.text().await.unwrap();
        assert!(text.contains(&format!("line {line}")), "{text}");
        assert!(!text.contains(secret), "{text}");
    }
    assert_eq!(std::fs::read(f.dir.join("valet.env")).unwrap(), before);
    assert!(!f.logs().contains(secret));
    let e = f.client().put_env("x", &[]).await.unwrap_err();
    assert!(
        matches!(e, AgentError::Rejected { status: 400, .. }),
        "{e:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_restart_only_allow_listed_services() {
    let f = Fixture::new().await;
    let r = f.client().restart("adspower").await.unwrap();
    assert!(r.success);
    assert!(f.dir.join("restarted-adspower").exists());
    let e = f.client().restart("sshd").await.unwrap_err();
    assert!(matches!(e, AgentError::Forbidden { .. }), "{e:?}");
    let e = f.client().restart("../etc").await.unwrap_err();
    assert!(
        matches!(e, AgentError::Rejected { status: 400, .. }),
        "{e:?}"
    );
    let e = f.client().restart("broken").await.unwrap_err();
    assert!(matches!(e, AgentError::Server { status: 502, .. }), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_unauthorized_calls_are_401() {
    let f = Fixture::new().await;
    let calls: [(reqwest::Method, &str, Value); 4] = [
        (reqwest::Method::POST, "/deploy", json!({"image_tag": "v2"})),
        (reqwest::Method::POST, "/drain", json!({})),
        (
            reqwest::Method::POST,
            "/restart",
            json!({"service": "adspower"}),
        ),
        (reqwest::Method::PUT, "/env", json!({"content": "A=1\n"})),
    ];
    for (m, path, body) in &calls {
        for auth in [
            None,
            Some("Bearer wrong-token-0123456789abcdef".to_string()),
            Some(format!("Bearer {}x", f.token)),
            Some(format!("Basic {}", f.token)),
            Some(f.token.clone()),
        ] {
            let mut rb = http().request(m.clone(), f.url(path)).json(body);
            if let Some(a) = &auth {
                rb = rb.header("authorization", a);
            }
            let r = rb.send().await.unwrap();
            assert_eq!(r.status(), 401, "{m} {path} with {auth:?}");
            assert_eq!(r.headers()["www-authenticate"], "Bearer");
        }
    }
    // Typed errors, and nothing happened.
    let anon = f.anonymous();
    assert!(matches!(
        anon.deploy("v2").await,
        Err(AgentError::Unauthorized { .. })
    ));
    assert!(matches!(
        anon.drain().await,
        Err(AgentError::Unauthorized { .. })
    ));
    assert!(matches!(
        anon.restart("adspower").await,
        Err(AgentError::Unauthorized { .. })
    ));
    assert!(matches!(
        anon.put_env("A=1\n", &[]).await,
        Err(AgentError::Unauthorized { .. })
    ));
    assert!(f.docker_calls().is_empty());
    assert_eq!(f.worker.drains.load(Ordering::SeqCst), 0);
    assert!(!f.dir.join("restarted-adspower").exists());
    assert_eq!(
        std::fs::read_to_string(f.dir.join("valet.env")).unwrap(),
        "NODE_ENV=production\n"
    );
    // /health and /healthz are open by default.
    assert!(anon.health().await.is_ok());
    let r = http().get(f.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // Unknown paths need the token too (no probing).
    let r = http().get(f.url("/nope")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = http()
        .get(f.url("/nope"))
        .bearer_auth(&f.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_health_can_require_the_token() {
    let f = Fixture::with(Options {
        require_auth_for_health: true,
        ..Default::default()
    })
    .await;
    let e = f.anonymous().health().await.unwrap_err();
    assert!(matches!(e, AgentError::Unauthorized { .. }), "{e:?}");
    assert!(f.client().health().await.is_ok());
    let r = http().get(f.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

/// Sends a request head with a large Content-Length and no body; the answer must come without
/// the body being read.
fn raw_status(addr: SocketAddr, head: &str) -> u16 {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    let mut buf = [0u8; 1024];
    let n = s.read(&mut buf).unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    text.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_oversized_bodies_are_413() {
    let f = Fixture::new().await;
    let addr = f.agent.as_ref().unwrap().addr;
    let token = f.token.clone();
    let head = |method: &str, path: &str, len: usize| {
        format!(
            "{method} {path} HTTP/1.1\r\nhost: agent\r\nauthorization: Bearer {token}\r\ncontent-type: application/json\r\ncontent-length: {len}\r\n\r\n"
        )
    };
    let (h1, h2, h3) = (
        head("PUT", "/env", 2 * 1024 * 1024),
        head("POST", "/deploy", 100_000),
        head("POST", "/restart", 100_000),
    );
    let statuses = tokio::task::spawn_blocking(move || [h1, h2, h3].map(|h| raw_status(addr, &h)))
        .await
        .unwrap();
    assert_eq!(statuses, [413, 413, 413]);

    // A body that really is sent, chunked (no Content-Length), and is too large.
    let body = format!("{{\"image_tag\": \"{}\"}}", "a".repeat(16 * 1024));
    let chunked = format!(
        "POST /deploy HTTP/1.1\r\nhost: agent\r\nauthorization: Bearer {}\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
        f.token,
        body.len()
    );
    let s = tokio::task::spawn_blocking(move || raw_status(addr, &chunked))
        .await
        .unwrap();
    assert_eq!(s, 413);

    // Just under the /env limit is fine.
    let content: String = (0..9000)
        .map(|i| format!("K{i}={}\n", "v".repeat(100)))
        .collect();
    assert!(content.len() < 1024 * 1024 - 100);
    f.client().put_env(&content, &[]).await.unwrap();
    // Without a token, the size does not matter: 401 first.
    let h =
        head("PUT", "/env", 2 * 1024 * 1024).replace(&format!("Bearer {}", f.token), "Bearer x");
    let s = tokio::task::spawn_blocking(move || raw_status(addr, &h))
        .await
        .unwrap();
    assert_eq!(s, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_restarted_mid_deploy_reports_a_truthful_state() {
    let mut f = Fixture::new().await;
    f.docker_control("hold-pull", "");
    let id = f.client().deploy("v2").await.unwrap().deploy_id.unwrap();
    f.wait_health("the pull step", |h| {
        h.deploy
            .as_ref()
            .is_some_and(|d| d.step == DeployStep::Pull)
    })
    .await;
    // SIGKILL: no chance to write anything on the way out.
    f.kill_agent();
    std::fs::remove_file(f.docker_dir.join("hold-pull")).unwrap();
    f.start_agent();
    let h = f.health().await;
    let d = h.deploy.unwrap();
    assert_eq!(d.id, id);
    assert_eq!(d.state, DeployState::Failed, "{d:#?}");
    assert!(
        d.message
            .contains("agent restarted during deploy at step pull"),
        "{}",
        d.message
    );
    assert!(d.finished_at.is_some());
    assert_eq!(d.steps.last().unwrap().status, StepStatus::Failed);
    // And a new deploy can start.
    let next = f.client().deploy("v3").await.unwrap().deploy_id.unwrap();
    let d = f.wait_deploy_done(&next).await.deploy.unwrap();
    assert_eq!(d.state, DeployState::Succeeded);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_health_reports_metrics_and_checks() {
    install_crypto();
    // Loopback stand-ins for the VNC server (TCP) and the rest.
    let vnc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let vnc_addr = vnc.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let _ = vnc.accept().await;
        }
    });
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    // The worker stand-in also serves noVNC and AdsPower; its address is only known once the
    // fixture runs, so the config is extended and the agent restarted.
    let mut f = Fixture::new().await;
    let w = f.worker_addr;
    let extra = format!(
        r#"browserEngine: adspower
adspower:
  apiUrl: http://{w}
checks:
  display: {{command: ["true"]}}
  vnc: {{tcp: "{vnc_addr}"}}
  novnc: {{http: "http://{w}/novnc"}}
  workerService: {{composeService: worker}}
  composeServices: [api, worker]
"#
    );
    let mut yaml = std::fs::read_to_string(&f.config).unwrap();
    yaml.push_str(&extra);
    std::fs::write(&f.config, yaml).unwrap();
    f.docker_control("inspect.txt", "running 6\n");
    f.worker.active.store(3, Ordering::SeqCst);
    f.start_agent();

    let h = f
        .wait_health("the configured checks", |h| h.active_workers == Some(3))
        .await;
    let status = |name: &str| {
        h.check(name)
            .unwrap_or_else(|| panic!("no {name} check in {h:#?}"))
            .status
    };
    assert_eq!(status("display"), CheckStatus::Pass);
    assert_eq!(status("vnc"), CheckStatus::Pass);
    assert_eq!(status("novnc"), CheckStatus::Pass, "{h:#?}");
    assert_eq!(status("adspower"), CheckStatus::Pass);
    assert_eq!(status("compose"), CheckStatus::Pass, "{h:#?}");
    // 6 restarts >= 5: warn, as health-check.sh did.
    assert_eq!(status("worker_service"), CheckStatus::Warn, "{h:#?}");
    assert_eq!(status("worker_status"), CheckStatus::Pass);
    assert_eq!(status("worker_api"), CheckStatus::Pass);
    assert_eq!(status("uptime"), CheckStatus::Pass);
    assert!(h.check("memory").is_some() && h.check("disk").is_some());
    assert_eq!(h.adspower_status.as_deref(), Some("running"));
    assert_eq!(h.active_profiles, Some(2));
    assert_eq!(h.browser_engine.as_deref(), Some("adspower"));
    assert_eq!(h.deploy_safe, Some(false));
    assert!(h.memory_total_mb > 0.0 && h.memory_used_mb > 0.0);
    assert!(h.uptime > 0.0);
    assert!(h.agent_version.is_some());
    assert_eq!(
        h.env_sha256.as_deref(),
        Some(sandbox_operator::agent::envfile::sha256_hex(b"NODE_ENV=production\n").as_str())
    );
    assert_eq!(h.image_tag.as_deref(), Some("v1"));

    // Things stop: VNC and the compose worker fail, /health says degraded.
    let mut yaml = std::fs::read_to_string(&f.config).unwrap();
    yaml = yaml.replace(&vnc_addr.to_string(), &dead.to_string());
    std::fs::write(&f.config, yaml).unwrap();
    f.docker_control(
        "ps.json",
        "[{\"Service\":\"api\",\"Name\":\"a\",\"State\":\"running\"},{\"Service\":\"worker\",\"Name\":\"w\",\"State\":\"exited\"}]",
    );
    f.start_agent();
    let h = f
        .wait_health("the failing compose check", |h| {
            h.check("compose")
                .is_some_and(|c| c.status == CheckStatus::Fail)
        })
        .await;
    assert_eq!(h.check("vnc").unwrap().status, CheckStatus::Fail);
    assert_eq!(h.status, "degraded");
    assert!(!h.is_healthy());
    let failing: Vec<&str> = h.failing_checks().iter().map(|c| c.name.as_str()).collect();
    assert!(
        failing.contains(&"vnc") && failing.contains(&"compose"),
        "{failing:?}"
    );

    // Raw JSON keeps the seeds' field names.
    let v: Value = http()
        .get(f.url("/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for k in [
        "status",
        "cpu",
        "memoryTotalMb",
        "memoryUsedMb",
        "diskTotalGb",
        "diskUsedGb",
        "adspowerStatus",
        "activeProfiles",
        "activeWorkers",
        "uptime",
        "imageTag",
        "envSha256",
        "agentVersion",
        "deploySafe",
        "checks",
    ] {
        assert!(v.get(k).is_some(), "/health lacks {k}: {v:#}");
    }
    for c in v["checks"].as_array().unwrap() {
        assert!(c["name"].is_string() && c["message"].is_string());
        assert!(["pass", "warn", "fail"].contains(&c["status"].as_str().unwrap()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_unconfigured_checks_warn() {
    let f = Fixture::new().await;
    let h = f.health().await;
    for name in ["display", "vnc", "novnc", "worker_service", "compose"] {
        let c = h.check(name).unwrap();
        assert_eq!(
            (c.status, c.message.as_str()),
            (CheckStatus::Warn, "not configured"),
            "{name}"
        );
    }
    // Chromium is the default engine: no AdsPower status, a chromium check instead.
    assert!(h.adspower_status.is_none());
    assert!(h.check("adspower").is_none());
    assert!(h.check("chromium").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_client_reads_the_old_health_server() {
    install_crypto();
    // The seeds' health-server.js: its JSON, verbatim, and its /deploy answer.
    let old = axum::Router::new()
        .route(
            "/health",
            get(|| async {
                Json(json!({
                    "status": "ok",
                    "cpu": 15.2,
                    "memoryTotalMb": 8192,
                    "memoryUsedMb": 3456,
                    "diskTotalGb": 40,
                    "diskUsedGb": 12,
                    "adspowerStatus": "running",
                    "activeProfiles": 2,
                    "activeWorkers": 3,
                    "uptime": 86400
                }))
            }),
        )
        .route(
            "/deploy",
            post(|Json(b): Json<Value>| async move {
                Json(json!({
                    "success": true,
                    "message": format!("Deploy of {} initiated", b["image_tag"].as_str().unwrap_or(""))
                }))
            }),
        );
    let addr = serve(old).await;
    let c = AgentClient::new(&format!("http://{addr}"), Some(AgentToken::new("t"))).unwrap();
    let h = c.health().await.unwrap();
    assert_eq!(h.status, "ok");
    assert_eq!(h.cpu, 15.2);
    assert_eq!((h.memory_total_mb, h.memory_used_mb), (8192.0, 3456.0));
    assert_eq!((h.disk_total_gb, h.disk_used_gb), (40.0, 12.0));
    assert_eq!(h.adspower_status.as_deref(), Some("running"));
    assert_eq!(h.active_profiles, Some(2));
    assert_eq!(h.active_workers, Some(3));
    assert_eq!(h.uptime, 86400.0);
    assert!(h.is_healthy());
    assert!(!h.degraded());
    assert!(h.failing_checks().is_empty());
    assert!(!h.is_agent());
    assert!(h.deploy.is_none() && h.image_tag.is_none() && h.env_sha256.is_none());
    let a = c.deploy("v1.2.3").await.unwrap();
    assert!(a.success);
    assert_eq!(a.message, "Deploy of v1.2.3 initiated");
    assert_eq!(a.deploy_id, None);
    let e = c.drain().await.unwrap_err();
    assert!(matches!(e, AgentError::NotSupported { .. }), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_never_logs_the_token_or_env_values() {
    let f = Fixture::with(Options {
        same_env_file: true,
        ..Default::default()
    })
    .await;
    let canary = "canary-env-value-7f3a9c1e5b";
    // Every failing docker call prints the env file to stderr.
    f.docker_control("leak-env", "");
    let content =
        format!("GH_IMAGE_TAG=v1\nDATABASE_URL=postgresql://u:{canary}@db/x\nCANARY={canary}\n");
    f.client()
        .put_env(&content, &["worker".to_string()])
        .await
        .unwrap();
    // A failing deploy whose docker output includes the env file.
    f.docker_control("fail-pull", "");
    let id = f.client().deploy("v2").await.unwrap().deploy_id.unwrap();
    let h = f.wait_deploy_done(&id).await;
    let d = h.deploy.unwrap();
    assert_eq!(d.state, DeployState::RolledBack);
    let pull = d.steps.iter().find(|s| s.name == DeployStep::Pull).unwrap();
    assert!(
        pull.message.contains("fake docker: pull failed"),
        "{}",
        pull.message
    );
    assert!(pull.message.contains("***"), "{}", pull.message);
    assert!(!pull.message.contains(canary), "{}", pull.message);
    // A failing restart, a wrong token, an invalid env file holding the canary.
    let _ = f.client().restart("broken").await;
    let wrong = AgentClient::new(
        &f.base(),
        Some(AgentToken::new(format!("{}-wrong", f.token))),
    )
    .unwrap();
    let _ = wrong.deploy("v3").await;
    let _ = f.client().put_env(&format!("BROKEN {canary}\n"), &[]).await;
    let _ = f.client().drain().await;
    // Give the refresher a few rounds.
    let first = f.health().await.checked_at;
    f.wait_health("a few refreshes", |h| h.checked_at > first)
        .await;

    let logs = f.logs();
    assert!(logs.contains("deploy step finished"), "{logs}");
    assert!(logs.contains("env file written"), "{logs}");
    assert!(
        !logs.contains(canary),
        "an env value leaked into the logs:\n{logs}"
    );
    assert!(
        !logs.contains(&f.token),
        "the token leaked into the logs:\n{logs}"
    );
    // Not into the state file either.
    let state = std::fs::read_to_string(f.dir.join("state/state.json")).unwrap();
    assert!(!state.contains(canary));
    // And the client's Debug never shows the token.
    assert!(!format!("{:?}", f.client()).contains(&f.token));
}

/// The agent masks multi-line and escaped values in every form it can print them in: the deploy
/// env file is the pushed env file, and every failing docker call prints it (escaped, as
/// written).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_masks_multi_line_and_escaped_values_in_every_form() {
    let f = Fixture::with(Options {
        same_env_file: true,
        ..Default::default()
    })
    .await;
    let uniq = format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let canaries: Vec<(&str, String)> = vec![
        (
            "PEM_KEY",
            format!(
                "-----BEGIN RSA PRIVATE KEY-----\nMIIB{uniq}OgIBAAJBAKj34GkxFhD90vcNLYLInFEX6Pp\nKUpRKfFLfRYC9AIKjbJTWit+CqvjWYzvQwECAwEAAQ{uniq}==\n-----END RSA PRIVATE KEY-----\n"
            ),
        ),
        ("SPECIAL", format!("p\"w\\d${uniq}`x` 'y' #z")),
        ("JSONISH", format!("{{\"key\": \"v{uniq}\", \"n\": 1}}")),
    ];
    f.docker_control("leak-env", "");
    f.docker_control("fail-restart", "");
    let mut vars: std::collections::BTreeMap<String, String> = canaries
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    vars.insert("GH_IMAGE_TAG".into(), "v1".into());
    let content = sandbox_operator::agent::envfile::render(&vars);
    // The file is written; the restart after it fails, printing the file.
    let put_env = f
        .client()
        .put_env(&content, &["worker".to_string()])
        .await
        .unwrap_err()
        .to_string();
    assert!(put_env.contains("fake docker: restart failed"), "{put_env}");
    // A deploy whose pull fails, printing the same file (now with the new tag in it).
    f.docker_control("fail-pull", "");
    let id = f.client().deploy("v2").await.unwrap().deploy_id.unwrap();
    let h = f.wait_deploy_done(&id).await;
    let d = h.deploy.unwrap();
    assert_eq!(d.state, DeployState::RolledBack);
    let pull = d.steps.iter().find(|s| s.name == DeployStep::Pull).unwrap();
    assert!(
        pull.message.contains("fake docker: pull failed"),
        "{}",
        pull.message
    );
    // The tag is no secret: it is still named.
    assert!(pull.message.contains("GH_IMAGE_TAG=v2"), "{}", pull.message);
    let first = f.health().await.checked_at;
    f.wait_health("a few refreshes", |h| h.checked_at > first)
        .await;
    let health = http()
        .get(f.url("/health"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let places = vec![
        ("PUT /env error".to_string(), put_env),
        ("/health".into(), health),
        (
            "state file".into(),
            std::fs::read_to_string(f.dir.join("state/state.json")).unwrap(),
        ),
        ("agent log".into(), f.logs()),
    ];
    // Sanity: the values are in the file, escaped.
    let file = std::fs::read_to_string(f.dir.join("gh.env")).unwrap();
    assert!(
        file.contains(&sandbox_operator::agent::envfile::render_value(
            &canaries[1].1
        ))
    );
    let leaks = crate::support::find_leaks(&canaries, &places);
    assert!(leaks.is_empty(), "leaked:\n{}", leaks.join("\n"));
    // Masked, not dropped.
    assert!(pull.message.contains("[redacted]"), "{}", pull.message);
}

#[test]
fn agent_help_explains_the_settings() {
    let out = Command::new(AGENT_BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "--config",
        "--listen",
        "--token-file",
        "--state-file",
        "--env-file",
        "--docker",
        "--compose-file",
        "--worker-status-url",
        "--worker-drain-url",
        "--worker-health-url",
        "--health-check-tries",
        "--health-check-interval",
        "--drain-timeout",
        "--stop-grace",
        "requireAuthForHealth",
        "services",
        "checks",
        "limits",
    ] {
        assert!(help.contains(flag), "--help does not mention {flag}");
    }
    // A bad config is refused with a message, not a panic.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.yaml");
    std::fs::write(&p, "lisen: 1\n").unwrap();
    let out = Command::new(AGENT_BIN)
        .arg("--config")
        .arg(&p)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown field"));
    // --print-config shows the effective settings.
    std::fs::write(&p, "deploy:\n  healthCheckTries: 3\n").unwrap();
    let out = Command::new(AGENT_BIN)
        .arg("--config")
        .arg(&p)
        .args(["--stop-grace", "10s", "--print-config"])
        .output()
        .unwrap();
    let y = String::from_utf8(out.stdout).unwrap();
    assert!(
        y.contains("healthCheckTries: 3") && y.contains("stopGrace: 10s"),
        "{y}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_slow_requests_time_out() {
    let f = Fixture::with(Options {
        request_timeout: Some("500ms"),
        ..Default::default()
    })
    .await;
    let addr = f.agent.as_ref().unwrap().addr;
    // A client that announces 100 bytes and sends 10, then nothing.
    let head = format!(
        "POST /deploy HTTP/1.1\r\nhost: agent\r\nauthorization: Bearer {}\r\ncontent-length: 100\r\n\r\n{{\"image_ta",
        f.token
    );
    let status = tokio::task::spawn_blocking(move || raw_status(addr, &head))
        .await
        .unwrap();
    assert_eq!(status, 408);
    assert!(f.health().await.deploy.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_drain_without_a_running_worker_is_safe_at_once() {
    let f = Fixture::with(Options {
        no_worker: true,
        ..Default::default()
    })
    .await;
    let r = f.client().drain().await.unwrap();
    assert_eq!((r.deploy_safe, r.active_workers), (true, None));
    let h = f.health().await;
    assert_eq!(h.active_workers, None);
    assert_eq!(h.deploy_safe, None);
    assert_eq!(h.check("worker_status").unwrap().status, CheckStatus::Fail);
    assert!(!h.is_idle() && !h.is_deploy_safe());
}
