//! The agent on a real sandbox host: the real `sandbox-agent` binary driving the shared test
//! Docker engine (dockerd, Compose v2, a registry with htpasswd auth holding the project's own
//! worker image; see `sandbox_operator::testenv::docker`). Each test's "host" is a compose
//! project of its own (api and worker services of the worker image, host networking, ports of
//! its own) plus, where the test needs them, targeted workers (standalone containers labelled
//! `gh.role=targeted-worker`), and an agent whose docker client is NOT logged in to the
//! registry: every pull it makes works only through its own login step.
//!
//! What the running containers really have is read from the engine (`docker inspect`) and from
//! the worker itself (`GET /test/env` reports the environment its process was started with).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use sandbox_operator::agent::client::{AgentClient, AgentError, AgentToken};
use sandbox_operator::agent::protocol::{
    DeployInfo, DeployState, DeployStep, HealthReport, StepStatus,
};
use sandbox_operator::testenv::docker::DockerEngine;
use sandbox_operator::testenv::free_port;
use serde_json::Value;

use crate::support::docker_engine;

const AGENT_BIN: &str = env!("CARGO_BIN_EXE_sandbox-agent");
/// Generous deadline for anything a test waits on (correctness, not speed).
const DEADLINE: Duration = Duration::from_secs(120);

fn install_crypto() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// How the agent logs in to the registry.
#[derive(Clone)]
enum Login {
    /// `deploy.login` with registry, username and a password file holding this password.
    Credentials(String),
    /// `deploy.login.shell`: the ECR form, with an `aws` stand-in on the agent's PATH that prints
    /// the registry's `AWS` account password (as `aws ecr get-login-password` prints a token).
    EcrShell,
    /// No login configured.
    None,
}

struct Options {
    login: Login,
    /// Extra `environment:` entries of the compose worker service.
    worker_env: Vec<(&'static str, &'static str)>,
    /// Targeted workers started with the host (by id).
    targeted: Vec<&'static str>,
    drain_timeout: &'static str,
    on_drain_timeout: &'static str,
    stop_grace: &'static str,
    health_tries: u32,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            login: Login::Credentials(String::new()),
            worker_env: Vec::new(),
            targeted: Vec::new(),
            drain_timeout: "5s",
            on_drain_timeout: "proceed",
            stop_grace: "35s",
            health_tries: 40,
        }
    }
}

/// A targeted worker the test started (as `deploy.sh start-worker` would).
#[derive(Debug, Clone)]
struct Targeted {
    id: String,
    name: String,
    port: u16,
}

struct Agent {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One sandbox host: a compose project on the shared engine, its targeted workers, its agent.
struct Host {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    project: String,
    api_port: u16,
    worker_port: u16,
    token: String,
    /// The agent's own docker client configuration (not logged in by the test).
    docker_config: PathBuf,
    /// A PATH for the agent with the `aws` stand-in first.
    path: String,
    targeted: Vec<Targeted>,
    agent: Option<Agent>,
    engine: &'static DockerEngine,
}

fn project_name(test: &str) -> String {
    let clean: String = test
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    format!("{}-{}", clean.trim_matches('-'), std::process::id())
}

impl Host {
    /// Brings the project up on `v1` (with the engine's own, logged-in client, as the instance's
    /// bootstrap would), starts the targeted workers, then the agent.
    async fn start(test: &str, opts: Options) -> Host {
        install_crypto();
        let engine = docker_engine();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let project = project_name(test);
        let (api_port, worker_port) = (free_port(), free_port());
        let repo = engine.registry().worker_repository();
        std::fs::write(dir.join("gh.env"), "GH_IMAGE_TAG=v1\n").unwrap();
        std::fs::write(dir.join("app.env"), "PLAIN=hello\n").unwrap();
        let worker_env: String = opts
            .worker_env
            .iter()
            .map(|(k, v)| format!("      {k}: \"{v}\"\n"))
            .collect();
        // The seeds' docker-compose.prod.yml, on loopback ports of this test's own.
        let compose = format!(
            r#"services:
  api:
    image: {repo}:${{GH_IMAGE_TAG}}
    command: ["api"]
    network_mode: host
    env_file: [app.env]
    environment:
      GH_API_PORT: "{api_port}"
    deploy:
      resources:
        limits: {{memory: 64m, cpus: "0.5"}}
    restart: unless-stopped
  worker:
    image: {repo}:${{GH_IMAGE_TAG}}
    command: ["worker"]
    network_mode: host
    env_file: [app.env]
    environment:
      GH_WORKER_PORT: "{worker_port}"
{worker_env}    deploy:
      resources:
        limits: {{memory: 64m, cpus: "0.5"}}
    depends_on: [api]
    restart: unless-stopped
"#
        );
        std::fs::write(dir.join("compose.yml"), compose).unwrap();
        let token = format!("engine-agent-token-{}-0123456789abcdef", std::process::id());
        std::fs::write(dir.join("token"), format!("{token}\n")).unwrap();
        chmod600(&dir.join("token"));
        let docker_config = engine.client_config(&dir.join("docker-config")).unwrap();
        // The `aws` stand-in: prints the registry's AWS password, read from a file (never argv).
        let bin = dir.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::write(dir.join("ecr-token"), &engine.registry().aws_password).unwrap();
        std::fs::write(
            bin.join("aws"),
            format!(
                "#!/bin/sh\n# aws stand-in: `aws ecr get-login-password` prints a registry password\n[ \"$1 $2\" = \"ecr get-login-password\" ] || {{ echo \"aws stand-in: $*\" >&2; exit 2; }}\ncat '{}'\n",
                dir.join("ecr-token").display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(
            bin.join("aws"),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let path = format!(
            "{}:{}",
            bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut h = Host {
            _tmp: tmp,
            dir,
            project,
            api_port,
            worker_port,
            token,
            docker_config,
            path,
            targeted: Vec::new(),
            agent: None,
            engine,
        };
        h.compose_as_bootstrap(&["up", "-d", "--remove-orphans"]);
        for id in &opts.targeted {
            h.start_targeted(id, "v1");
        }
        h.write_config(&opts);
        h.start_agent();
        h.wait_http_ok(&format!("http://127.0.0.1:{}/health", h.api_port))
            .await;
        h
    }

    fn write_config(&self, opts: &Options) {
        let d = self.dir.display();
        let reg = self.engine.registry();
        let login = match &opts.login {
            Login::Credentials(pw) => {
                let pw = if pw.is_empty() { &reg.password } else { pw };
                std::fs::write(self.dir.join("registry-password"), format!("{pw}\n")).unwrap();
                chmod600(&self.dir.join("registry-password"));
                format!(
                    "  login: {{registry: \"{}\", username: {}, passwordFile: {d}/registry-password}}\n",
                    reg.addr, reg.username
                )
            }
            Login::EcrShell => format!(
                "  login:\n    shell: aws ecr get-login-password --region us-east-1 | docker login --username AWS --password-stdin {}\n",
                reg.addr
            ),
            Login::None => String::new(),
        };
        let (api, worker) = (self.api_port, self.worker_port);
        let yaml = format!(
            r#"listen: 127.0.0.1:0
tokenFile: {d}/token
stateFile: {d}/state/state.json
envFile: {d}/app.env
refreshInterval: 500ms
probeTimeout: 2s
docker:
  binary: docker
  composeFiles: [{d}/compose.yml]
  projectDirectory: {d}
  projectName: {project}
  observeInterval: 300ms
worker:
  statusUrl: http://127.0.0.1:{worker}/worker/status
  drainUrl: http://127.0.0.1:{worker}/worker/drain
  healthUrl: http://127.0.0.1:{api}/health
deploy:
  envFile: {d}/gh.env
{login}  drainTimeout: {drain}
  drainPollInterval: 100ms
  onDrainTimeout: {on_drain}
  stopGrace: {grace}
  healthCheckTries: {tries}
  healthCheckInterval: 250ms
  healthCheckTimeout: 2s
  commandTimeout: 120s
targetedWorkers:
  selector: [gh.role=targeted-worker, "gh.test={project}"]
  envFiles: [{d}/app.env]
services:
  worker: {{composeService: worker, healthUrl: "http://127.0.0.1:{worker}/worker/status"}}
  api: {{composeService: api, healthUrl: "http://127.0.0.1:{api}/health"}}
  worker-plain: {{composeService: worker}}
  targeted: {{targetedWorkers: true}}
checks:
  composeServices: [api, worker]
  workerService: {{composeService: worker}}
limits:
  restartTimeout: 60s
"#,
            project = self.project,
            drain = opts.drain_timeout,
            on_drain = opts.on_drain_timeout,
            grace = opts.stop_grace,
            tries = opts.health_tries,
        );
        std::fs::write(self.dir.join("agent.yaml"), yaml).unwrap();
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("agent.log")
    }

    /// Starts (or restarts) the agent, appending to the same log.
    fn start_agent(&mut self) {
        self.agent = None;
        let addr_file = self.dir.join("addr");
        let _ = std::fs::remove_file(&addr_file);
        let mut cmd = Command::new(AGENT_BIN);
        cmd.arg("--config")
            .arg(self.dir.join("agent.yaml"))
            .arg("--addr-file")
            .arg(&addr_file)
            .args(["--log", "debug"])
            .env_remove("SANDBOX_AGENT_CONFIG")
            .env("DOCKER_HOST", self.engine.host())
            .env("DOCKER_CONFIG", &self.docker_config)
            .env("PATH", &self.path);
        let mut child = sandbox_operator::testenv::process::spawn_tied(cmd, &self.log_path())
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
            assert!(start.elapsed() < DEADLINE, "sandbox-agent did not start");
            std::thread::sleep(Duration::from_millis(20));
        };
        self.agent = Some(Agent { child, addr });
    }

    /// SIGKILL: the agent gets no chance to write anything.
    fn kill_agent(&mut self) {
        self.agent = None;
    }

    fn url(&self) -> String {
        format!(
            "http://{}",
            self.agent.as_ref().expect("agent running").addr
        )
    }

    fn client(&self) -> AgentClient {
        AgentClient::new(&self.url(), Some(AgentToken::new(&self.token))).unwrap()
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// `docker compose` for this project with the engine's own (logged-in) client: what the
    /// instance's bootstrap and an operator at a shell would run, never the agent.
    fn compose_as_bootstrap(&self, sub: &[&str]) -> String {
        let d = &self.dir;
        let mut args: Vec<String> = vec![
            "compose".into(),
            "-p".into(),
            self.project.clone(),
            "--project-directory".into(),
            d.display().to_string(),
            "-f".into(),
            d.join("compose.yml").display().to_string(),
            "--env-file".into(),
            d.join("gh.env").display().to_string(),
        ];
        args.extend(sub.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        self.engine
            .docker(&refs)
            .unwrap_or_else(|e| panic!("docker compose {sub:?}: {e}"))
    }

    /// Starts a targeted worker as the seeds' `deploy.sh start-worker ID` does: its own status
    /// port, labels `gh.role=targeted-worker` and `gh.worker_id`, 64 MB and half a CPU, the
    /// shared env file plus its own (no value on the command line).
    fn start_targeted(&mut self, id: &str, tag: &str) -> Targeted {
        let port = free_port();
        let name = format!("{}-tw-{id}", self.project);
        let own = self.dir.join(format!("tw-{id}.env"));
        std::fs::write(&own, format!("GH_WORKER_ID={id}\nGH_WORKER_PORT={port}\n")).unwrap();
        let image = format!("{}:{tag}", self.engine.registry().worker_repository());
        let app_env = self.dir.join("app.env");
        self.engine
            .docker(&[
                "run",
                "-d",
                "--name",
                &name,
                "--label",
                "gh.role=targeted-worker",
                "--label",
                &format!("gh.worker_id={id}"),
                "--label",
                &format!("gh.test={}", self.project),
                "--memory",
                "64m",
                "--cpus",
                "0.25",
                "--network",
                "host",
                "--restart",
                "unless-stopped",
                "--env-file",
                app_env.to_str().unwrap(),
                "--env-file",
                own.to_str().unwrap(),
                &image,
                "worker",
            ])
            .unwrap_or_else(|e| panic!("starting targeted worker {id}: {e}"));
        let t = Targeted {
            id: id.to_string(),
            name,
            port,
        };
        self.targeted.push(t.clone());
        t
    }

    fn container(&self, service: &str) -> String {
        format!("{}-{service}-1", self.project)
    }

    /// `docker inspect NAME` (the first object).
    fn inspect(&self, name: &str) -> Value {
        let out = self
            .engine
            .docker(&["inspect", name])
            .unwrap_or_else(|e| panic!("docker inspect {name}: {e}"));
        let v: Value = serde_json::from_str(&out).unwrap();
        v[0].clone()
    }

    fn image_of(&self, name: &str) -> String {
        self.inspect(name)["Config"]["Image"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    fn image(&self, tag: &str) -> String {
        format!("{}:{tag}", self.engine.registry().worker_repository())
    }

    fn gh_env_tag(&self) -> String {
        std::fs::read_to_string(self.dir.join("gh.env"))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("GH_IMAGE_TAG=").map(str::to_string))
            .unwrap_or_default()
    }

    async fn wait_http_ok(&self, url: &str) {
        let http = http();
        let start = Instant::now();
        loop {
            if let Ok(r) = http.get(url).timeout(Duration::from_secs(2)).send().await
                && r.status().is_success()
            {
                return;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "{url} never answered 2xx; agent log:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The environment the process behind `port` was started with (the worker's own report).
    async fn env_at(&self, port: u16) -> BTreeMap<String, String> {
        let url = format!("http://127.0.0.1:{port}/test/env");
        let start = Instant::now();
        loop {
            if let Ok(r) = http()
                .get(&url)
                .timeout(Duration::from_secs(2))
                .send()
                .await
                && let Ok(m) = r.json::<BTreeMap<String, String>>().await
            {
                return m;
            }
            assert!(start.elapsed() < DEADLINE, "{url} never answered");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn health(&self) -> HealthReport {
        self.client().health().await.expect("GET /health")
    }

    async fn wait_health(&self, what: &str, f: impl Fn(&HealthReport) -> bool) -> HealthReport {
        let start = Instant::now();
        loop {
            let h = self.health().await;
            if f(&h) {
                return h;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "timed out waiting for {what}; last /health: {h:#?}\nagent log:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn deploy(&self, tag: &str) -> String {
        self.client()
            .deploy(tag)
            .await
            .unwrap_or_else(|e| panic!("POST /deploy {tag}: {e}"))
            .deploy_id
            .expect("a deploy id")
    }

    async fn wait_deploy_done(&self, id: &str) -> (HealthReport, DeployInfo) {
        let h = self
            .wait_health("the deploy to finish", |h| {
                h.deploy
                    .as_ref()
                    .is_some_and(|d| d.id == id && d.state.is_terminal())
            })
            .await;
        let d = h.deploy.clone().unwrap();
        (h, d)
    }

    /// The targeted workers' containers' names, as the engine lists them.
    fn targeted_names(&self) -> Vec<String> {
        let out = self
            .engine
            .docker(&[
                "ps",
                "-a",
                "--filter",
                &format!("label=gh.test={}", self.project),
                "--format",
                "{{.Names}}",
            ])
            .unwrap();
        let mut v: Vec<String> = out.lines().map(str::to_string).collect();
        v.sort();
        v
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.agent = None;
        if std::thread::panicking() {
            eprintln!("---- agent log ({}) ----\n{}", self.project, self.logs());
        }
        let _ = self.engine.docker(&[
            "compose",
            "-p",
            &self.project,
            "-f",
            self.dir.join("compose.yml").to_str().unwrap_or_default(),
            "--env-file",
            self.dir.join("gh.env").to_str().unwrap_or_default(),
            "down",
            "-t",
            "1",
            "--remove-orphans",
        ]);
        if let Ok(ids) = self.engine.docker(&[
            "ps",
            "-aq",
            "--filter",
            &format!("label=gh.test={}", self.project),
        ]) {
            for id in ids.split_whitespace() {
                let _ = self.engine.docker(&["rm", "-f", id]);
            }
        }
    }
}

fn chmod600(p: &Path) {
    std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
}

fn http() -> reqwest::Client {
    install_crypto();
    reqwest::Client::builder().no_proxy().build().unwrap()
}

fn step(d: &DeployInfo, s: DeployStep) -> &sandbox_operator::agent::protocol::StepRecord {
    d.steps
        .iter()
        .rev()
        .find(|r| r.name == s)
        .unwrap_or_else(|| panic!("no {s} step in {d:#?}"))
}

fn labels(v: &Value) -> BTreeMap<String, String> {
    v["Config"]["Labels"]
        .as_object()
        .map(|o| {
            o.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string()))
                .collect()
        })
        .unwrap_or_default()
}

fn secs_between(a: jiff::Timestamp, b: jiff::Timestamp) -> f64 {
    (b.as_millisecond() - a.as_millisecond()) as f64 / 1000.0
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_engine_deploy_logs_in_pulls_drains_and_runs_the_new_tag() {
    let h = Host::start(
        "engine-deploy",
        Options {
            login: Login::EcrShell,
            targeted: vec!["abc"],
            ..Default::default()
        },
    )
    .await;
    let tw = h.targeted[0].clone();
    let api_before = h.inspect(&h.container("api"));
    let worker_before = h.inspect(&h.container("worker"));
    let tw_before = h.inspect(&tw.name);
    assert_eq!(h.image_of(&h.container("worker")), h.image("v1"));
    // /health lists the targeted worker, and tells the running tag.
    let health = h
        .wait_health("the targeted worker listed", |r| {
            r.targeted_workers.len() == 1 && r.image_tag.as_deref() == Some("v1")
        })
        .await;
    let listed = &health.targeted_workers[0];
    assert_eq!(
        (
            listed.name.as_str(),
            listed.worker_id.as_deref(),
            listed.state.as_str(),
            listed.port
        ),
        (
            tw.name.as_str(),
            Some(tw.id.as_str()),
            "running",
            Some(tw.port)
        )
    );
    // Give the worker a job: the deploy drains it through its HTTP endpoint first.
    let r = http()
        .post(format!("http://127.0.0.1:{}/test/jobs?n=2", h.worker_port))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());

    let id = h.deploy("v2").await;
    let (health, d) = h.wait_deploy_done(&id).await;
    assert_eq!(d.state, DeployState::Succeeded, "{d:#?}");
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
    assert!(
        d.steps.iter().all(|s| s.status == StepStatus::Succeeded),
        "{d:#?}"
    );
    // The agent's client was not logged in: its own login made the pull work.
    assert!(
        step(&d, DeployStep::Login)
            .message
            .contains("Login Succeeded"),
        "{d:#?}"
    );
    assert!(
        step(&d, DeployStep::Drain).message.contains("deploy-safe"),
        "{d:#?}"
    );
    assert_eq!(
        step(&d, DeployStep::StopWorker).message,
        "docker compose stop -t 35 worker: ok"
    );
    assert!(
        step(&d, DeployStep::Up)
            .message
            .contains(&format!("targeted workers {} recreated on v2", tw.name)),
        "{d:#?}"
    );

    // The engine runs the new tag: new containers, from the new image.
    for (svc, before) in [("api", &api_before), ("worker", &worker_before)] {
        let now = h.inspect(&h.container(svc));
        assert_eq!(now["Config"]["Image"], h.image("v2"), "{svc}");
        assert_ne!(now["Id"], before["Id"], "{svc} was not recreated");
        assert_eq!(now["State"]["Running"], true, "{svc}");
        // The compose limits are kept.
        assert_eq!(now["HostConfig"]["Memory"], before["HostConfig"]["Memory"]);
        assert_eq!(
            now["HostConfig"]["NanoCpus"],
            before["HostConfig"]["NanoCpus"]
        );
    }
    let worker_env = h.env_at(h.worker_port).await;
    assert_eq!(worker_env["GH_BUILD"], "v2", "{worker_env:?}");
    assert_eq!(worker_env["PLAIN"], "hello");
    // The worker that had jobs was drained before it was stopped: the new one starts idle.
    assert_eq!(h.gh_env_tag(), "v2");

    // The targeted worker: a new container on v2 with its labels, port, memory, CPU, restart
    // policy, command and env files.
    let tw_now = h.inspect(&tw.name);
    assert_ne!(tw_now["Id"], tw_before["Id"]);
    assert_eq!(tw_now["Config"]["Image"], h.image("v2"));
    let (lb, ln) = (labels(&tw_before), labels(&tw_now));
    for k in ["gh.role", "gh.worker_id", "gh.test"] {
        assert_eq!(ln.get(k), lb.get(k), "label {k}");
    }
    // The image's own label follows the image.
    assert_eq!(ln["dev.valet.fleet.test-build"], "v2");
    for k in ["Memory", "NanoCpus", "NetworkMode", "RestartPolicy"] {
        assert_eq!(tw_now["HostConfig"][k], tw_before["HostConfig"][k], "{k}");
    }
    assert_eq!(tw_now["Config"]["Cmd"], tw_before["Config"]["Cmd"]);
    assert_eq!(tw_now["Config"]["Cmd"], serde_json::json!(["worker"]));
    let tw_env = h.env_at(tw.port).await;
    assert_eq!(tw_env["GH_BUILD"], "v2");
    assert_eq!(tw_env["GH_WORKER_ID"], "abc");
    assert_eq!(tw_env["GH_WORKER_PORT"], tw.port.to_string());
    assert_eq!(tw_env["PLAIN"], "hello");
    // No leftover replacement containers.
    assert_eq!(h.targeted_names(), vec![tw.name.clone()]);

    // /health: the new tag, from the engine, and the targeted worker on it.
    assert_eq!(health.image_tag.as_deref(), Some("v2"));
    let health = h
        .wait_health("the targeted worker on v2", |r| {
            r.targeted_workers
                .first()
                .is_some_and(|t| t.image_tag.as_deref() == Some("v2") && t.state == "running")
        })
        .await;
    assert_eq!(health.image_tag.as_deref(), Some("v2"));

    // The registry password never reached a log or the state file.
    let pw = &h.engine.registry().aws_password;
    let state = std::fs::read_to_string(h.dir.join("state/state.json")).unwrap();
    assert!(!h.logs().contains(pw.as_str()) && !state.contains(pw.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_engine_missing_tag_fails_at_pull_and_an_unhealthy_tag_rolls_back() {
    let h = Host::start(
        "engine-rollback",
        Options {
            targeted: vec!["t1"],
            health_tries: 8,
            ..Default::default()
        },
    )
    .await;
    let tw = h.targeted[0].clone();
    let ids = |h: &Host| {
        [h.container("api"), h.container("worker"), tw.name.clone()]
            .map(|n| h.inspect(&n)["Id"].as_str().unwrap().to_string())
    };
    let before = ids(&h);

    // A tag the registry does not have: the pull fails with the registry's word, the env file
    // goes back to v1 and no container is touched.
    let id = h.deploy("v404").await;
    let (health, d) = h.wait_deploy_done(&id).await;
    assert_eq!(d.state, DeployState::RolledBack, "{d:#?}");
    assert!(d.message.contains("failed at pull"), "{}", d.message);
    assert!(d.message.contains("containers untouched"), "{}", d.message);
    let pull = step(&d, DeployStep::Pull);
    assert!(
        pull.message.contains("manifest unknown") || pull.message.contains("not found"),
        "the engine's own message: {}",
        pull.message
    );
    assert_eq!(h.gh_env_tag(), "v1");
    assert_eq!(ids(&h), before, "a container was recreated");
    assert_eq!(health.image_tag.as_deref(), Some("v1"));
    h.wait_http_ok(&format!("http://127.0.0.1:{}/health", h.api_port))
        .await;

    // A tag whose health check never passes: up, health check fails, and the previous tag runs
    // again, targeted workers included.
    let start = Instant::now();
    let id = h.deploy("unhealthy").await;
    let (health, d) = h.wait_deploy_done(&id).await;
    assert!(start.elapsed() < DEADLINE);
    assert_eq!(d.state, DeployState::RolledBack, "{d:#?}");
    assert!(
        d.message.contains("failed at health_check"),
        "{}",
        d.message
    );
    assert!(d.message.contains("rolled back to v1"), "{}", d.message);
    let hc = step(&d, DeployStep::HealthCheck);
    assert!(hc.message.contains("HTTP 503"), "{}", hc.message);
    assert!(
        step(&d, DeployStep::Up)
            .message
            .contains("recreated on unhealthy"),
        "{d:#?}"
    );
    assert!(
        step(&d, DeployStep::RollbackUp).message.contains(&format!(
            "targeted workers {} back on their previous image",
            tw.name
        )),
        "{d:#?}"
    );
    assert_eq!(
        step(&d, DeployStep::RollbackHealthCheck).status,
        StepStatus::Succeeded
    );
    for n in [h.container("api"), h.container("worker"), tw.name.clone()] {
        let v = h.inspect(&n);
        assert_eq!(v["Config"]["Image"], h.image("v1"), "{n}");
        assert_eq!(v["State"]["Running"], true, "{n}");
    }
    assert_eq!(h.env_at(tw.port).await["GH_WORKER_ID"], "t1");
    assert_eq!(h.gh_env_tag(), "v1");
    assert_eq!(
        (
            health.deploy.as_ref().unwrap().state,
            health.image_tag.as_deref()
        ),
        (DeployState::RolledBack, Some("v1"))
    );
    let health = h
        .wait_health("the engine seen after the rollback", |r| {
            r.checked_at > d.finished_at
                && r.targeted_workers
                    .first()
                    .is_some_and(|t| t.image_tag.as_deref() == Some("v1"))
        })
        .await;
    assert_eq!(health.image_tag.as_deref(), Some("v1"));
    assert_eq!(h.targeted_names(), vec![tw.name.clone()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_engine_killed_mid_deploy_leaves_a_running_worker_and_a_truthful_health() {
    // A worker with a job that it keeps through a drain: the deploy waits in its drain step.
    let mut h = Host::start(
        "engine-killed",
        Options {
            worker_env: vec![("GH_JOBS", "1"), ("GH_IGNORE_DRAIN", "1")],
            drain_timeout: "90s",
            ..Default::default()
        },
    )
    .await;
    let worker_id = h.inspect(&h.container("worker"))["Id"].clone();
    let id = h.deploy("v2").await;
    h.wait_health("the drain step", |r| {
        r.deploy
            .as_ref()
            .is_some_and(|d| d.step == DeployStep::Drain && d.state == DeployState::Running)
    })
    .await;
    assert_eq!(h.gh_env_tag(), "v2", "the deploy had written the new tag");
    // Meanwhile an env push may write its file but not recreate the containers the deploy is
    // replacing.
    let e = h
        .client()
        .put_env("PLAIN=hello\n", &["worker".to_string()])
        .await
        .unwrap_err();
    assert!(
        matches!(&e, AgentError::Server { status: 502, message, .. } if message.contains("a deploy is running")),
        "{e:?}"
    );
    assert_eq!(h.inspect(&h.container("worker"))["Id"], worker_id);
    h.kill_agent();
    h.start_agent();
    let health = h.health().await;
    let d = health.deploy.clone().unwrap();
    assert_eq!(d.id, id);
    assert_eq!(d.state, DeployState::Failed, "{d:#?}");
    assert!(
        d.message
            .contains("agent restarted during deploy at step drain"),
        "{}",
        d.message
    );
    assert!(
        d.message.contains("env file restored to v1"),
        "{}",
        d.message
    );
    // The worker kept running, the same container, on v1; the env file names v1 again; /health
    // says v1 (from the engine once it has looked).
    let w = h.inspect(&h.container("worker"));
    assert_eq!(
        (w["Id"].clone(), w["State"]["Running"].clone()),
        (worker_id, Value::Bool(true))
    );
    assert_eq!(w["Config"]["Image"], h.image("v1"));
    assert_eq!(h.gh_env_tag(), "v1");
    assert_eq!(health.image_tag.as_deref(), Some("v1"));
    let health = h
        .wait_health("the worker's status", |r| r.active_workers == Some(1))
        .await;
    assert_eq!(health.image_tag.as_deref(), Some("v1"));
    // A new deploy is accepted (and, the worker still busy, waits in its drain again).
    let next = h.deploy("v2").await;
    assert_ne!(next, id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_engine_env_push_reaches_the_running_workers() {
    let h = Host::start(
        "engine-env",
        Options {
            targeted: vec!["e1"],
            health_tries: 8,
            ..Default::default()
        },
    )
    .await;
    let tw = h.targeted[0].clone();
    let tw_labels = labels(&h.inspect(&tw.name));
    let secret = format!("rotated-{}-value", std::process::id());
    let multi = "line one\nline \"two\" $HOME `x` \\ end";
    // Rendered as a SecretBundle renders it.
    let content = sandbox_operator::agent::envfile::render(
        &[
            ("PLAIN", "hello"),
            ("SECRET", secret.as_str()),
            ("MULTI", multi),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect(),
    );
    let r = h
        .client()
        .put_env(&content, &["worker".to_string(), "targeted".to_string()])
        .await
        .unwrap_or_else(|e| panic!("PUT /env: {e}\n{}", h.logs()));
    assert_eq!(r.restarted.len(), 2, "{r:?}");
    assert!(r.restarted.iter().all(|s| s.success), "{r:?}");
    assert!(
        r.restarted[0].message.contains("recreated, healthy"),
        "{r:?}"
    );
    // The running processes see the new values: recreated, not restarted.
    let w = h.env_at(h.worker_port).await;
    assert_eq!(w.get("SECRET"), Some(&secret), "compose worker: {w:?}");
    assert_eq!(w.get("MULTI").map(String::as_str), Some(multi));
    let t = h.env_at(tw.port).await;
    assert_eq!(t.get("SECRET"), Some(&secret), "targeted worker: {t:?}");
    assert_eq!(t.get("MULTI").map(String::as_str), Some(multi));
    assert_eq!(t["GH_WORKER_ID"], "e1");
    assert_eq!(labels(&h.inspect(&tw.name)), tw_labels);
    // The api was not named: it keeps the environment it was started with.
    let a = h.env_at(h.api_port).await;
    assert_eq!(a.get("SECRET"), None);
    // Nothing of the values on a command line: the targeted worker's container has no env
    // value in its Args/Cmd, and the agent passed none (its log says what it ran, redacted).
    let ti = h.inspect(&tw.name);
    for k in ["Args", "Path"] {
        assert!(!ti[k].to_string().contains(&secret), "{k}");
    }
    assert!(!h.logs().contains(&secret));

    // Without a health URL, a recreated compose service must at least run.
    let r = h
        .client()
        .put_env(&content, &["worker-plain".to_string()])
        .await
        .unwrap();
    assert!(r.restarted[0].success, "{r:?}");

    // A push after which the api fails its health check: reported as that service's failure,
    // with the agent's message; the file is written (its hash in the answer).
    let e = h
        .client()
        .put_env(
            &format!("{content}GH_WORKER_UNHEALTHY=1\n"),
            &["api".to_string()],
        )
        .await
        .unwrap_err();
    match &e {
        AgentError::Server {
            status: 502,
            message,
            ..
        } => {
            assert!(
                message.contains("restarting api: recreated, but not healthy"),
                "{message}"
            );
            assert!(message.contains("HTTP 503"), "{message}");
        }
        other => panic!("expected a 502 naming the api: {other:?}"),
    }
    // Put it right.
    let r = h
        .client()
        .put_env(&content, &["api".to_string()])
        .await
        .unwrap();
    assert!(r.restarted[0].success, "{r:?}");
    assert_eq!(h.env_at(h.api_port).await.get("SECRET"), Some(&secret));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_engine_bad_credentials_and_a_broken_compose_file_leave_the_old_workers() {
    // No login at all: the registry refuses the agent's anonymous pull.
    let h = Host::start(
        "engine-nologin",
        Options {
            login: Login::None,
            ..Default::default()
        },
    )
    .await;
    let worker_id = h.inspect(&h.container("worker"))["Id"].clone();
    let id = h.deploy("v2").await;
    let (_, d) = h.wait_deploy_done(&id).await;
    assert_eq!(d.state, DeployState::RolledBack, "{d:#?}");
    assert_eq!(step(&d, DeployStep::Login).status, StepStatus::Skipped);
    assert!(
        step(&d, DeployStep::Pull)
            .message
            .contains("no basic auth credentials"),
        "the engine's own message: {}",
        step(&d, DeployStep::Pull).message
    );
    assert_eq!(h.inspect(&h.container("worker"))["Id"], worker_id);
    drop(h);

    let wrong = format!("wrong-password-{}", std::process::id());
    let h = Host::start(
        "engine-badcreds",
        Options {
            login: Login::Credentials(wrong.clone()),
            ..Default::default()
        },
    )
    .await;
    let worker_id = h.inspect(&h.container("worker"))["Id"].clone();
    let id = h.deploy("v2").await;
    let (_, d) = h.wait_deploy_done(&id).await;
    assert_eq!(d.state, DeployState::RolledBack, "{d:#?}");
    assert!(d.message.contains("failed at login"), "{}", d.message);
    let login = step(&d, DeployStep::Login);
    assert!(
        login.message.contains("401 Unauthorized"),
        "the engine's own message: {}",
        login.message
    );
    assert!(!login.message.contains(&wrong));
    assert_eq!(h.inspect(&h.container("worker"))["Id"], worker_id);
    assert_eq!(h.gh_env_tag(), "v1");

    // The right password: the same form logs in and the deploy goes through.
    std::fs::write(
        h.dir.join("registry-password"),
        format!("{}\n", h.engine.registry().password),
    )
    .unwrap();
    let id = h.deploy("v2").await;
    let (_, d) = h.wait_deploy_done(&id).await;
    assert_eq!(d.state, DeployState::Succeeded, "{d:#?}");
    assert_eq!(
        step(&d, DeployStep::Login).message,
        format!(
            "docker login {} as {}: ok",
            h.engine.registry().addr,
            h.engine.registry().username
        )
    );
    assert_eq!(h.image_of(&h.container("worker")), h.image("v2"));

    // A compose file with an error: the deploy fails with compose's own message; v2 runs on.
    let worker_id = h.inspect(&h.container("worker"))["Id"].clone();
    let good = std::fs::read_to_string(h.dir.join("compose.yml")).unwrap();
    std::fs::write(
        h.dir.join("compose.yml"),
        good.replace(
            "    network_mode: host\n    env_file",
            "    network_mode: host\n    bogus_key: 1\n    env_file",
        ),
    )
    .unwrap();
    let id = h.deploy("v1").await;
    let (_, d) = h.wait_deploy_done(&id).await;
    assert_ne!(d.state, DeployState::Succeeded, "{d:#?}");
    assert!(d.message.contains("failed at pull"), "{}", d.message);
    assert!(
        step(&d, DeployStep::Pull).message.contains("bogus_key"),
        "{}",
        step(&d, DeployStep::Pull).message
    );
    let w = h.inspect(&h.container("worker"));
    assert_eq!(
        (w["Id"].clone(), w["State"]["Running"].clone()),
        (worker_id, Value::Bool(true))
    );
    assert_eq!(h.gh_env_tag(), "v2");
    std::fs::write(h.dir.join("compose.yml"), good).unwrap();

    let logs = h.logs();
    assert!(!logs.contains(&wrong) && !logs.contains(&h.engine.registry().password));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_engine_worker_that_ignores_drain() {
    // abort: the deploy gives up at the drain; the busy worker keeps running, untouched.
    let h = Host::start(
        "engine-drain-abort",
        Options {
            worker_env: vec![("GH_JOBS", "1"), ("GH_IGNORE_DRAIN", "1")],
            drain_timeout: "2s",
            on_drain_timeout: "abort",
            ..Default::default()
        },
    )
    .await;
    let worker_id = h.inspect(&h.container("worker"))["Id"].clone();
    let start = Instant::now();
    let id = h.deploy("v2").await;
    let (_, d) = h.wait_deploy_done(&id).await;
    assert!(start.elapsed() < DEADLINE);
    assert_eq!(d.state, DeployState::RolledBack, "{d:#?}");
    assert!(d.message.contains("failed at drain"), "{}", d.message);
    assert!(d.message.contains("1 active"), "{}", d.message);
    let w = h.inspect(&h.container("worker"));
    assert_eq!(
        (w["Id"].clone(), w["Config"]["Image"].clone()),
        (worker_id, Value::String(h.image("v1")))
    );
    let status: Value = http()
        .get(format!("http://127.0.0.1:{}/worker/status", h.worker_port))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["active_jobs"], 1, "the job was not cut: {status}");
    drop(h);

    // proceed (the seeds' way): after the drain timeout the worker is stopped with the grace;
    // one that ignores SIGTERM too is killed when the grace ends, and the deploy goes on.
    let h = Host::start(
        "engine-drain-proceed",
        Options {
            worker_env: vec![
                ("GH_JOBS", "1"),
                ("GH_IGNORE_DRAIN", "1"),
                ("GH_IGNORE_SIGTERM", "1"),
            ],
            drain_timeout: "2s",
            stop_grace: "3s",
            ..Default::default()
        },
    )
    .await;
    let id = h.deploy("v2").await;
    let (_, d) = h.wait_deploy_done(&id).await;
    assert_eq!(d.state, DeployState::Succeeded, "{d:#?}");
    let drain = step(&d, DeployStep::Drain);
    assert_eq!(drain.status, StepStatus::Warning);
    assert!(
        drain.message.contains("stopping it with a 3s grace"),
        "{}",
        drain.message
    );
    let stop = step(&d, DeployStep::StopWorker);
    let took = secs_between(stop.started_at, stop.finished_at.unwrap());
    assert!(
        took >= 2.9,
        "the stop did not wait for the grace: {took:.1}s"
    );
    assert_eq!(h.image_of(&h.container("worker")), h.image("v2"));
}

/// Figures for the note: per-sandbox deploy time on the real engine (pull to healthy) and
/// rollback time (the rollback's first step to its healthy check), medians of three runs each.
/// Printed, never asserted. Each deploy pulls a tag the engine does not have yet, whose image
/// has a 16 MB layer of its own (built and pushed by the test, then removed locally).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_engine_deploy_and_rollback_figures() {
    let h = Host::start(
        "engine-figures",
        Options {
            health_tries: 8,
            ..Default::default()
        },
    )
    .await;
    let engine = h.engine;
    let repo = engine.registry().worker_repository();
    let mut deploys = Vec::new();
    for i in 0..3 {
        let tag = format!("fig-{}-{i}", std::process::id());
        let ctx = h.dir.join(format!("fig-{i}"));
        std::fs::create_dir_all(&ctx).unwrap();
        let mut noise = vec![0u8; 16 * 1024 * 1024];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ (i as u64) ^ u64::from(std::process::id());
        for b in noise.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        std::fs::write(ctx.join("noise"), &noise).unwrap();
        std::fs::write(
            ctx.join("Dockerfile"),
            format!("FROM {repo}:v2\nCOPY noise /noise\n"),
        )
        .unwrap();
        let image = format!("{repo}:{tag}");
        let o = engine
            .command()
            .env("DOCKER_BUILDKIT", "0")
            .args(["build", "-q", "-t", &image])
            .arg(&ctx)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        engine.docker(&["push", &image]).unwrap();
        engine.docker(&["rmi", &image]).unwrap();
        let id = h.deploy(&tag).await;
        let (_, d) = h.wait_deploy_done(&id).await;
        assert_eq!(d.state, DeployState::Succeeded, "{d:#?}");
        let t = secs_between(
            step(&d, DeployStep::Pull).started_at,
            step(&d, DeployStep::HealthCheck).finished_at.unwrap(),
        );
        deploys.push(t);
    }
    let mut rollbacks = Vec::new();
    let mut failed_total = Vec::new();
    for _ in 0..3 {
        let id = h.deploy("unhealthy").await;
        let (_, d) = h.wait_deploy_done(&id).await;
        assert_eq!(d.state, DeployState::RolledBack, "{d:#?}");
        rollbacks.push(secs_between(
            step(&d, DeployStep::RollbackImageTag).started_at,
            step(&d, DeployStep::RollbackHealthCheck)
                .finished_at
                .unwrap(),
        ));
        failed_total.push(secs_between(d.started_at, d.finished_at.unwrap()));
    }
    println!(
        "FIGURE agent deploy on the real engine, pull to healthy (16 MB new layer, local registry): median {:.2} s of {:?}",
        median(deploys.clone()),
        deploys
            .iter()
            .map(|t| format!("{t:.2}"))
            .collect::<Vec<_>>()
    );
    println!(
        "FIGURE agent rollback on the real engine, rollback start to healthy: median {:.2} s of {:?}; whole failed deploy incl. 8 health tries 250ms apart: median {:.2} s",
        median(rollbacks.clone()),
        rollbacks
            .iter()
            .map(|t| format!("{t:.2}"))
            .collect::<Vec<_>>(),
        median(failed_total)
    );
}

// ---------------------------------------------------------------------------------------------
// End to end: the real operator binary drives two sandboxes whose agents run real containers.

/// Every string `docker inspect` shows of the project's and its targeted workers' containers,
/// except `Config.Env`: env_file values are meant to go there, so it necessarily holds them
/// (what the test checks is that they went nowhere else: labels, Cmd, Args, Entrypoint, Path,
/// HostConfig, ...).
fn inspect_without_env(h: &Host) -> Vec<(String, String)> {
    let out = h
        .engine
        .docker(&[
            "ps",
            "-aq",
            "--filter",
            &format!("label=com.docker.compose.project={}", h.project),
        ])
        .unwrap();
    let mut ids: Vec<String> = out.split_whitespace().map(str::to_string).collect();
    ids.extend(h.targeted.iter().map(|t| t.name.clone()));
    ids.iter()
        .map(|id| {
            let mut v = h.inspect(id);
            let env = v["Config"]["Env"].take();
            assert!(env.is_array(), "{id} has no Config.Env");
            (
                format!("docker inspect {id} ({})", h.project),
                v.to_string(),
            )
        })
        .collect()
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(files_under(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_engine_operator_rolls_out_then_a_secret_rotation_reaches_the_workers() {
    use base64::Engine as _;
    use k8s_openapi::api::core::v1::{Event, Secret};
    use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
    use sandbox_operator::api::{
        BundleTargetState, DeployPhase, Sandbox, SandboxDeploy, SecretBundle, TargetPhase,
    };
    use sandbox_operator::testenv::ec2::{Ec2Endpoint, Ec2EndpointOptions};

    let a = Host::start(
        "e2e-a",
        Options {
            targeted: vec!["ta"],
            health_tries: 12,
            ..Default::default()
        },
    )
    .await;
    let b = Host::start(
        "e2e-b",
        Options {
            health_tries: 12,
            ..Default::default()
        },
    )
    .await;
    let hosts = [("sbx-a", &a), ("sbx-b", &b)];

    let client = crate::support::client().await;
    let ns = crate::support::namespace(&client, "engine-e2e").await;
    let ec2 = Ec2Endpoint::start(Ec2EndpointOptions::default())
        .await
        .unwrap();
    let ami = ec2.defaults().await.unwrap().ami;
    let op = crate::support::Operator::start(&ns, &ec2.url(), &[]);
    let sbx: Api<Sandbox> = Api::namespaced(client.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let deploys: Api<SandboxDeploy> = Api::namespaced(client.clone(), &ns);
    let bundles: Api<SecretBundle> = Api::namespaced(client.clone(), &ns);
    let token: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "agent-token"}, "stringData": {"token": a.token},
    }))
    .unwrap();
    secrets
        .create(&PostParams::default(), &token)
        .await
        .unwrap();
    for (name, h) in hosts {
        let manifest = serde_json::json!({
            "apiVersion": "fleet.valet.dev/v1alpha1", "kind": "Sandbox",
            "metadata": {"name": name, "labels": {"group": "e2e"}},
            "spec": {
                "environment": "staging", "instanceType": "t3.large", "launch": {"imageId": ami},
                "agent": {"url": h.url(), "tokenSecretRef": {"name": "agent-token", "key": "token"}, "probeInterval": "2s", "timeout": "2s"},
            },
        });
        sbx.patch(
            name,
            &PatchParams::apply("gitops").force(),
            &Patch::Apply(&manifest),
        )
        .await
        .unwrap();
    }
    let op_ref = &op;
    let wait = |what: String, secs: u64| {
        let deadline = Instant::now() + Duration::from_secs(secs);
        move |ok: bool, last: &dyn std::fmt::Debug| {
            assert!(
                ok || Instant::now() < deadline,
                "timed out waiting for {what}: {last:?}\n{}",
                op_ref.logs()
            );
        }
    };
    for (name, _) in hosts {
        let check = wait(format!("{name} Ready"), 90);
        loop {
            let s = sbx.get(name).await.unwrap();
            let ready = s.status.as_ref().is_some_and(|st| {
                st.conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
            });
            check(ready, &s.status);
            if ready {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    // The rollout: v1 -> v2, one sandbox at a time.
    let d: SandboxDeploy = serde_json::from_value(serde_json::json!({
        "apiVersion": "fleet.valet.dev/v1alpha1", "kind": "SandboxDeploy", "metadata": {"name": "e2e-v2"},
        "spec": {"image": {"tag": "v2"}, "selector": {"matchLabels": {"group": "e2e"}}, "strategy": {"maxUnavailable": 1}},
    }))
    .unwrap();
    deploys.create(&PostParams::default(), &d).await.unwrap();
    let check = wait("the rollout".into(), 180);
    let st = loop {
        let st = deploys
            .get("e2e-v2")
            .await
            .unwrap()
            .status
            .unwrap_or_default();
        let done = matches!(st.phase, Some(DeployPhase::Succeeded | DeployPhase::Failed));
        check(done, &st);
        if done {
            break st;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(st.phase, Some(DeployPhase::Succeeded), "{st:#?}");
    assert_eq!((st.total, st.updated, st.failed), (2, 2, 0));
    assert!(
        st.targets
            .iter()
            .all(|t| t.phase == TargetPhase::Succeeded && t.from_tag.as_deref() == Some("v1")),
        "{st:#?}"
    );
    for (name, h) in hosts {
        for svc in ["api", "worker"] {
            let v = h.inspect(&h.container(svc));
            assert_eq!(v["Config"]["Image"], h.image("v2"), "{name} {svc}");
            assert_eq!(v["State"]["Running"], true, "{name} {svc}");
        }
        for t in &h.targeted {
            assert_eq!(h.image_of(&t.name), h.image("v2"), "{name} {}", t.name);
        }
        let s = sbx.get(name).await.unwrap();
        let check = wait(format!("{name} reporting v2"), 30);
        let mut s = s;
        loop {
            let tag = s
                .status
                .as_ref()
                .and_then(|st| st.agent.as_ref())
                .and_then(|ag| ag.image_tag.clone());
            check(tag.as_deref() == Some("v2"), &tag);
            if tag.as_deref() == Some("v2") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
            s = sbx.get(name).await.unwrap();
        }
    }

    // The SecretBundle: a canary value reaches the running workers (compose worker recreated,
    // targeted workers recreated), then rotations do too.
    let canary = |n: u32| {
        format!(
            "CANARY{}x{n}x{}",
            std::process::id(),
            jiff::Timestamp::now().as_millisecond()
        )
    };
    let mut canaries = vec![canary(0)];
    let secret_with = |value: &str, broken: bool| -> Secret {
        let mut data = serde_json::json!({
            "CANARY": value,
            "QUOTED": format!("pre \"{value}\" $post `tick`\nsecond line"),
            "PLAIN": "hello",
        });
        if broken {
            data["GH_STATUS_FAIL"] = "1".into();
        }
        serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "worker-secrets"},
            "stringData": data,
        }))
        .unwrap()
    };
    let secret = |value: &str| secret_with(value, false);
    secrets
        .patch(
            "worker-secrets",
            &PatchParams::apply("test").force(),
            &Patch::Apply(&secret(&canaries[0])),
        )
        .await
        .unwrap();
    let bundle: SecretBundle = serde_json::from_value(serde_json::json!({
        "apiVersion": "fleet.valet.dev/v1alpha1", "kind": "SecretBundle", "metadata": {"name": "worker-env"},
        "spec": {
            "sources": [{"secretName": "worker-secrets"}],
            "targets": {"sandboxes": {"selector": {"matchLabels": {"group": "e2e"}}, "restartServices": ["worker", "targeted"]}},
        },
    }))
    .unwrap();
    bundles
        .create(&PostParams::default(), &bundle)
        .await
        .unwrap();

    /// Waits until every worker (compose and targeted) of both hosts reports `value`.
    async fn wait_value(hosts: &[(&str, &Host)], value: &str, what: &str) {
        let start = Instant::now();
        for (name, h) in hosts {
            let mut ports = vec![h.worker_port];
            ports.extend(h.targeted.iter().map(|t| t.port));
            for port in ports {
                loop {
                    let env = h.env_at(port).await;
                    if env.get("CANARY").map(String::as_str) == Some(value) {
                        break;
                    }
                    assert!(
                        start.elapsed() < DEADLINE,
                        "{what}: the worker of {name} on port {port} never saw the new value"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
    wait_value(&hosts, &canaries[0], "the first sync").await;
    let check = wait("the bundle synced".into(), 60);
    loop {
        let st = bundles
            .get("worker-env")
            .await
            .unwrap()
            .status
            .unwrap_or_default();
        let synced = st.targets.len() == 2
            && st
                .targets
                .iter()
                .all(|t| t.state == BundleTargetState::Synced);
        check(synced, &st);
        if synced {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let quoted = a.env_at(a.worker_port).await;
    assert_eq!(
        quoted["QUOTED"],
        format!("pre \"{}\" $post `tick`\nsecond line", canaries[0])
    );

    // Rotations: from the Secret's change to every worker reporting the new value.
    let mut times = Vec::new();
    for n in 1..=3 {
        let value = canary(n);
        canaries.push(value.clone());
        let start = Instant::now();
        secrets
            .patch(
                "worker-secrets",
                &PatchParams::apply("test").force(),
                &Patch::Apply(&secret(&value)),
            )
            .await
            .unwrap();
        wait_value(&hosts, &value, "a rotation").await;
        times.push(start.elapsed().as_secs_f64());
    }
    println!(
        "FIGURE Secret change to every running worker (2 sandboxes, compose worker + 1 targeted worker recreated) reporting the new value: median {:.2} s of {:?}",
        median(times.clone()),
        times.iter().map(|t| format!("{t:.2}")).collect::<Vec<_>>()
    );

    // A push after which the workers do not come back: each target fails with the agent's
    // message; fixing the Secret puts them right.
    let last = canaries.last().unwrap().clone();
    secrets
        .patch(
            "worker-secrets",
            &PatchParams::apply("test").force(),
            &Patch::Apply(&secret_with(&last, true)),
        )
        .await
        .unwrap();
    let check = wait("the targets failed".into(), 90);
    let broken_keys = |st: &sandbox_operator::api::SecretBundleStatus| {
        st.keys.iter().any(|k| k == "GH_STATUS_FAIL")
    };
    let st = loop {
        let st = bundles
            .get("worker-env")
            .await
            .unwrap()
            .status
            .unwrap_or_default();
        if broken_keys(&st) {
            // Never synced while its workers do not come back.
            for t in &st.targets {
                assert!(
                    !(t.state == BundleTargetState::Synced && t.synced_hash == st.content_hash),
                    "{} is Synced with content its worker does not come back with: {st:#?}\n{}\n{}",
                    t.name,
                    a.logs(),
                    b.logs()
                );
            }
        }
        let failed = broken_keys(&st)
            && st.targets.len() == 2
            && st
                .targets
                .iter()
                .all(|t| t.state == BundleTargetState::Failed);
        check(failed, &st);
        if failed {
            break st;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    for t in &st.targets {
        let m = t.message.as_deref().unwrap_or_default();
        assert!(
            m.contains("restarting worker: recreated, but not healthy") && m.contains("HTTP 503"),
            "{}: {m}",
            t.name
        );
    }
    let ta = &st.targets.iter().find(|t| t.name == "sbx-a").unwrap();
    assert!(
        ta.message
            .as_deref()
            .unwrap_or_default()
            .contains("restarting targeted:"),
        "{ta:?}"
    );
    // (A key left out of an applied stringData stays in data: remove it from data.)
    secrets
        .patch(
            "worker-secrets",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"data": {"GH_STATUS_FAIL": null}})),
        )
        .await
        .unwrap();
    let check = wait("the targets synced again".into(), 90);
    loop {
        let st = bundles
            .get("worker-env")
            .await
            .unwrap()
            .status
            .unwrap_or_default();
        let synced = !broken_keys(&st)
            && st
                .targets
                .iter()
                .all(|t| t.state == BundleTargetState::Synced);
        check(synced, &st);
        if synced {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for (_, h) in hosts {
        h.wait_http_ok(&format!("http://127.0.0.1:{}/worker/status", h.worker_port))
            .await;
        for t in &h.targeted {
            h.wait_http_ok(&format!("http://127.0.0.1:{}/worker/status", t.port))
                .await;
        }
    }

    // The canary went where it should, and nowhere else: not the engine's view of the
    // containers (labels, Cmd, Args, Entrypoint, ...), the engine's log, the agents' logs and
    // files, the operator's log, the Kubernetes objects or the Events.
    let mut places: Vec<(String, String)> = Vec::new();
    for (name, h) in hosts {
        places.extend(inspect_without_env(h));
        places.push((format!("agent log ({name})"), h.logs()));
        for f in files_under(&h.dir.join("state")) {
            places.push((
                format!("agent file {}", f.display()),
                String::from_utf8_lossy(&std::fs::read(&f).unwrap()).into_owned(),
            ));
        }
    }
    // (Config.Env does hold it: that is where env_file values go.)
    let env_of_worker = a.inspect(&a.container("worker"))["Config"]["Env"].to_string();
    assert!(env_of_worker.contains(canaries.last().unwrap().as_str()));
    places.push((
        "the engine's log".into(),
        std::fs::read_to_string(a.engine.log_path()).unwrap_or_default(),
    ));
    places.push(("operator log".into(), op.logs()));
    for ev in Api::<Event>::namespaced(client.clone(), &ns)
        .list(&ListParams::default())
        .await
        .unwrap()
    {
        places.push((
            format!("event {}", ev.metadata.name.clone().unwrap_or_default()),
            serde_json::to_string(&ev).unwrap(),
        ));
    }
    for x in bundles.list(&ListParams::default()).await.unwrap() {
        places.push(("SecretBundle".into(), serde_json::to_string(&x).unwrap()));
    }
    for x in sbx.list(&ListParams::default()).await.unwrap() {
        places.push(("Sandbox".into(), serde_json::to_string(&x).unwrap()));
    }
    for x in deploys.list(&ListParams::default()).await.unwrap() {
        places.push(("SandboxDeploy".into(), serde_json::to_string(&x).unwrap()));
    }
    assert!(places.len() > 10, "{}", places.len());
    for c in &canaries {
        let b64 = base64::engine::general_purpose::STANDARD.encode(c);
        for (place, text) in &places {
            assert!(
                !text.contains(c.as_str()) && !text.contains(&b64),
                "the canary leaked into {place}: {}",
                text.lines()
                    .filter(|l| l.contains(c.as_str()) || l.contains(&b64))
                    .take(3)
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
    }
}
